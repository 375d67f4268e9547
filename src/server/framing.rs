//! An audit of HTTP/1 request framing on the raw inbound byte stream.
//!
//! hyper resolves a request that carries both `Content-Length` and `Transfer-Encoding` the
//! RFC 9112 §6.3 way — chunked wins, `Content-Length` is removed, the connection closes
//! after the response — so by the time the pipeline sees the request the ambiguity is
//! gone. Such a request is a smuggling attempt or a broken client, and the proxy must
//! refuse it (400) rather than guess. [`AuditedStream`] watches the bytes hyper reads,
//! follows request heads and bodies with `httparse` (the parser hyper itself uses), and
//! records per request whether its head was ambiguous. The connection's service takes the
//! records in order ([`FramingRecords::next`]), one per request.
//!
//! It also enforces `server.limits.max_header_bytes` on HTTP/1 request heads, so that the
//! 431 answer is the proxy's own (JSON, with `X-Request-Id`) rather than hyper's bare one:
//! a head that has not arrived whole is held back from hyper until it has; one that grows
//! beyond the limit (or has more header fields than hyper takes) is never handed over.
//! hyper gets a stand-in head (the same method and path, no fields) recorded as
//! [`Framing::head_too_large`], the pipeline answers 431 with `Connection: close`, and
//! whatever the peer still sends is read and dropped until hyper closes the connection.
//!
//! The audit only ever adds a refusal; when it cannot follow the stream (HTTP/2, a head
//! hyper will reject anyway, anything unexpected) it stops and records nothing more.

use std::collections::VecDeque;
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::proxy::Framing;

/// Header fields hyper accepts in one HTTP/1 request head (its `max_headers` default);
/// more is answered 431 here, as an oversized head.
const MAX_HEADER_FIELDS: usize = 100;
/// Slots httparse gets: enough to count past [`MAX_HEADER_FIELDS`].
const PARSE_SLOTS: usize = 128;
/// Longest path kept in a stand-in head (for the access log); longer ones become `/`.
const MAX_STAND_IN_PATH: usize = 2048;

/// The per-request records of one connection, in request order.
#[derive(Debug, Clone, Default)]
pub(crate) struct FramingRecords(Arc<Mutex<VecDeque<Framing>>>);

impl FramingRecords {
    /// The record of the next request hyper hands to the service; default when the audit
    /// stopped following the stream.
    pub(crate) fn next(&self) -> Framing {
        self.0
            .lock()
            .map(|mut queue| queue.pop_front())
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    fn push(&self, framing: Framing) {
        if let Ok(mut queue) = self.0.lock() {
            queue.push_back(framing);
        }
    }
}

#[derive(Debug)]
enum State {
    /// Reading a request head (after optional empty lines).
    Head,
    /// Skipping a fixed-length body.
    Body(u64),
    /// Reading a chunk-size line: the size so far and whether a digit was seen.
    ChunkSize(u64, bool),
    /// After the size: skipping a chunk extension up to the line end.
    ChunkExtension(u64),
    ChunkData(u64),
    /// Expecting the CRLF after chunk data.
    ChunkDataEnd,
    /// In the trailer section: at the start of a line (true) or inside one.
    Trailers(bool),
    /// Not following the stream any more.
    Off,
    /// A head was refused as too large: nothing after it reaches hyper.
    Refused,
}

/// What to hand hyper of one read.
#[derive(Debug, Default)]
struct Verdict {
    /// Bytes held from earlier reads (a head that is now complete, or that the audit gave
    /// up following), to hand over before this read's.
    release: Vec<u8>,
    /// How many bytes of this read to hand over, from its start; the rest is held (the
    /// start of a head) or dropped (after a refused head).
    pass: usize,
    /// A head was refused: this stand-in follows `pass`, then nothing more.
    stand_in: Option<Vec<u8>>,
}

/// How far a request head could be parsed.
enum Parsed {
    Complete(usize),
    Partial,
    /// Unreadable: the audit is off.
    Off,
    TooLarge,
}

#[derive(Debug)]
struct Audit {
    state: State,
    /// The start of a head that has not arrived whole; held back from hyper.
    head: Vec<u8>,
    records: FramingRecords,
    /// Request heads seen so far.
    heads: u64,
    /// `server.limits.max_header_bytes`: the largest head handed to hyper.
    max_head: usize,
    verdict: Verdict,
}

impl Audit {
    fn new(records: FramingRecords, max_head: usize) -> Self {
        Self {
            state: State::Head,
            head: Vec::new(),
            records,
            heads: 0,
            max_head,
            verdict: Verdict::default(),
        }
    }

