//! The commit rule of one shuffle, as a plain state machine (DESIGN.md,
//! "Visibility and commit"): the first attempt of a map to end is committed,
//! later attempts are refused, and the shuffle is complete when all M maps
//! have committed. No I/O and no clock, so every rule is unit-tested here.

use shuffle_protocol::{AttemptId, ErrorKind, MapCommit, MapEnd, MapId, PartitionId, PartitionTotals, ServiceError};

/// What ending an attempt decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitDecision {
    /// This attempt is the map's committed output.
    Committed,
    /// Another attempt committed first.
    Refused { committed_attempt: AttemptId },
}

/// The committed attempt of one map and what it declared per partition.
#[derive(Clone, Debug)]
struct CommittedMap {
    /// The winning attempt.
    attempt: AttemptId,
    /// Its declared totals, ascending by partition, non-empty partitions only.
    totals: Vec<PartitionTotals>,
}

/// Commit state of every map of a shuffle.
#[derive(Debug)]
pub struct MapCommits {
    /// Label used in error messages, e.g. `shuffle 3 of app x`.
    label: String,
    /// Per map: its committed attempt, if any.
    committed: Vec<Option<CommittedMap>>,
    /// Per map: attempts that ended (committed or refused); short, as retries are few.
    ended: Vec<Vec<AttemptId>>,
    /// Per map: attempts whose push stream broke without `MapEnd`. Their ids
    /// may not be reused: blocks of the broken stream may still be stored.
    abandoned: Vec<Vec<AttemptId>>,
    /// Attempts with a push stream open now; one stream per attempt.
    pushing: std::collections::HashSet<(MapId, AttemptId)>,
    /// Number of maps with a committed attempt.
    committed_count: usize,
}

impl MapCommits {
    /// Commit state for `maps` maps, none committed.
    pub fn new(label: String, maps: u32) -> Self {
        Self {
            label,
            committed: vec![None; maps as usize],
            ended: vec![Vec::new(); maps as usize],
            abandoned: vec![Vec::new(); maps as usize],
            pushing: std::collections::HashSet::new(),
            committed_count: 0,
        }
    }

    /// Number of maps with a committed attempt.
    pub fn committed_count(&self) -> usize {
        self.committed_count
    }

    /// Whether every map has committed.
    pub fn is_complete(&self) -> bool {
        self.committed_count == self.committed.len()
    }

    /// Checks that `attempt` of `map` may (still) push blocks.
    pub fn check_push(&self, map: MapId, attempt: AttemptId) -> Result<(), ServiceError> {
        let label = &self.label;
        let Some(committed) = self.committed.get(map as usize) else {
            return Err(ServiceError::new(
                ErrorKind::MapOutOfRange,
                format!("map {map} is out of range for {label}, which has {} maps", self.committed.len()),
            ));
        };
        if self.ended[map as usize].contains(&attempt) {
            return Err(ServiceError::new(
                ErrorKind::DuplicateMapEnd,
                format!("map {map} attempt {attempt} of {label} has already ended"),
            ));
        }
        if self.abandoned[map as usize].contains(&attempt) {
            return Err(ServiceError::new(
                ErrorKind::UnexpectedMessage,
                format!("map {map} attempt {attempt} of {label} was abandoned; retry with a new attempt id"),
            ));
        }
        if self.is_complete() {
            return Err(ServiceError::new(
                ErrorKind::ShuffleSealed,
                format!("{label} is sealed: all its maps have committed, so map {map} attempt {attempt} may not write"),
            ));
        }
        if let Some(c) = committed {
            return Err(ServiceError::new(
                ErrorKind::AttemptSuperseded,
                format!("map {map} of {label} was committed by attempt {}; attempt {attempt} is discarded", c.attempt),
            ));
        }
        Ok(())
    }

