//! The seeded fault suite: small W1- and W2-style jobs against a real daemon
//! in a child process while a seed chooses the faults.
//!
//! Every run checks its result: count and checksum exact, or, where no
//! recovery is possible (a bit flipped in a stored file, the disk reserve
//! hit), a clear error naming the cause — and then the server still serves
//! a job of another app exactly. A run prints its seed, so `shuffle-chaos
//! --seed S` reproduces it.
//!
//! [`cluster`] holds the cluster plans: a coordinator and three workers,
//! with a worker or the coordinator killed, or a worker restarted, mid-job.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use shuffle_client::{
    AppCredentials, ClientError, ClientOptions, CommitOutcome, ErrorKind, ExchangeMode, ShuffleClient, ShuffleId,
    ShuffleSpec, SpillStrategy,
};

pub mod cluster;

use crate::{
    daemon::Daemon,
    workload::{W1_KEY_LEN, W1_VALUE_LEN, map_range, splitmix64, w1_partition, w1_record},
};

/// A deterministic random source: SplitMix64 over a counter.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        splitmix64(self.0)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The faults a seed can choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// A map attempt is abandoned part-way through its push; a new attempt redoes it.
    KillMapMidPush { map: u32, after: u64 },
    /// A reader's connection is dropped part-way through a partition; it is read again.
    DropConnectionMidRead { partition: u32, after_blocks: u32 },
    /// A producer stops pushing for a while.
    StallProducer { map: u32, millis: u64 },
    /// A reader stops reading for a while.
    StallReader { partition: u32, millis: u64 },
    /// Two attempts of one map run at once; one commits.
    DuplicateAttempts { map: u32 },
    /// A later attempt of a map ends before the earlier one.
    OutOfOrderAttempts { map: u32 },
    /// A bit of a stored data file is flipped after the maps commit.
    FlipBitInStoredFile,
    /// The daemon's disk reserve leaves almost no room.
    DiskReserveHit,
    /// The daemon is stopped with SIGTERM after some maps commit and started again.
    GracefulRestart { after_maps: u32 },
}

impl Fault {
    /// The fault's kind, for the summary.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::KillMapMidPush { .. } => "map attempt killed mid-push",
            Self::DropConnectionMidRead { .. } => "connection dropped mid-read",
            Self::StallProducer { .. } => "producer stalled",
            Self::StallReader { .. } => "reader stalled",
            Self::DuplicateAttempts { .. } => "duplicate attempts",
            Self::OutOfOrderAttempts { .. } => "attempts out of order",
            Self::FlipBitInStoredFile => "bit flipped in a stored file",
            Self::DiskReserveHit => "disk reserve hit",
            Self::GracefulRestart { .. } => "daemon restarted gracefully",
        }
    }
}

/// What a run shuffles.
#[derive(Clone, Copy, Debug)]
pub enum Job {
    /// W1: 100-byte records, partitioned by `xxhash64(key) mod R`.
    Exchange { mode: ExchangeMode },
    /// W2-style: key `splitmix64(seed ^ i) mod K`, value `i`; sums per key.
    Groupby { keys: u64 },
}

/// One seeded run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub seed: u64,
    pub job: Job,
    pub records: u64,
    pub maps: u32,
    pub partitions: u32,
    /// The daemon's memory budget, in MiB (small, so data spills).
    pub memory_mib: u64,
    /// Whether the client may use the daemon's Unix socket.
    pub same_host: bool,
    pub faults: Vec<Fault>,
}

