//! The standard workloads of `shared/WORKLOADS.md`, each run `repeat` times
//! and verified: through raw `shuffle-client` calls or through the
//! engine-adapter job for the same workload. A run that does not verify is
//! an error, never a number.

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use engine_adapter::{
    Engine, EngineOptions, Exchange, ExecutionMode, RateSource, StopHandle,
    workload::{
        W1_KEY_LEN, W1_RECORD_LEN, W1_VALUE_LEN, W1Totals, map_range, w1_key_value, w1_partition, w1_record, w2_record,
        w4_key,
    },
};
use hdrhistogram::Histogram;
use serde::Serialize;
use shuffle_client::{ClientOptions, CommitOutcome, ExchangeMode, ShuffleClient, ShuffleId, ShuffleSpec};
use shuffle_server::{ByteSize, ServerConfig, ServerHandle};

use engine_adapter::workload::client::{ExchangeParams, run_exchange_as, run_sort_as, verify};

use crate::{baseline::median, cluster::LocalServers, rss};

/// Raw client calls or the engine's job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Client,
    Engine,
}

/// Where the shuffle server is.
#[derive(Clone, Debug)]
pub enum ServerChoice {
    /// Started in this process on an ephemeral port, with this memory budget.
    Embedded { memory: ByteSize },
    /// A running daemon; the certificate to trust and the token to present.
    Remote { addr: SocketAddr, cert: PathBuf, token: Option<String> },
    /// A standalone daemon the harness starts as a child process, with this memory budget.
    Daemon { memory: ByteSize },
    /// A coordinator and `workers` workers the harness starts as child
    /// processes on 127.0.0.1, 127.0.0.2, …, each worker with this memory
    /// budget; shuffles are registered with `replication` copies.
    Cluster { workers: usize, replication: u8, memory: ByteSize },
}

impl ServerChoice {
    /// Copies of each partition that shuffles are registered with.
    pub fn replication(&self) -> u8 {
        match self {
            ServerChoice::Cluster { replication, .. } => *replication,
            _ => 1,
        }
    }

    /// Starts the daemon or cluster this choice asks the harness to run, if any.
    fn start_processes(&self) -> anyhow::Result<Option<LocalServers>> {
        Ok(match self {
            ServerChoice::Daemon { memory } => Some(LocalServers::standalone(*memory)?),
            ServerChoice::Cluster { workers, memory, .. } => Some(LocalServers::cluster(*workers, *memory)?),
            ServerChoice::Embedded { .. } | ServerChoice::Remote { .. } => None,
        })
    }
}

impl std::fmt::Display for ServerChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerChoice::Embedded { .. } => write!(f, "embedded"),
            ServerChoice::Remote { addr, .. } => write!(f, "daemon at {addr}"),
            ServerChoice::Daemon { .. } => write!(f, "standalone daemon"),
            ServerChoice::Cluster { workers, replication, .. } => {
                write!(f, "cluster of {workers} workers, replication {replication}")
            }
        }
    }
}

/// The parameters common to every workload.
#[derive(Clone, Debug)]
pub struct Params {
    pub records: u64,
    pub maps: u32,
    pub partitions: u32,
    pub keys: u64,
    pub seed: u64,
    pub mode: ExchangeMode,
    pub via: Via,
    pub repeat: u32,
    pub server: ServerChoice,
    /// Use the server's Unix socket when it is on this host (the default);
    /// `false` keeps raw-client runs on QUIC, to measure that path.
    pub same_host: bool,
    /// The engine's operator memory budget, if not its default.
    pub engine_memory: Option<usize>,
    /// Streaming engine jobs checkpoint this often, if set.
    pub checkpoint_interval: Option<Duration>,
    /// Streaming engine jobs push buffered records at least this often, if not the engine's default.
    pub linger: Option<Duration>,
}

