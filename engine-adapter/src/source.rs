//! Sources: where a job's records come from, split into parts that map
//! tasks read in parallel.
//!
//! [`Source`] and [`SourceReader`] are public: a user reads from their own
//! system by implementing them and passing the source to
//! [`Engine::source`]. The built-in sources are implemented the same way:
//! a vector ([`Engine::parallelize`]), a generator over `0..n`
//! ([`Engine::generate`]), text files split by byte range
//! ([`Engine::read_text`]), and a paced, possibly unbounded generator
//! ([`Engine::generate_at_rate`]).
//!
//! A reader reports its **position** (after the last batch it returned);
//! in a streaming job with checkpoints the position is part of every
//! checkpoint, and after a failure the part is reopened at the position of
//! the last complete checkpoint, so it must yield the same records from
//! there again (a file offset, a log sequence number, a Kafka offset). The
//! engine stamps each record with the time its batch arrived, and between
//! two calls of [`SourceReader::next_batch`] sends checkpoint barriers.

use std::{
    collections::HashMap,
    future::Future,
    io::{BufRead, BufReader, Seek, SeekFrom},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Serialize, de::DeserializeOwned};

use crate::{
    Data, Dataset, Engine, EngineError,
    checkpoint::TaskCheckpointing,
    metrics::TaskStats,
    state::Snapshot,
    task::{BATCH_RECORDS, BoxFuture, Event, Input, Item, OpenFn, TaskContext, now_us},
    workload::map_range,
};

/// A source of records, split into parts read in parallel.
pub trait Source: Send + Sync + 'static {
    /// The records it yields.
    type Record: Data;
    /// Where a part's reader is, to reopen it there after a failure.
    type Position: Serialize + DeserializeOwned + Send + 'static;
    /// Reads one part.
    type Reader: SourceReader<Record = Self::Record, Position = Self::Position>;

    /// The number of parts (map tasks reading the source).
    fn parts(&self) -> u32;

    /// Whether every part ends. Unbounded sources run in streaming jobs only.
    fn is_bounded(&self) -> bool;

    /// Opens part `part` (`0..parts()`), at `position` if the job restarts
    /// from a checkpoint, at its beginning if `None`.
    fn open(&self, part: u32, position: Option<Self::Position>) -> Result<Self::Reader, EngineError>;
}

/// Reads one part of a [`Source`].
pub trait SourceReader: Send + 'static {
    type Record;
    type Position;

    /// The next records. `Ok(None)`: the part has ended (bounded sources).
    /// An unbounded part with nothing to give should wait a little (a few
    /// milliseconds) and return an empty batch rather than wait long: the
    /// engine sends checkpoint barriers between calls.
    fn next_batch(&mut self) -> impl Future<Output = Result<Option<Vec<Self::Record>>, EngineError>> + Send;

    /// The position after the last record returned.
    fn position(&self) -> Self::Position;
}

/// The input of a task reading one part of a source: stamps records,
/// counts them, and sends barriers between batches.
struct SourceInput<R> {
    reader: R,
    op: u64,
    checkpoints: Option<Arc<TaskCheckpointing>>,
    /// The last checkpoint whose barrier this part sent.
    last_barrier: u64,
    stats: Arc<TaskStats>,
}

impl<R: SourceReader> Input<R::Record> for SourceInput<R>
where
    R::Record: Send,
    R::Position: Serialize,
{
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Item<R::Record>>, EngineError>> {
        Box::pin(async move {
            loop {
                if let Some(id) = self.checkpoints.as_ref().and_then(|c| c.triggered_after(self.last_barrier)) {
                    self.last_barrier = id;
                    return Ok(Some(Item::Barrier(id)));
                }
                match self.reader.next_batch().await? {
                    None => return Ok(None),
                    Some(batch) if batch.is_empty() => tokio::task::yield_now().await,
                    Some(batch) => {
                        self.stats.add_in(batch.len(), 0);
                        let created_us = now_us();
                        return Ok(Some(Item::Batch(
                            batch.into_iter().map(|value| Event { value, created_us }).collect(),
                        )));
                    }
                }
            }
        })
    }

    fn snapshot(&mut self, snapshot: &mut Snapshot) -> Result<(), EngineError> {
        snapshot.put(self.op, &self.reader.position())
    }
}

