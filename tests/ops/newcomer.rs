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
