//! A real cluster on loopback: an `etcd` process, relay / gateway / agent processes of the real
//! binary, and echo services behind the agents. Every process is killed when its guard drops.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use crate::process::*;

pub const TOKEN: &str = "cluster-test-token-0123456789";
/// Lease TTL the test relays use: short, so a dead relay's routes leave quickly.
pub const LEASE_TTL: Duration = Duration::from_secs(4);

/// What one transfer through the proxy ended as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The proxy refused or the connection broke: a failed connection.
    Failed(String),
    /// Bytes arrived, but not the ones sent, or from the wrong host: never acceptable.
    Corrupt(String),
}

/// Sends `size` pseudo-random bytes to the echo service at `target` through `proxy` and checks the
/// service's identity header and the echoed bytes (SHA-256 both ends).
pub async fn transfer(proxy: SocketAddr, target: SocketAddr, size: usize, seed: u64) -> Outcome {
    let work = async {
        let mut tcp = match socks_connect(proxy, None, target).await {
            Ok(t) => t,
            Err(code) => return Outcome::Failed(format!("socks reply {code:#04x}")),
        };
        let payload: Vec<u8> = (0..size as u64)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) as u8)
            .collect();
        let sent = ring::digest::digest(&ring::digest::SHA256, &payload);
        let (mut r, mut w) = tcp.split();
        let writer = async {
            w.write_all(&payload).await?;
            w.shutdown().await
        };
        let reader = async {
            let mut buf = Vec::with_capacity(size + 16);
            r.read_to_end(&mut buf).await.map(|_| buf)
        };
        let (wr, rd) = tokio::join!(writer, reader);
        let received = match (wr, rd) {
            (Ok(()), Ok(buf)) => buf,
            (Err(e), _) | (_, Err(e)) => return Outcome::Failed(format!("i/o: {e}")),
        };
        if received.len() < 16 {
            return Outcome::Failed(format!("short reply of {} bytes", received.len()));
        }
        let from = String::from_utf8_lossy(&received[..16]).trim().to_string();
        if from != target.ip().to_string() {
            return Outcome::Corrupt(format!("answered by {from}, expected {}", target.ip()));
        }
        let got = ring::digest::digest(&ring::digest::SHA256, &received[16..]);
        if got.as_ref() != sent.as_ref() {
            return Outcome::Corrupt(format!(
                "echo of {} bytes differs from the {size} sent",
                received.len() - 16
            ));
        }
        Outcome::Ok
    };
    tokio::time::timeout(Duration::from_secs(15), work)
        .await
        .unwrap_or(Outcome::Failed("timed out".into()))
}

/// One relay process slot: fixed ports so it can restart in place.
pub struct RelaySlot {
    pub id: String,
    pub port: u16,
    pub proc: Option<Proc>,
    config: PathBuf,
}

pub struct AgentSlot {
    pub id: String,
    pub ip: Ipv4Addr,
    pub echo: Echo,
    pub proc: Option<Proc>,
    config: PathBuf,
}

impl AgentSlot {
    pub fn target(&self) -> SocketAddr {
        self.echo.addr
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub etcd: Etcd,
    pub relays: Vec<RelaySlot>,
    pub gateways: Vec<(Proc, SocketAddr)>,
    pub agents: Vec<AgentSlot>,
    /// Second octet of this cluster's agent addresses (127.N.x.y), unique per test.
    net: u8,
    bundle: postern::cert::Bundle,
}

impl Cluster {
    /// Starts etcd, `relays` relays, `gateways` gateways and `agents` agents (redundancy 2) on
    /// addresses 127.`net`.0.x.
    pub async fn start(net: u8, relays: usize, gateways: usize, agents: usize) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("postern-cluster-")
            .tempdir()
            .unwrap();
        let bundle = postern::cert::generate_bundle(dir.path(), "postern-relay").unwrap();
        // As production etcd runs: TLS only, client certificates required.
        let etcd = Etcd::started_tls(dir.path()).await;
        let mut cluster = Cluster {
            dir,
            etcd,
            relays: Vec::new(),
            gateways: Vec::new(),
            agents: Vec::new(),
            net,
            bundle,
        };
        for i in 0..relays {
            cluster.add_relay(i).await;
        }
        for i in 0..gateways {
            cluster.add_gateway(i).await;
        }
        for i in 0..agents {
            cluster.add_agent(i).await;
        }
        cluster
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(path: &Path) -> String {
        path.to_str().unwrap().to_string()
    }

