//! The security acceptance of issue 5, on real sockets: the HTTP proxy with curl, the open-proxy
//! matrix through both front doors, access rules, agent identity (tokens, client certificates,
//! peer certificates), namespaces, the HTTP smuggling corpus, and idle-connection floods.
//!
//! Each test owns the addresses `127.N.0.0/16` (N = 51…58) so the tests run in parallel.

mod claims;
mod holes;
mod hostile;
#[path = "../kit/mod.rs"]
mod kit;
mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern::cert::Kind;
use postern::config::{AgentCredential, GatewayConfig, PeerConfig, Rule, Secret, User};
use postern::protocol::{self, close, Code, Forward, Hello, Message, OpenResult, PortRange};
use tokio::io::AsyncWriteExt;

use support::*;

fn user(name: &str, password: &str) -> User {
    User {
        name: name.into(),
        password: Secret::new(password),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. curl through the HTTP port.

/// Runs curl (no config file, no proxy from the environment but what `env` sets) and returns its
/// exit status and stdout. A missing curl fails the test: the acceptance names curl.
async fn curl(args: &[&str], env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.arg("-q")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for var in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = within(IO, "curl", cmd.output())
        .await
        .unwrap_or_else(|e| panic!("cannot run curl ({e}): install curl to run this test"));
    // Shown with the test's output when it fails.
    eprintln!(
        "curl {args:?}: {}; stderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reaches_services_through_the_http_proxy_and_authenticates() {
    init();
    let pki = Pki::new();
    let net = 51;
    let service = http_service(sa(ip(net, 0, 10), 0), "web").await;
    let target = service.addr.to_string();

    // A gateway without users: no credentials needed.
    let open = Stack::start(&pki, net, 0, GatewayConfig::default(), |_| {}).await;
    let _a = open
        .start_agent(open.agent("web", "default", &[ip(net, 0, 10)], &[service.addr.port()]))
        .await;
    let open_proxy = format!("http://{}", open.http);

    // Absolute-form: curl sends `GET http://…/absolute` to the proxy, the service sees origin-form.
    let (status, body) = curl(
        &[&format!("http://{target}/absolute")],
        &[("http_proxy", &open_proxy)],
    )
    .await;
    assert!(status.success(), "curl via http_proxy: {status}");
    assert_eq!(
        body,
        http_body("web", service.addr, "GET /absolute HTTP/1.1")
    );

    // CONNECT: curl -p tunnels, then speaks HTTP to the service itself.
    let (status, body) = curl(
        &["-p", "-x", &open_proxy, &format!("http://{target}/tunnel")],
        &[],
    )
    .await;
    assert!(status.success(), "curl -p -x: {status}");
    assert_eq!(body, http_body("web", service.addr, "GET /tunnel HTTP/1.1"));

    // A gateway with users: 407 (with a challenge) without or with wrong credentials, 200 with
    // the right ones, for both request forms.
    let guarded = Stack::start(
        &pki,
        net,
        1,
        GatewayConfig {
            users: vec![user("alice", "s3cret")],
            ..GatewayConfig::default()
        },
        |_| {},
    )
    .await;
    let _b = guarded
        .start_agent(guarded.agent("web", "default", &[ip(net, 0, 10)], &[service.addr.port()]))
        .await;
    let proxy = format!("http://{}", guarded.http);
    let url = format!("http://{target}/private");
    let code_only = ["-o", "/dev/null", "-w", "%{http_code}"];

    let (_, code) = curl(&[&code_only[..], &["-x", &proxy, &url]].concat(), &[]).await;
    assert_eq!(code, "407", "absolute-form without credentials");
    let (_, code) = curl(
        &[&code_only[..], &["-x", &proxy, "-U", "alice:wrong", &url]].concat(),
        &[],
    )
    .await;
    assert_eq!(code, "407", "absolute-form with a wrong password");
    let (_, code) = curl(
        &[
            &code_only[..],
            &["-x", &proxy, "-U", "mallory:s3cret", &url],
        ]
        .concat(),
        &[],
    )
    .await;
    assert_eq!(code, "407", "absolute-form with an unknown user");
    let (status, body) = curl(
        &[
            "-x",
            &proxy,
            "--proxy-user",
            "alice:s3cret",
            "-w",
            "\n%{http_code}",
            &url,
        ],
        &[],
    )
    .await;
    assert!(
        status.success(),
        "curl with the right credentials: {status}"
    );
    assert_eq!(
        body,
        format!(
            "{}\n200",
            http_body("web", service.addr, "GET /private HTTP/1.1")
        )
    );

    let connect_code = ["-o", "/dev/null", "-w", "%{http_connect}"];
    let (status, code) = curl(
        &[&connect_code[..], &["-p", "-x", &proxy, &url]].concat(),
        &[],
    )
    .await;
    assert!(!status.success(), "CONNECT without credentials must fail");
    assert_eq!(code, "407", "CONNECT without credentials");
    let (status, code) = curl(
        &[
            &connect_code[..],
            &["-p", "-x", &proxy, "-U", "alice:nope", &url],
        ]
        .concat(),
        &[],
    )
    .await;
    assert!(!status.success(), "CONNECT with a wrong password must fail");
    assert_eq!(code, "407", "CONNECT with a wrong password");
    let (status, body) = curl(&["-p", "-x", &proxy, "-U", "alice:s3cret", &url], &[]).await;
    assert!(
        status.success(),
        "CONNECT with the right credentials: {status}"
    );
    assert_eq!(
        body,
        http_body("web", service.addr, "GET /private HTTP/1.1")
    );

    // The same on raw sockets, to see the challenge itself.
    for request in [
        absolute_get(&target, "/", None),
        absolute_get(&target, "/", Some(&basic("alice", "wrong"))),
        absolute_get(&target, "/", Some("Bearer alice:s3cret")),
        connect_request(&target, None),
        connect_request(&target, Some(&basic("alice", "s3cret!"))),
    ] {
        let response = http_exchange(guarded.http, &request).await;
        let shown = String::from_utf8_lossy(&request);
        assert_eq!(
            response.status_line, "HTTP/1.1 407 Proxy Authentication Required",
            "{shown}"
        );
        assert_eq!(
            response.header("proxy-authenticate"),
            Some("Basic realm=\"postern\""),
            "{shown}"
        );
        assert_eq!(
            response.text(),
            "proxy authentication required\n",
            "{shown}"
        );
    }
    let ok = http_exchange(
        guarded.http,
        &absolute_get(&target, "/raw", Some(&basic("alice", "s3cret"))),
    )
    .await;
    assert_eq!(ok.status_line, "HTTP/1.1 200 OK");
    assert_eq!(
        ok.text(),
        http_body("web", service.addr, "GET /raw HTTP/1.1")
    );

    // Only the successful requests reached the service: 2 open, 2 guarded by curl, 1 raw.
    assert_eq!(service.accepted(), 5, "refused requests must dial nothing");
}

// ---------------------------------------------------------------------------------------------
// 2. The open-proxy matrix.

/// How the gateway must answer one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// SOCKS5 0x04, HTTP 502 "no route to …".
    NoRoute,
    /// SOCKS5 0x02, HTTP 403 "… port not exposed, or not allowed …".
    NotAllowed,
}

impl Refusal {
    fn socks5(self) -> u8 {
        match self {
            Refusal::NoRoute => 0x04,
            Refusal::NotAllowed => 0x02,
        }
    }

    fn status_line(self) -> &'static str {
        match self {
            Refusal::NoRoute => "HTTP/1.1 502 Bad Gateway",
            Refusal::NotAllowed => "HTTP/1.1 403 Forbidden",
        }
    }

    fn body(self, requested: &str) -> String {
        match self {
            Refusal::NoRoute => {
                format!("no route to {requested}: no agent announces this address\n")
            }
            Refusal::NotAllowed => {
                format!("{requested}: port not exposed, or not allowed for this client\n")
            }
        }
    }
}

/// Asks for `dest` through SOCKS5, HTTP CONNECT and absolute-form HTTP, from `client`, and checks
/// each door refuses it with `expected`.
async fn assert_refused_everywhere(stack: &Stack, client: Ipv4Addr, dest: Dest, expected: Refusal) {
    let what = format!("{dest} ({expected:?})");
    let code = socks5_refusal_from(client, stack.socks, &dest, Auth::None).await;
    assert_eq!(code, expected.socks5(), "SOCKS5 reply for {what}");

    let authority = dest.to_string();
    for (form, request) in [
        ("CONNECT", connect_request(&authority, None)),
        ("absolute-form", absolute_get(&authority, "/", None)),
    ] {
        let mut conn = HttpConn::open_from(client, stack.http).await;
        conn.send(&request).await;
        let response = conn.response(form == "CONNECT").await;
        assert_eq!(
            response.status_line,
            expected.status_line(),
            "HTTP {form} for {what}"
        );
        assert_eq!(
            response.text(),
            expected.body(&authority),
            "HTTP {form} body for {what}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_proxy_matrix_is_refused_through_both_doors_and_nothing_is_dialled() {
    init();
    let pki = Pki::new();
    let net = 52;
    let client = ip(net, 0, 100);
    let stack = Stack::start(
        &pki,
        net,
        0,
        GatewayConfig {
            resolve_names: true,
            ..GatewayConfig::default()
        },
        // The relay's TCP tunnel listener is off, so that the listener below can take the relay's
        // port number over TCP and show the gateway never dials it.
        |relay| relay.tcp_listen = postern::config::TcpListen::Off,
    )
    .await;
    let agent_ip = ip(net, 0, 10);
    let service = tagged_echo(sa(agent_ip, 0), "edge").await;
    let _agent = stack
        .start_agent(stack.agent("edge", "default", &[agent_ip], &[service.addr.port()]))
        .await;

    // Listeners on every address the gateway must never reach.
    let unregistered = counting_listener(sa(ip(net, 0, 20), 0)).await;
    let unexposed = counting_listener(sa(agent_ip, 0)).await;
    // The relay's UDP port, and a TCP listener on the same IP and port number.
    let relay_tcp = counting_listener(stack.relay_addr).await;
    // No agent claims 127.0.0.1, so `localhost` must resolve to nothing routable.
    let localhost = counting_listener(sa(Ipv4Addr::LOCALHOST, 0)).await;

    let cases = [
        (Dest::Ip(unregistered.addr), Refusal::NoRoute),
        (Dest::Ip(unexposed.addr), Refusal::NotAllowed),
        (Dest::Ip(stack.socks), Refusal::NoRoute),
        (Dest::Ip(stack.http), Refusal::NoRoute),
        (Dest::Ip(stack.admin), Refusal::NoRoute),
        (Dest::Ip(stack.relay_addr), Refusal::NoRoute),
        // Names: system-resolved, an IP literal sent as a name, and `<agent>.postern` names.
        (
            Dest::Name("localhost".into(), localhost.addr.port()),
            Refusal::NoRoute,
        ),
        (
            Dest::Name("localhost".into(), stack.socks.port()),
            Refusal::NoRoute,
        ),
        (
            Dest::Name(ip(net, 0, 20).to_string(), unregistered.addr.port()),
            Refusal::NoRoute,
        ),
        (
            Dest::Name("nobody.postern".into(), unregistered.addr.port()),
            Refusal::NoRoute,
        ),
        (
            Dest::Name("edge.postern".into(), unexposed.addr.port()),
            Refusal::NotAllowed,
        ),
    ];
    for (dest, expected) in cases {
        assert_refused_everywhere(&stack, client, dest, expected).await;
    }

    // Not a proxy request at all: origin-form with a Host header naming a served target, and an
    // https:// absolute URI. Neither may be routed by its Host header.
    let host = service.addr.to_string();
    for (request, body) in [
        (
            format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
            "bad request: this is a proxy; send an absolute http:// URI or CONNECT\n",
        ),
        (
            format!("GET https://{host}/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
            "bad request: only http:// URIs are forwarded; use CONNECT for TLS\n",
        ),
    ] {
        let mut conn = HttpConn::open_from(client, stack.http).await;
        conn.send(request.as_bytes()).await;
        let response = conn.response(false).await;
        assert_eq!(
            response.status_line, "HTTP/1.1 400 Bad Request",
            "{request}"
        );
        assert_eq!(response.text(), body, "{request}");
    }
    assert_eq!(service.accepted(), 0, "a Host header routed a request");

    unregistered.assert_never_dialled("unregistered IP").await;
    unexposed
        .assert_never_dialled("registered IP, unexposed port")
        .await;
    relay_tcp.assert_never_dialled("the relay's address").await;
    localhost.assert_never_dialled("localhost").await;
    // The gateway's own doors and admin port: every connection the kernel saw to them came from
    // our client (a gateway dialling itself would show up with another source address).
    for door in [stack.socks, stack.http, stack.admin] {
        let peers = tcp_clients_of(door);
        if door != stack.admin {
            assert!(
                !peers.is_empty(),
                "the kernel table shows our connections to {door}"
            );
        }
        let strangers: Vec<SocketAddr> = peers.into_iter().filter(|p| p.ip() != client).collect();
        assert!(
            strangers.is_empty(),
            "something other than the test client connected to the gateway's door {door}: {strangers:?}"
        );
    }

    // The control: the registered, exposed target is reachable through both doors.
    let tcp = socks5_connect_from(client, stack.socks, &Dest::Ip(service.addr), Auth::None)
        .await
        .expect("SOCKS5 to the served target");
    expect_echo(tcp, Vec::new(), "edge", &pattern(52, 4096)).await;
    let (tcp, already) = http_connect(stack.http, &host, None)
        .await
        .expect("CONNECT to the served target");
    expect_echo(tcp, already, "edge", &pattern(53, 4096)).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Rules.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_allow_only_the_listed_targets_and_ports_per_connection() {
    init();
    let pki = Pki::new();
    let net = 53;
    // Shape of the acceptance ("127.1.0.0/16 port 9100; refused 127.2.0.1:9100 and 127.1.0.1:22"):
    // the allowed range is 127.53.1.0/24 with port P; 127.53.2.1:P and 127.53.1.1:Q are both
    // served by agents, and refused by the rule.
    let (one_p, two_p) = same_port_pair(ip(net, 1, 1), ip(net, 2, 1)).await;
    let one_p = http_service_on(one_p, "one-p");
    let two_p = http_service_on(two_p, "two-p");
    let one_q = http_service(sa(ip(net, 1, 1), 0), "one-q").await;
    let p = one_p.addr.port();
    let q = one_q.addr.port();
    let stack = Stack::start(
        &pki,
        net,
        0,
        GatewayConfig {
            users: vec![user("alice", "pw-a"), user("bob", "pw-b")],
            rules: vec![Rule {
                users: vec!["alice".into()],
                targets: vec![format!("127.{net}.1.0/24").parse().unwrap()],
                ports: vec![PortRange { start: p, end: p }],
                ..Rule::default()
            }],
            ..GatewayConfig::default()
        },
        |_| {},
    )
    .await;
    let _one = stack
        .start_agent(stack.agent("one", "default", &[ip(net, 1, 1)], &[p, q]))
        .await;
    let _two = stack
        .start_agent(stack.agent("two", "default", &[ip(net, 2, 1)], &[p]))
        .await;
    let alice = Auth::Password("alice", "pw-a");
    let alice_basic = basic("alice", "pw-a");

    // SOCKS5: the allowed target answers; the others get "connection not allowed" (0x02).
    let mut tcp = socks5_connect(stack.socks, &Dest::Ip(one_p.addr), alice)
        .await
        .expect("alice reaches the allowed target");
    tcp.write_all(b"GET /socks HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let r = HttpConn::wrap(tcp).response(false).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(
        r.text(),
        http_body("one-p", one_p.addr, "GET /socks HTTP/1.1")
    );
    for dest in [two_p.addr, one_q.addr] {
        assert_eq!(
            socks5_refusal(stack.socks, &Dest::Ip(dest), alice).await,
            0x02,
            "alice → {dest}"
        );
    }
    // bob has no rule: default deny.
    assert_eq!(
        socks5_refusal(
            stack.socks,
            &Dest::Ip(one_p.addr),
            Auth::Password("bob", "pw-b")
        )
        .await,
        0x02,
        "bob → allowed target of alice"
    );
    // Wrong password and no authentication at all never reach the CONNECT.
    assert!(matches!(
        socks5_connect(
            stack.socks,
            &Dest::Ip(one_p.addr),
            Auth::Password("alice", "x")
        )
        .await,
        Err(SocksError::AuthFailed(_))
    ));
    assert!(matches!(
        socks5_connect(stack.socks, &Dest::Ip(one_p.addr), Auth::None).await,
        Err(SocksError::NoAcceptableMethod)
    ));

    // HTTP absolute-form on ONE keep-alive connection: every request is checked on its own.
    let mut conn = HttpConn::open(stack.http).await;
    let keep_alive = |target: SocketAddr, path: &str| {
        format!(
            "GET http://{target}{path} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {alice_basic}\r\n\r\n"
        )
    };
    conn.send(keep_alive(one_p.addr, "/first").as_bytes()).await;
    let r = conn.response(false).await;
    assert_eq!(r.status_line, "HTTP/1.1 200 OK");
    assert_eq!(
        r.text(),
        http_body("one-p", one_p.addr, "GET /first HTTP/1.1")
    );
    for dest in [two_p.addr, one_q.addr] {
        conn.send(keep_alive(dest, "/next").as_bytes()).await;
        let r = conn.response(false).await;
        assert_eq!(r.status_line, "HTTP/1.1 403 Forbidden", "alice → {dest}");
        assert_eq!(
            r.text(),
            format!("{dest}: port not exposed, or not allowed for this client\n")
        );
    }
    conn.send(keep_alive(one_p.addr, "/again").as_bytes()).await;
    let r = conn.response(false).await;
    assert_eq!(
        r.text(),
        http_body("one-p", one_p.addr, "GET /again HTTP/1.1")
    );

    // HTTP CONNECT: 403 for the refused targets, a working tunnel for the allowed one.
    for dest in [two_p.addr, one_q.addr] {
        let refused = http_connect(stack.http, &dest.to_string(), Some(&alice_basic))
            .await
            .expect_err("CONNECT must be refused");
        assert_eq!(
            refused.status_line, "HTTP/1.1 403 Forbidden",
            "CONNECT {dest}"
        );
        assert_eq!(
            refused.text(),
            format!("{dest}: port not exposed, or not allowed for this client\n")
        );
    }
    let refused = http_connect(
        stack.http,
        &one_p.addr.to_string(),
        Some(&basic("bob", "pw-b")),
    )
    .await
    .expect_err("bob has no rule");
    assert_eq!(refused.status_line, "HTTP/1.1 403 Forbidden");
    let (mut tcp, already) = http_connect(stack.http, &one_p.addr.to_string(), Some(&alice_basic))
        .await
        .expect("CONNECT to the allowed target");
    assert!(already.is_empty());
    tcp.write_all(b"GET /tunnel HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut tunnel = HttpConn::wrap(tcp);
    let r = tunnel.response(false).await;
    assert_eq!(
        r.text(),
        http_body("one-p", one_p.addr, "GET /tunnel HTTP/1.1")
    );

    assert_eq!(
        one_p.accepted(),
        4,
        "the allowed target: SOCKS5, two keep-alive GETs, CONNECT"
    );
    two_p
        .assert_never_dialled("127.53.2.1:P (outside the rule's targets)")
        .await;
    one_q
        .assert_never_dialled("127.53.1.1:Q (outside the rule's ports)")
        .await;
}

// ---------------------------------------------------------------------------------------------
// 4. Agent identity: tokens and client certificates bound what an agent may claim.

fn hello(agent_id: &str, token: &str, ips: &[Ipv4Addr], port: u16) -> Hello {
    Hello {
        agent_id: agent_id.into(),
        namespace: "default".into(),
        ips: ips.iter().map(|i| IpAddr::V4(*i)).collect(),
        ports: vec![PortRange {
            start: port,
            end: port,
        }],
        token: token.into(),
    }
}

fn assert_rejected(answer: anyhow::Result<Message>, code: Code, reason: &str) {
    match answer {
        Ok(Message::Reject(reject)) => {
            assert_eq!(reject.code, code, "reject code ({})", reject.reason);
            assert_eq!(reject.reason, reason);
        }
        other => panic!("expected a Reject ({code:?}, {reason:?}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_claims_are_bound_by_token_ranges_and_certificate_sans() {
    init();
    let pki = Pki::new();
    let net = 54;
    let token_ip = ip(net, 0, 1);
    let cert_ip = ip(net, 1, 1);
    let outside = ip(net, 9, 9);
    // The token credential may claim 127.54.0.0/24 only, so 127.54.9.9 is outside it while still
    // on this test's addresses; client certificates from the CA are accepted too.
    let token_range = format!("127.{net}.0.0/24").parse().unwrap();
    let ca = pki.ca();
    let stack = Stack::start(&pki, net, 0, GatewayConfig::default(), move |relay| {
        relay.agent_ca = Some(ca);
        for cred in &mut relay.agents {
            cred.allow = vec![token_range];
        }
    })
    .await;
    let token_service = tagged_echo(sa(token_ip, 0), "token-agent").await;
    let cert_service = tagged_echo(sa(cert_ip, 0), "cert-agent").await;
    let stranger = counting_listener(sa(outside, 0)).await;
    let _token_agent = stack
        .start_agent(stack.agent(
            "token-agent",
            "default",
            &[token_ip],
            &[token_service.addr.port()],
        ))
        .await;
    let token_routes = stack.registry_routes("default", token_ip.into()).await;
    assert_eq!(token_routes.len(), 1);
    assert_eq!(token_routes[0].value.agent_id, "token-agent");

    // Token agents: a claim outside the credential's range rejects the whole tunnel, also when it
    // comes with a claim on someone else's address inside the range.
    let port = token_service.addr.port();
    for ips in [vec![outside], vec![token_ip, outside]] {
        let answer = raw_hello(
            stack.relay_addr,
            &stack.trust,
            None,
            hello("intruder", &stack.token, &ips, port),
        )
        .await;
        assert_rejected(
            answer,
            Code::NotAllowed,
            &format!("credential agents may not claim {outside}"),
        );
    }
    assert_rejected(
        raw_hello(
            stack.relay_addr,
            &stack.trust,
            None,
            hello("intruder", "not-the-token", &[token_ip], port),
        )
        .await,
        Code::Unauthorized,
        "unknown agent token",
    );

    // Certificate agents: the certificate's IP SANs are the whole claim.
    let cert = pki.issue(Kind::Agent, "cert-agent", &[IpAddr::V4(cert_ip)]);
    let _cert_agent = stack
        .start_agent(postern::config::AgentConfig {
            token: Secret::default(),
            identity: Some(cert.clone()),
            ..stack.agent(
                "cert-agent",
                "default",
                &[cert_ip],
                &[cert_service.addr.port()],
            )
        })
        .await;
    let cert_routes = stack.registry_routes("default", cert_ip.into()).await;
    assert_eq!(cert_routes.len(), 1);
    assert_eq!(cert_routes[0].value.agent_id, "cert-agent");
    // Claiming an address the certificate does not name is refused — even one a valid token would
    // allow, and even with that token in the hello: the verified certificate decides.
    for (ips, token) in [
        (vec![token_ip], ""),
        (vec![cert_ip, token_ip], ""),
        (vec![ip(net, 0, 2)], stack.token.as_str()),
    ] {
        let answer = raw_hello(
            stack.relay_addr,
            &stack.trust,
            Some(cert.clone()),
            hello("cert-agent", token, &ips, port),
        )
        .await;
        let first_unnamed = ips.iter().find(|i| **i != cert_ip).unwrap();
        assert_rejected(
            answer,
            Code::NotAllowed,
            &format!("the agent certificate does not name {first_unnamed}"),
        );
    }
    // A certificate from another CA does not get past the handshake.
    let foreign = Pki::new().issue(Kind::Agent, "foreign", &[IpAddr::V4(token_ip)]);
    let answer = raw_hello(
        stack.relay_addr,
        &stack.trust,
        Some(foreign),
        hello("foreign", "", &[token_ip], port),
    )
    .await;
    assert!(
        !matches!(answer, Ok(Message::Welcome(_))),
        "a foreign certificate was welcomed: {answer:?}"
    );

    // Nothing above touched a route: the registry holds exactly what the two real agents put.
    assert_eq!(
        stack.registry_routes("default", token_ip.into()).await,
        token_routes
    );
    assert_eq!(
        stack.registry_routes("default", cert_ip.into()).await,
        cert_routes
    );
    assert!(stack
        .registry_routes("default", outside.into())
        .await
        .is_empty());
    assert!(stack
        .registry_routes("default", ip(net, 0, 2).into())
        .await
        .is_empty());
    assert_eq!(stack.relay.sessions().len(), 2, "only the two real tunnels");

    // And traffic still goes to the rightful owners.
    let tcp = socks5_connect(stack.socks, &Dest::Ip(token_service.addr), Auth::None)
        .await
        .expect("token agent's service");
    expect_echo(tcp, Vec::new(), "token-agent", &pattern(54, 2048)).await;
    let tcp = socks5_connect(stack.socks, &Dest::Ip(cert_service.addr), Auth::None)
        .await
        .expect("certificate agent's service");
    expect_echo(tcp, Vec::new(), "cert-agent", &pattern(55, 2048)).await;
    assert_eq!(
        socks5_refusal(stack.socks, &Dest::Ip(stranger.addr), Auth::None).await,
        0x04
    );
    stranger
        .assert_never_dialled("the address outside every credential")
        .await;
}

// ---------------------------------------------------------------------------------------------
// 4b. The relay's peer endpoint admits peer certificates only.

enum PeerOutcome {
    /// The relay answered the `Forward`.
    Answered(Code, quinn::SendStream, quinn::RecvStream),
    /// No answer: why the connection ended (if it did) and what the client saw.
    Refused(Option<quinn::ConnectionError>, String),
}

/// The `[peer]` table of a relay with a peer endpoint: `pki`'s CA verifies the peers; no identity
/// of its own (it dials no peer).
fn relay_side_peer_config(pki: &Pki) -> PeerConfig {
    PeerConfig {
        ca: pki.ca(),
        identity: None,
        server_name: "postern-relay".into(),
        connect_timeout: Duration::from_secs(2),
        max_streams: 64,
        transport: PeerConfig::default_transport(),
    }
}

/// Dials a relay's peer endpoint with `identity` and sends one `Forward`.
async fn peer_forward(
    peer: SocketAddr,
    ca: &[rustls_pki_types::CertificateDer<'static>],
    identity: Option<postern::tls::Identity>,
    forward: Forward,
) -> (PeerOutcome, quinn::Endpoint) {
    let mut endpoint =
        postern::tls::bind_endpoint(sa(Ipv4Addr::LOCALHOST, 0), None, 1 << 20).expect("endpoint");
    endpoint.set_default_client_config(
        postern::tls::client_config(
            &postern::tls::Trust::Ca(ca.to_vec()),
            protocol::ALPN_PEER,
            identity,
            Arc::new(PeerConfig::default_transport().quinn(0)),
        )
        .expect("client config"),
    );
    let attempt = async {
        let conn = match endpoint
            .connect(peer, "postern-relay")
            .expect("connect")
            .await
        {
            Ok(conn) => conn,
            Err(err) => {
                return PeerOutcome::Refused(Some(err.clone()), format!("handshake: {err}"))
            }
        };
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            protocol::write_message(&mut send, &Message::Forward(forward)).await?;
            let answer = protocol::read_message(&mut recv).await?;
            anyhow::Ok((answer, send, recv))
        };
        match exchange.await {
            Ok((Message::ForwardResult(OpenResult { code }), send, recv)) => {
                PeerOutcome::Answered(code, send, recv)
            }
            Ok((other, ..)) => panic!("unexpected answer to Forward: {other:?}"),
            Err(err) => PeerOutcome::Refused(conn.close_reason(), format!("{err:#}")),
        }
    };
    (within(IO, "peer forward", attempt).await, endpoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_a_peer_certificate_cannot_forward_through_a_relay() {
    init();
    let pki = Pki::new();
    let net = 55;
    let agent_ip = ip(net, 0, 10);
    let service = tagged_echo(sa(agent_ip, 0), "behind-relay").await;
    let token = "peer-test-token";
    let peer_config = relay_side_peer_config(&pki);
    let relay_config = postern::config::RelayConfig {
        drain_grace: Duration::from_secs(1),
        peer: Some(postern::config::PeerListen {
            listen: sa(ip(net, 0, 3), 0),
            advertise: None,
        }),
        ..postern::config::RelayConfig::new(
            "relay-peer",
            sa(ip(net, 0, 1), 0),
            pki.relay_identity(),
            vec![AgentCredential::new(
                "agents",
                token,
                vec![format!("127.{net}.0.0/16").parse().unwrap()],
            )],
        )
    };
    let registry: Arc<dyn postern::registry::Registry> =
        Arc::new(postern::registry::memory::MemoryRegistry::new());
    let process = postern::server::Process::bind_relay(
        postern::config::RelayRoleConfig {
            relay: relay_config,
            peer: Some(peer_config.clone()),
            registry: postern::config::RegistryConfig::Memory,
            admin: None,
        },
        Some(registry),
    )
    .await
    .expect("relay binds");
    let addrs = process.addresses();
    let relay = process.relay().expect("relay").clone();
    let peer_addr = addrs.peer.expect("peer endpoint");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _relay_task = AbortOnDrop(tokio::spawn(process.run(shutdown.clone())));
    let _stop = shutdown.clone().drop_guard();
    let _agent = TestAgent::start(postern::config::AgentConfig {
        server_name: "localhost".into(),
        redundancy: 1,
        reconnect_min: Duration::from_millis(50),
        ..postern::config::AgentConfig::new(
            "behind-relay",
            vec![addrs.relay.expect("relay address").to_string()],
            pki.trust(),
            token,
            vec![IpAddr::V4(agent_ip)],
            vec![PortRange {
                start: service.addr.port(),
                end: service.addr.port(),
            }],
        )
    });
    {
        let relay = relay.clone();
        wait_until(READY, "agent tunnel on the relay", move || {
            relay.serves("default", IpAddr::V4(agent_ip))
        })
        .await;
    }
    let forward = Forward {
        namespace: "default".into(),
        target: service.addr,
        session_id: None,
    };
    let ca = pki.ca();

    // A gateway without a peer certificate has nothing to dial relays with.
    let cache = Arc::new(postern::registry::cache::RouteCache::new());
    let no_cert = postern::gateway::pool::PeerPool::new(&peer_config, cache);
    assert!(
        no_cert.is_err(),
        "a peer pool without a certificate must not be built"
    );

    // No client certificate at all: the mutual-TLS handshake fails.
    let (outcome, _ep) = peer_forward(peer_addr, &ca, None, forward.clone()).await;
    match outcome {
        // TLS alert 116, certificate_required (RFC 8446), as a QUIC crypto error.
        PeerOutcome::Refused(reason, how) => assert!(
            matches!(&reason, Some(quinn::ConnectionError::ConnectionClosed(c))
                if c.error_code == quinn::TransportErrorCode::crypto(116)),
            "no certificate: not refused by the handshake: {reason:?} ({how})"
        ),
        PeerOutcome::Answered(code, ..) => {
            panic!("a peer without a certificate got a ForwardResult ({code:?})")
        }
    }

    // Certificates from the same CA that are not peer certificates: an agent's, and the relay's
    // own serving certificate. The handshake succeeds (same CA), then the relay closes.
    for (what, identity) in [
        (
            "an agent certificate",
            pki.issue(Kind::Agent, "sneaky-agent", &[IpAddr::V4(agent_ip)]),
        ),
        ("the relay certificate", pki.relay_identity()),
    ] {
        let (outcome, _ep) = peer_forward(peer_addr, &ca, Some(identity), forward.clone()).await;
        match outcome {
            PeerOutcome::Refused(reason, how) => assert!(
                matches!(&reason, Some(quinn::ConnectionError::ApplicationClosed(c))
                    if c.error_code == quinn::VarInt::from_u32(close::REJECTED)
                        && &c.reason[..] == b"a peer certificate is required"),
                "{what}: not closed as a rejected peer: {reason:?} ({how})"
            ),
            PeerOutcome::Answered(code, ..) => {
                panic!("{what} got a ForwardResult ({code:?}) from the peer endpoint")
            }
        }
    }
    assert_eq!(service.accepted(), 0, "a refused peer reached the service");

    // The control: the peer certificate forwards, and bytes flow end to end.
    let (outcome, _ep) = peer_forward(peer_addr, &ca, Some(pki.peer_identity()), forward).await;
    let PeerOutcome::Answered(code, mut send, mut recv) = outcome else {
        panic!("the peer certificate was refused");
    };
    assert_eq!(code, Code::Ok);
    let payload = pattern(56, 8192);
    let got = within(IO, "echo over the peer stream", async {
        let writer = async {
            send.write_all(&payload).await?;
            send.finish()?;
            anyhow::Ok(())
        };
        let reader = async { anyhow::Ok(recv.read_to_end(1 << 20).await?) };
        let (w, r) = tokio::join!(writer, reader);
        w.expect("write");
        r.expect("read")
    })
    .await;
    let mut expected = b"behind-relay\n".to_vec();
    expected.extend_from_slice(&payload);
    assert!(got == expected, "echo over the peer stream differs");
    assert_eq!(service.accepted(), 1);
}

/// The peer endpoint bounds handshakes like the agent port: once half of a source's
/// `relay.max_pending_per_source` is taken by handshakes that never complete (a spoofed source:
/// a UDP forwarder passes a peer's Initials to the relay from its own address and drops every
/// answer), the relay answers new ones with a stateless Retry instead of a handshake, so such
/// packets cannot make it hold state or spend a signature each; a real peer from that same address
/// still connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_endpoint_answers_a_handshake_flood_with_retries() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    init();
    let pki = Pki::new();
    let net = 145;
    let per_source = 4;
    let peer_config = relay_side_peer_config(&pki);
    let relay_config = postern::config::RelayConfig {
        max_pending_per_source: per_source,
        peer: Some(postern::config::PeerListen {
            listen: sa(ip(net, 0, 3), 0),
            advertise: None,
        }),
        ..postern::config::RelayConfig::new(
            "relay-peer-flood",
            sa(ip(net, 0, 1), 0),
            pki.relay_identity(),
            Vec::new(),
        )
    };
    let process = postern::server::Process::bind_relay(
        postern::config::RelayRoleConfig {
            relay: relay_config,
            peer: Some(peer_config),
            registry: postern::config::RegistryConfig::Memory,
            admin: None,
        },
        Some(Arc::new(postern::registry::memory::MemoryRegistry::new())),
    )
    .await
    .expect("relay binds");
    let peer_addr = process.addresses().peer.expect("peer endpoint");
    let relay = process.relay().expect("relay").clone();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _relay_task = AbortOnDrop(tokio::spawn(process.run(shutdown.clone())));
    let _stop = shutdown.clone().drop_guard();

    let spoofed = ip(net, 77, 1);
    let forwarder = tokio::net::UdpSocket::bind(sa(spoofed, 0))
        .await
        .expect("forwarder");
    let forwarder_addr = forwarder.local_addr().unwrap();
    let (forwarded, retries) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (counted, retried) = (forwarded.clone(), retries.clone());
    let _forward = AbortOnDrop(tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = forwarder.recv_from(&mut buf).await {
            if from == peer_addr {
                // A QUIC v1 long-header packet of type Retry; every answer is dropped.
                if buf[0] & 0xf0 == 0xf0 && buf[1..5] == [0, 0, 0, 1] {
                    retried.fetch_add(1, Ordering::SeqCst);
                }
            } else {
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = forwarder.send_to(&buf[..n], peer_addr).await;
            }
        }
    }));
    let peer_client = |from: Ipv4Addr, to: SocketAddr| {
        let mut endpoint =
            postern::tls::bind_endpoint(sa(from, 0), None, 1 << 20).expect("endpoint");
        endpoint.set_default_client_config(
            postern::tls::client_config(
                &postern::tls::Trust::Ca(pki.ca()),
                protocol::ALPN_PEER,
                Some(pki.peer_identity()),
                Arc::new(PeerConfig::default_transport().quinn(0)),
            )
            .expect("client config"),
        );
        (endpoint, to)
    };
    let (blind, to) = peer_client(ip(net, 77, 2), forwarder_addr);
    let mut attempts = Vec::new();
    for _ in 0..20 {
        let connecting = blind.connect(to, "postern-relay").expect("connect");
        attempts.push(AbortOnDrop(tokio::spawn(async move {
            let _ = connecting.await;
        })));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_until(IO, "initial packets forwarded", || {
        forwarded.load(Ordering::SeqCst) >= 20
    })
    .await;
    wait_until(IO, "the relay answering with a Retry", || {
        retries.load(Ordering::SeqCst) >= 1
    })
    .await;
    let held = relay.pending_peer_connections();
    assert!(
        held <= (per_source / 2) as usize,
        "{held} never-completing handshakes hold slots of the source (limit {per_source})"
    );

    // A real peer from the same address is validated by the Retry and connects.
    let (real, to) = peer_client(spoofed, peer_addr);
    let conn = within(
        IO,
        "a real peer's handshake",
        real.connect(to, "postern-relay").expect("connect"),
    )
    .await
    .expect("a peer from the flooded address is refused");
    conn.close(0u32.into(), b"done");
    drop(attempts);
}

// ---------------------------------------------------------------------------------------------
// 5. Namespaces.

/// Two agents claim the same IP in namespaces "blue" and "green". Agents dial `ip:port` on their
/// own host, and here both "hosts" are this machine, so the two services cannot both listen on
/// the same `ip:port`: blue's service listens on port B and green's on port G of that one IP, and
/// each agent exposes only its own port. Whether a connection went to the right namespace then
/// shows in two ways: the service that answers names itself, and asking blue for G (or green for
/// B) is refused by that namespace's agent (the port is not exposed there) — were namespaces
/// ignored, the other agent would have served it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_addresses_are_reached_by_choosing_the_namespace() {
    init();
    let pki = Pki::new();
    let net = 56;
    let shared = ip(net, 0, 9);
    let blue = tagged_echo(sa(shared, 0), "blue").await;
    let green = tagged_echo(sa(shared, 0), "green").await;
    let stack = Stack::start(&pki, net, 0, GatewayConfig::default(), |_| {}).await;
    let _blue_agent = stack
        .start_agent(stack.agent("blue-agent", "blue", &[shared], &[blue.addr.port()]))
        .await;
    let _green_agent = stack
        .start_agent(stack.agent("green-agent", "green", &[shared], &[green.addr.port()]))
        .await;
    assert_eq!(stack.owners("blue", shared.into()).len(), 1);
    assert_eq!(stack.owners("green", shared.into()).len(), 1);
    assert!(stack.owners("default", shared.into()).is_empty());

    // SOCKS5: the namespace is the part after '@' in the username (no users: any password).
    let as_blue = Auth::Password("anyone@blue", "whatever");
    let as_green = Auth::Password("anyone@green", "x");
    let tcp = socks5_connect(stack.socks, &Dest::Ip(blue.addr), as_blue)
        .await
        .expect("blue through blue");
    expect_echo(tcp, Vec::new(), "blue", &pattern(56, 4096)).await;
    let tcp = socks5_connect(stack.socks, &Dest::Ip(green.addr), as_green)
        .await
        .expect("green through green");
    expect_echo(tcp, Vec::new(), "green", &pattern(57, 4096)).await;
    assert_eq!(
        socks5_refusal(stack.socks, &Dest::Ip(green.addr), as_blue).await,
        0x02,
        "green's port through blue's agent"
    );
    assert_eq!(
        socks5_refusal(stack.socks, &Dest::Ip(blue.addr), as_green).await,
        0x02,
        "blue's port through green's agent"
    );
    for auth in [Auth::None, Auth::Password("anyone@red", "x")] {
        assert_eq!(
            socks5_refusal(stack.socks, &Dest::Ip(blue.addr), auth).await,
            0x04,
            "{auth:?}: no agent serves this address in that namespace"
        );
    }

    // HTTP: the namespace comes from the Proxy-Authorization login.
    let green_login = basic("anyone@green", "x");
    let blue_login = basic("anyone@blue", "x");
    let (tcp, already) = http_connect(stack.http, &green.addr.to_string(), Some(&green_login))
        .await
        .expect("CONNECT green through green");
    expect_echo(tcp, already, "green", &pattern(58, 4096)).await;
    let (tcp, already) = http_connect(stack.http, &blue.addr.to_string(), Some(&blue_login))
        .await
        .expect("CONNECT blue through blue");
    expect_echo(tcp, already, "blue", &pattern(59, 4096)).await;
    let refused = http_connect(stack.http, &blue.addr.to_string(), Some(&green_login))
        .await
        .expect_err("blue's port through green");
    assert_eq!(refused.status_line, "HTTP/1.1 403 Forbidden");
    assert_eq!(
        refused.text(),
        format!(
            "{}: port not exposed, or not allowed for this client\n",
            blue.addr
        )
    );
    let refused = http_connect(stack.http, &green.addr.to_string(), None)
        .await
        .expect_err("the default namespace has no such address");
    assert_eq!(refused.status_line, "HTTP/1.1 502 Bad Gateway");

    assert_eq!(
        blue.accepted(),
        2,
        "blue's service: one SOCKS5, one CONNECT"
    );
    assert_eq!(
        green.accepted(),
        2,
        "green's service: one SOCKS5, one CONNECT"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Request smuggling through the HTTP door.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_corpus_is_refused_and_nothing_reaches_the_target() {
    init();
    let pki = Pki::new();
    let net = 57;
    let agent_ip = ip(net, 0, 10);
    let target = http_service(sa(agent_ip, 0), "target").await;
    let control = http_service(sa(agent_ip, 0), "control").await;
    let stack = Stack::start(&pki, net, 0, GatewayConfig::default(), |_| {}).await;
    let _agent = stack
        .start_agent(stack.agent(
            "smuggled",
            "default",
            &[agent_ip],
            &[target.addr.port(), control.addr.port()],
        ))
        .await;
    let t = target.addr.to_string();
    let smuggled = format!("GET /smuggled HTTP/1.1\r\nHost: {t}\r\n\r\n");

    let corpus: Vec<(&str, String)> = vec![
        (
            "CL then TE",
            format!(
                "POST http://{t}/ HTTP/1.1\r\nHost: {t}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "TE then CL",
            format!(
                "POST http://{t}/ HTTP/1.1\r\nHost: {t}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
                smuggled.len()
            ),
        ),
        (
            "duplicate differing Content-Length",
            format!(
                "POST http://{t}/ HTTP/1.1\r\nHost: {t}\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nbody{smuggled}"
            ),
        ),
        (
            "Content-Length list",
            format!(
                "POST http://{t}/ HTTP/1.1\r\nHost: {t}\r\nContent-Length: 4, 40\r\n\r\nbody{smuggled}"
            ),
        ),
        (
            "Transfer-Encoding: chunked, identity",
            format!(
                "POST http://{t}/ HTTP/1.1\r\nHost: {t}\r\nTransfer-Encoding: chunked, identity\r\n\r\n4\r\nbody\r\n0\r\n\r\n"
            ),
        ),
        (
            "Transfer-Encoding: identity, chunked",
            format!(
                "POST http://{t}/ HTTP/1.1\r\nHost: {t}\r\nTransfer-Encoding: identity, chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n"
            ),
        ),
        (
            "two Transfer-Encoding lines",
            format!(
                "POST http://{t}/ HTTP/1.1\r\nHost: {t}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n"
            ),
        ),
        (
            "obs-fold",
            format!(
                "GET http://{t}/ HTTP/1.1\r\nHost: {t}\r\nX-Folded: first\r\n second\r\n\r\n"
            ),
        ),
        (
            "obs-fold of Transfer-Encoding",
            format!(
                "POST http://{t}/ HTTP/1.1\r\nHost: {t}\r\nContent-Length: 4\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"
            ),
        ),
        (
            "bare LF in the request line",
            format!("GET http://{t}/ HTTP/1.1\nHost: {t}\r\n\r\n"),
        ),
        (
            "bare LF in a header line",
            format!("GET http://{t}/ HTTP/1.1\r\nHost: {t}\nX-A: b\r\n\r\n"),
        ),
    ];
    // Each case is sent first on a fresh connection, then after an earlier exchange on the same
    // keep-alive connection, so the checks hold for every request on a connection. The earlier
    // exchanges go to another service (or are refused), so the target must still see nothing.
    let c = control.addr.to_string();
    let unexposed = sa(agent_ip, 1).to_string();
    let preludes: Vec<(&str, String, &str)> = vec![
        (
            "after a GET",
            format!("GET http://{c}/first HTTP/1.1\r\nHost: {c}\r\n\r\n"),
            "HTTP/1.1 200 OK",
        ),
        (
            "after a POST with a body",
            format!("POST http://{c}/post HTTP/1.1\r\nHost: {c}\r\nContent-Length: 5\r\n\r\nhello"),
            "HTTP/1.1 200 OK",
        ),
        (
            "after a refused CONNECT",
            format!("CONNECT {unexposed} HTTP/1.1\r\nHost: {unexposed}\r\n\r\n"),
            "HTTP/1.1 403 Forbidden",
        ),
    ];
    // Every case is tried before anything is asserted, so a failure lists all that got through.
    let mut wrong = Vec::new();
    for (what, request) in &corpus {
        let mut conn = HttpConn::open(stack.http).await;
        conn.send(request.as_bytes()).await;
        let response = conn.response(false).await;
        let rest = conn.rest_until_closed().await;
        if response.status_line != "HTTP/1.1 400 Bad Request" || !rest.is_empty() {
            wrong.push(format!(
                "{what}: {:?}, then {} more bytes",
                response.status_line,
                rest.len()
            ));
        }
        for (when, prelude, status) in &preludes {
            let mut conn = HttpConn::open(stack.http).await;
            conn.send(prelude.as_bytes()).await;
            let first = conn.response(prelude.starts_with("CONNECT")).await;
            assert_eq!(
                first.status_line, *status,
                "{what} {when}: the first exchange"
            );
            conn.send(request.as_bytes()).await;
            let response = conn.response(false).await;
            let rest = conn.rest_until_closed().await;
            if response.status_line != "HTTP/1.1 400 Bad Request" || !rest.is_empty() {
                wrong.push(format!(
                    "{what} {when}: {:?}, then {} more bytes",
                    response.status_line,
                    rest.len()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "not refused with a lone 400:\n{}",
        wrong.join("\n")
    );

    // A request refused with its body unread leaves no way to tell where the next head starts:
    // the gateway closes that connection.
    let mut conn = HttpConn::open(stack.http).await;
    conn.send(
        format!(
            "POST http://{unexposed}/ HTTP/1.1\r\nHost: {unexposed}\r\nContent-Length: 5\r\n\r\nhello"
        )
        .as_bytes(),
    )
    .await;
    let refused = conn.response(false).await;
    assert_eq!(refused.status_line, "HTTP/1.1 403 Forbidden");
    assert_eq!(refused.header("connection"), Some("close"));
    assert!(conn.rest_until_closed().await.is_empty());

    target
        .assert_never_dialled("the smuggling corpus (0 bytes must reach the target)")
        .await;
    // Two forwarded preludes per case.
    assert_eq!(control.accepted(), 2 * corpus.len());

    // The control: a clean request to the same target is forwarded.
    let ok = http_exchange(stack.http, &absolute_get(&t, "/clean", None)).await;
    assert_eq!(ok.status_line, "HTTP/1.1 200 OK");
    assert_eq!(
        ok.text(),
        http_body("target", target.addr, "GET /clean HTTP/1.1")
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Idle floods do not starve well-behaved clients.

const IDLE: usize = 1000;
const NORMAL: usize = 100;

/// Opens `IDLE` connections from `from` to `door` and leaves them idle: half send nothing, half a
/// first fragment of a handshake (`partial`) and stall.
async fn idle_flood(
    from: Ipv4Addr,
    door: SocketAddr,
    partial: &[u8],
) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let mut tcp = connect_from(from, door)
            .await
            .unwrap_or_else(|e| panic!("idle connection {i} to {door}: {e}"));
        if i % 2 == 1 {
            tcp.write_all(partial).await.expect("partial handshake");
        }
        held.push(tcp);
    }
    held
}

/// Asserts the gateway refused one more connection from `from`: it is closed (reset) at once.
async fn assert_over_the_limit(from: Ipv4Addr, door: SocketAddr) {
    use tokio::io::AsyncReadExt;
    let mut tcp = match connect_from(from, door).await {
        Ok(tcp) => tcp,
        // The reset can beat the connect's completion.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
        Err(e) => panic!("connect from {from} to {door}: {e}"),
    };
    let mut buf = [0u8; 16];
    let read = within(
        IO,
        "the connection over the limit is closed",
        tcp.read(&mut buf),
    )
    .await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "connection {} from {from} was not refused: {read:?}",
        IDLE + 1
    );
}

/// Every idle connection is still open: nothing to read, no EOF, no reset.
fn assert_still_open(what: &str, held: &[tokio::net::TcpStream]) {
    let mut buf = [0u8; 16];
    for (i, tcp) in held.iter().enumerate() {
        match tcp.try_read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("{what} idle connection {i} was closed or answered: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_per_door_do_not_starve_normal_clients() {
    init();
    // 2 × 1000 idle connections, both ends in this process, plus the normal ones.
    let needed = 4 * IDLE as u64 + 1000;
    let limit = open_files_limit();
    assert!(
        limit >= needed,
        "this test needs {needed} open files, the soft limit is {limit}: run `ulimit -n {needed}` first"
    );
    let pki = Pki::new();
    let net = 58;
    let agent_ip = ip(net, 0, 10);
    let echo = tagged_echo(sa(agent_ip, 0), "busy").await;
    let web = http_service(sa(agent_ip, 0), "web").await;
    // Each flooding address may hold exactly IDLE connections (the per-client limit), and the
    // handshake deadline outlasts the test, so the flood really is held open throughout.
    let stack = Stack::start(
        &pki,
        net,
        0,
        GatewayConfig {
            max_connections_per_client: IDLE,
            handshake_timeout: Duration::from_secs(120),
            ..GatewayConfig::default()
        },
        |_| {},
    )
    .await;
    let _agent = stack
        .start_agent(stack.agent(
            "busy",
            "default",
            &[agent_ip],
            &[echo.addr.port(), web.addr.port()],
        ))
        .await;

    let started = Instant::now();
    let socks_flooder = ip(net, 0, 200);
    let http_flooder = ip(net, 0, 201);
    let socks_idle = idle_flood(socks_flooder, stack.socks, &[5]).await;
    let http_idle = idle_flood(http_flooder, stack.http, b"GET http://").await;
    // The gateway accepts in order, so once connection IDLE+1 is refused, all IDLE before it
    // hold a slot in the gateway (not merely a place in the kernel's accept queue).
    assert_over_the_limit(socks_flooder, stack.socks).await;
    assert_over_the_limit(http_flooder, stack.http).await;

    // 100 well-behaved clients per door, all at once.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..NORMAL {
        let (socks, http, echo_addr, web_addr) = (stack.socks, stack.http, echo.addr, web.addr);
        tasks.spawn(async move {
            let tcp = socks5_connect(socks, &Dest::Ip(echo_addr), Auth::None)
                .await
                .unwrap_or_else(|e| panic!("SOCKS5 client {i}: {e:?}"));
            expect_echo(tcp, Vec::new(), "busy", &pattern(i as u64, 4096)).await;
        });
        tasks.spawn(async move {
            let path = format!("/normal/{i}");
            let expected = http_body("web", web_addr, &format!("GET {path} HTTP/1.1"));
            let target = web_addr.to_string();
            let body = if i % 2 == 0 {
                let r = http_exchange(http, &absolute_get(&target, &path, None)).await;
                assert_eq!(r.status_line, "HTTP/1.1 200 OK", "HTTP client {i}");
                r.text()
            } else {
                let (mut tcp, already) = http_connect(http, &target, None)
                    .await
                    .unwrap_or_else(|r| panic!("CONNECT client {i}: {}", r.status_line));
                assert!(already.is_empty());
                tcp.write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .expect("request in tunnel");
                HttpConn::wrap(tcp).response(false).await.text()
            };
            assert_eq!(body, expected, "HTTP client {i}");
        });
    }
    within(Duration::from_secs(30), "200 normal requests", async {
        while let Some(done) = tasks.join_next().await {
            done.expect("normal client");
        }
    })
    .await;
    assert_eq!(echo.accepted(), NORMAL);
    assert_eq!(web.accepted(), NORMAL);

    assert_still_open("SOCKS5", &socks_idle);
    assert_still_open("HTTP", &http_idle);
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "the flood outlived the handshake deadline; the test proves nothing"
    );
}

/// A relay holds at most `relay.max_tunnels`: one agent more is refused before its handshake, again
/// at every redial and counted, never admitted alongside; once a tunnel ends the waiting agent
/// gets its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_refuses_tunnels_beyond_max_tunnels_until_one_ends() {
    init();
    let pki = Pki::new();
    let net = 59;
    let stack = Stack::start(&pki, net, 0, GatewayConfig::default(), |relay| {
        relay.max_tunnels = 1;
    })
    .await;
    let (first_ip, second_ip) = (ip(net, 9, 1), ip(net, 9, 2));
    let first = stack
        .start_agent(stack.agent("first", "default", &[first_ip], &[80]))
        .await;
    let refused = || postern::metrics::metrics().relay_tunnels_refused.get();
    let before = refused();
    let second = TestAgent::start(stack.agent("second", "default", &[second_ip], &[80]));
    wait_until(READY, "the second agent refused twice", || {
        refused() >= before + 2
    })
    .await;
    assert_eq!(
        stack.relay.sessions().len(),
        1,
        "only the first tunnel is up"
    );
    assert!(stack.owners("default", second_ip.into()).is_empty());
    assert_eq!(second.handle.tunnels(), 0);

    drop(first);
    stack
        .wait_routed("default", second_ip.into(), "second")
        .await;
    wait_until(READY, "the first agent's route gone", || {
        stack.owners("default", first_ip.into()).is_empty()
    })
    .await;
    assert_eq!(stack.relay.sessions().len(), 1);
}

/// A reload that narrows a token's addresses closes the tunnels that now claim beyond it, one that
/// removes the token closes every tunnel it admitted (their routes go with them), and the agent stays
/// out until the credential is back; a reload that changes nothing closes nothing, and a tunnel
/// admitted by certificate survives them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_revokes_a_token_closes_the_tunnels_it_admitted() {
    init();
    let pki = Pki::new();
    let net = 60;
    let ca = pki.ca();
    let stack = Stack::start(&pki, net, 0, GatewayConfig::default(), move |relay| {
        relay.agent_ca = Some(ca);
    })
    .await;
    let (agent_ip, cert_ip) = (ip(net, 9, 1), ip(net, 7, 1));
    let agent = stack
        .start_agent(stack.agent("revoked", "default", &[agent_ip], &[80]))
        .await;
    let _cert_agent = stack
        .start_agent(postern::config::AgentConfig {
            token: Secret::default(),
            identity: Some(pki.issue(Kind::Agent, "by-cert", &[IpAddr::V4(cert_ip)])),
            ..stack.agent("by-cert", "default", &[cert_ip], &[80])
        })
        .await;
    let credential =
        |cidr: String| AgentCredential::new("agents", &stack.token, vec![cidr.parse().unwrap()]);
    let full = credential(format!("127.{net}.0.0/16"));
    let token_sessions = || {
        stack
            .relay
            .sessions()
            .all()
            .iter()
            .filter(|s| s.agent_id == "revoked")
            .count()
    };
    let gone = || stack.owners("default", agent_ip.into()).is_empty() && token_sessions() == 0;
    let cert_agent_up = || {
        stack
            .owners("default", cert_ip.into())
            .iter()
            .any(|o| &*o.agent_id == "by-cert")
    };

    assert_eq!(stack.relay.reload_credentials(vec![full.clone()]), 0);
    assert_eq!(stack.relay.sessions().len(), 2);

    let narrowed = credential(format!("127.{net}.8.0/24"));
    assert_eq!(stack.relay.reload_credentials(vec![narrowed]), 1);
    let out = || gone() && agent.handle.tunnels() == 0;
    wait_until(READY, "the narrowed tunnel and its route gone", out).await;
    // The agent redials at least every second (`reconnect_max`); it must stay refused.
    holds_for(
        Duration::from_millis(1500),
        "the narrowed agent kept out, the certificate agent kept in",
        || out() && cert_agent_up(),
    )
    .await;

    assert_eq!(stack.relay.reload_credentials(vec![full.clone()]), 0);
    stack
        .wait_routed("default", agent_ip.into(), "revoked")
        .await;

    // A reload that reserves the agent's id for another credential (listed in its `ids`) closes
    // the tunnel as well: a new hello would be refused.
    let owner = AgentCredential {
        ids: vec!["revoked".into()],
        ..AgentCredential::new(
            "owner",
            &postern::config::hex(&rand::random::<[u8; 16]>()),
            vec![format!("127.{net}.0.0/16").parse().unwrap()],
        )
    };
    assert_eq!(stack.relay.reload_credentials(vec![full.clone(), owner]), 1);
    wait_until(READY, "the tunnel of the reserved id gone", gone).await;
    assert_eq!(stack.relay.reload_credentials(vec![full.clone()]), 0);
    stack
        .wait_routed("default", agent_ip.into(), "revoked")
        .await;

    assert_eq!(stack.relay.reload_credentials(Vec::new()), 1);
    wait_until(READY, "the revoked tunnel and its route gone", gone).await;
    assert!(
        cert_agent_up(),
        "a reload closed a tunnel admitted by certificate"
    );
    assert_eq!(stack.relay.sessions().len(), 1);
}
