//! Bounds on what a relay holds for connections it has not admitted yet.
//!
//! A peer that completes the QUIC handshake holds relay state before any `Hello` is checked: the
//! handshake itself, quinn's connection state and whatever data quinn buffers for it. That state is
//! bounded three ways:
//!
//! - an agent may open one stream, its control stream (the relay opens every other), so quinn
//!   never reserves or buffers a second one, and what an unadmitted peer can make the relay buffer
//!   is one stream window (`relay.transport.stream_window`, 1 MiB by default; the hello itself is
//!   one frame of at most [`crate::protocol::MAX_FRAME_LEN`]);
//! - connections in the handshake or waiting for admission are counted per source ([`Pending`]):
//!   past `relay.max_pending_per_source` from one source (an IPv4 address, or an IPv6 /64) or
//!   `relay.max_pending` in total, a new one is refused before its TLS handshake;
//! - once half of either limit is in use, a client must first prove that it receives at its
//!   address (a stateless QUIC Retry) before it is counted, so handshakes from spoofed addresses,
//!   which never complete, cannot hold the slots of the address they name or fill the total;
//! - when the total is reached, a connection from a source holding at least two fewer slots than
//!   the source holding the most takes that source's oldest slot, whose connection is ended: a
//!   few sources that hold their connections silent (over TCP, before TLS says anything; over QUIC,
//!   through the hello deadline) cannot keep every other source out. Blocking new agents takes as
//!   many sources as `relay.max_pending` has slots.
//!
//! The peer endpoint is screened by a [`Pending`] of its own with the same limits; a peer
//! connection counts until its handshake has completed with a peer certificate.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// Streams an agent may open on its tunnel: the control stream only (the relay opens the rest).
pub const AGENT_MAX_STREAMS: u32 = 1;

/// Which limit refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `relay.max_pending_per_source`.
    PerSource,
    /// `relay.max_pending`.
    Total,
}

impl Limit {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::PerSource => "per_source",
            Limit::Total => "total",
        }
    }
}

/// Unadmitted connections, per source and in total.
pub struct Pending {
    /// The port counted here, as the refusal metric names it: `agent` or `peer`.
    endpoint: &'static str,
    per_source: u32,
    total: u32,
    state: Mutex<State>,
    /// When the last refusal warning was logged (seconds since the Unix epoch).
    warned_at: AtomicU64,
}

#[derive(Default)]
struct State {
    by_source: HashMap<IpAddr, u32>,
    total: u32,
    /// Every slot held, oldest first (ids grow), with its source and what ends its connection.
    slots: BTreeMap<u64, (IpAddr, CancellationToken)>,
    next_id: u64,
}

impl State {
    /// Frees a slot for a connection from `source` when the total is reached: the oldest slot of
    /// the source holding the most, if that source holds at least two more than `source` (after
    /// the exchange it still holds at least as many). Its connection is told to end.
    fn evict_for(&mut self, source: IpAddr) -> bool {
        let own = self.by_source.get(&source).copied().unwrap_or(0);
        let Some((&heaviest, &held)) = self.by_source.iter().max_by_key(|(_, held)| **held) else {
            return false;
        };
        if held < own + 2 {
            return false;
        }
        let Some(id) = self
            .slots
            .iter()
            .find_map(|(id, (from, _))| (*from == heaviest).then_some(*id))
        else {
            return false;
        };
        if let Some((from, evict)) = self.slots.remove(&id) {
            self.release(from);
            evict.cancel();
        }
        true
    }

    fn release(&mut self, source: IpAddr) {
        self.total = self.total.saturating_sub(1);
        if let Some(held) = self.by_source.get_mut(&source) {
            *held = held.saturating_sub(1);
            if *held == 0 {
                self.by_source.remove(&source);
            }
        }
    }
}

/// One unadmitted connection, counted until dropped (admission, or the connection's end), or
/// until the relay takes it back for a source holding fewer ([`Slot::evicted`]).
pub struct Slot {
    pending: Arc<Pending>,
    id: u64,
    evict: CancellationToken,
}

impl Slot {
    /// Resolves when the relay has taken this slot back for a connection from a source holding
    /// fewer: the connection should end now.
    pub async fn evicted(&self) {
        self.evict.cancelled().await
    }
}

