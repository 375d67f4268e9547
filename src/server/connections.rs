//! What every open connection is doing, shared by the accept loop, the connection's own
//! task and its requests; and the registry the accept loop consults at the connection cap.
//!
//! A [`Conn`] counts its requests in flight (a request stays in flight until its response
//! body has been written or dropped, see [`TrackedBody`]), remembers whether a caller on it
//! ever authenticated and how often one was refused, and watches its writes: a peer that
//! stops reading leaves a write pending ([`Watched`]) or a response body that hyper does
//! not ask for more of. A connection's task is told to close through it — at once
//! ([`Conn::close_now`]), or gracefully ([`Conn::request_shutdown`]: HTTP/2 gets a
//! GOAWAY).
//!
//! At `max_connections` the accept loop makes room ([`Registry::make_room`]): it closes a
//! connection with nothing in flight, one that never authenticated first, else the one
//! idle the longest, instead of leaving the new connection waiting. Only when every
//! connection is busy does the new one wait for a slot.
//!
//! Not here: the timers that use this state (`server`), what a request is (`proxy`).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Every open connection, for choosing which to close at the cap; and the requests in
/// flight over all of them, for the drain.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    connections: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    totals: Arc<Totals>,
}

#[derive(Debug, Default)]
struct Totals {
    in_flight: AtomicUsize,
    /// Notified when a request finishes: a connection may have become idle, or the last
    /// request may have ended.
    finished: Notify,
}

impl Registry {
    /// Adds a connection; it leaves the registry when the returned guard is dropped.
    pub(crate) fn register(self: &Arc<Self>) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new(self.totals.clone()));
        self.lock().insert(id, conn.clone());
        Registered {
            registry: self.clone(),
            id,
            conn,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Requests in flight over all connections.
    pub(crate) fn in_flight(&self) -> usize {
        self.totals.in_flight.load(Ordering::Acquire)
    }

    /// Resolves once no request is in flight on any connection.
    pub(crate) async fn quiet(&self) {
        loop {
            let finished = self.totals.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            finished.await;
        }
    }

    /// A slot for a connection just accepted while all `permits` are taken: closes the
    /// connection best given up (nothing in flight; never authenticated first, then idle
    /// the longest) and takes its slot. When every connection is busy, waits for a slot
    /// or for a connection to become idle. `None` if the semaphore was closed.
    pub(crate) async fn make_room(&self, permits: &Arc<Semaphore>) -> Option<OwnedSemaphorePermit> {
        loop {
            let finished = self.totals.finished.notified();
            tokio::pin!(finished);
            finished.as_mut().enable();
            if let Ok(permit) = permits.clone().try_acquire_owned() {
                return Some(permit);
            }
            if self.evict_one() {
                // The victim closes at once and gives its slot back.
                return permits.clone().acquire_owned().await.ok();
            }
            tokio::select! {
                permit = permits.clone().acquire_owned() => return permit.ok(),
                () = finished => {}
            }
        }
    }

    /// Closes the connection with nothing in flight that is worth least: one that never
    /// authenticated before one that did, then the one idle the longest.
    fn evict_one(&self) -> bool {
        let connections = self.lock();
        let victim = connections
            .values()
            .filter(|conn| conn.in_flight.load(Ordering::Acquire) == 0 && !conn.is_closing())
            .min_by_key(|conn| {
                (
                    conn.authenticated.load(Ordering::Relaxed),
                    conn.last_activity(),
                )
            });
        match victim {
            Some(conn) => {
                conn.close_now();
                true
            }
            None => false,
        }
    }
}

/// A connection's place in the [`Registry`]; leaves it when dropped.
#[derive(Debug)]
pub(crate) struct Registered {
    registry: Arc<Registry>,
    id: u64,
    conn: Arc<Conn>,
}

