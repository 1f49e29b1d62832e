//! Pushes at a worker: one map attempt's blocks for the groups this worker
//! holds, from a writer (to the groups' primary, or to the replica when the
//! primary was lost) or from a primary (to its replica).
//!
//! A primary stores each block in its copy and forwards it to the group's
//! replica. With replication 2 it tells the writer, as cumulative `Acked`
//! counts, which blocks both copies hold, so a writer whose primary dies
//! sends the replica only the blocks not acknowledged (the replica's ledger
//! drops any it already has). At `MapEnd` every copy checks the declared
//! totals and the primary waits for the replica's verdict before answering
//! `Prepared`; the coordinator's decision commits the attempt later.
//!
//! A replica that cannot be reached is left behind, but the primary goes
//! on alone only once the coordinator's placement confirms it: the replica
//! is no longer a copy of the group and the primary still is. Until then
//! the blocks the replica lacks are not acknowledged and `MapEnd` is not
//! answered, since the primary may be the one cut off: a worker declared
//! lost drops the shuffle when it comes back, and its answers then tell the
//! writer to move to the replica with the blocks it still has. The left
//! replica's copy, lacking blocks, is marked incomplete when the decision
//! reaches it (readers then read the primary).

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use shuffle_protocol::{
    AttemptId, ErrorKind, FrameKind, MapEnd, MapId, PartitionTotals, Request, Response, ServiceError, WorkerEndpoint,
};
use tokio::io::AsyncRead;

use super::{
    hosted::{Accepted, GroupCopy, HostedShuffle},
    peers::{Forward, Peers},
};
use crate::{
    push::{expect_end_of_stream, request_name, spawn_spill},
    state::ServiceState,
    transport::{FrameReader, FrameSink, FrameWriter},
};

/// How often a replicated push stream reports what both copies hold.
const ACK_INTERVAL: Duration = Duration::from_millis(5);

/// How often a primary whose replica was left behind looks for the
/// coordinator's placement that confirms it.
const CONFIRM_POLL: Duration = Duration::from_millis(20);

/// How often a primary whose replica was left behind probes it.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// Probes a replica left behind until it answers (aborted when dropped).
struct ReplicaProbe {
    answered: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl ReplicaProbe {
    fn start(peers: &Arc<Peers>, replica: &WorkerEndpoint) -> Self {
        let answered = Arc::new(AtomicBool::new(false));
        let (peers, replica, flag) = (peers.clone(), replica.clone(), answered.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_INTERVAL).await;
                match peers.answers(replica.addr, &replica.id).await {
                    Ok(()) => {
                        peers.replicas_back.fetch_add(1, Ordering::Relaxed);
                        flag.store(true, Ordering::Release);
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(replica = %replica.id, error = %e, "the replica left behind does not answer yet")
                    }
                }
            }
        });
        Self { answered, task }
    }

    fn answered(&self) -> bool {
        self.answered.load(Ordering::Acquire)
    }
}

impl Drop for ReplicaProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Who is pushing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushKind {
    /// A writer, to the primary of the groups it writes.
    Primary,
    /// A writer whose primary was lost, to the replica.
    Failover,
    /// A primary, forwarding to its replica.
    Replica,
}

/// A group this stream wrote to.
struct Target {
    copy: Arc<GroupCopy>,
    /// Forwarding to the replica, while it works.
    forward: Option<Forward>,
    /// The replica, when this worker is a replicated group's primary.
    replica: Option<WorkerEndpoint>,
    /// Set once forwarding to the replica failed: blocks count as held only
    /// when the placement no longer lists the replica, which must happen
    /// by this deadline.
    confirm_by: Option<Instant>,
    /// Probes the replica once forwarding to it failed.
    probe: Option<ReplicaProbe>,
}

