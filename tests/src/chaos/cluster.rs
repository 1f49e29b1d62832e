//! The seeded fault suite's cluster plans: a coordinator and three workers
//! as child processes ([`crate::cluster::Cluster`]), one W1-style shuffle in
//! a seeded mode and replication, and one process fault at a seeded moment
//! on top of the task faults of the single-node plans (attempts killed,
//! duplicated or out of order, producers and readers stalled, a reader's
//! connection dropped).
//!
//! The process faults and what each run must show:
//! - A worker SIGKILLed while the maps push or while the readers read.
//!   With two copies the result is exact and no map runs again. With one
//!   copy, attempts that were pushing to it fail and run again (as an
//!   engine would), the readers of its partitions get `PartitionLost`
//!   naming exactly the maps whose committed attempt put blocks there
//!   (computed here from the generator and from when each committed
//!   attempt began, not asked of the service), the driver re-runs exactly
//!   those maps as new attempts, reads those partitions again, and the
//!   result is exact.
//! - The coordinator SIGKILLed at a seeded moment and started again after a
//!   seeded pause: the job waits; the result is exact and no map runs again.
//! - A worker restarted gracefully (SIGTERM, started again on its data dir,
//!   a rolling restart) after some maps committed: nothing committed is
//!   lost (no `PartitionLost`); attempts that meet the restart may run again.
//! - A worker cut off from everyone at a seeded moment for a seeded time
//!   (SIGSTOP, then SIGCONT: no byte leaves or reaches it, as in a network
//!   partition of that worker, often longer than the worker time-out, so
//!   the coordinator declares it lost while it is alive). Such plans keep
//!   two copies; nothing is lost (no `PartitionLost`), the result is exact;
//!   attempts that meet the cut may run again.
//! - A worker partitioned from the network at a seeded moment for a seeded
//!   time (`POST /fault/partition` on its admin listener, which the fixture
//!   enables with `--fault-injection`: every datagram it sends or receives
//!   is dropped and its Unix-socket streams are closed, while the process
//!   runs on, its timers and handlers included). The same rule as a cut-off.
//!
//! Maps of a "sparse" plan write only a seeded subset of the partitions, so
//! that losing a worker loses some maps and not others, and `PartitionLost`
//! has something to get wrong.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use shuffle_client::{
    ClientError, ClientOptions, CommitOutcome, ErrorKind, ExchangeMode, ShuffleClient, ShuffleId, ShuffleSpec,
    SpillStrategy,
};
use shuffle_protocol::Placement;

use super::{Fault, Outcome, Rng};
use crate::{
    cluster::Cluster,
    workload::{W1_KEY_LEN, W1_VALUE_LEN, map_range, splitmix64, w1_partition, w1_record},
};

/// Workers in every cluster plan.
pub const WORKERS: usize = 3;

/// The most a run may take before it counts as hung (a cluster start, a
/// job of at most 60,000 records, a worker declared lost, a coordinator
/// rebuilding: about 10 s in a debug build).
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// Re-runs of one map after attempts failed on a worker fault, before the
/// run fails: at [`RETRY_PAUSE`] apart this outlasts the cluster fixture's
/// worker time-out several times over.
const MAX_MAP_RETRIES: u32 = 40;
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Rounds of "re-run the lost maps, read their partitions again" before
/// the run fails (one worker is lost per run, so one round should do).
const MAX_REPAIR_ROUNDS: u32 = 3;

/// The first attempt id of re-runs after a worker fault, and of re-runs
/// after `PartitionLost` (the planned attempts use 0–21).
const RETRY_ATTEMPTS: u32 = 30;
const REPAIR_ATTEMPTS: u32 = 100;

/// When a process fault strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    /// Once this many records have been written, over all attempts (the map phase).
    Pushed(u64),
    /// Once readers have received this many blocks (the read phase; hybrid
    /// readers read while the maps push).
    Read(u64),
}

/// The process fault of a cluster plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterFault {
    /// Worker `worker` is SIGKILLed at `at`.
    KillWorker { worker: usize, at: Moment },
    /// The coordinator is SIGKILLed at `at` and started again `down_millis` later.
    KillCoordinator { at: Moment, down_millis: u64 },
    /// Worker `worker` gets SIGTERM once maps `0..after_maps` committed and
    /// is started again (a rolling restart) before the other maps start.
    RestartWorker { worker: usize, after_maps: u32 },
    /// Worker `worker` is cut off at `at` (SIGSTOP) and comes back
    /// `millis` later (SIGCONT).
    CutOffWorker { worker: usize, at: Moment, millis: u64 },
    /// Worker `worker` is partitioned from the network at `at` for `millis`.
    PartitionWorker { worker: usize, at: Moment, millis: u64 },
}

impl ClusterFault {
    /// The fault's kind, for the summary.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::KillWorker { at: Moment::Pushed(_), .. } => "worker SIGKILLed while maps push",
            Self::KillWorker { at: Moment::Read(_), .. } => "worker SIGKILLed while readers read",
            Self::KillCoordinator { at: Moment::Pushed(_), .. } => {
                "coordinator SIGKILLed and restarted while maps push"
            }
            Self::KillCoordinator { at: Moment::Read(_), .. } => {
                "coordinator SIGKILLed and restarted while readers read"
            }
            Self::RestartWorker { .. } => "worker restarted gracefully (rolling)",
            Self::CutOffWorker { at: Moment::Pushed(_), .. } => "worker cut off (SIGSTOP) while maps push",
            Self::CutOffWorker { at: Moment::Read(_), .. } => "worker cut off (SIGSTOP) while readers read",
            Self::PartitionWorker { at: Moment::Pushed(_), .. } => "worker partitioned while maps push",
            Self::PartitionWorker { at: Moment::Read(_), .. } => "worker partitioned while readers read",
        }
    }
}

