//! Word count in batch or streaming mode, over an embedded shuffle server.
//!
//! `cargo run --release -p engine-adapter --example wordcount -- [--mode batch|streaming] [--top N] [FILE]`
//!
//! Without a file it counts generated text (a Zipf-like vocabulary, so a
//! few words are frequent). Prints `WORD COUNT` lines, most frequent first
//! (ties by word); both modes print the same.

use std::{path::PathBuf, time::Instant};

use clap::Parser;
use engine_adapter::{Dataset, Engine, ExecutionMode, workload::splitmix64};

#[derive(Parser)]
struct Args {
    /// batch or streaming.
    #[arg(long, default_value = "batch")]
    mode: ExecutionMode,
    /// How many of the most frequent words to print.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Lines of generated text when no file is given.
    #[arg(long, default_value_t = 1_000_000)]
    lines: u64,
    /// Map tasks.
    #[arg(long, default_value_t = 4)]
    maps: u32,
    /// Partitions of the exchange.
    #[arg(long, default_value_t = 8)]
    partitions: u32,
    /// A text file to count instead of generated text.
    file: Option<PathBuf>,
}

/// Line `i` of the generated text: eight words drawn from a skewed vocabulary.
fn generated_line(i: u64) -> String {
    let mut words = Vec::with_capacity(8);
    for w in 0..8 {
        let x = splitmix64(i * 8 + w);
        // The product of two uniforms skews towards small ranks.
        let rank = ((x >> 32) % 1000) * ((x & 0xffff_ffff) % 1000) / 1000;
        words.push(format!("w{rank}"));
    }
    words.join(" ")
}

/// The job: the same dataset runs in either mode.
fn word_counts(lines: Dataset<String>, partitions: u32) -> Dataset<(String, u64)> {
    lines
        .flat_map(|line: String| line.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>())
        .map(|word| (word, 1u64))
        .reduce_by_key(|a, b| a + b, partitions)
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args = Args::parse();
    let engine = Engine::embedded()?;
    let lines = match &args.file {
        Some(path) => engine.read_text(path, args.maps),
        None => engine.generate(args.lines, args.maps, generated_line),
    };
    let started = Instant::now();
    let counts = word_counts(lines, args.partitions).collect_latest(args.mode)?;
    let elapsed = started.elapsed();
    let mut counts: Vec<(String, u64)> = counts.into_iter().collect();
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    for (word, count) in counts.iter().take(args.top) {
        println!("{word} {count}");
    }
    let total: u64 = counts.iter().map(|(_, c)| c).sum();
    eprintln!("{} words, {} distinct, {:?} mode, {:.2} s", total, counts.len(), args.mode, elapsed.as_secs_f64());
    Ok(())
}
