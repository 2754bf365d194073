//! Certificate generation for operators who have no PKI of their own, and for the demo and tests.
//!
//! One private CA signs everything: relays (servers to agents and gateways), peers (relays and
//! gateways dialling relays) and agents. An agent certificate's IP SANs are the addresses that
//! agent may claim, so the relay learns what an agent may serve from the certificate it verified
//! rather than from anything the agent says later.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    Ia5String, IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};

/// Lifetime of a generated CA. Rotating a CA means re-issuing every certificate, so it is long.
const CA_DAYS: u32 = 3650;
/// Leaf lifetime [`generate_bundle`] uses.
pub const DEFAULT_DAYS: u32 = 365;
/// Upper bound for a leaf's lifetime; also keeps the expiry date representable.
pub const MAX_DAYS: u32 = 36_500;
/// Certificates start this long before "now", so a host whose clock lags a little behind the one
/// that issued them still accepts them.
const BACKDATE: Duration = Duration::from_secs(60 * 60);
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// What can go wrong while generating, issuing, writing or inspecting certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The CA certificate PEM could not be parsed.
    #[error("cannot parse CA certificate")]
    CaCertificate(#[source] rcgen::Error),
    /// The CA key PEM could not be parsed.
    #[error("cannot parse CA private key")]
    CaKey(#[source] rcgen::Error),
    /// The CA key is not the key of the CA certificate; certificates it signed would never verify.
    #[error("CA private key does not belong to the CA certificate")]
    CaKeyMismatch(#[source] rustls::Error),
    /// A DNS name cannot go into a certificate (not ASCII).
    #[error("invalid DNS name {name:?}")]
    DnsName {
        /// The name as given.
        name: String,
        /// The underlying failure.
        #[source]
        source: rcgen::Error,
    },
    /// A DNS name that marks another role's certificates: a certificate carries one role only.
    #[error(
        "the DNS name {name:?} marks {role} certificates; a {kind} certificate may not carry it \
         (a certificate has exactly one role: issue a separate {role} certificate)"
    )]
    ReservedName {
        /// The name as given.
        name: String,
        /// The role the name belongs to.
        role: Role,
        /// The kind being issued, lower case.
        kind: &'static str,
    },
    /// Validity out of range.
    #[error("validity of {days} days is out of range (1..={MAX_DAYS})")]
    Validity {
        /// The requested lifetime.
        days: u32,
    },
    /// Key generation or signing failed.
    #[error("cannot generate certificate")]
    Generate(#[from] rcgen::Error),
    /// A certificate presented for inspection is not valid X.509 DER.
    #[error("cannot parse certificate")]
    Parse(#[source] rcgen::Error),
    /// Writing a certificate or key file failed.
    #[error("cannot write {}", path.display())]
    Io {
        /// The file or directory that could not be written.
        path: PathBuf,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
}

/// The role a leaf certificate is issued for; decides its extended key usages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Serves agents and peers; also dials other relays, so it may act as a client too.
    Relay,
    /// A relay or gateway dialling a relay; may also serve.
    Peer,
    /// Dials relays only. Its IP SANs are the addresses it may claim.
    Agent,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Relay => "relay",
            Kind::Peer => "peer",
            Kind::Agent => "agent",
        }
    }

    /// The role marker this kind always carries, and the one it may never carry.
    fn markers(self) -> (Option<Role>, Role) {
        match self {
            Kind::Relay => (None, Role::Agent),
            Kind::Peer => (Some(Role::Peer), Role::Agent),
            Kind::Agent => (Some(Role::Agent), Role::Peer),
        }
    }

    fn extended_key_usages(self) -> Vec<ExtendedKeyUsagePurpose> {
        use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        match self {
            Kind::Relay => vec![ServerAuth, ClientAuth],
            Kind::Peer => vec![ClientAuth, ServerAuth],
            Kind::Agent => vec![ClientAuth],
        }
    }
}

