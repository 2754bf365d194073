//! `postern bench swarm`: N agent tunnels from one process, for what only many agents show — how
//! fast a relay admits them, how fast their routes reach etcd and a gateway's cache, and what an
//! idle tunnel costs the relay (measured from outside: `scripts/bench` reads the relay's RSS).
//!
//! Each swarm agent is `swarm-<i>` claiming one address `ip_base + 1 + i`, speaks the protocol
//! itself (control stream, `Hello` → `Welcome`, pings like a real agent) and serves relay-opened
//! streams with the real agent's [`crate::agent::stream::serve`]. quinn client endpoints hold many
//! connections each, so the swarm needs one UDP socket per `--agents-per-endpoint` agents.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::{socks5_handshake, Target};
use super::report::{self, Errors, Report};
use crate::agent::stream::{self, Policy};
use crate::config::Transport;
use crate::protocol::{self, Hello, Message, PortRange, Welcome};
use crate::tls::{self, Trust};

/// Deadline for one tunnel's QUIC handshake plus `Hello` → `Welcome`.
const DIAL_TIMEOUT: Duration = Duration::from_secs(15);
/// Attempts per agent before it counts as failed.
const DIAL_ATTEMPTS: u32 = 3;
/// How often the etcd route count and the probes are polled.
const ETCD_POLL: Duration = Duration::from_millis(100);
const PROBE_POLL: Duration = Duration::from_millis(50);
/// Deadline for one probe connection through the gateway.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Port the agents expose when no probe picks one (discard; nothing needs to listen).
const DEFAULT_PORT: u16 = 9;

