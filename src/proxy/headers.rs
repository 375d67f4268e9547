//! Header rules for both directions.
//!
//! Order matters (CVE-2022-31813): first remove hop-by-hop headers and every header the
//! `Connection` header names (RFC 9110 §7.6.1), then the caller's credentials and the
//! headers the proxy computes itself, and only then add the proxy's own. So a caller can
//! neither delete the injected token with `Connection: Authorization` nor smuggle its own
//! `X-Forwarded-For`, `Authorization` or route/method override to the upstream.
//!
//! The request side is one pass over the header names present: [`RequestPolicy::forbids`]
//! also drops identity and forwarding headers (`X-MS-CLIENT-PRINCIPAL-NAME`,
//! `True-Client-IP`, …), names with `_` and a route's `strip_request_headers`. HTTP/2
//! cookie crumbs are joined into one `Cookie`. Which names are dropped is decided in
//! `crate::header_names`; this module applies it to header maps.

use std::net::IpAddr;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

pub(crate) use crate::header_names::{RequestPolicy, X_REQUEST_ID};
use crate::header_names::{X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, is_hop_by_hop};

/// The TCP peer of a connection, with its `X-Forwarded-For` entry rendered once per
/// connection rather than once per request.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) ip: IpAddr,
    forwarded_for: HeaderValue,
}

impl Peer {
    pub(crate) fn new(ip: IpAddr) -> Self {
        let forwarded_for = HeaderValue::try_from(ip.to_canonical().to_string())
            .unwrap_or(HeaderValue::from_static("unknown"));
        Self { ip, forwarded_for }
    }
}

/// What the proxy knows about the inbound request, for the headers it adds.
#[derive(Debug)]
pub(crate) struct Forwarding<'a> {
    pub(crate) peer: &'a Peer,
    pub(crate) peer_is_trusted_proxy: bool,
    /// `http` or `https`: how the caller reached the proxy.
    pub(crate) proto: &'static str,
    pub(crate) policy: RequestPolicy<'a>,
    pub(crate) request_id: &'a HeaderValue,
    /// The request target's authority: HTTP/2 callers send `:authority`, not `Host`.
    pub(crate) authority: Option<&'a http::uri::Authority>,
}

