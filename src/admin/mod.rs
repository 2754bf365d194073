//! The admin listener every role runs (loopback by default): `/healthz`, `/readyz`, `/metrics`, a
//! JSON API (`/api/status`, `/api/relays`, `/api/agents`, `/api/routes?namespace=&ip=`) and a
//! self-contained status page at `/`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub mod client;

use crate::agent::AgentHandle;
use crate::server::ProcessHandle;

const PAGE: &str = include_str!("status.html");

/// What the admin listener reports on.
#[derive(Clone)]
pub struct AdminState {
    /// `server`, `relay`, `gateway` or `agent`.
    pub role: &'static str,
    pub process: Option<ProcessHandle>,
    pub agent: Option<AgentHandle>,
    /// Cancelled when the process starts draining: not ready from then on.
    pub shutdown: CancellationToken,
}

/// One row of `/api/relays`: the relay's registry record, and, in a process with front doors, the
/// connections and bytes those doors carry through it.
#[derive(Debug, Serialize)]
struct RelayRow {
    #[serde(flatten)]
    info: crate::registry::RelayInfo,
    through_this_gateway: Option<crate::gateway::load::RelayFigures>,
}

/// `/api/status`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub role: &'static str,
    pub version: &'static str,
    pub ready: bool,
    pub not_ready: Vec<String>,
    pub draining: bool,
    pub relay: Option<RelayStatus>,
    pub routes: Option<usize>,
    pub relays: Option<usize>,
    pub agents: Option<usize>,
    pub agent_tunnels: Option<usize>,
    /// An agent's tunnels by transport (`quic`, `tcp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_transports: Option<std::collections::BTreeMap<String, usize>>,
    /// Unix time of this answer in milliseconds (the status page's rates use its own clock; this
    /// lets a reader see the process's).
    pub now_ms: u64,
    /// Running totals since the process started, for rates (the same numbers `/metrics` exports).
    pub counters: Counters,
}

/// Totals since start; a reader turns two answers into per-second rates.
#[derive(Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Counters {
    /// Bytes carried for clients through this process's front doors, client → service
    /// (`postern_gateway_bytes_total{direction="up"}`).
    pub bytes_up: u64,
    /// … and service → client.
    pub bytes_down: u64,
    /// Client connections that ended, whatever their result (`postern_gateway_connections_total`).
    pub connections: u64,
    /// Of them, refused by policy or for want of a route: `not_allowed`, `unauthorized`,
    /// `no_route`, `bad_request`.
    pub refusals: u64,
    /// Of them, failed for another reason than a refusal (`connection_refused`, `unreachable`,
    /// `timeout`, `aborted`, …).
    pub errors: u64,
    /// Agent tunnels a relay refused at its `relay.max_tunnels` limit
    /// (`postern_relay_tunnels_refused_total`).
    pub tunnels_refused: u64,
}

/// Results of `postern_gateway_connections_total` that count as refusals rather than errors.
const REFUSAL_RESULTS: [&str; 4] = ["not_allowed", "unauthorized", "no_route", "bad_request"];

impl Counters {
    /// Reads the totals from the Prometheus exposition this process serves at `/metrics`, so that
    /// the API and the metrics can never disagree.
    pub fn from_exposition(text: &str) -> Counters {
        let mut c = Counters::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let value = value as u64;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let label = |key: &str| {
                labels
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.trim_end_matches('}').trim_matches('"'))
            };
            match name {
                "postern_gateway_bytes_total" => match label("direction") {
                    Some("up") => c.bytes_up += value,
                    Some("down") => c.bytes_down += value,
                    _ => {}
                },
                "postern_gateway_connections_total" => {
                    c.connections += value;
                    match label("result") {
                        Some("ok") => {}
                        Some(r) if REFUSAL_RESULTS.contains(&r) => c.refusals += value,
                        _ => c.errors += value,
                    }
                }
                "postern_relay_tunnels_refused_total" => c.tunnels_refused += value,
                _ => {}
            }
        }
        c
    }
}

#[derive(Debug, Serialize)]
pub struct RelayStatus {
    pub id: String,
    pub tunnels: usize,
    pub in_flight: usize,
    pub registered: bool,
    pub draining: bool,
    /// Each token credential's tunnels and addresses here, beside its quota.
    pub credentials: Vec<crate::relay::CredentialUse>,
}

impl AdminState {
    /// Readiness with the reasons it is not: relay = registered (lease held) and not draining;
    /// gateway = first full route list loaded; agent = at least one tunnel; none while draining.
    pub fn readiness(&self) -> Vec<String> {
        self.failing_checks()
            .into_iter()
            .map(|(_, why)| why)
            .collect()
    }

