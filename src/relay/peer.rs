//! The relay's peer endpoint (ALPN `postern-peer/1`, mutual TLS): gateways and other relays send
//! `Forward` on a fresh stream; the relay opens the target on its own tunnel and splices.

use std::sync::Arc;

use quinn::{RecvStream, SendStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Relay;
use crate::protocol::{self, close, Code, Forward, Message, OpenResult};

/// Accepts peer connections until `closed`.
pub async fn accept_loop(
    relay: Arc<Relay>,
    endpoint: quinn::Endpoint,
    closed: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            _ = closed.cancelled() => return,
            i = endpoint.accept() => match i { Some(i) => i, None => return },
        };
        // Bounded like the agent port (`relay.max_pending*`, a Retry first under pressure): a
        // handshake costs the relay a signature, and anyone who reaches the port can start one.
        let Some((incoming, pending)) = relay.peer_pending.screen(incoming) else {
            continue;
        };
        let relay = relay.clone();
        let closed = closed.clone();
        let streams = tasks.clone();
        tasks.spawn(async move {
            let remote = incoming.remote_address();
            let handshake = tokio::time::timeout(super::HANDSHAKE_TIMEOUT, incoming);
            let conn = match tokio::select! {
                done = handshake => done,
                () = pending.evicted() => {
                    tracing::info!(%remote, "peer handshake ended: its slot went to a source holding fewer");
                    return;
                }
            } {
                Ok(Ok(conn)) => conn,
                Ok(Err(err)) => {
                    tracing::info!(%remote, %err, "peer handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, "peer handshake timed out");
                    return;
                }
            };
            // The CA also signs agent certificates: only a peer certificate (never one also
            // marked as an agent) may forward.
            let is_peer = crate::tls::peer_certificates(&conn)
                .and_then(|chain| chain.first().map(|c| crate::cert::role(c.as_ref())))
                .is_some_and(|role| role == Some(crate::cert::Role::Peer));
            if !is_peer {
                tracing::warn!(%remote, "peer connection without a peer certificate refused");
                conn.close(close::REJECTED.into(), b"a peer certificate is required");
                return;
            }
            drop(pending);
            tracing::debug!(%remote, "peer connected");
            loop {
                let (send, recv) = tokio::select! {
                    _ = closed.cancelled() => {
                        conn.close(close::DRAINED.into(), b"relay shut down");
                        return;
                    }
                    s = conn.accept_bi() => match s {
                        Ok(s) => s,
                        Err(err) => {
                            tracing::debug!(%remote, %err, "peer connection ended");
                            return;
                        }
                    },
                };
                // Boxed: a forwarded stream's future holds a splice; spawned by value it would
                // be copied whole at every layer of the spawn.
                streams.spawn(Box::pin(serve_forward(relay.clone(), send, recv)));
            }
        });
    }
}

/// One forwarded connection: `Forward` → open on a local tunnel → `ForwardResult` → splice.
async fn serve_forward(relay: Arc<Relay>, mut send: SendStream, mut recv: RecvStream) {
    let forward = match protocol::read_message_timeout(&mut recv, protocol::OPEN_TIMEOUT).await {
        Ok(Message::Forward(f)) => f,
        Ok(other) => {
            tracing::warn!(msg = other.kind(), "peer stream without Forward");
            let _ = send.reset(close::PROTOCOL.into());
            return;
        }
        Err(err) => {
            tracing::debug!(%err, "peer stream ended before Forward");
            let _ = send.reset(close::PROTOCOL.into());
            return;
        }
    };
    let Forward {
        namespace,
        target,
        session_id,
    } = forward;
    let opened = relay.open(&namespace, target, session_id).await;
    let code = opened.as_ref().err().copied().unwrap_or(Code::Ok);
    let _ = send.set_priority(protocol::priority::OPENING);
    if protocol::write_message(&mut send, &Message::ForwardResult(OpenResult { code }))
        .await
        .is_err()
    {
        // The gateway gave up on this open: the agent resets the connection it dialled.
        if let Ok(t) = opened {
            protocol::abandon(t.send, t.recv);
        }
        return;
    }
    let tunnelled = match opened {
        Ok(t) => t,
        Err(code) => {
            tracing::debug!(%target, %namespace, ?code, "forward refused");
            let _ = send.finish();
            return;
        }
    };
    let _guard = tunnelled.guard;
    let _ = send.set_priority(crate::protocol::priority::DATA);
    if let Err(err) =
        crate::splice::splice_quic((send, recv), (tunnelled.send, tunnelled.recv)).await
    {
        tracing::debug!(%target, %err, "forwarded stream aborted");
    }
}
