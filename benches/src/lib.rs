//! The benchmark harness of the shuffle service (`shuffle-bench`): the
//! standard workloads of `shared/WORKLOADS.md` ([`workloads`]) through raw
//! client calls (`engine_adapter::workload::client`) or the engine, baselines of the machine
//! measured in the same run ([`baseline`]), and the human, JSON and
//! Markdown reports with charts ([`report`]).

pub mod baseline;
pub mod cluster;
pub mod failover;
pub mod progress;
pub mod report;
pub mod rss;
pub mod workloads;
