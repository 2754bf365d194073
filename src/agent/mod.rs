//! The agent: on every isolated host, dials OUT to the relays and keeps `redundancy` tunnels to
//! distinct relays; serves the streams relays open, but only to its own IPs and exposed ports.

pub mod stream;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::backoff::Backoff;
use crate::config::{AgentConfig, TunnelMode};
use crate::protocol::{self, close, Hello, Message, Welcome};
use crate::tcp_tunnel::Kind;

/// Deadline for dialling one relay address (QUIC handshake + hello/welcome). Short, because the next
/// address may be alive: a restarting relay's port just stays silent.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// Pongs a tunnel may miss before the agent gives up on it and redials.
const MAX_MISSED_PONGS: u32 = 3;
/// With `tunnel = "auto"`, a QUIC tunnel whose relay showed no sign of hearing the agent (no pong
/// to the pings sent every keep-alive interval, no flow-control credit) for this many intervals
/// gets a TCP tunnel brought up beside it, and is left when that one is up: UDP that stopped
/// passing costs seconds, not the idle timeout plus a dial.
const SILENT_KEEP_ALIVES: u32 = 2;
/// How long a draining relay's tunnel keeps taking new streams once a replacement tunnel is up:
/// the replacement's routes reach the draining relay and the gateways through the registry in
/// about this time, and until they do, the draining relay is the only owner they know of.
const DRAIN_LINGER: Duration = Duration::from_secs(1);

/// What the agent shares between its tunnel slots.
struct Shared {
    config: AgentConfig,
    ips: Vec<IpAddr>,
    /// slot → (relay id, relay address) it currently holds.
    held: Mutex<HashMap<usize, (String, SocketAddr)>>,
    /// slot → transport of the tunnel it holds (shared with [`AgentHandle`]).
    transports: Arc<Mutex<HashMap<usize, Kind>>>,
    /// Live relays as last reported by a relay (Welcome, then every Pong); slots beyond it idle.
    /// A watch, so that an idle slot wakes as soon as a relay joins.
    live_relays: watch::Sender<u32>,
    tunnels_up: watch::Sender<usize>,
    /// Tunnels of draining relays winding down (their in-flight streams finishing); the agent waits
    /// for them before it exits.
    winding_down: TaskTracker,
}

/// A running agent's observable state.
#[derive(Clone)]
pub struct AgentHandle {
    tunnels: watch::Receiver<usize>,
    transports: Arc<Mutex<HashMap<usize, Kind>>>,
    ips: Vec<IpAddr>,
}

impl AgentHandle {
    /// Number of tunnels currently up.
    pub fn tunnels(&self) -> usize {
        *self.tunnels.borrow()
    }

    /// Tunnels up by transport (`quic`, `tcp`).
    pub fn transports(&self) -> std::collections::BTreeMap<String, usize> {
        let mut by = std::collections::BTreeMap::new();
        // Plain values; a poisoned lock still holds a coherent map.
        for kind in self
            .transports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            *by.entry(kind.as_str().to_string()).or_insert(0) += 1;
        }
        by
    }

    /// Waits until at least `n` tunnels are up.
    pub async fn wait_tunnels(&mut self, n: usize) {
        let _ = self.tunnels.wait_for(|up| *up >= n).await;
    }

    /// The IPs the agent claims.
    pub fn ips(&self) -> &[IpAddr] {
        &self.ips
    }
}

/// A configured agent, ready to [`Agent::run`].
pub struct Agent {
    shared: Arc<Shared>,
}

