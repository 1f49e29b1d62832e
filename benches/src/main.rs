//! `shuffle-bench`: runs the standard workloads of `shared/WORKLOADS.md`
//! against an embedded or remote shuffle server, verifies every run, and
//! reports medians as a table, JSON lines and (for the suite) a Markdown
//! report with charts.
//!
//! ```text
//! shuffle-bench exchange [--mode hash|sort|hybrid] [--records N] [--repeat K] [--baseline] [--json FILE]
//! shuffle-bench groupby | sort | spill | stream [--rate R] [--seconds S]
//! shuffle-bench exchange --cluster 3 [--replication 2]    (or --server daemon | HOST:PORT)
//! shuffle-bench failover [--records N] [--mode M] [--replication 2,1] [--seed S] [--repeat K]
//! shuffle-bench baseline
//! shuffle-bench suite [--quick] --report DIR
//! ```

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use engine_adapter::workload::client::ExchangeParams;
use shuffle_bench::{
    baseline::{self, Baseline},
    failover::{self, FailoverParams},
    report::{self, Machine},
    workloads::{self, Params, RunReport, ServerChoice, Via},
};
use shuffle_client::ExchangeMode;
use shuffle_server::ByteSize;

/// mimalloc keeps freed block buffers for reuse instead of returning them to
/// the kernel, which then zeroes fresh pages for every new block (13% of W1's
/// CPU with glibc's allocator).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    about = "Benchmark harness of the shuffle service: the standard workloads, verified, with baselines and reports"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// W1: pure repartition of 100-byte records; reducers count and checksum.
    Exchange(Common),
    /// W2: SUM(value) GROUP BY key with map-side combining.
    Groupby(Common),
    /// W3: total-order sort (TeraSort-like).
    Sort(Common),
    /// W4: pipelined keyed aggregation; latency percentiles at a rate, or the highest rate with p99 < 100 ms.
    Stream(StreamArgs),
    /// W5: W1 at 50,000,000 records under a 512 MiB server budget, in every mode (or --mode).
    Spill(Common),
    /// W6: W1 through a coordinator and 3 workers, without and with one worker SIGKILLed at a seeded moment.
    Failover(FailoverArgs),
    /// Memory, disk and raw-QUIC baselines of this machine.
    Baseline,
    /// Every workload in every mode it supports, with baselines; writes DIR/report.md and charts.
    Suite(SuiteArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Transport {
    Auto,
    Quic,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Hash,
    Sort,
    Hybrid,
}

impl From<Mode> for ExchangeMode {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Hash => ExchangeMode::Hash,
            Mode::Sort => ExchangeMode::Sort,
            Mode::Hybrid => ExchangeMode::Hybrid,
        }
    }
}

