//! Offset-ordered reads for sort mode (DESIGN.md, "Sort"): when many readers
//! want blocks from the same files, serve their pending blocks in file-offset
//! order — an elevator sweeping up through the files and wrapping around —
//! instead of in whatever order readers ask, with bounded read-ahead per
//! reader, as Flink's sort-merge shuffle does.
//!
//! [`ElevatorQueue`] is the decision, a plain data structure. [`ReadScheduler`]
//! wraps it for the readers of one shuffle: each reader submits the disk
//! reads of a batch and performs them as the elevator grants them, asking
//! the kernel to read each one ahead (`POSIX_FADV_WILLNEED`) in that order.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use shuffle_protocol::{ErrorKind, ServiceError};
use tokio::sync::mpsc;

use crate::storage::{DataFile, lock};

/// Bytes one reader may have granted but not yet sent, 4 MiB: enough to keep
/// a stream busy between grants (64 blocks of 64 KiB) while bounding what a
/// slow reader pins ahead of others.
pub const READ_AHEAD_BYTES: usize = 4 << 20;

/// Identifies one reader within a scheduler.
pub type ReaderId = u64;

/// Position of a block: (file key, offset), then a sequence number to keep keys unique.
type Position = (u64, u64, u64);

/// A block not yet granted: offset in its file, index in its reader's list, length.
type PendingBlock = (u64, usize, usize);

/// A granted block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Whose block.
    pub reader: ReaderId,
    /// Its index in the reader's submitted list.
    pub index: usize,
    /// Its length, taken from the reader's credit.
    pub len: usize,
}

/// Pending blocks, with each reader's credit.
///
/// A reader's blocks of one file must reach it in the order it submitted them
/// (their sequence order), so only the next block of each (reader, file) queue
/// is a candidate; the elevator chooses among candidates by position.
#[derive(Debug, Default)]
pub struct ElevatorQueue {
    /// Per (reader, file): its blocks not yet granted, as (offset, index, len), in submitted order.
    queues: HashMap<(ReaderId, u64), VecDeque<PendingBlock>>,
    /// The next block of every non-empty queue, by position.
    candidates: BTreeMap<Position, (ReaderId, u64)>,
    /// Where the elevator last served.
    head: Position,
    /// Per reader: its read-ahead limit and the bytes granted but not yet sent.
    readers: HashMap<ReaderId, (usize, usize)>,
    /// Source of unique sequence numbers.
    sequence: u64,
}

impl ElevatorQueue {
    /// Adds a reader with `limit` bytes of read-ahead and its blocks at
    /// `(file, offset)` of `len` bytes, in the order it must receive them.
    pub fn submit(&mut self, reader: ReaderId, limit: usize, blocks: impl IntoIterator<Item = (u64, u64, usize)>) {
        self.readers.insert(reader, (limit, 0));
        for (index, (file, offset, len)) in blocks.into_iter().enumerate() {
            self.queues.entry((reader, file)).or_default().push_back((offset, index, len));
        }
        let files: Vec<u64> = self.queues.keys().filter(|(r, _)| *r == reader).map(|(_, f)| *f).collect();
        for file in files {
            self.promote(reader, file);
        }
    }

    /// Makes the next block of a (reader, file) queue a candidate.
    fn promote(&mut self, reader: ReaderId, file: u64) {
        if let Some(&(offset, _, _)) = self.queues.get(&(reader, file)).and_then(|q| q.front()) {
            self.sequence += 1;
            self.candidates.insert((file, offset, self.sequence), (reader, file));
        }
    }

    /// Records that `reader` has sent on `n` granted bytes.
    pub fn return_credit(&mut self, reader: ReaderId, n: usize) {
        if let Some((_, outstanding)) = self.readers.get_mut(&reader) {
            *outstanding = outstanding.saturating_sub(n);
        }
    }

    /// Forgets a reader and its pending blocks.
    pub fn remove(&mut self, reader: ReaderId) {
        self.readers.remove(&reader);
        self.queues.retain(|(r, _), _| *r != reader);
        self.candidates.retain(|_, (r, _)| *r != reader);
    }

