//! What every task sees: records in batches with their creation time, the
//! input trait operators chain through, and the task's context.
//!
//! Operators are pull-based: a task asks its input for the next batch, each
//! narrow operator (`map`, `filter`, `flat_map`) transforms a whole batch,
//! and the end of the chain writes the batch to an exchange or a sink. A
//! batch is bounded ([`BATCH_RECORDS`]), so memory between operators is too.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use shuffle_client::{ShuffleClient, ShuffleId, ShuffleSpec};

use crate::{EngineError, ExecutionMode, engine::EngineOptions};

/// Records per batch from sources and keyed operators: enough to amortise a
/// virtual call and an allocation per batch, small enough that a streaming
/// source's batch leaves within a millisecond or two.
pub const BATCH_RECORDS: usize = 4096;

/// A boxed future, as the object-safe input trait returns.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A record and the time its source created it (microseconds since the Unix
/// epoch), so a streaming sink can measure end-to-end latency.
#[derive(Clone, Debug)]
pub(crate) struct Event<T> {
    pub value: T,
    pub created_us: u64,
}

/// A bounded run of records passed between operators.
pub(crate) type Batch<T> = Vec<Event<T>>;

/// One task's stream of batches. `None` means the input is exhausted.
pub(crate) trait Input<T>: Send {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Batch<T>>, EngineError>>;
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
    /// The engine's log of lost maps re-run.
    pub reruns: Arc<std::sync::Mutex<Vec<crate::executor::MapRerun>>>,
}

impl TaskContext {
    pub(crate) fn shuffle(&self, stage: u64) -> RunShuffle {
        // The executor assigns a shuffle to every stage of the job before any task starts.
        *self.shuffles.get(&stage).expect("every stage of the job has a shuffle")
    }
}

/// Now, in microseconds since the Unix epoch.
pub(crate) fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// An input that yields the batches of a vector, then ends.
pub(crate) struct VecInput<T> {
    pub batches: std::vec::IntoIter<Batch<T>>,
}

impl<T: Send> Input<T> for VecInput<T> {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Batch<T>>, EngineError>> {
        Box::pin(async move { Ok(self.batches.next()) })
    }
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
