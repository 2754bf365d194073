//! Process metrics in Prometheus form (prometheus-client). One set per process, reachable from
//! every module through [`metrics()`]; names use base units and `_total` counters, and labels never
//! carry per-IP or per-agent values (their cardinality would be unbounded).
//!
//! Every role updates the same [`Metrics`], but `/metrics` shows only the families of the roles
//! this process runs, chosen once at start-up with [`init`] (as node_exporter shows only its enabled
//! collectors): an agent exports no `postern_relay_lease_held 0` and a gateway no
//! `postern_agent_tunnels 0`, so alert rules on those gauges never page for a process that is not
//! that role. The families of a role are listed in one place each (`register_agent`,
//! `register_relay`, `register_gateway`, `register_common`); a new metric goes into its role's list.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The transport label of tunnel gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// `quic` or `tcp`.
    pub transport: &'static str,
}

/// A tunnel gauge family with both transports' series present from the start.
fn by_transport() -> Family<TransportLabel, Gauge> {
    let family = Family::<TransportLabel, Gauge>::default();
    for transport in ["quic", "tcp"] {
        let _ = family.get_or_create(&TransportLabel { transport });
    }
    family
}

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
pub struct Reason {
    /// Stream resets: `stalled` (a writer moved nothing while data waited), `stall_limit` (it
    /// stalled while its client already had its share of stalled streams) or `idle`.
    pub reason: &'static str,
}

/// A connection a relay refused before its handshake.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Refusal {
    /// The relay's port it came to: `agent` (`relay.listen`, tunnels) or `peer`
    /// (`relay.peer_listen`, gateways).
    pub endpoint: &'static str,
    /// The limit it met: `per_source` or `total`.
    pub reason: &'static str,
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

/// The roles whose metrics a process exports: a set of agent, relay and gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles(u8);

impl Roles {
    pub const AGENT: Roles = Roles(1);
    pub const RELAY: Roles = Roles(2);
    pub const GATEWAY: Roles = Roles(4);
    /// `postern server`: a relay and a gateway.
    pub const SERVER: Roles = Roles(2 | 4);
    /// Every role (`postern demo`, and a process that never called [`init`]).
    pub const ALL: Roles = Roles(1 | 2 | 4);

    pub fn contains(self, other: Roles) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn intersects(self, other: Roles) -> bool {
        self.0 & other.0 != 0
    }

    pub fn union(self, other: Roles) -> Roles {
        Roles(self.0 | other.0)
    }
}

/// The roles [`init`] announced; 0 until it is called.
static ROLES: AtomicU8 = AtomicU8::new(0);

/// Chooses which families `/metrics` shows: those of `roles` and the common ones. Called once at
/// start-up, before the role runs. A process that runs several roles in one (tests composing
/// roles, `demo`) may call it once per role: the sets add up, so no family a role in this process
/// updates is ever hidden. Until the first call every family is shown.
pub fn init(roles: Roles) {
    ROLES.fetch_or(roles.0, Ordering::Relaxed);
}

/// The roles this process exports metrics for.
pub fn roles() -> Roles {
    match ROLES.load(Ordering::Relaxed) {
        0 => Roles::ALL,
        bits => Roles(bits),
    }
}

/// Every metric postern exports.
pub struct Metrics {
    pub client_connections: Family<FrontResult, Counter>,
    pub client_bytes: Family<Direction, Counter>,
    pub active_client_connections: Gauge,
    pub relay_streams_active: Gauge,
    pub relay_tunnels: Gauge,
    pub relay_tunnels_refused: Counter,
    /// Connections refused before their handshake at the unadmitted-connection limits, by limit
    /// (`per_source` or `total`).
    pub relay_handshakes_refused: Family<Refusal, Counter>,
    pub agent_tunnels: Gauge,
    /// Tunnels held, by what carries them (`quic` or `tcp`): the relay's, or the agent's.
    pub relay_tunnels_by_transport: Family<TransportLabel, Gauge>,
    pub agent_tunnels_by_transport: Family<TransportLabel, Gauge>,
    pub routes_cached: Gauge,
    /// Seconds since the registry last confirmed the gateway's route view.
    pub registry_view_age: Gauge<f64, AtomicU64>,
    pub open_attempts: Family<Outcome, Counter>,
    /// Open attempts by what they ended as: `ok` or a failover cause (`timeout`,
    /// `peer_unreachable`, `tunnel_closed`, `stale`, `refused`, `protocol`).
    pub gateway_open_attempts: Family<Outcome, Counter>,
    /// Proxied streams a splice reset because a limit expired.
    pub stream_resets: Family<Reason, Counter>,
    pub registry_operations: Family<Operation, Counter>,
    pub lease_held: Gauge,
    pub handshake_seconds: Histogram,
    pub connect_seconds: Histogram,
    /// 1 when the last configuration load (start or SIGHUP) succeeded, 0 when it was refused.
    pub config_reload_successful: Gauge,
    /// When the configuration last loaded successfully, in seconds since the Unix epoch.
    pub config_reload_success_timestamp: Gauge<f64, AtomicU64>,
    build_info: Family<BuildInfo, Gauge>,
}

