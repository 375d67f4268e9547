//! Link rewriting (`rewrite_links`): absolute upstream URLs in responses become proxy URLs.
//!
//! Dynamics answers with absolute links (`@odata.context`, `@odata.nextLink`,
//! `picture@odata.mediaReadLink`, `Location`, `OData-EntityId`, the same inside `$batch`
//! parts). A link that starts with the route's upstream URL gets that prefix replaced by
//! the public base plus the route prefix; the rest stays byte for byte (`$skiptoken`
//! carries encoded paging cookies), so following the link through the proxy reaches the
//! very same upstream URL. Nothing else is touched: not `ETag`, not `@odata.etag`, not a
//! link to another host or environment.
//!
//! XML bodies (WSDL, XSD, SOAP envelopes, Atom feeds: `text/xml`, `application/xml`,
//! `…+xml`) are treated more broadly, as SOAP clients follow whatever address a WSDL
//! names: every attribute value and every run of character data that starts with the
//! upstream URL is rewritten (see [`xml`]).
//!
//! Bodies are rewritten as they stream, by a scanner that never holds more than a few
//! hundred bytes (see [`json`], [`multipart`] and [`xml`]). Compressed bodies (`gzip`, `deflate`,
//! `br`) are decoded and sent on uncompressed, with `Content-Encoding` removed: the
//! compressed hop is the one over the internet to Microsoft, while the proxy's callers sit
//! next to it, and re-compressing would cost CPU on every byte for little gain. What the
//! proxy cannot decode it does not ask for: the caller's `Accept-Encoding` is narrowed to
//! these three codings (on every route, since token scrubbing reads textual bodies too). The same decoders serve token
//! scrubbing on routes that do not rewrite ([`decoding`]: decode only, same header rules).
//!
//! On the request side, WS-Addressing `To` headers in SOAP envelopes that name the proxy
//! are given the upstream's URL (see [`addressing`]).
//!
//! This module does not decide which routes rewrite, nor when (see `proxy`).

mod addressing;
mod decode;
mod json;
mod multipart;
mod xml;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Uri};

pub(crate) use self::addressing::{AddressingRewriter, is_soap_request};
pub(crate) use self::decode::Coding;
use self::decode::Decoder;
use self::json::JsonRewriter;
pub(crate) use self::json::scan_string;
use self::multipart::MultipartRewriter;
pub(crate) use self::multipart::classify as classify_content_type;
use self::xml::XmlRewriter;

const ODATA_ENTITYID: HeaderName = HeaderName::from_static("odata-entityid");

/// Response headers that carry links.
fn is_link_header(name: &[u8]) -> bool {
    [&b"location"[..], b"content-location", b"odata-entityid"]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
}

/// The upstream prefix of one route and what replaces it.
///
/// The prefix is matched in every spelling that names the same resource (RFC 3986 §6.2.2,
/// §6.2.3): scheme and host without regard to case, and the default port (`:80` for
/// `http`, `:443` for `https`) present or absent, whichever way the route's `upstream`
/// was written. Servers write their links in their own form (Dataverse and Business
/// Central never write `:443`), so a route configured as `https://host:443/…` must still
/// see its links. The path is compared byte for byte.
#[derive(Debug, Clone)]
pub(crate) struct LinkMap {
    /// The spellings of the prefix: the normalized one first, then the one with an
    /// explicit default port. Neither is a prefix of the other (they differ right after
    /// the host: `/` against `:`).
    from: Vec<Spelling>,
    to: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Spelling {
    bytes: Vec<u8>,
    /// Length of `scheme://authority`: compared without regard to case.
    authority_end: usize,
}

impl Spelling {
    fn new(bytes: Vec<u8>) -> Self {
        let after_scheme = memchr::memmem::find(&bytes, b"://").map_or(0, |i| i + 3);
        let authority_end =
            memchr::memchr(b'/', &bytes[after_scheme..]).map_or(bytes.len(), |i| after_scheme + i);
        Self {
            bytes,
            authority_end,
        }
    }

