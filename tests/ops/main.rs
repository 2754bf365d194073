//! Operability, with real processes on 127.0.0.0/8 (and a real etcd where the role needs one):
//! metrics, readiness per role, `postern status` / `lookup`, SIGHUP reload, the access log, the
//! Kubernetes / systemd / container files, and the status page in headless Chromium.
//! Each test uses its own agent address range 127.N.0.0/16.

mod admin;
mod alerts;
mod broken;
mod deploy;
mod lifecycle;
mod logs;
mod newcomer;
mod page;
#[path = "../process/mod.rs"]
mod process;
mod proxy;
mod reload;
mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::*;

/// a. `/metrics` passes `promtool check metrics`, and the client counters move by exactly the
/// traffic sent: N SOCKS5 connections of known sizes, then one to a refused port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_count_exactly_the_traffic() {
    let w = Workdir::new("metrics");
    let s = Single::start(&w, 61, &[], &[]).await;
    let ok = r#"postern_gateway_connections_total{front="socks5",result="ok"}"#;
    let refused =
        r#"postern_gateway_connections_total{front="socks5",result="connection_refused"}"#;
    let up = r#"postern_gateway_bytes_total{direction="up"}"#;
    let down = r#"postern_gateway_bytes_total{direction="down"}"#;
    let scrape = || async {
        let (code, body) = http_get(s.admin, "/metrics").await.unwrap();
        assert_eq!(code, 200, "{body}");
        body
    };
    let before = parse_samples(&scrape().await);
    let get =
        |m: &std::collections::BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);

    let sizes = [0usize, 1, 1000, 65_536, 300_001, 1 << 20];
    let (mut sent, mut received) = (0usize, 0usize);
    for (i, size) in sizes.iter().enumerate() {
        let (s_up, s_down) = echo_through(s.socks5, None, s.echo.addr, *size, i as u64)
            .await
            .unwrap_or_else(|e| panic!("transfer {i} of {size} bytes: {e}"));
        sent += s_up;
        received += s_down;
    }
    // Bytes sent in the same write as the greeting and request count as well.
    {
        let std::net::SocketAddr::V4(echo) = s.echo.addr else {
            unreachable!()
        };
        let early = payload(1000, 99);
        let mut first = vec![5, 1, 0, 5, 1, 0, 1];
        first.extend_from_slice(&echo.ip().octets());
        first.extend_from_slice(&echo.port().to_be_bytes());
        first.extend_from_slice(&early);
        let mut tcp = tokio::net::TcpStream::connect(s.socks5).await.unwrap();
        tcp.write_all(&first).await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(QUICK, tcp.read_to_end(&mut reply))
            .await
            .expect("the echo")
            .unwrap();
        assert_eq!(&reply[..4], &[5, 0, 5, 0], "{reply:?}");
        // The method choice and the 10-byte reply are the gateway's own, not carried bytes.
        assert!(reply.ends_with(&early), "the early bytes came back");
        sent += early.len();
        received += reply.len() - 12;
    }
    // The gateway counts a connection when its splice ends, just after the client saw EOF.
    let n = sizes.len() as f64 + 1.0;
    let after = wait_for(QUICK, "the ok counter to reach N", || async {
        let m = parse_samples(&scrape().await);
        (get(&m, ok) >= get(&before, ok) + n).then_some(m)
    })
    .await;
    assert_eq!(get(&after, ok) - get(&before, ok), n, "ok connections");
    assert_eq!(get(&after, up) - get(&before, up), sent as f64, "bytes up");
    assert_eq!(
        get(&after, down) - get(&before, down),
        received as f64,
        "bytes down (echo header included)"
    );

    // A port the agent exposes but where nothing listens: SOCKS5 0x05, result label refused.
    let code = socks_connect(s.socks5, None, s.refused).await.err();
    assert_eq!(code, Some(0x05), "SOCKS5 reply for a refused target");
    let text = wait_for(QUICK, "the refused counter", || async {
        let text = scrape().await;
        let m = parse_samples(&text);
        (get(&m, refused) >= get(&before, refused) + 1.0).then_some(text)
    })
    .await;
    let last = parse_samples(&text);
    assert_eq!(get(&last, refused) - get(&before, refused), 1.0);
    assert_eq!(get(&last, ok), get(&after, ok), "a refusal is not an ok");
    assert_eq!(
        get(&last, up),
        get(&after, up),
        "a refusal carries no bytes"
    );
    for family in [
        "postern_build_info",
        "postern_relay_tunnels",
        "postern_relay_tunnels_refused_total",
        "postern_routes_cached",
        "postern_gateway_connect_duration_seconds_bucket",
        "postern_open_attempts_total",
    ] {
        assert!(text.contains(family), "{family} missing from\n{text}");
    }
    assert!(!text.contains("# EOF"), "OpenMetrics marker in\n{text}");
    if let Err(complaint) = promtool_check(&text) {
        panic!("promtool check metrics (server) failed:\n{complaint}\n--- exposition:\n{text}");
    }
    // The agent's exposition too (another role, another process).
    let (code, agent_text) = http_get(s.agent_admin, "/metrics").await.unwrap();
    docs_name_only_real_metrics_and_valid_rules(&format!("{text}{agent_text}"));
    assert_eq!(code, 200);
    assert!(
        agent_text.contains("postern_agent_tunnels 1"),
        "{agent_text}"
    );
    if let Err(complaint) = promtool_check(&agent_text) {
        panic!(
            "promtool check metrics (agent) failed:\n{complaint}\n--- exposition:\n{agent_text}"
        );
    }
}