impl Engine {
    /// A dataset read from `source`: one map task per part.
    pub fn source<S: Source>(&self, source: S) -> Dataset<S::Record> {
        let parts = source.parts().max(1);
        let bounded = source.is_bounded();
        let op = self.next_id();
        let source = Arc::new(source);
        let open: OpenFn<S::Record> = Arc::new(move |ctx: &TaskContext| {
            let position = ctx.restored::<S::Position>(op)?;
            let reader = source.open(ctx.part, position)?;
            let last_barrier = ctx.checkpoints.as_ref().map_or(0, |c| *c.trigger.borrow());
            Ok(Box::new(SourceInput {
                reader,
                op,
                checkpoints: ctx.checkpoints.clone(),
                last_barrier,
                stats: ctx.stats.clone(),
            }) as _)
        });
        Dataset::source(self.clone(), parts, bounded, open)
    }

    /// A bounded dataset of `items`, split into `parts` contiguous parts.
    pub fn parallelize<T: Data>(&self, items: Vec<T>, parts: u32) -> Dataset<T> {
        self.source(VecSource { items: Arc::new(items), parts: parts.max(1) })
    }

    /// A bounded dataset of `f(i)` for `i` in `0..records`; part `m` of
    /// `parts` generates the contiguous range `[m*N/M, (m+1)*N/M)`.
    pub fn generate<T: Data>(
        &self,
        records: u64,
        parts: u32,
        f: impl Fn(u64) -> T + Send + Sync + 'static,
    ) -> Dataset<T> {
        self.source(Generator { records, parts: parts.max(1), f: Arc::new(f) })
    }

    /// A dataset of `f(i)` paced and ended as `source` says. Part `m` of
    /// `parts` emits `i = m, m + parts, m + 2*parts, ...`; each record is
    /// stamped with the time it was generated. Without a `limit` the dataset
    /// is unbounded: only a streaming job can run it, and it ends when
    /// `source.stop` is signalled.
    pub fn generate_at_rate<T: Data>(
        &self,
        source: RateSource,
        parts: u32,
        f: impl Fn(u64) -> T + Send + Sync + 'static,
    ) -> Dataset<T> {
        self.source(RateGenerator { source, parts: parts.max(1), f: Arc::new(f) })
    }

    /// The lines of the text file `path` (without their line ends), split
    /// into `parts` byte ranges; a line belongs to the part its first byte
    /// is in, so every line is read once whatever the split.
    pub fn read_text(&self, path: impl AsRef<Path>, parts: u32) -> Dataset<String> {
        self.source(TextSource { path: path.as_ref().to_path_buf(), parts: parts.max(1) })
    }
}

/// The records of a vector, in contiguous parts.
struct VecSource<T> {
    items: Arc<Vec<T>>,
    parts: u32,
}

impl<T: Data> Source for VecSource<T> {
    type Record = T;
    type Position = u64;
    type Reader = VecReader<T>;

    fn parts(&self) -> u32 {
        self.parts
    }

    fn is_bounded(&self) -> bool {
        true
    }

    fn open(&self, part: u32, position: Option<u64>) -> Result<VecReader<T>, EngineError> {
        let range = map_range(self.items.len() as u64, self.parts, part);
        let next = range.start + position.unwrap_or(0).min(range.end - range.start);
        Ok(VecReader { items: self.items.clone(), start: range.start, next, end: range.end })
    }
}

struct VecReader<T> {
    items: Arc<Vec<T>>,
    start: u64,
    next: u64,
    end: u64,
}

impl<T: Data> SourceReader for VecReader<T> {
    type Record = T;
    type Position = u64;

    async fn next_batch(&mut self) -> Result<Option<Vec<T>>, EngineError> {
        if self.next == self.end {
            return Ok(None);
        }
        let to = self.end.min(self.next + BATCH_RECORDS as u64);
        let batch = self.items[self.next as usize..to as usize].to_vec();
        self.next = to;
        Ok(Some(batch))
    }

    fn position(&self) -> u64 {
        self.next - self.start
    }
}

/// `f(i)` for `i` in `0..records`.
struct Generator<T> {
    records: u64,
    parts: u32,
    f: Arc<dyn Fn(u64) -> T + Send + Sync>,
}

impl<T: Data> Source for Generator<T> {
    type Record = T;
    type Position = u64;
    type Reader = GeneratorReader<T>;

    fn parts(&self) -> u32 {
        self.parts
    }

