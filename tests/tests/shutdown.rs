//! SIGTERM drains the daemon: no new connections, in-flight requests finish,
//! buffered data is flushed, and the process exits 0.

use std::time::Duration;

use shuffle_client::{CommitOutcome, ShuffleId, ShuffleSpec};
use shuffle_tests::{
    daemon::Daemon,
    workload::{W1_KEY_LEN, W1_VALUE_LEN, w1_partition, w1_record},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_push_finish_flushes_it_and_exits_0() {
    let mut daemon = Daemon::start(&[]);
    let client = daemon.connect("draining").await.unwrap();
    client.register_shuffle(ShuffleId(0), ShuffleSpec::hash(1, 4)).await.unwrap();
    let mut writer = client.writer(ShuffleId(0), 0, 0).await.unwrap();
    let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
    let mut write_range = async |writer: &mut shuffle_client::MapWriter, range: std::ops::Range<u64>| {
        for i in range {
            w1_record(1, i, &mut key, &mut value);
            writer.write(w1_partition(&key, 4), &key, &value).await.unwrap();
        }
    };
    write_range(&mut writer, 0..50_000).await;

    daemon.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New connections are refused while the push is still in flight...
    let refused = tokio::time::timeout(Duration::from_secs(15), daemon.connect("late")).await;
    assert!(matches!(refused, Ok(Err(_))), "a new connection during the drain must fail");
    // ...and the in-flight attempt finishes and commits.
    write_range(&mut writer, 50_000..100_000).await;
    assert_eq!(writer.finish().await.unwrap(), CommitOutcome::Committed);

    let code = tokio::task::spawn_blocking(move || {
        let code = daemon.wait_exit(Duration::from_secs(20));
        (code, daemon)
    });
    let (code, daemon) = code.await.unwrap();
    assert_eq!(code, Some(0), "exit code after SIGTERM");
    // 100,000 records of ~102 framed bytes were in memory; shutdown flushed them.
    let on_disk = daemon.shuffle_file_bytes();
    assert!(on_disk >= 10_000_000, "only {on_disk} bytes flushed at shutdown");
}
