//! The keyed operators against plain in-memory references, in batch mode
//! and (for the final results) in streaming mode, over a real embedded
//! shuffle server.

use std::collections::{BTreeMap, HashMap};

use engine_adapter::{Engine, Exchange, ExchangeMode, ExecutionMode};
use proptest::{prelude::*, test_runner::TestRunner};

const MODES: [ExecutionMode; 2] = [ExecutionMode::Batch, ExecutionMode::Streaming];

fn runner() -> TestRunner {
    TestRunner::new(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })
}

fn records() -> impl Strategy<Value = (Vec<(u16, i64)>, u32, u32)> {
    (prop::collection::vec((0u16..40, -1000i64..1000), 0..400), 1u32..5, 1u32..7)
}

#[test]
fn reduce_by_key_matches_a_reference_in_both_modes() {
    let engine = Engine::embedded().unwrap();
    runner()
        .run(&records(), |(input, parts, partitions)| {
            let mut expected: HashMap<u16, i64> = HashMap::new();
            for (k, v) in &input {
                *expected.entry(*k).or_default() += v;
            }
            let job = engine.parallelize(input, parts).reduce_by_key(|a, b| a + b, partitions);
            for mode in MODES {
                prop_assert_eq!(&job.collect_latest(mode).unwrap(), &expected, "{:?}", mode);
            }
            // Batch emits exactly one record per key.
            prop_assert_eq!(job.collect(ExecutionMode::Batch).unwrap().len(), expected.len());
            Ok(())
        })
        .unwrap();
}

#[test]
fn group_by_key_matches_a_reference_in_both_modes() {
    let engine = Engine::embedded().unwrap();
    runner()
        .run(&records(), |(input, parts, partitions)| {
            let mut expected: BTreeMap<u16, Vec<i64>> = BTreeMap::new();
            for (k, v) in &input {
                expected.entry(*k).or_default().push(*v);
            }
            expected.values_mut().for_each(|g| g.sort());
            let job = engine.parallelize(input, parts).group_by_key(partitions);
            for mode in MODES {
                let mut got: BTreeMap<u16, Vec<i64>> = BTreeMap::new();
                for (k, mut g) in job.collect(mode).unwrap() {
                    g.sort();
                    prop_assert!(got.insert(k, g).is_none(), "key {} grouped twice", k);
                }
                prop_assert_eq!(&got, &expected, "{:?}", mode);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn sort_by_key_matches_a_reference_in_both_modes_and_exchange_kinds() {
    let engine = Engine::embedded().unwrap();
    let strategy = (prop::collection::vec(("[a-z]{0,12}", any::<u32>()), 0..400), 1u32..5, 1u32..7);
    runner()
        .run(&strategy, |(input, parts, partitions)| {
            let mut expected = input.clone();
            expected.sort();
            let source = engine.parallelize(input, parts);
            for exchange in
                [Exchange::partitions(partitions), Exchange::partitions(partitions).mode(ExchangeMode::Hash)]
            {
                let job = source.sort_by_key(exchange);
                for mode in MODES {
                    let got = job.collect(mode).unwrap();
                    prop_assert!(
                        got.windows(2).all(|w| w[0].0 <= w[1].0),
                        "{:?} {:?}: not in key order",
                        mode,
                        exchange
                    );
                    let mut got_sorted = got.clone();
                    got_sorted.sort();
                    prop_assert_eq!(&got_sorted, &expected, "{:?} {:?}", mode, exchange);
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn join_matches_a_reference_in_both_modes() {
    let engine = Engine::embedded().unwrap();
    let strategy = (
        prop::collection::vec((0u16..30, any::<i32>()), 0..150),
        prop::collection::vec((0u16..30, "[a-z]{0,3}"), 0..150),
        1u32..4,
        1u32..6,
    );
    runner()
        .run(&strategy, |(left, right, parts, partitions)| {
            let mut expected = Vec::new();
            for (lk, lv) in &left {
                for (rk, rv) in &right {
                    if lk == rk {
                        expected.push((*lk, (*lv, rv.clone())));
                    }
                }
            }
            expected.sort();
            let job = engine.parallelize(left, parts).join(&engine.parallelize(right, parts + 1), partitions);
            for mode in MODES {
                let mut got = job.collect(mode).unwrap();
                got.sort();
                prop_assert_eq!(&got, &expected, "{:?}", mode);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn a_multi_stage_job_joins_two_reductions_in_both_modes() {
    let engine = Engine::embedded().unwrap();
    let sums = engine.generate(20_000, 3, |i| (i % 97, i)).reduce_by_key(|a, b| a + b, 4);
    let counts = engine.generate(5_000, 2, |i| (i % 89, 1u64)).reduce_by_key(|a, b| a + b, 5);
    let job = sums.join(&counts, 3).map(|(k, (sum, count))| (k, sum * count));
    let mut expected: HashMap<u64, u64> = HashMap::new();
    for k in 0..89u64 {
        let sum: u64 = (0..20_000u64).filter(|i| i % 97 == k).sum();
        let count = (0..5_000u64).filter(|i| i % 89 == k).count() as u64;
        expected.insert(k, sum * count);
    }
    assert_eq!(job.collect_latest(ExecutionMode::Batch).unwrap(), expected);
    // Streaming: the reductions emit upserts, so the join sees every
    // intermediate sum; the last value per key is the final one.
    let streamed = job.collect(ExecutionMode::Streaming).unwrap();
    assert!(streamed.len() >= expected.len());
    let finals: HashMap<u64, u64> = streamed.iter().fold(HashMap::new(), |mut m, (k, v)| {
        let e = m.entry(*k).or_insert(0);
        *e = (*e).max(*v); // values only grow
        m
    });
    assert_eq!(finals, expected);
}
