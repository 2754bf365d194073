//! Pooled peer connections from a gateway (or a server) to other relays: one QUIC connection per
//! relay, opened lazily, re-opened on failure. One dial per relay at a time, shared by every caller
//! that needs it meanwhile. A relay whose dial fails or whose connection breaks is marked down, at
//! first for at least as long as a dial may take, doubling with each further failure up to a cap,
//! and skipped meanwhile, so new connections go straight to the other owners. Every dial's outcome
//! and every lost connection is reported to the failover's [`Health`], which orders owners by it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use quinn::{Connection, RecvStream, SendStream};

use super::failover::{Cause, Health};
use crate::config::PeerConfig;
use crate::protocol::{self, close, Code, Forward, Message, OpenResult};
use crate::registry::cache::RouteCache;

/// The shortest down mark: a relay is never dialled again sooner than this after a failure, and
/// never sooner than one dial's deadline (`peer.connect_timeout`), whichever is longer.
const DOWN_MIN: Duration = Duration::from_secs(1);
/// The longest down mark, reached by doubling with each consecutive failure (unless one dial's
/// deadline is longer still).
const DOWN_MAX: Duration = Duration::from_secs(16);

/// The outcome of one dial, published to every caller waiting on it.
type Dial = tokio::sync::watch::Receiver<Option<Result<Connection, Cause>>>;

#[derive(Default)]
struct State {
    conn: Option<Connection>,
    /// The dial under way, if any: callers wait on it instead of dialling again.
    dial: Option<Dial>,
    down_until: Option<Instant>,
    /// Consecutive failures (dials or connections lost) since the last successful dial.
    failures: u32,
}

impl State {
    /// Nothing held: no connection, no dial under way, no down mark in force.
    fn is_idle(&self) -> bool {
        self.conn.is_none() && self.dial.is_none() && !self.is_down()
    }

    fn is_down(&self) -> bool {
        self.down_until.is_some_and(|t| Instant::now() < t)
    }

    /// Marks the relay down for `base` doubled per consecutive failure, capped.
    fn mark_down(&mut self, base: Duration) {
        self.failures = self.failures.saturating_add(1);
        let doubled = base.saturating_mul(1 << self.failures.min(16).saturating_sub(1));
        let down_for = doubled.min(DOWN_MAX.max(base));
        self.down_until = Some(Instant::now() + down_for);
    }
}

#[derive(Default)]
struct Slot {
    state: Mutex<State>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct PeerPool {
    endpoint: quinn::Endpoint,
    server_name: String,
    connect_timeout: Duration,
    cache: Arc<RouteCache>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// Where dial outcomes and lost connections are reported.
    health: Arc<Health>,
}

impl PeerPool {
    pub fn new(config: &PeerConfig, cache: Arc<RouteCache>) -> anyhow::Result<Self> {
        let identity = config
            .identity
            .clone()
            .context("peer.cert and peer.key are required to forward to relays")?;
        let transport = Arc::new(config.transport.quinn(0));
        let client = crate::tls::client_config(
            &crate::tls::Trust::Ca(config.ca.clone()),
            protocol::ALPN_PEER,
            Some(identity),
            transport,
        )?;
        // Dual-stack where the host has IPv6, IPv4 only otherwise.
        let mut endpoint = crate::tls::bind_endpoint(
            SocketAddr::from(([0u16; 8], 0)),
            None,
            config.transport.udp_buffer,
        )
        .or_else(|_| {
            crate::tls::bind_endpoint(
                SocketAddr::from(([0, 0, 0, 0], 0)),
                None,
                config.transport.udp_buffer,
            )
        })
        .context("binding the peer client endpoint")?;
        endpoint.set_default_client_config(client);
        Ok(PeerPool {
            endpoint,
            server_name: config.server_name.clone(),
            connect_timeout: config.connect_timeout,
            cache,
            slots: Mutex::new(HashMap::new()),
            health: Arc::default(),
        })
    }

    /// Reports every dial outcome and lost connection to `health` (the failover's).
    pub fn report_to(&mut self, health: Arc<Health>) {
        self.health = health;
    }

