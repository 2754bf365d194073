//! The relay's session table: the truth about which tunnels this relay holds. Routes in the
//! registry are derived from it and reconciled against it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::protocol::PortRange;
use crate::registry::{Route, RouteKey};

/// One agent tunnel.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub agent_id: String,
    pub namespace: String,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<PortRange>,
    pub connection: quinn::Connection,
    /// What carries the tunnel: QUIC over UDP, or over TCP + TLS.
    pub transport: crate::tcp_tunnel::Kind,
    pub connected_at: u64,
    /// SHA-256 of the token that admitted the agent; `None` when a certificate did.
    pub token_sha256: Option<[u8; 32]>,
    /// Fingerprint of the admitting credential, published with the routes (`token:…`,
    /// `cert:<name>`): an agent id belongs to one credential.
    pub credential: String,
    pub draining: AtomicBool,
    /// Cancelled when the relay drains: the control loop then tells the agent.
    pub drain: tokio_util::sync::CancellationToken,
}

impl Session {
    /// The routes this session implies, one per IP.
    pub fn routes(&self, relay_id: &str) -> Vec<Route> {
        self.ips
            .iter()
            .map(|ip| {
                let mut route = Route::new(
                    RouteKey {
                        namespace: self.namespace.clone(),
                        ip: *ip,
                        relay_id: relay_id.to_string(),
                        session_id: self.id,
                    },
                    self.agent_id.clone(),
                    self.ports.clone(),
                );
                route.value.connected_at = self.connected_at;
                route.value.draining = self.draining.load(Ordering::Relaxed);
                route.value.credential = Some(self.credential.clone());
                route.value.transport = Some(self.transport.as_str().to_string());
                route
            })
            .collect()
    }

    pub fn serves(&self, namespace: &str, ip: IpAddr) -> bool {
        self.namespace == namespace && self.ips.contains(&ip)
    }
}

/// Why [`SessionTable::insert_exclusive`] refused a session.
#[derive(Debug, PartialEq, Eq)]
pub enum Conflict {
    /// Another agent id serves this address.
    Address { ip: IpAddr, holder: String },
    /// Another credential holds this agent id.
    AgentId,
    /// The agent id already holds [`MAX_TUNNELS_PER_AGENT`] tunnels here.
    TooManyTunnels,
    /// The credential's tunnels here are at its `max_tunnels`.
    CredentialTunnels(u32),
    /// The session's addresses would take the credential's tunnels here past its `max_addresses`.
    CredentialAddresses { limit: u32, held: u64 },
}

/// Tunnels one agent id may hold on one relay. An agent keeps one per relay (`redundancy` ≤ 8, each
/// on a different relay); a few more come and go while it moves a tunnel or redials before a lost
/// one has timed out. Without a bound, one credential could open tunnels without end, each
/// publishing a route for every claimed address.
pub const MAX_TUNNELS_PER_AGENT: usize = 16;

#[derive(Default)]
struct Inner {
    by_id: HashMap<u64, Arc<Session>>,
    by_ip: HashMap<(String, IpAddr), Vec<u64>>,
    /// Sessions by `(namespace, agent id)`, so admitting a tunnel checks the id's credential
    /// without walking every session (a scan made each Hello cost O(sessions): 10,000 agents
    /// spent a sixth of the relay's CPU comparing strings).
    by_agent: HashMap<(String, String), Vec<u64>>,
    /// Tunnels and claimed addresses by credential fingerprint, for the credentials' quotas.
    by_credential: HashMap<String, Held>,
}

/// What one credential's tunnels hold here.
#[derive(Default)]
struct Held {
    tunnels: u32,
    addresses: u64,
}

/// Sessions by id and by `(namespace, ip)`; several sessions may serve one IP (an agent that
/// reconnected before its old tunnel timed out, or several agents sharing a VIP-like address).
#[derive(Default)]
pub struct SessionTable {
    inner: RwLock<Inner>,
    next: AtomicUsize,
}