/// One workload in one mode, over `repeat` runs.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub workload: &'static str,
    pub mode: String,
    pub via: Via,
    pub records: u64,
    pub maps: u32,
    pub partitions: u32,
    pub input_bytes: u64,
    pub seconds: Vec<f64>,
    pub median_seconds: f64,
    pub mb_per_s: f64,
    /// Whether every run's result checked out (a run that did not is timed,
    /// reported with `verified: false`, and makes the harness exit non-zero).
    pub verified: bool,
    /// The transport the data crossed: `unix` (the same-host socket) or `quic`.
    pub transport: &'static str,
    /// Where the server ran: `embedded`, a daemon, or a cluster with its size and replication.
    pub server: String,
    /// Peak RSS of the server process during the runs (the harness's own
    /// process when the server is embedded); `None` for a remote server.
    pub server_peak_rss_bytes: Option<u64>,
    /// Peak RSS of the client process (this one) during the runs.
    pub client_peak_rss_bytes: u64,
    /// Peak anonymous RSS of this process (sampled every 50 ms): RSS
    /// without the page cache of memory-mapped shuffle files.
    pub peak_anon_rss_bytes: u64,
    /// Workload-specific figures (W4: `max_rate`, `p50_ms`, `p99_ms`, `p999_ms`, the probes).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

pub fn mode_name(mode: ExchangeMode) -> &'static str {
    match mode {
        ExchangeMode::Hash => "hash",
        ExchangeMode::Sort => "sort",
        ExchangeMode::Hybrid => "hybrid",
    }
}

/// A run whose result did not check out: how long it took and why.
#[derive(Debug)]
pub struct Unverified {
    pub elapsed: Duration,
    pub reason: String,
}

impl std::fmt::Display for Unverified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the result did not verify: {}", self.reason)
    }
}

impl std::error::Error for Unverified {}

/// The run's duration if its check passed, an [`Unverified`] error if not.
fn checked(elapsed: Duration, check: Result<(), impl std::fmt::Display>) -> anyhow::Result<Duration> {
    match check {
        Ok(()) => Ok(elapsed),
        Err(reason) => Err(Unverified { elapsed, reason: reason.to_string() }.into()),
    }
}

/// Runs `once` `repeat` times (each returns its checked duration) and builds
/// the report. A run that does not verify is kept, timed, and marks the
/// report unverified; any other failure ends the workload.
fn repeated(
    workload: &'static str,
    params: &Params,
    input_bytes: u64,
    transport: &'static str,
    mut once: impl FnMut(u32) -> anyhow::Result<Duration>,
) -> anyhow::Result<RunReport> {
    rss::reset_peak();
    let sampler = rss::AnonSampler::start();
    let progress = crate::progress::spinner(workload, mode_name(params.mode), params.repeat);
    let mut seconds = Vec::new();
    let mut verified = true;
    for run in 0..params.repeat {
        progress.set_position(u64::from(run));
        let elapsed = match once(run) {
            Ok(elapsed) => elapsed,
            Err(e) => match e.downcast::<Unverified>() {
                Ok(unverified) => {
                    eprintln!("{workload} run {}: {unverified}", run + 1);
                    verified = false;
                    unverified.elapsed
                }
                Err(e) => return Err(e.context(format!("{workload} run {}", run + 1))),
            },
        };
        seconds.push(elapsed.as_secs_f64());
    }
    progress.finish_and_clear();
    let median_seconds = median(&seconds);
    let peak = rss::peak();
    let peak_anon_rss_bytes = sampler.finish();
    Ok(RunReport {
        workload,
        mode: mode_name(params.mode).to_string(),
        via: params.via,
        records: params.records,
        maps: params.maps,
        partitions: params.partitions,
        input_bytes,
        seconds,
        median_seconds,
        mb_per_s: input_bytes as f64 / 1e6 / median_seconds,
        verified,
        transport,
        server: params.server.to_string(),
        server_peak_rss_bytes: matches!(params.server, ServerChoice::Embedded { .. }).then_some(peak),
        client_peak_rss_bytes: peak,
        peak_anon_rss_bytes,
        extra: serde_json::Map::new(),
    })
}

