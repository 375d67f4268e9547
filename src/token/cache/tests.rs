//! Cache behaviour against a scripted fake source, on tokio's paused clock.

use std::collections::VecDeque;
use std::sync::atomic::AtomicUsize;

use http::StatusCode;

use super::*;
use crate::secret::Secret;
use crate::token::{IssuedToken, ProviderError, TokenFuture};

#[derive(Debug, Clone)]
enum Outcome {
    /// A token living this many seconds.
    Token(u64),
    Fail(TokenError),
}

/// Counts calls, records when they happened, answers from a script then a fallback.
#[derive(Debug)]
struct Fake {
    calls: AtomicUsize,
    rereads: AtomicUsize,
    times: Mutex<Vec<Instant>>,
    delay: Duration,
    script: Mutex<VecDeque<Outcome>>,
    fallback: Mutex<Outcome>,
}

impl Fake {
    fn new(fallback: Outcome) -> Arc<Self> {
        Self::with_delay(fallback, Duration::ZERO)
    }

    fn with_delay(fallback: Outcome, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            calls: AtomicUsize::new(0),
            rereads: AtomicUsize::new(0),
            times: Mutex::new(Vec::new()),
            delay,
            script: Mutex::new(VecDeque::new()),
            fallback: Mutex::new(fallback),
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn set_fallback(&self, outcome: Outcome) {
        *self.fallback.lock().unwrap() = outcome;
    }

    fn push(&self, outcome: Outcome) {
        self.script.lock().unwrap().push_back(outcome);
    }

    fn times(&self) -> Vec<Instant> {
        self.times.lock().unwrap().clone()
    }
}

impl TokenSource for Fake {
    fn fetch<'a>(&'a self, _scope: Option<&'a str>) -> TokenFuture<'a> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            self.times.lock().unwrap().push(Instant::now());
            let outcome = self
                .script
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| self.fallback.lock().unwrap().clone());
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            match outcome {
                Outcome::Token(secs) => Ok(IssuedToken {
                    access_token: Secret::new(format!("tok-{n}")),
                    expires_in: Duration::from_secs(secs),
                    refresh_in: None,
                }),
                Outcome::Fail(error) => Err(error),
            }
        })
    }

    fn reread_files(&self) {
        self.rereads.fetch_add(1, Ordering::SeqCst);
    }
}

fn slot(fake: &Arc<Fake>) -> Arc<TokenSlot> {
    TokenSlot::new("bc", Some("https://api/.default".to_owned()), fake.clone())
}

fn cache(fake: &Arc<Fake>) -> (TokenCache, Arc<TokenSlot>) {
    let source: Arc<dyn TokenSource> = fake.clone();
    let cache = TokenCache::with_sources(HashMap::from([("bc".to_owned(), source)]));
    let slot = cache.slot_for("bc", Some("https://api/.default"));
    (cache, slot)
}

fn network() -> TokenError {
    TokenError::Network("connection refused".to_owned())
}

fn provider(status: u16, body: &str, retry_after: Option<u64>) -> TokenError {
    let mut headers = http::HeaderMap::new();
    if let Some(secs) = retry_after {
        headers.insert(http::header::RETRY_AFTER, secs.into());
    }
    let status = StatusCode::from_u16(status).unwrap();
    TokenError::Provider(Box::new(ProviderError::from_response(
        status,
        &headers,
        body.as_bytes(),
    )))
}

/// A deadline that never passes within a test.
fn a_day() -> Instant {
    Instant::now() + Duration::from_secs(24 * 3600)
}

fn value(token: &Token) -> &str {
    token.header().to_str().unwrap()
}

async fn concurrent_gets(slot: &Arc<TokenSlot>, n: usize) -> Vec<Result<Arc<Token>, TokenError>> {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let slot = Arc::clone(slot);
            tokio::spawn(async move { slot.get().await })
        })
        .collect();
    let mut results = Vec::with_capacity(n);
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

#[tokio::test(start_paused = true)]
async fn thousand_cold_gets_make_one_call() {
    let fake = Fake::with_delay(Outcome::Token(3600), Duration::from_millis(200));
    let slot = slot(&fake);
    let results = concurrent_gets(&slot, 1000).await;
    assert_eq!(fake.calls(), 1);
    let first = results[0].as_ref().unwrap();
    assert_eq!(value(first), "Bearer tok-1");
    assert!(
        results
            .iter()
            .all(|r| Arc::ptr_eq(r.as_ref().unwrap(), first))
    );
}

