//! The benchmark harness of the shuffle service (`shuffle-bench`): the
//! standard workloads of `shared/WORKLOADS.md` ([`workloads`]) through raw
//! client calls ([`exchange`]) or the engine, baselines of the machine
//! measured in the same run ([`baseline`]), and the human, JSON and
//! Markdown reports with charts ([`report`]).

pub mod baseline;
pub mod exchange;
pub mod progress;
pub mod report;
pub mod rss;
pub mod workloads;
