//! The request pipeline.
//!
//! [`Pipeline::handle`] is the only place an error becomes a response. The steps, in order:
//!
//! 1. **check** the request itself (method, target form, `Host`, duplicate credentials,
//!    path safety) — 400 / 405;
//! 2. **authenticate** the caller — 401; nothing after this runs for unknown callers, so
//!    they can never cause a token request (429 for a locked-out source address or a
//!    client over its `rate_limit`);
//! 3. **route** by the longest prefix — 404 — and **authorize** the client for it — 403;
//! 4. **token**: the route's cached bearer token — 503 when none is valid, or none comes
//!    before the route's `timeout`;
//! 5. **forward**: wait for a slot in the route's queue (`max_concurrent`, for the whole
//!    fleet with `cluster`: see `queue`) — 503 when full or too slow — and before each
//!    send for a turn under the route's `upstream_rate_limit` (`rate`, the same 503s);
//!    send with the token injected, streaming both bodies. An upstream 401 to the token
//!    we sent renews it and replays the request once, a 429 (`retry_on_429`) waits out
//!    `Retry-After` and replays it, both only when the body was small enough to keep —
//!    502 / 504 on upstream failure. On `rewrite_links` routes the
//!    response's upstream links are rewritten to proxy links as it streams back; on every
//!    route the tokens of the exchange are scrubbed from the response (`scrub`). A
//!    `$batch` body's inner requests are checked and translated on the way (`batch`); a
//!    SOAP envelope's WS-Addressing `To` naming the proxy is given the upstream's URL.

pub(crate) mod access_log;
pub(crate) mod batch;
pub(crate) mod body;
mod by_route;
mod checks;
mod error;
pub(crate) mod headers;
pub(crate) mod queue;
pub(crate) mod rate;
mod retry;
mod scrub;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::Incoming;
use tokio::time::{Instant, timeout_at};

use self::access_log::AccessLog;
use self::batch::Batch;
use self::body::{BodyLimits, InboundStats, ProxyBody, UpstreamBody, UpstreamResponse};
pub(crate) use self::checks::Framing;
use self::error::ProxyError;
use self::headers::{Forwarding, Peer, RequestPolicy, X_REQUEST_ID};
use self::queue::{Permit, QueueLimits, Queues, RouteQueue};
use self::rate::{RateLimits, UpstreamRate, UpstreamRates};
use crate::cluster::Cluster;
use crate::config::{Config, Limits, Route};
use crate::inbound::tls::TlsSession;
use crate::inbound::{Authenticator, ClientSet, Throttles};
use crate::metrics::{Metrics, RouteMetrics};
use crate::rewrite::{self, LinkMap};
use crate::routing::{self, RouteTable};
use crate::token::{Token, TokenCache, TokenSlot};
use crate::upstream::UpstreamClient;

/// What the connection knows about one request besides the request itself. Passed
/// alongside it rather than as request extensions, which cost allocations per request.
#[derive(Debug)]
pub(crate) struct Arrival {
    /// The TCP peer.
    pub(crate) peer: Peer,
    /// What the framing audit saw in this request's head.
    pub(crate) framing: Framing,
    /// The TLS session of an `https` listener's connection.
    pub(crate) tls: Option<Arc<TlsSession>>,
}

/// What a request showed about its caller, for the connection it came on (which closes
/// after repeated refusals and prefers keeping authenticated callers at its cap). Returned
/// beside the response; it never reaches the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caller {
    Authenticated,
    /// Authentication failed (401), or the source is locked out after failing it (429).
    Refused,
}

/// A route with everything resolved for the hot path.
#[derive(Debug)]
struct RouteState {
    prefix: Arc<str>,
    config: Route,
    clients: ClientSet,
    tokens: Arc<TokenSlot>,
    /// `max_concurrent` and its queue, when set (shared with the other configurations
    /// that have the route).
    queue: Option<Arc<RouteQueue>>,
    /// `upstream_rate_limit` and its window, when set (shared like the queue).
    rate: Option<Arc<UpstreamRate>>,
    /// The upstream URL as links in responses start with it (`rewrite_links`).
    upstream_url: String,
    metrics: Arc<RouteMetrics>,
}

