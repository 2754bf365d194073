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

/// A column of the table against the peers.
struct PeerColumn {
    label: &'static str,
    test: &'static str,
    value: fn(&Value) -> Option<f64>,
    better: Better,
    decimals: usize,
}

const PEER_COLUMNS: &[PeerColumn] = &[
    PeerColumn {
        label: "1 conn Gbit/s",
        test: "tput1",
        value: |v| num(v, &["gbit_per_s"]),
        better: Better::Higher,
        decimals: 2,
    },
    PeerColumn {
        label: "8 conn Gbit/s",
        test: "tput8",
        value: |v| num(v, &["gbit_per_s"]),
        better: Better::Higher,
        decimals: 2,
    },
    PeerColumn {
        label: "conn/s sequential",
        test: "connect1",
        value: |v| num(v, &["connections_per_s"]),
        better: Better::Higher,
        decimals: 0,
    },
    PeerColumn {
        label: "conn/s, 8 workers",
        test: "connect8",
        value: |v| num(v, &["connections_per_s"]),
        better: Better::Higher,
        decimals: 0,
    },
    PeerColumn {
        label: "round trip p50 µs",
        test: "rtt",
        value: |v| num(v, &["latency", "p50_us"]),
        better: Better::Lower,
        decimals: 1,
    },
    PeerColumn {
        label: "round trip p99 µs",
        test: "rtt",
        value: |v| num(v, &["latency", "p99_us"]),
        better: Better::Lower,
        decimals: 1,
    },
];

/// The rows of the table against the peers: (path in the results, label). The first three are
/// the machine itself and postern; the rest are the peers postern is compared with.
const PEER_ROWS: &[(&str, &str)] = &[
    ("direct", "direct TCP (no proxy)"),
    ("colocated", "**postern** server + agent"),
    ("twohop", "**postern** gateway → relay → agent"),
    ("rathole-tcp", "rathole, TCP transport (no encryption)"),
    ("rathole-noise", "rathole, Noise transport"),
    ("rathole-tls", "rathole, TLS transport"),
    ("microsocks", "microsocks (SOCKS5, no tunnel)"),
];

/// postern's figure against a peer's: the ratio, and whether postern leads or trails there.
fn versus(ours: Option<f64>, theirs: Option<f64>, better: Better) -> String {
    match (ours, theirs) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => {
            let ratio = a / b;
            let ahead = match better {
                Better::Lower => a < b,
                _ => a > b,
            };
            let word = if a == b {
                "even"
            } else if ahead {
                "leads"
            } else {
                "trails"
            };
            format!("{ratio:.2}× {word}")
        }
        _ => "—".into(),
    }
}

