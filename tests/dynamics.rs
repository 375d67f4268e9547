//! Dynamics fidelity end to end: link rewriting, the per-route queue and 429 retries,
//! against a Business Central-shaped fake upstream.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use support::dynamics::*;
use support::*;

const REWRITE: &str = "    rewrite_links: true\n";

/// The path and query of an absolute URL.
fn target_of(url: &str) -> &str {
    let rest = url.split_once("://").expect("absolute URL").1;
    &rest[rest.find('/').expect("a path")..]
}

#[tokio::test]
async fn paging_follows_rewritten_next_links_to_the_same_upstream_urls() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let base = upstream.base();
    let upstream_root = format!("{base}{BC_BASE}");
    let root = upstream_root.clone();
    upstream.respond(move |request| {
        let page = match request.target.split_once("$skiptoken=") {
            None => 1,
            Some((_, token)) => token[..1].parse::<u32>().unwrap(),
        };
        let next = if page < 3 {
            format!(
                r#","@odata.nextLink":"{root}api/v2.0/companies(1)/customers?$skiptoken={}%3D%3D%27x%27&$filter=No%20gt%20'1'""#,
                page + 1
            )
        } else {
            String::new()
        };
        json(
            200,
            format!(
                r#"{{"@odata.context":"{root}api/v2.0/$metadata#companies(1)/customers","value":[{{"@odata.etag":"W/\"JzQ0O{page}\"","number":"{page}"}}]{next}}}"#
            ),
        )
    });
    let proxy = spawn_with(&idp, &base, "", REWRITE).await;
    let public = format!("http://{}/bc/", proxy.addr);

    let (name, value) = erp();
    let mut target = "/bc/api/v2.0/companies(1)/customers".to_owned();
    let mut numbers = Vec::new();
    for page in 1..=3 {
        let answer = send(proxy.addr, "GET", &target, &[(name, &value)], "").await;
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert!(
            answer
                .header("content-length")
                .is_none_or(|len| len == answer.body.len().to_string())
        );
        let body = answer.json();
        assert!(!answer.text().contains(&upstream_root), "{}", answer.text());
        assert_eq!(
            body["@odata.context"],
            format!("{public}api/v2.0/$metadata#companies(1)/customers")
        );
        assert_eq!(
            body["value"][0]["@odata.etag"],
            format!("W/\"JzQ0O{page}\"")
        );
        numbers.push(body["value"][0]["number"].as_str().unwrap().to_owned());
        match body["@odata.nextLink"].as_str() {
            Some(next) => {
                assert_eq!(
                    next,
                    format!(
                        "{public}api/v2.0/companies(1)/customers?$skiptoken={}%3D%3D%27x%27&$filter=No%20gt%20'1'",
                        page + 1
                    )
                );
                target = target_of(next).to_owned();
            }
            None => assert_eq!(page, 3),
        }
    }
    assert_eq!(numbers, ["1", "2", "3"]);
    let targets: Vec<String> = upstream.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(
        targets,
        [
            format!("{BC_BASE}api/v2.0/companies(1)/customers"),
            format!(
                "{BC_BASE}api/v2.0/companies(1)/customers?$skiptoken=2%3D%3D%27x%27&$filter=No%20gt%20'1'"
            ),
            format!(
                "{BC_BASE}api/v2.0/companies(1)/customers?$skiptoken=3%3D%3D%27x%27&$filter=No%20gt%20'1'"
            ),
        ]
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn public_url_wins_and_forwarded_host_counts_only_from_trusted_proxies() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let root = format!("{}{BC_BASE}", upstream.base());
    let link = root.clone();
    upstream.respond(move |_| json(200, format!(r#"{{"@odata.context":"{link}$metadata"}}"#)));
    let (name, value) = erp();
    let forwarded = [
        (name, value.as_str()),
        ("x-forwarded-host", "evil.test"),
        ("x-forwarded-proto", "https"),
    ];

    let proxy = spawn_with(&idp, &upstream.base(), "", REWRITE).await;
    let answer = send(proxy.addr, "GET", "/bc/x", &forwarded, "").await;
    assert_eq!(
        answer.json()["@odata.context"],
        format!("http://{}/bc/$metadata", proxy.addr)
    );
    proxy.shutdown().await;

    let proxy = spawn_with(
        &idp,
        &upstream.base(),
        "  trusted_proxies: [127.0.0.0/8]\n",
        REWRITE,
    )
    .await;
    let answer = send(proxy.addr, "GET", "/bc/x", &forwarded, "").await;
    assert_eq!(
        answer.json()["@odata.context"],
        "https://evil.test/bc/$metadata"
    );
    proxy.shutdown().await;

    let proxy = spawn_with(
        &idp,
        &upstream.base(),
        "  public_url: https://erp-proxy.contoso.com/gw/\n  trusted_proxies: [127.0.0.0/8]\n",
        REWRITE,
    )
    .await;
    let answer = send(proxy.addr, "GET", "/bc/x", &forwarded, "").await;
    assert_eq!(
        answer.json()["@odata.context"],
        "https://erp-proxy.contoso.com/gw/bc/$metadata"
    );
    proxy.shutdown().await;

    // Without rewrite_links nothing changes.
    let proxy = spawn_with(&idp, &upstream.base(), "", "").await;
    let answer = send(proxy.addr, "GET", "/bc/x", &forwarded, "").await;
    assert_eq!(answer.json()["@odata.context"], format!("{root}$metadata"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn created_entities_get_rewritten_location_and_entity_id_and_etags_stay() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let root = format!("{}{BC_BASE}", upstream.base());
    let entity = format!("{root}api/v2.0/companies(1)/customers(5d11)");
    let body = format!(
        r#"{{"@odata.context":"{root}api/v2.0/$metadata#companies(1)/customers/$entity","@odata.etag":"W/\"JzQ0OzE7MDsn\"","id":"5d11","website":"{root}not-a-link"}}"#
    );
    let (e, b) = (entity.clone(), body.clone());
    upstream.respond(move |request| {
        let mut response = json(201, b.clone());
        let headers = response.headers_mut();
        headers.insert("location", e.parse().unwrap());
        headers.insert("odata-entityid", e.parse().unwrap());
        headers.insert("content-location", "https://other.test/x".parse().unwrap());
        headers.insert("etag", "W/\"JzQ0OzE7MDsn\"".parse().unwrap());
        headers.insert("content-length", b.len().into());
        if let Some(if_match) = request.header("if-match") {
            headers.insert("x-seen-if-match", if_match.parse().unwrap());
        }
        response
    });
    let proxy = spawn_with(&idp, &upstream.base(), "", REWRITE).await;
    let (name, value) = erp();
    let answer = send(
        proxy.addr,
        "POST",
        "/bc/api/v2.0/companies(1)/customers",
        &[
            (name, &value),
            ("content-type", "application/json"),
            ("if-match", "W/\"JzQ0OzE7MDsn\""),
        ],
        r#"{"displayName":"Adatum"}"#,
    )
    .await;
    assert_eq!(answer.status, 201);
    let public = format!("http://{}/bc/", proxy.addr);
    let expected = format!("{public}api/v2.0/companies(1)/customers(5d11)");
    assert_eq!(answer.header("location"), Some(expected.as_str()));
    assert_eq!(answer.header("odata-entityid"), Some(expected.as_str()));
    assert_eq!(
        answer.header("content-location"),
        Some("https://other.test/x")
    );
    assert_eq!(answer.header("etag"), Some("W/\"JzQ0OzE7MDsn\""));
    assert_eq!(answer.header("x-seen-if-match"), Some("W/\"JzQ0OzE7MDsn\""));
    let json = answer.json();
    assert_eq!(json["@odata.etag"], "W/\"JzQ0OzE7MDsn\"");
    assert_eq!(json["website"], format!("{root}not-a-link"));
    assert_eq!(
        json["@odata.context"],
        format!("{public}api/v2.0/$metadata#companies(1)/customers/$entity")
    );
    // The body shrank: the upstream's Content-Length must not survive.
    assert_ne!(answer.body.len(), body.len());
    assert!(
        answer
            .header("content-length")
            .is_none_or(|len| len == answer.body.len().to_string())
    );
    assert_eq!(
        upstream.requests()[0].header("if-match"),
        Some("W/\"JzQ0OzE7MDsn\"")
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn batch_responses_are_rewritten_in_part_headers_and_json_bodies() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let root = format!("{}{BC_BASE}", upstream.base());
    let batch = format!(
        "--batchresponse_77\r\n\
         Content-Type: multipart/mixed; boundary=changesetresponse_88\r\n\r\n\
         --changesetresponse_88\r\n\
         Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\n\
         HTTP/1.1 201 Created\r\nLocation: {root}api/v2.0/items(1)\r\nOData-EntityId: {root}api/v2.0/items(1)\r\n\
         Content-Type: application/json; odata.metadata=minimal\r\nETag: W/\"JzE7\"\r\n\r\n\
         {{\"@odata.context\":\"{root}api/v2.0/$metadata#items/$entity\",\"@odata.etag\":\"W/\\\"JzE7\\\"\",\"id\":1}}\r\n\
         --changesetresponse_88--\r\n\
         --batchresponse_77\r\n\
         Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
         HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n\
         {{\"@odata.nextLink\":\"{root}api/v2.0/items?$skiptoken=9\"}}\r\n\
         --batchresponse_77--\r\n"
    );
    let answer_body = batch.clone();
    upstream.respond(move |_| {
        http::Response::builder()
            .status(200)
            .header("content-type", "multipart/mixed; boundary=batchresponse_77")
            .header("content-length", answer_body.len())
            .body(Full::new(Bytes::from(answer_body.clone())))
            .unwrap()
    });
    let proxy = spawn_with(&idp, &upstream.base(), "", REWRITE).await;
    let (name, value) = erp();
    let answer = send(
        proxy.addr,
        "POST",
        "/bc/api/v2.0/$batch",
        &[
            (name, &value),
            ("content-type", "multipart/mixed; boundary=batch_1"),
        ],
        "--batch_1--\r\n",
    )
    .await;
    assert_eq!(answer.status, 200);
    let public = format!("http://{}/bc/", proxy.addr);
    assert_eq!(answer.text(), batch.replace(&root, &public));
    assert!(answer.text().contains("ETag: W/\"JzE7\"") && answer.text().contains("W/\\\"JzE7\\\""));
    proxy.shutdown().await;
}

#[tokio::test]
async fn gzip_bodies_are_decoded_rewritten_and_sent_uncompressed() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let root = format!("{}{BC_BASE}", upstream.base());
    let plain = format!(
        r#"{{"@odata.context":"{root}$metadata#items","value":[{}]}}"#,
        (0..2000)
            .map(|i| format!(
                r#"{{"id":{i},"picture@odata.mediaReadLink":"{root}items({i})/picture"}}"#
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    let compressed = gzip(plain.as_bytes());
    upstream.respond(move |_| {
        http::Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .header("content-length", compressed.len())
            .body(Full::new(Bytes::from(compressed.clone())))
            .unwrap()
    });
    let proxy = spawn_with(&idp, &upstream.base(), "", REWRITE).await;
    let (name, value) = erp();
    let answer = send(
        proxy.addr,
        "GET",
        "/bc/items",
        &[(name, &value), ("accept-encoding", "zstd, gzip, br;q=0.5")],
        "",
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-encoding"), None);
    let public = format!("http://{}/bc/", proxy.addr);
    assert_eq!(answer.text(), plain.replace(&root, &public));
    assert_eq!(
        upstream.requests()[0].header("accept-encoding"),
        Some("gzip, br;q=0.5")
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn fifty_parallel_requests_never_exceed_max_concurrent_upstream() {
    let idp = FakeIdp::start().await;
    let upstream = CountingUpstream::start(Duration::from_millis(40)).await;
    let proxy = spawn_with(
        &idp,
        &upstream.base(),
        "",
        "    max_concurrent: 3\n    max_queue: 100\n",
    )
    .await;
    let (name, value) = erp();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let value = value.clone();
            let addr = proxy.addr;
            tokio::spawn(async move {
                send(
                    addr,
                    "GET",
                    &format!("/bc/items({i})"),
                    &[(name, &value)],
                    "",
                )
                .await
                .status
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
    assert_eq!(upstream.served(), 50);
    assert_eq!(
        upstream.max_in_flight(),
        3,
        "the queue fills every slot, never more"
    );
    assert_eq!(upstream.in_flight(), 0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_full_queue_or_a_long_wait_is_503_with_retry_after() {
    let idp = FakeIdp::start().await;
    let upstream = CountingUpstream::start(Duration::from_millis(2000)).await;
    let proxy = spawn_with(
        &idp,
        &upstream.base(),
        "",
        "    max_concurrent: 1\n    max_queue: 1\n    queue_timeout: 1s\n",
    )
    .await;
    let (name, value) = erp();
    let request = |path: &'static str| {
        let value = value.clone();
        let addr = proxy.addr;
        tokio::spawn(async move { send(addr, "GET", path, &[(name, &value)], "").await })
    };
    let first = request("/bc/1");
    while upstream.in_flight() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = request("/bc/2");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = send(proxy.addr, "GET", "/bc/3", &[(name, &value)], "").await;
    assert_eq!(third.status, 503);
    assert_eq!(third.json()["error"], "queue_full");
    assert_eq!(third.json()["route"], "/bc/");
    assert_eq!(third.header("retry-after"), Some("5"));

    let second = second.await.unwrap();
    assert_eq!(second.status, 503, "{}", second.text());
    assert_eq!(second.json()["error"], "queue_timeout");
    assert!(second.header("retry-after").is_some());
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(upstream.served(), 1);
    proxy.shutdown().await;
}

/// An upstream handler that answers with `first` for the first `n` requests, then 200.
fn throttle_first(
    upstream: &FakeUpstream,
    n: usize,
    first: impl Fn() -> http::Response<Full<Bytes>> + Send + Sync + 'static,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    upstream.respond(move |_| {
        if calls.fetch_add(1, Ordering::SeqCst) < n {
            first()
        } else {
            json(200, r#"{"value":[]}"#)
        }
    });
}

fn status_with_retry_after(
    status: u16,
    retry_after: Option<&'static str>,
) -> http::Response<Full<Bytes>> {
    let mut response = json(
        status,
        r#"{"error":{"code":"Application_TooManyRequests"}}"#,
    );
    if let Some(value) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", value.parse().unwrap());
    }
    response
}

const RETRY: &str = "    retry_on_429: { attempts: 2, max_wait: 3s }\n";

#[tokio::test]
async fn a_429_is_waited_out_and_retried_transparently() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    throttle_first(&upstream, 1, || status_with_retry_after(429, Some("1")));
    let proxy = spawn_with(&idp, &upstream.base(), "", RETRY).await;
    let (name, value) = erp();
    let started = Instant::now();
    let answer = send(
        proxy.addr,
        "POST",
        "/bc/api/v2.0/companies(1)/customers",
        &[(name, &value)],
        r#"{"displayName":"Adatum"}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    let requests = upstream.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].body, requests[0].body);
    assert_eq!(requests[1].method, "POST");

    // Business Central's 503 with Retry-After is throttling too; attempts are bounded.
    throttle_first(&upstream, 5, || status_with_retry_after(503, Some("0")));
    let answer = send(proxy.addr, "GET", "/bc/x", &[(name, &value)], "").await;
    assert_eq!(answer.status, 503);
    assert_eq!(
        answer.header("retry-after"),
        Some("0"),
        "the upstream's answer"
    );
    assert_eq!(upstream.count(), 2 + 3, "one try and two retries");
    proxy.shutdown().await;
}

#[tokio::test]
async fn throttling_passes_through_when_it_cannot_be_retried() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn_with(&idp, &upstream.base(), "", RETRY).await;
    let (name, value) = erp();

    // A body over 64 KiB was streamed, not kept: the 429 goes back with its Retry-After.
    throttle_first(&upstream, 1, || status_with_retry_after(429, Some("1")));
    let large = vec![b'x'; 100 * 1024];
    let answer = send(proxy.addr, "POST", "/bc/upload", &[(name, &value)], large).await;
    assert_eq!(answer.status, 429);
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(upstream.count(), 1);

    // A wait beyond max_wait is the caller's to make.
    throttle_first(&upstream, 1, || status_with_retry_after(429, Some("60")));
    let answer = send(proxy.addr, "GET", "/bc/x", &[(name, &value)], "").await;
    assert_eq!(answer.status, 429);
    assert_eq!(answer.header("retry-after"), Some("60"));
    assert_eq!(upstream.count(), 2);

    // 504 and 408 may mean the upstream committed: a POST is never sent twice.
    for status in [504, 408] {
        throttle_first(&upstream, 1, move || {
            status_with_retry_after(status, Some("0"))
        });
        let before = upstream.count();
        let answer = send(proxy.addr, "POST", "/bc/x", &[(name, &value)], "{}").await;
        assert_eq!(answer.status, status);
        assert_eq!(upstream.count(), before + 1);
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn without_retry_on_429_the_answer_passes_through() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    throttle_first(&upstream, 1, || status_with_retry_after(429, Some("2")));
    let proxy = spawn_with(&idp, &upstream.base(), "", "").await;
    let (name, value) = erp();
    let answer = send(proxy.addr, "GET", "/bc/x", &[(name, &value)], "").await;
    assert_eq!(answer.status, 429);
    assert_eq!(answer.header("retry-after"), Some("2"));
    assert_eq!(upstream.count(), 1);
    proxy.shutdown().await;
}
