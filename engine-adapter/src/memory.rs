//! The engine's memory budget ([`crate::EngineOptions::memory`]): one pool
//! every operator that buffers records reserves from, in the manner of
//! DataFusion's `MemoryPool` and `MemoryReservation`.
//!
//! A [`Reservation`] is a guard: it holds bytes of the budget until it
//! shrinks or is dropped. Operators ask before they grow (`try_grow`) and,
//! when refused, spill what they hold to local files (sorts, groups, the
//! batch sides of a join, a reduction's final aggregation) or fail with a
//! clear error (state a streaming operator must keep in memory). Spillable
//! reservations share the budget fairly: each may grow to the budget left
//! by unspillable ones divided by the number of spillable consumers, so one
//! task cannot starve the others of the same stage.

use std::sync::{Arc, Mutex};

/// The engine-wide budget.
#[derive(Debug)]
pub(crate) struct MemoryPool {
    budget: usize,
    state: Mutex<PoolState>,
}

#[derive(Debug, Default)]
struct PoolState {
    /// Bytes held by unspillable reservations.
    unspillable: usize,
    /// Bytes held by spillable reservations.
    spillable: usize,
    /// Spillable reservations alive.
    spillable_consumers: usize,
    /// The most bytes held at once.
    peak: usize,
}

impl PoolState {
    fn used(&self) -> usize {
        self.unspillable + self.spillable
    }
}

impl MemoryPool {
    pub(crate) fn new(budget: usize) -> Arc<Self> {
        Arc::new(Self { budget, state: Mutex::new(PoolState::default()) })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // Every critical section leaves the counts consistent: a panic elsewhere cannot corrupt them.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The budget in bytes.
    pub(crate) fn budget(&self) -> usize {
        self.budget
    }

    /// Bytes reserved now.
    pub(crate) fn used(&self) -> usize {
        self.state().used()
    }

    /// The most bytes reserved at once since the pool was made.
    pub(crate) fn peak(&self) -> usize {
        self.state().peak
    }

    /// A reservation of nothing yet, for `consumer` (an operator of a task,
    /// for messages). Spillable ones share the budget fairly.
    pub(crate) fn reservation(self: &Arc<Self>, consumer: impl Into<String>, spillable: bool) -> Reservation {
        if spillable {
            self.state().spillable_consumers += 1;
        }
        Reservation { pool: self.clone(), consumer: consumer.into(), bytes: 0, spillable }
    }
}

/// Bytes of the budget held by one consumer; released when dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    pool: Arc<MemoryPool>,
    consumer: String,
    bytes: usize,
    spillable: bool,
}

impl Reservation {
    /// Bytes held.
    pub(crate) fn size(&self) -> usize {
        self.bytes
    }

    /// Who holds it.
    pub(crate) fn consumer(&self) -> &str {
        &self.consumer
    }

    /// The most this reservation could hold now: its fair share if it is
    /// spillable, what the budget leaves otherwise.
    pub(crate) fn limit(&self) -> usize {
        let state = self.pool.state();
        if self.spillable {
            self.pool.budget.saturating_sub(state.unspillable) / state.spillable_consumers.max(1)
        } else {
            self.pool.budget.saturating_sub(state.used()) + self.bytes
        }
    }

    /// Grows by `n` bytes if the budget allows; `false` (and no change) if not.
    pub(crate) fn try_grow(&mut self, n: usize) -> bool {
        let mut state = self.pool.state();
        let allowed = if self.spillable {
            let share = self.pool.budget.saturating_sub(state.unspillable) / state.spillable_consumers.max(1);
            self.bytes + n <= share && state.used() + n <= self.pool.budget
        } else {
            state.used() + n <= self.pool.budget
        };
        if allowed {
            if self.spillable {
                state.spillable += n;
            } else {
                state.unspillable += n;
            }
            state.peak = state.peak.max(state.used());
            self.bytes += n;
        }
        allowed
    }

    /// Gives back `n` bytes (at most what is held).
    pub(crate) fn shrink(&mut self, n: usize) {
        let n = n.min(self.bytes);
        let mut state = self.pool.state();
        if self.spillable {
            state.spillable -= n;
        } else {
            state.unspillable -= n;
        }
        self.bytes -= n;
    }

    /// Gives back everything held.
    pub(crate) fn free(&mut self) {
        self.shrink(self.bytes);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.free();
        if self.spillable {
            self.pool.state().spillable_consumers -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stay_within_the_budget_and_release_on_drop() {
        let pool = MemoryPool::new(1000);
        let mut a = pool.reservation("a", false);
        assert!(a.try_grow(600));
        let mut b = pool.reservation("b", false);
        assert!(!b.try_grow(500), "600 + 500 is over 1000");
        assert!(b.try_grow(400));
        assert_eq!(pool.used(), 1000);
        drop(a);
        assert_eq!(pool.used(), 400);
        b.shrink(100);
        assert_eq!((pool.used(), pool.peak()), (300, 1000));
    }

    #[test]
    fn spillable_reservations_get_a_fair_share_of_what_unspillable_ones_leave() {
        let pool = MemoryPool::new(1000);
        let mut fixed = pool.reservation("fixed", false);
        assert!(fixed.try_grow(200));
        let mut a = pool.reservation("a", true);
        let mut b = pool.reservation("b", true);
        // 800 left for two spillable consumers: 400 each.
        assert!(a.try_grow(400));
        assert!(!a.try_grow(1), "a is at its share");
        assert_eq!(b.limit(), 400);
        assert!(b.try_grow(400));
        drop(b);
        // Alone, a may take everything that is left.
        assert!(a.try_grow(400));
        assert_eq!(pool.used(), 1000);
    }
}
