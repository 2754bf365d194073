//! The TCP tunnel transport: an agent's tunnel — the very same QUIC connection, streams, flow
//! control, keep-alives and protocol — carried over one TCP + TLS 1.3 connection instead of UDP,
//! for networks whose firewalls, VIPs or egress proxies pass TCP but drop UDP.
//!
//! The QUIC packets travel as length-prefixed records (2-byte big-endian length, then the packet)
//! inside the TLS stream; each TCP connection gets a quinn endpoint of its own over a
//! [`StreamSocket`], so a slow TCP connection holds back only its own tunnel. Because the TCP path
//! neither loses nor reorders packets, datagrams are [`DATAGRAM`] bytes (not the ~1.4 KB of a UDP
//! path) and path-MTU discovery is off. Back-pressure replaces loss: a full send queue makes the
//! QUIC connection wait for the TCP connection to drain (`WouldBlock`), it never drops a packet.
//!
//! Everything above the socket is unchanged: the relay runs the same hello, admission (agent
//! certificates are checked in the inner QUIC handshake, tokens in the hello), session table and
//! drain; the agent the same pings and stream handling; splices see quinn streams. The outer TLS
//! layer authenticates the relay with the agent's usual trust (CA or pin) and lets the tunnel pass
//! TLS-only middleboxes; it asks for no client certificate.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut as _, Bytes, BytesMut};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, PollSender};

/// The size of the QUIC packets a TCP tunnel carries.
pub const DATAGRAM: u16 = 16 * 1024;
/// Packets queued towards the TCP connection (each way) before QUIC has to wait.
const QUEUE: usize = 64;
/// Bytes gathered into one TLS write.
const WRITE_BATCH: usize = 64 * 1024;
/// How long a closed socket's queued packets (a CONNECTION_CLOSE) may take to reach the peer.
const FLUSH_GRACE: Duration = Duration::from_secs(1);

/// Which transport carries a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// QUIC over UDP.
    Quic,
    /// QUIC over TCP + TLS ([`crate::tcp_tunnel`]).
    Tcp,
}

impl Kind {
    /// The name used in logs, metrics labels, status and configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Quic => "quic",
            Kind::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A quinn socket whose datagrams travel over one TLS stream.
pub struct StreamSocket {
    local: SocketAddr,
    peer: SocketAddr,
    out: mpsc::Sender<Bytes>,
    inbound: Mutex<mpsc::Receiver<Bytes>>,
    /// Cancelled when the socket is dropped: stops the reader, and the writer after a grace.
    stop: CancellationToken,
}

impl fmt::Debug for StreamSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamSocket")
            .field("local", &self.local)
            .field("peer", &self.peer)
            .finish()
    }
}

