//! The request pipeline.
//!
//! [`Pipeline::handle`] is the only place an error becomes a response. The steps, in order:
//!
//! 1. **check** the request itself (method, target form, `Host`, duplicate credentials,
//!    path safety) — 400 / 405;
//! 2. **authenticate** the caller — 401; nothing after this runs for unknown callers, so
//!    they can never cause a token request;
//! 3. **route** by the longest prefix — 404 — and **authorize** the client for it — 403;
//! 4. **token**: the route's cached bearer token — 503 when none is valid;
//! 5. **forward** with the token injected, streaming both bodies; an upstream 401 to the
//!    token we sent renews it and replays the request once when the body was small
//!    enough to keep — 502 / 504 on upstream failure.

pub(crate) mod access_log;
pub(crate) mod body;
mod checks;
mod error;
mod headers;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::Incoming;
use tokio::time::{Instant, timeout_at};

use self::access_log::AccessLog;
use self::body::{InboundStats, ProxyBody, ProxyBodyError, UpstreamBody};
use self::error::ProxyError;
use self::headers::{Forwarding, X_REQUEST_ID};
use crate::config::{Config, Limits, Route};
use crate::inbound::{Authenticator, ClientSet};
use crate::metrics::Metrics;
use crate::routing::{self, RouteTable};
use crate::token::{Token, TokenCache, TokenSlot};
use crate::upstream::UpstreamClient;

/// A route with everything resolved for the hot path.
#[derive(Debug)]
struct RouteState {
    prefix: Arc<str>,
    config: Route,
    clients: ClientSet,
    tokens: Arc<TokenSlot>,
}

/// Shared state of the request pipeline for one configuration.
#[derive(Debug)]
pub(crate) struct Pipeline {
    authenticator: Authenticator,
    client_names: Vec<Arc<str>>,
    table: RouteTable,
    routes: Vec<RouteState>,
    upstream: UpstreamClient<UpstreamBody>,
    limits: Limits,
    draining: AtomicBool,
    metrics: Metrics,
}

