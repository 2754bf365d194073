//! The HTTP proxy front door (hyper 1): `CONNECT host:port` tunnels, and absolute-form `http://`
//! requests forwarded through a tunnel stream rewritten to origin-form. Keep-alive to the client,
//! each request authenticated, authorised and routed by its own target.
//!
//! Request smuggling is refused before any byte is forwarded, for every request on a connection:
//! the client's bytes reach hyper only through a [`Framer`] that delimits heads and bodies by
//! itself and checks each head in the strict grammar (CRLF line endings only, no obs-fold, no
//! `Content-Length` together with `Transfer-Encoding`, no differing `Content-Length`s, no transfer
//! coding but a lone `chunked`). hyper parses only heads the framer has checked, so requests that
//! arrive together in one read (pipelined) get the same checks as the first; a refused head is
//! answered 400 and closes the connection.
//!
//! URL userinfo (`http://user:pw@host/`) is never forwarded (RFC 9110 §4.2.4): it is dropped from
//! an absolute-form request (the service sees `Host: host[:port]` and an origin-form target), and
//! a CONNECT authority with userinfo is refused with 400.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod exchange;
mod framing;

use framing::{lock, Framer, Strict};

use super::access::Client;
use super::forward::{Opened, Requested};
use super::socks::ClientStream;
use super::{Front, Gateway};
use crate::protocol::Code;

type Body = BoxBody<Bytes, hyper::Error>;

