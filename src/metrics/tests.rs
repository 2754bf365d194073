#[test]
fn exposition_names_every_family() {
    let m = super::metrics();
    // A labelled family shows only once it has a child (prometheus-client skips empty ones).
    m.client_connections
        .get_or_create(&super::FrontResult {
            front: "socks5",
            result: "ok",
        })
        .inc_by(0);
    let text = m.encode();
    for name in [
        "postern_gateway_connections",
        "postern_relay_tunnels",
        "postern_build_info",
        "postern_gateway_connect_duration_seconds",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
}

#[test]
fn counters_are_named_with_total_and_no_openmetrics_markers_remain() {
    let m = super::metrics();
    m.open_attempts
        .get_or_create(&super::Outcome { result: "ok" })
        .inc();
    let text = m.encode();
    assert!(
        text.contains("# HELP postern_open_attempts_total "),
        "{text}"
    );
    assert!(
        text.contains("# TYPE postern_open_attempts_total counter"),
        "{text}"
    );
    assert!(
        text.contains("postern_open_attempts_total{result=\"ok\"}"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE postern_relay_tunnels gauge"),
        "{text}"
    );
    assert!(!text.contains("# EOF"), "{text}");
    assert!(!text.contains("# UNIT"), "{text}");
    assert!(text.ends_with('\n'));
}

/// The `# TYPE` family names of an exposition.
fn families(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(String::from)
        .collect()
}

#[test]
fn each_role_exports_only_its_own_families() {
    use super::Roles;
    let m = super::metrics();
    // Children in every labelled family, so that none is left out for being empty.
    m.client_connections
        .get_or_create(&super::FrontResult {
            front: "http",
            result: "ok",
        })
        .inc_by(0);
    m.client_bytes
        .get_or_create(&super::Direction { direction: "up" })
        .inc_by(0);
    m.open_attempts
        .get_or_create(&super::Outcome { result: "ok" })
        .inc_by(0);
    m.gateway_open_attempts
        .get_or_create(&super::Outcome { result: "ok" })
        .inc_by(0);
    m.registry_operations
        .get_or_create(&super::Operation {
            operation: "list",
            result: "ok",
        })
        .inc_by(0);
    let agent = families(&m.encode_for(Roles::AGENT));
    let relay = families(&m.encode_for(Roles::RELAY));
    let gateway = families(&m.encode_for(Roles::GATEWAY));
    let server = families(&m.encode_for(Roles::SERVER));
    let all = families(&m.encode_for(Roles::ALL));
    let common = [
        "postern_build_info",
        "postern_config_last_reload_successful",
        "postern_config_last_reload_success_timestamp_seconds",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_virtual_memory_bytes",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "postern_stream_resets_total",
    ];
    for set in [&agent, &relay, &gateway, &server, &all] {
        for name in common {
            assert!(set.contains(name), "{name} missing from {set:?}");
        }
    }
    let own = |set: &std::collections::BTreeSet<String>| -> Vec<String> {
        set.iter()
            .filter(|n| !common.contains(&n.as_str()))
            .cloned()
            .collect()
    };
    assert_eq!(
        own(&agent),
        [
            "postern_agent_handshake_duration_seconds",
            "postern_agent_tunnels",
            "postern_agent_tunnels_by_transport",
        ]
    );
    assert_eq!(
        own(&relay),
        [
            "postern_registry_operations_total",
            "postern_relay_active_streams",
            "postern_relay_handshakes_refused_total",
            "postern_relay_lease_held",
            "postern_relay_tunnels",
            "postern_relay_tunnels_by_transport",
            "postern_relay_tunnels_refused_total",
        ]
    );
    assert_eq!(
        own(&gateway),
        [
            "postern_gateway_active_connections",
            "postern_gateway_bytes_total",
            "postern_gateway_connect_duration_seconds",
            "postern_gateway_connections_total",
            "postern_gateway_open_attempts_total",
            "postern_open_attempts_total",
            "postern_registry_operations_total",
            "postern_registry_view_age_seconds",
            "postern_routes_cached",
        ]
    );
    let union: std::collections::BTreeSet<String> = relay.union(&gateway).cloned().collect();
    assert_eq!(server, union, "a server exports relay + gateway");
    let union: std::collections::BTreeSet<String> = server.union(&agent).cloned().collect();
    assert_eq!(all, union, "demo exports every role's families");
}

#[test]
fn roles_add_up() {
    use super::Roles;
    assert!(Roles::SERVER.contains(Roles::RELAY));
    assert!(Roles::SERVER.contains(Roles::GATEWAY));
    assert!(!Roles::SERVER.contains(Roles::AGENT));
    assert_eq!(Roles::AGENT.union(Roles::SERVER), Roles::ALL);
    assert!(Roles::GATEWAY.intersects(Roles::SERVER));
    assert!(!Roles::AGENT.intersects(Roles::SERVER));
}

#[test]
fn process_figures_are_read_from_proc_and_sane() {
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // Hold a few descriptors open so the count cannot be read as zero by accident.
    let files: Vec<std::fs::File> = (0..5)
        .map(|_| std::fs::File::open("/proc/self/stat").unwrap())
        .collect();
    let p = super::ProcessStats::read();
    let open = p.open_fds.expect("open fds");
    assert!(open >= 5, "{p:?}");
    assert!(p.max_fds.expect("max fds") >= open, "{p:?}");
    let rss = p.resident_memory_bytes.expect("rss");
    assert!(rss > 1 << 20, "{p:?}");
    assert!(p.virtual_memory_bytes.expect("vsz") >= rss, "{p:?}");
    let cpu = p.cpu_seconds.expect("cpu");
    assert!((0.0..3600.0).contains(&cpu), "{p:?}");
    let start = p.start_time_seconds.expect("start time");
    // The test binary started within the last hour, and not after this test began (the
    // start time has a resolution of a clock tick).
    assert!(start <= before + 1.0 && start > before - 3600.0, "{p:?}");
    drop(files);
    let text = super::metrics().encode_for(super::Roles::AGENT);
    for line in [
        "# TYPE process_cpu_seconds_total counter",
        "# TYPE process_open_fds gauge",
        "# TYPE process_resident_memory_bytes gauge",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}

#[test]
fn a_refused_config_load_keeps_the_last_success_time() {
    let m = super::Metrics::new();
    m.record_config_load(true);
    assert_eq!(m.config_reload_successful.get(), 1);
    let when = m.config_reload_success_timestamp.get();
    assert!(when > 1.7e9, "{when}");
    m.record_config_load(false);
    assert_eq!(m.config_reload_successful.get(), 0);
    assert_eq!(m.config_reload_success_timestamp.get(), when);
}

#[test]
fn openmetrics_types_map_to_text_format_types() {
    let om = "# HELP a_info Build.\n# TYPE a_info info\na_info{v=\"1\"} 1\n\
              # HELP b_seconds B.\n# TYPE b_seconds counter\n# UNIT b_seconds seconds\n\
              b_seconds_total 2\n# EOF\n";
    assert_eq!(
        super::openmetrics_to_prometheus(om),
        "# HELP a_info Build.\n# TYPE a_info gauge\na_info{v=\"1\"} 1\n\
         # HELP b_seconds_total B.\n# TYPE b_seconds_total counter\nb_seconds_total 2\n"
    );
}
