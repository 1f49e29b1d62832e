//! The buffering operators in batch mode over inputs 8× the engine's memory
//! budget (`EngineOptions::memory`): `group_by_key`, `sort_by_key`, `join`
//! and `reduce_by_key`'s final aggregation give exactly the results of a
//! plain-Rust reference, the engine's reservations never held more than the
//! budget (the pool's measured peak), the operators did spill (or streamed
//! from a key-ordered sort exchange), and no spill file is left afterwards.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use engine_adapter::{
    Dataset, Engine, EngineError, EngineOptions, Exchange, ExchangeMode, ExecutionMode, JobReport, Sink, SinkWriter,
    workload::splitmix64,
};
use serde::{Serialize, de::DeserializeOwned};

/// The operators' budget: small, so the inputs below are 8× it.
const BUDGET: usize = 4 << 20;
/// Records of the big inputs: about 51 encoded bytes each (an 8-byte key,
/// a 41-byte value, 2 bytes of framing), so 720,000 are some 36 MB.
const RECORDS: u64 = 720_000;
const PARTS: u32 = 4;
const PARTITIONS: u32 = 4;

fn engine() -> Engine {
    let options = EngineOptions { memory: BUDGET, server_memory: 256 << 20, ..EngineOptions::default() };
    Engine::builder().options(options).embedded().unwrap()
}

/// The value of record `i`: 40 digits.
fn value(i: u64) -> String {
    format!("{i:040}")
}

/// A sink that keeps each part's records, for the test to read in part order.
struct PartsSink<T>(Arc<Mutex<BTreeMap<u32, Vec<T>>>>);

struct PartsWriter<T> {
    part: u32,
    records: Vec<T>,
    out: Arc<Mutex<BTreeMap<u32, Vec<T>>>>,
}

impl<T: Serialize + DeserializeOwned + Send + Sync + 'static> Sink<T> for PartsSink<T> {
    type Writer = PartsWriter<T>;

    fn open(&self, part: u32, restored: Option<Vec<T>>) -> Result<PartsWriter<T>, EngineError> {
        Ok(PartsWriter { part, records: restored.unwrap_or_default(), out: self.0.clone() })
    }
}

impl<T: Serialize + DeserializeOwned + Send + 'static> SinkWriter<T> for PartsWriter<T> {
    type State = Vec<T>;

    fn write(&mut self, records: Vec<T>) -> Result<(), EngineError> {
        self.records.extend(records);
        Ok(())
    }

    fn snapshot(&mut self, _checkpoint: u64) -> Result<Vec<T>, EngineError> {
        Err(EngineError::Plan("this test sink runs batch jobs only".into()))
    }

    fn finish(self) -> Result<(), EngineError> {
        self.out.lock().unwrap().insert(self.part, self.records);
        Ok(())
    }
}

/// Runs `job` in batch mode; its records part by part in order, and its report.
fn run<T>(job: &Dataset<T>) -> (Vec<T>, JobReport)
where
    T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    let out = Arc::new(Mutex::new(BTreeMap::new()));
    let report = job.run(ExecutionMode::Batch, PartsSink(out.clone())).unwrap();
    let parts = std::mem::take(&mut *out.lock().unwrap());
    (parts.into_values().flatten().collect(), report)
}

/// What every run here must show: its exchange carried 8× the budget, the
/// reservations peaked within the budget, and the spill directory is empty.
fn check_bounded(engine: &Engine, report: &JobReport, what: &str) {
    let m = &report.metrics;
    let exchanged: u64 = m.stages.iter().filter(|s| s.name != "result").map(|s| s.totals().bytes_out).sum();
    assert!(exchanged >= 8 * BUDGET as u64, "{what}: only {exchanged} bytes crossed the exchanges");
    assert!(m.memory_peak > 0, "{what}: the operators reserved nothing");
    assert!(
        m.memory_peak <= BUDGET as u64 && m.memory_budget == BUDGET as u64,
        "{what}: reservations peaked at {} bytes, over the budget of {BUDGET}",
        m.memory_peak
    );
    assert_eq!(engine.memory_used(), 0, "{what}: reservations outlived the job");
    let left: Vec<_> = std::fs::read_dir(engine.spill_dir()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "{what}: spill files left behind: {left:?}");
}

#[test]
fn group_by_key_over_8x_the_memory_budget_is_exact_within_the_budget() {
    const KEYS: u64 = 20_000;
    let mut expected: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for i in 0..RECORDS {
        expected.entry(splitmix64(i) % KEYS).or_default().push(value(i));
    }
    expected.values_mut().for_each(|g| g.sort());
    for (exchange, spills) in
        [(Exchange::partitions(PARTITIONS), true), (Exchange::partitions(PARTITIONS).mode(ExchangeMode::Sort), false)]
    {
        let engine = engine();
        let job = engine.generate(RECORDS, PARTS, |i| (splitmix64(i) % KEYS, value(i))).group_by_key(exchange);
        let (groups, report) = run(&job);
        let what = format!("group_by_key over {:?}", exchange.mode);
        check_bounded(&engine, &report, &what);
        assert_eq!(report.metrics.spilled_bytes() > 0, spills, "{what}: spilled {}", report.metrics.spilled_bytes());
        assert_eq!(groups.len(), expected.len(), "{what}: one record per key");
        let mut got = BTreeMap::new();
        for (key, mut values) in groups {
            values.sort();
            assert!(got.insert(key, values).is_none(), "{what}: key {key} grouped twice");
        }
        assert!(got == expected, "{what}: the groups differ from the reference");
    }
}

