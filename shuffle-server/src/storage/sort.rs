//! Sort exchange storage (DESIGN.md, "Sort"): each map attempt's blocks, in
//! the order its writer emitted them — run by run, and within a run
//! partition by partition — with one append-only file per attempt for what
//! memory cannot hold.
//!
//! The server checks that order on arrival. When an attempt commits, its
//! blocks are indexed by (partition, run), so a reader of partition p takes
//! p's regions from every committed map; within one map that order is also
//! the blocks' sequence order. Spills take an attempt's oldest blocks first,
//! so of one map's blocks for a partition, those on disk always precede
//! those in memory. Attempts that lose or are abandoned are dropped with
//! their files.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use shuffle_protocol::{AttemptId, BlockHeader, ErrorKind, MapId, PartitionId, RunInfo, ServiceError};

use super::{
    BlockRef, DataFile, ModeStorage, ReadBatch, ReadCursor, Servable, ShuffleCore, SpillTarget, lock,
    log::MAX_BATCH_BLOCKS,
    manifest::{BlockRecord, BlocksManifest, FileRecord},
};
use crate::memory::Reservation;

/// One block of an attempt.
#[derive(Debug)]
struct SortEntry {
    partition: PartitionId,
    run: u32,
    len: u32,
    /// The bytes while in memory, with their share of the budget.
    memory: Option<(Bytes, Reservation)>,
    /// Offset in the attempt's file once written there.
    disk: Option<u64>,
}

/// Everything one map attempt sent.
#[derive(Debug, Default)]
struct AttemptData {
    /// Blocks in arrival order.
    entries: Vec<SortEntry>,
    /// `entries[..spilled]` are on disk.
    spilled: usize,
    /// The attempt's file, once something was spilled.
    file: Option<Arc<DataFile>>,
    /// Bytes of entries in memory.
    memory_bytes: usize,
    /// Whether a spill is under way.
    flushing: bool,
    /// (run, partition) of the last block, to check the order of the next.
    last: Option<(u32, PartitionId)>,
}

/// A committed attempt and its partition index.
#[derive(Debug)]
struct CommittedAttempt {
    attempt: AttemptId,
    data: SharedAttempt,
    /// (partition, entry index), sorted by partition, then run and arrival.
    by_partition: Vec<(PartitionId, u32)>,
}

impl CommittedAttempt {
    fn partition_range(&self, partition: PartitionId) -> std::ops::Range<usize> {
        let start = self.by_partition.partition_point(|&(p, _)| p < partition);
        let end = self.by_partition.partition_point(|&(p, _)| p <= partition);
        start..end
    }
}

/// An attempt's data, shared by its writer, its committed index and the spiller.
type SharedAttempt = Arc<Mutex<AttemptData>>;

/// The map attempts of one sort shuffle.
pub struct SortStorage {
    /// Every attempt holding data: being written, or committed.
    attempts: Mutex<HashMap<(MapId, AttemptId), SharedAttempt>>,
    /// Per map, its committed attempt.
    committed: Box<[Mutex<Option<Arc<CommittedAttempt>>>]>,
}

impl SortStorage {
    /// Empty storage for `maps` maps.
    pub fn new(maps: u32) -> Self {
        Self { attempts: Mutex::new(HashMap::new()), committed: (0..maps).map(|_| Mutex::new(None)).collect() }
    }

