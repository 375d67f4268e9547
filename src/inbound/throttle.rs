//! Abuse resistance: failed-authentication lockout per source address, and per-client
//! request rate limits.
//!
//! Both answer 429 with `Retry-After`. Both keep a bounded amount of state: the lockout
//! table never grows beyond [`MAX_TRACKED`] sources and forgets them in time order (a
//! queue of window starts, so each failure costs amortised constant time however full the
//! table is, and a flood of fresh addresses evicts the oldest windows first); rate limits
//! are one bucket per configured client. An IPv6 source is counted by its /64, the
//! smallest block an end site is assigned (RFC 6177): one host owns billions of addresses
//! in it.
//!
//! [`Throttles`] holds this state for the running proxy, so a reload neither lifts a
//! lockout nor refills a bucket: buckets are kept by client name, a client whose
//! `rate_limit` changed keeps the share of its allowance it had used, and the bucket of a
//! client that is gone (or no longer limited) is dropped.
//!
//! With `cluster`, a client's `rate_limit` holds for the whole fleet: [`RateLimiter::admit`]
//! asks Redis first (`cluster::rates`, the same GCRA as here, one round trip, Redis's
//! clock) and uses the local bucket only when Redis cannot answer, until it can again.
//! The local bucket is charged for every request the fleet admits, so it is current when
//! it has to decide. The failed-authentication lockout stays per replica.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::cluster::rates::{FleetBucket, Turn};
use crate::config::{Client, RateLimit};

/// Failed authentications from one source within [`WINDOW`] before it is locked out.
pub(crate) const MAX_FAILURES: u32 = 30;
/// The counting window, and how long a lockout lasts.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Most sources tracked at once; beyond, the oldest windows are dropped first.
const MAX_TRACKED: usize = 100_000;

/// Throttling state that outlives a configuration (see the module header).
#[derive(Debug, Default)]
pub(crate) struct Throttles {
    failures: Arc<FailedAuthLimiter>,
    /// The running buckets, by client name.
    rate_limits: Mutex<HashMap<String, Arc<RateLimiter>>>,
    /// Fleet mode: the buckets are the fleet's.
    cluster: Option<Cluster>,
}

impl Throttles {
    pub(crate) fn new(cluster: Option<Cluster>) -> Self {
        Self {
            cluster,
            ..Self::default()
        }
    }

    /// The failed-authentication table: one for the proxy's whole life.
    pub(crate) fn failures(&self) -> Arc<FailedAuthLimiter> {
        Arc::clone(&self.failures)
    }

    /// The rate-limit buckets of `clients`, in their order: the running bucket of a
    /// client that had one (with its new `rate_limit`), a full one for a client that did
    /// not. Buckets of clients not in `clients` are forgotten.
    pub(crate) fn rate_limiters(&self, clients: &[Client]) -> Vec<Option<Arc<RateLimiter>>> {
        let mut running = self
            .rate_limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut kept = HashMap::new();
        let limiters = clients
            .iter()
            .map(|client| {
                let limit = client.rate_limit?;
                let limiter = match running.remove(&client.name) {
                    Some(limiter) => {
                        limiter.reconfigure(limit);
                        limiter
                    }
                    None => Arc::new(RateLimiter {
                        fleet: self
                            .cluster
                            .as_ref()
                            .map(|cluster| FleetBucket::new(cluster, &client.name)),
                        ..RateLimiter::new(limit)
                    }),
                };
                kept.insert(client.name.clone(), Arc::clone(&limiter));
                Some(limiter)
            })
            .collect();
        *running = kept;
        limiters
    }
}

/// What failures are counted against: an IPv4 address, or the /64 of an IPv6 address
/// (an IPv4-mapped IPv6 address is its IPv4 address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Source(IpAddr);

impl Source {
    fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => Self(IpAddr::V6(Ipv6Addr::from(
                u128::from(v6) & !(u128::from(u64::MAX)),
            ))),
            v4 @ IpAddr::V4(_) => Self(v4),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => v4.fmt(f),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    since: Instant,
    count: u32,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<Source, Failures>,
    /// `(since, source)` for every window (or lockout) started, oldest first: the order
    /// in which entries expire. A record whose `since` is no longer its entry's is stale
    /// and skipped.
    starts: VecDeque<(Instant, Source)>,
    /// Records looked at while expiring and evicting: what a failure costs.
    #[cfg(test)]
    visited: usize,
}

