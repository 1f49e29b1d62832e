//! Sort exchange storage (DESIGN.md, "Sort"): one data file per map attempt,
//! appended run by run with no merge pass, and a region index per file.
//!
//! Writers sort their records by partition (and key) in bounded buffers and
//! emit each buffer as a run: for each partition in order, its blocks. Blocks
//! therefore arrive in (run, partition) order, and each partition's blocks of
//! one run lie back to back in the file — a region. The server checks that
//! order, buffers blocks in memory up to the flush size, and appends them to
//! the attempt's file. When the attempt commits, the file is sealed (flushed,
//! mapped read-only) and its index sorted by partition, so a reader of
//! partition p takes p's regions from every committed map's file. The index
//! is kept in memory and also written beside the data file
//! (`map-M-attempt-A.index`: per region, partition, run, offset, length and
//! blocks as little-endian integers). Attempts that lose or are abandoned
//! have their files deleted.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use shuffle_protocol::{AttemptId, BlockHeader, ErrorKind, MapId, PartitionId, ServiceError};

use crate::{
    disk,
    hash::map_file,
    shuffle::{FlushTarget, ShuffleCore, SnapshotBlock, lock},
};

/// Where one block of an attempt's file lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct BlockLoc {
    partition: PartitionId,
    run: u32,
    offset: u64,
    len: u32,
}

/// A map attempt still being written.
#[derive(Debug)]
struct AttemptFile {
    /// The data file.
    path: PathBuf,
    /// Blocks received but not yet written, in order.
    pending: Vec<Bytes>,
    /// Bytes in `pending`.
    pending_bytes: usize,
    /// Bytes appended so far (written, being written and pending): the offset of the next block.
    logical_len: u64,
    /// Bytes written to the file.
    written: u64,
    /// Whether a flush is under way (flushes of one attempt never overlap).
    flushing: bool,
    /// Every block, in arrival (file) order.
    blocks: Vec<BlockLoc>,
    /// (run, partition) of the last block, to check the order of the next.
    last: Option<(u32, PartitionId)>,
}

/// A committed attempt's sealed file, shared by its readers.
#[derive(Debug)]
pub struct SealedAttempt {
    /// The data file.
    path: PathBuf,
    /// Its index file.
    index_path: PathBuf,
    /// The file, mapped read-only (empty if the attempt wrote nothing).
    data: Bytes,
    /// Its blocks sorted by (partition, run, offset).
    blocks: Vec<BlockLoc>,
    /// Identifies the file in offset-ordered read scheduling.
    file_key: u64,
}

impl SealedAttempt {
    /// Deletes the attempt's files (it was refused). Blocking I/O.
    pub fn delete_files(&self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.index_path);
    }
}

/// The map attempts of one sort shuffle.
pub struct SortStorage {
    /// Attempts being written, by (map, attempt).
    writing: Mutex<HashMap<(MapId, AttemptId), AttemptFile>>,
    /// Per map, its committed attempt's sealed file.
    committed: Mutex<Vec<Option<Arc<SealedAttempt>>>>,
    /// Source of file keys.
    next_file_key: AtomicU64,
}

impl SortStorage {
    /// Empty storage for `maps` maps.
    pub fn new(maps: u32) -> Self {
        Self {
            writing: Mutex::new(HashMap::new()),
            committed: Mutex::new(vec![None; maps as usize]),
            next_file_key: AtomicU64::new(0),
        }
    }

    fn data_path(core: &ShuffleCore, map: MapId, attempt: AttemptId) -> PathBuf {
        core.dir.join(format!("map-{map:06}-attempt-{attempt}.data"))
    }

