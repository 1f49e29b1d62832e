//! W6 `failover` of `shared/WORKLOADS.md`: W1 through a coordinator and
//! three workers (child processes on loopback), in each mode, once without
//! a fault and once with one worker holding data SIGKILLed at a seeded
//! moment between the first push and the last read. Every run gets a fresh
//! cluster (start-up is not timed) and is checked as W1 is.
//!
//! - Replication 2: maps and readers run together as in W1; the worker dies
//!   when a seeded fraction of the work (records pushed plus records read,
//!   out of 2N) is done. Nothing may run again: every map's first attempt
//!   commits and the readers fail over to the surviving copy. Measured as
//!   well: the time from the kill to the first block read from a surviving
//!   copy — the first block, delivered after the kill, of a partition the
//!   killed worker held, by a reader reading another worker (a block a
//!   reader still gets from the killed worker's files does not count).
//! - Replication 1: a batch job (the reduce stage starts when every map has
//!   committed), the worker dies when a seeded fraction of the records has
//!   been read. Each reader of a partition whose only copy was on it must
//!   fail with `PartitionLost` naming exactly the maps that wrote to that
//!   partition's group; the harness then re-runs exactly those maps as new
//!   attempts and reads those partitions again (the engine's batch executor
//!   does not re-run lost maps yet, so this is done here, at client level),
//!   and the totals must be exact.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::{Context, bail, ensure};
use engine_adapter::workload::{
    W1_KEY_LEN, W1_RECORD_LEN, W1_VALUE_LEN, W1Totals, client::ExchangeParams, map_range, splitmix64, w1_partition,
    w1_record,
};
use serde::Serialize;
use shuffle_client::{ClientError, CommitOutcome, ExchangeMode, ShuffleClient, ShuffleId};
use shuffle_server::ByteSize;

use crate::{baseline::median, cluster::LocalServers, workloads::mode_name};

/// Records a map writes between updates of the shared progress counter.
const PROGRESS_STEP: u64 = 4096;

/// The seeded moment of a kill is a fraction of the work in
/// `[MOMENT_MIN, MOMENT_MAX)`: never before the first push, never after the last read.
const MOMENT_MIN: f64 = 0.02;
const MOMENT_MAX: f64 = 0.9;

/// What `shuffle-bench failover` runs.
#[derive(Clone, Debug)]
pub struct FailoverParams {
    /// W1's records, maps, partitions and data seed (the mode is set per run).
    pub exchange: ExchangeParams,
    /// Modes to run.
    pub modes: Vec<ExchangeMode>,
    /// Replications to run (2: survive the loss; 1: name and re-run the lost maps).
    pub replications: Vec<u8>,
    /// Workers in each cluster.
    pub workers: usize,
    /// Each worker's memory budget.
    pub memory: ByteSize,
    /// Pairs of runs (without and with the fault) per mode and replication.
    pub repeat: u32,
    /// Chooses every victim and moment.
    pub fault_seed: u64,
}

/// One faulted run: what was killed when, and what the clients saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FaultedRun {
    /// The worker killed (`w0`, `w1`, …).
    pub victim: String,
    /// The seeded moment, as a fraction of the work (see the module documentation).
    pub moment: f64,
    pub seconds: f64,
    /// Seconds from the start of the run to the kill.
    pub killed_after_seconds: f64,
    /// Replication 2: from the kill to the first block of one of the killed
    /// worker's partitions read from another copy (`None` if every such
    /// partition had been read before the kill).
    pub kill_to_surviving_read_ms: Option<f64>,
    /// Replication 2: readers that were reading the killed worker and moved to another copy.
    pub readers_failed_over: u32,
    /// Replication 2: the first of those moves, from the kill to the first
    /// block at the new copy (`None` if no reader was reading the killed worker).
    pub first_failover_ms: Option<f64>,
    /// Replication 2: the longest of those moves, from the kill to the first block at the new copy.
    pub slowest_failover_ms: Option<f64>,
    /// Replication 1: partitions whose readers got `PartitionLost`.
    pub lost_partitions: Vec<u32>,
    /// Replication 1: the maps those errors named, all together (re-run as attempt 1).
    pub rerun_maps: Vec<u32>,
    /// Replication 1: from the kill to the first `PartitionLost`.
    pub kill_to_partition_lost_ms: Option<f64>,
    pub verified: bool,
    /// Why the run did not verify.
    pub failure: Option<String>,
}