/// One seeded cluster run.
#[derive(Clone, Debug)]
pub struct ClusterPlan {
    pub seed: u64,
    pub mode: ExchangeMode,
    /// Copies of every block (1 or 2).
    pub replication: u8,
    pub records: u64,
    pub maps: u32,
    pub partitions: u32,
    /// Per map, the partitions its records go to (a bit per partition).
    pub masks: Vec<u64>,
    /// Each worker's memory budget, in MiB (small, so data spills).
    pub memory_mib: u64,
    /// Whether the client may use the workers' Unix sockets.
    pub same_host: bool,
    pub fault: ClusterFault,
    /// Task faults, as in the single-node plans.
    pub task_faults: Vec<Fault>,
}

impl ClusterPlan {
    /// The plan seed `seed` chooses.
    pub fn from_seed(seed: u64) -> Self {
        // Another stream than the single-node plan of the same seed.
        let mut rng = Rng::new(seed ^ 0xC1A5_7E12_0000_0000);
        let mode = [ExchangeMode::Hash, ExchangeMode::Sort, ExchangeMode::Hybrid][rng.below(3) as usize];
        let mut replication = 1 + rng.below(2) as u8;
        let maps = 3 + rng.below(4) as u32;
        let partitions = 6 + rng.below(7) as u32;
        let records = 20_000 + rng.below(40_000);
        let all = (1u64 << partitions) - 1;
        let sparse = rng.chance(50);
        let mut masks: Vec<u64> = (0..maps)
            .map(|_| {
                if !sparse {
                    return all;
                }
                let mask = (0..partitions).filter(|_| rng.chance(35)).fold(0u64, |m, p| m | 1 << p);
                if mask == 0 { 1 << rng.below(u64::from(partitions)) } else { mask }
            })
            .collect();
        // Every partition gets some records.
        for p in 0..partitions {
            if masks.iter().all(|m| m & (1 << p) == 0) {
                masks[(p % maps) as usize] |= 1 << p;
            }
        }
        let worker = rng.below(WORKERS as u64) as usize;
        let moment = |rng: &mut Rng| {
            if rng.chance(50) {
                Moment::Pushed(records * (2 + rng.below(88)) / 100)
            } else {
                Moment::Read(1 + rng.below(6))
            }
        };
        let fault = match rng.below(12) {
            0..=4 => ClusterFault::KillWorker { worker, at: moment(&mut rng) },
            5..=7 => ClusterFault::KillCoordinator { at: moment(&mut rng), down_millis: 100 + rng.below(1400) },
            8..=9 => ClusterFault::RestartWorker { worker, after_maps: rng.below(u64::from(maps) + 1) as u32 },
            // Mostly past the fixture's worker time-out (1.5 s).
            _ => ClusterFault::CutOffWorker { worker, at: moment(&mut rng), millis: 300 + rng.below(3200) },
        };
        // A worker declared lost while cut off holds the only copy of its
        // groups' committed blocks with one copy; the suite's rule for a
        // cut-off worker is that nothing is lost, so such plans keep two.
        if matches!(fault, ClusterFault::CutOffWorker { .. }) {
            replication = 2;
        }
        // Hybrid readers stream from the restarting worker; with one copy
        // the coordinator may rightly declare it lost, so they get two.
        if mode == ExchangeMode::Hybrid && matches!(fault, ClusterFault::RestartWorker { .. }) {
            replication = 2;
        }
        let mut task_faults = Vec::new();
        let count = rng.below(3);
        let mut tries = 0;
        while (task_faults.len() as u64) < count && tries < 20 {
            tries += 1;
            let map = rng.below(u64::from(maps)) as u32;
            let partition = rng.below(u64::from(partitions)) as u32;
            let f = match rng.below(6) {
                0 => Fault::KillMapMidPush { map, after: rng.below(records / u64::from(maps)) },
                1 => Fault::DropConnectionMidRead { partition, after_blocks: rng.below(4) as u32 },
                2 => Fault::StallProducer { map, millis: 50 + rng.below(700) },
                3 => Fault::StallReader { partition, millis: 50 + rng.below(700) },
                4 => Fault::DuplicateAttempts { map },
                _ => Fault::OutOfOrderAttempts { map },
            };
            let clashes = task_faults.iter().any(|g: &Fault| std::mem::discriminant(g) == std::mem::discriminant(&f))
                || task_faults.iter().any(|g| super::map_of(g).is_some() && super::map_of(g) == super::map_of(&f));
            if !clashes {
                task_faults.push(f);
            }
        }
        task_faults.sort();
        let memory_mib = 16 + rng.below(32);
        let same_host = rng.chance(50);
        // Drawn last, so that every other choice of a seed stays as it was
        // before partitions joined the suite: half the cut-offs become
        // partitions of the network.
        let fault = match fault {
            ClusterFault::CutOffWorker { worker, at, millis } if rng.chance(50) => {
                ClusterFault::PartitionWorker { worker, at, millis }
            }
            other => other,
        };
        Self { seed, mode, replication, records, maps, partitions, masks, memory_mib, same_host, fault, task_faults }
    }

    fn spec(&self) -> ShuffleSpec {
        let spec = match self.mode {
            ExchangeMode::Sort => ShuffleSpec::sort(self.maps, self.partitions, false),
            // Full spilling, so a reader told of a failed producer reads again.
            ExchangeMode::Hybrid => ShuffleSpec::hybrid(self.maps, self.partitions, SpillStrategy::Full),
            ExchangeMode::Hash => ShuffleSpec::hash(self.maps, self.partitions),
        };
        spec.replicated(self.replication)
    }

