//! The relay's lease keeper: refreshes one etcd lease every TTL/3 on a keep-alive stream, reopens
//! a broken stream for the same lease once etcd confirms it still has it, and bumps the registry's
//! lease epoch only when etcd says the lease is gone.

use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;

use crate::backoff::Backoff;

use super::{classify, timed_for, Error, REQUEST_TIMEOUT};

/// When etcd last confirmed the lease, shared with its keep-alive task.
#[derive(Clone)]
pub(super) struct Confirmed(std::sync::Arc<std::sync::Mutex<std::time::Instant>>);

impl Confirmed {
    pub(super) fn now() -> Self {
        Confirmed(std::sync::Arc::new(std::sync::Mutex::new(
            std::time::Instant::now(),
        )))
    }

    pub(super) fn touch(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
    }

    pub(super) fn elapsed(&self) -> Duration {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
    }
}

/// Why one keep-alive stream ended.
enum StreamEnd {
    /// etcd answered TTL 0: the lease is gone.
    Gone,
    /// The stream broke (reset connection, GOAWAY, timeout, leader change): the lease may well
    /// be alive.
    Broken(Error),
}

/// Refreshes `id` every TTL/3 on one keep-alive stream until etcd says the lease is gone or the
/// stream breaks.
async fn keep_alive_stream(
    client: &mut Client,
    id: i64,
    ttl: Duration,
    confirmed: &Confirmed,
) -> StreamEnd {
    let (mut keeper, mut responses) = match timed_for(Some(id), client.lease_keep_alive(id)).await {
        Ok(pair) => pair,
        Err(Error::LeaseNotFound { .. }) => return StreamEnd::Gone,
        Err(err) => return StreamEnd::Broken(err),
    };
    let mut tick = tokio::time::interval(ttl / 3);
    // A silent stream (a hung member, a blackholed path) is given up after one refresh period,
    // leaving two more within the TTL to reach etcd another way.
    let answer_within = (ttl / 3).clamp(Duration::from_secs(1), REQUEST_TIMEOUT);
    loop {
        tick.tick().await;
        if let Err(err) = keeper.keep_alive().await {
            return StreamEnd::Broken(classify(err, Some(id)));
        }
        match tokio::time::timeout(answer_within, responses.message()).await {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => confirmed.touch(),
            Ok(Ok(Some(_))) => return StreamEnd::Gone,
            Ok(Ok(None)) => {
                return StreamEnd::Broken(Error::Unavailable("keep-alive stream closed".into()))
            }
            Ok(Err(err)) => match classify(err, Some(id)) {
                Error::LeaseNotFound { .. } => return StreamEnd::Gone,
                err => return StreamEnd::Broken(err),
            },
            Err(_) => return StreamEnd::Broken(Error::Unavailable("keep-alive timed out".into())),
        }
    }
}

/// Whether a `LeaseTimeToLive` answer's TTL is a live lease. etcd 3.4 answers -1 for a lease it
/// does not know (expired or revoked) and the whole seconds left otherwise, truncated: a live lease
/// in its last second answers 0, and giving it up then would let it expire with every route under
/// it while a keep-alive could still have saved it.
fn lease_known(ttl: i64) -> bool {
    ttl >= 0
}

/// Whether etcd still knows lease `id`: `Ok(Some(remaining))`, `Ok(None)` when it is gone, an
/// error when etcd cannot say.
pub(super) async fn remaining_ttl(client: &mut Client, id: i64) -> Result<Option<i64>, Error> {
    match timed_for(Some(id), client.lease_time_to_live(id, None)).await {
        Ok(resp) if lease_known(resp.ttl()) => Ok(Some(resp.ttl())),
        Ok(_) | Err(Error::LeaseNotFound { .. }) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Keeps lease `id` alive for as long as etcd has it. A broken keep-alive stream is reopened for
/// the same lease once etcd confirms it still exists; only when etcd says it is gone does this end
/// and bump `epoch`, so the owner grants a new lease and re-puts every key. Never revokes: a lease
/// that may be alive holds every route of the relay.
pub(super) async fn keep_alive(
    mut client: Client,
    id: i64,
    ttl: Duration,
    epoch: watch::Sender<u64>,
    confirmed: Confirmed,
) {
    let max_delay = (ttl / 4).max(Duration::from_millis(200));
    let mut backoff = Backoff::new(Duration::from_millis(50), max_delay);
    loop {
        let opened = tokio::time::Instant::now();
        match keep_alive_stream(&mut client, id, ttl, &confirmed).await {
            StreamEnd::Gone => break,
            StreamEnd::Broken(err) => {
                tracing::warn!(lease = id, %err, "etcd keep-alive stream broke; keeping the same lease")
            }
        }
        // A stream that lived a while earned a quick retry; one that breaks at once backs off.
        if opened.elapsed() > ttl {
            backoff.reset();
        }
        loop {
            tokio::time::sleep(backoff.next_delay()).await;
            match remaining_ttl(&mut client, id).await {
                Ok(Some(remaining)) => {
                    tracing::info!(
                        lease = id,
                        remaining,
                        "etcd lease still held; reopening its keep-alive"
                    );
                    break;
                }
                Ok(None) => {
                    tracing::warn!(
                        lease = id,
                        "etcd lease expired; re-registering under a new one"
                    );
                    epoch.send_modify(|e| *e += 1);
                    return;
                }
                Err(err) => {
                    tracing::debug!(lease = id, %err, "etcd cannot say whether the lease lives; asking again")
                }
            }
        }
    }
    tracing::warn!(
        lease = id,
        "etcd lease expired; re-registering under a new one"
    );
    epoch.send_modify(|e| *e += 1);
}

#[cfg(test)]
mod tests {
    use super::lease_known;

    /// etcd 3.4's `LeaseTimeToLive` answers: -1 for a lease it does not know, the whole seconds left
    /// (truncated) for a live one, so 0 in its last second.
    #[test]
    fn a_lease_in_its_last_second_is_still_known() {
        assert!(!lease_known(-1));
        assert!(lease_known(0));
        assert!(lease_known(9));
    }
}