impl Registered {
    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

/// The shared state of one connection. Times are kept as milliseconds after `opened`.
#[derive(Debug)]
pub(crate) struct Conn {
    opened: Instant,
    totals: Arc<Totals>,
    /// A request started or ended.
    last_activity_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// A request has started on this connection.
    requested: AtomicBool,
    /// A caller on this connection authenticated.
    authenticated: AtomicBool,
    /// Requests refused for failed authentication.
    refusals: AtomicU32,
    /// When a write started to wait for the peer, plus one; 0 while writes progress.
    write_blocked_ms: AtomicU64,
    /// Response bodies that handed hyper a frame and were not asked for the next one yet.
    bodies_waiting: AtomicUsize,
    /// When a response body last handed over a frame or was asked for one.
    body_progress_ms: AtomicU64,
    closing: AtomicBool,
    close_now: Notify,
    shutdown: Notify,
    /// A request started and the connection's driver must look at its timers sooner
    /// than it planned to.
    started: Notify,
    /// A request that starts before this (ms since `opened`; `u64::MAX` until the driver
    /// planned anything) wakes the driver: its next planned look at its timers, less the
    /// tick it looks every while a request is in flight. A request that starts within
    /// that tick of the planned look wakes nobody: on a busy keep-alive connection, the
    /// driver is woken about once a tick, not once a request.
    wake_if_started_before_ms: AtomicU64,
}

impl Conn {
    fn new(totals: Arc<Totals>) -> Self {
        Self {
            opened: Instant::now(),
            totals,
            last_activity_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            requested: AtomicBool::new(false),
            authenticated: AtomicBool::new(false),
            refusals: AtomicU32::new(0),
            write_blocked_ms: AtomicU64::new(0),
            bodies_waiting: AtomicUsize::new(0),
            body_progress_ms: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            close_now: Notify::new(),
            shutdown: Notify::new(),
            started: Notify::new(),
            wake_if_started_before_ms: AtomicU64::new(u64::MAX),
        }
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    fn last_activity(&self) -> Instant {
        self.at(self.last_activity_ms.load(Ordering::Relaxed))
    }

    /// Counts a request in flight until the returned guard is dropped.
    pub(crate) fn request_started(self: &Arc<Self>) -> InFlight {
        let now = self.now_ms();
        self.last_activity_ms.store(now, Ordering::Relaxed);
        self.requested.store(true, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.totals.in_flight.fetch_add(1, Ordering::AcqRel);
        if now < self.wake_if_started_before_ms.load(Ordering::Relaxed) {
            self.started.notify_one();
        }
        InFlight(self.clone())
    }

    /// Resolves when a request has started that needs the timers looked at sooner than
    /// the driver last planned ([`Conn::plan_check`]).
    pub(crate) async fn request_seen(&self) {
        self.started.notified().await;
    }

    /// The driver's plan: it looks at its timers at `at`, and every `tick` while a
    /// request is in flight.
    pub(crate) fn plan_check(&self, at: Instant, tick: Duration) {
        let latest_start = at.saturating_duration_since(self.opened + tick).as_millis();
        self.wake_if_started_before_ms.store(
            u64::try_from(latest_start).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub(crate) fn has_requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub(crate) fn authenticated(&self) {
        self.authenticated.store(true, Ordering::Relaxed);
    }

    /// Counts a request refused for failed authentication; the new count.
    pub(crate) fn refused(&self) -> u32 {
        self.refusals.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// When the connection counts as idle, unless a request starts before then; `None`
    /// while one is in flight.
    pub(crate) fn idle_at(&self, idle_timeout: Duration) -> Option<Instant> {
        (self.in_flight() == 0).then(|| self.last_activity() + idle_timeout)
    }

    /// Since when a write has been waiting for the peer to take bytes; `None` while
    /// writes progress.
    pub(crate) fn write_blocked_since(&self) -> Option<Instant> {
        match self.write_blocked_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.at(ms - 1)),
        }
    }

    /// Since when a response body has handed hyper a frame without being asked for the
    /// next one (with HTTP/2: the stream's flow-control window stays closed); `None`
    /// while every body is asked for more.
    pub(crate) fn body_stalled_since(&self) -> Option<Instant> {
        (self.bodies_waiting.load(Ordering::Relaxed) > 0)
            .then(|| self.at(self.body_progress_ms.load(Ordering::Relaxed)))
    }

    fn write_blocked(&self) {
        if self.write_blocked_ms.load(Ordering::Relaxed) == 0 {
            self.write_blocked_ms
                .store(self.now_ms() + 1, Ordering::Relaxed);
        }
    }

    fn write_progressed(&self) {
        if self.write_blocked_ms.load(Ordering::Relaxed) != 0 {
            self.write_blocked_ms.store(0, Ordering::Relaxed);
        }
    }

    fn body_progressed(&self) {
        self.body_progress_ms
            .store(self.now_ms(), Ordering::Relaxed);
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    /// Tells the connection's task to drop the connection now.
    pub(crate) fn close_now(&self) {
        self.closing.store(true, Ordering::Relaxed);
        self.close_now.notify_one();
    }

    /// Resolves when [`Conn::close_now`] was called.
    pub(crate) async fn closed_now(&self) {
        self.close_now.notified().await;
    }

    /// Tells the connection's task to shut the connection down gracefully.
    pub(crate) fn request_shutdown(&self) {
        self.shutdown.notify_one();
    }

    /// Resolves when [`Conn::request_shutdown`] was called.
    pub(crate) async fn shutdown_requested(&self) {
        self.shutdown.notified().await;
    }
}

/// A request in flight on its connection.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let conn = &self.0;
        conn.last_activity_ms
            .store(conn.now_ms(), Ordering::Relaxed);
        let idle = conn.in_flight.fetch_sub(1, Ordering::AcqRel) == 1;
        let quiet = conn.totals.in_flight.fetch_sub(1, Ordering::AcqRel) == 1;
        if idle || quiet {
            conn.totals.finished.notify_one();
        }
    }
}

/// A response body that keeps its request in flight until hyper has written it (or
/// dropped it), and tells its connection whether hyper keeps asking for more.
#[derive(Debug)]
pub(crate) struct TrackedBody<B> {
    inner: B,
    in_flight: InFlight,
    /// A frame was handed over and the next one not asked for yet.
    waiting: bool,
}

impl<B> TrackedBody<B> {
    pub(crate) fn new(inner: B, in_flight: InFlight) -> Self {
        Self {
            inner,
            in_flight,
            waiting: false,
        }
    }

    fn set_waiting(&mut self, waiting: bool) {
        if self.waiting == waiting {
            return;
        }
        self.waiting = waiting;
        let conn = &self.in_flight.0;
        conn.body_progressed();
        if waiting {
            conn.bodies_waiting.fetch_add(1, Ordering::Relaxed);
        } else {
            conn.bodies_waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl<B> Drop for TrackedBody<B> {
    fn drop(&mut self) {
        self.set_waiting(false);
    }
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        this.set_waiting(false);
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &frame {
            this.set_waiting(true);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's stream, telling its [`Conn`] when writes wait for the peer.
#[derive(Debug)]
pub(crate) struct Watched<S> {
    inner: S,
    conn: Arc<Conn>,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: S, conn: Arc<Conn>) -> Self {
        Self { inner, conn }
    }

    /// A write that waits marks the connection blocked; one that takes bytes (or fails,
    /// which ends the connection anyway) unblocks it.
    fn observe(&self, result: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match &result {
            Poll::Pending => self.conn.write_blocked(),
            Poll::Ready(Ok(0)) => {}
            Poll::Ready(_) => self.conn.write_progressed(),
        }
        result
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.observe(result)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_flush(cx);
        // A flush that completes says nothing about bytes the peer took.
        if result.is_pending() {
            this.conn.write_blocked();
        }
        result
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.observe(result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `request_seen` has resolved, i.e. the driver was woken.
    async fn woken(conn: &Conn) -> bool {
        tokio::time::timeout(Duration::ZERO, conn.request_seen())
            .await
            .is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_wakes_the_driver_only_when_its_next_look_is_more_than_a_tick_away() {
        let registry = Arc::new(Registry::default());
        let handle = registry.register();
        let conn = handle.conn();
        let tick = Duration::from_secs(1);
        // Nothing planned yet: the first request wakes the driver.
        let first = conn.request_started();
        assert!(woken(conn).await);
        // The driver looks again within the tick (a request is in flight): the next
        // requests on the connection wake nobody.
        conn.plan_check(Instant::now() + tick, tick);
        drop(first);
        drop(conn.request_started());
        tokio::time::advance(Duration::from_millis(600)).await;
        drop(conn.request_started());
        assert!(!woken(conn).await);
        // Idle, the driver plans its next look at the idle timeout: a request must wake it.
        conn.plan_check(Instant::now() + Duration::from_secs(60), tick);
        let _late = conn.request_started();
        assert!(woken(conn).await);
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_unauthenticated_then_the_longest_idle_connection_goes() {
        let registry = Arc::new(Registry::default());
        let permits = Arc::new(Semaphore::new(3));
        let mut held = Vec::new();
        for _ in 0..3 {
            let permit = permits.clone().try_acquire_owned().unwrap();
            held.push((registry.register(), permit));
        }
        let [(old, _), (busy, _), (fresh, _)] = &held[..] else {
            unreachable!()
        };
        old.conn().authenticated();
        fresh.conn().authenticated();
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(fresh.conn().request_started());
        let _busy = busy.conn().request_started();
        // `busy` has a request in flight and never authenticated: it stays. Of the idle
        // ones, `old` has been idle the longest.
        assert!(registry.evict_one());
        assert!(old.conn().is_closing());
        assert!(!busy.conn().is_closing() && !fresh.conn().is_closing());
        assert!(registry.evict_one());
        assert!(fresh.conn().is_closing());
        assert!(!registry.evict_one(), "a busy connection is never closed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_handed_over_but_not_asked_for_again_is_a_stall() {
        let registry = Arc::new(Registry::default());
        let registered = registry.register();
        let conn = registered.conn().clone();
        let in_flight = conn.request_started();
        assert_eq!(registry.in_flight(), 1);
        let mut body = TrackedBody::new(
            http_body_util::Full::new(bytes::Bytes::from_static(b"x")),
            in_flight,
        );
        assert_eq!(conn.body_stalled_since(), None);
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(frame.is_some());
        let since = conn.body_stalled_since().expect("waiting for hyper");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(conn.body_stalled_since(), Some(since));
        let end = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(end.is_none());
        assert_eq!(conn.body_stalled_since(), None);
        drop(body);
        assert_eq!(registry.in_flight(), 0);
        assert_eq!(conn.in_flight(), 0);
    }
}