/// Limiter state that outlives a configuration, owned by the runtime and handed to every
/// new pipeline: route queues and upstream rate windows by prefix, the
/// failed-authentication table, the clients' rate-limit buckets by name. So a reload
/// neither multiplies `max_concurrent` nor lifts lockouts or refills rate limits.
#[derive(Debug, Default)]
pub(crate) struct Limiters {
    pub(crate) queues: Queues,
    pub(crate) rates: UpstreamRates,
    pub(crate) throttles: Throttles,
    /// Fleet mode (`cluster:`): the Redis handle the limiters share, when configured.
    pub(crate) cluster: Option<Cluster>,
}

impl Limiters {
    /// The limiters of a runtime; in fleet mode they hold across the replicas.
    pub(crate) fn new(cluster: Option<Cluster>) -> Self {
        Self {
            queues: Queues::new(cluster.clone()),
            rates: UpstreamRates::new(cluster.clone()),
            throttles: Throttles::new(cluster.clone()),
            cluster,
        }
    }
}

/// Shared state of the request pipeline for one configuration.
#[derive(Debug)]
pub(crate) struct Pipeline {
    authenticator: Authenticator,
    table: RouteTable,
    routes: Vec<RouteState>,
    upstream: UpstreamClient<UpstreamBody>,
    limits: Limits,
    public_url: Option<Uri>,
    /// `server.allow_underscore_headers`.
    allow_underscore_headers: bool,
    /// The runtime's shutdown flag: set, new requests get 503 `shutting_down`.
    draining: Arc<AtomicBool>,
    /// The series of requests that match no route.
    unrouted: Arc<RouteMetrics>,
}

impl Pipeline {
    pub(crate) fn new(
        config: &Config,
        tokens: &TokenCache,
        upstream: UpstreamClient<UpstreamBody>,
        metrics: &Metrics,
        draining: Arc<AtomicBool>,
        limiters: &Limiters,
    ) -> Self {
        // Every configured route's series show up before its first request.
        metrics.prepare(config);
        let authenticator = Authenticator::with_throttles(config, &limiters.throttles);
        let routes = config
            .routes
            .iter()
            .map(|route| RouteState {
                prefix: Arc::from(route.prefix.as_str()),
                clients: ClientSet::new(
                    route
                        .clients
                        .iter()
                        .filter_map(|name| authenticator.client_id(name)),
                ),
                tokens: tokens.slot(route),
                queue: QueueLimits::of(route)
                    .map(|limits| limiters.queues.route(&route.prefix, limits)),
                rate: RateLimits::of(route)
                    .map(|limits| limiters.rates.route(&route.prefix, limits)),
                upstream_url: route.upstream.url.to_string(),
                metrics: Arc::new(metrics.route(Some(&route.prefix))),
                config: route.clone(),
            })
            .collect();
        Self {
            authenticator,
            table: RouteTable::new(config.routes.iter().map(|r| r.prefix.as_str())),
            routes,
            upstream,
            limits: config.server.limits.clone(),
            public_url: config.server.public_url.clone(),
            allow_underscore_headers: config.server.allow_underscore_headers,
            draining,
            unrouted: Arc::new(metrics.route(None)),
        }
    }

    /// Requests waiting in each queued route's queue (for a slot or for the upstream
    /// rate), by route prefix. Read by the metrics at scrape time
    /// (`s2s_proxy_queued{route}`).
    pub(crate) fn queue_depths(&self) -> impl Iterator<Item = (&str, usize)> {
        self.routes.iter().filter_map(|route| {
            if route.queue.is_none() && route.rate.is_none() {
                return None;
            }
            let slots = route.queue.as_ref().map_or(0, |queue| queue.queued());
            let rate = route.rate.as_ref().map_or(0, |rate| rate.queued());
            Some((&*route.prefix, slots + rate))
        })
    }

