//! Prometheus metrics (docs/operations.md "Metrics"), rendered by the admin listener's `/metrics`.
//!
//! Owns the registry and the names. Every label value comes from configuration or from a
//! fixed set — route prefixes (`none` when no route matched), the allowed methods (`other`
//! for the rest), three-digit status codes, credential names, token error kinds — never
//! from request data, so the number of series stays bounded whatever callers send. Beside
//! the registry it keeps what the status page shows of recent traffic ([`recent`]:
//! five-minute windows per route, the last 50 proxy errors) and the last reload's outcome.
//!
//! Not here: where requests are counted (the access log, when a response is finished),
//! where token fetches are counted (the token cache, which `/metrics` reads at scrape
//! time like token expiry and queue depths), the HTTP side (`admin`).

mod recent;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use http::Method;
use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::token::{CredentialExpiry, FetchCount, SlotStatus};

pub(crate) use self::recent::RecentError;
use self::recent::{RecentErrors, Window};

/// `Content-Type` of `/metrics`: the Prometheus text format 0.0.4.
pub(crate) const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Route label of requests that matched no route.
const NO_ROUTE: &str = "none";
/// Scope label of a credential that sends no scope (generic token endpoints).
const NO_SCOPE: &str = "none";

/// Every `outcome` of `s2s_proxy_token_fetches_total`: `ok` and each
/// [`crate::token::TokenError::kind`].
const TOKEN_OUTCOMES: [&str; 7] = [
    "ok",
    "provider_error",
    "network",
    "timeout",
    "invalid_response",
    "redirect",
    "config",
];
/// Every `outcome` of `s2s_proxy_config_reloads_total`.
const RELOAD_OUTCOMES: [&str; 2] = ["ok", "error"];
/// Every `outcome` of `s2s_proxy_secret_refreshes_total`, per store.
/// What one refresh of a secret store found: the `outcome` label of
/// `s2s_proxy_secret_refreshes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SecretRefresh {
    /// Every secret read, none changed.
    Unchanged,
    /// A secret has a new version (the configuration is rebuilt with it).
    Updated,
    /// A secret could not be read; the last values stay.
    Failed,
}

impl SecretRefresh {
    const ALL: [Self; 3] = [Self::Unchanged, Self::Updated, Self::Failed];

    /// The `outcome` label.
    fn as_str(self) -> &'static str {
        match self {
            Self::Unchanged => "unchanged",
            Self::Updated => "updated",
            Self::Failed => "failed",
        }
    }
}