/// A server and a client connected to it, for raw-client runs.
struct ClientSession {
    runtime: tokio::runtime::Runtime,
    client: ShuffleClient,
    server: Option<ServerHandle>,
    _data_dir: Option<tempfile::TempDir>,
    /// The daemon or cluster the harness started for this session (killed on drop).
    processes: Option<LocalServers>,
    /// Copies of each partition the session's shuffles are registered with.
    replication: u8,
}

impl ClientSession {
    /// The transport the session's client uses (a cluster client on the
    /// workers' host reaches them through their Unix sockets).
    fn transport(&self) -> &'static str {
        let same_host = self.client.options().same_host;
        if self.client.unix_socket().is_some() || (self.client.is_cluster() && same_host) { "unix" } else { "quic" }
    }

    fn open(server: &ServerChoice, same_host: bool, app: &str) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let processes = server.start_processes()?;
        if let Some(processes) = processes {
            eprintln!("started {processes}");
            let options = processes.options(app).same_host(same_host);
            let client = runtime.block_on(ShuffleClient::connect(processes.front.addr, options))?;
            ensure!(
                client.is_cluster() == processes.is_cluster(),
                "the client sees a {}cluster, but the harness started a {}",
                if client.is_cluster() { "" } else { "non-" },
                server
            );
            let replication = server.replication();
            return Ok(Self {
                runtime,
                client,
                server: None,
                _data_dir: None,
                processes: Some(processes),
                replication,
            });
        }
        let (client, server, data_dir) = runtime.block_on(async {
            match server {
                ServerChoice::Embedded { memory } => {
                    let dir = tempfile::tempdir()?;
                    let config = ServerConfig {
                        listen: "127.0.0.1:0".parse()?,
                        data_dir: dir.path().to_path_buf(),
                        memory: *memory,
                        // A small budget (W5 scaled down) still needs room for several partitions' buffers.
                        flush_size: ByteSize((8 << 20).min(memory.0 / 4)),
                        ..ServerConfig::default()
                    };
                    let server = shuffle_server::start(config).await?;
                    let options = ClientOptions::new(app).trusted_cert(server.cert_path()).same_host(same_host);
                    let client = ShuffleClient::connect(server.local_addr(), options).await?;
                    anyhow::Ok((client, Some(server), Some(dir)))
                }
                ServerChoice::Remote { addr, cert, token } => {
                    let mut options = ClientOptions::new(app).trusted_cert(cert).same_host(same_host);
                    options.auth_token = token.clone();
                    anyhow::Ok((ShuffleClient::connect(*addr, options).await?, None, None))
                }
                ServerChoice::Daemon { .. } | ServerChoice::Cluster { .. } => unreachable!("started above"),
            }
        })?;
        Ok(Self { runtime, client, server, _data_dir: data_dir, processes: None, replication: 1 })
    }

    /// One verified W1 (or, with `sort`, W3) run as shuffle `run`, unregistered after.
    fn w1_or_w3(&self, p: &Params, run: u32, sort: bool) -> anyhow::Result<Duration> {
        let params = exchange_params(p);
        self.runtime.block_on(async {
            let shuffle = ShuffleId(run);
            let outcome = if sort {
                let spec = ShuffleSpec::sort(params.maps, params.partitions, true).replicated(self.replication);
                run_sort_as(&self.client, shuffle, params, spec).await
            } else {
                run_exchange_as(&self.client, shuffle, params, params.spec().replicated(self.replication)).await
            }
            .map_err(anyhow::Error::msg)?;
            self.client.unregister_shuffle(shuffle).await?;
            checked(outcome.elapsed, verify(params, outcome.received))
        })
    }

    fn close(self) {
        self.runtime.block_on(async {
            let _ = self.client.unregister_app().await;
            self.client.close().await;
            if let Some(server) = self.server {
                server.shutdown().await;
            }
        });
        drop(self.processes);
    }
}

