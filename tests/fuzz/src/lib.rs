//! The three code paths postern exposes to hostile bytes, each as a function of one input: the frame
//! decoder, the SOCKS5 front door and the HTTP proxy front door. The libFuzzer targets in
//! `fuzz_targets/` call these, and so does the main crate's `tests/fuzz_regressions.rs` (which
//! includes this file by path), so every corpus and crash file replays through exactly the code
//! that was fuzzed, without libFuzzer or nightly.
//!
//! The front doors run the gateway's real `serve` over an in-memory stream: the input is what the
//! client sends, then EOF; the gateway's answer is read to the end. The route cache is empty, so
//! every target is refused after parsing, authentication and the rules — nothing is ever dialled.
//! Each input is served twice: by an open gateway and by one with a user, so both authentication
//! paths are reached.

pub mod relay_control;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Wake, Waker};
use std::time::Duration;

use postern::config::{GatewayConfig, Secret, User};
use postern::gateway::{http, socks, Gateway};
use postern::protocol::{self, Message};
use postern::registry::cache::RouteCache;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

/// Short, so an input that stalls a handshake costs little (each input ends, so few wait at all).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(250);
/// How long a gateway may serve one input before it counts as hung: well above every deadline on
/// these paths (the handshake's, and nothing is ever opened).
const HANG_LIMIT: Duration = Duration::from_secs(10);
/// Buffer of the in-memory connection: small, so the gateway sees its input in several reads.
const DUPLEX_BUFFER: usize = 512;
/// The buffer for replaying frames: tiny, so a frame arrives in pieces.
const FRAME_DUPLEX_BUFFER: usize = 3;
/// The user of the guarded gateway; the seeds that authenticate use these credentials.
pub const USER: &str = "alice";
pub const PASSWORD: &str = "s3cret";

struct Harness {
    runtime: Runtime,
    /// No users, no rules: no-auth and any-password SOCKS5, anonymous HTTP.
    open: Arc<Gateway>,
    /// One user: SOCKS5 offers only username/password, HTTP answers 407 without credentials.
    guarded: Arc<Gateway>,
}

/// One runtime and the gateways for the whole process (the fuzzer runs millions of inputs).
fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let gateway = |users: Vec<User>| {
            let config = GatewayConfig {
                socks5: None,
                http: None,
                handshake_timeout: HANDSHAKE_TIMEOUT,
                users,
                ..Default::default()
            };
            let bound = runtime
                .block_on(Gateway::bind(
                    config,
                    Arc::new(RouteCache::new()),
                    None,
                    None,
                ))
                .expect("a gateway without listeners binds nothing");
            Arc::new(bound)
        };
        let open = gateway(Vec::new());
        let guarded = gateway(vec![User {
            name: USER.to_string(),
            password: Secret::new(PASSWORD),
        }]);
        Harness {
            runtime,
            open,
            guarded,
        }
    })
}

/// The client address the gateways see.
fn client() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 40_000))
}

/// Decodes `data` as a stream of frames with [`protocol::decode`], and with both stream readers
/// ([`protocol::read_message`], [`protocol::FrameReader`]) on a byte slice and over a tiny duplex;
/// checks that they all agree and that every decoded message survives re-encoding. Panics only if
/// one of those breaks.
pub fn protocol_decode(data: &[u8]) {
    // The buffer decoder, frame after frame as a reader would consume them.
    let mut decoded = Vec::new();
    let mut rest = data;
    let buffer_end = loop {
        match protocol::decode(rest) {
            Ok(Some((msg, used))) => {
                assert!(
                    used > 0 && used <= rest.len(),
                    "decode consumed {used} of {}",
                    rest.len()
                );
                let frame = protocol::encode(&msg).expect("a decoded message re-encodes");
                match protocol::decode(&frame) {
                    Ok(Some((again, n))) => {
                        assert_eq!(again, msg, "re-encoded message decodes differently");
                        assert_eq!(n, frame.len());
                    }
                    other => panic!("re-encoded frame does not decode: {other:?}"),
                }
                decoded.push(msg);
                rest = &rest[used..];
            }
            Ok(None) => break None,
            Err(err) => break Some(err),
        }
    };

    // The stream readers — `read_message` and the cancel-safe `FrameReader` — over a slice, then
    // over a duplex that hands them three bytes at a time.
    let runtime = &harness().runtime;
    for reader in [Reader::Message, Reader::Frames] {
        let from_slice = runtime.block_on(async {
            let mut input = data;
            read_all(reader, &mut input).await
        });
        let from_duplex = runtime.block_on(async {
            let (mut writer, input) = tokio::io::duplex(FRAME_DUPLEX_BUFFER);
            let send = async {
                // The reader stops at the first bad frame and drops its end: the rest is not written.
                let _ = writer.write_all(data).await;
                drop(writer);
            };
            let read = async move {
                let mut input = input;
                read_all(reader, &mut input).await
            };
            tokio::join!(send, read).1
        });
        for (over, (messages, error)) in [("slice", from_slice), ("duplex", from_duplex)] {
            assert_eq!(
                messages, decoded,
                "{reader:?} over a {over} and decode disagree on the messages"
            );
            assert!(
                same_end(reader, &buffer_end, &error, rest.len()),
                "decode ended with {buffer_end:?} but {reader:?} over a {over} with {error:?}"
            );
        }
    }
}

