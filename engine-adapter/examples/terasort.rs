//! W3 `sort` (shared/WORKLOADS.md) through the engine: W1 records, range
//! partitioned by a sample of their keys, sorted within each partition by
//! a sort exchange with key ordering, and verified.
//!
//! `cargo run --release -p engine-adapter --example terasort -- [--records N] [--maps M] [--partitions R] [--mode batch|streaming]`

use std::time::Instant;

use clap::Parser;
use engine_adapter::{
    Engine, ExecutionMode,
    workload::{W1_KEY_LEN, W1_RECORD_LEN, W1_VALUE_LEN, W1Totals, w1_record},
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000_000)]
    records: u64,
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
    let seed = args.seed;
    let job = engine
        .generate(args.records, args.maps, move |i| {
            let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
            w1_record(seed, i, &mut key, &mut value);
            // The value is lowercase hex: a String crosses the exchange as one
            // length-prefixed run of bytes (a Vec<u8> would go byte by byte).
            (key, String::from_utf8_lossy(&value).into_owned())
        })
        .sort_by_key(args.partitions);

    // The keys come back part by part in order, so one pass checks both
    // that each partition is sorted and that partition boundaries are.
    let started = Instant::now();
    let keys = job.map(|(key, _value)| key).collect(args.mode)?;
    let elapsed = started.elapsed();

    let sorted = keys.windows(2).all(|pair| pair[0] <= pair[1]);
    let mut totals = W1Totals::default();
    for key in &keys {
        totals.add_key(key);
    }
    let expected = W1Totals::expected(seed, args.records);
    let verified = sorted && totals == expected;
    let mb = (args.records * W1_RECORD_LEN as u64) as f64 / 1e6;
    println!(
        "terasort {:?}: {} records ({mb:.0} MB), M={} R={}: {:.2} s, {:.0} MB/s, sorted={}, count and checksum {}",
        args.mode,
        args.records,
        args.maps,
        args.partitions,
        elapsed.as_secs_f64(),
        mb / elapsed.as_secs_f64(),
        sorted,
        if totals == expected { "exact" } else { "WRONG" }
    );
    anyhow::ensure!(verified, "verification failed: sorted={sorted}, {totals:?} vs expected {expected:?}");
    Ok(())
}
