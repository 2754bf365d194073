//! Smoke test of `postern bench` (not a benchmark: `scripts/bench` is). The real binary's target
//! and loads run with tiny durations on 127.0.0.1 and port 0; each must print exactly one JSON
//! object showing more than zero work and no errors.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_postern");

/// A child process killed (and reaped) when the test ends, passing or not.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `postern bench KIND --listen 127.0.0.1:0` and returns it with the address its
/// `ready KIND=ADDR` line gives.
fn start(kind: &str) -> (Guard, String) {
    start_with(&[], kind)
}

/// [`start`] with global options (`--worker-threads N`) before `bench`.
fn start_with(options: &[&str], kind: &str) -> (Guard, String) {
    let mut child = Command::new(BIN)
        .args(options)
        .args(["bench", kind, "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start postern bench {kind}: {e}"));
    let stdout = child.stdout.take().expect("stdout piped");
    let guard = Guard(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        // Keep draining so the server never blocks on a full pipe.
        for _ in lines {}
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("bench {kind} printed no line within 20s"))
        .unwrap_or_else(|| panic!("bench {kind} exited before its ready line"))
        .expect("read the child's stdout");
    let addr = line
        .strip_prefix(&format!("ready {kind}="))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (guard, addr)
}

/// Starts `bench serve` (the target).
fn serve() -> (Guard, String) {
    start("serve")
}

/// Runs `postern bench ARGS… --json` and parses its one line of output.
fn bench(args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .expect("run postern bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "postern bench {args:?} failed: {stderr}"
    );
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 output");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "expected one JSON line, got {stdout:?}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("{e}: {stdout:?}"))
}

fn positive(v: &Value, path: &[&str]) -> f64 {
    let mut at = v;
    for key in path {
        at = &at[*key];
    }
    let n = at
        .as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v}"));
    assert!(n > 0.0, "{path:?} is {n} in {v}");
    n
}

fn no_errors(v: &Value) {
    assert_eq!(v["errors"]["total"], 0, "errors in {v}");
}

const TINY: [&str; 4] = ["--duration", "400ms", "--warmup", "100ms"];

#[test]
fn loads_against_bench_serve() {
    let (_serve, target) = serve();
    let with = |extra: &[&str]| {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["--via", "direct", "--target", &target]);
        args.extend(TINY);
        bench(&args)
    };

    let connect = with(&["connect", "--connections", "2"]);
    assert_eq!(connect["test"], "connect");
    positive(&connect, &["ok"]);
    positive(&connect, &["connections_per_s"]);
    positive(&connect, &["latency", "p50_us"]);
    positive(&connect, &["latency", "p999_us"]);
    no_errors(&connect);

    let down = with(&["throughput", "--connections", "2"]);
    assert_eq!(down["test"], "throughput");
    assert_eq!(down["direction"], "down");
    positive(&down, &["bytes"]);
    positive(&down, &["gbit_per_s"]);
    positive(&down, &["per_connection_gbit_per_s", "min"]);
    assert_eq!(down["per_connection"].as_array().map(Vec::len), Some(2));
    no_errors(&down);

    let up = with(&["throughput", "--direction", "up"]);
    assert_eq!(up["direction"], "up");
    positive(&up, &["bytes"]);
    no_errors(&up);

    let rtt = with(&["rtt"]);
    assert_eq!(rtt["test"], "rtt");
    positive(&rtt, &["round_trips"]);
    positive(&rtt, &["latency", "p50_us"]);
    no_errors(&rtt);
}

#[test]
fn quic_ceiling() {
    let mut args = vec!["quic"];
    args.extend(TINY);
    let quic = bench(&args);
    assert_eq!(quic["test"], "quic");
    positive(&quic, &["bytes"]);
    positive(&quic, &["gbit_per_s"]);
    let mtu = positive(&quic, &["mtu"]);
    assert!(
        (1200.0..=1452.0).contains(&mtu),
        "MTU {mtu}: postern caps packets at 1452 bytes"
    );
}

#[test]
fn unreachable_target_is_counted_as_errors() {
    // Nothing listens on a freshly released port: every attempt fails fast and is tallied.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = format!("127.0.0.1:{port}");
    let mut args = vec!["connect", "--via", "direct", "--target", &target];
    args.extend(TINY);
    let connect = bench(&args);
    assert_eq!(connect["ok"], 0);
    positive(&connect, &["errors", "total"]);
}

/// The plain SOCKS5 baseline proxies to the target (connect and round trips, no errors) and
/// answers a refused target with SOCKS5 reply 0x05.
#[test]
fn plain_socks5_baseline_proxies_and_refuses() {
    let (_serve, target) = serve();
    let (_proxy, proxy) = start("socks5");
    let via = format!("socks5://{proxy}");
    let with = |extra: &[&str], target: &str| {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["--via", &via, "--target", target]);
        args.extend(TINY);
        bench(&args)
    };
    let connect = with(&["connect"], &target);
    positive(&connect, &["ok"]);
    no_errors(&connect);
    let rtt = with(&["rtt"], &target);
    positive(&rtt, &["round_trips"]);
    no_errors(&rtt);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let refused = with(&["connect"], &format!("127.0.0.1:{port}"));
    assert_eq!(refused["ok"], 0);
    positive(&refused, &["errors", "kinds", "socks5: reply 0x05"]);
}

/// A process with one worker runs its runtime on the main thread alone (no second thread to hand
/// every wake-up to; docs/performance.md), and still serves: the agent's default.
#[test]
fn one_worker_runs_on_the_main_thread_alone() {
    let (_serve, target) = serve();
    let (proxy, addr) = start_with(&["--worker-threads", "1"], "socks5");
    let tasks = std::fs::read_dir(format!("/proc/{}/task", proxy.0.id()))
        .expect("/proc/PID/task")
        .count();
    assert_eq!(tasks, 1, "threads of a one-worker process");
    let via = format!("socks5://{addr}");
    let mut args = vec!["connect", "--via", &via, "--target", &target];
    args.extend(TINY);
    let connect = bench(&args);
    positive(&connect, &["ok"]);
    no_errors(&connect);
}
