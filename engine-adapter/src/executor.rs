//! The two executors. Both take a dataset (its exchange stages and its
//! final parts) and a sink, register one fresh shuffle per stage, run the
//! tasks and unregister the shuffles, whatever happened.
//!
//! - Batch: stage after stage; a stage's map tasks run (at most
//!   `batch_task_slots` at a time) over blocking exchanges, and a failed
//!   task (error or panic) is run again as a new attempt, up to
//!   `max_task_attempts`. The service's commit rule hides the partial
//!   output of failed attempts. A task that reads an exchange whose
//!   blocks were lost with a worker (`PartitionLost`, replication 1 in a
//!   cluster) is not counted as failing: the executor re-runs exactly the
//!   lost maps of the stage that wrote it, as new attempts, then runs the
//!   reading tasks that did not finish again (Spark's and Celeborn's stage
//!   re-run, limited to what was lost), up to `MAX_LOSS_RECOVERIES` times
//!   per job.
//! - Streaming: every task of every stage, and the result tasks, at once
//!   over hybrid exchanges; backpressure runs from the sink through the
//!   service to the sources. Without checkpoints a failed task fails the
//!   job. With checkpoints ([`crate::checkpoint`]) the job restarts from
//!   its last complete checkpoint on fresh exchanges, up to
//!   `max_restarts` times without a checkpoint completing in between.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use shuffle_client::{ClientError, ShuffleId};
use tokio::{sync::Semaphore, task::JoinSet};

use crate::{
    Data, Dataset, EngineError, ExecutionMode,
    checkpoint::{Coordinator, RunLink, TaskCheckpointing},
    exchange::{finished_map_task, snapshot_chain},
    metrics::{JobStats, RestartMetrics, TaskStats},
    sink::{PartSink, SINK_OPERATOR, SinkFactory},
    state::{CheckpointManifest, RestoredState, TaskCheckpoint},
    task::{Batch, BoxFuture, Item, OpenFn, RunShuffle, TaskContext},
};

/// Aborts a spawned task when dropped, so a job that fails leaves nothing running.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => format!("panicked: {s}"),
        Err(payload) => match payload.downcast::<&str>() {
            Ok(s) => format!("panicked: {s}"),
            Err(_) => "panicked".to_string(),
        },
    }
}

/// Marks a task attempt ended in the job's metrics, failed unless told otherwise (also on a panic).
struct Attempt<'a> {
    stats: &'a JobStats,
    task: &'a TaskStats,
    ok: bool,
}

impl<'a> Attempt<'a> {
    fn start(stats: &'a JobStats, task: &'a TaskStats) -> Self {
        stats.started(task);
        Self { stats, task, ok: false }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.stats.ended(self.task, self.ok);
    }
}

/// A re-run of lost maps: the stage, its shuffle in that job, and exactly
/// the maps that ran again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapRerun {
    /// The stage's name.
    pub stage: String,
    /// The shuffle the stage wrote in that run of the job.
    pub shuffle: ShuffleId,
    /// The maps that ran again, as new attempts.
    pub maps: Vec<u32>,
}

/// How many times one batch job recovers from lost shuffle data before it
/// fails: each recovery re-runs the lost maps once, so more losses than
/// this in one job means the cluster is losing workers faster than the job
/// can replace their data.
pub const MAX_LOSS_RECOVERIES: u32 = 4;

/// The shuffle data a reading task found lost.
fn lost_maps(e: &EngineError) -> Option<(ShuffleId, &[u32])> {
    match e {
        EngineError::Client(ClientError::PartitionLost { shuffle, maps, .. }) => Some((*shuffle, maps)),
        _ => None,
    }
}

