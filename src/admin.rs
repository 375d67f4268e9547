//! The admin listener (`admin.listen`): `/healthz`, `/readyz` and `/metrics`, the status
//! page ([`console`]: `/`, `/status.json`, `POST /status/test`), and the client side of
//! `s2s-proxy healthcheck`.
//!
//! `/healthz` answers 200 while the process serves at all. `/readyz` answers 200 once every
//! (credential, scope) the routes use holds a valid token, 503 before that, after a token
//! is lost, and while draining; its JSON body names each route and credential with its
//! token state and last error (the public message: error code and AADSTS hint, never the
//! provider's body), and in fleet mode the cluster's state (`cluster`: the redacted Redis
//! URL, `available`, `subscribed`, `fallbacks`), which never fails the probe: a Redis
//! outage makes the limits local, the proxy still serves. `/metrics` is [`crate::metrics`] in the Prometheus text format. Every
//! other path or method is 404. Probes and `/metrics` need no authentication; the status
//! page needs `admin.auth` when set (401 with a Basic challenge otherwise), and validation
//! requires it when `admin.listen` is not a loopback address.
//!
//! The listener has its own small connection budget and a 2 s head timeout, so probes
//! answer within a second whatever the proxy port or other admin clients are doing: at the
//! budget, the oldest connection that has not sent a request (else the one idle the
//! longest) is closed to admit a new one.
//!
//! Not here: the proxy listener (`server`), what the metrics count (`metrics`).

use std::convert::Infallible;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs as _};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

mod console;

use crate::metrics;
use crate::reload::Runtime;
use crate::server::connections::Registry;
use crate::token::SlotStatus;

/// Concurrent admin connections; probes and a scraper need a handful.
const MAX_CONNECTIONS: usize = 16;
/// A scraper or probe that has not sent its request head by then is dropped (probes send
/// theirs at once; Kubernetes' default probe timeout is 1 s).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Default target of `s2s-proxy healthcheck`.
pub const DEFAULT_HEALTHCHECK_URL: &str = "http://127.0.0.1:9090/healthz";

/// Serves the admin endpoints on `listener` until the task is aborted (which also ends
/// its connections).
pub(crate) async fn serve(listener: TcpListener, runtime: Arc<Runtime>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let registry = Arc::new(Registry::default());
    let mut connections = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(error = %error, "Accepting an admin connection failed; pausing.");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => match registry.make_room(&permits).await {
                Some(permit) => permit,
                None => return,
            },
        };
        // Reap finished connections so the set does not grow.
        while connections.try_join_next().is_some() {}
        let runtime = runtime.clone();
        let registered = registry.register();
        connections.spawn(async move {
            let conn = registered.conn().clone();
            let requests = conn.clone();
            let service = service_fn(move |request: Request<Incoming>| {
                // In flight only for the call, and a caller that sent a request counts as
                // one worth keeping.
                let in_flight = requests.request_started();
                requests.authenticated();
                let runtime = runtime.clone();
                async move {
                    let response = answer(&runtime, request).await;
                    drop(in_flight);
                    Ok::<_, Infallible>(response)
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                biased;
                () = conn.closed_now() => {}
                _ = connection => {}
            }
            drop(registered);
            drop(permit);
        });
    }
}

async fn answer(runtime: &Runtime, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if matches!(path, "/" | "/status.json" | "/status/test") {
        return console_answer(runtime, request).await;
    }
    let method = request.method();
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let (ready, body) = readiness(runtime);
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            respond(status, "application/json", format!("{body:#}\n"))
        }
        "/metrics" => {
            // Queue depths are read at scrape time from the current pipeline, token series
            // from the current token cache.
            for (route, depth) in runtime.pipelines.load().queue_depths() {
                runtime
                    .metrics
                    .queued(route)
                    .set(i64::try_from(depth).unwrap_or(i64::MAX));
            }
            respond(
                StatusCode::OK,
                metrics::CONTENT_TYPE,
                runtime.metrics.render(
                    &runtime.token_status(),
                    &runtime.token_fetches(),
                    &runtime.current().credential_expiries,
                ),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The status page's endpoints, behind `admin.auth`.
async fn console_answer(runtime: &Runtime, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let generation = runtime.current();
    let auth = generation
        .config
        .admin
        .as_ref()
        .and_then(|a| a.auth.as_ref());
    let api_key_header = &generation.config.server.api_key_header;
    if !console::authorized(auth, request.headers(), api_key_header) {
        let mut response = text(StatusCode::UNAUTHORIZED, "authentication required\n");
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static(console::CHALLENGE),
        );
        return response;
    }
    let method = request.method().clone();
    match (request.uri().path(), method) {
        ("/", Method::GET | Method::HEAD) => {
            let mut response = respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                console::page(&console::status(runtime)),
            );
            let headers = response.headers_mut();
            if let Ok(csp) = header::HeaderValue::from_str(&console::CSP) {
                headers.insert(header::CONTENT_SECURITY_POLICY, csp);
            }
            headers.insert(
                header::X_CONTENT_TYPE_OPTIONS,
                header::HeaderValue::from_static("nosniff"),
            );
            headers.insert(
                header::REFERRER_POLICY,
                header::HeaderValue::from_static("no-referrer"),
            );
            response
        }
        ("/status.json", Method::GET | Method::HEAD) => respond(
            StatusCode::OK,
            "application/json",
            format!("{:#}\n", console::status(runtime)),
        ),
        ("/status/test", Method::POST) => {
            // Only JSON: a cross-site form can send no other content type than the three
            // CORS-safelisted ones, so it cannot trigger a test.
            let json = request
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(';').next())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
            if !json {
                return text(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "send Content-Type: application/json\n",
                );
            }
            let limited = http_body_util::Limited::new(request.into_body(), console::MAX_TEST_BODY);
            let Ok(body) = http_body_util::BodyExt::collect(limited).await else {
                return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n");
            };
            match console::test(runtime, &body.to_bytes()).await {
                Some(result) => {
                    respond(StatusCode::OK, "application/json", format!("{result:#}\n"))
                }
                None => text(
                    StatusCode::BAD_REQUEST,
                    "send {\"route\": \"/prefix/\"} naming a configured route\n",
                ),
            }
        }
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
    }
}

