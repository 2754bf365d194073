//! Gray failures, with real processes on 127.0.0.0/8 and the shipped default timings unless a test
//! says otherwise: clients that stop reading must not freeze the tunnel their streams share.
//! Each test uses its own agent address range 127.N.0.0/16.

#[path = "process/mod.rs"]
mod process;
#[path = "ops/support.rs"]
mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use process::faults::{restart_on_its_port, Cuttable, Source};
use support::*;

/// An agent config with the shipped transport defaults (the shared builder shortens them).
fn default_agent_toml(
    w: &Workdir,
    id: &str,
    relay: SocketAddr,
    ip: Ipv4Addr,
    ports: &[u16],
) -> String {
    agent_toml_to(w, id, &[relay], ip, ports, 1)
}

/// [`default_agent_toml`] for several relay addresses and a redundancy.
fn agent_toml_to(
    w: &Workdir,
    id: &str,
    relays: &[SocketAddr],
    ip: Ipv4Addr,
    ports: &[u16],
    redundancy: u32,
) -> String {
    shipped_transport(w, id, relays, ip, ports, redundancy).toml()
}

/// The shared agent with the shipped transport (keep-alive, idle timeout, windows).
fn shipped_transport(
    w: &Workdir,
    id: &str,
    relays: &[SocketAddr],
    ip: Ipv4Addr,
    ports: &[u16],
    redundancy: u32,
) -> AgentRole {
    let mut role = agent_role(w, id, relays, ip, ports, redundancy, "5s");
    role.extra = Default::default();
    role
}

/// A relay with the shipped lease TTL.
fn default_relay_role(w: &Workdir, id: &str, port: u16, etcd: &str, net: u8) -> RelayRole {
    let mut role = relay_role(w, id, port, etcd, net, "5s");
    role.registry.as_mut().unwrap().lease_ttl = None;
    role
}

/// One echo transfer of `size` bytes through the proxy, checked byte for byte, within `limit`.
async fn echo_once(
    proxy: SocketAddr,
    target: SocketAddr,
    size: usize,
    seed: u64,
    limit: Duration,
) -> Result<(), String> {
    echo_through_within(proxy, None, target, size, seed, limit)
        .await
        .map(|_| ())
}

