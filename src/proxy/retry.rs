//! When a throttled request is sent again (`retry_on_429`).
//!
//! Dynamics answers throttling with 429 and `Retry-After`; Business Central also answers
//! 503 with `Retry-After` when a request waited too long in its own queue. Neither was
//! processed, so sending it again after the wait is safe even for POST. The proxy does so
//! at most `attempts` times, only when the wait is at most `max_wait` and ends before the
//! route's deadline, and only for bodies it kept (up to 64 KiB); otherwise the caller gets
//! the upstream's answer with its `Retry-After`. 408 and 504 are never retried: the
//! upstream may have committed the change before it gave up.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

use crate::config::RetryOn429;
use crate::token::retry_after;

/// What a 429 without `Retry-After` waits (the fallback of the F&O "Service protection API
/// limits" samples; docs/dynamics.md "429 retry").
const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// How long to wait before sending a throttled request again, or `None` to pass the
/// answer on. `retries` counts the retries already made; `left` is the time until the
/// route's deadline.
pub(crate) fn throttled_wait(
    policy: Option<RetryOn429>,
    status: StatusCode,
    headers: &HeaderMap,
    retries: u32,
    left: Duration,
) -> Option<Duration> {
    let policy = policy?;
    if retries >= policy.attempts {
        return None;
    }
    let wait = match status {
        StatusCode::TOO_MANY_REQUESTS => {
            retry_after(headers, SystemTime::now()).unwrap_or(DEFAULT_WAIT)
        }
        StatusCode::SERVICE_UNAVAILABLE => retry_after(headers, SystemTime::now())?,
        _ => return None,
    };
    (wait <= policy.max_wait && wait < left).then_some(wait)
}

#[cfg(test)]
mod tests {
    use http::{HeaderValue, header};

    use super::*;

    const POLICY: Option<RetryOn429> = Some(RetryOn429 {
        attempts: 2,
        max_wait: Duration::from_secs(30),
    });
    const LEFT: Duration = Duration::from_secs(600);

    fn with_retry_after(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            retry_after(&with_retry_after("7"), now),
            Some(Duration::from_secs(7))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(12));
        assert_eq!(
            retry_after(&with_retry_after(&later), now),
            Some(Duration::from_secs(12))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(12));
        assert_eq!(
            retry_after(&with_retry_after(&past), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&with_retry_after("soon"), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn throttling_is_retried_within_bounds() {
        let wait = |status, headers: &HeaderMap, retries, left| {
            throttled_wait(POLICY, status, headers, retries, left)
        };
        let two = with_retry_after("2");
        let none = HeaderMap::new();
        assert_eq!(
            wait(StatusCode::TOO_MANY_REQUESTS, &two, 0, LEFT),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            wait(StatusCode::TOO_MANY_REQUESTS, &none, 1, LEFT),
            Some(DEFAULT_WAIT)
        );
        assert_eq!(
            wait(StatusCode::TOO_MANY_REQUESTS, &two, 2, LEFT),
            None,
            "attempts used up"
        );
        assert_eq!(
            wait(
                StatusCode::TOO_MANY_REQUESTS,
                &with_retry_after("31"),
                0,
                LEFT
            ),
            None
        );
        assert_eq!(
            wait(
                StatusCode::TOO_MANY_REQUESTS,
                &two,
                0,
                Duration::from_secs(1)
            ),
            None
        );
        assert_eq!(
            wait(StatusCode::SERVICE_UNAVAILABLE, &two, 0, LEFT),
            Some(Duration::from_secs(2))
        );
        assert_eq!(wait(StatusCode::SERVICE_UNAVAILABLE, &none, 0, LEFT), None);
        for status in [
            StatusCode::REQUEST_TIMEOUT,
            StatusCode::GATEWAY_TIMEOUT,
            StatusCode::BAD_GATEWAY,
        ] {
            assert_eq!(wait(status, &two, 0, LEFT), None);
        }
        assert_eq!(
            throttled_wait(None, StatusCode::TOO_MANY_REQUESTS, &two, 0, LEFT),
            None
        );
    }
}
