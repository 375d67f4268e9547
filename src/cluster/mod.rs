//! Fleet mode (`cluster:`): the handle to the Redis that the replicas of a fleet share
//! their limits through (docs/operations.md "Fleet mode").
//!
//! Client: the `redis` crate (redis-rs) with tokio, its reconnecting `ConnectionManager`
//! (one multiplexed connection per replica, reconnected in the background), Lua scripts
//! and TLS through rustls with the platform's roots (`rediss://` always verifies the
//! server certificate; the client's `#insecure` switch is refused by validation).
//!
//! Fail open: every limiter call ([`Cluster::call`]) gets one round trip within
//! `cluster.timeout` (default 5 ms). An error or a late answer marks Redis unavailable:
//! one warning per outage, `s2s_proxy_cluster_available` 0, and from then on every call
//! answers `None` at once without touching the network ("use your local limits"),
//! counted in `s2s_proxy_cluster_fallbacks_total`. A background probe pings Redis with a
//! growing pause (50 ms up to 5 s, no hot loop) and, once it answers, marks it available
//! again with one info line, so the fleet limits resume by themselves. `/readyz` shows
//! the state and stays ready: an outage degrades the limits, not the proxy.
//!
//! Release notifications: one pub/sub connection per replica subscribes to
//! `{key_prefix}:released:*`; [`Cluster::waker`] hands out the `Notify` of one channel,
//! which a message on it wakes. While that connection is down, waiters wake at most every
//! [`UNSUBSCRIBED_RECHECK`] instead. When it drops, a PING tells whether Redis is gone,
//! so an outage shows (log, gauge) even on a replica that has no request to decide.
//! Background calls (lease renewal and release) that fail mark Redis unavailable too.
//!
//! The URL may hold a password: only its redacted form ([`crate::config::RedisUrl`]) is
//! logged, and Redis errors are logged by kind, never with the URL.
//!
//! The distributed semaphore behind a route's `max_concurrent` is [`semaphore`].

pub(crate) mod rates;
pub(crate) mod semaphore;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::metrics::ClusterSeries;

/// First pause of the availability probe after an outage; doubled up to [`PROBE_MAX`].
const PROBE_MIN: Duration = Duration::from_millis(50);
const PROBE_MAX: Duration = Duration::from_secs(5);
/// Budget of background calls (lease renewal and release, probes): nobody waits on them.
pub(crate) const BACKGROUND_BUDGET: Duration = Duration::from_secs(1);
/// How long a waiter sleeps at most while no release notification can arrive.
pub(crate) const UNSUBSCRIBED_RECHECK: Duration = Duration::from_millis(250);

/// The fleet's Redis, shared by every pipeline and limiter of the runtime. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    manager: ConnectionManager,
    redacted: String,
    key_prefix: String,
    budget: Duration,
    available: AtomicBool,
    /// Whether the pub/sub connection is subscribed (release wake-ups arrive).
    subscribed: AtomicBool,
    /// Wakes the probe when a call fails.
    outage: Notify,
    series: ClusterSeries,
    /// Release channels by name, for the subscriber to wake.
    wakers: Mutex<HashMap<String, Weak<Notify>>>,
    /// Tells this replica's leases apart from the other replicas'.
    replica: String,
    next_lease: AtomicU64,
    started: OnceLock<()>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("redis", &self.redacted)
            .field("key_prefix", &self.key_prefix)
            .field("available", &self.available)
            .finish_non_exhaustive()
    }
}

/// The cluster's state for `/readyz` and the status page.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub(crate) struct ClusterStatus {
    pub(crate) redis: String,
    pub(crate) key_prefix: String,
    pub(crate) available: bool,
    pub(crate) subscribed: bool,
    pub(crate) fallbacks: u64,
}

