//! Helpers for the security tests: in-process roles on one memory registry (a relay + gateway
//! `Server`, agents in tasks), services that count every connection and byte they see, and raw
//! SOCKS5 / HTTP/1.1 clients that expose the exact reply byte or status line the gateway sent.
//! Everything listens on 127.0.0.0/8 with port 0; readiness is polled under a deadline.
#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use ipnet::IpNet;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

use postern::admin::AdminState;
use postern::cert::{Bundle, Kind};
use postern::config::{
    AgentConfig, AgentCredential, GatewayConfig, RegistryConfig, RelayConfig, ServerConfig,
    Transport,
};
use postern::protocol::{self, Hello, Message, PortRange};
use postern::registry::cache::{Owner, RouteCache};
use postern::registry::memory::MemoryRegistry;
use postern::registry::{Registry, Route};
use postern::relay::Relay;
use postern::server::Server;
use postern::tls::{Identity, Trust};

pub use crate::kit::*;

/// `127.net.c.d`: each test owns one `net`, so parallel tests never share an address.
pub fn ip(net: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, net, c, d)
}

pub fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// Deterministic bytes (xorshift64*), a different stream per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn sha_hex(bytes: &[u8]) -> String {
    postern::config::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Opens a TCP connection from a chosen loopback source address (per-client limits and the
/// "who dialled this" checks key on it).
pub async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(sa(from, 0))?;
    socket.connect(to).await
}

// ---------------------------------------------------------------------------------------------
// Certificates.

