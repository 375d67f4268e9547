//! The listener: accepting connections, HTTP/1.1 and HTTP/2 on one port (h2c, or h2 and
//! http/1.1 by ALPN over inbound TLS), graceful drain.
//!
//! Owns connection-level concerns only — the worker threads that accept ([`workers`]), the
//! connection cap shared by all of them (and which connections make room at it,
//! [`connections`]), the TLS handshake and its timeout, hyper's protocol
//! limits (header bytes, header read timeout, HTTP/2 streams), the deadlines of a
//! connection itself (first request, idle, a peer that stopped reading, repeated failed
//! authentication), the HTTP/1 framing audit ([`framing`], on the decrypted bytes) and
//! shutdown. The TLS configuration itself is built in [`crate::inbound::tls`]. Everything
//! about a single request lives in [`crate::proxy`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::FutureExt as _;
use http::{HeaderValue, header};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use self::connections::{Conn, Registry, TrackedBody, Watched};
use self::framing::{AuditedStream, Protocol};
use crate::config::Limits;
use crate::inbound::tls::TlsSession;
use crate::proxy::headers::Peer;
use crate::proxy::{Arrival, Caller, Pipeline};

pub(crate) mod connections;
pub(crate) mod framing;
pub(crate) mod workers;

/// Longest time in-flight requests get to finish after a shutdown signal.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after a failed accept (typically EMFILE) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(500);
/// Answers refused for failed authentication after which a connection is closed.
const MAX_REFUSALS: u32 = 3;
/// How long a connection the proxy shuts down (idle, silent, refused too often) has to
/// finish before it is dropped: a GOAWAY round trip, or the response being written.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

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

/// Where the listener is in its life; connections act on each change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    Serving,
    /// No new connections. HTTP/2 connections get a GOAWAY and HTTP/1 connections with a
    /// request in flight close after it; idle HTTP/1 connections stay open meanwhile, so
    /// a request that arrives on one is answered 503 `shutting_down` with
    /// `Connection: close` rather than finding the connection gone.
    Draining,
    /// Every in-flight request has finished (or the drain timed out): close everything.
    Closing,
}

/// What every worker's accept loop shares: the connection cap and the registry it
/// consults (so `max_connections` holds across workers), the drain every connection
/// follows, hyper's settings and the TLS acceptor. Built once per [`crate::Proxy`] run.
pub(crate) struct Serving {
    builders: Arc<Builders>,
    acceptor: Option<TlsAcceptor>,
    /// Every connection's timeouts and head limit.
    connection_limits: ConnectionLimits,
    /// Every connection holds a permit; draining is done when all are back.
    permits: Arc<Semaphore>,
    max_connections: u32,
    registry: Arc<Registry>,
    drain: watch::Sender<Drain>,
    /// Set once the drain is over (or the run was abandoned): workers stop, dropping
    /// whatever connections they still hold.
    finished: watch::Sender<bool>,
}

impl Serving {
    /// With `tls`, every connection starts with a TLS handshake.
    pub(crate) fn new(limits: &Limits, tls: Option<Arc<rustls::ServerConfig>>) -> Arc<Self> {
        let max_connections = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
        Arc::new(Self {
            // Shared: every connection's task would otherwise carry its own copy.
            builders: Arc::new(Builders::new(limits)),
            acceptor: tls.map(TlsAcceptor::from),
            connection_limits: ConnectionLimits::new(limits),
            permits: Arc::new(Semaphore::new(max_connections as usize)),
            max_connections,
            registry: Arc::new(Registry::default()),
            drain: watch::channel(Drain::Serving).0,
            finished: watch::channel(false).0,
        })
    }

    /// One worker's share of the serving: accepts on `listener` until the drain starts,
    /// then keeps its connections' tasks running until the drain is over ([`Serving::drain`],
    /// run once for all workers) or [`Serving::finish`]. Each request runs on the pipeline
    /// current when it arrives (a reload swaps it), and finishes on that one.
    pub(crate) async fn worker(&self, listener: TcpListener, pipelines: Arc<ArcSwap<Pipeline>>) {
        let mut finished = self.finished.subscribe();
        tokio::select! {
            () = self.accept(listener, pipelines) => {}
            _ = finished.wait_for(|finished| *finished) => return,
        }
        let _ = finished.wait_for(|finished| *finished).await;
    }

