//! The three client loads, each against `bench serve` and bounded by `--warmup` + `--duration` and
//! by `--max-samples`:
//! * throughput: N connections stream from a source (or into a sink) at once;
//! * connect: N workers each loop over connect → 1-byte echo → close;
//! * rtt: N connections each ping-pong one byte.
//!
//! Nothing before the warm-up ends is counted: buffers fill, congestion windows open, and a
//! gateway's first peer connection is dialled, so the figures are the steady state.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{self, Dialer, Target, Via};
use super::report::{Errors, Latency, Report};
use super::serve::{MODE_ECHO, MODE_SINK, MODE_SOURCE, UNLIMITED};

/// Deadline for one connection attempt, and for one read or write outside a timed window.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// More concurrent connections than this is a mistake, not a benchmark.
const MAX_CONNECTIONS: usize = 10_000;
/// Read and write size for bulk transfer.
const BULK: usize = 256 * 1024;

/// What every load takes.
#[derive(clap::Args, Clone, Debug)]
pub struct LoadArgs {
    /// `direct`, `socks5://[user:pass@]host:port`, or `http://[user:pass@]host:port`.
    #[arg(long, default_value = "direct")]
    pub via: Via,
    /// The `bench serve` address (`host:port`; a host name goes to the proxy as a name).
    #[arg(long)]
    pub target: Target,
    /// Concurrent connections (throughput, rtt) or workers (connect).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// How long to measure, after the warm-up.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// How long to run before measuring.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Most latency samples kept in all (each worker gets an equal share and stops when it is full).
    #[arg(long, default_value_t = 5_000_000)]
    pub max_samples: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

impl LoadArgs {
    fn check(&self) -> anyhow::Result<()> {
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            anyhow::bail!("--connections must be 1-{MAX_CONNECTIONS}");
        }
        if self.duration.is_zero() {
            anyhow::bail!("--duration must be more than 0");
        }
        if self.max_samples == 0 {
            anyhow::bail!("--max-samples must be at least 1");
        }
        Ok(())
    }

    fn samples_per_worker(&self) -> usize {
        (self.max_samples / self.connections).max(1)
    }
}

/// Which way bulk data flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Target → client (the target is a source).
    Down,
    /// Client → target (the target is a sink).
    Up,
}

/// Smallest, mean and largest of a set of figures.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub min: f64,
    pub mean: f64,
    pub max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        Some(Spread { min, mean, max })
    }
}

fn gbit(bytes: u64, over: Duration) -> f64 {
    bytes as f64 * 8.0 / over.as_secs_f64() / 1e9
}

#[derive(Debug, Serialize)]
pub struct ThroughputReport {
    pub test: &'static str,
    pub via: String,
    pub target: String,
    pub direction: Direction,
    pub connections: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    /// Bytes moved inside the measured window, all connections.
    pub bytes: u64,
    pub gbit_per_s: f64,
    /// Over the connections that completed the window (fairness: compare min and max).
    pub per_connection_gbit_per_s: Option<Spread>,
    pub per_connection: Vec<f64>,
    pub errors: Errors,
}

impl Report for ThroughputReport {
    fn human(&self) -> String {
        let spread = self.per_connection_gbit_per_s.map_or(String::new(), |s| {
            format!(
                "; per connection min {:.3} / mean {:.3} / max {:.3} Gbit/s",
                s.min, s.mean, s.max
            )
        });
        format!(
            "throughput via {} to {} ({:?}), {} connection(s), {:.1} s after {:.1} s warm-up\n  {:.3} Gbit/s total{spread}\n  {}\n",
            self.via,
            self.target,
            self.direction,
            self.connections,
            self.duration_s,
            self.warmup_s,
            self.gbit_per_s,
            self.errors.human()
        )
    }
}

