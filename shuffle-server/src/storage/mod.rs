//! How a shuffle's blocks are kept: in memory while the budget allows, in
//! append-only files when it does not, and what readers are handed.
//!
//! Each exchange mode implements [`ModeStorage`]:
//! - [`log::LogStorage`] keeps one log of blocks per partition, fed by every
//!   map: hash mode (read once every map has committed) and hybrid mode
//!   (read while producers write, with selective or full spilling);
//! - [`sort::SortStorage`] keeps each map attempt's blocks in run and
//!   partition order, indexed by partition when the attempt commits.
//!
//! The pieces every mode shares live here ([`ShuffleCore`], [`BlockRef`],
//! read batches) and in [`files`] (append-only data files) and
//! [`manifest`] (what a graceful shutdown leaves for the next start).
//! Storage never sees a socket: tests drive it directly.

pub mod files;
pub mod log;
pub mod manifest;
pub mod sort;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use shuffle_protocol::{
    AppId, AttemptId, BlockHeader, ErrorKind, MapId, PartitionId, RunInfo, ServiceError, ShuffleId, ShuffleSpec,
};
use tokio::sync::watch;

pub use self::files::DataFile;
use crate::{
    memory::{Consumer, MemoryPool, Reservation},
    stats::ServerStats,
};

/// What every shuffle's storage shares with the rest of the server.
#[derive(Clone)]
pub struct StorageEnv {
    /// The server-wide budget blocks are accounted in.
    pub pool: Arc<MemoryPool>,
    /// Server counters.
    pub stats: Arc<ServerStats>,
    /// The least a spill writes at once when a buffer has that much.
    pub flush_size: usize,
    /// Free bytes every write must leave on the data dir's filesystem.
    pub disk_reserve: u64,
    /// Set once a graceful shutdown writes everything committed down: the
    /// reserve is kept for exactly that, so those writes may use it (they
    /// still fail, as `DiskFull`, if the disk itself is full).
    pub reserve_released: Arc<std::sync::atomic::AtomicBool>,
}

impl StorageEnv {
    /// The reserve a write must leave free now.
    pub fn reserve(&self) -> u64 {
        if self.reserve_released.load(std::sync::atomic::Ordering::Acquire) { 0 } else { self.disk_reserve }
    }
}

/// The parts of a shuffle every mode's storage needs.
pub struct ShuffleCore {
    /// The owning app.
    pub app: AppId,
    /// The shuffle's id within the app.
    pub id: ShuffleId,
    /// What the client registered.
    pub spec: ShuffleSpec,
    /// Directory holding the shuffle's files.
    pub dir: PathBuf,
    /// Budget, counters and limits shared with the rest of the server.
    pub env: StorageEnv,
    /// The shuffle's account in the memory budget: its blocks and tables.
    pub memory: Arc<Consumer>,
    /// On a cluster's worker: the group of the shuffle this is a copy of.
    pub group: Option<u32>,
    /// Set once the shuffle is removed; everything after fails with `UnknownShuffle`.
    removed: AtomicBool,
}

impl ShuffleCore {
    /// The core of a new shuffle.
    pub fn new(app: AppId, id: ShuffleId, spec: ShuffleSpec, dir: PathBuf, env: StorageEnv) -> Self {
        Self::with_group(app, id, None, spec, dir, env)
    }

    /// The core of a worker's copy of `group` of a shuffle (`None`: the whole shuffle).
    pub fn with_group(
        app: AppId,
        id: ShuffleId,
        group: Option<u32>,
        spec: ShuffleSpec,
        dir: PathBuf,
        env: StorageEnv,
    ) -> Self {
        let name = match group {
            Some(g) => format!("shuffle {id} group {g} of app {app}"),
            None => format!("shuffle {id} of app {app}"),
        };
        let memory = env.pool.consumer(name);
        Self { app, id, spec, dir, env, memory, group, removed: AtomicBool::new(false) }
    }

    /// `shuffle S of app A` (`shuffle S group G of app A` for a group's copy), for messages.
    pub fn label(&self) -> String {
        match self.group {
            Some(g) => format!("shuffle {} group {g} of app {}", self.id, self.app),
            None => format!("shuffle {} of app {}", self.id, self.app),
        }
    }

    /// Whether the shuffle was removed.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Marks the shuffle removed; returns whether it already was.
    pub fn mark_removed(&self) -> bool {
        self.removed.swap(true, Ordering::AcqRel)
    }

    /// `UnknownShuffle` once the shuffle is removed.
    pub fn check_live(&self) -> Result<(), ServiceError> {
        if self.is_removed() {
            return Err(ServiceError::new(ErrorKind::UnknownShuffle, format!("{} was unregistered", self.label())));
        }
        Ok(())
    }

    /// A new data file in the shuffle's directory.
    pub fn create_file(&self, name: &str) -> Result<Arc<DataFile>, ServiceError> {
        self.check_live()?;
        DataFile::create(self.dir.join(name)).map(Arc::new)
    }