impl Table {
    /// Drops the oldest record; removes its entry when the record is the entry's current
    /// window. Returns whether it removed an entry.
    fn pop_oldest(&mut self) -> bool {
        let Some((since, source)) = self.starts.pop_front() else {
            return false;
        };
        #[cfg(test)]
        {
            self.visited += 1;
        }
        let current = self
            .entries
            .get(&source)
            .is_some_and(|entry| entry.since == since);
        if current {
            self.entries.remove(&source);
        }
        current
    }

    /// Forgets every window that ended by `now`.
    fn expire(&mut self, now: Instant) {
        while self
            .starts
            .front()
            .is_some_and(|(since, _)| now.saturating_duration_since(*since) >= WINDOW)
        {
            self.pop_oldest();
        }
    }

    /// Makes room for one more entry: drops the oldest live window.
    fn evict_oldest(&mut self) {
        while !self.starts.is_empty() && !self.pop_oldest() {}
    }

    /// Starts a window (or a lockout) for `source` at `now`.
    fn start(&mut self, source: Source, now: Instant) {
        self.starts.push_back((now, source));
        self.entries
            .entry(source)
            .or_insert(Failures {
                since: now,
                count: 0,
            })
            .since = now;
    }
}

/// Counts failed authentications per source and locks a source out for [`WINDOW`] once
/// it reached [`MAX_FAILURES`] — long enough to make password guessing useless, short
/// enough that a misconfigured scanner behind the same NAT does not shut out its
/// neighbours for long.
#[derive(Debug)]
pub(crate) struct FailedAuthLimiter {
    table: Mutex<Table>,
    epoch: Instant,
    /// No source is locked out from this time on (milliseconds after `epoch`, rounded
    /// up): the latest end of any lockout so far. Before it, [`Self::check`] looks the
    /// source up; after it — nearly always — it needs neither the lock nor a lookup.
    lockouts_end_ms: AtomicU64,
}

impl Default for FailedAuthLimiter {
    fn default() -> Self {
        Self {
            table: Mutex::default(),
            epoch: Instant::now(),
            lockouts_end_ms: AtomicU64::new(0),
        }
    }
}