impl Target {
    /// Whether every copy that must hold this group's blocks holds the
    /// block forwarded as number `index` (0: not forwarded). A replica left
    /// behind and not confirmed lost by its deadline is an error: the writer
    /// then moves to the replica itself.
    fn holds(&self, hosted: &HostedShuffle, group: u32, index: u64) -> Result<bool, ServiceError> {
        match (&self.forward, &self.replica, self.confirm_by) {
            (Some(forward), _, _) => Ok(forward.acked() >= index),
            (None, Some(replica), Some(deadline)) => {
                if hosted.holds_without(group, &replica.id)? {
                    Ok(true)
                } else if self.probe.as_ref().is_some_and(ReplicaProbe::answered) {
                    Err(ServiceError::new(
                        ErrorKind::Unavailable,
                        format!(
                            "forwarding to the replica {} of group {group} of {} broke, and the replica answers \
                             again: it lacks blocks this copy could not forward, so the writer must move to it",
                            replica.id,
                            hosted.label()
                        ),
                    ))
                } else if Instant::now() >= deadline {
                    Err(ServiceError::new(
                        ErrorKind::Unavailable,
                        format!(
                            "the replica {} of group {group} of {} cannot be reached and the coordinator \
                             has not declared it lost: this copy alone cannot hold the blocks",
                            replica.id,
                            hosted.label()
                        ),
                    ))
                } else {
                    Ok(false)
                }
            }
            (None, _, _) => Ok(true),
        }
    }

    /// Forwarding failed: the replica is left behind until `wait` from
    /// now, and probed meanwhile.
    fn leave_replica(&mut self, peers: Option<&Arc<Peers>>, label: &str, error: &ServiceError, wait: Duration) {
        tracing::warn!(
            %label, replica = ?self.replica.as_ref().map(|r| &r.id), %error,
            "forwarding to the replica failed; the primary goes on alone once the coordinator confirms the replica lost"
        );
        self.forward = None;
        self.confirm_by.get_or_insert(Instant::now() + wait);
        if let (None, Some(peers), Some(replica)) = (&self.probe, peers, &self.replica) {
            self.probe = Some(ReplicaProbe::start(peers, replica));
        }
    }
}

