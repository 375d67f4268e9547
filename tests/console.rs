//! The status page on the admin listener (docs/operations.md "Admin endpoints"):
//! `/status.json`, `/`, `POST /status/test` and `admin.auth`, driven over real sockets
//! against the fake identity provider and upstream.

mod support;

use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use support::{
    API_KEY, CLIENT_SECRET, FakeIdp, FakeUpstream, IdpMode, PASSWORD, admin_yaml, basic, config,
    erp, eventually, get, send, spawn_admin_proxy, spawn_ops_proxy, standard_vars,
};

const TOKEN: &str = "TOKEN_CANARY_9e1f";
/// A query string the proxy must never show.
const QUERY_CANARY: &str = "QS_CANARY_41ab";

async fn status_of(admin: std::net::SocketAddr) -> Value {
    let answer = get(admin, "/status.json").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("content-type"), Some("application/json"));
    answer.json()
}

/// Waits until route 0's token is in `state`; returns the status document.
async fn wait_for_state(admin: std::net::SocketAddr, state: &str) -> Value {
    eventually(Duration::from_secs(10), state, || async {
        let status = status_of(admin).await;
        (status["routes"][0]["token"]["state"] == state).then_some(status)
    })
    .await
}

fn assert_no_secret(text: &str) {
    for leak in [
        CLIENT_SECRET,
        PASSWORD,
        API_KEY,
        TOKEN,
        QUERY_CANARY,
        "tok-1",
    ] {
        assert!(!text.contains(leak), "{leak} shown:\n{text}");
    }
}

