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

mod agent;
mod gateway;
mod peer;
mod registry;
mod relay;
mod roles;

pub use agent::*;
pub use gateway::*;
pub use peer::*;
pub use registry::*;
pub use relay::*;
pub use roles::*;

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
    /// The error to return when a part came out missing: what was collected (a part is missing
    /// only because its error was).
    fn failed(self) -> Error {
        self.finish()
            .err()
            .unwrap_or_else(|| invalid("(config)", "invalid"))
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
    let tcp = match relay.tcp_listen {
        TcpListen::SameAsQuic => Some(relay.listen),
        TcpListen::At(addr) => Some(addr),
        TcpListen::Off => None,
    };
    if let Some(addr) = tcp {
        out.push(Listener {
            key: "relay.tcp_listen",
            serves: "agent tunnels (TCP + TLS)",
            protocol: Protocol::Tcp,
            addr,
        });
    }
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
        // Zero is no way to turn keep-alives off: an agent's liveness checks tick at this period.
        if t.keep_alive.is_zero() {
            return Err(invalid(
                &format!("{key}.keep_alive"),
                "must be greater than 0",
            ));
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
                "server config OK: relay {} on {}, {} agent credential(s), socks5 {}, {}{}{}{}",
                c.relay.id,
                c.relay.listen,
                c.relay.agents.len(),
                socks(&c.gateway),
                registry(&c.registry),
                overlap_warnings(&c.relay.agents),
                certificate_id_warnings(&c.relay),
                listening(c.listeners())
            )
        }
        Role::Relay => {
            let c = RelayRoleConfig::from_file(parse_toml(&text, path)?)?;
            format!(
                "relay config OK: relay {} on {}, {} agent credential(s), {}{}{}{}",
                c.relay.id,
                c.relay.listen,
                c.relay.agents.len(),
                registry(&c.registry),
                overlap_warnings(&c.relay.agents),
                certificate_id_warnings(&c.relay),
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

/// `postern check`'s warning lines for token credentials that may use agent ids they do not list
/// exactly (any id, or a `*` pattern) in a namespace agent certificates join: a certificate binds
/// its agent id to its name, but while that agent is down such a token's holders can take the id,
/// and its `<id>.<suffix>` name (only ids listed exactly are reserved).
fn certificate_id_warnings(relay: &RelayConfig) -> String {
    if relay.agent_ca.is_none() {
        return String::new();
    }
    let mut out = String::new();
    for (i, a) in relay.agents.iter().enumerate() {
        let shared = relay
            .agent_cert_namespaces
            .iter()
            .find(|n| a.namespaces.is_empty() || a.namespaces.contains(n));
        let broad = a.ids.is_empty() || a.ids.iter().any(|id| id.contains('*'));
        if let (true, Some(namespace)) = (broad, shared) {
            out.push_str(&format!(
                "\nwarning: relay.agents[{i}] ({}) may use agent ids it does not list exactly \
                 (any id, or a pattern) in namespace {namespace}, which agent certificates join: \
                 while a certificate's agent is down, this token's holders can take its id and its \
                 name; list the ids the token may use (ids), or keep it to other namespaces",
                a.name
            ));
        }
    }
    out
}

#[cfg(test)]
mod claim_tests;
#[cfg(test)]
mod registry_tests;
