//! The quick-start job: starts an embedded shuffle server, runs the W1
//! `exchange` workload of `shared/WORKLOADS.md` through it over QUIC on
//! loopback (or, with `--workload sort`, W3 through a key-ordered sort
//! shuffle), verifies the result, and prints records, bytes, time and MB/s.
//!
//! `cargo run --release -p shuffle-tests --example exchange -- --records 10000000 --maps 4 --partitions 16 --mode sort`

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use shuffle_client::{ClientOptions, ExchangeMode, ShuffleClient, ShuffleId};
use shuffle_server::{ByteSize, ServerConfig};
use shuffle_tests::exchange::{ExchangeParams, run_exchange, run_sort, verify};

/// Which standard workload to run.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Workload {
    /// W1: pure repartition, reducers count and checksum.
    Exchange,
    /// W3: total-order sort through a key-ordered sort shuffle.
    Sort,
}

/// Exchange mode for W1.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Hash,
    Sort,
    /// Hybrid with selective spilling; readers start together with the maps.
    Hybrid,
}

/// A standard workload through an embedded shuffle server.
#[derive(Parser)]
struct Args {
    /// W1 `exchange` or W3 `sort`.
    #[arg(long, value_enum, default_value = "exchange")]
    workload: Workload,
    /// Exchange mode for W1 (W3 always uses sort mode with key ordering).
    #[arg(long, value_enum, default_value = "hash")]
    mode: Mode,
    /// Records to shuffle (100 bytes each).
    #[arg(long, default_value_t = 10_000_000)]
    records: u64,
    /// Map tasks, M.
    #[arg(long, default_value_t = 4)]
    maps: u32,
    /// Partitions, R.
    #[arg(long, default_value_t = 16)]
    partitions: u32,
    /// Seed of the record generator.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Memory budget of the embedded server.
    #[arg(long, default_value = "1GiB")]
    memory: ByteSize,
    /// Runs to make; the median is reported.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let data_dir = tempfile::tempdir().context("temporary data dir")?;
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: data_dir.path().to_path_buf(),
        memory: args.memory,
        ..ServerConfig::default()
    };
    let server = shuffle_server::start(config).await?;
    let options = ClientOptions::new("quickstart").trusted_cert(server.cert_path());
    let client = ShuffleClient::connect(server.local_addr(), options).await?;
    let params = ExchangeParams {
        records: args.records,
        maps: args.maps,
        partitions: args.partitions,
        seed: args.seed,
        mode: match args.mode {
            Mode::Hash => ExchangeMode::Hash,
            Mode::Sort => ExchangeMode::Sort,
            Mode::Hybrid => ExchangeMode::Hybrid,
        },
    };
    let what = match args.workload {
        Workload::Exchange => format!("W1 exchange, {:?} mode", params.mode),
        Workload::Sort => "W3 sort, sort mode with key ordering".to_string(),
    };
    println!(
        "{what}: {} records ({} MB), M = {}, R = {}, embedded server at {}",
        params.records,
        params.records * 100 / 1_000_000,
        params.maps,
        params.partitions,
        server.local_addr()
    );
    let mut times = Vec::new();
    for run in 0..args.repeat {
        let shuffle = ShuffleId(run);
        let outcome = match args.workload {
            Workload::Exchange => run_exchange(&client, shuffle, params).await,
            Workload::Sort => run_sort(&client, shuffle, params).await,
        }
        .map_err(anyhow::Error::msg)?;
        let verified = verify(params, outcome.received);
        let mb_s = outcome.input_bytes as f64 / 1e6 / outcome.elapsed.as_secs_f64();
        println!(
            "run {}: {} records, {} bytes in {:.3} s = {:.1} MB/s, count and key checksum {}{}",
            run + 1,
            outcome.received.records,
            outcome.input_bytes,
            outcome.elapsed.as_secs_f64(),
            mb_s,
            if verified.is_ok() { "verified" } else { "MISMATCH" },
            if args.workload == Workload::Sort { ", every partition sorted, boundaries ordered" } else { "" }
        );
        if let Err(e) = verified {
            bail!("verification failed: {e}");
        }
        client.unregister_shuffle(shuffle).await?;
        times.push(outcome.elapsed);
    }
    times.sort();
    let median: Duration = times[times.len() / 2];
    let stats = server.stats();
    println!(
        "median {:.3} s = {:.1} MB/s over {} run(s); server received {} bytes in {} blocks (lz4), spilled {} bytes",
        median.as_secs_f64(),
        params.records as f64 * 100.0 / 1e6 / median.as_secs_f64(),
        args.repeat,
        stats.bytes_received,
        stats.blocks_received,
        stats.spilled_bytes
    );
    client.close().await;
    server.shutdown().await;
    Ok(())
}
