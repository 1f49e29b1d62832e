//! A worker's part of one shuffle: its copies of the shuffle's groups
//! ([`GroupCopy`]), each a [`Shuffle`] of its own (commit rule and
//! storage), and the placement that says which groups are its own.
//!
//! Blocks of one map attempt may reach a copy on more than one stream (a
//! primary forwards them; a writer whose primary was lost sends the ones
//! not yet acknowledged again), so a copy keeps a ledger per attempt: a
//! block whose sequence number it already has is dropped, one that skips a
//! number is refused. At the attempt's `MapEnd` the ledger must equal the
//! declared totals (`Prepared`); the coordinator's decision then commits it.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shuffle_protocol::{
    AppId, AppSecret, AttemptId, BlockHeader, ErrorKind, HeldGroup, HeldShuffle, MapDecision, MapId, PartitionId,
    PartitionTotals, Placement, ServiceError, ShuffleId, ShuffleSpec,
};

use crate::{
    memory::Reservation,
    shuffle::{Recorded, Shuffle},
    storage::{
        SpillTarget, StorageEnv, lock,
        manifest::{self, CommitRecord, SHUFFLE_MANIFEST, ShuffleManifest},
    },
};

/// File name of a hosted shuffle's manifest, in its directory.
pub const HOSTED_MANIFEST: &str = "hosted.manifest";

/// What happened to a block offered to a copy.
#[derive(Debug)]
pub enum Accepted {
    /// Stored; spill this buffer now if given.
    Stored(Option<SpillTarget>),
    /// Dropped unstored: the copy already has a block of this sequence
    /// number, or another attempt of the map has been decided (this one
    /// can only be refused at its end).
    Dropped,
}

/// One attempt's blocks in one copy, so far.
#[derive(Clone, Debug, Default)]
struct AttemptLedger {
    /// Per partition: the totals of the blocks stored, in sequence.
    partitions: BTreeMap<PartitionId, PartitionTotals>,
    /// Set once its `MapEnd` matched (it awaits the coordinator's decision).
    prepared: bool,
}

/// A worker's copy of one group of a shuffle.
pub struct GroupCopy {
    /// The group.
    pub group: u32,
    /// Its commit rule and storage.
    pub shuffle: Arc<Shuffle>,
    /// Per attempt: what arrived.
    ledger: Mutex<HashMap<(MapId, AttemptId), AttemptLedger>>,
}

impl GroupCopy {
    fn new(group: u32, shuffle: Shuffle) -> Self {
        Self { group, shuffle: Arc::new(shuffle), ledger: Mutex::new(HashMap::new()) }
    }

    /// Stores one checked block of an attempt, in sequence order per
    /// partition: a sequence number the copy has is a duplicate (dropped),
    /// one past the next expected is an error.
    pub fn accept(&self, header: &BlockHeader, bytes: Bytes, memory: Reservation) -> Result<Accepted, ServiceError> {
        let id = header.id;
        if self.superseded(id.map, id.attempt) {
            return Ok(Accepted::Dropped);
        }
        let mut ledger = lock(&self.ledger);
        let entry = ledger.entry((id.map, id.attempt)).or_default();
        let next = entry.partitions.get(&id.partition).map_or(0, |t| t.blocks);
        if id.sequence < next {
            return Ok(Accepted::Dropped);
        }
        if id.sequence > next || entry.prepared {
            return Err(ServiceError::new(
                ErrorKind::IntegrityMismatch,
                format!(
                    "block {} of partition {} from map {} attempt {} of {} arrived where block {next} was expected{}",
                    id.sequence,
                    id.partition,
                    id.map,
                    id.attempt,
                    self.shuffle.label(),
                    if entry.prepared { " (the attempt has ended)" } else { "" }
                ),
            ));
        }
        // Stored under the ledger's lock, so the copy's order is sequence order.
        let spill = self.shuffle.append(header, bytes, memory)?;
        entry.partitions.entry(id.partition).or_insert_with(|| PartitionTotals::new(id.partition)).add(header);
        Ok(Accepted::Stored(spill))
    }

    /// Whether another attempt of `map` has been decided in this copy.
    fn superseded(&self, map: MapId, attempt: AttemptId) -> bool {
        self.shuffle.committed_attempt(map).is_some_and(|a| a != attempt)
    }