/// Opens a client session, runs `once` for each of `repeat` runs, closes the session.
fn client_runs(
    workload: &'static str,
    p: &Params,
    input_bytes: u64,
    mut once: impl FnMut(&ClientSession, u32) -> anyhow::Result<Duration>,
) -> anyhow::Result<RunReport> {
    let session = ClientSession::open(&p.server, p.same_host, "shuffle-bench")?;
    let report = repeated(workload, p, input_bytes, session.transport(), |run| once(&session, run));
    session.close();
    report
}

/// An engine on the chosen server (an embedded one is always reached
/// through its Unix socket), and the processes the harness started for it.
fn engine(p: &Params, mut options: EngineOptions) -> anyhow::Result<(Option<LocalServers>, Engine)> {
    if let Some(memory) = p.engine_memory {
        options.memory = memory;
    }
    options.checkpoints = p.checkpoint_interval.map(engine_adapter::CheckpointOptions::every);
    if let Some(linger) = p.linger {
        options.linger = linger;
    }
    options.replication = p.server.replication();
    if let Some(processes) = p.server.start_processes()? {
        eprintln!("started {processes}");
        let client = processes.options("").same_host(p.same_host);
        let engine = Engine::builder().client(client).options(options).connect(processes.front.addr)?;
        return Ok((Some(processes), engine));
    }
    let engine = match &p.server {
        ServerChoice::Embedded { memory } => {
            ensure!(
                p.same_host,
                "the embedded engine always uses its server's Unix socket; for QUIC use --server HOST:PORT"
            );
            Engine::embedded_with(EngineOptions { server_memory: memory.0, ..options })?
        }
        ServerChoice::Remote { addr, cert, token } => {
            let mut client = ClientOptions::new("").trusted_cert(cert).same_host(p.same_host);
            client.auth_token = token.clone();
            Engine::builder().client(client).options(options).connect(*addr)?
        }
        ServerChoice::Daemon { .. } | ServerChoice::Cluster { .. } => unreachable!("started above"),
    };
    Ok((None, engine))
}

fn exchange_params(p: &Params) -> ExchangeParams {
    ExchangeParams { records: p.records, maps: p.maps, partitions: p.partitions, seed: p.seed, mode: p.mode }
}

/// W1 records as the engine carries them: the key as bytes (its
/// order-preserving encoding is the 10 bytes themselves, so the engine's
/// hash partitioning equals W1's `xxhash64(key) mod R`) and the hex value.
fn w1_engine_record(seed: u64, i: u64) -> ([u8; W1_KEY_LEN], String) {
    let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
    w1_record(seed, i, &mut key, &mut value);
    let value = std::str::from_utf8(&value).expect("W1 values are hex digits");
    (key, value.to_owned())
}

/// The engine's mode for an exchange mode: hybrid means streaming (readers
/// run alongside the maps); hash and sort are batch exchanges.
fn engine_mode(mode: ExchangeMode) -> ExecutionMode {
    match mode {
        ExchangeMode::Hybrid => ExecutionMode::Streaming,
        ExchangeMode::Hash | ExchangeMode::Sort => ExecutionMode::Batch,
    }
}

/// W1 `exchange` (and W5, which is W1 at a larger size under a small budget).
pub fn exchange(workload: &'static str, p: &Params) -> anyhow::Result<RunReport> {
    let input_bytes = p.records * W1_RECORD_LEN as u64;
    match p.via {
        Via::Client => client_runs(workload, p, input_bytes, |session, run| session.w1_or_w3(p, run, false)),
        Via::Engine => {
            // The engine is dropped before the processes it talks to.
            let (_processes, engine) = engine(p, EngineOptions::default())?;
            let (seed, partitions) = (p.seed, p.partitions);
            let job = engine
                .generate(p.records, p.maps, move |i| w1_engine_record(seed, i))
                .partition_by_key(Exchange::partitions(partitions).mode(p.mode));
            repeated(workload, p, input_bytes, engine.transport(), |_| {
                let counts: Arc<Vec<AtomicU64>> = Arc::new((0..partitions).map(|_| AtomicU64::new(0)).collect());
                let sums: Arc<Vec<AtomicU64>> = Arc::new((0..partitions).map(|_| AtomicU64::new(0)).collect());
                let misplaced = Arc::new(AtomicBool::new(false));
                let (c, s, m) = (counts.clone(), sums.clone(), misplaced.clone());
                let start = Instant::now();
                job.for_each_in_part(engine_mode(p.mode), move |part, (key, value)| {
                    if w1_partition(&key, partitions) != part || value.len() != W1_VALUE_LEN {
                        m.store(true, Ordering::Relaxed);
                    }
                    c[part as usize].fetch_add(1, Ordering::Relaxed);
                    s[part as usize].fetch_add(w1_key_value(&key), Ordering::Relaxed);
                })?;
                let elapsed = start.elapsed();
                if misplaced.load(Ordering::Relaxed) {
                    return checked(elapsed, Err("a reducer saw a record of another partition"));
                }
                let received = W1Totals {
                    records: counts.iter().map(|c| c.load(Ordering::Relaxed)).sum(),
                    key_sum: sums.iter().fold(0u64, |a, s| a.wrapping_add(s.load(Ordering::Relaxed))),
                };
                checked(elapsed, verify(exchange_params(p), received))
            })
        }
    }
}

