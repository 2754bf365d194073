use super::*;

fn etcd(endpoints: &[&str]) -> RegistryFile {
    RegistryFile {
        kind: Some(RegistryKind::Etcd),
        endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
        ..RegistryFile::default()
    }
}

fn error_key(f: RegistryFile) -> String {
    match RegistryConfig::from_file(f) {
        Err(Error::Invalid { key, .. }) => key,
        other => panic!("expected an invalid key, got {other:?}"),
    }
}

#[test]
fn etcd_tls_and_users_are_checked_key_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = crate::cert::generate_bundle(dir.path(), "etcd").unwrap();
    let https = ["https://127.0.0.1:2379"];

    assert_eq!(error_key(etcd(&https)), "registry.ca");
    let mut f = etcd(&["http://127.0.0.1:2379"]);
    f.ca = Some(bundle.ca.clone());
    assert_eq!(error_key(f), "registry.ca");
    assert_eq!(
        error_key(etcd(&["https://127.0.0.1:2379", "http://127.0.0.1:2380"])),
        "registry.endpoints"
    );
    let mut f = etcd(&https);
    f.ca = Some(bundle.ca.clone());
    f.cert = Some(bundle.relay_cert.clone());
    assert_eq!(error_key(f), "registry.key");
    let mut f = etcd(&https);
    f.ca = Some(dir.path().join("missing.pem"));
    assert_eq!(error_key(f), "registry.ca");
    let mut f = etcd(&["http://127.0.0.1:2379"]);
    f.username = Some("postern".into());
    assert_eq!(error_key(f), "registry.password");
    let mut f = etcd(&["http://127.0.0.1:2379"]);
    f.max_staleness = Some(HumanDuration(Duration::from_secs(1)));
    assert_eq!(error_key(f), "registry.max_staleness");
    let f = RegistryFile {
        ca: Some(bundle.ca.clone()),
        ..RegistryFile::default()
    };
    assert_eq!(error_key(f), "registry.ca");

    let mut f = etcd(&https);
    f.ca = Some(bundle.ca.clone());
    f.cert = Some(bundle.relay_cert.clone());
    f.key = Some(bundle.relay_key.clone());
    f.username = Some("postern".into());
    f.password = Some("hunter2-literal".into());
    let config = RegistryConfig::from_file(f).unwrap();
    let RegistryConfig::Etcd {
        security,
        max_staleness,
        ..
    } = &config
    else {
        panic!("not etcd: {config:?}")
    };
    assert_eq!(*max_staleness, Duration::from_secs(30));
    let tls = security.tls.as_ref().unwrap();
    assert_eq!(tls.ca, bundle.ca);
    assert!(tls.client.is_some());
    assert_eq!(
        security.auth.as_ref().unwrap().password.expose(),
        "hunter2-literal"
    );
    assert!(!format!("{config:?}").contains("hunter2"), "{config:?}");
}
