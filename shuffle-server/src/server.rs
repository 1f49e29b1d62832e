//! Starting, running and stopping the server: recovery of what a graceful
//! shutdown left, the QUIC endpoint's accept loop, the background spiller
//! and app reaper, and the drain on shutdown (stop accepting, let in-flight
//! requests finish, write everything down, close).
//!
//! Shutdown flows from one [`CancellationToken`]; requests in flight are a
//! [`TaskTracker`] that shutdown waits on (up to the grace period).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinHandle;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    ServerConfig, ServerError,
    cluster::{peers::Peers, service::CoordinatorService},
    config::Role,
    connection::{CLOSE_SHUTDOWN, ServerContext, serve_quic_connection},
    disk,
    state::ServiceState,
    stats::StatsSnapshot,
    telemetry,
    tls::TlsMaterial,
    transport::{Windows, server_transport},
};

/// How often the spiller re-checks memory (and a full disk) when nothing woke it.
const SPILL_RECHECK: Duration = Duration::from_millis(200);
/// How long the endpoint waits for peers to acknowledge the close at shutdown.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A running server. Dropping the handle signals shutdown.
pub struct ServerHandle {
    /// The address the QUIC endpoint is bound to.
    local_addr: SocketAddr,
    /// The certificate clients should trust.
    cert_path: PathBuf,
    /// Where `/metrics` and `/status` are served, if anywhere.
    metrics_addr: Option<SocketAddr>,
    /// Shared state, for inspection.
    state: Arc<ServiceState>,
    /// A coordinator's state.
    coordinator: Option<Arc<CoordinatorService>>,
    /// The stop signal.
    shutdown: CancellationToken,
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

    /// The Unix socket same-host clients use, if the server has one.
    pub fn unix_socket(&self) -> Option<PathBuf> {
        crate::storage::lock(&self.state.unix_socket).clone()
    }

