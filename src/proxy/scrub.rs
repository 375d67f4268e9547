//! Token scrubbing: the route's bearer token never reaches the caller.
//!
//! An upstream page that reflects the request's headers (a debug or error page, a `TRACE`
//! echo behind another gateway) would hand the proxy's bearer token, which speaks for the
//! whole app registration, to a caller that may use one route only. So every response
//! header, and every body that is not known to be binary, is searched for the tokens of
//! this exchange: each one injected into it (the first, and the renewed one after an
//! upstream 401) and the one the route's slot holds when the answer arrives (renewed in the
//! meantime). Each occurrence becomes `[redacted]`; a header whose *name* contains a token
//! is dropped.
//!
//! The bare token is searched for, so `Bearer <token>` becomes `Bearer [redacted]`. An
//! Entra token is a JWT: base64url segments and dots (RFC 7519 §3), characters that JSON
//! never escapes (RFC 8259 §7) and that form- and percent-encoding leave as they are, so a
//! reflected JWT appears verbatim whatever the page's format. Opaque tokens of other
//! providers may contain `/` or `+`: for those, the JSON `\/` spelling and the
//! percent-encoded one are searched for too.
//!
//! Bodies are scrubbed as they stream, with bounded memory: only a suffix of a chunk that
//! could be the start of a token (shorter than the longest token) is held back until the
//! next chunk, so a token split across frames is still found; a chunk that neither holds
//! a token nor ends in the start of one passes without a copy. Which bodies are searched is
//! [`is_searched`]'s call; compressed ones are decoded first with the link rewriter's
//! decoders and sent on decoded (see `rewrite`). A searched body loses its
//! `Content-Length` (the redaction changes its length) and goes out chunked.
//!
//! Not here: obtaining tokens (`token`), link rewriting (`rewrite`), the body plumbing
//! (`proxy::body`).

use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use memchr::memmem::Finder;

use super::body::BoxError;
use crate::rewrite::{self, BodyRewriter, UnknownCoding};
use crate::token::Token;

/// What replaces a token.
pub(crate) const REDACTED: &[u8] = b"[redacted]";

/// One spelling of a token to search for. (`Debug` shows no token.)
enum Needle {
    /// The bare token, with its searcher built once when the token was issued.
    Token(Arc<Token>),
    /// Another spelling of an opaque token (JSON `\/`, percent-encoded), built per response.
    Spelling(Box<Finder<'static>>),
}

impl std::fmt::Debug for Needle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Needle(****)")
    }
}

impl Needle {
    fn finder(&self) -> &Finder<'static> {
        match self {
            Self::Token(token) => token.finder(),
            Self::Spelling(finder) => finder,
        }
    }

    fn bytes(&self) -> &[u8] {
        self.finder().needle()
    }
}

/// The tokens one response is scrubbed of.
#[derive(Debug)]
pub(crate) struct Tokens {
    needles: Vec<Needle>,
}

