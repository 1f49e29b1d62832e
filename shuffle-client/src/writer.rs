//! [`MapWriter`]: the output of one map attempt, pushed as blocks on one
//! stream and ended by `MapEnd`.
//!
//! In hash mode records are buffered per partition and a partition's buffer
//! is pushed as a block when it reaches the block size (or the largest one
//! when the writer's budget is used up). In sort mode records go into one
//! bounded sort buffer; when it fills, it is sorted by partition (and by key
//! when the shuffle asks for key ordering) and emitted as a *run*: for each
//! partition in order, its blocks. Either way memory is bounded however much
//! a map writes, and sort mode allocates nothing per partition but totals.

use std::collections::BTreeMap;

use bytes::Bytes;
use shuffle_protocol::{
    AttemptId, BLOCK_HEADER_LEN, BlockId, CodecChooser, ExchangeMode, FRAME_HEADER_LEN, FrameKind, MAX_BLOCK_RAW_LEN,
    MapEnd, MapId, PartitionId, PartitionTotals, Request, Response, ShuffleId, ShuffleSpec, append_record,
    encode_block_parts, encode_frame_header, record_len,
};

use crate::{
    ClientError, ClientOptions, SortBuffer,
    cluster::ClusterSink,
    sort_buffer::PREFETCH_AHEAD,
    transport::{FrameReader, SendError, StreamSend, request_frame},
};

/// What ending a map attempt decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// This attempt is the map's output.
    Committed,
    /// Another attempt of the map committed first; this one's output is discarded.
    Refused { committed_attempt: AttemptId },
}

/// Hash mode: one buffer of framed records per partition.
struct HashBuffers {
    /// Framed records not yet pushed, per partition.
    records: Vec<Vec<u8>>,
    /// Number of records in each buffer.
    counts: Vec<u32>,
    /// Whether buffers are allocated at full block size up front (only when
    /// R such buffers fit the budget); otherwise they grow on demand.
    preallocate: bool,
}

/// Sort mode: the sort buffer and the number of the next run.
struct SortLayout {
    buffer: SortBuffer,
    run: u32,
}

/// How a writer buffers records before they become blocks.
enum Layout {
    Hash(HashBuffers),
    Sort(SortLayout),
}

/// Where a writer's blocks go.
enum Sink {
    /// One stream to one server, whose verdict at `MapEnd` decides.
    Single {
        /// The stream carrying this attempt's blocks.
        send: StreamSend,
        /// The server's side of the stream, for its verdict or error.
        reader: FrameReader,
    },
    /// A cluster: streams to the workers of the placement; the coordinator decides.
    Cluster(Box<ClusterSink>),
}

