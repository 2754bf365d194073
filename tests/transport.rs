//! The TCP tunnel transport, in network namespaces the tests create (and delete, also on failure):
//!
//! ```text
//!  ns k (clients)          ns c (central)                         ns a (agent)
//!  curl 10.203.0.2 ── 10.203.0.1 gateway (SOCKS5, HTTP)
//!                          etcd 127.0.0.1, relay-1, relay-2 ── 10.201.0.1 ══ 10.201.0.2 agent
//!                          on 10.201.0.1 (UDP + TCP)                       service 10.202.0.1:8080
//! ```
//!
//! The agent's network reaches nothing but the relays' address; `tc` on its interface drops every
//! UDP packet it sends when a test says so. Clients reach the service only through the gateway,
//! by its original IP. Real processes throughout; the service is Python's `http.server`.
//! Needs root (namespaces, `tc`): the tests fail, never skip, without it.

#[path = "process/mod.rs"]
mod process;
#[path = "ops/support.rs"]
#[allow(dead_code)]
mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

const RELAY_IP: &str = "10.201.0.1";
const AGENT_NET_IP: &str = "10.201.0.2";
const SERVICE_IP: &str = "10.202.0.1";
const GATEWAY_IP: &str = "10.203.0.1";
const CLIENT_IP: &str = "10.203.0.2";

fn run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"))
}

fn sh(args: &[&str]) {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace, deleted when dropped (its veth ends go with it).
struct Netns {
    name: String,
}

impl Netns {
    fn new(role: &str) -> Netns {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "pt{}-{}-{role}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        sh(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend_from_slice(args);
        sh(&all);
    }

    /// `argv` run inside the namespace.
    fn exec<'a>(&'a self, argv: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(argv);
        all
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// The three namespaces and their wiring. Dropped last (declared first in [`Net`] users' scope).
struct Topology {
    central: Netns,
    agent: Netns,
    clients: Netns,
}

impl Topology {
    fn new() -> Topology {
        let t = Topology {
            central: Netns::new("c"),
            agent: Netns::new("a"),
            clients: Netns::new("k"),
        };
        let (c, a, k) = (&t.central.name, &t.agent.name, &t.clients.name);
        sh(&[
            "ip", "-n", c, "link", "add", "ca", "type", "veth", "peer", "name", "ac", "netns", a,
        ]);
        sh(&[
            "ip", "-n", c, "link", "add", "ck", "type", "veth", "peer", "name", "kc", "netns", k,
        ]);
        t.central
            .ip(&["addr", "add", &format!("{RELAY_IP}/24"), "dev", "ca"]);
        t.central
            .ip(&["addr", "add", &format!("{GATEWAY_IP}/24"), "dev", "ck"]);
        t.agent
            .ip(&["addr", "add", &format!("{AGENT_NET_IP}/24"), "dev", "ac"]);
        t.agent
            .ip(&["addr", "add", &format!("{SERVICE_IP}/32"), "dev", "lo"]);
        t.clients
            .ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "kc"]);
        for (ns, dev) in [
            (&t.central, "ca"),
            (&t.central, "ck"),
            (&t.agent, "ac"),
            (&t.clients, "kc"),
        ] {
            ns.ip(&["link", "set", dev, "up"]);
        }
        // The local table is looked up first (preference 0) and would deliver before any rule
        // could drop: it moves behind the preference the UDP rule takes.
        t.central
            .ip(&["rule", "add", "pref", "100", "lookup", "local"]);
        t.central.ip(&["rule", "del", "pref", "0"]);
        t
    }

    /// Drops every UDP packet the agent's network sends (all of QUIC), silently, as a firewall
    /// does: a policy-routing rule in the central namespace blackholes UDP arriving from the
    /// agent's link (`tc`'s drop action is not available on every kernel; `ip rule` needs none).
    fn drop_udp(&self) {
        self.central.ip(&[
            "rule",
            "add",
            "pref",
            "10",
            "iif",
            "ca",
            "ipproto",
            "udp",
            "blackhole",
        ]);
    }

    fn allow_udp(&self) {
        self.central.ip(&["rule", "del", "pref", "10"]);
    }
}

