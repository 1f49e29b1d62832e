//! [`PartitionReader`]: one partition's records, checked as they arrive.
//!
//! Every block's header and CRC are checked, its records decoded and counted;
//! per map, blocks must come from one attempt in sequence order. The closing
//! `PartitionEnd` lists each map's committed attempt and declared totals, and
//! what arrived must equal them exactly; any difference is an
//! [`ClientError::Integrity`] naming the shuffle, partition and map.
//!
//! For a sort shuffle with key ordering, [`PartitionReader::next_record`]
//! yields the partition's records in key order: it receives and checks every
//! block first, then k-way merges the sorted runs (one per writer run of every
//! map). That holds the partition's records in memory while it is read.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap, VecDeque},
    sync::Arc,
};

/// Largest file range a direct read accepts: the server sends ranges of at
/// most a read batch (1 MiB) plus one block; this bounds what a confused or
/// hostile server can make the reader allocate.
const MAX_RANGE_LEN: u64 = 32 << 20;

use bytes::Bytes;
use shuffle_protocol::{
    AttemptId, Block, Frame, FrameKind, MapCommit, MapId, PartitionId, PartitionTotals, RecordIter, Response,
    ShuffleId, ShuffleSpec, key_prefix,
};

use crate::{ClientError, transport::FrameReader};

/// One record: key and value share the buffer of the block they came in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub key: Bytes,
    pub value: Bytes,
}

/// The checked, decompressed records of one block.
#[derive(Clone, Debug)]
pub struct RecordBlock {
    /// Framed records, already validated.
    raw: Bytes,
    /// Number of records.
    count: u32,
    /// The map that wrote the block.
    map: MapId,
    /// The writer's run the block belongs to (sort mode).
    run: u32,
}

impl RecordBlock {
    /// Number of records in the block.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the block holds no records.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The map task that wrote this block.
    pub fn map(&self) -> MapId {
        self.map
    }

    /// The writer's run this block belongs to (sort mode; 0 in hash mode).
    pub fn run(&self) -> u32 {
        self.run
    }

    /// The records as `(key, value)` slices.
    pub fn records(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        // The reader validated every record of the block before handing it
        // out (`Block::into_records`), so the iterator yields no error.
        RecordIter::new(&self.raw).map_while(Result::ok)
    }
}

/// Reads one partition of a shuffle.
pub struct PartitionReader {
    /// The stream carrying the partition.
    reader: FrameReader,
    shuffle: ShuffleId,
    partition: PartitionId,
    /// Per (map, attempt): the totals of its blocks so far. Outside hybrid
    /// mode a map's blocks must all come from one attempt.
    received: HashMap<(MapId, AttemptId), PartitionTotals>,
    /// The block `next_record` is taking records from, and the offset reached.
    current: Option<(Bytes, usize)>,
    /// Set once `PartitionEnd` was received and checked.
    finished: bool,
    /// The shuffle's spec, from the server's `PartitionOpened`.
    spec: Option<ShuffleSpec>,
    /// Key-ordered reads: the merge of all runs, once every block has arrived.
    merge: Option<RunMerge>,
    /// Direct reads: the files the server passed, by their number in this read.
    files: HashMap<u32, Arc<std::fs::File>>,
    /// Direct reads: checked blocks read from a file range, not yet handed out.
    from_files: VecDeque<RecordBlock>,
    /// A cluster's reader: how to move to another copy of the partition.
    failover: Option<Box<crate::cluster::Failover>>,
}

impl PartitionReader {
    pub(crate) fn new(reader: FrameReader, shuffle: ShuffleId, partition: PartitionId) -> Self {
        Self {
            files: HashMap::new(),
            from_files: VecDeque::new(),
            reader,
            shuffle,
            partition,
            received: HashMap::new(),
            current: None,
            finished: false,
            spec: None,
            merge: None,
            failover: None,
        }
    }

    /// A reader that moves to another copy of the partition when the one
    /// it reads fails, asking for only the blocks it does not have yet.
    pub(crate) fn with_failover(mut self, failover: Box<crate::cluster::Failover>) -> Self {
        self.failover = Some(failover);
        self
    }

