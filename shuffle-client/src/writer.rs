//! [`MapWriter`]: the output of one map attempt, buffered per partition and
//! pushed as blocks on one stream, ended by `MapEnd`.

use bytes::Bytes;
use shuffle_protocol::{
    AttemptId, BLOCK_HEADER_LEN, BlockId, CodecChooser, FRAME_HEADER_LEN, FrameKind,
    MAX_BLOCK_RAW_LEN, MapEnd, MapId, PartitionId, PartitionTotals, Request, Response, ShuffleId,
    ShuffleSpec, append_record, encode_block_parts, encode_frame_header, record_len,
};

use crate::{
    ClientError, ClientOptions,
    transport::{FrameReader, request_frame, write_error},
};

/// What ending a map attempt decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    /// This attempt is the map's output.
    Committed,
    /// Another attempt of the map committed first; this one's output is discarded.
    Refused { committed_attempt: AttemptId },
}

/// One partition's pending records and what was pushed for it so far.
#[derive(Default)]
struct PartitionBuffer {
    /// Framed records not yet pushed.
    records: Vec<u8>,
    /// Number of records in `records`.
    count: u32,
    /// Totals of the blocks pushed so far (the sequence number of the next block is `totals.blocks`).
    totals: PartitionTotals,
}

/// Writes one map attempt's records. Call [`MapWriter::finish`] to commit;
/// dropping the writer abandons the attempt, and its blocks are never read.
pub struct MapWriter {
    /// The stream carrying this attempt's blocks.
    send: quinn::SendStream,
    /// The server's side of the stream, for its verdict or error.
    reader: FrameReader,
    shuffle: ShuffleId,
    map: MapId,
    attempt: AttemptId,
    /// The shuffle's spec, as the server reported it.
    spec: ShuffleSpec,
    /// One buffer per partition.
    buffers: Vec<PartitionBuffer>,
    /// Bytes of records held across all buffers.
    buffered: usize,
    /// Target block size.
    block_size: usize,
    /// Most bytes held across all buffers.
    write_buffer: usize,
    /// Whether partition buffers are allocated at full block size up front
    /// (only when R such buffers fit the budget); otherwise they grow on demand.
    keep_allocations: bool,
    /// Whether to try lz4 for the next block.
    codec: CodecChooser,
    /// Set once the stream failed or finished, so drop does not reset it again.
    done: bool,
}

impl MapWriter {
    pub(crate) fn new(
        send: quinn::SendStream,
        reader: FrameReader,
        (shuffle, map, attempt): (ShuffleId, MapId, AttemptId),
        spec: ShuffleSpec,
        options: &ClientOptions,
    ) -> Self {
        let block_size = options.block_size.clamp(1024, MAX_BLOCK_RAW_LEN);
        let keep_allocations =
            (spec.partitions as usize).saturating_mul(block_size) <= options.write_buffer;
        Self {
            send,
            reader,
            shuffle,
            map,
            attempt,
            buffers: (0..spec.partitions)
                .map(|p| PartitionBuffer {
                    totals: PartitionTotals::new(p),
                    ..Default::default()
                })
                .collect(),
            spec,
            buffered: 0,
            block_size,
            write_buffer: options.write_buffer.max(block_size),
            keep_allocations,
            codec: CodecChooser::new(spec.codec),
            done: false,
        }
    }