impl FailedAuthLimiter {
    /// `Err(retry_after)` while `ip` (its /64 for IPv6) is locked out.
    pub(crate) fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let now_ms = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_millis();
        if now_ms >= u128::from(self.lockouts_end_ms.load(Ordering::Relaxed)) {
            return Ok(());
        }
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        match table.entries.get(&Source::of(ip)) {
            Some(entry) if entry.count >= MAX_FAILURES => {
                let until = entry.since + WINDOW;
                let now = Instant::now();
                if now < until {
                    Err(until - now)
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// Records one failed authentication from `ip`.
    pub(crate) fn failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let source = Source::of(ip);
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.expire(now);
        if !table.entries.contains_key(&source) {
            if table.entries.len() >= MAX_TRACKED {
                table.evict_oldest();
            }
            table.start(source, now);
        }
        let Some(entry) = table.entries.get_mut(&source) else {
            return;
        };
        entry.count = entry.count.saturating_add(1);
        if entry.count == MAX_FAILURES {
            // The lockout runs a full window from the failure that triggered it.
            table.start(source, now);
            let end = (now + WINDOW).saturating_duration_since(self.epoch);
            let end_ms = u64::try_from(end.as_millis() + 1).unwrap_or(u64::MAX);
            self.lockouts_end_ms.fetch_max(end_ms, Ordering::Relaxed);
            tracing::warn!(source = %source, window_s = WINDOW.as_secs(), "Too many failed authentications; source locked out.");
        }
    }
}

/// A per-client request rate limit (GCRA: a token bucket of `requests` per `per`,
/// allowing a burst of the whole allowance).
#[derive(Debug)]
pub(crate) struct RateLimiter {
    state: Mutex<Gcra>,
    /// Fleet mode: the client's bucket in Redis.
    fleet: Option<FleetBucket>,
}

#[derive(Debug)]
struct Gcra {
    limit: RateLimit,
    /// Time between two requests at the sustained rate.
    interval: Duration,
    /// How far ahead of now the theoretical arrival time may run (the burst).
    burst: Duration,
    /// Theoretical arrival time of the next request.
    tat: Option<Instant>,
}

impl Gcra {
    fn new(limit: RateLimit, tat: Option<Instant>) -> Self {
        let (interval, burst) = limit.gcra();
        Self {
            limit,
            interval,
            burst,
            tat,
        }
    }
}

impl RateLimiter {
    pub(crate) fn new(limit: RateLimit) -> Self {
        Self {
            state: Mutex::new(Gcra::new(limit, None)),
            fleet: None,
        }
    }

    /// Takes one request from the client's allowance, or `Err(retry_after)`: the
    /// fleet's when Redis answers, else this replica's.
    pub(crate) async fn admit(&self) -> Result<(), Duration> {
        if let Some(fleet) = &self.fleet {
            let limit = self
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .limit;
            match fleet.try_admit(limit).await {
                Some(Turn::Now) => {
                    // Kept current for when Redis is gone; the fleet decided.
                    let _ = self.acquire();
                    return Ok(());
                }
                Some(Turn::After(retry_after)) => return Err(retry_after),
                None => {}
            }
        }
        self.acquire()
    }

    /// Takes one request from the local allowance, or `Err(retry_after)`.
    pub(crate) fn acquire(&self) -> Result<(), Duration> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let current = state.tat.map_or(now, |t| t.max(now));
        let allowed_at = current.checked_sub(state.burst).unwrap_or(now);
        if allowed_at > now {
            return Err(allowed_at - now);
        }
        state.tat = Some(current + state.interval);
        Ok(())
    }

    /// Switches to `limit`, keeping the share of the allowance in use: a client that had
    /// used half of `100/m` may send 50 more of `100/m`, or 100 more of `200/m`.
    fn reconfigure(&self, limit: RateLimit) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.limit == limit {
            return;
        }
        let now = Instant::now();
        // How far the arrival time runs ahead of now is the allowance in use: all of it
        // when it is a whole period ahead.
        let tat = state.tat.map(|tat| {
            let used = tat.saturating_duration_since(now).as_secs_f64()
                / state.limit.per.as_secs_f64().max(f64::MIN_POSITIVE);
            now + limit.per.mul_f64(used.clamp(0.0, 1.0))
        });
        *state = Gcra::new(limit, tat);
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
    const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 8));

    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    fn v6(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn tracked(limiter: &FailedAuthLimiter) -> usize {
        limiter.table.lock().unwrap().entries.len()
    }

    fn visited(limiter: &FailedAuthLimiter) -> usize {
        limiter.table.lock().unwrap().visited
    }

    #[tokio::test(start_paused = true)]
    async fn lockout_after_too_many_failures_then_released() {
        let limiter = FailedAuthLimiter::default();
        for _ in 0..MAX_FAILURES - 1 {
            limiter.failed(IP);
        }
        assert!(limiter.check(IP).is_ok());
        limiter.failed(IP);
        let retry = limiter.check(IP).unwrap_err();
        assert!(
            retry > Duration::from_secs(59) && retry <= WINDOW,
            "{retry:?}"
        );
        assert!(limiter.check(OTHER).is_ok(), "other sources are unaffected");
        tokio::time::advance(WINDOW).await;
        assert!(limiter.check(IP).is_ok(), "the lockout is not permanent");
        limiter.failed(IP);
        assert!(limiter.check(IP).is_ok(), "a new window starts from zero");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_spread_over_windows_never_lock() {
        let limiter = FailedAuthLimiter::default();
        for _ in 0..5 {
            for _ in 0..MAX_FAILURES - 1 {
                limiter.failed(IP);
            }
            tokio::time::advance(WINDOW).await;
        }
        assert!(limiter.check(IP).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_lockout_lasts_a_full_window_from_the_failure_that_triggered_it() {
        let limiter = FailedAuthLimiter::default();
        limiter.failed(IP);
        tokio::time::advance(Duration::from_secs(50)).await;
        for _ in 1..MAX_FAILURES {
            limiter.failed(IP);
        }
        // The window that counted them started 50 s ago; the lockout runs from now.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(limiter.check(IP).is_err(), "locked 30 s into the lockout");
        limiter.failed(OTHER); // expires what ended: not the lockout
        assert!(limiter.check(IP).is_err());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(limiter.check(IP).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn windows_expire_oldest_first() {
        let limiter = FailedAuthLimiter::default();
        limiter.failed(v4(1));
        tokio::time::advance(Duration::from_secs(30)).await;
        limiter.failed(v4(2));
        tokio::time::advance(Duration::from_secs(31)).await;
        limiter.failed(v4(3));
        let table = limiter.table.lock().unwrap();
        assert!(!table.entries.contains_key(&Source::of(v4(1))), "61 s old");
        assert!(table.entries.contains_key(&Source::of(v4(2))), "31 s old");
        assert!(table.entries.contains_key(&Source::of(v4(3))));
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded_and_drops_the_oldest_window_when_full() {
        let limiter = FailedAuthLimiter::default();
        for n in 0..MAX_TRACKED as u32 {
            limiter.failed(v4(n));
        }
        // The first source locks itself out a little later than the rest started.
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 1..MAX_FAILURES {
            limiter.failed(v4(0));
        }
        assert!(limiter.check(v4(0)).is_err());
        limiter.failed(v4(1_000_000));
        assert_eq!(tracked(&limiter), MAX_TRACKED);
        let table = limiter.table.lock().unwrap();
        assert!(
            !table.entries.contains_key(&Source::of(v4(1))),
            "the oldest window went"
        );
        assert!(
            table.entries.contains_key(&Source::of(v4(0))),
            "the recent lockout stayed"
        );
        assert!(table.entries.contains_key(&Source::of(v4(1_000_000))));
    }

    /// A failure costs the same with an empty table and with a full one (counted in
    /// records looked at, not timed): a flood of fresh addresses cannot make every
    /// failure scan the table while holding its lock.
    #[tokio::test(start_paused = true)]
    async fn a_failure_costs_constant_work_however_full_the_table_is() {
        let limiter = FailedAuthLimiter::default();
        for n in 0..1_000 {
            limiter.failed(v4(n));
        }
        let small = visited(&limiter);
        for n in 1_000..MAX_TRACKED as u32 {
            limiter.failed(v4(n));
        }
        assert_eq!(tracked(&limiter), MAX_TRACKED);

        // Full of live windows: each new source evicts one.
        let before = visited(&limiter);
        for n in 0..1_000 {
            limiter.failed(v4(2_000_000 + n));
        }
        let full = visited(&limiter) - before;
        assert!(full <= 2 * 1_000, "{full} records for 1000 failures");
        assert_eq!(tracked(&limiter), MAX_TRACKED);

        // Every window over: the next failure expires them all once, the ones after
        // it nothing.
        tokio::time::advance(WINDOW).await;
        limiter.failed(v4(3_000_000));
        let before = visited(&limiter);
        for n in 1..1_000 {
            limiter.failed(v4(3_000_000 + n));
        }
        assert_eq!(visited(&limiter) - before, 0);
        assert_eq!(tracked(&limiter), 1_000);
        assert_eq!(small, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_failures_count_per_64() {
        let limiter = FailedAuthLimiter::default();
        // One attacker, a new address for every guess.
        for n in 0..MAX_FAILURES {
            limiter.failed(v6(&format!("2001:db8:1:2::{n:x}")));
        }
        assert!(limiter.check(v6("2001:db8:1:2:ffff::1")).is_err());
        assert!(limiter.check(v6("2001:db8:1:3::1")).is_ok(), "another /64");
        assert_eq!(tracked(&limiter), 1);
        assert_eq!(
            Source::of(v6("2001:db8:1:2::7")).to_string(),
            "2001:db8:1:2::/64"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ipv4_mapped_addresses_count_as_their_ipv4_address() {
        let limiter = FailedAuthLimiter::default();
        for _ in 0..MAX_FAILURES {
            limiter.failed(v6("::ffff:192.0.2.7"));
        }
        assert!(limiter.check(IP).is_err());
        assert!(limiter.check(OTHER).is_ok(), "not all of ::ffff:0:0/96");
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_allows_the_burst_then_the_sustained_rate() {
        let limiter = RateLimiter::new(RateLimit {
            requests: 10,
            per: Duration::from_secs(1),
        });
        for i in 0..10 {
            assert!(limiter.acquire().is_ok(), "request {i} of the burst");
        }
        let retry = limiter.acquire().unwrap_err();
        assert!(retry <= Duration::from_millis(100), "{retry:?}");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(limiter.acquire().is_ok());
        assert!(limiter.acquire().is_err());
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..10 {
            assert!(limiter.acquire().is_ok());
        }
        assert!(limiter.acquire().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn business_central_quota_form() {
        // 6000/5m: one request per 50 ms sustained, a burst of 6000.
        let limiter = RateLimiter::new(RateLimit {
            requests: 6000,
            per: Duration::from_secs(300),
        });
        for _ in 0..6000 {
            assert!(limiter.acquire().is_ok());
        }
        assert!(limiter.acquire().is_err());
        tokio::time::advance(Duration::from_millis(50)).await;
        assert!(limiter.acquire().is_ok());
    }

    fn client(name: &str, rate_limit: Option<&str>) -> Client {
        Client {
            name: name.to_owned(),
            basic: None,
            api_key: None,
            networks: Vec::new(),
            rate_limit: rate_limit.map(|text| {
                let (requests, per) = text.split_once("/m").map(|(n, _)| (n, 60)).unwrap();
                RateLimit {
                    requests: requests.parse().unwrap(),
                    per: Duration::from_secs(per),
                }
            }),
            certificate: None,
        }
    }

    fn allowed(limiter: &RateLimiter) -> usize {
        std::iter::from_fn(|| limiter.acquire().ok())
            .take(1_000)
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn buckets_are_kept_by_client_name_across_configurations() {
        let throttles = Throttles::default();
        let first = throttles.rate_limiters(&[client("a", Some("10/m")), client("b", None)]);
        let a = first[0].as_ref().unwrap();
        assert_eq!(allowed(a), 10);

        // Same limit, other position: the same, empty bucket.
        let second = throttles.rate_limiters(&[client("c", None), client("a", Some("10/m"))]);
        assert!(Arc::ptr_eq(a, second[1].as_ref().unwrap()));
        assert_eq!(allowed(second[1].as_ref().unwrap()), 0);
        assert!(second[0].is_none());

        // Removed, then back: a new bucket.
        throttles.rate_limiters(&[client("c", None)]);
        let back = throttles.rate_limiters(&[client("a", Some("10/m"))]);
        assert_eq!(allowed(back[0].as_ref().unwrap()), 10);

        // No longer limited, then limited again: a new bucket too.
        throttles.rate_limiters(&[client("a", None)]);
        let again = throttles.rate_limiters(&[client("a", Some("10/m"))]);
        assert_eq!(allowed(again[0].as_ref().unwrap()), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_rate_limit_keeps_the_share_in_use() {
        let throttles = Throttles::default();
        let first = throttles.rate_limiters(&[client("a", Some("10/m"))]);
        let a = first[0].as_ref().unwrap();
        for _ in 0..5 {
            a.acquire().unwrap();
        }
        let doubled = throttles.rate_limiters(&[client("a", Some("20/m"))]);
        assert_eq!(allowed(doubled[0].as_ref().unwrap()), 10, "half of 20 left");

        let halved = throttles.rate_limiters(&[client("a", Some("4/m"))]);
        assert_eq!(allowed(halved[0].as_ref().unwrap()), 0, "all of it in use");
        tokio::time::advance(Duration::from_secs(15)).await;
        assert_eq!(allowed(halved[0].as_ref().unwrap()), 1, "one per 15 s");
    }
}
