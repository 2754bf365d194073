//! Shared harness for the integration tests: real roles on 127.0.0.0/8 with port 0, readiness by
//! polling a condition under a deadline (never a bare sleep), services that hash what they see, a
//! raw SOCKS5 client that exposes the exact reply byte, and guards that stop whatever a test started.
#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use ring::digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use postern::cert::Bundle;
use postern::config::{AgentConfig, ServerConfig, Transport};
use postern::protocol::{self, Hello, Message};
use postern::registry::cache::{Owner, RouteCache};
use postern::registry::memory::MemoryRegistry;
use postern::relay::Relay;
use postern::server::Server;
use postern::tls::{Identity, Trust};

pub use crate::kit::*;

pub fn ip4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    let ip = Ipv4Addr::new(a, b, c, d);
    assert!(ip.is_loopback(), "tests use 127.0.0.0/8 only, not {ip}");
    IpAddr::V4(ip)
}

// ---------------------------------------------------------------------------------------------
// Data: a deterministic byte stream and its SHA-256.

pub type Sha = [u8; 32];

pub fn sha(d: digest::Digest) -> Sha {
    d.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

pub fn hex(s: &Sha) -> String {
    postern::config::hex(s)
}

/// xorshift64*: cheap enough to make 64 MiB in a debug build, and a different stream per seed.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

pub fn pattern_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Pattern::new(seed).fill(&mut v);
    v
}

pub fn pattern_sha(seed: u64, len: usize) -> Sha {
    sha(digest::digest(&digest::SHA256, &pattern_bytes(seed, len)))
}

const CHUNK: usize = 64 * 1024;

/// Writes `len` bytes of `Pattern::new(seed)`, then shuts the write side; returns their SHA-256.
pub async fn send_pattern<W: AsyncWrite + Unpin>(
    w: &mut W,
    seed: u64,
    len: usize,
) -> io::Result<Sha> {
    let mut pattern = Pattern::new(seed);
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    // One fill per CHUNK bytes: consistent with `pattern_bytes` because CHUNK is a multiple of 8.
    while left > 0 {
        let n = left.min(CHUNK);
        pattern.fill(&mut buf[..n]);
        ctx.update(&buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n;
    }
    w.shutdown().await?;
    Ok(sha(ctx.finish()))
}

/// Reads to EOF; returns the byte count and SHA-256. Bounded by `max` bytes.
pub async fn read_sha<R: AsyncRead + Unpin>(r: &mut R, max: u64) -> io::Result<(u64, Sha)> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, sha(ctx.finish())));
        }
        total += n as u64;
        if total > max {
            return Err(io::Error::other(format!("read more than {max} bytes")));
        }
        ctx.update(&buf[..n]);
    }
}