    /// The server's counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.state.stats.snapshot()
    }

    /// Bytes reserved in the memory budget now.
    pub fn memory_used(&self) -> usize {
        self.state.memory.used()
    }

    /// Memory accounting errors since start (0 unless there is a bug).
    pub fn memory_accounting_errors(&self) -> u64 {
        self.state.memory.accounting_errors()
    }

    /// Number of registered apps.
    pub fn app_count(&self) -> usize {
        self.state.app_count()
    }

    /// The `/status` view, without going through HTTP.
    pub fn status(&self) -> serde_json::Value {
        match &self.coordinator {
            Some(c) => c.status(),
            None => telemetry::status(&self.state),
        }
    }

    /// A worker's id (empty for other roles).
    pub fn worker_id(&self) -> &str {
        &self.state.worker_id
    }

    /// Whether this worker was decommissioned (it stops by itself when done).
    pub fn decommissioned(&self) -> bool {
        self.state.decommissioning.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Signals shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the server has stopped (after a shutdown signal).
    /// Cancel-safe: dropping this future leaves the handle able to wait again.
    pub async fn stopped(&mut self) {
        if let Some(task) = &mut self.task {
            let _ = task.await;
            self.task = None;
        }
    }

    /// Shuts down: stops accepting, lets in-flight requests finish, writes
    /// everything committed down for the next start, closes.
    pub async fn shutdown(mut self) {
        self.begin_shutdown();
        self.stopped().await;
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Starts a server with `config` on the current tokio runtime; `/metrics`
/// stays empty (no recorder: see [`start_with_metrics`]).
pub async fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    start_with_metrics(config, None).await
}

/// Starts a server whose `/metrics` renders the Prometheus recorder
/// `metrics`, which the caller installed.
pub async fn start_with_metrics(
    config: ServerConfig,
    metrics: Option<PrometheusHandle>,
) -> Result<ServerHandle, ServerError> {
    config.validate()?;
    crate::allocator::set_memory_return_delay(config.memory_return_delay);
    let io = |path: &Path, e: std::io::Error| ServerError::Io(format!("{}: {e}", path.display()));
    std::fs::create_dir_all(&config.data_dir).map_err(|e| io(&config.data_dir, e))?;
    if config.role == Role::Coordinator {
        return start_coordinator(config, metrics).await;
    }
    let state = if config.role == Role::Worker {
        let id = crate::cluster::worker::worker_id(config.worker_id.as_deref(), &config.data_dir)?;
        let state =
            Arc::new(ServiceState::for_worker(config.clone(), id.clone()).map_err(|e| ServerError::Io(e.message))?);
        let peers = Peers::new(&config, id, state.receive_buffers.clone(), state.partition.clone())?;
        let _ = state.peers.set(Arc::new(peers));
        state
    } else {
        Arc::new(ServiceState::new(config.clone()).map_err(|e| ServerError::Io(e.message))?)
    };
    let apps_dir = state.apps_dir();
    std::fs::create_dir_all(&apps_dir).map_err(|e| io(&apps_dir, e))?;
    let recovering = state.clone();
    let (apps, shuffles) = tokio::task::spawn_blocking(move || recovering.recover())
        .await
        .map_err(|e| ServerError::Io(format!("recovery: {e}")))?;
    if apps > 0 {
        tracing::info!(apps, shuffles, "recovered the shuffles a graceful shutdown left");
    }

    let tls = TlsMaterial::load_or_generate(&config)?;
    let cert_path = tls.cert_path.clone();
    let windows = Windows::for_budget(config.memory.as_u64(), config.max_connections);
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(tls.quic_server_config()?));
    server_config.transport_config(server_transport(windows, config.idle_timeout, config.max_udp_payload));
    let endpoint = bind_endpoint(&config, server_config, &state.partition)?;
    let local_addr = endpoint.local_addr().map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    // Every listener is bound before the server says it listens.
    let unix = match config.unix_socket.path(&config.data_dir) {
        Some(path) => {
            let listener = bind_unix(&path)?;
            *crate::storage::lock(&state.unix_socket) = Some(path);
            Some(listener)
        }
        None => None,
    };

    if let Some(path) = crate::storage::lock(&state.unix_socket).as_ref() {
        tracing::info!("same-host clients on unix://{}", path.display());
    }
    if windows.max_connections < config.max_connections {
        tracing::info!(
            "serving at most {} authenticated QUIC connections (not {}): that many windows of {} bytes fill the \
             transport's share of the {} budget",
            windows.max_connections,
            config.max_connections,
            windows.connection,
            config.memory
        );
    }
    tracing::info!(
        "shuffle-server {:?} listening on {local_addr} (data dir {}, memory budget {}, cert {})",
        config.role,
        config.data_dir.display(),
        config.memory,
        cert_path.display()
    );

    let shutdown = CancellationToken::new();
    let target = telemetry::AdminTarget::Server(state.clone());
    let (metrics_addr, admin) = start_admin(&config, target, metrics, &shutdown).await?;
    // A worker stays registered until its shuffles are written down at shutdown.
    let agent = state.peers.get().cloned().map(|peers| {
        let stop = CancellationToken::new();
        let advertise = config.advertised(local_addr);
        tracing::info!(worker = %state.worker_id, %advertise, coordinator = ?config.coordinator, "worker starting");
        tokio::spawn(crate::cluster::worker::run(state.clone(), peers.clone(), advertise, stop.clone()));
        (stop, peers)
    });

    let ctx = ServerContext {
        state: state.clone(),
        shutdown: shutdown.clone(),
        requests: TaskTracker::new(),
        windows,
        authenticated: Arc::default(),
    };
    let unix = unix.map(|listener| tokio::spawn(run_unix(listener, ctx.clone())));
    let task = tokio::spawn(run(endpoint, ctx, admin, unix, agent));
    Ok(ServerHandle { local_addr, cert_path, metrics_addr, state, coordinator: None, shutdown, task: Some(task) })
}

/// Binds and serves the admin listener, if configured.
async fn start_admin(
    config: &ServerConfig,
    target: telemetry::AdminTarget,
    metrics: Option<PrometheusHandle>,
    shutdown: &CancellationToken,
) -> Result<(Option<SocketAddr>, Option<JoinHandle<()>>), ServerError> {
    match config.metrics_addr.0 {
        Some(addr) => {
            let listener = telemetry::bind(addr).await?;
            let bound = listener.local_addr().map_err(|source| ServerError::Bind { addr, source })?;
            tracing::info!("metrics on http://{bound}/metrics and http://{bound}/status");
            let admin = tokio::spawn(telemetry::serve(listener, target, metrics, shutdown.clone()));
            Ok((Some(bound), Some(admin)))
        }
        None => Ok((None, None)),
    }
}

