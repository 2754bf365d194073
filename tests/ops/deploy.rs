//! f. The deployment files agree with each other and with the real binary: every YAML document
//! under `config/kubernetes/` parses; Services, probes and volumes point at ports, ConfigMaps and
//! Secrets that exist; the TOML configs embedded in ConfigMaps load through the real config structs
//! and through `postern check` (with generated certificates at the paths the Secrets are mounted
//! on and the environment the containers get); their listen ports are the container ports; the
//! termination grace covers the drain. The systemd unit and the Containerfile are checked against
//! the same facts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::support::BIN;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A YAML node as JSON, which is easier to walk.
fn to_json(y: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match y {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::Real(r) => Value::from(r.parse::<f64>().expect("a YAML real")),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        other => format!("{:?}", to_json(other)),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        other => panic!("unsupported YAML node {other:?}"),
    }
}

/// One document of one file.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }

    fn what(&self) -> String {
        format!("{} {} ({})", self.kind(), self.name(), self.file)
    }
}

fn yaml_files() -> Vec<PathBuf> {
    let dir = repo().join("config/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML under {}", dir.display());
    files
}

fn docs() -> Vec<Doc> {
    let mut out = Vec::new();
    for path in yaml_files() {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed = yaml_rust2::YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{name} does not parse as YAML: {e}"));
        let before = out.len();
        for y in parsed.iter().filter(|y| !y.is_null()) {
            out.push(Doc {
                file: name.clone(),
                value: to_json(y),
            });
        }
        assert!(out.len() > before, "{name} holds no YAML document");
    }
    out
}

/// Every document parses and is a well-formed object; names are unique; one namespace; the
/// kustomization lists files that exist (and leaves the placeholder Secrets out).
#[test]
fn kubernetes_yaml_parses() {
    let docs = docs();
    let mut seen = BTreeSet::new();
    for d in &docs {
        assert!(
            d.value["apiVersion"].is_string(),
            "{}: no apiVersion",
            d.file
        );
        assert!(!d.kind().is_empty(), "{}: no kind", d.file);
        if d.kind() == "Kustomization" {
            for r in d.value["resources"].as_array().expect("resources") {
                let r = r.as_str().unwrap();
                assert!(
                    repo().join("config/kubernetes").join(r).is_file(),
                    "kustomization lists {r}, which does not exist"
                );
                assert_ne!(r, "secrets.yaml", "placeholder Secrets must not be applied");
            }
            continue;
        }
        assert!(
            !d.name().is_empty(),
            "{}: a {} without a name",
            d.file,
            d.kind()
        );
        assert!(
            seen.insert((d.kind().to_string(), d.name().to_string())),
            "{} defined twice",
            d.what()
        );
        if d.kind() != "Namespace" {
            assert_eq!(
                d.value["metadata"]["namespace"],
                "postern",
                "{} is not in the postern namespace",
                d.what()
            );
        }
    }
    for kind in [
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "DaemonSet",
        "StatefulSet",
        "Service",
    ] {
        assert!(
            docs.iter().any(|d| d.kind() == kind),
            "no {kind} under config/kubernetes"
        );
    }
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> Option<&'a Doc> {
    docs.iter().find(|d| d.kind() == kind && d.name() == name)
}

/// The keys a ConfigMap or Secret holds.
fn keys(doc: &Doc) -> BTreeSet<String> {
    ["data", "stringData"]
        .iter()
        .filter_map(|k| doc.value[k].as_object())
        .flat_map(|m| m.keys().cloned())
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let Some(sel) = selector.as_object() else {
        return false;
    };
    !sel.is_empty() && sel.iter().all(|(k, v)| labels[k] == *v)
}

