use super::*;
use crate::cert::{self, Kind};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);
const BUFFER: usize = 1 << 20;

#[test]
fn pin_accepts_common_spellings() {
    let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let expected = parse_pin(hex).unwrap();
    assert_eq!(expected[0], 0x00);
    assert_eq!(expected[1], 0x11);
    assert_eq!(expected[31], 0xff);

    let colons: Vec<String> = hex
        .as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8(pair.to_vec()).unwrap())
        .collect();
    let colons = colons.join(":");
    for spelling in [
        hex.to_owned(),
        hex.to_uppercase(),
        format!("sha256:{hex}"),
        format!("SHA256:{}", colons.to_uppercase()),
        format!("  {colons}\n"),
    ] {
        assert_eq!(parse_pin(&spelling).unwrap(), expected, "{spelling}");
    }
}

#[test]
fn pin_rejects_garbage() {
    for bad in [
        "",
        "sha256:",
        "abcd",
        &"0".repeat(63),
        &"0".repeat(65),
        &"g".repeat(64),
        "sha1:00112233445566778899aabbccddeeff00112233445566778899aabbccddee",
    ] {
        assert!(
            matches!(parse_pin(bad), Err(Error::BadPin { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn fingerprint_round_trips_through_parse_pin() {
    let (ca_pem, _) = cert::generate_ca("fingerprint test").unwrap();
    let ca = parse_certs_pem(ca_pem.as_bytes()).unwrap().remove(0);
    let printed = fingerprint(&ca);
    assert_eq!(printed.len(), 64);
    assert_eq!(printed, printed.to_lowercase());
    let pin = parse_pin(&printed).unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, ca.as_ref());
    assert_eq!(pin.as_slice(), digest.as_ref());
}

#[test]
fn pem_errors_are_specific() {
    let (ca_pem, key_pem) = cert::generate_ca("pem test").unwrap();
    assert!(matches!(
        parse_certs_pem(key_pem.as_bytes()),
        Err(Error::NoCertificates { .. })
    ));
    assert!(matches!(
        parse_key_pem(ca_pem.as_bytes()),
        Err(Error::NoPrivateKey { .. })
    ));
    assert!(parse_key_pem(key_pem.as_bytes()).is_ok());
    let missing = Path::new("/nonexistent/postern/ca.pem");
    assert!(matches!(load_certs(missing), Err(Error::Io { .. })));
}

#[test]
fn identity_debug_hides_key() {
    let (ca_pem, key_pem) = cert::generate_ca("debug test").unwrap();
    let identity = Identity {
        chain: parse_certs_pem(ca_pem.as_bytes()).unwrap(),
        key: parse_key_pem(key_pem.as_bytes()).unwrap(),
    };
    let printed = format!("{:?}", identity.clone());
    assert!(printed.contains("<redacted>"));
    assert!(printed.contains(&fingerprint(&identity.chain[0])));
}

/// Certificates for one test, generated into a temp dir and loaded back through this module.
struct Material {
    _dir: tempfile::TempDir,
    bundle: cert::Bundle,
    ca: Vec<CertificateDer<'static>>,
}

impl Material {
    fn new() -> Self {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let bundle = cert::generate_bundle(dir.path(), "relay.test").unwrap();
        let ca = load_certs(&bundle.ca).unwrap();
        Self {
            _dir: dir,
            bundle,
            ca,
        }
    }

    fn relay(&self) -> Identity {
        Identity {
            chain: load_certs(&self.bundle.relay_cert).unwrap(),
            key: load_key(&self.bundle.relay_key).unwrap(),
        }
    }

    fn agent(&self, ips: &[IpAddr]) -> Identity {
        let ca_pem = std::fs::read_to_string(&self.bundle.ca).unwrap();
        let ca_key_pem = std::fs::read_to_string(&self.bundle.ca_key).unwrap();
        let (cert_pem, key_pem) =
            cert::issue(&ca_pem, &ca_key_pem, Kind::Agent, "agent-1", &[], ips, 1).unwrap();
        Identity {
            chain: parse_certs_pem(cert_pem.as_bytes()).unwrap(),
            key: parse_key_pem(key_pem.as_bytes()).unwrap(),
        }
    }
}

fn transport() -> Arc<quinn::TransportConfig> {
    Arc::new(quinn::TransportConfig::default())
}

fn loopback() -> SocketAddr {
    (Ipv4Addr::LOCALHOST, 0).into()
}

/// Result of one handshake as each side saw it; the server side reports the client's chain.
struct Outcome {
    client: Result<(), String>,
    server: Result<Option<Vec<CertificateDer<'static>>>, String>,
}

/// Runs one handshake over loopback between a relay serving `server` and a client with
/// `client`, dialling `server_name`. Both sides finish within [`TIMEOUT`].
async fn handshake(
    server: quinn::ServerConfig,
    client: quinn::ClientConfig,
    server_name: &str,
) -> Outcome {
    let server_endpoint = bind_endpoint(loopback(), Some(server), BUFFER).unwrap();
    let server_addr = server_endpoint.local_addr().unwrap();
    let accept = {
        let endpoint = server_endpoint.clone();
        tokio::spawn(async move {
            let incoming = endpoint.accept().await.ok_or("endpoint closed")?;
            let conn = incoming.await.map_err(|err| err.to_string())?;
            let chain = peer_certificates(&conn);
            let (mut send, mut recv) = conn.accept_bi().await.map_err(|err| err.to_string())?;
            let ping = recv.read_to_end(1).await.map_err(|err| err.to_string())?;
            send.write_all(&ping).await.map_err(|err| err.to_string())?;
            send.finish().map_err(|err| err.to_string())?;
            // Keep the connection open until the client has read the echo.
            let _ = conn.closed().await;
            Ok::<_, String>(chain)
        })
    };

    let mut client_endpoint = bind_endpoint(loopback(), None, BUFFER).unwrap();
    client_endpoint.set_default_client_config(client);
    let client_result = async {
        let conn = client_endpoint
            .connect(server_addr, server_name)
            .map_err(|err| err.to_string())?
            .await
            .map_err(|err| err.to_string())?;
        // In TLS 1.3 the client's handshake completes before the server has checked the
        // client certificate; only an echo proves the server accepted us too.
        let (mut send, mut recv) = conn.open_bi().await.map_err(|err| err.to_string())?;
        send.write_all(b"x").await.map_err(|err| err.to_string())?;
        send.finish().map_err(|err| err.to_string())?;
        let echo = recv.read_to_end(1).await.map_err(|err| err.to_string())?;
        conn.close(0u32.into(), b"done");
        if echo == b"x" {
            Ok(())
        } else {
            Err(format!("bad echo {echo:?}"))
        }
    };
    let client_result = tokio::time::timeout(TIMEOUT, client_result)
        .await
        .unwrap_or_else(|_| Err("client timed out".into()));

    let server_result = match tokio::time::timeout(TIMEOUT, accept).await {
        Ok(joined) => joined.unwrap(),
        Err(_) => Err("server timed out".into()),
    };
    client_endpoint.close(0u32.into(), b"done");
    server_endpoint.close(0u32.into(), b"done");
    Outcome {
        client: client_result,
        server: server_result,
    }
}

#[tokio::test]
async fn ca_trust_accepts_relay_signed_by_ca() {
    let material = Material::new();
    let server = server_config(material.relay(), &[ALPN_AGENT], None, transport()).unwrap();
    let client = client_config(
        &Trust::Ca(material.ca.clone()),
        ALPN_AGENT,
        None,
        transport(),
    )
    .unwrap();
    let outcome = handshake(server, client, "relay.test").await;
    outcome.client.unwrap();
    assert!(outcome.server.unwrap().is_none());
}

#[tokio::test]
async fn ca_trust_checks_server_name() {
    let material = Material::new();
    let server = server_config(material.relay(), &[ALPN_AGENT], None, transport()).unwrap();
    let client = client_config(
        &Trust::Ca(material.ca.clone()),
        ALPN_AGENT,
        None,
        transport(),
    )
    .unwrap();
    let outcome = handshake(server, client, "other.test").await;
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn ca_trust_rejects_relay_of_another_ca() {
    let material = Material::new();
    let (other_ca, _) = cert::generate_ca("someone else").unwrap();
    let server = server_config(material.relay(), &[ALPN_AGENT], None, transport()).unwrap();
    let client = client_config(
        &Trust::Ca(parse_certs_pem(other_ca.as_bytes()).unwrap()),
        ALPN_AGENT,
        None,
        transport(),
    )
    .unwrap();
    let outcome = handshake(server, client, "relay.test").await;
    let err = outcome.client.unwrap_err();
    assert!(err.to_lowercase().contains("issuer"), "{err}");
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn pin_accepts_matching_certificate_under_any_name() {
    let material = Material::new();
    let relay = material.relay();
    let pin = parse_pin(&fingerprint(&relay.chain[0])).unwrap();
    let server = server_config(relay, &[ALPN_AGENT], None, transport()).unwrap();
    let client = client_config(&Trust::Pin(pin), ALPN_AGENT, None, transport()).unwrap();
    let outcome = handshake(server, client, "not-in-the-certificate").await;
    outcome.client.unwrap();
    outcome.server.unwrap();
}

#[tokio::test]
async fn pin_rejects_other_certificate() {
    let material = Material::new();
    let ca_pin = parse_pin(&fingerprint(&material.ca[0])).unwrap();
    let server = server_config(material.relay(), &[ALPN_AGENT], None, transport()).unwrap();
    let client = client_config(&Trust::Pin(ca_pin), ALPN_AGENT, None, transport()).unwrap();
    let outcome = handshake(server, client, "relay.test").await;
    assert!(outcome.client.is_err());
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn alpn_mismatch_fails() {
    let material = Material::new();
    let server = server_config(material.relay(), &[ALPN_PEER], None, transport()).unwrap();
    let client = client_config(
        &Trust::Ca(material.ca.clone()),
        ALPN_AGENT,
        None,
        transport(),
    )
    .unwrap();
    let outcome = handshake(server, client, "relay.test").await;
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn mtls_rejects_client_without_certificate() {
    let material = Material::new();
    let server = server_config(
        material.relay(),
        &[ALPN_AGENT],
        Some(&material.ca),
        transport(),
    )
    .unwrap();
    let client = client_config(
        &Trust::Ca(material.ca.clone()),
        ALPN_AGENT,
        None,
        transport(),
    )
    .unwrap();
    let outcome = handshake(server, client, "relay.test").await;
    assert!(outcome.client.is_err());
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn mtls_rejects_client_of_another_ca() {
    let material = Material::new();
    let stranger = Material::new();
    let server = server_config(
        material.relay(),
        &[ALPN_AGENT],
        Some(&material.ca),
        transport(),
    )
    .unwrap();
    let client = client_config(
        &Trust::Ca(material.ca.clone()),
        ALPN_AGENT,
        Some(stranger.agent(&[])),
        transport(),
    )
    .unwrap();
    let outcome = handshake(server, client, "relay.test").await;
    assert!(outcome.client.is_err());
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn mtls_accepts_agent_and_relay_reads_its_ips() {
    let material = Material::new();
    let claimed: Vec<IpAddr> = vec!["10.20.30.40".parse().unwrap(), "fd00::7".parse().unwrap()];
    let server = server_config(
        material.relay(),
        &[ALPN_AGENT, ALPN_PEER],
        Some(&material.ca),
        transport(),
    )
    .unwrap();
    let client = client_config(
        &Trust::Ca(material.ca.clone()),
        ALPN_AGENT,
        Some(material.agent(&claimed)),
        transport(),
    )
    .unwrap();
    let outcome = handshake(server, client, "localhost").await;
    outcome.client.unwrap();
    let chain = outcome.server.unwrap().expect("agent presented a chain");
    assert_eq!(cert::ip_sans(&chain[0]).unwrap(), claimed);
}

#[tokio::test]
async fn peer_certificate_works_as_client_identity() {
    let material = Material::new();
    let peer = Identity {
        chain: load_certs(&material.bundle.peer_cert).unwrap(),
        key: load_key(&material.bundle.peer_key).unwrap(),
    };
    let server = server_config(
        material.relay(),
        &[ALPN_PEER],
        Some(&material.ca),
        transport(),
    )
    .unwrap();
    let client = client_config(
        &Trust::Ca(material.ca.clone()),
        ALPN_PEER,
        Some(peer),
        transport(),
    )
    .unwrap();
    let outcome = handshake(server, client, "127.0.0.1").await;
    outcome.client.unwrap();
    assert!(outcome.server.unwrap().is_some());
}