    /// Buffers one block of an attempt, checking it continues the run/partition order.
    pub fn append(
        &self,
        core: &ShuffleCore,
        header: &BlockHeader,
        bytes: Bytes,
    ) -> Result<Option<FlushTarget>, ServiceError> {
        let (map, attempt) = (header.id.map, header.id.attempt);
        let key = (header.id.run, header.id.partition);
        let mut writing = lock(&self.writing);
        if core.is_removed() {
            return Ok(None);
        }
        let file = writing.entry((map, attempt)).or_insert_with(|| AttemptFile {
            path: Self::data_path(core, map, attempt),
            pending: Vec::new(),
            pending_bytes: 0,
            logical_len: 0,
            written: 0,
            flushing: false,
            blocks: Vec::new(),
            last: None,
        });
        if let Some(last) = file.last
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
        core.env.memory.reserve(len);
        file.last = Some(key);
        file.blocks.push(BlockLoc { partition: key.1, run: key.0, offset: file.logical_len, len: len as u32 });
        file.logical_len += len as u64;
        file.pending.push(bytes);
        file.pending_bytes += len;
        let full = file.pending_bytes >= core.env.flush_size && !file.flushing;
        Ok(full.then_some(FlushTarget::Attempt(map, attempt)))
    }

    /// Appends an attempt's pending blocks to its file. Blocking I/O.
    pub fn flush_attempt(&self, core: &ShuffleCore, map: MapId, attempt: AttemptId) -> Result<u64, ServiceError> {
        let (path, chunks, offset, bytes) = {
            let mut writing = lock(&self.writing);
            let Some(file) = writing.get_mut(&(map, attempt)) else { return Ok(0) };
            if file.flushing || file.pending.is_empty() {
                return Ok(0);
            }
            file.flushing = true;
            let bytes = std::mem::take(&mut file.pending_bytes);
            (file.path.clone(), std::mem::take(&mut file.pending), file.written, bytes)
        };
        let result = core.write_at(&path, &chunks, offset);
        let mut writing = lock(&self.writing);
        let Some(file) = writing.get_mut(&(map, attempt)) else {
            // Discarded meanwhile: its pending memory was released then, this chunk's is released here.
            drop(writing);
            let _ = std::fs::remove_file(&path);
            core.env.memory.release(bytes);
            return Ok(0);
        };
        file.flushing = false;
        match result {
            Ok(written) => {
                file.written += written;
                drop(writing);
                core.env.memory.release(bytes);
                Ok(written)
            }
            Err(e) => {
                // Keep the blocks (and their memory) so nothing accepted is lost.
                let mut restored = chunks;
                restored.append(&mut file.pending);
                file.pending = restored;
                file.pending_bytes += bytes;
                Err(e)
            }
        }
    }

