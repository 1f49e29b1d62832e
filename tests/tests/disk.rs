//! A full disk is an error to every producer whose data cannot be placed,
//! promptly, naming the data dir and the reserve; committed data stays
//! readable and the server keeps serving.

use std::time::{Duration, Instant};

use shuffle_client::{ErrorKind, ShuffleId, ShuffleSpec};
use shuffle_tests::{
    daemon::Daemon,
    exchange::{ExchangeParams, read_partition, run_exchange, verify, write_map},
};

const WITNESS: ExchangeParams =
    ExchangeParams { records: 30_000, maps: 2, partitions: 4, seed: 31, mode: shuffle_client::ExchangeMode::Hash };

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hitting_the_disk_reserve_fails_every_waiting_producer_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    // Leave 24 MiB of room above the reserve: the writers below need ~240 MB.
    let available = shuffle_server::disk::available_bytes(dir.path()).unwrap();
    let reserve = format!("{}B", available.saturating_sub(24 << 20));
    let daemon =
        Daemon::start_in(dir.path(), &["--memory", "16MiB", "--flush-size", "1MiB", "--disk-reserve", &reserve]);

    let witness = daemon.connect("witness").await.unwrap();
    let outcome = run_exchange(&witness, ShuffleId(0), WITNESS).await.unwrap();
    verify(WITNESS, outcome.received).unwrap();

    // Four apps, each writing 60 MB into a hash shuffle: far more than memory and disk room.
    let mut writers = Vec::new();
    for app in 0..4 {
        let client = daemon.connect(&format!("writer-{app}")).await.unwrap();
        client.register_shuffle(ShuffleId(0), ShuffleSpec::hash(1, 8)).await.unwrap();
        let params = ExchangeParams { records: 600_000, maps: 1, partitions: 8, seed: app, ..WITNESS };
        writers.push(tokio::spawn(async move {
            let result = write_map(&client, ShuffleId(0), params, 0, 0).await;
            (result, Instant::now())
        }));
    }
    let mut failed_at = Vec::new();
    for w in writers {
        let (result, at) = w.await.unwrap();
        let e = result.expect_err("no writer can place 60 MB");
        assert_eq!(e.service_kind(), Some(ErrorKind::DiskFull), "{e}");
        assert!(e.to_string().contains("disk full") && e.to_string().contains("reserve"), "{e}");
        failed_at.push(at);
    }
    let first = *failed_at.iter().min().unwrap();
    let last = *failed_at.iter().max().unwrap();
    assert!(last - first < Duration::from_secs(1), "the writers were told {:?} apart", last - first);

    // The committed shuffle still reads exactly, and the status names the cause.
    let mut total = shuffle_tests::workload::W1Totals::default();
    for p in 0..WITNESS.partitions {
        total.merge(read_partition(&witness, ShuffleId(0), p, WITNESS.partitions).await.unwrap());
    }
    verify(WITNESS, total).unwrap();
    let status: serde_json::Value = serde_json::from_str(&daemon.http_get("/status")).unwrap();
    assert!(status["disk"]["full"].as_str().is_some_and(|m| m.contains("disk full")), "{status}");
}
