//! TLS for every QUIC endpoint postern opens: loading PEM material, building quinn server and client
//! configurations, and binding the UDP socket they run on.
//!
//! Everything here is TLS 1.3 with the ring provider, chosen explicitly rather than through the
//! process default so that a second provider compiled in by some dependency can never change what a
//! relay accepts.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// ALPN an agent speaks when it dials a relay.
pub const ALPN_AGENT: &[u8] = b"postern/1";
/// ALPN a gateway or another relay speaks when it dials a relay as a peer.
pub const ALPN_PEER: &[u8] = b"postern-peer/1";
/// ALPN of the outer TLS layer of an agent's TCP tunnel (the QUIC inside speaks [`ALPN_AGENT`]).
pub const ALPN_TCP: &[u8] = b"postern-tcp/1";

/// What can go wrong while loading TLS material or assembling a TLS configuration.
///
/// Causes are kept as [`std::error::Error::source`] rather than repeated in the message; print the
/// chain (`{:#}` through anyhow) to see them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A certificate or key file could not be read.
    #[error("cannot read {}", path.display())]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
    /// The file exists but holds no `CERTIFICATE` block; usually a key file given as a certificate.
    #[error("no certificates in {origin}")]
    NoCertificates {
        /// The file path, or "PEM input".
        origin: String,
    },
    /// The file holds no private key block (PKCS#8, PKCS#1 or SEC1).
    #[error("no private key in {origin}")]
    NoPrivateKey {
        /// The file path, or "PEM input".
        origin: String,
    },
    /// The PEM text itself is broken (bad base64, unterminated block, ...).
    #[error("malformed PEM in {origin}")]
    Pem {
        /// The file path, or "PEM input".
        origin: String,
        /// The underlying failure.
        #[source]
        source: pem::Error,
    },
    /// A certificate pin is not 32 bytes of hex.
    #[error("bad certificate pin {input:?}: {reason}")]
    BadPin {
        /// The pin as given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// rustls refused the configuration, e.g. a key that does not match its certificate or a CA
    /// certificate it cannot parse.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    /// A certificate verifier could not be built, for instance from an empty list of CA roots.
    #[error("cannot build certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// quinn found no cipher suite it may use for QUIC initial packets in the configuration.
    #[error("TLS configuration unusable for QUIC")]
    Quic(#[from] NoInitialCipherSuite),
}

/// How a client (agent, gateway) decides to trust the relay it dials.
#[derive(Clone, Debug)]
pub enum Trust {
    /// Verify the relay's chain against these roots and its name against the name dialled.
    Ca(Vec<CertificateDer<'static>>),
    /// Accept exactly the end-entity certificate with this SHA-256, whatever its name or issuer;
    /// for relays with self-signed certificates.
    Pin([u8; 32]),
}

/// Identity a QUIC endpoint presents: end-entity certificate first, then any intermediates.
pub struct Identity {
    /// End-entity certificate first; never empty for a usable identity.
    pub chain: Vec<CertificateDer<'static>>,
    /// The end-entity certificate's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// Shows the chain's fingerprints, never the key, so an `Identity` can sit in logged config.
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fingerprints: Vec<String> = self.chain.iter().map(fingerprint).collect();
        f.debug_struct("Identity")
            .field("chain", &fingerprints)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Installs ring as the process-wide rustls provider.
///
/// Our own configurations name their provider explicitly, but any other code that builds a rustls
/// configuration with the plain `builder()` asks for the process default, and rustls panics when
/// it cannot pick one. Idempotent: a provider that is already installed is left in place.
pub fn install_crypto_provider() {
    // Err only means a provider was installed before us, which is the state we want.
    let _ = ring_provider().install_default();
}

/// ring, with AES-128-GCM preferred: as strong as the tunnel needs and cheaper per byte than the
/// default's AES-256-GCM, which costs a tenth of an agent's CPU on bulk transfers.
fn ring_provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
}

/// Reads every certificate in a PEM file, in file order.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read(path)?;
    certs_from_pem(&pem, &path.display().to_string())
}

/// Reads the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = read(path)?;
    key_from_pem(&pem, &path.display().to_string())
}