/// Runs `task` with retries (batch) under a slot, if slots are limited.
/// Lost shuffle data (`PartitionLost`) is returned at once, not retried:
/// the maps that wrote it must run again first. Attempt ids start at the
/// context's `attempt`.
async fn attempt<F>(
    name: String,
    mut ctx: TaskContext,
    slots: Option<Arc<Semaphore>>,
    job: Arc<JobStats>,
    task: F,
) -> Result<(), EngineError>
where
    F: Fn(TaskContext) -> BoxFuture<'static, Result<(), EngineError>>,
{
    let _slot = match slots {
        Some(slots) => Some(slots.acquire_owned().await.map_err(|e| EngineError::Runtime(e.to_string()))?),
        None => None,
    };
    let attempts = ctx.options.max_task_attempts.max(1);
    let mut cause = String::new();
    let first = ctx.attempt;
    for attempt in first..first + attempts {
        ctx.attempt = attempt;
        let (job, stats) = (job.clone(), ctx.stats.clone());
        let run = task(ctx.clone());
        let mut handle = AbortOnDrop(tokio::spawn(async move {
            let mut guard = Attempt::start(&job, &stats);
            let result = run.await;
            guard.ok = result.is_ok();
            result
        }));
        cause = match (&mut handle.0).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if lost_maps(&e).is_some() => return Err(e),
            Ok(Err(e)) => e.to_string(),
            Err(e) if e.is_panic() => panic_message(e.into_panic()),
            Err(e) => e.to_string(),
        };
        tracing::warn!(task = %name, attempt, "task failed: {cause}");
    }
    Err(EngineError::TaskFailed { task: name, attempts, cause })
}

/// A finished task's failure, if it failed.
fn failure_of(done: Result<Result<(), EngineError>, tokio::task::JoinError>) -> Option<EngineError> {
    match done {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(e) if e.is_panic() => {
            Some(EngineError::TaskFailed { task: "task".into(), attempts: 1, cause: panic_message(e.into_panic()) })
        }
        Err(e) => Some(EngineError::Runtime(e.to_string())),
    }
}

/// How long a job that saw a shuffle service error waits for another task
/// to report the failure behind it: a task's end reaches the executor about
/// as fast as the service's news of it reaches the readers of its output.
const ROOT_CAUSE_GRACE: Duration = Duration::from_millis(250);