/// `clients` loops of `transfers` echo transfers of 256 KiB each; returns the bytes echoed per
/// second. Every transfer must complete byte-exact within 5 s.
async fn echo_rate(proxy: SocketAddr, target: SocketAddr, clients: usize, transfers: u64) -> f64 {
    const SIZE: usize = 256 * 1024;
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            tokio::spawn(async move {
                for seed in (c as u64 * 1_000_000..).take(transfers as usize) {
                    echo_once(proxy, target, SIZE, seed, Duration::from_secs(5))
                        .await
                        .unwrap_or_else(|e| panic!("client {c}, transfer {seed}: {e}"));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (clients as u64 * transfers * SIZE as u64) as f64 / started.elapsed().as_secs_f64()
}

/// Waits until a load's `done` count reaches `at_least` (each loop of the load counts its
/// connections there), for at most `within`.
async fn wait_count(done: &Arc<AtomicU64>, at_least: u64, within: Duration, what: &str) {
    wait_for(within, what, || {
        let enough = done.load(Ordering::Relaxed) >= at_least;
        async move { enough.then_some(()) }
    })
    .await;
}

/// 20 downloads from one client address stop reading a service behind the agent, while 4 other
/// connections keep echoing through another port of the same agent (a `postern server` and an
/// agent, shipped default windows and stream deadlines). Before the fix the stalled streams pinned
/// the tunnel's whole connection window and every other stream of the tunnel stopped; now the
/// others keep completing byte-exact at a comparable rate. The client may hold 16 stalled streams
/// (half the 32 MiB connection window in 1 MiB stream windows): the 4 beyond are reset about a
/// second after they stall, the 16 after `stream_stall_timeout` (15 s), all counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_do_not_freeze_the_tunnel() {
    let w = Workdir::new("stall");
    let ip = Ipv4Addr::new(127, 93, 0, 1);
    let echo = Echo::start(ip).await;
    let source = Source::start(ip).await;
    let server = Colocated::start(
        &w,
        ip,
        "agent-stall",
        &[echo.addr.port(), source.addr.port()],
    )
    .await;

    stall_scenario(server.socks5, server.admin, &echo, &source).await;
}

/// The same stall over the HTTP port: 20 plain `GET http://…` requests (absolute form, no CONNECT)
/// whose client reads nothing of the endless response. Before, such an exchange ran outside the
/// stream limits: its stream pinned a stream window of the tunnel's shared window until the agent's
/// own deadline, and the client could pin the whole window again at once; now it draws on the
/// client's stall budget and is reset like a SOCKS5 splice, the client's connection included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http_readers_do_not_freeze_the_tunnel() {
    let w = Workdir::new("stall-http");
    let ip = Ipv4Addr::new(127, 94, 0, 1);
    let echo = Echo::start(ip).await;
    let source = Source::start_http(ip).await;
    let ports = [echo.addr.port(), source.addr.port()];
    let server = Colocated::start(&w, ip, "agent-stall-http", &ports).await;

    let (http, target) = (server.http, source.addr);
    let stall = |_: usize| endless_get(http, target);
    stall_scenario_with(server.socks5, server.admin, &echo, &source, stall).await;
}

/// Clients that read slowly but steadily through the HTTP port (4 plain `GET http://…` of an
/// endless body, each reading 4 KiB every 250 ms, 16 KB/s, for longer than `stream_stall_timeout`)
/// are not reset. The kernel lets a write to such a reader through only once megabytes of
/// autotuned buffers have drained, so its writes wait for longer than the deadline; the watch sees
/// the socket's send queue shrink instead. Before, such a reader was reset after 15 s (over
/// SOCKS5 alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_readers_are_not_reset() {
    const READERS: usize = 4;
    let w = Workdir::new("slow-http");
    let ip = Ipv4Addr::new(127, 98, 0, 1);
    let source = Source::start_http(ip).await;
    let server = Colocated::start(&w, ip, "agent-slow-http", &[source.addr.port()]).await;
    let (http, admin, target) = (server.http, server.admin, source.addr);
    let _one_at_a_time = STALLS.lock().await;

    let readers: Vec<_> = (0..READERS)
        .map(|i| {
            tokio::spawn(async move {
                let mut tcp = endless_get(http, target).await;
                let mut buf = vec![0u8; 4096];
                let mut read = 0u64;
                // The reader's pace (4 KiB a tick) is what the test is about; it reads for longer
                // than `stream_stall_timeout`.
                let mut pace = tokio::time::interval(Duration::from_millis(250));
                let until = Instant::now() + Duration::from_secs(20);
                while Instant::now() < until {
                    pace.tick().await;
                    match tcp.read(&mut buf).await {
                        Ok(0) => return Err(format!("slow reader {i}: ended after {read} bytes")),
                        Ok(n) => read += n as u64,
                        Err(err) => {
                            return Err(format!("slow reader {i}: {err} after {read} bytes"))
                        }
                    }
                }
                Ok(read)
            })
        })
        .collect();
    let mut total = 0;
    let mut failed = Vec::new();
    for reader in readers {
        match reader.await.expect("slow reader") {
            Ok(read) => total += read,
            Err(why) => failed.push(why),
        }
    }
    let (_, body) = http_get(admin, "/metrics").await.expect("metrics");
    let samples = parse_samples(&body);
    if !failed.is_empty() {
        let log = |name: &str| std::fs::read_to_string(w.path(name)).unwrap_or_default();
        panic!(
            "{failed:?}\nresets: {:?}\nserver log:\n{}\nagent log:\n{}",
            samples
                .iter()
                .filter(|(k, _)| k.contains("stream_resets"))
                .collect::<Vec<_>>(),
            log("server.log"),
            log("agent.log")
        );
    }
    for reason in ["stalled", "stall_limit"] {
        let key = format!("postern_stream_resets_total{{reason=\"{reason}\"}}");
        assert_eq!(
            samples.get(&key).copied().unwrap_or(0.0),
            0.0,
            "slow readers were reset ({key})"
        );
    }
    eprintln!("{READERS} slow HTTP readers read {total} bytes in 20 s, none reset");
}

/// The same stall through a split cluster (etcd, one relay, a gateway; shipped defaults): the
/// stalled streams share the gateway↔relay peer connection with the others, which before the fix
/// froze every agent behind that relay for this gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_do_not_freeze_the_peer_connection() {
    const NET: u8 = 96;
    let w = Workdir::new("stall-split");
    let etcd = Etcd::started(w.dir.path()).await;
    let ip = Ipv4Addr::new(127, NET, 0, 1);
    let echo = Echo::start(ip).await;
    let source = Source::start(ip).await;
    let text = default_relay_role(&w, "relay-1", free_udp_port(), &etcd.url, NET).toml();
    let config = w.write("relay.toml", &text);
    let (_relay, line) = Proc::postern("relay", "relay", &config, &[], &w.path("relay.log")).await;
    let relay = ready_addr(&line, "relay");
    let config = w.write("gateway.toml", &gateway_toml(&w, &etcd.url, "5s"));
    let (_gateway, line) =
        Proc::postern("gateway", "gateway", &config, &[], &w.path("gateway.log")).await;
    let (socks5, admin) = (ready_addr(&line, "socks5"), ready_addr(&line, "admin"));
    let agent_config = w.write(
        "agent.toml",
        &default_agent_toml(
            &w,
            "agent-stall",
            relay,
            ip,
            &[echo.addr.port(), source.addr.port()],
        ),
    );
    let (_agent, _) =
        Proc::postern("agent", "agent", &agent_config, &[], &w.path("agent.log")).await;
    wait_route(admin, ip).await;

    stall_scenario(socks5, admin, &echo, &source).await;
}