    /// Follows one read; says what of it (and of earlier held bytes) hyper gets now.
    fn observe(&mut self, chunk: &[u8]) -> Verdict {
        self.verdict = Verdict {
            pass: chunk.len(),
            ..Verdict::default()
        };
        let mut bytes = chunk;
        while !bytes.is_empty() {
            let at = chunk.len() - bytes.len();
            bytes = match self.state {
                State::Off | State::Refused => break,
                State::Head => self.head_bytes(bytes, at),
                State::Body(remaining) => {
                    let take = remaining.min(bytes.len() as u64);
                    self.state = if take == remaining {
                        State::Head
                    } else {
                        State::Body(remaining - take)
                    };
                    &bytes[take as usize..]
                }
                State::ChunkData(remaining) => {
                    let take = remaining.min(bytes.len() as u64);
                    self.state = if take == remaining {
                        State::ChunkDataEnd
                    } else {
                        State::ChunkData(remaining - take)
                    };
                    &bytes[take as usize..]
                }
                _ => {
                    self.chunk_byte(bytes[0]);
                    &bytes[1..]
                }
            };
        }
        std::mem::take(&mut self.verdict)
    }

    /// Head bytes starting at offset `at` of the current read.
    fn head_bytes<'a>(&mut self, bytes: &'a [u8], at: usize) -> &'a [u8] {
        let mut bytes = bytes;
        if self.head.is_empty() {
            // RFC 9112 §2.2: empty lines before a request line are ignored.
            let skip = bytes
                .iter()
                .take_while(|b| matches!(b, b'\r' | b'\n'))
                .count();
            bytes = &bytes[skip..];
            if bytes.is_empty() {
                return bytes;
            }
            let start = at + skip;
            // Nearly always the whole head arrived in one read: parse it in place.
            return match self.parse_head(bytes) {
                Parsed::Complete(len) => &bytes[len..],
                Parsed::Off => &[],
                Parsed::TooLarge => {
                    self.refuse(bytes, start);
                    &[]
                }
                Parsed::Partial if bytes.len() > self.max_head => {
                    self.refuse(bytes, start);
                    &[]
                }
                // Held until it is whole: hyper gets complete heads only.
                Parsed::Partial => {
                    self.head.extend_from_slice(bytes);
                    self.verdict.pass = start;
                    &[]
                }
            };
        }
        let before = self.head.len();
        self.head.extend_from_slice(bytes);
        let mut head = std::mem::take(&mut self.head);
        match self.parse_head(&head) {
            // The buffer is dropped: a split head is rare, and an idle connection
            // should not keep its capacity.
            Parsed::Complete(len) => {
                head.truncate(before);
                self.verdict.release = head;
                &bytes[len - before..]
            }
            Parsed::Off => {
                head.truncate(before);
                self.verdict.release = head;
                &[]
            }
            Parsed::Partial if head.len() <= self.max_head => {
                self.head = head;
                self.verdict.pass = at;
                &[]
            }
            Parsed::Partial | Parsed::TooLarge => {
                self.refuse(&head, at);
                &[]
            }
        }
    }

    /// Gives up on `head` (which starts at offset `at` of the current read, or before it)
    /// as too large: records it, and hands hyper a stand-in instead.
    fn refuse(&mut self, head: &[u8], at: usize) {
        self.state = State::Refused;
        self.head = Vec::new();
        self.heads += 1;
        self.records.push(Framing {
            ambiguous_length: false,
            head_too_large: true,
        });
        self.verdict.pass = at;
        self.verdict.stand_in = Some(stand_in(head));
    }

    /// Parses a request head at the start of `bytes`. When complete and within the
    /// limits, records its framing and moves on to its body; when unreadable, stops
    /// following the stream (hyper rejects it anyway).
    fn parse_head(&mut self, bytes: &[u8]) -> Parsed {
        let mut headers = [httparse::EMPTY_HEADER; PARSE_SLOTS];
        let mut request = httparse::Request::new(&mut headers);
        let len = match request.parse(bytes) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Parsed::Partial,
            Err(httparse::Error::TooManyHeaders) => return Parsed::TooLarge,
            Err(_) => {
                self.state = State::Off;
                return Parsed::Off;
            }
        };
        if len > self.max_head || request.headers.len() > MAX_HEADER_FIELDS {
            return Parsed::TooLarge;
        }
        let mut content_length_header = false;
        let mut content_length = None;
        let mut transfer_encoding = false;
        let mut valid = true;
        for header in request.headers.iter() {
            if header.name.eq_ignore_ascii_case("content-length") {
                content_length_header = true;
                let parsed = std::str::from_utf8(header.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
                valid &= parsed.is_some();
                content_length = content_length.or(parsed);
            } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encoding = true;
            }
        }
        // hyper skips a Content-Length after Transfer-Encoding without parsing it, so any
        // Content-Length at all makes the head ambiguous.
        self.heads += 1;
        self.records.push(Framing {
            ambiguous_length: transfer_encoding && content_length_header,
            head_too_large: false,
        });
        self.state = if transfer_encoding {
            State::ChunkSize(0, false)
        } else if !valid {
            State::Off
        } else {
            match content_length {
                Some(0) | None => State::Head,
                Some(len) => State::Body(len),
            }
        };
        Parsed::Complete(len)
    }

    fn chunk_byte(&mut self, byte: u8) {
        self.state = match self.state {
            State::ChunkSize(size, seen) => match (byte as char).to_digit(16) {
                Some(digit) => match size.checked_mul(16) {
                    Some(size) => State::ChunkSize(size + u64::from(digit), true),
                    None => State::Off,
                },
                None if !seen => State::Off,
                None if byte == b'\n' => chunk_start(size),
                None => State::ChunkExtension(size),
            },
            State::ChunkExtension(size) if byte == b'\n' => chunk_start(size),
            State::ChunkExtension(size) => State::ChunkExtension(size),
            State::ChunkDataEnd if byte == b'\r' => State::ChunkDataEnd,
            State::ChunkDataEnd if byte == b'\n' => State::ChunkSize(0, false),
            State::Trailers(true) if byte == b'\r' => State::Trailers(true),
            State::Trailers(true) if byte == b'\n' => State::Head,
            State::Trailers(_) if byte == b'\n' => State::Trailers(true),
            State::Trailers(_) => State::Trailers(false),
            _ => State::Off,
        };
    }
}

