//! The token cache: one [`TokenSlot`] per (credential, scope), single-flight fetching,
//! backoff after failures and background renewal.
//!
//! Hot path: [`TokenSlot::get`] loads the current token from an `ArcSwapOption` and returns
//! it if it is usable (`now < expires_at − skew`); no lock. Otherwise the caller takes the
//! slot's fetch lock, re-checks (another caller may just have fetched), and if the slot is
//! not backing off, fetches. The fetch runs in its own task holding the lock, so a caller
//! that gives up (client gone, request timeout) neither cancels it nor lets a second fetch
//! start: N concurrent cold callers cause exactly one provider call, success or failure.
//! Requests wait through [`TokenSlot::get_before`], which gives up at the request's
//! deadline with [`TokenError::Deadline`].
//!
//! Failures put the slot into backoff: 2 s doubling to 60 s with jitter, 60 s for
//! permanent errors, never less than the provider's `Retry-After`. During backoff callers
//! get the last error at once (with the remaining wait as `retry_after`) unless a usable
//! token is still cached, which keeps being served until its skew-adjusted expiry. A source
//! whose fetch panics is such a failure too ([`TokenError::SourceFailed`]).
//!
//! An upstream 401 ([`TokenSlot::renew_rejected`]) starts a renewal but never drops the
//! cached token: if the renewal fails, the token is served until it expires. Such renewals
//! are rate-limited per slot: at most one per 5 s, the interval doubling up to 5 min while
//! they keep coming (renewing did not help), back to 5 s after a quiet spell.
//!
//! [`TokenCache::start`] spawns one renewal task per slot: it fetches at once, then sleeps
//! until the token's renewal point or the end of the backoff. Tasks end when the last
//! `TokenCache` clone is dropped. The renewal tasks, and every fetch (whichever worker's
//! request asked for it), run on the runtime that called `start`: the proxy's workers
//! each have a runtime of their own, and a fetch must neither stop with one of them nor
//! leave the token client's connections to one.

use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::FutureExt;
use tokio::runtime::Handle;
use tokio::sync::{Notify, OwnedMutexGuard};
use tokio::task::AbortHandle;
use tokio::time::{Instant, timeout_at};
use tracing::{debug, error, info, warn};

use super::{FailingSource, Token, TokenError, TokenHttp, TokenSource, build_source, claims};
use crate::config::{Config, Route};

/// First retry delay after a failure (SECURITY.md catalogue F1: ≥ 1–2 s, like Envoy).
const BACKOFF_INITIAL: Duration = Duration::from_secs(2);
/// Longest retry delay, and the interval for permanent errors.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A 401-triggered refetch happens at most once per this interval per slot…
const REJECT_GUARD: Duration = Duration::from_secs(5);
/// …which doubles up to this while such refetches keep coming.
const REJECT_GUARD_MAX: Duration = Duration::from_secs(5 * 60);
/// What a request that gave up waiting for a token in flight is told to wait: the fetch goes
/// on, so its token may be there soon.
const DEADLINE_RETRY_AFTER: Duration = Duration::from_secs(2);

/// Cached tokens for every (credential, scope) the routes use. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TokenCache {
    inner: Arc<CacheInner>,
}

/// credential → scope → slot.
type SlotMap = HashMap<String, HashMap<Option<String>, Arc<TokenSlot>>>;

#[derive(Debug)]
struct CacheInner {
    slots: RwLock<SlotMap>,
    /// One source per configured credential, shared by its scopes.
    sources: HashMap<String, Arc<dyn TokenSource>>,
    started: AtomicBool,
    /// The runtime [`TokenCache::start`] ran on: renewals and fetches run there.
    background: OnceLock<Handle>,
    tasks: Mutex<Vec<AbortHandle>>,
    /// Provider calls by credential and outcome, shared by the slots and carried across
    /// reloads (the counts only ever grow).
    fetches: FetchCounts,
}

