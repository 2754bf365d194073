//! Issue 13's holes, tried as an attacker would, on real sockets and real processes: requests
//! pipelined into one read, URL userinfo, certificates marked for two roles, and tokens in a
//! debug-level relay log.
//!
//! Each test owns the addresses `127.N.0.0/16` (N = 131…134).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use postern::config::{GatewayConfig, PeerConfig, Transport};
use postern::protocol::{self, Code, Forward, Hello, Message, PortRange};
use postern::tls::{Identity, Trust};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

// ---------------------------------------------------------------------------------------------
// A service that records every byte it receives.

/// Everything each connection to a [`recording_service`] sent, in accept order.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Vec<u8>>>>);

impl Received {
    fn all(&self) -> Vec<String> {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .map(|b| String::from_utf8_lossy(b).to_string())
            .collect()
    }
}

/// Whether `data` holds a complete request: a head, and its `Content-Length` or chunked body.
fn complete_request(data: &[u8]) -> bool {
    let Some(end) = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
    else {
        return false;
    };
    let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
    if head.contains("\r\ntransfer-encoding: chunked\r\n") {
        return data[end..].ends_with(b"0\r\n\r\n");
    }
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim() == "content-length")
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    data.len() >= end + length
}

/// An HTTP service that records every byte of every connection (as it arrives), answers each
/// complete request `200 got <request line>` with `Connection: close`, and keeps recording until
/// the peer closes.
async fn recording_service(addr: SocketAddr) -> (Service, Received) {
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let received = Received::default();
    let log = received.clone();
    let service = Service::serve(listener, move |mut tcp: TcpStream, seen| {
        let log = log.clone();
        async move {
            let slot = {
                let mut all = log.0.lock().expect("lock");
                all.push(Vec::new());
                all.len() - 1
            };
            let mut answered = false;
            let mut buf = [0u8; 4096];
            loop {
                let n = match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                seen.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
                let data = {
                    let mut all = log.0.lock().expect("lock");
                    all[slot].extend_from_slice(&buf[..n]);
                    all[slot].clone()
                };
                if !answered && complete_request(&data) {
                    answered = true;
                    let head = String::from_utf8_lossy(&data);
                    let body = format!("got {}\n", head.lines().next().unwrap_or_default());
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    if tcp.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    (service, received)
}

// ---------------------------------------------------------------------------------------------
// 13.2: every request on a connection gets the smuggling checks, pipelined or not.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_in_one_read_get_the_same_smuggling_checks() {
    init();
    let pki = Pki::new();
    let net = 131;
    let agent_ip = ip(net, 0, 10);
    let (service, received) = recording_service(sa(agent_ip, 0)).await;
    let stack = Stack::start(&pki, net, 0, GatewayConfig::default(), |_| {}).await;
    let _agent = stack
        .start_agent(stack.agent("pipelined", "default", &[agent_ip], &[service.addr.port()]))
        .await;
    let t = service.addr.to_string();
    let unexposed = sa(agent_ip, 1).to_string();

    let get = format!("GET http://{t}/first HTTP/1.1\r\nHost: {t}\r\n\r\n");
    let post =
        format!("POST http://{t}/first HTTP/1.1\r\nHost: {t}\r\nContent-Length: 5\r\n\r\nhello");
    let chunked = format!(
        "POST http://{t}/first HTTP/1.1\r\nHost: {t}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let connect = format!("CONNECT {unexposed} HTTP/1.1\r\nHost: {unexposed}\r\n\r\n");
    let cl_te = format!(
        "POST http://{t}/smuggled HTTP/1.1\r\nHost: {t}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    let bare_lf = format!("GET http://{t}/smuggled HTTP/1.1\nHost: {t}\r\n\r\n");
    let firsts = [
        ("a GET", &get, "HTTP/1.1 200 OK"),
        ("a POST with a body", &post, "HTTP/1.1 200 OK"),
        ("a chunked POST", &chunked, "HTTP/1.1 200 OK"),
        ("a refused CONNECT", &connect, "HTTP/1.1 403 Forbidden"),
    ];
    let seconds = [
        ("Content-Length with Transfer-Encoding", &cl_te),
        ("a bare LF", &bare_lf),
    ];
    let mut wrong = Vec::new();
    let mut forwarded = 0;
    for (first_what, first, first_status) in &firsts {
        for (second_what, second) in &seconds {
            let case = format!("{second_what} after {first_what}");
            // Both requests in one write: they reach the gateway in one read.
            let mut conn = HttpConn::open(stack.http).await;
            conn.send(format!("{first}{second}").as_bytes()).await;
            let one = conn.response(false).await;
            assert_eq!(one.status_line, *first_status, "{case}: the first request");
            if one.status == 200 {
                forwarded += 1;
                let method = first.split(' ').next().unwrap_or_default();
                assert_eq!(one.text(), format!("got {method} /first HTTP/1.1\n"));
            }
            let two = conn.response(false).await;
            let rest = conn.rest_until_closed().await;
            if two.status_line != "HTTP/1.1 400 Bad Request" || !rest.is_empty() {
                wrong.push(format!(
                    "{case}: {:?} ({}), then {} more bytes",
                    two.status_line,
                    two.text().trim(),
                    rest.len()
                ));
            }
        }
    }
    let seen = received.all();
    let smuggled: Vec<&String> = seen.iter().filter(|r| r.contains("smuggled")).collect();
    assert!(
        wrong.is_empty() && smuggled.is_empty(),
        "pipelined requests got through:\n{}\nthe service received:\n{smuggled:#?}",
        wrong.join("\n")
    );
    // Exactly the legitimate first requests reached the service, each complete and alone.
    assert_eq!(seen.len(), forwarded, "{seen:#?}");
    assert!(
        seen.iter()
            .all(|r| r.starts_with("POST /first HTTP/1.1\r\n")
                || r.starts_with("GET /first HTTP/1.1\r\n")),
        "{seen:#?}"
    );
    assert_eq!(seen.iter().filter(|r| r.ends_with("hello")).count(), 2);
    assert_eq!(
        seen.iter()
            .filter(|r| r.ends_with("5\r\nhello\r\n0\r\n\r\n"))
            .count(),
        2
    );

    // A head beyond max_header_bytes (16 KiB) is refused and the connection closed.
    let mut conn = HttpConn::open(stack.http).await;
    let padding = "a".repeat(20 * 1024);
    conn.send(format!("GET http://{t}/large HTTP/1.1\r\nX-Pad: {padding}\r\n\r\n").as_bytes())
        .await;
    let large = conn.response(false).await;
    assert!([400, 431].contains(&large.status), "{}", large.status_line);
    assert!(conn.rest_until_closed().await.is_empty());
    assert_eq!(received.all().len(), forwarded);

    // The control: the same requests on one connection, each well-formed, are all forwarded.
    let mut conn = HttpConn::open(stack.http).await;
    conn.send(format!("{get}{post}{chunked}").as_bytes()).await;
    for _ in 0..3 {
        assert_eq!(conn.response(false).await.status_line, "HTTP/1.1 200 OK");
    }
    assert_eq!(received.all().len(), forwarded + 3);
}

// ---------------------------------------------------------------------------------------------
// 13.5: URL userinfo never reaches the service.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_userinfo_is_never_forwarded() {
    init();
    let pki = Pki::new();
    let net = 132;
    let agent_ip = ip(net, 0, 10);
    let (service, received) = recording_service(sa(agent_ip, 0)).await;
    let stack = Stack::start(&pki, net, 0, GatewayConfig::default(), |_| {}).await;
    let _agent = stack
        .start_agent(stack.agent("userinfo", "default", &[agent_ip], &[service.addr.port()]))
        .await;
    let t = service.addr.to_string();

    // Absolute-form: the userinfo is dropped from the target and from Host.
    for (userinfo, path) in [("user:secret@", "/x"), ("user@", "/y"), (":secret@", "/z")] {
        let raw = format!(
            "GET http://{userinfo}{t}{path}?q=1 HTTP/1.1\r\nHost: {userinfo}{t}\r\nConnection: close\r\n\r\n"
        );
        let response = http_exchange(stack.http, raw.as_bytes()).await;
        assert_eq!(response.status_line, "HTTP/1.1 200 OK", "{userinfo}");
        assert_eq!(response.text(), format!("got GET {path}?q=1 HTTP/1.1\n"));
    }
    let seen = received.all();
    assert_eq!(seen.len(), 3, "{seen:#?}");
    for head in &seen {
        let hosts: Vec<&str> = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
            .map(|(_, v)| v.trim())
            .collect();
        assert_eq!(hosts, vec![t.as_str()], "{head}");
        assert!(
            !head.contains("secret") && !head.contains("user") && !head.contains('@'),
            "userinfo reached the service: {head}"
        );
    }

    // CONNECT: an authority with userinfo is refused, and nothing is dialled.
    for authority in [format!("user:secret@{t}"), format!("user@{t}")] {
        let refused = http_exchange(
            stack.http,
            format!("CONNECT {authority} HTTP/1.1\r\nHost: {t}\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(
            refused.status_line, "HTTP/1.1 400 Bad Request",
            "{authority}"
        );
        assert!(refused.text().contains("userinfo"), "{}", refused.text());
    }
    assert_eq!(service.accepted(), 3, "a CONNECT with userinfo was dialled");
}

// ---------------------------------------------------------------------------------------------
// A real relay process for 13.4 and 13.6.

/// Runs the `postern` binary to completion; returns (success, stdout, stderr).
async fn postern(args: &[&str]) -> (bool, String, String) {
    let output = within(
        IO,
        "postern command",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run postern");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

/// `postern server` (a relay and its gateway in one process, on a memory registry) in a child
/// process, killed on drop; its stderr in `log`.
struct RelayProcess {
    _child: tokio::process::Child,
    agents: SocketAddr,
    peers: SocketAddr,
    log: PathBuf,
}

impl RelayProcess {
    /// A relay on `127.net.0.1` (front doors on `127.net.0.2`) asking agents for certificates from `pki`'s CA, with a peer
    /// endpoint, and one token credential for `127.net.0.0/24`.
    async fn start(pki: &Pki, dir: &Path, net: u8, token: &str, rust_log: &str) -> Self {
        let b = &pki.bundle;
        let config = format!(
            r#"[relay]
id = "relay-{net}"
listen = "127.{net}.0.1:0"
peer_listen = "127.{net}.0.1:0"
cert = "{cert}"
key = "{key}"
agent_ca = "{ca}"
[[relay.agents]]
name = "vpc"
token_sha256 = "{hash}"
allow = ["127.{net}.0.0/24"]
[gateway]
socks5 = "127.{net}.0.2:0"
http = "127.{net}.0.2:0"
[peer]
ca = "{ca}"
cert = "{peer_cert}"
key = "{peer_key}"
[admin]
listen = "off"
"#,
            cert = b.relay_cert.display(),
            key = b.relay_key.display(),
            ca = b.ca.display(),
            peer_cert = b.peer_cert.display(),
            peer_key = b.peer_key.display(),
            hash = postern::config::token_hash(token),
        );
        let path = dir.join("server.toml");
        std::fs::write(&path, config).expect("write server.toml");
        let log = dir.join("relay.log");
        let stderr = std::fs::File::create(&log).expect("relay.log");
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["server", "--config"])
            .arg(&path)
            .env("RUST_LOG", rust_log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("start postern server");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = within(READY, "relay ready line", lines.next_line())
            .await
            .expect("read stdout")
            .unwrap_or_else(|| {
                panic!(
                    "relay exited: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let addr = |key: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|p| p.strip_prefix(&format!("{key}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        };
        RelayProcess {
            agents: addr("relay"),
            peers: addr("peer"),
            _child: child,
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).expect("relay log")
    }
}

/// A QUIC client endpoint for `alpn`, with an optional client certificate.
fn client(trust: &Trust, alpn: &[u8], identity: Option<Identity>) -> quinn::Endpoint {
    let mut endpoint =
        postern::tls::bind_endpoint(sa(Ipv4Addr::LOCALHOST, 0), None, 1 << 20).expect("endpoint");
    let transport = if alpn == protocol::ALPN_PEER {
        PeerConfig::default_transport().quinn(0)
    } else {
        Transport::default().quinn(16)
    };
    endpoint.set_default_client_config(
        postern::tls::client_config(trust, alpn, identity, Arc::new(transport))
            .expect("client config"),
    );
    endpoint
}

/// Dials `addr`, opens one stream, writes `frames` and reads one answer.
async fn exchange(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    frames: &[Vec<u8>],
) -> anyhow::Result<Message> {
    let attempt = async {
        let conn = endpoint
            .connect(addr, "postern-relay")?
            .await
            .context("QUIC handshake")?;
        let (mut send, mut recv) = conn.open_bi().await.context("stream")?;
        for frame in frames {
            send.write_all(frame).await.context("write")?;
        }
        let answer = protocol::read_message(&mut recv).await;
        conn.close(0u32.into(), b"test done");
        Ok(answer?)
    };
    within(IO, "exchange with the relay", attempt).await
}

fn frame(msg: &Message) -> Vec<u8> {
    protocol::encode(msg).expect("encode")
}

/// A frame whose body is `json` as given, valid or not.
fn raw_frame(json: &str) -> Vec<u8> {
    let mut frame = vec![protocol::VERSION];
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(json.as_bytes());
    frame
}

fn hello(token: &str, ips: &[Ipv4Addr]) -> Hello {
    Hello {
        agent_id: "agent-13".into(),
        namespace: "default".into(),
        ips: ips.iter().map(|i| IpAddr::V4(*i)).collect(),
        ports: vec![PortRange {
            start: 9100,
            end: 9100,
        }],
        token: token.into(),
    }
}

/// A leaf signed by `pki`'s CA with exactly these DNS and IP SANs and client-auth usage, made with
/// rcgen directly: what any issuer could hand out, whatever `postern cert` refuses.
fn forged(pki: &Pki, dns: &[&str], ips: &[IpAddr]) -> Identity {
    let ca_pem = std::fs::read_to_string(&pki.bundle.ca).expect("ca.pem");
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(&pki.bundle.ca_key).expect("ca-key.pem"))
            .expect("ca key");
    let ca = rcgen::CertificateParams::from_ca_cert_pem(&ca_pem)
        .expect("ca params")
        .self_signed(&ca_key)
        .expect("ca");
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        // The agent id the hellos below use: a certificate admits only the agent named by it.
        .push(rcgen::DnType::CommonName, "agent-13");
    params.subject_alt_names = dns
        .iter()
        .map(|d| rcgen::SanType::DnsName((*d).try_into().expect("dns name")))
        .chain(ips.iter().map(|i| rcgen::SanType::IpAddress(*i)))
        .collect();
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("sign");
    Identity {
        chain: postern::tls::parse_certs_pem(cert.pem().as_bytes()).expect("cert pem"),
        key: postern::tls::parse_key_pem(key.serialize_pem().as_bytes()).expect("key pem"),
    }
}

// ---------------------------------------------------------------------------------------------
// 13.4: a certificate has one role; one marked for two is admitted as neither.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_role_certificates_are_refused_by_the_tool_and_admitted_by_no_relay() {
    init();
    let pki = Pki::new();
    let net = 133;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_dir = dir.path().join("pki");
    let ca_arg = ca_dir.to_str().expect("utf-8 path");

    // The tool: a name reserved for another role is refused with a clear message, nothing written.
    let (ok, _, stderr) = postern(&["cert", "ca", "--out", ca_arg]).await;
    assert!(ok, "cert ca: {stderr}");
    for (kind, name, role) in [
        ("peer", "postern-agent", "agent"),
        ("relay", "postern-agent", "agent"),
        ("agent", "postern-peer", "peer"),
        ("peer", "POSTERN-AGENT", "agent"),
    ] {
        let stem = format!("{kind}-{}", name.to_lowercase());
        let (ok, _, stderr) = postern(&[
            "cert", "issue", "--kind", kind, "--name", &stem, "--ca-dir", ca_arg, "--dns", name,
        ])
        .await;
        assert!(!ok, "--kind {kind} --dns {name} was issued");
        assert!(
            stderr.contains(&format!("{name:?} marks {role} certificates"))
                && stderr.contains(&format!("a {kind} certificate may not carry it")),
            "--kind {kind} --dns {name}: {stderr}"
        );
        assert!(!ca_dir.join(format!("{stem}.pem")).exists());
    }
    let (ok, stdout, stderr) = postern(&[
        "cert",
        "issue",
        "--kind",
        "peer",
        "--name",
        "peer",
        "--ca-dir",
        ca_arg,
        "--dns",
        "gateway.internal",
    ])
    .await;
    assert!(ok && stdout.contains("peer.pem"), "a plain peer: {stderr}");

    // The relay: a certificate carrying both role names, however made, is neither an agent nor a
    // peer.
    let token = "token-for-133";
    let relay = RelayProcess::start(&pki, dir.path(), net, token, "info").await;
    let claimed = ip(net, 1, 1);
    let trust = pki.trust();
    let both = forged(
        &pki,
        &["postern-agent", "postern-peer"],
        &[IpAddr::V4(claimed)],
    );
    let agent_only = forged(&pki, &["postern-agent"], &[IpAddr::V4(claimed)]);
    let peer_only = forged(&pki, &["postern-peer"], &[]);

    let as_agent = |identity: Identity| {
        let endpoint = client(&trust, protocol::ALPN_AGENT, Some(identity));
        let agents = relay.agents;
        async move {
            let answer = exchange(
                &endpoint,
                agents,
                &[frame(&Message::Hello(hello("", &[claimed])))],
            )
            .await;
            endpoint.close(0u32.into(), b"done");
            answer
        }
    };
    match as_agent(both.clone()).await {
        Ok(Message::Reject(reject)) => assert_eq!(reject.code, Code::NotAllowed, "{reject:?}"),
        other => panic!("a certificate marked agent and peer joined as an agent: {other:?}"),
    }
    // The control: the same certificate without the peer name is an agent for that address.
    match as_agent(agent_only).await {
        Ok(Message::Welcome(_)) => {}
        other => panic!("a plain agent certificate was not welcomed: {other:?}"),
    }

    let as_peer = |identity: Identity| {
        let endpoint = client(&trust, protocol::ALPN_PEER, Some(identity));
        let peers = relay.peers;
        async move {
            let forward = Forward {
                namespace: "default".into(),
                target: sa(claimed, 9100),
                session_id: None,
            };
            let answer = exchange(&endpoint, peers, &[frame(&Message::Forward(forward))]).await;
            endpoint.close(0u32.into(), b"done");
            answer
        }
    };
    let answer = as_peer(both).await;
    assert!(
        answer.is_err(),
        "a certificate marked agent and peer forwarded: {answer:?}"
    );
    match as_peer(peer_only).await {
        Ok(Message::ForwardResult(_)) => {}
        other => panic!("a plain peer certificate got no answer: {other:?}"),
    }
    let log = relay.log();
    assert!(
        log.contains("peer connection without a peer certificate refused"),
        "{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// 13.6: a token never reaches a log, even at debug level.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debug_level_relay_never_logs_a_token() {
    init();
    let pki = Pki::new();
    let net = 134;
    let dir = tempfile::tempdir().expect("temp dir");
    let token = format!("tok{}", postern::config::hex(&rand::random::<[u8; 12]>()));
    let relay = RelayProcess::start(&pki, dir.path(), net, &token, "debug").await;
    let trust = pki.trust();
    let inside = ip(net, 0, 5);
    let outside = ip(net, 9, 9);
    let agent = client(&trust, protocol::ALPN_AGENT, None);

    // A claim the credential does not allow: rejected, and the rejection logged.
    match exchange(
        &agent,
        relay.agents,
        &[frame(&Message::Hello(hello(&token, &[outside])))],
    )
    .await
    {
        Ok(Message::Reject(reject)) => assert_eq!(reject.code, Code::NotAllowed),
        other => panic!("expected a reject: {other:?}"),
    }
    // Malformed hellos carrying the token, also where a value of another type belongs.
    for json in [
        format!(
            r#"{{"type":"hello","agent_id":"a","namespace":"default","ips":[],"ports":"{token}","token":"{token}"}}"#
        ),
        format!(
            r#"{{"type":"hello","agent_id":"a","namespace":"default","ips":["{token}"],"ports":[],"token":"{token}"}}"#
        ),
        format!(r#"{{"type":"hello","agent_id":{{"{token}":1}},"token":"{token}"}}"#),
        format!(r#"["{token}"]"#),
    ] {
        let answer = exchange(&agent, relay.agents, &[raw_frame(&json)]).await;
        assert!(answer.is_err(), "{json} was answered: {answer:?}");
    }
    // A valid hello, then an unexpected one on the control stream.
    let welcomed = hello(&token, &[inside]);
    let answer = exchange(
        &agent,
        relay.agents,
        &[
            frame(&Message::Hello(welcomed.clone())),
            frame(&Message::Hello(welcomed.clone())),
        ],
    )
    .await;
    // The welcome may or may not arrive before the relay closes the tunnel for the second hello.
    let closed = |e: &anyhow::Error| format!("{e:#}").contains("unexpected control message");
    assert!(
        matches!(answer, Ok(Message::Welcome(_))) || answer.as_ref().is_err_and(closed),
        "expected a welcome or the close: {answer:?}"
    );
    // A hello sent to the peer endpoint instead of a Forward.
    let peer = client(&trust, protocol::ALPN_PEER, Some(pki.peer_identity()));
    let answer = exchange(&peer, relay.peers, &[frame(&Message::Hello(welcomed))]).await;
    assert!(
        answer.is_err(),
        "a hello was answered as a forward: {answer:?}"
    );

    // Every event above is in the log, at debug level; the token is not.
    let log = wait_for_log(
        &relay,
        &[
            "agent rejected",
            "reading hello",
            "unexpected message hello",
            "peer stream without Forward",
        ],
    )
    .await;
    assert!(log.contains("DEBUG"), "not at debug level:\n{log}");
    assert!(
        !log.contains(&token),
        "the token is in the relay's log:\n{}",
        log.lines()
            .filter(|l| l.contains(&token))
            .collect::<Vec<_>>()
            .join("\n")
    );
    agent.close(0u32.into(), b"done");
    peer.close(0u32.into(), b"done");
}

/// Waits until the relay's log holds every one of `needles`; returns it.
async fn wait_for_log(relay: &RelayProcess, needles: &[&str]) -> String {
    wait_until(READY, &format!("the relay logs {needles:?}"), || {
        let log = relay.log();
        needles.iter().all(|n| log.contains(*n))
    })
    .await;
    relay.log()
}

// ---------------------------------------------------------------------------------------------
// A credential's reach is bounded: an agent claims at most `MAX_AGENT_IPS` addresses and exposes
// at most `MAX_AGENT_PORT_RANGES` port ranges in a hello, and one agent id holds at most `MAX_TUNNELS_PER_AGENT` tunnels on a relay, so a token holder
// cannot make a relay publish routes without end.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_holder_cannot_claim_addresses_or_tunnels_without_bound() {
    init();
    let pki = Pki::new();
    let net = 144;
    let dir = tempfile::tempdir().expect("temp dir");
    let token = format!("tok{}", postern::config::hex(&rand::random::<[u8; 12]>()));
    let relay = RelayProcess::start(&pki, dir.path(), net, &token, "info").await;
    let agent = client(&pki.trust(), protocol::ALPN_AGENT, None);

    // One address past the bound: refused for the count, before any address is looked at.
    let many: Vec<Ipv4Addr> = (0..=protocol::MAX_AGENT_IPS as u32)
        .map(|i| Ipv4Addr::from(u32::from(ip(net, 0, 0)) + i))
        .collect();
    match exchange(
        &agent,
        relay.agents,
        &[frame(&Message::Hello(hello(&token, &many)))],
    )
    .await
    {
        Ok(Message::Reject(reject)) => {
            assert_eq!(reject.code, Code::BadRequest, "{reject:?}");
            assert!(
                reject.reason.contains("claims 1025 IPs") && reject.reason.contains("at most 1024"),
                "{reject:?}"
            );
        }
        other => panic!("a hello claiming 1025 addresses was not rejected: {other:?}"),
    }
    // Every route carries the agent's port ranges: one past their bound is refused too.
    let ranges: Vec<PortRange> = (0..=protocol::MAX_AGENT_PORT_RANGES as u16)
        .map(|i| PortRange {
            start: 1000 + 2 * i,
            end: 1000 + 2 * i,
        })
        .collect();
    let wide = Hello {
        ports: ranges,
        ..hello(&token, &[ip(net, 0, 1)])
    };
    match exchange(&agent, relay.agents, &[frame(&Message::Hello(wide))]).await {
        Ok(Message::Reject(reject)) => {
            assert_eq!(reject.code, Code::BadRequest, "{reject:?}");
            assert!(
                reject.reason.contains("exposes 65 port ranges")
                    && reject.reason.contains("at most 64"),
                "{reject:?}"
            );
        }
        other => panic!("a hello exposing 65 port ranges was not rejected: {other:?}"),
    }
    // Every address of the credential's /24 is within the bound: welcomed.
    let all: Vec<Ipv4Addr> = (0..=255u8).map(|d| ip(net, 0, d)).collect();
    match exchange(
        &agent,
        relay.agents,
        &[frame(&Message::Hello(hello(&token, &all)))],
    )
    .await
    {
        Ok(Message::Welcome(_)) => {}
        other => panic!("a hello claiming a whole /24 was refused: {other:?}"),
    }

    // Tunnels of one agent id, held open: the bound's worth are welcomed, one more is rejected.
    let tunnel = || async {
        let conn = agent.connect(relay.agents, "postern-relay")?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&frame(&Message::Hello(hello(&token, &[ip(net, 0, 7)]))))
            .await?;
        let answer = protocol::read_message(&mut recv).await?;
        anyhow::Ok((conn, send, recv, answer))
    };
    let bound = postern::relay::sessions::MAX_TUNNELS_PER_AGENT;
    let mut held = Vec::new();
    for i in 0..bound {
        let (conn, send, recv, answer) = within(IO, "a tunnel", tunnel()).await.expect("tunnel");
        assert!(
            matches!(answer, Message::Welcome(_)),
            "tunnel {i}: {answer:?}"
        );
        held.push((conn, send, recv));
    }
    let (_conn, _send, _recv, answer) = within(IO, "one more", tunnel()).await.expect("tunnel");
    match answer {
        Message::Reject(reject) => {
            assert_eq!(reject.code, Code::NotAllowed, "{reject:?}");
            assert!(
                reject
                    .reason
                    .contains(&format!("already holds {bound} tunnels")),
                "{reject:?}"
            );
        }
        other => panic!(
            "tunnel {} of one agent id was admitted: {other:?}",
            bound + 1
        ),
    }
    // A tunnel that ends gives its place back, once the relay has let go of it.
    let downs = || relay.log().matches("tunnel down").count();
    let before = downs();
    let (conn, _, _) = held.pop().expect("a held tunnel");
    conn.close(0u32.into(), b"leaving");
    wait_until(IO, "the relay to end the closed tunnel", || {
        downs() > before
    })
    .await;
    let (_conn, _send, _recv, answer) = within(IO, "a tunnel", tunnel()).await.expect("tunnel");
    assert!(
        matches!(answer, Message::Welcome(_)),
        "the place of a closed tunnel did not come back: {answer:?}"
    );
    agent.close(0u32.into(), b"done");
}
