//! Entry points for the `cargo fuzz` targets in `fuzz/`. Not a stable API: each function
//! feeds arbitrary input to one parser and panics if one of its invariants breaks. Also the
//! model of a lenient upstream ([`lenient_view`]) that the path invariants and the path
//! property tests judge forwarded paths by.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{Config, Source};
use crate::inbound::Authenticator;
use crate::routing::{self, Rest, RouteTable};

const CONFIG: &str = r#"
credentials:
  bc: { type: client_secret, token_url: "https://idp.example/token", client_id: app, client_secret: "${S}" }
clients:
  erp: { basic: { username: erp, password: "${P}" } }
  scanner: { api_key: "${K}" }
routes:
  - { prefix: /bc/, upstream: "https://bc.example/v2.0/t/Production/", credential: bc, clients: [erp, scanner] }
  - { prefix: /bc/sandbox/, upstream: "https://bc.example/v2.0/t/Sandbox/", credential: bc, clients: [erp] }
  - { prefix: /bc/admin/, upstream: "https://bc.example/v2.0/t/Production/admin/", credential: bc, clients: [erp] }
"#;

fn config() -> &'static Config {
    static CONFIG_ONCE: OnceLock<Config> = OnceLock::new();
    CONFIG_ONCE.get_or_init(|| {
        let variables = HashMap::from([
            ("S".to_owned(), "secret".to_owned()),
            ("P".to_owned(), "password".to_owned()),
            ("K".to_owned(), "key".to_owned()),
        ]);
        Config::from_yaml_str(CONFIG, &Source::inline("fuzz", variables)).expect("valid")
    })
}

/// The configuration loader: any text gives a config or problems, never a panic.
pub fn config_loader(text: &str) {
    let variables = HashMap::from([("A".to_owned(), "value".to_owned())]);
    let _ = Config::from_yaml_str(text, &Source::inline("fuzz", variables));
}

/// Path check and routing: a path that passes routes the same in every spelling of its
/// canonical form, is forwarded in that form under its route's upstream base, and —
/// however leniently the upstream reads it — never reaches the upstream path of a route
/// nested under it (`/bc/admin/` under `/bc/`).
pub fn path(path: &str) {
    if routing::check_path(path).is_err() {
        return;
    }
    let config = config();
    let table = RouteTable::new(config.routes.iter().map(|r| r.prefix.as_str()));
    let Some((index, rest)) = table.lookup(path) else {
        return;
    };
    for spelling in [
        routing::canonical(path).into_owned(),
        path.to_ascii_uppercase(),
        path.to_ascii_lowercase(),
    ] {
        assert_eq!(table.lookup(&spelling).map(|(i, _)| i), Some(index));
    }
    let upstream = &config.routes[index].upstream;
    let Ok(uri) = routing::upstream_uri(upstream, rest, None) else {
        return;
    };
    let (base, rest) = match rest {
        Rest::Under(rest) => (upstream.base_path.as_str(), rest),
        Rest::Beside(rest) => (upstream.base_path.trim_end_matches('/'), rest),
    };
    assert_eq!(
        uri.path().trim_start_matches('/'),
        format!("{base}{}", routing::canonical(rest)).trim_start_matches('/')
    );
    let view = lenient_view(uri.path());
    assert!(reaches(&view, &upstream.base_path), "{path} -> {view}");
    for other in &config.routes {
        let nested = other.upstream.authority == upstream.authority
            && other.upstream.base_path.len() > upstream.base_path.len()
            && reaches(
                &lenient_view(&other.upstream.base_path),
                &upstream.base_path,
            );
        assert!(
            !(nested && reaches(&view, &other.upstream.base_path)),
            "{path} -> {view} reaches {}",
            other.prefix
        );
    }
}