    fn byte_matches(&self, index: usize, byte: u8) -> bool {
        match self.bytes.get(index) {
            Some(expected) if index < self.authority_end => expected.eq_ignore_ascii_case(&byte),
            Some(&expected) => expected == byte,
            None => false,
        }
    }
}

/// The spellings of an absolute URL prefix: `scheme://host/…` with scheme and host
/// lowercase and no default port, then (for `http` and `https`) the same with the default
/// port written out. A URL that is not absolute has itself as its only spelling.
fn spellings(url: &str) -> Vec<Vec<u8>> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return vec![url.as_bytes().to_vec()];
    };
    let scheme = scheme.to_ascii_lowercase();
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let authority = authority.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => Some(":80"),
        "https" => Some(":443"),
        _ => None,
    };
    // `[::1]:443` ends with the port; `[::1]` ends with `]`.
    let host = match default_port {
        Some(port) => authority.strip_suffix(port).unwrap_or(&authority),
        None => &authority,
    };
    let mut out = vec![format!("{scheme}://{host}{path}").into_bytes()];
    if let Some(port) = default_port {
        out.push(format!("{scheme}://{host}{port}{path}").into_bytes());
    }
    out
}

/// Matching a value against a [`LinkMap`]'s prefix one byte at a time (the JSON scanner
/// decides on links as they stream): which spellings still match, and how many bytes did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Matching {
    alive: u8,
    matched: usize,
}

/// What one more byte did to a [`Matching`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Still a prefix of some spelling.
    Partial,
    /// A whole spelling matched.
    Complete,
    /// No spelling matches.
    Failed,
}

impl LinkMap {
    /// `from` is the route's upstream URL (ends with `/`), `to` the public base plus the
    /// route prefix (ends with `/`).
    pub(crate) fn new(from: &str, to: &str) -> Self {
        Self {
            from: spellings(from).into_iter().map(Spelling::new).collect(),
            to: to.as_bytes().to_vec(),
        }
    }

    fn to(&self) -> &[u8] {
        &self.to
    }

    /// The longest spelling of the prefix: what a streaming matcher may hold back.
    #[cfg(test)]
    pub(crate) fn max_len(&self) -> usize {
        self.from.iter().map(|s| s.bytes.len()).max().unwrap_or(0)
    }

    pub(crate) fn start(&self) -> Matching {
        Matching {
            alive: (1u8 << self.from.len()) - 1,
            matched: 0,
        }
    }

    /// Feeds the next byte of a value to `matching`.
    pub(crate) fn step(&self, matching: &mut Matching, byte: u8) -> Step {
        let index = matching.matched;
        let mut complete = false;
        for (i, spelling) in self.from.iter().enumerate() {
            if matching.alive & (1 << i) == 0 {
                continue;
            }
            if spelling.byte_matches(index, byte) {
                complete |= spelling.bytes.len() == index + 1;
            } else {
                matching.alive &= !(1 << i);
            }
        }
        matching.matched += 1;
        if complete {
            Step::Complete
        } else if matching.alive == 0 {
            Step::Failed
        } else {
            Step::Partial
        }
    }

    /// What follows the upstream prefix in `value`, if it starts with it.
    pub(crate) fn strip<'v>(&self, value: &'v [u8]) -> Option<&'v [u8]> {
        self.from.iter().find_map(|spelling| {
            let prefix = value.get(..spelling.bytes.len())?;
            prefix
                .iter()
                .enumerate()
                .all(|(i, &b)| spelling.byte_matches(i, b))
                .then(|| &value[spelling.bytes.len()..])
        })
    }

    /// The rewritten value, if it starts with the upstream prefix.
    pub(crate) fn rewrite(&self, value: &[u8]) -> Option<Vec<u8>> {
        let rest = self.strip(value)?;
        let mut out = self.to.clone();
        out.extend_from_slice(rest);
        Some(out)
    }

    /// Rewrites `Location`, `Content-Location` and `OData-EntityId` in place.
    pub(crate) fn rewrite_headers(&self, headers: &mut HeaderMap) {
        for name in [header::LOCATION, header::CONTENT_LOCATION, ODATA_ENTITYID] {
            if let header::Entry::Occupied(mut entry) = headers.entry(name) {
                for value in entry.iter_mut() {
                    if let Some(new) = self.rewrite(value.as_bytes())
                        && let Ok(new) = HeaderValue::from_bytes(&new)
                    {
                        *value = new;
                    }
                }
            }
        }
    }
}

