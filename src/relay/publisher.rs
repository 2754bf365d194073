//! Writes the relay's routes to the registry off the data path. The session table is the truth:
//! changes are queued and applied in order; after any registry failure the publisher re-registers
//! the relay and reconciles — puts what is missing, deletes what is stale — before going on.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::sessions::SessionTable;
use crate::backoff::Backoff;
use crate::registry::{Error, Registry, RelayInfo, Route, RouteKey};

/// Most changes taken from the queue in one go.
const MAX_BATCH: usize = 4096;

/// Merges runs of consecutive puts (and of consecutive deletes) into one change each, keeping the
/// order between runs: a put followed by a delete of the same key must stay in that order.
fn coalesce(batch: Vec<Change>) -> Vec<Change> {
    let mut out: Vec<Change> = Vec::new();
    for change in batch {
        match (out.last_mut(), change) {
            (Some(Change::Put(routes)), Change::Put(more)) => routes.extend(more),
            (Some(Change::Delete(keys)), Change::Delete(more)) => keys.extend(more),
            (_, change) => out.push(change),
        }
    }
    out
}

/// A change for the registry.
#[derive(Debug)]
pub enum Change {
    Put(Vec<Route>),
    Delete(Vec<RouteKey>),
    /// Re-write the relay record (e.g. it started draining).
    Relay(RelayInfo),
}

pub struct Publisher {
    pub registry: Arc<dyn Registry>,
    pub sessions: Arc<SessionTable>,
    pub relay: RelayInfo,
    pub changes: mpsc::UnboundedReceiver<Change>,
    /// Set true once the relay is registered and in step; false while the registry is failing.
    pub in_sync: watch::Sender<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RouteKey;

    fn key(n: u64) -> RouteKey {
        RouteKey {
            namespace: "default".into(),
            ip: "10.0.0.1".parse().unwrap(),
            relay_id: "r".into(),
            session_id: n,
        }
    }

    fn put(n: u64) -> Change {
        Change::Put(vec![Route::new(key(n), "a".into(), vec![])])
    }

    #[test]
    fn coalescing_keeps_the_order_between_puts_and_deletes() {
        let out = coalesce(vec![
            put(1),
            put(2),
            Change::Delete(vec![key(1)]),
            Change::Delete(vec![key(2)]),
            put(1),
        ]);
        assert_eq!(out.len(), 3);
        assert!(matches!(&out[0], Change::Put(r) if r.len() == 2));
        assert!(matches!(&out[1], Change::Delete(k) if k.len() == 2));
        assert!(matches!(&out[2], Change::Put(r) if r.len() == 1 && r[0].key == key(1)));
    }
}

