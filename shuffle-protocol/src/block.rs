//! The block: the unit of data on the wire and on disk.
//!
//! A block is a fixed 44-byte header followed by the stored payload: framed
//! records (see [`crate::record`]), lz4-compressed unless compression did not
//! shrink them. Blocks are self-contained, so the server can move, merge or
//! spill them without looking inside, and a reader can check each one on its own.
//!
//! Header layout (little-endian):
//!
//! | offset | field | |
//! |---|---|---|
//! | 0 | magic `u16` | [`BLOCK_MAGIC`] |
//! | 2 | version `u8` | [`BLOCK_VERSION`] |
//! | 3 | codec `u8` | [`Codec`] |
//! | 4 | map `u32` | |
//! | 8 | attempt `u32` | |
//! | 12 | partition `u32` | |
//! | 16 | run `u32` | sort mode: which of the writer's sorted runs (0 in hash mode) |
//! | 20 | sequence `u32` | per (map, attempt, partition), from 0 |
//! | 24 | record count `u32` | |
//! | 28 | raw length `u32` | bytes of framed records |
//! | 32 | stored length `u32` | bytes following the header |
//! | 36 | CRC32C of the stored bytes `u32` | |
//! | 40 | CRC32C of header bytes 0..40 `u32` | catches a flipped id or length |

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{AttemptId, MapId, PartitionId, ProtocolError, RecordIter};

/// Bytes of a block header.
pub const BLOCK_HEADER_LEN: usize = 44;
/// First two bytes of every block, `"SB"`.
pub const BLOCK_MAGIC: u16 = u16::from_le_bytes(*b"SB");
/// Version of the block format described above.
pub const BLOCK_VERSION: u8 = 1;
/// Largest raw (uncompressed) payload of one block, 8 MiB. Writers target
/// blocks of about 64 KiB; a single record larger than that gets a block of
/// its own, up to this limit. Bounding it also bounds what a reader allocates
/// to decompress a block whose header claims a huge raw length.
pub const MAX_BLOCK_RAW_LEN: usize = 8 * 1024 * 1024;

/// How a block's payload is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[repr(u8)]
pub enum Codec {
    /// Framed records as they are.
    None = 0,
    /// lz4 block format (lz4_flex); used only when it shrinks the payload.
    #[default]
    Lz4 = 1,
}

/// Which map attempt's output a block is, for which partition, in what order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockId {
    /// The map task that wrote the block.
    pub map: MapId,
    /// The attempt of that map task.
    pub attempt: AttemptId,
    /// The partition the block's records belong to.
    pub partition: PartitionId,
    /// In sort mode, the writer's run the block belongs to: its records are in
    /// key order within the run, and runs are numbered from 0. Always 0 in hash mode.
    pub run: u32,
    /// Position of the block among this (map, attempt, partition)'s blocks.
    pub sequence: u32,
}

/// A parsed block header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHeader {
    /// Whose block this is.
    pub id: BlockId,
    /// How the payload is stored.
    pub codec: Codec,
    /// Number of records in the payload.
    pub record_count: u32,
    /// Length of the framed records before compression.
    pub raw_len: u32,
    /// Length of the payload that follows the header.
    pub stored_len: u32,
    /// CRC32C of the stored payload.
    pub crc: u32,
}

