//! What a hello may claim: the agent's credential (a token or a client certificate) against its
//! agent id, namespace and addresses, the claims other tunnels hold in the registry, and, for a
//! live session, whether the credential still admits it after a configuration reload.

use std::net::IpAddr;
use std::time::Duration;

use super::sessions::Session;
use crate::config::AgentCredential;
use crate::protocol::{self, Code, Hello, Reject};
use crate::relay::Relay;

/// How long a hello waits for this process's first view of the registry's routes, without which
/// claims held at other relays cannot be checked; past it (a registry outage) only this relay's
/// own tunnels are checked. Well inside the agent's 3 s dial deadline, which covers the hello.
const ROUTES_WAIT: Duration = Duration::from_secs(1);

/// What admitted a hello: the credential, as sessions and routes record it.
pub(super) struct Admission {
    /// SHA-256 of the admitting token; `None` for a certificate.
    pub(super) token_sha256: Option<[u8; 32]>,
    /// The credential's fingerprint (see [`Session::credential`]).
    pub(super) credential: String,
    /// The credential's name in the configuration (`[[relay.agents]]`), or the certificate's.
    pub(super) name: String,
    /// What the credential's tunnels may hold on this relay.
    pub(super) quota: crate::config::Quota,
}

/// A verified agent certificate: what it may claim and under which name.
pub(super) struct AgentCertificate {
    pub(super) ips: Vec<IpAddr>,
    /// The subject's common name: the one agent id the certificate may use.
    pub(super) name: Option<String>,
}

