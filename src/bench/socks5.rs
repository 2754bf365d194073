//! `postern bench socks5`: a plain SOCKS5 proxy (no authentication, CONNECT to IP addresses, no
//! tunnel), the baseline that separates what SOCKS5 itself costs a new connection from what
//! postern's tunnel adds. It speaks the protocol with fast-socks5, as postern's gateway does, and
//! dials the target itself.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use fast_socks5::server::Socks5ServerProtocol;
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{ReplyError, Socks5Command};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Deadline for a client's handshake and for dialling its target.
const DEADLINE: Duration = Duration::from_secs(10);

/// Proxies on `listen` until `shutdown`; prints `ready socks5=ADDR` once bound.
pub async fn run(listen: SocketAddr, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!("ready socks5={}", listener.local_addr()?);
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let tasks = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        tasks.spawn(async move {
            if let Err(err) = proxy(tcp).await {
                tracing::debug!(%peer, %err, "socks5 connection ended with an error");
            }
        });
    }
}

/// One client: handshake, dial, reply, then bytes both ways until both sides are done.
async fn proxy(client: TcpStream) -> anyhow::Result<()> {
    let _ = client.set_nodelay(true);
    // As in the gateway: the handshake is read through a small buffer, replies pass straight out.
    let buffered = tokio::io::BufReader::with_capacity(1024, client);
    let handshake = async {
        let proto = Socks5ServerProtocol::accept_no_auth(buffered).await?;
        proto.read_command().await
    };
    let (proto, cmd, target) = tokio::time::timeout(DEADLINE, handshake)
        .await
        .context("handshake timed out")??;
    let target = match (cmd, target) {
        (Socks5Command::TCPConnect, TargetAddr::Ip(addr)) => addr,
        (Socks5Command::TCPConnect, TargetAddr::Domain(..)) => {
            proto
                .reply_error(&ReplyError::AddressTypeNotSupported)
                .await?;
            anyhow::bail!("names are not resolved here");
        }
        (cmd, _) => {
            proto.reply_error(&ReplyError::CommandNotSupported).await?;
            anyhow::bail!("command {cmd:?} not supported");
        }
    };
    let mut upstream = match tokio::time::timeout(DEADLINE, TcpStream::connect(target)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(err)) => {
            proto.reply_error(&ReplyError::ConnectionRefused).await?;
            return Err(err).with_context(|| format!("dialling {target}"));
        }
        Err(_) => {
            proto.reply_error(&ReplyError::TtlExpired).await?;
            anyhow::bail!("dialling {target} timed out");
        }
    };
    let _ = upstream.set_nodelay(true);
    let bound = upstream.local_addr()?;
    let buffered = proto.reply_success(bound).await?;
    // Bytes the client sent right behind its request are already in the buffer: they go first.
    let early = buffered.buffer().to_vec();
    let mut client = buffered.into_inner();
    upstream.write_all(&early).await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}