impl Plan {
    /// The plan seed `seed` chooses.
    pub fn from_seed(seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let job = match rng.below(4) {
            0 => Job::Exchange { mode: ExchangeMode::Hash },
            1 => Job::Exchange { mode: ExchangeMode::Sort },
            2 => Job::Exchange { mode: ExchangeMode::Hybrid },
            _ => Job::Groupby { keys: 100 + rng.below(5000) },
        };
        let maps = 2 + rng.below(3) as u32;
        let partitions = 2 + rng.below(7) as u32;
        let records = 20_000 + rng.below(60_000);
        let mut faults = Vec::new();
        let count = 1 + rng.below(2);
        while (faults.len() as u64) < count {
            let map = rng.below(u64::from(maps)) as u32;
            let partition = rng.below(u64::from(partitions)) as u32;
            let fault = match rng.below(9) {
                0 => Fault::KillMapMidPush { map, after: rng.below(records / u64::from(maps)) },
                1 => Fault::DropConnectionMidRead { partition, after_blocks: rng.below(4) as u32 },
                2 => Fault::StallProducer { map, millis: 50 + rng.below(700) },
                3 => Fault::StallReader { partition, millis: 50 + rng.below(700) },
                4 => Fault::DuplicateAttempts { map },
                5 => Fault::OutOfOrderAttempts { map },
                6 => Fault::FlipBitInStoredFile,
                7 => Fault::DiskReserveHit,
                _ => Fault::GracefulRestart { after_maps: rng.below(u64::from(maps) + 1) as u32 },
            };
            // Hybrid readers stream while the maps run: a restart or a bit flip would race them.
            let pipelined = matches!(job, Job::Exchange { mode: ExchangeMode::Hybrid });
            if pipelined && matches!(fault, Fault::GracefulRestart { .. } | Fault::FlipBitInStoredFile) {
                continue;
            }
            // One fault per map and per partition, and at most one of the whole-run faults.
            let clashes = faults.iter().any(|f: &Fault| std::mem::discriminant(f) == std::mem::discriminant(&fault))
                || faults.iter().any(|f| map_of(f).is_some() && map_of(f) == map_of(&fault));
            if !clashes {
                faults.push(fault);
            }
        }
        faults.sort();
        Self { seed, job, records, maps, partitions, memory_mib: 8 + rng.below(24), same_host: rng.chance(50), faults }
    }

    fn has(&self, f: impl Fn(&Fault) -> bool) -> bool {
        self.faults.iter().any(f)
    }

    fn spec(&self) -> ShuffleSpec {
        match self.job {
            Job::Exchange { mode: ExchangeMode::Sort } => ShuffleSpec::sort(self.maps, self.partitions, false),
            // Full spilling, so a reader whose connection dropped can read the partition again.
            Job::Exchange { mode: ExchangeMode::Hybrid } => {
                ShuffleSpec::hybrid(self.maps, self.partitions, SpillStrategy::Full)
            }
            _ => ShuffleSpec::hash(self.maps, self.partitions),
        }
    }

    fn pipelined(&self) -> bool {
        matches!(self.job, Job::Exchange { mode: ExchangeMode::Hybrid })
    }
}

fn map_of(fault: &Fault) -> Option<u32> {
    match fault {
        Fault::KillMapMidPush { map, .. }
        | Fault::StallProducer { map, .. }
        | Fault::DuplicateAttempts { map }
        | Fault::OutOfOrderAttempts { map } => Some(*map),
        _ => None,
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let job = match self.job {
            Job::Exchange { mode } => format!("W1 {mode:?}"),
            Job::Groupby { keys } => format!("W2 K={keys}"),
        };
        write!(
            f,
            "{job}, N={} M={} R={}, {} MiB, {}, faults {:?}",
            self.records,
            self.maps,
            self.partitions,
            self.memory_mib,
            if self.same_host { "unix socket" } else { "QUIC" },
            self.faults
        )
    }
}

/// How a run ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// The result was exact.
    Exact,
    /// A fault no job can recover from was reported as such (and the server
    /// then served another app exactly).
    Detected(String),
    /// Wrong result or an unexpected error.
    Failed { reason: String, lost: u64, duplicated: u64 },
}

/// What the reducers of a run saw: per partition, records and checksums.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Totals {
    records: u64,
    key_sum: u64,
    value_sum: u64,
}

impl Totals {
    fn merge(&mut self, o: Totals) {
        self.records += o.records;
        self.key_sum = self.key_sum.wrapping_add(o.key_sum);
        self.value_sum = self.value_sum.wrapping_add(o.value_sum);
    }
}

/// Record `i` of the plan's job: key, value and its partition.
fn record(plan: &Plan, i: u64, key: &mut Vec<u8>, value: &mut Vec<u8>) -> u32 {
    key.clear();
    value.clear();
    match plan.job {
        Job::Exchange { .. } => {
            let (mut k, mut v) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
            w1_record(plan.seed, i, &mut k, &mut v);
            key.extend_from_slice(&k);
            value.extend_from_slice(&v);
        }
        Job::Groupby { keys } => {
            key.extend_from_slice(&(splitmix64(plan.seed ^ i) % keys).to_be_bytes());
            value.extend_from_slice(&i.to_le_bytes());
        }
    }
    w1_partition(key, plan.partitions)
}

