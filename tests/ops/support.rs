//! What the operability tests share: real `postern` processes (killed when their guard drops), a
//! real `etcd` on free loopback ports, echo services behind agents, a raw SOCKS5 client (with
//! username/password), a tiny HTTP client for the admin listener, and config writers. Everything
//! waits by polling a condition under a deadline; nothing sleeps for a fixed time to "let it settle".
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_postern");
pub const TOKEN: &str = "ops-test-agent-token-0123456789";
/// Upper bound for anything that should be quick on loopback.
pub const QUICK: Duration = Duration::from_secs(20);

/// Polls `check` every 25 ms until it returns `Some`, or panics naming `what` after `limit`.
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
        tokio::time::sleep(Duration::from_millis(25)).await;
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

/// A per-test temp dir with a certificate bundle (relay name `postern-relay`).
pub struct Workdir {
    pub dir: tempfile::TempDir,
    pub pki: postern::cert::Bundle,
}

impl Workdir {
    pub fn new(prefix: &str) -> Workdir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("postern-ops-{prefix}-"))
            .tempdir()
            .unwrap();
        let pki = postern::cert::generate_bundle(dir.path(), "postern-relay").unwrap();
        Workdir { dir, pki }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// The text of a log file (empty if it does not exist yet).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// Prints the tail of every `*.log` (call before a failing assertion).
    pub fn dump_logs(&self) {
        let Ok(entries) = std::fs::read_dir(self.dir.path()) else {
            return;
        };
        for entry in entries.flatten() {
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

impl Drop for Workdir {
    /// A failing test shows what its processes logged.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
    }
}

fn p(path: &Path) -> String {
    path.to_str().unwrap().to_string()
}

/// A child process that dies with its guard.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// Starts `program args` with stdout piped (for the `ready` line) and stderr appended to `log`.
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

    /// Starts a `postern` role with `--config` and reads its `ready …` line.
    pub async fn postern(
        name: &str,
        role: &str,
        config: &Path,
        extra: &[&str],
        log: &Path,
    ) -> (Proc, String) {
        let mut args: Vec<&str> = extra.to_vec();
        let config = p(config);
        args.extend([role, "--config", &config]);
        let mut proc = Proc::spawn(name, BIN, &args, &[("POSTERN_TEST_TOKEN", TOKEN)], log);
        let line = proc.ready_line().await;
        (proc, line)
    }

    /// Reads the first stdout line, which must start with `starts_with`; keeps draining the rest.
    pub async fn first_line(&mut self, starts_with: &str) -> String {
        let stdout = self.child.stdout.take().expect("stdout piped");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(QUICK, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{} printed nothing within {QUICK:?}", self.name))
            .unwrap()
            .unwrap_or_else(|| panic!("{} exited before printing anything", self.name));
        assert!(
            line.starts_with(starts_with),
            "{}: unexpected first line {line:?}",
            self.name
        );
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        line
    }

    /// Reads the `ready …` line every role prints once bound.
    pub async fn ready_line(&mut self) -> String {
        self.first_line("ready ").await
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit; panics after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {limit:?}", self.name))
            .unwrap()
    }
}

/// The address a `ready relay=… peer=… socks5=… http=… admin=…` line gives for `key`.
pub fn ready_addr(line: &str, key: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|part| part.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} address in {line:?}"))
}

/// A real etcd on free loopback ports with a temp data dir; it may be planned (ports chosen)
/// before it is started, so that processes can be pointed at it while it is still down.
pub struct Etcd {
    pub url: String,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    proc: Option<Proc>,
    log: PathBuf,
}

impl Etcd {
    /// Chooses the ports; nothing listens on them until [`Etcd::start`].
    pub fn planned(dir: &Path) -> Etcd {
        let client_port = free_tcp_port();
        Etcd {
            url: format!("http://127.0.0.1:{client_port}"),
            dir: dir.join("etcd-data"),
            client_port,
            peer_port: free_tcp_port(),
            proc: None,
            log: dir.join("etcd.log"),
        }
    }

