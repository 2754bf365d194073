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

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use prometheus_client::metrics::counter::Counter;

use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::close;

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

/// Deadlines and socket options of every splice in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A writer that has moved nothing for this long while data waits is reset.
    pub stall_timeout: Duration,
    /// A splice that has moved nothing either way for this long is reset.
    pub idle_timeout: Duration,
    /// TCP keep-alive idle time of spliced TCP sockets.
    pub tcp_keepalive: Duration,
    /// How many of one client's connections may stall at once. A stalled stream pins up to one
    /// stream window of its QUIC connection's window; the roles set this to half as many stream
    /// windows as the connection window holds, so no one client can exhaust a connection. A
    /// stream whose writer has waited [`STALL_GRACE`] while its client already holds this many
    /// stalls is reset at once.
    pub stalled_per_client: usize,
}

/// How long a writer may wait before its splice counts as stalled against its client's budget.
pub const STALL_GRACE: Duration = Duration::from_secs(1);

/// Stalled splices per client, process-wide.
static STALLS: LazyLock<Mutex<HashMap<IpAddr, usize>>> = LazyLock::new(Default::default);

/// One of a client's stall slots, given back on drop.
struct StallSlot(IpAddr);

impl StallSlot {
    fn claim(client: IpAddr, limit: usize) -> Option<StallSlot> {
        let mut stalls = STALLS.lock().unwrap_or_else(|e| e.into_inner());
        let held = stalls.entry(client).or_insert(0);
        if *held >= limit {
            return None;
        }
        *held += 1;
        Some(StallSlot(client))
    }
}

impl Drop for StallSlot {
    fn drop(&mut self) {
        let mut stalls = STALLS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = stalls.get_mut(&self.0) {
            *held -= 1;
            if *held == 0 {
                stalls.remove(&self.0);
            }
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        crate::config::Transport::default().splice_limits()
    }
}

static LIMITS: RwLock<Option<Limits>> = RwLock::new(None);

/// Sets the limits of every splice started from now on; a role calls it once at start-up with its
/// transport settings. Until then the shipped defaults apply.
pub fn configure(limits: Limits) {
    *LIMITS.write().unwrap_or_else(|e| e.into_inner()) = Some(limits);
}

/// The limits in force.
pub fn limits() -> Limits {
    LIMITS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or_default()
}

/// Why a splice was reset by its own watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expired {
    Stalled,
    /// Stalled while its client already held all its stall slots.
    OverStallLimit,
    Idle,
}

/// What the watch of one splice sees: when bytes last moved and, per direction, since when a
/// write has been waiting (0: none). Times are milliseconds since `start`, plus one.
pub(crate) struct Watch {
    start: Instant,
    last_moved: AtomicU64,
    waiting: [AtomicU64; 2],
    /// The client whose stall budget a stalled lane draws on, if any.
    client: Option<IpAddr>,
    /// Per lane: whether it holds a stall slot (checked without the lock on every write).
    holding: [AtomicBool; 2],
    slots: [Mutex<Option<StallSlot>>; 2],
    /// The TCP socket lane [`DOWN`] writes to, if any: its send queue shrinking means the reader
    /// is reading, even while a write waits for room (see [`Watch::sink_drained`]).
    sink: Option<std::os::fd::RawFd>,
    /// Keeps `sink` open where the watch may outlive its splice (a duplicate of the socket).
    _sink_owner: Option<Arc<socket2::Socket>>,
    /// The sink's send queue at the last look (`u64::MAX`: not looked at yet).
    sink_queued: AtomicU64,
}

impl Watch {
    pub(crate) fn new(client: Option<IpAddr>) -> Self {
        Watch {
            start: Instant::now(),
            last_moved: AtomicU64::new(1),
            waiting: [AtomicU64::new(0), AtomicU64::new(0)],
            client,
            holding: [AtomicBool::new(false), AtomicBool::new(false)],
            slots: [Mutex::new(None), Mutex::new(None)],
            sink: None,
            _sink_owner: None,
            sink_queued: AtomicU64::new(u64::MAX),
        }
    }

    /// [`Watch::new`] for a splice whose lane [`DOWN`] writes to `tcp`, which must stay open for
    /// as long as the watch's [`Watch::expiry`] runs.
    fn with_sink(client: Option<IpAddr>, tcp: &TcpStream) -> Self {
        use std::os::fd::AsRawFd as _;
        Watch::sinking(client, tcp.as_raw_fd(), None)
    }

    /// [`Watch::new`] whose lane [`DOWN`] writes to `socket` (a duplicate the watch keeps open).
    pub(crate) fn with_owned_sink(client: Option<IpAddr>, socket: Arc<socket2::Socket>) -> Self {
        use std::os::fd::AsRawFd as _;
        Watch::sinking(client, socket.as_raw_fd(), Some(socket))
    }