impl SessionTable {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // Each write is a few whole map operations; a poisoned lock still holds coherent maps.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Inserts `session` unless it conflicts with a session already here: one of its addresses
    /// is served by another agent id, its agent id is held by another credential, or its
    /// credential's tunnels here are at their `quota`. Checked and inserted under one lock, so two
    /// racing hellos cannot both win.
    pub fn insert_exclusive(
        &self,
        session: Arc<Session>,
        quota: crate::config::Quota,
    ) -> Result<(), Conflict> {
        let mut inner = self.write();
        if let Some(held) = inner.by_credential.get(&session.credential) {
            if let Some(limit) = quota.tunnels.filter(|limit| held.tunnels >= *limit) {
                return Err(Conflict::CredentialTunnels(limit));
            }
            if let Some(limit) = quota
                .addresses
                .filter(|limit| held.addresses + session.ips.len() as u64 > u64::from(*limit))
            {
                return Err(Conflict::CredentialAddresses {
                    limit,
                    held: held.addresses,
                });
            }
        } else if let Some(limit) = quota
            .addresses
            .filter(|limit| session.ips.len() as u64 > u64::from(*limit))
        {
            return Err(Conflict::CredentialAddresses { limit, held: 0 });
        }
        for ip in &session.ips {
            let ids = inner.by_ip.get(&(session.namespace.clone(), *ip));
            if let Some(holder) = ids
                .into_iter()
                .flatten()
                .filter_map(|id| inner.by_id.get(id))
                .find(|s| s.agent_id != session.agent_id)
            {
                return Err(Conflict::Address {
                    ip: *ip,
                    holder: holder.agent_id.clone(),
                });
            }
        }
        let agent = (session.namespace.clone(), session.agent_id.clone());
        let held = inner.by_agent.get(&agent).map_or(&[][..], |ids| &ids[..]);
        if held
            .iter()
            .filter_map(|id| inner.by_id.get(id))
            .any(|s| s.credential != session.credential)
        {
            return Err(Conflict::AgentId);
        }
        if held.len() >= MAX_TUNNELS_PER_AGENT {
            return Err(Conflict::TooManyTunnels);
        }
        Self::insert_locked(&mut inner, session);
        Ok(())
    }

    fn insert_locked(inner: &mut Inner, session: Arc<Session>) {
        for ip in &session.ips {
            inner
                .by_ip
                .entry((session.namespace.clone(), *ip))
                .or_default()
                .push(session.id);
        }
        inner
            .by_agent
            .entry((session.namespace.clone(), session.agent_id.clone()))
            .or_default()
            .push(session.id);
        let held = inner
            .by_credential
            .entry(session.credential.clone())
            .or_default();
        held.tunnels += 1;
        held.addresses += session.ips.len() as u64;
        inner.by_id.insert(session.id, session);
    }

    pub fn remove(&self, id: u64) -> Option<Arc<Session>> {
        let mut inner = self.write();
        let session = inner.by_id.remove(&id)?;
        for ip in &session.ips {
            let slot = (session.namespace.clone(), *ip);
            if let Some(ids) = inner.by_ip.get_mut(&slot) {
                ids.retain(|s| *s != id);
                if ids.is_empty() {
                    inner.by_ip.remove(&slot);
                }
            }
        }
        let agent = (session.namespace.clone(), session.agent_id.clone());
        if let Some(ids) = inner.by_agent.get_mut(&agent) {
            ids.retain(|s| *s != id);
            if ids.is_empty() {
                inner.by_agent.remove(&agent);
            }
        }
        if let Some(held) = inner.by_credential.get_mut(&session.credential) {
            held.tunnels = held.tunnels.saturating_sub(1);
            held.addresses = held.addresses.saturating_sub(session.ips.len() as u64);
            if held.tunnels == 0 {
                inner.by_credential.remove(&session.credential);
            }
        }
        Some(session)
    }

    /// Tunnels and claimed addresses held here by the credential with fingerprint `credential`.
    pub fn held_by(&self, credential: &str) -> (u32, u64) {
        self.read()
            .by_credential
            .get(credential)
            .map_or((0, 0), |held| (held.tunnels, held.addresses))
    }

    pub fn get(&self, id: u64) -> Option<Arc<Session>> {
        self.read().by_id.get(&id).cloned()
    }

    /// Sessions serving `(namespace, ip)`, rotated round-robin across calls, draining ones last.
    pub fn candidates(&self, namespace: &str, ip: IpAddr) -> Vec<Arc<Session>> {
        let inner = self.read();
        let Some(ids) = inner.by_ip.get(&(namespace.to_string(), ip)) else {
            return Vec::new();
        };
        let start = self.next.fetch_add(1, Ordering::Relaxed) % ids.len();
        let mut sessions: Vec<Arc<Session>> = ids[start..]
            .iter()
            .chain(&ids[..start])
            .filter_map(|id| inner.by_id.get(id).cloned())
            .collect();
        sessions.sort_by_key(|s| s.draining.load(Ordering::Relaxed));
        sessions
    }

    pub fn all(&self) -> Vec<Arc<Session>> {
        self.read().by_id.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.read().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
