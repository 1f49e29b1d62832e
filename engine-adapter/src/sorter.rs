//! [`ExternalSorter`]: sorts encoded records by key in bounded memory.
//!
//! Records (key and value bytes, keys in the engine's order-preserving
//! encoding) go into one arena with a fixed-size entry each, within a
//! spillable [`Reservation`]. When the reservation cannot grow, the buffer
//! is sorted and written as a run ([`crate::spill`]) and emptied. At the
//! end, a sorter that never spilled sorts in memory; one that did writes its
//! last buffer as a run too and merges the runs, holding a block of each —
//! first merging groups of runs into longer ones if the reservation cannot
//! hold a block of every run at once.
//!
//! **Order of equal keys**: the order they were pushed in (the arena offset
//! breaks ties within a buffer, and runs are merged in the order they were
//! written, ties going to the earlier run).

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use shuffle_protocol::key_prefix;

use crate::{
    EngineError,
    memory::{Grow, Reservation},
    spill::{BlockEncoder, RUN_READER_BYTES, RunReader, SpillRun, SpillWriter},
    state::{SectionReader, SectionWriter},
};

/// Where a record lies in the arena.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    /// The key's first 8 bytes, so most comparisons are one integer compare.
    prefix: u64,
    offset: usize,
    key_len: u32,
    value_len: u32,
}

/// Bytes an entry takes besides its key and value.
const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();

/// The least an arena grows by, so small sorters do not reserve byte by byte.
const MIN_GROWTH: usize = 64 << 10;

/// How long a sorter holding nothing waits for its share of the budget
/// while other operators hold it, before it fails.
const SHARE_PATIENCE: Duration = Duration::from_secs(60);

/// Sorts records by key, spilling runs to `dir` when its reservation is full.
pub(crate) struct ExternalSorter {
    arena: Vec<u8>,
    entries: Vec<Entry>,
    /// Holds the capacity of `arena` and `entries`.
    reservation: Reservation,
    runs: Vec<SpillRun>,
    dir: PathBuf,
    /// Bytes this sorter wrote to runs (the task's spill metric).
    spilled: Arc<AtomicU64>,
    records: u64,
}

impl ExternalSorter {
    pub(crate) fn new(reservation: Reservation, dir: PathBuf, spilled: Arc<AtomicU64>) -> Self {
        Self { arena: Vec::new(), entries: Vec::new(), reservation, runs: Vec::new(), dir, spilled, records: 0 }
    }

    /// Runs written so far.
    #[cfg(test)]
    pub(crate) fn runs(&self) -> usize {
        self.runs.len()
    }

    fn held(&self) -> usize {
        self.arena.capacity() + self.entries.capacity() * ENTRY_BYTES
    }

    /// Makes room for a record of `bytes` bytes and its entry, within the
    /// reservation; `false` if the reservation cannot grow that far. A
    /// sorter holding no records waits for its share if others hold it.
    fn make_room(&mut self, bytes: usize) -> Result<bool, EngineError> {
        let arena_short = (self.arena.len() + bytes).saturating_sub(self.arena.capacity());
        let entries_short = usize::from(self.entries.len() == self.entries.capacity());
        if arena_short == 0 && entries_short == 0 {
            return Ok(true);
        }
        // Grow by doubling, or by what is missing when doubling is refused.
        let arena_add = if arena_short > 0 { self.arena.capacity().max(MIN_GROWTH).max(arena_short) } else { 0 };
        let entries_add = if entries_short > 0 { self.entries.capacity().max(MIN_GROWTH / ENTRY_BYTES) } else { 0 };
        let least = (arena_short, entries_short.max(entries_add.min(64)));
        let before = self.held();
        let asked = if self.reservation.try_grow(arena_add + entries_add * ENTRY_BYTES) {
            (arena_add, entries_add)
        } else if self.reservation.try_grow(least.0 + least.1 * ENTRY_BYTES) {
            least
        } else if self.entries.is_empty() {
            // Nothing to spill: wait while consumers over their shares shed.
            let needed = least.0 + least.1 * ENTRY_BYTES;
            match self.reservation.grow_or_wait(needed, SHARE_PATIENCE) {
                Grow::Granted => least,
                Grow::OverShare => {
                    return Err(self.record_too_large(bytes));
                }
                Grow::Starved => {
                    return Err(EngineError::MemoryStarved {
                        consumer: self.reservation.consumer().to_string(),
                        needed,
                        share: self.reservation.limit(),
                        waited: SHARE_PATIENCE,
                    });
                }
            }
        } else {
            return Ok(false);
        };
        self.arena.reserve_exact(asked.0);
        self.entries.reserve_exact(asked.1);
        // The allocator may round up: account what it gave.
        let granted = self.held() - before;
        let asked = asked.0 + asked.1 * ENTRY_BYTES;
        if granted > asked && !self.reservation.try_grow(granted - asked) {
            tracing::trace!(
                "{}: {} bytes of allocator rounding unaccounted",
                self.reservation.consumer(),
                granted - asked
            );
        }
        Ok(true)
    }

