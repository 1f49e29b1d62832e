//! Streaming checkpoints: barriers, aligned snapshots, and the coordinator
//! that triggers them and decides when one is complete.
//!
//! The protocol is Flink's aligned checkpointing, at this engine's scale:
//!
//! 1. Every `interval`, the coordinator triggers checkpoint `n` (one at a
//!    time). Each source task, between two batches, sees the trigger,
//!    snapshots its position and sends barrier `n` down its chain.
//! 2. A map task that receives barrier `n` from its chain writes it to every
//!    partition of its exchange, behind all its records before it (a control
//!    record, see [`Control`]), and snapshots its chain's state.
//! 3. A reader of a hybrid exchange partition receives the records of every
//!    upstream map interleaved. When barrier `n` arrives from one map, the
//!    reader holds back what that map sends after it (in memory, within the
//!    alignment budget) until barrier `n` has come from every map still
//!    running; then it passes barrier `n` on and releases what it held. A
//!    task with two inputs (a join) aligns them the same way. Operators'
//!    state then reflects exactly the records before the barrier.
//! 4. Each task's snapshot (source position, operator state, sink's pending
//!    output) is serialized in the task (the synchronous part) and written
//!    to the [`StateBackend`] on a blocking thread while the task goes on
//!    (the asynchronous part); then the task acknowledges.
//! 5. When every task has acknowledged `n` (or had finished before it), the
//!    coordinator writes the checkpoint's manifest, tells the sinks (which
//!    commit the output they had staged up to `n`), and discards the older
//!    checkpoint.
//!
//! A map whose input ends writes an end marker to every partition: readers
//! count a finished map as aligned for every later barrier, and the
//! coordinator counts a finished task as having acknowledged every later
//! checkpoint. A task that cannot snapshot (its alignment buffer is full,
//! its state could not be written) declines: it passes a cancel marker on,
//! and the checkpoint fails; the next one is triggered as usual.
//!
//! When a task fails, the executor stops every task, drops the job's
//! exchanges, and starts every task again on fresh exchanges from the last
//! complete checkpoint: sources reopen at their positions, operators and
//! sinks get their state back, and records after the checkpoint are
//! replayed by the sources. So each record's effect on operator state and
//! on exactly-once sinks is counted once.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::{
    EngineError,
    metrics::{CheckpointMetrics, CheckpointOutcome, JobStats},
    state::{CheckpointManifest, SharedBackend, Snapshot, StateHandle, TaskCheckpoint},
};

/// How a streaming job checkpoints and recovers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointOptions {
    /// Time from one checkpoint's trigger to the next (at most one is in flight).
    pub interval: Duration,
    /// A checkpoint not complete after this long fails.
    pub timeout: Duration,
    /// Restarts allowed without a checkpoint completing in between; one
    /// more failure fails the job.
    pub max_restarts: u32,
    /// Pause between a failure and the restart.
    pub restart_delay: Duration,
    /// Most bytes a task may hold back while aligning one checkpoint's
    /// barriers (from the engine's memory budget); past it, the task
    /// declines the checkpoint instead of holding more.
    pub alignment_buffer: usize,
}

impl CheckpointOptions {
    /// Checkpoints every `interval`, with the other settings at their defaults.
    pub fn every(interval: Duration) -> Self {
        Self { interval, ..Self::default() }
    }
}

impl Default for CheckpointOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(600),
            max_restarts: 3,
            restart_delay: Duration::from_millis(100),
            alignment_buffer: 16 << 20,
        }
    }
}

/// A control record: travels an exchange in order with the records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Control {
    /// Checkpoint `n`'s barrier.
    Barrier(u64),
    /// Checkpoint `n` was given up upstream.
    Cancel(u64),
    /// The map writing this partition has ended.
    End,
}

/// The creation time control records carry: no record is that old or new.
pub(crate) const CONTROL_STAMP: u64 = u64::MAX;

impl Control {
    /// The value of a control record (its key is empty).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut value = CONTROL_STAMP.to_le_bytes().to_vec();
        postcard::to_io(self, &mut value).expect("control records always serialize");
        value
    }

    /// The control record in a streaming record's value, if it is one.
    pub(crate) fn decode(value: &[u8]) -> Result<Option<Self>, String> {
        match value.split_first_chunk::<8>() {
            Some((stamp, rest)) if u64::from_le_bytes(*stamp) == CONTROL_STAMP => {
                postcard::from_bytes(rest).map(Some).map_err(|e| format!("a control record: {e}"))
            }
            _ => Ok(None),
        }
    }
}