    /// The failing readiness checks, each under its name in [`READINESS_CHECKS`] (or `draining`).
    fn failing_checks(&self) -> Vec<(&'static str, String)> {
        let mut failing = Vec::new();
        if self.shutdown.is_cancelled() {
            failing.push(("draining", "draining".to_string()));
        }
        if let Some(p) = &self.process {
            if let Some(relay) = &p.relay {
                if !relay.is_registered() {
                    failing.push(("registered", "relay not registered in the registry".into()));
                }
                if relay.is_draining() && !self.shutdown.is_cancelled() {
                    failing.push(("draining", "relay draining".into()));
                }
            }
            if p.gateway.is_some() && !p.cache.is_ready() {
                failing.push(("routes", "route list not loaded yet".into()));
            } else if p.gateway.is_some() && !p.cache.is_fresh() {
                let age = p.cache.view_age().unwrap_or_default().as_secs();
                failing.push((
                    "fresh",
                    format!("route view not confirmed by the registry for {age}s (registry.max_staleness)"),
                ));
            }
        }
        if let Some(agent) = &self.agent {
            if agent.tunnels() == 0 {
                failing.push(("tunnel", "no tunnel up".into()));
            }
        }
        failing
    }

    pub fn status(&self) -> Status {
        let not_ready = self.readiness();
        let cache = self.process.as_ref().map(|p| &p.cache);
        Status {
            role: self.role,
            version: env!("CARGO_PKG_VERSION"),
            ready: not_ready.is_empty(),
            not_ready,
            draining: self.shutdown.is_cancelled(),
            relay: self
                .process
                .as_ref()
                .and_then(|p| p.relay.as_ref())
                .map(|r| RelayStatus {
                    id: r.id().to_string(),
                    tunnels: r.sessions().len(),
                    in_flight: r.in_flight(),
                    registered: r.is_registered(),
                    draining: r.is_draining(),
                    credentials: r.credential_use(),
                }),
            routes: cache.map(|c| c.route_count()),
            relays: cache.map(|c| c.relays().len()),
            agents: cache.map(|c| c.agents().len()),
            agent_tunnels: self.agent.as_ref().map(AgentHandle::tunnels),
            agent_transports: self.agent.as_ref().map(AgentHandle::transports),
            now_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            counters: Counters::from_exposition(&crate::metrics::metrics().encode()),
        }
    }
}

/// Admin connections held open at once. When they are all taken, a new connection evicts the
/// connection that has been idle the longest (waiting for a request's head, or between requests)
/// instead of being refused: a flood of idle or slow connections can never keep a probe out. The
/// number is high because a connection that has sent nothing yet costs only its socket (no buffer,
/// no HTTP state), and because while it is not reached no new connection closes another one — a
/// flood that reconnects whatever is closed would otherwise keep the accept loop busy with itself.
pub const MAX_CONNECTIONS: usize = 4096;
/// Connections held open at once from one source address; the next one from that address evicts
/// its own longest-idle connection.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 16;
/// How long a connection may sit without a request in service: from accept to a request's complete
/// head, and between requests on a kept-alive connection. A dribbling or silent client is closed
/// after it; a probe or scraper sends its request at once. Each connection draws its own limit
/// between this and 1.5 times this.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// How long one admin connection may stay open, whatever it does (a client that sends requests but
/// never reads the answers would otherwise keep its slot for ever); scrapers simply reconnect.
pub const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

/// What the accept loop knows of one open admin connection.
struct Held {
    source: IpAddr,
    activity: std::sync::Arc<Activity>,
    /// Cancelled to close the connection (eviction).
    evict: CancellationToken,
}

/// Whether a connection has a request in service, and since when it has not.
struct Activity {
    /// Set while the service function runs: such a connection is never evicted.
    busy: std::sync::atomic::AtomicBool,
    /// Milliseconds since `epoch` when the connection last became idle (accepted or answered).
    idle_since_ms: std::sync::atomic::AtomicU64,
    epoch: tokio::time::Instant,
}

impl Activity {
    fn new() -> Self {
        Activity {
            busy: false.into(),
            idle_since_ms: 0.into(),
            epoch: tokio::time::Instant::now(),
        }
    }

