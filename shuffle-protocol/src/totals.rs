//! Per-partition totals of one map attempt: what a `MapEnd` declares and what
//! a reader checks it received.

use serde::{Deserialize, Serialize};

use crate::{BlockHeader, PartitionId};

/// What one map attempt wrote to one partition.
///
/// The checksum chains the CRCs of the blocks in sequence order, so a lost,
/// duplicated, reordered or altered block changes it even when the counts agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PartitionTotals {
    /// The partition these totals are for.
    pub partition: PartitionId,
    /// Number of blocks.
    pub blocks: u32,
    /// Number of records across those blocks.
    pub records: u64,
    /// CRC32C over the little-endian CRCs of the blocks, in sequence order.
    pub checksum: u32,
}

impl PartitionTotals {
    /// Empty totals for `partition`.
    pub fn new(partition: PartitionId) -> Self {
        Self { partition, ..Self::default() }
    }

    /// Adds the next block in sequence order.
    pub fn add(&mut self, header: &BlockHeader) {
        self.add_block(header.record_count, header.crc);
    }

    /// Adds the next block in sequence order, given its record count and
    /// payload CRC (a reader that received the blocks out of order).
    pub fn add_block(&mut self, records: u32, crc: u32) {
        self.blocks += 1;
        self.records += u64::from(records);
        self.checksum = crc32c::crc32c_append(self.checksum, &crc.to_le_bytes());
    }
}
