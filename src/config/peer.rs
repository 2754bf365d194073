//! Peer connections (gateway/relay → relay).

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerFile {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub server_name: Option<String>,
    pub connect_timeout: Option<HumanDuration>,
    pub max_streams: Option<u32>,
    #[serde(default)]
    pub transport: TransportFile,
}

/// How processes authenticate each other on peer connections (mutual TLS under one CA).
#[derive(Clone, Debug)]
pub struct PeerConfig {
    /// Verifies relays' peer endpoints and, on a relay, the client certificates of peers.
    pub ca: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// What this process presents when it dials a relay's peer endpoint.
    pub identity: Option<Identity>,
    /// The name relay certificates carry for peer connections.
    pub server_name: String,
    pub connect_timeout: Duration,
    /// Concurrent forwarded connections per peer connection.
    pub max_streams: u32,
    pub transport: Transport,
}

impl PeerConfig {
    /// Peer links cross the data centre: a dead relay must be noticed within about a second.
    pub fn default_transport() -> Transport {
        Transport {
            idle_timeout: Duration::from_millis(1500),
            keep_alive: Duration::from_millis(300),
            ..Transport::default()
        }
    }

    pub fn from_file(f: PeerFile) -> Result<Self, Error> {
        let ca = tls::load_certs(&f.ca).map_err(|source| Error::Tls {
            key: "peer.ca".into(),
            source,
        })?;
        let identity = match (f.cert, f.key) {
            (Some(cert), Some(key)) => Some(identity(&cert, &key, "peer")?),
            (None, None) => None,
            _ => return Err(invalid("peer.cert", "peer.cert and peer.key go together")),
        };
        let d = Self::default_transport();
        let t = f.transport;
        let transport = Transport::from_file(
            TransportFile {
                idle_timeout: t.idle_timeout.or(Some(HumanDuration(d.idle_timeout))),
                keep_alive: t.keep_alive.or(Some(HumanDuration(d.keep_alive))),
                ..t
            },
            "peer.transport",
        )?;
        let max_streams = f.max_streams.unwrap_or(4096);
        if max_streams == 0 {
            return Err(invalid("peer.max_streams", "must be at least 1"));
        }
        Ok(PeerConfig {
            ca,
            identity,
            server_name: f.server_name.unwrap_or_else(|| "postern-relay".into()),
            connect_timeout: f.connect_timeout.map_or(Duration::from_secs(2), |d| d.0),
            max_streams,
            transport,
        })
    }
}
