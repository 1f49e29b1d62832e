//! Hash exchange storage (DESIGN.md, "Hash"): the blocks of every map for a
//! partition are appended to that partition's in-memory buffer and flushed,
//! a few MiB at a time, to one file per partition — R files per shuffle.
//!
//! Every accepted block is kept in arrival order with its map and attempt, in
//! memory or at an offset of the partition file. Blocks of attempts that never
//! commit stay where they are but are never served: a reader takes, in order,
//! exactly the blocks whose attempt is the committed attempt of their map.
//!
//! Files are append-only and never truncated while the shuffle exists, so a
//! memory map of a file's first `n` durable bytes stays valid; readers get
//! `Bytes` slices of the mapping without copying. Removing a shuffle unlinks
//! its files, which leaves existing mappings readable until dropped.

use std::{
    fs::{File, OpenOptions},
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use shuffle_protocol::{
    AppId, AttemptId, BlockHeader, ErrorKind, MapCommit, MapEnd, MapId, PartitionId, ServiceError,
    ShuffleId, ShuffleSpec,
};
use tokio::sync::watch;

use crate::{
    commit::{CommitDecision, MapCommits},
    disk,
    memory::MemoryBudget,
    stats::ServerStats,
};

/// Where one stored block is.
#[derive(Clone, Debug)]
enum Location {
    /// In memory, not yet written to the partition file.
    Memory(Bytes),
    /// In the partition file at this offset, with this length.
    Disk { offset: u64, len: u32 },
    /// Dropped from memory because its attempt lost; it was never written.
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

/// Why a flush was asked for, for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushReason {
    /// The partition's buffer reached the flush size.
    BufferFull,
    /// The server-wide budget crossed its high watermark.
    MemoryPressure,
    /// The server is shutting down.
    Shutdown,
}

/// What every shuffle's storage shares with the rest of the server.
#[derive(Clone)]
pub struct StorageEnv {
    /// The server-wide budget buffers are accounted in.
    pub memory: Arc<MemoryBudget>,
    /// Server counters.
    pub stats: Arc<ServerStats>,
    /// A partition's buffer is flushed at this many bytes.
    pub flush_size: usize,
    /// Free bytes a flush must leave on the data dir's filesystem.
    pub disk_reserve: u64,
}

/// One registered hash shuffle.
pub struct HashShuffle {
    /// The owning app.
    pub app: AppId,
    /// The shuffle's id within the app.
    pub id: ShuffleId,
    /// What the client registered.
    pub spec: ShuffleSpec,
    /// Directory holding the partition files.
    dir: PathBuf,
    /// Commit state of every map.
    commits: Mutex<MapCommits>,
    /// Becomes true when every map has committed (or the shuffle is removed).
    complete: watch::Sender<bool>,
    /// One store per partition.
    partitions: Box<[Mutex<PartitionStore>]>,
    /// Budget, counters and limits shared with the rest of the server.
    env: StorageEnv,
    /// The last flush failure (a full disk, say), reported to producers until a flush succeeds.
    failure: Mutex<Option<ServiceError>>,
    /// Set once the shuffle is unregistered; everything after fails with `UnknownShuffle`.
    removed: AtomicBool,
}

impl HashShuffle {
    /// Creates the shuffle's directory and empty state.
    pub fn create(
        app: AppId,
        id: ShuffleId,
        spec: ShuffleSpec,
        dir: PathBuf,
        env: StorageEnv,
    ) -> Result<Self, ServiceError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| disk::io_error(&dir, "creating shuffle directory", e))?;
        let label = format!("shuffle {id} of app {app}");
        Ok(Self {
            commits: Mutex::new(MapCommits::new(label, spec.maps)),
            complete: watch::Sender::new(false),
            partitions: (0..spec.partitions).map(|_| Mutex::default()).collect(),
            app,
            id,
            spec,
            dir,
            env,
            failure: Mutex::new(None),
            removed: AtomicBool::new(false),
        })
    }

    /// `shuffle S of app A`, for messages.
    pub fn label(&self) -> String {
        format!("shuffle {} of app {}", self.id, self.app)
    }

    fn check_live(&self) -> Result<(), ServiceError> {
        if self.removed.load(Ordering::Acquire) {
            return Err(ServiceError::new(
                ErrorKind::UnknownShuffle,
                format!("{} was unregistered", self.label()),
            ));
        }
        Ok(())
    }

    /// The last flush failure, if flushing is failing.
    pub fn failure(&self) -> Option<ServiceError> {
        lock(&self.failure).clone()
    }

    /// Checks that `attempt` of `map` may push.
    pub fn check_push(&self, map: MapId, attempt: AttemptId) -> Result<(), ServiceError> {
        self.check_live()?;
        lock(&self.commits).check_push(map, attempt)
    }

    /// Checks that `partition` exists in this shuffle.
    pub fn check_partition(&self, partition: PartitionId) -> Result<(), ServiceError> {
        if partition >= self.spec.partitions {
            return Err(ServiceError::new(
                ErrorKind::PartitionOutOfRange,
                format!(
                    "partition {partition} is out of range for {}, which has {} partitions",
                    self.label(),
                    self.spec.partitions
                ),
            ));
        }
        Ok(())
    }

    /// Stores one block whose header the caller has checked against its push.
    /// Returns true when the partition's buffer reached the flush size. A block
    /// of an attempt whose map another attempt committed meanwhile is dropped
    /// unstored; that attempt is refused at its `MapEnd`.
    pub fn append(&self, header: &BlockHeader, bytes: Bytes) -> Result<bool, ServiceError> {
        self.check_live()?;
        self.check_partition(header.id.partition)?;
        if !lock(&self.commits).keeps_blocks_of(header.id.map, header.id.attempt)? {
            return Ok(false);
        }
        let len = bytes.len();
        self.env.memory.reserve(len);
        let mut store = lock(&self.partitions[header.id.partition as usize]);
        store.blocks.push(StoredBlock {
            map: header.id.map,
            attempt: header.id.attempt,
            location: Location::Memory(bytes),
        });
        store.memory_bytes += len;
        Ok(store.memory_bytes >= self.env.flush_size && !store.flushing)
    }

    /// Ends an attempt. On commit, frees the memory of the map's other attempts
    /// and, once every map has committed, wakes the readers.
    pub fn end_attempt(&self, end: MapEnd) -> Result<CommitDecision, ServiceError> {
        self.check_live()?;
        let map = end.map;
        let decision = {
            let mut commits = lock(&self.commits);
            let decision = commits.end(end)?;
            if commits.is_complete() {
                self.complete.send_replace(true);
            }
            decision
        };
        match decision {
            CommitDecision::Committed => {
                ServerStats::add(&self.env.stats.commits, 1);
                let winner = lock(&self.commits).committed_attempt(map);
                self.discard_other_attempts(map, winner);
            }
            CommitDecision::Refused { committed_attempt } => {
                ServerStats::add(&self.env.stats.refused_attempts, 1);
                self.discard_other_attempts(map, Some(committed_attempt));
            }
        }
        Ok(decision)
    }

    /// Drops from memory every block of `map` whose attempt is not `keep`.
    fn discard_other_attempts(&self, map: MapId, keep: Option<AttemptId>) {
        let mut freed = 0;
        for partition in self.partitions.iter() {
            let mut store = lock(partition);
            let first = store.first_in_memory;
            let mut freed_here = 0;
            for block in &mut store.blocks[first..] {
                if block.map == map
                    && Some(block.attempt) != keep
                    && let Location::Memory(bytes) = &block.location
                {
                    freed_here += bytes.len();
                    block.location = Location::Discarded;
                }
            }
            store.memory_bytes -= freed_here;
            freed += freed_here;
        }
        self.env.memory.release(freed);
    }

    /// Waits until every map has committed. Errors if the shuffle is removed first.
    pub async fn wait_complete(&self) -> Result<(), ServiceError> {
        let mut rx = self.complete.subscribe();
        let _ = rx.wait_for(|complete| *complete).await;
        self.check_live()
    }

    /// The blocks a reader of `partition` receives, in order, and what each map
    /// committed to it. Only valid once the shuffle is complete.
    pub fn partition_snapshot(
        &self,
        partition: PartitionId,
    ) -> Result<(Vec<Bytes>, Vec<MapCommit>), ServiceError> {
        self.check_live()?;
        self.check_partition(partition)?;
        let commits = lock(&self.commits)
            .partition_commits(partition)
            .ok_or_else(|| {
                ServiceError::new(ErrorKind::Io, format!("{} is not complete", self.label()))
            })?;
        let mut store = lock(&self.partitions[partition as usize]);
        let needs_map = store.mapped.as_ref().map_or(0, |m| m.len() as u64) < store.file_len;
        if needs_map {
            store.mapped = Some(self.map_file(partition)?);
        }
        let mapped = store.mapped.clone().unwrap_or_default();
        let mut blocks = Vec::new();
        for block in &store.blocks {
            if commits[block.map as usize].attempt != block.attempt {
                continue;
            }
            match &block.location {
                Location::Memory(bytes) => blocks.push(bytes.clone()),
                Location::Disk { offset, len } => {
                    let (start, end) = (*offset as usize, *offset as usize + *len as usize);
                    blocks.push(mapped.slice(start..end));
                }
                Location::Discarded => {
                    unreachable!("blocks of committed attempts are never discarded")
                }
            }
        }
        Ok((blocks, commits))
    }

    fn partition_path(&self, partition: PartitionId) -> PathBuf {
        self.dir.join(format!("partition-{partition:06}.data"))
    }

    /// Maps the partition file read-only.
    fn map_file(&self, partition: PartitionId) -> Result<Bytes, ServiceError> {
        let path = self.partition_path(partition);
        let file = File::open(&path).map_err(|e| disk::io_error(&path, "opening", e))?;
        // SAFETY: partition files are append-only and never truncated while
        // the shuffle exists; removal unlinks them, which keeps the pages of
        // an existing mapping valid. No one else writes under our data dir.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| disk::io_error(&path, "mapping", e))?;
        Ok(Bytes::from_owner(map))
    }

    /// Bytes held in memory by `partition`.
    pub fn memory_bytes(&self, partition: PartitionId) -> usize {
        lock(&self.partitions[partition as usize]).memory_bytes
    }

    /// The partition holding the most memory, and how much.
    pub fn largest_partition(&self) -> Option<(PartitionId, usize)> {
        (0..self.spec.partitions)
            .map(|p| {
                let store = lock(&self.partitions[p as usize]);
                (
                    p,
                    if store.flushing {
                        0
                    } else {
                        store.memory_bytes
                    },
                )
            })
            .max_by_key(|&(_, bytes)| bytes)
            .filter(|&(_, bytes)| bytes > 0)
    }

    /// Writes the partition's in-memory blocks to its file and frees their memory.
    /// Blocking I/O: call from a blocking thread. Returns the bytes written.
    pub fn flush_partition(
        &self,
        partition: PartitionId,
        reason: FlushReason,
    ) -> Result<u64, ServiceError> {
        if self.removed.load(Ordering::Acquire) {
            return Ok(0);
        }
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
        let result = self.write_blocks(partition, &pending, offset);
        let mut store = lock(&self.partitions[partition as usize]);
        if self.removed.load(Ordering::Acquire) {
            // `remove` cleared the store and released its memory meanwhile.
            return Ok(0);
        }
        store.flushing = false;
        let written = match result {
            Ok(written) => written,
            Err(e) => {
                drop(store);
                tracing::warn!(shuffle = %self.label(), partition, error = %e.message, "flush failed");
                *lock(&self.failure) = Some(e.clone());
                return Err(e);
            }
        };
        let mut freed = 0;
        let mut at = offset;
        for (index, bytes) in &pending {
            let block = &mut store.blocks[*index];
            if matches!(block.location, Location::Memory(_)) {
                freed += bytes.len();
            }
            // A discarded block was written too; its location records it is
            // not served either way, so it stays discarded.
            if !matches!(block.location, Location::Discarded) {
                block.location = Location::Disk {
                    offset: at,
                    len: bytes.len() as u32,
                };
            }
            at += bytes.len() as u64;
        }
        let end = pending.last().map_or(start, |(i, _)| i + 1);
        store.first_in_memory = end;
        store.file_len = offset + written;
        store.memory_bytes -= freed;
        drop(store);
        self.env.memory.release(freed);
        *lock(&self.failure) = None;
        ServerStats::add(&self.env.stats.flushed_bytes, written);
        if reason == FlushReason::MemoryPressure {
            ServerStats::add(&self.env.stats.spills, 1);
            ServerStats::add(&self.env.stats.spilled_bytes, written);
        }
        Ok(written)
    }

    /// Writes `blocks` back to back at `offset` of the partition file.
    fn write_blocks(
        &self,
        partition: PartitionId,
        blocks: &[(usize, Bytes)],
        offset: u64,
    ) -> Result<u64, ServiceError> {
        let total: u64 = blocks.iter().map(|(_, b)| b.len() as u64).sum();
        disk::check_reserve(&self.dir, total, self.env.disk_reserve)?;
        let path = self.partition_path(partition);
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| disk::io_error(&path, "opening", e))?;
        let mut at = offset;
        for (_, bytes) in blocks {
            file.write_all_at(bytes, at)
                .map_err(|e| disk::io_error(&path, "writing", e))?;
            at += bytes.len() as u64;
        }
        Ok(total)
    }

    /// Flushes every partition (used at shutdown).
    pub fn flush_all(&self) -> Result<(), ServiceError> {
        for p in 0..self.spec.partitions {
            self.flush_partition(p, FlushReason::Shutdown)?;
        }
        Ok(())
    }

    /// Bytes of all partition files.
    pub fn disk_bytes(&self) -> u64 {
        self.partitions.iter().map(|p| lock(p).file_len).sum()
    }

    /// Marks the shuffle removed, frees its memory, wakes its readers, and
    /// deletes its directory. Blocking I/O.
    pub fn remove(&self) {
        if self.removed.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut freed = 0;
        for partition in self.partitions.iter() {
            let mut store = lock(partition);
            freed += store.memory_bytes;
            *store = PartitionStore::default();
        }
        self.env.memory.release(freed);
        self.complete.send_replace(true);
        if let Err(e) = std::fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove shuffle directory");
        }
    }
}

/// Locks a mutex, recovering from poisoning: our critical sections leave the
/// state consistent at every step, so a panic elsewhere must not wedge the server.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
