//! Cluster and high availability, with real processes: etcd, relays, gateways and agents on
//! 127.0.0.0/8. Each test runs its own etcd (TLS only, client certificates required, as in
//! production) and its own address range (127.N.0.0/16).

mod harness;
#[path = "../process/mod.rs"]
mod process;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{tally, transfer, wait_for, Cluster, Load, Outcome, LEASE_TTL};

/// a. 3 relays, 2 gateways, 20 agents with redundancy 2: every agent has routes on 2 distinct
/// relays, and every agent is reachable through either gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_on_two_relays_reachable_through_either_gateway() {
    let cluster = Cluster::start(31, 3, 2, 20).await;
    cluster
        .wait_redundancy(2, &[], Duration::from_secs(30))
        .await;
    let routes = cluster.etcd.routes().await;
    for agent in &cluster.agents {
        let relays = &routes[&IpAddr::V4(agent.ip)];
        assert_eq!(relays.len(), 2, "{} is on {relays:?}", agent.id);
    }
    for (gateway, socks) in &cluster.gateways {
        for (i, agent) in cluster.agents.iter().enumerate() {
            let outcome = transfer(*socks, agent.target(), 64 * 1024, i as u64).await;
            if outcome != Outcome::Ok {
                cluster.dump_logs();
            }
            assert_eq!(
                outcome,
                Outcome::Ok,
                "{} through {}",
                agent.id,
                gateway.name
            );
        }
    }
}

/// b. kill -9 of a relay under continuous load: no new connection fails later than 1 s after the
/// kill, every completed transfer is byte-exact, the dead relay's routes leave etcd within the lease
/// TTL, and the agents regain 2 distinct tunnels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_under_load() {
    let mut cluster = Cluster::start(32, 3, 1, 6).await;
    cluster
        .wait_redundancy(2, &[], Duration::from_secs(30))
        .await;
    let targets: Vec<SocketAddr> = cluster.agents.iter().map(|a| a.target()).collect();
    let load = Load::start(cluster.gateways[0].1, targets, 32 * 1024);
    load.wait_transfers(30).await;

    let dead = cluster.relays[0].id.clone();
    let mut victim = cluster.relays[0].proc.take().unwrap();
    victim.child.kill().await.unwrap();
    let killed_at = Instant::now();

    let gone = wait_for(
        LEASE_TTL + Duration::from_secs(3),
        "the dead relay's routes to leave etcd",
        || async {
            let routes = cluster.etcd.routes().await;
            (!routes.values().any(|relays| relays.contains(&dead))).then(|| killed_at.elapsed())
        },
    )
    .await;
    cluster
        .wait_redundancy(2, &[&dead], Duration::from_secs(20))
        .await;
    let regained = killed_at.elapsed();
    load.wait_transfers(30).await;
    let results = load.finish().await;

    let (ok, failed, corrupt) = tally(&results);
    let late_failures: Vec<_> = results
        .iter()
        .filter(|(at, o)| {
            matches!(o, Outcome::Failed(_)) && *at > killed_at + Duration::from_secs(1)
        })
        .collect();
    let longest_gap = longest_gap(&results, killed_at);
    eprintln!(
        "relay kill: {ok} ok, {failed} failed, {corrupt} corrupt; routes gone after {gone:?}; \
         redundancy regained after {regained:?}; longest wait for a connection after the kill {longest_gap:?}"
    );
    assert_eq!(corrupt, 0, "corrupted transfers: {results:?}");
    assert!(
        late_failures.is_empty(),
        "connections failed more than 1s after the kill: {late_failures:?}"
    );
    assert!(
        gone <= LEASE_TTL + Duration::from_secs(2),
        "routes left only after {gone:?}"
    );
    assert!(ok > 50, "too little load went through: {ok}");
}

/// The longest time a connection started after `from` took (the failover gap seen by clients).
fn longest_gap(results: &[(Instant, Outcome)], from: Instant) -> Duration {
    results
        .windows(2)
        .filter(|w| w[0].0 >= from)
        .map(|w| w[1].0.duration_since(w[0].0))
        .max()
        .unwrap_or_default()
}

