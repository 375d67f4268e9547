//! The upstream connection pool, on hyper's connection API (`hyper::client::conn`).
//!
//! Connections are kept per upstream (scheme and authority), an [`Endpoint`]:
//!
//! - **HTTP/1.1**: idle connections wait in a stack, the most recently used (warmest) on
//!   top. A connection goes back on the stack when its response body has been read to the
//!   end ([`ResponseBody`]) and hyper says it can take the next request
//!   (`SendRequest::is_ready`); a body dropped before its end takes its connection with it
//!   (hyper closes it), so a half-read response never leaves a dirty connection in the
//!   pool. Idle connections are closed after `idle_timeout` by a timer task per upstream
//!   that runs only while something is idle.
//! - **HTTP/2**, when the upstream picks `h2` by ALPN (RFC 7301, RFC 9113 §3.2): one
//!   connection multiplexes every request; a new one replaces it when it closes.
//! - **A request that never left** — the pooled connection turned out closed (the upstream
//!   ended an idle keep-alive connection, RFC 9112 §9.3) before any byte of the request
//!   was written, which hyper reports by handing the request back — is sent once more on
//!   a fresh connection. A request that may have reached the upstream is never sent again
//!   (RFC 9110 §9.2.2: the proxy cannot know whether it was processed).
//!
//! Each connection is driven by one task on the runtime that opened it; nothing else is
//! spawned per request, except when a response ended before hyper's connection task
//! turned idle (a multi-thread runtime, or an upstream that answered before reading the
//! whole request body): then a small task waits for it before pooling the connection.

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::dns::GaiResolver;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower_service::Service;

use super::GuardedResolver;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// TCP (resolver guard, connect timeout, `TCP_NODELAY`, keepalive), then TLS with ALPN for
/// `https://` upstreams.
pub(crate) type Connector = HttpsConnector<HttpConnector<GuardedResolver<GaiResolver>>>;

/// Why an upstream exchange failed (before its response head).
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error("the upstream URI has no scheme or authority")]
    NoAuthority,
    #[error("connecting to the upstream failed")]
    Connect(#[source] BoxError),
    #[error("the HTTP handshake with the upstream failed")]
    Handshake(#[source] hyper::Error),
    #[error("the upstream exchange failed")]
    Exchange(#[source] hyper::Error),
}

/// The pooled upstream client. Cloning shares the pool; building one is cheap (no task,
/// no connection until the first request), so each worker of a thread-per-core runtime
/// can own one.
pub(crate) struct UpstreamClient<B> {
    shared: Arc<Shared<B>>,
}

impl<B> Clone for UpstreamClient<B> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<B> fmt::Debug for UpstreamClient<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let endpoints = lock(&self.shared.endpoints);
        f.debug_struct("UpstreamClient")
            .field("idle_timeout", &self.shared.idle_timeout)
            .field("upstreams", &endpoints.len())
            .finish_non_exhaustive()
    }
}

struct Shared<B> {
    connector: Connector,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// How long an idle HTTP/1.1 connection is kept (no cap on how many: as many as were
    /// busy at once).
    idle_timeout: Duration,
    /// One per upstream ever used: a handful, so a scan beats hashing.
    endpoints: Mutex<Vec<Arc<Endpoint<B>>>>,
}

/// The connections to one upstream (scheme and authority).
struct Endpoint<B> {
    /// The `Host` header of its HTTP/1.1 requests.
    host: Option<HeaderValue>,
    scheme: Scheme,
    authority: Authority,
    /// The pool's, for the idle reaper.
    idle_timeout: Duration,
    /// Whether ALPN has chosen HTTP/1.1 here (so its connections are not shared).
    speaks_http1: AtomicBool,
    /// Held while connecting to an upstream that may speak HTTP/2 (`https`, and ALPN has
    /// not chosen HTTP/1.1): the requests that find no connection wait for the one being
    /// made and share it, rather than each opening its own, as hyper-util's client does.
    connecting: tokio::sync::Mutex<()>,
    state: Mutex<State<B>>,
}

