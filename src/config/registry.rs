//! Registry.

use super::*;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RegistryFile {
    pub kind: Option<RegistryKind>,
    #[serde(default)]
    pub endpoints: Vec<String>,
    pub prefix: Option<String>,
    pub lease_ttl: Option<HumanDuration>,
    pub max_staleness: Option<HumanDuration>,
    /// CA that signed etcd's server certificate (PEM); required with `https://` endpoints.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd user (etcd's `auth enable`); `password` is a secret reference (`env:`, `file:`).
    pub username: Option<String>,
    pub password: Option<String>,
}

/// How postern proves itself to etcd and checks etcd's certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdSecurity {
    pub tls: Option<EtcdTls>,
    pub auth: Option<EtcdAuth>,
}

/// TLS to etcd: the CA that signed etcd's certificate, and a client certificate when etcd asks
/// for one. Paths; the files are checked when the config loads and read when connecting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    /// (certificate, key).
    pub client: Option<(PathBuf, PathBuf)>,
}

/// An etcd user and its password (masked in `Debug`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdAuth {
    pub username: String,
    pub password: Secret,
}

impl EtcdSecurity {
    fn from_file(f: &RegistryFile) -> Result<Self, Error> {
        let https = f
            .endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if https != 0 && https != f.endpoints.len() {
            return Err(invalid(
                "registry.endpoints",
                "all https:// or none: etcd endpoints cannot mix TLS and plain",
            ));
        }
        let tls = match (&f.ca, https > 0) {
            (None, false) => {
                if f.cert.is_some() || f.key.is_some() {
                    return Err(invalid(
                        "registry.cert",
                        "a client certificate needs https:// endpoints and registry.ca",
                    ));
                }
                None
            }
            (None, true) => {
                return Err(invalid(
                    "registry.ca",
                    "required with https:// endpoints: the CA that signed etcd's certificate",
                ))
            }
            (Some(_), false) => {
                return Err(invalid(
                    "registry.ca",
                    "only meaningful with https:// endpoints",
                ))
            }
            (Some(ca), true) => {
                crate::tls::load_certs(ca).map_err(|e| invalid("registry.ca", e.to_string()))?;
                let client = match (&f.cert, &f.key) {
                    (None, None) => None,
                    (Some(cert), Some(key)) => {
                        crate::tls::load_certs(cert)
                            .map_err(|e| invalid("registry.cert", e.to_string()))?;
                        crate::tls::load_key(key)
                            .map_err(|e| invalid("registry.key", e.to_string()))?;
                        Some((cert.clone(), key.clone()))
                    }
                    (Some(_), None) => {
                        return Err(invalid("registry.key", "required with registry.cert"))
                    }
                    (None, Some(_)) => {
                        return Err(invalid("registry.cert", "required with registry.key"))
                    }
                };
                Some(EtcdTls {
                    ca: ca.clone(),
                    client,
                })
            }
        };
        let auth = match (&f.username, &f.password) {
            (None, None) => None,
            (Some(username), Some(password)) => {
                if username.is_empty() {
                    return Err(invalid("registry.username", "must not be empty"));
                }
                Some(EtcdAuth {
                    username: username.clone(),
                    password: Secret::resolve(password, "registry.password")?,
                })
            }
            (Some(_), None) => {
                return Err(invalid(
                    "registry.password",
                    "required with registry.username",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "registry.username",
                    "required with registry.password",
                ))
            }
        };
        Ok(EtcdSecurity { tls, auth })
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistryKind {
    #[default]
    Memory,
    Etcd,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryConfig {
    /// Embedded, single process.
    Memory,
    /// etcd v3.
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
        lease_ttl: Duration,
        /// A gateway whose route view etcd has not confirmed for longer is not ready.
        max_staleness: Duration,
        security: EtcdSecurity,
    },
}

impl RegistryConfig {
    /// The bound on a gateway's route view age (`registry.max_staleness`); none for the
    /// in-process memory registry, which is never stale.
    pub fn max_staleness(&self) -> Option<Duration> {
        match self {
            RegistryConfig::Memory => None,
            RegistryConfig::Etcd { max_staleness, .. } => Some(*max_staleness),
        }
    }

    pub fn from_file(f: RegistryFile) -> Result<Self, Error> {
        match f.kind.unwrap_or_default() {
            RegistryKind::Memory => {
                if !f.endpoints.is_empty() {
                    return Err(invalid(
                        "registry.endpoints",
                        "only meaningful with kind = \"etcd\"",
                    ));
                }
                for (key, set) in [
                    ("registry.ca", f.ca.is_some()),
                    ("registry.cert", f.cert.is_some()),
                    ("registry.key", f.key.is_some()),
                    ("registry.username", f.username.is_some()),
                    ("registry.password", f.password.is_some()),
                ] {
                    if set {
                        return Err(invalid(key, "only meaningful with kind = \"etcd\""));
                    }
                }
                Ok(RegistryConfig::Memory)
            }
            RegistryKind::Etcd => {
                if f.endpoints.is_empty() {
                    return Err(invalid(
                        "registry.endpoints",
                        "etcd needs at least one endpoint",
                    ));
                }
                let lease_ttl = f.lease_ttl.map_or(Duration::from_secs(10), |d| d.0);
                if lease_ttl < Duration::from_secs(2) {
                    return Err(invalid("registry.lease_ttl", "must be at least 2s"));
                }
                let security = EtcdSecurity::from_file(&f)?;
                let max_staleness = f.max_staleness.map_or(Duration::from_secs(30), |d| d.0);
                if max_staleness < Duration::from_secs(2) {
                    return Err(invalid(
                        "registry.max_staleness",
                        "must be at least 2s (the view is confirmed about every second)",
                    ));
                }
                Ok(RegistryConfig::Etcd {
                    endpoints: f.endpoints,
                    prefix: f
                        .prefix
                        .unwrap_or_else(|| "/postern".into())
                        .trim_end_matches('/')
                        .to_string(),
                    lease_ttl,
                    max_staleness,
                    security,
                })
            }
        }
    }
}