/// N connections transfer at once; each one's bytes inside the common window count.
pub async fn throughput(
    args: LoadArgs,
    direction: Direction,
    shutdown: CancellationToken,
) -> anyhow::Result<ThroughputReport> {
    args.check()?;
    let dialer = Arc::new(Dialer::new(&args.via, &args.target).await?);
    // Every connection is set up before the clock starts, so all share one window.
    let barrier = Arc::new(tokio::sync::Barrier::new(args.connections));
    let start = Arc::new(OnceLock::new());
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| {
            let (dialer, barrier, start, shutdown) = (
                dialer.clone(),
                barrier.clone(),
                start.clone(),
                shutdown.clone(),
            );
            let (warmup, duration) = (args.warmup, args.duration);
            tokio::spawn(async move {
                let conn = tokio::time::timeout(OP_TIMEOUT, dialer.connect()).await;
                barrier.wait().await;
                let tcp = match conn {
                    Ok(Ok(tcp)) => tcp,
                    Ok(Err(err)) => return (0, Some(err.kind())),
                    Err(_) => return (0, Some("connect: timed out".to_string())),
                };
                let start = *start.get_or_init(Instant::now);
                let window = Window::new(start, warmup, duration);
                match direction {
                    Direction::Down => pull(tcp, window, &shutdown).await,
                    Direction::Up => push(tcp, window, &shutdown).await,
                }
            })
        })
        .collect();
    let mut errors = Errors::default();
    let mut per_connection = Vec::with_capacity(tasks.len());
    let mut bytes = 0u64;
    for task in tasks {
        let (moved, err) = task.await?;
        bytes += moved;
        match err {
            Some(kind) => errors.note(kind),
            None => per_connection.push(gbit(moved, args.duration)),
        }
    }
    Ok(ThroughputReport {
        test: "throughput",
        via: args.via.to_string(),
        target: args.target.to_string(),
        direction,
        connections: args.connections,
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        bytes,
        gbit_per_s: gbit(bytes, args.duration),
        per_connection_gbit_per_s: Spread::of(&per_connection),
        per_connection,
        errors,
    })
}

/// The measured window: `[start + warmup, start + warmup + duration)`.
#[derive(Clone, Copy)]
struct Window {
    warm_end: Instant,
    end: Instant,
}

impl Window {
    fn new(start: Instant, warmup: Duration, duration: Duration) -> Self {
        let warm_end = start + warmup;
        Window {
            warm_end,
            end: warm_end + duration,
        }
    }
}

/// Counts bytes as one I/O loop moves them, snapshotting the total when the warm-up ends.
struct Meter {
    window: Window,
    total: u64,
    at_warm_end: Option<u64>,
}

impl Meter {
    fn new(window: Window) -> Self {
        Meter {
            window,
            total: 0,
            at_warm_end: None,
        }
    }

    /// The next instant to stop waiting at, or `None` when the window is over.
    fn next_deadline(&mut self) -> Option<Instant> {
        let now = Instant::now();
        if self.at_warm_end.is_none() && now >= self.window.warm_end {
            self.at_warm_end = Some(self.total);
        }
        if now >= self.window.end {
            return None;
        }
        Some(if self.at_warm_end.is_none() {
            self.window.warm_end
        } else {
            self.window.end
        })
    }

    fn measured(&self) -> u64 {
        self.total - self.at_warm_end.unwrap_or(self.total)
    }
}

/// Asks the source for an endless stream and reads it until the window closes.
async fn pull(
    mut tcp: tokio::net::TcpStream,
    window: Window,
    shutdown: &CancellationToken,
) -> (u64, Option<String>) {
    let mut request = [0u8; 9];
    request[0] = MODE_SOURCE;
    request[1..].copy_from_slice(&UNLIMITED.to_be_bytes());
    if let Err(err) = tcp.write_all(&request).await {
        return (0, Some(client::Error::from(err).kind()));
    }
    let mut buf = vec![0u8; BULK];
    let mut meter = Meter::new(window);
    while let Some(deadline) = meter.next_deadline() {
        if shutdown.is_cancelled() {
            break;
        }
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) => return (meter.measured(), Some("source ended early".into())),
            Ok(Ok(n)) => meter.total += n as u64,
            Ok(Err(err)) => return (meter.measured(), Some(client::Error::from(err).kind())),
        }
    }
    (meter.measured(), None)
}

