//! The admin listener and its clients under trouble: `postern status` / `lookup` against a stopped
//! process, session ids as jq and JavaScript read them, and `/healthz` under a flood of idle and
//! slow connections.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// Sends SIGCONT to a process stopped with SIGSTOP when dropped, so that a failing test does not
/// leave a stopped process behind (its `Proc` guard then kills it).
pub struct Stopped(u32);

impl Stopped {
    pub fn stop(proc: &Proc) -> Stopped {
        proc.signal("STOP");
        Stopped(proc.pid())
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// A `postern server` alone (memory registry, no agent): the admin listener and nothing to route.
async fn lone_server(w: &Workdir, net: u8) -> (Proc, SocketAddr) {
    let config = w.write("server.toml", &server_toml(w, net, &[], "2s"));
    let (server, line) =
        Proc::postern("server", "server", &config, &[], &w.path("server.log")).await;
    (server, ready_addr(&line, "admin"))
}

async fn postern_cli(args: &[&str]) -> (std::process::Output, Duration) {
    let started = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(BIN)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("postern {args:?} still running after 60s"))
    .unwrap();
    (out, started.elapsed())
}

/// 10.3: against a process stopped with SIGSTOP (it accepts TCP connections but never answers),
/// `postern status` and `postern lookup` exit non-zero within their deadline, naming the address
/// and the step that timed out; the default deadline is 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_lookup_give_up_on_a_stopped_process_within_their_deadline() {
    let w = Workdir::new("stopped");
    let (server, admin) = lone_server(&w, 68).await;
    let admin_text = admin.to_string();
    let (out, _) = postern_cli(&["status", "--admin", &admin_text, "--timeout", "1s"]).await;
    assert!(
        out.status.success(),
        "status of a running process: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let _stopped = Stopped::stop(&server);
    let (out, took) = postern_cli(&["status", "--admin", &admin_text, "--timeout", "1s"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("status against a stopped process: {took:?}: {stderr}");
    assert!(
        !out.status.success(),
        "status succeeded against a stopped process"
    );
    assert!(took < Duration::from_secs(4), "status took {took:?}");
    assert!(
        stderr.contains("timed out after 1s waiting for the answer")
            && stderr.contains(&admin_text)
            && stderr.contains("GET /api/status"),
        "{stderr}"
    );

    // The default deadline (5 s) for lookup.
    let (out, took) = postern_cli(&["lookup", "127.68.0.1", "--admin", &admin_text]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("lookup against a stopped process: {took:?}: {stderr}");
    assert!(
        !out.status.success(),
        "lookup succeeded against a stopped process"
    );
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(9),
        "lookup took {took:?}"
    );
    assert!(
        stderr.contains("timed out after 5s") && stderr.contains(&admin_text),
        "{stderr}"
    );
}

/// Runs `jq -r FILTER` over `input`.
fn jq(filter: &str, input: &[u8]) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new("jq")
        .args(["-r", filter])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("jq is missing ({e}): install Debian's `jq` (scripts/deps does)")
        });
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "jq {filter}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// 10.7: the session id of a tunnel, read with `jq -r` from `/api/routes` and from `/api/agents`,
/// is a JSON string and exactly the id `postern lookup` prints and the relay's JSON log carries.
/// (Session ids are random 64-bit values: as JSON numbers, jq 1.6 and JavaScript round them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ids_are_strings_that_match_lookup_and_the_log() {
    let w = Workdir::new("session-ids");
    let s = Single::start(&w, 70, &[], &["--log-format", "json"]).await;
    let ip = Ipv4Addr::new(127, 70, 0, 1);
    let (code, routes) = http_get(s.admin, &format!("/api/routes?ip={ip}"))
        .await
        .unwrap();
    assert_eq!(code, 200, "{routes}");
    assert_eq!(
        jq(".[0].session_id | type", routes.as_bytes()),
        "string",
        "{routes}"
    );
    let from_routes = jq(".[0].session_id", routes.as_bytes());

    let (code, agents) = http_get(s.admin, "/api/agents").await.unwrap();
    assert_eq!(code, 200, "{agents}");
    assert_eq!(
        jq(".[0].sessions[0].session_id | type", agents.as_bytes()),
        "string",
        "{agents}"
    );
    assert_eq!(
        jq(".[0].sessions[0].session_id", agents.as_bytes()),
        from_routes
    );
    assert_eq!(
        jq(".[0].sessions[0].relay_id", agents.as_bytes()),
        "relay-ops"
    );

    let admin = s.admin.to_string();
    let (out, _) = postern_cli(&["lookup", &ip.to_string(), "--admin", &admin]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "session")?;
            words.get(at + 1).copied()
        })
        .collect();
    assert_eq!(printed, [from_routes.as_str()], "{text}");

    let log = wait_for(QUICK, "the relay's `tunnel up` line", || async {
        let log = w.log("server.log");
        log.contains("tunnel up").then_some(log)
    })
    .await;
    let filter = r#"fromjson? | select(.fields.message == "tunnel up") | .fields.session_id"#;
    let raw = {
        use std::io::Write as _;
        let mut child = std::process::Command::new("jq")
            .args(["-R", "-r", &format!("{filter} | type, .")])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(log.as_bytes())
            .unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    let fields: Vec<&str> = raw.lines().collect();
    assert_eq!(fields, ["string", from_routes.as_str()], "{log}");
}