/// Generates a self-signed CA valid for ten years, returning (certificate PEM, key PEM).
///
/// Path length 0: it signs leaves only, so a leaked leaf key can never mint more certificates.
pub fn generate_ca(common_name: &str) -> Result<(String, String), Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name_only(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, CA_DAYS)?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Issues a leaf certificate signed by the CA, returning (certificate PEM, key PEM).
///
/// `name` becomes the subject CN; `dns` and `ips` become SANs, which is what TLS name checks and,
/// for [`Kind::Agent`], the relay's address check use. The key is ECDSA P-256.
pub fn issue(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    kind: Kind,
    name: &str,
    dns: &[String],
    ips: &[IpAddr],
    days: u32,
) -> Result<(String, String), Error> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(Error::CaKey)?;
    check_ca_key(ca_cert_pem, &ca_key)?;
    // rcgen signs with an issuer `Certificate`; re-signing the parsed CA yields one that carries
    // the original subject and key identifier, which is all the leaf copies from it.
    let ca = CertificateParams::from_ca_cert_pem(ca_cert_pem)
        .map_err(Error::CaCertificate)?
        .self_signed(&ca_key)?;

    // Peer and agent certificates always carry their role's name; no certificate carries the
    // name of a role it is not (DNS names compare without case).
    let (own, forbidden) = kind.markers();
    if let Some(name) = dns
        .iter()
        .find(|d| d.eq_ignore_ascii_case(forbidden.marker()))
    {
        return Err(Error::ReservedName {
            name: name.clone(),
            role: forbidden,
            kind: kind.as_str(),
        });
    }
    let mut dns = dns.to_vec();
    if let Some(own) = own {
        if !dns.iter().any(|d| d.eq_ignore_ascii_case(own.marker())) {
            dns.push(own.marker().to_string());
        }
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name_only(name);
    params.subject_alt_names = subject_alt_names(&dns, ips)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = kind.extended_key_usages();
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, days)?;

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Compares the CA key's public half with the CA certificate's, so swapped files fail here with a
/// clear message instead of as a bad signature in some later handshake.
fn check_ca_key(ca_cert_pem: &str, ca_key: &KeyPair) -> Result<(), Error> {
    let ca_der = CertificateDer::from_pem_slice(ca_cert_pem.as_bytes())
        .map_err(|_| Error::CaCertificate(rcgen::Error::CouldNotParseCertificate))?;
    let signing_key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(PrivatePkcs8KeyDer::from(ca_key.serialize_der()).into())
        .map_err(Error::CaKeyMismatch)?;
    rustls::sign::CertifiedKey::new(vec![ca_der], signing_key)
        .keys_match()
        .map_err(Error::CaKeyMismatch)
}

fn common_name_only(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

fn subject_alt_names(dns: &[String], ips: &[IpAddr]) -> Result<Vec<SanType>, Error> {
    let mut sans = Vec::with_capacity(dns.len() + ips.len());
    for name in dns {
        let ia5 = Ia5String::try_from(name.as_str()).map_err(|source| Error::DnsName {
            name: name.clone(),
            source,
        })?;
        sans.push(SanType::DnsName(ia5));
    }
    sans.extend(ips.iter().copied().map(SanType::IpAddress));
    Ok(sans)
}

fn set_validity(params: &mut CertificateParams, days: u32) -> Result<(), Error> {
    if days == 0 || days > MAX_DAYS {
        return Err(Error::Validity { days });
    }
    let now = SystemTime::now();
    let start = now.checked_sub(BACKDATE).unwrap_or(now);
    let end = now
        .checked_add(DAY * days)
        .ok_or(Error::Validity { days })?;
    params.not_before = start.into();
    params.not_after = end.into();
    Ok(())
}

/// Writes `{stem}.pem` and `{stem}-key.pem` into `dir`, creating it; returns (cert path, key path).
///
/// On unix the key file is made readable by its owner only, including when it already existed.
pub fn write_pair(
    dir: &Path,
    stem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(PathBuf, PathBuf), Error> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_owned(),
        source,
    })?;
    let cert_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}-key.pem"));
    std::fs::write(&cert_path, cert_pem).map_err(|source| Error::Io {
        path: cert_path.clone(),
        source,
    })?;
    write_private(&key_path, key_pem.as_bytes()).map_err(|source| Error::Io {
        path: key_path.clone(),
        source,
    })?;
    Ok((cert_path, key_path))
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // `mode` applies only when the file is created; tighten a pre-existing one before writing.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents)
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

/// Paths of the files [`generate_bundle`] wrote.
#[derive(Clone, Debug)]
pub struct Bundle {
    /// `ca.pem`: the root every role trusts.
    pub ca: PathBuf,
    /// `ca-key.pem`: needed only to issue more certificates.
    pub ca_key: PathBuf,
    /// `relay.pem`.
    pub relay_cert: PathBuf,
    /// `relay-key.pem`.
    pub relay_key: PathBuf,
    /// `peer.pem`: a client identity for gateways and relays dialling relays.
    pub peer_cert: PathBuf,
    /// `peer-key.pem`.
    pub peer_key: PathBuf,
}