    fn pipelined(&self) -> bool {
        self.mode == ExchangeMode::Hybrid
    }

    /// Whether the plan may lose committed blocks (and so see `PartitionLost`).
    fn may_lose(&self) -> bool {
        self.replication == 1 && matches!(self.fault, ClusterFault::KillWorker { .. })
    }

    /// Whether every map's planned attempts must be enough (no re-runs).
    fn reruns_forbidden(&self) -> bool {
        match self.fault {
            ClusterFault::KillWorker { .. } => self.replication >= 2,
            ClusterFault::KillCoordinator { .. } => true,
            ClusterFault::RestartWorker { .. }
            | ClusterFault::CutOffWorker { .. }
            | ClusterFault::PartitionWorker { .. } => false,
        }
    }

    /// The partitions map `map`'s records go to.
    fn partitions_of(&self, map: u32) -> BTreeSet<u32> {
        let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
        let mut set = BTreeSet::new();
        for i in map_range(self.records, self.maps, map) {
            set.insert(self.record(map, i, &mut key, &mut value));
        }
        set
    }

    /// Record `i` (of map `map`): a W1 record whose partition is in the map's
    /// mask (the first of the W1 records of seeds `seed`, `seed ^ s1`, … that is).
    fn record(&self, map: u32, i: u64, key: &mut [u8; W1_KEY_LEN], value: &mut [u8; W1_VALUE_LEN]) -> u32 {
        let mask = self.masks[map as usize];
        let mut j = 0u64;
        loop {
            let seed = if j == 0 { self.seed } else { self.seed ^ splitmix64(j) };
            w1_record(seed, i, key, value);
            let p = w1_partition(key, self.partitions);
            if mask & (1 << p) != 0 {
                return p;
            }
            j += 1;
        }
    }

    /// What the readers must see, from the generator.
    fn expected(&self) -> Totals {
        let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
        let mut t = Totals::default();
        for m in 0..self.maps {
            for i in map_range(self.records, self.maps, m) {
                self.record(m, i, &mut key, &mut value);
                t.add(&key, &value);
            }
        }
        t
    }

    fn map_fault(&self, map: u32) -> Option<Fault> {
        self.task_faults.iter().copied().find(|f| super::map_of(f) == Some(map))
    }
}

impl fmt::Display for ClusterPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all = (1u64 << self.partitions) - 1;
        let masks = if self.masks.iter().all(|m| *m == all) {
            "dense".to_string()
        } else {
            format!("sparse {:?}", self.masks.iter().map(|m| format!("{m:#x}")).collect::<Vec<_>>())
        };
        write!(
            f,
            "cluster of {WORKERS}, W1 {:?} replication {}, N={} M={} R={} ({masks}), {} MiB per worker, {}, \
             fault {:?}, task faults {:?}",
            self.mode,
            self.replication,
            self.records,
            self.maps,
            self.partitions,
            self.memory_mib,
            if self.same_host { "unix sockets" } else { "QUIC" },
            self.fault,
            self.task_faults
        )
    }
}

/// What readers received: records, and wrapping sums over their keys and
/// over a hash of each whole record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Totals {
    records: u64,
    key_sum: u64,
    record_hash_sum: u64,
}

impl Totals {
    fn add(&mut self, key: &[u8], value: &[u8]) {
        self.records += 1;
        self.key_sum = self.key_sum.wrapping_add(crate::workload::w1_key_value(key));
        let h = xxhash_rust::xxh64::xxh64(value, xxhash_rust::xxh64::xxh64(key, 0));
        self.record_hash_sum = self.record_hash_sum.wrapping_add(h);
    }

    fn merge(&mut self, o: Totals) {
        self.records += o.records;
        self.key_sum = self.key_sum.wrapping_add(o.key_sum);
        self.record_hash_sum = self.record_hash_sum.wrapping_add(o.record_hash_sum);
    }
}

/// What a run did besides its outcome, for the summary.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    /// Partitions whose readers got `PartitionLost` (each naming exactly the expected maps).
    pub partitions_lost: u64,
    /// Maps re-run after `PartitionLost`.
    pub maps_repaired: u64,
    /// Map attempts run again after an attempt failed on a worker fault.
    pub attempts_retried: u64,
    /// Whether the process fault was injected (its moment came).
    pub injected: bool,
}

/// How a run ended, and what it recovered from.
#[derive(Clone, Debug)]
pub struct ClusterRun {
    pub outcome: Outcome,
    pub recovery: Recovery,
}

/// Progress shared by writers and readers; the one that reaches the
/// seeded moment fires the fault there and then.
struct Progress {
    pushed: AtomicU64,
    read: AtomicU64,
    /// Set just before the signal is sent.
    fired: AtomicBool,
    /// When to fire, and what.
    trigger: Option<(Moment, Action)>,
    fired_signal: tokio::sync::Notify,
    /// Why firing failed, if it did.
    fire_error: Mutex<Option<String>>,
    attempts_retried: AtomicU64,
}

impl Progress {
    fn pushed_one(&self) {
        let n = self.pushed.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some((Moment::Pushed(at), _)) = self.trigger
            && n >= at
        {
            self.fire();
        }
    }

    fn read_block(&self) {
        let n = self.read.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some((Moment::Read(at), _)) = self.trigger
            && n >= at
        {
            self.fire();
        }
    }

