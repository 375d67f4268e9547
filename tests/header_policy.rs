//! The request header policy (docs/request-handling.md): identity and forwarding headers
//! from the caller, underscore names and a route's `strip_request_headers` never reach the
//! upstream; HTTP/2 pseudo-headers that disagree or carry user info are refused; cookie
//! crumbs are joined; an upstream `101` is answered 502; the access log escapes whatever is
//! not printable ASCII.
//!
//! Real sockets only: what the fake upstream received is what is asserted.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::*;

/// Identity and forwarding headers a caller might use to impersonate someone, or a
/// frontend (Azure App Service, Front Door, Cloudflare, Envoy) the upstream may trust.
const SPOOFED: &[(&str, &str)] = &[
    ("X_Forwarded_For", "6.6.6.1"),
    ("X-Forwarded_Host", "evil.test"),
    ("X-Original-For", "6.6.6.2"),
    ("X-Original-Host", "evil.test"),
    ("X-Client-IP", "6.6.6.3"),
    ("True-Client-IP", "6.6.6.4"),
    ("CF-Connecting-IP", "6.6.6.5"),
    ("X-Real-IP", "6.6.6.6"),
    ("Forwarded", "for=6.6.6.7"),
    ("X-Forwarded-Port", "443"),
    ("X-Forwarded-User", "admin@contoso.com"),
    ("X-Forwarded-Email", "admin@contoso.com"),
    ("X-MS-CLIENT-PRINCIPAL-NAME", "admin@contoso.com"),
    (
        "X-MS-CLIENT-PRINCIPAL-ID",
        "00000000-0000-0000-0000-000000000001",
    ),
    ("X-MS-CLIENT-PRINCIPAL", "eyJhdXRoX3R5cCI6ImFhZCJ9"),
    ("X-MS-TOKEN-AAD-ACCESS-TOKEN", "eyJ0eXAiOiJKV1QifQ"),
    ("X-ARR-ClientCert", "MIIBszCCAVmgAwIBAgIU"),
    ("X-ARR-SSL", "2048|256|CN=evil"),
    ("X-Azure-ClientIP", "6.6.6.8"),
    ("X-Azure-FDID", "00000000-0000-0000-0000-000000000002"),
    ("Remote-User", "admin"),
    ("X-Remote-User", "admin"),
    ("X-Envoy-External-Address", "6.6.6.9"),
    ("X-Envoy-Original-Path", "/admin"),
];

/// End-to-end headers that must still arrive.
const KEPT: &[(&str, &str)] = &[
    ("If-Match", "W/\"JzQ0OzE7MDsn\""),
    ("Prefer", "odata.maxpagesize=100"),
    ("OData-Version", "4.0"),
    ("Accept-Language", "da-DK"),
    ("X-Custom-Trace", "keep-me"),
    (
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ),
];

fn assert_identity_stripped(received: &Recorded) {
    for (name, _) in SPOOFED {
        let lower = name.to_ascii_lowercase();
        assert!(
            !received.headers.contains_key(lower.as_str()),
            "{name} reached the upstream: {:?}",
            received.headers
        );
    }
    for (name, value) in KEPT {
        assert_eq!(received.header(name), Some(*value), "{name}");
    }
    // Nothing of the caller's identity claims survives under any name.
    for (name, value) in &received.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(
            !value.contains("6.6.6.") && !value.contains("admin") && !value.contains("evil"),
            "{name}: {value}"
        );
    }
}

