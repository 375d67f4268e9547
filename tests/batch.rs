//! Request-side `$batch` end to end: what the fake upstream receives inside a batch body.
//! Inner requests lose the caller's credentials and identity headers, URLs on the proxy's
//! base are translated, and a part outside the route refuses the whole batch before the
//! upstream sees it.

mod support;

use support::*;

const MULTIPART: &str = "multipart/mixed; boundary=batch_36522ad7";

fn part(request: &str) -> String {
    format!(
        "--batch_36522ad7\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n{request}\r\n"
    )
}

fn multipart(parts: &[String]) -> String {
    format!("{}--batch_36522ad7--\r\n", parts.concat())
}

async fn post_batch(proxy: &ProxyHandle, content_type: &str, body: String) -> Answer {
    let (name, value) = erp();
    send(
        proxy.addr,
        "POST",
        "/bc/api/v2.0/$batch",
        &[
            (name, &value),
            ("content-type", content_type),
            ("x-api-key", API_KEY),
        ],
        body,
    )
    .await
}

/// Finding 1: `@odata/client` and `o.js` copy the caller's `Authorization` (and API key)
/// into every part; none of it may reach the upstream.
#[tokio::test]
async fn caller_credentials_inside_batch_parts_never_reach_the_upstream() {
    let (_idp, upstream, proxy) = standard().await;
    let (_, basic) = erp();
    let body = multipart(&[
        part(&format!(
            "GET companies HTTP/1.1\r\nAuthorization: {basic}\r\nX-API-Key: {API_KEY}\r\n\
             X-Forwarded-For: 10.9.9.9\r\nX-MS-CLIENT-PRINCIPAL-NAME: admin\r\nAccept: application/json\r\n\r\n"
        )),
        part(&format!(
            "PATCH companies(1) HTTP/1.1\r\nContent-Type: application/json\r\nIf-Match: W/\"1\"\r\n\
             Proxy-Authorization: {basic}\r\nX_API_KEY: {API_KEY}\r\n\r\n{{\"name\":\"x\"}}"
        )),
    ]);
    let answer = post_batch(&proxy, MULTIPART, body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let recorded = upstream.requests();
    assert_eq!(recorded.len(), 1);
    let received = String::from_utf8(recorded[0].body.to_vec()).unwrap();
    for secret in [PASSWORD, API_KEY, basic.as_str(), "10.9.9.9", "admin"] {
        assert!(
            !received.contains(secret),
            "{secret} reached the upstream: {received}"
        );
    }
    assert!(received.contains("GET companies HTTP/1.1\r\nAccept: application/json\r\n\r\n"));
    assert!(received.contains("If-Match: W/\"1\"\r\n"));
    assert!(received.contains("{\"name\":\"x\"}\r\n--batch_36522ad7--\r\n"));
    // The body changed length: no stale Content-Length went along.
    assert!(
        recorded[0]
            .header("content-length")
            .is_none_or(|len| len == received.len().to_string())
    );
    assert_eq!(recorded[0].target, format!("{BC_BASE}api/v2.0/$batch"));
    proxy.shutdown().await;
}

/// Finding 2: part URLs written on the proxy's base reach the upstream in its own form.
#[tokio::test]
async fn part_urls_on_the_proxy_base_are_translated_to_the_upstream() {
    let (_idp, upstream, proxy) = standard().await;
    let public = format!("http://{}", proxy.addr);
    let body = multipart(&[
        part(&format!(
            "GET {public}/bc/api/v2.0/companies(1) HTTP/1.1\r\n\r\n"
        )),
        part("GET /bc/api/v2.0/companies(2)?$select=name HTTP/1.1\r\nHost: whatever\r\n\r\n"),
        part("GET companies(3) HTTP/1.1\r\n\r\n"),
    ]);
    let answer = post_batch(&proxy, MULTIPART, body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let received = String::from_utf8(upstream.requests()[0].body.to_vec()).unwrap();
    let upstream_root = format!("{}{BC_BASE}", upstream.base());
    assert!(
        received.contains(&format!(
            "GET {upstream_root}api/v2.0/companies(1) HTTP/1.1\r\n"
        )),
        "{received}"
    );
    assert!(
        received.contains(&format!(
            "GET {BC_BASE}api/v2.0/companies(2)?$select=name HTTP/1.1\r\nHost: {}\r\n",
            upstream.addr
        )),
        "{received}"
    );
    assert!(received.contains("GET companies(3) HTTP/1.1\r\n"));
    assert!(!received.contains(&public), "{received}");
    proxy.shutdown().await;
}

/// A part outside the route refuses the whole batch with 400; the upstream sees nothing.
#[tokio::test]
async fn a_part_outside_the_route_refuses_the_batch_before_anything_is_sent() {
    let (_idp, upstream, proxy) = standard().await;
    let public = format!("http://{}", proxy.addr);
    for outside in [
        format!("{public}/bc/sandbox/api/v2.0/companies"),
        "/bc/sandbox/api/v2.0/companies".to_owned(),
        "https://evil.test/v2.0/x".to_owned(),
        "http://127.0.0.1:1/bc/x".to_owned(),
        "/other/x".to_owned(),
        "../../Sandbox/api/v2.0/companies".to_owned(),
        "/bc/api/%2e%2e/%2e%2e/x".to_owned(),
    ] {
        let body = multipart(&[
            part("GET companies HTTP/1.1\r\n\r\n"),
            part(&format!("DELETE {outside} HTTP/1.1\r\n\r\n")),
        ]);
        let answer = post_batch(&proxy, MULTIPART, body).await;
        assert_eq!(answer.status, 400, "{outside}: {}", answer.text());
        assert_eq!(answer.json()["error"], "batch_refused");
        assert!(!answer.text().contains("evil"), "{}", answer.text());
    }
    assert_eq!(upstream.count(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn json_batches_are_cleaned_translated_and_refused_the_same_way() {
    let (_idp, upstream, proxy) = standard().await;
    let public = format!("http://{}", proxy.addr);
    let (_, basic) = erp();
    let body = serde_json::json!({"requests": [
        {"id": "1", "method": "get", "url": format!("{public}/bc/api/v2.0/companies"),
         "headers": {"authorization": basic, "X-API-Key": API_KEY, "accept": "application/json"}},
        {"id": "2", "method": "patch", "url": "/bc/api/v2.0/companies(1)", "atomicityGroup": "g1",
         "headers": {"if-match": "W/\"1\"", "content-type": "application/json"},
         "body": {"displayName": "x"}},
    ]})
    .to_string();
    let answer = post_batch(&proxy, "application/json", body).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let recorded = upstream.requests();
    let received: serde_json::Value = serde_json::from_slice(&recorded[0].body).unwrap();
    let text = received.to_string();
    assert!(!text.contains(PASSWORD) && !text.contains(API_KEY) && !text.contains(&public));
    let requests = received["requests"].as_array().unwrap();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[0]["url"],
        format!("{}{BC_BASE}api/v2.0/companies", upstream.base())
    );
    assert_eq!(
        requests[0]["headers"],
        serde_json::json!({"accept": "application/json"})
    );
    assert_eq!(
        requests[1]["url"],
        format!("{BC_BASE}api/v2.0/companies(1)")
    );
    assert_eq!(requests[1]["body"], serde_json::json!({"displayName": "x"}));

    let outside = serde_json::json!({"requests": [
        {"id": "1", "method": "get", "url": "companies"},
        {"id": "2", "method": "delete", "url": format!("{public}/bc/sandbox/api/v2.0/companies(1)")},
    ]})
    .to_string();
    let answer = post_batch(&proxy, "application/json", outside).await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert_eq!(upstream.count(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn compressed_or_unknown_batch_bodies_are_refused_clearly() {
    let (_idp, upstream, proxy) = standard().await;
    let (name, value) = erp();
    let body = multipart(&[part("GET companies HTTP/1.1\r\n\r\n")]);
    let gzipped = dynamics::gzip(body.as_bytes());
    let answer = send(
        proxy.addr,
        "POST",
        "/bc/$batch",
        &[
            (name, &value),
            ("content-type", MULTIPART),
            ("content-encoding", "gzip"),
        ],
        gzipped,
    )
    .await;
    assert_eq!(answer.status, 415, "{}", answer.text());
    assert!(
        answer.json()["message"]
            .as_str()
            .unwrap()
            .contains("Content-Encoding")
    );
    let answer = send(
        proxy.addr,
        "POST",
        "/bc/$batch",
        &[(name, &value), ("content-type", "text/plain")],
        body,
    )
    .await;
    assert_eq!(answer.status, 415, "{}", answer.text());
    assert_eq!(upstream.count(), 0);
    proxy.shutdown().await;
}

/// Beyond the 1 MiB look-ahead the batch streams; a part outside the route found there
/// is never sent, the upstream's request body is cut off before its end (so the upstream
/// never holds a complete batch) and the caller is told 400.
#[tokio::test]
async fn a_refusal_beyond_the_look_ahead_cuts_the_upstream_request_short() {
    let (_idp, upstream, proxy) = standard().await;
    let filler = "x".repeat(1000);
    let mut parts: Vec<String> = (0..1500)
        .map(|n| {
            part(&format!(
                "PATCH companies({n}) HTTP/1.1\r\nContent-Type: text/plain\r\n\r\n{filler}"
            ))
        })
        .collect();
    parts.push(part("DELETE https://evil.test/x HTTP/1.1\r\n\r\n"));
    let answer = post_batch(&proxy, MULTIPART, multipart(&parts)).await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert_eq!(answer.json()["error"], "batch_refused");
    for recorded in upstream.requests() {
        assert_eq!(
            recorded.body, ABORTED,
            "the upstream received a complete body"
        );
    }
    proxy.shutdown().await;
}

/// A large batch within the route streams through whole, every part exactly once.
#[tokio::test]
async fn a_large_batch_streams_through_whole() {
    let (_idp, upstream, proxy) = standard().await;
    let filler = "y".repeat(1000);
    let parts: Vec<String> = (0..1500)
        .map(|n| {
            part(&format!(
                "PATCH /bc/companies({n}) HTTP/1.1\r\nAuthorization: Basic x\r\n\r\n{filler}"
            ))
        })
        .collect();
    let answer = post_batch(&proxy, MULTIPART, multipart(&parts)).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let received = String::from_utf8(upstream.requests()[0].body.to_vec()).unwrap();
    for n in 0..1500 {
        let line = format!("PATCH {BC_BASE}companies({n}) HTTP/1.1\r\n\r\n");
        assert_eq!(received.matches(&line).count(), 1, "part {n}");
    }
    assert!(!received.contains("Authorization"));
    proxy.shutdown().await;
}
