//! How long a request waits for a token, and what an upstream 401 does to the shared token:
//! real sockets, a fake identity provider that stalls, is slow or fails, and a recording
//! fake upstream.
//!
//! A request waits for a token at most until its route's `timeout`, then gets 503
//! `token_unavailable` with `Retry-After` (docs/credentials.md "Tokens"); the fetch it waited
//! for goes on for the others. An upstream 401 never evicts a token that is still valid: when
//! the renewal fails, the following requests keep using the old token until it expires.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;

use support::*;

/// The standard set-up with the `/bc/` route's `timeout` (and optionally more route
/// settings) added.
fn with_bc_route(idp: &FakeIdp, upstream: &FakeUpstream, settings: &str) -> String {
    standard_yaml(idp, upstream).replace(
        "    clients: [erp, scanner]\n",
        &format!("    clients: [erp, scanner]\n{settings}"),
    )
}

/// Sends `GET path` as `erp`, giving up (and failing the test) after 15 s, and returns the
/// answer with the time it took.
async fn timed_get(proxy: &ProxyHandle, path: &str) -> (Answer, Duration) {
    let (name, value) = erp();
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(15),
        send(proxy.addr, "GET", path, &[(name, &value)], ""),
    )
    .await
    .unwrap_or_else(|_| panic!("no answer to {path} within 15 s"));
    (answer, started.elapsed())
}

/// A 503 `token_unavailable` with a sane `Retry-After` that leaks nothing.
fn assert_token_unavailable(answer: &Answer) {
    assert_eq!(answer.status, 503, "{}", answer.text());
    let json = answer.json();
    assert_eq!(json["error"], "token_unavailable", "{}", answer.text());
    assert_eq!(json["route"], "/bc/");
    let retry_after: u64 = answer
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("Retry-After in seconds");
    assert!(
        (1..=60).contains(&retry_after),
        "Retry-After: {retry_after}"
    );
    let text = answer.text();
    for leak in [CLIENT_SECRET, "127.0.0.1", "tok-"] {
        assert!(!text.contains(leak), "{leak} leaked: {text}");
    }
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap()
}

#[tokio::test]
async fn a_hanging_identity_provider_is_a_503_at_the_route_timeout() {
    let idp = FakeIdp::start_with(IdpMode::Stall).await;
    let upstream = FakeUpstream::start().await;
    let yaml = with_bc_route(&idp, &upstream, "    timeout: 1s\n");
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;

    let (first, second) = tokio::join!(timed_get(&proxy, "/bc/a"), timed_get(&proxy, "/bc/b"));
    for (answer, elapsed) in [first, second] {
        assert_token_unavailable(&answer);
        assert!(
            elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(3),
            "answered after {elapsed:?}"
        );
    }
    assert_eq!(upstream.count(), 0);
    assert_eq!(
        idp.calls(),
        1,
        "the waiting requests share the start-up fetch"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_slow_identity_provider_is_a_503_at_the_route_timeout_and_its_fetch_goes_on() {
    let idp = FakeIdp::start_with(IdpMode::Slow(Duration::from_secs(4))).await;
    let upstream = FakeUpstream::start().await;
    let yaml = with_bc_route(&idp, &upstream, "    timeout: 1s\n");
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;

    let (answer, elapsed) = timed_get(&proxy, "/bc/a").await;
    // Not 504 `upstream_timeout` once the token finally arrives: the upstream was never asked.
    assert_token_unavailable(&answer);
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}"
    );
    assert_eq!(upstream.count(), 0);

    // The fetch the request gave up on was not cancelled: once it lands, requests use its
    // token, and no second token request was made.
    let answer = eventually(Duration::from_secs(15), "the slow token", || async {
        let (answer, _) = timed_get(&proxy, "/bc/b").await;
        (answer.status == 200).then_some(answer)
    })
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        upstream.requests()[0].header("authorization"),
        Some("Bearer tok-1")
    );
    assert_eq!(idp.calls(), 1);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_renewal_after_an_upstream_401_waits_no_longer_than_the_route_timeout() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = with_bc_route(&idp, &upstream, "    timeout: 1s\n");
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    assert_eq!(timed_get(&proxy, "/bc/warm").await.0.status, 200);
    let calls = idp.calls();

    idp.set_mode(IdpMode::Stall);
    upstream.respond(|_| status(StatusCode::UNAUTHORIZED));
    let (answer, elapsed) = timed_get(&proxy, "/bc/x").await;
    assert_token_unavailable(&answer);
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}"
    );
    assert_eq!(idp.calls(), calls + 1, "one renewal");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_token_wait_after_a_429_retry_sleep_ends_at_the_route_timeout() {
    // A 3 s token: usable for 2.7 s, renewed in the background after 1–1.5 s.
    let idp = FakeIdp::start_with(IdpMode::Issue { expires_in: 3 }).await;
    let upstream = FakeUpstream::start().await;
    let yaml = with_bc_route(
        &idp,
        &upstream,
        "    timeout: 5s\n    retry_on_429: { attempts: 1, max_wait: 4s }\n",
    );
    let proxy = spawn_proxy(config(&yaml, standard_vars())).await;
    idp.wait_for_calls(1).await;
    // From now on the provider hangs: the background renewal never ends.
    idp.set_mode(IdpMode::Stall);
    upstream.respond(|_| {
        Response::builder()
            .status(StatusCode::TOO_MANY_REQUESTS)
            .header("retry-after", "3")
            .body(Full::new(Bytes::new()))
            .unwrap()
    });

    let (answer, elapsed) = timed_get(&proxy, "/bc/x").await;
    // Sent with tok-1; after the 3 s throttling wait it has expired and no new token comes
    // before the deadline (5 s after the request arrived).
    assert_eq!(upstream.count(), 1, "{}", answer.text());
    assert_eq!(
        upstream.requests()[0].header("authorization"),
        Some("Bearer tok-1")
    );
    assert_token_unavailable(&answer);
    assert!(
        elapsed >= Duration::from_secs(5) && elapsed < Duration::from_secs(7),
        "answered after {elapsed:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_upstream_401_while_the_provider_fails_keeps_the_old_token_for_everyone_else() {
    let (idp, upstream, proxy) = standard().await;
    assert_eq!(timed_get(&proxy, "/bc/warm").await.0.status, 200);
    assert_eq!(idp.calls(), 1);

    idp.set_mode(IdpMode::Fail {
        status: 503,
        body: r#"{"error":"temporarily_unavailable"}"#.to_owned(),
        retry_after: None,
    });
    upstream.respond(|request| {
        if request.target.ends_with("/rejected") {
            status(StatusCode::UNAUTHORIZED)
        } else {
            status(StatusCode::OK)
        }
    });
    // The 401ing request: its renewal failed, so it is told no new token can be had yet.
    let (answer, _) = timed_get(&proxy, "/bc/rejected").await;
    assert_token_unavailable(&answer);
    assert!(
        answer.json()["message"]
            .as_str()
            .unwrap()
            .contains("temporarily_unavailable"),
        "{}",
        answer.text()
    );
    assert_eq!(idp.calls(), 2, "one renewal");

    // Everyone else goes on with the still-valid token.
    for i in 0..5 {
        let (answer, _) = timed_get(&proxy, &format!("/bc/item/{i}")).await;
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let seen = upstream.requests();
    assert_eq!(seen.len(), 7);
    assert!(
        seen.iter()
            .all(|r| r.header("authorization") == Some("Bearer tok-1")),
        "{:?}",
        seen.iter()
            .map(|r| r.header("authorization"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        idp.calls(),
        2,
        "no token request per request while backing off"
    );
    proxy.shutdown().await;
}