/// `admin_yaml` with `auth:` under `admin:`.
fn with_admin_auth(yaml: &str, auth: &str) -> String {
    yaml.replacen(
        "admin:\n  listen: 127.0.0.1:0\n",
        &format!("admin:\n  listen: 127.0.0.1:0\n  auth:\n    {auth}\n"),
        1,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn status_json_shows_each_route_with_its_token_traffic_and_errors() {
    let idp = FakeIdp::start_with(IdpMode::IssueToken(TOKEN.to_owned())).await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_admin_proxy(&idp, &upstream).await;
    let status = wait_for_state(proxy.admin, "valid").await;

    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert!(status["uptime_seconds"].is_u64());
    let route = &status["routes"][0];
    assert_eq!(route["prefix"], "/bc/");
    assert_eq!(route["upstream_host"], "127.0.0.1");
    assert_eq!(route["credential"], "bc");
    let expires = route["token"]["expires_in_seconds"].as_u64().unwrap();
    assert!((3000..=3599).contains(&expires), "expires in {expires}");
    let renews = route["token"]["renews_in_seconds"].as_u64().unwrap();
    assert!(renews < expires, "renews in {renews}, expires in {expires}");
    assert_eq!(route["token"]["last_error"], Value::Null);
    assert_eq!(route["in_flight"], 0);
    assert_eq!(route["queued"], 0);
    assert_eq!(status["routes"][1]["prefix"], "/bc/sandbox/");

    // Two answered requests and one proxy error (the upstream fails) on /bc/.
    let (name, value) = erp();
    let ok = send(
        proxy.handle.addr,
        "GET",
        "/bc/companies",
        &[(name, &value)],
        "",
    )
    .await;
    assert_eq!(ok.status, 200);
    upstream.respond(|_| {
        http::Response::builder()
            .status(500)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"boom",
            )))
            .unwrap()
    });
    let target = format!("/bc/companies?secret={QUERY_CANARY}");
    let failed = send(
        proxy.handle.addr,
        "GET",
        &target,
        &[(name, &value), ("x-request-id", "req-console-1")],
        "",
    )
    .await;
    assert_eq!(failed.status, 500);
    // A caller with a wrong password: an error of no route.
    let wrong = basic("erp", "wrong");
    let refused = send(
        proxy.handle.addr,
        "GET",
        "/bc/companies",
        &[("authorization", &wrong)],
        "",
    )
    .await;
    assert_eq!(refused.status, 401);

    let status = eventually(Duration::from_secs(5), "traffic counted", || async {
        let status = status_of(proxy.admin).await;
        (status["routes"][0]["requests_5m"] == 2).then_some(status)
    })
    .await;
    assert_eq!(status["routes"][0]["errors_5m"], 1);
    let errors = status["recent_errors"].as_array().unwrap();
    let upstream_error = errors
        .iter()
        .find(|e| e["route"] == "/bc/")
        .unwrap_or_else(|| panic!("no /bc/ error in {errors:?}"));
    assert_eq!(upstream_error["status"], 500);
    assert_eq!(upstream_error["request_id"], "req-console-1");
    assert!(upstream_error["time"].as_str().unwrap().ends_with('Z'));
    assert!(
        errors
            .iter()
            .any(|e| e["status"] == 401 && e["route"] == "none"),
        "{errors:?}"
    );
    assert_no_secret(&status.to_string());
    proxy.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_credential_shows_failed_with_its_aadsts_hint_and_no_secret() {
    let idp = FakeIdp::start_with(IdpMode::invalid_client()).await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_admin_proxy(&idp, &upstream).await;
    let status = wait_for_state(proxy.admin, "failed").await;

    let token = &status["routes"][0]["token"];
    let error = token["last_error"].as_str().unwrap();
    assert!(error.contains("AADSTS7000215"), "{error}");
    assert!(error.contains("secret value"), "no hint in {error}");
    assert_eq!(token["expires_in_seconds"], Value::Null);
    assert_eq!(token["permanent"], true);
    assert_no_secret(&status.to_string());

    let page = get(proxy.admin, "/").await;
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(html.contains("AADSTS7000215"), "{html}");
    assert!(html.contains("class=\"failed\""), "{html}");
    assert_no_secret(&html);
    proxy.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_page_has_a_strict_csp_that_allows_exactly_its_script_and_no_secret() {
    let idp = FakeIdp::start_with(IdpMode::IssueToken(TOKEN.to_owned())).await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_admin_proxy(&idp, &upstream).await;
    wait_for_state(proxy.admin, "valid").await;

    let page = get(proxy.admin, "/").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(page.header("cache-control"), Some("no-store"));
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(csp.starts_with("default-src 'none';"), "{csp}");
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("http"),
        "{csp}"
    );
    let html = page.text();
    // No asset from anywhere: no src= or stylesheet links, and every inline block is
    // allowed by its hash.
    assert!(!html.contains(" src=") && !html.contains("<link"), "{html}");
    for (open, close) in [("<script>", "</script>"), ("<style>", "</style>")] {
        let start = html.find(open).expect(open) + open.len();
        let end = start + html[start..].find(close).unwrap();
        let digest = Sha256::digest(&html.as_bytes()[start..end]);
        let hash = base64::engine::general_purpose::STANDARD.encode(digest);
        assert!(
            csp.contains(&format!("'sha256-{hash}'")),
            "{open} not in {csp}"
        );
    }
    assert!(html.contains("name=\"viewport\""));
    assert!(html.contains("data-route=\"/bc/\""), "{html}");
    assert!(html.contains("data-route=\"/bc/sandbox/\""), "{html}");
    assert!(html.contains("class=\"valid\""), "{html}");
    assert_no_secret(&html);
    proxy.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_auth_protects_the_page_but_not_probes_or_metrics() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    for auth in [
        "basic: { username: ops, password: \"${ERP_PASSWORD}\" }",
        "api_key: ${SCANNER_KEY}",
    ] {
        let yaml = with_admin_auth(&admin_yaml(&idp, &upstream), auth);
        let proxy = spawn_ops_proxy(config(&yaml, standard_vars()), None).await;
        for path in ["/", "/status.json"] {
            let refused = get(proxy.admin, path).await;
            assert_eq!(refused.status, 401, "{auth} {path}");
            assert!(
                refused
                    .header("www-authenticate")
                    .is_some_and(|c| c.starts_with("Basic ")),
                "{auth}"
            );
        }
        let json = [("content-type", "application/json")];
        let test = send(
            proxy.admin,
            "POST",
            "/status/test",
            &json,
            r#"{"route":"/bc/"}"#,
        )
        .await;
        assert_eq!(test.status, 401, "{auth}");
        let wrong_basic = basic("ops", "wrong");
        let wrong = [
            ("authorization", wrong_basic.as_str()),
            ("x-api-key", "wrong"),
        ];
        assert_eq!(
            send(proxy.admin, "GET", "/status.json", &wrong, "")
                .await
                .status,
            401
        );
        let right_basic = basic("ops", PASSWORD);
        let right: &[(&str, &str)] = if auth.starts_with("basic") {
            &[("authorization", right_basic.as_str())]
        } else {
            &[("x-api-key", API_KEY)]
        };
        let allowed = send(proxy.admin, "GET", "/status.json", right, "").await;
        assert_eq!(allowed.status, 200, "{auth}");
        assert_eq!(allowed.json()["routes"][0]["prefix"], "/bc/");
        assert_eq!(send(proxy.admin, "GET", "/", right, "").await.status, 200);
        // Probes and the scraper need nothing.
        assert_eq!(get(proxy.admin, "/healthz").await.status, 200);
        assert_eq!(get(proxy.admin, "/metrics").await.status, 200);
        assert_ne!(get(proxy.admin, "/readyz").await.status, 401);
        proxy.handle.shutdown().await;
    }
}