/// A fresh CA, a relay certificate and a peer certificate in `dir`, for the demo and tests.
///
/// Both leaves carry `localhost`, 127.0.0.1 and ::1 so everything can run on one machine; the
/// relay also carries `relay_name`.
pub fn generate_bundle(dir: &Path, relay_name: &str) -> Result<Bundle, Error> {
    let loopback = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];
    let mut relay_dns = vec!["localhost".to_owned()];
    if relay_name != "localhost" {
        relay_dns.push(relay_name.to_owned());
    }

    let (ca_pem, ca_key_pem) = generate_ca("postern CA")?;
    let (relay_pem, relay_key_pem) = issue(
        &ca_pem,
        &ca_key_pem,
        Kind::Relay,
        relay_name,
        &relay_dns,
        &loopback,
        DEFAULT_DAYS,
    )?;
    let (peer_pem, peer_key_pem) = issue(
        &ca_pem,
        &ca_key_pem,
        Kind::Peer,
        "postern peer",
        &["localhost".to_owned()],
        &loopback,
        DEFAULT_DAYS,
    )?;

    let (ca, ca_key) = write_pair(dir, "ca", &ca_pem, &ca_key_pem)?;
    let (relay_cert, relay_key) = write_pair(dir, "relay", &relay_pem, &relay_key_pem)?;
    let (peer_cert, peer_key) = write_pair(dir, "peer", &peer_pem, &peer_key_pem)?;
    Ok(Bundle {
        ca,
        ca_key,
        relay_cert,
        relay_key,
        peer_cert,
        peer_key,
    })
}

/// The DNS name every peer certificate carries and no agent certificate may: the relay's peer
/// endpoint admits only certificates with it, so an agent's certificate (same CA) cannot forward.
pub const PEER_NAME: &str = "postern-peer";

/// The DNS name every agent certificate carries: the relay admits a client certificate as an agent
/// only with it, so relay or peer certificates from the same CA cannot join as agents.
pub const AGENT_NAME: &str = "postern-agent";

/// The role a client certificate proves, read from its role names (DNS SANs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Carries [`AGENT_NAME`]: may join a relay as an agent.
    Agent,
    /// Carries [`PEER_NAME`]: may forward through a relay's peer endpoint.
    Peer,
}

impl Role {
    /// The DNS name that marks this role.
    pub fn marker(self) -> &'static str {
        match self {
            Role::Agent => AGENT_NAME,
            Role::Peer => PEER_NAME,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Agent => "agent",
            Role::Peer => "peer",
        })
    }
}

/// The one role a DER client certificate carries, or `None` when it carries no role name, both
/// (however it was made), or cannot be parsed. Relays admit agents and peers by this alone, so a
/// certificate marked for both roles is admitted as neither.
pub fn role(cert_der: &[u8]) -> Option<Role> {
    let names = dns_sans(cert_der).ok()?;
    let has = |role: Role| names.iter().any(|n| n.eq_ignore_ascii_case(role.marker()));
    match (has(Role::Agent), has(Role::Peer)) {
        (true, false) => Some(Role::Agent),
        (false, true) => Some(Role::Peer),
        _ => None,
    }
}

/// DNS SANs of a DER cert.
pub fn dns_sans(cert_der: &[u8]) -> Result<Vec<String>, Error> {
    let params = CertificateParams::from_ca_cert_der(&CertificateDer::from(cert_der))
        .map_err(Error::Parse)?;
    Ok(params
        .subject_alt_names
        .into_iter()
        .filter_map(|san| match san {
            SanType::DnsName(name) => Some(name.to_string()),
            _ => None,
        })
        .collect())
}