    /// Storage rebuilt from a manifest: every committed attempt's blocks, on disk.
    pub fn recover(core: &ShuffleCore, manifest: &BlocksManifest) -> Result<Self, ServiceError> {
        let storage = Self::new(core.spec.maps);
        let corrupt = |why: &str| {
            ServiceError::new(ErrorKind::Io, format!("the manifest of {} is inconsistent: {why}", core.label()))
        };
        let files = manifest
            .files
            .iter()
            .map(|f| DataFile::open(core.dir.join(&f.name), f.len).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        for block in &manifest.blocks {
            let file = files.get(block.file as usize).ok_or_else(|| corrupt("a block names no file"))?;
            if block.offset + u64::from(block.len) > file.len() || block.map >= core.spec.maps {
                return Err(corrupt("a block lies outside its file or shuffle"));
            }
            let data = lock(&storage.attempts).entry((block.map, block.attempt)).or_default().clone();
            let mut data = lock(&data);
            data.file.get_or_insert_with(|| file.clone());
            data.entries.push(SortEntry {
                partition: block.partition,
                run: block.run,
                len: block.len,
                memory: None,
                disk: Some(block.offset),
            });
            data.spilled = data.entries.len();
        }
        Ok(storage)
    }

    fn data(&self, map: MapId, attempt: AttemptId) -> Option<SharedAttempt> {
        lock(&self.attempts).get(&(map, attempt)).cloned()
    }

    /// Number of committed attempts that wrote something to disk (for tests and status).
    pub fn committed_files(&self) -> usize {
        self.committed
            .iter()
            .filter_map(|c| lock(c).clone())
            .filter(|c| lock(&c.data).file.as_ref().is_some_and(|f| !f.is_empty()))
            .count()
    }
}

impl ModeStorage for SortStorage {
    fn append(
        &self,
        core: &ShuffleCore,
        header: &BlockHeader,
        bytes: Bytes,
        memory: Reservation,
    ) -> Result<Option<SpillTarget>, ServiceError> {
        let (map, attempt) = (header.id.map, header.id.attempt);
        let key = (header.id.run, header.id.partition);
        let data = {
            let mut attempts = lock(&self.attempts);
            if core.is_removed() {
                return Ok(None);
            }
            attempts.entry((map, attempt)).or_default().clone()
        };
        let mut data = lock(&data);
        if let Some(last) = data.last
            && key < last
        {
            return Err(ServiceError::new(
                ErrorKind::IntegrityMismatch,
                format!(
                    "sort-mode blocks of map {map} attempt {attempt} of {} must arrive run by run and partition by \
                     partition: run {} partition {} came after run {} partition {}",
                    core.label(),
                    key.0,
                    key.1,
                    last.0,
                    last.1
                ),
            ));
        }
        let len = bytes.len();
        data.last = Some(key);
        data.entries.push(SortEntry {
            partition: key.1,
            run: key.0,
            len: len as u32,
            memory: Some((bytes, memory)),
            disk: None,
        });
        data.memory_bytes += len;
        Ok(None)
    }

    fn drop_attempts(&self, _core: &ShuffleCore, map: MapId, which: &dyn Fn(AttemptId) -> bool) {
        let dropped: Vec<SharedAttempt> = {
            let mut attempts = lock(&self.attempts);
            let keys: Vec<_> = attempts.keys().filter(|(m, a)| *m == map && which(*a)).copied().collect();
            keys.into_iter().filter_map(|k| attempts.remove(&k)).collect()
        };
        for data in dropped {
            let data = std::mem::take(&mut *lock(&data)); // reservations release here
            if let Some(file) = data.file {
                file.delete();
            }
        }
    }

    fn committed(&self, _core: &ShuffleCore, map: MapId, attempt: AttemptId) {
        let data = lock(&self.attempts).entry((map, attempt)).or_default().clone();
        let mut by_partition: Vec<(PartitionId, u32)> =
            lock(&data).entries.iter().enumerate().map(|(i, e)| (e.partition, i as u32)).collect();
        // Stable: within a partition, arrival order is run order and then sequence order.
        by_partition.sort_by_key(|&(p, _)| p);
        *lock(&self.committed[map as usize]) = Some(Arc::new(CommittedAttempt { attempt, data, by_partition }));
    }

    fn read(
        &self,
        _core: &ShuffleCore,
        partition: PartitionId,
        cursor: &mut ReadCursor,
        servable: Servable<'_>,
        max_bytes: usize,
    ) -> Result<ReadBatch, ServiceError> {
        let mut batch = ReadBatch::default();
        let mut in_memory: Option<bool> = None;
        while cursor.map < self.committed.len() && batch.blocks.len() < MAX_BATCH_BLOCKS && batch.bytes() < max_bytes {
            let Some(committed) = lock(&self.committed[cursor.map]).clone() else {
                cursor.map += 1;
                cursor.index = 0;
                continue;
            };
            let map = cursor.map as MapId;
            let range = committed.partition_range(partition);
            let k = range.start + cursor.index as usize;
            if k >= range.end || !servable(map, committed.attempt) {
                cursor.map += 1;
                cursor.index = 0;
                continue;
            }
            let data = lock(&committed.data);
            let e = &data.entries[committed.by_partition[k].1 as usize];
            let block = match (&e.memory, e.disk) {
                (Some((bytes, _)), _) => BlockRef::Memory(bytes.clone()),
                (None, Some(offset)) => {
                    let file = data.file.clone().expect("spilled entries have a file");
                    BlockRef::Disk { file, offset, len: e.len }
                }
                (None, None) => unreachable!("a committed entry is in memory or on disk"),
            };
            // A batch is all memory or all disk, so disk reads may be reordered freely.
            let memory = matches!(block, BlockRef::Memory(_));
            if *in_memory.get_or_insert(memory) != memory {
                break;
            }
            batch.push(block, (map, committed.attempt), k as u64);
            cursor.index += 1;
        }
        Ok(batch)
    }