impl Drop for CacheInner {
    fn drop(&mut self) {
        let tasks = self.tasks.get_mut().unwrap_or_else(PoisonError::into_inner);
        for task in tasks.drain(..) {
            task.abort();
        }
    }
}

/// One slot's state for readiness and metrics.
#[derive(Debug, Clone)]
pub struct SlotStatus {
    pub credential: String,
    pub scope: Option<String>,
    /// A token that may be injected right now is cached.
    pub has_valid_token: bool,
    /// Time to the cached token's expiry, if one is cached and not expired.
    pub expires_in: Option<Duration>,
    /// The public message of the last failure, until a fetch succeeds again.
    pub last_error: Option<String>,
    pub last_error_permanent: bool,
    /// A provider call is under way (a first fetch or a renewal).
    pub fetching: bool,
    /// Time to the next background renewal (or retry after a failure); `None`: due now.
    pub renews_in: Option<Duration>,
    pub fetches_ok: u64,
    pub fetches_failed: u64,
}

/// How many provider calls of one credential ended with one `outcome` (`ok`, or a
/// [`TokenError::kind`]), since the proxy started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchCount {
    pub credential: String,
    pub outcome: &'static str,
    pub count: u64,
}

/// Provider calls by (credential, outcome). Cheap to clone; clones share the counts.
#[derive(Debug, Clone, Default)]
struct FetchCounts(Arc<Mutex<BTreeMap<(String, &'static str), u64>>>);

impl FetchCounts {
    fn record(&self, credential: &str, outcome: &'static str) {
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *counts.entry((credential.to_owned(), outcome)).or_default() += 1;
    }

    fn snapshot(&self) -> Vec<FetchCount> {
        let counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        counts
            .iter()
            .map(|((credential, outcome), &count)| FetchCount {
                credential: credential.clone(),
                outcome,
                count,
            })
            .collect()
    }
}

impl TokenCache {
    /// Builds the sources and one slot per distinct (credential, scope) of `config.routes`.
    /// Fetches nothing until [`TokenCache::start`] or the first [`TokenSlot::get`].
    #[expect(
        clippy::needless_pass_by_value,
        reason = "the pipeline's contract; callers hand over their Arc"
    )]
    pub fn new(config: &Config, tls: Arc<rustls::ClientConfig>) -> Self {
        // A reload from nothing: every source new, one slot per (credential, scope).
        Self::with_sources(HashMap::new()).reload(config, &tls, |_| false)
    }

    /// A cache over the given sources (credential name → source); slots are created on
    /// demand. For tests and for other credential types under construction.
    pub(crate) fn with_sources(sources: HashMap<String, Arc<dyn TokenSource>>) -> Self {
        Self::with_counts(sources, FetchCounts::default())
    }

    fn with_counts(sources: HashMap<String, Arc<dyn TokenSource>>, fetches: FetchCounts) -> Self {
        Self {
            inner: Arc::new(CacheInner {
                slots: RwLock::new(HashMap::new()),
                sources,
                started: AtomicBool::new(false),
                background: OnceLock::new(),
                tasks: Mutex::new(Vec::new()),
                fetches,
            }),
        }
    }

    /// The slot for `route`'s (credential, scope). Created on first use if the
    /// configuration did not list it; an unknown credential gives a slot that always fails.
    pub fn slot(&self, route: &Route) -> Arc<TokenSlot> {
        self.slot_for(&route.credential, route.scope.as_deref())
    }

    pub(crate) fn slot_for(&self, credential: &str, scope: Option<&str>) -> Arc<TokenSlot> {
        let scope_key = scope.map(str::to_owned);
        {
            let slots = self
                .inner
                .slots
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(slot) = slots.get(credential).and_then(|s| s.get(&scope_key)) {
                return Arc::clone(slot);
            }
        }
        let mut slots = self
            .inner
            .slots
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let by_scope = slots.entry(credential.to_owned()).or_default();
        if let Some(slot) = by_scope.get(&scope_key) {
            return Arc::clone(slot);
        }
        let source = self
            .inner
            .sources
            .get(credential)
            .cloned()
            .unwrap_or_else(|| {
                Arc::new(FailingSource {
                    error: TokenError::Config(format!(
                        "credential `{credential}` is not defined in `credentials`"
                    )),
                })
            });
        let slot = TokenSlot::with_counts(
            credential,
            scope_key.clone(),
            source,
            self.inner.fetches.clone(),
        );
        by_scope.insert(scope_key, Arc::clone(&slot));
        drop(slots);
        if self.inner.started.load(Ordering::Acquire) {
            self.spawn_renewal(&slot);
        }
        slot
    }

    /// Prefetches every slot now and keeps renewing in the background, on the calling
    /// runtime, which also runs every later fetch. Idempotent. Needs a tokio runtime.
    pub fn start(&self) {
        if self.inner.started.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Ok(runtime) = Handle::try_current() {
            let _ = self.inner.background.set(runtime);
        }
        for slot in self.all_slots() {
            self.spawn_renewal(&slot);
        }
    }

    fn spawn_renewal(&self, slot: &Arc<TokenSlot>) {
        let runtime = self.inner.background.get().cloned();
        let Some(runtime) = runtime.or_else(|| Handle::try_current().ok()) else {
            error!(credential = %slot.credential, "Token renewal not started: no async runtime.");
            return;
        };
        let _ = slot.background.set(runtime.clone());
        let task = runtime.spawn(renew_forever(Arc::clone(slot)));
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(task.abort_handle());
    }

    /// The cache for a reloaded `config`: every (credential, scope) whose credential
    /// `unchanged` accepts keeps its slot — cached token, backoff, counters — and source,
    /// which reads its files again (a certificate renewed in place keeps its path, so its
    /// settings compare equal); the others start empty. Call [`TokenCache::start`] on the result; this cache's
    /// renewal tasks end when it is dropped.
    pub(crate) fn reload(
        &self,
        config: &Config,
        tls: &Arc<rustls::ClientConfig>,
        unchanged: impl Fn(&str) -> bool,
    ) -> Self {
        let http = TokenHttp::new(tls);
        let sources = config
            .credentials
            .iter()
            .map(|credential| {
                let source = match self.inner.sources.get(&credential.name) {
                    Some(source) if unchanged(&credential.name) => {
                        source.reread_files();
                        if let Some(prepared) = config.prepared.get() {
                            source.adopt_prepared(prepared);
                        }
                        Arc::clone(source)
                    }
                    _ => build_source(credential, &http, config.prepared.get()),
                };
                (credential.name.clone(), source)
            })
            .collect();
        let next = Self::with_counts(sources, self.inner.fetches.clone());
        let old = self
            .inner
            .slots
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        for route in config.routes.iter().filter(|r| unchanged(&r.credential)) {
            if let Some(slot) = old.get(&route.credential).and_then(|s| s.get(&route.scope)) {
                let mut slots = next
                    .inner
                    .slots
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                slots
                    .entry(route.credential.clone())
                    .or_default()
                    .insert(route.scope.clone(), Arc::clone(slot));
            }
        }
        drop(old);
        for route in &config.routes {
            next.slot(route);
        }
        next
    }

    /// Provider calls by credential and outcome since start-up (reloads keep counting),
    /// sorted; read by `/metrics` at scrape time.
    pub fn fetch_counts(&self) -> Vec<FetchCount> {
        self.inner.fetches.snapshot()
    }

    /// Every slot's state, sorted by credential and scope.
    pub fn status(&self) -> Vec<SlotStatus> {
        let now = Instant::now();
        let mut status: Vec<SlotStatus> = self.all_slots().iter().map(|s| s.status(now)).collect();
        status.sort_by(|a, b| (&a.credential, &a.scope).cmp(&(&b.credential, &b.scope)));
        status
    }

    fn all_slots(&self) -> Vec<Arc<TokenSlot>> {
        let slots = self
            .inner
            .slots
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        slots.values().flat_map(|s| s.values().cloned()).collect()
    }
}

