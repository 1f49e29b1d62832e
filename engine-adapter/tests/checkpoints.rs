//! Streaming checkpoints and recovery, over a real embedded shuffle server:
//! a task panics at a seeded moment, the job restarts from its last
//! complete checkpoint (sources rewind, exchanges are recreated, operator
//! and sink state come back), and the final result is exactly that of a run
//! without the fault — for a word count over one hybrid exchange, a job
//! over two, and `write_text`'s files.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use engine_adapter::{
    CheckpointOptions, CheckpointOutcome, Dataset, Engine, EngineOptions, ExecutionMode, JobMetrics, RateSource,
    workload::splitmix64,
};

/// Records per run: at `RATE` records/s a run lasts about two seconds, so
/// checkpoints every second complete before and after most faults.
const RECORDS: u64 = 40_000;
const RATE: f64 = 20_000.0;
const WORDS: u64 = 500;
const SEEDS: u64 = 20;

fn engine() -> Engine {
    let options = EngineOptions {
        checkpoints: Some(CheckpointOptions { max_restarts: 3, ..CheckpointOptions::every(Duration::from_secs(1)) }),
        ..EngineOptions::default()
    };
    Engine::builder().options(options).embedded().unwrap()
}

/// Panics once, in whichever task first counts past `after` records through it.
#[derive(Clone)]
struct Fault {
    seen: Arc<AtomicU64>,
    after: u64,
    fired: Arc<AtomicBool>,
}

impl Fault {
    fn new(after: u64) -> Self {
        Self { seen: Arc::default(), after, fired: Arc::default() }
    }

    /// Never fires.
    fn none() -> Self {
        Self::new(u64::MAX)
    }

