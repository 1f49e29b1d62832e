//! Hash exchange storage (DESIGN.md, "Hash"): the blocks of every map for a
//! partition are appended to that partition's in-memory buffer and flushed,
//! a few MiB at a time, to one file per partition — R files per shuffle.
//!
//! Every accepted block is kept in arrival order with its map and attempt, in
//! memory or at an offset of the partition file. A reader takes, in order,
//! exactly the blocks whose attempt is the committed attempt of their map;
//! blocks of other attempts are dropped from memory as soon as their attempt
//! loses or is abandoned, and skipped on disk.
//!
//! Files are append-only and never truncated while the shuffle exists, so a
//! memory map of a file's first `n` durable bytes stays valid; readers get
//! `Bytes` slices of the mapping without copying. Removing a shuffle unlinks
//! its files, which leaves existing mappings readable until dropped.

use std::{fs::File, path::PathBuf, sync::Mutex};

use bytes::Bytes;
use shuffle_protocol::{AttemptId, BlockHeader, MapCommit, MapId, PartitionId, ServiceError};

use crate::{
    disk,
    shuffle::{FlushTarget, ShuffleCore, SnapshotBlock, lock},
};

/// Where one stored block is.
#[derive(Clone, Debug)]
enum Location {
    /// In memory, not yet written to the partition file.
    Memory(Bytes),
    /// In the partition file at this offset, with this length.
    Disk { offset: u64, len: u32 },
    /// Dropped from memory because its attempt lost or was abandoned.
    Discarded,
}

/// One block accepted for a partition.
#[derive(Clone, Debug)]
struct StoredBlock {
    /// The map that wrote it.
    map: MapId,
    /// The attempt that wrote it; served only if this attempt commits.
    attempt: AttemptId,
    /// Where its bytes are.
    location: Location,
}

/// The blocks of one partition and the state of its file.
#[derive(Debug, Default)]
struct PartitionStore {
    /// Every block accepted, in arrival order. Blocks in memory form a suffix
    /// starting at `first_in_memory`, because flushes take the oldest first.
    blocks: Vec<StoredBlock>,
    /// Index of the first block that may still be in memory.
    first_in_memory: usize,
    /// Bytes of blocks held in memory.
    memory_bytes: usize,
    /// Bytes written to the file and safe to map.
    file_len: u64,
    /// A mapping of the file's first `mapped.len()` bytes, shared by readers.
    mapped: Option<Bytes>,
    /// Whether a flush of this partition is under way (flushes of one partition never overlap).
    flushing: bool,
}

/// The partitions of one hash shuffle.
pub struct HashStorage {
    /// One store per partition.
    partitions: Box<[Mutex<PartitionStore>]>,
}

impl HashStorage {
    /// Empty storage for `partitions` partitions.
    pub fn new(partitions: u32) -> Self {
        Self { partitions: (0..partitions).map(|_| Mutex::default()).collect() }
    }

    /// Stores one block in memory.
    pub fn append(
        &self,
        core: &ShuffleCore,
        header: &BlockHeader,
        bytes: Bytes,
    ) -> Result<Option<FlushTarget>, ServiceError> {
        let len = bytes.len();
        let partition = header.id.partition;
        let mut store = lock(&self.partitions[partition as usize]);
        if core.is_removed() {
            return Ok(None); // `clear` has run or will not see this block: do not account it
        }
        core.env.memory.reserve(len);
        store.blocks.push(StoredBlock {
            map: header.id.map,
            attempt: header.id.attempt,
            location: Location::Memory(bytes),
        });
        store.memory_bytes += len;
        let full = store.memory_bytes >= core.env.flush_size && !store.flushing;
        Ok(full.then_some(FlushTarget::Partition(partition)))
    }

    /// Drops from memory every block of `map` whose attempt matches `discard`.
    pub fn discard_attempts(&self, core: &ShuffleCore, map: MapId, discard: impl Fn(AttemptId) -> bool) {
        let mut freed = 0;
        for partition in self.partitions.iter() {
            let mut store = lock(partition);
            let first = store.first_in_memory;
            let mut freed_here = 0;
            for block in &mut store.blocks[first..] {
                if block.map == map
                    && discard(block.attempt)
                    && let Location::Memory(bytes) = &block.location
                {
                    freed_here += bytes.len();
                    block.location = Location::Discarded;
                }
            }
            store.memory_bytes -= freed_here;
            freed += freed_here;
        }
        core.env.memory.release(freed);
    }