    fn fire(&self) {
        let Some((_, action)) = self.trigger else { return };
        if !self.fired.swap(true, Ordering::SeqCst) {
            match action {
                // SAFETY: kill(2) on the pid of a child this process started and has not reaped.
                Action::Signal(pid, signal) => unsafe {
                    libc::kill(pid, signal);
                },
                Action::Partition(admin, millis) => {
                    if let Err(e) = post_partition(admin, millis) {
                        *self.fire_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e);
                    }
                }
            }
            self.fired_signal.notify_one();
        }
    }

    fn has_fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

/// A process fault to fire.
#[derive(Clone, Copy, Debug)]
enum Action {
    /// Send the signal (SIGKILL, or SIGSTOP to cut the process off) to the pid.
    Signal(libc::pid_t, libc::c_int),
    /// Partition the worker whose admin listener is there for so many milliseconds.
    Partition(std::net::SocketAddr, u64),
}

/// `POST /fault/partition?millis=N` to the admin listener at `admin`.
fn post_partition(admin: std::net::SocketAddr, millis: u64) -> Result<(), String> {
    use std::io::{Read, Write};
    let fail = |e: &dyn fmt::Display| format!("partitioning the worker at {admin}: {e}");
    let mut stream = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(5)).map_err(|e| fail(&e))?;
    write!(
        stream,
        "POST /fault/partition?millis={millis} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .map_err(|e| fail(&e))?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| fail(&e))?;
    if response.starts_with("HTTP/1.1 200") { Ok(()) } else { Err(fail(&response.trim_end())) }
}

/// Runs `plan` on a fresh cluster.
pub async fn run(plan: &ClusterPlan) -> ClusterRun {
    match tokio::time::timeout(RUN_TIMEOUT, run_inner(plan)).await {
        Ok(run) => run,
        Err(_) => ClusterRun {
            outcome: failed(format!("the run did not end within {RUN_TIMEOUT:?}")),
            recovery: Recovery::default(),
        },
    }
}

fn failed(reason: String) -> Outcome {
    Outcome::Failed { reason, lost: 0, duplicated: 0 }
}

/// Runs `f` on the cluster on a blocking thread; a panic of the fixture (a
/// process that did not start in time, say) becomes an error.
async fn with_cluster<T: Send + 'static>(
    cluster: &Arc<Mutex<Cluster>>,
    f: impl FnOnce(&mut Cluster) -> T + Send + 'static,
) -> Result<T, String> {
    let cluster = cluster.clone();
    tokio::task::spawn_blocking(move || {
        let mut c = cluster.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut c)
    })
    .await
    .map_err(|e| format!("the cluster fixture failed: {e}"))
}

async fn run_inner(plan: &ClusterPlan) -> ClusterRun {
    let worker_args = [
        "--memory".to_string(),
        format!("{}MiB", plan.memory_mib),
        "--flush-size".into(),
        "1MiB".into(),
        "--fault-injection".into(),
    ];
    // A rolling restart must not outlast the worker time-out (the existing
    // rolling-restart test uses 10 s too); kills use the fixture's 1.5 s.
    let timeout = match plan.fault {
        ClusterFault::RestartWorker { .. } => "10s",
        _ => crate::cluster::WORKER_TIMEOUT,
    };
    let started = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = worker_args.iter().map(String::as_str).collect();
        Cluster::start_with_timeout(WORKERS, &args, timeout)
    })
    .await;
    let cluster = match started {
        Ok(c) => Arc::new(Mutex::new(c)),
        Err(e) => {
            return ClusterRun { outcome: failed(format!("starting the cluster: {e}")), recovery: Recovery::default() };
        }
    };
    let mut recovery = Recovery::default();
    let outcome = match drive(plan, &cluster, &mut recovery).await {
        Ok(got) => judge(plan, got),
        Err(reason) => failed(reason),
    };
    // Stop every process before the cluster's directory goes.
    let _ = with_cluster(&cluster, |c| {
        for i in 0..WORKERS {
            c.kill_worker(i);
        }
        c.kill_coordinator();
    })
    .await;
    ClusterRun { outcome, recovery }
}

fn judge(plan: &ClusterPlan, got: Totals) -> Outcome {
    let want = plan.expected();
    if got == want {
        return Outcome::Exact;
    }
    Outcome::Failed {
        reason: format!("received {got:?}, expected {want:?}"),
        lost: want.records.saturating_sub(got.records),
        duplicated: got.records.saturating_sub(want.records),
    }
}

/// The client side of a run: what every task of the job shares.
#[derive(Clone)]
struct Job {
    plan: Arc<ClusterPlan>,
    client: ShuffleClient,
    /// Options that join the job's app (for readers with a connection of their own).
    join: ClientOptions,
    coordinator: std::net::SocketAddr,
    progress: Arc<Progress>,
}

const SHUFFLE: ShuffleId = ShuffleId(1);

/// How one map ended: its committed attempt, and whether that attempt
/// began (its writer was open) before the process fault fired.
#[derive(Clone, Copy, Debug)]
struct MapDone {
    attempt: u32,
    began_before_fault: bool,
}

