//! What the process-level suites (tests/cluster, tests/ops) share: real `postern` and `etcd`
//! processes on free loopback ports (killed when their guard drops), echo services that name
//! themselves, a raw SOCKS5 client, and deterministic payloads. Everything waits by polling a
//! condition under a deadline.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

pub mod faults;
pub mod roles;

pub const BIN: &str = env!("CARGO_BIN_EXE_postern");
/// How long a process may take to print its first line, or etcd to answer.
pub const STARTUP: Duration = Duration::from_secs(20);

/// Polls `check` every 25 ms until it returns `Some`, or panics naming `what` after `limit`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Picks a port on `ip` for which `free` holds, from below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`): a test keeps such a port for a process that binds it later,
/// or binds it again after a kill, and no other socket's `connect` can take it as its local port
/// in between (a port from the ephemeral range was taken that way and held for the rest of a test).
/// Each call in a test process moves on to the next port; the start depends on the process id, so
/// test binaries running side by side start apart.
fn port_below_ephemeral(free: impl Fn(u16) -> bool) -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(usize::MAX);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOW: u16 = 10_000;
    assert!(
        ephemeral_low > LOW + 1_000,
        "the ephemeral port range starts at {ephemeral_low}: too low to keep test ports below it"
    );
    let span = usize::from(ephemeral_low - LOW);
    let _ = NEXT.compare_exchange(
        usize::MAX,
        (std::process::id() as usize * 7_919) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let port = LOW + (NEXT.fetch_add(1, Ordering::SeqCst) % span) as u16;
        if free(port) {
            return port;
        }
    }
    panic!("no free port in {LOW}..{ephemeral_low}");
}

/// A port on `ip` free now over both UDP and TCP: a relay listens for TCP tunnels on the port of
/// its QUIC endpoint by default (`relay.tcp_listen`).
pub fn free_port_on(ip: Ipv4Addr) -> u16 {
    port_below_ephemeral(|port| {
        std::net::UdpSocket::bind((ip, port)).is_ok()
            && std::net::TcpListener::bind((ip, port)).is_ok()
    })
}

/// A port on 127.0.0.1 free over both UDP and TCP (see [`free_port_on`]).
pub fn free_udp_port() -> u16 {
    free_port_on(Ipv4Addr::LOCALHOST)
}

/// A UDP port free on `ip` at the time of asking (and over TCP, see [`free_port_on`]).
pub fn free_udp_port_on(ip: Ipv4Addr) -> u16 {
    free_port_on(ip)
}

/// A TCP port free on `ip` at the time of asking (and over UDP, see [`free_port_on`]).
pub fn free_tcp_port_on(ip: Ipv4Addr) -> u16 {
    free_port_on(ip)
}

pub fn free_tcp_port() -> u16 {
    free_port_on(Ipv4Addr::LOCALHOST)
}

/// A child process that dies with its guard.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// Starts `program args` with stdout piped (for the `ready` line) and stderr appended to `log`.
    pub fn spawn(
        name: &str,
        program: &str,
        args: &[&str],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Proc {
            child,
            name: name.to_string(),
        }
    }

    /// Reads the first stdout line, which must start with `starts_with`; keeps draining the rest.
    pub async fn first_line(&mut self, starts_with: &str) -> String {
        let stdout = self.child.stdout.take().expect("stdout piped");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(STARTUP, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{} printed nothing within {STARTUP:?}", self.name))
            .unwrap()
            .unwrap_or_else(|| panic!("{} exited before printing anything", self.name));
        assert!(
            line.starts_with(starts_with),
            "{}: unexpected first line {line:?}",
            self.name
        );
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        line
    }

    /// Reads the `ready …` line every role prints once bound.
    pub async fn ready_line(&mut self) -> String {
        self.first_line("ready ").await
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit; panics after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {limit:?}", self.name))
            .unwrap()
    }
}

/// Prints the last `lines` lines of every `*.log` in `dir` (call before a failing assertion).
pub fn dump_logs(dir: &Path, lines: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            eprintln!("==== {} (last {} lines)", path.display(), tail.len());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// The address a `ready relay=… peer=… socks5=… http=… admin=…` line gives for `key`.
pub fn ready_addr(line: &str, key: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|part| part.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} address in {line:?}"))
}

/// A real etcd on free loopback ports with a data dir of its own. It may be planned (ports
/// chosen) before it is started, so that processes can be pointed at it while it is down, and
/// stopped and started again on the same ports and data.
pub struct Etcd {
    pub url: String,
    host: Ipv4Addr,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    proc: Option<Proc>,
    log: PathBuf,
    tls: Option<EtcdTls>,
}

/// PEM files of an etcd that serves TLS only and requires client certificates.
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server: (PathBuf, PathBuf),
    /// The certificate and key postern (and the test) present.
    pub client: (PathBuf, PathBuf),
}

