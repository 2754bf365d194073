use super::*;

#[test]
fn percentiles_use_nearest_rank() {
    let samples: Vec<u64> = (1..=1000).map(|i| i * 1000).collect();
    let l = Latency::from_nanos(samples).unwrap();
    assert_eq!(l.count, 1000);
    assert_eq!(l.p50_us, 500.0);
    assert_eq!(l.p90_us, 900.0);
    assert_eq!(l.p99_us, 990.0);
    assert_eq!(l.p999_us, 999.0);
    assert_eq!(l.min_us, 1.0);
    assert_eq!(l.max_us, 1000.0);
    let one = Latency::from_nanos(vec![7000]).unwrap();
    assert_eq!((one.p50_us, one.p999_us), (7.0, 7.0));
    assert!(Latency::from_nanos(Vec::new()).is_none());
}

#[test]
fn error_kinds_are_bounded() {
    let mut e = Errors::default();
    for i in 0..100 {
        e.note(format!("kind {i}"));
    }
    assert_eq!(e.total, 100);
    assert!(e.kinds.len() <= MAX_ERROR_KINDS + 1);
    assert_eq!(e.kinds.values().sum::<u64>(), 100);
    let mut merged = Errors::default();
    merged.note("kind 0".into());
    merged.merge(e);
    assert_eq!(merged.total, 101);
    assert_eq!(merged.kinds.values().sum::<u64>(), 101);
}

#[test]
fn table_has_ratios_and_dashes_for_missing_runs() {
    let lines = [
        r#"{"path":"direct","test":"tput1","result":{"gbit_per_s":20.0,"errors":{"total":0}}}"#,
        r#"{"path":"colocated","test":"tput1","result":{"gbit_per_s":2.0,"errors":{"total":1}}}"#,
        r#"{"path":"twohop","test":"tput1","result":{"gbit_per_s":1.5,"errors":{"total":0}}}"#,
        r#"{"path":"direct","test":"rtt","result":{"latency":{"p50_us":20.0}}}"#,
        r#"{"path":"direct","test":"rtt","result":{"latency":{"p50_us":10.0}}}"#,
        r#"{"path":"direct","test":"rtt","result":{"latency":{"p50_us":900.0}}}"#,
        r#"{"path":"colocated","test":"rtt","result":{"latency":{"p50_us":80.0}}}"#,
        r#"{"path":"quic","test":"quic","result":{"gbit_per_s":4.0}}"#,
    ]
    .join("\n");
    let t = table(&lines).unwrap();
    let expect_row = |prefix: &str| {
        assert!(
            t.lines().any(|l| l.starts_with(prefix)),
            "no row {prefix} in\n{t}"
        );
    };
    expect_row("| throughput, 1 connection (Gbit/s) | 20.00 | 2.00 | 1.50 | 10% | 8% | 75% |");
    expect_row("| round trip p50 (µs) | 20.0 | 80.0 | — | 4.00× | — | — |");
    expect_row("| throughput, 1 connection ÷ QUIC ceiling (%) | — | 50 | 38 |");
    expect_row("| errors (all runs on this path) | 0 | 1 | 0 |");
    let with_plain = format!(
        "{lines}\n{}\n{}\n{}",
        r#"{"path":"direct","test":"connect1","result":{"connections_per_s":4000.0}}"#,
        r#"{"path":"socks5","test":"connect1","result":{"connections_per_s":1600.0}}"#,
        r#"{"path":"colocated","test":"connect1","result":{"connections_per_s":1200.0}}"#
    );
    let t = table(&with_plain).unwrap();
    assert!(
        t.contains(
            "no tunnel, new connections/s, sequential | 1600 | — | — | — | — | — | 40% of direct"
        ),
        "{t}"
    );
    assert!(
        t.contains("| new connections/s, sequential ÷ `bench socks5` (%) | — | 75 | — |"),
        "{t}"
    );
    assert!(table("not json").is_err());
    // The swarm's memory, at registration and (when sampled) once held.
    let swarm = [
        r#"{"path":"swarm","test":"swarm","result":{"agents":100,"welcome_all_s":1.5}}"#,
        r#"{"path":"swarm","test":"relay_rss","result":{"per_tunnel_kib":34.04}}"#,
    ]
    .join("\n");
    let t = table(&swarm).unwrap();
    assert!(
        t.contains("| swarm: relay memory per idle tunnel, 100 tunnels (KiB) | — | — | 34.0 |"),
        "{t}"
    );
    assert!(!t.contains("held"), "{t}");
    let held =
        r#"{"path":"swarm","test":"relay_rss_held","result":{"held_s":25,"per_tunnel_kib":39.04}}"#;
    let t = table(&format!("{swarm}\n{held}")).unwrap();
    assert!(
        t.contains("| swarm: relay memory per idle tunnel, the tunnels held 25 s more (KiB) | — | — | 39.0 | — | — | — | ≤ 40 KiB |"),
        "{t}"
    );
}