#[derive(clap::Args, Clone, Debug)]
pub struct SwarmArgs {
    /// Agent tunnels to hold.
    #[arg(long)]
    pub agents: usize,
    /// The relay's agent endpoint (`host:port`).
    #[arg(long)]
    pub relay: String,
    /// CA certificate (PEM) that signed the relay's certificate.
    #[arg(long)]
    pub ca: PathBuf,
    /// Environment variable holding the agent token (`postern cert token`).
    #[arg(long)]
    pub token_env: String,
    /// Agent i claims ip_base + 1 + i.
    #[arg(long, default_value = "127.100.0.0")]
    pub ip_base: Ipv4Addr,
    /// Name the relay's certificate must carry (default: the host part of --relay).
    #[arg(long)]
    pub server_name: Option<String>,
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Port every agent exposes (default: the probes' port, else 9).
    #[arg(long)]
    pub port: Option<u16>,
    /// SOCKS5 gateway to probe sampled agents through (`host:port`).
    #[arg(long)]
    pub probe_socks: Option<String>,
    /// How many agents (evenly spread, the last one included) get an echo service to probe.
    #[arg(long, default_value_t = 10)]
    pub probe_count: usize,
    /// etcd endpoint: also measure the time until etcd holds a route per agent.
    #[arg(long)]
    pub etcd: Option<String>,
    #[arg(long, default_value = "/postern")]
    pub etcd_prefix: String,
    /// Hold the tunnels this long after reporting (default: until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub hold: Option<Duration>,
    /// Connections per UDP endpoint.
    #[arg(long, default_value_t = 1000)]
    pub agents_per_endpoint: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Streams the relay may open on each swarm tunnel (the real agent allows 1024; quinn reserves
    /// state for each, in this process, not in the relay).
    #[arg(long, default_value_t = 8)]
    pub max_streams: u32,
    /// Bound on every waiting phase (registration, etcd, probes).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct SwarmReport {
    pub test: &'static str,
    pub agents: usize,
    pub endpoints: usize,
    pub welcomed: usize,
    pub failed: usize,
    pub failures: Errors,
    /// From the first dial to the last `Welcome`, when every agent was welcomed.
    pub welcome_all_s: Option<f64>,
    pub welcomes_per_s: f64,
    /// From the first dial until etcd held at least one route per agent.
    pub etcd_routes_s: Option<f64>,
    pub etcd_routes: Option<i64>,
    pub probe_count: usize,
    pub probe_reachable: usize,
    /// From the first dial until every probed agent answered through the gateway.
    pub probe_all_s: Option<f64>,
    /// Tunnels that ended before the report.
    pub lost: usize,
    /// This process's resident memory once the swarm was up.
    pub swarm_rss_kib: Option<u64>,
}

impl Report for SwarmReport {
    fn human(&self) -> String {
        let secs = |v: Option<f64>| v.map_or("not reached".to_string(), |s| format!("{s:.2} s"));
        let mut out = format!(
            "swarm: {} agents on {} UDP endpoint(s)\n  welcomed {} (failed {}, lost {}); all welcomed after {}; {:.0} welcomes/s\n",
            self.agents,
            self.endpoints,
            self.welcomed,
            self.failed,
            self.lost,
            secs(self.welcome_all_s),
            self.welcomes_per_s
        );
        if let Some(n) = self.etcd_routes {
            out.push_str(&format!(
                "  etcd held {n} routes; all {} after {}\n",
                self.agents,
                secs(self.etcd_routes_s)
            ));
        }
        if self.probe_count > 0 {
            out.push_str(&format!(
                "  probes: {}/{} reachable through the gateway; all after {}\n",
                self.probe_reachable,
                self.probe_count,
                secs(self.probe_all_s)
            ));
        }
        if self.failed > 0 {
            out.push_str(&format!("  {}\n", self.failures.human()));
        }
        out
    }
}

enum Event {
    Welcomed(Instant),
    Failed(String),
}

/// What every agent task shares.
struct Shared {
    relay: SocketAddr,
    server_name: String,
    namespace: String,
    token: String,
    port: u16,
    dials: Semaphore,
    events: mpsc::UnboundedSender<Event>,
    lost: AtomicUsize,
    stop: CancellationToken,
}

/// The agent addresses: `ip_base + 1 + i`.
fn agent_ips(base: Ipv4Addr, n: usize) -> anyhow::Result<Vec<Ipv4Addr>> {
    let base = u32::from(base);
    (0..n as u32)
        .map(|i| {
            base.checked_add(1 + i)
                .map(Ipv4Addr::from)
                .context("--ip-base + --agents overflows the IPv4 space")
        })
        .collect()
}

/// `k` indices spread evenly over `0..n`, the first and the last included.
fn sample(n: usize, k: usize) -> Vec<usize> {
    let k = k.min(n);
    match k {
        0 => Vec::new(),
        1 => vec![n - 1],
        _ => (0..k).map(|j| j * (n - 1) / (k - 1)).collect(),
    }
}

pub async fn run(args: SwarmArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    if args.agents == 0 || args.agents_per_endpoint == 0 || args.concurrency == 0 {
        bail!("--agents, --agents-per-endpoint and --concurrency must be at least 1");
    }
    let token = std::env::var(&args.token_env)
        .with_context(|| format!("reading the agent token from ${}", args.token_env))?;
    let relay = tokio::net::lookup_host(&args.relay)
        .await
        .with_context(|| format!("resolving {}", args.relay))?
        .next()
        .with_context(|| format!("{} resolves to nothing", args.relay))?;
    let server_name = args
        .server_name
        .clone()
        .unwrap_or_else(|| crate::config::host_of(&args.relay).to_string());
    let trust = Trust::Ca(tls::load_certs(&args.ca)?);
    let ips = agent_ips(args.ip_base, args.agents)?;
    let stop = shutdown.child_token();

    // Probe targets first: the agents must expose the port they listen on.
    let probed = if args.probe_socks.is_some() {
        sample(args.agents, args.probe_count)
    } else {
        Vec::new()
    };
    let mut probe_port = args.port;
    let mut probe_targets = Vec::with_capacity(probed.len());
    for &i in &probed {
        let listener = TcpListener::bind((ips[i], probe_port.unwrap_or(0)))
            .await
            .with_context(|| format!("binding a probe echo service on {}", ips[i]))?;
        let addr = listener.local_addr()?;
        probe_port = Some(addr.port());
        probe_targets.push(addr);
        tokio::spawn(echo_service(listener, stop.clone()));
    }
    let port = probe_port.unwrap_or(DEFAULT_PORT);

    let transport = Transport::default();
    let client_config = tls::client_config(
        &trust,
        protocol::ALPN_AGENT,
        None,
        Arc::new(transport.quinn(args.max_streams)),
    )?;
    let bind: SocketAddr = if relay.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoints = (0..args.agents.div_ceil(args.agents_per_endpoint))
        .map(|_| {
            let mut endpoint = tls::bind_endpoint(bind, None, transport.udp_buffer)?;
            endpoint.set_default_client_config(client_config.clone());
            Ok(endpoint)
        })
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding the swarm's UDP endpoints")?;

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        relay,
        server_name,
        namespace: args.namespace.clone(),
        token,
        port,
        dials: Semaphore::new(args.concurrency),
        events: events_tx,
        lost: AtomicUsize::new(0),
        stop: stop.clone(),
    });
    let tunnels = TaskTracker::new();
    let start = Instant::now();
    let deadline = start + args.timeout;
    for (i, ip) in ips.iter().enumerate() {
        let endpoint = endpoints[i / args.agents_per_endpoint].clone();
        tunnels.spawn(agent(shared.clone(), i, *ip, endpoint));
    }