impl BlockHeader {
    /// The header's bytes, header checksum included.
    pub fn encode(&self) -> [u8; BLOCK_HEADER_LEN] {
        let mut h = [0u8; BLOCK_HEADER_LEN];
        h[0..2].copy_from_slice(&BLOCK_MAGIC.to_le_bytes());
        h[2] = BLOCK_VERSION;
        h[3] = self.codec as u8;
        for (i, v) in [
            self.id.map,
            self.id.attempt,
            self.id.partition,
            self.id.run,
            self.id.sequence,
            self.record_count,
            self.raw_len,
            self.stored_len,
            self.crc,
        ]
        .into_iter()
        .enumerate()
        {
            h[4 + 4 * i..8 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        let header_crc = crc32c::crc32c(&h[..40]);
        h[40..44].copy_from_slice(&header_crc.to_le_bytes());
        h
    }

    /// Parses and checks the header at the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let bad = |why: String| Err(ProtocolError::MalformedBlock(why));
        if bytes.len() < BLOCK_HEADER_LEN {
            return bad(format!("{} bytes is shorter than a block header", bytes.len()));
        }
        let u32_at = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
        let magic = u16::from_le_bytes([bytes[0], bytes[1]]);
        if magic != BLOCK_MAGIC {
            return bad(format!("bad magic {magic:#06x}"));
        }
        let header_crc = crc32c::crc32c(&bytes[..40]);
        if header_crc != u32_at(40) {
            return bad(format!("header checksum {:#010x} does not match {header_crc:#010x}", u32_at(40)));
        }
        if bytes[2] != BLOCK_VERSION {
            return bad(format!("unsupported block version {}", bytes[2]));
        }
        let codec = match bytes[3] {
            0 => Codec::None,
            1 => Codec::Lz4,
            other => return bad(format!("unknown codec {other}")),
        };
        let header = Self {
            id: BlockId {
                map: u32_at(4),
                attempt: u32_at(8),
                partition: u32_at(12),
                run: u32_at(16),
                sequence: u32_at(20),
            },
            codec,
            record_count: u32_at(24),
            raw_len: u32_at(28),
            stored_len: u32_at(32),
            crc: u32_at(36),
        };
        if header.raw_len as usize > MAX_BLOCK_RAW_LEN || header.stored_len as usize > MAX_BLOCK_RAW_LEN {
            return bad(format!(
                "raw length {} or stored length {} exceeds the block limit of {MAX_BLOCK_RAW_LEN}",
                header.raw_len, header.stored_len
            ));
        }
        if codec == Codec::None && header.raw_len != header.stored_len {
            return bad(format!(
                "uncompressed block with raw length {} but stored length {}",
                header.raw_len, header.stored_len
            ));
        }
        Ok(header)
    }
}

/// A block as received: its header and its stored payload, sharing one buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// The checked header.
    pub header: BlockHeader,
    /// The whole block, header included, exactly as it travels and is stored.
    pub bytes: Bytes,
}

impl Block {
    /// Parses `bytes` as one whole block: header checks and the payload length.
    /// The payload CRC is checked separately by [`Block::verify`], so that a
    /// server can route a block before spending time on its payload.
    pub fn parse(bytes: Bytes) -> Result<Self, ProtocolError> {
        let header = BlockHeader::decode(&bytes)?;
        let payload_len = bytes.len() - BLOCK_HEADER_LEN;
        if payload_len != header.stored_len as usize {
            return Err(ProtocolError::MalformedBlock(format!(
                "header says {} stored bytes but {payload_len} follow it",
                header.stored_len
            )));
        }
        Ok(Self { header, bytes })
    }

    /// The stored payload (compressed or not).
    pub fn payload(&self) -> &[u8] {
        &self.bytes[BLOCK_HEADER_LEN..]
    }

    /// Checks the payload against the header's CRC32C.
    pub fn verify(&self) -> Result<(), ProtocolError> {
        let actual = crc32c::crc32c(self.payload());
        if actual != self.header.crc {
            return Err(ProtocolError::BlockChecksum { expected: self.header.crc, actual });
        }
        Ok(())
    }

    /// Verifies the CRC and returns the framed records, decompressing if needed.
    /// Also checks that the records parse and that their number matches the header.
    pub fn into_records(self) -> Result<Bytes, ProtocolError> {
        self.verify()?;
        let raw = match self.header.codec {
            Codec::None => self.bytes.slice(BLOCK_HEADER_LEN..),
            Codec::Lz4 => {
                let mut raw = vec![0u8; self.header.raw_len as usize];
                let n = lz4_flex::block::decompress_into(self.payload(), &mut raw)
                    .map_err(|e| ProtocolError::Decompress(e.to_string()))?;
                if n != raw.len() {
                    return Err(ProtocolError::Decompress(format!(
                        "decompressed to {n} bytes, header says {}",
                        raw.len()
                    )));
                }
                Bytes::from(raw)
            }
        };
        let mut count = 0u32;
        for record in RecordIter::new(&raw) {
            record?;
            count += 1;
        }
        if count != self.header.record_count {
            return Err(ProtocolError::MalformedRecords(format!(
                "block holds {count} records, header says {}",
                self.header.record_count
            )));
        }
        Ok(raw)
    }
}

/// A block ready to send: its header, and its payload as a separate buffer so
/// that a payload stored raw is the writer's own buffer, never copied.
#[derive(Clone, Debug)]
pub struct EncodedBlock {
    /// The parsed header fields.
    pub header: BlockHeader,
    /// The encoded header, to precede the payload.
    pub header_bytes: [u8; BLOCK_HEADER_LEN],
    /// The stored payload.
    pub payload: Bytes,
}

