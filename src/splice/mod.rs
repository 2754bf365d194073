//! Moves bytes between a TCP connection and a QUIC stream, both ways at once, carrying half-closes
//! across: TCP EOF → QUIC FIN and QUIC FIN → TCP `shutdown(Write)`. A failure on either side aborts
//! both (QUIC reset, TCP RST), so a truncated transfer never looks like a clean end to anyone.
//!
//! No splice may hold its connection hostage: QUIC returns connection-level credit only when data
//! is read, so a stream whose writer cannot move its bytes (a client that stopped reading) pins a
//! stream window of its connection's shared window for as long as it lives. Every splice
//! therefore runs under [`Limits`]: a writer that moves nothing for `stall_timeout` while data
//! waits, or a splice that moves nothing either way for `idle_timeout`, is reset (and counted in
//! `postern_stream_resets_total`); one client may have only so many stalled streams at once, so
//! its stalls alone never exhaust a connection's window; spliced TCP sockets carry keep-alives.

use std::io::{self, IoSlice};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes};
use prometheus_client::metrics::counter::Counter;

use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::close;

mod limits;

use limits::watched;
pub use limits::{configure, limits, Limits, STALL_GRACE};
pub(crate) use limits::{Watch, DOWN, UP};

/// First read size into a QUIC stream; large enough to fill QUIC packets in batches. Reads then
/// adapt between [`MIN_READ`] and [`MAX_READ`] ([`next_read_size`]). Reads of 256 KiB moved
/// neither throughput nor the agent's CPU per GB (docs/performance.md), so bulk stays at 64 KiB.
const BUFFER: usize = 64 * 1024;
const MIN_READ: usize = 4 * 1024;
const MAX_READ: usize = BUFFER;

/// Received chunks taken from quinn at once. A chunk is one STREAM frame (at most one packet's
/// payload, ~1.4 KB), so writing chunk by chunk would cost a system call per packet; a batch goes
/// out in one vectored write (up to ~45 KB), or one relayed `write_chunks`.
const BATCH: usize = 32;

/// Bytes moved by a finished splice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// TCP → QUIC.
    pub up: u64,
    /// QUIC → TCP.
    pub down: u64,
}

/// Bytes a splice has moved so far, counted as they move: readable while it runs and after it
/// failed (a transfer cut by a relay's death still reports what reached the client), and added to
/// process-wide counters at the same time when it is given them.
#[derive(Debug, Default)]
pub struct Progress {
    up: AtomicU64,
    down: AtomicU64,
    totals: Option<(Counter, Counter)>,
    /// The client whose stalls count against its budget ([`Limits::stalled_per_client`]).
    client: Option<IpAddr>,
}

impl Progress {
    /// A meter that also adds every byte to `up_total` / `down_total` as it moves.
    pub fn counting_into(up_total: Counter, down_total: Counter) -> Self {
        Progress {
            totals: Some((up_total, down_total)),
            ..Progress::default()
        }
    }

    /// This meter's splice belongs to `client`: while its writer stalls it holds one of the
    /// client's [`Limits::stalled_per_client`] stall slots.
    pub fn for_client(mut self, client: IpAddr) -> Self {
        self.client = Some(client);
        self
    }

    pub fn add_up(&self, n: u64) {
        self.up.fetch_add(n, Ordering::Relaxed);
        if let Some((up, _)) = &self.totals {
            up.inc_by(n);
        }
    }

    pub fn add_down(&self, n: u64) {
        self.down.fetch_add(n, Ordering::Relaxed);
        if let Some((_, down)) = &self.totals {
            down.inc_by(n);
        }
    }

    /// What has moved so far.
    pub fn transferred(&self) -> Transferred {
        Transferred {
            up: self.up.load(Ordering::Relaxed),
            down: self.down.load(Ordering::Relaxed),
        }
    }
}

/// Turns on TCP keep-alive, so a peer that vanished without a FIN or RST is noticed.
pub(crate) fn keepalive(tcp: socket2::SockRef<'_>, idle: Duration) {
    let params = socket2::TcpKeepalive::new().with_time(idle);
    // Probes every sixth of the idle time; the system's probe count (9 on Linux) ends it.
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
    let params = params.with_interval((idle / 6).max(Duration::from_secs(1)));
    let _ = tcp.set_tcp_keepalive(&params);
}

/// Splices `tcp` with the stream pair until both directions have ended.
pub async fn splice(tcp: TcpStream, send: SendStream, recv: RecvStream) -> io::Result<Transferred> {
    splice_metered(tcp, send, recv, &Progress::default()).await
}

