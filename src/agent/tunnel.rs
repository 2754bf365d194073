//! One tunnel of the agent's: dialling a relay (its addresses resolved; QUIC, TCP + TLS, or QUIC
//! first and TCP when no relay answers; the hello and its welcome), serving it (the streams the
//! relay opens, the control loop's pings and pongs, drain notices, a move to the other transport
//! when UDP stops passing), and winding it down when its relay drains. Which slots hold tunnels,
//! and when to dial, is the parent module's.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{stream, Shared, DIAL_TIMEOUT, DRAIN_LINGER, MAX_MISSED_PONGS, SILENT_KEEP_ALIVES};
use crate::config::TunnelMode;
use crate::protocol::{self, close, Hello, Message, Welcome};
use crate::tcp_tunnel::Kind;

impl Shared {
    /// Dials a tunnel the way `agent.tunnel` says: over QUIC, over TCP, or (`auto`) over QUIC and,
    /// when no relay answers over QUIC within the dial deadline, over TCP.
    pub(super) async fn dial(
        &self,
        slot: usize,
        lost: Option<SocketAddr>,
    ) -> anyhow::Result<Tunnel> {
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
    pub(super) async fn serve(
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
                streams.spawn(stream::serve_boxed(
                    send,
                    recv,
                    self.policy(welcome.session_id),
                ));
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
}

/// A draining relay's tunnel being wound down.
pub(super) struct Draining {
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
            streams.spawn(stream::serve_boxed(send, recv, policy.clone()));
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

pub(super) struct Tunnel {
    pub(super) endpoint: quinn::Endpoint,
    pub(super) transport: Kind,
    /// TCP tunnels: cancelled when the TCP connection is gone.
    pub(super) gone: Option<CancellationToken>,
    pub(super) connection: quinn::Connection,
    pub(super) control: (quinn::SendStream, quinn::RecvStream),
    pub(super) welcome: Welcome,
}
