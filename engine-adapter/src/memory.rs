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
//!
//! Shares shrink when consumers arrive: one that grew to a larger share is
//! then over its new one ([`Reservation::over_share`], one atomic load) and
//! must spill and shed what it holds. A consumer under its share that the
//! full pool refuses, and that holds nothing it could spill, waits for the
//! others to shed ([`Reservation::grow_or_wait`]) instead of failing, as a
//! task does in Spark's execution memory pool.

use std::{
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// The engine-wide budget.
#[derive(Debug)]
pub(crate) struct MemoryPool {
    budget: usize,
    state: Mutex<PoolState>,
    /// Signalled whenever bytes are given back or a spillable consumer leaves.
    freed: Condvar,
    /// A spillable consumer's fair share now (kept in step with `state`), so
    /// operators can check it per record without the lock.
    share: AtomicUsize,
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

    fn share(&self, budget: usize) -> usize {
        budget.saturating_sub(self.unspillable) / self.spillable_consumers.max(1)
    }
}

/// What [`Reservation::grow_or_wait`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Grow {
    /// The bytes are held.
    Granted,
    /// Growing would take the reservation past its share: spill instead.
    OverShare,
    /// Within the share, but the budget stayed held by others for the whole wait.
    Starved,
}

/// Runs `f`, which may block, without stalling the async tasks of the
/// runtime it is called from (the engine's runtime has several threads).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

impl MemoryPool {
    pub(crate) fn new(budget: usize) -> Arc<Self> {
        Arc::new(Self {
            budget,
            state: Mutex::new(PoolState::default()),
            freed: Condvar::new(),
            share: AtomicUsize::new(budget),
        })
    }

    /// Adds `n` bytes to what a reservation of this pool holds.
    fn grant(&self, state: &mut PoolState, spillable: bool, n: usize) {
        if spillable {
            state.spillable += n;
        } else {
            state.unspillable += n;
            self.update_share(state);
        }
        state.peak = state.peak.max(state.used());
    }

    /// Publishes the fair share after `state` changed.
    fn update_share(&self, state: &PoolState) {
        self.share.store(state.share(self.budget), Ordering::Relaxed);
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
            let mut state = self.state();
            state.spillable_consumers += 1;
            self.update_share(&state);
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
            state.share(self.pool.budget)
        } else {
            self.pool.budget.saturating_sub(state.used()) + self.bytes
        }
    }

    /// Grows by `n` bytes if the budget allows; `false` (and no change) if not.
    pub(crate) fn try_grow(&mut self, n: usize) -> bool {
        let pool = &self.pool;
        let mut state = pool.state();
        let allowed = if self.spillable {
            self.bytes + n <= state.share(pool.budget) && state.used() + n <= pool.budget
        } else {
            state.used() + n <= pool.budget
        };
        if allowed {
            pool.grant(&mut state, self.spillable, n);
            self.bytes += n;
        }
        allowed
    }

    /// Whether this spillable reservation holds more than its share now
    /// (consumers came after it grew): its operator should spill and shed.
    pub(crate) fn over_share(&self) -> bool {
        self.spillable && self.bytes > self.pool.share.load(Ordering::Relaxed)
    }

    /// Grows a spillable reservation by `n` bytes, waiting up to `patience`
    /// while the budget is held by consumers over their shares (they shed
    /// when they next check [`Reservation::over_share`], or finish).
    pub(crate) fn grow_or_wait(&mut self, n: usize, patience: Duration) -> Grow {
        debug_assert!(self.spillable, "only spillable consumers wait for their share");
        let deadline = Instant::now() + patience;
        let (pool, bytes) = (&self.pool, &mut self.bytes);
        blocking(|| {
            let mut state = pool.state();
            loop {
                if *bytes + n > state.share(pool.budget) {
                    return Grow::OverShare;
                }
                if state.used() + n <= pool.budget {
                    pool.grant(&mut state, true, n);
                    *bytes += n;
                    return Grow::Granted;
                }
                let now = Instant::now();
                if now >= deadline {
                    return Grow::Starved;
                }
                state = pool.freed.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
            }
        })
    }

    /// Gives back `n` bytes (at most what is held).
    pub(crate) fn shrink(&mut self, n: usize) {
        let n = n.min(self.bytes);
        let mut state = self.pool.state();
        if self.spillable {
            state.spillable -= n;
        } else {
            state.unspillable -= n;
            self.pool.update_share(&state);
        }
        self.bytes -= n;
        if n > 0 {
            self.pool.freed.notify_all();
        }
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
            let mut state = self.pool.state();
            state.spillable_consumers -= 1;
            self.pool.update_share(&state);
            self.pool.freed.notify_all();
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

    #[test]
    fn a_consumer_under_its_share_waits_while_one_over_its_share_holds_the_budget() {
        let pool = MemoryPool::new(1000);
        let mut early = pool.reservation("early", true);
        assert!(early.try_grow(1000), "alone, its share is the whole budget");
        assert!(!early.over_share());
        let mut late = pool.reservation("late", true);
        assert!(early.over_share(), "a second consumer halves the share");
        assert_eq!(late.grow_or_wait(600, Duration::from_secs(5)), Grow::OverShare);
        assert_eq!(late.grow_or_wait(100, Duration::from_millis(50)), Grow::Starved);
        let waiting = std::thread::spawn(move || (late.grow_or_wait(400, Duration::from_secs(30)), late));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiting.is_finished());
        early.shrink(600);
        let (grown, late) = waiting.join().unwrap();
        assert_eq!(grown, Grow::Granted);
        assert_eq!((late.size(), pool.used(), pool.peak()), (400, 800, 1000));
        assert!(!early.over_share());
    }
}
