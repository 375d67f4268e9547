//! Pure parsers behind the field types (durations, rates, networks, prefixes, GUIDs,
//! fingerprints, URLs and host classes). Messages may quote the value: callers only pass
//! non-secrets.

use crate::config::RateLimit;
use http::uri::{Authority, Scheme};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

/// `500ms`, `30s`, `5m`, `2h`: an integer and a unit. Zero is refused.
pub(super) fn parse_duration(value: &str) -> Result<Duration, String> {
    const HINT: &str = "write a whole number and a unit: `500ms`, `30s`, `5m` or `2h`";
    if value.contains(char::is_whitespace) {
        return Err(format!("`{value}` is not a duration; {HINT}"));
    }
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = value.split_at(digits);
    if number.is_empty() {
        return Err(format!("`{value}` is not a duration; {HINT}"));
    }
    let Ok(n) = number.parse::<u64>() else {
        return Err(format!("`{value}` is too long a duration"));
    };
    let millis_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(format!("`{value}` has no unit; {HINT}")),
        _ => return Err(format!("`{value}` has an unknown unit `{unit}`; {HINT}")),
    };
    if n == 0 {
        return Err(format!("`{value}` is zero; give a positive duration"));
    }
    n.checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{value}` is too long a duration"))
}

/// `100/s`, `20/m`, `6000/5m`, `1000/h`.
pub(super) fn parse_rate_limit(value: &str) -> Result<RateLimit, String> {
    const HINT: &str = "write requests per period, such as `100/s`, `20/m` or `6000/5m`";
    let Some((requests, per)) = value.split_once('/') else {
        return Err(format!("`{value}` is not a rate; {HINT}"));
    };
    let requests = match requests.trim().parse::<u32>() {
        Ok(0) | Err(_) => {
            return Err(format!(
                "`{value}` needs a request count of at least 1; {HINT}"
            ));
        }
        Ok(n) => n,
    };
    let per = per.trim();
    let per = if per.starts_with(|c: char| c.is_ascii_digit()) {
        parse_duration(per).map_err(|_| format!("`{value}` has an invalid period; {HINT}"))?
    } else {
        parse_duration(&format!("1{per}"))
            .map_err(|_| format!("`{value}` has an invalid period; {HINT}"))?
    };
    Ok(RateLimit { requests, per })
}

/// CIDR, or a bare address as a single-host network. Host bits are cleared.
pub(super) fn parse_network(value: &str) -> Option<IpNet> {
    if let Ok(network) = value.parse::<IpNet>() {
        return Some(network.trunc());
    }
    value.parse::<IpAddr>().ok().map(IpNet::from)
}

pub(super) fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') || !prefix.ends_with('/') {
        return Err(format!(
            "`{prefix}` must start and end with `/`, such as `/bc/`"
        ));
    }
    if prefix.contains("//") {
        return Err(format!("`{prefix}` must not contain `//`"));
    }
    if prefix
        .split('/')
        .any(|segment| segment == "." || segment == "..")
        || prefix.contains("..")
    {
        return Err(format!("`{prefix}` must not contain `..` or `.` segments"));
    }
    // Requests with such segments are refused (Windows strips a trailing dot), so a
    // prefix holding one could never match.
    if prefix.split('/').any(|segment| segment.ends_with('.')) {
        return Err(format!(
            "`{prefix}` must not contain a segment ending in `.`"
        ));
    }
    for c in prefix.chars() {
        let problem = match c {
            '%' => "`%` (percent-encoding)",
            '\\' => "`\\`",
            '?' => "`?` (a query)",
            '#' => "`#` (a fragment)",
            ';' => "`;` (requests with it are refused)",
            c if c.is_control() => "a control character",
            c if c.is_whitespace() => "whitespace",
            c if !c.is_ascii() => {
                "a non-ASCII character (request paths carry those percent-encoded)"
            }
            _ => continue,
        };
        return Err(format!("a prefix must not contain {problem}"));
    }
    Ok(())
}