/// What the reducers must see, from the generator.
fn expected(plan: &Plan) -> Totals {
    let (mut key, mut value) = (Vec::new(), Vec::new());
    let mut t = Totals::default();
    for i in 0..plan.records {
        record(plan, i, &mut key, &mut value);
        t.merge(observe(plan, &key, &value));
    }
    t
}

fn observe(plan: &Plan, key: &[u8], value: &[u8]) -> Totals {
    let first = u64::from_be_bytes(key[..8].try_into().unwrap_or_default());
    let value_sum = match plan.job {
        Job::Groupby { .. } => u64::from_le_bytes(value.try_into().unwrap_or_default()),
        Job::Exchange { .. } => value.len() as u64,
    };
    Totals { records: 1, key_sum: first, value_sum }
}

/// Writes map `map` as `attempt`; abandons it after `stop_after` records if given.
async fn write_map(
    client: &ShuffleClient,
    plan: &Plan,
    map: u32,
    attempt: u32,
    stop_after: Option<u64>,
    stall: Option<(u64, Duration)>,
) -> Result<CommitOutcome, ClientError> {
    let mut writer = client.writer(ShuffleId(0), map, attempt).await?;
    let (mut key, mut value) = (Vec::new(), Vec::new());
    let range = map_range(plan.records, plan.maps, map);
    for (n, i) in range.enumerate() {
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
        let partition = record(plan, i, &mut key, &mut value);
        writer.write(partition, &key, &value).await?;
    }
    writer.finish().await
}

/// Reads one partition; a hybrid reader told of a failed producer reads again.
async fn read_partition(
    client: &ShuffleClient,
    plan: &Plan,
    partition: u32,
    drop_after: Option<u32>,
    stall: Option<Duration>,
) -> Result<Option<Totals>, ClientError> {
    'reread: loop {
        let mut reader = client.reader(ShuffleId(0), partition).await?;
        let mut totals = Totals::default();
        let mut blocks = 0u32;
        loop {
            let block = match reader.next_block().await {
                Ok(Some(block)) => block,
                Ok(None) => return Ok(Some(totals)),
                Err(ClientError::ProducerFailed { rereadable: true, .. }) => continue 'reread,
                Err(e) => return Err(e),
            };
            blocks += 1;
            if drop_after.is_some_and(|n| blocks > n) {
                return Ok(None); // the connection is dropped here by the caller
            }
            if blocks == 2
                && let Some(pause) = stall
            {
                tokio::time::sleep(pause).await;
            }
            for (key, value) in block.records() {
                if w1_partition(key, plan.partitions) != partition {
                    return Err(ClientError::Protocol(format!("partition {partition} got a key of another")));
                }
                totals.merge(observe(plan, key, value));
            }
        }
    }
}

/// Runs `plan` against a daemon started from `server_bin` in a fresh data dir.
pub async fn run(plan: &Plan) -> Outcome {
    let dir = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(e) => return failed(format!("temporary dir: {e}")),
    };
    run_in(plan, dir.path()).await
}

fn failed(reason: String) -> Outcome {
    Outcome::Failed { reason, lost: 0, duplicated: 0 }
}

fn daemon_args(plan: &Plan, dir: &Path) -> Vec<String> {
    let mut args =
        vec!["--memory".to_string(), format!("{}MiB", plan.memory_mib), "--flush-size".into(), "1MiB".into()];
    if plan.has(|f| matches!(f, Fault::DiskReserveHit)) {
        let available = shuffle_server::disk::available_bytes(dir).unwrap_or(0);
        args.extend(["--disk-reserve".into(), format!("{}B", available.saturating_sub(1 << 20))]);
    }
    args
}

async fn connect(
    daemon: &Daemon,
    plan: &Plan,
    credentials: Option<&AppCredentials>,
) -> Result<ShuffleClient, ClientError> {
    let options = match credentials {
        Some(c) => ClientOptions::joining(c),
        None => ClientOptions::new(format!("chaos-{}", plan.seed)),
    };
    ShuffleClient::connect(daemon.addr, options.trusted_cert(daemon.cert_path()).same_host(plan.same_host)).await
}

/// How readers that need a client of their own connect.
#[derive(Clone)]
struct Connector {
    addr: std::net::SocketAddr,
    cert: PathBuf,
    credentials: AppCredentials,
    same_host: bool,
}

