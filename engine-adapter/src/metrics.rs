//! What a job did, per stage and per task: records and bytes in and out,
//! bytes spilled, time, attempts; and in streaming, every checkpoint (its
//! duration and size) and every restart. Tasks count into shared atomic
//! counters ([`TaskStats`], once per batch, never per record), so a
//! [`crate::Job`] handle can read them while the job runs and
//! [`crate::JobReport`] carries them after it ends.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{ExecutionMode, memory::MemoryPool};

/// The counters of one task, shared by its attempts.
#[derive(Debug, Default)]
pub(crate) struct TaskStats {
    pub records_in: AtomicU64,
    pub records_out: AtomicU64,
    /// Encoded bytes read from exchanges.
    pub bytes_in: AtomicU64,
    /// Encoded bytes written to exchanges.
    pub bytes_out: AtomicU64,
    /// Bytes its operators wrote to spill files (shared with their sorters).
    pub spilled: Arc<AtomicU64>,
    pub attempts: AtomicU32,
    pub finished: AtomicBool,
    /// Microseconds from the job's start to the task's first start, and its latest end.
    started_us: AtomicU64,
    ended_us: AtomicU64,
}

impl TaskStats {
    pub(crate) fn add_in(&self, records: usize, bytes: usize) {
        self.records_in.fetch_add(records as u64, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn add_out(&self, records: usize, bytes: usize) {
        self.records_out.fetch_add(records as u64, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// A task's figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMetrics {
    /// The task's part: its map number, or its partition.
    pub part: u32,
    /// Records it read: from its source or its exchange partition(s).
    pub records_in: u64,
    /// Records it wrote: to its exchange or its sink.
    pub records_out: u64,
    /// Bytes of encoded records it read from exchanges.
    pub bytes_in: u64,
    /// Bytes of encoded records it wrote to its exchange.
    pub bytes_out: u64,
    /// Bytes its operators wrote to spill files.
    pub spilled_bytes: u64,
    /// Times it was started (batch retries, streaming restarts).
    pub attempts: u32,
    /// From its first start to its latest end (or to now, while it runs).
    pub elapsed: Duration,
    /// Whether its latest attempt ended successfully.
    pub finished: bool,
}

/// One stage: an exchange's map tasks, or the job's result tasks (`"result"`).
#[derive(Clone, Debug)]
pub struct StageMetrics {
    pub name: String,
    pub tasks: Vec<TaskMetrics>,
}

impl StageMetrics {
    /// The stage's tasks added up (`part` 0; `elapsed` the longest; `attempts` the sum).
    pub fn totals(&self) -> TaskMetrics {
        self.tasks.iter().fold(
            TaskMetrics {
                part: 0,
                records_in: 0,
                records_out: 0,
                bytes_in: 0,
                bytes_out: 0,
                spilled_bytes: 0,
                attempts: 0,
                elapsed: Duration::ZERO,
                finished: true,
            },
            |mut t, m| {
                t.records_in += m.records_in;
                t.records_out += m.records_out;
                t.bytes_in += m.bytes_in;
                t.bytes_out += m.bytes_out;
                t.spilled_bytes += m.spilled_bytes;
                t.attempts += m.attempts;
                t.elapsed = t.elapsed.max(m.elapsed);
                t.finished &= m.finished;
                t
            },
        )
    }
}

/// How a checkpoint ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointOutcome {
    /// Every task snapshotted; the manifest is written.
    Completed,
    /// A task declined it, it timed out, or the job restarted first.
    Failed(String),
}

/// One streaming checkpoint.
#[derive(Clone, Debug)]
pub struct CheckpointMetrics {
    pub id: u64,
    /// When it was triggered, since the job started.
    pub triggered_at: Duration,
    /// From its trigger to its completion (or failure).
    pub duration: Duration,
    /// Bytes of state written, over all tasks.
    pub bytes: u64,
    /// Longest synchronous part of a task's snapshot (the task paused for it).
    pub max_sync: Duration,
    pub outcome: CheckpointOutcome,
}

/// One restart of a streaming job after a task failed.
#[derive(Clone, Debug)]
pub struct RestartMetrics {
    /// The failure, as the task reported it.
    pub cause: String,
    /// When the failure was seen, since the job started.
    pub failed_at: Duration,
    /// The checkpoint the job restarted from (`None`: from the beginning).
    pub restored_checkpoint: Option<u64>,
    /// From the failure to every task running again: stopping the failed
    /// run, new exchanges, and reading the checkpoint back.
    pub restore_duration: Duration,
}

/// A job's figures, while it runs or after.
#[derive(Clone, Debug)]
pub struct JobMetrics {
    pub mode: ExecutionMode,
    /// Since the job started.
    pub elapsed: Duration,
    /// Exchange stages in the order they run, then `"result"`.
    pub stages: Vec<StageMetrics>,
    pub checkpoints: Vec<CheckpointMetrics>,
    pub restarts: Vec<RestartMetrics>,
    /// The most the engine's operators held of its memory budget at once
    /// (since the engine started), and the budget.
    pub memory_peak: u64,
    pub memory_budget: u64,
}

impl JobMetrics {
    /// The stage named `name` (or whose name starts with `name#`).
    pub fn stage(&self, name: &str) -> Option<&StageMetrics> {
        self.stages.iter().find(|s| s.name == name || s.name.strip_prefix(name).is_some_and(|r| r.starts_with('#')))
    }

    /// Bytes spilled by every task.
    pub fn spilled_bytes(&self) -> u64 {
        self.stages.iter().map(|s| s.totals().spilled_bytes).sum()
    }

    /// The checkpoints that completed.
    pub fn completed_checkpoints(&self) -> impl Iterator<Item = &CheckpointMetrics> {
        self.checkpoints.iter().filter(|c| c.outcome == CheckpointOutcome::Completed)
    }
}

/// The live counters of one job.
#[derive(Debug)]
pub(crate) struct JobStats {
    pub mode: ExecutionMode,
    started: Instant,
    stages: Vec<(String, Vec<Arc<TaskStats>>)>,
    pub checkpoints: Mutex<Vec<CheckpointMetrics>>,
    pub restarts: Mutex<Vec<RestartMetrics>>,
    memory: Arc<MemoryPool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl JobStats {
    /// Counters for `stages` (name, tasks), the result stage last.
    pub(crate) fn new(mode: ExecutionMode, stages: Vec<(String, u32)>, memory: Arc<MemoryPool>) -> Self {
        let stages = stages
            .into_iter()
            .map(|(name, tasks)| (name, (0..tasks).map(|_| Arc::new(TaskStats::default())).collect()))
            .collect();
        Self {
            mode,
            started: Instant::now(),
            stages,
            checkpoints: Mutex::default(),
            restarts: Mutex::default(),
            memory,
        }
    }

    /// Counters for a job of `dataset`: its exchange stages, then its result tasks.
    pub(crate) fn for_dataset<T>(dataset: &crate::Dataset<T>, mode: ExecutionMode) -> Self {
        let mut stages: Vec<(String, u32)> = dataset.stages.iter().map(|s| (s.name.clone(), s.maps)).collect();
        stages.push(("result".to_string(), dataset.parts));
        Self::new(mode, stages, dataset.engine.inner.memory.clone())
    }

    /// Since the job started.
    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The counters of task `part` of stage `stage` (its index).
    pub(crate) fn task(&self, stage: usize, part: u32) -> Arc<TaskStats> {
        self.stages[stage].1[part as usize].clone()
    }

    /// A task attempt starts.
    pub(crate) fn started(&self, task: &TaskStats) {
        let now = self.started.elapsed().as_micros() as u64 + 1;
        let _ = task.started_us.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        task.attempts.fetch_add(1, Ordering::Relaxed);
        task.finished.store(false, Ordering::Relaxed);
    }

    /// A task attempt ended, successfully or not.
    pub(crate) fn ended(&self, task: &TaskStats, ok: bool) {
        task.ended_us.store(self.started.elapsed().as_micros() as u64 + 1, Ordering::Relaxed);
        task.finished.store(ok, Ordering::Relaxed);
    }

    pub(crate) fn checkpoint(&self, metrics: CheckpointMetrics) {
        lock(&self.checkpoints).push(metrics);
    }

    pub(crate) fn restart(&self, metrics: RestartMetrics) {
        lock(&self.restarts).push(metrics);
    }

    /// The figures now.
    pub(crate) fn snapshot(&self) -> JobMetrics {
        let now = self.started.elapsed().as_micros() as u64 + 1;
        let stages = self
            .stages
            .iter()
            .map(|(name, tasks)| StageMetrics {
                name: name.clone(),
                tasks: tasks
                    .iter()
                    .enumerate()
                    .map(|(part, t)| {
                        let started = t.started_us.load(Ordering::Relaxed);
                        let finished = t.finished.load(Ordering::Relaxed);
                        let ended = if finished { t.ended_us.load(Ordering::Relaxed) } else { now };
                        TaskMetrics {
                            part: part as u32,
                            records_in: t.records_in.load(Ordering::Relaxed),
                            records_out: t.records_out.load(Ordering::Relaxed),
                            bytes_in: t.bytes_in.load(Ordering::Relaxed),
                            bytes_out: t.bytes_out.load(Ordering::Relaxed),
                            spilled_bytes: t.spilled.load(Ordering::Relaxed),
                            attempts: t.attempts.load(Ordering::Relaxed),
                            elapsed: if started == 0 {
                                Duration::ZERO
                            } else {
                                Duration::from_micros(ended.saturating_sub(started))
                            },
                            finished,
                        }
                    })
                    .collect(),
            })
            .collect();
        JobMetrics {
            mode: self.mode,
            elapsed: self.started.elapsed(),
            stages,
            checkpoints: lock(&self.checkpoints).clone(),
            restarts: lock(&self.restarts).clone(),
            memory_peak: self.memory.peak() as u64,
            memory_budget: self.memory.budget() as u64,
        }
    }
}