/// A port a container declares: (number, protocol).
fn container_ports(container: &Value) -> BTreeMap<String, (u16, String)> {
    container["ports"]
        .as_array()
        .map(|ports| {
            ports
                .iter()
                .map(|p| {
                    let number = p["containerPort"].as_u64().expect("containerPort") as u16;
                    let protocol = p["protocol"].as_str().unwrap_or("TCP").to_string();
                    let name = p["name"]
                        .as_str()
                        .map_or_else(|| number.to_string(), String::from);
                    (name, (number, protocol))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A port reference (name or number) resolved against a pod's containers.
fn resolve_port(containers: &[Value], port: &Value) -> Option<(u16, String)> {
    containers.iter().find_map(|c| {
        let ports = container_ports(c);
        match port {
            Value::String(name) => ports.get(name).cloned(),
            Value::Number(n) => ports
                .values()
                .find(|(p, _)| Some(u64::from(*p)) == n.as_u64())
                .cloned(),
            _ => None,
        }
    })
}

const WORKLOADS: [&str; 3] = ["Deployment", "DaemonSet", "StatefulSet"];

/// Cross-checks every workload, Service, ConfigMap and Secret reference, and loads the embedded
/// postern configs for real.
#[test]
fn kubernetes_manifests_agree_with_each_other_and_the_config_schema() {
    let docs = docs();
    let work = tempfile::tempdir().unwrap();
    let pki = postern::cert::generate_bundle(work.path(), "postern-relay").unwrap();
    let mut postern_containers = 0;
    let mut images = BTreeSet::new();

    for w in docs.iter().filter(|d| WORKLOADS.contains(&d.kind())) {
        let pod = &w.value["spec"]["template"];
        let spec = &pod["spec"];
        assert!(
            labels_match(
                &w.value["spec"]["selector"]["matchLabels"],
                &pod["metadata"]["labels"]
            ),
            "{}: selector does not match the pod labels",
            w.what()
        );
        let volumes: BTreeMap<String, Value> = spec["volumes"]
            .as_array()
            .map(|vs| {
                vs.iter()
                    .map(|v| (v["name"].as_str().unwrap().to_string(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let claims: BTreeSet<String> = w.value["spec"]["volumeClaimTemplates"]
            .as_array()
            .map(|c| {
                c.iter()
                    .map(|t| t["metadata"]["name"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        // Volumes name ConfigMaps / Secrets that exist, with the keys they pick.
        for (name, v) in &volumes {
            let (kind, target) = if let Some(n) = v["configMap"]["name"].as_str() {
                ("ConfigMap", n)
            } else if let Some(n) = v["secret"]["secretName"].as_str() {
                ("Secret", n)
            } else {
                assert!(
                    v["emptyDir"].is_object(),
                    "{}: volume {name} of an unchecked type",
                    w.what()
                );
                continue;
            };
            let source = find(&docs, kind, target)
                .unwrap_or_else(|| panic!("{}: volume {name} needs {kind} {target}", w.what()));
            let source_key = if kind == "ConfigMap" {
                "configMap"
            } else {
                "secret"
            };
            for item in v[source_key]["items"].as_array().into_iter().flatten() {
                let key = item["key"].as_str().unwrap();
                assert!(
                    keys(source).contains(key),
                    "{}: volume {name} picks {key}, which {kind} {target} lacks",
                    w.what()
                );
            }
        }
        let containers: Vec<Value> = spec["containers"].as_array().unwrap().clone();
        for c in &containers {
            let cname = c["name"].as_str().unwrap();
            let what = format!("{} container {cname}", w.what());
            // Environment: every reference resolves; the values a test run gives each variable.
            let mut env: Vec<(String, String)> = Vec::new();
            for e in c["env"].as_array().into_iter().flatten() {
                let name = e["name"].as_str().unwrap().to_string();
                let value = if let Some(v) = e["value"].as_str() {
                    v.to_string()
                } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    match path {
                        "status.podIP" | "status.hostIP" => "10.1.2.3".to_string(),
                        "metadata.name" | "spec.nodeName" => "test-pod-0".to_string(),
                        other => panic!("{what}: env {name} from unexpected field {other}"),
                    }
                } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
                    let (secret, key) = (r["name"].as_str().unwrap(), r["key"].as_str().unwrap());
                    let doc = find(&docs, "Secret", secret)
                        .unwrap_or_else(|| panic!("{what}: env {name} needs Secret {secret}"));
                    assert!(
                        keys(doc).contains(key),
                        "{what}: env {name} needs key {key} of Secret {secret}"
                    );
                    "secret-value-from-test".to_string()
                } else {
                    panic!("{what}: env {name} has neither value nor a known valueFrom");
                };
                env.push((name, value));
            }
            let mounts: Vec<(String, String)> = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    let vol = m["name"].as_str().unwrap().to_string();
                    assert!(
                        volumes.contains_key(&vol) || claims.contains(&vol),
                        "{what}: mounts undeclared volume {vol}"
                    );
                    assert!(
                        m["subPath"].is_null(),
                        "{what}: subPath mounts do not see updates"
                    );
                    (vol, m["mountPath"].as_str().unwrap().to_string())
                })
                .collect();
            let ports = container_ports(c);
            for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
                let port = &c[probe]["httpGet"]["port"];
                if !port.is_null() {
                    assert!(
                        resolve_port(std::slice::from_ref(c), port).is_some(),
                        "{what}: {probe} port {port} is no container port"
                    );
                }
            }
            let image = c["image"].as_str().unwrap_or("");
            if !image.contains("postern") {
                continue;
            }
            postern_containers += 1;
            images.insert(image.to_string());
            let command: Vec<String> = strings(&c["command"])
                .into_iter()
                .chain(strings(&c["args"]))
                .collect();
            let command = command.join(" ");
            let config = PosternConfig::find(&docs, &volumes, &mounts, &command, &what);
            let loaded = config.check(&env, &mounts, &volumes, &docs, &pki, work.path(), &what);

            // The ports the config listens on are exactly the container's ports.
            let declared: BTreeSet<(u16, String)> = ports.values().cloned().collect();
            assert_eq!(
                loaded.ports.values().cloned().collect::<BTreeSet<_>>(),
                declared,
                "{what}: container ports differ from the config's listeners {:?}",
                loaded.ports
            );
            let admin = loaded.ports["admin"].0;
            assert_eq!(
                ports.get("admin").map(|p| p.0),
                Some(admin),
                "{what}: port admin"
            );
            // A relay keeps carrying its tunnels while etcd is away: its Services must not drop it
            // (and every other relay with it) for that, so its readiness leaves registration and
            // the route view's freshness out.
            let ready_path = if ["server", "relay"].contains(&loaded.role.as_str()) {
                "/readyz?exclude=registered,fresh"
            } else {
                "/readyz"
            };
            for (probe, path) in [
                ("livenessProbe", "/healthz"),
                ("readinessProbe", ready_path),
            ] {
                let get = &c[probe]["httpGet"];
                assert_eq!(get["path"], path, "{what}: {probe} path");
                assert_eq!(
                    resolve_port(std::slice::from_ref(c), &get["port"]).map(|p| p.0),
                    Some(admin),
                    "{what}: {probe} is not on the admin port"
                );
            }
            // The grace period covers the preStop pause and the longest drain.
            let pre_stop = pre_stop_seconds(&c["lifecycle"]["preStop"]);
            let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
            assert!(
                Duration::from_secs(grace) > loaded.drain + Duration::from_secs(pre_stop),
                "{what}: terminationGracePeriodSeconds {grace} <= preStop {pre_stop}s + drain {:?}",
                loaded.drain
            );
            if loaded.role == "agent" {
                assert_eq!(
                    spec["hostNetwork"], true,
                    "{what}: agents need host networking"
                );
                assert_eq!(w.kind(), "DaemonSet", "{what}: one agent per node");
            } else {
                assert!(pre_stop > 0, "{what}: no preStop pause before the drain");
            }
        }
    }
    assert!(postern_containers >= 2, "expected a server and an agent");
    assert_eq!(images.len(), 1, "one postern image everywhere: {images:?}");

    // Services and disruption budgets select a workload; Service ports reach container ports.
    let workloads: Vec<&Doc> = docs
        .iter()
        .filter(|d| WORKLOADS.contains(&d.kind()))
        .collect();
    let mut udp_service = false;
    for s in docs
        .iter()
        .filter(|d| d.kind() == "Service" || d.kind() == "PodDisruptionBudget")
    {
        let selector = if s.kind() == "Service" {
            &s.value["spec"]["selector"]
        } else {
            &s.value["spec"]["selector"]["matchLabels"]
        };
        let targets: Vec<&&Doc> = workloads
            .iter()
            .filter(|w| labels_match(selector, &w.value["spec"]["template"]["metadata"]["labels"]))
            .collect();
        assert_eq!(
            targets.len(),
            1,
            "{} selects {} workloads",
            s.what(),
            targets.len()
        );
        if s.kind() != "Service" {
            continue;
        }
        let containers = targets[0].value["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .clone();
        for port in s.value["spec"]["ports"].as_array().unwrap() {
            let protocol = port["protocol"].as_str().unwrap_or("TCP");
            let target = if port["targetPort"].is_null() {
                &port["port"]
            } else {
                &port["targetPort"]
            };
            let resolved = resolve_port(&containers, target).unwrap_or_else(|| {
                panic!(
                    "{}: targetPort {target} is no container port of {}",
                    s.what(),
                    targets[0].what()
                )
            });
            assert_eq!(
                resolved.1,
                protocol,
                "{}: protocol of port {target}",
                s.what()
            );
            udp_service |= protocol == "UDP";
        }
    }
    assert!(udp_service, "no UDP Service for the agents' QUIC tunnels");
}

/// Seconds a preStop hook pauses (`sleep N` or the `sleep` action).
fn pre_stop_seconds(pre_stop: &Value) -> u64 {
    if let Some(s) = pre_stop["sleep"]["seconds"].as_u64() {
        return s;
    }
    let command = strings(&pre_stop["exec"]["command"]);
    command
        .windows(2)
        .find(|w| w[0].ends_with("sleep"))
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(0)
}

/// The postern config one container reads: a key of a mounted ConfigMap.
struct PosternConfig {
    role: String,
    text: String,
    /// The container's command and args, joined.
    command: String,
}

/// What a config turned out to say.
struct Loaded {
    role: String,
    /// Listener name → (port, protocol).
    ports: BTreeMap<String, (u16, String)>,
    drain: Duration,
}

impl PosternConfig {
    fn find(
        docs: &[Doc],
        volumes: &BTreeMap<String, Value>,
        mounts: &[(String, String)],
        command: &str,
        what: &str,
    ) -> PosternConfig {
        let mut found = Vec::new();
        for (vol, path) in mounts {
            let Some(cm) = volumes[vol]["configMap"]["name"].as_str() else {
                continue;
            };
            let doc = find(docs, "ConfigMap", cm).unwrap();
            for (key, text) in doc.value["data"].as_object().unwrap() {
                if command.contains(&format!("{path}/{key}")) {
                    found.push((key.clone(), text.as_str().unwrap().to_string()));
                }
            }
        }
        assert_eq!(
            found.len(),
            1,
            "{what}: reads {} mounted configs",
            found.len()
        );
        let (key, text) = found.pop().unwrap();
        let role = key.trim_end_matches(".toml").to_string();
        assert!(
            ["server", "relay", "gateway", "agent"].contains(&role.as_str()),
            "{what}: config {key} is for no role"
        );
        // The container runs that role with --config on a mounted path.
        let at = command
            .find(&format!("{role} --config "))
            .unwrap_or_else(|| panic!("{what}: does not run `{role} --config`: {command}"));
        let config_path = command[at + role.len() + 10..]
            .split_whitespace()
            .next()
            .unwrap();
        assert!(
            mounts
                .iter()
                .any(|(_, m)| config_path.starts_with(&format!("{m}/"))),
            "{what}: --config {config_path} is on no mounted volume"
        );
        PosternConfig {
            role,
            text,
            command: command.to_string(),
        }
    }

    /// Fills in `sed` placeholders, points file paths at generated certificates, loads the text
    /// through the real `*File` structs and runs `postern check` on it with the container's
    /// environment.
    #[allow(clippy::too_many_arguments)]
    fn check(
        self,
        env: &[(String, String)],
        mounts: &[(String, String)],
        volumes: &BTreeMap<String, Value>,
        docs: &[Doc],
        pki: &postern::cert::Bundle,
        work: &Path,
        what: &str,
    ) -> Loaded {
        let env_value = |name: &str| {
            env.iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{what}: the config uses ${name}, which is not set"))
        };
        let mut text = self.text.clone();
        // `sed "s/@NAME@/${VAR}/g"` in the container's command.
        for placeholder in placeholders(&text) {
            let var = placeholder.trim_matches('@');
            assert!(
                self.command
                    .contains(&format!("s/{placeholder}/${{{var}}}/g")),
                "{what}: the config's {placeholder} is not filled in from ${var} at start"
            );
            text = text.replace(&placeholder, &env_value(var));
        }
        // Every env: reference has a variable in the container.
        for (at, _) in self.text.match_indices("\"env:") {
            let name: String = self.text[at + 5..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            env_value(&name);
        }
        // File paths live on mounted Secrets (or ConfigMaps) that hold that file.
        let table: toml::Table = toml::from_str(&text)
            .unwrap_or_else(|e| panic!("{what}: embedded {} config: {e}", self.role));
        let mut paths = Vec::new();
        collect_paths(&toml::Value::Table(table.clone()), &mut paths);
        for path in paths {
            let (vol, mount) = mounts
                .iter()
                .find(|(_, m)| path.starts_with(&format!("{m}/")))
                .unwrap_or_else(|| panic!("{what}: {path} is on no mounted volume"));
            let file = &path[mount.len() + 1..];
            let v = &volumes[vol];
            let (kind, name, source) = if let Some(n) = v["secret"]["secretName"].as_str() {
                ("Secret", n, &v["secret"])
            } else {
                (
                    "ConfigMap",
                    v["configMap"]["name"].as_str().unwrap(),
                    &v["configMap"],
                )
            };
            let key = match source["items"].as_array() {
                Some(items) => items
                    .iter()
                    .find(|i| i["path"] == file)
                    .and_then(|i| i["key"].as_str())
                    .unwrap_or_else(|| panic!("{what}: {path}: no item maps to {file}"))
                    .to_string(),
                None => file.to_string(),
            };
            let doc = find(docs, kind, name).unwrap();
            assert!(
                keys(doc).contains(&key),
                "{what}: {path} needs key {key} of {kind} {name}"
            );
            let generated = match key.as_str() {
                "ca.pem" => &pki.ca,
                "relay.pem" => &pki.relay_cert,
                "relay-key.pem" => &pki.relay_key,
                "peer.pem" => &pki.peer_cert,
                "peer-key.pem" => &pki.peer_key,
                other => panic!("{what}: no test material for {other}"),
            };
            let local = work.join(vol).join(file);
            std::fs::create_dir_all(local.parent().unwrap()).unwrap();
            std::fs::copy(generated, &local).unwrap();
            text = text.replace(&format!("\"{path}\""), &format!("\"{}\"", local.display()));
        }

        // The real schema: the *File structs deny unknown keys.
        let origin = Path::new("configmap.toml");
        let parsed = match self.role.as_str() {
            "server" => postern::config::parse_toml::<postern::config::ServerFile>(&text, origin)
                .map(|_| ()),
            "relay" => postern::config::parse_toml::<postern::config::RelayRoleFile>(&text, origin)
                .map(|_| ()),
            "gateway" => {
                postern::config::parse_toml::<postern::config::GatewayRoleFile>(&text, origin)
                    .map(|_| ())
            }
            _ => {
                postern::config::parse_toml::<postern::config::AgentFile>(&text, origin).map(|_| ())
            }
        };
        parsed.unwrap_or_else(|e| panic!("{what}: {e}"));
        // The whole conversion (certificates, secrets, addresses), as the container would run it.
        let file = work.join(format!("{}.toml", self.role));
        std::fs::write(&file, &text).unwrap();
        let out = std::process::Command::new(BIN)
            .args([
                "check",
                "--role",
                &self.role,
                "--config",
                file.to_str().unwrap(),
            ])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{what}: postern check refused the embedded config: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let mut ports = BTreeMap::new();
        let listen = |key: &str, value: Option<&toml::Value>, protocol: &str| {
            let addr: std::net::SocketAddr = value
                .and_then(|v| v.as_str())
                .unwrap_or_else(|| panic!("{what}: {key} must be set explicitly in a pod"))
                .parse()
                .unwrap_or_else(|e| panic!("{what}: {key}: {e}"));
            assert!(
                !addr.ip().is_loopback(),
                "{what}: {key} = {addr} is unreachable from outside the pod"
            );
            (addr.port(), protocol.to_string())
        };
        let admin = table.get("admin").and_then(|a| a.get("listen"));
        ports.insert("admin".to_string(), listen("admin.listen", admin, "TCP"));
        let mut drains = Vec::new();
        let drain = |v: Option<&toml::Value>| {
            v.and_then(|v| v.as_str())
                .map_or(Duration::from_secs(30), |s| {
                    humantime::parse_duration(s).unwrap()
                })
        };
        if let Some(relay) = table.get("relay") {
            ports.insert(
                "relay".into(),
                listen("relay.listen", relay.get("listen"), "UDP"),
            );
            // TCP tunnels: on `listen`'s port unless `tcp_listen` moves or disables them.
            match relay.get("tcp_listen").and_then(|v| v.as_str()) {
                Some("off") => {}
                Some(_) => {
                    ports.insert(
                        "relay-tcp".into(),
                        listen("relay.tcp_listen", relay.get("tcp_listen"), "TCP"),
                    );
                }
                None => {
                    ports.insert(
                        "relay-tcp".into(),
                        listen("relay.listen", relay.get("listen"), "TCP"),
                    );
                }
            }
            if relay.get("peer_listen").is_some() {
                ports.insert(
                    "peer".into(),
                    listen("relay.peer_listen", relay.get("peer_listen"), "UDP"),
                );
            }
            drains.push(drain(relay.get("drain_grace")));
        }
        if let Some(gateway) = table.get("gateway") {
            for front in ["socks5", "http"] {
                let value = gateway.get(front);
                if value.and_then(|v| v.as_str()) != Some("off") && value.is_some() {
                    ports.insert(
                        front.into(),
                        listen(&format!("gateway.{front}"), value, "TCP"),
                    );
                }
            }
            drains.push(drain(gateway.get("drain_grace")));
        }
        if self.role == "agent" {
            drains.push(drain(table.get("drain_grace")));
        }
        Loaded {
            role: self.role,
            ports,
            drain: drains.into_iter().max().unwrap(),
        }
    }
}

/// `@NAME@` placeholders in a config text.
fn placeholders(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find('@') {
        let after = &rest[start + 1..];
        match after.find('@') {
            Some(end)
                if end > 0
                    && after[..end]
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c == '_') =>
            {
                out.insert(format!("@{}@", &after[..end]));
                rest = &after[end + 1..];
            }
            _ => rest = after,
        }
    }
    out
}

fn collect_paths(v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::String(s) if s.starts_with('/') => out.push(s.clone()),
        toml::Value::Array(a) => a.iter().for_each(|v| collect_paths(v, out)),
        toml::Value::Table(t) => t.values().for_each(|v| collect_paths(v, out)),
        _ => {}
    }
}

/// The systemd unit runs the binary as it is meant to run: notify, a config check first, reload by
/// SIGHUP, a stop timeout longer than the default drain, many file descriptors, hardening.
#[test]
fn systemd_unit_fits_the_binary() {
    let dir = repo().join("config/systemd");
    let units: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect();
    assert!(!units.is_empty(), "no unit under {}", dir.display());
    for unit in units {
        let text = std::fs::read_to_string(&unit).unwrap();
        let name = unit.file_name().unwrap().to_string_lossy().to_string();
        let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .unwrap_or_else(|| panic!("{name}: not key=value: {line}"));
            keys.entry(k.to_string()).or_default().push(v.to_string());
        }
        let one = |k: &str| -> String {
            let v = keys.get(k).unwrap_or_else(|| panic!("{name}: no {k}"));
            v.last().unwrap().clone()
        };
        assert_eq!(one("Type"), "notify", "{name}");
        let start = one("ExecStart");
        let pre = one("ExecStartPre");
        let config = start
            .split_once("--config ")
            .map(|(_, c)| c.to_string())
            .unwrap_or_else(|| panic!("{name}: ExecStart without --config"));
        assert!(
            pre.contains(" check ") && pre.ends_with(&format!("--config {config}")),
            "{name}: {pre}"
        );
        let binary = start.split_whitespace().next().unwrap();
        assert!(
            pre.starts_with(binary),
            "{name}: the check runs another binary: {pre}"
        );
        // `systemctl reload` checks the file before it signals, so a broken file fails the reload.
        assert_eq!(
            keys["ExecReload"],
            [pre.clone(), "/bin/kill -HUP $MAINPID".to_string()],
            "{name}: ExecReload must run the check, then signal"
        );
        assert_eq!(one("KillSignal"), "SIGTERM", "{name}");
        let stop = humantime::parse_duration(&one("TimeoutStopSec"))
            .or_else(|_| {
                one("TimeoutStopSec")
                    .parse::<u64>()
                    .map(Duration::from_secs)
            })
            .unwrap();
        assert!(
            stop > Duration::from_secs(30),
            "{name}: TimeoutStopSec must exceed the 30s drain"
        );
        assert!(
            one("LimitNOFILE").parse::<u64>().unwrap() >= 65_536,
            "{name}"
        );
        for (k, v) in [
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("PrivateTmp", "yes"),
            ("ProtectHome", "yes"),
        ] {
            assert_eq!(one(k), v, "{name}: {k}");
        }
        // The roles an instance may name are the binary's subcommands and `check --role` values.
        if name.contains('@') {
            for role in ["server", "relay", "gateway", "agent"] {
                let out = std::process::Command::new(BIN)
                    .args(["check", "--role", role, "--config", "/nonexistent.toml"])
                    .output()
                    .unwrap();
                let err = String::from_utf8_lossy(&out.stderr);
                assert!(
                    err.contains("cannot read /nonexistent.toml"),
                    "{role}: {err}"
                );
            }
        }
    }
}

/// `systemd-analyze verify` accepts every unit as an instance of each role: known keys, valid
/// values, executables that exist (the unit's binary path pointed at the one under test).
#[test]
fn systemd_analyze_verifies_the_units() {
    let dir = repo().join("config/systemd");
    let work = tempfile::tempdir().unwrap();
    let mut verified = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension() != Some(std::ffi::OsStr::new("service")) {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin/postern", BIN);
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let instances: Vec<String> = match name.split_once("@.") {
            Some((stem, ext)) => ["server", "relay", "gateway", "agent"]
                .iter()
                .map(|role| format!("{stem}@{role}.{ext}"))
                .collect(),
            None => vec![name.clone()],
        };
        for instance in instances {
            let unit = work.path().join(&instance);
            std::fs::write(&unit, &text).unwrap();
            let out = std::process::Command::new("systemd-analyze")
                .args(["verify", unit.to_str().unwrap()])
                .output()
                .unwrap_or_else(|e| {
                    panic!("systemd-analyze is missing ({e}): install Debian's `systemd` (scripts/deps does)")
                });
            let stderr = String::from_utf8_lossy(&out.stderr);
            // Lines about other units (the host's own) are not this unit's business.
            let ours: Vec<&str> = stderr
                .lines()
                .filter(|l| l.contains(&instance) || l.contains(unit.to_str().unwrap()))
                .collect();
            assert!(
                out.status.success() && ours.is_empty(),
                "systemd-analyze verify {instance}:\n{stderr}"
            );
            verified += 1;
        }
    }
    assert!(verified >= 4, "verified {verified} unit instance(s)");
}

/// The Containerfile copies files that exist, runs as a non-root user, and exposes every port the
/// manifests' postern containers use.
#[test]
fn containerfile_fits_the_repository_and_the_manifests() {
    let text = std::fs::read_to_string(repo().join("config/Containerfile")).unwrap();
    let lines: Vec<String> = text
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(String::from)
        .collect();
    let stages = lines.iter().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "a multi-stage build: {stages} stage(s)");
    let final_stage: Vec<&String> = lines
        .iter()
        .skip(lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap())
        .collect();
    for l in lines
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = l.split_whitespace().skip(1).collect();
        for src in &words[..words.len() - 1] {
            assert!(
                repo().join(src).exists(),
                "COPY {src}: not in the repository"
            );
        }
    }
    assert!(
        lines.iter().any(|l| l.contains("protobuf-compiler")),
        "the build stage needs protoc"
    );
    assert!(
        lines.iter().any(|l| l.contains("libprotobuf-dev")),
        "the build stage needs the protobuf well-known includes (libprotobuf-dev)"
    );
    // The image is built with a profile Cargo.toml defines, and installs that profile's binary.
    let build = lines
        .iter()
        .find(|l| l.contains("cargo build"))
        .expect("the build stage runs cargo build");
    let profile = build
        .split_whitespace()
        .skip_while(|w| *w != "--profile")
        .nth(1)
        .expect("cargo build --profile NAME");
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains(&format!("[profile.{profile}]")),
        "Cargo.toml defines no profile {profile}"
    );
    assert!(
        build.contains(&format!("cp target/{profile}/postern ")),
        "the build installs another profile's binary: {build}"
    );
    let user = final_stage
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the image sets a USER");
    assert!(
        !["root", "0", "0:0"].contains(&user.trim()),
        "runs as root: {user}"
    );
    let binary = final_stage
        .iter()
        .find_map(|l| l.strip_prefix("COPY --from="))
        .and_then(|l| l.split_whitespace().last())
        .expect("the final stage copies the binary");
    let entrypoint = final_stage
        .iter()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("ENTRYPOINT");
    assert!(
        entrypoint.contains(binary),
        "ENTRYPOINT {entrypoint} is not {binary}"
    );
    let exposed: BTreeSet<String> = final_stage
        .iter()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| l.split_whitespace().map(|p| p.to_ascii_lowercase()))
        .collect();
    for d in docs().iter().filter(|d| WORKLOADS.contains(&d.kind())) {
        for c in d.value["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
        {
            if !c["image"].as_str().unwrap_or("").contains("postern") {
                continue;
            }
            for (number, protocol) in container_ports(c).values() {
                let port = format!("{number}/{}", protocol.to_ascii_lowercase());
                assert!(
                    exposed.contains(&port),
                    "{port} ({}) is not EXPOSEd",
                    d.what()
                );
            }
        }
    }
}

/// Issue 10.9: a Service that brings clients to a gateway front door from outside the cluster keeps
/// their source address (`externalTrafficPolicy: Local`): the client allowlist, the per-client limit
/// and the access log's `client` field depend on it; docs/operations.md says so.
#[test]
fn gateway_services_keep_client_addresses() {
    let docs = docs();
    let mut front_doors = 0;
    for s in docs.iter().filter(|d| d.kind() == "Service") {
        let spec = &s.value["spec"];
        let external = matches!(
            spec["type"].as_str(),
            Some("LoadBalancer") | Some("NodePort")
        );
        let ports = spec["ports"].as_array().cloned().unwrap_or_default();
        let door = ports.iter().any(|p| {
            matches!(p["name"].as_str(), Some("socks5") | Some("http"))
                && p["protocol"].as_str().unwrap_or("TCP") == "TCP"
        });
        if external && door {
            front_doors += 1;
            assert_eq!(
                spec["externalTrafficPolicy"].as_str(),
                Some("Local"),
                "{}: clients' addresses are lost behind SNAT",
                s.what()
            );
        }
    }
    assert!(
        front_doors > 0,
        "no gateway Service found in config/kubernetes"
    );
    let ops = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    assert!(
        ops.contains("externalTrafficPolicy: Local"),
        "docs/operations.md does not explain externalTrafficPolicy"
    );
}

/// A `.dockerignore` glob: `*` and `?` match within one path component.
fn glob(pattern: &[u8], path: &[u8]) -> bool {
    match (pattern.first(), path.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob(&pattern[1..], path)
                || (path.first().is_some_and(|c| *c != b'/') && glob(pattern, &path[1..]))
        }
        (Some(b'?'), Some(c)) if *c != b'/' => glob(&pattern[1..], &path[1..]),
        (Some(p), Some(c)) if p == c => glob(&pattern[1..], &path[1..]),
        _ => false,
    }
}

/// Whether Docker leaves `path` (relative to the context root) out of the build context: the last
/// pattern matching the path or one of its parent directories decides; `!` re-includes.
fn ignored(patterns: &[(bool, String)], path: &str) -> bool {
    let mut out = false;
    for (negated, pattern) in patterns {
        let mut prefix = String::new();
        let hit = path.split('/').any(|part| {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            glob(pattern.as_bytes(), prefix.as_bytes())
        });
        if hit {
            out = !negated;
        }
    }
    out
}

/// The container build sends only what it copies: config/Containerfile.dockerignore (read by Docker
/// next to the Containerfile, by podman with --ignorefile) keeps target/ and .git out and every
/// COPY source in, and the whole context stays small.
#[test]
fn container_build_context_leaves_out_target() {
    let file = repo().join("config/Containerfile.dockerignore");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let patterns: Vec<(bool, String)> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match l.strip_prefix('!') {
            Some(p) => (true, p.trim_start_matches('/').to_string()),
            None => (false, l.trim_start_matches('/').to_string()),
        })
        .collect();
    for path in [
        "target",
        "target/debug/postern",
        ".git",
        ".git/HEAD",
        "tests/core.rs",
    ] {
        assert!(ignored(&patterns, path), "{path} is sent with the context");
    }
    let containerfile = std::fs::read_to_string(repo().join("config/Containerfile")).unwrap();
    let mut sources = Vec::new();
    for l in containerfile.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("COPY ") {
            if rest.starts_with("--from") {
                continue;
            }
            let words: Vec<&str> = rest.split_whitespace().collect();
            sources.extend(words[..words.len() - 1].iter().map(|w| w.to_string()));
        }
    }
    assert!(sources.len() >= 3, "COPY sources: {sources:?}");
    // Walk the context as Docker would send it, pruning directories no `!` pattern reaches into.
    let (mut sent, mut bytes) = (Vec::new(), 0u64);
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(repo().join(&dir)).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().to_string();
            let rel = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            let excluded = ignored(&patterns, &rel);
            if entry.file_type().unwrap().is_dir() {
                let reopened = patterns
                    .iter()
                    .any(|(negated, p)| *negated && p.starts_with(&format!("{rel}/")));
                if !excluded || reopened {
                    stack.push(rel);
                }
            } else if !excluded {
                bytes += entry.metadata().unwrap().len();
                sent.push(rel);
            }
        }
    }
    for source in &sources {
        let source = source.trim_end_matches('/');
        assert!(
            sent.iter()
                .any(|p| p == source || p.starts_with(&format!("{source}/"))),
            "COPY {source}: left out of the context"
        );
    }
    assert!(
        sent.iter().any(|p| p == "src/main.rs"),
        "src/main.rs is not sent"
    );
    assert!(
        !sent.iter().any(|p| p.starts_with("target/")),
        "target/ is sent"
    );
    assert!(
        bytes < 16 << 20,
        "the build context is {bytes} bytes: {} files",
        sent.len()
    );
}
