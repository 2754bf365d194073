//! The chaos suite: faults injected for real into clusters of real processes (etcd, relays,
//! gateways, servers, an agent), each under concurrent load ([`cluster::CLIENTS`] clients opening
//! byte-checked echo connections), through both a `server` topology and a split gateway/relay
//! cluster, with the **shipped default** timings. Every scenario prints its figures on a
//! `chaos: …` line (`cargo test --test chaos -- --nocapture`) and asserts the correctness targets:
//! no corrupt byte, no failed connection opened later than a second after the fault, and no
//! failed connection at all through a rolling restart.
//!
//! Each test has its own addresses (127.N.0.0/16, N in 100–119), so scenarios run concurrently.
//! `POSTERN_CHAOS_SOAK=1` makes the stalled readers stall for 60 s instead of 10 s.

#[path = "../process/mod.rs"]
mod process;

mod cluster;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cluster::*;
use process::*;

/// How long to let load run before a fault, so that the figures have a before.
const WARM: Duration = Duration::from_secs(2);
/// How long a kill, a cut path or a cut peer path lasts before it is repaired.
const FAULT: Duration = Duration::from_secs(8);
/// How long load runs after the repair.
const AFTER: Duration = Duration::from_secs(3);

fn soak() -> bool {
    std::env::var("POSTERN_CHAOS_SOAK").is_ok_and(|v| v == "1")
}

/// Sleeps until `at + d` (a measurement window, not a wait for a condition).
async fn until(at: Instant, d: Duration) {
    tokio::time::sleep_until((at + d).into()).await;
}