/// Serves one push stream at a worker after `PushAccepted` was decided.
pub async fn handle_push<R: AsyncRead + Unpin + Send, W: FrameSink>(
    state: &Arc<ServiceState>,
    peers: Option<&Arc<Peers>>,
    hosted: Arc<HostedShuffle>,
    (map, attempt): (MapId, AttemptId),
    kind: PushKind,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
) -> Result<(), ServiceError> {
    let label = format!("map {map} attempt {attempt} of {} ({kind:?} push)", hosted.label());
    writer.response(&Response::PushAccepted { spec: hosted.spec }).await?;
    let mut targets: BTreeMap<u32, Target> = BTreeMap::new();
    let result = receive(state, peers, &hosted, (map, attempt), kind, &label, &mut targets, reader, writer).await;
    if result.is_err() {
        for target in targets.values() {
            if kind == PushKind::Primary {
                // The writer's stream broke: what it pushed here cannot
                // commit here, unless this copy verified its `MapEnd`
                // before (the wait for the replica failed after it): then
                // the writer may commit the attempt at the replica, and the
                // decision will find the blocks here too.
                let prepared = target.copy.is_prepared(map, attempt);
                target.copy.shuffle.end_push(map, attempt, !prepared);
                target.copy.abandon(map, attempt);
            }
        }
    } else if kind == PushKind::Primary {
        for target in targets.values() {
            target.copy.shuffle.end_push(map, attempt, false);
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn receive<R: AsyncRead + Unpin + Send, W: FrameSink>(
    state: &Arc<ServiceState>,
    peers: Option<&Arc<Peers>>,
    hosted: &Arc<HostedShuffle>,
    (map, attempt): (MapId, AttemptId),
    kind: PushKind,
    label: &str,
    targets: &mut BTreeMap<u32, Target>,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
) -> Result<(), ServiceError> {
    let acks = hosted.spec.replication > 1;
    // How long a primary waits for the coordinator to confirm a replica it
    // cannot reach lost (it declares a worker lost after `worker_timeout`).
    let wait = state.config.worker_timeout * 3;
    // Per block of this stream: its group and its index in the group's
    // forwarding (0: not forwarded).
    let mut pending: VecDeque<(u32, u64)> = VecDeque::new();
    let (mut received, mut acked, mut reported) = (0u64, 0u64, 0u64);
    let mut tick = tokio::time::interval(ACK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let frame = tokio::select! {
            frame = reader.next_frame() => frame?,
            _ = tick.tick(), if acks && reported < received => {
                acked += settle(&mut pending, hosted, targets)?;
                if acked > reported {
                    writer.response(&Response::Acked { blocks: acked }).await?;
                    reported = acked;
                }
                continue;
            }
        };
        let Some((frame, memory)) = frame else {
            return Err(ServiceError::new(
                ErrorKind::UnexpectedMessage,
                format!("push stream of {label} ended without MapEnd"),
            ));
        };
        match frame.kind {
            FrameKind::Block => {
                let block = crate::push::pushed_block(frame.payload, (map, attempt), label)?;
                let id = block.header.id;
                let (group, copy) = hosted.copy_for(id.partition)?;
                if !targets.contains_key(&group) {
                    if targets.is_empty() {
                        // The stream's frames count against the (first) copy it writes to.
                        reader.account_to(&copy.shuffle.core.memory);
                    }
                    let target = open_target(hosted, peers, group, copy, (map, attempt), kind, wait).await?;
                    targets.insert(group, target);
                }
                let target = targets.get_mut(&group).expect("inserted above");
                let len = block.bytes.len() as u64;
                let stored = target.copy.accept(&block.header, block.bytes.clone(), memory)?;
                if let Accepted::Stored(Some(spill)) = stored {
                    spawn_spill(target.copy.shuffle.clone(), spill);
                }
                let mut index = 0;
                if let Some(forward) = &mut target.forward {
                    match forward.send(block.bytes).await {
                        Ok(()) => index = forward.sent,
                        Err(e) => target.leave_replica(peers, label, &e, wait),
                    }
                }
                received += 1;
                if acks {
                    pending.push_back((group, index));
                }
                state.stats.received(hosted.spec.mode, len);
            }
            FrameKind::Request => match Request::decode(&frame.payload)? {
                Request::MapEnd(end) => {
                    prepare(hosted, peers, label, (map, attempt), kind, end, targets, wait).await?;
                    if acks {
                        writer.response(&Response::Acked { blocks: received }).await?;
                    }
                    writer.response(&Response::Prepared { map, attempt }).await?;
                    return expect_end_of_stream(reader, label).await;
                }
                other => {
                    return Err(ServiceError::new(
                        ErrorKind::UnexpectedMessage,
                        format!("{} request on the push stream of {label}", request_name(&other)),
                    ));
                }
            },
            FrameKind::Response => {
                return Err(ServiceError::new(
                    ErrorKind::UnexpectedMessage,
                    format!("response frame on the push stream of {label}"),
                ));
            }
        }
    }
}

/// Checks that this worker may take `kind` pushes for `group`, and opens
/// the forwarding to the replica if it is the primary of a replicated group.
async fn open_target(
    hosted: &Arc<HostedShuffle>,
    peers: Option<&Arc<Peers>>,
    group: u32,
    copy: Arc<GroupCopy>,
    (map, attempt): (MapId, AttemptId),
    kind: PushKind,
    wait: Duration,
) -> Result<Target, ServiceError> {
    let mut target = Target { copy, forward: None, replica: None, confirm_by: None, probe: None };
    match kind {
        PushKind::Primary => {
            if !hosted.is_primary(group) {
                return Err(ServiceError::new(
                    ErrorKind::WrongRole,
                    format!(
                        "this worker holds the replica of group {group} of {}, not its primary: push to the primary, \
                         or open a failover push if the primary is lost",
                        hosted.label()
                    ),
                ));
            }
            target.copy.shuffle.begin_push(map, attempt)?;
            if let (Some(replica), Some(peers)) = (hosted.replica_of(group), peers) {
                let open = Forward::open(peers, replica.addr, (hosted.app.clone(), hosted.id), (map, attempt));
                // A replica that died before this worker reached it would
                // hold the push up for the whole connect time-out: stop
                // waiting once the coordinator has dropped it from the group.
                let dropped = async {
                    loop {
                        tokio::time::sleep(CONFIRM_POLL).await;
                        if hosted.holds_without(group, &replica.id).unwrap_or(false) {
                            return;
                        }
                    }
                };
                let opened = tokio::select! {
                    biased;
                    opened = open => opened,
                    () = dropped => Err(ServiceError::new(
                        ErrorKind::Io,
                        format!("the coordinator dropped replica {} while this worker was connecting to it", replica.id),
                    )),
                };
                target.replica = Some(replica);
                match opened {
                    Ok(f) => target.forward = Some(f),
                    Err(e) => {
                        target.leave_replica(Some(peers), &format!("group {group} of {}", hosted.label()), &e, wait)
                    }
                }
            }
        }
        PushKind::Failover | PushKind::Replica => target.copy.shuffle.check_push(map, attempt)?,
    }
    Ok(target)
}

/// Pops the blocks that every copy holds now; returns how many.
fn settle(
    pending: &mut VecDeque<(u32, u64)>,
    hosted: &HostedShuffle,
    targets: &BTreeMap<u32, Target>,
) -> Result<u64, ServiceError> {
    let mut n = 0;
    while let Some(&(group, index)) = pending.front() {
        if !targets.get(&group).map_or(Ok(true), |t| t.holds(hosted, group, index))? {
            break;
        }
        pending.pop_front();
        n += 1;
    }
    Ok(n)
}

/// Checks the attempt's declared totals in every copy it wrote to and has
/// the replicas check theirs; a replica left behind must be confirmed lost
/// by the coordinator within `wait` of its failure.
#[allow(clippy::too_many_arguments)]
async fn prepare(
    hosted: &Arc<HostedShuffle>,
    peers: Option<&Arc<Peers>>,
    label: &str,
    (map, attempt): (MapId, AttemptId),
    kind: PushKind,
    end: MapEnd,
    targets: &mut BTreeMap<u32, Target>,
    wait: Duration,
) -> Result<(), ServiceError> {
    if (end.map, end.attempt) != (map, attempt) {
        return Err(ServiceError::new(
            ErrorKind::UnexpectedMessage,
            format!("MapEnd for map {} attempt {} on the push stream of {label}", end.map, end.attempt),
        ));
    }
    let mut by_group: BTreeMap<u32, Vec<PartitionTotals>> = BTreeMap::new();
    for t in end.partitions.iter().filter(|t| t.blocks > 0) {
        let (group, copy) = hosted.copy_for(t.partition)?;
        by_group.entry(group).or_default().push(*t);
        if kind == PushKind::Failover && !targets.contains_key(&group) {
            // The lost primary had forwarded every block the writer still
            // had to resend: this copy holds them from its replica stream.
            copy.shuffle.check_push(map, attempt)?;
            targets.insert(group, Target { copy, forward: None, replica: None, confirm_by: None, probe: None });
        }
    }
    if let Some(g) = by_group.keys().find(|g| !targets.contains_key(g)) {
        return Err(ServiceError::new(
            ErrorKind::IntegrityMismatch,
            format!("{label} declared blocks for group {g}, but none arrived on this stream"),
        ));
    }
    for (group, target) in targets.iter() {
        target.copy.prepare(map, attempt, by_group.get(group).map(Vec::as_slice).unwrap_or(&[]))?;
    }
    for (group, target) in targets.iter_mut() {
        let Some(forward) = &mut target.forward else { continue };
        let partitions = by_group.remove(group).unwrap_or_default();
        match forward.end(MapEnd { map, attempt, partitions }).await {
            Ok(()) => {}
            Err(e) if e.kind == ErrorKind::IntegrityMismatch => {
                // The copies disagree: the attempt cannot commit.
                return Err(ServiceError::new(
                    ErrorKind::IntegrityMismatch,
                    format!("the replica of group {group} disagrees about {label}: {}", e.message),
                ));
            }
            Err(e) => target.leave_replica(peers, label, &e, wait),
        }
    }
    for (group, target) in targets.iter() {
        hosted.check_held(*group)?;
        while !target.holds(hosted, *group, 0)? {
            tokio::time::sleep(CONFIRM_POLL).await;
        }
    }
    Ok(())
}
