//! How the long-running commands compose the pieces:
//! * `postern server`: a relay and a gateway in one process sharing one registry view; routes this
//!   relay owns short-circuit from the gateway into the relay, other relays are reached as peers.
//! * `postern relay`: a relay alone (its peer endpoint serves gateways).
//! * `postern gateway`: the front doors alone, forwarding to relays over peer connections.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::{GatewayRoleConfig, RegistryConfig, RelayRoleConfig, ServerConfig};
use crate::gateway::pool::PeerPool;
use crate::gateway::Gateway;
use crate::registry::cache::RouteCache;
use crate::registry::etcd::EtcdRegistry;
use crate::registry::memory::MemoryRegistry;
use crate::registry::Registry;
use crate::relay::Relay;

/// Where a bound process listens.
#[derive(Clone, Copy, Debug, Default)]
pub struct Addresses {
    pub relay: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    pub socks5: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
}

impl std::fmt::Display for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |a: Option<SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
        write!(
            f,
            "relay={} peer={} socks5={} http={}",
            show(self.relay),
            show(self.peer),
            show(self.socks5),
            show(self.http)
        )
    }
}

/// Opens the registry a config names.
pub async fn open_registry(config: &RegistryConfig) -> anyhow::Result<Arc<dyn Registry>> {
    match config {
        RegistryConfig::Memory => Ok(Arc::new(MemoryRegistry::new())),
        RegistryConfig::Etcd {
            endpoints,
            prefix,
            lease_ttl,
            security,
            ..
        } => Ok(Arc::new(
            EtcdRegistry::connect_with(endpoints, prefix, *lease_ttl, security)
                .await
                .context("connecting to etcd")?,
        )),
    }
}

/// `registry` when the caller shares one (tests), otherwise the one `config` names.
async fn given_or_open(
    registry: Option<Arc<dyn Registry>>,
    config: &RegistryConfig,
) -> anyhow::Result<Arc<dyn Registry>> {
    match registry {
        Some(r) => Ok(r),
        None => open_registry(config).await,
    }
}

/// A bound `postern server`, `relay` or `gateway`, ready to [`Process::run`].
pub struct Process {
    relay: Option<Arc<Relay>>,
    gateway: Option<Arc<Gateway>>,
    cache: Arc<RouteCache>,
    registry: Arc<dyn Registry>,
    grace: std::time::Duration,
}

/// `postern server`.
pub type Server = Process;

/// What outlives [`Process::run`]'s start: for the admin listener and for reloads.
#[derive(Clone)]
pub struct ProcessHandle {
    pub relay: Option<Arc<Relay>>,
    pub gateway: Option<Arc<Gateway>>,
    pub cache: Arc<RouteCache>,
}

impl ProcessHandle {
    /// Applies what a reload may change — agent credentials, users, client allowlist, rules — and
    /// leaves everything else as it started.
    pub fn reload(
        &self,
        agents: Option<Vec<crate::config::AgentCredential>>,
        gateway: Option<&crate::config::GatewayConfig>,
    ) {
        if let (Some(relay), Some(agents)) = (&self.relay, agents) {
            let closed = relay.reload_credentials(agents);
            if closed > 0 {
                tracing::warn!(
                    closed,
                    "tunnels closed: their agent credentials were revoked"
                );
            }
        }
        if let (Some(g), Some(config)) = (&self.gateway, gateway) {
            g.reload(config);
        }
    }
}

impl Process {
    /// Binds a relay + gateway.
    pub async fn bind(config: ServerConfig) -> anyhow::Result<Self> {
        let registry = open_registry(&config.registry).await?;
        Self::bind_with_registry(config, registry).await
    }