/// [`splice`], counting bytes into `progress` as they are delivered.
pub async fn splice_metered(
    tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    progress: &Progress,
) -> io::Result<Transferred> {
    // Small writes (request/response protocols) must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let limits = limits();
    keepalive(socket2::SockRef::from(&tcp), limits.tcp_keepalive);
    let watch = Watch::with_sink(progress.client, &tcp);
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let up = to_quic(&mut tcp_read, &mut send, &watch, UP, |n| progress.add_up(n));
    let down = from_quic(&mut recv, &mut tcp_write, &watch, DOWN, |n| {
        progress.add_down(n)
    });
    let result = watched(&watch, limits, async { tokio::try_join!(up, down) }).await;
    match result {
        Ok(t) => Ok(t),
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
    watch: &Watch,
    lane: usize,
    moved: impl Fn(u64),
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut want = BUFFER;
    let mut buf = bytes::BytesMut::with_capacity(want);
    loop {
        buf.reserve(want);
        let offered = buf.capacity() - buf.len();
        let n = from.read_buf(&mut buf).await?;
        want = next_read_size(want, offered, n);
        if n == 0 {
            // The stream may already be reset by the peer; then there is nothing left to finish.
            let _ = send.finish();
            delivered(send).await;
            return Ok(total);
        }
        // Written piece by piece as the peer grants credit: a slow reader is progress, not a stall.
        let mut chunk = buf.split().freeze();
        watch.waiting(lane);
        loop {
            send.write_chunks(std::slice::from_mut(&mut chunk))
                .await
                .map_err(io::Error::from)?;
            if chunk.is_empty() {
                break;
            }
            watch.progressed(lane);
        }
        watch.moved(lane);
        total += n as u64;
        moved(n as u64);
    }
}

/// The space to ask for before the next read: half as much after a read that used less than a
/// quarter of what it was offered, twice as much after one that filled it. A chunk quinn holds
/// until it is acknowledged keeps its whole allocation alive; asking for little after small reads
/// lets the next reads fill the rest of the current allocation instead of starting a new one each
/// time, so a stream of small writes shares one buffer rather than pinning 64 KiB per chunk.
fn next_read_size(want: usize, offered: usize, read: usize) -> usize {
    if read >= offered {
        (want * 2).min(MAX_READ)
    } else if read < offered / 4 {
        (want / 2).max(MIN_READ)
    } else {
        want
    }
}

/// Copies a QUIC stream into a byte stream until FIN, then shuts the byte stream's write side.
/// Whatever quinn holds is taken in one batch of chunks (no copy) and written with one vectored
/// write where the writer supports it; otherwise the batch is gathered into one buffer first.
async fn from_quic<W: tokio::io::AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    to: &mut W,
    watch: &Watch,
    lane: usize,
    moved: impl Fn(u64),
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut chunks: [Bytes; BATCH] = std::array::from_fn(|_| Bytes::new());
    let mut gathered = Vec::new();
    while let Some(n) = recv
        .read_chunks(&mut chunks)
        .await
        .map_err(io::Error::from)?
    {
        let batch = &mut chunks[..n];
        let len = batch.iter().map(|c| c.len() as u64).sum::<u64>();
        watch.waiting(lane);
        let mut progressed = || watch.progressed(lane);
        if to.is_write_vectored() {
            write_all_vectored(to, batch, &mut progressed).await?;
        } else {
            gathered.clear();
            for chunk in batch.iter() {
                gathered.extend_from_slice(chunk);
            }
            let mut at = 0;
            while at < gathered.len() {
                let n = to.write(&gathered[at..]).await?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                at += n;
                progressed();
            }
        }
        watch.moved(lane);
        // Counted once written: what the client has been given, not what arrived.
        total += len;
        moved(len);
        // Release the receive buffers the chunks point into before waiting for more.
        batch.fill(Bytes::new());
    }
    to.shutdown().await?;
    Ok(total)
}

