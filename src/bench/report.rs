//! Turning samples into figures: latency percentiles from sorted samples, bounded error tallies,
//! human or JSON output. The markdown tables `scripts/bench` prints from its collected results are
//! in [`tables`].

use std::collections::BTreeMap;

use serde::Serialize;

/// A bench result: printed as text, or as one JSON object with `--json`.
pub trait Report: Serialize {
    fn human(&self) -> String;
}

/// Prints `report` on stdout (one JSON object per line with `json`).
pub fn print(report: &impl Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print!("{}", report.human());
    }
    use std::io::Write as _;
    std::io::stdout().flush()?;
    Ok(())
}

/// Latency percentiles in microseconds, nearest-rank over every collected sample.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    /// `None` without samples.
    pub fn from_nanos(mut samples: Vec<u64>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let n = samples.len();
        let at = |p: f64| {
            // Nearest rank: the smallest sample with at least p of all samples at or below it.
            let rank = (p * n as f64).ceil() as usize;
            samples[rank.clamp(1, n) - 1] as f64 / 1e3
        };
        let sum: u128 = samples.iter().map(|&s| s as u128).sum();
        Some(Latency {
            count: n as u64,
            min_us: samples[0] as f64 / 1e3,
            mean_us: sum as f64 / n as f64 / 1e3,
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: samples[n - 1] as f64 / 1e3,
        })
    }

    pub fn human(&self) -> String {
        format!(
            "p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs (min {:.1}, mean {:.1}, max {:.1}; {} samples)",
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.min_us,
            self.mean_us,
            self.max_us,
            self.count
        )
    }
}

/// Most distinct error kinds kept; the rest are counted as "other" so a storm of odd errors cannot
/// grow the tally without bound.
const MAX_ERROR_KINDS: usize = 16;

/// Error counts by kind.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Errors {
    pub total: u64,
    pub kinds: BTreeMap<String, u64>,
}

impl Errors {
    pub fn note(&mut self, kind: String) {
        self.add(kind, 1);
    }

    fn add(&mut self, kind: String, n: u64) {
        self.total += n;
        let key = if self.kinds.len() >= MAX_ERROR_KINDS && !self.kinds.contains_key(&kind) {
            "other".to_string()
        } else {
            kind
        };
        *self.kinds.entry(key).or_default() += n;
    }

    pub fn merge(&mut self, other: Errors) {
        for (kind, n) in other.kinds {
            self.add(kind, n);
        }
    }

    pub fn human(&self) -> String {
        if self.total == 0 {
            return "errors 0".into();
        }
        let kinds: Vec<String> = self
            .kinds
            .iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect();
        format!("errors {} ({})", self.total, kinds.join(", "))
    }
}

mod tables;
pub use tables::{peers_table, table};

#[cfg(test)]
mod tests;
