//! Logs an operator can trust: failed logins in the access log and the counters, fatal errors in
//! the chosen format, no colour codes in files, and no line a client can forge.

use std::net::SocketAddr;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::process::*;
use crate::support::*;

/// A server with users and both front doors; no agent (nothing here reaches a target).
async fn server_with_users(
    w: &Workdir,
    net: u8,
    extra: &[&str],
) -> (Proc, SocketAddr, SocketAddr, SocketAddr) {
    let text = server_toml(w, net, &[("alice", "alice-pw")], "1s").replace(
        "socks5 = \"127.0.0.1:0\"",
        "socks5 = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"",
    );
    let config = w.write("server.toml", &text);
    let (server, line) =
        Proc::postern("server", "server", &config, extra, &w.path("server.log")).await;
    (
        server,
        ready_addr(&line, "socks5"),
        ready_addr(&line, "http"),
        ready_addr(&line, "admin"),
    )
}

/// Sends one HTTP request head to the proxy and returns the status code.
async fn proxy_status(proxy: SocketAddr, head: &str) -> u16 {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(QUICK, tcp.read(&mut buf))
        .await
        .expect("the proxy to answer")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

/// A SOCKS5 client that offers no-auth only, to a gateway that requires a password: the gateway
/// answers "no acceptable method" (0xff).
async fn socks_without_password(proxy: SocketAddr) -> u8 {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0u8; 2];
    tokio::time::timeout(QUICK, tcp.read_exact(&mut choice))
        .await
        .expect("an answer")
        .unwrap();
    choice[1]
}

