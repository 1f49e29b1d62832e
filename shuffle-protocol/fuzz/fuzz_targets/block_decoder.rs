//! Arbitrary bytes as a block: parsing, CRC checks, decompression and record
//! iteration must return errors, never panic or allocate without bound.
//!
//! Each input is tried twice: as it is (which mostly exercises the header
//! checks), and with its two checksums patched to match, so the fuzzer also
//! reaches lz4 decompression and record framing behind the CRC.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use shuffle_protocol::{BLOCK_HEADER_LEN, Block};

fuzz_target!(|data: &[u8]| {
    if let Ok(block) = Block::parse(Bytes::copy_from_slice(data)) {
        let _ = block.into_records();
    }
    if data.len() >= BLOCK_HEADER_LEN {
        let mut patched = data.to_vec();
        let payload_crc = crc32c::crc32c(&patched[BLOCK_HEADER_LEN..]);
        patched[36..40].copy_from_slice(&payload_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&patched[..40]);
        patched[40..44].copy_from_slice(&header_crc.to_le_bytes());
        if let Ok(block) = Block::parse(Bytes::from(patched)) {
            let _ = block.into_records();
        }
    }
});
