//! [`KeyMerge`]: the key-ordered read of a sort shuffle with key ordering,
//! a k-way merge of the partition's sorted runs that holds a bounded amount
//! of each.
//!
//! The server lists the partition's runs (`RunIndex`: every committed map's
//! runs within the partition, by map and run) and then serves chunks of one
//! run at a time (`ReadRun`). The merge keeps, per run, the chunk it is
//! reading and asks for the next one only when that is used up, so it holds
//! at most its memory budget whatever the size of the partition: each run's
//! chunk is `budget / runs` bytes (at least one block).
//!
//! **Order of equal keys.** Keys compare bytewise. Records with equal keys
//! come out in the order of the runs that hold them — by map, then by the
//! writer's run number — and within one run in the order the writer wrote
//! them (its sort is stable). The order is therefore a function of what each
//! map wrote, not of timing.
//!
//! Every block is checked as in an arrival-order read: its CRC, its map,
//! attempt and run, its place in the run's sequence; at the end each map's
//! blocks, records and chained checksum must equal what it committed.
//!
//! **Going on at another copy.** The whole state of the merge is on this
//! side: the heads, each run's blocks and how many of them arrived. A
//! `ReadRun` names its run and first block, so the server keeps no position.
//! When a cluster's copy fails mid-read, the reader opens the read at the
//! other copy and hands its stream to the merge ([`KeyMerge::resume`]),
//! which checks that the copy lists the same runs and commits (both copies
//! hold the same committed blocks) and asks it for the chunks it does not
//! have yet: nothing is read twice and nothing yielded is repeated or
//! skipped. A chunk cut short by the failure keeps the blocks that arrived
//! whole; the next request starts after them. For this every step of
//! [`KeyMerge::next`] can be taken again after an error: a run's head is
//! put back into the heap at the start of the next call, not before the
//! record taken from it is returned.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    sync::Arc,
};

use bytes::Bytes;
use shuffle_protocol::{
    Frame, FrameKind, MapCommit, MapId, PartitionId, PartitionTotals, RecordIter, Request, Response, RunInfo,
    ShuffleId, key_prefix, prefetch,
};

use crate::{
    ClientError, Record,
    reader::{RangeError, check_block, read_range, split_range},
    transport::{FrameReader, SendError, StreamSend, request_frame},
};

/// The largest block the merge plans for: a block of the default 64 KiB
/// of records and its header. A run needs at least one block in memory.
pub const MERGE_BLOCK_BYTES: usize = crate::options::DEFAULT_BLOCK_SIZE + shuffle_protocol::BLOCK_HEADER_LEN;

/// The record at the head of a run: key prefix, key, run index, value.
/// Ordered by key (prefix first, a single integer compare for most pairs),
/// then by run index, which is the order of equal keys.
type Head = Reverse<(u64, Bytes, usize, Bytes)>;

/// One run being merged.
struct RunCursor {
    info: RunInfo,
    /// Blocks of the run received so far.
    received: u32,
    /// Record count and CRC of each block received, in sequence order, for
    /// the map's totals (8 bytes per block, next to 64 KiB of records).
    blocks_seen: Vec<(u32, u32)>,
    /// Received blocks not yet started.
    blocks: VecDeque<Bytes>,
    /// The block being read and the offset reached.
    current: Bytes,
    offset: usize,
    /// Raw (decompressed) and stored bytes received, to size the next chunk.
    raw_bytes: u64,
    stored_bytes: u64,
}

/// Bytes of a run's next record that [`KeyMerge`] prefetches (two cache lines).
const NEXT_RECORD_PREFETCH: usize = 128;

/// What a run holds next, without fetching.
enum Buffered {
    Record(Record),
    /// Every block of the run was received and read.
    RunDone,
    /// The run's next chunk must be fetched first.
    NeedsFetch,
}

/// The merge of a partition's runs.
pub(crate) struct KeyMerge {
    /// Our side of the stream: `ReadRun` requests.
    send: StreamSend,
    /// The server's side: chunks of runs.
    stream: FrameReader,
    shuffle: ShuffleId,
    partition: PartitionId,
    runs: Vec<RunCursor>,
    /// What each map committed to the partition.
    maps: Vec<MapCommit>,
    /// The head record of every run not yet exhausted (once started).
    heads: BinaryHeap<Head>,
    /// Runs whose first record was put into `heads` (runs are started in order).
    started: usize,
    finished: bool,
    /// Bytes of blocks each run may hold.
    chunk_bytes: usize,
    /// Direct reads: files the server passed, by number.
    files: HashMap<u32, Arc<std::fs::File>>,
    /// Bytes of blocks held now, and the most held at once.
    held: usize,
    peak: usize,
}