/// `8-4-4-4-12` hexadecimal groups, the form of Entra tenant, application and secret IDs.
pub(crate) fn is_guid(value: &str) -> bool {
    let groups: Vec<&str> = value.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.chars().all(|c| c.is_ascii_hexdigit()))
}

pub(super) fn is_visible_ascii(value: &str) -> bool {
    value.bytes().all(|b| b.is_ascii_graphic())
}

pub(super) fn parse_hex32(hex: &str) -> Option<[u8; 32]> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex, &mut bytes).ok()?;
    Some(bytes)
}

pub(super) fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    parse_hex32(&hex)
}

// ---------------------------------------------------------------------------------------
// URLs

#[derive(Debug, Clone, Copy)]
pub(super) enum UrlUse {
    Upstream {
        allow_plain_http: bool,
    },
    TokenEndpoint,
    /// An Entra authority or a service's environment URL: no query.
    Authority,
    PublicUrl,
}

#[derive(Debug)]
pub(super) struct CheckedUrl {
    pub(super) uri: http::Uri,
    pub(super) scheme: Scheme,
    pub(super) authority: Authority,
    /// Without port; IPv6 in brackets.
    pub(super) host: String,
}

/// Messages name the host at most: a URL may carry credentials.
pub(super) fn check_url(value: &str, usage: UrlUse) -> Result<CheckedUrl, String> {
    const ABSOLUTE: &str = "must be an absolute URL such as https://host/path";
    if value.contains('#') {
        return Err("must not have a fragment (`#…`)".to_owned());
    }
    let uri: http::Uri = value
        .parse()
        .map_err(|error| format!("is not a valid URL ({error}); it {ABSOLUTE}"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned()) else {
        return Err(ABSOLUTE.to_owned());
    };
    if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
        return Err(format!(
            "scheme `{scheme}` is not http or https; it {ABSOLUTE}"
        ));
    }
    if authority.as_str().contains('@') {
        return Err(
            "must not contain user info (`user:password@`); credentials belong under \
             `credentials:`"
                .to_owned(),
        );
    }
    if authority.port().is_some() && authority.port_u16().is_none_or(|p| p == 0) {
        return Err("has an invalid port".to_owned());
    }
    let host = authority.host().to_owned();
    if host.is_empty() {
        return Err(format!("has no host; it {ABSOLUTE}"));
    }
    if uri.query().is_some() && !matches!(usage, UrlUse::TokenEndpoint) {
        return Err("must not have a query (`?…`)".to_owned());
    }
    match classify_host(&host) {
        HostKind::LinkLocal => {
            return Err(format!(
                "host {host} is link-local (169.254.0.0/16, fe80::/10), which is refused: \
                 it reaches cloud metadata services"
            ));
        }
        HostKind::Unusable => {
            return Err(format!(
                "host {host} is not usable; write a DNS name or a dotted-quad IPv4 / bracketed \
                 IPv6 address"
            ));
        }
        HostKind::Loopback | HostKind::Other => {}
    }
    if scheme == Scheme::HTTP && !is_loopback_host(&host) {
        let message = match usage {
            UrlUse::Upstream {
                allow_plain_http: true,
            }
            | UrlUse::PublicUrl => None,
            UrlUse::Upstream {
                allow_plain_http: false,
            } => Some(
                "`http://` is allowed only for loopback hosts (127.0.0.0/8, ::1, localhost); \
                 use https:// or set `allow_plain_http: true` on the route",
            ),
            UrlUse::TokenEndpoint | UrlUse::Authority => Some(
                "`http://` is allowed only for loopback hosts (127.0.0.0/8, ::1, localhost); \
                 token endpoints need https://",
            ),
        };
        if let Some(message) = message {
            return Err(format!("{message} (host {host})"));
        }
    }
    Ok(CheckedUrl {
        uri,
        scheme,
        authority,
        host,
    })
}