    fn slot(&self, relay_id: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = slots.get(relay_id) {
            return slot.clone();
        }
        // A new relay id (in Kubernetes every rollout brings new ones): the slots of relays gone
        // from the registry, with no connection, dial or down mark left, go first.
        // A slot a caller holds (it may be about to dial) stays too.
        slots.retain(|id, slot| {
            self.cache.relay(id).is_some() || Arc::strong_count(slot) > 1 || !slot.lock().is_idle()
        });
        // The front doors' per-relay figures of those relays go with them.
        super::load::relay_load().sweep(|id| self.cache.relay(id).is_some());
        slots.entry(relay_id.to_string()).or_default().clone()
    }

    /// Whether `relay_id`'s peer connection failed a moment ago.
    pub fn is_down(&self, relay_id: &str) -> bool {
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(relay_id)
            .cloned();
        slot.is_some_and(|s| s.lock().is_down())
    }

    /// The pooled connection to `relay_id`, dialling it when there is none. A relay marked down is
    /// skipped unless it is the `last_resort`: a client is never refused only because of an old mark.
    /// Callers arriving while a dial is under way wait for that dial's outcome; no lock is held
    /// across the handshake, and the dial runs in a task of its own, so a caller that gives up does
    /// not cut it off for the others.
    async fn connection(&self, relay_id: &str, last_resort: bool) -> Result<Connection, Cause> {
        let slot = self.slot(relay_id);
        let mut dial = {
            let mut state = slot.lock();
            if let Some(c) = state.conn.as_ref().filter(|c| c.close_reason().is_none()) {
                return Ok(c.clone());
            }
            match &state.dial {
                Some(dial) => dial.clone(),
                None if state.is_down() && !last_resort => return Err(Cause::PeerUnreachable),
                None => {
                    let dial = self.dial(relay_id, &slot)?;
                    state.dial = Some(dial.clone());
                    dial
                }
            }
        };
        let outcome = match dial.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or(Err(Cause::PeerUnreachable)),
            Err(_) => Err(Cause::PeerUnreachable),
        };
        outcome
    }

    /// Starts one dial to `relay_id` in a task of its own, which records its outcome in `slot`
    /// (the connection, or a down mark) before publishing it. Called with `slot`'s state locked.
    fn dial(&self, relay_id: &str, slot: &Arc<Slot>) -> Result<Dial, Cause> {
        let addr = self
            .cache
            .relay(relay_id)
            .and_then(|r| r.peer_addr)
            .ok_or(Cause::PeerUnreachable)?;
        let addr = match (self.endpoint.local_addr(), addr) {
            (Ok(local), SocketAddr::V4(v4)) if local.is_ipv6() => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            _ => addr,
        };
        let (tx, rx) = tokio::sync::watch::channel(None);
        let endpoint = self.endpoint.clone();
        let server_name = self.server_name.clone();
        let connect_timeout = self.connect_timeout;
        // A relay is not dialled again before one dial's deadline has passed since the last failed.
        let base = connect_timeout.max(DOWN_MIN);
        let slot = slot.clone();
        let relay_id = relay_id.to_string();
        let health = self.health.clone();
        tokio::spawn(async move {
            let result = match endpoint.connect(addr, &server_name) {
                Err(err) => {
                    tracing::warn!(%relay_id, %addr, %err, "cannot dial relay peer endpoint");
                    Err(Cause::PeerUnreachable)
                }
                Ok(connecting) => match tokio::time::timeout(connect_timeout, connecting).await {
                    Ok(Ok(c)) => {
                        tracing::debug!(%relay_id, %addr, "peer connection up");
                        Ok(c)
                    }
                    Ok(Err(err)) => {
                        tracing::warn!(%relay_id, %addr, %err, "peer handshake failed; relay marked down");
                        Err(Cause::PeerUnreachable)
                    }
                    Err(_) => {
                        tracing::warn!(%relay_id, %addr, "peer handshake timed out; relay marked down");
                        Err(Cause::PeerUnreachable)
                    }
                },
            };
            {
                let mut state = slot.lock();
                state.dial = None;
                match &result {
                    Ok(c) => {
                        state.conn = Some(c.clone());
                        state.failures = 0;
                        state.down_until = None;
                    }
                    Err(_) => state.mark_down(base),
                }
                health.relay_reported(&relay_id, state.down_until);
            }
            if let Ok(c) = &result {
                let watched = c.clone();
                tokio::spawn(async move {
                    let reason = watched.closed().await;
                    // A relay that closed us because it drained is gone on purpose (and may come back
                    // under the same id at once); anything else is a failure worth avoiding.
                    let drained = matches!(&reason, quinn::ConnectionError::ApplicationClosed(c)
                        if c.error_code == quinn::VarInt::from_u32(close::DRAINED));
                    let mut state = slot.lock();
                    // Only the pooled connection's end says something about the relay now.
                    let current = state
                        .conn
                        .as_ref()
                        .is_some_and(|c| c.stable_id() == watched.stable_id());
                    if current {
                        // A closed connection is never handed out again; its state goes with it.
                        state.conn = None;
                    }
                    if drained || !current {
                        tracing::debug!(%relay_id, %reason, "peer connection closed");
                    } else {
                        tracing::info!(%relay_id, %reason, "peer connection lost; relay marked down");
                        state.mark_down(base);
                        health.relay_reported(&relay_id, state.down_until);
                    }
                });
            }
            let _ = tx.send(Some(result));
        });
        Ok(rx)
    }

