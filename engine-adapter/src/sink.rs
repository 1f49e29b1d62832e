//! Sinks: what runs a job and where its results go. Each sink runs the job
//! in the mode given, one result task per part of the final dataset.
//!
//! A result task writes into its own part sink and commits it when its
//! input ends; a batch task that fails is run again with a fresh part sink,
//! so `collect`, `collect_latest` and `write_text` see every record exactly
//! once. `for_each` calls the user's function as records arrive, so a
//! retried task calls it again for the records it replays.

use std::{
    collections::HashMap,
    fmt::Display,
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    Data, Dataset, EngineError, ExecutionMode,
    exchange::{Key, Value},
    executor,
    task::{Batch, now_us},
    workload::splitmix64,
};

/// Where one result task's records go.
pub(crate) trait PartSink<T>: Send {
    fn write(&mut self, batch: Batch<T>) -> Result<(), EngineError>;
    /// The task's input ended: make its output visible.
    fn commit(self: Box<Self>) -> Result<(), EngineError>;
}

/// Makes the part sink of part `part` (called once per task attempt).
pub(crate) type SinkFactory<T> = Arc<dyn Fn(u32) -> Result<Box<dyn PartSink<T>>, EngineError> + Send + Sync>;

/// Locks a sink's shared state; a poisoned lock means a task panicked
/// while committing, which the executor reports as that task's failure.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct CollectPart<T> {
    part: u32,
    records: Vec<T>,
    results: Arc<Mutex<Vec<Option<Vec<T>>>>>,
}

