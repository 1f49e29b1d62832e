//! Shared pieces of the end-to-end tests and examples: the standard workload
//! generators of `shared/WORKLOADS.md` ([`workload`]) and the W1 and W3
//! runners over a real client ([`exchange`]), both from the engine's
//! workload module, a raw frame-level client for bad input ([`raw`]), and a
//! helper that runs the `shuffle-server` binary as a child process ([`daemon`]).

pub mod chaos;
pub mod cluster;
pub mod daemon;
pub use engine_adapter::workload::client as exchange;
pub mod raw;
pub use engine_adapter::workload;
