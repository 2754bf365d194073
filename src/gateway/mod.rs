//! The gateway: the front doors legacy applications use (`ALL_PROXY=socks5h://…`, `HTTP_PROXY=…`).
//! Every connection is admitted ([`access`]), resolved and checked against the rules, then carried
//! through the tunnel that owns the target ([`forward`]); nothing is ever dialled directly.

pub mod access;
pub mod failover;
pub mod forward;
pub mod http;
pub mod load;
pub mod pool;
pub mod socks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::GatewayConfig;
use crate::protocol::Code;
use crate::registry::cache::RouteCache;
use crate::relay::Relay;
use access::{AccessHandle, Client};
use failover::OpenError;
use forward::{Forwarder, Opened, Requested, Target};
use pool::PeerPool;

/// Which front door a connection came through (for logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Front {
    Socks5,
    Http,
}

impl Front {
    fn as_str(self) -> &'static str {
        match self {
            Front::Socks5 => "socks5",
            Front::Http => "http",
        }
    }
}

/// A bound gateway, ready to [`Gateway::run`].
pub struct Gateway {
    config: GatewayConfig,
    socks5: std::sync::Mutex<Option<TcpListener>>,
    http: std::sync::Mutex<Option<TcpListener>>,
    socks5_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    forwarder: Forwarder,
    access: AccessHandle,
    connections: Arc<Semaphore>,
}

impl Gateway {
    /// Binds the front doors. `local` is the relay of this process, whose routes short-circuit;
    /// `peers` reaches every other relay.
    pub async fn bind(
        config: GatewayConfig,
        cache: Arc<RouteCache>,
        local: Option<Arc<Relay>>,
        peers: Option<PeerPool>,
    ) -> anyhow::Result<Self> {
        let bind = |addr: Option<SocketAddr>, what: &'static str| async move {
            match addr {
                Some(addr) => TcpListener::bind(addr)
                    .await
                    .map(Some)
                    .with_context(|| format!("binding {what} on {addr}")),
                None => Ok(None),
            }
        };
        let socks5 = bind(config.socks5, "SOCKS5").await?;
        let http = bind(config.http, "the HTTP proxy").await?;
        let forwarder = Forwarder::new(
            cache,
            local,
            peers,
            config.agent_suffix.clone(),
            config.resolve_names,
        );
        let connections = Arc::new(Semaphore::new(config.max_connections));
        let access = AccessHandle::new(&config);
        Ok(Gateway {
            socks5_addr: socks5.as_ref().and_then(|l| l.local_addr().ok()),
            http_addr: http.as_ref().and_then(|l| l.local_addr().ok()),
            socks5: std::sync::Mutex::new(socks5),
            http: std::sync::Mutex::new(http),
            config,
            forwarder,
            access,
            connections,
        })
    }

    pub fn socks5_addr(&self) -> Option<SocketAddr> {
        self.socks5_addr
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// Resolves, authorises and opens a client's target. The rules see the address that is routed.
    pub async fn connect(
        &self,
        client: &Client,
        requested: &Requested,
    ) -> Result<(Target, Opened), OpenError> {
        let started = Instant::now();
        // A name the system resolver looks up gets no longer than an open.
        let target = tokio::time::timeout(
            crate::protocol::OPEN_TIMEOUT,
            self.forwarder.resolve(&client.namespace, requested),
        )
        .await
        .unwrap_or(Err(Code::Timeout))
        .map_err(OpenError::before_open)?;
        self.access
            .check(client, &target)
            .map_err(OpenError::before_open)?;
        // The open budget (`protocol::OPEN_TIMEOUT`) is the failover's.
        let opened = self.forwarder.open(&target).await?;
        crate::metrics::metrics()
            .connect_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok((target, opened))
    }

    /// Serves clients until `shutdown`, then gives in-flight connections `grace` to finish.
    /// Puts a reloaded config's users, allowlist and rules in force (SIGHUP); connections in flight
    /// keep going, every later connection is checked against the new policy.
    pub fn reload(&self, config: &GatewayConfig) {
        self.access.reload(config);
    }

    /// The route cache this gateway reads.
    pub fn cache(&self) -> &Arc<RouteCache> {
        self.forwarder.cache()
    }

    pub async fn run(
        self: Arc<Self>,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> anyhow::Result<()> {
        let take = |l: &std::sync::Mutex<Option<TcpListener>>| {
            l.lock().unwrap_or_else(|e| e.into_inner()).take()
        };
        let listeners: Vec<(Front, TcpListener)> = [
            (Front::Socks5, take(&self.socks5)),
            (Front::Http, take(&self.http)),
        ]
        .into_iter()
        .filter_map(|(front, l)| l.map(|l| (front, l)))
        .collect();
        for (front, listener) in &listeners {
            tracing::info!(addr = %listener.local_addr()?, front = front.as_str(), "gateway listening");
        }
        let gateway = self;
        let tasks = TaskTracker::new();
        let accepting = TaskTracker::new();
        for (front, listener) in listeners {
            accepting.spawn(accept_loop(
                gateway.clone(),
                front,
                listener,
                shutdown.clone(),
                tasks.clone(),
            ));
        }
        accepting.close();
        accepting.wait().await;
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!(
                remaining = tasks.len(),
                "grace period over; closing remaining client connections"
            );
        }
        if let Some(peers) = gateway.forwarder.peers() {
            peers.close().await;
        }
        Ok(())
    }
}

