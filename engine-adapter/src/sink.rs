//! Sinks: where a job's results go, one writer per part of the final
//! dataset (one result task each).
//!
//! [`Sink`] and [`SinkWriter`] are public: a user writes to their own
//! system by implementing them and running the job with
//! [`Dataset::run`](crate::Dataset::run). The built-in sinks are written
//! the same way. What each guarantees:
//!
//! - [`Dataset::collect`], [`Dataset::collect_latest`] and
//!   [`Dataset::write_text`]: **exactly once**. In batch mode a part's
//!   output becomes visible when its task succeeds (a failed attempt's is
//!   dropped). In a streaming job with checkpoints the writer stages its
//!   output at each checkpoint's barrier and commits it when the checkpoint
//!   completes (`write_text`: a file per checkpoint, renamed into place; the
//!   collecting sinks keep their output in the checkpoint and return it when
//!   the job ends); after a restart it commits what the restored checkpoint
//!   staged and drops everything written after it, which the sources replay.
//! - [`Dataset::for_each`] and its variants: **at least once**. The function
//!   sees records as they arrive; after a retried batch task or a streaming
//!   restart it sees again the records written since the task started
//!   (batch) or since the restored checkpoint (streaming).

use std::{
    collections::HashMap,
    fmt::Display,
    io::Write,
    marker::PhantomData,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{
    Data, Dataset, EngineError, ExecutionMode,
    exchange::{Key, Value},
    task::{Batch, now_us},
    workload::splitmix64,
};

/// Where a job's results go: opens one writer per part.
pub trait Sink<T>: Send + Sync + 'static {
    /// Writes one part.
    type Writer: SinkWriter<T>;

    /// Opens the writer of part `part`. `restored` is `None` except in a
    /// streaming job restarting from a checkpoint: then it is what this
    /// part's writer returned from [`SinkWriter::snapshot`] at that
    /// checkpoint, and the new writer must make visible what that state
    /// staged (the checkpoint completed, though the commit may not have
    /// reached the old writer) and drop anything written after it.
    fn open(
        &self,
        part: u32,
        restored: Option<<Self::Writer as SinkWriter<T>>::State>,
    ) -> Result<Self::Writer, EngineError>;
}

/// Writes one part's records.
///
/// The calls a writer gets: in batch mode, `write` for every batch and
/// `finish` once the task's input ends (a failed attempt's writer is
/// dropped without `finish`, and a new one opened). In a streaming job,
/// `write` as records arrive, `snapshot(n)` when checkpoint `n`'s barrier
/// reaches the part, `commit(n)` when checkpoint `n` has completed on every
/// task, and `finish` when the job's input has ended everywhere. Calls run
/// on the engine's threads and may block: `write` runs in place while it
/// returns within a millisecond, and off the runtime's worker (tokio's
/// `block_in_place`) for the rest of the task once a call took longer;
/// the other calls always run off the worker.
pub trait SinkWriter<T>: Send + 'static {
    /// What a restarted job needs to resume this part (see [`Sink::open`]).
    type State: Serialize + DeserializeOwned + Send + 'static;

    fn write(&mut self, records: Vec<T>) -> Result<(), EngineError>;

    /// Stages everything written so far (durable but not yet visible) and
    /// returns what resuming from this point needs.
    fn snapshot(&mut self, checkpoint: u64) -> Result<Self::State, EngineError>;

    /// Makes visible what was staged at checkpoints up to `checkpoint`.
    fn commit(&mut self, _checkpoint: u64) -> Result<(), EngineError> {
        Ok(())
    }

    /// The input ended and the job succeeded: make everything visible.
    fn finish(self) -> Result<(), EngineError>;
}

/// The operator id a sink's state is kept under in a result task's checkpoint.
pub(crate) const SINK_OPERATOR: u64 = 0;

/// What a result task drives: a user's writer or a built-in one.
pub(crate) trait PartSink<T>: Send {
    fn write(&mut self, batch: Batch<T>) -> Result<(), EngineError>;
    /// The serialized state for checkpoint `checkpoint`.
    fn snapshot(&mut self, checkpoint: u64) -> Result<Vec<u8>, EngineError>;
    fn commit(&mut self, checkpoint: u64) -> Result<(), EngineError>;
    fn finish(self: Box<Self>) -> Result<(), EngineError>;
}