async fn drive(plan: &ClusterPlan, cluster: &Arc<Mutex<Cluster>>, recovery: &mut Recovery) -> Result<Totals, String> {
    let (coordinator, options, pids, admins) = with_cluster(cluster, |c| {
        let pids: Vec<libc::pid_t> = (0..WORKERS).map(|i| c.worker(i).child.id() as libc::pid_t).collect();
        let admins: Vec<std::net::SocketAddr> = (0..WORKERS).map(|i| c.worker(i).metrics_addr).collect();
        (c.coordinator_addr, c.options("chaos-cluster"), (pids, c.coordinator().child.id() as libc::pid_t), admins)
    })
    .await?;
    let options = options.same_host(plan.same_host);
    let client = ShuffleClient::connect(coordinator, options.clone()).await.map_err(|e| format!("connecting: {e}"))?;
    if !client.is_cluster() {
        return Err("the client does not see a cluster".into());
    }
    let mut join = options.clone();
    join.app = client.credentials().app.clone();
    join.secret = Some(client.credentials().secret.clone());
    client.register_shuffle(SHUFFLE, plan.spec()).await.map_err(|e| format!("registering: {e}"))?;
    let placement: Placement = client
        .placement(SHUFFLE)
        .await
        .map_err(|e| format!("placement: {e}"))?
        .ok_or("a cluster shuffle has a placement")?;
    let trigger = match plan.fault {
        ClusterFault::KillWorker { worker, at } => Some((at, Action::Signal(pids.0[worker], libc::SIGKILL))),
        ClusterFault::KillCoordinator { at, .. } => Some((at, Action::Signal(pids.1, libc::SIGKILL))),
        ClusterFault::CutOffWorker { worker, at, .. } => Some((at, Action::Signal(pids.0[worker], libc::SIGSTOP))),
        ClusterFault::PartitionWorker { worker, at, millis } => Some((at, Action::Partition(admins[worker], millis))),
        ClusterFault::RestartWorker { .. } => None,
    };
    let progress = Arc::new(Progress {
        pushed: AtomicU64::new(0),
        read: AtomicU64::new(0),
        fired: AtomicBool::new(false),
        trigger,
        fired_signal: tokio::sync::Notify::new(),
        fire_error: Mutex::new(None),
        attempts_retried: AtomicU64::new(0),
    });
    // The coordinator comes back `down_millis` after its kill.
    let restarter = match plan.fault {
        ClusterFault::KillCoordinator { down_millis, .. } => {
            let (progress, cluster) = (progress.clone(), cluster.clone());
            Some(tokio::spawn(async move {
                progress.fired_signal.notified().await;
                tokio::time::sleep(Duration::from_millis(down_millis)).await;
                with_cluster(&cluster, |c| {
                    c.kill_coordinator(); // reaps the killed process
                    c.start_coordinator();
                })
                .await
            }))
        }
        // A cut-off worker comes back `millis` after it was cut off.
        ClusterFault::CutOffWorker { worker, millis, .. } => {
            let (progress, pid) = (progress.clone(), pids.0[worker]);
            Some(tokio::spawn(async move {
                progress.fired_signal.notified().await;
                tokio::time::sleep(Duration::from_millis(millis)).await;
                // SAFETY: kill(2) on the pid of a child this process started and has not reaped.
                unsafe { libc::kill(pid, libc::SIGCONT) };
                Ok::<(), String>(())
            }))
        }
        _ => None,
    };
    let job =
        Job { plan: Arc::new(plan.clone()), client: client.clone(), join, coordinator, progress: progress.clone() };

    // Hybrid readers run alongside the maps; the others read once every map committed.
    let early_readers = plan.pipelined().then(|| spawn_readers(&job, (0..plan.partitions).collect()));
    let mut done: BTreeMap<u32, MapDone> = BTreeMap::new();
    let map_result = match plan.fault {
        ClusterFault::RestartWorker { worker, after_maps } => {
            let first = run_maps(&job, 0..after_maps.min(plan.maps)).await;
            match first {
                Ok(d) => {
                    done.extend(d);
                    rolling_restart(cluster, worker).await?;
                    progress.fired.store(true, Ordering::SeqCst);
                    run_maps(&job, after_maps.min(plan.maps)..plan.maps).await
                }
                Err(e) => Err(e),
            }
        }
        _ => run_maps(&job, 0..plan.maps).await,
    };
    let map_result = map_result.map(|d| done.extend(d));
    let readers = match (early_readers, &map_result) {
        (Some(r), Ok(())) => r,
        (Some(r), Err(_)) => {
            // They would wait for maps that never commit.
            for (_, task) in &r {
                task.abort();
            }
            Vec::new()
        }
        (None, Ok(())) => spawn_readers(&job, (0..plan.partitions).collect()),
        (None, Err(_)) => Vec::new(),
    };
    let reads = collect(readers).await;
    if let Some(restarter) = restarter {
        // A run that ended before its moment never killed the coordinator.
        if progress.has_fired() {
            restarter.await.map_err(|e| e.to_string())??;
        } else {
            restarter.abort();
        }
    }
    recovery.injected = progress.has_fired();
    if let Some(e) = progress.fire_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
        return Err(e);
    }
    recovery.attempts_retried = progress.attempts_retried.load(Ordering::Relaxed);
    map_result?;
    let mut reads = reads?;
    if plan.reruns_forbidden() && recovery.attempts_retried > 0 {
        return Err(format!(
            "{} map attempts had to run again, but this fault ({}) must cost no re-run",
            recovery.attempts_retried,
            plan.fault.kind()
        ));
    }

    // Partitions lost with a worker: check what the readers were told,
    // re-run exactly those maps, read those partitions again.
    let mut totals = Totals::default();
    let mut round = 0;
    loop {
        let mut lost: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (p, read) in reads {
            match read {
                Read::Whole(t) => totals.merge(t),
                Read::Lost(maps) => {
                    lost.insert(p, maps);
                }
            }
        }
        if lost.is_empty() {
            break;
        }
        if !plan.may_lose() {
            return Err(format!("partitions {lost:?} were reported lost, but this plan must lose nothing"));
        }
        let victim = match plan.fault {
            ClusterFault::KillWorker { worker, .. } => format!("w{worker}"),
            _ => unreachable!("may_lose"),
        };
        if round == 0 {
            check_lost_maps(plan, &placement, &victim, &done, &lost)?;
        }
        round += 1;
        if round > MAX_REPAIR_ROUNDS {
            return Err(format!("partitions {lost:?} were still lost after {MAX_REPAIR_ROUNDS} repairs"));
        }
        recovery.partitions_lost += lost.len() as u64;
        let rerun: BTreeSet<u32> = lost.values().flatten().copied().collect();
        for &m in &rerun {
            let attempt = REPAIR_ATTEMPTS + round * 10;
            let (_, outcome) = write_map(&job, m, attempt, None, None).await;
            match outcome {
                Ok(CommitOutcome::Committed) => recovery.maps_repaired += 1,
                other => return Err(format!("the re-run of lost map {m} (attempt {attempt}) ended {other:?}")),
            }
        }
        reads = collect(spawn_readers(&job, lost.keys().copied().collect())).await?;
    }
    let _ = client.unregister_app().await;
    client.close().await;
    Ok(totals)
}