/// Waits for every task; the first failure stops the rest (and waits for
/// them to stop) and is returned. When a task fails, the tasks reading its
/// output soon fail too (the service reports the producer's failure); if
/// the first failure is such a shuffle service error, the executor waits
/// briefly for another task's failure that is not, and returns that one,
/// so the job names the cause.
async fn join_all(tasks: &mut JoinSet<Result<(), EngineError>>) -> Result<(), EngineError> {
    while let Some(done) = tasks.join_next().await {
        let Some(mut failure) = failure_of(done) else { continue };
        let deadline = tokio::time::Instant::now() + ROOT_CAUSE_GRACE;
        while matches!(failure, EngineError::Client(_)) {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(Some(done)) => {
                    if let Some(other) = failure_of(done)
                        && !matches!(other, EngineError::Client(_))
                    {
                        failure = other;
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        tasks.shutdown().await;
        return Err(failure);
    }
    Ok(())
}

/// The sink's state in a restored result task, if any.
fn restored_sink_state(ctx: &TaskContext) -> Result<Option<Vec<u8>>, EngineError> {
    match &ctx.restored {
        Some(state) => state.bytes(SINK_OPERATOR),
        None => Ok(None),
    }
}

/// A sink call that took this long marks the sink as one that blocks.
const SLOW_SINK_WRITE: Duration = Duration::from_millis(1);

/// How a result task calls its sink's `write`, which runs user code that
/// may block (a slow writer, a file): in place while every call is quick,
/// since handing the runtime's other tasks to another thread for each batch
/// (`block_in_place`) costs two thread switches per batch; once a call took
/// [`SLOW_SINK_WRITE`] or more, under `block_in_place` for the rest of the
/// task, so a blocking sink stalls the runtime's other tasks at most once
/// per result task.
#[derive(Default)]
struct SinkWrites {
    blocking: bool,
}

impl SinkWrites {
    fn write<T>(&mut self, part: &mut dyn PartSink<T>, batch: Batch<T>) -> Result<(), EngineError> {
        if self.blocking {
            return tokio::task::block_in_place(|| part.write(batch));
        }
        let started = Instant::now();
        let written = part.write(batch);
        if started.elapsed() >= SLOW_SINK_WRITE {
            self.blocking = true;
        }
        written
    }
}

/// A result task: reads its part of the final dataset into a part sink.
fn result_task<T: Data>(
    open: OpenFn<T>,
    sink: SinkFactory<T>,
) -> impl Fn(TaskContext) -> BoxFuture<'static, Result<(), EngineError>> {
    move |ctx: TaskContext| {
        let (open, sink) = (open.clone(), sink.clone());
        Box::pin(async move {
            let mut input = open(&ctx)?;
            let mut part = sink(ctx.part, restored_sink_state(&ctx)?)?;
            let mut writes = SinkWrites::default();
            let Some(checkpoints) = ctx.checkpoints.clone() else {
                while let Some(item) = input.next().await? {
                    if let Item::Batch(batch) = item {
                        ctx.stats.add_out(batch.len(), 0);
                        writes.write(&mut *part, batch)?;
                    }
                }
                return tokio::task::block_in_place(|| part.finish());
            };
            let mut committed = *checkpoints.completed.borrow();
            let mut last = *checkpoints.trigger.borrow();
            let commit = |part: &mut Box<dyn PartSink<T>>, committed: &mut u64| {
                let done = *checkpoints.completed.borrow();
                if done > *committed {
                    tokio::task::block_in_place(|| part.commit(done))?;
                    *committed = done;
                }
                Ok::<_, EngineError>(())
            };
            while let Some(item) = input.next().await? {
                commit(&mut part, &mut committed)?;
                match item {
                    Item::Batch(batch) => {
                        ctx.stats.add_out(batch.len(), 0);
                        writes.write(&mut *part, batch)?;
                    }
                    Item::Barrier(id) => {
                        last = id;
                        let state = tokio::task::block_in_place(|| part.snapshot(id))?;
                        snapshot_chain(&ctx, &mut *input, id, Some(state))?;
                    }
                    Item::Cancel(id) => checkpoints.decline(id, "cancelled upstream".into()),
                }
            }
            // The input ended: snapshot at later checkpoints directly, commit
            // what they complete, and make the rest visible at the job's end.
            checkpoints.input_ended();
            let (mut trigger, mut completed, mut job_end) =
                (checkpoints.trigger.clone(), checkpoints.completed.clone(), checkpoints.job_end.clone());
            loop {
                commit(&mut part, &mut committed)?;
                if let Some(id) = checkpoints.triggered_after(last) {
                    last = id;
                    let state = tokio::task::block_in_place(|| part.snapshot(id))?;
                    snapshot_chain(&ctx, &mut *input, id, Some(state))?;
                }
                if *job_end.borrow() {
                    break;
                }
                tokio::select! {
                    _ = trigger.changed() => {}
                    _ = completed.changed() => {}
                    _ = job_end.changed() => {}
                }
            }
            tokio::task::block_in_place(|| part.finish())
        })
    }
}

/// Runs `dataset`'s job in `mode`, delivering its final records to `sink`
/// and counting into `stats`.
pub(crate) fn run<'a, T: Data>(
    dataset: &'a Dataset<T>,
    mode: ExecutionMode,
    sink: SinkFactory<T>,
    stats: Arc<JobStats>,
) -> BoxFuture<'a, Result<(), EngineError>> {
    // Boxed: sampling for sort_by_key runs a job from inside a job.
    Box::pin(async move {
        if let Some(why) = &dataset.invalid {
            return Err(EngineError::Plan(why.to_string()));
        }
        if mode == ExecutionMode::Batch && !dataset.bounded {
            return Err(EngineError::Plan("batch mode needs bounded sources; this job reads an unbounded one".into()));
        }
        for stage in &dataset.stages {
            if let Some(prepare) = &stage.prepare {
                let started = std::time::Instant::now();
                prepare().await?;
                tracing::debug!("{}: prepared (sampled) in {:.2?}", stage.name, started.elapsed());
            }
        }
        match mode {
            ExecutionMode::Batch => {
                let shuffles = fresh_shuffles(dataset, mode);
                let outcome = run_batch(dataset, &shuffles, sink, &stats).await;
                unregister(dataset, &shuffles).await;
                outcome
            }
            ExecutionMode::Streaming => run_streaming(dataset, sink, &stats).await,
        }
    })
}

