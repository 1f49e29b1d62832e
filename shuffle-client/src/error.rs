//! The client's one error type.

use shuffle_protocol::{ErrorKind, MapId, PartitionId, ServiceError, ShuffleId};
use thiserror::Error;

/// What went wrong talking to the shuffle service.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The connection could not be set up.
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: std::net::SocketAddr, reason: String },
    /// The server's Unix socket could not be used.
    #[error("cannot connect to the Unix socket {path}: {reason}")]
    ConnectUnix { path: std::path::PathBuf, reason: String },
    /// Options that cannot work (no trusted certificate, say).
    #[error("invalid client options: {0}")]
    Options(String),
    /// The server answered the request with an error.
    #[error("server error ({:?}): {}", .0.kind, .0.message)]
    Server(ServiceError),
    /// The connection or stream broke.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// The server sent something the protocol does not allow here.
    #[error("protocol violation by the server: {0}")]
    Protocol(String),
    /// A write named a partition the shuffle does not have.
    #[error("partition {partition} is out of range: shuffle {shuffle} has {partitions} partitions")]
    PartitionOutOfRange { shuffle: ShuffleId, partition: PartitionId, partitions: u32 },
    /// A single record is larger than a block may hold.
    #[error("record of {len} bytes exceeds the largest block of {max} bytes")]
    RecordTooLarge { len: usize, max: usize },
    /// Hybrid mode: an attempt whose blocks this reader received failed or
    /// lost to another attempt. If `rereadable` (spill strategy `Full`), open
    /// the partition again: the failed attempt's blocks are left out; if not,
    /// the producers must be re-run.
    #[error(
        "map {map} attempt {attempt} failed after this reader received some of its blocks; {}",
        if *.rereadable { "read the partition again from the start" } else { "its producers must be re-run" }
    )]
    ProducerFailed { map: MapId, attempt: shuffle_protocol::AttemptId, rereadable: bool },
    /// What a reader received does not match what the maps committed.
    #[error("integrity check failed for shuffle {shuffle}, partition {partition}{}: {detail}",
        .map.map(|m| format!(", map {m}")).unwrap_or_default())]
    Integrity { shuffle: ShuffleId, partition: PartitionId, map: Option<MapId>, detail: String },
    /// A cluster lost every copy of these maps' blocks in this partition:
    /// run the maps again (new attempts), then read the partition again.
    #[error(
        "shuffle {shuffle}, partition {partition}: every copy of the blocks of maps {maps:?} was lost; re-run them"
    )]
    PartitionLost { shuffle: ShuffleId, partition: PartitionId, maps: Vec<MapId> },
    /// A key-ordered read cannot merge the partition's runs within its
    /// memory budget: it needs at least one block of each run at once.
    #[error(
        "merging the {runs} sorted runs of partition {partition} of shuffle {shuffle} needs at least {needed} bytes \
         (a block of each), over the reader's budget of {budget}: give the reader more memory or the writers larger \
         sort buffers (fewer runs)"
    )]
    MergeMemory { shuffle: ShuffleId, partition: PartitionId, runs: usize, needed: usize, budget: usize },
}

impl ClientError {
    /// The server's error kind, if the server refused the request.
    pub fn service_kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Server(e) => Some(e.kind),
            _ => None,
        }
    }

    /// Whether the server (or the way to it) is gone or going, rather than
    /// the request being wrong: a cluster client tries another copy.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::ConnectUnix { .. } | Self::ConnectionLost(_) => true,
            Self::Server(e) => matches!(e.kind, ErrorKind::ShuttingDown | ErrorKind::Io | ErrorKind::Busy),
            _ => false,
        }
    }

    /// Whether a worker answered that it does not hold what was asked of it
    /// (the coordinator moved it away, e.g. while the worker was cut off
    /// and declared lost): another copy has it; the worker itself is fine.
    pub fn is_copy_gone(&self) -> bool {
        matches!(self.service_kind(), Some(ErrorKind::WrongRole | ErrorKind::UnknownShuffle | ErrorKind::UnknownApp))
    }
}

impl From<quinn::ConnectionError> for ClientError {
    fn from(e: quinn::ConnectionError) -> Self {
        match e {
            quinn::ConnectionError::ApplicationClosed(close) => Self::ConnectionLost(format!(
                "the server closed the connection: {}",
                String::from_utf8_lossy(&close.reason)
            )),
            other => Self::ConnectionLost(other.to_string()),
        }
    }
}