/// Serves one HTTP proxy client connection (possibly many requests).
pub async fn serve<S: ClientStream>(
    gateway: Arc<Gateway>,
    stream: S,
    addr: SocketAddr,
    shutdown: CancellationToken,
) {
    stream.set_low_latency();
    let framer = Arc::new(Mutex::new(Framer::new(gateway.config.max_header_bytes)));
    // CONNECT tunnels outlive the HTTP connection they were upgraded from; tracking them here keeps
    // the client's connection slots held, and the gateway's drain waiting, until they end.
    let tunnels = TaskTracker::new();
    let abort = Abort::new(stream.duplicate());
    let reset = abort.reset.clone();
    // A client that vanished without a FIN or RST is noticed, as on the SOCKS5 port's splices.
    if let Some(socket) = &abort.socket {
        crate::splice::keepalive(
            socket2::SockRef::from(&**socket),
            crate::splice::limits().tcp_keepalive,
        );
    }
    let io = TokioIo::new(Strict {
        inner: stream,
        framer: framer.clone(),
        current: abort.current.clone(),
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(gateway.config.handshake_timeout)
        .max_buf_size(gateway.config.max_header_bytes)
        // Header names reach the service as the client wrote them, and the client's as the
        // service wrote them: legacy services match names case-sensitively more often than not.
        .preserve_header_case(true);
    let service = {
        let gateway = gateway.clone();
        let tunnels = tunnels.clone();
        let abort = abort.clone();
        hyper::service::service_fn(move |req| {
            let gateway = gateway.clone();
            let framer = framer.clone();
            let tunnels = tunnels.clone();
            let abort = abort.clone();
            // Made with the request, before hyper first polls its future: hyper may drop that
            // future unpolled when the client's connection ends at once.
            let unrouted = Unrouted::new(addr, &req);
            async move {
                let resp = handle::<S>(
                    gateway,
                    req,
                    addr,
                    &framer,
                    tunnels,
                    abort,
                    &unrouted.routed,
                )
                .await;
                unrouted.answered();
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let mut conn = Box::pin(builder.serve_connection(io, service).with_upgrades());
    let result = tokio::select! {
        r = conn.as_mut() => r,
        // An exchange reset the client (`Abort::now`): the connection is dropped below, and its
        // last close sends the RST.
        _ = reset.cancelled() => Ok(()),
        _ = shutdown.cancelled() => {
            // Finish the request in progress, then close; upgraded tunnels live on in their tasks.
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                _ = reset.cancelled() => Ok(()),
            }
        }
    };
    if let Err(err) = result {
        tracing::debug!(client = %addr, %err, "http connection ended");
    }
    drop(conn);
    drop(abort);
    tunnels.close();
    tunnels.wait().await;
}

/// Handles one request.
async fn handle<S: ClientStream>(
    gateway: Arc<Gateway>,
    req: Request<Incoming>,
    addr: SocketAddr,
    framer: &Mutex<Framer>,
    tunnels: TaskTracker,
    abort: Abort,
    routed: &AtomicBool,
) -> Response<Body> {
    let verdict = lock(framer).take_verdict();
    if let Err(reason) = verdict {
        tracing::debug!(client = %addr, reason, "request head refused");
        return closing(text(
            StatusCode::BAD_REQUEST,
            &format!("bad request: {reason}"),
        ));
    }
    let has_body = !req.body().is_end_stream();
    let is_connect = req.method() == Method::CONNECT;
    let body_taken = AtomicBool::new(false);
    let resp = match credentials(&gateway, &req, addr) {
        Err(resp) => resp,
        Ok(client) if is_connect => {
            connect::<S>(gateway, req, client, &tunnels, &abort, routed).await
        }
        Ok(client) => forward(gateway, req, client, &body_taken, &tunnels, abort, routed).await,
    };
    if is_connect {
        // Before hyper writes the answer: a tunnel's first bytes may follow the head at once.
        lock(framer).connect_outcome(resp.status().is_success());
    }
    // A body left unread (a refusal) would have to be drained to reach the next request; closing
    // is simpler and keeps the client from streaming it for nothing. A body an exchange took is
    // the exchange's: a service may answer before it has read all of it (RFC 9112 §9.3), and the
    // upload goes on; hyper reads it to its end before the next request, or, if the exchange drops
    // it, drains it or closes the connection.
    if has_body && !body_taken.load(Ordering::Acquire) {
        return closing(resp);
    }
    resp
}

/// `Proxy-Authorization: Basic` → the client's identity, or the 407 to send.
fn credentials(
    gateway: &Gateway,
    req: &Request<Incoming>,
    addr: SocketAddr,
) -> Result<Client, Response<Body>> {
    let challenge = || {
        let mut resp = text(
            StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            "proxy authentication required",
        );
        resp.headers_mut().insert(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"postern\""),
        );
        resp
    };
    let refused = |user: Option<&str>, code: Code| {
        super::log_login_refused(Front::Http, addr, user, code);
    };
    let Some(value) = req.headers().get(header::PROXY_AUTHORIZATION) else {
        return gateway.access.anonymous(addr).map_err(|code| {
            refused(None, code);
            challenge()
        });
    };
    let decoded = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Basic ")
                .or_else(|| v.strip_prefix("basic "))
        })
        .and_then(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok());
    let Some((login, password)) = decoded.as_deref().and_then(|s| s.split_once(':')) else {
        refused(None, Code::Unauthorized);
        return Err(challenge());
    };
    gateway
        .access
        .authenticate(addr, login, password)
        .map_err(|code| {
            refused(Some(login), code);
            match code {
                Code::Unauthorized => challenge(),
                other => refusal(other, &Requested::Name(login.to_string(), 0)),
            }
        })
}

/// `CONNECT host:port`: open the tunnel stream first, then answer 200 and splice.
async fn connect<S: ClientStream>(
    gateway: Arc<Gateway>,
    req: Request<Incoming>,
    client: Client,
    tunnels: &TaskTracker,
    abort: &Abort,
    routed: &AtomicBool,
) -> Response<Body> {
    // Userinfo in a CONNECT authority is refused rather than dropped: nothing in a tunnel could
    // carry it on, so a client sending it is confused about where its credentials go.
    if req.uri().authority().is_some_and(has_userinfo) {
        return text(
            StatusCode::BAD_REQUEST,
            "bad request: userinfo (user:password@) is not allowed in a CONNECT authority",
        );
    }
    let Some(requested) = req
        .uri()
        .authority()
        .and_then(|a| requested(a.host(), a.port_u16()))
    else {
        return text(
            StatusCode::BAD_REQUEST,
            "bad request: CONNECT needs host:port",
        );
    };
    // A CONNECT is a tunnel, as a SOCKS5 connection is: a client's FIN before the `200` may be
    // the end of what it sends, not its leaving, so it is not watched for here.
    let started = std::time::Instant::now();
    let (target, opened) = match open(
        &gateway,
        &client,
        &requested,
        std::future::pending(),
        abort,
        routed,
    )
    .await
    {
        Ok(ok) => ok,
        Err(refused) => return refused,
    };
    tunnels.spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                // The client is gone (the `200` could not be written): its line says so, and
                // the stream is reset, so the agent resets the connection it dialled.
                tracing::debug!(client = %client.addr, %err, "CONNECT upgrade failed");
                crate::protocol::abandon(opened.send, opened.recv);
                super::log_connection(
                    Front::Http,
                    &client,
                    &target,
                    &opened.relay_id,
                    &opened.agent_id,
                    started,
                    crate::splice::Transferred::default(),
                    &Err(std::io::Error::other(exchange::LEFT_BEFORE_ANSWER)),
                );
                return;
            }
        };
        // The tunnel takes the client's own stream back from hyper, so that a broken transfer
        // ends the way it does on the SOCKS5 door: with a reset, never a clean FIN.
        match upgraded.downcast::<TokioIo<Strict<S>>>() {
            Ok(parts) => {
                let strict = parts.io.into_inner();
                // Bytes the client sent right behind its CONNECT head go first: what hyper had
                // read, then what the framer still holds (handed over, then not yet classified).
                let mut early = BytesMut::from(&parts.read_buf[..]);
                early.extend_from_slice(&lock(&strict.framer).take_unread());
                let stream = strict.inner;
                let mut opened = opened;
                opened.early = early.freeze();
                stream.carry(Front::Http, client, target, opened).await;
            }
            Err(upgraded) => {
                super::carry_io(Front::Http, &client, TokioIo::new(upgraded), target, opened).await;
            }
        }
    });
    Response::new(empty())
}