    /// Checks an attempt's declared totals for this group's partitions
    /// against what arrived, and marks it prepared.
    pub fn prepare(&self, map: MapId, attempt: AttemptId, declared: &[PartitionTotals]) -> Result<(), ServiceError> {
        if self.superseded(map, attempt) {
            // Its blocks were dropped as they came; the coordinator refuses it.
            return Ok(());
        }
        let mut ledger = lock(&self.ledger);
        let entry = ledger.entry((map, attempt)).or_default();
        let declared: BTreeMap<PartitionId, PartitionTotals> =
            declared.iter().filter(|t| t.blocks > 0).map(|t| (t.partition, *t)).collect();
        for partition in declared.keys().chain(entry.partitions.keys()) {
            let want = declared.get(partition).copied().unwrap_or(PartitionTotals::new(*partition));
            let got = entry.partitions.get(partition).copied().unwrap_or(PartitionTotals::new(*partition));
            if want != got {
                return Err(ServiceError::new(
                    ErrorKind::IntegrityMismatch,
                    format!(
                        "map {map} attempt {attempt} of {} declared {} blocks / {} records (checksum {:#010x}) for \
                         partition {partition}, but this copy holds {} blocks / {} records (checksum {:#010x})",
                        self.shuffle.label(),
                        want.blocks,
                        want.records,
                        want.checksum,
                        got.blocks,
                        got.records,
                        got.checksum
                    ),
                ));
            }
        }
        entry.prepared = true;
        Ok(())
    }

    /// Records the coordinator's decision for this copy. A decided map
    /// whose blocks were lost with every copy of this group (`lost`) waits
    /// for its re-run unless this is the re-run's decision.
    fn decide(&self, decision: &MapDecision, lost: bool) -> Result<Recorded, ServiceError> {
        let (map, attempt) = (decision.map, decision.attempt);
        if decision.repair && !lost {
            // A re-run for groups that lost the map; this copy keeps its blocks.
            return Ok(Recorded::Already);
        }
        let writes_here = decision.groups_with_data.contains(&self.group);
        let prepared = {
            let ledger = lock(&self.ledger);
            ledger.get(&(map, attempt)).filter(|l| l.prepared).map(|l| l.partitions.values().copied().collect())
        };
        if lost && writes_here && prepared.is_none() {
            // The original attempt's decision again (a rebuild records every
            // decision everywhere): this group waits for the re-run.
            return Ok(Recorded::Already);
        }
        let totals: Vec<PartitionTotals> = match prepared {
            Some(totals) => totals,
            None => {
                if writes_here && self.shuffle.committed_attempt(map).is_none() {
                    tracing::warn!(
                        copy = %self.shuffle.label(), map, attempt,
                        "this copy lacks the committed attempt's blocks; readers will read the other copy"
                    );
                    self.shuffle.mark_lacking(map, attempt);
                }
                Vec::new()
            }
        };
        let recorded = self.shuffle.record_decision(map, attempt, totals)?;
        if recorded != Recorded::Already {
            lock(&self.ledger).retain(|(m, a), _| *m != map || *a == attempt);
        }
        Ok(recorded)
    }

    /// Attempts verified at their `MapEnd` and not decided yet, with their totals.
    fn prepared_records(&self) -> Vec<CommitRecord> {
        let ledger = lock(&self.ledger);
        let mut out: Vec<CommitRecord> = ledger
            .iter()
            .filter(|((m, _), l)| l.prepared && self.shuffle.committed_attempt(*m).is_none())
            .map(|((m, a), l)| CommitRecord { map: *m, attempt: *a, totals: l.partitions.values().copied().collect() })
            .collect();
        out.sort_by_key(|r| (r.map, r.attempt));
        out
    }

    /// Whether the attempt's `MapEnd` was verified here (it may be decided yet).
    pub fn is_prepared(&self, map: MapId, attempt: AttemptId) -> bool {
        lock(&self.ledger).get(&(map, attempt)).is_some_and(|l| l.prepared)
    }