#[test]
fn sort_by_key_over_8x_the_memory_budget_is_exact_within_the_budget() {
    let mut expected: Vec<(u64, String)> = (0..RECORDS).map(|i| (splitmix64(i ^ 0xfeed), value(i))).collect();
    expected.sort();
    // Sort exchange (default): the client merges each partition's runs as a
    // stream within a reservation. Hash exchange: each partition is sorted
    // here through spill files.
    for (exchange, spills) in
        [(Exchange::partitions(PARTITIONS), false), (Exchange::partitions(PARTITIONS).mode(ExchangeMode::Hash), true)]
    {
        let engine = engine();
        let job = engine.generate(RECORDS, PARTS, |i| (splitmix64(i ^ 0xfeed), value(i))).sort_by_key(exchange);
        let (sorted, report) = run(&job);
        let what = format!("sort_by_key over {:?}", exchange.mode);
        check_bounded(&engine, &report, &what);
        assert_eq!(report.metrics.spilled_bytes() > 0, spills, "{what}: spilled {}", report.metrics.spilled_bytes());
        assert_eq!(sorted.len(), expected.len(), "{what}");
        assert!(sorted.windows(2).all(|w| w[0].0 <= w[1].0), "{what}: not in key order across the parts");
        let mut got = sorted;
        got.sort();
        assert!(got == expected, "{what}: the records differ from the input");
    }
}

#[test]
fn join_over_8x_the_memory_budget_is_exact_within_the_budget() {
    const KEYS: u64 = 100_000;
    let left_key = |i: u64| splitmix64(i) % (KEYS + KEYS / 10); // some keys have no right record
    let mut right_of: HashMap<u64, Vec<u64>> = HashMap::new();
    for j in 0..KEYS + KEYS / 2 {
        right_of.entry(j % KEYS).or_default().push(j); // half the keys have two right records
    }
    let mut expected: Vec<(u64, (String, u64))> = Vec::new();
    for i in 0..RECORDS {
        let k = left_key(i);
        for &w in right_of.get(&k).into_iter().flatten() {
            expected.push((k, (value(i), w)));
        }
    }
    expected.sort();
    // Hash exchanges: the left side outgrows its share, so both sides are
    // sorted through spill files and merged. Sort exchanges: both come
    // key-ordered from the service and are merged as they stream.
    for (exchange, spills) in
        [(Exchange::partitions(PARTITIONS), true), (Exchange::partitions(PARTITIONS).mode(ExchangeMode::Sort), false)]
    {
        let engine = engine();
        let left = engine.generate(RECORDS, PARTS, move |i| (left_key(i), value(i)));
        let right = engine.generate(KEYS + KEYS / 2, 2, |j| (j % KEYS, j));
        let (mut got, report) = run(&left.join(&right, exchange));
        let what = format!("join over {:?}", exchange.mode);
        check_bounded(&engine, &report, &what);
        assert_eq!(report.metrics.spilled_bytes() > 0, spills, "{what}: spilled {}", report.metrics.spilled_bytes());
        got.sort();
        assert_eq!(got.len(), expected.len(), "{what}");
        assert!(got == expected, "{what}: the joined records differ from the reference");
    }
}

#[test]
fn reduce_by_key_with_more_keys_than_memory_spills_its_final_aggregation_and_is_exact() {
    // Nearly every key distinct: the map-side combiner cannot shrink the
    // input, and the reducers' tables outgrow their share.
    const KEYS: u64 = 4_000_000;
    let engine = engine();
    let mut expected: HashMap<u64, u64> = HashMap::new();
    for i in 0..RECORDS {
        *expected.entry(splitmix64(i) % KEYS).or_default() += i;
    }
    let job = engine
        .generate(RECORDS, PARTS, |i| (splitmix64(i) % KEYS, (i, value(i))))
        .reduce_by_key(|(a, s), (b, _)| (a + b, s), PARTITIONS)
        .map(|(k, (sum, _))| (k, sum));
    let (sums, report) = run(&job);
    check_bounded(&engine, &report, "reduce_by_key");
    assert!(report.metrics.spilled_bytes() > 0, "reduce_by_key did not spill");
    assert_eq!(sums.len(), expected.len(), "one record per key");
    let got: HashMap<u64, u64> = sums.into_iter().collect();
    assert!(got == expected, "the sums differ from the reference");
}