/// W3 `sort`.
pub fn sort(p: &Params) -> anyhow::Result<RunReport> {
    let input_bytes = p.records * W1_RECORD_LEN as u64;
    match p.via {
        Via::Client => {
            ensure!(
                p.mode == ExchangeMode::Sort,
                "W3 through the client runs a key-ordered sort shuffle: use --mode sort"
            );
            client_runs("sort", p, input_bytes, |session, run| session.w1_or_w3(p, run, true))
        }
        Via::Engine => {
            // The engine is dropped before the processes it talks to.
            let (_processes, engine) = engine(p, EngineOptions::default())?;
            let seed = p.seed;
            repeated("sort", p, input_bytes, engine.transport(), |_| {
                // A new job every run: each timed run samples its input for the range bounds.
                let job = engine
                    .generate(p.records, p.maps, move |i| w1_engine_record(seed, i))
                    .sort_by_key(Exchange::partitions(p.partitions).mode(match p.mode {
                        ExchangeMode::Hash => ExchangeMode::Hash,
                        _ => ExchangeMode::Sort,
                    }))
                    .map(|(key, _)| key);
                let start = Instant::now();
                let keys = job.collect(engine_mode(p.mode))?;
                let elapsed = start.elapsed();
                // Parts come back in order: one pass checks order within and across partitions.
                if !keys.windows(2).all(|w| w[0] <= w[1]) {
                    return checked(elapsed, Err("the output is not in key order"));
                }
                let mut received = W1Totals::default();
                keys.iter().for_each(|k| received.add_key(k));
                checked(elapsed, verify(exchange_params(p), received))
            })
        }
    }
}

/// The check of W2: the number of groups is the number of distinct keys
/// generated, and the group sums add up to N(N-1)/2.
fn verify_groupby(p: &Params, groups: usize, sum: i64) -> anyhow::Result<()> {
    let distinct: HashSet<u64> = (0..p.records).map(|i| w2_record(p.seed, i, p.keys).0).collect();
    let n = i128::from(p.records);
    let expected = (n * (n - 1) / 2) as i64;
    ensure!(groups == distinct.len(), "{groups} groups, but {} distinct keys were generated", distinct.len());
    ensure!(sum == expected, "group sums add up to {sum}, expected {expected}");
    Ok(())
}

/// W2 `groupby`.
pub fn groupby(p: &Params) -> anyhow::Result<RunReport> {
    let input_bytes = p.records * 16;
    match p.via {
        Via::Engine => {
            // The engine is dropped before the processes it talks to.
            let (_processes, engine) = engine(p, EngineOptions::default())?;
            let (seed, keys) = (p.seed, p.keys);
            let job = engine
                .generate(p.records, p.maps, move |i| w2_record(seed, i, keys))
                .reduce_by_key(|a: i64, b| a.wrapping_add(b), Exchange::partitions(p.partitions).mode(p.mode));
            repeated("groupby", p, input_bytes, engine.transport(), |_| {
                let start = Instant::now();
                let groups = job.collect_latest(engine_mode(p.mode))?;
                let elapsed = start.elapsed();
                checked(elapsed, verify_groupby(p, groups.len(), groups.values().fold(0i64, |s, v| s.wrapping_add(*v))))
            })
        }
        Via::Client => client_runs("groupby", p, input_bytes, |session, run| {
            let (groups, sum, elapsed) =
                session.runtime.block_on(groupby_client(&session.client, ShuffleId(run), p))?;
            checked(elapsed, verify_groupby(p, groups, sum))
        }),
    }
}

