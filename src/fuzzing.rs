//! Entry points for the `cargo fuzz` targets in `fuzz/`. Not a stable API: each function
//! feeds arbitrary input to one parser and panics if one of its invariants breaks.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{Config, Source};
use crate::inbound::Authenticator;
use crate::routing::{self, RouteTable};

const CONFIG: &str = r#"
credentials:
  bc: { type: client_secret, token_url: "https://idp.example/token", client_id: app, client_secret: "${S}" }
clients:
  erp: { basic: { username: erp, password: "${P}" } }
  scanner: { api_key: "${K}" }
routes:
  - { prefix: /bc/, upstream: "https://bc.example/v2.0/t/Production/", credential: bc, clients: [erp, scanner] }
  - { prefix: /bc/sandbox/, upstream: "https://bc.example/v2.0/t/Sandbox/", credential: bc, clients: [erp] }
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

/// Path check and routing: a path that passes stays under its route's upstream base and
/// is forwarded byte for byte.
pub fn path(path: &str) {
    if routing::check_path(path).is_err() {
        return;
    }
    let config = config();
    let table = RouteTable::new(config.routes.iter().map(|r| r.prefix.as_str()));
    let Some((index, rest)) = table.lookup(path) else {
        return;
    };
    let upstream = &config.routes[index].upstream;
    if let Ok(uri) = routing::upstream_uri(upstream, rest, None) {
        assert_eq!(uri.path(), format!("{}{rest}", upstream.base_path));
        assert!(
            !rest
                .split('/')
                .any(|segment| segment == ".." || segment == ".")
        );
    }
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
        credentials(b"Basic ZXJwOnBhc3N3b3Jkkey");
        credentials(&[0xff, 0, b'\r']);
    }
}
