//! A thin embedded dataflow engine whose every exchange goes through the
//! shuffle service: one job API, two executors.
//!
//! Build a job from a source ([`Engine::generate`], [`Engine::parallelize`],
//! [`Engine::read_text`], [`Engine::generate_at_rate`]), narrow operators
//! ([`Dataset::map`], [`Dataset::filter`], [`Dataset::flat_map`]) and keyed
//! ones that exchange data ([`Dataset::reduce_by_key`], [`Dataset::partition_by_key`],
//! [`Dataset::group_by_key`], [`Dataset::sort_by_key`], [`Dataset::join`]),
//! then run it with a sink ([`Dataset::collect`], [`Dataset::for_each`],
//! [`Dataset::write_text`], [`Dataset::collect_latest`]) in
//! [`ExecutionMode::Batch`] (stage by stage over blocking exchanges, failed
//! tasks retried) or [`ExecutionMode::Streaming`] (all stages at once over
//! hybrid exchanges). The same dataset runs in both.
//!
//! ```no_run
//! use engine_adapter::{Engine, ExecutionMode};
//! # fn main() -> Result<(), engine_adapter::EngineError> {
//! let engine = Engine::embedded()?;
//! let lines = engine.parallelize(vec!["a b".to_string(), "b c b".to_string()], 2);
//! let counts = lines
//!     .flat_map(|line: String| line.split_whitespace().map(str::to_string).collect::<Vec<_>>())
//!     .map(|word| (word, 1u64))
//!     .reduce_by_key(|a, b| a + b, 4);
//! let batch = counts.collect_latest(ExecutionMode::Batch)?;
//! let streaming = counts.collect_latest(ExecutionMode::Streaming)?;
//! assert_eq!(batch, streaming);
//! assert_eq!(batch["b"], 3);
//! # Ok(()) }
//! ```
//!
//! Records are typed (serde): keys cross an exchange in an order-preserving
//! encoding (memcomparable, so the service's bytewise key order is the
//! key's `Ord`), values in postcard.
//!
//! Users plug in their own systems with [`Source`]/[`SourceReader`]
//! ([`Engine::source`]) and [`Sink`]/[`SinkWriter`] ([`Dataset::run`]).
//! The sinks and [`Dataset::run`] block until the job ends; from inside a
//! tokio application use [`Dataset::run_async`], [`Dataset::collect_async`]
//! and the other `_async` calls, or [`Dataset::start`] and [`Job::wait_async`]
//! (a [`Job`] also gives its [`JobMetrics`] while it runs). Operators that
//! buffer hold reservations from [`EngineOptions::memory`] and spill;
//! streaming jobs checkpoint and recover with [`EngineOptions::checkpoints`]
//! into a [`StateBackend`]. All settings go through one [`EngineBuilder`].

mod checkpoint;
mod dataset;
mod engine;
mod error;
mod exchange;
mod exchange_reader;
mod executor;
mod job;
mod join;
mod keyed;
mod map;
mod memory;
mod metrics;
mod sink;
mod sorter;
mod source;
mod spill;
mod state;
mod task;
pub mod workload;

pub use checkpoint::CheckpointOptions;
pub use dataset::{Data, Dataset};
pub use engine::{Engine, EngineBuilder, EngineOptions, ExecutionMode};
pub use error::EngineError;
pub use exchange::hash_partition;
pub use exchange::{Exchange, Key, Value};
pub use executor::{MAX_LOSS_RECOVERIES, MapRerun};
pub use job::{Job, JobReport};
pub use join::JoinOptions;
pub use metrics::{CheckpointMetrics, CheckpointOutcome, JobMetrics, RestartMetrics, StageMetrics, TaskMetrics};
pub use shuffle_client::{ClientOptions, ExchangeMode};
pub use sink::{Sink, SinkWriter};
pub use source::{RateSource, Source, SourceReader, StopHandle};
pub use state::{LocalStateBackend, StateBackend, StateHandle};
pub use task::BATCH_RECORDS;