/// Reads to EOF, at most `max` bytes.
pub async fn read_to_end<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
        if out.len() > max {
            return Err(io::Error::other(format!("read more than {max} bytes")));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates.

/// A fresh CA with a relay certificate (for `localhost`/127.0.0.1) in a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub bundle: Bundle,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("postern-test-")
            .tempdir()
            .expect("temp dir");
        let bundle =
            postern::cert::generate_bundle(dir.path(), "relay.test").expect("certificates");
        Pki { dir, bundle }
    }

    pub fn relay_identity(&self) -> Identity {
        Identity {
            chain: postern::tls::load_certs(&self.bundle.relay_cert).expect("relay cert"),
            key: postern::tls::load_key(&self.bundle.relay_key).expect("relay key"),
        }
    }

    pub fn trust(&self) -> Trust {
        Trust::Ca(postern::tls::load_certs(&self.bundle.ca).expect("CA cert"))
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------
// Server (relay + SOCKS5 gateway) in this process.

pub fn new_token() -> String {
    postern::config::hex(&rand::random::<[u8; 16]>())
}

/// What a test may change about its server. Configs are written as TOML and loaded through the
/// same conversion `postern server --config` uses.
pub struct ServerSpec {
    /// CIDR the server's one agent credential may claim.
    pub allow: String,
    /// The gateway's SOCKS5 handshake deadline, e.g. `"5s"`.
    pub handshake_timeout: String,
    /// SOCKS5 users (name, password); empty: no authentication.
    pub users: Vec<(String, String)>,
    /// Lines for the relay's `[relay.transport]` table, e.g. `idle_timeout = "2s"`.
    pub relay_transport: Vec<String>,
}

impl ServerSpec {
    pub fn new(allow: &str) -> Self {
        ServerSpec {
            allow: allow.into(),
            handshake_timeout: "5s".into(),
            users: Vec::new(),
            relay_transport: Vec::new(),
        }
    }

    fn toml(&self, pki: &Pki, relay_id: &str, token: &str) -> String {
        let mut text = format!(
            r#"[relay]
id = "{relay_id}"
listen = "127.0.0.1:0"
cert = "{cert}"
key = "{key}"
drain_grace = "1s"

[[relay.agents]]
name = "test"
token_sha256 = "{hash}"
allow = ["{allow}"]

[relay.transport]
{transport}

[gateway]
socks5 = "127.0.0.1:0"
handshake_timeout = "{handshake}"
"#,
            cert = pki.bundle.relay_cert.display(),
            key = pki.bundle.relay_key.display(),
            hash = postern::config::token_hash(token),
            allow = self.allow,
            transport = self.relay_transport.join("\n"),
            handshake = self.handshake_timeout,
        );
        for (name, password) in &self.users {
            text.push_str(&format!(
                "\n[[gateway.users]]\nname = \"{name}\"\npassword = \"{password}\"\n"
            ));
        }
        text
    }
}

/// A running server (relay + SOCKS5 gateway) on 127.0.0.1, relay UDP port 0 and SOCKS5 port 0,
/// with a memory registry the test can inspect or write to. Dropping it shuts it down.
pub struct TestServer {
    pub pki: Pki,
    pub token: String,
    pub relay_addr: SocketAddr,
    pub socks5: SocketAddr,
    pub relay: Arc<Relay>,
    pub cache: Arc<RouteCache>,
    pub registry: Arc<MemoryRegistry>,
    shutdown: CancellationToken,
    _task: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    pub async fn start(allow: &str) -> Self {
        Self::start_with(ServerSpec::new(allow)).await
    }

    pub async fn start_with(spec: ServerSpec) -> Self {
        let pki = Pki::new();
        let token = new_token();
        let relay_id = format!("relay-{}", postern::config::hex(&rand::random::<[u8; 4]>()));
        let path = pki.dir.path().join("server.toml");
        std::fs::write(&path, spec.toml(&pki, &relay_id, &token)).expect("write server.toml");
        let config = ServerConfig::load(&path).expect("server.toml converts");
        let registry = Arc::new(MemoryRegistry::new());
        let server = Server::bind_with_registry(config, registry.clone())
            .await
            .expect("server binds");
        let addrs = server.addresses();
        let relay = server.relay().expect("server has a relay").clone();
        let cache = server.cache().clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server.run(shutdown.clone()));
        let s = TestServer {
            pki,
            token,
            relay_addr: addrs.relay.expect("relay address"),
            socks5: addrs.socks5.expect("SOCKS5 listener"),
            relay,
            cache,
            registry,
            shutdown,
            _task: task,
        };
        let (relay, cache) = (s.relay.clone(), s.cache.clone());
        wait_until(READY, "relay registered and route cache loaded", || {
            relay.is_registered() && cache.is_ready()
        })
        .await;
        s
    }

    /// An agent for this server: its CA, token and endpoint, quick reconnects.
    pub fn agent_spec(&self, id: &str, ips: &[IpAddr], ports: &[u16]) -> AgentSpec {
        AgentSpec {
            relay: self.relay_addr,
            ca: self.pki.bundle.ca.clone(),
            token: self.token.clone(),
            id: id.into(),
            ips: ips.to_vec(),
            ports: ports.to_vec(),
            extra: String::new(),
        }
    }

    pub fn owners(&self, ip: IpAddr) -> Vec<Owner> {
        self.cache.owners("default", ip)
    }

    /// Waits until the gateway's route cache has a route for `ip`.
    pub async fn wait_routed(&self, ip: IpAddr) {
        let cache = self.cache.clone();
        wait_until(READY, &format!("route for {ip}"), || {
            !cache.owners("default", ip).is_empty()
        })
        .await;
    }

    /// Starts an in-process agent for this server and waits until its routes are visible.
    pub async fn start_agent(&self, id: &str, ips: &[IpAddr], ports: &[u16]) -> TestAgent {
        let mut agent = TestAgent::start(self.agent_spec(id, ips, ports).config());
        agent.wait_up().await;
        for ip in ips {
            self.wait_routed(*ip).await;
        }
        agent
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // Graceful: the relay closes its tunnels; the runtime ends whatever is left with the test.
        self.shutdown.cancel();
    }
}