/// Writes into the sink until the window closes, then checks the sink's count.
async fn push(
    mut tcp: tokio::net::TcpStream,
    window: Window,
    shutdown: &CancellationToken,
) -> (u64, Option<String>) {
    if let Err(err) = tcp.write_all(&[MODE_SINK]).await {
        return (0, Some(client::Error::from(err).kind()));
    }
    let buf = vec![0u8; BULK];
    let mut meter = Meter::new(window);
    while let Some(deadline) = meter.next_deadline() {
        if shutdown.is_cancelled() {
            break;
        }
        // A cancelled `write` has written nothing, so the count stays exact.
        match tokio::time::timeout_at(deadline, tcp.write(&buf)).await {
            Err(_) => continue,
            Ok(Ok(n)) => meter.total += n as u64,
            Ok(Err(err)) => return (meter.measured(), Some(client::Error::from(err).kind())),
        }
    }
    let finish = async {
        tcp.shutdown().await?;
        let mut count = [0u8; 8];
        tcp.read_exact(&mut count).await?;
        Ok::<u64, std::io::Error>(u64::from_be_bytes(count))
    };
    match tokio::time::timeout(OP_TIMEOUT, finish).await {
        Ok(Ok(count)) if count == meter.total => (meter.measured(), None),
        Ok(Ok(count)) => (
            meter.measured(),
            Some(format!(
                "sink counted {count} bytes of {} sent",
                meter.total
            )),
        ),
        Ok(Err(err)) => (meter.measured(), Some(client::Error::from(err).kind())),
        Err(_) => (meter.measured(), Some("sink count: timed out".into())),
    }
}

#[derive(Debug, Serialize)]
pub struct ConnectReport {
    pub test: &'static str,
    pub via: String,
    pub target: String,
    pub connections: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    /// Completed connect → echo → close cycles inside the window.
    pub ok: u64,
    pub connections_per_s: f64,
    /// From starting the connect to receiving the echoed byte.
    pub latency: Option<Latency>,
    pub errors: Errors,
}

impl Report for ConnectReport {
    fn human(&self) -> String {
        format!(
            "connect via {} to {}, {} worker(s), {:.1} s after {:.1} s warm-up\n  {:.0} connections/s ({} ok)\n  latency {}\n  {}\n",
            self.via,
            self.target,
            self.connections,
            self.duration_s,
            self.warmup_s,
            self.connections_per_s,
            self.ok,
            self.latency.as_ref().map_or("-".into(), Latency::human),
            self.errors.human()
        )
    }
}

/// One worker's harvest.
struct Harvest {
    samples: Vec<u64>,
    errors: Errors,
    /// When the worker's last counted operation ended.
    last: Option<Instant>,
}

/// N workers loop over connect → 1-byte echo → close.
pub async fn connect(args: LoadArgs, shutdown: CancellationToken) -> anyhow::Result<ConnectReport> {
    args.check()?;
    let dialer = Arc::new(Dialer::new(&args.via, &args.target).await?);
    let window = Window::new(Instant::now(), args.warmup, args.duration);
    let cap = args.samples_per_worker();
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| {
            let (dialer, shutdown) = (dialer.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut h = Harvest {
                    samples: Vec::new(),
                    errors: Errors::default(),
                    last: None,
                };
                while Instant::now() < window.end && h.samples.len() < cap {
                    if shutdown.is_cancelled() {
                        break;
                    }
                    let started = Instant::now();
                    let result = tokio::time::timeout(OP_TIMEOUT, echo_once(&dialer)).await;
                    if started < window.warm_end {
                        continue;
                    }
                    h.last = Some(Instant::now());
                    match result {
                        Ok(Ok(())) => h.samples.push(started.elapsed().as_nanos() as u64),
                        Ok(Err(err)) => h.errors.note(err.kind()),
                        Err(_) => h.errors.note("timed out".into()),
                    }
                }
                h
            })
        })
        .collect();
    let (samples, errors, measured) = gather(tasks, window).await?;
    let ok = samples.len() as u64;
    Ok(ConnectReport {
        test: "connect",
        via: args.via.to_string(),
        target: args.target.to_string(),
        connections: args.connections,
        duration_s: measured.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        ok,
        connections_per_s: ok as f64 / measured.as_secs_f64(),
        latency: Latency::from_nanos(samples),
        errors,
    })
}

/// Connect, echo one byte, close.
async fn echo_once(dialer: &Dialer) -> Result<(), client::Error> {
    let mut tcp = dialer.connect().await?;
    tcp.write_all(&[MODE_ECHO, b'x']).await?;
    let mut byte = [0u8; 1];
    tcp.read_exact(&mut byte).await?;
    if byte[0] != b'x' {
        return Err(client::Error::Protocol("echo returned another byte".into()));
    }
    Ok(())
}

