//! What a newcomer's fresh machine needs: every file the build and the tests use is installed by
//! `scripts/deps` under the package that really provides it. A package installed by hand (or one
//! that is only *recommended* by another, as `libprotobuf-dev` is by `protobuf-compiler`) would
//! otherwise hide a missing install step on the machine that runs the tests.

use std::path::Path;
use std::process::Command;

/// The `need PACKAGE WHAT` lines of `scripts/deps`: (package, path or command).
fn deps_needs() -> Vec<(String, String)> {
    let script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/deps"))
            .expect("scripts/deps");
    script
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("need "))
        .filter_map(|rest| {
            let mut words = rest.split_whitespace();
            let package = words.next()?.to_string();
            let what = words.next()?.trim_matches('"').to_string();
            // `need() {` is the function itself, not a need.
            (!package.starts_with('(')).then_some((package, what))
        })
        .map(|(package, what)| {
            let what = if what == "$PROTO_INCLUDE" {
                "/usr/include/google/protobuf/descriptor.proto".to_string()
            } else {
                what
            };
            (package, what)
        })
        .collect()
}

fn resolve(what: &str) -> String {
    if what.starts_with('/') {
        return what.to_string();
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {what}"))
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "`{what}` is not installed: run scripts/deps test"
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Which Debian package owns `path` (following a symlink such as /usr/bin/etcd → …).
fn owner(path: &str) -> String {
    let real = std::fs::canonicalize(path)
        .unwrap_or_else(|e| panic!("{path}: {e} (scripts/deps should have installed it)"));
    for candidate in [Path::new(path), real.as_path()] {
        let out = Command::new("dpkg")
            .arg("-S")
            .arg(candidate)
            .output()
            .expect("dpkg");
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some((package, _)) = text.lines().next().and_then(|l| l.split_once(':')) {
                return package.trim().to_string();
            }
        }
    }
    panic!("no Debian package owns {path} ({})", real.display());
}

/// Every file scripts/deps checks is owned by the package it installs for it; the protobuf
/// includes etcd-client's build needs are among them.
#[test]
fn scripts_deps_installs_the_package_that_owns_each_file_the_build_and_tests_use() {
    let needs = deps_needs();
    let names: Vec<&str> = needs.iter().map(|(p, _)| p.as_str()).collect();
    for must in [
        "protobuf-compiler",
        "libprotobuf-dev",
        "etcd-server",
        "prometheus",
        "chromium",
    ] {
        assert!(
            names.contains(&must),
            "scripts/deps does not install {must}: {names:?}"
        );
    }
    for (package, what) in &needs {
        let path = resolve(what);
        let owned_by = owner(&path);
        assert_eq!(
            &owned_by, package,
            "scripts/deps installs {package} for {what}, but {path} belongs to {owned_by}"
        );
    }
}

/// protoc finds the well-known includes by itself, as etcd-client's build script needs: a .proto
/// importing google/protobuf/descriptor.proto compiles with no -I for it.
#[test]
fn protoc_finds_the_well_known_includes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("probe.proto"),
        "syntax = \"proto3\";\nimport \"google/protobuf/descriptor.proto\";\n\
         message Probe { google.protobuf.FileDescriptorProto file = 1; }\n",
    )
    .unwrap();
    let out = Command::new("protoc")
        .current_dir(dir.path())
        .args(["-I.", "--descriptor_set_out=probe.bin", "probe.proto"])
        .output()
        .expect("protoc (Debian protobuf-compiler; scripts/deps installs it)");
    assert!(
        out.status.success(),
        "protoc cannot compile a .proto importing the well-known types: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn check(config: &Path) -> (bool, String, String) {
    let out = Command::new(crate::support::BIN)
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("postern check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Issue 10.4: clashing listeners are refused by `postern check` (and so at start), naming both
/// keys: admin == gateway.http (TCP), relay.peer_listen == relay.listen (UDP), admin == the relay's
/// TCP tunnel listener (by default on `relay.listen`'s port), and a wildcard address against a
/// specific one. A TCP and a UDP listener on one port do not clash.
#[test]
fn check_refuses_clashing_listeners_and_lists_the_ones_it_will_open() {
    let w = crate::support::Workdir::new("check");
    let good = crate::support::server_toml(&w, 74, &[], "1s")
        .replace(
            "listen = \"127.0.0.1:0\"\ncert",
            "listen = \"127.0.0.1:4433\"\npeer_listen = \"127.0.0.1:4434\"\ncert",
        )
        .replace(
            "socks5 = \"127.0.0.1:0\"",
            "socks5 = \"127.0.0.1:1080\"\nhttp = \"127.0.0.1:8080\"",
        )
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            "[admin]\nlisten = \"127.0.0.1:4434\"",
        )
        + &format!("[peer]\nca = \"{}\"\n", w.pki.ca.display());
    let config = w.write("good.toml", &good);
    let (ok, stdout, stderr) = check(&config);
    assert!(
        ok,
        "a config without clashes (admin TCP 4434 beside relay.peer_listen UDP 4434): {stderr}"
    );
    for listener in [
        "relay.listen       UDP 127.0.0.1:4433",
        "relay.tcp_listen   TCP 127.0.0.1:4433",
        "relay.peer_listen  UDP 127.0.0.1:4434",
        "gateway.socks5     TCP 127.0.0.1:1080",
        "gateway.http       TCP 127.0.0.1:8080",
        "admin.listen       TCP 127.0.0.1:4434",
    ] {
        assert!(
            stdout.contains(listener),
            "{listener:?} not listed in:\n{stdout}"
        );
    }

    for (name, from, to, message) in [
        (
            "admin-http",
            "[admin]\nlisten = \"127.0.0.1:4434\"",
            "[admin]\nlisten = \"127.0.0.1:8080\"",
            "admin.listen: 127.0.0.1:8080 clashes with gateway.http (127.0.0.1:8080)",
        ),
        (
            "peer-listen",
            "peer_listen = \"127.0.0.1:4434\"",
            "peer_listen = \"127.0.0.1:4433\"",
            "relay.peer_listen: 127.0.0.1:4433 clashes with relay.listen (127.0.0.1:4433)",
        ),
        (
            "admin-tcp-tunnels",
            "[admin]\nlisten = \"127.0.0.1:4434\"",
            "[admin]\nlisten = \"127.0.0.1:4433\"",
            "admin.listen: 127.0.0.1:4433 clashes with relay.tcp_listen (127.0.0.1:4433)",
        ),
        (
            "wildcard",
            "socks5 = \"127.0.0.1:1080\"",
            "socks5 = \"0.0.0.0:8080\"",
            "gateway.http: 127.0.0.1:8080 clashes with gateway.socks5 (0.0.0.0:8080)",
        ),
    ] {
        assert!(good.contains(from), "{from}");
        let config = w.write(&format!("{name}.toml"), &good.replace(from, to));
        let (ok, _, stderr) = check(&config);
        assert!(!ok, "{name}: accepted");
        assert!(
            stderr.contains(message),
            "{name}: {message:?} not in {stderr}"
        );
    }
}

/// Issue 10.13: `postern check` reports every wrong section of a file at once, and no error says
/// the same thing twice.
#[test]
fn check_reports_all_errors_at_once_without_repeating_itself() {
    let w = crate::support::Workdir::new("check-all");
    let bad = crate::support::server_toml(&w, 75, &[], "1s")
        .replace(
            &w.pki.relay_cert.display().to_string(),
            "/nonexistent/relay.pem",
        )
        .replace("socks5 = \"127.0.0.1:0\"", "socks5 = \"not-an-address\"")
        .replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            "[admin]\nlisten = \"nowhere\"",
        );
    let (ok, _, stderr) = check(&w.write("bad.toml", &bad));
    assert!(!ok);
    for key in ["3 errors", "relay.cert", "gateway.socks5", "admin.listen"] {
        assert!(stderr.contains(key), "{key:?} not in {stderr}");
    }
    let (ok, _, stderr) = check(Path::new("/nonexistent/postern.toml"));
    assert!(!ok);
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "the cause is repeated: {stderr}"
    );
    assert_eq!(
        stderr.matches("/nonexistent/relay.pem").count(),
        0,
        "{stderr}"
    );
}