/// How the most lenient upstream could read a path, all of these at once: every escape
/// decoded once, IIS's `%uXXXX` too; the path cut at a decoded `?` or `#` (servers that
/// decode before they split off the query); `\` as `/`; `;…` dropped from each segment
/// (matrix parameters); dot segments resolved (RFC 3986 §5.2.4), any run of two or more
/// dots counting as `..`; trailing dots and spaces stripped from segments (Windows); empty
/// segments dropped; case folded, `ı`, `İ`, `ſ` and the Kelvin sign into ASCII as .NET
/// folds them. Returns `/`-joined lowercase segments without a trailing `/`.
pub fn lenient_view(path: &str) -> String {
    let bytes = path.as_bytes();
    let hex = |digits: &[u8]| {
        std::str::from_utf8(digits)
            .ok()
            .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|d| u32::from_str_radix(d, 16).ok())
    };
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if matches!(bytes.get(i + 1), Some(b'u' | b'U'))
                && let Some(code) = bytes.get(i + 2..i + 6).and_then(hex)
            {
                let c = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
                decoded.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                i += 6;
                continue;
            }
            if let Some(byte) = bytes.get(i + 1..i + 3).and_then(hex) {
                decoded.push(byte as u8);
                i += 3;
                continue;
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let text = String::from_utf8_lossy(&decoded);
    let text: String = text
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| match c {
            '\\' => '/',
            '\u{131}' | '\u{130}' => 'i',
            '\u{17f}' => 's',
            '\u{212a}' => 'k',
            c => c.to_ascii_lowercase(),
        })
        .collect();
    let mut segments: Vec<&str> = Vec::new();
    for segment in text.split('/') {
        let segment = segment.split(';').next().unwrap_or_default();
        let trimmed = segment.trim_end_matches(['.', ' ']);
        if trimmed.is_empty() && segment.trim_end_matches(' ').len() >= 2 {
            segments.pop();
        } else if !trimmed.is_empty() {
            segments.push(trimmed);
        }
    }
    format!("/{}", segments.join("/"))
}

/// Whether a [`lenient_view`] is at or under the upstream path `base`: `base` itself,
/// anything below it, or `base(…)` (an OData key).
pub fn reaches(view: &str, base: &str) -> bool {
    let base = base.trim_end_matches('/').to_ascii_lowercase();
    view.strip_prefix(base.as_str())
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '(']))
}

/// Basic and API-key authentication on arbitrary header bytes.
pub fn credentials(data: &[u8]) {
    static AUTHENTICATOR: OnceLock<Authenticator> = OnceLock::new();
    let authenticator = AUTHENTICATOR.get_or_init(|| Authenticator::new(config()));
    let (first, second) = data.split_at(data.len() / 2);
    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(first) {
        headers.insert(http::header::AUTHORIZATION, value);
    }
    if let Ok(value) = HeaderValue::from_bytes(second) {
        headers.insert(HeaderName::from_static("x-api-key"), value);
    }
    let _ = authenticator.authenticate(&headers, IpAddr::V4(Ipv4Addr::LOCALHOST), None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_accept_their_seeds() {
        config_loader(CONFIG);
        config_loader("routes: [");
        path("/bc/ODataV4/Company('CRONUS%20USA')/Customers");
        path("/bc/../x");
        path("/bc/ADMIN(1)");
        path("/bc/%61dmin/x");
        path("/bc");
        path("/bc/adm%C4%B1n");
        assert_eq!(
            lenient_view("/a/%u0061dmin;x/..;/B.%20/%2e%2e./c%3F/d"),
            "/a/c"
        );
        assert_eq!(lenient_view("/a\\b//c/adm%C4%B1n"), "/a/b/c/admin");
        assert!(reaches("/a/admin(1)", "/A/Admin/"));
        assert!(reaches("/a/admin", "/a/admin/"));
        assert!(!reaches("/a/admins", "/a/admin/"));
        credentials(b"Basic ZXJwOnBhc3N3b3Jkkey");
        credentials(&[0xff, 0, b'\r']);
    }
}
