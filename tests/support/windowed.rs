//! An upstream that counts like Business Central's request quota: at most `n` requests
//! in any window of length `per`, 429 with `Retry-After` beyond. It records when each
//! request arrived, so a test can check every window of what crossed the wire.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::FakeUpstream;
use super::dynamics::json;

/// Loopback transit is not instantaneous: a request the proxy sent exactly `per` after
/// another may arrive a few milliseconds less than `per` after it (the earlier one opened
/// a connection, the later one reused it; the machine is busy). The upstream counts
/// windows this much shorter than `per`, so it judges what the proxy sent, not the noise.
pub const TRANSIT_JITTER: Duration = Duration::from_millis(250);

#[derive(Clone)]
pub struct WindowedUpstream {
    pub upstream: FakeUpstream,
    arrivals: Arc<Mutex<Vec<(Instant, u16)>>>,
    n: usize,
    per: Duration,
}

impl WindowedUpstream {
    pub async fn start(n: usize, per: Duration) -> Self {
        let upstream = FakeUpstream::start().await;
        let arrivals: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::default();
        let seen = arrivals.clone();
        let window = per - TRANSIT_JITTER;
        upstream.respond(move |_| {
            let mut seen = seen.lock().unwrap();
            // Taken under the lock: the arrivals stay in order.
            let now = Instant::now();
            let recent = seen.iter().filter(|(t, _)| now - *t < window).count();
            let status = if recent >= n { 429 } else { 200 };
            seen.push((now, status));
            if status == 429 {
                let mut answer = json(429, r#"{"error":{"code":"TooManyRequests"}}"#);
                answer
                    .headers_mut()
                    .insert("retry-after", http::HeaderValue::from_static("1"));
                answer
            } else {
                json(200, r#"{"value":[]}"#)
            }
        });
        Self {
            upstream,
            arrivals,
            n,
            per,
        }
    }

    pub fn base(&self) -> String {
        self.upstream.base()
    }

    /// Arrival instants, in order.
    pub fn arrivals(&self) -> Vec<Instant> {
        self.arrivals
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| *t)
            .collect()
    }

    /// How many requests it answered 429.
    pub fn throttled(&self) -> usize {
        let arrivals = self.arrivals.lock().unwrap();
        arrivals.iter().filter(|(_, status)| *status == 429).count()
    }

    /// The most arrivals within any window of length `per` (less [`TRANSIT_JITTER`]).
    pub fn busiest_window(&self) -> usize {
        let arrivals = self.arrivals();
        let window = self.per - TRANSIT_JITTER;
        (0..arrivals.len())
            .map(|i| {
                arrivals[i..]
                    .iter()
                    .take_while(|t| **t - arrivals[i] < window)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    /// Asserts that no window held more than `n` and nothing was throttled.
    pub fn assert_within_limit(&self) {
        assert_eq!(self.throttled(), 0, "the upstream answered 429");
        let busiest = self.busiest_window();
        assert!(
            busiest <= self.n,
            "{busiest} requests arrived within one window of {:?} (limit {})",
            self.per,
            self.n
        );
    }
}
