//! Request framing for the HTTP proxy: the client's bytes reach hyper only through a [`Strict`]
//! reader whose [`Framer`] delimits heads and bodies by itself and checks each head in the strict
//! grammar (see the parent module), so no request is smuggled past the checks, pipelined or not.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the [`Framer`] concluded about one request head, in connection order.
pub(super) type Verdict = Result<(), &'static str>;

/// How the bytes after a valid head are delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body: the next bytes are the next head.
    None,
    /// A body of exactly this many bytes.
    Length(u64),
    /// A chunked body.
    Chunked,
    /// A CONNECT: the next bytes are a tunnel's or the next head, as the request's outcome decides.
    Connect,
}

/// Where the [`Framer`] is in the client's byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Reading a request head: `scanned` bytes of the input are searched, the current line starts
    /// at `line_start`, and `started` tells whether a non-empty line has been seen.
    Head {
        scanned: usize,
        line_start: usize,
        started: bool,
    },
    /// Inside a `Content-Length` body.
    Body { remaining: u64 },
    /// Inside a chunked body.
    Chunked(Chunk),
    /// A CONNECT head was handed over; nothing more until its outcome is known.
    Connect,
    /// A successful CONNECT: the bytes are the tunnel's and pass unexamined.
    Tunnel,
    /// A refused head was handed over: no further byte is handed over.
    Stopped,
}

/// The strict chunked-body grammar (RFC 9112 §7.1), byte by byte except for chunk data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    Size {
        digits: u8,
        size: u64,
    },
    Extension {
        len: usize,
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line); `total` trailer bytes so far.
    LineStart {
        total: usize,
    },
    Trailer {
        total: usize,
    },
    TrailerLf {
        total: usize,
    },
    EndLf,
}

/// Longest chunk size in hex digits (a `u64`).
const MAX_CHUNK_DIGITS: u8 = 16;
/// Longest chunk extension accepted on one size line.
const MAX_CHUNK_EXTENSION: usize = 4096;

/// Delimits the requests on one client connection by itself, and hands hyper only bytes it has
/// classified: a head only once it is complete and checked (its [`Verdict`] queued for
/// [`handle`]), a body only up to where its framing says it ends. hyper therefore never parses a
/// head this framer has not checked, however many requests arrive in one read, and a head hyper
/// is given always has its verdict in the queue, in the same order as hyper's requests.
///
/// A head is accepted only in the strict grammar (CRLF line endings, token names, no obs-fold,
/// unambiguous framing), on which every HTTP/1.1 parser agrees where it and its body end; anything
/// else is refused, and after a refused head nothing more is handed over.
pub(super) struct Framer {
    stage: Stage,
    /// Bytes read from the client and not yet classified.
    input: BytesMut,
    /// Bytes classified and not yet handed to hyper.
    output: BytesMut,
    /// One verdict per head handed over and not yet taken by [`handle`].
    verdicts: VecDeque<Verdict>,
    /// Largest head (and trailer section) accepted.
    max_head: usize,
    /// A chunked body broke its grammar: reads fail with this from now on.
    failed: Option<&'static str>,
    /// The reader waiting for a CONNECT's outcome.
    waker: Option<Waker>,
}

impl Framer {
    pub(super) fn new(max_head: usize) -> Self {
        Framer {
            stage: Stage::Head {
                scanned: 0,
                line_start: 0,
                started: false,
            },
            input: BytesMut::new(),
            output: BytesMut::new(),
            verdicts: VecDeque::new(),
            max_head,
            failed: None,
            waker: None,
        }
    }

    fn next_head() -> Stage {
        Stage::Head {
            scanned: 0,
            line_start: 0,
            started: false,
        }
    }

    /// Whether nothing can be handed over until [`handle`] decides (or ever).
    fn blocked(&self) -> bool {
        matches!(self.stage, Stage::Connect | Stage::Stopped)
    }

