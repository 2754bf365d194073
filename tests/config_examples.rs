//! Every example config under `config/` (every `*.toml`; the Kubernetes manifests and systemd units
//! there are not postern configs) must load through the real conversion, and `postern check` must
//! reject a broken file naming the key that is wrong. The four reference examples (agent, server,
//! relay, gateway) must show every key of every table, their commented-out values must be the real
//! defaults, and `docs/configuration.md` must document every key in its table's section. The
//! tables and keys are read from `src/config/` itself (through `deny_unknown_fields`), so a new key
//! fails here until the examples and the reference show it.
//!
//! The examples point at `/etc/postern/...` certificates and read secrets from `env:` variables,
//! neither of which exists on a test machine. Each test therefore generates a real certificate
//! bundle in a temp dir, rewrites `/etc/postern/` in the file text to that dir, and sets every
//! variable an example references (once per process, before any test reads the environment).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use postern::config::{
    self, AgentConfig, AgentFile, GatewayRoleConfig, GatewayRoleFile, RegistryConfig,
    RelayRoleConfig, RelayRoleFile, Role, ServerConfig, ServerFile,
};
use postern::tls::Trust;

/// The directory the examples use for certificates and secret files.
const EXAMPLE_DIR: &str = "/etc/postern/";

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

/// The reference examples: one per role, each showing every key its file accepts.
const REFERENCE_EXAMPLES: [&str; 4] = ["agent.toml", "server.toml", "relay.toml", "gateway.toml"];

/// Every `*.toml` below `config/`, recursively, sorted. Other files there (Kubernetes manifests,
/// systemd units) are not postern configs and are left alone.
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

/// Agent and relay ids default to the host name's first label, lower-cased, which on some machines
/// is not a DNS label (it holds an underscore, say). That is a property of the machine, not of the
/// example, so on such a machine the rewritten copy gets an explicit id where the example leaves
/// it to the default.
fn pin_ids_if_hostname_unusable(text: String) -> String {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let label = hostname
        .split('.')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    let usable = label.is_empty() // the code then falls back to "postern"
        || (label.len() <= 63
            && !label.starts_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
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
    for expected in REFERENCE_EXAMPLES {
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
                // A relay alone publishes its routes for gateways elsewhere: with the memory
                // registry nobody would see them (the conversion does not refuse that, so the
                // examples must not show it).
                assert!(
                    matches!(relay.registry, RegistryConfig::Etcd { .. }),
                    "config/{name}: a standalone relay needs kind = \"etcd\""
                );
                assert!(
                    relay.relay.peer.is_some() && relay.peer.is_some(),
                    "config/{name}: gateways reach a standalone relay through its peer endpoint"
                );
                for cred in &relay.relay.agents {
                    assert!(!cred.allow.is_empty(), "{name}: {}", cred.name);
                }
            }
            Some(Role::Gateway) => {
                let raw: GatewayRoleFile = config::parse_toml(&text, &copy).unwrap();
                let gateway = GatewayRoleConfig::from_file(raw)
                    .unwrap_or_else(|e| panic!("config/{name}: {e}"));
                assert!(gateway.peer.identity.is_some(), "{name}");
                assert!(
                    matches!(gateway.registry, RegistryConfig::Etcd { .. }),
                    "config/{name}: a standalone gateway learns routes from etcd"
                );
                assert!(
                    gateway.gateway.socks5.is_some() || gateway.gateway.http.is_some(),
                    "config/{name}: a gateway without a front door serves nobody"
                );
                for user in &gateway.gateway.users {
                    assert!(!user.password.expose().is_empty(), "{name}: {}", user.name);
                }
            }
            // A file whose name tells no role was covered by `check`'s guess above.
            None => {}
        }
    }
}

/// A key no config table accepts, used to make `deny_unknown_fields` list the ones it does.
const UNKNOWN_KEY: &str = "zz_not_a_key";

/// The keys the table opened by `header` (`""` for the top level, `"[relay]"`, `"[[relay.agents]]"`)
/// accepts, read from the error `deny_unknown_fields` gives for an unknown one — so this follows
/// `src/config/` without being copied from it. `None` when `header` does not open a table of `T`
/// (the key holds a plain value, a list of values or an enum).
fn table_keys<T: serde::de::DeserializeOwned + std::fmt::Debug>(
    header: &str,
) -> Option<Vec<String>> {
    let probe = format!("{header}\n{UNKNOWN_KEY} = 1");
    let err = config::parse_toml::<T>(&probe, Path::new("probe"))
        .err()?
        .to_string();
    if !err.contains(&format!("unknown field `{UNKNOWN_KEY}`")) {
        return None;
    }
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
    Some(keys)
}

