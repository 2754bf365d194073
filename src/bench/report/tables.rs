//! The markdown tables `scripts/bench` prints from its collected results (`results.jsonl`):
//! postern's three paths side by side with their targets, the TCP tunnel transport beside QUIC,
//! and postern against the peers (rathole, microsocks) with its ratio to each.

use std::collections::BTreeMap;

use serde_json::Value;

/// How a row's ratios read: more is better (shown as a percentage), less is better (shown as a
/// factor), or no ratio at all.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
    None,
}

struct Row {
    label: &'static str,
    test: &'static str,
    /// The direct path's test when it differs (a proxy-only variant compared with plain TCP).
    direct_test: Option<&'static str>,
    value: fn(&Value) -> Option<f64>,
    better: Better,
    decimals: usize,
    target: &'static str,
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut v = v;
    for key in path {
        v = v.get(key)?;
    }
    v.as_f64()
}

/// Cores a load kept busy: the CPU time of every process on its path (the target included) and
/// of the client, over the load's wall time (`scripts/bench` adds `cpu` to each result).
fn cores_busy(v: &Value) -> Option<f64> {
    let wall = num(v, &["cpu", "wall_s"])?;
    let cpu = num(v, &["cpu", "processes_s"])? + num(v, &["cpu", "client_s"])?;
    (wall > 0.0).then_some(cpu / wall)
}

/// The CPU time of one unit of a load's work: `scale` CPU-seconds per `per` (a rate in the result).
fn cpu_per(v: &Value, per: &str, scale: f64) -> Option<f64> {
    let rate = num(v, &[per])?;
    (rate > 0.0).then_some(cores_busy(v)? * scale / rate)
}

/// CPU-seconds per GB moved (throughput loads).
fn cpu_s_per_gb(v: &Value) -> Option<f64> {
    cpu_per(v, "gbit_per_s", 8.0)
}

/// CPU microseconds per new connection (connection loads).
fn cpu_us_per_connection(v: &Value) -> Option<f64> {
    cpu_per(v, "connections_per_s", 1e6)
}

/// CPU microseconds per round trip (round-trip loads).
fn cpu_us_per_round_trip(v: &Value) -> Option<f64> {
    cpu_per(v, "round_trips_per_s", 1e6)
}

