//! Per-route `upstream_rate_limit: N/P`: at most N requests sent upstream in any window of
//! length P, kept across configuration reloads.
//!
//! Business Central counts 6,000 requests per app registration in a 5-minute *sliding*
//! window and answers 429 beyond (Microsoft Learn, "Operational limits for Business Central
//! online"). A token bucket does not meet that: with the whole allowance as its burst it
//! lets N through at once and then N more over the next P, up to 2N in one window. So the
//! proxy keeps what the window is made of, the instants of the last N sends: a request may
//! go when fewer than N were sent within the last P, else it waits until the oldest of
//! them leaves the window — exactly that long, no polling. Callers wait in arrival order
//! (the head of the line sleeps, the rest wait behind it), at most `max_queue` of them and
//! each for at most `queue_timeout` (counted from when it started waiting for the route's
//! queue) and never past the route's deadline; a caller whose turn would come too late is
//! answered 503 with `Retry-After` at once (or when its wait runs out behind others).
//!
//! What counts: every request the upstream receives, each resend included (an upstream
//! 401 renewing the token, a `retry_on_429` replay): the upstream counts them, so each
//! takes its own turn. The send instant is taken after the caller's turn came, right before
//! the request leaves; a request's time on the wire to the upstream is not part of it.
//!
//! A window belongs to the running proxy, not to one configuration: [`UpstreamRates`]
//! keeps them by route prefix, as the route queues are kept, so a reload neither forgets
//! the sends in the window (and lets another N through) nor reorders the waiters. A changed
//! limit applies at once to the instants already recorded; a lower N keeps the latest N.
//!
//! With `cluster`, the window is the fleet's: the head of each replica's line asks Redis
//! (`cluster::rates`, a sliding log of the fleet's sends, one round trip) and sleeps
//! exactly as long as Redis says the fleet's window is full; the other waiters of the
//! replica stay in line behind it. When Redis cannot answer, the replica decides by its
//! own window (which records every send of the replica, so it is current when needed):
//! N per P per replica until Redis is back.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::{Instant, sleep_until, timeout_at};

use super::by_route::ByRoute;
use crate::cluster::Cluster;
use crate::cluster::rates::{SendLog, Turn};
use crate::config::{RateLimit, Route};
use crate::waiting::Waiting;

/// Why a request was not sent upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RateError {
    #[error("the route's queue is full ({0} waiting for the upstream rate limit)")]
    Full(usize),
    #[error(
        "the upstream rate limit would hold the request past its queue timeout or deadline (waited {waited:?})"
    )]
    TooLong {
        waited: Duration,
        /// When the route's rate will admit a request again, as far as known now.
        retry_after: Duration,
    },
}

/// A route's `upstream_rate_limit` and the bounds of its queue, as validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RateLimits {
    pub(crate) rate: RateLimit,
    pub(crate) max_queue: usize,
    pub(crate) timeout: Duration,
}

impl RateLimits {
    /// The route's limits when it sets `upstream_rate_limit`. Validation fills in
    /// `max_queue` and `queue_timeout` whenever it is set.
    pub(crate) fn of(route: &Route) -> Option<Self> {
        Some(Self {
            rate: route.upstream_rate_limit?,
            max_queue: route.max_queue?,
            timeout: route.queue_timeout?,
        })
    }
}

/// The upstream rate windows of a running proxy, by route prefix. A window lives as long
/// as a pipeline or a request uses it; the registry only finds it.
#[derive(Debug, Default)]
pub(crate) struct UpstreamRates {
    windows: ByRoute<UpstreamRate>,
    /// Fleet mode: the windows are the fleet's.
    cluster: Option<Cluster>,
}

impl UpstreamRates {
    pub(crate) fn new(cluster: Option<Cluster>) -> Self {
        Self {
            windows: ByRoute::default(),
            cluster,
        }
    }

    /// The window of the route `prefix`: the running one with `limits`, or a new one.
    pub(crate) fn route(&self, prefix: &str, limits: RateLimits) -> Arc<UpstreamRate> {
        self.windows.get_or_create(
            prefix,
            |running| running.reconfigure(limits),
            || {
                let mut rate = UpstreamRate::new(limits);
                rate.fleet = self.cluster.as_ref().map(|c| SendLog::new(c, prefix));
                rate
            },
        )
    }
}

/// The instants of the last sends, at most `rate.requests` of them, oldest first.
#[derive(Debug)]
struct Window {
    limits: RateLimits,
    sent: VecDeque<Instant>,
}

