//! `postern demo`: the whole path on loopback in one process — a server (relay + SOCKS5 gateway on an
//! embedded registry), an agent advertising a 127.x address, and a small HTTP service behind it, with
//! certificates generated into a temporary directory.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;
use http_body_util::Full;
use hyper::body::Bytes;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::Agent;
use crate::config::{
    AgentConfig, AgentCredential, GatewayConfig, RegistryConfig, RelayConfig, ServerConfig,
};
use crate::server::Server;
use crate::tls::{Identity, Trust};

/// The address the demo agent claims; the service listens on it (any 127.x address is local).
pub const AGENT_IP: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 1);
pub const AGENT_ID: &str = "demo-agent";

/// What the demo started, for callers that want to drive it (tests).
#[derive(Clone, Debug)]
pub struct DemoInfo {
    pub socks5: SocketAddr,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub service: SocketAddr,
}

/// Runs the demo until `shutdown`, printing how to try it once everything is up.
pub async fn run(
    socks5: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("postern-demo-")
        .tempdir()
        .context("creating a temp dir")?;
    let bundle = crate::cert::generate_bundle(dir.path(), "relay.demo")
        .context("generating certificates")?;
    let token: String = crate::config::hex(&rand::random::<[u8; 16]>());

    let service_listener = TcpListener::bind((AGENT_IP, 0))
        .await
        .with_context(|| format!("binding the demo service on {AGENT_IP}"))?;
    let service = service_listener.local_addr()?;
    let service_task = tokio::spawn(serve_http(service_listener, shutdown.clone()));

    let identity = Identity {
        chain: crate::tls::load_certs(&bundle.relay_cert)?,
        key: crate::tls::load_key(&bundle.relay_key)?,
    };
    // The usual ports when free, any free port otherwise.
    let free_or_any = |addr: SocketAddr| {
        if std::net::TcpListener::bind(addr).is_ok() {
            addr
        } else {
            SocketAddr::new(addr.ip(), 0)
        }
    };
    let socks5 = free_or_any(socks5);
    let http = free_or_any(http);
    let admin = free_or_any(admin);
    let config = ServerConfig {
        relay: RelayConfig {
            drain_grace: Duration::from_secs(2),
            ..RelayConfig::new(
                "relay-demo",
                (Ipv4Addr::LOCALHOST, 0).into(),
                identity,
                vec![AgentCredential::new(
                    "demo",
                    &token,
                    vec!["127.77.0.0/16".parse()?],
                )],
            )
        },
        gateway: GatewayConfig {
            socks5: Some(socks5),
            http: Some(http),
            ..GatewayConfig::default()
        },
        peer: None,
        registry: RegistryConfig::Memory,
        admin: None,
    };
    let server = Server::bind(config).await?;
    let addrs = server.addresses();
    let admin_listener = crate::admin::bind(admin).await?;
    let admin_addr = admin_listener.local_addr()?;
    let admin_state = crate::admin::AdminState {
        role: "server",
        process: Some(server.handle()),
        agent: None,
        shutdown: shutdown.clone(),
    };
    let admin_task = tokio::spawn(crate::admin::serve(
        admin_listener,
        admin_state,
        shutdown.clone(),
    ));
    let cache = server.cache().clone();
    let server_task = tokio::spawn(server.run(shutdown.clone()));

    let relay_addr = addrs.relay.context("no relay address")?;
    let agent = Agent::new(AgentConfig {
        server_name: "localhost".into(),
        redundancy: 1,
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(5),
        drain_grace: Duration::from_secs(2),
        ..AgentConfig::new(
            AGENT_ID,
            vec![relay_addr.to_string()],
            Trust::Ca(crate::tls::load_certs(&bundle.ca)?),
            &token,
            vec![IpAddr::V4(AGENT_IP)],
            vec![crate::protocol::PortRange {
                start: service.port(),
                end: service.port(),
            }],
        )
    })?;
    let mut handle = agent.handle();
    let agent_task = tokio::spawn(agent.run(shutdown.clone()));

    let up = async {
        handle.wait_tunnels(1).await;
        while cache.owners("default", IpAddr::V4(AGENT_IP)).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        r = tokio::time::timeout(Duration::from_secs(20), up) => {
            r.context("the demo agent did not come up within 20s")?;
            print_banner(&DemoInfo {
                socks5: addrs.socks5.context("no SOCKS5 listener")?,
                http: addrs.http.context("no HTTP proxy listener")?,
                admin: admin_addr,
                service,
            });
        }
    }
    shutdown.cancelled().await;
    let _ = agent_task.await;
    let server_result = server_task.await.context("server task")?;
    let _ = admin_task.await;
    let _ = service_task.await;
    server_result
}

fn print_banner(info: &DemoInfo) {
    let (s, h, svc, admin) = (info.socks5, info.http, info.service, info.admin);
    let port = svc.port();
    println!("postern demo is running (Ctrl-C stops it)");
    println!("  SOCKS5 gateway  {s}");
    println!("  HTTP proxy      {h}");
    println!("  status page     http://{admin}/");
    println!(
        "  agent           {AGENT_ID}, IP {AGENT_IP}, exposing port {port} (a small HTTP service)"
    );
    println!();
    println!("Try it:");
    println!("  curl -sS --proxy socks5h://{s} http://{svc}/");
    println!("  curl -sS --proxy socks5h://{s} http://{AGENT_ID}.postern:{port}/");
    println!("  ALL_PROXY=socks5h://{s} curl -sS http://{svc}/");
    println!("  http_proxy=http://{h} curl -sS http://{svc}/");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
}

/// The demo's service: answers every request with a line naming the path it was asked for.
async fn serve_http(listener: TcpListener, shutdown: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = format!("hello from the service behind postern agent {AGENT_ID} (you asked for {})\n", req.uri().path());
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                },
            );
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}
