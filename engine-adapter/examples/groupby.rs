//! W2 `groupby` (shared/WORKLOADS.md) through the engine: `SUM(value) GROUP
//! BY key` with map-side combining, verified (the number of groups equals
//! the number of distinct keys generated, and the group sums add up to
//! N(N-1)/2).
//!
//! `cargo run --release -p engine-adapter --example groupby -- [--records N] [--keys K] [--mode batch|streaming]`

use std::{collections::HashSet, time::Instant};

use clap::Parser;
use engine_adapter::{Engine, ExecutionMode, workload::w2_record};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 20_000_000)]
    records: u64,
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    #[arg(long, default_value_t = 4)]
    maps: u32,
    #[arg(long, default_value_t = 16)]
    partitions: u32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value = "batch")]
    mode: ExecutionMode,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args = Args::parse();
    let engine = Engine::embedded()?;
    let (seed, keys) = (args.seed, args.keys);
    let job = engine
        .generate(args.records, args.maps, move |i| w2_record(seed, i, keys))
        .reduce_by_key(|a: i64, b| a.wrapping_add(b), args.partitions);
    let started = Instant::now();
    let groups = job.collect_latest(args.mode)?;
    let elapsed = started.elapsed();

    // The expected figures, straight from the generator (not timed).
    let distinct: HashSet<u64> = (0..args.records).map(|i| w2_record(seed, i, keys).0).collect();
    let n = i128::from(args.records);
    let expected_sum = (n * (n - 1) / 2) as i64;
    let sum = groups.values().fold(0i64, |s, v| s.wrapping_add(*v));
    let verified = groups.len() == distinct.len() && sum == expected_sum;
    let mb = (args.records * 16) as f64 / 1e6;
    println!(
        "groupby {:?}: {} records ({mb:.0} MB as key+value), K={} M={} R={}: {:.2} s, {:.1} M records/s, {} groups, sum {}",
        args.mode,
        args.records,
        args.keys,
        args.maps,
        args.partitions,
        elapsed.as_secs_f64(),
        args.records as f64 / elapsed.as_secs_f64() / 1e6,
        groups.len(),
        if verified { "exact" } else { "WRONG" }
    );
    anyhow::ensure!(
        verified,
        "{} groups vs {} distinct keys; sum {sum} vs {expected_sum}",
        groups.len(),
        distinct.len()
    );
    Ok(())
}