    fn runs(&self, partition: PartitionId) -> Option<Vec<RunInfo>> {
        let mut runs = Vec::new();
        for (map, slot) in self.committed.iter().enumerate() {
            let Some(committed) = lock(slot).clone() else { continue };
            let range = committed.partition_range(partition);
            let data = lock(&committed.data);
            // Within a partition a map's entries are in arrival order, which
            // is run order and sequence order: index k is block sequence k.
            for (k, &(_, entry)) in committed.by_partition[range.clone()].iter().enumerate() {
                let run = data.entries[entry as usize].run;
                match runs.last_mut() {
                    Some(RunInfo { map: m, run: r, blocks, .. }) if *m == map as MapId && *r == run => *blocks += 1,
                    _ => runs.push(RunInfo {
                        map: map as MapId,
                        attempt: committed.attempt,
                        run,
                        first_block: k as u32,
                        blocks: 1,
                    }),
                }
            }
        }
        Some(runs)
    }

    fn spill_candidate(&self) -> Option<(SpillTarget, usize)> {
        lock(&self.attempts)
            .iter()
            .filter_map(|(&(m, a), data)| {
                let data = lock(data);
                (!data.flushing && data.memory_bytes > 0).then_some((SpillTarget::Attempt(m, a), data.memory_bytes))
            })
            .max_by_key(|&(_, n)| n)
    }

    fn spill(&self, core: &ShuffleCore, target: SpillTarget) -> Result<u64, ServiceError> {
        let SpillTarget::Attempt(map, attempt) = target else { return Ok(0) };
        let Some(slot) = self.data(map, attempt) else { return Ok(0) };
        let (start, end, chunks, file) = {
            let mut data = lock(&slot);
            if data.flushing || data.memory_bytes == 0 || core.is_removed() {
                return Ok(0);
            }
            // The oldest blocks in memory, at least a flush size (or all).
            let start = data.spilled;
            let mut end = start;
            let mut bytes = 0;
            while end < data.entries.len() && (bytes < core.env.flush_size || end == start) {
                bytes += data.entries[end].len as usize;
                end += 1;
            }
            if bytes < core.env.flush_size {
                end = data.entries.len();
            }
            let chunks: Vec<Bytes> = data.entries[start..end]
                .iter()
                .map(|e| e.memory.as_ref().map(|(b, _)| b.clone()).expect("unspilled entries are in memory"))
                .collect();
            let file = match &data.file {
                Some(file) => file.clone(),
                None => {
                    let file = core.create_file(&format!("map-{map:06}-attempt-{attempt}.data"))?;
                    data.file = Some(file.clone());
                    file
                }
            };
            data.flushing = true;
            (start, end, chunks, file)
        };
        let written = file.append(&chunks, core.env.reserve());
        let mut data = lock(&slot);
        data.flushing = false;
        let mut at = written?;
        if data.entries.len() < end {
            return Ok(0); // dropped meanwhile
        }
        let mut freed = 0;
        for e in &mut data.entries[start..end] {
            e.disk = Some(at);
            at += u64::from(e.len);
            freed += e.memory.take().map_or(0, |(b, _)| b.len());
        }
        data.spilled = end;
        data.memory_bytes -= freed;
        Ok(chunks.iter().map(|c| c.len() as u64).sum())
    }

    fn usage(&self) -> (u64, u64) {
        lock(&self.attempts).values().fold((0, 0), |(m, d), data| {
            let data = lock(data);
            (m + data.memory_bytes as u64, d + data.file.as_ref().map_or(0, |f| f.len()))
        })
    }

    fn clear(&self) {
        for c in self.committed.iter() {
            *lock(c) = None;
        }
        let all: Vec<_> = lock(&self.attempts).drain().map(|(_, d)| d).collect();
        for data in all {
            drop(std::mem::take(&mut *lock(&data)));
        }
    }

    fn files(&self) -> Vec<Arc<DataFile>> {
        lock(&self.attempts).values().filter_map(|d| lock(d).file.clone()).collect()
    }