    /// Answers one request. Never fails: every error becomes its JSON response here.
    pub(crate) async fn handle(
        &self,
        request: Request<Incoming>,
        arrival: Arrival,
    ) -> (Response<ProxyBody>, Option<Caller>) {
        let request_id = headers::request_id(request.headers());
        let mut log = AccessLog {
            request_id: request_id.clone(),
            client: None,
            route: None,
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
            status: 0,
            error: None,
            started: Instant::now(),
            upstream_ms: None,
            bytes_in: 0,
            metrics: self.unrouted.clone(),
            in_flight: None,
            // Dropped unwritten (this future dropped: the caller went away), it is
            // written as 499.
            written: false,
        };
        let mut refused = false;
        let mut response = match self.pipeline(request, &arrival, &mut log).await {
            Ok(response) => response,
            Err(error) => {
                refused = log.client.is_none()
                    && matches!(
                        error,
                        ProxyError::Unauthorized(_) | ProxyError::TooManyRequests(_)
                    );
                let id = request_id.to_str().unwrap_or("-");
                let route = log.route.as_deref().unwrap_or("-");
                if error.log_level() == tracing::Level::WARN {
                    tracing::warn!(request_id = id, route, error = %error, "Request failed.");
                } else {
                    tracing::debug!(request_id = id, route, error = %error, "Request refused.");
                }
                log.error = Some(error.code());
                error.into_response(log.route.as_deref(), &request_id)
            }
        };
        response.headers_mut().insert(X_REQUEST_ID, request_id);
        let caller = if log.client.is_some() {
            Some(Caller::Authenticated)
        } else {
            refused.then_some(Caller::Refused)
        };
        log.status = response.status().as_u16();
        response.body_mut().set_access_log(log);
        (response, caller)
    }

    async fn pipeline(
        &self,
        request: Request<Incoming>,
        arrival: &Arrival,
        log: &mut AccessLog,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(ProxyError::ShuttingDown);
        }
        checks::check(
            &request,
            arrival.framing,
            self.authenticator.api_key_header(),
        )?;

        let client_ip = self
            .authenticator
            .client_ip(request.headers(), arrival.peer.ip);
        let peer_certificate = arrival
            .tls
            .as_ref()
            .and_then(|tls| tls.peer_certificate.as_ref());
        let client =
            self.authenticator
                .authenticate(request.headers(), client_ip, peer_certificate)?;
        log.client = Some(self.authenticator.log_name(client));
        self.authenticator
            .admit(client)
            .await
            .map_err(ProxyError::TooManyRequests)?;

        let (index, rest) = self
            .table
            .lookup(request.uri().path())
            .ok_or(ProxyError::NotFound)?;
        let route = &self.routes[index];
        log.route = Some(route.prefix.clone());
        log.in_flight = Some(route.metrics.in_flight());
        log.metrics = route.metrics.clone();
        if !route.clients.admits(client) {
            return Err(ProxyError::Forbidden);
        }
        // hyper's parsed Content-Length (canonical, as `checks` made sure).
        let declared = http_body::Body::size_hint(request.body()).exact();
        if declared.is_some_and(|len| len > self.limits.max_body_bytes) {
            return Err(ProxyError::PayloadTooLarge);
        }
        let uri = routing::upstream_uri(&route.config.upstream, rest, request.uri().query())
            .map_err(|_| ProxyError::BadRequest("the request target cannot be forwarded"))?;

