//! The whole wire protocol in one place: ALPNs, messages, result codes, limits and timeouts.
//!
//! Every control message is one frame: `[version: u8][length: u32 big-endian][JSON body]`. The body is
//! bounded by [`MAX_FRAME_LEN`], every read runs under a deadline, and decoding returns an [`Error`] on
//! any input — hostile bytes end the stream, never the process.
//!
//! Streams:
//! * agent → relay, the first bidirectional stream of a tunnel (control): [`Hello`] → [`Welcome`] or
//!   [`Reject`], then [`Message::Ping`]/[`Message::Pong`] and [`Message::Drain`] for the tunnel's life.
//! * relay → agent, one bidirectional stream per proxied connection: [`Open`] → [`OpenResult`], then
//!   raw bytes both ways; a FIN carries a TCP half-close.
//! * gateway → relay (peer ALPN), one stream per proxied connection: [`Forward`] → [`ForwardResult`],
//!   then raw bytes.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use crate::tls::{ALPN_AGENT, ALPN_PEER};

/// The most addresses one agent may claim (one `Hello`): each is a route in the registry and in every
/// gateway's cache, per tunnel, so a credential's holder must not be able to claim without bound.
pub const MAX_AGENT_IPS: usize = 1024;

/// The most port ranges one agent may expose (one `Hello`): every route carries them, so without a
/// bound one tunnel's routes could hold a frame's worth (~30 KB) each.
pub const MAX_AGENT_PORT_RANGES: usize = 64;

/// Protocol version carried in every frame; a peer speaking another version is refused.
pub const VERSION: u8 = 1;
/// Largest accepted frame body. A `Hello` listing a few thousand addresses fits; anything larger is
/// hostile or broken.
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// Deadline for the agent's `Hello` after its QUIC handshake completed.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for the answer to `Open` / `Forward` (covers the agent's TCP connect to its service).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline for the agent's TCP connect to a local service.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline for one attempt to open a stream through one owner of a route, inside the caller's
/// [`OPEN_TIMEOUT`]: longer than [`CONNECT_TIMEOUT`], so an agent's slow but successful dial is
/// not cut short.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(6);
/// How long an attempt may go unanswered before the next owner is tried alongside it (a hedge):
/// a hung relay or a cut path costs a new connection this much, not the whole open budget.
pub const HEDGE_DELAY: Duration = Duration::from_millis(300);
/// How often the agent pings on its control stream; a tunnel that misses a few pongs is redialled.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);

/// QUIC send priorities (higher is sent first). Control frames and the few bytes that open a
/// stream must not queue behind bulk data on a saturated tunnel; once open, a stream drops to
/// [`priority::DATA`] so proxied connections share the tunnel fairly.
pub mod priority {
    /// Control streams (hello, pings, drain).
    pub const CONTROL: i32 = 2;
    /// A stream while its `Open` / `Forward` and the answer are in flight.
    pub const OPENING: i32 = 1;
    /// Proxied bytes.
    pub const DATA: i32 = 0;
}

/// QUIC application error codes used when closing connections and resetting streams.
pub mod close {
    /// Normal shutdown.
    pub const SHUTDOWN: u32 = 0;
    /// The peer broke the protocol (bad frame, unexpected message, timeout).
    pub const PROTOCOL: u32 = 1;
    /// The agent was rejected (credentials or claims).
    pub const REJECTED: u32 = 2;
    /// The tunnel is redundant (landed on a relay the agent already holds).
    pub const DUPLICATE: u32 = 3;
    /// A proxied connection failed mid-way; the stream is reset so the far end does not mistake
    /// truncated data for a clean end.
    pub const STREAM_ABORTED: u32 = 4;
    /// The relay drained and its grace period ended.
    pub const DRAINED: u32 = 5;
}

/// A stream pair whose open is not answered yet: dropped before [`HalfOpen::opened`] (the
/// attempt timed out, lost a hedge, or its client left), it is reset and stopped, so the far end
/// resets the connection it may have dialled for it instead of seeing a clean end. quinn would
/// finish a dropped stream.
pub struct HalfOpen(Option<(quinn::SendStream, quinn::RecvStream)>);

impl HalfOpen {
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        HalfOpen(Some((send, recv)))
    }

    /// The streams, to send the open and read its answer on.
    pub fn streams(&mut self) -> (&mut quinn::SendStream, &mut quinn::RecvStream) {
        let (send, recv) = self.0.as_mut().expect("a half-open pair until opened");
        (send, recv)
    }

    /// The open was answered: the pair is the caller's.
    pub fn opened(mut self) -> (quinn::SendStream, quinn::RecvStream) {
        self.0.take().expect("a half-open pair until opened")
    }
}

impl Drop for HalfOpen {
    fn drop(&mut self) {
        if let Some((send, recv)) = self.0.take() {
            abandon(send, recv);
        }
    }
}