impl Connector {
    async fn connect(&self) -> Result<ShuffleClient, ClientError> {
        let options = ClientOptions::joining(&self.credentials).trusted_cert(&self.cert).same_host(self.same_host);
        ShuffleClient::connect(self.addr, options).await
    }
}

async fn run_in(plan: &Plan, dir: &Path) -> Outcome {
    let args = daemon_args(plan, dir);
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start_in(dir, &arg_refs);
    let client = match connect(&daemon, plan, None).await {
        Ok(c) => c,
        Err(e) => return failed(format!("connecting: {e}")),
    };
    let credentials = client.credentials().clone();
    if let Err(e) = client.register_shuffle(ShuffleId(0), plan.spec()).await {
        return failed(format!("registering: {e}"));
    }
    let result = run_job(plan, &mut daemon, client, &credentials, dir, &arg_refs).await;
    match result {
        Ok(totals) => judge(plan, totals),
        Err(e) => match detectable(plan, &e) {
            Some(what) => match bystander_is_served(&daemon).await {
                Ok(()) => Outcome::Detected(format!("{what}: {e}")),
                Err(b) => failed(format!("{what} ({e}), and then the server failed another app: {b}")),
            },
            None => failed(format!("unexpected error: {e}")),
        },
    }
}

/// Compares what the reducers saw with the generator.
fn judge(plan: &Plan, got: Totals) -> Outcome {
    let want = expected(plan);
    if got == want {
        return Outcome::Exact;
    }
    Outcome::Failed {
        reason: format!("received {got:?}, expected {want:?}"),
        lost: want.records.saturating_sub(got.records),
        duplicated: got.records.saturating_sub(want.records),
    }
}

/// Whether `e` is the clear error a fault no job recovers from must give.
fn detectable(plan: &Plan, e: &ClientError) -> Option<&'static str> {
    let text = e.to_string();
    if plan.has(|f| matches!(f, Fault::FlipBitInStoredFile))
        && (matches!(e, ClientError::Integrity { .. }) || e.service_kind() == Some(ErrorKind::IntegrityMismatch))
        && text.contains("shuffle 0")
    {
        return Some("corruption detected");
    }
    if plan.has(|f| matches!(f, Fault::DiskReserveHit))
        && e.service_kind() == Some(ErrorKind::DiskFull)
        && text.contains("reserve")
    {
        return Some("disk full reported");
    }
    None
}

/// Another app's small job runs exactly on the daemon.
async fn bystander_is_served(daemon: &Daemon) -> Result<(), String> {
    let params =
        crate::exchange::ExchangeParams { records: 2_000, maps: 1, partitions: 2, seed: 1, mode: ExchangeMode::Hash };
    let client = daemon.connect("chaos-bystander").await.map_err(|e| e.to_string())?;
    let outcome = crate::exchange::run_exchange(&client, ShuffleId(0), params).await?;
    crate::exchange::verify(params, outcome.received)
}

async fn run_job(
    plan: &Plan,
    daemon: &mut Daemon,
    mut client: ShuffleClient,
    credentials: &AppCredentials,
    dir: &Path,
    args: &[&str],
) -> Result<Totals, ClientError> {
    let restart_after = plan.faults.iter().find_map(|f| match f {
        Fault::GracefulRestart { after_maps } => Some(*after_maps),
        _ => None,
    });
    let connector = |daemon: &Daemon| Connector {
        addr: daemon.addr,
        cert: daemon.cert_path(),
        credentials: credentials.clone(),
        same_host: plan.same_host,
    };
    // Hybrid readers run alongside the maps; the others read once the maps have committed.
    let readers = plan.pipelined().then(|| spawn_readers(&client, &connector(daemon), plan));
    let run_maps = |client: &ShuffleClient, maps: std::ops::Range<u32>| {
        let tasks: Vec<_> = maps
            .map(|map| {
                let (client, plan) = (client.clone(), plan.clone());
                tokio::spawn(async move { run_map(&client, &plan, map).await })
            })
            .collect();
        async move {
            for task in tasks {
                task.await.map_err(|e| ClientError::Protocol(e.to_string()))??;
            }
            Ok::<(), ClientError>(())
        }
    };
    match restart_after {
        Some(after) => {
            run_maps(&client, 0..after.min(plan.maps)).await?;
            drop(client);
            daemon.terminate();
            if daemon.wait_exit(Duration::from_secs(30)) != Some(0) {
                return Err(ClientError::Protocol("the daemon did not exit 0 after SIGTERM".into()));
            }
            *daemon = Daemon::start_in(dir, args);
            client = connect(daemon, plan, Some(credentials)).await?;
            run_maps(&client, after.min(plan.maps)..plan.maps).await?;
        }
        None => run_maps(&client, 0..plan.maps).await?,
    }
    if plan.has(|f| matches!(f, Fault::FlipBitInStoredFile)) {
        flip_a_bit(plan, &daemon.data_dir);
    }
    match readers {
        Some(readers) => collect(readers).await,
        None => collect(spawn_readers(&client, &connector(daemon), plan)).await,
    }
}