/// One table of a config file: how it is written (`"(top level)"`, `"[relay]"`,
/// `"[[relay.agents]]"`), its dotted path, and the keys it accepts.
#[derive(Debug)]
struct Table {
    label: String,
    path: String,
    keys: Vec<String>,
}

/// Every table a file of type `T` accepts, found by probing each key of each table for a nested
/// table (`[a.b]`) or array of tables (`[[a.b]]`) — so a table added to `src/config/` is covered
/// without touching this test.
fn tables_of<T: serde::de::DeserializeOwned + std::fmt::Debug>() -> Vec<Table> {
    let top = table_keys::<T>("").expect("the top level is a table");
    let mut pending = vec![Table {
        label: "(top level)".into(),
        path: String::new(),
        keys: top,
    }];
    let mut tables = Vec::new();
    while let Some(table) = pending.pop() {
        for key in &table.keys {
            let path = if table.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", table.path)
            };
            for label in [format!("[{path}]"), format!("[[{path}]]")] {
                if let Some(keys) = table_keys::<T>(&label) {
                    pending.push(Table {
                        label,
                        path: path.clone(),
                        keys,
                    });
                    break;
                }
            }
        }
        tables.push(table);
    }
    tables.sort_by(|a, b| a.label.cmp(&b.label));
    tables
}

/// `(reference example, its tables)` for the four roles.
fn reference_tables() -> Vec<(&'static str, Vec<Table>)> {
    vec![
        ("agent.toml", tables_of::<AgentFile>()),
        ("server.toml", tables_of::<ServerFile>()),
        ("relay.toml", tables_of::<RelayRoleFile>()),
        ("gateway.toml", tables_of::<GatewayRoleFile>()),
    ]
}

