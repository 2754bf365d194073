//! How a bench connection reaches its target: directly, through a SOCKS5 proxy (RFC 1928, with
//! RFC 1929 username/password), or through an HTTP proxy's CONNECT. The proxy address is resolved
//! once, before the run, so no DNS lookup lands inside a measurement.

use std::io;
use std::net::SocketAddr;
use std::str::FromStr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where a bench client sends its connections, as given on the command line:
/// `direct`, `socks5://[user:pass@]host:port` (also `socks5h://`), `http://[user:pass@]host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    Direct,
    Socks5 {
        proxy: String,
        auth: Option<Credentials>,
    },
    Http {
        proxy: String,
        auth: Option<Credentials>,
    },
}

/// Proxy credentials from the URL's `user:pass@` (percent-decoded).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:<redacted>", self.user)
    }
}

impl FromStr for Via {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "direct" {
            return Ok(Via::Direct);
        }
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            format!("{s:?}: expected direct, socks5://host:port or http://host:port")
        })?;
        let rest = rest.trim_end_matches('/');
        let (auth, proxy) = match rest.rsplit_once('@') {
            Some((userinfo, proxy)) => {
                let (user, password) = userinfo
                    .split_once(':')
                    .ok_or_else(|| format!("{s:?}: credentials must be user:password"))?;
                let creds = Credentials {
                    user: percent_decode(user)?,
                    password: percent_decode(password)?,
                };
                if creds.user.len() > 255 || creds.password.len() > 255 {
                    return Err("user name and password are at most 255 bytes".into());
                }
                (Some(creds), proxy)
            }
            None => (None, rest),
        };
        if proxy
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .is_none()
        {
            return Err(format!("{s:?}: the proxy must be host:port"));
        }
        let proxy = proxy.to_string();
        match scheme.to_ascii_lowercase().as_str() {
            "socks5" | "socks5h" => Ok(Via::Socks5 { proxy, auth }),
            "http" => Ok(Via::Http { proxy, auth }),
            other => Err(format!("unsupported proxy scheme {other:?} (socks5, http)")),
        }
    }
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Direct => f.write_str("direct"),
            Via::Socks5 { proxy, .. } => write!(f, "socks5://{proxy}"),
            Via::Http { proxy, .. } => write!(f, "http://{proxy}"),
        }
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// The target as the client names it: an address, or a host name a proxy resolves (sent to SOCKS5
/// as a domain, to HTTP as the CONNECT authority).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    Name(String, u16),
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Target::Addr(addr));
        }
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?} is not host:port"))?;
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("{s:?}: bad port"))?;
        if host.is_empty() || host.len() > 255 || host.contains(['[', ']']) {
            return Err(format!("{s:?}: bad host"));
        }
        Ok(Target::Name(host.to_string(), port))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Addr(a) => write!(f, "{a}"),
            Target::Name(h, p) => write!(f, "{h}:{p}"),
        }
    }
}

/// Why a bench connection failed. [`Error::kind`] names the class for error counts.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("SOCKS5 proxy accepts none of the offered authentication methods")]
    SocksMethod,
    #[error("SOCKS5 proxy rejected the credentials")]
    SocksAuth,
    #[error("SOCKS5 proxy replied {0:#04x}")]
    SocksReply(u8),
    #[error("HTTP proxy answered {0}")]
    HttpStatus(u16),
    #[error("proxy protocol error: {0}")]
    Protocol(String),
    #[error("cannot resolve {0}")]
    Resolve(String),
}

impl Error {
    /// A short, bounded label for error tallies.
    pub fn kind(&self) -> String {
        match self {
            Error::Connect { source, .. } => format!("connect: {:?}", source.kind()),
            Error::Io(e) => format!("io: {:?}", e.kind()),
            Error::SocksMethod => "socks5: no acceptable method".into(),
            Error::SocksAuth => "socks5: auth rejected".into(),
            Error::SocksReply(code) => format!("socks5: reply {code:#04x}"),
            Error::HttpStatus(status) => format!("http: {status}"),
            Error::Protocol(_) => "proxy protocol".into(),
            Error::Resolve(_) => "resolve".into(),
        }
    }
}

