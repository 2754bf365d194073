//! The agent: on every isolated host, dials OUT to the relays and keeps `redundancy` tunnels to
//! distinct relays; serves the streams relays open, but only to its own IPs and exposed ports.

pub mod stream;
mod tunnel;

use tunnel::Tunnel;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::protocol::{self, close};
use crate::tcp_tunnel::Kind;

/// Deadline for dialling one relay address (QUIC handshake + hello/welcome). Short, because the next
/// address may be alive: a restarting relay's port just stays silent.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// Pongs a tunnel may miss before the agent gives up on it and redials.
const MAX_MISSED_PONGS: u32 = 3;
/// With `tunnel = "auto"`, a QUIC tunnel whose relay showed no sign of hearing the agent (no pong
/// to the pings sent every keep-alive interval, no flow-control credit) for this many intervals
/// gets a TCP tunnel brought up beside it, and is left when that one is up: UDP that stopped
/// passing costs seconds, not the idle timeout plus a dial.
const SILENT_KEEP_ALIVES: u32 = 2;
/// How long a draining relay's tunnel keeps taking new streams once a replacement tunnel is up:
/// the replacement's routes reach the draining relay and the gateways through the registry in
/// about this time, and until they do, the draining relay is the only owner they know of.
const DRAIN_LINGER: Duration = Duration::from_secs(1);

/// What the agent shares between its tunnel slots.
struct Shared {
    config: AgentConfig,
    ips: Vec<IpAddr>,
    /// slot → (relay id, relay address) it currently holds.
    held: Mutex<HashMap<usize, (String, SocketAddr)>>,
    /// slot → transport of the tunnel it holds (shared with [`AgentHandle`]).
    transports: Arc<Mutex<HashMap<usize, Kind>>>,
    /// Live relays as last reported by a relay (Welcome, then every Pong); slots beyond it idle.
    /// A watch, so that an idle slot wakes as soon as a relay joins.
    live_relays: watch::Sender<u32>,
    tunnels_up: watch::Sender<usize>,
    /// Tunnels of draining relays winding down (their in-flight streams finishing); the agent waits
    /// for them before it exits.
    winding_down: TaskTracker,
}

/// A running agent's observable state.
#[derive(Clone)]
pub struct AgentHandle {
    tunnels: watch::Receiver<usize>,
    transports: Arc<Mutex<HashMap<usize, Kind>>>,
    ips: Vec<IpAddr>,
}

impl AgentHandle {
    /// Number of tunnels currently up.
    pub fn tunnels(&self) -> usize {
        *self.tunnels.borrow()
    }

    /// Tunnels up by transport (`quic`, `tcp`).
    pub fn transports(&self) -> std::collections::BTreeMap<String, usize> {
        let mut by = std::collections::BTreeMap::new();
        // Plain values; a poisoned lock still holds a coherent map.
        for kind in self
            .transports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            *by.entry(kind.as_str().to_string()).or_insert(0) += 1;
        }
        by
    }

    /// Waits until at least `n` tunnels are up.
    pub async fn wait_tunnels(&mut self, n: usize) {
        let _ = self.tunnels.wait_for(|up| *up >= n).await;
    }

    /// The IPs the agent claims.
    pub fn ips(&self) -> &[IpAddr] {
        &self.ips
    }
}

/// A configured agent, ready to [`Agent::run`].
pub struct Agent {
    shared: Arc<Shared>,
}

