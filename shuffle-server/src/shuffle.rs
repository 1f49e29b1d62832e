//! One registered shuffle: the commit rule, completion and removal around
//! the storage of its exchange mode ([`crate::storage`]).
//!
//! The push and read handlers talk to a [`Shuffle`] only. Lock order:
//! the commit lock, then the storage's locks; storage never calls back.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, OnceLock},
};

use bytes::Bytes;
use shuffle_protocol::{
    AppId, AttemptId, BlockHeader, ErrorKind, ExchangeMode, MapCommit, MapEnd, MapId, PartitionId, RunInfo,
    ServiceError, ShuffleId, ShuffleSpec, SpillStrategy,
};
use tokio::sync::watch;

use crate::{
    commit::{CommitDecision, MapCommits},
    disk,
    elevator::ReadScheduler,
    memory::Reservation,
    stats::ServerStats,
    storage::{
        DataFile, ModeStorage, ReadBatch, ReadCursor, ShuffleCore, SpillTarget, StorageEnv, lock,
        log::LogStorage,
        manifest::{CommitRecord, MANIFEST_FORMAT, ShuffleManifest},
        sort::SortStorage,
    },
};

/// Memory a shuffle's tables take per map and per partition, estimated
/// generously (commit state per map; a log, its lock and its reader
/// wake-up per partition), so that a spec's tables count in the budget.
pub const TABLE_BYTES_PER_MAP: usize = 128;
/// See [`TABLE_BYTES_PER_MAP`].
pub const TABLE_BYTES_PER_PARTITION: usize = 384;

/// The memory the tables of a shuffle of `spec` take.
pub fn table_bytes(spec: &ShuffleSpec) -> usize {
    spec.maps as usize * TABLE_BYTES_PER_MAP + spec.partitions as usize * TABLE_BYTES_PER_PARTITION
}

/// One registered shuffle.
pub struct Shuffle {
    /// What every mode shares.
    pub core: ShuffleCore,
    /// Commit state of every map.
    commits: Mutex<MapCommits>,
    /// Becomes true when every map has committed (or the shuffle is removed).
    complete: watch::Sender<bool>,
    /// Per map, the committed attempt, fixed once the shuffle is complete.
    committed_attempts: OnceLock<Arc<[AttemptId]>>,
    /// The mode's storage.
    storage: Box<dyn ModeStorage>,
    /// Offset-ordered disk reads (sort mode).
    pub scheduler: ReadScheduler,
    /// The tables' share of the memory budget.
    _tables: Reservation,
    /// On a worker's copy: decided maps whose blocks it never received (it
    /// was away when they were pushed); it cannot serve reads.
    lacking: Mutex<BTreeMap<MapId, AttemptId>>,
}

impl Shuffle {
    /// Creates the shuffle's directory and empty state.
    pub fn create(
        app: AppId,
        id: ShuffleId,
        spec: ShuffleSpec,
        dir: std::path::PathBuf,
        env: StorageEnv,
    ) -> Result<Self, ServiceError> {
        std::fs::create_dir_all(&dir).map_err(|e| disk::io_error(&dir, "creating shuffle directory", e))?;
        let core = ShuffleCore::new(app, id, spec, dir, env);
        let storage: Box<dyn ModeStorage> = match spec.mode {
            ExchangeMode::Hash | ExchangeMode::Hybrid => Box::new(LogStorage::new(&spec)),
            ExchangeMode::Sort => Box::new(SortStorage::new(spec.maps)),
        };
        let commits = MapCommits::new(core.label(), spec.maps);
        Ok(Self::assemble(core, commits, storage))
    }

    /// Creates a worker's copy of `group` of a shuffle: its directory and empty state.
    pub fn create_copy(
        app: AppId,
        id: ShuffleId,
        group: u32,
        spec: ShuffleSpec,
        dir: std::path::PathBuf,
        env: StorageEnv,
    ) -> Result<Self, ServiceError> {
        std::fs::create_dir_all(&dir).map_err(|e| disk::io_error(&dir, "creating shuffle directory", e))?;
        let core = ShuffleCore::with_group(app, id, Some(group), spec, dir, env);
        let storage: Box<dyn ModeStorage> = match spec.mode {
            ExchangeMode::Hash | ExchangeMode::Hybrid => Box::new(LogStorage::new(&spec)),
            ExchangeMode::Sort => Box::new(SortStorage::new(spec.maps)),
        };
        let commits = MapCommits::new(core.label(), spec.maps);
        Ok(Self::assemble(core, commits, storage))
    }

