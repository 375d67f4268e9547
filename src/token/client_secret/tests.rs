//! `client_secret` against an in-process token endpoint on 127.0.0.1 (real sockets, real
//! clock). What crossed the wire is asserted byte for byte.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use super::*;
use crate::config::{
    Config, Credential, CredentialKind, Limits, Route, Server, TokenEndpoint, Upstream,
};
use crate::token::fake::{self, FakeServer, Reply, response};
use crate::token::{TokenCache, fetch_once};

const SECRET: &str = "Zx8Q~abc+def/ghi=jk";
const SCOPE: &str = "https://api.businesscentral.dynamics.com/.default";

/// A token endpoint answering every request with `reply`.
async fn endpoint(reply: Reply) -> FakeServer {
    FakeServer::spawn_reply(reply).await
}

fn token_url(endpoint: &FakeServer) -> String {
    endpoint.url("/tenant/oauth2/v2.0/token")
}

fn json_ok(body: &str) -> Reply {
    response("200 OK", &[("Content-Type", "application/json")], body)
}

const V2_OK: &str = r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"refresh_in":1799,"access_token":"eyJ0eXAi.eyJhdWQi.c2ln"}"#;

fn settings(url: &str, auth_method: ClientAuthMethod) -> ClientSecret {
    ClientSecret {
        endpoint: TokenEndpoint::Generic {
            url: url.parse().unwrap(),
        },
        client_id: "app:id".to_owned(),
        client_secrets: vec![crate::config::ConfiguredSecret {
            value: Secret::new(SECRET),
            file: None,
            expires: None,
        }],
        auth_method,
        params: vec![("audience".to_owned(), "https://api.example/x y".to_owned())],
    }
}

fn source(url: &str, auth_method: ClientAuthMethod) -> ClientSecretSource {
    let http = TokenHttp::with_timeouts(
        &fake::tls(),
        Duration::from_secs(1),
        Duration::from_millis(500),
    );
    ClientSecretSource::new("bc", &settings(url, auth_method), http).unwrap()
}

/// The error a `client_secret_post` fetch for [`SCOPE`] from `url` ends with.
async fn fetch_error(url: &str) -> TokenError {
    source(url, ClientAuthMethod::Post)
        .fetch(Some(SCOPE))
        .await
        .unwrap_err()
}

/// No secret, no URL, no description in a client-facing message; no secret in logs.
fn assert_no_leak(error: &TokenError, url: &str) {
    let public = error.public_message();
    let log = error.to_string();
    for text in [&public, &log] {
        assert!(!text.contains(SECRET), "secret leaked: {text}");
        assert!(
            !text.contains(url) && !text.contains("127.0.0.1"),
            "URL leaked: {text}"
        );
    }
    assert!(!public.contains("http"), "{public}");
}