impl<T: Send> PartSink<T> for CollectPart<T> {
    fn write(&mut self, batch: Batch<T>) -> Result<(), EngineError> {
        self.records.extend(batch.into_iter().map(|e| e.value));
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<(), EngineError> {
        lock(&self.results)[self.part as usize] = Some(self.records);
        Ok(())
    }
}

/// Calls the user's function on every record with its part and age.
struct ForEachPart<F> {
    part: u32,
    f: Arc<F>,
}

impl<T: Send, F: Fn(u32, T, Duration) + Send + Sync> PartSink<T> for ForEachPart<F> {
    fn write(&mut self, batch: Batch<T>) -> Result<(), EngineError> {
        // One clock read per batch: its records reach the function together.
        let now = now_us();
        for event in batch {
            let age = Duration::from_micros(now.saturating_sub(event.created_us));
            (self.f)(self.part, event.value, age);
        }
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<(), EngineError> {
        Ok(())
    }
}

struct LatestPart<K, V> {
    latest: HashMap<K, V>,
    results: Arc<Mutex<HashMap<K, V>>>,
}

impl<K: Key, V: Data> PartSink<(K, V)> for LatestPart<K, V> {
    fn write(&mut self, batch: Batch<(K, V)>) -> Result<(), EngineError> {
        self.latest.extend(batch.into_iter().map(|e| e.value));
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<(), EngineError> {
        lock(&self.results).extend(self.latest);
        Ok(())
    }
}

/// Writes a part's lines to a hidden file, renamed into place on commit.
struct TextPart {
    temp: PathBuf,
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl<T: Display> PartSink<T> for TextPart {
    fn write(&mut self, batch: Batch<T>) -> Result<(), EngineError> {
        for event in batch {
            writeln!(self.file, "{}", event.value).map_err(|e| EngineError::io(&self.temp, e))?;
        }
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<(), EngineError> {
        let file = self.file.into_inner().map_err(|e| EngineError::io(&self.temp, e.into_error()))?;
        file.sync_all().map_err(|e| EngineError::io(&self.temp, e))?;
        std::fs::rename(&self.temp, &self.path).map_err(|e| EngineError::io(&self.path, e))
    }
}

/// Keeps a uniform sample of at most `capacity` records' encoded keys
/// (reservoir sampling with a generator seeded by the part, so a job's
/// sample is reproducible).
pub(crate) struct ReservoirSink<T, E> {
    capacity: usize,
    seen: u64,
    rng: u64,
    sample: Vec<Vec<u8>>,
    encode: E,
    results: Arc<Mutex<Vec<Vec<u8>>>>,
    _records: std::marker::PhantomData<fn(T)>,
}

impl<T, E> ReservoirSink<T, E> {
    pub(crate) fn new(part: u32, capacity: usize, results: Arc<Mutex<Vec<Vec<u8>>>>, encode: E) -> Self {
        Self {
            capacity,
            seen: 0,
            rng: u64::from(part),
            sample: Vec::new(),
            encode,
            results,
            _records: std::marker::PhantomData,
        }
    }
}

impl<T, E> PartSink<T> for ReservoirSink<T, E>
where
    E: Fn(&T, &mut Vec<u8>) -> Result<(), EngineError> + Send,
{
    fn write(&mut self, batch: Batch<T>) -> Result<(), EngineError> {
        for event in batch {
            self.seen += 1;
            let slot = if self.sample.len() < self.capacity {
                self.sample.push(Vec::new());
                self.sample.len() - 1
            } else {
                self.rng = self.rng.wrapping_add(1);
                let j = (splitmix64(self.rng) % self.seen) as usize;
                if j >= self.capacity {
                    continue;
                }
                j
            };
            (self.encode)(&event.value, &mut self.sample[slot])?;
        }
        Ok(())
    }

    fn commit(self: Box<Self>) -> Result<(), EngineError> {
        lock(&self.results).extend(self.sample);
        Ok(())
    }
}

impl<T: Data> Dataset<T> {
    fn run(&self, mode: ExecutionMode, sink: SinkFactory<T>) -> Result<(), EngineError> {
        self.engine.block_on(executor::run(self, mode, sink))
    }

    /// Runs the job and returns every record of its final dataset, part by
    /// part in order (so the output of `sort_by_key` comes out sorted). In
    /// streaming mode, after `reduce_by_key` this includes every update.
    pub fn collect(&self, mode: ExecutionMode) -> Result<Vec<T>, EngineError> {
        let results = Arc::new(Mutex::new((0..self.parts).map(|_| None).collect::<Vec<_>>()));
        let sink_results = results.clone();
        self.run(
            mode,
            Arc::new(move |part| {
                Ok(Box::new(CollectPart { part, records: Vec::new(), results: sink_results.clone() }) as _)
            }),
        )?;
        let parts = std::mem::take(&mut *lock(&results));
        Ok(parts.into_iter().flatten().flatten().collect())
    }

    /// Runs the job and counts the records of its final dataset.
    pub fn count(&self, mode: ExecutionMode) -> Result<u64, EngineError> {
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = count.clone();
        self.for_each(mode, move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })?;
        Ok(count.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Runs the job, calling `f` on every record of its final dataset as it
    /// arrives (from several tasks at once).
    pub fn for_each(&self, mode: ExecutionMode, f: impl Fn(T) + Send + Sync + 'static) -> Result<(), EngineError> {
        self.for_each_timed(mode, move |value, _| f(value))
    }

    /// Like [`Dataset::for_each`], also passing each record's age: the time
    /// since its source created it (for a keyed reduction's update, since
    /// the oldest record that contributed to it). This is the end-to-end
    /// latency a streaming job reports.
    pub fn for_each_timed(
        &self,
        mode: ExecutionMode,
        f: impl Fn(T, Duration) + Send + Sync + 'static,
    ) -> Result<(), EngineError> {
        self.for_each_event(mode, move |_, value, age| f(value, age))
    }

    /// Like [`Dataset::for_each`], also passing the number of the part (the
    /// partition, after an exchange) each record belongs to.
    pub fn for_each_in_part(
        &self,
        mode: ExecutionMode,
        f: impl Fn(u32, T) + Send + Sync + 'static,
    ) -> Result<(), EngineError> {
        self.for_each_event(mode, move |part, value, _| f(part, value))
    }

    /// Runs the job, calling `f(part, record, age)` on every record of its final dataset.
    fn for_each_event(
        &self,
        mode: ExecutionMode,
        f: impl Fn(u32, T, Duration) + Send + Sync + 'static,
    ) -> Result<(), EngineError> {
        let f = Arc::new(f);
        self.run(mode, Arc::new(move |part| Ok(Box::new(ForEachPart { part, f: f.clone() }) as _)))
    }

    /// Runs the job and writes each part's records, one line each, to
    /// `dir/part-NNNNN` (a part's file appears only once it is complete).
    pub fn write_text(&self, mode: ExecutionMode, dir: impl AsRef<Path>) -> Result<(), EngineError>
    where
        T: Display,
    {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| EngineError::io(&dir, e))?;
        self.run(
            mode,
            Arc::new(move |part| {
                let path = dir.join(format!("part-{part:05}"));
                let temp = dir.join(format!(".part-{part:05}.tmp"));
                let file = std::fs::File::create(&temp).map_err(|e| EngineError::io(&temp, e))?;
                Ok(Box::new(TextPart { temp, path, file: std::io::BufWriter::new(file) }) as _)
            }),
        )
    }
}

impl<K: Key, V: Value> Dataset<(K, V)> {
    /// Runs the job and returns, per key, the last value the job emitted for
    /// it: the final results of a keyed reduction in either mode.
    pub fn collect_latest(&self, mode: ExecutionMode) -> Result<HashMap<K, V>, EngineError> {
        let results = Arc::new(Mutex::new(HashMap::new()));
        let sink_results = results.clone();
        self.run(
            mode,
            Arc::new(move |_| Ok(Box::new(LatestPart { latest: HashMap::new(), results: sink_results.clone() }) as _)),
        )?;
        Ok(std::mem::take(&mut *lock(&results)))
    }
}