/// An agent that stops answering (`kill -STOP`: its kernel still holds the UDP socket, nothing
/// fails, it just goes silent) loses its tunnel and its routes at the relay within seconds, with
/// the shipped default timings. Before, the relay kept the session until the 30 s QUIC idle
/// timeout and kept routing new connections to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_drops_a_silent_agent_within_seconds() {
    const NET: u8 = 94;
    let w = Workdir::new("silent");
    let ip = Ipv4Addr::new(127, NET, 0, 1);
    let echo = Echo::start(ip).await;
    let config = w.write("server.toml", &server_toml(&w, NET, &[], "5s"));
    let (_server, line) =
        Proc::postern("server", "server", &config, &[], &w.path("server.log")).await;
    let (socks5, admin) = (ready_addr(&line, "socks5"), ready_addr(&line, "admin"));
    let agent_config = w.write(
        "agent.toml",
        &default_agent_toml(
            &w,
            "agent-silent",
            ready_addr(&line, "relay"),
            ip,
            &[echo.addr.port()],
        ),
    );
    let (agent, _) =
        Proc::postern("agent", "agent", &agent_config, &[], &w.path("agent.log")).await;
    wait_route(admin, ip).await;
    echo_once(socks5, echo.addr, 100_000, 1, Duration::from_secs(5))
        .await
        .unwrap();

    let tunnels = |body: &str| parse_samples(body).get("postern_relay_tunnels").copied();
    agent.signal("STOP");
    let stopped = Instant::now();
    wait_for(
        Duration::from_secs(20),
        "the relay to drop the silent agent",
        || async {
            let (_, body) = http_get(admin, "/metrics").await.ok()?;
            let (code, routes) = http_get(admin, &format!("/api/routes?ip={ip}"))
                .await
                .ok()?;
            let gone = tunnels(&body) == Some(0.0) && !(code == 200 && routes.contains("relay_id"));
            gone.then_some(())
        },
    )
    .await;
    let dropped = stopped.elapsed();
    eprintln!("relay dropped the stopped agent's session and routes {dropped:?} after kill -STOP");
    assert!(
        dropped < Duration::from_secs(8),
        "the relay held a silent agent's tunnel for {dropped:?}"
    );
    // Without a route the gateway refuses at once instead of waiting on the silent tunnel.
    let refused = Instant::now();
    let code = socks_connect(socks5, None, echo.addr).await.err();
    assert_eq!(
        code,
        Some(0x04),
        "SOCKS5 reply for a target whose agent is gone"
    );
    assert!(refused.elapsed() < Duration::from_secs(1));
    agent.signal("CONT");
}

