//! Claims are exclusive: an address belongs to one agent id until its routes are gone, an agent id
//! to one credential, a token to the ids it lists and a certificate to its name; an agent claims
//! only its host's addresses. Checked at one relay (its own tunnels) and across two relays on one
//! registry (the other relay's routes), with real agents, real tunnels and clients through both
//! front doors.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use postern::cert::Kind;
use postern::config::{
    AgentConfig, AgentCredential, GatewayConfig, Quota, RegistryConfig, RelayConfig, ServerConfig,
};
use postern::protocol::{Code, Message};
use postern::registry::Registry;
use postern::server::Server;
use tokio_util::sync::CancellationToken;

use crate::support::*;
use crate::{assert_rejected, hello};

fn token() -> String {
    postern::config::hex(&rand::random::<[u8; 16]>())
}

fn welcomed(answer: anyhow::Result<Message>, what: &str) {
    assert!(
        matches!(answer, Ok(Message::Welcome(_))),
        "{what}: expected a Welcome, got {answer:?}"
    );
}

/// Sends 20 requests to `dest` through SOCKS5 and returns how many the service `name` answered.
async fn answered_by(stack: &Stack, dest: &Dest, name: &str) -> usize {
    let mut count = 0;
    for i in 0..20u64 {
        let tcp = socks5_connect(stack.socks, dest, Auth::None)
            .await
            .unwrap_or_else(|e| panic!("request {i} to {dest}: {e:?}"));
        let mut conn = HttpConn::wrap(tcp);
        conn.send(b"GET /who HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n")
            .await;
        let response = conn.response(false).await;
        assert_eq!(response.status, 200, "request {i}");
        if response.text().starts_with(&format!("{name} at ")) {
            count += 1;
        }
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_and_agent_ids_are_exclusive_at_one_relay() {
    init();
    let pki = Pki::new();
    let net = 71;
    let (db_token, other_token, broad_token) = (token(), token(), token());
    let range = || vec![format!("127.{net}.0.0/16").parse().unwrap()];
    let ca = pki.ca();
    let stack = Stack::start(&pki, net, 0, GatewayConfig::default(), |relay| {
        relay.agent_ca = Some(ca);
        relay.agents.push(AgentCredential {
            ids: vec!["db-*".into(), "ledger".into()],
            ..AgentCredential::new("db-hosts", &db_token, range())
        });
        relay
            .agents
            .push(AgentCredential::new("other-vpc", &other_token, range()));
        relay.agents.push(AgentCredential {
            ids: vec!["*".into()],
            ..AgentCredential::new("broad", &broad_token, range())
        });
    })
    .await;
    let (web_ip, other_ip, db_ip, cert_ip) =
        (ip(net, 1, 2), ip(net, 1, 3), ip(net, 1, 4), ip(net, 1, 5));
    let web = http_service(sa(web_ip, 0), "web").await;
    let port = web.addr.port();
    let _web_agent = stack
        .start_agent(stack.agent("web", "default", &[web_ip], &[port]))
        .await;

    // Another agent with the same (VPC-wide) token claims the real agent's address: refused, as
    // a hello and as a running agent that keeps redialling.
    assert_rejected(
        stack
            .say_hello(hello("intruder", &stack.token, &[web_ip], port))
            .await,
        Code::NotAllowed,
        &format!("address {web_ip} in namespace default is held by agent web"),
    );
    let intruder_service = http_service(sa(other_ip, port), "intruder").await;
    let intruder = TestAgent::start(stack.agent("intruder", "default", &[web_ip], &[port]));
    // The agent id of another credential: refused, whatever address it claims.
    assert_rejected(
        stack
            .say_hello(hello("web", &other_token, &[other_ip], port))
            .await,
        Code::NotAllowed,
        "agent id web in namespace default is held by another credential",
    );
    // The same id with the same credential is the agent's second tunnel (or its restart).
    welcomed(
        stack
            .say_hello(hello("web", &stack.token, &[web_ip], port))
            .await,
        "the real agent's second tunnel",
    );
    // A token listing its ids may use only those.
    assert_rejected(
        stack
            .say_hello(hello("web-2", &db_token, &[db_ip], port))
            .await,
        Code::NotAllowed,
        "credential db-hosts may not use agent id web-2",
    );
    welcomed(
        stack
            .say_hello(hello("db-1", &db_token, &[db_ip], port))
            .await,
        "an id the token lists",
    );
    // An id a credential lists exactly is reserved for it: no other token may take it, not one
    // that may use any id, not one whose pattern covers it, though no agent holds it now. A
    // pattern reserves nothing: `db-9` (covered by `db-*`) and any id (covered by `*`) stay free.
    for (token, what) in [
        (&other_token, "an id-less token"),
        (&broad_token, "a `*` token"),
    ] {
        assert_rejected(
            stack
                .say_hello(hello("ledger", token, &[other_ip], port))
                .await,
            Code::NotAllowed,
            "agent id ledger is reserved for credential db-hosts (its ids)",
        );
        eprintln!("ledger refused to {what}");
    }
    welcomed(
        stack
            .say_hello(hello("db-9", &other_token, &[other_ip], port))
            .await,
        "an id only a pattern covers",
    );
    // A certificate's agent id is its name.
    let cert = pki.issue(Kind::Agent, "cert-agent", &[IpAddr::V4(cert_ip)]);
    assert_rejected(
        raw_hello(
            stack.relay_addr,
            &stack.trust,
            Some(cert.clone()),
            hello("web", "", &[cert_ip], port),
        )
        .await,
        Code::NotAllowed,
        "the agent certificate is issued to \"cert-agent\", not to agent id web",
    );
    welcomed(
        raw_hello(
            stack.relay_addr,
            &stack.trust,
            Some(cert),
            hello("cert-agent", "", &[cert_ip], port),
        )
        .await,
        "the certificate's own name",
    );

    // Every client request goes to the real agent, by address and by name, through both doors.
    assert_eq!(
        answered_by(&stack, &Dest::Ip(sa(web_ip, port)), "web").await,
        20
    );
    assert_eq!(
        answered_by(&stack, &Dest::Name("web.postern".into(), port), "web").await,
        20
    );
    let response = http_exchange(
        stack.http,
        &absolute_get(&format!("web.postern:{port}"), "/x", None),
    )
    .await;
    assert_eq!(response.status, 200);
    assert!(
        response.text().starts_with("web at "),
        "{}",
        response.text()
    );
    assert_eq!(
        intruder.handle.tunnels(),
        0,
        "the intruder agent got a tunnel"
    );
    intruder_service
        .assert_never_dialled("the intruder's service")
        .await;
    let owners = stack.owners("default", web_ip.into());
    assert!(
        owners.iter().all(|o| &*o.agent_id == "web"),
        "owners of {web_ip}: {owners:?}"
    );

    // The admin API lists one agent named web.
    let agents = http_exchange(
        stack.admin,
        b"GET /api/agents HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(agents.status, 200);
    let list: serde_json::Value = serde_json::from_slice(&agents.body).expect("json");
    let webs = list
        .as_array()
        .or_else(|| list["agents"].as_array())
        .expect("a list of agents")
        .iter()
        .filter(|a| a["id"] == "web")
        .count();
    assert_eq!(webs, 1, "{list}");
}

/// A second relay (with no front door) on `stack`'s registry, admitting the same credentials.
struct SecondRelay {
    addr: SocketAddr,
    shutdown: CancellationToken,
    _task: AbortOnDrop<anyhow::Result<()>>,
}

impl Drop for SecondRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn second_relay(
    stack: &Stack,
    pki: &Pki,
    id: &str,
    at: Ipv4Addr,
    agents: Vec<AgentCredential>,
) -> SecondRelay {
    let config = ServerConfig {
        relay: RelayConfig::new(id, sa(at, 0), pki.relay_identity(), agents),
        gateway: GatewayConfig {
            socks5: None,
            http: None,
            ..GatewayConfig::default()
        },
        peer: None,
        registry: RegistryConfig::Memory,
        admin: None,
    };
    let server = Server::bind_with_registry(config, stack.registry.clone() as Arc<dyn Registry>)
        .await
        .expect("second relay binds");
    let relay = server.relay().expect("a relay").clone();
    let addr = server.addresses().relay.expect("relay address");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    wait_until(READY, "second relay registered", || relay.is_registered()).await;
    SecondRelay {
        addr,
        shutdown,
        _task: AbortOnDrop(task),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_held_at_another_relay_are_refused_until_their_routes_are_gone() {
    init();
    let pki = Pki::new();
    let net = 72;
    let other_token = token();
    let range = || vec![format!("127.{net}.0.0/16").parse().unwrap()];
    let stack = Stack::start(&pki, net, 0, GatewayConfig::default(), |relay| {
        relay
            .agents
            .push(AgentCredential::new("other-vpc", &other_token, range()));
    })
    .await;
    let second = second_relay(
        &stack,
        &pki,
        "relay-72-9",
        ip(net, 9, 1),
        vec![
            AgentCredential::new("agents", &stack.token, range()),
            AgentCredential::new("other-vpc", &other_token, range()),
        ],
    )
    .await;
    let (web_ip, other_ip) = (ip(net, 1, 2), ip(net, 1, 3));
    let web = tagged_echo(sa(web_ip, 0), "web").await;
    let port = web.addr.port();
    let web_agent = stack
        .start_agent(stack.agent("web", "default", &[web_ip], &[port]))
        .await;

    // The second relay sees the first relay's route in the registry and refuses.
    assert_rejected(
        raw_hello(
            second.addr,
            &stack.trust,
            None,
            hello("intruder", &stack.token, &[web_ip], port),
        )
        .await,
        Code::NotAllowed,
        &format!("address {web_ip} in namespace default is held by agent web (relay relay-72-0)"),
    );
    assert_rejected(
        raw_hello(
            second.addr,
            &stack.trust,
            None,
            hello("web", &other_token, &[other_ip], port),
        )
        .await,
        Code::NotAllowed,
        "agent id web in namespace default is held by another credential (relay relay-72-0)",
    );
    welcomed(
        raw_hello(
            second.addr,
            &stack.trust,
            None,
            hello("web", &stack.token, &[web_ip], port),
        )
        .await,
        "the real agent's tunnel to another relay",
    );
    let tcp = socks5_connect(stack.socks, &Dest::Ip(web.addr), Auth::None)
        .await
        .expect("the real agent's service");
    expect_echo(tcp, Vec::new(), "web", &pattern(72, 4096)).await;

    // Once the real agent and its routes are gone, the address is free again.
    drop(web_agent);
    wait_until(READY, "the real agent's routes gone", || {
        stack.owners("default", web_ip.into()).is_empty()
    })
    .await;
    welcomed(
        raw_hello(
            second.addr,
            &stack.trust,
            None,
            hello("intruder", &stack.token, &[web_ip], port),
        )
        .await,
        "a free address",
    );
}

/// An agent refuses to claim an address its host does not have, unless told it is behind NAT.
#[test]
fn an_agent_claims_only_its_hosts_addresses_unless_told_otherwise() {
    use postern::agent::Agent;
    use postern::config::AgentConfig;
    use postern::protocol::PortRange;
    use postern::tls::Trust;

    init();
    let config = |ip: &str| {
        AgentConfig::new(
            "nat-host",
            vec!["127.0.0.1:1".into()],
            Trust::Ca(Vec::new()),
            "token",
            vec![ip.parse().unwrap()],
            vec![PortRange { start: 80, end: 80 }],
        )
    };
    // TEST-NET-3 is for documentation: never an address of this host.
    let err = Agent::new(config("203.0.113.7"))
        .err()
        .expect("a foreign address is refused");
    let message = format!("{err:#}");
    assert!(
        message.contains("ips: 203.0.113.7 is not an address of this host")
            && message.contains("claim_foreign_ips = true"),
        "{message}"
    );
    // Loopback addresses are the host's: Linux answers for 127.0.0.0/8 on `lo`.
    assert!(Agent::new(config("127.73.0.1")).is_ok());
    assert!(Agent::new(AgentConfig {
        claim_foreign_ips: true,
        ..config("203.0.113.7")
    })
    .is_ok());
}

/// One network's token cannot take a relay from the others: `max_tunnels` and `max_addresses` of
/// a `[[relay.agents]]` entry bound what its tunnels hold on one relay, whatever agent ids they
/// use, while another credential's agents are still admitted and routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credentials_quota_bounds_its_tunnels_and_addresses_on_a_relay() {
    init();
    let pki = Pki::new();
    let net = 147;
    let capped = token();
    let range = || vec![format!("127.{net}.0.0/16").parse().unwrap()];
    let stack = Stack::start(&pki, net, 0, GatewayConfig::default(), |relay| {
        relay.agents.push(AgentCredential {
            quota: Quota {
                tunnels: Some(2),
                addresses: Some(3),
            },
            ..AgentCredential::new("vpc-capped", &capped, range())
        });
    })
    .await;
    let x = |d: u8| ip(net, 9, d);
    let capped_agent = |id: &str, ips: &[Ipv4Addr]| AgentConfig {
        token: capped.as_str().into(),
        ..stack.agent(id, "default", ips, &[80])
    };
    let first = stack.start_agent(capped_agent("flood-1", &[x(1)])).await;
    let second = stack
        .start_agent(capped_agent("flood-2", &[x(2), x(3)]))
        .await;

    // `/api/status` shows what the credential holds beside its quota.
    let capped_use = stack
        .relay
        .credential_use()
        .into_iter()
        .find(|c| c.name == "vpc-capped")
        .expect("the capped credential in the relay's status");
    assert_eq!(
        (
            capped_use.tunnels,
            capped_use.addresses,
            capped_use.max_tunnels,
            capped_use.max_addresses
        ),
        (2, 3, Some(2), Some(3))
    );
    // At its 2 tunnels: a third is refused, under any id.
    assert_rejected(
        stack
            .say_hello(hello("flood-3", &capped, &[x(4)], 80))
            .await,
        Code::NotAllowed,
        "credential vpc-capped holds its maximum of 2 tunnels on this relay (max_tunnels)",
    );
    // Another network's agent is admitted and routed meanwhile.
    let other_ip = ip(net, 1, 2);
    let service = http_service(sa(other_ip, 0), "other").await;
    let _other = stack
        .start_agent(stack.agent("other", "default", &[other_ip], &[service.addr.port()]))
        .await;
    assert_eq!(
        answered_by(&stack, &Dest::Ip(service.addr), "other").await,
        20
    );

    // One tunnel and one address left to the credential: 1 + 3 addresses is past its 3.
    drop(second);
    let relay = stack.relay.clone();
    wait_until(IO, "flood-2's tunnel gone", move || {
        relay
            .sessions()
            .all()
            .iter()
            .all(|s| s.agent_id != "flood-2")
    })
    .await;
    assert_rejected(
        stack
            .say_hello(hello("flood-3", &capped, &[x(4), x(5), x(6)], 80))
            .await,
        Code::NotAllowed,
        "credential vpc-capped may claim 3 addresses on this relay (max_addresses); its tunnels \
         hold 1 and this one claims 3",
    );
    welcomed(
        stack
            .say_hello(hello("flood-3", &capped, &[x(4), x(5)], 80))
            .await,
        "a tunnel within the quota",
    );
    drop(first);
}
