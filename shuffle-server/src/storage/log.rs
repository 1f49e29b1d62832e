//! Partition logs: the storage of hash and hybrid shuffles (DESIGN.md,
//! "Hash" and "Hybrid").
//!
//! Each partition is a log of the blocks every map sent it, in arrival
//! order. A block stays in memory until memory is short; then the spiller
//! appends the largest partition's blocks to that partition's current
//! segment file (a new segment every [`SEGMENT_BYTES`]), and readers get
//! them from there. The modes differ in what readers see and what reading
//! frees:
//!
//! - hash: readers start once every map has committed and see the blocks
//!   of each map's committed attempt; a block of any other attempt is freed
//!   as soon as its attempt loses or is abandoned;
//! - hybrid, selective spilling: readers follow the log as it grows; a block
//!   is freed once read (in memory at once; on disk when every block of its
//!   segment is read: the segment file is deleted and its bytes leave the
//!   spill quota), so a partition is read once; spilling takes the newest
//!   unread blocks, those furthest from being read;
//! - hybrid, full spilling: every block is also written to disk in order
//!   (whenever a partition has a flush size of unwritten blocks, and under
//!   pressure), after which its memory is freed, so any reader can read the
//!   partition again from the start.
//!
//! Dead entries (read, or of failed attempts) at the front of a log are
//! dropped, so an unbounded selective stream runs in memory and disk
//! proportional to what is unread, not to what has passed through.
//!
//! The spill quota bounds the bytes of the shuffle's segment files: a
//! segment's bytes count from their write until the file is deleted, read
//! or not, so the shuffle's files never hold more than the quota.

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use shuffle_protocol::{
    AttemptId, BlockHeader, ErrorKind, MapId, PartitionId, ServiceError, ShuffleSpec, SpillStrategy,
};
use tokio::sync::watch;

use super::{
    BlockRef, DataFile, ModeStorage, ReadBatch, ReadCursor, Servable, ShuffleCore, SpillTarget, lock,
    manifest::{BlockRecord, BlocksManifest, FileRecord},
};
use crate::memory::Reservation;

/// Bytes of one segment file before the next is started: large enough that a
/// partition of a few GB has a handful of files. A selective stream with a
/// spill quota uses a quarter of its quota (at least 1 MiB): read blocks
/// keep their segment's bytes in the quota until the whole segment is read,
/// so segments small against the quota keep it free for new spills.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// Most blocks handed to a reader at once.
pub const MAX_BATCH_BLOCKS: usize = 64;

/// What readers of the log see and what reading frees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogMode {
    /// Hash: read once complete; nothing freed by reading.
    Hash,
    /// Hybrid, selective spilling: read as it grows; a block read is freed.
    Selective,
    /// Hybrid, full spilling: read as it grows; every block also on disk.
    Full,
}

/// One block of a partition's log.
#[derive(Debug)]
struct Entry {
    map: MapId,
    attempt: AttemptId,
    len: u32,
    /// The bytes while in memory, with their share of the budget.
    memory: Option<(Bytes, Reservation)>,
    /// Segment and offset once written to disk.
    disk: Option<(u32, u64)>,
    /// Read (selective) or of an attempt that will never be served.
    dead: bool,
}

/// One segment file and how many live entries it still holds.
#[derive(Debug)]
struct Segment {
    file: Arc<DataFile>,
    live: usize,
}

/// One partition's log and files.
#[derive(Debug, Default)]
struct PartitionLog {
    /// Log position of `entries[0]`: dead entries at the front are dropped.
    base: u64,
    entries: VecDeque<Entry>,
    /// Bytes of entries held in memory.
    memory_bytes: usize,
    /// Full: bytes in memory not yet on disk.
    unflushed: usize,
    segments: BTreeMap<u32, Segment>,
    /// The segment appended to, if any.
    current: Option<u32>,
    next_segment: u32,
    /// Whether a spill of this partition is under way (spills of one partition never overlap).
    flushing: bool,
    /// Selective: whether a reader has opened the partition (it is read once).
    opened: bool,
}

