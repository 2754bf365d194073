//! A real cluster on loopback: an `etcd` process, relay / gateway / agent processes of the real
//! binary, and echo services behind the agents. Every process is killed when its guard drops.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_postern");
pub const TOKEN: &str = "cluster-test-token-0123456789";
/// Lease TTL the test relays use: short, so a dead relay's routes leave quickly.
pub const LEASE_TTL: Duration = Duration::from_secs(4);

/// Polls `check` every 50 ms until it returns `Some`, or panics with `what` after `limit`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process that dies with its guard.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// Starts `args` with stdout piped (for the `ready` line) and stderr to `log`.
    pub fn spawn(
        name: &str,
        program: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Proc {
            child,
            name: name.to_string(),
        }
    }

    /// Reads the `ready …` line a relay/gateway prints once bound.
    pub async fn ready_line(&mut self) -> String {
        let stdout = self.child.stdout.take().expect("stdout piped");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{} printed no ready line within 20s", self.name))
            .unwrap()
            .unwrap_or_else(|| panic!("{} exited before it was ready", self.name));
        assert!(
            line.starts_with("ready "),
            "{}: unexpected first line {line:?}",
            self.name
        );
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        line
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; panics after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {limit:?}", self.name))
            .unwrap()
    }
}

/// The address a `ready relay=… peer=… socks5=…` line gives for `key`.
pub fn ready_addr(line: &str, key: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|part| part.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} address in {line:?}"))
}

/// A real etcd on free loopback ports with a temp data dir.
pub struct Etcd {
    pub url: String,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    proc: Option<Proc>,
    log: PathBuf,
}

impl Etcd {
    pub async fn start(dir: &Path) -> Etcd {
        let mut etcd = Etcd {
            url: String::new(),
            dir: dir.join("etcd-data"),
            client_port: free_tcp_port(),
            peer_port: free_tcp_port(),
            proc: None,
            log: dir.join("etcd.log"),
        };
        etcd.url = format!("http://127.0.0.1:{}", etcd.client_port);
        etcd.resume().await;
        etcd
    }

    /// Starts (again) on the same ports and data dir, and waits until it answers.
    pub async fn resume(&mut self) {
        assert!(
            std::process::Command::new("etcd")
                .arg("--version")
                .output()
                .is_ok(),
            "the `etcd` binary is missing: install Debian's etcd-server (scripts/test does)"
        );
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let args = [
            "--name",
            "test",
            "--data-dir",
            self.dir.to_str().unwrap(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("test={peer}"),
        ];
        self.proc = Some(Proc::spawn("etcd", "etcd", &args, &[], &self.log));
        let url = self.url.clone();
        wait_for(Duration::from_secs(20), "etcd to answer", || {
            let url = url.clone();
            async move {
                let mut c = etcd_client::Client::connect([url], None).await.ok()?;
                c.get("probe", None).await.ok().map(|_| ())
            }
        })
        .await;
    }

    pub async fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.child.kill().await.unwrap();
        }
    }

    /// Every route in etcd: agent IP → relays holding a route for it.
    pub async fn routes(&self) -> BTreeMap<IpAddr, BTreeSet<String>> {
        let mut client = etcd_client::Client::connect([self.url.clone()], None)
            .await
            .unwrap();
        let resp = client
            .get(
                "/postern/routes/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        let mut out: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
        for kv in resp.kvs() {
            let key = kv.key_str().unwrap();
            let parts: Vec<&str> = key
                .trim_start_matches("/postern/routes/")
                .split('/')
                .collect();
            assert_eq!(parts.len(), 4, "route key {key}");
            out.entry(parts[1].parse().unwrap())
                .or_default()
                .insert(parts[2].to_string());
        }
        out
    }
}

/// A TCP service behind an agent: writes its own IP (16 bytes, space padded) then echoes.
pub struct Echo {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
}

impl Echo {
    pub async fn start(ip: Ipv4Addr) -> Echo {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let header = format!("{:<16}", ip.to_string());
                    if tcp.write_all(header.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Echo { addr, accepted }
    }
}

/// Connects through a SOCKS5 proxy (no auth) to an IPv4 target; returns the stream or the reply code.
pub async fn socks_connect(proxy: SocketAddr, target: SocketAddr) -> Result<TcpStream, u8> {
    let mut tcp = TcpStream::connect(proxy).await.map_err(|_| 0xff)?;
    tcp.write_all(&[5, 1, 0]).await.map_err(|_| 0xff)?;
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice).await.map_err(|_| 0xff)?;
    assert_eq!(choice, [5, 0]);
    let SocketAddr::V4(v4) = target else {
        panic!("IPv4 targets only")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.ip().octets());
    req.extend_from_slice(&v4.port().to_be_bytes());
    tcp.write_all(&req).await.map_err(|_| 0xff)?;
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply).await.map_err(|_| 0xff)?;
    if reply[1] != 0 {
        return Err(reply[1]);
    }
    Ok(tcp)
}

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
        let mut tcp = match socks_connect(proxy, target).await {
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
        let etcd = Etcd::start(dir.path()).await;
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
[admin]
listen = "127.0.0.1:0"
"#,
                cert = Self::p(&b.relay_cert),
                key = Self::p(&b.relay_key),
                hash = postern::config::token_hash(TOKEN),
                net = self.net,
                ca = Self::p(&b.ca),
                etcd = self.etcd.url,
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
[admin]
listen = "127.0.0.1:0"
"#,
                ca = Self::p(&b.ca),
                cert = Self::p(&b.peer_cert),
                key = Self::p(&b.peer_key),
                etcd = self.etcd.url,
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
        std::fs::write(
            &config,
            format!(
                r#"
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