/// An agent config, written as the TOML `postern agent --config` reads.
#[derive(Clone, Debug)]
pub struct AgentSpec {
    pub relay: SocketAddr,
    /// CA file the agent verifies the relay against.
    pub ca: PathBuf,
    /// The token, or a reference such as `env:VAR`.
    pub token: String,
    pub id: String,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<u16>,
    /// Appended verbatim (e.g. a `[transport]` table).
    pub extra: String,
}

impl AgentSpec {
    pub fn toml(&self) -> String {
        let list = |items: Vec<String>| {
            items
                .iter()
                .map(|i| format!("\"{i}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            r#"id = "{id}"
relays = ["{relay}"]
server_name = "localhost"
ca = "{ca}"
token = "{token}"
ips = [{ips}]
ports = [{ports}]
redundancy = 1
reconnect_min = "50ms"
reconnect_max = "500ms"
connect_timeout = "2s"
{extra}
"#,
            id = self.id,
            relay = self.relay,
            ca = self.ca.display(),
            token = self.token,
            ips = list(self.ips.iter().map(|i| i.to_string()).collect()),
            ports = list(self.ports.iter().map(|p| p.to_string()).collect()),
            extra = self.extra,
        )
    }

    /// The runtime config, through the same conversion the binary uses.
    pub fn config(&self) -> AgentConfig {
        let file = postern::config::parse_toml(&self.toml(), Path::new("agent.toml"))
            .expect("agent TOML parses");
        AgentConfig::from_file(file).expect("agent TOML converts")
    }
}

// ---------------------------------------------------------------------------------------------
// Services behind agents.

/// A TCP service on `ip:0` that counts the connections it accepted.
pub struct Service {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    _task: AbortOnDrop<()>,
}

impl Service {
    /// Binds `ip:0` and hands every accepted connection to `handle`.
    pub async fn spawn<F, Fut>(ip: IpAddr, handle: F) -> Self
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind((ip, 0)).await.expect("service binds");
        let addr = listener.local_addr().expect("service address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let handle = Arc::new(handle);
            loop {
                // A failing accept means the listener is unusable: stop rather than spin.
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handle(tcp));
            }
        });
        Service {
            addr,
            accepted,
            _task: AbortOnDrop(task),
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Asserts nothing but our own probe ever reached this listener (see [`assert_only_probe`]).
    pub async fn assert_never_dialled(&self, what: &str) {
        assert_only_probe(self.addr, &self.accepted, what).await;
    }
}

/// The body [`http_service`] answers with, naming the service so a test knows who replied.
pub fn http_body(addr: SocketAddr) -> String {
    format!("hello from the test service at {addr}\n")
}

pub fn http_response(addr: SocketAddr) -> Vec<u8> {
    let body = http_body(addr);
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A tiny HTTP/1.1 server: reads one request head, answers [`http_response`], closes.
pub async fn http_service(ip: IpAddr) -> Service {
    let response = Arc::new(std::sync::OnceLock::<Vec<u8>>::new());
    let r = response.clone();
    let service = Service::spawn(ip, move |mut tcp| {
        let r = r.clone();
        async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            if let Some(resp) = r.get() {
                let _ = tcp.write_all(resp).await;
            }
            let _ = tcp.shutdown().await;
        }
    })
    .await;
    response.set(http_response(service.addr)).expect("set once");
    service
}

/// What an echo connection saw, reported when it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EchoReport {
    pub bytes: u64,
    pub received: Sha,
    pub sent: Sha,
}

/// Echoes every byte back, hashing both directions independently; reports each finished connection.
pub async fn echo_service(ip: IpAddr) -> (Service, mpsc::UnboundedReceiver<EchoReport>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let service = Service::spawn(ip, move |tcp| {
        let tx = tx.clone();
        async move {
            let (mut r, mut w) = tcp.into_split();
            let mut received = digest::Context::new(&digest::SHA256);
            let mut sent = digest::Context::new(&digest::SHA256);
            let mut buf = vec![0u8; CHUNK];
            let mut bytes = 0u64;
            loop {
                let n = match r.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(_) => return,
                };
                received.update(&buf[..n]);
                if w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                sent.update(&buf[..n]);
                bytes += n as u64;
            }
            let _ = w.shutdown().await;
            let _ = tx.send(EchoReport {
                bytes,
                received: sha(received.finish()),
                sent: sha(sent.finish()),
            });
        }
    })
    .await;
    (service, rx)
}

