//! Every limit holds: across reloads (route queues, lockouts, rate limits), whatever the
//! body's framing (`max_body_bytes` on chunked bodies), and for requests whose caller
//! hangs up (logged and counted as 499).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::dynamics::yaml_with;
use support::*;

/// How long the proxy may take to notice what a test did (real sockets, busy machine).
const LIMIT: Duration = Duration::from_secs(20);

const QUEUED: &str = r#"s2s_proxy_queued{route="/bc/"}"#;

/// [`yaml_with`] plus the admin listener.
fn ops_yaml(idp: &FakeIdp, base: &str, server: &str, extra: &str) -> String {
    format!(
        "admin:\n  listen: 127.0.0.1:0\n{}",
        yaml_with(idp, base, server, extra)
    )
}

async fn spawn(yaml: &str, idp: &FakeIdp) -> OpsProxy {
    let proxy = spawn_ops_proxy(config(yaml, standard_vars()), None).await;
    idp.wait_for_calls(1).await;
    proxy
}

async fn metrics(admin: SocketAddr) -> String {
    get(admin, "/metrics").await.text()
}

/// A GET from `erp` on its own connection, in the background.
fn request(addr: SocketAddr, path: String) -> tokio::task::JoinHandle<u16> {
    tokio::spawn(async move {
        let (name, value) = erp();
        send(addr, "GET", &path, &[(name, &value)], "").await.status
    })
}