/// What tasks tell the coordinator.
#[derive(Debug)]
pub(crate) enum TaskEvent {
    /// `task` wrote its state for `checkpoint`.
    Ack { checkpoint: u64, task: Arc<str>, handle: StateHandle, bytes: u64, sync: Duration },
    /// `task` cannot take part in `checkpoint`.
    Decline { checkpoint: u64, task: Arc<str>, reason: String },
    /// A map task ended: its input ended and its output is all written.
    Finished { task: Arc<str> },
    /// A result task's input ended; it waits for the job's end to commit.
    InputEnded { task: Arc<str> },
}

/// One task's link to the coordinator.
pub(crate) struct TaskCheckpointing {
    /// The task's name in manifests.
    pub task: Arc<str>,
    pub job: Arc<str>,
    pub backend: SharedBackend,
    /// The latest checkpoint triggered.
    pub trigger: watch::Receiver<u64>,
    /// The latest checkpoint completed.
    pub completed: watch::Receiver<u64>,
    /// Becomes true when every task has finished its input: result tasks commit and end.
    pub job_end: watch::Receiver<bool>,
    pub events: mpsc::UnboundedSender<TaskEvent>,
    /// Most bytes a reader may hold back while aligning.
    pub alignment_buffer: usize,
}

impl TaskCheckpointing {
    fn send(&self, event: TaskEvent) {
        // The coordinator is gone only when the run is being torn down.
        let _ = self.events.send(event);
    }

    /// Writes `snapshot` for `checkpoint` on a blocking thread, then acknowledges
    /// (or declines, if the backend fails). The task goes on meanwhile.
    pub(crate) fn persist(&self, checkpoint: u64, snapshot: Snapshot, sync: Duration) {
        let (backend, job, task, events) =
            (self.backend.clone(), self.job.clone(), self.task.clone(), self.events.clone());
        let bytes = snapshot.size();
        tokio::task::spawn_blocking(move || {
            let mut reader = snapshot.into_reader();
            let event = match backend.write(&job, checkpoint, &task, &mut reader) {
                Ok(handle) => TaskEvent::Ack { checkpoint, task, handle, bytes, sync },
                Err(e) => TaskEvent::Decline { checkpoint, task, reason: format!("writing its state: {e}") },
            };
            let _ = events.send(event);
        });
    }

    pub(crate) fn decline(&self, checkpoint: u64, reason: String) {
        self.send(TaskEvent::Decline { checkpoint, task: self.task.clone(), reason });
    }

    pub(crate) fn finished(&self) {
        self.send(TaskEvent::Finished { task: self.task.clone() });
    }

    pub(crate) fn input_ended(&self) {
        self.send(TaskEvent::InputEnded { task: self.task.clone() });
    }

    /// The newest checkpoint triggered after `last`, if any.
    pub(crate) fn triggered_after(&self, last: u64) -> Option<u64> {
        let latest = *self.trigger.borrow();
        (latest > last).then_some(latest)
    }
}

/// A checkpoint in flight.
struct Pending {
    id: u64,
    started: Instant,
    triggered_at: Duration,
    acks: HashMap<Arc<str>, (StateHandle, u64)>,
    max_sync: Duration,
}

/// The signals a run's tasks watch.
pub(crate) struct Signals {
    trigger: watch::Sender<u64>,
    completed: watch::Sender<u64>,
    job_end: watch::Sender<bool>,
    events: mpsc::UnboundedSender<TaskEvent>,
}

/// Triggers checkpoints, collects acknowledgements, completes checkpoints
/// and says when the job's input has ended everywhere. One per job; its
/// ids and last complete checkpoint outlive restarts.
pub(crate) struct Coordinator {
    options: CheckpointOptions,
    backend: SharedBackend,
    job: Arc<str>,
    stats: Arc<JobStats>,
    next_id: u64,
    /// The latest complete checkpoint.
    pub last_complete: Option<CheckpointManifest>,
}

