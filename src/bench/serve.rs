//! `postern bench serve`: the target of every bench load. A connection's first byte picks its mode:
//! * `E` echo: every byte back, until EOF;
//! * `S` sink: read to EOF, then answer the byte count (u64 big-endian) and close;
//! * `O` + u64 big-endian length: source, write that many bytes ([`UNLIMITED`]: until the client
//!   goes away), then close.

use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub const MODE_ECHO: u8 = b'E';
pub const MODE_SINK: u8 = b'S';
pub const MODE_SOURCE: u8 = b'O';
/// A source length meaning "until the client closes".
pub const UNLIMITED: u64 = u64::MAX;

/// Copy buffer per connection.
const BUFFER: usize = 256 * 1024;
/// Deadline for the mode byte (and a source's length), so idle sockets do not pile up.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves connections on `listen` until `shutdown`; prints `ready serve=ADDR` once bound.
pub async fn run(listen: SocketAddr, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!("ready serve={}", listener.local_addr()?);
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    serve(listener, shutdown).await;
    Ok(())
}

/// Accepts until `shutdown`, one task per connection; waits for none of them on the way out.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        tasks.spawn(async move {
            if let Err(err) = connection(tcp).await {
                tracing::debug!(%peer, %err, "bench connection ended with an error");
            }
        });
    }
}

async fn connection(mut tcp: TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    match tokio::time::timeout(HEADER_TIMEOUT, tcp.read(&mut mode)).await {
        Ok(Ok(0)) => return Ok(()),
        Ok(Ok(_)) => {}
        Ok(Err(err)) => return Err(err),
        Err(_) => return Ok(()),
    }
    match mode[0] {
        MODE_ECHO => echo(tcp).await,
        MODE_SINK => sink(tcp).await,
        MODE_SOURCE => {
            let mut length = [0u8; 8];
            match tokio::time::timeout(HEADER_TIMEOUT, tcp.read_exact(&mut length)).await {
                Ok(result) => result?,
                Err(_) => return Ok(()),
            };
            source(tcp, u64::from_be_bytes(length)).await
        }
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unknown mode byte {other:#04x}"),
        )),
    }
}

async fn echo(mut tcp: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return tcp.shutdown().await;
        }
        tcp.write_all(&buf[..n]).await?;
    }
}

async fn sink(mut tcp: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    let mut count = 0u64;
    loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        count += n as u64;
    }
    tcp.write_all(&count.to_be_bytes()).await?;
    tcp.shutdown().await
}

async fn source(mut tcp: TcpStream, length: u64) -> std::io::Result<()> {
    let buf = vec![0u8; BUFFER];
    let mut left = length;
    while left > 0 {
        let n = left.min(BUFFER as u64) as usize;
        // A client that has seen enough closes: the write fails and the source ends.
        let written = tcp.write(&buf[..n]).await?;
        if length != UNLIMITED {
            left -= written as u64;
        }
    }
    tcp.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn start() -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, stop.clone()));
        (addr, stop)
    }

    #[tokio::test]
    async fn echo_sink_and_source() {
        let (addr, stop) = start().await;

        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"Ehello").await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut back = Vec::new();
        tcp.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"hello");

        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"S").await.unwrap();
        tcp.write_all(&vec![7u8; 1_000_003]).await.unwrap();
        tcp.shutdown().await.unwrap();
        let mut count = Vec::new();
        tcp.read_to_end(&mut count).await.unwrap();
        assert_eq!(count, 1_000_003u64.to_be_bytes());

        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"O").await.unwrap();
        tcp.write_all(&777_777u64.to_be_bytes()).await.unwrap();
        let mut data = Vec::new();
        tcp.read_to_end(&mut data).await.unwrap();
        assert_eq!(data.len(), 777_777);

        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"O").await.unwrap();
        tcp.write_all(&UNLIMITED.to_be_bytes()).await.unwrap();
        let mut some = vec![0u8; 3 * BUFFER];
        tcp.read_exact(&mut some).await.unwrap();
        drop(tcp);
        stop.cancel();
    }
}