/// Reads until EOF, then answers with the SHA-256 of what it read followed by `tail` bytes of
/// `Pattern::new(first 8 bytes of that SHA)`: the answer exists only once the client half-closed.
pub async fn digest_service(ip: IpAddr, tail: usize) -> Service {
    Service::spawn(ip, move |tcp| async move {
        let (mut r, mut w) = tcp.into_split();
        let Ok((_, got)) = read_sha(&mut r, u64::MAX).await else {
            return;
        };
        if w.write_all(&got).await.is_err() {
            return;
        }
        let seed = u64::from_le_bytes(got[..8].try_into().expect("8 bytes"));
        let _ = send_pattern(&mut w, seed, tail).await;
    })
    .await
}

/// A listener that must never see a connection: accepts and drops.
pub async fn counting_listener(ip: IpAddr) -> Service {
    Service::spawn(ip, |tcp| async move { drop(tcp) }).await
}

// ---------------------------------------------------------------------------------------------
// A raw SOCKS5 client (RFC 1928 / 1929), so tests see the exact bytes the gateway sends.

/// Connects to `proxy` and runs the SOCKS5 handshake and CONNECT to `dest`.
pub async fn socks5_connect(
    proxy: SocketAddr,
    dest: &Dest,
    auth: Auth<'_>,
) -> Result<TcpStream, SocksError> {
    let mut tcp = TcpStream::connect(proxy).await?;
    socks5_handshake(&mut tcp, dest, auth).await?;
    Ok(tcp)
}

/// The REP byte of a CONNECT the test expects to be refused.
pub async fn socks5_refusal(proxy: SocketAddr, dest: &Dest) -> u8 {
    match within(
        IO,
        "SOCKS5 connect",
        socks5_connect(proxy, dest, Auth::None),
    )
    .await
    {
        Err(SocksError::Reply(code)) => code,
        Ok(_) => panic!("CONNECT to {dest:?} succeeded; expected a refusal"),
        Err(e) => panic!("CONNECT to {dest:?} failed without a reply: {e:?}"),
    }
}

/// One HTTP/1.1 GET through the proxy; returns the raw response bytes.
pub async fn http_get(proxy: SocketAddr, dest: &Dest, auth: Auth<'_>) -> Vec<u8> {
    within(IO, "HTTP GET through SOCKS5", async {
        let mut tcp = socks5_connect(proxy, dest, auth)
            .await
            .unwrap_or_else(|e| panic!("SOCKS5 CONNECT to {dest:?}: {e:?}"));
        let host = match dest {
            Dest::Ip(a) => a.to_string(),
            Dest::Name(n, p) => format!("{n}:{p}"),
        };
        let request =
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: postern-test\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.expect("write request");
        read_to_end(&mut tcp, 1 << 20).await.expect("read response")
    })
    .await
}

/// Asserts that a GET through the proxy returns exactly `service`'s response.
pub async fn assert_reachable(proxy: SocketAddr, dest: &Dest, service: &Service) {
    let got = http_get(proxy, dest, Auth::None).await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&http_response(service.addr)),
        "response through SOCKS5 to {dest:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// A raw agent-side QUIC client: one Hello, and whatever the relay answers.

/// Dials `relay` trusting `trust`, sends `hello` on a control stream and returns the relay's answer.
pub async fn raw_hello(relay: SocketAddr, trust: &Trust, hello: Hello) -> anyhow::Result<Message> {
    let mut endpoint =
        postern::tls::bind_endpoint(SocketAddr::from(([127, 0, 0, 1], 0)), None, 1 << 20)?;
    endpoint.set_default_client_config(postern::tls::client_config(
        trust,
        protocol::ALPN_AGENT,
        None,
        Arc::new(Transport::default().quinn(16)),
    )?);
    let result = async {
        let connection = endpoint
            .connect(relay, "localhost")?
            .await
            .context("QUIC handshake")?;
        let (mut send, mut recv) = connection.open_bi().await?;
        protocol::write_message(&mut send, &Message::Hello(hello)).await?;
        let answer = protocol::read_message_timeout(&mut recv, IO).await?;
        connection.close(0u32.into(), b"test done");
        Ok(answer)
    };
    let answer = within(IO, "raw hello", result).await;
    endpoint.close(0u32.into(), b"test done");
    answer
}