/// W2 through raw client calls: each map combines its records per key in
/// a hash table, then writes one `(key, sum)` record per key; each reducer
/// sums its partition's records per key.
async fn groupby_client(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    p: &Params,
) -> anyhow::Result<(usize, i64, Duration)> {
    let spec = match p.mode {
        ExchangeMode::Hash => ShuffleSpec::hash(p.maps, p.partitions),
        ExchangeMode::Sort => ShuffleSpec::sort(p.maps, p.partitions, false),
        ExchangeMode::Hybrid => ShuffleSpec::hybrid(p.maps, p.partitions, shuffle_client::SpillStrategy::Selective),
    }
    .replicated(p.server.replication());
    client.register_shuffle(shuffle, spec).await?;
    let start = Instant::now();
    let (records, maps, partitions, seed, keys) = (p.records, p.maps, p.partitions, p.seed, p.keys);
    let map_tasks: Vec<_> = (0..maps)
        .map(|m| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut table: std::collections::HashMap<u64, i64> = std::collections::HashMap::new();
                for i in map_range(records, maps, m) {
                    let (k, v) = w2_record(seed, i, keys);
                    let e = table.entry(k).or_insert(0);
                    *e = e.wrapping_add(v);
                }
                let mut writer = client.writer(shuffle, m, 0).await?;
                for (k, v) in table {
                    let key = k.to_be_bytes();
                    writer.write(w1_partition(&key, partitions), &key, &v.to_le_bytes()).await?;
                }
                anyhow::Ok(writer.finish().await?)
            })
        })
        .collect();
    let reducers: Vec<_> = (0..partitions)
        .map(|r| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut reader = client.reader(shuffle, r).await?;
                let mut table: std::collections::HashMap<u64, i64> = std::collections::HashMap::new();
                while let Some(block) = reader.next_block().await? {
                    for (k, v) in block.records() {
                        let key = u64::from_be_bytes(k.try_into().context("an 8-byte key")?);
                        let value = i64::from_le_bytes(v.try_into().context("an 8-byte value")?);
                        let e = table.entry(key).or_insert(0);
                        *e = e.wrapping_add(value);
                    }
                }
                anyhow::Ok((table.len(), table.values().fold(0i64, |s, v| s.wrapping_add(*v))))
            })
        })
        .collect();
    for (m, task) in map_tasks.into_iter().enumerate() {
        ensure!(task.await?? == CommitOutcome::Committed, "map {m} did not commit");
    }
    let (mut groups, mut sum) = (0, 0i64);
    for task in reducers {
        let (g, s) = task.await??;
        groups += g;
        sum = sum.wrapping_add(s);
    }
    let elapsed = start.elapsed();
    client.unregister_shuffle(shuffle).await?;
    Ok((groups, sum, elapsed))
}

/// One fixed-rate W4 run: what the sources achieved and the latency percentiles.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StreamProbe {
    pub rate: f64,
    pub achieved_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub records: u64,
    /// Whether the final counts added up to the records emitted.
    pub verified: bool,
}

impl StreamProbe {
    /// Whether the run sustained its rate with p99 under 100 ms (and verified).
    pub fn sustained(&self) -> bool {
        self.verified && self.p99_ms < 100.0 && self.achieved_rate >= 0.95 * self.rate
    }
}

