//! [`PartitionReader`]: one partition's records, checked as they arrive.
//!
//! Every block's header and CRC are checked, its records decoded and counted;
//! per map, blocks must come from one attempt in sequence order. The closing
//! `PartitionEnd` lists each map's committed attempt and declared totals, and
//! what arrived must equal them exactly; any difference is an
//! [`ClientError::Integrity`] naming the shuffle, partition and map.

use std::collections::HashMap;

use bytes::Bytes;
use shuffle_protocol::{
    AttemptId, Block, Frame, FrameKind, MapCommit, MapId, PartitionId, PartitionTotals, RecordIter,
    Response, ShuffleId,
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
    /// Per map: the attempt its blocks came from and their totals so far.
    received: HashMap<MapId, (AttemptId, PartitionTotals)>,
    /// The block `next_record` is taking records from, and the offset reached.
    current: Option<(Bytes, usize)>,
    /// Set once `PartitionEnd` was received and checked.
    finished: bool,
}

impl PartitionReader {
    pub(crate) fn new(reader: FrameReader, shuffle: ShuffleId, partition: PartitionId) -> Self {
        Self {
            reader,
            shuffle,
            partition,
            received: HashMap::new(),
            current: None,
            finished: false,
        }
    }

    fn integrity(&self, map: Option<MapId>, detail: String) -> ClientError {
        ClientError::Integrity {
            shuffle: self.shuffle,
            partition: self.partition,
            map,
            detail,
        }
    }

    /// The next block of records; `None` once the partition is complete and checked.
    pub async fn next_block(&mut self) -> Result<Option<RecordBlock>, ClientError> {
        if self.finished {
            return Ok(None);
        }
        match self.reader.next_frame().await? {
            Some(Frame {
                kind: FrameKind::Block,
                payload,
            }) => self.accept_block(payload).map(Some),
            Some(Frame {
                kind: FrameKind::Response,
                payload,
            }) => {
                match Response::decode(&payload)
                    .map_err(|e| ClientError::Protocol(e.to_string()))?
                {
                    Response::PartitionEnd { partition, maps } if partition == self.partition => {
                        self.check_end(&maps)?;
                        self.finished = true;
                        Ok(None)
                    }
                    Response::Error(e) => Err(ClientError::Server(e)),
                    other => Err(ClientError::Protocol(format!(
                        "unexpected {other:?} on a partition stream"
                    ))),
                }
            }
            Some(frame) => Err(ClientError::Protocol(format!(
                "unexpected {:?} frame on a partition stream",
                frame.kind
            ))),
            None => Err(ClientError::ConnectionLost(format!(
                "partition {} of shuffle {} ended before PartitionEnd",
                self.partition, self.shuffle
            ))),
        }
    }

    /// Checks one block and returns its records.
    fn accept_block(&mut self, payload: Bytes) -> Result<RecordBlock, ClientError> {
        let block = Block::parse(payload).map_err(|e| self.integrity(None, e.to_string()))?;
        let header = block.header;
        let map = header.id.map;
        if header.id.partition != self.partition {
            return Err(self.integrity(
                Some(map),
                format!("received a block of partition {}", header.id.partition),
            ));
        }
        let raw = block
            .into_records()
            .map_err(|e| self.integrity(Some(map), e.to_string()))?;
        let (attempt, totals) = self
            .received
            .entry(map)
            .or_insert_with(|| (header.id.attempt, PartitionTotals::new(header.id.partition)));
        if *attempt != header.id.attempt {
            let detail = format!(
                "received blocks of attempts {} and {}",
                *attempt, header.id.attempt
            );
            return Err(self.integrity(Some(map), detail));
        }
        if header.id.sequence != totals.blocks {
            let detail = format!(
                "block {} arrived where block {} was expected",
                header.id.sequence, totals.blocks
            );
            return Err(self.integrity(Some(map), detail));
        }
        totals.add(&header);
        Ok(RecordBlock {
            raw,
            count: header.record_count,
            map,
        })
    }

    /// Checks what arrived against what every map committed.
    fn check_end(&self, maps: &[MapCommit]) -> Result<(), ClientError> {
        for (index, commit) in maps.iter().enumerate() {
            if commit.map as usize != index {
                return Err(self.integrity(
                    None,
                    format!("PartitionEnd lists map {} at position {index}", commit.map),
                ));
            }
            let empty = (commit.attempt, PartitionTotals::new(self.partition));
            let (attempt, got) = self.received.get(&commit.map).copied().unwrap_or(empty);
            let want = commit.totals;
            if attempt != commit.attempt || got != want {
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
        if let Some(extra) = self.received.keys().find(|m| **m as usize >= maps.len()) {
            return Err(self.integrity(
                Some(*extra),
                "received blocks of a map the shuffle does not have".into(),
            ));
        }
        Ok(())
    }

    /// The next record; `None` once the partition is complete and checked.
    pub async fn next_record(&mut self) -> Result<Option<Record>, ClientError> {
        loop {
            if let Some((raw, offset)) = &mut self.current {
                let mut records = RecordIter::new(&raw[*offset..]);
                if let Some(Ok((key, value))) = records.next() {
                    let record = Record {
                        key: raw.slice_ref(key),
                        value: raw.slice_ref(value),
                    };
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
