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

/// Largest request head followed; hyper refuses larger heads itself.
const MAX_HEAD: usize = 128 * 1024;
const MAX_HEADERS: usize = 128;

/// What the audit found in one request head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Framing {
    /// Both `Content-Length` and `Transfer-Encoding` were present.
    pub(crate) ambiguous_length: bool,
}

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
}

#[derive(Debug)]
struct Audit {
    state: State,
    head: Vec<u8>,
    records: FramingRecords,
    /// Request heads seen so far.
    heads: u64,
}

impl Audit {
    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            bytes = match self.state {
                State::Off => return,
                State::Head => self.head_bytes(bytes),
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
    }

    fn head_bytes<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
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
            // Nearly always the whole head arrived in one read: parse it in place.
            if let Some(len) = self.parse_head(bytes) {
                return &bytes[len..];
            }
            // Incomplete (or unreadable, and the audit is off): keep it for the next read,
            // which checks the size (one read is bounded by the reader's buffer).
            if !matches!(self.state, State::Off) {
                self.head.extend_from_slice(bytes);
            }
            return &[];
        }
        let before = self.head.len();
        self.head.extend_from_slice(bytes);
        let head = std::mem::take(&mut self.head);
        match self.parse_head(&head) {
            // The buffer is dropped: a split head is rare, and an idle connection
            // should not keep its capacity.
            Some(len) => &bytes[len - before..],
            None if matches!(self.state, State::Off) => &[],
            None if head.len() <= MAX_HEAD => {
                self.head = head;
                &[]
            }
            None => {
                self.state = State::Off;
                &[]
            }
        }
    }

    /// Parses a request head at the start of `bytes`. When complete, records its framing,
    /// moves on to its body and returns its length; when incomplete, returns `None`; when
    /// unreadable, stops following the stream (hyper rejects it anyway).
    fn parse_head(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let len = match request.parse(bytes) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => {
                self.state = State::Off;
                return None;
            }
        };
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
        Some(len)
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

fn chunk_start(size: u64) -> State {
    if size == 0 {
        State::Trailers(true)
    } else {
        State::ChunkData(size)
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The first read of a connection, kept for hyper: room for a typical request head, so
/// hyper gets the whole head in its first read.
const FIRST_READ: usize = 4096;

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
    /// Bytes read (and audited) by [`Self::protocol`], not yet handed to the reader.
    replay: Vec<u8>,
    replayed: usize,
}

impl<S> AuditedStream<S> {
    /// `first_request_within`: how long the peer has to send its first request head.
    pub(crate) fn new(inner: S, first_request_within: Duration) -> (Self, FramingRecords) {
        let records = FramingRecords::default();
        let stream = Self {
            inner,
            audit: Audit {
                state: State::Head,
                head: Vec::new(),
                records: records.clone(),
                heads: 0,
            },
            first_bytes_deadline: Some(Box::pin(tokio::time::sleep(first_request_within))),
            replay: Vec::new(),
            replayed: 0,
        };
        (stream, records)
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
                ready!(self.poll_audited(cx, &mut buf))?;
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
        self.replay = first;
        self.replayed = 0;
        Ok(protocol)
    }

    /// Reads from the connection itself, auditing what arrives.
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
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            let read = &buf.filled()[before..];
            self.audit.observe(read);
            if self.first_bytes_deadline.is_some() && self.audit.heads > 0 {
                self.first_bytes_deadline = None;
            }
        }
        result
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuditedStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.replay.len() {
            let rest = &this.replay[this.replayed..];
            let take = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..take]);
            this.replayed += take;
            if this.replayed == this.replay.len() {
                this.replay = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        this.poll_audited(cx, buf)
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
        let mut audit = Audit {
            state: State::Head,
            head: Vec::new(),
            records: records.clone(),
            heads: 0,
        };
        for piece in input.chunks(step) {
            audit.observe(piece);
        }
        let off = matches!(audit.state, State::Off);
        let found = records.0.lock().unwrap().iter().copied().collect();
        (found, off)
    }

    const PLAIN: Framing = Framing {
        ambiguous_length: false,
    };
    const AMBIGUOUS: Framing = Framing {
        ambiguous_length: true,
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
        let huge_head = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &vec![b'a'; MAX_HEAD]].concat();
        assert_eq!(audit(&huge_head, 4096), (vec![], true));
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
            let (mut stream, _) = AuditedStream::new(server, Duration::from_secs(5));
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
                .map(|&(_, ambiguous_length)| Framing { ambiguous_length })
                .collect();
            let whole = audit(&input, input.len());
            prop_assert_eq!(&whole.0, &expected);
            prop_assert!(!whole.1);
            // Cut the input at the given piece sizes (cycled), not at a fixed step.
            let records = FramingRecords::default();
            let mut audited = Audit {
                state: State::Head,
                head: Vec::new(),
                records: records.clone(),
                heads: 0,
            };
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
    fn records_are_taken_in_order_and_default_when_exhausted() {
        let records = FramingRecords::default();
        records.push(AMBIGUOUS);
        records.push(PLAIN);
        assert_eq!(records.next(), AMBIGUOUS);
        assert_eq!(records.next(), PLAIN);
        assert_eq!(records.next(), PLAIN);
    }
}