impl Tokens {
    /// The distinct tokens among `tokens`, in every spelling searched for.
    pub(crate) fn new<'a>(tokens: impl IntoIterator<Item = &'a Arc<Token>>) -> Self {
        let mut needles: Vec<Needle> = Vec::new();
        for token in tokens {
            let bare = token.finder().needle();
            if bare.is_empty() || needles.iter().any(|n| n.bytes() == bare) {
                continue;
            }
            let spellings = other_spellings(bare);
            needles.push(Needle::Token(Arc::clone(token)));
            for spelling in spellings {
                if !needles.iter().any(|n| n.bytes() == spelling.as_slice()) {
                    needles.push(Needle::Spelling(Box::new(
                        Finder::new(&spelling).into_owned(),
                    )));
                }
            }
        }
        Self { needles }
    }

    /// The earliest (then longest) occurrence of any token in `data` at or after `from`.
    /// `next` keeps each needle's next occurrence (`Some(None)`: none left) across calls
    /// on the same `data` with growing `from`, so each needle scans `data` about once.
    fn find(
        &self,
        data: &[u8],
        from: usize,
        next: &mut [Option<Option<usize>>],
    ) -> Option<(usize, usize)> {
        let mut best: Option<(usize, usize)> = None;
        for (needle, cached) in self.needles.iter().zip(next.iter_mut()) {
            let stale = match cached {
                None => true,
                Some(Some(at)) => *at < from,
                Some(None) => false,
            };
            if stale {
                *cached = Some(needle.finder().find(&data[from..]).map(|at| from + at));
            }
            let Some(Some(start)) = *cached else {
                continue;
            };
            let len = needle.bytes().len();
            if best.is_none_or(|(s, l)| start < s || start == s && len > l) {
                best = Some((start, len));
            }
        }
        best
    }

    /// `data` with every token replaced, or `None` when it holds none.
    fn replace_all(&self, data: &[u8]) -> Option<Vec<u8>> {
        // The common case, no token at all, allocates nothing; what the scan found is
        // where `find` starts.
        let (first, at) = self
            .needles
            .iter()
            .enumerate()
            .find_map(|(i, n)| n.finder().find(data).map(|at| (i, at)))?;
        let mut next = vec![None; self.needles.len()];
        next[..first].fill(Some(None));
        next[first] = Some(Some(at));
        let (mut start, mut len) = self.find(data, 0, &mut next)?;
        let mut out = Vec::with_capacity(data.len());
        let mut copied = 0;
        loop {
            out.extend_from_slice(&data[copied..start]);
            out.extend_from_slice(REDACTED);
            copied = start + len;
            match self.find(data, copied, &mut next) {
                Some(found) => (start, len) = found,
                None => break,
            }
        }
        out.extend_from_slice(&data[copied..]);
        Some(out)
    }

    /// Length of the longest suffix of `data` that is the start of a token (not a whole
    /// one): what must wait for the next chunk.
    fn partial_suffix(&self, data: &[u8]) -> usize {
        let mut keep = 0;
        for needle in &self.needles {
            let needle = needle.bytes();
            let window = data.len().saturating_sub(needle.len() - 1);
            // The earliest candidate that matches is the longest suffix.
            if let Some(at) = memchr::memchr_iter(needle[0], &data[window..])
                .map(|at| window + at)
                .find(|&at| needle.starts_with(&data[at..]))
            {
                keep = keep.max(data.len() - at);
            }
        }
        keep
    }

    /// Replaces tokens in header values and drops headers whose names contain one.
    pub(crate) fn scrub_headers(&self, headers: &mut HeaderMap) {
        if self.needles.is_empty() {
            return;
        }
        let mut named: Vec<HeaderName> = Vec::new();
        for (name, value) in headers.iter_mut() {
            // Names arrive lowercased: compare without regard to case.
            let name_bytes = name.as_str().as_bytes();
            if self
                .needles
                .iter()
                .any(|n| contains_ignoring_case(name_bytes, n.bytes()))
            {
                named.push(name.clone());
                continue;
            }
            if let Some(clean) = self.replace_all(value.as_bytes()) {
                let mut clean = HeaderValue::from_bytes(&clean)
                    .unwrap_or(HeaderValue::from_static("[redacted]"));
                clean.set_sensitive(true);
                *value = clean;
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
}

/// Whether `haystack` contains `needle`, ASCII letters compared without regard to case.
fn contains_ignoring_case(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack.len() >= needle.len()
        && haystack
            .windows(needle.len())
            .any(|window| window.eq_ignore_ascii_case(needle))
}

/// Spellings of `token` besides the bare one that a reflecting page may use. None for a
/// JWT (base64url and dots are escaped by neither JSON nor percent-encoding).
fn other_spellings(token: &[u8]) -> Vec<Vec<u8>> {
    let mut spellings = Vec::new();
    if token.contains(&b'/') {
        // RFC 8259 §7: `\/` is a valid escape of `/` (PHP's json_encode writes it).
        let mut escaped = Vec::with_capacity(token.len() + 8);
        for &byte in token {
            if byte == b'/' {
                escaped.push(b'\\');
            }
            escaped.push(byte);
        }
        spellings.push(escaped);
    }
    // RFC 3986 §2.1 / WHATWG form encoding: only these pass unencoded.
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"-._~*".contains(&b);
    if !token.iter().all(|&b| plain(b)) {
        let mut encoded = Vec::with_capacity(token.len() * 3);
        for &byte in token {
            if plain(byte) {
                encoded.push(byte);
            } else {
                encoded.extend_from_slice(format!("%{byte:02X}").as_bytes());
            }
        }
        spellings.push(encoded);
    }
    spellings
}

/// Whether a body with these headers is searched for tokens: everything except types
/// known to be binary. Textual for certain are `text/*`, JSON and XML (`+json`, `+xml`
/// included), `multipart/*` (batch parts), `message/*` (a `message/http` is exactly a
/// reflected request), forms and scripts; a body without `Content-Type` (or with one that
/// does not parse) is searched too, since a client may sniff it as text (WHATWG MIME
/// Sniffing §7). Passed unsearched: `image/*` (SVG excepted), `audio/*`, `video/*`,
/// `font/*`, `application/octet-stream`, PDF, archives, Office documents (zip containers)
/// and gRPC: media whose bytes are not read as text and whose `Content-Length` downloads
/// rely on.
pub(crate) fn is_searched(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return true;
    };
    let media = rewrite::media_type(value.as_bytes());
    let Some(slash) = memchr::memchr(b'/', &media) else {
        return true;
    };
    let (kind, subtype) = (&media[..slash], &media[slash + 1..]);
    if subtype.ends_with(b"+json") || subtype.ends_with(b"+xml") {
        return true;
    }
    let binary = match kind {
        b"image" | b"audio" | b"video" | b"font" => true,
        b"application" => {
            matches!(
                subtype,
                b"octet-stream"
                    | b"pdf"
                    | b"zip"
                    | b"gzip"
                    | b"x-gzip"
                    | b"x-tar"
                    | b"x-7z-compressed"
                    | b"vnd.ms-excel"
                    | b"msword"
                    | b"vnd.ms-powerpoint"
                    | b"grpc"
                    | b"x-protobuf"
            ) || subtype.starts_with(b"vnd.openxmlformats-officedocument.")
                || subtype.starts_with(b"grpc+")
        }
        _ => false,
    };
    !binary
}

/// Scrubs the response headers and decides about the body. A searched body loses
/// `Content-Length` and, when compressed, is decoded: `rewriter` (the link rewriter, whose
/// output is already decoded) is set to a decode-only one when there was none. Returns the
/// body's scrubber (`None` for binary bodies and when `has_body` is false: HEAD, 204, 304).
/// A searched body in a coding the proxy cannot decode is an error: it could not be
/// searched, so it is not sent.
pub(crate) fn prepare(
    tokens: Tokens,
    headers: &mut HeaderMap,
    has_body: bool,
    rewriter: &mut Option<BodyRewriter>,
) -> Result<Option<Scrubber>, UnknownCoding> {
    tokens.scrub_headers(headers);
    if rewriter.is_none() {
        if !is_searched(headers) {
            return Ok(None);
        }
        match rewrite::decoding(headers, has_body) {
            Ok(decoder) => *rewriter = decoder,
            Err(error) if has_body => return Err(error),
            // HEAD: no body to search, the headers describe the GET's answer as they are.
            Err(_) => return Ok(None),
        }
        // The length changes when a token is replaced (and would describe a GET's body
        // on HEAD, as with rewriting).
        headers.remove(header::CONTENT_LENGTH);
    }
    Ok(has_body.then(|| Scrubber::new(tokens)))
}

/// One response body being scrubbed. (`Debug` shows no body bytes.)
pub(crate) struct Scrubber {
    tokens: Tokens,
    /// The end of the last chunk that may be the start of a token.
    held: BytesMut,
    /// [`Tokens::find`]'s per-needle positions, kept to spare an allocation per chunk.
    next: Vec<Option<Option<usize>>>,
    trailers: Option<HeaderMap>,
    done: bool,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scrubber")
            .field("tokens", &self.tokens.needles.len())
            .field("held", &self.held.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl Scrubber {
    fn new(tokens: Tokens) -> Self {
        Self {
            tokens,
            held: BytesMut::new(),
            next: Vec::new(),
            trailers: None,
            done: false,
        }
    }

    /// Everything has been produced.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.held.len()
    }

    /// Scrubs the next chunk: what can be sent now (possibly empty).
    fn push(&mut self, chunk: Bytes) -> Bytes {
        let data = if self.held.is_empty() {
            chunk
        } else {
            self.held.extend_from_slice(&chunk);
            self.held.split().freeze()
        };
        let next = &mut self.next;
        next.clear();
        next.resize(self.tokens.needles.len(), None);
        let mut out: Option<BytesMut> = None;
        let mut copied = 0;
        while let Some((start, len)) = self.tokens.find(&data, copied, next) {
            let out = out.get_or_insert_with(|| BytesMut::with_capacity(data.len()));
            out.extend_from_slice(&data[copied..start]);
            out.extend_from_slice(REDACTED);
            copied = start + len;
        }
        let keep = self.tokens.partial_suffix(&data[copied..]);
        let end = data.len() - keep;
        self.held.extend_from_slice(&data[end..]);
        match out {
            None => data.slice(..end),
            Some(mut out) => {
                out.extend_from_slice(&data[copied..end]);
                out.freeze()
            }
        }
    }

    /// The body ended: what was held back (too short to be a token).
    fn finish(&mut self) -> Bytes {
        self.held.split().freeze()
    }

    /// The next scrubbed frame, polling `inner` (the upstream body, or the link
    /// rewriter's output) for more. Empty output is skipped, not sent as an empty frame.
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        mut inner: impl FnMut(&mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.done {
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            let data = match ready!(inner(cx)) {
                None => {
                    self.done = true;
                    self.finish()
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.push(data),
                    Err(frame) => {
                        // Trailers end the body: send what was held, then them, scrubbed.
                        if let Ok(mut trailers) = frame.into_trailers() {
                            self.tokens.scrub_headers(&mut trailers);
                            self.trailers = Some(trailers);
                        }
                        self.done = true;
                        self.finish()
                    }
                },
            };
            if !data.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::token::IssuedToken;

    fn token(value: &str) -> Arc<Token> {
        let issued = IssuedToken {
            access_token: Secret::new(value),
            expires_in: std::time::Duration::from_secs(3600),
            refresh_in: None,
        };
        Arc::new(Token::new(&issued, tokio::time::Instant::now()).unwrap())
    }

    const JWT: &str = "eyJ0eXAiOiJKV1QifQ.eyJhdWQiOiJodHRwczovL2FwaSJ9.c2lnbmF0dXJl-_x";

    fn scrub_in_pieces(tokens: Tokens, body: &[u8], size: usize) -> (Vec<u8>, usize) {
        let mut scrubber = Scrubber::new(tokens);
        let mut out = Vec::new();
        let mut most_held = 0;
        for piece in body.chunks(size) {
            out.extend_from_slice(&scrubber.push(Bytes::copy_from_slice(piece)));
            most_held = most_held.max(scrubber.buffered());
        }
        out.extend_from_slice(&scrubber.finish());
        (out, most_held)
    }

    #[tokio::test]
    async fn tokens_split_anywhere_are_redacted_and_memory_stays_bounded() {
        let jwt = token(JWT);
        let body = format!(
            "{{\"headers\":{{\"authorization\":\"Bearer {JWT}\"}},\"again\":\"{JWT}{JWT}\",\"e\":\"eyJ0\"}}"
        );
        let expected = body.replace(JWT, "[redacted]");
        for size in 1..=body.len() {
            let (out, held) = scrub_in_pieces(Tokens::new([&jwt]), body.as_bytes(), size);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                expected,
                "pieces of {size}"
            );
            assert!(held < JWT.len(), "held {held} bytes");
        }
    }

    #[tokio::test]
    async fn a_body_without_the_token_passes_unchanged_and_uncopied() {
        let jwt = token(JWT);
        let mut scrubber = Scrubber::new(Tokens::new([&jwt]));
        let chunk = Bytes::from_static(b"{\"value\":[{\"name\":\"eyJ is not a token\"}]}");
        let out = scrubber.push(chunk.clone());
        assert_eq!(out, chunk);
        assert_eq!(out.as_ptr(), chunk.as_ptr(), "no copy");
        // A prefix of the token at the end waits for the next chunk, then passes on.
        assert_eq!(scrubber.push(Bytes::from_static(b"abc eyJ0eX")), "abc ");
        assert_eq!(scrubber.push(Bytes::from_static(b"Z")), "eyJ0eXZ");
        assert_eq!(scrubber.push(Bytes::from_static(b"eyJ0")), "");
        assert_eq!(scrubber.finish(), "eyJ0");
    }

    #[tokio::test]
    async fn every_token_of_the_exchange_and_opaque_spellings_are_redacted() {
        let first = token("tok-first-0123456789");
        let renewed = token("abc/def+ghi=");
        let tokens = Tokens::new([&first, &renewed, &renewed]);
        let body = br#"{"a":"tok-first-0123456789","b":"abc\/def+ghi=","c":"abc%2Fdef%2Bghi%3D","d":"abc/def+ghi="}"#;
        let (out, _) = scrub_in_pieces(tokens, body, 3);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":"[redacted]","b":"[redacted]","c":"[redacted]","d":"[redacted]"}"#
        );
    }

    #[tokio::test]
    async fn headers_are_scrubbed_by_value_and_by_name() {
        let jwt = token(JWT);
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-echo-authorization",
            HeaderValue::from_str(&format!("Bearer {JWT}")).unwrap(),
        );
        headers.insert(
            HeaderName::from_bytes(format!("x-{JWT}").as_bytes()).unwrap(),
            HeaderValue::from_static("1"),
        );
        headers.insert("etag", HeaderValue::from_static("W/\"1\""));
        Tokens::new([&jwt]).scrub_headers(&mut headers);
        assert_eq!(headers["x-echo-authorization"], "Bearer [redacted]");
        assert!(headers["x-echo-authorization"].is_sensitive());
        assert_eq!(headers.len(), 2);
        assert_eq!(headers["etag"], "W/\"1\"");
    }

    #[test]
    fn binary_media_pass_and_everything_else_is_searched() {
        let searched = |ct: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(ct) = ct {
                headers.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            }
            is_searched(&headers)
        };
        for textual in [
            None,
            Some("application/json; odata.metadata=minimal"),
            Some("application/problem+json"),
            Some("application/atom+xml"),
            Some("text/html; charset=utf-8"),
            Some("TEXT/PLAIN"),
            Some("multipart/mixed; boundary=batchresponse_1"),
            Some("message/http"),
            Some("image/svg+xml"),
            Some("application/vnd.custom"),
            Some("garbage"),
        ] {
            assert!(searched(textual), "{textual:?}");
        }
        for binary in [
            "application/octet-stream",
            "image/png",
            "application/pdf",
            "video/mp4",
            "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        ] {
            assert!(!searched(Some(binary)), "{binary}");
        }
    }
}