/// c. Rolling restart (SIGTERM, then start again) of all 3 relays, one at a time, under continuous
/// load: zero failed new connections, zero corrupted transfers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_fails_nothing() {
    let mut cluster = Cluster::start(33, 3, 1, 6).await;
    cluster
        .wait_redundancy(2, &[], Duration::from_secs(30))
        .await;
    let targets: Vec<SocketAddr> = cluster.agents.iter().map(|a| a.target()).collect();
    let load = Load::start(cluster.gateways[0].1, targets, 32 * 1024);
    load.wait_transfers(30).await;
    for i in 0..cluster.relays.len() {
        let mut proc = cluster.relays[i].proc.take().unwrap();
        proc.signal("TERM");
        let status = proc.wait_exit(Duration::from_secs(15)).await;
        assert!(
            status.success(),
            "{} exited with {status}",
            cluster.relays[i].id
        );
        cluster.start_relay(i).await;
        cluster
            .wait_redundancy(2, &[], Duration::from_secs(30))
            .await;
    }
    load.wait_transfers(30).await;
    let results = load.finish().await;
    let (ok, failed, corrupt) = tally(&results);
    eprintln!("rolling restart: {ok} ok, {failed} failed, {corrupt} corrupt");
    if failed + corrupt > 0 {
        cluster.dump_logs();
    }
    let bad: Vec<_> = results.iter().filter(|(_, o)| *o != Outcome::Ok).collect();
    assert!(
        bad.is_empty(),
        "failed or corrupt transfers during the rolling restart: {bad:?}"
    );
    assert!(ok > 50, "too little load went through: {ok}");
}

/// d. etcd stopped for 30 s under load: existing routes keep working; an agent that connects during
/// the outage becomes reachable through the other gateway within seconds of etcd's return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_keeps_traffic_flowing() {
    let mut cluster = Cluster::start(34, 2, 2, 4).await;
    cluster
        .wait_redundancy(2, &[], Duration::from_secs(30))
        .await;
    let targets: Vec<SocketAddr> = cluster.agents.iter().map(|a| a.target()).collect();
    let load = Load::start(cluster.gateways[0].1, targets, 16 * 1024);
    load.wait_transfers(30).await;

    cluster.etcd.stop().await;
    let outage = Instant::now();
    // The outage's length is the point of this test: 2 s before the late agent starts, 28 s after.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.add_agent(4).await;
    let late = cluster.agents[4].target();
    tokio::time::sleep(Duration::from_secs(28)).await;
    cluster.etcd.start().await;
    let returned = Instant::now();
    let other_gateway = cluster.gateways[1].1;
    let reachable_after = wait_for(
        Duration::from_secs(15),
        "the late agent through the other gateway",
        || async {
            (transfer(other_gateway, late, 1024, 7).await == Outcome::Ok)
                .then(|| returned.elapsed())
        },
    )
    .await;
    let results = load.finish().await;
    let during: Vec<_> = results
        .iter()
        .filter(|(at, _)| *at >= outage && *at < returned)
        .collect();
    let (ok, failed, corrupt) = tally(&results);
    eprintln!(
        "etcd outage of {:?}: {ok} ok, {failed} failed, {corrupt} corrupt ({} during the outage); \
         late agent reachable {reachable_after:?} after etcd returned",
        returned - outage,
        during.len()
    );
    assert!(
        during.len() > 100,
        "too little load during the outage: {}",
        during.len()
    );
    let bad: Vec<_> = results.iter().filter(|(_, o)| *o != Outcome::Ok).collect();
    assert!(
        bad.is_empty(),
        "transfers failed while etcd was down: {bad:?}"
    );
}