    /// Bytes of records buffered now, across all partitions (bounded by the write budget).
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    /// Adds one record to `partition`. Pushes a block when the partition's
    /// buffer reaches the block size, or the largest buffer when the writer's
    /// budget is used up; waits while the server applies backpressure.
    pub async fn write(
        &mut self,
        partition: PartitionId,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), ClientError> {
        let len = record_len(key.len(), value.len());
        if len > MAX_BLOCK_RAW_LEN {
            return Err(ClientError::RecordTooLarge {
                len,
                max: MAX_BLOCK_RAW_LEN,
            });
        }
        let Some(buffer) = self.buffers.get(partition as usize) else {
            return Err(ClientError::PartitionOutOfRange {
                shuffle: self.shuffle,
                partition,
                partitions: self.spec.partitions,
            });
        };
        if !buffer.records.is_empty() && buffer.records.len() + len > self.block_size {
            self.push(partition).await?;
        }
        let buffer = &mut self.buffers[partition as usize];
        append_record(&mut buffer.records, key, value);
        buffer.count += 1;
        self.buffered += len;
        if buffer.records.len() >= self.block_size {
            self.push(partition).await?;
        }
        while self.buffered > self.write_buffer {
            let largest = (0..self.buffers.len())
                .max_by_key(|&p| self.buffers[p].records.len())
                .unwrap_or(0);
            self.push(largest as PartitionId).await?;
        }
        Ok(())
    }

    /// Encodes `partition`'s buffer as a block and sends it.
    async fn push(&mut self, partition: PartitionId) -> Result<(), ClientError> {
        let buffer = &mut self.buffers[partition as usize];
        if buffer.count == 0 {
            return Ok(());
        }
        let id = BlockId {
            map: self.map,
            attempt: self.attempt,
            partition,
            sequence: buffer.totals.blocks,
        };
        self.buffered -= buffer.records.len();
        // The buffer becomes the block's payload when stored raw, so the next
        // records go to a fresh allocation of the usual size.
        let capacity = if self.keep_allocations {
            self.block_size + self.block_size / 8
        } else {
            0
        };
        let records = std::mem::replace(&mut buffer.records, Vec::with_capacity(capacity));
        let tried = self.codec.choose();
        let block = encode_block_parts(id, records, std::mem::take(&mut buffer.count), tried);
        self.codec.observe(tried, &block.header);
        buffer.totals.add(&block.header);
        let mut head = Vec::with_capacity(FRAME_HEADER_LEN + BLOCK_HEADER_LEN);
        head.extend_from_slice(&encode_frame_header(FrameKind::Block, block.len()));
        head.extend_from_slice(&block.header_bytes);
        self.send_chunks(&mut [Bytes::from(head), block.payload])
            .await
    }

    /// Sends chunks; if the server stopped the stream, returns the error it sent.
    async fn send_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), ClientError> {
        match self.send.write_all_chunks(chunks).await {
            Ok(()) => Ok(()),
            Err(quinn::WriteError::Stopped(_)) => {
                self.done = true;
                Err(match self.reader.response().await {
                    Err(e) => e,
                    Ok(other) => ClientError::Protocol(format!(
                        "server stopped the push stream after {other:?}"
                    )),
                })
            }
            Err(e) => {
                self.done = true;
                Err(write_error(e))
            }
        }
    }

    /// Pushes what is buffered, sends `MapEnd` with the totals of every
    /// partition written, and returns the server's commit decision.
    pub async fn finish(mut self) -> Result<CommitOutcome, ClientError> {
        for partition in 0..self.spec.partitions {
            self.push(partition).await?;
        }
        let partitions = self
            .buffers
            .iter()
            .map(|b| b.totals)
            .filter(|t| t.blocks > 0)
            .collect();
        let end = Request::MapEnd(MapEnd {
            map: self.map,
            attempt: self.attempt,
            partitions,
        });
        self.send_chunks(&mut [request_frame(&end)]).await?;
        self.done = true;
        let _ = self.send.finish();
        match self.reader.response().await? {
            Response::Committed { .. } => Ok(CommitOutcome::Committed),
            Response::AttemptRefused {
                committed_attempt, ..
            } => Ok(CommitOutcome::Refused { committed_attempt }),
            other => Err(ClientError::Protocol(format!(
                "expected a commit decision, got {other:?}"
            ))),
        }
    }

    /// Abandons the attempt: the server discards what it pushed.
    pub fn abort(mut self) {
        self.reset();
    }

    fn reset(&mut self) {
        if !self.done {
            self.done = true;
            let _ = self.send.reset(0u32.into());
        }
    }
}

impl Drop for MapWriter {
    fn drop(&mut self) {
        self.reset();
    }
}
