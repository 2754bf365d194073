//! `postern bench`: a load generator and the target it talks to, for sizing a deployment and for
//! measuring postern against what the machine itself can do (`scripts/bench`, docs/performance.md).
//!
//! ```text
//!  bench throughput|connect|rtt ──direct / SOCKS5 / HTTP CONNECT──▶ … ──TCP──▶ bench serve
//!  bench quic:  one quinn connection, one stream, both ends in this process (the QUIC ceiling)
//!  bench swarm: N agent tunnels from one process, against a real relay (registration, memory)
//! ```
//!
//! * [`serve`]: the target; the client's first byte picks echo, sink or source.
//! * [`client`]: how a connection reaches the target (direct, SOCKS5, HTTP CONNECT).
//! * [`load`]: throughput, connection rate and round-trip latency.
//! * [`quic`]: raw quinn bulk transfer with postern's own TLS and transport settings.
//! * [`swarm`]: many agents speaking the protocol directly, serving probes like a real agent.
//! * [`report`]: percentiles, error counts, and the markdown table `scripts/bench` prints.
//!
//! Every run is bounded in time (`--duration`, after `--warmup`) and in memory (`--max-samples`).

pub mod client;
pub mod load;
pub mod quic;
pub mod report;
pub mod serve;
pub mod socks5;
pub mod swarm;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// `postern bench …`.
#[derive(clap::Subcommand)]
pub enum Command {
    /// The target: echo, sink or source, chosen by each connection's first byte.
    Serve {
        /// TCP address to listen on (port 0 picks one; the bound address is printed as
        /// `ready serve=ADDR`).
        #[arg(long)]
        listen: SocketAddr,
    },
    /// A plain SOCKS5 proxy (no tunnel, no authentication, IP targets): the baseline for what
    /// SOCKS5 alone costs a new connection.
    Socks5 {
        /// TCP address to listen on (port 0 picks one; printed as `ready socks5=ADDR`).
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Bulk transfer: N connections pull from (or push to) the target; Gbit/s total and per
    /// connection.
    Throughput {
        #[command(flatten)]
        load: load::LoadArgs,
        /// `down`: the target sends (source); `up`: the client sends (sink).
        #[arg(long, value_enum, default_value_t = load::Direction::Down)]
        direction: load::Direction,
    },
    /// Connection rate: N workers loop over connect, 1-byte echo, close; connections/s and latency
    /// percentiles.
    Connect {
        #[command(flatten)]
        load: load::LoadArgs,
    },
    /// Round trip: N connections ping-pong one byte; latency percentiles.
    Rtt {
        #[command(flatten)]
        load: load::LoadArgs,
    },
    /// The machine's QUIC ceiling: one quinn connection, one stream, on loopback, TLS on, postern's
    /// transport settings.
    Quic {
        /// How long to measure.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// How long to transfer before measuring.
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        warmup: Duration,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Holds N agent tunnels from one process against a relay; measures registration and routing.
    Swarm(swarm::SwarmArgs),
    /// Renders the results file `scripts/bench` collects as one markdown table.
    Table {
        /// JSON lines: {"path": …, "test": …, "result": {…}}.
        results: PathBuf,
    },
    /// Renders the same results as the table against the peers (rathole, microsocks): a row per
    /// path, and postern's ratio to each peer.
    Peers {
        /// JSON lines: {"path": …, "test": …, "result": {…}}.
        results: PathBuf,
    },
}

/// Runs one bench command until it is done or `shutdown`.
pub async fn run(command: Command, shutdown: CancellationToken) -> anyhow::Result<()> {
    match command {
        Command::Serve { listen } => serve::run(listen, shutdown).await,
        Command::Socks5 { listen } => socks5::run(listen, shutdown).await,
        Command::Throughput { load, direction } => {
            let json = load.json;
            let report = load::throughput(load, direction, shutdown).await?;
            report::print(&report, json)
        }
        Command::Connect { load } => {
            let json = load.json;
            let report = load::connect(load, shutdown).await?;
            report::print(&report, json)
        }
        Command::Rtt { load } => {
            let json = load.json;
            let report = load::rtt(load, shutdown).await?;
            report::print(&report, json)
        }
        Command::Quic {
            duration,
            warmup,
            json,
        } => {
            let report = quic::run(duration, warmup).await?;
            report::print(&report, json)
        }
        Command::Swarm(args) => swarm::run(args, shutdown).await,
        Command::Table { results } => {
            let text = std::fs::read_to_string(&results)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", results.display()))?;
            print!("{}", report::table(&text)?);
            Ok(())
        }
        Command::Peers { results } => {
            let text = std::fs::read_to_string(&results)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", results.display()))?;
            print!("{}", report::peers_table(&text)?);
            Ok(())
        }
    }
}