/// W4 `stream` at `rate` records/s: sources emit `(key, 1)` stamped with
/// their creation time, reducers keep running counts, the sink records
/// each update's age; after `warmup` the latencies of `seconds` count.
/// Verified: after the sources stop and the job drains, the counts add up
/// to the records emitted.
pub fn stream_at(
    engine: &Engine,
    p: &Params,
    rate: f64,
    warmup: Duration,
    seconds: Duration,
) -> anyhow::Result<StreamProbe> {
    let stop = StopHandle::new();
    let emitted = Arc::new(AtomicU64::new(0));
    let (seed, keys, counter) = (p.seed, p.keys, emitted.clone());
    let job = engine
        .generate_at_rate(RateSource { rate: Some(rate), limit: None, stop: stop.clone() }, p.maps, move |i| {
            counter.fetch_add(1, Ordering::Relaxed);
            (w4_key(seed, i, keys), 1u64)
        })
        .reduce_by_key(|a, b| a + b, p.partitions);
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?));
    let measuring = Arc::new(AtomicBool::new(false));
    let counts: Arc<Mutex<std::collections::HashMap<u64, u64>>> = Arc::default();
    let measured_from = Arc::new(AtomicU64::new(0));
    let timer = {
        let (stop, measuring, emitted, measured_from) =
            (stop.clone(), measuring.clone(), emitted.clone(), measured_from.clone());
        std::thread::spawn(move || {
            std::thread::sleep(warmup);
            measured_from.store(emitted.load(Ordering::Relaxed), Ordering::Relaxed);
            measuring.store(true, Ordering::Relaxed);
            std::thread::sleep(seconds);
            let measured = emitted.load(Ordering::Relaxed) - measured_from.load(Ordering::Relaxed);
            measuring.store(false, Ordering::Relaxed);
            stop.stop();
            measured
        })
    };
    let (h, m, c) = (histogram.clone(), measuring.clone(), counts.clone());
    job.for_each_timed(ExecutionMode::Streaming, move |(key, count), age| {
        if m.load(Ordering::Relaxed) {
            let us = (age.as_micros() as u64).clamp(1, 600_000_000);
            h.lock().expect("no panics while holding it").record(us).expect("clamped into range");
        }
        c.lock().expect("no panics while holding it").insert(key, count);
    })?;
    let measured = timer.join().map_err(|_| anyhow::anyhow!("the timer thread panicked"))?;
    let total: u64 = counts.lock().expect("no panics while holding it").values().sum();
    let emitted = emitted.load(Ordering::Relaxed);
    if total != emitted {
        eprintln!("stream at {rate:.0}/s: the final counts add up to {total}, but the sources emitted {emitted}");
    }
    let h = histogram.lock().expect("no panics while holding it");
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(StreamProbe {
        rate,
        achieved_rate: measured as f64 / seconds.as_secs_f64(),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        records: emitted,
        verified: total == emitted,
    })
}

/// How long W4's runs last: the search's probes and the final run, each a
/// warm-up and a measured span. WORKLOADS.md asks for 5 s + 30 s; shorter
/// probes are the caller's choice and are reported as such.
#[derive(Clone, Copy, Debug)]
pub struct StreamTimes {
    pub probe_warmup: Duration,
    pub probe_seconds: Duration,
    pub warmup: Duration,
    pub seconds: Duration,
}

