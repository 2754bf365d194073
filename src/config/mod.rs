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
mod check;
mod gateway;
mod peer;
mod registry;
mod relay;
mod roles;
mod transport;

pub use agent::*;
#[cfg(test)]
use check::{certificate_id_warnings, overlap_warnings};
pub use check::{check, Role};
pub use gateway::*;
pub use peer::*;
pub use registry::*;
pub use relay::*;
pub use roles::*;
pub use transport::*;

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

#[cfg(test)]
mod claim_tests;
#[cfg(test)]
mod registry_tests;