    /// Forgets an attempt that can no longer commit here (its push stream
    /// broke before `MapEnd`): frees its blocks.
    pub fn abandon(&self, map: MapId, attempt: AttemptId) {
        if !self.is_prepared(map, attempt) {
            lock(&self.ledger).remove(&(map, attempt));
            self.shuffle.drop_attempt(map, attempt);
        }
    }
}

/// What a graceful shutdown writes for a hosted shuffle (its groups' copies
/// have manifests of their own, in `group-G` directories).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct HostedManifest {
    format: u32,
    app: String,
    secret: String,
    shuffle: u32,
    spec: ShuffleSpec,
    placement: Placement,
    /// The copies' groups.
    groups: Vec<u32>,
}

/// A worker's part of one shuffle.
pub struct HostedShuffle {
    pub app: AppId,
    pub secret: AppSecret,
    pub id: ShuffleId,
    pub spec: ShuffleSpec,
    /// This worker's id.
    me: String,
    /// The placement, as the coordinator last sent it.
    placement: RwLock<Arc<Placement>>,
    /// Copies of the groups this worker holds.
    copies: Mutex<BTreeMap<u32, Arc<GroupCopy>>>,
    /// `apps/<app>/shuffle-<id>`.
    dir: PathBuf,
    env: StorageEnv,
    removed: AtomicBool,
}

impl HostedShuffle {
    /// A shuffle this worker starts to hold.
    pub fn new(
        (app, secret): (AppId, AppSecret),
        id: ShuffleId,
        spec: ShuffleSpec,
        me: String,
        dir: PathBuf,
        env: StorageEnv,
    ) -> Self {
        let placement =
            Placement { version: 0, spec, workers: Vec::new(), groups: Vec::new(), partition_groups: Vec::new() };
        Self {
            app,
            secret,
            id,
            spec,
            me,
            placement: RwLock::new(Arc::new(placement)),
            copies: Mutex::new(BTreeMap::new()),
            dir,
            env,
            removed: AtomicBool::new(false),
        }
    }

    /// `shuffle S of app A`, for messages.
    pub fn label(&self) -> String {
        format!("shuffle {} of app {}", self.id, self.app)
    }

