//! The lease scripts against a real `redis-server`: limit, expiry, renewal, release
//! wake-up, and the fallback when Redis is gone.

use std::time::{Duration, Instant};

use super::*;
use crate::metrics::ClusterSeries;
use crate::test_support::{RedisServer, cluster_handle, fresh_key_prefix, until};

fn cluster(url: &str) -> (Cluster, ClusterSeries) {
    cluster_handle(url, &fresh_key_prefix(), Duration::from_secs(1))
}

async fn connected(url: &str) -> (Cluster, ClusterSeries) {
    let (cluster, series) = cluster(url);
    until("Redis is available and subscribed", || {
        cluster.is_available() && cluster.is_subscribed()
    })
    .await;
    (cluster, series)
}

fn granted(attempt: Attempt) -> Lease {
    match attempt {
        Attempt::Granted(lease) => lease,
        other => panic!("expected a lease, got {other:?}"),
    }
}

fn busy(attempt: &Attempt) -> Duration {
    match attempt {
        Attempt::Busy(wait) => *wait,
        other => panic!("expected all slots taken, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_stop_at_the_limit_and_a_release_wakes_the_waiter_at_once() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (cluster, _) = connected(&redis.url()).await;
    let slots = Arc::new(FleetSlots::new(&cluster, "/bc/"));
    let a = granted(slots.try_acquire(2).await);
    let _b = granted(slots.try_acquire(2).await);
    let wait = busy(&slots.try_acquire(2).await);
    assert!(
        wait > LEASE_TTL - Duration::from_secs(2) && wait <= LEASE_TTL,
        "the script answers the earliest expiry: {wait:?}"
    );
    assert_eq!(
        redis.integer(&["ZCARD", &cluster.key(&["slots", "/bc/"])]),
        Some(2)
    );

    let waiter = tokio::spawn({
        let slots = Arc::clone(&slots);
        async move { slots.acquire(|| 2).await.map(|_lease| Instant::now()) }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "both slots are held");
    let released = Instant::now();
    drop(a);
    let got = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the release message woke the waiter, long before any expiry")
        .unwrap()
        .expect("a lease");
    assert!(got.duration_since(released) < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrenewed_lease_expires_and_the_waiter_takes_it_at_that_time() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (cluster, _) = connected(&redis.url()).await;
    let key = cluster.key(&["slots", "/bc/"]);
    // A replica that crashed right after taking the only slot: nobody renews its lease.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (granted_flag, _): (u8, u64) = ACQUIRE_SCRIPT
        .key(&key)
        .key(cluster.key(&["waiting", "/bc/"]))
        .arg("crashed:0")
        .arg(1)
        .arg(700)
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(granted_flag, 1);
    let started = Instant::now();
    let slots = FleetSlots::new(&cluster, "/bc/");
    assert!(busy(&slots.try_acquire(1).await) <= Duration::from_millis(700));
    let lease = tokio::time::timeout(Duration::from_secs(5), slots.acquire(|| 1))
        .await
        .expect("the expiry woke the waiter")
        .expect("a lease");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(600),
        "not before the expiry: {waited:?}"
    );
    drop(lease);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lease_is_renewed_past_its_ttl_and_freed_on_drop() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (cluster, _) = connected(&redis.url()).await;
    let slots = FleetSlots::with_ttl(&cluster, "/bc/", Duration::from_millis(600));
    let lease = granted(slots.try_acquire(1).await);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    busy(&slots.try_acquire(1).await);
    assert_eq!(
        redis.integer(&["EXISTS", &cluster.key(&["waiting", "/bc/"])]),
        Some(1),
        "the refusal marked the route as waited for"
    );
    drop(lease);
    let key = cluster.key(&["slots", "/bc/"]);
    until("the release removed the lease", || {
        redis.integer(&["ZCARD", &key]) == Some(0)
    })
    .await;
    drop(granted(slots.try_acquire(1).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_outlives_an_outage_and_adds_back_a_lease_that_redis_lost() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let (cluster, _) = connected(&redis.url()).await;
    let slots = FleetSlots::with_ttl(&cluster, "/bc/", Duration::from_millis(900));
    let key = cluster.key(&["slots", "/bc/"]);
    let lease = granted(slots.try_acquire(1).await);
    redis.kill();
    // A renewal (or the dropped subscription) finds Redis gone; the lease is kept.
    until("the outage is noticed", || !cluster.is_available()).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !lease.renewal.is_finished(),
        "renewal goes on after failures"
    );
    redis.restart();
    assert_eq!(redis.integer(&["ZCARD", &key]), Some(0), "restarted empty");
    until("the renewal re-registered the running request", || {
        redis.integer(&["ZCARD", &key]) == Some(1)
    })
    .await;
    drop(lease);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_every_try_falls_back_and_is_counted() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let (cluster, series) = connected(&redis.url()).await;
    redis.kill();
    let slots = FleetSlots::new(&cluster, "/bc/");
    assert!(matches!(slots.try_acquire(1).await, Attempt::Unavailable));
    assert!(!cluster.is_available());
    assert_eq!(series.available.get(), 0);
    assert!(matches!(slots.try_acquire(1).await, Attempt::Unavailable));
    assert_eq!(series.fallbacks.get(), 2);
    redis.restart();
    until("the probe found Redis again", || cluster.is_available()).await;
    assert_eq!(series.available.get(), 1);
    drop(granted(slots.try_acquire(1).await));
}
