//! One registered shuffle: what every exchange mode shares — the spec, the
//! commit rule, completion, removal and flush failures — around the storage
//! of its mode ([`crate::hash`] or [`crate::sort`]).
//!
//! The push and read handlers talk to a [`Shuffle`] only; the mode decides
//! how blocks are laid out in memory and on disk and which blocks a reader of
//! a partition receives.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use shuffle_protocol::{
    AppId, AttemptId, BlockHeader, ErrorKind, ExchangeMode, MapCommit, MapEnd, MapId, PartitionId, ServiceError,
    ShuffleId, ShuffleSpec,
};
use tokio::sync::watch;

use crate::{
    commit::{CommitDecision, MapCommits},
    disk,
    elevator::ReadScheduler,
    hash::HashStorage,
    hybrid::HybridStorage,
    memory::MemoryBudget,
    sort::{SealedAttempt, SortStorage},
    stats::ServerStats,
};

/// What every shuffle's storage shares with the rest of the server.
#[derive(Clone)]
pub struct StorageEnv {
    /// The server-wide budget buffers are accounted in.
    pub memory: Arc<MemoryBudget>,
    /// Server counters.
    pub stats: Arc<ServerStats>,
    /// Buffers are written to their file at this many bytes.
    pub flush_size: usize,
    /// Free bytes a flush must leave on the data dir's filesystem.
    pub disk_reserve: u64,
}

/// Why a flush was asked for, for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushReason {
    /// A buffer reached the flush size.
    BufferFull,
    /// The server-wide budget crossed its high watermark.
    MemoryPressure,
    /// The attempt ended (sort mode) or the server is shutting down.
    Seal,
}

/// Which buffer of a shuffle a flush is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushTarget {
    /// A hash partition's buffer.
    Partition(PartitionId),
    /// A sort-mode map attempt's buffer.
    Attempt(MapId, AttemptId),
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
    /// The last flush failure (a full disk, say), reported to producers until a flush succeeds.
    failure: Mutex<Option<ServiceError>>,
    /// Set once the shuffle is unregistered; everything after fails with `UnknownShuffle`.
    removed: AtomicBool,
}

impl ShuffleCore {
    /// `shuffle S of app A`, for messages.
    pub fn label(&self) -> String {
        format!("shuffle {} of app {}", self.id, self.app)
    }

    /// Whether the shuffle was removed.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Records the outcome of a flush: a failure is reported to producers, a success clears it.
    pub fn flush_outcome(&self, outcome: &Result<u64, ServiceError>, reason: FlushReason) {
        match outcome {
            Ok(written) => {
                *lock(&self.failure) = None;
                ServerStats::add(&self.env.stats.flushed_bytes, *written);
                if reason == FlushReason::MemoryPressure && *written > 0 {
                    ServerStats::add(&self.env.stats.spills, 1);
                    ServerStats::add(&self.env.stats.spilled_bytes, *written);
                }
            }
            Err(e) => {
                tracing::warn!(shuffle = %self.label(), error = %e.message, "flush failed");
                *lock(&self.failure) = Some(e.clone());
            }
        }
    }

    /// Checks the reserve, then writes `chunks` back to back at `offset` of `path`.
    pub fn write_at(&self, path: &std::path::Path, chunks: &[Bytes], offset: u64) -> Result<u64, ServiceError> {
        use std::os::unix::fs::FileExt;
        let total: u64 = chunks.iter().map(|b| b.len() as u64).sum();
        if self.is_removed() {
            // Do not recreate a file under a directory being deleted.
            return Err(ServiceError::new(ErrorKind::UnknownShuffle, format!("{} was unregistered", self.label())));
        }
        disk::check_reserve(&self.dir, total, self.env.disk_reserve)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(path)
            .map_err(|e| disk::io_error(path, "opening", e))?;
        let mut at = offset;
        for chunk in chunks {
            file.write_all_at(chunk, at).map_err(|e| disk::io_error(path, "writing", e))?;
            at += chunk.len() as u64;
        }
        Ok(total)
    }
}

/// How a mode stores blocks.
enum Storage {
    Hash(HashStorage),
    Sort(SortStorage),
    Hybrid(HybridStorage),
}