/// Writes one map attempt's records. Call [`MapWriter::finish`] to commit;
/// dropping the writer abandons the attempt, and its blocks are never read.
pub struct MapWriter {
    /// Where the blocks go.
    sink: Sink,
    shuffle: ShuffleId,
    map: MapId,
    attempt: AttemptId,
    /// The shuffle's spec, as the server reported it.
    spec: ShuffleSpec,
    /// The buffers of the shuffle's mode.
    layout: Layout,
    /// Totals of the blocks pushed so far per partition written; the
    /// sequence number of a partition's next block is its `blocks`.
    totals: BTreeMap<PartitionId, PartitionTotals>,
    /// Bytes of records held now (hash: framed records; sort: arena and entries).
    buffered: usize,
    /// The most `buffered` has been.
    peak_buffered: usize,
    /// Target block size.
    block_size: usize,
    /// Most bytes held in hash buffers.
    write_buffer: usize,
    /// Whether to try lz4 for the next block.
    codec: CodecChooser,
    /// Set once the stream failed or finished, so drop does not reset it again.
    done: bool,
    /// The client's count of pushed block bytes.
    pushed_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl MapWriter {
    pub(crate) fn new(
        send: StreamSend,
        reader: FrameReader,
        ids: (ShuffleId, MapId, AttemptId),
        spec: ShuffleSpec,
        options: &ClientOptions,
        pushed_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        Self::with_sink(Sink::Single { send, reader }, ids, spec, options, pushed_bytes)
    }

    /// A writer of a cluster's shuffle: its blocks go to the workers of the placement.
    pub(crate) fn for_cluster(
        sink: ClusterSink,
        ids: (ShuffleId, MapId, AttemptId),
        spec: ShuffleSpec,
        options: &ClientOptions,
        pushed_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        Self::with_sink(Sink::Cluster(Box::new(sink)), ids, spec, options, pushed_bytes)
    }

    fn with_sink(
        sink: Sink,
        (shuffle, map, attempt): (ShuffleId, MapId, AttemptId),
        spec: ShuffleSpec,
        options: &ClientOptions,
        pushed_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        let block_size = options.block_size.clamp(1024, MAX_BLOCK_RAW_LEN);
        let write_buffer = options.write_buffer.max(block_size);
        let layout = match spec.mode {
            ExchangeMode::Hash | ExchangeMode::Hybrid => Layout::Hash(HashBuffers {
                records: (0..spec.partitions).map(|_| Vec::new()).collect(),
                counts: vec![0; spec.partitions as usize],
                preallocate: (spec.partitions as usize).saturating_mul(block_size) <= write_buffer,
            }),
            ExchangeMode::Sort => {
                Layout::Sort(SortLayout { buffer: SortBuffer::new(options.sort_buffer, spec.key_ordering), run: 0 })
            }
        };
        Self {
            sink,
            shuffle,
            map,
            attempt,
            spec,
            layout,
            totals: BTreeMap::new(),
            buffered: 0,
            peak_buffered: 0,
            block_size,
            write_buffer,
            codec: CodecChooser::new(spec.codec),
            done: false,
            pushed_bytes,
        }
    }

    /// Bytes of records buffered now (bounded by the write or sort buffer size).
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// The most bytes this writer has buffered at once.
    pub fn peak_buffered_bytes(&self) -> usize {
        self.peak_buffered
    }

    /// Sort mode: the number of runs emitted so far.
    pub fn runs(&self) -> u32 {
        match &self.layout {
            Layout::Sort(s) => s.run,
            Layout::Hash(_) => 0,
        }
    }

    /// Adds one record to `partition`. Pushes blocks as buffers fill; waits
    /// while the server applies backpressure.
    pub async fn write(&mut self, partition: PartitionId, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        let len = record_len(key.len(), value.len());
        if len > MAX_BLOCK_RAW_LEN {
            return Err(ClientError::RecordTooLarge { len, max: MAX_BLOCK_RAW_LEN });
        }
        if partition >= self.spec.partitions {
            return Err(ClientError::PartitionOutOfRange {
                shuffle: self.shuffle,
                partition,
                partitions: self.spec.partitions,
            });
        }
        match &mut self.layout {
            Layout::Hash(h) => {
                let p = partition as usize;
                if !h.records[p].is_empty() && h.records[p].len() + len > self.block_size {
                    self.push_partition(partition).await?;
                }
                let Layout::Hash(h) = &mut self.layout else { unreachable!() };
                append_record(&mut h.records[p], key, value);
                h.counts[p] += 1;
                self.buffered += len;
                self.peak_buffered = self.peak_buffered.max(self.buffered);
                if h.records[p].len() >= self.block_size {
                    self.push_partition(partition).await?;
                }
                while self.buffered > self.write_buffer {
                    let Layout::Hash(h) = &self.layout else { unreachable!() };
                    let largest = (0..h.records.len()).max_by_key(|&p| h.records[p].len()).unwrap_or(0);
                    self.push_partition(largest as PartitionId).await?;
                }
            }
            Layout::Sort(s) => {
                if !s.buffer.fits(key.len(), value.len()) {
                    self.emit_run().await?;
                }
                let Layout::Sort(s) = &mut self.layout else { unreachable!() };
                s.buffer.push(partition, key, value);
                self.buffered = s.buffer.used();
                self.peak_buffered = self.peak_buffered.max(self.buffered);
            }
        }
        Ok(())
    }

    /// Hash mode: pushes `partition`'s buffer as a block.
    async fn push_partition(&mut self, partition: PartitionId) -> Result<(), ClientError> {
        let Layout::Hash(h) = &mut self.layout else { return Ok(()) };
        let p = partition as usize;
        if h.counts[p] == 0 {
            return Ok(());
        }
        self.buffered -= h.records[p].len();
        // The buffer becomes the block's payload when stored raw, so the next
        // records go to a fresh allocation of the usual size.
        let capacity = if h.preallocate { self.block_size + self.block_size / 8 } else { 0 };
        let records = std::mem::replace(&mut h.records[p], Vec::with_capacity(capacity));
        let count = std::mem::take(&mut h.counts[p]);
        self.push_block(partition, 0, records, count).await
    }

    /// Sort mode: sorts the buffer and pushes it as one run.
    async fn emit_run(&mut self) -> Result<(), ClientError> {
        let Layout::Sort(s) = &mut self.layout else { return Ok(()) };
        if s.buffer.is_empty() {
            return Ok(());
        }
        s.buffer.sort();
        let run = s.run;
        let empty = s.buffer.empty_like();
        let sorted = std::mem::replace(&mut s.buffer, empty);
        let mut block = Vec::with_capacity(self.block_size + self.block_size / 8);
        let mut count = 0u32;
        for i in 0..sorted.len() {
            sorted.prefetch(i + PREFETCH_AHEAD);
            let (partition, k, v) = sorted.record(i);
            if count > 0 && block.len() + record_len(k.len(), v.len()) > self.block_size {
                let full = std::mem::replace(&mut block, Vec::with_capacity(self.block_size + self.block_size / 8));
                self.push_block(partition, run, full, std::mem::take(&mut count)).await?;
            }
            append_record(&mut block, k, v);
            count += 1;
            if i + 1 == sorted.len() || sorted.record(i + 1).0 != partition {
                let full = std::mem::replace(&mut block, Vec::with_capacity(self.block_size + self.block_size / 8));
                self.push_block(partition, run, full, std::mem::take(&mut count)).await?;
            }
        }
        let Layout::Sort(s) = &mut self.layout else { unreachable!() };
        // Keep the allocations for the next run.
        s.buffer = sorted;
        s.buffer.clear();
        s.run += 1;
        self.buffered = 0;
        Ok(())
    }

    /// Encodes framed `records` as the partition's next block and sends it.
    async fn push_block(
        &mut self,
        partition: PartitionId,
        run: u32,
        records: Vec<u8>,
        count: u32,
    ) -> Result<(), ClientError> {
        if let Sink::Cluster(sink) = &self.sink
            && !sink.wants(partition)
        {
            // A re-run after a loss: this partition keeps the committed attempt's blocks.
            return Ok(());
        }
        let totals = self.totals.entry(partition).or_insert_with(|| PartitionTotals::new(partition));
        let id = BlockId { map: self.map, attempt: self.attempt, partition, run, sequence: totals.blocks };
        let tried = self.codec.choose();
        let block = encode_block_parts(id, records, count, tried);
        self.codec.observe(tried, &block.header);
        totals.add(&block.header);
        let mut head = Vec::with_capacity(FRAME_HEADER_LEN + BLOCK_HEADER_LEN);
        let frame_header =
            encode_frame_header(FrameKind::Block, block.len()).map_err(|e| ClientError::Protocol(e.to_string()))?;
        head.extend_from_slice(&frame_header);
        head.extend_from_slice(&block.header_bytes);
        let len = block.len() as u64;
        match &mut self.sink {
            Sink::Single { .. } => self.send_chunks(&mut [Bytes::from(head), block.payload]).await?,
            Sink::Cluster(sink) => {
                if let Err(e) = sink.send(partition, [Bytes::from(head), block.payload]).await {
                    self.done = true;
                    return Err(e);
                }
            }
        }
        self.pushed_bytes.fetch_add(len, std::sync::atomic::Ordering::AcqRel);
        Ok(())
    }

    /// Sends chunks on the single stream; if the server stopped it, returns the error it sent.
    async fn send_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), ClientError> {
        let Sink::Single { send, reader } = &mut self.sink else {
            return Err(ClientError::Protocol("a cluster writer has no single stream".into()));
        };
        match send.write_chunks(chunks).await {
            Ok(()) => Ok(()),
            Err(SendError::Stopped) => {
                self.done = true;
                Err(match reader.response().await {
                    Err(e) => e,
                    Ok(other) => ClientError::Protocol(format!("server stopped the push stream after {other:?}")),
                })
            }
            Err(SendError::Lost(e)) => {
                self.done = true;
                Err(e)
            }
        }
    }

