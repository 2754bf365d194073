//! The etcd registry under the faults a production etcd brings, with real processes: a real etcd,
//! the real `postern` binary as relay, gateway and agents, and a TCP forwarder owned by the test
//! between a relay and etcd, which resets every connection through it on demand (SO_LINGER 0:
//! an RST both ways, as a load balancer's idle reset or a crashed proxy does).

#[allow(dead_code)]
#[path = "cluster/harness.rs"]
mod harness;
#[path = "process/mod.rs"]
mod process;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use harness::{tally, wait_for, Load, Outcome, LEASE_TTL, TOKEN};
use process::roles::{
    transport, AgentRole, Credential, GatewayRole, Pki, Registry, Relay, RelayRole,
};
use process::{free_udp_port, ready_addr, Echo, Etcd, EtcdTls, Proc, BIN};

/// A TCP forwarder from a loopback port to `target`. [`Forwarder::reset_all`] resets every
/// connection open through it at that moment; later connections pass again.
struct Forwarder {
    addr: SocketAddr,
    cut: watch::Sender<u64>,
    live: Arc<AtomicUsize>,
    resets: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(target: SocketAddr) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = watch::channel(0u64);
        let live = Arc::new(AtomicUsize::new(0));
        let resets = Arc::new(AtomicUsize::new(0));
        let task = {
            let (cut, live, resets) = (cut.clone(), live.clone(), resets.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        return;
                    };
                    // Subscribed before the task starts: only a later cut ends this connection.
                    let mut cut_rx = cut.subscribe();
                    let (live, resets) = (live.clone(), resets.clone());
                    tokio::spawn(async move {
                        let Ok(mut upstream) = TcpStream::connect(target).await else {
                            return;
                        };
                        live.fetch_add(1, Ordering::SeqCst);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                            _ = cut_rx.changed() => {
                                // Closing with a zero linger sends an RST instead of a FIN.
                                let _ = client.set_zero_linger();
                                let _ = upstream.set_zero_linger();
                                resets.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        live.fetch_sub(1, Ordering::SeqCst);
                    });
                }
            })
        };
        Forwarder {
            addr,
            cut,
            live,
            resets,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits (bounded) until something is connected through the forwarder, resets every
    /// connection, and returns how many it reset.
    async fn reset_all(&self) -> usize {
        wait_for(
            Duration::from_secs(10),
            "a connection through the forwarder",
            || async { (self.live.load(Ordering::SeqCst) > 0).then_some(()) },
        )
        .await;
        let before = self.resets.load(Ordering::SeqCst);
        let open = self.live.load(Ordering::SeqCst);
        self.cut.send_modify(|g| *g += 1);
        wait_for(
            Duration::from_secs(5),
            "the connections to be reset",
            || async { (self.resets.load(Ordering::SeqCst) >= before + open).then_some(()) },
        )
        .await;
        self.resets.load(Ordering::SeqCst) - before
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Every key deleted under a prefix, as an etcd watch of the test's own (straight to etcd) sees it.
struct DeleteWatch {
    deleted: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl DeleteWatch {
    async fn start(etcd: &Etcd, prefix: &str) -> DeleteWatch {
        Self::start_url(&etcd.url, prefix).await
    }

    async fn start_url(url: &str, prefix: &str) -> DeleteWatch {
        let mut client = etcd_client::Client::connect([url], None).await.unwrap();
        let mut stream = client
            .watch(prefix, Some(WatchOptions::new().with_prefix()))
            .await
            .unwrap();
        let deleted = Arc::new(Mutex::new(Vec::new()));
        let seen = deleted.clone();
        let task = tokio::spawn(async move {
            // Ends only when the watch breaks, which [`DeleteWatch::deleted`] treats as a failure.
            while let Ok(Some(resp)) = stream.message().await {
                for event in resp.events() {
                    if event.event_type() == EventType::Delete {
                        if let Some(kv) = event.kv() {
                            let key = String::from_utf8_lossy(kv.key()).to_string();
                            seen.lock().unwrap().push(key);
                        }
                    }
                }
            }
        });
        DeleteWatch { deleted, task }
    }

    /// The keys deleted so far; panics when the watch is no longer running (it would see nothing).
    fn deleted(&self) -> Vec<String> {
        assert!(!self.task.is_finished(), "the test's etcd watch broke");
        self.deleted.lock().unwrap().clone()
    }
}

/// The lease a key is attached to (0 when none), read straight from etcd.
async fn lease_of(etcd: &Etcd, key: &str) -> Option<i64> {
    lease_of_url(&etcd.url, key).await
}

async fn lease_of_url(url: &str, key: &str) -> Option<i64> {
    let mut client = etcd_client::Client::connect([url], None).await.unwrap();
    let resp = client.get(key, None).await.unwrap();
    resp.kvs().first().map(|kv| kv.lease())
}

/// The route keys of `relay` under `/postern/routes/` with the lease each hangs off.
async fn routes_of(etcd: &Etcd, relay: &str) -> Vec<(String, i64)> {
    let mut client = etcd_client::Client::connect([etcd.url.clone()], None)
        .await
        .unwrap();
    let resp = client
        .get("/postern/routes/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_string(), kv.lease()))
        .filter(|(key, _)| key.split('/').nth(5) == Some(relay))
        .collect()
}

fn p(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

/// A small cluster written and started piece by piece: the test chooses each relay's etcd
/// endpoint (straight, or through a [`Forwarder`]).
struct Setup {
    dir: tempfile::TempDir,
    bundle: postern::cert::Bundle,
    net: u8,
}

impl Setup {
    fn new(net: u8) -> Setup {
        let dir = tempfile::Builder::new()
            .prefix("postern-registry-")
            .tempdir()
            .unwrap();
        let bundle = postern::cert::generate_bundle(dir.path(), "postern-relay").unwrap();
        Setup { dir, bundle, net }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes relay `id`'s config (listening on a fresh UDP port, registered through `registry`)
    /// and returns its path and port.
    fn relay_config(&self, name: &str, id: &str, registry: Registry) -> (PathBuf, u16) {
        let (port, peer_port) = (free_udp_port(), free_udp_port());
        let config = self.path(&format!("{name}.toml"));
        let pki = Pki::from(&self.bundle);
        let allow = format!("127.{}.0.0/16", self.net);
        let mut relay = Relay::new(
            id,
            SocketAddr::from(([127, 0, 0, 1], port)),
            &pki,
            vec![Credential::new("test", TOKEN, &[&allow])],
        );
        relay.peer_listen = Some(SocketAddr::from(([127, 0, 0, 1], peer_port)));
        relay.drain_grace = Some(Duration::from_secs(2));
        let mut role = RelayRole::new(relay, &pki, registry);
        role.registry.as_mut().unwrap().lease_ttl = Some(LEASE_TTL);
        role.admin = Some("127.0.0.1:0".into());
        std::fs::write(&config, role.toml()).unwrap();
        (config, port)
    }

    /// Starts a relay process from a config and waits for its `ready` line.
    async fn relay(&self, name: &str, config: &Path) -> Proc {
        let mut proc = Proc::spawn(
            name,
            BIN,
            &["relay", "--config", &p(config)],
            &[],
            &self.path(&format!("{name}.log")),
        );
        proc.ready_line().await;
        proc
    }

    /// Starts a gateway and returns it with its SOCKS5 address.
    async fn gateway(&self, name: &str, registry: Registry) -> (Proc, SocketAddr) {
        let ((proc, _), socks) = self.gateway_with_admin(name, registry).await;
        (proc, socks)
    }

    /// Starts a gateway: (process, admin address), SOCKS5 address.
    async fn gateway_with_admin(
        &self,
        name: &str,
        registry: Registry,
    ) -> ((Proc, SocketAddr), SocketAddr) {
        let config = self.path(&format!("{name}.toml"));
        let role = GatewayRole::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            &Pki::from(&self.bundle),
            registry,
        );
        std::fs::write(&config, role.toml()).unwrap();
        let mut proc = Proc::spawn(
            name,
            BIN,
            &["gateway", "--config", &p(&config)],
            &[],
            &self.path(&format!("{name}.log")),
        );
        let line = proc.ready_line().await;
        let socks = ready_addr(&line, "socks5");
        ((proc, ready_addr(&line, "admin")), socks)
    }

    /// Starts agent `i` at 127.net.0.(i+1) with an echo service, tunnelled to `relay_ports`.
    async fn agent(&self, i: u8, relay_ports: &[u16]) -> (Proc, Echo) {
        let id = format!("agent-{i}");
        let ip = Ipv4Addr::new(127, self.net, 0, i + 1);
        let echo = Echo::start(ip).await;
        let relays: Vec<SocketAddr> = relay_ports
            .iter()
            .map(|port| SocketAddr::from(([127, 0, 0, 1], *port)))
            .collect();
        let config = self.path(&format!("{id}.toml"));
        let mut role = AgentRole::new(
            &id,
            &relays,
            &Pki::from(&self.bundle),
            "POSTERN_TEST_TOKEN",
            IpAddr::V4(ip),
            &[echo.addr.port()],
        );
        role.redundancy = Some(relay_ports.len() as u32);
        role.reconnect_min = Some(Duration::from_millis(100));
        role.reconnect_max = Some(Duration::from_secs(1));
        role.admin = Some("127.0.0.1:0".into());
        role.extra = transport(&[
            ("idle_timeout", Duration::from_secs(3)),
            ("keep_alive", Duration::from_millis(500)),
        ]);
        std::fs::write(&config, role.toml()).unwrap();
        let proc = Proc::spawn(
            &id,
            BIN,
            &["agent", "--config", &p(&config)],
            &[("POSTERN_TEST_TOKEN", TOKEN)],
            &self.path(&format!("{id}.log")),
        );
        (proc, echo)
    }

    /// Prints the last lines of every process log (for a failing test).
    fn dump_logs(&self) {
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                eprintln!("==== {} (last {} lines)", path.display(), tail.len());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// Waits until etcd holds a route of `relay` for each of `count` agents.
async fn wait_routes(etcd: &Etcd, relay: &str, count: usize) {
    wait_for(
        Duration::from_secs(30),
        &format!("{count} routes of {relay}"),
        || async { (routes_of(etcd, relay).await.len() >= count).then_some(()) },
    )
    .await;
}

/// The relay's TCP connection to etcd is reset 20 times in 30 s (every 1.5 s, a little more than
/// the keep-alive period of the 4 s lease, so resets land in every phase of its cycle) while
/// clients keep transferring through a gateway. The relay keeps its lease: a watch
/// on the prefix sees no delete, the relay's record and routes stay on the same lease, and every
/// transfer is byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_keeps_its_lease_through_etcd_connection_resets() {
    const RESETS: usize = 20;
    const EVERY: Duration = Duration::from_millis(1500);
    let setup = Setup::new(91);
    let etcd = Etcd::started(setup.dir.path()).await;
    let etcd_addr: SocketAddr = etcd.url.trim_start_matches("http://").parse().unwrap();
    let forwarder = Forwarder::start(etcd_addr).await;

    let (config, port) = setup.relay_config("relay-0", "relay-0", Registry::etcd(&forwarder.url()));
    let _relay = setup.relay("relay-0", &config).await;
    let (_gateway, socks) = setup.gateway("gateway-0", Registry::etcd(&etcd.url)).await;
    let mut agents = Vec::new();
    for i in 0..3 {
        agents.push(setup.agent(i, &[port]).await);
    }
    wait_routes(&etcd, "relay-0", 3).await;
    let lease = lease_of(&etcd, "/postern/relays/relay-0")
        .await
        .expect("relay record");
    let routes_before = routes_of(&etcd, "relay-0").await;
    assert!(routes_before.iter().all(|(_, l)| *l == lease));

    let deletes = DeleteWatch::start(&etcd, "/postern/").await;
    let targets: Vec<SocketAddr> = agents.iter().map(|(_, echo)| echo.addr).collect();
    let loads = [
        Load::start(socks, targets.clone(), 32 * 1024),
        Load::start(socks, targets.into_iter().rev().collect(), 8 * 1024),
    ];
    for load in &loads {
        load.wait_transfers(5).await;
    }

    let started = Instant::now();
    let mut reset_connections = 0;
    for round in 0..RESETS {
        let next = started + EVERY * round as u32;
        tokio::time::sleep_until(next.into()).await;
        let n = forwarder.reset_all().await;
        assert!(n > 0, "reset {round} found no connection to reset");
        reset_connections += n;
    }
    let storm = started.elapsed();
    // One more lease TTL after the last reset: a lost lease would show by now. The wait is the
    // observation (nothing signals a lease that was kept), not a wait for readiness.
    tokio::time::sleep(LEASE_TTL).await;

    let mut results = Vec::new();
    for load in loads {
        results.extend(load.finish().await);
    }
    let (ok, failed, corrupt) = tally(&results);
    let deleted = deletes.deleted();
    let lease_after = lease_of(&etcd, "/postern/relays/relay-0").await;
    let routes_after = routes_of(&etcd, "relay-0").await;
    eprintln!(
        "{RESETS} resets ({reset_connections} connections) in {storm:?}: {} route/relay deletions, \
         transfers ok={ok} failed={failed} corrupt={corrupt}, lease {lease:x} -> {lease_after:x?}",
        deleted.len()
    );
    if !deleted.is_empty() || failed > 0 || corrupt > 0 || lease_after != Some(lease) {
        setup.dump_logs();
    }
    assert!(
        deleted.is_empty(),
        "{} keys deleted during the resets, first: {:?}",
        deleted.len(),
        &deleted[..deleted.len().min(8)]
    );
    assert_eq!(lease_after, Some(lease), "the relay's lease changed");
    assert_eq!(routes_after, routes_before, "the relay's routes changed");
    let failures: Vec<&Outcome> = results
        .iter()
        .map(|(_, o)| o)
        .filter(|o| **o != Outcome::Ok)
        .collect();
    assert!(failures.is_empty(), "transfers failed: {failures:?}");
    assert!(ok >= 20, "only {ok} transfers completed");

    // The watch does see deletes under the prefix: a route put and deleted by the test shows.
    let mut client = etcd_client::Client::connect([etcd.url.clone()], None)
        .await
        .unwrap();
    let probe = "/postern/routes/default/127.91.9.9/probe/1";
    let value = r#"{"agent_id":"probe","ports":[],"connected_at":0,"draining":false}"#;
    client.put(probe, value, None).await.unwrap();
    client.delete(probe, None).await.unwrap();
    wait_for(
        Duration::from_secs(5),
        "the watch to see the probe's delete",
        || async { (deletes.deleted() == [probe.to_string()]).then_some(()) },
    )
    .await;
}

/// A second relay started with the id of a live one is refused: it exits non-zero with a message
/// naming the conflict, and the first relay's record and routes stay, on the same lease, with no
/// delete seen under the prefix. A relay restarted after a crash (its old lease still live for up
/// to a TTL) is not refused: it waits for the old lease to expire and registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_relay_with_a_live_id_is_refused() {
    let setup = Setup::new(92);
    let etcd = Etcd::started(setup.dir.path()).await;
    let (config, port) = setup.relay_config("relay-a", "relay-dup", Registry::etcd(&etcd.url));
    let mut first = setup.relay("relay-a", &config).await;
    let mut agents = Vec::new();
    for i in 0..2 {
        agents.push(setup.agent(i, &[port]).await);
    }
    wait_routes(&etcd, "relay-dup", 2).await;
    let lease = lease_of(&etcd, "/postern/relays/relay-dup")
        .await
        .expect("relay record");
    let routes_before = routes_of(&etcd, "relay-dup").await;
    let deletes = DeleteWatch::start(&etcd, "/postern/").await;

    let (config_b, _) = setup.relay_config("relay-b", "relay-dup", Registry::etcd(&etcd.url));
    let mut second = setup.relay("relay-b", &config_b).await;
    let started = Instant::now();
    let limit = LEASE_TTL + Duration::from_secs(15);
    let Ok(status) = tokio::time::timeout(limit, second.child.wait()).await else {
        setup.dump_logs();
        panic!("the second relay still runs after {limit:?}");
    };
    let status = status.unwrap();
    let refused_after = started.elapsed();
    let log = std::fs::read_to_string(setup.path("relay-b.log")).unwrap();
    eprintln!("second relay refused after {refused_after:?} ({status})");
    if status.success() || !log.contains("is held by another live relay") {
        setup.dump_logs();
    }
    assert!(!status.success(), "the second relay exited with {status}");
    assert!(
        log.contains("relay id relay-dup is held by another live relay"),
        "no clear refusal in the second relay's log"
    );
    assert!(first.alive(), "the first relay died");
    assert_eq!(
        lease_of(&etcd, "/postern/relays/relay-dup").await,
        Some(lease),
        "the first relay's record changed hands"
    );
    assert_eq!(routes_of(&etcd, "relay-dup").await, routes_before);
    let deleted = deletes.deleted();
    assert!(deleted.is_empty(), "keys deleted: {deleted:?}");

    // A crash and an immediate restart under the same id: the old lease still holds the record
    // until it expires, then the new process registers and its agents' routes come back.
    first.child.kill().await.unwrap();
    let restarted_at = Instant::now();
    let _again = setup.relay("relay-a2", &config).await;
    let new_lease = wait_for(
        LEASE_TTL + Duration::from_secs(15),
        "the restarted relay to register",
        || async {
            lease_of(&etcd, "/postern/relays/relay-dup")
                .await
                .filter(|l| *l != lease)
        },
    )
    .await;
    eprintln!(
        "restarted relay registered after {:?}",
        restarted_at.elapsed()
    );
    wait_routes(&etcd, "relay-dup", 2).await;
    assert!(routes_of(&etcd, "relay-dup")
        .await
        .iter()
        .all(|(_, l)| *l == new_lease));
}

/// Three etcd members on loopback, each with its own ports and data dir.
struct EtcdCluster {
    urls: Vec<String>,
    members: Vec<Proc>,
    /// Each member's command line, to restart it on the same ports and data.
    args: Vec<Vec<String>>,
    dir: PathBuf,
}

impl EtcdCluster {
    async fn start(dir: &Path) -> EtcdCluster {
        let ports: Vec<(u16, u16)> = (0..3)
            .map(|_| (process::free_tcp_port(), process::free_tcp_port()))
            .collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let initial = initial.join(",");
        let mut members = Vec::new();
        let mut urls = Vec::new();
        let mut all_args: Vec<Vec<String>> = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let client = format!("http://127.0.0.1:{client}");
            let peer = format!("http://127.0.0.1:{peer}");
            let data = dir.join(format!("etcd-m{i}"));
            let name = format!("m{i}");
            let args = [
                "--name",
                &name,
                "--data-dir",
                data.to_str().unwrap(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "postern-test",
            ];
            members.push(Proc::spawn(
                &format!("etcd-m{i}"),
                "etcd",
                &args,
                &[],
                &dir.join(format!("etcd-m{i}.log")),
            ));
            all_args.push(args.iter().map(|a| a.to_string()).collect());
            urls.push(client);
        }
        let cluster = EtcdCluster {
            urls,
            members,
            args: all_args,
            dir: dir.to_path_buf(),
        };
        for i in 0..3 {
            cluster.wait_member(i).await;
        }
        cluster
    }

    /// Waits until member `i` answers a (linearizable) read: it is in the cluster with a leader.
    async fn wait_member(&self, i: usize) {
        let url = self.urls[i].clone();
        wait_for(process::STARTUP, "the etcd member to answer", || {
            let url = url.clone();
            async move {
                let mut c = etcd_client::Client::connect([url], None).await.ok()?;
                c.get("probe", None).await.ok().map(|_| ())
            }
        })
        .await;
    }

    /// Kills member `i` and starts it again on its ports and data; waits until it answers.
    async fn restart(&mut self, i: usize) {
        self.members[i].child.kill().await.unwrap();
        let args: Vec<&str> = self.args[i].iter().map(String::as_str).collect();
        self.members[i] = Proc::spawn(
            &format!("etcd-m{i}"),
            "etcd",
            &args,
            &[],
            &self.dir.join(format!("etcd-m{i}.log")),
        );
        self.wait_member(i).await;
    }
}

/// `GET path` on an admin listener: (status, body).
async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let work = async {
        let mut tcp = TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.ok()?;
        let mut text = String::new();
        tcp.read_to_string(&mut text).await.ok()?;
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .ok()
        .flatten()
        .unwrap_or((0, String::new()))
}

/// `postern_registry_view_age_seconds` as the gateway exports it.
async fn view_age(admin: SocketAddr) -> f64 {
    let (_, body) = admin_get(admin, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix("postern_registry_view_age_seconds "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no postern_registry_view_age_seconds in /metrics"))
}

/// Waits until `GET /readyz` answers `status`; returns how long that took.
async fn wait_readyz(admin: SocketAddr, status: u16, what: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    wait_for(limit, what, || async {
        (admin_get(admin, "/readyz").await.0 == status).then_some(())
    })
    .await;
    started.elapsed()
}

/// A 3-member etcd; the gateway and the relay talk to member m0 only. First m0 restarts: no
/// route is deleted and the relay keeps its lease. Then m0 is isolated from the
/// other two (both stopped with SIGSTOP: no leader for m0, which itself answers on). The
/// gateway's view age rises and it turns not ready past `registry.max_staleness` (3 s); the
/// relay, cut off for longer than its lease TTL, refuses a new agent with `Draining`. When the
/// members come back, the gateway is ready again with a fresh view, and the new agent's tunnel
/// comes up and carries traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_member_makes_the_gateway_stale_and_the_relay_refuse() {
    const MAX_STALENESS: Duration = Duration::from_secs(3);
    let setup = Setup::new(93);
    let mut etcd = EtcdCluster::start(setup.dir.path()).await;
    let m0 = etcd.urls[0].clone();
    let (config, port) = setup.relay_config("relay-0", "relay-0", Registry::etcd(&m0));
    let mut relay = Proc::spawn(
        "relay-0",
        BIN,
        &["relay", "--config", &p(&config)],
        &[],
        &setup.path("relay-0.log"),
    );
    let relay_admin = ready_addr(&relay.ready_line().await, "admin");
    let stale = Registry {
        max_staleness: Some(MAX_STALENESS),
        ..Registry::etcd(&m0)
    };
    let (mut gateway, socks) = setup.gateway_with_admin("gateway-0", stale).await;
    let gateway_admin = gateway.1;
    let (_agent0, echo0) = setup.agent(0, &[port]).await;
    wait_readyz(
        gateway_admin,
        200,
        "the gateway to be ready",
        Duration::from_secs(20),
    )
    .await;
    wait_readyz(
        relay_admin,
        200,
        "the relay to be ready",
        Duration::from_secs(20),
    )
    .await;
    wait_for(Duration::from_secs(20), "agent-0 reachable", || async {
        (harness::transfer(socks, echo0.addr, 4096, 1).await == Outcome::Ok).then_some(())
    })
    .await;
    // With nothing changing, progress answers keep a healthy view young, well past the bound.
    // Sampled every 200 ms through a window past the bound: the window is what is observed.
    let mut fresh_age: f64 = 0.0;
    let quiet = Instant::now();
    let mut sample = tokio::time::interval(Duration::from_millis(200));
    while quiet.elapsed() < MAX_STALENESS + Duration::from_secs(2) {
        sample.tick().await;
        fresh_age = fresh_age.max(view_age(gateway_admin).await);
    }
    assert!(fresh_age < 2.0, "a healthy view grew {fresh_age}s old");
    assert_eq!(admin_get(gateway_admin, "/readyz").await.0, 200);

    // The member the gateway and the relay talk to restarts: their streams break, yet no route
    // is deleted, the relay keeps its lease, and both are ready again.
    let deletes = DeleteWatch::start_url(&etcd.urls[1], "/postern/").await;
    let lease = lease_of_url(&etcd.urls[1], "/postern/relays/relay-0").await;
    let restarted = Instant::now();
    etcd.restart(0).await;
    let member_back = restarted.elapsed();
    wait_readyz(
        gateway_admin,
        200,
        "the gateway ready",
        Duration::from_secs(10),
    )
    .await;
    wait_readyz(relay_admin, 200, "the relay ready", Duration::from_secs(10)).await;
    assert_eq!(
        lease_of_url(&etcd.urls[1], "/postern/relays/relay-0").await,
        lease
    );
    assert!(
        deletes.deleted().is_empty(),
        "deleted: {:?}",
        deletes.deleted()
    );
    eprintln!("m0 restarted in {member_back:?}: no deletion, same lease");

    for member in &etcd.members[1..] {
        member.signal("STOP");
    }
    let isolated = Instant::now();
    let stale_after = wait_readyz(
        gateway_admin,
        503,
        "the gateway to report itself stale",
        Duration::from_secs(30),
    )
    .await;
    // The gauge is refreshed every 250 ms: it crosses the bound at most that much later.
    let stale_age = wait_for(
        Duration::from_secs(2),
        "the view age metric past the bound",
        || async {
            let age = view_age(gateway_admin).await;
            (age > MAX_STALENESS.as_secs_f64()).then_some(age)
        },
    )
    .await;
    let (_, reason) = admin_get(gateway_admin, "/readyz").await;
    assert!(
        reason.contains("not confirmed by the registry"),
        "readyz says {reason:?}"
    );
    // Only the `fresh` check fails: the cached routes are there.
    assert_eq!(
        admin_get(gateway_admin, "/readyz?exclude=fresh").await.0,
        200
    );
    // Relay: cut off for longer than its lease TTL, it is not ready and refuses new tunnels.
    let relay_cut_off = wait_readyz(
        relay_admin,
        503,
        "the relay to notice it is cut off",
        Duration::from_secs(30),
    )
    .await;
    // Its lease gauge says so too (the alert `PosternRelayNotRegistered`), although it wrote
    // nothing that failed.
    wait_lease_held(
        relay_admin,
        0,
        "postern_relay_lease_held 0 on the cut-off relay",
    )
    .await;
    let (mut agent1, echo1) = setup.agent(1, &[port]).await;
    let agent1_log = setup.path("agent-1.log");
    wait_for(
        Duration::from_secs(15),
        "agent-1 refused with Draining",
        || async {
            let log = std::fs::read_to_string(&agent1_log).unwrap_or_default();
            log.contains("relay cut off from the registry")
                .then_some(())
        },
    )
    .await;
    assert!(
        routes_of_url(&etcd.urls[0], "relay-0").await.is_none(),
        "m0 answered a read without a leader"
    );

    for member in &etcd.members[1..] {
        member.signal("CONT");
    }
    let healed = Instant::now();
    let recovered_after = wait_readyz(
        gateway_admin,
        200,
        "the gateway to be ready again",
        Duration::from_secs(30),
    )
    .await;
    let recovered_age = view_age(gateway_admin).await;
    wait_readyz(
        relay_admin,
        200,
        "the relay to be ready again",
        Duration::from_secs(30),
    )
    .await;
    wait_lease_held(
        relay_admin,
        1,
        "postern_relay_lease_held 1 once the relay is back",
    )
    .await;
    wait_for(
        Duration::from_secs(30),
        "agent-1 reachable after the partition",
        || async {
            (harness::transfer(socks, echo1.addr, 4096, 2).await == Outcome::Ok).then_some(())
        },
    )
    .await;
    eprintln!(
        "isolated m0: gateway stale (503) after {stale_after:?} with max_staleness {MAX_STALENESS:?} \
         (view age then {stale_age:.1}s; at most {fresh_age:.2}s while healthy); relay not ready after \
         {relay_cut_off:?} from then; healed: gateway ready after {recovered_after:?} (view age \
         {recovered_age:.2}s), total partition {:?}",
        healed - isolated
    );
    assert!(recovered_age < MAX_STALENESS.as_secs_f64());
    assert!(relay.alive() && gateway.0.alive() && agent1.alive());
}

/// Waits (3 s at most: the gauge is refreshed every second) until the relay at `admin` exports
/// `postern_relay_lease_held` = `value`.
async fn wait_lease_held(admin: SocketAddr, value: u8, what: &str) {
    let line = format!("postern_relay_lease_held {value}");
    wait_for(Duration::from_secs(3), what, || async {
        let (_, metrics) = admin_get(admin, "/metrics").await;
        metrics.lines().any(|l| l == line).then_some(())
    })
    .await;
}

/// The route keys of `relay` read from one etcd member; `None` when it cannot answer in 3 s.
async fn routes_of_url(url: &str, relay: &str) -> Option<usize> {
    let work = async {
        let options = etcd_client::ConnectOptions::new().with_require_leader(true);
        let mut client = etcd_client::Client::connect([url.to_string()], Some(options))
            .await
            .ok()?;
        let resp = client
            .get("/postern/routes/", Some(GetOptions::new().with_prefix()))
            .await
            .ok()?;
        Some(
            resp.kvs()
                .iter()
                .filter(|kv| {
                    kv.key_str()
                        .is_ok_and(|k| k.split('/').nth(5) == Some(relay))
                })
                .count(),
        )
    };
    tokio::time::timeout(Duration::from_secs(3), work)
        .await
        .ok()
        .flatten()
}

/// A client of the test's own for a TLS etcd, with the client certificate.
async fn tls_client(tls: &EtcdTls, url: &str) -> Option<etcd_client::Client> {
    etcd_client::Client::connect([url], Some(tls.options()))
        .await
        .ok()
}

/// etcd serving clients over TLS only, with client certificates required
/// (`--client-cert-auth --trusted-ca-file --cert-file --key-file`): a relay, a gateway and an
/// agent work through it, byte-exact; a relay without a client certificate is refused with a
/// clear error and never registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_through_etcd_with_client_certificates() {
    let setup = Setup::new(94);
    let dir = setup.dir.path();
    let pki = EtcdTls::new(dir);
    let (client_port, peer_port) = (process::free_tcp_port(), process::free_tcp_port());
    let url = format!("https://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let data = dir.join("etcd-tls-data");
    let _etcd = Proc::spawn(
        "etcd",
        "etcd",
        &[
            "--name",
            "tls",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("tls={peer}"),
            "--client-cert-auth",
            "--trusted-ca-file",
            &p(&pki.ca),
            "--cert-file",
            &p(&pki.server.0),
            "--key-file",
            &p(&pki.server.1),
        ],
        &[],
        &dir.join("etcd.log"),
    );
    wait_for(process::STARTUP, "etcd over TLS to answer", || async {
        let mut client = tls_client(&pki, &url).await?;
        client.get("probe", None).await.ok().map(|_| ())
    })
    .await;
    // Plain TCP is not served: the test's point is that postern speaks TLS to it.
    assert!(
        tokio::time::timeout(Duration::from_secs(3), async {
            let mut c =
                etcd_client::Client::connect([format!("http://127.0.0.1:{client_port}")], None)
                    .await
                    .ok()?;
            c.get("probe", None).await.ok()
        })
        .await
        .ok()
        .flatten()
        .is_none(),
        "etcd answered without TLS"
    );

    let tls = Registry {
        ca: Some(pki.ca.clone()),
        client: Some(pki.client.clone()),
        ..Registry::etcd(&url)
    };
    let (config, port) = setup.relay_config("relay-0", "relay-0", tls.clone());
    let _relay = setup.relay("relay-0", &config).await;
    let (_gateway, socks) = setup.gateway("gateway-0", tls).await;
    let (_agent, echo) = setup.agent(0, &[port]).await;
    let routed = |relay: &'static str| {
        let pki = &pki;
        let url = url.clone();
        async move {
            let mut client = tls_client(pki, &url).await?;
            let resp = client
                .get("/postern/routes/", Some(GetOptions::new().with_prefix()))
                .await
                .ok()?;
            let n = resp
                .kvs()
                .iter()
                .filter(|kv| {
                    kv.key_str()
                        .is_ok_and(|k| k.split('/').nth(5) == Some(relay))
                })
                .count();
            (n > 0).then_some(())
        }
    };
    wait_for(Duration::from_secs(30), "the relay's route in etcd", || {
        routed("relay-0")
    })
    .await;
    // The route is in etcd; the gateway's watch brings it to its cache a moment later (under a
    // loaded CI machine, later than the first transfer: all ten were once refused with 0x04).
    wait_for(
        Duration::from_secs(20),
        "the gateway to route to the agent",
        || async {
            (harness::transfer(socks, echo.addr, 4096, 99).await == Outcome::Ok).then_some(())
        },
    )
    .await;
    let mut outcomes = Vec::new();
    for i in 0..10 {
        outcomes.push(harness::transfer(socks, echo.addr, 64 * 1024, i).await);
    }
    assert!(
        outcomes.iter().all(|o| *o == Outcome::Ok),
        "transfers through TLS etcd: {outcomes:?}"
    );

    // Without a client certificate etcd refuses the relay; the relay says why and stays
    // unregistered (not ready, no record).
    let ca_only = Registry {
        ca: Some(pki.ca.clone()),
        ..Registry::etcd(&url)
    };
    let (config, _) = setup.relay_config("relay-nocert", "relay-nocert", ca_only);
    let mut nocert = Proc::spawn(
        "relay-nocert",
        BIN,
        &["relay", "--config", &p(&config)],
        &[],
        &setup.path("relay-nocert.log"),
    );
    let admin = ready_addr(&nocert.ready_line().await, "admin");
    let log_path = setup.path("relay-nocert.log");
    let refusal = wait_for(
        Duration::from_secs(20),
        "the refused relay to log why",
        || async {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            log.lines()
                .find(|l| l.contains("etcd refused this client's certificate or its absence"))
                .map(str::to_string)
        },
    )
    .await;
    eprintln!("relay without a client certificate: {refusal}");
    assert_eq!(admin_get(admin, "/readyz").await.0, 503);
    let mut client = tls_client(&pki, &url).await.unwrap();
    let record = client
        .get("/postern/relays/relay-nocert", None)
        .await
        .unwrap();
    assert!(record.kvs().is_empty(), "the refused relay registered");
    assert!(nocert.alive());
}

/// etcd with users (`auth enable`): a relay, a gateway and an agent signed in as a user whose
/// password comes from the environment work; a relay with a wrong password fails at start,
/// saying authentication failed, and its password appears in no log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_through_etcd_with_a_user_and_password() {
    const PASSWORD: &str = "etcd-test-secret-7d1c";
    let setup = Setup::new(95);
    let mut etcd = Etcd::started(setup.dir.path()).await;
    let mut admin = etcd_client::Client::connect([etcd.url.clone()], None)
        .await
        .unwrap();
    admin.user_add("root", PASSWORD, None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();
    // Without a user, etcd refuses now.
    assert!(admin.get("/postern/", None).await.is_err());

    let auth = Registry {
        user: Some(("root".into(), "env:POSTERN_ETCD_PASSWORD".into())),
        ..Registry::etcd(&etcd.url)
    };
    let (config, port) = setup.relay_config("relay-0", "relay-0", auth.clone());
    let mut relay = Proc::spawn(
        "relay-0",
        BIN,
        &["relay", "--config", &p(&config)],
        &[("POSTERN_ETCD_PASSWORD", PASSWORD)],
        &setup.path("relay-0.log"),
    );
    relay.ready_line().await;
    // The gateway reads the same password from a file.
    let password_file = setup.path("etcd-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let file_auth = Registry {
        user: Some(("root".into(), format!("file:{}", p(&password_file)))),
        ..Registry::etcd(&etcd.url)
    };
    let (_gateway, socks) = setup.gateway("gateway-0", file_auth).await;
    let (_agent, echo) = setup.agent(0, &[port]).await;
    wait_for(
        Duration::from_secs(30),
        "a transfer through an etcd with users",
        || async {
            (harness::transfer(socks, echo.addr, 16 * 1024, 0).await == Outcome::Ok).then_some(())
        },
    )
    .await;

    let auth_late = auth.clone();
    let (config, _) = setup.relay_config("relay-bad", "relay-bad", auth);
    let mut bad = Proc::spawn(
        "relay-bad",
        BIN,
        &["relay", "--config", &p(&config)],
        &[("POSTERN_ETCD_PASSWORD", "wrong-password")],
        &setup.path("relay-bad.log"),
    );
    let status = bad.wait_exit(Duration::from_secs(20)).await;
    assert!(!status.success());
    let log = std::fs::read_to_string(setup.path("relay-bad.log")).unwrap();
    eprintln!("relay with a wrong password: {}", log.trim());
    assert!(
        log.contains("authentication failed"),
        "no clear refusal: {log}"
    );
    assert!(relay.alive());

    // A relay (re)started while etcd is down starts anyway, not ready, and signs in once etcd
    // answers: failing at start would leave it crash-looping (and backing off) through an outage.
    etcd.stop().await;
    let (config, _) = setup.relay_config("relay-late", "relay-late", auth_late);
    let mut late = Proc::spawn(
        "relay-late",
        BIN,
        &["relay", "--config", &p(&config)],
        &[("POSTERN_ETCD_PASSWORD", PASSWORD)],
        &setup.path("relay-late.log"),
    );
    let late_admin = ready_addr(&late.ready_line().await, "admin");
    let late_log = setup.path("relay-late.log");
    wait_for(
        Duration::from_secs(20),
        "the relay started without etcd to say it signs in later",
        || async {
            let log = std::fs::read_to_string(&late_log).unwrap_or_default();
            log.contains("etcd unreachable; signing in once it answers")
                .then_some(())
        },
    )
    .await;
    assert!(late.alive(), "a relay started during an etcd outage exited");
    assert_eq!(admin_get(late_admin, "/readyz").await.0, 503);
    etcd.start().await;
    wait_readyz(
        late_admin,
        200,
        "the late relay registered once etcd is back",
        Duration::from_secs(30),
    )
    .await;
    let log = std::fs::read_to_string(&late_log).unwrap();
    assert!(log.contains("signed in to etcd"), "{log}");
    assert!(relay.alive() && late.alive());
    for entry in std::fs::read_dir(setup.dir.path()).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            assert!(
                !text.contains(PASSWORD) && !text.contains("wrong-password"),
                "a password in {}",
                entry.path().display()
            );
        }
    }
}
