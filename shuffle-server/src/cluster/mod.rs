//! Cluster mode (DESIGN.md, "Cluster"): a coordinator that places shuffles
//! on workers and decides commits, and workers that hold the groups of
//! partitions placed on them, replicate blocks to each other and register
//! and heartbeat with the coordinator.
//!
//! - [`placement`]: where a new shuffle's partitions go (pure).
//! - [`coordinator`]: the coordinator's soft state as a state machine (pure);
//!   [`service`] runs it behind a QUIC endpoint and delivers its commands.
//! - [`hosted`]: a worker's copies of a shuffle's groups, with the ledger
//!   that makes resent blocks harmless; [`push`] and [`read`] serve them.
//! - [`worker`]: a worker's registration, heartbeats and the coordinator's
//!   commands; [`peers`]: QUIC connections between cluster processes and the
//!   primary→replica forwarding of blocks.

pub mod coordinator;
pub mod hosted;
pub mod peers;
pub mod placement;
pub mod push;
pub mod read;
pub mod service;
pub mod worker;

/// Compares a presented cluster secret with ours, in constant time.
pub fn cluster_secret_matches(ours: Option<&str>, presented: &str) -> bool {
    ours.is_some_and(|ours| crate::auth::secrets_match(ours, presented))
}
