//! Server-wide counters, updated where things happen and read by tests,
//! logs and (later) the metrics exporter.

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters of the server's work since start.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Block bytes accepted from producers.
    pub bytes_received: AtomicU64,
    /// Blocks accepted from producers.
    pub blocks_received: AtomicU64,
    /// Block bytes sent to readers.
    pub bytes_served: AtomicU64,
    /// Blocks sent to readers.
    pub blocks_served: AtomicU64,
    /// Map attempts committed.
    pub commits: AtomicU64,
    /// Map attempts refused because another attempt committed first.
    pub refused_attempts: AtomicU64,
    /// Partition flushes forced by memory pressure (spills).
    pub spills: AtomicU64,
    /// Bytes written by those spills.
    pub spilled_bytes: AtomicU64,
    /// Bytes written to partition files by any flush.
    pub flushed_bytes: AtomicU64,
    /// Requests that ended in an error sent to the client.
    pub errors: AtomicU64,
}

/// A copy of the counters at one moment.
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
}

impl ServerStats {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            bytes_received: r(&self.bytes_received),
            blocks_received: r(&self.blocks_received),
            bytes_served: r(&self.bytes_served),
            blocks_served: r(&self.blocks_served),
            commits: r(&self.commits),
            refused_attempts: r(&self.refused_attempts),
            spills: r(&self.spills),
            spilled_bytes: r(&self.spilled_bytes),
            flushed_bytes: r(&self.flushed_bytes),
            errors: r(&self.errors),
        }
    }
}