/// Runs a job inside another (sampling), with metrics of its own.
pub(crate) async fn run_nested<T: Data>(
    dataset: &Dataset<T>,
    mode: ExecutionMode,
    sink: SinkFactory<T>,
) -> Result<(), EngineError> {
    run(dataset, mode, sink, Arc::new(JobStats::for_dataset(dataset, mode))).await
}

/// A fresh shuffle for every stage of the job.
fn fresh_shuffles<T: Data>(dataset: &Dataset<T>, mode: ExecutionMode) -> Arc<HashMap<u64, RunShuffle>> {
    let engine = &dataset.engine;
    let options = &engine.inner.options;
    Arc::new(
        dataset
            .stages
            .iter()
            .map(|s| (s.id, RunShuffle { id: ShuffleId(engine.next_shuffle()), spec: s.spec(mode, options) }))
            .collect(),
    )
}

async fn unregister<T: Data>(dataset: &Dataset<T>, shuffles: &HashMap<u64, RunShuffle>) {
    for shuffle in shuffles.values() {
        if let Err(e) = dataset.engine.inner.client.unregister_shuffle(shuffle.id).await {
            tracing::debug!("unregistering shuffle {}: {e}", shuffle.id);
        }
    }
}

/// The context of task `part` of stage `stage` (its index in the job's metrics).
fn task_context<T: Data>(
    dataset: &Dataset<T>,
    mode: ExecutionMode,
    shuffles: &Arc<HashMap<u64, RunShuffle>>,
    stats: &JobStats,
    (stage, part): (usize, u32),
    name: String,
) -> TaskContext {
    let inner = &dataset.engine.inner;
    TaskContext {
        client: inner.client.clone(),
        mode,
        part,
        attempt: 0,
        shuffles: shuffles.clone(),
        options: inner.options.clone(),
        memory: inner.memory.clone(),
        spill_dir: inner.spill_dir.clone(),
        stats: stats.task(stage, part),
        checkpoints: None,
        restored: None,
        name: name.into(),
    }
}

/// Runs tasks `0..n` not in `done` (each with retries); the ones that found
/// shuffle data lost stay out of `done` and their losses are returned, per
/// shuffle. Any other failure fails the whole set.
async fn run_tasks<F>(
    n: u32,
    done: &mut BTreeSet<u32>,
    spawn: F,
) -> Result<BTreeMap<ShuffleId, BTreeSet<u32>>, EngineError>
where
    F: Fn(u32) -> BoxFuture<'static, Result<(), EngineError>>,
{
    let mut tasks = JoinSet::new();
    for i in (0..n).filter(|i| !done.contains(i)) {
        let task = spawn(i);
        tasks.spawn(async move { (i, task.await) });
    }
    let mut lost: BTreeMap<ShuffleId, BTreeSet<u32>> = BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, result) = match joined {
            Ok(r) => r,
            Err(e) if e.is_panic() => {
                tasks.shutdown().await;
                return Err(EngineError::TaskFailed {
                    task: "task".into(),
                    attempts: 1,
                    cause: panic_message(e.into_panic()),
                });
            }
            Err(e) => return Err(EngineError::Runtime(e.to_string())),
        };
        match result {
            Ok(()) => {
                done.insert(i);
            }
            Err(e) => match lost_maps(&e) {
                Some((shuffle, maps)) => lost.entry(shuffle).or_default().extend(maps.iter().copied()),
                None => {
                    tasks.shutdown().await;
                    return Err(e);
                }
            },
        }
    }
    Ok(lost)
}