    fn sinking(
        client: Option<IpAddr>,
        fd: std::os::fd::RawFd,
        owner: Option<Arc<socket2::Socket>>,
    ) -> Self {
        Watch {
            sink: Some(fd),
            _sink_owner: owner,
            ..Watch::new(client)
        }
    }

    /// Whether the sink's send queue shrank since the last look: the reader took bytes (the
    /// kernel lets a waiting write through only once a good share of megabytes of buffers has
    /// drained, so a slow reader's writes can wait for many seconds while it reads all along).
    /// The first look only takes the measure.
    fn sink_drained(&self) -> bool {
        let Some(fd) = self.sink else {
            return false;
        };
        let Some(queued) = send_queue(fd) else {
            return false;
        };
        let before = self.sink_queued.swap(queued, Ordering::Relaxed);
        before != u64::MAX && queued < before
    }

    fn slot(&self, lane: usize) -> std::sync::MutexGuard<'_, Option<StallSlot>> {
        self.slots[lane].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64 + 1
    }

    /// A write in direction `lane` starts waiting for its writer.
    pub(crate) fn waiting(&self, lane: usize) {
        self.waiting[lane].store(self.now(), Ordering::Relaxed);
    }

    /// The write in direction `lane` moved part of its bytes and waits for the rest.
    fn progressed(&self, lane: usize) {
        self.moved(lane);
        self.waiting(lane);
    }

    /// Part of a waiting write in direction `lane` went through, if one is waiting.
    pub(crate) fn progressed_if_waiting(&self, lane: usize) {
        if self.waiting[lane].load(Ordering::Relaxed) != 0 {
            self.progressed(lane);
        }
    }

    /// Bytes moved, with no write waiting on them (for the idle deadline only).
    pub(crate) fn touched(&self) {
        self.last_moved.store(self.now(), Ordering::Relaxed);
    }

    /// Nothing watches any more: no write counts as waiting, and the stall slots go back.
    pub(crate) fn finish(&self) {
        for lane in [UP, DOWN] {
            self.waiting[lane].store(0, Ordering::Relaxed);
            if self.holding[lane].swap(false, Ordering::Relaxed) {
                *self.slot(lane) = None;
            }
        }
    }

    /// The write in direction `lane` went through.
    pub(crate) fn moved(&self, lane: usize) {
        self.waiting[lane].store(0, Ordering::Relaxed);
        self.last_moved.store(self.now(), Ordering::Relaxed);
        if self.holding[lane].swap(false, Ordering::Relaxed) {
            *self.slot(lane) = None;
        }
    }

    /// Takes a stall slot for a client's splice whose writer towards the client has waited
    /// [`STALL_GRACE`]; an error when the client has none left. Returns when to look again. Only
    /// that direction counts: there the client's reading is what frees the connection's credit,
    /// while the other direction waits on the service and the far end's shared window.
    fn claim_stall_slots(&self, now: u64, limit: usize) -> Result<u64, ()> {
        let Some(client) = self.client else {
            return Ok(u64::MAX);
        };
        let grace = STALL_GRACE.as_millis() as u64;
        let lane = DOWN;
        let since = self.waiting[lane].load(Ordering::Relaxed);
        if since == 0 || self.holding[lane].load(Ordering::Relaxed) {
            return Ok(u64::MAX);
        }
        if now < since + grace {
            return Ok(since + grace);
        }
        let slot = StallSlot::claim(client, limit).ok_or(())?;
        *self.slot(lane) = Some(slot);
        self.holding[lane].store(true, Ordering::Relaxed);
        // The lane may have moved meanwhile; then it must not keep the slot.
        if self.waiting[lane].load(Ordering::Relaxed) == 0
            && self.holding[lane].swap(false, Ordering::Relaxed)
        {
            *self.slot(lane) = None;
        }
        Ok(u64::MAX)
    }

    /// Resolves, once one of `limits` expires, with the error the splice ends with; the expiry is
    /// counted in `postern_stream_resets_total{reason}`.
    pub(crate) async fn expiry(&self, limits: Limits) -> io::Error {
        let (reason, err) = match self.expired(limits).await {
            Expired::Stalled => (
                "stalled",
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no progress for {:?} while data waited",
                        limits.stall_timeout
                    ),
                ),
            ),
            Expired::OverStallLimit => (
                "stall_limit",
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "stalled while the client already had {} stalled connections",
                        limits.stalled_per_client
                    ),
                ),
            ),
            Expired::Idle => (
                "idle",
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("idle for {:?}", limits.idle_timeout),
                ),
            ),
        };
        crate::metrics::metrics()
            .stream_resets
            .get_or_create(&crate::metrics::Reason { reason })
            .inc();
        err
    }

    /// Resolves when one of the limits expires.
    async fn expired(&self, limits: Limits) -> Expired {
        let stall = limits.stall_timeout.as_millis() as u64;
        let idle = limits.idle_timeout.as_millis() as u64;
        loop {
            // A waiting write towards a reader that is draining its socket is progress.
            if self.waiting[DOWN].load(Ordering::Relaxed) != 0 && self.sink_drained() {
                self.progressed(DOWN);
            } else if self.waiting[DOWN].load(Ordering::Relaxed) == 0 {
                self.sink_queued.store(u64::MAX, Ordering::Relaxed);
            }
            let now = self.now();
            let Ok(claim_at) = self.claim_stall_slots(now, limits.stalled_per_client) else {
                return Expired::OverStallLimit;
            };
            let oldest_wait = self
                .waiting
                .iter()
                .map(|w| w.load(Ordering::Relaxed))
                .filter(|&w| w != 0)
                .min();
            let stall_at = oldest_wait.map(|w| w + stall);
            if stall_at.is_some_and(|at| now >= at) {
                return Expired::Stalled;
            }
            let idle_at = self.last_moved.load(Ordering::Relaxed) + idle;
            if oldest_wait.is_none() && now >= idle_at {
                return Expired::Idle;
            }
            // A client's lane that starts waiting after this check is looked at within a grace
            // period: it counts against the client's stalls between one and two graces in.
            // With a sink, its send queue is looked at every grace period while a write waits.
            let look_again = match (self.client, self.sink) {
                (Some(_), _) | (None, Some(_)) => STALL_GRACE.as_millis() as u64,
                (None, None) => stall,
            };
            let next = stall_at
                .unwrap_or(u64::MAX)
                .min(idle_at)
                .min(now + look_again)
                .min(claim_at);
            tokio::time::sleep(Duration::from_millis(next.saturating_sub(now).max(1))).await;
        }
    }
}

