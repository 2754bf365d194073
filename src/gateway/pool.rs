//! Pooled peer connections from a gateway (or a server) to other relays: one QUIC connection per
//! relay, opened lazily, re-opened on failure. A relay whose connection breaks is marked down at
//! once and skipped for a moment, so new connections go straight to the other owners.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use quinn::{Connection, RecvStream, SendStream};

use crate::config::PeerConfig;
use crate::protocol::{self, close, Code, Forward, Message, OpenResult};
use crate::registry::cache::RouteCache;

/// How long a relay whose peer connection failed is skipped before it is dialled again.
const DOWN_FOR: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Slot {
    conn: tokio::sync::Mutex<Option<Connection>>,
    down_until: Mutex<Option<Instant>>,
}

impl Slot {
    fn mark_down(&self) {
        *self.down_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + DOWN_FOR);
    }

    fn is_down(&self) -> bool {
        self.down_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| Instant::now() < t)
    }
}

pub struct PeerPool {
    endpoint: quinn::Endpoint,
    server_name: String,
    connect_timeout: Duration,
    cache: Arc<RouteCache>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
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
        })
    }

    fn slot(&self, relay_id: &str) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(relay_id.to_string())
            .or_default()
            .clone()
    }

    /// Whether `relay_id`'s peer connection failed a moment ago.
    pub fn is_down(&self, relay_id: &str) -> bool {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(relay_id)
            .is_some_and(|s| s.is_down())
    }

    /// The pooled connection to `relay_id`, dialling it when there is none. A relay marked down is
    /// skipped unless it is the `last_resort`: a client is never refused only because of an old mark.
    async fn connection(&self, relay_id: &str, last_resort: bool) -> Result<Connection, Code> {
        let slot = self.slot(relay_id);
        if slot.is_down() && !last_resort {
            return Err(Code::Internal);
        }
        let mut conn = slot.conn.lock().await;
        if let Some(c) = conn.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        let addr = self
            .cache
            .relay(relay_id)
            .and_then(|r| r.peer_addr)
            .ok_or(Code::Internal)?;
        let addr = match (self.endpoint.local_addr(), addr) {
            (Ok(local), SocketAddr::V4(v4)) if local.is_ipv6() => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            _ => addr,
        };
        let connecting = self
            .endpoint
            .connect(addr, &self.server_name)
            .map_err(|err| {
                tracing::warn!(%relay_id, %addr, %err, "cannot dial relay peer endpoint");
                slot.mark_down();
                Code::Internal
            })?;
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(c)) => {
                tracing::debug!(%relay_id, %addr, "peer connection up");
                let watched = c.clone();
                let watched_slot = slot.clone();
                let id = relay_id.to_string();
                tokio::spawn(async move {
                    let reason = watched.closed().await;
                    // A relay that closed us because it drained is gone on purpose (and may come back
                    // under the same id at once); anything else is a failure worth avoiding.
                    let drained = matches!(&reason, quinn::ConnectionError::ApplicationClosed(c)
                        if c.error_code == quinn::VarInt::from_u32(close::DRAINED));
                    if drained {
                        tracing::debug!(relay_id = %id, "peer connection closed by a drained relay");
                    } else {
                        tracing::info!(relay_id = %id, %reason, "peer connection lost; relay marked down");
                        watched_slot.mark_down();
                    }
                });
                *conn = Some(c.clone());
                Ok(c)
            }
            Ok(Err(err)) => {
                tracing::warn!(%relay_id, %addr, %err, "peer handshake failed; relay marked down");
                slot.mark_down();
                Err(Code::Internal)
            }
            Err(_) => {
                tracing::warn!(%relay_id, %addr, "peer handshake timed out; relay marked down");
                slot.mark_down();
                Err(Code::Internal)
            }
        }
    }

    /// Forwards to `relay_id`: `Forward` on a new stream, then its answer. A connection that dies
    /// while waiting ends the attempt at once (the caller tries the next owner).
    pub async fn forward(
        &self,
        relay_id: &str,
        forward: Forward,
        last_resort: bool,
    ) -> Result<(SendStream, RecvStream), Code> {
        let conn = self.connection(relay_id, last_resort).await?;
        let attempt = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|_| Code::Internal)?;
            let _ = send.set_priority(protocol::priority::OPENING);
            protocol::write_message(&mut send, &Message::Forward(forward))
                .await
                .map_err(|_| Code::Internal)?;
            match protocol::read_message(&mut recv).await {
                Ok(Message::ForwardResult(OpenResult { code: Code::Ok })) => {
                    let _ = send.set_priority(protocol::priority::DATA);
                    Ok((send, recv))
                }
                Ok(Message::ForwardResult(OpenResult { code })) => Err(code),
                Ok(_) => Err(Code::BadRequest),
                Err(_) => Err(Code::Internal),
            }
        };
        tokio::select! {
            r = tokio::time::timeout(protocol::ATTEMPT_TIMEOUT, attempt) => r.unwrap_or(Err(Code::Timeout)),
            _ = conn.closed() => Err(Code::Internal),
        }
    }

    /// Closes every peer connection.
    pub async fn close(&self) {
        self.endpoint.close(close::SHUTDOWN.into(), b"closing");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}
