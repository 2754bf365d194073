//! The table against the peers (rathole over TCP, Noise and TLS; microsocks), where each path's
//! CPU goes, and issue 15's targets with what bounds each.

use super::*;

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

    out.push_str(&targets(&found));
    Ok(out)
}

/// Issue 15's targets as a table: each with what the results measured and, where they recorded
/// CPU time, what bounds it (CPU per operation against rathole TCP's; for throughput, the most the
/// load could have moved with every core busy at the CPU per GB it cost).
fn targets(found: &BTreeMap<(String, String), Vec<Value>>) -> String {
    let mut out = String::new();
    let of = |path: &str, test: &str, value: fn(&Value) -> Option<f64>| {
        median(found.get(&(path.to_string(), test.to_string()))?, value)
    };
    let rate = |path: &str, test: &str| of(path, test, |v| num(v, &["connections_per_s"]));
    let gbit = |path: &str, test: &str| of(path, test, |v| num(v, &["gbit_per_s"]));
    let rtt = |path: &str| of(path, "rtt", |v| num(v, &["latency", "p50_us"]));
    let cores = found
        .values()
        .flatten()
        .find_map(|v| num(v, &["cpu", "cores"]));
    let check = |met: Option<bool>| match met {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    };
    let both = |a: Option<f64>, b: Option<f64>| Some((a?, b?));
    let versus_cpu = |what: &str, test: &str, value: fn(&Value) -> Option<f64>| {
        both(of("colocated", test, value), of("rathole-tcp", test, value))
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
    let pair = both(
        rate("colocated", "connect8"),
        rate("rathole-tcp", "connect8"),
    );
    targets.push(Target {
        name: "conn/s with 8 workers ≥ rathole TCP's",
        measured: pair.map_or("—".into(), |(a, b)| format!("{a:.0} vs {b:.0}")),
        limit: versus_cpu("connection", "connect8", cpu_us_per_connection),
        met: pair.map(|(a, b)| a >= b),
    });
    let ours = rate("colocated", "connect1");
    let noise = rate("rathole-noise", "connect1");
    let tcp = rate("rathole-tcp", "connect1");
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
    let at_full = |path: &str, test: &str| Some(cores? * 8.0 / of(path, test, cpu_s_per_gb)?);
    let one = gbit("colocated", "tput1");
    let pair = both(gbit("colocated", "tput8"), one);
    targets.push(Target {
        name: "8-connection throughput ≥ 1.3× 1-connection",
        measured: pair.map_or("—".into(), |(a, b)| format!("{:.2}×", a / b)),
        limit: match (
            at_full("colocated", "tput8"),
            one,
            of("colocated", "tput1", cores_busy),
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
    let pair = both(gbit("twohop", "tput1"), one);
    targets.push(Target {
        name: "two-hop throughput ≥ 70% of co-located",
        measured: pair.map_or("—".into(), |(a, b)| format!("{:.0}%", 100.0 * a / b)),
        limit: match (at_full("twohop", "tput1"), one) {
            (Some(full), Some(one)) => format!(
                "with every core busy at the two-hop path's CPU per GB ({:.2} s, co-located {:.2} s) \
                 it would move {full:.2} Gbit/s: {:.0}% of co-located",
                of("twohop", "tput1", cpu_s_per_gb).unwrap_or(0.0),
                of("colocated", "tput1", cpu_s_per_gb).unwrap_or(0.0),
                100.0 * full / one
            ),
            _ => String::new(),
        },
        met: pair.map(|(a, b)| a >= 0.7 * b),
    });
    let encrypted: Vec<f64> = ["rathole-noise", "rathole-tls"]
        .iter()
        .filter_map(|p| gbit(p, "tput1"))
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
    out
}
