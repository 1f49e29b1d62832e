//! The `shuffle-server` daemon: configuration from defaults, an optional TOML
//! file and flags (flags win); installs the Prometheus metrics recorder;
//! runs until SIGINT or SIGTERM, then drains, writes its shuffles down for
//! the next start, and exits 0.

use std::{io::IsTerminal, process::ExitCode};

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusBuilder;
use shuffle_server::{ServerConfig, ServerError, telemetry};
use tracing_subscriber::EnvFilter;

/// Block buffers come and go at the rate data moves; mimalloc reuses freed
/// ones instead of handing pages back to the kernel to be zeroed again.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = match ServerConfig::load(std::env::args_os()) {
        Ok(config) => config,
        // --help and --version print and exit 0; usage errors exit 2.
        Err(ServerError::Usage(e)) => e.exit(),
        Err(e) => {
            eprintln!("shuffle-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(dir) = &config.write_cert {
        return match shuffle_server::tls::write_cluster_cert(dir, &config.tls_name) {
            Ok((cert, key)) => {
                println!("{}\n{}", cert.display(), key.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("shuffle-server: {e}");
                ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("shuffle-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: ServerConfig) -> anyhow::Result<()> {
    let metrics = match config.metrics_addr.0 {
        Some(_) => {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&telemetry::LATENCY_BUCKETS)
                .context("configuring the metrics recorder")?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).context("installing the metrics recorder")?;
            telemetry::describe();
            Some(handle)
        }
        None => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        // Handlers first: a signal that arrives while the server starts must not kill it.
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .context("installing the SIGINT handler")?;
        let mut server = shuffle_server::start_with_metrics(config, metrics).await?;
        tokio::select! {
            _ = sigint.recv() => tracing::info!("SIGINT received"),
            _ = sigterm.recv() => tracing::info!("SIGTERM received"),
            _ = server.stopped() => {
                if !server.decommissioned() {
                    anyhow::bail!("the server stopped by itself");
                }
                tracing::info!("decommission complete; exiting");
            }
        }
        server.shutdown().await;
        Ok(())
    })
}