    /// What this reader has of each attempt, for a read resumed at another copy.
    fn resume_points(&self) -> Vec<shuffle_protocol::ResumePoint> {
        self.received
            .iter()
            .map(|((map, attempt), t)| shuffle_protocol::ResumePoint { map: *map, attempt: *attempt, blocks: t.blocks })
            .collect()
    }

    /// A cluster's reader: the id of the worker whose copy it reads now
    /// (`None` for a standalone server's reader, or while it looks for a copy).
    pub fn worker(&self) -> Option<&str> {
        self.failover.as_ref().and_then(|f| f.current())
    }

    /// The shuffle's spec, once the server has opened the partition (after the first read call).
    pub fn spec(&self) -> Option<ShuffleSpec> {
        self.spec
    }

    fn integrity(&self, map: Option<MapId>, detail: String) -> ClientError {
        ClientError::Integrity { shuffle: self.shuffle, partition: self.partition, map, detail }
    }

    /// The next block of records, in the order the server sends them (for a
    /// key-ordered shuffle use [`PartitionReader::next_record`] to get key
    /// order); `None` once the partition is complete and checked.
    pub async fn next_block(&mut self) -> Result<Option<RecordBlock>, ClientError> {
        loop {
            match self.next_block_once().await {
                Err(e)
                    if !self.finished && self.failover.is_some() && crate::cluster::Failover::should_fail_over(&e) =>
                {
                    tracing::info!(shuffle = %self.shuffle, partition = self.partition, error = %e,
                        "the copy being read failed; resuming at another copy");
                    let resume = self.resume_points();
                    let failover = self.failover.as_mut().expect("checked above");
                    self.reader = failover.open(resume).await?;
                    // The new stream opens with its own PartitionOpened and file numbers.
                    self.spec = None;
                    self.files.clear();
                }
                other => return other,
            }
        }
    }

    async fn next_block_once(&mut self) -> Result<Option<RecordBlock>, ClientError> {
        if let Some(block) = self.from_files.pop_front() {
            return Ok(Some(block));
        }
        if self.finished {
            return Ok(None);
        }
        if self.spec.is_none() {
            match self.reader.response().await? {
                Response::PartitionOpened { spec } => self.spec = Some(spec),
                other => return Err(ClientError::Protocol(format!("expected PartitionOpened, got {other:?}"))),
            }
        }
        match self.reader.next_frame().await? {
            Some(Frame { kind: FrameKind::Block, payload }) => self.accept_block(payload).map(Some),
            Some(Frame { kind: FrameKind::Response, payload }) => {
                match Response::decode(&payload).map_err(|e| ClientError::Protocol(e.to_string()))? {
                    Response::PartitionEnd { partition, maps } if partition == self.partition => {
                        self.check_end(&maps)?;
                        self.finished = true;
                        Ok(None)
                    }
                    Response::Error(e) => Err(ClientError::Server(e)),
                    Response::PartitionLost { partition, maps } => {
                        self.finished = true;
                        Err(ClientError::PartitionLost { shuffle: self.shuffle, partition, maps })
                    }
                    Response::ProducerFailed { map, attempt, rereadable } => {
                        self.finished = true;
                        Err(ClientError::ProducerFailed { map, attempt, rereadable })
                    }
                    Response::FileOpened { file } => {
                        let fd = self.reader.take_fd().ok_or_else(|| {
                            ClientError::Protocol(format!("FileOpened {file} came without a file descriptor"))
                        })?;
                        self.files.insert(file, Arc::new(std::fs::File::from(fd)));
                        Box::pin(self.next_block_once()).await
                    }
                    Response::FileRange { file, offset, len, blocks } => {
                        self.read_range(file, offset, len, blocks).await?;
                        Box::pin(self.next_block_once()).await
                    }
                    other => Err(ClientError::Protocol(format!("unexpected {other:?} on a partition stream"))),
                }
            }
            Some(frame) => {
                Err(ClientError::Protocol(format!("unexpected {:?} frame on a partition stream", frame.kind)))
            }
            None => Err(ClientError::ConnectionLost(format!(
                "partition {} of shuffle {} ended before PartitionEnd",
                self.partition, self.shuffle
            ))),
        }
    }