/// Whether a URL host (as `http::Uri` or `url::Url` print it: IPv6 in brackets) is
/// loopback: 127.0.0.0/8, `::1` (also IPv4-mapped) or `localhost`. The one test behind
/// "https, or plain http on loopback only", for configured URLs and token endpoints alike.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    classify_host(host) == HostKind::Loopback
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum HostKind {
    Loopback,
    LinkLocal,
    /// Unspecified addresses, and numbers that resolvers read as IPv4 (`2852039166`,
    /// `0xa9.254.169.254`) but a reader would not.
    Unusable,
    Other,
}

pub(super) fn classify_host(host: &str) -> HostKind {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return match inner.parse::<Ipv6Addr>() {
            Ok(ip) => match ip.to_ipv4_mapped() {
                Some(v4) => classify_v4(v4),
                None => classify_v6(ip),
            },
            Err(_) => HostKind::Unusable,
        };
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return classify_v4(ip);
    }
    if host.eq_ignore_ascii_case("localhost") {
        return HostKind::Loopback;
    }
    // WHATWG URL: a host whose last label is numeric is an IPv4 address in some notation.
    let last = host.trim_end_matches('.').rsplit('.').next().unwrap_or("");
    if last.starts_with(|c: char| c.is_ascii_digit()) {
        return HostKind::Unusable;
    }
    HostKind::Other
}

pub(super) fn classify_v4(ip: Ipv4Addr) -> HostKind {
    if ip.is_loopback() {
        HostKind::Loopback
    } else if ip.is_link_local() {
        HostKind::LinkLocal
    } else if ip.is_unspecified() || ip.is_broadcast() {
        HostKind::Unusable
    } else {
        HostKind::Other
    }
}