/// What one run of the job needs to talk to the coordinator.
pub(crate) struct RunLink {
    events: mpsc::UnboundedReceiver<TaskEvent>,
    signals: Signals,
    pending: Option<Pending>,
    finished: HashSet<Arc<str>>,
    input_ended: HashSet<Arc<str>>,
    last_trigger: Instant,
    ended: bool,
}

impl Coordinator {
    pub(crate) fn new(options: CheckpointOptions, backend: SharedBackend, job: Arc<str>, stats: Arc<JobStats>) -> Self {
        Self { options, backend, job, stats, next_id: 1, last_complete: None }
    }

    /// Signals for a new run of the job (after a restart: new watches, ids going on).
    pub(crate) fn new_run(&self) -> RunLink {
        let base = self.last_complete.as_ref().map_or(0, |m| m.checkpoint);
        let (events_tx, events) = mpsc::unbounded_channel();
        RunLink {
            events,
            signals: Signals {
                trigger: watch::Sender::new(base),
                completed: watch::Sender::new(base),
                job_end: watch::Sender::new(false),
                events: events_tx,
            },
            pending: None,
            finished: HashSet::new(),
            input_ended: HashSet::new(),
            last_trigger: Instant::now(),
            ended: false,
        }
    }

    /// One task's link for `run`.
    pub(crate) fn task_link(&self, run: &RunLink, task: Arc<str>) -> Arc<TaskCheckpointing> {
        Arc::new(TaskCheckpointing {
            task,
            job: self.job.clone(),
            backend: self.backend.clone(),
            trigger: run.signals.trigger.subscribe(),
            completed: run.signals.completed.subscribe(),
            job_end: run.signals.job_end.subscribe(),
            events: run.signals.events.clone(),
            alignment_buffer: self.options.alignment_buffer,
        })
    }