impl Relay {
    /// Checks a `Hello` against the agent's credential: a client certificate (verified against
    /// `relay.agent_ca` during the handshake; it may claim the IPs in its SANs) or a token (it may
    /// claim the CIDRs configured for it). Any claim outside what the credential allows rejects the
    /// whole tunnel and touches no route.
    pub(super) fn admit(
        &self,
        hello: &Hello,
        cert: Option<AgentCertificate>,
    ) -> Result<Admission, Reject> {
        let reject = |code, reason: String| Reject { code, reason };
        if hello.ips.is_empty() {
            return Err(reject(Code::BadRequest, "hello claims no IP".into()));
        }
        if hello.ips.len() > protocol::MAX_AGENT_IPS {
            return Err(reject(
                Code::BadRequest,
                format!(
                    "hello claims {} IPs; an agent may claim at most {}",
                    hello.ips.len(),
                    protocol::MAX_AGENT_IPS
                ),
            ));
        }
        if hello.ports.is_empty() {
            return Err(reject(Code::BadRequest, "hello exposes no port".into()));
        }
        if hello.ports.len() > protocol::MAX_AGENT_PORT_RANGES {
            return Err(reject(
                Code::BadRequest,
                format!(
                    "hello exposes {} port ranges; an agent may expose at most {}",
                    hello.ports.len(),
                    protocol::MAX_AGENT_PORT_RANGES
                ),
            ));
        }
        if crate::config::check_agent_id(&hello.agent_id, "agent_id").is_err()
            || crate::config::check_namespace(&hello.namespace, "namespace").is_err()
        {
            return Err(reject(
                Code::BadRequest,
                "agent id must be a lower-case DNS label and namespace 1-63 of [A-Za-z0-9_-]"
                    .into(),
            ));
        }
        if let Some(cert) = cert {
            let allowed = cert.ips;
            if !self.config.agent_cert_namespaces.contains(&hello.namespace) {
                return Err(reject(
                    Code::NotAllowed,
                    format!(
                        "agent certificates may not join namespace {}",
                        hello.namespace
                    ),
                ));
            }
            if let Some(ip) = hello.ips.iter().find(|ip| !allowed.contains(ip)) {
                return Err(reject(
                    Code::NotAllowed,
                    format!("the agent certificate does not name {ip}"),
                ));
            }
            // A certificate's name is the one agent id it may use.
            let name = cert.name.unwrap_or_default();
            if name != hello.agent_id {
                return Err(reject(
                    Code::NotAllowed,
                    format!(
                        "the agent certificate is issued to {name:?}, not to agent id {}",
                        hello.agent_id
                    ),
                ));
            }
            return Ok(Admission {
                token_sha256: None,
                credential: format!("cert:{name}"),
                name: format!("agent certificate {name}"),
                // One host's: the per-agent bound (`MAX_TUNNELS_PER_AGENT`) and its IP SANs.
                quota: crate::config::Quota::default(),
            });
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, hello.token.expose().as_bytes());
        // Compare against every credential so timing does not reveal which one nearly matched.
        let mut found = None;
        let credentials = self
            .credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for cred in credentials.iter() {
            let equal = digest
                .as_ref()
                .iter()
                .zip(cred.token_sha256.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
            if equal && found.is_none() {
                found = Some(cred);
            }
        }
        let cred = found.ok_or_else(|| reject(Code::Unauthorized, "unknown agent token".into()))?;
        allows(cred, &hello.agent_id, &hello.ips, &hello.namespace)?;
        not_reserved(&credentials, cred, &hello.agent_id, &hello.namespace)?;
        Ok(Admission {
            token_sha256: Some(cred.token_sha256),
            credential: cred.fingerprint(),
            name: format!("credential {}", cred.name),
            quota: cred.quota,
        })
    }

    /// Refuses a hello whose claims collide with tunnels at other relays, as this process's
    /// registry view shows them: an address served by another agent id, or this agent id held by
    /// another credential. Routes of this relay are skipped: its session table is the fresher
    /// truth for them and is checked when the session is inserted. Tunnels of the same agent id
    /// and credential (its second tunnel, a restart) pass.
    pub(super) async fn check_registry_claims(
        &self,
        hello: &Hello,
        credential: &str,
    ) -> Result<(), Reject> {
        if tokio::time::timeout(ROUTES_WAIT, self.cache.wait_ready())
            .await
            .is_err()
        {
            // The registry is unreachable (an outage, or this relay started during one). Tunnels
            // must keep working through a registry outage, so the claim is checked against this
            // relay's own tunnels only (done by the caller); the registry's view is checked by
            // every relay that can read it, and routes are reconciled when it returns.
            tracing::warn!(agent_id = %hello.agent_id, namespace = %hello.namespace,
                "registry routes not loaded: claims checked against this relay's tunnels only");
            return Ok(());
        }
        let elsewhere = |o: &crate::registry::cache::Owner| *o.relay_id != *self.config.id;
        for ip in &hello.ips {
            if let Some(holder) = self
                .cache
                .owners(&hello.namespace, *ip)
                .into_iter()
                .filter(elsewhere)
                .find(|o| *o.agent_id != *hello.agent_id)
            {
                return Err(Reject {
                    code: Code::NotAllowed,
                    reason: format!(
                        "address {ip} in namespace {} is held by agent {} (relay {})",
                        hello.namespace, holder.agent_id, holder.relay_id
                    ),
                });
            }
        }
        if let Some(holder) = self
            .cache
            .agent_owners(&hello.namespace, &hello.agent_id)
            .into_iter()
            .filter(elsewhere)
            .find(|o| !o.same_credential(Some(credential)))
        {
            return Err(Reject {
                code: Code::NotAllowed,
                reason: format!(
                    "agent id {} in namespace {} is held by another credential (relay {})",
                    hello.agent_id, hello.namespace, holder.relay_id
                ),
            });
        }
        Ok(())
    }

    /// Whether the token credentials in force still admit a token session.
    pub(in crate::relay) fn still_admitted(&self, session: &Session) -> Result<(), Reject> {
        let Some(token) = session.token_sha256 else {
            return Ok(());
        };
        let credentials = self
            .credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match credentials.iter().find(|c| c.token_sha256 == token) {
            None => Err(Reject {
                code: Code::Unauthorized,
                reason: "unknown agent token".into(),
            }),
            Some(cred) => {
                allows(cred, &session.agent_id, &session.ips, &session.namespace)?;
                not_reserved(&credentials, cred, &session.agent_id, &session.namespace)
            }
        }
    }
}

/// The subject common name of a DER certificate, if it has a textual one.
pub(super) fn certificate_name(der: &[u8]) -> Option<String> {
    let der = rustls_pki_types::CertificateDer::from(der);
    let params = rcgen::CertificateParams::from_ca_cert_der(&der).ok()?;
    match params.distinguished_name.get(&rcgen::DnType::CommonName)? {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_string()),
        rcgen::DnValue::Ia5String(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// Refuses agent id `agent_id` in `namespace` to token credential `cred` when another credential
/// lists that id exactly in its `ids` (in a namespace it may join): such an id, and with it its
/// `<id>.<suffix>` name, is that credential's own, even while its agent is down. A pattern
/// (`web-*`, `*`) reserves nothing, so a broad pattern cannot lock other credentials out; two
/// credentials listing the same id share it, first come first served.
fn not_reserved(
    credentials: &[AgentCredential],
    cred: &AgentCredential,
    agent_id: &str,
    namespace: &str,
) -> Result<(), Reject> {
    if cred.ids.iter().any(|id| id == agent_id) {
        return Ok(());
    }
    let owner = credentials.iter().find(|other| {
        other.token_sha256 != cred.token_sha256
            && other.ids.iter().any(|id| id == agent_id)
            && (other.namespaces.is_empty() || other.namespaces.iter().any(|n| n == namespace))
    });
    match owner {
        Some(owner) => Err(Reject {
            code: Code::NotAllowed,
            reason: format!(
                "agent id {agent_id} is reserved for credential {} (its ids)",
                owner.name
            ),
        }),
        None => Ok(()),
    }
}

/// Whether token credential `cred` lets agent `agent_id` claim `ips` in `namespace`.
fn allows(
    cred: &AgentCredential,
    agent_id: &str,
    ips: &[IpAddr],
    namespace: &str,
) -> Result<(), Reject> {
    if !cred.allows_id(agent_id) {
        return Err(Reject {
            code: Code::NotAllowed,
            reason: format!("credential {} may not use agent id {agent_id}", cred.name),
        });
    }
    if let Some(ip) = ips
        .iter()
        .find(|ip| !cred.allow.iter().any(|net| net.contains(*ip)))
    {
        return Err(Reject {
            code: Code::NotAllowed,
            reason: format!("credential {} may not claim {ip}", cred.name),
        });
    }
    if !cred.namespaces.is_empty() && !cred.namespaces.iter().any(|n| n == namespace) {
        return Err(Reject {
            code: Code::NotAllowed,
            reason: format!(
                "credential {} may not join namespace {namespace}",
                cred.name
            ),
        });
    }
    Ok(())
}