/// Runs one map with its faults: attempts killed, stalled, duplicated or out of order.
async fn run_map(client: &ShuffleClient, plan: &Plan, map: u32) -> Result<(), ClientError> {
    let mut attempt = 0;
    for fault in &plan.faults {
        match *fault {
            Fault::KillMapMidPush { map: m, after } if m == map => {
                let _ = write_map(client, plan, map, attempt, Some(after), None).await;
                attempt += 1;
            }
            Fault::StallProducer { map: m, millis } if m == map => {
                let at = map_range(plan.records, plan.maps, map).count() as u64 / 2;
                return expect_commit(
                    write_map(client, plan, map, attempt, None, Some((at, Duration::from_millis(millis)))).await,
                );
            }
            Fault::DuplicateAttempts { map: m } if m == map => {
                let (a, b) = tokio::join!(
                    write_map(client, plan, map, 10, None, None),
                    write_map(client, plan, map, 11, None, None)
                );
                // The loser is refused at its end, or told mid-push that the
                // other attempt (or every map) has committed.
                let lost_mid_push = |r: &Result<CommitOutcome, ClientError>| {
                    r.as_ref()
                        .err()
                        .and_then(ClientError::service_kind)
                        .is_some_and(|k| matches!(k, ErrorKind::AttemptSuperseded | ErrorKind::ShuffleSealed))
                };
                let committed = [&a, &b].iter().filter(|r| matches!(r, Ok(CommitOutcome::Committed))).count();
                let refused = [&a, &b]
                    .iter()
                    .filter(|r| matches!(r, Ok(CommitOutcome::Refused { .. })) || lost_mid_push(r))
                    .count();
                if committed != 1 || refused != 1 {
                    for r in [a, b] {
                        r?;
                    }
                    return Err(ClientError::Protocol("duplicate attempts: not exactly one committed".into()));
                }
                return Ok(());
            }
            Fault::OutOfOrderAttempts { map: m } if m == map => {
                let late = {
                    let (client, plan) = (client.clone(), plan.clone());
                    tokio::spawn(async move {
                        let stall = Some((1, Duration::from_millis(400)));
                        write_map(&client, &plan, map, 20, None, stall).await
                    })
                };
                expect_commit(write_map(client, plan, map, 21, None, None).await)?;
                let late = late.await.map_err(|e| ClientError::Protocol(e.to_string()))?;
                return match late {
                    Ok(CommitOutcome::Refused { committed_attempt: 21 }) => Ok(()),
                    // A hybrid attempt that lost may be told so mid-push.
                    Err(e) if e.service_kind() == Some(ErrorKind::AttemptSuperseded) => Ok(()),
                    other => Err(ClientError::Protocol(format!("the earlier attempt ended {other:?}"))),
                };
            }
            _ => {}
        }
    }
    expect_commit(write_map(client, plan, map, attempt, None, None).await)
}

fn expect_commit(outcome: Result<CommitOutcome, ClientError>) -> Result<(), ClientError> {
    match outcome? {
        CommitOutcome::Committed => Ok(()),
        other => Err(ClientError::Protocol(format!("expected a commit, got {other:?}"))),
    }
}

type ReaderTask = tokio::task::JoinHandle<Result<Totals, ClientError>>;

