//! Every example config under `config/` must load through the real conversion, and `postern check`
//! must reject a broken file naming the key that is wrong.
//!
//! The examples point at `/etc/postern/...` certificates and read secrets from `env:` variables,
//! neither of which exists on a test machine. Each test therefore generates a real certificate
//! bundle in a temp dir, rewrites `/etc/postern/` in the file text to that dir, and sets every
//! variable an example references (once per process, before any test reads the environment).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use postern::config::{
    self, AgentConfig, AgentFile, GatewayRoleConfig, GatewayRoleFile, RelayRoleConfig,
    RelayRoleFile, Role, ServerConfig, ServerFile,
};
use postern::tls::Trust;

/// The directory the examples use for certificates and secret files.
const EXAMPLE_DIR: &str = "/etc/postern/";

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

/// Every `*.toml` below `config/`, recursively, sorted.
fn example_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|ext| ext == "toml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&config_dir(), &mut files);
    files.sort();
    assert!(
        !files.is_empty(),
        "no *.toml found under {}",
        config_dir().display()
    );
    files
}

/// The role a file is for, told by its name; `None` lets `check` guess from the keys.
fn role_by_name(path: &Path) -> Option<Role> {
    let name = path.file_name()?.to_str()?;
    if name.contains("agent") {
        Some(Role::Agent)
    } else if name.contains("server") {
        Some(Role::Server)
    } else if name.contains("relay") {
        Some(Role::Relay)
    } else if name.contains("gateway") {
        Some(Role::Gateway)
    } else {
        None
    }
}

/// The names in `"env:NAME"` / `"file:/etc/postern/NAME"` references, commented-out ones included.
fn references(text: &str, prefix: &str) -> BTreeSet<String> {
    text.match_indices(prefix)
        .map(|(at, _)| {
            text[at + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                .collect::<String>()
        })
        .filter(|name| !name.is_empty())
        .collect()
}

/// A non-empty test value for each environment variable the examples read.
fn secret_value(var: &str) -> String {
    format!("test-secret-for-{}", var.to_ascii_lowercase())
}

/// The keys whose `env:` value must be an address rather than a secret.
const ADDRESS_KEYS: &[&str] = &["peer_advertise"];
/// What such a variable is set to (TEST-NET-1, never routed).
const TEST_ADDRESS: &str = "192.0.2.10";

/// `(variable, value)` for every `key = "env:NAME"` in `text`, commented-out lines included.
fn env_assignments(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let key = line
            .trim_start()
            .trim_start_matches('#')
            .split('=')
            .next()
            .unwrap_or("")
            .trim();
        for var in references(line, "\"env:") {
            let value = if ADDRESS_KEYS.contains(&key) {
                TEST_ADDRESS.to_string()
            } else {
                secret_value(&var)
            };
            out.push((var, value));
        }
    }
    out
}

/// Sets every `env:` variable any example references, exactly once: `set_var` must not race with
/// another test reading the environment, so every test calls this before doing anything else.
fn prepare_process() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        postern::tls::install_crypto_provider();
        for file in example_files() {
            let text = std::fs::read_to_string(&file).unwrap();
            for (var, value) in env_assignments(&text) {
                std::env::set_var(&var, value);
            }
        }
    });
}

