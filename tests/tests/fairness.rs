//! Backpressure is per shuffle: a streaming app whose consumer stalls holds
//! at most its share of the server's memory and pauses only its own
//! producers; a batch app on the same server completes, exactly, within a
//! stated bound of its time alone.

use std::time::{Duration, Instant};

use shuffle_client::{ShuffleId, ShuffleSpec, SpillStrategy};
use shuffle_tests::{
    daemon::Daemon,
    exchange::{ExchangeParams, run_exchange, verify},
    workload::{W1_KEY_LEN, W1_VALUE_LEN, w1_record},
};

/// How much slower the batch app may be beside a stalled stream than alone:
/// it keeps at least the memory above the hard limit (10% of the budget) and
/// every spill of its own, so it slows down, but never stalls.
const SLOWDOWN_BOUND: u32 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_streaming_app_does_not_stall_a_batch_app_on_the_same_server() {
    let daemon = Daemon::start(&["--memory", "32MiB", "--flush-size", "1MiB"]);
    let batch = daemon.connect("batch").await.unwrap();
    let params =
        ExchangeParams { records: 200_000, maps: 2, partitions: 8, seed: 51, mode: shuffle_client::ExchangeMode::Hash };
    let started = Instant::now();
    let outcome = run_exchange(&batch, ShuffleId(0), params).await.unwrap();
    verify(params, outcome.received).unwrap();
    let alone = started.elapsed();

    // The streaming app: a hybrid shuffle that may not spill, a producer, and no reader.
    let stream = daemon.connect("stalled-stream").await.unwrap();
    let spec = ShuffleSpec { spill_quota: Some(0), ..ShuffleSpec::hybrid(1, 1, SpillStrategy::Selective) };
    stream.register_shuffle(ShuffleId(0), spec).await.unwrap();
    let producer = tokio::spawn(async move {
        let mut writer = stream.writer(ShuffleId(0), 0, 0).await.unwrap();
        let (mut k, mut v) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
        for i in 0u64.. {
            w1_record(9, i, &mut k, &mut v);
            writer.write(0, &k, &v).await.unwrap();
        }
    });
    // Let it fill the server to its share and stall.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status: serde_json::Value = serde_json::from_str(&daemon.http_get("/status")).unwrap();
    let held = status["memory"]["used_bytes"].as_u64().unwrap();
    assert!(held > 16 << 20, "the stalled stream holds most of the memory: {status}");
    assert!(!producer.is_finished(), "the stream's producer is paused, not failed");

    let started = Instant::now();
    let outcome = run_exchange(&batch, ShuffleId(1), ExchangeParams { seed: 52, ..params }).await.unwrap();
    verify(ExchangeParams { seed: 52, ..params }, outcome.received).unwrap();
    let beside = started.elapsed();
    println!("batch app: {alone:?} alone, {beside:?} beside a stalled stream holding {} MiB", held >> 20);
    assert!(
        beside <= alone * SLOWDOWN_BOUND + Duration::from_secs(2),
        "the batch app took {beside:?} beside the stalled stream, {alone:?} alone"
    );
    assert!(!producer.is_finished(), "the stream is still paused");
    producer.abort();
}