struct State<B> {
    /// Idle HTTP/1.1 connections, oldest first; requests take the last.
    idle: Vec<Idle<B>>,
    /// The upstream's HTTP/2 connection, shared by every request.
    h2: Option<http2::SendRequest<B>>,
    /// Whether the idle timer task runs.
    reaping: bool,
}

struct Idle<B> {
    sender: http1::SendRequest<B>,
    since: Instant,
}

/// A connection a request is about to use; `reused` when it served a request before
/// (only such a connection can have been closed by the upstream unnoticed).
enum Conn<B> {
    Http1 {
        sender: http1::SendRequest<B>,
        reused: bool,
    },
    Http2 {
        sender: http2::SendRequest<B>,
        reused: bool,
    },
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<B> UpstreamClient<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    pub(crate) fn new(connector: Connector, idle_timeout: Duration) -> Self {
        let http1 = http1::Builder::new();
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(false);
        Self {
            shared: Arc::new(Shared {
                connector,
                http1,
                http2,
                idle_timeout,
                endpoints: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Sends `request` (absolute URI) to its upstream and returns the response head; the
    /// body streams from the connection.
    pub(crate) async fn request(
        &self,
        mut request: Request<B>,
    ) -> Result<Response<ResponseBody<B>>, UpstreamError> {
        let endpoint = self.endpoint(request.uri())?;
        let mut fresh = false;
        loop {
            let pooled = if fresh { None } else { endpoint.checkout() };
            let conn = match pooled {
                Some(conn) => conn,
                // Rare: boxed, so that the request's future stays small.
                None => Box::pin(self.connect(&endpoint)).await?,
            };
            let (returned, error) = match conn {
                Conn::Http1 { mut sender, reused } => {
                    endpoint.http1_form(&mut request);
                    match sender.try_send_request(request).await {
                        Ok(response) => return Ok(ResponseBody::http1(response, sender, endpoint)),
                        Err(mut error) => (error.take_message().filter(|_| reused), error),
                    }
                }
                Conn::Http2 { mut sender, reused } => {
                    match sender.try_send_request(request).await {
                        Ok(response) => return Ok(ResponseBody::http2(response)),
                        Err(mut error) => (error.take_message().filter(|_| reused), error),
                    }
                }
            };
            match returned {
                // Never written: the pooled connection was found closed. Once, fresh.
                Some(mut back) if !fresh => {
                    tracing::debug!(
                        upstream = %endpoint.authority,
                        error = %error.error(),
                        "Pooled upstream connection closed before the request was sent; \
                         sending it on a new connection."
                    );
                    endpoint.absolute_form(&mut back);
                    request = back;
                    fresh = true;
                }
                _ => return Err(UpstreamError::Exchange(error.into_error())),
            }
        }
    }

    /// The pool of `uri`'s upstream.
    fn endpoint(&self, uri: &Uri) -> Result<Arc<Endpoint<B>>, UpstreamError> {
        let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
            return Err(UpstreamError::NoAuthority);
        };
        let mut endpoints = lock(&self.shared.endpoints);
        if let Some(endpoint) = endpoints
            .iter()
            .find(|e| e.authority == *authority && e.scheme == *scheme)
        {
            return Ok(Arc::clone(endpoint));
        }
        let endpoint = Arc::new(Endpoint {
            host: host_header(scheme, authority),
            scheme: scheme.clone(),
            authority: authority.clone(),
            idle_timeout: self.shared.idle_timeout,
            speaks_http1: AtomicBool::new(*scheme != Scheme::HTTPS),
            connecting: tokio::sync::Mutex::new(()),
            state: Mutex::new(State {
                idle: Vec::new(),
                h2: None,
                reaping: false,
            }),
        });
        endpoints.push(Arc::clone(&endpoint));
        Ok(endpoint)
    }

    /// A new connection to `endpoint`: HTTP/2 when ALPN chose `h2`, else HTTP/1.1. Its
    /// driver runs as a task on the current runtime.
    async fn connect(&self, endpoint: &Endpoint<B>) -> Result<Conn<B>, UpstreamError> {
        let _one_at_a_time = if endpoint.speaks_http1.load(Ordering::Relaxed) {
            None
        } else {
            let turn = endpoint.connecting.lock().await;
            // Made while this request waited: the HTTP/2 connection (or, when ALPN chose
            // HTTP/1.1 after all, an idle one).
            if let Some(conn) = endpoint.checkout() {
                return Ok(conn);
            }
            (!endpoint.speaks_http1.load(Ordering::Relaxed)).then_some(turn)
        };
        let mut connector = self.shared.connector.clone();
        let destination = Uri::builder()
            .scheme(endpoint.scheme.clone())
            .authority(endpoint.authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|error| UpstreamError::Connect(error.into()))?;
        let io = connector
            .call(destination)
            .await
            .map_err(UpstreamError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (mut sender, connection) = self
                .shared
                .http2
                .handshake(io)
                .await
                .map_err(UpstreamError::Handshake)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(error = %error, "Upstream HTTP/2 connection ended.");
                }
            });
            sender.ready().await.map_err(UpstreamError::Handshake)?;
            let mut state = lock(&endpoint.state);
            if state.h2.as_ref().is_none_or(http2::SendRequest::is_closed) {
                state.h2 = Some(sender.clone());
            }
            Ok(Conn::Http2 {
                sender,
                reused: false,
            })
        } else {
            endpoint.speaks_http1.store(true, Ordering::Relaxed);
            let (sender, connection) = self
                .shared
                .http1
                .handshake(io)
                .await
                .map_err(UpstreamError::Handshake)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(error = %error, "Upstream HTTP/1.1 connection ended.");
                }
            });
            Ok(Conn::Http1 {
                sender,
                reused: false,
            })
        }
    }
}

