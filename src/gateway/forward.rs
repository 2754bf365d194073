//! Turns a client's target into a stream on the tunnel that owns it: look the IP up in the route
//! cache, then try each owner in order — owners not recently demoted first, then this process's
//! relay, then relays whose peer connection is healthy, then the rest — until one accepts. Each
//! attempt has its own deadline, and a slow one is hedged: the next owner starts alongside it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{RecvStream, SendStream};

use super::pool::PeerPool;
use crate::protocol::{self, Code, Forward};
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
    peers: Option<Arc<PeerPool>>,
    agent_suffix: String,
    resolve_names: bool,
    rotation: AtomicUsize,
    health: Arc<Health>,
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
            peers: peers.map(Arc::new),
            agent_suffix,
            resolve_names,
            rotation: AtomicUsize::new(0),
            health: Arc::default(),
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
            (self.health.is_demoted(o), !local, o.draining, down)
        });
        owners
    }

    /// Opens a stream to `target` through the first owner that accepts. Owners are tried in
    /// order, each attempt under its own deadline ([`protocol::ATTEMPT_TIMEOUT`]); an attempt
    /// unanswered after [`protocol::HEDGE_DELAY`] gets the next owner tried alongside it, and a
    /// failed one starts the next at once. Owners answering with a stale-route code (no such
    /// session, not mine, draining, unreachable relay) are skipped; a definite answer (port not
    /// exposed, connection refused) ends the search. What each attempt ended as is learned per
    /// (relay, session) and orders the owners of later connections.
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
        let count = owners.len();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, Attempt)>(count);
        let mut started = 0;
        let mut pending = vec![false; count];
        let mut last = Code::NoRoute;
        // The first attempt starts at once; each later one when the hedge delay runs out or the
        // attempts before it failed.
        let hedge = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(hedge);
        let finish = |rx: &mut tokio::sync::mpsc::Receiver<(usize, Attempt)>| {
            // Attempts still running see the channel closed and discard what they open; what
            // already arrived is discarded here.
            rx.close();
            while let Ok((_, result)) = rx.try_recv() {
                if let Ok(opened) = result {
                    discard(opened);
                }
            }
        };
        loop {
            let running = pending.iter().any(|p| *p);
            if !running && started == count {
                return Err(last);
            }
            tokio::select! {
                biased;
                Some((index, result)) = rx.recv(), if running => {
                    pending[index] = false;
                    match result {
                        Ok((send, recv, guard)) => {
                            // Owners still silent were overtaken: try others first for a while.
                            for (i, _) in pending.iter().enumerate().filter(|(_, p)| **p) {
                                self.health.demote(&owners[i]);
                            }
                            finish(&mut rx);
                            let owner = &owners[index];
                            return Ok(Opened {
                                send,
                                recv,
                                relay_id: owner.relay_id.clone(),
                                agent_id: owner.agent_id.clone(),
                                guard,
                            });
                        }
                        Err(code) if code.try_next_owner() => {
                            let owner = &owners[index];
                            tracing::debug!(relay_id = %owner.relay_id, session_id = %owner.session_id, ?code, "owner failed; trying next");
                            last = code;
                            hedge.as_mut().reset(tokio::time::Instant::now());
                        }
                        Err(code) => {
                            finish(&mut rx);
                            return Err(code);
                        }
                    }
                }
                _ = &mut hedge, if started < count => {
                    let index = started;
                    started += 1;
                    pending[index] = true;
                    self.attempt(target, &owners[index], index, index + 1 == count, tx.clone());
                    hedge.as_mut().reset(tokio::time::Instant::now() + protocol::HEDGE_DELAY);
                }
            }
        }
    }

    /// Starts one attempt through `owner` in a task of its own, so that a hedge that wins does not
    /// cut it off mid-exchange: it ends by itself, records its outcome, and hands its stream to
    /// `tx` (or resets it when nobody wants it any more).
    fn attempt(
        &self,
        target: &Target,
        owner: &Owner,
        index: usize,
        last_resort: bool,
        tx: tokio::sync::mpsc::Sender<(usize, Attempt)>,
    ) {
        let local = self.local.clone();
        let peers = self.peers.clone();
        let health = self.health.clone();
        let owner = owner.clone();
        let target = target.clone();
        tokio::spawn(async move {
            let attempt = async {
                match (&local, &peers) {
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
                            .forward(&owner.relay_id, forward, last_resort)
                            .await
                            .map(|(s, r)| (s, r, None))
                    }
                    _ => Err(Code::Internal),
                }
            };
            let result = tokio::time::timeout(protocol::ATTEMPT_TIMEOUT, attempt)
                .await
                .unwrap_or(Err(Code::Timeout));
            let label = match &result {
                Ok(_) => "ok",
                Err(code) => crate::metrics::code_label(*code),
            };
            crate::metrics::metrics()
                .open_attempts
                .get_or_create(&crate::metrics::Outcome { result: label })
                .inc();
            match &result {
                // The relay or the path to the agent failed, or nothing answered in time.
                Err(Code::Internal | Code::Timeout) => health.demote(&owner),
                // A stale route says nothing about the path; it leaves the cache by itself.
                Err(Code::NoSuchSession | Code::NotMine | Code::Draining) => {}
                // The agent answered: the path works.
                _ => health.restore(&owner),
            }
            if let Err(tokio::sync::mpsc::error::SendError((_, Ok(opened)))) =
                tx.send((index, result)).await
            {
                discard(opened);
            }
        });
    }
}

