//! Configuration: TOML files (`*File` structs, `deny_unknown_fields`) converted once into runtime
//! structs with every default applied, every secret read and every certificate loaded — so a config
//! that converts is a config that runs, and `postern check` is just the conversion.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use crate::protocol::PortRange;
use crate::tls::{self, Identity, Trust};

/// Errors loading or converting a config.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("{key}: {source}")]
    Tls { key: String, source: tls::Error },
    /// Several independent sections are wrong: each error on its own line, so one run of
    /// `postern check` shows them all.
    #[error("{}", join_errors(.0))]
    Several(Vec<Error>),
}

fn join_errors(errors: &[Error]) -> String {
    let lines: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    format!("{} errors:\n  {}", errors.len(), lines.join("\n  "))
}

/// Gathers the results of converting independent sections, so that every wrong section is reported
/// at once instead of only the first.
#[derive(Default)]
struct Errors(Vec<Error>);

impl Errors {
    fn take<T>(&mut self, result: Result<T, Error>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(Error::Several(errors)) => {
                self.0.extend(errors);
                None
            }
            Err(err) => {
                self.0.push(err);
                None
            }
        }
    }

    fn finish(mut self) -> Result<(), Error> {
        match self.0.len() {
            0 => Ok(()),
            1 => Err(self.0.remove(0)),
            _ => Err(Error::Several(self.0)),
        }
    }
}

/// The transport a listener uses; a TCP and a UDP socket may share an address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// One socket a role will open, named by its config key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub key: &'static str,
    /// What it serves, for `postern check`'s summary.
    pub serves: &'static str,
    pub protocol: Protocol,
    pub addr: SocketAddr,
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let protocol = match self.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        };
        write!(
            f,
            "{:<18} {protocol} {:<22} {}",
            self.key,
            self.addr.to_string(),
            self.serves
        )
    }
}

/// Whether two listeners would fight over one socket: same protocol and port (0 picks a free one)
/// on the same address, or with either on a wildcard address (which takes the port on every
/// address; on Linux `[::]` takes IPv4 too).
fn clash(a: &Listener, b: &Listener) -> bool {
    a.protocol == b.protocol
        && a.addr.port() != 0
        && a.addr.port() == b.addr.port()
        && (a.addr.ip() == b.addr.ip()
            || a.addr.ip().is_unspecified()
            || b.addr.ip().is_unspecified())
}

/// Refuses a config whose listeners clash: the process would fail at start with "Address already
/// in use" (and a supervisor restart it for ever); `postern check` says which keys instead.
fn check_listeners(listeners: &[Listener]) -> Result<(), Error> {
    let mut errors = Errors::default();
    for (i, a) in listeners.iter().enumerate() {
        for b in &listeners[i + 1..] {
            if clash(a, b) {
                errors.take::<()>(Err(invalid(
                    b.key,
                    format!(
                        "{} clashes with {} ({}): two listeners cannot share a {} port",
                        b.addr,
                        a.key,
                        a.addr,
                        if a.protocol == Protocol::Tcp {
                            "TCP"
                        } else {
                            "UDP"
                        }
                    ),
                )));
            }
        }
    }
    errors.finish()
}

fn relay_listeners(relay: &RelayConfig, out: &mut Vec<Listener>) {
    out.push(Listener {
        key: "relay.listen",
        serves: "agent tunnels (QUIC)",
        protocol: Protocol::Udp,
        addr: relay.listen,
    });
    if let Some(peer) = &relay.peer {
        out.push(Listener {
            key: "relay.peer_listen",
            serves: "gateways and relays forwarding (QUIC, mTLS)",
            protocol: Protocol::Udp,
            addr: peer.listen,
        });
    }
}

fn gateway_listeners(gateway: &GatewayConfig, out: &mut Vec<Listener>) {
    if let Some(addr) = gateway.socks5 {
        out.push(Listener {
            key: "gateway.socks5",
            serves: "SOCKS5 proxy",
            protocol: Protocol::Tcp,
            addr,
        });
    }
    if let Some(addr) = gateway.http {
        out.push(Listener {
            key: "gateway.http",
            serves: "HTTP proxy",
            protocol: Protocol::Tcp,
            addr,
        });
    }
}

fn admin_listener(admin: Option<SocketAddr>, out: &mut Vec<Listener>) {
    if let Some(addr) = admin {
        out.push(Listener {
            key: "admin.listen",
            serves: "admin: /healthz /readyz /metrics /api, status page",
            protocol: Protocol::Tcp,
            addr,
        });
    }
}

fn invalid(key: &str, message: impl Into<String>) -> Error {
    Error::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

/// A duration written the human way: `"250ms"`, `"10s"`, `"2m"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
    }
}

/// A secret (token, password): `Debug` and `Display` never print it.
pub use crate::protocol::Secret;

impl Secret {
    /// Resolves a config reference: `"env:NAME"` reads an environment variable, `"file:/path"` a
    /// file (trailing newline trimmed), anything else is the literal value; `key` names the
    /// config key in errors.
    pub fn resolve(reference: &str, key: &str) -> Result<Self, Error> {
        if let Some(var) = reference.strip_prefix("env:") {
            std::env::var(var)
                .map(Secret::new)
                .map_err(|_| invalid(key, format!("environment variable {var} is not set")))
        } else if let Some(path) = reference.strip_prefix("file:") {
            std::fs::read_to_string(path)
                .map(|s| Secret::new(s.trim_end_matches(['\n', '\r'])))
                .map_err(|e| invalid(key, format!("cannot read secret file {path}: {e}")))
        } else {
            Ok(Secret::new(reference))
        }
    }
}

/// Lower-case hex SHA-256 of a token, as stored in relay configs.
pub fn token_hash(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex32(s: &str, key: &str) -> Result<[u8; 32], Error> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(key, "expected 64 hex digits (a SHA-256)"));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .map_err(|e| invalid(key, e.to_string()))?;
    }
    Ok(out)
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_toml(&text, path)
}

/// Parses TOML text; `origin` only names the source in errors.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, origin: &Path) -> Result<T, Error> {
    toml::from_str(text).map_err(|e| Error::Parse {
        path: origin.to_path_buf(),
        message: e.to_string(),
    })
}

/// The host's name as an id: its first label, lower-cased (an FQDN's dots are not allowed in ids).
fn default_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .and_then(|s| s.trim().split('.').next().map(str::to_ascii_lowercase))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "postern".to_string())
}

/// Loads a certificate chain and its key; `section` prefixes the error keys (`""` for top-level).
fn identity(cert: &Path, key: &Path, section: &str) -> Result<Identity, Error> {
    let key_name = |k: &str| {
        if section.is_empty() {
            k.to_string()
        } else {
            format!("{section}.{k}")
        }
    };
    let chain = tls::load_certs(cert).map_err(|source| Error::Tls {
        key: key_name("cert"),
        source,
    })?;
    let key_der = tls::load_key(key).map_err(|source| Error::Tls {
        key: key_name("key"),
        source,
    })?;
    // A key that does not belong to the certificate would only fail at the first handshake.
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| invalid(&key_name("key"), format!("unsupported private key: {e}")))?;
    rustls::sign::CertifiedKey::new(chain.clone(), signing)
        .keys_match()
        .map_err(|e| {
            invalid(
                &key_name("key"),
                format!("does not belong to {}: {e}", cert.display()),
            )
        })?;
    Ok(Identity {
        chain,
        key: key_der,
    })
}

pub(crate) fn check_namespace(ns: &str, key: &str) -> Result<(), Error> {
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("namespace {ns:?} must be 1-63 of [A-Za-z0-9_-]"),
        ))
    }
}

/// Agent ids appear in route values and in `<agent-id>.<suffix>` names: DNS-label characters only.
pub(crate) fn check_agent_id(id: &str, key: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("id {id:?} must be a lower-case DNS label (1-63 of [a-z0-9-])"),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// The admin listener every role runs.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// `"host:port"` or `"off"`.
    pub listen: Option<String>,
}

/// Default admin address of relays, gateways and servers; agents use the next port.
pub const ADMIN_DEFAULT: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9180);
pub const AGENT_ADMIN_DEFAULT: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9181);

