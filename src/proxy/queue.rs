//! Per-route concurrency limit with a bounded FIFO queue (`max_concurrent`, `max_queue`,
//! `queue_timeout`), kept across configuration reloads.
//!
//! Business Central processes 5 requests per app at once and queues the rest itself, up
//! to a point; one proxy route funnels every legacy caller into that one app. So the
//! proxy holds at most `max_concurrent` requests at the upstream and lets the rest wait
//! here in arrival order (tokio's semaphore is fair), at most `max_queue` of them and each
//! for at most `queue_timeout`; beyond that the caller gets 503 with `Retry-After`. A slot
//! is held until the response body has been streamed, since the upstream is busy until
//! then.
//!
//! A queue belongs to the running proxy, not to one configuration: [`Queues`] keeps them
//! by route prefix and every new pipeline takes the running queue of its prefixes, so a
//! reload neither hands out a fresh allowance beside the slots still in use nor reorders
//! or loses the waiters. Changed limits resize the queue in place ([`RouteQueue::resize`]):
//! a higher `max_concurrent` adds slots at once, a lower one takes slots out as they come
//! back; `max_queue` and `queue_timeout` apply to requests that start waiting afterwards.
//! A route removed by a reload keeps its queue for the requests already using it only.
//!
//! The pipeline sees [`RouteQueue::acquire`], [`Permit`] and [`RouteQueue::queued`]
//! only. In fleet mode (`cluster:`) a request takes two things in turn, each first come
//! first served: a local slot as above (the replica never holds more than
//! `max_concurrent` anyway), then a fleet-wide lease from Redis
//! ([`crate::cluster::semaphore`]), for which only the head of the local queue competes.
//! `max_queue` and `queue_timeout` hold per replica and cover both waits.
//!
//! At the switch to fail-open: when Redis does not answer, the request goes on with its
//! local slot alone, and so does every request until Redis answers again (each replica
//! then holds `max_concurrent` on its own). When it is back, new requests take leases
//! again; requests admitted during the outage finish without one and are not counted
//! by the other replicas, so the fleet may exceed `max_concurrent` by them until they
//! end. A lease taken is renewed until the request ends, whatever Redis does meanwhile.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::by_route::ByRoute;
use crate::cluster::Cluster;
use crate::cluster::semaphore::{Attempt, FleetSlots, Lease};
use crate::waiting::Waiting;
use tokio::time::{Instant, timeout_at};

/// Why a request did not get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum QueueError {
    #[error("the route's queue is full ({0} waiting)")]
    Full(usize),
    #[error("waited {0:?} in the route's queue")]
    TimedOut(Duration),
}

/// A route's `max_concurrent`, `max_queue` and `queue_timeout`, as validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueLimits {
    pub(crate) max_concurrent: usize,
    pub(crate) max_queue: usize,
    pub(crate) timeout: Duration,
}

impl QueueLimits {
    /// The route's limits when it sets `max_concurrent`. Validation fills in `max_queue`
    /// and `queue_timeout` (their defaults or the preset's) whenever `max_concurrent` is
    /// set, so nothing is defaulted here.
    pub(crate) fn of(route: &crate::config::Route) -> Option<Self> {
        Some(Self {
            max_concurrent: route.max_concurrent?,
            max_queue: route.max_queue?,
            timeout: route.queue_timeout?,
        })
    }
}

/// The route queues of a running proxy, by route prefix. A queue lives as long as a
/// pipeline or a request (waiting, or holding a slot) uses it; the registry only finds it.
#[derive(Debug, Default)]
pub(crate) struct Queues {
    queues: ByRoute<RouteQueue>,
    /// Fleet mode: every route's `max_concurrent` holds across the replicas.
    cluster: Option<Cluster>,
}

impl Queues {
    /// Queues whose limits hold for the fleet when `cluster` is given.
    pub(crate) fn new(cluster: Option<Cluster>) -> Self {
        Self {
            queues: ByRoute::default(),
            cluster,
        }
    }