#[test]
fn table_discovery_finds_the_nested_tables() {
    // Guards the probing itself: if it stopped finding nested tables, the coverage tests below
    // would check next to nothing and still pass.
    let labels =
        |tables: Vec<Table>| -> Vec<String> { tables.into_iter().map(|t| t.label).collect() };
    let server = labels(tables_of::<ServerFile>());
    for expected in [
        "(top level)",
        "[relay]",
        "[relay.transport]",
        "[[relay.agents]]",
        "[gateway]",
        "[[gateway.users]]",
        "[[gateway.rules]]",
        "[peer]",
        "[peer.transport]",
        "[registry]",
        "[admin]",
    ] {
        assert!(
            server.iter().any(|l| l == expected),
            "{expected} not found in {server:?}"
        );
    }
    let agent = labels(tables_of::<AgentFile>());
    assert_eq!(agent, ["(top level)", "[admin]", "[transport]"]);
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
    let mut missing = Vec::new();
    for (file, tables) in reference_tables() {
        let text = std::fs::read_to_string(config_dir().join(file)).unwrap();
        for table in &tables {
            for key in &table.keys {
                if !mentions_key(&text, key) {
                    missing.push(format!("config/{file} {}: {key}", table.label));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "keys not shown in the examples: {missing:#?}"
    );
}

/// The part of `docs/configuration.md` that documents `table`: the section under its heading, up to
/// the next heading.
fn doc_section<'a>(doc: &'a str, file: &str, table: &Table) -> &'a str {
    let heading = match (file, table.label.as_str()) {
        ("agent.toml", "(top level)") => "## Agent file".to_string(),
        // The top level of the other files holds only tables: the overview names them.
        (_, "(top level)") => {
            let end = doc
                .find("\n## General rules")
                .expect("docs/configuration.md has a General rules section");
            return &doc[..end];
        }
        (_, label) if label.ends_with("transport]") => "## Transport tables".to_string(),
        (_, label) if label.starts_with("[[") => format!("### `{label}`"),
        (_, label) => format!("## `{label}`"),
    };
    let start = doc
        .lines()
        .position(|line| line.trim_end() == heading)
        .unwrap_or_else(|| panic!("docs/configuration.md has no heading {heading:?}"));
    let lines: Vec<&str> = doc.lines().collect();
    let from: usize = lines[..=start].iter().map(|l| l.len() + 1).sum();
    let len: usize = lines[start + 1..]
        .iter()
        .take_while(|l| !l.starts_with("## ") && !l.starts_with("### "))
        .map(|l| l.len() + 1)
        .sum();
    &doc[from..(from + len).min(doc.len())]
}

/// `docs/configuration.md` names every key of every table, in that table's section.
#[test]
fn configuration_reference_names_every_key() {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
    )
    .unwrap();
    let mut missing = Vec::new();
    for (file, tables) in reference_tables() {
        for table in &tables {
            let section = doc_section(&doc, file, table);
            for key in &table.keys {
                let named = section.contains(&format!("`{key}`"))
                    || section.contains(&format!("[{key}]"))
                    || section.contains(&format!(".{key}]"));
                if !named {
                    missing.push(format!("{} (in {file}): {key}", table.label));
                }
            }
        }
    }
    missing.dedup();
    assert!(
        missing.is_empty(),
        "keys docs/configuration.md does not document in their table's section: {missing:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The real binary.

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
    let child = command.spawn().expect("spawn postern");
    let pid = child.id();
    // A thread waits for the exit (reading both pipes meanwhile); this one waits for it.
    let (done, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match exited.recv_timeout(Duration::from_secs(60)) {
        Ok(output) => output.expect("wait for postern check"),
        Err(_) => {
            // Hung: kill it (the waiting thread then returns) so the test leaves nothing running.
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("postern check {} did not exit within 60s", path.display());
        }
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
    // Zero would tick an agent's liveness checks at a zero period (a panic); it is refused, and so
    // is an interval faster than relays let a tunnel ping.
    for (keep_alive, needle) in [("0s", "greater than 0"), ("100ms", "at least 250ms")] {
        let mut agent = example_table(&fixture, "agent.toml");
        let mut transport = toml::Table::new();
        transport.insert("keep_alive".into(), keep_alive.into());
        agent.insert("transport".into(), transport.into());
        assert_rejected(
            &fixture,
            &format!("keep-alive-{keep_alive}.toml"),
            &agent,
            &["transport.keep_alive", needle],
        );
    }

    // The tunnel transport keys: `postern check` names them.
    let mut server = example_table(&fixture, "server.toml");
    section(&mut server, "relay").insert("tcp_listen".into(), "nowhere".into());
    assert_rejected(
        &fixture,
        "tcp-listen.toml",
        &server,
        &["relay.tcp_listen", "nowhere"],
    );
    let mut agent = example_table(&fixture, "agent.toml");
    agent.insert("tunnel".into(), "udp".into());
    assert_rejected(&fixture, "tunnel.toml", &agent, &["tunnel", "\"udp\""]);
    let mut agent = example_table(&fixture, "agent.toml");
    agent.insert("quic_probe_interval".into(), "100ms".into());
    assert_rejected(
        &fixture,
        "probe.toml",
        &agent,
        &["quic_probe_interval", "at least 1s"],
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

    // A credential's quota of 0 would admit nothing: leaving it out means no bound.
    let mut relay = example_table(&fixture, "relay.toml");
    let credential = section(&mut relay, "relay")
        .get_mut("agents")
        .and_then(|a| a.as_array_mut())
        .and_then(|a| a.first_mut())
        .and_then(|c| c.as_table_mut())
        .expect("relay.toml has a credential");
    credential.insert("max_tunnels".into(), 0.into());
    assert_rejected(
        &fixture,
        "quota-zero.toml",
        &relay,
        &["relay.agents[0].max_tunnels", "at least 1"],
    );
}

// ---------------------------------------------------------------------------------------------
// What the comments in the reference examples promise.

/// Commented-out keys that show an example value, not the default.
const EXAMPLE_VALUES: &[&str] = &[
    "id", "pin", "cert", "key", "ips", "agent_ca", "clients", "name", "password", "ids", "ca",
    "username",
];

/// `text` with the commented-out `# key = value` lines whose key `keep` accepts put in force.
fn uncomment(text: &str, keep: impl Fn(&str) -> bool) -> String {
    text.lines()
        .map(|line| {
            let assignment = line.strip_prefix("# ").and_then(|rest| {
                let (key, _) = rest.split_once(" = ")?;
                let is_key =
                    !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
                (is_key && keep(key)).then_some(rest)
            });
            assignment.unwrap_or(line).to_string() + "\n"
        })
        .collect()
}

/// The converted config at `path`, as `role`, in its `Debug` form (secrets and keys redacted).
fn converted(path: &Path, role: Role) -> String {
    let result = match role {
        Role::Agent => AgentConfig::load(path).map(|c| format!("{c:?}")),
        Role::Server => ServerConfig::load(path).map(|c| format!("{c:?}")),
        Role::Relay => RelayRoleConfig::load(path).map(|c| format!("{c:?}")),
        Role::Gateway => GatewayRoleConfig::load(path).map(|c| format!("{c:?}")),
    };
    result.unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()))
}

/// "Commented-out keys show their default value": putting them all in force changes nothing.
#[test]
fn commented_out_defaults_are_the_defaults() {
    let fixture = Fixture::new();
    for name in REFERENCE_EXAMPLES {
        let path = config_dir().join(name);
        let role = role_by_name(&path).expect("reference examples are named after their role");
        let text = std::fs::read_to_string(&path).unwrap();
        let as_shipped = fixture.rewritten_copy(&path);
        let with_defaults = fixture.write(
            &format!("defaults-{name}"),
            &fixture.rewrite(&uncomment(&text, |key| !EXAMPLE_VALUES.contains(&key))),
        );
        let (shipped, defaults) = (
            converted(&as_shipped, role),
            converted(&with_defaults, role),
        );
        if let Some(at) = shipped
            .bytes()
            .zip(defaults.bytes())
            .position(|(a, b)| a != b)
            .or((shipped.len() != defaults.len()).then(|| shipped.len().min(defaults.len())))
        {
            let context = |s: &str| {
                let bytes = &s.as_bytes()[at.saturating_sub(120)..(at + 60).min(s.len())];
                String::from_utf8_lossy(bytes).into_owned()
            };
            panic!(
                "config/{name}: a commented-out value is not the default.\n as shipped:         …{}…\n with them in force: …{}…",
                context(&shipped),
                context(&defaults)
            );
        }
    }
}

/// The commented-out agent certificate works in place of the token, and the commented-out
/// `agent_ca` of the server example loads.
#[test]
fn commented_out_certificate_credentials_load() {
    let fixture = Fixture::new();

    let text = std::fs::read_to_string(config_dir().join("agent.toml")).unwrap();
    let with_cert: String = uncomment(&text, |key| key == "cert" || key == "key")
        .lines()
        .filter(|line| !line.starts_with("token ="))
        .map(|line| format!("{line}\n"))
        .collect();
    assert!(
        with_cert.contains("\ncert = "),
        "agent.toml shows `# cert = …`"
    );
    let path = fixture.write("agent-with-cert.toml", &fixture.rewrite(&with_cert));
    let agent = AgentConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(agent.identity.is_some());
    assert!(agent.token.expose().is_empty());

    let text = std::fs::read_to_string(config_dir().join("server.toml")).unwrap();
    let with_ca = uncomment(&text, |key| key == "agent_ca");
    assert!(
        with_ca.contains("\nagent_ca = "),
        "server.toml shows `# agent_ca = …`"
    );
    let path = fixture.write("server-with-agent-ca.toml", &fixture.rewrite(&with_ca));
    let server = ServerConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(server.relay.agent_ca.is_some_and(|roots| !roots.is_empty()));
}

/// The admin listener's defaults, as the examples' comments give them.
#[test]
fn admin_listener_defaults() {
    let fixture = Fixture::new();
    let agent = AgentConfig::load(&fixture.rewritten_copy(&config_dir().join("agent.toml")))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(agent.admin, Some(config::AGENT_ADMIN_DEFAULT));
    assert_eq!(agent.admin.unwrap().to_string(), "127.0.0.1:9181");
    let server = ServerConfig::load(&fixture.rewritten_copy(&config_dir().join("server.toml")))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(server.admin, Some(config::ADMIN_DEFAULT));
    assert_eq!(server.admin.unwrap().to_string(), "127.0.0.1:9180");

    let mut server = example_table(&fixture, "server.toml");
    let mut admin = toml::Table::new();
    admin.insert("listen".into(), "off".into());
    server.insert("admin".into(), admin.into());
    let path = fixture.write("admin-off.toml", &toml::to_string(&server).unwrap());
    assert_eq!(ServerConfig::load(&path).unwrap().admin, None);
}

/// The `[n]`th table of the array of tables `[[gateway.<name>]]`.
fn gateway_entry<'a>(table: &'a mut toml::Table, name: &str, n: usize) -> &'a mut toml::Table {
    section(table, "gateway")
        .get_mut(name)
        .and_then(|v| v.as_array_mut())
        .and_then(|a| a.get_mut(n))
        .and_then(|v| v.as_table_mut())
        .unwrap_or_else(|| panic!("example has no [[gateway.{name}]] #{n}"))
}