/// Two relays (etcd, shipped default lease and timings), a gateway, and one agent with a tunnel
/// to each; the agent↔relay-1 path is cut (every datagram dropped) while 8 clients open new
/// connections through the gateway. Before, every connection routed via relay-1 waited out the
/// whole 10 s open budget and failed with 0x06, for as long as relay-1 kept the session; now each
/// attempt is hedged to relay-2 after a short delay and relay-1's (relay, session) is demoted, so
/// no connection after the first second fails or waits longer than 1.5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_agent_path_costs_new_connections_at_most_a_hedge() {
    const NET: u8 = 95;
    const CLIENTS: usize = 8;
    let w = Workdir::new("cut");
    let etcd = Etcd::started(w.dir.path()).await;
    let ip = Ipv4Addr::new(127, NET, 0, 1);
    let echo = Echo::start(ip).await;
    let mut relays = Vec::new();
    for id in ["relay-1", "relay-2"] {
        let port = free_udp_port();
        let text = default_relay_role(&w, id, port, &etcd.url, NET).toml();
        let config = w.write(&format!("{id}.toml"), &text);
        let (proc, line) =
            Proc::postern(id, "relay", &config, &[], &w.path(&format!("{id}.log"))).await;
        relays.push((proc, ready_addr(&line, "relay")));
    }
    let path = Cuttable::start(relays[0].1).await;
    let config = w.write("gateway.toml", &gateway_toml(&w, &etcd.url, "5s"));
    let (_gateway, line) =
        Proc::postern("gateway", "gateway", &config, &[], &w.path("gateway.log")).await;
    let (socks5, admin) = (ready_addr(&line, "socks5"), ready_addr(&line, "admin"));
    let agent_config = w.write(
        "agent.toml",
        &agent_toml_to(
            &w,
            "agent-cut",
            &[path.addr, relays[1].1],
            ip,
            &[echo.addr.port()],
            2,
        ),
    );
    let (_agent, _) =
        Proc::postern("agent", "agent", &agent_config, &[], &w.path("agent.log")).await;
    wait_for(
        QUICK,
        "the gateway to route the agent via both relays",
        || async {
            let (code, body) = http_get(admin, &format!("/api/routes?ip={ip}"))
                .await
                .ok()?;
            (code == 200 && body.contains("relay-1") && body.contains("relay-2")).then_some(())
        },
    )
    .await;

    // (started, waited, error) per connection, from CLIENTS loops of new connections.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut loops = Vec::new();
    for c in 0..CLIENTS {
        let (stop, done) = (stop.clone(), done.clone());
        loops.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut seed = c as u64 * 1_000_000;
            // Each client opens a connection every 50 ms at most.
            let mut pace = tokio::time::interval(Duration::from_millis(50));
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                seed += 1;
                let started = Instant::now();
                let result =
                    echo_once(socks5, echo.addr, 4096, seed, Duration::from_secs(15)).await;
                seen.push((started, started.elapsed(), result.err()));
                done.fetch_add(1, Ordering::Relaxed);
            }
            seen
        }));
    }
    // The load runs (every client has made a few connections) before the cut.
    wait_count(
        &done,
        CLIENTS as u64 * 5,
        QUICK,
        "connections before the cut",
    )
    .await;
    path.cut.store(true, Ordering::Relaxed);
    let cut_at = Instant::now();
    // After it, as many connections as about 10 s of this load make: long enough for relay-1's
    // session to outlive the cut and for every demotion to be tested.
    let at_cut = done.load(Ordering::Relaxed);
    wait_count(
        &done,
        at_cut + CLIENTS as u64 * 150,
        Duration::from_secs(60),
        "connections after the cut",
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for l in loops {
        seen.extend(l.await.unwrap());
    }

    // Connections open at the cut and carried by relay-1 may break with it (as a reset): that is
    // the cut, not a failure to connect.
    let in_flight: Vec<_> = seen
        .iter()
        .filter(|(s, d, _)| *s < cut_at && *s + *d > cut_at)
        .collect();
    let before: Vec<_> = seen.iter().filter(|(s, d, _)| *s + *d <= cut_at).collect();
    let first: Vec<_> = seen
        .iter()
        .filter(|(s, _, _)| *s >= cut_at && *s < cut_at + Duration::from_secs(1))
        .collect();
    let after: Vec<_> = seen
        .iter()
        .filter(|(s, _, _)| *s >= cut_at + Duration::from_secs(1))
        .collect();
    let failed = |set: &[&(Instant, Duration, Option<String>)]| {
        set.iter().filter(|(_, _, e)| e.is_some()).count()
    };
    let longest = |set: &[&(Instant, Duration, Option<String>)]| {
        set.iter().map(|(_, d, _)| *d).max().unwrap_or_default()
    };
    eprintln!(
        "before the cut: {} connections, {} failed, longest {:?}; open at the cut: {}, {} broke; \
         first second: {} connections, {} failed, longest {:?}; after it: {} connections, {} \
         failed, longest {:?}",
        before.len(),
        failed(&before),
        longest(&before),
        in_flight.len(),
        failed(&in_flight),
        first.len(),
        failed(&first),
        longest(&first),
        after.len(),
        failed(&after),
        longest(&after),
    );
    let errors: Vec<_> = seen.iter().filter_map(|(_, _, e)| e.as_deref()).collect();
    assert_eq!(failed(&before), 0, "before the cut: {errors:?}");
    assert_eq!(failed(&after), 0, "after the first second: {errors:?}");
    assert!(
        after.len() >= 50,
        "too few connections after the cut: {}",
        after.len()
    );
    // No new connection waited long, in the first second or after it.
    let waited = longest(&first).max(longest(&after));
    assert!(
        waited <= Duration::from_millis(1500),
        "a connection opened after the cut waited {waited:?}"
    );
}