/// docs/operations.md names only metrics the expositions (of a server and an agent) have, and its
/// example alert rules pass `promtool check rules`.
fn docs_name_only_real_metrics_and_valid_rules(exposition: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let mut names = BTreeSet::new();
    for (at, _) in doc.match_indices("postern_") {
        let name: String = doc[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        names.insert(name);
    }
    assert!(
        names.len() >= 10,
        "docs/operations.md names few metrics: {names:?}"
    );
    // Family names (from `# TYPE`) and sample names (histograms' `_bucket`, `_sum`, `_count`).
    let known: BTreeSet<&str> = exposition
        .lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if !l.starts_with('#') => l.split(['{', ' ']).next(),
            None => None,
        })
        .collect();
    for name in &names {
        assert!(
            known.contains(name.as_str()),
            "docs/operations.md names {name}, which /metrics does not have"
        );
    }
    let section = doc
        .split("### Alert rules")
        .nth(1)
        .expect("an Alert rules section");
    let rules = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|s| s.split("\n```").next())
        .expect("a yaml block of alert rules");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, rules).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules", file.to_str().unwrap()])
        .output()
        .expect("promtool (Debian `prometheus`; scripts/deps installs it)");
    assert!(
        out.status.success(),
        "promtool check rules on docs/operations.md's rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Holds one proxied connection open (an echo through the gateway) so that a drain lasts.
struct InFlight {
    tcp: tokio::net::TcpStream,
    round: u64,
}

impl InFlight {
    async fn open(proxy: SocketAddr, login: Option<(&str, &str)>, target: SocketAddr) -> InFlight {
        let mut tcp = socks_connect(proxy, login, target)
            .await
            .unwrap_or_else(|code| panic!("in-flight connection refused: {code:#04x}"));
        let mut header = [0u8; ECHO_HEADER];
        tcp.read_exact(&mut header).await.unwrap();
        let mut f = InFlight { tcp, round: 0 };
        f.round_trip().await;
        f
    }

    /// Sends 64 KiB and reads the echo back, byte-exact.
    async fn round_trip(&mut self) {
        self.round += 1;
        let data = payload(64 * 1024, self.round);
        let mut back = vec![0u8; data.len()];
        let (mut r, mut w) = self.tcp.split();
        let (wr, rd) = tokio::join!(w.write_all(&data), r.read_exact(&mut back));
        wr.expect("in-flight write");
        rd.expect("in-flight read");
        assert_eq!(sha256(&back), sha256(&data), "in-flight echo differs");
    }

    /// Half-closes and reads to EOF: the connection ends cleanly.
    async fn finish(mut self) {
        self.tcp.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(QUICK, self.tcp.read_to_end(&mut rest))
            .await
            .expect("in-flight connection to end")
            .expect("in-flight connection to end cleanly");
        assert!(rest.is_empty());
    }
}

/// Polls `/readyz` until 503 while the process is still alive (it drains an in-flight connection).
async fn wait_not_ready_while_alive(proc: &mut Proc, admin: SocketAddr) -> String {
    let name = proc.name.clone();
    wait_for(
        QUICK,
        &format!("{name} /readyz 503 during the drain"),
        || {
            assert!(proc.alive(), "{name} exited before /readyz said 503");
            async move {
                readyz(admin)
                    .await
                    .filter(|(code, _)| *code == 503)
                    .map(|(_, body)| body)
            }
        },
    )
    .await
}

/// b. A server (memory registry) is ready once bound, and not ready while it drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_ready_once_bound_and_not_while_draining() {
    let w = Workdir::new("ready-server");
    let mut s = Single::start(&w, 62, &[], &[]).await;
    let body = wait_readyz(s.admin, 200, "server").await;
    assert_eq!(body.trim(), "ready");
    let (code, _) = http_get(s.admin, "/healthz").await.unwrap();
    assert_eq!(code, 200);
    wait_readyz(s.agent_admin, 200, "agent").await;

    let mut flight = InFlight::open(s.socks5, None, s.echo.addr).await;
    s.server.signal("TERM");
    let why = wait_not_ready_while_alive(&mut s.server, s.admin).await;
    assert!(why.contains("draining"), "{why}");
    // Liveness stays green during the drain: only readiness changes.
    let (code, _) = http_get(s.admin, "/healthz").await.unwrap();
    assert_eq!(code, 200);
    // The in-flight connection still carries bytes while the server drains.
    flight.round_trip().await;
    flight.finish().await;
    let status = s.server.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "server exit after drain: {status}");
}