    fn is_bounded(&self) -> bool {
        true
    }

    fn open(&self, part: u32, position: Option<u64>) -> Result<GeneratorReader<T>, EngineError> {
        let range = map_range(self.records, self.parts, part);
        let start = position.map_or(range.start, |p| p.clamp(range.start, range.end));
        Ok(GeneratorReader { next: start..range.end, f: self.f.clone() })
    }
}

struct GeneratorReader<T> {
    next: std::ops::Range<u64>,
    f: Arc<dyn Fn(u64) -> T + Send + Sync>,
}

impl<T: Data> SourceReader for GeneratorReader<T> {
    type Record = T;
    type Position = u64;

    async fn next_batch(&mut self) -> Result<Option<Vec<T>>, EngineError> {
        if self.next.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.next.by_ref().take(BATCH_RECORDS).map(|i| (self.f)(i)).collect()))
    }

    fn position(&self) -> u64 {
        self.next.start
    }
}

/// Asks an unbounded source to end; clones share the signal. Each part
/// that sees it records where it stopped, so that a streaming job that
/// restarts from a checkpoint after the stop replays its parts exactly up
/// to there: use one handle per run of a job.
#[derive(Clone, Debug, Default)]
pub struct StopHandle(Arc<StopState>);

#[derive(Debug, Default)]
struct StopState {
    stopped: AtomicBool,
    /// Per part, the position at which it saw the stop.
    ends: Mutex<HashMap<u32, u64>>,
}

impl StopHandle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sources watching this handle end their streams after their current batch.
    pub fn stop(&self) {
        self.0.stopped.store(true, Ordering::Release);
    }

    pub fn is_stopped(&self) -> bool {
        self.0.stopped.load(Ordering::Acquire)
    }

    fn ends(&self) -> std::sync::MutexGuard<'_, HashMap<u32, u64>> {
        self.0.ends.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where part `part` ends: where it first saw the stop, if it did.
    fn end_of(&self, part: u32, position: u64) -> Option<u64> {
        if let Some(end) = self.ends().get(&part) {
            return Some(*end);
        }
        if self.is_stopped() {
            return Some(*self.ends().entry(part).or_insert(position));
        }
        None
    }
}

/// An unbounded (or long) generator: record `i` is `f(i)`, emitted at
/// `rate` records per second in total (as fast as downstream takes them when
/// `rate` is `None`), until `stop` is signalled or `limit` records were emitted.
#[derive(Clone, Debug, Default)]
pub struct RateSource {
    /// Records per second across all parts; `None`: no pacing.
    pub rate: Option<f64>,
    /// Total records to emit; `None`: until stopped (an unbounded source).
    pub limit: Option<u64>,
    /// Ends the source early.
    pub stop: StopHandle,
}

/// Longest a paced part sleeps in one call, so barriers are never held up by pacing.
const MAX_PACING_SLEEP: Duration = Duration::from_millis(5);

struct RateGenerator<T> {
    source: RateSource,
    parts: u32,
    f: Arc<dyn Fn(u64) -> T + Send + Sync>,
}

impl<T: Data> Source for RateGenerator<T> {
    type Record = T;
    type Position = u64;
    type Reader = RateReader<T>;

    fn parts(&self) -> u32 {
        self.parts
    }

    fn is_bounded(&self) -> bool {
        self.source.limit.is_some()
    }

    fn open(&self, part: u32, position: Option<u64>) -> Result<RateReader<T>, EngineError> {
        let limit = self.source.limit.map(|n| {
            let range = map_range(n, self.parts, part);
            range.end - range.start
        });
        let emitted = position.unwrap_or(0);
        Ok(RateReader {
            part,
            parts: u64::from(self.parts),
            emitted,
            resumed_at: emitted,
            limit,
            rate: self.source.rate.map(|r| r / f64::from(self.parts)),
            stop: self.source.stop.clone(),
            started: None,
            f: self.f.clone(),
        })
    }
}

struct RateReader<T> {
    part: u32,
    parts: u64,
    emitted: u64,
    /// `emitted` when this reader opened: pacing counts from there.
    resumed_at: u64,
    limit: Option<u64>,
    /// Records per second for this part.
    rate: Option<f64>,
    stop: StopHandle,
    started: Option<Instant>,
    f: Arc<dyn Fn(u64) -> T + Send + Sync>,
}