    /// Binds a relay + gateway with a given registry (tests share one memory registry between
    /// several processes' worth of roles).
    pub async fn bind_with_registry(
        config: ServerConfig,
        registry: Arc<dyn Registry>,
    ) -> anyhow::Result<Self> {
        let cache = Arc::new(RouteCache::new().with_max_staleness(config.registry.max_staleness()));
        let relay = Relay::bind(
            config.relay.clone(),
            config.peer.as_ref(),
            registry.clone(),
            cache.clone(),
        )?;
        let peers = match &config.peer {
            Some(peer) if peer.identity.is_some() => Some(PeerPool::new(peer, cache.clone())?),
            _ => None,
        };
        let gateway = Gateway::bind(
            config.gateway.clone(),
            cache.clone(),
            Some(relay.clone()),
            peers,
        )
        .await?;
        Ok(Process {
            relay: Some(relay),
            gateway: Some(Arc::new(gateway)),
            cache,
            registry,
            grace: config.gateway.drain_grace,
        })
    }

    /// Binds a relay alone.
    pub async fn bind_relay(
        config: RelayRoleConfig,
        registry: Option<Arc<dyn Registry>>,
    ) -> anyhow::Result<Self> {
        let registry = given_or_open(registry, &config.registry).await?;
        let cache = Arc::new(RouteCache::new().with_max_staleness(config.registry.max_staleness()));
        let relay = Relay::bind(
            config.relay.clone(),
            config.peer.as_ref(),
            registry.clone(),
            cache.clone(),
        )?;
        Ok(Process {
            relay: Some(relay),
            gateway: None,
            cache,
            registry,
            grace: config.relay.drain_grace,
        })
    }

    /// Binds a gateway alone.
    pub async fn bind_gateway(
        config: GatewayRoleConfig,
        registry: Option<Arc<dyn Registry>>,
    ) -> anyhow::Result<Self> {
        let registry = given_or_open(registry, &config.registry).await?;
        let cache = Arc::new(RouteCache::new().with_max_staleness(config.registry.max_staleness()));
        let peers = PeerPool::new(&config.peer, cache.clone())?;
        let gateway =
            Gateway::bind(config.gateway.clone(), cache.clone(), None, Some(peers)).await?;
        Ok(Process {
            relay: None,
            gateway: Some(Arc::new(gateway)),
            cache,
            registry,
            grace: config.gateway.drain_grace,
        })
    }

    pub fn addresses(&self) -> Addresses {
        Addresses {
            relay: self.relay.as_ref().and_then(|r| r.local_addr().ok()),
            peer: self.relay.as_ref().and_then(|r| r.peer_addr()),
            socks5: self.gateway.as_ref().and_then(|g| g.socks5_addr()),
            http: self.gateway.as_ref().and_then(|g| g.http_addr()),
        }
    }

    pub fn relay(&self) -> Option<&Arc<Relay>> {
        self.relay.as_ref()
    }

    pub fn cache(&self) -> &Arc<RouteCache> {
        &self.cache
    }

    pub fn handle(&self) -> ProcessHandle {
        ProcessHandle {
            relay: self.relay.clone(),
            gateway: self.gateway.clone(),
            cache: self.cache.clone(),
        }
    }

    /// Runs until `shutdown`: the gateway stops taking clients and drains while the relay drains its
    /// tunnels; then the relay deregisters.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let cache_stop = CancellationToken::new();
        let cache_task = tokio::spawn(
            self.cache
                .clone()
                .run(self.registry.clone(), cache_stop.clone()),
        );
        // A relay that may not run (its id is another live relay's) stops the whole process.
        let shutdown = shutdown.child_token();
        let relay_task = self.relay.clone().map(|relay| {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let result = relay.run(shutdown.clone()).await;
                if result.is_err() {
                    shutdown.cancel();
                }
                result
            })
        });
        let gateway_result = match self.gateway {
            Some(gateway) => gateway.run(shutdown.clone(), self.grace).await,
            None => {
                shutdown.cancelled().await;
                Ok(())
            }
        };
        let relay_result = match relay_task {
            Some(task) => task.await.context("relay task panicked")?,
            None => Ok(()),
        };
        cache_stop.cancel();
        let _ = cache_task.await;
        gateway_result.and(relay_result)
    }
}
