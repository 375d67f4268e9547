//! Request-side `$batch`: the inner requests of a batch get the same treatment as the
//! batch request itself.
//!
//! An OData `$batch` request (OData v4.01 Part 1 §11.7) carries many requests in its body,
//! as `multipart/mixed` parts of type `application/http` (change sets are nested
//! `multipart/mixed` parts) or as the JSON format's `requests` array. Clients copy their
//! common headers into every part, so without this module the caller's proxy password or
//! API key would reach the upstream inside the body. For every inner request:
//!
//! - **Headers**: what the header policy removes from the request itself is removed from
//!   every part (`RequestPolicy::forbids`: the caller's `Authorization`,
//!   `Proxy-Authorization` and API key header, identity and forwarding headers, method
//!   overrides, names with `_` unless allowed, the route's `strip_request_headers`); a
//!   `Host` header is set to the upstream's authority.
//! - **URLs**: a URL on the proxy's base (absolute `http://proxy:8080/crm/Accounts(1)`, or
//!   absolute-path `/crm/Accounts(1)`) is written on the upstream's base instead; a URL
//!   already on the upstream's base and a relative URL (`Accounts(1)`, `$1/Contacts`)
//!   stay as they are. A URL that leaves the route (another host or scheme, another
//!   prefix, a narrower route's prefix, dot segments or encoded separators once resolved
//!   against the batch resource) refuses the whole batch with 400.
//! - **Shape**: what the proxy cannot check it does not forward: every part must be
//!   `application/http` (binary) or a change set; header and request lines are bounded,
//!   folded header lines, stray boundary lines and compressed bodies are refused. The
//!   preamble and epilogue (which carry no requests) are dropped.
//!
//! **Refusal before anything is sent, in bounded memory.** The body is translated as it
//! streams, in a few kilobytes per part line. A batch up to [`LOOKAHEAD`] (1 MiB of
//! translated output) is read and checked whole before the upstream request starts, so
//! the upstream never sees a byte of a refused batch. A longer batch (file uploads, large
//! change sets) starts upstream once 1 MiB has been checked, and is checked further as it
//! streams: a part that leaves the route is never sent; the proxy aborts the upstream
//! request body at that point (the upstream sees an incomplete request, never the
//! closing boundary) and answers the caller 400. A server that reads the whole batch
//! before executing it (OData's own batch handlers do) executes nothing of it. Spooling
//! to disk would keep the promise for any size, at the cost of writing callers' business
//! data to the proxy's disk; the proxy does not do that.
//!
//! This module does not decide which routes or requests are batches' concern beyond the
//! resource name; the pipeline (`proxy`) calls [`Batch::for_request`] and hooks the body.

mod json;
mod multipart;

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::header::HeaderName;
use http::{HeaderMap, Method, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use self::json::JsonTranslator;
use self::multipart::MultipartTranslator;
use crate::proxy::body::{BoxError, REPLAY_LIMIT, UpstreamBody};
use crate::proxy::headers::RequestPolicy;
use crate::rewrite::{LinkMap, classify_content_type};
use crate::routing::{self, PathError};

/// Translated output checked before the upstream request starts.
pub(crate) const LOOKAHEAD: usize = 1024 * 1024;

/// Why a batch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BatchError {
    #[error("a $batch part addresses a URL outside this route")]
    OutsideRoute,
    #[error("a $batch part URL is not allowed: {0}")]
    BadUrl(PathError),
    #[error("malformed $batch request: {0}")]
    Malformed(&'static str),
    #[error("a $batch request must be multipart/mixed with a boundary, or application/json")]
    UnsupportedType,
    #[error(
        "compressed $batch request bodies are not accepted (the proxy checks every part); \
         send it without Content-Encoding"
    )]
    Compressed,
}

impl BatchError {
    /// 415 for what the proxy does not read, 400 for what it refuses.
    pub(crate) fn is_unsupported_media_type(&self) -> bool {
        match self {
            Self::UnsupportedType | Self::Compressed => true,
            Self::OutsideRoute | Self::BadUrl(_) | Self::Malformed(_) => false,
        }
    }
}

