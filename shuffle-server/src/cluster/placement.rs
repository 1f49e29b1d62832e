//! Where a new shuffle's partitions go: a pure function of the live workers
//! and their free capacity, so the policy is tested without a network.
//!
//! The policy (DESIGN.md, "Cluster"):
//! - Only live workers that are not draining, and have room on disk (more
//!   free than their reserve), take new shuffles.
//! - Every such worker is the primary of one group. With replication 2 the
//!   group's replica is the next such worker in id order (a ring), so a
//!   primary and its replica are never one worker, and every worker holds
//!   at most one group as primary and one as replica of each shuffle.
//! - Partitions go to groups in proportion to the primary's weight: half its
//!   free memory and half its free disk (above the reserve), each as a
//!   fraction of its capacity. A worker with twice the free room takes
//!   about twice the partitions. Partitions are interleaved (smooth weighted
//!   round robin), and each shuffle starts the rotation at a different
//!   worker, so equal workers share the partitions of many small shuffles evenly.

use shuffle_protocol::WorkerReport;

/// A worker that may take new partitions, and how much.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// The worker's id.
    pub id: String,
    /// Its weight (see [`weight`]); workers of weight 0 take nothing.
    pub weight: f64,
}

/// The groups of a new shuffle: each group's copies (indices into the
/// candidates, primary first) and each partition's group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub groups: Vec<Vec<usize>>,
    pub partition_groups: Vec<u32>,
}

/// How much new data a worker can take, in (0, 1]; 0 when it cannot take
/// any (its disk is at the reserve, or it reports no capacity).
pub fn weight(report: &WorkerReport) -> f64 {
    if report.disk_free <= report.disk_reserve || report.memory_budget == 0 {
        return 0.0;
    }
    let memory = report.memory_budget.saturating_sub(report.memory_used) as f64 / report.memory_budget as f64;
    let usable_disk = report.disk_total.saturating_sub(report.disk_reserve).max(1) as f64;
    let disk = (report.disk_free - report.disk_reserve) as f64 / usable_disk;
    // A worker with a little room still takes a little: never exactly 0 here.
    (0.5 * memory.clamp(0.0, 1.0) + 0.5 * disk.clamp(0.0, 1.0)).max(1e-3)
}

/// Lays out `partitions` partitions with `replication` copies over
/// `candidates` (sorted by id); `rotation` varies where the interleaving starts.
pub fn place(partitions: u32, replication: u8, candidates: &[Candidate], rotation: u64) -> Result<Layout, String> {
    let eligible: Vec<usize> = (0..candidates.len()).filter(|&i| candidates[i].weight > 0.0).collect();
    if eligible.is_empty() {
        return Err("no live worker has room for a new shuffle".into());
    }
    if usize::from(replication) > eligible.len() {
        return Err(format!(
            "replication {replication} needs {replication} live workers with room; the cluster has {}",
            eligible.len()
        ));
    }
    let groups: Vec<Vec<usize>> = (0..eligible.len())
        .map(|k| (0..usize::from(replication)).map(|c| eligible[(k + c) % eligible.len()]).collect())
        .collect();
    // Smooth weighted round robin over the groups, by their primary's weight.
    let weights: Vec<f64> = eligible.iter().map(|&i| candidates[i].weight).collect();
    let total: f64 = weights.iter().sum();
    let mut current = vec![0.0f64; groups.len()];
    let n = groups.len();
    let start = (rotation % n as u64) as usize;
    // Ties go to the group nearest after the rotation's start.
    let rank = |i: usize| (i + n - start) % n;
    let mut partition_groups = Vec::with_capacity(partitions as usize);
    for _ in 0..partitions {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let chosen = (0..n)
            .max_by(|&a, &b| current[a].total_cmp(&current[b]).then(rank(b).cmp(&rank(a))))
            .expect("at least one group");
        current[chosen] -= total;
        partition_groups.push(chosen as u32);
    }
    Ok(Layout { groups, partition_groups })
}