#[tokio::test(start_paused = true)]
async fn thousand_cold_gets_make_one_call_when_it_fails() {
    let fake = Fake::with_delay(Outcome::Fail(network()), Duration::from_millis(200));
    let slot = slot(&fake);
    let results = concurrent_gets(&slot, 1000).await;
    assert_eq!(fake.calls(), 1);
    for result in results {
        let error = result.unwrap_err();
        assert!(matches!(error.cause(), TokenError::Network(_)));
        assert!(error.retry_after().unwrap() >= Duration::from_secs(1));
    }
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_gives_up_does_not_cancel_the_fetch() {
    let fake = Fake::with_delay(Outcome::Token(3600), Duration::from_secs(1));
    let slot = slot(&fake);
    let impatient = {
        let slot = Arc::clone(&slot);
        tokio::spawn(async move { slot.get().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    impatient.abort();
    let token = slot.get().await.unwrap();
    assert_eq!(value(&token), "Bearer tok-1");
    assert_eq!(fake.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_get_gives_up_at_its_deadline_and_the_fetch_goes_on() {
    let fake = Fake::with_delay(Outcome::Token(3600), Duration::from_secs(10));
    let slot = slot(&fake);
    let start = Instant::now();
    let waiters: Vec<_> = [1, 3]
        .into_iter()
        .map(|secs| {
            let slot = Arc::clone(&slot);
            tokio::spawn(async move {
                let result = slot.get_before(start + Duration::from_secs(secs)).await;
                (result, start.elapsed())
            })
        })
        .collect();
    for (waiter, secs) in waiters.into_iter().zip([1, 3]) {
        let (result, elapsed) = waiter.await.unwrap();
        let error = result.unwrap_err();
        assert!(matches!(error, TokenError::Deadline { .. }), "{error}");
        assert_eq!(error.retry_after(), Some(DEADLINE_RETRY_AFTER));
        assert!(!error.is_permanent());
        assert_eq!(elapsed, Duration::from_secs(secs));
    }
    // Nobody cancelled the fetch, and nobody started a second one.
    let token = slot.get().await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    assert_eq!(value(&token), "Bearer tok-1");
    assert_eq!(fake.calls(), 1);
    // With a token cached, the deadline does not matter.
    assert!(slot.get_before(Instant::now()).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_401_renewal_gives_up_at_its_deadline_and_the_old_token_stays() {
    let fake = Fake::with_delay(Outcome::Token(3600), Duration::from_secs(10));
    let slot = slot(&fake);
    let first = slot.get().await.unwrap();
    let start = Instant::now();
    let error = slot
        .renew_rejected(&first, start + Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(error, TokenError::Deadline { .. }), "{error}");
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    // The renewal goes on in the background; meanwhile the old token is still served.
    assert!(Arc::ptr_eq(&slot.get().await.unwrap(), &first));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let second = slot.get().await.unwrap();
    assert_eq!(value(&second), "Bearer tok-2");
    assert_eq!(fake.calls(), 2);
}

/// Intervals between background fetches, in seconds.
fn intervals(times: &[Instant]) -> Vec<f64> {
    times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn eight_second_token_renews_between_3_2_and_4_seconds() {
    let fake = Fake::new(Outcome::Token(8));
    let (cache, slot) = cache(&fake);
    cache.start();
    let mut seen = Vec::new();
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let token = slot.get().await.unwrap();
        assert!(token.is_usable_at(Instant::now()));
        seen.push(token.header().clone());
    }
    let gaps = intervals(&fake.times());
    assert!(gaps.len() >= 6, "{gaps:?}");
    for gap in &gaps {
        assert!((3.2..=4.0).contains(gap), "renewed after {gap} s: {gaps:?}");
    }
    // Requests were served from the cache, not by fetching.
    assert_eq!(fake.calls(), gaps.len() + 1);
    seen.dedup();
    assert_eq!(seen.len(), fake.calls());
}

#[tokio::test(start_paused = true)]
async fn hour_token_renews_between_49_and_55_minutes() {
    let fake = Fake::new(Outcome::Token(3600));
    let (cache, _slot) = cache(&fake);
    cache.start();
    tokio::time::sleep(Duration::from_secs(5 * 3600)).await;
    let gaps = intervals(&fake.times());
    assert!(gaps.len() >= 5, "{gaps:?}");
    for gap in gaps {
        assert!(
            (49.0 * 60.0..=55.0 * 60.0).contains(&gap),
            "renewed after {gap} s"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn provider_down_serves_the_old_token_until_expiry_minus_skew() {
    let fake = Fake::new(Outcome::Token(100)); // skew 10 s: usable for 90 s
    let (cache, slot) = cache(&fake);
    cache.start();
    let first = slot.get().await.unwrap();
    let start = first.issued_at();
    fake.set_fallback(Outcome::Fail(network()));
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = Instant::now();
        match slot.get().await {
            Ok(token) => {
                assert!(Arc::ptr_eq(&token, &first));
                assert!(now < token.expires_at() - Duration::from_secs(10));
            }
            Err(error) => {
                assert!(now >= start + Duration::from_secs(90), "failed early");
                assert!(matches!(error.cause(), TokenError::Network(_)));
                assert!(error.retry_after().unwrap() >= Duration::from_secs(1));
                break;
            }
        }
    }
    assert!(Instant::now() < start + Duration::from_millis(90_250));
    // Renewal started around 50 s and kept retrying with growing gaps.
    let times = fake.times();
    assert!(times.len() >= 4, "{} calls", times.len());
    let gaps = intervals(&times[1..]);
    assert!(gaps.iter().all(|g| *g >= 1.6), "{gaps:?}");
    assert!(gaps.windows(2).any(|w| w[1] > w[0]), "{gaps:?}");
    // Never an expired token, however long it stays down.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(slot.get().await.is_err());
    let status = cache.status();
    assert!(!status[0].has_valid_token);
    assert_eq!(
        status[0].last_error.as_deref(),
        Some("token endpoint unreachable")
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_without_calling_the_provider() {
    let fake = Fake::new(Outcome::Token(3600));
    fake.push(Outcome::Fail(provider(429, "Too Many Requests", Some(60))));
    let slot = slot(&fake);
    let error = slot.get().await.unwrap_err();
    assert_eq!(error.retry_after(), Some(Duration::from_secs(60)));
    assert!(!error.is_permanent());
    tokio::time::advance(Duration::from_secs(30)).await;
    let error = slot.get().await.unwrap_err();
    assert_eq!(error.retry_after(), Some(Duration::from_secs(30)));
    tokio::time::advance(Duration::from_millis(29_900)).await;
    assert!(slot.get().await.is_err());
    assert_eq!(fake.calls(), 1);
    tokio::time::advance(Duration::from_millis(200)).await;
    assert!(slot.get().await.is_ok());
    assert_eq!(fake.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn background_retry_waits_for_retry_after() {
    let fake = Fake::new(Outcome::Token(3600));
    fake.push(Outcome::Fail(provider(429, "Too Many Requests", Some(60))));
    let (cache, slot) = cache(&fake);
    cache.start();
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(fake.calls(), 1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fake.calls(), 2);
    assert!(slot.get().await.is_ok());
    assert_eq!(fake.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_retry_at_the_cap_interval() {
    let body = r#"{"error":"invalid_client","error_codes":[7000215]}"#;
    let fake = Fake::new(Outcome::Fail(provider(401, body, None)));
    let (cache, slot) = cache(&fake);
    cache.start();
    tokio::time::sleep(Duration::from_secs(300)).await;
    let gaps = intervals(&fake.times());
    assert!(!gaps.is_empty());
    assert!(gaps.iter().all(|g| (48.0..=60.0).contains(g)), "{gaps:?}");
    let error = slot.get().await.unwrap_err();
    assert!(error.is_permanent());
    assert!(error.public_message().contains("AADSTS7000215"));
    assert!(cache.status()[0].last_error_permanent);
}

#[tokio::test(start_paused = true)]
async fn transient_backoff_doubles_up_to_a_minute() {
    let fake = Fake::new(Outcome::Fail(network()));
    let (cache, _slot) = cache(&fake);
    cache.start();
    tokio::time::sleep(Duration::from_secs(600)).await;
    let gaps = intervals(&fake.times());
    assert!((1.6..=2.0).contains(&gaps[0]), "{gaps:?}");
    assert!((3.2..=4.0).contains(&gaps[1]), "{gaps:?}");
    assert!(gaps.iter().all(|g| *g <= 60.0), "{gaps:?}");
    assert!(gaps[gaps.len() - 1] >= 48.0, "{gaps:?}");
}

#[tokio::test(start_paused = true)]
async fn renew_rejected_is_single_flight_and_only_for_the_same_token() {
    let fake = Fake::with_delay(Outcome::Token(3600), Duration::from_millis(50));
    let slot = slot(&fake);
    let first = slot.get().await.unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let slot = Arc::clone(&slot);
            let first = Arc::clone(&first);
            tokio::spawn(async move { slot.renew_rejected(&first, a_day()).await })
        })
        .collect();
    let mut renewed = Vec::new();
    for task in tasks {
        renewed.push(task.await.unwrap().unwrap().expect("a token to retry with"));
    }
    assert_eq!(fake.calls(), 2);
    let second = &renewed[0];
    assert!(!Arc::ptr_eq(second, &first));
    assert!(renewed.iter().all(|t| Arc::ptr_eq(t, second)));
    assert!(Arc::ptr_eq(&slot.get().await.unwrap(), second));

    // A late 401 for the old token gets the current one, without a fetch.
    tokio::time::advance(Duration::from_secs(10)).await;
    let again = slot.renew_rejected(&first, a_day()).await.unwrap().unwrap();
    assert!(Arc::ptr_eq(&again, second));
    assert_eq!(fake.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn storm_guard_stops_repeated_refetches() {
    let fake = Fake::new(Outcome::Token(3600));
    let slot = slot(&fake);
    let first = slot.get().await.unwrap();
    let second = slot.renew_rejected(&first, a_day()).await.unwrap().unwrap();
    assert_eq!(fake.calls(), 2);
    // The new token is rejected too within 5 s: pass the 401 through, keep the token.
    tokio::time::advance(Duration::from_secs(4)).await;
    assert!(
        slot.renew_rejected(&second, a_day())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(fake.calls(), 2);
    assert!(Arc::ptr_eq(&slot.get().await.unwrap(), &second));
    tokio::time::advance(Duration::from_secs(2)).await;
    let third = slot
        .renew_rejected(&second, a_day())
        .await
        .unwrap()
        .unwrap();
    assert!(!Arc::ptr_eq(&third, &second));
    assert_eq!(fake.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_failed_401_renewal_keeps_the_old_token_until_it_expires() {
    let fake = Fake::new(Outcome::Token(100)); // skew 10 s: usable for 90 s
    let slot = slot(&fake);
    let first = slot.get().await.unwrap();
    fake.set_fallback(Outcome::Fail(network()));
    let error = slot.renew_rejected(&first, a_day()).await.unwrap_err();
    assert!(matches!(error.cause(), TokenError::Network(_)));
    assert!(error.retry_after().unwrap() >= Duration::from_secs(1));
    assert_eq!(fake.calls(), 2);
    // One caller's 401 does not evict the shared token: the others keep using it.
    for _ in 0..80 {
        assert!(Arc::ptr_eq(&slot.get().await.unwrap(), &first));
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    // Until it expires (minus skew), never after.
    tokio::time::advance(Duration::from_secs(11)).await;
    let error = slot.get().await.unwrap_err();
    assert!(matches!(error.cause(), TokenError::Network(_)));
}

#[tokio::test(start_paused = true)]
async fn a_thousand_concurrent_401s_make_one_renewal_even_when_it_fails() {
    let fake = Fake::with_delay(Outcome::Token(3600), Duration::from_millis(200));
    let slot = slot(&fake);
    let first = slot.get().await.unwrap();
    fake.set_fallback(Outcome::Fail(network()));
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let slot = Arc::clone(&slot);
            let first = Arc::clone(&first);
            tokio::spawn(async move { slot.renew_rejected(&first, a_day()).await })
        })
        .collect();
    for task in tasks {
        // Every one of them is told that no new token can be had, and when to retry.
        let error = task.await.unwrap().unwrap_err();
        assert!(matches!(error.cause(), TokenError::Network(_)));
        assert!(error.retry_after().unwrap() >= Duration::from_secs(1));
    }
    assert_eq!(fake.calls(), 2);
    assert!(Arc::ptr_eq(&slot.get().await.unwrap(), &first));
}

#[tokio::test(start_paused = true)]
async fn renewals_after_401s_are_rate_limited_and_widen_while_they_keep_coming() {
    let fake = Fake::new(Outcome::Token(24 * 3600));
    let slot = slot(&fake);
    let start = Instant::now();
    slot.get().await.unwrap();
    // A caller hammers a resource that always answers 401, once a second for ten minutes.
    let mut renewed_at = Vec::new();
    while Instant::now() < start + Duration::from_secs(600) {
        let current = slot.get().await.unwrap();
        let before = fake.calls();
        let _ = slot.renew_rejected(&current, a_day()).await.unwrap();
        if fake.calls() > before {
            renewed_at.push(Instant::now());
        }
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    // 5 s, 10 s, 20 s, … up to 5 min between renewals: 8 instead of 120.
    let gaps = intervals(&renewed_at);
    assert!(
        renewed_at.len() <= 9,
        "{} renewals: {gaps:?}",
        renewed_at.len()
    );
    assert!(gaps.windows(2).all(|w| w[1] >= w[0]), "{gaps:?}");
    assert!(gaps.iter().all(|g| *g <= 301.0), "{gaps:?}");
    // After a quiet spell a single 401 renews at once again.
    tokio::time::advance(Duration::from_secs(3600)).await;
    let current = slot.get().await.unwrap();
    let before = fake.calls();
    let fresh = slot
        .renew_rejected(&current, a_day())
        .await
        .unwrap()
        .unwrap();
    assert!(!Arc::ptr_eq(&fresh, &current));
    assert_eq!(fake.calls(), before + 1);
}

/// A source whose fetch future panics, with a message that must not reach a body.
#[derive(Debug, Default)]
struct Panicking {
    calls: AtomicUsize,
    times: Mutex<Vec<Instant>>,
}

impl TokenSource for Panicking {
    fn fetch<'a>(&'a self, _scope: Option<&'a str>) -> TokenFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.times.lock().unwrap().push(Instant::now());
            panic!("source blew up holding PANIC_CANARY_secret");
        })
    }
}

fn panicking_cache() -> (Arc<Panicking>, TokenCache, Arc<TokenSlot>) {
    let source = Arc::new(Panicking::default());
    let dyn_source: Arc<dyn TokenSource> = source.clone();
    let cache = TokenCache::with_sources(HashMap::from([("bc".to_owned(), dyn_source)]));
    let slot = cache.slot_for("bc", None);
    (source, cache, slot)
}

#[tokio::test]
async fn a_panicking_source_is_a_failure_with_backoff_and_a_generic_message() {
    let (source, cache, slot) = panicking_cache();
    cache.start();
    // Real time: before the fix, the renewal task retried in a loop (14,000 calls here).
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The background fetch failed once and now backs off (2 s at least), no spinning.
    assert_eq!(source.calls.load(Ordering::SeqCst), 1);
    let error = slot.get().await.unwrap_err();
    assert_eq!(source.calls.load(Ordering::SeqCst), 1);
    assert!(error.retry_after().unwrap() >= Duration::from_secs(1));
    assert!(!error.is_permanent());
    assert_eq!(
        error.public_message(),
        "the token source failed unexpectedly"
    );
    for text in [error.public_message(), error.to_string()] {
        assert!(!text.contains("PANIC_CANARY"), "{text}");
    }
    let status = &cache.status()[0];
    assert_eq!(status.fetches_failed, 1);
    assert_eq!(
        status.last_error.as_deref(),
        Some("the token source failed unexpectedly")
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_source_retries_on_the_transient_backoff_schedule() {
    let (source, cache, _slot) = panicking_cache();
    cache.start();
    tokio::time::sleep(Duration::from_secs(600)).await;
    let gaps = intervals(&source.times.lock().unwrap());
    assert!((1.6..=2.0).contains(&gaps[0]), "{gaps:?}");
    assert!((3.2..=4.0).contains(&gaps[1]), "{gaps:?}");
    assert!(gaps.iter().all(|g| (1.6..=60.0).contains(g)), "{gaps:?}");
    assert_eq!(cache.status()[0].fetches_failed as usize, gaps.len() + 1);
}

#[tokio::test(start_paused = true)]
async fn expired_token_is_never_returned_even_while_a_fetch_is_slow() {
    let fake = Fake::with_delay(Outcome::Token(10), Duration::from_secs(20));
    let slot = slot(&fake);
    // Issued at the start of a 20 s fetch, a 10 s token is already dead on arrival.
    let error = slot.get().await.unwrap_err();
    assert!(
        matches!(error.cause(), TokenError::InvalidResponse(_)),
        "{error}"
    );
    assert!(error.to_string().contains("expired"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_cache_stops_renewal() {
    let fake = Fake::new(Outcome::Token(8));
    let (cache, slot) = cache(&fake);
    cache.start();
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(fake.calls(), 1);
    drop(cache);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(fake.calls(), 1);
    drop(slot);
}

#[tokio::test(start_paused = true)]
async fn slots_are_per_credential_and_scope_and_created_lazily() {
    let fake = Fake::new(Outcome::Token(3600));
    let (cache, slot) = cache(&fake);
    assert!(Arc::ptr_eq(
        &slot,
        &cache.slot_for("bc", Some("https://api/.default"))
    ));
    let other = cache.slot_for("bc", Some("https://other/.default"));
    assert!(!Arc::ptr_eq(&slot, &other));
    let a = slot.get().await.unwrap();
    let b = other.get().await.unwrap();
    assert_ne!(a.header(), b.header());
    let unknown = cache.slot_for("nope", None);
    let error = unknown.get().await.unwrap_err();
    assert!(error.is_permanent());
    assert!(error.public_message().contains("`nope`"));
    let status = cache.status();
    assert_eq!(status.len(), 3);
    assert_eq!(status[0].credential, "bc");
    assert!(status[0].has_valid_token);
    assert_eq!(status[0].expires_in, Some(Duration::from_secs(3600)));
    assert_eq!(status[0].fetches_ok, 1);
    assert_eq!(status[2].credential, "nope");
    assert_eq!(status[2].fetches_failed, 1);
}

#[tokio::test]
async fn a_reload_keeps_unchanged_sources_and_makes_them_read_their_files_again() {
    let fake = Fake::new(Outcome::Token(3600));
    let (cache, _) = cache(&fake);
    let config = crate::config::Config::from_yaml_str(
        "credentials:\n  bc:\n    type: client_secret\n    token_url: https://idp.example/token\n    \
         client_id: app\n    client_secret: ${S}\nclients:\n  c:\n    networks: [10.0.0.0/8]\n\
         routes:\n  - prefix: /bc/\n    upstream: https://api.example/\n    credential: bc\n    \
         scope: https://api/.default\n    clients: [c]\n",
        &crate::config::Source {
            name: "proxy.yaml".to_owned(),
            base_dir: std::env::temp_dir(),
            variables: crate::config::Variables::map([("S".to_owned(), "s".to_owned())].into()),
        },
    )
    .unwrap();
    let kept = cache.reload(&config, &crate::token::fake::tls(), |_| true);
    assert_eq!(fake.rereads.load(Ordering::SeqCst), 1);
    assert!(Arc::ptr_eq(
        &kept.inner.sources["bc"],
        &(fake.clone() as Arc<dyn TokenSource>)
    ));
    let replaced = cache.reload(&config, &crate::token::fake::tls(), |_| false);
    assert_eq!(
        fake.rereads.load(Ordering::SeqCst),
        1,
        "a new source, not a re-read"
    );
    assert!(!Arc::ptr_eq(
        &replaced.inner.sources["bc"],
        &(fake as Arc<dyn TokenSource>)
    ));
}

/// A fetch runs on the runtime that started the cache, not on the one of the request that
/// asked for it: the proxy's workers each have a runtime, and one that stops mid-fetch
/// must neither cancel the fetch nor leave the slot without the new token.
#[test]
fn a_fetch_outlives_the_runtime_of_the_request_that_asked_for_it() {
    let fake = Fake::with_delay(Outcome::Token(3600), Duration::from_millis(300));
    let (cache, slot) = cache(&fake);
    let background = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    background.block_on(async { cache.start() });
    let cached = |token: &str| {
        (0..200).any(|_| {
            let found = slot
                .cached()
                .is_some_and(|t| value(&t) == format!("Bearer {token}"));
            if !found {
                std::thread::sleep(Duration::from_millis(25));
            }
            found
        })
    };
    assert!(cached("tok-1"), "the start-up fetch");

    // A worker's request has its token rejected and asks for a new one; the worker's
    // runtime stops before the provider answers.
    let worker = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rejected = slot.cached().unwrap();
    let gave_up = worker.block_on(async {
        tokio::time::timeout(
            Duration::from_millis(50),
            slot.renew_rejected(&rejected, a_day()),
        )
        .await
    });
    assert!(gave_up.is_err());
    drop(worker);
    assert!(cached("tok-2"), "the fetch went on without the worker");
    assert_eq!(fake.calls(), 2);
}