    /// The queue of the route `prefix`: the running one resized to `limits`, or a new one.
    pub(crate) fn route(&self, prefix: &str, limits: QueueLimits) -> Arc<RouteQueue> {
        self.queues.get_or_create(
            prefix,
            |running| running.resize(limits),
            || {
                let mut queue = RouteQueue::new(limits);
                queue.fleet = self
                    .cluster
                    .as_ref()
                    .map(|cluster| FleetSlots::new(cluster, prefix));
                queue
            },
        )
    }
}

/// One route's limiter.
#[derive(Debug)]
pub(crate) struct RouteQueue {
    slots: Arc<Semaphore>,
    /// Slots to take out of circulation as they come back: `max_concurrent` was lowered
    /// while they were in use.
    owed: AtomicUsize,
    queued: AtomicUsize,
    limits: Mutex<QueueLimits>,
    /// Fleet mode: the route's leases in Redis, taken after the local slot.
    fleet: Option<FleetSlots>,
}

/// A slot at the upstream; released when dropped (or retired, when the route's
/// `max_concurrent` was lowered meanwhile).
#[derive(Debug)]
pub(crate) struct Permit {
    slot: Option<OwnedSemaphorePermit>,
    /// The fleet-wide lease, in fleet mode while Redis answers.
    _lease: Option<Lease>,
    /// Keeps the queue (and its place in [`Queues`]) alive while the slot is in use.
    queue: Arc<RouteQueue>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let retire = self
            .queue
            .owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if retire && let Some(slot) = self.slot.take() {
            slot.forget();
        }
    }
}