/// What an inner request of one route's batch may address, and how its URLs translate.
#[derive(Debug)]
pub(crate) struct BatchRoute {
    /// Public base plus route prefix → upstream URL: absolute URLs on the proxy's base.
    public: Option<LinkMap>,
    /// The upstream URL, matched in its own spellings: absolute URLs already upstream.
    upstream: LinkMap,
    upstream_url: String,
    /// `{public path}{route prefix}`: absolute-path URLs the client writes.
    path_prefix: String,
    /// The upstream URL's path (ends with `/`).
    upstream_path: String,
    /// The route prefix (ends with `/`).
    route_prefix: String,
    /// The directory of the batch resource as a proxy path: relative URLs resolve here.
    relative_base: String,
    /// Longer route prefixes under this one: another route's resources.
    nested: Vec<String>,
    /// The header policy of the batch request itself, owned (the body outlives it).
    api_key_header: HeaderName,
    allow_underscores: bool,
    strip: Vec<HeaderName>,
    upstream_authority: String,
}

/// What the pipeline knows about the request and its route.
#[derive(Debug)]
pub(crate) struct RequestContext<'a> {
    pub(crate) path: &'a str,
    pub(crate) route_prefix: &'a str,
    pub(crate) upstream_url: &'a str,
    pub(crate) upstream_authority: &'a str,
    /// The proxy's public base (`http://proxy:8080`, no trailing `/`), when known.
    pub(crate) public_base: Option<&'a str>,
    pub(crate) other_prefixes: &'a [&'a str],
    /// The header policy of the request itself: parts get the same.
    pub(crate) policy: RequestPolicy<'a>,
}

/// The translator chosen for one batch request.
#[derive(Debug)]
pub(crate) struct Batch {
    route: BatchRoute,
    format: Format,
}

#[derive(Debug)]
enum Format {
    Multipart(Box<MultipartTranslator>),
    Json(Box<JsonTranslator>),
}

/// Whether a path names a `$batch` resource: its last segment is `$batch` (`%24batch`
/// is the same resource to a server that decodes it), in any case.
fn is_batch_path(path: &str) -> bool {
    let last = path.rsplit('/').next().unwrap_or_default();
    last.eq_ignore_ascii_case("$batch") || last.eq_ignore_ascii_case("%24batch")
}

/// Whether a request is a `POST …/$batch`, the only kind [`Batch::for_request`] reads.
pub(crate) fn is_batch_request(method: &Method, path: &str) -> bool {
    method == Method::POST && is_batch_path(path)
}

impl Batch {
    /// The translator for a `POST …/$batch` request, `None` for any other request, an
    /// error for a batch the proxy will not read.
    pub(crate) fn for_request(
        method: &Method,
        headers: &HeaderMap,
        context: &RequestContext<'_>,
    ) -> Result<Option<Self>, BatchError> {
        if !is_batch_request(method, context.path) {
            return Ok(None);
        }
        let encoded = headers
            .get_all(header::CONTENT_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"));
        if encoded {
            return Err(BatchError::Compressed);
        }
        let mut types = headers.get_all(header::CONTENT_TYPE).iter();
        let (Some(content_type), None) = (types.next(), types.next()) else {
            return Err(BatchError::UnsupportedType);
        };
        let format = match classify_content_type(content_type.as_bytes()) {
            (_, _, Some(boundary)) => {
                Format::Multipart(Box::new(MultipartTranslator::new(&boundary)))
            }
            (_, true, None) => Format::Json(Box::new(JsonTranslator::new())),
            _ => return Err(BatchError::UnsupportedType),
        };
        Ok(Some(Self {
            route: BatchRoute::new(context),
            format,
        }))
    }

    /// Translates the next piece of the body into `out`.
    pub(crate) fn push(&mut self, input: &[u8], out: &mut BytesMut) -> Result<(), BatchError> {
        match &mut self.format {
            Format::Multipart(multipart) => multipart.push(&self.route, input, out),
            Format::Json(json) => json.push(&self.route, input, out),
        }
    }

    /// The body has ended: refused unless it was complete.
    pub(crate) fn finish(&mut self, out: &mut BytesMut) -> Result<(), BatchError> {
        match &mut self.format {
            Format::Multipart(multipart) => multipart.finish(out),
            Format::Json(json) => json.finish(out),
        }
    }

    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        match &self.format {
            Format::Multipart(multipart) => multipart.buffered(),
            Format::Json(json) => json.buffered(),
        }
    }
}

