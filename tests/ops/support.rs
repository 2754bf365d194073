//! What the operability tests share: real `postern` processes (killed when their guard drops), a
//! real `etcd` on free loopback ports, echo services behind agents, a raw SOCKS5 client (with
//! username/password), a tiny HTTP client for the admin listener, and config writers. Everything
//! waits by polling a condition under a deadline; nothing sleeps for a fixed time to "let it settle".
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use crate::process::roles::*;
pub use crate::process::*;

pub const TOKEN: &str = "ops-test-agent-token-0123456789";
/// Upper bound for anything that should be quick on loopback.
pub const QUICK: Duration = Duration::from_secs(20);

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
        dump_logs(self.dir.path(), 30);
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

impl Proc {
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
}

/// A port on `ip` where nothing listens (bound once to pick it, then released).
pub fn closed_port(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
    echo_through_within(proxy, login, target, size, seed, QUICK).await
}

/// [`echo_through`] within `limit` instead of [`QUICK`].
pub async fn echo_through_within(
    proxy: SocketAddr,
    login: Option<(&str, &str)>,
    target: SocketAddr,
    size: usize,
    seed: u64,
    limit: Duration,
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
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err(format!("not done within {limit:?}")))
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

fn pki(w: &Workdir) -> Pki {
    Pki::from(&w.pki)
}

fn drain_grace(drain: &str) -> Option<Duration> {
    Some(humantime::parse_duration(drain).expect("a drain grace like \"5s\""))
}

/// The relay table these suites use: on `127.0.0.1:port` (0: any), the ops token allowed in
/// `127.net.0.0/16`, a peer endpoint on any port.
fn ops_relay(w: &Workdir, id: &str, port: u16, net: u8, drain: &str) -> Relay {
    let allow = format!("127.{net}.0.0/16");
    let mut relay = Relay::new(
        id,
        SocketAddr::from(([127, 0, 0, 1], port)),
        &pki(w),
        vec![Credential::new("ops", TOKEN, &[&allow])],
    );
    relay.peer_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    relay.drain_grace = drain_grace(drain);
    relay
}

/// A relay alone (etcd registry) on fixed ports so that agents can be pointed at it first, with a
/// lease TTL of 4 s (set `registry.lease_ttl = None` for the shipped one).
pub fn relay_role(w: &Workdir, id: &str, port: u16, etcd: &str, net: u8, drain: &str) -> RelayRole {
    let mut registry = Registry::etcd(etcd);
    registry.lease_ttl = Some(Duration::from_secs(4));
    let mut role = RelayRole::new(ops_relay(w, id, port, net, drain), &pki(w), registry);
    role.admin = Some("127.0.0.1:0".into());
    role
}

pub fn relay_toml(w: &Workdir, id: &str, port: u16, etcd: &str, net: u8, drain: &str) -> String {
    relay_role(w, id, port, etcd, net, drain).toml()
}

/// A `postern server` (relay + gateway) registered in etcd, its relay on `port` (0: any), agents
/// allowed in `127.net.0.0/16`, lease TTL 4 s.
pub fn server_etcd_toml(
    w: &Workdir,
    id: &str,
    port: u16,
    etcd: &str,
    net: u8,
    drain: &str,
) -> String {
    let mut registry = Registry::etcd(etcd);
    registry.lease_ttl = Some(Duration::from_secs(4));
    let mut role = ServerRole::clustered(ops_relay(w, id, port, net, drain), &pki(w), registry);
    role.gateway.drain_grace = drain_grace(drain);
    role.admin = Some("127.0.0.1:0".into());
    role.toml()
}

pub fn gateway_toml(w: &Workdir, etcd: &str, drain: &str) -> String {
    let mut role = GatewayRole::new(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        &pki(w),
        Registry::etcd(etcd),
    );
    role.gateway.drain_grace = drain_grace(drain);
    role.admin = Some("127.0.0.1:0".into());
    role.toml()
}

/// An agent with quick reconnects (100–500 ms) and a quick transport (idle 3 s, keep-alive
/// 500 ms); set them to `None` / clear `extra` for the shipped ones.
pub fn agent_role(
    w: &Workdir,
    id: &str,
    relays: &[SocketAddr],
    ip: Ipv4Addr,
    ports: &[u16],
    redundancy: u32,
    drain: &str,
) -> AgentRole {
    let mut role = AgentRole::new(
        id,
        relays,
        &pki(w),
        "POSTERN_TEST_TOKEN",
        IpAddr::V4(ip),
        ports,
    );
    role.redundancy = Some(redundancy);
    role.reconnect_min = Some(Duration::from_millis(100));
    role.reconnect_max = Some(Duration::from_millis(500));
    role.drain_grace = drain_grace(drain);
    role.admin = Some("127.0.0.1:0".into());
    role.extra = transport(&[
        ("idle_timeout", Duration::from_secs(3)),
        ("keep_alive", Duration::from_millis(500)),
    ]);
    role
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
    agent_role(w, id, relays, ip, ports, redundancy, drain).toml()
}

/// A `postern server` (memory registry, agents of `127.net.0.0/16`) with its HTTP proxy on as well,
/// logging JSON to `server.log`, and its `ready` line.
pub async fn server_with_http(w: &Workdir, net: u8) -> (Proc, String) {
    let text = server_toml(w, net, &[], "1s").replace(
        "socks5 = \"127.0.0.1:0\"",
        "socks5 = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"",
    );
    let config = w.write("server.toml", &text);
    Proc::postern(
        "server",
        "server",
        &config,
        &["--log-format", "json"],
        &w.path("server.log"),
    )
    .await
}

/// An agent `id` claiming `ip` and exposing `ports`, tunnelled to the server whose `ready` line
/// is `line`, once the server routes `ip` to it.
pub async fn routed_agent(w: &Workdir, line: &str, id: &str, ip: Ipv4Addr, ports: &[u16]) -> Proc {
    let config = w.write(
        "agent.toml",
        &agent_toml(w, id, &[ready_addr(line, "relay")], ip, ports, 1, "1s"),
    );
    let (agent, _) = Proc::postern("agent", "agent", &config, &[], &w.path("agent.log")).await;
    wait_route(ready_addr(line, "admin"), ip).await;
    agent
}

/// The value of header `name` (any case) in an HTTP head.
pub fn header(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
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
