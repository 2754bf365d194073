//! Agent.

use super::*;

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
        if ports.len() > crate::protocol::MAX_AGENT_PORT_RANGES {
            return Err(invalid(
                "ports",
                format!(
                    "lists {} ports or ranges; an agent may expose at most {} (use ranges: \"8000-8099\")",
                    ports.len(),
                    crate::protocol::MAX_AGENT_PORT_RANGES
                ),
            ));
        }
        let redundancy = f.redundancy.unwrap_or(2);
        if !(1..=8).contains(&redundancy) {
            return Err(invalid("redundancy", "must be 1-8"));
        }
        let reconnect_min = f.reconnect_min.map_or(Duration::from_millis(200), |d| d.0);
        let reconnect_max = f.reconnect_max.map_or(Duration::from_secs(30), |d| d.0);
        if reconnect_min.is_zero() || reconnect_min > reconnect_max {
            return Err(invalid("reconnect_min", "must be > 0 and <= reconnect_max"));
        }
        if f.ips.len() > crate::protocol::MAX_AGENT_IPS {
            return Err(invalid(
                "ips",
                format!(
                    "lists {} addresses; an agent may claim at most {}",
                    f.ips.len(),
                    crate::protocol::MAX_AGENT_IPS
                ),
            ));
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
            transport: {
                let t = Transport::from_file(f.transport, "transport")?;
                // A tunnel pings once per keep-alive interval (`tunnel = "auto"`); relays close one
                // that pings faster than `MIN_AGENT_KEEP_ALIVE` allows.
                if t.keep_alive < MIN_AGENT_KEEP_ALIVE {
                    return Err(invalid(
                        "transport.keep_alive",
                        "must be at least 250ms on an agent (relays close a tunnel that pings \
                         more than 4 times a second)",
                    ));
                }
                t
            },
            admin: admin(f.admin, AGENT_ADMIN_DEFAULT)?,
        })
    }
}

/// The shortest keep-alive interval an agent may use: its tunnels ping once per interval, and a
/// relay closes a tunnel that pings more than 4 times a second (after a burst).
pub const MIN_AGENT_KEEP_ALIVE: Duration = Duration::from_millis(250);

/// The host part of `host:port` / `[v6]:port`.
pub fn host_of(endpoint: &str) -> &str {
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}
