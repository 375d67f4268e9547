//! `managed_identity` against fake IMDS and App Service token services on 127.0.0.1,
//! injected through [`Imds`] and the config's `IDENTITY_ENDPOINT`: request shapes, headers,
//! string expiries and the IMDS retry schedule.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use super::*;
use crate::config::{Config, CredentialKind, Source};
use crate::token::fake::{self, FakeServer, Request};

const SCOPE: &str = "https://api.businesscentral.dynamics.com/.default";
const RESOURCE: &str = "https://api.businesscentral.dynamics.com";

fn config(yaml_credential: &str, variables: &[(&str, &str)]) -> Result<Config, String> {
    let yaml = format!(
        "credentials:\n  pod:\n    type: managed_identity\n{yaml_credential}clients:\n  c:\n    \
         networks: [10.0.0.0/8]\nroutes:\n  - prefix: /bc/\n    \
         upstream: https://api.businesscentral.dynamics.com/v2.0/t/Production/\n    \
         credential: pod\n    clients: [c]\n"
    );
    let variables: HashMap<String, String> = variables
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::from_yaml_str(&yaml, &Source::inline("proxy.yaml", variables))
        .map_err(|e| e.to_string())
}

fn settings(config: &Config) -> ManagedIdentity {
    match &config.credentials[0].kind {
        CredentialKind::ManagedIdentity(mi) => mi.clone(),
        other => panic!("{other:?}"),
    }
}

fn imds(server: &FakeServer, delays: &[u64]) -> Imds {
    Imds {
        url: reqwest::Url::parse(&server.url("/metadata/identity/oauth2/token")).unwrap(),
        retry_delays: delays.iter().map(|ms| Duration::from_millis(*ms)).collect(),
    }
}

fn epoch_in(secs: u64) -> u64 {
    (SystemTime::now() + Duration::from_secs(secs))
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn imds_answer(request: &Request) -> (u16, String) {
    if request.header("metadata") != Some("true") {
        return (400, r#"{"error":"bad_request_102","error_description":"Required metadata header not specified"}"#.to_owned());
    }
    (
        200,
        format!(
            r#"{{"access_token":"eyJ.mi.sig","refresh_token":"","expires_in":"86399","expires_on":"{}","not_before":"1","resource":"{RESOURCE}","token_type":"Bearer"}}"#,
            epoch_in(86_399)
        ),
    )
}

#[tokio::test]
async fn imds_request_shape_and_string_expiry() {
    let server = FakeServer::spawn(Arc::new(imds_answer)).await;
    let config = config("    client_id: 00000000-aaaa-bbbb-cccc-000000000001\n", &[]).unwrap();
    let settings = settings(&config);
    assert!(matches!(settings.endpoint, ManagedIdentityEndpoint::Imds));
    let source =
        ManagedIdentitySource::new("pod", &settings, fake::http(), imds(&server, &[])).unwrap();
    let token = source.fetch(Some(SCOPE)).await.unwrap();
    assert_eq!(token.access_token.expose(), "eyJ.mi.sig");
    assert_eq!(token.expires_in, Duration::from_secs(86_399));

    let request = &server.requests()[0];
    assert_eq!(request.method, "GET");
    assert!(
        request
            .target
            .starts_with("/metadata/identity/oauth2/token?")
    );
    assert_eq!(
        request.query(),
        [
            ("api-version".to_owned(), "2018-02-01".to_owned()),
            ("resource".to_owned(), RESOURCE.to_owned()),
            (
                "client_id".to_owned(),
                "00000000-aaaa-bbbb-cccc-000000000001".to_owned()
            ),
        ]
    );
    assert_eq!(request.header("metadata"), Some("true"));
    for absent in [
        "x-forwarded-for",
        "forwarded",
        "x-identity-header",
        "proxy-authorization",
    ] {
        assert!(request.header(absent).is_none(), "{absent} was sent");
    }
    assert!(request.body.is_empty());
}

#[tokio::test]
async fn imds_selectors_use_imds_names() {
    for (yaml, name) in [
        ("    object_id: oid-1\n", "object_id"),
        ("    resource_id: /subscriptions/s/rg/x\n", "msi_res_id"),
    ] {
        let server = FakeServer::spawn(Arc::new(imds_answer)).await;
        let settings = settings(&config(yaml, &[]).unwrap());
        let source =
            ManagedIdentitySource::new("pod", &settings, fake::http(), imds(&server, &[])).unwrap();
        source.fetch(Some(SCOPE)).await.unwrap();
        assert_eq!(server.requests()[0].query()[2].0, name);
    }
}

#[tokio::test]
async fn imds_retries_404_410_429_and_5xx_on_schedule_but_not_other_4xx() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let server = FakeServer::spawn(Arc::new(move |request: &Request| {
        match counter.fetch_add(1, Ordering::SeqCst) {
            0 => (404, String::new()),
            1 => (410, String::new()),
            2 => (429, "Too Many Requests".to_owned()),
            3 => (503, String::new()),
            _ => imds_answer(request),
        }
    }))
    .await;
    let settings = settings(&config("", &[]).unwrap());
    let source =
        ManagedIdentitySource::new("pod", &settings, fake::http(), imds(&server, &[1, 2, 3, 4]))
            .unwrap();
    source.fetch(Some(SCOPE)).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 5);

    // Out of retries: the last answer is the error.
    calls.store(0, Ordering::SeqCst);
    let source =
        ManagedIdentitySource::new("pod", &settings, fake::http(), imds(&server, &[1, 1])).unwrap();
    let error = source.fetch(Some(SCOPE)).await.unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(
        error.to_string().contains("429") || error.public_message().contains("429"),
        "{error}"
    );

    // A 400 (identity not found) is not retried.
    let bad = FakeServer::spawn(Arc::new(|_: &Request| {
        (
            400,
            r#"{"error":"invalid_request","error_description":"Identity not found"}"#.to_owned(),
        )
    }))
    .await;
    let source =
        ManagedIdentitySource::new("pod", &settings, fake::http(), imds(&bad, &[1, 1])).unwrap();
    let error = source.fetch(Some(SCOPE)).await.unwrap_err();
    assert_eq!(bad.requests().len(), 1);
    assert!(error.public_message().contains("invalid_request"));
}