/// b. With etcd: an agent is not ready before its relay exists and ready with one tunnel; a relay
/// and a gateway started while etcd is down are not ready (not registered / no route list) and
/// become ready once etcd answers; all three are not ready while they drain an in-flight
/// connection, and exit 0 once it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_gateway_agent_readiness_follow_registry_tunnels_and_drain() {
    let w = Workdir::new("ready-cluster");
    let mut etcd = Etcd::planned(w.dir.path());
    let net = 63;
    let ip = Ipv4Addr::new(127, net, 0, 1);
    let echo = Echo::start(ip).await;
    let relay_port = free_udp_port();
    let relay_addr = SocketAddr::from(([127, 0, 0, 1], relay_port));

    // The agent first: its relay does not exist yet.
    let agent_cfg = w.write(
        "agent.toml",
        &agent_toml(
            &w,
            "agent-a",
            &[relay_addr],
            ip,
            &[echo.addr.port()],
            1,
            "10s",
        ),
    );
    let (mut agent, line) =
        Proc::postern("agent", "agent", &agent_cfg, &[], &w.path("agent.log")).await;
    let agent_admin = ready_addr(&line, "admin");
    let why = wait_readyz(agent_admin, 503, "agent without a relay").await;
    assert!(why.contains("no tunnel"), "{why}");

    // The relay while etcd is down.
    let relay_cfg = w.write(
        "relay.toml",
        &relay_toml(&w, "relay-a", relay_port, &etcd.url, net, "10s"),
    );
    let (mut relay, line) =
        Proc::postern("relay", "relay", &relay_cfg, &[], &w.path("relay.log")).await;
    let relay_admin = ready_addr(&line, "admin");
    let why = wait_readyz(relay_admin, 503, "relay without etcd").await;
    assert!(why.contains("not registered"), "{why}");

    // The gateway while etcd is down.
    let gateway_cfg = w.write("gateway.toml", &gateway_toml(&w, &etcd.url, "10s"));
    let (mut gateway, line) = Proc::postern(
        "gateway",
        "gateway",
        &gateway_cfg,
        &[],
        &w.path("gateway.log"),
    )
    .await;
    let gateway_admin = ready_addr(&line, "admin");
    let socks5 = ready_addr(&line, "socks5");
    let why = wait_readyz(gateway_admin, 503, "gateway without etcd").await;
    assert!(why.contains("route list"), "{why}");

    // The agent's tunnel needs no registry: it is ready while the relay still is not.
    wait_readyz(agent_admin, 200, "agent with its tunnel up").await;
    let (code, why) = readyz(relay_admin).await.unwrap();
    assert_eq!(code, 503, "relay ready without etcd: {why}");
    let (code, why) = readyz(gateway_admin).await.unwrap();
    assert_eq!(code, 503, "gateway ready without etcd: {why}");
    // What a load balancer should ask: the relay carries tunnels without etcd; the gateway still
    // has no routes; a bad exclusion is a precise 400.
    let registry_optional = "/readyz?exclude=registered";
    let (code, why) = http_get(relay_admin, registry_optional).await.unwrap();
    assert_eq!(
        (code, why.as_str()),
        (200, "ready\n"),
        "relay, registry excluded"
    );
    let (code, why) = http_get(gateway_admin, registry_optional).await.unwrap();
    assert_eq!(
        code, 503,
        "gateway without a route list, registry excluded: {why}"
    );
    assert!(why.contains("route list"), "{why}");
    let (code, why) = http_get(relay_admin, "/readyz?exclude=draining")
        .await
        .unwrap();
    assert_eq!(code, 400, "{why}");
    assert!(why.contains("cannot be excluded"), "{why}");
    let (code, why) = http_get(relay_admin, "/readyz?exclude=lease")
        .await
        .unwrap();
    assert_eq!(code, 400, "{why}");
    assert!(why.contains(r#"unknown readiness check "lease""#), "{why}");

    etcd.start().await;
    wait_readyz(relay_admin, 200, "relay once etcd answers").await;
    wait_readyz(gateway_admin, 200, "gateway once etcd answers").await;
    wait_route(gateway_admin, ip).await;

    // Drain all three with a connection in flight through them: the gateway and the agent first,
    // then the relay (see `agent_drain_keeps_streams_of_a_draining_relay` for the other order).
    let mut flight = InFlight::open(socks5, None, echo.addr).await;
    gateway.signal("TERM");
    agent.signal("TERM");
    for (proc, admin) in [(&mut gateway, gateway_admin), (&mut agent, agent_admin)] {
        let why = wait_not_ready_while_alive(proc, admin).await;
        assert!(why.contains("draining"), "{}: {why}", proc.name);
    }
    flight.round_trip().await;
    relay.signal("TERM");
    let why = wait_not_ready_while_alive(&mut relay, relay_admin).await;
    assert!(why.contains("draining"), "relay: {why}");
    let (code, why) = http_get(relay_admin, "/readyz?exclude=registered,routes")
        .await
        .unwrap();
    assert_eq!(code, 503, "a draining relay is never ready: {why}");
    flight.round_trip().await;
    flight.finish().await;
    for proc in [&mut gateway, &mut agent, &mut relay] {
        let status = proc.wait_exit(Duration::from_secs(20)).await;
        assert!(status.success(), "{} exit after drain: {status}", proc.name);
    }
}

/// An agent told to stop while one of its relays drains must still let that tunnel's in-flight
/// connections finish within its own drain grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_drain_keeps_streams_of_a_draining_relay() {
    let w = Workdir::new("agent-drain");
    let mut s = Single::start(&w, 67, &[], &[]).await;
    let mut flight = InFlight::open(s.socks5, None, s.echo.addr).await;
    s.server.signal("TERM");
    wait_not_ready_while_alive(&mut s.server, s.admin).await;
    wait_for(QUICK, "the agent to hear of the relay's drain", || async {
        w.log("agent.log")
            .contains("relay is draining")
            .then_some(())
    })
    .await;
    s.agent.signal("TERM");
    wait_not_ready_while_alive(&mut s.agent, s.agent_admin).await;
    flight.round_trip().await;
    flight.finish().await;
    let status = s.agent.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "agent exit after drain: {status}");
}