    pub async fn started(dir: &Path) -> Etcd {
        let mut etcd = Etcd::planned(dir);
        etcd.start().await;
        etcd
    }

    /// Starts etcd and waits until it answers. Fails (never skips) when `etcd` is missing.
    pub async fn start(&mut self) {
        assert!(
            std::process::Command::new("etcd")
                .arg("--version")
                .output()
                .is_ok(),
            "the `etcd` binary is missing: install Debian's etcd-server (scripts/deps does)"
        );
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let args = [
            "--name",
            "ops",
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
            &format!("ops={peer}"),
        ];
        self.proc = Some(Proc::spawn("etcd", "etcd", &args, &[], &self.log));
        let url = self.url.clone();
        wait_for(QUICK, "etcd to answer", || {
            let url = url.clone();
            async move {
                let mut c = etcd_client::Client::connect([url], None).await.ok()?;
                c.get("probe", None).await.ok().map(|_| ())
            }
        })
        .await;
    }

    /// Every route key under `/postern/routes/`: (namespace, ip, relay, session).
    pub async fn route_keys(&self) -> BTreeSet<(String, IpAddr, String, u64)> {
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
        resp.kvs()
            .iter()
            .map(|kv| {
                let key = kv.key_str().unwrap();
                let parts: Vec<&str> = key
                    .trim_start_matches("/postern/routes/")
                    .split('/')
                    .collect();
                assert_eq!(parts.len(), 4, "route key {key}");
                (
                    parts[0].to_string(),
                    parts[1].parse().unwrap(),
                    parts[2].to_string(),
                    parts[3].parse().unwrap(),
                )
            })
            .collect()
    }

    /// Agent IP → relays holding a route for it.
    pub async fn routes(&self) -> BTreeMap<IpAddr, BTreeSet<String>> {
        let mut out: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
        for (_, ip, relay, _) in self.route_keys().await {
            out.entry(ip).or_default().insert(relay);
        }
        out
    }
}

/// A TCP service behind an agent: writes a 16-byte header (its IP, space padded), then echoes
/// until the client half-closes.
pub struct Echo {
    pub addr: SocketAddr,
}

pub const ECHO_HEADER: usize = 16;

impl Echo {
    pub async fn start(ip: Ipv4Addr) -> Echo {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
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
        Echo { addr }
    }
}