/// A temp dir holding what the examples expect in `/etc/postern/`: a CA, relay, peer and agent
/// certificates from `postern::cert`, and a file for every `file:` secret the examples name.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        prepare_process();
        let dir = tempfile::Builder::new()
            .prefix("postern-config-examples-")
            .tempdir()
            .unwrap();
        let bundle = postern::cert::generate_bundle(dir.path(), "localhost").unwrap();
        let (ca, ca_key) = (
            std::fs::read_to_string(&bundle.ca).unwrap(),
            std::fs::read_to_string(&bundle.ca_key).unwrap(),
        );
        let (agent, agent_key) = postern::cert::issue(
            &ca,
            &ca_key,
            postern::cert::Kind::Agent,
            "agent",
            &[],
            &["10.1.2.3".parse().unwrap()],
            postern::cert::DEFAULT_DAYS,
        )
        .unwrap();
        postern::cert::write_pair(dir.path(), "agent", &agent, &agent_key).unwrap();
        for file in example_files() {
            let text = std::fs::read_to_string(&file).unwrap();
            for name in references(&text, &format!("\"file:{EXAMPLE_DIR}")) {
                std::fs::write(dir.path().join(&name), format!("secret-in-{name}\n")).unwrap();
            }
        }
        let shown = dir.path().display().to_string();
        assert!(
            !shown.contains(['"', '\\']),
            "temp dir {shown} cannot go into a TOML string as is"
        );
        Fixture { dir }
    }

    /// `text` with every `/etc/postern/` path moved into the fixture dir.
    fn rewrite(&self, text: &str) -> String {
        let text = text.replace(EXAMPLE_DIR, &format!("{}/", self.dir.path().display()));
        pin_ids_if_hostname_unusable(text)
    }

    /// The example at `path`, rewritten and written into the fixture dir.
    fn rewritten_copy(&self, path: &Path) -> PathBuf {
        let text = self.rewrite(&std::fs::read_to_string(path).unwrap());
        self.write(&relative(path).replace('/', "__"), &text)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let out = self.dir.path().join(name);
        std::fs::write(&out, text).unwrap();
        out
    }
}