// ---------------------------------------------------------------------------------------------
// Child processes of the real binary.

/// Owns a `postern` child process: killed (SIGKILL) when dropped; on a failing test its log is
/// printed.
pub struct ChildGuard {
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

impl ChildGuard {
    /// Spawns `postern args…` with stderr to `log` and stdout as `stdout` says.
    pub fn spawn(
        args: &[&str],
        envs: &[(&str, &str)],
        log: &Path,
        stdout: std::process::Stdio,
    ) -> Self {
        let log_file = std::fs::File::create(log).expect("log file");
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_postern"));
        cmd.args(args)
            .env("RUST_LOG", "postern=debug,info")
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .stderr(log_file)
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn postern");
        ChildGuard {
            child,
            log: log.to_path_buf(),
        }
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) {
        within(IO, "kill child", self.child.kill())
            .await
            .expect("kill child");
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            if let Ok(log) = std::fs::read_to_string(&self.log) {
                let tail: Vec<&str> = log.lines().rev().take(60).collect();
                eprintln!("--- last lines of {} ---", self.log.display());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A hand-written relay speaking the real protocol, to drive a real agent into corners a real relay
// never takes it (stale sessions, foreign targets, unanswered pings).

pub struct FakeRelay {
    pub pki: Pki,
    pub endpoint: quinn::Endpoint,
}

/// One agent tunnel accepted by a [`FakeRelay`].
pub struct FakeTunnel {
    pub connection: quinn::Connection,
    pub control: (quinn::SendStream, quinn::RecvStream),
    pub hello: Hello,
    pub session_id: u64,
}

impl FakeRelay {
    pub fn bind() -> Self {
        let pki = Pki::new();
        let server_config = postern::tls::server_config(
            pki.relay_identity(),
            &[protocol::ALPN_AGENT],
            None,
            Arc::new(Transport::default().quinn(4)),
        )
        .expect("relay TLS");
        let endpoint = postern::tls::bind_endpoint(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Some(server_config),
            1 << 20,
        )
        .expect("fake relay binds");
        FakeRelay { pki, endpoint }
    }

    /// An agent config pointing at this relay (the token is not checked here).
    pub fn agent_spec(&self, id: &str, ips: &[IpAddr], ports: &[u16]) -> AgentSpec {
        AgentSpec {
            relay: self.endpoint.local_addr().expect("fake relay address"),
            ca: self.pki.bundle.ca.clone(),
            token: "token-the-fake-relay-ignores".into(),
            id: id.into(),
            ips: ips.to_vec(),
            ports: ports.to_vec(),
            extra: String::new(),
        }
    }

    /// Accepts one agent, reads its Hello and welcomes it with `session_id`.
    pub async fn accept(&self, session_id: u64) -> FakeTunnel {
        within(IO, "fake relay accepts an agent", async {
            let incoming = self.endpoint.accept().await.expect("incoming");
            let connection = incoming.await.expect("handshake");
            let (mut send, mut recv) = connection.accept_bi().await.expect("control stream");
            let Message::Hello(hello) = protocol::read_message(&mut recv).await.expect("hello")
            else {
                panic!("expected hello");
            };
            let welcome = protocol::Welcome {
                relay_id: "fake-relay".into(),
                session_id,
                live_relays: 1,
            };
            protocol::write_message(&mut send, &Message::Welcome(welcome))
                .await
                .expect("welcome");
            FakeTunnel {
                connection,
                control: (send, recv),
                hello,
                session_id,
            }
        })
        .await
    }
}

impl FakeTunnel {
    /// Opens a stream asking the agent for `target` under `session_id`; returns its verdict and
    /// the stream.
    pub async fn open(
        &self,
        target: SocketAddr,
        session_id: u64,
    ) -> (protocol::Code, quinn::SendStream, quinn::RecvStream) {
        within(IO, "open on the fake tunnel", async {
            let (mut send, mut recv) = self.connection.open_bi().await.expect("open stream");
            let open = protocol::Open { target, session_id };
            protocol::write_message(&mut send, &Message::Open(open))
                .await
                .expect("write open");
            match protocol::read_message(&mut recv).await {
                Ok(Message::OpenResult(r)) => (r.code, send, recv),
                other => panic!("expected OpenResult, got {other:?}"),
            }
        })
        .await
    }
}
