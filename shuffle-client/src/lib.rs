//! The client library that compute processes link to use the shuffle service.
//!
//! A [`ShuffleClient`] holds its links to one server (QUIC, or the server's
//! Unix socket when both are on one host), bound to one app by the app's
//! secret ([`AppCredentials`]).
//! Through it a job registers shuffles ([`ShuffleSpec`]), writes each map
//! attempt's output with a [`MapWriter`] (records buffered per partition and
//! pushed as ~64 KiB lz4 blocks, never one message per record), and reads each
//! partition with a [`PartitionReader`], which checks every block's CRC and
//! the per-map totals the server reports, so that nothing is lost or
//! duplicated silently.
//!
//! ```no_run
//! # async fn demo() -> Result<(), shuffle_client::ClientError> {
//! use shuffle_client::{ClientOptions, ShuffleClient, ShuffleId, ShuffleSpec};
//! let options = ClientOptions::new("my-job").trusted_cert("shuffle-data/tls/cert.pem");
//! let client = ShuffleClient::connect("127.0.0.1:7337".parse().unwrap(), options).await?;
//! client.register_shuffle(ShuffleId(0), ShuffleSpec::hash(1, 2)).await?;
//! let mut writer = client.writer(ShuffleId(0), 0, 0).await?;
//! writer.write(1, b"key", b"value").await?;
//! writer.finish().await?;
//! let mut reader = client.reader(ShuffleId(0), 1).await?;
//! while let Some(record) = reader.next_record().await? {
//!     println!("{:?} => {:?}", record.key, record.value);
//! }
//! # Ok(()) }
//! ```

mod client;
mod cluster;
mod error;
mod merge;
mod options;
mod reader;
mod sort_buffer;
mod transport;
mod unix;
mod writer;

pub use bytes::Bytes;
pub use client::{ShuffleClient, quic_client_config, quic_endpoint};
pub use error::ClientError;
pub use merge::MERGE_BLOCK_BYTES;
pub use options::{APP_ENV, APP_SECRET_ENV, AppCredentials, ClientOptions};
pub use reader::{DEFAULT_MERGE_MEMORY, PartitionReader, Record, RecordBlock};
pub use shuffle_protocol::{
    AppId, AppSecret, AttemptId, Codec, ErrorKind, ExchangeMode, MapId, PartitionId, Placement, ServiceError,
    ShuffleId, ShuffleSpec, SpillStrategy,
};
pub use sort_buffer::{SORT_ENTRY_BYTES, SortBuffer};
pub use writer::{CommitOutcome, MapWriter};
