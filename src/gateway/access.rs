//! Who may use the gateway and what they may reach. The same checks guard both front doors and run
//! for every connection, against the identity that was authenticated and the address that will
//! actually be routed (after `<agent>.<suffix>` or DNS resolution) — never against a header or name
//! the client could vary independently.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::config::{GatewayConfig, Rule, User};
use crate::protocol::Code;

use super::forward::Target;

/// The client as the gateway knows it after authentication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    pub addr: std::net::SocketAddr,
    /// The authenticated user; `None` when the gateway has no users.
    pub user: Option<String>,
    /// The namespace the client picked (`user@namespace`), or the gateway's default.
    pub namespace: String,
}

/// The access policy in force; replaced whole on reload (SIGHUP) while connections keep their
/// per-client slots.
pub struct AccessHandle {
    current: std::sync::RwLock<Arc<Access>>,
}

impl AccessHandle {
    pub fn new(config: &GatewayConfig) -> Self {
        AccessHandle {
            current: std::sync::RwLock::new(Arc::new(Access::new(config))),
        }
    }

    fn get(&self) -> Arc<Access> {
        // Replaced whole under the lock: a poisoned lock still holds a complete policy.
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts `config`'s users, allowlist and rules in force for every later check.
    pub fn reload(&self, config: &GatewayConfig) {
        let old = self.get();
        let mut fresh = Access::new(config);
        fresh.per_client = old.per_client.clone();
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
    }

    pub fn admit(&self, ip: IpAddr) -> Result<ClientSlot, &'static str> {
        self.get().admit(ip)
    }

    pub fn requires_password(&self) -> bool {
        self.get().requires_password()
    }

    pub fn authenticate(
        &self,
        addr: std::net::SocketAddr,
        login: &str,
        password: &str,
    ) -> Result<Client, Code> {
        self.get().authenticate(addr, login, password)
    }

    pub fn anonymous(&self, addr: std::net::SocketAddr) -> Result<Client, Code> {
        self.get().anonymous(addr)
    }

    pub fn check(&self, client: &Client, target: &Target) -> Result<(), Code> {
        self.get().check(client, target)
    }
}

