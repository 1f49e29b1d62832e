//! What a cluster's processes tell each other (DESIGN.md, "Cluster"): where
//! a shuffle's partitions live ([`Placement`]), what a worker reports when it
//! registers ([`WorkerReport`]), and how a resumed read says where it was
//! ([`ResumePoint`]).
//!
//! A shuffle's partitions are spread over *groups*; a group is one worker
//! (replication 1) or a primary and its replica on two different workers
//! (replication 2), and holds every map's blocks for its partitions. Writers
//! push a partition's blocks to its group's primary, which forwards each one
//! to the replica; readers read a partition from either copy.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{AppId, AppSecret, AttemptId, MapId, PartitionId, ShuffleId, ShuffleSpec};

/// Most workers a cluster places shuffles on, 4096: placements name workers
/// by a 16-bit index, and a placement naming every worker stays far below
/// the frame limit (about 100 bytes per worker).
pub const MAX_WORKERS: usize = 4096;

/// Longest worker id, in bytes: ids are host or pod names.
pub const MAX_WORKER_ID_LEN: usize = 128;

/// What a server process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerRole {
    /// Coordinator and worker in one process: the single-node service.
    Standalone,
    /// Places shuffles on workers and decides commits; holds no data.
    Coordinator,
    /// Holds the partitions the coordinator places on it.
    Worker,
}

/// A worker as clients and other workers reach it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerEndpoint {
    /// The worker's stable id (kept in its data dir across restarts).
    pub id: String,
    /// Its QUIC address.
    pub addr: SocketAddr,
}

/// The copies of a group of partitions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Indexes into [`Placement::workers`]: the primary first, then the
    /// replica if the group has one. Empty once every copy is lost and no
    /// live worker can take the group.
    pub copies: Vec<u16>,
    /// Maps whose committed blocks in this group were lost with every copy
    /// of it: they must be re-run (their new attempts push to this group
    /// only). Empty for a healthy group.
    pub lost_maps: Vec<MapId>,
}

/// Where a shuffle's partitions live. Changes (a new `version`) when a
/// worker is lost and its groups move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Grows with every change.
    pub version: u64,
    /// The shuffle's spec (its mode and codec tell writers how to write;
    /// its replication, how many copies a group has).
    pub spec: ShuffleSpec,
    /// Every worker the placement names.
    pub workers: Vec<WorkerEndpoint>,
    /// The groups.
    pub groups: Vec<Group>,
    /// Per partition, its group (an index into `groups`).
    pub partition_groups: Vec<u32>,
}

impl Placement {
    /// The group of `partition`, if the partition and its group exist.
    pub fn group_of(&self, partition: PartitionId) -> Option<(u32, &Group)> {
        let g = *self.partition_groups.get(partition as usize)?;
        Some((g, self.groups.get(g as usize)?))
    }

    /// The endpoint of worker index `index`.
    pub fn worker(&self, index: u16) -> Option<&WorkerEndpoint> {
        self.workers.get(usize::from(index))
    }

    /// The index of the worker with id `id`.
    pub fn index_of(&self, id: &str) -> Option<u16> {
        self.workers.iter().position(|w| w.id == id).map(|i| i as u16)
    }

    /// Checks the placement is self-consistent for `partitions` partitions.
    pub fn validate(&self, partitions: u32) -> Result<(), String> {
        if self.partition_groups.len() != partitions as usize {
            return Err(format!(
                "the placement maps {} partitions, the shuffle has {partitions}",
                self.partition_groups.len()
            ));
        }
        if let Some(g) = self.partition_groups.iter().find(|g| **g as usize >= self.groups.len()) {
            return Err(format!("a partition is placed in group {g} of {}", self.groups.len()));
        }
        for (i, group) in self.groups.iter().enumerate() {
            if group.copies.len() > 2 {
                return Err(format!("group {i} has {} copies", group.copies.len()));
            }
            if group.copies.iter().any(|c| usize::from(*c) >= self.workers.len()) {
                return Err(format!("group {i} names a worker the placement does not list"));
            }
            if group.copies.len() == 2 && group.copies[0] == group.copies[1] {
                return Err(format!("group {i} has its primary and replica on one worker"));
            }
        }
        Ok(())
    }
}

