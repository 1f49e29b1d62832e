//! Shared pieces of the end-to-end tests and examples: the standard workload
//! generators of `shared/WORKLOADS.md` ([`workload`], from the engine), the
//! W1 and W3 runners over a real client ([`exchange`], from the benchmark
//! harness), and a helper that runs the `shuffle-server`
//! binary as a child process ([`daemon`]).

pub mod daemon;
pub use shuffle_bench::exchange;
pub mod raw;
pub use engine_adapter::workload;