impl PartitionLog {
    fn entry_mut(&mut self, position: u64) -> Option<&mut Entry> {
        let i = position.checked_sub(self.base)?;
        self.entries.get_mut(i as usize)
    }

    /// Marks an entry dead: frees its memory and its place in its segment.
    /// Returns the bytes of the segment files this deleted (for the spill quota).
    fn kill(&mut self, position: u64) -> u64 {
        let Some(entry) = self.entry_mut(position) else { return 0 };
        if entry.dead {
            return 0;
        }
        entry.dead = true;
        let len = entry.len as usize;
        let freed = entry.memory.take().is_some();
        let disk = entry.disk.map(|(segment, _)| segment);
        if freed {
            self.memory_bytes -= len;
            if disk.is_none() {
                self.unflushed = self.unflushed.saturating_sub(len);
            }
        }
        match disk {
            Some(segment) => {
                if let Some(s) = self.segments.get_mut(&segment) {
                    s.live -= 1;
                }
                self.delete_if_dead(segment)
            }
            None => 0,
        }
    }

    /// Deletes `segment` if none of its entries is live and no spill is
    /// writing to it (the current segment too: the next spill starts a new
    /// one). Returns the bytes of the file deleted.
    fn delete_if_dead(&mut self, segment: u32) -> u64 {
        let dead = self.segments.get(&segment).is_some_and(|s| s.live == 0)
            && !(self.flushing && self.current == Some(segment));
        if !dead {
            return 0;
        }
        let Some(s) = self.segments.remove(&segment) else { return 0 };
        if self.current == Some(segment) {
            self.current = None;
        }
        s.file.delete();
        s.file.len()
    }

    /// Drops dead entries from the front of the log.
    fn compact(&mut self) {
        while self.entries.front().is_some_and(|e| e.dead) {
            self.entries.pop_front();
            self.base += 1;
        }
    }
}

/// The partition logs of one hash or hybrid shuffle.
pub struct LogStorage {
    mode: LogMode,
    partitions: Box<[Mutex<PartitionLog>]>,
    /// Per partition, bumped on every change a waiting hybrid reader may care about.
    versions: Box<[watch::Sender<u64>]>,
    /// Most bytes the shuffle may hold on disk at once (hybrid).
    quota: Option<u64>,
    /// Size at which a segment file is closed and the next one started.
    segment_bytes: u64,
    /// Bytes on disk (or being written) now, counted against the quota.
    on_disk: AtomicU64,
    /// Attempts that pushed blocks (hybrid), to fail them all at once.
    attempts: Mutex<HashSet<(MapId, AttemptId)>>,
    /// Attempts that failed or lost; their blocks are never served (hybrid).
    failed: Mutex<HashSet<(MapId, AttemptId)>>,
}

impl LogStorage {
    /// Empty logs for a hash or hybrid shuffle of `spec`.
    pub fn new(spec: &ShuffleSpec) -> Self {
        let mode = match (spec.mode, spec.spill) {
            (shuffle_protocol::ExchangeMode::Hybrid, SpillStrategy::Selective) => LogMode::Selective,
            (shuffle_protocol::ExchangeMode::Hybrid, SpillStrategy::Full) => LogMode::Full,
            _ => LogMode::Hash,
        };
        Self {
            mode,
            partitions: (0..spec.partitions).map(|_| Mutex::default()).collect(),
            versions: (0..spec.partitions).map(|_| watch::Sender::new(0)).collect(),
            quota: if mode == LogMode::Hash { None } else { spec.spill_quota },
            segment_bytes: match (mode, spec.spill_quota) {
                (LogMode::Selective, Some(q)) => (q / 4).clamp(1 << 20, SEGMENT_BYTES),
                _ => SEGMENT_BYTES,
            },
            on_disk: AtomicU64::new(0),
            attempts: Mutex::new(HashSet::new()),
            failed: Mutex::new(HashSet::new()),
        }
    }

