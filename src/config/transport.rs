//! QUIC transport knobs shared by every role (`[transport]`, `[relay.transport]`, `[peer.transport]`).

use super::*;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportFile {
    pub idle_timeout: Option<HumanDuration>,
    pub keep_alive: Option<HumanDuration>,
    pub stream_window: Option<ByteSize>,
    pub connection_window: Option<ByteSize>,
    pub send_window: Option<ByteSize>,
    pub udp_buffer: Option<ByteSize>,
    pub stream_stall_timeout: Option<HumanDuration>,
    pub stream_idle_timeout: Option<HumanDuration>,
    pub tcp_keepalive: Option<HumanDuration>,
}

/// QUIC transport settings. quinn's connection receive window is unbounded by default; ours never is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transport {
    pub idle_timeout: Duration,
    pub keep_alive: Duration,
    pub stream_window: u64,
    pub connection_window: u64,
    pub send_window: u64,
    pub udp_buffer: usize,
    /// A proxied connection whose writer has not moved a byte for this long while data waits
    /// (a client that stopped reading) is reset, so it cannot pin flow-control credit its
    /// connection's other streams need.
    pub stream_stall_timeout: Duration,
    /// A proxied connection that moved no byte either way for this long is reset.
    pub stream_idle_timeout: Duration,
    /// TCP keep-alive idle time on every spliced TCP connection; probes follow every sixth of it,
    /// so a vanished peer is noticed after about 2.5 times this on Linux (9 probes).
    pub tcp_keepalive: Duration,
}

impl Default for Transport {
    fn default() -> Self {
        Transport {
            // Liveness both ways: the agent sends a QUIC keep-alive every second of silence and the
            // relay acknowledges it (relay::agent_side), and whichever stops hearing the other for
            // 4 s closes the tunnel (a stopped agent or relay, a cut path), so its routes go within
            // seconds, not at a 30 s timeout.
            idle_timeout: Duration::from_secs(4),
            keep_alive: Duration::from_secs(1),
            // 32 streams' worth: one client's stalled downloads (each pins at most a stream
            // window until `stream_stall_timeout` resets it) leave the rest of the window free.
            stream_window: 1024 * 1024,
            connection_window: 32 * 1024 * 1024,
            send_window: 16 * 1024 * 1024,
            udp_buffer: 4 * 1024 * 1024,
            stream_stall_timeout: Duration::from_secs(15),
            stream_idle_timeout: Duration::from_secs(3600),
            tcp_keepalive: Duration::from_secs(60),
        }
    }
}

impl Transport {
    pub(super) fn from_file(f: TransportFile, key: &str) -> Result<Self, Error> {
        let d = Transport::default();
        let t = Transport {
            idle_timeout: f.idle_timeout.map_or(d.idle_timeout, |v| v.0),
            keep_alive: f.keep_alive.map_or(d.keep_alive, |v| v.0),
            stream_window: f.stream_window.map_or(d.stream_window, |v| v.as_u64()),
            connection_window: f
                .connection_window
                .map_or(d.connection_window, |v| v.as_u64()),
            send_window: f.send_window.map_or(d.send_window, |v| v.as_u64()),
            udp_buffer: f.udp_buffer.map_or(d.udp_buffer, |v| v.as_u64() as usize),
            stream_stall_timeout: f
                .stream_stall_timeout
                .map_or(d.stream_stall_timeout, |v| v.0),
            stream_idle_timeout: f.stream_idle_timeout.map_or(d.stream_idle_timeout, |v| v.0),
            tcp_keepalive: f.tcp_keepalive.map_or(d.tcp_keepalive, |v| v.0),
        };
        for (name, value) in [
            ("stream_stall_timeout", t.stream_stall_timeout),
            ("stream_idle_timeout", t.stream_idle_timeout),
            ("tcp_keepalive", t.tcp_keepalive),
        ] {
            if value < Duration::from_secs(1) {
                return Err(invalid(&format!("{key}.{name}"), "must be at least 1s"));
            }
        }
        // Zero is no way to turn keep-alives off: an agent's liveness checks tick at this period.
        if t.keep_alive.is_zero() {
            return Err(invalid(
                &format!("{key}.keep_alive"),
                "must be greater than 0",
            ));
        }
        if t.keep_alive >= t.idle_timeout {
            return Err(invalid(
                &format!("{key}.keep_alive"),
                "must be shorter than idle_timeout",
            ));
        }
        if t.stream_window < 16 * 1024 || t.connection_window < t.stream_window {
            return Err(invalid(
                &format!("{key}.connection_window"),
                "stream_window must be at least 16KiB and connection_window at least stream_window",
            ));
        }
        Ok(t)
    }

    /// The quinn transport config for these settings. `max_bidi` is how many streams the *remote*
    /// side may open concurrently (quinn reserves state for each up front).
    pub fn quinn(&self, max_bidi: u32) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        let window = |v: u64| quinn::VarInt::from_u64(v).unwrap_or(quinn::VarInt::MAX);
        t.max_concurrent_bidi_streams(max_bidi.into())
            .max_concurrent_uni_streams(0u32.into())
            .stream_receive_window(window(self.stream_window))
            .receive_window(window(self.connection_window))
            .send_window(self.send_window)
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(quinn::IdleTimeout::try_from(self.idle_timeout).ok());
        t
    }

    /// The deadlines and socket options of the splices this transport's streams ride on.
    pub fn splice_limits(&self) -> crate::splice::Limits {
        crate::splice::Limits {
            stall_timeout: self.stream_stall_timeout,
            idle_timeout: self.stream_idle_timeout,
            tcp_keepalive: self.tcp_keepalive,
            // A client's stalled streams may pin at most half of a connection's window.
            stalled_per_client: ((self.connection_window / self.stream_window / 2) as usize).max(1),
        }
    }
}