impl Metrics {
    fn new() -> Self {
        let build_info = Family::<BuildInfo, Gauge>::default();
        build_info
            .get_or_create(&BuildInfo {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        let stream_resets = Family::<Reason, Counter>::default();
        // Both series exist from the start, so a rate over them never starts from nothing.
        for reason in ["stalled", "stall_limit", "idle"] {
            let _ = stream_resets.get_or_create(&Reason { reason });
        }
        let relay_handshakes_refused = Family::<Refusal, Counter>::default();
        for endpoint in ["agent", "peer"] {
            for reason in ["per_source", "total"] {
                let _ = relay_handshakes_refused.get_or_create(&Refusal { endpoint, reason });
            }
        }
        Metrics {
            relay_handshakes_refused,
            client_connections: Family::default(),
            client_bytes: Family::default(),
            active_client_connections: Gauge::default(),
            relay_streams_active: Gauge::default(),
            relay_tunnels: Gauge::default(),
            relay_tunnels_refused: Counter::default(),
            agent_tunnels: Gauge::default(),
            relay_tunnels_by_transport: by_transport(),
            agent_tunnels_by_transport: by_transport(),
            routes_cached: Gauge::default(),
            registry_view_age: Gauge::default(),
            open_attempts: Family::default(),
            gateway_open_attempts: Family::default(),
            stream_resets,
            registry_operations: Family::default(),
            lease_held: Gauge::default(),
            handshake_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            connect_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            config_reload_successful: Gauge::default(),
            config_reload_success_timestamp: Gauge::default(),
            build_info,
        }
    }

    /// The relay's tunnel gauge for `transport` (`quic` or `tcp`).
    pub fn tunnels_by_transport(&self, transport: &'static str) -> Gauge {
        self.relay_tunnels_by_transport
            .get_or_create(&TransportLabel { transport })
            .clone()
    }

    /// The agent's tunnel gauge for `transport` (`quic` or `tcp`).
    pub fn agent_tunnels_by_transport(&self, transport: &'static str) -> Gauge {
        self.agent_tunnels_by_transport
            .get_or_create(&TransportLabel { transport })
            .clone()
    }

    /// Records the outcome of loading the configuration (at start, or on SIGHUP), as Prometheus
    /// itself reports its own reloads.
    pub fn record_config_load(&self, ok: bool) {
        self.config_reload_successful.set(i64::from(ok));
        if ok {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.config_reload_success_timestamp.set(now);
        }
    }

    /// Families every process exports, whatever its role.
    fn register_common(&self, r: &mut Registry) {
        r.register("build_info", "Build information", self.build_info.clone());
        r.register(
            "config_last_reload_successful",
            "1 when the last configuration load (start or SIGHUP) succeeded, 0 when it was refused",
            self.config_reload_successful.clone(),
        );
        r.register(
            "config_last_reload_success_timestamp_seconds",
            "When the configuration last loaded successfully, in seconds since the Unix epoch",
            self.config_reload_success_timestamp.clone(),
        );
        r.register(
            "stream_resets",
            "Proxied streams reset because their writer stalled or they sat idle, by reason",
            self.stream_resets.clone(),
        );
    }

    fn register_agent(&self, r: &mut Registry) {
        r.register(
            "agent_tunnels",
            "Tunnels the agent holds",
            self.agent_tunnels.clone(),
        );
        r.register(
            "agent_tunnels_by_transport",
            "Tunnels the agent holds, by transport (quic, or tcp: QUIC carried over TCP + TLS)",
            self.agent_tunnels_by_transport.clone(),
        );
        r.register(
            "agent_handshake_duration_seconds",
            "Time for an agent to dial a relay and be welcomed",
            self.handshake_seconds.clone(),
        );
    }

    fn register_relay(&self, r: &mut Registry) {
        r.register(
            "relay_active_streams",
            "Streams the relay currently carries",
            self.relay_streams_active.clone(),
        );
        r.register(
            "relay_tunnels",
            "Agent tunnels the relay holds",
            self.relay_tunnels.clone(),
        );
        r.register(
            "relay_tunnels_by_transport",
            "Agent tunnels the relay holds, by transport (quic, or tcp: QUIC carried over TCP + TLS)",
            self.relay_tunnels_by_transport.clone(),
        );
        r.register(
            "relay_tunnels_refused",
            "New tunnels refused because the relay holds relay.max_tunnels",
            self.relay_tunnels_refused.clone(),
        );
        r.register(
            "relay_handshakes_refused",
            "New connections refused before their handshake because too many are not yet admitted \
             (relay.max_pending_per_source, relay.max_pending), by the port they came to and the limit",
            self.relay_handshakes_refused.clone(),
        );
        r.register(
            "relay_lease_held",
            "1 while the relay holds its registry lease",
            self.lease_held.clone(),
        );
    }

    fn register_gateway(&self, r: &mut Registry) {
        r.register(
            "gateway_connections",
            "Client connections by front door and result",
            self.client_connections.clone(),
        );
        r.register(
            "gateway_bytes",
            "Bytes carried for clients, by direction",
            self.client_bytes.clone(),
        );
        r.register(
            "gateway_active_connections",
            "Client connections currently open",
            self.active_client_connections.clone(),
        );
        r.register(
            "gateway_connect_duration_seconds",
            "Time from a client's request to an open tunnel stream",
            self.connect_seconds.clone(),
        );
        r.register(
            "routes_cached",
            "Routes in this process's registry cache",
            self.routes_cached.clone(),
        );
        r.register(
            "registry_view_age_seconds",
            "Seconds since the registry last confirmed this process's route view (changes or progress notifications)",
            self.registry_view_age.clone(),
        );
        r.register(
            "open_attempts",
            "Attempts to open a stream through one owner of a route, by result",
            self.open_attempts.clone(),
        );
        r.register(
            "gateway_open_attempts",
            "Attempts to open a stream through one owner of a route, by what they ended as: ok or the failover cause",
            self.gateway_open_attempts.clone(),
        );
    }

    /// Families of the relay and the gateway both (each talks to the registry).
    fn register_registry(&self, r: &mut Registry) {
        r.register(
            "registry_operations",
            "Registry operations by kind and result",
            self.registry_operations.clone(),
        );
    }

    /// A registry holding the families `roles` export (the handles are shared, not copied).
    fn registry_for(&self, roles: Roles) -> Registry {
        let mut r = Registry::with_prefix("postern");
        self.register_common(&mut r);
        if roles.contains(Roles::AGENT) {
            self.register_agent(&mut r);
        }
        if roles.contains(Roles::RELAY) {
            self.register_relay(&mut r);
        }
        if roles.contains(Roles::GATEWAY) {
            self.register_gateway(&mut r);
        }
        if roles.intersects(Roles::SERVER) {
            self.register_registry(&mut r);
        }
        r
    }

    /// The Prometheus text exposition (format 0.0.4, what `/metrics` serves as `text/plain`) of
    /// this process's roles (see [`init`]) and its `process_*` figures.
    pub fn encode(&self) -> String {
        self.encode_for(roles())
    }

    /// The exposition `roles` would export.
    pub fn encode_for(&self, roles: Roles) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry_for(roles));
        let mut text = openmetrics_to_prometheus(&out);
        ProcessStats::read().encode(&mut text);
        text
    }
}

