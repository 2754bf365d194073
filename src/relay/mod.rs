//! The relay: accepts agent tunnels, authenticates them, keeps the session table, publishes routes,
//! and opens a stream on the owning tunnel for every proxied connection — for the gateway in its own
//! process directly, for other gateways and relays through its peer endpoint ([`peer`]).
//!
//! Drain (SIGTERM): the relay marks itself and its routes draining, tells every agent (which opens a
//! replacement tunnel elsewhere first), refuses new tunnels, keeps serving new streams on the tunnels
//! agents still hold on it (each agent ends its tunnel once its replacement is up and known, so an
//! agent this relay is the only owner of stays reachable meanwhile), lets in-flight streams finish
//! within the grace period, then revokes its lease and closes.

pub mod admission;
pub mod peer;
pub mod publisher;
pub mod sessions;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::config::{AgentCredential, PeerConfig, RelayConfig};
use crate::protocol::{self, close, Code, Hello, Message, Open, OpenResult, Reject, Welcome};
use crate::registry::cache::RouteCache;
use crate::registry::{unix_now, Registry, RelayInfo};
use publisher::{Change, Publisher};
use sessions::{Session, SessionTable};

use admission::AGENT_MAX_STREAMS;

/// Deadline for a QUIC handshake to complete.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a hello waits for this process's first view of the registry's routes, without which
/// claims held at other relays cannot be checked; past it (a registry outage) only this relay's
/// own tunnels are checked. Well inside the agent's 3 s dial deadline, which covers the hello.
const ROUTES_WAIT: Duration = Duration::from_secs(1);
/// How often the relay samples the live-relay count; when it grew past what a tunnel's agent last
/// heard, the tunnel's control loop tells it with an unasked pong (agents take a pong at any time;
/// `nonce` 0).
const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(500);

/// What admitted a hello: the credential, as sessions and routes record it.
struct Admission {
    /// SHA-256 of the admitting token; `None` for a certificate.
    token_sha256: Option<[u8; 32]>,
    /// The credential's fingerprint (see [`Session::credential`]).
    credential: String,
}

/// An admitted agent connection, handed from the admission to the session's run.
struct Admitted {
    session: Arc<Session>,
    send: SendStream,
    recv: RecvStream,
    welcome: Welcome,
    /// Its place among the relay's `max_tunnels`, held for the session's life.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// A verified agent certificate: what it may claim and under which name.
struct AgentCertificate {
    ips: Vec<IpAddr>,
    /// The subject's common name: the one agent id the certificate may use.
    name: Option<String>,
}

/// A stream opened on an agent's tunnel. `guard` counts it as in flight until dropped, so a
/// draining relay knows when it may close.
pub struct Tunnelled {
    pub send: SendStream,
    pub recv: RecvStream,
    pub guard: InFlight,
}

/// Counts one in-flight stream while alive.
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        crate::metrics::metrics().relay_streams_active.inc();
        InFlight(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        crate::metrics::metrics().relay_streams_active.dec();
    }
}

/// A bound relay, ready to [`Relay::run`].
pub struct Relay {
    config: RelayConfig,
    /// The live-relay count agents are told, sampled every [`ANNOUNCE_INTERVAL`] by one task of
    /// [`Relay::run`]; every tunnel's control loop watches it (no timer per tunnel).
    live: tokio::sync::watch::Sender<u32>,
    endpoint: quinn::Endpoint,
    /// The TCP tunnel listener ([`crate::tcp_tunnel`]); taken by [`Relay::run`].
    tcp: std::sync::Mutex<Option<std::net::TcpListener>>,
    tcp_addr: Option<SocketAddr>,
    /// Outer TLS and inner QUIC server configurations of TCP tunnels.
    tcp_tls: Arc<rustls::ServerConfig>,
    tcp_server: quinn::ServerConfig,
    peer_endpoint: Option<quinn::Endpoint>,
    sessions: Arc<SessionTable>,
    registry: Arc<dyn Registry>,
    cache: Arc<RouteCache>,
    changes: mpsc::UnboundedSender<Change>,
    publisher: std::sync::Mutex<Option<Publisher>>,
    in_sync: watch::Receiver<bool>,
    draining: AtomicBool,
    in_flight: Arc<AtomicUsize>,
    info: std::sync::Mutex<RelayInfo>,
    /// Agent tokens in force; replaced whole on reload (SIGHUP).
    credentials: std::sync::RwLock<Arc<Vec<AgentCredential>>>,
    /// One permit per admitted tunnel (`relay.max_tunnels`). Handshakes in progress hold none, so
    /// clients without credentials cannot fill it.
    tunnel_slots: Arc<tokio::sync::Semaphore>,
    /// When the last "tunnel limit reached" warning was logged (seconds since the Unix epoch).
    limit_warned_at: std::sync::atomic::AtomicU64,
    /// Connections in their handshake or not yet admitted (`relay.max_pending*`).
    pending: Arc<admission::Pending>,
}

