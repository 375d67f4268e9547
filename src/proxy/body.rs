//! Body types on both sides of the proxy.
//!
//! [`UpstreamBody`] is what is sent upstream: either the whole inbound body when it is
//! small enough to keep for a retry, or the inbound stream (behind whatever prefix was
//! read while finding that out), counted against `server.limits.max_body_bytes`.
//! [`ProxyBody`] is what the caller receives: a proxy-made JSON body or the upstream's
//! stream, cut off at the route deadline and, on `rewrite_links` routes, passed through the
//! link rewriter, then (textual bodies) through the token [`Scrubber`]; when it is done
//! (or dropped) it releases the route's queue slot and writes the access-log line, so the
//! line carries the real byte count. The route deadline does not wait to be polled: hyper
//! stops polling a body whose caller does not read (a full TCP or HTTP/2 window), so a
//! watchdog task drops the upstream's body and releases the queue slot when the deadline
//! passes ([`Held`]).

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::access_log::AccessLog;
use super::queue::Permit;
use super::scrub::Scrubber;
use crate::rewrite::{AddressingRewriter, BodyRewriter};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The upstream's response body (its HTTP/1.1 connection goes back to the pool when it
/// has been read to the end).
pub(crate) type UpstreamResponse = crate::upstream::ResponseBody<UpstreamBody>;

/// Bodies up to this size are kept in memory so a request can be replayed once after the
/// upstream rejected its token.
pub(crate) const REPLAY_LIMIT: usize = 64 * 1024;

/// The inbound body exceeded `max_body_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the configured limit")]
pub(crate) struct BodyTooLarge;

/// The route deadline passed while the response was streaming.
#[derive(Debug, thiserror::Error)]
#[error("route timeout reached while streaming the response")]
pub(crate) struct DeadlineReached;

/// The caller paused longer than `server.limits.body_idle_timeout` inside its body.
#[derive(Debug, thiserror::Error)]
#[error("no request body data within the body idle timeout")]
pub(crate) struct BodyIdle;

/// How much of the inbound body was read, shared with the upstream body. (Why a body
/// failed travels as the error itself: [`BodyTooLarge`], [`BodyIdle`].)
#[derive(Debug, Default)]
pub(crate) struct InboundStats {
    received: AtomicU64,
}

impl InboundStats {
    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// Limits on reading the inbound body.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimits {
    pub(crate) max_bytes: u64,
    pub(crate) idle_timeout: Duration,
}