/// SIGTERM to worker `worker`, which must exit 0; started again, and back
/// in the coordinator's list (registered anew) before the job goes on.
async fn rolling_restart(cluster: &Arc<Mutex<Cluster>>, worker: usize) -> Result<(), String> {
    let code = with_cluster(cluster, move |c| c.stop_worker(worker)).await?;
    if code != Some(0) {
        return Err(format!("worker w{worker} exited {code:?} after SIGTERM, not 0"));
    }
    with_cluster(cluster, move |c| {
        c.start_worker(worker);
        let id = format!("w{worker}");
        c.wait_until(Duration::from_secs(30), &format!("{id} registered again"), |c| {
            c.status()["workers"].as_array().is_some_and(|ws| {
                ws.iter().any(|w| w["id"] == id.as_str() && w["state"] == "Live" && w["connected"] == true)
            })
        });
    })
    .await
}

/// With one copy, a partition of the killed worker's groups must be
/// reported lost naming exactly the maps whose committed attempt wrote to
/// its group and began before the kill (an attempt that began after it and
/// committed pushed to the group's new copy); no other partition may be.
fn check_lost_maps(
    plan: &ClusterPlan,
    placement: &Placement,
    victim: &str,
    done: &BTreeMap<u32, MapDone>,
    lost: &BTreeMap<u32, Vec<u32>>,
) -> Result<(), String> {
    let index = placement.index_of(victim).ok_or_else(|| format!("{victim} is not in the placement"))?;
    let writes: Vec<BTreeSet<u32>> = (0..plan.maps).map(|m| plan.partitions_of(m)).collect();
    for (&p, named) in lost {
        let (g, group) = placement.group_of(p).ok_or_else(|| format!("partition {p} has no group"))?;
        if group.copies != [index] {
            return Err(format!("partition {p} was reported lost, but its group {g} had copies {:?}", group.copies));
        }
        let in_group: BTreeSet<u32> =
            (0..plan.partitions).filter(|q| placement.group_of(*q).map(|x| x.0) == Some(g)).collect();
        let expected: Vec<u32> = (0..plan.maps)
            .filter(|m| {
                done.get(m).is_some_and(|d| d.began_before_fault) && !writes[*m as usize].is_disjoint(&in_group)
            })
            .collect();
        let mut named = named.clone();
        named.sort_unstable();
        if named != expected {
            let committed: Vec<String> = done
                .iter()
                .map(|(m, d)| {
                    format!(
                        "{m}: attempt {} began {} the kill",
                        d.attempt,
                        if d.began_before_fault { "before" } else { "after" }
                    )
                })
                .collect();
            return Err(format!(
                "partition {p} (group {g} on {victim}) was reported lost naming maps {named:?}; expected {expected:?} \
                 (committed: {})",
                committed.join(", ")
            ));
        }
    }
    Ok(())
}

