//! One absolute-form request carried over a tunnel stream: the upstream HTTP/1 connection on the
//! stream, its byte counts, its access-log line, and how it breaks. A failure on either side must
//! look like one on the other: a response body cut short resets the client ([`Breakable`]), and
//! an upload the client broke off resets the stream ([`Sending`]), so the service behind the agent
//! never takes a truncated body for a complete one.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use quinn::SendStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{lock_current, refusal, strip_hop_by_hop, text, Abort, Body};
use crate::gateway::access::Client;
use crate::gateway::forward::{Opened, Requested, Target};
use crate::gateway::Front;
use crate::protocol::{close, Code};

/// Sends `request` over the opened tunnel stream and answers with the service's response.
pub(super) async fn carry(
    opened: Opened,
    upstream_req: Request<Incoming>,
    client: Client,
    target: Target,
    requested: &Requested,
    tunnels: &TaskTracker,
    abort: Abort,
) -> Response<Body> {
    let Opened {
        send,
        recv,
        guard,
        relay_id,
        agent_id,
        // Nothing rides with an absolute-form request: hyper reads the body.
        early: _,
    } = opened;
    // The exchange runs under the limits of a splice: a response the client stops reading (its
    // stream pins up to a stream window of the tunnel's or peer connection's shared window) draws
    // on the client's stall budget and is reset past it or after `stream_stall_timeout`, and an
    // exchange where nothing moves for `stream_idle_timeout` ends, response head or not. Every
    // write to the client is progress (`Strict`), every byte to or from the service activity.
    let watch = Arc::new(match &abort.socket {
        Some(socket) => {
            crate::splice::Watch::with_owned_sink(Some(client.addr.ip()), socket.clone())
        }
        None => crate::splice::Watch::new(Some(client.addr.ip())),
    });
    *lock_current(&abort.current) = Some(watch.clone());
    let mut counted = Counted::new(tokio::io::join(
        recv,
        Sending {
            inner: send,
            shut: false,
        },
    ));
    counted.watch = Some(watch.clone());
    let tracked = crate::gateway::load::relay_load().track(&relay_id, &counted.meter);
    let exchange = Arc::new(Exchange {
        _tracked: tracked,
        client,
        target,
        relay_id,
        agent_id,
        started: Instant::now(),
        meter: counted.meter.clone(),
        error: std::sync::Mutex::new(None),
        left: CancellationToken::new(),
    });
    let (mut sender, conn) = match hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .handshake(TokioIo::new(counted))
        .await
    {
        Ok(pair) => pair,
        Err(err) => {
            tracing::debug!(%err, "upstream handshake failed");
            exchange.fail(err.to_string());
            return refusal(Code::Internal, requested);
        }
    };
    let upstream = exchange.clone();
    let (watching, cut) = (watch.clone(), abort.clone());
    tunnels.spawn(async move {
        tokio::select! {
            // First: once the client has left, hyper's connection must not get to close the
            // stream cleanly (its request gone, it would shut its side down).
            biased;
            // Dropped unfinished, the stream is reset: the service sees the client leave.
            _ = upstream.left.cancelled() => {}
            ended = conn => if let Err(err) = ended {
                upstream.fail(err.to_string());
            },
            err = watching.expiry(crate::splice::limits()) => {
                // Dropping the connection stops the stream, which frees the credit it held; the
                // client, who read nothing, is reset.
                upstream.fail(err.to_string());
                cut.now();
            }
        }
        // Whatever of the body is left is in this process: nothing to watch, no stall slot held.
        watching.finish();
        drop(guard);
    });
    // hyper drops this future when the client's connection ends first (a FIN counts: as with
    // nginx and squid by default, a client that stops sending while its request is in flight has
    // left); the upstream connection is then dropped, which resets the stream.
    let waiting = Unanswered(Some(exchange.clone()));
    let answer = tokio::select! {
        answer = sender.send_request(upstream_req) => answer,
        () = abort.hung_up() => {
            // Dropping `waiting` marks the exchange and resets the stream. Nothing is answered:
            // the client's connection is dropped (with this future) and reset.
            drop(waiting);
            abort.now();
            return std::future::pending().await;
        }
    };
    waiting.answered();
    match answer {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            // An intermediary speaks its own version (RFC 9110 §2.5): an HTTP/1.0 service's answer
            // reaches an HTTP/1.1 client as HTTP/1.1, on a connection kept for the next request.
            parts.version = hyper::Version::HTTP_11;
            let body = Breakable {
                ended: body.is_end_stream(),
                inner: body,
                exchange,
                abort,
                watch,
                handed: false,
            };
            Response::from_parts(parts, body.boxed())
        }
        Err(err) => {
            tracing::debug!(%err, "upstream request failed");
            exchange.fail(err.to_string());
            text(StatusCode::BAD_GATEWAY, upstream_failure(&err))
        }
    }
}

/// Why an exchange, or an open, ended when hyper dropped the request's future.
pub(super) const LEFT_BEFORE_ANSWER: &str = "the client left before the answer";

/// Marks its exchange failed unless it was answered: dropped with the request's future.
struct Unanswered(Option<Arc<Exchange>>);

impl Unanswered {
    fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(exchange) = self.0.take() {
            exchange.left(LEFT_BEFORE_ANSWER);
        }
    }
}

