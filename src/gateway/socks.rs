//! The SOCKS5 front door (fast-socks5): the whole handshake under a deadline, CONNECT only, and
//! every target routed through a tunnel — never dialled directly.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use fast_socks5::server::Socks5ServerProtocol;
use fast_socks5::util::target_addr::TargetAddr;
use fast_socks5::{ReplyError, Socks5Command};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, DuplexStream};
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
    let requested = match target {
        TargetAddr::Ip(addr) => Requested::Ip(addr),
        TargetAddr::Domain(name, port) => Requested::Name(name, port),
    };
    if cmd != Socks5Command::TCPConnect {
        let _ = proto.reply_error(&ReplyError::CommandNotSupported).await;
        super::log_unsupported(Front::Socks5, &client, &requested, &format!("{cmd:?}"));
        return;
    }
    let started = std::time::Instant::now();
    // A client's FIN while the stream is opened is not taken for leaving: a SOCKS5 client may
    // send its request and data and shut its side at once, and the splice carries that across.
    let (target, opened) = match gateway.connect(&client, &requested).await {
        Ok(ok) => ok,
        Err(err) => {
            super::log_refused(Front::Socks5, &client, &requested, started, &err);
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
    let mut opened = opened;
    opened.early = bytes::Bytes::copy_from_slice(buffered.buffer());
    let stream = buffered.into_inner();
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

/// Authentication methods (RFC 1928 §3).
const NO_AUTHENTICATION: u8 = 0x00;
const USERNAME_PASSWORD: u8 = 0x02;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
/// The username/password sub-negotiation (RFC 1929): its version, and its status bytes.
const SUBNEGOTIATION: u8 = 0x01;
const ACCEPTED: u8 = 0x00;
const REJECTED: u8 = 0x01;

/// Negotiates authentication, here rather than in fast-socks5 so that every login gets its RFC
/// 1929 status (fast-socks5 closes without one on an empty or non-UTF-8 name or password) and so
/// that the method follows what the client offers. A client that offers username/password has a
/// login to give, and picks its namespace with it (`any@namespace`): it is asked for it, users or
/// not; with users configured nothing else is accepted. A client that offers only no-auth gets it
/// when there are no users. Without users any password is accepted, an empty one included.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    gateway: &Gateway,
    mut stream: S,
    addr: SocketAddr,
) -> Result<(Authenticated<S>, Client), Failed> {
    let protocol = |e: std::io::Error| Failed::Protocol(e.to_string());
    let requires_password = gateway.access.requires_password();
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await.map_err(protocol)?;
    let [version, count] = head;
    if version != 0x05 {
        return Err(Failed::Protocol(format!("not SOCKS5 (version {version})")));
    }
    let mut offered = vec![0u8; usize::from(count)];
    stream.read_exact(&mut offered).await.map_err(protocol)?;
    let method = if offered.contains(&USERNAME_PASSWORD) {
        USERNAME_PASSWORD
    } else if !requires_password && offered.contains(&NO_AUTHENTICATION) {
        NO_AUTHENTICATION
    } else {
        NO_ACCEPTABLE_METHOD
    };
    stream.write_all(&[0x05, method]).await.map_err(protocol)?;
    // The stream is authenticated here; fast-socks5 reads the request from it.
    let authenticated = Socks5ServerProtocol::skip_auth_this_is_not_rfc_compliant;
    match method {
        NO_AUTHENTICATION => {
            let client = gateway
                .access
                .anonymous(addr)
                .map_err(|code| Failed::Refused { user: None, code })?;
            Ok((authenticated(stream), client))
        }
        USERNAME_PASSWORD => {
            let mut head = [0u8; 2];
            stream.read_exact(&mut head).await.map_err(protocol)?;
            let [version, length] = head;
            if version != SUBNEGOTIATION {
                return Err(Failed::Protocol(format!(
                    "username/password version {version}, not {SUBNEGOTIATION}"
                )));
            }
            let mut user = vec![0u8; usize::from(length)];
            stream.read_exact(&mut user).await.map_err(protocol)?;
            let mut length = [0u8; 1];
            stream.read_exact(&mut length).await.map_err(protocol)?;
            let mut password = vec![0u8; usize::from(length[0])];
            stream.read_exact(&mut password).await.map_err(protocol)?;
            let verdict = match (String::from_utf8(user), String::from_utf8(password)) {
                (Ok(user), Ok(password)) => gateway
                    .access
                    .authenticate(addr, &user, &password)
                    .map_err(|code| (Some(user), code)),
                // No password is checked: what it is does not matter.
                (Ok(user), Err(_)) if !requires_password => gateway
                    .access
                    .authenticate(addr, &user, "")
                    .map_err(|code| (Some(user), code)),
                // Nor is the name, but for the namespace it may name: Java clients offer
                // username/password always and send the OS user name, in ISO-8859-1, when none
                // is configured. Without `@` it names none.
                (Err(name), _) if !requires_password && !name.as_bytes().contains(&b'@') => gateway
                    .access
                    .authenticate(addr, "", "")
                    .map_err(|code| (None, code)),
                (user, _) => Err((user.ok(), Code::Unauthorized)),
            };
            match verdict {
                Ok(client) => {
                    stream
                        .write_all(&[SUBNEGOTIATION, ACCEPTED])
                        .await
                        .map_err(protocol)?;
                    Ok((authenticated(stream), client))
                }
                Err((user, code)) => {
                    let _ = stream.write_all(&[SUBNEGOTIATION, REJECTED]).await;
                    Err(Failed::Refused { user, code })
                }
            }
        }
        // A client that offers no method we accept: with users configured, that is a client
        // without a password.
        _ if requires_password => Err(Failed::Refused {
            user: None,
            code: Code::Unauthorized,
        }),
        _ => Err(Failed::Protocol(
            "no acceptable authentication method offered".into(),
        )),
    }
}
