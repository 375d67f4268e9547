//! End-to-end behaviour of the request path: real sockets, a fake identity provider and a
//! recording fake upstream. Every test asserts on what crossed the wire.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use support::*;

use support::BC_BASE as BASE;

#[tokio::test]
async fn every_method_is_forwarded_with_its_body_and_the_token() {
    let (idp, upstream, proxy) = standard().await;
    let (name, value) = erp();
    for method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let body = if matches!(method, "GET" | "HEAD") {
            ""
        } else {
            "{\"displayName\":\"x\"}"
        };
        let answer = send(
            proxy.addr,
            method,
            "/bc/api/v2.0/companies",
            &[(name, &value)],
            body,
        )
        .await;
        assert_eq!(answer.status, 200, "{method}: {}", answer.text());
        let seen = upstream.requests().pop().unwrap();
        assert_eq!(seen.method, method);
        assert_eq!(seen.target, format!("{BASE}api/v2.0/companies"));
        assert_eq!(seen.body, Bytes::from(body));
        assert_eq!(seen.header("authorization"), Some("Bearer tok-1"));
        assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
    }
    assert_eq!(upstream.count(), 7);
    assert_eq!(idp.calls(), 1, "one token for everything");
    proxy.shutdown().await;
}

#[tokio::test]
async fn large_bodies_stream_through_unchanged() {
    let (_idp, upstream, proxy) = standard().await;
    let (name, value) = erp();
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let answer = send(
        proxy.addr,
        "POST",
        "/bc/upload",
        &[(name, &value)],
        body.clone(),
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(upstream.requests()[0].body, Bytes::from(body));
    proxy.shutdown().await;
}

#[tokio::test]
async fn business_central_paths_and_queries_arrive_byte_for_byte() {
    let (_idp, upstream, proxy) = standard().await;
    let (name, value) = erp();
    let target = "/bc/ODataV4/Company('CRONUS%20USA')/Customers?$filter=No%20eq%20'10000'&$select=No,Name&$skiptoken=abc%3D%3D";
    let answer = send(proxy.addr, "GET", target, &[(name, &value)], "").await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        upstream.requests()[0].target,
        format!(
            "{BASE}ODataV4/Company('CRONUS%20USA')/Customers?$filter=No%20eq%20'10000'&$select=No,Name&$skiptoken=abc%3D%3D"
        )
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_longest_prefix_wins_and_unknown_paths_are_404() {
    let (_idp, upstream, proxy) = standard().await;
    let (name, value) = erp();
    send(
        proxy.addr,
        "GET",
        "/bc/sandbox/companies",
        &[(name, &value)],
        "",
    )
    .await;
    assert_eq!(
        upstream.requests()[0].target,
        "/v2.0/00000000-0000-0000-0000-0000000000t1/Sandbox/companies"
    );
    // `/bc` and `/BC/x` belong to `/bc/` (tests/canonical_paths.rs); `/bcx` does not.
    for path in ["/crm/x", "/", "/bcx", "/bc-sandbox/x"] {
        let answer = send(proxy.addr, "GET", path, &[(name, &value)], "").await;
        assert_eq!(answer.status, 404, "{path}");
        assert_eq!(answer.json()["error"], "not_found");
    }
    assert_eq!(upstream.count(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn unsafe_requests_are_refused_and_nothing_is_forwarded() {
    let (idp, upstream, proxy) = standard().await;
    let auth = basic("erp", PASSWORD);
    let cases: Vec<(String, u16)> = vec![
        (
            format!("GET /bc/../crm/x HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            format!("GET /bc/./x HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            format!("GET /bc/%2e%2e/crm HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            format!("GET /bc/%2E%2e/crm HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            format!("GET /bc/.%2e/crm HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            format!("GET /bc/..%2fcrm HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            format!("GET /bc/x%2Fy HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            format!("GET /bc/%5c../crm HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            format!("GET /bc\\..\\crm HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            format!("GET /bc/x%00.json HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            format!(
                "GET /bc/x%0d%0aHost:%20evil HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"
            ),
            400,
        ),
        (
            format!(
                "GET http://evil.test/bc/x HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"
            ),
            400,
        ),
        (
            format!(
                "GET http://a@169.254.169.254:80/bc/x HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"
            ),
            400,
        ),
        (
            format!("OPTIONS * HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            format!("GET /bc/x HTTP/1.1\r\nHost: a\r\nHost: b\r\nAuthorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            format!("GET /bc/x HTTP/1.1\r\nAuthorization: {auth}\r\n\r\n"),
            400,
        ),
        (
            format!(
                "GET /bc/x HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\nAuthorization: Bearer evil\r\n\r\n"
            ),
            400,
        ),
        (
            format!(
                "GET /bc/x HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer evil\r\nAuthorization: {auth}\r\n\r\n"
            ),
            400,
        ),
        (
            format!(
                "POST /bc/x HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /bc/y HTTP/1.1\r\nHost: p\r\n\r\n"
            ),
            400,
        ),
        (
            format!(
                "CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: 169.254.169.254:80\r\nAuthorization: {auth}\r\n\r\n"
            ),
            405,
        ),
        (
            format!("TRACE /bc/x HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"),
            405,
        ),
        (
            format!("get /bc/x HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"),
            405,
        ),
        (
            format!("PROPFIND /bc/x HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"),
            405,
        ),
    ];
    for (request, expected) in &cases {
        let response = raw(proxy.addr, request.as_bytes()).await;
        assert_eq!(
            raw_status(&response),
            *expected,
            "{request:?} -> {response}"
        );
        assert!(
            response.to_ascii_lowercase().contains("x-request-id:"),
            "{response}"
        );
    }
    assert_eq!(upstream.count(), 0, "nothing may be forwarded");
    assert_eq!(idp.calls(), 1, "only the start-up token request");
    proxy.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_and_client_credentials_never_reach_the_upstream() {
    let (_idp, upstream, proxy) = standard().await;
    let (name, value) = erp();
    let answer = send(
        proxy.addr,
        "GET",
        "/bc/x",
        &[
            (name, &value),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("x-api-key", API_KEY),
            (
                "connection",
                "keep-alive, X-Foo, Authorization, X-Forwarded-For",
            ),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("x-foo", "1"),
            ("x-forwarded-for", "10.1.1.1"),
            ("x-original-url", "/crm/x"),
            ("if-match", "W/\"JzQ0OzE7MDsn\""),
            ("prefer", "odata.maxpagesize=50"),
            ("data-access-intent", "ReadOnly"),
            ("x-request-id", "trace-abc-1"),
        ],
        "",
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-request-id"), Some("trace-abc-1"));
    let seen = &upstream.requests()[0];
    for dropped in [
        "proxy-authorization",
        "x-api-key",
        "connection",
        "keep-alive",
        "te",
        "upgrade",
        "x-foo",
        "x-original-url",
    ] {
        assert!(seen.header(dropped).is_none(), "{dropped} was forwarded");
    }
    assert_eq!(seen.header("authorization"), Some("Bearer tok-1"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        seen.header("x-forwarded-host"),
        Some(proxy.addr.to_string().as_str())
    );
    assert_eq!(
        seen.header("host"),
        Some(upstream.addr.to_string().as_str())
    );
    assert_eq!(seen.header("x-request-id"), Some("trace-abc-1"));
    assert_eq!(seen.header("if-match"), Some("W/\"JzQ0OzE7MDsn\""));
    assert_eq!(seen.header("prefer"), Some("odata.maxpagesize=50"));
    assert_eq!(seen.header("data-access-intent"), Some("ReadOnly"));
    let all: String = seen
        .headers
        .iter()
        .map(|(_, v)| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    assert!(
        !all.contains(&value["Basic ".len()..]),
        "the Basic credentials leaked"
    );
    assert!(!all.contains(API_KEY));
    proxy.shutdown().await;
}

#[tokio::test]
async fn upstream_hop_by_hop_response_headers_are_dropped() {
    let (_idp, upstream, proxy) = standard().await;
    upstream.respond(|_| {
        Response::builder()
            .header("connection", "x-internal")
            .header("x-internal", "secret-topology")
            .header("keep-alive", "timeout=5")
            .header(
                "www-authenticate",
                "Bearer authorization_uri=\"https://login.microsoftonline.com/t\"",
            )
            .header("etag", "W/\"1\"")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    });
    let (name, value) = erp();
    let answer = send(proxy.addr, "GET", "/bc/x", &[(name, &value)], "").await;
    assert_eq!(answer.status, 200);
    assert!(answer.header("x-internal").is_none());
    assert!(answer.header("keep-alive").is_none());
    assert!(answer.header("www-authenticate").is_none());
    assert_eq!(answer.header("etag"), Some("W/\"1\""));
    assert!(answer.header("x-request-id").is_some());
    proxy.shutdown().await;
}

#[tokio::test]
async fn authentication_comes_first_and_never_causes_a_token_request() {
    let idp = FakeIdp::start_with(IdpMode::Fail {
        status: 503,
        body: "down".into(),
        retry_after: None,
    })
    .await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_proxy(config(&standard_yaml(&idp, &upstream), standard_vars())).await;
    idp.wait_for_calls(1).await;
    let calls = idp.calls();
    let wrong_password = basic("erp", "nope");
    let unknown_user = basic("mallory", PASSWORD);
    let mut bodies = Vec::new();
    for headers in [
        vec![],
        vec![("authorization", wrong_password.as_str())],
        vec![("authorization", unknown_user.as_str())],
        vec![("authorization", "Basic !!!")],
        vec![("x-api-key", "ak_wrong")],
    ] {
        let answer = send(proxy.addr, "GET", "/bc/x", &headers, "").await;
        assert_eq!(answer.status, 401, "{headers:?}");
        assert_eq!(
            answer.header("www-authenticate"),
            Some("Basic realm=\"s2s-proxy\"")
        );
        let mut json = answer.json();
        json["request_id"] = serde_json::Value::Null;
        bodies.push(json);
    }
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "401s must be identical: {bodies:?}"
    );
    // 401 beats 404: unknown callers learn nothing about routes.
    assert_eq!(
        send(proxy.addr, "GET", "/nothing/here", &[], "")
            .await
            .status,
        401
    );
    assert_eq!(
        idp.calls(),
        calls,
        "unauthenticated requests must not reach the IdP"
    );
    assert_eq!(upstream.count(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn clients_are_authorized_per_route() {
    let (_idp, upstream, proxy) = standard().await;
    // scanner may use /bc/ but not /bc/sandbox/; other may use neither.
    let key = [("x-api-key", API_KEY)];
    assert_eq!(send(proxy.addr, "GET", "/bc/x", &key, "").await.status, 200);
    let forbidden = send(proxy.addr, "GET", "/bc/sandbox/x", &key, "").await;
    assert_eq!(forbidden.status, 403);
    assert_eq!(forbidden.json()["error"], "forbidden");
    assert_eq!(forbidden.json()["route"], "/bc/sandbox/");
    let other = basic("other", PASSWORD);
    assert_eq!(
        send(proxy.addr, "GET", "/bc/x", &[("authorization", &other)], "")
            .await
            .status,
        403
    );
    assert_eq!(upstream.count(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn network_clients_are_identified_by_source_address() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = format!(
        r#"
credentials:
  bc: {{ type: client_secret, tenant_id: {TENANT}, authority: "{authority}", client_id: app, client_secret: "${{S}}" }}
clients:
  floor: {{ networks: [127.0.0.1/32] }}
  elsewhere: {{ networks: [10.20.0.0/16] }}
  keyed: {{ api_key: "${{K}}", networks: [10.20.0.0/16] }}
routes:
  - {{ prefix: /floor/, upstream: "{base}/", credential: bc, clients: [floor] }}
  - {{ prefix: /elsewhere/, upstream: "{base}/", credential: bc, clients: [elsewhere, keyed] }}
server: {{ listen: "127.0.0.1:0" }}
"#,
        authority = idp.authority(),
        base = upstream.base()
    );
    let vars = [
        ("S".to_owned(), CLIENT_SECRET.to_owned()),
        ("K".to_owned(), API_KEY.to_owned()),
    ]
    .into();
    let proxy = spawn_proxy(config(&yaml, vars)).await;
    assert_eq!(
        send(proxy.addr, "GET", "/floor/x", &[], "").await.status,
        200
    );
    assert_eq!(
        send(proxy.addr, "GET", "/elsewhere/x", &[], "")
            .await
            .status,
        403
    );
    // The right key from the wrong network is not enough.
    assert_eq!(
        send(
            proxy.addr,
            "GET",
            "/elsewhere/x",
            &[("x-api-key", API_KEY)],
            ""
        )
        .await
        .status,
        401
    );
    // A spoofed X-Forwarded-For from an untrusted peer changes nothing.
    assert_eq!(
        send(
            proxy.addr,
            "GET",
            "/elsewhere/x",
            &[("x-forwarded-for", "10.20.1.1")],
            ""
        )
        .await
        .status,
        403
    );
    assert_eq!(upstream.count(), 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_cold_requests_cause_one_token_request() {
    let idp = FakeIdp::start_with(IdpMode::Slow(Duration::from_millis(500))).await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_proxy(config(&standard_yaml(&idp, &upstream), standard_vars())).await;

    // One HTTP/2 connection carries all requests, so the test needs no thousand sockets.
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let auth = basic("erp", PASSWORD);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let mut sender = sender.clone();
        let request = http::Request::get(format!("http://{}/bc/item/{i}", proxy.addr))
            .header("authorization", &auth)
            .body(Full::new(Bytes::new()))
            .unwrap();
        tasks.spawn(async move {
            sender.ready().await.unwrap();
            sender.send_request(request).await.unwrap().status()
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    assert_eq!(idp.calls(), 1);
    assert_eq!(upstream.count(), 1000);
    assert!(
        upstream
            .requests()
            .iter()
            .all(|r| r.header("authorization") == Some("Bearer tok-1"))
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_upstream_401_renews_the_token_and_retries_once() {
    let (idp, upstream, proxy) = standard().await;
    upstream.respond(|request| {
        let status = if request.header("authorization") == Some("Bearer tok-1") {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::CREATED
        };
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    });
    let (name, value) = erp();
    let answer = send(
        proxy.addr,
        "POST",
        "/bc/customers",
        &[(name, &value)],
        "{\"name\":\"x\"}",
    )
    .await;
    assert_eq!(answer.status, 201, "{}", answer.text());
    let seen = upstream.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header("authorization"), Some("Bearer tok-1"));
    assert_eq!(seen[1].header("authorization"), Some("Bearer tok-2"));
    assert_eq!(seen[1].body, Bytes::from_static(b"{\"name\":\"x\"}"));
    assert_eq!(idp.calls(), 2);

    // The new token is cached: the next request uses it without another token request.
    assert_eq!(
        send(proxy.addr, "GET", "/bc/x", &[(name, &value)], "")
            .await
            .status,
        201
    );
    assert_eq!(idp.calls(), 2);
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_upstream_that_keeps_answering_401_is_a_502_after_one_retry_and_403_is_never_retried() {
    let (idp, upstream, proxy) = standard().await;
    upstream.respond(|_| {
        Response::builder()
            .status(401)
            .header(
                "www-authenticate",
                "Bearer authorization_uri=\"https://login.example/t\"",
            )
            .body(Full::new(Bytes::new()))
            .unwrap()
    });
    let (name, value) = erp();
    let answer = send(proxy.addr, "GET", "/bc/x", &[(name, &value)], "").await;
    // The caller's credentials were fine: a bare 401 would tell it otherwise.
    assert_eq!(answer.status, 502);
    assert_eq!(answer.json()["error"], "upstream_rejected_token");
    assert!(answer.header("www-authenticate").is_none());
    assert_eq!(upstream.count(), 2);
    assert_eq!(idp.calls(), 2);

    upstream.respond(|_| {
        Response::builder()
            .status(403)
            .body(Full::new(Bytes::new()))
            .unwrap()
    });
    assert_eq!(
        send(proxy.addr, "GET", "/bc/x", &[(name, &value)], "")
            .await
            .status,
        403
    );
    assert_eq!(upstream.count(), 3, "403 is never retried");
    assert_eq!(idp.calls(), 2, "403 never causes a token request");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_401_to_a_large_request_renews_the_token_without_replaying_the_body() {
    let (idp, upstream, proxy) = standard().await;
    upstream.respond(|request| {
        let status = if request.header("authorization") == Some("Bearer tok-1") {
            401
        } else {
            200
        };
        Response::builder()
            .status(status)
            .body(Full::new(Bytes::new()))
            .unwrap()
    });
    let (name, value) = erp();
    let large = vec![b'x'; 200 * 1024];
    let answer = send(proxy.addr, "POST", "/bc/x", &[(name, &value)], large).await;
    assert_eq!(answer.status, 502);
    assert_eq!(upstream.count(), 1, "a body over 64 KiB is not replayed");
    assert_eq!(idp.calls(), 2, "the rejected token was replaced anyway");
    assert_eq!(
        send(proxy.addr, "GET", "/bc/x", &[(name, &value)], "")
            .await
            .status,
        200
    );
    assert_eq!(
        upstream.requests()[1].header("authorization"),
        Some("Bearer tok-2")
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_wrong_client_secret_is_a_503_with_the_aadsts_hint_and_no_secret() {
    let idp = FakeIdp::start_with(IdpMode::invalid_client()).await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_proxy(config(&standard_yaml(&idp, &upstream), standard_vars())).await;
    let (name, value) = erp();
    let answer = send(proxy.addr, "GET", "/bc/x", &[(name, &value)], "").await;
    assert_eq!(answer.status, 503);
    assert!(answer.header("retry-after").is_some());
    let json = answer.json();
    assert_eq!(json["error"], "token_unavailable");
    assert_eq!(json["route"], "/bc/");
    let message = json["message"].as_str().unwrap();
    assert!(message.contains("invalid_client"), "{message}");
    assert!(message.contains("7000215"), "{message}");
    assert!(
        message.to_lowercase().contains("secret"),
        "hint expected: {message}"
    );
    let text = answer.text();
    for leak in [
        CLIENT_SECRET,
        "login.microsoftonline.com",
        "127.0.0.1",
        "Trace ID",
    ] {
        assert!(!text.contains(leak), "{leak} leaked: {text}");
    }
    assert_eq!(upstream.count(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_client_secret_travels_form_encoded_to_the_token_endpoint() {
    let (idp, _upstream, proxy) = standard().await;
    let request = &idp.requests()[0];
    assert_eq!(request.path, format!("/{TENANT}/oauth2/v2.0/token"));
    let form: std::collections::HashMap<_, _> = request.form.iter().cloned().collect();
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["client_id"], "app-1");
    assert_eq!(form["client_secret"], CLIENT_SECRET);
    assert_eq!(form["scope"], "https://127.0.0.1/.default");
    proxy.shutdown().await;
}

#[tokio::test]
async fn upstream_failures_are_502_and_timeouts_504() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let yaml = standard_yaml(&idp, &upstream)
        .replace(
            &format!("{}/v2.0/{TENANT}/Sandbox/", upstream.base()),
            &format!("http://{closed_addr}/"),
        )
        .replace(
            "    clients: [erp, scanner]\n",
            "    clients: [erp, scanner]\n    timeout: 300ms\n",
        );
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    let (name, value) = erp();
    let refused = send(proxy.addr, "GET", "/bc/sandbox/x", &[(name, &value)], "").await;
    assert_eq!(refused.status, 502);
    assert_eq!(refused.json()["error"], "upstream_failed");
    assert!(!refused.text().contains(&closed_addr.to_string()));

    upstream.set_delay(Duration::from_secs(3));
    let slow = send(proxy.addr, "GET", "/bc/x", &[(name, &value)], "").await;
    assert_eq!(slow.status, 504);
    assert_eq!(slow.json()["error"], "upstream_timeout");
    proxy.shutdown().await;
}

/// The route deadline covers the response body too: an upstream that sends its head and
/// part of its body, then nothing, does not keep the caller (and the route's slot) waiting.
#[tokio::test]
async fn an_upstream_body_that_stalls_is_cut_at_the_route_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let stalling = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalling_addr = stalling.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let (mut socket, _) = stalling.accept().await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(socket.read(&mut byte).await.unwrap(), 1);
            head.push(byte[0]);
        }
        socket
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 100\r\n\r\n0123456789")
            .await
            .unwrap();
        // Holds the connection open, sending nothing more, until the proxy gives up.
        let _ = socket.read(&mut byte).await;
    });
    let yaml = standard_yaml(&idp, &upstream)
        .replace(
            &format!("{}/v2.0/{TENANT}/Sandbox/", upstream.base()),
            &format!("http://{stalling_addr}/"),
        )
        .replace(
            "    clients: [erp]\n",
            "    clients: [erp]\n    timeout: 300ms\n",
        );
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    let request = format!(
        "GET /bc/sandbox/x HTTP/1.1\r\nHost: p\r\nAuthorization: {}\r\n\r\n",
        basic("erp", PASSWORD)
    );
    let mut caller = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    caller.write_all(request.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let started = std::time::Instant::now();
    // The guard is far beyond the route's 300 ms: reaching it means nobody cut the body.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = caller.read(&mut chunk).await {
            received.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stalled body was never cut: {}",
        String::from_utf8_lossy(&received)
    );
    // Cut by the route deadline itself, not by the connection's once-a-second check of
    // an in-flight request, which would also end it, a second after it started.
    let took = started.elapsed();
    assert!(took < Duration::from_millis(800), "cut after {took:?}");
    let received = String::from_utf8_lossy(&received);
    assert!(received.starts_with("HTTP/1.1 200"), "{received}");
    assert!(received.ends_with("0123456789"), "{received}");
    // The proxy let go of the upstream connection too.
    tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("the upstream connection stayed open")
        .unwrap();
    proxy.shutdown().await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = with_limits(&standard_yaml(&idp, &upstream), "max_body_bytes: 1000");
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    let (name, value) = erp();
    let answer = send(
        proxy.addr,
        "POST",
        "/bc/x",
        &[(name, &value)],
        vec![b'a'; 1001],
    )
    .await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.json()["error"], "payload_too_large");
    let auth = basic("erp", PASSWORD);
    // A declared length over the limit is refused before any body byte is sent.
    let declared = format!(
        "POST /bc/x HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\nContent-Length: 10737418240\r\n\r\n"
    );
    assert_eq!(raw_status(&raw(proxy.addr, declared.as_bytes()).await), 413);
    // Chunked, no Content-Length: counted while streaming.
    let chunked = format!(
        "POST /bc/x HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n{}\r\n3e8\r\n{}\r\n0\r\n\r\n",
        "b".repeat(1000),
        "c".repeat(1000)
    );
    assert_eq!(raw_status(&raw(proxy.addr, chunked.as_bytes()).await), 413);
    // Past the 64 KiB kept for a replay, the body streams upstream: the limit is found
    // while the upstream request is being sent, and still answered 413.
    let long = format!(
        "POST /bc/x HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\n{}0\r\n\r\n",
        format!("4000\r\n{}\r\n", "d".repeat(0x4000)).repeat(6)
    );
    assert_eq!(raw_status(&raw(proxy.addr, long.as_bytes()).await), 413);
    assert_eq!(
        send(
            proxy.addr,
            "POST",
            "/bc/x",
            &[(name, &value)],
            vec![b'a'; 1000]
        )
        .await
        .status,
        200
    );
    assert_eq!(upstream.count(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests() {
    let (_idp, upstream, proxy) = standard().await;
    upstream.set_delay(Duration::from_millis(400));
    let addr = proxy.addr;
    let in_flight = tokio::spawn(async move {
        let (name, value) = erp();
        send(addr, "GET", "/bc/slow", &[(name, &value)], "")
            .await
            .status
    });
    // Wait until the request reached the upstream, then ask the proxy to stop.
    for _ in 0..200 {
        if upstream.count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(upstream.count(), 1);
    proxy.shutdown().await;
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the in-flight request finished"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn a_drain_closes_connections_still_sending_their_first_bytes() {
    // Half an HTTP/2 preface keeps the protocol undecided; the drain must not wait for
    // the 10 s first-request deadline (nor the 30 s drain limit) to end such a connection.
    let (_idp, _upstream, proxy) = standard().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut undecided = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    undecided.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // The proxy has taken the bytes once the connection is served; a request on another
    // connection proves the accept loop got that far.
    let (name, value) = erp();
    assert_eq!(
        send(proxy.addr, "GET", "/bc/x", &[(name, &value)], "")
            .await
            .status,
        200
    );
    tokio::time::timeout(Duration::from_secs(5), proxy.shutdown())
        .await
        .expect("the drain waited for a connection that never sent a request");
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(5), undecided.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "closed: {read:?}");
}

#[tokio::test]
async fn connections_that_send_no_request_are_closed_and_free_their_slot() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = with_limits(
        &standard_yaml(&idp, &upstream),
        "header_read_timeout: 300ms, max_connections: 2",
    );
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut half_preface = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    half_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    for stream in [&mut silent, &mut half_preface] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "the proxy must close it: {read:?}"
        );
    }
    // Both slots are free again.
    let (name, value) = erp();
    assert_eq!(
        send(proxy.addr, "GET", "/bc/x", &[(name, &value)], "")
            .await
            .status,
        200
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn repeated_wrong_passwords_lock_the_source_out_for_a_while() {
    let (idp, upstream, proxy) = standard().await;
    let wrong = basic("erp", "guess");
    for _ in 0..30 {
        assert_eq!(
            send(proxy.addr, "GET", "/bc/x", &[("authorization", &wrong)], "")
                .await
                .status,
            401
        );
    }
    let (name, value) = erp();
    let locked = send(proxy.addr, "GET", "/bc/x", &[(name, &value)], "").await;
    assert_eq!(
        locked.status, 429,
        "even the right password waits out the lockout"
    );
    assert_eq!(locked.json()["error"], "too_many_requests");
    let retry_after: u64 = locked.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    // Another source address is not affected.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut stream = socket.connect(proxy.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(format!("GET /bc/x HTTP/1.1\r\nHost: p\r\nAuthorization: {value}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert_eq!(raw_status(&response), 200, "{response}");
    assert_eq!(upstream.count(), 1);
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_client_over_its_rate_limit_gets_429() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = standard_yaml(&idp, &upstream).replace(
        "  scanner:\n    api_key: ${SCANNER_KEY}\n",
        "  scanner:\n    api_key: ${SCANNER_KEY}\n    rate_limit: 3/m\n",
    );
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    let key = [("x-api-key", API_KEY)];
    for _ in 0..3 {
        assert_eq!(send(proxy.addr, "GET", "/bc/x", &key, "").await.status, 200);
    }
    let limited = send(proxy.addr, "GET", "/bc/x", &key, "").await;
    assert_eq!(limited.status, 429);
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&retry_after), "{retry_after}");
    // Other clients have their own allowance.
    let (name, value) = erp();
    assert_eq!(
        send(proxy.addr, "GET", "/bc/x", &[(name, &value)], "")
            .await
            .status,
        200
    );
    assert_eq!(upstream.count(), 4);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_stalled_request_body_is_408_and_the_upstream_request_is_aborted() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = with_limits(&standard_yaml(&idp, &upstream), "body_idle_timeout: 300ms");
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = basic("erp", PASSWORD);
    for (declared, sent) in [(10usize, 3usize), (200_000, 100_000)] {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        let head = format!(
            "POST /bc/slow HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\nContent-Length: {declared}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&vec![b'a'; sent]).await.unwrap();
        // ...and then nothing more.
        let mut response = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut response))
            .await
            .unwrap()
            .unwrap();
        let response = String::from_utf8_lossy(&response[..n]).into_owned();
        assert_eq!(raw_status(&response), 408, "{declared}: {response}");
    }
    // The small body never reached the upstream; the streamed one was cut off, not completed.
    let seen = upstream.requests();
    assert!(seen.iter().all(|r| r.body == ABORTED), "{seen:?}");
    assert!(seen.len() <= 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn idle_http2_connections_are_closed_after_the_idle_timeout() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = with_limits(&standard_yaml(&idp, &upstream), "idle_timeout: 300ms");
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("http://{}/bc/x", proxy.addr))
        .header("authorization", basic("erp", PASSWORD))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
    // The client keeps the connection open (it answers pings); the proxy closes it.
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(
        ended.is_ok(),
        "the idle HTTP/2 connection must be closed by the proxy"
    );
    proxy.shutdown().await;
}