#[test]
fn check_binary_names_gateway_errors() {
    let fixture = Fixture::new();

    let mut gateway = example_table(&fixture, "gateway.toml");
    let socks5 = section(&mut gateway, "gateway")
        .get("socks5")
        .cloned()
        .expect("gateway.toml sets socks5");
    section(&mut gateway, "gateway").insert("http".into(), socks5);
    assert_rejected(
        &fixture,
        "same-front-door.toml",
        &gateway,
        &["gateway.http"],
    );

    let mut gateway = example_table(&fixture, "gateway.toml");
    section(&mut gateway, "gateway").insert("max_header_bytes".into(), "4KiB".into());
    assert_rejected(
        &fixture,
        "small-header-limit.toml",
        &gateway,
        &["gateway.max_header_bytes"],
    );

    let mut gateway = example_table(&fixture, "gateway.toml");
    section(&mut gateway, "gateway").insert("max_connections_per_client".into(), 0.into());
    assert_rejected(
        &fixture,
        "zero-per-client.toml",
        &gateway,
        &["gateway.max_connections_per_client"],
    );

    let mut gateway = example_table(&fixture, "gateway.toml");
    gateway_entry(&mut gateway, "rules", 0)
        .insert("users".into(), toml::Value::Array(vec!["nobody".into()]));
    assert_rejected(
        &fixture,
        "rule-unknown-user.toml",
        &gateway,
        &["gateway.rules[0].users", "nobody"],
    );

    let mut gateway = example_table(&fixture, "gateway.toml");
    gateway_entry(&mut gateway, "rules", 1)
        .insert("ports".into(), toml::Value::Array(vec!["9100-80".into()]));
    assert_rejected(
        &fixture,
        "rule-reversed-ports.toml",
        &gateway,
        &["gateway.rules[1].ports"],
    );

    let mut gateway = example_table(&fixture, "gateway.toml");
    let first = gateway_entry(&mut gateway, "users", 0)
        .get("name")
        .cloned()
        .expect("gateway.toml names its first user");
    gateway_entry(&mut gateway, "users", 1).insert("name".into(), first);
    assert_rejected(
        &fixture,
        "duplicate-user.toml",
        &gateway,
        &["gateway.users[1].name"],
    );

    let mut gateway = example_table(&fixture, "gateway.toml");
    gateway_entry(&mut gateway, "users", 0).insert("name".into(), "alice@default".into());
    assert_rejected(
        &fixture,
        "user-with-at.toml",
        &gateway,
        &["gateway.users[0].name"],
    );

    let mut gateway = example_table(&fixture, "gateway.toml");
    section(&mut gateway, "registry").insert("kind".into(), "memory".into());
    section(&mut gateway, "registry").remove("endpoints");
    assert_rejected(
        &fixture,
        "gateway-memory.toml",
        &gateway,
        &["registry.kind"],
    );

    let mut gateway = example_table(&fixture, "gateway.toml");
    section(&mut gateway, "peer").remove("cert");
    section(&mut gateway, "peer").remove("key");
    assert_rejected(
        &fixture,
        "gateway-no-peer-cert.toml",
        &gateway,
        &["peer.cert"],
    );

    let mut gateway = example_table(&fixture, "gateway.toml");
    let mut admin = toml::Table::new();
    admin.insert("listen".into(), "localhost:9180".into());
    gateway.insert("admin".into(), admin.into());
    assert_rejected(
        &fixture,
        "admin-host-name.toml",
        &gateway,
        &["admin.listen"],
    );
}

