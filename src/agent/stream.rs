//! One relay-opened stream: check the `Open` against the agent's own policy, dial, splice.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use tokio::net::TcpStream;

use crate::protocol::{self, Code, Message, Open, OpenResult, PortRange};

/// What this agent will serve.
#[derive(Clone)]
pub struct Policy {
    pub ips: Vec<IpAddr>,
    pub ports: Vec<PortRange>,
    pub session_id: u64,
    pub connect_timeout: Duration,
}

impl Policy {
    /// The agent's own check: a relay (or a stale route) can never make it dial anything else.
    fn check(&self, open: &Open) -> Result<(), Code> {
        if open.session_id != self.session_id {
            return Err(Code::NoSuchSession);
        }
        if !self.ips.contains(&open.target.ip()) {
            return Err(Code::NotMine);
        }
        if !self.ports.iter().any(|r| r.contains(open.target.port())) {
            return Err(Code::NotAllowed);
        }
        Ok(())
    }
}

/// [`serve`] in a box of its own. The future is ~10 KiB (the splice's state sits inline), and a
/// task spawned by value is copied whole at every layer of the spawn: boxed once, only a pointer
/// moves. One stream per proxied connection, so the copies were a measurable share of the agent's
/// CPU per connection.
pub fn serve_boxed(
    send: SendStream,
    recv: RecvStream,
    policy: Policy,
) -> std::pin::Pin<Box<impl std::future::Future<Output = ()> + Send>> {
    Box::pin(serve(send, recv, policy))
}

pub async fn serve(mut send: SendStream, mut recv: RecvStream, policy: Policy) {
    let open = match protocol::read_message_timeout(&mut recv, protocol::OPEN_TIMEOUT).await {
        Ok(Message::Open(open)) => open,
        Ok(other) => {
            tracing::warn!(msg = other.kind(), "relay sent a stream without Open");
            let _ = send.reset(protocol::close::PROTOCOL.into());
            return;
        }
        Err(err) => {
            tracing::debug!(%err, "stream ended before Open");
            let _ = send.reset(protocol::close::PROTOCOL.into());
            return;
        }
    };
    let target = open.target;
    let tcp = match policy.check(&open) {
        Ok(()) => dial(target, policy.connect_timeout).await,
        Err(code) => Err(code),
    };
    let code = tcp.as_ref().err().copied().unwrap_or(Code::Ok);
    let _ = send.set_priority(protocol::priority::OPENING);
    if protocol::write_message(&mut send, &Message::OpenResult(OpenResult { code }))
        .await
        .is_err()
    {
        // The relay gave up on this open (its client left, its attempt timed out): the service's
        // connection is reset, never closed as if a client had come and gone cleanly.
        if let Ok(tcp) = tcp {
            crate::splice::abort(tcp);
        }
        return;
    }
    let tcp = match tcp {
        Ok(tcp) => tcp,
        Err(code) => {
            tracing::info!(%target, ?code, "open refused");
            let _ = send.finish();
            return;
        }
    };
    let _ = send.set_priority(protocol::priority::DATA);
    match crate::splice::splice(tcp, send, recv).await {
        Ok(t) => tracing::debug!(%target, up = t.up, down = t.down, "stream done"),
        Err(err) => tracing::debug!(%target, %err, "stream aborted"),
    }
}

async fn dial(target: SocketAddr, timeout: Duration) -> Result<TcpStream, Code> {
    match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => Ok(tcp),
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err(Code::ConnectionRefused)
        }
        Ok(Err(_)) => Err(Code::Unreachable),
        Err(_) => Err(Code::Timeout),
    }
}