impl EncodedBlock {
    /// Header and payload as one contiguous buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = Vec::with_capacity(BLOCK_HEADER_LEN + self.payload.len());
        out.extend_from_slice(&self.header_bytes);
        out.extend_from_slice(&self.payload);
        Bytes::from(out)
    }

    /// Whole block length on the wire.
    pub fn len(&self) -> usize {
        BLOCK_HEADER_LEN + self.payload.len()
    }

    /// Whether the block has no payload (a block always has a header).
    pub fn is_empty(&self) -> bool {
        self.payload.is_empty()
    }
}

/// Encodes framed `records` (holding `record_count` records) as one block,
/// taking ownership of the buffer.
///
/// With [`Codec::Lz4`] the payload is compressed, and stored raw instead when
/// compression does not shrink it; a raw payload is `records` itself. Panics
/// if `records` exceeds [`MAX_BLOCK_RAW_LEN`], which writers must check first.
pub fn encode_block_parts(id: BlockId, records: Vec<u8>, record_count: u32, codec: Codec) -> EncodedBlock {
    assert!(records.len() <= MAX_BLOCK_RAW_LEN, "block of {} bytes exceeds MAX_BLOCK_RAW_LEN", records.len());
    let raw_len = records.len() as u32;
    let mut stored = None;
    if codec == Codec::Lz4 {
        let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(records.len())];
        if let Ok(n) = lz4_flex::block::compress_into(&records, &mut out)
            && n < records.len()
        {
            out.truncate(n);
            stored = Some((Codec::Lz4, Bytes::from(out)));
        }
    }
    let (codec, payload) = stored.unwrap_or_else(|| (Codec::None, Bytes::from(records)));
    let header = BlockHeader {
        id,
        codec,
        record_count,
        raw_len,
        stored_len: payload.len() as u32,
        crc: crc32c::crc32c(&payload),
    };
    EncodedBlock { header, header_bytes: header.encode(), payload }
}

/// Encodes framed `records` as one contiguous block (see [`encode_block_parts`]).
pub fn encode_block(id: BlockId, records: &[u8], record_count: u32, codec: Codec) -> Bytes {
    encode_block_parts(id, records.to_vec(), record_count, codec).to_bytes()
}

/// Smallest saving, in 1/16ths of the raw size, for which lz4 is worth its
/// CPU: below 1/16 (about 6%) a writer stops trying for a while. Random or
/// already-compressed values (W1's hex digits, say) save nothing, and the
/// attempt costs as much as everything else the writer does per byte.
pub const MIN_LZ4_SAVING_SIXTEENTHS: usize = 1;

/// Blocks a writer stores raw, without trying lz4, after an attempt that did
/// not pay; then it tries again, so data that becomes compressible is caught.
pub const LZ4_BACKOFF_BLOCKS: u32 = 16;

/// Per-writer choice of codec for each block: lz4 while it pays, with a
/// back-off after blocks where it did not. Plain state, no clock.
#[derive(Clone, Debug)]
pub struct CodecChooser {
    /// The codec the shuffle asks for.
    wanted: Codec,
    /// Blocks left to store raw before trying lz4 again.
    skip: u32,
}

impl CodecChooser {
    /// A chooser for a shuffle whose spec asks for `wanted`.
    pub fn new(wanted: Codec) -> Self {
        Self { wanted, skip: 0 }
    }

    /// The codec to try for the next block.
    pub fn choose(&mut self) -> Codec {
        if self.wanted == Codec::None || self.skip > 0 {
            self.skip = self.skip.saturating_sub(1);
            return Codec::None;
        }
        Codec::Lz4
    }