fn admin(f: AdminFile, default: SocketAddr) -> Result<Option<SocketAddr>, Error> {
    listen_or_off(f.listen.as_deref(), Some(default), "admin.listen")
}

// ---------------------------------------------------------------------------------------------
// QUIC transport knobs shared by every role.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportFile {
    pub idle_timeout: Option<HumanDuration>,
    pub keep_alive: Option<HumanDuration>,
    pub stream_window: Option<ByteSize>,
    pub connection_window: Option<ByteSize>,
    pub send_window: Option<ByteSize>,
    pub udp_buffer: Option<ByteSize>,
    pub stream_stall_timeout: Option<HumanDuration>,
    pub stream_idle_timeout: Option<HumanDuration>,
    pub tcp_keepalive: Option<HumanDuration>,
}

/// QUIC transport settings. quinn's connection receive window is unbounded by default; ours never is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transport {
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    pub stream_window: u64,
    pub connection_window: u64,
    pub send_window: u64,
    pub udp_buffer: usize,
    /// A proxied connection whose writer has not moved a byte for this long while data waits
    /// (a client that stopped reading) is reset, so it cannot pin flow-control credit its
    /// connection's other streams need.
    pub stream_stall_timeout: Duration,
    /// A proxied connection that moved no byte either way for this long is reset.
    pub stream_idle_timeout: Duration,
    /// TCP keep-alive idle time on every spliced TCP connection; probes follow every sixth of it,
    /// so a vanished peer is noticed after about 2.5 times this on Linux (9 probes).
    pub tcp_keepalive: Duration,
}

impl Default for Transport {
    fn default() -> Self {
        Transport {
            // Liveness both ways: the agent sends a QUIC keep-alive every second of silence and the
            // relay acknowledges it (relay::agent_side), and whichever stops hearing the other for
            // 4 s closes the tunnel (a stopped agent or relay, a cut path), so its routes go within
            // seconds, not at a 30 s timeout.
            idle_timeout: Duration::from_secs(4),
            keep_alive: Duration::from_secs(1),
            // 32 streams' worth: one client's stalled downloads (each pins at most a stream
            // window until `stream_stall_timeout` resets it) leave the rest of the window free.
            stream_window: 1024 * 1024,
            connection_window: 32 * 1024 * 1024,
            send_window: 16 * 1024 * 1024,
            udp_buffer: 4 * 1024 * 1024,
            stream_stall_timeout: Duration::from_secs(15),
            stream_idle_timeout: Duration::from_secs(3600),
            tcp_keepalive: Duration::from_secs(60),
        }
    }
}

impl Transport {
    fn from_file(f: TransportFile, key: &str) -> Result<Self, Error> {
        let d = Transport::default();
        let t = Transport {
            idle_timeout: f.idle_timeout.map_or(d.idle_timeout, |v| v.0),
            keep_alive: f.keep_alive.map_or(d.keep_alive, |v| v.0),
            stream_window: f.stream_window.map_or(d.stream_window, |v| v.as_u64()),
            connection_window: f
                .connection_window
                .map_or(d.connection_window, |v| v.as_u64()),
            send_window: f.send_window.map_or(d.send_window, |v| v.as_u64()),
            udp_buffer: f.udp_buffer.map_or(d.udp_buffer, |v| v.as_u64() as usize),
            stream_stall_timeout: f
                .stream_stall_timeout
                .map_or(d.stream_stall_timeout, |v| v.0),
            stream_idle_timeout: f.stream_idle_timeout.map_or(d.stream_idle_timeout, |v| v.0),
            tcp_keepalive: f.tcp_keepalive.map_or(d.tcp_keepalive, |v| v.0),
        };
        for (name, value) in [
            ("stream_stall_timeout", t.stream_stall_timeout),
            ("stream_idle_timeout", t.stream_idle_timeout),
            ("tcp_keepalive", t.tcp_keepalive),
        ] {
            if value < Duration::from_secs(1) {
                return Err(invalid(&format!("{key}.{name}"), "must be at least 1s"));
            }
        }
        if t.keep_alive >= t.idle_timeout {
            return Err(invalid(
                &format!("{key}.keep_alive"),
                "must be shorter than idle_timeout",
            ));
        }
        if t.stream_window < 16 * 1024 || t.connection_window < t.stream_window {
            return Err(invalid(
                &format!("{key}.connection_window"),
                "stream_window must be at least 16KiB and connection_window at least stream_window",
            ));
        }
        Ok(t)
    }

    /// The quinn transport config for these settings. `max_bidi` is how many streams the *remote*
    /// side may open concurrently (quinn reserves state for each up front).
    pub fn quinn(&self, max_bidi: u32) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        let window = |v: u64| quinn::VarInt::from_u64(v).unwrap_or(quinn::VarInt::MAX);
        t.max_concurrent_bidi_streams(max_bidi.into())
            .max_concurrent_uni_streams(0u32.into())
            .stream_receive_window(window(self.stream_window))
            .receive_window(window(self.connection_window))
            .send_window(self.send_window)
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(quinn::IdleTimeout::try_from(self.idle_timeout).ok());
        t
    }

    /// The deadlines and socket options of the splices this transport's streams ride on.
    pub fn splice_limits(&self) -> crate::splice::Limits {
        crate::splice::Limits {
            stall_timeout: self.stream_stall_timeout,
            idle_timeout: self.stream_idle_timeout,
            tcp_keepalive: self.tcp_keepalive,
            // A client's stalled streams may pin at most half of a connection's window.
            stalled_per_client: ((self.connection_window / self.stream_window / 2) as usize).max(1),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Agent.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub id: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    pub relays: Vec<String>,
    pub server_name: Option<String>,
    pub ca: Option<PathBuf>,
    pub pin: Option<String>,
    pub token: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Lets `ips` name addresses the host does not have (NAT: the host is reached by another address).
    pub claim_foreign_ips: Option<bool>,
    pub ports: Vec<String>,
    pub redundancy: Option<u32>,
    pub reconnect_min: Option<HumanDuration>,
    pub reconnect_max: Option<HumanDuration>,
    pub connect_timeout: Option<HumanDuration>,
    pub max_streams: Option<u32>,
    pub drain_grace: Option<HumanDuration>,
    /// Which transport tunnels use: `auto` (QUIC, falling back to TCP), `quic` or `tcp`.
    pub tunnel: Option<String>,
    /// With `tunnel = "auto"`: how often a tunnel on TCP tries QUIC again.
    pub quic_probe_interval: Option<HumanDuration>,
    #[serde(default)]
    pub transport: TransportFile,
    #[serde(default)]
    pub admin: AdminFile,
}

/// Default `agent.quic_probe_interval`.
pub const DEFAULT_QUIC_PROBE_INTERVAL: Duration = Duration::from_secs(30);

/// Which transport an agent's tunnels use (`agent.tunnel`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TunnelMode {
    /// QUIC; when no relay answers over QUIC, TCP + TLS, and back to QUIC when it answers again.
    #[default]
    Auto,
    /// QUIC over UDP only.
    Quic,
    /// QUIC carried over TCP + TLS only.
    Tcp,
}

impl std::str::FromStr for TunnelMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(TunnelMode::Auto),
            "quic" => Ok(TunnelMode::Quic),
            "tcp" => Ok(TunnelMode::Tcp),
            other => Err(format!(
                "{other:?} is not a tunnel transport; use \"auto\", \"quic\" or \"tcp\""
            )),
        }
    }
}

/// A running agent's settings.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub id: String,
    pub namespace: String,
    /// `host:port` endpoints (a VIP, several, or a DNS name with many addresses).
    pub relays: Vec<String>,
    /// TLS name the relay's certificate must carry (CA trust only).
    pub server_name: String,
    pub trust: Trust,
    /// Bearer token; empty when the agent authenticates by certificate only.
    pub token: Secret,
    /// Client certificate for mutual TLS with the relay.
    pub identity: Option<Identity>,
    /// Addresses this agent claims; empty means "the host's own addresses, found at start".
    pub ips: Vec<IpAddr>,
    /// Whether `ips` may name addresses the host's interfaces do not carry (NAT setups). Off: the
    /// agent refuses to start with such a claim.
    pub claim_foreign_ips: bool,
    pub ports: Vec<PortRange>,
    pub redundancy: u32,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub connect_timeout: Duration,
    /// Concurrent proxied connections a relay may open on one tunnel.
    pub max_streams: u32,
    /// How long in-flight connections may finish when the agent stops.
    pub drain_grace: Duration,
    /// Which transport tunnels use.
    pub tunnel: TunnelMode,
    /// With [`TunnelMode::Auto`]: how often a tunnel on TCP tries QUIC again (±25 % jitter).
    pub quic_probe_interval: Duration,
    pub transport: Transport,
    /// Admin listener (health, readiness, metrics); `None`: off.
    pub admin: Option<SocketAddr>,
}