impl Drop for StreamSocket {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A socket over `stream` and a token cancelled as soon as the TCP connection is gone (EOF, error
/// or reset), so its owner can close the QUIC connection at once instead of at its idle timeout.
pub fn socket<S>(
    stream: S,
    local: SocketAddr,
    peer: SocketAddr,
) -> (Arc<StreamSocket>, CancellationToken)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    let (out_tx, out_rx) = mpsc::channel(QUEUE);
    let (in_tx, in_rx) = mpsc::channel(QUEUE);
    let stop = CancellationToken::new();
    let gone = CancellationToken::new();
    {
        let (stop, gone) = (stop.clone(), gone.clone());
        tokio::spawn(async move {
            tokio::select! {
                r = read_loop(read, in_tx) => {
                    if let Err(err) = r {
                        tracing::debug!(%peer, %err, "TCP tunnel read ended");
                    }
                }
                _ = stop.cancelled() => {}
            }
            gone.cancel();
        });
    }
    {
        let (stop, gone) = (stop.clone(), gone.clone());
        tokio::spawn(async move {
            tokio::select! {
                r = write_loop(write, out_rx) => {
                    if let Err(err) = r {
                        tracing::debug!(%peer, %err, "TCP tunnel write ended");
                    }
                }
                _ = async { stop.cancelled().await; tokio::time::sleep(FLUSH_GRACE).await } => {}
            }
            gone.cancel();
        });
    }
    let socket = StreamSocket {
        local,
        peer,
        out: out_tx,
        inbound: Mutex::new(in_rx),
        stop,
    };
    (Arc::new(socket), gone)
}

async fn read_loop<R: AsyncRead + Unpin>(read: R, to: mpsc::Sender<Bytes>) -> io::Result<()> {
    let mut read = tokio::io::BufReader::with_capacity(WRITE_BATCH, read);
    loop {
        let len = match read.read_u16().await {
            Ok(len) => len as usize,
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(err) => return Err(err),
        };
        let mut packet = BytesMut::zeroed(len);
        read.read_exact(&mut packet).await?;
        if to.send(packet.freeze()).await.is_err() {
            return Ok(());
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut write: W,
    mut from: mpsc::Receiver<Bytes>,
) -> io::Result<()> {
    let mut batch = BytesMut::with_capacity(WRITE_BATCH);
    while let Some(packet) = from.recv().await {
        put(&mut batch, &packet);
        // Whatever else is queued goes out in the same TLS write.
        while batch.len() < WRITE_BATCH {
            match from.try_recv() {
                Ok(packet) => put(&mut batch, &packet),
                Err(_) => break,
            }
        }
        write.write_all(&batch).await?;
        write.flush().await?;
        batch.clear();
    }
    write.shutdown().await
}

fn put(batch: &mut BytesMut, packet: &[u8]) {
    // `try_send` refuses packets longer than a u16 length can say.
    batch.put_u16(packet.len() as u16);
    batch.put_slice(packet);
}

impl AsyncUdpSocket for StreamSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Poller {
            sender: Mutex::new(PollSender::new(self.out.clone())),
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if transmit.contents.len() > u16::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "packet too large for a TCP tunnel",
            ));
        }
        match self.out.try_send(Bytes::copy_from_slice(transmit.contents)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(io::ErrorKind::WouldBlock.into()),
            // The TCP connection is gone: like UDP into a dead path, the packet is lost and the
            // QUIC connection ends at its idle timeout (or when the owner sees `gone`).
            Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // Only quinn's endpoint driver receives; the lock is never contended.
        let mut inbound = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
        let mut count = 0;
        while count < bufs.len().min(meta.len()) {
            let packet = if count == 0 {
                match inbound.poll_recv(cx) {
                    Poll::Ready(Some(packet)) => packet,
                    // The TCP connection is gone; nothing will ever arrive (the owner closes).
                    Poll::Ready(None) | Poll::Pending => return Poll::Pending,
                }
            } else {
                match inbound.try_recv() {
                    Ok(packet) => packet,
                    Err(_) => break,
                }
            };
            let len = packet.len().min(bufs[count].len());
            bufs[count][..len].copy_from_slice(&packet[..len]);
            meta[count] = RecvMeta {
                addr: self.peer,
                len,
                stride: len,
                ..RecvMeta::default()
            };
            count += 1;
        }
        Poll::Ready(Ok(count))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

/// Wakes quinn when the send queue has room again.
struct Poller {
    /// Only ever used through `&mut` (the mutex makes the poller `Sync`).
    sender: Mutex<PollSender<Bytes>>,
}

impl fmt::Debug for Poller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Poller")
    }
}

