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
//!   service to the sources. A failed task fails the job.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use shuffle_client::{ClientError, ShuffleId};
use tokio::{sync::Semaphore, task::JoinSet};

use crate::{
    Data, Dataset, EngineError, ExecutionMode,
    sink::SinkFactory,
    task::{BoxFuture, OpenFn, RunShuffle, TaskContext},
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
/// the maps that wrote it must run again first.
async fn attempt<F>(
    name: String,
    mut ctx: TaskContext,
    slots: Option<Arc<Semaphore>>,
    task: F,
) -> Result<(), EngineError>
where
    F: Fn(TaskContext) -> BoxFuture<'static, Result<(), EngineError>>,
{
    let _slot = match slots {
        Some(slots) => Some(slots.acquire_owned().await.map_err(|e| EngineError::Runtime(e.to_string()))?),
        None => None,
    };
    let attempts = match ctx.mode {
        ExecutionMode::Batch => ctx.options.max_task_attempts.max(1),
        ExecutionMode::Streaming => 1,
    };
    let mut cause = String::new();
    let first = ctx.attempt;
    for attempt in first..first + attempts {
        ctx.attempt = attempt;
        let mut handle = AbortOnDrop(tokio::spawn(task(ctx.clone())));
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

/// Waits for every task; the first failure aborts the rest and is returned.
async fn join_all(mut tasks: JoinSet<Result<(), EngineError>>) -> Result<(), EngineError> {
    while let Some(done) = tasks.join_next().await {
        let failure = match done {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(e) if e.is_panic() => {
                EngineError::TaskFailed { task: "task".into(), attempts: 1, cause: panic_message(e.into_panic()) }
            }
            Err(e) => EngineError::Runtime(e.to_string()),
        };
        tasks.abort_all();
        return Err(failure);
    }
    Ok(())
}

/// Runs tasks `0..n` (each with retries); the ones that found shuffle data
/// lost are left out of `done` and their losses returned, per shuffle.
/// Any other failure fails the whole set.
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
        let (i, result) = joined.map_err(|e| EngineError::Runtime(e.to_string()))?;
        match result {
            Ok(()) => {
                done.insert(i);
            }
            Err(e) => match lost_maps(&e) {
                Some((shuffle, maps)) => lost.entry(shuffle).or_default().extend(maps.iter().copied()),
                None => {
                    tasks.abort_all();
                    return Err(e);
                }
            },
        }
    }
    Ok(lost)
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
            let mut part = sink(ctx.part)?;
            while let Some(batch) = input.next_batch().await? {
                // User code may block (a slow sink); keep the runtime's other tasks moving.
                tokio::task::block_in_place(|| part.write(batch))?;
            }
            tokio::task::block_in_place(|| part.commit())
        })
    }
}

/// Runs `dataset`'s job in `mode`, delivering its final records to `sink`.
pub(crate) fn run<'a, T: Data>(
    dataset: &'a Dataset<T>,
    mode: ExecutionMode,
    sink: SinkFactory<T>,
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
        let engine = &dataset.engine;
        let options = engine.inner.options.clone();
        let shuffles: HashMap<u64, RunShuffle> = dataset
            .stages
            .iter()
            .map(|s| (s.id, RunShuffle { id: ShuffleId(engine.next_shuffle()), spec: s.spec(mode, &options) }))
            .collect();
        let ctx = TaskContext {
            client: engine.inner.client.clone(),
            mode,
            part: 0,
            attempt: 0,
            shuffles: Arc::new(shuffles),
            options,
            reruns: engine.inner.reruns.clone(),
        };
        let outcome = match mode {
            ExecutionMode::Batch => run_batch(dataset, &ctx, sink).await,
            ExecutionMode::Streaming => run_streaming(dataset, &ctx, sink).await,
        };
        for shuffle in ctx.shuffles.values() {
            if let Err(e) = ctx.client.unregister_shuffle(shuffle.id).await {
                tracing::debug!("unregistering shuffle {}: {e}", shuffle.id);
            }
        }
        outcome
    })
}

