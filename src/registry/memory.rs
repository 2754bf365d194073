//! The embedded registry: the same model as etcd (revisions, a bounded change history, watches that
//! resume after a revision and reset when it was compacted away) inside one process.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::{broadcast, mpsc, watch};

use super::{Error, Event, Registry, RelayInfo, Route, RouteKey, Snapshot, WatchItem};

/// How many past changes a watch can resume from; older ones are "compacted".
const HISTORY: usize = 65_536;

#[derive(Default)]
struct State {
    revision: i64,
    routes: BTreeMap<RouteKey, Route>,
    relays: BTreeMap<String, RelayInfo>,
    history: VecDeque<(i64, Event)>,
}

/// An in-process [`Registry`].
pub struct MemoryRegistry {
    state: Mutex<State>,
    changes: broadcast::Sender<(i64, Event)>,
    /// Never bumped: an in-process registry cannot lose a lease.
    epoch: watch::Sender<u64>,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryRegistry {
    pub fn new() -> Self {
        MemoryRegistry {
            state: Mutex::new(State::default()),
            changes: broadcast::channel(HISTORY).0,
            epoch: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a way readers care
        // about (each mutation is a single map operation), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, state: &mut State, event: Event) {
        state.revision += 1;
        match &event {
            Event::PutRoute(r) => {
                state.routes.insert(r.key.clone(), r.clone());
            }
            Event::DeleteRoute(k) => {
                state.routes.remove(k);
            }
            Event::PutRelay(r) => {
                state.relays.insert(r.id.clone(), r.clone());
            }
            Event::DeleteRelay(id) => {
                state.relays.remove(id);
            }
        }
        if state.history.len() == HISTORY {
            state.history.pop_front();
        }
        state.history.push_back((state.revision, event.clone()));
        // No receivers is fine: nobody is watching yet.
        let _ = self.changes.send((state.revision, event));
    }
}

#[async_trait::async_trait]
impl Registry for MemoryRegistry {
    async fn register_relay(&self, relay: &RelayInfo) -> Result<(), Error> {
        let mut state = self.lock();
        self.apply(&mut state, Event::PutRelay(relay.clone()));
        Ok(())
    }

    async fn deregister_relay(&self, relay_id: &str) -> Result<(), Error> {
        let mut state = self.lock();
        let owned: Vec<RouteKey> = state
            .routes
            .keys()
            .filter(|k| k.relay_id == relay_id)
            .cloned()
            .collect();
        for key in owned {
            self.apply(&mut state, Event::DeleteRoute(key));
        }
        if state.relays.contains_key(relay_id) {
            self.apply(&mut state, Event::DeleteRelay(relay_id.to_string()));
        }
        Ok(())
    }

    async fn put_routes(&self, relay_id: &str, routes: &[Route]) -> Result<(), Error> {
        let mut state = self.lock();
        if !state.relays.contains_key(relay_id) {
            return Err(Error::NotRegistered(relay_id.to_string()));
        }
        for route in routes {
            self.apply(&mut state, Event::PutRoute(route.clone()));
        }
        Ok(())
    }

    async fn delete_routes(&self, keys: &[RouteKey]) -> Result<(), Error> {
        let mut state = self.lock();
        for key in keys {
            if state.routes.contains_key(key) {
                self.apply(&mut state, Event::DeleteRoute(key.clone()));
            }
        }
        Ok(())
    }

    async fn owned_routes(&self, relay_id: &str) -> Result<Vec<RouteKey>, Error> {
        let state = self.lock();
        Ok(state
            .routes
            .keys()
            .filter(|k| k.relay_id == relay_id)
            .cloned()
            .collect())
    }

    async fn snapshot(&self) -> Result<Snapshot, Error> {
        let state = self.lock();
        Ok(Snapshot {
            revision: state.revision,
            routes: state.routes.values().cloned().collect(),
            relays: state.relays.values().cloned().collect(),
        })
    }

    async fn watch(&self, after_revision: i64) -> Result<mpsc::Receiver<WatchItem>, Error> {
        let (tx, rx) = mpsc::channel(1024);
        // Subscribing and reading the history under one lock means no change falls between them.
        let (replay, mut changes, compacted) = {
            let state = self.lock();
            let oldest = state
                .history
                .front()
                .map_or(state.revision + 1, |(rev, _)| *rev);
            let compacted = after_revision + 1 < oldest && after_revision < state.revision;
            let replay: Vec<(i64, Event)> = state
                .history
                .iter()
                .filter(|(rev, _)| *rev > after_revision)
                .cloned()
                .collect();
            (replay, self.changes.subscribe(), compacted)
        };
        tokio::spawn(async move {
            if compacted {
                let _ = tx.send(WatchItem::Reset).await;
                return;
            }
            let mut last = after_revision;
            for (revision, event) in replay {
                last = revision;
                if tx
                    .send(WatchItem::Events {
                        revision,
                        events: vec![event],
                    })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            // Nothing stands between this watch and the registry: confirm the view every second.
            let mut progress = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                let change = tokio::select! {
                    c = changes.recv() => c,
                    _ = progress.tick() => {
                        if tx.send(WatchItem::Progress { revision: last }).await.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                match change {
                    Ok((revision, _)) if revision <= last => continue,
                    Ok((revision, event)) => {
                        last = revision;
                        if tx
                            .send(WatchItem::Events {
                                revision,
                                events: vec![event],
                            })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(WatchItem::Reset).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(rx)
    }

    fn lease_epoch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::unix_now;

    fn relay(id: &str) -> RelayInfo {
        RelayInfo {
            id: id.into(),
            peer_addr: None,
            version: "test".into(),
            started_at: unix_now(),
            draining: false,
        }
    }

    fn route(relay: &str, ip: &str, session: u64) -> Route {
        Route::new(
            RouteKey {
                namespace: "default".into(),
                ip: ip.parse().unwrap(),
                relay_id: relay.into(),
                session_id: session,
            },
            "a".into(),
            vec![],
        )
    }

    #[tokio::test]
    async fn watch_resumes_after_snapshot_revision_without_gaps() {
        let reg = MemoryRegistry::new();
        reg.register_relay(&relay("r1")).await.unwrap();
        reg.put_routes("r1", &[route("r1", "10.0.0.1", 1)])
            .await
            .unwrap();
        let snap = reg.snapshot().await.unwrap();
        assert_eq!(snap.routes.len(), 1);
        reg.put_routes("r1", &[route("r1", "10.0.0.2", 2)])
            .await
            .unwrap();
        let mut rx = reg.watch(snap.revision).await.unwrap();
        reg.delete_routes(&[route("r1", "10.0.0.1", 1).key])
            .await
            .unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            match rx.recv().await.unwrap() {
                WatchItem::Events { events, .. } => seen.extend(events),
                WatchItem::Progress { .. } => {}
                WatchItem::Reset => panic!("unexpected reset"),
            }
        }
        assert!(matches!(&seen[0], Event::PutRoute(r) if r.key.session_id == 2));
        assert!(matches!(&seen[1], Event::DeleteRoute(k) if k.session_id == 1));
    }

    #[tokio::test]
    async fn routes_need_a_registered_relay_and_vanish_with_it() {
        let reg = MemoryRegistry::new();
        assert!(reg
            .put_routes("r1", &[route("r1", "10.0.0.1", 1)])
            .await
            .is_err());
        reg.register_relay(&relay("r1")).await.unwrap();
        reg.register_relay(&relay("r2")).await.unwrap();
        reg.put_routes("r1", &[route("r1", "10.0.0.1", 1)])
            .await
            .unwrap();
        reg.put_routes("r2", &[route("r2", "10.0.0.1", 1)])
            .await
            .unwrap();
        reg.deregister_relay("r1").await.unwrap();
        let snap = reg.snapshot().await.unwrap();
        assert_eq!(snap.routes.len(), 1);
        assert_eq!(snap.routes[0].key.relay_id, "r2");
        assert_eq!(snap.relays.len(), 1);
    }
}