        self.forward(route, uri, request, arrival, log).await
    }

    /// Sends an admitted request upstream and shapes the answer, in named steps: read the
    /// body (ahead, up to the replay limit), translate it (`$batch`, WS-Addressing),
    /// acquire a slot in the route's queue, send with retries, shape the response.
    async fn forward(
        &self,
        route: &RouteState,
        uri: Uri,
        request: Request<Incoming>,
        arrival: &Arrival,
        log: &mut AccessLog,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let deadline = log.started + route.config.timeout;
        let (parts, inbound) = request.into_parts();
        let forwarding = Forwarding {
            peer: &arrival.peer,
            peer_is_trusted_proxy: self.authenticator.is_trusted_proxy(arrival.peer.ip),
            proto: if arrival.tls.is_some() {
                "https"
            } else {
                "http"
            },
            policy: RequestPolicy {
                api_key_header: self.authenticator.api_key_header(),
                allow_underscores: self.allow_underscore_headers,
                strip: &route.config.strip_request_headers,
            },
            request_id: &log.request_id,
            authority: parts.uri.authority(),
        };
        let is_batch = batch::is_batch_request(&parts.method, parts.uri.path());
        let is_soap = rewrite::is_soap_request(&parts.headers);
        // The proxy's own URL as this caller reached it, for links, `$batch` parts and
        // WS-Addressing alike; worked out only for a request that needs it.
        let public_base = (route.config.rewrite_links || is_batch || is_soap)
            .then(|| {
                rewrite::public_base(
                    self.public_url.as_ref(),
                    &parts.headers,
                    forwarding.authority,
                    forwarding.proto,
                    forwarding.peer_is_trusted_proxy,
                )
            })
            .flatten();
        let public_base = public_base.as_deref();
        let links = link_map(route, public_base);
        let batch = if is_batch {
            self.batch(route, &parts, forwarding.policy, public_base)?
        } else {
            None
        };
        let addressing = is_soap.then(|| addressing(route, public_base)).flatten();
        let mut headers = headers::to_upstream(parts.headers, &forwarding);
        // Textual answers are searched for the token, links or not: only codings the
        // proxy can decode are asked for.
        rewrite::narrow_accept_encoding(&mut headers);
        let stats = Arc::new(InboundStats::default());
        let body = self.read_body(inbound, &stats, deadline).await?;
        let body = translate_body(body, &mut headers, batch, addressing, deadline).await?;
        let queued_at = Instant::now();
        let slot = acquire_slot(route, deadline).await?;
        let outgoing = Outgoing {
            method: &parts.method,
            uri: &uri,
            headers,
            body,
            deadline,
            queued_at,
            stats: &stats,
        };
        let (response, sent) = self.send_with_retries(route, outgoing, log).await?;
        let mut response = shape_response(route, &parts.method, response, &sent, links, deadline)?;
        response.body_mut().hold(slot);
        Ok(response)
    }

    /// Reads the inbound body ahead, up to the replay limit, within the body limits and
    /// the route's deadline.
    async fn read_body(
        &self,
        inbound: Incoming,
        stats: &Arc<InboundStats>,
        deadline: Instant,
    ) -> Result<UpstreamBody, ProxyError> {
        let limits = BodyLimits {
            max_bytes: self.limits.max_body_bytes,
            idle_timeout: self.limits.body_idle_timeout,
        };
        Ok(timeout_at(deadline, body::prepare(inbound, limits, Arc::clone(stats))).await??)
    }

    /// Sends the request with the route's token. An upstream 401 renews the token and
    /// replays the request once; a 429 (`retry_on_429`) waits out `Retry-After` and
    /// replays it; both only when the body was small enough to keep. Every send, the
    /// replays included, first waits for its turn under `upstream_rate_limit`. Returns the
    /// answer and every token sent (the response is scrubbed of each).
    async fn send_with_retries(
        &self,
        route: &RouteState,
        outgoing: Outgoing<'_>,
        log: &mut AccessLog,
    ) -> Result<(Response<UpstreamResponse>, Vec<Arc<Token>>), ProxyError> {
        let Outgoing {
            method,
            uri,
            headers,
            body,
            deadline,
            queued_at,
            stats,
        } = outgoing;
        // Taken only now, after waiting for a small body and a slot, so that the token is
        // fresh when the request leaves. Like every token wait below, it ends at the
        // route's deadline (503 `token_unavailable`, docs/credentials.md "Tokens").
        let mut token = route.tokens.get_before(deadline).await?;
        let mut sent = vec![token.clone()];
        // A small body is kept (with the headers) so the request can be sent again.
        let kept = body.replay().map(|body| (body, headers.clone()));
        let again = || {
            let (body, headers) = kept.as_ref()?;
            Some((body.replay()?, headers.clone()))
        };
        let mut next = (body, headers);
        let mut renewed = false;
        let mut throttled = 0;
        // From the first send on: a wait for the rate is not the upstream's time.
        let mut upstream_started = None;
        // The first send's turn counts its wait for a slot against `queue_timeout`.
        let mut waiting_since = queued_at;
        loop {
            let (body, headers) = next;
            if pace(route, waiting_since, deadline).await? {
                // Waited for the rate: the token taken before may have been renewed since.
                let current = route.tokens.get_before(deadline).await?;
                if !Arc::ptr_eq(&current, &token) {
                    token = current;
                    sent.push(token.clone());
                }
            }
            let request = upstream_request(method, uri, headers, body, &token);
            upstream_started.get_or_insert_with(Instant::now);
            let result = self.send_once(request, deadline).await;
            log.bytes_in = stats.received();
            let response = result?;
            if response.status() == StatusCode::UNAUTHORIZED {
                // The upstream refuses the proxy's token, not the caller: the caller's own
                // credentials were fine. Renew (whatever the body), retry once if we can.
                if renewed {
                    return Err(ProxyError::UpstreamRejectedToken);
                }
                let fresh = renew_rejected(route, &token, deadline).await?;
                // Renewed, but the body is gone.
                let Some(again) = again() else {
                    return Err(ProxyError::UpstreamRejectedToken);
                };
                tracing::info!(
                    route = %route.prefix,
                    request_id = log.request_id.to_str().unwrap_or("-"),
                    "Upstream rejected the token; retrying once with a new one."
                );
                token = fresh;
                sent.push(token.clone());
                next = again;
                renewed = true;
                waiting_since = Instant::now();
                continue;
            }
            let wait = retry::throttled_wait(
                route.config.retry_on_429,
                response.status(),
                response.headers(),
                throttled,
                deadline.saturating_duration_since(Instant::now()),
            );
            if let Some(wait) = wait
                && let Some(again) = again()
            {
                tracing::info!(
                    route = %route.prefix,
                    request_id = log.request_id.to_str().unwrap_or("-"),
                    status = response.status().as_u16(),
                    wait_ms = wait.as_millis() as u64,
                    "Upstream throttled the request; retrying after Retry-After."
                );
                drop(response);
                tokio::time::sleep(wait).await;
                token = route.tokens.get_before(deadline).await?;
                sent.push(token.clone());
                next = again;
                throttled += 1;
                waiting_since = Instant::now();
                continue;
            }
            log.upstream_ms = upstream_started.map(|started| started.elapsed().as_millis() as u64);
            return Ok((response, sent));
        }
    }

    /// One upstream exchange, up to the response head, within the route's deadline.
    async fn send_once(
        &self,
        request: Request<UpstreamBody>,
        deadline: Instant,
    ) -> Result<Response<UpstreamResponse>, ProxyError> {
        let response = timeout_at(deadline, self.upstream.request(request))
            .await?
            .map_err(|error| ProxyError::from_upstream(&error))?;
        // No request asked for an upgrade (`Upgrade` is never forwarded); relaying a 101
        // would hand the caller's connection to a protocol the proxy does not speak
        // (HTTP/2 has no 101 at all, RFC 9113 §8.6).
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Err(ProxyError::UpstreamSwitchedProtocols);
        }
        Ok(response)
    }

    /// The translator of a `$batch` request's inner requests (see `batch`), `None` for
    /// any other request.
    fn batch(
        &self,
        route: &RouteState,
        parts: &http::request::Parts,
        policy: RequestPolicy<'_>,
        public_base: Option<&str>,
    ) -> Result<Option<Batch>, ProxyError> {
        let prefixes: Vec<&str> = self.routes.iter().map(|r| &*r.prefix).collect();
        let context = batch::RequestContext {
            path: parts.uri.path(),
            route_prefix: &route.prefix,
            upstream_url: &route.upstream_url,
            upstream_authority: route.config.upstream.authority.as_str(),
            public_base,
            other_prefixes: &prefixes,
            policy,
        };
        Ok(Batch::for_request(&parts.method, &parts.headers, &context)?)
    }
}