    fn start(&self) {
        self.busy.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn finish(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.idle_since_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
        self.busy.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// When the connection became idle, or `None` while a request is in service.
    fn idle_since(&self) -> Option<tokio::time::Instant> {
        if self.busy.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let ms = self
            .idle_since_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        Some(self.epoch + std::time::Duration::from_millis(ms))
    }
}

/// The open admin connections, keyed by a sequence number.
#[derive(Default)]
struct Connections {
    next: u64,
    held: HashMap<u64, Held>,
    /// The connections of each source address.
    by_source: HashMap<IpAddr, Vec<u64>>,
}

impl Connections {
    fn insert(&mut self, held: Held) -> u64 {
        let id = self.next;
        self.next += 1;
        self.by_source.entry(held.source).or_default().push(id);
        self.held.insert(id, held);
        id
    }

    fn remove(&mut self, id: u64) -> Option<Held> {
        let held = self.held.remove(&id)?;
        if let Some(ids) = self.by_source.get_mut(&held.source) {
            ids.retain(|other| *other != id);
            if ids.is_empty() {
                self.by_source.remove(&held.source);
            }
        }
        Some(held)
    }

    /// Makes room for a connection from `source`: evicts the longest-idle connection of that source
    /// when it holds its share, else the longest-idle one of all when every slot is taken. `false`
    /// when there is no room because every candidate has a request in service.
    fn make_room(&mut self, source: IpAddr) -> bool {
        let from_source = self.by_source.get(&source).map_or(&[][..], Vec::as_slice);
        if from_source.len() >= MAX_CONNECTIONS_PER_SOURCE {
            let candidates = from_source.to_vec();
            return self.evict_idlest(candidates.iter().copied());
        }
        if self.held.len() >= MAX_CONNECTIONS {
            let candidates: Vec<u64> = self.held.keys().copied().collect();
            return self.evict_idlest(candidates.into_iter());
        }
        true
    }

    fn evict_idlest(&mut self, among: impl Iterator<Item = u64>) -> bool {
        let idlest = among
            .filter_map(|id| {
                let since = self.held.get(&id)?.activity.idle_since()?;
                Some((since, id))
            })
            .min();
        match idlest.and_then(|(_, id)| self.remove(id)) {
            Some(evicted) => {
                evicted.evict.cancel();
                true
            }
            None => false,
        }
    }
}

/// Serves the admin listener until `stop`.
pub async fn serve(listener: TcpListener, state: AdminState, stop: CancellationToken) {
    let connections = std::sync::Arc::new(std::sync::Mutex::new(Connections::default()));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(err) => {
                    tracing::warn!(%err, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let activity = std::sync::Arc::new(Activity::new());
        let evict = stop.child_token();
        let id = {
            // A poisoned lock only means a connection task panicked; the table is still consistent.
            let mut held = connections.lock().unwrap_or_else(|e| e.into_inner());
            if !held.make_room(peer.ip()) {
                tracing::debug!(
                    client = %peer,
                    "every admin connection has a request in service; closing"
                );
                drop(tcp);
                continue;
            }
            held.insert(Held {
                source: peer.ip(),
                activity: activity.clone(),
                evict: evict.clone(),
            })
        };
        let state = state.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            serve_connection(tcp, state, &activity, &evict).await;
            connections
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
        });
    }
}

/// Serves one admin connection until it ends, is evicted, idles for [`IDLE_TIMEOUT`] or reaches
/// [`CONNECTION_LIFETIME`].
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    state: AdminState,
    activity: &std::sync::Arc<Activity>,
    evict: &CancellationToken,
) {
    // Each connection's limit lies between IDLE_TIMEOUT and 1.5 × IDLE_TIMEOUT, so connections
    // opened together (a flood) are not all closed — and reopened — in the same instant.
    let idle_timeout = IDLE_TIMEOUT.mul_f64(1.0 + rand::random::<f64>() / 2.0);
    // Until its first byte a connection holds no buffer and no HTTP state.
    tokio::select! {
        readable = tcp.readable() => if readable.is_err() { return },
        _ = tokio::time::sleep(idle_timeout) => return,
        _ = evict.cancelled() => return,
    }
    let in_service = activity.clone();
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        in_service.start();
        let response = route(&state, &req);
        in_service.finish();
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout)
        .serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(connection);
    let end = tokio::time::Instant::now() + CONNECTION_LIFETIME;
    loop {
        let check_at = match activity.idle_since() {
            Some(since) if since + idle_timeout <= tokio::time::Instant::now() => return,
            Some(since) => (since + idle_timeout).min(end),
            None => (tokio::time::Instant::now() + idle_timeout).min(end),
        };
        tokio::select! {
            _ = &mut connection => return,
            _ = evict.cancelled() => return,
            _ = tokio::time::sleep_until(check_at) => {
                if tokio::time::Instant::now() >= end {
                    return;
                }
            }
        }
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => respond(StatusCode::OK, "application/json", body),
        Err(err) => respond(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            err.to_string(),
        ),
    }
}

fn query(req: &Request<hyper::body::Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.replace("%3A", ":").replace("%3a", ":")))
        .collect()
}

/// Readiness checks `/readyz?exclude=NAME` may leave out (repeated or comma-separated), as
/// Kubernetes' own `/readyz?exclude=etcd` does: `registered` (a relay's lease is held and its routes
/// are in step with the registry), `routes` (a gateway's first full route list), `fresh` (the
/// registry confirmed a gateway's route view within `registry.max_staleness`), `tunnel` (an
/// agent's first tunnel). Draining can never be excluded.
pub const READINESS_CHECKS: [&str; 4] = ["registered", "routes", "fresh", "tunnel"];

