//! What the status page shows of recent traffic: per route, requests and errors of the
//! last five minutes in ten-second buckets, and the last [`MAX_ERRORS`] proxy errors.
//!
//! Fed by the access log with the request's status, error code and request id only —
//! never a path, query string, header or token — so nothing here can hold a secret.
//! Counting a request takes one uncontended lock of its route's window.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use tokio::time::{Duration, Instant};

/// Width of one bucket.
const BUCKET: Duration = Duration::from_secs(10);
/// Buckets in a window: 30 × 10 s = the last five minutes.
const BUCKETS: usize = 30;
/// Proxy errors kept for the status page.
pub(crate) const MAX_ERRORS: usize = 50;
/// A request id longer than this is cut (ids are caller-supplied).
const MAX_REQUEST_ID: usize = 64;

/// Requests and errors of one route over the last five minutes.
#[derive(Debug)]
pub(crate) struct Window {
    start: Instant,
    /// (bucket number since `start`, requests, errors); a stale bucket is reset on use.
    buckets: Mutex<[(u64, u64, u64); BUCKETS]>,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            buckets: Mutex::new([(u64::MAX, 0, 0); BUCKETS]),
        }
    }
}

impl Window {
    fn bucket_now(&self) -> u64 {
        (self.start.elapsed().as_millis() / BUCKET.as_millis()) as u64
    }

    pub(crate) fn count(&self, error: bool) {
        let now = self.bucket_now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = &mut buckets[(now % BUCKETS as u64) as usize];
        if slot.0 != now {
            *slot = (now, 0, 0);
        }
        slot.1 += 1;
        slot.2 += u64::from(error);
    }

    /// (requests, errors) of the buckets within the last five minutes.
    pub(crate) fn totals(&self) -> (u64, u64) {
        let now = self.bucket_now();
        let buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        buckets
            .iter()
            .filter(|(n, _, _)| *n != u64::MAX && now - n < BUCKETS as u64)
            .fold((0, 0), |(r, e), (_, req, err)| (r + req, e + err))
    }
}

/// One proxy error as the status page lists it.
#[derive(Debug, Clone)]
pub(crate) struct RecentError {
    pub(crate) at: SystemTime,
    pub(crate) route: String,
    pub(crate) status: u16,
    pub(crate) error: &'static str,
    pub(crate) request_id: String,
}

/// The last [`MAX_ERRORS`] proxy errors, newest last.
#[derive(Debug, Default)]
pub(crate) struct RecentErrors(Mutex<VecDeque<RecentError>>);

impl RecentErrors {
    pub(crate) fn push(&self, route: &str, status: u16, error: &'static str, request_id: &[u8]) {
        let request_id = request_id
            .iter()
            .take(MAX_REQUEST_ID)
            .map(|&b| {
                if (b' '..=b'~').contains(&b) {
                    b as char
                } else {
                    '?'
                }
            })
            .collect();
        let mut errors = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if errors.len() == MAX_ERRORS {
            errors.pop_front();
        }
        errors.push_back(RecentError {
            at: SystemTime::now(),
            route: route.to_owned(),
            status,
            error,
            request_id,
        });
    }

    pub(crate) fn list(&self) -> Vec<RecentError> {
        let errors = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        errors.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_window_forgets_after_five_minutes() {
        let window = Window::default();
        window.count(false);
        window.count(true);
        assert_eq!(window.totals(), (2, 1));
        tokio::time::advance(Duration::from_secs(200)).await;
        window.count(false);
        assert_eq!(window.totals(), (3, 1));
        tokio::time::advance(Duration::from_secs(150)).await;
        assert_eq!(window.totals(), (1, 0));
        tokio::time::advance(Duration::from_secs(3000)).await;
        assert_eq!(window.totals(), (0, 0));
    }

    #[test]
    fn only_the_last_fifty_errors_are_kept() {
        let errors = RecentErrors::default();
        for i in 0..60u16 {
            errors.push("/bc/", 500 + i, "upstream_unreachable", b"id\x01");
        }
        let list = errors.list();
        assert_eq!(list.len(), MAX_ERRORS);
        assert_eq!(list[0].status, 510);
        assert_eq!(list[0].request_id, "id?");
    }
}