impl KeyMerge {
    /// Reads the run index that follows `PartitionOpened` and plans the
    /// merge within `memory` bytes.
    pub(crate) async fn open(
        send: StreamSend,
        mut stream: FrameReader,
        (shuffle, partition): (ShuffleId, PartitionId),
        memory: usize,
    ) -> Result<Self, ClientError> {
        let (runs, maps) = match stream.response().await? {
            Response::RunIndex { runs, maps } => (runs, maps),
            other => return Err(ClientError::Protocol(format!("expected RunIndex, got {other:?}"))),
        };
        let integrity = |map: Option<MapId>, detail: String| ClientError::Integrity { shuffle, partition, map, detail };
        if let Some(w) = runs.windows(2).find(|w| (w[0].map, w[0].run) >= (w[1].map, w[1].run)) {
            return Err(integrity(
                Some(w[1].map),
                format!("the run index lists run {} after run {}", w[1].run, w[0].run),
            ));
        }
        if let Some(r) = runs.iter().find(|r| r.blocks == 0) {
            return Err(integrity(Some(r.map), format!("the run index lists run {} with no block", r.run)));
        }
        let chunk_bytes = if runs.is_empty() { memory } else { memory / runs.len() };
        if chunk_bytes < MERGE_BLOCK_BYTES {
            return Err(ClientError::MergeMemory {
                shuffle,
                partition,
                runs: runs.len(),
                needed: runs.len() * MERGE_BLOCK_BYTES,
                budget: memory,
            });
        }
        let runs = runs
            .into_iter()
            .map(|info| RunCursor {
                info,
                received: 0,
                blocks_seen: Vec::with_capacity(info.blocks as usize),
                blocks: VecDeque::new(),
                current: Bytes::new(),
                offset: 0,
                raw_bytes: 0,
                stored_bytes: 0,
            })
            .collect();
        Ok(Self {
            send,
            stream,
            shuffle,
            partition,
            runs,
            maps,
            heads: BinaryHeap::new(),
            started: 0,
            finished: false,
            chunk_bytes,
            files: HashMap::new(),
            held: 0,
            peak: 0,
        })
    }

    /// The most bytes of blocks held at once.
    pub(crate) fn peak_bytes(&self) -> usize {
        self.peak
    }

    fn integrity(&self, map: Option<MapId>, detail: String) -> ClientError {
        ClientError::Integrity { shuffle: self.shuffle, partition: self.partition, map, detail }
    }

    /// The next record in key order; `None` once every run is merged and
    /// checked. After an error (the copy being read failed) it may be
    /// called again, once [`KeyMerge::resume`] gave it another stream.
    pub(crate) async fn next(&mut self) -> Result<Option<Record>, ClientError> {
        while self.started < self.runs.len() {
            self.push_head(self.started).await?;
            self.started += 1;
        }
        let Some(&Reverse((_, _, i, _))) = self.heads.peek() else {
            if !self.finished {
                self.check_end()?;
                self.send.finish();
                self.finished = true;
            }
            return Ok(None);
        };
        let successor = self.next_of(i).await?;
        Ok(Some(self.take_top(i, successor)))
    }

    /// The next record in key order when it can be had without waiting:
    /// every run started and the smallest head's run has its next record at
    /// hand (or has none left). `None` when [`KeyMerge::next`] must wait
    /// for a chunk or the merge is at its end; nothing changes then that
    /// `next` would not have changed. Most records come this way, without
    /// the nested futures of the waiting path.
    pub(crate) fn next_at_hand(&mut self) -> Result<Option<Record>, ClientError> {
        if self.started < self.runs.len() {
            return Ok(None);
        }
        let Some(&Reverse((_, _, i, _))) = self.heads.peek() else { return Ok(None) };
        let successor = match self.next_buffered_of(i)? {
            Buffered::Record(r) => Some(r),
            Buffered::RunDone => None,
            Buffered::NeedsFetch => return Ok(None),
        };
        Ok(Some(self.take_top(i, successor)))
    }

    /// Takes the smallest head, run `i`'s, out of the heap and puts that
    /// run's `successor` in its place. The head stays in the heap until its
    /// successor is at hand (a fetch that fails leaves both where they
    /// were); the successor replaces it with one sift instead of a pop and
    /// a push.
    fn take_top(&mut self, i: usize, successor: Option<Record>) -> Record {
        let Reverse((_, key, _, value)) = match successor {
            Some(r) => {
                let mut top = self.heads.peek_mut().expect("the caller saw run i's head at the top");
                std::mem::replace(&mut *top, Reverse((key_prefix(&r.key), r.key, i, r.value)))
            }
            None => self.heads.pop().expect("the caller saw run i's head at the top"),
        };
        Record { key, value }
    }