fn spawn_readers(client: &ShuffleClient, connector: &Connector, plan: &Plan) -> Vec<ReaderTask> {
    (0..plan.partitions)
        .map(|p| {
            let (client, plan, connector) = (client.clone(), plan.clone(), connector.clone());
            tokio::spawn(async move {
                let drop_after = plan.faults.iter().find_map(|f| match f {
                    Fault::DropConnectionMidRead { partition, after_blocks } if *partition == p => Some(*after_blocks),
                    _ => None,
                });
                let stall = plan.faults.iter().find_map(|f| match f {
                    Fault::StallReader { partition, millis } if *partition == p => Some(Duration::from_millis(*millis)),
                    _ => None,
                });
                if let Some(after) = drop_after {
                    // A client of its own, dropped with its connection mid-read.
                    let own = connector.connect().await?;
                    let first = read_partition(&own, &plan, p, Some(after), None).await?;
                    drop(own);
                    if let Some(whole) = first {
                        return Ok(whole); // the partition had fewer blocks than the drop point
                    }
                }
                read_partition(&client, &plan, p, None, stall).await.map(Option::unwrap_or_default)
            })
        })
        .collect()
}

async fn collect(readers: Vec<ReaderTask>) -> Result<Totals, ClientError> {
    let mut totals = Totals::default();
    for r in readers {
        totals.merge(r.await.map_err(|e| ClientError::Protocol(e.to_string()))??);
    }
    Ok(totals)
}

/// Flips one bit somewhere in one of the shuffle's data files.
fn flip_a_bit(plan: &Plan, data_dir: &Path) {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut stack = vec![data_dir.join("apps")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "data") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut rng = Rng::new(plan.seed ^ 0xF11F);
    let Some(path) = files.get(rng.below(files.len() as u64) as usize) else { return };
    let Ok(mut bytes) = std::fs::read(path) else { return };
    if bytes.is_empty() {
        return;
    }
    let at = rng.below(bytes.len() as u64) as usize;
    bytes[at] ^= 1 << rng.below(8);
    let _ = std::fs::write(path, bytes);
}

/// The summary of many runs.
#[derive(Debug, Default)]
pub struct Summary {
    pub runs: u64,
    pub exact: u64,
    pub detected: u64,
    pub failed: Vec<(u64, String)>,
    pub faults: BTreeMap<&'static str, u64>,
    pub lost: u64,
    pub duplicated: u64,
    /// What cluster runs recovered from (partitions reported lost, maps re-run, …).
    pub recovery: BTreeMap<&'static str, u64>,
}

impl Summary {
    pub fn add(&mut self, plan: &Plan, outcome: &Outcome) {
        self.record(plan.seed, plan.faults.iter().map(Fault::kind), outcome);
    }

    /// Adds a cluster run: its process fault (if its moment came) and task faults.
    pub fn add_cluster(&mut self, plan: &cluster::ClusterPlan, run: &cluster::ClusterRun) {
        let process = run.recovery.injected.then(|| plan.fault.kind());
        self.record(plan.seed, process.into_iter().chain(plan.task_faults.iter().map(Fault::kind)), &run.outcome);
        if !run.recovery.injected {
            *self.recovery.entry("process fault not injected (the job ended before its moment)").or_default() += 1;
        }
        for (what, n) in [
            ("partitions reported lost (PartitionLost named exactly the lost maps)", run.recovery.partitions_lost),
            ("lost maps re-run as new attempts", run.recovery.maps_repaired),
            ("map attempts re-run after failing on a process fault", run.recovery.attempts_retried),
        ] {
            if n > 0 {
                *self.recovery.entry(what).or_default() += n;
            }
        }
    }

    fn record(&mut self, seed: u64, kinds: impl Iterator<Item = &'static str>, outcome: &Outcome) {
        self.runs += 1;
        for kind in kinds {
            *self.faults.entry(kind).or_default() += 1;
        }
        match outcome {
            Outcome::Exact => self.exact += 1,
            Outcome::Detected(_) => self.detected += 1,
            Outcome::Failed { reason, lost, duplicated } => {
                self.failed.push((seed, reason.clone()));
                self.lost += lost;
                self.duplicated += duplicated;
            }
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} runs: {} exact, {} faults detected and reported, {} failed; records lost {}, duplicated {}",
            self.runs,
            self.exact,
            self.detected,
            self.failed.len(),
            self.lost,
            self.duplicated
        )?;
        for (kind, n) in &self.faults {
            writeln!(f, "  {n:5} × {kind}")?;
        }
        if !self.recovery.is_empty() {
            writeln!(f, "recovery:")?;
        }
        for (what, n) in &self.recovery {
            writeln!(f, "  {n:5} × {what}")?;
        }
        for (seed, reason) in &self.failed {
            writeln!(f, "  FAILED seed {seed}: {reason}")?;
        }
        Ok(())
    }
}
