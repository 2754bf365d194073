use super::*;

#[test]
fn id_patterns_match_whole_ids() {
    for (pattern, id, expected) in [
        ("web", "web", true),
        ("web", "web-1", false),
        ("web-*", "web-1", true),
        ("web-*", "web-", true),
        ("web-*", "web", false),
        ("web-*", "db-1", false),
        ("*-db", "eu-db", true),
        ("*-db", "eu-db-2", false),
        ("a*b*c", "axxbyyc", true),
        ("a*b*c", "acb", false),
        ("*", "anything", true),
        ("ab*ba", "aba", false),
    ] {
        assert_eq!(id_matches(pattern, id), expected, "{pattern} vs {id}");
    }
}

#[test]
fn overlapping_credentials_are_warned_about() {
    let cred = |name: &str, allow: &[&str], namespaces: &[&str]| AgentCredential {
        namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
        ..AgentCredential::new(
            name,
            name,
            allow.iter().map(|a| a.parse().unwrap()).collect(),
        )
    };
    let a = cred("vpc-a", &["10.1.0.0/16"], &[]);
    let b = cred("vpc-b", &["10.2.0.0/16", "10.1.7.0/24"], &[]);
    let c = cred("vpc-c", &["10.3.0.0/16"], &[]);
    let warnings = overlap_warnings(&[a.clone(), b.clone(), c.clone()]);
    assert_eq!(
        warnings.lines().filter(|l| !l.is_empty()).count(),
        1,
        "{warnings}"
    );
    assert!(
        warnings.contains(
            "relay.agents[0] (vpc-a) and relay.agents[1] (vpc-b) may both claim 10.1.7.0/24"
        ),
        "{warnings}"
    );
    assert_eq!(overlap_warnings(&[a.clone(), c]), "");
    // Disjoint namespaces never meet.
    let a_only = cred("vpc-a", &["10.1.0.0/16"], &["a"]);
    let b_only = cred("vpc-b", &["10.1.0.0/16"], &["b"]);
    assert_eq!(overlap_warnings(&[a_only.clone(), b_only]), "");
    let b_any = cred("vpc-b", &["10.1.0.0/16"], &[]);
    assert!(overlap_warnings(&[a_only, b_any]).starts_with("\nwarning: "));
}

#[test]
fn tokens_that_may_use_unlisted_ids_beside_agent_certificates_are_warned_about() {
    let cred = |name: &str, ids: &[&str], namespaces: &[&str]| AgentCredential {
        ids: ids.iter().map(|n| n.to_string()).collect(),
        namespaces: namespaces.iter().map(|n| n.to_string()).collect(),
        ..AgentCredential::new(name, name, vec!["10.1.0.0/16".parse().unwrap()])
    };
    let mut relay = RelayConfig::new(
        "r",
        "127.0.0.1:4433".parse().unwrap(),
        // Never used: the warnings read credentials and namespaces only.
        crate::tls::Identity {
            chain: Vec::new(),
            key: rustls_pki_types::PrivatePkcs8KeyDer::from(Vec::new()).into(),
        },
        vec![
            cred("any-id", &[], &[]),
            cred("listed", &["web-1", "web-2"], &[]),
            cred("elsewhere", &[], &["vpc-b"]),
            cred("pattern", &["db-*"], &["default"]),
        ],
    );
    // Without agent certificates there is no certificate name to take.
    assert_eq!(certificate_id_warnings(&relay), "");
    relay.agent_ca = Some(Vec::new());
    let warnings = certificate_id_warnings(&relay);
    assert_eq!(
        warnings.lines().filter(|l| !l.is_empty()).count(),
        2,
        "{warnings}"
    );
    for name in ["relay.agents[0] (any-id)", "relay.agents[3] (pattern)"] {
        let expected = format!(
            "{name} may use agent ids it does not list exactly (any id, or a pattern) in \
             namespace default"
        );
        assert!(warnings.contains(&expected), "{warnings}");
    }
}