/// What the kernel says about this process, read from `/proc/self` at scrape time: the standard
/// `process_*` metrics of Prometheus client libraries. A figure the system does not provide (not
/// Linux, `/proc` not mounted) is left out of the exposition.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub virtual_memory_bytes: Option<u64>,
    pub resident_memory_bytes: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

/// Clock ticks per second in `/proc/*/stat` (the kernel's USER_HZ). It is 100 on every
/// architecture postern builds for; Prometheus's own procfs reader assumes the same.
const USER_HZ: f64 = 100.0;

impl ProcessStats {
    pub fn read() -> ProcessStats {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        // Fields after the command name, which is in parentheses and may contain spaces:
        // index 0 is field 3 (state) of proc(5).
        let fields: Vec<&str> = stat
            .as_deref()
            .and_then(|s| s.rsplit_once(')'))
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
        let cpu_seconds = field(14)
            .zip(field(15))
            .map(|(user, system)| (user + system) / USER_HZ);
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        let start_time_seconds = boot_time
            .zip(field(22))
            .map(|(boot, ticks)| boot + ticks / USER_HZ);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |key: &str| -> Option<u64> {
            let rest = status.lines().find_map(|l| l.strip_prefix(key))?;
            let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
            Some(kib * 1024)
        };
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.count() as u64);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Max open files"))
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|soft| soft.parse().ok())
            });
        ProcessStats {
            cpu_seconds,
            open_fds,
            max_fds,
            virtual_memory_bytes: kib("VmSize:"),
            resident_memory_bytes: kib("VmRSS:"),
            start_time_seconds,
        }
    }

    /// Appends the figures in the text format, with the help texts Prometheus's clients use.
    fn encode(&self, out: &mut String) {
        let mut family = |name: &str, kind: &str, help: &str, value: Option<String>| {
            if let Some(value) = value {
                // Writing into a String cannot fail.
                let _ = write!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
                );
            }
        };
        family(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            self.cpu_seconds.map(|v| v.to_string()),
        );
        family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            self.open_fds.map(|v| v.to_string()),
        );
        family(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            self.max_fds.map(|v| v.to_string()),
        );
        family(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            self.virtual_memory_bytes.map(|v| v.to_string()),
        );
        family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            self.resident_memory_bytes.map(|v| v.to_string()),
        );
        family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            self.start_time_seconds.map(|v| v.to_string()),
        );
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
mod tests;
