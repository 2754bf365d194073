//! `postern status` and `postern lookup`: read a process's admin JSON API and print it for people.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context as _};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use super::RouteView;
use crate::registry::cache::AgentView;
use crate::registry::RelayInfo;

/// One command's reads of one admin listener, all under one deadline.
pub struct AdminClient {
    /// `host:port`.
    authority: String,
    timeout: Duration,
    deadline: tokio::time::Instant,
}

impl AdminClient {
    /// A client for `admin` (`host:port` or `http://host:port`) whose requests must all finish within
    /// `timeout` from now.
    pub fn new(admin: &str, timeout: Duration) -> Self {
        AdminClient {
            authority: admin
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_string(),
            timeout,
            deadline: tokio::time::Instant::now() + timeout,
        }
    }

    /// Runs one step of a request under the command's deadline; on expiry the error names the
    /// address, the request and the step that was waiting.
    async fn step<T>(
        &self,
        path: &str,
        what: &str,
        fut: impl std::future::Future<Output = T>,
    ) -> anyhow::Result<T> {
        tokio::time::timeout_at(self.deadline, fut)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "timed out after {} {what} (admin listener {}, GET {path}); \
                     is the process stopped or overloaded? (--timeout sets the deadline)",
                    humantime::format_duration(self.timeout),
                    self.authority
                )
            })
    }

    /// GETs `path`; fails on a non-2xx answer with its body.
    pub async fn get(&self, path: &str) -> anyhow::Result<Bytes> {
        let authority = self.authority.as_str();
        let tcp = self
            .step(
                path,
                "connecting",
                tokio::net::TcpStream::connect(authority),
            )
            .await?
            .with_context(|| format!("cannot reach the admin listener {authority}"))?;
        let (mut sender, conn) = self
            .step(
                path,
                "starting HTTP",
                hyper::client::conn::http1::handshake(TokioIo::new(tcp)),
            )
            .await?
            .with_context(|| format!("admin listener {authority}"))?;
        // The connection task ends when `sender` is dropped or the peer closes.
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, authority)
            .body(Empty::<Bytes>::new())?;
        let resp = self
            .step(path, "waiting for the answer", sender.send_request(req))
            .await?
            .with_context(|| format!("admin listener {authority}, GET {path}"))?;
        let status = resp.status();
        let body = self
            .step(
                path,
                "reading the answer's body",
                resp.into_body().collect(),
            )
            .await?
            .with_context(|| format!("admin listener {authority}, GET {path}"))?
            .to_bytes();
        if !status.is_success() {
            bail!(
                "{authority}{path}: {status}: {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        Ok(body)
    }
}

fn when(unix: u64) -> String {
    let ago = crate::registry::unix_now().saturating_sub(unix);
    match ago {
        0..=119 => format!("{ago}s ago"),
        120..=7199 => format!("{}m ago", ago / 60),
        _ => format!("{}h ago", ago / 3600),
    }
}

