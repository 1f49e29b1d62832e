//! Shared pieces of the end-to-end tests and examples: the standard workload
//! generators of `shared/WORKLOADS.md` ([`workload`]), a W1 runner over a
//! real client ([`exchange`]), and a helper that runs the `shuffle-server`
//! binary as a child process ([`daemon`]).

pub mod daemon;
pub mod exchange;
pub mod raw;
pub use engine_adapter::workload;