/// What `check` says about a `rewrite_links` route whose upstream URL may not be the
/// prefix the server writes its links with. The rewriter matches the URL as configured,
/// with scheme and host in any case and the default port present or absent; these are
/// the differences it cannot see:
/// - the host is an IP address or `localhost`, or ends with a dot: servers write their
///   links with the name they are known by (the `Host` they were sent is this one, but a
///   server behind a tunnel or sidecar, or one with a configured base URL, writes its own);
/// - the path holds percent-encoded bytes: servers may encode differently (`%20` or `+`,
///   `%2f` or `%2F`), and the path is compared byte for byte.
pub(crate) fn link_base_warnings(upstream: &Uri) -> Vec<String> {
    let mut warnings = Vec::new();
    let host = upstream.host().unwrap_or_default();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_ok() || host.eq_ignore_ascii_case("localhost") {
        warnings.push(format!(
            "rewrite_links: the upstream is given as {host}; links the server writes with its \
             host name will not be rewritten (use the name it writes in @odata.context)"
        ));
    }
    if host.ends_with('.') {
        warnings.push(format!(
            "rewrite_links: the upstream host {host} ends with a dot; links the server writes \
             without it will not be rewritten"
        ));
    }
    if upstream.path().contains('%') {
        warnings.push(
            "rewrite_links: the upstream path holds percent-encoded bytes; links are matched \
             byte for byte, so a server that encodes them differently is not rewritten"
                .to_owned(),
        );
    }
    warnings
}

/// The base URL callers reach the proxy at, without a trailing `/`: `server.public_url`
/// when set, else taken from the request: `X-Forwarded-Proto` and `X-Forwarded-Host` when
/// the peer is a trusted proxy, then `Host` (or the HTTP/2 `:authority`) and the scheme
/// the caller used. `None` when no sane host is known.
pub(crate) fn public_base(
    public_url: Option<&Uri>,
    headers: &HeaderMap,
    authority: Option<&http::uri::Authority>,
    proto: &str,
    trusted_peer: bool,
) -> Option<String> {
    if let Some(url) = public_url {
        let scheme = url.scheme_str()?;
        let authority = url.authority()?;
        let path = url.path().trim_end_matches('/');
        return Some(format!("{scheme}://{authority}{path}"));
    }
    // The first value of a forwarded list is the one the original caller used.
    let first = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let (forwarded_proto, forwarded_host) = if trusted_peer {
        (first("x-forwarded-proto"), first("x-forwarded-host"))
    } else {
        (None, None)
    };
    let scheme = match forwarded_proto.map(str::to_ascii_lowercase).as_deref() {
        Some("https") => "https",
        Some("http") => "http",
        _ => proto,
    };
    let host = forwarded_host
        .or_else(|| headers.get(header::HOST).and_then(|v| v.to_str().ok()))
        .map(str::to_owned)
        .or_else(|| authority.map(|a| a.as_str().to_owned()))?;
    // Only a plain host[:port]: this text goes into response bodies.
    let parsed: http::uri::Authority = host.parse().ok()?;
    if parsed.as_str().contains('@') {
        return None;
    }
    Some(format!("{scheme}://{parsed}"))
}

/// Keeps only the codings the proxy can decode in the caller's `Accept-Encoding`
/// (`identity` when none is left), so the upstream never compresses a body in a way that
/// would stop its links from being rewritten or its text from being searched for tokens.
pub(crate) fn narrow_accept_encoding(headers: &mut HeaderMap) {
    if !headers.contains_key(header::ACCEPT_ENCODING) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|item| {
            let coding = item.split(';').next().unwrap_or_default().trim();
            ["gzip", "x-gzip", "deflate", "br", "identity"]
                .iter()
                .any(|known| coding.eq_ignore_ascii_case(known))
        })
        .map(str::to_owned)
        .collect();
    let value = if kept.is_empty() {
        "identity".to_owned()
    } else {
        kept.join(", ")
    };
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(header::ACCEPT_ENCODING, value);
    }
}

/// What kind of body a response has, for rewriting.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Content {
    Json,
    Multipart(Vec<u8>),
    Xml,
}

