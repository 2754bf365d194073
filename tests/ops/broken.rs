//! A broken transfer looks broken on every front door, and is counted and logged as it was.
//!
//! Three downloads (SOCKS5, HTTP CONNECT, absolute-form `http://`) of a 256 MiB response run
//! through a `postern server`; each client pauses at 8 MiB; the agent carrying them is killed
//! (`kill -9`). Every client must then see a reset (never a clean end after truncated data), the
//! access log must say `result=aborted` with at least the bytes the client got, and
//! `postern_gateway_bytes_total{direction="down"}` must count them too.
//!
//! The other way round: three uploads, one per door, each client reset (`SO_LINGER` 0) half-way
//! through its body. The service behind the agent must see a reset too, never a clean end of the
//! bytes it got.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::process::*;
use crate::support::*;

const BODY: u64 = 256 * 1024 * 1024;
const PAUSE_AT: usize = 8 * 1024 * 1024;

/// An HTTP service that answers every request with a `BODY`-byte response, written until the
/// connection breaks.
async fn source(ip: Ipv4Addr) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if tcp.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let header = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n");
                if tcp.write_all(header.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = payload(64 * 1024, 9);
                let mut sent = 0u64;
                while sent < BODY {
                    if tcp.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent += chunk.len() as u64;
                }
            });
        }
    });
    addr
}

#[derive(Debug, PartialEq)]
enum End {
    Reset,
    CleanEof,
    Complete,
}

/// Reads a response until its end: pauses at `PAUSE_AT` until `go`, then reads to the end.
async fn download(
    mut tcp: TcpStream,
    paused: tokio::sync::mpsc::Sender<()>,
    go: CancellationToken,
) -> (End, u64) {
    let mut got = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    let mut pause = true;
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) if got >= BODY => return (End::Complete, got),
            Ok(0) => return (End::CleanEof, got),
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (End::Reset, got),
            Err(e) => panic!("unexpected read error after {got} bytes: {e}"),
        }
        if pause && got >= PAUSE_AT as u64 {
            pause = false;
            paused.send(()).await.unwrap();
            // Cancelled once: every download passes, whenever it gets here.
            go.cancelled().await;
        }
    }
}