async fn run_batch<T: Data>(
    dataset: &Dataset<T>,
    shuffles: &Arc<HashMap<u64, RunShuffle>>,
    sink: SinkFactory<T>,
    stats: &Arc<JobStats>,
) -> Result<(), EngineError> {
    let client = &dataset.engine.inner.client;
    let options = &dataset.engine.inner.options;
    let slots = Some(Arc::new(Semaphore::new(options.batch_task_slots.max(1))));
    let per_round = options.max_task_attempts.max(1);
    // Per stage: how many rounds of attempts its maps have used (a re-run
    // starts a round, so its attempt ids are new).
    let mut rounds: HashMap<u64, u32> = HashMap::new();
    let run_maps = |index: usize, maps: Vec<u32>, round: u32| {
        let stage = &dataset.stages[index];
        let (slots, stats, run_map, stage_name) =
            (slots.clone(), stats.clone(), stage.run_map.clone(), stage.name.clone());
        move |i: u32| -> BoxFuture<'static, Result<(), EngineError>> {
            let map = maps[i as usize];
            let name = format!("{stage_name} map {map}");
            let mut ctx = task_context(dataset, ExecutionMode::Batch, shuffles, &stats, (index, map), name.clone());
            ctx.attempt = round * per_round;
            let run_map = run_map.clone();
            Box::pin(attempt(name, ctx, slots.clone(), stats.clone(), move |c| run_map(c)))
        }
    };
    let mut recoveries = 0;
    // Plans the re-runs of the lost maps of the stages that wrote `lost`.
    let mut recover = |lost: BTreeMap<ShuffleId, BTreeSet<u32>>, rounds: &mut HashMap<u64, u32>| {
        recoveries += 1;
        if recoveries > MAX_LOSS_RECOVERIES {
            return Err(EngineError::Runtime(format!(
                "shuffle data was lost {recoveries} times in one job (at most {MAX_LOSS_RECOVERIES} recoveries)"
            )));
        }
        let mut plan = Vec::new();
        for (shuffle, maps) in lost {
            let Some(index) = dataset.stages.iter().position(|s| shuffles[&s.id].id == shuffle) else {
                return Err(EngineError::Runtime(format!(
                    "shuffle {shuffle} lost data but belongs to no stage of this job"
                )));
            };
            let round = rounds.entry(dataset.stages[index].id).or_insert(0);
            *round += 1;
            plan.push((index, maps.into_iter().collect::<Vec<u32>>(), *round));
        }
        Ok(plan)
    };
    for (index, stage) in dataset.stages.iter().enumerate() {
        let shuffle = shuffles[&stage.id];
        client.register_shuffle(shuffle.id, shuffle.spec).await?;
        let started = std::time::Instant::now();
        let maps: Vec<u32> = (0..stage.maps).collect();
        let mut done = BTreeSet::new();
        loop {
            let round = rounds.get(&stage.id).copied().unwrap_or(0);
            let lost = run_tasks(stage.maps, &mut done, run_maps(index, maps.clone(), round)).await?;
            if lost.is_empty() {
                break;
            }
            // These maps read an earlier stage's lost blocks: those run
            // again, then this stage's unfinished maps, as new attempts.
            for (lost_stage, maps, round) in recover(lost, &mut rounds)? {
                rerun(dataset, shuffles, lost_stage, &maps, run_maps(lost_stage, maps.clone(), round)).await?;
            }
            *rounds.entry(stage.id).or_insert(0) += 1;
        }
        tracing::debug!(
            "{}: {} map tasks into {:?} in {:.2?}",
            stage.name,
            stage.maps,
            shuffle.spec.mode,
            started.elapsed()
        );
    }
    let started = std::time::Instant::now();
    let result = dataset.stages.len();
    let mut done = BTreeSet::new();
    loop {
        let spawn = |part: u32| -> BoxFuture<'static, Result<(), EngineError>> {
            let name = format!("result part {part}");
            let ctx = task_context(dataset, ExecutionMode::Batch, shuffles, stats, (result, part), name.clone());
            let task = result_task(dataset.open.clone(), sink.clone());
            Box::pin(attempt(name, ctx, slots.clone(), stats.clone(), task))
        };
        let lost = run_tasks(dataset.parts, &mut done, spawn).await?;
        if lost.is_empty() {
            break;
        }
        for (lost_stage, maps, round) in recover(lost, &mut rounds)? {
            rerun(dataset, shuffles, lost_stage, &maps, run_maps(lost_stage, maps.clone(), round)).await?;
        }
    }
    tracing::debug!("{} result tasks in {:.2?}", dataset.parts, started.elapsed());
    Ok(())
}