    /// Forwards to `relay_id`: `Forward` on a new stream, then its answer. A connection that dies
    /// while waiting ends the attempt at once (the caller tries the next owner).
    pub async fn forward(
        &self,
        relay_id: &str,
        forward: Forward,
        last_resort: bool,
    ) -> Result<(SendStream, RecvStream), Cause> {
        let conn = self.connection(relay_id, last_resort).await?;
        let attempt = async {
            let (send, recv) = conn.open_bi().await.map_err(|_| Cause::TunnelClosed)?;
            let mut pending = protocol::HalfOpen::new(send, recv);
            let (send, recv) = pending.streams();
            let _ = send.set_priority(protocol::priority::OPENING);
            protocol::write_message(send, &Message::Forward(forward))
                .await
                .map_err(|_| Cause::TunnelClosed)?;
            match protocol::read_message(recv).await {
                Ok(Message::ForwardResult(OpenResult { code: Code::Ok })) => {
                    let _ = send.set_priority(protocol::priority::DATA);
                    Ok(pending.opened())
                }
                Ok(Message::ForwardResult(OpenResult { code })) => Err(Cause::from_answer(code)),
                Ok(_) => Err(Cause::Protocol),
                Err(_) => Err(Cause::TunnelClosed),
            }
        };
        tokio::select! {
            r = tokio::time::timeout(protocol::ATTEMPT_TIMEOUT, attempt) => r.unwrap_or(Err(Cause::Timeout)),
            _ = conn.closed() => Err(Cause::TunnelClosed),
        }
    }

