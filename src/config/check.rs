//! `postern check`: what kind of config a file holds, its conversion, the one-line summary and
//! the warnings about credentials.

use super::*;

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
pub(super) fn overlap_warnings(agents: &[AgentCredential]) -> String {
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
pub(super) fn certificate_id_warnings(relay: &RelayConfig) -> String {
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
