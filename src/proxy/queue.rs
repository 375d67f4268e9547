//! Per-route concurrency limit with a bounded FIFO queue (`max_concurrent`, `max_queue`,
//! `queue_timeout`).
//!
//! Business Central processes 5 requests per app at once and queues the rest itself, up
//! to a point; one proxy route funnels every legacy caller into that one app. So the
//! proxy holds at most `max_concurrent` requests at the upstream and lets the rest wait
//! here in arrival order (tokio's semaphore is fair), at most `max_queue` of them and each
//! for at most `queue_timeout`; beyond that the caller gets 503 with `Retry-After`. A slot
//! is held until the response body has been streamed, since the upstream is busy until
//! then.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, timeout_at};

/// Why a request did not get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum QueueError {
    #[error("the route's queue is full ({0} waiting)")]
    Full(usize),
    #[error("waited {0:?} in the route's queue")]
    TimedOut(Duration),
}

/// One route's limiter.
#[derive(Debug)]
pub(crate) struct RouteQueue {
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
    max_queue: usize,
    timeout: Duration,
}

/// A slot at the upstream; released when dropped.
#[derive(Debug)]
pub(crate) struct Permit {
    _slot: OwnedSemaphorePermit,
}

impl RouteQueue {
    pub(crate) fn new(max_concurrent: usize, max_queue: usize, timeout: Duration) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_concurrent)),
            queued: AtomicUsize::new(0),
            max_queue,
            timeout,
        }
    }

    /// Requests waiting for a slot right now.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Waits for a slot, first come first served, until `queue_timeout` or `deadline`,
    /// whichever is sooner.
    pub(crate) async fn acquire(&self, deadline: Instant) -> Result<Permit, QueueError> {
        // No queue-jumping: while anyone waits, the semaphore hands freed slots to the
        // waiters, so this succeeds only when nobody is queued.
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(Permit { _slot: permit });
        }
        let admitted = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_queue).then_some(n + 1)
            });
        if let Err(waiting) = admitted {
            return Err(QueueError::Full(waiting));
        }
        // Counted out again however the wait ends, the caller hanging up included.
        let _waiting = Waiting(&self.queued);
        let started = Instant::now();
        let until = deadline.min(started + self.timeout);
        match timeout_at(until, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Permit { _slot: permit }),
            // The semaphore is never closed.
            Ok(Err(_)) | Err(_) => Err(QueueError::TimedOut(started.elapsed())),
        }
    }
}

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn slots_queue_in_order_and_overflow_is_refused() {
        let queue = Arc::new(RouteQueue::new(1, 2, Duration::from_secs(60)));
        let far = Instant::now() + Duration::from_secs(600);
        let first = queue.acquire(far).await.unwrap();

        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for n in 0..2 {
            let (queue, order) = (queue.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let permit = queue.acquire(far).await.unwrap();
                order.lock().unwrap().push(n);
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(permit);
            }));
            tokio::task::yield_now().await;
        }
        assert_eq!(queue.queued(), 2);
        assert_eq!(queue.acquire(far).await.unwrap_err(), QueueError::Full(2));

        drop(first);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [0, 1]);
        assert_eq!(queue.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_at_the_queue_timeout_or_the_deadline() {
        let queue = RouteQueue::new(1, 10, Duration::from_secs(60));
        let far = Instant::now() + Duration::from_secs(600);
        let _held = queue.acquire(far).await.unwrap();
        let error = queue.acquire(far).await.unwrap_err();
        assert_eq!(error, QueueError::TimedOut(Duration::from_secs(60)));
        let soon = Instant::now() + Duration::from_secs(5);
        assert_eq!(
            queue.acquire(soon).await.unwrap_err(),
            QueueError::TimedOut(Duration::from_secs(5))
        );
        assert_eq!(queue.queued(), 0);
    }

    #[tokio::test]
    async fn no_queue_means_refused_at_once() {
        let queue = RouteQueue::new(1, 0, Duration::from_secs(60));
        let far = Instant::now() + Duration::from_secs(600);
        let _held = queue.acquire(far).await.unwrap();
        assert_eq!(queue.acquire(far).await.unwrap_err(), QueueError::Full(0));
    }
}