    /// The next block to serve: the first candidate at or after the head
    /// (wrapping around) whose reader's read-ahead has room for it. A reader
    /// with nothing outstanding may always take one block, so a block larger
    /// than the read-ahead never stalls.
    pub fn next_grant(&mut self) -> Option<Grant> {
        let readers = &self.readers;
        let queues = &self.queues;
        let fits = |reader: ReaderId, file: u64| {
            let len = queues.get(&(reader, file)).and_then(|q| q.front()).map_or(0, |b| b.2);
            readers.get(&reader).is_some_and(|&(limit, outstanding)| outstanding == 0 || outstanding + len <= limit)
        };
        let found = self
            .candidates
            .range(self.head..)
            .chain(self.candidates.range(..self.head))
            .find(|(_, (reader, file))| fits(*reader, *file))
            .map(|(pos, _)| *pos)?;
        let (reader, file) = self.candidates.remove(&found)?;
        let (_, index, len) = self.queues.get_mut(&(reader, file))?.pop_front()?;
        if self.queues.get(&(reader, file)).is_some_and(VecDeque::is_empty) {
            self.queues.remove(&(reader, file));
        }
        self.promote(reader, file);
        if let Some((_, outstanding)) = self.readers.get_mut(&reader) {
            *outstanding += len;
        }
        self.head = found;
        Some(Grant { reader, index, len })
    }
}

/// One block to read from disk.
#[derive(Clone, Debug)]
pub struct DiskRead {
    pub file: Arc<DataFile>,
    pub offset: u64,
    pub len: usize,
}

/// Reads `reads` from disk, coalescing ranges that follow each other in the
/// same file into one positioned read; returns the blocks in order. Blocking I/O.
pub fn read_blocking(reads: &[DiskRead]) -> Result<Vec<Bytes>, ServiceError> {
    let mut out = Vec::with_capacity(reads.len());
    let mut i = 0;
    while i < reads.len() {
        let first = &reads[i];
        let (mut end, mut j) = (first.offset + first.len as u64, i + 1);
        while j < reads.len()
            && Arc::ptr_eq(&reads[j].file, &first.file)
            && reads[j].offset == end
            && end - first.offset < COALESCE_BYTES
        {
            end += reads[j].len as u64;
            j += 1;
        }
        let bytes = first.file.read(first.offset, (end - first.offset) as usize)?;
        let mut at = 0;
        for r in &reads[i..j] {
            out.push(bytes.slice(at..at + r.len));
            at += r.len;
        }
        i = j;
    }
    Ok(out)
}

/// Largest single positioned read when coalescing neighbouring blocks.
pub const COALESCE_BYTES: u64 = 4 << 20;

/// A reader's pending reads and where its grants go.
struct Registered {
    reads: Arc<Vec<DiskRead>>,
    tx: mpsc::UnboundedSender<usize>,
}

/// The elevator shared by the readers of one shuffle: every reader's disk
/// reads are granted in file-offset order across readers, each within its
/// read-ahead credit.
#[derive(Default)]
pub struct ReadScheduler {
    inner: Mutex<(ElevatorQueue, HashMap<ReaderId, Registered>, ReaderId)>,
}

/// Unregisters a reader when dropped.
struct Registration<'a> {
    scheduler: &'a ReadScheduler,
    id: ReaderId,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut inner = lock(&self.scheduler.inner);
        inner.0.remove(self.id);
        inner.1.remove(&self.id);
        drop(inner);
        self.scheduler.pump();
    }
}