/// What a `502` says about an exchange whose response never came.
fn upstream_failure(err: &hyper::Error) -> &'static str {
    if err.is_parse_too_large() {
        "bad gateway: the service's response head is too large (more than 100 header fields, or \
         about 400 KiB)"
    } else if err.is_parse() || err.is_parse_status() {
        "bad gateway: the service's response is not valid HTTP/1.1"
    } else if err.is_timeout() {
        "bad gateway: the service's response head did not arrive in time"
    } else {
        "bad gateway: the service behind the agent closed the connection"
    }
}

/// A tunnel stream's sending side that is reset, not finished, unless it was shut down: quinn
/// finishes a stream it drops, and a FIN after an upload the client broke off would hand the
/// service a clean end of a truncated body. hyper shuts its connection down when an exchange
/// ends well; a connection dropped after an error (the client's body broke off, the exchange's
/// limits expired) resets the stream, and the agent resets the service's connection.
struct Sending {
    inner: SendStream,
    shut: bool,
}

impl Drop for Sending {
    fn drop(&mut self) {
        if !self.shut {
            let _ = self
                .inner
                .reset(quinn::VarInt::from_u32(close::STREAM_ABORTED));
        }
    }
}

impl AsyncWrite for Sending {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.get_mut().inner), cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.get_mut().inner), cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = AsyncWrite::poll_shutdown(Pin::new(&mut this.inner), cx);
        if let Poll::Ready(Ok(())) = poll {
            this.shut = true;
        }
        poll
    }
}

/// Counts bytes each way through the upstream stream as they move, for the access log and
/// `postern_gateway_bytes_total`.
struct Counted<S> {
    inner: S,
    meter: Arc<crate::splice::Progress>,
    /// The exchange's limits: bytes either way are activity (the idle deadline).
    watch: Option<Arc<crate::splice::Watch>>,
}

impl<S> Counted<S> {
    fn new(inner: S) -> Self {
        Counted {
            inner,
            meter: Arc::new(crate::gateway::client_meter()),
            watch: None,
        }
    }

    fn touched(&self, n: usize) {
        if let (Some(watch), true) = (&self.watch, n > 0) {
            watch.touched();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        this.meter.add_down(n as u64);
        this.touched(n);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &poll {
            this.meter.add_up(*n as u64);
            this.touched(*n);
        }
        poll
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// One absolute-form request carried through a tunnel, logged once both its upstream connection
/// and the response body handed to the client are done (whichever ends last drops the last
/// reference): the upstream side may look finished while the client's body broke off, and the
/// client's verdict is what the access log must say.
struct Exchange {
    /// Counts the exchange in the per-relay load until it is logged.
    _tracked: crate::gateway::load::Tracked,
    client: Client,
    target: Target,
    relay_id: Arc<str>,
    agent_id: Arc<str>,
    started: Instant,
    meter: Arc<crate::splice::Progress>,
    /// The first failure seen on either side.
    error: std::sync::Mutex<Option<String>>,
    /// Cancelled when the client left: the upstream connection is dropped, resetting the stream.
    left: CancellationToken,
}

impl Exchange {
    /// The client left before the exchange ended: it fails, and the service's connection is reset.
    fn left(&self, why: &str) {
        self.fail(why.to_string());
        self.left.cancel();
    }

    fn fail(&self, why: String) {
        let mut error = self.error.lock().unwrap_or_else(|e| e.into_inner());
        error.get_or_insert(why);
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let error = self
            .error
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let result = match error {
            None => Ok(()),
            Some(why) => Err(std::io::Error::other(why)),
        };
        crate::gateway::log_connection(
            Front::Http,
            &self.client,
            &self.target,
            &self.relay_id,
            &self.agent_id,
            self.started,
            self.meter.transferred(),
            &result,
        );
    }
}

/// A response body from a tunnel that marks the exchange broken when it fails mid-way, and then
/// has the client connection reset ([`Abort`]): a body cut short must never look complete.
struct Breakable<B> {
    inner: B,
    exchange: Arc<Exchange>,
    abort: Abort,
    /// The exchange's limits: a frame handed to hyper waits until hyper asks for the next one
    /// (it asks once it has room, i.e. once the client has read enough).
    watch: Arc<crate::splice::Watch>,
    handed: bool,
    /// The whole body went to hyper; dropped before that, the client left mid-response.
    ended: bool,
}

impl<B> Drop for Breakable<B> {
    fn drop(&mut self) {
        if !self.ended {
            self.exchange
                .left("the client left before the response ended");
        }
    }
}

impl<B> hyper::body::Body for Breakable<B>
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if std::mem::take(&mut this.handed) {
            this.watch.moved(crate::splice::DOWN);
        }
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                this.watch.waiting(crate::splice::DOWN);
                this.handed = true;
                // Trailers end a body: hyper polls no further after them (a chunked body's
                // `is_end_stream` stays false).
                this.ended = frame.is_trailers() || this.inner.is_end_stream();
            }
            Poll::Ready(Some(Err(err))) => {
                this.exchange
                    .fail(format!("the response body broke off: {err}"));
                this.abort.request();
            }
            Poll::Ready(None) => this.ended = true,
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