/// Makes the part sink of part `part`, from its restored state if any.
pub(crate) type SinkFactory<T> =
    Arc<dyn Fn(u32, Option<Vec<u8>>) -> Result<Box<dyn PartSink<T>>, EngineError> + Send + Sync>;

fn encode_state(state: &impl Serialize) -> Result<Vec<u8>, EngineError> {
    postcard::to_stdvec(state).map_err(|e| EngineError::State(format!("a sink's state: {e}")))
}

fn decode_state<S: DeserializeOwned>(bytes: Option<Vec<u8>>) -> Result<Option<S>, EngineError> {
    bytes
        .map(|b| postcard::from_bytes(&b).map_err(|e| EngineError::State(format!("a sink's restored state: {e}"))))
        .transpose()
}

/// A user's writer behind the part sink the executor drives.
struct UserPart<T, W> {
    writer: W,
    _records: PhantomData<fn(T)>,
}

impl<T: Send, W: SinkWriter<T>> PartSink<T> for UserPart<T, W> {
    fn write(&mut self, batch: Batch<T>) -> Result<(), EngineError> {
        self.writer.write(batch.into_iter().map(|e| e.value).collect())
    }

    fn snapshot(&mut self, checkpoint: u64) -> Result<Vec<u8>, EngineError> {
        encode_state(&self.writer.snapshot(checkpoint)?)
    }

    fn commit(&mut self, checkpoint: u64) -> Result<(), EngineError> {
        self.writer.commit(checkpoint)
    }

    fn finish(self: Box<Self>) -> Result<(), EngineError> {
        self.writer.finish()
    }
}

/// The factory the executor uses for a user's sink.
pub(crate) fn user_sink<T: Data, S: Sink<T>>(sink: S) -> SinkFactory<T> {
    let sink = Arc::new(sink);
    Arc::new(move |part, restored| {
        let writer = sink.open(part, decode_state(restored)?)?;
        Ok(Box::new(UserPart { writer, _records: PhantomData }) as _)
    })
}

/// Locks a sink's shared state; a poisoned lock means a task panicked
/// while committing, which the executor reports as that task's failure.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Keeps a part's records; they join the job's output when the job ends.
struct CollectPart<T> {
    part: u32,
    records: Vec<T>,
    results: CollectSlots<T>,
}

impl<T: Value> PartSink<T> for CollectPart<T> {
    fn write(&mut self, batch: Batch<T>) -> Result<(), EngineError> {
        self.records.extend(batch.into_iter().map(|e| e.value));
        Ok(())
    }

    fn snapshot(&mut self, _checkpoint: u64) -> Result<Vec<u8>, EngineError> {
        encode_state(&self.records)
    }

    fn commit(&mut self, _checkpoint: u64) -> Result<(), EngineError> {
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), EngineError> {
        lock(&self.results)[self.part as usize] = Some(self.records);
        Ok(())
    }
}

/// Calls the user's function on every record with its part and age.
pub(crate) struct ForEachPart<F> {
    pub(crate) part: u32,
    pub(crate) f: Arc<F>,
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

    fn snapshot(&mut self, _checkpoint: u64) -> Result<Vec<u8>, EngineError> {
        Ok(Vec::new())
    }

    fn commit(&mut self, _checkpoint: u64) -> Result<(), EngineError> {
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), EngineError> {
        Ok(())
    }
}

/// Keeps the last value of each key of a part.
struct LatestPart<K, V> {
    part: u32,
    latest: HashMap<K, V>,
    results: LatestSlots<K, V>,
}

impl<K: Key, V: Value> PartSink<(K, V)> for LatestPart<K, V> {
    fn write(&mut self, batch: Batch<(K, V)>) -> Result<(), EngineError> {
        self.latest.extend(batch.into_iter().map(|e| e.value));
        Ok(())
    }

    fn snapshot(&mut self, _checkpoint: u64) -> Result<Vec<u8>, EngineError> {
        encode_state(&self.latest)
    }

    fn commit(&mut self, _checkpoint: u64) -> Result<(), EngineError> {
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), EngineError> {
        lock(&self.results)[self.part as usize] = Some(self.latest);
        Ok(())
    }
}

