//! The `postern` binary: parse the command line, start logging, turn signals into a shutdown token,
//! run the role.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use postern::admin::AdminState;
use postern::config::{self, AgentConfig, GatewayRoleConfig, RelayRoleConfig, ServerConfig};
use postern::metrics;
use postern::server::{Process, ProcessHandle};

#[derive(Parser)]
#[command(
    name = "postern",
    version,
    about = "Reach machines in isolated networks by their original IP through SOCKS5 or an HTTP proxy"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "POSTERN_LOG_FORMAT")]
    log_format: LogFormat,
    /// Runtime worker threads. Default: 1 for `agent` (a guest on its host; one thread drives a
    /// tunnel fastest), one per core but one for `server`, `relay`, `gateway`, `demo` and the
    /// `bench socks5` baseline proxy (the kernel's packet processing needs a core too), one per
    /// core for the rest.
    #[arg(long, global = true, env = "POSTERN_WORKER_THREADS")]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

impl From<LogFormat> for postern::logging::Format {
    fn from(format: LogFormat) -> Self {
        match format {
            LogFormat::Text => postern::logging::Format::Text,
            LogFormat::Json => postern::logging::Format::Json,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run an agent: keep tunnels to the relays, serve this host's exposed ports.
    Agent {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a relay and a gateway (SOCKS5 + HTTP proxy) in one process.
    Server {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a relay alone: agent tunnels in, peer streams from gateways.
    Relay {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the front doors alone, forwarding to relays as a peer.
    Gateway {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run everything on loopback and print curl lines to try.
    Demo {
        /// SOCKS5 listen address (a free port when taken).
        #[arg(long, default_value = "127.0.0.1:1080")]
        socks5: SocketAddr,
        /// HTTP proxy listen address (a free port when taken).
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        /// Admin listener with the status page (a free port when taken).
        #[arg(long, default_value = "127.0.0.1:9180")]
        admin: SocketAddr,
    },
    /// Generate certificates and agent tokens.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Load generator and its target: throughput, connection rate, latency; QUIC ceiling; swarm.
    #[command(subcommand)]
    Bench(postern::bench::Command),
    /// Validate a config file and exit non-zero with a precise message when it is wrong.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Which role the file is for (default: guessed from its keys).
        #[arg(long, value_enum)]
        role: Option<CheckRole>,
    },
    /// Summarise a cluster as one process's admin listener sees it.
    Status {
        /// Admin address of a relay, gateway or server.
        #[arg(long, default_value = "127.0.0.1:9180")]
        admin: String,
        /// Print the raw JSON instead.
        #[arg(long)]
        json: bool,
        /// Wait (up to --timeout) until every agent holds tunnels on this many distinct live
        /// relays (or on every live relay, if fewer), then print the summary; exit 1 if they do
        /// not in time. A rolling restart runs `--wait-redundant 2` before the next relay.
        #[arg(long, value_name = "RELAYS")]
        wait_redundant: Option<usize>,
        /// Deadline for the whole command (connect, requests, answers), e.g. "5s", "500ms".
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Which relay(s) and session(s) own an IP right now.
    Lookup {
        ip: std::net::IpAddr,
        #[arg(long, default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "127.0.0.1:9180")]
        admin: String,
        /// Deadline for the whole command (connect, request, answer), e.g. "5s", "500ms".
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
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
        /// Directory to write ca.pem and ca-key.pem into (created when missing).
        #[arg(long)]
        out: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "postern CA")]
        name: String,
    },
    /// Issue a relay, peer or agent certificate signed by the CA in --ca-dir.
    Issue {
        /// What the certificate is for; a relay refuses a certificate of the wrong kind.
        #[arg(long, value_enum)]
        kind: postern::cert::Kind,
        /// Common name, and the file names written: NAME.pem and NAME-key.pem. For an agent, its
        /// agent id.
        #[arg(long)]
        name: String,
        /// Directory holding the CA (ca.pem, ca-key.pem) made by `postern cert ca`.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Output directory (default: the CA directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// DNS name (SAN), repeatable: the names clients verify (a relay's VIP name; agents
        /// dial relays by it as `server_name`).
        #[arg(long)]
        dns: Vec<String>,
        /// IP address (SAN), repeatable: for a relay reached by IP (a VIP without a name); for
        /// an agent, the addresses it may claim.
        #[arg(long)]
        ip: Vec<std::net::IpAddr>,
        /// Validity in days from now.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Generate a random agent token and print it with the SHA-256 a relay config stores.
    Token,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let log_format = postern::logging::Format::from(cli.log_format);
    postern::logging::init(log_format);
    postern::tls::install_crypto_provider();
    let threads = cli
        .worker_threads
        .filter(|n| *n > 0)
        .unwrap_or_else(|| default_worker_threads(&cli.command));
    // One worker runs on the main thread itself (tokio's current-thread scheduler): no second
    // thread to hand work to, no work-stealing bookkeeping on every wake-up. It took 21% off the
    // CPU per proxied connection under 8 concurrent clients (docs/performance.md).
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            postern::logging::fatal(log_format, &format!("cannot start the runtime: {err}"));
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            postern::logging::fatal(log_format, &postern::logging::chain(err.chain()));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Worker threads when none are asked for. Every byte through postern crosses a QUIC connection,
/// which one task drives; each hand-off of its work between worker threads costs a wake-up, and on
/// a machine with few cores those hand-offs, not computation, bound throughput and connection rate
/// (docs/performance.md: one worker per process moved one connection from ~3.0 to ~4.2–4.8 Gbit/s
/// on two cores). An agent runs beside the host's own work, so it takes one thread; the central
/// roles take every core but one, which the kernel's UDP and TCP processing needs.
fn default_worker_threads(command: &Command) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match command {
        Command::Agent { .. } => 1,
        Command::Server { .. }
        | Command::Relay { .. }
        | Command::Gateway { .. }
        | Command::Demo { .. }
        | Command::Bench(postern::bench::Command::Socks5 { .. }) => cores.saturating_sub(1).max(1),
        _ => cores,
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Agent { config } => {
            metrics::init(metrics::Roles::AGENT);
            let cfg = AgentConfig::load(&config)?;
            metrics::metrics().record_config_load(true);
            postern::splice::configure(cfg.transport.splice_limits());
            let admin = cfg.admin;
            let agent = postern::agent::Agent::new(cfg)?;
            let shutdown = shutdown_on_signal();
            let state = AdminState {
                role: "agent",
                process: None,
                agent: Some(agent.handle()),
                shutdown: shutdown.clone(),
            };
            let admin_addr = start_admin(admin, state, &shutdown).await?;
            ready(&format!("admin={}", show(admin_addr)));
            reload_on_hup(config, Role::Agent, None);
            agent.run(shutdown).await
        }
        Command::Server { config: path } => {
            metrics::init(metrics::Roles::SERVER);
            let cfg = ServerConfig::load(&path)?;
            metrics::metrics().record_config_load(true);
            postern::splice::configure(cfg.relay.transport.splice_limits());
            let admin = cfg.admin;
            run_process(
                Process::bind(cfg).await?,
                "server",
                admin,
                path,
                Role::Server,
            )
            .await
        }
        Command::Relay { config: path } => {
            metrics::init(metrics::Roles::RELAY);
            let cfg = RelayRoleConfig::load(&path)?;
            metrics::metrics().record_config_load(true);
            postern::splice::configure(cfg.relay.transport.splice_limits());
            let admin = cfg.admin;
            run_process(
                Process::bind_relay(cfg, None).await?,
                "relay",
                admin,
                path,
                Role::Relay,
            )
            .await
        }
        Command::Gateway { config: path } => {
            metrics::init(metrics::Roles::GATEWAY);
            let cfg = GatewayRoleConfig::load(&path)?;
            metrics::metrics().record_config_load(true);
            postern::splice::configure(cfg.peer.transport.splice_limits());
            let admin = cfg.admin;
            run_process(
                Process::bind_gateway(cfg, None).await?,
                "gateway",
                admin,
                path,
                Role::Gateway,
            )
            .await
        }
        Command::Demo {
            socks5,
            http,
            admin,
        } => {
            // Every role runs in this one process, on a configuration it generates.
            metrics::init(metrics::Roles::ALL);
            metrics::metrics().record_config_load(true);
            postern::demo::run(socks5, http, admin, shutdown_on_signal()).await
        }
        Command::Cert(cmd) => cert(cmd),
        Command::Bench(cmd) => postern::bench::run(cmd, shutdown_on_signal()).await,
        Command::Check { config, role } => {
            let role = role.map(|r| match r {
                CheckRole::Agent => config::Role::Agent,
                CheckRole::Server => config::Role::Server,
                CheckRole::Relay => config::Role::Relay,
                CheckRole::Gateway => config::Role::Gateway,
            });
            let summary = config::check(&config, role)?;
            print_out(&format!("{summary}\n"));
            Ok(())
        }
        Command::Status {
            admin,
            json,
            wait_redundant,
            timeout,
        } => {
            if let Some(want) = wait_redundant {
                let text = postern::admin::client::wait_redundant(&admin, want, timeout).await?;
                print_out(&text);
                return Ok(());
            }
            let text = postern::admin::client::status(&admin, json, timeout).await?;
            print_out(&text);
            Ok(())
        }
        Command::Lookup {
            ip,
            namespace,
            admin,
            timeout,
        } => {
            let text = postern::admin::client::lookup(&admin, &namespace, ip, timeout).await?;
            print_out(&text);
            Ok(())
        }
    }
}

#[derive(Clone, Copy)]
enum Role {
    Agent,
    Server,
    Relay,
    Gateway,
}

fn show(addr: Option<SocketAddr>) -> String {
    addr.map_or("off".to_string(), |a| a.to_string())
}

async fn start_admin(
    addr: Option<SocketAddr>,
    state: AdminState,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<SocketAddr>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = postern::admin::bind(addr).await?;
    let bound = listener.local_addr()?;
    // The admin listener outlives the drain (readiness reports it) and stops with the process.
    let _ = shutdown;
    tokio::spawn(postern::admin::serve(
        listener,
        state,
        CancellationToken::new(),
    ));
    Ok(Some(bound))
}

/// Prints the one `ready …` line scripts and tests wait for, and tells systemd (`Type=notify`).
fn ready(details: &str) {
    println!("ready {details}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
}

/// Runs a relay / gateway / server with its admin listener until a signal; SIGHUP reloads.
async fn run_process(
    process: Process,
    role: &'static str,
    admin: Option<SocketAddr>,
    path: PathBuf,
    reload_role: Role,
) -> anyhow::Result<()> {
    let shutdown = shutdown_on_signal();
    let handle = process.handle();
    let state = AdminState {
        role,
        process: Some(handle.clone()),
        agent: None,
        shutdown: shutdown.clone(),
    };
    let admin_addr = start_admin(admin, state, &shutdown).await?;
    ready(&format!(
        "{} admin={}",
        process.addresses(),
        show(admin_addr)
    ));
    reload_on_hup(path, reload_role, Some(handle));
    let result = process.run(shutdown).await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    result
}

/// On SIGHUP, re-reads `path` and applies what may change at run time (agent credentials, users,
/// client allowlist, rules). An invalid file is refused with its precise error; the running config
/// stays in force. `postern_config_last_reload_successful` and
/// `postern_config_last_reload_success_timestamp_seconds` report the outcome, as Prometheus does
/// for its own reloads.
fn reload_on_hup(path: PathBuf, role: Role, handle: Option<ProcessHandle>) {
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::error!("cannot listen for SIGHUP; reload disabled");
            return;
        };
        while hup.recv().await.is_some() {
            let result: Result<(), config::Error> = (|| {
                match role {
                    Role::Agent => {
                        AgentConfig::load(&path)?;
                        tracing::warn!(
                            "agent settings apply at start only: restart the agent to use them"
                        );
                    }
                    Role::Server => {
                        let c = ServerConfig::load(&path)?;
                        if let Some(h) = &handle {
                            h.reload(Some(c.relay.agents), Some(&c.gateway));
                        }
                    }
                    Role::Relay => {
                        let c = RelayRoleConfig::load(&path)?;
                        if let Some(h) = &handle {
                            h.reload(Some(c.relay.agents), None);
                        }
                    }
                    Role::Gateway => {
                        let c = GatewayRoleConfig::load(&path)?;
                        if let Some(h) = &handle {
                            h.reload(None, Some(&c.gateway));
                        }
                    }
                }
                Ok(())
            })();
            metrics::metrics().record_config_load(result.is_ok());
            match result {
                Ok(()) => {
                    tracing::info!(config = %path.display(), "configuration reloaded (agent credentials; gateway users, client allowlist, rules, default namespace, per-client limit)")
                }
                Err(err) => {
                    tracing::error!(config = %path.display(), %err, "reload refused; the running configuration stays in force")
                }
            }
        }
    });
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

/// Writes a command's result to stdout. A reader that went away (`postern check … | head`) is not
/// an error worth a panic: what it did not read, it did not want.
fn print_out(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}