#[tokio::test]
async fn identity_forwarding_and_underscore_headers_never_reach_the_upstream() {
    quiet_global_dispatch();
    let (_idp, upstream, proxy) = standard().await;
    let auth = erp();
    let mut headers: Vec<(&str, &str)> = vec![(auth.0, auth.1.as_str())];
    headers.extend_from_slice(SPOOFED);
    headers.extend_from_slice(KEPT);
    headers.push(("X_Custom_Underscore", "dropped"));
    let answer = send(proxy.addr, "GET", "/bc/companies", &headers, "").await;
    assert_eq!(answer.status, 200, "{}", answer.text());

    let received = &upstream.requests()[0];
    assert_identity_stripped(received);
    assert!(!received.headers.contains_key("x_custom_underscore"));
    assert_eq!(received.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(received.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        received.header("x-forwarded-host"),
        Some(proxy.addr.to_string().as_str())
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_are_stripped_from_http2_requests_too() {
    quiet_global_dispatch();
    let (_idp, upstream, proxy) = standard().await;
    let mut sender = h2_client(proxy.addr).await;
    let mut request = Request::get(format!("http://{}/bc/companies", proxy.addr))
        .header("authorization", basic("erp", PASSWORD));
    for (name, value) in SPOOFED.iter().chain(KEPT) {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_identity_stripped(&upstream.requests()[0]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn allow_underscore_headers_keeps_them_but_never_an_identity_header_spelled_with_underscores()
{
    quiet_global_dispatch();
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = standard_yaml(&idp, &upstream).replacen(
        "  listen: 127.0.0.1:0\n",
        "  listen: 127.0.0.1:0\n  allow_underscore_headers: true\n",
        1,
    );
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    idp.wait_for_calls(1).await;
    let auth = erp();
    let headers = [
        (auth.0, auth.1.as_str()),
        ("X_Custom_Underscore", "kept"),
        ("X_Forwarded_For", "6.6.6.1"),
        ("X_Real_IP", "6.6.6.2"),
        ("Remote_User", "admin"),
        ("X_MS_CLIENT_PRINCIPAL_NAME", "admin@contoso.com"),
        ("X_API_Key", "ak_underscore"),
    ];
    let answer = send(proxy.addr, "GET", "/bc/companies", &headers, "").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let received = &upstream.requests()[0];
    assert_eq!(received.header("x_custom_underscore"), Some("kept"));
    for name in [
        "x_forwarded_for",
        "x_real_ip",
        "remote_user",
        "x_ms_client_principal_name",
        "x_api_key",
    ] {
        assert!(!received.headers.contains_key(name), "{name} was forwarded");
    }
    assert_eq!(received.header("x-forwarded-for"), Some("127.0.0.1"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_routes_strip_request_headers_are_removed_on_that_route_only() {
    quiet_global_dispatch();
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = standard_yaml(&idp, &upstream).replacen(
        "    clients: [erp, scanner]\n",
        "    clients: [erp, scanner]\n    strip_request_headers: [X-Tenant-Override, x-debug-user]\n",
        1,
    );
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    idp.wait_for_calls(1).await;
    let auth = erp();
    let headers = [
        (auth.0, auth.1.as_str()),
        ("X-Tenant-Override", "other-tenant"),
        ("X-DEBUG-USER", "admin"),
        ("X-Kept", "1"),
    ];
    for target in ["/bc/companies", "/bc/sandbox/companies"] {
        let answer = send(proxy.addr, "GET", target, &headers, "").await;
        assert_eq!(answer.status, 200, "{target}: {}", answer.text());
    }
    let received = upstream.requests();
    assert_eq!(received[0].header("x-tenant-override"), None);
    assert_eq!(received[0].header("x-debug-user"), None);
    assert_eq!(received[0].header("x-kept"), Some("1"));
    // `/bc/sandbox/` does not list them.
    assert_eq!(
        received[1].header("x-tenant-override"),
        Some("other-tenant")
    );
    assert_eq!(received[1].header("x-debug-user"), Some("admin"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_trusted_proxys_chain_is_still_appended_but_its_other_forwarding_headers_are_not() {
    quiet_global_dispatch();
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = standard_yaml(&idp, &upstream).replacen(
        "  listen: 127.0.0.1:0\n",
        "  listen: 127.0.0.1:0\n  trusted_proxies: [127.0.0.0/8]\n",
        1,
    );
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    idp.wait_for_calls(1).await;
    let auth = erp();
    let headers = [
        (auth.0, auth.1.as_str()),
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "erp-proxy.contoso.com"),
        ("X-Forwarded-Port", "443"),
        ("X-Forwarded-User", "admin"),
        ("X-Original-For", "6.6.6.6"),
    ];
    let answer = send(proxy.addr, "GET", "/bc/companies", &headers, "").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let received = &upstream.requests()[0];
    assert_eq!(
        received.header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(received.header("x-forwarded-proto"), Some("https"));
    assert_eq!(
        received.header("x-forwarded-host"),
        Some("erp-proxy.contoso.com")
    );
    for name in ["x-forwarded-port", "x-forwarded-user", "x-original-for"] {
        assert_eq!(received.header(name), None, "{name}");
    }
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// HTTP/2 pseudo-headers and cookies

async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// Sends one HTTP/2 request for `uri` with `headers` (and erp's credentials) on a fresh
/// connection; the status, or the error text when the stream failed.
async fn h2_status(addr: SocketAddr, uri: &str, headers: &[(&str, &str)]) -> Result<u16, String> {
    let mut sender = h2_client(addr).await;
    let mut request = Request::get(uri).header("authorization", basic("erp", PASSWORD));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::new())).unwrap();
    match sender.send_request(request).await {
        Ok(response) => Ok(response.status().as_u16()),
        Err(error) => Err(error.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_authority_with_userinfo_is_refused() {
    quiet_global_dispatch();
    let (idp, upstream, proxy) = standard().await;
    let uri = format!("http://admin:pw@{}/bc/userinfo", proxy.addr);
    assert_eq!(h2_status(proxy.addr, &uri, &[]).await, Ok(400));
    assert_eq!(upstream.count(), 0, "nothing is forwarded");
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_authority_and_host_must_agree() {
    quiet_global_dispatch();
    let (_idp, upstream, proxy) = standard().await;
    let uri = format!("http://{}/bc/mismatch", proxy.addr);
    assert_eq!(
        h2_status(proxy.addr, &uri, &[("host", "evil.test")]).await,
        Ok(400)
    );
    assert_eq!(upstream.count(), 0, "nothing is forwarded");
    // The same entity written differently (RFC 3986 §6.2.2.1, §6.2.3) is fine.
    let uri = "http://PROXY.test:80/bc/same";
    assert_eq!(
        h2_status(proxy.addr, uri, &[("host", "proxy.TEST")]).await,
        Ok(200)
    );
    let received = upstream.requests();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].header("x-forwarded-host"), Some("proxy.TEST"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_schemes_other_than_http_and_https_are_refused() {
    quiet_global_dispatch();
    let (_idp, upstream, proxy) = standard().await;
    for scheme in ["ftp", "file", "ws"] {
        let uri = format!("{scheme}://{}/bc/scheme", proxy.addr);
        assert_eq!(h2_status(proxy.addr, &uri, &[]).await, Ok(400), "{scheme}");
    }
    for scheme in ["http", "https"] {
        let uri = format!("{scheme}://{}/bc/scheme", proxy.addr);
        assert_eq!(h2_status(proxy.addr, &uri, &[]).await, Ok(200), "{scheme}");
    }
    assert_eq!(upstream.count(), 2);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookie_crumbs_reach_the_upstream_as_one_cookie_header() {
    quiet_global_dispatch();
    let (_idp, upstream, proxy) = standard().await;
    let uri = format!("http://{}/bc/cookies", proxy.addr);
    let crumbs = [("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")];
    assert_eq!(h2_status(proxy.addr, &uri, &crumbs).await, Ok(200));
    let received = &upstream.requests()[0];
    let cookies: Vec<&str> = received
        .headers
        .get_all("cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies, ["a=1; b=2; c=3"]);
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Upstream 101

/// An HTTP/1.1 upstream that answers `101 Switching Protocols` to paths ending in
/// `/switch` (then holds the connection) and 200 to everything else.
async fn switching_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buffer.drain(..end + 4).collect();
                        let head = String::from_utf8_lossy(&head).into_owned();
                        let target = head.split(' ').nth(1).unwrap_or_default().to_owned();
                        record.lock().unwrap().push(target.clone());
                        if target.ends_with("/switch") {
                            let _ = stream
                                .write_all(
                                    b"HTTP/1.1 101 Switching Protocols\r\n\
                                      Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
                                )
                                .await;
                            // Hold the "upgraded" connection until the proxy drops it.
                            let _ = stream.read(&mut chunk).await;
                            return;
                        }
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                            .await;
                    }
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, seen)
}

async fn switching_setup() -> (FakeIdp, Arc<Mutex<Vec<String>>>, ProxyHandle) {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let (switching, seen) = switching_upstream().await;
    let yaml =
        standard_yaml(&idp, &upstream).replace(&upstream.base(), &format!("http://{switching}"));
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    idp.wait_for_calls(1).await;
    (idp, seen, proxy)
}

#[tokio::test]
async fn an_upstream_101_is_answered_502_and_a_pipelined_request_is_still_served() {
    quiet_global_dispatch();
    let (_idp, seen, proxy) = switching_setup().await;
    let auth = basic("erp", PASSWORD);
    let pipelined = format!(
        "GET /bc/switch HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n\
         GET /bc/after HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n"
    );
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(pipelined.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        // Both answers, the second one's body included.
        while String::from_utf8_lossy(&out).matches("HTTP/1.1 ").count() < 2
            || !out.ends_with(b"ok")
        {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&out);
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &text[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["502", "200"], "{text}");
    assert!(
        text.contains("\"error\":\"upstream_switched_protocols\""),
        "{text}"
    );
    // Status lines only: request ids and dates may contain the digits.
    assert!(!text.contains("HTTP/1.1 101"), "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("upgrade: websocket"),
        "{text}"
    );
    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().any(|t| t.ends_with("/switch")), "{seen:?}");
    assert!(seen.iter().any(|t| t.ends_with("/after")), "{seen:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_101_to_an_http2_request_is_answered_502_and_the_connection_lives() {
    quiet_global_dispatch();
    let (_idp, _seen, proxy) = switching_setup().await;
    let mut sender = h2_client(proxy.addr).await;
    for (path, expected) in [("switch", 502), ("after", 200), ("switch", 502)] {
        let request = Request::get(format!("http://{}/bc/{path}", proxy.addr))
            .header("authorization", basic("erp", PASSWORD))
            .body(Full::new(Bytes::new()))
            .unwrap();
        sender.ready().await.unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status().as_u16(), expected, "{path}");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        if expected == 502 {
            assert!(
                String::from_utf8_lossy(&body).contains("upstream_switched_protocols"),
                "{body:?}"
            );
        }
    }
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Access log

#[test]
fn the_access_log_escapes_everything_that_is_not_printable_ascii() {
    quiet_global_dispatch();
    // C1 control NEL (U+0085), LINE SEPARATOR (U+2028), RIGHT-TO-LEFT OVERRIDE (U+202E),
    // raw in the request target, as hyper passes them on.
    let raw_path = "/bc/a\u{85}b\u{2028}c\u{202e}gpj.exe";
    let ((), capture) = capture_logs(async {
        let (_idp, _upstream, proxy) = standard().await;
        let auth = basic("erp", PASSWORD);
        for with_auth in [false, true] {
            let mut head = format!("GET {raw_path} HTTP/1.1\r\nHost: p\r\n");
            if with_auth {
                head.push_str(&format!("Authorization: {auth}\r\n"));
            }
            head.push_str("\r\n");
            let answer = raw(proxy.addr, head.as_bytes()).await;
            assert!(answer.starts_with("HTTP/1.1 "), "{answer:?}");
        }
        proxy.shutdown().await;
    });
    let bytes = capture.bytes();
    let text = capture.text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| line.contains("s2s_proxy::access"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for line in &lines {
        assert!(
            line.contains(r"path=/bc/a\xc2\x85b\xe2\x80\xa8c\xe2\x80\xaegpj.exe"),
            "{line}"
        );
    }
    assert!(
        bytes
            .iter()
            .all(|&b| b == b'\n' || (0x20..0x7f).contains(&b)),
        "the log holds bytes that are not printable ASCII"
    );
}