/// What a streaming text part needs after a restart.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct TextState {
    /// The sequence number of the next file.
    next_file: u32,
    /// Files staged at a checkpoint and not yet made visible: (file, checkpoint).
    staged: Vec<(u32, u64)>,
}

/// Writes a part's lines. Batch: one hidden file renamed to `part-NNNNN`
/// on success. Streaming: a hidden file per checkpoint interval, closed and
/// synced at the barrier, renamed to `part-NNNNN-FFFFFF` when the
/// checkpoint completes (and the last one when the job ends).
struct TextPart {
    dir: PathBuf,
    part: u32,
    streaming: bool,
    state: TextState,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl TextPart {
    fn open(dir: &Path, part: u32, mode: ExecutionMode, restored: Option<TextState>) -> Result<Self, EngineError> {
        let mut this = Self {
            dir: dir.to_path_buf(),
            part,
            streaming: mode == ExecutionMode::Streaming,
            state: TextState::default(),
            file: None,
        };
        if let Some(state) = restored {
            // The restored checkpoint completed: what it staged is committed.
            for &(file, _) in &state.staged {
                this.publish(file)?;
            }
            // Whatever was written after it is replayed, so it goes.
            this.remove_from(state.next_file)?;
            this.state = TextState { next_file: state.next_file, staged: Vec::new() };
        } else if this.streaming {
            this.remove_from(0)?;
        }
        Ok(this)
    }

    fn hidden(&self, file: u32) -> PathBuf {
        if self.streaming {
            self.dir.join(format!(".part-{:05}-{file:06}.inprogress", self.part))
        } else {
            self.dir.join(format!(".part-{:05}.tmp", self.part))
        }
    }

    fn visible(&self, file: u32) -> PathBuf {
        if self.streaming {
            self.dir.join(format!("part-{:05}-{file:06}", self.part))
        } else {
            self.dir.join(format!("part-{:05}", self.part))
        }
    }

    /// Removes this part's files numbered `from` or later, hidden or visible.
    fn remove_from(&self, from: u32) -> Result<(), EngineError> {
        let prefixes = [format!(".part-{:05}-", self.part), format!("part-{:05}-", self.part)];
        let entries = std::fs::read_dir(&self.dir).map_err(|e| EngineError::io(&self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| EngineError::io(&self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = prefixes.iter().find_map(|p| name.strip_prefix(p.as_str())) else { continue };
            let number = rest.trim_end_matches(".inprogress");
            if number.parse::<u32>().is_ok_and(|n| n >= from) {
                std::fs::remove_file(entry.path()).map_err(|e| EngineError::io(entry.path(), e))?;
            }
        }
        Ok(())
    }

    /// Closes and syncs the file being written, if any; returns its number.
    fn close(&mut self) -> Result<Option<u32>, EngineError> {
        let Some(file) = self.file.take() else { return Ok(None) };
        let number = self.state.next_file;
        let path = self.hidden(number);
        let file = file.into_inner().map_err(|e| EngineError::io(&path, e.into_error()))?;
        file.sync_all().map_err(|e| EngineError::io(&path, e))?;
        self.state.next_file += 1;
        Ok(Some(number))
    }

    /// Renames a staged file into place (done already if it is not there).
    fn publish(&self, file: u32) -> Result<(), EngineError> {
        let (hidden, visible) = (self.hidden(file), self.visible(file));
        match std::fs::rename(&hidden, &visible) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && visible.exists() => {}
            Err(e) => return Err(EngineError::io(&visible, e)),
        }
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| EngineError::io(&self.dir, e))
    }
}

impl<T: Display> PartSink<T> for TextPart {
    fn write(&mut self, batch: Batch<T>) -> Result<(), EngineError> {
        if self.file.is_none() {
            let path = self.hidden(self.state.next_file);
            let file = std::fs::File::create(&path).map_err(|e| EngineError::io(&path, e))?;
            self.file = Some(std::io::BufWriter::new(file));
        }
        let path = self.hidden(self.state.next_file);
        let file = self.file.as_mut().expect("opened above");
        for event in batch {
            writeln!(file, "{}", event.value).map_err(|e| EngineError::io(&path, e))?;
        }
        Ok(())
    }

    fn snapshot(&mut self, checkpoint: u64) -> Result<Vec<u8>, EngineError> {
        if let Some(file) = self.close()? {
            self.state.staged.push((file, checkpoint));
        }
        encode_state(&self.state)
    }