fn unauthorized_count(admin_metrics: &str, front: &str) -> f64 {
    parse_samples(admin_metrics)
        .get(&format!(
            "postern_gateway_connections_total{{front=\"{front}\",result=\"unauthorized\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
}

/// Issue 10.2: a wrong or missing SOCKS5 password and an HTTP 407 (missing, malformed or wrong
/// credentials) each write one access-log line with `result=unauthorized` and the login offered,
/// and count under `result="unauthorized"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_logged_and_counted() {
    let w = Workdir::new("logins");
    let (_server, socks5, http, admin) = server_with_users(&w, 78, &["--log-format", "json"]).await;
    let target: SocketAddr = "127.78.0.1:80".parse().unwrap();

    // SOCKS5: a wrong password, an unknown user, no password at all.
    assert_eq!(
        socks_connect(socks5, Some(("alice", "wrong")), target)
            .await
            .err(),
        Some(0xf1)
    );
    assert_eq!(
        socks_connect(socks5, Some(("mallory", "x")), target)
            .await
            .err(),
        Some(0xf1)
    );
    assert_eq!(socks_without_password(socks5).await, 0xff);

    // HTTP: no Proxy-Authorization, a malformed one, a wrong password.
    let basic = |login: &str| base64::engine::general_purpose::STANDARD.encode(login);
    let heads = [
        "CONNECT 127.78.0.1:80 HTTP/1.1\r\nHost: 127.78.0.1:80\r\n\r\n".to_string(),
        "GET http://127.78.0.1:80/ HTTP/1.1\r\nHost: 127.78.0.1:80\r\nProxy-Authorization: Basic !!!\r\n\r\n"
            .to_string(),
        format!(
            "CONNECT 127.78.0.1:80 HTTP/1.1\r\nHost: 127.78.0.1:80\r\nProxy-Authorization: Basic {}\r\n\r\n",
            basic("alice:nope")
        ),
    ];
    for head in &heads {
        assert_eq!(proxy_status(http, head).await, 407, "{head}");
    }

    let (_, metrics) = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(unauthorized_count(&metrics, "socks5"), 3.0, "{metrics}");
    assert_eq!(unauthorized_count(&metrics, "http"), 3.0, "{metrics}");

    let lines: Vec<serde_json::Value> = wait_for(QUICK, "six refused access-log lines", || async {
        let lines: Vec<serde_json::Value> = w
            .log("server.log")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "postern::access" && v["fields"]["result"] == "unauthorized")
            .collect();
        (lines.len() >= 6).then_some(lines)
    })
    .await;
    assert_eq!(lines.len(), 6, "{lines:#?}");
    let users: Vec<&str> = lines
        .iter()
        .map(|l| l["fields"]["user"].as_str().unwrap())
        .collect();
    for front in ["socks5", "http"] {
        assert_eq!(
            lines
                .iter()
                .filter(|l| l["fields"]["front"] == front)
                .count(),
            3,
            "{lines:#?}"
        );
    }
    for user in ["alice", "mallory", "-"] {
        assert!(users.contains(&user), "no line for user {user}: {users:?}");
    }
    for l in &lines {
        assert!(
            l["fields"]["client"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:"),
            "{l}"
        );
    }
}

/// Issue 13.3 and 10.5: a SOCKS5 domain name holding a newline and ANSI escapes cannot write a
/// line of its own into a text log; and a text log written to a file holds no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_strings_cannot_forge_text_log_lines_and_files_get_no_colour() {
    let w = Workdir::new("forge");
    let (_server, socks5, _http, _admin) = server_with_users(&w, 79, &[]).await;
    let forged = "x\n2026-11-25T00:00:00.000000Z  INFO postern::access: connection client=6.6.6.6:1 result=ok\u{1b}[2K\r";
    let name = format!("{forged}.postern");
    let mut tcp = TcpStream::connect(socks5).await.unwrap();
    tcp.write_all(&[5, 1, 2]).await.unwrap();
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice).await.unwrap();
    assert_eq!(choice, [5, 2]);
    let mut auth = vec![1, 5];
    auth.extend_from_slice(b"alice");
    auth.push(8);
    auth.extend_from_slice(b"alice-pw");
    tcp.write_all(&auth).await.unwrap();
    let mut status = [0u8; 2];
    tcp.read_exact(&mut status).await.unwrap();
    assert_eq!(status, [1, 0]);
    let mut req = vec![5, 1, 0, 3, name.len() as u8];
    req.extend_from_slice(name.as_bytes());
    req.extend_from_slice(&80u16.to_be_bytes());
    tcp.write_all(&req).await.unwrap();
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply).await.unwrap();
    assert_ne!(reply[1], 0, "an unknown agent name is refused");

    let log = wait_for(QUICK, "the refusal's access-log line", || async {
        let log = w.log("server.log");
        log.contains("refused").then_some(log)
    })
    .await;
    assert!(
        !log.contains('\u{1b}'),
        "an ESC byte reached the log file:\n{log}"
    );
    assert!(!log.contains('\r'), "a CR reached the log file:\n{log}");
    for line in log.lines() {
        assert!(
            !line.starts_with("2026-11-25T00:00:00.000000Z"),
            "a client forged a log line:\n{log}"
        );
    }
    assert!(
        log.contains(r"x\n2026-11-25T00:00:00.000000Z"),
        "the name is logged escaped:\n{log}"
    );
}

/// Issue 10.5: with `--log-format json`, a fatal start-up error is a JSON line like every other
/// (a config error and a listener that cannot bind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_errors_follow_the_log_format() {
    let w = Workdir::new("fatal");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let good = server_toml(&w, 80, &[], "1s");
    let clash = w.write(
        "clash.toml",
        &good.replace(
            "socks5 = \"127.0.0.1:0\"",
            &format!("socks5 = \"{}\"", taken.local_addr().unwrap()),
        ),
    );
    let broken = w.write(
        "broken.toml",
        &good.replace("[gateway]", "[gateway]\nsocks = 1"),
    );
    for (config, expect) in [(&clash, "Address already in use"), (&broken, "socks")] {
        let out = tokio::process::Command::new(BIN)
            .args(["--log-format", "json", "server", "--config"])
            .arg(config)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!stderr.trim().is_empty());
        let mut fatal = None;
        for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}\n{stderr}"));
            if value["level"] == "ERROR" {
                fatal = Some(value);
            }
        }
        let fatal = fatal.unwrap_or_else(|| panic!("no ERROR line in {stderr}"));
        let error = fatal["fields"]["error"].as_str().unwrap_or_default();
        assert!(error.contains(expect), "{expect:?} not in {fatal}");
    }
    drop(taken);
}

