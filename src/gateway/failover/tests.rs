use super::*;

fn owner(relay: &str, session: u64) -> Owner {
    Owner {
        relay_id: relay.into(),
        session_id: session,
        agent_id: "a".into(),
        draining: false,
        connected_at: 0,
        credential: None,
        transport: None,
    }
}

fn ids(owners: &[Owner]) -> Vec<(String, u64)> {
    owners
        .iter()
        .map(|o| (o.relay_id.to_string(), o.session_id))
        .collect()
}

#[test]
fn health_demotes_per_pair_and_restores_on_success() {
    let health = Health::default();
    let (a, b) = (owner("relay-1", 1), owner("relay-2", 2));
    health.learn(&a, Some(Cause::Timeout));
    assert!(health.is_demoted(&a));
    assert!(!health.is_demoted(&b), "another pair is untouched");
    assert!(
        !health.is_demoted(&owner("relay-1", 3)),
        "another session on the same relay is untouched"
    );
    for _ in 0..10 {
        health.demote(&a);
    }
    let until = health.marks.lock().unwrap()[&(a.relay_id.clone(), 1)].until;
    let longest = DEMOTE_BASE * (1 << (MAX_STRIKES - 1));
    assert!(until <= Instant::now() + longest, "demotion is capped");
    // A stale answer says nothing about the path; an answer from the agent restores it.
    health.learn(&a, Some(Cause::Stale(Code::NoSuchSession)));
    assert!(health.is_demoted(&a));
    health.learn(&a, Some(Cause::Refused(Code::ConnectionRefused)));
    assert!(!health.is_demoted(&a));
    for cause in [Cause::TunnelClosed, Cause::PeerUnreachable] {
        health.learn(&b, Some(cause));
        assert!(health.is_demoted(&b), "{cause:?} demotes");
        health.learn(&b, None);
        assert!(!health.is_demoted(&b));
    }
}

#[test]
fn order_puts_demoted_last_then_local_draining_and_down_relays() {
    let failover = Failover::default();
    let local = owner("relay-local", 1);
    let remote = owner("relay-2", 2);
    let down = owner("relay-3", 3);
    let draining = Owner {
        draining: true,
        ..owner("relay-4", 4)
    };
    failover
        .health
        .relay_reported("relay-3", Some(Instant::now() + Duration::from_secs(5)));
    let all = vec![
        down.clone(),
        draining.clone(),
        remote.clone(),
        local.clone(),
    ];
    for _ in 0..4 {
        let got = failover.order(all.clone(), Some("relay-local"));
        assert_eq!(
            ids(&got),
            ids(&[
                local.clone(),
                remote.clone(),
                down.clone(),
                draining.clone()
            ])
        );
    }
    // A demoted local pair goes behind every healthy owner, but is still tried.
    failover.health.demote(&local);
    let got = failover.order(all.clone(), Some("relay-local"));
    assert_eq!(ids(&got)[3], ids(std::slice::from_ref(&local))[0]);
    assert_eq!(got.len(), 4);
    // The pool reporting the relay up again clears its mark.
    failover.health.relay_reported("relay-3", None);
    assert!(!failover.health.relay_is_down("relay-3"));
    // Equal owners are rotated across calls.
    let equal = vec![owner("r-a", 1), owner("r-b", 2)];
    let firsts: std::collections::HashSet<_> = (0..4)
        .map(|_| failover.order(equal.clone(), None)[0].session_id)
        .collect();
    assert_eq!(firsts.len(), 2, "rotation spreads equal owners");
}

#[test]
fn causes_map_to_the_codes_clients_get_as_before() {
    for code in [
        Code::NotMine,
        Code::NotAllowed,
        Code::NoRoute,
        Code::NoSuchSession,
        Code::ConnectionRefused,
        Code::Unreachable,
        Code::Timeout,
        Code::Unauthorized,
        Code::Draining,
        Code::BadRequest,
        Code::Internal,
    ] {
        let cause = Cause::from_answer(code);
        assert_eq!(cause.code(), code, "{cause:?}");
        assert_eq!(
            cause.try_next_owner(),
            code.try_next_owner(),
            "{code:?} as {cause:?}"
        );
    }
    assert_eq!(Cause::PeerUnreachable.code(), Code::Internal);
    assert_eq!(Cause::TunnelClosed.code(), Code::Internal);
    assert_eq!(
        OpenError::before_open(Code::NotAllowed).cause,
        Cause::Denied(Code::NotAllowed)
    );
    assert_eq!(OpenError::before_open(Code::NoRoute).cause, Cause::NoRoute);
}

/// Timings short enough for a unit test, in the shipped proportions.
fn fast() -> Policy {
    Policy {
        open_timeout: Duration::from_millis(2000),
        attempt_timeout: Duration::from_millis(1200),
        hedge_delay: Duration::from_millis(200),
    }
}

/// Scheduling slack allowed on top of an exact figure.
const SLACK: Duration = Duration::from_millis(150);

fn about(got: Duration, want: Duration, what: &str) {
    assert!(
        got >= want && got < want + SLACK,
        "{what}: {got:?}, expected {want:?}"
    );
}

/// An attempt that answers `result` after `after`, recording when it started.
fn scripted(
    script: &[(u64, Duration, Result<u32, Cause>)],
    started: Arc<Mutex<Vec<(u64, bool, tokio::time::Instant)>>>,
) -> impl Fn(Owner, bool) -> std::pin::Pin<Box<dyn Future<Output = Result<u32, Cause>> + Send>> {
    let script: HashMap<u64, (Duration, Result<u32, Cause>)> =
        script.iter().map(|(s, d, r)| (*s, (*d, *r))).collect();
    move |owner: Owner, last_resort: bool| {
        started
            .lock()
            .unwrap()
            .push((owner.session_id, last_resort, tokio::time::Instant::now()));
        let (after, result) = script[&owner.session_id];
        Box::pin(async move {
            tokio::time::sleep(after).await;
            result
        })
    }
}