/// The cached token of one (credential, scope).
#[derive(Debug)]
pub struct TokenSlot {
    credential: String,
    scope: Option<String>,
    source: Arc<dyn TokenSource>,
    /// Itself, so a fetch can run in a task of its own.
    me: Weak<TokenSlot>,
    current: ArcSwapOption<Token>,
    /// Where fetches run: the runtime of the cache that started the slot's renewal (else
    /// the caller's).
    background: OnceLock<Handle>,
    /// Held for the whole of a fetch: the single-flight gate.
    fetch_lock: Arc<tokio::sync::Mutex<()>>,
    state: Mutex<SlotState>,
    /// Woken after every fetch and invalidation, so the renewal task re-plans.
    changed: Notify,
    fetches_ok: AtomicU64,
    fetches_failed: AtomicU64,
    /// The cache's counts by credential and outcome, which this slot adds to.
    fetches: FetchCounts,
}

#[derive(Debug)]
struct SlotState {
    last_error: Option<TokenError>,
    /// Set after a failure: no provider call before this instant.
    retry_at: Option<Instant>,
    /// Consecutive failures, for the backoff exponent.
    failures: u32,
    /// When a 401 last caused a refetch (storm guard).
    last_reject_refetch: Option<Instant>,
    /// The storm guard's current interval: [`REJECT_GUARD`] doubling to [`REJECT_GUARD_MAX`].
    reject_guard: Duration,
}

