//! The example alert rules of docs/operations.md, proved with `promtool test rules` on real
//! scrapes: a healthy cluster (etcd, a relay, a server, a gateway, an agent with two tunnels,
//! traffic through both front doors) pages for nothing, and a broken agent (no relay reachable)
//! and a broken relay (no etcd) page for exactly themselves once their `for:` has passed.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use serde_json::{json, Value};

use crate::support::*;

/// One process's exposition, scraped twice with traffic in between.
struct Scrape {
    instance: SocketAddr,
    job: &'static str,
    first: String,
    second: String,
}

async fn metrics_text(admin: SocketAddr) -> String {
    let (code, body) = http_get(admin, "/metrics").await.unwrap();
    assert_eq!(code, 200, "{admin} /metrics: {body}");
    body
}

/// The value of an unlabelled sample, once `/metrics` has it.
async fn wait_sample(admin: SocketAddr, name: &str, want: f64, what: &str) {
    wait_for(QUICK, what, || async {
        let m = parse_samples(&metrics_text(admin).await);
        (m.get(name) == Some(&want)).then_some(())
    })
    .await
}

/// `# TYPE` of every family, and the family a sample name belongs to.
fn sample_type(types: &BTreeMap<String, String>, sample: &str) -> String {
    if let Some(t) = types.get(sample) {
        return t.clone();
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(t) = sample.strip_suffix(suffix).and_then(|f| types.get(f)) {
            return t.clone();
        }
    }
    panic!("sample {sample} has no # TYPE");
}

/// Interval between the samples of the generated series, and how many follow the first.
const INTERVAL: &str = "30s";
const STEPS: u32 = 60;

/// The scrapes as promtool `input_series`: every sample of the second scrape, with the
/// `instance` and `job` labels Prometheus would add. Gauges hold their value; counters (and
/// histogram samples) grow each interval by what they grew between the two scrapes.
fn input_series(scrapes: &[Scrape]) -> Vec<Value> {
    let mut out = Vec::new();
    for s in scrapes {
        let types: BTreeMap<String, String> = s
            .second
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|rest| rest.split_once(' '))
            .map(|(name, kind)| (name.to_string(), kind.to_string()))
            .collect();
        let first = parse_samples(&s.first);
        for (series, value) in parse_samples(&s.second) {
            let name = series.split('{').next().unwrap();
            let target = format!("instance=\"{}\",job=\"{}\"", s.instance, s.job);
            let labelled = match series.strip_suffix('}') {
                Some(open) => format!("{open},{target}}}"),
                None => format!("{series}{{{target}}}"),
            };
            let values = match sample_type(&types, name).as_str() {
                "counter" | "histogram" => {
                    let growth = (value - first.get(&series).copied().unwrap_or(0.0)).max(0.0);
                    format!("{value}+{growth}x{STEPS}")
                }
                _ => format!("{value}+0x{STEPS}"),
            };
            out.push(json!({ "series": labelled, "values": values }));
        }
        out.push(json!({
            "series": format!("up{{instance=\"{}\",job=\"{}\"}}", s.instance, s.job),
            "values": format!("1+0x{STEPS}"),
        }));
    }
    out
}