/// Resets and stops a stream pair (`STREAM_ABORTED`): the far end sees the connection broken, and
/// resets whatever it dialled for it, rather than a clean end.
pub fn abandon(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let code = quinn::VarInt::from_u32(close::STREAM_ABORTED);
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

/// Why a connection could not be opened, shared by every hop so that an agent's answer reaches the
/// client as the right SOCKS5 reply or HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    Ok,
    /// The target IP is not one of the agent's own addresses (a stale route).
    NotMine,
    /// The port is not exposed, or a rule forbids the connection.
    NotAllowed,
    /// No route (no agent) for the target.
    NoRoute,
    /// The relay no longer has the session the route named (a stale route).
    NoSuchSession,
    /// The agent's service refused the connection.
    ConnectionRefused,
    /// The agent could not reach its service.
    Unreachable,
    /// A deadline passed.
    Timeout,
    /// Credentials missing or wrong.
    Unauthorized,
    /// The relay or tunnel is draining and takes no new streams.
    Draining,
    /// The peer sent something the protocol does not allow.
    BadRequest,
    /// An internal failure (e.g. the tunnel broke while opening).
    Internal,
}

impl Code {
    /// The SOCKS5 reply code (RFC 1928 §6).
    pub fn socks5_reply(self) -> u8 {
        match self {
            Code::Ok => 0x00,
            Code::NotAllowed | Code::Unauthorized => 0x02,
            Code::NoRoute
            | Code::NotMine
            | Code::NoSuchSession
            | Code::Unreachable
            | Code::Draining => 0x04,
            Code::ConnectionRefused => 0x05,
            Code::Timeout => 0x06,
            Code::BadRequest | Code::Internal => 0x01,
        }
    }

    /// The HTTP status a proxy answers with.
    pub fn http_status(self) -> u16 {
        match self {
            Code::Ok => 200,
            Code::NotAllowed => 403,
            Code::Unauthorized => 407,
            Code::BadRequest => 400,
            Code::Timeout => 504,
            Code::NoRoute
            | Code::NotMine
            | Code::NoSuchSession
            | Code::ConnectionRefused
            | Code::Unreachable
            | Code::Draining
            | Code::Internal => 502,
        }
    }

    /// A short human sentence for logs and HTTP error bodies.
    pub fn describe(self) -> &'static str {
        match self {
            Code::Ok => "ok",
            Code::NotMine => "the agent does not own this address",
            Code::NotAllowed => "port not exposed or not allowed",
            Code::NoRoute => "no route to this address",
            Code::NoSuchSession => "tunnel session no longer exists",
            Code::ConnectionRefused => "connection refused by the target",
            Code::Unreachable => "target unreachable from the agent",
            Code::Timeout => "timed out",
            Code::Unauthorized => "authentication required",
            Code::Draining => "relay is draining",
            Code::BadRequest => "bad request",
            Code::Internal => "relay unavailable",
        }
    }

    /// Whether another owner of the same route may succeed where this one failed.
    pub fn try_next_owner(self) -> bool {
        matches!(
            self,
            Code::NotMine | Code::NoSuchSession | Code::Draining | Code::Internal | Code::Timeout
        )
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// The agent's greeting on its control stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub agent_id: String,
    pub namespace: String,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<PortRange>,
    /// Bearer token; empty when the agent authenticates by client certificate.
    pub token: Secret,
}

/// A credential (token, password): `Debug` and `Display` print `****`, never the value, so no log
/// line, error or panic message that formats a message or a config can carry it. On the wire it is
/// a plain JSON string; [`Secret::expose`] is the one way to read it, at the places that must.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value itself: for comparing, hashing or sending it, never for printing it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(****)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("****")
    }
}

/// An inclusive port range; a single port is `start == end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.start <= port && port <= self.end
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("invalid port {p:?} (expected 1-65535)"))
                .and_then(|n| {
                    if n == 0 {
                        Err("port 0 is not a port".to_string())
                    } else {
                        Ok(n)
                    }
                })
        };
        let (start, end) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let p = parse(s)?;
                (p, p)
            }
        };
        if start > end {
            return Err(format!("port range {s:?} is reversed"));
        }
        Ok(PortRange { start, end })
    }
}

/// The relay's acceptance of a tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub relay_id: String,
    pub session_id: u64,
    /// How many relays the cluster has live, so an agent settles for fewer tunnels on a small cluster.
    pub live_relays: u32,
}

/// The relay's refusal of a tunnel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    pub code: Code,
    pub reason: String,
}

/// Relay → agent: connect this proxied stream to `target`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    pub target: SocketAddr,
    pub session_id: u64,
}

/// Gateway → relay: forward this stream to `target` through the named session (or any of the relay's
/// sessions for the IP when `session_id` is absent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    pub namespace: String,
    pub target: SocketAddr,
    pub session_id: Option<u64>,
}

/// The answer to `Open` or `Forward`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenResult {
    pub code: Code,
}