/// Parses every certificate in PEM text, in order.
pub fn parse_certs_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    certs_from_pem(pem, "PEM input")
}

/// Parses the first private key in PEM text.
pub fn parse_key_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, Error> {
    key_from_pem(pem, "PEM input")
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })
}

fn certs_from_pem(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem {
            origin: origin.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificates {
            origin: origin.to_owned(),
        });
    }
    Ok(certs)
}

fn key_from_pem(pem: &[u8], origin: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|err| match err {
        pem::Error::NoItemsFound => Error::NoPrivateKey {
            origin: origin.to_owned(),
        },
        source => Error::Pem {
            origin: origin.to_owned(),
            source,
        },
    })
}

/// Lower-case hex SHA-256 of a DER certificate: the form `pin` settings hold and logs print.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Parses a SHA-256 certificate pin.
///
/// Accepts what operators paste: plain hex as [`fingerprint`] prints it, an optional `sha256:`
/// prefix, upper or lower case, and `:`-separated bytes as `openssl x509 -fingerprint` prints them.
pub fn parse_pin(s: &str) -> Result<[u8; 32], Error> {
    let bad = |reason| Error::BadPin {
        input: s.to_owned(),
        reason,
    };
    let trimmed = s.trim();
    let hex = match trimmed.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("sha256:") => &trimmed[7..],
        _ => trimmed,
    };
    let digits: Vec<u8> = hex.bytes().filter(|&b| b != b':').collect();
    if digits.len() != 64 {
        return Err(bad("expected 64 hex digits (a SHA-256)"));
    }
    let mut pin = [0u8; 32];
    for (byte, pair) in pin.iter_mut().zip(digits.chunks_exact(2)) {
        let high = hex_value(pair[0]).ok_or_else(|| bad("not a hex digit"))?;
        let low = hex_value(pair[1]).ok_or_else(|| bad("not a hex digit"))?;
        *byte = high << 4 | low;
    }
    Ok(pin)
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Server (relay) QUIC configuration.
///
/// With `client_ca`, every client must present a certificate chaining to one of those roots (how
/// agents and peers prove who they are); without it, no client certificate is asked for.
/// Connection migration is off: relays sit behind 5-tuple UDP load balancers, where a migrated
/// connection would land on a relay that has never seen it.
pub fn server_config(
    identity: Identity,
    alpn: &[&[u8]],
    client_ca: Option<&[CertificateDer<'static>]>,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, Error> {
    let auth = match client_ca {
        Some(roots) => ClientAuth::Required(roots),
        None => ClientAuth::None,
    };
    server_config_with(identity, alpn, auth, transport)
}

/// Whether a server asks its clients for a certificate.
#[derive(Clone, Copy, Debug)]
pub enum ClientAuth<'a> {
    None,
    /// A certificate is verified against these roots when presented, but not required (agents may
    /// authenticate by token instead).
    Optional(&'a [CertificateDer<'static>]),
    /// A certificate chaining to these roots is required.
    Required(&'a [CertificateDer<'static>]),
}

/// [`server_config`] with an explicit client-authentication mode.
pub fn server_config_with(
    identity: Identity,
    alpn: &[&[u8]],
    client_auth: ClientAuth<'_>,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, Error> {
    let provider = Arc::new(ring_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_auth {
        ClientAuth::Required(roots) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(roots)?), provider)
                    .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        ClientAuth::Optional(roots) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(roots)?), provider)
                    .allow_unauthenticated()
                    .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        ClientAuth::None => builder.with_no_client_auth(),
    };
    let mut tls = builder.with_single_cert(identity.chain, identity.key)?;
    tls.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();

    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(transport).migration(false);
    Ok(config)
}