    fn check(&self) {
        if self.seen.fetch_add(1, Ordering::Relaxed) == self.after && !self.fired.swap(true, Ordering::SeqCst) {
            panic!("injected fault after {} records", self.after);
        }
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

fn word(i: u64) -> u64 {
    splitmix64(i ^ 0x5eed) % WORDS
}

fn paced(engine: &Engine) -> Dataset<u64> {
    engine.generate_at_rate(RateSource { rate: Some(RATE), limit: Some(RECORDS), ..RateSource::default() }, 2, |i| i)
}

/// The word counts a faultless run gives.
fn reference() -> HashMap<u64, u64> {
    let mut counts = HashMap::new();
    for i in 0..RECORDS {
        *counts.entry(word(i)).or_insert(0) += 1;
    }
    counts
}

/// Where a seed's fault goes: before the exchange (in a source task) or
/// after it (in a result task), and after how many records.
fn placement(seed: u64) -> (bool, u64) {
    let r = splitmix64(seed);
    (r.is_multiple_of(2), 1_000 + (r >> 8) % (RECORDS - 4_000))
}

/// Word count over one hybrid exchange, with `before` / `after` faults around it.
fn word_count(engine: &Engine, before: Fault, after: Fault) -> Dataset<(u64, u64)> {
    paced(engine)
        .map(move |i| {
            before.check();
            (word(i), 1u64)
        })
        .reduce_by_key(|a, b| a + b, 3)
        .map(move |kv| {
            after.check();
            kv
        })
}

/// Runs `job` in streaming mode with checkpoints: its final values, and the job's metrics.
fn run_latest(job: &Dataset<(u64, u64)>) -> (HashMap<u64, u64>, JobMetrics) {
    let latest = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let sink_latest = latest.clone();
    let mut running = job
        .start(ExecutionMode::Streaming, LatestSink(sink_latest))
        .unwrap_or_else(|e| panic!("starting the job: {e}"));
    let report = running.wait().unwrap_or_else(|e| panic!("the job failed: {e}"));
    let latest = std::mem::take(&mut *latest.lock().unwrap());
    (latest, report.metrics)
}

/// The last value of each key, committed with the checkpoints: a user sink
/// with the same contract as `collect_latest`, so the test sees the metrics.
struct LatestSink(Arc<std::sync::Mutex<HashMap<u64, u64>>>);

struct LatestWriter {
    latest: BTreeMap<u64, u64>,
    out: Arc<std::sync::Mutex<HashMap<u64, u64>>>,
}

impl engine_adapter::Sink<(u64, u64)> for LatestSink {
    type Writer = LatestWriter;

    fn open(
        &self,
        _part: u32,
        restored: Option<BTreeMap<u64, u64>>,
    ) -> Result<LatestWriter, engine_adapter::EngineError> {
        Ok(LatestWriter { latest: restored.unwrap_or_default(), out: self.0.clone() })
    }
}

impl engine_adapter::SinkWriter<(u64, u64)> for LatestWriter {
    type State = BTreeMap<u64, u64>;

    fn write(&mut self, records: Vec<(u64, u64)>) -> Result<(), engine_adapter::EngineError> {
        self.latest.extend(records);
        Ok(())
    }

    fn snapshot(&mut self, _checkpoint: u64) -> Result<Self::State, engine_adapter::EngineError> {
        Ok(self.latest.clone())
    }

    fn finish(self) -> Result<(), engine_adapter::EngineError> {
        let mut out = self.out.lock().unwrap();
        for (k, v) in self.latest {
            assert!(out.insert(k, v).is_none(), "key {k} in two parts");
        }
        Ok(())
    }
}

fn check_recovered(seed: u64, metrics: &JobMetrics, fault: &Fault) {
    assert!(fault.fired(), "seed {seed}: the fault never fired");
    assert_eq!(metrics.restarts.len(), 1, "seed {seed}: one restart, got {:?}", metrics.restarts);
    assert!(metrics.restarts[0].cause.contains("injected fault"), "seed {seed}: {:?}", metrics.restarts[0]);
    let restart = &metrics.restarts[0];
    eprintln!(
        "seed {seed}: recovered in {:.1} ms from {}",
        restart.restore_duration.as_secs_f64() * 1e3,
        restart.restored_checkpoint.map_or("the beginning".into(), |n| format!("checkpoint {n}"))
    );
}

#[test]
fn a_streaming_word_count_that_loses_a_task_at_a_seeded_moment_ends_with_the_faultless_counts() {
    let engine = engine();
    let expected = reference();
    let (faultless, metrics) = run_latest(&word_count(&engine, Fault::none(), Fault::none()));
    assert_eq!(faultless, expected, "the faultless run");
    assert!(metrics.restarts.is_empty());
    assert!(metrics.completed_checkpoints().count() >= 1, "checkpoints: {:?}", metrics.checkpoints);
    let mut from_checkpoint = 0;
    for seed in 0..SEEDS {
        let (in_source, after) = placement(seed);
        eprintln!("seed {seed}: a fault {} after {after} records", if in_source { "before" } else { "after" });
        let fault = Fault::new(after);
        let (before, behind) = if in_source { (fault.clone(), Fault::none()) } else { (Fault::none(), fault.clone()) };
        let (counts, metrics) = run_latest(&word_count(&engine, before, behind));
        check_recovered(seed, &metrics, &fault);
        assert!(counts == expected, "seed {seed}: the counts differ from the faultless run");
        assert_eq!(counts.values().sum::<u64>(), RECORDS, "seed {seed}");
        from_checkpoint += usize::from(metrics.restarts[0].restored_checkpoint.is_some());
    }
    assert!(from_checkpoint >= SEEDS as usize / 4, "only {from_checkpoint} of {SEEDS} restarts found a checkpoint");
}

#[test]
fn a_streaming_job_over_two_hybrid_exchanges_recovers_exactly() {
    let engine = engine();
    let expected = reference();
    for seed in 100..106 {
        let (_, after) = placement(seed);
        let stage = seed % 3; // before the first exchange, between the two, after the second
        eprintln!("seed {seed}: a fault in stage {stage} after {after} records");
        let faults: Vec<Fault> = (0..3).map(|s| if s == stage { Fault::new(after) } else { Fault::none() }).collect();
        let (f0, f1, f2) = (faults[0].clone(), faults[1].clone(), faults[2].clone());
        let job = paced(&engine)
            .map(move |i| {
                f0.check();
                (word(i), 1u64)
            })
            .partition_by_key(4)
            .map(move |kv| {
                f1.check();
                kv
            })
            .reduce_by_key(|a, b| a + b, 3)
            .map(move |kv| {
                f2.check();
                kv
            });
        let (counts, metrics) = run_latest(&job);
        check_recovered(seed, &metrics, &faults[stage as usize]);
        assert!(counts == expected, "seed {seed}: the counts differ from the faultless run");
        assert_eq!(metrics.stages.len(), 3, "two exchange stages and the result");
    }
}

#[test]
fn write_text_in_a_streaming_job_that_restarts_writes_every_line_exactly_once() {
    let engine = engine();
    for seed in 200..203 {
        let dir = tempfile::tempdir().unwrap();
        let (_, after) = placement(seed);
        eprintln!("seed {seed}: a fault after {after} records");
        let fault = Fault::new(after);
        let f = fault.clone();
        let job = paced(&engine)
            .map(move |i| {
                f.check();
                (i, word(i))
            })
            .partition_by_key(3)
            .map(|(i, w)| format!("{i} {w}"));
        job.write_text(ExecutionMode::Streaming, dir.path()).unwrap();
        assert!(fault.fired(), "seed {seed}: the fault never fired");
        let mut seen = vec![0u8; RECORDS as usize];
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(name.starts_with("part-"), "seed {seed}: {name} left behind");
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                let i: usize = line.split(' ').next().unwrap().parse().unwrap();
                seen[i] += 1;
            }
        }
        let wrong: Vec<usize> = (0..seen.len()).filter(|&i| seen[i] != 1).take(5).collect();
        assert!(wrong.is_empty(), "seed {seed}: lines not written exactly once, e.g. {wrong:?}");
    }
}

