//! The server-wide memory budget, and the reservations that account for
//! every byte held on behalf of clients.
//!
//! One [`MemoryPool`] covers the whole server. Whatever holds memory that
//! grows with what clients send — a shuffle's stored blocks and tables, a
//! stream's partly received frames, a reader's disk reads — holds a
//! [`Reservation`] from a [`Consumer`] of the pool; the reservation
//! releases its bytes when dropped (as DataFusion's `MemoryReservation`
//! does), so nothing is released twice or forgotten. Releasing more than a
//! consumer holds is an accounting error: it is logged and counted (metric
//! `shuffle_memory_accounting_errors_total`) and the counter is clamped, in
//! release builds too, never wrapped.
//!
//! [`Watermarks`] is the decision, with no clock or I/O. Below the high
//! watermark (70%) anyone may grow. Above it, a consumer may grow only
//! within its fair share, the hard limit (90%) divided among the consumers
//! that hold or want memory; nothing grows past the budget itself. So
//! backpressure falls on the shuffles that hold more than their share — a
//! stuck stream of one app pauses its own producers, not everyone's — and a
//! newcomer (the next exchange of a pipeline) always finds room. The
//! spiller writes the most-over-share shuffle's largest buffer to disk
//! from the high watermark down to the low one (40%).

use std::{
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use shuffle_protocol::{ErrorKind, ServiceError};
use tokio::sync::Notify;

/// Spilling starts when usage reaches this fraction of the budget (percent).
pub const HIGH_WATERMARK_PERCENT: usize = 70;
/// Spilling continues until usage falls to this fraction (percent).
pub const LOW_WATERMARK_PERCENT: usize = 40;
/// The memory that fair shares divide (percent of the budget); between it and
/// the budget is headroom that lets a consumer under its share start at once.
pub const HARD_LIMIT_PERCENT: usize = 90;

/// How often a waiting producer re-checks conditions nothing woke it for
/// (a disk that filled up, a shutdown), so it is told within a second.
pub const WAIT_RECHECK: Duration = Duration::from_millis(250);

/// The thresholds of a budget, in bytes, and the decisions made from them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermarks {
    /// The budget.
    pub limit: usize,
    /// Usage at which spilling starts and fair shares apply.
    pub high: usize,
    /// Usage at which spilling stops.
    pub low: usize,
    /// What the fair shares divide.
    pub hard: usize,
}

impl Watermarks {
    /// The thresholds of a budget of `limit` bytes.
    pub fn for_limit(limit: usize) -> Self {
        Self {
            limit,
            high: limit / 100 * HIGH_WATERMARK_PERCENT,
            low: limit / 100 * LOW_WATERMARK_PERCENT,
            hard: limit / 100 * HARD_LIMIT_PERCENT,
        }
    }

    /// Whether a spiller that is (or is not) already spilling should spill (on) at `used` bytes.
    pub fn should_spill(&self, used: usize, spilling: bool) -> bool {
        if spilling { used > self.low } else { used >= self.high }
    }

    /// The fair share of each of `active` consumers, when `fixed` bytes are
    /// held by standing reservations that no consumer competes for.
    pub fn share(&self, active: usize, fixed: usize) -> usize {
        self.hard.saturating_sub(fixed) / active.max(1)
    }

    /// Whether a consumer holding `own` bytes may add `n` while the pool
    /// holds `total` (of which `fixed` in standing reservations) and
    /// `active` consumers hold or want memory.
    pub fn may_grow(&self, total: usize, own: usize, n: usize, active: usize, fixed: usize) -> bool {
        let after = total.saturating_add(n);
        after <= self.limit && (after <= self.high || own.saturating_add(n) <= self.share(active, fixed))
    }
}