impl Relay {
    /// Binds the relay's UDP endpoints. `cache` is the registry view this process keeps (shared with
    /// a co-located gateway); the relay uses it to tell agents how many relays are live. `peer`
    /// authenticates peer connections when the relay has a peer endpoint.
    pub fn bind(
        config: RelayConfig,
        peer: Option<&PeerConfig>,
        registry: Arc<dyn Registry>,
        cache: Arc<RouteCache>,
    ) -> anyhow::Result<Arc<Self>> {
        let transport = Arc::new(agent_side(config.transport.quinn(AGENT_MAX_STREAMS)));
        let client_auth = match &config.agent_ca {
            Some(roots) => crate::tls::ClientAuth::Optional(roots),
            None => crate::tls::ClientAuth::None,
        };
        let server = crate::tls::server_config_with(
            config.identity.clone(),
            &[protocol::ALPN_AGENT],
            client_auth,
            transport,
        )
        .context("relay TLS config")?;
        // The TCP listener takes the QUIC endpoint's port by default. With port 0 (any), the port
        // the UDP socket got may be taken for TCP (by an outgoing connection's ephemeral port):
        // then both are bound again, a bounded number of times.
        let mut attempts = 0;
        let (endpoint, tcp) = loop {
            attempts += 1;
            let endpoint = crate::tls::bind_endpoint(
                config.listen,
                Some(server.clone()),
                config.transport.udp_buffer,
            )
            .with_context(|| format!("binding relay endpoint on {}", config.listen))?;
            let tcp_addr = match config.tcp_listen {
                crate::config::TcpListen::Off => None,
                crate::config::TcpListen::SameAsQuic => Some(endpoint.local_addr()?),
                crate::config::TcpListen::At(addr) => Some(addr),
            };
            let Some(addr) = tcp_addr else {
                break (endpoint, None);
            };
            match tcp_listener(addr) {
                Ok(listener) => {
                    listener.set_nonblocking(true)?;
                    break (endpoint, Some(listener));
                }
                Err(err)
                    if err.kind() == std::io::ErrorKind::AddrInUse
                        && config.listen.port() == 0
                        && config.tcp_listen == crate::config::TcpListen::SameAsQuic
                        && attempts < 20 =>
                {
                    continue
                }
                Err(err) => {
                    return Err(err).with_context(|| {
                        format!("binding relay TCP tunnel listener on {addr} (relay.tcp_listen)")
                    })
                }
            }
        };
        let tcp_addr = tcp.as_ref().map(|l| l.local_addr()).transpose()?;
        let tcp_tls = Arc::new(
            crate::tls::tcp_server_config(config.identity.clone())
                .context("relay TCP tunnel TLS config")?,
        );
        let tcp_server = crate::tls::server_config_with(
            config.identity.clone(),
            &[protocol::ALPN_AGENT],
            client_auth,
            Arc::new(crate::tcp_tunnel::transport(agent_side(
                config.transport.quinn(AGENT_MAX_STREAMS),
            ))),
        )
        .context("relay TLS config")?;
        let (peer_endpoint, peer_addr) = match (&config.peer, peer) {
            (Some(listen), Some(peer)) => {
                let transport = Arc::new(peer.transport.quinn(peer.max_streams));
                let server = crate::tls::server_config(
                    config.identity.clone(),
                    &[protocol::ALPN_PEER],
                    Some(&peer.ca),
                    transport,
                )
                .context("relay peer TLS config")?;
                let ep = crate::tls::bind_endpoint(
                    listen.listen,
                    Some(server),
                    peer.transport.udp_buffer,
                )
                .with_context(|| format!("binding relay peer endpoint on {}", listen.listen))?;
                let addr = listen.advertise.unwrap_or(ep.local_addr()?);
                (Some(ep), Some(addr))
            }
            (Some(_), None) => anyhow::bail!("relay.peer_listen needs a [peer] section"),
            (None, _) => (None, None),
        };
        let sessions = Arc::new(SessionTable::default());
        let info = RelayInfo {
            id: config.id.clone(),
            peer_addr,
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: unix_now(),
            draining: false,
        };
        let (changes_tx, changes_rx) = mpsc::unbounded_channel();
        let (in_sync_tx, in_sync) = watch::channel(false);
        let publisher = Publisher {
            registry: registry.clone(),
            sessions: sessions.clone(),
            relay: info.clone(),
            changes: changes_rx,
            in_sync: in_sync_tx,
        };
        Ok(Arc::new(Relay {
            credentials: std::sync::RwLock::new(Arc::new(config.agents.clone())),
            tunnel_slots: Arc::new(tokio::sync::Semaphore::new(config.max_tunnels as usize)),
            limit_warned_at: std::sync::atomic::AtomicU64::new(0),
            pending: admission::Pending::new(config.max_pending_per_source, config.max_pending),
            live: tokio::sync::watch::channel(1).0,
            config,
            endpoint,
            tcp: std::sync::Mutex::new(tcp),
            tcp_addr,
            tcp_tls,
            tcp_server,
            peer_endpoint,
            sessions,
            registry,
            cache,
            changes: changes_tx,
            publisher: std::sync::Mutex::new(Some(publisher)),
            in_sync,
            draining: AtomicBool::new(false),
            in_flight: Arc::new(AtomicUsize::new(0)),
            info: std::sync::Mutex::new(info),
        }))
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// Counts a connection refused at `relay.max_tunnels`; warns at most every 10 s.
    fn tunnel_refused(&self, remote: SocketAddr) {
        crate::metrics::metrics().relay_tunnels_refused.inc();
        let now = unix_now();
        let last = self.limit_warned_at.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .limit_warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                %remote,
                max_tunnels = self.config.max_tunnels,
                "tunnel limit reached; refusing new tunnels (postern_relay_tunnels_refused_total counts them)"
            );
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The TCP tunnel listener's address, unless `relay.tcp_listen = "off"`.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The peer endpoint's bound address, when the relay has one.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_endpoint
            .as_ref()
            .and_then(|e| e.local_addr().ok())
    }

    pub fn sessions(&self) -> &SessionTable {
        &self.sessions
    }