impl AgentConfig {
    /// An agent with every optional setting at its default (for tests, the demo and the swarm).
    pub fn new(
        id: &str,
        relays: Vec<String>,
        trust: Trust,
        token: &str,
        ips: Vec<IpAddr>,
        ports: Vec<PortRange>,
    ) -> Self {
        AgentConfig {
            id: id.to_string(),
            namespace: "default".into(),
            server_name: host_of(relays.first().map_or("", String::as_str)).to_string(),
            relays,
            trust,
            token: Secret::new(token),
            identity: None,
            ips,
            claim_foreign_ips: false,
            ports,
            redundancy: 2,
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            connect_timeout: crate::protocol::CONNECT_TIMEOUT,
            max_streams: 1024,
            drain_grace: Duration::from_secs(30),
            tunnel: TunnelMode::Auto,
            quic_probe_interval: DEFAULT_QUIC_PROBE_INTERVAL,
            transport: Transport::default(),
            admin: None,
        }
    }

    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::from_file(read_toml(path)?)
    }

    pub fn from_file(f: AgentFile) -> Result<Self, Error> {
        let id = f.id.unwrap_or_else(default_hostname);
        check_agent_id(&id, "id")?;
        let namespace = f.namespace.unwrap_or_else(|| "default".to_string());
        check_namespace(&namespace, "namespace")?;
        if f.relays.is_empty() {
            return Err(invalid(
                "relays",
                "at least one relay endpoint (host:port) is required",
            ));
        }
        for r in &f.relays {
            if r.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(invalid("relays", format!("{r:?} is not host:port")));
            }
        }
        let server_name = match f.server_name {
            Some(n) => n,
            None => host_of(&f.relays[0]).to_string(),
        };
        let trust = match (f.ca, f.pin) {
            (Some(_), Some(_)) => return Err(invalid("pin", "set either ca or pin, not both")),
            (Some(ca), None) => Trust::Ca(tls::load_certs(&ca).map_err(|source| Error::Tls {
                key: "ca".into(),
                source,
            })?),
            (None, Some(pin)) => Trust::Pin(tls::parse_pin(&pin).map_err(|source| Error::Tls {
                key: "pin".into(),
                source,
            })?),
            (None, None) => return Err(invalid("ca", "the relay must be verified: set ca or pin")),
        };
        let identity = match (f.cert, f.key) {
            (Some(cert), Some(key)) => Some(identity(&cert, &key, "")?),
            (None, None) => None,
            _ => return Err(invalid("cert", "cert and key go together")),
        };
        let token = match f.token {
            Some(t) => Secret::resolve(&t, "token")?,
            None if identity.is_some() => Secret::default(),
            None => {
                return Err(invalid(
                    "token",
                    "required unless the agent has a certificate (e.g. token = \"env:POSTERN_AGENT_TOKEN\")",
                ))
            }
        };
        if token.expose().is_empty() && identity.is_none() {
            return Err(invalid("token", "is empty"));
        }
        if f.ports.is_empty() {
            return Err(invalid(
                "ports",
                "list at least one port to expose (e.g. [\"9100\"])",
            ));
        }
        let ports = f
            .ports
            .iter()
            .map(|p| p.parse::<PortRange>().map_err(|m| invalid("ports", m)))
            .collect::<Result<Vec<_>, _>>()?;
        let redundancy = f.redundancy.unwrap_or(2);
        if !(1..=8).contains(&redundancy) {
            return Err(invalid("redundancy", "must be 1-8"));
        }
        let reconnect_min = f.reconnect_min.map_or(Duration::from_millis(200), |d| d.0);
        let reconnect_max = f.reconnect_max.map_or(Duration::from_secs(30), |d| d.0);
        if reconnect_min.is_zero() || reconnect_min > reconnect_max {
            return Err(invalid("reconnect_min", "must be > 0 and <= reconnect_max"));
        }
        let max_streams = f.max_streams.unwrap_or(1024);
        if max_streams == 0 {
            return Err(invalid("max_streams", "must be at least 1"));
        }
        Ok(AgentConfig {
            id,
            namespace,
            relays: f.relays,
            server_name,
            trust,
            token,
            identity,
            ips: f.ips,
            claim_foreign_ips: f.claim_foreign_ips.unwrap_or(false),
            ports,
            redundancy,
            reconnect_min,
            reconnect_max,
            connect_timeout: f
                .connect_timeout
                .map_or(crate::protocol::CONNECT_TIMEOUT, |d| d.0),
            max_streams,
            drain_grace: f.drain_grace.map_or(Duration::from_secs(30), |d| d.0),
            tunnel: match f.tunnel {
                Some(t) => t.parse().map_err(|m: String| invalid("tunnel", &m))?,
                None => TunnelMode::Auto,
            },
            quic_probe_interval: match f.quic_probe_interval {
                Some(d) if d.0 < Duration::from_secs(1) => {
                    return Err(invalid("quic_probe_interval", "must be at least 1s"))
                }
                Some(d) => d.0,
                None => DEFAULT_QUIC_PROBE_INTERVAL,
            },
            transport: Transport::from_file(f.transport, "transport")?,
            admin: admin(f.admin, AGENT_ADMIN_DEFAULT)?,
        })
    }
}

/// The host part of `host:port` / `[v6]:port`.
pub fn host_of(endpoint: &str) -> &str {
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

// ---------------------------------------------------------------------------------------------
// Relay.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayFile {
    pub id: Option<String>,
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub agents: Vec<AgentCredentialFile>,
    pub drain_grace: Option<HumanDuration>,
    /// CA whose client certificates authenticate agents (their IP SANs are what they may claim).
    pub agent_ca: Option<PathBuf>,
    /// Namespaces agents authenticated by certificate may join (default: `["default"]`).
    pub agent_cert_namespaces: Option<Vec<String>>,
    /// UDP address of the peer endpoint gateways and other relays forward through.
    pub peer_listen: Option<SocketAddr>,
    /// Address published for peers: `host:port`, or `env:VAR` naming a variable that holds the IP
    /// (the port is `peer_listen`'s). Defaults to `peer_listen` when that is not a wildcard.
    pub peer_advertise: Option<String>,
    /// Admitted agent tunnels the relay holds at most; more are refused.
    pub max_tunnels: Option<u32>,
    /// Connections in their handshake or not yet admitted, held at most in total.
    pub max_pending: Option<u32>,
    /// Connections in their handshake or not yet admitted, held at most per source address.
    pub max_pending_per_source: Option<u32>,
    /// TCP address of the TCP tunnel listener: an address, or `"off"`; default: `listen`'s.
    pub tcp_listen: Option<String>,
    #[serde(default)]
    pub transport: TransportFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentCredentialFile {
    pub name: String,
    pub token_sha256: String,
    pub allow: Vec<IpNet>,
    pub namespaces: Option<Vec<String>>,
    /// Agent ids (exact, or patterns with `*`) agents holding this token may use.
    pub ids: Option<Vec<String>>,
}

/// One agent credential: a token (stored as its SHA-256) and the address ranges it may claim.
#[derive(Clone, Debug)]
pub struct AgentCredential {
    pub name: String,
    pub token_sha256: [u8; 32],
    pub allow: Vec<IpNet>,
    /// Namespaces this credential may join; empty = any.
    pub namespaces: Vec<String>,
    /// Agent ids this credential may use: exact ids or patterns where `*` stands for any run of
    /// characters (`web-*`). Empty = any id not held by another credential.
    pub ids: Vec<String>,
}

impl AgentCredential {
    /// A credential for `token` allowed to claim `allow` (used by tests and the demo).
    pub fn new(name: &str, token: &str, allow: Vec<IpNet>) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut token_sha256 = [0u8; 32];
        token_sha256.copy_from_slice(digest.as_ref());
        AgentCredential {
            name: name.to_string(),
            token_sha256,
            allow,
            namespaces: Vec::new(),
            ids: Vec::new(),
        }
    }

    /// Whether this credential may use agent id `id`.
    pub fn allows_id(&self, id: &str) -> bool {
        self.ids.is_empty() || self.ids.iter().any(|pattern| id_matches(pattern, id))
    }

    /// What routes record about the credential, so relays can tell whether two tunnels of one agent
    /// id were admitted by the same credential: a digest of the token's digest, never the token.
    pub fn fingerprint(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.token_sha256);
        format!("token:{}", hex(&digest.as_ref()[..8]))
    }
}