/// The shared budget.
pub struct MemoryPool {
    /// Thresholds derived from the budget.
    marks: Watermarks,
    /// Bytes reserved now, by every consumer.
    used: AtomicUsize,
    /// True while the spiller works down from the high to the low watermark.
    spilling: AtomicBool,
    /// Wakes the spiller.
    spill_wanted: Notify,
    /// Wakes waiting producers when memory is released or conditions change.
    released: Notify,
    /// Every consumer alive, to count the active ones and find who is over its share.
    consumers: Mutex<Vec<Weak<Consumer>>>,
    /// Producers waiting for room, over all consumers.
    waiting: AtomicUsize,
    /// Bytes of standing reservations (see [`MemoryPool::standing`]).
    fixed: AtomicUsize,
    /// Releases of more than was reserved (bugs), counted instead of wrapping.
    accounting_errors: AtomicU64,
    /// Set while flushes fail because the disk is full; waiting producers get it.
    disk_full: Mutex<Option<ServiceError>>,
}

/// One holder of memory in the pool: a shuffle, or the server's receive
/// buffers. Fair shares are per consumer.
pub struct Consumer {
    pool: Arc<MemoryPool>,
    /// For logs: `shuffle 3 of app x`, `receive buffers`.
    name: String,
    /// Bytes this consumer has reserved.
    used: AtomicUsize,
    /// Producers waiting for room on this consumer's behalf.
    waiting: AtomicUsize,
}

/// Bytes reserved from a consumer; released when dropped.
pub struct Reservation {
    consumer: Arc<Consumer>,
    bytes: usize,
}

/// One consumer as the spiller and `/status` see it.
#[derive(Clone, Debug)]
pub struct ConsumerUsage {
    pub name: String,
    pub used: usize,
    pub waiting: usize,
}

impl MemoryPool {
    /// A pool of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            marks: Watermarks::for_limit(limit),
            used: AtomicUsize::new(0),
            spilling: AtomicBool::new(false),
            spill_wanted: Notify::new(),
            released: Notify::new(),
            consumers: Mutex::new(Vec::new()),
            waiting: AtomicUsize::new(0),
            fixed: AtomicUsize::new(0),
            accounting_errors: AtomicU64::new(0),
            disk_full: Mutex::new(None),
        })
    }

    /// A new consumer named `name` (for logs).
    pub fn consumer(self: &Arc<Self>, name: impl Into<String>) -> Arc<Consumer> {
        let consumer = Arc::new(Consumer {
            pool: self.clone(),
            name: name.into(),
            used: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
        });
        let mut list = lock(&self.consumers);
        list.retain(|c| c.strong_count() > 0);
        list.push(Arc::downgrade(&consumer));
        consumer
    }

    /// A standing reservation of `bytes` for `name`: held for the server's
    /// life, it takes part in no fair share (a fixed slice of the budget,
    /// such as the buffers of disk reads).
    pub fn standing(self: &Arc<Self>, name: &str, bytes: usize) -> Reservation {
        self.fixed.fetch_add(bytes, Ordering::AcqRel);
        let consumer = Arc::new(Consumer {
            pool: self.clone(),
            name: name.to_string(),
            used: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
        });
        consumer.reserve_now(bytes)
    }

    /// The budget in bytes.
    pub fn limit(&self) -> usize {
        self.marks.limit
    }

    /// The thresholds.
    pub fn watermarks(&self) -> Watermarks {
        self.marks
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Accounting errors seen since start (should stay 0).
    pub fn accounting_errors(&self) -> u64 {
        self.accounting_errors.load(Ordering::Relaxed)
    }

    /// Consumers holding or wanting memory now.
    pub fn active_consumers(&self) -> usize {
        lock(&self.consumers)
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|c| c.used.load(Ordering::Relaxed) > 0 || c.waiting.load(Ordering::Relaxed) > 0)
            .count()
    }

    /// Every live consumer's usage.
    pub fn usage(&self) -> Vec<ConsumerUsage> {
        lock(&self.consumers)
            .iter()
            .filter_map(Weak::upgrade)
            .map(|c| ConsumerUsage {
                name: c.name.clone(),
                used: c.used.load(Ordering::Relaxed),
                waiting: c.waiting.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Whether the spiller should flush (another) buffer now: usage is over
    /// the watermarks (hysteresis state updated), or a producer waits for
    /// room (it may wait just below the high watermark).
    pub fn should_spill(&self) -> bool {
        let spilling = self.spilling.load(Ordering::Acquire);
        let on = self.marks.should_spill(self.used(), spilling);
        self.spilling.store(on, Ordering::Release);
        on || self.waiting.load(Ordering::Acquire) > 0
    }

    /// Waits until the spiller is wanted (or `timeout` passes, so it can re-check).
    pub async fn spill_wanted(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.spill_wanted.notified()).await;
    }

    /// Records that flushes fail for lack of disk space (`Some`) or work again
    /// (`None`), and wakes every waiting producer so it learns at once.
    pub fn set_disk_full(&self, failure: Option<ServiceError>) {
        let changed = {
            let mut slot = lock(&self.disk_full);
            let changed = slot.is_some() != failure.is_some();
            *slot = failure;
            changed
        };
        if changed {
            self.released.notify_waiters();
        }
    }

    /// The disk-full error, while flushes fail for lack of space.
    pub fn disk_full(&self) -> Option<ServiceError> {
        lock(&self.disk_full).clone()
    }

    /// Wakes every waiting producer (a shutdown, a removed shuffle).
    pub fn wake_all(&self) {
        self.released.notify_waiters();
    }

    fn sub(&self, n: usize, what: &str) {
        if let Err(held) = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_sub(n)) {
            self.accounting_error(what, n, held);
            self.used.store(0, Ordering::Release);
        }
    }

    fn accounting_error(&self, what: &str, n: usize, held: usize) {
        self.accounting_errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("shuffle_memory_accounting_errors_total").increment(1);
        tracing::error!(what, released = n, held, "memory accounting error: released more than was reserved");
    }
}