impl Agent {
    pub fn new(config: AgentConfig) -> anyhow::Result<Self> {
        let ips = if config.ips.is_empty() {
            host_addresses()?
        } else {
            if !config.claim_foreign_ips {
                let interfaces =
                    if_addrs::get_if_addrs().context("listing the host's addresses")?;
                if let Some(ip) = config.ips.iter().find(|ip| !host_has(&interfaces, **ip)) {
                    let mut own: Vec<String> =
                        interfaces.iter().map(|i| i.ip().to_string()).collect();
                    own.sort();
                    own.dedup();
                    bail!(
                        "ips: {ip} is not an address of this host (it has {}); an agent claims only \
                         its own addresses. Behind NAT, where the host is reached by an address it \
                         does not carry, set `claim_foreign_ips = true`",
                        own.join(", ")
                    );
                }
            }
            config.ips.clone()
        };
        if ips.is_empty() {
            bail!(
                "no IP to advertise: the host has no non-loopback address; set `ips` in the config"
            );
        }
        if ips.len() > protocol::MAX_AGENT_IPS {
            bail!(
                "ips: the host has {} addresses, more than the {} an agent may claim; list the \
                 ones to serve in `ips`",
                ips.len(),
                protocol::MAX_AGENT_IPS
            );
        }
        let live = config.redundancy;
        Ok(Agent {
            shared: Arc::new(Shared {
                config,
                ips,
                held: Mutex::new(HashMap::new()),
                transports: Arc::new(Mutex::new(HashMap::new())),
                live_relays: watch::channel(live).0,
                tunnels_up: watch::channel(0).0,
                winding_down: TaskTracker::new(),
            }),
        })
    }

    pub fn handle(&self) -> AgentHandle {
        AgentHandle {
            tunnels: self.shared.tunnels_up.subscribe(),
            transports: self.shared.transports.clone(),
            ips: self.shared.ips.clone(),
        }
    }

    /// Keeps the tunnels up until `shutdown`; then lets in-flight streams finish briefly and closes.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let c = &self.shared.config;
        tracing::info!(agent_id = %c.id, namespace = %c.namespace, ips = ?self.shared.ips,
            ports = %c.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(","), "agent starting");
        // A slot that ends by panicking stops the whole agent with an error (the others wind down
        // first), so its supervisor restarts it: an agent quietly short of a tunnel, or one that
        // exits 0 once every slot is gone, would never be restarted.
        let stop = shutdown.child_token();
        let mut slots = tokio::task::JoinSet::new();
        for slot in 0..c.redundancy as usize {
            let shared = self.shared.clone();
            let stop = stop.clone();
            slots.spawn(
                async move { shared.run_slot(slot, stop).await }
                    .instrument(tracing::info_span!("tunnel", slot)),
            );
        }
        let mut failed = None;
        while let Some(ended) = slots.join_next().await {
            if let Err(err) = ended {
                tracing::error!(%err, "a tunnel slot failed; the agent stops");
                failed.get_or_insert(err);
                stop.cancel();
            }
        }
        self.shared.winding_down.close();
        self.shared.winding_down.wait().await;
        match failed {
            Some(err) => Err(anyhow::anyhow!("a tunnel slot failed: {err}")),
            None => Ok(()),
        }
    }
}

impl Shared {
    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashMap<usize, (String, SocketAddr)>> {
        // The map holds plain values; a poisoned lock still holds a coherent map.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wanted(&self) -> usize {
        self.config
            .redundancy
            .min((*self.live_relays.borrow()).max(1)) as usize
    }

    /// Records the live relay count a relay reported; wakes idle slots when it changed.
    fn set_live_relays(&self, live: u32) {
        if live > 0 {
            self.live_relays
                .send_if_modified(|n| std::mem::replace(n, live) != live);
        }
    }

    /// Whether `slot` should idle: the other slots already hold as many tunnels as there are
    /// live relays (or `redundancy`). Counted, not by slot index: the slot that lost its tunnel
    /// may be slot 0 while slot 1 holds the only live relay, and then slot 0 is the one beyond
    /// the live relays. Dialling anyway can only land on a relay already held.
    /// What a stream of the tunnel `session_id` may reach.
    fn policy(&self, session_id: u64) -> stream::Policy {
        stream::Policy {
            ips: self.ips.clone(),
            ports: self.config.ports.clone(),
            session_id,
            connect_timeout: self.config.connect_timeout,
        }
    }

    fn should_idle(&self, slot: usize) -> bool {
        let others = self.lock_held().keys().filter(|s| **s != slot).count();
        others >= self.wanted()
    }