    /// True once the relay is registered and its routes are in step with the registry.
    pub fn is_registered(&self) -> bool {
        *self.in_sync.borrow() && !self.registry.cut_off()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// QUIC connections on the agent endpoint, admitted or not (handshakes and hellos included).
    pub fn open_connections(&self) -> usize {
        self.endpoint.open_connections()
    }

    /// Connections in their handshake or waiting for admission.
    pub fn pending_connections(&self) -> usize {
        self.pending.len()
    }

    /// Streams currently carried.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Puts reloaded agent credentials in force: for every later tunnel, and for the tunnels up
    /// now, which are closed when their token is gone or no longer allows what they claim (a
    /// revoked token must not keep its tunnels). Tunnels admitted by certificate stay. Returns how
    /// many tunnels were closed.
    pub fn reload_credentials(&self, agents: Vec<AgentCredential>) -> usize {
        *self.credentials.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(agents);
        let mut closed = 0;
        for session in self.sessions.all() {
            if let Err(reject) = self.still_admitted(&session) {
                tracing::warn!(
                    session_id = %session.id,
                    agent_id = %session.agent_id,
                    reason = %reject.reason,
                    "closing tunnel: its credential no longer admits it"
                );
                session
                    .connection
                    .close(close::REJECTED.into(), b"agent credential revoked");
                closed += 1;
            }
        }
        closed
    }

    /// Accepts tunnels (and peer streams) until `shutdown`; then drains and deregisters.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let tasks = TaskTracker::new();
        let publisher = self
            .publisher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .context("relay is already running")?;
        let publisher_stop = CancellationToken::new();
        let publisher_task = tokio::spawn(publisher.run(publisher_stop.clone()));
        {
            let relay = self.clone();
            let stop = publisher_stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(ANNOUNCE_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    let live = relay.live_relays();
                    relay
                        .live
                        .send_if_modified(|n| std::mem::replace(n, live) != live);
                }
            });
        }
        // Connections stay open through the drain; `closed` ends them afterwards.
        let closed = CancellationToken::new();
        tracing::info!(relay_id = %self.config.id, addr = %self.endpoint.local_addr()?,
            tcp_addr = ?self.tcp_addr, peer_addr = ?self.peer_addr(), "relay listening");
        let tcp = self.tcp.lock().unwrap_or_else(|e| e.into_inner()).take();
        let tcp_task = match tcp {
            Some(listener) => {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                Some(tokio::spawn(self.clone().accept_tcp(
                    listener,
                    closed.clone(),
                    tasks.clone(),
                )))
            }
            None => None,
        };
        if let Some(peer_endpoint) = self.peer_endpoint.clone() {
            tasks.spawn(peer::accept_loop(
                self.clone(),
                peer_endpoint,
                closed.clone(),
                tasks.clone(),
            ));
        }
        let accept = {
            let relay = self.clone();
            let closed = closed.clone();
            let tasks = tasks.clone();
            async move {
                loop {
                    let incoming = tokio::select! {
                        _ = closed.cancelled() => break,
                        i = relay.endpoint.accept() => match i { Some(i) => i, None => break },
                    };
                    // Full: refused before the TLS handshake, which is what costs the relay CPU.
                    if relay.tunnel_slots.available_permits() == 0 {
                        relay.tunnel_refused(incoming.remote_address());
                        incoming.refuse();
                        continue;
                    }
                    // Unadmitted connections per source and in total, also before the handshake.
                    let Some((incoming, pending)) = relay.pending.screen(incoming) else {
                        continue;
                    };
                    // Boxed: the task keeps its arguments for life, and an `Incoming` is 384
                    // bytes that are dead once the handshake starts.
                    tasks.spawn(relay.clone().serve_incoming(
                        Box::new(incoming),
                        pending,
                        closed.clone(),
                    ));
                }
            }
        };
        let accept_task = tokio::spawn(accept);
        let mut publisher_task = publisher_task;
        // The publisher ends on its own only when the relay may not run: its id belongs to
        // another live relay.
        let refused = tokio::select! {
            _ = shutdown.cancelled() => None,
            result = &mut publisher_task => Some(result),
        };
        if let Some(result) = refused {
            closed.cancel();
            let _ = accept_task.await;
            if let Some(t) = tcp_task {
                let _ = t.await;
            }
            self.endpoint
                .close(close::REJECTED.into(), b"relay refused to start");
            if let Some(ep) = &self.peer_endpoint {
                ep.close(close::REJECTED.into(), b"relay refused to start");
            }
            // Revokes the lease this relay was granted, which holds none of the other's keys.
            let _ = self.registry.deregister_relay(&self.config.id).await;
            return match result {
                Ok(Err(err)) => Err(anyhow::Error::new(err)),
                Ok(Ok(())) => Err(anyhow::anyhow!("the relay's registry publisher stopped")),
                Err(err) => Err(anyhow::anyhow!(
                    "the relay's registry publisher failed: {err}"
                )),
            };
        }
        self.drain().await;
        closed.cancel();
        let _ = accept_task.await;
        if let Some(t) = tcp_task {
            let _ = t.await;
        }
        self.endpoint
            .close(close::DRAINED.into(), b"relay shut down");
        if let Some(ep) = &self.peer_endpoint {
            ep.close(close::DRAINED.into(), b"relay shut down");
        }
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
        publisher_stop.cancel();
        let _ = publisher_task.await;
        if let Err(err) = self.registry.deregister_relay(&self.config.id).await {
            tracing::warn!(%err, "could not deregister relay; its lease will expire");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
        tracing::info!(relay_id = %self.config.id, "relay stopped");
        Ok(())
    }

    /// Marks the relay and its routes draining, tells the agents, and waits for in-flight streams
    /// (bounded by the grace period).
    async fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        let info = {
            let mut info = self.info.lock().unwrap_or_else(|e| e.into_inner());
            info.draining = true;
            info.clone()
        };
        let _ = self.changes.send(Change::Relay(info));
        let sessions = self.sessions.all();
        for s in &sessions {
            s.draining.store(true, Ordering::Relaxed);
        }
        let routes = sessions
            .iter()
            .flat_map(|s| s.routes(&self.config.id))
            .collect::<Vec<_>>();
        if !routes.is_empty() {
            let _ = self.changes.send(Change::Put(routes));
        }
        for s in &sessions {
            s.drain.cancel();
        }
        let grace = self.config.drain_grace;
        tracing::info!(relay_id = %self.config.id, tunnels = sessions.len(), in_flight = self.in_flight(),
            grace_ms = grace.as_millis() as u64, "draining");
        // Agents end their tunnel here once a replacement elsewhere is up and their in-flight
        // streams are done (until then this relay keeps serving them); wait for that, or for the
        // grace period. With no other live relay there is nowhere to move: only the streams in
        // flight are waited for.
        let deadline = tokio::time::Instant::now() + grace;
        let busy = || self.in_flight() > 0 || (!self.sessions.is_empty() && self.live_elsewhere());
        while busy() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if busy() {
            tracing::warn!(
                in_flight = self.in_flight(),
                tunnels = self.sessions.len(),
                "drain grace period over; closing remaining tunnels and streams"
            );
        }
    }

    /// Accepts TCP tunnels: TCP, the outer TLS handshake, then the QUIC connection it carries,
    /// served exactly as one over UDP ([`Relay::serve_connection`]).
    async fn accept_tcp(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        closed: CancellationToken,
        tasks: TaskTracker,
    ) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tcp_tls.clone());
        loop {
            let (tcp, remote) = tokio::select! {
                _ = closed.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of descriptors and the like: pause rather than spin.
                        tracing::warn!(%err, "accepting a TCP tunnel failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            if self.is_draining() || self.tunnel_slots.available_permits() == 0 {
                if !self.is_draining() {
                    self.tunnel_refused(remote);
                }
                continue;
            }
            // The same bound on connections not yet admitted as over QUIC (a TCP peer's address
            // is proven by its handshake, so no Retry is needed).
            let pending = match self.pending.enter(remote.ip()) {
                Ok(slot) => slot,
                Err(limit) => {
                    self.pending.refused(remote, limit);
                    continue;
                }
            };
            let relay = self.clone();
            let acceptor = acceptor.clone();
            let closed = closed.clone();
            tasks.spawn(async move {
                if let Err(err) = relay.serve_tcp(tcp, remote, acceptor, pending, closed).await {
                    tracing::debug!(%remote, transport = "tcp", err = format!("{err:#}"), "tunnel ended");
                }
            });
        }
    }

    async fn serve_tcp(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        remote: SocketAddr,
        acceptor: tokio_rustls::TlsAcceptor,
        pending: admission::Slot,
        closed: CancellationToken,
    ) -> anyhow::Result<()> {
        crate::tcp_tunnel::tune(&tcp, self.config.transport.idle_timeout);
        let local = tcp.local_addr()?;
        let handshake = async {
            let tls = acceptor.accept(tcp).await.context("TLS handshake failed")?;
            let (socket, gone) = crate::tcp_tunnel::socket(tls, local, remote);
            let endpoint = crate::tcp_tunnel::endpoint(socket, Some(self.tcp_server.clone()))?;
            let incoming = endpoint
                .accept()
                .await
                .context("the TCP connection closed before QUIC")?;
            let conn = incoming.await.context("QUIC handshake failed")?;
            anyhow::Ok((conn, gone))
        };
        let (conn, gone) = Box::pin(tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake))
            .await
            .context("TCP tunnel handshake timed out")??;
        // The TCP connection's end is the tunnel's end: no need to wait for the idle timeout.
        {
            let conn = conn.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = gone.cancelled() => conn.close(close::SHUTDOWN.into(), b"TCP connection closed"),
                    _ = conn.closed() => {}
                }
            });
        }
        self.serve_connection(conn, crate::tcp_tunnel::Kind::Tcp, pending, closed)
            .await
    }

    /// One agent connection over QUIC, from its first packet to its end (a task of its own).
    async fn serve_incoming(
        self: Arc<Self>,
        incoming: Box<quinn::Incoming>,
        pending: admission::Slot,
        closed: CancellationToken,
    ) {
        let remote = incoming.remote_address();
        let served = async {
            let conn = Box::pin(tokio::time::timeout(HANDSHAKE_TIMEOUT, *incoming))
                .await
                .context("QUIC handshake timed out")?
                .context("QUIC handshake failed")?;
            self.serve_connection(conn, crate::tcp_tunnel::Kind::Quic, pending, closed)
                .await
        };
        if let Err(err) = served.await {
            tracing::debug!(%remote, err = format!("{err:#}"), "tunnel ended");
        }
    }

    /// Serves one agent connection (over UDP or TCP): hello, admission, session, control loop.
    /// `pending` holds its place among the connections not yet admitted until the hello is.
    ///
    /// The hello and the admission run boxed, so their state (the hello, the registry check,
    /// deadlines) is freed once the session is up: an idle tunnel's task then holds only what
    /// [`Relay::run_session`] needs, which is most of the relay's memory per tunnel that is
    /// postern's own (the rest is quinn's and rustls's).
    async fn serve_connection(
        self: Arc<Self>,
        conn: Connection,
        transport: crate::tcp_tunnel::Kind,
        pending: admission::Slot,
        closed: CancellationToken,
    ) -> anyhow::Result<()> {
        let Some(admitted) = Box::pin(self.admit_connection(conn, transport, pending)).await?
        else {
            return Ok(());
        };
        self.run_session(admitted, &closed).await
    }

    /// Reads the hello and admits the agent, or refuses it (then `None`); an admitted session is
    /// in the session table. Runs under a `session` span (agent id, remote address, transport)
    /// that ends with the admission: held for a tunnel's life, a span costs every idle tunnel
    /// ~0.5 KiB in the log registry, so the session's own lines name those fields themselves.
    async fn admit_connection(
        self: &Arc<Self>,
        conn: Connection,
        transport: crate::tcp_tunnel::Kind,
        pending: admission::Slot,
    ) -> anyhow::Result<Option<Admitted>> {
        // One deadline from the handshake to the hello, however the peer splits its silence
        // between opening the control stream and writing on it.
        let hello_deadline = tokio::time::Instant::now() + protocol::HELLO_TIMEOUT;
        let (mut send, mut recv) =
            match tokio::time::timeout_at(hello_deadline, conn.accept_bi()).await {
                Ok(Ok(streams)) => streams,
                Ok(Err(err)) => return Err(err).context("control stream"),
                Err(_) => {
                    conn.close(close::PROTOCOL.into(), b"no hello within the deadline");
                    anyhow::bail!("no control stream within the hello timeout");
                }
            };
        let left = hello_deadline.saturating_duration_since(tokio::time::Instant::now());
        let hello = match protocol::read_message_timeout(&mut recv, left).await {
            Ok(Message::Hello(hello)) => hello,
            Ok(other) => {
                conn.close(close::PROTOCOL.into(), b"expected hello");
                anyhow::bail!(protocol::Error::unexpected(&other));
            }
            Err(protocol::Error::Timeout(_)) => {
                conn.close(close::PROTOCOL.into(), b"no hello within the deadline");
                anyhow::bail!("no hello within the hello timeout");
            }
            Err(err) => {
                conn.close(close::PROTOCOL.into(), b"bad hello");
                return Err(err).context("reading hello");
            }
        };
        let span = tracing::info_span!("session", agent_id = %hello.agent_id, remote = %conn.remote_address(), %transport);
        async move {
            let admitted = if self.is_draining() {
                Err(Reject {
                    code: Code::Draining,
                    reason: "relay is draining".into(),
                })
            } else if self.registry.cut_off() {
                // Its routes could not be published (and its lease may be gone): the agent is
                // better served by a relay that can.
                Err(Reject {
                    code: Code::Draining,
                    reason: "relay cut off from the registry for longer than its lease TTL".into(),
                })
            } else {
                let cert =
                    crate::tls::peer_certificates(&conn).and_then(|chain| chain.into_iter().next());
                let cert = cert.map(|c| {
                    // Only an agent certificate admits an agent (never one also marked as a
                    // peer); its IPs are all it may claim.
                    let is_agent = crate::cert::role(c.as_ref()) == Some(crate::cert::Role::Agent);
                    if is_agent {
                        AgentCertificate {
                            ips: crate::cert::ip_sans(c.as_ref()).unwrap_or_default(),
                            name: certificate_name(c.as_ref()),
                        }
                    } else {
                        AgentCertificate {
                            ips: Vec::new(),
                            name: None,
                        }
                    }
                });
                self.admit(&hello, cert)
            };
            let admission = match admitted {
                Ok(admission) => admission,
                Err(reject) => {
                    refuse(&conn, &mut send, reject).await;
                    return Ok(None);
                }
            };
            // Claims held at other relays, as this process's registry view shows them.
            if let Err(reject) = self
                .check_registry_claims(&hello, &admission.credential)
                .await
            {
                refuse(&conn, &mut send, reject).await;
                return Ok(None);
            }
            // Held by the session until it ends (see `Admitted`).
            let Ok(_slot) = self.tunnel_slots.clone().try_acquire_owned() else {
                self.tunnel_refused(conn.remote_address());
                let reject = Reject {
                    code: Code::Draining,
                    reason: format!(
                        "the relay holds its maximum of {} tunnels",
                        self.config.max_tunnels
                    ),
                };
                refuse(&conn, &mut send, reject).await;
                return Ok(None);
            };
            let session = Arc::new(Session {
                id: rand::random(),
                agent_id: hello.agent_id.clone(),
                namespace: hello.namespace.clone(),
                ips: hello.ips.clone(),
                ports: hello.ports.clone(),
                connection: conn.clone(),
                transport,
                connected_at: unix_now(),
                token_sha256: admission.token_sha256,
                credential: admission.credential,
                draining: AtomicBool::new(false),
                drain: CancellationToken::new(),
            });
            let welcome = Welcome {
                relay_id: self.config.id.clone(),
                session_id: session.id,
                live_relays: self.live_relays(),
            };
            // Claims held by this relay's own tunnels, checked and taken under one lock.
            if let Err(conflict) = self.sessions.insert_exclusive(session.clone()) {
                let reject = Reject {
                    code: Code::NotAllowed,
                    reason: match conflict {
                        sessions::Conflict::Address { ip, holder } => format!(
                            "address {ip} in namespace {} is held by agent {holder}",
                            session.namespace
                        ),
                        sessions::Conflict::AgentId => format!(
                            "agent id {} in namespace {} is held by another credential",
                            session.agent_id, session.namespace
                        ),
                    },
                };
                refuse(&conn, &mut send, reject).await;
                return Ok(None);
            }
            // A reload between the admission above and this insert did not see this session.
            if let Err(reject) = self.still_admitted(&session) {
                self.sessions.remove(session.id);
                // A drain in that instant may have published its routes (as draining).
                let keys = session
                    .routes(&self.config.id)
                    .into_iter()
                    .map(|r| r.key)
                    .collect();
                let _ = self.changes.send(Change::Delete(keys));
                refuse(&conn, &mut send, reject).await;
                return Ok(None);
            }
            // Admitted: no longer counts as pending.
            drop(pending);
            let admitted = Admitted {
                session,
                send,
                recv,
                welcome,
                _slot,
            };
            Ok(Some(admitted))
        }
        .instrument(span)
        .await
    }

    /// An admitted session, from its `Welcome` to its end: routes up, the control loop, routes
    /// down.
    async fn run_session(
        &self,
        admitted: Admitted,
        closed: &CancellationToken,
    ) -> anyhow::Result<()> {
        let Admitted {
            session,
            mut send,
            mut recv,
            welcome,
            _slot,
        } = admitted;
        let transport = session.transport;
        crate::metrics::metrics().relay_tunnels.inc();
        crate::metrics::metrics()
            .tunnels_by_transport(transport.as_str())
            .inc();
        let _ = self
            .changes
            .send(Change::Put(session.routes(&self.config.id)));
        let remote = session.connection.remote_address();
        tracing::info!(agent_id = %session.agent_id, %remote, %transport, session_id = %session.id, ips = ?session.ips, "tunnel up");
        let result = async {
            let _ = send.set_priority(protocol::priority::CONTROL);
            protocol::write_message(&mut send, &Message::Welcome(welcome)).await?;
            self.control_loop(&session, &mut send, &mut recv, closed)
                .await
        }
        .await;
        self.sessions.remove(session.id);
        crate::metrics::metrics().relay_tunnels.dec();
        crate::metrics::metrics()
            .tunnels_by_transport(transport.as_str())
            .dec();
        let keys = session
            .routes(&self.config.id)
            .into_iter()
            .map(|r| r.key)
            .collect();
        let _ = self.changes.send(Change::Delete(keys));
        tracing::info!(agent_id = %session.agent_id, %remote, %transport, session_id = %session.id, "tunnel down");
        result
    }

    /// Answers pings, and announces a drain, until the tunnel closes or the relay closes.
    async fn control_loop(
        &self,
        session: &Session,
        send: &mut SendStream,
        recv: &mut RecvStream,
        closed: &CancellationToken,
    ) -> anyhow::Result<()> {
        let conn: &Connection = &session.connection;
        let mut drain_sent = false;
        // Raced against drain and close below: the reader must not lose a half-read frame.
        let mut frames = protocol::FrameReader::default();
        // The live-relay count the agent last heard (in its welcome or a pong). When another relay
        // comes up, an unasked pong tells the agent at once, so a slot idling for want of a second
        // relay dials within a tick instead of waiting for its next ping.
        let mut announced = self.live_relays();
        let mut live = self.live.subscribe();
        loop {
            let msg = tokio::select! {
                _ = closed.cancelled() => {
                    conn.close(close::DRAINED.into(), b"relay shut down");
                    return Ok(());
                }
                Ok(()) = live.changed() => {
                    let now = *live.borrow_and_update();
                    if now > announced {
                        let pong = Message::Pong { nonce: 0, live_relays: now };
                        protocol::write_message(send, &pong).await?;
                    }
                    announced = now;
                    continue;
                }
                _ = session.drain.cancelled(), if !drain_sent => {
                    drain_sent = true;
                    let grace_ms = self.config.drain_grace.as_millis() as u64;
                    protocol::write_message(send, &Message::Drain { grace_ms }).await?;
                    continue;
                }
                m = frames.next(recv) => m,
                // The control stream is the only one an agent opens; the relay opens the rest.
                opened = conn.accept_bi() => {
                    if opened.is_ok() {
                        conn.close(close::PROTOCOL.into(), b"agents open only the control stream");
                        anyhow::bail!("the agent opened a second stream");
                    }
                    return Ok(());
                }
            };
            match msg {
                Ok(Message::Ping { nonce }) => {
                    announced = self.live_relays();
                    protocol::write_message(
                        send,
                        &Message::Pong {
                            nonce,
                            live_relays: announced,
                        },
                    )
                    .await?
                }
                Ok(other) => {
                    conn.close(close::PROTOCOL.into(), b"unexpected control message");
                    anyhow::bail!(protocol::Error::unexpected(&other));
                }
                Err(protocol::Error::Truncated) => {
                    // The agent ended its control stream: it is winding this tunnel down (after a
                    // drain notice, or its own shutdown) and closes the connection itself once its
                    // in-flight streams are done. Deliver what was written; the session ends now
                    // (no new streams), and an agent that never closes is closed after the
                    // relay's drain grace.
                    let _ = send.finish();
                    let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
                    let (conn, grace) = (conn.clone(), self.config.drain_grace);
                    tokio::spawn(async move {
                        if tokio::time::timeout(grace, conn.closed()).await.is_err() {
                            conn.close(close::SHUTDOWN.into(), b"control stream ended");
                        }
                    });
                    return Ok(());
                }
                Err(err) => {
                    // A closed connection surfaces here as an i/o error: that is the normal end.
                    if conn.close_reason().is_some() {
                        return Ok(());
                    }
                    conn.close(close::PROTOCOL.into(), b"bad control frame");
                    return Err(err.into());
                }
            }
        }
    }

    /// Checks a `Hello` against the agent's credential: a client certificate (verified against
    /// `relay.agent_ca` during the handshake; it may claim the IPs in its SANs) or a token (it may
    /// claim the CIDRs configured for it). Any claim outside what the credential allows rejects the
    /// whole tunnel and touches no route.
    fn admit(&self, hello: &Hello, cert: Option<AgentCertificate>) -> Result<Admission, Reject> {
        let reject = |code, reason: String| Reject { code, reason };
        if hello.ips.is_empty() {
            return Err(reject(Code::BadRequest, "hello claims no IP".into()));
        }
        if hello.ports.is_empty() {
            return Err(reject(Code::BadRequest, "hello exposes no port".into()));
        }
        if crate::config::check_agent_id(&hello.agent_id, "agent_id").is_err()
            || crate::config::check_namespace(&hello.namespace, "namespace").is_err()
        {
            return Err(reject(
                Code::BadRequest,
                "agent id must be a lower-case DNS label and namespace 1-63 of [A-Za-z0-9_-]"
                    .into(),
            ));
        }
        if let Some(cert) = cert {
            let allowed = cert.ips;
            if !self.config.agent_cert_namespaces.contains(&hello.namespace) {
                return Err(reject(
                    Code::NotAllowed,
                    format!(
                        "agent certificates may not join namespace {}",
                        hello.namespace
                    ),
                ));
            }
            if let Some(ip) = hello.ips.iter().find(|ip| !allowed.contains(ip)) {
                return Err(reject(
                    Code::NotAllowed,
                    format!("the agent certificate does not name {ip}"),
                ));
            }
            // A certificate's name is the one agent id it may use.
            let name = cert.name.unwrap_or_default();
            if name != hello.agent_id {
                return Err(reject(
                    Code::NotAllowed,
                    format!(
                        "the agent certificate is issued to {name:?}, not to agent id {}",
                        hello.agent_id
                    ),
                ));
            }
            return Ok(Admission {
                token_sha256: None,
                credential: format!("cert:{name}"),
            });
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, hello.token.expose().as_bytes());
        // Compare against every credential so timing does not reveal which one nearly matched.
        let mut found = None;
        let credentials = self
            .credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for cred in credentials.iter() {
            let equal = digest
                .as_ref()
                .iter()
                .zip(cred.token_sha256.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
            if equal && found.is_none() {
                found = Some(cred);
            }
        }
        let cred = found.ok_or_else(|| reject(Code::Unauthorized, "unknown agent token".into()))?;
        allows(cred, &hello.agent_id, &hello.ips, &hello.namespace)?;
        Ok(Admission {
            token_sha256: Some(cred.token_sha256),
            credential: cred.fingerprint(),
        })
    }

    /// Refuses a hello whose claims collide with tunnels at other relays, as this process's
    /// registry view shows them: an address served by another agent id, or this agent id held by
    /// another credential. Routes of this relay are skipped: its session table is the fresher
    /// truth for them and is checked when the session is inserted. Tunnels of the same agent id
    /// and credential (its second tunnel, a restart) pass.
    async fn check_registry_claims(&self, hello: &Hello, credential: &str) -> Result<(), Reject> {
        if tokio::time::timeout(ROUTES_WAIT, self.cache.wait_ready())
            .await
            .is_err()
        {
            // The registry is unreachable (an outage, or this relay started during one). Tunnels
            // must keep working through a registry outage, so the claim is checked against this
            // relay's own tunnels only (done by the caller); the registry's view is checked by
            // every relay that can read it, and routes are reconciled when it returns.
            tracing::warn!(agent_id = %hello.agent_id, namespace = %hello.namespace,
                "registry routes not loaded: claims checked against this relay's tunnels only");
            return Ok(());
        }
        let elsewhere = |o: &crate::registry::cache::Owner| *o.relay_id != *self.config.id;
        for ip in &hello.ips {
            if let Some(holder) = self
                .cache
                .owners(&hello.namespace, *ip)
                .into_iter()
                .filter(elsewhere)
                .find(|o| *o.agent_id != *hello.agent_id)
            {
                return Err(Reject {
                    code: Code::NotAllowed,
                    reason: format!(
                        "address {ip} in namespace {} is held by agent {} (relay {})",
                        hello.namespace, holder.agent_id, holder.relay_id
                    ),
                });
            }
        }
        if let Some(holder) = self
            .cache
            .agent_owners(&hello.namespace, &hello.agent_id)
            .into_iter()
            .filter(elsewhere)
            .find(|o| !o.same_credential(Some(credential)))
        {
            return Err(Reject {
                code: Code::NotAllowed,
                reason: format!(
                    "agent id {} in namespace {} is held by another credential (relay {})",
                    hello.agent_id, hello.namespace, holder.relay_id
                ),
            });
        }
        Ok(())
    }

    /// Whether the token credentials in force still admit a token session.
    fn still_admitted(&self, session: &Session) -> Result<(), Reject> {
        let Some(token) = session.token_sha256 else {
            return Ok(());
        };
        let credentials = self
            .credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match credentials.iter().find(|c| c.token_sha256 == token) {
            None => Err(Reject {
                code: Code::Unauthorized,
                reason: "unknown agent token".into(),
            }),
            Some(cred) => allows(cred, &session.agent_id, &session.ips, &session.namespace),
        }
    }

    fn live_relays(&self) -> u32 {
        let n = self.cache.relays().iter().filter(|r| !r.draining).count();
        n.max(1) as u32
    }

    /// Opens a stream to `target` through one of this relay's tunnels: the named session, or any
    /// session serving the IP (round-robin) when `session_id` is `None`. Tries the next session of the
    /// same IP when one answers with a stale-route code.
    pub async fn open(
        &self,
        namespace: &str,
        target: SocketAddr,
        session_id: Option<u64>,
    ) -> Result<Tunnelled, Code> {
        // A draining relay keeps serving the tunnels agents still hold on it: an agent ends its
        // tunnel once its replacement elsewhere is up and known (see `agent::DRAIN_LINGER`), and
        // gateways try a draining owner only when they know no other. Refusing earlier failed
        // the connections of an agent whose only owner this relay was.
        let guard = InFlight::new(&self.in_flight);
        let candidates = match session_id {
            Some(id) => match self.sessions.get(id) {
                Some(s) if s.serves(namespace, target.ip()) => vec![s],
                _ => return Err(Code::NoSuchSession),
            },
            None => self.sessions.candidates(namespace, target.ip()),
        };
        let mut last = Code::NoRoute;
        for session in candidates {
            match open_on(&session, target).await {
                Ok((send, recv)) => return Ok(Tunnelled { send, recv, guard }),
                Err(code) if code.try_next_owner() => last = code,
                Err(code) => return Err(code),
            }
        }
        Err(last)
    }

    /// Whether a relay other than this one is registered and not draining: somewhere agents
    /// can move their tunnels to.
    fn live_elsewhere(&self) -> bool {
        self.cache
            .relays()
            .iter()
            .any(|r| !r.draining && r.id != self.config.id)
    }

    /// Whether this relay has a session for `(namespace, ip)`.
    pub fn serves(&self, namespace: &str, ip: IpAddr) -> bool {
        !self.sessions.candidates(namespace, ip).is_empty()
    }
}

