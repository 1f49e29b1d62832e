//! The commit rule end to end: retried and duplicate map attempts, against
//! the daemon as a child process.

use shuffle_client::{CommitOutcome, ShuffleClient, ShuffleId, ShuffleSpec};
use shuffle_tests::{
    daemon::Daemon,
    exchange::{ExchangeParams, read_partition, verify, write_map},
    workload::{W1_KEY_LEN, W1_VALUE_LEN, W1Totals, map_range, w1_partition, w1_record},
};

const PARAMS: ExchangeParams =
    ExchangeParams { records: 200_000, maps: 4, partitions: 8, seed: 7, mode: shuffle_client::ExchangeMode::Hash };

async fn read_all(client: &ShuffleClient, shuffle: ShuffleId) -> W1Totals {
    let mut total = W1Totals::default();
    for p in 0..PARAMS.partitions {
        total.merge(read_partition(client, shuffle, p, PARAMS.partitions).await.unwrap());
    }
    total
}

/// Both modes with a commit rule: hash, and sort with key ordering.
fn specs() -> [ShuffleSpec; 2] {
    [ShuffleSpec::hash(PARAMS.maps, PARAMS.partitions), ShuffleSpec::sort(PARAMS.maps, PARAMS.partitions, true)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_pushes_half_and_never_finishes_is_invisible_after_a_retry_commits() {
    let daemon = Daemon::start(&[]);
    let client = daemon.connect("retry").await.unwrap();
    for (shuffle, spec) in [ShuffleId(3), ShuffleId(4)].into_iter().zip(specs()) {
        retry_after_a_stuck_attempt(&client, shuffle, spec).await;
    }
}

async fn retry_after_a_stuck_attempt(client: &ShuffleClient, shuffle: ShuffleId, spec: ShuffleSpec) {
    client.register_shuffle(shuffle, spec).await.unwrap();

    // Attempt 0 of map 0 pushes half of its records (well over one block per
    // partition, so blocks reach the server) and is never finished.
    let mut stuck = client.writer(shuffle, 0, 0).await.unwrap();
    let range = map_range(PARAMS.records, PARAMS.maps, 0);
    let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
    for i in range.start..range.start + (range.end - range.start) / 2 {
        w1_record(PARAMS.seed, i, &mut key, &mut value);
        stuck.write(w1_partition(&key, PARAMS.partitions), &key, &value).await.unwrap();
    }
    if spec.mode == shuffle_client::ExchangeMode::Hash {
        assert!(stuck.buffered_bytes() < 2_500_000, "most of the half was pushed, not buffered");
    }

    assert_eq!(write_map(client, shuffle, PARAMS, 0, 1).await.unwrap(), CommitOutcome::Committed);
    for m in 1..PARAMS.maps {
        assert_eq!(write_map(client, shuffle, PARAMS, m, 0).await.unwrap(), CommitOutcome::Committed);
    }
    // Read while the stuck attempt is still open: exactly one copy of map 0.
    verify(PARAMS, read_all(client, shuffle).await).unwrap();
    drop(stuck);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_attempts_that_both_finish_the_second_is_refused_and_never_read() {
    // A small budget puts the attempts' blocks on disk.
    let daemon = Daemon::start(&["--memory", "8MiB", "--flush-size", "1MiB"]);
    let client = daemon.connect("duplicate").await.unwrap();
    for (shuffle, spec) in [ShuffleId(5), ShuffleId(6)].into_iter().zip(specs()) {
        speculative_attempts(&client, shuffle, spec).await;
    }
    // The refused sort attempt's file is gone; committed maps keep theirs.
    let dir = daemon.data_dir.join("apps/duplicate/shuffle-6");
    let names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.contains("attempt-6")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("map-") && n.ends_with(".data")), "{names:?}");
}

async fn speculative_attempts(client: &ShuffleClient, shuffle: ShuffleId, spec: ShuffleSpec) {
    client.register_shuffle(shuffle, spec).await.unwrap();
    // Attempts 5 and 6 of map 2 run side by side (speculative execution):
    // both write everything, 5 finishes first and commits, 6 is refused.
    let mut first = client.writer(shuffle, 2, 5).await.unwrap();
    let mut second = client.writer(shuffle, 2, 6).await.unwrap();
    let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
    for i in map_range(PARAMS.records, PARAMS.maps, 2) {
        w1_record(PARAMS.seed, i, &mut key, &mut value);
        let p = w1_partition(&key, PARAMS.partitions);
        first.write(p, &key, &value).await.unwrap();
        second.write(p, &key, &value).await.unwrap();
    }
    assert_eq!(first.finish().await.unwrap(), CommitOutcome::Committed);
    assert_eq!(second.finish().await.unwrap(), CommitOutcome::Refused { committed_attempt: 5 });
    // An attempt that starts after the map committed is told at once.
    let e = client.writer(shuffle, 2, 7).await.err().unwrap();
    assert_eq!(e.service_kind(), Some(shuffle_client::ErrorKind::AttemptSuperseded), "{e}");
    for m in [0, 1, 3] {
        assert_eq!(write_map(client, shuffle, PARAMS, m, 0).await.unwrap(), CommitOutcome::Committed);
    }
    // The refused attempt wrote the same records again: had any of them been
    // served, the count and key sum would not match.
    verify(PARAMS, read_all(client, shuffle).await).unwrap();
}