/// The two ways to read frames from a stream.
#[derive(Clone, Copy, Debug)]
enum Reader {
    /// [`protocol::read_message`]: exact reads, never past a frame.
    Message,
    /// [`protocol::FrameReader`]: buffered, cancel-safe, decodes with [`protocol::decode`].
    Frames,
}

/// Reads frames until the first error; a stream that ends between frames ends in `Truncated`.
async fn read_all<R: tokio::io::AsyncRead + Unpin>(
    reader: Reader,
    input: &mut R,
) -> (Vec<Message>, protocol::Error) {
    let mut messages = Vec::new();
    let mut frames = protocol::FrameReader::default();
    loop {
        let next = match reader {
            Reader::Message => protocol::read_message(input).await,
            Reader::Frames => frames.next(input).await,
        };
        match next {
            Ok(msg) => messages.push(msg),
            Err(err) => return (messages, err),
        }
    }
}

/// Whether a stream reader stopped for the reason [`protocol::decode`] stopped on the bytes left
/// (`left` of them): a prefix of a frame (or nothing) is the end of the stream, a bad frame is the
/// same error. `read_message` reads a whole header before it checks the version, so a wrong
/// version in a partial header is only a short read to it.
fn same_end(
    reader: Reader,
    decoded: &Option<protocol::Error>,
    read: &protocol::Error,
    left: usize,
) -> bool {
    use protocol::Error::*;
    match (decoded, read) {
        (None, Truncated) => true,
        (Some(Version(_)), Truncated) => matches!(reader, Reader::Message) && left < 5,
        (Some(Version(a)), Version(b)) => a == b,
        (Some(TooLarge(a)), TooLarge(b)) => a == b,
        (Some(Malformed(_)), Malformed(_)) => true,
        _ => false,
    }
}

/// Runs the SOCKS5 front door on `data` as the client's bytes; returns each gateway's answer
/// (open gateway first).
pub fn socks5_handshake(data: &[u8]) -> [Vec<u8>; 2] {
    let h = harness();
    [&h.open, &h.guarded].map(|gateway| {
        h.runtime.block_on(exchange(data, |stream| {
            socks::serve(gateway.clone(), stream, client())
        }))
    })
}

/// Runs the HTTP proxy front door on `data` as the client's request stream; returns each gateway's
/// response bytes (open gateway first).
pub fn http_request(data: &[u8]) -> [Vec<u8>; 2] {
    let h = harness();
    [&h.open, &h.guarded].map(|gateway| {
        h.runtime.block_on(exchange(data, |stream| {
            http::serve(gateway.clone(), stream, client(), CancellationToken::new())
        }))
    })
}

/// Serves one in-memory connection: the client writes `data`, waits until the gateway has acted on
/// everything it could, then half-closes and reads the answer to the end (the gateway dropping its
/// side). Half-closing at once instead would make hyper drop requests in flight unanswered (it
/// does not support client half-close). A gateway still serving long after the client left is a
/// hang, reported as a panic.
async fn exchange<F, Fut>(data: &[u8], serve: F) -> Vec<u8>
where
    F: FnOnce(DuplexStream) -> Fut,
    Fut: Future<Output = ()>,
{
    let (client, server) = tokio::io::duplex(DUPLEX_BUFFER);
    let (mut reader, mut writer) = tokio::io::split(client);
    let activity = Arc::new(AtomicBool::new(false));
    let served = watched(activity.clone(), async {
        if tokio::time::timeout(HANG_LIMIT, serve(server))
            .await
            .is_err()
        {
            panic!("the gateway still served the connection {HANG_LIMIT:?} after the input");
        }
    });
    let receive = watched(activity.clone(), async {
        let mut answer = Vec::new();
        let _ = reader.read_to_end(&mut answer).await;
        answer
    });
    let send = async {
        // The gateway may hang up before reading everything: the rest is simply not sent.
        let _ = writer.write_all(data).await;
        // Settle: yield until two rounds pass in which neither the gateway nor the reader was
        // woken. Everything runs in this one task, so then the gateway waits for more input (or
        // for one of its timers).
        let mut quiet = 0;
        while quiet < 2 {
            tokio::task::yield_now().await;
            quiet = if activity.swap(false, Ordering::SeqCst) {
                0
            } else {
                quiet + 1
            };
        }
        let _ = writer.shutdown().await;
    };
    let ((), (), answer) = tokio::join!(served, send, receive);
    answer
}

/// Wraps `future` so that every wake-up it receives sets `activity`.
fn watched<F: Future>(activity: Arc<AtomicBool>, future: F) -> impl Future<Output = F::Output> {
    struct FlagWaker {
        activity: Arc<AtomicBool>,
        task: Waker,
    }
    impl Wake for FlagWaker {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.activity.store(true, Ordering::SeqCst);
            self.task.wake_by_ref();
        }
    }
    let mut future = Box::pin(future);
    std::future::poll_fn(move |cx| {
        let waker = Waker::from(Arc::new(FlagWaker {
            activity: activity.clone(),
            task: cx.waker().clone(),
        }));
        future.as_mut().poll(&mut Context::from_waker(&waker))
    })
}
