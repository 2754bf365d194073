//! Failover: the one place that decides which owner of a route carries a connection, and what a
//! failure means.
//!
//! - **Ordering** ([`Failover::order`]): owners whose (relay, session) is not demoted first, then
//!   this process's relay, then owners that are not draining, then relays whose peer connection is
//!   up; equal owners are rotated so load spreads.
//! - **Deadlines and hedging** ([`Failover::open`]): every attempt runs under its own deadline
//!   ([`Policy::attempt_timeout`]) inside the connection's open budget ([`Policy::open_timeout`]);
//!   an attempt unanswered after [`Policy::hedge_delay`] gets the next owner started alongside it,
//!   and a failed one starts the next at once. The first stream opened wins; the others are reset.
//! - **Health** ([`Health`]): learned per (relay, session) from the outcome of every attempt —
//!   a timeout, a broken tunnel or an unreachable relay demotes the pair, an answer from the agent
//!   restores it — and per relay from the peer pool, which reports each failed dial and lost peer
//!   connection (with its back-off) and each connection up.
//! - **Typed errors** ([`OpenError`]): a failed open keeps its [`Cause`] and the owner that failed
//!   last, for the access log and `postern_gateway_open_attempts_total`; the SOCKS5 reply and HTTP
//!   status come from [`OpenError::code`], as before.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::{self, Code};
use crate::registry::cache::Owner;

/// Why an open failed (one attempt, or the whole open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// No owner: no agent announces the address (or the name did not resolve to one).
    NoRoute,
    /// The gateway's own policy refused the target (rules, a name it may not resolve).
    Denied(Code),
    /// An owner answered with a definite refusal: the service refused the connection, the port is
    /// not exposed, the target is unreachable from the agent. Another owner would answer the same.
    Refused(Code),
    /// The owner's route was stale: its relay no longer has the session, the agent does not own
    /// the address, or the relay is draining.
    Stale(Code),
    /// No answer within the attempt's deadline or the open budget.
    Timeout,
    /// No peer connection to the owner's relay: the dial failed, the relay is marked down, or it
    /// has no peer address.
    PeerUnreachable,
    /// The tunnel or the peer connection broke during the attempt (or the relay answered that its
    /// tunnel to the agent did).
    TunnelClosed,
    /// The owner answered with something other than an open result.
    Protocol,
}

impl Cause {
    /// The cause of an answer `code` from a relay or agent (never `Ok`).
    pub fn from_answer(code: Code) -> Cause {
        match code {
            Code::NoSuchSession | Code::NotMine | Code::Draining => Cause::Stale(code),
            Code::Timeout => Cause::Timeout,
            Code::Internal => Cause::TunnelClosed,
            Code::NoRoute => Cause::NoRoute,
            Code::BadRequest => Cause::Protocol,
            other => Cause::Refused(other),
        }
    }

    /// The result code a client is answered with (SOCKS5 reply, HTTP status).
    pub fn code(self) -> Code {
        match self {
            Cause::NoRoute => Code::NoRoute,
            Cause::Denied(code) | Cause::Refused(code) | Cause::Stale(code) => code,
            Cause::Timeout => Code::Timeout,
            Cause::PeerUnreachable | Cause::TunnelClosed => Code::Internal,
            Cause::Protocol => Code::BadRequest,
        }
    }

    /// The label in logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Cause::NoRoute => "no_route",
            Cause::Denied(_) => "denied",
            Cause::Refused(_) => "refused",
            Cause::Stale(_) => "stale",
            Cause::Timeout => "timeout",
            Cause::PeerUnreachable => "peer_unreachable",
            Cause::TunnelClosed => "tunnel_closed",
            Cause::Protocol => "protocol",
        }
    }

    /// Whether another owner of the same route may succeed where this one failed.
    pub fn try_next_owner(self) -> bool {
        matches!(
            self,
            Cause::Stale(_) | Cause::Timeout | Cause::PeerUnreachable | Cause::TunnelClosed
        )
    }
}

/// A failed open: why, through which owner (the last one that failed; `None` when no owner was
/// tried), and after how many attempts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenError {
    pub cause: Cause,
    pub owner: Option<Owner>,
    pub attempts: usize,
}

impl OpenError {
    /// A refusal before any owner was tried: no route, or the gateway's policy.
    pub fn before_open(code: Code) -> Self {
        let cause = match code {
            Code::NoRoute => Cause::NoRoute,
            Code::Timeout => Cause::Timeout,
            other => Cause::Denied(other),
        };
        OpenError {
            cause,
            owner: None,
            attempts: 0,
        }
    }

    /// The result code a client is answered with.
    pub fn code(&self) -> Code {
        self.cause.code()
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.code().describe(), self.cause.label())?;
        if let Some(owner) = &self.owner {
            write!(
                f,
                " via relay {} session {} after {} attempt(s)",
                owner.relay_id, owner.session_id, self.attempts
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for OpenError {}

/// The timings of an open.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// The whole open, every attempt included.
    pub open_timeout: Duration,
    /// One attempt through one owner.
    pub attempt_timeout: Duration,
    /// How long an unanswered attempt runs alone before the next owner starts alongside it.
    pub hedge_delay: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            open_timeout: protocol::OPEN_TIMEOUT,
            attempt_timeout: protocol::ATTEMPT_TIMEOUT,
            hedge_delay: protocol::HEDGE_DELAY,
        }
    }
}