impl RouteQueue {
    pub(crate) fn new(limits: QueueLimits) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limits.max_concurrent)),
            owed: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            limits: Mutex::new(limits),
            fleet: None,
        }
    }

    fn max_concurrent(&self) -> usize {
        self.limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .max_concurrent
    }

    /// Requests waiting for a slot right now.
    pub(crate) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Applies a reload's limits. Waiters keep their place.
    pub(crate) fn resize(&self, new: QueueLimits) {
        let mut limits = self.limits.lock().unwrap_or_else(PoisonError::into_inner);
        let old = limits.max_concurrent;
        if new.max_concurrent > old {
            // Slots still owed from an earlier decrease are cancelled first.
            let up = new.max_concurrent - old;
            let owed = self
                .owed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    Some(n.saturating_sub(up))
                })
                .unwrap_or(0);
            // The semaphore hands added slots to the waiters first, in order.
            self.slots.add_permits(up - owed.min(up));
        } else if new.max_concurrent < old {
            let down = old - new.max_concurrent;
            let idle = self.slots.forget_permits(down);
            self.owed.fetch_add(down - idle, Ordering::AcqRel);
        }
        *limits = new;
    }

    /// Waits for a slot, first come first served, until `queue_timeout` or `deadline`,
    /// whichever is sooner. In fleet mode, then for a lease (see the module header).
    pub(crate) async fn acquire(self: &Arc<Self>, deadline: Instant) -> Result<Permit, QueueError> {
        let permit = |slot, lease| Permit {
            slot: Some(slot),
            _lease: lease,
            queue: Arc::clone(self),
        };
        // No queue-jumping: while anyone waits, the semaphore hands freed slots to the
        // waiters, so this succeeds only when nobody is queued.
        let mut held = None;
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            let Some(fleet) = &self.fleet else {
                return Ok(permit(slot, None));
            };
            match fleet.try_first(self.max_concurrent()).await {
                Some(Attempt::Granted(lease)) => return Ok(permit(slot, Some(lease))),
                Some(Attempt::Unavailable) => return Ok(permit(slot, None)),
                // All fleet slots taken, or a local request is ahead in Redis: queue up
                // with the local slot in hand.
                Some(Attempt::Busy(_)) | None => held = Some(slot),
            }
        }
        let QueueLimits {
            max_queue, timeout, ..
        } = *self.limits.lock().unwrap_or_else(PoisonError::into_inner);
        let _waiting = Waiting::enter(&self.queued, max_queue).map_err(QueueError::Full)?;
        let started = Instant::now();
        let until = deadline.min(started + timeout);
        let wait = async {
            let slot = match held {
                Some(slot) => slot,
                None => self.slots.clone().acquire_owned().await.ok()?,
            };
            let lease = match &self.fleet {
                Some(fleet) => fleet.acquire(|| self.max_concurrent()).await,
                None => None,
            };
            Some(permit(slot, lease))
        };
        match timeout_at(until, wait).await {
            Ok(Some(permit)) => Ok(permit),
            // The semaphore is never closed.
            Ok(None) | Err(_) => Err(QueueError::TimedOut(started.elapsed())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_concurrent: usize, max_queue: usize, timeout_s: u64) -> QueueLimits {
        QueueLimits {
            max_concurrent,
            max_queue,
            timeout: Duration::from_secs(timeout_s),
        }
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(600)
    }

    /// Starts a waiter that records `n` in `order` once it has a slot, holding the slot
    /// until it gets a message.
    fn waiter(
        queue: &Arc<RouteQueue>,
        n: usize,
        order: &Arc<Mutex<Vec<usize>>>,
    ) -> (
        tokio::task::JoinHandle<()>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let (queue, order) = (queue.clone(), order.clone());
        let (done, release) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let permit = queue.acquire(far()).await.unwrap();
            order.lock().unwrap().push(n);
            let _ = release.await;
            drop(permit);
        });
        (task, done)
    }

    #[tokio::test(start_paused = true)]
    async fn slots_queue_in_order_and_overflow_is_refused() {
        let queue = Arc::new(RouteQueue::new(limits(1, 2, 60)));
        let first = queue.acquire(far()).await.unwrap();

        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for n in 0..2 {
            waiters.push(waiter(&queue, n, &order));
            tokio::task::yield_now().await;
        }
        assert_eq!(queue.queued(), 2);
        assert_eq!(queue.acquire(far()).await.unwrap_err(), QueueError::Full(2));

        drop(first);
        for (task, done) in waiters {
            let _ = done.send(());
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [0, 1]);
        assert_eq!(queue.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_at_the_queue_timeout_or_the_deadline() {
        let queue = Arc::new(RouteQueue::new(limits(1, 10, 60)));
        let _held = queue.acquire(far()).await.unwrap();
        let error = queue.acquire(far()).await.unwrap_err();
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
        let queue = Arc::new(RouteQueue::new(limits(1, 0, 60)));
        let _held = queue.acquire(far()).await.unwrap();
        assert_eq!(queue.acquire(far()).await.unwrap_err(), QueueError::Full(0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_takes_the_running_queue_with_its_slots_and_waiters() {
        let queues = Queues::default();
        let queue = queues.route("/bc/", limits(1, 10, 60));
        let held = queue.acquire(far()).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let (early, early_done) = waiter(&queue, 0, &order);
        tokio::task::yield_now().await;

        // Three reloads with the same limits: one queue, still one slot.
        for _ in 0..3 {
            let again = queues.route("/bc/", limits(1, 10, 60));
            assert!(Arc::ptr_eq(&queue, &again));
        }
        let (late, late_done) = waiter(&queue, 1, &order);
        tokio::task::yield_now().await;
        assert_eq!(queue.queued(), 2, "both wait: the reloads added no slot");
        assert!(order.lock().unwrap().is_empty());

        drop(held);
        tokio::task::yield_now().await;
        assert_eq!(*order.lock().unwrap(), [0], "the earlier waiter goes first");
        let _ = early_done.send(());
        early.await.unwrap();
        let _ = late_done.send(());
        late.await.unwrap();
        assert_eq!(*order.lock().unwrap(), [0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_higher_max_concurrent_admits_waiters_at_once_in_order() {
        let queues = Queues::default();
        let queue = queues.route("/bc/", limits(1, 10, 60));
        let _held = queue.acquire(far()).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiters: Vec<_> = (0..3).map(|n| waiter(&queue, n, &order)).collect();
        tokio::task::yield_now().await;
        assert_eq!(queue.queued(), 3);

        queues.route("/bc/", limits(3, 10, 60));
        tokio::task::yield_now().await;
        assert_eq!(*order.lock().unwrap(), [0, 1], "two slots added");
        assert_eq!(queue.queued(), 1);
        drop(waiters);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lower_max_concurrent_retires_slots_as_they_come_back() {
        let queues = Queues::default();
        let queue = queues.route("/bc/", limits(3, 10, 60));
        let held: Vec<_> = [(); 3]
            .iter()
            .map(|()| queue.slots.clone().try_acquire_owned().unwrap())
            .map(|slot| Permit {
                slot: Some(slot),
                _lease: None,
                queue: queue.clone(),
            })
            .collect();
        let order = Arc::new(Mutex::new(Vec::new()));
        let (next, next_done) = waiter(&queue, 0, &order);
        tokio::task::yield_now().await;

        queues.route("/bc/", limits(1, 10, 60));
        let mut held = held.into_iter();
        drop(held.next());
        drop(held.next());
        tokio::task::yield_now().await;
        assert!(
            order.lock().unwrap().is_empty(),
            "two of three came back and were retired: one is still at the upstream"
        );
        drop(held.next());
        tokio::task::yield_now().await;
        assert_eq!(*order.lock().unwrap(), [0], "now one slot is free");
        let _ = next_done.send(());
        next.await.unwrap();
        assert_eq!(queue.slots.available_permits(), 1);

        // Up again while nothing is owed: plain extra slots.
        queues.route("/bc/", limits(2, 10, 60));
        assert_eq!(queue.slots.available_permits(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn raising_the_limit_again_cancels_what_is_still_owed() {
        let queue = Arc::new(RouteQueue::new(limits(2, 10, 60)));
        let a = queue.acquire(far()).await.unwrap();
        let b = queue.acquire(far()).await.unwrap();
        queue.resize(limits(1, 10, 60));
        queue.resize(limits(2, 10, 60));
        drop(a);
        drop(b);
        assert_eq!(queue.slots.available_permits(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_size_and_timeout_changes_apply_to_new_waiters() {
        let queues = Queues::default();
        let queue = queues.route("/bc/", limits(1, 1, 60));
        let _held = queue.acquire(far()).await.unwrap();
        let waiting = tokio::spawn({
            let queue = queue.clone();
            async move { queue.acquire(far()).await.map(drop) }
        });
        tokio::task::yield_now().await;
        assert_eq!(queue.acquire(far()).await.unwrap_err(), QueueError::Full(1));

        queues.route("/bc/", limits(1, 2, 5));
        assert_eq!(
            queue.acquire(far()).await.unwrap_err(),
            QueueError::TimedOut(Duration::from_secs(5)),
            "admitted to the larger queue, and waits the new timeout"
        );
        assert_eq!(
            waiting.await.unwrap().unwrap_err(),
            QueueError::TimedOut(Duration::from_secs(60)),
            "the earlier waiter kept the timeout it started with"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_removed_route_keeps_its_queue_while_requests_use_it() {
        let queues = Queues::default();
        let queue = queues.route("/old/", limits(1, 0, 60));
        let held = queue.acquire(far()).await.unwrap();
        // A reload removed the route: no pipeline uses the queue, a request still does.
        drop(queue);
        let back = queues.route("/old/", limits(1, 0, 60));
        assert_eq!(
            back.acquire(far()).await.unwrap_err(),
            QueueError::Full(0),
            "the route came back while its last request still had the slot"
        );
        drop((back, held));
        let fresh = queues.route("/old/", limits(1, 0, 60));
        let _slot = fresh.acquire(far()).await.unwrap();
        assert_eq!(queues.queues.len(), 1);
    }
}