/// Renders the results of `scripts/bench` against the peers (rathole over TCP, Noise and TLS,
/// microsocks): a row per path with the medians of its runs, a line per peer with postern's
/// co-located figure divided by the peer's, and issue 15's targets with what was measured. A peer
/// with no runs shows dashes: nothing is made up for it.
pub fn peers_table(results: &str) -> anyhow::Result<String> {
    let found = parse_results(results)?;
    let figure = |path: &str, column: &PeerColumn| -> Option<f64> {
        let runs = found.get(&(path.to_string(), column.test.to_string()))?;
        median(runs, column.value)
    };
    let errors = |path: &str| -> Option<f64> {
        let mut total = None;
        for ((p, _), runs) in &found {
            if p == path {
                for n in runs.iter().filter_map(|v| num(v, &["errors", "total"])) {
                    *total.get_or_insert(0.0) += n;
                }
            }
        }
        total
    };
    let mut out = String::from("| path |");
    for column in PEER_COLUMNS {
        out.push_str(&format!(" {} |", column.label));
    }
    out.push_str(" errors |\n|---|");
    out.push_str(&"---:|".repeat(PEER_COLUMNS.len() + 1));
    out.push('\n');
    for (path, label) in PEER_ROWS {
        out.push_str(&format!("| {label} |"));
        for column in PEER_COLUMNS {
            out.push_str(&format!(
                " {} |",
                fmt_value(figure(path, column), column.decimals)
            ));
        }
        out.push_str(&format!(" {} |\n", fmt_value(errors(path), 0)));
    }
    for (path, label) in &PEER_ROWS[3..] {
        let name = label.split(" (").next().unwrap_or(label);
        out.push_str(&format!("| postern server + agent ÷ {name} |"));
        for column in PEER_COLUMNS {
            let ratio = versus(
                figure("colocated", column),
                figure(path, column),
                column.better,
            );
            out.push_str(&format!(" {ratio} |"));
        }
        out.push_str(" |\n");
    }

    // Issue 15's targets, each with what this run measured.
    let get = |path: &str, test: &str| {
        let column = PEER_COLUMNS.iter().find(|c| c.test == test)?;
        figure(path, column)
    };
    let rtt = |path: &str| {
        let runs = found.get(&(path.to_string(), "rtt".to_string()))?;
        median(runs, |v| num(v, &["latency", "p50_us"]))
    };
    let check = |met: Option<bool>| match met {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    };
    let both = |a: Option<f64>, b: Option<f64>| Some((a?, b?));
    let mut targets: Vec<(String, String, Option<bool>)> = Vec::new();
    let pair = both(rtt("colocated"), rtt("rathole-tcp"));
    targets.push((
        "round trip p50 ≤ rathole TCP's".into(),
        pair.map_or("—".into(), |(a, b)| format!("{a:.1} µs vs {b:.1} µs")),
        pair.map(|(a, b)| a <= b),
    ));
    let pair = both(get("colocated", "connect8"), get("rathole-tcp", "connect8"));
    targets.push((
        "conn/s with 8 workers ≥ rathole TCP's".into(),
        pair.map_or("—".into(), |(a, b)| format!("{a:.0} vs {b:.0}")),
        pair.map(|(a, b)| a >= b),
    ));
    let ours = get("colocated", "connect1");
    let noise = get("rathole-noise", "connect1");
    let tcp = get("rathole-tcp", "connect1");
    targets.push((
        "conn/s sequential ≥ rathole Noise's and ≥ 0.8× rathole TCP's".into(),
        match (ours, noise, tcp) {
            (Some(a), Some(n), Some(t)) => {
                format!("{a:.0} vs {n:.0} (Noise) and {:.2}× TCP's {t:.0}", a / t)
            }
            _ => "—".into(),
        },
        match (ours, noise, tcp) {
            (Some(a), Some(n), Some(t)) => Some(a >= n && a >= 0.8 * t),
            _ => None,
        },
    ));
    let pair = both(get("colocated", "tput8"), get("colocated", "tput1"));
    targets.push((
        "8-connection throughput ≥ 1.3× 1-connection".into(),
        pair.map_or("—".into(), |(a, b)| format!("{:.2}×", a / b)),
        pair.map(|(a, b)| a >= 1.3 * b),
    ));
    let pair = both(get("twohop", "tput1"), get("colocated", "tput1"));
    targets.push((
        "two-hop throughput ≥ 70% of co-located".into(),
        pair.map_or("—".into(), |(a, b)| format!("{:.0}%", 100.0 * a / b)),
        pair.map(|(a, b)| a >= 0.7 * b),
    ));
    let ours = get("colocated", "tput1");
    let encrypted: Vec<f64> = ["rathole-noise", "rathole-tls"]
        .iter()
        .filter_map(|p| get(p, "tput1"))
        .collect();
    targets.push((
        "1-connection throughput ≥ every encrypted peer's".into(),
        match (ours, encrypted.iter().copied().reduce(f64::max)) {
            (Some(a), Some(best)) => format!("{a:.2} vs best {best:.2} Gbit/s"),
            _ => "—".into(),
        },
        match (ours, encrypted.len()) {
            (Some(a), 2) => Some(encrypted.iter().all(|&b| a >= b)),
            _ => None,
        },
    ));
    out.push_str("\n| target (issue 15) | measured | |\n|---|---|---|\n");
    for (target, measured, met) in targets {
        out.push_str(&format!("| {target} | {measured} | {} |\n", check(met)));
    }
    Ok(out)
}

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