impl Publisher {
    /// Publishes until `shutdown`. Ends early with [`Error::IdTaken`] when another live relay
    /// holds this relay's id from the start and keeps it longer than its lease could outlive a
    /// crash: the relay must not run under a name it does not own.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), Error> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(2));
        let mut synced = false;
        let mut registered_once = false;
        // When a start-up id conflict is given up as permanent.
        let mut conflict_deadline: Option<Instant> = None;
        let mut epoch = self.registry.lease_epoch();
        // `postern_relay_lease_held` follows the registry's own view too: a quiet relay cut off from
        // etcd writes nothing that could fail, and its lease expires all the same.
        let mut liveness = tokio::time::interval(Duration::from_secs(1));
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            if !synced {
                match self.reconcile().await {
                    Ok(()) => {
                        synced = true;
                        registered_once = true;
                        conflict_deadline = None;
                        backoff.reset();
                        self.in_sync.send_replace(true);
                        crate::metrics::metrics().lease_held.set(1);
                    }
                    Err(err) => {
                        self.in_sync.send_replace(false);
                        crate::metrics::metrics().lease_held.set(0);
                        if let Error::IdTaken { ttl_secs, .. } = &err {
                            if !registered_once {
                                // A relay restarted after a crash finds its own previous lease
                                // holding the id: that one expires within its TTL. A live
                                // holder refreshes it and is still there after that.
                                let wait = Duration::from_secs(ttl_secs.max(&0).unsigned_abs())
                                    + Duration::from_secs(2);
                                let deadline =
                                    *conflict_deadline.get_or_insert_with(|| Instant::now() + wait);
                                if Instant::now() >= deadline {
                                    tracing::error!(%err, relay_id = %self.relay.id, "refusing to start");
                                    return Err(err);
                                }
                            }
                            tracing::warn!(%err, relay_id = %self.relay.id, "relay id held by another lease; waiting for it to expire");
                        } else {
                            tracing::warn!(%err, relay_id = %self.relay.id, "registry reconcile failed; retrying");
                        }
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(backoff.next_delay()) => continue,
                        }
                    }
                }
            }
            let first = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                c = self.changes.recv() => match c { Some(c) => c, None => return Ok(()) },
                _ = liveness.tick() => {
                    let held = synced && !self.registry.cut_off();
                    crate::metrics::metrics().lease_held.set(i64::from(held));
                    continue;
                }
                changed = epoch.changed() => {
                    if changed.is_ok() {
                        self.in_sync.send_replace(false);
                        crate::metrics::metrics().lease_held.set(0);
                        synced = false;
                    }
                    continue;
                }
            };
            // A burst (a relay restart brings thousands of agents back at once) goes out as a few
            // large transactions instead of one round trip per tunnel.
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.changes.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
            for change in coalesce(batch) {
                let result = match &change {
                    Change::Put(routes) => self.registry.put_routes(&self.relay.id, routes).await,
                    Change::Delete(keys) => self.registry.delete_routes(keys).await,
                    Change::Relay(info) => {
                        self.relay = info.clone();
                        self.registry.register_relay(info).await
                    }
                };
                let op = match &change {
                    Change::Put(_) => "put_routes",
                    Change::Delete(_) => "delete_routes",
                    Change::Relay(_) => "register_relay",
                };
                let label = if result.is_ok() { "ok" } else { "error" };
                crate::metrics::metrics()
                    .registry_operations
                    .get_or_create(&crate::metrics::Operation {
                        operation: op,
                        result: label,
                    })
                    .inc();
                if let Err(err) = result {
                    tracing::warn!(%err, relay_id = %self.relay.id, "registry write failed; will reconcile");
                    self.in_sync.send_replace(false);
                    crate::metrics::metrics().lease_held.set(0);
                    synced = false;
                    // The reconcile rewrites everything; the rest of this batch is in the table.
                    break;
                }
            }
        }
    }

    /// Registers the relay and makes its routes in the registry equal the session table. Changes
    /// queued meanwhile are drained first: the table already reflects them.
    async fn reconcile(&mut self) -> Result<(), Error> {
        while let Ok(change) = self.changes.try_recv() {
            if let Change::Relay(info) = change {
                self.relay = info;
            }
        }
        self.registry.register_relay(&self.relay).await?;
        // Only routes under this relay's own lease: never another process's, even one that
        // carries the same relay id.
        let present: BTreeSet<RouteKey> = self
            .registry
            .owned_routes(&self.relay.id)
            .await?
            .into_iter()
            .collect();
        let desired: BTreeMap<RouteKey, Route> = self
            .sessions
            .all()
            .iter()
            .flat_map(|s| s.routes(&self.relay.id))
            .map(|r| (r.key.clone(), r))
            .collect();
        let stale: Vec<RouteKey> = present
            .iter()
            .filter(|k| !desired.contains_key(*k))
            .cloned()
            .collect();
        let all: Vec<Route> = desired.into_values().collect();
        if !stale.is_empty() {
            self.registry.delete_routes(&stale).await?;
        }
        // Re-put every route, not only missing ones: a re-granted lease needs every key re-attached.
        for chunk in all.chunks(128) {
            self.registry.put_routes(&self.relay.id, chunk).await?;
        }
        tracing::debug!(routes = all.len(), stale = stale.len(), relay_id = %self.relay.id, "registry reconciled");
        Ok(())
    }
}
