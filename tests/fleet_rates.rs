//! Fleet mode's rates with three proxy processes on one real `redis-server`: a client's
//! `rate_limit` holds for the fleet (without `cluster`, for each replica), and a route's
//! `upstream_rate_limit` spaces the fleet's requests so that the upstream — which counts
//! like Business Central's sliding window and answers 429 beyond it — sees no more than N
//! in any window of length P, and every caller gets its 200 (without `cluster`, each
//! replica sends its own N and the upstream throttles).
//!
//! Processes need real time: every wait polls its condition against a generous deadline.

mod support;

#[path = "support/cli.rs"]
#[allow(dead_code)]
mod cli;

#[path = "support/replica.rs"]
mod replica;

use std::time::{Duration, Instant};

use cli::TempDir;
use replica::{LIMIT, Replica, Setup, start_fleet};
use support::windowed::{TRANSIT_JITTER, WindowedUpstream};
use support::{FakeIdp, RedisServer, erp, eventually, get, metric, send};

const REPLICAS: usize = 3;
const N: usize = 4;
const PER: Duration = Duration::from_secs(2);

/// Three replicas, ready, and with `cluster` connected to Redis.
async fn fleet(
    dir: &TempDir,
    idp: &FakeIdp,
    upstream: &str,
    redis: Option<&str>,
    client: &str,
    route: &str,
) -> Vec<Replica> {
    let setup = Setup {
        redis,
        key_prefix: "rates-test",
        client,
        route,
    };
    start_fleet(REPLICAS, dir, idp, upstream, &setup).await
}

/// `count` GETs from `erp`, spread over the replicas in turn, all at once; their statuses.
async fn burst(replicas: &[Replica], count: usize) -> Vec<u16> {
    let tasks: Vec<_> = (0..count)
        .map(|n| {
            let addr = replicas[n % replicas.len()].addr;
            tokio::spawn(async move {
                let (name, value) = erp();
                send(addr, "GET", &format!("/bc/r{n}"), &[(name, &value)], "")
                    .await
                    .status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(
            tokio::time::timeout(LIMIT, task)
                .await
                .expect("answered")
                .unwrap(),
        );
    }
    statuses
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

/// No replica fell back to its local limits: what the test saw was the fleet's.
async fn assert_no_fallback(replicas: &[Replica]) {
    for replica in replicas {
        let text = get(replica.admin, "/metrics").await.text();
        assert_eq!(
            metric(&text, "s2s_proxy_cluster_fallbacks_total"),
            Some(0.0),
            "a replica fell back to its local limits"
        );
    }
}

const CLIENT_RATE: &str = "    rate_limit: 5/1m\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_rate_limit_holds_across_the_fleet() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let idp = FakeIdp::start().await;
    let upstream = WindowedUpstream::start(1_000, PER).await;
    let dir = TempDir::new("fleet-client-rate");
    let replicas = fleet(
        &dir,
        &idp,
        &upstream.base(),
        Some(&redis.url()),
        CLIENT_RATE,
        "",
    )
    .await;
    let statuses = burst(&replicas, 15).await;
    assert_eq!(count(&statuses, 200), 5, "{statuses:?}");
    assert_eq!(count(&statuses, 429), 10, "{statuses:?}");
    assert_eq!(upstream.arrivals().len(), 5);
    assert!(
        redis
            .integer(&["PTTL", "rates-test:client_rate:erp"])
            .is_some_and(|ms| ms > 0),
        "the client's bucket is in Redis, and expires"
    );
    assert_no_fallback(&replicas).await;
}

/// The test above can fail: without `cluster` each replica has its own bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cluster_each_replica_admits_the_clients_whole_rate() {
    let idp = FakeIdp::start().await;
    let upstream = WindowedUpstream::start(1_000, PER).await;
    let dir = TempDir::new("fleet-client-rate-local");
    let replicas = fleet(&dir, &idp, &upstream.base(), None, CLIENT_RATE, "").await;
    let statuses = burst(&replicas, 18).await;
    assert_eq!(count(&statuses, 200), 15, "{statuses:?}");
}

const UPSTREAM_RATE: &str =
    "    upstream_rate_limit: 4/2s\n    timeout: 60s\n    queue_timeout: 60s\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_rate_limit_spaces_the_fleets_requests_without_a_429() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let idp = FakeIdp::start().await;
    let upstream = WindowedUpstream::start(N, PER).await;
    let dir = TempDir::new("fleet-upstream-rate");
    let replicas = fleet(
        &dir,
        &idp,
        &upstream.base(),
        Some(&redis.url()),
        "",
        UPSTREAM_RATE,
    )
    .await;
    let started = Instant::now();
    let statuses = burst(&replicas, 4 * N).await;
    assert_eq!(
        count(&statuses, 200),
        4 * N,
        "no 429, no error: {statuses:?}"
    );
    upstream.assert_within_limit();
    let arrivals = upstream.arrivals();
    assert_eq!(arrivals.len(), 4 * N, "each request sent once");
    let spread = arrivals[4 * N - 1] - arrivals[0];
    assert!(
        spread >= 3 * PER - TRANSIT_JITTER,
        "the fleet waited: sends spread over {spread:?} (all answered after {:?})",
        started.elapsed()
    );
    assert_no_fallback(&replicas).await;
    // Every send observed its wait; together they waited at least the three periods
    // that the last group of sends had to wait out.
    let (mut sends, mut waited) = (0.0, 0.0);
    for replica in &replicas {
        let text = get(replica.admin, "/metrics").await.text();
        let series =
            |name: &str| metric(&text, &format!("{name}{{route=\"/bc/\"}}")).unwrap_or_default();
        sends += series("s2s_proxy_upstream_rate_wait_seconds_count");
        waited += series("s2s_proxy_upstream_rate_wait_seconds_sum");
    }
    assert_eq!(sends, (4 * N) as f64);
    assert!(waited >= 3.0 * PER.as_secs_f64(), "{waited} s waited");
}

/// The test above can fail: without `cluster` each replica sends its own N per P.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cluster_each_replica_sends_its_own_n_and_the_upstream_throttles() {
    let idp = FakeIdp::start().await;
    let upstream = WindowedUpstream::start(N, PER).await;
    let dir = TempDir::new("fleet-upstream-rate-local");
    let replicas = fleet(&dir, &idp, &upstream.base(), None, "", UPSTREAM_RATE).await;
    let statuses = burst(&replicas, 4 * N).await;
    assert!(count(&statuses, 429) > 0, "{statuses:?}");
    assert!(upstream.busiest_window() > N);
}

