//! The gateway's route cache: a full list, then a watch from the next revision; re-listed whenever the
//! watch breaks or resets. Lookups are in-memory reads — no registry round trip on a connection's path.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Event, Registry, RelayInfo, Route, RouteKey, WatchItem};

/// One owner of an IP, as the gateway sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub relay_id: Arc<str>,
    pub session_id: u64,
    pub agent_id: Arc<str>,
    pub draining: bool,
    /// Unix seconds when the tunnel came up.
    pub connected_at: u64,
    /// Fingerprint of the credential that admitted the tunnel; `None` from older relays.
    pub credential: Option<Arc<str>>,
    /// `quic` or `tcp`; `None` from older relays.
    pub transport: Option<Arc<str>>,
}

impl Owner {
    /// Whether this owner's tunnel and one admitted by `credential` may be the same agent (an
    /// unknown fingerprint is given the benefit of the doubt).
    pub fn same_credential(&self, credential: Option<&str>) -> bool {
        match (self.credential.as_deref(), credential) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
    }
}

/// An agent as the routes describe it (for the admin API).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentView {
    pub id: String,
    pub namespace: String,
    pub ips: Vec<IpAddr>,
    /// Relays holding a tunnel of this agent.
    pub relays: Vec<String>,
    pub tunnels: usize,
    /// Unix seconds of its oldest tunnel.
    pub connected_since: u64,
    pub draining: bool,
    /// Its tunnels: which session of which relay (absent in answers of older versions).
    #[serde(default)]
    pub sessions: Vec<SessionView>,
    /// Fingerprint of the credential its tunnels were admitted by. Two credentials using one id
    /// show as two entries, never as one agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// One tunnel of an agent, as `/api/agents` lists it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct SessionView {
    pub relay_id: String,
    /// A string in JSON (see [`super::session_id_json`]).
    #[serde(with = "super::session_id_json")]
    pub session_id: u64,
    /// What carries the tunnel: `quic` or `tcp` (absent from older relays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

#[derive(Default)]
struct State {
    /// namespace → IP → its owners.
    routes: HashMap<Arc<str>, HashMap<IpAddr, Vec<Owner>>>,
    /// namespace → agent id → the IPs routes give it (sorted), for `<agent-id>.<suffix>` names.
    agents: HashMap<Arc<str>, HashMap<Arc<str>, Vec<IpAddr>>>,
    relays: HashMap<String, RelayInfo>,
    route_count: usize,
    /// One copy of each string routes repeat: namespaces, relay ids, agent ids, credentials and
    /// transports are shared by many routes (every route of a relay names the relay), so a route
    /// costs its owner entry and no string of its own.
    strings: Interner,
}

/// Shared copies of strings. A string no route holds any more is dropped by the next sweep, which
/// runs when the set has doubled since the last one (so it costs O(1) per new string).
#[derive(Default)]
struct Interner {
    set: HashSet<Arc<str>>,
    swept_at: usize,
}

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.set.get(s) {
            return shared.clone();
        }
        if self.set.len() >= 2 * self.swept_at.max(64) {
            self.set.retain(|s| Arc::strong_count(s) > 1);
            self.swept_at = self.set.len();
        }
        let shared: Arc<str> = Arc::from(s);
        self.set.insert(shared.clone());
        shared
    }
}

impl State {
    fn put(&mut self, route: &Route) {
        let k = &route.key;
        let namespace = self.strings.get(&k.namespace);
        let owner = Owner {
            relay_id: self.strings.get(&k.relay_id),
            session_id: k.session_id,
            agent_id: self.strings.get(&route.value.agent_id),
            draining: route.value.draining,
            connected_at: route.value.connected_at,
            credential: route
                .value
                .credential
                .as_deref()
                .map(|c| self.strings.get(c)),
            transport: route
                .value
                .transport
                .as_deref()
                .map(|t| self.strings.get(t)),
        };
        let agent_id = owner.agent_id.clone();
        let owners = self
            .routes
            .entry(namespace.clone())
            .or_default()
            .entry(k.ip)
            .or_default();
        let replaced = match owners
            .iter_mut()
            .find(|o| *o.relay_id == *k.relay_id && o.session_id == k.session_id)
        {
            Some(existing) => Some(std::mem::replace(existing, owner)),
            None => {
                // An IP has one owner per tunnel (two, typically): grow by one, not to four.
                owners.reserve_exact(1);
                owners.push(owner);
                self.route_count += 1;
                None
            }
        };
        if let Some(old) = replaced.filter(|old| *old.agent_id != *route.value.agent_id) {
            self.forget_agent_ip(&k.namespace, &old.agent_id, k.ip);
        }
        let ips = self
            .agents
            .entry(namespace)
            .or_default()
            .entry(agent_id)
            .or_default();
        if let Err(at) = ips.binary_search(&k.ip) {
            ips.reserve_exact(1);
            ips.insert(at, k.ip);
        }
    }

