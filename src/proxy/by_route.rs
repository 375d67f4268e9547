//! Per-route state that outlives a configuration: a reload hands the new pipeline the
//! running route queue or rate window of the same prefix, so requests waiting in it keep
//! their place. The registry only finds the state; the pipelines and the requests that use
//! it keep it alive.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

/// Per-route `T`s by route prefix.
pub(crate) struct ByRoute<T> {
    by_prefix: Mutex<HashMap<String, Weak<T>>>,
}

impl<T> Default for ByRoute<T> {
    fn default() -> Self {
        Self {
            by_prefix: Mutex::default(),
        }
    }
}

impl<T> std::fmt::Debug for ByRoute<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let routes = self.lock().len();
        f.debug_struct("ByRoute").field("routes", &routes).finish()
    }
}

impl<T> ByRoute<T> {
    /// The running `T` of route `prefix` after `update`, or a new one from `create`.
    /// Routes that nothing uses any more are forgotten on the way.
    pub(crate) fn get_or_create(
        &self,
        prefix: &str,
        update: impl FnOnce(&T),
        create: impl FnOnce() -> T,
    ) -> Arc<T> {
        let mut by_prefix = self.lock();
        by_prefix.retain(|_, running| running.strong_count() > 0);
        if let Some(running) = by_prefix.get(prefix).and_then(Weak::upgrade) {
            update(&running);
            return running;
        }
        let created = Arc::new(create());
        by_prefix.insert(prefix.to_owned(), Arc::downgrade(&created));
        created
    }

    /// How many routes the registry knows (the ones in use, and ones not forgotten yet).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Weak<T>>> {
        self.by_prefix
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_state_is_found_and_updated_until_nothing_uses_it() {
        let routes: ByRoute<Mutex<u32>> = ByRoute::default();
        let first = routes.get_or_create("/bc/", |_| unreachable!(), || Mutex::new(1));
        let again = routes.get_or_create("/bc/", |n| *n.lock().unwrap() = 2, || Mutex::new(9));
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(*first.lock().unwrap(), 2);
        let other = routes.get_or_create("/fo/", |_| unreachable!(), || Mutex::new(3));
        assert!(!Arc::ptr_eq(&first, &other));
        drop((first, again));
        let fresh = routes.get_or_create("/bc/", |_| unreachable!(), || Mutex::new(4));
        assert_eq!(*fresh.lock().unwrap(), 4);
        drop(other);
        let _x = routes.get_or_create("/x/", |_| {}, || Mutex::new(0));
        // "/fo/" is forgotten; "/bc/" (`fresh`) and "/x/" are in use.
        assert_eq!(routes.len(), 2, "{routes:?}");
        drop(fresh);
    }
}
