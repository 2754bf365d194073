//! The HTTP proxy as clients and services use it, against the real binary: a client that leaves
//! (or shuts its sending side, as nginx and squid take it by default) before its answer, or in
//! the middle of it, cancels the exchange: the service sees a reset and the access log says
//! `aborted` and why; a service that answers before it has
//! read an upload still gets all of it, byte-exact, and the client's connection stays open; an
//! HTTP/1.0 service's answer reaches the client as HTTP/1.1 on a kept connection; header names
//! keep their case both ways; a response head with too many fields is a `502` that says so.

use std::net::{Ipv4Addr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::broken::read_head;
use crate::process::*;
use crate::support::*;

/// Runs `answer` for every connection accepted on a fresh port of `ip`.
async fn service<F, Fut>(ip: Ipv4Addr, answer: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(answer(tcp));
        }
    });
    addr
}

/// A request head, or `None` once the connection ends.
async fn request_head(tcp: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(String::from_utf8_lossy(&head).to_string())
}

/// Reads one response (head and `Content-Length` body) from `tcp`.
async fn response(tcp: &mut TcpStream) -> (String, Vec<u8>) {
    let head = tokio::time::timeout(QUICK, read_head(tcp))
        .await
        .expect("a response head");
    let length: usize = header(&head, "content-length")
        .unwrap_or_else(|| panic!("no content-length: {head}"))
        .parse()
        .unwrap();
    let mut body = vec![0u8; length];
    tokio::time::timeout(QUICK, tcp.read_exact(&mut body))
        .await
        .expect("a response body")
        .unwrap();
    (head, body)
}

const UPLOAD: usize = 20 * 1024 * 1024;

/// A service that never answers: its address, a channel told when a request's bytes arrive, and
/// one told how each connection ended (`eof` or the error kind).
async fn silent(
    ip: Ipv4Addr,
) -> (
    SocketAddr,
    tokio::sync::mpsc::Receiver<()>,
    tokio::sync::mpsc::Receiver<String>,
) {
    let (got_tx, got) = tokio::sync::mpsc::channel(1);
    let (left_tx, left) = tokio::sync::mpsc::channel(1);
    let addr = service(ip, move |mut tcp| {
        let (got_tx, left_tx) = (got_tx.clone(), left_tx.clone());
        async move {
            let mut rest = vec![0u8; 64 * 1024];
            let end = loop {
                match tcp.read(&mut rest).await {
                    Ok(0) => break "eof".to_string(),
                    Ok(_) => {
                        let _ = got_tx.try_send(());
                    }
                    Err(e) => break format!("{:?}", e.kind()),
                }
            };
            let _ = left_tx.send(end).await;
        }
    })
    .await;
    (addr, got, left)
}

/// Waits for the access-log line of an exchange with `target`: `aborted`, its error `why`.
async fn wait_aborted(w: &Workdir, target: SocketAddr, why: &str) {
    let line = access_line(w, target).await;
    assert_eq!(line["fields"]["result"], "aborted", "{line}");
    assert_eq!(line["fields"]["error"], why, "{line}");
}

