//! Sources: where a job's records come from, split into parts that map
//! tasks read in parallel.
//!
//! Bounded sources (a vector, a generator over `0..n`, text files split by
//! byte range) end; an unbounded source ([`RateSource`]) emits records at a
//! target rate until it is stopped, stamping each with its creation time.

use std::{
    io::{BufRead, BufReader, Seek, SeekFrom},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    Data, Dataset, Engine, EngineError,
    task::{BATCH_RECORDS, Batch, BoxFuture, Event, Input, OpenFn, TaskContext, VecInput, into_batches, now_us},
    workload::map_range,
};

/// Asks an unbounded source to end; clones share the signal.
#[derive(Clone, Debug, Default)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sources watching this handle end their streams after their current batch.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Acquire)
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

impl Engine {
    /// A bounded dataset of `items`, split into `parts` contiguous parts.
    pub fn parallelize<T: Data>(&self, items: Vec<T>, parts: u32) -> Dataset<T> {
        let parts = parts.max(1);
        let items = Arc::new(items);
        let open: OpenFn<T> = Arc::new(move |ctx: &TaskContext| {
            let range = map_range(items.len() as u64, parts, ctx.part);
            let created_us = now_us();
            let events: Vec<Event<T>> = items[range.start as usize..range.end as usize]
                .iter()
                .map(|value| Event { value: value.clone(), created_us })
                .collect();
            Ok(Box::new(VecInput { batches: into_batches(events).into_iter() }) as _)
        });
        Dataset::source(self.clone(), parts, true, open)
    }

    /// A bounded dataset of `f(i)` for `i` in `0..records`; part `m` of
    /// `parts` generates the contiguous range `[m*N/M, (m+1)*N/M)`.
    pub fn generate<T: Data>(
        &self,
        records: u64,
        parts: u32,
        f: impl Fn(u64) -> T + Send + Sync + 'static,
    ) -> Dataset<T> {
        let parts = parts.max(1);
        let f = Arc::new(f);
        let open: OpenFn<T> = Arc::new(move |ctx: &TaskContext| {
            Ok(Box::new(GeneratorInput { next: map_range(records, parts, ctx.part), f: f.clone() }) as _)
        });
        Dataset::source(self.clone(), parts, true, open)
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
        let parts = parts.max(1);
        let f = Arc::new(f);
        let bounded = source.limit.is_some();
        let open: OpenFn<T> = Arc::new(move |ctx: &TaskContext| {
            let limit = source.limit.map(|n| map_range(n, parts, ctx.part).end - map_range(n, parts, ctx.part).start);
            Ok(Box::new(RateInput {
                part: u64::from(ctx.part),
                parts: u64::from(parts),
                emitted: 0,
                limit,
                rate: source.rate.map(|r| r / f64::from(parts)),
                stop: source.stop.clone(),
                started: None,
                f: f.clone(),
            }) as _)
        });
        Dataset::source(self.clone(), parts, bounded, open)
    }

    /// The lines of the text file `path` (without their line ends), split
    /// into `parts` byte ranges; a line belongs to the part its first byte
    /// is in, so every line is read once whatever the split.
    pub fn read_text(&self, path: impl AsRef<Path>, parts: u32) -> Dataset<String> {
        let parts = parts.max(1);
        let path: PathBuf = path.as_ref().to_path_buf();
        let open: OpenFn<String> = Arc::new(move |ctx: &TaskContext| {
            let len = std::fs::metadata(&path).map_err(|e| EngineError::io(&path, e))?.len();
            let range = map_range(len, parts, ctx.part);
            Ok(Box::new(TextInput::open(&path, range.start, range.end)?) as _)
        });
        Dataset::source(self.clone(), parts, true, open)
    }
}

struct GeneratorInput<T> {
    next: std::ops::Range<u64>,
    f: Arc<dyn Fn(u64) -> T + Send + Sync>,
}

impl<T: Send> Input<T> for GeneratorInput<T> {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Batch<T>>, EngineError>> {
        Box::pin(async move {
            if self.next.is_empty() {
                return Ok(None);
            }
            let created_us = now_us();
            let batch =
                self.next.by_ref().take(BATCH_RECORDS).map(|i| Event { value: (self.f)(i), created_us }).collect();
            Ok(Some(batch))
        })
    }
}

struct RateInput<T> {
    part: u64,
    parts: u64,
    emitted: u64,
    limit: Option<u64>,
    /// Records per second for this part.
    rate: Option<f64>,
    stop: StopHandle,
    started: Option<Instant>,
    f: Arc<dyn Fn(u64) -> T + Send + Sync>,
}

impl<T: Send> Input<T> for RateInput<T> {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Batch<T>>, EngineError>> {
        Box::pin(async move {
            let started = *self.started.get_or_insert_with(Instant::now);
            loop {
                let left = self.limit.map_or(u64::MAX, |l| l - self.emitted);
                if self.stop.is_stopped() || left == 0 {
                    return Ok(None);
                }
                let due = match self.rate {
                    None => BATCH_RECORDS as u64,
                    Some(rate) => {
                        let target = (started.elapsed().as_secs_f64() * rate) as u64;
                        if target <= self.emitted {
                            // Sleep until the next record is due (at least a timer tick).
                            let next = Duration::from_secs_f64((self.emitted + 1) as f64 / rate);
                            tokio::time::sleep(next.saturating_sub(started.elapsed()).max(Duration::from_millis(1)))
                                .await;
                            continue;
                        }
                        target - self.emitted
                    }
                };
                let n = due.min(left).min(BATCH_RECORDS as u64);
                let created_us = now_us();
                let batch = (self.emitted..self.emitted + n)
                    .map(|k| Event { value: (self.f)(self.part + k * self.parts), created_us })
                    .collect();
                self.emitted += n;
                return Ok(Some(batch));
            }
        })
    }
}

/// Lines of one byte range of a text file.
struct TextInput {
    reader: BufReader<std::fs::File>,
    path: PathBuf,
    /// Offset of the next line's first byte.
    position: u64,
    /// The range ends before this offset.
    end: u64,
}

impl TextInput {
    fn open(path: &Path, start: u64, end: u64) -> Result<Self, EngineError> {
        let io = |e| EngineError::io(path, e);
        let file = std::fs::File::open(path).map_err(io)?;
        let mut reader = BufReader::with_capacity(256 << 10, file);
        let mut position = start;
        if start > 0 {
            // The line that starts at `start` is ours only if the byte before
            // it ends a line; otherwise skip to the next line start.
            reader.seek(SeekFrom::Start(start - 1)).map_err(io)?;
            let mut skipped = Vec::new();
            position = start - 1 + reader.read_until(b'\n', &mut skipped).map_err(io)? as u64;
        }
        Ok(Self { reader, path: path.to_path_buf(), position, end })
    }
}

impl Input<String> for TextInput {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Batch<String>>, EngineError>> {
        Box::pin(async move {
            let created_us = now_us();
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
                    batch.push(Event { value: String::from_utf8_lossy(&line).into_owned(), created_us });
                }
                Ok::<_, EngineError>(())
            })?;
            Ok((!batch.is_empty()).then_some(batch))
        })
    }
}