/// Client QUIC configuration for dialling a relay, optionally presenting `identity` for mTLS.
///
/// With [`Trust::Pin`] the relay's name and issuer are ignored, but the handshake signature is
/// still verified, so only the holder of the pinned certificate's key can complete it.
pub fn client_config(
    trust: &Trust,
    alpn: &[u8],
    identity: Option<Identity>,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, Error> {
    let tls = rustls_client(trust, alpn, identity)?;
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(transport);
    Ok(config)
}

/// The TLS client side of the outer TLS layer of a TCP tunnel ([`crate::tcp_tunnel`]): the relay's
/// certificate is checked exactly as for QUIC; no client certificate (the agent proves who it is
/// in the QUIC handshake the tunnel carries).
pub fn tcp_client_config(trust: &Trust) -> Result<rustls::ClientConfig, Error> {
    rustls_client(trust, ALPN_TCP, None)
}

/// The TLS server side of the outer TLS layer of a TCP tunnel: the relay's own certificate, TLS
/// 1.3 only, ALPN [`ALPN_TCP`].
pub fn tcp_server_config(identity: Identity) -> Result<rustls::ServerConfig, Error> {
    let provider = Arc::new(ring_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)?;
    tls.alpn_protocols = vec![ALPN_TCP.to_vec()];
    Ok(tls)
}

fn rustls_client(
    trust: &Trust,
    alpn: &[u8],
    identity: Option<Identity>,
) -> Result<rustls::ClientConfig, Error> {
    let provider = Arc::new(ring_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match trust {
        Trust::Ca(roots) => {
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(root_store(roots)?),
                provider,
            )
            .build()?;
            builder.with_webpki_verifier(verifier)
        }
        Trust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: *pin,
                algorithms: provider.signature_verification_algorithms,
            })),
    };
    let mut tls = match identity {
        Some(identity) => builder.with_client_auth_cert(identity.chain, identity.key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, Error> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store.add(root.clone())?;
    }
    Ok(store)
}

/// Accepts exactly one end-entity certificate, identified by its SHA-256.
///
/// Name, issuer and expiry are deliberately not checked: the operator's pin is the whole trust
/// decision. Possession of the key is still proven by the handshake signature.
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The pin is a public value, so a timing-safe comparison buys nothing.
        let digest = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        if digest.as_ref() == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Binds a UDP socket and runs a quinn endpoint on it; must be called inside a tokio runtime.
///
/// The kernel's default receive buffer (about 208 KiB on Linux) drops datagrams at full speed, so
/// SO_RCVBUF and SO_SNDBUF are raised to `buffer` bytes. That is best effort: the kernel clamps to
/// `net.core.rmem_max`/`wmem_max` and may refuse outright, and a small buffer costs throughput,
/// not correctness.
pub fn bind_endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    buffer: usize,
) -> std::io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};

    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(err) = socket.set_recv_buffer_size(buffer) {
        tracing::debug!(%err, buffer, "cannot set UDP receive buffer size");
    }
    if let Err(err) = socket.set_send_buffer_size(buffer) {
        tracing::debug!(%err, buffer, "cannot set UDP send buffer size");
    }
    // Linux reports twice what it grants (the rest is its bookkeeping), so halve before comparing.
    let granted = |reported: usize| {
        if cfg!(target_os = "linux") {
            reported / 2
        } else {
            reported
        }
    };
    if let (Ok(recv), Ok(send)) = (socket.recv_buffer_size(), socket.send_buffer_size()) {
        let (recv, send) = (granted(recv), granted(send));
        if recv < buffer || send < buffer {
            tracing::debug!(
                requested = buffer,
                recv,
                send,
                "kernel granted smaller UDP buffers than requested (see net.core.rmem_max/wmem_max)"
            );
        }
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )
}

/// Certificate chain the peer presented, end-entity first; `None` before the handshake completes
/// or when the peer sent no certificate.
pub fn peer_certificates(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|chain| *chain)
}

#[cfg(test)]
mod tests;