macro_rules! both {
    ($scenario:ident, $server:ident = $net_server:expr, $split:ident = $net_split:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $server() {
            $scenario($net_server, Topo::Server).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $split() {
            $scenario($net_split, Topo::Split).await;
        }
    };
}

both!(relay_kill, relay_kill_server = 100, relay_kill_split = 101);
both!(relay_stop, relay_stop_server = 102, relay_stop_split = 103);
both!(
    agent_path_cut,
    agent_path_cut_server = 104,
    agent_path_cut_split = 105
);
both!(
    peer_path_cut,
    peer_path_cut_server = 106,
    peer_path_cut_split = 107
);
both!(
    stalled_readers,
    stalled_readers_server = 108,
    stalled_readers_split = 109
);
both!(
    agent_restart,
    agent_restart_server = 110,
    agent_restart_split = 111
);
both!(
    rolling_restart,
    rolling_restart_server = 112,
    rolling_restart_split = 113
);

/// A relay that holds one of the agent's tunnels is killed (`kill -9`). In the split cluster the
/// agent moves to the third relay; in the server topology the relay comes back after [`FAULT`]
/// and the agent's second tunnel with it.
async fn relay_kill(net: u8, topo: Topo) {
    let mut c = Cluster::start(net, topo, Paths::default()).await;
    let load = Load::start(&c);
    until(load.started, WARM).await;
    let v = c.victim().await;
    let at = Instant::now();
    c.kill(v).await;
    let two = match topo {
        Topo::Split => format!("{:?} after the kill", c.wait_two_tunnels(Some(v)).await),
        Topo::Server => {
            until(at, FAULT).await;
            c.restart(v).await;
            format!("{:?} after the restart", c.wait_two_tunnels(None).await)
        }
    };
    until(at, FAULT + AFTER).await;
    let f = Figures::of(&load.finish().await, at);
    f.print("relay kill -9", topo, &format!("; two tunnels again {two}"));
    f.assert_targets("relay kill -9", topo);
}

/// A relay that holds one of the agent's tunnels is stopped (`kill -STOP`) for 20 s, then
/// continued: it answers nothing, its kernel still holds its sockets.
async fn relay_stop(net: u8, topo: Topo) {
    const STOP: Duration = Duration::from_secs(20);
    let c = Cluster::start(net, topo, Paths::default()).await;
    let load = Load::start(&c);
    until(load.started, WARM).await;
    let v = c.victim().await;
    let at = Instant::now();
    c.signal(v, "STOP");
    let moved = match topo {
        Topo::Split => format!(
            "; two tunnels on live relays {:?} after the stop",
            c.wait_two_tunnels(Some(v)).await
        ),
        Topo::Server => String::new(),
    };
    until(at, STOP).await;
    c.signal(v, "CONT");
    let two = c.wait_two_tunnels(None).await;
    until(at, STOP + AFTER).await;
    let f = Figures::of(&load.finish().await, at);
    f.print(
        "relay kill -STOP 20 s",
        topo,
        &format!("{moved}; two tunnels {two:?} after the CONT"),
    );
    f.assert_targets("relay kill -STOP 20 s", topo);
}

/// The UDP path between the agent and a relay it holds a tunnel on drops every datagram, both
/// ways, for [`FAULT`]; both processes stay up.
async fn agent_path_cut(net: u8, topo: Topo) {
    let c = Cluster::start(
        net,
        topo,
        Paths {
            agent: true,
            peer: false,
        },
    )
    .await;
    let load = Load::start(&c);
    until(load.started, WARM).await;
    let v = c.victim().await;
    let path = c.relays[v].agent_path.as_ref().unwrap();
    let at = Instant::now();
    path.cut.store(true, Ordering::Relaxed);
    let moved = match topo {
        Topo::Split => format!(
            "; two tunnels on reachable relays {:?} after the cut",
            c.wait_two_tunnels(Some(v)).await
        ),
        Topo::Server => String::new(),
    };
    until(at, FAULT).await;
    path.cut.store(false, Ordering::Relaxed);
    let healed = Instant::now();
    let two = c.wait_two_tunnels(None).await;
    until(healed, AFTER).await;
    let f = Figures::of(&load.finish().await, at);
    f.print(
        "agent-relay path cut",
        topo,
        &format!("{moved}; two tunnels {two:?} after the path healed"),
    );
    f.assert_targets("agent-relay path cut", topo);
}

/// The path from the clients' gateway to a relay's peer endpoint drops every datagram for
/// [`FAULT`]. In the server topology the gateway is the first server's, the relay the second's.
async fn peer_path_cut(net: u8, topo: Topo) {
    let c = Cluster::start(
        net,
        topo,
        Paths {
            agent: false,
            peer: true,
        },
    )
    .await;
    let load = Load::start(&c);
    until(load.started, WARM).await;
    let v = c.victim().await;
    let path = c.relays[v].peer_path.as_ref().unwrap();
    let at = Instant::now();
    path.cut.store(true, Ordering::Relaxed);
    until(at, FAULT).await;
    path.cut.store(false, Ordering::Relaxed);
    until(at, FAULT + AFTER).await;
    let held = c.two_tunnels(None).await;
    let f = Figures::of(&load.finish().await, at);
    f.print(
        "gateway-relay peer path cut",
        topo,
        &format!("; the agent held two tunnels at the end: {held}"),
    );
    f.assert_targets("gateway-relay peer path cut", topo);
    assert!(held, "the agent lost a tunnel to a cut peer path");
}

/// 20 downloads through the clients' door stop reading (an endless source behind the agent) for
/// 10 s (60 s with `POSTERN_CHAOS_SOAK=1`) while the [`CLIENTS`] clients keep echoing; their rate
/// is compared with a window of the same length before the stall.
async fn stalled_readers(net: u8, topo: Topo) {
    const STALLED: usize = 20;
    let window = if soak() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(10)
    };
    let c = Cluster::start(net, topo, Paths::default()).await;
    let door = c.doors.read().unwrap()[0];
    let load = Load::start(&c);
    until(load.started, window).await;
    let base = load.finish().await;
    let ok = |r: &[Record]| r.iter().filter(|r| r.outcome == Outcome::Ok).count();
    let baseline = ok(&base) as f64 / window.as_secs_f64();

    let mut stalled = Vec::new();
    for i in 0..STALLED {
        let tcp = socks_connect_from(Some(c.stalled_ip.into()), door, None, c.source.addr)
            .await
            .unwrap_or_else(|code| panic!("stalled reader {i}: socks reply {code:#04x}"));
        stalled.push(tcp);
    }
    // Every buffer on the way fills: the source's writes stop.
    let mut last = (u64::MAX, Instant::now());
    wait_for(
        Duration::from_secs(20),
        "the source's writes to stop",
        || {
            let now = c.source.written.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            }
            let settled = last.1.elapsed() >= Duration::from_millis(500);
            async move { settled.then_some(()) }
        },
    )
    .await;
    let at = Instant::now();
    let load = Load::start(&c);
    until(at, window).await;
    let during = load.finish().await;
    drop(stalled);
    let rate = ok(&during) as f64 / window.as_secs_f64();
    let f = Figures::of(&during, at);
    f.print(
        &format!("{STALLED} readers stalled {window:?}"),
        topo,
        &format!(
            "; others' rate {rate:.0}/s against {baseline:.0}/s without the stall ({:.0}%)",
            100.0 * rate / baseline
        ),
    );
    f.assert_targets("stalled readers", topo);
    assert_eq!(f.failed, 0, "connections failed while readers stalled");
    assert!(
        rate >= baseline * 0.5,
        "others' rate fell from {baseline:.0}/s to {rate:.0}/s while readers stalled"
    );
}

