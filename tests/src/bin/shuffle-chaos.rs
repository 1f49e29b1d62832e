//! The seeded fault suite (see `shuffle_tests::chaos`): runs small jobs
//! against a `shuffle-server` daemon in a child process while each seed
//! chooses faults, checks every result, and prints a summary. Exits
//! non-zero if any run lost, duplicated or misreported anything.
//!
//! ```text
//! shuffle-chaos --seeds 0..500                  # a range of seeds
//! shuffle-chaos --seed 1234 --verbose           # reproduce one run
//! shuffle-chaos --cluster --seeds 0..500        # cluster plans (coordinator + 3 workers)
//! shuffle-chaos --cluster --seed 7 --verbose    # reproduce one cluster run
//! ```
//! A seed names a single-node plan, or with `--cluster` a cluster plan
//! (`shuffle_tests::chaos::cluster`); the two sets are separate.
//! The daemon binary is `$SHUFFLE_SERVER_BIN`, or `shuffle-server` beside this one.

use std::{process::ExitCode, time::Instant};

use clap::Parser;
use shuffle_tests::chaos::{Outcome, Plan, Summary, cluster, run};

#[derive(Parser)]
#[command(
    about = "Seeded fault suite of the shuffle service",
    long_about = "Seeded fault suite of the shuffle service. Each seed chooses a plan: a small job and the faults \
                  to inject into it. Single-node plans (the default) run against one daemon: map attempts killed \
                  mid-push, dropped reader connections, stalls, duplicate and out-of-order attempts, a flipped \
                  bit, a full disk, a graceful restart. Cluster plans (--cluster) run a coordinator and 3 workers \
                  as child processes on 127.0.0.1-4, a hash, sort or hybrid shuffle with 1 or 2 copies, and one \
                  process fault at a seeded moment: a worker SIGKILLed while maps push or readers read, the \
                  coordinator SIGKILLed and restarted, a worker restarted gracefully (rolling), a worker cut \
                  off for a while (SIGSTOP, then SIGCONT), or a worker partitioned from the network for a while \
                  (its datagrams dropped and its Unix-socket streams closed while it runs on), plus task faults. \
                  Every run checks the data exactly (records lost 0, duplicated 0) or, where no recovery \
                  is possible (single-node: a flipped bit, a full disk), that the error names the cause."
)]
struct Args {
    /// Seeds to run, as START..END (END excluded); several ranges or
    /// single seeds may be joined with commas (0..4,7,9..12).
    #[arg(long, default_value = "0..24")]
    seeds: String,
    /// One seed only (overrides --seeds).
    #[arg(long)]
    seed: Option<u64>,
    /// Print every run's plan and outcome.
    #[arg(long)]
    verbose: bool,
    /// Start no new run after this many minutes (the summary then counts
    /// the runs that fit).
    #[arg(long)]
    time_limit_minutes: Option<u64>,
    /// Run cluster plans (a coordinator and 3 workers; a worker or the
    /// coordinator killed, or a worker restarted, mid-job) instead of single-node ones.
    #[arg(long)]
    cluster: bool,
    /// Print each seed's plan without running it.
    #[arg(long)]
    plans: bool,
}

/// The seeds to run: `--seed`, or `--seeds` as ranges and single seeds
/// separated by commas (`0..4,7,9..12`).
fn seeds(args: &Args) -> anyhow::Result<Vec<u64>> {
    if let Some(seed) = args.seed {
        return Ok(vec![seed]);
    }
    let mut seeds = Vec::new();
    for part in args.seeds.split(',') {
        match part.split_once("..") {
            Some((start, end)) => seeds.extend(start.trim().parse::<u64>()?..end.trim().parse()?),
            None => seeds.push(part.trim().parse().map_err(|_| anyhow::anyhow!("--seeds takes START..END[,…]"))?),
        }
    }
    Ok(seeds)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<ExitCode> {
    let args = Args::parse();
    if std::env::var_os("SHUFFLE_SERVER_BIN").is_none() {
        let beside = std::env::current_exe()?.with_file_name("shuffle-server-e2e");
        // SAFETY: set before any thread that reads the environment is started by us.
        unsafe { std::env::set_var("SHUFFLE_SERVER_BIN", beside) };
    }
    let mut summary = Summary::default();
    let started = Instant::now();
    let limit = args.time_limit_minutes.map(|m| std::time::Duration::from_secs(60 * m));
    if args.plans {
        for seed in seeds(&args)? {
            if args.cluster {
                println!("seed {seed}: {}", cluster::ClusterPlan::from_seed(seed));
            } else {
                println!("seed {seed}: {}", Plan::from_seed(seed));
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    for seed in seeds(&args)? {
        if limit.is_some_and(|l| started.elapsed() >= l) {
            println!("time limit reached: seeds from {seed} on were not run");
            break;
        }
        let run_started = Instant::now();
        let (outcome, plan) = if args.cluster {
            let plan = cluster::ClusterPlan::from_seed(seed);
            let run = cluster::run(&plan).await;
            summary.add_cluster(&plan, &run);
            let recovery = &run.recovery;
            let what = format!(
                "{plan}; fault injected: {}, partitions lost {}, maps repaired {}, attempts re-run {}",
                recovery.injected, recovery.partitions_lost, recovery.maps_repaired, recovery.attempts_retried
            );
            (run.outcome, what)
        } else {
            let plan = Plan::from_seed(seed);
            let outcome = run(&plan).await;
            summary.add(&plan, &outcome);
            (outcome, plan.to_string())
        };
        let took = run_started.elapsed();
        match &outcome {
            Outcome::Failed { reason, .. } => {
                println!("seed {seed}: FAILED after {took:.1?}: {reason}\n  plan: {plan}")
            }
            Outcome::Detected(what) if args.verbose => {
                println!("seed {seed}: detected ({took:.1?}) {what}\n  plan: {plan}")
            }
            Outcome::Exact if args.verbose => println!("seed {seed}: exact ({took:.1?})\n  plan: {plan}"),
            _ => {}
        }
    }
    print!("{summary}");
    println!(
        "in {:.1?}; reproduce a run with{} --seed S --verbose",
        started.elapsed(),
        if args.cluster { " --cluster" } else { "" }
    );
    Ok(if summary.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
