//! Abuse resistance: failed-authentication lockout per source address, and per-client
//! request rate limits.
//!
//! Both answer 429 with `Retry-After`. Both keep a bounded amount of state: the lockout
//! table forgets addresses whose window has passed and never grows beyond
//! [`MAX_TRACKED`] entries; rate limits are one cell per configured client.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::RateLimit;

/// Failed authentications from one address within [`WINDOW`] before it is locked out.
pub(crate) const MAX_FAILURES: u32 = 30;
/// The counting window, and how long a lockout lasts.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Most addresses tracked at once; beyond, the oldest windows are dropped first.
const MAX_TRACKED: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Failures {
    since: Instant,
    count: u32,
}

/// Counts failed authentications per source address and locks an address out for
/// [`WINDOW`] once it reached [`MAX_FAILURES`] — long enough to make password guessing
/// useless, short enough that a misconfigured scanner behind the same NAT does not shut
/// out its neighbours for long.
#[derive(Debug)]
pub(crate) struct FailedAuthLimiter {
    table: Mutex<HashMap<IpAddr, Failures>>,
    epoch: Instant,
    /// No address is locked out from this time on (milliseconds after `epoch`, rounded
    /// up): the latest end of any lockout so far. Before it, [`Self::check`] looks the
    /// address up; after it — nearly always — it needs neither the lock nor a lookup.
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
    /// `Err(retry_after)` while `ip` is locked out.
    pub(crate) fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let now_ms = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_millis();
        if now_ms >= u128::from(self.lockouts_end_ms.load(Ordering::Relaxed)) {
            return Ok(());
        }
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        match table.get(&ip) {
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
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() >= MAX_TRACKED && !table.contains_key(&ip) {
            table.retain(|_, entry| now.duration_since(entry.since) < WINDOW);
            if table.len() >= MAX_TRACKED {
                // Still full of live windows: drop the oldest.
                if let Some(oldest) = table.iter().min_by_key(|(_, e)| e.since).map(|(ip, _)| *ip) {
                    table.remove(&oldest);
                }
            }
        }
        let entry = table.entry(ip).or_insert(Failures {
            since: now,
            count: 0,
        });
        if now.duration_since(entry.since) >= WINDOW {
            *entry = Failures {
                since: now,
                count: 0,
            };
        }
        entry.count = entry.count.saturating_add(1);
        if entry.count == MAX_FAILURES {
            // The lockout runs a full window from the failure that triggered it.
            entry.since = now;
            let end = (now + WINDOW).saturating_duration_since(self.epoch);
            let end_ms = u64::try_from(end.as_millis() + 1).unwrap_or(u64::MAX);
            self.lockouts_end_ms.fetch_max(end_ms, Ordering::Relaxed);
            tracing::warn!(source = %ip, window_s = WINDOW.as_secs(), "Too many failed authentications; source locked out.");
        }
    }
}

/// A per-client request rate limit (GCRA: a token bucket of `requests` per `per`,
/// allowing a burst of the whole allowance).
#[derive(Debug)]
pub(crate) struct RateLimiter {
    /// Time between two requests at the sustained rate.
    interval: Duration,
    /// How far ahead of now the theoretical arrival time may run (the burst).
    burst: Duration,
    /// Theoretical arrival time of the next request.
    tat: Mutex<Option<Instant>>,
}

impl RateLimiter {
    pub(crate) fn new(limit: RateLimit) -> Self {
        let interval = limit.per / limit.requests.max(1);
        Self {
            interval,
            burst: limit.per.saturating_sub(interval),
            tat: Mutex::new(None),
        }
    }

    /// Takes one request from the allowance, or `Err(retry_after)`.
    pub(crate) fn acquire(&self) -> Result<(), Duration> {
        let now = Instant::now();
        let mut tat = self.tat.lock().unwrap_or_else(|e| e.into_inner());
        let current = tat.map_or(now, |t| t.max(now));
        let allowed_at = current.checked_sub(self.burst).unwrap_or(now);
        if allowed_at > now {
            return Err(allowed_at - now);
        }
        *tat = Some(current + self.interval);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 8));

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
}