/// c. `postern status` and `postern lookup` (the real binary) against a 3-relay cluster with
/// etcd and 4 agents (redundancy 2): every relay, every agent with its 2 relays, and for each
/// agent IP the relays and sessions etcd holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_lookup_show_the_cluster() {
    let w = Workdir::new("status");
    let etcd = Etcd::started(w.dir.path()).await;
    let net = 64;
    let mut relays = Vec::new();
    let mut relay_addrs = Vec::new();
    let mut relay_admins = Vec::new();
    for i in 0..3 {
        let port = free_udp_port();
        let id = format!("relay-{i}");
        let cfg = w.write(
            &format!("{id}.toml"),
            &relay_toml(&w, &id, port, &etcd.url, net, "2s"),
        );
        let (proc, line) =
            Proc::postern(&id, "relay", &cfg, &[], &w.path(&format!("{id}.log"))).await;
        relay_admins.push(ready_addr(&line, "admin"));
        relay_addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
        relays.push(proc);
    }
    let gateway_cfg = w.write("gateway.toml", &gateway_toml(&w, &etcd.url, "2s"));
    let (_gateway, line) = Proc::postern(
        "gateway",
        "gateway",
        &gateway_cfg,
        &[],
        &w.path("gateway.log"),
    )
    .await;
    let gateway_admin = ready_addr(&line, "admin");

    let mut agents = Vec::new();
    let mut ips = Vec::new();
    for i in 0..4u8 {
        let ip = Ipv4Addr::new(127, net, 0, i + 1);
        let echo = Echo::start(ip).await;
        let id = format!("agent-{i}");
        let cfg = w.write(
            &format!("{id}.toml"),
            &agent_toml(&w, &id, &relay_addrs, ip, &[echo.addr.port()], 2, "2s"),
        );
        let (proc, _) = Proc::postern(&id, "agent", &cfg, &[], &w.path(&format!("{id}.log"))).await;
        agents.push((proc, echo, id));
        ips.push(ip);
    }
    wait_for(
        Duration::from_secs(30),
        "every agent on 2 relays in etcd",
        || async {
            let routes = etcd.routes().await;
            ips.iter()
                .all(|ip| routes.get(&IpAddr::V4(*ip)).is_some_and(|r| r.len() == 2))
                .then_some(())
        },
    )
    .await;
    let keys = etcd.route_keys().await;
    let relay_ids: Vec<String> = (0..3).map(|i| format!("relay-{i}")).collect();

    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(BIN)
            .args(&args)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "postern {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };

    // What `status` must show for every agent: its id and exactly the relays etcd has for it.
    let expected_agents: Vec<(String, BTreeSet<String>)> = agents
        .iter()
        .zip(&ips)
        .map(|((_, _, id), ip)| {
            let relays = keys
                .iter()
                .filter(|(_, k_ip, _, _)| *k_ip == IpAddr::V4(*ip))
                .map(|(_, _, relay, _)| relay.clone())
                .collect();
            (id.clone(), relays)
        })
        .collect();
    for admin in [gateway_admin, relay_admins[1]] {
        // The process's cache follows etcd through a watch: poll until it has caught up.
        let text = wait_for(QUICK, &format!("postern status at {admin}"), || {
            let run = run.clone();
            let expected = &expected_agents;
            let relay_ids = &relay_ids;
            async move {
                let text = run(vec!["status".into(), "--admin".into(), admin.to_string()]).await;
                status_matches(&text, relay_ids, expected).then_some(text)
            }
        })
        .await;
        assert!(text.contains("Relays (3)"), "{text}");
        assert!(text.contains("Agents (4"), "{text}");
        assert!(text.contains(": ready"), "{text}");
    }

    for ip in &ips {
        let want: BTreeSet<(String, u64)> = keys
            .iter()
            .filter(|(ns, k_ip, _, _)| ns == "default" && *k_ip == IpAddr::V4(*ip))
            .map(|(_, _, relay, session)| (relay.clone(), *session))
            .collect();
        assert_eq!(want.len(), 2, "{ip} in etcd: {keys:?}");
        let text = run(vec![
            "lookup".into(),
            ip.to_string(),
            "--admin".into(),
            gateway_admin.to_string(),
        ])
        .await;
        assert!(
            text.contains(&format!("default/{ip}: 2 owner(s)")),
            "{text}"
        );
        let got: BTreeSet<(String, u64)> = text
            .lines()
            .filter_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let relay = words.iter().position(|w| *w == "relay")?;
                let session = words.iter().position(|w| *w == "session")?;
                Some((
                    words.get(relay + 1)?.to_string(),
                    words.get(session + 1)?.parse().ok()?,
                ))
            })
            .collect();
        assert_eq!(got, want, "lookup {ip}:\n{text}");
        let agent = &agents[(ip.octets()[3] - 1) as usize].2;
        assert!(
            text.contains(agent.as_str()),
            "lookup {ip} names {agent}:\n{text}"
        );
    }
    let text = run(vec![
        "lookup".into(),
        Ipv4Addr::new(127, net, 9, 9).to_string(),
        "--admin".into(),
        gateway_admin.to_string(),
    ])
    .await;
    assert!(text.contains("no route"), "{text}");
}