fn content(headers: &HeaderMap) -> Option<Content> {
    let value = headers.get(header::CONTENT_TYPE)?.as_bytes();
    if is_xml(value) {
        return Some(Content::Xml);
    }
    match multipart::classify(value) {
        (_, true, _) => Some(Content::Json),
        (_, _, Some(boundary)) => Some(Content::Multipart(boundary)),
        _ => None,
    }
}

/// `text/xml`, `application/xml` and every `…+xml` type (RFC 7303 §4.1, §4.2, §9.2:
/// SOAP 1.2's `application/soap+xml`, Atom's `application/atom+xml`, …).
fn is_xml(content_type: &[u8]) -> bool {
    let media = media_type(content_type);
    media == b"text/xml" || media == b"application/xml" || media.ends_with(b"+xml")
}

/// A `Content-Type` value's media type (`type/subtype`, RFC 9110 §8.3.1): lowercase,
/// without parameters.
pub(crate) fn media_type(content_type: &[u8]) -> Vec<u8> {
    content_type
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii()
        .to_ascii_lowercase()
}

/// `Ok(None)` for an identity body, `Err` for a coding the proxy cannot undo.
fn coding(headers: &HeaderMap) -> Result<Option<Coding>, ()> {
    let mut codings = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"));
    let Some(first) = codings.next() else {
        return Ok(None);
    };
    if codings.next().is_some() {
        return Err(());
    }
    let lower = first.to_ascii_lowercase();
    match lower.as_slice() {
        b"gzip" | b"x-gzip" => Ok(Some(Coding::Gzip)),
        b"deflate" => Ok(Some(Coding::Deflate)),
        b"br" => Ok(Some(Coding::Brotli)),
        _ => Err(()),
    }
}

/// Prepares a response for rewriting: rewrites its link headers and, when its body is
/// JSON, XML or a multipart batch in a coding the proxy can decode, returns the body rewriter
/// and adjusts the headers to what will be sent (`Content-Length` and `Content-Encoding`
/// removed). `has_body` is false for HEAD requests and 204/304 answers.
pub(crate) fn prepare(
    links: LinkMap,
    headers: &mut HeaderMap,
    has_body: bool,
) -> Option<BodyRewriter> {
    links.rewrite_headers(headers);
    let content = content(headers)?;
    let coding = match coding(headers) {
        Ok(coding) => coding,
        Err(()) => {
            tracing::debug!("Response body in an unknown content coding; links not rewritten.");
            return None;
        }
    };
    // The length changes with the rewrite (and would describe a GET's body on HEAD).
    headers.remove(header::CONTENT_LENGTH);
    if coding.is_some() {
        headers.remove(header::CONTENT_ENCODING);
    }
    has_body.then(|| BodyRewriter::new(links, content, coding))
}

/// Prepares a response body that is not rewritten but must be read as plain bytes (token
/// scrubbing searches textual bodies): a body in a coding the proxy can decode gets a
/// decode-only [`BodyRewriter`] and, as with rewriting, loses `Content-Encoding` and
/// `Content-Length`; an identity body needs none (`Ok(None)`). `Err` for a coding the proxy
/// cannot undo, headers untouched. `has_body` as for [`prepare`].
pub(crate) fn decoding(
    headers: &mut HeaderMap,
    has_body: bool,
) -> Result<Option<BodyRewriter>, UnknownCoding> {
    let Some(coding) = coding(headers).map_err(|()| UnknownCoding)? else {
        return Ok(None);
    };
    headers.remove(header::CONTENT_ENCODING);
    headers.remove(header::CONTENT_LENGTH);
    Ok(has_body.then(|| BodyRewriter::with_scanner(Scanner::Plain, Some(coding))))
}

/// A `Content-Encoding` other than `gzip`, `deflate`, `br` (or more than one of them).
#[derive(Debug, thiserror::Error)]
#[error("response body in a content coding the proxy cannot decode")]
pub(crate) struct UnknownCoding;

#[derive(Debug)]
enum Scanner {
    Json(JsonRewriter, LinkMap),
    Multipart(Box<MultipartRewriter>, LinkMap),
    Xml(XmlRewriter, LinkMap),
    /// Decoding only: the body is passed on as decoded (see [`decoding`]).
    Plain,
}

impl Scanner {
    fn push(&mut self, input: &[u8], out: &mut BytesMut) {
        match self {
            Self::Json(json, links) => json.push(links, input, out),
            Self::Multipart(multipart, links) => multipart.push(links, input, out),
            Self::Xml(xml, links) => xml.push(links, input, out),
            Self::Plain => out.extend_from_slice(input),
        }
    }