/// Everything running in the topology.
struct Net {
    w: Workdir,
    _etcd: Proc,
    relays: Vec<Option<Proc>>,
    _gateway: Proc,
    gateway_admin: String,
    socks5: String,
    http: String,
    _agent: Proc,
    agent_admin: String,
    _service: Proc,
    big: PathBuf,
}

const BIG: usize = 200 * 1024 * 1024;

fn write_file(path: &Path, len: usize, seed: u64) {
    use std::io::Write as _;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let block = process::payload(1 << 20, seed);
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len());
        f.write_all(&block[..n]).unwrap();
        left -= n;
    }
}

fn file_sha(path: &Path) -> Vec<u8> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).unwrap();
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    ctx.finish().as_ref().to_vec()
}

async fn start_in(ns: &Netns, name: &str, argv: &[&str], log: &Path) -> (Proc, String) {
    let args = ns.exec(argv);
    let mut proc = Proc::spawn(name, "ip", &args, &[("POSTERN_TEST_TOKEN", TOKEN)], log);
    let line = proc.ready_line().await;
    (proc, line)
}

fn ready_value(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_string()
}

impl Net {
    async fn start(t: &Topology, prefix: &str, agent_extra: &str) -> Net {
        let w = Workdir::new(prefix);
        let dir = w.dir.path().to_path_buf();
        let pki = |p: &Path| p.to_str().unwrap().to_string();
        // etcd on the central namespace's own loopback.
        let data = dir.join("etcd-data");
        let etcd_args = [
            "etcd",
            "--name",
            "t",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-client-urls",
            "http://127.0.0.1:2379",
            "--advertise-client-urls",
            "http://127.0.0.1:2379",
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "t=http://127.0.0.1:2380",
        ];
        let etcd = Proc::spawn(
            "etcd",
            "ip",
            &t.central.exec(&etcd_args),
            &[],
            &dir.join("etcd.log"),
        );
        process::wait_for(QUICK, "etcd to answer", || async {
            let mut argv = vec!["ip"];
            argv.extend(t.central.exec(&[
                "curl",
                "-sf",
                "--max-time",
                "1",
                "http://127.0.0.1:2379/health",
            ]));
            run(&argv).status.success().then_some(())
        })
        .await;
        let mut relays = Vec::new();
        let mut relay_addrs = Vec::new();
        for id in ["relay-1", "relay-2"] {
            let config = dir.join(format!("{id}.toml"));
            std::fs::write(
                &config,
                format!(
                    r#"
[relay]
id = "{id}"
listen = "{RELAY_IP}:0"
cert = "{cert}"
key = "{key}"
peer_listen = "127.0.0.1:0"
drain_grace = "5s"
[[relay.agents]]
name = "t"
token_sha256 = "{hash}"
allow = ["{SERVICE_IP}/32"]
[peer]
ca = "{ca}"
[registry]
kind = "etcd"
endpoints = ["http://127.0.0.1:2379"]
lease_ttl = "4s"
[admin]
listen = "127.0.0.1:0"
"#,
                    cert = pki(&w.pki.relay_cert),
                    key = pki(&w.pki.relay_key),
                    hash = postern::config::token_hash(TOKEN),
                    ca = pki(&w.pki.ca),
                ),
            )
            .unwrap();
            let (proc, line) = start_in(
                &t.central,
                id,
                &[BIN, "relay", "--config", config.to_str().unwrap()],
                &dir.join(format!("{id}.log")),
            )
            .await;
            relay_addrs.push(ready_value(&line, "relay"));
            relays.push(Some(proc));
        }
        let config = dir.join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[gateway]
socks5 = "{GATEWAY_IP}:0"
http = "{GATEWAY_IP}:0"
clients = ["{CLIENT_IP}/32"]
[peer]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[registry]
kind = "etcd"
endpoints = ["http://127.0.0.1:2379"]
[admin]
listen = "127.0.0.1:0"
"#,
                ca = pki(&w.pki.ca),
                cert = pki(&w.pki.peer_cert),
                key = pki(&w.pki.peer_key),
            ),
        )
        .unwrap();
        let (gateway, line) = start_in(
            &t.central,
            "gateway",
            &[BIN, "gateway", "--config", config.to_str().unwrap()],
            &dir.join("gateway.log"),
        )
        .await;
        let socks5 = ready_value(&line, "socks5");
        let gateway_admin = ready_value(&line, "admin");
        let http = ready_value(&line, "http");
        // The service: a small file and a 200 MB one, served from the agent's namespace.
        let www = dir.join("www");
        std::fs::create_dir(&www).unwrap();
        write_file(&www.join("small"), 4096, 1);
        let big = www.join("big");
        write_file(&big, BIG, 2);
        let mut service = Proc::spawn(
            "service",
            "ip",
            &t.agent.exec(&[
                "python3",
                "-u",
                "-m",
                "http.server",
                "8080",
                "--bind",
                SERVICE_IP,
                "--directory",
                www.to_str().unwrap(),
            ]),
            &[],
            &dir.join("service.log"),
        );
        service.first_line("Serving HTTP").await;
        let config = dir.join("agent.toml");
        let relays_list = relay_addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &config,
            format!(
                r#"
id = "agent-ns"
relays = [{relays_list}]
server_name = "postern-relay"
ca = "{ca}"
token = "env:POSTERN_TEST_TOKEN"
ips = ["{SERVICE_IP}"]
ports = ["8080"]
redundancy = 2
reconnect_min = "100ms"
reconnect_max = "1s"
{agent_extra}
[admin]
listen = "127.0.0.1:0"
"#,
                ca = pki(&w.pki.ca),
            ),
        )
        .unwrap();
        let (agent, line) = start_in(
            &t.agent,
            "agent",
            &[BIN, "agent", "--config", config.to_str().unwrap()],
            &dir.join("agent.log"),
        )
        .await;
        let agent_admin = ready_value(&line, "admin");
        Net {
            w,
            _etcd: etcd,
            relays,
            _gateway: gateway,
            gateway_admin,
            socks5,
            http,
            _agent: agent,
            agent_admin,
            _service: service,
            big,
        }
    }

    /// The agent's tunnels by transport, from its own metrics.
    fn tunnels(&self, t: &Topology) -> (u64, u64) {
        let url = format!("http://{}/metrics", self.agent_admin);
        let mut argv = vec!["ip"];
        argv.extend(t.agent.exec(&["curl", "-sf", "--max-time", "2", &url]));
        let out = run(&argv);
        let text = String::from_utf8_lossy(&out.stdout);
        let count = |transport: &str| {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(&format!(
                        "postern_agent_tunnels_by_transport{{transport=\"{transport}\"}} "
                    ))
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        (count("quic"), count("tcp"))
    }

    /// `postern status` (from the gateway) and `postern status` of the agent itself.
    fn status(&self, t: &Topology) -> (String, String) {
        let show = |ns: &Netns, admin: &str| {
            let mut argv = vec!["ip"];
            argv.extend(ns.exec(&[BIN, "status", "--admin", admin]));
            let out = run(&argv);
            assert!(out.status.success(), "postern status: {out:?}");
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        (
            show(&t.central, &self.gateway_admin),
            show(&t.agent, &self.agent_admin),
        )
    }

    /// Waits until the gateway's `postern status` shows `line` (its view of the agent's routes).
    async fn wait_cluster(&self, t: &Topology, line: &str, what: &str) {
        process::wait_for(Duration::from_secs(40), what, || async {
            self.status(t).0.contains(line).then_some(())
        })
        .await;
    }

    async fn wait_tunnels(&self, t: &Topology, want: (u64, u64), what: &str) {
        let what = format!(
            "{what}: tunnels (quic, tcp) = {want:?} (logs in {})",
            self.w.dir.path().display()
        );
        process::wait_for(Duration::from_secs(40), &what, || async {
            (self.tunnels(t) == want).then_some(())
        })
        .await;
    }
}

/// Where clients go: their namespace and the gateway's two doors.
#[derive(Clone)]
struct Doors {
    ns: String,
    socks5: String,
    http: String,
}

impl Net {
    fn doors(&self, t: &Topology) -> Doors {
        Doors {
            ns: t.clients.name.clone(),
            socks5: self.socks5.clone(),
            http: self.http.clone(),
        }
    }
}

/// `curl` from the clients' namespace through a door: `socks` or `http`. Returns whether it
/// fetched `path` completely (into `out` when given).
async fn curl(d: &Doors, door: &str, path: &str, out: Option<&Path>) -> bool {
    let proxy = match door {
        "socks" => format!("socks5://{}", d.socks5),
        _ => format!("http://{}", d.http),
    };
    let url = format!("http://{SERVICE_IP}:8080/{path}");
    let out_path = out.map_or("/dev/null".to_string(), |p| p.to_str().unwrap().to_string());
    let status = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &d.ns,
            "curl",
            "-sf",
            "--max-time",
            "60",
            "-x",
            &proxy,
            "-o",
            &out_path,
            &url,
        ])
        .status()
        .await
        .unwrap();
    status.success()
}