impl Cluster {
    /// The handle for `config`; connects lazily. [`Cluster::start`] begins probing.
    pub(crate) fn new(config: &crate::config::Cluster, series: ClusterSeries) -> Self {
        // Validation opened this URL once already.
        let client = redis::Client::open(config.redis.expose()).expect("validated Redis URL");
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(BACKGROUND_BUDGET))
            .set_response_timeout(Some(BACKGROUND_BUDGET))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .expect("no push sender configured");
        series.available.set(0);
        Self {
            inner: Arc::new(Inner {
                client,
                manager,
                redacted: config.redis.redacted().to_owned(),
                key_prefix: config.key_prefix.clone(),
                budget: config.timeout,
                available: AtomicBool::new(false),
                subscribed: AtomicBool::new(false),
                outage: Notify::new(),
                series,
                wakers: Mutex::default(),
                replica: format!("{:016x}", fastrand::u64(..)),
                next_lease: AtomicU64::new(0),
                started: OnceLock::new(),
            }),
        }
    }

    /// Starts the availability probe and the release subscriber (once). Needs a tokio
    /// runtime. Until the first probe answers, calls fall back to local limits.
    pub(crate) fn start(&self) {
        if self.inner.started.set(()).is_err() {
            return;
        }
        tokio::spawn(probe(Arc::downgrade(&self.inner)));
        tokio::spawn(subscribe(Arc::downgrade(&self.inner)));
    }

    /// Whether Redis answered the last call in time.
    pub(crate) fn is_available(&self) -> bool {
        self.inner.available.load(Ordering::Relaxed)
    }

    /// Whether release notifications arrive right now.
    pub(crate) fn is_subscribed(&self) -> bool {
        self.inner.subscribed.load(Ordering::Relaxed)
    }

    pub(crate) fn status(&self) -> ClusterStatus {
        ClusterStatus {
            redis: self.inner.redacted.clone(),
            key_prefix: self.inner.key_prefix.clone(),
            available: self.is_available(),
            subscribed: self.is_subscribed(),
            fallbacks: self.inner.series.fallbacks.get(),
        }
    }

    /// A key (or channel) in this fleet's namespace: `{key_prefix}:{part}:{part}…`.
    pub(crate) fn key(&self, parts: &[&str]) -> String {
        let mut key = self.inner.key_prefix.clone();
        for part in parts {
            key.push(':');
            key.push_str(part);
        }
        key
    }

    /// A name for a new lease, unique in the fleet.
    pub(crate) fn lease_id(&self) -> String {
        let n = self.inner.next_lease.fetch_add(1, Ordering::Relaxed);
        format!("{}:{n}", self.inner.replica)
    }

    /// The `Notify` that a message on `channel` wakes (one per channel, shared).
    pub(crate) fn waker(&self, channel: &str) -> Arc<Notify> {
        let mut wakers = self
            .inner
            .wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        wakers.retain(|_, notify| notify.strong_count() > 0);
        if let Some(notify) = wakers.get(channel).and_then(Weak::upgrade) {
            return notify;
        }
        let notify = Arc::new(Notify::new());
        wakers.insert(channel.to_owned(), Arc::downgrade(&notify));
        notify
    }

    /// One Redis round trip for a limiter decision, within `cluster.timeout`. `None`
    /// means "use the local limits": Redis is unavailable (no call is made), or did not
    /// answer in time or answered an error (it is marked unavailable until the probe
    /// reaches it again). Every `None` is counted as a fallback.
    pub(crate) async fn call<T, F, Fut>(&self, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.is_available() {
            self.inner.series.fallbacks.inc();
            return None;
        }
        let answer = tokio::time::timeout(self.inner.budget, f(self.inner.manager.clone())).await;
        let reason = match answer {
            Ok(Ok(value)) => return Some(value),
            Ok(Err(error)) => error_kind(&error),
            Err(_) => "no answer within cluster.timeout",
        };
        self.inner.series.fallbacks.inc();
        self.inner.went_down(reason);
        None
    }

    /// A call nobody waits for (lease renewal and release): up to [`BACKGROUND_BUDGET`],
    /// made even while Redis is marked unavailable, and not counted as a fallback. A
    /// failure marks Redis unavailable like [`Cluster::call`]'s.
    pub(crate) async fn call_in_background<T, F, Fut>(&self, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let reason =
            match tokio::time::timeout(BACKGROUND_BUDGET, f(self.inner.manager.clone())).await {
                Ok(Ok(value)) => return Some(value),
                Ok(Err(error)) => error_kind(&error),
                Err(_) => "no answer within 1s",
            };
        tracing::debug!(reason, "Background Redis call failed.");
        self.inner.went_down(reason);
        None
    }
}