impl ReadScheduler {
    /// Reads `reads` from disk in the elevator's order across all readers of
    /// the shuffle (asking the kernel to read each ahead as it is granted);
    /// returns the blocks in the order given.
    pub async fn read(&self, reads: Vec<DiskRead>) -> Result<Vec<Bytes>, ServiceError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let reads = Arc::new(reads);
        let id = {
            let mut inner = lock(&self.inner);
            inner.2 += 1;
            let id = inner.2;
            let positions: Vec<_> = reads.iter().map(|r| (r.file.key(), r.offset, r.len)).collect();
            inner.0.submit(id, READ_AHEAD_BYTES, positions);
            inner.1.insert(id, Registered { reads: reads.clone(), tx });
            id
        };
        let _registration = Registration { scheduler: self, id };
        self.pump();
        let mut out: Vec<Option<Bytes>> = vec![None; reads.len()];
        let mut done = 0;
        while done < reads.len() {
            let Some(first) = rx.recv().await else {
                return Err(ServiceError::new(ErrorKind::Io, "the read scheduler dropped a reader"));
            };
            let mut granted = vec![first];
            while let Ok(next) = rx.try_recv() {
                granted.push(next);
            }
            granted.sort_unstable();
            let batch: Vec<DiskRead> = granted.iter().map(|&i| reads[i].clone()).collect();
            let bytes = tokio::task::spawn_blocking(move || read_blocking(&batch))
                .await
                .map_err(|e| ServiceError::new(ErrorKind::Io, format!("disk read task: {e}")))??;
            let credit: usize = bytes.iter().map(Bytes::len).sum();
            for (i, b) in granted.into_iter().zip(bytes) {
                out[i] = Some(b);
                done += 1;
            }
            lock(&self.inner).0.return_credit(id, credit);
            self.pump();
        }
        Ok(out.into_iter().map(|b| b.expect("every read was granted")).collect())
    }

    /// Grants reads while any reader has credit, in elevator order.
    fn pump(&self) {
        let mut inner = lock(&self.inner);
        let (queue, readers, _) = &mut *inner;
        while let Some(grant) = queue.next_grant() {
            if let Some(reader) = readers.get(&grant.reader) {
                let r = &reader.reads[grant.index];
                crate::disk::advise_will_need(r.file.file(), r.offset, r.len as u64);
                let _ = reader.tx.send(grant.index);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_blocks_are_served_in_offset_order_across_readers() {
        let mut q = ElevatorQueue::default();
        q.submit(1, 1000, [(0, 100, 10), (0, 300, 10), (1, 0, 10)]);
        q.submit(2, 1000, [(0, 50, 10), (0, 200, 10)]);
        let order: Vec<_> = std::iter::from_fn(|| q.next_grant()).map(|g| (g.reader, g.index)).collect();
        assert_eq!(order, vec![(2, 0), (1, 0), (2, 1), (1, 1), (1, 2)]);
    }

    #[test]
    fn a_readers_blocks_of_one_file_keep_their_order_when_the_elevator_wraps() {
        let mut q = ElevatorQueue::default();
        q.submit(1, 1000, [(0, 500, 10)]);
        assert_eq!(q.next_grant().map(|g| g.reader), Some(1));
        // The head is at 500; reader 2 needs 100 before 700 of the same file.
        q.submit(2, 1000, [(0, 100, 10), (0, 700, 10)]);
        let order: Vec<_> = std::iter::from_fn(|| q.next_grant()).map(|g| g.index).collect();
        assert_eq!(order, vec![0, 1]);
    }

    #[test]
    fn the_elevator_continues_from_its_head_and_wraps_around() {
        let mut q = ElevatorQueue::default();
        q.submit(1, 10, [(0, 100, 10), (0, 300, 10)]);
        assert_eq!(q.next_grant().map(|g| g.index), Some(0));
        assert_eq!(q.next_grant(), None, "reader 1 has used its credit");
        q.submit(2, 100, [(0, 200, 10)]);
        q.submit(3, 100, [(0, 50, 10)]);
        assert_eq!(q.next_grant().map(|g| g.reader), Some(2), "200 is ahead of the head at 100");
        q.return_credit(1, 10);
        assert_eq!(q.next_grant().map(|g| (g.reader, g.index)), Some((1, 1)), "then 300");
        assert_eq!(q.next_grant().map(|g| g.reader), Some(3), "then wrap around to 50");
    }

    #[test]
    fn read_ahead_is_bounded_per_reader() {
        let mut q = ElevatorQueue::default();
        q.submit(1, 25, (0..10).map(|i| (0, i * 10, 10)));
        assert_eq!(std::iter::from_fn(|| q.next_grant()).count(), 2, "25 bytes of credit grant two 10-byte blocks");
        q.return_credit(1, 10);
        assert_eq!(std::iter::from_fn(|| q.next_grant()).count(), 1);
        q.remove(1);
        q.return_credit(1, 1000);
        assert_eq!(q.next_grant(), None);
    }

    #[test]
    fn blocks_larger_than_the_read_ahead_are_served_one_at_a_time() {
        let mut q = ElevatorQueue::default();
        let big = READ_AHEAD_BYTES + READ_AHEAD_BYTES / 4;
        q.submit(1, READ_AHEAD_BYTES, [(0, 0, big), (0, big as u64, big + 1)]);
        assert!(q.next_grant().is_some());
        assert_eq!(q.next_grant(), None, "the first is still outstanding");
        q.return_credit(1, big);
        assert!(q.next_grant().is_some(), "nothing outstanding: the second is served too");
    }
}
