//! Request sanity checks made before anything else, on what hyper hands over.
//!
//! hyper already rejects most broken HTTP/1 framing (conflicting or signed
//! `Content-Length`, obfuscated `Transfer-Encoding`, obs-fold, NUL in headers). What it
//! passes on and this module refuses: methods outside the allow-list (405; `TRACE` would
//! reflect the injected token, `CONNECT` would open a tunnel), absolute-form and asterisk
//! targets, missing or duplicate `Host` (RFC 9112 §3.2), duplicate `Authorization` or API
//! key headers (never check one value and forward another), HTTP/2 `:scheme` other than
//! `http`/`https`, user info in `:authority` or `Host`, `:authority` and `Host` naming
//! different hosts (RFC 9113 §8.3.1), `Content-Length` together with
//! `Transfer-Encoding` (seen by the connection's framing audit, since hyper removes the
//! length before the request gets here), and unsafe request targets (`routing::check_target`:
//! the path, and raw bytes outside printable ASCII in the query).

use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderName, Method, Request, Uri, Version, header};

use super::error::ProxyError;
use crate::routing;

/// What the connection's framing audit found in one request head: the server's audit
/// produces it (one per request, passed beside the request), the checks here read it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Framing {
    /// Both `Content-Length` and `Transfer-Encoding` were present.
    pub(crate) ambiguous_length: bool,
    /// The head was larger than `server.limits.max_header_bytes` or had more than 100
    /// header fields (HTTP/2: a header list larger than the limit). For HTTP/1, hyper got
    /// a stand-in head without fields and the connection reads nothing more.
    pub(crate) head_too_large: bool,
}

/// Longest request target accepted (Kestrel's `MaxRequestLineSize` is 8 KiB too).
const MAX_TARGET: usize = 8 * 1024;

pub(crate) fn check<B>(
    request: &Request<B>,
    framing: Framing,
    api_key_header: &HeaderName,
) -> Result<(), ProxyError> {
    // The connection saw a head over `max_header_bytes`: what hyper passed on is a stand-in.
    if framing.head_too_large {
        return Err(ProxyError::HeadersTooLarge);
    }
    check_method(request.method())?;
    let uri = request.uri();
    if uri.path_and_query().map_or(0, |pq| pq.as_str().len()) > MAX_TARGET {
        return Err(ProxyError::UriTooLong);
    }
    if request.version() < Version::HTTP_2 && (uri.scheme().is_some() || uri.authority().is_some())
    {
        return Err(ProxyError::BadRequest(
            "absolute-form request targets are not accepted; send the path only",
        ));
    }
    check_headers(request.headers(), request.version(), api_key_header)?;
    check_authority(uri, request.headers())?;
    // hyper drops Content-Length when Transfer-Encoding is present; the audit saw both.
    if framing.ambiguous_length {
        return Err(ProxyError::BadRequest(
            "Content-Length and Transfer-Encoding together are ambiguous",
        ));
    }
    routing::check_target(uri.path(), uri.query())?;
    Ok(())
}

fn check_method(method: &Method) -> Result<(), ProxyError> {
    match *method {
        Method::GET
        | Method::HEAD
        | Method::POST
        | Method::PUT
        | Method::PATCH
        | Method::DELETE
        | Method::OPTIONS => Ok(()),
        _ => Err(ProxyError::MethodNotAllowed),
    }
}

fn check_headers(
    headers: &HeaderMap,
    version: Version,
    api_key_header: &HeaderName,
) -> Result<(), ProxyError> {
    let hosts = headers.get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    if hosts == 0 && version == Version::HTTP_11 {
        return Err(ProxyError::BadRequest(
            "HTTP/1.1 requests need a Host header",
        ));
    }
    if headers.get_all(header::AUTHORIZATION).iter().count() > 1 {
        return Err(ProxyError::BadRequest("more than one Authorization header"));
    }
    if headers.get_all(api_key_header).iter().count() > 1 {
        return Err(ProxyError::BadRequest("more than one API key header"));
    }
    if headers.contains_key(header::CONTENT_LENGTH)
        && headers.contains_key(header::TRANSFER_ENCODING)
    {
        return Err(ProxyError::BadRequest(
            "Content-Length and Transfer-Encoding together are ambiguous",
        ));
    }
    // SECURITY.md catalogue D3: hyper reads `03` or `00000000000000000003` as 3; another parser
    // may not. Only the canonical decimal form is accepted (identical duplicates, which
    // hyper collapses, stay allowed).
    if !headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .all(|value| canonical_length(value.as_bytes()))
    {
        return Err(ProxyError::BadRequest(
            "Content-Length must be a plain decimal number",
        ));
    }
    // SECURITY.md catalogue D2: hyper accepts `chunked, chunked` and a repeated
    // `Transfer-Encoding: chunked`; the only coding a request may carry is one `chunked`.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let mut codings = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii);
        let single_chunked = codings
            .next()
            .is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked"))
            && codings.next().is_none();
        if !single_chunked {
            return Err(ProxyError::BadRequest(
                "Transfer-Encoding must be exactly `chunked`",
            ));
        }
    }
    Ok(())
}