/// A failed open names its cause and the owner that failed in the access log, and
/// `postern_gateway_open_attempts_total` counts the failed attempts by cause: a port where nothing
/// listens (`refused`, through relay-ops' session for agent-ops), an address no agent announces
/// (`no_route`, no owner), and the agent stopped with SIGSTOP (`tunnel_closed` when the relay's
/// idle timeout ends the tunnel first, `timeout` when the attempt's deadline does; the same owner).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_open_names_its_cause_and_owner_in_the_access_log() {
    let w = Workdir::new("open-cause");
    let net = 136;
    let s = Single::start(&w, net, &[], &["--log-format", "json"]).await;
    let refused_lines = || {
        w.log("server.log")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "postern::access" && v["fields"]["message"] == "refused")
            .map(|v| v["fields"].clone())
            .collect::<Vec<_>>()
    };

    // A definite refusal from the agent: the owner answered.
    assert_eq!(
        socks_connect(s.socks5, None, s.refused).await.err(),
        Some(0x05)
    );
    let lines = wait_for(QUICK, "the refused line", || async {
        let lines = refused_lines();
        (!lines.is_empty()).then_some(lines)
    })
    .await;
    let refused = &lines[0];
    assert_eq!(refused["target"], s.refused.to_string(), "{refused}");
    assert_eq!(refused["result"], "connection_refused", "{refused}");
    assert_eq!(refused["cause"], "refused", "{refused}");
    assert_eq!(refused["relay_id"], "relay-ops", "{refused}");
    assert_eq!(refused["agent_id"], "agent-ops", "{refused}");
    assert_eq!(refused["attempts"], 1, "{refused}");
    let session = refused["session_id"]
        .as_str()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no session id in {refused}"));

    // No owner at all.
    let unannounced = SocketAddr::from(([127, net, 200, 1], 80));
    assert!(socks_connect(s.socks5, None, unannounced).await.is_err());
    let lines = wait_for(QUICK, "the no-route line", || async {
        let lines = refused_lines();
        (lines.len() >= 2).then_some(lines)
    })
    .await;
    let no_route = &lines[1];
    assert_eq!(no_route["target"], unannounced.to_string(), "{no_route}");
    assert_eq!(no_route["cause"], "no_route", "{no_route}");
    assert_eq!(no_route["relay_id"], "-", "{no_route}");
    assert_eq!(no_route["session_id"], "-", "{no_route}");
    assert_eq!(no_route["attempts"], 0, "{no_route}");

    // The agent stops answering: the attempt through its tunnel fails, and the line says how and
    // through which owner.
    let stopped = crate::admin::Stopped::stop(&s.agent);
    let asked = std::time::Instant::now();
    let reply = socks_connect(s.socks5, None, s.echo.addr).await.err();
    let waited = asked.elapsed();
    assert!(
        matches!(reply, Some(0x01 | 0x06)),
        "a stopped agent got SOCKS5 reply {reply:?}"
    );
    let lines = wait_for(QUICK, "the stopped-agent line", || async {
        let lines = refused_lines();
        (lines.len() >= 3).then_some(lines)
    })
    .await;
    drop(stopped);
    let failed = &lines[2];
    eprintln!("stopped agent: SOCKS5 reply {reply:?} after {waited:?}; {failed}");
    assert_eq!(failed["target"], s.echo.addr.to_string(), "{failed}");
    let cause = failed["cause"].as_str().unwrap_or_default();
    assert!(
        cause == "tunnel_closed" || cause == "timeout",
        "cause {cause} after {waited:?}: {failed}"
    );
    assert_eq!(failed["relay_id"], "relay-ops", "{failed}");
    assert_eq!(failed["agent_id"], "agent-ops", "{failed}");
    assert_eq!(failed["session_id"], session.to_string(), "{failed}");

    // The metric counts the failed attempts by cause.
    let (status, metrics) = http_get(s.admin, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    let samples = parse_samples(&metrics);
    for result in ["refused", cause] {
        let series = format!("postern_gateway_open_attempts_total{{result=\"{result}\"}}");
        let count = samples
            .get(&series)
            .unwrap_or_else(|| panic!("{series} missing:\n{metrics}"));
        assert!(*count >= 1.0, "{series} = {count}");
    }
}