async fn run_batch<T: Data>(dataset: &Dataset<T>, ctx: &TaskContext, sink: SinkFactory<T>) -> Result<(), EngineError> {
    let slots = Some(Arc::new(Semaphore::new(ctx.options.batch_task_slots.max(1))));
    let per_round = ctx.options.max_task_attempts.max(1);
    // Per stage: how many rounds of attempts its maps have used (a re-run
    // of lost maps starts a round, so its attempt ids are new).
    let mut rounds: HashMap<u64, u32> = HashMap::new();
    let run_maps = |stage: &crate::exchange::Stage, maps: Vec<u32>, round: u32| {
        let slots = slots.clone();
        let run_map = stage.run_map.clone();
        let base = ctx.clone();
        let name = stage.name.clone();
        move |i: u32| -> BoxFuture<'static, Result<(), EngineError>> {
            let map = maps[i as usize];
            let task_ctx = TaskContext { part: map, attempt: round * per_round, ..base.clone() };
            let run_map = run_map.clone();
            Box::pin(attempt(format!("{name} map {map}"), task_ctx, slots.clone(), move |c| run_map(c)))
        }
    };
    let mut recoveries = 0;
    // Re-runs the lost maps of the stages that wrote `lost`.
    let mut recover = |lost: BTreeMap<ShuffleId, BTreeSet<u32>>, rounds: &mut HashMap<u64, u32>| {
        recoveries += 1;
        let mut plan = Vec::new();
        for (shuffle, maps) in lost {
            let Some(stage) = dataset.stages.iter().find(|s| ctx.shuffle(s.id).id == shuffle) else {
                return Err(EngineError::Runtime(format!(
                    "shuffle {shuffle} lost data but belongs to no stage of this job"
                )));
            };
            let round = rounds.entry(stage.id).or_insert(0);
            *round += 1;
            plan.push((stage, maps.into_iter().collect::<Vec<u32>>(), *round));
        }
        if recoveries > MAX_LOSS_RECOVERIES {
            return Err(EngineError::Runtime(format!(
                "shuffle data was lost {recoveries} times in one job (at most {MAX_LOSS_RECOVERIES} recoveries)"
            )));
        }
        Ok(plan)
    };
    for stage in &dataset.stages {
        let shuffle = ctx.shuffle(stage.id);
        ctx.client.register_shuffle(shuffle.id, shuffle.spec).await?;
        let started = std::time::Instant::now();
        let maps: Vec<u32> = (0..stage.maps).collect();
        let mut done = BTreeSet::new();
        loop {
            let round = rounds.get(&stage.id).copied().unwrap_or(0);
            let lost = run_tasks(stage.maps, &mut done, run_maps(stage, maps.clone(), round)).await?;
            if lost.is_empty() {
                break;
            }
            // This stage's maps read an earlier stage's lost blocks: those
            // run again, then this stage's unfinished maps, as new attempts.
            for (stage, maps, round) in recover(lost, &mut rounds)? {
                rerun(ctx, stage, &maps, run_maps(stage, maps.clone(), round)).await?;
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
    let mut done = BTreeSet::new();
    loop {
        let spawn = |part: u32| -> BoxFuture<'static, Result<(), EngineError>> {
            let task_ctx = TaskContext { part, ..ctx.clone() };
            let task = result_task(dataset.open.clone(), sink.clone());
            Box::pin(attempt(format!("result part {part}"), task_ctx, slots.clone(), task))
        };
        let lost = run_tasks(dataset.parts, &mut done, spawn).await?;
        if lost.is_empty() {
            break;
        }
        for (stage, maps, round) in recover(lost, &mut rounds)? {
            rerun(ctx, stage, &maps, run_maps(stage, maps.clone(), round)).await?;
        }
    }
    tracing::debug!("{} result tasks in {:.2?}", dataset.parts, started.elapsed());
    Ok(())
}

/// Re-runs exactly `maps` of `stage` as new attempts, and records it.
async fn rerun<F>(ctx: &TaskContext, stage: &crate::exchange::Stage, maps: &[u32], spawn: F) -> Result<(), EngineError>
where
    F: Fn(u32) -> BoxFuture<'static, Result<(), EngineError>>,
{
    let shuffle = ctx.shuffle(stage.id).id;
    tracing::warn!(stage = %stage.name, %shuffle, ?maps, "shuffle data lost with a worker: re-running exactly these maps");
    ctx.reruns.lock().unwrap_or_else(|e| e.into_inner()).push(MapRerun {
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

async fn run_streaming<T: Data>(
    dataset: &Dataset<T>,
    ctx: &TaskContext,
    sink: SinkFactory<T>,
) -> Result<(), EngineError> {
    for stage in &dataset.stages {
        let shuffle = ctx.shuffle(stage.id);
        ctx.client.register_shuffle(shuffle.id, shuffle.spec).await?;
    }
    let mut tasks = JoinSet::new();
    for stage in &dataset.stages {
        for map in 0..stage.maps {
            let run_map = stage.run_map.clone();
            let task_ctx = TaskContext { part: map, ..ctx.clone() };
            tasks.spawn(attempt(format!("{} map {map}", stage.name), task_ctx, None, move |c| run_map(c)));
        }
    }
    for part in 0..dataset.parts {
        let task_ctx = TaskContext { part, ..ctx.clone() };
        let task = result_task(dataset.open.clone(), sink.clone());
        tasks.spawn(attempt(format!("result part {part}"), task_ctx, None, task));
    }
    join_all(tasks).await
}