/// One registered shuffle.
pub struct Shuffle {
    /// What all modes share.
    pub core: ShuffleCore,
    /// Commit state of every map.
    commits: Mutex<MapCommits>,
    /// Becomes true when every map has committed (or the shuffle is removed).
    complete: watch::Sender<bool>,
    /// The mode's storage.
    storage: Storage,
    /// Offset-ordered reads of sealed files (sort mode).
    pub scheduler: ReadScheduler,
}

impl Shuffle {
    /// Creates the shuffle's directory and empty state.
    pub fn create(
        app: AppId,
        id: ShuffleId,
        spec: ShuffleSpec,
        dir: PathBuf,
        env: StorageEnv,
    ) -> Result<Self, ServiceError> {
        std::fs::create_dir_all(&dir).map_err(|e| disk::io_error(&dir, "creating shuffle directory", e))?;
        let storage = match spec.mode {
            ExchangeMode::Hash => Storage::Hash(HashStorage::new(spec.partitions)),
            ExchangeMode::Sort => Storage::Sort(SortStorage::new(spec.maps)),
            ExchangeMode::Hybrid => Storage::Hybrid(HybridStorage::new(&spec)),
        };
        let label = format!("shuffle {id} of app {app}");
        Ok(Self {
            core: ShuffleCore { app, id, spec, dir, env, failure: Mutex::new(None), removed: AtomicBool::new(false) },
            commits: Mutex::new(MapCommits::new(label, spec.maps)),
            complete: watch::Sender::new(false),
            storage,
            scheduler: ReadScheduler::default(),
        })
    }

    /// The registered spec.
    pub fn spec(&self) -> ShuffleSpec {
        self.core.spec
    }

    /// `shuffle S of app A`, for messages.
    pub fn label(&self) -> String {
        self.core.label()
    }

    fn check_live(&self) -> Result<(), ServiceError> {
        if self.core.is_removed() {
            return Err(ServiceError::new(ErrorKind::UnknownShuffle, format!("{} was unregistered", self.label())));
        }
        Ok(())
    }

    /// The last flush failure, if flushing is failing.
    pub fn failure(&self) -> Option<ServiceError> {
        lock(&self.core.failure).clone()
    }

    /// Starts a push stream for `attempt` of `map`, if it may push.
    pub fn begin_push(&self, map: MapId, attempt: AttemptId) -> Result<(), ServiceError> {
        self.check_live()?;
        lock(&self.commits).begin_push(map, attempt)
    }

    /// Ends a push stream; `abandoned` when it ended without a handled `MapEnd`.
    pub fn end_push(&self, map: MapId, attempt: AttemptId, abandoned: bool) {
        lock(&self.commits).end_push(map, attempt, abandoned);
        if abandoned {
            self.abandon(map, attempt);
        }
    }

    /// Checks that `partition` exists in this shuffle.
    pub fn check_partition(&self, partition: PartitionId) -> Result<(), ServiceError> {
        if partition >= self.core.spec.partitions {
            return Err(ServiceError::new(
                ErrorKind::PartitionOutOfRange,
                format!(
                    "partition {partition} is out of range for {}, which has {} partitions",
                    self.label(),
                    self.core.spec.partitions
                ),
            ));
        }
        Ok(())
    }

    /// Stores one block whose header the caller checked against its push.
    /// Returns a buffer that reached the flush size, if any. A block of an
    /// attempt whose map another attempt committed meanwhile is dropped
    /// unstored; that attempt is refused at its `MapEnd`.
    pub fn append(&self, header: &BlockHeader, bytes: Bytes) -> Result<Option<FlushTarget>, ServiceError> {
        self.check_live()?;
        self.check_partition(header.id.partition)?;
        {
            let commits = lock(&self.commits);
            if !commits.keeps_blocks_of(header.id.map, header.id.attempt)? {
                return Ok(None);
            }
            if let Storage::Hybrid(s) = &self.storage {
                s.note_attempt(header.id.map, header.id.attempt);
            }
        }
        match &self.storage {
            Storage::Hash(s) => s.append(&self.core, header, bytes),
            Storage::Sort(s) => s.append(&self.core, header, bytes),
            Storage::Hybrid(s) => s.append(&self.core, header, bytes),
        }
    }