/// Every message the protocol knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Reject(Reject),
    Open(Open),
    OpenResult(OpenResult),
    Forward(Forward),
    ForwardResult(OpenResult),
    Ping {
        nonce: u64,
    },
    /// The answer to a ping; carries the relay's current count of live relays so an agent on a
    /// growing cluster tops up its tunnels.
    Pong {
        nonce: u64,
        #[serde(default)]
        live_relays: u32,
    },
    /// The relay is draining: open a replacement tunnel, then let this one go within `grace_ms`.
    Drain {
        grace_ms: u64,
    },
}

impl Message {
    /// The message's type name, what logs show of an unexpected message (never its fields).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Reject(_) => "reject",
            Message::Open(_) => "open",
            Message::OpenResult(_) => "open_result",
            Message::Forward(_) => "forward",
            Message::ForwardResult(_) => "forward_result",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::Drain { .. } => "drain",
        }
    }
}

/// Failures reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("stream ended before a complete frame")]
    Truncated,
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    Version(u8),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    TooLarge(usize),
    /// The body is not a valid message; the text is the decoder's, with every string value the
    /// peer sent replaced by `"…"` (a token in the wrong place must not reach a log).
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("timed out after {0:?} waiting for a frame")]
    Timeout(Duration),
    #[error("unexpected message {0}")]
    Unexpected(&'static str),
}

impl Error {
    /// The unexpected-message error for `msg`.
    pub fn unexpected(msg: &Message) -> Self {
        Error::Unexpected(msg.kind())
    }
}

/// serde_json's message for `err`, cut before the first value it quotes: serde quotes what the
/// peer sent (`invalid type: string "…"`, ``unknown variant `…` ``), and a token in the wrong
/// place must not reach a log. Missing or duplicate fields keep their name, which is ours.
fn redacted(err: &serde_json::Error) -> String {
    let text = err.to_string();
    let message = match (err.line(), text.rfind(" at line ")) {
        (1.., Some(at)) => &text[..at],
        _ => text.as_str(),
    };
    let ours = ["missing field", "duplicate field"].iter().any(|kind| {
        message
            .strip_prefix(kind)
            .and_then(|rest| rest.strip_prefix(" `")?.strip_suffix('`'))
            .is_some_and(|name| name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
    });
    let shown = match message.find(['`', '"']) {
        Some(quote) if !ours => format!("{}…", &message[..quote]),
        _ => message.to_string(),
    };
    if err.line() > 0 {
        format!("{shown} at line {} column {}", err.line(), err.column())
    } else {
        shown
    }
}

/// Encodes one frame (header + JSON body) into a new buffer.
pub fn encode(msg: &Message) -> Result<Vec<u8>, Error> {
    let body = serde_json::to_vec(msg).map_err(|e| Error::Malformed(redacted(&e)))?;
    if body.len() > MAX_FRAME_LEN {
        return Err(Error::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.push(VERSION);
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Decodes one frame from the front of `buf`. Returns the message and the bytes consumed, `Ok(None)`
/// when `buf` holds only a prefix of a frame.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, Error> {
    let Some(header) = buf.get(..5) else {
        if let Some(&v) = buf.first() {
            if v != VERSION {
                return Err(Error::Version(v));
            }
        }
        return Ok(None);
    };
    if header[0] != VERSION {
        return Err(Error::Version(header[0]));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(Error::TooLarge(len));
    }
    let Some(body) = buf.get(5..5 + len) else {
        return Ok(None);
    };
    let msg = serde_json::from_slice(body).map_err(|e| Error::Malformed(redacted(&e)))?;
    Ok(Some((msg, 5 + len)))
}

/// Writes one frame.
pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> Result<(), Error> {
    let frame = encode(msg)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// Reads exactly one frame; never reads past it, so the raw bytes that follow stay in the stream.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Message, Error> {
    let mut header = [0u8; 5];
    read_full(r, &mut header).await?;
    if header[0] != VERSION {
        return Err(Error::Version(header[0]));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(Error::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    read_full(r, &mut body).await?;
    serde_json::from_slice(&body).map_err(|e| Error::Malformed(redacted(&e)))
}

/// Reads frames from a stream that carries nothing else (a control stream), cancel-safely: a read
/// raced against other events in `select!` and dropped half-way keeps what it read for the next call.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    /// The next frame. May read past it; use only where no raw bytes follow the frames.
    pub async fn next<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<Message, Error> {
        loop {
            if let Some((msg, used)) = decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(msg);
            }
            // Straight into the buffer's spare room (at least 64 bytes; a control frame is a few
            // dozen): a chunk array here would be part of every waiting future, i.e. of every
            // idle tunnel. `read_buf` is cancel-safe: either it returns bytes, which are kept, or
            // it consumed none.
            self.buf.reserve(64);
            let n = r.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(Error::Truncated);
            }
        }
    }
}

/// [`read_message`] under a deadline.
pub async fn read_message_timeout<R: AsyncRead + Unpin>(
    r: &mut R,
    timeout: Duration,
) -> Result<Message, Error> {
    tokio::time::timeout(timeout, read_message(r))
        .await
        .map_err(|_| Error::Timeout(timeout))?
}

async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), Error> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::Truncated),
        Err(e) => Err(Error::Io(e)),
    }
}

#[cfg(test)]
mod tests;