/// The request line of a refused head, without its fields or query: what the access log
/// shows for it. Method and path are kept when they are short and well-formed.
fn stand_in(head: &[u8]) -> Vec<u8> {
    let mut no_fields: [httparse::Header<'_>; 0] = [];
    let mut request = httparse::Request::new(&mut no_fields);
    // Incomplete or not, httparse fills in the method and path as far as it got.
    let _ = request.parse(head);
    let method = request.method.filter(|m| m.len() <= 32).unwrap_or("GET");
    let path = request
        .path
        .and_then(|target| target.split('?').next())
        .filter(|path| {
            path.starts_with('/')
                && path.len() <= MAX_STAND_IN_PATH
                && path.parse::<http::uri::PathAndQuery>().is_ok()
        })
        .unwrap_or("/");
    format!("{method} {path} HTTP/1.1\r\n\r\n").into_bytes()
}

fn chunk_start(size: u64) -> State {
    if size == 0 {
        State::Trailers(true)
    } else {
        State::ChunkData(size)
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The first read of a connection, kept for hyper: just enough to tell the HTTP/2
/// preface from anything else. A connection that sends nothing holds this buffer while it
/// waits (10,000 silent connections: 4 KiB each was 40 MiB); hyper reads the rest of the
/// first head itself, one more read on a new HTTP/1 connection.
const FIRST_READ: usize = H2_PREFACE.len();

/// The protocol of a connection, told from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c), or after ALPN `h2`: it starts with the preface.
    Http2,
}

/// A connection whose inbound bytes are audited on their way to hyper.
///
/// It also bounds the time before the first request head: hyper's own
/// `header_read_timeout` only starts once HTTP/1 was chosen, so a peer that sends nothing
/// (or half an HTTP/2 preface) would otherwise hold a connection slot forever. And it
/// tells HTTP/1 from HTTP/2 ([`AuditedStream::protocol`]), keeping the bytes it read for
/// hyper: unlike hyper-util's `auto` detection, which hands hyper the first 24 bytes on
/// their own, so hyper's read buffer starts partly filled and grows to 16 KiB.
#[derive(Debug)]
pub(crate) struct AuditedStream<S> {
    inner: S,
    audit: Audit,
    /// Until the first request head (or the whole HTTP/2 preface) has arrived.
    first_bytes_deadline: Option<Pin<Box<Sleep>>>,
    /// Audited bytes not yet handed to the reader: those [`Self::protocol`] read, a held
    /// head once complete, the stand-in of a refused one.
    ready: Vec<u8>,
    ready_at: usize,
    /// After `ready`, the reader gets nothing more (a refused head); what the peer still
    /// sends is dropped. Never the end of the stream: hyper would drop its answer then.
    refused: bool,
    /// The peer closed its side after a refused head.
    peer_done: bool,
}

impl<S> AuditedStream<S> {
    /// `first_request_within`: how long the peer has to send its first request head;
    /// `max_head`: the largest request head handed on (`server.limits.max_header_bytes`).
    pub(crate) fn new(
        inner: S,
        first_request_within: Duration,
        max_head: usize,
    ) -> (Self, FramingRecords) {
        let records = FramingRecords::default();
        let stream = Self {
            inner,
            audit: Audit::new(records.clone(), max_head),
            first_bytes_deadline: Some(Box::pin(tokio::time::sleep(first_request_within))),
            ready: Vec::new(),
            ready_at: 0,
            refused: false,
            peer_done: false,
        };
        (stream, records)
    }

    /// Copies what `ready` holds into `buf`, as much as fits.
    fn hand_over(&mut self, buf: &mut ReadBuf<'_>) {
        let rest = &self.ready[self.ready_at..];
        let take = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..take]);
        self.ready_at += take;
        if self.ready_at == self.ready.len() {
            self.ready = Vec::new();
            self.ready_at = 0;
        }
    }
}