impl Consumer {
    /// The consumer's name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes this consumer holds.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// The pool this consumer draws on.
    pub fn pool(&self) -> &Arc<MemoryPool> {
        &self.pool
    }

    /// Whether this consumer holds more than its fair share while the pool is above its high watermark.
    pub fn over_share(&self) -> bool {
        let (marks, fixed) = (self.pool.marks, self.pool.fixed.load(Ordering::Acquire));
        self.pool.used() > marks.high && self.used() > marks.share(self.pool.active_consumers(), fixed)
    }

    /// An empty reservation, to grow later.
    pub fn empty(self: &Arc<Self>) -> Reservation {
        Reservation { consumer: self.clone(), bytes: 0 }
    }

    /// Reserves `n` bytes at once, whatever the budget says: for memory that
    /// is already held (a block that arrived). Callers wait for room with
    /// [`Reservation::grow_wait`] before they take in more.
    pub fn reserve_now(self: &Arc<Self>, n: usize) -> Reservation {
        self.add(n);
        Reservation { consumer: self.clone(), bytes: n }
    }

    /// Reserves `n` bytes, waiting while the pool says this consumer may not
    /// grow. Fails with the disk-full error when the disk is full and there
    /// is no room (the data cannot be placed anywhere). Dropping the future
    /// stops the wait.
    pub async fn reserve(self: &Arc<Self>, n: usize) -> Result<Reservation, ServiceError> {
        self.grow_when_room(n).await?;
        Ok(Reservation { consumer: self.clone(), bytes: n })
    }