impl Agent {
    pub fn new(config: AgentConfig) -> anyhow::Result<Self> {
        let ips = if config.ips.is_empty() {
            host_addresses()?
        } else {
            if !config.claim_foreign_ips {
                let interfaces =
                    if_addrs::get_if_addrs().context("listing the host's addresses")?;
                if let Some(ip) = config.ips.iter().find(|ip| !host_has(&interfaces, **ip)) {
                    let mut own: Vec<String> =
                        interfaces.iter().map(|i| i.ip().to_string()).collect();
                    own.sort();
                    own.dedup();
                    bail!(
                        "ips: {ip} is not an address of this host (it has {}); an agent claims only \
                         its own addresses. Behind NAT, where the host is reached by an address it \
                         does not carry, set `claim_foreign_ips = true`",
                        own.join(", ")
                    );
                }
            }
            config.ips.clone()
        };
        if ips.is_empty() {
            bail!(
                "no IP to advertise: the host has no non-loopback address; set `ips` in the config"
            );
        }
        let live = config.redundancy;
        Ok(Agent {
            shared: Arc::new(Shared {
                config,
                ips,
                held: Mutex::new(HashMap::new()),
                transports: Arc::new(Mutex::new(HashMap::new())),
                live_relays: watch::channel(live).0,
                tunnels_up: watch::channel(0).0,
                winding_down: TaskTracker::new(),
            }),
        })
    }

    pub fn handle(&self) -> AgentHandle {
        AgentHandle {
            tunnels: self.shared.tunnels_up.subscribe(),
            transports: self.shared.transports.clone(),
            ips: self.shared.ips.clone(),
        }
    }

    /// Keeps the tunnels up until `shutdown`; then lets in-flight streams finish briefly and closes.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let c = &self.shared.config;
        tracing::info!(agent_id = %c.id, namespace = %c.namespace, ips = ?self.shared.ips,
            ports = %c.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","), "agent starting");
        let tasks = TaskTracker::new();
        for slot in 0..c.redundancy as usize {
            let shared = self.shared.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(
                async move { shared.run_slot(slot, shutdown).await }
                    .instrument(tracing::info_span!("tunnel", slot)),
            );
        }
        tasks.close();
        tasks.wait().await;
        self.shared.winding_down.close();
        self.shared.winding_down.wait().await;
        Ok(())
    }
}

impl Shared {
    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashMap<usize, (String, SocketAddr)>> {
        // The map holds plain values; a poisoned lock still holds a coherent map.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wanted(&self) -> usize {
        self.config
            .redundancy
            .min((*self.live_relays.borrow()).max(1)) as usize
    }

    /// Records the live relay count a relay reported; wakes idle slots when it changed.
    fn set_live_relays(&self, live: u32) {
        if live > 0 {
            self.live_relays
                .send_if_modified(|n| std::mem::replace(n, live) != live);
        }
    }

    /// Whether `slot` should idle: the other slots already hold as many tunnels as there are
    /// live relays (or `redundancy`). Counted, not by slot index: the slot that lost its tunnel
    /// may be slot 0 while slot 1 holds the only live relay, and then slot 0 is the one beyond
    /// the live relays. Dialling anyway can only land on a relay already held.
    /// What a stream of the tunnel `session_id` may reach.
    fn policy(&self, session_id: u64) -> stream::Policy {
        stream::Policy {
            ips: self.ips.clone(),
            ports: self.config.ports.clone(),
            session_id,
            connect_timeout: self.config.connect_timeout,
        }
    }

    fn should_idle(&self, slot: usize) -> bool {
        let others = self.lock_held().keys().filter(|s| **s != slot).count();
        others >= self.wanted()
    }