    /// Direct reads: reads `len` bytes at `offset` of file `file` (a page
    /// cache read, no copy through the server), and checks the `blocks`
    /// blocks in them as if they had come as frames.
    async fn read_range(&mut self, file: u32, offset: u64, len: u64, blocks: u32) -> Result<(), ClientError> {
        let handle = self
            .files
            .get(&file)
            .cloned()
            .ok_or_else(|| ClientError::Protocol(format!("FileRange names file {file}, which was never opened")))?;
        if len > MAX_RANGE_LEN {
            return Err(ClientError::Protocol(format!(
                "a FileRange of {len} bytes is over the limit of {MAX_RANGE_LEN}"
            )));
        }
        let bytes = tokio::task::spawn_blocking(move || {
            // Not zeroed first: the kernel writes every byte the buffer holds.
            let mut buf = Vec::with_capacity(len as usize);
            while buf.len() < len as usize {
                let at = offset + buf.len() as u64;
                let n = rustix::io::pread(&*handle, rustix::buffer::spare_capacity(&mut buf), at)?;
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the file ends before the range",
                    ));
                }
            }
            buf.truncate(len as usize);
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(|e| ClientError::ConnectionLost(format!("reading a shuffle file: {e}")))?
        .map_err(|e| self.integrity(None, format!("reading {len} bytes at {offset} of a shuffle file: {e}")))?;
        let mut at = 0;
        for _ in 0..blocks {
            let header =
                shuffle_protocol::BlockHeader::decode(&bytes[at..]).map_err(|e| self.integrity(None, e.to_string()))?;
            let end = at + shuffle_protocol::BLOCK_HEADER_LEN + header.stored_len as usize;
            if end > bytes.len() {
                return Err(self.integrity(Some(header.id.map), "a block runs past the end of its file range".into()));
            }
            let block = self.accept_block(bytes.slice(at..end))?;
            self.from_files.push_back(block);
            at = end;
        }
        if at != bytes.len() {
            return Err(self.integrity(None, format!("{} bytes of a file range hold no block", bytes.len() - at)));
        }
        Ok(())
    }

    /// Checks one block and returns its records.
    fn accept_block(&mut self, payload: Bytes) -> Result<RecordBlock, ClientError> {
        let block = Block::parse(payload).map_err(|e| self.integrity(None, e.to_string()))?;
        let header = block.header;
        let map = header.id.map;
        if header.id.partition != self.partition {
            return Err(self.integrity(Some(map), format!("received a block of partition {}", header.id.partition)));
        }
        let raw = block.into_records().map_err(|e| self.integrity(Some(map), e.to_string()))?;
        let attempt = header.id.attempt;
        let hybrid = self.spec.is_some_and(|s| s.mode == shuffle_protocol::ExchangeMode::Hybrid);
        if !hybrid && let Some(((_, other), _)) = self.received.iter().find(|((m, a), _)| *m == map && *a != attempt) {
            let detail = format!("received blocks of attempts {other} and {attempt}");
            return Err(self.integrity(Some(map), detail));
        }
        // Speculative hybrid attempts may both stream until one commits; the
        // server then reports the loser (`ProducerFailed`), and `check_end`
        // accepts only the committed one.
        let totals = self.received.entry((map, attempt)).or_insert_with(|| PartitionTotals::new(header.id.partition));
        if header.id.sequence != totals.blocks {
            let detail = format!("block {} arrived where block {} was expected", header.id.sequence, totals.blocks);
            return Err(self.integrity(Some(map), detail));
        }
        totals.add(&header);
        Ok(RecordBlock { raw, count: header.record_count, map, run: header.id.run })
    }

    /// Checks what arrived against what every map committed.
    fn check_end(&self, maps: &[MapCommit]) -> Result<(), ClientError> {
        for (index, commit) in maps.iter().enumerate() {
            if commit.map as usize != index {
                return Err(self.integrity(None, format!("PartitionEnd lists map {} at position {index}", commit.map)));
            }
            let got = self.received.get(&(commit.map, commit.attempt)).copied();
            let got = got.unwrap_or(PartitionTotals::new(self.partition));
            let others: Vec<AttemptId> = self
                .received
                .keys()
                .filter(|(m, a)| *m == commit.map && *a != commit.attempt)
                .map(|(_, a)| *a)
                .collect();
            let attempt = others.first().copied().unwrap_or(commit.attempt);
            let want = commit.totals;
            if !others.is_empty() || got != want {
                return Err(self.integrity(
                    Some(commit.map),
                    format!(
                        "committed attempt {} declared {} blocks / {} records (checksum {:#010x}); received \
                         {} blocks / {} records (checksum {:#010x}) from attempt {attempt}",
                        commit.attempt, want.blocks, want.records, want.checksum, got.blocks, got.records, got.checksum
                    ),
                ));
            }
        }
        if let Some((extra, _)) = self.received.keys().find(|(m, _)| *m as usize >= maps.len()) {
            return Err(self.integrity(Some(*extra), "received blocks of a map the shuffle does not have".into()));
        }
        Ok(())
    }

    /// The next record — in key order for a key-ordered sort shuffle —;
    /// `None` once the partition is complete and checked.
    pub async fn next_record(&mut self) -> Result<Option<Record>, ClientError> {
        if self.merge.is_none() && self.current.is_none() && !self.finished {
            // The first call learns the spec (and may already hold a block).
            let first = self.next_block().await?;
            if self.spec.is_some_and(|s| s.key_ordering) {
                let mut runs: HashMap<(MapId, u32), Vec<Bytes>> = HashMap::new();
                let mut block = first;
                while let Some(b) = block {
                    runs.entry((b.map, b.run)).or_default().push(b.raw);
                    block = self.next_block().await?;
                }
                self.merge = Some(RunMerge::new(runs.into_values().collect()));
            } else if let Some(b) = first {
                self.current = Some((b.raw, 0));
            }
        }
        if let Some(merge) = &mut self.merge {
            return Ok(merge.next());
        }
        loop {
            if let Some((raw, offset)) = &mut self.current {
                let mut records = RecordIter::new(&raw[*offset..]);
                if let Some(Ok((key, value))) = records.next() {
                    let record = Record { key: raw.slice_ref(key), value: raw.slice_ref(value) };
                    *offset = raw.len() - records.remaining_bytes();
                    return Ok(Some(record));
                }
                self.current = None;
            }
            match self.next_block().await? {
                Some(block) => self.current = Some((block.raw, 0)),
                None => return Ok(None),
            }
        }
    }
}