/// Clients fetching the small file back to back on `workers` connections until `stop`; returns
/// the start times (since `t0`) of the fetches that failed, and how many succeeded.
struct Load {
    failures: Arc<Mutex<Vec<Duration>>>,
    /// Fetches that succeeded so far; tests wait on it for the load to have run in a state.
    ok: Arc<tokio::sync::watch::Sender<usize>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(doors: &Doors, workers: usize, t0: Instant) -> Load {
        let failures = Arc::new(Mutex::new(Vec::new()));
        let ok = Arc::new(tokio::sync::watch::Sender::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..workers)
            .map(|i| {
                let d = doors.clone();
                let (failures, ok, stop) = (failures.clone(), ok.clone(), stop.clone());
                tokio::spawn(async move {
                    let door = if i % 2 == 0 { "socks" } else { "http" };
                    while !stop.load(Ordering::Relaxed) {
                        let at = t0.elapsed();
                        if curl(&d, door, "small", None).await {
                            ok.send_modify(|n| *n += 1);
                        } else {
                            failures.lock().unwrap().push(at);
                        }
                    }
                })
            })
            .collect();
        Load {
            failures,
            ok,
            stop,
            tasks,
        }
    }

    /// Waits until `n` more fetches have succeeded than had when called.
    async fn succeeds(&self, n: usize, what: &str) {
        let target = *self.ok.borrow() + n;
        let mut ok = self.ok.subscribe();
        let limit = Duration::from_secs(40);
        let reached = tokio::time::timeout(limit, ok.wait_for(|got| *got >= target)).await;
        assert!(
            matches!(reached, Ok(Ok(_))),
            "{what}: fewer than {n} fetches succeeded within {limit:?} (failures at {:?})",
            self.failures.lock().unwrap()
        );
    }

