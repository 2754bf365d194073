//! Typed config builders for every role (`agent`, `relay`, `gateway`, `server`), the one place
//! the process-level suites build their configs. Each builder writes TOML from typed fields and
//! leaves out every key a test did not set, so the real config parser applies the **shipped
//! defaults** (timings, windows, lease TTL) unless a test overrides a field explicitly, and the
//! override shows in the test that makes it.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

/// The files and secret a cluster's processes share: a CA, relay and peer certificates (relay
/// name `postern-relay`) and one agent token.
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca: PathBuf,
    pub relay_cert: PathBuf,
    pub relay_key: PathBuf,
    pub peer_cert: PathBuf,
    pub peer_key: PathBuf,
}

impl Pki {
    pub fn generate(dir: &Path) -> Pki {
        Pki::from(&postern::cert::generate_bundle(dir, "postern-relay").unwrap())
    }
}

impl From<&postern::cert::Bundle> for Pki {
    fn from(b: &postern::cert::Bundle) -> Pki {
        Pki {
            ca: b.ca.clone(),
            relay_cert: b.relay_cert.clone(),
            relay_key: b.relay_key.clone(),
            peer_cert: b.peer_cert.clone(),
            peer_key: b.peer_key.clone(),
        }
    }
}

/// A duration as the config files write it.
pub fn dur(d: Duration) -> Value {
    if d.subsec_millis() == 0 && d.as_nanos() % 1_000_000_000 == 0 {
        Value::String(format!("{}s", d.as_secs()))
    } else {
        Value::String(format!("{}ms", d.as_millis()))
    }
}

fn s(v: impl ToString) -> Value {
    Value::String(v.to_string())
}

fn path(p: &Path) -> Value {
    Value::String(p.to_str().expect("utf-8 path").to_string())
}

fn strings<T: ToString>(items: &[T]) -> Value {
    Value::Array(items.iter().map(|i| s(i.to_string())).collect())
}

/// Sets `key` in `table` when `value` is given (absent keys take the shipped default).
fn set(table: &mut Table, key: &str, value: Option<Value>) {
    if let Some(v) = value {
        table.insert(key.to_string(), v);
    }
}