    /// Starts a push stream for an attempt: checks it may push and that no
    /// other stream is pushing for it.
    pub fn begin_push(&mut self, map: MapId, attempt: AttemptId) -> Result<(), ServiceError> {
        self.check_push(map, attempt)?;
        if !self.pushing.insert((map, attempt)) {
            return Err(ServiceError::new(
                ErrorKind::UnexpectedMessage,
                format!("map {map} attempt {attempt} of {} is already pushing on another stream", self.label),
            ));
        }
        Ok(())
    }

    /// Ends a push stream: with `MapEnd` handled (`abandoned` false) or broken.
    pub fn end_push(&mut self, map: MapId, attempt: AttemptId, abandoned: bool) {
        self.pushing.remove(&(map, attempt));
        if abandoned
            && let Some(list) = self.abandoned.get_mut(map as usize)
            && !self.ended[map as usize].contains(&attempt)
        {
            list.push(attempt);
        }
    }

    /// Whether a block of an attempt in flight is kept: `false` (drop it
    /// unstored) once another attempt of its map has committed, since this
    /// attempt can only be refused at its end.
    pub fn keeps_blocks_of(&self, map: MapId, attempt: AttemptId) -> Result<bool, ServiceError> {
        match self.check_push(map, attempt) {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.kind, ErrorKind::AttemptSuperseded | ErrorKind::ShuffleSealed) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Ends an attempt whose totals the caller has checked against what it received.
    pub fn end(&mut self, end: MapEnd) -> Result<CommitDecision, ServiceError> {
        let (map, attempt) = (end.map, end.attempt);
        if (map as usize) >= self.committed.len() {
            return self.check_push(map, attempt).map(|_| unreachable!("map out of range"));
        }
        if self.ended[map as usize].contains(&attempt) {
            return Err(ServiceError::new(
                ErrorKind::DuplicateMapEnd,
                format!("duplicate MapEnd: map {map} attempt {attempt} of {} has already ended", self.label),
            ));
        }
        self.ended[map as usize].push(attempt);
        match &self.committed[map as usize] {
            Some(c) => Ok(CommitDecision::Refused { committed_attempt: c.attempt }),
            None => {
                self.committed[map as usize] = Some(CommittedMap { attempt, totals: end.partitions });
                self.committed_count += 1;
                Ok(CommitDecision::Committed)
            }
        }
    }

    /// Records a decision made elsewhere (a cluster's coordinator): `end`'s
    /// attempt is its map's committed attempt. The map must not be committed yet.
    pub fn decide(&mut self, end: MapEnd) -> Result<(), ServiceError> {
        let map = end.map;
        if (map as usize) >= self.committed.len() {
            return self.check_push(map, end.attempt).map(|_| unreachable!("map out of range"));
        }
        if self.committed[map as usize].is_some() {
            return Err(ServiceError::new(
                ErrorKind::UnexpectedMessage,
                format!("map {map} of {} is already committed", self.label),
            ));
        }
        if !self.ended[map as usize].contains(&end.attempt) {
            self.ended[map as usize].push(end.attempt);
        }
        self.committed[map as usize] = Some(CommittedMap { attempt: end.attempt, totals: end.partitions });
        self.committed_count += 1;
        Ok(())
    }

    /// Every committed map: its attempt and declared totals.
    pub fn committed_maps(&self) -> impl Iterator<Item = (MapId, AttemptId, &[PartitionTotals])> + '_ {
        self.committed
            .iter()
            .enumerate()
            .filter_map(|(m, c)| c.as_ref().map(|c| (m as MapId, c.attempt, c.totals.as_slice())))
    }

    /// The committed attempt of `map`, if any.
    pub fn committed_attempt(&self, map: MapId) -> Option<AttemptId> {
        self.committed.get(map as usize)?.as_ref().map(|c| c.attempt)
    }