    async fn accept(&self, listener: TcpListener, pipelines: Arc<ArcSwap<Pipeline>>) {
        let mut draining = self.drain.subscribe();
        let permits = &self.permits;
        loop {
            let (stream, peer) = tokio::select! {
                _ = draining.wait_for(|drain| *drain != Drain::Serving) => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(error = %error, "Accepting a connection failed; pausing.");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let permit = match permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                // At max_connections: an idle or unauthenticated connection (of any
                // worker) makes room for this one; only when all are busy does it wait.
                Err(_) => match tokio::select! {
                    _ = draining.wait_for(|drain| *drain != Drain::Serving) => break,
                    permit = self.registry.make_room(permits) => permit,
                } {
                    Some(permit) => permit,
                    None => break,
                },
            };
            let _ = stream.set_nodelay(true);
            let registered = self.registry.register();
            let connection = Connection {
                builders: self.builders.clone(),
                pipelines: pipelines.clone(),
                limits: self.connection_limits,
                stopping: self.drain.subscribe(),
                conn: registered.conn().clone(),
                peer,
            };
            let acceptor = self.acceptor.clone();
            tokio::spawn(async move {
                let conn = registered.conn().clone();
                tokio::select! {
                    biased;
                    () = conn.closed_now() => {
                        tracing::debug!(peer = %peer, "Connection closed to admit a new one.");
                    }
                    () = connection.run(stream, acceptor) => {}
                }
                drop(registered);
                drop(permit);
            });
        }
    }

    /// The drain, once for every worker: no new connections, in-flight requests finish
    /// (at most [`DRAIN_TIMEOUT`]), then every connection closes and the workers stop.
    pub(crate) async fn drain(&self) {
        tracing::info!("Shutting down: no new connections; draining in-flight requests.");
        self.drain.send_replace(Drain::Draining);
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let _ = tokio::time::timeout_at(deadline, self.registry.quiet()).await;
        self.drain.send_replace(Drain::Closing);
        tokio::select! {
            _ = self.permits.acquire_many(self.max_connections) => tracing::info!("All connections drained."),
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(timeout_s = DRAIN_TIMEOUT.as_secs(), "Drain timed out; closing the remaining connections.");
            }
        }
        self.finish();
    }

    /// Stops every worker now, dropping their connections. Idempotent.
    pub(crate) fn finish(&self) {
        self.finished.send_replace(true);
    }
}

/// The limits a connection's task enforces itself.
#[derive(Debug, Clone, Copy)]
struct ConnectionLimits {
    header_read_timeout: Duration,
    idle_timeout: Duration,
    /// How long writes may wait for a peer that does not read.
    write_stall_timeout: Duration,
    /// Largest request head (the audit's limit for HTTP/1, measured here for HTTP/2).
    max_header_bytes: usize,
}

impl ConnectionLimits {
    fn new(limits: &Limits) -> Self {
        Self {
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
            write_stall_timeout: limits.body_idle_timeout,
            max_header_bytes: limits.max_header_bytes,
        }
    }
}

/// One accepted connection, ready to serve HTTP once its stream (TLS or not) is ready.
struct Connection {
    builders: Arc<Builders>,
    pipelines: Arc<ArcSwap<Pipeline>>,
    limits: ConnectionLimits,
    stopping: watch::Receiver<Drain>,
    conn: Arc<Conn>,
    peer: SocketAddr,
}

impl Connection {
    /// The TLS handshake, when there is one, then HTTP.
    async fn run(self, stream: TcpStream, acceptor: Option<TlsAcceptor>) {
        let peer = self.peer;
        match acceptor {
            None => self.serve(stream, None).await,
            // A TLS handshake timeout (10 s by default, SECURITY.md "Resource exhaustion"); a
            // ClientHello that never comes or never finishes frees its slot then.
            // Boxed: the TLS states would otherwise make every task as large as the
            // largest of them, plaintext ones included.
            Some(acceptor) => {
                Box::pin(async move {
                    let handshake = acceptor.accept(stream);
                    match tokio::time::timeout(self.limits.header_read_timeout, handshake).await {
                        Ok(Ok(stream)) => {
                            let session = Arc::new(TlsSession::of(stream.get_ref().1));
                            self.serve(stream, Some(session)).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(peer = %peer, error = %error, "TLS handshake failed.");
                        }
                        Err(_) => tracing::debug!(peer = %peer, "TLS handshake timed out."),
                    }
                })
                .await;
            }
        }
    }