    fn delete(&mut self, k: &RouteKey) {
        let Some(by_ip) = self.routes.get_mut(k.namespace.as_str()) else {
            return;
        };
        let Some(owners) = by_ip.get_mut(&k.ip) else {
            return;
        };
        let Some(pos) = owners
            .iter()
            .position(|o| *o.relay_id == *k.relay_id && o.session_id == k.session_id)
        else {
            return;
        };
        let removed = owners.remove(pos);
        self.route_count -= 1;
        let agent_still_owns = owners.iter().any(|o| o.agent_id == removed.agent_id);
        if owners.is_empty() {
            by_ip.remove(&k.ip);
            if by_ip.is_empty() {
                self.routes.remove(k.namespace.as_str());
            }
        }
        if !agent_still_owns {
            self.forget_agent_ip(&k.namespace, &removed.agent_id, k.ip);
        }
    }

    fn forget_agent_ip(&mut self, namespace: &str, agent_id: &str, ip: IpAddr) {
        let Some(by_agent) = self.agents.get_mut(namespace) else {
            return;
        };
        if let Some(ips) = by_agent.get_mut(agent_id) {
            if let Ok(at) = ips.binary_search(&ip) {
                ips.remove(at);
            }
            if ips.is_empty() {
                by_agent.remove(agent_id);
            }
        }
        if by_agent.is_empty() {
            self.agents.remove(namespace);
        }
    }

    fn apply(&mut self, event: &Event) {
        match event {
            Event::PutRoute(r) => self.put(r),
            Event::DeleteRoute(k) => self.delete(k),
            Event::PutRelay(r) => {
                self.relays.insert(r.id.clone(), r.clone());
            }
            Event::DeleteRelay(id) => {
                self.relays.remove(id);
            }
        }
    }
}

/// Aborts a helper task when its owner's future ends or is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Routes and relays as last seen in the registry.
pub struct RouteCache {
    state: RwLock<State>,
    ready: watch::Sender<bool>,
    /// When the registry last confirmed the view (a full list, changes, or a progress
    /// notification); `None` before the first list.
    confirmed: std::sync::Mutex<Option<Instant>>,
    /// Beyond this age the view is stale and a gateway not ready (`registry.max_staleness`).
    max_staleness: Option<Duration>,
}

impl Default for RouteCache {
    fn default() -> Self {
        Self::new()
    }
}

impl RouteCache {
    pub fn new() -> Self {
        RouteCache {
            state: RwLock::new(State::default()),
            ready: watch::channel(false).0,
            confirmed: std::sync::Mutex::new(None),
            max_staleness: None,
        }
    }

    /// Sets the age beyond which [`RouteCache::is_fresh`] is false (none: never stale).
    pub fn with_max_staleness(mut self, max_staleness: Option<Duration>) -> Self {
        self.max_staleness = max_staleness;
        self
    }