/// A fresh CA with relay and peer certificates, and the means to issue more.
pub struct Pki {
    _dir: tempfile::TempDir,
    pub bundle: Bundle,
    ca_pem: String,
    ca_key_pem: String,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("postern-security-")
            .tempdir()
            .expect("temp dir");
        let bundle = postern::cert::generate_bundle(dir.path(), "postern-relay").expect("bundle");
        let ca_pem = std::fs::read_to_string(&bundle.ca).expect("ca.pem");
        let ca_key_pem = std::fs::read_to_string(&bundle.ca_key).expect("ca-key.pem");
        Pki {
            _dir: dir,
            bundle,
            ca_pem,
            ca_key_pem,
        }
    }

    pub fn ca(&self) -> Vec<CertificateDer<'static>> {
        postern::tls::load_certs(&self.bundle.ca).expect("ca")
    }

    pub fn trust(&self) -> Trust {
        Trust::Ca(self.ca())
    }

    pub fn relay_identity(&self) -> Identity {
        Identity {
            chain: postern::tls::load_certs(&self.bundle.relay_cert).expect("relay cert"),
            key: postern::tls::load_key(&self.bundle.relay_key).expect("relay key"),
        }
    }

    pub fn peer_identity(&self) -> Identity {
        Identity {
            chain: postern::tls::load_certs(&self.bundle.peer_cert).expect("peer cert"),
            key: postern::tls::load_key(&self.bundle.peer_key).expect("peer key"),
        }
    }

    /// A leaf signed by this CA; for [`Kind::Agent`], `ips` are what it may claim.
    pub fn issue(&self, kind: Kind, name: &str, ips: &[IpAddr]) -> Identity {
        let (cert, key) =
            postern::cert::issue(&self.ca_pem, &self.ca_key_pem, kind, name, &[], ips, 30)
                .expect("issue certificate");
        Identity {
            chain: postern::tls::parse_certs_pem(cert.as_bytes()).expect("cert pem"),
            key: postern::tls::parse_key_pem(key.as_bytes()).expect("key pem"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A server (relay + both gateway front doors) and its agents, in this process.

/// One `postern server` on `127.net.sub.1` (relay, UDP) and `127.net.sub.2` (SOCKS5, HTTP and the
/// admin listener), with its own memory registry. Stops when dropped.
pub struct Stack {
    pub net: u8,
    pub token: String,
    pub trust: Trust,
    pub relay_addr: SocketAddr,
    pub socks: SocketAddr,
    pub http: SocketAddr,
    /// The admin listener (`/healthz`, `/api/…`, `/metrics`).
    pub admin: SocketAddr,
    pub relay: Arc<Relay>,
    pub cache: Arc<RouteCache>,
    pub registry: Arc<MemoryRegistry>,
    shutdown: CancellationToken,
    _task: AbortOnDrop<anyhow::Result<()>>,
    _admin_task: AbortOnDrop<()>,
}

impl Stack {
    /// Starts a server whose token credential may claim `127.net.0.0/16`. `gateway` supplies the
    /// access settings (its listen addresses are replaced); `relay` may adjust the relay config.
    pub async fn start(
        pki: &Pki,
        net: u8,
        sub: u8,
        gateway: GatewayConfig,
        relay: impl FnOnce(&mut RelayConfig),
    ) -> Stack {
        let token = postern::config::hex(&rand::random::<[u8; 16]>());
        let allow: IpNet = format!("127.{net}.0.0/16").parse().expect("cidr");
        let mut relay_config = RelayConfig {
            drain_grace: Duration::from_secs(1),
            ..RelayConfig::new(
                &format!("relay-{net}-{sub}"),
                sa(ip(net, sub, 1), 0),
                pki.relay_identity(),
                vec![AgentCredential::new("agents", &token, vec![allow])],
            )
        };
        relay(&mut relay_config);
        let door = sa(ip(net, sub, 2), 0);
        let config = ServerConfig {
            relay: relay_config,
            gateway: GatewayConfig {
                socks5: Some(door),
                http: Some(door),
                drain_grace: Duration::from_secs(1),
                ..gateway
            },
            peer: None,
            registry: RegistryConfig::Memory,
            // Bound below, in this process, as `postern server` would.
            admin: None,
        };
        let registry = Arc::new(MemoryRegistry::new());
        let server = Server::bind_with_registry(config, registry.clone() as Arc<dyn Registry>)
            .await
            .expect("server binds");
        let addrs = server.addresses();
        let relay = server.relay().expect("server has a relay").clone();
        let cache = server.cache().clone();
        let shutdown = CancellationToken::new();
        let admin_listener = postern::admin::bind(door).await.expect("admin binds");
        let admin = admin_listener.local_addr().expect("admin address");
        let admin_task = tokio::spawn(postern::admin::serve(
            admin_listener,
            AdminState {
                role: "server",
                process: Some(server.handle()),
                agent: None,
                shutdown: shutdown.clone(),
            },
            shutdown.clone(),
        ));
        let task = tokio::spawn(server.run(shutdown.clone()));
        let relay_for_wait = relay.clone();
        wait_until(READY, "relay registered", move || {
            relay_for_wait.is_registered()
        })
        .await;
        Stack {
            net,
            token,
            trust: pki.trust(),
            relay_addr: addrs.relay.expect("relay address"),
            socks: addrs.socks5.expect("socks5 address"),
            http: addrs.http.expect("http address"),
            admin,
            relay,
            cache,
            registry,
            shutdown,
            _task: AbortOnDrop(task),
            _admin_task: AbortOnDrop(admin_task),
        }
    }

    /// A token agent for this server, one tunnel, quick reconnects.
    pub fn agent(&self, id: &str, namespace: &str, ips: &[Ipv4Addr], ports: &[u16]) -> AgentConfig {
        AgentConfig {
            namespace: namespace.to_string(),
            server_name: "localhost".into(),
            redundancy: 1,
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(1),
            drain_grace: Duration::from_secs(1),
            ..AgentConfig::new(
                id,
                vec![self.relay_addr.to_string()],
                self.trust.clone(),
                &self.token,
                ips.iter().map(|i| IpAddr::V4(*i)).collect(),
                ports
                    .iter()
                    .map(|p| PortRange { start: *p, end: *p })
                    .collect(),
            )
        }
    }

    /// Starts `config` and waits until the gateway routes each of its IPs to it.
    pub async fn start_agent(&self, config: AgentConfig) -> TestAgent {
        let id = config.id.clone();
        let namespace = config.namespace.clone();
        let ips = config.ips.clone();
        let agent = TestAgent::start(config);
        let mut handle = agent.handle.clone();
        within(
            READY,
            &format!("agent {id} tunnel up"),
            handle.wait_tunnels(1),
        )
        .await;
        for ip in ips {
            self.wait_routed(&namespace, ip, &id).await;
        }
        agent
    }

    /// Waits until the gateway's cache names `agent_id` as an owner of `(namespace, ip)`.
    pub async fn wait_routed(&self, namespace: &str, ip: IpAddr, agent_id: &str) {
        let cache = self.cache.clone();
        wait_until(
            READY,
            &format!("route {namespace}/{ip} → {agent_id}"),
            || {
                cache
                    .owners(namespace, ip)
                    .iter()
                    .any(|o| &*o.agent_id == agent_id)
            },
        )
        .await;
    }

    pub fn owners(&self, namespace: &str, ip: IpAddr) -> Vec<Owner> {
        self.cache.owners(namespace, ip)
    }

    /// The routes the registry holds for `(namespace, ip)`, sorted by key.
    pub async fn registry_routes(&self, namespace: &str, ip: IpAddr) -> Vec<Route> {
        let snapshot = self.registry.snapshot().await.expect("snapshot");
        let mut routes: Vec<Route> = snapshot
            .routes
            .into_iter()
            .filter(|r| r.key.namespace == namespace && r.key.ip == ip)
            .collect();
        routes.sort_by(|a, b| a.key.cmp(&b.key));
        routes
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Stack {
    /// [`raw_hello`] to this stack's relay, with a token only (no client certificate).
    pub async fn say_hello(&self, hello: Hello) -> anyhow::Result<Message> {
        raw_hello(self.relay_addr, &self.trust, None, hello).await
    }
}

/// Dials a relay's agent endpoint (optionally with a client certificate), sends `hello` on the
/// control stream and returns the relay's answer.
pub async fn raw_hello(
    relay: SocketAddr,
    trust: &Trust,
    identity: Option<Identity>,
    hello: Hello,
) -> anyhow::Result<Message> {
    let mut endpoint = postern::tls::bind_endpoint(sa(Ipv4Addr::LOCALHOST, 0), None, 1 << 20)?;
    endpoint.set_default_client_config(postern::tls::client_config(
        trust,
        protocol::ALPN_AGENT,
        identity,
        Arc::new(Transport::default().quinn(16)),
    )?);
    let exchange = async {
        let connection = endpoint
            .connect(relay, "localhost")?
            .await
            .context("QUIC handshake")?;
        let (mut send, mut recv) = connection.open_bi().await.context("control stream")?;
        protocol::write_message(&mut send, &Message::Hello(hello)).await?;
        let answer = protocol::read_message_timeout(&mut recv, IO).await?;
        connection.close(0u32.into(), b"test done");
        Ok(answer)
    };
    let answer = within(IO, "raw hello", exchange).await;
    endpoint.close(0u32.into(), b"test done");
    answer
}

// ---------------------------------------------------------------------------------------------
// Services behind agents, and listeners that must never be dialled.

/// A TCP service that counts the connections it accepted and the bytes its handler read.
pub struct Service {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    bytes: Arc<AtomicU64>,
    _task: AbortOnDrop<()>,
}

impl Service {
    /// Serves `listener`, handing each connection and the byte counter to `handle`.
    pub fn serve<F, Fut>(listener: TcpListener, handle: F) -> Self
    where
        F: Fn(TcpStream, Arc<AtomicU64>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let addr = listener.local_addr().expect("service address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (count, seen) = (accepted.clone(), bytes.clone());
        let task = tokio::spawn(async move {
            loop {
                // A failing accept means the listener is unusable: stop rather than spin.
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(handle(tcp, seen.clone()));
            }
        });
        Service {
            addr,
            accepted,
            bytes,
            _task: AbortOnDrop(task),
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Asserts nothing but our own probe ever reached this listener ([`assert_only_probe`]) and
    /// no byte arrived.
    pub async fn assert_never_dialled(&self, what: &str) {
        assert_only_probe(self.addr, &self.accepted, what).await;
        assert_eq!(self.bytes(), 0, "{what}: bytes reached {}", self.addr);
    }
}

async fn read_counted(tcp: &mut TcpStream, buf: &mut [u8], seen: &AtomicU64) -> usize {
    match tcp.read(buf).await {
        Ok(n) => {
            seen.fetch_add(n as u64, Ordering::SeqCst);
            n
        }
        Err(_) => 0,
    }
}

/// A listener that must never see a connection: counts, reads and discards.
pub async fn counting_listener(addr: SocketAddr) -> Service {
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    Service::serve(listener, |mut tcp, seen| async move {
        let mut buf = [0u8; 4096];
        while read_counted(&mut tcp, &mut buf, &seen).await > 0 {}
    })
}

/// Greets with `"{name}\n"`, then echoes every byte until the client half-closes.
pub async fn tagged_echo(addr: SocketAddr, name: &str) -> Service {
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    tagged_echo_on(listener, name)
}

pub fn tagged_echo_on(listener: TcpListener, name: &str) -> Service {
    let greeting = Arc::new(format!("{name}\n").into_bytes());
    Service::serve(listener, move |mut tcp, seen| {
        let greeting = greeting.clone();
        async move {
            if tcp.write_all(&greeting).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = read_counted(&mut tcp, &mut buf, &seen).await;
                if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = tcp.shutdown().await;
        }
    })
}

/// What [`http_service`] answers: who it is and the request line it received.
pub fn http_body(name: &str, addr: SocketAddr, request_line: &str) -> String {
    format!("{name} at {addr} got {request_line}\n")
}

/// A one-request HTTP/1.1 server: reads a head (and a `Content-Length` body), answers
/// [`http_body`] and closes.
pub async fn http_service(addr: SocketAddr, name: &str) -> Service {
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    http_service_on(listener, name)
}

pub fn http_service_on(listener: TcpListener, name: &str) -> Service {
    let addr = listener.local_addr().expect("address");
    let name = Arc::new(name.to_string());
    Service::serve(listener, move |mut tcp, seen| {
        let name = name.clone();
        async move {
            let mut data = Vec::new();
            let mut buf = [0u8; 4096];
            let head_end = loop {
                if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let n = read_counted(&mut tcp, &mut buf, &seen).await;
                if n == 0 || data.len() > 64 * 1024 {
                    return;
                }
                data.extend_from_slice(&buf[..n]);
            };
            let head = String::from_utf8_lossy(&data[..head_end]).to_string();
            let length = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while data.len() < head_end + length {
                let n = read_counted(&mut tcp, &mut buf, &seen).await;
                if n == 0 {
                    return;
                }
                data.extend_from_slice(&buf[..n]);
            }
            let request_line = head.lines().next().unwrap_or_default();
            let body = http_body(&name, addr, request_line);
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tcp.write_all(response.as_bytes()).await;
            let _ = tcp.shutdown().await;
        }
    })
}

/// Binds two listeners on the same port number at `a` and `b` (port 0 picks it at `a`).
pub async fn same_port_pair(a: Ipv4Addr, b: Ipv4Addr) -> (TcpListener, TcpListener) {
    for _ in 0..50 {
        let first = TcpListener::bind(sa(a, 0)).await.expect("bind");
        let port = first.local_addr().expect("address").port();
        if let Ok(second) = TcpListener::bind(sa(b, port)).await {
            return (first, second);
        }
    }
    panic!("no port free on both {a} and {b}");
}

/// Sends `payload` through `tcp` to a [`tagged_echo`] service, half-closes, and checks that exactly
/// `"{name}\n"` + `payload` comes back. `already` holds bytes a proxy handshake read past its reply.
pub async fn expect_echo(mut tcp: TcpStream, already: Vec<u8>, name: &str, payload: &[u8]) {
    let mut expected = format!("{name}\n").into_bytes();
    expected.extend_from_slice(payload);
    let got = within(IO, &format!("echo from {name}"), async {
        let (mut r, mut w) = tcp.split();
        let writer = async {
            w.write_all(payload).await?;
            w.shutdown().await
        };
        let reader = async {
            let mut got = already;
            r.read_to_end(&mut got).await.map(|_| got)
        };
        let (written, read) = tokio::join!(writer, reader);
        written.expect("write payload");
        read.expect("read echo")
    })
    .await;
    assert!(
        got == expected,
        "echo from {name}: got {} bytes (sha256 {}), expected {} (sha256 {}); starts {:?}",
        got.len(),
        sha_hex(&got),
        expected.len(),
        sha_hex(&expected),
        String::from_utf8_lossy(&got[..got.len().min(40)])
    );
}

// ---------------------------------------------------------------------------------------------
// A raw SOCKS5 client (RFC 1928 / 1929).

/// Connects (from `from`) to the SOCKS5 door and CONNECTs to `dest`.
pub async fn socks5_connect_from(
    from: Ipv4Addr,
    proxy: SocketAddr,
    dest: &Dest,
    auth: Auth<'_>,
) -> Result<TcpStream, SocksError> {
    within(IO, &format!("SOCKS5 CONNECT {dest}"), async {
        let mut tcp = connect_from(from, proxy).await?;
        socks5_handshake(&mut tcp, dest, auth).await?;
        Ok(tcp)
    })
    .await
}

pub async fn socks5_connect(
    proxy: SocketAddr,
    dest: &Dest,
    auth: Auth<'_>,
) -> Result<TcpStream, SocksError> {
    socks5_connect_from(Ipv4Addr::LOCALHOST, proxy, dest, auth).await
}

/// The REP byte of a CONNECT the test expects to be refused.
pub async fn socks5_refusal_from(
    from: Ipv4Addr,
    proxy: SocketAddr,
    dest: &Dest,
    auth: Auth<'_>,
) -> u8 {
    match socks5_connect_from(from, proxy, dest, auth).await {
        Err(SocksError::Reply(code)) => code,
        Ok(_) => panic!("SOCKS5 CONNECT to {dest} succeeded; expected a refusal"),
        Err(e) => panic!("SOCKS5 CONNECT to {dest} failed without a reply: {e:?}"),
    }
}

pub async fn socks5_refusal(proxy: SocketAddr, dest: &Dest, auth: Auth<'_>) -> u8 {
    socks5_refusal_from(Ipv4Addr::LOCALHOST, proxy, dest, auth).await
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client: exact bytes out, the status line and headers as they came back.

/// `Basic base64(login:password)` for `Proxy-Authorization`.
pub fn basic(login: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{login}:{password}"))
    )
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status_line: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// One client connection to the HTTP door, possibly carrying several requests.
pub struct HttpConn {
    pub tcp: TcpStream,
    buf: Vec<u8>,
}

impl HttpConn {
    pub async fn open(proxy: SocketAddr) -> Self {
        Self::open_from(Ipv4Addr::LOCALHOST, proxy).await
    }

    pub async fn open_from(from: Ipv4Addr, proxy: SocketAddr) -> Self {
        let tcp = within(IO, "connect to the HTTP door", connect_from(from, proxy))
            .await
            .unwrap_or_else(|e| panic!("connect to {proxy}: {e}"));
        HttpConn {
            tcp,
            buf: Vec::new(),
        }
    }

    /// Speaks HTTP on an already open stream (a SOCKS5 or CONNECT tunnel).
    pub fn wrap(tcp: TcpStream) -> Self {
        HttpConn {
            tcp,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, raw: &[u8]) {
        within(IO, "write request", self.tcp.write_all(raw))
            .await
            .expect("write request");
    }

    async fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 8192];
        let n = self.tcp.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Reads one response. `to_connect`: a 2xx answer to CONNECT has no body.
    pub async fn response(&mut self, to_connect: bool) -> HttpResponse {
        within(IO, "HTTP response", async {
            let head_end = loop {
                if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let n = self.fill().await.expect("read response head");
                assert!(
                    n > 0,
                    "connection closed before a complete response head; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                );
            };
            let head = String::from_utf8(self.buf[..head_end].to_vec()).expect("ASCII head");
            self.buf.drain(..head_end);
            let mut lines = head.split("\r\n");
            let status_line = lines.next().unwrap_or_default().to_string();
            let status = status_line
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect();
            let mut response = HttpResponse {
                status_line,
                status,
                headers,
                body: Vec::new(),
            };
            if to_connect && (200..300).contains(&status) {
                return response;
            }
            if let Some(len) = response.header("content-length") {
                let len: usize = len.parse().expect("content-length");
                while self.buf.len() < len {
                    let n = self.fill().await.expect("read body");
                    assert!(n > 0, "connection closed inside the body");
                }
                response.body = self.buf.drain(..len).collect();
            } else if response
                .header("transfer-encoding")
                .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
            {
                response.body = self.chunked_body().await;
            } else {
                while self.fill().await.expect("read body") > 0 {}
                response.body = std::mem::take(&mut self.buf);
            }
            response
        })
        .await
    }

    async fn chunked_body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                assert!(self.fill().await.expect("read chunk") > 0, "cut chunk");
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .expect("chunk size");
            self.buf.drain(..line_end + 2);
            while self.buf.len() < size + 2 {
                assert!(self.fill().await.expect("read chunk") > 0, "cut chunk");
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
            if size == 0 {
                return body;
            }
        }
    }

    /// Reads until the server closes; returns whatever came after the last response.
    pub async fn rest_until_closed(&mut self) -> Vec<u8> {
        within(IO, "server closes the connection", async {
            loop {
                match self.fill().await {
                    Ok(0) | Err(_) => return std::mem::take(&mut self.buf),
                    Ok(_) => {}
                }
            }
        })
        .await
    }

    /// The tunnel after a `200` to CONNECT, with any bytes already read past the response head.
    pub fn into_tunnel(self) -> (TcpStream, Vec<u8>) {
        (self.tcp, self.buf)
    }
}

/// Sends one raw request on a fresh connection and reads the response.
pub async fn http_exchange(proxy: SocketAddr, raw: &[u8]) -> HttpResponse {
    let mut conn = HttpConn::open(proxy).await;
    conn.send(raw).await;
    conn.response(raw.starts_with(b"CONNECT ")).await
}

/// An absolute-form `GET` (with `Connection: close`) and optional `Proxy-Authorization`.
pub fn absolute_get(target: &str, path: &str, authorization: Option<&str>) -> Vec<u8> {
    let auth = authorization
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    format!(
        "GET http://{target}{path} HTTP/1.1\r\nHost: {target}\r\n{auth}Connection: close\r\n\r\n"
    )
    .into_bytes()
}

/// A `CONNECT target` with optional `Proxy-Authorization`.
pub fn connect_request(target: &str, authorization: Option<&str>) -> Vec<u8> {
    let auth = authorization
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n").into_bytes()
}

/// Opens a CONNECT tunnel through the HTTP door, or returns the refusal.
pub async fn http_connect(
    proxy: SocketAddr,
    target: &str,
    authorization: Option<&str>,
) -> Result<(TcpStream, Vec<u8>), HttpResponse> {
    let mut conn = HttpConn::open(proxy).await;
    conn.send(&connect_request(target, authorization)).await;
    let response = conn.response(true).await;
    if response.status == 200 {
        Ok(conn.into_tunnel())
    } else {
        Err(response)
    }
}

// ---------------------------------------------------------------------------------------------
// The kernel's view of TCP connections.

/// The client ends of every IPv4 TCP connection to `server` the kernel still lists, in any state
/// (TIME_WAIT included, so a closed connection shows for about a minute): who connected to it.
pub fn tcp_clients_of(server: SocketAddr) -> Vec<SocketAddr> {
    let table = std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp is readable (these tests run on Linux)");
    let parse = |field: &str| -> Option<SocketAddr> {
        let (ip, port) = field.split_once(':')?;
        // The kernel prints the address's in-memory bytes as a native-endian word.
        let ip = u32::from_str_radix(ip, 16).ok()?.to_ne_bytes();
        let port = u16::from_str_radix(port, 16).ok()?;
        Some(sa(Ipv4Addr::from(ip), port))
    };
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let local = parse(fields.next()?)?;
            let remote = parse(fields.next()?)?;
            // The client's socket, or the server's accepted socket (not the listener).
            if remote == server {
                Some(local)
            } else if local == server && remote.port() != 0 {
                Some(remote)
            } else {
                None
            }
        })
        .collect()
}

/// The soft limit on open files, from `/proc/self/limits`.
pub fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}