/// One alerting rule of the docs: name, labels, annotations (templates as written).
struct Rule {
    alert: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

/// The rules block of docs/operations.md's "Alert rules" section, and its parsed rules.
fn doc_rules() -> (String, Vec<Rule>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let section = doc
        .split("### Alert rules")
        .nth(1)
        .expect("an Alert rules section");
    let text = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|s| s.split("\n```").next())
        .expect("a yaml block of alert rules")
        .to_string();
    let yaml = yaml_rust2::YamlLoader::load_from_str(&text).expect("the rules parse as YAML");
    let map = |y: &yaml_rust2::Yaml| -> BTreeMap<String, String> {
        y.as_hash()
            .map(|h| {
                h.iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().unwrap().to_string(),
                            v.as_str().unwrap().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut rules = Vec::new();
    for group in yaml[0]["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            if let Some(alert) = rule["alert"].as_str() {
                rules.push(Rule {
                    alert: alert.to_string(),
                    labels: map(&rule["labels"]),
                    annotations: map(&rule["annotations"]),
                });
            }
        }
    }
    assert!(rules.len() >= 5, "few alert rules in the docs");
    (text, rules)
}

/// The alert `rule` raises for the target `instance` / `job` (its only labels, as for the rules on
/// one unlabelled gauge), as promtool's `exp_alerts` entry.
fn expected_alert(rule: &Rule, instance: SocketAddr, job: &str) -> Value {
    let mut labels = rule.labels.clone();
    labels.insert("instance".into(), instance.to_string());
    labels.insert("job".into(), job.into());
    let annotations: BTreeMap<String, String> = rule
        .annotations
        .iter()
        .map(|(k, v)| {
            let v = v.replace("{{ $labels.instance }}", &instance.to_string());
            assert!(
                !v.contains("{{"),
                "a template this test does not expand: {v}"
            );
            (k.clone(), v)
        })
        .collect();
    json!({ "exp_labels": labels, "exp_annotations": annotations })
}

/// Families each role must not export: another role's gauges, which would page for it.
fn assert_only_own_families(role: &str, text: &str) {
    let foreign: &[&str] = match role {
        "agent" => &[
            "postern_relay_",
            "postern_gateway_",
            "postern_routes_cached",
        ],
        "relay" => &[
            "postern_agent_",
            "postern_gateway_",
            "postern_routes_cached",
        ],
        "gateway" => &["postern_agent_", "postern_relay_"],
        "server" => &["postern_agent_"],
        _ => unreachable!(),
    };
    for line in text.lines() {
        for prefix in foreign {
            assert!(
                !line.starts_with(prefix) && !line.contains(&format!(" {prefix}")),
                "{role} exports {line:?}"
            );
        }
    }
    if let Err(complaint) = promtool_check(text) {
        panic!("promtool check metrics ({role}): {complaint}\n{text}");
    }
    // The process figures every role exports, read from /proc at scrape time.
    let m = parse_samples(text);
    for name in [
        "process_open_fds",
        "process_max_fds",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_start_time_seconds",
    ] {
        let v = m.get(name).copied().unwrap_or(0.0);
        assert!(v > 0.0, "{role}: {name} = {v}");
    }
    assert!(m["process_max_fds"] >= m["process_open_fds"], "{role}");
    assert!(
        m["process_resident_memory_bytes"] <= m["process_virtual_memory_bytes"],
        "{role}"
    );
    assert!(m.contains_key("process_cpu_seconds_total"), "{role}");
}

/// The docs' alert rules, run by `promtool test rules` on real scrapes of every role: nothing fires
/// on a healthy cluster; an agent that reaches no relay fires `PosternAgentWithoutTunnel` and a
/// relay without etcd `PosternRelayNotRegistered`, each for itself only and only after its `for:`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_rules_stay_quiet_on_a_healthy_cluster_and_fire_on_a_broken_one() {
    let w = Workdir::new("alerts");
    let etcd = Etcd::started(w.dir.path()).await;
    let net = 91;
    let ip = Ipv4Addr::new(127, net, 0, 1);
    let echo = Echo::start(ip).await;

    // The healthy cluster: a relay and a server (two relays in one registry), a gateway, and an
    // agent with a tunnel to each.
    let relay_port = free_udp_port();
    let relay_cfg = w.write(
        "relay.toml",
        &relay_toml(&w, "relay-a", relay_port, &etcd.url, net, "5s"),
    );
    let (_relay, line) =
        Proc::postern("relay", "relay", &relay_cfg, &[], &w.path("relay.log")).await;
    let relay_admin = ready_addr(&line, "admin");
    let server_cfg = w.write(
        "server.toml",
        &server_etcd_toml(&w, "server-b", 0, &etcd.url, net, "5s"),
    );
    let (_server, line) =
        Proc::postern("server", "server", &server_cfg, &[], &w.path("server.log")).await;
    let server_admin = ready_addr(&line, "admin");
    let server_socks5 = ready_addr(&line, "socks5");
    let server_relay = ready_addr(&line, "relay");
    let gateway_cfg = w.write("gateway.toml", &gateway_toml(&w, &etcd.url, "5s"));
    let (_gateway, line) = Proc::postern(
        "gateway",
        "gateway",
        &gateway_cfg,
        &[],
        &w.path("gateway.log"),
    )
    .await;
    let gateway_admin = ready_addr(&line, "admin");
    let gateway_socks5 = ready_addr(&line, "socks5");
    let agent_cfg = w.write(
        "agent.toml",
        &agent_toml(
            &w,
            "agent-a",
            &[SocketAddr::from(([127, 0, 0, 1], relay_port)), server_relay],
            ip,
            &[echo.addr.port()],
            2,
            "5s",
        ),
    );
    let (_agent, line) =
        Proc::postern("agent", "agent", &agent_cfg, &[], &w.path("agent.log")).await;
    let agent_admin = ready_addr(&line, "admin");

