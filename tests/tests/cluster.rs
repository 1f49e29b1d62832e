//! Cluster mode end to end: a coordinator and three workers as child
//! processes on 127.0.0.1–127.0.0.4, real QUIC between them and to the
//! client (a client on the workers' host moves to their Unix sockets).

use shuffle_client::{ExchangeMode, ShuffleId};
use shuffle_tests::{
    cluster::Cluster,
    exchange::{ExchangeParams, run_exchange_as, verify},
};

const W1: ExchangeParams =
    ExchangeParams { records: 1_000_000, maps: 6, partitions: 12, seed: 71, mode: ExchangeMode::Hash };

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn w1_across_a_coordinator_and_three_workers_is_exact_in_every_mode_with_one_or_two_copies() {
    let cluster = Cluster::start(3, &[]);
    let client = cluster.connect("w1-cluster").await.unwrap();
    assert!(client.is_cluster());
    let mut id = 0;
    for mode in [ExchangeMode::Hash, ExchangeMode::Sort, ExchangeMode::Hybrid] {
        for replication in [1, 2] {
            id += 1;
            let params = ExchangeParams { mode, seed: W1.seed + id, ..W1 };
            let spec = params.spec().replicated(replication);
            let outcome = run_exchange_as(&client, ShuffleId(id as u32), params, spec)
                .await
                .unwrap_or_else(|e| panic!("{mode:?} replication {replication}: {e}"));
            verify(params, outcome.received).unwrap_or_else(|e| panic!("{mode:?} replication {replication}: {e}"));
        }
    }
    // The coordinator's status lists every worker with its state, heartbeat,
    // memory, disk and the shuffles it holds; its metrics the totals.
    let status = cluster.status();
    let workers = status["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 3, "{status}");
    for w in workers {
        assert_eq!(w["state"], "Live", "{w}");
        assert!(w["last_heartbeat_seconds_ago"].as_f64().unwrap() < 5.0, "{w}");
        assert!(w["memory_budget_bytes"].as_u64().unwrap() > 0, "{w}");
        assert!(w["memory_used_bytes"].is_u64() && w["disk_free_bytes"].as_u64().unwrap() > 0, "{w}");
        assert_eq!(w["shuffles_held"], 6, "every shuffle has a group on every worker: {w}");
    }
    let metrics = cluster.coordinator().http_get("/metrics");
    for line in [
        "shuffle_cluster_workers{state=\"live\"} 3",
        "shuffle_cluster_shuffles 6",
        "shuffle_cluster_decisions_total 36",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    // Every worker held some of it.
    let status = cluster.status();
    for w in status["workers"].as_array().unwrap() {
        assert!(w["shuffles_held"].as_u64().unwrap() > 0, "{w}");
    }
    // The workers share a host: primaries forwarded to their replicas on the replicas' Unix sockets.
    let (mut unix, mut quic) = (0, 0);
    for i in 0..3 {
        let status: serde_json::Value = serde_json::from_str(&cluster.worker(i).http_get("/status")).unwrap();
        unix += status["replica_streams"]["unix"].as_u64().unwrap();
        quic += status["replica_streams"]["quic"].as_u64().unwrap();
    }
    // Three modes, six maps, each map's attempt forwarded for every replicated group it pushed to.
    assert!(unix >= 3 * 6 && quic == 0, "forwarding streams: {unix} on Unix sockets, {quic} over QUIC");
}

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use shuffle_client::{ClientError, CommitOutcome, ShuffleClient, ShuffleSpec};
use shuffle_tests::{
    exchange::{read_partition, write_map},
    workload::{W1_KEY_LEN, W1_VALUE_LEN, W1Totals, map_range, splitmix64, w1_record},
};

/// Seeds of the fault tests: the one in `SHUFFLE_TEST_SEED`, or the time.
fn seed() -> u64 {
    let seed = std::env::var("SHUFFLE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("seed {seed} (rerun with SHUFFLE_TEST_SEED={seed})");
    seed
}

/// Runs W1's maps (attempt 0) as tasks; `committed` counts those done.
fn spawn_maps(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    params: ExchangeParams,
    committed: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<Result<CommitOutcome, ClientError>>> {
    (0..params.maps)
        .map(|m| {
            let (client, committed) = (client.clone(), committed.clone());
            tokio::spawn(async move {
                let outcome = write_map(&client, shuffle, params, m, 0).await;
                committed.fetch_add(1, Ordering::AcqRel);
                outcome
            })
        })
        .collect()
}

/// Reads every partition, counting blocks read in `blocks`.
async fn read_all(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    params: ExchangeParams,
    blocks: &Arc<AtomicU64>,
) -> W1Totals {
    let readers: Vec<_> = (0..params.partitions)
        .map(|p| {
            let (client, blocks) = (client.clone(), blocks.clone());
            tokio::spawn(async move {
                let mut reader = client.reader(shuffle, p).await.map_err(|e| e.to_string())?;
                let mut totals = W1Totals::default();
                while let Some(block) = reader.next_block().await.map_err(|e| format!("partition {p}: {e}"))? {
                    for (key, _) in block.records() {
                        totals.add_key(key);
                    }
                    blocks.fetch_add(1, Ordering::AcqRel);
                }
                Ok::<_, String>(totals)
            })
        })
        .collect();
    let mut totals = W1Totals::default();
    for r in readers {
        totals.merge(r.await.unwrap().unwrap());
    }
    totals
}

async fn wait_for(counter: &AtomicU64, at_least: u64) {
    while counter.load(Ordering::Acquire) < at_least {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_two_copies_a_worker_killed_while_maps_push_loses_nothing_and_reruns_nothing() {
    let seed = seed();
    for (i, mode) in [ExchangeMode::Hash, ExchangeMode::Sort, ExchangeMode::Hybrid].into_iter().enumerate() {
        let mut cluster = Cluster::start(3, &[]);
        let client = cluster.connect("kill-maps").await.unwrap();
        let params = ExchangeParams { records: 600_000, maps: 6, partitions: 12, seed: seed ^ i as u64, mode };
        let shuffle = ShuffleId(1);
        client.register_shuffle(shuffle, params.spec().replicated(2)).await.unwrap();
        let committed = Arc::new(AtomicU64::new(0));
        let maps = spawn_maps(&client, shuffle, params, &committed);
        let blocks = Arc::new(AtomicU64::new(0));
        let reading = {
            let (client, blocks) = (client.clone(), blocks.clone());
            tokio::spawn(async move { read_all(&client, shuffle, params, &blocks).await })
        };
        let victim = (splitmix64(seed + i as u64) % 3) as usize;
        let after = splitmix64(seed ^ 0x5eed) % u64::from(params.maps - 1);
        wait_for(&committed, after).await;
        println!("{mode:?}: killing worker {victim} after {after} maps committed");
        cluster.kill_worker(victim);
        for (m, task) in maps.into_iter().enumerate() {
            // Every map's first attempt commits: nothing runs again.
            assert_eq!(task.await.unwrap().unwrap(), CommitOutcome::Committed, "{mode:?} map {m}");
        }
        let received = reading.await.unwrap();
        verify(params, received).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_two_copies_a_worker_killed_while_readers_read_loses_nothing() {
    let seed = seed();
    for (i, mode) in [ExchangeMode::Hash, ExchangeMode::Sort].into_iter().enumerate() {
        let mut cluster = Cluster::start(3, &[]);
        let client = cluster.connect("kill-reads").await.unwrap();
        let params = ExchangeParams { records: 600_000, maps: 4, partitions: 12, seed: seed ^ (7 + i as u64), mode };
        let shuffle = ShuffleId(1);
        client.register_shuffle(shuffle, params.spec().replicated(2)).await.unwrap();
        let committed = Arc::new(AtomicU64::new(0));
        for task in spawn_maps(&client, shuffle, params, &committed) {
            assert_eq!(task.await.unwrap().unwrap(), CommitOutcome::Committed);
        }
        let blocks = Arc::new(AtomicU64::new(0));
        let reading = {
            let (client, blocks) = (client.clone(), blocks.clone());
            tokio::spawn(async move { read_all(&client, shuffle, params, &blocks).await })
        };
        let victim = (splitmix64(seed + 11 + i as u64) % 3) as usize;
        let after = 1 + splitmix64(seed ^ 0xb10c) % 200;
        wait_for(&blocks, after).await;
        println!("{mode:?}: killing worker {victim} after {after} blocks were read");
        cluster.kill_worker(victim);
        verify(params, reading.await.unwrap()).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    }
}

/// Map `m` of a skewed W1 writes only to partitions `p` with `p % maps == m`,
/// so losing a worker loses exactly the maps of its partitions.
async fn write_skewed(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    params: ExchangeParams,
    (m, attempt): (u32, u32),
) -> CommitOutcome {
    let mut writer = client.writer(shuffle, m, attempt).await.unwrap();
    let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
    let per_map = params.partitions / params.maps;
    for i in map_range(params.records, params.maps, m) {
        w1_record(params.seed, i, &mut key, &mut value);
        let p = (splitmix64(i) % u64::from(per_map)) as u32 * params.maps + m;
        writer.write(p, &key, &value).await.unwrap();
    }
    writer.finish().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_one_copy_readers_name_exactly_the_lost_maps_and_their_re_runs_repair_the_shuffle() {
    let seed = seed();
    let mut cluster = Cluster::start(3, &[]);
    let client = cluster.connect("lost-maps").await.unwrap();
    let params = ExchangeParams { records: 240_000, maps: 6, partitions: 12, seed, mode: ExchangeMode::Hash };
    let shuffle = ShuffleId(1);
    client.register_shuffle(shuffle, params.spec()).await.unwrap();
    for m in 0..params.maps {
        assert_eq!(write_skewed(&client, shuffle, params, (m, 0)).await, CommitOutcome::Committed);
    }
    let placement = client.placement(shuffle).await.unwrap().unwrap();
    let victim = (splitmix64(seed) % 3) as usize;
    let victim_id = format!("w{victim}");
    let index = placement.index_of(&victim_id).expect("every worker holds a group");
    let lost_partitions: Vec<u32> =
        (0..params.partitions).filter(|p| placement.group_of(*p).unwrap().1.copies == vec![index]).collect();
    let expected: BTreeSet<u32> = lost_partitions.iter().map(|p| p % params.maps).collect();
    println!("killing {victim_id}, which holds partitions {lost_partitions:?} of maps {expected:?}");
    cluster.kill_worker(victim);

    // Every partition of the lost worker names exactly its maps; the others read.
    let mut lost = BTreeSet::new();
    for p in 0..params.partitions {
        let read = async {
            let mut reader = client.reader(shuffle, p).await?;
            while reader.next_block().await?.is_some() {}
            Ok::<_, ClientError>(())
        };
        match read.await {
            Ok(()) => assert!(!lost_partitions.contains(&p), "partition {p} was on the lost worker"),
            Err(ClientError::PartitionLost { partition, maps, .. }) => {
                assert_eq!(partition, p);
                assert!(lost_partitions.contains(&p), "partition {p} was not on the lost worker");
                lost.extend(maps);
            }
            Err(e) => panic!("partition {p}: {e}"),
        }
    }
    assert_eq!(lost, expected);
    // Re-running exactly those maps (new attempts) repairs the shuffle; the others stay committed.
    for m in 0..params.maps {
        let rerun = client.writer(shuffle, m, 1).await;
        if expected.contains(&m) {
            drop(rerun.unwrap());
            assert_eq!(write_skewed(&client, shuffle, params, (m, 1)).await, CommitOutcome::Committed);
        } else {
            let e = rerun.err().expect("a map that lost nothing is not re-run");
            assert_eq!(e.service_kind(), Some(shuffle_client::ErrorKind::AttemptSuperseded), "{e}");
        }
    }
    let blocks = Arc::new(AtomicU64::new(0));
    verify(params, read_all(&client, shuffle, params, &blocks).await).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_attempts_of_a_map_finishing_in_any_order_commit_one_attempt_everywhere() {
    let seed = seed();
    let cluster = Cluster::start(3, &[]);
    let client = cluster.connect("attempts").await.unwrap();
    for round in 0..4u32 {
        let shuffle = ShuffleId(round);
        let params = ExchangeParams {
            records: 60_000,
            maps: 1,
            partitions: 6,
            seed: seed + u64::from(round),
            mode: ExchangeMode::Hash,
        };
        client.register_shuffle(shuffle, params.spec()).await.unwrap();
        // Two attempts write different values for the same records, to every worker.
        let mut writers = Vec::new();
        for attempt in 0..2u32 {
            let mut w = client.writer(shuffle, 0, attempt).await.unwrap();
            let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
            for i in 0..params.records {
                w1_record(params.seed, i, &mut key, &mut value);
                value[0] = b'a' + attempt as u8;
                w.write(shuffle_tests::workload::w1_partition(&key, params.partitions), &key, &value).await.unwrap();
            }
            writers.push(w);
        }
        // Their MapEnds reach the workers in an order the seed picks, or all at once.
        let (w1, w0) = (writers.pop().unwrap(), writers.pop().unwrap());
        let outcomes = match splitmix64(seed ^ u64::from(round)) % 3 {
            0 => (w0.finish().await.unwrap(), w1.finish().await.unwrap()),
            1 => {
                let b = w1.finish().await.unwrap();
                (w0.finish().await.unwrap(), b)
            }
            _ => {
                let (a, b) = tokio::join!(w0.finish(), w1.finish());
                (a.unwrap(), b.unwrap())
            }
        };
        let winner = match outcomes {
            (CommitOutcome::Committed, CommitOutcome::Refused { committed_attempt: 0 }) => 0u8,
            (CommitOutcome::Refused { committed_attempt: 1 }, CommitOutcome::Committed) => 1u8,
            other => panic!("round {round}: not exactly one winner: {other:?}"),
        };
        // Every partition, on every worker, holds the winner's records only.
        let mut records = 0;
        for p in 0..params.partitions {
            let mut reader = client.reader(shuffle, p).await.unwrap();
            while let Some(block) = reader.next_block().await.unwrap() {
                for (_, value) in block.records() {
                    assert_eq!(value[0], b'a' + winner, "round {round}: partition {p} holds the other attempt");
                    records += 1;
                }
            }
        }
        assert_eq!(records, params.records);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_killed_and_restarted_mid_job_loses_no_commit() {
    let seed = seed();
    let mut cluster = Cluster::start(3, &[]);
    let client = cluster.connect("coordinator-restart").await.unwrap();
    for (i, replication) in [1u8, 2].into_iter().enumerate() {
        let shuffle = ShuffleId(i as u32);
        let params = ExchangeParams {
            records: 600_000,
            maps: 8,
            partitions: 12,
            seed: seed + i as u64,
            mode: ExchangeMode::Hash,
        };
        client.register_shuffle(shuffle, params.spec().replicated(replication)).await.unwrap();
        let committed = Arc::new(AtomicU64::new(0));
        let maps = spawn_maps(&client, shuffle, params, &committed);
        let after = 1 + splitmix64(seed ^ i as u64) % u64::from(params.maps - 2);
        wait_for(&committed, after).await;
        println!("replication {replication}: killing the coordinator after {after} maps committed");
        cluster.kill_coordinator();
        // A task started while the coordinator is down joins the app: it
        // waits until the coordinator is back and has learnt the app from
        // its workers, then reads everything.
        let options = cluster.options("coordinator-restart").secret(client.credentials().secret.clone());
        let joining = tokio::spawn(ShuffleClient::connect(cluster.coordinator_addr, options));
        let down = Duration::from_millis(200 + splitmix64(seed) % 800);
        tokio::time::sleep(down).await;
        assert!(!joining.is_finished(), "a joining client waits for the coordinator");
        cluster.start_coordinator();
        for task in maps {
            assert_eq!(task.await.unwrap().unwrap(), CommitOutcome::Committed);
        }
        let blocks = Arc::new(AtomicU64::new(0));
        verify(params, read_all(&client, shuffle, params, &blocks).await).unwrap();
        let joined = joining.await.unwrap().expect("the task joins once the coordinator is back");
        verify(params, read_all(&joined, shuffle, params, &blocks).await).unwrap();
        joined.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_worker_is_lost_takes_no_new_shuffle_and_rejoins_when_it_is_back() {
    let cluster = Cluster::start(3, &[]);
    let client = cluster.connect("silent").await.unwrap();
    let params = ExchangeParams { records: 50_000, maps: 2, partitions: 6, seed: 3, mode: ExchangeMode::Hash };
    client.register_shuffle(ShuffleId(1), params.spec()).await.unwrap();
    cluster.signal_worker(2, libc::SIGSTOP);
    cluster.wait_until(Duration::from_secs(10), "w2 lost", |c| c.worker_state("w2").as_deref() == Some("Lost"));
    client.register_shuffle(ShuffleId(2), params.spec()).await.unwrap();
    let placement = client.placement(ShuffleId(2)).await.unwrap().unwrap();
    assert!(placement.workers.iter().all(|w| w.id != "w2"), "a lost worker takes no new shuffle: {placement:?}");
    // Back, it registers again with what it holds; its copies were moved, so it drops them.
    cluster.signal_worker(2, libc::SIGCONT);
    cluster.wait_until(Duration::from_secs(10), "w2 live", |c| c.worker_state("w2").as_deref() == Some("Live"));
    let worker_status: serde_json::Value = serde_json::from_str(&cluster.worker(2).http_get("/status")).unwrap();
    cluster.wait_until(Duration::from_secs(10), "w2 to drop its moved copies", |c| {
        let s: serde_json::Value = serde_json::from_str(&c.worker(2).http_get("/status")).unwrap();
        s["apps"].as_array().is_none_or(|a| a.iter().all(|a| a["shuffles"].as_array().is_none_or(|s| s.is_empty())))
    });
    let _ = worker_status;
    // Both shuffles still run exactly on the others.
    for id in [1, 2] {
        let outcome = run_exchange_as(&client, ShuffleId(id), params, params.spec()).await.unwrap();
        verify(params, outcome.received).unwrap();
    }
    // And new shuffles may land on it again.
    client.register_shuffle(ShuffleId(3), ShuffleSpec::hash(1, 30)).await.unwrap();
    let placement = client.placement(ShuffleId(3)).await.unwrap().unwrap();
    assert!(placement.workers.iter().any(|w| w.id == "w2"), "{placement:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_a_worker_keeps_its_committed_shuffles() {
    let mut cluster = Cluster::start_with_timeout(3, &[], "10s");
    let client = cluster.connect("rolling").await.unwrap();
    let params = ExchangeParams { records: 300_000, maps: 3, partitions: 9, seed: 5, mode: ExchangeMode::Sort };
    let shuffle = ShuffleId(1);
    client.register_shuffle(shuffle, params.spec()).await.unwrap();
    let committed = Arc::new(AtomicU64::new(0));
    for task in spawn_maps(&client, shuffle, params, &committed) {
        assert_eq!(task.await.unwrap().unwrap(), CommitOutcome::Committed);
    }
    for i in 0..3 {
        assert_eq!(cluster.stop_worker(i), Some(0), "SIGTERM drains and exits 0");
        cluster.start_worker(i);
        cluster.wait_for_workers(3);
    }
    for p in 0..params.partitions {
        read_partition(&client, shuffle, p, params.partitions).await.unwrap();
    }
    let blocks = Arc::new(AtomicU64::new(0));
    verify(params, read_all(&client, shuffle, params, &blocks).await).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_decommissioned_worker_takes_nothing_new_lets_its_readers_finish_and_exits_zero() {
    let mut cluster = Cluster::start(3, &[]);
    let client = cluster.connect("decommission").await.unwrap();
    let params = ExchangeParams { records: 600_000, maps: 4, partitions: 12, seed: 9, mode: ExchangeMode::Hash };
    let shuffle = ShuffleId(1);
    client.register_shuffle(shuffle, params.spec()).await.unwrap();
    let committed = Arc::new(AtomicU64::new(0));
    let maps = spawn_maps(&client, shuffle, params, &committed);
    let blocks = Arc::new(AtomicU64::new(0));
    let reading = {
        let (client, blocks) = (client.clone(), blocks.clone());
        tokio::spawn(async move { read_all(&client, shuffle, params, &blocks).await })
    };
    wait_for(&committed, 1).await;
    cluster.worker(1).http("POST", "/decommission");
    cluster.wait_until(Duration::from_secs(10), "w1 decommissioning", |c| {
        c.worker_state("w1").as_deref() == Some("Decommissioning")
    });
    client.register_shuffle(ShuffleId(2), ShuffleSpec::hash(1, 30)).await.unwrap();
    let placement = client.placement(ShuffleId(2)).await.unwrap().unwrap();
    assert!(placement.workers.iter().all(|w| w.id != "w1"), "no new shuffle on a draining worker");
    for task in maps {
        assert_eq!(task.await.unwrap().unwrap(), CommitOutcome::Committed);
    }
    verify(params, reading.await.unwrap()).unwrap();
    // Still needed until the job lets go of its shuffle; then it exits 0.
    assert_eq!(cluster.worker_mut(1).wait_exit(Duration::from_millis(300)), None);
    client.unregister_shuffle(shuffle).await.unwrap();
    assert_eq!(cluster.worker_mut(1).wait_exit(Duration::from_secs(20)), Some(0));
}

/// The engine's batch executor, connected to the coordinator, loses a
/// worker (replication 1) after its map phase: it re-runs exactly the maps
/// whose blocks were on it and the job's result is exact.
#[test]
fn with_one_copy_the_engine_re_runs_exactly_the_lost_maps_and_ends_exact() {
    use engine_adapter::{Engine, EngineOptions, ExecutionMode, hash_partition};
    use std::sync::{Mutex, atomic::AtomicU32};

    const MAPS: u32 = 6;
    const PARTITIONS: u32 = 12;
    const RECORDS: u64 = 60_000;
    let seed = seed();
    let cluster = Arc::new(Mutex::new(Cluster::start(3, &[])));
    let (addr, options) = {
        let c = cluster.lock().unwrap();
        (c.coordinator_addr, c.options(""))
    };
    // Map m emits one key, in partition 2m: each map writes one partition.
    let keys: Vec<u64> =
        (0..MAPS).map(|m| (0u64..).find(|k| hash_partition(k, PARTITIONS).unwrap() == 2 * m).unwrap()).collect();
    let first_of = |m: u32| u64::from(m) * RECORDS / u64::from(MAPS);
    let runs: Arc<Vec<AtomicU32>> = Arc::new((0..MAPS).map(|_| AtomicU32::new(0)).collect());
    let engine = Engine::builder()
        .client(options.clone())
        .options(EngineOptions { batch_task_slots: 1, ..EngineOptions::default() })
        .connect(addr)
        .unwrap();
    assert_eq!(engine.transport(), "cluster");

    let expected_lost: Arc<Mutex<Option<BTreeSet<u32>>>> = Arc::default();
    let hook = {
        let (cluster, expected_lost) = (cluster.clone(), expected_lost.clone());
        let credentials = engine.credentials().clone();
        let options = options.clone();
        move |key: u64| {
            let mut expected = expected_lost.lock().unwrap();
            if expected.is_some() {
                return;
            }
            // The map phase is over and this part was read: find where the
            // unread partitions live, and kill a worker that holds some.
            let mut join = options.clone();
            join.app = credentials.app.clone();
            join.secret = Some(credentials.secret.clone());
            let placement = std::thread::spawn(move || {
                let rt = tokio::runtime::Runtime::new().unwrap();
                rt.block_on(async {
                    let client = ShuffleClient::connect(addr, join).await.unwrap();
                    client.placement(ShuffleId(1)).await.unwrap().expect("the job's shuffle is placed")
                })
            })
            .join()
            .unwrap();
            let read = hash_partition(&key, PARTITIONS).unwrap();
            let (read_group, _) = placement.group_of(read).unwrap();
            let candidates: Vec<(usize, BTreeSet<u32>)> = (0..3usize)
                .filter_map(|w| {
                    let index = placement.index_of(&format!("w{w}"))?;
                    let lost: BTreeSet<u32> = (0..MAPS)
                        .filter(|m| {
                            let (g, group) = placement.group_of(2 * m).unwrap();
                            group.copies == vec![index] && g != read_group
                        })
                        .collect();
                    (!lost.is_empty() && placement.group_of(read).unwrap().1.copies != vec![index]).then_some((w, lost))
                })
                .collect();
            assert!(!candidates.is_empty(), "no worker holds unread data: {placement:?}");
            let (victim, lost) = candidates[(splitmix64(seed) % candidates.len() as u64) as usize].clone();
            println!("killing w{victim} after partition {read} was read; its maps {lost:?} are lost");
            cluster.lock().unwrap().kill_worker(victim);
            *expected = Some(lost);
        }
    };
    let counted = runs.clone();
    let want: HashMap<u64, u64> = (0..MAPS).map(|m| (keys[m as usize], first_of(m + 1) - first_of(m))).collect();
    let result: HashMap<u64, u64> = engine
        .generate(RECORDS, MAPS, move |i| {
            let m = (0..MAPS).rev().find(|m| i >= first_of(*m)).unwrap();
            if i == first_of(m) {
                counted[m as usize].fetch_add(1, Ordering::Relaxed);
            }
            (keys[m as usize], 1u64)
        })
        .reduce_by_key(|a, b| a + b, PARTITIONS)
        .map(move |(k, v)| {
            hook(k);
            (k, v)
        })
        .collect(ExecutionMode::Batch)
        .unwrap()
        .into_iter()
        .collect();
    // Exact: every map's records counted once.
    assert_eq!(result, want);
    // Exactly the lost maps ran again, once each; the others ran once.
    let lost = expected_lost.lock().unwrap().clone().expect("a worker was killed");
    let reran: BTreeSet<u32> = (0..MAPS).filter(|m| runs[*m as usize].load(Ordering::Relaxed) > 1).collect();
    assert_eq!(reran, lost, "maps run again");
    assert!(runs.iter().all(|r| r.load(Ordering::Relaxed) <= 2));
    let reruns = engine.map_reruns();
    assert_eq!(reruns.len(), 1, "{reruns:?}");
    assert_eq!(reruns[0].maps.iter().copied().collect::<BTreeSet<u32>>(), lost);
}

// ---- key-ordered reads (W3) across the cluster ----

use shuffle_client::{ClientOptions, PartitionReader};
use shuffle_tests::{
    exchange::write_map_with,
    workload::{W1_RECORD_LEN, w3_partition},
};

/// One W1 record, key then value.
type W1Record = [u8; W1_RECORD_LEN];

/// W3's input, as each partition must come out: every record of `params`
/// (range-partitioned by key), sorted. A W1 key determines its value, so
/// equal keys are equal records and the sorted order is the only one.
fn w3_expected(params: ExchangeParams) -> Vec<Vec<W1Record>> {
    let mut parts = vec![Vec::new(); params.partitions as usize];
    let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
    for i in 0..params.records {
        w1_record(params.seed, i, &mut key, &mut value);
        let mut record = [0u8; W1_RECORD_LEN];
        record[..W1_KEY_LEN].copy_from_slice(&key);
        record[W1_KEY_LEN..].copy_from_slice(&value);
        parts[w3_partition(&key, params.partitions) as usize].push(record);
    }
    parts.iter_mut().for_each(|p| p.sort_unstable());
    parts
}

/// A reader that stops after `at` records, says where it reads
/// (`paused`: partition, worker) and waits for `go` before going on.
struct Pause {
    at: u64,
    paused: tokio::sync::mpsc::UnboundedSender<(u32, Option<String>)>,
    go: tokio::sync::watch::Receiver<bool>,
}

/// Reads partition `p` in key order, every record as it came; with
/// `pause`, stops once on the way. Returns the records and the worker read last.
async fn read_by_key(
    mut reader: PartitionReader,
    p: u32,
    merge_memory: usize,
    mut pause: Option<Pause>,
) -> Result<(Vec<W1Record>, Option<String>), String> {
    reader.set_merge_memory(merge_memory);
    let mut out = Vec::new();
    loop {
        if let Some(Pause { at, paused, go }) = &mut pause
            && out.len() as u64 == *at
        {
            paused.send((p, reader.worker().map(str::to_string))).unwrap();
            go.wait_for(|go| *go).await.unwrap();
            pause = None;
        }
        let Some(record) = reader.next_record().await.map_err(|e| format!("partition {p}: {e}"))? else { break };
        let mut r = [0u8; W1_RECORD_LEN];
        if record.key.len() != W1_KEY_LEN || record.value.len() != W1_VALUE_LEN {
            return Err(format!("partition {p}: a record of {}+{} bytes", record.key.len(), record.value.len()));
        }
        r[..W1_KEY_LEN].copy_from_slice(&record.key);
        r[W1_KEY_LEN..].copy_from_slice(&record.value);
        out.push(r);
    }
    Ok((out, reader.worker().map(str::to_string)))
}

/// Checks one partition's records against the input: in key order and
/// exactly the input's records of the partition, each once.
fn check_sorted_and_exact(what: &str, p: usize, got: &[W1Record], want: &[W1Record]) {
    if let Some(i) = got.windows(2).position(|w| w[0][..W1_KEY_LEN] > w[1][..W1_KEY_LEN]) {
        panic!("{what}: partition {p} is out of key order at record {i}");
    }
    assert_eq!(got.len(), want.len(), "{what}: partition {p} has {} records, the input {}", got.len(), want.len());
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        panic!("{what}: partition {p} differs from the input at record {i}");
    }
}

/// A client of `cluster` whose writers emit small sorted runs (so every
/// partition merges a few runs of each map).
async fn connect_with_small_runs(cluster: &Cluster, app: &str, same_host: bool) -> ShuffleClient {
    let mut options: ClientOptions = cluster.options(app).same_host(same_host);
    options.sort_buffer = 1 << 20;
    ShuffleClient::connect(cluster.coordinator_addr, options).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_ordered_sort_reads_across_the_cluster_are_sorted_and_exact_with_one_or_two_copies() {
    let cluster = Cluster::start(3, &[]);
    // One copy over QUIC to the workers, two over their Unix sockets (direct reads).
    for (replication, same_host) in [(1u8, false), (2, true)] {
        let client = connect_with_small_runs(&cluster, &format!("w3-cluster-{replication}"), same_host).await;
        let params = ExchangeParams {
            records: 200_000,
            maps: 4,
            partitions: 6,
            seed: 31 + u64::from(replication),
            mode: ExchangeMode::Sort,
        };
        let what = format!("replication {replication}");
        let shuffle = ShuffleId(1);
        let spec = ShuffleSpec::sort(params.maps, params.partitions, true).replicated(replication);
        client.register_shuffle(shuffle, spec).await.unwrap();
        // Readers start with the maps, as W3's do.
        let readers: Vec<_> = (0..params.partitions)
            .map(|p| {
                let client = client.clone();
                tokio::spawn(async move {
                    let reader = client.reader(shuffle, p).await.map_err(|e| e.to_string())?;
                    read_by_key(reader, p, shuffle_client::DEFAULT_MERGE_MEMORY, None).await
                })
            })
            .collect();
        for m in 0..params.maps {
            let outcome = write_map_with(&client, shuffle, params, (m, 0), w3_partition).await.unwrap();
            assert_eq!(outcome, CommitOutcome::Committed, "{what}: map {m}");
        }
        let expected = w3_expected(params);
        for (p, task) in readers.into_iter().enumerate() {
            let (got, _) = task.await.unwrap().unwrap_or_else(|e| panic!("{what}: {e}"));
            check_sorted_and_exact(&what, p, &got, &expected[p]);
        }
        let placement = client.placement(shuffle).await.unwrap().unwrap();
        assert!(placement.groups.iter().all(|g| g.copies.len() == usize::from(replication)), "{placement:?}");
        client.unregister_shuffle(shuffle).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_two_copies_a_worker_killed_during_key_ordered_reads_loses_and_repeats_nothing() {
    let seed = seed();
    let mut cluster = Cluster::start(3, &[]);
    let client = connect_with_small_runs(&cluster, "w3-kill-reads", true).await;
    let params = ExchangeParams { records: 200_000, maps: 4, partitions: 6, seed, mode: ExchangeMode::Sort };
    let shuffle = ShuffleId(1);
    client
        .register_shuffle(shuffle, ShuffleSpec::sort(params.maps, params.partitions, true).replicated(2))
        .await
        .unwrap();
    for m in 0..params.maps {
        let outcome = write_map_with(&client, shuffle, params, (m, 0), w3_partition).await.unwrap();
        assert_eq!(outcome, CommitOutcome::Committed, "map {m}");
    }
    let expected = Arc::new(w3_expected(params));
    // Each reader stops at a seeded record between a tenth and a half of its
    // partition. It merges holding about one block of each run, so what is
    // left comes chunk by chunk from the worker it reads, or after the kill
    // from the other copy.
    let (paused_tx, mut paused) = tokio::sync::mpsc::unbounded_channel();
    let (go_tx, go) = tokio::sync::watch::channel(false);
    let mut readers = Vec::new();
    for p in 0..params.partitions {
        let len = expected[p as usize].len() as u64;
        let at = len / 10 + splitmix64(seed ^ (0x3ead + u64::from(p))) % (len / 2 - len / 10).max(1);
        let pause = Pause { at, paused: paused_tx.clone(), go: go.clone() };
        let client = client.clone();
        readers.push(tokio::spawn(async move {
            let reader = client.reader(shuffle, p).await.map_err(|e| e.to_string())?;
            read_by_key(reader, p, 40 * shuffle_client::MERGE_BLOCK_BYTES, Some(pause)).await
        }));
    }
    let mut reading_at = std::collections::BTreeMap::new();
    for _ in 0..params.partitions {
        let (p, worker) = paused.recv().await.unwrap();
        reading_at.insert(p, worker.expect("a paused key-ordered read reads at a worker"));
    }
    // The victim is a worker some readers read at: they must go on at the other copy.
    let serving: BTreeSet<&String> = reading_at.values().collect();
    let victim = (*serving.iter().nth((splitmix64(seed) % serving.len() as u64) as usize).unwrap()).clone();
    let on_victim: BTreeSet<u32> = reading_at.iter().filter(|(_, w)| **w == victim).map(|(p, _)| *p).collect();
    println!("readers paused at {reading_at:?}; killing {victim}, which partitions {on_victim:?} read from");
    cluster.kill_worker(victim.trim_start_matches('w').parse().unwrap());
    go_tx.send(true).unwrap();
    let mut moved = 0;
    for (p, task) in readers.into_iter().enumerate() {
        let (got, last) = task.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        check_sorted_and_exact("after the kill", p, &got, &expected[p]);
        if on_victim.contains(&(p as u32)) && last.as_ref().is_some_and(|w| *w != victim) {
            moved += 1;
        }
    }
    assert!(moved > 0, "no reader of {victim} went on at another copy");
}

/// The engine connected to a coordinator, with two copies of every block
/// (`Engine::builder().replication(2)`): `sort_by_key` reads key-ordered
/// sort exchanges at the workers, and a worker SIGKILLed while the sorted
/// partitions are read costs no map re-run and no reducer starting over;
/// the output is sorted and exact.
#[test]
fn the_engine_sort_by_key_on_a_cluster_with_two_copies_is_exact_through_a_worker_kill() {
    use engine_adapter::{Engine, EngineOptions, ExecutionMode};
    use std::sync::Mutex;

    const RECORDS: u64 = 300_000;
    const PARTS: u32 = 4;
    const PARTITIONS: u32 = 6;
    let seed = seed();
    let cluster = Arc::new(Mutex::new(Cluster::start(3, &[])));
    let (addr, options) = {
        let c = cluster.lock().unwrap();
        (c.coordinator_addr, c.options(""))
    };
    // Every reducer at once, each merging within a small budget (about two
    // blocks of each run at a time), so they are mid-read at the kill.
    let tuning = EngineOptions { memory: 8 << 20, batch_task_slots: PARTITIONS as usize, ..EngineOptions::default() };
    let engine = Engine::builder().client(options).options(tuning).replication(2).connect(addr).unwrap();
    assert_eq!(engine.transport(), "cluster");
    let record = move |i: u64| (splitmix64(seed ^ i) % (RECORDS / 2), format!("value {i}"));
    let mut expected: Vec<(u64, String)> = (0..RECORDS).map(record).collect();
    expected.sort();

    // On the first sorted record a reducer sees, the job's shuffles are
    // checked for two copies and a seeded worker is killed.
    let victim = (splitmix64(seed ^ 0x50f7) % 3) as usize;
    let checked: Arc<Mutex<Option<Vec<u64>>>> = Arc::default();
    let emitted = Arc::new(AtomicU64::new(0));
    let hook = {
        let (cluster, checked, emitted) = (cluster.clone(), checked.clone(), emitted.clone());
        move || {
            emitted.fetch_add(1, Ordering::Relaxed);
            let mut checked = checked.lock().unwrap();
            if checked.is_some() {
                return;
            }
            let mut cluster = cluster.lock().unwrap();
            let status = cluster.status();
            let replication: Vec<u64> = status["apps"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|a| a["shuffles"].as_array().unwrap().iter())
                .map(|s| s["replication"].as_u64().unwrap())
                .collect();
            println!("the job's shuffles have {replication:?} copies; killing w{victim}");
            cluster.kill_worker(victim);
            *checked = Some(replication);
        }
    };
    let sorted = engine
        .generate(RECORDS, PARTS, record)
        .sort_by_key(PARTITIONS)
        .map(move |r| {
            hook();
            r
        })
        .collect(ExecutionMode::Batch)
        .unwrap();
    let replication = checked.lock().unwrap().clone().expect("the hook ran");
    assert!(!replication.is_empty() && replication.iter().all(|r| *r == 2), "copies per shuffle: {replication:?}");
    assert!(sorted.windows(2).all(|w| w[0].0 <= w[1].0), "not in key order");
    let mut got = sorted;
    // Records of equal keys may come in any order between maps' runs.
    got.sort();
    assert!(got == expected, "the records differ from the input");
    assert!(engine.map_reruns().is_empty(), "with two copies nothing runs again: {:?}", engine.map_reruns());
    // A reducer that started over would have passed records through twice.
    assert_eq!(emitted.load(Ordering::Relaxed), RECORDS, "every reducer read its partition once");
}

/// A cluster client reconnects to a restarted coordinator on a connection
/// of its own; `close` closes that one too, so it returns (it used to wait
/// for the endpoint to go idle, which the keep-alive of the open
/// connection prevented forever). Found by `shuffle-chaos --cluster --seed 3`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_reconnected_to_a_restarted_coordinator_closes_promptly() {
    let mut cluster = Cluster::start(3, &[]);
    let client = cluster.connect("close-after-restart").await.unwrap();
    client.register_shuffle(ShuffleId(1), ShuffleSpec::hash(1, 6)).await.unwrap();
    cluster.kill_coordinator();
    cluster.start_coordinator();
    // A request after the restart makes the client reconnect.
    client.register_shuffle(ShuffleId(2), ShuffleSpec::hash(1, 6)).await.unwrap();
    let params = ExchangeParams { records: 10_000, maps: 1, partitions: 6, seed: 4, mode: ExchangeMode::Hash };
    let outcome = run_exchange_as(&client, ShuffleId(3), params, params.spec()).await.unwrap();
    verify(params, outcome.received).unwrap();
    tokio::time::timeout(Duration::from_secs(10), client.close())
        .await
        .expect("close returns once its connections, the new coordinator connection included, are closed");
}

/// Hybrid, one copy: a reader holds blocks of a map attempt that was
/// pushing to a worker when it was killed; the group moves, the map runs
/// again and commits there. The reader, resumed at the new copy, must be
/// told its producer failed (and read again from the start), not be sent
/// the new attempt's blocks on top and fail the integrity check. Found by
/// `shuffle-chaos --cluster --seed 26`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hybrid_reader_resumed_after_its_producer_died_with_the_worker_reads_again() {
    let mut cluster = Cluster::start(3, &[]);
    let client = cluster.connect("hybrid-resume").await.unwrap();
    let (shuffle, partitions) = (ShuffleId(1), 3u32);
    let spec = ShuffleSpec::hybrid(1, partitions, shuffle_client::SpillStrategy::Full);
    client.register_shuffle(shuffle, spec).await.unwrap();
    let placement = client.placement(shuffle).await.unwrap().unwrap();
    let p = 0;
    let (_, group) = placement.group_of(p).unwrap();
    let victim_id = placement.worker(group.copies[0]).unwrap().id.clone();
    let victim: usize = victim_id.trim_start_matches('w').parse().unwrap();
    // Partition p's records, written by attempt `attempt` (all of them unless `flush_only`).
    let records: Vec<([u8; W1_KEY_LEN], [u8; W1_VALUE_LEN])> = (0..200_000u64)
        .filter_map(|i| {
            let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
            w1_record(17, i, &mut key, &mut value);
            (shuffle_tests::workload::w1_partition(&key, partitions) == p).then_some((key, value))
        })
        .take(20_000)
        .collect();
    let mut first = client.writer(shuffle, 0, 0).await.unwrap();
    for (key, value) in &records {
        first.write(p, key, value).await.unwrap();
    }
    first.flush().await.unwrap();
    let mut reader = client.reader(shuffle, p).await.unwrap();
    assert!(reader.next_block().await.unwrap().is_some(), "attempt 0's blocks stream to the reader");
    println!("killing {victim_id}, which holds partition {p}, while attempt 0 of map 0 is open");
    cluster.kill_worker(victim);
    first.abort();
    // The map runs again once the coordinator has moved the group.
    let mut attempt = 1;
    loop {
        let run = async {
            let mut w = client.writer(shuffle, 0, attempt).await?;
            for (key, value) in &records {
                w.write(p, key, value).await?;
            }
            w.finish().await
        };
        match run.await {
            Ok(outcome) => {
                assert_eq!(outcome, CommitOutcome::Committed);
                break;
            }
            Err(e)
                if attempt < 40
                    && (e.is_unreachable() || e.service_kind() == Some(shuffle_client::ErrorKind::DataLost)) =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
                attempt += 1;
            }
            Err(e) => panic!("attempt {attempt}: {e}"),
        }
    }
    // The reader fails over to the new copy: its producer, attempt 0, failed.
    let end = loop {
        match reader.next_block().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    match end {
        Err(ClientError::ProducerFailed { map: 0, attempt: 0, rereadable: true }) => {}
        other => panic!("expected ProducerFailed for map 0 attempt 0, got {other:?}"),
    }
    // Read again from the start: exactly the committed attempt's records.
    let mut reader = client.reader(shuffle, p).await.unwrap();
    let mut got = 0;
    while let Some(block) = reader.next_block().await.unwrap() {
        got += block.records().count();
    }
    assert_eq!(got, records.len());
}

/// A rolling restart as `a_rolling_restart_of_a_worker_keeps_its_committed_shuffles`,
/// with the client on QUIC (not the workers' Unix sockets): the connection it
/// kept to a restarted worker is closed, and it must connect again instead
/// of giving up on the worker's only copy. Found by `shuffle-chaos --cluster --seed 48`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_rolling_restart_a_quic_client_reconnects_to_the_worker_and_reads_exactly() {
    let mut cluster = Cluster::start_with_timeout(3, &[], "10s");
    let client = ShuffleClient::connect(cluster.coordinator_addr, cluster.options("rolling-quic").same_host(false))
        .await
        .unwrap();
    let params = ExchangeParams { records: 200_000, maps: 3, partitions: 9, seed: 6, mode: ExchangeMode::Sort };
    let shuffle = ShuffleId(1);
    client.register_shuffle(shuffle, params.spec()).await.unwrap();
    let committed = Arc::new(AtomicU64::new(0));
    for task in spawn_maps(&client, shuffle, params, &committed) {
        assert_eq!(task.await.unwrap().unwrap(), CommitOutcome::Committed);
    }
    for i in 0..3 {
        assert_eq!(cluster.stop_worker(i), Some(0), "SIGTERM drains and exits 0");
        cluster.start_worker(i);
        let id = format!("w{i}");
        cluster.wait_until(Duration::from_secs(30), &format!("{id} registered again"), |c| {
            c.status()["workers"].as_array().is_some_and(|ws| {
                ws.iter().any(|w| w["id"] == id.as_str() && w["state"] == "Live" && w["connected"] == true)
            })
        });
    }
    let blocks = Arc::new(AtomicU64::new(0));
    verify(params, read_all(&client, shuffle, params, &blocks).await).unwrap();
}

/// Workers without Unix sockets (`--unix-socket off`, as on separate hosts)
/// forward to their replicas over QUIC, and the result is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_without_unix_sockets_forward_to_replicas_over_quic() {
    let cluster = Cluster::start(2, &["--unix-socket", "off"]);
    let client = cluster.connect("forward-quic").await.unwrap();
    let params = ExchangeParams { records: 100_000, maps: 4, partitions: 6, seed: 5, mode: ExchangeMode::Hash };
    let outcome = run_exchange_as(&client, ShuffleId(1), params, params.spec().replicated(2)).await.unwrap();
    verify(params, outcome.received).unwrap();
    let (mut unix, mut quic) = (0, 0);
    for i in 0..2 {
        let status: serde_json::Value = serde_json::from_str(&cluster.worker(i).http_get("/status")).unwrap();
        unix += status["replica_streams"]["unix"].as_u64().unwrap();
        quic += status["replica_streams"]["quic"].as_u64().unwrap();
    }
    assert!(quic >= 4 && unix == 0, "forwarding streams: {unix} on Unix sockets, {quic} over QUIC");
}

/// The value of the unlabelled metric `name` in a `/metrics` page, if it is there.
fn metric(page: &str, name: &str) -> Option<u64> {
    page.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok()).map(|v| v as u64)
}

/// W1's records of map `map` with their partitions, in the order it writes them.
fn map_records(params: ExchangeParams, map: u32) -> Vec<(u32, [u8; W1_KEY_LEN], [u8; W1_VALUE_LEN])> {
    map_range(params.records, params.maps, map)
        .map(|r| {
            let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
            w1_record(params.seed, r, &mut key, &mut value);
            (shuffle_tests::workload::w1_partition(&key, params.partitions), key, value)
        })
        .collect()
}

/// How a test cuts a worker off.
#[derive(Clone, Copy, Debug, PartialEq)]
enum CutOff {
    /// SIGSTOP until the coordinator reports it lost, then SIGCONT.
    Stop,
    /// A network partition (`POST /fault/partition`, the worker started
    /// with `--fault-injection`): its datagrams dropped and its Unix
    /// streams closed while it runs on.
    Partition,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_two_copies_a_writer_pushing_to_a_worker_cut_off_past_the_time_out_commits_at_the_replica() {
    // A primary cut off (SIGSTOP) past the worker time-out is declared lost
    // and, back (SIGCONT), drops the shuffle when it registers again. A
    // writer whose push stream to it is open then hears that the worker no
    // longer holds the shuffle, and must move to the replica with the blocks
    // not yet held by both copies rather than fail. Over QUIC and over the
    // Unix sockets alike.
    cut_off_primary_mid_map(CutOff::Stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_two_copies_a_writer_pushing_to_a_worker_partitioned_past_the_time_out_commits_at_the_replica() {
    // As above with a network partition: the primary runs on while no
    // datagram reaches or leaves it, its timers fire, its forwarding to the
    // replica breaks, and its Unix streams are closed.
    cut_off_primary_mid_map(CutOff::Partition).await;
}

async fn cut_off_primary_mid_map(how: CutOff) {
    let seed = seed();
    for (i, same_host) in [false, true].into_iter().enumerate() {
        let cluster = Cluster::start(3, if how == CutOff::Partition { &["--fault-injection"] } else { &[] });
        let mut options = cluster.options(&format!("cut-off-{i}")).same_host(same_host);
        options.block_size = 16 << 10;
        let client = ShuffleClient::connect(cluster.coordinator_addr, options).await.unwrap();
        let params = ExchangeParams {
            records: 200_000,
            maps: 2,
            partitions: 6,
            seed: seed ^ i as u64,
            mode: ExchangeMode::Hash,
        };
        let shuffle = ShuffleId(1);
        client.register_shuffle(shuffle, params.spec().replicated(2)).await.unwrap();
        let placement = client.placement(shuffle).await.unwrap().unwrap();
        // The victim: the primary of a seeded group, whose records map 0
        // writes half before the cut-off and half once the victim is back.
        let group = (splitmix64(seed + i as u64) % placement.groups.len() as u64) as u32;
        let victim_id = placement.worker(placement.groups[group as usize].copies[0]).unwrap().id.clone();
        let victim: usize = victim_id.trim_start_matches('w').parse().unwrap();
        println!(
            "same host {same_host}: cutting off {victim_id} ({how:?}), the primary of group {group}, while map 0 pushes"
        );
        let records = map_records(params, 0);
        let (early, late): (Vec<_>, Vec<_>) = records
            .iter()
            .enumerate()
            .partition(|(n, (p, _, _))| placement.partition_groups[*p as usize] != group || *n < records.len() / 2);
        let mut writer = client.writer(shuffle, 0, 0).await.unwrap();
        for (_, (p, key, value)) in early {
            writer.write(*p, key, value).await.unwrap();
        }
        match how {
            CutOff::Stop => cluster.signal_worker(victim, libc::SIGSTOP),
            // Long enough to be seen lost; it ends by itself.
            CutOff::Partition => {
                cluster.worker(victim).http("POST", "/fault/partition?millis=4000");
            }
        }
        cluster.wait_until(Duration::from_secs(10), "the cut-off worker lost", |c| {
            c.worker_state(&victim_id).as_deref() == Some("Lost")
        });
        if how == CutOff::Stop {
            cluster.signal_worker(victim, libc::SIGCONT);
        }
        cluster.wait_until(Duration::from_secs(10), "the cut-off worker back without the shuffle", |c| {
            let s: serde_json::Value = serde_json::from_str(&c.worker(victim).http_get("/status")).unwrap();
            c.worker_state(&victim_id).as_deref() == Some("Live")
                && s["apps"]
                    .as_array()
                    .is_none_or(|a| a.iter().all(|a| a["shuffles"].as_array().is_none_or(|s| s.is_empty())))
        });
        for (_, (p, key, value)) in late {
            writer.write(*p, key, value).await.unwrap_or_else(|e| panic!("same host {same_host}: map 0: {e}"));
        }
        let outcome = writer.finish().await.unwrap_or_else(|e| panic!("same host {same_host}: map 0: {e}"));
        assert_eq!(outcome, CommitOutcome::Committed, "same host {same_host}");
        assert_eq!(write_map(&client, shuffle, params, 1, 0).await.unwrap(), CommitOutcome::Committed);
        let received = read_all(&client, shuffle, params, &Arc::new(AtomicU64::new(0))).await;
        verify(params, received).unwrap_or_else(|e| panic!("same host {same_host}: {e}"));
        client.close().await;
    }
}

/// Hybrid readers stream from the primaries of their partitions while map
/// 0 pushes; a short partition of one primary (too short for the
/// coordinator to declare it lost) closes the writer's Unix stream to it,
/// and the writer commits the map at the replica. The decision then tells
/// the primary that it lacks the committed attempt's blocks: the readers
/// streaming from it must get `DataLost` mid-stream and read the rest from
/// the replica (their streams used to end naming an attempt they were never
/// sent: an integrity error), and must keep the client's connection to the
/// primary, which is alive (readers used to report it unreachable and drop
/// the connection that the client's other reads used). The readers use
/// QUIC, whose connection outlives the partition. The victim is also the
/// replica of another group, whose primary verifies map 0's end and then,
/// its forwarding broken, answers `Unavailable`: the writer commits at the
/// victim, and the primary must keep the attempt's blocks (it used to drop
/// them and then record totals for blocks it no longer had: an integrity
/// error); it must do so once its probe finds the victim answering again,
/// not after three worker time-outs. Found by `shuffle-chaos --cluster
/// --seed 12`; each of the three fixes undone fails this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hybrid_readers_of_a_copy_found_to_lack_a_committed_map_read_it_from_the_other_copy_on_the_same_connection() {
    let seed = seed();
    let cluster = Cluster::start(3, &["--fault-injection"]);
    let mut options = cluster.options("lacking").same_host(true);
    options.block_size = 16 << 10;
    let writers = ShuffleClient::connect(cluster.coordinator_addr, options).await.unwrap();
    let options = cluster.options("lacking").secret(writers.credentials().secret.clone()).same_host(false);
    let readers = ShuffleClient::connect(cluster.coordinator_addr, options).await.unwrap();
    let params = ExchangeParams { records: 200_000, maps: 2, partitions: 6, seed, mode: ExchangeMode::Hybrid };
    let shuffle = ShuffleId(1);
    let spec = ShuffleSpec::hybrid(params.maps, params.partitions, shuffle_client::SpillStrategy::Full).replicated(2);
    writers.register_shuffle(shuffle, spec).await.unwrap();
    let placement = writers.placement(shuffle).await.unwrap().unwrap();
    let group = (splitmix64(seed) % placement.groups.len() as u64) as u32;
    let copies = &placement.groups[group as usize].copies;
    let victim_id = placement.worker(copies[0]).unwrap().id.clone();
    let replica_id = placement.worker(copies[1]).unwrap().id.clone();
    let victim: usize = victim_id.trim_start_matches('w').parse().unwrap();
    let victim_partitions: Vec<u32> =
        (0..params.partitions).filter(|p| placement.partition_groups[*p as usize] == group).collect();
    println!(
        "partitioning {victim_id}, the primary of group {group} (partitions {victim_partitions:?}), while map 0 pushes"
    );
    let blocks = Arc::new(AtomicU64::new(0));
    // Each partition's reader, reading again from the start when told that
    // a producer it read from failed (the primary takes the writer's broken
    // stream for a failed attempt), as hybrid readers of full spilling may.
    let reading: Vec<_> = (0..params.partitions)
        .map(|p| {
            let (readers, blocks) = (readers.clone(), blocks.clone());
            tokio::spawn(async move {
                'again: loop {
                    let mut reader = readers.reader(shuffle, p).await.unwrap();
                    let mut totals = W1Totals::default();
                    loop {
                        match reader.next_block().await {
                            Ok(Some(block)) => {
                                block.records().for_each(|(key, _)| totals.add_key(key));
                                blocks.fetch_add(1, Ordering::AcqRel);
                            }
                            Ok(None) => return totals,
                            Err(ClientError::ProducerFailed { rereadable: true, .. }) => continue 'again,
                            Err(e) => panic!("partition {p}: {e}"),
                        }
                    }
                }
            })
        })
        .collect();
    let records = map_records(params, 0);
    let (early, late) = records.split_at(records.len() / 2);
    let mut writer = writers.writer(shuffle, 0, 0).await.unwrap();
    for (p, key, value) in early {
        writer.write(*p, key, value).await.unwrap();
    }
    writer.flush().await.unwrap();
    // The readers stream map 0's blocks.
    tokio::time::timeout(Duration::from_secs(30), wait_for(&blocks, 1)).await.expect("no block read in 30 s");
    cluster.worker(victim).http("POST", "/fault/partition?millis=250");
    // Past the partition and the back-off of the heartbeat it held up: the
    // writer's report of the victim (on its next write) must find the
    // victim's heartbeats fresh, or the coordinator would declare it lost.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (p, key, value) in late {
        writer.write(*p, key, value).await.unwrap_or_else(|e| panic!("map 0: {e}"));
    }
    assert_eq!(writer.finish().await.unwrap(), CommitOutcome::Committed);
    // The other group's primary found the victim answering its probe again
    // and sent the writer on at once, rather than after three worker time-outs.
    let back: u64 = (0..cluster.workers.len())
        .filter(|i| *i != victim)
        .filter_map(|i| metric(&cluster.worker(i).http_get("/metrics"), "shuffle_cluster_replicas_back_total"))
        .sum();
    assert!(back >= 1, "no primary saw its replica {victim_id} answer again after the partition");
    assert_eq!(write_map(&writers, shuffle, params, 1, 0).await.unwrap(), CommitOutcome::Committed);
    let mut received = W1Totals::default();
    for r in reading {
        received.merge(r.await.unwrap());
    }
    verify(params, received).unwrap();
    let coordinator = cluster.coordinator.as_ref().unwrap().http_get("/metrics");
    assert!(
        coordinator.lines().any(|l| l == "shuffle_cluster_workers_lost_total 0"),
        "the partition was meant to be too short for the coordinator to declare {victim_id} lost:\n{coordinator}"
    );
    // The primary answered DataLost, so the readers did read the replica.
    let lost = cluster.worker(victim).http_get("/metrics");
    assert!(
        lost.lines().any(|l| l.starts_with("shuffle_errors_total{kind=\"DataLost\"}")),
        "{victim_id} never told a reader that it lacks map 0:\n{lost}"
    );
    // Reading everything again goes to the primary first once more, on the
    // connection the client kept, and again on to the replica.
    verify(params, read_all(&readers, shuffle, params, &blocks).await).unwrap();
    for worker in [&victim_id, &replica_id] {
        assert_eq!(readers.worker_connects(worker), 1, "the readers' connections to {worker}");
    }
    writers.close().await;
    readers.close().await;
}

/// A primary whose forwarding to its replica broke (the replica cut off
/// for 1.5 s) verifies the attempt's `MapEnd` while the replica is away,
/// then, once its probe finds the replica answering again, answers
/// `Unavailable`; the writer commits the attempt at the replica, and the
/// primary must keep the attempt's blocks, since the decision names that
/// attempt and readers read the primary first (it used to drop them: an
/// integrity error there). Only the group whose replica is cut off is
/// written, so no client talks to the victim while it is away, and the
/// worker time-out is long enough that the coordinator does not declare it
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_that_verified_a_map_end_before_its_replica_answered_again_keeps_the_attempt_committed_at_the_replica()
 {
    let seed = seed();
    let cluster = Cluster::start_with_timeout(3, &["--fault-injection"], "20s");
    let mut options = cluster.options("prepared").same_host(true);
    options.block_size = 16 << 10;
    options.replication_window = 64 << 20; // MapEnd must not wait for acknowledgements
    let client = ShuffleClient::connect(cluster.coordinator_addr, options).await.unwrap();
    let params = ExchangeParams { records: 200_000, maps: 1, partitions: 6, seed, mode: ExchangeMode::Hash };
    let shuffle = ShuffleId(1);
    client.register_shuffle(shuffle, params.spec().replicated(2)).await.unwrap();
    let placement = client.placement(shuffle).await.unwrap().unwrap();
    let group = (splitmix64(seed) % placement.groups.len() as u64) as u32;
    let copies = &placement.groups[group as usize].copies;
    let primary_id = placement.worker(copies[0]).unwrap().id.clone();
    let victim_id = placement.worker(copies[1]).unwrap().id.clone();
    let primary: usize = primary_id.trim_start_matches('w').parse().unwrap();
    let victim: usize = victim_id.trim_start_matches('w').parse().unwrap();
    let partitions: Vec<u32> =
        (0..params.partitions).filter(|p| placement.partition_groups[*p as usize] == group).collect();
    println!(
        "cutting off {victim_id}, the replica of group {group} (partitions {partitions:?}) whose primary is {primary_id}"
    );
    let records: Vec<_> = map_records(params, 0).into_iter().filter(|(p, _, _)| partitions.contains(p)).collect();
    let mut expected = W1Totals::default();
    records.iter().for_each(|(_, key, _)| expected.add_key(key));
    let (early, late) = records.split_at(records.len() / 2);
    let mut writer = client.writer(shuffle, 0, 0).await.unwrap();
    for (p, key, value) in early {
        writer.write(*p, key, value).await.unwrap();
    }
    writer.flush().await.unwrap();
    cluster.worker(victim).http("POST", "/fault/partition?millis=1500");
    for (p, key, value) in late {
        writer.write(*p, key, value).await.unwrap_or_else(|e| panic!("map 0: {e}"));
    }
    assert_eq!(writer.finish().await.unwrap(), CommitOutcome::Committed);
    let page = cluster.worker(primary).http_get("/metrics");
    assert_eq!(metric(&page, "shuffle_cluster_replicas_back_total"), Some(1), "{page}");
    assert!(
        page.lines().any(|l| l.starts_with("shuffle_errors_total{kind=\"Unavailable\"}")),
        "{primary_id} never sent the writer on to the replica:\n{page}"
    );
    let coordinator = cluster.coordinator().http_get("/metrics");
    assert!(coordinator.lines().any(|l| l == "shuffle_cluster_workers_lost_total 0"), "{coordinator}");
    // Readers read the primary first: it must hold the committed attempt.
    let mut received = W1Totals::default();
    for p in partitions {
        let mut reader = client.reader(shuffle, p).await.unwrap();
        while let Some(block) = reader.next_block().await.unwrap_or_else(|e| panic!("partition {p}: {e}")) {
            block.records().for_each(|(key, _)| received.add_key(key));
        }
    }
    assert_eq!(received, expected);
    client.close().await;
}

/// A worker SIGKILLed before the client ever reached it: connecting to it
/// would wait out the whole connect time-out (120 s here, 10 s by default;
/// without this it took the idle time-out of 30 s when that was shorter).
/// While connecting is slow the client reports the worker to the
/// coordinator, which declares it lost once its heartbeats are late too
/// (the worker time-out, 300 s here, plays no part); the client then gives
/// up at once, and writers and readers move to the replica. Every map's first attempt commits and the result is exact, well
/// within the time-out. Seen in W6 (`shuffle-bench failover`): a sort run
/// whose worker died 0.02 s into the job waited out the 10 s time-out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_before_the_client_reached_it_is_given_up_once_the_coordinator_declares_it_lost() {
    let seed = seed();
    // A worker time-out far beyond the test's bound: only the client's
    // report can get the worker declared lost in time.
    let mut cluster = Cluster::start_with_timeout(3, &[], "300s");
    let mut options = cluster.options("dead-before-connect").same_host(false);
    options.connect_timeout = Duration::from_secs(120);
    options.idle_timeout = Duration::from_secs(120); // else a handshake gives up after 30 s
    let client = ShuffleClient::connect(cluster.coordinator_addr, options).await.unwrap();
    let params = ExchangeParams { records: 100_000, maps: 2, partitions: 6, seed, mode: ExchangeMode::Hash };
    let shuffle = ShuffleId(1);
    client.register_shuffle(shuffle, params.spec().replicated(2)).await.unwrap();
    let placement = client.placement(shuffle).await.unwrap().unwrap();
    let group = (splitmix64(seed) % placement.groups.len() as u64) as usize;
    let victim_id = placement.worker(placement.groups[group].copies[0]).unwrap().id.clone();
    let victim: usize = victim_id.trim_start_matches('w').parse().unwrap();
    println!("killing {victim_id}, the primary of group {group}, before the client connects to any worker");
    cluster.kill_worker(victim);
    let killed = std::time::Instant::now();
    let job = async {
        for map in 0..params.maps {
            let outcome = write_map(&client, shuffle, params, map, 0).await;
            assert_eq!(outcome.unwrap_or_else(|e| panic!("map {map}: {e}")), CommitOutcome::Committed);
        }
        read_all(&client, shuffle, params, &Arc::new(AtomicU64::new(0))).await
    };
    let received = tokio::time::timeout(Duration::from_secs(60), job)
        .await
        .unwrap_or_else(|_| panic!("still waiting for {victim_id} 60 s after its kill"));
    verify(params, received).unwrap();
    println!("exact, {:?} after the kill", killed.elapsed());
    client.close().await;
}
