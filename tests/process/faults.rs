//! Faults a test injects for real, and the services it needs to see them: a UDP and TCP forwarder
//! that can stop everything between two processes (a blackholed path), a service that writes without
//! end (for clients that stop reading), and a restart of a relay on the UDP port it had.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UdpSocket};

use super::{payload, Proc, BIN};

/// A service that writes an endless byte pattern to every connection and counts what the kernel
/// took from it: once every client stopped reading, the count stops growing.
pub struct Source {
    pub addr: SocketAddr,
    pub written: Arc<AtomicU64>,
}

impl Source {
    pub async fn start(ip: Ipv4Addr) -> Source {
        Self::serve(ip, false).await
    }

    /// The same as an HTTP/1.1 server: each connection's request head is read, then answered with
    /// a `200` whose body never ends.
    pub async fn start_http(ip: Ipv4Addr) -> Source {
        Self::serve(ip, true).await
    }

    async fn serve(ip: Ipv4Addr, http: bool) -> Source {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let count = written.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    if http {
                        use tokio::io::AsyncReadExt;
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match tcp.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let response = "HTTP/1.1 200 OK\r\ncontent-length: 1000000000000\r\n\r\n";
                        if tcp.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    let block = payload(64 * 1024, 7);
                    while let Ok(n) = tcp.write(&block).await {
                        count.fetch_add(n as u64, Ordering::Relaxed);
                    }
                });
            }
        });
        Source { addr, written }
    }
}

/// A UDP (and TCP, on the same port) forwarder between an agent and one relay that the test can
/// tell to drop everything, both ways: a cut agent↔relay path while both processes stay up. Each agent source address gets an
/// upstream socket of its own, so the relay sees one 5-tuple per agent socket.
pub struct Cuttable {
    pub addr: SocketAddr,
    pub cut: Arc<AtomicBool>,
    /// When each QUIC Initial packet arrived at the front, with its destination connection ID:
    /// one ID per handshake attempted through the forwarder.
    pub initials: Initials,
}

pub type Initials = Arc<std::sync::Mutex<Vec<(Instant, Vec<u8>)>>>;

impl Cuttable {
    pub async fn start(upstream: SocketAddr) -> Cuttable {
        // The same port over TCP forwards to the relay's TCP tunnel listener (by default on the
        // relay's UDP address and port), so agents on `tunnel = "tcp"` go through it too.
        let (front, tcp_front) = {
            let mut tries = 0;
            loop {
                let front = UdpSocket::bind((upstream.ip(), 0)).await.unwrap();
                let port = front.local_addr().unwrap().port();
                match TcpListener::bind((upstream.ip(), port)).await {
                    Ok(tcp) => break (Arc::new(front), tcp),
                    Err(err) => {
                        tries += 1;
                        assert!(tries < 20, "no port free over both UDP and TCP: {err}");
                    }
                }
            }
        };
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        tokio::spawn(forward_tcp(tcp_front, upstream, cut.clone()));
        let drop_all = cut.clone();
        let initials: Initials = Arc::default();
        let seen = initials.clone();
        tokio::spawn(async move {
            let mut sides: std::collections::HashMap<SocketAddr, Arc<UdpSocket>> =
                std::collections::HashMap::new();
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                if let Some(dcid) = quic_initial_dcid(&buf[..n]) {
                    seen.lock().unwrap().push((Instant::now(), dcid));
                }
                if drop_all.load(Ordering::Relaxed) {
                    continue;
                }
                let side = match sides.get(&from) {
                    Some(side) => side.clone(),
                    None => {
                        let Ok(side) = UdpSocket::bind((upstream.ip(), 0)).await else {
                            continue;
                        };
                        if side.connect(upstream).await.is_err() {
                            continue;
                        }
                        let side = Arc::new(side);
                        sides.insert(from, side.clone());
                        let (back, front, drop_all) =
                            (side.clone(), front.clone(), drop_all.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            while let Ok(n) = back.recv(&mut buf).await {
                                if !drop_all.load(Ordering::Relaxed) {
                                    let _ = front.send_to(&buf[..n], from).await;
                                }
                            }
                        });
                        side
                    }
                };
                let _ = side.send(&buf[..n]).await;
            }
        });
        Cuttable {
            addr,
            cut,
            initials,
        }
    }

    /// When each handshake (distinct Initial destination connection ID) that began at or after
    /// `since` began, counted from `since`.
    pub fn handshakes_since(&self, since: Instant) -> Vec<Duration> {
        let initials = self.initials.lock().unwrap();
        let mut ids = std::collections::HashSet::new();
        initials
            .iter()
            .filter(|(at, id)| *at >= since && ids.insert(id.clone()))
            .map(|(at, _)| *at - since)
            .collect()
    }
}

/// Forwards TCP connections from `front` to `upstream`; while `cut`, neither direction moves a
/// byte (data waits in the socket buffers, as behind a blackhole), and it moves on once healed.
async fn forward_tcp(front: TcpListener, upstream: SocketAddr, cut: Arc<AtomicBool>) {
    use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite};
    async fn pipe(
        mut from: impl AsyncRead + Unpin,
        mut to: impl AsyncWrite + Unpin,
        cut: Arc<AtomicBool>,
    ) {
        let healed = || async {
            while cut.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            healed().await;
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            healed().await;
            if to.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    }
    while let Ok((client, _)) = front.accept().await {
        let cut = cut.clone();
        tokio::spawn(async move {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                return;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::join!(pipe(cr, sw, cut.clone()), pipe(sr, cw, cut));
        });
    }
}

/// The destination connection ID of a datagram that starts with a QUIC v1 Initial packet (long
/// header, type 0, non-zero version), which stays the same across a client's retransmissions.
pub fn quic_initial_dcid(datagram: &[u8]) -> Option<Vec<u8>> {
    let first = *datagram.first()?;
    let version = datagram.get(1..5)?;
    if first & 0xc0 != 0xc0 || (first >> 4) & 0x03 != 0 || version == [0, 0, 0, 0] {
        return None;
    }
    let len = *datagram.get(5)? as usize;
    datagram.get(6..6 + len).map(<[u8]>::to_vec)
}

/// Starts a relay (or server) again on the fixed UDP port it had; returns it and its `ready` line. Until it is back, other processes' dial
/// sockets bind ephemeral ports from the same range, and one may hold that port for a moment; a
/// start that fails to bind is retried, a bounded number of times.
pub async fn restart_on_its_port(
    name: &str,
    role: &str,
    config: &std::path::Path,
    log: &std::path::Path,
    env: &[(&str, &str)],
) -> (Proc, String) {
    use tokio::io::AsyncBufReadExt as _;
    let config = config.to_str().unwrap();
    for _ in 0..10 {
        let mut proc = Proc::spawn(name, BIN, &[role, "--config", config], env, log);
        let stdout = proc.child.stdout.take().expect("stdout piped");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        if let Ok(Ok(Some(line))) = tokio::time::timeout(super::STARTUP, lines.next_line()).await {
            if line.starts_with("ready ") {
                // Keep draining stdout so the child never blocks on a full pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                return (proc, line);
            }
        }
        let _ = proc.child.wait().await;
        assert!(
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .contains("Address already in use"),
            "{name} did not start, and not for a taken port"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("{name}: its port stayed taken");
}
