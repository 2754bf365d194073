//! Turns a client's target into a stream on the tunnel that owns it: look the IP up in the route
//! cache, then try each owner in order (this process's relay first) until one accepts.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use quinn::{RecvStream, SendStream};

use crate::protocol::Code;
use crate::registry::cache::RouteCache;
use crate::relay::Relay;

/// Where a connection goes: a namespace and an address inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub namespace: String,
    pub addr: SocketAddr,
}

/// A client's target as it asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requested {
    Ip(SocketAddr),
    Name(String, u16),
}

/// The stream a forward opened, and who carries it (for logs).
pub struct Opened {
    pub send: SendStream,
    pub recv: RecvStream,
    pub relay_id: Arc<str>,
    pub agent_id: Arc<str>,
}

pub struct Forwarder {
    cache: Arc<RouteCache>,
    local: Option<Arc<Relay>>,
    agent_suffix: String,
    resolve_names: bool,
}

impl Forwarder {
    pub fn new(
        cache: Arc<RouteCache>,
        local: Option<Arc<Relay>>,
        agent_suffix: String,
        resolve_names: bool,
    ) -> Self {
        Forwarder {
            cache,
            local,
            agent_suffix,
            resolve_names,
        }
    }

    /// Resolves what the client asked for into a routed address. Names are `<agent-id>.<suffix>`
    /// (routed to that agent), or — only when enabled — resolved by the system resolver and then
    /// routed by IP like any address. Nothing here ever dials.
    pub async fn resolve(&self, namespace: &str, requested: &Requested) -> Result<Target, Code> {
        let addr = match requested {
            Requested::Ip(addr) => *addr,
            Requested::Name(name, port) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                if let Some(agent) = name
                    .strip_suffix(&self.agent_suffix)
                    .and_then(|p| p.strip_suffix('.'))
                {
                    let ip = *self
                        .cache
                        .agent_ips(namespace, agent)
                        .first()
                        .ok_or(Code::NoRoute)?;
                    SocketAddr::new(ip, *port)
                } else if let Ok(ip) = name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                {
                    SocketAddr::new(ip, *port)
                } else if self.resolve_names {
                    let found = tokio::net::lookup_host((name.as_str(), *port))
                        .await
                        .map_err(|_| Code::NoRoute)?;
                    found
                        .into_iter()
                        .find(|a| !self.cache.owners(namespace, a.ip()).is_empty())
                        .ok_or(Code::NoRoute)?
                } else {
                    return Err(Code::NoRoute);
                }
            }
        };
        Ok(Target {
            namespace: namespace.to_string(),
            addr,
        })
    }

    /// Opens a stream to `target` through the first owner that accepts. Owners answering with a
    /// stale-route code (no such session, not mine, draining) are skipped; a definite answer (port
    /// not exposed, connection refused) ends the search.
    pub async fn open(&self, target: &Target) -> Result<Opened, Code> {
        let owners = self.cache.owners(&target.namespace, target.addr.ip());
        if owners.is_empty() {
            // The cache may trail this process's own session table by a moment.
            if let Some(local) = self
                .local
                .as_ref()
                .filter(|l| l.serves(&target.namespace, target.addr.ip()))
            {
                let (send, recv) = local.open(&target.namespace, target.addr, None).await?;
                return Ok(Opened {
                    send,
                    recv,
                    relay_id: local.id().into(),
                    agent_id: "".into(),
                });
            }
            return Err(Code::NoRoute);
        }
        let mut ordered = owners;
        if let Some(local) = &self.local {
            ordered.sort_by_key(|o| *o.relay_id != *local.id());
        }
        let mut last = Code::NoRoute;
        for owner in ordered {
            let result = match &self.local {
                Some(local) if *owner.relay_id == *local.id() => {
                    local
                        .open(&target.namespace, target.addr, Some(owner.session_id))
                        .await
                }
                // Peer forwarding to other relays arrives with the cluster roles.
                _ => Err(Code::Internal),
            };
            match result {
                Ok((send, recv)) => {
                    return Ok(Opened {
                        send,
                        recv,
                        relay_id: owner.relay_id,
                        agent_id: owner.agent_id,
                    })
                }
                Err(code) if code.try_next_owner() => {
                    tracing::debug!(relay_id = %owner.relay_id, session_id = owner.session_id, ?code, "owner failed; trying next");
                    last = code;
                }
                Err(code) => return Err(code),
            }
        }
        Err(last)
    }
}
