//! `upstream_rate_limit` on one proxy, over real sockets: the upstream (which counts like
//! Business Central's sliding window and answers 429 beyond it) never sees more than N
//! requests in any window of length P, the callers wait instead of getting its 429, and a
//! caller whose turn would come too late gets 503 at once. Resends (after a 429, after a
//! 401 with a renewed token) count: the upstream receives them.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::dynamics::spawn_with;
use support::windowed::{TRANSIT_JITTER, WindowedUpstream};
use support::*;

const N: usize = 4;
const PER: Duration = Duration::from_secs(2);

/// `count` GETs from `erp` at once, each on its own connection; their statuses and error
/// codes, in no particular order.
async fn burst(addr: SocketAddr, count: usize) -> Vec<(u16, String)> {
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            tokio::spawn(async move {
                let (name, value) = erp();
                let answer =
                    send(addr, "GET", &format!("/bc/items{i}"), &[(name, &value)], "").await;
                let code = if answer.status == 200 {
                    String::new()
                } else {
                    answer.json()["error"].as_str().unwrap_or("").to_owned()
                };
                (answer.status, code)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

#[tokio::test]
async fn callers_wait_for_the_upstream_rate_instead_of_getting_its_429() {
    let idp = FakeIdp::start().await;
    let upstream = WindowedUpstream::start(N, PER).await;
    let proxy = spawn_with(
        &idp,
        &upstream.base(),
        "",
        "    upstream_rate_limit: 4/2s\n    timeout: 60s\n",
    )
    .await;
    let started = Instant::now();
    let answers = burst(proxy.addr, 4 * N).await;
    let took = started.elapsed();

    assert!(
        answers.iter().all(|(status, _)| *status == 200),
        "every caller got the upstream's 200: {answers:?}"
    );
    upstream.assert_within_limit();
    let arrivals = upstream.arrivals();
    assert_eq!(arrivals.len(), 4 * N, "each request sent once");
    // Four windows' worth: the last group cannot leave before three periods passed.
    let spread = arrivals[4 * N - 1] - arrivals[0];
    assert!(
        spread >= 3 * PER - TRANSIT_JITTER && took >= 3 * PER - TRANSIT_JITTER,
        "the callers waited: sends spread over {spread:?}, answers took {took:?}"
    );
    proxy.shutdown().await;
}

/// The test above can fail: without the limit the same burst trips the upstream's window.
#[tokio::test]
async fn without_the_limit_the_same_burst_trips_the_upstream() {
    let idp = FakeIdp::start().await;
    let upstream = WindowedUpstream::start(N, PER).await;
    let proxy = spawn_with(&idp, &upstream.base(), "", "    timeout: 60s\n").await;
    let answers = burst(proxy.addr, 4 * N).await;
    assert!(answers.iter().any(|(status, _)| *status == 429));
    assert!(upstream.throttled() > 0);
    assert!(upstream.busiest_window() > N);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_turn_past_the_deadline_is_refused_at_once_with_retry_after() {
    let idp = FakeIdp::start().await;
    let upstream = WindowedUpstream::start(10, Duration::from_secs(60)).await;
    let proxy = spawn_with(
        &idp,
        &upstream.base(),
        "",
        "    upstream_rate_limit: 1/30s\n    timeout: 10s\n",
    )
    .await;
    assert_eq!(burst(proxy.addr, 1).await[0].0, 200);

    let started = Instant::now();
    let (name, value) = erp();
    let refused = send(proxy.addr, "GET", "/bc/items", &[(name, &value)], "").await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.json()["error"], "queue_timeout");
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (20..=30).contains(&retry_after),
        "Retry-After names when the window frees: {retry_after}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once, not after waiting out the 10 s deadline"
    );
    assert_eq!(upstream.arrivals().len(), 1, "nothing sent");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_full_queue_refuses_with_queue_full() {
    let idp = FakeIdp::start().await;
    let upstream = WindowedUpstream::start(10, Duration::from_secs(60)).await;
    let proxy = spawn_with(
        &idp,
        &upstream.base(),
        "",
        "    upstream_rate_limit: 1/30s\n    max_queue: 0\n",
    )
    .await;
    assert_eq!(burst(proxy.addr, 1).await[0].0, 200);
    let answers = burst(proxy.addr, 1).await;
    assert_eq!(answers[0], (503, "queue_full".to_owned()));
    assert_eq!(upstream.arrivals().len(), 1);
    proxy.shutdown().await;
}

/// A `retry_on_429` replay is a request the upstream receives: it takes its own turn, so
/// the caller after it waits a full window instead of tripping the upstream again.
#[tokio::test]
async fn a_replay_after_429_counts_against_the_rate() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let first = std::sync::atomic::AtomicBool::new(true);
    upstream.respond(move |_| {
        if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let mut answer = support::dynamics::json(429, "{}");
            answer
                .headers_mut()
                .insert("retry-after", http::HeaderValue::from_static("0"));
            answer
        } else {
            support::dynamics::json(200, r#"{"value":[]}"#)
        }
    });
    let proxy = spawn_with(
        &idp,
        &upstream.base(),
        "",
        "    upstream_rate_limit: 2/3s\n    retry_on_429: { attempts: 1, max_wait: 1s }\n    \
         timeout: 30s\n",
    )
    .await;
    let started = Instant::now();
    assert_eq!(
        burst(proxy.addr, 1).await[0].0,
        200,
        "replayed after the 429"
    );
    assert_eq!(upstream.count(), 2);
    assert_eq!(burst(proxy.addr, 1).await[0].0, 200);
    assert_eq!(upstream.count(), 3);
    assert!(
        started.elapsed() >= Duration::from_secs(3) - TRANSIT_JITTER,
        "the third send waited for the first to leave the window: {:?}",
        started.elapsed()
    );
    proxy.shutdown().await;
}

/// The resend with a renewed token after an upstream 401 is a request the upstream
/// receives too.
#[tokio::test]
async fn a_resend_after_401_counts_against_the_rate() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let first = std::sync::atomic::AtomicBool::new(true);
    upstream.respond(move |_| {
        let status = if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            401
        } else {
            200
        };
        support::dynamics::json(status, "{}")
    });
    let proxy = spawn_with(
        &idp,
        &upstream.base(),
        "",
        "    upstream_rate_limit: 2/3s\n    timeout: 30s\n",
    )
    .await;
    let started = Instant::now();
    assert_eq!(
        burst(proxy.addr, 1).await[0].0,
        200,
        "resent with a new token"
    );
    assert_eq!(upstream.count(), 2);
    assert_eq!(idp.calls(), 2, "renewed once");
    assert_eq!(burst(proxy.addr, 1).await[0].0, 200);
    assert_eq!(upstream.count(), 3);
    assert!(
        started.elapsed() >= Duration::from_secs(3) - TRANSIT_JITTER,
        "the third send waited for the first to leave the window: {:?}",
        started.elapsed()
    );
    proxy.shutdown().await;
}