/// A readable cluster summary: this process, the relays, the agents and their tunnels.
pub async fn status(admin: &str, raw: bool, timeout: Duration) -> anyhow::Result<String> {
    let client = AdminClient::new(admin, timeout);
    let status_body = client.get("/api/status").await?;
    if raw {
        let relays = client.get("/api/relays").await.unwrap_or_default();
        let agents = client.get("/api/agents").await.unwrap_or_default();
        return Ok(format!(
            "{{\"status\": {}, \"relays\": {}, \"agents\": {}}}\n",
            String::from_utf8_lossy(&status_body),
            if relays.is_empty() {
                "null".into()
            } else {
                String::from_utf8_lossy(&relays).to_string()
            },
            if agents.is_empty() {
                "null".into()
            } else {
                String::from_utf8_lossy(&agents).to_string()
            },
        ));
    }
    let s: serde_json::Value = serde_json::from_slice(&status_body)?;
    let mut out = String::new();
    let ready = if s["ready"].as_bool() == Some(true) {
        "ready".to_string()
    } else {
        format!(
            "NOT READY ({})",
            s["not_ready"].as_array().map_or(String::new(), |a| a
                .iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join("; "))
        )
    };
    writeln!(
        out,
        "{} {} at {admin}: {ready}",
        s["role"].as_str().unwrap_or("?"),
        s["version"].as_str().unwrap_or("?")
    )?;
    if let Some(r) = s["relay"].as_object() {
        writeln!(
            out,
            "  relay {}: {} tunnels, {} streams in flight{}",
            r["id"].as_str().unwrap_or("?"),
            r["tunnels"],
            r["in_flight"],
            if r["draining"].as_bool() == Some(true) {
                ", DRAINING"
            } else {
                ""
            }
        )?;
    }
    if let Some(t) = s["agent_tunnels"].as_u64() {
        let by: Vec<String> = s["agent_transports"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| format!("{k} {v}")).collect())
            .unwrap_or_default();
        if by.is_empty() {
            writeln!(out, "  agent: {t} tunnels up")?;
        } else {
            writeln!(out, "  agent: {t} tunnels up ({})", by.join(", "))?;
        }
        return Ok(out);
    }
    let relays: Vec<RelayInfo> = serde_json::from_slice(&client.get("/api/relays").await?)?;
    let agents: Vec<AgentView> = serde_json::from_slice(&client.get("/api/agents").await?)?;
    writeln!(out, "\nRelays ({}):", relays.len())?;
    for r in &relays {
        let tunnels = agents.iter().filter(|a| a.relays.contains(&r.id)).count();
        writeln!(
            out,
            "  {:<20} peer {:<22} up {:<10} {} agents{}",
            r.id,
            r.peer_addr.map_or("-".to_string(), |a| a.to_string()),
            when(r.started_at),
            tunnels,
            if r.draining { "  DRAINING" } else { "" }
        )?;
    }
    let routes: usize = s["routes"].as_u64().unwrap_or(0) as usize;
    writeln!(out, "\nAgents ({}, {routes} routes):", agents.len())?;
    for a in &agents {
        let ips: Vec<String> = a.ips.iter().map(|ip| ip.to_string()).collect();
        let warn = if a.tunnels < 2 {
            "  (single tunnel)"
        } else {
            ""
        };
        // The transport of each relay's tunnel, in the order of the relays, when they publish it.
        let transports: Vec<String> = a
            .relays
            .iter()
            .map(|r| {
                let kinds: Vec<&str> = a
                    .sessions
                    .iter()
                    .filter(|s| s.relay_id == *r)
                    .filter_map(|s| s.transport.as_deref())
                    .collect();
                if kinds.is_empty() {
                    "?".to_string()
                } else {
                    kinds.join("+")
                }
            })
            .collect();
        let over = if transports.iter().all(|t| t == "?") {
            String::new()
        } else {
            format!(" ({})", transports.join(","))
        };
        writeln!(
            out,
            "  {:<20} {:<10} {:<18} relays {}{over} since {}{warn}",
            a.id,
            a.namespace,
            ips.join(","),
            a.relays.join(","),
            when(a.connected_since)
        )?;
    }
    Ok(out)
}

/// Agents (by `namespace/id`) holding tunnels on fewer live relays than they should: on `want`
/// distinct relays that are registered and not draining, or on every live relay when there are
/// fewer. A draining relay's tunnels do not count: the agent is leaving it.
pub fn lacking_redundancy(relays: &[RelayInfo], agents: &[AgentView], want: usize) -> Vec<String> {
    let live: Vec<&str> = relays
        .iter()
        .filter(|r| !r.draining)
        .map(|r| r.id.as_str())
        .collect();
    let need = want.min(live.len()).max(1);
    agents
        .iter()
        .filter(|a| {
            let on = a
                .relays
                .iter()
                .filter(|r| live.contains(&r.as_str()))
                .count();
            on < need
        })
        .map(|a| {
            format!(
                "{}/{} (on {})",
                a.namespace,
                a.id,
                if a.relays.is_empty() {
                    "no relay".to_string()
                } else {
                    a.relays.join(",")
                }
            )
        })
        .collect()
}

