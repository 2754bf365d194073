//! The gateway: the front doors legacy applications use (`ALL_PROXY=socks5h://…`). Every target is
//! looked up in the route cache and carried through a tunnel; nothing is dialled directly.

pub mod forward;
pub mod pool;
pub mod socks;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::GatewayConfig;
use crate::registry::cache::RouteCache;
use crate::relay::Relay;
use forward::Forwarder;
use pool::PeerPool;

/// A bound gateway, ready to [`Gateway::run`].
pub struct Gateway {
    config: GatewayConfig,
    socks5: Option<TcpListener>,
    forwarder: Forwarder,
    connections: Arc<Semaphore>,
}

impl Gateway {
    /// Binds the front doors. `local` is the relay of this process, whose routes short-circuit;
    /// `peers` reaches every other relay.
    pub async fn bind(
        config: GatewayConfig,
        cache: Arc<RouteCache>,
        local: Option<Arc<Relay>>,
        peers: Option<PeerPool>,
    ) -> anyhow::Result<Self> {
        let socks5 = match config.socks5 {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding SOCKS5 on {addr}"))?,
            ),
            None => None,
        };
        let forwarder = Forwarder::new(
            cache,
            local,
            peers,
            config.agent_suffix.clone(),
            config.resolve_names,
        );
        let connections = Arc::new(Semaphore::new(config.max_connections));
        Ok(Gateway {
            config,
            socks5,
            forwarder,
            connections,
        })
    }

    pub fn socks5_addr(&self) -> Option<SocketAddr> {
        self.socks5.as_ref().and_then(|l| l.local_addr().ok())
    }

    fn check_password(&self, user: &str, password: &str) -> bool {
        let name = user.split_once('@').map_or(user, |(name, _)| name);
        self.config
            .users
            .iter()
            .filter(|u| u.name == name)
            .any(|u| constant_time_eq(u.password.expose().as_bytes(), password.as_bytes()))
    }

    /// Serves clients until `shutdown`, then gives in-flight connections `grace` to finish.
    pub async fn run(mut self, shutdown: CancellationToken, grace: Duration) -> anyhow::Result<()> {
        let Some(listener) = self.socks5.take() else {
            shutdown.cancelled().await;
            return Ok(());
        };
        tracing::info!(addr = %listener.local_addr()?, "socks5 listening");
        let gateway = Arc::new(self);
        let tasks = TaskTracker::new();
        loop {
            let (tcp, client) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(err) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!(%err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = gateway.connections.clone().try_acquire_owned() else {
                tracing::warn!(%client, limit = gateway.config.max_connections, "connection limit reached; dropping client");
                continue;
            };
            let gateway = gateway.clone();
            tasks.spawn(async move {
                socks::serve(gateway, tcp, client).await;
                drop(permit);
            });
        }
        drop(listener);
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            tracing::warn!(
                remaining = tasks.len(),
                "grace period over; closing remaining client connections"
            );
        }
        Ok(())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