    /// Rebuilds a shuffle (or a worker's copy of `group` of one) from the
    /// manifest a graceful shutdown left.
    pub fn recover(
        app: AppId,
        group: Option<u32>,
        manifest: ShuffleManifest,
        dir: std::path::PathBuf,
        env: StorageEnv,
    ) -> Result<Self, ServiceError> {
        let spec = manifest.spec;
        spec.validate().map_err(|why| ServiceError::new(ErrorKind::Io, format!("recovered spec: {why}")))?;
        let id = ShuffleId(manifest.shuffle);
        let core = ShuffleCore::with_group(app, id, group, spec, dir, env);
        let storage: Box<dyn ModeStorage> = match spec.mode {
            ExchangeMode::Hash | ExchangeMode::Hybrid => Box::new(LogStorage::recover(&core, &manifest.blocks)?),
            ExchangeMode::Sort => Box::new(SortStorage::recover(&core, &manifest.blocks)?),
        };
        let mut commits = MapCommits::new(core.label(), spec.maps);
        for c in manifest.commits {
            if c.map >= spec.maps {
                return Err(ServiceError::new(
                    ErrorKind::Io,
                    format!("recovered commit of map {} out of range", c.map),
                ));
            }
            commits.end(MapEnd { map: c.map, attempt: c.attempt, partitions: c.totals })?;
            storage.committed(&core, c.map, c.attempt);
        }
        let shuffle = Self::assemble(core, commits, storage);
        if lock(&shuffle.commits).is_complete() {
            shuffle.mark_complete();
        }
        Ok(shuffle)
    }

    fn assemble(core: ShuffleCore, commits: MapCommits, storage: Box<dyn ModeStorage>) -> Self {
        let tables = core.memory.reserve_now(table_bytes(&core.spec));
        Self {
            core,
            commits: Mutex::new(commits),
            complete: watch::Sender::new(false),
            committed_attempts: OnceLock::new(),
            storage,
            scheduler: ReadScheduler::default(),
            _tables: tables,
            lacking: Mutex::new(BTreeMap::new()),
        }
    }

    /// The registered spec.
    pub fn spec(&self) -> ShuffleSpec {
        self.core.spec
    }

    /// `shuffle S of app A`, for messages.
    pub fn label(&self) -> String {
        self.core.label()
    }

    /// Starts a push stream for `attempt` of `map`, if it may push.
    pub fn begin_push(&self, map: MapId, attempt: AttemptId) -> Result<(), ServiceError> {
        self.core.check_live()?;
        lock(&self.commits).begin_push(map, attempt)
    }

    /// Checks that `attempt` of `map` may still push blocks.
    pub fn check_push(&self, map: MapId, attempt: AttemptId) -> Result<(), ServiceError> {
        self.core.check_live()?;
        lock(&self.commits).check_push(map, attempt)
    }