/// Accepts on one front door: allowlist, global and per-client limits, then one task per client.
async fn accept_loop(
    gateway: Arc<Gateway>,
    front: Front,
    listener: TcpListener,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let (tcp, client) = tokio::select! {
            _ = shutdown.cancelled() => {
                // Connections the kernel completed before the drain began wait in the backlog;
                // closing the listener would reset them. They are clients like any other: serve
                // them (a zero timeout polls `accept` once).
                while let Ok(Ok((tcp, client))) =
                    tokio::time::timeout(Duration::ZERO, listener.accept()).await
                {
                    serve_client(&gateway, front, tcp, client, &shutdown, &tasks);
                }
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        serve_client(&gateway, front, tcp, client, &shutdown, &tasks);
    }
}

/// Admits one accepted client (allowlist, global and per-client limits) and serves it in a task.
fn serve_client(
    gateway: &Arc<Gateway>,
    front: Front,
    tcp: tokio::net::TcpStream,
    client: std::net::SocketAddr,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) {
    let slot = match gateway.access.admit(client.ip()) {
        Ok(slot) => slot,
        Err(why) => {
            tracing::info!(%client, front = front.as_str(), why, "client refused");
            crate::splice::abort(tcp);
            return;
        }
    };
    let Ok(permit) = gateway.connections.clone().try_acquire_owned() else {
        tracing::warn!(%client, limit = gateway.config.max_connections, "connection limit reached; refusing client");
        crate::splice::abort(tcp);
        return;
    };
    let gateway = gateway.clone();
    let shutdown = shutdown.clone();
    // Boxed: the connection's future is ~12 KiB (the SOCKS5 or HTTP front, the failover, the
    // splice), and a task spawned by value is copied whole at every layer of the spawn.
    tasks.spawn(Box::pin(async move {
        let active = &crate::metrics::metrics().active_client_connections;
        active.inc();
        match front {
            Front::Socks5 => socks::serve(gateway, tcp, client).await,
            Front::Http => http::serve(gateway, tcp, client, shutdown).await,
        }
        active.dec();
        drop((slot, permit));
    }));
}

/// The access log: one line per proxied connection. `transferred` is what moved before the end,
/// whether it ended well (`result=ok`) or broke mid-way (`result=aborted`, with the `error`).
/// Bytes are not counted here: the meter added them to `postern_gateway_bytes_total` as they
/// moved, so the counter is right while connections are open and after they break.
fn log_connection(
    front: Front,
    client: &Client,
    target: &Target,
    relay_id: &str,
    agent_id: &str,
    started: Instant,
    transferred: crate::splice::Transferred,
    result: &std::io::Result<()>,
) {
    let label = if result.is_ok() { "ok" } else { "aborted" };
    count(front, label);
    let error = match result {
        Ok(()) => None,
        Err(err) => Some(err.to_string()),
    };
    tracing::info!(target: "postern::access", client = %client.addr, user = client.user.as_deref().unwrap_or("-"),
        front = front.as_str(), target = %target.addr, namespace = %target.namespace, agent_id,
        relay_id, bytes_up = transferred.up, bytes_down = transferred.down,
        duration_ms = started.elapsed().as_millis() as u64, result = label, error, "connection");
}

/// A meter for one client connection that also feeds `postern_gateway_bytes_total`.
pub(crate) fn client_meter() -> crate::splice::Progress {
    let m = crate::metrics::metrics();
    // One statement each: a family's guard is held until the end of the statement, and creating
    // the second child while the first guard is held would deadlock.
    let up = m
        .client_bytes
        .get_or_create(&crate::metrics::Direction { direction: "up" })
        .clone();
    let down = m
        .client_bytes
        .get_or_create(&crate::metrics::Direction { direction: "down" })
        .clone();
    crate::splice::Progress::counting_into(up, down)
}

/// The access log line for a connection that was refused before any byte moved: `result` is the
/// code the client was answered with, `cause` what the failover saw (see [`failover::Cause`]),
/// and `relay_id`/`session_id`/`agent_id` the owner that failed last (`-` when no owner was
/// tried), with the number of `attempts`.
fn log_refused(
    front: Front,
    client: &Client,
    requested: &Requested,
    started: Instant,
    error: &OpenError,
) {
    let code = error.code();
    let (relay_id, session_id, agent_id) = match &error.owner {
        Some(o) => (&*o.relay_id, o.session_id.to_string(), &*o.agent_id),
        None => ("-", "-".to_string(), "-"),
    };
    count(front, crate::metrics::code_label(code));
    // The same fields as a carried connection's line, so one parser reads both.
    tracing::info!(target: "postern::access", client = %client.addr, user = client.user.as_deref().unwrap_or("-"),
        front = front.as_str(), target = %requested, namespace = %client.namespace, agent_id, relay_id,
        session_id, bytes_up = 0u64, bytes_down = 0u64, duration_ms = started.elapsed().as_millis() as u64,
        result = crate::metrics::code_label(code),
        reason = code.describe(), cause = error.cause.label(), attempts = error.attempts, "refused");
}

/// Resolves once a client's connection has ended (its FIN or RST), never otherwise, and never
/// without a socket to watch: `socket` (the client's, duplicated) is watched for the peer's
/// hang-up only (EPOLLRDHUP), nothing is read from it, so whoever reads the connection keeps
/// every byte. A front door waiting on something else (an open, an answer) learns this way that
/// its client has left.
pub(crate) async fn hung_up(socket: Option<&socket2::Socket>) {
    let watched = socket.map(|socket| {
        socket
            .try_clone()
            .and_then(|dup| tokio::net::TcpStream::from_std(dup.into()))
    });
    let Some(Ok(watched)) = watched else {
        return std::future::pending().await;
    };
    let readable = tokio::io::Interest::READABLE;
    loop {
        let Ok(ready) = watched.ready(readable).await else {
            return std::future::pending().await;
        };
        if ready.is_read_closed() {
            return;
        }
        // Readable only (bytes for the reader): forget this readiness without reading, and
        // wait for the next event.
        let _ = watched.try_io(readable, || {
            Err::<(), _>(std::io::ErrorKind::WouldBlock.into())
        });
    }
}

/// The access log line and count for a request of a kind the gateway does not serve (a SOCKS5
/// BIND or UDP ASSOCIATE): counted as `bad_request`, logged with what was asked.
fn log_unsupported(front: Front, client: &Client, requested: &Requested, command: &str) {
    count(front, crate::metrics::code_label(Code::BadRequest));
    tracing::info!(target: "postern::access", client = %client.addr, user = client.user.as_deref().unwrap_or("-"),
        front = front.as_str(), target = %requested, namespace = %client.namespace, agent_id = "-",
        relay_id = "-", bytes_up = 0u64, bytes_down = 0u64, duration_ms = 0u64,
        result = crate::metrics::code_label(Code::BadRequest),
        reason = "command not supported (only CONNECT is served)", command, "refused");
}

/// Counts a client connection that ended, under its front door and result.
fn count(front: Front, result: &'static str) {
    crate::metrics::metrics()
        .client_connections
        .get_or_create(&crate::metrics::FrontResult {
            front: front.as_str(),
            result,
        })
        .inc();
}

/// Who left, in an access-log line: the client's address, login and namespace once its
/// credentials are checked; `-` for what is not known yet.
struct Leaver<'a> {
    addr: SocketAddr,
    user: Option<&'a str>,
    namespace: &'a str,
}

