//! The two executors. Both take a dataset (its exchange stages and its
//! final parts) and a sink, register one fresh shuffle per stage, run the
//! tasks and unregister the shuffles, whatever happened.
//!
//! - Batch: stage after stage; a stage's map tasks run (at most
//!   `batch_task_slots` at a time) over blocking exchanges, and a failed
//!   task (error or panic) is run again as a new attempt, up to
//!   `max_task_attempts`. The service's commit rule hides the partial
//!   output of failed attempts.
//! - Streaming: every task of every stage, and the result tasks, at once
//!   over hybrid exchanges; backpressure runs from the sink through the
//!   service to the sources. A failed task fails the job.

use std::{collections::HashMap, sync::Arc};

use shuffle_client::ShuffleId;
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

/// Runs `task` with retries (batch) under a slot, if slots are limited.
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
    for attempt in 0..attempts {
        ctx.attempt = attempt;
        let mut handle = AbortOnDrop(tokio::spawn(task(ctx.clone())));
        cause = match (&mut handle.0).await {
            Ok(Ok(())) => return Ok(()),
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
    for stage in &dataset.stages {
        let shuffle = ctx.shuffle(stage.id);
        ctx.client.register_shuffle(shuffle.id, shuffle.spec).await?;
        let started = std::time::Instant::now();
        let mut tasks = JoinSet::new();
        for map in 0..stage.maps {
            let run_map = stage.run_map.clone();
            let task_ctx = TaskContext { part: map, ..ctx.clone() };
            let name = format!("{} map {map}", stage.name);
            tasks.spawn(attempt(name, task_ctx, slots.clone(), move |c| run_map(c)));
        }
        join_all(tasks).await?;
        tracing::debug!(
            "{}: {} map tasks into {:?} in {:.2?}",
            stage.name,
            stage.maps,
            shuffle.spec.mode,
            started.elapsed()
        );
    }
    let started = std::time::Instant::now();
    let mut tasks = JoinSet::new();
    for part in 0..dataset.parts {
        let task_ctx = TaskContext { part, ..ctx.clone() };
        let task = result_task(dataset.open.clone(), sink.clone());
        tasks.spawn(attempt(format!("result part {part}"), task_ctx, slots.clone(), task));
    }
    join_all(tasks).await?;
    tracing::debug!("{} result tasks in {:.2?}", dataset.parts, started.elapsed());
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
