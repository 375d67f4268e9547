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
//! cookie crumbs are joined into one `Cookie`.

use std::net::IpAddr;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Hop-by-hop headers (RFC 9110 §7.6.1, RFC 9113 §8.2.2) and relatives that only concern
/// one connection.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "http2-settings"
    )
}

/// Request headers never passed upstream besides the hop-by-hop ones: the caller's
/// credentials, values the proxy computes, overrides some backends honour for routing or
/// method decisions (the proxy decided on the request line alone), and identity or
/// forwarding headers a frontend the upstream trusts would set (Azure App Service
/// authentication's `X-MS-CLIENT-PRINCIPAL*` and `X-MS-TOKEN-*`, ARR's `X-ARR-*`, Front
/// Door's `X-Azure-*`, Cloudflare's `CF-Connecting-IP`, Envoy's `X-Envoy-*`, …): a caller
/// must not be able to claim to be someone else. Every `X-Forwarded-*` is dropped; the
/// proxy then sets `X-Forwarded-For`, `-Proto` and `-Host` itself.
///
/// Names reach here lowercase (`HeaderName`), so the prefix families match
/// case-insensitively; one comparison of the first byte keeps the common case cheap.
fn is_dropped_request_header(name: &str) -> bool {
    const X_FAMILIES: [&str; 7] = [
        "x-forwarded-",
        "x-original-",
        "x-arr-",
        "x-ms-client-principal",
        "x-ms-token-",
        "x-azure-",
        "x-envoy-",
    ];
    match name.as_bytes().first() {
        Some(b'x') => {
            matches!(
                name,
                "x-request-id"
                    | "x-real-ip"
                    | "x-client-ip"
                    | "x-remote-user"
                    | "x-rewrite-url"
                    | "x-http-method-override"
                    | "x-http-method"
                    | "x-method-override"
            ) || X_FAMILIES.iter().any(|family| name.starts_with(family))
        }
        Some(_) => matches!(
            name,
            "authorization"
                | "host"
                | "expect"
                | "forwarded"
                | "true-client-ip"
                | "cf-connecting-ip"
                | "remote-user"
        ),
        None => false,
    }
}

/// Whether the proxy itself removes, replaces or acts on this request header: a
/// hop-by-hop header, a caller credential, one the proxy computes, or an identity or
/// forwarding header.
pub(crate) fn is_proxy_managed(name: &HeaderName) -> bool {
    is_hop_by_hop(name) || is_dropped_request_header(name.as_str())
}

/// Whether the proxy sets this request header itself (so no config can strip it).
pub(crate) fn is_proxy_set(name: &HeaderName) -> bool {
    *name == header::HOST
        || *name == header::AUTHORIZATION
        || *name == X_FORWARDED_FOR
        || *name == X_FORWARDED_PROTO
        || *name == X_FORWARDED_HOST
        || *name == X_REQUEST_ID
}

/// Which of a caller's request headers a route forwards: everything but what
/// [`RequestPolicy::forbids`] names, and the headers named in `Connection`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestPolicy<'a> {
    pub(crate) api_key_header: &'a HeaderName,
    /// `server.allow_underscore_headers`.
    pub(crate) allow_underscores: bool,
    /// The route's `strip_request_headers`.
    pub(crate) strip: &'a [HeaderName],
}

impl RequestPolicy<'_> {
    /// Whether a caller's request header must not be forwarded: hop-by-hop, a credential,
    /// one the proxy computes, an identity or forwarding header, a name with `_` (unless
    /// allowed) or one the route strips. Applies to any request the caller writes, so a
    /// `$batch` part's headers are filtered with it too.
    pub(crate) fn forbids(&self, name: &HeaderName) -> bool {
        if name.as_str().contains('_') {
            // nginx's default: CGI-style backends read `X_Forwarded_For` as the
            // `HTTP_X_FORWARDED_FOR` of `X-Forwarded-For`. Allowed underscore names are
            // still judged as the name a CGI backend sees.
            if !self.allow_underscores {
                return true;
            }
            let dashed = name.as_str().replace('_', "-");
            return HeaderName::from_bytes(dashed.as_bytes())
                .map_or(true, |dashed| self.forbids_name(&dashed));
        }
        self.forbids_name(name)
    }

    fn forbids_name(&self, name: &HeaderName) -> bool {
        is_proxy_managed(name) || name == self.api_key_header || self.strip.contains(name)
    }
}

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
    fn identity_and_forwarding_headers_are_forbidden_in_every_case() {
        let key = HeaderName::from_static("x-api-key");
        let strip = [HeaderName::from_static("x-debug-user")];
        let policy = |allow_underscores| RequestPolicy {
            api_key_header: &key,
            allow_underscores,
            strip: &strip,
        };
        let forbids = |policy: RequestPolicy<'_>, name: &str| {
            policy.forbids(&HeaderName::from_bytes(name.as_bytes()).unwrap())
        };
        for name in [
            "X-Forwarded-For",
            "X-Forwarded-Port",
            "X-FORWARDED-USER",
            "Forwarded",
            "X-Real-IP",
            "X-Original-For",
            "X-Original-URL",
            "X-Client-IP",
            "True-Client-IP",
            "CF-Connecting-IP",
            "X-ARR-ClientCert",
            "X-Arr-Ssl",
            "X-MS-CLIENT-PRINCIPAL",
            "X-MS-CLIENT-PRINCIPAL-NAME",
            "x-ms-client-principal-idp",
            "X-MS-TOKEN-AAD-ACCESS-TOKEN",
            "X-Azure-FDID",
            "Remote-User",
            "X-Remote-User",
            "X-Envoy-Original-Path",
            "X-Request-Id",
            "X-API-Key",
            "X-Debug-User",
            "Proxy-Authorization",
            "Authorization",
            "Host",
        ] {
            assert!(forbids(policy(false), name), "{name}");
            assert!(forbids(policy(true), name), "{name}");
            // The same header spelled CGI-style.
            let underscored = name.replace('-', "_");
            assert!(forbids(policy(false), &underscored), "{underscored}");
            assert!(forbids(policy(true), &underscored), "{underscored}");
        }
        for name in [
            "If-Match",
            "Prefer",
            "Cookie",
            "OData-MaxVersion",
            "X-Forwarded",
            "X-Msal-Client",
            "X-Original",
            "X-Arrival",
            "Remote-Address",
            "traceparent",
            "X-Request-Ids",
        ] {
            assert!(!forbids(policy(false), name), "{name}");
        }
        assert!(forbids(policy(false), "X_Custom"));
        assert!(!forbids(policy(true), "X_Custom"));
    }

    #[test]
    fn identity_headers_are_proxy_managed_for_the_config_check() {
        for name in [
            "x-ms-client-principal-name",
            "x-forwarded-port",
            "remote-user",
        ] {
            assert!(is_proxy_managed(&HeaderName::from_static(name)), "{name}");
        }
        assert!(!is_proxy_managed(&HeaderName::from_static("x-api-key")));
        for name in ["host", "authorization", "x-forwarded-for", "x-request-id"] {
            assert!(is_proxy_set(&HeaderName::from_static(name)), "{name}");
        }
        assert!(!is_proxy_set(&HeaderName::from_static("x-real-ip")));
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
