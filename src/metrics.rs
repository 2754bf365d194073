//! Process metrics in Prometheus form (prometheus-client). One set per process, reachable from
//! every module through [`metrics()`]; names use base units and `_total` counters, and labels never
//! carry per-IP or per-agent values (their cardinality would be unbounded).

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrontResult {
    /// `socks5` or `http`.
    pub front: &'static str,
    /// `ok` or a result code (`no_route`, `not_allowed`, …).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    /// `up` (client → service) or `down`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Operation {
    pub operation: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildInfo {
    pub version: &'static str,
}

/// Every metric postern exports.
pub struct Metrics {
    pub client_connections: Family<FrontResult, Counter>,
    pub client_bytes: Family<Direction, Counter>,
    pub active_client_connections: Gauge,
    pub relay_streams_active: Gauge,
    pub relay_tunnels: Gauge,
    pub relay_tunnels_refused: Counter,
    pub agent_tunnels: Gauge,
    pub routes_cached: Gauge,
    pub open_attempts: Family<Outcome, Counter>,
    pub registry_operations: Family<Operation, Counter>,
    pub lease_held: Gauge,
    pub handshake_seconds: Histogram,
    pub connect_seconds: Histogram,
    registry: Registry,
}

impl Metrics {
    fn new() -> Self {
        let m = Metrics {
            client_connections: Family::default(),
            client_bytes: Family::default(),
            active_client_connections: Gauge::default(),
            relay_streams_active: Gauge::default(),
            relay_tunnels: Gauge::default(),
            relay_tunnels_refused: Counter::default(),
            agent_tunnels: Gauge::default(),
            routes_cached: Gauge::default(),
            open_attempts: Family::default(),
            registry_operations: Family::default(),
            lease_held: Gauge::default(),
            handshake_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            connect_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            registry: Registry::with_prefix("postern"),
        };
        let mut r = Registry::with_prefix("postern");
        r.register(
            "gateway_connections",
            "Client connections by front door and result",
            m.client_connections.clone(),
        );
        r.register(
            "gateway_bytes",
            "Bytes carried for clients, by direction",
            m.client_bytes.clone(),
        );
        r.register(
            "gateway_active_connections",
            "Client connections currently open",
            m.active_client_connections.clone(),
        );
        r.register(
            "relay_active_streams",
            "Streams the relay currently carries",
            m.relay_streams_active.clone(),
        );
        r.register(
            "relay_tunnels",
            "Agent tunnels the relay holds",
            m.relay_tunnels.clone(),
        );
        r.register(
            "relay_tunnels_refused",
            "New tunnels refused because the relay holds relay.max_tunnels",
            m.relay_tunnels_refused.clone(),
        );
        r.register(
            "agent_tunnels",
            "Tunnels the agent holds",
            m.agent_tunnels.clone(),
        );
        r.register(
            "routes_cached",
            "Routes in this process's registry cache",
            m.routes_cached.clone(),
        );
        r.register(
            "open_attempts",
            "Attempts to open a stream through one owner of a route, by result",
            m.open_attempts.clone(),
        );
        r.register(
            "registry_operations",
            "Registry operations by kind and result",
            m.registry_operations.clone(),
        );
        r.register(
            "relay_lease_held",
            "1 while the relay holds its registry lease",
            m.lease_held.clone(),
        );
        r.register(
            "agent_handshake_duration_seconds",
            "Time for an agent to dial a relay and be welcomed",
            m.handshake_seconds.clone(),
        );
        r.register(
            "gateway_connect_duration_seconds",
            "Time from a client's request to an open tunnel stream",
            m.connect_seconds.clone(),
        );
        let info = Family::<BuildInfo, Gauge>::default();
        info.get_or_create(&BuildInfo {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
        r.register("build_info", "Build information", info);
        Metrics { registry: r, ..m }
    }

    /// The Prometheus text exposition (format 0.0.4, what `/metrics` serves as `text/plain`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        openmetrics_to_prometheus(&out)
    }
}

/// Rewrites prometheus-client's OpenMetrics text into the Prometheus text format 0.0.4.
///
/// The two differ in ways Prometheus's own parser and `promtool check metrics` notice: an
/// OpenMetrics counter family is named without `_total` in `# HELP` / `# TYPE` while its samples
/// carry the suffix (the text format wants the sample name there), and OpenMetrics adds `# UNIT`
/// lines, `# EOF` and the `info` / `unknown` types the text format does not have.
fn openmetrics_to_prometheus(openmetrics: &str) -> String {
    // Families whose `# TYPE` is counter: their metadata lines take the `_total` name.
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .filter(|(_, kind)| *kind == "counter")
        .map(|(name, _)| name)
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) && !name.ends_with("_total") {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                let tail = match (prefix, tail) {
                    ("# TYPE ", "info") => "gauge",
                    ("# TYPE ", "unknown") => "untyped",
                    _ => tail,
                };
                out.push_str(prefix);
                out.push_str(&name);
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// The label value for a result code.
pub fn code_label(code: crate::protocol::Code) -> &'static str {
    use crate::protocol::Code;
    match code {
        Code::Ok => "ok",
        Code::NotMine => "not_mine",
        Code::NotAllowed => "not_allowed",
        Code::NoRoute => "no_route",
        Code::NoSuchSession => "no_such_session",
        Code::ConnectionRefused => "connection_refused",
        Code::Unreachable => "unreachable",
        Code::Timeout => "timeout",
        Code::Unauthorized => "unauthorized",
        Code::Draining => "draining",
        Code::BadRequest => "bad_request",
        Code::Internal => "internal",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exposition_names_every_family() {
        let m = super::metrics();
        // A labelled family shows only once it has a child (prometheus-client skips empty ones).
        m.client_connections
            .get_or_create(&super::FrontResult {
                front: "socks5",
                result: "ok",
            })
            .inc_by(0);
        let text = m.encode();
        for name in [
            "postern_gateway_connections",
            "postern_relay_tunnels",
            "postern_build_info",
            "postern_gateway_connect_duration_seconds",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn counters_are_named_with_total_and_no_openmetrics_markers_remain() {
        let m = super::metrics();
        m.open_attempts
            .get_or_create(&super::Outcome { result: "ok" })
            .inc();
        let text = m.encode();
        assert!(
            text.contains("# HELP postern_open_attempts_total "),
            "{text}"
        );
        assert!(
            text.contains("# TYPE postern_open_attempts_total counter"),
            "{text}"
        );
        assert!(
            text.contains("postern_open_attempts_total{result=\"ok\"}"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE postern_relay_tunnels gauge"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains("# UNIT"), "{text}");
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn openmetrics_types_map_to_text_format_types() {
        let om = "# HELP a_info Build.\n# TYPE a_info info\na_info{v=\"1\"} 1\n\
                  # HELP b_seconds B.\n# TYPE b_seconds counter\n# UNIT b_seconds seconds\n\
                  b_seconds_total 2\n# EOF\n";
        assert_eq!(
            super::openmetrics_to_prometheus(om),
            "# HELP a_info Build.\n# TYPE a_info gauge\na_info{v=\"1\"} 1\n\
             # HELP b_seconds_total B.\n# TYPE b_seconds_total counter\nb_seconds_total 2\n"
        );
    }
}