/// Whether agent id `id` matches `pattern`, where `*` stands for any run of characters.
pub fn id_matches(pattern: &str, id: &str) -> bool {
    let mut parts = pattern.split('*');
    // `split` yields at least one part.
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = id.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// An `ids` entry: an agent id, or one with `*` wildcards.
fn check_id_pattern(pattern: &str, key: &str) -> Result<(), Error> {
    let ok = !pattern.is_empty()
        && pattern.len() <= 63
        && pattern
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'*');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{pattern:?} must be an agent id (1-63 of [a-z0-9-]), `*` standing for any run of characters"),
        ))
    }
}

#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub id: String,
    pub listen: SocketAddr,
    pub identity: Identity,
    pub agents: Vec<AgentCredential>,
    /// Roots for agent client certificates; `None`: agents authenticate by token only.
    pub agent_ca: Option<Vec<rustls_pki_types::CertificateDer<'static>>>,
    /// Namespaces agents authenticated by certificate may join.
    pub agent_cert_namespaces: Vec<String>,
    pub drain_grace: Duration,
    /// Peer endpoint: where it listens and the address it publishes.
    pub peer: Option<PeerListen>,
    /// Admitted agent tunnels held at most. When full, a new connection is refused before its TLS
    /// handshake (and one admitted in a race beyond it gets `Reject`); the agent backs off and tries
    /// again, through the VIP likely another relay. Handshakes in progress do not count, so clients
    /// without credentials cannot fill it.
    pub max_tunnels: u32,
    /// Connections in their QUIC handshake or waiting for their hello to be admitted, held at
    /// most in total; past it a new connection is refused before its TLS handshake.
    pub max_pending: u32,
    /// The same, per source (an IPv4 address or an IPv6 /64).
    pub max_pending_per_source: u32,
    /// Where agents' TCP tunnels are accepted.
    pub tcp_listen: TcpListen,
    pub transport: Transport,
}

/// Default `relay.max_pending`.
pub const DEFAULT_MAX_PENDING: u32 = 512;
/// Default `relay.max_pending_per_source`.
pub const DEFAULT_MAX_PENDING_PER_SOURCE: u32 = 32;

/// Where a relay accepts TCP tunnels (`relay.tcp_listen`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcpListen {
    /// The address and port the QUIC endpoint is bound to (one VIP entry serves both).
    #[default]
    SameAsQuic,
    At(SocketAddr),
    Off,
}

/// Default `relay.max_tunnels`: ~35 KiB per idle tunnel (docs/performance.md) makes this ~1.7 GiB.
pub const DEFAULT_MAX_TUNNELS: u32 = 50_000;

/// Where a relay's peer endpoint listens and how others reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerListen {
    pub listen: SocketAddr,
    /// `None`: publish the bound address (only valid when `listen` is not a wildcard).
    pub advertise: Option<SocketAddr>,
}

impl RelayConfig {
    /// A relay with every optional setting at its default (for tests and the demo).
    pub fn new(
        id: &str,
        listen: SocketAddr,
        identity: Identity,
        agents: Vec<AgentCredential>,
    ) -> Self {
        RelayConfig {
            id: id.to_string(),
            listen,
            identity,
            agents,
            agent_ca: None,
            agent_cert_namespaces: vec!["default".into()],
            drain_grace: Duration::from_secs(30),
            peer: None,
            max_tunnels: DEFAULT_MAX_TUNNELS,
            max_pending: DEFAULT_MAX_PENDING,
            max_pending_per_source: DEFAULT_MAX_PENDING_PER_SOURCE,
            tcp_listen: TcpListen::SameAsQuic,
            transport: Transport::default(),
        }
    }

    pub fn from_file(f: RelayFile) -> Result<Self, Error> {
        let id = f.id.unwrap_or_else(default_hostname);
        check_agent_id(&id, "relay.id")?;
        let identity = identity(&f.cert, &f.key, "relay")?;
        let mut agents = Vec::with_capacity(f.agents.len());
        for (i, a) in f.agents.into_iter().enumerate() {
            let key = format!("relay.agents[{i}]");
            if a.allow.is_empty() {
                return Err(invalid(
                    &format!("{key}.allow"),
                    "list the CIDRs this agent may claim",
                ));
            }
            let namespaces = a.namespaces.unwrap_or_default();
            for ns in &namespaces {
                check_namespace(ns, &format!("{key}.namespaces"))?;
            }
            let ids = a.ids.unwrap_or_default();
            for pattern in &ids {
                check_id_pattern(pattern, &format!("{key}.ids"))?;
            }
            agents.push(AgentCredential {
                token_sha256: parse_hex32(&a.token_sha256, &format!("{key}.token_sha256"))?,
                name: a.name,
                allow: a.allow,
                namespaces,
                ids,
            });
        }
        Ok(RelayConfig {
            id,
            listen: f.listen,
            identity,
            agents,
            agent_ca: f
                .agent_ca
                .map(|p| {
                    tls::load_certs(&p).map_err(|source| Error::Tls {
                        key: "relay.agent_ca".into(),
                        source,
                    })
                })
                .transpose()?,
            agent_cert_namespaces: {
                let list = f
                    .agent_cert_namespaces
                    .unwrap_or_else(|| vec!["default".into()]);
                for ns in &list {
                    check_namespace(ns, "relay.agent_cert_namespaces")?;
                }
                list
            },
            drain_grace: f.drain_grace.map_or(Duration::from_secs(30), |d| d.0),
            peer: peer_listen(f.peer_listen, f.peer_advertise)?,
            max_tunnels: match f.max_tunnels {
                Some(0) => return Err(invalid("relay.max_tunnels", "must be at least 1")),
                Some(n) => n,
                None => DEFAULT_MAX_TUNNELS,
            },
            max_pending: match f.max_pending {
                Some(0) => return Err(invalid("relay.max_pending", "must be at least 1")),
                Some(n) => n,
                None => DEFAULT_MAX_PENDING,
            },
            max_pending_per_source: match f.max_pending_per_source {
                Some(0) => {
                    return Err(invalid(
                        "relay.max_pending_per_source",
                        "must be at least 1",
                    ))
                }
                Some(n) => n,
                None => DEFAULT_MAX_PENDING_PER_SOURCE,
            },
            tcp_listen: match f.tcp_listen.as_deref() {
                None => TcpListen::SameAsQuic,
                Some("off") => TcpListen::Off,
                Some(addr) => match addr.parse() {
                    // `listen`'s own address: the same as leaving the key out.
                    Ok(addr) if addr == f.listen => TcpListen::SameAsQuic,
                    Ok(addr) => TcpListen::At(addr),
                    Err(_) => {
                        return Err(invalid(
                            "relay.tcp_listen",
                            format!("{addr:?} is neither an address (ip:port) nor \"off\""),
                        ))
                    }
                },
            },
            transport: Transport::from_file(f.transport, "relay.transport")?,
        })
    }
}