impl EtcdTls {
    /// A CA, etcd's certificate for 127.0.0.1, and a client certificate, written under `dir`.
    pub fn new(dir: &Path) -> EtcdTls {
        use postern::cert::{generate_ca, issue, Kind};
        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let (ca, ca_key) = generate_ca("etcd test CA").unwrap();
        let localhost: IpAddr = "127.0.0.1".parse().unwrap();
        let (server, server_key) =
            issue(&ca, &ca_key, Kind::Relay, "etcd", &[], &[localhost], 2).unwrap();
        let (client, client_key) =
            issue(&ca, &ca_key, Kind::Relay, "postern", &[], &[], 2).unwrap();
        EtcdTls {
            ca: write("etcd-ca.pem", &ca),
            server: (
                write("etcd-server.pem", &server),
                write("etcd-server-key.pem", &server_key),
            ),
            client: (
                write("etcd-client.pem", &client),
                write("etcd-client-key.pem", &client_key),
            ),
        }
    }

    /// Client options with the CA and the client certificate.
    pub fn options(&self) -> etcd_client::ConnectOptions {
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(
                std::fs::read(&self.ca).unwrap(),
            ))
            .identity(etcd_client::Identity::from_pem(
                std::fs::read(&self.client.0).unwrap(),
                std::fs::read(&self.client.1).unwrap(),
            ));
        etcd_client::ConnectOptions::new().with_tls(tls)
    }
}

impl Etcd {
    /// Chooses the ports; nothing listens on them until [`Etcd::start`].
    pub fn planned(dir: &Path) -> Etcd {
        Etcd::planned_on(dir, Ipv4Addr::LOCALHOST)
    }

    /// [`Etcd::planned`] on loopback address `ip`.
    pub fn planned_on(dir: &Path, ip: Ipv4Addr) -> Etcd {
        // Two picks never return the same port (the picker moves on each call), and etcd may be
        // restarted on them: both come from below the ephemeral range.
        let (client_port, peer_port) = (free_port_on(ip), free_port_on(ip));
        Etcd {
            url: format!("http://{ip}:{client_port}"),
            host: ip,
            dir: dir.join("etcd-data"),
            client_port,
            peer_port,
            proc: None,
            log: dir.join("etcd.log"),
            tls: None,
        }
    }

    pub async fn started(dir: &Path) -> Etcd {
        let mut etcd = Etcd::planned(dir);
        etcd.start().await;
        etcd
    }

    /// [`Etcd::started`] on loopback address `ip`.
    pub async fn started_on(dir: &Path, ip: Ipv4Addr) -> Etcd {
        let mut etcd = Etcd::planned_on(dir, ip);
        etcd.start().await;
        etcd
    }

    /// [`Etcd::started`], serving clients over TLS only with client certificates required
    /// (`--client-cert-auth`), as production etcd clusters do.
    pub async fn started_tls(dir: &Path) -> Etcd {
        let mut etcd = Etcd::planned(dir);
        etcd.url = format!("https://127.0.0.1:{}", etcd.client_port);
        etcd.tls = Some(EtcdTls::new(dir));
        etcd.start().await;
        etcd
    }

    /// The `[registry]` lines (after `endpoints`) a postern config needs to reach this etcd.
    pub fn registry_toml(&self) -> String {
        match &self.tls {
            None => String::new(),
            Some(tls) => format!(
                "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                tls.ca.display(),
                tls.client.0.display(),
                tls.client.1.display()
            ),
        }
    }

    /// The `[registry]` of a postern config that reaches this etcd (its TLS files included).
    pub fn registry(&self) -> roles::Registry {
        let mut r = roles::Registry::etcd(&self.url);
        if let Some(tls) = &self.tls {
            r.ca = Some(tls.ca.clone());
            r.client = Some(tls.client.clone());
        }
        r
    }

    /// What postern's own etcd registry needs to reach this etcd.
    pub fn security(&self) -> postern::config::EtcdSecurity {
        postern::config::EtcdSecurity {
            tls: self.tls.as_ref().map(|tls| postern::config::EtcdTls {
                ca: tls.ca.clone(),
                client: Some(tls.client.clone()),
            }),
            auth: None,
        }
    }