#[derive(Args, Clone)]
struct Common {
    /// Exchange mode (default: the workload's natural one; spill: all three).
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Records, N (default: the workload's).
    #[arg(long)]
    records: Option<u64>,
    /// Map tasks, M.
    #[arg(long)]
    maps: Option<u32>,
    /// Partitions, R.
    #[arg(long)]
    partitions: Option<u32>,
    /// Distinct keys, K (W2, W4).
    #[arg(long)]
    keys: Option<u64>,
    /// Seed of the record generators.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// `embedded` (a server in this process on a free port), `daemon` (a standalone daemon the
    /// harness starts as a child process) or HOST:PORT of a running daemon.
    #[arg(long, default_value = "embedded")]
    server: String,
    /// Run through a coordinator and N workers the harness starts as child processes
    /// (127.0.0.1 and 127.0.0.2, 127.0.0.3, …), instead of --server.
    #[arg(long, value_name = "N")]
    cluster: Option<usize>,
    /// Copies of each partition in the cluster (1 or 2; with --cluster).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    replication: u8,
    /// The daemon's certificate (PEM) to trust, with --server HOST:PORT.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Token to present to the daemon.
    #[arg(long)]
    auth_token: Option<String>,
    /// Memory budget of the embedded server (default 1GiB; spill: 512MiB).
    #[arg(long)]
    memory: Option<ByteSize>,
    /// The engine's operator memory budget (`EngineOptions::memory`; default 512MiB).
    #[arg(long)]
    engine_memory: Option<ByteSize>,
    /// Streaming engine jobs checkpoint at this interval in milliseconds (default: no checkpoints).
    #[arg(long)]
    checkpoint_interval_ms: Option<u64>,
    /// Streaming engine jobs: a map task pushes what it buffered at least this often, in
    /// milliseconds (`EngineOptions::linger`, default 5; Flink's counterpart is its buffer timeout).
    #[arg(long)]
    linger_ms: Option<u64>,
    /// Runs per workload and mode; the median is reported with min and max.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// Raw client calls or the engine's job (default: client for W1/W3/W5, engine for W2/W4).
    #[arg(long, value_enum)]
    via: Option<Via>,
    /// `auto`: use the server's Unix socket when it is on this host; `quic`: stay on QUIC.
    #[arg(long, value_enum, default_value = "auto")]
    transport: Transport,
    /// Append one JSON object per workload and mode to FILE.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Measure the machine's baselines first and print each figure as a fraction of its limit.
    #[arg(long)]
    baseline: bool,
}

#[derive(Args, Clone)]
struct StreamArgs {
    #[command(flatten)]
    common: Common,
    /// Records per second; without it, search for the highest rate whose p99 stays under 100 ms.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds measured (after the warm-up).
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Seconds of warm-up.
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Seconds each probe of the rate search measures (default: --seconds, as WORKLOADS.md asks).
    #[arg(long)]
    probe_seconds: Option<u64>,
    /// Seconds of warm-up of each probe (default: --warmup).
    #[arg(long)]
    probe_warmup: Option<u64>,
}

impl StreamArgs {
    fn times(&self) -> workloads::StreamTimes {
        workloads::StreamTimes {
            probe_warmup: Duration::from_secs(self.probe_warmup.unwrap_or(self.warmup)),
            probe_seconds: Duration::from_secs(self.probe_seconds.unwrap_or(self.seconds)),
            warmup: Duration::from_secs(self.warmup),
            seconds: Duration::from_secs(self.seconds),
        }
    }
}

#[derive(Args, Clone)]
struct FailoverArgs {
    /// Exchange mode (default: all three).
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Records, N.
    #[arg(long, default_value_t = 10_000_000)]
    records: u64,
    /// Map tasks, M.
    #[arg(long, default_value_t = 4)]
    maps: u32,
    /// Partitions, R.
    #[arg(long, default_value_t = 16)]
    partitions: u32,
    /// Seed of the record generators.
    #[arg(long, default_value_t = 42)]
    data_seed: u64,
    /// Seed of the faults (which worker dies, and when); default: from the clock, printed.
    #[arg(long)]
    seed: Option<u64>,
    /// Copies of each partition: 2 (the run survives the loss), 1 (the lost maps are named and re-run), or both.
    #[arg(long, value_delimiter = ',', default_value = "2,1", value_parser = clap::value_parser!(u8).range(1..=2))]
    replication: Vec<u8>,
    /// Workers in the cluster.
    #[arg(long, default_value_t = 3)]
    workers: usize,
    /// Memory budget of each worker.
    #[arg(long, default_value = "1GiB")]
    memory: ByteSize,
    /// Pairs of runs (without and with the fault) per mode and replication; medians are reported.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Append one JSON object per mode and replication to FILE.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct SuiteArgs {
    /// Directory for report.md and the charts.
    #[arg(long)]
    report: PathBuf,
    /// Sizes (and the W5 budget, and W4's durations) scaled down ten-fold.
    #[arg(long)]
    quick: bool,
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run the peers (benches/peers/run.sh: Spark and Flink) first and compare with them in the report.
    #[arg(long)]
    peers: bool,
    /// Compare with the peer figures already in FILE (the latest run in it) instead of running them.
    #[arg(long, value_name = "FILE", conflicts_with = "peers")]
    peers_file: Option<PathBuf>,
}

/// Defaults of one workload.
struct Defaults {
    records: u64,
    mode: ExchangeMode,
    via: Via,
    memory: ByteSize,
}

fn defaults(workload: &str) -> Defaults {
    let gib = ByteSize(1 << 30);
    match workload {
        "groupby" => Defaults { records: 20_000_000, mode: ExchangeMode::Hash, via: Via::Engine, memory: gib },
        "sort" => Defaults { records: 10_000_000, mode: ExchangeMode::Sort, via: Via::Client, memory: gib },
        "spill" => {
            Defaults { records: 50_000_000, mode: ExchangeMode::Hash, via: Via::Client, memory: ByteSize(512 << 20) }
        }
        "stream" => Defaults { records: 0, mode: ExchangeMode::Hybrid, via: Via::Engine, memory: gib },
        _ => Defaults { records: 10_000_000, mode: ExchangeMode::Hash, via: Via::Client, memory: gib },
    }
}

fn params(workload: &str, c: &Common) -> anyhow::Result<Params> {
    let d = defaults(workload);
    let memory = c.memory.unwrap_or(d.memory);
    anyhow::ensure!(c.replication == 1 || c.cluster.is_some(), "--replication {} needs --cluster N", c.replication);
    let server = if let Some(workers) = c.cluster {
        anyhow::ensure!(c.server == "embedded", "--cluster N and --server {} exclude each other", c.server);
        anyhow::ensure!(
            usize::from(c.replication) <= workers,
            "--replication {} needs at least as many workers",
            c.replication
        );
        ServerChoice::Cluster { workers, replication: c.replication, memory }
    } else if c.server == "embedded" {
        ServerChoice::Embedded { memory }
    } else if c.server == "daemon" {
        ServerChoice::Daemon { memory }
    } else {
        let addr: SocketAddr = c
            .server
            .parse()
            .map_err(|e| anyhow::anyhow!("--server {}: {e} (expected embedded, daemon or HOST:PORT)", c.server))?;
        let cert = c
            .cert
            .clone()
            .ok_or_else(|| anyhow::anyhow!("--server HOST:PORT needs --cert FILE (the daemon's certificate)"))?;
        ServerChoice::Remote { addr, cert, token: c.auth_token.clone() }
    };
    let stream = workload == "stream";
    Ok(Params {
        records: c.records.unwrap_or(d.records),
        maps: c.maps.unwrap_or(if stream { 2 } else { 4 }),
        partitions: c.partitions.unwrap_or(if stream { 4 } else { 16 }),
        keys: c.keys.unwrap_or(if stream { 100_000 } else { 1_000_000 }),
        seed: c.seed,
        mode: c.mode.map_or(d.mode, ExchangeMode::from),
        via: c.via.unwrap_or(d.via),
        repeat: c.repeat.max(1),
        server,
        same_host: matches!(c.transport, Transport::Auto),
        engine_memory: c.engine_memory.map(|b| b.0 as usize),
        checkpoint_interval: c.checkpoint_interval_ms.map(Duration::from_millis),
        linger: c.linger_ms.map(Duration::from_millis),
    })
}

fn run_workload(workload: &str, p: &Params, stream: Option<&StreamArgs>) -> anyhow::Result<Vec<RunReport>> {
    Ok(match workload {
        "exchange" => vec![workloads::exchange("exchange", p)?],
        "groupby" => vec![workloads::groupby(p)?],
        "sort" => vec![workloads::sort(p)?],
        "spill" => vec![workloads::exchange("spill", p)?],
        "stream" => {
            let s = stream.expect("stream arguments for the stream workload");
            vec![workloads::stream(p, s.rate, s.times())?]
        }
        other => anyhow::bail!("unknown workload {other}"),
    })
}

fn measure_baseline() -> anyhow::Result<Baseline> {
    eprintln!(
        "measuring baselines (memcpy, 1 GiB disk write+fsync and read in {}, 1 GB over QUIC and a Unix socket)…",
        std::env::temp_dir().display()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(baseline::measure(&std::env::temp_dir()))
}

/// Fails (after everything was printed and written) if a run did not verify.
fn all_verified(reports: &[RunReport]) -> anyhow::Result<()> {
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.verified)
        .map(|r| format!("{} ({}, via {:?})", r.workload, r.mode, r.via))
        .collect();
    anyhow::ensure!(failed.is_empty(), "runs that did not verify: {}", failed.join(", "));
    Ok(())
}

fn single(workload: &str, c: &Common, stream: Option<&StreamArgs>) -> anyhow::Result<()> {
    let baseline = c.baseline.then(measure_baseline).transpose()?;
    let mut reports = Vec::new();
    let base = params(workload, c)?;
    let modes: Vec<ExchangeMode> = match (workload, c.mode) {
        ("spill", None) => vec![ExchangeMode::Hash, ExchangeMode::Sort, ExchangeMode::Hybrid],
        _ => vec![base.mode],
    };
    for mode in modes {
        let p = Params { mode, ..base.clone() };
        let mut got = run_workload(workload, &p, stream)?;
        if let Some(path) = &c.json {
            report::append_json(path, &got)?;
        }
        reports.append(&mut got);
    }
    print!("{}", report::table(&reports, baseline.as_ref()));
    if let Some(b) = &baseline {
        print!("\n{}", report::baseline_table(b));
    }
    all_verified(&reports)
}

/// Runs `benches/peers/run.sh` into `out` (Spark and Flink on this machine).
fn run_peers(out: &std::path::Path, quick: bool) -> anyhow::Result<()> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/run.sh");
    eprintln!("running the peers ({}), this takes a while…", script.display());
    let mut command = std::process::Command::new(&script);
    command.arg("--out").arg(out);
    if quick {
        command.arg("--quick");
    }
    let status = command.status().with_context(|| script.display().to_string())?;
    anyhow::ensure!(status.success(), "{} failed ({status})", script.display());
    Ok(())
}