impl BatchRoute {
    fn new(context: &RequestContext<'_>) -> Self {
        let public_path = context
            .public_base
            .and_then(|base| base.split_once("://"))
            .map_or("", |(_, rest)| rest.find('/').map_or("", |i| &rest[i..]));
        let prefix = context.route_prefix;
        let upstream_path = context
            .upstream_url
            .split_once("://")
            .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
            .unwrap_or("/");
        let relative_base = match context.path.rfind('/') {
            Some(i) => context.path[..=i].to_owned(),
            None => prefix.to_owned(),
        };
        Self {
            public: context
                .public_base
                .map(|base| LinkMap::new(&format!("{base}{prefix}"), context.upstream_url)),
            upstream: LinkMap::new(context.upstream_url, context.upstream_url),
            upstream_url: context.upstream_url.to_owned(),
            path_prefix: format!("{public_path}{prefix}"),
            upstream_path: upstream_path.to_owned(),
            route_prefix: prefix.to_owned(),
            relative_base,
            nested: context
                .other_prefixes
                .iter()
                .filter(|other| {
                    other.len() > prefix.len()
                        && other.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
                })
                .map(|other| other.to_ascii_lowercase())
                .collect(),
            api_key_header: context.policy.api_key_header.clone(),
            allow_underscores: context.policy.allow_underscores,
            strip: context.policy.strip.to_vec(),
            upstream_authority: context.upstream_authority.to_owned(),
        }
    }

    /// Whether an inner request's header is removed: exactly what the header policy
    /// removes from the batch request itself (`RequestPolicy::forbids`). A name that is
    /// not a valid header name is removed too.
    fn drops_header(&self, name: &[u8]) -> bool {
        let Ok(name) = HeaderName::from_bytes(name) else {
            return true;
        };
        RequestPolicy {
            api_key_header: &self.api_key_header,
            allow_underscores: self.allow_underscores,
            strip: &self.strip,
        }
        .forbids(&name)
    }

    /// An inner request's URL in the upstream's form, or why the batch is refused.
    fn translate(&self, url: &[u8]) -> Result<Vec<u8>, BatchError> {
        if url.is_empty() {
            return Err(BatchError::Malformed("an inner request has no URL"));
        }
        if url.iter().any(|&b| b <= b' ' || b >= 0x7f) {
            return Err(BatchError::BadUrl(PathError::ControlCharacter));
        }
        if url.contains(&b'#') {
            return Err(BatchError::BadUrl(PathError::NotOriginForm));
        }
        // The URL in the upstream's form, the proxy path it resolves against, and the
        // part of it after that.
        let (translated, base, rest) = if url.starts_with(b"//") {
            // A network-path reference names a host.
            return Err(BatchError::OutsideRoute);
        } else if has_scheme(url) {
            if let Some(rest) = self.public.as_ref().and_then(|p| p.strip(url)) {
                let mut translated = self.upstream_url.as_bytes().to_vec();
                translated.extend_from_slice(rest);
                (translated, &self.route_prefix, rest)
            } else if let Some(rest) = self.upstream.strip(url) {
                (url.to_vec(), &self.route_prefix, rest)
            } else {
                return Err(BatchError::OutsideRoute);
            }
        } else if url.starts_with(b"/") {
            let Some(rest) = strip_prefix_ignore_case(url, self.path_prefix.as_bytes()) else {
                return Err(BatchError::OutsideRoute);
            };
            let mut translated = self.upstream_path.as_bytes().to_vec();
            translated.extend_from_slice(rest);
            (translated, &self.route_prefix, rest)
        } else {
            (url.to_vec(), &self.relative_base, url)
        };
        self.check(base, rest)?;
        Ok(translated)
    }