    fn finish(&mut self, out: &mut BytesMut) {
        match self {
            Self::Json(json, _) => json.finish(out),
            Self::Multipart(multipart, _) => multipart.finish(out),
            Self::Xml(xml, _) => xml.finish(out),
            Self::Plain => {}
        }
    }
}

/// Why a body could not be rewritten to its end.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode the upstream response body: {0}")]
pub(crate) struct RewriteError(#[from] std::io::Error);

/// Size of the pieces decoded output is produced in.
const DECODE_CHUNK: usize = 32 * 1024;

/// One response body being rewritten: push the upstream's chunks, pull rewritten output.
#[derive(Debug)]
pub(crate) struct BodyRewriter {
    scanner: Scanner,
    decoder: Option<Decoder>,
    /// Where the decoder writes, allocated once per body (empty without a decoder).
    decoded: Box<[u8]>,
    /// Identity input not yet rewritten.
    pending: Option<Bytes>,
    input_ended: bool,
    done: bool,
}

impl BodyRewriter {
    fn new(links: LinkMap, content: Content, coding: Option<Coding>) -> Self {
        let scanner = match content {
            Content::Json => Scanner::Json(JsonRewriter::new(), links),
            Content::Multipart(boundary) => {
                Scanner::Multipart(Box::new(MultipartRewriter::new(&boundary)), links)
            }
            Content::Xml => Scanner::Xml(XmlRewriter::new(&links), links),
        };
        Self::with_scanner(scanner, coding)
    }

    fn with_scanner(scanner: Scanner, coding: Option<Coding>) -> Self {
        Self {
            scanner,
            decoded: match coding {
                Some(_) => vec![0; DECODE_CHUNK].into_boxed_slice(),
                None => Box::default(),
            },
            decoder: coding.map(Decoder::new),
            pending: None,
            input_ended: false,
            done: false,
        }
    }

    /// Hands over the next chunk of the upstream body. Call only after [`next`](Self::next)
    /// returned `Ok(None)`.
    pub(crate) fn push(&mut self, data: Bytes) {
        match &mut self.decoder {
            Some(decoder) => decoder.push(data),
            None => self.pending = Some(data),
        }
    }

    /// The upstream body has ended.
    pub(crate) fn end_input(&mut self) {
        self.input_ended = true;
        if let Some(decoder) = &mut self.decoder {
            decoder.end();
        }
    }

    /// Everything has been produced.
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    #[cfg(test)]
    /// Bytes held between calls: bounded whatever the body size.
    pub(crate) fn buffered(&mut self) -> usize {
        let scanner = match &self.scanner {
            Scanner::Json(json, _) => json.buffered(),
            Scanner::Multipart(multipart, _) => multipart.buffered(),
            Scanner::Xml(xml, _) => xml.buffered(),
            Scanner::Plain => 0,
        };
        scanner
            + self.pending.as_ref().map_or(0, Bytes::len)
            + self.decoder.as_mut().map_or(0, Decoder::buffered)
    }

    /// The next rewritten output (possibly empty), or `Ok(None)` when more input is
    /// needed or, once [`is_done`](Self::is_done), at the end.
    pub(crate) fn next(&mut self) -> Result<Option<Bytes>, RewriteError> {
        if self.done {
            return Ok(None);
        }
        let mut out = BytesMut::new();
        match &mut self.decoder {
            None => match self.pending.take() {
                Some(data) => self.scanner.push(&data, &mut out),
                None if self.input_ended => self.finish(&mut out),
                None => return Ok(None),
            },
            Some(decoder) => match decoder.read(&mut self.decoded)? {
                None => return Ok(None),
                Some(0) => self.finish(&mut out),
                Some(n) => self.scanner.push(&self.decoded[..n], &mut out),
            },
        }
        Ok(Some(out.freeze()))
    }

    fn finish(&mut self, out: &mut BytesMut) {
        self.scanner.finish(out);
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The link map of the rewrite tests here and in the scanners' modules.
    pub(super) fn links() -> LinkMap {
        LinkMap::new(
            "https://api.bc.test/v2.0/t1/Production/",
            "https://proxy.test/bc/",
        )
    }

    #[test]
    fn link_headers_are_rewritten_and_others_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::LOCATION,
            HeaderValue::from_static(
                "https://api.bc.test/v2.0/t1/Production/api/v2.0/customers(1)",
            ),
        );
        headers.insert(
            ODATA_ENTITYID,
            HeaderValue::from_static("https://API.bc.test/v2.0/t1/Production/c(1)"),
        );
        headers.insert(
            header::CONTENT_LOCATION,
            HeaderValue::from_static("https://elsewhere.test/v2.0/t1/Production/c(1)"),
        );
        headers.insert(header::ETAG, HeaderValue::from_static("W/\"JzQ0OzE7MDsn\""));
        links().rewrite_headers(&mut headers);
        assert_eq!(
            headers[header::LOCATION],
            "https://proxy.test/bc/api/v2.0/customers(1)"
        );
        assert_eq!(headers[ODATA_ENTITYID], "https://proxy.test/bc/c(1)");
        assert_eq!(
            headers[header::CONTENT_LOCATION],
            "https://elsewhere.test/v2.0/t1/Production/c(1)"
        );
        assert_eq!(headers[header::ETAG], "W/\"JzQ0OzE7MDsn\"");
    }

    /// Servers write links without the default port whatever the route says, and some
    /// write it although the route does not: both spellings are the same upstream.
    #[test]
    fn default_ports_and_case_are_matched_both_ways() {
        let written_with = LinkMap::new("https://Org.CRM.test:443/api/data/v9.2/", "http://p/crm/");
        let written_without = LinkMap::new("https://org.crm.test/api/data/v9.2/", "http://p/crm/");
        for links in [&written_with, &written_without] {
            for link in [
                "https://org.crm.test/api/data/v9.2/accounts?$skiptoken=x",
                "https://org.crm.test:443/api/data/v9.2/accounts?$skiptoken=x",
                "HTTPS://ORG.crm.test:443/api/data/v9.2/accounts?$skiptoken=x",
            ] {
                assert_eq!(
                    links.rewrite(link.as_bytes()).as_deref(),
                    Some(&b"http://p/crm/accounts?$skiptoken=x"[..]),
                    "{link}"
                );
            }
            for other in [
                "https://org.crm.test:4443/api/data/v9.2/accounts",
                "http://org.crm.test/api/data/v9.2/accounts",
                "https://org.crm.test/API/data/v9.2/accounts",
                "https://org.crm.test.evil/api/data/v9.2/accounts",
            ] {
                assert_eq!(links.rewrite(other.as_bytes()), None, "{other}");
            }
        }
        let plain = LinkMap::new("http://127.0.0.1:80/bc/", "http://p/bc/");
        assert_eq!(
            plain.rewrite(b"http://127.0.0.1/bc/x").as_deref(),
            Some(&b"http://p/bc/x"[..])
        );
        // Another port is another server.
        let other_port = LinkMap::new("http://127.0.0.1:8080/bc/", "http://p/bc/");
        assert_eq!(other_port.rewrite(b"http://127.0.0.1/bc/x"), None);
        assert_eq!(
            other_port.rewrite(b"http://127.0.0.1:8080/bc/x").as_deref(),
            Some(&b"http://p/bc/x"[..])
        );
    }

    /// The streaming JSON scanner sees the same spellings, split at any byte.
    #[test]
    fn streamed_json_links_with_a_default_port_are_rewritten() {
        let links = LinkMap::new("https://org.crm.test:443/api/data/v9.2/", "http://p/crm/");
        let body = r#"{"@odata.context":"https://org.crm.test/api/data/v9.2/$metadata#accounts","value":[],"@odata.nextLink":"https:\/\/org.crm.test:443\/api\/data\/v9.2\/accounts?$skiptoken=1"}"#;
        for size in [1, 3, 7, body.len()] {
            let mut scanner = JsonRewriter::new();
            let mut out = BytesMut::new();
            for chunk in body.as_bytes().chunks(size) {
                scanner.push(&links, chunk, &mut out);
            }
            scanner.finish(&mut out);
            assert_eq!(
                std::str::from_utf8(&out).unwrap(),
                r#"{"@odata.context":"http://p/crm/$metadata#accounts","value":[],"@odata.nextLink":"http://p/crm/accounts?$skiptoken=1"}"#,
                "chunk size {size}"
            );
        }
    }

    #[test]
    fn public_base_prefers_config_then_trusted_forwarded_headers_then_host() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("proxy.lan:8080"));
        headers.insert(
            "x-forwarded-host",
            HeaderValue::from_static("erp.contoso.com, x"),
        );
        headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        let configured: Uri = "https://erp-proxy.contoso.com/gw".parse().unwrap();
        assert_eq!(
            public_base(Some(&configured), &headers, None, "http", false).as_deref(),
            Some("https://erp-proxy.contoso.com/gw")
        );
        assert_eq!(
            public_base(None, &headers, None, "http", true).as_deref(),
            Some("https://erp.contoso.com")
        );
        assert_eq!(
            public_base(None, &headers, None, "http", false).as_deref(),
            Some("http://proxy.lan:8080")
        );
        headers.insert(header::HOST, HeaderValue::from_static("a\"b"));
        assert_eq!(public_base(None, &headers, None, "http", false), None);
    }

    #[test]
    fn link_bases_the_rewriter_cannot_see_are_warned_about() {
        let warnings = |url: &str| link_base_warnings(&url.parse().unwrap());
        assert!(warnings("https://Org.crm4.dynamics.com:443/api/data/v9.2/").is_empty());
        assert!(warnings("https://api.businesscentral.dynamics.com/v2.0/t/Production/").is_empty());
        for url in [
            "https://10.1.2.3/api/data/v9.2/",
            "http://127.0.0.1:8080/x/",
            "http://[::1]:8080/x/",
            "http://LOCALHOST:8080/x/",
            "https://org.crm.test./api/",
            "https://bc.test/v2.0/t/My%20Env/",
        ] {
            assert_eq!(warnings(url).len(), 1, "{url}");
        }
    }

    #[test]
    fn accept_encoding_is_narrowed_to_decodable_codings() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("zstd, gzip;q=0.8, br, *;q=0.1"),
        );
        narrow_accept_encoding(&mut headers);
        assert_eq!(headers[header::ACCEPT_ENCODING], "gzip;q=0.8, br");
        headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("zstd"));
        narrow_accept_encoding(&mut headers);
        assert_eq!(headers[header::ACCEPT_ENCODING], "identity");
    }

    #[test]
    fn only_json_and_multipart_in_known_codings_are_rewritten() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        assert!(prepare(links(), &mut headers, true).is_none());
        assert!(headers.contains_key(header::CONTENT_LENGTH));

        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("zstd"));
        assert!(prepare(links(), &mut headers, true).is_none());
        assert!(headers.contains_key(header::CONTENT_ENCODING));

        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(prepare(links(), &mut headers, true).is_some());
        assert!(!headers.contains_key(header::CONTENT_ENCODING));
        assert!(!headers.contains_key(header::CONTENT_LENGTH));
    }

    #[test]
    fn gzip_bodies_are_decoded_and_rewritten_in_bounded_pieces() {
        use std::io::Write;
        let page = r#"{"@odata.context":"https://api.bc.test/v2.0/t1/Production/$metadata#items","value":[],"x":""#;
        let mut body = page.as_bytes().to_vec();
        body.extend(std::iter::repeat_n(b'a', 5_000_000));
        body.extend_from_slice(b"\"}");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(&body).unwrap();
        let compressed = encoder.finish().unwrap();
        assert!(compressed.len() < 20_000);

        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let mut rewriter = prepare(links(), &mut headers, true).unwrap();
        let mut input = compressed.chunks(4096);
        let mut out = Vec::new();
        while !rewriter.is_done() {
            match rewriter.next().unwrap() {
                Some(piece) => {
                    assert!(piece.len() <= DECODE_CHUNK + 64);
                    out.extend_from_slice(&piece);
                }
                None => match input.next() {
                    Some(chunk) => rewriter.push(Bytes::copy_from_slice(chunk)),
                    None => rewriter.end_input(),
                },
            }
            assert!(rewriter.buffered() <= 4096 + 256);
        }
        let expected = String::from_utf8(body).unwrap().replace(
            "https://api.bc.test/v2.0/t1/Production/",
            "https://proxy.test/bc/",
        );
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }
}
