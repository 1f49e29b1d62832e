//! [`Dataset`]: a lazily built, typed, partitioned collection, and the
//! narrow operators (`map`, `filter`, `flat_map`) that transform it without
//! an exchange.
//!
//! A dataset is a recipe: how one task opens its part (`open`), how many
//! parts there are, and the exchange stages upstream of it. Nothing runs
//! until a sink (see `sink.rs`) executes the job in a chosen
//! [`crate::ExecutionMode`]; the same dataset can be run in either mode,
//! and any number of times.

use std::sync::Arc;

use crate::{
    Engine, EngineError,
    exchange::Stage,
    state::Snapshot,
    task::{Batch, BoxFuture, BoxInput, Event, Input, Item, OpenFn, TaskContext},
};

/// What a dataset's records must be: sent between tasks and threads.
pub trait Data: Clone + Send + Sync + 'static {}
impl<T: Clone + Send + Sync + 'static> Data for T {}

/// A typed, partitioned collection of records, built lazily.
pub struct Dataset<T> {
    pub(crate) engine: Engine,
    /// Number of parts (tasks reading this dataset).
    pub(crate) parts: u32,
    /// Whether every input of this dataset ends.
    pub(crate) bounded: bool,
    /// The exchange stages this dataset depends on, each after its own dependencies.
    pub(crate) stages: Vec<Arc<Stage>>,
    /// Opens one part.
    pub(crate) open: OpenFn<T>,
    /// Why the job cannot run, if it cannot (reported when it is run).
    pub(crate) invalid: Option<Arc<str>>,
}

impl<T> Clone for Dataset<T> {
    fn clone(&self) -> Self {
        Self {
            engine: self.engine.clone(),
            parts: self.parts,
            bounded: self.bounded,
            stages: self.stages.clone(),
            open: self.open.clone(),
            invalid: self.invalid.clone(),
        }
    }
}

/// A batch transform shared by every task of a narrow operator.
type TransformFn<T, U> = Arc<dyn Fn(Batch<T>) -> Batch<U> + Send + Sync>;

struct TransformInput<T, U> {
    inner: BoxInput<T>,
    f: TransformFn<T, U>,
}

impl<T: Send, U: Send> Input<U> for TransformInput<T, U> {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Item<U>>, EngineError>> {
        Box::pin(async move {
            Ok(self.inner.next().await?.map(|item| match item {
                Item::Batch(batch) => Item::Batch((self.f)(batch)),
                Item::Barrier(id) => Item::Barrier(id),
                Item::Cancel(id) => Item::Cancel(id),
            }))
        })
    }

    fn snapshot(&mut self, snapshot: &mut Snapshot) -> Result<(), EngineError> {
        self.inner.snapshot(snapshot)
    }
}

impl<T: Data> Dataset<T> {
    pub(crate) fn source(engine: Engine, parts: u32, bounded: bool, open: OpenFn<T>) -> Self {
        Self { engine, parts, bounded, stages: Vec::new(), open, invalid: None }
    }

    /// Number of parts: the parallelism of the tasks that read this dataset.
    pub fn parts(&self) -> u32 {
        self.parts
    }

    /// Whether the dataset ends (every source is bounded).
    pub fn is_bounded(&self) -> bool {
        self.bounded
    }

    /// The engine this dataset runs on.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// A dataset with the same parts and upstream whose batches pass through `f`.
    fn transform<U: Data>(&self, f: TransformFn<T, U>) -> Dataset<U> {
        let open = self.open.clone();
        Dataset {
            engine: self.engine.clone(),
            parts: self.parts,
            bounded: self.bounded,
            stages: self.stages.clone(),
            open: Arc::new(move |ctx: &TaskContext| {
                Ok(Box::new(TransformInput { inner: open(ctx)?, f: f.clone() }) as _)
            }),
            invalid: self.invalid.clone(),
        }
    }

    /// Applies `f` to every record.
    pub fn map<U: Data>(&self, f: impl Fn(T) -> U + Send + Sync + 'static) -> Dataset<U> {
        self.transform(Arc::new(move |batch: Batch<T>| {
            batch.into_iter().map(|e| Event { value: f(e.value), created_us: e.created_us }).collect()
        }))
    }

    /// Keeps the records for which `f` is true.
    pub fn filter(&self, f: impl Fn(&T) -> bool + Send + Sync + 'static) -> Dataset<T> {
        self.transform(Arc::new(move |batch: Batch<T>| batch.into_iter().filter(|e| f(&e.value)).collect()))
    }

    /// Replaces every record with the records `f` returns for it.
    pub fn flat_map<U: Data, I: IntoIterator<Item = U>>(
        &self,
        f: impl Fn(T) -> I + Send + Sync + 'static,
    ) -> Dataset<U> {
        self.transform(Arc::new(move |batch: Batch<T>| {
            let mut out = Vec::with_capacity(batch.len());
            for e in batch {
                out.extend(f(e.value).into_iter().map(|value| Event { value, created_us: e.created_us }));
            }
            out
        }))
    }

    /// A dataset that fails when run, with `why`.
    pub(crate) fn with_invalid(mut self, why: Option<Arc<str>>) -> Self {
        if self.invalid.is_none() {
            self.invalid = why;
        }
        self
    }
}

/// The stages of two datasets, each once, dependencies first.
pub(crate) fn merge_stages(a: &[Arc<Stage>], b: &[Arc<Stage>]) -> Vec<Arc<Stage>> {
    let mut stages = a.to_vec();
    for stage in b {
        if !stages.iter().any(|s| s.id == stage.id) {
            stages.push(stage.clone());
        }
    }
    stages
}