/// Whether a `postern status` text lists every relay once and every agent with exactly its relays.
fn status_matches(text: &str, relay_ids: &[String], agents: &[(String, BTreeSet<String>)]) -> bool {
    let Some((relay_part, agent_part)) = text.split_once("\nAgents (") else {
        return false;
    };
    let relays_ok = relay_ids.iter().all(|id| {
        relay_part
            .lines()
            .filter(|l| l.split_whitespace().next() == Some(id.as_str()))
            .count()
            == 1
    });
    let agents_ok = agents.iter().all(|(id, relays)| {
        agent_part.lines().any(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.first() == Some(&id.as_str())
                && words
                    .iter()
                    .position(|w| *w == "relays")
                    .and_then(|at| words.get(at + 1))
                    .map(|list| list.split(',').map(str::to_string).collect::<BTreeSet<_>>())
                    .as_ref()
                    == Some(relays)
        })
    });
    relays_ok && agents_ok
}

/// d. SIGHUP adding a user lets that user in while an in-flight 64 MiB transfer (paused midway
/// across the reload) completes byte-exact; an invalid config on SIGHUP is refused with its precise
/// error and the users in force keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_user_without_disturbing_a_transfer_and_refuses_a_bad_config() {
    const SIZE: usize = 64 * 1024 * 1024;
    let w = Workdir::new("reload");
    let net = 65;
    let s = Single::start(&w, net, &[("alice", "alice-pw")], &[]).await;
    let alice = Some(("alice", "alice-pw"));
    let bob = Some(("bob", "bob-pw"));
    assert_eq!(
        socks_connect(s.socks5, bob, s.echo.addr).await.err(),
        Some(0xf1),
        "bob is unknown before the reload"
    );

    // Alice's 64 MiB transfer; the reader stops after 8 MiB until the reload has been checked.
    let (midway_tx, midway_rx) = tokio::sync::oneshot::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let (proxy, target) = (s.socks5, s.echo.addr);
    let transfer = tokio::spawn(async move {
        let mut tcp = socks_connect(proxy, Some(("alice", "alice-pw")), target)
            .await
            .unwrap_or_else(|c| panic!("alice refused: {c:#04x}"));
        let data = payload(SIZE, 64);
        let sent = sha256(&data);
        let (mut r, mut w) = tcp.split();
        let writer = async {
            w.write_all(&data).await?;
            w.shutdown().await
        };
        let reader = async {
            let mut got = Vec::with_capacity(SIZE + ECHO_HEADER);
            let mut buf = vec![0u8; 256 * 1024];
            let mut midway = Some(midway_tx);
            let mut go = Some(go_rx);
            loop {
                let n = r.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                if got.len() >= 8 * 1024 * 1024 {
                    if let (Some(m), Some(g)) = (midway.take(), go.take()) {
                        let _ = m.send(());
                        let _ = g.await;
                    }
                }
            }
            Ok::<_, std::io::Error>(got)
        };
        let (wr, rd) = tokio::join!(writer, reader);
        wr.expect("alice's write");
        let got = rd.expect("alice's read");
        assert_eq!(got.len(), SIZE + ECHO_HEADER, "alice's echo length");
        (sha256(&got[ECHO_HEADER..]), sent)
    });
    tokio::time::timeout(QUICK, midway_rx)
        .await
        .expect("alice's transfer to reach 8 MiB")
        .unwrap();

    // Add bob and reload.
    let mut text = server_toml(&w, net, &[("alice", "alice-pw"), ("bob", "bob-pw")], "5s");
    std::fs::write(&s.config, &text).unwrap();
    s.server.signal("HUP");
    wait_for(QUICK, "bob to get in after SIGHUP", || async {
        echo_through(s.socks5, bob, s.echo.addr, 4096, 7).await.ok()
    })
    .await;
    assert!(w.log("server.log").contains("configuration reloaded"));

    // A config with a precise error: the reload is refused and the running users stay.
    text.push_str("[[gateway.rules]]\nusers = [\"carol\"]\n");
    std::fs::write(&s.config, &text).unwrap();
    s.server.signal("HUP");
    let refusal = wait_for(QUICK, "the refused reload's log line", || async {
        w.log("server.log")
            .lines()
            .find(|l| l.contains("reload refused"))
            .map(str::to_string)
    })
    .await;
    assert!(
        refusal.contains(r#"gateway.rules[0].users: \"carol\" is not a configured user"#)
            || refusal.contains(r#"gateway.rules[0].users: "carol" is not a configured user"#),
        "imprecise refusal: {refusal}"
    );
    for (who, login) in [("alice", alice), ("bob", bob)] {
        echo_through(s.socks5, login, s.echo.addr, 4096, 8)
            .await
            .unwrap_or_else(|e| panic!("{who} after the refused reload: {e}"));
    }
    assert_eq!(
        socks_connect(s.socks5, Some(("carol", "x")), s.echo.addr)
            .await
            .err(),
        Some(0xf1)
    );

    go_tx.send(()).unwrap();
    let (got, sent) = tokio::time::timeout(Duration::from_secs(60), transfer)
        .await
        .expect("alice's 64 MiB transfer to finish")
        .unwrap();
    assert_eq!(got, sent, "alice's 64 MiB echo differs");
}

/// e. One JSON access-log line per connection (target `postern::access`) with client, user, front,
/// target, agent, relay, bytes each way, duration and result: 2 carried, 1 refused, 1 BIND
/// (answered "command not supported", logged `bad_request` with the command).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_access_log_line_per_connection() {
    let w = Workdir::new("access");
    let s = Single::start(&w, 66, &[("alice", "pw")], &["--log-format", "json"]).await;
    let login = Some(("alice", "pw"));
    let a = echo_through(s.socks5, login, s.echo.addr, 1000, 1)
        .await
        .unwrap();
    let b = echo_through(s.socks5, login, s.echo.addr, 250_000, 2)
        .await
        .unwrap();
    assert_eq!(
        socks_connect(s.socks5, login, s.refused).await.err(),
        Some(0x05)
    );
    // BIND: the whole exchange in one write (greeting, login, request).
    {
        let std::net::SocketAddr::V4(echo) = s.echo.addr else {
            unreachable!()
        };
        let mut bytes = vec![5, 1, 2, 1, 5];
        bytes.extend_from_slice(b"alice");
        bytes.extend_from_slice(&[2, b'p', b'w', 5, 2, 0, 1]);
        bytes.extend_from_slice(&echo.ip().octets());
        bytes.extend_from_slice(&echo.port().to_be_bytes());
        let mut tcp = tokio::net::TcpStream::connect(s.socks5).await.unwrap();
        tcp.write_all(&bytes).await.unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(QUICK, tcp.read_to_end(&mut reply))
            .await
            .expect("the BIND reply")
            .unwrap();
        assert_eq!(&reply[..6], &[5, 2, 1, 0, 5, 7], "{reply:?}");
    }

    let access = || {
        w.log("server.log")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "postern::access")
            .collect::<Vec<_>>()
    };
    let lines = wait_for(QUICK, "4 access-log lines", || async {
        let lines = access();
        (lines.len() >= 4).then_some(lines)
    })
    .await;
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let fields: Vec<&serde_json::Value> = lines.iter().map(|l| &l["fields"]).collect();
    for f in &fields {
        for key in ["client", "user", "front", "target", "result"] {
            assert!(f.get(key).is_some(), "{key} missing in {f}");
        }
        assert_eq!(f["user"], "alice", "{f}");
        assert_eq!(f["front"], "socks5", "{f}");
        let client: SocketAddr = f["client"].as_str().unwrap().parse().unwrap();
        assert!(client.ip().is_loopback(), "{f}");
    }
    let carried: Vec<&&serde_json::Value> = fields.iter().filter(|f| f["result"] == "ok").collect();
    assert_eq!(carried.len(), 2, "{fields:#?}");
    let mut bytes: Vec<(u64, u64)> = Vec::new();
    for f in &carried {
        for key in [
            "agent_id",
            "relay_id",
            "bytes_up",
            "bytes_down",
            "duration_ms",
        ] {
            assert!(f.get(key).is_some(), "{key} missing in {f}");
        }
        assert_eq!(f["agent_id"], "agent-ops", "{f}");
        assert_eq!(f["relay_id"], "relay-ops", "{f}");
        assert_eq!(f["target"], s.echo.addr.to_string(), "{f}");
        bytes.push((
            f["bytes_up"].as_u64().unwrap(),
            f["bytes_down"].as_u64().unwrap(),
        ));
    }
    bytes.sort();
    assert_eq!(
        bytes,
        vec![(a.0 as u64, a.1 as u64), (b.0 as u64, b.1 as u64)]
    );
    let bind: Vec<&&serde_json::Value> = fields
        .iter()
        .filter(|f| f["result"] == "bad_request")
        .collect();
    assert_eq!(bind.len(), 1, "{fields:#?}");
    assert_eq!(bind[0]["command"], "TCPBind", "{}", bind[0]);
    assert_eq!(bind[0]["target"], s.echo.addr.to_string(), "{}", bind[0]);
    let refused: Vec<&&serde_json::Value> = fields
        .iter()
        .filter(|f| f["result"] != "ok" && f["result"] != "bad_request")
        .collect();
    assert_eq!(refused.len(), 1, "{fields:#?}");
    assert_eq!(
        refused[0]["target"],
        s.refused.to_string(),
        "{}",
        refused[0]
    );
    assert!(
        refused[0]["result"]
            .as_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("refused"),
        "{}",
        refused[0]
    );
}