impl Window {
    /// When the next request may be sent: `None` when it may go now (fewer than N sent
    /// within the last P), else when the oldest of the last N leaves the window.
    fn next_send(&self, now: Instant) -> Option<Instant> {
        let n = self.limits.rate.requests as usize;
        if self.sent.len() < n {
            return None;
        }
        let free = self.sent[self.sent.len() - n] + self.limits.rate.per;
        (free > now).then_some(free)
    }

    fn record(&mut self, now: Instant) {
        self.sent.push_back(now);
        self.trim();
    }

    fn trim(&mut self) {
        let n = self.limits.rate.requests as usize;
        while self.sent.len() > n {
            self.sent.pop_front();
        }
    }
}

/// One route's upstream rate limiter.
#[derive(Debug)]
pub(crate) struct UpstreamRate {
    /// The line: its holder is the next request to send and sleeps until its turn; the
    /// others wait for it in arrival order (tokio's mutex is fair).
    line: tokio::sync::Mutex<()>,
    window: Mutex<Window>,
    queued: AtomicUsize,
    /// Fleet mode: the fleet's log of sends on this route.
    fleet: Option<SendLog>,
}

impl UpstreamRate {
    pub(crate) fn new(limits: RateLimits) -> Self {
        Self {
            line: tokio::sync::Mutex::new(()),
            window: Mutex::new(Window {
                limits,
                sent: VecDeque::new(),
            }),
            queued: AtomicUsize::new(0),
            fleet: None,
        }
    }

    /// Requests waiting for their turn right now.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies a reload's limits to the recorded sends. Waiters keep their place.
    fn reconfigure(&self, limits: RateLimits) {
        let mut window = self.window();
        window.limits = limits;
        window.trim();
    }

    /// Waits for the request's turn to be sent, in arrival order, and records the send.
    /// `waiting_since` is when the request started waiting in the route's queue (for a
    /// concurrency slot, or for this); `queue_timeout` counts from then. Returns how long
    /// the request waited for its turn (zero when it had not to).
    pub(crate) async fn admit(
        &self,
        waiting_since: Instant,
        deadline: Instant,
    ) -> Result<Duration, RateError> {
        let started = Instant::now();
        let RateLimits {
            max_queue, timeout, ..
        } = self.window().limits;
        let until = deadline.min(waiting_since + timeout);
        let mut waiting = None;
        let _line = match self.line.try_lock() {
            Ok(line) => line,
            Err(_) => {
                waiting = Some(Waiting::enter(&self.queued, max_queue).map_err(RateError::Full)?);
                match timeout_at(until, self.line.lock()).await {
                    Ok(line) => line,
                    Err(_) => {
                        let now = Instant::now();
                        let next = self.window().next_send(now);
                        return Err(RateError::TooLong {
                            waited: started.elapsed(),
                            retry_after: next.map_or(Duration::ZERO, |at| at - now),
                        });
                    }
                }
            }
        };
        // The head of the line.
        loop {
            let next = self.try_send().await;
            let now = Instant::now();
            let Some(at) = next else {
                // Zero unless it waited: the round trip to Redis is not a wait.
                return Ok(waiting.map_or(Duration::ZERO, |_| now - started));
            };
            if at > until {
                return Err(RateError::TooLong {
                    waited: now - started,
                    retry_after: at - now,
                });
            }
            if waiting.is_none() {
                waiting = Some(Waiting::enter(&self.queued, max_queue).map_err(RateError::Full)?);
            }
            sleep_until(at).await;
        }
    }