    /// Records how a block that tried `tried` came out.
    pub fn observe(&mut self, tried: Codec, header: &BlockHeader) {
        if tried == Codec::Lz4 {
            let raw = header.raw_len as usize;
            let saved = raw.saturating_sub(header.stored_len as usize);
            if saved * 16 < raw * MIN_LZ4_SAVING_SIXTEENTHS {
                self.skip = LZ4_BACKOFF_BLOCKS;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::append_record;

    fn id() -> BlockId {
        BlockId { map: 3, attempt: 1, partition: 7, run: 0, sequence: 42 }
    }

    fn framed(records: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut raw = Vec::new();
        for (k, v) in records {
            append_record(&mut raw, k, v);
        }
        raw
    }

    #[test]
    fn compressible_payload_is_stored_compressed_and_random_one_raw() {
        let repetitive = framed(&[(b"key".to_vec(), vec![b'a'; 10_000])]);
        let block = Block::parse(encode_block(id(), &repetitive, 1, Codec::Lz4)).unwrap();
        assert_eq!(block.header.codec, Codec::Lz4);
        assert!(block.bytes.len() < repetitive.len() / 10);

        let mut x = 0x1234_5678_9abc_def0u64;
        let noise: Vec<u8> = (0..10_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let random = framed(&[(b"key".to_vec(), noise)]);
        let block = Block::parse(encode_block(id(), &random, 1, Codec::Lz4)).unwrap();
        assert_eq!(block.header.codec, Codec::None);
        assert_eq!(block.into_records().unwrap(), Bytes::from(random));
    }

    #[test]
    fn flipped_payload_bit_is_a_checksum_error() {
        let raw = framed(&[(b"k".to_vec(), b"some value".to_vec())]);
        let mut bytes = encode_block(id(), &raw, 1, Codec::Lz4).to_vec();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        let err = Block::parse(Bytes::from(bytes)).unwrap().into_records().unwrap_err();
        assert!(matches!(err, ProtocolError::BlockChecksum { .. }), "{err}");
    }

    #[test]
    fn flipped_header_bit_is_detected() {
        let raw = framed(&[(b"k".to_vec(), b"v".to_vec())]);
        let mut bytes = encode_block(id(), &raw, 1, Codec::None).to_vec();
        bytes[12] ^= 0x01; // the partition
        assert!(matches!(Block::parse(Bytes::from(bytes)), Err(ProtocolError::MalformedBlock(_))));
    }

    #[test]
    fn wrong_record_count_is_detected() {
        let raw = framed(&[(b"k".to_vec(), b"v".to_vec())]);
        let block = Block::parse(encode_block(id(), &raw, 2, Codec::None)).unwrap();
        assert!(matches!(block.into_records(), Err(ProtocolError::MalformedRecords(_))));
    }

    #[test]
    fn codec_chooser_backs_off_when_lz4_does_not_pay_and_retries_later() {
        let mut chooser = CodecChooser::new(Codec::Lz4);
        let header = |raw_len, stored_len| BlockHeader {
            id: id(),
            codec: Codec::None,
            record_count: 1,
            raw_len,
            stored_len,
            crc: 0,
        };
        assert_eq!(chooser.choose(), Codec::Lz4);
        chooser.observe(Codec::Lz4, &header(1600, 1000));
        assert_eq!(chooser.choose(), Codec::Lz4, "a 37% saving keeps lz4 on");
        chooser.observe(Codec::Lz4, &header(1600, 1550));
        for _ in 0..LZ4_BACKOFF_BLOCKS {
            assert_eq!(chooser.choose(), Codec::None, "a 3% saving is not worth it");
        }
        assert_eq!(chooser.choose(), Codec::Lz4, "then it probes again");
        assert_eq!(CodecChooser::new(Codec::None).choose(), Codec::None);
    }

    #[test]
    fn raw_payload_is_the_callers_buffer_uncopied() {
        let raw = framed(&[(b"k".to_vec(), b"v".to_vec())]);
        let ptr = raw.as_ptr();
        let encoded = encode_block_parts(id(), raw, 1, Codec::None);
        assert_eq!(encoded.payload.as_ptr(), ptr);
        assert_eq!(Block::parse(encoded.to_bytes()).unwrap().header, encoded.header);
    }

    proptest! {
        #[test]
        fn blocks_round_trip(
            records in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..50), proptest::collection::vec(0u8..4, 0..400)), 0..40),
            map in any::<u32>(), attempt in any::<u32>(), partition in any::<u32>(), sequence in any::<u32>(),
            compress in any::<bool>(),
        ) {
            let raw = framed(&records);
            let id = BlockId { map, attempt, partition, run: 0, sequence };
            let codec = if compress { Codec::Lz4 } else { Codec::None };
            let block = Block::parse(encode_block(id, &raw, records.len() as u32, codec)).unwrap();
            prop_assert_eq!(block.header.id, id);
            prop_assert_eq!(block.header.raw_len as usize, raw.len());
            prop_assert_eq!(block.into_records().unwrap(), Bytes::from(raw));
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_block_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(block) = Block::parse(Bytes::from(bytes)) {
                let _ = block.into_records();
            }
        }
    }
}