    /// The placement now.
    pub fn placement(&self) -> Arc<Placement> {
        self.placement.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// This worker's index in the placement.
    pub fn my_index(&self) -> Option<u16> {
        self.placement().index_of(&self.me)
    }

    /// Applies a placement from the coordinator: creates copies of groups
    /// new to this worker (recording the maps `decided` without blocks in
    /// them) and drops copies of groups that are no longer its own. Older
    /// placements are ignored. Blocking I/O (directories).
    pub fn apply_placement(
        &self,
        placement: Placement,
        decided: &[(u32, MapId, AttemptId)],
    ) -> Result<Vec<Arc<Shuffle>>, ServiceError> {
        placement
            .validate(self.spec.partitions)
            .map_err(|why| ServiceError::new(ErrorKind::Malformed, format!("{}: {why}", self.label())))?;
        if placement.version < self.placement().version {
            return Ok(Vec::new());
        }
        let me = placement.index_of(&self.me);
        let mine: Vec<u32> = placement
            .groups
            .iter()
            .enumerate()
            .filter(|(_, g)| me.is_some_and(|i| g.copies.contains(&i)))
            .map(|(g, _)| g as u32)
            .collect();
        let mut dropped = Vec::new();
        {
            let mut copies = lock(&self.copies);
            for g in &mine {
                if !copies.contains_key(g) {
                    let shuffle = Shuffle::create_copy(
                        self.app.clone(),
                        self.id,
                        *g,
                        self.spec,
                        self.dir.join(format!("group-{g}")),
                        self.env.clone(),
                    )?;
                    let copy = Arc::new(GroupCopy::new(*g, shuffle));
                    for (_, map, attempt) in decided.iter().filter(|(group, _, _)| group == g) {
                        copy.shuffle.record_decision(*map, *attempt, Vec::new())?;
                    }
                    copies.insert(*g, copy);
                }
            }
            let gone: Vec<u32> = copies.keys().filter(|g| !mine.contains(g)).copied().collect();
            for g in gone {
                if let Some(copy) = copies.remove(&g) {
                    dropped.push(copy.shuffle.clone());
                }
            }
        }
        *self.placement.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(placement);
        Ok(dropped)
    }

    /// The copy of `group`, if this worker holds one.
    pub fn copy(&self, group: u32) -> Option<Arc<GroupCopy>> {
        lock(&self.copies).get(&group).cloned()
    }

    /// Every copy.
    pub fn copies(&self) -> Vec<Arc<GroupCopy>> {
        lock(&self.copies).values().cloned().collect()
    }

    /// The group of `partition` and this worker's copy of it.
    pub fn copy_for(&self, partition: PartitionId) -> Result<(u32, Arc<GroupCopy>), ServiceError> {
        let placement = self.placement();
        let (group, entry) = placement.group_of(partition).ok_or_else(|| {
            ServiceError::new(
                ErrorKind::PartitionOutOfRange,
                format!("partition {partition} is out of range for {}", self.label()),
            )
        })?;
        let copy = self.copy(group).ok_or_else(|| {
            let holders: Vec<String> = entry
                .copies
                .iter()
                .filter_map(|c| placement.worker(*c).map(|w| format!("{} ({})", w.id, w.addr)))
                .collect();
            ServiceError::new(
                ErrorKind::WrongRole,
                format!(
                    "partition {partition} of {} is held by {}, not by this worker ({})",
                    self.label(),
                    if holders.is_empty() { "no worker now".to_string() } else { holders.join(" and ") },
                    self.me
                ),
            )
        })?;
        Ok((group, copy))
    }

    /// Whether this worker is the primary of `group` (its first copy).
    pub fn is_primary(&self, group: u32) -> bool {
        let placement = self.placement();
        let me = placement.index_of(&self.me);
        placement.groups.get(group as usize).and_then(|g| g.copies.first().copied()) == me && me.is_some()
    }

    /// Whether this worker may hold `group`'s blocks without its replica
    /// `replica` (which it could not reach): only once the coordinator's
    /// placement no longer lists the replica among the group's copies and
    /// still lists this worker. `Ok(false)` while the placement still names
    /// the replica (the coordinator has not declared it lost: this worker
    /// may be the one cut off); an error once this worker no longer holds
    /// the group (the coordinator moved it or dropped the shuffle here).
    pub fn holds_without(&self, group: u32, replica: &str) -> Result<bool, ServiceError> {
        self.check_held(group)?;
        let placement = self.placement();
        let copies = placement.groups.get(group as usize).map(|g| g.copies.as_slice()).unwrap_or(&[]);
        Ok(!copies.iter().any(|c| placement.worker(*c).is_some_and(|w| w.id == replica)))
    }

    /// An error unless this worker still holds a copy of `group`: the
    /// coordinator may have dropped the shuffle here (this worker was
    /// declared lost and came back) or moved the group away.
    pub fn check_held(&self, group: u32) -> Result<(), ServiceError> {
        if self.removed.load(Ordering::Acquire) {
            return Err(ServiceError::new(
                ErrorKind::UnknownShuffle,
                format!("{} was dropped from this worker ({}) by the coordinator", self.label(), self.me),
            ));
        }
        let placement = self.placement();
        let me = placement.index_of(&self.me);
        let listed = placement.groups.get(group as usize).is_some_and(|g| me.is_some_and(|i| g.copies.contains(&i)));
        if !listed || self.copy(group).is_none() {
            return Err(ServiceError::new(
                ErrorKind::WrongRole,
                format!("group {group} of {} is no longer held by this worker ({})", self.label(), self.me),
            ));
        }
        Ok(())
    }

    /// The replica of `group`, if this worker is its primary and it has one.
    pub fn replica_of(&self, group: u32) -> Option<shuffle_protocol::WorkerEndpoint> {
        let placement = self.placement();
        let g = placement.groups.get(group as usize)?;
        if g.copies.first().copied() != placement.index_of(&self.me) {
            return None;
        }
        g.copies.get(1).and_then(|c| placement.worker(*c)).cloned()
    }

    /// Maps whose blocks in `partition`'s group were lost and are not re-run yet.
    pub fn lost_maps(&self, group: u32, copy: &GroupCopy) -> Vec<MapId> {
        let placement = self.placement();
        placement
            .groups
            .get(group as usize)
            .map(|g| g.lost_maps.iter().copied().filter(|m| copy.shuffle.committed_attempt(*m).is_none()).collect())
            .unwrap_or_default()
    }

    /// Records the coordinator's decisions on every copy; the first
    /// conflicting decision found, if any, is returned (it stands).
    pub fn decide(&self, decisions: &[MapDecision]) -> Result<Option<(MapId, AttemptId)>, ServiceError> {
        let placement = self.placement();
        let mut conflict = None;
        for copy in self.copies() {
            let lost = placement.groups.get(copy.group as usize).map(|g| g.lost_maps.as_slice()).unwrap_or(&[]);
            for d in decisions {
                if let Recorded::Conflict(other) = copy.decide(d, lost.contains(&d.map))? {
                    conflict.get_or_insert((d.map, other));
                }
            }
        }
        Ok(conflict)
    }

    /// What this worker holds, for its registration.
    pub fn held(&self) -> HeldShuffle {
        let groups = self
            .copies()
            .iter()
            .map(|c| HeldGroup {
                group: c.group,
                decided: c.shuffle.decided(),
                maps_with_data: c.shuffle.maps_with_data(),
            })
            .collect();
        HeldShuffle {
            app: self.app.clone(),
            secret: self.secret.clone(),
            shuffle: self.id,
            spec: self.spec,
            placement: (*self.placement()).clone(),
            groups,
        }
    }

    /// Marks the shuffle removed and deletes every copy. Blocking I/O.
    pub fn remove(&self) {
        if self.removed.swap(true, Ordering::AcqRel) {
            return;
        }
        for copy in std::mem::take(&mut *lock(&self.copies)).into_values() {
            copy.shuffle.remove();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Spills and syncs every copy and writes the manifests, so that the
    /// next start holds the shuffle again (graceful shutdown). Blocking I/O.
    pub fn persist(&self) -> Result<(), ServiceError> {
        let copies = self.copies();
        for copy in &copies {
            copy.shuffle.spill_all()?;
            copy.shuffle.persist_with(copy.prepared_records())?;
        }
        let record = HostedManifest {
            format: manifest::MANIFEST_FORMAT,
            app: self.app.to_string(),
            secret: self.secret.0.clone(),
            shuffle: self.id.0,
            spec: self.spec,
            placement: (*self.placement()).clone(),
            groups: copies.iter().map(|c| c.group).collect(),
        };
        manifest::write(&self.dir, HOSTED_MANIFEST, &record)
    }

    /// Loads a hosted shuffle a graceful shutdown left in `dir`; `None` if
    /// it has no manifest. Blocking I/O.
    pub fn recover(dir: &Path, me: &str, env: StorageEnv) -> Result<Option<Self>, ServiceError> {
        let Some(record) = manifest::take::<HostedManifest>(dir, HOSTED_MANIFEST)? else { return Ok(None) };
        let app = AppId::new(record.app.clone()).map_err(ServiceError::from)?;
        let hosted = Self::new(
            (app.clone(), AppSecret(record.secret)),
            ShuffleId(record.shuffle),
            record.spec,
            me.to_string(),
            dir.to_path_buf(),
            env.clone(),
        );
        *hosted.placement.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(record.placement);
        for g in record.groups {
            let group_dir = dir.join(format!("group-{g}"));
            let Some(m) = manifest::take::<ShuffleManifest>(&group_dir, SHUFFLE_MANIFEST)? else {
                return Err(ServiceError::new(
                    ErrorKind::Io,
                    format!("{} has no manifest for its copy of group {g}", dir.display()),
                ));
            };
            let prepared = m.prepared.clone();
            let shuffle = Shuffle::recover(app.clone(), Some(g), m, group_dir, env.clone())?;
            let copy = GroupCopy::new(g, shuffle);
            {
                let mut ledger = lock(&copy.ledger);
                for p in prepared {
                    let partitions = p.totals.iter().map(|t| (t.partition, *t)).collect();
                    ledger.insert((p.map, p.attempt), AttemptLedger { partitions, prepared: true });
                }
            }
            lock(&hosted.copies).insert(g, Arc::new(copy));
        }
        Ok(Some(hosted))
    }
}