    /// Runs the checkpoints of one run of the job, whose tasks are `maps`
    /// (map tasks) and `results` (result tasks). Returns only if the
    /// coordinator itself fails; the executor drops it when the run ends.
    pub(crate) async fn coordinate(
        &mut self,
        run: &mut RunLink,
        maps: &[Arc<str>],
        results: &[Arc<str>],
    ) -> Result<(), EngineError> {
        loop {
            let deadline = match &run.pending {
                Some(p) => p.started + self.options.timeout,
                None => run.last_trigger + self.options.interval,
            };
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if let Some(p) = &run.pending {
                        let reason = format!("not complete after {:?}", self.options.timeout);
                        let id = p.id;
                        self.fail(run, id, reason);
                    } else if !run.ended {
                        self.trigger(run);
                    } else {
                        run.last_trigger = Instant::now();
                    }
                }
                event = run.events.recv() => {
                    let Some(event) = event else { return Ok(()) };
                    self.handle(run, event);
                    if run.pending.as_ref().is_some_and(|p| Self::all_in(p, run, maps, results)) {
                        self.complete(run, maps, results).await;
                    }
                    if !run.ended
                        && maps.iter().all(|t| run.finished.contains(t))
                        && results.iter().all(|t| run.input_ended.contains(t))
                    {
                        run.ended = true;
                        run.signals.job_end.send_replace(true);
                    }
                }
            }
        }
    }

    fn trigger(&mut self, run: &mut RunLink) {
        let id = self.next_id;
        self.next_id += 1;
        run.last_trigger = Instant::now();
        run.pending = Some(Pending {
            id,
            started: Instant::now(),
            triggered_at: self.stats.elapsed(),
            acks: HashMap::new(),
            max_sync: Duration::ZERO,
        });
        tracing::debug!(job = %self.job, "checkpoint {id} triggered");
        run.signals.trigger.send_replace(id);
    }

    fn handle(&mut self, run: &mut RunLink, event: TaskEvent) {
        match event {
            TaskEvent::Ack { checkpoint, task, handle, bytes, sync } => match &mut run.pending {
                Some(p) if p.id == checkpoint => {
                    p.max_sync = p.max_sync.max(sync);
                    p.acks.insert(task, (handle, bytes));
                }
                // A late acknowledgement of a checkpoint that already failed.
                _ => self.discard_in_background(checkpoint),
            },
            TaskEvent::Decline { checkpoint, task, reason } => {
                if run.pending.as_ref().is_some_and(|p| p.id == checkpoint) {
                    self.fail(run, checkpoint, format!("{task} declined: {reason}"));
                }
            }
            TaskEvent::Finished { task } => {
                run.finished.insert(task);
            }
            TaskEvent::InputEnded { task } => {
                run.input_ended.insert(task);
            }
        }
    }

    /// Whether every task has acknowledged the pending checkpoint or had finished.
    fn all_in(p: &Pending, run: &RunLink, maps: &[Arc<str>], results: &[Arc<str>]) -> bool {
        maps.iter().all(|t| p.acks.contains_key(t) || run.finished.contains(t))
            && results.iter().all(|t| p.acks.contains_key(t))
    }

    fn fail(&mut self, run: &mut RunLink, id: u64, reason: String) {
        let Some(p) = run.pending.take() else { return };
        tracing::info!(job = %self.job, "checkpoint {id} failed: {reason}");
        self.stats.checkpoint(CheckpointMetrics {
            id,
            triggered_at: p.triggered_at,
            duration: p.started.elapsed(),
            bytes: p.acks.values().map(|(_, b)| b).sum(),
            max_sync: p.max_sync,
            outcome: CheckpointOutcome::Failed(reason),
        });
        self.discard_in_background(id);
    }

    /// Marks the pending checkpoint failed because the run is being torn down.
    pub(crate) fn abandon(&mut self, run: &mut RunLink, reason: &str) {
        if let Some(id) = run.pending.as_ref().map(|p| p.id) {
            self.fail(run, id, reason.to_string());
        }
    }

    async fn complete(&mut self, run: &mut RunLink, maps: &[Arc<str>], results: &[Arc<str>]) {
        let Some(p) = run.pending.take() else { return };
        let mut tasks = HashMap::new();
        for task in maps.iter().chain(results) {
            let state = match p.acks.get(task) {
                Some((handle, bytes)) => TaskCheckpoint::Snapshot { handle: handle.clone(), bytes: *bytes },
                None => TaskCheckpoint::Finished,
            };
            tasks.insert(task.to_string(), state);
        }
        let manifest = CheckpointManifest { checkpoint: p.id, tasks };
        let (backend, job, bytes, id) = (self.backend.clone(), self.job.clone(), manifest.encode(), p.id);
        let written = tokio::task::spawn_blocking(move || backend.complete(&job, id, &bytes)).await;
        let metrics = |outcome| CheckpointMetrics {
            id: p.id,
            triggered_at: p.triggered_at,
            duration: p.started.elapsed(),
            bytes: p.acks.values().map(|(_, b)| b).sum(),
            max_sync: p.max_sync,
            outcome,
        };
        match written {
            Ok(Ok(())) => {
                let previous = self.last_complete.replace(manifest).map(|m| m.checkpoint);
                run.signals.completed.send_replace(p.id);
                let m = metrics(CheckpointOutcome::Completed);
                tracing::debug!(job = %self.job, "checkpoint {} complete in {:.1?}, {} bytes", p.id, m.duration, m.bytes);
                self.stats.checkpoint(m);
                if let Some(previous) = previous {
                    self.discard_in_background(previous);
                }
            }
            Ok(Err(e)) => {
                self.stats.checkpoint(metrics(CheckpointOutcome::Failed(format!("writing its manifest: {e}"))));
                self.discard_in_background(p.id);
            }
            Err(e) => self.stats.checkpoint(metrics(CheckpointOutcome::Failed(format!("writing its manifest: {e}")))),
        }
    }

    fn discard_in_background(&self, checkpoint: u64) {
        if self.last_complete.as_ref().is_some_and(|m| m.checkpoint == checkpoint) {
            return;
        }
        let (backend, job) = (self.backend.clone(), self.job.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = backend.discard(&job, checkpoint) {
                tracing::warn!(%job, "discarding checkpoint {checkpoint}: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_records_round_trip_and_data_records_are_not_control_records() {
        for c in [Control::Barrier(7), Control::Cancel(u64::MAX - 1), Control::End] {
            assert_eq!(Control::decode(&c.encode()).unwrap(), Some(c));
        }
        let mut data = 1_700_000_000_000_000u64.to_le_bytes().to_vec();
        data.extend_from_slice(b"value");
        assert_eq!(Control::decode(&data).unwrap(), None);
        assert!(Control::decode(&CONTROL_STAMP.to_le_bytes()).is_err(), "a stamp with no control after it");
    }
}
