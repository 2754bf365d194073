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

/// Where each path's CPU goes, per unit of work, in the same loads as [`PEER_COLUMNS`]: every
/// process on the path (the target included) and the client.
const CPU_COLUMNS: &[PeerColumn] = &[
    PeerColumn {
        label: "cores busy, 1 conn",
        test: "tput1",
        value: cores_busy,
        better: Better::None,
        decimals: 2,
    },
    PeerColumn {
        label: "CPU-s per GB, 1 conn",
        test: "tput1",
        value: cpu_s_per_gb,
        better: Better::Lower,
        decimals: 2,
    },
    PeerColumn {
        label: "CPU-s per GB, 8 conn",
        test: "tput8",
        value: cpu_s_per_gb,
        better: Better::Lower,
        decimals: 2,
    },
    PeerColumn {
        label: "CPU µs per conn, sequential",
        test: "connect1",
        value: cpu_us_per_connection,
        better: Better::Lower,
        decimals: 0,
    },
    PeerColumn {
        label: "CPU µs per conn, 8 workers",
        test: "connect8",
        value: cpu_us_per_connection,
        better: Better::Lower,
        decimals: 0,
    },
    PeerColumn {
        label: "CPU µs per round trip",
        test: "rtt",
        value: cpu_us_per_round_trip,
        better: Better::Lower,
        decimals: 0,
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
            if better == Better::None {
                return format!("{ratio:.2}×");
            }
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
    // One table of columns: a row per path, then postern's co-located figure ÷ each peer's.
    let render = |columns: &[PeerColumn], with_errors: bool| {
        let mut out = String::from("| path |");
        for column in columns {
            out.push_str(&format!(" {} |", column.label));
        }
        out.push_str(if with_errors {
            " errors |\n|---|"
        } else {
            "\n|---|"
        });
        out.push_str(&"---:|".repeat(columns.len() + usize::from(with_errors)));
        out.push('\n');
        for (path, label) in PEER_ROWS {
            out.push_str(&format!("| {label} |"));
            for column in columns {
                out.push_str(&format!(
                    " {} |",
                    fmt_value(figure(path, column), column.decimals)
                ));
            }
            if with_errors {
                out.push_str(&format!(" {} |", fmt_value(errors(path), 0)));
            }
            out.push('\n');
        }
        for (path, label) in &PEER_ROWS[3..] {
            let name = label.split(" (").next().unwrap_or(label);
            out.push_str(&format!("| postern server + agent ÷ {name} |"));
            for column in columns {
                let ratio = versus(
                    figure("colocated", column),
                    figure(path, column),
                    column.better,
                );
                out.push_str(&format!(" {ratio} |"));
            }
            out.push_str(if with_errors { " |\n" } else { "\n" });
        }
        out
    };
    let mut out = render(PEER_COLUMNS, true);
    if CPU_COLUMNS
        .iter()
        .any(|c| PEER_ROWS.iter().any(|(p, _)| figure(p, c).is_some()))
    {
        out.push_str(
            "\nWhere the CPU goes, in the same loads: the CPU time of every process on the path \
             (the target included) and of the client, per unit of work; cores busy is that time \
             over the load's wall time.\n\n",
        );
        out.push_str(&render(CPU_COLUMNS, false));
    }

    // Issue 15's targets, each with what this run measured and, where the run recorded CPU
    // time, what the machine's cores allow.
    let get = |path: &str, test: &str| {
        let column = PEER_COLUMNS.iter().find(|c| c.test == test)?;
        figure(path, column)
    };
    let cpu = |path: &str, test: &str, value: fn(&Value) -> Option<f64>| {
        median(found.get(&(path.to_string(), test.to_string()))?, value)
    };
    let cores = found
        .values()
        .flatten()
        .find_map(|v| num(v, &["cpu", "cores"]));
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
    let versus_cpu = |what: &str, test: &str, value: fn(&Value) -> Option<f64>| {
        both(
            cpu("colocated", test, value),
            cpu("rathole-tcp", test, value),
        )
        .map_or(String::new(), |(a, b)| {
            format!("CPU per {what}: {a:.0} µs against rathole TCP's {b:.0} µs")
        })
    };
    struct Target {
        name: &'static str,
        measured: String,
        limit: String,
        met: Option<bool>,
    }
    let mut targets: Vec<Target> = Vec::new();
    let pair = both(rtt("colocated"), rtt("rathole-tcp"));
    targets.push(Target {
        name: "round trip p50 ≤ rathole TCP's",
        measured: pair.map_or("—".into(), |(a, b)| format!("{a:.1} µs vs {b:.1} µs")),
        limit: versus_cpu("round trip", "rtt", cpu_us_per_round_trip),
        met: pair.map(|(a, b)| a <= b),
    });
    let pair = both(get("colocated", "connect8"), get("rathole-tcp", "connect8"));
    targets.push(Target {
        name: "conn/s with 8 workers ≥ rathole TCP's",
        measured: pair.map_or("—".into(), |(a, b)| format!("{a:.0} vs {b:.0}")),
        limit: versus_cpu("connection", "connect8", cpu_us_per_connection),
        met: pair.map(|(a, b)| a >= b),
    });
    let ours = get("colocated", "connect1");
    let noise = get("rathole-noise", "connect1");
    let tcp = get("rathole-tcp", "connect1");
    targets.push(Target {
        name: "conn/s sequential ≥ rathole Noise's and ≥ 0.8× rathole TCP's",
        measured: match (ours, noise, tcp) {
            (Some(a), Some(n), Some(t)) => {
                format!("{a:.0} vs {n:.0} (Noise) and {:.2}× TCP's {t:.0}", a / t)
            }
            _ => "—".into(),
        },
        limit: versus_cpu("connection", "connect1", cpu_us_per_connection),
        met: match (ours, noise, tcp) {
            (Some(a), Some(n), Some(t)) => Some(a >= n && a >= 0.8 * t),
            _ => None,
        },
    });
    // With every core busy at the CPU per GB a load actually cost, what could it have moved?
    let at_full = |path: &str, test: &str| Some(cores? * 8.0 / cpu(path, test, cpu_s_per_gb)?);
    let one = get("colocated", "tput1");
    let pair = both(get("colocated", "tput8"), one);
    targets.push(Target {
        name: "8-connection throughput ≥ 1.3× 1-connection",
        measured: pair.map_or("—".into(), |(a, b)| format!("{:.2}×", a / b)),
        limit: match (
            at_full("colocated", "tput8"),
            one,
            cpu("colocated", "tput1", cores_busy),
        ) {
            (Some(full), Some(one), Some(busy)) => format!(
                "one connection kept {busy:.2} of {:.0} cores busy; with every core busy at the \
                 8 connections' CPU per GB they would move {full:.2} Gbit/s: {:.2}× one connection",
                cores.unwrap_or(0.0),
                full / one
            ),
            _ => String::new(),
        },
        met: pair.map(|(a, b)| a >= 1.3 * b),
    });
    let pair = both(get("twohop", "tput1"), one);
    targets.push(Target {
        name: "two-hop throughput ≥ 70% of co-located",
        measured: pair.map_or("—".into(), |(a, b)| format!("{:.0}%", 100.0 * a / b)),
        limit: match (at_full("twohop", "tput1"), one) {
            (Some(full), Some(one)) => format!(
                "with every core busy at the two-hop path's CPU per GB ({:.2} s, co-located {:.2} s) \
                 it would move {full:.2} Gbit/s: {:.0}% of co-located",
                cpu("twohop", "tput1", cpu_s_per_gb).unwrap_or(0.0),
                cpu("colocated", "tput1", cpu_s_per_gb).unwrap_or(0.0),
                100.0 * full / one
            ),
            _ => String::new(),
        },
        met: pair.map(|(a, b)| a >= 0.7 * b),
    });
    let encrypted: Vec<f64> = ["rathole-noise", "rathole-tls"]
        .iter()
        .filter_map(|p| get(p, "tput1"))
        .collect();
    targets.push(Target {
        name: "1-connection throughput ≥ every encrypted peer's",
        measured: match (one, encrypted.iter().copied().reduce(f64::max)) {
            (Some(a), Some(best)) => format!("{a:.2} vs best {best:.2} Gbit/s"),
            _ => "—".into(),
        },
        limit: String::new(),
        met: match (one, encrypted.len()) {
            (Some(a), 2) => Some(encrypted.iter().all(|&b| a >= b)),
            _ => None,
        },
    });
    out.push_str(
        "\n| target (issue 15) | measured | | what bounds it in this run |\n|---|---|---|---|\n",
    );
    for t in targets {
        out.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            t.name,
            t.measured,
            check(t.met),
            t.limit
        ));
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