    async fn add_relay(&mut self, i: usize) {
        let id = format!("relay-{i}");
        let (port, peer_port) = (free_udp_port(), free_udp_port());
        let config = self.path(&format!("{id}.toml"));
        let b = &self.bundle;
        std::fs::write(
            &config,
            format!(
                r#"
[relay]
id = "{id}"
listen = "127.0.0.1:{port}"
cert = "{cert}"
key = "{key}"
peer_listen = "127.0.0.1:{peer_port}"
drain_grace = "5s"
[[relay.agents]]
name = "test"
token_sha256 = "{hash}"
allow = ["127.{net}.0.0/16"]
[peer]
ca = "{ca}"
[registry]
kind = "etcd"
endpoints = ["{etcd}"]
lease_ttl = "{ttl}s"
{etcd_tls}[admin]
listen = "127.0.0.1:0"
"#,
                cert = Self::p(&b.relay_cert),
                key = Self::p(&b.relay_key),
                hash = postern::config::token_hash(TOKEN),
                net = self.net,
                ca = Self::p(&b.ca),
                etcd = self.etcd.url,
                etcd_tls = self.etcd.registry_toml(),
                ttl = LEASE_TTL.as_secs(),
            ),
        )
        .unwrap();
        self.relays.push(RelaySlot {
            id,
            port,
            proc: None,
            config,
        });
        self.start_relay(i).await;
    }

    /// Starts relay `i` (again) on its ports.
    pub async fn start_relay(&mut self, i: usize) {
        let log = self.path(&format!("relay-{i}.log"));
        let slot = &mut self.relays[i];
        let mut proc = Proc::spawn(
            &slot.id,
            BIN,
            &["relay", "--config", &Self::p(&slot.config)],
            &[],
            &log,
        );
        proc.ready_line().await;
        slot.proc = Some(proc);
    }

    async fn add_gateway(&mut self, i: usize) {
        let config = self.path(&format!("gateway-{i}.toml"));
        let b = &self.bundle;
        std::fs::write(
            &config,
            format!(
                r#"
[gateway]
socks5 = "127.0.0.1:0"
[peer]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[registry]
kind = "etcd"
endpoints = ["{etcd}"]
{etcd_tls}[admin]
listen = "127.0.0.1:0"
"#,
                ca = Self::p(&b.ca),
                cert = Self::p(&b.peer_cert),
                key = Self::p(&b.peer_key),
                etcd = self.etcd.url,
                etcd_tls = self.etcd.registry_toml(),
            ),
        )
        .unwrap();
        let log = self.path(&format!("gateway-{i}.log"));
        let mut proc = Proc::spawn(
            &format!("gateway-{i}"),
            BIN,
            &["gateway", "--config", &Self::p(&config)],
            &[],
            &log,
        );
        let line = proc.ready_line().await;
        self.gateways.push((proc, ready_addr(&line, "socks5")));
    }

