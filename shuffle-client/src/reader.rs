//! [`PartitionReader`]: one partition's records, checked as they arrive.
//!
//! Every block's header and CRC are checked, its records decoded and counted;
//! per map, blocks must come from one attempt in sequence order. The closing
//! `PartitionEnd` lists each map's committed attempt and declared totals, and
//! what arrived must equal them exactly; any difference is an
//! [`ClientError::Integrity`] naming the shuffle, partition and map.
//!
//! A reader opens its stream on its first call: [`PartitionReader::next_block`]
//! reads the partition in the order the server sends it;
//! [`PartitionReader::next_record`] reads it in key order when the shuffle is
//! a sort shuffle with key ordering, merging the sorted runs as a stream
//! with a bounded amount of each in memory (see [`crate::merge`]), and in
//! arrival order otherwise.
//!
//! A cluster's reader reads at a worker holding the partition (the primary,
//! or the replica if it cannot) and goes on at the other copy when that
//! worker fails: in arrival order it names the blocks it has
//! (`OpenPartitionFrom`); a key-ordered read hands the other copy's stream
//! to its merge, which asks only for the chunks it lacks.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use bytes::Bytes;
use shuffle_protocol::{
    AttemptId, Block, BlockHeader, Frame, FrameKind, MapCommit, MapId, PartitionId, PartitionTotals, RecordIter,
    Request, Response, ShuffleId, ShuffleSpec,
};

use crate::{
    ClientError,
    merge::KeyMerge,
    transport::{FrameReader, Link, open_request},
};

/// Largest file range a direct read accepts: the server sends ranges of at
/// most a read batch (1 MiB) plus one block; this bounds what a confused or
/// hostile server can make the reader allocate.
const MAX_RANGE_LEN: u64 = 32 << 20;

/// Memory a key-ordered read may hold for its runs unless told otherwise
/// ([`PartitionReader::set_merge_memory`]), 32 MiB: as much as one writer's
/// sort buffer, so a partition of up to ~500 runs merges with a block each.
pub const DEFAULT_MERGE_MEMORY: usize = 32 << 20;

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

    /// The framed records, for callers that keep a block's bytes (a
    /// record slice taken with [`Bytes::slice_ref`] shares them).
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }
}

/// Where the reader's stream comes from, until it is opened.
enum Opener {
    /// A standalone server, on this link; `direct`: take blocks in files as
    /// files (the Unix socket).
    Server { link: Link, direct: bool },
    /// A cluster: the copy of the partition the reader's failover finds.
    Cluster,
}

/// Reads one partition of a shuffle.
pub struct PartitionReader {
    /// Set until the first call opens the stream.
    opener: Option<Opener>,
    /// The stream carrying the partition (arrival-order reads).
    reader: Option<FrameReader>,
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
    /// Key-ordered reads of a key-ordered sort shuffle: the merge of its runs.
    merge: Option<KeyMerge>,
    /// What the merge may hold.
    merge_memory: usize,
    /// Direct reads: the files the server passed, by their number in this read.
    files: HashMap<u32, Arc<std::fs::File>>,
    /// Direct reads: checked blocks read from a file range, not yet handed out.
    from_files: VecDeque<RecordBlock>,
    /// Cluster reads: how to resume at another copy if this one fails.
    failover: Option<Box<crate::cluster::Failover>>,
}

impl PartitionReader {
    /// A reader of `partition` that opens its stream on `link` on its first call.
    pub(crate) fn new(link: Link, direct: bool, shuffle: ShuffleId, partition: PartitionId) -> Self {
        Self { opener: Some(Opener::Server { link, direct }), ..Self::new_unopened(shuffle, partition) }
    }

    /// A cluster reader: reads the stream a worker already opened (its
    /// `PartitionOpened` not read yet), or without one opens it on its
    /// first call, and moves to another copy of the partition when the one
    /// it reads fails, asking for only the blocks it does not have yet (a
    /// key-ordered read: the chunks of runs it does not have yet).
    pub(crate) fn with_failover(
        reader: Option<FrameReader>,
        failover: Box<crate::cluster::Failover>,
        shuffle: ShuffleId,
        partition: PartitionId,
    ) -> Self {
        let mut this = Self::new_unopened(shuffle, partition);
        this.opener = reader.is_none().then_some(Opener::Cluster);
        this.reader = reader;
        this.failover = Some(failover);
        this
    }

    fn new_unopened(shuffle: ShuffleId, partition: PartitionId) -> Self {
        Self {
            opener: None,
            reader: None,
            files: HashMap::new(),
            from_files: VecDeque::new(),
            shuffle,
            partition,
            received: HashMap::new(),
            current: None,
            finished: false,
            spec: None,
            merge: None,
            merge_memory: DEFAULT_MERGE_MEMORY,
            failover: None,
        }
    }

