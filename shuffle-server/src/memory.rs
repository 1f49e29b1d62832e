//! The server-wide memory budget for buffered blocks.
//!
//! One budget covers every shuffle. [`Watermarks`] is the decision, with no
//! clock or I/O: at the high watermark (70%) spilling starts, and continues
//! until usage falls to the low watermark (40%); at the hard limit (90%) the
//! server stops reading from producers' streams, so they block (QUIC flow
//! control carries the backpressure to them) instead of the server growing.
//! [`MemoryBudget`] wraps it with atomics and wake-ups for the async tasks.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

/// Spilling starts when usage reaches this fraction of the budget (percent).
pub const HIGH_WATERMARK_PERCENT: usize = 70;
/// Spilling continues until usage falls to this fraction (percent).
pub const LOW_WATERMARK_PERCENT: usize = 40;
/// Producers are paused while usage is at or above this fraction (percent).
pub const HARD_LIMIT_PERCENT: usize = 90;

/// The three thresholds of a budget, in bytes, and the spill hysteresis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermarks {
    /// Usage at which spilling starts.
    pub high: usize,
    /// Usage at which spilling stops.
    pub low: usize,
    /// Usage at which producers are paused.
    pub hard: usize,
}

impl Watermarks {
    /// The thresholds of a budget of `limit` bytes.
    pub fn for_limit(limit: usize) -> Self {
        Self {
            high: limit / 100 * HIGH_WATERMARK_PERCENT,
            low: limit / 100 * LOW_WATERMARK_PERCENT,
            hard: limit / 100 * HARD_LIMIT_PERCENT,
        }
    }

    /// Whether a spiller that is (or is not) already spilling should spill (on) at `used` bytes.
    pub fn should_spill(&self, used: usize, spilling: bool) -> bool {
        if spilling { used > self.low } else { used >= self.high }
    }

    /// Whether producers must wait at `used` bytes.
    pub fn must_pause(&self, used: usize) -> bool {
        used >= self.hard
    }
}

/// Shared accounting of buffered bytes, with wake-ups for the spiller and for paused producers.
pub struct MemoryBudget {
    /// The budget in bytes.
    limit: usize,
    /// Thresholds derived from `limit`.
    marks: Watermarks,
    /// Bytes of blocks currently held in memory.
    used: AtomicUsize,
    /// True while the spiller works down from the high to the low watermark.
    spilling: AtomicBool,
    /// Wakes the spiller when usage crosses the high watermark.
    spill_wanted: Notify,
    /// Wakes paused producers when memory is released.
    released: Notify,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            marks: Watermarks::for_limit(limit),
            used: AtomicUsize::new(0),
            spilling: AtomicBool::new(false),
            spill_wanted: Notify::new(),
            released: Notify::new(),
        }
    }

    /// The budget in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes in use now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Accounts `n` more bytes, waking the spiller if that crosses the high watermark.
    pub fn reserve(&self, n: usize) {
        let used = self.used.fetch_add(n, Ordering::AcqRel) + n;
        if self.marks.should_spill(used, false) {
            self.spill_wanted.notify_one();
        }
    }

    /// Releases `n` bytes, waking paused producers.
    pub fn release(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.used.fetch_sub(n, Ordering::AcqRel);
        debug_assert!(before >= n, "released {n} bytes with only {before} reserved");
        self.released.notify_waiters();
    }

    /// Whether the spiller should flush (another) partition now; updates the hysteresis state.
    pub fn should_spill(&self) -> bool {
        let spilling = self.spilling.load(Ordering::Acquire);
        let on = self.marks.should_spill(self.used(), spilling);
        self.spilling.store(on, Ordering::Release);
        on
    }

    /// Waits until the spiller is wanted (or `timeout` passes, so it can re-check).
    pub async fn spill_wanted(&self, timeout: std::time::Duration) {
        let _ = tokio::time::timeout(timeout, self.spill_wanted.notified()).await;
    }

    /// Whether producers must pause now.
    pub fn must_pause(&self) -> bool {
        self.marks.must_pause(self.used())
    }

    /// Waits until usage is below the hard limit, or `timeout` passes (so the
    /// caller can re-check conditions such as a failing disk). Returns whether there is room.
    pub async fn wait_for_room(&self, timeout: std::time::Duration) -> bool {
        let released = self.released.notified();
        tokio::pin!(released);
        released.as_mut().enable();
        if !self.must_pause() {
            return true;
        }
        self.spill_wanted.notify_one();
        let _ = tokio::time::timeout(timeout, released).await;
        !self.must_pause()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spilling_starts_at_high_and_runs_down_to_low() {
        let m = Watermarks::for_limit(1000);
        assert_eq!((m.low, m.high, m.hard), (400, 700, 900));
        assert!(!m.should_spill(699, false));
        assert!(m.should_spill(700, false));
        assert!(m.should_spill(500, true), "once started, spilling continues below high");
        assert!(!m.should_spill(400, true), "and stops at low");
        assert!(!m.must_pause(899));
        assert!(m.must_pause(900));
    }

    #[test]
    fn budget_tracks_hysteresis() {
        let b = MemoryBudget::new(1000);
        b.reserve(750);
        assert!(b.should_spill());
        b.release(300);
        assert!(b.should_spill(), "450 is above low while spilling");
        b.release(100);
        assert!(!b.should_spill());
        b.reserve(100);
        assert!(!b.should_spill(), "450 is below high when not spilling");
    }

    #[tokio::test]
    async fn paused_producer_resumes_when_memory_is_released() {
        let b = std::sync::Arc::new(MemoryBudget::new(1000));
        b.reserve(950);
        assert!(!b.wait_for_room(std::time::Duration::from_millis(10)).await);
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.wait_for_room(std::time::Duration::from_secs(10)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        b.release(500);
        assert!(waiter.await.unwrap());
    }
}