    /// One tunnel slot: dial, serve until the tunnel ends, back off, repeat.
    ///
    /// A dial that lands on a relay another slot already holds costs that relay a session: its
    /// routes are put in etcd before the `Welcome` names the relay, and deleted when the agent
    /// closes the duplicate. So a slot (1) idles while the other slots hold as many tunnels as
    /// there are live relays, (2) dials the relay addresses other slots do not hold, when there
    /// are any, and (3) treats a duplicate landing like a failed dial, with the same exponential
    /// backoff. Together a slot whose relay died neither redials the survivor in a loop while
    /// the dead relay's lease runs out nor afterwards. The relay does not refuse a second `Hello`
    /// of the same agent id and credential instead: it cannot tell it from an agent that
    /// restarted while its old session is not yet timed out, and refusing that one would lock a
    /// restarted agent out of every relay for the idle timeout.
    async fn run_slot(self: Arc<Self>, slot: usize, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        let mut live = self.live_relays.subscribe();
        // The address of the relay this slot's last tunnel was lost to (not drained): dialled
        // last, so a dead or unreachable relay does not cost the slot a whole dial timeout
        // before a live one is tried.
        let mut lost: Option<SocketAddr> = None;
        // Slots start staggered so the first tunnel's Welcome can tell the others the cluster size.
        if slot > 0 {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.reconnect_min * slot as u32) => {}
            }
        }
        while !shutdown.is_cancelled() {
            if self.should_idle(slot) {
                // The cluster is smaller than `redundancy`: idle until a relay joins (a Pong
                // reports it), or look again later (another slot may have lost its tunnel).
                live.mark_unchanged();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = live.changed() => {}
                    _ = tokio::time::sleep(self.config.reconnect_max.min(Duration::from_secs(5))) => {}
                }
                continue;
            }
            // A dial (DNS, QUIC handshake, Hello) can take DIAL_TIMEOUT per relay address; a
            // signal must not wait for it: dropping the dial drops its endpoint and socket.
            let dialled = tokio::select! {
                _ = shutdown.cancelled() => return,
                dialled = self.dial(slot, lost) => dialled,
            };
            match dialled {
                Ok(tunnel) => {
                    // A tunnel that moved to the other transport hands over its replacement.
                    let mut next = Some(tunnel);
                    while let Some(tunnel) = next.take() {
                        next = self
                            .hold(slot, tunnel, &mut backoff, &mut lost, &shutdown)
                            .await;
                    }
                }
                Err(err) => tracing::warn!(err = format!("{err:#}"), "dial failed"),
            }
            let delay = backoff.next_delay();
            // A relay coming up (the live count growing, told by a pong) ends the backoff: the
            // dial that failed may have met that relay while it restarted, and after a few such
            // failures the backoff would outlast its restart by seconds.
            let before = *live.borrow_and_update();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
                _ = live.wait_for(|n| *n > before) => {}
            }
        }
    }

    /// Holds one dialled tunnel in `slot` until it ends; returns the tunnel that replaced it when
    /// it moved to the other transport (`tunnel = "auto"`). `lost` becomes the relay address when
    /// the tunnel was lost (not drained or moved).
    async fn hold(
        self: &Arc<Self>,
        slot: usize,
        tunnel: Tunnel,
        backoff: &mut Backoff,
        lost: &mut Option<SocketAddr>,
        shutdown: &CancellationToken,
    ) -> Option<Tunnel> {
        self.set_live_relays(tunnel.welcome.live_relays);
        let duplicate = {
            let mut held = self.lock_held();
            let dup = held
                .iter()
                .any(|(s, (r, _))| *s != slot && *r == tunnel.welcome.relay_id);
            if !dup {
                held.insert(
                    slot,
                    (
                        tunnel.welcome.relay_id.clone(),
                        tunnel.connection.remote_address(),
                    ),
                );
            }
            dup
        };
        if duplicate {
            // Backed off like a failed dial: behind a load balancer the next dial
            // (a fresh UDP port, a new 5-tuple) may reach another relay, but while
            // the only other relay is down every landing is a duplicate.
            tracing::debug!(relay_id = %tunnel.welcome.relay_id, "tunnel landed on a relay already held");
            tunnel
                .connection
                .close(close::DUPLICATE.into(), b"duplicate relay");
            return None;
        }
        backoff.reset();
        let transport = tunnel.transport;
        self.tunnels_up.send_modify(|n| *n += 1);
        crate::metrics::metrics().agent_tunnels.inc();
        crate::metrics::metrics()
            .agent_tunnels_by_transport(transport.as_str())
            .inc();
        self.lock_transports().insert(slot, transport);
        let relay_id = tunnel.welcome.relay_id.clone();
        let remote = tunnel.connection.remote_address();
        tracing::info!(%relay_id, session_id = %tunnel.welcome.session_id, %transport, "tunnel up");
        let result = self.serve(slot, tunnel, shutdown).await;
        *lost = result.is_err().then_some(remote);
        self.tunnels_up.send_modify(|n| *n -= 1);
        crate::metrics::metrics().agent_tunnels.dec();
        crate::metrics::metrics()
            .agent_tunnels_by_transport(transport.as_str())
            .dec();
        self.lock_transports().remove(&slot);
        self.lock_held().remove(&slot);
        match result {
            Ok(Some(next)) => {
                tracing::info!(%relay_id, from = %transport, to = %next.transport, "tunnel moved");
                Some(next)
            }
            Ok(None) => {
                tracing::info!(%relay_id, "tunnel closed");
                None
            }
            Err(err) => {
                tracing::warn!(%relay_id, err = format!("{err:#}"), "tunnel lost");
                None
            }
        }
    }

    /// Dials a tunnel the way `agent.tunnel` says: over QUIC, over TCP, or (`auto`) over QUIC and,
    /// when no relay answers over QUIC within the dial deadline, over TCP.
    async fn dial(&self, slot: usize, lost: Option<SocketAddr>) -> anyhow::Result<Tunnel> {
        match self.config.tunnel {
            TunnelMode::Quic => self.dial_over(slot, Kind::Quic, lost).await,
            TunnelMode::Tcp => self.dial_over(slot, Kind::Tcp, lost).await,
            TunnelMode::Auto => match self.dial_over(slot, Kind::Quic, lost).await {
                Ok(tunnel) => Ok(tunnel),
                Err(quic) => {
                    tracing::info!(
                        err = format!("{quic:#}"),
                        "no tunnel over QUIC; dialling over TCP"
                    );
                    self.dial_over(slot, Kind::Tcp, lost)
                        .await
                        .map_err(|tcp| tcp.context(format!("over QUIC: {quic:#}; over TCP")))
                }
            },
        }
    }

    /// Dials one relay endpoint from a fresh UDP port and completes the hello.
    /// Addresses other slots' tunnels go to are left out when any other address is left: with
    /// a list of relay addresses they only lead to a relay already held. Behind one load-balanced
    /// address (every address held) all are dialled.
    async fn dial_over(
        &self,
        slot: usize,
        transport: Kind,
        lost: Option<SocketAddr>,
    ) -> anyhow::Result<Tunnel> {
        let mut addrs = self.resolve_relays().await?;
        let held: Vec<SocketAddr> = self
            .lock_held()
            .iter()
            .filter(|(s, _)| **s != slot)
            .map(|(_, (_, addr))| *addr)
            .collect();
        if addrs.iter().any(|a| !held.contains(a)) {
            addrs.retain(|a| !held.contains(a));
        }
        // The address the slot's tunnel was just lost to goes last (a stable sort keeps the
        // shuffle among the others).
        addrs.sort_by_key(|a| Some(*a) == lost);
        let mut last_err = None;
        for addr in addrs {
            let started = std::time::Instant::now();
            match tokio::time::timeout(DIAL_TIMEOUT, self.dial_addr(addr, transport)).await {
                Ok(Ok(tunnel)) => {
                    crate::metrics::metrics()
                        .handshake_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(tunnel);
                }
                Ok(Err(err)) => {
                    last_err = Some(err.context(format!("relay {addr} over {transport}")))
                }
                Err(_) => {
                    last_err = Some(anyhow::anyhow!("relay {addr} over {transport}: timed out"))
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no relay endpoint resolved")))
    }

    /// Every address of every endpoint, shuffled so agents spread over a multi-address name.
    async fn resolve_relays(&self) -> anyhow::Result<Vec<SocketAddr>> {
        use rand::seq::SliceRandom as _;
        let mut addrs = Vec::new();
        for endpoint in &self.config.relays {
            match tokio::net::lookup_host(endpoint.as_str()).await {
                Ok(found) => addrs.extend(found),
                Err(err) => tracing::warn!(%endpoint, %err, "cannot resolve relay endpoint"),
            }
        }
        addrs.shuffle(&mut rand::rng());
        Ok(addrs)
    }

    async fn dial_addr(&self, addr: SocketAddr, kind: Kind) -> anyhow::Result<Tunnel> {
        let c = &self.config;
        let (mut endpoint, transport, gone) = match kind {
            Kind::Quic => {
                let bind: SocketAddr = if addr.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    ([0u16; 8], 0).into()
                };
                let endpoint = crate::tls::bind_endpoint(bind, None, c.transport.udp_buffer)?;
                (endpoint, c.transport.quinn(c.max_streams), None)
            }
            Kind::Tcp => {
                let (socket, gone) = crate::tcp_tunnel::connect(
                    addr,
                    &c.server_name,
                    &c.trust,
                    c.transport.idle_timeout,
                )
                .await?;
                let endpoint = crate::tcp_tunnel::endpoint(socket, None)?;
                let transport = crate::tcp_tunnel::transport(c.transport.quinn(c.max_streams));
                (endpoint, transport, Some(gone))
            }
        };
        let transport = Arc::new(transport);
        endpoint.set_default_client_config(crate::tls::client_config(
            &c.trust,
            protocol::ALPN_AGENT,
            c.identity.clone(),
            transport,
        )?);
        let connection = endpoint
            .connect(addr, &c.server_name)?
            .await
            .with_context(|| format!("QUIC handshake over {kind}"))?;
        let (mut send, mut recv) = connection.open_bi().await?;
        let _ = send.set_priority(protocol::priority::CONTROL);
        let hello = Hello {
            agent_id: c.id.clone(),
            namespace: c.namespace.clone(),
            ips: self.ips.clone(),
            ports: c.ports.clone(),
            token: c.token.clone(),
        };
        protocol::write_message(&mut send, &Message::Hello(hello)).await?;
        match protocol::read_message_timeout(&mut recv, protocol::HELLO_TIMEOUT).await? {
            Message::Welcome(welcome) => Ok(Tunnel {
                endpoint,
                transport: kind,
                gone,
                connection,
                control: (send, recv),
                welcome,
            }),
            Message::Reject(reject) => bail!(
                "relay rejected the agent ({:?}): {}",
                reject.code,
                reject.reason
            ),
            other => bail!(protocol::Error::unexpected(&other)),
        }
    }

    /// Serves relay-opened streams and pings the relay until the tunnel ends, the relay drains, or
    /// `shutdown`. A draining relay's tunnel is wound down in the background (its in-flight streams
    /// finish) while the slot dials a replacement at once.
    async fn serve(
        self: &Arc<Self>,
        slot: usize,
        tunnel: Tunnel,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Option<Tunnel>> {
        let Tunnel {
            endpoint,
            transport,
            gone,
            connection,
            control: (mut send, mut recv),
            welcome,
        } = tunnel;
        let streams = TaskTracker::new();
        // Pongs are read by a loop of their own: `read_message` is not cancel-safe, and racing it
        // against the ticker in a `select!` would drop a half-read frame and desynchronise the
        // control stream.
        let outstanding = AtomicU32::new(0);
        // Pongs received: proof that the relay hears this agent (see `other_transport`).
        let pongs_seen = AtomicU64::new(0);
        // With `auto`, a QUIC tunnel pings every keep-alive interval so that a path that stopped
        // passing UDP is noticed within seconds; missed pongs still end it after the same time.
        let (every, max_missed) =
            if self.config.tunnel == TunnelMode::Auto && transport == Kind::Quic {
                let every = self
                    .config
                    .transport
                    .keep_alive
                    .min(protocol::PING_INTERVAL);
                let per = (protocol::PING_INTERVAL.as_millis() / every.as_millis().max(1)) as u32;
                (every, MAX_MISSED_PONGS * per.max(1))
            } else {
                (protocol::PING_INTERVAL, MAX_MISSED_PONGS)
            };
        let pongs = async {
            loop {
                match protocol::read_message(&mut recv).await? {
                    Message::Pong { live_relays, .. } => {
                        pongs_seen.fetch_add(1, Ordering::Relaxed);
                        outstanding.store(0, Ordering::Relaxed);
                        self.set_live_relays(live_relays);
                    }
                    Message::Drain { grace_ms } => {
                        return Ok(Some(Duration::from_millis(grace_ms)))
                    }
                    other => bail!(protocol::Error::unexpected(&other)),
                }
            }
        };
        let pings = async {
            let mut nonce = 0u64;
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Pings and pongs share connection flow control with the proxied streams, so on a
            // saturated tunnel they queue behind bulk data for many seconds. A relay whose
            // application keeps sending stream data, or keeps reading ours (flow-control credit is
            // only granted as it reads), is alive: only intervals with neither count as missed.
            let relay_progress = || {
                let frames = connection.stats().frame_rx;
                frames.stream + frames.max_data + frames.max_stream_data
            };
            let mut progress = relay_progress();
            loop {
                interval.tick().await;
                let now = relay_progress();
                if now != progress {
                    progress = now;
                    outstanding.store(0, Ordering::Relaxed);
                }
                let missed = outstanding.load(Ordering::Relaxed);
                if missed >= max_missed {
                    bail!("relay missed {missed} pongs");
                }
                nonce += 1;
                outstanding.fetch_add(1, Ordering::Relaxed);
                protocol::write_message(&mut send, &Message::Ping { nonce }).await?;
            }
            #[allow(unreachable_code)]
            Ok::<Option<Duration>, anyhow::Error>(None)
        };
        let ping = async {
            tokio::select! {
                r = pongs => r,
                r = pings => r,
            }
        };
        let accept = async {
            loop {
                let (send, recv) = connection.accept_bi().await?;
                streams.spawn(stream::serve(send, recv, self.policy(welcome.session_id)));
            }
            #[allow(unreachable_code)]
            Ok::<Option<Duration>, anyhow::Error>(None)
        };
        let tcp_gone = async {
            match &gone {
                Some(gone) => gone.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let mut moved = None;
        let result = tokio::select! {
            _ = shutdown.cancelled() => Ok(None),
            r = ping => r,
            r = accept => r,
            _ = tcp_gone => Err(anyhow::anyhow!("the TCP connection closed")),
            next = self.other_transport(slot, transport, &connection, &pongs_seen) => {
                moved = Some(next);
                Ok(Some(self.config.drain_grace))
            }
        };
        streams.close();
        let grace = match result {
            Ok(Some(grace)) if moved.is_some() => {
                tracing::info!(relay_id = %welcome.relay_id, in_flight = streams.len(),
                    "tunnel replaced over the other transport; winding this one down");
                grace
            }
            Ok(Some(grace)) => {
                tracing::info!(relay_id = %welcome.relay_id, grace_ms = grace.as_millis() as u64,
                    in_flight = streams.len(), "relay is draining; opening a replacement tunnel");
                grace
            }
            Ok(None) if shutdown.is_cancelled() => self.config.drain_grace,
            // The tunnel is gone: its streams are gone with it.
            _ => Duration::ZERO,
        };
        if let Ok(Some(grace)) = result {
            // A draining relay that is this agent's only owner keeps opening streams on this
            // tunnel until the replacement is up, and gateways keep opening streams on a tunnel
            // replaced over the other transport until the replacement's route reaches them: serve
            // them in the background (while the slot dials the replacement, or runs the one it
            // moved to) until the replacement has been up for DRAIN_LINGER. The control stream
            // stays open until then, so the relay keeps the session and its routes. (Closing a
            // moved tunnel at once failed the opens gateways sent in that instant.)
            let policy = self.policy(welcome.session_id);
            let draining = Draining {
                endpoint,
                gone,
                connection,
                control: (send, recv),
                streams,
                policy,
            };
            self.winding_down
                .spawn(self.clone().drain_tunnel(draining, grace));
            return Ok(moved);
        }
        drop((send, recv));
        let _ = tokio::time::timeout(grace, streams.wait()).await;
        connection.close(close::SHUTDOWN.into(), b"agent closing tunnel");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        result.map(|_| None)
    }

    /// With `tunnel = "auto"`, returns a tunnel over the other transport once this slot should
    /// move: a TCP tunnel probes QUIC every `quic_probe_interval` (with jitter) and returns the
    /// QUIC tunnel that answered; a QUIC tunnel that heard nothing from its relay for
    /// [`SILENT_KEEP_ALIVES`] keep-alive intervals (UDP stopped passing) returns a TCP tunnel.
    /// The caller winds the old tunnel down (its streams finish) while the new one serves.
    /// Never returns otherwise.
    async fn other_transport(
        &self,
        slot: usize,
        transport: Kind,
        connection: &quinn::Connection,
        pongs: &AtomicU64,
    ) -> Tunnel {
        if self.config.tunnel != TunnelMode::Auto {
            return std::future::pending().await;
        }
        let (to, wait) = match transport {
            Kind::Tcp => (Kind::Quic, None),
            Kind::Quic => (
                Kind::Tcp,
                Some(self.config.transport.keep_alive * SILENT_KEEP_ALIVES),
            ),
        };
        loop {
            match wait {
                None => {
                    let interval = self.config.quic_probe_interval;
                    let jitter = rand::random_range(0.75..1.25);
                    tokio::time::sleep(interval.mul_f64(jitter)).await;
                }
                Some(silence) => silent_for(connection, pongs, silence).await,
            }
            match self.dial_over(slot, to, None).await {
                Ok(next) if !self.held_elsewhere(slot, &next.welcome.relay_id) => {
                    if to == Kind::Quic {
                        tracing::info!(relay_id = %next.welcome.relay_id, "QUIC answers again; moving the tunnel back to QUIC");
                    } else {
                        tracing::warn!(relay_id = %next.welcome.relay_id, "no packet from the relay over QUIC; moved the tunnel to TCP");
                    }
                    return next;
                }
                Ok(next) => next
                    .connection
                    .close(close::DUPLICATE.into(), b"duplicate relay"),
                Err(err) => {
                    tracing::debug!(err = format!("{err:#}"), %to, "no tunnel over the other transport")
                }
            }
            if let Some(_silence) = wait {
                // Tried once per silence: wait for the relay to be heard again first.
                heard(connection, pongs).await;
            }
        }
    }

    /// Whether a slot other than `slot` holds a tunnel to `relay_id`.
    fn held_elsewhere(&self, slot: usize, relay_id: &str) -> bool {
        self.lock_held()
            .iter()
            .any(|(s, (r, _))| *s != slot && r == relay_id)
    }

    fn lock_transports(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Kind>> {
        // Plain values; a poisoned lock still holds a coherent map.
        self.transports.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A draining relay's tunnel being wound down.
struct Draining {
    endpoint: quinn::Endpoint,
    /// TCP tunnels: cancelled when the TCP connection is gone.
    gone: Option<CancellationToken>,
    connection: quinn::Connection,
    control: (quinn::SendStream, quinn::RecvStream),
    streams: TaskTracker,
    policy: stream::Policy,
}

impl Shared {
    /// Whether the agent holds as many tunnels as it wants, none of them on a draining relay
    /// (a draining relay's slot no longer counts as held).
    fn replaced(&self) -> bool {
        let held = self.lock_held().len();
        held > 0 && held >= self.wanted()
    }

    /// Winds down a draining relay's tunnel: keeps serving the streams the relay opens (it opens
    /// new ones only while it is the agent's only owner) until a replacement tunnel has been up
    /// for [`DRAIN_LINGER`] and no stream is in flight, or until `grace` runs out or the relay
    /// closes the tunnel; then closes it.
    async fn drain_tunnel(self: Arc<Self>, tunnel: Draining, grace: Duration) {
        let Draining {
            endpoint,
            gone,
            connection,
            control: (mut send, recv),
            streams,
            policy,
        } = tunnel;
        let deadline = tokio::time::Instant::now() + grace;
        let tcp_gone = || async {
            match &gone {
                Some(gone) => gone.cancelled().await,
                None => std::future::pending().await,
            }
        };
        let serve = |send, recv| {
            streams.spawn(stream::serve(send, recv, policy.clone()));
        };
        let mut replaced_at: Option<tokio::time::Instant> = None;
        loop {
            let now = tokio::time::Instant::now();
            if !self.replaced() {
                replaced_at = None;
            } else if replaced_at.is_none() {
                replaced_at = Some(now);
            }
            if streams.is_empty() && replaced_at.is_some_and(|at| now >= at + DRAIN_LINGER) {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                _ = tcp_gone() => break,
                accepted = connection.accept_bi() => match accepted {
                    Ok((send, recv)) => serve(send, recv),
                    // The relay closed the tunnel (its drain ended): nothing more will come.
                    Err(_) => break,
                },
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        // Ending the control stream ends the session at the relay (its routes go); a stream the
        // relay opened in that instant is still served.
        let _ = send.finish();
        drop(recv);
        let settle = tokio::time::Instant::now() + Duration::from_millis(500);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(settle.min(deadline)) => break,
                _ = tcp_gone() => break,
                accepted = connection.accept_bi() => match accepted {
                    Ok((send, recv)) => serve(send, recv),
                    Err(_) => break,
                },
            }
        }
        streams.close();
        let _ = tokio::time::timeout_at(deadline, streams.wait()).await;
        connection.close(close::SHUTDOWN.into(), b"agent closing tunnel");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }
}

/// How often a QUIC tunnel's received packets are sampled for silence.
const SILENCE_SAMPLE: Duration = Duration::from_millis(250);

/// What proves the relay hears this agent: pongs to its pings, and flow-control credit (granted
/// only as the relay reads the agent's data). Packets from the relay alone do not: UDP may be
/// dropped one way only, and then the relay's packets (its pings on the control stream, stream
/// data, old acknowledgements again) still arrive while nothing of the agent's reaches it.
fn hears_us(connection: &quinn::Connection, pongs: &AtomicU64) -> u64 {
    let frames = connection.stats().frame_rx;
    pongs.load(Ordering::Relaxed) + frames.max_data + frames.max_stream_data
}

/// Returns once the relay has shown no sign of hearing this agent for `silence` (it answers a
/// ping every keep-alive interval while it does).
async fn silent_for(connection: &quinn::Connection, pongs: &AtomicU64, silence: Duration) {
    let acks = |c: &quinn::Connection| hears_us(c, pongs);
    let mut last = acks(connection);
    let mut heard_at = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(SILENCE_SAMPLE).await;
        let now = acks(connection);
        if now != last {
            last = now;
            heard_at = tokio::time::Instant::now();
        } else if heard_at.elapsed() >= silence {
            return;
        }
    }
}

/// Returns once the relay shows it hears this agent again.
async fn heard(connection: &quinn::Connection, pongs: &AtomicU64) {
    let acks = |c: &quinn::Connection| hears_us(c, pongs);
    let last = acks(connection);
    while acks(connection) == last {
        tokio::time::sleep(SILENCE_SAMPLE).await;
    }
}

struct Tunnel {
    endpoint: quinn::Endpoint,
    transport: Kind,
    /// TCP tunnels: cancelled when the TCP connection is gone.
    gone: Option<CancellationToken>,
    connection: quinn::Connection,
    control: (quinn::SendStream, quinn::RecvStream),
    welcome: Welcome,
}

/// Whether the host carries `ip`: an interface has exactly that address, or `ip` lies in a
/// loopback interface's network (Linux answers for all of 127.0.0.0/8 on `lo`).
fn host_has(interfaces: &[if_addrs::Interface], ip: IpAddr) -> bool {
    interfaces.iter().any(|i| match (&i.addr, ip) {
        _ if i.ip() == ip => true,
        (if_addrs::IfAddr::V4(a), IpAddr::V4(v4)) if a.ip.is_loopback() => {
            let mask = u32::from(a.netmask);
            u32::from(a.ip) & mask == u32::from(v4) & mask
        }
        _ => false,
    })
}

/// The host's own addresses: not loopback, not link-local, not unspecified.
fn host_addresses() -> anyhow::Result<Vec<IpAddr>> {
    let mut ips: Vec<IpAddr> = if_addrs::get_if_addrs()
        .context("listing the host's addresses")?
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_link_local(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect();
    ips.sort();
    ips.dedup();
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_has_its_loopback_network_and_not_a_foreign_address() {
        let interfaces = if_addrs::get_if_addrs().unwrap();
        assert!(host_has(&interfaces, "127.0.0.1".parse().unwrap()));
        // Inside lo's 127.0.0.0/8, as the tests' agents claim.
        assert!(host_has(&interfaces, "127.77.0.1".parse().unwrap()));
        // TEST-NET-3: documentation only, never configured on a host.
        assert!(!host_has(&interfaces, "203.0.113.7".parse().unwrap()));
        for i in interfaces.iter().filter(|i| !i.is_loopback()) {
            assert!(host_has(&interfaces, i.ip()), "{}", i.ip());
        }
    }
}
