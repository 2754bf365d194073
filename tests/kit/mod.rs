//! The small kit every in-process suite (tests/core.rs, tests/security) uses: per-test set-up,
//! deadlines for waiting on a condition (never a bare sleep), a guard for background tasks, and a
//! raw SOCKS5 client (RFC 1928 / 1929) that exposes the exact bytes the gateway sends.
#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use postern::agent::{Agent, AgentHandle};
use postern::config::AgentConfig;

/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(10);
/// Upper bound for anything that should be quick on loopback (a route appearing, a tunnel coming up).
pub const READY: Duration = Duration::from_secs(15);
/// Upper bound for one exchange through the gateway.
pub const IO: Duration = Duration::from_secs(15);

/// Per-test set-up: the crypto provider (idempotent) and logs routed to the test's captured output
/// (`RUST_LOG=postern=debug cargo test` to see them).
pub fn init() {
    postern::tls::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Awaits `fut`, failing the test if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not done within {limit:?}"),
    }
}

/// Polls `cond` until it holds, failing the test after `limit`.
pub async fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not true within {limit:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `cond` for the whole `window`, failing the test the moment it does not hold.
pub async fn holds_for(window: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + window;
    while Instant::now() < deadline {
        assert!(cond(), "{what}: stopped holding");
        tokio::time::sleep(POLL).await;
    }
    assert!(cond(), "{what}: stopped holding");
}

/// Aborts a background task when dropped, so a failing test leaves nothing behind.
pub struct AbortOnDrop<T>(pub JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Asserts nothing but our own probe ever reached the listener at `addr`, whose accept loop counts
/// into `accepted`. The probe is accepted after any connection queued before it (the accept queue
/// is FIFO), so "only the probe" is a real "never dialled", not a race with the accept task.
pub async fn assert_only_probe(addr: SocketAddr, accepted: &Arc<AtomicUsize>, what: &str) {
    let before = accepted.load(Ordering::SeqCst);
    let probe = within(IO, "probe connect", TcpStream::connect(addr))
        .await
        .expect("probe connects");
    wait_until(IO, "probe accepted", || {
        accepted.load(Ordering::SeqCst) > before
    })
    .await;
    drop(probe);
    assert_eq!(before, 0, "{what}: the target at {addr} was dialled");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "{what}: the target at {addr} was dialled"
    );
}

/// An agent running in a task of this process; stopped when dropped.
pub struct TestAgent {
    pub handle: AgentHandle,
    shutdown: CancellationToken,
    _task: AbortOnDrop<anyhow::Result<()>>,
}

impl TestAgent {
    pub fn start(config: AgentConfig) -> Self {
        let agent = Agent::new(config).expect("agent config");
        let handle = agent.handle();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(agent.run(shutdown.clone()));
        TestAgent {
            handle,
            shutdown,
            _task: AbortOnDrop(task),
        }
    }

    /// Waits until the agent has its first tunnel.
    pub async fn wait_up(&mut self) {
        within(READY, "agent tunnel up", self.handle.wait_tunnels(1)).await;
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

// ---------------------------------------------------------------------------------------------
// A raw SOCKS5 client.

/// Where a SOCKS5 CONNECT asks to go.
#[derive(Clone, Debug)]
pub enum Dest {
    Ip(SocketAddr),
    Name(String, u16),
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::Ip(a) => write!(f, "{a}"),
            Dest::Name(n, p) => write!(f, "{n}:{p}"),
        }
    }
}

/// What the client offers.
#[derive(Clone, Copy, Debug)]
pub enum Auth<'a> {
    /// Offer "no authentication" only.
    None,
    /// Offer username/password only.
    Password(&'a str, &'a str),
    /// Offer both (as curl and PySocks do when given credentials), and send these if asked.
    Either(&'a str, &'a str),
}

#[derive(Debug)]
pub enum SocksError {
    Io(io::Error),
    /// The server accepted none of the offered methods (0xFF).
    NoAcceptableMethod,
    /// Username/password sub-negotiation failed with this status.
    AuthFailed(u8),
    /// The CONNECT reply was not "succeeded": the RFC 1928 REP byte.
    Reply(u8),
    Protocol(String),
}

impl From<io::Error> for SocksError {
    fn from(e: io::Error) -> Self {
        SocksError::Io(e)
    }
}

/// Runs the SOCKS5 handshake and CONNECT to `dest` on an open connection. The whole reply is read
/// (bound address included) before its REP byte is judged.
pub async fn socks5_handshake(
    tcp: &mut TcpStream,
    dest: &Dest,
    auth: Auth<'_>,
) -> Result<(), SocksError> {
    let offer: &[u8] = match auth {
        Auth::None => &[0x00],
        Auth::Password(..) => &[0x02],
        Auth::Either(..) => &[0x00, 0x02],
    };
    let mut greeting = vec![5, offer.len() as u8];
    greeting.extend_from_slice(offer);
    tcp.write_all(&greeting).await?;
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice).await?;
    if choice[0] != 5 {
        return Err(SocksError::Protocol(format!("version {}", choice[0])));
    }
    match (choice[1], auth) {
        (0xFF, _) => return Err(SocksError::NoAcceptableMethod),
        (0x00, Auth::None | Auth::Either(..)) => {}
        (0x02, Auth::Password(user, password) | Auth::Either(user, password)) => {
            let mut msg = vec![1, user.len() as u8];
            msg.extend_from_slice(user.as_bytes());
            msg.push(password.len() as u8);
            msg.extend_from_slice(password.as_bytes());
            tcp.write_all(&msg).await?;
            let mut status = [0u8; 2];
            tcp.read_exact(&mut status).await?;
            if status[1] != 0 {
                return Err(SocksError::AuthFailed(status[1]));
            }
        }
        (m, _) => {
            return Err(SocksError::Protocol(format!(
                "server chose method {m:#x}, which was not offered"
            )))
        }
    }
    let mut request = vec![5, 1, 0];
    match dest {
        Dest::Ip(SocketAddr::V4(a)) => {
            request.push(1);
            request.extend_from_slice(&a.ip().octets());
            request.extend_from_slice(&a.port().to_be_bytes());
        }
        Dest::Ip(SocketAddr::V6(a)) => {
            request.push(4);
            request.extend_from_slice(&a.ip().octets());
            request.extend_from_slice(&a.port().to_be_bytes());
        }
        Dest::Name(name, port) => {
            request.push(3);
            request.push(name.len() as u8);
            request.extend_from_slice(name.as_bytes());
            request.extend_from_slice(&port.to_be_bytes());
        }
    }
    tcp.write_all(&request).await?;
    let mut head = [0u8; 4];
    tcp.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(SocksError::Protocol(format!("reply version {}", head[0])));
    }
    let addr_len = match head[3] {
        1 => 4,
        4 => 16,
        3 => {
            let mut l = [0u8; 1];
            tcp.read_exact(&mut l).await?;
            l[0] as usize
        }
        t => return Err(SocksError::Protocol(format!("address type {t}"))),
    };
    let mut rest = vec![0u8; addr_len + 2];
    tcp.read_exact(&mut rest).await?;
    if head[1] != 0 {
        return Err(SocksError::Reply(head[1]));
    }
    Ok(())
}