    /// A client of the test's own (with the client certificate when etcd requires one).
    pub async fn client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        let options = self.tls.as_ref().map(EtcdTls::options);
        etcd_client::Client::connect([self.url.clone()], options).await
    }

    /// Starts (or restarts) etcd and waits until it answers. Fails, never skips, when the `etcd`
    /// binary is missing.
    pub async fn start(&mut self) {
        assert!(
            std::process::Command::new("etcd")
                .arg("--version")
                .output()
                .is_ok(),
            "the `etcd` binary is missing: install Debian's etcd-server (scripts/deps does)"
        );
        let client = self.url.clone();
        let peer = format!("http://{}:{}", self.host, self.peer_port);
        let initial = format!("test={peer}");
        let mut args = vec![
            "--name",
            "test",
            "--data-dir",
            self.dir.to_str().unwrap(),
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &initial,
        ];
        let tls_args: Vec<String> = match &self.tls {
            None => Vec::new(),
            Some(tls) => vec![
                "--client-cert-auth".into(),
                "--trusted-ca-file".into(),
                tls.ca.display().to_string(),
                "--cert-file".into(),
                tls.server.0.display().to_string(),
                "--key-file".into(),
                tls.server.1.display().to_string(),
            ],
        };
        args.extend(tls_args.iter().map(String::as_str));
        self.proc = Some(Proc::spawn("etcd", "etcd", &args, &[], &self.log));
        wait_for(STARTUP, "etcd to answer", || async {
            let mut c = self.client().await.ok()?;
            match c.get("probe", None).await {
                Ok(_) => Some(()),
                // With users enabled (`auth enable`) an anonymous read is refused: etcd is up.
                Err(etcd_client::Error::GRpcStatus(status))
                    if !matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                    ) =>
                {
                    Some(())
                }
                Err(_) => None,
            }
        })
        .await;
    }

    /// Kills etcd (its data stays for the next [`Etcd::start`]).
    pub async fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.child.kill().await.unwrap();
        }
    }

    /// Every route key under `/postern/routes/`: (namespace, ip, relay, session).
    pub async fn route_keys(&self) -> BTreeSet<(String, IpAddr, String, u64)> {
        let mut client = self.client().await.unwrap();
        let resp = client
            .get(
                "/postern/routes/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        resp.kvs()
            .iter()
            .map(|kv| {
                let key = kv.key_str().unwrap();
                let parts: Vec<&str> = key
                    .trim_start_matches("/postern/routes/")
                    .split('/')
                    .collect();
                assert_eq!(parts.len(), 4, "route key {key}");
                (
                    parts[0].to_string(),
                    parts[1].parse().unwrap(),
                    parts[2].to_string(),
                    parts[3].parse().unwrap(),
                )
            })
            .collect()
    }

    /// Agent IP → relays holding a route for it.
    pub async fn routes(&self) -> BTreeMap<IpAddr, BTreeSet<String>> {
        let mut out: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
        for (_, ip, relay, _) in self.route_keys().await {
            out.entry(ip).or_default().insert(relay);
        }
        out
    }
}

/// Bytes of the header an [`Echo`] sends first: its own IP, space padded.
pub const ECHO_HEADER: usize = 16;

/// A TCP service behind an agent: writes a 16-byte header (its IP, space padded), then echoes
/// until the client half-closes. Counts the connections it accepted.
pub struct Echo {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
}

impl Echo {
    pub async fn start(ip: Ipv4Addr) -> Echo {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let header = format!("{:<ECHO_HEADER$}", ip.to_string());
                    if tcp.write_all(header.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Echo { addr, accepted }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Connects through a SOCKS5 proxy to an IPv4 target, with username/password when `login` is
/// given. Returns the stream, or the SOCKS5 reply code (`0xf1` = authentication refused, `0xff` =
/// the proxy broke the connection).
pub async fn socks_connect(
    proxy: SocketAddr,
    login: Option<(&str, &str)>,
    target: SocketAddr,
) -> Result<TcpStream, u8> {
    socks_connect_from(None, proxy, login, target).await
}

/// [`socks_connect`] from the local address `from` (a client of its own to the gateway's
/// per-client limits), or any when `None`.
pub async fn socks_connect_from(
    from: Option<IpAddr>,
    proxy: SocketAddr,
    login: Option<(&str, &str)>,
    target: SocketAddr,
) -> Result<TcpStream, u8> {
    let mut tcp = match from {
        None => TcpStream::connect(proxy).await.map_err(|_| 0xff)?,
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4().map_err(|_| 0xff)?;
            socket.bind(SocketAddr::new(ip, 0)).map_err(|_| 0xff)?;
            socket.connect(proxy).await.map_err(|_| 0xff)?
        }
    };
    let method = if login.is_some() { 2 } else { 0 };
    tcp.write_all(&[5, 1, method]).await.map_err(|_| 0xff)?;
    let mut choice = [0u8; 2];
    tcp.read_exact(&mut choice).await.map_err(|_| 0xff)?;
    if choice != [5, method] {
        return Err(0xf1);
    }
    if let Some((user, password)) = login {
        let mut auth = vec![1, user.len() as u8];
        auth.extend_from_slice(user.as_bytes());
        auth.push(password.len() as u8);
        auth.extend_from_slice(password.as_bytes());
        tcp.write_all(&auth).await.map_err(|_| 0xff)?;
        let mut status = [0u8; 2];
        tcp.read_exact(&mut status).await.map_err(|_| 0xf1)?;
        if status[1] != 0 {
            return Err(0xf1);
        }
    }
    let SocketAddr::V4(v4) = target else {
        panic!("IPv4 targets only")
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.ip().octets());
    req.extend_from_slice(&v4.port().to_be_bytes());
    tcp.write_all(&req).await.map_err(|_| 0xff)?;
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply).await.map_err(|_| 0xff)?;
    if reply[1] != 0 {
        return Err(reply[1]);
    }
    Ok(tcp)
}

/// Deterministic pseudo-random bytes.
pub fn payload(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}