/// Two relays (etcd, shipped default lease and timings), a gateway, and one agent with a tunnel
/// to each; the gateway reaches relay-1's peer endpoint only through a forwarder, which drops
/// every datagram for 22 s while 16 clients open new connections through the gateway. New
/// connections keep succeeding through relay-2 at a comparable rate (hedging and the demotion of
/// relay-1 by outcome see to that). Once relay-1's longest demotion (16 s) ends, the pool is asked
/// for it again: before, every caller queued on one lock held across a 2 s handshake and dialled in
/// turn (handshakes 17.5, 19.5 and 21.5 s after the cut); now they share one dial, and the failed
/// dial marks relay-1 down for longer than a dial, so one handshake goes toward it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_peer_path_costs_one_dial_not_the_gateway() {
    const NET: u8 = 97;
    const CLIENTS: usize = 16;
    // Longer than relay-1's longest demotion by outcome (16 s), so that the pool is asked for
    // relay-1 again while the path is still cut.
    const CUT: Duration = Duration::from_secs(22);
    let w = Workdir::new("peercut");
    let etcd = Etcd::started(w.dir.path()).await;
    let ip = Ipv4Addr::new(127, NET, 0, 1);
    let echo = Echo::start(ip).await;
    let peer_port = free_udp_port();
    let path = Cuttable::start(SocketAddr::from(([127, 0, 0, 1], peer_port))).await;
    let mut relays = Vec::new();
    for id in ["relay-1", "relay-2"] {
        let port = free_udp_port();
        let mut role = default_relay_role(&w, id, port, &etcd.url, NET);
        if id == "relay-1" {
            role.relay.peer_listen = Some(SocketAddr::from(([127, 0, 0, 1], peer_port)));
            role.relay.peer_advertise = Some(path.addr.to_string());
        }
        let config = w.write(&format!("{id}.toml"), &role.toml());
        let (proc, line) =
            Proc::postern(id, "relay", &config, &[], &w.path(&format!("{id}.log"))).await;
        relays.push((proc, ready_addr(&line, "relay")));
    }
    let config = w.write("gateway.toml", &gateway_toml(&w, &etcd.url, "5s"));
    let (_gateway, line) =
        Proc::postern("gateway", "gateway", &config, &[], &w.path("gateway.log")).await;
    let (socks5, admin) = (ready_addr(&line, "socks5"), ready_addr(&line, "admin"));
    let agent_config = w.write(
        "agent.toml",
        &agent_toml_to(
            &w,
            "agent-peercut",
            &[relays[0].1, relays[1].1],
            ip,
            &[echo.addr.port()],
            2,
        ),
    );
    let (_agent, _) =
        Proc::postern("agent", "agent", &agent_config, &[], &w.path("agent.log")).await;
    wait_for(
        QUICK,
        "the gateway to route the agent via both relays",
        || async {
            let (code, body) = http_get(admin, &format!("/api/routes?ip={ip}"))
                .await
                .ok()?;
            (code == 200 && body.contains("relay-1") && body.contains("relay-2")).then_some(())
        },
    )
    .await;
    // The path through the forwarder works: some connection went through relay-1.
    wait_for(QUICK, "a peer handshake through the forwarder", || async {
        echo_once(socks5, echo.addr, 64, 1, Duration::from_secs(5))
            .await
            .ok()?;
        (!path
            .handshakes_since(Instant::now() - Duration::from_secs(3600))
            .is_empty())
        .then_some(())
    })
    .await;

    // (started, waited, error) per connection, from CLIENTS loops of new connections.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut loops = Vec::new();
    for c in 0..CLIENTS {
        let (stop, done) = (stop.clone(), done.clone());
        loops.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut seed = c as u64 * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                seed += 1;
                let started = Instant::now();
                let result =
                    echo_once(socks5, echo.addr, 4096, seed, Duration::from_secs(15)).await;
                seen.push((started, started.elapsed(), result.err()));
                done.fetch_add(1, Ordering::Relaxed);
            }
            seen
        }));
    }
    let load_at = Instant::now();
    // The load runs (every client has made a few connections) before the cut.
    wait_count(
        &done,
        CLIENTS as u64 * 5,
        QUICK,
        "connections before the cut",
    )
    .await;
    path.cut.store(true, Ordering::Relaxed);
    let cut_at = Instant::now();
    // The fault itself lasts CUT: what is measured is the gateway during it.
    tokio::time::sleep(CUT).await;
    stop.store(true, Ordering::Relaxed);
    let handshakes = path.handshakes_since(cut_at);
    let mut seen = Vec::new();
    for l in loops {
        seen.extend(l.await.unwrap());
    }

    type Seen = (Instant, Duration, Option<String>);
    let before: Vec<_> = seen.iter().filter(|(s, d, _)| *s + *d <= cut_at).collect();
    let in_flight: Vec<_> = seen
        .iter()
        .filter(|(s, d, _)| *s < cut_at && *s + *d > cut_at)
        .collect();
    let first: Vec<_> = seen
        .iter()
        .filter(|(s, _, _)| *s >= cut_at && *s < cut_at + Duration::from_secs(1))
        .collect();
    let after: Vec<_> = seen
        .iter()
        .filter(|(s, _, _)| *s >= cut_at + Duration::from_secs(1))
        .collect();
    let failed = |set: &[&Seen]| set.iter().filter(|(_, _, e)| e.is_some()).count();
    let longest = |set: &[&Seen]| set.iter().map(|(_, d, _)| *d).max().unwrap_or_default();
    let rate_before = before.len() as f64 / (cut_at - load_at).as_secs_f64();
    let rate_after = after.iter().filter(|(_, _, e)| e.is_none()).count() as f64
        / (CUT - Duration::from_secs(1)).as_secs_f64();
    eprintln!(
        "before the cut: {} connections ({rate_before:.0}/s), {} failed, longest {:?}; open at \
         the cut: {}, {} broke; first second: {} connections, {} failed, longest {:?}; after it: \
         {} connections ({rate_after:.0}/s), {} failed, longest {:?}; handshakes toward relay-1 \
         during the cut: {} (began {handshakes:.1?} after it)",
        before.len(),
        failed(&before),
        longest(&before),
        in_flight.len(),
        failed(&in_flight),
        first.len(),
        failed(&first),
        longest(&first),
        after.len(),
        failed(&after),
        longest(&after),
        handshakes.len(),
    );
    let errors: Vec<_> = seen.iter().filter_map(|(_, _, e)| e.as_deref()).collect();
    assert_eq!(failed(&before), 0, "before the cut: {errors:?}");
    assert_eq!(failed(&after), 0, "after the first second: {errors:?}");
    assert!(
        rate_after >= rate_before / 3.0,
        "the gateway slowed from {rate_before:.0} to {rate_after:.0} connections/s"
    );
    let waited = longest(&first).max(longest(&after));
    assert!(
        waited <= Duration::from_millis(1500),
        "a connection opened after the cut waited {waited:?}"
    );
    // One dial at a time, each followed by a down mark at least as long as a dial (2 s), doubling.
    assert!(
        handshakes.len() <= 2,
        "{} handshakes toward relay-1 during the cut, at {handshakes:.1?}",
        handshakes.len()
    );
}

