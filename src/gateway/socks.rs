//! The SOCKS5 front door (fast-socks5): the whole handshake under a deadline, CONNECT only, and
//! every target routed through a tunnel — never dialled directly.

use std::net::SocketAddr;
use std::sync::Arc;

use fast_socks5::server::{
    AuthMethodSuccessState as _, NoAuthentication, Socks5ServerProtocol, StandardAuthentication,
    StandardAuthenticationStarted,
};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{ReplyError, Socks5Command};
use tokio::net::TcpStream;

use super::forward::Requested;
use super::Gateway;
use crate::protocol::Code;

fn reply_for(code: Code) -> ReplyError {
    match code.socks5_reply() {
        0x02 => ReplyError::ConnectionNotAllowed,
        0x03 => ReplyError::NetworkUnreachable,
        0x04 => ReplyError::HostUnreachable,
        0x05 => ReplyError::ConnectionRefused,
        0x06 => ReplyError::TtlExpired,
        _ => ReplyError::GeneralFailure,
    }
}

/// Serves one SOCKS5 client connection.
pub async fn serve(gateway: Arc<Gateway>, tcp: TcpStream, client: SocketAddr) {
    let deadline = gateway.config.handshake_timeout;
    let handshake = async {
        let (proto, user) = authenticate(&gateway, tcp).await?;
        let (proto, cmd, target) = proto.read_command().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((proto, user, cmd, target))
    };
    let (proto, user, cmd, target) = match tokio::time::timeout(deadline, handshake).await {
        Ok(Ok(parts)) => parts,
        Ok(Err(err)) => {
            tracing::debug!(%client, %err, "socks5 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%client, "socks5 handshake timed out");
            return;
        }
    };
    if cmd != Socks5Command::TCPConnect {
        let _ = proto.reply_error(&ReplyError::CommandNotSupported).await;
        tracing::info!(%client, ?cmd, "socks5 command not supported");
        return;
    }
    let namespace = user
        .as_deref()
        .and_then(|u| u.split_once('@').map(|(_, ns)| ns.to_string()))
        .unwrap_or_else(|| gateway.config.namespace.clone());
    let requested = match target {
        TargetAddr::Ip(addr) => Requested::Ip(addr),
        TargetAddr::Domain(name, port) => Requested::Name(name, port),
    };
    let opened = match gateway.forwarder.resolve(&namespace, &requested).await {
        Ok(t) => tokio::time::timeout(crate::protocol::OPEN_TIMEOUT, gateway.forwarder.open(&t))
            .await
            .unwrap_or(Err(Code::Timeout))
            .map(|o| (t, o)),
        Err(code) => Err(code),
    };
    let (target, opened) = match opened {
        Ok(ok) => ok,
        Err(code) => {
            tracing::info!(%client, target = ?requested, %namespace, ?code, "socks5 connect refused");
            let _ = proto.reply_error(&reply_for(code)).await;
            return;
        }
    };
    // The bound address is the tunnel, not a local socket; report the unspecified address.
    let tcp = match proto
        .reply_success(SocketAddr::from(([0, 0, 0, 0], 0)))
        .await
    {
        Ok(tcp) => tcp,
        Err(err) => {
            tracing::debug!(%client, %err, "client left before the reply");
            return;
        }
    };
    let started = std::time::Instant::now();
    let _in_flight = opened.guard;
    let result = crate::splice::splice(tcp, opened.send, opened.recv).await;
    let (up, down, outcome) = match &result {
        Ok(t) => (t.up, t.down, "ok".to_string()),
        Err(err) => (0, 0, err.to_string()),
    };
    tracing::info!(%client, user = user.as_deref().unwrap_or("-"), front = "socks5", target = %target.addr,
        namespace = %target.namespace, agent_id = %opened.agent_id, relay_id = %opened.relay_id,
        bytes_up = up, bytes_down = down, duration_ms = started.elapsed().as_millis() as u64, result = %outcome,
        "connection");
}

type Authenticated = Socks5ServerProtocol<TcpStream, fast_socks5::server::states::Authenticated>;

/// Negotiates authentication: none when no users are configured, username/password otherwise.
async fn authenticate(
    gateway: &Gateway,
    tcp: TcpStream,
) -> Result<(Authenticated, Option<String>), String> {
    let require_password = !gateway.config.users.is_empty();
    // Offer exactly one method. fast-socks5's `allow_no_auth(true)` also offers password (first), so
    // a client offering both (curl, PySocks given credentials) would be steered into a password
    // check no user can pass when none are configured.
    let methods: &[StandardAuthentication] = if require_password {
        StandardAuthentication::allow_no_auth(false)
    } else {
        &[StandardAuthentication::NoAuthentication(NoAuthentication)]
    };
    let started = Socks5ServerProtocol::start(tcp)
        .negotiate_auth(methods)
        .await
        .map_err(|e| e.to_string())?;
    match started {
        StandardAuthenticationStarted::NoAuthentication(auth) => Ok((auth.finish_auth(), None)),
        StandardAuthenticationStarted::PasswordAuthentication(auth) => {
            let (user, password, auth) = auth
                .read_username_password()
                .await
                .map_err(|e| e.to_string())?;
            if gateway.check_password(&user, &password) {
                Ok((
                    auth.accept()
                        .await
                        .map_err(|e| e.to_string())?
                        .finish_auth(),
                    Some(user),
                ))
            } else {
                let _ = auth.reject().await;
                Err(format!("wrong credentials for user {user:?}"))
            }
        }
    }
}
