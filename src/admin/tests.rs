use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

async fn healthz(addr: std::net::SocketAddr) -> std::io::Result<String> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).await?;
    Ok(out)
}

#[test]
fn counters_read_from_the_exposition() {
    let text = "# HELP postern_gateway_bytes_total Bytes\n\
        # TYPE postern_gateway_bytes_total counter\n\
        postern_gateway_bytes_total{direction=\"up\"} 1200\n\
        postern_gateway_bytes_total{direction=\"down\"} 3400\n\
        postern_gateway_connections_total{front=\"socks5\",result=\"ok\"} 7\n\
        postern_gateway_connections_total{front=\"http\",result=\"ok\"} 1\n\
        postern_gateway_connections_total{front=\"socks5\",result=\"no_route\"} 2\n\
        postern_gateway_connections_total{front=\"http\",result=\"unauthorized\"} 1\n\
        postern_gateway_connections_total{front=\"socks5\",result=\"connection_refused\"} 3\n\
        postern_gateway_connections_total{front=\"socks5\",result=\"aborted\"} 1\n\
        postern_relay_tunnels_refused_total 4\n\
        postern_relay_tunnels 9\n";
    assert_eq!(
        Counters::from_exposition(text),
        Counters {
            bytes_up: 1200,
            bytes_down: 3400,
            connections: 15,
            refusals: 3,
            errors: 4,
            tunnels_refused: 4,
        }
    );
    // The process's own exposition parses (whatever it holds so far).
    let _ = Counters::from_exposition(&crate::metrics::metrics().encode());
}

fn agent_state() -> AdminState {
    AdminState {
        role: "agent",
        process: None,
        agent: None,
        shutdown: CancellationToken::new(),
    }
}

/// Whether the server has closed `tcp` (EOF or reset) within `limit`.
async fn closed_within(tcp: &mut TcpStream, limit: std::time::Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(limit, tcp.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// One source holds at most its share: its next connection evicts its oldest idle one, and
/// `/healthz` from that same source still answers.
#[tokio::test]
async fn a_source_beyond_its_share_evicts_its_oldest_idle_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve(listener, agent_state(), stop.clone()));
    let mut idle = Vec::new();
    for _ in 0..MAX_CONNECTIONS_PER_SOURCE {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let text = healthz(addr).await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        closed_within(&mut idle[0], std::time::Duration::from_secs(1)).await,
        "the oldest idle connection was not evicted"
    );
    assert!(
        !closed_within(&mut idle[1], std::time::Duration::from_millis(200)).await,
        "a younger connection was evicted before the oldest"
    );
    stop.cancel();
    server.await.unwrap();
}

/// A connection that sends nothing, or dribbles a request head, is closed after
/// IDLE_TIMEOUT; a kept-alive connection answers again before it.
#[tokio::test]
async fn idle_and_dribbling_connections_are_closed_after_the_idle_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve(listener, agent_state(), stop.clone()));
    let started = std::time::Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut dribbler = TcpStream::connect(addr).await.unwrap();
    let dribble = async {
        for byte in b"GET /healthz HTTP/1.1\r\nhost: x\r\n" {
            if dribbler.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    };
    let limit = IDLE_TIMEOUT * 3 / 2 + std::time::Duration::from_secs(1);
    let (silent_closed, ()) = tokio::join!(closed_within(&mut silent, limit), dribble);
    assert!(
        silent_closed,
        "a silent connection outlived the idle timeout"
    );
    assert!(started.elapsed() >= IDLE_TIMEOUT - std::time::Duration::from_millis(100));
    assert!(
        closed_within(&mut dribbler, std::time::Duration::from_secs(1)).await,
        "a dribbling connection outlived the idle timeout"
    );

    // Keep-alive: two requests on one connection, the second after a pause shorter than the
    // idle timeout.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    for _ in 0..2 {
        kept.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = kept.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        tokio::time::sleep(IDLE_TIMEOUT / 2).await;
    }
    stop.cancel();
    server.await.unwrap();
}