    let registration = async {
        let (mut welcomed, mut failed, mut last) = (0usize, 0usize, None);
        let mut failures = Errors::default();
        while welcomed + failed < args.agents {
            let event = tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep_until(deadline) => break,
                e = events.recv() => match e { Some(e) => e, None => break },
            };
            match event {
                Event::Welcomed(at) => {
                    welcomed += 1;
                    last = Some(at);
                }
                Event::Failed(kind) => {
                    failed += 1;
                    failures.note(kind);
                }
            }
        }
        (welcomed, failed, failures, last)
    };
    let etcd = async {
        match &args.etcd {
            Some(url) => {
                let key = format!("{}/routes/", args.etcd_prefix.trim_end_matches('/'));
                Some(etcd_routes(url, &key, args.agents, start, deadline, &stop).await)
            }
            None => None,
        }
    };
    let probes = async {
        let Some(socks) = &args.probe_socks else {
            return Ok(Vec::new());
        };
        let socks = tokio::net::lookup_host(socks)
            .await?
            .next()
            .context("the probe gateway resolves to nothing")?;
        let runs: Vec<_> = probe_targets
            .iter()
            .map(|&target| tokio::spawn(probe(socks, target, start, deadline, stop.clone())))
            .collect();
        let mut results = Vec::with_capacity(runs.len());
        for run in runs {
            results.push(run.await?);
        }
        Ok::<_, anyhow::Error>(results)
    };
    let ((welcomed, failed, failures, last), etcd, probes) =
        tokio::join!(registration, etcd, probes);
    let probes = probes?;

    let since_start = |t: Instant| (t - start).as_secs_f64();
    let welcome_span = last.map(since_start);
    let (etcd_routes_s, etcd_routes) = match etcd {
        Some(Ok((at, count))) => (at, Some(count)),
        Some(Err(err)) => {
            tracing::warn!(err = format!("{err:#}"), "could not count routes in etcd");
            (None, None)
        }
        None => (None, None),
    };
    let reachable: Vec<f64> = probes.iter().flatten().copied().collect();
    let report = SwarmReport {
        test: "swarm",
        agents: args.agents,
        endpoints: endpoints.len(),
        welcomed,
        failed,
        failures,
        welcome_all_s: welcome_span.filter(|_| welcomed == args.agents),
        welcomes_per_s: welcome_span.map_or(0.0, |s| welcomed as f64 / s.max(1e-9)),
        etcd_routes_s,
        etcd_routes,
        probe_count: probes.len(),
        probe_reachable: reachable.len(),
        probe_all_s: (reachable.len() == probes.len() && !probes.is_empty())
            .then(|| reachable.iter().copied().fold(0.0, f64::max)),
        lost: shared.lost.load(Ordering::Relaxed),
        swarm_rss_kib: own_rss_kib(),
    };
    report::print(&report, args.json)?;

    // Hold the tunnels idle, as a fleet of quiet agents would.
    match args.hold {
        Some(hold) => {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(hold) => {}
            }
        }
        None => shutdown.cancelled().await,
    }
    let lost = shared.lost.load(Ordering::Relaxed);
    tracing::info!(lost, "swarm stopping");
    stop.cancel();
    tunnels.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tunnels.wait()).await;
    for endpoint in &endpoints {
        endpoint.close(protocol::close::SHUTDOWN.into(), b"swarm done");
    }
    for endpoint in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
    Ok(())
}