impl UdpPoller for Poller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let sender = self
            .get_mut()
            .sender
            .get_mut()
            .unwrap_or_else(|e| e.into_inner());
        match sender.poll_reserve(cx) {
            Poll::Ready(_) => {
                // Room (or a closed queue, where `try_send` drops): give the slot back for it.
                sender.abort_send();
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A quinn endpoint of its own over `socket` (one per TCP connection).
pub fn endpoint(
    socket: Arc<StreamSocket>,
    server: Option<quinn::ServerConfig>,
) -> io::Result<quinn::Endpoint> {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(DATAGRAM)
        .map_err(|err| io::Error::other(err.to_string()))?;
    let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime"))?;
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
}

/// `server` as the relay's end of one TCP connection needs it: at most one connection attempt
/// waiting to be accepted, holding at most four packets besides its first (quinn's defaults, 65,536
/// attempts of up to 10 MB each, are for an endpoint that accepts in a loop; this one accepts once).
pub fn server(mut server: quinn::ServerConfig) -> quinn::ServerConfig {
    let budget = 4 * u64::from(DATAGRAM);
    server
        .max_incoming(1)
        .incoming_buffer_size(budget)
        .incoming_buffer_size_total(budget);
    server
}

/// Waits for the one connection a TCP tunnel carries, then takes the server config away from
/// `endpoint`: a further Initial over the same TCP connection (a new connection ID) is answered
/// statelessly instead of queueing an attempt nobody accepts for as long as the tunnel lives.
pub async fn accept_one(endpoint: &quinn::Endpoint) -> Option<quinn::Incoming> {
    let incoming = endpoint.accept().await?;
    endpoint.set_server_config(None);
    Some(incoming)
}

/// `transport` adjusted for a TCP path: packets of [`DATAGRAM`] bytes, no path-MTU discovery, and
/// a first congestion window of ten such packets (the default, ~14.7 KB, is less than one).
pub fn transport(mut transport: quinn::TransportConfig) -> quinn::TransportConfig {
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window(10 * u64::from(DATAGRAM));
    transport
        .initial_mtu(DATAGRAM)
        .min_mtu(DATAGRAM)
        .mtu_discovery_config(None)
        .congestion_controller_factory(Arc::new(cubic));
    transport
}

/// TCP options of a tunnel's TCP connection: no Nagle delay, and keep-alives so a silent peer is
/// noticed by the kernel too (the QUIC keep-alive and idle timeout inside still decide).
pub fn tune(tcp: &TcpStream, idle: Duration) {
    let _ = tcp.set_nodelay(true);
    let params = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(Duration::from_secs(1));
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&params);
}

/// Dials `addr` over TCP and completes the outer TLS handshake (checking the relay's certificate
/// for `server_name` under `trust`).
pub async fn connect(
    addr: SocketAddr,
    server_name: &str,
    trust: &crate::tls::Trust,
    keepalive: Duration,
) -> anyhow::Result<(Arc<StreamSocket>, CancellationToken)> {
    use anyhow::Context as _;
    let tls = crate::tls::tcp_client_config(trust)?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .with_context(|| format!("{server_name:?} is not a valid TLS server name"))?;
    let tcp = TcpStream::connect(addr).await.context("TCP connect")?;
    tune(&tcp, keepalive);
    let local = tcp.local_addr()?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    Ok(socket(stream, local, addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{self, Identity, Trust};

    /// A relay's TCP + TLS listener on loopback and the QUIC server config behind it.
    struct Relay {
        _dir: tempfile::TempDir,
        listener: tokio::net::TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        server: quinn::ServerConfig,
        trust: Trust,
    }

    fn test_transport() -> Arc<quinn::TransportConfig> {
        Arc::new(transport(quinn::TransportConfig::default()))
    }

    impl Relay {
        async fn listen() -> Relay {
            tls::install_crypto_provider();
            let dir = tempfile::tempdir().unwrap();
            let bundle = crate::cert::generate_bundle(dir.path(), "relay.test").unwrap();
            let identity = || Identity {
                chain: tls::load_certs(&bundle.relay_cert).unwrap(),
                key: tls::load_key(&bundle.relay_key).unwrap(),
            };
            let server =
                tls::server_config(identity(), &[tls::ALPN_AGENT], None, test_transport()).unwrap();
            Relay {
                listener: tokio::net::TcpListener::bind("127.120.0.1:0")
                    .await
                    .unwrap(),
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(
                    tls::tcp_server_config(identity()).unwrap(),
                )),
                server,
                trust: Trust::Ca(tls::load_certs(&bundle.ca).unwrap()),
                _dir: dir,
            }
        }

        /// Accepts one TCP + TLS connection: the relay's quinn endpoint over it.
        async fn accept(
            listener: tokio::net::TcpListener,
            acceptor: tokio_rustls::TlsAcceptor,
            server: quinn::ServerConfig,
        ) -> quinn::Endpoint {
            let (tcp, remote) = listener.accept().await.unwrap();
            let local = tcp.local_addr().unwrap();
            let stream = acceptor.accept(tcp).await.unwrap();
            let (socket, _gone) = super::socket(stream, local, remote);
            endpoint(socket, Some(server)).unwrap()
        }
    }

    /// Dials `addr` over TCP + TLS: the client's endpoint and its first QUIC connection.
    async fn dial(addr: SocketAddr, trust: &Trust) -> (quinn::Endpoint, quinn::Connection) {
        let (socket, _gone) = connect(addr, "relay.test", trust, Duration::from_secs(5))
            .await
            .unwrap();
        let mut endpoint = endpoint(socket, None).unwrap();
        endpoint.set_default_client_config(
            tls::client_config(trust, tls::ALPN_AGENT, None, test_transport()).unwrap(),
        );
        let conn = tokio::time::timeout(Duration::from_secs(5), async {
            endpoint.connect(addr, "relay.test").unwrap().await
        })
        .await
        .expect("handshake within 5 s")
        .unwrap();
        (endpoint, conn)
    }

    /// The relay's end of a TCP tunnel takes one QUIC connection: a second connection attempt over
    /// the same TCP connection (a client with a new connection ID) is not queued, and the first
    /// connection goes on carrying data.
    #[tokio::test]
    async fn a_tcp_connection_carries_one_quic_connection() {
        let Relay {
            _dir,
            listener,
            acceptor,
            server,
            trust,
        } = Relay::listen().await;
        let addr = listener.local_addr().unwrap();
        let relay = tokio::spawn(async move {
            let endpoint = Relay::accept(listener, acceptor, super::server(server)).await;
            let conn = accept_one(&endpoint).await.unwrap().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let data = recv.read_to_end(1 << 20).await.unwrap();
            send.write_all(&data).await.unwrap();
            send.finish().unwrap();
            // The client's second attempt went out before its data; quinn resends it until then.
            let queued = tokio::time::timeout(Duration::from_secs(1), endpoint.accept()).await;
            assert!(
                queued.is_err(),
                "a second connection attempt was queued on a TCP tunnel's endpoint"
            );
            let _ = conn.closed().await;
        });
        let (endpoint, conn) = dial(addr, &trust).await;
        let second = endpoint.connect(addr, "relay.test").unwrap();
        let second = tokio::spawn(tokio::time::timeout(Duration::from_millis(1500), second));
        tokio::task::yield_now().await;
        let data: Vec<u8> = (0..256 << 10).map(|i: u32| (i * 13 % 251) as u8).collect();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        let echo = recv.read_to_end(1 << 20).await.unwrap();
        assert!(echo == data, "echo differs");
        assert!(
            !matches!(second.await.unwrap(), Ok(Ok(_))),
            "a second QUIC connection was established over one TCP tunnel"
        );
        conn.close(0u32.into(), b"done");
        relay.await.unwrap();
    }

    /// A QUIC connection over TCP + TLS on loopback carries a stream both ways, byte-exact, with
    /// packets larger than a UDP path's.
    #[tokio::test]
    async fn quic_runs_over_tcp_and_tls() {
        let Relay {
            _dir,
            listener,
            acceptor,
            server,
            trust,
        } = Relay::listen().await;
        let addr = listener.local_addr().unwrap();
        let relay = tokio::spawn(async move {
            let endpoint = Relay::accept(listener, acceptor, server).await;
            let conn = endpoint.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let data = recv.read_to_end(8 << 20).await.unwrap();
            send.write_all(&data).await.unwrap();
            send.finish().unwrap();
            let _ = conn.closed().await;
        });
        let (_endpoint, conn) = dial(addr, &trust).await;
        let data: Vec<u8> = (0..4 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let (_, echo) = tokio::join!(
            async {
                send.write_all(&data).await.unwrap();
                send.finish().unwrap();
            },
            async { recv.read_to_end(8 << 20).await.unwrap() }
        );
        assert!(echo == data, "echo differs");
        assert!(conn.stats().path.current_mtu >= DATAGRAM / 2);
        conn.close(0u32.into(), b"done");
        relay.await.unwrap();
    }
}