fn peer_listen(
    listen: Option<SocketAddr>,
    advertise: Option<String>,
) -> Result<Option<PeerListen>, Error> {
    let Some(listen) = listen else {
        if advertise.is_some() {
            return Err(invalid("relay.peer_advertise", "needs relay.peer_listen"));
        }
        return Ok(None);
    };
    let advertise = match advertise {
        None if listen.ip().is_unspecified() => {
            return Err(invalid(
                "relay.peer_advertise",
                "required when relay.peer_listen is a wildcard address (peers need a reachable address)",
            ))
        }
        None => None,
        Some(a) => {
            let resolved = Secret::resolve(&a, "relay.peer_advertise")?;
            let text = resolved.expose().trim();
            let addr = match text.parse::<SocketAddr>() {
                Ok(addr) => addr,
                Err(_) => text
                    .parse::<IpAddr>()
                    .map(|ip| SocketAddr::new(ip, listen.port()))
                    .map_err(|_| invalid("relay.peer_advertise", format!("{text:?} is neither ip:port nor an IP")))?,
            };
            Some(addr)
        }
    };
    Ok(Some(PeerListen { listen, advertise }))
}

// ---------------------------------------------------------------------------------------------
// Peer connections (gateway/relay → relay).

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerFile {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub server_name: Option<String>,
    pub connect_timeout: Option<HumanDuration>,
    pub max_streams: Option<u32>,
    #[serde(default)]
    pub transport: TransportFile,
}

/// How processes authenticate each other on peer connections (mutual TLS under one CA).
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Verifies relays' peer endpoints and, on a relay, the client certificates of peers.
    pub ca: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// What this process presents when it dials a relay's peer endpoint.
    pub identity: Option<Identity>,
    /// The name relay certificates carry for peer connections.
    pub server_name: String,
    pub connect_timeout: Duration,
    /// Concurrent forwarded connections per peer connection.
    pub max_streams: u32,
    pub transport: Transport,
}

impl PeerConfig {
    /// Peer links cross the data centre: a dead relay must be noticed within about a second.
    pub fn default_transport() -> Transport {
        Transport {
            idle_timeout: Duration::from_millis(1500),
            keep_alive: Duration::from_millis(300),
            ..Transport::default()
        }
    }

    pub fn from_file(f: PeerFile) -> Result<Self, Error> {
        let ca = tls::load_certs(&f.ca).map_err(|source| Error::Tls {
            key: "peer.ca".into(),
            source,
        })?;
        let identity = match (f.cert, f.key) {
            (Some(cert), Some(key)) => Some(identity(&cert, &key, "peer")?),
            (None, None) => None,
            _ => return Err(invalid("peer.cert", "peer.cert and peer.key go together")),
        };
        let d = Self::default_transport();
        let t = f.transport;
        let transport = Transport::from_file(
            TransportFile {
                idle_timeout: t.idle_timeout.or(Some(HumanDuration(d.idle_timeout))),
                keep_alive: t.keep_alive.or(Some(HumanDuration(d.keep_alive))),
                ..t
            },
            "peer.transport",
        )?;
        let max_streams = f.max_streams.unwrap_or(4096);
        if max_streams == 0 {
            return Err(invalid("peer.max_streams", "must be at least 1"));
        }
        Ok(PeerConfig {
            ca,
            identity,
            server_name: f.server_name.unwrap_or_else(|| "postern-relay".into()),
            connect_timeout: f.connect_timeout.map_or(Duration::from_secs(2), |d| d.0),
            max_streams,
            transport,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    /// `"host:port"`, or `"off"`; absent means `127.0.0.1:1080`.
    pub socks5: Option<String>,
    /// `"host:port"`, or `"off"` (the default).
    pub http: Option<String>,
    pub drain_grace: Option<HumanDuration>,
    pub namespace: Option<String>,
    pub agent_suffix: Option<String>,
    #[serde(default)]
    pub resolve_names: bool,
    pub handshake_timeout: Option<HumanDuration>,
    pub max_connections: Option<usize>,
    pub max_connections_per_client: Option<usize>,
    pub max_header_bytes: Option<ByteSize>,
    /// Client CIDR allowlist; absent or empty: any client.
    #[serde(default)]
    pub clients: Vec<IpNet>,
    #[serde(default)]
    pub users: Vec<UserFile>,
    #[serde(default)]
    pub rules: Vec<RuleFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserFile {
    pub name: String,
    pub password: String,
}

#[derive(Clone, Debug)]
pub struct User {
    pub name: String,
    pub password: Secret,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub clients: Vec<IpNet>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub targets: Vec<IpNet>,
    #[serde(default)]
    pub ports: Vec<String>,
}

/// "Who may reach what": every listed field must match (an empty field matches anything).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    pub users: Vec<String>,
    pub clients: Vec<IpNet>,
    pub namespaces: Vec<String>,
    pub targets: Vec<IpNet>,
    pub ports: Vec<PortRange>,
}

#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub socks5: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    /// Namespace for clients that do not pick one.
    pub namespace: String,
    /// `<agent-id>.<agent_suffix>` names route to that agent.
    pub agent_suffix: String,
    /// Resolve other names with the system resolver (then route by IP); off by default.
    pub resolve_names: bool,
    pub handshake_timeout: Duration,
    /// How long in-flight client connections may finish after SIGTERM.
    pub drain_grace: Duration,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    /// Largest HTTP request head accepted (hyper's read buffer).
    pub max_header_bytes: usize,
    /// Client allowlist; empty: any client.
    pub clients: Vec<IpNet>,
    /// Empty: no authentication.
    pub users: Vec<User>,
    /// Empty: everything routed is allowed; otherwise default deny.
    pub rules: Vec<Rule>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            socks5: Some(SocketAddr::from(([127, 0, 0, 1], 1080))),
            http: None,
            namespace: "default".into(),
            agent_suffix: "postern".into(),
            resolve_names: false,
            handshake_timeout: Duration::from_secs(10),
            drain_grace: Duration::from_secs(30),
            max_connections: 10_000,
            max_connections_per_client: 512,
            max_header_bytes: 16 * 1024,
            clients: Vec::new(),
            users: Vec::new(),
            rules: Vec::new(),
        }
    }
}

fn listen_or_off(
    value: Option<&str>,
    default: Option<SocketAddr>,
    key: &str,
) -> Result<Option<SocketAddr>, Error> {
    match value.map(str::trim) {
        None => Ok(default),
        Some("off") => Ok(None),
        Some(addr) => addr.parse().map(Some).map_err(|_| {
            invalid(
                key,
                format!("{addr:?} is not an ip:port address (or \"off\")"),
            )
        }),
    }
}