    /// What this reader has of each attempt, for a read resumed at another copy.
    fn resume_points(&self) -> Vec<shuffle_protocol::ResumePoint> {
        self.received
            .iter()
            .map(|((map, attempt), t)| shuffle_protocol::ResumePoint { map: *map, attempt: *attempt, blocks: t.blocks })
            .collect()
    }

    /// Bounds what a key-ordered read holds of the partition's runs at once
    /// (default [`DEFAULT_MERGE_MEMORY`]); set it before the first call.
    /// The merge asks the server for chunks of `bytes / runs` of each run,
    /// and fails with [`ClientError::MergeMemory`] if that is less than one
    /// block of 64 KiB per run.
    pub fn set_merge_memory(&mut self, bytes: usize) {
        self.merge_memory = bytes;
    }

    /// The most bytes of blocks the key-ordered merge held at once (0 for other reads).
    pub fn peak_merge_bytes(&self) -> usize {
        self.merge.as_ref().map_or(0, KeyMerge::peak_bytes)
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

    /// Opens the stream on the first call: a key-ordered read asks for the
    /// runs (`OpenPartitionByKey`), any other the partition as it comes.
    async fn open(&mut self, by_key: bool) -> Result<(), ClientError> {
        let (link, direct) = match self.opener.take() {
            None => return Ok(()),
            Some(Opener::Server { link, direct }) => (link, direct),
            Some(Opener::Cluster) if by_key => return self.attach_by_key().await,
            Some(Opener::Cluster) => {
                let failover = self.failover.as_mut().expect("a cluster reader has its failover");
                // Its PartitionOpened is read with the first block.
                self.reader = Some(failover.open(Vec::new()).await?);
                return Ok(());
            }
        };
        let (shuffle, partition) = (self.shuffle, self.partition);
        let request = match (by_key, direct) {
            (true, _) => Request::OpenPartitionByKey { shuffle, partition, direct },
            (false, true) => Request::OpenPartitionDirect { shuffle, partition },
            (false, false) => Request::OpenPartition { shuffle, partition },
        };
        // A key-ordered read keeps its side open to ask for chunks.
        let (send, mut reader) = open_request(&link, &request, !by_key).await?;
        if direct {
            // Nothing was read from the stream yet: every descriptor the server passes is kept.
            reader.receive_files();
        }
        let spec = self.partition_opened(&mut reader).await?;
        if by_key && spec.mode == shuffle_protocol::ExchangeMode::Sort && spec.key_ordering {
            self.merge = Some(KeyMerge::open(send, reader, (shuffle, partition), self.merge_memory).await?);
        } else {
            // Nothing more to ask: end our side (plain reads ended it with the request).
            let mut send = send;
            send.finish();
            self.reader = Some(reader);
        }
        Ok(())
    }

    /// The next block of records, in the order the server sends them;
    /// `None` once the partition is complete and checked. (Key order is
    /// [`PartitionReader::next_record`]'s; a reader that started with it
    /// merges runs and has no blocks to give.)
    pub async fn next_block(&mut self) -> Result<Option<RecordBlock>, ClientError> {
        self.open(false).await?;
        if self.merge.is_some() {
            return Err(ClientError::Options("a key-ordered read yields records, not blocks".into()));
        }
        loop {
            match self.next_block_once().await {
                Err(e)
                    if !self.finished && self.failover.is_some() && crate::cluster::Failover::should_fail_over(&e) =>
                {
                    tracing::info!(shuffle = %self.shuffle, partition = self.partition, error = %e,
                        "the copy being read failed; resuming at another copy");
                    let resume = self.resume_points();
                    let failover = self.failover.as_mut().expect("checked above");
                    failover.failed(&e).await;
                    self.reader = Some(failover.open(resume).await?);
                    // The new stream opens with its own PartitionOpened and file numbers.
                    self.spec = None;
                    self.files.clear();
                    self.from_files.clear();
                }
                other => return other,
            }
        }
    }

    async fn next_block_once(&mut self) -> Result<Option<RecordBlock>, ClientError> {
        if !self.finished {
            self.read_partition_opened().await?;
        }
        loop {
            if let Some(block) = self.from_files.pop_front() {
                return Ok(Some(block));
            }
            if self.finished {
                return Ok(None);
            }
            let reader = self.reader.as_mut().expect("opened above");
            match reader.next_frame().await? {
                Some(Frame { kind: FrameKind::Block, payload }) => return self.accept_block(payload).map(Some),
                Some(Frame { kind: FrameKind::Response, payload }) => {
                    match Response::decode(&payload).map_err(|e| ClientError::Protocol(e.to_string()))? {
                        Response::PartitionEnd { partition, maps } if partition == self.partition => {
                            self.check_end(&maps)?;
                            self.finished = true;
                        }
                        Response::Error(e) => return Err(ClientError::Server(e)),
                        Response::PartitionLost { partition, maps } => {
                            self.finished = true;
                            return Err(ClientError::PartitionLost { shuffle: self.shuffle, partition, maps });
                        }
                        Response::ProducerFailed { map, attempt, rereadable } => {
                            self.finished = true;
                            return Err(ClientError::ProducerFailed { map, attempt, rereadable });
                        }
                        Response::FileOpened { file } => {
                            let fd = reader.take_fd().ok_or_else(|| {
                                ClientError::Protocol(format!("FileOpened {file} came without a file descriptor"))
                            })?;
                            self.files.insert(file, Arc::new(std::fs::File::from(fd)));
                        }
                        Response::FileClosed { file } => {
                            self.files.remove(&file);
                        }
                        Response::FileRange { file, offset, len, blocks } => {
                            let bytes = read_range(&self.files, file, offset, len)
                                .await
                                .map_err(|e| self.range_error(e, offset, len))?;
                            for block in split_range(&bytes, blocks).map_err(|e| self.integrity(None, e))? {
                                let block = self.accept_block(block)?;
                                self.from_files.push_back(block);
                            }
                        }
                        other => {
                            return Err(ClientError::Protocol(format!("unexpected {other:?} on a partition stream")));
                        }
                    }
                }
                Some(frame) => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected {:?} frame on a partition stream",
                        frame.kind
                    )));
                }
                None => {
                    return Err(ClientError::ConnectionLost(format!(
                        "partition {} of shuffle {} ended before PartitionEnd",
                        self.partition, self.shuffle
                    )));
                }
            }
        }
    }

    /// Reads a cluster stream's `PartitionOpened` (it comes first) if it has not been read.
    async fn read_partition_opened(&mut self) -> Result<(), ClientError> {
        if self.spec.is_none() {
            let mut reader = self.reader.take().expect("a cluster reader has its stream");
            let opened = self.partition_opened(&mut reader).await;
            self.reader = Some(reader);
            opened?;
        }
        Ok(())
    }

    /// Reads the `PartitionOpened` that starts a stream and keeps its spec.
    /// A worker whose group lost maps with every copy answers
    /// `PartitionLost` instead.
    async fn partition_opened(&mut self, reader: &mut FrameReader) -> Result<ShuffleSpec, ClientError> {
        match reader.response().await? {
            Response::PartitionOpened { spec } => {
                self.spec = Some(spec);
                Ok(spec)
            }
            Response::PartitionLost { partition, maps } => {
                Err(ClientError::PartitionLost { shuffle: self.shuffle, partition, maps })
            }
            other => Err(ClientError::Protocol(format!("expected PartitionOpened, got {other:?}"))),
        }
    }

    /// A cluster's key-ordered read: opens the read by key at a copy of the
    /// partition and hands the stream to the merge — a new merge on the
    /// first call; after the copy being read failed, the merge so far,
    /// which asks the new copy for the chunks it does not have yet. Both
    /// copies hold the same committed blocks, so the runs are the same and
    /// the merge goes on without a gap or a repeat (it checks that the new
    /// copy lists the same runs). A copy that fails before the merge has its
    /// stream is left for the next.
    async fn attach_by_key(&mut self) -> Result<(), ClientError> {
        let (shuffle, partition) = (self.shuffle, self.partition);
        loop {
            let failover = self.failover.as_mut().expect("a cluster reader has its failover");
            let (send, mut stream) = failover.open_by_key().await?;
            let attached = match self.partition_opened(&mut stream).await {
                Err(e) => Err(e),
                Ok(spec) if !(spec.mode == shuffle_protocol::ExchangeMode::Sort && spec.key_ordering) => {
                    Err(ClientError::Protocol(format!(
                        "the placement of shuffle {shuffle} is of a key-ordered sort shuffle; its copy of partition \
                         {partition} is of {spec:?}"
                    )))
                }
                Ok(_) => match &mut self.merge {
                    Some(merge) => merge.resume(send, stream).await,
                    None => KeyMerge::open(send, stream, (shuffle, partition), self.merge_memory)
                        .await
                        .map(|merge| self.merge = Some(merge)),
                },
            };
            match attached {
                Err(e) if crate::cluster::Failover::should_fail_over(&e) => {
                    tracing::info!(%shuffle, partition, error = %e, "a copy failed opening a key-ordered read; trying another");
                    self.failover.as_mut().expect("a cluster reader has its failover").failed(&e).await;
                }
                other => return other,
            }
        }
    }

    fn range_error(&self, e: RangeError, offset: u64, len: u64) -> ClientError {
        match e {
            RangeError::Protocol(detail) => ClientError::Protocol(detail),
            RangeError::Io(e) => {
                self.integrity(None, format!("reading {len} bytes at {offset} of a shuffle file: {e}"))
            }
        }
    }

    /// Checks one block and returns its records.
    fn accept_block(&mut self, payload: Bytes) -> Result<RecordBlock, ClientError> {
        let (header, raw) = check_block(payload, self.partition).map_err(|(map, e)| self.integrity(map, e))?;
        let map = header.id.map;
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

    /// The next record — in key order for a key-ordered sort shuffle (see
    /// [`crate::merge`] for the order of equal keys) —; `None` once the
    /// partition is complete and checked.
    pub async fn next_record(&mut self) -> Result<Option<Record>, ClientError> {
        // Most records of a key-ordered read are at hand. An error here
        // recurs on the path below, which knows whether to fail over.
        if let Some(merge) = &mut self.merge
            && let Ok(Some(record)) = merge.next_at_hand()
        {
            return Ok(Some(record));
        }
        self.open(true).await?;
        if self.merge.is_some() {
            return self.next_merged().await;
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

    /// The merge's next record; a cluster's merge whose copy fails goes on
    /// at another copy where it was.
    async fn next_merged(&mut self) -> Result<Option<Record>, ClientError> {
        loop {
            let merge = self.merge.as_mut().expect("a key-ordered read has its merge");
            match merge.next().await {
                Err(e) if self.failover.is_some() && crate::cluster::Failover::should_fail_over(&e) => {
                    tracing::info!(shuffle = %self.shuffle, partition = self.partition, error = %e,
                        "the copy being read by key failed; going on at another copy");
                    self.failover.as_mut().expect("checked above").failed(&e).await;
                    self.attach_by_key().await?;
                }
                other => return other,
            }
        }
    }
}

/// Parses and checks one block of `partition`: its header, its CRC, its
/// records. The error names the block's map when the header could be read.
pub(crate) fn check_block(
    payload: Bytes,
    partition: PartitionId,
) -> Result<(BlockHeader, Bytes), (Option<MapId>, String)> {
    let block = Block::parse(payload).map_err(|e| (None, e.to_string()))?;
    let header = block.header;
    let map = header.id.map;
    if header.id.partition != partition {
        return Err((Some(map), format!("received a block of partition {}", header.id.partition)));
    }
    let raw = block.into_records().map_err(|e| (Some(map), e.to_string()))?;
    Ok((header, raw))
}

/// Why a direct read of a file range failed.
pub(crate) enum RangeError {
    /// The server named a file it never passed, or a range over the limit.
    Protocol(String),
    /// Reading the file failed or it ended before the range.
    Io(std::io::Error),
}

/// Direct reads: reads `len` bytes at `offset` of file `file` (a page cache
/// read, no copy through the server).
pub(crate) async fn read_range(
    files: &HashMap<u32, Arc<std::fs::File>>,
    file: u32,
    offset: u64,
    len: u64,
) -> Result<Bytes, RangeError> {
    let handle = files
        .get(&file)
        .cloned()
        .ok_or_else(|| RangeError::Protocol(format!("FileRange names file {file}, which was never opened")))?;
    if len > MAX_RANGE_LEN {
        return Err(RangeError::Protocol(format!("a FileRange of {len} bytes is over the limit of {MAX_RANGE_LEN}")));
    }
    tokio::task::spawn_blocking(move || {
        // Not zeroed first: the kernel writes every byte the buffer holds.
        let mut buf = Vec::with_capacity(len as usize);
        while buf.len() < len as usize {
            let at = offset + buf.len() as u64;
            let n = rustix::io::pread(&*handle, rustix::buffer::spare_capacity(&mut buf), at)?;
            if n == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file ends before the range"));
            }
        }
        buf.truncate(len as usize);
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(|e| RangeError::Io(std::io::Error::other(format!("reading a shuffle file: {e}"))))?
    .map_err(RangeError::Io)
}

/// Cuts a file range into its `blocks` whole blocks, by their headers.
pub(crate) fn split_range(bytes: &Bytes, blocks: u32) -> Result<Vec<Bytes>, String> {
    let mut out = Vec::with_capacity(blocks as usize);
    let mut at = 0;
    for _ in 0..blocks {
        let header = BlockHeader::decode(&bytes[at..]).map_err(|e| e.to_string())?;
        let end = at + shuffle_protocol::BLOCK_HEADER_LEN + header.stored_len as usize;
        if end > bytes.len() {
            return Err(format!("a block of map {} runs past the end of its file range", header.id.map));
        }
        out.push(bytes.slice(at..end));
        at = end;
    }
    if at != bytes.len() {
        return Err(format!("{} bytes of a file range hold no block", bytes.len() - at));
    }
    Ok(out)
}
