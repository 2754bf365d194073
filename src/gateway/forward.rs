//! Turns a client's target into a stream on the tunnel that owns it: look the IP up in the route
//! cache, then try each owner in order — this process's relay first, then relays whose peer
//! connection is healthy, then the rest — until one accepts.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use quinn::{RecvStream, SendStream};

use super::pool::PeerPool;
use crate::protocol::{Code, Forward};
use crate::registry::cache::{Owner, RouteCache};
use crate::relay::{InFlight, Relay};

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

impl std::fmt::Display for Requested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Requested::Ip(addr) => write!(f, "{addr}"),
            Requested::Name(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

/// The stream a forward opened, and who carries it (for logs).
pub struct Opened {
    pub send: SendStream,
    pub recv: RecvStream,
    pub relay_id: Arc<str>,
    pub agent_id: Arc<str>,
    /// Set when the local relay carries the stream: counts it as in flight for its drain.
    pub guard: Option<InFlight>,
}

pub struct Forwarder {
    cache: Arc<RouteCache>,
    local: Option<Arc<Relay>>,
    peers: Option<PeerPool>,
    agent_suffix: String,
    resolve_names: bool,
    rotation: AtomicUsize,
}

impl Forwarder {
    pub fn new(
        cache: Arc<RouteCache>,
        local: Option<Arc<Relay>>,
        peers: Option<PeerPool>,
        agent_suffix: String,
        resolve_names: bool,
    ) -> Self {
        Forwarder {
            cache,
            local,
            peers,
            agent_suffix,
            resolve_names,
            rotation: AtomicUsize::new(0),
        }
    }

    pub fn cache(&self) -> &Arc<RouteCache> {
        &self.cache
    }

    pub fn peers(&self) -> Option<&PeerPool> {
        self.peers.as_ref()
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

    /// The owners of `target` in the order to try them.
    fn ordered_owners(&self, target: &Target) -> Vec<Owner> {
        let mut owners = self.cache.owners(&target.namespace, target.addr.ip());
        if owners.len() > 1 {
            // Spread load over equal owners; the stable sort below keeps this rotation within ranks.
            let n = self.rotation.fetch_add(1, Ordering::Relaxed) % owners.len();
            owners.rotate_left(n);
        }
        let local_id = self.local.as_ref().map(|l| l.id().to_string());
        owners.sort_by_key(|o| {
            let local = local_id.as_deref() == Some(&*o.relay_id);
            let down = self.peers.as_ref().is_some_and(|p| p.is_down(&o.relay_id));
            (!local, o.draining, down)
        });
        owners
    }

    /// Opens a stream to `target` through the first owner that accepts. Owners answering with a
    /// stale-route code (no such session, not mine, draining, unreachable relay) are skipped; a
    /// definite answer (port not exposed, connection refused) ends the search.
    pub async fn open(&self, target: &Target) -> Result<Opened, Code> {
        let owners = self.ordered_owners(target);
        if owners.is_empty() {
            // The cache may trail this process's own session table by a moment.
            if let Some(local) = self
                .local
                .as_ref()
                .filter(|l| l.serves(&target.namespace, target.addr.ip()))
            {
                let t = local.open(&target.namespace, target.addr, None).await?;
                return Ok(Opened {
                    send: t.send,
                    recv: t.recv,
                    relay_id: local.id().into(),
                    agent_id: "".into(),
                    guard: Some(t.guard),
                });
            }
            return Err(Code::NoRoute);
        }
        let mut last = Code::NoRoute;
        let count = owners.len();
        for (index, owner) in owners.into_iter().enumerate() {
            let result = match (&self.local, &self.peers) {
                (Some(local), _) if *owner.relay_id == *local.id() => local
                    .open(&target.namespace, target.addr, Some(owner.session_id))
                    .await
                    .map(|t| (t.send, t.recv, Some(t.guard))),
                (_, Some(peers)) => {
                    let forward = Forward {
                        namespace: target.namespace.clone(),
                        target: target.addr,
                        session_id: Some(owner.session_id),
                    };
                    peers
                        .forward(&owner.relay_id, forward, index + 1 == count)
                        .await
                        .map(|(s, r)| (s, r, None))
                }
                _ => Err(Code::Internal),
            };
            let label = match &result {
                Ok(_) => "ok",
                Err(code) => crate::metrics::code_label(*code),
            };
            crate::metrics::metrics()
                .open_attempts
                .get_or_create(&crate::metrics::Outcome { result: label })
                .inc();
            match result {
                Ok((send, recv, guard)) => {
                    return Ok(Opened {
                        send,
                        recv,
                        relay_id: owner.relay_id,
                        agent_id: owner.agent_id,
                        guard,
                    })
                }
                Err(code) if code.try_next_owner() => {
                    tracing::debug!(relay_id = %owner.relay_id, session_id = %owner.session_id, ?code, "owner failed; trying next");
                    last = code;
                }
                Err(code) => return Err(code),
            }
        }
        Err(last)
    }
}
