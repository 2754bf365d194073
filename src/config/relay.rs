//! Relay.

use super::*;

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
    /// Tunnels agents holding this token may hold on one relay at once.
    pub max_tunnels: Option<u32>,
    /// Addresses the tunnels of agents holding this token may claim on one relay, in all.
    pub max_addresses: Option<u32>,
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
    /// What this credential's tunnels may hold on one relay; unbounded when not set.
    pub quota: Quota,
}

/// What one credential's tunnels may hold on one relay (`max_tunnels`, `max_addresses` of a
/// `[[relay.agents]]` entry), so that the holder of one network's token cannot take the relay's
/// `max_tunnels`, or its memory and the registry's, from every other network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quota {
    /// Tunnels at once.
    pub tunnels: Option<u32>,
    /// Addresses claimed, summed over the tunnels (an agent's two tunnels on one relay count its
    /// addresses twice).
    pub addresses: Option<u32>,
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
            quota: Quota::default(),
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
            for (name, limit) in [
                ("max_tunnels", a.max_tunnels),
                ("max_addresses", a.max_addresses),
            ] {
                if limit == Some(0) {
                    return Err(invalid(
                        &format!("{key}.{name}"),
                        "must be at least 1 (leave it out for no bound)",
                    ));
                }
            }
            agents.push(AgentCredential {
                token_sha256: parse_hex32(&a.token_sha256, &format!("{key}.token_sha256"))?,
                name: a.name,
                allow: a.allow,
                namespaces,
                ids,
                quota: Quota {
                    tunnels: a.max_tunnels,
                    addresses: a.max_addresses,
                },
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