fn excluded_checks(req: &Request<hyper::body::Incoming>) -> Result<Vec<&'static str>, String> {
    let mut excluded = Vec::new();
    let pairs = req.uri().query().unwrap_or("").split('&');
    for name in pairs
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "exclude")
        .flat_map(|(_, v)| v.split(','))
        .filter(|name| !name.is_empty())
    {
        match READINESS_CHECKS.iter().find(|c| **c == name) {
            Some(check) => excluded.push(*check),
            None if name == "draining" => {
                return Err("the draining check cannot be excluded\n".into())
            }
            None => {
                return Err(format!(
                    "unknown readiness check {name:?}; checks that may be excluded: {}\n",
                    READINESS_CHECKS.join(", ")
                ))
            }
        }
    }
    Ok(excluded)
}

fn route(state: &AdminState, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
    }
    let cache = state.process.as_ref().map(|p| p.cache.clone());
    match req.uri().path() {
        "/" => respond(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let excluded = match excluded_checks(req) {
                Ok(excluded) => excluded,
                Err(complaint) => return respond(StatusCode::BAD_REQUEST, "text/plain", complaint),
            };
            let why: Vec<String> = state
                .failing_checks()
                .into_iter()
                .filter(|(name, _)| !excluded.contains(name))
                .map(|(_, why)| why)
                .collect();
            if why.is_empty() {
                respond(StatusCode::OK, "text/plain", "ready\n")
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {}\n", why.join("; ")),
                )
            }
        }
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            crate::metrics::metrics().encode(),
        ),
        "/api/status" => json(&state.status()),
        "/api/relays" | "/api/agents" | "/api/routes" if cache.is_none() => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "an agent keeps no registry view; ask a relay or gateway\n",
        ),
        "/api/relays" => {
            let mut relays = cache.map(|c| c.relays()).unwrap_or_default();
            relays.sort_by(|a, b| a.id.cmp(&b.id));
            // A process with front doors adds what it carries through each relay.
            let load = state
                .process
                .as_ref()
                .and_then(|p| p.gateway.as_ref())
                .map(|_| crate::gateway::load::relay_load().snapshot());
            let rows: Vec<RelayRow> = relays
                .into_iter()
                .map(|info| RelayRow {
                    through_this_gateway: load
                        .as_ref()
                        .map(|l| l.get(&info.id).copied().unwrap_or_default()),
                    info,
                })
                .collect();
            json(&rows)
        }
        "/api/agents" => {
            let mut agents = cache.map(|c| c.agents()).unwrap_or_default();
            agents.sort_by(|a, b| (&a.namespace, &a.id).cmp(&(&b.namespace, &b.id)));
            json(&agents)
        }
        "/api/routes" => {
            let q = query(req);
            let namespace = q
                .get("namespace")
                .cloned()
                .unwrap_or_else(|| "default".into());
            let Some(ip) = q.get("ip").and_then(|ip| ip.parse::<IpAddr>().ok()) else {
                return respond(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "usage: /api/routes?namespace=NS&ip=IP\n",
                );
            };
            let owners: Vec<RouteView> = cache
                .map(|c| c.owners(&namespace, ip))
                .unwrap_or_default()
                .into_iter()
                .map(|o| RouteView {
                    namespace: namespace.clone(),
                    ip,
                    relay_id: o.relay_id.to_string(),
                    session_id: o.session_id,
                    agent_id: o.agent_id.to_string(),
                    draining: o.draining,
                    connected_at: o.connected_at,
                    transport: o.transport.as_deref().map(str::to_string),
                })
                .collect();
            json(&owners)
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// One owner of an IP, as `/api/routes` lists it.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct RouteView {
    pub namespace: String,
    pub ip: IpAddr,
    pub relay_id: String,
    /// A string in JSON (see [`crate::registry::session_id_json`]).
    #[serde(with = "crate::registry::session_id_json")]
    pub session_id: u64,
    pub agent_id: String,
    pub draining: bool,
    pub connected_at: u64,
    /// What carries the tunnel: `quic` or `tcp` (absent from older relays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

/// Binds the admin listener (address `addr`).
/// Its accept queue is deep ([`ACCEPT_BACKLOG`], capped by the kernel's `net.core.somaxconn`) so
/// that a burst of connections (a flood reconnecting what the idle timeout closed) does not
/// overflow it: a probe's dropped SYN would be retried only after a second.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    };
    socket
        .and_then(|socket| {
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(ACCEPT_BACKLOG)
        })
        .with_context(|| format!("binding the admin listener on {addr}"))
}

/// The admin listener's accept queue length.
pub const ACCEPT_BACKLOG: u32 = 4096;

#[cfg(test)]
mod tests;