/// W6 in one mode with one replication: `repeat` runs without and with the fault.
#[derive(Clone, Debug, Serialize)]
pub struct FailoverReport {
    pub workload: &'static str,
    pub mode: &'static str,
    pub replication: u8,
    pub records: u64,
    pub maps: u32,
    pub partitions: u32,
    pub workers: usize,
    pub input_bytes: u64,
    pub fault_seed: u64,
    pub clean_seconds: Vec<f64>,
    pub clean_median_seconds: f64,
    pub faulted: Vec<FaultedRun>,
    pub faulted_median_seconds: f64,
    /// Median over the faulted runs that have one of their first failover
    /// (a reader of the killed worker's copy reading the surviving copy).
    pub median_first_failover_ms: Option<f64>,
    /// Every run, clean and faulted, checked out.
    pub verified: bool,
    /// The cluster's configuration.
    pub cluster: String,
}

/// The kill of one faulted run, decided before it starts.
#[derive(Clone, Debug)]
struct Fault {
    /// Index and id of the worker to kill.
    victim: (usize, String),
    moment: f64,
}

/// What the writers and readers of a run share; they also fire the kill,
/// right after the update that reaches the seeded moment (so it always
/// falls between the first push and the last read).
#[derive(Default)]
struct Progress {
    pushed: AtomicU64,
    read: AtomicU64,
    maps_committed: AtomicU32,
    /// The victim's pid and the moment, for a faulted run.
    trigger: Option<Trigger>,
    /// When the victim was killed.
    killed: OnceLock<Instant>,
    /// Replication 2: the first block after the kill of an affected partition from another copy.
    first_surviving_read: Mutex<Option<Instant>>,
    /// Replication 2: for each reader that moved off the victim, its first block at the new copy.
    failovers: Mutex<Vec<Instant>>,
    /// Replication 1: the first `PartitionLost`.
    first_lost: Mutex<Option<Instant>>,
    /// A reader saw a record of another partition.
    misplaced: AtomicBool,
}

/// When and whom a faulted run kills.
struct Trigger {
    pid: libc::pid_t,
    /// Replication 2: records pushed plus read at the moment (of 2N).
    /// Replication 1: records read at the moment (of N), once every map committed.
    threshold: u64,
    replication: u8,
    maps: u32,
}

