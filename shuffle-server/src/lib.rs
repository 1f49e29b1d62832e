//! The shuffle service daemon, as a library (embedded by engines and tests)
//! and as the `shuffle-server` binary.
//!
//! Layers, from the outside in:
//! - [`server`]: start-up and recovery, the QUIC endpoint's accept loop,
//!   background tasks (spiller, reaper), shutdown.
//! - [`connection`]: `Hello` and app credentials ([`auth`]), then one task
//!   per request stream.
//! - [`transport`]: frames over any byte stream, with their buffers in the
//!   memory budget; QUIC windows derived from the budget.
//! - [`push`], [`read`]: the request handlers for writing and reading partitions.
//! - [`state`]: apps, their secrets and shuffles, named limits;
//!   [`shuffle`]: the commit rule ([`commit`]) around a mode's
//!   [`storage`]; [`memory`]: the budget, reservations and fair shares;
//!   [`disk`]: the free-space reserve; [`elevator`]: offset-ordered disk reads.
//! - [`cluster`]: the coordinator and the worker side of cluster mode.

pub mod allocator;
pub mod auth;
pub mod cluster;
pub mod commit;
pub mod config;
pub mod connection;
pub mod disk;
pub mod elevator;
pub mod error;
pub mod fault;
pub mod memory;
pub mod push;
pub mod read;
pub mod server;
pub mod shuffle;
pub mod state;
pub mod stats;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod transport;

pub use bytesize::ByteSize;
pub use config::{DEFAULT_METRICS_ADDR, OptionalAddr, Role, ServerConfig};
pub use error::ServerError;
pub use server::{ServerHandle, start, start_with_metrics};
pub use stats::StatsSnapshot;
