//! The rate scripts against a real `redis-server`: the sliding log admits N per window
//! across handles (replicas) and names the exact wait; the GCRA bucket is the documented
//! token bucket; both answer `None` when Redis is gone.

use std::time::{Duration, Instant};

use super::*;
use crate::test_support::{RedisServer, available, fleet};

fn rate(requests: u32, per_ms: u64) -> RateLimit {
    RateLimit {
        requests,
        per: Duration::from_millis(per_ms),
    }
}

fn after(turn: Option<Turn>) -> Duration {
    match turn {
        Some(Turn::After(wait)) => wait,
        other => panic!("expected a wait, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_send_log_admits_n_per_window_across_replicas_and_names_the_exact_wait() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let clusters = fleet(&redis.url(), 3);
    available(&clusters).await;
    let logs: Vec<SendLog> = clusters.iter().map(|c| SendLog::new(c, "/bc/")).collect();
    let limit = rate(4, 3_000);

    // Four sends spread over the three replicas, then the window is full for all.
    let started = Instant::now();
    assert_eq!(logs[0].try_send(limit).await, Some(Turn::Now));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for log in logs.iter().cycle().skip(1).take(3) {
        assert_eq!(log.try_send(limit).await, Some(Turn::Now));
    }
    for log in &logs {
        let wait = after(log.try_send(limit).await);
        let elapsed = started.elapsed();
        assert!(
            wait <= Duration::from_millis(3_000) && wait + elapsed >= Duration::from_millis(2_900),
            "room comes when the first send is 3 s old: {wait:?} after {elapsed:?}"
        );
    }
    assert_eq!(
        redis.integer(&["ZCARD", &clusters[0].key(&["upstream_rate", "/bc/"])]),
        Some(4),
        "refused sends are not logged"
    );
    let ttl = redis.integer(&["PTTL", &clusters[0].key(&["upstream_rate", "/bc/"])]);
    assert!(ttl.is_some_and(|ms| ms > 0 && ms <= 4_000), "{ttl:?}");

    // Sleeping exactly the answered wait is enough: no polling needed.
    let wait = after(logs[1].try_send(limit).await);
    tokio::time::sleep(wait).await;
    assert_eq!(logs[1].try_send(limit).await, Some(Turn::Now));
    assert!(started.elapsed() >= Duration::from_millis(3_000));
    // Only the oldest left: the next room comes when the second send (about 0.5 s after
    // the first) is 3 s old, not a whole window later.
    let wait = after(logs[2].try_send(limit).await);
    assert!(wait < Duration::from_millis(1_500), "{wait:?}");
}

/// The log is exact where a sliding-window counter would estimate: sends crowded at the
/// end of one period still count in full in the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_at_a_periods_end_still_count_in_the_next() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let clusters = fleet(&redis.url(), 2);
    available(&clusters).await;
    let (a, b) = (
        SendLog::new(&clusters[0], "/bc/"),
        SendLog::new(&clusters[1], "/bc/"),
    );
    let limit = rate(3, 2_000);
    assert_eq!(a.try_send(limit).await, Some(Turn::Now));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(b.try_send(limit).await, Some(Turn::Now));
    assert_eq!(a.try_send(limit).await, Some(Turn::Now));
    // 2.1 s after the first: it left, the two late ones did not.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(b.try_send(limit).await, Some(Turn::Now));
    let wait = after(a.try_send(limit).await);
    assert!(
        wait > Duration::from_millis(1_000) && wait <= Duration::from_millis(1_400),
        "until the send at 1.5 s is 2 s old: {wait:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_n_waits_until_enough_sends_left() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let clusters = fleet(&redis.url(), 1);
    available(&clusters).await;
    let log = SendLog::new(&clusters[0], "/bc/");
    for _ in 0..3 {
        assert_eq!(log.try_send(rate(3, 2_000)).await, Some(Turn::Now));
    }
    let wait = after(log.try_send(rate(1, 2_000)).await);
    assert!(
        wait > Duration::from_millis(1_800),
        "all three must leave, the newest last: {wait:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_bucket_is_the_documented_token_bucket() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let clusters = fleet(&redis.url(), 3);
    available(&clusters).await;
    let buckets: Vec<FleetBucket> = clusters
        .iter()
        .map(|c| FleetBucket::new(c, "erp"))
        .collect();
    let limit = rate(5, 10_000);
    // The whole allowance as a burst, wherever it is spent.
    for bucket in buckets.iter().cycle().take(5) {
        assert_eq!(bucket.try_admit(limit).await, Some(Turn::Now));
    }
    for bucket in &buckets {
        let wait = after(bucket.try_admit(limit).await);
        assert!(
            wait > Duration::from_millis(1_500) && wait <= Duration::from_millis(2_000),
            "one request per 2 s sustained: {wait:?}"
        );
    }
    let other = FleetBucket::new(&clusters[0], "scanner");
    assert_eq!(other.try_admit(limit).await, Some(Turn::Now), "per client");

    let wait = after(buckets[0].try_admit(limit).await);
    tokio::time::sleep(wait).await;
    assert_eq!(buckets[2].try_admit(limit).await, Some(Turn::Now));
    assert!(
        buckets[1]
            .try_admit(limit)
            .await
            .is_some_and(|t| t != Turn::Now)
    );
    let ttl = redis.integer(&["PTTL", &clusters[0].key(&["client_rate", "erp"])]);
    assert!(ttl.is_some_and(|ms| ms > 0 && ms <= 11_000), "{ttl:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_scripts_answer_none() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let clusters = fleet(&redis.url(), 1);
    available(&clusters).await;
    let log = SendLog::new(&clusters[0], "/bc/");
    let bucket = FleetBucket::new(&clusters[0], "erp");
    assert_eq!(log.try_send(rate(1, 1_000)).await, Some(Turn::Now));
    redis.kill();
    assert_eq!(log.try_send(rate(1, 1_000)).await, None);
    assert_eq!(bucket.try_admit(rate(1, 1_000)).await, None);
    assert!(!clusters[0].is_available());
}