/// Starts a coordinator: places shuffles on workers and decides commits.
async fn start_coordinator(
    config: ServerConfig,
    metrics: Option<PrometheusHandle>,
) -> Result<ServerHandle, ServerError> {
    let state = Arc::new(ServiceState::new(config.clone()).map_err(|e| ServerError::Io(e.message))?);
    let coordinator = CoordinatorService::new(config.clone()).map_err(|e| ServerError::Io(e.message))?;
    let tls = TlsMaterial::load_or_generate(&config)?;
    let cert_path = tls.cert_path.clone();
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(tls.quic_server_config()?));
    server_config
        .transport_config(crate::transport::coordinator_transport(config.idle_timeout, config.max_udp_payload));
    let endpoint = bind_endpoint(&config, server_config, &state.partition)?;
    let local_addr = endpoint.local_addr().map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    tracing::info!("shuffle-server Coordinator listening on {local_addr} (cert {})", cert_path.display());
    let shutdown = CancellationToken::new();
    let target = telemetry::AdminTarget::Coordinator(coordinator.clone());
    let (metrics_addr, admin) = start_admin(&config, target, metrics, &shutdown).await?;
    let task = {
        let (coordinator, shutdown) = (coordinator.clone(), shutdown.clone());
        tokio::spawn(async move {
            coordinator.run(endpoint, shutdown).await;
            if let Some(admin) = admin {
                let _ = tokio::time::timeout(CLOSE_WAIT, admin).await;
            }
        })
    };
    Ok(ServerHandle {
        local_addr,
        cert_path,
        metrics_addr,
        state,
        coordinator: Some(coordinator),
        shutdown,
        task: Some(task),
    })
}

/// Binds the QUIC endpoint. In a cluster, its stateless-reset key is
/// derived from the cluster secret, so a coordinator or worker that restarts
/// on the same address resets the connections its predecessor had at their
/// next packet: peers and clients reconnect at once instead of waiting out
/// the idle time-out.
fn bind_endpoint(
    config: &ServerConfig,
    server_config: quinn::ServerConfig,
    partition: &Arc<crate::fault::Partition>,
) -> Result<quinn::Endpoint, ServerError> {
    let bind = |source| ServerError::Bind { addr: config.listen, source };
    let socket = crate::fault::udp_socket(config.listen, config.fault_injection.then_some(partition)).map_err(bind)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let Some(secret) = &config.cluster_secret else {
        return quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            runtime,
        )
        .map_err(bind);
    };
    let derive = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&derive, b"shuffle-server QUIC stateless reset");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, tag.as_ref());
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(key));
    // Random connection ids without quinn's per-process check, so the
    // successor takes its predecessor's ids as its own (and resets them)
    // instead of dropping their packets as invalid.
    endpoint_config.cid_generator(|| Box::new(RandomCids));
    quinn::Endpoint::new_with_abstract_socket(endpoint_config, Some(server_config), socket, runtime).map_err(bind)
}

/// Random 8-byte connection ids that any process of the cluster accepts as
/// well-formed (the reset token, not the id, proves who sent a reset).
struct RandomCids;

impl quinn::ConnectionIdGenerator for RandomCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut bytes = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .expect("the system's random source");
        quinn::ConnectionId::new(&bytes)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// Binds the Unix socket at `path`, replacing a stale socket file left by a
/// server that is gone (but not one that still answers).
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ServerError> {
    let err = |e: std::io::Error| ServerError::Io(format!("Unix socket {}: {e}", path.display()));
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::Io(format!(
                "Unix socket {}: another server is listening on it; use --unix-socket to choose another path or off",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    tokio::net::UnixListener::bind(path).map_err(err)
}

/// Accepts same-host streams on the Unix socket until shutdown; each is
/// served as a tracked request. Streams beyond the limit wait.
async fn run_unix(listener: tokio::net::UnixListener, ctx: ServerContext) {
    let limit = ctx.windows.max_connections * ctx.state.config.max_streams_per_connection as usize;
    let permits = Arc::new(tokio::sync::Semaphore::new(limit));
    let fault_injection = ctx.state.config.fault_injection;
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit,
            _ = ctx.shutdown.cancelled() => return,
        };
        let Ok(permit) = permit else { return };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                // Refused while the fault suite keeps this process cut off.
                Ok(_) if ctx.state.partition.is_active() => continue,
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting on the Unix socket");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = ctx.shutdown.cancelled() => return,
        };
        let task_ctx = ctx.clone();
        let cut = fault_injection.then(|| crate::fault::UnixCut::of(&stream, &ctx.state.partition)).flatten();
        ctx.requests.spawn(async move {
            let serve = crate::connection::serve_unix_stream(task_ctx, stream);
            match cut {
                Some(cut) => cut.around(serve).await,
                None => serve.await,
            }
            drop(permit);
        });
    }
}