fn relative(path: &Path) -> String {
    path.strip_prefix(config_dir())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Agent and relay ids default to the host name, which on some machines is not a DNS label (an
/// FQDN, say). That is a property of the machine, not of the example, so on such a machine the
/// rewritten copy gets an explicit id where the example leaves it to the default.
fn pin_ids_if_hostname_unusable(text: String) -> String {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let usable = hostname.is_empty() // the code then falls back to "postern"
        || (hostname.len() <= 63
            && !hostname.starts_with('-')
            && hostname.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if usable {
        return text;
    }
    let mut table: toml::Table = toml::from_str(&text).unwrap();
    if table.contains_key("relays") {
        table.entry("id").or_insert_with(|| "test-host".into());
    }
    if let Some(toml::Value::Table(relay)) = table.get_mut("relay") {
        relay.entry("id").or_insert_with(|| "test-host".into());
    }
    toml::to_string(&table).unwrap()
}

#[test]
fn config_dir_holds_the_reference_examples() {
    let files: Vec<String> = example_files().iter().map(|p| relative(p)).collect();
    for expected in ["agent.toml", "server.toml"] {
        assert!(
            files.iter().any(|f| f == expected),
            "config/{expected} is missing (found {files:?})"
        );
    }
}

/// Every example converts through `check` (by file-name role and by `check`'s own guess) and
/// through `parse_toml` + `from_file`.
#[test]
fn every_example_config_loads() {
    let fixture = Fixture::new();
    for file in example_files() {
        let name = relative(&file);
        let copy = fixture.rewritten_copy(&file);
        let role = role_by_name(&file);
        let summary = config::check(&copy, role)
            .unwrap_or_else(|e| panic!("config/{name} does not load as {role:?}: {e}"));
        assert!(summary.contains("config OK"), "{name}: {summary}");
        let guessed = config::check(&copy, None)
            .unwrap_or_else(|e| panic!("config/{name}: check's role guess fails: {e}"));
        assert_eq!(
            guessed, summary,
            "config/{name}: check guesses another role than the file name says"
        );

        let text = std::fs::read_to_string(&copy).unwrap();
        match role {
            Some(Role::Agent) => {
                let raw: AgentFile = config::parse_toml(&text, &copy).unwrap();
                let agent =
                    AgentConfig::from_file(raw).unwrap_or_else(|e| panic!("config/{name}: {e}"));
                assert!(!agent.relays.is_empty(), "{name}");
                assert!(!agent.ports.is_empty(), "{name}");
                assert!(
                    matches!(&agent.trust, Trust::Ca(roots) if !roots.is_empty())
                        || matches!(agent.trust, Trust::Pin(_)),
                    "{name}"
                );
                let table: toml::Table = toml::from_str(&text).unwrap();
                let token = table.get("token").and_then(|t| t.as_str()).unwrap_or("");
                if let Some(var) = token.strip_prefix("env:") {
                    assert_eq!(agent.token.expose(), secret_value(var), "{name}");
                }
            }
            Some(Role::Server) => {
                let raw: ServerFile = config::parse_toml(&text, &copy).unwrap();
                let server =
                    ServerConfig::from_file(raw).unwrap_or_else(|e| panic!("config/{name}: {e}"));
                assert!(!server.relay.identity.chain.is_empty(), "{name}");
                for cred in &server.relay.agents {
                    assert!(!cred.allow.is_empty(), "{name}: {}", cred.name);
                }
                for user in &server.gateway.users {
                    assert!(!user.password.expose().is_empty(), "{name}: {}", user.name);
                }
            }
            Some(Role::Relay) => {
                let raw: RelayRoleFile = config::parse_toml(&text, &copy).unwrap();
                let relay = RelayRoleConfig::from_file(raw)
                    .unwrap_or_else(|e| panic!("config/{name}: {e}"));
                assert!(!relay.relay.identity.chain.is_empty(), "{name}");
            }
            Some(Role::Gateway) => {
                let raw: GatewayRoleFile = config::parse_toml(&text, &copy).unwrap();
                let gateway = GatewayRoleConfig::from_file(raw)
                    .unwrap_or_else(|e| panic!("config/{name}: {e}"));
                assert!(gateway.peer.identity.is_some(), "{name}");
            }
            // A file whose name tells no role was covered by `check`'s guess above.
            None => {}
        }
    }
}

/// The keys a config table accepts, read from the error `deny_unknown_fields` gives for an unknown
/// one — so this list follows `config.rs` without being copied from it.
fn accepted_keys<T: serde::de::DeserializeOwned + std::fmt::Debug>(probe: &str) -> Vec<String> {
    let err = config::parse_toml::<T>(probe, Path::new("probe"))
        .expect_err("the probe holds an unknown key")
        .to_string();
    let expected = err
        .split_once("expected")
        .unwrap_or_else(|| panic!("no field list in {err:?}"))
        .1;
    let keys: Vec<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    assert!(!keys.is_empty(), "no field list in {err:?}");
    keys
}

/// Whether `key` appears as `key = …` (set or commented out) or as a `[….key]` table header.
fn mentions_key(text: &str, key: &str) -> bool {
    text.lines().any(|line| {
        let line = line.trim_start().trim_start_matches('#').trim();
        let assigned = line
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='));
        let header = line.starts_with('[')
            && line
                .trim_matches(|c| c == '[' || c == ']')
                .rsplit('.')
                .next()
                == Some(key);
        assigned || header
    })
}

/// The reference examples list every key of every table (set, or commented out with its default).
#[test]
fn reference_examples_cover_every_key() {
    let agent = std::fs::read_to_string(config_dir().join("agent.toml")).unwrap();
    let server = std::fs::read_to_string(config_dir().join("server.toml")).unwrap();
    const UNKNOWN: &str = "zz_not_a_key = 1";
    let tables: Vec<(&str, &str, Vec<String>)> = vec![
        (
            "agent.toml",
            "(top level)",
            accepted_keys::<AgentFile>(UNKNOWN),
        ),
        (
            "agent.toml",
            "[transport]",
            accepted_keys::<AgentFile>(&format!("[transport]\n{UNKNOWN}")),
        ),
        (
            "server.toml",
            "(top level)",
            accepted_keys::<ServerFile>(UNKNOWN),
        ),
        (
            "server.toml",
            "[relay]",
            accepted_keys::<ServerFile>(&format!("[relay]\n{UNKNOWN}")),
        ),
        (
            "server.toml",
            "[relay.transport]",
            accepted_keys::<ServerFile>(&format!("[relay.transport]\n{UNKNOWN}")),
        ),
        (
            "server.toml",
            "[[relay.agents]]",
            accepted_keys::<ServerFile>(&format!("[[relay.agents]]\n{UNKNOWN}")),
        ),
        (
            "server.toml",
            "[gateway]",
            accepted_keys::<ServerFile>(&format!("[gateway]\n{UNKNOWN}")),
        ),
        (
            "server.toml",
            "[[gateway.users]]",
            accepted_keys::<ServerFile>(&format!("[[gateway.users]]\n{UNKNOWN}")),
        ),
        (
            "server.toml",
            "[peer]",
            accepted_keys::<ServerFile>(&format!("[peer]\n{UNKNOWN}")),
        ),
        (
            "server.toml",
            "[peer.transport]",
            accepted_keys::<ServerFile>(&format!("[peer.transport]\n{UNKNOWN}")),
        ),
        (
            "server.toml",
            "[registry]",
            accepted_keys::<ServerFile>(&format!("[registry]\n{UNKNOWN}")),
        ),
    ];
    let mut missing = Vec::new();
    for (file, table, keys) in &tables {
        let text = if *file == "agent.toml" {
            &agent
        } else {
            &server
        };
        for key in keys {
            if !mentions_key(text, key) {
                missing.push(format!("config/{file} {table}: {key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "keys not shown in the examples: {missing:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The real binary.

/// Kills the child on drop, so a failing or hanging test leaves nothing running.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `postern check --config <path>` with `extra_env` set and `unset` removed; waits at most 60s.
fn run_check(path: &Path, unset: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_postern"));
    command
        .args(["check", "--config"])
        .arg(path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in unset {
        command.env_remove(var);
    }
    let mut guard = ChildGuard(Some(command.spawn().expect("spawn postern")));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let child = guard.0.as_mut().unwrap();
        if child.try_wait().unwrap().is_some() {
            return guard.0.take().unwrap().wait_with_output().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "postern check {} did not exit within 60s",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `config/<name>`, rewritten, as a TOML table to break.
fn example_table(fixture: &Fixture, name: &str) -> toml::Table {
    let text = std::fs::read_to_string(config_dir().join(name)).unwrap();
    toml::from_str(&fixture.rewrite(&text)).unwrap()
}

fn section<'a>(table: &'a mut toml::Table, name: &str) -> &'a mut toml::Table {
    match table.get_mut(name) {
        Some(toml::Value::Table(t)) => t,
        _ => panic!("example has no [{name}] table"),
    }
}

/// Asserts `postern check` rejects `table` with a message naming every one of `needles`.
fn assert_rejected(fixture: &Fixture, file: &str, table: &toml::Table, needles: &[&str]) {
    assert_rejected_without(fixture, file, table, needles, &[]);
}

fn assert_rejected_without(
    fixture: &Fixture,
    file: &str,
    table: &toml::Table,
    needles: &[&str],
    unset: &[&str],
) {
    let path = fixture.write(file, &toml::to_string(table).unwrap());
    let out = run_check(&path, unset);
    let err = stderr(&out);
    assert!(
        !out.status.success(),
        "postern check accepted {file}; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for needle in needles {
        assert!(
            err.contains(needle),
            "postern check's message for {file} does not mention {needle:?}:\n{err}"
        );
    }
}

#[test]
fn check_binary_accepts_every_rewritten_example() {
    let fixture = Fixture::new();
    for file in example_files() {
        let copy = fixture.rewritten_copy(&file);
        let out = run_check(&copy, &[]);
        assert!(
            out.status.success(),
            "postern check rejected config/{}:\n{}",
            relative(&file),
            stderr(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("config OK"), "{stdout}");
    }
}

#[test]
fn check_binary_names_an_unknown_key() {
    let fixture = Fixture::new();
    let mut server = example_table(&fixture, "server.toml");
    let relay = section(&mut server, "relay");
    let listen = relay
        .remove("listen")
        .expect("server.toml sets relay.listen");
    relay.insert("listne".into(), listen);
    assert_rejected(&fixture, "unknown-key.toml", &server, &["listne"]);

    let mut agent = example_table(&fixture, "agent.toml");
    agent.insert("redundnacy".into(), 2.into());
    assert_rejected(&fixture, "unknown-agent-key.toml", &agent, &["redundnacy"]);
}

#[test]
fn check_binary_names_a_bad_duration_or_size() {
    let fixture = Fixture::new();
    let mut server = example_table(&fixture, "server.toml");
    section(&mut server, "relay").insert("drain_grace".into(), "30 parsecs".into());
    assert_rejected(
        &fixture,
        "bad-duration.toml",
        &server,
        &["drain_grace", "parsecs"],
    );

    let mut agent = example_table(&fixture, "agent.toml");
    agent.insert("reconnect_max".into(), "soon".into());
    assert_rejected(
        &fixture,
        "bad-agent-duration.toml",
        &agent,
        &["reconnect_max"],
    );

    let mut agent = example_table(&fixture, "agent.toml");
    section(&mut agent, "transport").insert("stream_window".into(), "lots".into());
    assert_rejected(&fixture, "bad-size.toml", &agent, &["stream_window"]);
}

#[test]
fn check_binary_names_a_missing_token_variable() {
    const UNSET: &str = "POSTERN_TEST_TOKEN_THAT_IS_NOT_SET";
    let fixture = Fixture::new();
    let mut agent = example_table(&fixture, "agent.toml");
    agent.insert("token".into(), format!("env:{UNSET}").into());
    assert_rejected_without(
        &fixture,
        "missing-token-env.toml",
        &agent,
        &["token", UNSET],
        &[UNSET],
    );

    let mut agent = example_table(&fixture, "agent.toml");
    agent.remove("token");
    assert_rejected(&fixture, "no-token.toml", &agent, &["token"]);

    let mut server = example_table(&fixture, "server.toml");
    section(&mut server, "relay").insert("peer_advertise".into(), format!("env:{UNSET}").into());
    assert_rejected_without(
        &fixture,
        "missing-advertise-env.toml",
        &server,
        &["relay.peer_advertise", UNSET],
        &[UNSET],
    );
}

#[test]
fn check_binary_names_semantic_errors() {
    let fixture = Fixture::new();

    let mut server = example_table(&fixture, "server.toml");
    let transport = server
        .get_mut("relay")
        .and_then(|r| r.as_table_mut())
        .unwrap()
        .entry("transport")
        .or_insert_with(|| toml::Table::new().into());
    let transport = transport.as_table_mut().unwrap();
    transport.insert("idle_timeout".into(), "5s".into());
    transport.insert("keep_alive".into(), "10s".into());
    assert_rejected(
        &fixture,
        "keep-alive.toml",
        &server,
        &["relay.transport.keep_alive"],
    );

    let mut server = example_table(&fixture, "server.toml");
    section(&mut server, "registry").insert("kind".into(), "etcd".into());
    section(&mut server, "relay").remove("peer_listen");
    section(&mut server, "relay").remove("peer_advertise");
    assert_rejected(
        &fixture,
        "etcd-no-peer.toml",
        &server,
        &["relay.peer_listen"],
    );

    let mut server = example_table(&fixture, "server.toml");
    let relay = section(&mut server, "relay");
    relay.insert("peer_listen".into(), "0.0.0.0:4434".into());
    relay.remove("peer_advertise");
    assert_rejected(
        &fixture,
        "wildcard-peer.toml",
        &server,
        &["relay.peer_advertise"],
    );

    let mut server = example_table(&fixture, "server.toml");
    section(&mut server, "registry").insert("kind".into(), "memory".into());
    assert_rejected(
        &fixture,
        "memory-endpoints.toml",
        &server,
        &["registry.endpoints"],
    );

    let mut agent = example_table(&fixture, "agent.toml");
    agent.insert("pin".into(), "00".repeat(32).into());
    assert_rejected(&fixture, "ca-and-pin.toml", &agent, &["pin"]);

    let mut agent = example_table(&fixture, "agent.toml");
    agent.insert("ports".into(), toml::Value::Array(vec!["90-80".into()]));
    assert_rejected(&fixture, "reversed-ports.toml", &agent, &["ports"]);
}
