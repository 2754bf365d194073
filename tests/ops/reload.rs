//! Reload outcomes: `systemctl reload` (the unit's `ExecReload` commands, run as systemd runs them)
//! fails on a broken file without signalling the process, and every SIGHUP's outcome shows in
//! `postern_config_last_reload_successful` / `postern_config_last_reload_success_timestamp_seconds`.

use std::path::Path;

use crate::support::*;

const SUCCESSFUL: &str = "postern_config_last_reload_successful";
const SUCCESS_TIME: &str = "postern_config_last_reload_success_timestamp_seconds";

/// The `ExecReload=` command lines of the systemd unit, in order.
fn unit_reload_commands() -> Vec<String> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/systemd/postern@.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    let commands: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ExecReload="))
        .map(String::from)
        .collect();
    assert!(!commands.is_empty(), "no ExecReload in {}", unit.display());
    commands
}

/// Runs the unit's `ExecReload=` commands for instance `role` as systemd does: in order, each
/// only if the one before succeeded, with the unit's paths pointed at this test's binary and
/// config file. Ok, or the failing command's stderr.
fn systemctl_reload(role: &str, config: &Path, main_pid: u32) -> Result<(), String> {
    for command in unit_reload_commands() {
        let line = command
            .replace("/usr/local/bin/postern", BIN)
            .replace("/etc/postern/%i.toml", config.to_str().unwrap())
            .replace("%i", role)
            .replace("$MAINPID", &main_pid.to_string());
        let words: Vec<&str> = line.split_whitespace().collect();
        let out = std::process::Command::new(words[0])
            .args(&words[1..])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {line}: {e}"));
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
    }
    Ok(())
}

async fn reload_samples(admin: std::net::SocketAddr) -> (f64, f64) {
    let (code, text) = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(code, 200, "{text}");
    let m = parse_samples(&text);
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("{k} missing from /metrics:\n{text}"))
    };
    (get(SUCCESSFUL), get(SUCCESS_TIME))
}

/// A broken file fails `systemctl reload` (the check runs first) and the process is not signalled;
/// a broken file sent by a bare SIGHUP is refused, `postern_config_last_reload_successful` drops
/// to 0 and the users in force keep working; a good file reloads, the gauge returns to 1 and the
/// success time moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_fails_on_a_broken_file_and_reports_its_outcome_in_metrics() {
    let w = Workdir::new("reload-metrics");
    let net = 92;
    let s = Single::start(&w, net, &[("alice", "alice-pw")], &[]).await;
    let alice = Some(("alice", "alice-pw"));
    let bob = Some(("bob", "bob-pw"));
    let pid = s.server.pid();

    let (ok, started) = reload_samples(s.admin).await;
    assert_eq!(ok, 1.0, "the config loaded at start");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started <= now && started > now - 120.0,
        "start load time {started}, now {now}"
    );
    // The agent reports its own load (another role, another process).
    assert_eq!(reload_samples(s.agent_admin).await.0, 1.0);

    // A file with a precise error: `systemctl reload` fails with it, the process never sees it.
    let mut broken = server_toml(&w, net, &[("alice", "alice-pw")], "5s");
    broken.push_str("[[gateway.rules]]\nusers = [\"carol\"]\n");
    std::fs::write(&s.config, &broken).unwrap();
    let err = systemctl_reload("server", &s.config, pid).expect_err("reload of a broken file");
    assert!(
        err.contains("gateway.rules[0].users") && err.contains("carol"),
        "imprecise reload failure: {err}"
    );
    assert_eq!(reload_samples(s.admin).await, (1.0, started));
    assert!(
        !w.log("server.log").contains("reload refused"),
        "the process was signalled despite the failed check"
    );

    // The same file by a bare SIGHUP: refused, and the metric says so.
    s.server.signal("HUP");
    wait_for(QUICK, "the refused reload to show in /metrics", || async {
        (reload_samples(s.admin).await.0 == 0.0).then_some(())
    })
    .await;
    assert_eq!(
        reload_samples(s.admin).await.1,
        started,
        "a refused reload is no success"
    );
    assert!(w.log("server.log").contains("reload refused"));
    echo_through(s.socks5, alice, s.echo.addr, 4096, 1)
        .await
        .unwrap_or_else(|e| panic!("alice after the refused reload: {e}"));
    assert_eq!(
        socks_connect(s.socks5, bob, s.echo.addr).await.err(),
        Some(0xf1),
        "bob is not configured yet"
    );

    // A good file through the unit's reload: bob gets in, the gauge is 1, the time moves on.
    std::fs::write(
        &s.config,
        server_toml(&w, net, &[("alice", "alice-pw"), ("bob", "bob-pw")], "5s"),
    )
    .unwrap();
    systemctl_reload("server", &s.config, pid).expect("reload of a good file");
    let (ok, reloaded) = wait_for(QUICK, "the good reload to show in /metrics", || async {
        let (ok, at) = reload_samples(s.admin).await;
        (ok == 1.0).then_some((ok, at))
    })
    .await;
    assert_eq!(ok, 1.0);
    assert!(reloaded > started, "success time {started} → {reloaded}");
    echo_through(s.socks5, bob, s.echo.addr, 4096, 2)
        .await
        .unwrap_or_else(|e| panic!("bob after the reload: {e}"));
}
