//! SIGTERM drains the daemon: no new connections, in-flight requests finish,
//! everything committed is written down, and the process exits 0; started
//! again on the same data dir, it serves the committed shuffles of apps that
//! still exist. After a SIGKILL nothing of the killed daemon is served.

use std::time::Duration;

use shuffle_client::{ClientOptions, CommitOutcome, ErrorKind, ExchangeMode, ShuffleClient, ShuffleId, ShuffleSpec};
use shuffle_tests::{
    daemon::Daemon,
    exchange::{ExchangeParams, read_partition, read_sorted_partition, verify, write_map, write_map_with},
    workload::{W1_KEY_LEN, W1_VALUE_LEN, W1Totals, w1_partition, w1_record, w3_partition},
};

/// Args of a daemon that spills a good part of what it holds.
const SPILLING: [&str; 4] = ["--memory", "16MiB", "--flush-size", "1MiB"];

fn rejoin(daemon: &Daemon, credentials: &shuffle_client::AppCredentials) -> ClientOptions {
    ClientOptions::joining(credentials).trusted_cert(daemon.cert_path())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_shuffles_are_served_exactly_after_sigterm_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start_in(dir.path(), &SPILLING);
    let client = daemon.connect("durable").await.unwrap();
    let hash = ExchangeParams { records: 120_000, maps: 2, partitions: 4, seed: 41, mode: ExchangeMode::Hash };
    let sort = ExchangeParams { records: 60_000, maps: 3, partitions: 4, seed: 42, mode: ExchangeMode::Sort };
    client.register_shuffle(ShuffleId(0), hash.spec()).await.unwrap();
    client.register_shuffle(ShuffleId(1), ShuffleSpec::sort(sort.maps, sort.partitions, true)).await.unwrap();
    for m in 0..hash.maps {
        assert_eq!(write_map(&client, ShuffleId(0), hash, m, 0).await.unwrap(), CommitOutcome::Committed);
    }
    // Two of three sort maps commit before the restart, the third after it.
    for m in 0..2 {
        let outcome = write_map_with(&client, ShuffleId(1), sort, (m, 0), w3_partition).await.unwrap();
        assert_eq!(outcome, CommitOutcome::Committed);
    }
    let credentials = client.credentials().clone();
    drop(client);
    daemon.terminate();
    assert_eq!(daemon.wait_exit(Duration::from_secs(30)), Some(0));

    let daemon = Daemon::start_in(dir.path(), &SPILLING);
    let client = ShuffleClient::connect(daemon.addr, rejoin(&daemon, &credentials)).await.unwrap();
    let mut total = W1Totals::default();
    for p in 0..hash.partitions {
        total.merge(read_partition(&client, ShuffleId(0), p, hash.partitions).await.unwrap());
    }
    verify(hash, total).unwrap();
    // Map 0 committed before the restart: a new attempt is told at once; map 2 may still commit.
    let again = write_map_with(&client, ShuffleId(1), sort, (0, 1), w3_partition).await.unwrap_err();
    assert_eq!(again.service_kind(), Some(ErrorKind::AttemptSuperseded), "{again}");
    let last = write_map_with(&client, ShuffleId(1), sort, (2, 0), w3_partition).await.unwrap();
    assert_eq!(last, CommitOutcome::Committed);
    let mut total = W1Totals::default();
    for p in 0..sort.partitions {
        total.merge(read_sorted_partition(&client, ShuffleId(1), p, sort.partitions).await.unwrap().totals);
    }
    verify(sort, total).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_sigkill_the_restarted_daemon_serves_nothing_of_the_killed_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start_in(dir.path(), &SPILLING);
    let client = daemon.connect("doomed").await.unwrap();
    let params = ExchangeParams { records: 80_000, maps: 1, partitions: 4, seed: 43, mode: ExchangeMode::Hash };
    client.register_shuffle(ShuffleId(0), params.spec()).await.unwrap();
    write_map(&client, ShuffleId(0), params, 0, 0).await.unwrap();
    let credentials = client.credentials().clone();
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();

    let daemon = Daemon::start_in(dir.path(), &SPILLING);
    let e = ShuffleClient::connect(daemon.addr, rejoin(&daemon, &credentials)).await.err().unwrap();
    assert_eq!(e.service_kind(), Some(ErrorKind::UnknownApp), "{e}");
    assert!(!dir.path().join("apps").join("doomed").exists(), "the killed daemon's files were removed");
}

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