    /// One tunnel slot: dial, serve until the tunnel ends, back off, repeat.
    ///
    /// A dial that lands on a relay another slot already holds costs that relay a session: its
    /// routes are put in etcd before the `Welcome` names the relay, and deleted when the agent
    /// closes the duplicate. So a slot (1) idles while the other slots hold as many tunnels as
    /// there are live relays, (2) dials the relay addresses other slots do not hold, when there
    /// are any, and (3) treats a duplicate landing like a failed dial, with the same exponential
    /// backoff. Together a slot whose relay died neither redials the survivor in a loop while
    /// the dead relay's lease runs out nor afterwards. The relay does not refuse a second `Hello`
    /// of the same agent id and credential instead: it cannot tell it from an agent that
    /// restarted while its old session is not yet timed out, and refusing that one would lock a
    /// restarted agent out of every relay for the idle timeout.
    async fn run_slot(self: Arc<Self>, slot: usize, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        let mut live = self.live_relays.subscribe();
        // The address of the relay this slot's last tunnel was lost to (not drained): dialled
        // last, so a dead or unreachable relay does not cost the slot a whole dial timeout
        // before a live one is tried.
        let mut lost: Option<SocketAddr> = None;
        // Slots start staggered so the first tunnel's Welcome can tell the others the cluster size.
        if slot > 0 {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.reconnect_min * slot as u32) => {}
            }
        }
        while !shutdown.is_cancelled() {
            if self.should_idle(slot) {
                // The cluster is smaller than `redundancy`: idle until a relay joins (a Pong
                // reports it), or look again later (another slot may have lost its tunnel).
                live.mark_unchanged();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = live.changed() => {}
                    _ = tokio::time::sleep(self.config.reconnect_max.min(Duration::from_secs(5))) => {}
                }
                continue;
            }
            // A dial (DNS, QUIC handshake, Hello) can take DIAL_TIMEOUT per relay address; a
            // signal must not wait for it: dropping the dial drops its endpoint and socket.
            let dialled = tokio::select! {
                _ = shutdown.cancelled() => return,
                dialled = self.dial(slot, lost) => dialled,
            };
            match dialled {
                Ok(tunnel) => {
                    // A tunnel that moved to the other transport hands over its replacement.
                    let mut next = Some(tunnel);
                    while let Some(tunnel) = next.take() {
                        next = self
                            .hold(slot, tunnel, &mut backoff, &mut lost, &shutdown)
                            .await;
                    }
                }
                Err(err) => tracing::warn!(err = format!("{err:#}"), "dial failed"),
            }
            let delay = backoff.next_delay();
            // A relay coming up (the live count growing, told by a pong) ends the backoff: the
            // dial that failed may have met that relay while it restarted, and after a few such
            // failures the backoff would outlast its restart by seconds.
            let before = *live.borrow_and_update();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
                _ = live.wait_for(|n| *n > before) => {}
            }
        }
    }

    /// Holds one dialled tunnel in `slot` until it ends; returns the tunnel that replaced it when
    /// it moved to the other transport (`tunnel = "auto"`). `lost` becomes the relay address when
    /// the tunnel was lost (not drained or moved).
    async fn hold(
        self: &Arc<Self>,
        slot: usize,
        tunnel: Tunnel,
        backoff: &mut Backoff,
        lost: &mut Option<SocketAddr>,
        shutdown: &CancellationToken,
    ) -> Option<Tunnel> {
        self.set_live_relays(tunnel.welcome.live_relays);
        let duplicate = {
            let mut held = self.lock_held();
            let dup = held
                .iter()
                .any(|(s, (r, _))| *s != slot && *r == tunnel.welcome.relay_id);
            if !dup {
                held.insert(
                    slot,
                    (
                        tunnel.welcome.relay_id.clone(),
                        tunnel.connection.remote_address(),
                    ),
                );
            }
            dup
        };
        if duplicate {
            // Backed off like a failed dial: behind a load balancer the next dial
            // (a fresh UDP port, a new 5-tuple) may reach another relay, but while
            // the only other relay is down every landing is a duplicate.
            tracing::debug!(relay_id = %tunnel.welcome.relay_id, "tunnel landed on a relay already held");
            tunnel
                .connection
                .close(close::DUPLICATE.into(), b"duplicate relay");
            return None;
        }
        backoff.reset();
        let transport = tunnel.transport;
        self.tunnels_up.send_modify(|n| *n += 1);
        crate::metrics::metrics().agent_tunnels.inc();
        crate::metrics::metrics()
            .agent_tunnels_by_transport(transport.as_str())
            .inc();
        self.lock_transports().insert(slot, transport);
        let relay_id = tunnel.welcome.relay_id.clone();
        let remote = tunnel.connection.remote_address();
        tracing::info!(%relay_id, session_id = %tunnel.welcome.session_id, %transport, "tunnel up");
        let result = self.serve(slot, tunnel, shutdown).await;
        *lost = result.is_err().then_some(remote);
        self.tunnels_up.send_modify(|n| *n -= 1);
        crate::metrics::metrics().agent_tunnels.dec();
        crate::metrics::metrics()
            .agent_tunnels_by_transport(transport.as_str())
            .dec();
        self.lock_transports().remove(&slot);
        self.lock_held().remove(&slot);
        match result {
            Ok(Some(next)) => {
                tracing::info!(%relay_id, from = %transport, to = %next.transport, "tunnel moved");
                Some(next)
            }
            Ok(None) => {
                tracing::info!(%relay_id, "tunnel closed");
                None
            }
            Err(err) => {
                tracing::warn!(%relay_id, err = format!("{err:#}"), "tunnel lost");
                None
            }
        }
    }

    /// Whether a slot other than `slot` holds a tunnel to `relay_id`.
    fn held_elsewhere(&self, slot: usize, relay_id: &str) -> bool {
        self.lock_held()
            .iter()
            .any(|(s, (r, _))| *s != slot && r == relay_id)
    }

    fn lock_transports(&self) -> std::sync::MutexGuard<'_, HashMap<usize, Kind>> {
        // Plain values; a poisoned lock still holds a coherent map.
        self.transports.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether the host carries `ip`: an interface has exactly that address, or `ip` lies in a
