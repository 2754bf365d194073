//! `postern server`: relay + gateway in one process.

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub relay: RelayFile,
    pub gateway: GatewayFile,
    pub peer: Option<PeerFile>,
    #[serde(default)]
    pub registry: RegistryFile,
    #[serde(default)]
    pub admin: AdminFile,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub relay: RelayConfig,
    pub gateway: GatewayConfig,
    pub peer: Option<PeerConfig>,
    pub registry: RegistryConfig,
    pub admin: Option<SocketAddr>,
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::from_file(read_toml(path)?)
    }

    pub fn from_file(f: ServerFile) -> Result<Self, Error> {
        let mut errors = Errors::default();
        let peer = errors.take(f.peer.map(PeerConfig::from_file).transpose());
        let registry = errors.take(RegistryConfig::from_file(f.registry));
        let relay = errors.take(RelayConfig::from_file(f.relay));
        let gateway = errors.take(GatewayConfig::from_file(f.gateway));
        let admin = errors.take(admin(f.admin, ADMIN_DEFAULT));
        let (Some(peer), Some(registry), Some(relay), Some(gateway), Some(admin)) =
            (peer, registry, relay, gateway, admin)
        else {
            return Err(errors.failed());
        };
        let config = ServerConfig {
            relay,
            gateway,
            peer,
            registry,
            admin,
        };
        errors.take(check_cluster(
            &config.registry,
            &config.relay,
            config.peer.as_ref(),
            true,
        ));
        errors.take(check_listeners(&config.listeners()));
        errors.finish()?;
        Ok(config)
    }

    /// Every socket the server opens.
    pub fn listeners(&self) -> Vec<Listener> {
        let mut out = Vec::new();
        relay_listeners(&self.relay, &mut out);
        gateway_listeners(&self.gateway, &mut out);
        admin_listener(self.admin, &mut out);
        out
    }
}

/// A relay in a shared registry must be reachable by peers, and a process that forwards to peers
/// must be able to authenticate to them.
fn check_cluster(
    registry: &RegistryConfig,
    relay: &RelayConfig,
    peer: Option<&PeerConfig>,
    forwards: bool,
) -> Result<(), Error> {
    if relay.peer.is_some() && peer.is_none() {
        return Err(invalid(
            "peer",
            "relay.peer_listen needs a [peer] section (its ca verifies peers)",
        ));
    }
    if matches!(registry, RegistryConfig::Etcd { .. }) {
        if relay.peer.is_none() {
            return Err(invalid(
                "relay.peer_listen",
                "required with an etcd registry: other gateways forward through it",
            ));
        }
        if forwards && peer.is_some_and(|p| p.identity.is_none()) {
            return Err(invalid(
                "peer.cert",
                "required with an etcd registry: this process forwards to other relays",
            ));
        }
    }
    Ok(())
}

/// Standalone relays and gateways only make sense with a registry other processes share.
fn require_shared_registry(registry: &RegistryConfig, role: &str) -> Result<(), Error> {
    if *registry == RegistryConfig::Memory {
        return Err(invalid(
            "registry.kind",
            format!(
                "a standalone {role} needs a shared registry (kind = \"etcd\"); `postern server` runs one process alone"
            ),
        ));
    }
    Ok(())
}

// `postern relay`: a relay alone.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayRoleFile {
    pub relay: RelayFile,
    pub peer: Option<PeerFile>,
    #[serde(default)]
    pub registry: RegistryFile,
    #[serde(default)]
    pub admin: AdminFile,
}

#[derive(Clone, Debug)]
pub struct RelayRoleConfig {
    pub relay: RelayConfig,
    pub peer: Option<PeerConfig>,
    pub registry: RegistryConfig,
    pub admin: Option<SocketAddr>,
}

impl RelayRoleConfig {
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::from_file(read_toml(path)?)
    }

    pub fn from_file(f: RelayRoleFile) -> Result<Self, Error> {
        let mut errors = Errors::default();
        let peer = errors.take(f.peer.map(PeerConfig::from_file).transpose());
        let registry = errors.take(
            RegistryConfig::from_file(f.registry)
                .and_then(|r| require_shared_registry(&r, "relay").map(|()| r)),
        );
        let relay = errors.take(RelayConfig::from_file(f.relay));
        let admin = errors.take(admin(f.admin, ADMIN_DEFAULT));
        let (Some(peer), Some(registry), Some(relay), Some(admin)) = (peer, registry, relay, admin)
        else {
            return Err(errors.failed());
        };
        let config = RelayRoleConfig {
            relay,
            peer,
            registry,
            admin,
        };
        errors.take(check_cluster(
            &config.registry,
            &config.relay,
            config.peer.as_ref(),
            false,
        ));
        errors.take(check_listeners(&config.listeners()));
        errors.finish()?;
        Ok(config)
    }

    /// Every socket the relay opens.
    pub fn listeners(&self) -> Vec<Listener> {
        let mut out = Vec::new();
        relay_listeners(&self.relay, &mut out);
        admin_listener(self.admin, &mut out);
        out
    }
}

// `postern gateway`: front doors alone, forwarding to relays over peer connections.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRoleFile {
    pub gateway: GatewayFile,
    pub peer: PeerFile,
    #[serde(default)]
    pub registry: RegistryFile,
    #[serde(default)]
    pub admin: AdminFile,
}

#[derive(Clone, Debug)]
pub struct GatewayRoleConfig {
    pub gateway: GatewayConfig,
    pub peer: PeerConfig,
    pub registry: RegistryConfig,
    pub admin: Option<SocketAddr>,
}

impl GatewayRoleConfig {
    pub fn load(path: &Path) -> Result<Self, Error> {
        Self::from_file(read_toml(path)?)
    }

    pub fn from_file(f: GatewayRoleFile) -> Result<Self, Error> {
        let mut errors = Errors::default();
        let peer = errors.take(PeerConfig::from_file(f.peer).and_then(|peer| {
            if peer.identity.is_none() {
                return Err(invalid(
                    "peer.cert",
                    "a gateway needs a peer certificate to forward through relays",
                ));
            }
            Ok(peer)
        }));
        let registry = errors.take(
            RegistryConfig::from_file(f.registry)
                .and_then(|r| require_shared_registry(&r, "gateway").map(|()| r)),
        );
        let gateway = errors.take(GatewayConfig::from_file(f.gateway));
        let admin = errors.take(admin(f.admin, ADMIN_DEFAULT));
        let (Some(peer), Some(registry), Some(gateway), Some(admin)) =
            (peer, registry, gateway, admin)
        else {
            return Err(errors.failed());
        };
        let config = GatewayRoleConfig {
            gateway,
            peer,
            registry,
            admin,
        };
        errors.take(check_listeners(&config.listeners()));
        errors.finish()?;
        Ok(config)
    }

    /// Every socket the gateway opens.
    pub fn listeners(&self) -> Vec<Listener> {
        let mut out = Vec::new();
        gateway_listeners(&self.gateway, &mut out);
        admin_listener(self.admin, &mut out);
        out
    }
}
