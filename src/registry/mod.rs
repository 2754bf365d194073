//! The registry: where relays publish which agent IPs they hold a tunnel for, and where gateways learn
//! it. One trait, two implementations: [`memory`] (embedded, one process) and etcd (a cluster).
//!
//! Layout (the etcd keys; the memory registry keeps the same shape):
//! ```text
//! {prefix}/relays/{relay_id}                               → RelayInfo
//! {prefix}/routes/{namespace}/{ip}/{relay_id}/{session_id} → Route
//! ```
//! Every key a relay writes hangs off that relay's one lease, so a dead relay's routes vanish with it.
//! Nothing on the data path talks to the registry: gateways read an in-memory [`cache::RouteCache`].

pub mod cache;
pub mod etcd;
pub mod memory;

use std::net::IpAddr;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::protocol::PortRange;

/// Registry failures. The kinds matter to the caller: `Unavailable` is worth retrying with the
/// same lease, `LeaseNotFound` means the lease is gone and must be granted anew.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// etcd did not answer, the connection broke, or it refused for a transient reason.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// etcd no longer knows the lease (it expired or was revoked): its keys are gone.
    #[error("etcd lease {lease:x} not found (expired or revoked)")]
    LeaseNotFound { lease: i64 },
    #[error("relay {0} is not registered")]
    NotRegistered(String),
    /// Another live relay holds this relay id (its record hangs off a lease that is not ours).
    #[error(
        "relay id {id} is held by another live relay (etcd lease {lease:x}, TTL {ttl_secs}s); \
         relay ids must be unique: set relay.id"
    )]
    IdTaken {
        id: String,
        lease: i64,
        ttl_secs: i64,
    },
    #[error("malformed registry entry {key}: {message}")]
    Malformed { key: String, message: String },
}

/// Identifies one route: one tunnel session of one relay serving one IP of one namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RouteKey {
    pub namespace: String,
    pub ip: IpAddr,
    pub relay_id: String,
    #[serde(with = "session_id_json")]
    pub session_id: u64,
}

/// Session ids in JSON are strings: they are random 64-bit values, and JSON numbers above 2^53 lose
/// digits in JavaScript and jq, so an id copied from the admin API would no longer match the logs or
/// `postern lookup`. Reading accepts a string or, as older versions wrote them, a number.
pub mod session_id_json {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Id {
            Text(String),
            Number(u64),
        }
        match Id::deserialize(d)? {
            Id::Number(n) => Ok(n),
            Id::Text(text) => text.parse().map_err(|_| {
                serde::de::Error::custom(format!(
                    "invalid session id {text:?}: not a 64-bit number"
                ))
            }),
        }
    }
}

impl RouteKey {
    /// The key below `{prefix}/routes/`.
    pub fn path(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.namespace, self.ip, self.relay_id, self.session_id
        )
    }

    /// Parses [`RouteKey::path`]'s output.
    pub fn parse(path: &str) -> Result<Self, Error> {
        let bad = |m: &str| Error::Malformed {
            key: path.to_string(),
            message: m.to_string(),
        };
        let mut parts = path.split('/');
        let (Some(ns), Some(ip), Some(relay), Some(session), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad("expected namespace/ip/relay_id/session_id"));
        };
        Ok(RouteKey {
            namespace: ns.to_string(),
            ip: ip.parse().map_err(|_| bad("invalid IP"))?,
            relay_id: relay.to_string(),
            session_id: session.parse().map_err(|_| bad("invalid session id"))?,
        })
    }
}

/// A route: which session of which relay reaches an IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub key: RouteKey,
    pub value: RouteValue,
}

/// What a route key maps to (the JSON value in etcd).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteValue {
    pub agent_id: String,
    pub ports: Vec<PortRange>,
    /// Unix seconds.
    pub connected_at: u64,
    pub draining: bool,
    /// Fingerprint of the credential that admitted the tunnel (`token:…` or `cert:<name>`), so
    /// relays refuse an agent id to a second credential. Absent in routes of older relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// What carries the tunnel: `quic`, or `tcp` (QUIC over TCP + TLS). Absent in routes of
    /// older relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

impl Route {
    pub fn new(key: RouteKey, agent_id: String, ports: Vec<PortRange>) -> Self {
        Route {
            key,
            value: RouteValue {
                agent_id,
                ports,
                connected_at: unix_now(),
                draining: false,
                credential: None,
                transport: None,
            },
        }
    }
}