/// The best `count` hosts for a group that moves (its copies were lost):
/// the heaviest candidates not in `exclude`, ties broken by id order.
pub fn choose_hosts(candidates: &[Candidate], exclude: &[&str], count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].weight > 0.0 && !exclude.contains(&candidates[i].id.as_str()))
        .collect();
    order.sort_by(|&a, &b| candidates[b].weight.total_cmp(&candidates[a].weight).then(a.cmp(&b)));
    order.truncate(count);
    order
}

#[cfg(test)]
mod tests {
    use shuffle_protocol::WorkerEndpoint;

    use super::*;

    fn candidates(weights: &[f64]) -> Vec<Candidate> {
        weights.iter().enumerate().map(|(i, w)| Candidate { id: format!("w{i}"), weight: *w }).collect()
    }

    fn counts(layout: &Layout) -> Vec<usize> {
        let mut counts = vec![0; layout.groups.len()];
        for g in &layout.partition_groups {
            counts[*g as usize] += 1;
        }
        counts
    }

    #[test]
    fn a_primary_and_its_replica_are_never_one_worker() {
        for n in 2..8 {
            let layout = place(100, 2, &candidates(&vec![1.0; n]), 3).unwrap();
            assert_eq!(layout.groups.len(), n);
            for copies in &layout.groups {
                assert_eq!(copies.len(), 2);
                assert_ne!(copies[0], copies[1]);
            }
            // Every worker is primary once and replica once.
            for w in 0..n {
                assert_eq!(layout.groups.iter().filter(|c| c[0] == w).count(), 1);
                assert_eq!(layout.groups.iter().filter(|c| c[1] == w).count(), 1);
            }
        }
    }

    #[test]
    fn partitions_follow_free_capacity_and_interleave() {
        let layout = place(400, 1, &candidates(&[1.0, 0.5, 0.5]), 0).unwrap();
        assert_eq!(counts(&layout), vec![200, 100, 100]);
        // Interleaved: no group gets a long run of consecutive partitions.
        let longest_run = layout.partition_groups.windows(3).filter(|w| w[0] == w[1] && w[1] == w[2]).count();
        assert_eq!(longest_run, 0, "{:?}", &layout.partition_groups[..20]);
    }

    #[test]
    fn full_or_draining_workers_take_nothing_and_too_few_workers_is_an_error() {
        let layout = place(10, 1, &candidates(&[0.0, 1.0, 0.0]), 5).unwrap();
        assert_eq!(layout.groups, vec![vec![1]]);
        assert!(layout.partition_groups.iter().all(|g| *g == 0));
        assert!(place(10, 2, &candidates(&[0.0, 1.0]), 0).unwrap_err().contains("needs 2"));
        assert!(place(10, 1, &candidates(&[0.0]), 0).unwrap_err().contains("no live worker"));
    }

    #[test]
    fn equal_workers_share_small_shuffles_by_rotation() {
        let c = candidates(&[1.0, 1.0, 1.0]);
        let firsts: Vec<u32> = (0..3).map(|r| place(1, 1, &c, r).unwrap().partition_groups[0]).collect();
        let mut sorted = firsts.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2], "{firsts:?}");
    }

    #[test]
    fn weights_come_from_free_memory_and_disk_above_the_reserve() {
        let report = |used: u64, free: u64| WorkerReport {
            endpoint: WorkerEndpoint { id: "w".into(), addr: "127.0.0.1:1".parse().unwrap() },
            memory_budget: 100,
            memory_used: used,
            disk_total: 1100,
            disk_free: free,
            disk_reserve: 100,
            active_readers: 0,
            decommissioning: false,
        };
        assert!((weight(&report(0, 1100)) - 1.0).abs() < 1e-9);
        assert!((weight(&report(50, 600)) - 0.5).abs() < 1e-9);
        assert_eq!(weight(&report(0, 100)), 0.0, "at the reserve");
        assert!(weight(&report(100, 101)) > 0.0, "a little room is still room");
    }

    #[test]
    fn moved_groups_go_to_the_roomiest_workers_left() {
        let c = candidates(&[0.9, 0.2, 0.7, 0.0]);
        assert_eq!(choose_hosts(&c, &["w0"], 2), vec![2, 1]);
        assert_eq!(choose_hosts(&c, &["w0", "w1", "w2"], 1), Vec::<usize>::new());
    }
}