/// Rows measured on all three paths.
const PATH_ROWS: &[Row] = &[
    Row {
        label: "throughput, 1 connection (Gbit/s)",
        direct_test: None,
        test: "tput1",
        value: |v| num(v, &["gbit_per_s"]),
        better: Better::Higher,
        decimals: 2,
        target:
            "co-located ≥ 80% of the QUIC ceiling and ≥ 15% of direct; two-hop ≥ 70% of co-located",
    },
    Row {
        label: "throughput, 8 connections (Gbit/s)",
        direct_test: None,
        test: "tput8",
        value: |v| num(v, &["gbit_per_s"]),
        better: Better::Higher,
        decimals: 2,
        target: "≥ the 1-connection figure",
    },
    Row {
        label: "8 connections: fastest ÷ slowest connection",
        direct_test: None,
        test: "tput8",
        value: |v| {
            let min = num(v, &["per_connection_gbit_per_s", "min"])?;
            let max = num(v, &["per_connection_gbit_per_s", "max"])?;
            (min > 0.0).then(|| max / min)
        },
        better: Better::None,
        decimals: 2,
        target: "≤ 2",
    },
    Row {
        label: "new connections/s, sequential",
        direct_test: None,
        test: "connect1",
        value: |v| num(v, &["connections_per_s"]),
        better: Better::Higher,
        decimals: 0,
        target: "co-located ≥ 60% of direct; two-hop ≥ 70% of co-located",
    },
    Row {
        label: "new connections/s, sequential, HTTP CONNECT instead of SOCKS5",
        test: "connect1_http",
        direct_test: Some("connect1"),
        value: |v| num(v, &["connections_per_s"]),
        better: Better::Higher,
        decimals: 0,
        target: "",
    },
    Row {
        label: "new connections/s, 8 workers",
        direct_test: None,
        test: "connect8",
        value: |v| num(v, &["connections_per_s"]),
        better: Better::Higher,
        decimals: 0,
        target: "",
    },
    Row {
        label: "connect + 1-byte echo + close, p50 (µs), sequential",
        direct_test: None,
        test: "connect1",
        value: |v| num(v, &["latency", "p50_us"]),
        better: Better::Lower,
        decimals: 0,
        target: "",
    },
    Row {
        label: "connect + 1-byte echo + close, p99 (µs), sequential",
        direct_test: None,
        test: "connect1",
        value: |v| num(v, &["latency", "p99_us"]),
        better: Better::Lower,
        decimals: 0,
        target: "",
    },
    Row {
        label: "round trip p50 (µs)",
        direct_test: None,
        test: "rtt",
        value: |v| num(v, &["latency", "p50_us"]),
        better: Better::Lower,
        decimals: 1,
        target: "co-located ≤ 4× direct",
    },
    Row {
        label: "round trip p99 (µs)",
        direct_test: None,
        test: "rtt",
        value: |v| num(v, &["latency", "p99_us"]),
        better: Better::Lower,
        decimals: 1,
        target: "co-located ≤ 8× direct",
    },
    Row {
        label: "round trip p99.9 (µs)",
        direct_test: None,
        test: "rtt",
        value: |v| num(v, &["latency", "p999_us"]),
        better: Better::Lower,
        decimals: 1,
        target: "",
    },
    Row {
        label: "cores busy (every process on the path, the client too), throughput 1 connection",
        direct_test: None,
        test: "tput1",
        value: cores_busy,
        better: Better::None,
        decimals: 2,
        target: "the machine's cores are the ceiling",
    },
    Row {
        label: "CPU-seconds per GB moved (every process, the client too), 1 connection",
        direct_test: None,
        test: "tput1",
        value: cpu_s_per_gb,
        better: Better::Lower,
        decimals: 2,
        target: "",
    },
    Row {
        label: "CPU-seconds per GB moved (every process, the client too), 8 connections",
        direct_test: None,
        test: "tput8",
        value: cpu_s_per_gb,
        better: Better::Lower,
        decimals: 2,
        target: "",
    },
    Row {
        label: "CPU µs per new connection (every process, the client too), 8 workers",
        direct_test: None,
        test: "connect8",
        value: cpu_us_per_connection,
        better: Better::Lower,
        decimals: 0,
        target: "",
    },
    Row {
        label: "CPU µs per round trip (every process, the client too)",
        direct_test: None,
        test: "rtt",
        value: cpu_us_per_round_trip,
        better: Better::Lower,
        decimals: 0,
        target: "",
    },
    Row {
        label: "errors (all runs on this path)",
        direct_test: None,
        test: "*errors",
        value: |_| None,
        better: Better::None,
        decimals: 0,
        target: "0",
    },
];

const PATHS: [&str; 3] = ["direct", "colocated", "twohop"];

fn fmt_value(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "—".into(),
    }
}

fn fmt_ratio(num: Option<f64>, den: Option<f64>, better: Better) -> String {
    match (num, den, better) {
        (Some(n), Some(d), Better::Higher) if d > 0.0 => format!("{:.0}%", 100.0 * n / d),
        (Some(n), Some(d), Better::Lower) if d > 0.0 => format!("{:.2}×", n / d),
        _ => "—".into(),
    }
}

/// The median of the figures `value` finds in `runs` (the mean of the middle two for an even count).
fn median(runs: &[Value], value: fn(&Value) -> Option<f64>) -> Option<f64> {
    let mut figures: Vec<f64> = runs.iter().filter_map(value).collect();
    if figures.is_empty() {
        return None;
    }
    figures.sort_by(f64::total_cmp);
    let n = figures.len();
    Some(if n % 2 == 1 {
        figures[n / 2]
    } else {
        (figures[n / 2 - 1] + figures[n / 2]) / 2.0
    })
}

