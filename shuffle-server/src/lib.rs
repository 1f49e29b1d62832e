//! The shuffle service daemon, as a library (embedded by engines and tests)
//! and as the `shuffle-server` binary.
//!
//! Layers, from the outside in:
//! - [`server`]: the QUIC endpoint, the accept loop, background tasks, shutdown.
//! - [`connection`]: `Hello` and authentication, then one task per request stream.
//! - [`transport`]: frames over any byte stream (QUIC today; a Unix socket can follow).
//! - [`push`], [`read`]: the request handlers for writing and reading partitions.
//! - [`state`]: apps and their shuffles; [`shuffle`]: what every mode shares;
//!   [`hash`], [`sort`], [`hybrid`]: the storage of each exchange mode;
//!   [`commit`]: the commit rule; [`memory`]: the budget and its watermarks;
//!   [`disk`]: the free-space reserve.

pub mod commit;
pub mod config;
pub mod connection;
pub mod disk;
pub mod elevator;
pub mod error;
pub mod hash;
pub mod hybrid;
pub mod memory;
pub mod push;
pub mod read;
pub mod server;
pub mod shuffle;
pub mod shutdown;
pub mod sort;
pub mod state;
pub mod stats;
pub mod telemetry;
pub mod tls;
pub mod transport;

pub use config::{ByteSize, ConfigFile, DEFAULT_METRICS_ADDR, OptionalAddr, Seconds, ServerConfig};
pub use error::ServerError;
pub use server::{ServerHandle, start};
pub use stats::StatsSnapshot;