    /// Ends a push stream; `abandoned` when it ended without a handled `MapEnd`.
    pub fn end_push(&self, map: MapId, attempt: AttemptId, abandoned: bool) {
        let committed = {
            let mut commits = lock(&self.commits);
            commits.end_push(map, attempt, abandoned);
            commits.committed_attempt(map)
        };
        // On failure the attempt can never commit: its memory is freed at once.
        if abandoned && committed != Some(attempt) {
            self.storage.drop_attempts(&self.core, map, &|a| a == attempt);
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

    /// Stores one block whose header the caller checked against its push;
    /// `memory` accounts for its bytes. A block of an attempt whose map
    /// another attempt committed meanwhile is dropped unstored (that attempt
    /// is refused at its `MapEnd`). Returns a buffer to write to disk now.
    pub fn append(
        &self,
        header: &BlockHeader,
        bytes: Bytes,
        memory: Reservation,
    ) -> Result<Option<SpillTarget>, ServiceError> {
        self.core.check_live()?;
        self.check_partition(header.id.partition)?;
        if !lock(&self.commits).keeps_blocks_of(header.id.map, header.id.attempt)? {
            return Ok(None);
        }
        self.storage.append(&self.core, header, bytes, memory)
    }

    /// Ends an attempt. On commit, frees the map's other attempts and, once
    /// every map has committed, wakes the readers.
    pub fn end_attempt(&self, end: MapEnd) -> Result<CommitDecision, ServiceError> {
        self.core.check_live()?;
        let (map, attempt) = (end.map, end.attempt);
        let decision = {
            let mut commits = lock(&self.commits);
            let decision = commits.end(end)?;
            let kept = match decision {
                CommitDecision::Committed => {
                    self.storage.committed(&self.core, map, attempt);
                    attempt
                }
                CommitDecision::Refused { committed_attempt } => committed_attempt,
            };
            // Before completion is visible, so no reader takes a loser's blocks.
            self.storage.drop_attempts(&self.core, map, &|a| a != kept);
            if commits.is_complete() {
                drop(commits);
                self.mark_complete();
            }
            decision
        };
        match decision {
            CommitDecision::Committed => ServerStats::add(&self.core.env.stats.commits, 1),
            CommitDecision::Refused { .. } => ServerStats::add(&self.core.env.stats.refused_attempts, 1),
        }
        self.storage.wake_readers();
        Ok(decision)
    }

    /// A cluster's worker: records the coordinator's decision that
    /// `attempt` is `map`'s committed attempt, with what it wrote to this
    /// copy. Idempotent; a different decision already recorded stands.
    pub fn record_decision(
        &self,
        map: MapId,
        attempt: AttemptId,
        totals: Vec<shuffle_protocol::PartitionTotals>,
    ) -> Result<Recorded, ServiceError> {
        self.core.check_live()?;
        if map >= self.core.spec.maps {
            return Err(ServiceError::new(
                ErrorKind::MapOutOfRange,
                format!("map {map} is out of range for {}", self.label()),
            ));
        }
        {
            let mut commits = lock(&self.commits);
            match commits.committed_attempt(map) {
                Some(a) if a == attempt => return Ok(Recorded::Already),
                Some(other) => return Ok(Recorded::Conflict(other)),
                None => {}
            }
            commits.decide(MapEnd { map, attempt, partitions: totals })?;
            self.storage.committed(&self.core, map, attempt);
            self.storage.drop_attempts(&self.core, map, &|a| a != attempt);
            if commits.is_complete() {
                drop(commits);
                self.mark_complete();
            }
        }
        ServerStats::add(&self.core.env.stats.commits, 1);
        self.storage.wake_readers();
        Ok(Recorded::Committed)
    }

    /// The committed attempt of `map`, if any.
    pub fn committed_attempt(&self, map: MapId) -> Option<AttemptId> {
        lock(&self.commits).committed_attempt(map)
    }

    /// Every committed map and its attempt.
    pub fn decided(&self) -> Vec<(MapId, AttemptId)> {
        lock(&self.commits).committed_maps().map(|(m, a, _)| (m, a)).collect()
    }

    /// Every committed map with blocks in this shuffle (or copy).
    pub fn maps_with_data(&self) -> Vec<MapId> {
        lock(&self.commits)
            .committed_maps()
            .filter(|(_, _, t)| t.iter().any(|t| t.blocks > 0))
            .map(|(m, _, _)| m)
            .collect()
    }

    /// Frees the blocks of a map attempt that can no longer commit.
    pub fn drop_attempt(&self, map: MapId, attempt: AttemptId) {
        if self.committed_attempt(map) != Some(attempt) {
            self.storage.drop_attempts(&self.core, map, &|a| a == attempt);
        }
    }

    fn mark_complete(&self) {
        let attempts: Arc<[AttemptId]> = {
            let commits = lock(&self.commits);
            (0..self.core.spec.maps).map(|m| commits.committed_attempt(m).unwrap_or(AttemptId::MAX)).collect()
        };
        let _ = self.committed_attempts.set(attempts);
        self.complete.send_replace(true);
    }

    /// Whether every map has committed.
    pub fn is_complete(&self) -> bool {
        *self.complete.borrow() && !self.core.is_removed()
    }

    /// Waits until every map has committed. Errors if the shuffle is removed first.
    pub async fn wait_complete(&self) -> Result<(), ServiceError> {
        let mut rx = self.complete.subscribe();
        let _ = rx.wait_for(|complete| *complete).await;
        self.core.check_live()
    }

    /// What each map committed to `partition`; only once the shuffle is complete.
    pub fn partition_commits(&self, partition: PartitionId) -> Result<Vec<MapCommit>, ServiceError> {
        lock(&self.commits)
            .partition_commits(partition)
            .ok_or_else(|| ServiceError::new(ErrorKind::Io, format!("{} is not complete", self.label())))
    }

    /// Checks that a reader may open `partition`.
    pub fn open_reader(&self, partition: PartitionId) -> Result<(), ServiceError> {
        self.core.check_live()?;
        self.check_partition(partition)?;
        self.storage.open_reader(&self.core, partition)
    }

    /// The next blocks a reader of `partition` sends, from `cursor` on. Hash
    /// and sort readers call this once the shuffle is complete; hybrid
    /// readers at any time (an empty batch means: wait for a change).
    pub fn read(
        &self,
        partition: PartitionId,
        cursor: &mut ReadCursor,
        max_bytes: usize,
    ) -> Result<ReadBatch, ServiceError> {
        self.core.check_live()?;
        match self.core.spec.mode {
            ExchangeMode::Hybrid => self.storage.read(&self.core, partition, cursor, &|_, _| true, max_bytes),
            ExchangeMode::Hash | ExchangeMode::Sort => {
                let committed = self
                    .committed_attempts
                    .get()
                    .ok_or_else(|| ServiceError::new(ErrorKind::Io, format!("{} is not complete", self.label())))?;
                let servable = |map: MapId, attempt: AttemptId| committed[map as usize] == attempt;
                self.storage.read(&self.core, partition, cursor, &servable, max_bytes)
            }
        }
    }

    /// The sorted runs of `partition` by map and run, for key-ordered reads
    /// (sort mode, once every map has committed).
    pub fn runs(&self, partition: PartitionId) -> Result<Vec<RunInfo>, ServiceError> {
        self.core.check_live()?;
        if self.committed_attempts.get().is_none() {
            return Err(ServiceError::new(ErrorKind::Io, format!("{} is not complete", self.label())));
        }
        self.storage.runs(partition).ok_or_else(|| {
            ServiceError::new(ErrorKind::UnexpectedMessage, format!("{} is not a sort shuffle", self.label()))
        })
    }

    /// A reader handed `batch` to its stream.
    pub fn sent(&self, partition: PartitionId, batch: &ReadBatch) {
        self.storage.sent(&self.core, partition, batch);
    }

    /// Changes whenever a hybrid partition may have something new.
    pub fn subscribe(&self, partition: PartitionId) -> Option<watch::Receiver<u64>> {
        self.storage.subscribe(partition)
    }

    /// Notes that this copy lacks the blocks of `map`'s decided `attempt`
    /// (call before recording the decision, whose notice wakes readers).
    pub fn mark_lacking(&self, map: MapId, attempt: AttemptId) {
        lock(&self.lacking).insert(map, attempt);
    }

    /// `DataLost` if this copy lacks a decided map's blocks, so that a
    /// reader (one that began before the decision, too) reads the other copy.
    pub fn check_lacking(&self, partition: PartitionId) -> Result<(), ServiceError> {
        let lacking = lock(&self.lacking);
        if lacking.is_empty() {
            return Ok(());
        }
        let maps: Vec<String> = lacking.iter().map(|(m, a)| format!("{m} (attempt {a})")).collect();
        Err(ServiceError::new(
            ErrorKind::DataLost,
            format!(
                "this worker's copy of partition {partition} of {} lacks the blocks of map(s) {}: it was away when \
                 they were pushed; read the other copy",
                self.label(),
                maps.join(", ")
            ),
        ))
    }

    /// Whether `(map, attempt)` failed after pushing (hybrid).
    pub fn attempt_failed(&self, map: MapId, attempt: AttemptId) -> bool {
        self.storage.attempt_failed(map, attempt)
    }

    /// Whether a hybrid reader told of a failed producer may read again (full spilling).
    pub fn rereadable(&self) -> bool {
        self.core.spec.spill == SpillStrategy::Full
    }

    /// The buffer whose spilling frees the most memory, and how much.
    pub fn spill_candidate(&self) -> Option<(SpillTarget, usize)> {
        if self.core.is_removed() { None } else { self.storage.spill_candidate() }
    }

    /// Writes a buffer to disk and frees its memory. Blocking I/O.
    pub fn spill(&self, target: SpillTarget, pressure: bool) -> Result<u64, ServiceError> {
        let outcome = self.storage.spill(&self.core, target);
        self.core.spill_outcome(&outcome, pressure);
        outcome
    }

    /// Writes every buffer to disk (at shutdown). Blocking I/O.
    pub fn spill_all(&self) -> Result<(), ServiceError> {
        while let Some((target, _)) = self.spill_candidate() {
            if self.spill(target, false)? == 0 {
                // A spill in progress elsewhere, or a quota: try once more after a pause.
                std::thread::sleep(std::time::Duration::from_millis(5));
                if self.spill(target, false)? == 0 {
                    return Err(ServiceError::new(
                        ErrorKind::Io,
                        format!("{} could not write all its blocks to disk", self.label()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Syncs every file and writes the manifest (after [`Shuffle::spill_all`]). Blocking I/O.
    pub fn persist(&self) -> Result<(), ServiceError> {
        self.persist_with(Vec::new())
    }

    /// As [`Shuffle::persist`], keeping also the blocks of the `prepared`
    /// attempts (a worker's attempts that await their decision).
    pub fn persist_with(&self, prepared: Vec<CommitRecord>) -> Result<(), ServiceError> {
        for file in self.storage.files() {
            file.sync()?;
        }
        let (commits, committed) = {
            let c = lock(&self.commits);
            let records: Vec<CommitRecord> = c
                .committed_maps()
                .map(|(map, attempt, totals)| CommitRecord { map, attempt, totals: totals.to_vec() })
                .collect();
            let attempts: Vec<Option<AttemptId>> = (0..self.core.spec.maps).map(|m| c.committed_attempt(m)).collect();
            (records, attempts)
        };
        let keep = |m: MapId, a: AttemptId| {
            committed.get(m as usize).copied().flatten() == Some(a)
                || prepared.iter().any(|p| p.map == m && p.attempt == a)
        };
        let blocks = self.storage.manifest(&self.core, &keep);
        let manifest = ShuffleManifest {
            format: MANIFEST_FORMAT,
            shuffle: self.core.id.0,
            spec: self.core.spec,
            commits,
            blocks,
            prepared,
        };
        crate::storage::manifest::write(&self.core.dir, crate::storage::manifest::SHUFFLE_MANIFEST, &manifest)
    }

    /// Every data file holding blocks that may be served.
    pub fn files(&self) -> Vec<Arc<DataFile>> {
        self.storage.files()
    }

    /// Bytes the shuffle holds in memory and on disk.
    pub fn usage(&self) -> (u64, u64) {
        self.storage.usage()
    }

    /// Number of maps with a committed attempt.
    pub fn maps_committed(&self) -> usize {
        lock(&self.commits).committed_count()
    }

    /// Marks the shuffle removed, frees its memory, wakes its readers and
    /// producers, and deletes its directory. Blocking I/O.
    pub fn remove(&self) {
        if self.core.mark_removed() {
            return;
        }
        self.storage.clear();
        self.complete.send_replace(true);
        self.storage.wake_readers();
        self.core.env.pool.wake_all();
        // A spill that started before the removal may still create a file;
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

/// What recording a decision did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The map is now committed with this attempt.
    Committed,
    /// It already was.
    Already,
    /// Another attempt is committed: that decision stands.
    Conflict(AttemptId),
}

/// The app a shuffle belongs to, for convenience in messages.
impl std::fmt::Debug for Shuffle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label())
    }
}