    /// Logs rebuilt from a manifest: every committed block, on disk, in order.
    pub fn recover(core: &ShuffleCore, manifest: &BlocksManifest) -> Result<Self, ServiceError> {
        let storage = Self::new(&core.spec);
        let files = manifest
            .files
            .iter()
            .map(|f| DataFile::open(core.dir.join(&f.name), f.len).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        // Each file is one segment of one partition; segment ids are per partition.
        let mut segment_ids: Vec<Option<(PartitionId, u32)>> = vec![None; files.len()];
        for block in &manifest.blocks {
            let file = files.get(block.file as usize).ok_or_else(|| corrupt(core, "a block names no file"))?;
            let log = storage.partitions.get(block.partition as usize).ok_or_else(|| corrupt(core, "bad partition"))?;
            let mut log = lock(log);
            let segment = match segment_ids[block.file as usize] {
                Some((p, id)) if p == block.partition => id,
                Some(_) => return Err(corrupt(core, "a file holds blocks of two partitions")),
                None => {
                    let id = log.next_segment;
                    log.next_segment += 1;
                    log.segments.insert(id, Segment { file: file.clone(), live: 0 });
                    segment_ids[block.file as usize] = Some((block.partition, id));
                    id
                }
            };
            if block.offset + u64::from(block.len) > file.len() {
                return Err(corrupt(core, "a block lies past the end of its file"));
            }
            log.segments.get_mut(&segment).expect("inserted above").live += 1;
            log.entries.push_back(Entry {
                map: block.map,
                attempt: block.attempt,
                len: block.len,
                memory: None,
                disk: Some((segment, block.offset)),
                dead: false,
            });
        }
        // The quota counts the files' bytes (only files that hold blocks are kept).
        let used: u64 = segment_ids.iter().zip(&files).filter(|(id, _)| id.is_some()).map(|(_, f)| f.len()).sum();
        storage.on_disk.store(used, Ordering::Release);
        Ok(storage)
    }

    fn bump(&self, partition: PartitionId) {
        if self.mode != LogMode::Hash {
            self.versions[partition as usize].send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    fn is_failed(&self, map: MapId, attempt: AttemptId) -> bool {
        let failed = lock(&self.failed);
        !failed.is_empty() && failed.contains(&(map, attempt))
    }

    /// Whether a spill may write `n` more bytes within the quota (and reserves them).
    fn take_quota(&self, n: u64) -> u64 {
        let Some(quota) = self.quota else {
            self.on_disk.fetch_add(n, Ordering::AcqRel);
            return n;
        };
        let mut granted = 0;
        let _ = self.on_disk.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
            granted = quota.saturating_sub(used).min(n);
            Some(used + granted)
        });
        granted
    }

    fn return_quota(&self, n: u64) {
        let _ = self.on_disk.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| Some(used.saturating_sub(n)));
    }

    fn quota_left(&self) -> u64 {
        self.quota.map_or(u64::MAX, |q| q.saturating_sub(self.on_disk.load(Ordering::Acquire)))
    }

    /// Which in-memory entries of `log` a spill writes, in log order
    /// (positions), and their bytes, which this takes from the quota.
    fn choose(&self, log: &PartitionLog, flush_size: usize) -> (Vec<u64>, u64) {
        let in_memory = |e: &Entry| !e.dead && e.memory.is_some() && e.disk.is_none();
        let positions = log.entries.iter().enumerate().filter(|(_, e)| in_memory(e));
        let mut chosen: Vec<u64> = match self.mode {
            LogMode::Hash | LogMode::Full => positions.map(|(i, _)| log.base + i as u64).collect(),
            LogMode::Selective => {
                // The newest unread blocks, about half the partition's memory (at least a flush size).
                let target = (log.memory_bytes.div_ceil(2)).max(flush_size.min(log.memory_bytes));
                let mut picked = Vec::new();
                let mut bytes = 0;
                for (i, e) in positions.collect::<Vec<_>>().into_iter().rev() {
                    if bytes >= target {
                        break;
                    }
                    bytes += e.len as usize;
                    picked.push(log.base + i as u64);
                }
                picked.reverse();
                picked
            }
        };
        // Within the quota: Full keeps the oldest (order on disk matters), Selective the newest.
        let len = |p: &u64| u64::from(log.entries[(p - log.base) as usize].len);
        let mut total: u64 = chosen.iter().map(len).sum();
        let granted = self.take_quota(total);
        while total > granted && !chosen.is_empty() {
            let dropped = match self.mode {
                LogMode::Selective => chosen.remove(0),
                _ => chosen.pop().expect("not empty"),
            };
            total -= len(&dropped);
        }
        self.return_quota(granted - total);
        (chosen, total)
    }
}