/// loopback interface's network (Linux answers for all of 127.0.0.0/8 on `lo`).
fn host_has(interfaces: &[if_addrs::Interface], ip: IpAddr) -> bool {
    interfaces.iter().any(|i| match (&i.addr, ip) {
        _ if i.ip() == ip => true,
        (if_addrs::IfAddr::V4(a), IpAddr::V4(v4)) if a.ip.is_loopback() => {
            let mask = u32::from(a.netmask);
            u32::from(a.ip) & mask == u32::from(v4) & mask
        }
        _ => false,
    })
}

/// The host's own addresses: not loopback, not link-local, not unspecified.
fn host_addresses() -> anyhow::Result<Vec<IpAddr>> {
    let mut ips: Vec<IpAddr> = if_addrs::get_if_addrs()
        .context("listing the host's addresses")?
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_link_local(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .collect();
    ips.sort();
    ips.dedup();
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_has_its_loopback_network_and_not_a_foreign_address() {
        let interfaces = if_addrs::get_if_addrs().unwrap();
        assert!(host_has(&interfaces, "127.0.0.1".parse().unwrap()));
        // Inside lo's 127.0.0.0/8, as the tests' agents claim.
        assert!(host_has(&interfaces, "127.77.0.1".parse().unwrap()));
        // TEST-NET-3: documentation only, never configured on a host.
        assert!(!host_has(&interfaces, "203.0.113.7".parse().unwrap()));
        for i in interfaces.iter().filter(|i| !i.is_loopback()) {
            assert!(host_has(&interfaces, i.ip()), "{}", i.ip());
        }
    }
}