/// Joins the workers; returns every sample, all errors, and how long the measured window really
/// lasted (from the warm-up's end to the last counted operation's end).
async fn gather(
    tasks: Vec<tokio::task::JoinHandle<Harvest>>,
    window: Window,
) -> anyhow::Result<(Vec<u64>, Errors, Duration)> {
    let mut samples = Vec::new();
    let mut errors = Errors::default();
    let mut last: Option<Instant> = None;
    for task in tasks {
        let h = task.await?;
        samples.extend(h.samples);
        errors.merge(h.errors);
        last = last.max(h.last);
    }
    // The last operation started before the window closed and ended after it, unless every worker
    // filled its sample share early; either way this is the span the samples cover.
    let last = last
        .unwrap_or(window.end)
        .max(window.warm_end + Duration::from_millis(1));
    Ok((samples, errors, last - window.warm_end))
}

#[derive(Debug, Serialize)]
pub struct RttReport {
    pub test: &'static str,
    pub via: String,
    pub target: String,
    pub connections: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub round_trips: u64,
    pub round_trips_per_s: f64,
    pub latency: Option<Latency>,
    pub errors: Errors,
}

impl Report for RttReport {
    fn human(&self) -> String {
        format!(
            "rtt via {} to {}, {} connection(s), {:.1} s after {:.1} s warm-up\n  {} round trips ({:.0}/s)\n  latency {}\n  {}\n",
            self.via,
            self.target,
            self.connections,
            self.duration_s,
            self.warmup_s,
            self.round_trips,
            self.round_trips_per_s,
            self.latency.as_ref().map_or("-".into(), Latency::human),
            self.errors.human()
        )
    }
}

/// N connections ping-pong one byte as fast as each round trip allows.
pub async fn rtt(args: LoadArgs, shutdown: CancellationToken) -> anyhow::Result<RttReport> {
    args.check()?;
    let dialer = Arc::new(Dialer::new(&args.via, &args.target).await?);
    let window = Window::new(Instant::now(), args.warmup, args.duration);
    let cap = args.samples_per_worker();
    let tasks: Vec<_> = (0..args.connections)
        .map(|_| {
            let (dialer, shutdown) = (dialer.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut h = Harvest {
                    samples: Vec::new(),
                    errors: Errors::default(),
                    last: None,
                };
                let setup = async {
                    let mut tcp = dialer.connect().await?;
                    tcp.write_all(&[MODE_ECHO]).await?;
                    Ok::<_, client::Error>(tcp)
                };
                let mut tcp = match tokio::time::timeout(OP_TIMEOUT, setup).await {
                    Ok(Ok(tcp)) => tcp,
                    Ok(Err(err)) => {
                        h.errors.note(err.kind());
                        return h;
                    }
                    Err(_) => {
                        h.errors.note("connect: timed out".into());
                        return h;
                    }
                };
                while Instant::now() < window.end && h.samples.len() < cap {
                    if shutdown.is_cancelled() {
                        break;
                    }
                    let started = Instant::now();
                    let round_trip = async {
                        tcp.write_all(b"p").await?;
                        let mut byte = [0u8; 1];
                        tcp.read_exact(&mut byte).await?;
                        Ok::<_, std::io::Error>(())
                    };
                    match tokio::time::timeout(OP_TIMEOUT, round_trip).await {
                        Ok(Ok(())) if started >= window.warm_end => {
                            h.samples.push(started.elapsed().as_nanos() as u64);
                            h.last = Some(Instant::now());
                        }
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => {
                            h.errors.note(client::Error::from(err).kind());
                            break;
                        }
                        Err(_) => {
                            h.errors.note("timed out".into());
                            break;
                        }
                    }
                }
                h
            })
        })
        .collect();
    let (samples, errors, measured) = gather(tasks, window).await?;
    let round_trips = samples.len() as u64;
    Ok(RttReport {
        test: "rtt",
        via: args.via.to_string(),
        target: args.target.to_string(),
        connections: args.connections,
        duration_s: measured.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        round_trips,
        round_trips_per_s: round_trips as f64 / measured.as_secs_f64(),
        latency: Latency::from_nanos(samples),
        errors,
    })
}
