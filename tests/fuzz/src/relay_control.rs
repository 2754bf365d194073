//! The relay's agent endpoint under hostile bytes, over a real QUIC connection: one relay (with a
//! memory registry) runs in this process for all inputs; each input is written, as an agent would,
//! on the control stream of a fresh QUIC connection (ALPN `postern/1`, TLS 1.3 against the
//! relay's certificate), followed by FIN. The relay's answers are read until it ends the stream,
//! and how it closed the connection is recorded. Seeds carry [`TOKEN`], so the fuzzer gets past
//! the hello into the control loop.
//!
//! A panic anywhere in the process — in a relay task too, which tokio would otherwise swallow —
//! fails the input.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use postern::config::{
    AgentCredential, GatewayConfig, RegistryConfig, RelayConfig, ServerConfig, Transport,
};
use postern::protocol::{self, Message};
use postern::registry::memory::MemoryRegistry;
use postern::registry::Registry;
use postern::server::Server;
use postern::tls::{Identity, Trust};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// The token the relay admits; the seeds that get past the hello carry it.
pub const TOKEN: &str = "fuzz-agent-token";
/// What that token may claim; the seeds claim inside it.
pub const ALLOW: &str = "127.99.0.0/16";
/// How long one input may take: the input ends with FIN, so the relay answers at once; only a
/// hung relay comes near this.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(10);
/// How long to wait for the relay to close the connection once its answer has ended.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// What the relay did with one input.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The messages the relay sent on the control stream, in order.
    pub messages: Vec<Message>,
    /// The relay's application close (code, reason), when it closed the connection with one.
    pub closed: Option<(u64, String)>,
}

struct Harness {
    runtime: Runtime,
    relay_addr: SocketAddr,
    relay: Arc<postern::relay::Relay>,
    client: quinn::Endpoint,
    _shutdown: CancellationToken,
    _dir: PathBuf,
}

static PANICKED: AtomicBool = AtomicBool::new(false);

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        postern::tls::install_crypto_provider();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            previous(info);
        }));
        let dir = std::env::temp_dir().join(format!("postern-fuzz-relay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let bundle = postern::cert::generate_bundle(&dir, "localhost").expect("certificates");
        let identity = Identity {
            chain: postern::tls::load_certs(&bundle.relay_cert).expect("relay cert"),
            key: postern::tls::load_key(&bundle.relay_key).expect("relay key"),
        };
        let trust = Trust::Ca(postern::tls::load_certs(&bundle.ca).expect("ca"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let shutdown = CancellationToken::new();
        let (relay, relay_addr, client) = runtime.block_on(async {
            let config = ServerConfig {
                relay: RelayConfig {
                    drain_grace: Duration::from_millis(100),
                    ..RelayConfig::new(
                        "fuzz-relay",
                        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                        identity,
                        vec![AgentCredential::new(
                            "fuzz",
                            TOKEN,
                            vec![ALLOW.parse().expect("a CIDR")],
                        )],
                    )
                },
                gateway: GatewayConfig {
                    socks5: None,
                    http: None,
                    ..GatewayConfig::default()
                },
                peer: None,
                registry: RegistryConfig::Memory,
                admin: None,
            };
            let registry: Arc<dyn Registry> = Arc::new(MemoryRegistry::new());
            let server = Server::bind_with_registry(config, registry)
                .await
                .expect("the relay binds");
            let relay = server.relay().expect("a relay").clone();
            let addr = server.addresses().relay.expect("a relay address");
            tokio::spawn(server.run(shutdown.clone()));
            while !relay.is_registered() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut client = postern::tls::bind_endpoint(
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                None,
                1 << 20,
            )
            .expect("a client endpoint");
            client.set_default_client_config(
                postern::tls::client_config(
                    &trust,
                    protocol::ALPN_AGENT,
                    None,
                    Arc::new(Transport::default().quinn(16)),
                )
                .expect("a client config"),
            );
            (relay, addr, client)
        });
        Harness {
            runtime,
            relay_addr,
            relay,
            client,
            _shutdown: shutdown,
            _dir: dir,
        }
    })
}

/// Writes `data` on the control stream of a fresh connection to the relay, then FIN; returns
/// what the relay answered and how it closed. Panics if anything in the process panicked, if
/// the relay hangs, or if it stops accepting connections.
pub fn relay_control(data: &[u8]) -> Outcome {
    let h = harness();
    let outcome = h.runtime.block_on(async {
        let exchange = async {
            let conn = h
                .client
                .connect(h.relay_addr, "localhost")
                .expect("a connect")
                .await
                .expect("the relay completes a QUIC handshake");
            let mut outcome = Outcome::default();
            if let Ok((mut send, mut recv)) = conn.open_bi().await {
                // The relay may close before reading it all; that is an answer too.
                let _ = send.write_all(data).await;
                let _ = send.finish();
                let mut frames = protocol::FrameReader::default();
                while let Ok(msg) = frames.next(&mut recv).await {
                    outcome.messages.push(msg);
                }
            }
            if let Ok(quinn::ConnectionError::ApplicationClosed(close)) =
                tokio::time::timeout(CLOSE_WAIT, conn.closed()).await
            {
                outcome.closed = Some((
                    close.error_code.into_inner(),
                    String::from_utf8_lossy(&close.reason).into_owned(),
                ));
            }
            conn.close(0u32.into(), b"input done");
            outcome
        };
        tokio::time::timeout(EXCHANGE_LIMIT, exchange)
            .await
            .expect("the relay answered within the limit")
    });
    assert!(
        !PANICKED.load(Ordering::SeqCst),
        "something in the process panicked"
    );
    outcome
}

/// A hello the relay admits: `agent_id` claiming `ip` (inside [`ALLOW`]) with [`TOKEN`].
pub fn valid_hello(agent_id: &str, ip: Ipv4Addr) -> Vec<u8> {
    protocol::encode(&Message::Hello(protocol::Hello {
        agent_id: agent_id.to_string(),
        namespace: "default".to_string(),
        ips: vec![ip.into()],
        ports: vec![protocol::PortRange { start: 80, end: 80 }],
        token: TOKEN.to_string().into(),
    }))
    .expect("a hello encodes")
}

/// Connections the relay holds now (handshakes and hellos included).
pub fn relay_connections() -> usize {
    harness().relay.open_connections()
}

/// This process's resident set size in KiB (Linux), for the fuzz log.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}