    fn commit(&mut self, checkpoint: u64) -> Result<(), EngineError> {
        let (due, later): (Vec<_>, Vec<_>) = self.state.staged.iter().partition(|(_, c)| *c <= checkpoint);
        for (file, _) in due {
            self.publish(file)?;
        }
        self.state.staged = later;
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<(), EngineError> {
        let last = self.close()?;
        for (file, _) in std::mem::take(&mut self.state.staged) {
            self.publish(file)?;
        }
        match last {
            Some(file) => self.publish(file),
            // Batch parts always leave their file, even an empty one.
            None if !self.streaming => {
                let path = self.visible(0);
                std::fs::File::create(&path).map(|_| ()).map_err(|e| EngineError::io(&path, e))
            }
            None => Ok(()),
        }
    }
}

/// Keeps a uniform sample of at most `capacity` records' encoded keys.
/// Reservoir sampling with geometric skips (Li's Algorithm L): once the
/// reservoir is full, the number of records to pass over before the next
/// one replaces a sampled key is drawn at once, so records between two
/// replacements cost nothing (a part of n records draws about
/// `capacity * ln(n / capacity)` numbers, not n). The generator is seeded by
/// the part, so a job's sample is reproducible. Batch only.
pub(crate) struct ReservoirSink<T, E> {
    capacity: usize,
    /// Records seen so far.
    seen: u64,
    /// Once the reservoir is full: the index (among the part's records) of the next one that enters it.
    next: u64,
    /// Algorithm L's `W`: the largest of `capacity` uniform draws, the
    /// threshold a record's draw must beat to enter.
    threshold: f64,
    rng: u64,
    sample: Vec<Vec<u8>>,
    encode: E,
    results: Arc<Mutex<Vec<Vec<u8>>>>,
    _records: PhantomData<fn(T)>,
}

impl<T, E> ReservoirSink<T, E> {
    pub(crate) fn new(part: u32, capacity: usize, results: Arc<Mutex<Vec<Vec<u8>>>>, encode: E) -> Self {
        Self {
            capacity,
            seen: 0,
            next: 0,
            threshold: 0.0,
            // A well-mixed start per part: parts draw unrelated sequences.
            rng: splitmix64(u64::from(part)),
            sample: Vec::new(),
            encode,
            results,
            _records: PhantomData,
        }
    }

    /// The next number of the part's generator (SplitMix64).
    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.rng)
    }

    /// A uniform draw in (0, 1), never 0 (its logarithm is taken).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// A uniform slot of the full reservoir.
    fn slot(&mut self) -> usize {
        ((u128::from(self.next_u64()) * self.capacity as u128) >> 64) as usize
    }

    /// Lowers the threshold as one more record entered, and draws how far the next one is.
    fn draw_next(&mut self, after: u64) {
        self.threshold *= (self.uniform().ln() / self.capacity as f64).exp();
        let skip = (self.uniform().ln() / (-self.threshold).ln_1p()).floor();
        // `as` saturates: a skip past u64::MAX means no record of the part enters any more.
        self.next = after.saturating_add(skip as u64).saturating_add(1);
    }
}