/// A TCP listener for agents' TCP tunnels. SO_REUSEADDR, as servers have it: a relay restarted on
/// its port must not wait for the TIME_WAIT connections its predecessor left.
fn tcp_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Opens one stream on `session`'s tunnel and waits for the agent's verdict.
async fn open_on(session: &Session, target: SocketAddr) -> Result<(SendStream, RecvStream), Code> {
    let attempt = async {
        let (mut send, mut recv) = session
            .connection
            .open_bi()
            .await
            .map_err(|_| Code::Internal)?;
        let _ = send.set_priority(protocol::priority::OPENING);
        protocol::write_message(
            &mut send,
            &Message::Open(Open {
                target,
                session_id: session.id,
            }),
        )
        .await
        .map_err(|_| Code::Internal)?;
        match protocol::read_message(&mut recv).await {
            Ok(Message::OpenResult(OpenResult { code: Code::Ok })) => {
                let _ = send.set_priority(protocol::priority::DATA);
                Ok((send, recv))
            }
            Ok(Message::OpenResult(OpenResult { code })) => Err(code),
            Ok(_) => Err(Code::BadRequest),
            Err(_) => Err(Code::Internal),
        }
    };
    match tokio::time::timeout(protocol::ATTEMPT_TIMEOUT, attempt).await {
        Ok(result) => result,
        Err(_) => Err(Code::Timeout),
    }
}

