//! The status page in headless Chromium: a cluster of two relays (each a `postern server` with
//! etcd) and three agents with traffic flowing shows its figures; the same page with its process
//! stopped by SIGSTOP says STALE.
//!
//! Chromium's `--dump-dom` and `--screenshot` fire at the page's load event, and its virtual time
//! stops while a fetch is pending (a stopped process never answers one). So the page is loaded in
//! real time through a small proxy that holds back the end of the HTML until the test has seen
//! what it waits for (polls answered; a poll abandoned by the page's own deadline), then lets the
//! load event fire.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::admin::Stopped;
use crate::support::*;

/// A proxy in front of an admin listener, for Chromium. Every request goes upstream on a
/// connection of its own; the page (`/`) is sent but for its end until [`PageProxy::release`].
struct PageProxy {
    url: String,
    /// `/api/status` answers delivered to the page.
    status_answers: Arc<AtomicUsize>,
    /// Requests the page gave up on while the upstream had not answered.
    abandoned: Arc<AtomicUsize>,
    release: tokio::sync::watch::Sender<bool>,
}

impl PageProxy {
    async fn start(upstream: SocketAddr) -> PageProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let status_answers = Arc::new(AtomicUsize::new(0));
        let abandoned = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let (answers, gave_up) = (status_answers.clone(), abandoned.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(proxy_one(
                    client,
                    upstream,
                    answers.clone(),
                    gave_up.clone(),
                    released.clone(),
                ));
            }
        });
        PageProxy {
            url,
            status_answers,
            abandoned,
            release,
        }
    }

    fn release(&self) {
        let _ = self.release.send(true);
    }
}

async fn proxy_one(
    mut client: TcpStream,
    upstream: SocketAddr,
    status_answers: Arc<AtomicUsize>,
    abandoned: Arc<AtomicUsize>,
    mut released: tokio::sync::watch::Receiver<bool>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let Some(path) = head.split_whitespace().nth(1).map(str::to_string) else {
        return;
    };
    let fetch = async {
        let mut up = TcpStream::connect(upstream).await?;
        up.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {upstream}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut answer = Vec::new();
        up.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::select! {
        answer = fetch => match answer {
            Ok(answer) => answer,
            Err(_) => return,
        },
        // The client closed (or wrote again) while the upstream had not answered.
        _ = client.read(&mut buf) => {
            abandoned.fetch_add(1, Ordering::SeqCst);
            return;
        }
    };
    if path == "/" {
        let text = String::from_utf8_lossy(&answer).to_string();
        let cut = text.rfind("</body>").unwrap_or(text.len());
        if client.write_all(&answer[..cut]).await.is_err() {
            return;
        }
        let _ = released.wait_for(|go| *go).await;
        let _ = client.write_all(&answer[cut..]).await;
        return;
    }
    if client.write_all(&answer).await.is_ok()
        && path == "/api/status"
        && answer.starts_with(b"HTTP/1.1 200")
    {
        status_answers.fetch_add(1, Ordering::SeqCst);
    }
}

/// Starts headless Chromium on `url` (real time), dumping the DOM at the load event and saving a
/// screenshot to `screenshot`.
fn chromium(url: &str, profile: &Path, screenshot: &Path) -> tokio::process::Child {
    tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-proxy-server",
            "--hide-scrollbars",
            &format!("--user-data-dir={}", profile.display()),
            "--window-size=1280,1600",
            &format!("--screenshot={}", screenshot.display()),
            "--dump-dom",
            url,
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("chromium is missing ({e}): install Debian's `chromium` package (scripts/deps does)")
        })
}

async fn chromium_dom(child: tokio::process::Child) -> String {
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("chromium to finish within 60s after the page was released")
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The text of the element with `id` (up to its first child tag).
fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element {id} in:\n{dom}"));
    let start = at + dom[at..].find('>').unwrap() + 1;
    let end = start + dom[start..].find('<').unwrap();
    &dom[start..end]
}

/// The row of a table whose `data-KEY` is `value`.
fn row<'a>(dom: &'a str, key: &str, value: &str) -> &'a str {
    let at = dom
        .find(&format!("data-{key}=\"{value}\""))
        .unwrap_or_else(|| panic!("no row for {key} {value} in:\n{dom}"));
    let end = at + dom[at..].find("</tr>").unwrap();
    &dom[at..end]
}

/// The cells of a table row, as text.
fn cells(row: &str) -> Vec<String> {
    row.split("<td")
        .skip(1)
        .map(|c| {
            let start = c.find('>').unwrap() + 1;
            let end = c.find("</td>").unwrap();
            c[start..end].replace("&amp;", "&")
        })
        .collect()
}

/// Copies a screenshot to `$POSTERN_SCREENSHOT_DIR` when it is set, for people to look at.
fn publish(shot: &Path) -> Option<PathBuf> {
    let dir = std::env::var_os("POSTERN_SCREENSHOT_DIR")?;
    std::fs::create_dir_all(&dir).unwrap();
    let to = Path::new(&dir).join(shot.file_name().unwrap());
    std::fs::copy(shot, &to).unwrap();
    Some(to)
}