impl<'a> From<&'a Client> for Leaver<'a> {
    fn from(client: &'a Client) -> Self {
        Leaver {
            addr: client.addr,
            user: client.user.as_deref(),
            namespace: &client.namespace,
        }
    }
}

/// The access log line and count for a client that left before its connection was carried
/// (`result=aborted`, the `error` saying why): while its request waited to be routed, or its
/// stream to be opened. Nothing moved, and no owner answered yet.
fn log_left(
    front: Front,
    who: Leaver<'_>,
    target: &dyn std::fmt::Display,
    started: Instant,
    why: &str,
) {
    count(front, "aborted");
    tracing::info!(target: "postern::access", client = %who.addr, user = who.user.unwrap_or("-"),
        front = front.as_str(), target = %target, namespace = who.namespace, agent_id = "-",
        relay_id = "-", bytes_up = 0u64, bytes_down = 0u64,
        duration_ms = started.elapsed().as_millis() as u64, result = "aborted", error = why, "connection");
}

/// The access log line and count for a client turned away before it named a target: a wrong or
/// missing password (`unauthorized`), a client address outside the allowlist (`not_allowed`).
/// `user` is the login the client offered, if any.
fn log_login_refused(front: Front, client: SocketAddr, user: Option<&str>, code: Code) {
    count(front, crate::metrics::code_label(code));
    tracing::info!(target: "postern::access", client = %client, user = user.unwrap_or("-"),
        front = front.as_str(), target = "-", namespace = "-", agent_id = "-", relay_id = "-",
        bytes_up = 0u64, bytes_down = 0u64, duration_ms = 0u64, result = crate::metrics::code_label(code),
        reason = code.describe(), "refused");
}

