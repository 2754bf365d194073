//! Moves bytes between a TCP connection and a QUIC stream, both ways at once, carrying half-closes
//! across: TCP EOF → QUIC FIN and QUIC FIN → TCP `shutdown(Write)`. A failure on either side aborts
//! both (QUIC reset, TCP RST), so a truncated transfer never looks like a clean end to anyone.

use std::io;
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::close;

/// Copy buffer per direction; large enough to fill QUIC packets in batches.
const BUFFER: usize = 64 * 1024;

/// Bytes moved by a finished splice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// TCP → QUIC.
    pub up: u64,
    /// QUIC → TCP.
    pub down: u64,
}

/// Splices `tcp` with the stream pair until both directions have ended.
pub async fn splice(
    tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
) -> io::Result<Transferred> {
    // Small writes (request/response protocols) must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let up = to_quic(&mut tcp_read, &mut send);
    let down = async {
        let mut total = 0u64;
        loop {
            match recv
                .read_chunk(BUFFER, true)
                .await
                .map_err(io::Error::from)?
            {
                Some(chunk) => {
                    tcp_write.write_all(&chunk.bytes).await?;
                    total += chunk.bytes.len() as u64;
                }
                None => {
                    tcp_write.shutdown().await?;
                    return Ok::<u64, io::Error>(total);
                }
            }
        }
    };
    let result = tokio::try_join!(up, down);
    match result {
        Ok((up, down)) => Ok(Transferred { up, down }),
        Err(err) => {
            let code = quinn::VarInt::from_u32(close::STREAM_ABORTED);
            let _ = send.reset(code);
            let _ = recv.stop(code);
            if let Ok(tcp) = tcp_read.reunite(tcp_write) {
                abort(tcp);
            }
            Err(err)
        }
    }
}

/// Copies a byte stream into a QUIC stream until EOF, then finishes the stream and waits for its
/// delivery. Each read lands in its own buffer that is handed to quinn as is (`write_chunk`), so
/// the payload is not copied a second time on its way into the connection.
async fn to_quic<R: tokio::io::AsyncRead + Unpin>(
    from: &mut R,
    send: &mut SendStream,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut buf = bytes::BytesMut::with_capacity(BUFFER);
    loop {
        buf.reserve(BUFFER);
        let n = from.read_buf(&mut buf).await?;
        if n == 0 {
            // The stream may already be reset by the peer; then there is nothing left to finish.
            let _ = send.finish();
            delivered(send).await;
            return Ok(total);
        }
        send.write_chunk(buf.split().freeze())
            .await
            .map_err(io::Error::from)?;
        total += n as u64;
    }
}

/// Waits (bounded) until the peer has acknowledged everything written to a finished stream. Closing
/// a QUIC connection discards unacknowledged data, so whoever closes a tunnel (a draining relay, an
/// agent winding down) must not count a stream done before this.
async fn delivered(send: &mut SendStream) {
    const LIMIT: Duration = Duration::from_secs(10);
    let _ = tokio::time::timeout(LIMIT, send.stopped()).await;
}

/// Splices any byte stream (an upgraded HTTP connection) with a stream pair; like [`splice`], but
/// on failure the stream is simply dropped.
pub async fn splice_io<S>(
    io: S,
    mut send: SendStream,
    mut recv: RecvStream,
) -> io::Result<Transferred>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut io_read, mut io_write) = tokio::io::split(io);
    let up = to_quic(&mut io_read, &mut send);
    let down = async {
        let mut total = 0u64;
        while let Some(chunk) = recv
            .read_chunk(BUFFER, true)
            .await
            .map_err(io::Error::from)?
        {
            io_write.write_all(&chunk.bytes).await?;
            total += chunk.bytes.len() as u64;
        }
        io_write.shutdown().await?;
        Ok::<u64, io::Error>(total)
    };
    match tokio::try_join!(up, down) {
        Ok((up, down)) => Ok(Transferred { up, down }),
        Err(err) => {
            let code = quinn::VarInt::from_u32(close::STREAM_ABORTED);
            let _ = send.reset(code);
            let _ = recv.stop(code);
            Err(err)
        }
    }
}

/// Closes `tcp` with a RST instead of a FIN, so the peer sees an error rather than a clean end.
pub fn abort(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

/// Splices two QUIC stream pairs (a peer's stream with an agent's), chunk by chunk without copying,
/// carrying FIN both ways; a reset or error on either side resets both.
pub async fn splice_quic(
    a: (SendStream, RecvStream),
    b: (SendStream, RecvStream),
) -> io::Result<Transferred> {
    let (mut a_send, mut a_recv) = a;
    let (mut b_send, mut b_recv) = b;
    async fn pump(from: &mut RecvStream, to: &mut SendStream) -> io::Result<u64> {
        let mut total = 0u64;
        while let Some(chunk) = from
            .read_chunk(BUFFER, true)
            .await
            .map_err(io::Error::from)?
        {
            total += chunk.bytes.len() as u64;
            to.write_chunk(chunk.bytes).await.map_err(io::Error::from)?;
        }
        let _ = to.finish();
        delivered(to).await;
        Ok(total)
    }
    let result = tokio::try_join!(
        pump(&mut a_recv, &mut b_send),
        pump(&mut b_recv, &mut a_send)
    );
    match result {
        Ok((up, down)) => Ok(Transferred { up, down }),
        Err(err) => {
            let code = quinn::VarInt::from_u32(close::STREAM_ABORTED);
            for send in [&mut a_send, &mut b_send] {
                let _ = send.reset(code);
            }
            for recv in [&mut a_recv, &mut b_recv] {
                let _ = recv.stop(code);
            }
            Err(err)
        }
    }
}