/// 10.6: two relays, three agents (two with a tunnel to each relay, one on relay-b only), SOCKS5
/// traffic flowing with some errors and
/// refusals: the page of relay-a shows throughput, rates, tunnels, in-flight streams, both relays
/// with their tunnels and every agent with its relays and sessions, and draws both charts; with
/// relay-a stopped (SIGSTOP) the same page says STALE once its poll times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_the_cluster_figures_and_goes_stale_when_the_process_stops() {
    let w = Workdir::new("page-cluster");
    let etcd = Etcd::started(w.dir.path()).await;
    let net = 71;
    let mut servers = Vec::new();
    let mut relay_addrs = Vec::new();
    for id in ["relay-a", "relay-b"] {
        let port = free_udp_port();
        let cfg = w.write(
            &format!("{id}.toml"),
            &server_etcd_toml(&w, id, port, &etcd.url, net, "2s"),
        );
        let (proc, line) =
            Proc::postern(id, "server", &cfg, &[], &w.path(&format!("{id}.log"))).await;
        relay_addrs.push(SocketAddr::from(([127, 0, 0, 1], port)));
        servers.push((proc, line));
    }
    let socks5 = ready_addr(&servers[0].1, "socks5");
    let admin = ready_addr(&servers[0].1, "admin");

    let mut agents = Vec::new();
    let mut targets = Vec::new();
    let mut closed = Vec::new();
    for i in 0..3u8 {
        let ip = Ipv4Addr::new(127, net, 0, i + 1);
        let echo = Echo::start(ip).await;
        let refused = closed_port(ip);
        let id = format!("agent-{i}");
        // agent-2 holds one tunnel, to relay-b only: relay-a's front doors reach it through
        // relay-b, so relay-a's page has figures for a relay other than its own.
        let (relays, redundancy) = if i == 2 {
            (&relay_addrs[1..], 1)
        } else {
            (&relay_addrs[..], 2)
        };
        let cfg = w.write(
            &format!("{id}.toml"),
            &agent_toml(
                &w,
                &id,
                relays,
                ip,
                &[echo.addr.port(), refused],
                redundancy,
                "2s",
            ),
        );
        let (proc, _) = Proc::postern(&id, "agent", &cfg, &[], &w.path(&format!("{id}.log"))).await;
        targets.push(echo.addr);
        closed.push(SocketAddr::from((ip, refused)));
        agents.push((proc, echo));
    }
    wait_for(QUICK, "every agent's tunnels in etcd", || async {
        let routes = etcd.routes().await;
        targets
            .iter()
            .enumerate()
            .all(|(i, t)| {
                routes
                    .get(&t.ip())
                    .is_some_and(|r| r.len() == if i == 2 { 1 } else { 2 })
            })
            .then_some(())
    })
    .await;
    wait_for(
        QUICK,
        "relay-a's cache lists 3 agents, 2 relays, 5 routes",
        || async {
            let (_, body) = http_get(admin, "/api/status").await.ok()?;
            let s: serde_json::Value = serde_json::from_str(&body).ok()?;
            (s["agents"] == 3 && s["relays"] == 2 && s["routes"] == 5).then_some(())
        },
    )
    .await;

    // Traffic: byte-exact echoes to every agent, with a refused port (an error) and an address
    // without a route (a refusal) now and then.
    let stop = CancellationToken::new();
    let traffic = {
        let (stop, targets, closed) = (stop.clone(), targets.clone(), closed.clone());
        tokio::spawn(async move {
            let mut carried = 0usize;
            let mut round = 0u64;
            while !stop.is_cancelled() {
                for t in &targets {
                    echo_through(socks5, None, *t, 256 * 1024, round)
                        .await
                        .unwrap_or_else(|e| panic!("echo to {t}: {e}"));
                    carried += 1;
                }
                if round % 4 == 0 {
                    let refused = closed[(round / 4) as usize % closed.len()];
                    assert!(socks_connect(socks5, None, refused).await.is_err());
                    let unrouted = SocketAddr::from(([127, net, 9, 9], 80));
                    assert!(socks_connect(socks5, None, unrouted).await.is_err());
                }
                round += 1;
            }
            carried
        })
    };

    // The live page, released once it has shown four rate samples.
    let live_shot = w.path("status-live.png");
    let proxy = PageProxy::start(admin).await;
    let profile = tempfile::tempdir().unwrap();
    let browser = chromium(&proxy.url, profile.path(), &live_shot);
    wait_for(
        Duration::from_secs(40),
        "five status polls by the page",
        || async { (proxy.status_answers.load(Ordering::SeqCst) >= 5).then_some(()) },
    )
    .await;
    proxy.release();
    let dom = chromium_dom(browser).await;
    stop.cancel();
    let carried = traffic.await.unwrap();
    assert!(carried > 0);

    assert_eq!(text_of(&dom, "state"), "ready", "{dom}");
    assert!(text_of(&dom, "role").starts_with("server "), "{dom}");
    assert!(
        text_of(&dom, "updated").starts_with("last updated "),
        "{dom}"
    );
    let throughput = text_of(&dom, "fig-throughput");
    assert!(
        throughput.ends_with("/s") && !throughput.starts_with("0 B") && throughput != "—",
        "throughput {throughput:?}"
    );
    let since_start = |id: &str| -> u64 {
        text_of(&dom, id)
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{id}: {}", text_of(&dom, id)))
    };
    assert!(since_start("fig-connections-sub") > 0, "{dom}");
    assert!(since_start("fig-errors-sub") > 0, "{dom}");
    assert!(since_start("fig-refusals-sub") > 0, "{dom}");
    assert_ne!(text_of(&dom, "fig-errors"), "—");
    assert_ne!(text_of(&dom, "fig-refusals"), "—");
    assert_eq!(text_of(&dom, "fig-tunnels"), "2", "{dom}");
    assert!(
        text_of(&dom, "fig-in-flight").parse::<u64>().is_ok(),
        "{dom}"
    );
    assert_eq!(text_of(&dom, "fig-cluster"), "2 · 3 · 5", "{dom}");
    assert_eq!(text_of(&dom, "relay-count"), "2");
    for relay in ["relay-a", "relay-b"] {
        let c = cells(row(&dom, "relay", relay));
        assert_eq!(c[4], "up", "{relay}: {c:?}");
        let held = if relay == "relay-a" { "2" } else { "3" };
        assert_eq!(
            (c[5].as_str(), c[6].as_str()),
            (held, held),
            "{relay}: {c:?}"
        );
        if relay == "relay-a" {
            assert_eq!(c[0], "relay-a (this process)");
        }
        // Streams in flight and throughput for both: relay-a's own, and what relay-a's front
        // doors carry through relay-b (to agent-2).
        assert!(
            c[7].parse::<u64>().is_ok() && c[8].ends_with("/s"),
            "{relay}: {c:?}"
        );
        assert!(
            !c[8].starts_with("0 B"),
            "{relay}: no throughput through it: {c:?}"
        );
    }
    assert_eq!(text_of(&dom, "agent-count"), "3");
    for i in 0..3 {
        let c = cells(row(&dom, "agent", &format!("agent-{i}")));
        assert_eq!(c[2], format!("127.{net}.0.{}", i + 1), "{c:?}");
        if i == 2 {
            assert_eq!(c[3], "1", "{c:?}");
            assert!(
                c[4].starts_with("relay-b (") && !c[4].contains("relay-a"),
                "{c:?}"
            );
        } else {
            assert_eq!(c[3], "2", "{c:?}");
            assert!(
                c[4].contains("relay-a (") && c[4].contains("relay-b ("),
                "{c:?}"
            );
        }
    }
    for chart in ["chart-throughput", "chart-errors"] {
        let at = dom.find(&format!("id=\"{chart}\"")).unwrap();
        let svg = &dom[at..at + dom[at..].find("</svg>").unwrap()];
        assert_eq!(svg.matches("<polyline").count(), 2, "{chart}: {svg}");
    }
    assert!(!dom.contains("<body class=\"stale\">"), "{dom}");

    // Stopped: the page's next poll gets no answer; its deadline makes it say STALE.
    let stale_shot = w.path("status-stale.png");
    let proxy = PageProxy::start(admin).await;
    let profile = tempfile::tempdir().unwrap();
    let browser = chromium(&proxy.url, profile.path(), &stale_shot);
    wait_for(
        Duration::from_secs(40),
        "two status polls by the page",
        || async { (proxy.status_answers.load(Ordering::SeqCst) >= 2).then_some(()) },
    )
    .await;
    let stopped = Stopped::stop(&servers[0].0);
    wait_for(
        Duration::from_secs(20),
        "the page abandoning a poll",
        || async { (proxy.abandoned.load(Ordering::SeqCst) >= 1).then_some(()) },
    )
    .await;
    proxy.release();
    let dom = chromium_dom(browser).await;
    drop(stopped);
    assert!(dom.contains("<body class=\"stale\">"), "{dom}");
    assert_eq!(text_of(&dom, "state"), "STALE", "{dom}");
    let banner = text_of(&dom, "banner");
    assert!(
        banner.contains("stopped answering")
            && banner.contains("no answer within 3 s")
            && banner.contains("figures below are from"),
        "{banner}"
    );
    // The last figures stay, greyed.
    assert_eq!(text_of(&dom, "fig-tunnels"), "2", "{dom}");

    for shot in [&live_shot, &stale_shot] {
        let size = std::fs::metadata(shot).map(|m| m.len()).unwrap_or(0);
        assert!(size > 10_000, "{} is {size} bytes", shot.display());
        match publish(shot) {
            Some(copy) => println!("screenshot {} (copied to {})", shot.display(), copy.display()),
            None => println!(
                "screenshot {} (removed with the test's directory; set POSTERN_SCREENSHOT_DIR to keep a copy)",
                shot.display()
            ),
        }
    }
}