/// Redis gone: each replica answers by its local bucket (fail open: requests still get
/// through, no 5xx) and counts the fallbacks; Redis back (empty): the fleet's bucket
/// decides again, by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_rate_falls_back_to_each_replica_and_resumes_with_redis() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let idp = FakeIdp::start().await;
    let upstream = WindowedUpstream::start(1_000, PER).await;
    let dir = TempDir::new("fleet-client-rate-outage");
    let replicas = fleet(
        &dir,
        &idp,
        &upstream.base(),
        Some(&redis.url()),
        "    rate_limit: 3/1m\n",
        "",
    )
    .await;
    let statuses = burst(&replicas, 6).await;
    assert_eq!(count(&statuses, 200), 3, "the fleet's 3: {statuses:?}");

    redis.kill();
    let statuses = burst(&replicas, 12).await;
    assert_eq!(
        count(&statuses, 200) + count(&statuses, 429),
        12,
        "answered by the local buckets: {statuses:?}"
    );
    assert!(
        count(&statuses, 200) > 0,
        "each replica's own allowance is left"
    );
    for replica in &replicas {
        let text = get(replica.admin, "/metrics").await.text();
        assert!(metric(&text, "s2s_proxy_cluster_fallbacks_total").is_some_and(|n| n > 0.0));
    }

    redis.restart();
    for replica in &replicas {
        eventually(LIMIT, "the replica reaches Redis again", || async {
            let body = get(replica.admin, "/readyz").await.json();
            (body["cluster"]["available"] == true).then_some(())
        })
        .await;
    }
    let statuses = burst(&replicas, 9).await;
    assert_eq!(
        count(&statuses, 200),
        3,
        "the fleet's bucket again (a fresh one: Redis restarted empty): {statuses:?}"
    );
}