impl<T, E> PartSink<T> for ReservoirSink<T, E>
where
    E: Fn(&T, &mut Vec<u8>) -> Result<(), EngineError> + Send,
{
    fn write(&mut self, batch: Batch<T>) -> Result<(), EngineError> {
        let first = self.seen;
        self.seen += batch.len() as u64;
        if self.capacity == 0 {
            return Ok(());
        }
        let mut records = batch.iter();
        while self.sample.len() < self.capacity {
            let Some(event) = records.next() else { return Ok(()) };
            let mut key = Vec::new();
            (self.encode)(&event.value, &mut key)?;
            self.sample.push(key);
            if self.sample.len() == self.capacity {
                let filled_at = self.seen - records.len() as u64 - 1;
                self.threshold = 1.0;
                self.draw_next(filled_at);
            }
        }
        while self.next < self.seen {
            let at = self.next;
            let slot = self.slot();
            (self.encode)(&batch[(at - first) as usize].value, &mut self.sample[slot])?;
            self.draw_next(at);
        }
        Ok(())
    }

    fn snapshot(&mut self, _checkpoint: u64) -> Result<Vec<u8>, EngineError> {
        Err(EngineError::Plan("sampling runs in batch jobs only".into()))
    }

    fn commit(&mut self, _checkpoint: u64) -> Result<(), EngineError> {
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<(), EngineError> {
        lock(&self.results).extend(self.sample);
        Ok(())
    }
}

impl<T: Data> Dataset<T> {
    /// Runs the job and calls `f` on every record of its final dataset as it
    /// arrives (from several tasks at once). At least once (see the module).
    pub fn for_each(&self, mode: ExecutionMode, f: impl Fn(T) + Send + Sync + 'static) -> Result<(), EngineError> {
        self.for_each_timed(mode, move |value, _| f(value))
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
        self.run_factory(mode, Arc::new(move |part, _| Ok(Box::new(ForEachPart { part, f: f.clone() }) as _)))
            .map(|_| ())
    }

    /// Runs the job and writes each part's records, one line each, into
    /// `dir`: `part-NNNNN` per part in batch mode; in streaming mode
    /// `part-NNNNN-FFFFFF`, one file per part and checkpoint interval (a
    /// file appears only once complete and committed). Exactly once.
    pub fn write_text(&self, mode: ExecutionMode, dir: impl AsRef<Path>) -> Result<(), EngineError>
    where
        T: Display,
    {
        self.run_factory(mode, text_sink(mode, dir.as_ref())?).map(|_| ())
    }

    /// [`Dataset::write_text`] from async code.
    pub async fn write_text_async(&self, mode: ExecutionMode, dir: impl AsRef<Path>) -> Result<(), EngineError>
    where
        T: Display,
    {
        self.start_factory(mode, text_sink(mode, dir.as_ref())?)?.wait_async().await.map(|_| ())
    }
}

fn text_sink<T: Display>(mode: ExecutionMode, dir: &Path) -> Result<SinkFactory<T>, EngineError> {
    let dir = dir.to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|e| EngineError::io(&dir, e))?;
    Ok(Arc::new(move |part, restored| Ok(Box::new(TextPart::open(&dir, part, mode, decode_state(restored)?)?) as _)))
}

/// Per part, its collected records once its task finished.
type CollectSlots<T> = Arc<Mutex<Vec<Option<Vec<T>>>>>;

/// The collecting sink's shared slots and its factory.
fn collect_sink<T: Value>(parts: u32) -> (CollectSlots<T>, SinkFactory<T>) {
    let results = Arc::new(Mutex::new((0..parts).map(|_| None).collect::<Vec<_>>()));
    let sink_results = results.clone();
    let factory: SinkFactory<T> = Arc::new(move |part, restored| {
        let records = decode_state(restored)?.unwrap_or_default();
        Ok(Box::new(CollectPart { part, records, results: sink_results.clone() }) as _)
    });
    (results, factory)
}

/// The parts' records one after the other, in one allocation of the total
/// size (a part's own vector when it is the only one with records).
fn concat_parts<T>(parts: Vec<Option<Vec<T>>>) -> Vec<T> {
    let mut parts: Vec<Vec<T>> = parts.into_iter().flatten().filter(|p| !p.is_empty()).collect();
    if parts.len() <= 1 {
        return parts.pop().unwrap_or_default();
    }
    let mut all = Vec::with_capacity(parts.iter().map(Vec::len).sum());
    for part in parts {
        all.extend(part);
    }
    all
}

impl<T: Value> Dataset<T> {
    /// Runs the job and returns every record of its final dataset, part by
    /// part in order (so the output of `sort_by_key` comes out sorted). In
    /// streaming mode, after `reduce_by_key` this includes every update.
    /// Exactly once.
    pub fn collect(&self, mode: ExecutionMode) -> Result<Vec<T>, EngineError> {
        let (results, factory) = collect_sink(self.parts);
        self.run_factory(mode, factory)?;
        Ok(concat_parts(std::mem::take(&mut *lock(&results))))
    }

    /// [`Dataset::collect`] from async code (for example inside a tokio application).
    pub async fn collect_async(&self, mode: ExecutionMode) -> Result<Vec<T>, EngineError> {
        let (results, factory) = collect_sink(self.parts);
        self.start_factory(mode, factory)?.wait_async().await?;
        Ok(concat_parts(std::mem::take(&mut *lock(&results))))
    }
}