/// Reads an HTTP response head byte by byte (so that nothing behind it is consumed).
pub(crate) async fn read_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            tcp.read(&mut byte).await.unwrap(),
            1,
            "head cut short: {head:?}"
        );
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_transfer_is_reset_logged_and_counted_on_every_door() {
    let w = Workdir::new("broken");
    let ip = Ipv4Addr::new(127, 77, 0, 1);
    let (_server, line) = server_with_http(&w, 77).await;
    let (socks5, http, admin) = (
        ready_addr(&line, "socks5"),
        ready_addr(&line, "http"),
        ready_addr(&line, "admin"),
    );
    let target = source(ip).await;
    let agent = routed_agent(&w, &line, "agent-broken", ip, &[target.port()]).await;

    let get = format!("GET / HTTP/1.1\r\nHost: {target}\r\n\r\n");
    // SOCKS5.
    let mut via_socks = socks_connect(socks5, None, target)
        .await
        .expect("socks5 connect");
    via_socks.write_all(get.as_bytes()).await.unwrap();
    // CONNECT.
    let mut via_connect = TcpStream::connect(http).await.unwrap();
    via_connect
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut via_connect).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    via_connect.write_all(get.as_bytes()).await.unwrap();
    // Absolute-form.
    let mut via_absolute = TcpStream::connect(http).await.unwrap();
    via_absolute
        .write_all(format!("GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();

    let (paused_tx, mut paused_rx) = tokio::sync::mpsc::channel(3);
    let go = CancellationToken::new();
    let doors = [
        ("socks5", via_socks),
        ("connect", via_connect),
        ("absolute", via_absolute),
    ];
    let mut downloads = Vec::new();
    for (door, tcp) in doors {
        let (paused, go) = (paused_tx.clone(), go.clone());
        downloads.push((door, tokio::spawn(download(tcp, paused, go))));
    }
    for _ in 0..3 {
        tokio::time::timeout(QUICK, paused_rx.recv())
            .await
            .expect("every download to reach 8 MiB")
            .unwrap();
    }
    agent.signal("KILL");
    go.cancel();

    let mut received = std::collections::BTreeMap::new();
    for (door, task) in downloads {
        let (end, got) = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .unwrap_or_else(|_| panic!("{door}: the download never ended"))
            .unwrap();
        eprintln!("{door}: {end:?} after {got} bytes");
        assert_eq!(
            end,
            End::Reset,
            "{door}: a cut transfer must end with a reset ({got} bytes)"
        );
        assert!(got < BODY, "{door}");
        received.insert(door, got);
    }

    // The access log: three `connection` lines, `result=aborted`, bytes at least what arrived.
    let lines: Vec<serde_json::Value> =
        wait_for(QUICK, "three aborted access-log lines", || async {
            let lines: Vec<serde_json::Value> = w
                .log("server.log")
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| {
                    v["target"] == "postern::access" && v["fields"]["message"] == "connection"
                })
                .collect();
            (lines.len() >= 3).then_some(lines)
        })
        .await;
    assert_eq!(lines.len(), 3, "{lines:#?}");
    let mut logged_down = 0u64;
    for l in &lines {
        assert_eq!(l["fields"]["result"], "aborted", "{l}");
        assert!(
            l["fields"]["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{l}"
        );
        logged_down += l["fields"]["bytes_down"].as_u64().unwrap();
    }
    // The absolute-form client reads the gateway's own response head (hyper adds a `date`
    // header), which the upstream count does not include: allow that head's difference.
    const HEAD_SLACK: u64 = 64;
    let total: u64 = received.values().sum();
    assert!(
        logged_down + HEAD_SLACK >= total,
        "logged {logged_down} bytes down, clients got {total}: {lines:#?}"
    );

    let (_, metrics) = http_get(admin, "/metrics").await.unwrap();
    let counted = parse_samples(&metrics)
        .get("postern_gateway_bytes_total{direction=\"down\"}")
        .copied()
        .unwrap_or(0.0) as u64;
    assert!(
        counted + HEAD_SLACK >= total,
        "postern_gateway_bytes_total counted {counted}, clients got {total}"
    );
    let aborted = parse_samples(&metrics)
        .iter()
        .filter(|(k, _)| {
            k.starts_with("postern_gateway_connections_total") && k.contains("result=\"aborted\"")
        })
        .map(|(_, v)| *v)
        .sum::<f64>();
    assert_eq!(aborted, 3.0, "{metrics}");
}

/// A service that reads each connection until it ends, and says how: `reached` once a connection
/// has delivered `UPLOAD_SEEN` bytes, `ended` with the end and the byte count.
async fn sink(
    ip: Ipv4Addr,
    reached: tokio::sync::mpsc::Sender<()>,
    ended: tokio::sync::mpsc::Sender<(End, u64)>,
) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (reached, ended) = (reached.clone(), ended.clone());
            tokio::spawn(async move {
                let mut got = 0u64;
                let mut told = false;
                let mut buf = vec![0u8; 256 * 1024];
                let end = loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) => break End::CleanEof,
                        Ok(n) => got += n as u64,
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                            break End::Reset;
                        }
                        Err(e) => panic!("unexpected read error after {got} bytes: {e}"),
                    }
                    if !told && got >= UPLOAD_SEEN {
                        told = true;
                        let _ = reached.send(()).await;
                    }
                };
                let _ = ended.send((end, got)).await;
            });
        }
    });
    addr
}

const UPLOAD_SEEN: u64 = 1024 * 1024;