    /// The committed blocks of `partition`, in arrival order.
    pub fn snapshot(
        &self,
        core: &ShuffleCore,
        partition: PartitionId,
        commits: &[MapCommit],
    ) -> Result<Vec<SnapshotBlock>, ServiceError> {
        let mut store = lock(&self.partitions[partition as usize]);
        let needs_map = store.mapped.as_ref().map_or(0, |m| m.len() as u64) < store.file_len;
        if needs_map {
            store.mapped = Some(map_file(&partition_path(core, partition))?);
        }
        let mapped = store.mapped.clone().unwrap_or_default();
        let mut blocks = Vec::new();
        for block in &store.blocks {
            if commits[block.map as usize].attempt != block.attempt {
                continue;
            }
            let bytes = match &block.location {
                Location::Memory(bytes) => bytes.clone(),
                Location::Disk { offset, len } => mapped.slice(*offset as usize..*offset as usize + *len as usize),
                Location::Discarded => {
                    return Err(ServiceError::new(
                        shuffle_protocol::ErrorKind::Io,
                        format!("a block of committed map {} attempt {} was discarded", block.map, block.attempt),
                    ));
                }
            };
            blocks.push(SnapshotBlock { bytes, position: None });
        }
        Ok(blocks)
    }

    /// The partition holding the most memory (not being flushed), and how much.
    pub fn largest_partition(&self) -> Option<(PartitionId, usize)> {
        (0..self.partitions.len())
            .map(|p| {
                let store = lock(&self.partitions[p]);
                (p as PartitionId, if store.flushing { 0 } else { store.memory_bytes })
            })
            .max_by_key(|&(_, bytes)| bytes)
            .filter(|&(_, bytes)| bytes > 0)
    }

    /// Writes the partition's in-memory blocks to its file and frees their
    /// memory. Blocking I/O. Returns the bytes written.
    pub fn flush_partition(&self, core: &ShuffleCore, partition: PartitionId) -> Result<u64, ServiceError> {
        let (start, pending, offset) = {
            let mut store = lock(&self.partitions[partition as usize]);
            if store.flushing || store.memory_bytes == 0 {
                return Ok(0);
            }
            store.flushing = true;
            let start = store.first_in_memory;
            let pending: Vec<(usize, Bytes)> = store.blocks[start..]
                .iter()
                .enumerate()
                .filter_map(|(i, b)| match &b.location {
                    Location::Memory(bytes) => Some((start + i, bytes.clone())),
                    _ => None,
                })
                .collect();
            (start, pending, store.file_len)
        };
        let chunks: Vec<Bytes> = pending.iter().map(|(_, b)| b.clone()).collect();
        let result = core.write_at(&partition_path(core, partition), &chunks, offset);
        let mut store = lock(&self.partitions[partition as usize]);
        if core.is_removed() {
            return Ok(0); // `clear` emptied the store and released its memory meanwhile
        }
        store.flushing = false;
        let written = result?;
        let mut freed = 0;
        let mut at = offset;
        for (index, bytes) in &pending {
            let block = &mut store.blocks[*index];
            // A block discarded meanwhile was written too; it stays discarded
            // (its memory was released when it was discarded).
            if matches!(block.location, Location::Memory(_)) {
                freed += bytes.len();
                block.location = Location::Disk { offset: at, len: bytes.len() as u32 };
            }
            at += bytes.len() as u64;
        }
        store.first_in_memory = pending.last().map_or(start, |(i, _)| i + 1);
        store.file_len = offset + written;
        store.memory_bytes -= freed;
        drop(store);
        core.env.memory.release(freed);
        Ok(written)
    }

    /// Bytes held in memory and written to files.
    pub fn usage(&self) -> (u64, u64) {
        self.partitions.iter().fold((0, 0), |(m, d), p| {
            let p = lock(p);
            (m + p.memory_bytes as u64, d + p.file_len)
        })
    }

    /// Empties every partition; returns the bytes of memory to release.
    pub fn clear(&self) -> usize {
        self.partitions.iter().map(|p| std::mem::take(&mut *lock(p)).memory_bytes).sum()
    }
}

fn partition_path(core: &ShuffleCore, partition: PartitionId) -> PathBuf {
    core.dir.join(format!("partition-{partition:06}.data"))
}

/// Maps a shuffle file read-only.
pub fn map_file(path: &std::path::Path) -> Result<Bytes, ServiceError> {
    let file = File::open(path).map_err(|e| disk::io_error(path, "opening", e))?;
    // SAFETY: shuffle files are append-only and never truncated while the
    // shuffle exists; removal unlinks them, which keeps the pages of an
    // existing mapping valid. No one else writes under our data dir.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| disk::io_error(path, "mapping", e))?;
    Ok(Bytes::from_owner(map))
}