/// One swarm agent: dial (bounded attempts, bounded concurrency), report, then hold the tunnel.
async fn agent(shared: Arc<Shared>, i: usize, ip: Ipv4Addr, endpoint: quinn::Endpoint) {
    let hello = Hello {
        agent_id: format!("swarm-{i}"),
        namespace: shared.namespace.clone(),
        ips: vec![IpAddr::V4(ip)],
        ports: vec![PortRange {
            start: shared.port,
            end: shared.port,
        }],
        token: shared.token.as_str().into(),
    };
    let dialled = async {
        let _permit = shared.dials.acquire().await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = tokio::time::timeout(DIAL_TIMEOUT, dial(&endpoint, &shared, &hello))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
            match result {
                Ok(tunnel) => return Ok(tunnel),
                Err(err) if attempt >= DIAL_ATTEMPTS => return Err(err),
                Err(err) => {
                    tracing::debug!(
                        agent = i,
                        attempt,
                        err = format!("{err:#}"),
                        "dial failed; retrying"
                    );
                    tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
                }
            }
        }
    };
    let tunnel = tokio::select! {
        _ = shared.stop.cancelled() => return,
        t = dialled => t,
    };
    let tunnel = match tunnel {
        Ok(t) => t,
        Err(err) => {
            let _ = shared.events.send(Event::Failed(format!("{err:#}")));
            return;
        }
    };
    let _ = shared.events.send(Event::Welcomed(Instant::now()));
    if let Err(err) = hold(tunnel, ip, &shared).await {
        if !shared.stop.is_cancelled() {
            shared.lost.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(agent = i, err = format!("{err:#}"), "tunnel lost");
        }
    }
}

struct Tunnel {
    connection: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    welcome: Welcome,
}

async fn dial(
    endpoint: &quinn::Endpoint,
    shared: &Shared,
    hello: &Hello,
) -> anyhow::Result<Tunnel> {
    let connection = endpoint
        .connect(shared.relay, &shared.server_name)?
        .await
        .context("QUIC handshake")?;
    let (mut send, mut recv) = connection.open_bi().await?;
    protocol::write_message(&mut send, &Message::Hello(hello.clone())).await?;
    match protocol::read_message_timeout(&mut recv, protocol::HELLO_TIMEOUT).await? {
        Message::Welcome(welcome) => Ok(Tunnel {
            connection,
            send,
            recv,
            welcome,
        }),
        Message::Reject(reject) => bail!("rejected ({:?}): {}", reject.code, reject.reason),
        other => bail!(protocol::Error::unexpected(&other)),
    }
}

