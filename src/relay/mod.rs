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
mod tunnel;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use quinn::{RecvStream, SendStream};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AgentCredential, PeerConfig, RelayConfig};
use crate::protocol::{self, close, Code, Message, Open, OpenResult};
use crate::registry::cache::RouteCache;
use crate::registry::{unix_now, Registry, RelayInfo};
use publisher::{Change, Publisher};
use sessions::{Session, SessionTable};

use admission::AGENT_MAX_STREAMS;

/// Deadline for a QUIC handshake to complete.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the relay samples the live-relay count; when it grew past what a tunnel's agent last
/// heard, the tunnel's control loop tells it with an unasked pong (agents take a pong at any time;
/// `nonce` 0).
const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(500);

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
    /// The same bounds for the peer endpoint: connections in their handshake or not yet shown to
    /// carry a peer certificate.
    peer_pending: Arc<admission::Pending>,
}

/// One token credential's tunnels and claimed addresses on this relay, beside its quota
/// (`/api/status`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CredentialUse {
    pub name: String,
    pub tunnels: u32,
    pub addresses: u64,
    /// `max_tunnels` of its `[[relay.agents]]` entry; `null`: no bound.
    pub max_tunnels: Option<u32>,
    /// `max_addresses`; `null`: no bound.
    pub max_addresses: Option<u32>,
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
        let tcp_server = crate::tcp_tunnel::server(
            crate::tls::server_config_with(
                config.identity.clone(),
                &[protocol::ALPN_AGENT],
                client_auth,
                Arc::new(crate::tcp_tunnel::transport(agent_side(
                    config.transport.quinn(AGENT_MAX_STREAMS),
                ))),
            )
            .context("relay TLS config")?,
        );
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
            pending: admission::Pending::new(
                "agent",
                config.max_pending_per_source,
                config.max_pending,
            ),
            peer_pending: admission::Pending::new(
                "peer",
                config.max_pending_per_source,
                config.max_pending,
            ),
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

    /// Connections to the peer endpoint in their handshake or not yet checked for a peer
    /// certificate.
    pub fn pending_peer_connections(&self) -> usize {
        self.peer_pending.len()
    }

    /// What each token credential's tunnels hold on this relay, beside its quota.
    pub fn credential_use(&self) -> Vec<CredentialUse> {
        let credentials = self
            .credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        credentials
            .iter()
            .map(|c| {
                let (tunnels, addresses) = self.sessions.held_by(&c.fingerprint());
                CredentialUse {
                    name: c.name.clone(),
                    tunnels,
                    addresses,
                    max_tunnels: c.quota.tunnels,
                    max_addresses: c.quota.addresses,
                }
            })
            .collect()
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
        let (send, recv) = session
            .connection
            .open_bi()
            .await
            .map_err(|_| Code::Internal)?;
        let mut pending = protocol::HalfOpen::new(send, recv);
        let (send, recv) = pending.streams();
        let _ = send.set_priority(protocol::priority::OPENING);
        protocol::write_message(
            send,
            &Message::Open(Open {
                target,
                session_id: session.id,
            }),
        )
        .await
        .map_err(|_| Code::Internal)?;
        match protocol::read_message(recv).await {
            Ok(Message::OpenResult(OpenResult { code: Code::Ok })) => {
                let _ = send.set_priority(protocol::priority::DATA);
                Ok(pending.opened())
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

/// The relay's end of an agent tunnel sends no keep-alives of its own: the agent's (every
/// `keep_alive` of silence) keep both ends' idle timers fresh — the relay's ACK of each ping is
/// what the agent hears — so either end still closes the tunnel after `idle_timeout` of silence,
/// at half the packets an idle tunnel costs.
fn agent_side(mut transport: quinn::TransportConfig) -> quinn::TransportConfig {
    transport.keep_alive_interval(None);
    transport
}