impl GatewayConfig {
    pub fn from_file(f: GatewayFile) -> Result<Self, Error> {
        let d = GatewayConfig::default();
        let namespace = f.namespace.unwrap_or(d.namespace);
        check_namespace(&namespace, "gateway.namespace")?;
        let agent_suffix = f
            .agent_suffix
            .unwrap_or(d.agent_suffix)
            .trim_matches('.')
            .to_ascii_lowercase();
        if agent_suffix.is_empty() {
            return Err(invalid("gateway.agent_suffix", "must not be empty"));
        }
        let mut users: Vec<User> = Vec::with_capacity(f.users.len());
        for (i, u) in f.users.into_iter().enumerate() {
            let key = format!("gateway.users[{i}]");
            if u.name.is_empty() || u.name.len() > 255 || u.name.contains(['@', ':']) {
                return Err(invalid(
                    &format!("{key}.name"),
                    "must be 1-255 bytes without '@' or ':'",
                ));
            }
            if users.iter().any(|other| other.name == u.name) {
                return Err(invalid(
                    &format!("{key}.name"),
                    format!("user {:?} is listed twice", u.name),
                ));
            }
            let password = Secret::resolve(&u.password, &format!("{key}.password"))?;
            if password.expose().is_empty() || password.expose().len() > 255 {
                return Err(invalid(&format!("{key}.password"), "must be 1-255 bytes"));
            }
            users.push(User {
                name: u.name,
                password,
            });
        }
        let mut rules = Vec::with_capacity(f.rules.len());
        for (i, r) in f.rules.into_iter().enumerate() {
            let key = format!("gateway.rules[{i}]");
            if let Some(unknown) = r
                .users
                .iter()
                .find(|name| !users.iter().any(|u| &u.name == *name))
            {
                return Err(invalid(
                    &format!("{key}.users"),
                    format!("{unknown:?} is not a configured user"),
                ));
            }
            for ns in &r.namespaces {
                check_namespace(ns, &format!("{key}.namespaces"))?;
            }
            let ports = r
                .ports
                .iter()
                .map(|p| {
                    p.parse::<PortRange>()
                        .map_err(|m| invalid(&format!("{key}.ports"), m))
                })
                .collect::<Result<Vec<_>, _>>()?;
            rules.push(Rule {
                users: r.users,
                clients: r.clients,
                namespaces: r.namespaces,
                targets: r.targets,
                ports,
            });
        }
        let max_connections = f.max_connections.unwrap_or(d.max_connections);
        if max_connections == 0 {
            return Err(invalid("gateway.max_connections", "must be at least 1"));
        }
        let max_connections_per_client = f
            .max_connections_per_client
            .unwrap_or(d.max_connections_per_client);
        if max_connections_per_client == 0 {
            return Err(invalid(
                "gateway.max_connections_per_client",
                "must be at least 1",
            ));
        }
        let max_header_bytes = f
            .max_header_bytes
            .map_or(d.max_header_bytes, |b| b.as_u64() as usize);
        if !(8192..=1024 * 1024).contains(&max_header_bytes) {
            return Err(invalid(
                "gateway.max_header_bytes",
                "must be between 8KiB and 1MiB",
            ));
        }
        let handshake_timeout = f.handshake_timeout.map_or(d.handshake_timeout, |v| v.0);
        if handshake_timeout.is_zero() {
            return Err(invalid("gateway.handshake_timeout", "must be more than 0s"));
        }
        let socks5 = listen_or_off(f.socks5.as_deref(), d.socks5, "gateway.socks5")?;
        let http = listen_or_off(f.http.as_deref(), d.http, "gateway.http")?;
        if socks5.is_some_and(|a| a.port() != 0) && socks5 == http {
            return Err(invalid("gateway.http", "must differ from gateway.socks5"));
        }
        Ok(GatewayConfig {
            socks5,
            http,
            drain_grace: f.drain_grace.map_or(d.drain_grace, |v| v.0),
            namespace,
            agent_suffix,
            resolve_names: f.resolve_names,
            handshake_timeout,
            max_connections,
            max_connections_per_client,
            max_header_bytes,
            clients: f.clients,
            users,
            rules,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Registry.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RegistryFile {
    pub kind: Option<RegistryKind>,
    #[serde(default)]
    pub endpoints: Vec<String>,
    pub prefix: Option<String>,
    pub lease_ttl: Option<HumanDuration>,
    pub max_staleness: Option<HumanDuration>,
    /// CA that signed etcd's server certificate (PEM); required with `https://` endpoints.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd user (etcd's `auth enable`); `password` is a secret reference (`env:`, `file:`).
    pub username: Option<String>,
    pub password: Option<String>,
}

/// How postern proves itself to etcd and checks etcd's certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdSecurity {
    pub tls: Option<EtcdTls>,
    pub auth: Option<EtcdAuth>,
}

/// TLS to etcd: the CA that signed etcd's certificate, and a client certificate when etcd asks
/// for one. Paths; the files are checked when the config loads and read when connecting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    /// (certificate, key).
    pub client: Option<(PathBuf, PathBuf)>,
}

/// An etcd user and its password (masked in `Debug`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdAuth {
    pub username: String,
    pub password: Secret,
}

impl EtcdSecurity {
    fn from_file(f: &RegistryFile) -> Result<Self, Error> {
        let https = f
            .endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if https != 0 && https != f.endpoints.len() {
            return Err(invalid(
                "registry.endpoints",
                "all https:// or none: etcd endpoints cannot mix TLS and plain",
            ));
        }
        let tls = match (&f.ca, https > 0) {
            (None, false) => {
                if f.cert.is_some() || f.key.is_some() {
                    return Err(invalid(
                        "registry.cert",
                        "a client certificate needs https:// endpoints and registry.ca",
                    ));
                }
                None
            }
            (None, true) => {
                return Err(invalid(
                    "registry.ca",
                    "required with https:// endpoints: the CA that signed etcd's certificate",
                ))
            }
            (Some(_), false) => {
                return Err(invalid(
                    "registry.ca",
                    "only meaningful with https:// endpoints",
                ))
            }
            (Some(ca), true) => {
                crate::tls::load_certs(ca).map_err(|e| invalid("registry.ca", e.to_string()))?;
                let client = match (&f.cert, &f.key) {
                    (None, None) => None,
                    (Some(cert), Some(key)) => {
                        crate::tls::load_certs(cert)
                            .map_err(|e| invalid("registry.cert", e.to_string()))?;
                        crate::tls::load_key(key)
                            .map_err(|e| invalid("registry.key", e.to_string()))?;
                        Some((cert.clone(), key.clone()))
                    }
                    (Some(_), None) => {
                        return Err(invalid("registry.key", "required with registry.cert"))
                    }
                    (None, Some(_)) => {
                        return Err(invalid("registry.cert", "required with registry.key"))
                    }
                };
                Some(EtcdTls {
                    ca: ca.clone(),
                    client,
                })
            }
        };
        let auth = match (&f.username, &f.password) {
            (None, None) => None,
            (Some(username), Some(password)) => {
                if username.is_empty() {
                    return Err(invalid("registry.username", "must not be empty"));
                }
                Some(EtcdAuth {
                    username: username.clone(),
                    password: Secret::resolve(password, "registry.password")?,
                })
            }
            (Some(_), None) => {
                return Err(invalid(
                    "registry.password",
                    "required with registry.username",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "registry.username",
                    "required with registry.password",
                ))
            }
        };
        Ok(EtcdSecurity { tls, auth })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistryKind {
    #[default]
    Memory,
    Etcd,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryConfig {
    /// Embedded, single process.
    Memory,
    /// etcd v3.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
        lease_ttl: Duration,
        /// A gateway whose route view etcd has not confirmed for longer is not ready.
        max_staleness: Duration,
        security: EtcdSecurity,
    },
}

impl RegistryConfig {
    /// The bound on a gateway's route view age (`registry.max_staleness`); none for the
    /// in-process memory registry, which is never stale.
    pub fn max_staleness(&self) -> Option<Duration> {
        match self {
            RegistryConfig::Memory => None,
            RegistryConfig::Etcd { max_staleness, .. } => Some(*max_staleness),
        }
    }

    pub fn from_file(f: RegistryFile) -> Result<Self, Error> {
        match f.kind.unwrap_or_default() {
            RegistryKind::Memory => {
                if !f.endpoints.is_empty() {
                    return Err(invalid(
                        "registry.endpoints",
                        "only meaningful with kind = \"etcd\"",
                    ));
                }
                for (key, set) in [
                    ("registry.ca", f.ca.is_some()),
                    ("registry.cert", f.cert.is_some()),
                    ("registry.key", f.key.is_some()),
                    ("registry.username", f.username.is_some()),
                    ("registry.password", f.password.is_some()),
                ] {
                    if set {
                        return Err(invalid(key, "only meaningful with kind = \"etcd\""));
                    }
                }
                Ok(RegistryConfig::Memory)
            }
            RegistryKind::Etcd => {
                if f.endpoints.is_empty() {
                    return Err(invalid(
                        "registry.endpoints",
                        "etcd needs at least one endpoint",
                    ));
                }
                let lease_ttl = f.lease_ttl.map_or(Duration::from_secs(10), |d| d.0);
                if lease_ttl < Duration::from_secs(2) {
                    return Err(invalid("registry.lease_ttl", "must be at least 2s"));
                }
                let security = EtcdSecurity::from_file(&f)?;
                let max_staleness = f.max_staleness.map_or(Duration::from_secs(30), |d| d.0);
                if max_staleness < Duration::from_secs(2) {
                    return Err(invalid(
                        "registry.max_staleness",
                        "must be at least 2s (the view is confirmed about every second)",
                    ));
                }
                Ok(RegistryConfig::Etcd {
                    endpoints: f.endpoints,
                    prefix: f
                        .prefix
                        .unwrap_or_else(|| "/postern".into())
                        .trim_end_matches('/')
                        .to_string(),
                    lease_ttl,
                    max_staleness,
                    security,
                })
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// `postern server`: relay + gateway in one process.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub relay: RelayFile,
    pub gateway: GatewayFile,
    pub peer: Option<PeerFile>,
    #[serde(default)]
    pub registry: RegistryFile,
    #[serde(default)]
    pub admin: AdminFile,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub relay: RelayConfig,
    pub gateway: GatewayConfig,
    pub peer: Option<PeerConfig>,
    pub registry: RegistryConfig,
    pub admin: Option<SocketAddr>,
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::from_file(read_toml(path)?)
    }

    pub fn from_file(f: ServerFile) -> Result<Self, Error> {
        let mut errors = Errors::default();
        let peer = errors.take(f.peer.map(PeerConfig::from_file).transpose());
        let registry = errors.take(RegistryConfig::from_file(f.registry));
        let relay = errors.take(RelayConfig::from_file(f.relay));
        let gateway = errors.take(GatewayConfig::from_file(f.gateway));
        let admin = errors.take(admin(f.admin, ADMIN_DEFAULT));
        let (Some(peer), Some(registry), Some(relay), Some(gateway), Some(admin)) =
            (peer, registry, relay, gateway, admin)
        else {
            return Err(errors
                .finish()
                .err()
                .unwrap_or_else(|| invalid("(config)", "invalid")));
        };
        let config = ServerConfig {
            relay,
            gateway,
            peer,
            registry,
            admin,
        };
        errors.take(check_cluster(
            &config.registry,
            &config.relay,
            config.peer.as_ref(),
            true,
        ));
        errors.take(check_listeners(&config.listeners()));
        errors.finish()?;
        Ok(config)
    }

    /// Every socket the server opens.
    pub fn listeners(&self) -> Vec<Listener> {
        let mut out = Vec::new();
        relay_listeners(&self.relay, &mut out);
        gateway_listeners(&self.gateway, &mut out);
        admin_listener(self.admin, &mut out);
        out
    }
}

/// A relay in a shared registry must be reachable by peers, and a process that forwards to peers
/// must be able to authenticate to them.
fn check_cluster(
    registry: &RegistryConfig,
    relay: &RelayConfig,
    peer: Option<&PeerConfig>,
    forwards: bool,
) -> Result<(), Error> {
    if relay.peer.is_some() && peer.is_none() {
        return Err(invalid(
            "peer",
            "relay.peer_listen needs a [peer] section (its ca verifies peers)",
        ));
    }
    if matches!(registry, RegistryConfig::Etcd { .. }) {
        if relay.peer.is_none() {
            return Err(invalid(
                "relay.peer_listen",
                "required with an etcd registry: other gateways forward through it",
            ));
        }
        if forwards && peer.is_some_and(|p| p.identity.is_none()) {
            return Err(invalid(
                "peer.cert",
                "required with an etcd registry: this process forwards to other relays",
            ));
        }
    }
    Ok(())
}

/// Standalone relays and gateways only make sense with a registry other processes share.
fn require_shared_registry(registry: &RegistryConfig, role: &str) -> Result<(), Error> {
    if *registry == RegistryConfig::Memory {
        return Err(invalid(
            "registry.kind",
            format!(
                "a standalone {role} needs a shared registry (kind = \"etcd\"); `postern server` runs one process alone"
            ),
        ));
    }
    Ok(())
}

// `postern relay`: a relay alone.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayRoleFile {
    pub relay: RelayFile,
    pub peer: Option<PeerFile>,
    #[serde(default)]
    pub registry: RegistryFile,
    #[serde(default)]
    pub admin: AdminFile,
}

#[derive(Clone, Debug)]
pub struct RelayRoleConfig {
    pub relay: RelayConfig,
    pub peer: Option<PeerConfig>,
    pub registry: RegistryConfig,
    pub admin: Option<SocketAddr>,
}

impl RelayRoleConfig {
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::from_file(read_toml(path)?)
    }

    pub fn from_file(f: RelayRoleFile) -> Result<Self, Error> {
        let mut errors = Errors::default();
        let peer = errors.take(f.peer.map(PeerConfig::from_file).transpose());
        let registry = errors.take(
            RegistryConfig::from_file(f.registry)
                .and_then(|r| require_shared_registry(&r, "relay").map(|()| r)),
        );
        let relay = errors.take(RelayConfig::from_file(f.relay));
        let admin = errors.take(admin(f.admin, ADMIN_DEFAULT));
        let (Some(peer), Some(registry), Some(relay), Some(admin)) = (peer, registry, relay, admin)
        else {
            return Err(errors
                .finish()
                .err()
                .unwrap_or_else(|| invalid("(config)", "invalid")));
        };
        let config = RelayRoleConfig {
            relay,
            peer,
            registry,
            admin,
        };
        errors.take(check_cluster(
            &config.registry,
            &config.relay,
            config.peer.as_ref(),
            false,
        ));
        errors.take(check_listeners(&config.listeners()));
        errors.finish()?;
        Ok(config)
    }

    /// Every socket the relay opens.
    pub fn listeners(&self) -> Vec<Listener> {
        let mut out = Vec::new();
        relay_listeners(&self.relay, &mut out);
        admin_listener(self.admin, &mut out);
        out
    }
}

// `postern gateway`: front doors alone, forwarding to relays over peer connections.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRoleFile {
    pub gateway: GatewayFile,
    pub peer: PeerFile,
    #[serde(default)]
    pub registry: RegistryFile,
    #[serde(default)]
    pub admin: AdminFile,
}

#[derive(Clone, Debug)]
pub struct GatewayRoleConfig {
    pub gateway: GatewayConfig,
    pub peer: PeerConfig,
    pub registry: RegistryConfig,
    pub admin: Option<SocketAddr>,
}

impl GatewayRoleConfig {
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::from_file(read_toml(path)?)
    }