/// Pings like a real agent, serves relay-opened streams, and ends when the tunnel does (or at stop).
async fn hold(tunnel: Tunnel, ip: Ipv4Addr, shared: &Shared) -> anyhow::Result<()> {
    let Tunnel {
        connection,
        mut send,
        mut recv,
        welcome,
    } = tunnel;
    // Each future below owns its loop, so none is cancelled half-way through a frame.
    let pongs = async {
        loop {
            match protocol::read_message(&mut recv).await? {
                Message::Pong { .. } => {}
                Message::Drain { .. } => bail!("the relay is draining"),
                other => bail!(protocol::Error::unexpected(&other)),
            }
        }
    };
    let pings = async {
        // Spread the fleet's pings over the interval instead of sending them in one burst.
        let offset = protocol::PING_INTERVAL.mul_f64(rand::random::<f64>());
        let mut interval =
            tokio::time::interval_at(Instant::now() + offset, protocol::PING_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut nonce = 0u64;
        loop {
            interval.tick().await;
            nonce += 1;
            protocol::write_message(&mut send, &Message::Ping { nonce }).await?;
        }
    };
    let streams = async {
        loop {
            let (send, recv) = connection.accept_bi().await?;
            let policy = Policy {
                ips: vec![IpAddr::V4(ip)],
                ports: vec![PortRange {
                    start: shared.port,
                    end: shared.port,
                }],
                session_id: welcome.session_id,
                connect_timeout: protocol::CONNECT_TIMEOUT,
            };
            tokio::spawn(stream::serve(send, recv, policy));
        }
    };
    let result: anyhow::Result<()> = tokio::select! {
        _ = shared.stop.cancelled() => Ok(()),
        r = pongs => r,
        r = pings => r,
        r = streams => r,
    };
    connection.close(protocol::close::SHUTDOWN.into(), b"swarm done");
    result
}

/// Polls etcd's route count until it reaches `n`: (seconds from `start`, last count seen).
async fn etcd_routes(
    url: &str,
    key: &str,
    n: usize,
    start: Instant,
    deadline: Instant,
    stop: &CancellationToken,
) -> anyhow::Result<(Option<f64>, i64)> {
    let mut client = etcd_client::Client::connect([url], None)
        .await
        .with_context(|| format!("connecting to etcd at {url}"))?;
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    let mut count = 0;
    loop {
        match client.get(key, Some(options.clone())).await {
            Ok(resp) => count = resp.count(),
            Err(err) => tracing::debug!(%err, "etcd count failed"),
        }
        let now = Instant::now();
        if count >= n as i64 {
            return Ok((Some((now - start).as_secs_f64()), count));
        }
        if now >= deadline || stop.is_cancelled() {
            return Ok((None, count));
        }
        tokio::time::sleep(ETCD_POLL).await;
    }
}

/// Tries `target` through the SOCKS5 gateway until one byte echoes: seconds from `start`, or `None`
/// at the deadline.
async fn probe(
    socks: SocketAddr,
    target: SocketAddr,
    start: Instant,
    deadline: Instant,
    stop: CancellationToken,
) -> Option<f64> {
    loop {
        let attempt = async {
            let mut tcp = TcpStream::connect(socks).await?;
            socks5_handshake(&mut tcp, &Target::Addr(target), None).await?;
            tcp.write_all(b"p").await?;
            let mut byte = [0u8; 1];
            tcp.read_exact(&mut byte).await?;
            Ok::<_, anyhow::Error>(())
        };
        if let Ok(Ok(())) = tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
            return Some((Instant::now() - start).as_secs_f64());
        }
        if Instant::now() >= deadline || stop.is_cancelled() {
            return None;
        }
        tokio::time::sleep(PROBE_POLL).await;
    }
}

/// A plain echo service for probes.
async fn echo_service(listener: TcpListener, stop: CancellationToken) {
    loop {
        let (mut tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        tokio::spawn(async move {
            let (mut r, mut w) = tcp.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// VmRSS of this process, from /proc (Linux only).
fn own_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_spread_and_include_the_ends() {
        assert_eq!(sample(10_000, 10)[0], 0);
        assert_eq!(*sample(10_000, 10).last().unwrap(), 9_999);
        assert_eq!(sample(10_000, 10).len(), 10);
        assert_eq!(sample(3, 10), vec![0, 1, 2]);
        assert_eq!(sample(5, 1), vec![4]);
        assert!(sample(5, 0).is_empty());
    }

    #[test]
    fn agent_ips_count_up_from_the_base() {
        let ips = agent_ips("127.100.0.0".parse().unwrap(), 300).unwrap();
        assert_eq!(ips[0], Ipv4Addr::new(127, 100, 0, 1));
        assert_eq!(ips[299], Ipv4Addr::new(127, 100, 1, 44));
        assert!(agent_ips("255.255.255.255".parse().unwrap(), 1).is_err());
    }
}