/// IP-address SANs of a DER certificate, in certificate order.
///
/// The relay calls this on a verified agent certificate to learn which addresses that agent may
/// claim. rcgen's CA parser is used because it extracts exactly the fields we need (SANs
/// included) from any certificate; it fails on SAN kinds rcgen cannot represent (directory names,
/// registered IDs), which postern never issues.
pub fn ip_sans(cert_der: &[u8]) -> Result<Vec<IpAddr>, Error> {
    let params = CertificateParams::from_ca_cert_der(&CertificateDer::from(cert_der))
        .map_err(Error::Parse)?;
    Ok(params
        .subject_alt_names
        .into_iter()
        .filter_map(|san| match san {
            SanType::IpAddress(ip) => Some(ip),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls;

    fn parsed(pem: &str) -> CertificateParams {
        CertificateParams::from_ca_cert_pem(pem).unwrap()
    }

    #[test]
    fn ca_signs_leaves_only() {
        let (cert_pem, key_pem) = generate_ca("test CA").unwrap();
        let params = parsed(&cert_pem);
        assert_eq!(params.is_ca, IsCa::Ca(BasicConstraints::Constrained(0)));
        assert_eq!(
            params.key_usages,
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign]
        );
        assert!(key_pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn extended_key_usages_follow_kind() {
        let (ca, ca_key) = generate_ca("test CA").unwrap();
        for (kind, expected) in [
            (
                Kind::Relay,
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ],
            ),
            (
                Kind::Peer,
                vec![
                    ExtendedKeyUsagePurpose::ClientAuth,
                    ExtendedKeyUsagePurpose::ServerAuth,
                ],
            ),
            (Kind::Agent, vec![ExtendedKeyUsagePurpose::ClientAuth]),
        ] {
            let (leaf, _) = issue(&ca, &ca_key, kind, "leaf", &[], &[], 30).unwrap();
            let params = parsed(&leaf);
            // The parser reports usages in its own order, not the certificate's.
            assert_eq!(params.extended_key_usages.len(), expected.len(), "{kind:?}");
            for usage in &expected {
                assert!(params.extended_key_usages.contains(usage), "{kind:?}");
            }
            assert_eq!(params.is_ca, IsCa::ExplicitNoCa, "{kind:?}");
        }
    }

    #[test]
    fn leaf_carries_names_and_validity() {
        let (ca, ca_key) = generate_ca("test CA").unwrap();
        let ips: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        let dns = vec!["relay.example".to_owned()];
        let (leaf, _) = issue(&ca, &ca_key, Kind::Relay, "relay-1", &dns, &ips, 10).unwrap();
        let params = parsed(&leaf);
        assert_eq!(
            params.distinguished_name.get(&DnType::CommonName),
            Some(&rcgen::DnValue::Utf8String("relay-1".into()))
        );
        assert!(params
            .subject_alt_names
            .contains(&SanType::DnsName("relay.example".try_into().unwrap())));
        let lifetime = params.not_after - params.not_before;
        assert_eq!(
            lifetime.whole_seconds() as u64,
            (DAY * 10 + BACKDATE).as_secs()
        );

        let der = tls::parse_certs_pem(leaf.as_bytes()).unwrap().remove(0);
        assert_eq!(ip_sans(&der).unwrap(), ips);
    }

    #[test]
    fn ip_sans_of_certificate_without_ips_is_empty() {
        let (ca, ca_key) = generate_ca("test CA").unwrap();
        let dns = vec!["only.dns".to_owned()];
        let (leaf, _) = issue(&ca, &ca_key, Kind::Agent, "a", &dns, &[], 1).unwrap();
        let der = tls::parse_certs_pem(leaf.as_bytes()).unwrap().remove(0);
        assert!(ip_sans(&der).unwrap().is_empty());
        assert!(matches!(
            ip_sans(b"not a certificate"),
            Err(Error::Parse(_))
        ));
    }

    #[test]
    fn issue_rejects_key_of_another_ca() {
        let (ca, _) = generate_ca("one").unwrap();
        let (_, other_key) = generate_ca("two").unwrap();
        let result = issue(&ca, &other_key, Kind::Agent, "a", &[], &[], 1);
        assert!(matches!(result, Err(Error::CaKeyMismatch(_))), "{result:?}");
    }

    #[test]
    fn issue_rejects_bad_input() {
        let (ca, ca_key) = generate_ca("test CA").unwrap();
        for days in [0, MAX_DAYS + 1] {
            let result = issue(&ca, &ca_key, Kind::Agent, "a", &[], &[], days);
            assert!(matches!(result, Err(Error::Validity { .. })), "{days}");
        }
        let result = issue(
            &ca,
            &ca_key,
            Kind::Relay,
            "r",
            &["r\u{e9}lais".into()],
            &[],
            1,
        );
        assert!(matches!(result, Err(Error::DnsName { .. })), "{result:?}");
        let result = issue(&ca, "garbage", Kind::Relay, "r", &[], &[], 1);
        assert!(matches!(result, Err(Error::CaKey(_))), "{result:?}");
        let result = issue(&ca_key, &ca_key, Kind::Relay, "r", &[], &[], 1);
        assert!(matches!(result, Err(Error::CaCertificate(_))), "{result:?}");
    }

    #[test]
    fn a_certificate_carries_one_role() {
        let (ca, ca_key) = generate_ca("test CA").unwrap();
        for (kind, name, role) in [
            (Kind::Peer, "postern-agent", Role::Agent),
            (Kind::Peer, "POSTERN-Agent", Role::Agent),
            (Kind::Relay, "postern-agent", Role::Agent),
            (Kind::Agent, "postern-peer", Role::Peer),
            (Kind::Agent, "Postern-Peer", Role::Peer),
        ] {
            let result = issue(&ca, &ca_key, kind, "x", &[name.into()], &[], 1);
            match result {
                Err(Error::ReservedName { role: r, .. }) => assert_eq!(r, role, "{kind:?} {name}"),
                other => panic!("{kind:?} with {name}: {other:?}"),
            }
        }
        let err = issue(
            &ca,
            &ca_key,
            Kind::Peer,
            "x",
            &["postern-agent".into()],
            &[],
            1,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("\"postern-agent\" marks agent certificates"),
            "{err}"
        );
        // What the tool does issue carries its one role.
        let der = |pem: String| tls::parse_certs_pem(pem.as_bytes()).unwrap().remove(0);
        for (kind, expected) in [
            (Kind::Agent, Some(Role::Agent)),
            (Kind::Peer, Some(Role::Peer)),
            (Kind::Relay, None),
        ] {
            let (leaf, _) = issue(&ca, &ca_key, kind, "x", &[], &[], 1).unwrap();
            assert_eq!(role(&der(leaf)), expected, "{kind:?}");
        }
        // Relays may carry the peer name (a relay's certificate may serve as its peer identity).
        let (leaf, _) = issue(&ca, &ca_key, Kind::Relay, "x", &[PEER_NAME.into()], &[], 1).unwrap();
        assert_eq!(role(&der(leaf)), Some(Role::Peer));
    }

    #[test]
    fn a_certificate_marked_for_both_roles_has_none() {
        // Made without the tool, as any other issuer could.
        let (ca_pem, ca_key_pem) = generate_ca("test CA").unwrap();
        let ca_key = KeyPair::from_pem(&ca_key_pem).unwrap();
        let ca = CertificateParams::from_ca_cert_pem(&ca_pem)
            .unwrap()
            .self_signed(&ca_key)
            .unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names =
            subject_alt_names(&[AGENT_NAME.into(), PEER_NAME.into()], &[]).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
        assert_eq!(role(leaf.der()), None);
        assert_eq!(role(b"not a certificate"), None);
    }

    #[cfg(unix)]
    #[test]
    fn key_file_is_private_even_if_it_existed() {
        use std::os::unix::fs::PermissionsExt;

        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        std::fs::create_dir_all(&nested).unwrap();
        let stale = nested.join("x-key.pem");
        std::fs::write(&stale, "old").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o644)).unwrap();

        let (cert_path, key_path) = write_pair(&nested, "x", "CERT", "KEY").unwrap();
        assert_eq!(key_path, stale);
        assert_eq!(std::fs::read_to_string(&cert_path).unwrap(), "CERT");
        assert_eq!(std::fs::read_to_string(&key_path).unwrap(), "KEY");
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn bundle_loads_through_tls() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = generate_bundle(&dir.path().join("certs"), "relay.internal").unwrap();
        for (cert, key) in [
            (&bundle.ca, &bundle.ca_key),
            (&bundle.relay_cert, &bundle.relay_key),
            (&bundle.peer_cert, &bundle.peer_key),
        ] {
            assert_eq!(tls::load_certs(cert).unwrap().len(), 1);
            tls::load_key(key).unwrap();
        }
        let relay = tls::load_certs(&bundle.relay_cert).unwrap().remove(0);
        assert_eq!(
            ip_sans(&relay).unwrap(),
            vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST)
            ]
        );
        let relay_pem = std::fs::read_to_string(&bundle.relay_cert).unwrap();
        let sans = parsed(&relay_pem).subject_alt_names;
        for name in ["localhost", "relay.internal"] {
            assert!(
                sans.contains(&SanType::DnsName(name.try_into().unwrap())),
                "{name}"
            );
        }
    }
}