/// Ready when not draining and every slot holds a valid token; the body says why not.
fn readiness(runtime: &Runtime) -> (bool, Value) {
    let generation = runtime.current();
    let slots = generation.tokens.status();
    let draining = runtime.is_draining();
    let all_tokens = slots.iter().all(|s| s.has_valid_token);
    let ready = all_tokens && !draining;
    let find = |credential: &str, scope: Option<&str>| {
        slots
            .iter()
            .find(|s| s.credential == credential && s.scope.as_deref() == scope)
    };
    let routes: Vec<Value> = generation
        .config
        .routes
        .iter()
        .map(|route| {
            let slot = find(&route.credential, route.scope.as_deref());
            json!({
                "prefix": route.prefix,
                "credential": route.credential,
                "scope": route.scope,
                "token": slot.map_or("pending", token_state),
            })
        })
        .collect();
    let credentials: Vec<Value> = slots
        .iter()
        .map(|slot| {
            json!({
                "credential": slot.credential,
                "scope": slot.scope,
                "token": token_state(slot),
                "expires_in_s": slot.expires_in.map(|d| d.as_secs()),
                "last_error": slot.last_error,
                "permanent": slot.last_error_permanent,
                "fetches_ok": slot.fetches_ok,
                "fetches_failed": slot.fetches_failed,
            })
        })
        .collect();
    let status = match (draining, all_tokens) {
        (true, _) => "draining",
        (false, true) => "ready",
        (false, false) => "waiting_for_tokens",
    };
    let mut body = json!({ "status": status, "routes": routes, "credentials": credentials });
    if let Some(cluster) = runtime.cluster() {
        // An outage degrades the limits, not readiness: shown, never failing the probe.
        body["cluster"] = json!(cluster.status());
    }
    (ready, body)
}

/// `valid`: a token may be injected now; `failed`: none, and the last fetch failed;
/// `pending`: none yet, first fetch under way.
fn token_state(slot: &SlotStatus) -> &'static str {
    match (slot.has_valid_token, &slot.last_error) {
        (true, _) => "valid",
        (false, Some(_)) => "failed",
        (false, None) => "pending",
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", body.to_owned())
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

/// Why `s2s-proxy healthcheck` failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthcheckError {
    #[error("`{0}` is not an http:// URL with a host")]
    BadUrl(String),
    #[error("cannot reach {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the answer failed")]
    Io(#[from] std::io::Error),
    #[error("unreadable answer")]
    BadAnswer,
    #[error("answered HTTP {0}")]
    Status(u16),
}

/// A plain HTTP/1.0 `GET url`: success on a 2xx answer. Blocking, with `timeout` for each
/// step; for container health checks, where no shell or curl exists.
pub fn healthcheck(url: &str, timeout: Duration) -> Result<(), HealthcheckError> {
    let bad_url = || HealthcheckError::BadUrl(url.to_owned());
    let uri: http::Uri = url.parse().map_err(|_| bad_url())?;
    if uri.scheme_str() != Some("http") {
        return Err(bad_url());
    }
    let authority = uri.authority().ok_or_else(bad_url)?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let connect_error = |source| HealthcheckError::Connect {
        addr: authority.to_string(),
        source,
    };
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(connect_error)?
        .collect();
    let mut last_error = std::io::Error::other("no address");
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(error) => last_error = error,
        }
    }
    let mut stream = stream.ok_or_else(|| connect_error(last_error))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    write!(
        stream,
        "GET {target} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: s2s-proxy-healthcheck\r\n\r\n"
    )?;
    // The status line is all we need; bound what is read.
    let mut head = Vec::new();
    stream.take(1024).read_to_end(&mut head)?;
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let status: u16 = std::str::from_utf8(line)
        .ok()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or(HealthcheckError::BadAnswer)?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(HealthcheckError::Status(status))
    }
}