    /// Adds agent `i` at 127.net.0.(i+1) with its echo service.
    pub async fn add_agent(&mut self, i: usize) {
        let id = format!("agent-{i}");
        let ip = Ipv4Addr::new(127, self.net, 0, (i + 1) as u8);
        let echo = Echo::start(ip).await;
        let relays: Vec<String> = self
            .relays
            .iter()
            .map(|r| format!("\"127.0.0.1:{}\"", r.port))
            .collect();
        let config = self.path(&format!("{id}.toml"));
        // POSTERN_TEST_TUNNEL=tcp (or quic, auto) runs the agents on that tunnel transport.
        let tunnel = std::env::var("POSTERN_TEST_TUNNEL")
            .map(|mode| format!("tunnel = \"{mode}\"\n"))
            .unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                r#"{tunnel}
id = "{id}"
relays = [{relays}]
server_name = "postern-relay"
ca = "{ca}"
token = "env:POSTERN_TEST_TOKEN"
ips = ["{ip}"]
ports = ["{port}"]
redundancy = 2
reconnect_min = "100ms"
reconnect_max = "1s"
drain_grace = "3s"
[transport]
idle_timeout = "3s"
keep_alive = "500ms"
[admin]
listen = "127.0.0.1:0"
"#,
                relays = relays.join(", "),
                ca = Self::p(&self.bundle.ca),
                port = echo.addr.port(),
            ),
        )
        .unwrap();
        self.agents.push(AgentSlot {
            id,
            ip,
            echo,
            proc: None,
            config,
        });
        self.start_agent(i);
    }

    pub fn start_agent(&mut self, i: usize) {
        let log = self.path(&format!("agent-{i}.log"));
        let slot = &mut self.agents[i];
        slot.proc = Some(Proc::spawn(
            &slot.id,
            BIN,
            &["agent", "--config", &Self::p(&slot.config)],
            &[("POSTERN_TEST_TOKEN", TOKEN)],
            &log,
        ));
    }

    /// Waits until every agent has routes on `n` distinct relays (none of them in `excluding`).
    pub async fn wait_redundancy(&self, n: usize, excluding: &[&str], limit: Duration) {
        let ips: Vec<IpAddr> = self.agents.iter().map(|a| IpAddr::V4(a.ip)).collect();
        wait_for(
            limit,
            &format!("every agent on {n} distinct relays"),
            || async {
                let routes = self.etcd.routes().await;
                ips.iter()
                    .all(|ip| {
                        routes.get(ip).is_some_and(|relays| {
                            relays
                                .iter()
                                .filter(|r| !excluding.contains(&r.as_str()))
                                .count()
                                >= n
                        })
                    })
                    .then_some(())
            },
        )
        .await;
    }

    /// Prints every process log (for a failing test's output) and keeps a copy under
    /// `target/cluster-logs/` for a closer look.
    pub fn dump_logs(&self) {
        let keep = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/cluster-logs")
            .join(format!("net-{}", self.net));
        let _ = std::fs::create_dir_all(&keep);
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let _ = std::fs::write(keep.join(path.file_name().unwrap()), &text);
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("==== {} (last {} lines)", path.display(), tail.len());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// Continuous load: sequential transfers through `proxy`, rotating over `targets`, until stopped.
pub struct Load {
    stop: tokio_util::sync::CancellationToken,
    completed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<(Instant, Outcome)>>,
}

impl Load {
    pub fn start(proxy: SocketAddr, targets: Vec<SocketAddr>, size: usize) -> Load {
        let stop = tokio_util::sync::CancellationToken::new();
        let token = stop.clone();
        let completed = Arc::new(AtomicUsize::new(0));
        let counter = completed.clone();
        let task = tokio::spawn(async move {
            let mut results = Vec::new();
            let mut i = 0u64;
            // Bounded: at most 100k transfers, and the caller stops it.
            while !token.is_cancelled() && i < 100_000 {
                let target = targets[i as usize % targets.len()];
                let started = Instant::now();
                let outcome = transfer(proxy, target, size, i).await;
                results.push((started, outcome));
                counter.fetch_add(1, Ordering::SeqCst);
                i += 1;
                // Pacing: a steady stream of transfers, not a flood that would measure the machine.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            results
        });
        Load {
            stop,
            completed,
            task,
        }
    }

    /// Waits until `more` further transfers have completed (whatever their outcome).
    pub async fn wait_transfers(&self, more: usize) {
        let target = self.completed.load(Ordering::SeqCst) + more;
        wait_for(
            Duration::from_secs(30),
            &format!("{more} more transfers"),
            || async { (self.completed.load(Ordering::SeqCst) >= target).then_some(()) },
        )
        .await;
    }

    pub async fn finish(self) -> Vec<(Instant, Outcome)> {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

/// Summarises outcomes: (ok, failed, corrupt).
pub fn tally(results: &[(Instant, Outcome)]) -> (usize, usize, usize) {
    let mut counts = HashMap::new();
    for (_, o) in results {
        let k = match o {
            Outcome::Ok => 0,
            Outcome::Failed(_) => 1,
            Outcome::Corrupt(_) => 2,
        };
        *counts.entry(k).or_insert(0usize) += 1;
    }
    (
        counts.get(&0).copied().unwrap_or(0),
        counts.get(&1).copied().unwrap_or(0),
        counts.get(&2).copied().unwrap_or(0),
    )
}
