//! Which request header names the proxy owns: hop-by-hop headers (RFC 9110 §7.6.1, RFC
//! 9113 §8.2.2), the caller's credentials, the headers the proxy sets itself, identity and
//! forwarding header families, and the underscore rule ([`RequestPolicy`]).
//!
//! Names only, no header values and no requests: configuration validation uses it to
//! refuse `strip_request_headers` and `api_key_header` entries the proxy already handles,
//! and the request pipeline (`proxy::headers`) applies it. It imports nothing of either.

use http::header::{self, HeaderName};

pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Hop-by-hop headers (RFC 9110 §7.6.1, RFC 9113 §8.2.2) and relatives that only concern
/// one connection.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
