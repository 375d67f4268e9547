//! Operations (docs/operations.md): the admin listener's `/healthz`, `/readyz` and
//! `/metrics`, configuration reload (library call, changed file, SIGHUP to the binary),
//! tokens kept across reloads, trace context passed through, `s2s-proxy healthcheck`.

mod support;

#[path = "support/cli.rs"]
#[allow(dead_code)]
mod cli;

use std::time::Duration;

use serde_json::Value;

use cli::{Running, TempDir, command, free_port, run_to_end};
use support::{
    CLIENT_SECRET, FakeIdp, FakeUpstream, IdpMode, PASSWORD, admin_yaml, basic, config, eventually,
    get, send, spawn_admin_proxy, spawn_ops_proxy, standard_vars, with_limits,
};

const LIMIT: Duration = Duration::from_secs(10);

async fn erp_get(addr: std::net::SocketAddr, path: &str) -> support::Answer {
    send(
        addr,
        "GET",
        path,
        &[("authorization", &basic("erp", PASSWORD))],
        "",
    )
    .await
}

/// The value of the series `name{labels}` in a Prometheus text answer.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().unwrap())
    })
}

async fn metrics(admin: std::net::SocketAddr) -> String {
    let answer = get(admin, "/metrics").await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    answer.text()
}

// ---------------------------------------------------------------------------------------
// Admin endpoints
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_traffic_with_labels_from_config_only() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_admin_proxy(&idp, &upstream).await;
    idp.wait_for_calls(1).await;
    let addr = proxy.handle.addr;

    assert_eq!(erp_get(addr, "/bc/companies?$filter=x").await.status, 200);
    assert_eq!(erp_get(addr, "/bc/companies(1)").await.status, 200);
    assert_eq!(get(addr, "/bc/unauthenticated").await.status, 401);
    assert_eq!(erp_get(addr, "/nowhere/secret-path").await.status, 404);
    assert_eq!(
        send(addr, "PROPFIND", "/bc/x", &[], "").await.status,
        405,
        "unknown methods are refused"
    );
    upstream.respond(|_| {
        http::Response::builder()
            .status(503)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    });
    assert_eq!(erp_get(addr, "/bc/sandbox/busy").await.status, 503);

    // The line is written when the response body is finished, just after the client got it.
    let text = eventually(LIMIT, "six requests counted", || async {
        let text = metrics(proxy.admin).await;
        let counted = sample(
            &text,
            r#"s2s_proxy_requests_total{route="/bc/sandbox/",method="GET",status="503"}"#,
        );
        counted.map(|_| text)
    })
    .await;
    let expect = |series: &str, value: f64| {
        assert_eq!(sample(&text, series), Some(value), "{series} in:\n{text}");
    };
    expect(
        r#"s2s_proxy_requests_total{route="/bc/",method="GET",status="200"}"#,
        2.0,
    );
    expect(
        r#"s2s_proxy_requests_total{route="none",method="GET",status="401"}"#,
        1.0,
    );
    expect(
        r#"s2s_proxy_requests_total{route="none",method="GET",status="404"}"#,
        1.0,
    );
    expect(
        r#"s2s_proxy_requests_total{route="none",method="other",status="405"}"#,
        1.0,
    );
    expect(
        r#"s2s_proxy_request_duration_seconds_count{route="/bc/"}"#,
        2.0,
    );
    expect(
        r#"s2s_proxy_upstream_duration_seconds_count{route="/bc/"}"#,
        2.0,
    );
    expect(
        r#"s2s_proxy_upstream_duration_seconds_count{route="/bc/sandbox/"}"#,
        1.0,
    );
    expect(
        r#"s2s_proxy_token_fetches_total{credential="bc",outcome="ok"}"#,
        1.0,
    );
    expect(r#"s2s_proxy_in_flight{route="/bc/"}"#, 0.0);
    expect(r#"s2s_proxy_in_flight{route="/bc/sandbox/"}"#, 0.0);
    expect(r#"s2s_proxy_queued{route="/bc/"}"#, 0.0);
    let expiry: f64 = text
        .lines()
        .find(|line| line.starts_with(r#"s2s_proxy_token_expiry_seconds{credential="bc",scope=""#))
        .and_then(|line| line.rsplit_once(' '))
        .map(|(_, value)| value.parse().unwrap())
        .unwrap_or_else(|| panic!("no expiry gauge in:\n{text}"));
    assert!((3500.0..=3599.0).contains(&expiry), "{expiry}");
    for leak in [
        "secret-path",
        "companies",
        "$filter",
        "PROPFIND",
        CLIENT_SECRET,
        PASSWORD,
        "tok-1",
    ] {
        assert!(!text.contains(leak), "{leak} in metrics:\n{text}");
    }
    proxy.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_port_serves_only_its_three_endpoints() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_admin_proxy(&idp, &upstream).await;

    let health = get(proxy.admin, "/healthz").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.text(), "ok\n");
    assert_eq!(get(proxy.admin, "/index.html").await.status, 404);
    assert_eq!(get(proxy.admin, "/bc/companies").await.status, 404);
    assert_eq!(get(proxy.admin, "/metrics/x").await.status, 404);
    assert_eq!(
        send(proxy.admin, "POST", "/healthz", &[], "x").await.status,
        404
    );
    assert_eq!(
        send(proxy.admin, "HEAD", "/healthz", &[], "").await.status,
        200
    );
    // The proxy port does not answer admin paths.
    assert_eq!(get(proxy.handle.addr, "/healthz").await.status, 401);
    assert_eq!(upstream.count(), 0);
    proxy.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_waits_for_tokens_and_shows_why_not() {
    let idp = FakeIdp::start_with(IdpMode::Fail {
        status: 503,
        body: r#"{"error":"temporarily_unavailable","error_description":"AADSTS50196: The server terminated an operation because it encountered a client request loop."}"#.to_owned(),
        retry_after: None,
    })
    .await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_admin_proxy(&idp, &upstream).await;
    idp.wait_for_calls(1).await;

    let body = eventually(LIMIT, "a failed token in /readyz", || async {
        let answer = get(proxy.admin, "/readyz").await;
        assert_eq!(answer.status, 503, "{}", answer.text());
        let body = answer.json();
        (body["credentials"][0]["token"] == "failed").then_some(body)
    })
    .await;
    assert_eq!(body["status"], "waiting_for_tokens");
    let credential = &body["credentials"][0];
    assert_eq!(credential["credential"], "bc");
    assert_eq!(credential["permanent"], false);
    let error = credential["last_error"].as_str().unwrap();
    assert!(error.contains("temporarily_unavailable"), "{error}");
    assert!(error.contains("50196"), "{error}");
    assert_eq!(body["routes"][0]["prefix"], "/bc/");
    assert_eq!(body["routes"][0]["token"], "failed");
    let s = serde_json::to_string(&body).unwrap();
    assert!(
        !s.contains(CLIENT_SECRET) && !s.contains("client request loop"),
        "{s}"
    );

    // The identity provider recovers; the cache retries after its backoff (2 s).
    idp.set_mode(IdpMode::Issue { expires_in: 3599 });
    let ready = eventually(LIMIT, "/readyz to turn 200", || async {
        let answer = get(proxy.admin, "/readyz").await;
        (answer.status == 200).then(|| answer.json())
    })
    .await;
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["credentials"][0]["token"], "valid");
    assert_eq!(ready["credentials"][0]["last_error"], Value::Null);
    assert!(ready["credentials"][0]["expires_in_s"].as_u64().unwrap() > 3500);
    let text = metrics(proxy.admin).await;
    assert!(
        sample(
            &text,
            r#"s2s_proxy_token_fetches_total{credential="bc",outcome="provider_error"}"#
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"s2s_proxy_token_fetches_total{credential="bc",outcome="ok"}"#
        ),
        Some(1.0),
        "{text}"
    );
    proxy.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_shows_the_aadsts_hint_of_a_permanent_error() {
    let idp = FakeIdp::start_with(IdpMode::invalid_client()).await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_admin_proxy(&idp, &upstream).await;
    idp.wait_for_calls(1).await;

    let body = eventually(LIMIT, "a failed token in /readyz", || async {
        let body = get(proxy.admin, "/readyz").await.json();
        (body["credentials"][0]["token"] == "failed").then_some(body)
    })
    .await;
    let credential = &body["credentials"][0];
    assert_eq!(credential["permanent"], true);
    let error = credential["last_error"].as_str().unwrap();
    assert!(
        error.contains("7000215") && error.contains("secret ID"),
        "{error}"
    );
    proxy.handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------------------

/// The standard admin config plus a `/crm/` route on the same credential.
fn with_crm_route(yaml: &str, upstream: &FakeUpstream) -> String {
    format!(
        "{yaml}  - prefix: /crm/\n    upstream: {}/api/data/v9.2/\n    credential: bc\n    clients: [erp]\n",
        upstream.base()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_keeps_tokens_of_unchanged_credentials_and_renews_changed_ones() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = admin_yaml(&idp, &upstream);
    let proxy = spawn_ops_proxy(config(&yaml, standard_vars()), None).await;
    idp.wait_for_calls(1).await;
    let addr = proxy.handle.addr;
    assert_eq!(erp_get(addr, "/crm/accounts").await.status, 404);

    // A new route on an unchanged credential: no new token request.
    let report = proxy
        .reload
        .apply(config(&with_crm_route(&yaml, &upstream), standard_vars()));
    assert_eq!(report.kept_credentials, ["bc"]);
    assert!(report.restart_required.is_empty(), "{report:?}");
    let answer = erp_get(addr, "/crm/accounts").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let seen = upstream.requests();
    assert_eq!(seen.last().unwrap().target, "/api/data/v9.2/accounts");
    assert_eq!(
        seen.last().unwrap().header("authorization"),
        Some("Bearer tok-1")
    );
    assert_eq!(idp.calls(), 1, "the cached token was kept");

    // Started without a file: nothing to re-read.
    assert!(matches!(
        proxy.reload.reload(),
        Err(s2s_proxy::ReloadError::NoConfigFile)
    ));

    // A changed credential gets a new token; a changed limit needs a restart.
    let changed = with_limits(
        &with_crm_route(&yaml, &upstream).replace("client_id: app-1", "client_id: app-2"),
        "max_connections: 5",
    );
    let report = proxy.reload.apply(config(&changed, standard_vars()));
    assert!(report.kept_credentials.is_empty(), "{report:?}");
    assert_eq!(report.restart_required, ["server.limits"]);
    idp.wait_for_calls(2).await;
    let form = &idp.requests()[1].form;
    assert!(form.contains(&("client_id".to_owned(), "app-2".to_owned())));
    let answer = erp_get(addr, "/crm/accounts").await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        upstream.requests().last().unwrap().header("authorization"),
        Some("Bearer tok-2")
    );

    let text = metrics(proxy.admin).await;
    assert_eq!(
        sample(&text, r#"s2s_proxy_config_reloads_total{outcome="ok"}"#),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"s2s_proxy_in_flight{route="/crm/"}"#),
        Some(0.0)
    );
    let ready = get(proxy.admin, "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    let credentials = ready.json()["credentials"].as_array().unwrap().len();
    assert_eq!(credentials, 1, "{}", ready.text());
    proxy.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn in_flight_requests_finish_on_the_configuration_they_started_with() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = admin_yaml(&idp, &upstream);
    let proxy = spawn_ops_proxy(config(&yaml, standard_vars()), None).await;
    idp.wait_for_calls(1).await;
    let addr = proxy.handle.addr;

    upstream.set_delay(Duration::from_millis(700));
    let slow = tokio::spawn(async move { erp_get(addr, "/bc/sandbox/slow").await });
    eventually(LIMIT, "the request to reach the upstream", || async {
        (upstream.count() == 1).then_some(())
    })
    .await;
    let in_flight = metrics(proxy.admin).await;
    assert_eq!(
        sample(&in_flight, r#"s2s_proxy_in_flight{route="/bc/sandbox/"}"#),
        Some(1.0),
        "{in_flight}"
    );

    // Remove the route while its request is running.
    let without_sandbox = yaml.replace("  - prefix: /bc/sandbox/\n", "  - prefix: /other/\n");
    proxy
        .reload
        .apply(config(&without_sandbox, standard_vars()));
    upstream.set_delay(Duration::ZERO);
    // /bc/sandbox/x now matches /bc/: the new table.
    erp_get(addr, "/bc/sandbox/x").await;
    assert_eq!(
        upstream.requests().last().unwrap().target,
        format!("/v2.0/{}/Production/sandbox/x", support::TENANT)
    );
    let answer = slow.await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(
        upstream.requests()[0].target,
        format!("/v2.0/{}/Sandbox/slow", support::TENANT)
    );
    assert_eq!(idp.calls(), 1);
    proxy.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_file_is_reloaded_and_an_invalid_one_is_refused() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let dir = TempDir::new("reload-file");
    // Secrets from files: re-reading the configuration needs no process environment.
    dir.write("bc_secret", CLIENT_SECRET);
    dir.write("erp_password", PASSWORD);
    dir.write("scanner_key", support::API_KEY);
    let yaml = admin_yaml(&idp, &upstream)
        .replace("${BC_SECRET}", "${file:bc_secret}")
        .replace("${ERP_PASSWORD}", "${file:erp_password}")
        .replace("${SCANNER_KEY}", "${file:scanner_key}");
    let path = dir.write("proxy.yaml", &yaml);
    let loaded = s2s_proxy::Config::load(&path).expect("valid file");
    let proxy = spawn_ops_proxy(loaded, Some(&path)).await;
    idp.wait_for_calls(1).await;
    let addr = proxy.handle.addr;

    // No signal, no call: the poll notices the change.
    dir.write("proxy.yaml", &with_crm_route(&yaml, &upstream));
    eventually(LIMIT, "the changed file to be applied", || async {
        (erp_get(addr, "/crm/x").await.status == 200).then_some(())
    })
    .await;
    assert_eq!(idp.calls(), 1, "the cached token was kept");

    // An invalid file: every problem reported, the running configuration stays.
    dir.write(
        "proxy.yaml",
        &with_crm_route(&yaml, &upstream).replace(
            "credential: bc\n    clients: [erp]\n",
            "credential: nope\n    clients: [erp]\n",
        ),
    );
    let error = proxy.reload.reload().expect_err("invalid file refused");
    let problems = error.to_string();
    assert!(problems.contains("proxy.yaml"), "{problems}");
    assert!(problems.contains("routes[1].credential"), "{problems}");
    assert!(problems.contains("routes[2].credential"), "{problems}");
    assert_eq!(erp_get(addr, "/crm/x").await.status, 200);
    assert_eq!(erp_get(addr, "/bc/sandbox/x").await.status, 200);

    let text = metrics(proxy.admin).await;
    assert!(
        sample(&text, r#"s2s_proxy_config_reloads_total{outcome="error"}"#)
            .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        sample(&text, r#"s2s_proxy_config_reloads_total{outcome="ok"}"#).is_some_and(|n| n >= 1.0),
        "{text}"
    );
    proxy.handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Trace context
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn w3c_trace_context_reaches_the_upstream_untouched() {
    let (_idp, upstream, proxy) = support::standard().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let tracestate = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
    let answer = send(
        proxy.addr,
        "GET",
        "/bc/companies",
        &[
            ("authorization", &basic("erp", PASSWORD)),
            ("traceparent", traceparent),
            ("tracestate", tracestate),
        ],
        "",
    )
    .await;
    assert_eq!(answer.status, 200);
    let seen = &upstream.requests()[0];
    assert_eq!(seen.header("traceparent"), Some(traceparent));
    assert_eq!(seen.header("tracestate"), Some(tracestate));
    assert_eq!(seen.headers.get_all("traceparent").iter().count(), 1);
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// The binary: SIGHUP and healthcheck
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_running_binary_and_healthcheck_probes_it() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let dir = TempDir::new("reload-sighup");
    let addr = free_port();
    let admin = free_port();
    let yaml = admin_yaml(&idp, &upstream)
        .replace(
            "admin:\n  listen: 127.0.0.1:0",
            &format!("admin:\n  listen: {admin}"),
        )
        // One worker; the other binary tests (and tests/workers.rs) run the default,
        // one worker per core.
        .replacen(
            "listen: 127.0.0.1:0",
            &format!("listen: {addr}\n  workers: 1"),
            1,
        );
    let path = dir.write("proxy.yaml", &yaml);
    let mut cmd = command(["--log-format", "json"]);
    cmd.arg("run")
        .arg("--config")
        .arg(&path)
        .envs(standard_vars());
    let mut proxy = Running::spawn(cmd);
    proxy.wait_until_accepting(addr).await;
    idp.wait_for_calls(1).await;

    let url = format!("http://{admin}/healthz");
    let ok = run_to_end(command(["healthcheck", "--url", &url]), None).await;
    assert_eq!(ok.code, Some(0), "{ok:?}");
    let ready = format!("http://{admin}/readyz");
    let ok = run_to_end(command(["healthcheck", "--url", &ready]), None).await;
    assert_eq!(ok.code, Some(0), "{ok:?}");
    let missing = format!("http://{admin}/nope");
    let fail = run_to_end(command(["healthcheck", "--url", &missing]), None).await;
    assert_eq!(fail.code, Some(1), "{fail:?}");
    assert!(fail.all().contains("404"), "{fail:?}");
    let closed = format!("http://{}/healthz", free_port());
    assert_eq!(
        run_to_end(command(["healthcheck", "--url", &closed]), None)
            .await
            .code,
        Some(1)
    );

    let bad = yaml.replace(
        "credential: bc\n    clients: [erp]\n",
        "credential: nope\n    clients: [erp]\n",
    );
    dir.write("proxy.yaml", &bad);
    proxy.signal("HUP");
    eventually(LIMIT, "the failed reload to be logged", || async {
        proxy
            .stderr()
            .contains("Configuration reload failed")
            .then_some(())
    })
    .await;
    assert_eq!(erp_get(addr, "/bc/sandbox/x").await.status, 200);

    dir.write("proxy.yaml", &with_crm_route(&yaml, &upstream));
    proxy.signal("HUP");
    eventually(LIMIT, "the /crm/ route after SIGHUP", || async {
        (erp_get(addr, "/crm/x").await.status == 200).then_some(())
    })
    .await;
    assert_eq!(idp.calls(), 1, "the cached token was kept");

    proxy.signal("TERM");
    let status = proxy.exit_within(Duration::from_secs(10)).await;
    assert!(status.success(), "exit {status}");
    let stderr = proxy.stderr();
    assert!(stderr.contains("routes[1].credential"), "{stderr}");
    assert!(stderr.contains("Configuration reloaded."), "{stderr}");
    for secret in [PASSWORD, CLIENT_SECRET] {
        assert!(!stderr.contains(secret), "{secret} logged:\n{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn queued_requests_show_in_the_queue_gauge() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    upstream.set_delay(Duration::from_millis(600));
    let yaml = admin_yaml(&idp, &upstream).replacen(
        "    clients: [erp, scanner]\n",
        "    clients: [erp, scanner]\n    max_concurrent: 1\n",
        1,
    );
    let proxy = spawn_ops_proxy(config(&yaml, standard_vars()), None).await;
    let addr = proxy.handle.addr;
    let requests: Vec<_> = (0..3)
        .map(|i| tokio::spawn(async move { erp_get(addr, &format!("/bc/q{i}")).await.status }))
        .collect();
    // One at the upstream, two waiting in the route's queue.
    let queued = eventually(LIMIT, "two queued requests", || async {
        let text = metrics(proxy.admin).await;
        sample(&text, r#"s2s_proxy_queued{route="/bc/"}"#).filter(|n| *n == 2.0)
    })
    .await;
    assert_eq!(queued, 2.0);
    for request in requests {
        assert_eq!(request.await.unwrap(), 200);
    }
    let text = metrics(proxy.admin).await;
    assert_eq!(
        sample(&text, r#"s2s_proxy_queued{route="/bc/"}"#),
        Some(0.0)
    );
    proxy.handle.shutdown().await;
}

#[test]
fn expired_credentials_are_warned_about_at_start_and_on_every_reload() {
    let ((), logs) = support::capture_logs(async {
        let idp = FakeIdp::start().await;
        let upstream = FakeUpstream::start().await;
        let yaml = admin_yaml(&idp, &upstream).replace(
            "client_secret: ${BC_SECRET}\n",
            "client_secret: ${BC_SECRET}\n    expires: 2020-01-31\n",
        );
        let proxy = spawn_ops_proxy(config(&yaml, standard_vars()), None).await;
        idp.wait_for_calls(1).await;
        let report = proxy.reload.apply(config(&yaml, standard_vars()));
        assert_eq!(report.kept_credentials, ["bc"]);
        proxy.handle.shutdown().await;
    });
    let text = logs.text();
    assert_eq!(
        text.matches("Credential has expired").count(),
        2,
        "once at start, once for the reload:\n{text}"
    );
}