/// A port on `ip` where nothing listens (bound once to pick it, then released).
pub fn closed_port(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Connects through a SOCKS5 proxy to an IPv4 target, with username/password when `login` is
/// given. Returns the stream, or the SOCKS5 reply code (`0xf1` = authentication refused, `0xff` =
/// the proxy broke the connection).
pub async fn socks_connect(
    proxy: SocketAddr,
    login: Option<(&str, &str)>,
    target: SocketAddr,
) -> Result<TcpStream, u8> {
    let mut tcp = TcpStream::connect(proxy).await.map_err(|_| 0xff)?;
    let method = if login.is_some() { 2 } else { 0 };
    tcp.write_all(&[5, 1, method]).await.map_err(|_| 0xff)?;
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice).await.map_err(|_| 0xff)?;
    if choice != [5, method] {
        return Err(0xf1);
    }
    if let Some((user, password)) = login {
        let mut auth = vec![1, user.len() as u8];
        auth.extend_from_slice(user.as_bytes());
        auth.push(password.len() as u8);
        auth.extend_from_slice(password.as_bytes());
        tcp.write_all(&auth).await.map_err(|_| 0xff)?;
        let mut status = [0u8; 2];
        tcp.read_exact(&mut status).await.map_err(|_| 0xf1)?;
        if status[1] != 0 {
            return Err(0xf1);
        }
    }
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

/// Deterministic pseudo-random bytes.
pub fn payload(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// Sends `size` bytes to the echo service at `target` through `proxy` and checks the header and
/// the echo byte for byte. Returns (bytes sent, bytes received including the header).
pub async fn echo_through(
    proxy: SocketAddr,
    login: Option<(&str, &str)>,
    target: SocketAddr,
    size: usize,
    seed: u64,
) -> Result<(usize, usize), String> {
    let work = async {
        let mut tcp = socks_connect(proxy, login, target)
            .await
            .map_err(|code| format!("socks reply {code:#04x}"))?;
        let data = payload(size, seed);
        let (mut r, mut w) = tcp.split();
        let writer = async {
            w.write_all(&data).await?;
            w.shutdown().await
        };
        let reader = async {
            let mut buf = Vec::with_capacity(size + ECHO_HEADER);
            r.read_to_end(&mut buf).await.map(|_| buf)
        };
        let (wr, rd) = tokio::join!(writer, reader);
        wr.map_err(|e| format!("write: {e}"))?;
        let got = rd.map_err(|e| format!("read: {e}"))?;
        if got.len() < ECHO_HEADER {
            return Err(format!("short reply of {} bytes", got.len()));
        }
        let from = String::from_utf8_lossy(&got[..ECHO_HEADER])
            .trim()
            .to_string();
        if from != target.ip().to_string() {
            return Err(format!("answered by {from}, expected {}", target.ip()));
        }
        if sha256(&got[ECHO_HEADER..]) != sha256(&data) {
            return Err(format!(
                "echo of {} bytes differs from the {size} sent",
                got.len() - ECHO_HEADER
            ));
        }
        Ok((size, got.len()))
    };
    tokio::time::timeout(QUICK, work)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// One GET against an admin listener: (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let work = async {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).to_string();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| std::io::Error::other(format!("no header end in {text:?}")))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
        Ok((status, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("admin request timed out")))
}

/// `/readyz` status code, or `None` when the listener does not answer.
pub async fn readyz(admin: SocketAddr) -> Option<(u16, String)> {
    http_get(admin, "/readyz").await.ok()
}

/// Waits until `/readyz` answers `want` (200 or 503); returns the body.
pub async fn wait_readyz(admin: SocketAddr, want: u16, what: &str) -> String {
    wait_for(QUICK, &format!("{what} /readyz {want}"), || async {
        readyz(admin)
            .await
            .filter(|(code, _)| *code == want)
            .map(|(_, body)| body)
    })
    .await
}

/// Waits until the admin listener at `admin` knows a route for `ip`.
pub async fn wait_route(admin: SocketAddr, ip: Ipv4Addr) {
    wait_for(QUICK, &format!("a route for {ip} at {admin}"), || async {
        let (code, body) = http_get(admin, &format!("/api/routes?ip={ip}"))
            .await
            .ok()?;
        (code == 200 && body.contains("relay_id")).then_some(())
    })
    .await
}

/// Sample values of `/metrics`: `name{labels}` (labels as printed) → value.
pub fn parse_samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Runs `promtool check metrics` on `text`: Ok, or promtool's complaint. Panics (the test fails,
/// it does not skip) when promtool is missing.
pub fn promtool_check(text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool is missing ({e}): install Debian's `prometheus` package \
                 (scripts/deps does)"
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Configs.

/// A `postern server` on loopback with the memory registry, agents allowed in `127.net.0.0/16`.
pub fn server_toml(w: &Workdir, net: u8, users: &[(&str, &str)], drain: &str) -> String {
    let mut text = format!(
        r#"
[relay]
id = "relay-ops"
listen = "127.0.0.1:0"
cert = "{cert}"
key = "{key}"
drain_grace = "{drain}"
[[relay.agents]]
name = "ops"
token_sha256 = "{hash}"
allow = ["127.{net}.0.0/16"]
[gateway]
socks5 = "127.0.0.1:0"
drain_grace = "{drain}"
[admin]
listen = "127.0.0.1:0"
"#,
        cert = p(&w.pki.relay_cert),
        key = p(&w.pki.relay_key),
        hash = postern::config::token_hash(TOKEN),
    );
    for (name, password) in users {
        text.push_str(&format!(
            "[[gateway.users]]\nname = \"{name}\"\npassword = \"{password}\"\n"
        ));
    }
    text
}

/// A relay alone (etcd registry) on fixed ports so that agents can be pointed at it first.
pub fn relay_toml(w: &Workdir, id: &str, port: u16, etcd: &str, net: u8, drain: &str) -> String {
    format!(
        r#"
[relay]
id = "{id}"
listen = "127.0.0.1:{port}"
cert = "{cert}"
key = "{key}"
peer_listen = "127.0.0.1:0"
drain_grace = "{drain}"
[[relay.agents]]
name = "ops"
token_sha256 = "{hash}"
allow = ["127.{net}.0.0/16"]
[peer]
ca = "{ca}"
[registry]
kind = "etcd"
endpoints = ["{etcd}"]
lease_ttl = "4s"
[admin]
listen = "127.0.0.1:0"
"#,
        cert = p(&w.pki.relay_cert),
        key = p(&w.pki.relay_key),
        hash = postern::config::token_hash(TOKEN),
        ca = p(&w.pki.ca),
    )
}

pub fn gateway_toml(w: &Workdir, etcd: &str, drain: &str) -> String {
    format!(
        r#"
[gateway]
socks5 = "127.0.0.1:0"
drain_grace = "{drain}"
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
        ca = p(&w.pki.ca),
        cert = p(&w.pki.peer_cert),
        key = p(&w.pki.peer_key),
    )
}

pub fn agent_toml(
    w: &Workdir,
    id: &str,
    relays: &[SocketAddr],
    ip: Ipv4Addr,
    ports: &[u16],
    redundancy: u32,
    drain: &str,
) -> String {
    let relays: Vec<String> = relays.iter().map(|r| format!("\"{r}\"")).collect();
    let ports: Vec<String> = ports.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        r#"
id = "{id}"
relays = [{relays}]
server_name = "postern-relay"
ca = "{ca}"
token = "env:POSTERN_TEST_TOKEN"
ips = ["{ip}"]
ports = [{ports}]
redundancy = {redundancy}
reconnect_min = "100ms"
reconnect_max = "500ms"
drain_grace = "{drain}"
[transport]
idle_timeout = "3s"
keep_alive = "500ms"
[admin]
listen = "127.0.0.1:0"
"#,
        relays = relays.join(", "),
        ca = p(&w.pki.ca),
        ports = ports.join(", "),
    )
}

/// A server (memory registry) with one agent and its echo service at `127.net.0.1`: the usual
/// single-process deployment, up and routed.
pub struct Single {
    pub server: Proc,
    pub agent: Proc,
    pub socks5: SocketAddr,
    pub admin: SocketAddr,
    pub agent_admin: SocketAddr,
    pub echo: Echo,
    /// An exposed port on the agent's address where nothing listens.
    pub refused: SocketAddr,
    pub config: PathBuf,
}

impl Single {
    pub async fn start(
        w: &Workdir,
        net: u8,
        users: &[(&str, &str)],
        server_args: &[&str],
    ) -> Single {
        let ip = Ipv4Addr::new(127, net, 0, 1);
        let config = w.write("server.toml", &server_toml(w, net, users, "5s"));
        let (server, line) = Proc::postern(
            "server",
            "server",
            &config,
            server_args,
            &w.path("server.log"),
        )
        .await;
        let relay = ready_addr(&line, "relay");
        let echo = Echo::start(ip).await;
        let refused_port = closed_port(ip);
        let agent_config = w.write(
            "agent.toml",
            &agent_toml(
                w,
                "agent-ops",
                &[relay],
                ip,
                &[echo.addr.port(), refused_port],
                1,
                "5s",
            ),
        );
        let (agent, agent_line) =
            Proc::postern("agent", "agent", &agent_config, &[], &w.path("agent.log")).await;
        let admin = ready_addr(&line, "admin");
        let single = Single {
            server,
            agent,
            socks5: ready_addr(&line, "socks5"),
            admin,
            agent_admin: ready_addr(&agent_line, "admin"),
            echo,
            refused: SocketAddr::from((ip, refused_port)),
            config,
        };
        wait_route(admin, ip).await;
        single
    }
}
