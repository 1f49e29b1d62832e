//! Whole jobs on the engine: retries, word count in both modes, text
//! sources and sinks, invalid jobs, clean-up, and streaming behaviour.

use std::{
    collections::HashMap,
    io::Write,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use engine_adapter::{
    Dataset, Engine, EngineError, EngineOptions, ExecutionMode, RateSource, StopHandle, workload::splitmix64,
};

fn word_counts(lines: Dataset<String>) -> Dataset<(String, u64)> {
    lines
        .flat_map(|line: String| line.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .map(|word| (word, 1u64))
        .reduce_by_key(|a, b| a + b, 6)
}

fn text_file(lines: u64) -> (tempfile::NamedTempFile, Vec<String>) {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let mut all = Vec::new();
    for i in 0..lines {
        let words = (0..(splitmix64(i) % 7)).map(|w| format!("w{}", splitmix64(i ^ w) % 50)).collect::<Vec<_>>();
        let line = words.join(" ");
        writeln!(file, "{line}").unwrap();
        all.push(line);
    }
    file.flush().unwrap();
    (file, all)
}

#[test]
fn the_same_word_count_job_gives_identical_counts_in_both_modes() {
    let (file, lines) = text_file(20_000);
    let mut expected: HashMap<String, u64> = HashMap::new();
    for word in lines.iter().flat_map(|l| l.split_whitespace()) {
        *expected.entry(word.to_string()).or_default() += 1;
    }
    let engine = Engine::embedded().unwrap();
    let job = word_counts(engine.read_text(file.path(), 3));
    let batch = job.collect_latest(ExecutionMode::Batch).unwrap();
    let streaming = job.collect_latest(ExecutionMode::Streaming).unwrap();
    assert_eq!(batch, expected);
    assert_eq!(streaming, batch);
}

#[test]
fn a_text_file_split_into_any_number_of_parts_yields_every_line_once() {
    let (file, lines) = text_file(3_000);
    let engine = Engine::embedded().unwrap();
    for parts in [1, 2, 3, 7, 64] {
        let got = engine.read_text(file.path(), parts).collect(ExecutionMode::Batch).unwrap();
        assert_eq!(got, lines, "{parts} parts");
    }
    let missing = engine.read_text("/nonexistent/input.txt", 2).collect(ExecutionMode::Batch).unwrap_err();
    assert!(missing.to_string().contains("/nonexistent/input.txt"), "{missing}");
}

#[test]
fn write_text_writes_one_complete_file_per_part() {
    let engine = Engine::embedded().unwrap();
    let out = tempfile::tempdir().unwrap();
    engine
        .generate(1_000, 2, |i| i * 3)
        .map(|i| (i % 10, i))
        .partition_by_key(4)
        .map(|(_, i)| i)
        .write_text(ExecutionMode::Batch, out.path())
        .unwrap();
    let mut names: Vec<String> =
        std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["part-00000", "part-00001", "part-00002", "part-00003"]);
    let mut numbers: Vec<u64> = names
        .iter()
        .flat_map(|n| {
            std::fs::read_to_string(out.path().join(n))
                .unwrap()
                .lines()
                .map(|l| l.parse().unwrap())
                .collect::<Vec<u64>>()
        })
        .collect();
    numbers.sort();
    assert_eq!(numbers, (0..1_000).map(|i| i * 3).collect::<Vec<_>>());
}

#[test]
fn a_map_task_that_fails_midway_on_its_first_attempt_gives_an_exact_batch_result() {
    // Small buffers, so the failing attempt has pushed blocks before it panics.
    let options = EngineOptions { write_buffer: 64 << 10, combine_entries: 64, ..EngineOptions::default() };
    let engine = Engine::embedded_with(options).unwrap();
    let failed = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(AtomicU64::new(0));
    let (flag, counter) = (failed.clone(), seen.clone());
    let job = engine
        .generate(400_000, 4, |i| (i % 1000, i))
        .map(move |(k, i)| {
            counter.fetch_add(1, Ordering::Relaxed);
            // Map task 1 covers 100,000..200,000; it dies three quarters in, once.
            if i == 175_000 && !flag.swap(true, Ordering::SeqCst) {
                panic!("injected failure after writing part of the output");
            }
            (k, i)
        })
        .reduce_by_key(|a, b| a + b, 8);
    let result = job.collect_latest(ExecutionMode::Batch).unwrap();
    assert!(failed.load(Ordering::SeqCst), "the failure was injected");
    assert!(seen.load(Ordering::Relaxed) > 400_000, "the failed task was run again");
    let mut expected: HashMap<u64, u64> = HashMap::new();
    for i in 0..400_000u64 {
        *expected.entry(i % 1000).or_default() += i;
    }
    assert_eq!(result, expected);
}

#[test]
fn a_task_that_always_fails_fails_the_job_naming_the_task_and_its_last_error() {
    let engine = Engine::embedded().unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let counted = attempts.clone();
    let job = engine
        .generate(100, 2, |i| (i, i))
        .map(move |(k, v)| {
            if k == 70 {
                counted.fetch_add(1, Ordering::SeqCst);
                panic!("bad record {k}");
            }
            (k, v)
        })
        .group_by_key(2);
    let err = job.collect(ExecutionMode::Batch).unwrap_err();
    match &err {
        EngineError::TaskFailed { task, attempts: n, cause } => {
            assert!(task.contains("map 1"), "{task}");
            assert_eq!(*n, engine.options().max_task_attempts);
            assert!(cause.contains("bad record 70"), "{cause}");
        }
        other => panic!("expected TaskFailed, got {other}"),
    }
    assert_eq!(attempts.load(Ordering::SeqCst), engine.options().max_task_attempts);
    // The engine is still usable after a failed job.
    assert_eq!(engine.generate(10, 2, |i| i).count(ExecutionMode::Batch).unwrap(), 10);
}

#[test]
fn jobs_that_cannot_run_say_why() {
    let engine = Engine::embedded().unwrap();
    let unbounded = engine.generate_at_rate(RateSource::default(), 1, |i| (i, i));
    let err = unbounded.map(|x| x).collect(ExecutionMode::Batch).unwrap_err();
    assert!(err.to_string().contains("bounded"), "{err}");
    let err = unbounded.sort_by_key(2).collect(ExecutionMode::Streaming).unwrap_err();
    assert!(err.to_string().contains("sort_by_key needs a bounded input"), "{err}");
    let err = unbounded.group_by_key(2).collect(ExecutionMode::Streaming).unwrap_err();
    assert!(err.to_string().contains("group_by_key needs a bounded input"), "{err}");
}

#[test]
fn two_copies_need_a_cluster_and_an_engine_asking_for_them_elsewhere_says_so() {
    let err = Engine::builder().replication(2).embedded().err().expect("a standalone server holds one copy");
    assert!(matches!(err, EngineError::Options(_)) && err.to_string().contains("needs a cluster"), "{err}");
    let err = Engine::builder().replication(3).embedded().err().expect("the service keeps 1 or 2 copies");
    assert!(err.to_string().contains("1 or 2 copies"), "{err}");
    // One copy (the default) runs anywhere.
    let engine = Engine::builder().replication(1).embedded().unwrap();
    assert_eq!(engine.options().replication, 1);
    assert_eq!(engine.generate(10, 2, |i| (i, i)).sort_by_key(2).count(ExecutionMode::Batch).unwrap(), 10);
}

#[test]
fn the_embedded_servers_files_are_gone_after_the_engine_is_dropped() {
    let engine = Engine::embedded().unwrap();
    let dir = engine.embedded_data_dir().unwrap().to_path_buf();
    let job = engine.generate(50_000, 2, |i| (i % 100, i)).group_by_key(4);
    assert_eq!(job.collect(ExecutionMode::Batch).unwrap().len(), 100);
    assert!(dir.exists());
    drop(job);
    drop(engine);
    assert!(!dir.exists(), "{} still exists", dir.display());
}

#[test]
fn a_streaming_job_emits_updates_while_its_unbounded_source_runs_and_ends_when_stopped() {
    let engine = Engine::embedded().unwrap();
    let stop = StopHandle::new();
    let emitted = Arc::new(AtomicU64::new(0));
    let counter = emitted.clone();
    let source = RateSource { rate: Some(20_000.0), limit: None, stop: stop.clone() };
    let job = engine
        .generate_at_rate(source, 2, move |i| {
            counter.fetch_add(1, Ordering::Relaxed);
            (splitmix64(i) % 100, 1u64)
        })
        .reduce_by_key(|a, b| a + b, 4);
    let latest = Arc::new(Mutex::new(HashMap::new()));
    let updates_before_stop = Arc::new(AtomicU64::new(0));
    let (sink_latest, sink_before, sink_stop) = (latest.clone(), updates_before_stop.clone(), stop.clone());
    let started = Instant::now();
    let stopper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            stop.stop();
        })
    };
    job.for_each_timed(ExecutionMode::Streaming, move |(key, count), age| {
        if !sink_stop.is_stopped() {
            sink_before.fetch_add(1, Ordering::Relaxed);
        }
        assert!(age < Duration::from_secs(30), "an update {age:?} old");
        sink_latest.lock().unwrap().insert(key, count);
    })
    .unwrap();
    stopper.join().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(updates_before_stop.load(Ordering::Relaxed) > 0, "no update reached the sink while the source ran");
    let total: u64 = latest.lock().unwrap().values().sum();
    assert_eq!(total, emitted.load(Ordering::Relaxed), "the final counts add up to what the source emitted");
    assert!(total > 10_000, "the source ran at its rate ({total} records)");
}