    wait_sample(agent_admin, "postern_agent_tunnels", 2.0, "two tunnels").await;
    for (admin, what) in [
        (relay_admin, "relay"),
        (server_admin, "server"),
        (gateway_admin, "gateway"),
        (agent_admin, "agent"),
    ] {
        wait_readyz(admin, 200, what).await;
    }
    wait_sample(relay_admin, "postern_relay_lease_held", 1.0, "relay lease").await;
    wait_sample(
        server_admin,
        "postern_relay_lease_held",
        1.0,
        "server lease",
    )
    .await;
    wait_route(gateway_admin, ip).await;
    wait_route(server_admin, ip).await;

    let healthy = [
        (relay_admin, "postern", "relay"),
        (server_admin, "postern", "server"),
        (gateway_admin, "postern", "gateway"),
        (agent_admin, "postern-agent", "agent"),
    ];
    let mut firsts = Vec::new();
    for (admin, _, role) in healthy {
        let text = metrics_text(admin).await;
        assert_only_own_families(role, &text);
        firsts.push(text);
    }
    // Traffic through both front doors, counted before the second scrape.
    let ok = r#"postern_gateway_connections_total{front="socks5",result="ok"}"#;
    for (i, proxy) in [gateway_socks5, server_socks5].into_iter().enumerate() {
        for n in 0..3u64 {
            echo_through(proxy, None, echo.addr, 10_000, n)
                .await
                .unwrap_or_else(|e| panic!("transfer {n} through front door {i}: {e}"));
        }
    }
    for admin in [gateway_admin, server_admin] {
        wait_for(QUICK, "three ok connections counted", || async {
            let m = parse_samples(&metrics_text(admin).await);
            (m.get(ok).copied().unwrap_or(0.0) >= 3.0).then_some(())
        })
        .await;
    }
    let mut scrapes = Vec::new();
    for ((admin, job, _), first) in healthy.into_iter().zip(firsts) {
        scrapes.push(Scrape {
            instance: admin,
            job,
            first,
            second: metrics_text(admin).await,
        });
    }