    /// Ends an attempt (blocking I/O in sort mode: the attempt's file is sealed
    /// first). On commit, frees the other attempts of the map and, once every
    /// map has committed, wakes the readers.
    pub fn end_attempt(&self, end: MapEnd) -> Result<CommitDecision, ServiceError> {
        self.check_live()?;
        let (map, attempt) = (end.map, end.attempt);
        let sealed: Option<SealedAttempt> = match &self.storage {
            Storage::Sort(s) => Some(s.seal(&self.core, map, attempt)?),
            Storage::Hash(_) | Storage::Hybrid(_) => None,
        };
        let decision = {
            let mut commits = lock(&self.commits);
            let decision = match commits.end(end) {
                Ok(decision) => decision,
                Err(e) => {
                    if let Some(sealed) = &sealed {
                        sealed.delete_files();
                    }
                    return Err(e);
                }
            };
            if let (Storage::Sort(s), Some(sealed)) = (&self.storage, sealed) {
                match decision {
                    CommitDecision::Committed => s.install(map, sealed),
                    CommitDecision::Refused { .. } => sealed.delete_files(),
                }
            }
            // Hybrid: the map's other attempts fail before completion is
            // visible, so no reader can take their blocks as part of a complete shuffle.
            if let Storage::Hybrid(s) = &self.storage {
                let kept = match decision {
                    CommitDecision::Committed => attempt,
                    CommitDecision::Refused { committed_attempt } => committed_attempt,
                };
                s.fail_attempts(&self.core, map, |a| a != kept);
            }
            if commits.is_complete() {
                self.complete.send_replace(true);
            }
            decision
        };
        let kept = match decision {
            CommitDecision::Committed => {
                ServerStats::add(&self.core.env.stats.commits, 1);
                attempt
            }
            CommitDecision::Refused { committed_attempt } => {
                ServerStats::add(&self.core.env.stats.refused_attempts, 1);
                committed_attempt
            }
        };
        match &self.storage {
            Storage::Hash(s) => s.discard_attempts(&self.core, map, |a| a != kept),
            Storage::Sort(s) => s.discard_attempts(&self.core, map, |a| a != kept),
            // Failed under the commit lock above; this wakes readers waiting for the last commit.
            Storage::Hybrid(s) => s.bump_all(),
        }
        Ok(decision)
    }

    /// Forgets an attempt that ended without committing (its stream broke or
    /// failed): its memory is freed at once, its blocks are never served.
    fn abandon(&self, map: MapId, attempt: AttemptId) {
        if lock(&self.commits).committed_attempt(map) == Some(attempt) {
            return;
        }
        match &self.storage {
            Storage::Hash(s) => s.discard_attempts(&self.core, map, |a| a == attempt),
            Storage::Sort(s) => s.discard_attempts(&self.core, map, |a| a == attempt),
            Storage::Hybrid(s) => s.fail_attempts(&self.core, map, |a| a == attempt),
        }
    }

    /// The hybrid storage, for the hybrid read path.
    pub fn hybrid(&self) -> Option<&HybridStorage> {
        match &self.storage {
            Storage::Hybrid(s) => Some(s),
            _ => None,
        }
    }

    /// Whether every map has committed.
    pub fn is_complete(&self) -> bool {
        lock(&self.commits).is_complete()
    }

    /// Waits until every map has committed. Errors if the shuffle is removed first.
    pub async fn wait_complete(&self) -> Result<(), ServiceError> {
        let mut rx = self.complete.subscribe();
        let _ = rx.wait_for(|complete| *complete).await;
        self.check_live()
    }

    /// What each map committed to `partition`; only once the shuffle is complete.
    pub fn partition_commits(&self, partition: PartitionId) -> Result<Vec<MapCommit>, ServiceError> {
        lock(&self.commits)
            .partition_commits(partition)
            .ok_or_else(|| ServiceError::new(ErrorKind::Io, format!("{} is not complete", self.label())))
    }

