//! Server-wide counters, updated where things happen. They are the one
//! source of the numbers that tests read ([`ServerStats::snapshot`]) and
//! that the metrics endpoint exports (see [`crate::telemetry`]).

use std::sync::atomic::{AtomicU64, Ordering};

use shuffle_protocol::ExchangeMode;

/// The exchange modes, in the order of the per-mode counters.
pub const MODES: [ExchangeMode; 3] = [ExchangeMode::Hash, ExchangeMode::Sort, ExchangeMode::Hybrid];

/// Position of `mode` in the per-mode counters.
pub fn mode_index(mode: ExchangeMode) -> usize {
    match mode {
        ExchangeMode::Hash => 0,
        ExchangeMode::Sort => 1,
        ExchangeMode::Hybrid => 2,
    }
}

/// The label value of `mode` in metrics and status.
pub fn mode_name(mode: ExchangeMode) -> &'static str {
    match mode {
        ExchangeMode::Hash => "hash",
        ExchangeMode::Sort => "sort",
        ExchangeMode::Hybrid => "hybrid",
    }
}

/// Monotonic counters of the server's work since start.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Block bytes accepted from producers, per mode.
    pub received_bytes: [AtomicU64; 3],
    /// Blocks accepted from producers, per mode.
    pub received_blocks: [AtomicU64; 3],
    /// Block bytes sent to readers, per mode.
    pub served_bytes: [AtomicU64; 3],
    /// Blocks sent to readers, per mode.
    pub served_blocks: [AtomicU64; 3],
    /// Map attempts committed.
    pub commits: AtomicU64,
    /// Map attempts refused because another attempt committed first.
    pub refused_attempts: AtomicU64,
    /// Flushes forced by memory pressure (spills).
    pub spills: AtomicU64,
    /// Bytes written by those spills.
    pub spilled_bytes: AtomicU64,
    /// Bytes written to shuffle files by any flush.
    pub flushed_bytes: AtomicU64,
    /// Requests that ended in an error sent to the client.
    pub errors: AtomicU64,
    /// Block bytes handed to same-host readers as file ranges (read by them, not sent).
    pub served_direct_bytes: AtomicU64,
}

/// A copy of the counters at one moment, summed over modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub bytes_received: u64,
    pub blocks_received: u64,
    pub bytes_served: u64,
    pub blocks_served: u64,
    pub commits: u64,
    pub refused_attempts: u64,
    pub spills: u64,
    pub spilled_bytes: u64,
    pub flushed_bytes: u64,
    pub errors: u64,
    pub bytes_served_direct: u64,
}

impl ServerStats {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one block of `bytes` received for a shuffle of `mode`.
    pub fn received(&self, mode: ExchangeMode, bytes: u64) {
        Self::add(&self.received_bytes[mode_index(mode)], bytes);
        Self::add(&self.received_blocks[mode_index(mode)], 1);
    }

    /// Counts `blocks` blocks of `bytes` in all served for a shuffle of `mode`.
    pub fn served(&self, mode: ExchangeMode, blocks: u64, bytes: u64) {
        Self::add(&self.served_bytes[mode_index(mode)], bytes);
        Self::add(&self.served_blocks[mode_index(mode)], blocks);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let sum = |cs: &[AtomicU64; 3]| cs.iter().map(r).sum();
        StatsSnapshot {
            bytes_received: sum(&self.received_bytes),
            blocks_received: sum(&self.received_blocks),
            bytes_served: sum(&self.served_bytes),
            blocks_served: sum(&self.served_blocks),
            commits: r(&self.commits),
            refused_attempts: r(&self.refused_attempts),
            spills: r(&self.spills),
            spilled_bytes: r(&self.spilled_bytes),
            flushed_bytes: r(&self.flushed_bytes),
            errors: r(&self.errors),
            bytes_served_direct: r(&self.served_direct_bytes),
        }
    }
}
