//! The engine's extension points, used from outside the crate as a user
//! would: a source and a sink of the user's own (a partitioned append-only
//! log, and a store that makes output visible only when committed), bounded
//! and unbounded, in batch and streaming mode; and the async entry points
//! from inside a tokio application.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use engine_adapter::{
    Dataset, Engine, EngineError, ExecutionMode, Sink, SinkWriter, Source, SourceReader, workload::splitmix64,
};

/// The user's system: a log split into parts, each an append-only list of
/// lines; a reader's position is its offset in its part.
#[derive(Clone)]
struct Log {
    parts: Vec<Arc<Mutex<Vec<String>>>>,
    /// No more lines will be appended (ends an unbounded read).
    closed: Arc<AtomicBool>,
}

impl Log {
    fn new(parts: usize) -> Self {
        Self { parts: (0..parts).map(|_| Arc::default()).collect(), closed: Arc::default() }
    }

    /// Appends `lines` round-robin over the parts.
    fn append(&self, lines: impl IntoIterator<Item = String>) {
        for (i, line) in lines.into_iter().enumerate() {
            self.parts[i % self.parts.len()].lock().unwrap().push(line);
        }
    }
}

/// Reads a [`Log`]: to its current end (`bounded`), or until it is closed.
struct LogSource {
    log: Log,
    bounded: bool,
}

struct LogReader {
    lines: Arc<Mutex<Vec<String>>>,
    next: usize,
    closed: Arc<AtomicBool>,
    bounded: bool,
}

impl Source for LogSource {
    type Record = String;
    type Position = usize;
    type Reader = LogReader;

    fn parts(&self) -> u32 {
        self.log.parts.len() as u32
    }

    fn is_bounded(&self) -> bool {
        self.bounded
    }

    fn open(&self, part: u32, position: Option<usize>) -> Result<LogReader, EngineError> {
        Ok(LogReader {
            lines: self.log.parts[part as usize].clone(),
            next: position.unwrap_or(0),
            closed: self.log.closed.clone(),
            bounded: self.bounded,
        })
    }
}

impl SourceReader for LogReader {
    type Record = String;
    type Position = usize;

    async fn next_batch(&mut self) -> Result<Option<Vec<String>>, EngineError> {
        // Read whether the log was closed before reading it, so nothing appended before the close is missed.
        let closed = self.closed.load(Ordering::Acquire);
        let batch: Vec<String> = self.lines.lock().unwrap().iter().skip(self.next).take(100).cloned().collect();
        self.next += batch.len();
        if !batch.is_empty() {
            return Ok(Some(batch));
        }
        if self.bounded || closed {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok(Some(Vec::new()))
    }

    fn position(&self) -> usize {
        self.next
    }
}

/// The user's output system: what each part committed, keyed by
/// (part, checkpoint), so committing the same thing twice changes nothing.
type Committed = Arc<Mutex<BTreeMap<(u32, u64), Vec<(String, u64)>>>>;

struct StoreSink(Committed);

struct StoreWriter {
    part: u32,
    pending: Vec<(String, u64)>,
    /// Staged at a checkpoint's barrier, waiting for it to complete.
    staged: Vec<(u64, Vec<(String, u64)>)>,
    store: Committed,
}

impl StoreWriter {
    fn publish(&self, checkpoint: u64, records: Vec<(String, u64)>) {
        self.store.lock().unwrap().insert((self.part, checkpoint), records);
    }
}

impl Sink<(String, u64)> for StoreSink {
    type Writer = StoreWriter;

    fn open(&self, part: u32, restored: Option<Vec<(u64, Vec<(String, u64)>)>>) -> Result<StoreWriter, EngineError> {
        let writer = StoreWriter { part, pending: Vec::new(), staged: Vec::new(), store: self.0.clone() };
        // The restored checkpoint completed: what it staged is committed.
        for (checkpoint, records) in restored.unwrap_or_default() {
            writer.publish(checkpoint, records);
        }
        Ok(writer)
    }
}

impl SinkWriter<(String, u64)> for StoreWriter {
    type State = Vec<(u64, Vec<(String, u64)>)>;

    fn write(&mut self, records: Vec<(String, u64)>) -> Result<(), EngineError> {
        self.pending.extend(records);
        Ok(())
    }

    fn snapshot(&mut self, checkpoint: u64) -> Result<Self::State, EngineError> {
        self.staged.push((checkpoint, std::mem::take(&mut self.pending)));
        Ok(self.staged.clone())
    }