/// Seconds; from a quick metadata read to Business Central's 10-minute ceiling.
const DURATION_BUCKETS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FetchLabels {
    credential: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExpiryLabels {
    credential: String,
    scope: String,
}

/// A credential entry: `client_secret`, `client_secrets[1]`, `certificate_file`, ….
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredentialLabels {
    credential: String,
    entry: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    store: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The proxy's metrics. Cheap to clone; clones share the series.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily,
    upstream_duration: HistogramFamily,
    upstream_rate_wait: HistogramFamily,
    /// The route credentials of every configuration so far: their token fetch outcomes
    /// are shown from the start, at 0 until counted.
    token_credentials: Mutex<BTreeSet<String>>,
    in_flight: Family<RouteLabels, Gauge>,
    queued: Family<RouteLabels, Gauge>,
    reloads: Family<OutcomeLabels, Counter>,
    secret_refreshes: Family<StoreLabels, Counter>,
    /// The status page's view: traffic windows by route, recent errors, last reload.
    windows: Mutex<HashMap<String, Arc<Window>>>,
    errors: RecentErrors,
    last_reload: Mutex<Option<(std::time::SystemTime, &'static str)>>,
    started: tokio::time::Instant,
    /// `s2s_proxy_cluster_available` and `s2s_proxy_cluster_fallbacks_total`, rendered
    /// once fleet mode asked for them ([`Metrics::cluster_series`]).
    cluster: ClusterSeries,
    cluster_registry: Registry,
    cluster_shown: std::sync::atomic::AtomicBool,
}

/// The fleet mode series, updated by the cluster handle itself.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClusterSeries {
    /// 1 while Redis answers within the budget, 0 while the replica uses its local limits.
    pub(crate) available: Gauge,
    /// Limiter decisions taken locally because Redis did not answer.
    pub(crate) fallbacks: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::default();
        let request_duration = HistogramFamily::new_with_constructor(duration_histogram);
        let upstream_duration = HistogramFamily::new_with_constructor(duration_histogram);
        let upstream_rate_wait = HistogramFamily::new_with_constructor(duration_histogram);
        let in_flight = Family::default();
        let queued = Family::default();
        let reloads = Family::default();
        let secret_refreshes = Family::default();
        // Counters are registered without `_total`: the encoder appends it.
        registry.register(
            "s2s_proxy_requests",
            "Requests answered, by route, method and status code",
            requests.clone(),
        );
        registry.register(
            "s2s_proxy_request_duration_seconds",
            "Time from request received to response body finished",
            request_duration.clone(),
        );
        registry.register(
            "s2s_proxy_upstream_duration_seconds",
            "Time from sending to the upstream to its response headers",
            upstream_duration.clone(),
        );
        registry.register(
            "s2s_proxy_upstream_rate_wait_seconds",
            "Time each send waited for its route's upstream_rate_limit",
            upstream_rate_wait.clone(),
        );
        registry.register(
            "s2s_proxy_in_flight",
            "Requests being answered, by route",
            in_flight.clone(),
        );
        registry.register(
            "s2s_proxy_queued",
            "Requests waiting for a route's concurrency limit, by route",
            queued.clone(),
        );
        registry.register(
            "s2s_proxy_config_reloads",
            "Configuration reloads, by outcome",
            reloads.clone(),
        );
        let cluster = ClusterSeries::default();
        let mut cluster_registry = Registry::default();
        cluster_registry.register(
            "s2s_proxy_cluster_available",
            "1 while the fleet's Redis answers, 0 while this replica uses its local limits",
            cluster.available.clone(),
        );
        cluster_registry.register(
            "s2s_proxy_cluster_fallbacks",
            "Limiter decisions taken with local limits because Redis did not answer in time",
            cluster.fallbacks.clone(),
        );
        registry.register(
            "s2s_proxy_secret_refreshes",
            "Background reads of a secret store, by store and outcome",
            secret_refreshes.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                cluster,
                cluster_registry,
                cluster_shown: std::sync::atomic::AtomicBool::new(false),
                registry,
                requests,
                request_duration,
                upstream_duration,
                upstream_rate_wait,
                token_credentials: Mutex::default(),
                in_flight,
                queued,
                reloads,
                secret_refreshes,
                windows: Mutex::default(),
                errors: RecentErrors::default(),
                last_reload: Mutex::default(),
                started: tokio::time::Instant::now(),
            }),
        }
    }

    /// The fleet mode series, shown on `/metrics` from now on.
    pub(crate) fn cluster_series(&self) -> ClusterSeries {
        self.inner
            .cluster_shown
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.inner.cluster.clone()
    }

    /// Creates at 0 every series whose labels the configuration decides: the per-route
    /// gauges and duration histograms, each outcome of every route credential's token
    /// fetches, and both reload outcomes. A counter that appears only at its first event
    /// cannot be alerted on with `increase()` (its first sample is already 1), so they
    /// are all present from the start. Request counters keep appearing with their first
    /// status code: those labels are not known in advance.
    pub(crate) fn prepare(&self, config: &Config) {
        let mut token_credentials = self
            .inner
            .token_credentials
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for route in &config.routes {
            let labels = route_labels(Some(&route.prefix));
            let _ = self.inner.in_flight.get_or_create(&labels);
            let _ = self.inner.queued.get_or_create(&labels);
            let _ = self.inner.request_duration.get_or_create(&labels);
            let _ = self.inner.upstream_duration.get_or_create(&labels);
            if route.upstream_rate_limit.is_some() {
                let _ = self.inner.upstream_rate_wait.get_or_create(&labels);
            }
            token_credentials.insert(route.credential.clone());
        }
        drop(token_credentials);
        for outcome in RELOAD_OUTCOMES {
            let _ = self.inner.reloads.get_or_create(&OutcomeLabels { outcome });
        }
        for store in &config.secret_stores.stores {
            for outcome in SecretRefresh::ALL {
                let _ = self.inner.secret_refreshes.get_or_create(&StoreLabels {
                    store: store.name.clone(),
                    outcome: outcome.as_str(),
                });
            }
        }
    }

    /// The series of one route (`None`: requests that matched no route), resolved once
    /// so that counting a request hashes no labels. Pipelines keep one per route; the
    /// series are shared with every other handle of the same route, across reloads.
    pub(crate) fn route(&self, route: Option<&str>) -> RouteMetrics {
        RouteMetrics {
            route: route_labels(route).route,
            families: Arc::clone(&self.inner),
            in_flight: OnceLock::new(),
            request_duration: OnceLock::new(),
            upstream_duration: OnceLock::new(),
            upstream_rate_wait: OnceLock::new(),
            counters: RwLock::default(),
            window: self.window(&route_labels(route).route),
        }
    }

    fn window(&self, route: &str) -> Arc<Window> {
        let mut windows = self
            .inner
            .windows
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(windows.entry(route.to_owned()).or_default())
    }

    /// Requests and errors of `route` in the last five minutes.
    pub(crate) fn recent_traffic(&self, route: &str) -> (u64, u64) {
        self.window(route).totals()
    }

    /// Time since the metrics (the proxy's runtime) were created.
    pub(crate) fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Requests being answered on `route` now.
    pub(crate) fn in_flight_now(&self, route: &str) -> i64 {
        self.inner
            .in_flight
            .get_or_create(&route_labels(Some(route)))
            .get()
    }

    /// The last proxy errors (status, error code, request id; nothing else), oldest first.
    pub(crate) fn recent_errors(&self) -> Vec<RecentError> {
        self.inner.errors.list()
    }

    /// When the last reload was attempted and its outcome (`ok` or `error`).
    pub(crate) fn last_reload(&self) -> Option<(std::time::SystemTime, &'static str)> {
        *self
            .inner
            .last_reload
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The `s2s_proxy_queued{route}` gauge, set from the route's queue depth when `/metrics`
    /// is scraped. The same series for the same prefix, across reloads.
    pub(crate) fn queued(&self, route: &str) -> Gauge {
        self.inner
            .queued
            .get_or_create_owned(&route_labels(Some(route)))
    }

    /// Counts one background read of a secret store (`unchanged`, `updated`, `failed`).
    pub(crate) fn record_secret_refresh(&self, store: &str, outcome: SecretRefresh) {
        self.inner
            .secret_refreshes
            .get_or_create(&StoreLabels {
                store: store.to_owned(),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    /// Counts one reload attempt (`ok` or `error`).
    pub(crate) fn record_reload(&self, outcome: &'static str) {
        *self
            .inner
            .last_reload
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            Some((std::time::SystemTime::now(), outcome));
        self.inner
            .reloads
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Everything in the Prometheus text format. The token series come from the token
    /// cache at scrape time: `fetches` (counted since start-up) and the expiry computed
    /// now from `tokens`, so it is exact (0 when no valid token is held).
    pub(crate) fn render(
        &self,
        tokens: &[SlotStatus],
        fetches: &[FetchCount],
        credentials: &[CredentialExpiry],
    ) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut text, &self.inner.registry);
        if self
            .inner
            .cluster_shown
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            let _ = prometheus_text::encode(&mut text, &self.inner.cluster_registry);
        }

        let mut scrape = Registry::default();
        let token_fetches = Family::<FetchLabels, Counter>::default();
        // Counters are registered without `_total`: the encoder appends it.
        scrape.register(
            "s2s_proxy_token_fetches",
            "Token requests to identity providers, by credential and outcome",
            token_fetches.clone(),
        );
        let token_credentials = self
            .inner
            .token_credentials
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for credential in token_credentials {
            for outcome in TOKEN_OUTCOMES {
                let _ = token_fetches.get_or_create(&FetchLabels {
                    credential: credential.clone(),
                    outcome,
                });
            }
        }
        for fetch in fetches {
            token_fetches
                .get_or_create(&FetchLabels {
                    credential: fetch.credential.clone(),
                    outcome: fetch.outcome,
                })
                .inc_by(fetch.count);
        }
        let expiry = Family::<ExpiryLabels, Gauge>::default();
        scrape.register(
            "s2s_proxy_token_expiry_seconds",
            "Seconds until the cached token of a credential and scope expires (0: none held)",
            expiry.clone(),
        );
        for slot in tokens {
            let seconds = slot.expires_in.map_or(0, |d| d.as_secs());
            expiry
                .get_or_create(&ExpiryLabels {
                    credential: slot.credential.clone(),
                    scope: slot.scope.clone().unwrap_or_else(|| NO_SCOPE.to_owned()),
                })
                .set(i64::try_from(seconds).unwrap_or(i64::MAX));
        }
        let credential_expiry = Family::<CredentialLabels, Gauge>::default();
        scrape.register(
            "s2s_proxy_credential_expiry_timestamp_seconds",
            "When a configured secret (expires:) or certificate (notAfter) expires, Unix time",
            credential_expiry.clone(),
        );
        for expiry in credentials {
            let seconds = expiry
                .expires
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            credential_expiry
                .get_or_create(&CredentialLabels {
                    credential: expiry.credential.clone(),
                    entry: expiry.entry.clone(),
                })
                .set(i64::try_from(seconds).unwrap_or(i64::MAX));
        }
        let _ = prometheus_text::encode(&mut text, &scrape);
        text
    }
}

/// One route's series; see [`Metrics::route`]. A configured route's series exist from
/// [`Metrics::prepare`] on; the `none` route's are created on first use, so no upstream
/// histogram appears for requests that are never forwarded.
#[derive(Debug)]
pub(crate) struct RouteMetrics {
    route: String,
    families: Arc<Inner>,
    in_flight: OnceLock<Gauge>,
    request_duration: OnceLock<Histogram>,
    upstream_duration: OnceLock<Histogram>,
    upstream_rate_wait: OnceLock<Histogram>,
    /// `s2s_proxy_requests_total` by (method, status label) as seen so far: a handful each.
    counters: RwLock<Vec<(&'static str, u16, Counter)>>,
    /// Requests and errors of the last five minutes, for the status page.
    window: Arc<Window>,
}

impl RouteMetrics {
    /// Observes how long one send waited for the route's `upstream_rate_limit`.
    pub(crate) fn record_rate_wait(&self, waited: Duration) {
        self.upstream_rate_wait
            .get_or_init(|| {
                self.families
                    .upstream_rate_wait
                    .get_or_create_owned(&self.labels())
            })
            .observe(waited.as_secs_f64());
    }

    /// Counts one finished request.
    pub(crate) fn record(
        &self,
        method: &Method,
        status: u16,
        total: Duration,
        upstream: Option<Duration>,
    ) {
        self.counter(method_label(method), status).inc();
        self.request_duration
            .get_or_init(|| {
                self.families
                    .request_duration
                    .get_or_create_owned(&self.labels())
            })
            .observe(total.as_secs_f64());
        if let Some(upstream) = upstream {
            self.upstream_duration
                .get_or_init(|| {
                    self.families
                        .upstream_duration
                        .get_or_create_owned(&self.labels())
                })
                .observe(upstream.as_secs_f64());
        }
    }

    /// Counts one finished request in the status page's window; a proxy error (`error`
    /// set, or a 5xx) also goes to the recent errors.
    pub(crate) fn record_recent(
        &self,
        status: u16,
        error: Option<&'static str>,
        request_id: &[u8],
    ) {
        let failed = error.is_some() || status >= 500;
        self.window.count(failed);
        if failed {
            self.families.errors.push(
                &self.route,
                status,
                error.unwrap_or("upstream_error"),
                request_id,
            );
        }
    }

    fn labels(&self) -> RouteLabels {
        RouteLabels {
            route: self.route.clone(),
        }
    }

    fn counter(&self, method: &'static str, status: u16) -> Counter {
        // Keyed like the label: every status outside 100–599 is the one `other` series.
        let status = if (100..=599).contains(&status) {
            status
        } else {
            0
        };
        let find = |counters: &[(&'static str, u16, Counter)]| {
            counters
                .iter()
                .find(|(m, s, _)| *m == method && *s == status)
                .map(|(_, _, counter)| counter.clone())
        };
        if let Some(counter) = find(&self.counters.read().unwrap_or_else(|e| e.into_inner())) {
            return counter;
        }
        let mut counters = self.counters.write().unwrap_or_else(|e| e.into_inner());
        if let Some(counter) = find(&counters) {
            return counter;
        }
        let counter = self.families.requests.get_or_create_owned(&RequestLabels {
            route: self.route.clone(),
            method,
            status: status_label(status),
        });
        counters.push((method, status, counter.clone()));
        counter
    }

    /// Counts a request in `s2s_proxy_in_flight{route}` until the guard is dropped.
    pub(crate) fn in_flight(&self) -> InFlight {
        let gauge = self
            .in_flight
            .get_or_init(|| self.families.in_flight.get_or_create_owned(&self.labels()))
            .clone();
        gauge.inc();
        InFlight { gauge }
    }
}

/// Decrements `s2s_proxy_in_flight{route}` when dropped.
#[derive(Debug)]
pub(crate) struct InFlight {
    gauge: Gauge,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

fn route_labels(route: Option<&str>) -> RouteLabels {
    RouteLabels {
        route: route.unwrap_or(NO_ROUTE).to_owned(),
    }
}

/// The methods the proxy forwards keep their name; anything else is `other`.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Three digits, 100–599 (what HTTP defines); anything else would be a bug, counted as
/// `other` rather than as a new series.
fn status_label(status: u16) -> String {
    if (100..=599).contains(&status) {
        status.to_string()
    } else {
        "other".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_follow_the_design() {
        let metrics = Metrics::new();
        metrics.route(Some("/bc/")).record(
            &Method::GET,
            200,
            Duration::from_millis(30),
            Some(Duration::from_millis(20)),
        );
        metrics.route(None).record(
            &Method::from_bytes(b"PROPFIND").unwrap(),
            405,
            Duration::ZERO,
            None,
        );
        metrics.record_reload("error");
        let guard = metrics.route(Some("/bc/")).in_flight();
        metrics.queued("/bc/").set(3);
        let slot = SlotStatus {
            credential: "bc".to_owned(),
            scope: Some("https://api.businesscentral.dynamics.com/.default".to_owned()),
            has_valid_token: true,
            expires_in: Some(Duration::from_millis(3_599_500)),
            last_error: None,
            last_error_permanent: false,
            fetching: false,
            renews_in: None,
            fetches_ok: 1,
            fetches_failed: 0,
        };
        let secret = CredentialExpiry {
            credential: "bc".to_owned(),
            entry: "client_secrets[1]".to_owned(),
            expires: std::time::UNIX_EPOCH + Duration::from_secs(1_798_675_200),
        };
        let fetch = FetchCount {
            credential: "bc".to_owned(),
            outcome: "ok",
            count: 1,
        };
        let text = metrics.render(&[slot], &[fetch], &[secret]);
        for line in [
            r#"s2s_proxy_requests_total{route="/bc/",method="GET",status="200"} 1"#,
            r#"s2s_proxy_requests_total{route="none",method="other",status="405"} 1"#,
            r#"s2s_proxy_request_duration_seconds_count{route="/bc/"} 1"#,
            r#"s2s_proxy_upstream_duration_seconds_bucket{route="/bc/",le="0.025"} 1"#,
            r#"s2s_proxy_token_fetches_total{credential="bc",outcome="ok"} 1"#,
            r#"s2s_proxy_config_reloads_total{outcome="error"} 1"#,
            r#"s2s_proxy_in_flight{route="/bc/"} 1"#,
            r#"s2s_proxy_queued{route="/bc/"} 3"#,
            "# TYPE s2s_proxy_token_expiry_seconds gauge",
            r#"s2s_proxy_token_expiry_seconds{credential="bc",scope="https://api.businesscentral.dynamics.com/.default"} 3599"#,
            r#"s2s_proxy_credential_expiry_timestamp_seconds{credential="bc",entry="client_secrets[1]"} 1798675200"#,
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
        assert!(
            !text.contains(r#"s2s_proxy_upstream_duration_seconds_count{route="none"}"#),
            "{text}"
        );
        drop(guard);
        assert!(
            metrics
                .render(&[], &[], &[])
                .contains(r#"s2s_proxy_in_flight{route="/bc/"} 0"#)
        );
    }

    #[test]
    fn route_handles_share_their_series() {
        let metrics = Metrics::new();
        let first = metrics.route(Some("/bc/"));
        let second = metrics.route(Some("/bc/"));
        for handle in [&first, &first, &second] {
            handle.record(&Method::GET, 200, Duration::from_millis(5), None);
        }
        first.record(&Method::GET, 404, Duration::ZERO, None);
        // Statuses outside 100–599 share one `other` series, whatever their number.
        first.record(&Method::GET, 999, Duration::ZERO, None);
        second.record(&Method::GET, 42, Duration::ZERO, None);
        let unrouted = metrics.route(None);
        let text = metrics.render(&[], &[], &[]);
        for line in [
            r#"s2s_proxy_requests_total{route="/bc/",method="GET",status="200"} 3"#,
            r#"s2s_proxy_requests_total{route="/bc/",method="GET",status="404"} 1"#,
            r#"s2s_proxy_requests_total{route="/bc/",method="GET",status="other"} 2"#,
            r#"s2s_proxy_request_duration_seconds_count{route="/bc/"} 6"#,
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
        // A handle creates no series until something is counted on it.
        assert!(!text.contains(r#"route="none""#), "{text}");
        drop(unrouted);
    }

    #[test]
    fn token_outcomes_are_every_error_kind() {
        use crate::token::TokenError;
        let errors = [
            TokenError::Redirect { status: 302 },
            TokenError::Network(String::new()),
            TokenError::Timeout(Duration::ZERO),
            TokenError::InvalidResponse(String::new()),
            TokenError::Config(String::new()),
        ];
        for error in &errors {
            assert!(TOKEN_OUTCOMES.contains(&error.kind()), "{}", error.kind());
        }
        assert!(TOKEN_OUTCOMES.contains(&"provider_error"));
    }

    #[test]
    fn status_and_method_labels_are_bounded() {
        assert_eq!(status_label(204), "204");
        assert_eq!(status_label(999), "other");
        assert_eq!(method_label(&Method::CONNECT), "other");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
    }
}
