//! The shared vocabulary of the shuffle service, with no I/O of its own.
//!
//! Everything a server and a client must agree on lives here: the ids of the
//! things being shuffled ([`AppId`], [`ShuffleId`]), the control messages
//! ([`Request`], [`Response`]) encoded with postcard, the one frame codec that
//! carries both control messages and data blocks over any ordered byte stream
//! ([`frame`]), the block format with lz4 compression and CRC32C integrity
//! ([`block`]), and the framing of records inside a block ([`record`]).
//!
//! Like `quinn-proto`, this crate never touches a socket, a file or a clock:
//! decoders take bytes and return values or errors, so they are tested (and
//! fuzzed) without a network.

pub mod block;
pub mod cluster;
pub mod error;
pub mod frame;
pub mod ids;
pub mod limits;
pub mod message;
pub mod record;
pub mod totals;

pub use block::{
    BLOCK_HEADER_LEN, Block, BlockHeader, BlockId, Codec, CodecChooser, EncodedBlock, MAX_BLOCK_RAW_LEN, encode_block,
    encode_block_parts,
};
pub use cluster::{
    Group, HeldGroup, HeldShuffle, MapDecision, MapPlan, Placement, ResumePoint, ServerRole, WorkerEndpoint,
    WorkerReport,
};
pub use error::ProtocolError;
pub use frame::{FRAME_HEADER_LEN, Frame, FrameDecoder, FrameKind, MAX_FRAME_LEN, encode_frame, encode_frame_header};
pub use ids::{AppId, AttemptId, MapId, PartitionId, ShuffleId};
pub use message::{
    APP_SECRET_BYTES, AppSecret, ErrorKind, ExchangeMode, MAX_MAPS, MAX_PARTITIONS, MapCommit, MapEnd,
    PROTOCOL_VERSION, Request, Response, RunInfo, ServiceError, ShuffleSpec, SpillStrategy,
};
pub use record::{RecordIter, append_record, key_prefix, prefetch, record_len};
pub use totals::PartitionTotals;
