//! The listener: accepting connections, HTTP/1.1 and HTTP/2 on one port (h2c, or h2 and
//! http/1.1 by ALPN over inbound TLS), graceful drain.
//!
//! Owns connection-level concerns only — the connection cap, the TLS handshake and its
//! timeout, hyper's protocol limits (header bytes, header read timeout, HTTP/2 streams),
//! the HTTP/1 framing audit ([`framing`], on the decrypted bytes) and shutdown. The TLS
//! configuration itself is built in [`crate::inbound::tls`]. Everything about a single
//! request lives in [`crate::proxy`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::FutureExt as _;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use self::framing::{AuditedStream, Protocol};
use crate::config::Limits;
use crate::inbound::tls::TlsSession;
use crate::proxy::Pipeline;
use crate::proxy::headers::Peer;

pub(crate) mod framing;

/// Longest time in-flight requests get to finish after a shutdown signal.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept (typically EMFILE) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(500);

/// hyper's HTTP/1 and HTTP/2 server settings; a connection uses one or the other, as its
/// first bytes say ([`AuditedStream::protocol`]).
struct Builders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new(limits: &Limits) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            // The framing audit hands hyper whole heads of at most `max_header_bytes` and
            // answers larger ones itself (431 JSON); hyper's own limit, with room for the
            // bytes that follow a head in the same read, is never the one that trips.
            .max_buf_size(limits.max_header_bytes.saturating_mul(2))
            .keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(100)
            // h2 answers a bare 431 beyond this; up to it, the service sees the request and
            // answers 431 JSON with X-Request-Id above `max_header_bytes` (see
            // `header_list_size`). A client that honours the advertised setting never
            // sends more.
            .max_header_list_size(
                u32::try_from(limits.max_header_bytes.saturating_mul(2)).unwrap_or(u32::MAX),
            )
            .keep_alive_interval(Duration::from_secs(30));
        Self { http1, http2 }
    }
}

/// Serves `listener` until `shutdown` completes, then stops accepting and drains. With
/// `tls`, every connection starts with a TLS handshake. Each request runs on the pipeline
/// current when it arrives (a reload swaps it), and finishes on that one.
pub(crate) async fn serve(
    listener: TcpListener,
    pipelines: Arc<ArcSwap<Pipeline>>,
    limits: &Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tls.map(TlsAcceptor::from);
    // Shared: every connection's task would otherwise carry its own copy.
    let builders = Arc::new(Builders::new(limits));
    // Every connection holds a permit; draining is done when all are back.
    let max_connections = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let permits = Arc::new(Semaphore::new(max_connections as usize));
    let (stop, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(error = %error, "Accepting a connection failed; pausing.");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            builders: builders.clone(),
            pipelines: pipelines.clone(),
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            max_header_bytes: limits.max_header_bytes,
            stopping: stopping.clone(),
            peer,
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            match acceptor {
                None => connection.serve(stream, None).await,
                // SECURITY-CASES 2.2: a TLS handshake timeout (10 s by default); a
                // ClientHello that never comes or never finishes frees its slot then.
                // Boxed: the TLS states would otherwise make every task as large as the
                // largest of them, plaintext ones included.
                Some(acceptor) => Box::pin(async move {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(connection.header_read_timeout, handshake).await {
                        Ok(Ok(stream)) => {
                            let session = Arc::new(TlsSession::of(stream.get_ref().1));
                            connection.serve(stream, Some(session)).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(peer = %peer, error = %error, "TLS handshake failed.");
                        }
                        Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out."),
                    }
                })
                .await,
            }
            drop(permit);
        });
    }
    drop(listener);
    tracing::info!("Shutting down: no new connections; draining in-flight requests.");
    let _ = stop.send(true);
    tokio::select! {
        _ = permits.acquire_many(max_connections) => tracing::info!("All connections drained."),
        () = tokio::time::sleep(DRAIN_TIMEOUT) => {
            tracing::warn!(timeout_s = DRAIN_TIMEOUT.as_secs(), "Drain timed out; closing the remaining connections.");
        }
    }
}

/// When a connection last started a request, and how many it is answering.
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    /// Milliseconds after `epoch`.
    last_request_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_request_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn started(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_request_ms.store(now, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    fn finished(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// When the connection counts as idle, unless a request starts before then; `None`
    /// while one is being answered.
    fn idle_at(&self, idle_timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_request_ms.load(Ordering::Relaxed));
        Some(self.epoch + last + idle_timeout)
    }
}

/// Counts a request as in flight until its handler returns, panics included.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.finished();
    }
}

/// One accepted connection, ready to serve HTTP once its stream (TLS or not) is ready.
struct Connection {
    builders: Arc<Builders>,
    pipelines: Arc<ArcSwap<Pipeline>>,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    max_header_bytes: usize,
    stopping: watch::Receiver<bool>,
    peer: SocketAddr,
}