    /// Puts run `i`'s next record, if it has one, into the heap.
    async fn push_head(&mut self, i: usize) -> Result<(), ClientError> {
        if let Some(r) = self.next_of(i).await? {
            self.heads.push(Reverse((key_prefix(&r.key), r.key, i, r.value)));
        }
        Ok(())
    }

    /// Goes on with the read on another stream, at another copy of the
    /// partition (its `PartitionOpened` read, its `RunIndex` not yet): the
    /// copy must list the same runs and commits as the one before, and is
    /// asked only for the chunks not received yet.
    pub(crate) async fn resume(&mut self, send: StreamSend, mut stream: FrameReader) -> Result<(), ClientError> {
        let (runs, maps) = match stream.response().await? {
            Response::RunIndex { runs, maps } => (runs, maps),
            other => return Err(ClientError::Protocol(format!("expected RunIndex, got {other:?}"))),
        };
        let same_runs = runs.len() == self.runs.len() && runs.iter().zip(&self.runs).all(|(r, c)| *r == c.info);
        if !same_runs || maps != self.maps {
            return Err(self.integrity(
                None,
                format!(
                    "the copy read after a failure lists {} runs of {} maps; the copy read before listed {} runs \
                     of {} maps, or other runs or commits",
                    runs.len(),
                    maps.len(),
                    self.runs.len(),
                    self.maps.len()
                ),
            ));
        }
        self.send = send;
        self.stream = stream;
        // File numbers are the stream's own.
        self.files.clear();
        Ok(())
    }

    /// The next record of run `i`, fetching its next chunk when its blocks are used up.
    async fn next_of(&mut self, i: usize) -> Result<Option<Record>, ClientError> {
        loop {
            match self.next_buffered_of(i)? {
                Buffered::Record(r) => return Ok(Some(r)),
                Buffered::RunDone => return Ok(None),
                Buffered::NeedsFetch => self.fetch(i).await?,
            }
        }
    }

    /// The next record of run `i` from the blocks it holds. Asking again
    /// after `NeedsFetch` (before a fetch) answers the same.
    fn next_buffered_of(&mut self, i: usize) -> Result<Buffered, ClientError> {
        loop {
            let run = &mut self.runs[i];
            if run.offset < run.current.len() {
                let mut records = RecordIter::new(&run.current[run.offset..]);
                // Blocks were checked on receipt, so their records parse.
                let Some(Ok((key, value))) = records.next() else {
                    return Err(ClientError::Protocol("a checked block failed to parse".into()));
                };
                let record = Record { key: run.current.slice_ref(key), value: run.current.slice_ref(value) };
                run.offset = run.current.len() - records.remaining_bytes();
                // This run's next record is read when this one has left the
                // heap, many records later: by then the block's lines are out
                // of the caches, so ask for (up to two lines of) it now.
                let rest = &run.current[run.offset..];
                prefetch(&rest[..rest.len().min(NEXT_RECORD_PREFETCH)]);
                return Ok(Buffered::Record(record));
            }
            self.held -= run.current.len();
            run.current = Bytes::new();
            run.offset = 0;
            if let Some(block) = run.blocks.pop_front() {
                run.current = block;
                continue;
            }
            return Ok(if run.received == run.info.blocks { Buffered::RunDone } else { Buffered::NeedsFetch });
        }
    }