/// A relay's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    pub id: String,
    /// Where gateways and other relays reach this relay's peer endpoint.
    pub peer_addr: Option<SocketAddr>,
    pub version: String,
    pub started_at: u64,
    pub draining: bool,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A change to the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    PutRoute(Route),
    DeleteRoute(RouteKey),
    PutRelay(RelayInfo),
    DeleteRelay(String),
}

/// The whole registry at one revision.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub revision: i64,
    pub routes: Vec<Route>,
    pub relays: Vec<RelayInfo>,
}

/// What a watch delivers.
#[derive(Clone, Debug)]
pub enum WatchItem {
    /// Changes up to and including `revision`.
    Events { revision: i64, events: Vec<Event> },
    /// No change, but the registry confirms the view is current up to `revision` (etcd progress
    /// notifications; the memory registry sends one every second). How old the last confirmation
    /// is tells how stale a gateway's view may be.
    Progress { revision: i64 },
    /// The watch cannot continue from where it was (compacted history, lagging consumer): re-list.
    Reset,
}

/// The registry as relays and gateways use it. Implementations must be cheap to call concurrently.
#[async_trait::async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Grants (or re-grants) the relay's lease and writes its record under it, if the record is
    /// absent or already ours: [`Error::IdTaken`] when another live relay holds the id.
    async fn register_relay(&self, relay: &RelayInfo) -> Result<(), Error>;
    /// Revokes the relay's lease: its record and every route it wrote disappear at once.
    async fn deregister_relay(&self, relay_id: &str) -> Result<(), Error>;
    /// Writes routes under the owning relay's lease.
    async fn put_routes(&self, relay_id: &str, routes: &[Route]) -> Result<(), Error>;
    async fn delete_routes(&self, keys: &[RouteKey]) -> Result<(), Error>;
    /// The routes of relay `relay_id` that this process wrote and still owns: with etcd, those
    /// attached to this process's current lease. A reconcile deletes stale routes among these
    /// only, never another process's.
    async fn owned_routes(&self, relay_id: &str) -> Result<Vec<RouteKey>, Error>;
    /// Every route and relay, with the revision they were read at.
    async fn snapshot(&self) -> Result<Snapshot, Error>;
    /// Changes after `revision` (exclusive), in order. The channel closes when the watch breaks.
    async fn watch(&self, after_revision: i64) -> Result<mpsc::Receiver<WatchItem>, Error>;
    /// Changes whenever this process's relay lease was lost, so the relay re-registers and re-puts
    /// its routes (the registry forgets keys of a lost lease).
    fn lease_epoch(&self) -> watch::Receiver<u64>;
    /// True when this process's relay lease has gone unconfirmed by the registry for longer than
    /// its TTL (or was never granted in that long): the relay cannot publish, and its routes may
    /// be gone. Never for the memory registry.
    fn cut_off(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An id above 2^53 is written as a string with every digit; both forms read back exactly.
    #[test]
    fn session_ids_are_json_strings_and_old_numbers_still_read() {
        let id = u64::MAX - 6; // 18446744073709551609: not representable as an f64
        let key = RouteKey {
            namespace: "default".into(),
            ip: "10.1.2.3".parse().unwrap(),
            relay_id: "relay-1".into(),
            session_id: id,
        };
        let text = serde_json::to_string(&key).unwrap();
        assert!(
            text.contains("\"session_id\":\"18446744073709551609\""),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<RouteKey>(&text).unwrap(), key);
        let old = text.replace("\"18446744073709551609\"", "18446744073709551609");
        assert_eq!(serde_json::from_str::<RouteKey>(&old).unwrap(), key);
        let bad = text.replace("18446744073709551609", "12x");
        let err = serde_json::from_str::<RouteKey>(&bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid session id \"12x\""), "{err}");
    }

    #[test]
    fn route_key_path_round_trips() {
        for ip in ["10.1.2.3", "fd00::1"] {
            let key = RouteKey {
                namespace: "default".into(),
                ip: ip.parse().unwrap(),
                relay_id: "relay-1".into(),
                session_id: 42,
            };
            assert_eq!(RouteKey::parse(&key.path()).unwrap(), key);
        }
        assert!(RouteKey::parse("a/b").is_err());
        assert!(RouteKey::parse("ns/1.2.3.4/r/x").is_err());
        assert!(RouteKey::parse("ns/1.2.3.4/r/1/extra").is_err());
    }
}
