//! An agent's tunnel at the relay, from its first packet to its end: the QUIC handshake (or the
//! TCP + TLS one that carries QUIC), the hello and its admission (credential, claimed addresses,
//! the claims other tunnels hold, capacity), then the session: routes up, the control loop
//! (pings, drain notices), routes down. The relay process around it (listeners, publisher,
//! drain, opens on a tunnel) is in the parent module; what a credential lets a hello claim is in
//! `credentials`.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use quinn::{Connection, RecvStream, SendStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::admission;
use super::publisher::Change;
use super::sessions::{self, Session};
use super::{Relay, HANDSHAKE_TIMEOUT};
use crate::protocol::{self, close, Code, Message, Reject, Welcome};
use crate::registry::unix_now;

mod credentials;
use credentials::{certificate_name, AgentCertificate};

/// Pings an agent may send at once, and per second after that. An agent pings once per keep-alive
/// interval (a second by default, at least [`crate::config::MIN_AGENT_KEEP_ALIVE`]) or
/// [`protocol::PING_INTERVAL`]; each ping costs the relay's thread a pong, so a tunnel pinging
/// thousands of times a second (a token holder's flood) slows every other tunnel and client of the
/// relay, and many tunnels pinging far faster than agents do add up. Past this a tunnel is closed.
/// The burst covers the pings a live agent queues while its tunnel stalls: it gives the tunnel up
/// after three missed ping periods of [`protocol::PING_INTERVAL`] (60 pings at the fastest).
const PING_BURST: f64 = 100.0;
const PINGS_PER_SECOND: f64 = 4.0;

/// Why a connection not yet admitted was ended to make room for a source holding fewer.
const EVICTED: &str =
    "unadmitted connection limit reached: this slot went to a source holding fewer";

/// An admitted agent connection, handed from the admission to the session's run.
struct Admitted {
    session: Arc<Session>,
    send: SendStream,
    recv: RecvStream,
    welcome: Welcome,
    /// Its place among the relay's `max_tunnels`, held for the session's life.
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Relay {
    /// Accepts TCP tunnels: TCP, the outer TLS handshake, then the QUIC connection it carries,
    /// served exactly as one over UDP ([`Relay::serve_connection`]).
    pub(super) async fn accept_tcp(
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
            // A TCP connection that ends before its QUIC handshake is done frees its slot now,
            // not at the handshake deadline.
            let quic = async {
                let incoming = crate::tcp_tunnel::accept_one(&endpoint)
                    .await
                    .context("the TCP connection closed before QUIC")?;
                incoming.await.context("QUIC handshake failed")
            };
            let conn = tokio::select! {
                conn = quic => conn?,
                () = gone.cancelled() => anyhow::bail!("the TCP connection closed before QUIC"),
            };
            anyhow::Ok((conn, gone))
        };
        let handshake = Box::pin(tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake));
        let (conn, gone) = tokio::select! {
            done = handshake => done.context("TCP tunnel handshake timed out")??,
            () = pending.evicted() => anyhow::bail!(EVICTED),
        };
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
    pub(super) async fn serve_incoming(
        self: Arc<Self>,
        incoming: Box<quinn::Incoming>,
        pending: admission::Slot,
        closed: CancellationToken,
    ) {
        let remote = incoming.remote_address();
        let served = async {
            let handshake = Box::pin(tokio::time::timeout(HANDSHAKE_TIMEOUT, *incoming));
            let conn = tokio::select! {
                done = handshake => done
                    .context("QUIC handshake timed out")?
                    .context("QUIC handshake failed")?,
                () = pending.evicted() => anyhow::bail!(EVICTED),
            };
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
        let read_hello = async {
            let hello_deadline = tokio::time::Instant::now() + protocol::HELLO_TIMEOUT;
            let (send, mut recv) =
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
            anyhow::Ok((send, recv, hello))
        };
        // A slot the relay took back for another source ends the wait (see `admission`).
        let (mut send, recv, hello) = tokio::select! {
            read = read_hello => read?,
            () = pending.evicted() => {
                conn.close(close::PROTOCOL.into(), EVICTED.as_bytes());
                anyhow::bail!(EVICTED);
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
            if let Err(conflict) = self
                .sessions
                .insert_exclusive(session.clone(), admission.quota)
            {
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
                        sessions::Conflict::TooManyTunnels => format!(
                            "agent id {} in namespace {} already holds {} tunnels on this relay",
                            session.agent_id,
                            session.namespace,
                            sessions::MAX_TUNNELS_PER_AGENT
                        ),
                        sessions::Conflict::CredentialTunnels(limit) => format!(
                            "{} holds its maximum of {limit} tunnels on this relay (max_tunnels)",
                            admission.name
                        ),
                        sessions::Conflict::CredentialAddresses { limit, held } => format!(
                            "{} may claim {limit} addresses on this relay (max_addresses); \
                             its tunnels hold {held} and this one claims {}",
                            admission.name,
                            session.ips.len()
                        ),
                    },
                };
                refuse(&conn, &mut send, reject).await;
                return Ok(None);
            }
            // A reload between the admission above and this insert did not see this session.
            if let Err(reject) = self.still_admitted(&session) {
                // A drain in that instant may have published its routes (as draining).
                self.forget(&session);
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
        self.forget(&session);
        crate::metrics::metrics().relay_tunnels.dec();
        crate::metrics::metrics()
            .tunnels_by_transport(transport.as_str())
            .dec();
        tracing::info!(agent_id = %session.agent_id, %remote, %transport, session_id = %session.id, "tunnel down");
        result
    }

    /// Takes `session` out of the session table and its routes out of the registry.
    fn forget(&self, session: &Session) {
        self.sessions.remove(session.id);
        let keys = session
            .routes(&self.config.id)
            .into_iter()
            .map(|r| r.key)
            .collect();
        let _ = self.changes.send(Change::Delete(keys));
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
        // A token bucket of pings (see `PINGS_PER_SECOND`).
        let (mut allowance, mut refilled) = (PING_BURST, tokio::time::Instant::now());
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
                    let now = tokio::time::Instant::now();
                    let earned = now.duration_since(refilled).as_secs_f64() * PINGS_PER_SECOND;
                    (allowance, refilled) = ((allowance + earned).min(PING_BURST), now);
                    if allowance < 1.0 {
                        tracing::warn!(agent_id = %session.agent_id, namespace = %session.namespace,
                            credential = %session.credential, remote = %conn.remote_address(),
                            "tunnel closed: it pinged faster than {PINGS_PER_SECOND} a second \
                             (after a burst of {PING_BURST}); agents never do");
                        conn.close(close::PROTOCOL.into(), b"pings too fast");
                        anyhow::bail!("the agent pinged faster than {PINGS_PER_SECOND} a second");
                    }
                    allowance -= 1.0;
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