/// The target's scheme and authority as the caller states them: HTTP/2's `:scheme` and
/// `:authority` (absolute-form is refused for HTTP/1 before this) and `Host`. hyper
/// accepts any `:scheme`, user info in `:authority`, and a `Host` naming another host.
fn check_authority(uri: &Uri, headers: &HeaderMap) -> Result<(), ProxyError> {
    let scheme = uri.scheme().map_or("http", Scheme::as_str);
    let https = scheme.eq_ignore_ascii_case("https");
    if !https && !scheme.eq_ignore_ascii_case("http") {
        return Err(ProxyError::BadRequest("the :scheme must be http or https"));
    }
    // RFC 9113 §8.3.1: `:authority` MUST NOT include the userinfo subcomponent; RFC 9110
    // §7.2: neither does `Host`. It would reach the upstream in `X-Forwarded-Host`.
    let authority = uri.authority();
    if authority.is_some_and(|authority| authority.as_str().contains('@')) {
        return Err(ProxyError::BadRequest(
            "the :authority must not carry user information",
        ));
    }
    let Some(host) = headers.get(header::HOST) else {
        return Ok(());
    };
    if host.as_bytes().contains(&b'@') {
        return Err(ProxyError::BadRequest(
            "the Host header must not carry user information",
        ));
    }
    // RFC 9113 §8.3.1: a `Host` that identifies another entity than `:authority` makes
    // the request malformed; compared after normalisation (RFC 3986 §6.2.2.1, §6.2.3).
    if let Some(authority) = authority {
        let default_port = if https { 443 } else { 80 };
        let same = Authority::try_from(host.as_bytes()).is_ok_and(|host| {
            host.host().eq_ignore_ascii_case(authority.host())
                && host.port_u16().unwrap_or(default_port)
                    == authority.port_u16().unwrap_or(default_port)
        });
        if !same {
            return Err(ProxyError::BadRequest(
                "the :authority and Host headers name different hosts",
            ));
        }
    }
    Ok(())
}

