//! The SOCKS5 front door (fast-socks5): the whole handshake under a deadline, CONNECT only, and
//! every target routed through a tunnel — never dialled directly.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use fast_socks5::server::{
    AuthMethodSuccessState as _, NoAuthentication, PasswordAuthentication, Socks5ServerProtocol,
    StandardAuthentication, StandardAuthenticationStarted,
};
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{ReplyError, Socks5Command};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use tokio::net::TcpStream;

use super::access::Client;
use super::forward::{Opened, Requested, Target};
use super::{Front, Gateway};
use crate::protocol::Code;

/// A client connection a front door serves: a [`TcpStream`] in production, an in-memory
/// [`DuplexStream`] in tests and fuzzing, which drive the real handshake and parsing paths without
/// sockets. What differs is how a failed transfer ends: a TCP client is reset (RST), so a truncated
/// transfer never looks like a clean end.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Turns off Nagle's algorithm where there is one: small writes must not wait.
    fn set_low_latency(&self) {}

    /// A second handle on the client's socket, for resetting the connection once hyper has let
    /// go of it (see `http::Abort`); `None` where there is no socket.
    fn duplicate(&self) -> Option<socket2::Socket> {
        None
    }

    /// Splices the connection with an opened tunnel stream and writes the access log line.
    fn carry(
        self,
        front: Front,
        client: Client,
        target: Target,
        opened: Opened,
    ) -> impl Future<Output = ()> + Send;
}

impl ClientStream for TcpStream {
    fn set_low_latency(&self) {
        let _ = self.set_nodelay(true);
    }

    fn duplicate(&self) -> Option<socket2::Socket> {
        socket2::SockRef::from(self).try_clone().ok()
    }

    async fn carry(self, front: Front, client: Client, target: Target, opened: Opened) {
        super::carry(front, &client, self, target, opened).await;
    }
}

impl ClientStream for DuplexStream {
    async fn carry(self, front: Front, client: Client, target: Target, opened: Opened) {
        super::carry_io(front, &client, self, target, opened).await;
    }
}

/// Read buffer for the SOCKS5 handshake: a whole greeting, login and request fit.
const HANDSHAKE_BUFFER: usize = 1024;

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
pub async fn serve<S: ClientStream>(gateway: Arc<Gateway>, stream: S, addr: SocketAddr) {
    let deadline = gateway.config.handshake_timeout;
    // fast-socks5 reads the handshake a few bytes at a time; buffering turns ~7 reads into 1-2.
    // Writes pass straight through, so its replies are never held back.
    let buffered = tokio::io::BufReader::with_capacity(HANDSHAKE_BUFFER, stream);
    let handshake = async {
        let (proto, client) = authenticate(&gateway, buffered, addr).await?;
        let (proto, cmd, target) = proto
            .read_command()
            .await
            .map_err(|e| Failed::Protocol(e.to_string()))?;
        Ok::<_, Failed>((proto, client, cmd, target))
    };
    let (proto, client, cmd, target) = match tokio::time::timeout(deadline, handshake).await {
        Ok(Ok(parts)) => parts,
        Ok(Err(Failed::Refused { user, code })) => {
            super::log_login_refused(Front::Socks5, addr, user.as_deref(), code);
            return;
        }
        Ok(Err(Failed::Protocol(err))) => {
            tracing::debug!(client = %addr, %err, "socks5 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(client = %addr, "socks5 handshake timed out");
            return;
        }
    };
    if cmd != Socks5Command::TCPConnect {
        let _ = proto.reply_error(&ReplyError::CommandNotSupported).await;
        tracing::info!(client = %addr, ?cmd, "socks5 command not supported");
        return;
    }
    let requested = match target {
        TargetAddr::Ip(addr) => Requested::Ip(addr),
        TargetAddr::Domain(name, port) => Requested::Name(name, port),
    };
    let (target, opened) = match gateway.connect(&client, &requested).await {
        Ok(ok) => ok,
        Err(err) => {
            super::log_refused(Front::Socks5, &client, &requested, &err);
            let _ = proto.reply_error(&reply_for(err.code())).await;
            return;
        }
    };
    // The bound address is the tunnel, not a local socket; report the unspecified address.
    let buffered = match proto
        .reply_success(SocketAddr::from(([0, 0, 0, 0], 0)))
        .await
    {
        Ok(stream) => stream,
        Err(err) => {
            tracing::debug!(client = %addr, %err, "client left before the reply");
            return;
        }
    };
    // Bytes the client sent right behind its request are already in the buffer: they go first.
    let early = buffered.buffer().to_vec();
    let stream = buffered.into_inner();
    let mut opened = opened;
    if !early.is_empty() && opened.send.write_all(&early).await.is_err() {
        tracing::debug!(client = %addr, "tunnel stream closed before the client's first bytes");
        return;
    }
    stream.carry(Front::Socks5, client, target, opened).await;
}

type Authenticated<S> = Socks5ServerProtocol<S, fast_socks5::server::states::Authenticated>;

/// Why a SOCKS5 handshake ended without a request.
enum Failed {
    /// The client was turned away at the door (wrong or missing password, address not allowed):
    /// logged in the access log and counted, as every refusal is.
    Refused { user: Option<String>, code: Code },
    /// The client broke the protocol or left; logged at debug level only.
    Protocol(String),
}

/// Negotiates authentication. With users configured only username/password is offered. Without,
/// no-auth is preferred, and a client that offers only username/password (to pick a namespace as
/// `any@namespace`) is accepted with any password.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    gateway: &Gateway,
    stream: S,
    addr: SocketAddr,
) -> Result<(Authenticated<S>, Client), Failed> {
    let requires_password = gateway.access.requires_password();
    let methods: &[StandardAuthentication] = if requires_password {
        &[StandardAuthentication::PasswordAuthentication(
            PasswordAuthentication,
        )]
    } else {
        &[
            StandardAuthentication::NoAuthentication(NoAuthentication),
            StandardAuthentication::PasswordAuthentication(PasswordAuthentication),
        ]
    };
    let started = match Socks5ServerProtocol::start(stream)
        .negotiate_auth(methods)
        .await
    {
        Ok(started) => started,
        // A client that offers no method we accept: with users configured, that is a client
        // without a password.
        Err(fast_socks5::server::SocksServerError::AuthMethodUnacceptable(_))
            if requires_password =>
        {
            return Err(Failed::Refused {
                user: None,
                code: Code::Unauthorized,
            })
        }
        Err(e) => return Err(Failed::Protocol(e.to_string())),
    };
    match started {
        StandardAuthenticationStarted::NoAuthentication(auth) => {
            let client = gateway
                .access
                .anonymous(addr)
                .map_err(|code| Failed::Refused { user: None, code })?;
            Ok((auth.finish_auth(), client))
        }
        StandardAuthenticationStarted::PasswordAuthentication(auth) => {
            let (user, password, auth) = auth
                .read_username_password()
                .await
                .map_err(|e| Failed::Protocol(e.to_string()))?;
            match gateway.access.authenticate(addr, &user, &password) {
                Ok(client) => Ok((
                    auth.accept()
                        .await
                        .map_err(|e| Failed::Protocol(e.to_string()))?
                        .finish_auth(),
                    client,
                )),
                Err(code) => {
                    let _ = auth.reject().await;
                    Err(Failed::Refused {
                        user: Some(user),
                        code,
                    })
                }
            }
        }
    }
}