/// A service that reads one request with a `Content-Length` body, answers `200 ok`, then reads
/// until the connection ends and says how.
async fn answer(ip: Ipv4Addr, ended: tokio::sync::mpsc::Sender<End>) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let ended = ended.clone();
            tokio::spawn(async move {
                let head = read_head(&mut tcp).await;
                let length: usize = header(&head, "content-length")
                    .expect("a content-length")
                    .parse()
                    .unwrap();
                let mut body = vec![0u8; length];
                tcp.read_exact(&mut body).await.unwrap();
                tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await
                    .unwrap();
                let mut rest = [0u8; 64];
                let end = match tcp.read(&mut rest).await {
                    Ok(0) => End::CleanEof,
                    Ok(n) => panic!("{n} bytes after the request"),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => End::Reset,
                    Err(e) => panic!("unexpected read error: {e}"),
                };
                let _ = ended.send(end).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_mid_upload_reaches_the_service_as_a_reset() {
    let w = Workdir::new("upload-reset");
    let ip = Ipv4Addr::new(127, 81, 0, 1);
    let (_server, line) = server_with_http(&w, 81).await;
    let (socks5, http) = (ready_addr(&line, "socks5"), ready_addr(&line, "http"));
    let (reached_tx, mut reached) = tokio::sync::mpsc::channel(3);
    let (ended_tx, mut ended) = tokio::sync::mpsc::channel(3);
    let target = sink(ip, reached_tx, ended_tx).await;
    let (answered_tx, mut answered) = tokio::sync::mpsc::channel(1);
    let whole = answer(ip, answered_tx).await;
    let _agent = routed_agent(
        &w,
        &line,
        "agent-upload",
        ip,
        &[target.port(), whole.port()],
    )
    .await;

    // A whole exchange ends the upstream stream cleanly: the service sees its connection's end.
    let mut client = TcpStream::connect(http).await.unwrap();
    client
        .write_all(
            format!(
                "POST http://{whole}/ HTTP/1.1\r\nHost: {whole}\r\nContent-Length: 5\r\n\r\nhello"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(client);
    let end = tokio::time::timeout(QUICK, answered.recv())
        .await
        .expect("the whole exchange to end at the service")
        .unwrap();
    assert_eq!(
        end,
        End::CleanEof,
        "a whole exchange must end cleanly upstream"
    );

    // Each client announces far more body than it sends, so that no framing can end it cleanly.
    let post = format!("POST / HTTP/1.1\r\nHost: {target}\r\nContent-Length: {BODY}\r\n\r\n");
    let mut via_socks = socks_connect(socks5, None, target)
        .await
        .expect("socks5 connect");
    via_socks.write_all(post.as_bytes()).await.unwrap();
    let mut via_connect = TcpStream::connect(http).await.unwrap();
    via_connect
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut via_connect).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    via_connect.write_all(post.as_bytes()).await.unwrap();
    let mut via_absolute = TcpStream::connect(http).await.unwrap();
    via_absolute
        .write_all(
            format!(
                "POST http://{target}/ HTTP/1.1\r\nHost: {target}\r\nContent-Length: {BODY}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();

    let chunk = payload(64 * 1024, 5);
    let mut clients = [via_socks, via_connect, via_absolute];
    for tcp in clients.iter_mut() {
        for _ in 0..(2 * UPLOAD_SEEN as usize / chunk.len()) {
            tcp.write_all(&chunk).await.unwrap();
        }
    }
    for _ in 0..3 {
        tokio::time::timeout(QUICK, reached.recv())
            .await
            .expect("every upload to reach the service")
            .unwrap();
    }
    for tcp in clients {
        // SO_LINGER 0: the close sends a RST.
        socket2::SockRef::from(&tcp)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(tcp);
    }
    for _ in 0..3 {
        let (end, got) = tokio::time::timeout(Duration::from_secs(30), ended.recv())
            .await
            .expect("every upload to end at the service")
            .unwrap();
        eprintln!("service: {end:?} after {got} bytes");
        assert_eq!(
            end,
            End::Reset,
            "a client's reset must reach the service as a reset, not as a clean end after \
             {got} bytes"
        );
        assert!(got < BODY);
    }
}