#[tokio::test]
async fn app_service_request_shape_and_expires_on_only() {
    let server = FakeServer::spawn(Arc::new(|request: &Request| {
        assert_eq!(request.header("x-identity-header"), Some("platform-secret"));
        (
            200,
            format!(
                r#"{{"access_token":"eyJ.app.sig","expires_on":"{}","resource":"{RESOURCE}","token_type":"Bearer","client_id":"c"}}"#,
                epoch_in(3600)
            ),
        )
    }))
    .await;
    let endpoint = server.url("/msi/token");
    let config = config(
        "    object_id: oid-9\n",
        &[
            ("IDENTITY_ENDPOINT", endpoint.as_str()),
            ("IDENTITY_HEADER", "platform-secret"),
        ],
    )
    .unwrap();
    let settings = settings(&config);
    assert!(matches!(
        settings.endpoint,
        ManagedIdentityEndpoint::AppService { .. }
    ));
    assert!(!format!("{settings:?}").contains("platform-secret"));
    // The IMDS target is ignored when the platform provides its own endpoint.
    let source =
        ManagedIdentitySource::new("pod", &settings, fake::http(), Imds::default()).unwrap();
    let token = source.fetch(Some(SCOPE)).await.unwrap();
    assert!((3590..=3600).contains(&token.expires_in.as_secs()));
    let request = &server.requests()[0];
    assert_eq!(request.method, "GET");
    assert!(request.target.starts_with("/msi/token?"));
    assert_eq!(
        request.query(),
        [
            ("api-version".to_owned(), "2019-08-01".to_owned()),
            ("resource".to_owned(), RESOURCE.to_owned()),
            ("principal_id".to_owned(), "oid-9".to_owned()),
        ]
    );
    assert!(request.header("x-forwarded-for").is_none());
}

#[test]
fn config_rules() {
    let error = config("    client_id: a\n    object_id: b\n", &[]).unwrap_err();
    assert!(error.contains("set at most one of `client_id`, `object_id` and `resource_id`"));
    let error = config("", &[("IDENTITY_ENDPOINT", "http://127.0.0.1:1/msi/token")]).unwrap_err();
    assert!(error.contains("IDENTITY_HEADER is not"), "{error}");
    let error = config(
        "",
        &[
            ("IDENTITY_ENDPOINT", "http://169.254.169.254/msi/token"),
            ("IDENTITY_HEADER", "h"),
        ],
    )
    .unwrap_err();
    assert!(error.contains("link-local"), "{error}");
}