pub(super) fn classify_v6(ip: Ipv6Addr) -> HostKind {
    if ip.is_loopback() {
        HostKind::Loopback
    } else if ip.is_unicast_link_local() {
        HostKind::LinkLocal
    } else if ip.is_unspecified() {
        HostKind::Unusable
    } else {
        HostKind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(
            parse_duration("30").unwrap_err(),
            "`30` has no unit; write a whole number and a unit: `500ms`, `30s`, `5m` or `2h`"
        );
        assert!(parse_duration("0s").unwrap_err().contains("is zero"));
        assert!(
            parse_duration("1.5s")
                .unwrap_err()
                .contains("unknown unit `.5s`")
        );
        assert!(
            parse_duration("s")
                .unwrap_err()
                .contains("is not a duration")
        );
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5 m").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
        assert!(parse_duration("9999999999999999h").is_err());
    }

    #[test]
    fn rate_limits() {
        let rate = |requests, secs| RateLimit {
            requests,
            per: Duration::from_secs(secs),
        };
        assert_eq!(parse_rate_limit("100/s"), Ok(rate(100, 1)));
        assert_eq!(parse_rate_limit("20/m"), Ok(rate(20, 60)));
        assert_eq!(parse_rate_limit("6000/5m"), Ok(rate(6000, 300)));
        assert_eq!(parse_rate_limit("10/h"), Ok(rate(10, 3600)));
        assert_eq!(parse_rate_limit("6000/300s"), Ok(rate(6000, 300)));
        assert_eq!(parse_rate_limit("4/2s"), Ok(rate(4, 2)));
        assert_eq!(parse_rate_limit("100/1h"), Ok(rate(100, 3600)));
        assert_eq!(parse_rate_limit(" 5 / 10s "), Ok(rate(5, 10)));
        for bad in ["0/s", "100", "100/", "100/x", "/s", "-1/s", "100/0s"] {
            assert!(parse_rate_limit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes() {
        for good in ["/", "/bc/", "/bc-sandbox/v2.0/", "/a~b/"] {
            assert_eq!(check_prefix(good), Ok(()), "{good}");
        }
        for bad in [
            "bc/", "/bc", "", "/a//b/", "/../", "/a/../", "/./", "/a..b/", "/a%2f/", "/a\\b/",
            "/a?b/", "/a#b/", "/a\tb/", "/a b/", "/é/", "/a;b/", "/a./", "/v2./x/",
        ] {
            assert!(check_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts() {
        for (host, kind) in [
            ("127.0.0.1", HostKind::Loopback),
            ("127.1.2.3", HostKind::Loopback),
            ("[::1]", HostKind::Loopback),
            ("LOCALHOST", HostKind::Loopback),
            ("[::ffff:127.0.0.1]", HostKind::Loopback),
            ("169.254.169.254", HostKind::LinkLocal),
            ("[fe80::1]", HostKind::LinkLocal),
            ("[febf::1]", HostKind::LinkLocal),
            ("[::ffff:169.254.169.254]", HostKind::LinkLocal),
            ("2852039166", HostKind::Unusable),
            ("0xa9.254.169.254", HostKind::Unusable),
            ("169.254.43518", HostKind::Unusable),
            ("0.0.0.0", HostKind::Unusable),
            ("[::]", HostKind::Unusable),
            ("api.businesscentral.dynamics.com", HostKind::Other),
            ("10.1.2.3", HostKind::Other),
            ("[fec0::1]", HostKind::Other),
        ] {
            assert_eq!(classify_host(host), kind, "{host}");
        }
    }

    #[test]
    fn urls() {
        let upstream = UrlUse::Upstream {
            allow_plain_http: false,
        };
        assert!(check_url("https://example.com/a/", upstream).is_ok());
        assert!(check_url("http://127.0.0.1:8081/", upstream).is_ok());
        assert!(check_url("http://example.com/", upstream).is_err());
        assert!(
            check_url(
                "http://example.com/",
                UrlUse::Upstream {
                    allow_plain_http: true
                }
            )
            .is_ok()
        );
        assert!(
            check_url("https://user:pw@example.com/", upstream)
                .unwrap_err()
                .contains("user info")
        );
        assert!(check_url("https://example.com/?a=1", upstream).is_err());
        assert!(check_url("https://example.com/?a=1", UrlUse::TokenEndpoint).is_ok());
        assert!(check_url("https://example.com/#x", UrlUse::TokenEndpoint).is_err());
        assert!(check_url("ftp://example.com/", upstream).is_err());
        assert!(check_url("/relative/", upstream).is_err());
        assert!(check_url("example.com", upstream).is_err());
        assert!(check_url("https://example.com:0/", upstream).is_err());
        assert!(check_url("https://169.254.169.254/", upstream).is_err());
        assert!(check_url("http://[::1]:9000/token", UrlUse::TokenEndpoint).is_ok());
        assert!(check_url("http://idp.example/token", UrlUse::TokenEndpoint).is_err());
    }

    #[test]
    fn networks() {
        assert_eq!(parse_network("10.0.0.0/8"), "10.0.0.0/8".parse().ok());
        assert_eq!(parse_network("10.1.2.3/8"), "10.0.0.0/8".parse().ok());
        assert_eq!(parse_network("10.1.2.3"), "10.1.2.3/32".parse().ok());
        assert_eq!(parse_network("::1"), "::1/128".parse().ok());
        assert_eq!(parse_network("10.0.0.0/33"), None);
        assert_eq!(parse_network("nope"), None);
    }

    #[test]
    fn guids() {
        assert!(is_guid("72f988bf-86f1-41af-91ab-2d7cd011db47"));
        assert!(!is_guid("72f988bf-86f1-41af-91ab-2d7cd011db4"));
        assert!(!is_guid("contoso.onmicrosoft.com"));
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "127.0.0.1",
            "127.9.9.9",
            "[::1]",
            "[::ffff:127.0.0.1]",
            "localhost",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "idp.example",
            "10.0.0.1",
            "[::2]",
            "127.1",
            "169.254.169.254",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