/// Opens connections to one target along one path. Build it once per run: it resolves names.
#[derive(Debug)]
pub struct Dialer {
    hop: Hop,
    target: Target,
}

#[derive(Debug)]
enum Hop {
    Direct(SocketAddr),
    Socks5(SocketAddr, Option<Credentials>),
    Http(SocketAddr, Option<Credentials>),
}

async fn resolve(host_port: &str) -> Result<SocketAddr, Error> {
    tokio::net::lookup_host(host_port)
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| Error::Resolve(host_port.to_string()))
}

impl Dialer {
    pub async fn new(via: &Via, target: &Target) -> Result<Self, Error> {
        let hop = match via {
            Via::Direct => Hop::Direct(match target {
                Target::Addr(a) => *a,
                Target::Name(h, p) => resolve(&format!("{h}:{p}")).await?,
            }),
            Via::Socks5 { proxy, auth } => Hop::Socks5(resolve(proxy).await?, auth.clone()),
            Via::Http { proxy, auth } => Hop::Http(resolve(proxy).await?, auth.clone()),
        };
        Ok(Dialer {
            hop,
            target: target.clone(),
        })
    }

    /// A connection to the target, ready for payload (the proxy handshake done), with Nagle off.
    pub async fn connect(&self) -> Result<TcpStream, Error> {
        let first = match &self.hop {
            Hop::Direct(a) | Hop::Socks5(a, _) | Hop::Http(a, _) => *a,
        };
        let mut tcp = TcpStream::connect(first)
            .await
            .map_err(|source| Error::Connect {
                addr: first,
                source,
            })?;
        tcp.set_nodelay(true)?;
        match &self.hop {
            Hop::Direct(_) => {}
            Hop::Socks5(_, auth) => socks5_handshake(&mut tcp, &self.target, auth.as_ref()).await?,
            Hop::Http(_, auth) => http_connect(&mut tcp, &self.target, auth.as_ref()).await?,
        }
        Ok(tcp)
    }
}

/// RFC 1928 CONNECT (and RFC 1929 login when `auth` is set) on an open stream.
pub async fn socks5_handshake<S>(
    s: &mut S,
    target: &Target,
    auth: Option<&Credentials>,
) -> Result<(), Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let greeting: &[u8] = if auth.is_some() {
        &[5, 2, 0, 2]
    } else {
        &[5, 1, 0]
    };
    s.write_all(greeting).await?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await?;
    if choice[0] != 5 {
        return Err(Error::Protocol(format!(
            "SOCKS version {} in method reply",
            choice[0]
        )));
    }
    match (choice[1], auth) {
        (0, _) => {}
        (2, Some(creds)) => {
            let mut login = Vec::with_capacity(3 + creds.user.len() + creds.password.len());
            login.push(1);
            login.push(creds.user.len() as u8);
            login.extend_from_slice(creds.user.as_bytes());
            login.push(creds.password.len() as u8);
            login.extend_from_slice(creds.password.as_bytes());
            s.write_all(&login).await?;
            let mut status = [0u8; 2];
            s.read_exact(&mut status).await?;
            if status[1] != 0 {
                return Err(Error::SocksAuth);
            }
        }
        _ => return Err(Error::SocksMethod),
    }
    let mut request = vec![5, 1, 0];
    match target {
        Target::Addr(SocketAddr::V4(a)) => {
            request.push(1);
            request.extend_from_slice(&a.ip().octets());
        }
        Target::Addr(SocketAddr::V6(a)) => {
            request.push(4);
            request.extend_from_slice(&a.ip().octets());
        }
        Target::Name(host, _) => {
            request.push(3);
            request.push(host.len() as u8);
            request.extend_from_slice(host.as_bytes());
        }
    }
    let port = match target {
        Target::Addr(a) => a.port(),
        Target::Name(_, p) => *p,
    };
    request.extend_from_slice(&port.to_be_bytes());
    s.write_all(&request).await?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(Error::Protocol(format!(
            "SOCKS version {} in reply",
            head[0]
        )));
    }
    if head[1] != 0 {
        return Err(Error::SocksReply(head[1]));
    }
    // The bound address: skip it (its length depends on its type).
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await?;
            len[0] as usize + 2
        }
        other => {
            return Err(Error::Protocol(format!(
                "unknown address type {other} in reply"
            )))
        }
    };
    let mut skip = [0u8; 258];
    s.read_exact(&mut skip[..rest]).await?;
    Ok(())
}