    /// Closes every peer connection.
    pub async fn close(&self) {
        self.endpoint.close(close::SHUTDOWN.into(), b"closing");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RelayInfo;

    /// The destination connection ID of a datagram that starts with a QUIC v1 Initial packet: one
    /// per handshake, the same across its retransmissions.
    fn initial_dcid(datagram: &[u8]) -> Option<Vec<u8>> {
        let first = *datagram.first()?;
        if first & 0xc0 != 0xc0 || (first >> 4) & 0x03 != 0 || datagram.get(1..5)? == [0; 4] {
            return None;
        }
        let len = *datagram.get(5)? as usize;
        datagram.get(6..6 + len).map(<[u8]>::to_vec)
    }

    /// A peer config with a throwaway self-signed identity and the shipped 2 s `connect_timeout`.
    fn peer_config() -> PeerConfig {
        let key = rcgen::generate_simple_self_signed(vec!["postern-peer".to_string()]).unwrap();
        let der = key.cert.der().clone();
        PeerConfig {
            ca: vec![der.clone()],
            identity: Some(crate::tls::Identity {
                chain: vec![der],
                key: rustls_pki_types::PrivatePkcs8KeyDer::from(key.key_pair.serialize_der())
                    .into(),
            }),
            server_name: "postern-relay".into(),
            connect_timeout: Duration::from_secs(2),
            max_streams: 4096,
            transport: PeerConfig::default_transport(),
        }
    }

    fn relay(id: &str) -> RelayInfo {
        RelayInfo {
            id: id.into(),
            peer_addr: Some("127.0.0.1:9".parse().unwrap()),
            version: String::new(),
            started_at: 0,
            draining: false,
        }
    }

    /// Relay ids come and go (every rollout in Kubernetes): the slot of a relay gone from the
    /// registry is dropped when a new relay's slot is made, unless it still holds something (here
    /// a down mark in force), and so are its figures in the front doors' load table once it
    /// carries nothing. (Relay ids of this test only: the load table is the process's.)
    #[tokio::test]
    async fn slots_of_relays_gone_from_the_registry_are_swept() {
        let cache = Arc::new(RouteCache::new());
        cache.replace(&[], &[relay("swept-1"), relay("swept-2")]);
        let pool = PeerPool::new(&peer_config(), cache.clone()).unwrap();
        pool.slot("swept-1");
        pool.slot("swept-2")
            .lock()
            .mark_down(Duration::from_secs(60));
        let load = super::super::load::relay_load();
        let meter = Arc::new(crate::splice::Progress::default());
        drop(load.track(&Arc::from("swept-1"), &meter));
        let carrying = load.track(&Arc::from("swept-2"), &meter);
        cache.replace(&[], &[relay("swept-3")]);
        pool.slot("swept-3");
        let mut held: Vec<String> = pool.slots.lock().unwrap().keys().cloned().collect();
        held.sort();
        assert_eq!(held, ["swept-2", "swept-3"]);
        let figures = load.snapshot();
        assert!(!figures.contains_key("swept-1"), "{figures:?}");
        assert_eq!(
            figures["swept-2"].streams, 1,
            "a relay still carrying keeps its figures"
        );
        drop(carrying);
    }

    /// A relay whose peer endpoint swallows every datagram (a real UDP socket on loopback that
    /// never answers), 16 callers at once, the shipped 2 s `connect_timeout`. Before, the callers
    /// queued on one lock and dialled in turn, the last one answered after 16 dials (32 s), and the
    /// 1 s down mark had expired by the time the next dial could start; now one handshake serves
    /// all 16, every caller has its answer when that dial times out, and the relay stays marked
    /// down for at least as long as a dial, twice as long after a second failure.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_share_one_dial_and_the_down_mark_outlasts_it() {
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let peer_addr = silent.local_addr().unwrap();
        let handshakes = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let seen = handshakes.clone();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, _)) = silent.recv_from(&mut buf).await {
                if let Some(id) = initial_dcid(&buf[..n]) {
                    seen.lock().unwrap().insert(id);
                }
            }
        });
        let cache = Arc::new(RouteCache::new());
        cache.replace(
            &[],
            &[RelayInfo {
                id: "relay-1".into(),
                peer_addr: Some(peer_addr),
                version: String::new(),
                started_at: 0,
                draining: false,
            }],
        );
        let pool = Arc::new(PeerPool::new(&peer_config(), cache).unwrap());

        let started = Instant::now();
        let callers: Vec<_> = (0..16)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move {
                    let result = pool.connection("relay-1", true).await;
                    (result.is_err(), started.elapsed())
                })
            })
            .collect();
        let answers = tokio::time::timeout(Duration::from_secs(5), async {
            let mut answers = Vec::new();
            for caller in callers {
                answers.push(caller.await.unwrap());
            }
            answers
        })
        .await
        .expect("16 callers of an unreachable relay still waiting after 5 s");
        let slowest = answers.iter().map(|(_, took)| *took).max().unwrap();
        assert!(answers.iter().all(|(failed, _)| *failed));
        assert!(
            slowest >= Duration::from_millis(1900) && slowest < Duration::from_secs(3),
            "callers answered after {slowest:?}, not with the one dial's 2 s deadline"
        );
        assert_eq!(
            handshakes.lock().unwrap().len(),
            1,
            "handshakes for 16 callers"
        );

        // Marked down: skipped at once, for longer than a dial, and no dial meanwhile.
        assert!(pool.is_down("relay-1"));
        assert!(
            pool.health.relay_is_down("relay-1"),
            "the failed dial is reported to the failover's health"
        );
        let asked = Instant::now();
        assert_eq!(
            pool.connection("relay-1", false).await.err(),
            Some(Cause::PeerUnreachable)
        );
        assert!(asked.elapsed() < Duration::from_millis(100));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            pool.is_down("relay-1"),
            "the down mark expired 1.5 s after a dial that took 2 s"
        );
        assert_eq!(handshakes.lock().unwrap().len(), 1);

        // A second failure (a last resort dials through the mark) doubles the mark to 4 s.
        assert!(pool.connection("relay-1", true).await.is_err());
        assert_eq!(handshakes.lock().unwrap().len(), 2);
        let until = pool.slot("relay-1").lock().down_until.unwrap();
        let left = until.saturating_duration_since(Instant::now());
        assert!(
            left > Duration::from_millis(3500) && left <= Duration::from_secs(4),
            "second down mark: {left:?}"
        );
        reader.abort();
    }
}