/// The server's life: serve until the signal, then drain and stop.
async fn run(
    endpoint: quinn::Endpoint,
    ctx: ServerContext,
    admin: Option<JoinHandle<()>>,
    unix: Option<JoinHandle<()>>,
    agent: Option<(CancellationToken, Arc<Peers>)>,
) {
    let state = ctx.state.clone();
    let spiller = tokio::spawn(run_spiller(state.clone(), ctx.shutdown.clone()));
    let reaper = tokio::spawn(run_reaper(state.clone(), ctx.shutdown.clone()));
    let connections = Arc::new(AtomicUsize::new(0));
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = ctx.shutdown.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        if connections.load(Ordering::Acquire) >= state.config.max_connections {
            tracing::warn!(remote = %incoming.remote_address(), "refusing connection: at the connection limit");
            incoming.refuse();
            continue;
        }
        connections.fetch_add(1, Ordering::AcqRel);
        let (ctx, connections) = (ctx.clone(), connections.clone());
        tokio::spawn(async move {
            match incoming.await {
                Ok(connection) => serve_quic_connection(ctx, connection).await,
                Err(e) => tracing::debug!(error = %e, "handshake failed"),
            }
            connections.fetch_sub(1, Ordering::AcqRel);
        });
    }

    ctx.requests.close();
    tracing::info!(in_flight = ctx.requests.len(), "shutting down: no new connections; draining requests");
    let refuser = tokio::spawn({
        let endpoint = endpoint.clone();
        async move {
            while let Some(incoming) = endpoint.accept().await {
                incoming.refuse();
            }
        }
    });
    state.memory.wake_all();
    if tokio::time::timeout(state.config.shutdown_grace, ctx.requests.wait()).await.is_err() {
        tracing::warn!(in_flight = ctx.requests.len(), "shutdown grace period over; closing anyway");
    }
    let persisting = state.clone();
    match tokio::task::spawn_blocking(move || persisting.persist_all()).await {
        Ok((saved, failed)) => tracing::info!(saved, failed, "shuffles written down for the next start"),
        Err(e) => tracing::error!(error = %e, "persisting at shutdown failed"),
    }
    if let Some((stop, peers)) = agent {
        stop.cancel();
        peers.close();
    }
    if let Some(unix) = unix {
        unix.abort();
    }
    if let Some(path) = crate::storage::lock(&state.unix_socket).take() {
        let _ = std::fs::remove_file(path);
    }
    endpoint.close(CLOSE_SHUTDOWN.into(), b"server shutting down");
    let _ = tokio::time::timeout(CLOSE_WAIT, endpoint.wait_idle()).await;
    refuser.abort();
    spiller.abort();
    reaper.abort();
    if let Some(admin) = admin {
        let _ = tokio::time::timeout(CLOSE_WAIT, admin).await;
    }
    tracing::info!("shutdown complete");
}

/// Writes buffers to disk while memory is above its high watermark: first
/// the shuffles holding more than their share, largest buffer first. Also
/// notices when a full disk has room again.
async fn run_spiller(state: Arc<ServiceState>, shutdown: CancellationToken) {
    let pool = state.memory.clone();
    loop {
        tokio::select! {
            _ = pool.spill_wanted(SPILL_RECHECK) => {}
            _ = shutdown.cancelled() => return,
        }
        if pool.disk_full().is_some()
            && disk::check_reserve(
                &state.config.data_dir,
                state.config.flush_size.as_u64(),
                state.config.disk_reserve.as_u64(),
            )
            .is_ok()
        {
            tracing::info!("the data dir has room again");
            pool.set_disk_full(None);
        }
        while pool.should_spill() {
            let chosen = state
                .all_shuffles()
                .into_iter()
                .filter_map(|s| {
                    s.spill_candidate().map(|(target, bytes)| (s.core.memory.over_share(), bytes, target, s))
                })
                .max_by_key(|(over, bytes, _, _)| (*over, *bytes));
            let Some((_, _, target, shuffle)) = chosen else { break };
            match tokio::task::spawn_blocking(move || shuffle.spill(target, true)).await {
                Ok(Ok(written)) if written > 0 => {}
                // Nothing could be written (a spill in progress, a quota used up): wait for the next tick.
                Ok(Ok(_)) => break,
                Ok(Err(_)) | Err(_) => {
                    // Recorded by the shuffle (a full disk reaches waiting producers); back off.
                    tokio::time::sleep(SPILL_RECHECK).await;
                    break;
                }
            }
        }
    }
}

/// Removes apps whose clients have been gone longer than the app timeout.
async fn run_reaper(state: Arc<ServiceState>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(state.reap_interval()) => {}
            _ = shutdown.cancelled() => return,
        }
        state.reap_idle_apps(Instant::now()).await;
    }
}