/// An absolute-form `http://` request: checked, rewritten to origin-form, sent through a tunnel.
async fn forward(
    gateway: Arc<Gateway>,
    req: Request<Incoming>,
    client: Client,
    body_taken: &AtomicBool,
    tunnels: &TaskTracker,
    abort: Abort,
    routed: &AtomicBool,
) -> Response<Body> {
    let uri = req.uri().clone();
    let Some(authority) = uri.authority().cloned() else {
        return text(
            StatusCode::BAD_REQUEST,
            "bad request: this is a proxy; send an absolute http:// URI or CONNECT",
        );
    };
    if uri.scheme_str() != Some("http") {
        return text(
            StatusCode::BAD_REQUEST,
            "bad request: only http:// URIs are forwarded; use CONNECT for TLS",
        );
    }
    let Some(requested) = requested(authority.host(), Some(authority.port_u16().unwrap_or(80)))
    else {
        return text(StatusCode::BAD_REQUEST, "bad request: invalid host");
    };
    let (target, opened) = match open(
        &gateway,
        &client,
        &requested,
        abort.hung_up(),
        &abort,
        routed,
    )
    .await
    {
        Ok(ok) => ok,
        Err(refused) => return refused,
    };
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // `host[:port]` of the target, never its userinfo (RFC 9110 §4.2.4, §7.2).
    let host = match authority.port() {
        Some(port) => format!("{}:{}", authority.host(), port.as_str()),
        None => authority.host().to_string(),
    };
    parts.headers.insert(
        header::HOST,
        HeaderValue::from_str(&host).unwrap_or_else(|_| HeaderValue::from_static("")),
    );
    parts.uri = Uri::builder()
        .path_and_query(uri.path_and_query().map_or("/", |p| p.as_str()))
        .build()
        .unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = hyper::Version::HTTP_11;
    let upstream_req = Request::from_parts(parts, body);
    body_taken.store(true, Ordering::Release);
    exchange::carry(
        opened,
        upstream_req,
        client,
        target,
        &requested,
        tunnels,
        abort,
    )
    .await
}

/// Opens the tunnel stream for a request, or answers its refusal (logged and counted). A client
/// whose connection ends while the open runs (hyper then drops this future, or `hung_up`
/// resolves) is logged and counted too: it left before the answer.
async fn open(
    gateway: &Gateway,
    client: &Client,
    requested: &Requested,
    hung_up: impl std::future::Future<Output = ()>,
    abort: &Abort,
    routed: &AtomicBool,
) -> Result<(super::forward::Target, Opened), Response<Body>> {
    // From here on, the open and then the exchange log the request however it ends.
    routed.store(true, Ordering::Relaxed);
    let mut waiting = Opening {
        client,
        requested,
        started: std::time::Instant::now(),
        done: false,
    };
    let result = tokio::select! {
        result = gateway.connect(client, requested) => result,
        // hyper does not always notice a client that leaves while its request waits.
        () = hung_up => {
            // Nothing is answered: the connection is dropped (with this future, whose `waiting`
            // logs the request) and reset.
            abort.now();
            return std::future::pending().await;
        }
    };
    waiting.done = true;
    result.map_err(|err| {
        super::log_refused(Front::Http, client, requested, waiting.started, &err);
        refusal(err.code(), requested)
    })
}

/// A request from the moment hyper has read its head until it is answered or routed (then
/// [`Opening`] and the exchange log it): dropped before either, its client left, and one access
/// log line says so, with the target the request named.
struct Unrouted {
    client: SocketAddr,
    target: String,
    started: std::time::Instant,
    routed: AtomicBool,
    answered: bool,
}

impl Unrouted {
    fn new(client: SocketAddr, req: &Request<Incoming>) -> Self {
        Unrouted {
            client,
            // Host and port only: never the userinfo an authority may carry.
            target: match req.uri().authority() {
                Some(a) => match a.port() {
                    Some(port) => format!("{}:{port}", a.host()),
                    None => a.host().to_string(),
                },
                None => "-".to_string(),
            },
            started: std::time::Instant::now(),
            routed: AtomicBool::new(false),
            answered: false,
        }
    }

    fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for Unrouted {
    fn drop(&mut self) {
        if !self.answered && !self.routed.load(Ordering::Relaxed) {
            // Credentials not checked yet: no login or namespace to name.
            let who = super::Leaver {
                addr: self.client,
                user: None,
                namespace: "-",
            };
            super::log_left(
                Front::Http,
                who,
                &self.target,
                self.started,
                exchange::LEFT_BEFORE_ANSWER,
            );
        }
    }
}

/// An open in progress: dropped before it finished, the client left.
struct Opening<'a> {
    client: &'a Client,
    requested: &'a Requested,
    started: std::time::Instant,
    done: bool,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if !self.done {
            super::log_left(
                Front::Http,
                self.client.into(),
                self.requested,
                self.started,
                exchange::LEFT_BEFORE_ANSWER,
            );
        }
    }
}

/// A host and port from a request → what to route.
fn requested(host: &str, port: Option<u16>) -> Option<Requested> {
    let port = port?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some(match host.parse() {
        Ok(ip) => Requested::Ip(SocketAddr::new(ip, port)),
        Err(_) => Requested::Name(host.to_string(), port),
    })
}

/// Whether an authority carries userinfo (`user:password@host`).
fn has_userinfo(authority: &hyper::http::uri::Authority) -> bool {
    authority.as_str().contains('@')
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and every header it names, and the
/// classic list. Framing is re-done by hyper on the next hop.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(format!("{message}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn closing(mut resp: Response<Body>) -> Response<Body> {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// The status and a short sentence for a refused target.
fn refusal(code: Code, requested: &Requested) -> Response<Body> {
    let status = StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
    let message = match code {
        Code::NoRoute => format!("no route to {requested}: no agent announces this address"),
        Code::NotAllowed => {
            format!("{requested}: port not exposed, or not allowed for this client")
        }
        Code::Timeout => format!("{requested}: timed out"),
        Code::ConnectionRefused => format!("{requested}: connection refused by the service"),
        Code::Internal | Code::Draining | Code::NoSuchSession | Code::NotMine => {
            format!("{requested}: relay unavailable")
        }
        other => format!("{requested}: {}", other.describe()),
    };
    text(status, &message)
}

/// The watch of the exchange a client connection is answering (HTTP/1: one at a time), shared by
/// the exchange and the connection's writer.
pub(super) type Current = Arc<std::sync::Mutex<Option<Arc<crate::splice::Watch>>>>;

fn lock_current(current: &Current) -> std::sync::MutexGuard<'_, Option<Arc<crate::splice::Watch>>> {
    // A plain slot: a poisoned lock still holds a usable value.
    current.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bytes reached the client: progress of the exchange's response, if a frame of it waits.
pub(super) fn progressed(current: &Current) {
    if let Some(watch) = lock_current(current).as_ref() {
        watch.progressed_if_waiting(crate::splice::DOWN);
    }
}

/// Resets a client connection when asked to, once hyper lets go of it. Holds a duplicate of the
/// client's socket (TCP clients only): when asked, it sets SO_LINGER to zero, so the socket's last
/// close sends a RST instead of a FIN.
#[derive(Clone, Default)]
pub(super) struct Abort {
    socket: Option<Arc<socket2::Socket>>,
    /// Cancelled by [`Abort::now`]: the connection's task drops the connection.
    reset: CancellationToken,
    /// The watch of the exchange being answered.
    current: Current,
}

impl Abort {
    pub(super) fn new(socket: Option<socket2::Socket>) -> Self {
        Abort {
            socket: socket.map(Arc::new),
            ..Abort::default()
        }
    }

    fn request(&self) {
        if let Some(socket) = &self.socket {
            let _ = socket.set_linger(Some(std::time::Duration::ZERO));
        }
    }

    /// Resolves once the client's connection has ended ([`super::hung_up`]). hyper itself
    /// notices a client leaving while its request waits only in some states (it reads a busy
    /// connection only to find its end, and not after a whole request has been read), so an
    /// exchange waiting for an answer watches too.
    async fn hung_up(&self) {
        super::hung_up(self.socket.as_deref()).await
    }

    /// Resets the client connection now, whatever hyper is doing with it: the connection's task
    /// drops it, and its last close sends the RST (never a FIN first, which a response delimited
    /// by the connection's end would take for a complete one).
    fn now(&self) {
        self.request();
        self.reset.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_is_recognised() {
        let uri: Uri = "http://user:secret@a:8080/x".parse().unwrap();
        assert!(has_userinfo(uri.authority().unwrap()));
        assert_eq!(uri.authority().unwrap().host(), "a");
        let uri: Uri = "http://a:8080/x".parse().unwrap();
        assert!(!has_userinfo(uri.authority().unwrap()));
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.append("x-secret", HeaderValue::from_static("1"));
        h.append("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.append(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic eA=="),
        );
        h.append("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