    pub fn from_file(f: GatewayRoleFile) -> Result<Self, Error> {
        let mut errors = Errors::default();
        let peer = errors.take(PeerConfig::from_file(f.peer).and_then(|peer| {
            if peer.identity.is_none() {
                return Err(invalid(
                    "peer.cert",
                    "a gateway needs a peer certificate to forward through relays",
                ));
            }
            Ok(peer)
        }));
        let registry = errors.take(
            RegistryConfig::from_file(f.registry)
                .and_then(|r| require_shared_registry(&r, "gateway").map(|()| r)),
        );
        let gateway = errors.take(GatewayConfig::from_file(f.gateway));
        let admin = errors.take(admin(f.admin, ADMIN_DEFAULT));
        let (Some(peer), Some(registry), Some(gateway), Some(admin)) =
            (peer, registry, gateway, admin)
        else {
            return Err(errors
                .finish()
                .err()
                .unwrap_or_else(|| invalid("(config)", "invalid")));
        };
        let config = GatewayRoleConfig {
            gateway,
            peer,
            registry,
            admin,
        };
        errors.take(check_listeners(&config.listeners()));
        errors.finish()?;
        Ok(config)
    }

    /// Every socket the gateway opens.
    pub fn listeners(&self) -> Vec<Listener> {
        let mut out = Vec::new();
        gateway_listeners(&self.gateway, &mut out);
        admin_listener(self.admin, &mut out);
        out
    }
}

/// What kind of config a file holds, told by its top-level keys (for `postern check`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Agent,
    Server,
    Relay,
    Gateway,
}

