#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};

use libfuzzer_sys::fuzz_target;
use postern_fuzz::relay_control;

/// Inputs run so far; every so often the relay must still admit a legitimate agent, and the
/// process's memory is logged.
static RUNS: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    relay_control::relay_control(data);
    let runs = RUNS.fetch_add(1, Ordering::Relaxed) + 1;
    if runs % 4096 == 1 {
        let answer =
            relay_control::relay_control(&relay_control::valid_hello("fuzz-probe", [127, 99, 255, 1].into()));
        assert!(
            matches!(answer.messages.first(), Some(postern::protocol::Message::Welcome(_))),
            "the relay no longer admits a legitimate agent: {answer:?}"
        );
        eprintln!(
            "relay_control: {runs} inputs, rss {} KiB, relay connections {}",
            relay_control::rss_kib(),
            relay_control::relay_connections()
        );
    }
});
