use std::sync::Arc;

use super::*;
use crate::config::Source;
use crate::token::fake::{self, FakeServer, Request};

fn config(token_url: &str, routes: &str) -> Config {
    let yaml = format!(
        "credentials:\n  app:\n    type: client_secret\n    token_url: {token_url}\n    \
         client_id: app\n    client_secret: s3cret-value\nclients:\n  c:\n    \
         networks: [10.0.0.0/8]\nroutes:\n{routes}"
    );
    Config::from_yaml_str(&yaml, &Source::inline("proxy.yaml", Default::default())).unwrap()
}

fn route(upstream: &str, extra: &str) -> String {
    format!(
        "  - prefix: /r{}/\n    upstream: {upstream}\n    credential: app\n    scope: x/.default\n    clients: [c]\n{extra}",
        upstream.len()
    )
}

#[test]
fn check_paths_per_service() {
    let config = config(
        "https://idp.example/token",
        &[
            route("https://api.businesscentral.dynamics.com/v2.0/72f988bf-86f1-41af-91ab-2d7cd011db47/Production/", ""),
            route("https://api.businesscentral.dynamics.com/v2.0/t/Sandbox/api/v2.0/", ""),
            route("https://contoso.crm4.dynamics.com/api/data/v9.2/", ""),
            route("https://contoso.operations.dynamics.com/", ""),
            route("https://contoso.sandbox.operations.dynamics.com/data/", ""),
            route("https://api.partner.example/v1/", "    doctor_path: /health\n"),
            route("https://api.other.example/", ""),
        ]
        .concat(),
    );
    let paths: Vec<String> = config.routes.iter().map(check_path).collect();
    assert_eq!(
        paths,
        [
            "api/v2.0/companies",
            "companies",
            "WhoAmI",
            "data/$metadata",
            "$metadata",
            "health",
            ""
        ]
    );
    let bc = &config.routes[0];
    let line = explain_upstream(
        bc,
        401,
        r#"{"error":{"code":"Authentication_InvalidCredentials","message":"x"}}"#,
    );
    assert!(
        line.contains("Microsoft Entra Applications") && line.contains("tenant"),
        "{line}"
    );
    assert!(explain_upstream(bc, 403, "").contains("permission sets"));
    assert!(explain_upstream(&config.routes[2], 403, "").contains("security role"));
}

#[tokio::test]
async fn doctor_reports_token_and_upstream_failures_in_one_line_each() {
    let idp = FakeServer::spawn(Arc::new(|r: &Request| {
        if r.field("scope").as_deref() == Some("bad/.default") {
            (400, r#"{"error":"invalid_scope","error_description":"AADSTS70011: bad","error_codes":[70011]}"#.to_owned())
        } else {
            (200, fake::token_body("eyJ.doctor.sig"))
        }
    }))
    .await;
    let upstream = FakeServer::spawn(Arc::new(|r: &Request| {
        assert_eq!(r.header("authorization"), Some("Bearer eyJ.doctor.sig"));
        if r.target.ends_with("/denied") {
            (403, "{}".to_owned())
        } else {
            (200, "{}".to_owned())
        }
    }))
    .await;
    let base = upstream.url("/api/");
    let yaml_routes = format!(
        "  - prefix: /ok/\n    upstream: {base}\n    credential: app\n    scope: x/.default\n    clients: [c]\n    doctor_path: ping\n\
         \x20 - prefix: /denied/\n    upstream: {base}\n    credential: app\n    scope: x/.default\n    clients: [c]\n    doctor_path: denied\n\
         \x20 - prefix: /scope/\n    upstream: {base}\n    credential: app\n    scope: bad/.default\n    clients: [c]\n"
    );
    let config = config(&idp.url("/token"), &yaml_routes);
    let (text, ok) = run(&config).await;
    assert!(!ok);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].starts_with("/ok/")
            && lines[0].contains("ok")
            && lines[0].contains("GET ping → 200"),
        "{text}"
    );
    assert!(
        lines[1].contains("FAIL") && lines[1].contains("403") && lines[1].contains("denies access"),
        "{text}"
    );
    assert!(
        lines[2].contains("FAIL") && lines[2].contains("AADSTS70011"),
        "{text}"
    );
    assert!(!text.contains("s3cret-value") && !text.contains("eyJ.doctor.sig"));
    assert_eq!(upstream.requests()[0].target, "/api/ping");
}