    /// Writes out the rest of an attempt, maps its file and sorts its index,
    /// ready to be installed if the attempt commits. Blocking I/O.
    pub fn seal(&self, core: &ShuffleCore, map: MapId, attempt: AttemptId) -> Result<SealedAttempt, ServiceError> {
        loop {
            let (flushing, pending) = match lock(&self.writing).get(&(map, attempt)) {
                Some(file) => (file.flushing, !file.pending.is_empty()),
                None => (false, false),
            };
            if flushing {
                std::thread::sleep(std::time::Duration::from_millis(1));
            } else if pending {
                if let Err(e) = self.flush_attempt(core, map, attempt) {
                    self.discard_attempts(core, map, |a| a == attempt);
                    return Err(e);
                }
            } else {
                break;
            }
        }
        let file = lock(&self.writing).remove(&(map, attempt));
        let path = Self::data_path(core, map, attempt);
        let index_path = path.with_extension("index");
        let mut blocks = file.map(|f| f.blocks).unwrap_or_default();
        let sealed = (|| {
            let data = if blocks.is_empty() { Bytes::new() } else { map_file(&path)? };
            blocks.sort_unstable();
            std::fs::write(&index_path, encode_regions(&blocks))
                .map_err(|e| disk::io_error(&index_path, "writing the region index", e))?;
            Ok(data)
        })();
        let data = match sealed {
            Ok(data) => data,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                let _ = std::fs::remove_file(&index_path);
                return Err(e);
            }
        };
        let file_key = self.next_file_key.fetch_add(1, Ordering::Relaxed);
        Ok(SealedAttempt { path, index_path, data, blocks, file_key })
    }

    /// Makes a sealed attempt the map's committed output.
    pub fn install(&self, map: MapId, sealed: SealedAttempt) {
        lock(&self.committed)[map as usize] = Some(Arc::new(sealed));
    }

    /// Drops the attempts of `map` matching `discard` that are still being
    /// written: their memory is released and their files deleted.
    pub fn discard_attempts(&self, core: &ShuffleCore, map: MapId, discard: impl Fn(AttemptId) -> bool) {
        let dropped: Vec<AttemptFile> = {
            let mut writing = lock(&self.writing);
            let keys: Vec<_> = writing.keys().filter(|(m, a)| *m == map && discard(*a)).copied().collect();
            keys.into_iter().filter_map(|k| writing.remove(&k)).collect()
        };
        for file in dropped {
            core.env.memory.release(file.pending_bytes);
            let _ = std::fs::remove_file(&file.path);
        }
    }

    /// The blocks of `partition` from every committed map, map by map, each
    /// map's in run and offset order.
    pub fn snapshot(&self, partition: PartitionId) -> Vec<SnapshotBlock> {
        let committed = lock(&self.committed).clone();
        let mut out = Vec::new();
        for sealed in committed.iter().flatten() {
            let start = sealed.blocks.partition_point(|b| b.partition < partition);
            for b in sealed.blocks[start..].iter().take_while(|b| b.partition == partition) {
                let range = b.offset as usize..b.offset as usize + b.len as usize;
                out.push(SnapshotBlock {
                    bytes: sealed.data.slice(range),
                    position: Some((sealed.file_key, b.offset)),
                });
            }
        }
        out
    }

    /// The attempt buffering the most memory (not being flushed), and how much.
    pub fn largest_attempt(&self) -> Option<(MapId, AttemptId, usize)> {
        lock(&self.writing)
            .iter()
            .filter(|(_, f)| !f.flushing && f.pending_bytes > 0)
            .map(|(&(m, a), f)| (m, a, f.pending_bytes))
            .max_by_key(|&(_, _, n)| n)
    }

    /// Bytes held in memory and written to files.
    pub fn usage(&self) -> (u64, u64) {
        let (memory, written) =
            lock(&self.writing).values().fold((0, 0), |(m, d), f| (m + f.pending_bytes as u64, d + f.written));
        let sealed: u64 = lock(&self.committed).iter().flatten().map(|s| s.data.len() as u64).sum();
        (memory, written + sealed)
    }

    /// Drops everything; returns the bytes of memory to release.
    pub fn clear(&self) -> usize {
        lock(&self.committed).iter_mut().for_each(|c| *c = None);
        lock(&self.writing).drain().map(|(_, f)| f.pending_bytes).sum()
    }

    /// Number of data files of committed attempts (for tests and status).
    pub fn committed_files(&self) -> usize {
        lock(&self.committed).iter().flatten().filter(|s| !s.blocks.is_empty()).count()
    }
}

/// The region index: consecutive blocks of one (partition, run) merged into
/// one region, each as partition u32, run u32, offset u64, length u64, blocks u32.
fn encode_regions(sorted: &[BlockLoc]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let first = sorted[i];
        let (mut end, mut count) = (first.offset + u64::from(first.len), 1u32);
        while let Some(next) = sorted.get(i + count as usize) {
            if (next.partition, next.run) != (first.partition, first.run) || next.offset != end {
                break;
            }
            end += u64::from(next.len);
            count += 1;
        }
        out.extend_from_slice(&first.partition.to_le_bytes());
        out.extend_from_slice(&first.run.to_le_bytes());
        out.extend_from_slice(&first.offset.to_le_bytes());
        out.extend_from_slice(&(end - first.offset).to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        i += count as usize;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_blocks_of_a_partition_and_run_form_one_region() {
        let b = |partition, run, offset, len| BlockLoc { partition, run, offset, len };
        let sorted = vec![b(0, 0, 0, 10), b(0, 0, 10, 5), b(0, 1, 40, 7), b(1, 0, 15, 25)];
        let index = encode_regions(&sorted);
        assert_eq!(index.len(), 3 * 28, "three regions");
        assert_eq!(u64::from_le_bytes(index[16..24].try_into().unwrap()), 15, "first region spans both blocks");
        assert_eq!(u32::from_le_bytes(index[24..28].try_into().unwrap()), 2);
    }
}