/// g. The status page of a running demo, loaded in headless Chromium after its scripts have
/// fetched the JSON API, lists the demo's agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_chromium_lists_the_demo_agent() {
    let w = Workdir::new("page");
    let mut demo = Proc::spawn(
        "demo",
        BIN,
        &[
            "demo",
            "--socks5",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        &[],
        &w.path("demo.log"),
    );
    let stdout = demo.child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let page = tokio::time::timeout(QUICK, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.trim().strip_prefix("status page") {
                return url.trim().to_string();
            }
        }
        panic!("the demo exited without printing its status page");
    })
    .await
    .expect("the demo's status page line");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    assert!(page.starts_with("http://127.0.0.1:"), "{page}");

    let profile = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-proxy-server",
                &format!("--user-data-dir={}", profile.path().display()),
                "--virtual-time-budget=5000",
                "--dump-dom",
                &page,
            ])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium to finish within 60s")
    .unwrap_or_else(|e| {
        panic!("chromium is missing ({e}): install Debian's `chromium` package (scripts/deps does)")
    });
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dom.contains("<td>demo-agent</td>"),
        "the page lists no demo-agent:\n{dom}"
    );
    assert!(
        dom.contains("relay-demo"),
        "the page lists no relay:\n{dom}"
    );
    demo.signal("TERM");
    demo.wait_exit(Duration::from_secs(15)).await;
}