impl Default for SlotState {
    fn default() -> Self {
        Self {
            last_error: None,
            retry_at: None,
            failures: 0,
            last_reject_refetch: None,
            reject_guard: REJECT_GUARD,
        }
    }
}

/// Why a fetch runs, for logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Demand,
    Renewal,
    Rejected,
}

impl TokenSlot {
    #[cfg(test)]
    pub(crate) fn new(
        credential: &str,
        scope: Option<String>,
        source: Arc<dyn TokenSource>,
    ) -> Arc<Self> {
        Self::with_counts(credential, scope, source, FetchCounts::default())
    }

    fn with_counts(
        credential: &str,
        scope: Option<String>,
        source: Arc<dyn TokenSource>,
        fetches: FetchCounts,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            credential: credential.to_owned(),
            scope,
            source,
            me: me.clone(),
            current: ArcSwapOption::empty(),
            background: OnceLock::new(),
            fetch_lock: Arc::new(tokio::sync::Mutex::new(())),
            state: Mutex::new(SlotState::default()),
            changed: Notify::new(),
            fetches_ok: AtomicU64::new(0),
            fetches_failed: AtomicU64::new(0),
            fetches,
        })
    }

    pub fn credential(&self) -> &str {
        &self.credential
    }

    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// The cached token, usable or not, without fetching (responses are scrubbed of it).
    pub(crate) fn cached(&self) -> Option<Arc<Token>> {
        self.current.load_full()
    }

    /// A usable token: the cached one, or a freshly fetched one. Never an expired token.
    /// Waits as long as the fetch takes (the token client's own timeouts bound it).
    pub async fn get(&self) -> Result<Arc<Token>, TokenError> {
        if let Some(token) = self.usable(Instant::now()) {
            return Ok(token);
        }
        self.get_slow().await
    }

    /// [`TokenSlot::get`] for a request: waits for a fetch at most until `deadline`, then
    /// gives up with [`TokenError::Deadline`]. The fetch itself goes on for the others.
    pub async fn get_before(&self, deadline: Instant) -> Result<Arc<Token>, TokenError> {
        if let Some(token) = self.usable(Instant::now()) {
            return Ok(token);
        }
        timeout_at(deadline, self.get_slow())
            .await
            .unwrap_or_else(|_| Err(self.deadline_error()))
    }

    async fn get_slow(&self) -> Result<Arc<Token>, TokenError> {
        if let Some(error) = self.backoff_error(Instant::now()) {
            return Err(error);
        }
        let guard = Arc::clone(&self.fetch_lock).lock_owned().await;
        let now = Instant::now();
        if let Some(token) = self.usable(now) {
            return Ok(token);
        }
        if let Some(error) = self.backoff_error(now) {
            return Err(error);
        }
        self.fetch_detached(guard, Reason::Demand).await
    }

    /// Upstream answered 401 to `rejected`. Returns the token to retry with, or `None` when
    /// the request must not be retried (a 401-triggered refetch happened moments ago: within
    /// the storm guard's interval). Waits at most until `deadline`, like
    /// [`TokenSlot::get_before`].
    ///
    /// The rejected token stays cached: one caller's 401 (a resource the app may not use, a
    /// replica that lags behind a key rollover) must not take the token away from every
    /// other request. A successful renewal replaces it; a failed one leaves it to be served
    /// until it expires, and this caller gets the failure.
    pub async fn renew_rejected(
        &self,
        rejected: &Arc<Token>,
        deadline: Instant,
    ) -> Result<Option<Arc<Token>>, TokenError> {
        if let Some(token) = self.other_usable(rejected, Instant::now()) {
            return Ok(Some(token));
        }
        timeout_at(deadline, self.renew_rejected_locked(rejected))
            .await
            .unwrap_or_else(|_| Err(self.deadline_error()))
    }

    async fn renew_rejected_locked(
        &self,
        rejected: &Arc<Token>,
    ) -> Result<Option<Arc<Token>>, TokenError> {
        let guard = Arc::clone(&self.fetch_lock).lock_owned().await;
        let now = Instant::now();
        if let Some(token) = self.other_usable(rejected, now) {
            return Ok(Some(token));
        }
        {
            let mut state = self.lock_state();
            // First: the callers that queued behind a failed renewal get its error too.
            if let Some(error) = backoff_error(&state, now) {
                return Err(error);
            }
            let interval = state.reject_guard;
            match state.last_reject_refetch.map(|at| now.duration_since(at)) {
                Some(since) if since < interval => return Ok(None),
                // Renewing again soon after the last one: it did not help, so widen.
                Some(since) if since < interval * 2 => {
                    state.reject_guard = (interval * 2).min(REJECT_GUARD_MAX);
                }
                _ => state.reject_guard = REJECT_GUARD,
            }
            state.last_reject_refetch = Some(now);
        }
        self.fetch_detached(guard, Reason::Rejected).await.map(Some)
    }

    /// What a caller whose deadline passed while waiting gets: the slot's backoff if the
    /// fetch has just failed, otherwise [`TokenError::Deadline`].
    fn deadline_error(&self) -> TokenError {
        self.backoff_error(Instant::now())
            .unwrap_or(TokenError::Deadline {
                retry_after: DEADLINE_RETRY_AFTER,
            })
    }

    /// The cached token if it may be injected at `now`.
    fn usable(&self, now: Instant) -> Option<Arc<Token>> {
        let guard = self.current.load();
        match &*guard {
            Some(token) if token.is_usable_at(now) => Some(Arc::clone(token)),
            _ => None,
        }
    }

    fn other_usable(&self, rejected: &Arc<Token>, now: Instant) -> Option<Arc<Token>> {
        self.usable(now).filter(|t| !Arc::ptr_eq(t, rejected))
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn backoff_error(&self, now: Instant) -> Option<TokenError> {
        backoff_error(&self.lock_state(), now)
    }

    /// Runs the fetch in its own task, which keeps `guard` until the result is stored, so
    /// dropping this future neither cancels the fetch nor lets another one start.
    async fn fetch_detached(
        &self,
        guard: OwnedMutexGuard<()>,
        reason: Reason,
    ) -> Result<Arc<Token>, TokenError> {
        let Some(me) = self.me.upgrade() else {
            // Unreachable while `&self` exists (slots are only built inside an `Arc`).
            return self.fetch_locked(reason).await;
        };
        let fetch = async move {
            let result = me.fetch_locked(reason).await;
            drop(guard);
            result
        };
        let task = match self.background.get() {
            Some(runtime) => runtime.spawn(fetch),
            None => tokio::spawn(fetch),
        };
        // `fetch_locked` catches the source's panics; should its own bookkeeping fail, that
        // is a failed token request too (backed off, so the renewal task cannot spin).
        // Nothing of the join error is shown: a panic's text could carry anything.
        task.await.unwrap_or_else(|_join_error| {
            let error = self.record_failure(TokenError::SourceFailed, reason, Instant::now());
            self.changed.notify_one();
            Err(error)
        })
    }

    /// One provider call and its bookkeeping. The caller holds the fetch lock.
    async fn fetch_locked(&self, reason: Reason) -> Result<Arc<Token>, TokenError> {
        let started = Instant::now();
        // A panicking source is a failure like any other: counted, backed off, logged once.
        // Its message is dropped unread (it could contain anything, a secret included).
        let fetched = AssertUnwindSafe(self.source.fetch(self.scope.as_deref()))
            .catch_unwind()
            .await
            .unwrap_or_else(|_panic| Err(TokenError::SourceFailed));
        let result = fetched.and_then(|issued| Token::new(&issued, started).map(|t| (t, issued)));
        let now = Instant::now();
        let result = result.and_then(|(token, issued)| {
            if token.is_usable_at(now) {
                Ok((token, issued))
            } else {
                Err(TokenError::InvalidResponse(
                    "the token expired before the answer arrived".to_owned(),
                ))
            }
        });
        let outcome = match result {
            Ok((token, issued)) => {
                let token = Arc::new(token);
                self.current.store(Some(Arc::clone(&token)));
                {
                    let mut state = self.lock_state();
                    state.last_error = None;
                    state.retry_at = None;
                    state.failures = 0;
                }
                self.fetches_ok.fetch_add(1, Ordering::Relaxed);
                self.fetches.record(&self.credential, "ok");
                info!(
                    credential = %self.credential,
                    scope = self.scope.as_deref().unwrap_or("-"),
                    expires_in = issued.expires_in.as_secs(),
                    renew_in = token.refresh_at().saturating_duration_since(now).as_secs(),
                    "Token fetched."
                );
                if let Some(c) = claims::decode_claims(issued.access_token.expose()) {
                    debug!(credential = %self.credential, aud = ?c.aud, tid = ?c.tid, appid = ?c.appid, roles = ?c.roles, "Token claims.");
                }
                Ok(token)
            }
            Err(err) => Err(self.record_failure(err.cause().clone(), reason, now)),
        };
        self.changed.notify_one();
        outcome
    }

    /// A failed token request's bookkeeping: counted, backed off, logged once. Returns the
    /// error for the callers, with the backoff as its `retry_after`.
    fn record_failure(&self, err: TokenError, reason: Reason, now: Instant) -> TokenError {
        let delay = {
            let mut state = self.lock_state();
            state.failures = state.failures.saturating_add(1);
            let delay = backoff_delay(state.failures, &err);
            state.retry_at = Some(now + delay);
            state.last_error = Some(err.clone());
            delay
        };
        self.fetches_failed.fetch_add(1, Ordering::Relaxed);
        self.fetches.record(&self.credential, err.kind());
        self.log_failure(&err, reason, delay, now);
        TokenError::Backoff {
            error: Box::new(err),
            retry_after: whole_seconds(delay),
        }
    }

    fn log_failure(&self, err: &TokenError, reason: Reason, delay: Duration, now: Instant) {
        let serving = self.usable(now).is_some();
        let scope = self.scope.as_deref().unwrap_or("-");
        let retry_in = delay.as_secs();
        let message = match reason {
            Reason::Renewal if serving => "Token renewal failed.",
            Reason::Renewal | Reason::Demand => "Token fetch failed.",
            Reason::Rejected => "Token refetch after upstream 401 failed.",
        };
        // A panicked source is a bug of ours: an error, though worth retrying.
        if err.is_permanent() || matches!(err, TokenError::SourceFailed) {
            error!(credential = %self.credential, scope, error = %err, retry_in, serving_cached = serving, "{message}");
        } else {
            warn!(credential = %self.credential, scope, error = %err, retry_in, serving_cached = serving, "{message}");
        }
    }

    /// When the renewal task should next act; `None`: now.
    fn next_renewal(&self, now: Instant) -> Option<Instant> {
        let retry_at = self.lock_state().retry_at;
        let due = match (retry_at, self.current.load().as_ref()) {
            (Some(retry_at), _) => retry_at,
            // Never sooner than 1 s after issue: a fetch loop is worse than a late renewal.
            (None, Some(token)) => token
                .refresh_at()
                .max(token.issued_at() + Duration::from_secs(1)),
            (None, None) => return None,
        };
        (due > now).then_some(due)
    }

    /// A renewal step: fetch if it is (still) due once the lock is held.
    async fn renew_if_due(&self) {
        let guard = Arc::clone(&self.fetch_lock).lock_owned().await;
        if self.next_renewal(Instant::now()).is_none() {
            // The result is stored and logged by the fetch itself.
            let _ = self.fetch_detached(guard, Reason::Renewal).await;
        }
    }

    fn status(&self, now: Instant) -> SlotStatus {
        let current = self.current.load_full();
        let state = self.lock_state();
        SlotStatus {
            credential: self.credential.clone(),
            scope: self.scope.clone(),
            has_valid_token: current.as_ref().is_some_and(|t| t.is_usable_at(now)),
            expires_in: current
                .as_ref()
                .map(|t| t.expires_at().saturating_duration_since(now))
                .filter(|d| !d.is_zero()),
            last_error: state.last_error.as_ref().map(TokenError::public_message),
            last_error_permanent: state
                .last_error
                .as_ref()
                .is_some_and(TokenError::is_permanent),
            fetching: self.fetch_lock.try_lock().is_err(),
            renews_in: {
                drop(state);
                self.next_renewal(now).map(|at| at - now)
            },
            fetches_ok: self.fetches_ok.load(Ordering::Relaxed),
            fetches_failed: self.fetches_failed.load(Ordering::Relaxed),
        }
    }
}

