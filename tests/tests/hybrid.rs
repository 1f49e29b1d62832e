//! Hybrid exchange end to end: pipelined reads, spill, the two spill
//! strategies, producer failure, backpressure and unbounded streams.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use shuffle_client::{ClientError, ClientOptions, CommitOutcome, ShuffleClient, ShuffleId, ShuffleSpec, SpillStrategy};
use shuffle_server::{ByteSize, ServerConfig};
use shuffle_tests::{
    daemon::{Daemon, deleted_data_files_open},
    exchange::{ExchangeParams, read_partition, run_exchange, verify, write_map},
    workload::{W1_KEY_LEN, W1_VALUE_LEN, W1Totals, map_range, w1_partition, w1_record},
};

fn w1(seed: u64, i: u64) -> ([u8; W1_KEY_LEN], [u8; W1_VALUE_LEN]) {
    let (mut k, mut v) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
    w1_record(seed, i, &mut k, &mut v);
    (k, v)
}

/// What the generator puts in `partition` of `partitions` for records `range`.
fn expected_partition(seed: u64, range: std::ops::Range<u64>, partition: u32, partitions: u32) -> W1Totals {
    let mut t = W1Totals::default();
    for i in range {
        let (k, _) = w1(seed, i);
        if w1_partition(&k, partitions) == partition {
            t.add_key(&k);
        }
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w1_exchange_in_hybrid_mode_of_a_million_records_is_exact() {
    let daemon = Daemon::start(&[]);
    let client = daemon.connect("hybrid-w1").await.unwrap();
    let params = ExchangeParams {
        records: 1_000_000,
        maps: 4,
        partitions: 16,
        seed: 42,
        mode: shuffle_client::ExchangeMode::Hybrid,
    };
    let outcome = run_exchange(&client, ShuffleId(0), params).await.unwrap();
    verify(params, outcome.received).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_subscribed_before_the_map_starts_receives_records_before_the_map_ends() {
    let daemon = Daemon::start(&[]);
    let client = daemon.connect("pipelined").await.unwrap();
    client.register_shuffle(ShuffleId(0), ShuffleSpec::hybrid(1, 1, SpillStrategy::Selective)).await.unwrap();
    let first_record = Arc::new(AtomicBool::new(false));
    let map_ended = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn({
        let (client, first_record, map_ended) = (client.clone(), first_record.clone(), map_ended.clone());
        async move {
            let mut reader = client.reader(ShuffleId(0), 0).await.unwrap();
            let mut count = 0u64;
            let mut before_end = None;
            while let Some(_record) = reader.next_record().await.unwrap() {
                if count == 0 {
                    before_end = Some(!map_ended.load(Ordering::SeqCst));
                    first_record.store(true, Ordering::SeqCst);
                }
                count += 1;
            }
            (count, before_end)
        }
    });
    let mut writer = client.writer(ShuffleId(0), 0, 0).await.unwrap();
    for i in 0..10_000 {
        let (k, v) = w1(1, i);
        writer.write(0, &k, &v).await.unwrap();
    }
    writer.flush().await.unwrap();
    // The map is still open: wait (bounded) until the reader has a record.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !first_record.load(Ordering::SeqCst) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(first_record.load(Ordering::SeqCst), "no record reached the reader while the map was writing");
    map_ended.store(true, Ordering::SeqCst);
    assert_eq!(writer.finish().await.unwrap(), CommitOutcome::Committed);
    let (count, before_end) = reader.await.unwrap();
    assert_eq!(count, 10_000);
    assert_eq!(before_end, Some(true), "the first record arrived before MapEnd was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbounded_stream_stays_open_until_its_producers_declare_the_end() {
    let daemon = Daemon::start(&[]);
    let client = daemon.connect("unbounded").await.unwrap();
    client.register_shuffle(ShuffleId(0), ShuffleSpec::hybrid(1, 1, SpillStrategy::Selective)).await.unwrap();
    let mut reader = client.reader(ShuffleId(0), 0).await.unwrap();
    let mut writer = client.writer(ShuffleId(0), 0, 0).await.unwrap();
    writer.write(0, b"k", b"v").await.unwrap();
    writer.flush().await.unwrap();
    assert_eq!(&reader.next_record().await.unwrap().unwrap().key[..], b"k");
    // No more data and no end yet: the read stays pending.
    let pending = tokio::time::timeout(Duration::from_millis(300), reader.next_record()).await;
    assert!(pending.is_err(), "the stream ended or yielded while the producer was still open");
    writer.write(0, b"k2", b"v2").await.unwrap();
    assert_eq!(writer.finish().await.unwrap(), CommitOutcome::Committed);
    assert_eq!(&reader.next_record().await.unwrap().unwrap().key[..], b"k2");
    assert!(reader.next_record().await.unwrap().is_none(), "end-of-stream once the producer ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_reader_makes_the_server_spill_and_still_reads_its_partition_exactly() {
    let daemon = Daemon::start(&["--memory", "16MiB"]);
    let client = daemon.connect("paused").await.unwrap();
    let (records, maps, partitions, seed) = (1_000_000u64, 2u32, 2u32, 21u64);
    let params = ExchangeParams { records, maps, partitions, seed, mode: shuffle_client::ExchangeMode::Hybrid };
    client.register_shuffle(ShuffleId(0), params.spec()).await.unwrap();
    // Partition 0's reader subscribes now but does not read until the maps are done.
    let mut paused = client.reader(ShuffleId(0), 0).await.unwrap();
    let live = tokio::spawn({
        let client = client.clone();
        async move { read_partition(&client, ShuffleId(0), 1, partitions).await.unwrap() }
    });
    for m in 0..maps {
        assert_eq!(write_map(&client, ShuffleId(0), params, m, 0).await.unwrap(), CommitOutcome::Committed);
    }
    let spilled = daemon.shuffle_file_bytes();
    assert!(spilled > 10_000_000, "50 MB for a paused reader under a 16 MiB budget spilled only {spilled} bytes");

    let mut received = W1Totals::default();
    while let Some(block) = paused.next_block().await.unwrap() {
        block.records().for_each(|(k, _)| received.add_key(k));
    }
    assert_eq!(received, expected_partition(seed, 0..records, 0, partitions));
    assert_eq!(live.await.unwrap(), expected_partition(seed, 0..records, 1, partitions));
}

async fn write_w1_hybrid(client: &ShuffleClient, spill: SpillStrategy, shuffle: ShuffleId, params: ExchangeParams) {
    client.register_shuffle(shuffle, ShuffleSpec::hybrid(params.maps, params.partitions, spill)).await.unwrap();
    for m in 0..params.maps {
        assert_eq!(write_map(client, shuffle, params, m, 0).await.unwrap(), CommitOutcome::Committed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_spilling_partitions_can_be_read_again_and_selective_ones_cannot() {
    let daemon = Daemon::start(&[]);
    let client = daemon.connect("reread").await.unwrap();
    let params = ExchangeParams {
        records: 100_000,
        maps: 2,
        partitions: 2,
        seed: 4,
        mode: shuffle_client::ExchangeMode::Hybrid,
    };
    let expected = expected_partition(params.seed, 0..params.records, 0, 2);

    write_w1_hybrid(&client, SpillStrategy::Full, ShuffleId(0), params).await;
    let first = read_partition(&client, ShuffleId(0), 0, 2).await.unwrap();
    let again = read_partition(&client, ShuffleId(0), 0, 2).await.unwrap();
    assert_eq!((first, again), (expected, expected));

    write_w1_hybrid(&client, SpillStrategy::Selective, ShuffleId(1), params).await;
    assert_eq!(read_partition(&client, ShuffleId(1), 0, 2).await.unwrap(), expected);
    let e = read_partition(&client, ShuffleId(1), 0, 2).await.unwrap_err();
    assert!(e.contains("AlreadyConsumed") && e.contains("cannot be read again"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_killed_midway_is_reported_and_with_full_the_reread_after_a_retry_is_exact() {
    let daemon = Daemon::start(&[]);
    let client = daemon.connect("killed").await.unwrap();
    let params = ExchangeParams {
        records: 200_000,
        maps: 2,
        partitions: 2,
        seed: 9,
        mode: shuffle_client::ExchangeMode::Hybrid,
    };
    for (shuffle, spill) in [(ShuffleId(0), SpillStrategy::Full), (ShuffleId(1), SpillStrategy::Selective)] {
        client.register_shuffle(shuffle, ShuffleSpec::hybrid(2, 2, spill)).await.unwrap();
        let mut reader = client.reader(shuffle, 0).await.unwrap();
        let mut doomed = client.writer(shuffle, 0, 0).await.unwrap();
        let range = map_range(params.records, params.maps, 0);
        for i in range.start..range.start + 50_000 {
            let (k, v) = w1(params.seed, i);
            doomed.write(w1_partition(&k, 2), &k, &v).await.unwrap();
        }
        doomed.flush().await.unwrap();
        // The reader receives some of the doomed attempt's records, then it dies.
        assert!(reader.next_block().await.unwrap().is_some());
        doomed.abort();
        let error = loop {
            match reader.next_block().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without reporting the failed producer"),
                Err(e) => break e,
            }
        };
        let rereadable = spill == SpillStrategy::Full;
        assert!(
            matches!(error, ClientError::ProducerFailed { map: 0, attempt: 0, rereadable: r } if r == rereadable),
            "{error}"
        );
        // The retry and the other map commit.
        assert_eq!(write_map(&client, shuffle, params, 0, 1).await.unwrap(), CommitOutcome::Committed);
        assert_eq!(write_map(&client, shuffle, params, 1, 0).await.unwrap(), CommitOutcome::Committed);
        if rereadable {
            let mut total = W1Totals::default();
            for p in 0..2 {
                total.merge(read_partition(&client, shuffle, p, 2).await.unwrap());
            }
            verify(params, total).unwrap();
        } else {
            let e = read_partition(&client, shuffle, 0, 2).await.unwrap_err();
            assert!(e.contains("re-run"), "{e}");
        }
    }
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 =
        status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_outpacing_a_reader_that_does_not_read_is_blocked_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 8u64 << 20;
    let quota = 4u64 << 20;
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        memory: ByteSize(budget),
        flush_size: ByteSize(1 << 20),
        ..ServerConfig::default()
    };
    let server = Arc::new(shuffle_server::start(config).await.unwrap());
    let options = ClientOptions::new("backpressure").trusted_cert(server.cert_path());
    let client = ShuffleClient::connect(server.local_addr(), options).await.unwrap();
    let mut spec = ShuffleSpec::hybrid(1, 1, SpillStrategy::Selective);
    spec.spill_quota = Some(quota);
    client.register_shuffle(ShuffleId(0), spec).await.unwrap();
    let mut reader = client.reader(ShuffleId(0), 0).await.unwrap();

    // 3,000,000 records of 100 bytes: 300 MB, far more than the budget, the
    // quota and every QUIC window between producer and reader together.
    let records = 3_000_000u64;
    let written = Arc::new(AtomicU64::new(0));
    let producer = tokio::spawn({
        let (client, written) = (client.clone(), written.clone());
        async move {
            let mut writer = client.writer(ShuffleId(0), 0, 0).await.unwrap();
            for i in 0..records {
                let (k, v) = w1(77, i);
                writer.write(0, &k, &v).await.unwrap();
                written.store(i + 1, Ordering::Release);
            }
            writer.finish().await.unwrap()
        }
    });
    // Wait until the producer makes no progress for a second.
    let mut last = 0;
    let mut peak_memory = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        peak_memory = peak_memory.max(server.memory_used() as u64);
        let now = written.load(Ordering::Acquire);
        if now == last || Instant::now() > deadline {
            break;
        }
        last = now;
    }
    let stalled_at = written.load(Ordering::Acquire);
    eprintln!("producer blocked after {stalled_at} records; server memory peak {peak_memory} of {budget}");
    assert!(stalled_at < records, "the producer was never blocked");
    assert!(!producer.is_finished());
    assert!(peak_memory <= budget, "server memory {peak_memory} over its budget {budget}");
    let rss = rss_bytes();
    assert!(rss < 1 << 30, "process RSS {rss} bytes while blocked");

    // The reader drains: everything arrives, exactly, and the producer finishes.
    let mut received = W1Totals::default();
    while let Some(block) = reader.next_block().await.unwrap() {
        block.records().for_each(|(k, _)| received.add_key(k));
        peak_memory = peak_memory.max(server.memory_used() as u64);
    }
    assert_eq!(producer.await.unwrap(), CommitOutcome::Committed);
    assert_eq!(received, W1Totals::expected(77, records));
    assert!(peak_memory <= budget, "server memory {peak_memory} over its budget {budget}");
    let spilled = shuffle_tests::daemon::dir_bytes(&dir.path().join("apps"));
    assert!(spilled <= quota, "spilled {spilled} bytes over the quota of {quota}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbounded_stream_of_twenty_times_the_budget_runs_in_flat_memory_and_disk() {
    let budget: u64 = 16 << 20;
    let daemon = Daemon::start(&["--memory", "16MiB", "--flush-size", "1MiB"]);
    let client = daemon.connect("forever").await.unwrap();
    let spec = ShuffleSpec { spill_quota: Some(8 << 20), ..ShuffleSpec::hybrid(1, 2, SpillStrategy::Selective) };
    client.register_shuffle(ShuffleId(0), spec).await.unwrap();
    let target = 20 * budget;
    let written = Arc::new(AtomicU64::new(0));
    let read = Arc::new(AtomicU64::new(0));
    // Two readers that keep up, one of them slowly (it reads from disk when it falls behind).
    let readers: Vec<_> = (0..2u32)
        .map(|p| {
            let (client, read) = (client.clone(), read.clone());
            tokio::spawn(async move {
                let mut reader = client.reader(ShuffleId(0), p).await.unwrap();
                while let Some(block) = reader.next_block().await.unwrap() {
                    read.fetch_add(block.len() as u64, Ordering::AcqRel);
                    if p == 1 {
                        tokio::time::sleep(Duration::from_micros(300)).await;
                    }
                }
            })
        })
        .collect();
    // The producer never sends MapEnd: the stream is unbounded.
    let producer = tokio::spawn({
        let (client, written) = (client.clone(), written.clone());
        async move {
            let mut writer = client.writer(ShuffleId(0), 0, 0).await.unwrap();
            let mut i = 0u64;
            while (i * 100) < target {
                let (k, v) = w1(7, i);
                writer.write((i % 2) as u32, &k, &v).await.unwrap();
                i += 1;
                if i.is_multiple_of(10_000) {
                    writer.flush().await.unwrap();
                    written.store(i, Ordering::Release);
                }
            }
            writer.flush().await.unwrap();
            written.store(i, Ordering::Release);
            writer // kept open: never ended
        }
    });
    let mut samples = Vec::new();
    // Descriptors of deleted segment files that this process (the same-host
    // reader, handed the files) holds: the server tells it to close them.
    let mut deleted_held = 0;
    while !producer.is_finished() {
        let status: serde_json::Value = serde_json::from_str(&daemon.http_get("/status")).unwrap();
        samples.push((
            daemon.rss_bytes(),
            daemon.shuffle_file_bytes(),
            status["memory"]["used_bytes"].as_u64().unwrap(),
        ));
        deleted_held = deleted_held.max(deleted_data_files_open(std::process::id()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _writer = producer.await.unwrap();
    let records = written.load(Ordering::Acquire);
    let deadline = Instant::now() + Duration::from_secs(60);
    while read.load(Ordering::Acquire) < records && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(read.load(Ordering::Acquire), records, "every record written was read");
    let status: serde_json::Value = serde_json::from_str(&daemon.http_get("/status")).unwrap();
    let (spilled, direct) = (
        status["totals"]["spilled_bytes"].as_u64().unwrap(),
        status["totals"]["served_direct_bytes"].as_u64().unwrap(),
    );
    println!(
        "spilled {} MiB, {} MiB of it read from the files directly; at most {deleted_held} deleted files held open",
        spilled >> 20,
        direct >> 20
    );
    // Segments are a quarter of the quota (2 MiB): dozens of them came and went.
    assert!(direct > 40 << 20, "the slow reader read spilled segments from their files: {status}");
    assert!(deleted_held <= 8, "the reader let go of deleted segments: {deleted_held} held at once");
    assert!(samples.len() >= 4, "{samples:?}");
    let half = samples.len() / 2;
    let peak = |s: &[(u64, u64, u64)], f: fn(&(u64, u64, u64)) -> u64| s.iter().map(f).max().unwrap();
    let (early, late) = (&samples[..half], &samples[half..]);
    println!(
        "{} MB streamed: RSS peak {} / {} MiB, disk peak {} / {} MiB, accounted peak {} / {} MiB (first / second half)",
        records * 100 / 1_000_000,
        peak(early, |s| s.0) >> 20,
        peak(late, |s| s.0) >> 20,
        peak(early, |s| s.1) >> 20,
        peak(late, |s| s.1) >> 20,
        peak(early, |s| s.2) >> 20,
        peak(late, |s| s.2) >> 20
    );
    assert!(peak(&samples, |s| s.2) <= budget, "accounted memory within the budget");
    assert!(peak(late, |s| s.0) <= peak(early, |s| s.0) + (16 << 20), "RSS grows with time: {samples:?}");
    // The quota bounds the shuffle's files, read blocks waiting for their segment's deletion included;
    // the app's and the shuffle's manifests are a few hundred bytes.
    assert!(peak(&samples, |s| s.1) <= (8 << 20) + (64 << 10), "disk within the quota: {samples:?}");
    for r in readers {
        r.abort();
    }
}
