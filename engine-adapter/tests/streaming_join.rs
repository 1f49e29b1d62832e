//! The streaming join keeps bounded state: without a retention, a state
//! that outgrows the engine's memory budget fails the job with a clear
//! error instead of growing; with one, records leave the state once that
//! much older than now and the join runs within the budget.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use engine_adapter::{Engine, EngineError, EngineOptions, ExecutionMode, JoinOptions, RateSource};

fn engine(memory: usize) -> Engine {
    Engine::builder().options(EngineOptions { memory, ..EngineOptions::default() }).embedded().unwrap()
}

fn value(i: u64) -> String {
    format!("{i:040}")
}

#[test]
fn a_streaming_join_whose_state_outgrows_the_budget_fails_with_a_clear_error() {
    const BUDGET: usize = 1 << 20;
    let engine = engine(BUDGET);
    let unpaced = |limit| RateSource { rate: None, limit: Some(limit), ..RateSource::default() };
    // Keys that never match: both sides are kept whole, some 16 MB.
    let left = engine.generate_at_rate(unpaced(50_000), 2, |i| (2 * i, value(i)));
    let right = engine.generate_at_rate(unpaced(50_000), 2, |i| (2 * i + 1, value(i)));
    let err = left.join(&right, 2).count(ExecutionMode::Streaming).unwrap_err();
    let message = err.to_string();
    assert!(matches!(&err, EngineError::StateTooLarge { .. }), "{message}");
    assert!(message.contains("join") && message.contains("retention"), "the error says what and how to fix: {message}");
    assert_eq!(engine.memory_used(), 0, "the failed join's reservations are released");
    assert!(engine.memory_peak() <= BUDGET);
}

#[test]
fn a_streaming_join_with_a_retention_runs_in_bounded_state() {
    const BUDGET: usize = 4 << 20;
    const RECORDS: u64 = 80_000;
    const RATE: f64 = 40_000.0;
    let engine = engine(BUDGET);
    let paced = RateSource { rate: Some(RATE), limit: Some(RECORDS), ..RateSource::default() };
    // Record i of each side is made at about the same moment, on the same key.
    let left = engine.generate_at_rate(paced.clone(), 2, |i| (i, value(i)));
    let right = engine.generate_at_rate(paced, 2, |i| (i, i * 3));
    let joined = left.join_with(&right, 2, JoinOptions::retention(Duration::from_millis(300)));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    joined.for_each(ExecutionMode::Streaming, move |pair| out.lock().unwrap().push(pair)).unwrap();
    let pairs = std::mem::take(&mut *seen.lock().unwrap());
    // Kept whole, both sides would take well over the budget (some 80,000
    // records of 150 bytes and more): only eviction keeps the join within it.
    assert!(engine.memory_peak() <= BUDGET, "peak {} over {BUDGET}", engine.memory_peak());
    let mut keys = HashSet::new();
    for (k, (v, w)) in &pairs {
        assert_eq!((v, *w), (&value(*k), k * 3), "a wrong pair for key {k}");
        assert!(keys.insert(*k), "key {k} joined twice");
    }
    // Matches arrive within milliseconds of each other, well inside the
    // retention; a pair further apart than it (a stalled machine) is the
    // documented loss of a processing-time retention.
    assert!(pairs.len() as u64 >= RECORDS * 95 / 100, "only {} of {RECORDS} keys joined", pairs.len());
}