/// The request as it leaves for the upstream (its token aside).
struct Outgoing<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: HeaderMap,
    body: UpstreamBody,
    deadline: Instant,
    /// When the request started waiting in the route's queue.
    queued_at: Instant,
    stats: &'a Arc<InboundStats>,
}

/// What the route's upstream links become, when the route rewrites them and the public
/// base is known.
fn link_map(route: &RouteState, public_base: Option<&str>) -> Option<LinkMap> {
    if !route.config.rewrite_links {
        return None;
    }
    let base = public_base?;
    Some(LinkMap::new(
        &route.upstream_url,
        &format!("{base}{}", route.prefix),
    ))
}

/// The translator of a SOAP request's WS-Addressing `To` (any route: the upstream checks
/// `To` whether or not the route rewrites links), when the public base is known. Only
/// for a SOAP request (`rewrite::is_soap_request`).
fn addressing(
    route: &RouteState,
    public_base: Option<&str>,
) -> Option<rewrite::AddressingRewriter> {
    let base = public_base?;
    Some(rewrite::AddressingRewriter::new(
        &format!("{base}{}", route.prefix),
        &route.upstream_url,
    ))
}

/// A `$batch` body is checked (up to its look-ahead) before anything is sent; a SOAP
/// envelope's `To` is translated as it passes. The length changes either way (a body kept
/// whole gets its new one from hyper).
async fn translate_body(
    body: UpstreamBody,
    headers: &mut HeaderMap,
    batch: Option<Batch>,
    addressing: Option<rewrite::AddressingRewriter>,
    deadline: Instant,
) -> Result<UpstreamBody, ProxyError> {
    match (batch, addressing) {
        (Some(batch), _) => {
            headers.remove(header::CONTENT_LENGTH);
            timeout_at(deadline, batch::translate_body(body, batch))
                .await?
                .map_err(|error| ProxyError::from_batch_body(&*error))
        }
        (None, Some(addressing)) => {
            headers.remove(header::CONTENT_LENGTH);
            Ok(body.translate(addressing))
        }
        (None, None) => Ok(body),
    }
}