    /// How long ago the registry last confirmed this view; `None` before the first list.
    pub fn view_age(&self) -> Option<Duration> {
        self.confirmed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|at| at.elapsed())
    }

    /// False once the view is older than `registry.max_staleness`: the registry (or the member
    /// this process talks to) has stopped confirming it, and routes may have changed unseen.
    pub fn is_fresh(&self) -> bool {
        match (self.max_staleness, self.view_age()) {
            (Some(bound), Some(age)) => age <= bound,
            _ => true,
        }
    }

    /// The bound [`RouteCache::is_fresh`] checks against.
    pub fn max_staleness(&self) -> Option<Duration> {
        self.max_staleness
    }

    fn confirm(&self) {
        *self.confirmed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        crate::metrics::metrics().registry_view_age.set(0.0);
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // Writers only run whole map operations; a poisoned lock still holds a coherent map.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The owners of `ip` in `namespace`, not draining ones first.
    pub fn owners(&self, namespace: &str, ip: IpAddr) -> Vec<Owner> {
        let state = self.read();
        let mut owners = state
            .routes
            .get(namespace)
            .and_then(|by_ip| by_ip.get(&ip))
            .cloned()
            .unwrap_or_default();
        owners.sort_by_key(|o| o.draining);
        owners
    }

    /// The IPs routed to `agent_id` in `namespace`. Should two credentials hold tunnels under one
    /// id (relays refuse that, but two relays may admit both in the same instant), only the
    /// agent whose tunnel came up first answers to the name: two agents are never merged.
    pub fn agent_ips(&self, namespace: &str, agent_id: &str) -> Vec<IpAddr> {
        let owners = self.owners_by_ip(namespace, agent_id);
        let Some(first) = owners
            .iter()
            .map(|(_, o)| o)
            .filter(|o| o.credential.is_some())
            .min_by_key(|o| (o.connected_at, o.relay_id.clone(), o.session_id))
        else {
            // No fingerprints at all (older relays): nothing to tell apart.
            let mut ips: Vec<IpAddr> = owners.into_iter().map(|(ip, _)| ip).collect();
            ips.dedup();
            return ips;
        };
        let holder = first.credential.clone();
        let mut ips: Vec<IpAddr> = owners
            .iter()
            .filter(|(_, o)| o.same_credential(holder.as_deref()))
            .map(|(ip, _)| *ip)
            .collect();
        ips.dedup();
        ips
    }

    /// Every tunnel (as an owner) the routes give `agent_id` in `namespace`.
    pub fn agent_owners(&self, namespace: &str, agent_id: &str) -> Vec<Owner> {
        self.owners_by_ip(namespace, agent_id)
            .into_iter()
            .map(|(_, owner)| owner)
            .collect()
    }

    /// Each IP routed to `agent_id` in `namespace` with each owner of its route that names that id.
    fn owners_by_ip(&self, namespace: &str, agent_id: &str) -> Vec<(IpAddr, Owner)> {
        let state = self.read();
        let mut found = Vec::new();
        let by_ip = state.routes.get(namespace);
        for ip in state
            .agents
            .get(namespace)
            .and_then(|by_agent| by_agent.get(agent_id))
            .into_iter()
            .flatten()
        {
            for owner in by_ip.and_then(|m| m.get(ip)).into_iter().flatten() {
                if *owner.agent_id == *agent_id {
                    found.push((*ip, owner.clone()));
                }
            }
        }
        found
    }

    pub fn relay(&self, relay_id: &str) -> Option<RelayInfo> {
        self.read().relays.get(relay_id).cloned()
    }

    /// Every agent the routes name, sorted by namespace and id.
    pub fn agents(&self) -> Vec<AgentView> {
        use std::collections::BTreeMap;
        let state = self.read();
        type Key = (String, String, Option<String>);
        let mut agents: BTreeMap<Key, AgentView> = BTreeMap::new();
        type Tunnel = (Arc<str>, u64, Option<Arc<str>>);
        let mut sessions: BTreeMap<Key, BTreeSet<Tunnel>> = BTreeMap::new();
        let routes = state
            .routes
            .iter()
            .flat_map(|(ns, by_ip)| by_ip.iter().map(move |(ip, owners)| (ns, ip, owners)));
        for (namespace, ip, owners) in routes {
            for o in owners {
                let credential = o.credential.as_deref().map(str::to_string);
                let key = (
                    namespace.to_string(),
                    o.agent_id.to_string(),
                    credential.clone(),
                );
                let view = agents.entry(key.clone()).or_insert_with(|| AgentView {
                    id: o.agent_id.to_string(),
                    namespace: namespace.to_string(),
                    ips: Vec::new(),
                    relays: Vec::new(),
                    tunnels: 0,
                    connected_since: o.connected_at,
                    draining: true,
                    sessions: Vec::new(),
                    credential,
                });
                if !view.ips.contains(ip) {
                    view.ips.push(*ip);
                }
                if !view.relays.iter().any(|r| **r == *o.relay_id) {
                    view.relays.push(o.relay_id.to_string());
                }
                view.connected_since = view.connected_since.min(o.connected_at);
                view.draining &= o.draining;
                sessions.entry(key).or_default().insert((
                    o.relay_id.clone(),
                    o.session_id,
                    o.transport.clone(),
                ));
            }
        }
        agents
            .into_iter()
            .map(|(key, mut view)| {
                view.ips.sort();
                view.relays.sort();
                let tunnels = sessions.get(&key);
                view.tunnels = tunnels.map_or(0, BTreeSet::len);
                view.sessions = tunnels
                    .into_iter()
                    .flatten()
                    .map(|(relay_id, session_id, transport)| SessionView {
                        relay_id: relay_id.to_string(),
                        session_id: *session_id,
                        transport: transport.as_deref().map(str::to_string),
                    })
                    .collect();
                view
            })
            .collect()
    }

    /// Every relay the registry lists.
    pub fn relays(&self) -> Vec<RelayInfo> {
        self.read().relays.values().cloned().collect()
    }

    /// How many routes the cache holds.
    pub fn route_count(&self) -> usize {
        self.read().route_count
    }

    /// True once the first full list has loaded.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Resolves when the first full list has loaded.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        // The sender lives in `self`, so the channel cannot close while we borrow it.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    pub(crate) fn replace(&self, routes: &[Route], relays: &[RelayInfo]) {
        let mut fresh = State::default();
        for r in routes {
            fresh.put(r);
        }
        for r in relays {
            fresh.relays.insert(r.id.clone(), r.clone());
        }
        let count = fresh.route_count;
        *self.write() = fresh;
        self.confirm();
        crate::metrics::metrics().routes_cached.set(count as i64);
        self.ready.send_replace(true);
    }

    /// Keeps the cache in step with `registry` until `shutdown`: list, watch, and on any break
    /// (error, reset, closed watch) list again after a capped backoff.
    pub async fn run(self: Arc<Self>, registry: Arc<dyn Registry>, shutdown: CancellationToken) {
        // The view's age as a metric, kept current between scrapes.
        let age = {
            let cache = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    if let Some(age) = cache.view_age() {
                        crate::metrics::metrics()
                            .registry_view_age
                            .set(age.as_secs_f64());
                    }
                }
            })
        };
        let _age = AbortOnDrop(age);
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let synced = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.sync_once(&*registry) => r,
            };
            let result = if synced.is_ok() { "reset" } else { "error" };
            crate::metrics::metrics()
                .registry_operations
                .get_or_create(&crate::metrics::Operation {
                    operation: "watch",
                    result,
                })
                .inc();
            match synced {
                Ok(()) => {
                    tracing::info!("route watch reset; re-listing");
                    backoff.reset();
                }
                Err(err) => tracing::warn!(%err, "route watch failed; re-listing after backoff"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// One list + watch cycle. Returns `Ok` when the watch asked for a re-list.
    async fn sync_once(&self, registry: &dyn Registry) -> Result<(), super::Error> {
        let snapshot = registry.snapshot().await.inspect_err(|_| {
            crate::metrics::metrics()
                .registry_operations
                .get_or_create(&crate::metrics::Operation {
                    operation: "list",
                    result: "error",
                })
                .inc();
        })?;
        crate::metrics::metrics()
            .registry_operations
            .get_or_create(&crate::metrics::Operation {
                operation: "list",
                result: "ok",
            })
            .inc();
        let mut changes = registry.watch(snapshot.revision).await?;
        self.replace(&snapshot.routes, &snapshot.relays);
        tracing::debug!(
            routes = snapshot.routes.len(),
            revision = snapshot.revision,
            "route list loaded"
        );
        while let Some(item) = changes.recv().await {
            match item {
                WatchItem::Events { events, .. } => {
                    let mut state = self.write();
                    for event in &events {
                        state.apply(event);
                    }
                    crate::metrics::metrics()
                        .routes_cached
                        .set(state.route_count as i64);
                    drop(state);
                    self.confirm();
                }
                WatchItem::Progress { .. } => self.confirm(),
                WatchItem::Reset => return Ok(()),
            }
        }
        Err(super::Error::Unavailable("watch closed".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(ip: &str, relay: &str, session: u64, agent: &str, credential: &str, at: u64) -> Route {
        let mut route = Route::new(
            RouteKey {
                namespace: "default".into(),
                ip: ip.parse().unwrap(),
                relay_id: relay.into(),
                session_id: session,
            },
            agent.into(),
            Vec::new(),
        );
        route.value.connected_at = at;
        route.value.credential = Some(credential.into());
        route
    }

    #[test]
    fn two_credentials_under_one_agent_id_are_never_merged() {
        let cache = RouteCache::new();
        cache.replace(
            &[
                // The real agent: two tunnels, one address.
                route("10.0.0.1", "r1", 1, "web", "token:aa", 100),
                route("10.0.0.1", "r2", 2, "web", "token:aa", 101),
                // An impostor admitted under the same id at another relay in the same instant.
                route("10.0.0.9", "r3", 3, "web", "token:bb", 102),
            ],
            &[],
        );
        let first: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(cache.agent_ips("default", "web"), vec![first]);
        let views = cache.agents();
        assert_eq!(views.len(), 2, "{views:?}");
        let real = views
            .iter()
            .find(|v| v.credential.as_deref() == Some("token:aa"))
            .unwrap();
        assert_eq!((real.ips.clone(), real.tunnels), (vec![first], 2));
        assert_eq!(cache.agent_owners("default", "web").len(), 3);
    }

    #[test]
    fn routes_share_their_strings_and_churn_leaves_none_behind() {
        let mut state = State::default();
        // Two tunnels per agent, on two relays, over many generations of agents.
        for generation in 0..50u64 {
            for n in 0..20u64 {
                let ip = format!("10.0.{generation}.{n}");
                let agent = format!("agent-{generation}-{n}");
                state.put(&route(&ip, "r1", 2 * n, &agent, "token:aa", 1));
                state.put(&route(&ip, "r2", 2 * n + 1, &agent, "token:aa", 1));
            }
            if generation == 0 {
                let owners = &state.routes["default"][&"10.0.0.0".parse::<IpAddr>().unwrap()];
                // One copy of each relay id, however many routes name it.
                assert!(Arc::ptr_eq(&owners[0].relay_id, &state.strings.get("r1")));
                assert!(Arc::ptr_eq(&owners[0].agent_id, &owners[1].agent_id));
            }
            if generation > 0 {
                for n in 0..20u64 {
                    let ip: IpAddr = format!("10.0.{}.{n}", generation - 1).parse().unwrap();
                    for (relay, session) in [("r1", 2 * n), ("r2", 2 * n + 1)] {
                        state.delete(&RouteKey {
                            namespace: "default".into(),
                            ip,
                            relay_id: relay.into(),
                            session_id: session,
                        });
                    }
                }
            }
        }
        assert_eq!(state.route_count, 40);
        assert_eq!(state.routes["default"].len(), 20);
        assert_eq!(state.agents["default"].len(), 20);
        assert_eq!(
            state.agents["default"]["agent-49-3"],
            vec!["10.0.49.3".parse::<IpAddr>().unwrap()]
        );
        // 1,000 agent ids came and went: the strings of those gone are swept, not kept.
        let live = 20 + 4; // agent ids, the namespace, two relay ids, one credential
        assert!(
            state.strings.set.len() <= 2 * (live + 64),
            "{} strings kept",
            state.strings.set.len()
        );
        // Deleting the rest empties every map.
        for n in 0..20u64 {
            for (relay, session) in [("r1", 2 * n), ("r2", 2 * n + 1)] {
                state.delete(&RouteKey {
                    namespace: "default".into(),
                    ip: format!("10.0.49.{n}").parse().unwrap(),
                    relay_id: relay.into(),
                    session_id: session,
                });
            }
        }
        assert_eq!(state.route_count, 0);
        assert!(state.routes.is_empty() && state.agents.is_empty());
    }
}