/// Owner ordering, hedged attempts and the health they learn from.
pub struct Failover {
    policy: Policy,
    health: Arc<Health>,
    rotation: AtomicUsize,
}

impl Default for Failover {
    fn default() -> Self {
        Failover::new(Policy::default())
    }
}

impl Failover {
    pub fn new(policy: Policy) -> Self {
        Failover {
            policy,
            health: Arc::default(),
            rotation: AtomicUsize::new(0),
        }
    }

    /// The health this failover orders by; the peer pool reports relay outcomes into it.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// `owners` in the order to try them. `local` is this process's relay id, if it runs one.
    pub fn order(&self, mut owners: Vec<Owner>, local: Option<&str>) -> Vec<Owner> {
        if owners.len() > 1 {
            // Spread load over equal owners; the stable sort below keeps this rotation within ranks.
            let n = self.rotation.fetch_add(1, Ordering::Relaxed) % owners.len();
            owners.rotate_left(n);
        }
        owners.sort_by_key(|o| {
            let is_local = local == Some(&*o.relay_id);
            (
                self.health.is_demoted(o),
                !is_local,
                o.draining,
                self.health.relay_is_down(&o.relay_id),
            )
        });
        owners
    }

    /// Opens through the first of `owners` (already ordered) that accepts. `start(owner,
    /// last_resort)` is one attempt; it runs in a task of its own under the attempt deadline, so a
    /// hedge that wins does not cut it off mid-exchange, and what it opens after another attempt
    /// won is handed to `discard`. Owners failing with a cause another owner may not share are
    /// skipped; a definite answer ends the search.
    pub async fn open<T, F, Fut>(
        &self,
        owners: Vec<Owner>,
        start: F,
        discard: fn(T),
    ) -> Result<(T, Owner), OpenError>
    where
        T: Send + 'static,
        F: Fn(Owner, bool) -> Fut,
        Fut: Future<Output = Result<T, Cause>> + Send + 'static,
    {
        let count = owners.len();
        if count == 0 {
            return Err(OpenError::before_open(Code::NoRoute));
        }
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, Result<T, Cause>)>(count);
        let mut started = 0;
        let mut pending = vec![false; count];
        let mut last: Option<(Cause, usize)> = None;
        // Every pass through the loop follows an event that calls for the next owner: the start
        // (the first attempt starts at once), an owner's failure, or the hedge delay running out.
        // Not a zero-length timer for "at once": the runtime's timer rounds every deadline up to
        // its next millisecond tick, so a `sleep(ZERO)` held each open for up to a millisecond
        // (half of a new connection's time through the tunnel).
        let hedge = tokio::time::sleep(self.policy.hedge_delay);
        tokio::pin!(hedge);
        let budget = tokio::time::sleep(self.policy.open_timeout);
        tokio::pin!(budget);
        let finish = |rx: &mut tokio::sync::mpsc::Receiver<(usize, Result<T, Cause>)>| {
            // Attempts still running see the channel closed and discard what they open; what
            // already arrived is discarded here.
            rx.close();
            while let Ok((_, result)) = rx.try_recv() {
                if let Ok(opened) = result {
                    discard(opened);
                }
            }
        };
        let failed = |cause: Cause, index: Option<usize>, started: usize| OpenError {
            cause,
            owner: index.map(|i| owners[i].clone()),
            attempts: started,
        };
        loop {
            if started < count {
                let index = started;
                started += 1;
                pending[index] = true;
                let owner = owners[index].clone();
                let attempt = start(owner.clone(), index + 1 == count);
                self.spawn_attempt(owner, index, attempt, tx.clone(), discard);
                hedge
                    .as_mut()
                    .reset(tokio::time::Instant::now() + self.policy.hedge_delay);
            }
            let running = pending.iter().any(|p| *p);
            if !running && started == count {
                let (cause, index) = last.unwrap_or((Cause::NoRoute, 0));
                return Err(failed(cause, Some(index), started));
            }
            tokio::select! {
                biased;
                Some((index, result)) = rx.recv(), if running => {
                    pending[index] = false;
                    match result {
                        Ok(opened) => {
                            // Owners still silent were overtaken: try others first for a while.
                            for (i, _) in pending.iter().enumerate().filter(|(_, p)| **p) {
                                self.health.demote(&owners[i]);
                            }
                            finish(&mut rx);
                            return Ok((opened, owners[index].clone()));
                        }
                        Err(cause) if cause.try_next_owner() => {
                            let owner = &owners[index];
                            tracing::debug!(relay_id = %owner.relay_id, session_id = %owner.session_id,
                                cause = cause.label(), "owner failed; trying next");
                            last = Some((cause, index));
                        }
                        Err(cause) => {
                            finish(&mut rx);
                            return Err(failed(cause, Some(index), started));
                        }
                    }
                }
                _ = &mut budget => {
                    finish(&mut rx);
                    // The owner still silent longest is the one the budget ran out on.
                    let silent = pending.iter().position(|p| *p);
                    return Err(failed(Cause::Timeout, silent.or(last.map(|(_, i)| i)), started));
                }
                _ = &mut hedge, if started < count => {}
            }
        }
    }

    /// Runs one attempt under its deadline, records its outcome (health, metrics) and hands its
    /// result to `tx`, or to `discard` when nobody wants it any more.
    fn spawn_attempt<T, Fut>(
        &self,
        owner: Owner,
        index: usize,
        attempt: Fut,
        tx: tokio::sync::mpsc::Sender<(usize, Result<T, Cause>)>,
        discard: fn(T),
    ) where
        T: Send + 'static,
        Fut: Future<Output = Result<T, Cause>> + Send + 'static,
    {
        let health = self.health.clone();
        let deadline = self.policy.attempt_timeout;
        tokio::spawn(async move {
            let result = tokio::time::timeout(deadline, attempt)
                .await
                .unwrap_or(Err(Cause::Timeout));
            record_attempt(&result.as_ref().map(|_| ()).map_err(|c| *c));
            health.learn(&owner, result.as_ref().err().copied());
            if let Err(tokio::sync::mpsc::error::SendError((_, Ok(opened)))) =
                tx.send((index, result)).await
            {
                discard(opened);
            }
        });
    }
}