/// W4 `stream`: at `rate`, or searching for the highest rate whose p99
/// stays under 100 ms (doubling from 100,000 records/s, then bisecting)
/// and then measuring at half that rate, as WORKLOADS.md asks.
pub fn stream(p: &Params, rate: Option<f64>, times: StreamTimes) -> anyhow::Result<RunReport> {
    let StreamTimes { warmup, seconds, .. } = times;
    ensure!(p.via == Via::Engine, "W4 runs through the engine (--via engine)");
    // The engine is dropped before the processes it talks to.
    let (_processes, engine) = engine(p, EngineOptions::default())?;
    rss::reset_peak();
    let sampler = rss::AnonSampler::start();
    let start = Instant::now();
    let progress = crate::progress::spinner("stream", "hybrid", 0);
    let mut probes = Vec::new();
    let (max_rate, measured) = match rate {
        Some(rate) => {
            let probe = stream_at(&engine, p, rate, warmup, seconds)?;
            probes.push(probe);
            (probe.sustained().then_some(rate), probe)
        }
        None => {
            let (probe_warmup, probe_seconds) = (times.probe_warmup, times.probe_seconds);
            let (mut good, mut bad): (Option<f64>, Option<f64>) = (None, None);
            let mut rate = 100_000.0;
            while bad.is_none() && rate <= 64e6 {
                progress.set_message(format!("probing {rate:.0} records/s"));
                let probe = stream_at(&engine, p, rate, probe_warmup, probe_seconds)?;
                probes.push(probe);
                if probe.sustained() {
                    good = Some(rate)
                } else {
                    bad = Some(rate)
                }
                rate *= 2.0;
            }
            for _ in 0..3 {
                let (Some(lo), Some(hi)) = (good, bad) else { break };
                let mid = (lo + hi) / 2.0;
                progress.set_message(format!("probing {mid:.0} records/s"));
                let probe = stream_at(&engine, p, mid, probe_warmup, probe_seconds)?;
                probes.push(probe);
                if probe.sustained() { good = Some(mid) } else { bad = Some(mid) }
            }
            let max = good.context("not even 100,000 records/s kept p99 under 100 ms")?;
            progress.set_message(format!("measuring at {:.0} records/s", max / 2.0));
            let measured = stream_at(&engine, p, max / 2.0, warmup, seconds)?;
            probes.push(measured);
            (Some(max), measured)
        }
    };
    progress.finish_and_clear();
    let peak = rss::peak();
    let peak_anon_rss_bytes = sampler.finish();
    let elapsed = start.elapsed().as_secs_f64();
    let mut extra = serde_json::Map::new();
    extra.insert("max_rate".into(), serde_json::json!(max_rate));
    extra.insert("searched".into(), serde_json::json!(rate.is_none()));
    let linger = p.linger.unwrap_or(EngineOptions::default().linger);
    extra.insert("linger_ms".into(), serde_json::json!(linger.as_secs_f64() * 1000.0));
    extra.insert("rate".into(), serde_json::json!(measured.rate));
    extra.insert("achieved_rate".into(), serde_json::json!(measured.achieved_rate));
    extra.insert("p50_ms".into(), serde_json::json!(measured.p50_ms));
    extra.insert("p99_ms".into(), serde_json::json!(measured.p99_ms));
    extra.insert("p999_ms".into(), serde_json::json!(measured.p999_ms));
    extra.insert("keys".into(), serde_json::json!(p.keys));
    extra.insert("probe_warmup_seconds".into(), serde_json::json!(times.probe_warmup.as_secs_f64()));
    extra.insert("probe_seconds".into(), serde_json::json!(times.probe_seconds.as_secs_f64()));
    extra.insert("warmup_seconds".into(), serde_json::json!(warmup.as_secs_f64()));
    extra.insert("measured_seconds".into(), serde_json::json!(seconds.as_secs_f64()));
    extra.insert("probes".into(), serde_json::to_value(&probes)?);
    if rate.is_some() && max_rate.is_none() {
        bail!(
            "at {:.0} records/s the sources achieved {:.0}/s with p99 {:.1} ms: not sustained",
            measured.rate,
            measured.achieved_rate,
            measured.p99_ms
        );
    }
    Ok(RunReport {
        workload: "stream",
        mode: "hybrid".into(),
        via: Via::Engine,
        records: measured.records,
        maps: p.maps,
        partitions: p.partitions,
        input_bytes: measured.records * 16,
        seconds: vec![elapsed],
        median_seconds: elapsed,
        mb_per_s: measured.achieved_rate * 16.0 / 1e6,
        verified: probes.iter().all(|probe| probe.verified),
        transport: engine.transport(),
        server: p.server.to_string(),
        server_peak_rss_bytes: matches!(p.server, ServerChoice::Embedded { .. }).then_some(peak),
        client_peak_rss_bytes: peak,
        peak_anon_rss_bytes,
        extra,
    })
}
