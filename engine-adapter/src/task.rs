//! What every task sees: records in batches with their creation time, the
//! input trait operators chain through, and the task's context.
//!
//! Operators are pull-based: a task asks its input for the next item, each
//! narrow operator (`map`, `filter`, `flat_map`) transforms a whole batch,
//! and the end of the chain writes the batch to an exchange or a sink. A
//! batch is bounded ([`BATCH_RECORDS`]), so memory between operators is too.
//! In a streaming job with checkpoints, checkpoint barriers travel the same
//! chain as items between batches (see [`crate::checkpoint`]); when one
//! reaches the end of a task's chain, every record before it has been
//! processed and none after it, and the task snapshots the chain's state.

use std::{
    collections::HashMap,
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use shuffle_client::{ShuffleClient, ShuffleId, ShuffleSpec};

use crate::{
    EngineError, ExecutionMode,
    checkpoint::TaskCheckpointing,
    engine::EngineOptions,
    memory::MemoryPool,
    metrics::TaskStats,
    state::{RestoredState, Snapshot},
};

/// Records per batch from sources and keyed operators: enough to amortise a
/// virtual call and an allocation per batch, small enough that a streaming
/// source's batch leaves within a millisecond or two.
pub const BATCH_RECORDS: usize = 4096;

/// A boxed future, as the object-safe input trait returns.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A record and the time its source created it (microseconds since the Unix
/// epoch), so a streaming sink can measure end-to-end latency.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Event<T> {
    pub value: T,
    pub created_us: u64,
}

/// A bounded run of records passed between operators.
pub(crate) type Batch<T> = Vec<Event<T>>;

/// What an input yields: records, or a checkpoint's barrier (all inputs of
/// the chain below have passed it), or the news that a checkpoint was
/// given up upstream.
pub(crate) enum Item<T> {
    Batch(Batch<T>),
    Barrier(u64),
    Cancel(u64),
}

/// One task's stream of items. `None` means the input is exhausted.
pub(crate) trait Input<T>: Send {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Item<T>>, EngineError>>;

    /// Adds the state of this operator and of the operators below it.
    fn snapshot(&mut self, _snapshot: &mut Snapshot) -> Result<(), EngineError> {
        Ok(())
    }
}

pub(crate) type BoxInput<T> = Box<dyn Input<T>>;

/// Opens a dataset's input for one task (its part is `ctx.part`).
pub(crate) type OpenFn<T> = Arc<dyn Fn(&TaskContext) -> Result<BoxInput<T>, EngineError> + Send + Sync>;

/// The shuffle an exchange stage was given for this run, and its spec.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RunShuffle {
    pub id: ShuffleId,
    pub spec: ShuffleSpec,
}

/// What a task needs to run.
#[derive(Clone)]
pub(crate) struct TaskContext {
    /// The connection to the shuffle service.
    pub client: ShuffleClient,
    /// How the job runs.
    pub mode: ExecutionMode,
    /// Which part of its dataset (map task or partition) this task is.
    pub part: u32,
    /// The attempt number of this task, from 0.
    pub attempt: u32,
    /// The shuffle each exchange stage of the job got for this run.
    pub shuffles: Arc<HashMap<u64, RunShuffle>>,
    /// The engine's options.
    pub options: Arc<EngineOptions>,
    /// The engine's memory budget.
    pub memory: Arc<MemoryPool>,
    /// Where operators spill.
    pub spill_dir: Arc<PathBuf>,
    /// This task's counters.
    pub stats: Arc<TaskStats>,
    /// Streaming with checkpoints: the coordinator's signals and the backend.
    pub checkpoints: Option<Arc<TaskCheckpointing>>,
    /// After a restart: the task's state at the checkpoint restored.
    pub restored: Option<Arc<RestoredState>>,
    /// Names the task in reservations and errors.
    pub name: Arc<str>,
}

impl TaskContext {
    pub(crate) fn shuffle(&self, stage: u64) -> RunShuffle {
        // The executor assigns a shuffle to every stage of the job before any task starts.
        *self.shuffles.get(&stage).expect("every stage of the job has a shuffle")
    }

    /// Operator `op`'s serialized state at the restored checkpoint, if any.
    pub(crate) fn restored<T: serde::de::DeserializeOwned>(&self, op: u64) -> Result<Option<T>, EngineError> {
        match &self.restored {
            Some(state) => state.get(op),
            None => Ok(None),
        }
    }

    /// A reservation for an operator of this task.
    pub(crate) fn reservation(&self, operator: &str, spillable: bool) -> crate::memory::Reservation {
        self.memory.reservation(format!("{operator} in {}", self.name), spillable)
    }
}

/// Now, in microseconds since the Unix epoch.
pub(crate) fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Cuts events into batches of at most [`BATCH_RECORDS`].
pub(crate) fn into_batches<T>(events: Vec<Event<T>>) -> Vec<Batch<T>> {
    let mut batches = Vec::with_capacity(events.len().div_ceil(BATCH_RECORDS));
    let mut events = events.into_iter().peekable();
    while events.peek().is_some() {
        batches.push(events.by_ref().take(BATCH_RECORDS).collect());
    }
    batches
}