/// Counts one attempt: `postern_open_attempts_total{result=<code>}` (as before) and
/// `postern_gateway_open_attempts_total{result=ok|<cause>}`.
pub fn record_attempt(result: &Result<(), Cause>) {
    let m = crate::metrics::metrics();
    let (code, cause) = match result {
        Ok(()) => ("ok", "ok"),
        Err(cause) => (crate::metrics::code_label(cause.code()), cause.label()),
    };
    m.open_attempts
        .get_or_create(&crate::metrics::Outcome { result: code })
        .inc();
    m.gateway_open_attempts
        .get_or_create(&crate::metrics::Outcome { result: cause })
        .inc();
}

/// First demotion of a (relay, session) pair; each further strike doubles it, up to
/// `DEMOTE_BASE * 2^(MAX_STRIKES - 1)`.
const DEMOTE_BASE: Duration = Duration::from_secs(1);
const MAX_STRIKES: u32 = 5;
/// A pair that has not failed for this long after its demotion ended starts again from no strikes.
const FORGET_AFTER: Duration = Duration::from_secs(30);

/// Health of (relay, session) pairs, learned from the outcomes of attempts (outlier detection): a
/// timeout, a broken tunnel, an unreachable relay, or being overtaken by a hedge demotes a pair, so
/// later connections try the other owners first while it lasts; the demotion grows with repeated
/// failures and decays with time; any answer from the agent restores the pair. A demoted pair is
/// still tried, last, so a connection is never refused only because of an old mark. Per relay,
/// the peer pool reports when its peer connection is down (and for how long it backs off).
#[derive(Default)]
pub struct Health {
    marks: Mutex<HashMap<(Arc<str>, u64), Mark>>,
    relays_down: Mutex<HashMap<Arc<str>, Instant>>,
}

struct Mark {
    strikes: u32,
    until: Instant,
}

impl Health {
    /// Learns from one attempt through `owner` that ended with `failure` (`None`: a stream opened).
    pub fn learn(&self, owner: &Owner, failure: Option<Cause>) {
        match failure {
            // The relay or the path to the agent failed, or nothing answered in time.
            Some(Cause::Timeout | Cause::TunnelClosed | Cause::PeerUnreachable) => {
                self.demote(owner)
            }
            // A stale route says nothing about the path; it leaves the cache by itself.
            Some(Cause::Stale(_) | Cause::NoRoute | Cause::Denied(_)) => {}
            // The agent answered: the path works.
            None | Some(Cause::Refused(_) | Cause::Protocol) => self.restore(owner),
        }
    }

    pub fn demote(&self, owner: &Owner) {
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

    pub fn restore(&self, owner: &Owner) {
        self.marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(owner.relay_id.clone(), owner.session_id));
    }

    pub fn is_demoted(&self, owner: &Owner) -> bool {
        self.marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(owner.relay_id.clone(), owner.session_id))
            .is_some_and(|m| Instant::now() < m.until)
    }

    /// The peer pool's report on `relay_id`: its peer connection is down until `until` (a failed
    /// dial or a lost connection, with the pool's back-off), or up (`None`).
    pub fn relay_reported(&self, relay_id: &str, until: Option<Instant>) {
        let mut down = self.relays_down.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        down.retain(|_, t| now < *t);
        match until {
            Some(t) => {
                down.insert(relay_id.into(), t);
            }
            None => {
                down.remove(relay_id);
            }
        }
    }

    /// Whether the peer pool last reported `relay_id` down, and the back-off has not run out.
    pub fn relay_is_down(&self, relay_id: &str) -> bool {
        self.relays_down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(relay_id)
            .is_some_and(|t| Instant::now() < *t)
    }
}

#[cfg(test)]
mod tests;