    /// Pushes every partly filled buffer now (hash and hybrid mode), so that
    /// pipelined readers see records without waiting for a full block; sort
    /// mode emits its buffer as a run. Streaming producers call this to bound latency.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        match &self.layout {
            Layout::Hash(_) => {
                for partition in 0..self.spec.partitions {
                    self.push_partition(partition).await?;
                }
                Ok(())
            }
            Layout::Sort(_) => self.emit_run().await,
        }
    }

    /// Pushes what is buffered, sends `MapEnd` with the totals of every
    /// partition written, and returns the server's commit decision.
    pub async fn finish(mut self) -> Result<CommitOutcome, ClientError> {
        self.flush().await?;
        if let Sink::Cluster(sink) = &mut self.sink {
            let outcome = sink.finish(&self.totals).await;
            // On failure, dropping the writer abandons the streams not yet prepared.
            self.done = outcome.is_ok();
            return outcome;
        }
        let partitions = self.totals.values().copied().collect();
        let end = Request::MapEnd(MapEnd { map: self.map, attempt: self.attempt, partitions });
        self.send_chunks(&mut [request_frame(&end)?]).await?;
        self.done = true;
        let Sink::Single { send, reader } = &mut self.sink else { unreachable!("cluster sinks returned above") };
        send.finish();
        match reader.response().await? {
            Response::Committed { .. } => Ok(CommitOutcome::Committed),
            Response::AttemptRefused { committed_attempt, .. } => Ok(CommitOutcome::Refused { committed_attempt }),
            other => Err(ClientError::Protocol(format!("expected a commit decision, got {other:?}"))),
        }
    }

    /// Abandons the attempt: the server discards what it pushed.
    pub fn abort(mut self) {
        self.reset();
    }

    fn reset(&mut self) {
        if !self.done {
            self.done = true;
            match &mut self.sink {
                Sink::Single { send, .. } => send.reset(),
                Sink::Cluster(sink) => sink.abort(),
            }
        }
    }
}

impl Drop for MapWriter {
    fn drop(&mut self) {
        self.reset();
    }
}