    fn commit(&mut self, checkpoint: u64) -> Result<(), EngineError> {
        let (due, later): (Vec<_>, Vec<_>) = self.staged.drain(..).partition(|(c, _)| *c <= checkpoint);
        self.staged = later;
        for (c, records) in due {
            self.publish(c, records);
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), EngineError> {
        self.commit(u64::MAX - 1)?;
        let pending = std::mem::take(&mut self.pending);
        self.publish(u64::MAX, pending);
        Ok(())
    }
}

/// The final count of each word in the store: the last update committed.
fn final_counts(store: &Committed) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    for records in store.lock().unwrap().values() {
        for (word, count) in records {
            counts.insert(word.clone(), *count);
        }
    }
    counts
}

fn lines(from: u64, to: u64) -> Vec<String> {
    (from..to).map(|i| format!("w{} w{} w{}", splitmix64(i) % 50, splitmix64(i + 1) % 50, i % 7)).collect()
}

fn reference(lines: &[String]) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    for word in lines.iter().flat_map(|l| l.split_whitespace()) {
        *counts.entry(word.to_string()).or_insert(0) += 1;
    }
    counts
}

fn word_count(input: Dataset<String>) -> Dataset<(String, u64)> {
    input
        .flat_map(|line: String| line.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .map(|w| (w, 1u64))
        .reduce_by_key(|a, b| a + b, 3)
}

#[test]
fn a_user_source_and_sink_run_a_bounded_job_in_both_modes() {
    let engine = Engine::embedded().unwrap();
    let log = Log::new(3);
    let input = lines(0, 5_000);
    log.append(input.clone());
    let job = word_count(engine.source(LogSource { log, bounded: true }));
    assert!(job.is_bounded());
    for mode in [ExecutionMode::Batch, ExecutionMode::Streaming] {
        let store: Committed = Arc::default();
        let report = job.run(mode, StoreSink(store.clone())).unwrap();
        assert_eq!(final_counts(&store), reference(&input), "{mode:?}");
        let source_stage = &report.metrics.stages[0];
        assert_eq!(source_stage.totals().records_in, 5_000, "{mode:?}: the source's records counted");
    }
}

#[test]
fn a_user_source_that_does_not_end_runs_in_streaming_mode_until_it_is_closed() {
    let engine = Engine::embedded().unwrap();
    let log = Log::new(2);
    let job = word_count(engine.source(LogSource { log: log.clone(), bounded: false }));
    assert!(!job.is_bounded());
    let err = job.run(ExecutionMode::Batch, StoreSink(Arc::default())).unwrap_err();
    assert!(matches!(err, EngineError::Plan(_)), "batch mode refuses an unbounded source: {err}");

    let store: Committed = Arc::default();
    let mut running = job.start(ExecutionMode::Streaming, StoreSink(store.clone())).unwrap();
    let mut all = Vec::new();
    for round in 0..5u64 {
        let more = lines(round * 1_000, (round + 1) * 1_000);
        log.append(more.clone());
        all.extend(more);
        std::thread::sleep(Duration::from_millis(50));
    }
    // The job's metrics are readable while it runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while running.metrics().stages[0].totals().records_in < 5_000 {
        assert!(std::time::Instant::now() < deadline, "the source never read the lines appended");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!running.is_finished(), "an unbounded job runs until its source ends");
    log.closed.store(true, Ordering::Release);
    let report = running.wait().unwrap();
    assert_eq!(final_counts(&store), reference(&all));
    assert_eq!(report.metrics.stages[0].totals().records_in, 5_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_runs_jobs_from_inside_a_tokio_runtime_through_the_async_api() {
    // Building and dropping an engine work from async code too.
    let engine = Engine::embedded().unwrap();
    let input = lines(0, 2_000);
    let job = word_count(engine.parallelize(input.clone(), 4));
    for mode in [ExecutionMode::Batch, ExecutionMode::Streaming] {
        let store: Committed = Arc::default();
        let report = job.run_async(mode, StoreSink(store.clone())).await.unwrap();
        assert_eq!(final_counts(&store), reference(&input), "{mode:?}");
        assert!(report.metrics.stages.iter().all(|s| s.totals().finished), "{mode:?}");
        assert_eq!(job.collect_latest_async(mode).await.unwrap(), reference(&input), "{mode:?}");
    }
    // Other tasks of the application keep running while a job does.
    let ticks = tokio::spawn(async {
        let mut n = 0u32;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(1)).await;
            n += 1;
        }
        n
    });
    let counted = job.collect_async(ExecutionMode::Batch).await.unwrap();
    assert_eq!(counted.len(), reference(&input).len());
    assert_eq!(ticks.await.unwrap(), 20);
    // The blocking calls say what to use instead rather than hang or panic.
    let err = job.collect(ExecutionMode::Batch).unwrap_err();
    assert!(matches!(err, EngineError::Runtime(_)), "{err}");
    drop(job);
    drop(engine);
}
