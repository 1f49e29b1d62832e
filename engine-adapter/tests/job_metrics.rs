//! A job's metrics per stage and task: records and bytes in and out, spill
//! bytes, attempts and time, as the caller gets them after a batch run.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use engine_adapter::{EngineError, EngineOptions, ExecutionMode, Sink, SinkWriter};

/// Counts the records the job delivers.
struct CountSink(Arc<AtomicU64>);

struct CountWriter(Arc<AtomicU64>, u64);

impl<T: Send + 'static> Sink<T> for CountSink {
    type Writer = CountWriter;

    fn open(&self, _part: u32, _restored: Option<()>) -> Result<CountWriter, EngineError> {
        Ok(CountWriter(self.0.clone(), 0))
    }
}

impl<T: Send + 'static> SinkWriter<T> for CountWriter {
    type State = ();

    fn write(&mut self, records: Vec<T>) -> Result<(), EngineError> {
        self.1 += records.len() as u64;
        Ok(())
    }

    fn snapshot(&mut self, _checkpoint: u64) -> Result<(), EngineError> {
        Ok(())
    }

    fn finish(self) -> Result<(), EngineError> {
        self.0.fetch_add(self.1, Ordering::Relaxed);
        Ok(())
    }
}

#[test]
fn a_batch_job_reports_records_bytes_spills_attempts_and_time_per_stage_and_task() {
    const RECORDS: u64 = 200_000;
    const KEYS: u64 = 1_000;
    let options = EngineOptions { memory: 2 << 20, ..EngineOptions::default() };
    let engine = engine_adapter::Engine::builder().options(options).embedded().unwrap();
    let fired = Arc::new(AtomicBool::new(false));
    let fault = fired.clone();
    let job = engine
        .generate(RECORDS, 4, move |i| {
            // Map task 0's first attempt fails midway.
            if i == 1_000 && !fault.swap(true, Ordering::SeqCst) {
                panic!("injected failure at record {i}");
            }
            (i % KEYS, format!("{i:030}"))
        })
        .group_by_key(3);
    let delivered = Arc::new(AtomicU64::new(0));
    let report = job.run(ExecutionMode::Batch, CountSink(delivered.clone())).unwrap();
    assert_eq!(delivered.load(Ordering::Relaxed), KEYS);
    let m = &report.metrics;
    assert_eq!(m.mode, ExecutionMode::Batch);
    assert_eq!(m.stages.len(), 2, "{:?}", m.stages.iter().map(|s| &s.name).collect::<Vec<_>>());

    let maps = m.stage("group_by_key").expect("the exchange stage is named after its operator");
    assert_eq!(maps.tasks.len(), 4);
    for task in &maps.tasks {
        let attempts = if task.part == 0 { 2 } else { 1 };
        assert_eq!(task.attempts, attempts, "map {}", task.part);
        assert!(task.finished && task.elapsed > std::time::Duration::ZERO, "{task:?}");
        let part = RECORDS / 4;
        if task.part == 0 {
            // Both attempts count (the failed one, in its first batch, had read none yet).
            assert!(task.records_in >= part && task.records_out >= part, "{task:?}");
        } else {
            assert_eq!((task.records_in, task.records_out), (part, part), "{task:?}");
        }
        assert!(task.bytes_out >= task.records_out * 32, "{task:?}");
    }

    let result = m.stage("result").unwrap();
    let totals = result.totals();
    assert_eq!(result.tasks.len(), 3);
    assert_eq!(totals.records_in, RECORDS, "the reducers read exactly the committed records");
    // Framed as they cross the exchange: at least the committed records' bytes.
    let committed_out: u64 = maps.tasks[1..].iter().map(|t| t.bytes_out).sum();
    assert!(totals.bytes_in > committed_out, "{} bytes read, {committed_out} written", totals.bytes_in);
    assert_eq!(totals.records_out, KEYS, "one group per key");
    assert!(totals.spilled_bytes > 0 && m.spilled_bytes() == totals.spilled_bytes, "{totals:?}");
    assert!(m.memory_peak <= m.memory_budget && m.memory_budget == 2 << 20);
    assert!(m.elapsed >= totals.elapsed);
}