type LatestSlots<K, V> = Arc<Mutex<Vec<Option<HashMap<K, V>>>>>;

fn latest_sink<K: Key, V: Value>(parts: u32) -> (LatestSlots<K, V>, SinkFactory<(K, V)>) {
    let results: LatestSlots<K, V> = Arc::new(Mutex::new((0..parts).map(|_| None).collect()));
    let sink_results = results.clone();
    let factory: SinkFactory<(K, V)> = Arc::new(move |part, restored| {
        let latest = decode_state(restored)?.unwrap_or_default();
        Ok(Box::new(LatestPart { part, latest, results: sink_results.clone() }) as _)
    });
    (results, factory)
}

fn merge_latest<K: Key, V: Value>(results: &LatestSlots<K, V>) -> HashMap<K, V> {
    let parts = std::mem::take(&mut *lock(results));
    parts.into_iter().flatten().flatten().collect()
}

impl<K: Key, V: Value> Dataset<(K, V)> {
    /// Runs the job and returns, per key, the last value the job emitted for
    /// it: the final results of a keyed reduction in either mode. Exactly once.
    pub fn collect_latest(&self, mode: ExecutionMode) -> Result<HashMap<K, V>, EngineError> {
        let (results, factory) = latest_sink(self.parts);
        self.run_factory(mode, factory)?;
        Ok(merge_latest(&results))
    }

    /// [`Dataset::collect_latest`] from async code.
    pub async fn collect_latest_async(&self, mode: ExecutionMode) -> Result<HashMap<K, V>, EngineError> {
        let (results, factory) = latest_sink(self.parts);
        self.start_factory(mode, factory)?.wait_async().await?;
        Ok(merge_latest(&results))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::{PartSink, ReservoirSink, concat_parts};
    use crate::task::Event;

    /// Samples `records` numbers of part `part` fed in batches of `batch`, as big-endian keys.
    fn sample(part: u32, capacity: usize, records: u64, batch: u64) -> Vec<u64> {
        let results = Arc::new(Mutex::new(Vec::new()));
        let mut sink = ReservoirSink::new(part, capacity, results.clone(), |v: &u64, buf: &mut Vec<u8>| {
            buf.clear();
            buf.extend_from_slice(&v.to_be_bytes());
            Ok(())
        });
        let mut from = 0;
        while from < records {
            let to = (from + batch).min(records);
            sink.write((from..to).map(|value| Event { value, created_us: 0 }).collect()).unwrap();
            from = to;
        }
        Box::new(sink).finish().unwrap();
        let keys = std::mem::take(&mut *results.lock().unwrap());
        keys.iter().map(|k| u64::from_be_bytes(k.as_slice().try_into().unwrap())).collect()
    }

    #[test]
    fn a_reservoir_keeps_every_record_of_a_part_smaller_than_it() {
        let mut got = sample(3, 100, 60, 7);
        got.sort_unstable();
        assert_eq!(got, (0..60).collect::<Vec<_>>());
    }

    #[test]
    fn a_reservoir_sample_is_distinct_reproducible_and_even_across_the_input() {
        let (records, capacity) = (200_000u64, 100usize);
        let mut deciles = [0u32; 10];
        for part in 0..20 {
            let got = sample(part, capacity, records, 4096);
            assert_eq!(got.len(), capacity);
            let mut distinct = got.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), capacity, "part {part} sampled a record twice");
            // The batch size does not change which records a part samples.
            assert_eq!(got, sample(part, capacity, records, 1000), "part {part}");
            for v in got {
                deciles[(v * 10 / records) as usize] += 1;
            }
        }
        // 2,000 draws, 200 expected per decile; the seeds are fixed, so this is not flaky.
        assert!(deciles.iter().all(|&n| (150..=250).contains(&n)), "{deciles:?}");
    }

    #[test]
    fn parts_concatenate_in_order() {
        assert_eq!(concat_parts::<u8>(vec![]), Vec::<u8>::new());
        assert_eq!(concat_parts(vec![None, Some(vec![1]), Some(vec![])]), vec![1]);
        assert_eq!(concat_parts(vec![Some(vec![1, 2]), None, Some(vec![3]), Some(vec![4, 5])]), vec![1, 2, 3, 4, 5]);
    }
}