/// Answers a hello with `Reject` and closes the connection.
async fn refuse(conn: &Connection, send: &mut SendStream, reject: Reject) {
    if reject.code == Code::Draining {
        tracing::debug!("tunnel refused while draining");
    } else {
        tracing::warn!(code = ?reject.code, reason = %reject.reason, "agent rejected");
    }
    let _ = protocol::write_message(send, &Message::Reject(reject.clone())).await;
    let _ = send.finish();
    // Give the reject a moment to reach the agent before the close overtakes it.
    let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    conn.close(close::REJECTED.into(), reject.reason.as_bytes());
}

/// The subject common name of a DER certificate, if it has a textual one.
fn certificate_name(der: &[u8]) -> Option<String> {
    let der = rustls_pki_types::CertificateDer::from(der);
    let params = rcgen::CertificateParams::from_ca_cert_der(&der).ok()?;
    match params.distinguished_name.get(&rcgen::DnType::CommonName)? {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_string()),
        rcgen::DnValue::Ia5String(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Whether token credential `cred` lets agent `agent_id` claim `ips` in `namespace`.
fn allows(
    cred: &AgentCredential,
    agent_id: &str,
    ips: &[IpAddr],
    namespace: &str,
) -> Result<(), Reject> {
    if !cred.allows_id(agent_id) {
        return Err(Reject {
            code: Code::NotAllowed,
            reason: format!("credential {} may not use agent id {agent_id}", cred.name),
        });
    }
    if let Some(ip) = ips
        .iter()
        .find(|ip| !cred.allow.iter().any(|net| net.contains(*ip)))
    {
        return Err(Reject {
            code: Code::NotAllowed,
            reason: format!("credential {} may not claim {ip}", cred.name),
        });
    }
    if !cred.namespaces.is_empty() && !cred.namespaces.iter().any(|n| n == namespace) {
        return Err(Reject {
            code: Code::NotAllowed,
            reason: format!(
                "credential {} may not join namespace {namespace}",
                cred.name
            ),
        });
    }
    Ok(())
}

/// The relay's end of an agent tunnel sends no keep-alives of its own: the agent's (every
/// `keep_alive` of silence) keep both ends' idle timers fresh — the relay's ACK of each ping is
/// what the agent hears — so either end still closes the tunnel after `idle_timeout` of silence,
/// at half the packets an idle tunnel costs.
fn agent_side(mut transport: quinn::TransportConfig) -> quinn::TransportConfig {
    transport.keep_alive_interval(None);
    transport
}