/// Runs maps `maps` at once; returns how each committed.
async fn run_maps(job: &Job, maps: std::ops::Range<u32>) -> Result<BTreeMap<u32, MapDone>, String> {
    let tasks: Vec<_> = maps
        .map(|m| {
            let job = job.clone();
            (m, tokio::spawn(async move { run_map(&job, m).await }))
        })
        .collect();
    let mut done = BTreeMap::new();
    let mut first_error = None;
    for (m, task) in tasks {
        match task.await {
            Ok(Ok(d)) => {
                done.insert(m, d);
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(format!("map {m}: {e}"));
            }
            Err(e) => {
                first_error.get_or_insert(format!("map {m}: {e}"));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

/// Whether an attempt's failure is what a process fault does to it (its
/// worker or coordinator went away, its blocks were lost), so the map is run
/// again as a new attempt.
fn fault_error(e: &ClientError) -> bool {
    e.is_unreachable() || matches!(e.service_kind(), Some(ErrorKind::DataLost))
}

/// Whether a losing attempt heard that it lost, at its end or mid-push.
fn lost_the_race(r: &Result<CommitOutcome, ClientError>) -> bool {
    match r {
        Ok(CommitOutcome::Refused { .. }) => true,
        Err(e) => matches!(e.service_kind(), Some(ErrorKind::AttemptSuperseded | ErrorKind::ShuffleSealed)),
        _ => false,
    }
}

/// Runs one map with its task fault, then again as new attempts while its
/// attempts fail on a process fault.
async fn run_map(job: &Job, map: u32) -> Result<MapDone, ClientError> {
    let plan = &job.plan;
    let mut results: Vec<(u32, bool, Result<CommitOutcome, ClientError>)> = Vec::new();
    let mut push = |attempt, (before, r)| results.push((attempt, before, r));
    match plan.map_fault(map) {
        Some(Fault::KillMapMidPush { after, .. }) => {
            let (before, abandoned) = write_map(job, map, 0, Some(after), None).await;
            if let Ok(outcome) = abandoned {
                // The records ran out before the kill point: it ended normally.
                push(0, (before, Ok(outcome)));
            }
            push(1, write_map(job, map, 1, None, None).await);
        }
        Some(Fault::StallProducer { millis, .. }) => {
            let at = map_range(plan.records, plan.maps, map).count() as u64 / 2;
            push(0, write_map(job, map, 0, None, Some((at, Duration::from_millis(millis)))).await);
        }
        Some(Fault::DuplicateAttempts { .. }) => {
            let (a, b) = tokio::join!(write_map(job, map, 10, None, None), write_map(job, map, 11, None, None));
            let strict = ![&a.1, &b.1].iter().any(|r| r.as_ref().is_err_and(fault_error));
            let committed = [&a.1, &b.1].iter().filter(|r| matches!(r, Ok(CommitOutcome::Committed))).count();
            let refused = [&a.1, &b.1].iter().filter(|r| lost_the_race(r)).count();
            if strict && (committed != 1 || refused != 1) {
                return Err(ClientError::Protocol(format!(
                    "duplicate attempts: not exactly one committed: {:?} / {:?}",
                    a.1, b.1
                )));
            }
            push(10, a);
            push(11, b);
        }
        Some(Fault::OutOfOrderAttempts { .. }) => {
            let late = {
                let job = job.clone();
                tokio::spawn(async move { write_map(&job, map, 20, None, Some((1, Duration::from_millis(400)))).await })
            };
            let early = write_map(job, map, 21, None, None).await;
            let late = late.await.map_err(|e| ClientError::Protocol(e.to_string()))?;
            let strict = !early.1.as_ref().is_err_and(fault_error) && !late.1.as_ref().is_err_and(fault_error);
            // A process fault can hold up either attempt (its commit waits for
            // the coordinator to come back, its pushes fail over to a replica),
            // and the first to commit wins: then either order is right.
            let held_up = job.progress.has_fired();
            if strict && held_up {
                let one_each = match (&early.1, &late.1) {
                    (Ok(CommitOutcome::Committed), r) => {
                        r.is_err() && lost_the_race(r)
                            || matches!(r, Ok(CommitOutcome::Refused { committed_attempt: 21 }))
                    }
                    (r, Ok(CommitOutcome::Committed)) => {
                        r.is_err() && lost_the_race(r)
                            || matches!(r, Ok(CommitOutcome::Refused { committed_attempt: 20 }))
                    }
                    _ => false,
                };
                if !one_each {
                    return Err(ClientError::Protocol(format!(
                        "attempts 21 and 20 did not end with one commit: {:?} / {:?}",
                        early.1, late.1
                    )));
                }
            } else if strict {
                if !matches!(early.1, Ok(CommitOutcome::Committed)) {
                    return Err(ClientError::Protocol(format!("the later attempt ended {:?}", early.1)));
                }
                // Refused at its end, or told mid-push that the other attempt (or every map) committed.
                let refused = matches!(late.1, Ok(CommitOutcome::Refused { committed_attempt: 21 }))
                    || (late.1.is_err() && lost_the_race(&late.1));
                if !refused {
                    return Err(ClientError::Protocol(format!("the earlier attempt ended {:?}", late.1)));
                }
            }
            push(21, early);
            push(20, late);
        }
        _ => push(0, write_map(job, map, 0, None, None).await),
    }
    settle(job, map, results).await
}

/// The map's committed attempt among `results`, or new attempts until one commits.
async fn settle(
    job: &Job,
    map: u32,
    mut results: Vec<(u32, bool, Result<CommitOutcome, ClientError>)>,
) -> Result<MapDone, ClientError> {
    let mut retry = 0;
    loop {
        let committed: Vec<&(u32, bool, _)> =
            results.iter().filter(|(_, _, r)| matches!(r, Ok(CommitOutcome::Committed))).collect();
        if committed.len() > 1 {
            let attempts: Vec<u32> = committed.iter().map(|c| c.0).collect();
            return Err(ClientError::Protocol(format!("attempts {attempts:?} of map {map} were all told Committed")));
        }
        if let Some((attempt, before, _)) = committed.first() {
            return Ok(MapDone { attempt: *attempt, began_before_fault: *before });
        }
        // An attempt told it was refused in favour of one of ours that heard no answer.
        let winner = results.iter().find_map(|(_, _, r)| match r {
            Ok(CommitOutcome::Refused { committed_attempt }) => Some(*committed_attempt),
            _ => None,
        });
        if let Some(w) = winner {
            return match results.iter().find(|(a, _, _)| *a == w) {
                Some((attempt, before, _)) => Ok(MapDone { attempt: *attempt, began_before_fault: *before }),
                None => {
                    Err(ClientError::Protocol(format!("map {map}: attempt {w}, which this job never ran, committed")))
                }
            };
        }
        // Nothing committed: run the map again if a process fault failed an
        // attempt and the others lost to it or failed the same way.
        let faulted = results.iter().any(|(_, _, r)| r.as_ref().is_err_and(fault_error));
        let explained = results.iter().all(|(_, _, r)| r.as_ref().is_err_and(fault_error) || lost_the_race(r));
        if !(faulted && explained) || retry >= MAX_MAP_RETRIES {
            let ends: Vec<String> = results.iter().map(|(a, _, r)| format!("attempt {a}: {r:?}")).collect();
            return Err(ClientError::Protocol(format!(
                "map {map} did not commit after {retry} re-runs: {}",
                ends.join("; ")
            )));
        }
        tracing::info!(map, "an attempt failed on a process fault; running the map again");
        job.progress.attempts_retried.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(RETRY_PAUSE).await;
        let attempt = RETRY_ATTEMPTS + retry;
        retry += 1;
        let (before, r) = write_map(job, map, attempt, None, None).await;
        results.push((attempt, before, r));
    }
}

/// Writes map `map` as `attempt` (abandoned after `stop_after` records if
/// given, pausing at `stall`); returns whether its writer was open before
/// the process fault fired, and how it ended.
async fn write_map(
    job: &Job,
    map: u32,
    attempt: u32,
    stop_after: Option<u64>,
    stall: Option<(u64, Duration)>,
) -> (bool, Result<CommitOutcome, ClientError>) {
    let mut writer = match job.client.writer(SHUFFLE, map, attempt).await {
        Ok(w) => w,
        Err(e) => return (false, Err(e)),
    };
    let before = !job.progress.has_fired();
    let result = async {
        let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
        for (n, i) in map_range(job.plan.records, job.plan.maps, map).enumerate() {
            if stop_after == Some(n as u64) {
                writer.abort();
                return Err(ClientError::ConnectionLost("attempt killed by the fault suite".into()));
            }
            if let Some((at, pause)) = stall
                && at == n as u64
            {
                writer.flush().await?;
                tokio::time::sleep(pause).await;
            }
            let partition = job.plan.record(map, i, &mut key, &mut value);
            writer.write(partition, &key, &value).await?;
            job.progress.pushed_one();
        }
        writer.finish().await
    }
    .await;
    (before, result)
}

/// How a partition's read ended.
#[derive(Debug)]
enum Read {
    Whole(Totals),
    /// `PartitionLost`, naming these maps.
    Lost(Vec<u32>),
}

type ReaderTask = (u32, tokio::task::JoinHandle<Result<Read, ClientError>>);

fn spawn_readers(job: &Job, partitions: Vec<u32>) -> Vec<ReaderTask> {
    partitions
        .into_iter()
        .map(|p| {
            let job = job.clone();
            (p, tokio::spawn(async move { read_with_faults(&job, p).await }))
        })
        .collect()
}

async fn collect(readers: Vec<ReaderTask>) -> Result<Vec<(u32, Read)>, String> {
    let mut reads = Vec::new();
    let mut first_error = None;
    for (p, task) in readers {
        match task.await {
            Ok(Ok(read)) => reads.push((p, read)),
            Ok(Err(e)) => {
                first_error.get_or_insert(format!("partition {p}: {e}"));
            }
            Err(e) => {
                first_error.get_or_insert(format!("partition {p}: {e}"));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(reads),
    }
}

async fn read_with_faults(job: &Job, p: u32) -> Result<Read, ClientError> {
    let faults = &job.plan.task_faults;
    let drop_after = faults.iter().find_map(|f| match f {
        Fault::DropConnectionMidRead { partition, after_blocks } if *partition == p => Some(*after_blocks),
        _ => None,
    });
    let stall = faults.iter().find_map(|f| match f {
        Fault::StallReader { partition, millis } if *partition == p => Some(Duration::from_millis(*millis)),
        _ => None,
    });
    if let Some(after) = drop_after {
        // A client of its own, dropped with its connections mid-read.
        let own = join_app(job).await?;
        let first = read_partition(job, &own, p, Some(after), None).await;
        own.close().await;
        if let Some(whole) = first? {
            return Ok(whole); // the partition had fewer blocks than the drop point, or was lost
        }
    }
    read_partition(job, &job.client, p, None, stall).await.map(|r| r.unwrap_or(Read::Whole(Totals::default())))
}

/// A new client of the job's app, as a task started mid-job connects. The
/// client itself waits out a coordinator that is down, or back but not yet
/// told of the app by the workers (it says `Unavailable` until then), for
/// up to `coordinator_wait`.
async fn join_app(job: &Job) -> Result<ShuffleClient, ClientError> {
    ShuffleClient::connect(job.coordinator, job.join.clone()).await
}

/// Reads partition `p`; a hybrid reader told of a failed producer reads
/// again. `None` when dropped after `drop_after` blocks.
async fn read_partition(
    job: &Job,
    client: &ShuffleClient,
    p: u32,
    drop_after: Option<u32>,
    stall: Option<Duration>,
) -> Result<Option<Read>, ClientError> {
    let lost = |e: ClientError| match e {
        ClientError::PartitionLost { partition, maps, .. } if partition == p => Ok(Some(Read::Lost(maps))),
        other => Err(other),
    };
    'reread: loop {
        let mut reader = match client.reader(SHUFFLE, p).await {
            Ok(r) => r,
            Err(e) => return lost(e),
        };
        let mut totals = Totals::default();
        let mut blocks = 0u32;
        loop {
            let block = match reader.next_block().await {
                Ok(Some(block)) => block,
                Ok(None) => return Ok(Some(Read::Whole(totals))),
                Err(ClientError::ProducerFailed { rereadable: true, .. }) => continue 'reread,
                Err(e) => return lost(e),
            };
            blocks += 1;
            job.progress.read_block();
            if drop_after.is_some_and(|n| blocks > n) {
                return Ok(None);
            }
            if blocks == 2
                && let Some(pause) = stall
            {
                tokio::time::sleep(pause).await;
            }
            for (key, value) in block.records() {
                if w1_partition(key, job.plan.partitions) != p {
                    return Err(ClientError::Protocol(format!("partition {p} got a key of another")));
                }
                totals.add(key, value);
            }
        }
    }
}