/// The agent is killed (`kill -9`) and started again 5 s later. While it is down its service is
/// unreachable (those failures are the fault itself); from a second after its restart, no
/// connection may fail.
async fn agent_restart(net: u8, topo: Topo) {
    const DOWN: Duration = Duration::from_secs(5);
    let mut c = Cluster::start(net, topo, Paths::default()).await;
    let load = Load::start(&c);
    until(load.started, WARM).await;
    let killed = Instant::now();
    c.kill_agent().await;
    until(killed, DOWN).await;
    let at = Instant::now();
    c.restart_agent().await;
    let two = c.wait_two_tunnels(None).await;
    until(at, FAULT).await;
    let records = load.finish().await;
    let down = records
        .iter()
        .filter(|r| r.started >= killed && r.started < at)
        .filter(|r| r.outcome != Outcome::Ok)
        .count();
    let f = Figures::of(&records, at);
    f.print(
        "agent kill -9, restarted 5 s later",
        topo,
        &format!(
            " (figures from the restart; {down} failed while the agent was down); two tunnels \
             {two:?} after the restart"
        ),
    );
    f.assert_targets("agent restart", topo);
}

/// Every relay restarted one at a time by the documented procedure (SIGTERM, wait for the exit,
/// start, `/readyz` 200, then `postern status --wait-redundant 2`: every agent on two distinct
/// live relays again before the next relay), five rounds in a row on a fresh cluster. In the server topology each server's
/// door is taken out of the clients' rotation before its SIGTERM and put back once it is ready,
/// as a load balancer following `/readyz` does. Not one connection may fail.
async fn rolling_restart(net: u8, topo: Topo) {
    const ROUNDS: usize = 5;
    let mut c = Cluster::start(net, topo, Paths::default()).await;
    if topo == Topo::Server {
        let doors: Vec<_> = c.relays.iter().map(|r| r.socks5.unwrap()).collect();
        *c.doors.write().unwrap() = doors;
    }
    let mut redundant = Vec::new();
    let mut per_round = Vec::new();
    for round in 0..ROUNDS {
        let load = Load::start(&c);
        until(load.started, Duration::from_secs(1)).await;
        for i in 0..c.relays.len() {
            if let Some(door) = c.relays[i].socks5 {
                let version = c.take_door_out(door);
                load.wait_chosen(version).await;
            }
            let mut proc = c.relays[i].proc.take().unwrap();
            proc.signal("TERM");
            let status = proc.wait_exit(Duration::from_secs(40)).await;
            assert!(status.success(), "relay-{i} drained and exited: {status}");
            c.restart(i).await;
            let admin = c.relays[i].admin;
            wait_for(Duration::from_secs(20), "/readyz 200", || async {
                let ok = status_ready(admin).await;
                ok.then_some(())
            })
            .await;
            // The documented procedure's check, from the clients' gateway (server topology:
            // the other server), then the agent's and relays' own view.
            let restarted = Instant::now();
            let view = match &c.gateway {
                Some((_, _, admin)) => *admin,
                None => c.relays[1 - i].admin,
            };
            let out = tokio::process::Command::new(BIN)
                .args(["status", "--admin", &view.to_string()])
                .args(["--wait-redundant", "2", "--timeout", "60s"])
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "postern status --wait-redundant 2: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            redundant.push(restarted.elapsed());
            wait_for(
                Duration::from_secs(5),
                "two tunnels as the check said",
                || async { c.two_tunnels(None).await.then_some(()) },
            )
            .await;
            if let Some(door) = c.relays[i].socks5 {
                c.put_door_in(door);
            }
        }
        until(Instant::now(), Duration::from_secs(1)).await;
        let records = load.finish().await;
        let f = Figures::of(&records, records[0].started);
        f.print(
            &format!("rolling restart, round {}", round + 1),
            topo,
            &format!(
                "; two tunnels again {:?} after each restart",
                &redundant[redundant.len() - c.relays.len()..]
            ),
        );
        assert!(f.corrupt.is_empty(), "round {}: {:?}", round + 1, f.corrupt);
        per_round.push((f.failed, records));
    }
    let failed: Vec<usize> = per_round.iter().map(|(n, _)| *n).collect();
    let errors: Vec<String> = per_round
        .iter()
        .flat_map(|(_, r)| r.iter())
        .filter_map(|r| match &r.outcome {
            Outcome::Failed(why) => Some(why.clone()),
            _ => None,
        })
        .collect();
    eprintln!(
        "chaos: rolling restart [{}]: failed per round {failed:?}; agents back on two relays \
         {:?}–{:?} after a restart",
        topo.name(),
        redundant.iter().min().unwrap(),
        redundant.iter().max().unwrap()
    );
    assert!(
        failed.iter().all(|n| *n == 0),
        "rolling restart failed connections {failed:?}: {errors:?}"
    );
}