/// What one attempt through one owner ended as: the stream pair, and the local relay's in-flight
/// guard when it carries the stream.
type Attempt = Result<(SendStream, RecvStream, Option<InFlight>), Code>;

/// Resets a stream an attempt opened after another attempt already won, so the agent closes the
/// connection it dialled for it.
fn discard((mut send, mut recv, _guard): (SendStream, RecvStream, Option<InFlight>)) {
    let code = quinn::VarInt::from_u32(crate::protocol::close::STREAM_ABORTED);
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

/// First demotion of a (relay, session) pair; each further strike doubles it, up to
/// `DEMOTE_BASE * 2^(MAX_STRIKES - 1)`.
const DEMOTE_BASE: Duration = Duration::from_secs(1);
const MAX_STRIKES: u32 = 5;
/// A pair that has not failed for this long after its demotion ended starts again from no strikes.
const FORGET_AFTER: Duration = Duration::from_secs(30);

/// Health of (relay, session) pairs, learned from the outcomes of attempts (outlier detection): a
/// timeout, a broken relay, or being overtaken by a hedge demotes a pair, so later connections try
/// the other owners first while it lasts; the demotion grows with repeated failures and decays
/// with time; any answer from the agent restores the pair. A demoted pair is still tried, last,
/// so a connection is never refused only because of an old mark.
#[derive(Default)]
struct Health {
    marks: Mutex<HashMap<(Arc<str>, u64), Mark>>,
}

struct Mark {
    strikes: u32,
    until: Instant,
}

impl Health {
    fn demote(&self, owner: &Owner) {
        let now = Instant::now();
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        marks.retain(|_, m| now < m.until + FORGET_AFTER);
        let mark = marks
            .entry((owner.relay_id.clone(), owner.session_id))
            .or_insert(Mark {
                strikes: 0,
                until: now,
            });
        mark.strikes = (mark.strikes + 1).min(MAX_STRIKES);
        mark.until = now + DEMOTE_BASE * (1 << (mark.strikes - 1));
    }

    fn restore(&self, owner: &Owner) {
        self.marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(owner.relay_id.clone(), owner.session_id));
    }

    fn is_demoted(&self, owner: &Owner) -> bool {
        self.marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(owner.relay_id.clone(), owner.session_id))
            .is_some_and(|m| Instant::now() < m.until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(relay: &str, session: u64) -> Owner {
        Owner {
            relay_id: relay.into(),
            session_id: session,
            agent_id: "a".into(),
            draining: false,
            connected_at: 0,
            credential: None,
            transport: None,
        }
    }

    #[test]
    fn health_demotes_per_pair_and_restores_on_success() {
        let health = Health::default();
        let (a, b) = (owner("relay-1", 1), owner("relay-2", 2));
        health.demote(&a);
        assert!(health.is_demoted(&a));
        assert!(!health.is_demoted(&b), "another pair is untouched");
        assert!(
            !health.is_demoted(&owner("relay-1", 3)),
            "another session on the same relay is untouched"
        );
        for _ in 0..10 {
            health.demote(&a);
        }
        let until = health.marks.lock().unwrap()[&(a.relay_id.clone(), 1)].until;
        let longest = DEMOTE_BASE * (1 << (MAX_STRIKES - 1));
        assert!(until <= Instant::now() + longest, "demotion is capped");
        health.restore(&a);
        assert!(!health.is_demoted(&a));
    }
}
