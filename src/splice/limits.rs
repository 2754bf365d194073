//! The limits every splice runs under ([`Limits`]): a writer that moves nothing while data waits
//! (stalled), a splice that moves nothing either way (idle), and each client's share of stalled
//! streams. A [`Watch`] follows one splice's progress and resolves when a limit expires.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::Transferred;

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
    pub(crate) fn with_sink(client: Option<IpAddr>, tcp: &TcpStream) -> Self {
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
    pub(crate) fn progressed(&self, lane: usize) {
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
pub(super) async fn watched<F>(watch: &Watch, limits: Limits, both: F) -> io::Result<Transferred>
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