    /// Asks for the next chunk of run `i` and receives it.
    async fn fetch(&mut self, i: usize) -> Result<(), ClientError> {
        let run = &self.runs[i];
        // Ask for what leaves room for the one block the server may send
        // past the mark, in stored bytes (blocks may expand when decompressed).
        let expansion = if run.stored_bytes == 0 { 1.0 } else { run.raw_bytes as f64 / run.stored_bytes as f64 };
        let room = self.chunk_bytes.saturating_sub(MERGE_BLOCK_BYTES);
        let max_bytes = ((room as f64 / expansion.max(1.0)) as u32).max(1);
        let request = Request::ReadRun { run: i as u32, from: run.received, max_bytes };
        match self.send.write_chunks(&mut [request_frame(&request)?]).await {
            Ok(()) => {}
            // The server ended the stream: its reason follows on our side.
            Err(SendError::Stopped) => {
                return Err(self
                    .stream
                    .response()
                    .await
                    .err()
                    .unwrap_or_else(|| ClientError::ConnectionLost("the server stopped a key-ordered read".into())));
            }
            Err(SendError::Lost(e)) => return Err(e),
        }
        let mut blocks = 0u32;
        loop {
            match self.stream.next_frame().await? {
                Some(Frame { kind: FrameKind::Block, payload }) => {
                    self.accept(i, payload)?;
                    blocks += 1;
                }
                Some(Frame { kind: FrameKind::Response, payload }) => {
                    match Response::decode(&payload).map_err(|e| ClientError::Protocol(e.to_string()))? {
                        Response::RunChunkEnd { run, blocks: n } if run as usize == i && n == blocks && n > 0 => {
                            return Ok(());
                        }
                        Response::RunChunkEnd { run, blocks: n } => {
                            return Err(ClientError::Protocol(format!(
                                "RunChunkEnd for run {run} with {n} blocks; asked for run {i}, received {blocks}"
                            )));
                        }
                        Response::Error(e) => return Err(ClientError::Server(e)),
                        Response::FileOpened { file } => {
                            let fd = self.stream.take_fd().ok_or_else(|| {
                                ClientError::Protocol(format!("FileOpened {file} came without a file descriptor"))
                            })?;
                            self.files.insert(file, Arc::new(std::fs::File::from(fd)));
                        }
                        Response::FileClosed { file } => {
                            self.files.remove(&file);
                        }
                        Response::FileRange { file, offset, len, blocks: n } => {
                            let bytes = read_range(&self.files, file, offset, len).await.map_err(|e| match e {
                                RangeError::Protocol(detail) => ClientError::Protocol(detail),
                                RangeError::Io(e) => self
                                    .integrity(None, format!("reading {len} bytes at {offset} of a shuffle file: {e}")),
                            })?;
                            for block in split_range(&bytes, n).map_err(|e| self.integrity(None, e))? {
                                self.accept(i, block)?;
                                blocks += 1;
                            }
                        }
                        other => {
                            return Err(ClientError::Protocol(format!("unexpected {other:?} on a key-ordered read")));
                        }
                    }
                }
                Some(frame) => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected {:?} frame on a key-ordered read",
                        frame.kind
                    )));
                }
                None => {
                    return Err(ClientError::ConnectionLost(format!(
                        "partition {} of shuffle {} ended in the middle of a key-ordered read",
                        self.partition, self.shuffle
                    )));
                }
            }
        }
    }

    /// Checks one block of run `i` and queues its records.
    fn accept(&mut self, i: usize, payload: Bytes) -> Result<(), ClientError> {
        let stored = payload.len();
        let (header, raw) = check_block(payload, self.partition).map_err(|(map, e)| self.integrity(map, e))?;
        let run = &mut self.runs[i];
        let info = run.info;
        let id = header.id;
        let expected = info.first_block + run.received;
        if run.received == info.blocks {
            return Err(
                self.integrity(Some(id.map), format!("run {} has more than its {} blocks", info.run, info.blocks))
            );
        }
        if (id.map, id.attempt, id.run, id.sequence) != (info.map, info.attempt, info.run, expected) {
            let detail = format!(
                "expected block {expected} of run {} of map {} attempt {}, received block {} of run {} of map {} \
                 attempt {}",
                info.run, info.map, info.attempt, id.sequence, id.run, id.map, id.attempt
            );
            return Err(self.integrity(Some(id.map), detail));
        }
        run.received += 1;
        run.blocks_seen.push((header.record_count, header.crc));
        run.raw_bytes += raw.len() as u64;
        run.stored_bytes += stored as u64;
        self.held += raw.len();
        self.peak = self.peak.max(self.held);
        run.blocks.push_back(raw);
        Ok(())
    }

    /// Checks every map's runs against what it committed to the partition.
    fn check_end(&self) -> Result<(), ClientError> {
        let mut runs = self.runs.iter().peekable();
        for (index, commit) in self.maps.iter().enumerate() {
            if commit.map as usize != index {
                return Err(self.integrity(None, format!("the run index lists map {} at position {index}", commit.map)));
            }
            let mut got = PartitionTotals::new(self.partition);
            while let Some(run) = runs.next_if(|r| r.info.map == commit.map) {
                if run.info.attempt != commit.attempt || run.info.first_block != got.blocks {
                    return Err(self.integrity(
                        Some(commit.map),
                        format!(
                            "run {} of attempt {} starts at block {}; the committed attempt {} has {} blocks \
                             before it",
                            run.info.run, run.info.attempt, run.info.first_block, commit.attempt, got.blocks
                        ),
                    ));
                }
                for &(records, crc) in &run.blocks_seen {
                    got.add_block(records, crc);
                }
            }
            let want = commit.totals;
            if got != want {
                return Err(self.integrity(
                    Some(commit.map),
                    format!(
                        "committed attempt {} declared {} blocks / {} records (checksum {:#010x}); received {} \
                         blocks / {} records (checksum {:#010x})",
                        commit.attempt, want.blocks, want.records, want.checksum, got.blocks, got.records, got.checksum
                    ),
                ));
            }
        }
        if let Some(extra) = runs.next() {
            return Err(
                self.integrity(Some(extra.info.map), "the run index names a map the shuffle does not have".into())
            );
        }
        Ok(())
    }
}