impl<S: AsyncRead + Unpin> AuditedStream<S> {
    /// Reads the connection's first bytes — as many as the peer sent, up to [`FIRST_READ`]
    /// — and tells the protocol from them: the HTTP/2 preface, or anything else. The bytes
    /// are read again by whoever reads this stream next. `None`: the peer closed the
    /// connection without sending a byte.
    pub(crate) async fn protocol(&mut self) -> io::Result<Option<Protocol>> {
        let mut first = vec![0; FIRST_READ];
        let mut filled = 0;
        let protocol = loop {
            let read = std::future::poll_fn(|cx| {
                let mut buf = ReadBuf::new(&mut first[filled..]);
                ready!(self.poll_next(cx, &mut buf))?;
                Poll::Ready(Ok::<_, io::Error>(buf.filled().len()))
            })
            .await?;
            if read == 0 {
                break (filled > 0).then_some(Protocol::Http1);
            }
            filled += read;
            let seen = filled.min(H2_PREFACE.len());
            if first[..seen] != H2_PREFACE[..seen] {
                break Some(Protocol::Http1);
            }
            if seen == H2_PREFACE.len() {
                // HTTP/2 has no request head to wait for: the preface was the first request.
                self.first_bytes_deadline = None;
                break Some(Protocol::Http2);
            }
            // A strict prefix of the preface: wait for more (bounded by the deadline).
        };
        first.truncate(filled);
        // Read again first, then whatever was audited but not yet read.
        first.extend_from_slice(&self.ready[self.ready_at..]);
        self.ready = first;
        self.ready_at = 0;
        Ok(protocol)
    }

    /// The next bytes for the reader: audited ones waiting, else a read of the connection.
    fn poll_next(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.ready_at < self.ready.len() {
            self.hand_over(buf);
            return Poll::Ready(Ok(()));
        }
        if self.refused {
            return self.poll_discard(cx);
        }
        self.poll_audited(cx, buf)
    }