/// Re-runs exactly `maps` of stage `index` as new attempts, and records it.
async fn rerun<T: Data, F>(
    dataset: &Dataset<T>,
    shuffles: &HashMap<u64, RunShuffle>,
    index: usize,
    maps: &[u32],
    spawn: F,
) -> Result<(), EngineError>
where
    F: Fn(u32) -> BoxFuture<'static, Result<(), EngineError>>,
{
    let stage = &dataset.stages[index];
    let shuffle = shuffles[&stage.id].id;
    tracing::warn!(stage = %stage.name, %shuffle, ?maps, "shuffle data lost with a worker: re-running exactly these maps");
    dataset.engine.inner.reruns.lock().unwrap_or_else(|e| e.into_inner()).push(MapRerun {
        stage: stage.name.clone(),
        shuffle,
        maps: maps.to_vec(),
    });
    let mut done = BTreeSet::new();
    let lost = run_tasks(maps.len() as u32, &mut done, spawn).await?;
    if let Some((shuffle, maps)) = lost.into_iter().next() {
        // The re-run's own input was lost too: give up rather than recurse.
        return Err(EngineError::Client(ClientError::PartitionLost {
            shuffle,
            partition: 0,
            maps: maps.into_iter().collect(),
        }));
    }
    Ok(())
}

/// Counts down the tasks of a restarted run that have their state back,
/// and records the restart when the last has.
struct RestartProbe {
    remaining: AtomicUsize,
    failed: Instant,
    metrics: std::sync::Mutex<Option<RestartMetrics>>,
    stats: Arc<JobStats>,
}

impl RestartProbe {
    fn task_ready(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
            && let Some(mut metrics) = self.metrics.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
        {
            metrics.restore_duration = self.failed.elapsed();
            tracing::info!(
                "restarted from checkpoint {:?} in {:.1?} after: {}",
                metrics.restored_checkpoint,
                metrics.restore_duration,
                metrics.cause
            );
            self.stats.restart(metrics);
        }
    }
}

/// One run of a streaming job: what its tasks need from the coordinator.
struct Checkpointed<'a> {
    coordinator: &'a mut Coordinator,
    link: &'a mut RunLink,
    restored: Option<CheckpointManifest>,
    probe: Option<Arc<RestartProbe>>,
}

async fn run_streaming<T: Data>(
    dataset: &Dataset<T>,
    sink: SinkFactory<T>,
    stats: &Arc<JobStats>,
) -> Result<(), EngineError> {
    let inner = &dataset.engine.inner;
    let Some(options) = inner.options.checkpoints.clone() else {
        let shuffles = fresh_shuffles(dataset, ExecutionMode::Streaming);
        let outcome = run_streaming_once(dataset, &shuffles, sink, stats, None).await;
        unregister(dataset, &shuffles).await;
        return outcome;
    };
    let job: Arc<str> = format!("{}-job-{}", inner.client.app(), dataset.engine.next_id()).into();
    let backend = inner.state_backend.clone();
    let mut coordinator = Coordinator::new(options.clone(), backend.clone(), job.clone(), stats.clone());
    let (mut failures, mut complete_at_last_failure) = (0u32, None);
    let mut probe = None;
    loop {
        let shuffles = fresh_shuffles(dataset, ExecutionMode::Streaming);
        let mut link = coordinator.new_run();
        let restored = coordinator.last_complete.clone();
        let checkpointed =
            Checkpointed { coordinator: &mut coordinator, link: &mut link, restored, probe: probe.take() };
        let outcome = run_streaming_once(dataset, &shuffles, sink.clone(), stats, Some(checkpointed)).await;
        let failed = Instant::now();
        unregister(dataset, &shuffles).await;
        let cause = match outcome {
            Ok(()) => {
                let _ = tokio::task::spawn_blocking(move || backend.remove(&job)).await;
                return Ok(());
            }
            Err(e) => e,
        };
        coordinator.abandon(&mut link, "the job restarted");
        let complete = coordinator.last_complete.as_ref().map(|m| m.checkpoint);
        if complete != complete_at_last_failure {
            (failures, complete_at_last_failure) = (0, complete);
        }
        failures += 1;
        if failures > options.max_restarts {
            tracing::warn!(%job, "giving up after {} restarts without a checkpoint: {cause}", failures - 1);
            let _ = tokio::task::spawn_blocking(move || backend.remove(&job)).await;
            return Err(cause);
        }
        tracing::warn!(%job, "a task failed ({cause}); restarting from checkpoint {complete:?}");
        probe = Some(Arc::new(RestartProbe {
            remaining: AtomicUsize::new(0),
            failed,
            metrics: std::sync::Mutex::new(Some(RestartMetrics {
                cause: cause.to_string(),
                failed_at: stats.elapsed(),
                restored_checkpoint: complete,
                restore_duration: std::time::Duration::ZERO,
            })),
            stats: stats.clone(),
        }));
        tokio::time::sleep(options.restart_delay).await;
    }
}