    /// Records the outcome of a spill in the counters and the pool's disk-full state.
    pub fn spill_outcome(&self, outcome: &Result<u64, ServiceError>, pressure: bool) {
        match outcome {
            Ok(written) if *written > 0 => {
                self.env.pool.set_disk_full(None);
                ServerStats::add(&self.env.stats.flushed_bytes, *written);
                if pressure {
                    ServerStats::add(&self.env.stats.spills, 1);
                    ServerStats::add(&self.env.stats.spilled_bytes, *written);
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(shuffle = %self.label(), error = %e.message, "spill failed");
                if e.kind == ErrorKind::DiskFull {
                    self.env.pool.set_disk_full(Some(e.clone()));
                }
            }
        }
    }
}

/// A block handed to a reader: its bytes in memory, or where they lie on disk.
#[derive(Clone, Debug)]
pub enum BlockRef {
    /// Bytes held in memory (shared with the storage, not copied).
    Memory(Bytes),
    /// A range of a data file.
    Disk { file: Arc<DataFile>, offset: u64, len: u32 },
}

impl BlockRef {
    /// The block's length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Self::Memory(b) => b.len(),
            Self::Disk { len, .. } => *len as usize,
        }
    }

    /// Whether the block is empty (blocks never are; for clippy's sake).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a reader is in a partition: for logs, the position of the next
/// entry; for sort mode, the map and the position in its partition index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadCursor {
    pub map: usize,
    pub index: u64,
}

/// Blocks a reader takes next, in the order it must send them.
#[derive(Debug, Default)]
pub struct ReadBatch {
    /// The blocks. Never a mix of memory and disk blocks of one map.
    pub blocks: Vec<BlockRef>,
    /// The map and attempt of each block.
    pub owners: Vec<(MapId, AttemptId)>,
    /// Log positions of the blocks (hybrid: what was consumed).
    pub positions: Vec<u64>,
}

impl ReadBatch {
    /// Adds one block.
    pub fn push(&mut self, block: BlockRef, owner: (MapId, AttemptId), position: u64) {
        self.blocks.push(block);
        self.owners.push(owner);
        self.positions.push(position);
    }

    /// Bytes of the batch.
    pub fn bytes(&self) -> usize {
        self.blocks.iter().map(BlockRef::len).sum()
    }

    /// Whether the batch has no block.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// Which buffer of a shuffle a spill is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpillTarget {
    /// A partition's log.
    Partition(PartitionId),
    /// A sort-mode map attempt.
    Attempt(MapId, AttemptId),
}

/// Decides whether a block of `(map, attempt)` may be served now.
pub type Servable<'a> = &'a dyn Fn(MapId, AttemptId) -> bool;

/// What a mode's storage does. Methods that write or read files are
/// blocking I/O and run on blocking threads; the rest only take locks.
pub trait ModeStorage: Send + Sync {
    /// Stores one checked block in memory; `memory` accounts for its bytes.
    /// Returns a buffer to write to disk now, if the mode writes eagerly
    /// (full spilling writes every flush size).
    fn append(
        &self,
        core: &ShuffleCore,
        header: &BlockHeader,
        bytes: Bytes,
        memory: Reservation,
    ) -> Result<Option<SpillTarget>, ServiceError>;

    /// Frees everything of the attempts of `map` that `which` selects: they
    /// ended without committing or lost to another attempt.
    fn drop_attempts(&self, core: &ShuffleCore, map: MapId, which: &dyn Fn(AttemptId) -> bool);

    /// `attempt` of `map` committed (called under the shuffle's commit lock,
    /// before readers can see the commit).
    fn committed(&self, _core: &ShuffleCore, _map: MapId, _attempt: AttemptId) {}

    /// Checks that a reader may open `partition` (a selective hybrid
    /// partition is read once).
    fn open_reader(&self, _core: &ShuffleCore, _partition: PartitionId) -> Result<(), ServiceError> {
        Ok(())
    }

    /// The next blocks of `partition` at `cursor` (moved past them), at most
    /// about `max_bytes`; an empty batch when none has arrived yet.
    fn read(
        &self,
        core: &ShuffleCore,
        partition: PartitionId,
        cursor: &mut ReadCursor,
        servable: Servable<'_>,
        max_bytes: usize,
    ) -> Result<ReadBatch, ServiceError>;

    /// The sorted runs of every committed attempt within `partition`, by
    /// map and run (sort mode; `None` for modes without runs). Read a run
    /// with [`ModeStorage::read`] from `ReadCursor { map, index: first_block }`.
    fn runs(&self, _partition: PartitionId) -> Option<Vec<RunInfo>> {
        None
    }

    /// A reader has handed `batch` to its stream (selective hybrid frees it).
    fn sent(&self, _core: &ShuffleCore, _partition: PartitionId, _batch: &ReadBatch) {}

