//! The `shuffle-server` daemon: configuration from defaults, an optional TOML
//! file and flags (flags win); runs until SIGINT or SIGTERM, then drains and exits 0.

use std::{io::IsTerminal, net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Parser;
use shuffle_server::{ByteSize, ConfigFile, DEFAULT_METRICS_ADDR, OptionalAddr, Seconds, ServerConfig};
use tracing_subscriber::EnvFilter;

/// Remote shuffle service daemon.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML file with the same keys as the flags (data_dir, memory, ...); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// UDP address to listen on [default: 127.0.0.1:7337].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Directory for shuffle files and the generated certificate [default: ./shuffle-data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Memory budget for buffered blocks, e.g. 512MiB or 2GiB [default: 1GiB].
    #[arg(long, value_name = "SIZE")]
    memory: Option<ByteSize>,
    /// A partition's buffer is written to its file at this size [default: 8MiB].
    #[arg(long, value_name = "SIZE")]
    flush_size: Option<ByteSize>,
    /// Free space to keep on the data dir's filesystem [default: 1GiB].
    #[arg(long, value_name = "SIZE")]
    disk_reserve: Option<ByteSize>,
    /// PEM certificate chain (with --key); without, a self-signed one is generated into the data dir.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key for --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Token clients must present; connections without it are refused.
    #[arg(long, value_name = "TOKEN", env = "SHUFFLE_AUTH_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
    /// Remove an app this long after its last connection closed [default: 5m].
    #[arg(long, value_name = "DURATION")]
    app_timeout: Option<Seconds>,
    /// Close a connection silent for this long [default: 30s].
    #[arg(long, value_name = "DURATION")]
    idle_timeout: Option<Seconds>,
    /// On SIGTERM, give in-flight requests this long to finish [default: 30s].
    #[arg(long, value_name = "DURATION")]
    shutdown_grace: Option<Seconds>,
    /// Most connections served at once [default: 1024].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// TCP address serving /metrics (Prometheus) and /status (JSON), or `off` [default: 127.0.0.1:9337].
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<OptionalAddr>,
}

impl Args {
    fn into_config(self) -> anyhow::Result<ServerConfig> {
        let mut config = ServerConfig {
            metrics_addr: Some(DEFAULT_METRICS_ADDR.parse().expect("a valid address")),
            ..ServerConfig::default()
        };
        if let Some(path) = &self.config {
            ConfigFile::load(path)?.apply(&mut config);
        }
        ConfigFile {
            listen: self.listen,
            data_dir: self.data_dir,
            memory: self.memory,
            flush_size: self.flush_size,
            disk_reserve: self.disk_reserve,
            cert: self.cert,
            key: self.key,
            auth_token: self.auth_token,
            app_timeout: self.app_timeout,
            idle_timeout: self.idle_timeout,
            shutdown_grace: self.shutdown_grace,
            max_connections: self.max_connections,
            max_streams_per_connection: None,
            metrics_addr: self.metrics_addr,
        }
        .apply(&mut config);
        Ok(config)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("shuffle-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let config = Args::parse().into_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        // Handlers first: a signal that arrives while the server starts must not kill it.
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .context("installing the SIGINT handler")?;
        let mut server = shuffle_server::start(config).await?;
        tokio::select! {
            _ = sigint.recv() => tracing::info!("SIGINT received"),
            _ = sigterm.recv() => tracing::info!("SIGTERM received"),
            _ = server.stopped() => anyhow::bail!("the server stopped by itself"),
        }
        server.shutdown().await;
        Ok(())
    })
}