impl Pipeline {
    pub(crate) fn new(
        config: &Config,
        tokens: &TokenCache,
        upstream: UpstreamClient<UpstreamBody>,
        metrics: &Metrics,
    ) -> Self {
        let authenticator = Authenticator::new(config);
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
                config: route.clone(),
            })
            .collect();
        Self {
            client_names: config
                .clients
                .iter()
                .map(|c| Arc::from(c.name.as_str()))
                .collect(),
            authenticator,
            table: RouteTable::new(config.routes.iter().map(|r| r.prefix.as_str())),
            routes,
            upstream,
            limits: config.server.limits.clone(),
            draining: AtomicBool::new(false),
            metrics: metrics.clone(),
        }
    }

    /// From now on, new requests get 503 `shutting_down`.
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Answers one request. Never fails: every error becomes its JSON response here.
    pub(crate) async fn handle(
        &self,
        request: Request<Incoming>,
        peer: IpAddr,
    ) -> Response<ProxyBody> {
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
            metrics: self.metrics.clone(),
            in_flight: None,
        };
        let mut response = match self.pipeline(request, peer, &mut log).await {
            Ok(response) => response,
            Err(error) => {
                match &error {
                    // Each failed token fetch is logged once by the token cache; the
                    // requests that find no token are not worth a warning each.
                    ProxyError::TokenUnavailable(_) | ProxyError::ShuttingDown => {
                        tracing::debug!(
                            request_id = request_id.to_str().unwrap_or("-"),
                            route = log.route.as_deref().unwrap_or("-"),
                            error = %error,
                            "Request refused."
                        );
                    }
                    _ if error.status().is_server_error() => tracing::warn!(
                        request_id = request_id.to_str().unwrap_or("-"),
                        route = log.route.as_deref().unwrap_or("-"),
                        error = %error,
                        "Request failed."
                    ),
                    _ => tracing::debug!(
                        request_id = request_id.to_str().unwrap_or("-"),
                        error = %error,
                        "Request refused."
                    ),
                }
                log.error = Some(error.code());
                error.into_response(log.route.as_deref(), &request_id)
            }
        };
        response.headers_mut().insert(X_REQUEST_ID, request_id);
        log.status = response.status().as_u16();
        response.body_mut().set_access_log(log);
        response
    }

    async fn pipeline(
        &self,
        request: Request<Incoming>,
        peer: IpAddr,
        log: &mut AccessLog,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(ProxyError::ShuttingDown);
        }
        checks::check(&request, self.authenticator.api_key_header())?;

        let client_ip = self.authenticator.client_ip(request.headers(), peer);
        let client = self
            .authenticator
            .authenticate(request.headers(), client_ip)?;
        log.client = Some(self.client_names[client.index()].clone());

        let (index, rest) = self
            .table
            .lookup(request.uri().path())
            .ok_or(ProxyError::NotFound)?;
        let route = &self.routes[index];
        log.route = Some(route.prefix.clone());
        log.in_flight = Some(self.metrics.in_flight(&route.prefix));
        if !route.clients.admits(client) {
            return Err(ProxyError::Forbidden);
        }
        if content_length(request.headers()).is_some_and(|len| len > self.limits.max_body_bytes) {
            return Err(ProxyError::PayloadTooLarge);
        }
        let uri = routing::upstream_uri(&route.config.upstream, rest, request.uri().query())
            .map_err(|_| ProxyError::BadRequest("the request target cannot be forwarded"))?;

        self.forward(route, uri, request, peer, log).await
    }

    async fn forward(
        &self,
        route: &RouteState,
        uri: Uri,
        request: Request<Incoming>,
        peer: IpAddr,
        log: &mut AccessLog,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let deadline = log.started + route.config.timeout;
        let (parts, inbound) = request.into_parts();
        let headers = headers::to_upstream(
            parts.headers,
            &Forwarding {
                peer,
                peer_is_trusted_proxy: self.authenticator.is_trusted_proxy(peer),
                proto: "http",
                api_key_header: self.authenticator.api_key_header(),
                request_id: &log.request_id,
                authority: parts.uri.authority(),
            },
        );
        let stats = Arc::new(InboundStats::default());
        let body = timeout_at(
            deadline,
            body::prepare(inbound, self.limits.max_body_bytes, stats.clone()),
        )
        .await
        .map_err(|_| ProxyError::UpstreamTimeout)?
        .map_err(|error| match error {
            ProxyBodyError::TooLarge => ProxyError::PayloadTooLarge,
            ProxyBodyError::Inbound(_) => {
                ProxyError::BadRequest("the request body could not be read")
            }
        })?;

        // Taken only now, after waiting for a small body, so that the token is fresh when
        // the request leaves.
        let mut token = route.tokens.get().await?;
        // A small body is kept (with the headers) so the request can be sent again once.
        let mut replay = body.replay().map(|body| (body, headers.clone()));
        let mut next = (body, headers);
        let mut renewed = false;
        let upstream_started = Instant::now();
        loop {
            let (body, headers) = next;
            let request = upstream_request(&parts.method, &uri, headers, body, &token);
            let result = timeout_at(deadline, self.upstream.request(request)).await;
            log.bytes_in = stats.received();
            let response = match result {
                Err(_) => return Err(ProxyError::UpstreamTimeout),
                Ok(Err(_)) if stats.too_large() => return Err(ProxyError::PayloadTooLarge),
                Ok(Err(error)) => return Err(ProxyError::UpstreamFailed(error_chain(&error))),
                Ok(Ok(response)) => response,
            };
            if response.status() == StatusCode::UNAUTHORIZED {
                // The upstream refuses the proxy's token, not the caller: the caller's own
                // credentials were fine. Renew (whatever the body), retry once if we can.
                if renewed {
                    return Err(ProxyError::UpstreamRejectedToken);
                }
                let again = replay.take();
                match route.tokens.renew_rejected(&token).await {
                    Ok(Some(fresh)) if let Some(again) = again => {
                        tracing::info!(
                            route = %route.prefix,
                            request_id = log.request_id.to_str().unwrap_or("-"),
                            "Upstream rejected the token; retrying once with a new one."
                        );
                        token = fresh;
                        next = again;
                        renewed = true;
                        continue;
                    }
                    // Renewed, but the body is gone; or renewed moments ago already.
                    Ok(_) => return Err(ProxyError::UpstreamRejectedToken),
                    Err(error) => return Err(ProxyError::TokenUnavailable(error)),
                }
            }
            log.upstream_ms = Some(upstream_started.elapsed().as_millis() as u64);
            let (mut parts, body) = response.into_parts();
            headers::to_client(&mut parts.headers);
            parts.version = Version::default();
            return Ok(Response::from_parts(
                parts,
                ProxyBody::upstream(body, deadline),
            ));
        }
    }
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

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// An error and its sources on one line, for the log (never for a response body).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