    fn manifest(&self, _core: &ShuffleCore, keep: &dyn Fn(MapId, AttemptId) -> bool) -> BlocksManifest {
        let mut manifest = BlocksManifest::default();
        let mut attempts: Vec<((MapId, AttemptId), SharedAttempt)> =
            lock(&self.attempts).iter().filter(|(k, _)| keep(k.0, k.1)).map(|(k, v)| (*k, v.clone())).collect();
        attempts.sort_by_key(|(k, _)| *k);
        for ((map, attempt), data) in attempts {
            let data = lock(&data);
            let Some(file) = &data.file else { continue };
            let name = file.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            manifest.files.push(FileRecord { name, len: file.len() });
            let index = (manifest.files.len() - 1) as u32;
            for e in &data.entries {
                let Some(offset) = e.disk else { continue };
                manifest.blocks.push(BlockRecord {
                    map,
                    attempt,
                    partition: e.partition,
                    run: e.run,
                    file: index,
                    offset,
                    len: e.len,
                });
            }
        }
        manifest
    }
}

#[cfg(test)]
mod tests {
    use shuffle_protocol::ShuffleSpec;

    use super::*;
    use crate::storage::testing::{append, block, core, env, read};

    #[test]
    fn blocks_out_of_run_and_partition_order_are_refused() {
        let (_dir, core) = core(ShuffleSpec::sort(1, 4, false), env(1 << 20, 1));
        let s = SortStorage::new(1);
        append(&s, &core, &block(0, 0, 2, 0, 0, 10));
        let (header, bytes) = block(0, 0, 1, 0, 0, 10);
        let err = s.append(&core, &header, bytes, core.memory.reserve_now(10)).unwrap_err();
        assert_eq!(err.kind, ErrorKind::IntegrityMismatch);
        append(&s, &core, &block(0, 0, 1, 1, 0, 10)); // a new run starts over at any partition
    }

    #[test]
    fn readers_get_each_maps_regions_in_run_order_with_disk_before_memory() {
        let (_dir, core) = core(ShuffleSpec::sort(2, 3, true), env(1 << 20, 1));
        let s = SortStorage::new(2);
        // Map 0: two runs over partitions 0 and 2; map 1: one run over partition 2.
        let map0 =
            [block(0, 0, 0, 0, 0, 50), block(0, 0, 2, 0, 0, 50), block(0, 0, 2, 0, 1, 50), block(0, 0, 2, 1, 2, 50)];
        let map1 = [block(1, 0, 2, 0, 0, 50)];
        for b in map0.iter().chain(&map1) {
            append(&s, &core, b);
        }
        // The oldest blocks of map 0 go to disk.
        assert!(s.spill(&core, SpillTarget::Attempt(0, 0)).unwrap() > 0);
        s.committed(&core, 0, 0);
        s.committed(&core, 1, 0);
        let mut cursor = ReadCursor::default();
        let got = read(&s, &core, 2, &mut cursor, &|_, _| true);
        let want: Vec<_> = [&map0[1], &map0[2], &map0[3], &map1[0]].iter().map(|b| b.1.clone()).collect();
        assert_eq!(got, want);
        // The run index: map 0's runs 0 (two blocks) and 1, map 1's run 0.
        let runs = s.runs(2).unwrap();
        let index: Vec<_> = runs.iter().map(|r| (r.map, r.run, r.first_block, r.blocks)).collect();
        assert_eq!(index, [(0, 0, 0, 2), (0, 1, 2, 1), (1, 0, 0, 1)]);
        // A run read from its first block stops at nothing by itself: the reader truncates.
        let mut cursor = ReadCursor { map: 0, index: 2 };
        assert_eq!(read(&s, &core, 2, &mut cursor, &|_, _| true)[0], map0[3].1);
        // Batches never mix memory and disk blocks.
        s.spill(&core, SpillTarget::Attempt(1, 0)).unwrap();
        let mut cursor = ReadCursor::default();
        let batch = s.read(&core, 2, &mut cursor, &|_, _| true, 1 << 20).unwrap();
        assert!(
            batch.blocks.iter().all(|b| matches!(b, BlockRef::Disk { .. }))
                || batch.blocks.iter().all(|b| matches!(b, BlockRef::Memory(_)))
        );
    }

    #[test]
    fn a_dropped_attempt_frees_its_memory_and_deletes_its_file() {
        let (dir, core) = core(ShuffleSpec::sort(1, 1, false), env(1 << 20, 1));
        let s = SortStorage::new(1);
        append(&s, &core, &block(0, 3, 0, 0, 0, 5000));
        s.spill(&core, SpillTarget::Attempt(0, 3)).unwrap();
        append(&s, &core, &block(0, 3, 0, 0, 1, 5000));
        assert!(core.memory.used() > 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        s.drop_attempts(&core, 0, &|a| a == 3);
        assert_eq!(core.memory.used(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