/// `host[:port]`, the port only when it is not the scheme's default.
fn host_header(scheme: &Scheme, authority: &Authority) -> Option<HeaderValue> {
    let default = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    let host = authority.host();
    match authority.port_u16() {
        Some(port) if port != default => HeaderValue::try_from(format!("{host}:{port}")).ok(),
        _ => HeaderValue::from_str(host).ok(),
    }
}

impl<B> Endpoint<B> {
    /// HTTP/1.1 wants the origin form (RFC 9112 §3.2.1) and a `Host` header (RFC 9112
    /// §3.2), derived from the upstream URI (the caller's `Host` is never forwarded).
    /// HTTP/2 takes both from the absolute URI (`:path`, `:authority`, RFC 9113 §8.3.1).
    fn http1_form(&self, request: &mut Request<B>) {
        if let Some(host) = &self.host
            && !request.headers().contains_key(header::HOST)
        {
            request.headers_mut().insert(header::HOST, host.clone());
        }
        let path = std::mem::take(request.uri_mut())
            .into_parts()
            .path_and_query;
        *request.uri_mut() = match path {
            Some(path) if path.as_str() != "/" => {
                let mut parts = http::uri::Parts::default();
                parts.path_and_query = Some(path);
                Uri::from_parts(parts).unwrap_or_default()
            }
            _ => Uri::default(),
        };
    }

    /// Back to the absolute form, for a request handed back unsent.
    fn absolute_form(&self, request: &mut Request<B>) {
        let path = std::mem::take(request.uri_mut())
            .into_parts()
            .path_and_query;
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path.unwrap_or_else(|| PathAndQuery::from_static("/")));
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
}