/// Loads and converts `path` as `role` (or the role its top-level keys suggest), returning a
/// one-line summary on success.
pub fn check(path: &Path, role: Option<Role>) -> Result<String, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let role =
        match role {
            Some(r) => r,
            None => {
                let table: toml::Table = parse_toml(&text, path)?;
                match (
                    table.contains_key("relays"),
                    table.contains_key("relay"),
                    table.contains_key("gateway"),
                ) {
                    (true, _, _) => Role::Agent,
                    (_, true, true) => Role::Server,
                    (_, true, false) => Role::Relay,
                    (_, false, true) => Role::Gateway,
                    _ => return Err(invalid(
                        "(top level)",
                        "cannot tell the role: expected `relays` (agent), [relay] and/or [gateway]",
                    )),
                }
            }
        };
    let socks = |g: &GatewayConfig| g.socks5.map_or("off".to_string(), |a| a.to_string());
    let registry = |r: &RegistryConfig| match r {
        RegistryConfig::Memory => "memory registry".to_string(),
        RegistryConfig::Etcd { endpoints, .. } => {
            format!("etcd registry ({} endpoint(s))", endpoints.len())
        }
    };
    let listening = |listeners: Vec<Listener>| {
        if listeners.is_empty() {
            return "\nno listeners".to_string();
        }
        let mut text = String::from("\nlisteners:");
        for l in listeners {
            text.push_str(&format!("\n  {l}"));
        }
        text
    };
    let summary = match role {
        Role::Agent => {
            let c = AgentConfig::from_file(parse_toml(&text, path)?)?;
            let mut listeners = Vec::new();
            admin_listener(c.admin, &mut listeners);
            format!(
                "agent config OK: id {}, namespace {}, {} relay endpoint(s), {} port range(s){}",
                c.id,
                c.namespace,
                c.relays.len(),
                c.ports.len(),
                listening(listeners)
            )
        }
        Role::Server => {
            let c = ServerConfig::from_file(parse_toml(&text, path)?)?;
            format!(
                "server config OK: relay {} on {}, {} agent credential(s), socks5 {}, {}{}{}",
                c.relay.id,
                c.relay.listen,
                c.relay.agents.len(),
                socks(&c.gateway),
                registry(&c.registry),
                overlap_warnings(&c.relay.agents),
                listening(c.listeners())
            )
        }
        Role::Relay => {
            let c = RelayRoleConfig::from_file(parse_toml(&text, path)?)?;
            format!(
                "relay config OK: relay {} on {}, {} agent credential(s), {}{}{}",
                c.relay.id,
                c.relay.listen,
                c.relay.agents.len(),
                registry(&c.registry),
                overlap_warnings(&c.relay.agents),
                listening(c.listeners())
            )
        }
        Role::Gateway => {
            let c = GatewayRoleConfig::from_file(parse_toml(&text, path)?)?;
            format!(
                "gateway config OK: socks5 {}, {}{}",
                socks(&c.gateway),
                registry(&c.registry),
                listening(c.listeners())
            )
        }
    };
    Ok(summary)
}

/// `postern check`'s warning lines (each starting with a newline) for token credentials whose
/// `allow` ranges overlap in a namespace both may join: either may claim the addresses in the
/// overlap, and between them a claim is first come, first served.
fn overlap_warnings(agents: &[AgentCredential]) -> String {
    let mut out = String::new();
    for (i, a) in agents.iter().enumerate() {
        for (j, b) in agents.iter().enumerate().skip(i + 1) {
            let shared_namespace = a.namespaces.is_empty()
                || b.namespaces.is_empty()
                || a.namespaces.iter().any(|n| b.namespaces.contains(n));
            if !shared_namespace {
                continue;
            }
            for x in &a.allow {
                for y in &b.allow {
                    let overlap = if x.contains(&y.network()) {
                        Some(y)
                    } else if y.contains(&x.network()) {
                        Some(x)
                    } else {
                        None
                    };
                    if let Some(net) = overlap {
                        out.push_str(&format!(
                            "\nwarning: relay.agents[{i}] ({}) and relay.agents[{j}] ({}) may both claim {net}: \
                             whichever connects first holds an address; give each host its own credential \
                             (an agent certificate bound to its IP) or split the ranges",
                            a.name, b.name
                        ));
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod claim_tests {
    use super::*;

    #[test]
    fn id_patterns_match_whole_ids() {
        for (pattern, id, expected) in [
            ("web", "web", true),
            ("web", "web-1", false),
            ("web-*", "web-1", true),
            ("web-*", "web-", true),
            ("web-*", "web", false),
            ("web-*", "db-1", false),
            ("*-db", "eu-db", true),
            ("*-db", "eu-db-2", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "acb", false),
            ("*", "anything", true),
            ("ab*ba", "aba", false),
        ] {
            assert_eq!(id_matches(pattern, id), expected, "{pattern} vs {id}");
        }
    }

    #[test]
    fn overlapping_credentials_are_warned_about() {
        let cred = |name: &str, allow: &[&str], namespaces: &[&str]| AgentCredential {
            namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
            ..AgentCredential::new(
                name,
                name,
                allow.iter().map(|a| a.parse().unwrap()).collect(),
            )
        };
        let a = cred("vpc-a", &["10.1.0.0/16"], &[]);
        let b = cred("vpc-b", &["10.2.0.0/16", "10.1.7.0/24"], &[]);
        let c = cred("vpc-c", &["10.3.0.0/16"], &[]);
        let warnings = overlap_warnings(&[a.clone(), b.clone(), c.clone()]);
        assert_eq!(
            warnings.lines().filter(|l| !l.is_empty()).count(),
            1,
            "{warnings}"
        );
        assert!(
            warnings.contains(
                "relay.agents[0] (vpc-a) and relay.agents[1] (vpc-b) may both claim 10.1.7.0/24"
            ),
            "{warnings}"
        );
        assert_eq!(overlap_warnings(&[a.clone(), c]), "");
        // Disjoint namespaces never meet.
        let a_only = cred("vpc-a", &["10.1.0.0/16"], &["a"]);
        let b_only = cred("vpc-b", &["10.1.0.0/16"], &["b"]);
        assert_eq!(overlap_warnings(&[a_only.clone(), b_only]), "");
        let b_any = cred("vpc-b", &["10.1.0.0/16"], &[]);
        assert!(overlap_warnings(&[a_only, b_any]).starts_with("\nwarning: "));
    }
}

#[cfg(test)]
mod registry_tests {
    use super::*;

    fn etcd(endpoints: &[&str]) -> RegistryFile {
        RegistryFile {
            kind: Some(RegistryKind::Etcd),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            ..RegistryFile::default()
        }
    }

    fn error_key(f: RegistryFile) -> String {
        match RegistryConfig::from_file(f) {
            Err(Error::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn etcd_tls_and_users_are_checked_key_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = crate::cert::generate_bundle(dir.path(), "etcd").unwrap();
        let https = ["https://127.0.0.1:2379"];

        assert_eq!(error_key(etcd(&https)), "registry.ca");
        let mut f = etcd(&["http://127.0.0.1:2379"]);
        f.ca = Some(bundle.ca.clone());
        assert_eq!(error_key(f), "registry.ca");
        assert_eq!(
            error_key(etcd(&["https://127.0.0.1:2379", "http://127.0.0.1:2380"])),
            "registry.endpoints"
        );
        let mut f = etcd(&https);
        f.ca = Some(bundle.ca.clone());
        f.cert = Some(bundle.relay_cert.clone());
        assert_eq!(error_key(f), "registry.key");
        let mut f = etcd(&https);
        f.ca = Some(dir.path().join("missing.pem"));
        assert_eq!(error_key(f), "registry.ca");
        let mut f = etcd(&["http://127.0.0.1:2379"]);
        f.username = Some("postern".into());
        assert_eq!(error_key(f), "registry.password");
        let mut f = etcd(&["http://127.0.0.1:2379"]);
        f.max_staleness = Some(HumanDuration(Duration::from_secs(1)));
        assert_eq!(error_key(f), "registry.max_staleness");
        let f = RegistryFile {
            ca: Some(bundle.ca.clone()),
            ..RegistryFile::default()
        };
        assert_eq!(error_key(f), "registry.ca");

        let mut f = etcd(&https);
        f.ca = Some(bundle.ca.clone());
        f.cert = Some(bundle.relay_cert.clone());
        f.key = Some(bundle.relay_key.clone());
        f.username = Some("postern".into());
        f.password = Some("hunter2-literal".into());
        let config = RegistryConfig::from_file(f).unwrap();
        let RegistryConfig::Etcd {
            security,
            max_staleness,
            ..
        } = &config
        else {
            panic!("not etcd: {config:?}")
        };
        assert_eq!(*max_staleness, Duration::from_secs(30));
        let tls = security.tls.as_ref().unwrap();
        assert_eq!(tls.ca, bundle.ca);
        assert!(tls.client.is_some());
        assert_eq!(
            security.auth.as_ref().unwrap().password.expose(),
            "hunter2-literal"
        );
        assert!(!format!("{config:?}").contains("hunter2"), "{config:?}");
    }
}