    /// Grows by `n` bytes if the pool says this consumer may (see
    /// [`Watermarks::may_grow`]), deciding and adding atomically, so that
    /// many streams growing at once cannot overshoot the thresholds together.
    fn try_grow(&self, n: usize, active: usize) -> bool {
        let pool = &self.pool;
        let fixed = pool.fixed.load(Ordering::Acquire);
        let own = self.used();
        let grown = pool.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |total| {
            pool.marks.may_grow(total, own, n, active, fixed).then_some(total + n)
        });
        match grown {
            Ok(total) => {
                self.used.fetch_add(n, Ordering::AcqRel);
                if pool.marks.should_spill(total + n, false) {
                    pool.spill_wanted.notify_one();
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Adds `n` bytes to this consumer's usage once the pool lets it grow
    /// (the caller takes them into a reservation).
    async fn grow_when_room(self: &Arc<Self>, n: usize) -> Result<(), ServiceError> {
        if n == 0 {
            return Ok(());
        }
        let pool = &self.pool;
        let mut waiting: Option<WaitingGuard<'_>> = None;
        loop {
            let released = pool.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            // A consumer not yet holding or wanting memory counts as one more active consumer.
            let counted = self.used() > 0 || waiting.is_some();
            let active = pool.active_consumers() + usize::from(!counted);
            if self.try_grow(n, active) {
                return Ok(());
            }
            if let Some(full) = pool.disk_full() {
                return Err(full);
            }
            if waiting.is_none() {
                self.waiting.fetch_add(1, Ordering::AcqRel);
                pool.waiting.fetch_add(1, Ordering::AcqRel);
                waiting = Some(WaitingGuard(self));
            }
            pool.spill_wanted.notify_one();
            let _ = tokio::time::timeout(WAIT_RECHECK, released).await;
        }
    }

    fn add(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.used.fetch_add(n, Ordering::AcqRel);
        let total = self.pool.used.fetch_add(n, Ordering::AcqRel) + n;
        if self.pool.marks.should_spill(total, false) {
            self.pool.spill_wanted.notify_one();
        }
    }

    fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        if let Err(held) = self.used.fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_sub(n)) {
            self.pool.accounting_error(&self.name, n, held);
            // Release from the pool only what this consumer held.
            self.used.store(0, Ordering::Release);
            self.pool.sub(held, &self.name);
        } else {
            self.pool.sub(n, &self.name);
        }
        self.pool.released.notify_waiters();
    }
}

/// Counts a producer as waiting while it exists.
struct WaitingGuard<'a>(&'a Consumer);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
        self.0.pool.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Reservation {
    /// Bytes reserved.
    pub fn size(&self) -> usize {
        self.bytes
    }

    /// The consumer the bytes are reserved from.
    pub fn consumer(&self) -> &Arc<Consumer> {
        &self.consumer
    }

    /// Grows by `n` bytes at once (memory already in hand).
    pub fn grow(&mut self, n: usize) {
        self.consumer.add(n);
        self.bytes += n;
    }

    /// Grows by `n` bytes, waiting for room first (deciding and growing atomically).
    pub async fn grow_wait(&mut self, n: usize) -> Result<(), ServiceError> {
        self.consumer.grow_when_room(n).await?;
        self.bytes += n;
        Ok(())
    }

    /// Releases `n` of the reserved bytes (at most what is reserved).
    pub fn shrink(&mut self, n: usize) {
        let n = n.min(self.bytes);
        self.bytes -= n;
        self.consumer.release(n);
    }

    /// Grows or shrinks to exactly `bytes` (growing at once).
    pub fn resize(&mut self, bytes: usize) {
        if bytes > self.bytes {
            self.grow(bytes - self.bytes);
        } else {
            self.shrink(self.bytes - bytes);
        }
    }

    /// Moves `n` of the reserved bytes (at most what is reserved) into a new
    /// reservation of the same consumer, e.g. a received block's share of a
    /// stream's buffers.
    pub fn split(&mut self, n: usize) -> Reservation {
        let n = n.min(self.bytes);
        self.bytes -= n;
        Reservation { consumer: self.consumer.clone(), bytes: n }
    }

    /// Moves these bytes to `to`'s consumer: a block received on a stream
    /// becomes part of its shuffle's memory.
    pub fn transfer(mut self, to: &Arc<Consumer>) -> Reservation {
        if Arc::ptr_eq(&self.consumer, to) {
            return self;
        }
        let bytes = std::mem::take(&mut self.bytes);
        to.add(bytes);
        self.consumer.release(bytes);
        Reservation { consumer: to.clone(), bytes }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.consumer.release(self.bytes);
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reservation({} bytes of {})", self.bytes, self.consumer.name)
    }
}