    /// Moves what can be classified from `input` to `output`.
    fn classify(&mut self) {
        while !self.input.is_empty() && self.failed.is_none() {
            match self.stage {
                Stage::Head { .. } => {
                    if !self.head() {
                        return;
                    }
                }
                Stage::Body { remaining } => {
                    let n = (self.input.len() as u64).min(remaining) as usize;
                    self.output.extend_from_slice(&self.input.split_to(n));
                    self.stage = if remaining == n as u64 {
                        Self::next_head()
                    } else {
                        Stage::Body {
                            remaining: remaining - n as u64,
                        }
                    };
                }
                Stage::Chunked(chunk) => self.chunked(chunk),
                Stage::Tunnel => {
                    let all = self.input.split();
                    self.output.extend_from_slice(&all);
                }
                Stage::Connect | Stage::Stopped => return,
            }
        }
    }

    /// Advances through a head; hands it over with its verdict once complete. Returns whether
    /// progress was made past the head.
    fn head(&mut self) -> bool {
        let Stage::Head {
            mut scanned,
            mut line_start,
            mut started,
        } = self.stage
        else {
            return false;
        };
        let mut end = None;
        while let Some(at) = self.input[scanned..].iter().position(|&b| b == b'\n') {
            let lf = scanned + at;
            scanned = lf + 1;
            // A line of nothing but CRs counts as empty, so this framer never finds the end of a
            // head later than a lenient parser would; such a head is refused anyway.
            let empty = self.input[line_start..lf].iter().all(|&b| b == b'\r');
            line_start = scanned;
            if !empty {
                started = true;
            } else if started {
                end = Some(scanned);
                break;
            }
        }
        let Some(end) = end else {
            scanned = self.input.len();
            if scanned > self.max_head {
                // hyper refuses a head this long by itself (431); hand it over to let it.
                self.refuse("request head too large");
            } else {
                self.stage = Stage::Head {
                    scanned,
                    line_start,
                    started,
                };
            }
            return false;
        };
        let head = self.input.split_to(end);
        let verdict = if end > self.max_head {
            Err("request head too large")
        } else {
            check_head(&head)
        };
        self.output.extend_from_slice(&head);
        match verdict {
            Ok(framing) => {
                self.verdicts.push_back(Ok(()));
                self.stage = match framing {
                    Framing::None | Framing::Length(0) => Self::next_head(),
                    Framing::Length(remaining) => Stage::Body { remaining },
                    Framing::Chunked => Stage::Chunked(Chunk::Size { digits: 0, size: 0 }),
                    Framing::Connect => Stage::Connect,
                };
                true
            }
            Err(reason) => {
                self.verdicts.push_back(Err(reason));
                self.stage = Stage::Stopped;
                false
            }
        }
    }

    /// Hands over the unfinished head with a refusal, and stops.
    fn refuse(&mut self, reason: &'static str) {
        let all = self.input.split();
        self.output.extend_from_slice(&all);
        self.verdicts.push_back(Err(reason));
        self.stage = Stage::Stopped;
    }