    /// Adds a record.
    pub(crate) fn push(&mut self, key: &[u8], value: &[u8]) -> Result<(), EngineError> {
        if self.reservation.over_share() {
            // Consumers came after this one grew: give back what is over.
            if self.entries.is_empty() {
                self.shed();
            } else {
                self.spill()?;
            }
        }
        let bytes = key.len() + value.len();
        if !self.make_room(bytes)? {
            self.spill()?;
            if !self.make_room(bytes)? {
                return Err(self.record_too_large(bytes));
            }
        }
        let offset = self.arena.len();
        self.arena.extend_from_slice(key);
        self.arena.extend_from_slice(value);
        self.entries.push(Entry {
            prefix: key_prefix(key),
            offset,
            key_len: key.len() as u32,
            value_len: value.len() as u32,
        });
        self.records += 1;
        Ok(())
    }

    /// A record of `bytes` key and value bytes does not fit this sorter's share.
    fn record_too_large(&self, bytes: usize) -> EngineError {
        EngineError::Memory {
            consumer: self.reservation.consumer().to_string(),
            needed: bytes + ENTRY_BYTES,
            limit: self.reservation.limit(),
        }
    }

    /// Adds a run of records sorted elsewhere, before any record is pushed:
    /// its records come first among equal keys.
    pub(crate) fn add_run(&mut self, run: SpillRun) {
        debug_assert!(self.entries.is_empty() && self.runs.is_empty(), "a run added after records");
        self.records += run.records();
        self.runs.push(run);
    }

    /// Frees the buffer's memory (it holds no records) and its reservation.
    fn shed(&mut self) {
        debug_assert!(self.entries.is_empty());
        self.arena = Vec::new();
        self.entries = Vec::new();
        self.reservation.free();
    }

    fn sort_entries(&mut self) {
        let arena = &self.arena;
        let key = |e: &Entry| &arena[e.offset..e.offset + e.key_len as usize];
        self.entries.sort_unstable_by(|a, b| {
            a.prefix.cmp(&b.prefix).then_with(|| key(a).cmp(key(b))).then(a.offset.cmp(&b.offset))
        });
    }

    fn record(&self, e: &Entry) -> (&[u8], &[u8]) {
        let key_end = e.offset + e.key_len as usize;
        (&self.arena[e.offset..key_end], &self.arena[key_end..key_end + e.value_len as usize])
    }

    /// Sorts the buffer into a run on disk and empties it (keeping its memory).
    fn spill(&mut self) -> Result<(), EngineError> {
        self.sort_entries();
        let mut writer = SpillWriter::create(&self.dir)?;
        for e in &self.entries {
            let (k, v) = self.record(e);
            writer.push(k, v)?;
        }
        let run = writer.finish()?;
        self.spilled.fetch_add(run.len(), Ordering::Relaxed);
        tracing::debug!(
            "{}: spilled {} records ({} bytes) as run {}",
            self.reservation.consumer(),
            run.records(),
            run.len(),
            self.runs.len()
        );
        self.runs.push(run);
        self.arena.clear();
        self.entries.clear();
        if self.reservation.over_share() {
            self.shed();
        }
        Ok(())
    }

    /// Every record so far, sorted by key.
    pub(crate) fn finish(mut self) -> Result<SortedStream, EngineError> {
        if self.runs.is_empty() {
            self.sort_entries();
            let entries = std::mem::take(&mut self.entries);
            let arena = Bytes::from(std::mem::take(&mut self.arena));
            return Ok(SortedStream::Memory { arena, entries: entries.into_iter(), _reservation: self.reservation });
        }
        if !self.entries.is_empty() {
            self.spill()?;
        }
        self.arena = Vec::new();
        self.entries = Vec::new();
        self.reservation.free();
        let runs = std::mem::take(&mut self.runs);
        merge_runs(runs, self.reservation, &self.dir, &self.spilled)
    }

    /// Writes every record held (in memory and in runs) into `section`,
    /// as chunks of checked blocks: the buffer's records, then each run.
    pub(crate) fn snapshot(&self, section: &mut SectionWriter) -> Result<(), EngineError> {
        let mut encoder = BlockEncoder::new(Vec::new(), PathBuf::from("checkpoint section"));
        let mut entries = self.entries.clone();
        entries.sort_by_key(|e| e.offset); // the order they came in
        for e in &entries {
            let (k, v) = self.record(e);
            encoder.push(k, v)?;
        }
        let (buffer, _, _) = encoder.finish()?;
        section.chunk(buffer);
        for run in &self.runs {
            section.run(run.clone());
        }
        Ok(())
    }