/// The key a source is counted under: an IPv4 address, or the /64 of an IPv6 address (one host
/// usually holds a whole /64).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

impl Pending {
    /// `endpoint` names the port in `postern_relay_handshakes_refused_total`: `agent` or `peer`.
    pub fn new(endpoint: &'static str, per_source: u32, total: u32) -> Arc<Self> {
        Arc::new(Pending {
            endpoint,
            per_source,
            total,
            state: Mutex::new(State::default()),
            warned_at: AtomicU64::new(0),
        })
    }

    /// Counts a new connection from `ip`, or says which limit it would exceed. At the total, a
    /// source holding at least two fewer slots than the source holding the most takes that
    /// source's oldest slot (counted as a refusal, `evicted`).
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Limit> {
        let source = source_key(ip);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.by_source.get(&source).copied().unwrap_or(0) >= self.per_source {
            return Err(Limit::PerSource);
        }
        if state.total >= self.total {
            if !state.evict_for(source) {
                return Err(Limit::Total);
            }
            self.count_refusal("evicted");
        }
        *state.by_source.entry(source).or_insert(0) += 1;
        state.total += 1;
        let id = state.next_id;
        state.next_id += 1;
        let evict = CancellationToken::new();
        state.slots.insert(id, (source, evict.clone()));
        Ok(Slot {
            pending: self.clone(),
            id,
            evict,
        })
    }

    /// Whether half of either limit is in use for a connection from `ip`.
    fn under_pressure(&self, ip: IpAddr) -> bool {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let held = state.by_source.get(&source_key(ip)).copied().unwrap_or(0);
        held.saturating_mul(2) >= self.per_source || state.total.saturating_mul(2) >= self.total
    }

    /// Screens a new connection before its handshake: counted (its slot is returned with it), or
    /// sent a QUIC Retry when its address is not validated and the limits are under pressure, or
    /// refused past a limit (counted and logged).
    pub fn screen(self: &Arc<Self>, incoming: quinn::Incoming) -> Option<(quinn::Incoming, Slot)> {
        let remote = incoming.remote_address();
        let incoming = if !incoming.remote_address_validated() && self.under_pressure(remote.ip()) {
            match incoming.retry() {
                // The client comes back with a token proving its address, as a new connection.
                Ok(()) => return None,
                Err(err) => err.into_incoming(),
            }
        } else {
            incoming
        };
        match self.enter(remote.ip()) {
            Ok(slot) => Some((incoming, slot)),
            Err(limit) => {
                self.refused(remote, limit);
                incoming.refuse();
                None
            }
        }
    }

    /// Unadmitted connections held now.
    pub fn len(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).total as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn count_refusal(&self, reason: &'static str) {
        crate::metrics::metrics()
            .relay_handshakes_refused
            .get_or_create(&crate::metrics::Refusal {
                endpoint: self.endpoint,
                reason,
            })
            .inc();
    }