    /// Advances through a chunked body.
    fn chunked(&mut self, chunk: Chunk) {
        if let Chunk::Data { remaining } = chunk {
            let n = (self.input.len() as u64).min(remaining) as usize;
            self.output.extend_from_slice(&self.input.split_to(n));
            self.stage = Stage::Chunked(if remaining == n as u64 {
                Chunk::DataCr
            } else {
                Chunk::Data {
                    remaining: remaining - n as u64,
                }
            });
            return;
        }
        let byte = self.input[0];
        let next = match (chunk, byte) {
            (Chunk::Size { digits, size }, b) if b.is_ascii_hexdigit() => {
                if digits >= MAX_CHUNK_DIGITS {
                    Err("chunk size too long")
                } else {
                    // The digit check above makes the conversion infallible.
                    let value = (b as char).to_digit(16).unwrap_or(0);
                    Ok(Chunk::Size {
                        digits: digits + 1,
                        size: (size << 4) | u64::from(value),
                    })
                }
            }
            (Chunk::Size { digits, size }, b';') if digits > 0 => {
                Ok(Chunk::Extension { len: 0, size })
            }
            (Chunk::Size { digits, size }, b'\r') if digits > 0 => Ok(Chunk::SizeLf { size }),
            (Chunk::Size { .. }, _) => Err("invalid chunk size line"),
            (Chunk::Extension { size, .. }, b'\r') => Ok(Chunk::SizeLf { size }),
            (Chunk::Extension { .. }, b'\n') => Err("bare LF in a chunk size line"),
            (Chunk::Extension { len, size }, _) => {
                if len >= MAX_CHUNK_EXTENSION {
                    Err("chunk extension too long")
                } else {
                    Ok(Chunk::Extension { len: len + 1, size })
                }
            }
            (Chunk::SizeLf { size: 0 }, b'\n') => Ok(Chunk::LineStart { total: 0 }),
            (Chunk::SizeLf { size }, b'\n') => Ok(Chunk::Data { remaining: size }),
            (Chunk::DataCr, b'\r') => Ok(Chunk::DataLf),
            (Chunk::DataLf, b'\n') => Ok(Chunk::Size { digits: 0, size: 0 }),
            (Chunk::LineStart { .. }, b'\r') => Ok(Chunk::EndLf),
            (Chunk::LineStart { total } | Chunk::Trailer { total }, b) if b != b'\n' => {
                if total >= self.max_head {
                    Err("trailer section too large")
                } else if b == b'\r' {
                    Ok(Chunk::TrailerLf { total })
                } else {
                    Ok(Chunk::Trailer { total: total + 1 })
                }
            }
            (Chunk::TrailerLf { total }, b'\n') => Ok(Chunk::LineStart { total }),
            (Chunk::EndLf, b'\n') => {
                self.output.extend_from_slice(&self.input.split_to(1));
                self.stage = Self::next_head();
                return;
            }
            _ => Err("invalid chunked framing"),
        };
        match next {
            Ok(next) => {
                self.output.extend_from_slice(&self.input.split_to(1));
                self.stage = Stage::Chunked(next);
            }
            Err(reason) => self.failed = Some(reason),
        }
    }

    /// [`super::handle`] takes the verdict of the head hyper just parsed.
    pub(super) fn take_verdict(&mut self) -> Verdict {
        // hyper parses only heads handed over here, each with its verdict queued first.
        self.verdicts
            .pop_front()
            .unwrap_or(Err("request head not checked"))
    }

    /// What the framer holds when a CONNECT turns the connection into a tunnel: the bytes handed
    /// over but not yet read, then those not yet classified, in the client's order.
    pub(super) fn take_unread(&mut self) -> BytesMut {
        let mut unread = self.output.split();
        unread.extend_from_slice(&self.input.split());
        unread
    }

    /// A CONNECT's outcome: a tunnel (its bytes pass unexamined) or the next head.
    pub(super) fn connect_outcome(&mut self, tunnel: bool) {
        if self.stage == Stage::Connect {
            self.stage = if tunnel {
                Stage::Tunnel
            } else {
                Self::next_head()
            };
            if let Some(waker) = self.waker.take() {
                waker.wake();
            }
        }
    }
}

/// Checks a complete head (RFC 9112 §2–3, §5, §6) and finds how its body is delimited.
fn check_head(head: &[u8]) -> Result<Framing, &'static str> {
    // Every LF ends a CRLF, every CR starts one.
    for (i, &b) in head.iter().enumerate() {
        let bare = match b {
            b'\n' => i == 0 || head[i - 1] != b'\r',
            b'\r' => head.get(i + 1) != Some(&b'\n'),
            _ => false,
        };
        if bare {
            return Err("bare LF or CR line ending in the request head");
        }
    }
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .skip_while(|line| line.is_empty());
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line");
    };
    if method.is_empty() || !method.iter().copied().all(is_token) {
        return Err("malformed request method");
    }
    if target.is_empty() || !target.iter().all(|&b| (0x21..=0x7e).contains(&b)) {
        return Err("malformed request target");
    }
    let http10 = match version {
        b"HTTP/1.1" => false,
        b"HTTP/1.0" => true,
        _ => return Err("unsupported HTTP version"),
    };
    let mut length: Option<u64> = None;
    let mut codings = 0;
    let mut chunked = false;
    for line in lines.take_while(|line| !line.is_empty()) {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err("malformed header line");
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().copied().all(is_token) {
            // Includes obs-fold (a line starting with whitespace) and space before the colon.
            return Err("malformed header name");
        }
        if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err("control character in a header value");
        }
        let value = value.trim_ascii();
        if name.eq_ignore_ascii_case(b"content-length") {
            let parsed = (!value.is_empty() && value.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(value).ok()?.parse::<u64>().ok())
                .flatten()
                .ok_or("invalid Content-Length")?;
            if length.is_some_and(|l| l != parsed) {
                return Err("conflicting Content-Length values");
            }
            length = Some(parsed);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            codings += 1;
            chunked = value.eq_ignore_ascii_case(b"chunked");
        }
    }
    if codings > 0 && length.is_some() {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if codings > 1 || (codings == 1 && !chunked) {
        return Err("unsupported Transfer-Encoding (only a single \"chunked\" is accepted)");
    }
    if chunked && http10 {
        return Err("Transfer-Encoding in an HTTP/1.0 request");
    }
    if method == b"CONNECT" {
        if chunked || length.is_some_and(|l| l > 0) {
            return Err("CONNECT with a body");
        }
        return Ok(Framing::Connect);
    }
    Ok(match (length, chunked) {
        (Some(n), _) => Framing::Length(n),
        (None, true) => Framing::Chunked,
        (None, false) => Framing::None,
    })
}