/// Waits until every agent the admin listener at `admin` knows holds tunnels on `want` distinct
/// live relays (see [`lacking_redundancy`]), polling every 200 ms, for up to `timeout`. A rolling
/// restart runs this before stopping the next relay: an agent left on one tunnel loses its last
/// one when that relay goes.
pub async fn wait_redundant(admin: &str, want: usize, timeout: Duration) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let client = AdminClient::new(admin, left.min(Duration::from_secs(5)));
        let relays: Vec<RelayInfo> = serde_json::from_slice(&client.get("/api/relays").await?)?;
        let agents: Vec<AgentView> = serde_json::from_slice(&client.get("/api/agents").await?)?;
        let lacking = lacking_redundancy(&relays, &agents, want);
        if lacking.is_empty() {
            let live = relays.iter().filter(|r| !r.draining).count();
            return Ok(format!(
                "all {} agents hold tunnels on {} live relays\n",
                agents.len(),
                want.min(live).max(1)
            ));
        }
        if tokio::time::Instant::now() + Duration::from_millis(200) >= deadline {
            bail!(
                "after {}: {} agents hold tunnels on fewer than {want} live relays: {}",
                humantime::format_duration(timeout),
                lacking.len(),
                lacking.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Which relays and sessions own `ip` in `namespace`.
pub async fn lookup(
    admin: &str,
    namespace: &str,
    ip: IpAddr,
    timeout: Duration,
) -> anyhow::Result<String> {
    let client = AdminClient::new(admin, timeout);
    let path = format!("/api/routes?namespace={namespace}&ip={ip}");
    let routes: Vec<RouteView> = serde_json::from_slice(&client.get(&path).await?)?;
    let mut out = String::new();
    if routes.is_empty() {
        writeln!(
            out,
            "{namespace}/{ip}: no route (no agent announces this address)"
        )?;
        return Ok(out);
    }
    writeln!(out, "{namespace}/{ip}: {} owner(s)", routes.len())?;
    for r in routes {
        writeln!(
            out,
            "  relay {:<20} session {:<20} agent {:<20} since {}{}",
            r.relay_id,
            r.session_id,
            r.agent_id,
            when(r.connected_at),
            if r.draining { "  DRAINING" } else { "" }
        )?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(id: &str, draining: bool) -> RelayInfo {
        RelayInfo {
            id: id.into(),
            peer_addr: None,
            version: "test".into(),
            started_at: 0,
            draining,
        }
    }

    fn agent(id: &str, relays: &[&str]) -> AgentView {
        AgentView {
            id: id.into(),
            namespace: "default".into(),
            ips: Vec::new(),
            relays: relays.iter().map(|r| r.to_string()).collect(),
            tunnels: relays.len(),
            connected_since: 0,
            draining: false,
            sessions: Vec::new(),
            credential: None,
        }
    }

    #[test]
    fn redundancy_counts_only_live_relays() {
        let relays = [relay("r1", false), relay("r2", true), relay("r3", false)];
        let agents = [
            agent("both-live", &["r1", "r3"]),
            agent("one-draining", &["r1", "r2"]),
            agent("alone", &["r3"]),
        ];
        assert_eq!(
            lacking_redundancy(&relays, &agents, 2),
            ["default/one-draining (on r1,r2)", "default/alone (on r3)"]
        );
        // Fewer live relays than wanted: every live relay is enough.
        let relays = [relay("r1", false), relay("r2", true)];
        assert!(lacking_redundancy(&relays, &[agent("a", &["r1", "r2"])], 2).is_empty());
        assert_eq!(
            lacking_redundancy(&relays, &[agent("a", &["r2"])], 2),
            ["default/a (on r2)"]
        );
    }
}