#[test]
fn checkpoints_report_their_duration_and_size_while_the_job_runs_and_the_state_is_removed_at_the_end() {
    let state = tempfile::tempdir().unwrap();
    let options = EngineOptions {
        checkpoints: Some(CheckpointOptions::every(Duration::from_millis(300))),
        ..EngineOptions::default()
    };
    let engine = Engine::builder()
        .options(options)
        .state_backend(engine_adapter::LocalStateBackend::new(state.path()).unwrap())
        .embedded()
        .unwrap();
    let latest = Arc::new(std::sync::Mutex::new(HashMap::new()));
    let job = word_count(&engine, Fault::none(), Fault::none());
    let mut running = job.start(ExecutionMode::Streaming, LatestSink(latest.clone())).unwrap();
    // Checkpoints show in the metrics while the job runs.
    while running.metrics().completed_checkpoints().count() == 0 {
        assert!(!running.is_finished(), "the job ended before a checkpoint completed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let live = running.metrics();
    assert!(live.stages[0].totals().records_in < RECORDS, "seen while the source still ran");
    let metrics = running.wait().unwrap().metrics;
    assert_eq!(*latest.lock().unwrap(), reference());
    let completed: Vec<_> = metrics.completed_checkpoints().collect();
    assert!(completed.len() >= 3, "checkpoints: {:?}", metrics.checkpoints);
    for c in &completed {
        assert!(c.bytes > 0 && c.duration > Duration::ZERO, "{c:?}");
        assert_eq!(c.outcome, CheckpointOutcome::Completed);
    }
    assert_eq!(std::fs::read_dir(state.path()).unwrap().count(), 0, "the job's checkpoints are removed when it ends");
}

#[test]
fn collect_latest_in_a_streaming_job_that_restarts_returns_the_faultless_counts() {
    let engine = engine();
    let expected = reference();
    for seed in 300..303 {
        let (in_source, after) = placement(seed);
        eprintln!("seed {seed}: a fault {} after {after} records", if in_source { "before" } else { "after" });
        let fault = Fault::new(after);
        let (before, behind) = if in_source { (fault.clone(), Fault::none()) } else { (Fault::none(), fault.clone()) };
        let counts = word_count(&engine, before, behind).collect_latest(ExecutionMode::Streaming).unwrap();
        assert!(fault.fired(), "seed {seed}: the fault never fired");
        assert!(counts == expected, "seed {seed}: the counts differ from the faultless run");
    }
}