/// `CONNECT host:port HTTP/1.1` on an open stream; succeeds on a 2xx answer.
///
/// Reads the answer in chunks and insists it ends exactly at the blank line: every bench mode has
/// the client speak first, so a proxy sending more is a protocol error, not payload to keep.
pub async fn http_connect<S>(
    s: &mut S,
    target: &Target,
    auth: Option<&Credentials>,
) -> Result<(), Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let authority = match target {
        Target::Addr(SocketAddr::V6(a)) => format!("[{}]:{}", a.ip(), a.port()),
        Target::Addr(a) => a.to_string(),
        Target::Name(h, p) => format!("{h}:{p}"),
    };
    let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(c) = auth {
        let token = base64(format!("{}:{}", c.user, c.password).as_bytes());
        request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    request.push_str("\r\n");
    s.write_all(request.as_bytes()).await?;

    const LIMIT: usize = 16 * 1024;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let end = loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(Error::Protocol(
                "proxy closed before answering CONNECT".into(),
            ));
        }
        let searched_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf[searched_from..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
        {
            break searched_from + pos + 4;
        }
        if buf.len() > LIMIT {
            return Err(Error::Protocol("CONNECT answer headers too long".into()));
        }
    };
    let status_line = buf
        .split(|&b| b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim().to_string())
        .unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let status = match (
        parts.next(),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code,
        _ => {
            return Err(Error::Protocol(format!(
                "bad CONNECT status line {status_line:?}"
            )))
        }
    };
    if !(200..300).contains(&status) {
        return Err(Error::HttpStatus(status));
    }
    if end != buf.len() {
        return Err(Error::Protocol(
            "proxy sent data before the client spoke".into(),
        ));
    }
    Ok(())
}