/// What the coordinator says about a map attempt that is about to push.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapPlan {
    /// Push every partition per the placement of this version.
    Push { placement_version: u64 },
    /// The map is committed, but its blocks in these groups were lost:
    /// push only the partitions of these groups (its other partitions keep
    /// the committed attempt's blocks).
    Repair { placement_version: u64, groups: Vec<u32> },
}

/// One map's decided attempt, as the coordinator records it on a worker,
/// for every group of the shuffle the worker holds a copy of (a re-run
/// after a loss is recorded only on the lost groups' new copies). The
/// worker commits the totals it verified when the attempt's `MapEnd`
/// reached it (`Prepared`); a group in `groups_with_data` for which it
/// prepared nothing is a copy that lacks the map's blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapDecision {
    /// The map.
    pub map: MapId,
    /// Its committed attempt.
    pub attempt: AttemptId,
    /// The groups the attempt wrote blocks to.
    pub groups_with_data: Vec<u32>,
    /// A re-run that replaces blocks lost with every copy of their groups:
    /// recorded only by copies of groups that lost the map (the others
    /// keep the map's first decision).
    pub repair: bool,
}

/// A shuffle a worker holds, as it reports it when it registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldShuffle {
    /// The app and its secret.
    pub app: AppId,
    pub secret: AppSecret,
    /// The shuffle.
    pub shuffle: ShuffleId,
    pub spec: ShuffleSpec,
    /// The placement the worker was last given.
    pub placement: Placement,
    /// The worker's copies of the shuffle's groups.
    pub groups: Vec<HeldGroup>,
}

/// A worker's copy of one group of a shuffle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldGroup {
    /// The group.
    pub group: u32,
    /// The maps decided in this copy, and their attempts.
    pub decided: Vec<(MapId, AttemptId)>,
    /// The decided maps with blocks in this copy.
    pub maps_with_data: Vec<MapId>,
}

/// What a worker tells the coordinator about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerReport {
    /// Where clients and workers reach it.
    pub endpoint: WorkerEndpoint,
    /// Its memory budget and how much of it is in use.
    pub memory_budget: u64,
    pub memory_used: u64,
    /// Its data dir's filesystem: size, free bytes, and the reserve it keeps.
    pub disk_total: u64,
    pub disk_free: u64,
    pub disk_reserve: u64,
    /// Readers it is serving now.
    pub active_readers: u32,
    /// Whether it is draining (decommission): place nothing new on it.
    pub decommissioning: bool,
}

/// A reader's progress in one map's blocks of a partition: the first
/// `blocks` blocks of `attempt` arrived. A resumed read skips them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    pub map: MapId,
    pub attempt: AttemptId,
    pub blocks: u32,
}

/// Checks a worker id: 1 to [`MAX_WORKER_ID_LEN`] bytes of `[A-Za-z0-9._-]`.
pub fn validate_worker_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= MAX_WORKER_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!("worker id {id:?} is not 1 to {MAX_WORKER_ID_LEN} characters of [A-Za-z0-9._-]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement() -> Placement {
        let worker =
            |i: u16| WorkerEndpoint { id: format!("w{i}"), addr: format!("127.0.0.{}:7000", i + 2).parse().unwrap() };
        Placement {
            version: 1,
            spec: ShuffleSpec::hash(4, 3).replicated(2),
            workers: (0..3).map(worker).collect(),
            groups: vec![
                Group { copies: vec![0, 1], lost_maps: vec![] },
                Group { copies: vec![2, 0], lost_maps: vec![] },
            ],
            partition_groups: vec![0, 1, 0],
        }
    }

    #[test]
    fn placements_are_checked_for_consistency() {
        let p = placement();
        assert!(p.validate(3).is_ok());
        assert!(p.validate(4).is_err());
        assert_eq!(p.group_of(1).unwrap().0, 1);
        assert_eq!(p.index_of("w2"), Some(2));
        let mut same = p.clone();
        same.groups[0].copies = vec![1, 1];
        assert!(same.validate(3).unwrap_err().contains("one worker"));
        let mut dangling = p;
        dangling.partition_groups[2] = 9;
        assert!(dangling.validate(3).is_err());
    }

    #[test]
    fn worker_ids_are_names() {
        assert!(validate_worker_id("worker-0.shuffle").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_worker_id(bad).is_err(), "{bad:?}");
        }
    }
}