    /// Checks the proxy path an inner URL resolves to: safe, and this route's.
    fn check(&self, base: &str, rest: &[u8]) -> Result<(), BatchError> {
        let rest = std::str::from_utf8(rest).map_err(|_| BatchError::OutsideRoute)?;
        let path = rest.split('?').next().unwrap_or_default();
        let resolved = format!("{base}{path}");
        routing::check_path(&resolved).map_err(BatchError::BadUrl)?;
        let lower = resolved.to_ascii_lowercase();
        for nested in &self.nested {
            let bare = nested.trim_end_matches('/');
            if lower.starts_with(nested.as_str())
                || lower == bare
                || lower.strip_prefix(bare).is_some_and(|r| r.starts_with('('))
            {
                return Err(BatchError::OutsideRoute);
            }
        }
        Ok(())
    }
}

/// `scheme:` at the start (RFC 3986 §3.1).
fn has_scheme(url: &[u8]) -> bool {
    let Some(colon) = memchr::memchr(b':', url) else {
        return false;
    };
    let scheme = &url[..colon];
    scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

fn strip_prefix_ignore_case<'v>(value: &'v [u8], prefix: &[u8]) -> Option<&'v [u8]> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &value[prefix.len()..])
}

/// Translates a batch request body. Reads ahead until the body ends or [`LOOKAHEAD`]
/// bytes of translated output are ready: a batch that ends within it is checked whole
/// before this returns (and kept for a replay when it is small); a longer one continues
/// as a stream that is checked as it goes. Errors are the inner body's own or a
/// [`BatchError`].
pub(crate) async fn translate_body(
    mut body: UpstreamBody,
    mut batch: Batch,
) -> Result<UpstreamBody, BoxError> {
    let mut out = BytesMut::new();
    loop {
        match body.frame().await {
            None => {
                batch.finish(&mut out)?;
                let out = out.freeze();
                return Ok(if out.len() <= REPLAY_LIMIT {
                    UpstreamBody::Buffered(Some(out))
                } else {
                    UpstreamBody::Batch(Box::new(BatchStream {
                        ready: Some(out),
                        inner: None,
                        batch,
                    }))
                });
            }
            Some(frame) => {
                // Trailers are not forwarded.
                if let Ok(data) = frame?.into_data() {
                    batch.push(&data, &mut out)?;
                }
                if out.len() >= LOOKAHEAD {
                    return Ok(UpstreamBody::Batch(Box::new(BatchStream {
                        ready: Some(out.freeze()),
                        inner: Some(body),
                        batch,
                    })));
                }
            }
        }
    }
}

/// A batch body longer than [`LOOKAHEAD`]: the checked start, then the rest translated
/// as it arrives. A refusal ends the stream with the [`BatchError`], which aborts the
/// upstream request before its end.
#[derive(Debug)]
pub(crate) struct BatchStream {
    ready: Option<Bytes>,
    /// `None` once the inbound body has ended.
    inner: Option<UpstreamBody>,
    batch: Batch,
}

impl Body for BatchStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let Some(ready) = this.ready.take()
                && !ready.is_empty()
            {
                return Poll::Ready(Some(Ok(Frame::data(ready))));
            }
            let Some(inner) = &mut this.inner else {
                return Poll::Ready(None);
            };
            let mut out = BytesMut::new();
            match ready!(Pin::new(inner).poll_frame(cx)) {
                None => {
                    this.inner = None;
                    if let Err(error) = this.batch.finish(&mut out) {
                        return Poll::Ready(Some(Err(error.into())));
                    }
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && let Err(error) = this.batch.push(&data, &mut out)
                    {
                        this.inner = None;
                        return Poll::Ready(Some(Err(error.into())));
                    }
                }
            }
            this.ready = Some(out.freeze());
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_none() && self.ready.as_ref().is_none_or(Bytes::is_empty)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests;