impl Inner {
    fn went_down(&self, reason: &str) {
        if self.available.swap(false, Ordering::AcqRel) {
            self.series.available.set(0);
            warn!(
                redis = %self.redacted,
                reason,
                "Redis unavailable; using each replica's local limits until it answers again."
            );
            self.outage.notify_one();
        }
    }

    fn came_back(&self) {
        if !self.available.swap(true, Ordering::AcqRel) {
            self.series.available.set(1);
            info!(redis = %self.redacted, "Redis available; fleet-wide limits in force.");
        }
    }

    /// Wakes every waiter: a release message may have been missed.
    fn wake_all(&self) {
        let wakers = self.wakers.lock().unwrap_or_else(PoisonError::into_inner);
        for notify in wakers.values().filter_map(Weak::upgrade) {
            notify.notify_one();
        }
    }
}

/// What went wrong, without the server's words (they may echo arguments).
fn error_kind(error: &redis::RedisError) -> &'static str {
    if error.is_timeout() {
        "timed out"
    } else if error.is_connection_refusal() {
        "connection refused"
    } else if error.is_io_error() || error.is_connection_dropped() {
        "connection lost"
    } else {
        "Redis answered an error"
    }
}

/// Marks Redis available whenever it answers a PING, and probes again after each outage,
/// with a pause that doubles from [`PROBE_MIN`] to [`PROBE_MAX`]. Runs as long as the
/// runtime it was started on (the handle lives as long as the proxy).
async fn probe(inner: Weak<Inner>) {
    let mut first = true;
    loop {
        let mut pause = PROBE_MIN;
        loop {
            let Some(inner) = inner.upgrade() else { return };
            let mut manager = inner.manager.clone();
            let ping = tokio::time::timeout(
                BACKGROUND_BUDGET,
                redis::cmd("PING").query_async::<String>(&mut manager),
            )
            .await;
            if matches!(ping, Ok(Ok(_))) {
                inner.came_back();
                break;
            }
            if first {
                first = false;
                warn!(
                    redis = %inner.redacted,
                    "Redis unavailable at start; using each replica's local limits until it answers."
                );
            }
            drop(inner);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(PROBE_MAX);
        }
        first = false;
        let Some(inner) = inner.upgrade() else { return };
        // The runtime owns the handle for the life of the process; this waits with it.
        inner.outage.notified().await;
    }
}

/// Keeps one pub/sub connection subscribed to `{key_prefix}:released:*` and wakes the
/// matching [`Cluster::waker`] on every message. Reconnects with the probe's pauses.
async fn subscribe(inner: Weak<Inner>) {
    let mut pause = PROBE_MIN;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let client = strong.client.clone();
        let pattern = format!("{}:released:*", strong.key_prefix);
        drop(strong);
        let connected = tokio::time::timeout(BACKGROUND_BUDGET, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.psubscribe(&pattern).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        if let Ok(Ok(pubsub)) = connected {
            pause = PROBE_MIN;
            let mut messages = pubsub.into_on_message();
            if let Some(strong) = inner.upgrade() {
                strong.subscribed.store(true, Ordering::Relaxed);
                strong.wake_all();
            }
            while let Some(message) = messages.next().await {
                let Some(strong) = inner.upgrade() else {
                    return;
                };
                let channel = message.get_channel_name();
                let waker = strong
                    .wakers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(channel)
                    .and_then(Weak::upgrade);
                if let Some(notify) = waker {
                    notify.notify_one();
                }
            }
            let Some(strong) = inner.upgrade() else {
                return;
            };
            strong.subscribed.store(false, Ordering::Relaxed);
            // Waiters asleep until a lease's expiry look again (and find Redis gone, or not).
            strong.wake_all();
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(PROBE_MAX);
    }
}