    /// Reads from the connection itself, auditing what arrives. Bytes of a head that has
    /// not arrived whole are held back, and the read goes on.
    fn poll_audited(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(deadline) = self.first_bytes_deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request within the header read timeout",
            )));
        }
        loop {
            let before = buf.filled().len();
            ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
            let read = &buf.filled()[before..];
            if read.is_empty() {
                // The end: a held partial head goes to hyper after all (which drops it).
                if !self.audit.head.is_empty() {
                    self.audit.state = State::Off;
                    self.ready = std::mem::take(&mut self.audit.head);
                    self.ready_at = 0;
                    self.hand_over(buf);
                }
                return Poll::Ready(Ok(()));
            }
            let verdict = self.audit.observe(read);
            if self.first_bytes_deadline.is_some() && self.audit.heads > 0 {
                self.first_bytes_deadline = None;
            }
            if verdict.release.is_empty()
                && verdict.pass == read.len()
                && verdict.stand_in.is_none()
            {
                return Poll::Ready(Ok(()));
            }
            // Rare: a head split over reads, or refused. Rearrange what hyper gets.
            let read = read.to_vec();
            buf.set_filled(before);
            let mut ready = verdict.release;
            ready.extend_from_slice(&read[..verdict.pass]);
            if let Some(stand_in) = verdict.stand_in {
                ready.extend_from_slice(&stand_in);
                self.refused = true;
            }
            if !ready.is_empty() {
                self.ready = ready;
                self.ready_at = 0;
                self.hand_over(buf);
                return Poll::Ready(Ok(()));
            }
            // All of it is held: read on (Pending registers for more).
        }
    }

    /// After a refused head: reads and drops what the peer still sends (so that closing
    /// the connection does not reset it before the peer read the answer), and never
    /// yields a byte or the end of the stream.
    fn poll_discard(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut scratch = [0u8; 4096];
        for _ in 0..16 {
            if self.peer_done {
                return Poll::Pending;
            }
            let mut buf = ReadBuf::new(&mut scratch);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut buf))?;
            self.peer_done = buf.filled().is_empty();
        }
        // Let other work run; come back for the rest.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuditedStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().poll_next(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuditedStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes and returns the records.
    fn audit(input: &[u8], step: usize) -> (Vec<Framing>, bool) {
        let records = FramingRecords::default();
        let mut audit = Audit::new(records.clone(), LIMIT);
        for piece in input.chunks(step) {
            audit.observe(piece);
        }
        let off = matches!(audit.state, State::Off);
        let found = records.0.lock().unwrap().iter().copied().collect();
        (found, off)
    }

    /// The `max_header_bytes` of these tests.
    const LIMIT: usize = 32 * 1024;
    const PLAIN: Framing = Framing {
        ambiguous_length: false,
        head_too_large: false,
    };
    const AMBIGUOUS: Framing = Framing {
        ambiguous_length: true,
        head_too_large: false,
    };
    const TOO_LARGE: Framing = Framing {
        ambiguous_length: false,
        head_too_large: true,
    };

    #[test]
    fn follows_pipelined_requests_with_all_body_framings() {
        let input = b"\r\nGET /a HTTP/1.1\r\nHost: p\r\n\r\n\
            POST /b HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n\r\nGET /\
            POST /c HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n\
            5;ext=1\r\nGET /\r\n3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n\
            GET /d HTTP/1.1\nHost: p\n\n";
        for step in [1, 2, 7, input.len()] {
            assert_eq!(audit(input, step), (vec![PLAIN; 4], false), "step {step}");
        }
    }

    #[test]
    fn flags_content_length_with_transfer_encoding_in_either_order() {
        let cl_first = b"POST /x HTTP/1.1\r\nHost: p\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /y HTTP/1.1\r\nHost: p\r\n\r\n";
        let te_first = b"POST /x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\n";
        // Whole heads in one read are parsed in place; split ones are gathered first.
        for step in [1, 3, usize::MAX] {
            assert_eq!(audit(cl_first, step), (vec![AMBIGUOUS, PLAIN], false));
            assert_eq!(audit(te_first, step), (vec![AMBIGUOUS], false));
        }
        // hyper never parses a Content-Length after Transfer-Encoding: garbage counts too.
        for value in ["abc", "99999999999999999999999", ""] {
            let head = format!(
                "POST /x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\nContent-Length: {value}\r\n\r\n0\r\n\r\n"
            );
            assert_eq!(audit(head.as_bytes(), 2).0, vec![AMBIGUOUS], "{value:?}");
        }
    }

    #[test]
    fn stops_following_what_it_cannot_parse() {
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert_eq!(audit(h2, 5), (vec![], true));
        assert_eq!(audit(h2, usize::MAX), (vec![], true));
        let bad_chunk = b"POST /x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert_eq!(audit(bad_chunk, 4), (vec![PLAIN], true));
        let overflow = b"POST /x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF1\r\n";
        assert_eq!(audit(overflow, 100), (vec![PLAIN], true));
    }

    #[tokio::test]
    async fn protocol_is_told_from_the_first_bytes_which_are_then_read_again() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let h1: &[&[u8]] = &[b"GET / HTTP/1.1\r\nHost: p\r\n\r\n"];
        let h2: &[&[u8]] = &[b"PRI * HT", b"TP/2.0\r\n\r\nSM\r\n\r\n", b"\0\0\x12\x04"];
        let short: &[&[u8]] = &[b"PRI"];
        // The pieces, the protocol, and whether the first-request deadline is over: a whole
        // HTTP/1 head or the HTTP/2 preface ends it.
        type Case<'a> = (&'a [&'a [u8]], Option<Protocol>, bool);
        let cases: [Case<'_>; 4] = [
            (h1, Some(Protocol::Http1), true),
            (h2, Some(Protocol::Http2), true),
            // A prefix of the preface, then the end: whatever it is, it is not HTTP/2.
            (short, Some(Protocol::Http1), false),
            (&[], None, false),
        ];
        for (pieces, expected, first_request_done) in cases {
            let (mut peer, server) = tokio::io::duplex(64 * 1024);
            let sent: Vec<u8> = pieces.concat();
            let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
            let writer = tokio::spawn(async move {
                for piece in pieces {
                    peer.write_all(&piece).await.unwrap();
                    tokio::task::yield_now().await;
                }
            });
            let (mut stream, _) = AuditedStream::new(server, Duration::from_secs(5), LIMIT);
            assert_eq!(stream.protocol().await.unwrap(), expected, "{sent:?}");
            assert_eq!(
                stream.first_bytes_deadline.is_none(),
                first_request_done,
                "{sent:?}"
            );
            writer.await.unwrap();
            // Read back a byte at a time: the replay must cope with any buffer size.
            let mut read = Vec::new();
            let mut byte = [0u8; 1];
            while stream.read(&mut byte).await.unwrap() == 1 {
                read.push(byte[0]);
            }
            assert_eq!(read, sent, "every byte reaches the reader once");
        }
    }

    /// Any way of cutting the same bytes into reads gives the same records: heads parsed
    /// in place (whole in one read) and heads gathered over several reads agree.
    #[test]
    fn records_do_not_depend_on_how_the_bytes_arrive() {
        use proptest::prelude::*;

        /// One request (framing headers in some case, a matching body) and whether its
        /// framing is ambiguous.
        fn request() -> impl Strategy<Value = (Vec<u8>, bool)> {
            (
                prop::sample::select(vec!["GET", "POST", "PATCH"]),
                0usize..3,     // 0: no body, 1: Content-Length, 2: chunked
                0usize..40,    // body length
                any::<bool>(), // a Content-Length next to Transfer-Encoding as well
                any::<bool>(), // upper-case header names
                "[a-z]{0,30}", // padding header value
            )
                .prop_map(|(method, framing, len, both, upper, pad)| {
                    let name = |n: &str| {
                        if upper {
                            n.to_uppercase()
                        } else {
                            n.to_owned()
                        }
                    };
                    let body = "b".repeat(len);
                    let mut head = format!("{method} /x HTTP/1.1\r\nHost: p\r\nX-Pad: {pad}\r\n");
                    let payload = match framing {
                        1 => {
                            head += &format!("{}: {len}\r\n", name("content-length"));
                            body
                        }
                        2 => {
                            head += &format!("{}: chunked\r\n", name("transfer-encoding"));
                            if both {
                                head += &format!("{}: {len}\r\n", name("content-length"));
                            }
                            if len == 0 {
                                "0\r\n\r\n".to_owned()
                            } else {
                                format!("{len:x}\r\n{body}\r\n0\r\n\r\n")
                            }
                        }
                        _ => String::new(),
                    };
                    let ambiguous = framing == 2 && both;
                    (format!("{head}\r\n{payload}").into_bytes(), ambiguous)
                })
        }

        proptest!(|(requests in prop::collection::vec(request(), 1..6),
                    cuts in prop::collection::vec(1usize..64, 1..40))| {
            let input: Vec<u8> = requests.iter().flat_map(|(bytes, _)| bytes.clone()).collect();
            let expected: Vec<Framing> = requests
                .iter()
                .map(|&(_, ambiguous_length)| Framing { ambiguous_length, head_too_large: false })
                .collect();
            let whole = audit(&input, input.len());
            prop_assert_eq!(&whole.0, &expected);
            prop_assert!(!whole.1);
            // Cut the input at the given piece sizes (cycled), not at a fixed step.
            let records = FramingRecords::default();
            let mut audited = Audit::new(records.clone(), LIMIT);
            let mut rest = input.as_slice();
            for size in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (piece, after) = rest.split_at((*size).min(rest.len()));
                audited.observe(piece);
                rest = after;
            }
            let pieces: Vec<Framing> = records.0.lock().unwrap().iter().copied().collect();
            prop_assert_eq!(pieces, whole.0);
        });
    }

    #[test]
    fn heads_over_the_limit_or_with_too_many_fields_are_refused() {
        let big = |n: usize| {
            format!(
                "GET /a?q=1 HTTP/1.1\r\nHost: p\r\nX-Big: {}\r\n\r\n",
                "a".repeat(n)
            )
        };
        let at_limit = big(LIMIT - big(0).len());
        for step in [7, 4096, usize::MAX] {
            assert_eq!(audit(at_limit.as_bytes(), step), (vec![PLAIN], false));
            let over = big(LIMIT - big(0).len() + 1);
            assert_eq!(
                audit(over.as_bytes(), step).0,
                vec![TOO_LARGE],
                "step {step}"
            );
        }
        let fields = |n: usize| {
            let list: String = (0..n).map(|i| format!("X-H{i}: v\r\n")).collect();
            format!("GET / HTTP/1.1\r\nHost: p\r\n{list}\r\n")
        };
        assert_eq!(audit(fields(99).as_bytes(), 64).0, vec![PLAIN]);
        assert_eq!(audit(fields(100).as_bytes(), 64).0, vec![TOO_LARGE]);
        assert_eq!(audit(fields(500).as_bytes(), usize::MAX).0, vec![TOO_LARGE]);
    }

    #[tokio::test]
    async fn a_refused_head_reaches_the_reader_as_a_stand_in_and_nothing_after_it() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let first = b"POST /bc/x HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n\r\nok";
        let huge = format!(
            "GET /bc/big?secret=1 HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(LIMIT)
        );
        let (mut peer, server) = tokio::io::duplex(256 * 1024);
        let (mut stream, records) = AuditedStream::new(server, Duration::from_secs(5), LIMIT);
        let sent = [first.as_slice(), huge.as_bytes()].concat();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(1000) {
                peer.write_all(piece).await.unwrap();
                tokio::task::yield_now().await;
            }
            peer
        });
        assert_eq!(stream.protocol().await.unwrap(), Some(Protocol::Http1));
        let expected = [first.as_slice(), b"GET /bc/big HTTP/1.1\r\n\r\n"].concat();
        let mut read = vec![0u8; expected.len()];
        stream.read_exact(&mut read).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&read),
            String::from_utf8_lossy(&expected)
        );
        // Then nothing, not even the end of the stream, however much more arrives.
        let _peer = writer.await.unwrap();
        let more =
            tokio::time::timeout(Duration::from_millis(50), stream.read(&mut [0u8; 16])).await;
        assert!(more.is_err(), "{more:?}");
        assert_eq!(records.next(), PLAIN);
        assert_eq!(records.next(), TOO_LARGE);
    }

    #[test]
    fn records_are_taken_in_order_and_default_when_exhausted() {
        let records = FramingRecords::default();
        records.push(AMBIGUOUS);
        records.push(PLAIN);
        assert_eq!(records.next(), AMBIGUOUS);
        assert_eq!(records.next(), PLAIN);
        assert_eq!(records.next(), PLAIN);
    }
}