    async fn finish(self) -> (Vec<Duration>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        let ok = *self.ok.borrow();
        (failures, ok)
    }
}

/// With all UDP dropped, an `auto` agent comes up over TCP; both doors reach its service by its
/// original IP; 200 MB arrive byte-exact; killing one of the two relays fails no client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_udp_an_auto_agent_tunnels_over_tcp() {
    let t = Topology::new();
    t.drop_udp();
    let mut net = Net::start(&t, "tcp-only", "").await;
    net.wait_tunnels(&t, (0, 2), "two TCP tunnels").await;
    let doors = net.doors(&t);
    // Status shows the transport: the cluster view (routes published by the relays) and the
    // agent's own.
    process::wait_for(QUICK, "status to show both tunnels on TCP", || async {
        let (cluster, agent) = net.status(&t);
        (cluster.contains("relays relay-1,relay-2 (tcp,tcp)")
            && agent.contains("2 tunnels up (tcp 2)"))
        .then_some(())
    })
    .await;

    for door in ["socks", "http"] {
        let out = net.w.dir.path().join(format!("small-{door}"));
        assert!(curl(&doors, door, "small", Some(&out)).await, "{door} door");
        assert_eq!(
            std::fs::read(&out).unwrap(),
            process::payload(1 << 20, 1)[..4096]
        );
    }
    let out = net.w.dir.path().join("big-copy");
    let started = Instant::now();
    assert!(
        curl(&doors, "socks", "big", Some(&out)).await,
        "200 MB transfer"
    );
    let took = started.elapsed();
    assert_eq!(std::fs::metadata(&out).unwrap().len(), BIG as u64);
    assert!(
        file_sha(&out) == file_sha(&net.big),
        "200 MB transfer differs"
    );
    eprintln!("200 MB over the TCP tunnel in {took:?}");
    std::fs::remove_file(&out).unwrap();

    // Kill one relay (SIGKILL: no drain) under concurrent clients of both doors.
    let t0 = Instant::now();
    let load = Load::start(&doors, 4, t0);
    load.succeeds(8, "fetches before the kill").await;
    let killed = t0.elapsed();
    let mut relay = net.relays[0].take().unwrap();
    relay.child.start_kill().unwrap();
    let _ = relay.child.wait().await;
    // Through the whole change: until the dead relay's lease has expired and its routes are gone
    // from the gateway's view, then some fetches more on what is left.
    net.wait_cluster(
        &t,
        "relays relay-2 (tcp) since",
        "the killed relay's routes to expire",
    )
    .await;
    load.succeeds(8, "fetches after the routes moved").await;
    let (failures, ok) = load.finish().await;
    eprintln!("relay-1 killed at {killed:?}; {ok} fetches succeeded, failures at {failures:?}");
    assert!(ok > 20, "too few fetches ran: {ok}");
    // A fetch in flight on the killed relay dies with it (at most one per client); the relay's
    // death must cost no fetch started after it.
    let late: Vec<_> = failures.iter().filter(|f| **f >= killed).collect();
    assert!(
        late.is_empty() && failures.len() <= 4,
        "fetches started after the relay died failed: {late:?} (all: {failures:?})"
    );
    drop(net);
}

