//! Starting, running and stopping the server: the QUIC endpoint's accept
//! loop, the background spiller and app reaper, and the drain on shutdown
//! (stop accepting, let in-flight requests finish, flush, close).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;

use crate::{
    ServerConfig, ServerError,
    connection::{CLOSE_SHUTDOWN, serve_connection},
    shuffle::FlushReason,
    shutdown::{InFlight, Shutdown},
    state::ServiceState,
    stats::StatsSnapshot,
    telemetry,
    tls::TlsMaterial,
    transport::transport_config,
};

/// How often the spiller re-checks memory when nothing woke it.
const SPILL_RECHECK: Duration = Duration::from_millis(200);
/// How long the endpoint waits for peers to acknowledge the close at shutdown.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A running server. Dropping the handle signals shutdown.
pub struct ServerHandle {
    /// The address the endpoint is bound to.
    local_addr: SocketAddr,
    /// The certificate clients should trust.
    cert_path: PathBuf,
    /// Where `/metrics` and `/status` are served, if anywhere.
    metrics_addr: Option<SocketAddr>,
    /// Shared state, for inspection.
    state: Arc<ServiceState>,
    /// The stop signal.
    shutdown: Shutdown,
    /// The server's main task; completes when the server has stopped.
    task: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the `/metrics` and `/status` listener, if one runs.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The PEM certificate clients should trust.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The server's counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.state.stats.snapshot()
    }

    /// Bytes of blocks held in memory now.
    pub fn memory_used(&self) -> usize {
        self.state.memory.used()
    }

    /// Number of registered apps.
    pub fn app_count(&self) -> usize {
        self.state.app_count()
    }

    /// Signals shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.trigger();
    }

    /// Waits until the server has stopped (after a shutdown signal).
    /// Cancel-safe: dropping this future leaves the handle able to wait again.
    pub async fn stopped(&mut self) {
        if let Some(task) = &mut self.task {
            let _ = task.await;
            self.task = None;
        }
    }

    /// Shuts down: stops accepting, lets in-flight requests finish, flushes, closes.
    pub async fn shutdown(mut self) {
        self.begin_shutdown();
        self.stopped().await;
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// Starts a server with `config` on the current tokio runtime.
pub async fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    config.validate()?;
    let io = |path: &Path, e: std::io::Error| ServerError::Io(format!("{}: {e}", path.display()));
    std::fs::create_dir_all(&config.data_dir).map_err(|e| io(&config.data_dir, e))?;
    let state = Arc::new(ServiceState::new(config.clone()));
    let apps_dir = state.apps_dir();
    if apps_dir.exists() {
        // Shuffle metadata lives in memory, so files of an earlier run cannot be served.
        tracing::warn!(dir = %apps_dir.display(), "removing shuffle files left by an earlier run");
        std::fs::remove_dir_all(&apps_dir).map_err(|e| io(&apps_dir, e))?;
    }
    std::fs::create_dir_all(&apps_dir).map_err(|e| io(&apps_dir, e))?;

    let tls = TlsMaterial::load_or_generate(&config)?;
    let cert_path = tls.cert_path.clone();
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(tls.quic_server_config()?));
    server_config.transport_config(transport_config(config.idle_timeout, config.max_streams_per_connection));
    let endpoint = quinn::Endpoint::server(server_config, config.listen)
        .map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let local_addr = endpoint.local_addr().map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    tracing::info!(
        "shuffle-server listening on {local_addr} (data dir {}, memory budget {}, cert {})",
        config.data_dir.display(),
        config.memory,
        cert_path.display()
    );

    let (metrics_addr, metrics_listener) = match config.metrics_addr {
        Some(addr) => {
            let listener = telemetry::bind(addr).await?;
            let bound = listener.local_addr().map_err(|source| ServerError::Bind { addr, source })?;
            tracing::info!("metrics on http://{bound}/metrics and http://{bound}/status");
            (Some(bound), Some(listener))
        }
        None => (None, None),
    };

    let shutdown = Shutdown::default();
    let task = tokio::spawn(run(endpoint, state.clone(), shutdown.clone(), metrics_listener));
    Ok(ServerHandle { local_addr, cert_path, metrics_addr, state, shutdown, task: Some(task) })
}