/// Reads the records of one sorted run, block after block.
struct RunCursor {
    /// Blocks not yet started.
    blocks: std::vec::IntoIter<Bytes>,
    /// The block being read and the offset reached.
    raw: Bytes,
    offset: usize,
}

impl RunCursor {
    fn next(&mut self) -> Option<Record> {
        loop {
            if self.offset < self.raw.len() {
                let mut records = RecordIter::new(&self.raw[self.offset..]);
                // Blocks were validated on receipt, so records parse.
                let (key, value) = records.next()?.ok()?;
                let record = Record { key: self.raw.slice_ref(key), value: self.raw.slice_ref(value) };
                self.offset = self.raw.len() - records.remaining_bytes();
                return Some(record);
            }
            self.raw = self.blocks.next()?;
            self.offset = 0;
        }
    }
}

/// The head record of a run in the merge, ordered by key prefix, key, then run.
type Head = Reverse<(u64, Bytes, usize, Bytes)>;

/// A k-way merge of sorted runs by key (bytewise); ties go to the lower run index.
struct RunMerge {
    cursors: Vec<RunCursor>,
    /// The head record of every run not yet exhausted.
    heads: BinaryHeap<Head>,
}

impl RunMerge {
    fn new(runs: Vec<Vec<Bytes>>) -> Self {
        let mut cursors: Vec<RunCursor> = runs
            .into_iter()
            .map(|blocks| RunCursor { blocks: blocks.into_iter(), raw: Bytes::new(), offset: 0 })
            .collect();
        let heads = cursors
            .iter_mut()
            .enumerate()
            .filter_map(|(i, c)| c.next().map(|r| Reverse((key_prefix(&r.key), r.key, i, r.value))))
            .collect();
        Self { cursors, heads }
    }

    fn next(&mut self) -> Option<Record> {
        let Reverse((_, key, i, value)) = self.heads.pop()?;
        if let Some(r) = self.cursors[i].next() {
            self.heads.push(Reverse((key_prefix(&r.key), r.key, i, r.value)));
        }
        Some(Record { key, value })
    }
}