/// The open-file limit of this process (soft), from /proc.
fn open_file_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// One attacker connection kept open for ever: reconnected from `source` whenever the server
/// closes it. `slow` ones dribble a never-ending request head, one byte a second.
async fn hold(
    source: Ipv4Addr,
    admin: SocketAddr,
    slow: bool,
    held: Arc<AtomicUsize>,
    connects: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).unwrap();
        let mut tcp = tokio::select! {
            _ = stop.cancelled() => return,
            c = socket.connect(admin) => match c {
                Ok(tcp) => tcp,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        connects.fetch_add(1, Ordering::Relaxed);
        held.fetch_add(1, Ordering::Relaxed);
        let (mut read, mut write) = tcp.split();
        let mut buf = [0u8; 256];
        let head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-padding: ";
        let mut sent = 0usize;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                n = read.read(&mut buf) => if matches!(n, Ok(0) | Err(_)) { break },
                _ = tokio::time::sleep(Duration::from_secs(1)), if slow => {
                    let byte = head.get(sent).copied().unwrap_or(b'a');
                    sent += 1;
                    if write.write_all(&[byte]).await.is_err() {
                        break;
                    }
                }
            }
        }
        held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// GET /healthz on a new connection; its status line and the time to the complete answer. It runs
/// on a thread of its own with blocking sockets, so that the figure is the server's, not the delay
/// of this test's runtime busy with the flood's tasks.
async fn probe(admin: SocketAddr) -> (String, Duration) {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read as _, Write as _};
        let started = Instant::now();
        let answer = (|| {
            let mut tcp = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(5))?;
            tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
            tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
            let mut out = String::new();
            tcp.read_to_string(&mut out)?;
            Ok::<_, std::io::Error>(out)
        })();
        let took = started.elapsed();
        let status = match answer {
            Ok(text) => text
                .lines()
                .next()
                .unwrap_or("(closed without an answer)")
                .to_string(),
            Err(err) => format!("error: {err}"),
        };
        (status, took)
    })
    .await
    .unwrap()
}

/// 13.1: while 1,000 idle and 1,000 slow (a header byte a second) connections from 200 loopback
/// source addresses hold the admin port — and are reopened as soon as the server closes them —
/// `/healthz` answers every probe. The figure (p50 and max, printed) is 100 ms or less on an idle
/// machine; the bound asserted here is a second, so that a busy CI machine cannot fail it while the
/// old listener, which let the flood hold every slot, still does (its probes got no answer at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_under_a_flood_of_idle_and_slow_connections() {
    const IDLE: usize = 1000;
    const SLOW: usize = 1000;
    const SOURCES: usize = 200;
    let limit = open_file_limit();
    assert!(
        limit >= (IDLE + SLOW + 500) as u64,
        "this test opens {} sockets but the open-file limit is {limit}: raise it (ulimit -n 4096)",
        IDLE + SLOW
    );
    let w = Workdir::new("flood");
    let (_server, admin) = lone_server(&w, 69).await;
    let (status, _) = probe(admin).await;
    assert_eq!(status, "HTTP/1.1 200 OK");

    let held = Arc::new(AtomicUsize::new(0));
    let connects = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let mut attackers = tokio::task::JoinSet::new();
    for i in 0..IDLE + SLOW {
        let source = Ipv4Addr::new(127, 0, 0, 2 + (i % SOURCES) as u8);
        attackers.spawn(hold(
            source,
            admin,
            i >= IDLE,
            held.clone(),
            connects.clone(),
            stop.clone(),
        ));
    }
    wait_for(QUICK, "every attacker connected once", || async {
        (connects.load(Ordering::Relaxed) >= IDLE + SLOW).then_some(())
    })
    .await;

    let flood_start = connects.load(Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut failures = Vec::new();
    let mut held_seen = Vec::new();
    for _ in 0..40 {
        held_seen.push(held.load(Ordering::Relaxed));
        let (status, took) = probe(admin).await;
        if status != "HTTP/1.1 200 OK" || took > Duration::from_secs(1) {
            failures.push(format!("{status} after {took:?}"));
        }
        latencies.push(took);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reconnects = connects.load(Ordering::Relaxed) - flood_start;
    stop.cancel();
    while attackers.join_next().await.is_some() {}
    latencies.sort();
    eprintln!(
        "healthz under {IDLE} idle + {SLOW} slow connections from {SOURCES} sources: \
         p50 {:?}, max {:?} over {} probes; attacker connections open (client side) {}..{}; \
         {reconnects} reconnects during the probes",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
        latencies.len(),
        held_seen.iter().min().unwrap(),
        held_seen.iter().max().unwrap(),
    );
    assert!(
        *held_seen.iter().min().unwrap() >= (IDLE + SLOW) * 9 / 10,
        "the flood did not hold the port: {held_seen:?}"
    );
    assert!(
        failures.is_empty(),
        "probes that failed or were slow: {failures:?}"
    );
}
