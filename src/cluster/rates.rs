//! Fleet-wide rates: a route's `upstream_rate_limit` and each client's `rate_limit`, each
//! one atomic Lua script, one round trip per request, timed by Redis's clock (`TIME`, so
//! the replicas' clocks do not matter).
//!
//! **`upstream_rate_limit: N/P` is a sliding log** ([`SEND`]): a sorted set per route
//! (`{key_prefix}:upstream_rate:{route}`) of the fleet's send instants. The script trims
//! what is P old, admits (and logs) the send when fewer than N remain, and otherwise
//! answers how long until the oldest that must leave does — the caller sleeps exactly
//! that long. Exactness is the contract: Business Central counts a true sliding window,
//! and a sliding-window *counter* (two fixed windows, the previous one weighted by its
//! overlap) only estimates it — it assumes the previous window's requests were spread
//! evenly, so a burst at that window's end lets more than N through in some window of
//! length P. The log's cost is N entries per route (6,000 for BC: a few hundred KiB) and
//! O(log N) per request, which is small.
//!
//! **A client's `rate_limit` is GCRA** ([`ADMIT`]): the documented token bucket (the
//! whole allowance as burst, refilled at N per P) as one theoretical arrival time per
//! client (`{key_prefix}:client_rate:{client}`), O(1) memory, the same arithmetic as the
//! local limiter in `inbound::throttle`.
//!
//! Both read `TIME` before writing, which Redis allows since 5.0 (scripts replicate their
//! effects, not themselves), so any 6.x/7.x or Valkey runs them.
//!
//! Both answer `None` when Redis cannot be asked ([`Cluster::call`]): the caller uses its
//! local limiter, and the fleet limits resume with Redis. Keys expire once they no longer
//! hold anything that counts. A Redis that restarts empty forgets the fleet's log and
//! buckets: the next window starts afresh.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::Cluster;
use crate::config::RateLimit;

/// KEYS[1]: the route's log of sends; ARGV: N, P (µs), a member id unique in the fleet.
/// Answers 0 (sent now, logged) or the µs until the window has room.
const SEND: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count < n then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1000)
  return 0
end
-- Room comes when all but n - 1 of the logged sends have left: the (count - n)-th oldest
-- (from 0) leaves last of those. More than n are logged only after N was lowered.
local leaving = redis.call('ZRANGE', KEYS[1], count - n, count - n, 'WITHSCORES')
return math.max(tonumber(leaving[2]) + window - now, 1)
";

/// KEYS[1]: the client's theoretical arrival time (µs, Redis's clock); ARGV: the
/// interval between requests at the sustained rate (µs), the burst (µs). Answers 0
/// (admitted) or the µs until the next request is.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  tat = math.max(tonumber(stored), now)
end
local allowed_at = tat - burst
if allowed_at > now then
  return math.max(allowed_at - now, 1)
end
local next_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1000)
return 0
";

static SEND_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SEND));
static ADMIT_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ADMIT));

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// What the fleet said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Go: counted in the fleet's window (or bucket).
    Now,
    /// Not before this long.
    After(Duration),
}

impl Turn {
    fn of(micros: u64) -> Self {
        if micros == 0 {
            Self::Now
        } else {
            Self::After(Duration::from_micros(micros))
        }
    }
}

/// One route's fleet-wide log of sends.
#[derive(Debug)]
pub(crate) struct SendLog {
    cluster: Cluster,
    key: String,
}

impl SendLog {
    pub(crate) fn new(cluster: &Cluster, route: &str) -> Self {
        Self {
            cluster: cluster.clone(),
            key: cluster.key(&["upstream_rate", route]),
        }
    }

    /// One round trip: whether a request may be sent now under `limit` across the
    /// fleet (and if so it is logged), `None` when Redis cannot say.
    pub(crate) async fn try_send(&self, limit: RateLimit) -> Option<Turn> {
        let id = self.cluster.lease_id();
        let window = micros(limit.per);
        self.cluster
            .call(|mut redis| async move {
                SEND_SCRIPT
                    .key(&self.key)
                    .arg(limit.requests)
                    .arg(window)
                    .arg(id)
                    .invoke_async::<u64>(&mut redis)
                    .await
            })
            .await
            .map(Turn::of)
    }
}

/// One client's fleet-wide GCRA bucket.
#[derive(Debug)]
pub(crate) struct FleetBucket {
    cluster: Cluster,
    key: String,
}

impl FleetBucket {
    pub(crate) fn new(cluster: &Cluster, client: &str) -> Self {
        Self {
            cluster: cluster.clone(),
            key: cluster.key(&["client_rate", client]),
        }
    }

    /// One round trip: takes one request from the client's allowance across the fleet,
    /// `None` when Redis cannot say.
    pub(crate) async fn try_admit(&self, limit: RateLimit) -> Option<Turn> {
        let (interval, burst) = limit.gcra();
        let (interval, burst) = (micros(interval).max(1), micros(burst));
        self.cluster
            .call(|mut redis| async move {
                ADMIT_SCRIPT
                    .key(&self.key)
                    .arg(interval)
                    .arg(burst)
                    .invoke_async::<u64>(&mut redis)
                    .await
            })
            .await
            .map(Turn::of)
    }
}

#[cfg(test)]
mod tests;