    /// Counts a refusal and warns at most every 10 s.
    pub fn refused(&self, remote: std::net::SocketAddr, limit: Limit) {
        self.count_refusal(limit.as_str());
        let now = crate::registry::unix_now();
        let last = self.warned_at.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                %remote,
                endpoint = self.endpoint,
                limit = limit.as_str(),
                max_pending = self.total,
                max_pending_per_source = self.per_source,
                "unadmitted connection limit reached; refusing new connections \
                 (postern_relay_handshakes_refused_total counts them)"
            );
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.pending.state.lock().unwrap_or_else(|e| e.into_inner());
        // An evicted slot was released when it was taken back.
        if let Some((source, _)) = state.slots.remove(&self.id) {
            state.release(source);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_source_and_in_total_and_releases_on_drop() {
        let pending = Pending::new("agent", 2, 3);
        let a: IpAddr = "127.130.0.1".parse().unwrap();
        let b: IpAddr = "127.130.0.2".parse().unwrap();
        let a1 = pending.enter(a).unwrap();
        let _a2 = pending.enter(a).unwrap();
        assert_eq!(pending.enter(a).err(), Some(Limit::PerSource));
        let _b1 = pending.enter(b).unwrap();
        assert_eq!(pending.enter(b).err(), Some(Limit::Total));
        assert_eq!(pending.len(), 3);
        drop(a1);
        assert_eq!(pending.len(), 2);
        let _a3 = pending.enter(a).unwrap();
        assert_eq!(pending.enter(a).err(), Some(Limit::PerSource));
        assert_eq!(
            pending.enter(b).err(),
            Some(Limit::Total),
            "a holds 2, b 1: even enough"
        );
    }

    #[test]
    fn a_source_holding_fewer_takes_the_oldest_slot_of_the_source_holding_most() {
        let evictions = || count("agent", "evicted");
        let before = evictions();
        let pending = Pending::new("agent", 4, 4);
        let a: IpAddr = "127.130.0.1".parse().unwrap();
        let b: IpAddr = "127.130.0.2".parse().unwrap();
        let held: Vec<Slot> = (0..4).map(|_| pending.enter(a).unwrap()).collect();
        let is_evicted = |slot: &Slot| slot.evict.is_cancelled();
        // b holds none, a all four: b takes a's oldest.
        let b1 = pending.enter(b).unwrap();
        assert_eq!(
            held.iter().map(is_evicted).collect::<Vec<_>>(),
            [true, false, false, false]
        );
        assert_eq!(pending.len(), 4);
        let _b2 = pending.enter(b).unwrap();
        assert!(is_evicted(&held[1]));
        // a 2, b 2: nobody holds two more than b.
        assert_eq!(pending.enter(b).err(), Some(Limit::Total));
        assert_eq!(pending.enter(a).err(), Some(Limit::Total));
        assert!(!is_evicted(&b1) && !is_evicted(&held[2]));
        // An evicted slot ending later releases nothing twice.
        drop(held);
        assert_eq!(pending.len(), 2);
        let _a = pending.enter(a).unwrap();
        let _c = pending.enter("127.130.0.3".parse().unwrap()).unwrap();
        assert_eq!(pending.len(), 4);
        assert!(evictions() >= before + 2);
    }

    /// `postern_relay_handshakes_refused_total` for `endpoint` and `reason`.
    fn count(endpoint: &'static str, reason: &'static str) -> u64 {
        crate::metrics::metrics()
            .relay_handshakes_refused
            .get_or_create(&crate::metrics::Refusal { endpoint, reason })
            .get()
    }

    #[test]
    fn refusals_count_under_their_port() {
        let (agent, peer) = (count("agent", "total"), count("peer", "total"));
        let remote = "127.130.0.3:4433".parse().unwrap();
        Pending::new("peer", 1, 1).refused(remote, Limit::Total);
        assert_eq!(count("peer", "total"), peer + 1);
        assert_eq!(
            count("agent", "total"),
            agent,
            "the agents' port counts only its own"
        );
    }

    #[test]
    fn pressure_starts_at_half_of_either_limit() {
        let pending = Pending::new("agent", 4, 6);
        let a: IpAddr = "127.130.0.1".parse().unwrap();
        let b: IpAddr = "127.130.0.2".parse().unwrap();
        assert!(!pending.under_pressure(a));
        let _a1 = pending.enter(a).unwrap();
        assert!(!pending.under_pressure(a));
        let _a2 = pending.enter(a).unwrap();
        assert!(pending.under_pressure(a), "half of the per-source limit");
        assert!(!pending.under_pressure(b), "another source is not");
        let _b1 = pending.enter(b).unwrap();
        assert!(pending.under_pressure(b), "half of the total");
    }

    #[test]
    fn ipv6_sources_count_by_slash_64() {
        let pending = Pending::new("agent", 1, 10);
        let _x = pending.enter("fd00::1".parse().unwrap()).unwrap();
        assert_eq!(
            pending.enter("fd00::ffff:1".parse().unwrap()).err(),
            Some(Limit::PerSource)
        );
        let _y = pending.enter("fd00:0:0:1::1".parse().unwrap()).unwrap();
        // An IPv4-mapped address counts as its IPv4 address.
        let _v4 = pending.enter("127.130.0.9".parse().unwrap()).unwrap();
        assert_eq!(
            pending.enter("::ffff:127.130.0.9".parse().unwrap()).err(),
            Some(Limit::PerSource)
        );
    }
}
