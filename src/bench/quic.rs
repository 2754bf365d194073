//! `postern bench quic`: the machine's QUIC ceiling — one quinn connection, one stream, bulk data
//! from a server endpoint to a client endpoint on loopback, in this process. TLS 1.3 is on (postern's
//! own [`crate::tls`] configurations with a freshly generated certificate), and so is postern's
//! transport ([`Transport::default`]: windows, buffers, and quinn's MTU discovery capped at 1452
//! bytes, the real-network packet size), so a tunnel can be compared against it directly.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use serde::Serialize;
use tokio::time::Instant;

use super::report::Report;
use crate::cert::{self, Kind};
use crate::config::Transport;
use crate::protocol::ALPN_AGENT;
use crate::tls::{self, Identity, Trust};

/// Size of each chunk the sender hands quinn (shared, never copied).
const CHUNK: usize = 1024 * 1024;
/// Streams either side may open; one is used.
const STREAMS: u32 = 4;

#[derive(Debug, Serialize)]
pub struct QuicReport {
    pub test: &'static str,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub bytes: u64,
    pub gbit_per_s: f64,
    /// The path MTU quinn had discovered by the end (postern caps it at 1452).
    pub mtu: u16,
    /// Sender's packet counts, over the whole run.
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub congestion_events: u64,
    pub rtt_us: f64,
}

impl Report for QuicReport {
    fn human(&self) -> String {
        format!(
            "quic: one connection, one stream, loopback, TLS on, {:.1} s after {:.1} s warm-up\n  {:.3} Gbit/s (MTU {}, {} packets sent, {} lost, {} congestion events, RTT {:.0} µs)\n",
            self.duration_s,
            self.warmup_s,
            self.gbit_per_s,
            self.mtu,
            self.sent_packets,
            self.lost_packets,
            self.congestion_events,
            self.rtt_us
        )
    }
}

/// Runs the transfer for `warmup` + `duration` and measures the last `duration`.
pub async fn run(duration: Duration, warmup: Duration) -> anyhow::Result<QuicReport> {
    if duration.is_zero() {
        anyhow::bail!("--duration must be more than 0");
    }
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let (ca_pem, ca_key_pem) = cert::generate_ca("postern bench CA")?;
    let (cert_pem, key_pem) = cert::issue(
        &ca_pem,
        &ca_key_pem,
        Kind::Relay,
        "localhost",
        &["localhost".to_string()],
        &[loopback],
        1,
    )?;
    let identity = Identity {
        chain: tls::parse_certs_pem(cert_pem.as_bytes())?,
        key: tls::parse_key_pem(key_pem.as_bytes())?,
    };
    let transport = Transport::default();
    let server_config = tls::server_config(
        identity,
        &[ALPN_AGENT],
        None,
        Arc::new(transport.quinn(STREAMS)),
    )?;
    let any = SocketAddr::new(loopback, 0);
    let server = tls::bind_endpoint(any, Some(server_config), transport.udp_buffer)
        .context("binding the server endpoint")?;
    let server_addr = server.local_addr()?;
    let mut client = tls::bind_endpoint(any, None, transport.udp_buffer)
        .context("binding the client endpoint")?;
    client.set_default_client_config(tls::client_config(
        &Trust::Ca(tls::parse_certs_pem(ca_pem.as_bytes())?),
        ALPN_AGENT,
        None,
        Arc::new(transport.quinn(STREAMS)),
    )?);

    // The server sends until the client stops the stream; it hands back its connection for stats.
    let sender = {
        let server = server.clone();
        tokio::spawn(async move {
            let conn = server
                .accept()
                .await
                .context("server endpoint closed")?
                .await?;
            let (mut send, mut recv) = conn.accept_bi().await?;
            let mut go = [0u8; 1];
            recv.read_exact(&mut go).await?;
            let chunk = Bytes::from(vec![0u8; CHUNK]);
            while send.write_chunk(chunk.clone()).await.is_ok() {}
            Ok::<_, anyhow::Error>(conn)
        })
    };

    let conn = client
        .connect(server_addr, "localhost")?
        .await
        .context("QUIC handshake")?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(b"g").await?;
    let start = Instant::now();
    let warm_end = start + warmup;
    let end = warm_end + duration;
    let mut total = 0u64;
    let mut at_warm_end = None;
    loop {
        let now = Instant::now();
        if at_warm_end.is_none() && now >= warm_end {
            at_warm_end = Some(total);
        }
        if now >= end {
            break;
        }
        let deadline = if at_warm_end.is_none() { warm_end } else { end };
        match tokio::time::timeout_at(deadline, recv.read_chunk(usize::MAX, true)).await {
            Err(_) => continue,
            Ok(Ok(Some(chunk))) => total += chunk.bytes.len() as u64,
            Ok(Ok(None)) => anyhow::bail!("the sender finished early"),
            Ok(Err(err)) => return Err(err).context("reading the stream"),
        }
    }
    let bytes = total - at_warm_end.unwrap_or(total);
    let _ = recv.stop(0u32.into());
    let server_conn = tokio::time::timeout(Duration::from_secs(5), sender)
        .await
        .context("the sender did not stop")???;
    let sent = server_conn.stats().path;
    let mtu = conn.stats().path.current_mtu;
    conn.close(0u32.into(), b"done");
    client.close(0u32.into(), b"done");
    server.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(1), client.wait_idle()).await;
    Ok(QuicReport {
        test: "quic",
        duration_s: duration.as_secs_f64(),
        warmup_s: warmup.as_secs_f64(),
        bytes,
        gbit_per_s: bytes as f64 * 8.0 / duration.as_secs_f64() / 1e9,
        mtu,
        sent_packets: sent.sent_packets,
        lost_packets: sent.lost_packets,
        congestion_events: sent.congestion_events,
        rtt_us: sent.rtt.as_secs_f64() * 1e6,
    })
}