/// Standard base64 with padding (RFC 4648), for `Proxy-Authorization: Basic`.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for group in input.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[test]
    fn via_parses_every_form() {
        assert_eq!("direct".parse::<Via>().unwrap(), Via::Direct);
        assert_eq!(
            "socks5://127.0.0.1:1080".parse::<Via>().unwrap(),
            Via::Socks5 {
                proxy: "127.0.0.1:1080".into(),
                auth: None
            }
        );
        assert_eq!(
            "socks5h://al%40ice:p%3Ass@gw:1080/".parse::<Via>().unwrap(),
            Via::Socks5 {
                proxy: "gw:1080".into(),
                auth: Some(Credentials {
                    user: "al@ice".into(),
                    password: "p:ss".into()
                })
            }
        );
        assert_eq!(
            "http://[::1]:8080".parse::<Via>().unwrap(),
            Via::Http {
                proxy: "[::1]:8080".into(),
                auth: None
            }
        );
        for bad in [
            "socks5://gw",
            "ftp://gw:21",
            "gw:1080",
            "socks5://u@gw:1",
            "http://a:%zz@gw:1",
        ] {
            assert!(bad.parse::<Via>().is_err(), "{bad}");
        }
    }

    #[test]
    fn target_parses_addresses_and_names() {
        assert_eq!(
            "10.0.0.1:80".parse::<Target>().unwrap(),
            Target::Addr("10.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            "[fd00::1]:80".parse::<Target>().unwrap(),
            Target::Addr("[fd00::1]:80".parse().unwrap())
        );
        assert_eq!(
            "web-1.postern:9100".parse::<Target>().unwrap(),
            Target::Name("web-1.postern".into(), 9100)
        );
        assert!("nohost".parse::<Target>().is_err());
        assert!("h:99999".parse::<Target>().is_err());
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    /// Plays the proxy side of a SOCKS5 exchange with a tiny buffer and checks every byte.
    async fn socks5_exchange(target: Target, auth: Option<Credentials>, expect_request: Vec<u8>) {
        let (mut client, mut proxy) = duplex(7);
        let with_auth = auth.is_some();
        let server = tokio::spawn(async move {
            let mut greeting = vec![0u8; if with_auth { 4 } else { 3 }];
            proxy.read_exact(&mut greeting).await.unwrap();
            if with_auth {
                assert_eq!(greeting, [5, 2, 0, 2]);
                proxy.write_all(&[5, 2]).await.unwrap();
                let mut login = [0u8; 2];
                proxy.read_exact(&mut login).await.unwrap();
                let mut user = vec![0u8; login[1] as usize];
                proxy.read_exact(&mut user).await.unwrap();
                let mut plen = [0u8; 1];
                proxy.read_exact(&mut plen).await.unwrap();
                let mut password = vec![0u8; plen[0] as usize];
                proxy.read_exact(&mut password).await.unwrap();
                assert_eq!((&user[..], &password[..]), (&b"u"[..], &b"pw"[..]));
                proxy.write_all(&[1, 0]).await.unwrap();
            } else {
                assert_eq!(greeting, [5, 1, 0]);
                proxy.write_all(&[5, 0]).await.unwrap();
            }
            let mut request = vec![0u8; expect_request.len()];
            proxy.read_exact(&mut request).await.unwrap();
            assert_eq!(request, expect_request);
            // Reply with a domain-typed bound address to exercise the variable-length skip.
            proxy
                .write_all(&[5, 0, 0, 3, 4, b'h', b'o', b's', b't', 0, 80])
                .await
                .unwrap();
            proxy.write_all(b"payload").await.unwrap();
            proxy
        });
        socks5_handshake(&mut client, &target, auth.as_ref())
            .await
            .unwrap();
        let mut payload = [0u8; 7];
        client.read_exact(&mut payload).await.unwrap();
        assert_eq!(&payload, b"payload");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn socks5_ipv4_ipv6_and_domain_targets() {
        socks5_exchange(
            "10.1.2.3:9100".parse().unwrap(),
            None,
            vec![5, 1, 0, 1, 10, 1, 2, 3, 0x23, 0x8c],
        )
        .await;
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0, 80]);
        socks5_exchange("[fd00::1]:80".parse().unwrap(), None, v6).await;
        let mut name = vec![5, 1, 0, 3, 6];
        name.extend_from_slice(b"a.test");
        name.extend_from_slice(&[0, 22]);
        socks5_exchange(
            "a.test:22".parse().unwrap(),
            Some(Credentials {
                user: "u".into(),
                password: "pw".into(),
            }),
            name,
        )
        .await;
    }

    #[tokio::test]
    async fn socks5_error_reply_is_reported() {
        let (mut client, mut proxy) = duplex(64);
        tokio::spawn(async move {
            let mut buf = [0u8; 3];
            proxy.read_exact(&mut buf).await.unwrap();
            proxy.write_all(&[5, 0]).await.unwrap();
            let mut req = [0u8; 10];
            proxy.read_exact(&mut req).await.unwrap();
            proxy
                .write_all(&[5, 4, 0, 1, 0, 0, 0, 0, 0, 0])
                .await
                .unwrap();
        });
        let err = socks5_handshake(&mut client, &"10.0.0.1:1".parse().unwrap(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::SocksReply(4)), "{err}");
    }

    #[tokio::test]
    async fn http_connect_sends_authority_and_auth() {
        let (mut client, mut proxy) = duplex(5);
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut b = [0u8; 1];
            while !got.ends_with(b"\r\n\r\n") {
                proxy.read_exact(&mut b).await.unwrap();
                got.push(b[0]);
            }
            let got = String::from_utf8(got).unwrap();
            assert!(
                got.starts_with("CONNECT [fd00::1]:443 HTTP/1.1\r\n"),
                "{got}"
            );
            assert!(got.contains("Host: [fd00::1]:443\r\n"), "{got}");
            assert!(
                got.contains("Proxy-Authorization: Basic dTpwdw==\r\n"),
                "{got}"
            );
            proxy
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .unwrap();
            proxy
        });
        let creds = Credentials {
            user: "u".into(),
            password: "pw".into(),
        };
        http_connect(&mut client, &"[fd00::1]:443".parse().unwrap(), Some(&creds))
            .await
            .unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn http_connect_error_status_is_reported() {
        let (mut client, mut proxy) = duplex(64);
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            let _ = proxy.read(&mut buf).await;
            proxy
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
        });
        let err = http_connect(&mut client, &"10.0.0.1:1".parse().unwrap(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::HttpStatus(502)), "{err}");
    }
}