pub struct Access {
    users: Vec<User>,
    clients: Vec<ipnet::IpNet>,
    rules: Vec<Rule>,
    default_namespace: String,
    per_client_limit: usize,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// Holds one of a client address's connection slots.
pub struct ClientSlot {
    ip: IpAddr,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Access {
    pub fn new(config: &GatewayConfig) -> Self {
        Access {
            users: config.users.clone(),
            clients: config.clients.clone(),
            rules: config.rules.clone(),
            default_namespace: config.namespace.clone(),
            per_client_limit: config.max_connections_per_client,
            per_client: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Admits a new connection from `ip`: on the allowlist and under its per-client limit.
    pub fn admit(&self, ip: IpAddr) -> Result<ClientSlot, &'static str> {
        let ip = canonical(ip);
        if !self.clients.is_empty() && !self.clients.iter().any(|net| net.contains(&ip)) {
            return Err("client address not allowed");
        }
        let mut map = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.per_client_limit {
            return Err("per-client connection limit reached");
        }
        *n += 1;
        Ok(ClientSlot {
            ip,
            per_client: self.per_client.clone(),
        })
    }

    /// Whether clients must authenticate.
    pub fn requires_password(&self) -> bool {
        !self.users.is_empty()
    }

    /// Authenticates `login` (`user` or `user@namespace`) with `password`. Without configured users
    /// any password is accepted and only the namespace part is used.
    pub fn authenticate(
        &self,
        addr: std::net::SocketAddr,
        login: &str,
        password: &str,
    ) -> Result<Client, Code> {
        let (name, namespace) = match login.split_once('@') {
            Some((name, ns)) if !ns.is_empty() => (name, ns.to_string()),
            _ => (login, self.default_namespace.clone()),
        };
        if crate::config::check_namespace(&namespace, "namespace").is_err() {
            return Err(Code::NotAllowed);
        }
        if self.users.is_empty() {
            return Ok(Client {
                addr,
                user: None,
                namespace,
            });
        }
        let ok = self
            .users
            .iter()
            .filter(|u| u.name == name)
            .any(|u| constant_time_eq(u.password.expose().as_bytes(), password.as_bytes()));
        if ok {
            Ok(Client {
                addr,
                user: Some(name.to_string()),
                namespace,
            })
        } else {
            Err(Code::Unauthorized)
        }
    }

    /// A client that presented no credentials.
    pub fn anonymous(&self, addr: std::net::SocketAddr) -> Result<Client, Code> {
        if self.requires_password() {
            return Err(Code::Unauthorized);
        }
        Ok(Client {
            addr,
            user: None,
            namespace: self.default_namespace.clone(),
        })
    }

    /// May `client` reach `target`? With no rules, yes; otherwise only if some rule matches.
    pub fn check(&self, client: &Client, target: &Target) -> Result<(), Code> {
        if self.rules.is_empty() {
            return Ok(());
        }
        let client_ip = canonical(client.addr.ip());
        let target_ip = canonical(target.addr.ip());
        let allowed = self.rules.iter().any(|rule| {
            (rule.users.is_empty() || client.user.as_ref().is_some_and(|u| rule.users.contains(u)))
                && (rule.clients.is_empty() || rule.clients.iter().any(|n| n.contains(&client_ip)))
                && (rule.namespaces.is_empty() || rule.namespaces.contains(&target.namespace))
                && (rule.targets.is_empty() || rule.targets.iter().any(|n| n.contains(&target_ip)))
                && (rule.ports.is_empty()
                    || rule.ports.iter().any(|p| p.contains(target.addr.port())))
        });
        if allowed {
            Ok(())
        } else {
            Err(Code::NotAllowed)
        }
    }
}

/// IPv4-mapped IPv6 addresses compare as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn config() -> GatewayConfig {
        GatewayConfig {
            users: vec![User {
                name: "alice".into(),
                password: Secret::new("pw"),
            }],
            rules: vec![Rule {
                users: vec!["alice".into()],
                targets: vec!["127.1.0.0/16".parse().unwrap()],
                ports: vec!["9100".parse().unwrap()],
                ..Rule::default()
            }],
            max_connections_per_client: 2,
            clients: vec!["127.0.0.0/8".parse().unwrap()],
            ..GatewayConfig::default()
        }
    }

    fn target(ns: &str, addr: &str) -> Target {
        Target {
            namespace: ns.into(),
            addr: addr.parse().unwrap(),
        }
    }

    #[test]
    fn rules_default_deny_and_match_every_field() {
        let access = Access::new(&config());
        let addr = "127.0.0.1:5000".parse().unwrap();
        let alice = access.authenticate(addr, "alice", "pw").unwrap();
        assert_eq!(
            access.check(&alice, &target("default", "127.1.0.1:9100")),
            Ok(())
        );
        assert_eq!(
            access.check(&alice, &target("default", "127.2.0.1:9100")),
            Err(Code::NotAllowed)
        );
        assert_eq!(
            access.check(&alice, &target("default", "127.1.0.1:22")),
            Err(Code::NotAllowed)
        );
        assert_eq!(
            access.authenticate(addr, "alice", "nope"),
            Err(Code::Unauthorized)
        );
        assert_eq!(
            access.authenticate(addr, "bob", "pw"),
            Err(Code::Unauthorized)
        );
        assert_eq!(access.anonymous(addr), Err(Code::Unauthorized));
        let in_ns = access.authenticate(addr, "alice@blue", "pw").unwrap();
        assert_eq!(in_ns.namespace, "blue");
        assert_eq!(in_ns.user.as_deref(), Some("alice"));
    }

    #[test]
    fn allowlist_and_per_client_limit() {
        let access = Access::new(&config());
        assert!(access.admit("10.0.0.1".parse().unwrap()).is_err());
        let a = access.admit("127.0.0.1".parse().unwrap()).unwrap();
        let _b = access.admit("::ffff:127.0.0.1".parse().unwrap()).unwrap();
        assert!(access.admit("127.0.0.1".parse().unwrap()).is_err());
        drop(a);
        assert!(access.admit("127.0.0.1".parse().unwrap()).is_ok());
    }
}
