//! The `postern` binary: parse the command line, start logging, turn signals into a shutdown token,
//! run the role.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use postern::config::{self, AgentConfig, GatewayRoleConfig, RelayRoleConfig, ServerConfig};

#[derive(Parser)]
#[command(
    name = "postern",
    version,
    about = "Reach machines in isolated networks by their original IP through SOCKS5"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "POSTERN_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run an agent: keep tunnels to the relays, serve this host's exposed ports.
    Agent {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a relay and a SOCKS5 gateway in one process.
    Server {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a relay alone: agent tunnels in, peer streams from gateways.
    Relay {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the SOCKS5 front door alone, forwarding to relays as a peer.
    Gateway {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run everything on loopback and print a curl line to try.
    Demo {
        /// SOCKS5 listen address (falls back to a free port when taken).
        #[arg(long, default_value = "127.0.0.1:1080")]
        socks5: SocketAddr,
    },
    /// Generate certificates and agent tokens.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Validate a config file and exit non-zero with a precise message when it is wrong.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Which role the file is for (default: guessed from its keys).
        #[arg(long, value_enum)]
        role: Option<CheckRole>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CheckRole {
    Agent,
    Server,
    Relay,
    Gateway,
}

#[derive(Subcommand)]
enum CertCommand {
    /// Create a CA (ca.pem, ca-key.pem) in a directory.
    Ca {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "postern CA")]
        name: String,
    },
    /// Issue a relay, peer or agent certificate signed by the CA in --ca-dir.
    Issue {
        #[arg(long, value_enum)]
        kind: postern::cert::Kind,
        #[arg(long)]
        name: String,
        #[arg(long)]
        ca_dir: PathBuf,
        /// Output directory (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// DNS names (SANs).
        #[arg(long)]
        dns: Vec<String>,
        /// IP addresses (SANs; for agents, the addresses they may claim).
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Generate a random agent token and print it with the SHA-256 a relay config stores.
    Token,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    postern::tls::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("postern: cannot start the runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("postern: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Agent { config } => {
            let config = AgentConfig::load(&config)?;
            let agent = postern::agent::Agent::new(config)?;
            agent.run(shutdown_on_signal()).await
        }
        Command::Server { config } => {
            let config = ServerConfig::load(&config)?;
            let server = postern::server::Process::bind(config).await?;
            run_process(server).await
        }
        Command::Relay { config } => {
            let config = RelayRoleConfig::load(&config)?;
            run_process(postern::server::Process::bind_relay(config, None).await?).await
        }
        Command::Gateway { config } => {
            let config = GatewayRoleConfig::load(&config)?;
            run_process(postern::server::Process::bind_gateway(config, None).await?).await
        }
        Command::Demo { socks5 } => postern::demo::run(socks5, shutdown_on_signal()).await,
        Command::Cert(cmd) => cert(cmd),
        Command::Check { config, role } => {
            let role = role.map(|r| match r {
                CheckRole::Agent => config::Role::Agent,
                CheckRole::Server => config::Role::Server,
                CheckRole::Relay => config::Role::Relay,
                CheckRole::Gateway => config::Role::Gateway,
            });
            let summary = config::check(&config, role)?;
            println!("{summary}");
            Ok(())
        }
    }
}

/// Prints where the process listens (one `ready …` line on stdout, for scripts and tests), then
/// runs it until a signal.
async fn run_process(process: postern::server::Process) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal();
    println!("ready {}", process.addresses());
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    process.run(shutdown).await
}

fn cert(cmd: CertCommand) -> anyhow::Result<()> {
    use postern::cert;
    match cmd {
        CertCommand::Ca { out, name } => {
            let (c, k) = cert::generate_ca(&name)?;
            let (cp, kp) = cert::write_pair(&out, "ca", &c, &k)?;
            println!("wrote {} and {}", cp.display(), kp.display());
        }
        CertCommand::Issue {
            kind,
            name,
            ca_dir,
            out,
            dns,
            ip,
            days,
        } => {
            let read = |f: &str| {
                let p = ca_dir.join(f);
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
            };
            let (c, k) = cert::issue(
                &read("ca.pem")?,
                &read("ca-key.pem")?,
                kind,
                &name,
                &dns,
                &ip,
                days,
            )?;
            let (cp, kp) = cert::write_pair(out.as_deref().unwrap_or(&ca_dir), &name, &c, &k)?;
            println!("wrote {} and {}", cp.display(), kp.display());
        }
        CertCommand::Token => {
            let token = config::hex(&rand::random::<[u8; 24]>());
            println!("token        = {token}");
            println!("token_sha256 = {}", config::token_hash(&token));
        }
    }
    Ok(())
}

/// SIGTERM or SIGINT cancels the returned token (drain); a second signal exits at once.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            tracing::error!("cannot listen for SIGTERM");
            return;
        };
        let mut first = true;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            if !first {
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            }
            first = false;
            tracing::info!("signal received: draining (send again to exit at once)");
            trigger.cancel();
        }
    });
    token
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