/// e. Stale routes — a session that no longer exists, or another agent's session named for an IP —
/// never deliver a byte to the wrong host; the gateway falls through to the real owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_routes_never_reach_the_wrong_host() {
    let cluster = Cluster::start(35, 2, 1, 2).await;
    cluster
        .wait_redundancy(2, &[], Duration::from_secs(30))
        .await;
    let (a, b) = (&cluster.agents[0], &cluster.agents[1]);
    // B's real session on each relay, from etcd.
    let mut client = cluster.etcd.client().await.unwrap();
    let prefix = format!("/postern/routes/default/{}/", b.ip);
    let resp = client
        .get(
            prefix.clone(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let b_sessions: Vec<String> = resp
        .kvs()
        .iter()
        .map(|kv| {
            kv.key_str()
                .unwrap()
                .trim_start_matches(&prefix)
                .to_string()
        })
        .collect();
    assert_eq!(b_sessions.len(), 2);
    let value = resp.kvs()[0].value().to_vec();
    // Stale routes for A's IP: B's live sessions (an IP now "held" by another agent's session), and
    // sessions that never existed.
    for relay_session in b_sessions
        .iter()
        .cloned()
        .chain(["relay-0/1".to_string(), "relay-1/2".to_string()])
    {
        client
            .put(
                format!("/postern/routes/default/{}/{relay_session}", a.ip),
                value.clone(),
                None,
            )
            .await
            .unwrap();
    }
    let b_before = b.echo.accepted();
    let socks = cluster.gateways[0].1;
    for i in 0..40 {
        let outcome = transfer(socks, a.target(), 8 * 1024, i).await;
        assert_eq!(outcome, Outcome::Ok, "transfer {i} to {}", a.ip);
    }
    assert_eq!(b.echo.accepted(), b_before, "B's service was dialled");
}

/// f. A gateway started against 10,000 routes already in etcd reports ready only when its cache
/// holds them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_ready_only_with_every_route() {
    postern::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let etcd = harness::Etcd::started_tls(dir.path()).await;
    let registry: Arc<dyn postern::registry::Registry> = Arc::new(
        postern::registry::etcd::EtcdRegistry::connect_with(
            &[etcd.url.clone()],
            "/postern",
            Duration::from_secs(30),
            &etcd.security(),
        )
        .await
        .unwrap(),
    );
    let relay = postern::registry::RelayInfo {
        id: "bulk".into(),
        peer_addr: Some("127.0.0.1:9".parse().unwrap()),
        version: "test".into(),
        started_at: 0,
        draining: false,
    };
    registry.register_relay(&relay).await.unwrap();
    let routes: Vec<postern::registry::Route> = (0..10_000u32)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
            postern::registry::Route::new(
                postern::registry::RouteKey {
                    namespace: "default".into(),
                    ip: IpAddr::V4(ip),
                    relay_id: "bulk".into(),
                    session_id: u64::from(i),
                },
                format!("a{i}"),
                vec![],
            )
        })
        .collect();
    let put_started = Instant::now();
    registry.put_routes("bulk", &routes).await.unwrap();
    let put_took = put_started.elapsed();

    let cache = Arc::new(postern::registry::cache::RouteCache::new());
    assert!(!cache.is_ready());
    let stop = tokio_util::sync::CancellationToken::new();
    let gateway_registry: Arc<dyn postern::registry::Registry> = Arc::new(
        postern::registry::etcd::EtcdRegistry::connect_with(
            &[etcd.url.clone()],
            "/postern",
            Duration::from_secs(30),
            &etcd.security(),
        )
        .await
        .unwrap(),
    );
    let started = Instant::now();
    let task = tokio::spawn(cache.clone().run(gateway_registry, stop.clone()));
    // Sample readiness while the list loads: whenever it reads ready, every route must be there.
    let mut samples = 0;
    loop {
        let ready = cache.is_ready();
        let count = cache.route_count();
        if ready {
            assert_eq!(count, 10_000, "ready with only {count} routes");
            break;
        }
        samples += 1;
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "cache not ready within 20s"
        );
        tokio::task::yield_now().await;
    }
    eprintln!(
        "10,000 routes: put in {put_took:?}, gateway ready after {:?} ({samples} samples)",
        started.elapsed()
    );
    stop.cancel();
    task.await.unwrap();
}