#[test]
fn check_binary_names_agent_certificate_errors() {
    let fixture = Fixture::new();
    let dir = fixture.dir.path();

    let mut agent = example_table(&fixture, "agent.toml");
    agent.remove("token");
    agent.insert(
        "cert".into(),
        dir.join("agent.pem").display().to_string().into(),
    );
    assert_rejected(&fixture, "agent-cert-no-key.toml", &agent, &["cert"]);

    // A key that is not the certificate's fails at `check`, not at the first handshake.
    agent.insert(
        "key".into(),
        dir.join("relay-key.pem").display().to_string().into(),
    );
    assert_rejected(
        &fixture,
        "agent-cert-wrong-key.toml",
        &agent,
        &["key", "does not belong"],
    );

    let mut relay = example_table(&fixture, "relay.toml");
    section(&mut relay, "relay").insert(
        "agent_ca".into(),
        dir.join("no-such-ca.pem").display().to_string().into(),
    );
    assert_rejected(
        &fixture,
        "relay-missing-agent-ca.toml",
        &relay,
        &["relay.agent_ca"],
    );

    let mut relay = example_table(&fixture, "relay.toml");
    section(&mut relay, "relay").insert("id".into(), "Relay.1".into());
    assert_rejected(&fixture, "relay-bad-id.toml", &relay, &["relay.id"]);

    let mut relay = example_table(&fixture, "relay.toml");
    section(&mut relay, "relay").insert("max_tunnels".into(), 0.into());
    assert_rejected(
        &fixture,
        "relay-no-tunnels.toml",
        &relay,
        &["relay.max_tunnels", "at least 1"],
    );
}
