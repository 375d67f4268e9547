//! A waiter counted in a shared gauge for exactly as long as it waits: route queues,
//! upstream rate windows and the fleet semaphore's local line all count their waiters so.

use std::sync::atomic::{AtomicUsize, Ordering};

/// One waiter counted in `.0`, counted out again however the wait ends (the caller may
/// hang up, dropping the wait).
#[derive(Debug)]
pub(crate) struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    /// Counts one more waiter.
    pub(crate) fn count(waiters: &'a AtomicUsize) -> Self {
        waiters.fetch_add(1, Ordering::AcqRel);
        Self(waiters)
    }

    /// Counts one more waiter, unless `max` already wait (`Err`: how many do).
    pub(crate) fn enter(waiters: &'a AtomicUsize, max: usize) -> Result<Self, usize> {
        waiters.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })?;
        Ok(Self(waiters))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiter_counts_while_it_waits_and_enter_stops_at_max() {
        let waiters = AtomicUsize::new(0);
        let first = Waiting::count(&waiters);
        let second = Waiting::enter(&waiters, 2).unwrap();
        assert_eq!(waiters.load(Ordering::Acquire), 2);
        assert_eq!(Waiting::enter(&waiters, 2).unwrap_err(), 2);
        drop(first);
        let third = Waiting::enter(&waiters, 2).unwrap();
        drop((second, third));
        assert_eq!(waiters.load(Ordering::Acquire), 0);
    }
}