impl<B: Send + 'static> Endpoint<B> {
    /// A pooled connection: the shared HTTP/2 one, else the most recently idle HTTP/1.1
    /// one that is still open and not past the idle timeout.
    fn checkout(&self) -> Option<Conn<B>> {
        let mut state = lock(&self.state);
        if let Some(h2) = &state.h2 {
            if !h2.is_closed() {
                return Some(Conn::Http2 {
                    sender: h2.clone(),
                    reused: true,
                });
            }
            state.h2 = None;
        }
        let now = Instant::now();
        while let Some(idle) = state.idle.pop() {
            if now.saturating_duration_since(idle.since) >= self.idle_timeout {
                // The newest is too old: so are the rest.
                state.idle.clear();
                break;
            }
            if idle.sender.is_ready() {
                return Some(Conn::Http1 {
                    sender: idle.sender,
                    reused: true,
                });
            }
        }
        None
    }

    /// Pools an HTTP/1.1 connection that finished its exchange.
    fn put(self: &Arc<Self>, sender: http1::SendRequest<B>) {
        let mut state = lock(&self.state);
        state.idle.push(Idle {
            sender,
            since: Instant::now(),
        });
        if !state.reaping {
            state.reaping = true;
            tokio::spawn(reap(Arc::downgrade(self)));
        }
    }

    /// Returns a connection whose response has been read to the end: pooled now when
    /// hyper's connection task is ready for the next request, closed when it is closing,
    /// else pooled once it is ready.
    fn release(self: Arc<Self>, mut sender: http1::SendRequest<B>) {
        if sender.is_ready() {
            self.put(sender);
        } else if !sender.is_closed() {
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    self.put(sender);
                }
            });
        }
    }
}

/// Closes idle connections as they pass the idle timeout; ends when none is left idle.
async fn reap<B>(endpoint: Weak<Endpoint<B>>) {
    /// Clears the endpoint's flag if the task is cancelled with its runtime, so that the
    /// next connection pooled starts a new timer.
    struct Running<B> {
        endpoint: Weak<Endpoint<B>>,
        armed: bool,
    }
    impl<B> Drop for Running<B> {
        fn drop(&mut self) {
            if self.armed
                && let Some(endpoint) = self.endpoint.upgrade()
            {
                lock(&endpoint.state).reaping = false;
            }
        }
    }
    let mut running = Running {
        endpoint,
        armed: true,
    };
    loop {
        let Some(endpoint) = running.endpoint.upgrade() else {
            return;
        };
        let timeout = endpoint.idle_timeout;
        let now = Instant::now();
        let (expired, next) = {
            let mut state = lock(&endpoint.state);
            let old = state
                .idle
                .iter()
                .take_while(|idle| now.saturating_duration_since(idle.since) >= timeout)
                .count();
            let expired: Vec<_> = state.idle.drain(..old).collect();
            let next = state.idle.first().map(|idle| idle.since + timeout);
            if next.is_none() {
                state.reaping = false;
                running.armed = false;
            }
            (expired, next)
        };
        // Dropping a sender lets hyper close its idle connection.
        drop(expired);
        let Some(next) = next else {
            return;
        };
        drop(endpoint);
        tokio::time::sleep_until(next).await;
    }
}

/// An upstream response body. On HTTP/1.1 it carries its connection, which goes back to
/// the pool when the body has been read to its end and is closed when the body is
/// dropped before (hyper closes a connection whose response was not read).
pub(crate) struct ResponseBody<B> {
    inner: Incoming,
    connection: Option<(http1::SendRequest<B>, Arc<Endpoint<B>>)>,
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("inner", &self.inner)
            .field("pooled_on_end", &self.connection.is_some())
            .finish()
    }
}

impl<B: Send + 'static> ResponseBody<B> {
    fn http1(
        response: Response<Incoming>,
        sender: http1::SendRequest<B>,
        endpoint: Arc<Endpoint<B>>,
    ) -> Response<Self> {
        response.map(|inner| {
            let mut body = Self {
                inner,
                connection: Some((sender, endpoint)),
            };
            // Nothing to read (HEAD, 204, 304, `Content-Length: 0`): done already.
            if body.inner.is_end_stream() {
                body.release();
            }
            body
        })
    }

    fn http2(response: Response<Incoming>) -> Response<Self> {
        response.map(|inner| Self {
            inner,
            connection: None,
        })
    }

    fn release(&mut self) {
        if let Some((sender, endpoint)) = self.connection.take() {
            endpoint.release(sender);
        }
    }
}

impl<B: Send + 'static> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            // The end, or the last frame of a body of known length (its reader may stop
            // polling once `is_end_stream` says so).
            None => this.release(),
            Some(Ok(_)) if this.inner.is_end_stream() => this.release(),
            Some(Ok(_)) => {}
            Some(Err(_)) => this.connection = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