/// The headers to send upstream, without `Authorization` (added per attempt) and without
/// `Host` (the client sets it from the upstream URI).
pub(crate) fn to_upstream(mut headers: HeaderMap, forwarding: &Forwarding<'_>) -> HeaderMap {
    let inbound_host = headers.get(header::HOST).cloned();
    let (forwarded_for, forwarded_proto, forwarded_host) = if forwarding.peer_is_trusted_proxy {
        (
            joined(&headers, &X_FORWARDED_FOR),
            headers.get(&X_FORWARDED_PROTO).cloned(),
            headers.get(&X_FORWARDED_HOST).cloned(),
        )
    } else {
        (None, None, None)
    };

    remove_hop_by_hop_and(&mut headers, |name| forwarding.policy.forbids(name));
    join_cookie_crumbs(&mut headers);

    let xff = match forwarded_for {
        Some(chain) => {
            HeaderValue::try_from(format!("{chain}, {}", forwarding.peer.ip.to_canonical())).ok()
        }
        None => Some(forwarding.peer.forwarded_for.clone()),
    };
    if let Some(value) = xff {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(
        X_FORWARDED_PROTO,
        forwarded_proto.unwrap_or(HeaderValue::from_static(forwarding.proto)),
    );
    let authority = forwarding
        .authority
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    if let Some(host) = forwarded_host.or(inbound_host).or(authority) {
        headers.insert(X_FORWARDED_HOST, host);
    }
    headers.insert(X_REQUEST_ID, forwarding.request_id.clone());
    headers
}

/// Cleans an upstream response's headers for the caller.
pub(crate) fn to_client(headers: &mut HeaderMap) {
    // With Transfer-Encoding the client decoded the body as chunked; a Content-Length next
    // to it is wrong and must not reach the caller (RFC 9112 §6.3: an intermediary
    // removes it; SECURITY.md catalogue D14). The body is re-framed on the way out.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    // The upstream's bearer challenge means nothing to a caller that authenticates to the
    // proxy, and it names the upstream's identity provider.
    remove_hop_by_hop_and(headers, |name| name == header::WWW_AUTHENTICATE);
}

/// Removes hop-by-hop headers, every header named in `Connection`, and those `also`
/// picks. The fixed rules are checked in one pass over the names present, so a request
/// without such headers costs no hashed lookups; the `Connection` list comes from the
/// peer and may be long, so its names are removed by hashed lookup, each once.
fn remove_hop_by_hop_and(headers: &mut HeaderMap, also: impl Fn(&HeaderName) -> bool) {
    // Split the raw bytes: one odd byte must not make the whole list unreadable.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name) || also(name))
        .cloned()
        .collect();
    for name in &doomed {
        headers.remove(name);
    }
}

/// HTTP/2 callers may split `Cookie` into one field per cookie (RFC 9113 §8.2.3); they
/// are joined with `; ` before forwarding, as an HTTP/1.1 upstream expects exactly one
/// `Cookie` header (RFC 6265 §5.4).
fn join_cookie_crumbs(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (crumbs.next(), crumbs.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    let mut sensitive = first.is_sensitive();
    for crumb in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(crumb.as_bytes());
        sensitive |= crumb.is_sensitive();
    }
    // Joined valid values with `; ` are a valid value.
    if let Ok(mut value) = HeaderValue::from_bytes(&joined) {
        value.set_sensitive(sensitive);
        headers.insert(header::COOKIE, value);
    }
}

/// All values of a list header joined with `, `.
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

/// The caller's `X-Request-Id` when it is a sane token, else a new random id.
pub(crate) fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(value) = headers.get(&X_REQUEST_ID) {
        let bytes = value.as_bytes();
        let sane = !bytes.is_empty()
            && bytes.len() <= 128
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(b));
        if sane {
            return value.clone();
        }
    }
    let mut id = [0u8; 32];
    // 16 bytes always fit 32 hex digits, and hex digits are a valid header value.
    let _ = hex::encode_to_slice(fastrand::u128(..).to_be_bytes(), &mut id);
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        headers
    }

    static PEER: std::sync::LazyLock<Peer> =
        std::sync::LazyLock::new(|| Peer::new("127.0.0.2".parse().unwrap()));

    fn forwarding<'a>(trusted: bool, key: &'a HeaderName, id: &'a HeaderValue) -> Forwarding<'a> {
        Forwarding {
            peer: &PEER,
            peer_is_trusted_proxy: trusted,
            proto: "http",
            policy: RequestPolicy {
                api_key_header: key,
                allow_underscores: false,
                strip: &[],
            },
            request_id: id,
            authority: None,
        }
    }

    #[test]
    fn strips_hop_by_hop_credentials_and_connection_named_headers() {
        let key = HeaderName::from_static("x-api-key");
        let id = HeaderValue::from_static("req-1");
        let inbound = map(&[
            ("host", "proxy.test"),
            ("authorization", "Basic YWNtZTpwdw=="),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("x-api-key", "ak_CANARY"),
            ("connection", "keep-alive, X-Foo, X-Forwarded-For"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "X"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("x-foo", "1"),
            ("x-original-url", "/crm/x"),
            ("x-forwarded-uri", "/public"),
            ("x-forwarded-prefix", "/crm"),
            ("x-http-method-override", "DELETE"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil.test"),
            ("forwarded", "for=6.6.6.6"),
            ("if-match", "W/\"JzQ0OzE7MDsn\""),
            ("prefer", "odata.maxpagesize=100"),
            ("data-access-intent", "ReadOnly"),
            ("odata-version", "4.0"),
            ("cookie", "a=b"),
            ("accept-language", "da-DK"),
        ]);
        let out = to_upstream(inbound, &forwarding(false, &key, &id));
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "accept-language",
                "cookie",
                "data-access-intent",
                "if-match",
                "odata-version",
                "prefer",
                "x-forwarded-for",
                "x-forwarded-host",
                "x-forwarded-proto",
                "x-request-id",
            ]
        );
        assert_eq!(out["x-forwarded-for"], "127.0.0.2");
        assert_eq!(out["x-forwarded-host"], "proxy.test");
        assert_eq!(out["x-forwarded-proto"], "http");
        assert_eq!(out["x-request-id"], "req-1");
    }

    #[test]
    fn cookie_crumbs_are_joined_into_one_header() {
        let key = HeaderName::from_static("x-api-key");
        let id = HeaderValue::from_static("r");
        let inbound = map(&[("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")]);
        let out = to_upstream(inbound, &forwarding(false, &key, &id));
        let cookies: Vec<&HeaderValue> = out.get_all("cookie").iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
        let out = to_upstream(map(&[("cookie", "a=1")]), &forwarding(false, &key, &id));
        assert_eq!(out.get_all("cookie").iter().count(), 1);
        assert_eq!(out["cookie"], "a=1");
    }

    #[test]
    fn a_long_connection_list_removes_each_named_header() {
        // 5,000 names (each of x-n0..x-n49 a hundred times) against 60 headers: every
        // named one goes, the rest stay, and the cost is linear in the list.
        let key = HeaderName::from_static("x-api-key");
        let id = HeaderValue::from_static("r");
        let list: Vec<String> = (0..5000).map(|i| format!("x-n{}", i % 50)).collect();
        let mut inbound = map(&[("connection", &list.join(", "))]);
        for i in 0..60 {
            inbound.insert(
                HeaderName::try_from(format!("x-n{i}")).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        let out = to_upstream(inbound, &forwarding(false, &key, &id));
        let mut kept: Vec<&str> = out
            .keys()
            .map(HeaderName::as_str)
            .filter(|name| name.starts_with("x-n"))
            .collect();
        kept.sort_unstable();
        let expected: Vec<String> = (50..60).map(|i| format!("x-n{i}")).collect();
        assert_eq!(kept, expected);
    }

    #[test]
    fn trusted_proxy_chain_is_appended() {
        let key = HeaderName::from_static("x-api-key");
        let id = HeaderValue::from_static("r");
        let inbound = map(&[
            ("host", "internal"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "10.0.0.9"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "erp-proxy.contoso.com"),
        ]);
        let out = to_upstream(inbound, &forwarding(true, &key, &id));
        assert_eq!(out["x-forwarded-for"], "1.2.3.4, 10.0.0.9, 127.0.0.2");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["x-forwarded-host"], "erp-proxy.contoso.com");
    }

    #[test]
    fn response_headers_lose_hop_by_hop_and_bearer_challenges() {
        let mut headers = map(&[
            ("connection", "close, x-internal"),
            ("connection", "x-other"),
            ("x-other", "2"),
            ("x-internal", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            (
                "www-authenticate",
                "Bearer authorization_uri=\"https://login.example/t\"",
            ),
            ("etag", "W/\"1\""),
            ("location", "https://upstream.test/x"),
        ]);
        to_client(&mut headers);
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["etag", "location"]);
    }

    #[test]
    fn a_content_length_next_to_transfer_encoding_is_dropped() {
        let mut headers = map(&[
            ("content-length", "100"),
            ("transfer-encoding", "chunked"),
            ("etag", "\"1\""),
        ]);
        to_client(&mut headers);
        assert!(headers.get("content-length").is_none());
        assert!(headers.get("transfer-encoding").is_none());
        assert_eq!(headers.len(), 1);
        let mut headers = map(&[("content-length", "100")]);
        to_client(&mut headers);
        assert_eq!(headers.get("content-length").unwrap(), "100");
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_made_otherwise() {
        let kept = request_id(&map(&[("x-request-id", "abc-123")]));
        assert_eq!(kept, "abc-123");
        let made = request_id(&map(&[("x-request-id", "has space;")]));
        assert_eq!(made.len(), 32);
        assert_ne!(request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
    }
}