/// The server's life: serve until the signal, then drain and stop.
async fn run(
    endpoint: quinn::Endpoint,
    state: Arc<ServiceState>,
    shutdown: Shutdown,
    metrics_listener: Option<tokio::net::TcpListener>,
) {
    let in_flight = InFlight::default();
    let metrics = metrics_listener.map(|l| tokio::spawn(telemetry::serve(l, state.clone())));
    let spiller = tokio::spawn(run_spiller(state.clone(), shutdown.clone()));
    let reaper = tokio::spawn(run_reaper(state.clone(), shutdown.clone()));
    let connections = Arc::new(AtomicUsize::new(0));
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.wait() => break,
        };
        let Some(incoming) = incoming else { break };
        if connections.load(Ordering::Acquire) >= state.config.max_connections {
            tracing::warn!(remote = %incoming.remote_address(), "refusing connection: at max_connections");
            incoming.refuse();
            continue;
        }
        connections.fetch_add(1, Ordering::AcqRel);
        let (state, shutdown, in_flight, connections) =
            (state.clone(), shutdown.clone(), in_flight.clone(), connections.clone());
        tokio::spawn(async move {
            match incoming.await {
                Ok(connection) => serve_connection(state, connection, shutdown, in_flight).await,
                Err(e) => tracing::debug!(error = %e, "handshake failed"),
            }
            connections.fetch_sub(1, Ordering::AcqRel);
        });
    }

    tracing::info!(in_flight = in_flight.count(), "shutting down: no new connections; draining requests");
    let refuser = tokio::spawn({
        let endpoint = endpoint.clone();
        async move {
            while let Some(incoming) = endpoint.accept().await {
                incoming.refuse();
            }
        }
    });
    if tokio::time::timeout(state.config.shutdown_grace, in_flight.drained()).await.is_err() {
        tracing::warn!(in_flight = in_flight.count(), "shutdown grace period over; closing anyway");
    }
    let shuffles = state.all_shuffles();
    let flushed = tokio::task::spawn_blocking(move || {
        for shuffle in shuffles {
            if let Err(e) = shuffle.flush_all() {
                tracing::error!(shuffle = %shuffle.label(), error = %e, "flush at shutdown failed");
            }
        }
    });
    let _ = flushed.await;
    endpoint.close(CLOSE_SHUTDOWN.into(), b"server shutting down");
    let _ = tokio::time::timeout(CLOSE_WAIT, endpoint.wait_idle()).await;
    refuser.abort();
    spiller.abort();
    reaper.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    tracing::info!("shutdown complete");
}

/// Flushes the partitions holding the most memory while the budget is above its high watermark.
async fn run_spiller(state: Arc<ServiceState>, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = state.memory.spill_wanted(SPILL_RECHECK) => {}
            _ = shutdown.wait() => return,
        }
        while state.memory.should_spill() {
            let largest = state
                .all_shuffles()
                .into_iter()
                .filter_map(|s| s.largest_buffer().map(|(target, bytes)| (s, target, bytes)))
                .max_by_key(|(_, _, bytes)| *bytes);
            let Some((shuffle, target, _)) = largest else {
                break;
            };
            let flush = tokio::task::spawn_blocking(move || shuffle.flush(target, FlushReason::MemoryPressure));
            match flush.await {
                Ok(Ok(written)) if written > 0 => {}
                // Nothing could be written (a flush in progress, a quota used up): wait for the next tick.
                Ok(Ok(_)) => break,
                Ok(Err(_)) | Err(_) => {
                    // Already logged and recorded on the shuffle; back off before retrying.
                    tokio::time::sleep(SPILL_RECHECK).await;
                    break;
                }
            }
        }
    }
}

/// Removes apps whose clients have been gone longer than the app timeout.
async fn run_reaper(state: Arc<ServiceState>, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(state.reap_interval()) => {}
            _ = shutdown.wait() => return,
        }
        state.reap_idle_apps(Instant::now()).await;
    }
}
