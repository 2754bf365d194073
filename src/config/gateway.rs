//! Gateway.

use super::*;

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
