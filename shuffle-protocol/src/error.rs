//! The one error type of the protocol crate: everything that can be wrong with
//! bytes that claim to be a frame, a message, a block or a record.

use thiserror::Error;

/// Why a sequence of bytes is not a valid frame, message, block or record.
///
/// Each variant names the limit or field that was violated, so the error can
/// be sent back to whoever produced the bytes and they can tell what to fix.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// A frame header announced a payload larger than [`crate::MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the maximum frame size of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    /// A frame header carried a kind byte this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownFrameKind(u8),
    /// A control message did not decode as postcard of the expected type.
    #[error("malformed {what} message: {reason}")]
    MalformedMessage { what: &'static str, reason: String },
    /// A block's header is inconsistent (bad magic, version, lengths or header checksum).
    #[error("malformed block header: {0}")]
    MalformedBlock(String),
    /// A block's stored bytes do not match the CRC32C in its header.
    #[error("block checksum mismatch: header says {expected:#010x}, payload has {actual:#010x}")]
    BlockChecksum { expected: u32, actual: u32 },
    /// A block's payload failed to decompress to its declared raw length.
    #[error("block payload does not decompress: {0}")]
    Decompress(String),
    /// The records inside a block are cut short or do not add up to its record count.
    #[error("malformed records in block: {0}")]
    MalformedRecords(String),
    /// A record is larger than a block may hold.
    #[error("record of {len} bytes exceeds the maximum block size of {max} bytes")]
    RecordTooLarge { len: usize, max: usize },
}