    // The broken ones: an agent whose relay is not there, a relay whose etcd is not there.
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_udp_port()));
    let lost_agent_cfg = w.write(
        "agent-lost.toml",
        &agent_toml(
            &w,
            "agent-lost",
            &[nowhere],
            Ipv4Addr::new(127, net, 0, 2),
            &[echo.addr.port()],
            2,
            "5s",
        ),
    );
    let (_lost_agent, line) = Proc::postern(
        "agent-lost",
        "agent",
        &lost_agent_cfg,
        &[],
        &w.path("agent-lost.log"),
    )
    .await;
    let lost_agent_admin = ready_addr(&line, "admin");
    let no_etcd = format!("http://127.0.0.1:{}", closed_port(Ipv4Addr::LOCALHOST));
    let lost_relay_cfg = w.write(
        "relay-lost.toml",
        &relay_toml(&w, "relay-lost", free_udp_port(), &no_etcd, net, "5s"),
    );
    let (_lost_relay, line) = Proc::postern(
        "relay-lost",
        "relay",
        &lost_relay_cfg,
        &[],
        &w.path("relay-lost.log"),
    )
    .await;
    let lost_relay_admin = ready_addr(&line, "admin");
    wait_readyz(lost_agent_admin, 503, "agent without a relay").await;
    wait_readyz(lost_relay_admin, 503, "relay without etcd").await;
    let mut broken = Vec::new();
    for (admin, job, role) in [
        (lost_agent_admin, "postern-agent", "agent"),
        (lost_relay_admin, "postern", "relay"),
    ] {
        let first = metrics_text(admin).await;
        assert_only_own_families(role, &first);
        broken.push(Scrape {
            instance: admin,
            job,
            first,
            second: metrics_text(admin).await,
        });
    }
    assert_eq!(
        parse_samples(&broken[0].second).get("postern_agent_tunnels"),
        Some(&0.0),
        "the lost agent has no tunnel"
    );
    assert_eq!(
        parse_samples(&broken[1].second).get("postern_relay_lease_held"),
        Some(&0.0),
        "the lost relay holds no lease"
    );

    let (rules_text, rules) = doc_rules();
    let rule = |name: &str| {
        rules
            .iter()
            .find(|r| r.alert == name)
            .unwrap_or_else(|| panic!("no alert {name} in docs/operations.md"))
    };
    // Healthy: no alert at any time, before and after every rule's `for:` (15m at most).
    let mut quiet = Vec::new();
    for r in &rules {
        for at in ["1m", "5m", "16m", "29m"] {
            quiet.push(json!({ "eval_time": at, "alertname": r.alert, "exp_alerts": [] }));
        }
    }
    // Broken: the healthy processes and the two broken ones side by side.
    let without_tunnel = rule("PosternAgentWithoutTunnel");
    let not_registered = rule("PosternRelayNotRegistered");
    let mut all = scrapes;
    all.extend(broken);
    let lost_agent = expected_alert(without_tunnel, lost_agent_admin, "postern-agent");
    let lost_relay = expected_alert(not_registered, lost_relay_admin, "postern");
    let paging = vec![
        // Pending during `for: 2m`, then firing for the lost agent only.
        json!({ "eval_time": "1m", "alertname": without_tunnel.alert, "exp_alerts": [] }),
        json!({ "eval_time": "3m", "alertname": without_tunnel.alert, "exp_alerts": [lost_agent] }),
        json!({ "eval_time": "29m", "alertname": without_tunnel.alert, "exp_alerts": [lost_agent] }),
        // `for: 1m`.
        json!({ "eval_time": "0m", "alertname": not_registered.alert, "exp_alerts": [] }),
        json!({ "eval_time": "2m", "alertname": not_registered.alert, "exp_alerts": [lost_relay] }),
        json!({ "eval_time": "29m", "alertname": not_registered.alert, "exp_alerts": [lost_relay] }),
        // Two tunnels on the healthy agent, none on the lost one: neither has exactly one.
        json!({ "eval_time": "29m", "alertname": "PosternAgentSingleTunnel", "exp_alerts": [] }),
    ];
    let healthy_series = input_series(&all[..4]);
    let test = json!({
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": "healthy cluster",
                "interval": INTERVAL,
                "input_series": healthy_series,
                "alert_rule_test": quiet,
            },
            {
                "name": "an agent without a relay, a relay without etcd",
                "interval": INTERVAL,
                "input_series": input_series(&all),
                "alert_rule_test": paging,
            },
        ],
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yaml"), &rules_text).unwrap();
    // YAML is a superset of JSON.
    let test_file = dir.path().join("test.yaml");
    std::fs::write(&test_file, serde_json::to_string_pretty(&test).unwrap()).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["test", "rules", test_file.to_str().unwrap()])
        .current_dir(dir.path())
        .output()
        .expect("promtool (Debian `prometheus`; scripts/deps installs it)");
    assert!(
        out.status.success(),
        "promtool test rules on docs/operations.md's rules:\n{}{}\n--- test file:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        serde_json::to_string_pretty(&test).unwrap()
    );
    drop(etcd);
}

/// The Prometheus scrape example of docs/operations.md targets each role on its default admin
/// port, and says how to move the admin listener off its loopback default so Prometheus can reach
/// it.
#[test]
fn docs_scrape_example_matches_the_admin_defaults() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let section = doc
        .split("### Metrics\n")
        .nth(1)
        .and_then(|s| s.split("### Alert rules").next())
        .expect("a Metrics section");
    let block = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|s| s.split("\n```").next())
        .expect("a scrape configuration");
    let yaml = yaml_rust2::YamlLoader::load_from_str(block).expect("the example parses");
    let mut jobs = 0;
    for job in yaml[0]["scrape_configs"].as_vec().expect("scrape_configs") {
        let name = job["job_name"].as_str().unwrap();
        let default = match name {
            "postern-agent" => postern::config::AGENT_ADMIN_DEFAULT,
            _ => postern::config::ADMIN_DEFAULT,
        };
        for config in job["static_configs"].as_vec().unwrap() {
            for target in config["targets"].as_vec().unwrap() {
                let target = target.as_str().unwrap();
                let port = target.rsplit_once(':').map(|(_, p)| p);
                assert_eq!(
                    port,
                    Some(default.port().to_string().as_str()),
                    "{name}: {target} is not on the default admin port {default}"
                );
            }
        }
        jobs += 1;
    }
    assert!(jobs >= 2, "the example scrapes relays and agents");
    for default in [
        postern::config::ADMIN_DEFAULT,
        postern::config::AGENT_ADMIN_DEFAULT,
    ] {
        assert!(
            section.contains(&format!("`{default}`")),
            "the Metrics section does not name the default {default}"
        );
    }
    assert!(
        section.contains("[admin] listen = "),
        "the Metrics section does not say how to make the admin listener reachable"
    );
}
