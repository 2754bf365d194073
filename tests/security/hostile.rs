//! A hostile agent against a relay: an attacker's client for the tunnel protocol, built on the
//! project's own protocol code, that speaks QUIC with ALPN `postern/1` and then breaks the rules —
//! never opens a stream, never sends `Hello`, sends oversized, malformed or out-of-order frames,
//! opens extra streams, floods handshakes. Throughout, a legitimate agent stays up and a client's
//! requests through it all succeed; every bad connection is closed with `close::PROTOCOL` and a
//! reason; afterwards the relay holds no connection but the real agent's.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern::config::{GatewayConfig, Transport};
use postern::protocol::{self, close, Message, MAX_FRAME_LEN};
use postern::tls::Trust;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::hello;

/// How long the relay may take to forget the connections it closed.
const RELEASE: Duration = Duration::from_secs(60);
use crate::support::*;

/// The attacker: a QUIC client endpoint on its own loopback address.
pub struct Hostile {
    endpoint: quinn::Endpoint,
    relay: SocketAddr,
}

impl Hostile {
    pub fn new(from: Ipv4Addr, relay: SocketAddr, trust: &Trust) -> Self {
        let mut endpoint =
            postern::tls::bind_endpoint(sa(from, 0), None, 1 << 20).expect("hostile endpoint");
        endpoint.set_default_client_config(
            postern::tls::client_config(
                trust,
                protocol::ALPN_AGENT,
                None,
                Arc::new(Transport::default().quinn(16)),
            )
            .expect("client config"),
        );
        Hostile { endpoint, relay }
    }

    /// A completed QUIC handshake with the relay, and nothing else.
    pub async fn connect(&self) -> quinn::Connection {
        self.try_connect()
            .await
            .expect("the relay completes the handshake")
    }

    /// A QUIC handshake with the relay, which may refuse it.
    pub async fn try_connect(&self) -> Result<quinn::Connection, quinn::ConnectionError> {
        within(
            IO,
            "hostile QUIC handshake",
            self.endpoint
                .connect(self.relay, "localhost")
                .expect("connect"),
        )
        .await
    }
}

/// Whether `err` is the relay refusing a connection before its handshake.
/// `postern_relay_handshakes_refused_total` on the agents' port for `reason`, in this process.
fn handshakes_refused(reason: &'static str) -> u64 {
    postern::metrics::metrics()
        .relay_handshakes_refused
        .get_or_create(&postern::metrics::Refusal {
            endpoint: "agent",
            reason,
        })
        .get()
}

pub fn refused(err: &quinn::ConnectionError) -> bool {
    matches!(err, quinn::ConnectionError::ConnectionClosed(c)
        if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED)
}

/// How long a stream open or write must stay blocked to count as flow-control blocked.
const BLOCKED: Duration = Duration::from_secs(1);

/// A frame header claiming `len` bytes, followed by `body`.
fn raw_frame(version: u8, len: u32, body: &[u8]) -> Vec<u8> {
    let mut frame = vec![version];
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(body);
    frame
}

fn encoded(msg: &Message) -> Vec<u8> {
    protocol::encode(msg).expect("encodes")
}