    /// Serves requests until the connection ends; each request carries `tls`. See
    /// [`Served::drive`] for when the proxy ends the connection itself.
    async fn serve<S>(self, stream: S, tls: Option<Arc<TlsSession>>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Self {
            builders,
            pipelines,
            limits,
            mut stopping,
            conn,
            peer,
        } = self;
        let max_header_bytes = limits.max_header_bytes;
        let (mut stream, framing) =
            AuditedStream::new(stream, limits.header_read_timeout, max_header_bytes);
        let protocol = tokio::select! {
            protocol = stream.protocol() => match protocol {
                Ok(Some(protocol)) => protocol,
                Ok(None) => return,
                Err(error) => {
                    tracing::debug!(peer = %peer, error = %error, "Connection ended before its first request.");
                    return;
                }
            },
            _ = stopping.wait_for(|drain| *drain != Drain::Serving) => return,
        };
        let forwarded_peer = Peer::new(peer.ip());
        let requests = conn.clone();
        let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let mut head = framing.next();
            // HTTP/2 heads bypass the audit: the header list is measured here instead.
            head.head_too_large |= request.version() == http::Version::HTTP_2
                && header_list_size(&request) > max_header_bytes;
            let arrival = Arrival {
                peer: forwarded_peer.clone(),
                framing: head,
                tls: tls.clone(),
            };
            let pipeline = pipelines.load_full();
            let in_flight = requests.request_started();
            let conn = requests.clone();
            // Boxed: hyper keeps room for one in-flight handler per connection for the
            // connection's whole life; boxed, an idle connection holds a pointer, not the
            // whole pipeline's state.
            Box::pin(async move {
                // A bug must cost one request a 500, not the connection (and with HTTP/2
                // every other stream on it) an abrupt close (SECURITY.md catalogue H5).
                let (mut response, caller) = AssertUnwindSafe(pipeline.handle(request, arrival))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        tracing::error!(peer = %peer, "Request handler panicked; answered 500.");
                        (crate::proxy::panic_response(), None)
                    });
                match caller {
                    Some(Caller::Authenticated) => conn.authenticated(),
                    Some(Caller::Refused) if conn.refused() >= MAX_REFUSALS => {
                        // A caller that keeps failing to authenticate gets no more tries
                        // on this connection: HTTP/1 closes after this answer, HTTP/2
                        // gets a GOAWAY.
                        tracing::debug!(peer = %peer, refusals = MAX_REFUSALS, "Closing a connection that keeps failing authentication.");
                        if protocol == Protocol::Http1 {
                            response
                                .headers_mut()
                                .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        }
                        conn.request_shutdown();
                    }
                    Some(Caller::Refused) | None => {}
                }
                // The request stays in flight until hyper has written its body.
                Ok::<_, Infallible>(response.map(|body| TrackedBody::new(body, in_flight)))
            })
        });
        let io = TokioIo::new(Watched::new(stream, conn.clone()));
        let served = Served {
            conn,
            limits,
            protocol,
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
    conn: Arc<Conn>,
    limits: ConnectionLimits,
    protocol: Protocol,
    stopping: watch::Receiver<Drain>,
    peer: SocketAddr,
}