/// The background task of one slot: fetch now, then at each renewal point or end of
/// backoff, re-planning whenever the slot changes.
async fn renew_forever(slot: Arc<TokenSlot>) {
    loop {
        if let Some(at) = slot.next_renewal(Instant::now()) {
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = slot.changed.notified() => continue,
            }
        }
        slot.renew_if_due().await;
    }
}

fn backoff_error(state: &SlotState, now: Instant) -> Option<TokenError> {
    match (&state.last_error, state.retry_at) {
        (Some(error), Some(retry_at)) if now < retry_at => Some(TokenError::Backoff {
            error: Box::new(error.clone()),
            retry_after: whole_seconds(retry_at - now),
        }),
        _ => None,
    }
}

/// Delay before the next attempt after `failures` consecutive failures: 2 s doubling to
/// 60 s, minus up to 20 % jitter; 60 s for permanent errors; at least `Retry-After`.
fn backoff_delay(failures: u32, error: &TokenError) -> Duration {
    let base = if error.is_permanent() {
        BACKOFF_MAX
    } else {
        let exponent = failures.saturating_sub(1).min(16);
        BACKOFF_INITIAL
            .saturating_mul(1 << exponent)
            .min(BACKOFF_MAX)
    };
    let jittered = base.mul_f64(1.0 - 0.2 * fastrand::f64());
    jittered
        .max(error.retry_after().unwrap_or(Duration::ZERO))
        .max(Duration::from_secs(1))
}

/// Rounded up to whole seconds, at least 1 s (it becomes a `Retry-After` header).
fn whole_seconds(delay: Duration) -> Duration {
    let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    Duration::from_secs(secs.max(1))
}

#[cfg(test)]
mod tests;