#[tokio::test]
async fn post_sends_exactly_the_expected_form() {
    let endpoint = endpoint(json_ok(V2_OK)).await;
    let issued = source(&token_url(&endpoint), ClientAuthMethod::Post)
        .fetch(Some(SCOPE))
        .await
        .unwrap();
    assert_eq!(issued.access_token.expose(), "eyJ0eXAi.eyJhdWQi.c2ln");
    assert_eq!(issued.expires_in, Duration::from_secs(3599));
    assert_eq!(issued.refresh_in, Some(Duration::from_secs(1799)));

    let requests = endpoint.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.target, "/tenant/oauth2/v2.0/token");
    assert_eq!(
        request.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(request.header("authorization"), None);
    let expected: Vec<(String, String)> = [
        ("grant_type", "client_credentials"),
        ("client_id", "app:id"),
        ("client_secret", SECRET),
        ("scope", SCOPE),
        ("audience", "https://api.example/x y"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    assert_eq!(request.form(), expected);
    // `~`, `+`, `/` and `=` are percent-encoded, not sent raw.
    assert!(
        request
            .body
            .contains("client_secret=Zx8Q%7Eabc%2Bdef%2Fghi%3Djk"),
        "{}",
        request.body
    );
}

#[tokio::test]
async fn basic_auth_encodes_id_and_secret_and_keeps_them_out_of_the_body() {
    let endpoint = endpoint(json_ok(V2_OK)).await;
    source(&token_url(&endpoint), ClientAuthMethod::Basic)
        .fetch(None)
        .await
        .unwrap();
    let request = &endpoint.requests()[0];
    let expected = format!(
        "Basic {}",
        STANDARD.encode("app%3Aid:Zx8Q%7Eabc%2Bdef%2Fghi%3Djk")
    );
    assert_eq!(request.header("authorization"), Some(expected.as_str()));
    let form = request.form();
    let names: Vec<&str> = form.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["grant_type", "audience"]);
    assert!(!request.body.contains("Zx8Q"));
}

#[tokio::test]
async fn v1_string_numbers_are_accepted() {
    let body = r#"{"token_type":"Bearer","expires_in":"3599","ext_expires_in":"3599","expires_on":"4102444800","not_before":"1700000000","resource":"https://api.businesscentral.dynamics.com","access_token":"abc.def.ghi"}"#;
    let endpoint = endpoint(json_ok(body)).await;
    let issued = source(&token_url(&endpoint), ClientAuthMethod::Post)
        .fetch(Some(SCOPE))
        .await
        .unwrap();
    assert_eq!(issued.expires_in, Duration::from_secs(3599));
}

#[tokio::test]
async fn wrong_secret_is_a_permanent_invalid_client_with_a_hint() {
    let body = r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app 'app:id'.\r\nTrace ID: 5a1b\r\nCorrelation ID: 9c2d\r\nTimestamp: 2025-01-01 00:00:00Z","error_codes":[7000215],"timestamp":"2025-01-01 00:00:00Z","trace_id":"5a1b-trace","correlation_id":"9c2d-corr","error_uri":"https://login.microsoftonline.com/error?code=7000215"}"#;
    let endpoint = endpoint(response(
        "401 Unauthorized",
        &[("Content-Type", "application/json; charset=utf-8")],
        body,
    ))
    .await;
    let error = fetch_error(&token_url(&endpoint)).await;
    let TokenError::Provider(provider) = &error else {
        panic!("{error:?}");
    };
    assert_eq!(provider.status, 401);
    assert_eq!(provider.error.as_deref(), Some("invalid_client"));
    assert!(error.is_permanent());
    let public = error.public_message();
    assert!(public.contains("invalid_client"), "{public}");
    assert!(public.contains("AADSTS7000215"), "{public}");
    assert!(public.contains("secret ID was pasted"), "{public}");
    assert!(
        !public.contains("Invalid client secret provided"),
        "{public}"
    );
    assert!(!public.contains("5a1b"), "{public}");
    assert_no_leak(&error, &token_url(&endpoint));
    let log = error.to_string();
    assert!(
        log.contains("5a1b-trace") && log.contains("9c2d-corr"),
        "{log}"
    );
    assert!(log.contains("Invalid client secret provided"), "{log}");
}

#[tokio::test]
async fn plain_text_429_is_transient_and_carries_retry_after() {
    let endpoint = endpoint(response(
        "429 Too Many Requests",
        &[("Retry-After", "60"), ("Content-Type", "text/plain")],
        "Too Many Requests",
    ))
    .await;
    let error = fetch_error(&token_url(&endpoint)).await;
    assert!(matches!(error, TokenError::Provider(_)), "{error:?}");
    assert!(!error.is_permanent());
    assert_eq!(error.retry_after(), Some(Duration::from_secs(60)));
    assert_no_leak(&error, &token_url(&endpoint));
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let elsewhere = endpoint(json_ok(V2_OK)).await;
    for status in ["307 Temporary Redirect", "302 Found"] {
        let endpoint = endpoint(response(
            status,
            &[("Location", &token_url(&elsewhere))],
            "",
        ))
        .await;
        let error = fetch_error(&token_url(&endpoint)).await;
        assert!(matches!(error, TokenError::Redirect { .. }), "{error:?}");
        assert!(error.is_permanent());
        assert!(error.to_string().contains("redirects are not followed"));
        assert_no_leak(&error, &token_url(&endpoint));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(elsewhere.connections(), 0);
}

#[tokio::test]
async fn garbage_and_oversized_bodies_are_invalid_responses() {
    let huge = format!(
        r#"{{"access_token":"{}","expires_in":3599}}"#,
        "a".repeat(100 * 1024)
    );
    for reply in [
        json_ok("<html><body>Sign in</body></html>"),
        json_ok(r#"{"access_token":"abc"}"#),
        json_ok(r#"{"access_token":"abc","expires_in":3599,"token_type":"mac"}"#),
        json_ok(&huge),
    ] {
        let endpoint = endpoint(reply).await;
        let error = fetch_error(&token_url(&endpoint)).await;
        assert!(matches!(error, TokenError::InvalidResponse(_)), "{error:?}");
        assert!(!error.is_permanent());
        assert!(!error.to_string().contains("Sign in"));
    }
}

#[tokio::test]
async fn a_stalled_endpoint_times_out() {
    let endpoint = endpoint(Reply::Stall).await;
    let started = std::time::Instant::now();
    let error = fetch_error(&token_url(&endpoint)).await;
    assert!(matches!(error, TokenError::Timeout(_)), "{error:?}");
    assert!(!error.is_permanent());
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(endpoint.requests().len(), 1);
}

#[tokio::test]
async fn a_refused_connection_is_a_transient_network_error_without_the_url() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    drop(listener);
    let error = fetch_error(&url).await;
    assert!(matches!(error, TokenError::Network(_)), "{error:?}");
    assert!(!error.is_permanent());
    assert_no_leak(&error, &url);
}

#[test]
fn plain_http_is_refused_unless_loopback() {
    let http = TokenHttp::new(&fake::tls());
    for url in ["http://idp.example/token", "ftp://127.0.0.1/token"] {
        let result =
            ClientSecretSource::new("bc", &settings(url, ClientAuthMethod::Post), http.clone());
        assert!(matches!(result, Err(TokenError::Config(_))), "{url}");
    }
    for url in [
        "http://localhost:8080/token",
        "http://[::1]:9/token",
        "https://idp.example/token",
    ] {
        assert!(
            ClientSecretSource::new("bc", &settings(url, ClientAuthMethod::Post), http.clone())
                .is_ok(),
            "{url}"
        );
    }
}

fn route(prefix: &str, credential: &str) -> Route {
    Route {
        prefix: prefix.to_owned(),
        upstream: Upstream {
            url: "https://api.example/v2.0/".parse().unwrap(),
            scheme: http::uri::Scheme::HTTPS,
            authority: "api.example".parse().unwrap(),
            host: "api.example".to_owned(),
            base_path: "/v2.0/".to_owned(),
        },
        credential: credential.to_owned(),
        scope: Some(SCOPE.to_owned()),
        clients: vec!["erp".to_owned()],
        timeout: Duration::from_secs(600),
        rewrite_links: false,
        max_concurrent: None,
        max_queue: None,
        queue_timeout: None,
        retry_on_429: None,
        upstream_rate_limit: None,
        allow_plain_http: false,
        strip_request_headers: Vec::new(),
        doctor_path: None,
        preset: None,
    }
}

fn config(token_url: &str) -> Config {
    Config {
        server: Server {
            listen: "127.0.0.1:8080".parse().unwrap(),
            public_url: None,
            trusted_proxies: Vec::new(),
            upstream_ca_file: None::<PathBuf>,
            api_key_header: http::HeaderName::from_static("x-api-key"),
            allow_underscore_headers: false,
            workers: None,
            tls: None,
            limits: Limits::default(),
        },
        admin: None,
        cluster: None,
        credentials: vec![
            Credential {
                name: "bc".to_owned(),
                kind: CredentialKind::ClientSecret(settings(token_url, ClientAuthMethod::Post)),
            },
            Credential {
                name: "pod".to_owned(),
                kind: CredentialKind::ClientCertificate(crate::config::ClientCertificate {
                    endpoint: TokenEndpoint::Generic {
                        url: token_url.parse().unwrap(),
                    },
                    client_id: "app".to_owned(),
                    certificates: vec![crate::config::CertificateFile {
                        path: PathBuf::from("/nonexistent/s2s-proxy-test.pem"),
                        password: None,
                        content: None,
                    }],
                    assertion_alg: crate::config::AssertionAlg::Ps256,
                    send_certificate_chain: false,
                }),
            },
        ],
        clients: Vec::new(),
        routes: vec![
            route("/bc/", "bc"),
            route("/bc2/", "bc"),
            route("/mi/", "pod"),
        ],
        secret_stores: Default::default(),
        prepared: Default::default(),
    }
}

#[tokio::test]
async fn cache_built_from_config_shares_one_slot_per_credential_and_scope() {
    let endpoint = endpoint(json_ok(V2_OK)).await;
    let config = config(&token_url(&endpoint));
    let cache = TokenCache::new(&config, fake::tls());
    assert_eq!(cache.status().len(), 2);
    let bc = cache.slot(&config.routes[0]);
    assert!(Arc::ptr_eq(&bc, &cache.slot(&config.routes[1])));
    assert_eq!(bc.credential(), "bc");
    let token = bc.get().await.unwrap();
    assert_eq!(token.header(), "Bearer eyJ0eXAi.eyJhdWQi.c2ln");
    assert!(token.header().is_sensitive());
    assert!(Arc::ptr_eq(&token, &bc.get().await.unwrap()));
    assert_eq!(endpoint.requests().len(), 1);

    let error = cache.slot(&config.routes[2]).get().await.unwrap_err();
    assert!(error.is_permanent());
    assert!(error.public_message().contains("cannot read"));
}

#[tokio::test]
async fn fetch_once_returns_the_token_and_its_claims() {
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(r#"{"aud":"https://api.businesscentral.dynamics.com","tid":"t1","appid":"app","roles":["API.ReadWrite.All"],"exp":4102444800}"#);
    let body = format!(
        r#"{{"token_type":"Bearer","expires_in":3599,"access_token":"e30.{payload}.sig"}}"#
    );
    let endpoint = endpoint(json_ok(&body)).await;
    let config = config(&token_url(&endpoint));
    let fetched = fetch_once(&config, &config.routes[0], fake::tls())
        .await
        .unwrap();
    assert_eq!(fetched.expires_in, Duration::from_secs(3599));
    assert_eq!(fetched.credential, "bc");
    let claims = fetched.claims.unwrap();
    assert_eq!(claims.roles, vec!["API.ReadWrite.All"]);
    assert_eq!(claims.tid.as_deref(), Some("t1"));
    assert!(!format!("{:?}", fetched.access_token).contains(&payload));

    let mut unknown = config.routes[0].clone();
    unknown.credential = "missing".to_owned();
    let error = fetch_once(&config, &unknown, fake::tls())
        .await
        .unwrap_err();
    assert!(matches!(error, TokenError::Config(_)));
}

// ---------------------------------------------------------------------------------------
// Rotation

/// A token endpoint that accepts only `good` as the client secret.
async fn accepting(good: &'static str) -> fake::FakeServer {
    fake::FakeServer::spawn(Arc::new(move |r: &fake::Request| {
        if r.field("client_secret").as_deref() == Some(good) {
            (200, fake::token_body("eyJ.rotated.sig"))
        } else {
            fake::invalid_client(7_000_215)
        }
    }))
    .await
}

fn rotation_config(dir: &std::path::Path, url: &str, secrets: &str) -> Config {
    let yaml = format!(
        "credentials:\n  bc:\n    type: client_secret\n    token_url: {url}\n    client_id: app\n\
         {secrets}clients:\n  c:\n    networks: [10.0.0.0/8]\nroutes:\n  - prefix: /bc/\n    \
         upstream: https://api.example/\n    credential: bc\n    scope: s/.default\n    clients: [c]\n"
    );
    let source = crate::config::Source {
        name: "proxy.yaml".to_owned(),
        base_dir: dir.to_path_buf(),
        variables: crate::config::Variables::map(
            [
                ("OLD".to_owned(), "old-secret".to_owned()),
                ("NEW".to_owned(), "new-secret".to_owned()),
            ]
            .into(),
        ),
    };
    Config::from_yaml_str(&yaml, &source).unwrap()
}

fn source_of(config: &Config) -> ClientSecretSource {
    let CredentialKind::ClientSecret(settings) = &config.credentials[0].kind else {
        panic!("not a client secret");
    };
    ClientSecretSource::new("bc", settings, fake::http()).unwrap()
}

#[tokio::test]
async fn rotation_tries_the_next_secret_after_invalid_client_and_keeps_it() {
    let server = accepting("new-secret").await;
    let config = rotation_config(
        &std::env::temp_dir(),
        &server.url("/token"),
        "    client_secrets:\n      - ${OLD}\n      - { value: \"${NEW}\", expires: 2030-01-31 }\n",
    );
    let source = source_of(&config);
    let token = source.fetch(Some("s/.default")).await.unwrap();
    assert_eq!(token.access_token.expose(), "eyJ.rotated.sig");
    source.fetch(Some("s/.default")).await.unwrap();
    let sent: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.field("client_secret").unwrap())
        .collect();
    assert_eq!(sent, ["old-secret", "new-secret", "new-secret"]);
    let expiries = crate::token::credential_expiries(&config);
    assert_eq!(expiries.len(), 1);
    assert_eq!(expiries[0].entry, "client_secrets[1]");
    assert_eq!(
        crate::civil_date::utc(
            expiries[0]
                .expires
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        ),
        "2030-01-31T00:00:00Z"
    );
}

#[tokio::test]
async fn file_secrets_are_read_again_after_invalid_client_and_on_reload() {
    let server = accepting("rotated-in-file").await;
    let temp = crate::test_support::TempDir::new("rot");
    let dir = temp.path();
    temp.write("secret", "first-value\n");
    let config = rotation_config(
        dir,
        &server.url("/token"),
        "    client_secret: ${file:secret}\n",
    );
    let source = source_of(&config);
    // The file changes after load (a Kubernetes secret update): refused, re-read, accepted.
    std::fs::write(dir.join("secret"), "rotated-in-file\n").unwrap();
    source.fetch(Some("s/.default")).await.unwrap();
    let sent: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.field("client_secret").unwrap())
        .collect();
    assert_eq!(sent, ["first-value", "rotated-in-file"]);

    // Reload: read without a failure first.
    std::fs::write(dir.join("secret"), "third-value").unwrap();
    source.reread_files();
    let _ = source.fetch(Some("s/.default")).await;
    assert_eq!(
        server
            .requests()
            .last()
            .unwrap()
            .field("client_secret")
            .as_deref(),
        Some("third-value")
    );
}

#[tokio::test]
async fn all_secrets_refused_returns_the_current_entry_error() {
    let server = accepting("none-of-them").await;
    let config = rotation_config(
        &std::env::temp_dir(),
        &server.url("/token"),
        "    client_secrets: [\"${OLD}\", \"${NEW}\"]\n",
    );
    let error = source_of(&config)
        .fetch(Some("s/.default"))
        .await
        .unwrap_err();
    assert!(error.public_message().contains("AADSTS7000215"));
    assert!(!error.to_string().contains("old-secret"));
    assert_eq!(server.requests().len(), 2);
}