impl Served {
    /// Runs `connection` to its end. It is shut down gracefully (in-flight requests
    /// finish, HTTP/2 gets a GOAWAY) as the drain says ([`Drain`]); when an HTTP/2 peer
    /// has sent no request within `header_read_timeout` (a preface and pings are not a
    /// request; HTTP/1 heads have their own deadline in [`AuditedStream`] and hyper);
    /// after `idle_timeout` without a request in flight (hyper closes idle HTTP/1
    /// connections itself at `header_read_timeout`, but an HTTP/2 client that answers
    /// pings would otherwise hold its slot forever); and after [`MAX_REFUSALS`] failed
    /// authentications. A connection that does not finish within [`CLOSE_GRACE`] of such
    /// a shutdown is dropped, and so is one whose writes have waited for the peer for
    /// `body_idle_timeout` (a client that stopped reading).
    async fn drive<C>(self, connection: C)
    where
        C: GracefulConnection,
        C::Error: std::fmt::Display,
    {
        let Self {
            conn,
            limits,
            protocol,
            mut stopping,
            peer,
        } = self;
        tokio::pin!(connection);
        let first_request_by =
            (protocol == Protocol::Http2).then(|| Instant::now() + limits.header_read_timeout);
        // When a graceful shutdown has begun: by when the connection must be gone (none
        // while draining: the drain has its own limit).
        let mut shut_down = false;
        let mut drop_at: Option<Instant> = None;
        let mut drain = *stopping.borrow_and_update();
        let mut drain_open = true;
        let tick = in_flight_tick(limits);
        loop {
            if !shut_down && wants_shutdown(drain, protocol, &conn) {
                connection.as_mut().graceful_shutdown();
                shut_down = true;
            }
            let wake = next_check(
                &conn,
                protocol,
                limits,
                first_request_by,
                shut_down,
                drop_at,
            );
            conn.plan_check(wake, tick);
            tokio::select! {
                // The connection first: bytes already read (the replayed first ones) start
                // their request before a drain that arrived at the same time is seen.
                biased;
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(peer = %peer, error = %error, "Connection ended with an error.");
                    }
                    return;
                }
                changed = stopping.changed(), if drain_open => match changed {
                    Ok(()) => drain = *stopping.borrow_and_update(),
                    Err(_) => {
                        drain = Drain::Closing;
                        drain_open = false;
                    }
                },
                // A request started: look at its writes now and then.
                () = conn.request_seen() => {}
                () = conn.shutdown_requested(), if !shut_down => {
                    connection.as_mut().graceful_shutdown();
                    shut_down = true;
                    drop_at = Some(Instant::now() + CLOSE_GRACE);
                }
                () = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    if drop_at.is_some_and(|at| at <= now) {
                        tracing::debug!(peer = %peer, "Connection did not close after its shutdown; dropped.");
                        return;
                    }
                    if stalled_since(&conn, protocol)
                        .is_some_and(|since| since + limits.write_stall_timeout <= now)
                    {
                        tracing::debug!(peer = %peer, "Peer stopped reading; connection dropped.");
                        return;
                    }
                    if shut_down {
                        continue;
                    }
                    let silent = first_request_by.is_some_and(|at| at <= now) && !conn.has_requested();
                    let idle = conn.idle_at(limits.idle_timeout).is_some_and(|at| at <= now);
                    if silent || idle {
                        tracing::debug!(peer = %peer, silent, "Idle connection closed.");
                        connection.as_mut().graceful_shutdown();
                        shut_down = true;
                        drop_at = Some(now + CLOSE_GRACE);
                    }
                }
            }
        }
    }
}

/// Whether the drain wants this connection shut down now.
fn wants_shutdown(drain: Drain, protocol: Protocol, conn: &Conn) -> bool {
    match drain {
        Drain::Serving => false,
        Drain::Draining => protocol == Protocol::Http2 || conn.in_flight() > 0,
        Drain::Closing => true,
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

/// Since when the connection's writes have made no progress although something waits to
/// be written. HTTP/1: a write the peer does not take (a response body waiting behind a
/// socket that is read, however slowly, is not stalled). HTTP/2 also: a response body
/// hyper does not ask for more of, as the stream's window stays closed.
fn stalled_since(conn: &Conn, protocol: Protocol) -> Option<Instant> {
    let blocked = conn.write_blocked_since();
    match protocol {
        Protocol::Http1 => blocked,
        Protocol::Http2 => match (blocked, conn.body_stalled_since()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
    }
}

/// When a connection's driver next looks at its timers. While a request is in flight it
/// looks now and then, for writes that stopped progressing.
fn next_check(
    conn: &Conn,
    protocol: Protocol,
    limits: ConnectionLimits,
    first_request_by: Option<Instant>,
    shut_down: bool,
    drop_at: Option<Instant>,
) -> Instant {
    let now = Instant::now();
    let mut wake = now + Duration::from_secs(3600);
    let mut earliest = |at: Option<Instant>| {
        if let Some(at) = at {
            wake = wake.min(at);
        }
    };
    earliest(drop_at);
    earliest(stalled_since(conn, protocol).map(|since| since + limits.write_stall_timeout));
    if conn.in_flight() > 0 {
        earliest(Some(now + in_flight_tick(limits)));
    }
    if !shut_down {
        earliest(first_request_by.filter(|_| !conn.has_requested()));
        earliest(conn.idle_at(limits.idle_timeout));
    }
    wake
}

/// How often a connection's driver looks at its timers while a request is in flight.
fn in_flight_tick(limits: ConnectionLimits) -> Duration {
    (limits.write_stall_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// The address a listener is bound to, for messages.
pub(crate) fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}