/// Loads a task's state from the checkpoint being restored, if it has one.
async fn restore(ctx: &mut TaskContext, state: Option<&TaskCheckpoint>) -> Result<bool, EngineError> {
    match state {
        Some(TaskCheckpoint::Finished) => Ok(true),
        Some(TaskCheckpoint::Snapshot { handle, .. }) => {
            let checkpoints = ctx.checkpoints.clone().expect("restoring needs checkpoints");
            let (handle, dir, name) = (handle.clone(), ctx.spill_dir.clone(), ctx.name.clone());
            let loaded = tokio::task::spawn_blocking(move || {
                let source = checkpoints
                    .backend
                    .read(&handle)
                    .map_err(|e| EngineError::State(format!("reading the state of {name} ({}): {e}", handle.0)))?;
                RestoredState::load(source, &dir, &name)
            })
            .await
            .map_err(|e| EngineError::Runtime(e.to_string()))??;
            ctx.restored = Some(Arc::new(loaded));
            Ok(false)
        }
        None => Ok(false),
    }
}

async fn run_streaming_once<T: Data>(
    dataset: &Dataset<T>,
    shuffles: &Arc<HashMap<u64, RunShuffle>>,
    sink: SinkFactory<T>,
    stats: &Arc<JobStats>,
    mut checkpointed: Option<Checkpointed<'_>>,
) -> Result<(), EngineError> {
    let client = &dataset.engine.inner.client;
    for stage in &dataset.stages {
        let shuffle = shuffles[&stage.id];
        client.register_shuffle(shuffle.id, shuffle.spec).await?;
    }
    let mode = ExecutionMode::Streaming;
    let (mut maps, mut results) = (Vec::new(), Vec::new());
    let mut tasks = JoinSet::new();
    let total = dataset.stages.iter().map(|s| s.maps as usize).sum::<usize>() + dataset.parts as usize;
    if let Some(probe) = checkpointed.as_ref().and_then(|c| c.probe.as_ref()) {
        probe.remaining.store(total, Ordering::Release);
    }
    let link = |c: &Option<Checkpointed<'_>>, key: &Arc<str>| -> Option<Arc<TaskCheckpointing>> {
        c.as_ref().map(|c| c.coordinator.task_link(c.link, key.clone()))
    };
    let restored_state = |c: &Option<Checkpointed<'_>>, key: &str| -> Option<TaskCheckpoint> {
        c.as_ref().and_then(|c| c.restored.as_ref()).and_then(|m| m.tasks.get(key).cloned())
    };
    let probe = checkpointed.as_ref().and_then(|c| c.probe.clone());
    for (index, stage) in dataset.stages.iter().enumerate() {
        for map in 0..stage.maps {
            let key: Arc<str> = format!("s{}-m{map}", stage.id).into();
            let mut ctx =
                task_context(dataset, mode, shuffles, stats, (index, map), format!("{} map {map}", stage.name));
            ctx.checkpoints = link(&checkpointed, &key);
            let state = restored_state(&checkpointed, &key);
            let (run_map, stage_id, job, probe) = (stage.run_map.clone(), stage.id, stats.clone(), probe.clone());
            tasks.spawn(async move {
                let task_stats = ctx.stats.clone();
                let mut guard = Attempt::start(&job, &task_stats);
                let finished = restore(&mut ctx, state.as_ref()).await?;
                if let Some(probe) = &probe {
                    probe.task_ready();
                }
                let result = if finished { finished_map_task(&ctx, stage_id).await } else { run_map(ctx).await };
                guard.ok = result.is_ok();
                result
            });
            maps.push(key);
        }
    }
    let result = dataset.stages.len();
    for part in 0..dataset.parts {
        let key: Arc<str> = format!("r-{part}").into();
        let mut ctx = task_context(dataset, mode, shuffles, stats, (result, part), format!("result part {part}"));
        ctx.checkpoints = link(&checkpointed, &key);
        let state = restored_state(&checkpointed, &key);
        let (task, job, probe) = (result_task(dataset.open.clone(), sink.clone()), stats.clone(), probe.clone());
        tasks.spawn(async move {
            let task_stats = ctx.stats.clone();
            let mut guard = Attempt::start(&job, &task_stats);
            restore(&mut ctx, state.as_ref()).await?;
            if let Some(probe) = &probe {
                probe.task_ready();
            }
            let result = task(ctx).await;
            guard.ok = result.is_ok();
            result
        });
        results.push(key);
    }
    match &mut checkpointed {
        None => join_all(&mut tasks).await,
        Some(c) => {
            let outcome = tokio::select! {
                outcome = join_all(&mut tasks) => outcome,
                outcome = c.coordinator.coordinate(c.link, &maps, &results) => outcome,
            };
            tasks.shutdown().await;
            outcome
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;
    use crate::{sink::ForEachPart, task::Event};

    /// A part sink whose writes (of one record each) run `f`.
    fn fn_sink(f: impl Fn() + Send + Sync) -> ForEachPart<impl Fn(u32, u8, Duration) + Send + Sync> {
        ForEachPart { part: 0, f: Arc::new(move |_, _, _| f()) }
    }

    fn batch() -> Batch<u8> {
        vec![Event { value: 1, created_us: 0 }]
    }

    /// On a runtime with one worker thread, a ticking task can run during
    /// a sink's write only if the write handed the worker over.
    #[test]
    fn sink_writes_run_in_place_until_one_is_slow_then_hand_the_runtime_over() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        runtime.block_on(async {
            let ticks = Arc::new(AtomicU64::new(0));
            let ticker = {
                let ticks = ticks.clone();
                tokio::spawn(async move {
                    loop {
                        ticks.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                })
            };
            tokio::spawn(async move {
                let mut writes = SinkWrites::default();
                let mut quick = fn_sink(|| {});
                for _ in 0..1000 {
                    let started = Instant::now();
                    writes.write(&mut quick, batch()).unwrap();
                    if started.elapsed() < SLOW_SINK_WRITE {
                        assert!(!writes.blocking, "quick writes stay in place");
                    } else {
                        // This thread was descheduled for a millisecond inside
                        // the write (a busy machine): it counts as slow.
                        writes.blocking = false;
                    }
                }

                // The first slow write runs in place: the only worker is busy with it.
                let ticks_seen = ticks.clone();
                let mut slow = fn_sink(move || {
                    let before = ticks_seen.load(Ordering::Relaxed);
                    std::thread::sleep(SLOW_SINK_WRITE * 5);
                    assert_eq!(ticks_seen.load(Ordering::Relaxed), before, "nothing else ran during an in-place write");
                });
                writes.write(&mut slow, batch()).unwrap();
                assert!(writes.blocking, "a slow write marks the sink as blocking");

                // Later writes hand the worker over, so the ticker runs meanwhile.
                let ticks_seen = ticks.clone();
                let mut waiting = fn_sink(move || {
                    let (before, deadline) =
                        (ticks_seen.load(Ordering::Relaxed), Instant::now() + Duration::from_secs(10));
                    while ticks_seen.load(Ordering::Relaxed) == before {
                        assert!(Instant::now() < deadline, "the runtime's other tasks stalled during a blocking write");
                        std::thread::sleep(Duration::from_millis(1));
                    }
                });
                writes.write(&mut waiting, batch()).unwrap();
            })
            .await
            .unwrap();
            ticker.abort();
        });
    }
}