/// With UDP passing, an `auto` agent tunnels over QUIC; when UDP stops passing at run time its
/// tunnels move to TCP, and back to QUIC once UDP passes again. Clients keep fetching through
/// both doors throughout: none started more than a second after the cut fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_agent_moves_to_tcp_and_back_with_udp() {
    let t = Topology::new();
    let net = Net::start(&t, "tcp-move", "quic_probe_interval = \"3s\"").await;
    net.wait_tunnels(&t, (2, 0), "two QUIC tunnels").await;
    let doors = net.doors(&t);
    process::wait_for(QUICK, "status to show both tunnels on QUIC", || async {
        let (cluster, agent) = net.status(&t);
        (cluster.contains("relays relay-1,relay-2 (quic,quic)")
            && agent.contains("2 tunnels up (quic 2)"))
        .then_some(())
    })
    .await;
    assert!(curl(&doors, "socks", "small", None).await);

    let t0 = Instant::now();
    let load = Load::start(&doors, 4, t0);
    load.succeeds(8, "fetches over QUIC").await;
    let cut = t0.elapsed();
    t.drop_udp();
    net.wait_tunnels(&t, (0, 2), "tunnels moved to TCP").await;
    let on_tcp = t0.elapsed();
    // Until the QUIC tunnels' routes are gone (they wind down like drained ones), then some
    // fetches more over TCP alone.
    net.wait_cluster(&t, "relays relay-1,relay-2 (tcp,tcp)", "only TCP routes")
        .await;
    load.succeeds(8, "fetches over TCP").await;
    let restored = t0.elapsed();
    t.allow_udp();
    net.wait_tunnels(&t, (2, 0), "tunnels back on QUIC").await;
    let back = t0.elapsed();
    net.wait_cluster(
        &t,
        "relays relay-1,relay-2 (quic,quic)",
        "only QUIC routes again",
    )
    .await;
    load.succeeds(8, "fetches back on QUIC").await;
    let (failures, ok) = load.finish().await;
    eprintln!(
        "UDP cut at {cut:?}, both tunnels on TCP at {on_tcp:?}, UDP back at {restored:?}, \
         both on QUIC at {back:?}; {ok} fetches succeeded, failures (start times) at {failures:?}"
    );
    assert!(ok > 20, "too few fetches ran: {ok}");
    // Fetches in flight at the cut may fail (their tunnel's packets are dropped); any started
    // more than a second after it must not: the agent notices within two keep-alive intervals,
    // and until its TCP tunnels are up the gateway's hedge finds no better owner, so such fetches
    // wait for the new routes rather than fail.
    let allowed = cut + Duration::from_secs(1);
    let late: Vec<_> = failures.iter().filter(|f| **f > allowed).collect();
    assert!(
        late.is_empty(),
        "fetches started more than 1 s after the cut failed: {late:?} (all: {failures:?})"
    );
    drop(net);
}