/// A draining relay that is an agent's only owner keeps serving it until the agent's replacement
/// tunnel is up. Two relays and a gateway; the agent (redundancy 1) holds its one tunnel on
/// relay-0 (its path to relay-1 is cut while it starts), then relay-0 is sent SIGTERM while the
/// path to relay-1 stays cut for 3 s more: the replacement cannot come up before. Before, the
/// draining relay refused new streams and dropped the agent's routes at once, and every new
/// connection failed until the replacement was up; now none fails, and relay-0 exits once the
/// agent moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_only_owner_serves_until_the_replacement_is_up() {
    let mut c = Cluster::shaped(
        114,
        Topo::Split,
        Shape {
            paths: Paths {
                agent: true,
                peer: false,
            },
            relays: Some(2),
            redundancy: Some(1),
            precut: Some(1),
        },
    )
    .await;
    let load = Load::start(&c);
    until(load.started, WARM).await;
    let mut relay0 = c.relays[0].proc.take().unwrap();
    let at = Instant::now();
    relay0.signal("TERM");
    until(at, Duration::from_secs(3)).await;
    c.relays[1]
        .agent_path
        .as_ref()
        .unwrap()
        .cut
        .store(false, Ordering::Relaxed);
    let status = relay0.wait_exit(Duration::from_secs(20)).await;
    let exited = at.elapsed();
    assert!(status.success(), "relay-0 drained and exited: {status}");
    let admin = c.relays[1].admin;
    wait_for(
        Duration::from_secs(10),
        "the agent's tunnel on relay-1",
        || async {
            let s = cluster::status(admin).await?;
            (s["relay"]["tunnels"].as_u64() == Some(1)).then_some(())
        },
    )
    .await;
    until(Instant::now(), Duration::from_secs(1)).await;
    let f = Figures::of(&load.finish().await, at);
    f.print(
        "SIGTERM of the only owner, replacement 3 s later",
        Topo::Split,
        &format!("; relay-0 exited {exited:?} after its SIGTERM"),
    );
    assert!(f.corrupt.is_empty(), "{:?}", f.corrupt);
    assert_eq!(
        f.failed, 0,
        "connections failed while the only owner drained: {:?}",
        f.failed_after
    );
}

/// Whether the admin listener answers `/readyz` with 200.
async fn status_ready(admin: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut tcp = tokio::net::TcpStream::connect(admin).await.ok()?;
        tcp.write_all(
            format!("GET /readyz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .ok()?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.ok()?;
        Some(raw.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(1), work)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}