/// `tchar` of RFC 9110 §5.6.2.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The client connection as hyper sees it: only what the [`Framer`] handed over.
pub(super) struct Strict<S> {
    pub(super) inner: S,
    pub(super) framer: Arc<Mutex<Framer>>,
    /// The watch of the exchange being answered: every write to the client is progress.
    pub(super) current: super::Current,
}

pub(super) fn lock(framer: &Mutex<Framer>) -> std::sync::MutexGuard<'_, Framer> {
    // The framer's state is consistent after every step: a poisoned lock still holds it.
    framer.lock().unwrap_or_else(|e| e.into_inner())
}

impl<S: AsyncRead + Unpin> AsyncRead for Strict<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            {
                let mut f = lock(&this.framer);
                f.classify();
                if !f.output.is_empty() {
                    let n = f.output.len().min(buf.remaining());
                    buf.put_slice(&f.output.split_to(n));
                    return Poll::Ready(Ok(()));
                }
                if let Some(reason) = f.failed {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        reason,
                    )));
                }
                if f.blocked() {
                    f.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            let read = buf.filled().len() - before;
            if read == 0 {
                // End of input; an unfinished head is never handed over.
                return Poll::Ready(Ok(()));
            }
            let mut f = lock(&this.framer);
            // Fast paths: bytes that stay inside a body or a tunnel are handed over in place.
            match f.stage {
                Stage::Tunnel => return Poll::Ready(Ok(())),
                Stage::Body { remaining } if read as u64 <= remaining => {
                    f.stage = if read as u64 == remaining {
                        Framer::next_head()
                    } else {
                        Stage::Body {
                            remaining: remaining - read as u64,
                        }
                    };
                    return Poll::Ready(Ok(()));
                }
                _ => {}
            }
            f.input.extend_from_slice(&buf.filled()[before..]);
            buf.set_filled(before);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Strict<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            super::progressed(&this.current);
        }
        poll
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` as separate reads; returns what was handed over and the verdicts.
    fn feed(chunks: &[&[u8]]) -> (Framer, Vec<u8>, Vec<Verdict>) {
        let mut f = Framer::new(8192);
        let mut out = Vec::new();
        let mut verdicts = Vec::new();
        for chunk in chunks {
            f.input.extend_from_slice(chunk);
            f.classify();
            out.extend_from_slice(&f.output.split());
            verdicts.extend(f.verdicts.drain(..));
        }
        (f, out, verdicts)
    }

    #[test]
    fn every_pipelined_head_is_checked() {
        let get = b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n".as_slice();
        let smuggle = b"POST http://a/ HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let all = [get, smuggle].concat();
        let (f, out, verdicts) = feed(&[&all]);
        assert_eq!(
            verdicts,
            vec![Ok(()), Err("both Content-Length and Transfer-Encoding")]
        );
        // The refused head is handed over (hyper dispatches it, `handle` answers 400); its body is not.
        assert_eq!(out, all[..all.len() - 5]);
        assert_eq!(f.stage, Stage::Stopped);

        // After a Content-Length body and after a chunked body, in the same read, with a bare LF.
        let post = b"POST http://a/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".as_slice();
        let chunked =
            b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n"
                .as_slice();
        let bare = b"GET http://a/ HTTP/1.1\nHost: a\r\n\r\n".as_slice();
        let (_, _, verdicts) = feed(&[&[post, chunked, bare].concat()]);
        assert_eq!(verdicts.len(), 3);
        assert!(verdicts[..2].iter().all(Result::is_ok), "{verdicts:?}");
        assert!(verdicts[2].is_err());

        // The same split byte by byte.
        let all = [post, chunked, bare].concat();
        let bytes: Vec<&[u8]> = all.chunks(1).collect();
        let (_, out, verdicts) = feed(&bytes);
        assert_eq!(out, all);
        assert_eq!(verdicts.len(), 3);
        assert!(verdicts[2].is_err());
    }

    #[test]
    fn a_head_is_handed_over_only_when_complete() {
        let (f, out, verdicts) = feed(&[b"GET http://a/ HTTP/1.1\r\nHost:", b" a\r\n"]);
        assert!(out.is_empty() && verdicts.is_empty());
        assert!(matches!(f.stage, Stage::Head { .. }));
        // Leading empty lines are allowed before a request line.
        let (_, out, verdicts) = feed(&[b"\r\nGET http://a/ HTTP/1.1\r\n\r\n"]);
        assert_eq!(verdicts, vec![Ok(())]);
        assert_eq!(out.len(), 28);
        // A head beyond the limit is refused.
        let long = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 9000]].concat();
        let (_, _, verdicts) = feed(&[&long]);
        assert_eq!(verdicts, vec![Err("request head too large")]);
    }

    #[test]
    fn strict_head_grammar() {
        let ok = |head: &str| check_head(head.as_bytes());
        assert_eq!(
            ok("GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Framing::None)
        );
        assert_eq!(
            ok("POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 005\r\n\r\n"),
            Ok(Framing::Length(5))
        );
        assert_eq!(
            ok("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(Framing::Chunked)
        );
        assert_eq!(ok("CONNECT a:1 HTTP/1.1\r\n\r\n"), Ok(Framing::Connect));
        for bad in [
            "GET / HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length : 4\r\n\r\n",
            "GET  / HTTP/1.1\r\n\r\n",
            "GET / HTTP/2\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 4, 4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +4\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "CONNECT a:1 HTTP/1.1\r\nContent-Length: 4\r\n\r\n",
        ] {
            assert!(ok(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn broken_chunked_framing_fails_the_read() {
        for body in [
            "4\nbody\r\n0\r\n\r\n",
            "4 \r\nbody\r\n0\r\n\r\n",
            "4\r\nbodyX\r\n0\r\n\r\n",
            "0\r\nT: 1\n\r\n",
            "x\r\n",
            "11111111111111111\r\n",
        ] {
            let head = b"POST http://a/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
            let (f, _, verdicts) =
                feed(&[head, body.as_bytes(), b"GET http://a/ HTTP/1.1\r\n\r\n"]);
            assert_eq!(verdicts, vec![Ok(())], "{body:?}");
            assert!(f.failed.is_some(), "{body:?}");
        }
    }

    #[test]
    fn a_connect_outcome_decides_what_follows() {
        let (mut f, _, verdicts) = feed(&[b"CONNECT a:1 HTTP/1.1\r\n\r\nGET / HTTP/1.1\n\n"]);
        assert_eq!(verdicts, vec![Ok(())]);
        assert!(f.blocked());
        f.connect_outcome(true);
        f.classify();
        // A tunnel's bytes are not requests.
        assert_eq!(&f.output[..], b"GET / HTTP/1.1\n\n");
        assert!(f.verdicts.is_empty());

        let (mut f, _, _) = feed(&[b"CONNECT a:1 HTTP/1.1\r\n\r\nGET / HTTP/1.1\n\n"]);
        f.connect_outcome(false);
        f.classify();
        assert_eq!(f.verdicts.len(), 1);
        assert!(f.verdicts[0].is_err());
    }
}
