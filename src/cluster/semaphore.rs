//! A fleet-wide semaphore for one route's `max_concurrent`: leases in Redis.
//!
//! Design: a sorted set per route (`{key_prefix}:slots:{route}`) holds one member per
//! request at the upstream, scored by its expiry in Redis's clock (`TIME`, so the
//! replicas' clocks do not matter). [`ACQUIRE`] is one atomic Lua script, one round trip:
//! it drops the expired leases and adds this one if fewer than `max_concurrent` remain;
//! otherwise it answers how long until the earliest lease expires. A lease lives
//! [`LEASE_TTL`] (15 s) and its holder renews it every third of that while the request
//! runs (Business Central requests may take 10 minutes), so a crashed replica's slots
//! come free within 15 s. Release is `ZREM` and a `PUBLISH` on the route's channel
//! (`{key_prefix}:released:{route}`), one script too; the message goes out only while a
//! refused acquire's marker (`{key_prefix}:waiting:{route}`, kept a second past the wait
//! it announced) says someone waits, so an uncontended fleet sends no messages.
//!
//! Waiting: within a replica the route's local queue stays FIFO-fair (`proxy::queue`);
//! only the request at its head competes in Redis ([`FleetSlots::acquire`] holds the
//! head lock), and while anyone waits no new request tries its luck first
//! ([`FleetSlots::try_first`]). It sleeps until a release message on the route's channel or the earliest
//! lease expiry the script returned, whichever comes first — no polling loop. Which
//! replica's head wins a freed slot is a race between them, one at a time per replica.
//!
//! Failures: when Redis does not answer in time the caller is told
//! ([`Attempt::Unavailable`], `None`) and uses the local semaphore. A renewal that fails
//! is logged at debug level and tried again at the next interval; the request goes on.
//! Renewal re-adds a lease that is gone (Redis restarted empty), so requests that were
//! running count again within a third of the TTL. A lease whose answer never arrives (the
//! call timed out, or the caller hung up mid-call) is nobody's: it expires within the
//! TTL, keeping one slot of the fleet busy until then.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::Script;
use tokio::sync::Notify;

use super::{Cluster, UNSUBSCRIBED_RECHECK};
use crate::waiting::Waiting;

/// How long a lease lives without renewal.
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(15);

/// KEYS[1]: the route's leases, KEYS[2]: its "someone waits" marker; ARGV: lease id,
/// max_concurrent, TTL (ms). Answers `{1, 0}` (granted) or `{0, ms until the earliest
/// lease expires}`; a refusal (re)sets the marker for a second past that wait, so that
/// releases are announced only while someone may be waiting.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
  return {1, 0}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local wait = math.max(tonumber(first[2]) - now, 1)
redis.call('SET', KEYS[2], '1', 'PX', wait + 1000)
return {0, wait}
";

/// KEYS[1]: the route's leases; ARGV: lease id, TTL (ms). Pushes the expiry out, adding
/// the lease back if it is gone.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 1
";

/// KEYS[1]: the route's leases, KEYS[2]: its "someone waits" marker; ARGV: lease id,
/// release channel. Publishes only while the marker says someone waits.
const RELEASE: &str = r"
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('PUBLISH', ARGV[2], 'released')
end
return removed
";

static ACQUIRE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE));
static RENEW_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW));
static RELEASE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE));

/// One route's fleet-wide slots.
#[derive(Debug)]
pub(crate) struct FleetSlots {
    cluster: Cluster,
    key: Arc<str>,
    /// The "someone waits" marker.
    waiting_key: Arc<str>,
    channel: Arc<str>,
    released: Arc<Notify>,
    /// Held by the one local waiter that competes in Redis; tokio's mutex is FIFO.
    head: tokio::sync::Mutex<()>,
    /// Local requests in [`FleetSlots::acquire`]: while any waits, none takes the fast path.
    waiting: AtomicUsize,
    ttl: Duration,
}

/// The outcome of one try.
#[derive(Debug)]
pub(crate) enum Attempt {
    Granted(Lease),
    /// All taken; the earliest lease expires after this long.
    Busy(Duration),
    /// Redis did not answer in time: use the local limits.
    Unavailable,
}

impl FleetSlots {
    pub(crate) fn new(cluster: &Cluster, route: &str) -> Self {
        Self::with_ttl(cluster, route, LEASE_TTL)
    }