    /// Adds back every record of a section [`ExternalSorter::snapshot`] wrote.
    pub(crate) fn restore(&mut self, section: &mut SectionReader) -> Result<(), EngineError> {
        while let Some(mut chunk) = section.next_chunk()? {
            while let Some((k, v)) = chunk.next_record()? {
                self.push(&k, &v)?;
            }
        }
        Ok(())
    }
}

/// Merges sorted `runs` (in the order they were written, which is the
/// order of equal keys) within `reservation`: a block of every run at once,
/// or first groups of consecutive runs into longer ones until that fits.
pub(crate) fn merge_runs(
    mut runs: Vec<SpillRun>,
    mut reservation: Reservation,
    dir: &std::path::Path,
    spilled: &AtomicU64,
) -> Result<SortedStream, EngineError> {
    reservation.free();
    let fan_in = (reservation.limit() / RUN_READER_BYTES).max(2);
    while runs.len() > fan_in {
        let rest = runs.split_off(fan_in);
        let readers = runs.iter().map(SpillRun::open).collect::<Result<Vec<_>, _>>()?;
        let mut merge = Merge::new(readers)?;
        let mut writer = SpillWriter::create(dir)?;
        while let Some((k, v)) = merge.next_record()? {
            writer.push(&k, &v)?;
        }
        let merged = writer.finish()?;
        spilled.fetch_add(merged.len(), Ordering::Relaxed);
        runs = std::iter::once(merged).chain(rest).collect();
    }
    if !reservation.try_grow(runs.len() * RUN_READER_BYTES) {
        tracing::debug!("{}: merging {} runs past its share", reservation.consumer(), runs.len());
    }
    let readers = runs.iter().map(SpillRun::open).collect::<Result<Vec<_>, _>>()?;
    Ok(SortedStream::Runs { merge: Merge::new(readers)?, _reservation: reservation })
}

/// The head record of a run in a merge: prefix, key, run index, value.
type Head = Reverse<(u64, Bytes, usize, Bytes)>;

/// A k-way merge of runs by key; ties go to the earlier run.
pub(crate) struct Merge<R> {
    readers: Vec<RunReader<R>>,
    heads: BinaryHeap<Head>,
}

impl<R: std::io::Read> Merge<R> {
    pub(crate) fn new(mut readers: Vec<RunReader<R>>) -> Result<Self, EngineError> {
        let mut heads = BinaryHeap::with_capacity(readers.len());
        for (i, reader) in readers.iter_mut().enumerate() {
            if let Some((k, v)) = reader.next_record()? {
                heads.push(Reverse((key_prefix(&k), k, i, v)));
            }
        }
        Ok(Self { readers, heads })
    }

    pub(crate) fn next_record(&mut self) -> Result<Option<(Bytes, Bytes)>, EngineError> {
        let Some(Reverse((_, key, i, value))) = self.heads.pop() else { return Ok(None) };
        if let Some((k, v)) = self.readers[i].next_record()? {
            self.heads.push(Reverse((key_prefix(&k), k, i, v)));
        }
        Ok(Some((key, value)))
    }
}

/// A sorter's records in key order.
pub(crate) enum SortedStream {
    /// Sorted in memory.
    Memory { arena: Bytes, entries: std::vec::IntoIter<Entry>, _reservation: Reservation },
    /// Merged from runs.
    Runs { merge: Merge<std::fs::File>, _reservation: Reservation },
}