#[test]
fn a_non_loopback_admin_listener_without_auth_is_a_config_error() {
    let idp_free = |listen: &str, auth: &str| {
        format!(
            "admin:\n  listen: {listen}\n{auth}credentials:\n  bc:\n    type: client_secret\n    \
             tenant_id: {tenant}\n    client_id: app-1\n    client_secret: ${{BC_SECRET}}\n\
             clients:\n  erp:\n    basic: {{ username: erp, password: \"${{ERP_PASSWORD}}\" }}\n\
             routes:\n  - prefix: /bc/\n    upstream: https://api.businesscentral.dynamics.com/v2.0/{tenant}/Production/\n    \
             credential: bc\n    clients: [erp]\n",
            tenant = support::TENANT
        )
    };
    let source = || s2s_proxy::Source::inline("proxy.yaml", standard_vars());
    let error = s2s_proxy::Config::from_yaml_str(&idp_free("0.0.0.0:9090", ""), &source())
        .expect_err("an open status page on every interface");
    let text = error.to_string();
    assert!(text.contains("admin.auth"), "{text}");
    assert!(text.contains("loopback"), "{text}");
    let auth = "  auth:\n    api_key: ${SCANNER_KEY}\n";
    s2s_proxy::Config::from_yaml_str(&idp_free("0.0.0.0:9090", auth), &source())
        .expect("auth given");
    s2s_proxy::Config::from_yaml_str(&idp_free("127.0.0.1:9090", ""), &source())
        .expect("loopback needs none");
    let empty = "  auth: {}\n";
    let error = s2s_proxy::Config::from_yaml_str(&idp_free("127.0.0.1:9090", empty), &source())
        .expect_err("auth without a method");
    assert!(error.to_string().contains("admin.auth"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_test_endpoint_refuses_anything_but_json() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_admin_proxy(&idp, &upstream).await;
    idp.wait_for_calls(1).await;
    let calls = idp.calls();
    for content_type in [
        "application/x-www-form-urlencoded",
        "text/plain",
        "multipart/form-data; boundary=x",
    ] {
        let answer = send(
            proxy.admin,
            "POST",
            "/status/test",
            &[("content-type", content_type)],
            r#"{"route":"/bc/"}"#,
        )
        .await;
        assert_eq!(answer.status, 415, "{content_type}");
    }
    let none = send(
        proxy.admin,
        "POST",
        "/status/test",
        &[],
        r#"{"route":"/bc/"}"#,
    )
    .await;
    assert_eq!(none.status, 415);
    let json = [("content-type", "application/json")];
    let unknown = send(
        proxy.admin,
        "POST",
        "/status/test",
        &json,
        r#"{"route":"/x/"}"#,
    )
    .await;
    assert_eq!(unknown.status, 400);
    assert_eq!(get(proxy.admin, "/status/test").await.status, 405);
    assert_eq!(idp.calls(), calls, "a refused test fetched a token");
    assert_eq!(upstream.count(), 0);
    proxy.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_test_endpoint_runs_the_token_and_upstream_steps() {
    let idp = FakeIdp::start_with(IdpMode::IssueToken(TOKEN.to_owned())).await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_admin_proxy(&idp, &upstream).await;
    idp.wait_for_calls(1).await;
    let calls = idp.calls();
    let json = [("content-type", "application/json; charset=utf-8")];

    let answer = send(
        proxy.admin,
        "POST",
        "/status/test",
        &json,
        r#"{"route":"/bc/"}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let result = answer.json();
    assert_eq!(result["route"], "/bc/");
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["hint"], Value::Null);
    let steps = result["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["token", "upstream"]);
    assert!(steps.iter().all(|s| s["ok"] == true && s["ms"].is_u64()));
    assert!(idp.calls() > calls, "the test fetched its own token");
    // The upstream call carried the token to the route's upstream base (the doctor path
    // of a host that is no known service).
    let recorded = upstream.requests();
    let call = recorded.last().expect("an upstream call");
    assert_eq!(call.target, support::BC_BASE);
    assert_eq!(
        call.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_no_secret(&answer.text());

    // A refused credential stops at the token step, with the AADSTS hint.
    idp.set_mode(IdpMode::invalid_client());
    let answer = send(
        proxy.admin,
        "POST",
        "/status/test",
        &json,
        r#"{"route":"/bc/"}"#,
    )
    .await;
    let result = answer.json();
    assert_eq!(result["ok"], false);
    assert_eq!(result["steps"].as_array().unwrap().len(), 1);
    assert_eq!(result["steps"][0]["name"], "token");
    let detail = result["steps"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("AADSTS7000215"), "{detail}");
    assert!(
        result["hint"].as_str().unwrap().contains("secret value"),
        "{result}"
    );
    assert_no_secret(&answer.text());

    // An upstream that refuses the token fails the upstream step with its explanation.
    idp.set_mode(IdpMode::IssueToken(TOKEN.to_owned()));
    upstream.respond(|_| {
        http::Response::builder()
            .status(403)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap()
    });
    let result = send(
        proxy.admin,
        "POST",
        "/status/test",
        &json,
        r#"{"route":"/bc/"}"#,
    )
    .await
    .json();
    assert_eq!(result["ok"], false);
    assert_eq!(result["steps"][1]["name"], "upstream");
    assert_eq!(result["steps"][1]["ok"], false);
    assert!(
        result["hint"].as_str().unwrap().contains("denies access"),
        "{result}"
    );
    proxy.handle.shutdown().await;
}
