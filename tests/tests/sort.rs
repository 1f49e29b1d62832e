//! Sort exchange end to end: W3 through the daemon, W1 with many
//! partitions, runs from bounded sort buffers, and a property test against a
//! plain in-memory group-and-sort.

use std::{
    collections::BTreeMap,
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
};

use proptest::prelude::*;
use shuffle_client::{ClientOptions, CommitOutcome, ExchangeMode, ShuffleClient, ShuffleId, ShuffleSpec};
use shuffle_tests::{
    daemon::Daemon,
    exchange::{ExchangeParams, run_exchange, run_sort, verify},
    workload::{W1_KEY_LEN, W1_VALUE_LEN, W1Totals, w1_record, w3_partition},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w3_sort_of_a_million_records_through_the_daemon_is_key_ordered_and_exact() {
    let daemon = Daemon::start(&[]);
    let client = daemon.connect("w3").await.unwrap();
    let params = ExchangeParams { records: 1_000_000, maps: 4, partitions: 16, seed: 42, mode: ExchangeMode::Sort };
    let outcome = run_sort(&client, ShuffleId(0), params).await.unwrap();
    verify(params, outcome.received).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w1_in_sort_mode_with_2000_partitions_is_exact_and_keeps_one_file_per_map() {
    // A 32 MiB budget puts each map's 25 MB on disk.
    let daemon = Daemon::start(&["--memory", "32MiB"]);
    let client = daemon.connect("wide").await.unwrap();
    let params = ExchangeParams { records: 1_000_000, maps: 4, partitions: 2000, seed: 8, mode: ExchangeMode::Sort };
    let outcome = run_exchange(&client, ShuffleId(7), params).await.unwrap();
    verify(params, outcome.received).unwrap();

    let dir = daemon.data_dir.join("apps/wide/shuffle-7");
    let mut names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    let data: Vec<_> = names.iter().filter(|n| n.ends_with(".data")).collect();
    assert_eq!(data.len(), 4, "one data file per map, not per partition: {names:?}");
    assert_eq!(names.len(), 4, "nothing else: {names:?}");
    assert!(data.iter().all(|n| n.starts_with("map-")), "{names:?}");
}

/// A W1 record's key and value, for writing by hand.
fn w1(seed: u64, i: u64) -> ([u8; W1_KEY_LEN], [u8; W1_VALUE_LEN]) {
    let (mut k, mut v) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
    w1_record(seed, i, &mut k, &mut v);
    (k, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_ten_times_its_sort_buffer_emits_runs_and_stays_bounded() {
    let daemon = Daemon::start(&[]);
    let sort_buffer = 1 << 20;
    let mut options = daemon.options("runs");
    options.sort_buffer = sort_buffer;
    let client = ShuffleClient::connect(daemon.addr, options).await.unwrap();
    for (shuffle, key_ordering) in [(ShuffleId(0), true), (ShuffleId(1), false)] {
        client.register_shuffle(shuffle, ShuffleSpec::sort(1, 4, key_ordering)).await.unwrap();
        let mut writer = client.writer(shuffle, 0, 0).await.unwrap();
        // 100,000 records of 100 bytes plus 16 bytes of sort entry each: 11.6 MB, over ten buffers.
        let records = 100_000u64;
        let mut expected = W1Totals::default();
        for i in 0..records {
            let (k, v) = w1(3, i);
            writer.write(w3_partition(&k, 4), &k, &v).await.unwrap();
            expected.add_key(&k);
            assert!(writer.buffered_bytes() <= sort_buffer, "buffer accounting over its size");
        }
        assert!(writer.runs() >= 10, "only {} runs for 11.6 MB through a 1 MiB buffer", writer.runs());
        assert!(writer.peak_buffered_bytes() <= sort_buffer);
        assert_eq!(writer.finish().await.unwrap(), CommitOutcome::Committed);

        let mut received = W1Totals::default();
        for p in 0..4 {
            let mut reader = client.reader(shuffle, p).await.unwrap();
            let mut previous: Option<bytes::Bytes> = None;
            while let Some(r) = reader.next_record().await.unwrap() {
                if key_ordering {
                    assert!(previous.as_ref().is_none_or(|prev| *prev <= r.key), "partition {p} out of key order");
                }
                received.add_key(&r.key);
                previous = Some(r.key);
            }
        }
        assert_eq!(received, expected, "key_ordering = {key_ordering}");
    }
}

/// An embedded server shared by the property test's cases.
struct Harness {
    runtime: tokio::runtime::Runtime,
    addr: std::net::SocketAddr,
    cert: std::path::PathBuf,
    _server: shuffle_server::ServerHandle,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let config = shuffle_server::ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            flush_size: shuffle_server::ByteSize(16 << 10),
            ..Default::default()
        };
        let server = runtime.block_on(shuffle_server::start(config)).unwrap();
        Harness {
            addr: server.local_addr(),
            cert: server.cert_path().to_path_buf(),
            runtime,
            _server: server,
            _dir: dir,
        }
    })
}

type Records = Vec<(u32, Vec<u8>, Vec<u8>)>;

/// Per partition, its records as (key, value).
type ByPartition = BTreeMap<u32, Vec<(Vec<u8>, Vec<u8>)>>;

/// Writes `records` (partition, key, value) round-robin over `maps` maps
/// through a sort shuffle and reads every partition back.
async fn sort_through_the_service(
    records: &Records,
    maps: u32,
    partitions: u32,
    key_ordering: bool,
    (sort_buffer, block_size): (usize, usize),
) -> ByPartition {
    static NEXT_SHUFFLE: AtomicU32 = AtomicU32::new(0);
    let h = harness();
    let shuffle = ShuffleId(NEXT_SHUFFLE.fetch_add(1, Ordering::Relaxed));
    let mut options = ClientOptions::new(format!("proptest-{}", shuffle.0)).trusted_cert(&h.cert);
    (options.sort_buffer, options.block_size) = (sort_buffer, block_size);
    let client = ShuffleClient::connect(h.addr, options).await.unwrap();
    client.register_shuffle(shuffle, ShuffleSpec::sort(maps, partitions, key_ordering)).await.unwrap();
    for m in 0..maps {
        let mut writer = client.writer(shuffle, m, 0).await.unwrap();
        for (p, k, v) in records.iter().skip(m as usize).step_by(maps as usize) {
            writer.write(*p, k, v).await.unwrap();
        }
        assert_eq!(writer.finish().await.unwrap(), CommitOutcome::Committed);
    }
    let mut out = BTreeMap::new();
    for p in 0..partitions {
        let mut reader = client.reader(shuffle, p).await.unwrap();
        let mut got = Vec::new();
        while let Some(r) = reader.next_record().await.unwrap() {
            got.push((r.key.to_vec(), r.value.to_vec()));
        }
        out.insert(p, got);
    }
    client.unregister_shuffle(shuffle).await.unwrap();
    out
}

fn records_strategy() -> impl Strategy<Value = (u32, Records)> {
    (1u32..24).prop_flat_map(|partitions| {
        let record =
            (0..partitions, proptest::collection::vec(0u8..4, 0..12), proptest::collection::vec(any::<u8>(), 0..300));
        (Just(partitions), proptest::collection::vec(record, 0..1500))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn sort_mode_output_per_partition_equals_an_in_memory_group_and_sort(
        (partitions, records) in records_strategy(),
        maps in 1u32..4,
        key_ordering in any::<bool>(),
        sort_buffer in 4096usize..64 * 1024,
        block_size in 1024usize..8192,
    ) {
        let got = harness().runtime.block_on(
            sort_through_the_service(&records, maps, partitions, key_ordering, (sort_buffer, block_size)),
        );
        let mut reference: ByPartition = (0..partitions).map(|p| (p, Vec::new())).collect();
        for (p, k, v) in &records {
            reference.get_mut(p).unwrap().push((k.clone(), v.clone()));
        }
        for (p, mut want) in reference {
            let mut have = got[&p].clone();
            if key_ordering {
                prop_assert!(have.windows(2).all(|w| w[0].0 <= w[1].0), "partition {} not in key order", p);
            }
            // Records with equal keys may come in any order: compare as multisets.
            want.sort();
            have.sort();
            prop_assert_eq!(have, want, "partition {}", p);
        }
    }
}

/// Key-ordered reads break ties by map, then by the writer's run, then by
/// the order the writer wrote: the output is one exact sequence, over QUIC
/// and over the Unix socket with direct reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_keys_come_out_by_map_then_run_then_write_order_on_both_transports() {
    // A small budget spills the maps' early runs, so both memory and file blocks are merged.
    let daemon = Daemon::start(&["--memory", "4MiB", "--flush-size", "64KiB"]);
    for same_host in [false, true] {
        let mut options = daemon.options(&format!("ties-{same_host}")).same_host(same_host);
        (options.sort_buffer, options.block_size) = (16 << 10, 2 << 10);
        let client = ShuffleClient::connect(daemon.addr, options).await.unwrap();
        assert_eq!(client.unix_socket().is_some(), same_host);
        client.register_shuffle(ShuffleId(0), ShuffleSpec::sort(3, 2, true)).await.unwrap();
        // Every map writes keys 0..7 over and over; the value says who wrote it when.
        let mut written = Vec::new();
        for map in 0..3u32 {
            let mut writer = client.writer(ShuffleId(0), map, 0).await.unwrap();
            for seq in 0..6_000u32 {
                let key = [(seq.wrapping_mul(2_654_435_761) >> 29) as u8];
                let value = [map.to_be_bytes(), seq.to_be_bytes()].concat();
                writer.write(u32::from(key[0] % 2), &key, &value).await.unwrap();
                written.push((key[0] % 2, key.to_vec(), map, seq, value));
            }
            assert!(writer.runs() > 3, "map {map} wrote {} runs", writer.runs());
            assert_eq!(writer.finish().await.unwrap(), CommitOutcome::Committed);
        }
        // Within a map, the runs are in write order, so (map, seq) is (map, run, write order).
        written.sort_by(|a, b| (a.0, &a.1, a.2, a.3).cmp(&(b.0, &b.1, b.2, b.3)));
        for p in 0..2u8 {
            let want: Vec<(Vec<u8>, Vec<u8>)> =
                written.iter().filter(|w| w.0 == p).map(|w| (w.1.clone(), w.4.clone())).collect();
            let mut reader = client.reader(ShuffleId(0), u32::from(p)).await.unwrap();
            let mut got = Vec::new();
            while let Some(r) = reader.next_record().await.unwrap() {
                got.push((r.key.to_vec(), r.value.to_vec()));
            }
            assert_eq!(got.len(), want.len(), "partition {p}, same_host {same_host}");
            assert!(got == want, "partition {p}, same_host {same_host}: not in (key, map, run, write) order");
        }
        client.unregister_app().await.unwrap();
    }
}

/// A reader whose budget cannot hold a block of every run says so, naming
/// the runs and the budget, instead of reading past its budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_ordered_read_over_its_budget_fails_naming_the_runs_and_the_budget() {
    let daemon = Daemon::start(&[]);
    let mut options = daemon.options("tight");
    options.sort_buffer = 8 << 10;
    let client = ShuffleClient::connect(daemon.addr, options).await.unwrap();
    client.register_shuffle(ShuffleId(0), ShuffleSpec::sort(1, 1, true)).await.unwrap();
    let mut writer = client.writer(ShuffleId(0), 0, 0).await.unwrap();
    for i in 0..2_000u32 {
        writer.write(0, &i.to_le_bytes(), &[7; 60]).await.unwrap();
    }
    let writer_runs = writer.runs() as usize;
    writer.finish().await.unwrap();
    // Every full buffer was a run, and finishing wrote the last one.
    let runs = writer_runs + 1;
    assert!(runs >= 10);
    let mut reader = client.reader(ShuffleId(0), 0).await.unwrap();
    reader.set_merge_memory(256 << 10);
    let e = reader.next_record().await.unwrap_err();
    match &e {
        shuffle_client::ClientError::MergeMemory { runs: n, budget, .. } => {
            assert_eq!((*n, *budget), (runs, 256 << 10));
        }
        other => panic!("expected MergeMemory, got {other}"),
    }
    assert!(e.to_string().contains(&format!("merging the {runs} sorted runs")), "{e}");
    // With room for a block of each run, the same partition reads in order.
    let mut reader = client.reader(ShuffleId(0), 0).await.unwrap();
    reader.set_merge_memory(runs * shuffle_client::MERGE_BLOCK_BYTES);
    let mut keys = Vec::new();
    while let Some(r) = reader.next_record().await.unwrap() {
        keys.push(r.key.to_vec());
    }
    assert_eq!(keys.len(), 2_000);
    assert!(keys.windows(2).all(|w| w[0] <= w[1]));
}