/// A disk-full error for producers waiting on a full pool, naming the data dir and reserve.
pub fn disk_full_error(detail: &str) -> ServiceError {
    ServiceError::new(ErrorKind::DiskFull, detail.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spilling_starts_at_high_and_runs_down_to_low() {
        let m = Watermarks::for_limit(1000);
        assert_eq!((m.low, m.high, m.hard, m.limit), (400, 700, 900, 1000));
        assert!(!m.should_spill(699, false));
        assert!(m.should_spill(700, false));
        assert!(m.should_spill(500, true), "once started, spilling continues below high");
        assert!(!m.should_spill(400, true), "and stops at low");
    }

    #[test]
    fn above_the_high_watermark_only_consumers_within_their_share_grow() {
        let m = Watermarks::for_limit(1000);
        assert!(m.may_grow(600, 600, 100, 2, 0), "below high anyone grows");
        assert!(!m.may_grow(800, 800, 10, 2, 0), "over its share of 450");
        assert!(m.may_grow(800, 0, 100, 2, 0), "a newcomer under its share grows above high");
        assert!(!m.may_grow(950, 0, 100, 2, 0), "but never past the budget");
        assert!(m.may_grow(800, 800, 10, 1, 0), "alone, the share is the hard limit");
        assert!(!m.may_grow(900, 900, 10, 1, 0));
        assert!(!m.may_grow(750, 700, 10, 1, 200), "standing reservations are not shared out");
    }

    #[test]
    fn reservations_release_on_drop_and_split_and_transfer_keep_the_total() {
        let pool = MemoryPool::new(1000);
        let a = pool.consumer("a");
        let b = pool.consumer("b");
        let mut r = a.reserve_now(300);
        let part = r.split(100);
        assert_eq!((r.size(), part.size(), a.used(), pool.used()), (200, 100, 300, 300));
        let moved = part.transfer(&b);
        assert_eq!((a.used(), b.used(), pool.used()), (200, 100, 300));
        drop(moved);
        r.resize(50);
        assert_eq!((a.used(), b.used(), pool.used()), (50, 0, 50));
        drop(r);
        assert_eq!(pool.used(), 0);
        assert_eq!(pool.accounting_errors(), 0);
    }

    #[test]
    fn an_over_release_is_counted_and_clamped_never_wrapped() {
        let pool = MemoryPool::new(1000);
        let a = pool.consumer("a");
        let _kept = a.reserve_now(10);
        a.release(50); // a bug elsewhere
        assert_eq!(pool.accounting_errors(), 1);
        assert_eq!(a.used(), 0);
        assert!(pool.used() <= 10, "pool counter clamped, not wrapped: {}", pool.used());
    }

    #[tokio::test]
    async fn a_producer_over_its_share_waits_while_another_consumer_proceeds() {
        let pool = MemoryPool::new(1000);
        let hog = pool.consumer("hog");
        let held = hog.reserve_now(850);
        let newcomer = pool.consumer("newcomer");
        // The newcomer is under its share: it proceeds at once.
        let r = tokio::time::timeout(Duration::from_millis(100), newcomer.reserve(100)).await;
        assert!(r.is_ok(), "the newcomer was not blocked by the hog");
        // The hog is over its share: it waits until memory is released.
        let waiter = tokio::spawn({
            let hog = hog.clone();
            async move { hog.reserve(10).await.map(|r| r.size()) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the hog must wait");
        drop(held);
        assert_eq!(waiter.await.unwrap().unwrap(), 10);
    }

    #[tokio::test]
    async fn a_producer_waiting_just_below_the_high_watermark_asks_for_a_spill() {
        let pool = MemoryPool::new(1000);
        let (a, b) = (pool.consumer("a"), pool.consumer("b"));
        let _b = b.reserve_now(1);
        let _a = a.reserve_now(690);
        assert!(!pool.should_spill(), "below the high watermark");
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.reserve(50).await.map(|r| r.size()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "740 would pass the high watermark with `a` over its share");
        assert!(pool.should_spill(), "a waiting producer must get the spiller going");
        waiter.abort();
    }

    #[tokio::test]
    async fn waiting_producers_learn_of_a_full_disk_at_once() {
        let pool = MemoryPool::new(1000);
        let c = pool.consumer("c");
        let _held = c.reserve_now(995);
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.reserve(100).await.map(|r| r.size()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = std::time::Instant::now();
        pool.set_disk_full(Some(disk_full_error("disk full under /data")));
        let err = waiter.await.unwrap().unwrap_err();
        assert_eq!(err.kind, ErrorKind::DiskFull);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