    /// Per map, the committed attempt and its totals for `partition`; `None` until complete.
    pub fn partition_commits(&self, partition: PartitionId) -> Option<Vec<MapCommit>> {
        if !self.is_complete() {
            return None;
        }
        let commits = self.committed.iter().enumerate().map(|(map, c)| {
            let c = c.as_ref().expect("complete shuffles have every map committed");
            let totals = c
                .totals
                .binary_search_by_key(&partition, |t| t.partition)
                .map(|i| c.totals[i])
                .unwrap_or(PartitionTotals::new(partition));
            MapCommit { map: map as MapId, attempt: c.attempt, totals }
        });
        Some(commits.collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(map: MapId, attempt: AttemptId, blocks: u32) -> MapEnd {
        let totals = PartitionTotals { partition: 1, blocks, records: u64::from(blocks) * 10, checksum: blocks };
        MapEnd { map, attempt, partitions: vec![totals] }
    }

    #[test]
    fn first_attempt_to_end_wins_and_later_ones_are_refused() {
        let mut c = MapCommits::new("shuffle 0".into(), 2);
        assert_eq!(c.end(end(0, 1, 5)), Ok(CommitDecision::Committed));
        assert_eq!(c.end(end(0, 0, 7)), Ok(CommitDecision::Refused { committed_attempt: 1 }));
        assert_eq!(c.committed_attempt(0), Some(1));
        assert!(!c.is_complete());
        assert_eq!(c.check_push(0, 2).unwrap_err().kind, ErrorKind::AttemptSuperseded);
        assert_eq!(c.keeps_blocks_of(0, 2), Ok(false), "an attempt in flight keeps going, unstored");
        assert_eq!(c.keeps_blocks_of(1, 0), Ok(true));
        assert_eq!(c.end(end(1, 0, 2)), Ok(CommitDecision::Committed));
        assert!(c.is_complete());
        assert_eq!(c.check_push(1, 1).unwrap_err().kind, ErrorKind::ShuffleSealed);
    }

    #[test]
    fn duplicate_map_end_is_an_error() {
        let mut c = MapCommits::new("shuffle 0".into(), 2);
        c.end(end(0, 0, 1)).unwrap();
        assert_eq!(c.end(end(0, 0, 1)).unwrap_err().kind, ErrorKind::DuplicateMapEnd);
        assert_eq!(c.check_push(0, 0).unwrap_err().kind, ErrorKind::DuplicateMapEnd);
    }

    #[test]
    fn out_of_range_map_is_an_error() {
        let mut c = MapCommits::new("shuffle 0".into(), 2);
        assert_eq!(c.end(end(2, 0, 1)).unwrap_err().kind, ErrorKind::MapOutOfRange);
        assert_eq!(c.check_push(9, 0).unwrap_err().kind, ErrorKind::MapOutOfRange);
    }

    #[test]
    fn an_abandoned_attempt_id_cannot_be_reused_and_one_stream_pushes_per_attempt() {
        let mut c = MapCommits::new("shuffle 0".into(), 2);
        c.begin_push(0, 0).unwrap();
        assert!(c.begin_push(0, 0).is_err(), "a second stream for the same attempt");
        c.end_push(0, 0, true);
        let e = c.begin_push(0, 0).unwrap_err();
        assert!(e.message.contains("abandoned"), "{}", e.message);
        c.begin_push(0, 1).unwrap();
        c.end_push(0, 1, false);
        assert_eq!(c.end(end(0, 1, 1)), Ok(CommitDecision::Committed));
    }

    #[test]
    fn partition_commits_list_every_map_once_complete() {
        let mut c = MapCommits::new("shuffle 0".into(), 2);
        c.end(end(0, 3, 4)).unwrap();
        assert_eq!(c.partition_commits(1), None);
        c.end(MapEnd { map: 1, attempt: 0, partitions: vec![] }).unwrap();
        let commits = c.partition_commits(1).unwrap();
        assert_eq!(commits.len(), 2);
        assert_eq!((commits[0].attempt, commits[0].totals.blocks), (3, 4));
        assert_eq!(commits[1].totals, PartitionTotals::new(1));
    }
}