/// Writes every byte of `chunks` with vectored writes, consuming the chunks; `progressed` is
/// called after every write that left some behind.
async fn write_all_vectored<W: tokio::io::AsyncWrite + Unpin>(
    to: &mut W,
    chunks: &mut [Bytes],
    progressed: &mut impl FnMut(),
) -> io::Result<()> {
    let mut first = 0;
    loop {
        while first < chunks.len() && chunks[first].is_empty() {
            first += 1;
        }
        if first == chunks.len() {
            return Ok(());
        }
        let mut written = {
            let mut slices = [IoSlice::new(&[]); BATCH];
            let count = (chunks.len() - first).min(BATCH);
            for (slice, chunk) in slices.iter_mut().zip(&chunks[first..first + count]) {
                *slice = IoSlice::new(chunk);
            }
            to.write_vectored(&slices[..count]).await?
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while first < chunks.len() && written >= chunks[first].len() {
            written -= chunks[first].len();
            first += 1;
        }
        if written > 0 {
            chunks[first].advance(written);
        }
        progressed();
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
pub async fn splice_io<S>(io: S, send: SendStream, recv: RecvStream) -> io::Result<Transferred>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    splice_io_metered(io, send, recv, &Progress::default()).await
}

/// [`splice_io`], counting bytes into `progress` as they are delivered.
pub async fn splice_io_metered<S>(
    io: S,
    mut send: SendStream,
    mut recv: RecvStream,
    progress: &Progress,
) -> io::Result<Transferred>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let limits = limits();
    let watch = Watch::new(progress.client);
    let (mut io_read, mut io_write) = tokio::io::split(io);
    let up = to_quic(&mut io_read, &mut send, &watch, UP, |n| progress.add_up(n));
    let down = from_quic(&mut recv, &mut io_write, &watch, DOWN, |n| {
        progress.add_down(n)
    });
    match watched(&watch, limits, async { tokio::try_join!(up, down) }).await {
        Ok(t) => Ok(t),
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

/// Splices two QUIC stream pairs (a peer's stream with an agent's),
/// carrying FIN both ways; a reset or error on either side resets both.
pub async fn splice_quic(
    a: (SendStream, RecvStream),
    b: (SendStream, RecvStream),
) -> io::Result<Transferred> {
    let (mut a_send, mut a_recv) = a;
    let (mut b_send, mut b_recv) = b;
    // Received chunks are one frame each (~1.4 KB); handed on as they are, they would sit in the
    // sending stream's buffer as thousands of segments, which quinn walks from the start for every
    // frame it sends. `to_quic` gathers what is there into one buffer per write instead.
    let limits = limits();
    let watch = Watch::new(None);
    let result = watched(&watch, limits, async {
        tokio::try_join!(
            to_quic(&mut a_recv, &mut b_send, &watch, UP, |_| {}),
            to_quic(&mut b_recv, &mut a_send, &watch, DOWN, |_| {})
        )
    })
    .await;
    match result {
        Ok(t) => Ok(t),
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

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;

    /// A writer that takes at most `limit` bytes per call, vectored or not.
    struct Trickle {
        out: Vec<u8>,
        limit: usize,
        calls: usize,
    }

    impl tokio::io::AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.limit);
            self.out.extend_from_slice(&buf[..n]);
            self.calls += 1;
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut left = self.limit;
            for buf in bufs {
                let n = buf.len().min(left);
                self.out.extend_from_slice(&buf[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            self.calls += 1;
            Poll::Ready(Ok(self.limit - left))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn read_size_grows_for_bulk_and_shrinks_for_small_writes() {
        let mut want = BUFFER;
        for _ in 0..10 {
            want = next_read_size(want, want, want);
        }
        assert_eq!(want, MAX_READ, "full reads double up to the cap");
        for _ in 0..20 {
            want = next_read_size(want, want, 100);
        }
        assert_eq!(want, MIN_READ, "small reads halve down to the floor");
        assert_eq!(
            next_read_size(BUFFER, BUFFER, BUFFER / 2),
            BUFFER,
            "in between: unchanged"
        );
    }

    #[tokio::test]
    async fn vectored_writes_survive_partial_writes_at_every_boundary() {
        let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
        // Chunks of uneven sizes, one empty, more of them than one batch holds.
        let sizes = [1usize, 1399, 0, 1452, 7, 3000, 1, 0, 0];
        for limit in [1usize, 2, 1000, 1452, 5000, 100_000] {
            let mut chunks = Vec::new();
            let mut at = 0;
            let mut i = 0;
            while at < data.len() {
                let n = sizes[i % sizes.len()].min(data.len() - at);
                chunks.push(Bytes::copy_from_slice(&data[at..at + n]));
                at += n;
                i += 1;
            }
            let mut writer = Trickle {
                out: Vec::new(),
                limit,
                calls: 0,
            };
            for batch in chunks.chunks_mut(BATCH) {
                write_all_vectored(&mut writer, batch, &mut || {})
                    .await
                    .unwrap();
            }
            assert_eq!(writer.out, data, "limit {limit}");
            if limit == 100_000 {
                // Nothing held back: one call per batch.
                assert_eq!(writer.calls, chunks.len().div_ceil(BATCH));
            }
        }
    }
}
