//! W1 `exchange` end to end against the `shuffle-server` binary run as a
//! child process: real QUIC on loopback, real files.

use shuffle_client::ShuffleId;
use shuffle_tests::{
    daemon::Daemon,
    exchange::{ExchangeParams, run_exchange, verify},
};

const MILLION: ExchangeParams =
    ExchangeParams { records: 1_000_000, maps: 4, partitions: 16, seed: 42, mode: shuffle_client::ExchangeMode::Hash };

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w1_exchange_of_a_million_records_through_the_daemon_is_exact_and_stays_in_memory() {
    let daemon = Daemon::start(&[]);
    let client = daemon.connect("w1-default").await.unwrap();
    let outcome = run_exchange(&client, ShuffleId(1), MILLION).await.unwrap();
    verify(MILLION, outcome.received).unwrap();
    assert_eq!(outcome.received.records, 1_000_000);
    // 100 MB in 16 partitions stays below both the 8 MiB flush size per
    // partition and the 1 GiB budget: nothing needed to reach the disk.
    assert_eq!(daemon.shuffle_file_bytes(), 0, "default budget should not spill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w1_exchange_under_a_16mib_budget_spills_to_disk_and_is_exact() {
    let daemon = Daemon::start(&["--memory", "16MiB"]);
    let client = daemon.connect("w1-small").await.unwrap();
    let outcome = run_exchange(&client, ShuffleId(1), MILLION).await.unwrap();
    verify(MILLION, outcome.received).unwrap();
    // The budget is a sixth of the data: most of it must have been spilled
    // into the partition files, which still exist until unregistered.
    let on_disk = daemon.shuffle_file_bytes();
    assert!(on_disk > 50_000_000, "only {on_disk} bytes spilled for 100 MB under a 16 MiB budget");
    client.unregister_shuffle(ShuffleId(1)).await.unwrap();
    assert_eq!(daemon.shuffle_file_bytes(), 0, "unregister removes the files");
}
