//! Hybrid exchange storage (DESIGN.md, "Hybrid"): readers may subscribe to a
//! partition at any time and receive each block as it arrives, from memory
//! while they keep up and from disk when they fall behind, as one ordered
//! sequence either way.
//!
//! Each partition is a log of blocks in arrival order; a reader follows it
//! with a cursor and wakes on a per-partition version number bumped by every
//! append, failure and commit. Two spill strategies:
//!
//! - `Selective`: blocks stay in memory until the budget's high watermark;
//!   then the partitions with the most unconsumed data spill their newest
//!   blocks (those furthest from being read) to the partition file, within the
//!   shuffle's spill quota. A consumed block is freed at once, so a partition
//!   is read once.
//! - `Full`: every block is also appended to the partition file in order
//!   (a flush-size at a time, and under pressure), after which its memory is
//!   freed; any reader can read the partition again from the start.
//!
//! Blocks of an attempt that fails or loses to another attempt are never
//! served again; a reader that already received some of them is told.

use std::{
    collections::HashSet,
    path::PathBuf,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use shuffle_protocol::{
    AttemptId, BlockHeader, ErrorKind, MapId, PartitionId, ServiceError, ShuffleSpec, SpillStrategy,
};
use tokio::sync::watch;

use crate::{
    hash::map_file,
    shuffle::{FlushTarget, ShuffleCore, lock},
};

/// One block in a partition's log.
#[derive(Debug)]
struct HybridBlock {
    map: MapId,
    attempt: AttemptId,
    len: u32,
    /// The bytes while in memory.
    memory: Option<Bytes>,
    /// Offset in the partition file once written there.
    disk: Option<u64>,
}

/// One partition's log and file.
#[derive(Debug, Default)]
struct HybridPartition {
    /// Every block accepted, in arrival order.
    log: Vec<HybridBlock>,
    /// Bytes of blocks held in memory.
    memory_bytes: usize,
    /// Full: bytes in memory not yet on disk.
    unflushed: usize,
    /// Bytes written to the partition file.
    file_len: u64,
    /// A mapping of the file's first `mapped.len()` bytes.
    mapped: Option<Bytes>,
    /// Whether a flush is under way.
    flushing: bool,
    /// Selective: whether a reader has opened the partition (it can be read once).
    opened: bool,
}

/// A block a reader may take next.
pub struct NextBlock {
    /// Its position in the log; the reader's cursor moves past it.
    pub index: usize,
    pub bytes: Bytes,
    pub map: MapId,
    pub attempt: AttemptId,
}

/// The partitions of one hybrid shuffle.
pub struct HybridStorage {
    partitions: Box<[Mutex<HybridPartition>]>,
    /// Per partition, bumped on every change a waiting reader may care about.
    versions: Box<[watch::Sender<u64>]>,
    /// The spill strategy of the shuffle.
    strategy: SpillStrategy,
    /// Most bytes the shuffle may write to disk.
    quota: Option<u64>,
    /// Bytes written to disk or reserved by a flush in progress; reserved
    /// under this lock so concurrent flushes cannot overrun the quota.
    quota_used: Mutex<u64>,
    /// Bytes written to disk so far.
    spilled: AtomicU64,
    /// Attempts that pushed blocks.
    attempts: Mutex<HashSet<(MapId, AttemptId)>>,
    /// Attempts that failed or lost; their blocks are never served.
    failed: Mutex<HashSet<(MapId, AttemptId)>>,
}

impl HybridStorage {
    /// Empty storage for a hybrid shuffle.
    pub fn new(spec: &ShuffleSpec) -> Self {
        Self {
            partitions: (0..spec.partitions).map(|_| Mutex::default()).collect(),
            versions: (0..spec.partitions).map(|_| watch::Sender::new(0)).collect(),
            strategy: spec.spill,
            quota: spec.spill_quota,
            quota_used: Mutex::new(0),
            spilled: AtomicU64::new(0),
            attempts: Mutex::new(HashSet::new()),
            failed: Mutex::new(HashSet::new()),
        }
    }

    fn bump(&self, partition: PartitionId) {
        self.versions[partition as usize].send_modify(|v| *v += 1);
    }

    /// Wakes every waiting reader (a commit or a failure happened).
    pub fn bump_all(&self) {
        for v in self.versions.iter() {
            v.send_modify(|v| *v += 1);
        }
    }

    /// Records that `(map, attempt)` pushes blocks; called under the shuffle's
    /// commit lock, so a commit that fails this attempt sees it.
    pub fn note_attempt(&self, map: MapId, attempt: AttemptId) {
        lock(&self.attempts).insert((map, attempt));
    }

    /// Appends a block to its partition's log and wakes the partition's readers.
    /// A block of an attempt that failed meanwhile, or of a removed shuffle, is dropped.
    pub fn append(
        &self,
        core: &ShuffleCore,
        header: &BlockHeader,
        bytes: Bytes,
    ) -> Result<Option<FlushTarget>, ServiceError> {
        let (map, attempt, partition) = (header.id.map, header.id.attempt, header.id.partition);
        let len = bytes.len();
        let ready = {
            let failed = lock(&self.failed);
            let mut p = lock(&self.partitions[partition as usize]);
            if failed.contains(&(map, attempt)) || core.is_removed() {
                return Ok(None);
            }
            drop(failed);
            core.env.memory.reserve(len);
            p.log.push(HybridBlock { map, attempt, len: len as u32, memory: Some(bytes), disk: None });
            p.memory_bytes += len;
            if self.strategy == SpillStrategy::Full {
                p.unflushed += len;
            }
            self.strategy == SpillStrategy::Full && p.unflushed >= core.env.flush_size && !p.flushing
        };
        self.bump(partition);
        Ok(ready.then_some(FlushTarget::Partition(partition)))
    }

    /// Marks a reader's opening of `partition`: a selective partition can be read once.
    pub fn open_reader(&self, core: &ShuffleCore, partition: PartitionId) -> Result<(), ServiceError> {
        let mut p = lock(&self.partitions[partition as usize]);
        if self.strategy == SpillStrategy::Selective && p.opened {
            return Err(ServiceError::new(
                ErrorKind::AlreadyConsumed,
                format!(
                    "partition {partition} of {} uses selective spilling: its blocks are freed as they are \
                     consumed, so it cannot be read again; re-run its producers into a new shuffle",
                    core.label()
                ),
            ));
        }
        p.opened = true;
        Ok(())
    }

    /// A receiver that changes whenever `partition` may have something new for its readers.
    pub fn subscribe(&self, partition: PartitionId) -> watch::Receiver<u64> {
        self.versions[partition as usize].subscribe()
    }

    /// Whether `(map, attempt)` failed or lost.
    pub fn is_failed(&self, map: MapId, attempt: AttemptId) -> bool {
        lock(&self.failed).contains(&(map, attempt))
    }

    /// Whether readers may re-read partitions (`Full`).
    pub fn rereadable(&self) -> bool {
        self.strategy == SpillStrategy::Full
    }

    /// The first servable block at or after `cursor`, if one has arrived.
    pub fn next_block(
        &self,
        core: &ShuffleCore,
        partition: PartitionId,
        cursor: usize,
    ) -> Result<Option<NextBlock>, ServiceError> {
        // Lock order: `failed`, then a partition (`fail_attempts` never holds both).
        let failed = lock(&self.failed);
        let mut p = lock(&self.partitions[partition as usize]);
        let servable = |i: usize| failed.is_empty() || !failed.contains(&(p.log[i].map, p.log[i].attempt));
        let Some(index) = (cursor..p.log.len()).find(|&i| servable(i)) else {
            return Ok(None);
        };
        drop(failed);
        if p.log[index].memory.is_none() && p.mapped.as_ref().map_or(0, |m| m.len() as u64) < p.file_len {
            p.mapped = Some(map_file(&partition_path(core, partition))?);
        }
        let block = &p.log[index];
        let bytes = match (&block.memory, block.disk) {
            (Some(bytes), _) => bytes.clone(),
            (None, Some(offset)) => {
                let mapped = p.mapped.as_ref().expect("mapped above");
                mapped.slice(offset as usize..offset as usize + block.len as usize)
            }
            (None, None) => {
                return Err(ServiceError::new(
                    ErrorKind::AlreadyConsumed,
                    format!("block {index} of partition {partition} of {} was already consumed", core.label()),
                ));
            }
        };
        Ok(Some(NextBlock { index, bytes, map: block.map, attempt: block.attempt }))
    }

    /// Selective: frees a block the reader has handed to the network.
    pub fn consumed(&self, core: &ShuffleCore, partition: PartitionId, index: usize) {
        if self.strategy != SpillStrategy::Selective {
            return;
        }
        let mut p = lock(&self.partitions[partition as usize]);
        if let Some(bytes) = p.log.get_mut(index).and_then(|b| b.memory.take()) {
            p.memory_bytes -= bytes.len();
            drop(p);
            core.env.memory.release(bytes.len());
        }
    }

    /// Marks the attempts of `map` matching `fail` (that pushed blocks) as failed,
    /// frees their blocks' memory, and wakes every reader.
    pub fn fail_attempts(&self, core: &ShuffleCore, map: MapId, fail: impl Fn(AttemptId) -> bool) {
        let newly: Vec<(MapId, AttemptId)> = {
            let attempts = lock(&self.attempts);
            let mut failed = lock(&self.failed);
            attempts.iter().filter(|(m, a)| *m == map && fail(*a) && failed.insert((*m, *a))).copied().collect()
        };
        if newly.is_empty() {
            self.bump_all();
            return;
        }
        let mut freed = 0;
        for partition in self.partitions.iter() {
            let mut p = lock(partition);
            let mut freed_here = 0;
            for block in p.log.iter_mut().filter(|b| newly.contains(&(b.map, b.attempt))) {
                if let Some(bytes) = block.memory.take() {
                    freed_here += bytes.len();
                }
            }
            p.memory_bytes -= freed_here;
            if self.strategy == SpillStrategy::Full {
                p.unflushed = p.unflushed.saturating_sub(freed_here);
            }
            freed += freed_here;
        }
        core.env.memory.release(freed);
        self.bump_all();
    }

    /// Whether the spill quota is used up.
    fn quota_exhausted(&self) -> bool {
        self.quota.is_some_and(|q| *lock(&self.quota_used) >= q)
    }

    /// The partition with the most memory to spill, and how much. A selective
    /// shuffle whose quota is used up has nothing to spill: its producers wait
    /// for its readers (backpressure).
    pub fn largest_partition(&self) -> Option<(PartitionId, usize)> {
        if self.strategy == SpillStrategy::Selective && self.quota_exhausted() {
            return None;
        }
        (0..self.partitions.len())
            .map(|i| {
                let p = lock(&self.partitions[i]);
                let spillable = match self.strategy {
                    SpillStrategy::Full => p.unflushed,
                    SpillStrategy::Selective => p.memory_bytes,
                };
                (i as PartitionId, if p.flushing { 0 } else { spillable })
            })
            .max_by_key(|&(_, n)| n)
            .filter(|&(_, n)| n > 0)
    }

    /// Writes blocks of `partition` to its file and frees their memory: with
    /// `Full`, every block not yet on disk, in order; with `Selective`, the
    /// newest unconsumed blocks, about half the partition's memory. Stays
    /// within the spill quota. Blocking I/O; returns the bytes written.
    pub fn flush_partition(&self, core: &ShuffleCore, partition: PartitionId) -> Result<u64, ServiceError> {
        let mut quota_used = lock(&self.quota_used);
        let quota_left = self.quota.map_or(u64::MAX, |q| q.saturating_sub(*quota_used));
        let (chosen, offset) = {
            let mut p = lock(&self.partitions[partition as usize]);
            if p.flushing {
                return Ok(0);
            }
            let candidates = (0..p.log.len()).filter(|&i| p.log[i].memory.is_some() && p.log[i].disk.is_none());
            let mut chosen: Vec<usize> = match self.strategy {
                SpillStrategy::Full => candidates.collect(),
                SpillStrategy::Selective => {
                    let target = p.memory_bytes.div_ceil(2);
                    let mut picked = Vec::new();
                    let mut bytes = 0;
                    for i in candidates.collect::<Vec<_>>().into_iter().rev() {
                        if bytes >= target {
                            break;
                        }
                        bytes += p.log[i].len as usize;
                        picked.push(i);
                    }
                    picked.reverse();
                    picked
                }
            };
            // Within the quota: Full keeps the oldest (order on disk matters),
            // Selective the newest (furthest from being read).
            let mut total: u64 = chosen.iter().map(|&i| u64::from(p.log[i].len)).sum();
            while total > quota_left && !chosen.is_empty() {
                let i = match self.strategy {
                    SpillStrategy::Full => chosen.pop(),
                    SpillStrategy::Selective => Some(chosen.remove(0)),
                };
                total -= i.map_or(0, |i| u64::from(p.log[i].len));
            }
            if chosen.is_empty() {
                let full_over_quota = self.strategy == SpillStrategy::Full && p.unflushed > 0 && quota_left == 0;
                if full_over_quota {
                    return Err(ServiceError::new(
                        ErrorKind::DiskFull,
                        format!(
                            "the spill quota of {} bytes of {} is used up, and with full spilling every block \
                             must be written to disk; register it with a larger quota",
                            self.quota.unwrap_or_default(),
                            core.label()
                        ),
                    ));
                }
                return Ok(0);
            }
            *quota_used += total;
            p.flushing = true;
            let chosen: Vec<(usize, Bytes)> =
                chosen.into_iter().filter_map(|i| p.log[i].memory.clone().map(|b| (i, b))).collect();
            (chosen, p.file_len)
        };
        drop(quota_used);
        let chunks: Vec<Bytes> = chosen.iter().map(|(_, b)| b.clone()).collect();
        let reserved: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        let result = core.write_at(&partition_path(core, partition), &chunks, offset);
        if result.is_err() {
            let mut used = lock(&self.quota_used);
            *used = used.saturating_sub(reserved);
        }
        let mut p = lock(&self.partitions[partition as usize]);
        if core.is_removed() {
            return Ok(0);
        }
        p.flushing = false;
        let written = result?;
        self.spilled.fetch_add(written, Ordering::AcqRel);
        let mut freed = 0;
        let mut at = offset;
        for (index, bytes) in &chosen {
            let block = &mut p.log[*index];
            block.disk = Some(at);
            // Only memory this flush frees leaves `unflushed`: a block whose
            // attempt failed meanwhile was taken out of it by `fail_attempts`.
            if block.memory.take().is_some() {
                freed += bytes.len();
            }
            at += bytes.len() as u64;
        }
        p.file_len = offset + written;
        p.memory_bytes -= freed;
        if self.strategy == SpillStrategy::Full {
            p.unflushed -= freed;
        }
        drop(p);
        core.env.memory.release(freed);
        Ok(written)
    }

    /// Bytes held in memory and written to files.
    pub fn usage(&self) -> (u64, u64) {
        let memory = self.partitions.iter().map(|p| lock(p).memory_bytes as u64).sum();
        (memory, self.spilled.load(Ordering::Acquire))
    }

    /// Empties every partition and wakes readers; returns the bytes of memory to release.
    pub fn clear(&self) -> usize {
        let freed = self.partitions.iter().map(|p| std::mem::take(&mut *lock(p)).memory_bytes).sum();
        self.bump_all();
        freed
    }
}

fn partition_path(core: &ShuffleCore, partition: PartitionId) -> PathBuf {
    core.dir.join(format!("partition-{partition:06}.data"))
}