/// Issue 10.13: `postern cert issue --help` describes every option.
#[test]
fn cert_issue_help_describes_every_option() {
    let out = Command::new(crate::support::BIN)
        .args(["cert", "issue", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    let lines: Vec<&str> = help.lines().collect();
    let mut options = 0;
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if !trimmed.starts_with("--")
            || trimmed.starts_with("--log-format")
            || trimmed.starts_with("--worker-threads")
        {
            continue;
        }
        options += 1;
        let described = lines
            .get(i + 1)
            .is_some_and(|next| !next.trim().is_empty() && next.starts_with("          "));
        assert!(described, "{trimmed:?} has no description in:\n{help}");
    }
    assert!(options >= 7, "too few options found in:\n{help}");
}

/// Issue 10.13: the plain-hosts walkthrough works as written. Its `postern cert` commands run
/// (with /etc/postern/ moved to a temp dir), every file in config/hosts/ then passes
/// `postern check` unchanged but for that path, and the sample output the walkthrough shows is
/// what `check` prints.
#[test]
fn the_plain_hosts_walkthrough_runs_as_written() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(repo.join("docs/hosts.md")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let etc = format!("{}/", dir.path().display());
    let mut certs = 0;
    for line in doc.lines().map(str::trim) {
        let Some(args) = line.strip_prefix("postern cert ") else {
            continue;
        };
        let args: Vec<String> = args
            .split_whitespace()
            .map(|a| {
                a.replace("/etc/postern/", &etc)
                    .replace("/etc/postern", &etc)
            })
            .collect();
        let out = Command::new(crate::support::BIN)
            .arg("cert")
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "postern cert {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        certs += 1;
    }
    assert!(certs >= 4, "the walkthrough's cert commands were not found");

    let mut files = 0;
    for entry in std::fs::read_dir(repo.join("config/hosts")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().map_or(true, |e| e != "toml") {
            continue;
        }
        files += 1;
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            doc.contains(&format!("config/hosts/{name}")),
            "docs/hosts.md does not mention {name}"
        );
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/etc/postern/", &etc);
        let copy = dir.path().join(&name);
        std::fs::write(&copy, text).unwrap();
        let out = Command::new(crate::support::BIN)
            .args(["check", "--config"])
            .arg(&copy)
            .env("POSTERN_AGENT_TOKEN", "a-token")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "config/hosts/{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if name == "relay.toml" {
            for line in stdout.lines() {
                assert!(
                    doc.contains(line),
                    "the walkthrough's sample output lacks {line:?}"
                );
            }
        }
    }
    assert!(files >= 4, "config/hosts/ holds {files} configs");
}
