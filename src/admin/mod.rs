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
}

#[derive(Debug, Serialize)]
pub struct RelayStatus {
    pub id: String,
    pub tunnels: usize,
    pub in_flight: usize,
    pub registered: bool,
    pub draining: bool,
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
                }),
            routes: cache.map(|c| c.route_count()),
            relays: cache.map(|c| c.relays().len()),
            agents: cache.map(|c| c.agents().len()),
            agent_tunnels: self.agent.as_ref().map(AgentHandle::tunnels),
        }
    }
}

/// Admin connections served at once; beyond it a new connection is closed at once, so a stuck or
/// hostile client cannot take the process's memory or file descriptors through this port.
pub const MAX_CONNECTIONS: usize = 64;
/// How long one admin connection may stay open, whatever it does (a client that sends requests but
/// never reads the answers would otherwise keep its slot for ever); scrapers simply reconnect.
pub const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves the admin listener until `stop`.
pub async fn serve(listener: TcpListener, state: AdminState, stop: CancellationToken) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, _) = tokio::select! {
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(
                limit = MAX_CONNECTIONS,
                "admin connection limit reached; closing"
            );
            drop(tcp);
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
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
/// are in step with the registry), `routes` (a gateway's first full route list), `tunnel` (an
/// agent's first tunnel). Draining can never be excluded.
pub const READINESS_CHECKS: [&str; 3] = ["registered", "routes", "tunnel"];

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
            json(&relays)
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
}

/// Binds the admin listener (address `addr`).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    use anyhow::Context as _;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin listener on {addr}"))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn healthz(addr: std::net::SocketAddr) -> std::io::Result<String> {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        tcp.read_to_string(&mut out).await?;
        Ok(out)
    }

    /// Idle connections beyond the limit are closed at once; once they go, the port answers again.
    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_slots_come_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let state = AdminState {
            role: "agent",
            process: None,
            agent: None,
            shutdown: CancellationToken::new(),
        };
        let server = tokio::spawn(serve(listener, state, stop.clone()));
        assert!(healthz(addr).await.unwrap().starts_with("HTTP/1.1 200"));

        // Fill every slot with a connection that sends nothing (each is accepted in turn).
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let refused = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                match healthz(addr).await {
                    Ok(text) if text.is_empty() => return,
                    Err(_) => return,
                    // An idle connection may not have been accepted yet when this one arrived.
                    Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                }
            }
        })
        .await;
        assert!(refused.is_ok(), "a connection beyond the limit was served");

        drop(idle);
        let answered = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                if let Ok(text) = healthz(addr).await {
                    if text.starts_with("HTTP/1.1 200") {
                        return;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(answered.is_ok(), "the freed slots were not reused");
        stop.cancel();
        server.await.unwrap();
    }
}