/// `0`, or up to 19 digits without a leading zero (fits in a `u64`).
fn canonical_length(value: &[u8]) -> bool {
    let value = value.trim_ascii();
    value == b"0"
        || (!value.is_empty()
            && value.len() <= 19
            && value[0] != b'0'
            && value.iter().all(u8::is_ascii_digit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(
        method: &str,
        target: &str,
        version: Version,
        headers: &[(&str, &str)],
    ) -> Request<()> {
        let mut builder = Request::builder()
            .method(method)
            .uri(target)
            .version(version);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    fn status(request: &Request<()>) -> Option<u16> {
        status_with(request, Framing::default())
    }

    fn status_with(request: &Request<()>, framing: Framing) -> Option<u16> {
        check(request, framing, &HeaderName::from_static("x-api-key"))
            .err()
            .map(|e| e.status().as_u16())
    }

    const HOST: (&str, &str) = ("host", "proxy");

    #[test]
    fn what_the_framing_audit_saw_decides_first() {
        let fine = request("GET", "/bc/x", Version::HTTP_11, &[HOST]);
        assert_eq!(status_with(&fine, Framing::default()), None);
        let too_large = Framing {
            head_too_large: true,
            ..Framing::default()
        };
        assert_eq!(status_with(&fine, too_large), Some(431));
        let ambiguous = Framing {
            ambiguous_length: true,
            ..Framing::default()
        };
        assert_eq!(status_with(&fine, ambiguous), Some(400));
    }

    #[test]
    fn methods_outside_the_allow_list_are_405() {
        for method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
            assert_eq!(
                status(&request(method, "/bc/x", Version::HTTP_11, &[HOST])),
                None
            );
        }
        for method in ["TRACE", "CONNECT", "get", "PROPFIND", "TRACK", "FOO"] {
            let target = if method == "CONNECT" {
                "host:443"
            } else {
                "/bc/x"
            };
            assert_eq!(
                status(&request(method, target, Version::HTTP_11, &[HOST])),
                Some(405),
                "{method}"
            );
        }
    }

    #[test]
    fn target_forms_and_host_rules() {
        assert_eq!(
            status(&request(
                "GET",
                "http://evil.test/bc/x",
                Version::HTTP_11,
                &[HOST]
            )),
            Some(400)
        );
        assert_eq!(
            status(&request("OPTIONS", "*", Version::HTTP_11, &[HOST])),
            Some(400)
        );
        assert_eq!(
            status(&request("GET", "/bc/x", Version::HTTP_11, &[])),
            Some(400)
        );
        assert_eq!(
            status(&request("GET", "/bc/x", Version::HTTP_10, &[])),
            None
        );
        assert_eq!(
            status(&request(
                "GET",
                "/bc/x",
                Version::HTTP_11,
                &[HOST, ("host", "b")]
            )),
            Some(400)
        );
        // HTTP/2 requests carry scheme and authority from their pseudo-headers.
        assert_eq!(
            status(&request("GET", "http://proxy/bc/x", Version::HTTP_2, &[])),
            None
        );
    }

    #[test]
    fn http2_scheme_and_authority_must_be_plain_and_agree_with_host() {
        let h2 = |target: &str, headers: &[(&str, &str)]| {
            status(&request("GET", target, Version::HTTP_2, headers))
        };
        assert_eq!(h2("https://proxy/bc/x", &[]), None);
        assert_eq!(h2("HTTP://proxy/bc/x", &[]), None);
        assert_eq!(h2("ftp://proxy/bc/x", &[]), Some(400));
        assert_eq!(h2("ws://proxy/bc/x", &[]), Some(400));
        assert_eq!(h2("http://user:pw@proxy/bc/x", &[]), Some(400));
        assert_eq!(
            h2("http://user@proxy/bc/x", &[("host", "proxy")]),
            Some(400)
        );
        assert_eq!(h2("http://proxy/bc/x", &[("host", "evil.test")]), Some(400));
        assert_eq!(
            h2("http://proxy/bc/x", &[("host", "proxy:8080")]),
            Some(400)
        );
        assert_eq!(
            h2("http://proxy/bc/x", &[("host", "not a host")]),
            Some(400)
        );
        // The same entity, normalised (RFC 3986 §6.2.2.1, §6.2.3).
        assert_eq!(h2("http://proxy/bc/x", &[("host", "PROXY")]), None);
        assert_eq!(h2("http://proxy:80/bc/x", &[("host", "proxy")]), None);
        assert_eq!(h2("https://proxy/bc/x", &[("host", "proxy:443")]), None);
        assert_eq!(h2("https://proxy/bc/x", &[("host", "proxy:80")]), Some(400));
        // No user info in Host either, whatever the version.
        assert_eq!(
            status(&request(
                "GET",
                "/bc/x",
                Version::HTTP_11,
                &[("host", "admin@proxy")]
            )),
            Some(400)
        );
    }

    #[test]
    fn duplicate_credentials_and_ambiguous_framing_are_400() {
        let auth = ("authorization", "Basic dTpw");
        assert_eq!(
            status(&request(
                "GET",
                "/bc/x",
                Version::HTTP_11,
                &[HOST, auth, ("authorization", "Bearer x")]
            )),
            Some(400)
        );
        assert_eq!(
            status(&request(
                "GET",
                "/bc/x",
                Version::HTTP_11,
                &[HOST, ("x-api-key", "a"), ("x-api-key", "b")]
            )),
            Some(400)
        );
        assert_eq!(
            status(&request(
                "POST",
                "/bc/x",
                Version::HTTP_11,
                &[
                    HOST,
                    ("content-length", "6"),
                    ("transfer-encoding", "chunked")
                ]
            )),
            Some(400)
        );
        assert_eq!(
            status(&request("GET", "/bc/../crm/x", Version::HTTP_11, &[HOST])),
            Some(400)
        );
    }

    #[test]
    fn only_canonical_lengths_and_a_single_chunked_coding_pass() {
        let post = |headers: &[(&str, &str)]| {
            let mut all = vec![HOST];
            all.extend_from_slice(headers);
            status(&request("POST", "/bc/x", Version::HTTP_11, &all))
        };
        for ok in ["0", "3", "1234567890123456789"] {
            assert_eq!(post(&[("content-length", ok)]), None, "{ok}");
        }
        assert_eq!(
            post(&[("content-length", "3"), ("content-length", "3")]),
            None
        );
        for bad in [
            "03",
            "00",
            "00000000000000000003",
            "12345678901234567890",
            "+3",
            "",
        ] {
            assert_eq!(post(&[("content-length", bad)]), Some(400), "{bad:?}");
        }
        for ok in ["chunked", "Chunked", " chunked "] {
            assert_eq!(post(&[("transfer-encoding", ok)]), None, "{ok}");
        }
        for bad in ["chunked, chunked", "gzip, chunked", "identity", "", ","] {
            assert_eq!(post(&[("transfer-encoding", bad)]), Some(400), "{bad:?}");
        }
        assert_eq!(
            post(&[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked")
            ]),
            Some(400)
        );
    }
}
