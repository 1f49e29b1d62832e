//! The engine's one error type.

use std::path::PathBuf;

use shuffle_client::ClientError;

/// What can go wrong running a job.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The shuffle service refused a request or the connection failed.
    #[error("shuffle service: {0}")]
    Client(#[from] ClientError),
    /// The engine's options cannot work (replication 2 without a cluster, say).
    #[error("invalid engine options: {0}")]
    Options(String),
    /// The embedded shuffle server could not start.
    #[error("embedded shuffle server: {0}")]
    Server(String),
    /// A record could not be encoded for the exchange.
    #[error("encoding a record for the exchange: {0}")]
    Encode(String),
    /// A record read from an exchange did not decode as the job's type.
    #[error("decoding a record of shuffle {shuffle}, partition {partition}: {detail}")]
    Decode { shuffle: u32, partition: u32, detail: String },
    /// A task kept failing; `cause` is its last failure.
    #[error("task {task} failed {attempts} time(s); last failure: {cause}")]
    TaskFailed { task: String, attempts: u32, cause: String },
    /// The job cannot run as built (for example, sorting an unbounded input).
    #[error("invalid job: {0}")]
    Plan(String),
    /// A file source or sink failed.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The engine's runtime could not be built, or a blocking call was made from async code.
    #[error("runtime: {0}")]
    Runtime(String),
    /// A spill file is damaged or cut short.
    #[error("spill file {path}: {detail}")]
    Spill { path: PathBuf, detail: String },
    /// A single record needs more memory than its operator's share of the budget.
    #[error("{consumer} needs {needed} bytes for one record, over its share of the memory budget ({limit} bytes)")]
    Memory { consumer: String, needed: usize, limit: usize },
    /// An operator holding nothing waited its full patience for bytes within
    /// its share while other operators held the whole budget.
    #[error(
        "{consumer} waited {waited:?} for {needed} bytes within its share of the memory budget ({share} bytes), all held by other operators"
    )]
    MemoryStarved { consumer: String, needed: usize, share: usize, waited: std::time::Duration },
    /// A streaming operator's state outgrew its share of the memory budget.
    #[error(
        "the state of {operator} would take {bytes} bytes, over its share of the memory budget ({limit} bytes): {hint}"
    )]
    StateTooLarge { operator: String, bytes: usize, limit: usize, hint: String },
    /// Checkpointed state could not be written, read or decoded.
    #[error("checkpoint state: {0}")]
    State(String),
}

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}