fn corrupt(core: &ShuffleCore, why: &str) -> ServiceError {
    ServiceError::new(ErrorKind::Io, format!("the manifest of {} is inconsistent: {why}", core.label()))
}

impl ModeStorage for LogStorage {
    fn append(
        &self,
        core: &ShuffleCore,
        header: &BlockHeader,
        bytes: Bytes,
        memory: Reservation,
    ) -> Result<Option<SpillTarget>, ServiceError> {
        let (map, attempt, partition) = (header.id.map, header.id.attempt, header.id.partition);
        let len = bytes.len();
        let flush_now = {
            if self.mode != LogMode::Hash {
                lock(&self.attempts).insert((map, attempt));
            }
            // Lock order: `failed`, then a partition.
            let failed = lock(&self.failed);
            let mut log = lock(&self.partitions[partition as usize]);
            if core.is_removed() || failed.contains(&(map, attempt)) {
                return Ok(None); // dropped: its reservation is released here
            }
            drop(failed);
            log.entries.push_back(Entry {
                map,
                attempt,
                len: len as u32,
                memory: Some((bytes, memory)),
                disk: None,
                dead: false,
            });
            log.memory_bytes += len;
            if self.mode == LogMode::Full {
                log.unflushed += len;
            }
            self.mode == LogMode::Full && log.unflushed >= core.env.flush_size && !log.flushing
        };
        self.bump(partition);
        // Full spilling writes every block; it does so as soon as a flush size is ready.
        Ok(flush_now.then_some(SpillTarget::Partition(partition)))
    }

