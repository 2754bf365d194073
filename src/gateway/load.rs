//! What this process's front doors carry through each relay right now: connections in flight and
//! bytes moved, per relay id. The status page turns the bytes into a rate per relay. Only this
//! gateway's own traffic is known here (relays do not publish their load), so in a split
//! deployment each gateway's page shows its share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use serde::Serialize;

use crate::splice::Progress;

/// One relay's figures, as `/api/relays` adds them under `through_this_gateway`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RelayFigures {
    /// Client connections carried through that relay now.
    pub streams: u64,
    /// Bytes moved both ways through it since start, open connections included.
    pub bytes: u64,
}

#[derive(Default)]
struct Entry {
    streams: u64,
    /// Bytes of the connections that have ended.
    finished: u64,
    /// The open connections' meters, by a number unique in this entry.
    live: HashMap<u64, Weak<Progress>>,
}

/// The per-relay load of this process's front doors.
#[derive(Default)]
pub struct RelayLoad {
    relays: Mutex<HashMap<Arc<str>, Entry>>,
    next: std::sync::atomic::AtomicU64,
}

/// This process's load table.
pub fn relay_load() -> &'static RelayLoad {
    static LOAD: OnceLock<RelayLoad> = OnceLock::new();
    LOAD.get_or_init(RelayLoad::default)
}

impl RelayLoad {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Entry>> {
        // Plain counters: a poisoned lock still holds consistent figures.
        self.relays.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one connection through `relay` until the returned guard drops.
    pub fn track(&'static self, relay: &Arc<str>, meter: &Arc<Progress>) -> Tracked {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut relays = self.lock();
        let entry = relays.entry(relay.clone()).or_default();
        entry.streams += 1;
        entry.live.insert(id, Arc::downgrade(meter));
        Tracked {
            load: self,
            relay: relay.clone(),
            id,
            meter: meter.clone(),
        }
    }

    /// Forgets the relays `known` no longer names (gone from the registry) that carry no
    /// connection now: relay ids come and go with every rollout, and the table would otherwise
    /// keep one entry for each id ever used.
    pub fn sweep(&self, known: impl Fn(&str) -> bool) {
        self.lock()
            .retain(|relay, entry| entry.streams > 0 || known(relay));
    }

    /// Every relay this process has carried traffic through, with its figures now.
    pub fn snapshot(&self) -> HashMap<String, RelayFigures> {
        self.lock()
            .iter()
            .map(|(relay, entry)| {
                let live: u64 = entry
                    .live
                    .values()
                    .filter_map(Weak::upgrade)
                    .map(|m| {
                        let t = m.transferred();
                        t.up + t.down
                    })
                    .sum();
                (
                    relay.to_string(),
                    RelayFigures {
                        streams: entry.streams,
                        bytes: entry.finished + live,
                    },
                )
            })
            .collect()
    }
}

/// One connection counted in [`RelayLoad`]; dropping it moves its bytes to the relay's total.
pub struct Tracked {
    load: &'static RelayLoad,
    relay: Arc<str>,
    id: u64,
    meter: Arc<Progress>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let t = self.meter.transferred();
        let mut relays = self.load.lock();
        if let Some(entry) = relays.get_mut(&self.relay) {
            entry.streams = entry.streams.saturating_sub(1);
            entry.finished += t.up + t.down;
            entry.live.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relays_gone_and_idle_are_swept() {
        let load: &'static RelayLoad = Box::leak(Box::default());
        let meter = Arc::new(Progress::default());
        let (gone, busy, known): (Arc<str>, Arc<str>, Arc<str>) = (
            Arc::from("gone"),
            Arc::from("gone-busy"),
            Arc::from("known"),
        );
        drop(load.track(&gone, &meter));
        let _open = load.track(&busy, &meter);
        drop(load.track(&known, &meter));
        load.sweep(|id| id == "known");
        let mut left: Vec<String> = load.snapshot().into_keys().collect();
        left.sort();
        assert_eq!(left, ["gone-busy", "known"]);
    }

    #[test]
    fn open_and_finished_connections_both_count() {
        let load: &'static RelayLoad = Box::leak(Box::default());
        let relay: Arc<str> = Arc::from("relay-a");
        let first = Arc::new(Progress::default());
        let second = Arc::new(Progress::default());
        let a = load.track(&relay, &first);
        let b = load.track(&relay, &second);
        first.add_up(10);
        second.add_down(5);
        assert_eq!(
            load.snapshot()["relay-a"],
            RelayFigures {
                streams: 2,
                bytes: 15
            }
        );
        drop(a);
        first.add_up(1); // after the end: not counted twice, nor at all
        assert_eq!(
            load.snapshot()["relay-a"],
            RelayFigures {
                streams: 1,
                bytes: 15
            }
        );
        drop(b);
        assert_eq!(
            load.snapshot()["relay-a"],
            RelayFigures {
                streams: 0,
                bytes: 15
            }
        );
    }
}
