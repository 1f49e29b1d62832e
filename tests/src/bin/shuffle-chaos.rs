//! The seeded fault suite (see `shuffle_tests::chaos`): runs small jobs
//! against a `shuffle-server` daemon in a child process while each seed
//! chooses faults, checks every result, and prints a summary. Exits
//! non-zero if any run lost, duplicated or misreported anything.
//!
//! ```text
//! shuffle-chaos --seeds 0..500        # a range of seeds
//! shuffle-chaos --seed 1234 --verbose # reproduce one run
//! ```
//! The daemon binary is `$SHUFFLE_SERVER_BIN`, or `shuffle-server` beside this one.

use std::{process::ExitCode, time::Instant};

use clap::Parser;
use shuffle_tests::chaos::{Outcome, Plan, Summary, run};

#[derive(Parser)]
#[command(about = "Seeded fault suite of the shuffle service")]
struct Args {
    /// Seeds to run, as START..END (END excluded).
    #[arg(long, default_value = "0..24")]
    seeds: String,
    /// One seed only (overrides --seeds).
    #[arg(long)]
    seed: Option<u64>,
    /// Print every run's plan and outcome.
    #[arg(long)]
    verbose: bool,
}

fn seeds(args: &Args) -> anyhow::Result<std::ops::Range<u64>> {
    if let Some(seed) = args.seed {
        return Ok(seed..seed + 1);
    }
    let (start, end) = args.seeds.split_once("..").ok_or_else(|| anyhow::anyhow!("--seeds takes START..END"))?;
    Ok(start.trim().parse()?..end.trim().parse()?)
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
    for seed in seeds(&args)? {
        let plan = Plan::from_seed(seed);
        let run_started = Instant::now();
        let outcome = run(&plan).await;
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
        summary.add(&plan, &outcome);
    }
    print!("{summary}");
    println!("in {:.1?}; reproduce a run with --seed S", started.elapsed());
    Ok(if summary.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