#[test]
fn peers_table_compares_postern_with_each_peer_and_fakes_no_missing_one() {
    let lines = [
        r#"{"path":"colocated","test":"rtt","result":{"latency":{"p50_us":90.0}}}"#,
        r#"{"path":"rathole-tcp","test":"rtt","result":{"latency":{"p50_us":100.0}}}"#,
        r#"{"path":"colocated","test":"connect1","result":{"connections_per_s":1000.0,"errors":{"total":0}}}"#,
        r#"{"path":"rathole-tcp","test":"connect1","result":{"connections_per_s":2000.0}}"#,
        r#"{"path":"rathole-tcp","test":"connect1","result":{"connections_per_s":1000.0}}"#,
        r#"{"path":"rathole-tcp","test":"connect1","result":{"connections_per_s":3000.0}}"#,
        r#"{"path":"rathole-noise","test":"connect1","result":{"connections_per_s":800.0}}"#,
    ]
    .join("\n");
    let t = peers_table(&lines).unwrap();
    let row = |prefix: &str| {
        t.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no row {prefix} in\n{t}"))
            .to_string()
    };
    // Medians of the runs; a path with no runs is all dashes.
    assert!(row("| rathole, TCP transport").contains("| — | — | 2000 | — | 100.0 |"));
    assert!(row("| microsocks")
        .starts_with("| microsocks (SOCKS5, no tunnel) | — | — | — | — | — | — | — |"));
    // More is better for rates, less for the round trip.
    let vs_tcp = row("| postern server + agent ÷ rathole, TCP transport |");
    assert!(vs_tcp.contains("| 0.50× trails |"), "{vs_tcp}");
    assert!(vs_tcp.contains("| 0.90× leads |"), "{vs_tcp}");
    assert!(row("| postern server + agent ÷ rathole, Noise").contains("| 1.25× leads |"));
    assert!(row("| round trip p50 ≤ rathole TCP's").contains("| 90.0 µs vs 100.0 µs | met |"));
    assert!(row("| conn/s sequential ≥").contains("| **not met** |"));
    assert!(row("| conn/s with 8 workers").contains("| not measured |"));
}

#[test]
fn cpu_time_becomes_cost_per_unit_of_work_and_the_ceilings_it_allows() {
    // 2 cores; each load ran 1 s of wall time.
    let cpu = |processes: f64, client: f64| {
        format!(r#""cpu":{{"cores":2,"wall_s":1.0,"client_s":{client},"processes_s":{processes}}}"#)
    };
    let lines = [
        format!(
            r#"{{"path":"colocated","test":"tput1","result":{{"gbit_per_s":2.0,{}}}}}"#,
            cpu(1.5, 0.25)
        ),
        format!(
            r#"{{"path":"colocated","test":"tput8","result":{{"gbit_per_s":2.2,{}}}}}"#,
            cpu(1.65, 0.25)
        ),
        format!(
            r#"{{"path":"twohop","test":"tput1","result":{{"gbit_per_s":1.0,{}}}}}"#,
            cpu(1.5, 0.1)
        ),
        format!(
            r#"{{"path":"colocated","test":"rtt","result":{{"round_trips_per_s":4000.0,"latency":{{"p50_us":250.0}},{}}}}}"#,
            cpu(0.8, 0.2)
        ),
        format!(
            r#"{{"path":"rathole-tcp","test":"rtt","result":{{"round_trips_per_s":5000.0,"latency":{{"p50_us":200.0}},{}}}}}"#,
            cpu(0.4, 0.1)
        ),
        // A result without a CPU record (an older results file) gives dashes, not zeros.
        r#"{"path":"rathole-tcp","test":"tput1","result":{"gbit_per_s":3.0}}"#.to_string(),
    ]
    .join("\n");

    let t = table(&lines).unwrap();
    let row = |t: &str, prefix: &str| {
        t.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no row {prefix} in\n{t}"))
            .to_string()
    };
    // (1.5 + 0.25) / 1 s = 1.75 cores; 1.75 CPU-s each second over 0.25 GB = 7 s per GB.
    assert!(row(&t, "| cores busy").contains("| — | 1.75 | 1.60 | — | — | — |"));
    assert!(row(
        &t,
        "| CPU-seconds per GB moved (every process, the client too), 1 connection"
    )
    .contains("| — | 7.00 | 12.80 | — | — | 1.83× |"));
    // 1 core-second over 4,000 round trips.
    assert!(row(&t, "| CPU µs per round trip").contains("| — | 250 | — |"));

    let t = peers_table(&lines).unwrap();
    assert!(t.contains("Where the CPU goes"), "{t}");
    assert!(row(
        &t,
        "| rathole, TCP transport (no encryption) | — | — | — | — | — | 100 |"
    )
    .ends_with("| 100 |"));
    assert!(row(
        &t,
        "| postern server + agent ÷ rathole, TCP transport | — | — | — | — | — | 2.50× trails |"
    )
    .ends_with("trails |"));
    let rtt = row(&t, "| round trip p50 ≤ rathole TCP's");
    assert!(
        rtt.contains("| 250.0 µs vs 200.0 µs | **not met** | CPU per round trip: 250 µs against rathole TCP's 100 µs |"),
        "{rtt}"
    );
    // 8 connections at 8 × 1.9 / 2.2 = 6.91 CPU-s per GB on 2 cores: 2.32 Gbit/s, 1.16× one.
    let scaling = row(&t, "| 8-connection throughput ≥ 1.3× 1-connection");
    assert!(
        scaling.contains("| 1.10× | **not met** | one connection kept 1.75 of 2 cores busy"),
        "{scaling}"
    );
    assert!(
        scaling.contains("they would move 2.32 Gbit/s: 1.16× one connection |"),
        "{scaling}"
    );
    // Two-hop at 12.8 CPU-s per GB on 2 cores: 1.25 Gbit/s, 62% of co-located's 2.0.
    let two = row(&t, "| two-hop throughput ≥ 70% of co-located");
    assert!(two.contains("| 50% | **not met** | with every core busy at the two-hop path's CPU per GB (12.80 s, co-located 7.00 s) it would move 1.25 Gbit/s: 62% of co-located |"), "{two}");
}