/// Carries an opened tunnel stream with `splice` (given the stream pair and the meter), then
/// writes the access log line; the relay's in-flight guard is held until the splice ends.
async fn carry_with<F, Fut>(
    front: Front,
    client: &Client,
    target: Target,
    opened: Opened,
    splice: F,
) where
    F: FnOnce(quinn::SendStream, quinn::RecvStream, Arc<crate::splice::Progress>) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<crate::splice::Transferred>>,
{
    let started = Instant::now();
    let Opened {
        mut send,
        recv,
        guard,
        relay_id,
        agent_id,
        early,
    } = opened;
    let meter = Arc::new(client_meter().for_client(client.addr.ip()));
    let tracked = load::relay_load().track(&relay_id, &meter);
    let wrote = if early.is_empty() {
        Ok(())
    } else {
        send.write_all(&early)
            .await
            .map(|()| meter.add_up(early.len() as u64))
            .map_err(std::io::Error::from)
    };
    // Spliced even when the early bytes could not go: the splice then ends the client's
    // connection as a broken transfer (with a reset), not with a FIN.
    let result = splice(send, recv, meter.clone()).await.map(|_| ());
    let result = wrote.and(result);
    drop(tracked);
    drop(guard);
    log_connection(
        front,
        client,
        &target,
        &relay_id,
        &agent_id,
        started,
        meter.transferred(),
        &result,
    );
}

/// Splices a client TCP connection (reset on failure) with an opened tunnel stream.
async fn carry(front: Front, client: &Client, tcp: TcpStream, target: Target, opened: Opened) {
    carry_with(front, client, target, opened, |send, recv, meter| async move {
        crate::splice::splice_metered(tcp, send, recv, &meter).await
    })
    .await;
}

/// Splices any client byte stream (an upgraded HTTP connection, an in-memory stream) with an
/// opened tunnel stream.
async fn carry_io<S>(front: Front, client: &Client, io: S, target: Target, opened: Opened)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    carry_with(
        front,
        client,
        target,
        opened,
        |send, recv, meter| async move {
            crate::splice::splice_io_metered(io, send, recv, &meter).await
        },
    )
    .await;
}