    fn drop_attempts(&self, core: &ShuffleCore, map: MapId, which: &dyn Fn(AttemptId) -> bool) {
        if self.mode != LogMode::Hash {
            let attempts = lock(&self.attempts);
            let mut failed = lock(&self.failed);
            for &(m, a) in attempts.iter() {
                if m == map && which(a) {
                    failed.insert((m, a));
                }
            }
        }
        let mut reclaimed = 0;
        for partition in self.partitions.iter() {
            let mut log = lock(partition);
            let doomed: Vec<u64> = log
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.map == map && !e.dead && which(e.attempt))
                .map(|(i, _)| log.base + i as u64)
                .collect();
            for position in doomed {
                reclaimed += log.kill(position);
            }
            log.compact();
        }
        self.return_quota(reclaimed);
        let _ = core;
        self.wake_readers();
    }

    fn open_reader(&self, core: &ShuffleCore, partition: PartitionId) -> Result<(), ServiceError> {
        let mut log = lock(&self.partitions[partition as usize]);
        if self.mode == LogMode::Selective && log.opened {
            return Err(ServiceError::new(
                ErrorKind::AlreadyConsumed,
                format!(
                    "partition {partition} of {} uses selective spilling: its blocks are freed as they are \
                     read, so it cannot be read again; re-run its producers into a new shuffle",
                    core.label()
                ),
            ));
        }
        log.opened = true;
        Ok(())
    }

    fn read(
        &self,
        _core: &ShuffleCore,
        partition: PartitionId,
        cursor: &mut ReadCursor,
        servable: Servable<'_>,
        max_bytes: usize,
    ) -> Result<ReadBatch, ServiceError> {
        let log = lock(&self.partitions[partition as usize]);
        let mut position = cursor.index.max(log.base);
        let end = log.base + log.entries.len() as u64;
        let mut batch = ReadBatch::default();
        while position < end && batch.blocks.len() < MAX_BATCH_BLOCKS && batch.bytes() < max_bytes {
            let e = &log.entries[(position - log.base) as usize];
            if !e.dead && servable(e.map, e.attempt) {
                let block = match (&e.memory, e.disk) {
                    (Some((bytes, _)), _) => BlockRef::Memory(bytes.clone()),
                    (None, Some((segment, offset))) => {
                        let file = log.segments[&segment].file.clone();
                        BlockRef::Disk { file, offset, len: e.len }
                    }
                    (None, None) => unreachable!("a live entry is in memory or on disk"),
                };
                batch.push(block, (e.map, e.attempt), position);
            }
            position += 1;
        }
        cursor.index = position;
        Ok(batch)
    }

    fn sent(&self, _core: &ShuffleCore, partition: PartitionId, batch: &ReadBatch) {
        if self.mode != LogMode::Selective {
            return;
        }
        let mut log = lock(&self.partitions[partition as usize]);
        let mut reclaimed = 0;
        for &position in &batch.positions {
            reclaimed += log.kill(position);
        }
        log.compact();
        drop(log);
        self.return_quota(reclaimed);
    }

    fn subscribe(&self, partition: PartitionId) -> Option<watch::Receiver<u64>> {
        (self.mode != LogMode::Hash).then(|| self.versions[partition as usize].subscribe())
    }

    fn attempt_failed(&self, map: MapId, attempt: AttemptId) -> bool {
        self.is_failed(map, attempt)
    }

    fn wake_readers(&self) {
        for v in self.versions.iter() {
            v.send_modify(|v| *v = v.wrapping_add(1));
        }
    }

    fn spill_candidate(&self) -> Option<(SpillTarget, usize)> {
        if self.mode != LogMode::Hash && self.quota_left() == 0 {
            return None; // producers wait for readers (backpressure)
        }
        (0..self.partitions.len())
            .map(|i| {
                let log = lock(&self.partitions[i]);
                let spillable = match self.mode {
                    LogMode::Full => log.unflushed,
                    LogMode::Hash | LogMode::Selective => log.memory_bytes,
                };
                (i as PartitionId, if log.flushing { 0 } else { spillable })
            })
            .max_by_key(|&(_, n)| n)
            .filter(|&(_, n)| n > 0)
            .map(|(p, n)| (SpillTarget::Partition(p), n))
    }

    fn spill(&self, core: &ShuffleCore, target: SpillTarget) -> Result<u64, ServiceError> {
        let SpillTarget::Partition(partition) = target else { return Ok(0) };
        let slot = &self.partitions[partition as usize];
        let (chosen, chunks, segment, file, total) = {
            let mut log = lock(slot);
            if log.flushing || core.is_removed() {
                return Ok(0);
            }
            let (chosen, total) = self.choose(&log, core.env.flush_size);
            if chosen.is_empty() {
                // Full spilling must write every block: blocks left unwritten mean the quota is too small.
                if self.mode == LogMode::Full && log.unflushed > 0 {
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
            let chunks: Vec<Bytes> = chosen
                .iter()
                .map(|&p| {
                    let e = &log.entries[(p - log.base) as usize];
                    e.memory.as_ref().map(|(b, _)| b.clone()).expect("chosen entries are in memory")
                })
                .collect();
            let needs_new = match log.current {
                Some(id) => log.segments[&id].file.len() >= self.segment_bytes,
                None => true,
            };
            if needs_new {
                let id = log.next_segment;
                let file = match core.create_file(&format!("partition-{partition:06}-{id:04}.data")) {
                    Ok(file) => file,
                    Err(e) => {
                        drop(log);
                        self.return_quota(total);
                        return Err(e);
                    }
                };
                log.next_segment += 1;
                log.segments.insert(id, Segment { file, live: 0 });
                if let Some(old) = log.current.replace(id) {
                    let freed = log.delete_if_dead(old);
                    self.return_quota(freed);
                }
            }
            let segment = log.current.expect("set above");
            let file = log.segments[&segment].file.clone();
            log.flushing = true;
            (chosen, chunks, segment, file, total)
        };
        let written = file.append(&chunks, core.env.reserve());
        let mut log = lock(slot);
        log.flushing = false;
        let start = match written {
            Ok(start) => start,
            Err(e) => {
                self.return_quota(total);
                return Err(e);
            }
        };
        if core.is_removed() {
            return Ok(0);
        }
        let mut at = start;
        for (position, chunk) in chosen.iter().zip(&chunks) {
            let len = chunk.len() as u64;
            let offset = at;
            at += len;
            // An entry read (and perhaps dropped) meanwhile stays in the file, dead.
            let Some(e) = log.entry_mut(*position) else { continue };
            if e.dead {
                continue;
            }
            e.disk = Some((segment, offset));
            let freed = e.memory.take().map_or(0, |(b, _)| b.len());
            log.memory_bytes -= freed;
            if self.mode == LogMode::Full {
                log.unflushed = log.unflushed.saturating_sub(freed);
            }
            log.segments.get_mut(&segment).expect("current segment").live += 1;
        }
        // Every entry written may have been read meanwhile.
        let reclaimed = log.delete_if_dead(segment);
        drop(log);
        self.return_quota(reclaimed);
        Ok(total)
    }

    fn usage(&self) -> (u64, u64) {
        let memory = self.partitions.iter().map(|p| lock(p).memory_bytes as u64).sum();
        (memory, self.on_disk.load(Ordering::Acquire))
    }

    fn clear(&self) {
        for partition in self.partitions.iter() {
            let log = std::mem::take(&mut *lock(partition));
            drop(log); // reservations release here
        }
        self.wake_readers();
    }

    fn files(&self) -> Vec<Arc<DataFile>> {
        self.partitions
            .iter()
            .flat_map(|p| lock(p).segments.values().map(|s| s.file.clone()).collect::<Vec<_>>())
            .collect()
    }

    fn manifest(&self, core: &ShuffleCore, keep: &dyn Fn(MapId, AttemptId) -> bool) -> BlocksManifest {
        let mut manifest = BlocksManifest::default();
        let mut file_index: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
        for (partition, log) in self.partitions.iter().enumerate() {
            let log = lock(log);
            for e in log.entries.iter().filter(|e| !e.dead && keep(e.map, e.attempt)) {
                let Some((segment, offset)) = e.disk else { continue };
                let file = &log.segments[&segment].file;
                let index = *file_index.entry(file.key()).or_insert_with(|| {
                    let name = file.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    manifest.files.push(FileRecord { name, len: file.len() });
                    (manifest.files.len() - 1) as u32
                });
                manifest.blocks.push(BlockRecord {
                    map: e.map,
                    attempt: e.attempt,
                    partition: partition as u32,
                    run: 0,
                    file: index,
                    offset,
                    len: e.len,
                });
            }
        }
        let _ = core;
        manifest
    }
}

impl LogStorage {
    /// The mode of this log.
    pub fn mode(&self) -> LogMode {
        self.mode
    }
}

#[cfg(test)]
mod tests {
    use shuffle_protocol::{ShuffleSpec, SpillStrategy};

    use super::*;
    use crate::storage::testing::{append, block, core, env, read};

    #[test]
    fn hash_readers_see_each_maps_committed_attempt_in_arrival_order_from_memory_and_disk() {
        let (_dir, core) = core(ShuffleSpec::hash(2, 2), env(1 << 20, 1));
        let log = LogStorage::new(&core.spec);
        let blocks = [
            block(0, 0, 1, 0, 0, 100),
            block(1, 0, 1, 0, 0, 100),
            block(0, 1, 1, 0, 0, 100),
            block(0, 0, 1, 0, 1, 100),
        ];
        for b in &blocks {
            append(&log, &core, b);
        }
        // Attempt 1 of map 0 loses: its memory is freed at once.
        let before = core.memory.used();
        log.drop_attempts(&core, 0, &|a| a == 1);
        assert_eq!(core.memory.used(), before - blocks[2].1.len());
        // Half the partition goes to disk; reads do not change.
        assert!(log.spill(&core, SpillTarget::Partition(1)).unwrap() > 0);
        assert_eq!(log.usage().0, 0, "hash spills the whole partition");
        assert!(!log.files().is_empty());
        let mut cursor = ReadCursor::default();
        let got = read(&log, &core, 1, &mut cursor, &|_, a| a == 0);
        assert_eq!(got, vec![blocks[0].1.clone(), blocks[1].1.clone(), blocks[3].1.clone()]);
        assert_eq!(core.memory.used(), 0, "spilled blocks hold no memory");
    }

    #[test]
    fn selective_reads_free_blocks_reclaim_the_quota_and_delete_read_segments() {
        let spec = ShuffleSpec { spill_quota: Some(10_000), ..ShuffleSpec::hybrid(1, 1, SpillStrategy::Selective) };
        let (dir, core) = core(spec, env(1 << 20, 1));
        let log = LogStorage::new(&spec);
        log.open_reader(&core, 0).unwrap();
        assert_eq!(log.open_reader(&core, 0).unwrap_err().kind, ErrorKind::AlreadyConsumed);
        let blocks: Vec<_> = (0..8).map(|s| block(0, 0, 0, 0, s, 1000)).collect();
        for b in &blocks {
            append(&log, &core, b);
        }
        // Selective spilling writes the newest unread half, within the quota.
        let written = log.spill(&core, SpillTarget::Partition(0)).unwrap();
        assert!(written > 3000 && written <= 10_000, "{written}");
        let on_disk = log.usage().1;
        assert!(on_disk > 0);
        let mut cursor = ReadCursor::default();
        let got = read(&log, &core, 0, &mut cursor, &|_, _| true);
        assert_eq!(got, blocks.iter().map(|b| b.1.clone()).collect::<Vec<_>>());
        assert_eq!(log.usage(), (0, 0), "reading freed memory and disk quota");
        assert_eq!(core.memory.used(), 0);
        let p = lock(&log.partitions[0]);
        assert!(p.entries.is_empty() && p.base == 8, "the log was compacted");
        drop(p);
        // The read segment's file is gone once a new segment replaces it.
        append(&log, &core, &block(0, 0, 0, 0, 8, 1000));
        assert!(log.spill(&core, SpillTarget::Partition(0)).unwrap() > 0);
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(files.len() <= 1, "{files:?}");
    }

    #[test]
    fn the_quota_counts_a_segment_until_every_block_in_it_is_read() {
        let spec = ShuffleSpec { spill_quota: Some(10_000), ..ShuffleSpec::hybrid(1, 1, SpillStrategy::Selective) };
        let (dir, core) = core(spec, env(1 << 20, 1));
        let file_bytes =
            || std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum::<u64>();
        let log = LogStorage::new(&spec);
        log.open_reader(&core, 0).unwrap();
        for s in 0..8 {
            append(&log, &core, &block(0, 0, 0, 0, s, 1000));
        }
        let written = log.spill(&core, SpillTarget::Partition(0)).unwrap();
        assert!(written > 0);
        assert_eq!((log.usage().1, file_bytes()), (written, written));
        // Read one block at a time up to the first on disk.
        let mut cursor = ReadCursor::default();
        loop {
            let batch = log.read(&core, 0, &mut cursor, &|_, _| true, 1).unwrap();
            assert_eq!(batch.blocks.len(), 1);
            let on_disk = matches!(batch.blocks[0], BlockRef::Disk { .. });
            log.sent(&core, 0, &batch);
            if on_disk {
                break;
            }
        }
        assert_eq!(log.usage().1, written, "a read block's bytes stay in the quota while its segment lives");
        assert_eq!(file_bytes(), written);
        // More spills fill the quota and no more: the files never exceed it.
        for s in 8..40 {
            append(&log, &core, &block(0, 0, 0, 0, s, 1000));
        }
        while log.spill(&core, SpillTarget::Partition(0)).unwrap() > 0 {}
        assert!(file_bytes() <= 10_000 && file_bytes() > written, "{} bytes of files", file_bytes());
        assert_eq!(log.usage().1, file_bytes());
        read(&log, &core, 0, &mut cursor, &|_, _| true);
        assert_eq!(log.usage(), (0, 0));
        assert_eq!(file_bytes(), 0, "a segment whose blocks are all read is deleted, the current one too");
    }

    #[test]
    fn an_unbounded_selective_stream_stays_within_memory_and_disk_bounds() {
        let spec = ShuffleSpec { spill_quota: Some(64 << 10), ..ShuffleSpec::hybrid(1, 1, SpillStrategy::Selective) };
        let (dir, core) = core(spec, env(1 << 20, 1));
        let log = LogStorage::new(&spec);
        let mut cursor = ReadCursor::default();
        let mut peak_entries = 0;
        for round in 0..2000u32 {
            append(&log, &core, &block(0, 0, 0, 0, round, 4000));
            if round % 7 == 0 {
                let _ = log.spill(&core, SpillTarget::Partition(0));
            }
            if round % 3 == 2 {
                read(&log, &core, 0, &mut cursor, &|_, _| true);
            }
            peak_entries = peak_entries.max(lock(&log.partitions[0]).entries.len());
        }
        read(&log, &core, 0, &mut cursor, &|_, _| true);
        assert!(peak_entries <= 8, "the log stays short: {peak_entries}");
        assert_eq!(log.usage(), (0, 0));
        let on_disk: u64 = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
        assert!(on_disk <= SEGMENT_BYTES + (64 << 10), "{on_disk} bytes left on disk after 8 MB streamed");
    }

    #[test]
    fn full_spilling_writes_every_flush_size_and_refuses_past_its_quota() {
        let spec = ShuffleSpec { spill_quota: Some(5000), ..ShuffleSpec::hybrid(1, 1, SpillStrategy::Full) };
        let (_dir, core) = core(spec, env(1 << 20, 2500));
        let log = LogStorage::new(&spec);
        let (header, bytes) = block(0, 0, 0, 0, 0, 1500);
        let target = log.append(&core, &header, bytes.clone(), core.memory.reserve_now(bytes.len())).unwrap();
        assert_eq!(target, None, "below the flush size");
        let (header, bytes) = block(0, 0, 0, 0, 1, 1500);
        let target = log.append(&core, &header, bytes.clone(), core.memory.reserve_now(bytes.len())).unwrap();
        assert_eq!(target, Some(SpillTarget::Partition(0)));
        assert!(log.spill(&core, SpillTarget::Partition(0)).unwrap() > 3000);
        for s in 2..6 {
            append(&log, &core, &block(0, 0, 0, 0, s, 1500));
        }
        let _ = log.spill(&core, SpillTarget::Partition(0));
        let err = log.spill(&core, SpillTarget::Partition(0)).unwrap_err();
        assert_eq!(err.kind, ErrorKind::DiskFull);
        assert!(err.message.contains("spill quota"), "{}", err.message);
        // Every block is still served, and a second reader reads it all again.
        for _ in 0..2 {
            let got = read(&log, &core, 0, &mut ReadCursor::default(), &|_, _| true);
            assert_eq!(got.len(), 6);
        }
    }

    #[test]
    fn a_manifest_rebuilds_the_committed_blocks_from_disk() {
        let (_dir, core) = core(ShuffleSpec::hash(2, 2), env(1 << 20, 1));
        let log = LogStorage::new(&core.spec);
        let blocks = [
            block(0, 0, 0, 0, 0, 300),
            block(1, 2, 1, 0, 0, 300),
            block(1, 1, 1, 0, 0, 300),
            block(0, 0, 1, 0, 0, 300),
        ];
        for b in &blocks {
            append(&log, &core, b);
        }
        for p in 0..2 {
            log.spill(&core, SpillTarget::Partition(p)).unwrap();
        }
        let committed = |m: MapId, a: AttemptId| a == if m == 0 { 0 } else { 2 };
        let manifest = log.manifest(&core, &committed);
        assert_eq!(manifest.blocks.len(), 3, "the losing attempt is left out");
        for f in log.files() {
            f.sync().unwrap();
        }
        let recovered = LogStorage::recover(&core, &manifest).unwrap();
        let servable = |m: MapId, a: AttemptId| committed(m, a);
        assert_eq!(read(&recovered, &core, 0, &mut ReadCursor::default(), &servable), vec![blocks[0].1.clone()]);
        assert_eq!(
            read(&recovered, &core, 1, &mut ReadCursor::default(), &servable),
            vec![blocks[1].1.clone(), blocks[3].1.clone()]
        );
    }
}