    pub(crate) fn with_ttl(cluster: &Cluster, route: &str, ttl: Duration) -> Self {
        let channel = cluster.key(&["released", route]);
        Self {
            key: cluster.key(&["slots", route]).into(),
            waiting_key: cluster.key(&["waiting", route]).into(),
            released: cluster.waker(&channel),
            channel: channel.into(),
            cluster: cluster.clone(),
            head: tokio::sync::Mutex::new(()),
            waiting: AtomicUsize::new(0),
            ttl,
        }
    }

    /// One round trip: a lease if fewer than `limit` are held in the fleet.
    pub(crate) async fn try_acquire(&self, limit: usize) -> Attempt {
        let id = self.cluster.lease_id();
        let ttl_ms = millis(self.ttl);
        let answer = self
            .cluster
            .call(|mut redis| async move {
                ACQUIRE_SCRIPT
                    .key(&*self.key)
                    .key(&*self.waiting_key)
                    .arg(&id)
                    .arg(limit)
                    .arg(ttl_ms)
                    .invoke_async::<(u8, u64)>(&mut redis)
                    .await
                    .map(|answer| (answer, id))
            })
            .await;
        match answer {
            None => Attempt::Unavailable,
            Some(((1, _), id)) => Attempt::Granted(self.lease(id)),
            Some(((_, wait_ms), _)) => Attempt::Busy(Duration::from_millis(wait_ms)),
        }
    }

    /// The fast path of a request that found a local slot: one try, unless local
    /// requests are waiting for a lease already (`None`: queue up behind them). Fast
    /// paths run side by side, so an idle fleet adds one round trip per request and no
    /// queueing.
    pub(crate) async fn try_first(&self, limit: usize) -> Option<Attempt> {
        if self.waiting.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.try_acquire(limit).await)
    }

    /// Waits, first in line locally, for a lease under the current `limit()`. `None` when
    /// Redis is unavailable: the caller goes on with its local slot.
    pub(crate) async fn acquire(&self, limit: impl Fn() -> usize) -> Option<Lease> {
        let _waiting = Waiting::count(&self.waiting);
        let _head = self.head.lock().await;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the try: a release published meanwhile is not lost.
            released.as_mut().enable();
            match self.try_acquire(limit()).await {
                Attempt::Granted(lease) => return Some(lease),
                Attempt::Unavailable => return None,
                Attempt::Busy(wait) => {
                    let wait = if self.cluster.is_subscribed() {
                        wait
                    } else {
                        wait.min(UNSUBSCRIBED_RECHECK)
                    };
                    tokio::select! {
                        () = released => {}
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    fn lease(&self, id: String) -> Lease {
        let renewal = tokio::spawn(renew(
            self.cluster.clone(),
            Arc::clone(&self.key),
            id.clone(),
            self.ttl,
        ));
        Lease {
            cluster: self.cluster.clone(),
            key: Arc::clone(&self.key),
            waiting_key: Arc::clone(&self.waiting_key),
            channel: Arc::clone(&self.channel),
            id,
            renewal,
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Renews the lease every third of its TTL until aborted.
async fn renew(cluster: Cluster, key: Arc<str>, id: String, ttl: Duration) {
    let mut every = tokio::time::interval(ttl / 3);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let renewed = cluster
            .call_in_background(|mut redis| {
                let (key, id) = (&key, &id);
                async move {
                    RENEW_SCRIPT
                        .key(&**key)
                        .arg(id)
                        .arg(millis(ttl))
                        .invoke_async::<u8>(&mut redis)
                        .await
                }
            })
            .await;
        if renewed.is_none() {
            tracing::debug!("Lease renewal failed; the request goes on, retrying later.");
        }
    }
}

/// A fleet-wide slot: renewed while held, released (and announced) when dropped.
#[derive(Debug)]
pub(crate) struct Lease {
    cluster: Cluster,
    key: Arc<str>,
    waiting_key: Arc<str>,
    channel: Arc<str>,
    id: String,
    renewal: tokio::task::JoinHandle<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
        let (cluster, key, waiting_key, channel) = (
            self.cluster.clone(),
            Arc::clone(&self.key),
            Arc::clone(&self.waiting_key),
            Arc::clone(&self.channel),
        );
        let id = std::mem::take(&mut self.id);
        // Without a runtime (process exit) the lease expires by itself.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                cluster
                    .call_in_background(|mut redis| async move {
                        RELEASE_SCRIPT
                            .key(&*key)
                            .key(&*waiting_key)
                            .arg(&id)
                            .arg(&*channel)
                            .invoke_async::<u8>(&mut redis)
                            .await
                    })
                    .await;
            });
        }
    }
}

#[cfg(test)]
mod tests;