/// Merges `over` into `base`, tables recursively (an override wins over a built key).
fn merge(base: &mut Table, over: &Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// One token credential of a relay.
#[derive(Clone, Debug)]
pub struct Credential {
    pub name: String,
    pub token: String,
    pub allow: Vec<String>,
}

impl Credential {
    pub fn new(name: &str, token: &str, allow: &[&str]) -> Credential {
        Credential {
            name: name.into(),
            token: token.into(),
            allow: allow.iter().map(|a| a.to_string()).collect(),
        }
    }
}

/// The `[relay]` table.
#[derive(Clone, Debug)]
pub struct Relay {
    pub id: String,
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub agents: Vec<Credential>,
    pub peer_listen: Option<SocketAddr>,
    pub peer_advertise: Option<String>,
    pub drain_grace: Option<Duration>,
    pub max_tunnels: Option<u32>,
}

impl Relay {
    pub fn new(id: &str, listen: SocketAddr, pki: &Pki, agents: Vec<Credential>) -> Relay {
        Relay {
            id: id.into(),
            listen,
            cert: pki.relay_cert.clone(),
            key: pki.relay_key.clone(),
            agents,
            peer_listen: None,
            peer_advertise: None,
            drain_grace: None,
            max_tunnels: None,
        }
    }

    fn table(&self) -> Table {
        let mut t = Table::new();
        t.insert("id".into(), s(&self.id));
        t.insert("listen".into(), s(self.listen));
        t.insert("cert".into(), path(&self.cert));
        t.insert("key".into(), path(&self.key));
        set(&mut t, "peer_listen", self.peer_listen.map(s));
        set(
            &mut t,
            "peer_advertise",
            self.peer_advertise.as_ref().map(s),
        );
        set(&mut t, "drain_grace", self.drain_grace.map(dur));
        set(
            &mut t,
            "max_tunnels",
            self.max_tunnels.map(|n| Value::Integer(n.into())),
        );
        let agents = self
            .agents
            .iter()
            .map(|c| {
                let mut a = Table::new();
                a.insert("name".into(), s(&c.name));
                a.insert(
                    "token_sha256".into(),
                    s(postern::config::token_hash(&c.token)),
                );
                a.insert("allow".into(), strings(&c.allow));
                Value::Table(a)
            })
            .collect();
        t.insert("agents".into(), Value::Array(agents));
        t
    }
}

/// The `[gateway]` table.
#[derive(Clone, Debug, Default)]
pub struct Gateway {
    pub socks5: Option<String>,
    pub http: Option<String>,
    pub drain_grace: Option<Duration>,
    pub users: Vec<(String, String)>,
}

impl Gateway {
    /// SOCKS5 on `ip` (any port), everything else shipped.
    pub fn on(ip: IpAddr) -> Gateway {
        Gateway {
            socks5: Some(SocketAddr::new(ip, 0).to_string()),
            ..Gateway::default()
        }
    }

    fn table(&self) -> Table {
        let mut t = Table::new();
        set(&mut t, "socks5", self.socks5.as_ref().map(s));
        set(&mut t, "http", self.http.as_ref().map(s));
        set(&mut t, "drain_grace", self.drain_grace.map(dur));
        if !self.users.is_empty() {
            let users = self
                .users
                .iter()
                .map(|(n, p)| {
                    let mut u = Table::new();
                    u.insert("name".into(), s(n));
                    u.insert("password".into(), s(p));
                    Value::Table(u)
                })
                .collect();
            t.insert("users".into(), Value::Array(users));
        }
        t
    }
}

/// The `[peer]` table: the CA, and the client certificate of a process that dials relays.
#[derive(Clone, Debug)]
pub struct Peer {
    pub ca: PathBuf,
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl Peer {
    /// What a relay alone needs (it verifies peers, it dials none).
    pub fn verify(pki: &Pki) -> Peer {
        Peer {
            ca: pki.ca.clone(),
            identity: None,
        }
    }

    /// What a gateway (or server) needs to dial relays' peer endpoints.
    pub fn dialer(pki: &Pki) -> Peer {
        Peer {
            ca: pki.ca.clone(),
            identity: Some((pki.peer_cert.clone(), pki.peer_key.clone())),
        }
    }

    fn table(&self) -> Table {
        let mut t = Table::new();
        t.insert("ca".into(), path(&self.ca));
        if let Some((cert, key)) = &self.identity {
            t.insert("cert".into(), path(cert));
            t.insert("key".into(), path(key));
        }
        t
    }
}

/// The `[registry]` table of an etcd registry (absent: the memory registry).
#[derive(Clone, Debug, Default)]
pub struct Registry {
    pub endpoints: Vec<String>,
    pub lease_ttl: Option<Duration>,
    /// etcd's CA, for `https://` endpoints.
    pub ca: Option<PathBuf>,
    /// postern's client certificate and key, for etcd's `--client-cert-auth`.
    pub client: Option<(PathBuf, PathBuf)>,
    /// etcd user and password reference (`env:…`).
    pub user: Option<(String, String)>,
    pub max_staleness: Option<Duration>,
}

impl Registry {
    pub fn etcd(url: &str) -> Registry {
        Registry {
            endpoints: vec![url.to_string()],
            ..Registry::default()
        }
    }

    fn table(&self) -> Table {
        let mut t = Table::new();
        t.insert("kind".into(), s("etcd"));
        t.insert("endpoints".into(), strings(&self.endpoints));
        set(&mut t, "lease_ttl", self.lease_ttl.map(dur));
        set(&mut t, "max_staleness", self.max_staleness.map(dur));
        set(&mut t, "ca", self.ca.as_deref().map(path));
        if let Some((cert, key)) = &self.client {
            t.insert("cert".into(), path(cert));
            t.insert("key".into(), path(key));
        }
        if let Some((user, password)) = &self.user {
            t.insert("username".into(), s(user));
            t.insert("password".into(), s(password));
        }
        t
    }
}

/// Adds the tables every role may have (`[peer]`, `[registry]`, `[admin]`), merges `extra` and
/// writes the TOML.
fn finish(
    mut t: Table,
    peer: Option<&Peer>,
    registry: Option<&Registry>,
    admin: &Option<String>,
    extra: &Table,
) -> String {
    if let Some(p) = peer {
        t.insert("peer".into(), Value::Table(p.table()));
    }
    if let Some(r) = registry {
        t.insert("registry".into(), Value::Table(r.table()));
    }
    if let Some(listen) = admin {
        let mut a = Table::new();
        a.insert("listen".into(), s(listen));
        t.insert("admin".into(), Value::Table(a));
    }
    merge(&mut t, extra);
    toml::to_string(&t).expect("a TOML table serialises")
}

/// `postern relay`.
#[derive(Clone, Debug)]
pub struct RelayRole {
    pub relay: Relay,
    pub peer: Option<Peer>,
    pub registry: Option<Registry>,
    /// `[admin] listen`: `None` leaves the shipped default, which tests never want.
    pub admin: Option<String>,
    /// Anything else, merged last (e.g. `[relay.transport]`).
    pub extra: Table,
}

impl RelayRole {
    /// A relay registered in etcd with its peer endpoint on `relay.listen`'s IP, admin on any port.
    pub fn new(relay: Relay, pki: &Pki, etcd: Registry) -> RelayRole {
        let ip = relay.listen.ip();
        let mut relay = relay;
        relay.peer_listen.get_or_insert(SocketAddr::new(ip, 0));
        RelayRole {
            relay,
            peer: Some(Peer::verify(pki)),
            registry: Some(etcd),
            admin: Some(SocketAddr::new(ip, 0).to_string()),
            extra: Table::new(),
        }
    }

    pub fn toml(&self) -> String {
        let mut t = Table::new();
        t.insert("relay".into(), Value::Table(self.relay.table()));
        finish(
            t,
            self.peer.as_ref(),
            self.registry.as_ref(),
            &self.admin,
            &self.extra,
        )
    }
}

/// `postern gateway`.
#[derive(Clone, Debug)]
pub struct GatewayRole {
    pub gateway: Gateway,
    pub peer: Peer,
    pub registry: Registry,
    pub admin: Option<String>,
    pub extra: Table,
}

impl GatewayRole {
    /// A gateway on `ip` (SOCKS5 and admin on any port) reading routes from etcd.
    pub fn new(ip: IpAddr, pki: &Pki, etcd: Registry) -> GatewayRole {
        GatewayRole {
            gateway: Gateway::on(ip),
            peer: Peer::dialer(pki),
            registry: etcd,
            admin: Some(SocketAddr::new(ip, 0).to_string()),
            extra: Table::new(),
        }
    }

    pub fn toml(&self) -> String {
        let mut t = Table::new();
        t.insert("gateway".into(), Value::Table(self.gateway.table()));
        finish(
            t,
            Some(&self.peer),
            Some(&self.registry),
            &self.admin,
            &self.extra,
        )
    }
}

/// `postern server`: relay and gateway in one process.
#[derive(Clone, Debug)]
pub struct ServerRole {
    pub relay: Relay,
    pub gateway: Gateway,
    pub peer: Option<Peer>,
    pub registry: Option<Registry>,
    pub admin: Option<String>,
    pub extra: Table,
}

impl ServerRole {
    /// A server with the memory registry: relay, SOCKS5 and admin on `relay.listen`'s IP.
    pub fn alone(relay: Relay) -> ServerRole {
        let ip = relay.listen.ip();
        ServerRole {
            relay,
            gateway: Gateway::on(ip),
            peer: None,
            registry: None,
            admin: Some(SocketAddr::new(ip, 0).to_string()),
            extra: Table::new(),
        }
    }

    /// A server registered in etcd, forwarding to other relays over peer connections.
    pub fn clustered(relay: Relay, pki: &Pki, etcd: Registry) -> ServerRole {
        let ip = relay.listen.ip();
        let mut relay = relay;
        relay.peer_listen.get_or_insert(SocketAddr::new(ip, 0));
        ServerRole {
            peer: Some(Peer::dialer(pki)),
            registry: Some(etcd),
            ..ServerRole::alone(relay)
        }
    }

    pub fn toml(&self) -> String {
        let mut t = Table::new();
        t.insert("relay".into(), Value::Table(self.relay.table()));
        t.insert("gateway".into(), Value::Table(self.gateway.table()));
        finish(
            t,
            self.peer.as_ref(),
            self.registry.as_ref(),
            &self.admin,
            &self.extra,
        )
    }
}

/// `postern agent`. The token is read from the environment variable `token_env`.
#[derive(Clone, Debug)]
pub struct AgentRole {
    pub id: String,
    pub relays: Vec<SocketAddr>,
    pub ca: PathBuf,
    pub token_env: String,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<u16>,
    pub redundancy: Option<u32>,
    pub reconnect_min: Option<Duration>,
    pub reconnect_max: Option<Duration>,
    pub drain_grace: Option<Duration>,
    pub admin: Option<String>,
    pub extra: Table,
}

impl AgentRole {
    /// An agent claiming `ip` (its admin listener there too), exposing `ports`.
    pub fn new(
        id: &str,
        relays: &[SocketAddr],
        pki: &Pki,
        token_env: &str,
        ip: IpAddr,
        ports: &[u16],
    ) -> AgentRole {
        AgentRole {
            id: id.into(),
            relays: relays.to_vec(),
            ca: pki.ca.clone(),
            token_env: token_env.into(),
            ips: vec![ip],
            ports: ports.to_vec(),
            redundancy: None,
            reconnect_min: None,
            reconnect_max: None,
            drain_grace: None,
            admin: Some(SocketAddr::new(ip, 0).to_string()),
            extra: Table::new(),
        }
    }

    pub fn toml(&self) -> String {
        let mut t = Table::new();
        t.insert("id".into(), s(&self.id));
        t.insert("relays".into(), strings(&self.relays));
        t.insert("server_name".into(), s("postern-relay"));
        t.insert("ca".into(), path(&self.ca));
        t.insert("token".into(), s(format!("env:{}", self.token_env)));
        t.insert("ips".into(), strings(&self.ips));
        t.insert("ports".into(), strings(&self.ports));
        // POSTERN_TEST_TUNNEL=tcp (or quic, auto) runs every suite's agents on that tunnel
        // transport (the default, unset, is the shipped `auto`).
        if let Ok(mode) = std::env::var("POSTERN_TEST_TUNNEL") {
            t.insert("tunnel".into(), s(mode));
        }
        set(
            &mut t,
            "redundancy",
            self.redundancy.map(|n| Value::Integer(n.into())),
        );
        set(&mut t, "reconnect_min", self.reconnect_min.map(dur));
        set(&mut t, "reconnect_max", self.reconnect_max.map(dur));
        set(&mut t, "drain_grace", self.drain_grace.map(dur));
        finish(t, None, None, &self.admin, &self.extra)
    }
}

/// A `[transport]` override table (`idle_timeout`, `keep_alive`, …) for `extra`.
pub fn transport(pairs: &[(&str, Duration)]) -> Table {
    let mut inner = Table::new();
    for (k, v) in pairs {
        inner.insert(k.to_string(), dur(*v));
    }
    let mut t = Table::new();
    t.insert("transport".into(), Value::Table(inner));
    t
}