impl Connection {
    /// Serves requests until the connection ends; each request carries `tls`. The
    /// connection is shut down gracefully (in-flight requests finish, HTTP/2 gets a
    /// GOAWAY) when the proxy drains, or after `idle_timeout` without a request: hyper
    /// closes idle HTTP/1 connections itself, but an HTTP/2 client that answers pings
    /// would otherwise hold its slot forever.
    async fn serve<S>(self, stream: S, tls: Option<Arc<TlsSession>>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Self {
            builders,
            pipelines,
            header_read_timeout,
            idle_timeout,
            max_header_bytes,
            mut stopping,
            peer,
        } = self;
        let (mut stream, framing) =
            AuditedStream::new(stream, header_read_timeout, max_header_bytes);
        let protocol = tokio::select! {
            protocol = stream.protocol() => match protocol {
                Ok(Some(protocol)) => protocol,
                Ok(None) => return,
                Err(error) => {
                    tracing::debug!(peer = %peer, error = %error, "Connection ended before its first request.");
                    return;
                }
            },
            _ = stopping.wait_for(|stop| *stop) => return,
        };
        let activity = Arc::new(Activity::new());
        let forwarded_peer = Peer::new(peer.ip());
        let requests = activity.clone();
        let service = service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            let mut head = framing.next();
            // HTTP/2 heads bypass the audit: the header list is measured here instead.
            head.head_too_large |= request.version() == http::Version::HTTP_2
                && header_list_size(&request) > max_header_bytes;
            request.extensions_mut().insert(head);
            if let Some(tls) = &tls {
                request.extensions_mut().insert(tls.clone());
            }
            let pipeline = pipelines.load_full();
            requests.started();
            let in_flight = InFlight(requests.clone());
            let forwarded_peer = forwarded_peer.clone();
            // Boxed: hyper keeps room for one in-flight handler per connection for the
            // connection's whole life; boxed, an idle connection holds a pointer, not the
            // whole pipeline's state.
            Box::pin(async move {
                // A bug must cost one request a 500, not the connection (and with HTTP/2
                // every other stream on it) an abrupt close (SECURITY-CASES H5).
                let response = AssertUnwindSafe(pipeline.handle(request, forwarded_peer))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        tracing::error!(peer = %peer, "Request handler panicked; answered 500.");
                        crate::proxy::panic_response()
                    });
                drop(in_flight);
                Ok::<_, Infallible>(response)
            })
        });
        let io = TokioIo::new(stream);
        let served = Served {
            activity,
            idle_timeout,
            stopping,
            peer,
        };
        match protocol {
            Protocol::Http1 => {
                served
                    .drive(builders.http1.serve_connection(io, service))
                    .await;
            }
            Protocol::Http2 => {
                served
                    .drive(builders.http2.serve_connection(io, service))
                    .await;
            }
        }
    }
}

/// What a connection's HTTP driver needs besides the connection itself.
struct Served {
    activity: Arc<Activity>,
    idle_timeout: Duration,
    stopping: watch::Receiver<bool>,
    peer: SocketAddr,
}

impl Served {
    /// Runs `connection` to its end, shutting it down gracefully when the proxy drains or
    /// the connection has been idle for `idle_timeout`.
    async fn drive<C>(self, connection: C)
    where
        C: GracefulConnection,
        C::Error: std::fmt::Display,
    {
        let Self {
            activity,
            idle_timeout,
            mut stopping,
            peer,
        } = self;
        tokio::pin!(connection);
        let mut closing = false;
        loop {
            let idle_at = activity.idle_at(idle_timeout);
            tokio::select! {
                // The connection first: bytes already read (the replayed first ones) start
                // their request before a drain that arrived at the same time is seen.
                biased;
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(peer = %peer, error = %error, "Connection ended with an error.");
                    }
                    break;
                }
                _ = stopping.wait_for(|stop| *stop), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = sleep_until_or_forever(idle_at), if !closing => {
                    if activity.idle_at(idle_timeout).is_some_and(|at| at <= Instant::now()) {
                        tracing::debug!(peer = %peer, "Idle connection closed.");
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
        }
    }
}

/// Sleeps until `at`, or forever without one; re-evaluated on every loop turn.
async fn sleep_until_or_forever(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => {
            // Re-check now and then: the in-flight request may have finished.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// The size of a request's header list as HTTP/2 counts it (RFC 9113 §6.5.2): name and
/// value lengths plus 32 per field, pseudo-header fields included.
fn header_list_size<B>(request: &hyper::Request<B>) -> usize {
    const OVERHEAD: usize = 32;
    let uri = request.uri();
    let pseudo = [
        (":method".len(), request.method().as_str().len()),
        (":scheme".len(), uri.scheme_str().map_or(0, str::len)),
        (
            ":authority".len(),
            uri.authority().map_or(0, |a| a.as_str().len()),
        ),
        (
            ":path".len(),
            uri.path_and_query().map_or(0, |p| p.as_str().len()),
        ),
    ];
    let pseudo: usize = pseudo
        .iter()
        .filter(|(_, value)| *value > 0)
        .map(|(name, value)| name + value + OVERHEAD)
        .sum();
    let fields: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + OVERHEAD)
        .sum();
    pseudo + fields
}

/// The address a listener is bound to, for messages.
pub(crate) fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}