/// The JSON-lines results of `scripts/bench` by (path, test), every run of each in order.
fn parse_results(results: &str) -> anyhow::Result<BTreeMap<(String, String), Vec<Value>>> {
    let mut found: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for (i, line) in results.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("results line {}: {e}", i + 1))?;
        let (Some(path), Some(test)) = (record["path"].as_str(), record["test"].as_str()) else {
            anyhow::bail!("results line {}: needs \"path\" and \"test\"", i + 1);
        };
        found
            .entry((path.to_string(), test.to_string()))
            .or_default()
            .push(record["result"].clone());
    }
    Ok(found)
}

mod peers;
pub use peers::peers_table;

/// Renders the JSON-lines results of `scripts/bench` (`{"path", "test", "result"}` per line) as one
/// markdown table: a row per metric, a column per path, the ratios, and the target. A test
/// recorded several times (repeated runs) shows the median of its runs; errors are summed.
pub fn table(results: &str) -> anyhow::Result<String> {
    let found = parse_results(results)?;
    let runs = |path: &str, test: &str| -> &[Value] {
        found
            .get(&(path.to_string(), test.to_string()))
            .map_or(&[], Vec::as_slice)
    };
    let errors_on = |path: &str| -> Option<f64> {
        let mut total = 0.0;
        let mut any = false;
        for ((p, _), results) in &found {
            if p == path {
                for n in results.iter().filter_map(|v| num(v, &["errors", "total"])) {
                    total += n;
                    any = true;
                }
            }
        }
        any.then_some(total)
    };

    let mut out = String::new();
    out.push_str("| metric | direct | co-located | two-hop | co-located ÷ direct | two-hop ÷ direct | two-hop ÷ co-located | target |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---|\n");
    for row in PATH_ROWS {
        let values: Vec<Option<f64>> = PATHS
            .iter()
            .map(|p| {
                let test = match row.direct_test {
                    Some(t) if *p == "direct" => t,
                    _ => row.test,
                };
                if test == "*errors" {
                    errors_on(p)
                } else {
                    median(runs(p, test), row.value)
                }
            })
            .collect();
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.label,
            fmt_value(values[0], row.decimals),
            fmt_value(values[1], row.decimals),
            fmt_value(values[2], row.decimals),
            fmt_ratio(values[1], values[0], row.better),
            fmt_ratio(values[2], values[0], row.better),
            fmt_ratio(values[2], values[1], row.better),
            row.target,
        ));
    }

    // The QUIC ceiling: postern-free like the direct column, so it sits there.
    let gbit = |v: &Value| num(v, &["gbit_per_s"]);
    let ceiling = median(runs("quic", "quic"), gbit);
    out.push_str(&format!(
        "| `bench quic`: one QUIC connection, one stream, no postern (Gbit/s) | {} | — | — | — | — | — | the ceiling for one tunnel |\n",
        fmt_value(ceiling, 2)
    ));
    let share = |path: &str| {
        let t = median(runs(path, "tput1"), gbit)?;
        let c = ceiling?;
        (c > 0.0).then(|| 100.0 * t / c)
    };
    out.push_str(&format!(
        "| throughput, 1 connection ÷ QUIC ceiling (%) | — | {} | {} | — | — | — | co-located ≥ 80% |\n",
        fmt_value(share("colocated"), 0),
        fmt_value(share("twohop"), 0)
    ));

    // A plain SOCKS5 proxy with no tunnel (`bench socks5`): postern-free like the direct column.
    // It shows what SOCKS5's own round trips leave of direct, and how much of that the tunnel keeps.
    let rate = |v: &Value| num(v, &["connections_per_s"]);
    let plain = median(runs("socks5", "connect1"), rate);
    let direct = median(runs("direct", "connect1"), rate);
    let pct = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(100.0 * a / b),
        _ => None,
    };
    out.push_str(&format!(
        "| `bench socks5`: a SOCKS5 proxy with no tunnel, new connections/s, sequential | {} | — | — | — | — | — | {}% of direct: what SOCKS5 itself leaves |\n",
        fmt_value(plain, 0),
        fmt_value(pct(plain, direct), 0)
    ));
    out.push_str(&format!(
        "| new connections/s, sequential ÷ `bench socks5` (%) | — | {} | {} | — | — | — | what the tunnel keeps of plain SOCKS5 |\n",
        fmt_value(pct(median(runs("colocated", "connect1"), rate), plain), 0),
        fmt_value(pct(median(runs("twohop", "connect1"), rate), plain), 0)
    ));

    // The swarm ran against a standalone relay with etcd and a gateway: the two-hop setup.
    let swarm = runs("swarm", "swarm").last();
    let rss = runs("swarm", "relay_rss").last();
    let agents = swarm.and_then(|v| num(v, &["agents"])).unwrap_or(0.0);
    let swarm_row = |label: String, value: Option<f64>, decimals: usize, target: &str| {
        format!(
            "| {label} | — | — | {} | — | — | — | {target} |\n",
            fmt_value(value, decimals)
        )
    };
    out.push_str(&swarm_row(
        format!("swarm: relay memory per idle tunnel, {agents:.0} tunnels (KiB)"),
        rss.and_then(|v| num(v, &["per_tunnel_kib"])),
        1,
        "≤ 40 KiB",
    ));
    if let Some(held) = runs("swarm", "relay_rss_held").last() {
        out.push_str(&swarm_row(
            format!(
                "swarm: relay memory per idle tunnel, the tunnels held {:.0} s more (KiB)",
                num(held, &["held_s"]).unwrap_or(0.0)
            ),
            num(held, &["per_tunnel_kib"]),
            1,
            "≤ 40 KiB",
        ));
    }
    out.push_str(&swarm_row(
        format!("swarm: time until {agents:.0} agents welcomed (s)"),
        swarm.and_then(|v| num(v, &["welcome_all_s"])),
        2,
        "",
    ));
    out.push_str(&swarm_row(
        "swarm: registrations (Welcomes) per second".into(),
        swarm.and_then(|v| num(v, &["welcomes_per_s"])),
        0,
        "",
    ));
    out.push_str(&swarm_row(
        format!("swarm: time until etcd holds {agents:.0} routes (s)"),
        swarm.and_then(|v| num(v, &["etcd_routes_s"])),
        2,
        "",
    ));
    let probes = swarm.and_then(|v| num(v, &["probe_count"])).unwrap_or(0.0);
    out.push_str(&swarm_row(
        format!("swarm: time until {probes:.0} sampled agents answer through the gateway (s)"),
        swarm.and_then(|v| num(v, &["probe_all_s"])),
        2,
        "all routable ≤ 20 s",
    ));
    out.push_str(&swarm_row(
        "swarm: failed registrations".into(),
        swarm.and_then(|v| num(v, &["failed"])),
        0,
        "0",
    ));
    out.push_str(&transport_rows(&runs));
    Ok(out)
}

/// The co-located path over the TCP tunnel transport (`colocated-tcp`: the agent dials with
/// `tunnel = "tcp"`) beside the same path over QUIC, when the results have it: one row per path
/// metric, both transports in the co-located column's place.
fn transport_rows<'a>(runs: &impl Fn(&str, &str) -> &'a [Value]) -> String {
    let mut out = String::new();
    for row in PATH_ROWS.iter().filter(|r| r.test != "*errors") {
        let tcp = median(runs("colocated-tcp", row.test), row.value);
        if tcp.is_none() {
            continue;
        }
        let quic = median(runs("colocated", row.test), row.value);
        let target = match row.test {
            _ if row.better != Better::Higher => "",
            "tput1" => "≥ co-located over QUIC",
            "tput8" => "> its 1-connection figure",
            _ => "",
        };
        out.push_str(&format!(
            "| TCP tunnel transport: {} | — | {} | — | {} of co-located over QUIC ({}) | — | — | {target} |\n",
            row.label,
            fmt_value(tcp, row.decimals),
            fmt_ratio(tcp, quic, row.better),
            fmt_value(quic, row.decimals),
        ));
    }
    out
}