    /// Sends now (recording it) or says when the window will have room: the fleet's
    /// window when Redis answers, else this replica's.
    async fn try_send(&self) -> Option<Instant> {
        if let Some(fleet) = &self.fleet {
            let limit = self.window().limits.rate;
            match fleet.try_send(limit).await {
                Some(Turn::Now) => {
                    self.window().record(Instant::now());
                    return None;
                }
                Some(Turn::After(wait)) => return Some(Instant::now() + wait),
                // Redis cannot say: this replica's window decides.
                None => {}
            }
        }
        let now = Instant::now();
        let mut window = self.window();
        let next = window.next_send(now);
        if next.is_none() {
            window.record(now);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(requests: u32, per_s: u64, max_queue: usize, timeout_s: u64) -> RateLimits {
        RateLimits {
            rate: RateLimit {
                requests,
                per: Duration::from_secs(per_s),
            },
            max_queue,
            timeout: Duration::from_secs(timeout_s),
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// Sends `count` requests through `rate` at once, each in its own task started in
    /// order; returns the instants they were admitted, in arrival order.
    async fn burst(rate: &Arc<UpstreamRate>, count: usize) -> Vec<Result<Instant, RateError>> {
        let tasks: Vec<_> = (0..count)
            .map(|_| {
                let rate = Arc::clone(rate);
                tokio::spawn(async move {
                    rate.admit(Instant::now(), far()).await?;
                    Ok(Instant::now())
                })
            })
            .collect();
        let mut admitted = Vec::new();
        for task in tasks {
            admitted.push(task.await.unwrap());
        }
        admitted
    }

    /// The most instants of `sent` within any window of length `per` (sorted input).
    fn busiest_window(sent: &[Instant], per: Duration) -> usize {
        (0..sent.len())
            .map(|i| sent[i..].iter().take_while(|t| **t < sent[i] + per).count())
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn no_window_of_length_p_holds_more_than_n_sends() {
        let rate = Arc::new(UpstreamRate::new(limits(4, 2, 100, 600)));
        let start = Instant::now();
        let sent: Vec<Instant> = burst(&rate, 13)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert!(sent.windows(2).all(|w| w[0] <= w[1]), "arrival order");
        assert_eq!(busiest_window(&sent, Duration::from_secs(2)), 4);
        // The first 4 at once, then each group exactly when the oldest leaves: no more
        // waiting than the window demands.
        let offsets: Vec<u64> = sent.iter().map(|t| (*t - start).as_secs()).collect();
        assert_eq!(offsets, [0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6]);
        assert_eq!(rate.queued(), 0);
    }

    /// Sends spread out fill the window as they came: a request waits for the oldest of
    /// the last N, not for a period boundary (a fixed window would let 2N through around
    /// its boundary; a token bucket with burst N likewise).
    #[tokio::test(start_paused = true)]
    async fn the_window_slides_with_the_sends() {
        let rate = Arc::new(UpstreamRate::new(limits(3, 10, 100, 600)));
        let start = Instant::now();
        for at in [0, 4, 9] {
            tokio::time::sleep_until(start + Duration::from_secs(at)).await;
            assert_eq!(rate.admit(Instant::now(), far()).await, Ok(Duration::ZERO));
        }
        // At 9 s: the next may go at 10 s (the send at 0 s leaves), the one after at 14 s.
        let waited = rate.admit(Instant::now(), far()).await.unwrap();
        assert_eq!(waited, Duration::from_secs(1));
        let waited = rate.admit(Instant::now(), far()).await.unwrap();
        assert_eq!(waited, Duration::from_secs(4));
        assert_eq!(Instant::now() - start, Duration::from_secs(14));
    }

    #[tokio::test(start_paused = true)]
    async fn a_turn_that_comes_too_late_is_refused_at_once_with_its_retry_after() {
        let rate = Arc::new(UpstreamRate::new(limits(2, 60, 100, 600)));
        for _ in 0..2 {
            rate.admit(Instant::now(), far()).await.unwrap();
        }
        let soon = Instant::now() + Duration::from_secs(30);
        let refused = rate.admit(Instant::now(), soon).await.unwrap_err();
        assert_eq!(
            refused,
            RateError::TooLong {
                waited: Duration::ZERO,
                retry_after: Duration::from_secs(60)
            },
            "the deadline comes before the turn: no point in waiting"
        );
        // `queue_timeout` counts from when the request started waiting in the queue.
        let since = Instant::now() - Duration::from_secs(550);
        assert!(matches!(
            rate.admit(since, far()).await,
            Err(RateError::TooLong { .. })
        ));
        assert_eq!(rate.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_behind_the_head_time_out_and_the_queue_is_bounded() {
        let rate = Arc::new(UpstreamRate::new(limits(1, 100, 2, 600)));
        rate.admit(Instant::now(), far()).await.unwrap();
        let head = tokio::spawn({
            let rate = Arc::clone(&rate);
            async move { rate.admit(Instant::now(), far()).await }
        });
        tokio::task::yield_now().await;
        let behind = tokio::spawn({
            let rate = Arc::clone(&rate);
            let soon = Instant::now() + Duration::from_secs(150);
            async move { rate.admit(Instant::now(), soon).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(rate.queued(), 2);
        assert_eq!(
            rate.admit(Instant::now(), far()).await,
            Err(RateError::Full(2))
        );
        assert_eq!(head.await.unwrap(), Ok(Duration::from_secs(100)));
        // Behind the head, its turn (at 200 s) is after its deadline (150 s).
        assert!(matches!(
            behind.await.unwrap(),
            Err(RateError::TooLong { .. })
        ));
        assert_eq!(rate.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn no_queue_means_refused_when_the_window_is_full() {
        let rate = Arc::new(UpstreamRate::new(limits(1, 10, 0, 600)));
        rate.admit(Instant::now(), far()).await.unwrap();
        assert_eq!(
            rate.admit(Instant::now(), far()).await,
            Err(RateError::Full(0))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_hanging_up_gives_its_turn_to_the_next() {
        let rate = Arc::new(UpstreamRate::new(limits(1, 10, 10, 600)));
        rate.admit(Instant::now(), far()).await.unwrap();
        let head = tokio::spawn({
            let rate = Arc::clone(&rate);
            async move { rate.admit(Instant::now(), far()).await }
        });
        tokio::task::yield_now().await;
        head.abort();
        assert!(head.await.unwrap_err().is_cancelled());
        assert_eq!(rate.queued(), 0);
        assert_eq!(
            rate.admit(Instant::now(), far()).await,
            Ok(Duration::from_secs(10)),
            "the aborted request was not counted as sent"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_the_sends_in_the_window() {
        let rates = UpstreamRates::default();
        let rate = rates.route("/bc/", limits(3, 10, 100, 600));
        for _ in 0..3 {
            rate.admit(Instant::now(), far()).await.unwrap();
        }
        let again = rates.route("/bc/", limits(3, 10, 100, 600));
        assert!(Arc::ptr_eq(&rate, &again));
        assert_eq!(
            again.admit(Instant::now(), far()).await,
            Ok(Duration::from_secs(10)),
            "a reload does not refill the window"
        );

        // Lower N: the latest sends count, at once.
        let lower = rates.route("/bc/", limits(1, 10, 100, 600));
        assert_eq!(
            lower.admit(Instant::now(), far()).await,
            Ok(Duration::from_secs(10))
        );
        // A longer period applies to the sends already recorded.
        let longer = rates.route("/bc/", limits(1, 30, 100, 600));
        assert_eq!(
            longer.admit(Instant::now(), far()).await,
            Ok(Duration::from_secs(30))
        );

        drop((rate, again, lower, longer));
        let fresh = rates.route("/bc/", limits(1, 30, 100, 600));
        assert_eq!(fresh.admit(Instant::now(), far()).await, Ok(Duration::ZERO));
        assert_eq!(rates.windows.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_fleets_window_decides_and_the_replicas_own_while_redis_is_gone() {
        use crate::test_support::{RedisServer, available, fleet};
        let Some(mut redis) = RedisServer::start() else {
            return;
        };
        let clusters = fleet(&redis.url(), 2);
        available(&clusters).await;
        let replicas: Vec<Arc<UpstreamRate>> = clusters
            .iter()
            .map(|c| UpstreamRates::new(Some(c.clone())).route("/bc/", limits(2, 60, 10, 600)))
            .collect();
        let soon = || Instant::now() + Duration::from_secs(5);
        for replica in &replicas {
            assert_eq!(
                replica.admit(Instant::now(), far()).await,
                Ok(Duration::ZERO)
            );
        }
        // Each replica sent one: its own window has room, the fleet's does not.
        let refused = replicas[0].admit(Instant::now(), soon()).await;
        assert!(
            matches!(refused, Err(RateError::TooLong { retry_after, .. })
                if retry_after > Duration::from_secs(55)),
            "{refused:?}"
        );

        // Redis gone: the replica's own window decides, N per P for this replica.
        redis.kill();
        assert_eq!(
            replicas[0].admit(Instant::now(), soon()).await,
            Ok(Duration::ZERO)
        );
        assert!(matches!(
            replicas[0].admit(Instant::now(), soon()).await,
            Err(RateError::TooLong { .. })
        ));

        // Back (empty): the fleet's log decides again, though this replica's own window
        // is full.
        assert!(!clusters[0].is_available());
        redis.restart();
        available(&clusters[..1]).await;
        assert_eq!(
            replicas[0].admit(Instant::now(), soon()).await,
            Ok(Duration::ZERO)
        );
        assert_eq!(
            redis.integer(&["ZCARD", &clusters[0].key(&["upstream_rate", "/bc/"])]),
            Some(1)
        );
    }
}