/// A `postern server` with SOCKS5 and HTTP ports and one agent on `ip` exposing `ports`, shipped
/// default timings, with the agent's route known to the server.
struct Colocated {
    socks5: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    _server: Proc,
    _agent: Proc,
}

impl Colocated {
    async fn start(w: &Workdir, ip: Ipv4Addr, agent_id: &str, ports: &[u16]) -> Colocated {
        let text = server_toml(w, ip.octets()[1], &[], "5s").replace(
            "socks5 = \"127.0.0.1:0\"",
            "socks5 = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"",
        );
        let config = w.write("server.toml", &text);
        let (server, line) =
            Proc::postern("server", "server", &config, &[], &w.path("server.log")).await;
        let relay = ready_addr(&line, "relay");
        let agent_config = w.write(
            "agent.toml",
            &default_agent_toml(w, agent_id, relay, ip, ports),
        );
        let (agent, _) =
            Proc::postern("agent", "agent", &agent_config, &[], &w.path("agent.log")).await;
        let admin = ready_addr(&line, "admin");
        wait_route(admin, ip).await;
        Colocated {
            socks5: ready_addr(&line, "socks5"),
            http: ready_addr(&line, "http"),
            admin,
            _server: server,
            _agent: agent,
        }
    }
}

/// A plain `GET http://target/endless` (absolute form) sent to the HTTP port `http`; nothing of
/// the answer is read.
async fn endless_get(http: SocketAddr, target: SocketAddr) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut tcp = TcpStream::connect(http)
        .await
        .expect("connect to the HTTP port");
    let request = format!("GET http://{target}/endless HTTP/1.1\r\nhost: {target}\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.expect("request");
    tcp
}

/// The stall scenarios run one at a time: each fills tens of MB of buffers and measures rates
/// and reset times, which two of them side by side on the 2 shared cores distort (with
/// `--test-threads 2` they missed their reset deadlines together).
static STALLS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// 20 downloads from one client address stop reading while 4 other connections echo through the
/// same agent; checks and prints the others' rates, the early resets beyond the client's share
/// of stalls, and the resets at `stream_stall_timeout`. `admin` is the gateway's.
async fn stall_scenario(socks5: SocketAddr, admin: SocketAddr, echo: &Echo, source: &Source) {
    let target = source.addr;
    let stall = |i: usize| async move {
        socks_connect(socks5, None, target)
            .await
            .unwrap_or_else(|code| panic!("stalled client {i}: socks reply {code:#04x}"))
    };
    stall_scenario_with(socks5, admin, echo, source, stall).await;
}