/// Waits until the relay closes `conn` and returns its application code and reason.
async fn closed_by_relay(conn: &quinn::Connection, what: &str) -> (u32, String) {
    // The relay waits up to the hello deadline for a silent peer.
    let limit = protocol::HELLO_TIMEOUT + Duration::from_secs(5);
    match within(limit, what, conn.closed()).await {
        quinn::ConnectionError::ApplicationClosed(c) => (
            c.error_code.into_inner() as u32,
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("{what}: the relay ended the connection with {other:?}"),
    }
}

/// One misbehaviour: what the attacker does on a fresh connection, and the reason the relay
/// must close it with (always `close::PROTOCOL`).
async fn misbehave(hostile: Arc<Hostile>, case: &'static str, token: String, ip: Ipv4Addr) {
    let conn = hostile.connect().await;
    let reason = match case {
        "silent" => "no hello within the deadline",
        "stream-without-hello" => {
            let (mut send, _recv) = conn.open_bi().await.expect("stream");
            // Half a header: the relay must not wait for the rest forever.
            send.write_all(&[protocol::VERSION, 0, 0])
                .await
                .expect("write");
            let got = closed_by_relay(&conn, case).await;
            assert_eq!(
                got,
                (close::PROTOCOL, "no hello within the deadline".into())
            );
            return;
        }
        "oversized-frame" | "max-length-frame" | "wrong-version" | "malformed-json" => {
            let bytes = match case {
                "oversized-frame" => raw_frame(
                    protocol::VERSION,
                    MAX_FRAME_LEN as u32 + 1,
                    &vec![b'{'; 4096],
                ),
                "max-length-frame" => raw_frame(protocol::VERSION, u32::MAX, b"{}"),
                "wrong-version" => {
                    let mut frame = encoded(&Message::Hello(hello("x", &token, &[ip], 80)));
                    frame[0] = protocol::VERSION + 1;
                    frame
                }
                _ => raw_frame(protocol::VERSION, 12, b"{\"type\":hell"),
            };
            let (mut send, _recv) = conn.open_bi().await.expect("stream");
            let _ = send.write_all(&bytes).await;
            "bad hello"
        }
        "ping-before-hello" => {
            let (mut send, _recv) = conn.open_bi().await.expect("stream");
            let _ = send.write_all(&encoded(&Message::Ping { nonce: 1 })).await;
            "expected hello"
        }
        "hello-on-many-streams" => {
            // Before admission the relay grants one stream, the control stream: a second cannot
            // even be opened, so it holds no relay state.
            let (mut send, _recv) = conn.open_bi().await.expect("stream");
            let _ = send
                .write_all(&raw_frame(protocol::VERSION, 3, b"!!!"))
                .await;
            let extra = tokio::time::timeout(BLOCKED, conn.open_bi()).await;
            assert!(
                !matches!(extra, Ok(Ok(_))),
                "{case}: a second stream opened"
            );
            "bad hello"
        }
        "extra-streams-before-hello" => {
            // Half a frame header on the control stream, then a second stream: blocked by the
            // stream limit until the relay closes the connection at the hello deadline.
            let (mut send, _recv) = conn.open_bi().await.expect("stream");
            send.write_all(&[protocol::VERSION, 0, 0])
                .await
                .expect("write");
            let extra = tokio::time::timeout(BLOCKED, conn.open_bi()).await;
            assert!(
                !matches!(extra, Ok(Ok(_))),
                "{case}: a second stream opened"
            );
            // The control stream stays open (its end would be an answer of its own).
            let got = closed_by_relay(&conn, case).await;
            drop(send);
            assert_eq!(
                got,
                (close::PROTOCOL, "no hello within the deadline".into())
            );
            return;
        }
        "late-stream-then-half-header" => {
            // Half the hello deadline in silence, then the stream and half a frame header: the
            // relay's deadline runs from the handshake, not from the stream.
            let connected = Instant::now();
            tokio::time::sleep(protocol::HELLO_TIMEOUT / 2).await;
            let (mut send, _recv) = conn.open_bi().await.expect("stream");
            send.write_all(&[protocol::VERSION, 0, 0])
                .await
                .expect("write");
            let got = closed_by_relay(&conn, case).await;
            let took = connected.elapsed();
            drop(send);
            assert_eq!(
                got,
                (close::PROTOCOL, "no hello within the deadline".into())
            );
            assert!(
                took < protocol::HELLO_TIMEOUT + Duration::from_secs(2),
                "{case}: closed {took:?} after the handshake"
            );
            return;
        }
        "push-before-hello" => {
            // A frame header announcing the largest frame, then as many bytes as the relay will
            // take: flow control stops the sender at one stream window (plus the one frame the
            // relay reads); with no second stream, that is all it can make the relay buffer.
            let (mut send, _recv) = conn.open_bi().await.expect("stream");
            let mut sent = 0usize;
            let mut header = raw_frame(protocol::VERSION, MAX_FRAME_LEN as u32, b"");
            header.resize(16 * 1024, b' ');
            let chunk = vec![b' '; 16 * 1024];
            let mut first = Some(header);
            loop {
                let data = first.take().unwrap_or_else(|| chunk.clone());
                match tokio::time::timeout(BLOCKED, send.write(&data)).await {
                    Ok(Ok(n)) => sent += n,
                    // Blocked, or closed by the relay (after it read the whole frame).
                    Ok(Err(_)) | Err(_) => break,
                }
                assert!(sent <= 4 << 20, "{case}: the relay took {sent} bytes");
            }
            let bound = MAX_FRAME_LEN + 5 + Transport::default().stream_window as usize;
            eprintln!("{case}: the relay granted {sent} bytes before admission (bound {bound})");
            assert!(
                sent <= bound,
                "{case}: {sent} bytes accepted before admission, bound {bound}"
            );
            "bad hello"
        }
        "second-stream-after-welcome"
        | "garbage-after-welcome"
        | "hello-again"
        | "oversized-after-welcome"
        | "ping-flood-after-welcome" => {
            let agent_id = format!("hostile-{}", ip.octets()[3]);
            let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
            send.write_all(&encoded(&Message::Hello(hello(
                &agent_id,
                &token,
                &[ip],
                80,
            ))))
            .await
            .expect("hello");
            let answer = protocol::read_message_timeout(&mut recv, IO).await;
            assert!(
                matches!(answer, Ok(Message::Welcome(_))),
                "{case}: a valid hello got {answer:?}"
            );
            let reason = match case {
                "second-stream-after-welcome" => {
                    // The relay grants agents one stream, also once admitted: a second stays
                    // blocked. Junk on the control stream then ends the tunnel.
                    let extra = tokio::time::timeout(BLOCKED, conn.open_bi()).await;
                    assert!(
                        !matches!(extra, Ok(Ok(_))),
                        "{case}: a second stream opened"
                    );
                    let _ = send
                        .write_all(&raw_frame(protocol::VERSION, 5, b"junk!"))
                        .await;
                    "bad control frame"
                }
                "garbage-after-welcome" => {
                    let _ = send
                        .write_all(&raw_frame(protocol::VERSION, 5, b"junk!"))
                        .await;
                    "bad control frame"
                }
                "oversized-after-welcome" => {
                    let _ = send
                        .write_all(&raw_frame(protocol::VERSION, MAX_FRAME_LEN as u32 + 1, b""))
                        .await;
                    "bad control frame"
                }
                "ping-flood-after-welcome" => {
                    // Each ping as soon as the last pong is in: thousands a second. The relay
                    // answers a burst and closes the tunnel.
                    let mut answered = 0u32;
                    for nonce in 0..20_000u64 {
                        let ping = Message::Ping { nonce };
                        if protocol::write_message(&mut send, &ping).await.is_err() {
                            break;
                        }
                        match protocol::read_message_timeout(&mut recv, IO).await {
                            Ok(Message::Pong { .. }) => answered += 1,
                            _ => break,
                        }
                    }
                    assert!(
                        (100..20_000).contains(&answered),
                        "{case}: {answered} pings answered"
                    );
                    "pings too fast"
                }
                _ => {
                    let _ = send
                        .write_all(&encoded(&Message::Hello(hello(
                            &agent_id,
                            &token,
                            &[ip],
                            80,
                        ))))
                        .await;
                    "unexpected control message"
                }
            };
            // The control stream stays open until the relay has closed: its end would be an
            // answer of its own.
            let got = closed_by_relay(&conn, case).await;
            drop((send, recv));
            assert_eq!(got, (close::PROTOCOL, reason.to_string()), "{case}");
            return;
        }
        other => panic!("unknown case {other}"),
    };
    let got = closed_by_relay(&conn, case).await;
    assert_eq!(got, (close::PROTOCOL, reason.to_string()), "{case}");
}

/// The client side of the legitimate traffic: SOCKS5 round trips to the real agent's service
/// until `stop`, counting successes; any failure fails the test.
async fn legitimate_client(
    socks: SocketAddr,
    service: SocketAddr,
    stop: CancellationToken,
    done: Arc<AtomicUsize>,
) {
    let mut i = 0u64;
    while !stop.is_cancelled() {
        i += 1;
        let tcp = socks5_connect(socks, &Dest::Ip(service), Auth::None)
            .await
            .unwrap_or_else(|e| panic!("legitimate request {i} during the attack: {e:?}"));
        expect_echo(tcp, Vec::new(), "real", &pattern(i, 1024)).await;
        done.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_is_closed_with_a_clear_code_and_the_relay_keeps_serving() {
    init();
    let pki = Pki::new();
    let net = 74;
    let stack = Stack::start(&pki, net, 0, GatewayConfig::default(), |_| {}).await;
    let real_ip = ip(net, 1, 2);
    let service = tagged_echo(sa(real_ip, 0), "real").await;
    let agent = stack
        .start_agent(stack.agent("real", "default", &[real_ip], &[service.addr.port()]))
        .await;
    assert_eq!(
        stack.relay.open_connections(),
        1,
        "only the real agent's tunnel"
    );

    let stop = CancellationToken::new();
    let done = Arc::new(AtomicUsize::new(0));
    let mut client = AbortOnDrop(tokio::spawn(legitimate_client(
        stack.socks,
        service.addr,
        stop.clone(),
        done.clone(),
    )));

    let hostile = Arc::new(Hostile::new(ip(net, 66, 1), stack.relay_addr, &stack.trust));
    let started = Instant::now();
    let mut cases = JoinSet::new();
    let names = [
        "silent",
        "stream-without-hello",
        "oversized-frame",
        "max-length-frame",
        "wrong-version",
        "malformed-json",
        "ping-before-hello",
        "hello-on-many-streams",
        "extra-streams-before-hello",
        "push-before-hello",
        "late-stream-then-half-header",
        "second-stream-after-welcome",
        "garbage-after-welcome",
        "hello-again",
        "oversized-after-welcome",
        "ping-flood-after-welcome",
    ];
    for (i, case) in names.into_iter().enumerate() {
        cases.spawn(misbehave(
            hostile.clone(),
            case,
            stack.token.clone(),
            ip(net, 5, 10 + i as u8),
        ));
    }
    // A handshake flood beside them: 300 connections that complete the QUIC handshake and never
    // say anything, from another address. The relay holds `relay.max_pending_per_source` of them
    // and refuses the rest before their handshake; each one it holds is closed at the hello
    // deadline.
    let flooder = Arc::new(Hostile::new(ip(net, 67, 1), stack.relay_addr, &stack.trust));
    let flooded = Arc::new(AtomicUsize::new(0));
    let turned_away = Arc::new(AtomicUsize::new(0));
    for _ in 0..300 {
        let (flooder, flooded, turned_away) =
            (flooder.clone(), flooded.clone(), turned_away.clone());
        cases.spawn(async move {
            let conn = match flooder.try_connect().await {
                Ok(conn) => conn,
                Err(err) => {
                    assert!(refused(&err), "flooded handshake ended with {err:?}");
                    turned_away.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            };
            flooded.fetch_add(1, Ordering::SeqCst);
            let got = closed_by_relay(&conn, "flooded handshake").await;
            assert_eq!(
                got,
                (close::PROTOCOL, "no hello within the deadline".into())
            );
        });
    }
    while let Some(result) = cases.join_next().await {
        result.expect("a hostile case failed");
    }
    let per_source = postern::config::DEFAULT_MAX_PENDING_PER_SOURCE as usize;
    assert_eq!(
        (
            flooded.load(Ordering::SeqCst),
            turned_away.load(Ordering::SeqCst)
        ),
        (per_source, 300 - per_source),
        "(handshakes held, refused) from the flooding address"
    );
    eprintln!(
        "hostile cases and flood closed within {:?}",
        started.elapsed()
    );

    // The legitimate side never noticed.
    stop.cancel();
    within(IO, "legitimate client", &mut client.0)
        .await
        .expect("client");
    let requests = done.load(Ordering::SeqCst);
    assert!(
        requests >= 20,
        "only {requests} legitimate requests in the attack"
    );
    assert_eq!(agent.handle.tunnels(), 1, "the real agent lost its tunnel");
    // Every hostile connection is gone: the relay holds the real agent's tunnel and no other.
    let released = Instant::now();
    let relay = stack.relay.clone();
    wait_until(RELEASE, "hostile connections released", move || {
        relay.open_connections() == 1
    })
    .await;
    eprintln!(
        "relay back to one connection {:?} after the attack",
        released.elapsed()
    );
    assert_eq!(
        stack.relay.sessions().len(),
        1,
        "{:?}",
        stack.relay.sessions().all()
    );
    let owners = stack.owners("default", real_ip.into());
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert!(
        (10..25).all(|d| stack.owners("default", ip(net, 5, d).into()).is_empty()),
        "a hostile session left a route"
    );
    eprintln!("{requests} legitimate requests served during the attack");
}

/// Handshakes from one source past `relay.max_pending_per_source` are refused before their TLS
/// handshake and counted, while an agent from another source still connects and carries traffic;
/// the source's slots come back when the relay closes its silent connections at the hello
/// deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_past_its_pending_limit_is_refused_while_another_agent_connects() {
    init();
    let pki = Pki::new();
    let net = 135;
    let per_source = 4;
    let stack = Stack::start(&pki, net, 0, GatewayConfig::default(), |relay| {
        relay.max_pending_per_source = per_source;
    })
    .await;
    let refusals = || handshakes_refused("per_source");
    let refused_before = refusals();

    let hostile = Hostile::new(ip(net, 66, 1), stack.relay_addr, &stack.trust);
    let mut held = Vec::new();
    for _ in 0..per_source {
        held.push(hostile.connect().await);
    }
    assert_eq!(stack.relay.pending_connections(), per_source as usize);
    for attempt in 0..3 {
        let err = hostile
            .try_connect()
            .await
            .expect_err("a handshake past the per-source limit completed");
        assert!(refused(&err), "attempt {attempt}: {err:?}");
    }
    assert!(
        refusals() >= refused_before + 3,
        "postern_relay_handshakes_refused_total{{endpoint=\"agent\",reason=\"per_source\"}} did not count the refusals"
    );

    // A legitimate agent, from another source, is admitted while the hostile source is full.
    let real_ip = ip(net, 1, 2);
    let service = tagged_echo(sa(real_ip, 0), "real").await;
    let agent = stack
        .start_agent(stack.agent("real", "default", &[real_ip], &[service.addr.port()]))
        .await;
    assert_eq!(agent.handle.tunnels(), 1);
    for i in 0..3u64 {
        let tcp = socks5_connect(stack.socks, &Dest::Ip(service.addr), Auth::None)
            .await
            .expect("request through the real agent");
        expect_echo(tcp, Vec::new(), "real", &pattern(i, 4096)).await;
    }
    let err = hostile
        .try_connect()
        .await
        .expect_err("the hostile source is still full");
    assert!(refused(&err), "{err:?}");

    // The relay closes the silent connections at the hello deadline; the source may dial again.
    for conn in &held {
        let got = closed_by_relay(conn, "held silent connection").await;
        assert_eq!(
            got,
            (close::PROTOCOL, "no hello within the deadline".into())
        );
    }
    let relay = stack.relay.clone();
    wait_until(IO, "pending slots released", move || {
        relay.pending_connections() == 0
    })
    .await;
    let again = hostile.connect().await;
    drop(again);
    assert_eq!(agent.handle.tunnels(), 1, "the real agent lost its tunnel");
}

/// Handshakes that can never complete — what packets with a spoofed source address look like to
/// the relay — hold at most half of their source's slots: past half, the relay answers a new
/// connection with a stateless QUIC Retry, which only a client that receives at its address can
/// answer. A real client from that same address still connects. The spoofer is a UDP forwarder the
/// test owns: it passes a client's packets to the relay from its own address and drops every
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_that_never_complete_hold_at_most_half_a_sources_slots() {
    init();
    let pki = Pki::new();
    let net = 136;
    let per_source = 4;
    let stack = Stack::start(&pki, net, 0, GatewayConfig::default(), |relay| {
        relay.max_pending_per_source = per_source;
    })
    .await;
    let spoofed = ip(net, 77, 1);
    let forwarder = tokio::net::UdpSocket::bind(sa(spoofed, 0))
        .await
        .expect("forwarder");
    let forwarder_addr = forwarder.local_addr().unwrap();
    let relay_addr = stack.relay_addr;
    let forwarded = Arc::new(AtomicUsize::new(0));
    let counted = forwarded.clone();
    let _forward = AbortOnDrop(tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = forwarder.recv_from(&mut buf).await {
            // The relay's answers are dropped: they go to an address that never reads them.
            if from != relay_addr {
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = forwarder.send_to(&buf[..n], relay_addr).await;
            }
        }
    }));
    let blind = Arc::new(Hostile::new(ip(net, 77, 2), forwarder_addr, &stack.trust));
    let mut attempts = Vec::new();
    for _ in 0..20 {
        let blind = blind.clone();
        attempts.push(AbortOnDrop(tokio::spawn(async move {
            let _ = blind.try_connect().await;
        })));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_until(IO, "initial packets forwarded", || {
        forwarded.load(Ordering::SeqCst) >= 20
    })
    .await;
    // Every Initial has reached the relay (the loopback delivers in order); give it a moment
    // to handle the last ones, then count what it holds.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = stack.relay.pending_connections();
    assert!(
        held <= (per_source / 2) as usize,
        "{held} never-completing handshakes hold slots of the source (limit {per_source})"
    );

    // A client that can answer, from the same address, is validated by the Retry and connects.
    let real = Hostile::new(spoofed, stack.relay_addr, &stack.trust);
    let conn = real
        .try_connect()
        .await
        .expect("a client from the spoofed address is refused");
    drop(conn);
    drop(attempts);
}

/// A few sources holding their connections silent fill every slot the relay keeps for
/// connections not yet admitted (`relay.max_pending`): over QUIC through the hello deadline, over
/// TCP before TLS says anything. A new agent from another source still gets in at once: it takes
/// the oldest slot of the source holding the most, whose connection the relay ends with a reason,
/// while the other silent connections are left to their deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sources_filling_every_pending_slot_do_not_keep_a_new_agent_out() {
    init();
    let pki = Pki::new();
    let net = 146;
    let stack = Stack::start(&pki, net, 0, GatewayConfig::default(), |relay| {
        relay.max_pending = 10;
        relay.max_pending_per_source = 4;
    })
    .await;
    let evictions = || handshakes_refused("evicted");
    let evicted_before = evictions();

    // Source A holds 4 silent QUIC connections, B 3, and C 3 silent TCP connections (no TLS).
    let a = Hostile::new(ip(net, 70, 1), stack.relay_addr, &stack.trust);
    let b = Hostile::new(ip(net, 70, 2), stack.relay_addr, &stack.trust);
    let mut held_a = Vec::new();
    for _ in 0..4 {
        held_a.push(a.connect().await);
    }
    let mut held_b = Vec::new();
    for _ in 0..3 {
        held_b.push(b.connect().await);
    }
    let mut held_c = Vec::new();
    for _ in 0..3 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(sa(ip(net, 70, 3), 0)).expect("bind");
        held_c.push(socket.connect(stack.relay_addr).await.expect("TCP connect"));
    }
    let relay = stack.relay.clone();
    wait_until(IO, "every pending slot held", move || {
        relay.pending_connections() == 10
    })
    .await;
    // Without a slot to take, one more from a source already holding as many is refused.
    let err = b
        .try_connect()
        .await
        .expect_err("a fourth connection from B while every slot is held");
    assert!(refused(&err), "{err:?}");

    // A legitimate agent from another source is admitted and carries traffic.
    let real_ip = ip(net, 1, 2);
    let service = tagged_echo(sa(real_ip, 0), "real").await;
    let agent = stack
        .start_agent(stack.agent("real", "default", &[real_ip], &[service.addr.port()]))
        .await;
    let tcp = socks5_connect(stack.socks, &Dest::Ip(service.addr), Auth::None)
        .await
        .expect("request through the real agent");
    expect_echo(tcp, Vec::new(), "real", &pattern(1, 4096)).await;

    // It took A's oldest slot: that connection was ended with the reason, the rest wait for
    // their deadline.
    let got = closed_by_relay(&held_a[0], "A's oldest connection").await;
    assert_eq!(got.0, close::PROTOCOL);
    assert!(
        got.1.contains("went to a source holding fewer"),
        "closed with {got:?}"
    );
    for (i, conn) in held_a[1..].iter().chain(&held_b).enumerate() {
        assert!(
            conn.close_reason().is_none(),
            "silent connection {i} was closed too: {:?}",
            conn.close_reason()
        );
    }
    assert!(evictions() > evicted_before, "the eviction was not counted");
    assert_eq!(agent.handle.tunnels(), 1);
    drop(held_c);
}

/// A TCP tunnel connection that completes TLS and then ends, before any QUIC, gives its
/// unadmitted slot back when it ends, not at the 10 s handshake deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_tunnel_that_ends_before_quic_frees_its_slot_when_it_ends() {
    init();
    let pki = Pki::new();
    let net = 148;
    let stack = Stack::start(&pki, net, 0, GatewayConfig::default(), |_| {}).await;
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let (socket, _gone) = postern::tcp_tunnel::connect(
            stack.relay_addr,
            "localhost",
            &stack.trust,
            Duration::from_secs(60),
        )
        .await
        .expect("TCP + TLS to the relay");
        sockets.push(socket);
    }
    let relay = stack.relay.clone();
    wait_until(IO, "three TCP connections counted", move || {
        relay.pending_connections() == 3
    })
    .await;
    let ended = Instant::now();
    drop(sockets);
    let relay = stack.relay.clone();
    wait_until(
        protocol::HELLO_TIMEOUT / 2,
        "slots given back before the handshake deadline",
        move || relay.pending_connections() == 0,
    )
    .await;
    eprintln!(
        "slots back {:?} after the connections ended",
        ended.elapsed()
    );
}