fn discarded(_: u32) {}

#[tokio::test]
async fn a_silent_owner_is_hedged_after_the_delay_and_demoted() {
    let failover = Failover::new(fast());
    let owners = vec![owner("relay-1", 1), owner("relay-2", 2)];
    let started = Arc::new(Mutex::new(Vec::new()));
    let script = [
        (1, Duration::from_secs(60), Ok(1)),
        (2, Duration::from_millis(50), Ok(2)),
    ];
    let t0 = tokio::time::Instant::now();
    let (got, by) = failover
        .open(
            owners.clone(),
            scripted(&script, started.clone()),
            discarded,
        )
        .await
        .expect("the hedge opens");
    let took = t0.elapsed();
    assert_eq!((got, by.session_id), (2, 2));
    let started = started.lock().unwrap().clone();
    assert_eq!(started.len(), 2);
    about(started[0].2 - t0, Duration::ZERO, "first attempt");
    about(started[1].2 - t0, fast().hedge_delay, "the hedge");
    assert!(
        started[1].1 && !started[0].1,
        "only the last owner is the last resort"
    );
    about(took, fast().hedge_delay + Duration::from_millis(50), "open");
    assert!(
        failover.health.is_demoted(&owners[0]),
        "the overtaken owner is demoted"
    );
    assert!(!failover.health.is_demoted(&owners[1]));
    // The next connection tries the healthy owner first.
    assert_eq!(failover.order(owners.clone(), None)[0].session_id, 2);
}

#[tokio::test]
async fn a_failed_owner_starts_the_next_at_once_and_a_definite_answer_ends_the_search() {
    let failover = Failover::new(fast());
    let owners = vec![
        owner("relay-1", 1),
        owner("relay-2", 2),
        owner("relay-3", 3),
    ];
    let started = Arc::new(Mutex::new(Vec::new()));
    let script = [
        (1, Duration::from_millis(10), Err(Cause::PeerUnreachable)),
        (
            2,
            Duration::from_millis(10),
            Err(Cause::Refused(Code::ConnectionRefused)),
        ),
        (3, Duration::from_millis(10), Ok(3)),
    ];
    let t0 = tokio::time::Instant::now();
    let err = failover
        .open(
            owners.clone(),
            scripted(&script, started.clone()),
            discarded,
        )
        .await
        .expect_err("a refusal ends the open");
    assert_eq!(err.cause, Cause::Refused(Code::ConnectionRefused));
    assert_eq!(err.code(), Code::ConnectionRefused);
    assert_eq!(err.owner.as_ref().map(|o| o.session_id), Some(2));
    assert_eq!(err.attempts, 2, "the third owner is not tried");
    let started = started.lock().unwrap().clone();
    about(
        started[1].2 - t0,
        Duration::from_millis(10),
        "no hedge delay after a failure",
    );
    assert!(failover.health.is_demoted(&owners[0]));
    assert!(!failover.health.is_demoted(&owners[1]));
}

#[tokio::test]
async fn every_owner_failing_reports_the_last_cause_and_owner() {
    let failover = Failover::new(fast());
    let owners = vec![owner("relay-1", 1), owner("relay-2", 2)];
    let started = Arc::new(Mutex::new(Vec::new()));
    let script = [
        (
            1,
            Duration::from_millis(5),
            Err(Cause::Stale(Code::NoSuchSession)),
        ),
        (2, Duration::from_secs(60), Ok(2)),
    ];
    let t0 = tokio::time::Instant::now();
    let err = failover
        .open(owners.clone(), scripted(&script, started), discarded)
        .await
        .expect_err("no owner answers in time");
    // The second attempt hits its own deadline well inside the open budget.
    assert_eq!(err.cause, Cause::Timeout);
    assert_eq!(err.owner.as_ref().map(|o| o.session_id), Some(2));
    assert_eq!(err.attempts, 2);
    about(
        t0.elapsed(),
        Duration::from_millis(5) + fast().attempt_timeout,
        "open",
    );
    assert!(
        !failover.health.is_demoted(&owners[0]),
        "stale says nothing"
    );
    assert!(failover.health.is_demoted(&owners[1]));
    assert_eq!(
        err.to_string(),
        "timed out (timeout) via relay relay-2 session 2 after 2 attempt(s)"
    );
}

#[tokio::test]
async fn the_open_budget_ends_an_open_whose_attempts_all_hang() {
    let failover = Failover::new(Policy {
        open_timeout: Duration::from_millis(500),
        ..fast()
    });
    let owners = vec![owner("relay-1", 1), owner("relay-2", 2)];
    let started = Arc::new(Mutex::new(Vec::new()));
    let script = [
        (1, Duration::from_secs(60), Ok(1)),
        (2, Duration::from_secs(60), Ok(2)),
    ];
    let t0 = tokio::time::Instant::now();
    let err = failover
        .open(owners, scripted(&script, started), discarded)
        .await
        .expect_err("the budget runs out");
    about(t0.elapsed(), Duration::from_millis(500), "open");
    assert_eq!(err.cause, Cause::Timeout);
    assert_eq!(err.owner.map(|o| o.session_id), Some(1));
}