/// [`stall_scenario`] with the stalled downloads opened by `stall(i)`.
async fn stall_scenario_with<F, Fut>(
    socks5: SocketAddr,
    admin: SocketAddr,
    echo: &Echo,
    source: &Source,
    stall: F,
) where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = TcpStream>,
{
    let _one_at_a_time = STALLS.lock().await;
    const STALLED: usize = 20;
    // connection_window / stream_window / 2 with the shipped defaults.
    const PER_CLIENT: usize = 16;
    // About 3 s of echoing on this machine, each time.
    const TRANSFERS: u64 = 40;
    let baseline = echo_rate(socks5, echo.addr, 4, TRANSFERS).await;

    // The stalled downloads: each reads the SOCKS5 reply, then nothing more.
    let mut stalled: Vec<TcpStream> = Vec::new();
    for i in 0..STALLED {
        stalled.push(stall(i).await);
    }
    // Every buffer on the way fills: the source's writes stop for good.
    let mut last = (u64::MAX, Instant::now());
    wait_for(QUICK, "the source's writes to stop", || {
        let now = source.written.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
        let settled = last.1.elapsed() >= Duration::from_millis(500);
        async move { settled.then_some(()) }
    })
    .await;
    let filled_at = Instant::now();
    let held = source.written.load(Ordering::Relaxed);
    let resets = |reason: &'static str| async move {
        let (_, body) = http_get(admin, "/metrics").await.ok()?;
        let key = format!("postern_stream_resets_total{{reason=\"{reason}\"}}");
        parse_samples(&body).get(&key).copied()
    };
    // The streams beyond the client's share of stalls are reset soon after they stall.
    wait_for(
        QUICK,
        "the stalls beyond the client's share to be reset",
        || async {
            resets("stall_limit")
                .await
                .filter(|n| *n >= (STALLED - PER_CLIENT) as f64)
        },
    )
    .await;
    let early = filled_at.elapsed();

    let during = echo_rate(socks5, echo.addr, 4, TRANSFERS).await;
    eprintln!(
        "echo rate of 4 clients: {:.1} MB/s alone, {:.1} MB/s with {STALLED} stalled readers \
         ({:.1} MB held on the way)",
        baseline / 1e6,
        during / 1e6,
        held as f64 / 1e6
    );
    assert!(
        during >= baseline * 0.5,
        "others' rate fell from {baseline:.0} to {during:.0} B/s while readers stalled"
    );

    // The stalled streams are reset by the gateway's progress deadline, and counted.
    let counted = wait_for(
        Duration::from_secs(40),
        "the stalled streams to be reset",
        || async { resets("stalled").await.filter(|n| *n >= PER_CLIENT as f64) },
    )
    .await;
    let reset_after = filled_at.elapsed();
    eprintln!(
        "{} streams over the client's share reset {early:?} and {counted} stalled streams \
         {reset_after:?} after the buffers filled",
        STALLED - PER_CLIENT
    );
    assert_eq!(
        resets("stall_limit").await,
        Some((STALLED - PER_CLIENT) as f64),
        "only the stalls beyond the client's share are reset early"
    );
    assert_eq!(
        counted, PER_CLIENT as f64,
        "only the stalled streams are reset"
    );
    // Each stalled client sees the end as a reset once it reads what was buffered for it.
    for (i, mut tcp) in stalled.into_iter().enumerate() {
        let mut sink = vec![0u8; 256 * 1024];
        let end = tokio::time::timeout(QUICK, async {
            loop {
                match tcp.read(&mut sink).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => continue,
                    Err(err) => return Err(err),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("stalled client {i} never saw its end"));
        let err = end.expect_err("a reset, not a clean end");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset,
            "client {i}"
        );
    }
    // And the connection still carries new streams, at the rate it had before the stall.
    echo_once(socks5, echo.addr, 1 << 20, 99, Duration::from_secs(5))
        .await
        .unwrap();
    let after = echo_rate(socks5, echo.addr, 4, TRANSFERS).await;
    eprintln!(
        "echo rate of 4 clients after the resets: {:.1} MB/s",
        after / 1e6
    );
}

