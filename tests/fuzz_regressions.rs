//! Replays every fuzz seed (`tests/fuzz/corpus/<target>/`) and every crash the fuzzer found
//! (`tests/fuzz/regressions/<target>/`) through the same code the fuzz targets run — without
//! libFuzzer or nightly, so `scripts/test` keeps each fixed crash fixed. `scripts/fuzz` runs the
//! fuzzer itself.

#[path = "fuzz/src/lib.rs"]
mod harness;

use std::path::{Path, PathBuf};

/// Every input for `target`, sorted by path: the seed corpus, then the regressions.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz");
    let mut found = Vec::new();
    for kind in ["corpus", "regressions"] {
        let dir = root.join(kind).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.is_file())
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        paths.sort();
        for path in paths {
            let data = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            found.push((path, data));
        }
    }
    assert!(
        !found.is_empty(),
        "no corpus or regression inputs for {target} under {}",
        root.display()
    );
    found
}

fn name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The status line of the first response in `answer`.
fn status_line(answer: &[u8]) -> String {
    let text = String::from_utf8_lossy(answer);
    text.lines().next().unwrap_or("").to_string()
}

#[test]
fn protocol_decode_replays() {
    for (path, data) in inputs("protocol_decode") {
        // Shown only when the test fails: which file broke it.
        eprintln!("replaying {}", path.display());
        harness::protocol_decode(&data);
        if path
            .parent()
            .is_some_and(|p| p.ends_with("corpus/protocol_decode"))
            && !name(&path).starts_with("truncated")
        {
            assert!(
                matches!(postern::protocol::decode(&data), Ok(Some(_))),
                "seed {} is not a valid frame",
                path.display()
            );
        }
    }
}

#[test]
fn socks5_handshake_replays() {
    for (path, data) in inputs("socks5_handshake") {
        eprintln!("replaying {}", path.display());
        let [open, guarded] = harness::socks5_handshake(&data);
        if name(&path) == "noauth-connect-ipv4" {
            // No-auth chosen, then "host unreachable": the empty route cache has no agent for it.
            assert_eq!(&open[..4], [5, 0, 5, 4], "open gateway answered {open:?}");
            // Only username/password is acceptable to the guarded gateway.
            assert_eq!(guarded, [5, 0xff], "guarded gateway answered {guarded:?}");
        }
        if name(&path) == "userpass-connect-ipv4" {
            // Username/password chosen, accepted, then "host unreachable".
            assert_eq!(&guarded[..6], [5, 2, 1, 0, 5, 4], "guarded: {guarded:?}");
        }
    }
}

#[test]
fn http_request_replays() {
    let mut smuggling = 0;
    for (path, data) in inputs("http_request") {
        eprintln!("replaying {}", path.display());
        let [open, guarded] = harness::http_request(&data);
        if name(&path).starts_with("smuggle-") {
            smuggling += 1;
            for (which, answer) in [("open", &open), ("guarded", &guarded)] {
                assert!(
                    status_line(answer).starts_with("HTTP/1.1 400"),
                    "{}: the {which} gateway answered {:?}, not 400",
                    path.display(),
                    String::from_utf8_lossy(answer)
                );
            }
        }
    }
    assert_eq!(smuggling, 5, "the five smuggling shapes are seeds");
}

#[test]
fn relay_control_replays() {
    use harness::relay_control::{relay_connections, relay_control, rss_kib, valid_hello};
    use postern::protocol::{close, Message};

    let protocol = |reason: &str| Some((u64::from(close::PROTOCOL), reason.to_string()));
    let mut seen = 0;
    for (path, data) in inputs("relay_control") {
        eprintln!("replaying {}", path.display());
        let outcome = relay_control(&data);
        let first = outcome.messages.first();
        let expect = |ok: bool| assert!(ok, "{}: {outcome:?}", path.display());
        match name(&path).as_str() {
            "hello-valid" | "hello-then-pings" => {
                expect(matches!(first, Some(Message::Welcome(_))));
                let pongs = outcome
                    .messages
                    .iter()
                    .filter(|m| matches!(m, Message::Pong { .. }))
                    .count();
                expect(
                    pongs
                        == if name(&path) == "hello-then-pings" {
                            2
                        } else {
                            0
                        },
                );
                expect(outcome.closed == Some((0, "control stream ended".to_string())));
                seen += 1;
            }
            "hello-then-hello" | "hello-then-pong" => {
                // Admitted (the close may overtake the Welcome on its way), then closed.
                expect(matches!(first, None | Some(Message::Welcome(_))));
                expect(outcome.closed == protocol("unexpected control message"));
                seen += 1;
            }
            "hello-then-garbage" | "hello-then-oversized" => {
                // Admitted (the close may overtake the Welcome on its way), then closed.
                expect(matches!(first, None | Some(Message::Welcome(_))));
                expect(outcome.closed == protocol("bad control frame"));
                seen += 1;
            }
            "hello-bad-token"
            | "hello-outside-range"
            | "hello-v6"
            | "hello-bad-id"
            | "hello-no-ip" => {
                expect(matches!(first, Some(Message::Reject(_))));
                expect(outcome.closed.as_ref().map(|c| c.0) == Some(close::REJECTED.into()));
                seen += 1;
            }
            "ping-first" => {
                expect(outcome.messages.is_empty());
                expect(outcome.closed == protocol("expected hello"));
                seen += 1;
            }
            "oversized-length" | "max-length" | "wrong-version" | "malformed-json"
            | "truncated-hello" | "empty" => {
                expect(outcome.messages.is_empty());
                expect(outcome.closed == protocol("bad hello"));
                seen += 1;
            }
            _ => {}
        }
    }
    assert_eq!(
        seen, 18,
        "every committed relay_control seed has its expected answer"
    );
    // After all of it the relay still admits an agent, and holds no connection of the inputs.
    let probe = relay_control(&valid_hello("probe", [127, 99, 255, 1].into()));
    assert!(
        matches!(probe.messages.first(), Some(Message::Welcome(_))),
        "{probe:?}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while relay_connections() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay still holds {} connections",
            relay_connections()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    eprintln!(
        "relay_control: process RSS {} KiB after the replay",
        rss_kib()
    );
}