/// Waits until `n` requests have reached the upstream or wait in the route's queue.
async fn wait_arrived_or_queued(proxy: &OpsProxy, upstream: &GatedUpstream, n: usize) {
    eventually(
        LIMIT,
        &format!("{n} requests at the upstream or queued"),
        || async {
            let queued = metric(&metrics(proxy.admin).await, QUEUED).unwrap_or(0.0) as usize;
            (upstream.arrived().len() + queued == n).then_some(())
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// Route queues across reloads

#[tokio::test]
async fn reloads_during_a_request_do_not_add_upstream_slots() {
    let idp = FakeIdp::start().await;
    let upstream = GatedUpstream::start().await;
    let yaml = ops_yaml(
        &idp,
        &upstream.base(),
        "",
        "    max_concurrent: 1\n    max_queue: 10\n",
    );
    let proxy = spawn(&yaml, &idp).await;
    let mut requests = vec![request(proxy.handle.addr, "/bc/r0".to_owned())];
    wait_arrived_or_queued(&proxy, &upstream, 1).await;
    for n in 1..4 {
        proxy.reload.apply(config(&yaml, standard_vars()));
        requests.push(request(proxy.handle.addr, format!("/bc/r{n}")));
        wait_arrived_or_queued(&proxy, &upstream, n + 1).await;
    }
    assert_eq!(
        upstream.in_flight(),
        1,
        "three reloads, still one at a time"
    );
    assert_eq!(
        metric(&metrics(proxy.admin).await, QUEUED),
        Some(3.0),
        "every waiter is still counted"
    );

    upstream.release(4);
    for request in requests {
        assert_eq!(request.await.unwrap(), 200);
    }
    assert_eq!(upstream.max_in_flight(), 1);
    assert_eq!(
        upstream.arrived(),
        (0..4).map(|n| format!("{BC_BASE}r{n}")).collect::<Vec<_>>(),
        "first come, first served across the reloads"
    );
    proxy.handle.shutdown().await;
}

/// The issue's "done" criterion: 100 reloads while 50 requests run on a
/// `max_concurrent: 2` route.
#[tokio::test]
async fn a_reload_storm_keeps_max_concurrent_and_every_waiter() {
    let idp = FakeIdp::start().await;
    let upstream = GatedUpstream::start().await;
    let yaml = ops_yaml(
        &idp,
        &upstream.base(),
        "",
        "    max_concurrent: 2\n    max_queue: 100\n    timeout: 5m\n    queue_timeout: 5m\n",
    );
    let proxy = spawn(&yaml, &idp).await;
    let mut requests = Vec::new();
    for n in 0..50 {
        proxy.reload.apply(config(&yaml, standard_vars()));
        proxy.reload.apply(config(&yaml, standard_vars()));
        requests.push(request(proxy.handle.addr, format!("/bc/r{n}")));
        wait_arrived_or_queued(&proxy, &upstream, n + 1).await;
        assert!(
            upstream.in_flight() <= 2,
            "{} at once",
            upstream.in_flight()
        );
        // Let every other one finish, so slots change hands between reloads too.
        if n % 2 == 1 {
            upstream.release(1);
        }
    }
    upstream.release(50);
    for request in requests {
        assert_eq!(request.await.unwrap(), 200, "no waiter lost");
    }
    assert_eq!(upstream.arrived().len(), 50);
    assert_eq!(
        upstream.max_in_flight(),
        2,
        "never more than max_concurrent"
    );
    assert_eq!(metric(&metrics(proxy.admin).await, QUEUED), Some(0.0));
    proxy.handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Lockouts and rate limits across reloads

#[tokio::test]
async fn a_reload_does_not_lift_a_lockout() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = ops_yaml(&idp, &upstream.base(), "", "");
    let proxy = spawn(&yaml, &idp).await;
    let wrong = basic("erp", "wrong");
    for _ in 0..30 {
        let answer = send(
            proxy.handle.addr,
            "GET",
            "/bc/x",
            &[("authorization", &wrong)],
            "",
        )
        .await;
        assert_eq!(answer.status, 401);
    }
    let (name, value) = erp();
    let locked = send(proxy.handle.addr, "GET", "/bc/x", &[(name, &value)], "").await;
    assert_eq!(locked.status, 429);

    proxy.reload.apply(config(&yaml, standard_vars()));
    let after = send(proxy.handle.addr, "GET", "/bc/x", &[(name, &value)], "").await;
    assert_eq!(after.status, 429, "still locked out after the reload");
    assert_eq!(after.json()["error"], "too_many_requests");
    assert_eq!(upstream.count(), 0);
    proxy.handle.shutdown().await;
}

/// [`ops_yaml`] with `rate_limit` on client `erp` (or none).
fn rate_limited(idp: &FakeIdp, upstream: &FakeUpstream, rate_limit: Option<&str>) -> String {
    let erp = r#"basic: { username: erp, password: "${ERP_PASSWORD}" }"#;
    let yaml = ops_yaml(idp, &upstream.base(), "", "");
    match rate_limit {
        Some(limit) => yaml.replacen(erp, &format!("{erp}\n    rate_limit: {limit}"), 1),
        None => yaml,
    }
}

/// How many of `n` requests from `erp` are answered 200 before the first 429 (all of
/// them: `n`).
async fn admitted(addr: SocketAddr, n: usize) -> usize {
    let (name, value) = erp();
    for i in 0..n {
        let answer = send(addr, "GET", "/bc/x", &[(name, &value)], "").await;
        if answer.status == 429 {
            assert_eq!(answer.json()["error"], "too_many_requests");
            return i;
        }
        assert_eq!(answer.status, 200);
    }
    n
}

#[tokio::test]
async fn rate_limits_are_carried_across_reloads_by_client_name() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let limited = |limit| config(&rate_limited(&idp, &upstream, limit), standard_vars());
    let proxy = spawn(&rate_limited(&idp, &upstream, Some("4/m")), &idp).await;
    let addr = proxy.handle.addr;
    assert_eq!(admitted(addr, 2).await, 2);

    proxy.reload.apply(limited(Some("4/m")));
    assert_eq!(admitted(addr, 10).await, 2, "the same bucket: 2 of 4 left");

    proxy.reload.apply(limited(Some("4/m")));
    assert_eq!(
        admitted(addr, 1).await,
        0,
        "still empty after another reload"
    );

    // Doubled: the bucket is as full as it was (all used), at the new size.
    proxy.reload.apply(limited(Some("8/m")));
    assert_eq!(admitted(addr, 1).await, 0);

    // No limit, then a limit again: a new, full bucket.
    proxy.reload.apply(limited(None));
    assert_eq!(admitted(addr, 12).await, 12);
    proxy.reload.apply(limited(Some("4/m")));
    assert_eq!(admitted(addr, 10).await, 4);
    proxy.handle.shutdown().await;
}

#[tokio::test]
async fn a_changed_rate_limit_keeps_the_share_already_used() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let proxy = spawn(&rate_limited(&idp, &upstream, Some("4/m")), &idp).await;
    let addr = proxy.handle.addr;
    assert_eq!(admitted(addr, 2).await, 2, "half of 4/m used");
    let doubled = rate_limited(&idp, &upstream, Some("8/m"));
    proxy.reload.apply(config(&doubled, standard_vars()));
    assert_eq!(admitted(addr, 20).await, 4, "half of 8/m left");
    proxy.handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// max_body_bytes on chunked bodies

/// A chunked POST from `erp` of `chunks` chunks of `size` bytes each.
fn chunked(size: usize, chunks: usize) -> Vec<u8> {
    let auth = basic("erp", PASSWORD);
    let mut request = format!(
        "POST /bc/upload HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..chunks {
        request.extend_from_slice(format!("{size:x}\r\n").as_bytes());
        request.extend(std::iter::repeat_n(b'a', size));
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    request
}

#[tokio::test]
async fn a_chunked_body_over_max_body_bytes_is_413_and_never_forwarded() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let small = ops_yaml(
        &idp,
        &upstream.base(),
        "  limits: { max_body_bytes: 1000 }\n",
        "",
    );
    let proxy = spawn(&small, &idp).await;
    for (size, chunks) in [(70_000, 1), (1_000, 70), (10_000, 13), (1_001, 1)] {
        let response = raw(proxy.handle.addr, &chunked(size, chunks)).await;
        assert_eq!(
            raw_status(&response),
            413,
            "{chunks} chunks of {size}: {response}"
        );
        assert!(response.contains("payload_too_large"), "{response}");
    }
    assert_eq!(upstream.count(), 0, "not one byte reached the upstream");
    proxy.handle.shutdown().await;
}

#[tokio::test]
async fn a_chunked_body_within_max_body_bytes_is_forwarded_whole() {
    let idp = FakeIdp::start().await;
    let upstream = FakeUpstream::start().await;
    let yaml = ops_yaml(
        &idp,
        &upstream.base(),
        "  limits: { max_body_bytes: 200000 }\n",
        "",
    );
    let proxy = spawn(&yaml, &idp).await;
    // Kept for a replay (under 64 KiB), and streamed (over it).
    for (size, chunks) in [(1_000, 50), (10_000, 20)] {
        let response = raw(proxy.handle.addr, &chunked(size, chunks)).await;
        assert_eq!(raw_status(&response), 200, "{response}");
    }
    let bodies: Vec<usize> = upstream.requests().iter().map(|r| r.body.len()).collect();
    assert_eq!(bodies, [50_000, 200_000]);
    proxy.handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Callers that hang up: 499

/// Sends a GET from `erp` and keeps the connection open without reading.
async fn open_request(addr: SocketAddr, path: &str) -> TcpStream {
    let auth = basic("erp", PASSWORD);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {path} HTTP/1.1\r\nHost: p\r\nAuthorization: {auth}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

const CLOSED: &str = r#"s2s_proxy_requests_total{route="/bc/",method="GET",status="499"}"#;

/// The access-log lines with `status=499`.
fn closed_lines(logs: &LogCapture) -> Vec<String> {
    logs.text()
        .lines()
        .filter(|line| line.contains("s2s_proxy::access") && line.contains("status=499"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_caller_hanging_up_while_the_upstream_works_is_logged_and_counted_as_499() {
    let ((), logs) = capture_logs(async {
        let idp = FakeIdp::start().await;
        let upstream = GatedUpstream::start().await;
        let proxy = spawn(&ops_yaml(&idp, &upstream.base(), "", ""), &idp).await;
        let caller = open_request(proxy.handle.addr, "/bc/slow").await;
        eventually(LIMIT, "the request at the upstream", || async {
            (upstream.arrived().len() == 1).then_some(())
        })
        .await;
        drop(caller);
        let text = eventually(LIMIT, "the hang-up counted", || async {
            let text = metrics(proxy.admin).await;
            (metric(&text, CLOSED) == Some(1.0)).then_some(text)
        })
        .await;
        assert_eq!(
            metric(&text, r#"s2s_proxy_in_flight{route="/bc/"}"#),
            Some(0.0)
        );
        upstream.release(1);
        proxy.handle.shutdown().await;
    });
    let lines = closed_lines(&logs);
    assert_eq!(lines.len(), 1, "{}", logs.text());
    for field in [
        "complete=false",
        "error=\"client_closed\"",
        "route=\"/bc/\"",
        "path=\"/bc/slow\"",
    ] {
        assert!(
            lines[0].contains(field) || lines[0].contains(&field.replace('"', "")),
            "{field} in {}",
            lines[0]
        );
    }
}

#[test]
fn a_caller_hanging_up_while_queued_is_logged_and_counted_as_499() {
    let ((), logs) = capture_logs(async {
        let idp = FakeIdp::start().await;
        let upstream = GatedUpstream::start().await;
        let yaml = ops_yaml(&idp, &upstream.base(), "", "    max_concurrent: 1\n");
        let proxy = spawn(&yaml, &idp).await;
        let first = request(proxy.handle.addr, "/bc/first".to_owned());
        let queued = {
            eventually(LIMIT, "the first request at the upstream", || async {
                (upstream.arrived().len() == 1).then_some(())
            })
            .await;
            open_request(proxy.handle.addr, "/bc/queued").await
        };
        eventually(LIMIT, "the second request queued", || async {
            (metric(&metrics(proxy.admin).await, QUEUED) == Some(1.0)).then_some(())
        })
        .await;
        drop(queued);
        eventually(LIMIT, "the hang-up counted", || async {
            let text = metrics(proxy.admin).await;
            (metric(&text, CLOSED) == Some(1.0) && metric(&text, QUEUED) == Some(0.0)).then_some(())
        })
        .await;
        upstream.release(1);
        assert_eq!(first.await.unwrap(), 200);
        assert_eq!(upstream.arrived().len(), 1, "the queued request never left");
        proxy.handle.shutdown().await;
    });
    let lines = closed_lines(&logs);
    assert_eq!(lines.len(), 1, "{}", logs.text());
    assert!(lines[0].contains("/bc/queued"), "{}", lines[0]);
    assert!(lines[0].contains("complete=false"), "{}", lines[0]);
}