    /// Changes whenever `partition` may have something new for a waiting
    /// reader (hybrid); `None` for modes whose readers never wait mid-read.
    fn subscribe(&self, _partition: PartitionId) -> Option<watch::Receiver<u64>> {
        None
    }

    /// Wakes every waiting reader (a commit, a failure, a removal).
    fn wake_readers(&self) {}

    /// Whether `(map, attempt)` failed after pushing (hybrid readers that
    /// received its blocks are told).
    fn attempt_failed(&self, _map: MapId, _attempt: AttemptId) -> bool {
        false
    }

    /// The buffer whose spilling frees the most memory, and how much.
    fn spill_candidate(&self) -> Option<(SpillTarget, usize)>;

    /// Writes (part of) that buffer to disk and frees its memory; returns
    /// the bytes written (0 if there was nothing to do). Blocking I/O.
    fn spill(&self, core: &ShuffleCore, target: SpillTarget) -> Result<u64, ServiceError>;

    /// Bytes held in memory and on disk.
    fn usage(&self) -> (u64, u64);

    /// Drops everything (the shuffle is removed).
    fn clear(&self);

    /// Every data file holding blocks that may still be served.
    fn files(&self) -> Vec<Arc<DataFile>>;

    /// What a restarted server needs to serve the blocks of the attempts
    /// `keep` selects (committed, and on a worker prepared), all of which
    /// must be on disk (spill everything first).
    fn manifest(&self, core: &ShuffleCore, keep: &dyn Fn(MapId, AttemptId) -> bool) -> manifest::BlocksManifest;
}

/// Locks a mutex, recovering from poisoning: our critical sections leave the
/// state consistent at every step, so a panic elsewhere must not wedge the server.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Helpers for the storage tests: a shuffle core in a temporary directory,
/// blocks, and a reader that resolves disk blocks.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use bytes::Bytes;
    use shuffle_protocol::{
        AppId, BlockHeader, BlockId, Codec, PartitionId, ShuffleId, ShuffleSpec, append_record, encode_block,
    };

    use super::{BlockRef, ModeStorage, ReadCursor, ShuffleCore, StorageEnv};
    use crate::{
        elevator::{DiskRead, read_blocking},
        memory::MemoryPool,
    };

    /// An environment with a budget of `budget` bytes and a flush size of `flush`.
    pub fn env(budget: usize, flush: usize) -> StorageEnv {
        StorageEnv {
            pool: MemoryPool::new(budget),
            stats: Arc::default(),
            flush_size: flush,
            disk_reserve: 0,
            reserve_released: Arc::default(),
        }
    }

    /// A shuffle core for `spec` in a fresh temporary directory.
    pub fn core(spec: ShuffleSpec, env: StorageEnv) -> (tempfile::TempDir, ShuffleCore) {
        let dir = tempfile::tempdir().unwrap();
        let core = ShuffleCore::new(AppId::new("test").unwrap(), ShuffleId(7), spec, dir.path().to_path_buf(), env);
        (dir, core)
    }

    /// A block of one record whose value is `len` copies of a byte derived from its ids.
    pub fn block(
        map: u32,
        attempt: u32,
        partition: PartitionId,
        run: u32,
        sequence: u32,
        len: usize,
    ) -> (BlockHeader, Bytes) {
        let mut raw = Vec::new();
        let fill = (map * 31 + attempt * 7 + partition * 3 + sequence) as u8;
        append_record(&mut raw, &sequence.to_be_bytes(), &vec![fill; len]);
        let bytes = encode_block(BlockId { map, attempt, partition, run, sequence }, &raw, 1, Codec::None);
        (BlockHeader::decode(&bytes).unwrap(), bytes)
    }

    /// Appends a block, accounting it in the core's memory.
    pub fn append(storage: &dyn ModeStorage, core: &ShuffleCore, block: &(BlockHeader, Bytes)) {
        let memory = core.memory.reserve_now(block.1.len());
        let _ = storage.append(core, &block.0, block.1.clone(), memory).unwrap();
    }

    /// Reads what `partition` serves now from `cursor` on, disk blocks read back.
    pub fn read(
        storage: &dyn ModeStorage,
        core: &ShuffleCore,
        partition: PartitionId,
        cursor: &mut ReadCursor,
        servable: super::Servable<'_>,
    ) -> Vec<Bytes> {
        let mut out = Vec::new();
        loop {
            let batch = storage.read(core, partition, cursor, servable, 1 << 20).unwrap();
            if batch.is_empty() {
                return out;
            }
            for block in &batch.blocks {
                out.push(match block {
                    BlockRef::Memory(b) => b.clone(),
                    BlockRef::Disk { file, offset, len } => {
                        let read = DiskRead { file: file.clone(), offset: *offset, len: *len as usize };
                        read_blocking(&[read]).unwrap().remove(0)
                    }
                });
            }
            storage.sent(core, partition, &batch);
        }
    }
}