/// Reads the inbound body until it ends or passes [`REPLAY_LIMIT`]. Returns the complete
/// body when it fits, or a streaming body that starts with what was already read. Every
/// byte read here counts against `max_bytes` (whatever the framing: a chunked body has no
/// length to check up front), so a body found too large before anything was sent is
/// refused before anything is sent.
pub(crate) async fn prepare(
    mut inbound: Incoming,
    limits: BodyLimits,
    stats: Arc<InboundStats>,
) -> Result<UpstreamBody, ProxyBodyError> {
    let max_bytes = limits.max_bytes;
    if inbound.is_end_stream() {
        return Ok(UpstreamBody::Buffered(None));
    }
    if inbound.size_hint().lower() > REPLAY_LIMIT as u64 {
        return Ok(UpstreamBody::streaming(None, inbound, limits, stats));
    }
    let mut buffer = bytes::BytesMut::new();
    loop {
        let frame = tokio::time::timeout(
            limits.idle_timeout,
            std::future::poll_fn(|cx| Pin::new(&mut inbound).poll_frame(cx)),
        )
        .await;
        let Ok(frame) = frame else {
            return Err(BodyIdle.into());
        };
        match frame {
            None => {
                let body = buffer.freeze();
                stats.received.store(body.len() as u64, Ordering::Relaxed);
                return Ok(UpstreamBody::Buffered(Some(body)));
            }
            Some(Err(error)) => return Err(ProxyBodyError::Inbound(error)),
            Some(Ok(frame)) => {
                // Trailers are not forwarded.
                if let Ok(data) = frame.into_data() {
                    buffer.extend_from_slice(&data);
                }
                if buffer.len() as u64 > max_bytes {
                    stats.received.store(buffer.len() as u64, Ordering::Relaxed);
                    return Err(BodyTooLarge.into());
                }
                if buffer.len() > REPLAY_LIMIT {
                    let prefix = buffer.freeze();
                    return Ok(UpstreamBody::streaming(
                        Some(prefix),
                        inbound,
                        limits,
                        stats,
                    ));
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyBodyError {
    #[error(transparent)]
    TooLarge(#[from] BodyTooLarge),
    #[error(transparent)]
    Idle(#[from] BodyIdle),
    #[error("reading the request body failed: {0}")]
    Inbound(hyper::Error),
}

/// The body of a forwarded request.
#[derive(Debug)]
pub(crate) enum UpstreamBody {
    /// The whole body (or none); can be sent again.
    Buffered(Option<Bytes>),
    Streaming(Box<Streaming>),
    /// A `$batch` body being translated (see `batch`).
    Batch(Box<super::batch::BatchStream>),
}

#[derive(Debug)]
pub(crate) struct Streaming {
    prefix: Option<Bytes>,
    rest: Incoming,
    remaining: u64,
    stats: Arc<InboundStats>,
    idle_timeout: Duration,
    /// Re-armed on every piece of the body.
    idle: Pin<Box<Sleep>>,
    /// Translates a SOAP envelope's WS-Addressing `To` as it streams.
    addressing: Option<Box<AddressingRewriter>>,
}

impl UpstreamBody {
    fn streaming(
        prefix: Option<Bytes>,
        rest: Incoming,
        limits: BodyLimits,
        stats: Arc<InboundStats>,
    ) -> Self {
        let already = prefix.as_ref().map_or(0, |p| p.len() as u64);
        stats.received.store(already, Ordering::Relaxed);
        Self::Streaming(Box::new(Streaming {
            prefix,
            rest,
            remaining: limits.max_bytes.saturating_sub(already),
            stats,
            idle_timeout: limits.idle_timeout,
            idle: Box::pin(tokio::time::sleep(limits.idle_timeout)),
            addressing: None,
        }))
    }

    /// The body with its WS-Addressing `To` translated: at once when it is kept whole
    /// (so it can still be replayed), else as it streams.
    pub(crate) fn translate(self, mut addressing: AddressingRewriter) -> Self {
        match self {
            Self::Buffered(None) => Self::Buffered(None),
            Self::Buffered(Some(body)) => {
                let mut out = BytesMut::from(&addressing.push(&body)[..]);
                out.extend_from_slice(&addressing.finish());
                Self::Buffered(Some(out.freeze()))
            }
            Self::Streaming(mut streaming) => {
                streaming.prefix = streaming.prefix.map(|prefix| addressing.push(&prefix));
                streaming.addressing = Some(Box::new(addressing));
                Self::Streaming(streaming)
            }
            // A `$batch` body is not a SOAP envelope; its parts are translated by `batch`.
            Self::Batch(batch) => Self::Batch(batch),
        }
    }

    /// A copy for a second attempt, if this body can be replayed.
    pub(crate) fn replay(&self) -> Option<UpstreamBody> {
        match self {
            Self::Buffered(body) => Some(Self::Buffered(body.clone())),
            Self::Streaming(_) | Self::Batch(_) => None,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Buffered(body) => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
            Self::Batch(batch) => Pin::new(batch.as_mut()).poll_frame(cx),
            Self::Streaming(streaming) => {
                if let Some(prefix) = streaming.prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                loop {
                    let frame = match Pin::new(&mut streaming.rest).poll_frame(cx) {
                        Poll::Pending => {
                            if streaming.idle.as_mut().poll(cx).is_ready() {
                                return Poll::Ready(Some(Err(BodyIdle.into())));
                            }
                            return Poll::Pending;
                        }
                        Poll::Ready(None) => {
                            let tail = streaming.addressing.take().map(|mut a| a.finish());
                            return Poll::Ready(tail.map(|tail| Ok(Frame::data(tail))));
                        }
                        Poll::Ready(Some(Err(error))) => {
                            return Poll::Ready(Some(Err(error.into())));
                        }
                        Poll::Ready(Some(Ok(frame))) => frame,
                    };
                    let deadline = Instant::now() + streaming.idle_timeout;
                    streaming.idle.as_mut().reset(deadline);
                    // Trailers are not forwarded.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    let len = data.len() as u64;
                    streaming.stats.received.fetch_add(len, Ordering::Relaxed);
                    if len > streaming.remaining {
                        return Poll::Ready(Some(Err(BodyTooLarge.into())));
                    }
                    streaming.remaining -= len;
                    let data = match &mut streaming.addressing {
                        Some(addressing) => addressing.push(&data),
                        None => data,
                    };
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Buffered(body) => body.is_none(),
            Self::Batch(batch) => batch.is_end_stream(),
            Self::Streaming(streaming) => {
                streaming.prefix.is_none()
                    && streaming.rest.is_end_stream()
                    && streaming.addressing.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Buffered(body) => {
                SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64))
            }
            Self::Batch(batch) => batch.size_hint(),
            // A translated body's length is known only at its end.
            Self::Streaming(streaming) if streaming.addressing.is_some() => SizeHint::new(),
            Self::Streaming(streaming) => {
                let prefix = streaming.prefix.as_ref().map_or(0, |p| p.len() as u64);
                let rest = streaming.rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + prefix);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + prefix);
                }
                hint
            }
        }
    }
}

/// The body of a response to the caller.
#[derive(Debug)]
pub(crate) struct ProxyBody {
    kind: Kind,
    sent: u64,
    log: Option<AccessLog>,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Upstream {
        /// Emptied by the watchdog at the route deadline, which then wakes the reader.
        body: Arc<Mutex<Held>>,
        rewriter: Option<Box<BodyRewriter>>,
        scrubber: Option<Box<Scrubber>>,
        /// Takes `body` away at the deadline; stopped when the body is dropped.
        watchdog: tokio::task::AbortHandle,
    },
}

/// What the route deadline takes away from a response whether or not it is being read:
/// the upstream's body (so the upstream exchange ends) and the route's queue slot (so
/// the next caller gets it). Both `None` once the deadline passed.
#[derive(Debug, Default)]
struct Held {
    body: Option<UpstreamResponse>,
    /// The route's queue slot, held until the upstream's body has been read.
    slot: Option<Permit>,
    /// The reader waiting for the upstream's next frame: the watchdog wakes it when it
    /// takes the body away, so one timer serves both (no second one polled per frame).
    reader: Option<std::task::Waker>,
}

fn lock(held: &Mutex<Held>) -> MutexGuard<'_, Held> {
    held.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Empties `held` at `deadline`, unless the body is gone by then.
fn watchdog(held: &Arc<Mutex<Held>>, deadline: Instant) -> tokio::task::AbortHandle {
    let held = Arc::downgrade(held);
    tokio::spawn(async move {
        tokio::time::sleep_until(deadline).await;
        if let Some(held) = held.upgrade() {
            // Dropped, and the reader woken, outside the lock.
            let mut expired = std::mem::take(&mut *lock(&held));
            let reader = expired.reader.take();
            drop(expired);
            if let Some(reader) = reader {
                reader.wake();
            }
        }
    })
    .abort_handle()
}

impl ProxyBody {
    pub(crate) fn full(body: impl Into<Bytes>) -> Self {
        let body = body.into();
        Self {
            kind: Kind::Full((!body.is_empty()).then_some(body)),
            sent: 0,
            log: None,
        }
    }

    /// The upstream's body, rewritten (or decoded) on the way when `rewriter` is set, then
    /// scrubbed of tokens when `scrubber` is.
    pub(crate) fn upstream(
        body: UpstreamResponse,
        deadline: Instant,
        rewriter: Option<BodyRewriter>,
        scrubber: Option<Scrubber>,
    ) -> Self {
        let body = Arc::new(Mutex::new(Held {
            body: Some(body),
            slot: None,
            reader: None,
        }));
        Self {
            kind: Kind::Upstream {
                watchdog: watchdog(&body, deadline),
                body,
                rewriter: rewriter.map(Box::new),
                scrubber: scrubber.map(Box::new),
            },
            sent: 0,
            log: None,
        }
    }

    /// Keeps the route's queue slot until the upstream's body has been read, or the route
    /// deadline passed. A proxy-made body holds none.
    pub(crate) fn hold(&mut self, slot: Option<Permit>) {
        if let Kind::Upstream { body, .. } = &self.kind {
            lock(body).slot = slot;
        }
    }

    /// Writes `log` once this body is finished or dropped.
    pub(crate) fn set_access_log(&mut self, log: AccessLog) {
        self.log = Some(log);
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Kind::Upstream { watchdog, .. } = &self.kind {
            watchdog.abort();
        }
        if let Some(log) = self.log.take() {
            let complete = self.is_end_stream();
            log.write(self.sent, complete);
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let frame = match &mut this.kind {
            Kind::Full(body) => body.take().map(|b| Ok(Frame::data(b))),
            Kind::Upstream {
                body: held,
                rewriter,
                scrubber,
                ..
            } => {
                let mut held = lock(held);
                let Held { body, reader, .. } = &mut *held;
                let Some(body) = body.as_mut() else {
                    // The route deadline passed: the watchdog took the body away.
                    return Poll::Ready(Some(Err(DeadlineReached.into())));
                };
                let mut inner = |cx: &mut Context<'_>| match rewriter {
                    None => Pin::new(&mut *body)
                        .poll_frame(cx)
                        .map(|frame| frame.map(|r| r.map_err(BoxError::from))),
                    Some(rewriter) => poll_rewritten(body, rewriter, cx),
                };
                let polled = match scrubber {
                    None => inner(cx),
                    Some(scrubber) => scrubber.poll_frame(cx, inner),
                };
                let Poll::Ready(frame) = polled else {
                    if !reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *reader = Some(cx.waker().clone());
                    }
                    return Poll::Pending;
                };
                if matches!(frame, None | Some(Err(_))) {
                    // The upstream is done with this request: free its slot for the next one.
                    held.slot = None;
                }
                frame
            }
        };
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            this.sent += data.len() as u64;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(body) => body.is_none(),
            Kind::Upstream {
                scrubber: Some(scrubber),
                ..
            } => scrubber.is_done(),
            // Cut off by the deadline: not complete.
            Kind::Upstream {
                body,
                rewriter: None,
                scrubber: None,
                ..
            } => lock(body)
                .body
                .as_ref()
                .is_some_and(UpstreamResponse::is_end_stream),
            Kind::Upstream {
                rewriter: Some(rewriter),
                scrubber: None,
                ..
            } => rewriter.is_done(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(body) => SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream {
                body,
                rewriter: None,
                scrubber: None,
                ..
            } => lock(body)
                .body
                .as_ref()
                .map_or_else(SizeHint::default, UpstreamResponse::size_hint),
            // Rewriting and scrubbing change the length.
            Kind::Upstream { .. } => SizeHint::default(),
        }
    }
}

/// The next rewritten frame: output the rewriter has ready, else the upstream's next
/// chunk fed to it. Empty output is skipped rather than sent as an empty frame.
fn poll_rewritten(
    body: &mut UpstreamResponse,
    rewriter: &mut BodyRewriter,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    loop {
        match rewriter.next() {
            Err(error) => return Poll::Ready(Some(Err(error.into()))),
            Ok(Some(data)) if data.is_empty() => continue,
            Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
            Ok(None) if rewriter.is_done() => return Poll::Ready(None),
            Ok(None) => {}
        }
        match ready!(Pin::new(&mut *body).poll_frame(cx)) {
            None => rewriter.end_input(),
            Some(Err(error)) => return Poll::Ready(Some(Err(error.into()))),
            // Trailers are not forwarded.
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    rewriter.push(data);
                }
            }
        }
    }
}