impl Progress {
    /// SIGKILLs the victim if the seeded moment has come and it was not killed yet.
    fn maybe_kill(&self) {
        let Some(t) = &self.trigger else { return };
        if self.killed.get().is_some() {
            return;
        }
        let (pushed, read) = (self.pushed.load(Ordering::Relaxed), self.read.load(Ordering::Relaxed));
        let due = if t.replication >= 2 {
            pushed + read >= t.threshold
        } else {
            self.maps_committed.load(Ordering::Acquire) == t.maps && read >= t.threshold
        };
        if due && self.killed.set(Instant::now()).is_ok() {
            // SAFETY: kill(2) on the pid of a child this process started and has not reaped.
            unsafe { libc::kill(t.pid, libc::SIGKILL) };
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs W6 as `p` asks; one report per mode and replication, each handed
/// to `done` as soon as it is complete (so a long sweep keeps what it measured).
pub fn run(
    p: &FailoverParams,
    mut done: impl FnMut(&FailoverReport) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<FailoverReport>> {
    ensure!(p.workers >= 2, "W6 needs at least 2 workers (one is killed)");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut reports = Vec::new();
    for &replication in &p.replications {
        for &mode in &p.modes {
            let params = ExchangeParams { mode, ..p.exchange };
            let (mut clean, mut faulted) = (Vec::new(), Vec::new());
            let mut verified = true;
            let mut cluster = String::new();
            for run in 0..p.repeat {
                eprintln!("failover: {} replication {replication}, run {} of {}…", mode_name(mode), run + 1, p.repeat);
                let servers = LocalServers::cluster(p.workers, p.memory)?;
                cluster = servers.to_string();
                match runtime.block_on(one_run(servers, params, replication, None)) {
                    Ok(run) => {
                        verified &= run.verified;
                        if let Some(f) = &run.failure {
                            eprintln!("failover: the run without a fault did not verify: {f}");
                        }
                        clean.push(run.seconds);
                    }
                    Err(e) => {
                        return Err(
                            e.context(format!("{} replication {replication}: run without a fault", mode_name(mode)))
                        );
                    }
                }
                // Each run's fault depends only on the seed, the mode, the replication and the
                // run, so that `--mode M --replication K --seed S` repeats a run of a full sweep.
                let run_seed = splitmix64(p.fault_seed ^ splitmix64(fault_key(mode, replication, run)));
                let servers = LocalServers::cluster(p.workers, p.memory)?;
                let victim = (run_seed % p.workers as u64) as usize;
                let moment = MOMENT_MIN + (MOMENT_MAX - MOMENT_MIN) * unit(splitmix64(run_seed ^ 0xfa17));
                let fault = Fault { victim: (victim, format!("w{victim}")), moment };
                let run = runtime
                    .block_on(one_run(servers, params, replication, Some(fault)))
                    .with_context(|| format!("{} replication {replication}: faulted run", mode_name(mode)))?;
                if let Some(f) = &run.failure {
                    eprintln!("failover: the faulted run did not verify: {f}");
                }
                verified &= run.verified;
                faulted.push(run);
            }
            let failovers: Vec<f64> = faulted.iter().filter_map(|f| f.first_failover_ms).collect();
            reports.push(FailoverReport {
                workload: "failover",
                mode: mode_name(mode),
                replication,
                records: params.records,
                maps: params.maps,
                partitions: params.partitions,
                workers: p.workers,
                input_bytes: params.records * W1_RECORD_LEN as u64,
                fault_seed: p.fault_seed,
                clean_median_seconds: median(&clean),
                clean_seconds: clean,
                faulted_median_seconds: median(&faulted.iter().map(|f| f.seconds).collect::<Vec<_>>()),
                faulted,
                median_first_failover_ms: (!failovers.is_empty()).then(|| median(&failovers)),
                verified,
                cluster,
            });
            done(reports.last().expect("pushed above"))?;
        }
    }
    Ok(reports)
}

/// What tells one faulted run of a sweep from the others.
fn fault_key(mode: ExchangeMode, replication: u8, run: u32) -> u64 {
    let mode = match mode {
        ExchangeMode::Hash => 0,
        ExchangeMode::Sort => 1,
        ExchangeMode::Hybrid => 2,
    };
    (u64::from(replication) << 40) | (mode << 32) | u64::from(run)
}

/// A u64 as a fraction in [0, 1).
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// One run on a fresh cluster: without a fault, or with `fault`.
async fn one_run(
    servers: LocalServers,
    params: ExchangeParams,
    replication: u8,
    fault: Option<Fault>,
) -> anyhow::Result<FaultedRun> {
    let client = ShuffleClient::connect(servers.front.addr, servers.options("shuffle-bench-failover")).await?;
    ensure!(client.is_cluster(), "the client does not see a cluster at {}", servers.front.addr);
    let shuffle = ShuffleId(1);
    client.register_shuffle(shuffle, params.spec().replicated(replication)).await?;
    let placement = client.placement(shuffle).await?.context("a cluster shuffle has a placement")?;
    // Partitions the victim holds a copy of, by group.
    let mut affected: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut only_copy: BTreeSet<u32> = BTreeSet::new();
    if let Some(fault) = &fault {
        let index = placement
            .index_of(&fault.victim.1)
            .with_context(|| format!("{} holds nothing of the shuffle: {placement:?}", fault.victim.1))?;
        for p in 0..params.partitions {
            let (g, group) = placement.group_of(p).context("every partition has a group")?;
            if group.copies.contains(&index) {
                affected.entry(g).or_default().push(p);
                if group.copies.len() == 1 {
                    only_copy.insert(p);
                }
            }
        }
        ensure!(!affected.is_empty(), "{} holds no partition", fault.victim.1);
    }
    let affected_partitions: Arc<BTreeSet<u32>> = Arc::new(affected.values().flatten().copied().collect());
    let trigger = fault.as_ref().map(|f| {
        let pid = servers.workers[f.victim.0].as_ref().map_or(0, |w| w.pid()) as libc::pid_t;
        let of = if replication >= 2 { 2 * params.records } else { params.records };
        Trigger { pid, threshold: (f.moment * of as f64) as u64, replication, maps: params.maps }
    });
    let progress = Arc::new(Progress { trigger, ..Progress::default() });
    let victim_id: Arc<str> = fault.as_ref().map_or("".into(), |f| f.victim.1.as_str().into());
    let start = Instant::now();
    let outcome = if replication >= 2 {
        replicated_run(&client, shuffle, params, &progress, &affected_partitions, &victim_id).await
    } else {
        single_copy_run(&client, shuffle, params, &progress, fault.is_some()).await
    };
    let seconds = start.elapsed().as_secs_f64();
    let _ = client.unregister_app().await;
    client.close().await;
    drop(servers);
    let mut run = FaultedRun { seconds, ..FaultedRun::default() };
    if let Some(fault) = &fault {
        run.victim = fault.victim.1.clone();
        run.moment = fault.moment;
        // A run that ended (or failed) before its moment killed nothing: it says so below.
        if let Some(&killed) = progress.killed.get() {
            run.killed_after_seconds = killed.duration_since(start).as_secs_f64();
            let ms = |t: Instant| t.saturating_duration_since(killed).as_secs_f64() * 1e3;
            run.kill_to_surviving_read_ms = lock(&progress.first_surviving_read).map(ms);
            let failovers = lock(&progress.failovers);
            run.readers_failed_over = failovers.len() as u32;
            run.first_failover_ms = failovers.iter().map(|t| ms(*t)).reduce(f64::min);
            run.slowest_failover_ms = failovers.iter().map(|t| ms(*t)).reduce(f64::max);
            run.kill_to_partition_lost_ms = lock(&progress.first_lost).map(ms);
        }
    }
    let check = match outcome {
        Ok(RunOutcome { received, lost }) => {
            let mut problems = Vec::new();
            if fault.is_some() && progress.killed.get().is_none() {
                problems.push("the run ended before its seeded moment: nothing was killed".to_string());
            }
            if progress.misplaced.load(Ordering::Relaxed) {
                problems.push("a reader saw a record of another partition".to_string());
            }
            if let Err(e) = engine_adapter::workload::client::verify(params, received) {
                problems.push(e);
            }
            if let Some(lost) = lost {
                run.lost_partitions = lost.partitions.keys().copied().collect();
                run.rerun_maps = lost.rerun.iter().copied().collect();
                problems.extend(check_lost(&lost, &only_copy, &placement, params));
            }
            if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
        }
        Err(e) => Err(format!("{e:#}")),
    };
    run.verified = check.is_ok();
    run.failure = check.err();
    Ok(run)
}

/// What a run received, and with one copy what was lost and re-run.
struct RunOutcome {
    received: W1Totals,
    lost: Option<Lost>,
}

/// Replication 1: the partitions whose readers got `PartitionLost`, the
/// maps each named, the maps that wrote to each group, and the maps re-run.
struct Lost {
    partitions: BTreeMap<u32, Vec<u32>>,
    wrote_to: Vec<BTreeSet<u32>>,
    rerun: BTreeSet<u32>,
}

/// Replication 1's check: only partitions whose single copy was on the
/// victim are lost, and each names exactly the maps that wrote to its group.
fn check_lost(
    lost: &Lost,
    only_copy: &BTreeSet<u32>,
    placement: &shuffle_protocol::Placement,
    params: ExchangeParams,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (p, named) in &lost.partitions {
        if !only_copy.contains(p) {
            problems.push(format!("partition {p} was reported lost, but the killed worker did not hold its only copy"));
            continue;
        }
        let Some((g, _)) = placement.group_of(*p) else { continue };
        let group: BTreeSet<u32> =
            (0..params.partitions).filter(|q| placement.group_of(*q).map(|(h, _)| h) == Some(g)).collect();
        let expected: BTreeSet<u32> =
            (0..params.maps).filter(|m| !lost.wrote_to[*m as usize].is_disjoint(&group)).collect();
        let named: BTreeSet<u32> = named.iter().copied().collect();
        if named != expected {
            problems.push(format!(
                "partition {p}: PartitionLost named maps {named:?}, but maps {expected:?} wrote to its group"
            ));
        }
    }
    problems
}

/// Tasks of a run, aborted if the run ends early (a failed map must not
/// leave readers waiting on a cluster that is about to be killed).
struct Tasks<T>(Vec<tokio::task::JoinHandle<T>>);

impl<T> Drop for Tasks<T> {
    fn drop(&mut self) {
        self.0.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

/// Writes map `map`'s W1 records as `attempt`, counting pushed records in
/// `progress`; returns the outcome and the partitions it wrote to.
async fn write_map(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    params: ExchangeParams,
    (map, attempt): (u32, u32),
    progress: &Progress,
) -> Result<(CommitOutcome, BTreeSet<u32>), ClientError> {
    let mut writer = client.writer(shuffle, map, attempt).await?;
    let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
    let mut wrote = vec![false; params.partitions as usize];
    let mut unreported = 0;
    for i in map_range(params.records, params.maps, map) {
        w1_record(params.seed, i, &mut key, &mut value);
        let p = w1_partition(&key, params.partitions);
        wrote[p as usize] = true;
        writer.write(p, &key, &value).await?;
        unreported += 1;
        if unreported == PROGRESS_STEP {
            progress.pushed.fetch_add(unreported, Ordering::Relaxed);
            progress.maybe_kill();
            unreported = 0;
        }
    }
    progress.pushed.fetch_add(unreported, Ordering::Relaxed);
    let outcome = writer.finish().await?;
    Ok((outcome, (0..params.partitions).filter(|p| wrote[*p as usize]).collect()))
}

/// Reads partition `p`, checking every key belongs to it and counting
/// records in `progress`. With `victim` set, notes the first block after the
/// kill read from another copy of an `affected` partition, and readers that
/// moved off the victim.
async fn read_partition(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    (p, partitions): (u32, u32),
    progress: &Progress,
    affected: bool,
    victim: &str,
) -> Result<W1Totals, ClientError> {
    let mut reader = client.reader(shuffle, p).await?;
    let mut totals = W1Totals::default();
    let mut on_victim = reader.worker() == Some(victim);
    while let Some(block) = reader.next_block().await? {
        let mut n = 0;
        for (key, value) in block.records() {
            if key.len() != W1_KEY_LEN || value.len() != W1_VALUE_LEN || w1_partition(key, partitions) != p {
                progress.misplaced.store(true, Ordering::Relaxed);
            }
            totals.add_key(key);
            n += 1;
        }
        progress.read.fetch_add(n, Ordering::Relaxed);
        progress.maybe_kill();
        if affected && let Some(killed) = progress.killed.get() {
            let now = Instant::now();
            let elsewhere = reader.worker().is_some_and(|w| w != victim);
            if now > *killed && elsewhere {
                lock(&progress.first_surviving_read).get_or_insert(now);
                if on_victim {
                    lock(&progress.failovers).push(now);
                }
            }
        }
        on_victim = reader.worker() == Some(victim);
    }
    Ok(totals)
}

/// Replication 2: maps and readers together, as in W1; every map's first
/// attempt must commit and every partition must read completely.
async fn replicated_run(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    params: ExchangeParams,
    progress: &Arc<Progress>,
    affected: &Arc<BTreeSet<u32>>,
    victim: &Arc<str>,
) -> anyhow::Result<RunOutcome> {
    let mut maps: Tasks<_> = Tasks(
        (0..params.maps)
            .map(|m| {
                let (client, progress) = (client.clone(), progress.clone());
                tokio::spawn(async move {
                    let outcome = write_map(&client, shuffle, params, (m, 0), &progress).await;
                    progress.maps_committed.fetch_add(1, Ordering::Release);
                    outcome
                })
            })
            .collect(),
    );
    let mut readers: Tasks<_> = Tasks(
        (0..params.partitions)
            .map(|p| {
                let (client, progress, victim) = (client.clone(), progress.clone(), victim.clone());
                let affected = affected.contains(&p);
                tokio::spawn(async move {
                    read_partition(&client, shuffle, (p, params.partitions), &progress, affected, &victim).await
                })
            })
            .collect(),
    );
    for (m, task) in maps.0.iter_mut().enumerate() {
        match task.await? {
            Ok((CommitOutcome::Committed, _)) => {}
            other => bail!("map {m}'s first attempt did not commit: {other:?}"),
        }
    }
    let mut received = W1Totals::default();
    for (p, task) in readers.0.iter_mut().enumerate() {
        received.merge(task.await?.with_context(|| format!("partition {p}"))?);
    }
    Ok(RunOutcome { received, lost: None })
}

/// Replication 1, as a batch job: every map commits, then every partition
/// is read. Readers that get `PartitionLost` are set aside; the maps they
/// name are re-run as attempt 1 and their partitions read again.
async fn single_copy_run(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    params: ExchangeParams,
    progress: &Arc<Progress>,
    faulted: bool,
) -> anyhow::Result<RunOutcome> {
    let mut maps: Tasks<_> = Tasks(
        (0..params.maps)
            .map(|m| {
                let (client, progress) = (client.clone(), progress.clone());
                tokio::spawn(async move { write_map(&client, shuffle, params, (m, 0), &progress).await })
            })
            .collect(),
    );
    let mut wrote_to = Vec::new();
    for (m, task) in maps.0.iter_mut().enumerate() {
        match task.await? {
            Ok((CommitOutcome::Committed, wrote)) => wrote_to.push(wrote),
            other => bail!("map {m} did not commit: {other:?}"),
        }
    }
    progress.maps_committed.store(params.maps, Ordering::Release);
    progress.maybe_kill();
    let read_all = |partitions: Vec<u32>| {
        let (partitions, tasks): (Vec<u32>, Vec<_>) = partitions
            .into_iter()
            .map(|p| {
                let (client, progress) = (client.clone(), progress.clone());
                (
                    p,
                    tokio::spawn(async move {
                        let read = read_partition(&client, shuffle, (p, params.partitions), &progress, false, "").await;
                        if let Err(ClientError::PartitionLost { .. }) = &read {
                            lock(&progress.first_lost).get_or_insert_with(Instant::now);
                        }
                        read
                    }),
                )
            })
            .unzip();
        (partitions, Tasks(tasks))
    };
    let mut received = W1Totals::default();
    let mut lost = Lost { partitions: BTreeMap::new(), wrote_to, rerun: BTreeSet::new() };
    let (partitions, mut readers) = read_all((0..params.partitions).collect());
    for (p, task) in partitions.into_iter().zip(readers.0.iter_mut()) {
        match task.await? {
            Ok(totals) => received.merge(totals),
            Err(ClientError::PartitionLost { partition, maps, .. }) if faulted => {
                ensure!(partition == p, "partition {p}'s reader reported partition {partition} lost");
                lost.partitions.insert(p, maps);
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("partition {p}"))),
        }
    }
    if !faulted {
        return Ok(RunOutcome { received, lost: None });
    }
    // The stage re-run: exactly the maps named, as new attempts, then the lost partitions again.
    lost.rerun = lost.partitions.values().flatten().copied().collect();
    for &m in &lost.rerun {
        match write_map(client, shuffle, params, (m, 1), progress).await {
            Ok((CommitOutcome::Committed, _)) => {}
            other => bail!("the re-run of map {m} (attempt 1) did not commit: {other:?}"),
        }
    }
    let (partitions, mut readers) = read_all(lost.partitions.keys().copied().collect());
    for (p, task) in partitions.into_iter().zip(readers.0.iter_mut()) {
        received.merge(task.await?.with_context(|| format!("partition {p}, read again after the re-run"))?);
    }
    Ok(RunOutcome { received, lost: Some(lost) })
}
