//! Turns a client's target into a stream on the tunnel that owns it: resolve what the client asked
//! for, look the IP up in the route cache, and open through its owners as the failover
//! ([`super::failover`]) decides: in its order, each attempt under its own deadline, slow ones
//! hedged.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use quinn::{RecvStream, SendStream};

use super::failover::{Cause, Failover, OpenError};
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
    /// Bytes the client sent right behind its request, read with it: they go first, counted as
    /// the client's bytes up.
    pub early: bytes::Bytes,
}

pub struct Forwarder {
    cache: Arc<RouteCache>,
    local: Option<Arc<Relay>>,
    peers: Option<Arc<PeerPool>>,
    agent_suffix: String,
    resolve_names: bool,
    failover: Failover,
}

impl Forwarder {
    pub fn new(
        cache: Arc<RouteCache>,
        local: Option<Arc<Relay>>,
        peers: Option<PeerPool>,
        agent_suffix: String,
        resolve_names: bool,
    ) -> Self {
        let failover = Failover::default();
        let peers = peers.map(|mut pool| {
            pool.report_to(failover.health().clone());
            Arc::new(pool)
        });
        Forwarder {
            cache,
            local,
            peers,
            agent_suffix,
            resolve_names,
            failover,
        }
    }

    pub fn cache(&self) -> &Arc<RouteCache> {
        &self.cache
    }

    pub fn peers(&self) -> Option<&PeerPool> {
        self.peers.as_deref()
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

    /// The failover this forwarder opens through.
    pub fn failover(&self) -> &Failover {
        &self.failover
    }

    /// Opens a stream to `target` through the first owner that accepts; the failover
    /// ([`super::failover`]) orders the owners, hedges slow attempts and learns from each outcome.
    pub async fn open(&self, target: &Target) -> Result<Opened, OpenError> {
        let local_id = self.local.as_ref().map(|l| l.id().to_string());
        let owners = self.failover.order(
            self.cache.owners(&target.namespace, target.addr.ip()),
            local_id.as_deref(),
        );
        if owners.is_empty() {
            // The cache may trail this process's own session table by a moment.
            if let Some(local) = self
                .local
                .as_ref()
                .filter(|l| l.serves(&target.namespace, target.addr.ip()))
            {
                let opened = tokio::time::timeout(
                    crate::protocol::OPEN_TIMEOUT,
                    local.open(&target.namespace, target.addr, None),
                )
                .await
                .unwrap_or(Err(Code::Timeout));
                let opened = opened.map_err(|code| OpenError {
                    cause: Cause::from_answer(code),
                    owner: None,
                    attempts: 1,
                })?;
                return Ok(Opened {
                    send: opened.send,
                    recv: opened.recv,
                    relay_id: local.id().into(),
                    agent_id: "".into(),
                    guard: Some(opened.guard),
                    early: bytes::Bytes::new(),
                });
            }
            return Err(OpenError::before_open(Code::NoRoute));
        }
        let start = |owner: Owner, last_resort: bool| {
            let local = self.local.clone();
            let peers = self.peers.clone();
            let target = target.clone();
            async move {
                match (&local, &peers) {
                    (Some(local), _) if *owner.relay_id == *local.id() => local
                        .open(&target.namespace, target.addr, Some(owner.session_id))
                        .await
                        .map(|t| (t.send, t.recv, Some(t.guard)))
                        .map_err(Cause::from_answer),
                    (_, Some(peers)) => {
                        let forward = Forward {
                            namespace: target.namespace.clone(),
                            target: target.addr,
                            session_id: Some(owner.session_id),
                        };
                        peers
                            .forward(&owner.relay_id, forward, last_resort)
                            .await
                            .map(|(s, r)| (s, r, None))
                    }
                    // A remote owner and no peer pool to reach it with.
                    _ => Err(Cause::PeerUnreachable),
                }
            }
        };
        let ((send, recv, guard), owner) = self.failover.open(owners, start, discard).await?;
        Ok(Opened {
            send,
            recv,
            relay_id: owner.relay_id,
            agent_id: owner.agent_id,
            guard,
            early: bytes::Bytes::new(),
        })
    }
}

/// Resets a stream an attempt opened after another attempt already won, so the agent closes the
/// connection it dialled for it.
fn discard((send, recv, _guard): (SendStream, RecvStream, Option<InFlight>)) {
    crate::protocol::abandon(send, recv);
}
