//! `postern server`: a relay and a gateway in one process, sharing one registry view; routes this
//! relay owns short-circuit from the gateway into the relay without a network hop.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::{RegistryConfig, ServerConfig};
use crate::gateway::Gateway;
use crate::registry::cache::RouteCache;
use crate::registry::etcd::EtcdRegistry;
use crate::registry::memory::MemoryRegistry;
use crate::registry::Registry;
use crate::relay::Relay;

/// A bound server, ready to [`Server::run`].
pub struct Server {
    relay: Arc<Relay>,
    gateway: Gateway,
    cache: Arc<RouteCache>,
    registry: Arc<dyn Registry>,
    config: ServerConfig,
}

/// Where a bound server listens.
#[derive(Clone, Copy, Debug)]
pub struct Addresses {
    pub relay: SocketAddr,
    pub socks5: Option<SocketAddr>,
}

/// Opens the registry a config names.
pub async fn open_registry(config: &RegistryConfig) -> anyhow::Result<Arc<dyn Registry>> {
    match config {
        RegistryConfig::Memory => Ok(Arc::new(MemoryRegistry::new())),
        RegistryConfig::Etcd {
            endpoints,
            prefix,
            lease_ttl,
        } => Ok(Arc::new(
            EtcdRegistry::connect(endpoints, prefix, *lease_ttl)
                .await
                .context("connecting to etcd")?,
        )),
    }
}

impl Server {
    pub async fn bind(config: ServerConfig) -> anyhow::Result<Self> {
        let registry = open_registry(&config.registry).await?;
        Self::bind_with_registry(config, registry).await
    }

    /// Binds with a given registry (tests share one memory registry between several roles).
    pub async fn bind_with_registry(
        config: ServerConfig,
        registry: Arc<dyn Registry>,
    ) -> anyhow::Result<Self> {
        let cache = Arc::new(RouteCache::new());
        let relay = Relay::bind(config.relay.clone(), registry.clone(), cache.clone())?;
        let gateway =
            Gateway::bind(config.gateway.clone(), cache.clone(), Some(relay.clone())).await?;
        Ok(Server {
            relay,
            gateway,
            cache,
            registry,
            config,
        })
    }

    pub fn addresses(&self) -> anyhow::Result<Addresses> {
        Ok(Addresses {
            relay: self.relay.local_addr().context("relay address")?,
            socks5: self.gateway.socks5_addr(),
        })
    }

    pub fn relay(&self) -> &Arc<Relay> {
        &self.relay
    }

    pub fn cache(&self) -> &Arc<RouteCache> {
        &self.cache
    }

    /// Runs until `shutdown`: the gateway stops taking clients and drains, the relay closes its
    /// tunnels and deregisters.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let cache_stop = CancellationToken::new();
        let cache_task = tokio::spawn(
            self.cache
                .clone()
                .run(self.registry.clone(), cache_stop.clone()),
        );
        let relay_stop = CancellationToken::new();
        let relay_task = tokio::spawn(self.relay.clone().run(relay_stop.clone()));
        let gateway_result = self
            .gateway
            .run(shutdown.clone(), self.config.relay.drain_grace)
            .await;
        relay_stop.cancel();
        let relay_result = relay_task.await.context("relay task panicked")?;
        cache_stop.cancel();
        let _ = cache_task.await;
        gateway_result.and(relay_result)
    }
}