/// A place in the route's queue (`max_concurrent`), when it has one: 503 when the queue
/// is full or the wait outlasts the deadline. Held until the response body is finished.
async fn acquire_slot(route: &RouteState, deadline: Instant) -> Result<Option<Permit>, ProxyError> {
    match &route.queue {
        Some(queue) => Ok(Some(queue.acquire(deadline).await?)),
        None => Ok(None),
    }
}

/// The request's turn under the route's `upstream_rate_limit`, when it has one: 503 when
/// the queue is full or the turn would come after `queue_timeout` (counted from
/// `waiting_since`) or the deadline. Returns whether the request had to wait.
async fn pace(
    route: &RouteState,
    waiting_since: Instant,
    deadline: Instant,
) -> Result<bool, ProxyError> {
    let Some(rate) = &route.rate else {
        return Ok(false);
    };
    let waited = rate.admit(waiting_since, deadline).await?;
    route.metrics.record_rate_wait(waited);
    if !waited.is_zero() {
        tracing::debug!(
            route = %route.prefix,
            waited_ms = waited.as_millis() as u64,
            "Waited for the upstream rate limit."
        );
    }
    Ok(!waited.is_zero())
}

/// A renewed token after the upstream answered 401 to `rejected`.
async fn renew_rejected(
    route: &RouteState,
    rejected: &Arc<Token>,
    deadline: Instant,
) -> Result<Arc<Token>, ProxyError> {
    match route.tokens.renew_rejected(rejected, deadline).await {
        Ok(Some(fresh)) => Ok(fresh),
        // Renewed moments ago already: renewing again would not help.
        Ok(None) => Err(ProxyError::UpstreamRejectedToken),
        // No new token (the provider fails, or not before the deadline): 503 with the
        // provider's reason and `Retry-After`. Not 502: no renewed token was refused, and
        // the old one stays in use for other requests.
        Err(error) => Err(ProxyError::TokenUnavailable(error)),
    }
}

/// The upstream's answer as the caller gets it: hop-by-hop headers dropped, links
/// rewritten (`rewrite_links`), every token of the exchange scrubbed, streaming until the
/// route's deadline.
fn shape_response(
    route: &RouteState,
    method: &Method,
    response: Response<UpstreamResponse>,
    sent: &[Arc<Token>],
    links: Option<LinkMap>,
    deadline: Instant,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut parts, body) = response.into_parts();
    headers::to_client(&mut parts.headers);
    parts.version = Version::default();
    let has_body = method != Method::HEAD
        && !matches!(
            parts.status,
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        );
    let mut rewriter =
        links.and_then(|links| rewrite::prepare(links, &mut parts.headers, has_body));
    // The slot's current token too: it may have been renewed since it was sent.
    let tokens = scrub::Tokens::new(sent.iter().chain(route.tokens.cached().as_ref()));
    let scrubber = scrub::prepare(tokens, &mut parts.headers, has_body, &mut rewriter)
        .map_err(|error| ProxyError::UpstreamFailed(error.to_string()))?;
    let body = ProxyBody::upstream(body, deadline, rewriter, scrubber);
    Ok(Response::from_parts(parts, body))
}

/// The answer when the pipeline itself panicked: a generic 500, nothing about the cause.
pub(crate) fn panic_response() -> Response<ProxyBody> {
    let body = r#"{"error":"internal_error","message":"the proxy failed to handle this request","route":null,"request_id":null}"#;
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn upstream_request(
    method: &Method,
    uri: &Uri,
    mut headers: HeaderMap,
    body: UpstreamBody,
    token: &Token,
) -> Request<UpstreamBody> {
    headers.insert(header::AUTHORIZATION, token.header().clone());
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = headers;
    request
}