/// The direction towards the service (the client's writes).
pub(crate) const UP: usize = 0;
/// The direction towards the client, whose reading frees the connection's credit.
pub(crate) const DOWN: usize = 1;

/// Runs the two directions of a splice under the limits; an expired limit is counted and becomes
/// the splice's error.
async fn watched<F>(watch: &Watch, limits: Limits, both: F) -> io::Result<Transferred>
where
    F: std::future::Future<Output = io::Result<(u64, u64)>>,
{
    tokio::select! {
        result = both => result.map(|(up, down)| Transferred { up, down }),
        err = watch.expiry(limits) => Err(err),
    }
}

/// Bytes in a TCP socket's send queue, sent or not, that its peer has not acknowledged yet.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn send_queue(fd: std::os::fd::RawFd) -> Option<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ for a TCP socket) writes one int into `queued`; an fd that is not
    // a socket fails with an error, which is only a missed look.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
    (rc == 0).then_some(queued.max(0) as u64)
}

#[cfg(not(target_os = "linux"))]
fn send_queue(_fd: std::os::fd::RawFd) -> Option<u64> {
    None
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

    fn limits(stall_ms: u64, per_client: usize) -> Limits {
        Limits {
            stall_timeout: Duration::from_millis(stall_ms),
            idle_timeout: Duration::from_secs(3600),
            tcp_keepalive: Duration::from_secs(60),
            stalled_per_client: per_client,
        }
    }

    #[tokio::test]
    async fn a_slow_writer_that_progresses_is_not_a_stall() {
        let watch = Watch::new(None);
        let started = Instant::now();
        watch.waiting(DOWN);
        let expired = {
            let trickle = async {
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    watch.progressed(DOWN);
                }
                std::future::pending::<()>().await
            };
            tokio::select! {
                e = watch.expired(limits(300, 16)) => e,
                _ = trickle => unreachable!(),
            }
        };
        assert_eq!(expired, Expired::Stalled);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1300),
            "reset after {took:?}, while it still moved bytes"
        );
    }

    #[tokio::test]
    async fn a_client_stalls_only_its_share_of_streams() {
        // A documentation address no other test uses, so the process-wide table is ours.
        let client: IpAddr = "192.0.2.77".parse().unwrap();
        let first = Watch::new(Some(client));
        let second = Watch::new(Some(client));
        first.waiting(DOWN);
        second.waiting(DOWN);
        let limits = limits(60_000, 1);
        let outcome = tokio::select! {
            e = first.expired(limits) => ("first", e),
            e = second.expired(limits) => ("second", e),
        };
        assert_eq!(outcome.1, Expired::OverStallLimit, "{outcome:?}");
        // The stream that got the slot gives it back once it moves again.
        let holder = if outcome.0 == "first" {
            &second
        } else {
            &first
        };
        assert_eq!(STALLS.lock().unwrap().get(&client), Some(&1));
        holder.moved(DOWN);
        assert_eq!(STALLS.lock().unwrap().get(&client), None);
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