impl<T: Data> SourceReader for RateReader<T> {
    type Record = T;
    type Position = u64;

    async fn next_batch(&mut self) -> Result<Option<Vec<T>>, EngineError> {
        let started = *self.started.get_or_insert_with(Instant::now);
        let end = self.limit.into_iter().chain(self.stop.end_of(self.part, self.emitted)).min();
        let left = end.map_or(u64::MAX, |end| end.saturating_sub(self.emitted));
        if left == 0 {
            return Ok(None);
        }
        let due = match self.rate {
            None => BATCH_RECORDS as u64,
            Some(rate) => {
                let paced = self.emitted - self.resumed_at;
                let target = (started.elapsed().as_secs_f64() * rate) as u64;
                if target <= paced {
                    // Sleep until the next record is due (at least a timer tick, at most a few ms).
                    let next = Duration::from_secs_f64((paced + 1) as f64 / rate);
                    let sleep =
                        next.saturating_sub(started.elapsed()).clamp(Duration::from_millis(1), MAX_PACING_SLEEP);
                    tokio::time::sleep(sleep).await;
                    return Ok(Some(Vec::new()));
                }
                target - paced
            }
        };
        let n = due.min(left).min(BATCH_RECORDS as u64);
        let batch = (self.emitted..self.emitted + n).map(|k| (self.f)(u64::from(self.part) + k * self.parts)).collect();
        self.emitted += n;
        Ok(Some(batch))
    }

    fn position(&self) -> u64 {
        self.emitted
    }
}

/// The lines of a text file, split into byte ranges.
struct TextSource {
    path: PathBuf,
    parts: u32,
}

impl Source for TextSource {
    type Record = String;
    /// The offset of the next line's first byte.
    type Position = u64;
    type Reader = TextReader;

    fn parts(&self) -> u32 {
        self.parts
    }

    fn is_bounded(&self) -> bool {
        true
    }

    fn open(&self, part: u32, position: Option<u64>) -> Result<TextReader, EngineError> {
        let len = std::fs::metadata(&self.path).map_err(|e| EngineError::io(&self.path, e))?.len();
        let range = map_range(len, self.parts, part);
        TextReader::open(&self.path, position.unwrap_or(range.start), range.end, position.is_some())
    }
}

/// Lines of one byte range of a text file.
struct TextReader {
    reader: BufReader<std::fs::File>,
    path: PathBuf,
    /// Offset of the next line's first byte.
    position: u64,
    /// The range ends before this offset.
    end: u64,
}

impl TextReader {
    /// Opens the range `start..end`; `at_line` says `start` is a line's first byte (a restored position).
    fn open(path: &Path, start: u64, end: u64, at_line: bool) -> Result<Self, EngineError> {
        let io = |e| EngineError::io(path, e);
        let file = std::fs::File::open(path).map_err(io)?;
        let mut reader = BufReader::with_capacity(256 << 10, file);
        let mut position = start;
        if at_line {
            reader.seek(SeekFrom::Start(start)).map_err(io)?;
        } else if start > 0 {
            // The line that starts at `start` is ours only if the byte before
            // it ends a line; otherwise skip to the next line start.
            reader.seek(SeekFrom::Start(start - 1)).map_err(io)?;
            let mut skipped = Vec::new();
            position = start - 1 + reader.read_until(b'\n', &mut skipped).map_err(io)? as u64;
        }
        Ok(Self { reader, path: path.to_path_buf(), position, end })
    }
}

impl SourceReader for TextReader {
    type Record = String;
    type Position = u64;

    async fn next_batch(&mut self) -> Result<Option<Vec<String>>, EngineError> {
        let mut batch = Vec::new();
        let mut line = Vec::new();
        tokio::task::block_in_place(|| {
            while batch.len() < BATCH_RECORDS && self.position < self.end {
                line.clear();
                let n = self.reader.read_until(b'\n', &mut line).map_err(|e| EngineError::io(&self.path, e))?;
                if n == 0 {
                    break;
                }
                self.position += n as u64;
                while matches!(line.last(), Some(b'\n' | b'\r')) {
                    line.pop();
                }
                batch.push(String::from_utf8_lossy(&line).into_owned());
            }
            Ok::<_, EngineError>(())
        })?;
        Ok((!batch.is_empty()).then_some(batch))
    }

    fn position(&self) -> u64 {
        self.position
    }
}