/// Two relays (etcd, shipped default lease and timings), a gateway, and one agent with redundancy 2
/// given both relay addresses, holding a tunnel to each; relay-2 is killed (`kill -9`). Before, the
/// slot that lost relay-2 kept dialling and landing on relay-1, already held by the other slot,
/// and each landing cost relay-1 a session: a route put and delete in etcd, in bursts of eight
/// immediate redials, for as long as relay-2 stayed down. Now the slot dials only relay-2's
/// address (failed dials back off) and idles once relay-2's lease ran out: relay-1's routes for
/// the agent do not change, the agent keeps serving through relay-1, and when relay-2 comes back
/// the agent holds two tunnels on distinct relays again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_does_not_churn_sessions_while_a_relay_is_down() {
    const NET: u8 = 97;
    const WINDOW: Duration = Duration::from_secs(20);
    let w = Workdir::new("churn");
    let etcd = Etcd::started(w.dir.path()).await;
    let ip = Ipv4Addr::new(127, NET, 0, 1);
    let echo = Echo::start(ip).await;
    let mut relays = Vec::new();
    for id in ["relay-1", "relay-2"] {
        let port = free_udp_port();
        let text = default_relay_role(&w, id, port, &etcd.url, NET).toml();
        let config = w.write(&format!("{id}.toml"), &text);
        let (proc, line) =
            Proc::postern(id, "relay", &config, &[], &w.path(&format!("{id}.log"))).await;
        relays.push((proc, ready_addr(&line, "relay"), config));
    }
    let config = w.write("gateway.toml", &gateway_toml(&w, &etcd.url, "5s"));
    let (_gateway, line) =
        Proc::postern("gateway", "gateway", &config, &[], &w.path("gateway.log")).await;
    let socks5 = ready_addr(&line, "socks5");
    // The shipped reconnect backoff too (200 ms to 30 s).
    let mut role = shipped_transport(
        &w,
        "agent-churn",
        &[relays[0].1, relays[1].1],
        ip,
        &[echo.addr.port()],
        2,
    );
    (role.reconnect_min, role.reconnect_max) = (None, None);
    let agent_config = w.write("agent.toml", &role.toml());
    let (_agent, _) =
        Proc::postern("agent", "agent", &agent_config, &[], &w.path("agent.log")).await;
    let both: BTreeSet<String> = ["relay-1".to_string(), "relay-2".to_string()].into();
    wait_for(QUICK, "the agent's routes on both relays", || async {
        (etcd.routes().await.get(&IpAddr::V4(ip)) == Some(&both)).then_some(())
    })
    .await;

    // Every route put and delete for the agent, from now on.
    let mut client = etcd.client().await.unwrap();
    let prefix = "/postern/routes/";
    let mut events = client
        .watch(prefix, Some(etcd_client::WatchOptions::new().with_prefix()))
        .await
        .unwrap();
    let agent_key = format!("/{ip}/");
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(Instant, bool, String)>::new()));
    let record = seen.clone();
    let watching = tokio::spawn(async move {
        while let Ok(Some(resp)) = events.message().await {
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let key = kv.key_str().unwrap_or_default().to_string();
                if key.contains(&agent_key) {
                    let put = event.event_type() == etcd_client::EventType::Put;
                    record.lock().unwrap().push((Instant::now(), put, key));
                }
            }
        }
    });

    // New connections through the gateway all along.
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut loops = Vec::new();
    for c in 0..4u64 {
        let (stop, count) = (stop.clone(), count.clone());
        loops.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut seed = c * 1_000_000;
            // Each client opens a connection every 100 ms at most.
            let mut pace = tokio::time::interval(Duration::from_millis(100));
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                seed += 1;
                let started = Instant::now();
                let result =
                    echo_once(socks5, echo.addr, 4096, seed, Duration::from_secs(15)).await;
                done.push((started, result.err()));
                count.fetch_add(1, Ordering::Relaxed);
            }
            done
        }));
    }
    // The load runs (every client has made a few connections) before the kill.
    wait_count(&count, 4 * 5, QUICK, "connections before the kill").await;
    let sessions_before = w.log("relay-1.log").matches("tunnel up").count();
    relays[1].0.signal("KILL");
    let killed = Instant::now();
    // What is measured is the agent and relay-1 over WINDOW after the kill (relay-2's lease runs
    // out within it).
    tokio::time::sleep(WINDOW).await;
    stop.store(true, Ordering::Relaxed);
    let mut done = Vec::new();
    for l in loops {
        done.extend(l.await.unwrap());
    }
    let sessions_after = w.log("relay-1.log").matches("tunnel up").count();
    let events: Vec<_> = seen.lock().unwrap().clone();
    let relay1: Vec<_> = events
        .iter()
        .filter(|(_, _, key)| key.contains("/relay-1/"))
        .collect();
    let (puts, deletes) = (
        relay1.iter().filter(|(_, put, _)| *put).count(),
        relay1.iter().filter(|(_, put, _)| !*put).count(),
    );
    let failed_late: Vec<_> = done
        .iter()
        .filter(|(s, e)| *s >= killed + WINDOW / 2 && e.is_some())
        .collect();
    let failed = done.iter().filter(|(_, e)| e.is_some()).count();
    let dials_failed = w.log("agent.log").matches("dial failed").count();
    eprintln!(
        "in {WINDOW:?} after relay-2's kill -9: relay-1 route puts {puts}, deletes {deletes}; \
         relay-1 sessions created {}; agent dials failed {dials_failed}; {} connections, \
         {failed} failed ({} in the second half)",
        sessions_after - sessions_before,
        done.len(),
        failed_late.len(),
    );
    assert!(
        puts + deletes <= 2,
        "relay-1's routes for the agent churned: {relay1:?}"
    );
    // Given both addresses, the slot that lost relay-2 dials only relay-2's: none lands on relay-1.
    assert_eq!(
        sessions_after,
        sessions_before,
        "relay-1 created {} sessions for the agent",
        sessions_after - sessions_before
    );
    assert_eq!(
        etcd.routes().await.get(&IpAddr::V4(ip)),
        Some(&["relay-1".to_string()].into()),
        "the agent keeps its tunnel to relay-1"
    );
    assert!(failed_late.is_empty(), "{failed_late:?}");
    assert!(done.len() >= 40, "too few connections: {}", done.len());

    // relay-2 comes back: the agent gets its second tunnel, on relay-2.
    let _relay2 = restart_on_its_port(
        "relay-2",
        "relay",
        &relays[1].2,
        &w.path("relay-2b.log"),
        &[("POSTERN_TEST_TOKEN", TOKEN)],
    )
    .await;
    let restarted = Instant::now();
    wait_for(QUICK, "the agent's routes on both relays again", || async {
        (etcd.routes().await.get(&IpAddr::V4(ip)) == Some(&both)).then_some(())
    })
    .await;
    eprintln!(
        "relay-2 restarted: the agent held tunnels on both relays again after {:?}",
        restarted.elapsed()
    );
    watching.abort();
}