/// Waits for the access-log line of the exchange with `target`.
async fn access_line(w: &Workdir, target: SocketAddr) -> serde_json::Value {
    let what = format!("the access-log line of the exchange with {target}");
    wait_for(QUICK, &what, || async {
        w.log("server.log")
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| {
                v["target"] == "postern::access"
                    && v["fields"]["target"] == target.to_string().as_str()
            })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_proxy_keeps_what_clients_and_services_rely_on() {
    let w = Workdir::new("proxy");
    let ip = Ipv4Addr::new(127, 82, 0, 1);
    let (_server, line) = server_with_http(&w, 82).await;
    let http = ready_addr(&line, "http");

    // Reads a request and its `Content-Length` body, answers `200 ok` echoing the head it got.
    let whole = service(ip, |mut tcp| async move {
        while let Some(head) = request_head(&mut tcp).await {
            let length: usize = header(&head, "content-length").map_or(0, |v| v.parse().unwrap());
            let mut body = vec![0u8; length];
            tcp.read_exact(&mut body).await.unwrap();
            let answer = format!(
                "HTTP/1.1 200 OK\r\nX-Reply-Case: kept\r\nContent-Length: {}\r\n\r\n{head}",
                head.len()
            );
            if tcp.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    // Answers at once, then reads the whole upload and reports its digest.
    let (digest_tx, mut digest) = tokio::sync::mpsc::channel(1);
    let early = service(ip, move |mut tcp| {
        let digest_tx = digest_tx.clone();
        async move {
            let Some(head) = request_head(&mut tcp).await else {
                return;
            };
            let length: usize = header(&head, "content-length").unwrap().parse().unwrap();
            tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nearly\n")
                .await
                .unwrap();
            let mut body = vec![0u8; length];
            let got = tcp.read_exact(&mut body).await.map(|_| sha256(&body));
            let _ = digest_tx.send(got.map_err(|e| e.to_string())).await;
        }
    })
    .await;
    let (at_once, _, mut at_once_left) = silent(ip).await;
    let (later, mut got, mut left) = silent(ip).await;
    // Answers with a body far larger than anyone reads; says how writing it ended.
    let big = service(ip, move |mut tcp| async move {
        request_head(&mut tcp).await;
        let _ = tcp
            .write_all(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 1u64 << 34).as_bytes(),
            )
            .await;
        let chunk = vec![7u8; 64 * 1024];
        while tcp.write_all(&chunk).await.is_ok() {}
    })
    .await;
    // An HTTP/1.0 service.
    let old = service(ip, |mut tcp| async move {
        request_head(&mut tcp).await;
        let _ = tcp
            .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold")
            .await;
    })
    .await;
    // A response head with 101 fields.
    let crowded = service(ip, |mut tcp| async move {
        request_head(&mut tcp).await;
        let mut answer = String::from("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n");
        for i in 0..100 {
            answer.push_str(&format!("Set-Cookie: c{i}=v\r\n"));
        }
        answer.push_str("\r\nok");
        let _ = tcp.write_all(answer.as_bytes()).await;
    })
    .await;

    // A chunked response that ends with a trailer field.
    let trailing = service(ip, |mut tcp| async move {
        request_head(&mut tcp).await;
        let _ = tcp
            .write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n\
                  5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n",
            )
            .await;
    })
    .await;
    // Reads requests with chunked bodies (trailers included) or none; answers each `200 ok`.
    let chunked = service(ip, |mut tcp| async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let Some(head_end) = find(&buf, b"\r\n\r\n", 0) else {
                match tcp.read(&mut chunk).await {
                    Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                    _ => return,
                }
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
            let end = if head.contains("transfer-encoding: chunked") {
                // The last chunk, then the trailer section up to its empty line.
                match find(&buf, b"\r\n0\r\n", head_end)
                    .and_then(|last| find(&buf, b"\r\n\r\n", last + 3))
                {
                    Some(blank) => blank + 4,
                    None => {
                        match tcp.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                        continue;
                    }
                }
            } else {
                head_end + 4
            };
            buf.drain(..end);
            if tcp
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .is_err()
            {
                return;
            }
        }
    })
    .await;
    let ports: Vec<u16> = [
        whole, early, old, crowded, at_once, later, big, trailing, chunked,
    ]
    .iter()
    .map(|a| a.port())
    .collect();
    let _agent = routed_agent(&w, &line, "agent-proxy", ip, &ports).await;

    // 1. A client that shuts its sending side while its request waits for an answer has left, as
    // a client that closes does: the service's connection is reset, the log says why. At once
    // (while the stream is being opened), and once the service has the request.
    for (target, wait_for_service) in [(at_once, false), (later, true)] {
        let mut tcp = TcpStream::connect(http).await.unwrap();
        tcp.write_all(
            format!("GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        if wait_for_service {
            tokio::time::timeout(QUICK, got.recv())
                .await
                .expect("the request to reach the service");
        }
        tcp.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(QUICK, tcp.read_to_end(&mut rest)).await;
        assert!(
            rest.is_empty(),
            "no answer: {:?}",
            String::from_utf8_lossy(&rest)
        );
        wait_aborted(&w, target, "the client left before the answer").await;
    }
    let end = tokio::time::timeout(QUICK, left.recv())
        .await
        .expect("the service's connection to end")
        .unwrap();
    assert_eq!(end, "ConnectionReset", "the service's connection");
    // The request that left at once may or may not have been dialled by then (its open was
    // cancelled); if it was, that connection was reset too, never closed cleanly.
    if let Ok(Some(end)) =
        tokio::time::timeout(std::time::Duration::from_secs(2), at_once_left.recv()).await
    {
        assert_eq!(
            end, "ConnectionReset",
            "the at-once request's service connection"
        );
    }

    // A client that closes in the middle of a response: the same.
    let mut tcp = TcpStream::connect(http).await.unwrap();
    tcp.write_all(format!("GET http://{big}/ HTTP/1.1\r\nHost: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut part = vec![0u8; 1024 * 1024];
    tokio::time::timeout(QUICK, tcp.read_exact(&mut part))
        .await
        .expect("a first MiB")
        .unwrap();
    drop(tcp);
    wait_aborted(&w, big, "the client left before the response ended").await;

    // 2. Header names keep their case both ways.
    let mut tcp = TcpStream::connect(http).await.unwrap();
    tcp.write_all(
        format!("GET http://{whole}/case HTTP/1.1\r\nHost: {whole}\r\nX-Legacy-Token: abc\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let (head, body) = response(&mut tcp).await;
    let seen = String::from_utf8_lossy(&body);
    assert!(
        seen.contains("\r\nX-Legacy-Token: abc\r\n"),
        "the service saw: {seen}"
    );
    assert!(
        head.contains("\r\nX-Reply-Case: kept\r\n"),
        "the client saw: {head}"
    );

    // 3. An HTTP/1.0 service's answer, as HTTP/1.1 on a connection that serves the next request.
    tcp.write_all(format!("GET http://{old}/ HTTP/1.1\r\nHost: {old}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (head, body) = response(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"old");
    tcp.write_all(format!("GET http://{whole}/next HTTP/1.1\r\nHost: {whole}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (head, _) = response(&mut tcp).await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "after an HTTP/1.0 answer: {head}"
    );

    // 4. Too many header fields in a response: a 502 that says so.
    tcp.write_all(format!("GET http://{crowded}/ HTTP/1.1\r\nHost: {crowded}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (head, body) = response(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(
        String::from_utf8_lossy(&body).contains("more than 100 header fields"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    // 5. An answer before the upload is read: the upload goes on to its end, byte-exact, and the
    // connection serves the next request.
    let upload = payload(UPLOAD, 82);
    let mut tcp = TcpStream::connect(http).await.unwrap();
    tcp.write_all(
        format!(
            "POST http://{early}/ HTTP/1.1\r\nHost: {early}\r\nContent-Length: {UPLOAD}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (mut read, mut write) = tcp.into_split();
    let sending = tokio::spawn(async move {
        write.write_all(&upload).await.unwrap();
        write
    });
    let head = tokio::time::timeout(QUICK, async {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            read.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).to_string()
    })
    .await
    .expect("the early answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        header(&head, "connection").is_none(),
        "an early answer must not close the connection: {head}"
    );
    let mut early_body = [0u8; 6];
    read.read_exact(&mut early_body).await.unwrap();
    assert_eq!(&early_body, b"early\n");
    let mut write = tokio::time::timeout(QUICK, sending)
        .await
        .expect("the upload to go through")
        .unwrap();
    let got = tokio::time::timeout(QUICK, digest.recv())
        .await
        .expect("the service to read the upload")
        .unwrap();
    assert_eq!(
        got,
        Ok(sha256(&payload(UPLOAD, 82))),
        "the service's copy of the upload"
    );
    write
        .write_all(format!("GET http://{whole}/after HTTP/1.1\r\nHost: {whole}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut tcp = read.reunite(write).unwrap();
    let (head, body) = response(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 200"), "after the upload: {head}");
    assert!(String::from_utf8_lossy(&body).starts_with("GET /after HTTP/1.1"));

    // 6. A CONNECT is a tunnel: a client that sends its head and its bytes and shuts its side at
    // once (before the `200`) still gets the `200` and the service's answer.
    let mut tcp = TcpStream::connect(http).await.unwrap();
    tcp.write_all(
        format!(
            "CONNECT {whole} HTTP/1.1\r\nHost: {whole}\r\n\r\nGET /tunnel HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tcp.shutdown().await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(QUICK, tcp.read_to_end(&mut all))
        .await
        .expect("the tunnel to end")
        .unwrap();
    let all = String::from_utf8_lossy(&all);
    assert!(all.starts_with("HTTP/1.1 200"), "{all}");
    assert!(all.contains("\r\n\r\nGET /tunnel HTTP/1.1\r\n"), "{all}");

    // 7. A response that ends with trailers is a whole response: logged `ok`.
    let mut tcp = TcpStream::connect(http).await.unwrap();
    tcp.write_all(
        format!("GET http://{trailing}/ HTTP/1.1\r\nHost: {trailing}\r\nTE: trailers\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(QUICK, tcp.read_to_end(&mut all))
        .await
        .expect("the response to end")
        .unwrap();
    let all = String::from_utf8_lossy(&all);
    assert!(
        all.starts_with("HTTP/1.1 200") && all.contains("hello"),
        "{all}"
    );
    let line = access_line(&w, trailing).await;
    assert_eq!(line["fields"]["result"], "ok", "{line}");

    // 8. A request whose chunked body ends with trailers keeps its connection: the next request,
    // pipelined behind it, is answered too.
    let mut tcp = TcpStream::connect(http).await.unwrap();
    tcp.write_all(
        format!(
            "POST http://{chunked}/p HTTP/1.1\r\nHost: {chunked}\r\nTransfer-Encoding: chunked\r\n\
             Trailer: X-Sum\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 123\r\n\r\n\
             GET http://{chunked}/g HTTP/1.1\r\nHost: {chunked}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    for request in ["the POST with trailers", "the GET behind it"] {
        let (head, body) = response(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{request}: {head}");
        assert!(header(&head, "connection").is_none(), "{request}: {head}");
        assert_eq!(body, b"ok", "{request}");
    }
}

/// Where `needle` first occurs in `haystack` at or after `from`.
fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|at| from + at)
}
