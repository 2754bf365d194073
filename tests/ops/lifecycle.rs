//! Process life cycle: signals end a process within its promises.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::process::*;
use crate::support::*;

/// Issue 10.8: SIGTERM interrupts an agent's dials. Three relay endpoints that swallow every
/// packet (a QUIC handshake to each would wait out its dial timeout); once the first Initial packet
/// has arrived, SIGTERM ends the agent well within its 3 s drain grace, with status 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_interrupts_an_agents_dials() {
    let w = Workdir::new("sigterm-dial");
    let silent: Vec<tokio::net::UdpSocket> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        }
        v
    };
    let relays: Vec<SocketAddr> = silent.iter().map(|s| s.local_addr().unwrap()).collect();
    let config = w.write(
        "agent.toml",
        &agent_toml(
            &w,
            "agent-dial",
            &relays,
            Ipv4Addr::new(127, 76, 0, 1),
            &[80],
            1,
            "3s",
        ),
    );
    let (mut agent, _) = Proc::postern("agent", "agent", &config, &[], &w.path("agent.log")).await;

    // The agent is dialling once one of the silent endpoints has received a packet.
    let first_packet = async {
        let recvs = silent.iter().map(|s| async move {
            let mut buf = [0u8; 2048];
            s.recv_from(&mut buf).await.map(|(n, _)| n)
        });
        futures_select_all(recvs).await.0
    };
    let n = tokio::time::timeout(QUICK, first_packet)
        .await
        .expect("the agent to start dialling")
        .unwrap();
    assert!(n >= 1200, "a QUIC Initial is padded to 1200 bytes, got {n}");

    let signalled = Instant::now();
    agent.signal("TERM");
    let status = agent.wait_exit(Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    eprintln!("agent exited {took:?} after SIGTERM while dialling (drain_grace 3s)");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < Duration::from_secs(3),
        "SIGTERM waited for the dials: {took:?} (drain_grace is 3s)"
    );
}

/// The first of several futures to finish (a tiny `select_all`, to avoid a dependency for one test).
async fn futures_select_all<F, T>(futures: impl IntoIterator<Item = F>) -> (T, usize, ())
where
    F: std::future::Future<Output = T>,
{
    let mut futures: Vec<_> = futures.into_iter().map(Box::pin).collect();
    std::future::poll_fn(move |cx| {
        for (i, f) in futures.iter_mut().enumerate() {
            if let std::task::Poll::Ready(v) = f.as_mut().poll(cx) {
                return std::task::Poll::Ready((v, i, ()));
            }
        }
        std::task::Poll::Pending
    })
    .await
}