impl SortedStream {
    /// The next record in key order, key and value sharing a buffer.
    pub(crate) fn next_record(&mut self) -> Result<Option<(Bytes, Bytes)>, EngineError> {
        match self {
            Self::Memory { arena, entries, .. } => Ok(entries.next().map(|e| {
                let key_end = e.offset + e.key_len as usize;
                (arena.slice(e.offset..key_end), arena.slice(key_end..key_end + e.value_len as usize))
            })),
            Self::Runs { merge, .. } => merge.next_record(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryPool;

    fn sorter(budget: usize, dir: &std::path::Path) -> ExternalSorter {
        let pool = MemoryPool::new(budget);
        ExternalSorter::new(pool.reservation("test sorter", true), dir.to_path_buf(), Arc::default())
    }

    fn drain(mut stream: SortedStream) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((k, v)) = stream.next_record().unwrap() {
            out.push((k.to_vec(), v.to_vec()));
        }
        out
    }

    #[test]
    fn sorts_in_memory_and_through_runs_alike_keeping_equal_keys_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<(Vec<u8>, Vec<u8>)> = (0..30_000u32)
            .map(|i| (((i.wrapping_mul(2_654_435_761)) % 1000).to_be_bytes().to_vec(), i.to_be_bytes().to_vec()))
            .collect();
        let mut want = records.clone();
        want.sort_by(|a, b| a.0.cmp(&b.0)); // stable: equal keys in input order
        // A large budget sorts in memory; a small one spills some ten runs,
        // and a tiny one (room for a few run readers) merges in passes.
        for (budget, spills) in [(64 << 20, false), (128 << 10, true), (600 << 10, true)] {
            let mut s = sorter(budget, dir.path());
            for (k, v) in &records {
                tokio_free_push(&mut s, k, v);
            }
            assert_eq!(s.runs() > 0, spills, "budget {budget}");
            let got = drain_blocking(s);
            assert!(got == want, "budget {budget}: not the stable sort of the input");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "runs are deleted when done");
    }

    fn tokio_free_push(s: &mut ExternalSorter, k: &[u8], v: &[u8]) {
        s.push(k, v).unwrap();
    }

    fn drain_blocking(s: ExternalSorter) -> Vec<(Vec<u8>, Vec<u8>)> {
        // `block_in_place` needs a multi-thread runtime.
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().unwrap();
        rt.block_on(async move { drain(s.finish().unwrap()) })
    }

    #[test]
    fn the_reservation_bounds_the_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let pool = MemoryPool::new(256 << 10);
        let mut s = ExternalSorter::new(pool.reservation("bounded", true), dir.path().to_path_buf(), Arc::default());
        for i in 0..50_000u32 {
            s.push(&i.to_be_bytes(), &[0; 20]).unwrap();
            assert!(pool.used() <= 256 << 10);
        }
        assert!(s.runs() > 3);
        assert!(pool.peak() <= 256 << 10);
        let big = vec![0u8; 300 << 10];
        let err = s.push(b"k", &big).unwrap_err();
        assert!(err.to_string().contains("bounded"), "{err}");
    }

    #[test]
    fn a_sorter_started_when_another_holds_the_whole_budget_waits_until_that_one_sheds() {
        const BUDGET: usize = 512 << 10;
        let dir = tempfile::tempdir().unwrap();
        let pool = MemoryPool::new(BUDGET);
        let spilled = Arc::<AtomicU64>::default();
        let mut first = ExternalSorter::new(pool.reservation("first", true), dir.path().to_path_buf(), spilled.clone());
        let mut i = 0u32;
        // Alone, the first sorter's share is the whole budget: fill it.
        while first.runs() == 0 {
            first.push(&i.to_be_bytes(), &[1; 40]).unwrap();
            i += 1;
        }
        assert!(pool.used() > BUDGET - (64 << 10), "the first sorter holds {} bytes", pool.used());
        // A second consumer halves the share; the pool stays full until the
        // first sorter next pushes and sees it is over its share.
        let mut second = ExternalSorter::new(pool.reservation("second", true), dir.path().to_path_buf(), spilled);
        assert!(first.reservation.over_share());
        let waiting = std::thread::spawn(move || second.push(b"second", &[2; 40]).map(|()| second));
        std::thread::sleep(Duration::from_millis(200));
        assert!(!waiting.is_finished(), "the second sorter found room in a full pool");
        first.push(&i.to_be_bytes(), &[1; 40]).unwrap();
        let second = waiting.join().unwrap().expect("the second sorter got its share once the first shed");
        assert!(!first.reservation.over_share());
        assert!(pool.peak() <= BUDGET, "peak {} over the budget", pool.peak());
        assert_eq!(drain_blocking(second), vec![(b"second".to_vec(), vec![2; 40])]);
        let got = drain_blocking(first);
        assert_eq!(got.len(), i as usize + 1);
        assert!(got.iter().enumerate().all(|(j, (k, _))| k[..] == (j as u32).to_be_bytes()));
    }

    #[test]
    fn a_sorter_waits_only_for_bytes_within_its_share_and_gives_up_after_its_patience() {
        let dir = tempfile::tempdir().unwrap();
        let pool = MemoryPool::new(256 << 10);
        let mut hog = pool.reservation("hog", true);
        assert!(hog.try_grow(256 << 10));
        let mut s = ExternalSorter::new(pool.reservation("starved", true), dir.path().to_path_buf(), Arc::default());
        assert!(matches!(s.reservation.grow_or_wait(100, Duration::from_millis(50)), Grow::Starved));
        assert!(matches!(s.reservation.grow_or_wait(200 << 10, Duration::from_millis(50)), Grow::OverShare));
        drop(hog);
        s.push(b"k", b"v").unwrap();
    }
}