fn suite(args: &SuiteArgs) -> anyhow::Result<()> {
    let scale = if args.quick { 10 } else { 1 };
    let peers = if args.peers {
        std::fs::create_dir_all(&args.report)?;
        let out = args.report.join("peers.jsonl");
        run_peers(&out, args.quick)?;
        report::load_peers(&out)?
    } else {
        args.peers_file.as_deref().map(report::load_peers).transpose()?.unwrap_or_default()
    };
    let baseline = measure_baseline()?;
    let plan: &[(&str, Mode, Via)] = &[
        ("exchange", Mode::Hash, Via::Client),
        ("exchange", Mode::Sort, Via::Client),
        ("exchange", Mode::Hybrid, Via::Client),
        ("exchange", Mode::Hash, Via::Engine),
        ("groupby", Mode::Hash, Via::Engine),
        ("groupby", Mode::Hybrid, Via::Engine),
        ("groupby", Mode::Hash, Via::Client),
        ("sort", Mode::Sort, Via::Client),
        ("sort", Mode::Sort, Via::Engine),
        ("stream", Mode::Hybrid, Via::Engine),
        ("spill", Mode::Hash, Via::Client),
        ("spill", Mode::Sort, Via::Client),
        ("spill", Mode::Hybrid, Via::Client),
    ];
    let mut reports = Vec::new();
    for &(workload, mode, via) in plan {
        let d = defaults(workload);
        let common = Common {
            mode: Some(mode),
            records: Some(d.records / scale),
            maps: None,
            partitions: None,
            keys: None,
            seed: 42,
            server: "embedded".into(),
            cluster: None,
            replication: 1,
            cert: None,
            auth_token: None,
            memory: Some(ByteSize(d.memory.0 / scale)),
            engine_memory: None,
            checkpoint_interval_ms: None,
            linger_ms: None,
            repeat: args.repeat,
            via: Some(via),
            transport: Transport::Auto,
            json: None,
            baseline: false,
        };
        // The full suite probes at WORKLOADS.md's length (5 s + 30 s); --quick shortens everything.
        let stream = StreamArgs {
            common: common.clone(),
            rate: None,
            seconds: 30 / scale,
            warmup: 5 / scale.min(5),
            probe_seconds: None,
            probe_warmup: None,
        };
        let p = params(workload, &common)?;
        eprintln!("{workload} ({}, via {via:?})…", workloads::mode_name(p.mode));
        let mut got = run_workload(workload, &p, Some(&stream))?;
        if let Some(path) = &args.json {
            report::append_json(path, &got)?;
        }
        reports.append(&mut got);
    }
    print!("{}", report::table(&reports, Some(&baseline)));
    print!("\n{}", report::baseline_table(&baseline));
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let peers_from = if args.peers { None } else { args.peers_file.as_deref() };
    report::write_report(&args.report, &reports, Some(&baseline), &peers, peers_from, &Machine::detect(), &command)?;
    if !peers.is_empty() {
        print!("\n{}", report::comparison_table(&reports, &peers));
    }
    println!("\nreport written to {}", args.report.join("report.md").display());
    all_verified(&reports)
}