    /// The blocks a reader of `partition` receives, in order, with where each
    /// lies (for offset-ordered reads), and what each map committed to it.
    pub fn partition_snapshot(&self, partition: PartitionId) -> Result<PartitionSnapshot, ServiceError> {
        self.check_live()?;
        self.check_partition(partition)?;
        let commits = self.partition_commits(partition)?;
        let blocks = match &self.storage {
            Storage::Hash(s) => s.snapshot(&self.core, partition, &commits)?,
            Storage::Sort(s) => s.snapshot(partition),
            Storage::Hybrid(_) => unreachable!("hybrid partitions are streamed, not snapshotted"),
        };
        Ok(PartitionSnapshot { blocks, commits })
    }

    /// The buffer holding the most memory, and how much.
    pub fn largest_buffer(&self) -> Option<(FlushTarget, usize)> {
        match &self.storage {
            Storage::Hash(s) => s.largest_partition().map(|(p, n)| (FlushTarget::Partition(p), n)),
            Storage::Sort(s) => s.largest_attempt().map(|(m, a, n)| (FlushTarget::Attempt(m, a), n)),
            Storage::Hybrid(s) => s.largest_partition().map(|(p, n)| (FlushTarget::Partition(p), n)),
        }
    }

    /// Writes one buffer to its file and frees its memory. Blocking I/O.
    pub fn flush(&self, target: FlushTarget, reason: FlushReason) -> Result<u64, ServiceError> {
        if self.core.is_removed() {
            return Ok(0);
        }
        let outcome = match (&self.storage, target) {
            (Storage::Hash(s), FlushTarget::Partition(p)) => s.flush_partition(&self.core, p),
            (Storage::Sort(s), FlushTarget::Attempt(m, a)) => s.flush_attempt(&self.core, m, a),
            (Storage::Hybrid(s), FlushTarget::Partition(p)) => s.flush_partition(&self.core, p),
            _ => Ok(0),
        };
        self.core.flush_outcome(&outcome, reason);
        outcome
    }

    /// Bytes the shuffle holds in memory and on disk.
    pub fn usage(&self) -> (u64, u64) {
        match &self.storage {
            Storage::Hash(s) => s.usage(),
            Storage::Sort(s) => s.usage(),
            Storage::Hybrid(s) => s.usage(),
        }
    }

    /// Number of maps with a committed attempt.
    pub fn maps_committed(&self) -> usize {
        lock(&self.commits).committed_count()
    }

    /// Number of data files of committed sort-mode attempts.
    pub fn committed_files(&self) -> usize {
        match &self.storage {
            Storage::Sort(s) => s.committed_files(),
            Storage::Hash(_) | Storage::Hybrid(_) => 0,
        }
    }

    /// Flushes every buffer (at shutdown). Blocking I/O.
    pub fn flush_all(&self) -> Result<(), ServiceError> {
        while let Some((target, _)) = self.largest_buffer() {
            if self.flush(target, FlushReason::Seal)? == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Marks the shuffle removed, frees its memory, wakes its readers and
    /// deletes its directory. Blocking I/O.
    pub fn remove(&self) {
        if self.core.removed.swap(true, Ordering::AcqRel) {
            return;
        }
        let freed = match &self.storage {
            Storage::Hash(s) => s.clear(),
            Storage::Sort(s) => s.clear(),
            Storage::Hybrid(s) => s.clear(),
        };
        self.core.env.memory.release(freed);
        self.complete.send_replace(true);
        // A flush that started before the removal may still create a file;
        // try again after it has had time to finish.
        for attempt in 0..3 {
            match std::fs::remove_dir_all(&self.core.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if attempt == 2 => {
                    tracing::warn!(dir = %self.core.dir.display(), error = %e, "could not remove shuffle directory");
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
    }
}

/// One block a reader receives, and where it lies on disk if it does.
#[derive(Clone, Debug)]
pub struct SnapshotBlock {
    /// The block's bytes (a slice of a file mapping, or a buffer in memory).
    pub bytes: Bytes,
    /// For blocks in a mapped file: an id of the file and the offset, for elevator ordering.
    pub position: Option<(u64, u64)>,
}

/// Everything a partition read serves.
pub struct PartitionSnapshot {
    /// The blocks, in the order each map's sequence requires.
    pub blocks: Vec<SnapshotBlock>,
    /// Per map, the committed attempt and its declared totals.
    pub commits: Vec<MapCommit>,
}

/// Locks a mutex, recovering from poisoning: our critical sections leave the
/// state consistent at every step, so a panic elsewhere must not wedge the server.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
