//! postern lets existing applications reach machines inside isolated networks by their original IP,
//! through an ordinary SOCKS5 (or HTTP) proxy.
//!
//! ```text
//!  app ──SOCKS5──▶ gateway ──(route cache: ip → relay, session)──▶ relay ══QUIC tunnel══▶ agent ──TCP──▶ service
//!                     ▲                                              │    (dialled OUT by
//!                     └──────── registry watch ◀── routes (leased) ──┘     the agent)
//! ```
//!
//! * [`agent`] dials out to relays and keeps tunnels open; it serves only its own IPs and exposed ports.
//! * [`relay`] authenticates agents, keeps the session table, publishes routes to the [`registry`].
//! * [`gateway`] accepts proxy clients and forwards each connection through the tunnel that owns the
//!   target IP — one QUIC stream per TCP connection, so no head-of-line blocking.
//! * [`protocol`] holds every byte the processes exchange; [`splice`] moves the payload.
//!
//! The words (agent, relay, gateway, tunnel, session, route, namespace, lease) are defined in
//! `docs/architecture.md`.
// No unsafe code, but for one measured need: the ioctl that reads a TCP socket's send queue
// (`splice::limits::send_queue`; no maintained crate wraps it), without which slow readers were reset.
#![deny(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod backoff;
pub mod bench;
pub mod cert;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod logging;
pub mod metrics;
pub mod protocol;
pub mod registry;
pub mod relay;
pub mod server;
pub mod splice;
pub mod tcp_tunnel;
pub mod tls;
