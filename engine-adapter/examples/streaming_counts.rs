//! W4-like streaming job: rate-limited sources emit `(key, 1)` records
//! stamped with their creation time, a keyed reduction keeps running counts
//! over a hybrid exchange, and the sink measures each update's end-to-end
//! latency. Prints throughput and p50/p99 latency every second, then checks
//! that the final counts add up to what the sources emitted.
//!
//! `cargo run --release -p engine-adapter --example streaming_counts -- [--rate R] [--seconds S]`

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use engine_adapter::{Engine, ExecutionMode, RateSource, StopHandle, workload::w4_key};
use hdrhistogram::Histogram;

#[derive(Parser)]
struct Args {
    /// Records per second, all sources together.
    #[arg(long, default_value_t = 100_000.0)]
    rate: f64,
    /// Seconds to run (after the warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Seconds of warm-up excluded from the totals.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    #[arg(long, default_value_t = 2)]
    maps: u32,
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

fn latency_histogram() -> Histogram<u64> {
    // Microseconds, from 1 µs to 1 minute, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args = Args::parse();
    let engine = Engine::embedded()?;
    let stop = StopHandle::new();
    let emitted = Arc::new(AtomicU64::new(0));
    let (seed, keys, counter) = (args.seed, args.keys, emitted.clone());
    let job = engine
        .generate_at_rate(RateSource { rate: Some(args.rate), limit: None, stop: stop.clone() }, args.maps, move |i| {
            counter.fetch_add(1, Ordering::Relaxed);
            (w4_key(seed, i, keys), 1u64)
        })
        .reduce_by_key(|a, b| a + b, args.partitions);

    let window = Arc::new(Mutex::new(latency_histogram()));
    let total = Arc::new(Mutex::new(latency_histogram()));
    let measuring = Arc::new(AtomicBool::new(false));
    let latest: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let (sink_window, sink_total, sink_measuring, sink_latest) =
        (window.clone(), total.clone(), measuring.clone(), latest.clone());

    let reporter = {
        let (stop, emitted, window, measuring) = (stop.clone(), emitted.clone(), window.clone(), measuring.clone());
        let (warmup, seconds) = (args.warmup, args.seconds);
        std::thread::spawn(move || {
            let mut last = 0;
            for second in 1..=warmup + seconds {
                std::thread::sleep(Duration::from_secs(1));
                if second == warmup {
                    measuring.store(true, Ordering::Relaxed);
                }
                let now = emitted.load(Ordering::Relaxed);
                let h =
                    std::mem::replace(&mut *window.lock().expect("sink never panics holding it"), latency_histogram());
                println!(
                    "t={second:>3}s {:>9} records/s  updates {:>8}  p50 {:>7.2} ms  p99 {:>7.2} ms{}",
                    now - last,
                    h.len(),
                    ms(h.value_at_quantile(0.5)),
                    ms(h.value_at_quantile(0.99)),
                    if second <= warmup { "  (warm-up)" } else { "" }
                );
                last = now;
            }
            stop.stop();
        })
    };
    let started = Instant::now();
    job.for_each_timed(ExecutionMode::Streaming, move |(key, count), age| {
        let us = (age.as_micros() as u64).clamp(1, 60_000_000);
        sink_window.lock().expect("no panics").record(us).expect("clamped into range");
        if sink_measuring.load(Ordering::Relaxed) {
            sink_total.lock().expect("no panics").record(us).expect("clamped into range");
        }
        sink_latest.lock().expect("no panics").insert(key, count);
    })?;
    reporter.join().expect("the reporter does not panic");
    let elapsed = started.elapsed();

    let emitted = emitted.load(Ordering::Relaxed);
    let counted: u64 = latest.lock().expect("no panics").values().sum();
    let h = total.lock().expect("no panics");
    println!(
        "target {:.0} records/s, achieved {:.0} records/s over {:.1} s; latency after warm-up: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} updates)",
        args.rate,
        emitted as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.len()
    );
    println!(
        "final counts add up to {counted} of {emitted} records emitted: {}",
        if counted == emitted { "exact" } else { "WRONG" }
    );
    anyhow::ensure!(counted == emitted, "counts do not add up");
    Ok(())
}