/// W6: prints the fault seed first, then the table; fails if a run did not verify.
fn failover(args: &FailoverArgs) -> anyhow::Result<()> {
    let fault_seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
    });
    println!("fault seed {fault_seed} (run again with --seed {fault_seed})");
    let params = FailoverParams {
        exchange: ExchangeParams {
            records: args.records,
            maps: args.maps,
            partitions: args.partitions,
            seed: args.data_seed,
            mode: ExchangeMode::Hash,
        },
        modes: match args.mode {
            Some(m) => vec![m.into()],
            None => vec![ExchangeMode::Hash, ExchangeMode::Sort, ExchangeMode::Hybrid],
        },
        replications: args.replication.clone(),
        workers: args.workers,
        memory: args.memory,
        repeat: args.repeat.max(1),
        fault_seed,
    };
    let reports = failover::run(&params, |r| match &args.json {
        Some(path) => report::append_json(path, std::slice::from_ref(r)),
        None => Ok(()),
    })?;
    print!("{}", report::failover_table(&reports));
    let failed: Vec<String> =
        reports.iter().filter(|r| !r.verified).map(|r| format!("{} replication {}", r.mode, r.replication)).collect();
    anyhow::ensure!(failed.is_empty(), "runs that did not verify: {}", failed.join(", "));
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .init();
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Exchange(c) => single("exchange", c, None),
        Command::Groupby(c) => single("groupby", c, None),
        Command::Sort(c) => single("sort", c, None),
        Command::Spill(c) => single("spill", c, None),
        Command::Stream(s) => single("stream", &s.common, Some(s)),
        Command::Failover(f) => failover(f),
        Command::Baseline => measure_baseline().map(|b| print!("{}", report::baseline_table(&b))),
        Command::Suite(s) => suite(s),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shuffle-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
