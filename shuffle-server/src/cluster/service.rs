//! The coordinator process: the [`Coordinator`] state machine behind a QUIC
//! endpoint. Clients say `Hello` and then register shuffles, ask for
//! placements, and begin and commit maps; workers `RegisterWorker` and
//! heartbeat on their own connection, on which the coordinator opens
//! streams to send them commands.
//!
//! Every command is delivered until its worker answers or is declared lost
//! (a decision is acknowledged to its writer only after that). A ticker
//! declares silent workers lost and moves their groups; a reaper removes
//! apps whose clients are gone.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use shuffle_protocol::{
    AppId, ErrorKind, MAX_FRAME_LEN, MapEnd, PROTOCOL_VERSION, Request, Response, ServerRole, ServiceError, ShuffleId,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::coordinator::{
    BeginAnswer, ClusterTotals, Command, CommitAnswer, CommitStep, Coordinator, Settings, WorkerState,
};
use crate::{
    ServerConfig, auth,
    memory::{Consumer, MemoryPool},
    push::request_name,
    transport::{FrameReader, FrameWriter, HELLO_WINDOW},
};

/// How long a connection has to send its first request.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one attempt to deliver a command may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between attempts to deliver a command.
const DELIVERY_RETRY: Duration = Duration::from_millis(200);

/// What came of delivering a command.
#[derive(Debug)]
enum Delivery {
    /// The worker answered.
    Answered(Response),
    /// The worker was declared lost (or is unknown) before it answered.
    Lost,
    /// The worker keeps refusing it; given up.
    Failed(ServiceError),
}

/// Counters of the coordinator, for `/metrics`.
#[derive(Default)]
pub struct CoordinatorStats {
    /// Maps whose decision was recorded.
    pub decisions: AtomicU64,
    /// Workers declared lost.
    pub workers_lost: AtomicU64,
    /// Commit requests refused because blocks were lost.
    pub data_lost: AtomicU64,
}

/// The coordinator process's shared state.
pub struct CoordinatorService {
    state: Mutex<Coordinator>,
    /// Bumped on every change a waiting commit may care about.
    changed: tokio::sync::watch::Sender<u64>,
    /// Each registered worker's connection.
    connections: Mutex<HashMap<String, quinn::Connection>>,
    config: ServerConfig,
    /// Identifies this process (`Welcome`).
    server_id: String,
    /// Frame buffers of requests.
    buffers: Arc<Consumer>,
    _pool: Arc<MemoryPool>,
    /// Counters.
    pub stats: CoordinatorStats,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl CoordinatorService {
    /// A coordinator for `config`, knowing nothing yet.
    pub fn new(config: ServerConfig) -> Result<Arc<Self>, ServiceError> {
        let settings = Settings {
            heartbeat_interval: config.heartbeat_interval,
            worker_timeout: config.worker_timeout,
            app_timeout: config.app_timeout,
            max_apps: config.max_apps,
            max_shuffles_per_app: config.max_shuffles_per_app,
        };
        let pool = MemoryPool::new(config.memory.as_u64() as usize);
        Ok(Arc::new(Self {
            state: Mutex::new(Coordinator::new(settings, Instant::now())),
            changed: tokio::sync::watch::Sender::new(0),
            connections: Mutex::new(HashMap::new()),
            server_id: auth::generate_secret()?.0[..32].to_string(),
            buffers: pool.consumer("coordinator requests"),
            _pool: pool,
            config,
            stats: CoordinatorStats::default(),
        }))
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// The `/status` view.
    pub fn status(&self) -> serde_json::Value {
        let mut status = lock(&self.state).status(Instant::now());
        status["totals"] = serde_json::json!({
            "decisions": self.stats.decisions.load(Ordering::Relaxed),
            "workers_lost": self.stats.workers_lost.load(Ordering::Relaxed),
            "data_lost": self.stats.data_lost.load(Ordering::Relaxed),
        });
        status
    }

    /// The cluster's totals for `/metrics`.
    pub fn totals(&self) -> ClusterTotals {
        lock(&self.state).totals()
    }

    /// Runs the coordinator on `endpoint` until `shutdown`.
    pub async fn run(self: Arc<Self>, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
        let tasks = TaskTracker::new();
        tasks.spawn(self.clone().run_ticker(shutdown.clone()));
        loop {
            let incoming = tokio::select! {
                incoming = endpoint.accept() => incoming,
                _ = shutdown.cancelled() => break,
            };
            let Some(incoming) = incoming else { break };
            let svc = self.clone();
            let stop = shutdown.clone();
            tasks.spawn(async move {
                match incoming.await {
                    Ok(connection) => svc.serve_connection(connection, stop).await,
                    Err(e) => tracing::debug!(error = %e, "handshake failed"),
                }
            });
        }
        tasks.close();
        endpoint.close(crate::connection::CLOSE_SHUTDOWN.into(), b"coordinator shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        tracing::info!("coordinator stopped");
    }

    /// Declares silent workers lost and removes idle apps, on a tick.
    async fn run_ticker(self: Arc<Self>, shutdown: CancellationToken) {
        let period = (self.config.heartbeat_interval / 2).clamp(Duration::from_millis(20), Duration::from_millis(500));
        let mut reap_at = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = shutdown.cancelled() => return,
            }
            let now = Instant::now();
            let (commands, lost) = {
                let mut state = lock(&self.state);
                let before = state.workers().filter(|(_, w)| w.state == WorkerState::Lost).count();
                let mut commands = state.tick(now);
                let after = state.workers().filter(|(_, w)| w.state == WorkerState::Lost).count();
                if now >= reap_at {
                    commands.extend(state.reap_idle_apps(now));
                    reap_at =
                        now + (self.config.app_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(10));
                }
                (commands, after.saturating_sub(before))
            };
            if lost > 0 {
                self.stats.workers_lost.fetch_add(lost as u64, Ordering::Relaxed);
            }
            if !commands.is_empty() || lost > 0 {
                self.bump();
                self.spawn_deliveries(commands);
            }
        }
    }

    fn spawn_deliveries(self: &Arc<Self>, commands: Vec<Command>) {
        for command in commands {
            let svc = self.clone();
            tokio::spawn(async move {
                let worker = command.worker.clone();
                match svc.deliver(&command).await {
                    Delivery::Answered(Response::Conflict { map, attempt }) => {
                        tracing::warn!(%worker, map, attempt, "a worker holds another decision than the one sent");
                    }
                    Delivery::Failed(e) => tracing::warn!(%worker, error = %e, "a command could not be delivered"),
                    _ => {}
                }
            });
        }
    }

    /// Delivers one command: retried until the worker answers or is lost.
    async fn deliver(&self, command: &Command) -> Delivery {
        let give_up = Instant::now() + self.config.worker_timeout * 3;
        loop {
            match lock(&self.state).worker_state(&command.worker) {
                None | Some(WorkerState::Lost) => return Delivery::Lost,
                Some(_) => {}
            }
            let connection = lock(&self.connections).get(&command.worker).cloned();
            if let Some(connection) = connection {
                match tokio::time::timeout(DELIVERY_TIMEOUT, self.call(&connection, &command.request)).await {
                    Ok(Ok(response)) => return Delivery::Answered(response),
                    Ok(Err(e))
                        if matches!(
                            e.kind,
                            ErrorKind::Malformed | ErrorKind::InvalidSpec | ErrorKind::ShuffleExists
                        ) =>
                    {
                        return Delivery::Failed(e);
                    }
                    Ok(Err(e)) if Instant::now() >= give_up => return Delivery::Failed(e),
                    Ok(Err(e)) => tracing::debug!(worker = %command.worker, error = %e, "delivery failed; retrying"),
                    Err(_) => tracing::debug!(worker = %command.worker, "delivery timed out; retrying"),
                }
            }
            let mut changed = self.changed.subscribe();
            let _ = tokio::time::timeout(DELIVERY_RETRY, changed.changed()).await;
        }
    }

    /// One request on a new stream of a worker's connection.
    async fn call(&self, connection: &quinn::Connection, request: &Request) -> Result<Response, ServiceError> {
        let io = |e: &dyn std::fmt::Display| ServiceError::new(ErrorKind::Io, format!("worker connection: {e}"));
        let (send, recv) = connection.open_bi().await.map_err(|e| io(&e))?;
        let mut writer = FrameWriter::new(send);
        writer.request(request).await?;
        writer.finish();
        let mut reader = FrameReader::new(recv, &self.buffers, MAX_FRAME_LEN);
        match reader.next_response().await? {
            Some(Response::Error(e)) => Err(e),
            Some(response) => Ok(response),
            None => Err(io(&"the stream ended without an answer")),
        }
    }

    /// Serves one connection: a client (`Hello`) or a worker (`RegisterWorker`).
    async fn serve_connection(self: Arc<Self>, connection: quinn::Connection, shutdown: CancellationToken) {
        let remote = connection.remote_address();
        let first = tokio::time::timeout(FIRST_REQUEST_TIMEOUT, connection.accept_bi()).await;
        let Ok(Ok((send, recv))) = first else {
            connection.close(crate::connection::CLOSE_HELLO_FAILED.into(), b"no first request");
            return;
        };
        let mut reader = FrameReader::new(recv, &self.buffers, HELLO_WINDOW as usize * 64);
        let mut writer = FrameWriter::new(send);
        let request = match tokio::time::timeout(FIRST_REQUEST_TIMEOUT, reader.next_request()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Err(e)) => {
                let _ = writer.response(&Response::Error(e)).await;
                writer.finish_and_flush().await;
                return;
            }
            _ => return,
        };
        match request {
            Request::Hello { protocol_version, app, secret, auth_token } => {
                let opened = check_version(protocol_version)
                    .and_then(|()| auth::check_token(self.config.auth_token.as_deref(), auth_token.as_deref()))
                    .and_then(|()| app.validate().map_err(ServiceError::from))
                    .and_then(|()| lock(&self.state).open_app(&app, secret.as_ref(), Instant::now()));
                let (secret, generation) = match opened {
                    Ok(opened) => opened,
                    Err(e) => {
                        tracing::info!(%remote, error = %e, "client refused");
                        let _ = writer.response(&Response::Error(e.clone())).await;
                        writer.finish_and_flush().await;
                        connection.close(crate::connection::CLOSE_HELLO_FAILED.into(), e.message.as_bytes());
                        return;
                    }
                };
                let welcome = Response::Welcome {
                    server_version: env!("CARGO_PKG_VERSION").to_string(),
                    app_secret: secret,
                    server_id: self.server_id.clone(),
                    unix_socket: None,
                    role: ServerRole::Coordinator,
                };
                if writer.response(&welcome).await.is_ok() {
                    writer.finish();
                    self.serve_client(&connection, &app, generation, &shutdown).await;
                }
                lock(&self.state).close_app(&app, generation, Instant::now());
            }
            Request::RegisterWorker { protocol_version, cluster_secret, report, shuffles } => {
                let id = report.endpoint.id.clone();
                let checked = check_version(protocol_version)
                    .and_then(|()| {
                        if super::cluster_secret_matches(self.config.cluster_secret.as_deref(), &cluster_secret) {
                            Ok(())
                        } else {
                            Err(ServiceError::new(
                                ErrorKind::Unauthenticated,
                                "a worker presented a wrong cluster secret",
                            ))
                        }
                    })
                    .and_then(|()| {
                        shuffle_protocol::cluster::validate_worker_id(&id)
                            .map_err(|why| ServiceError::new(ErrorKind::Malformed, why))
                    });
                if let Err(e) = checked {
                    tracing::warn!(%remote, error = %e, "worker refused");
                    let _ = writer.response(&Response::Error(e.clone())).await;
                    writer.finish_and_flush().await;
                    connection.close(crate::connection::CLOSE_HELLO_FAILED.into(), e.message.as_bytes());
                    return;
                }
                lock(&self.connections).insert(id.clone(), connection.clone());
                let commands = lock(&self.state).register_worker(report, shuffles, Instant::now());
                self.bump();
                let interval = self.config.heartbeat_interval.as_millis() as u64;
                if writer.response(&Response::WorkerRegistered { heartbeat_interval_ms: interval }).await.is_ok() {
                    writer.finish();
                    self.spawn_deliveries(commands);
                    self.serve_worker(&connection, &id, &shutdown).await;
                }
                let mut connections = lock(&self.connections);
                if connections.get(&id).is_some_and(|c| c.stable_id() == connection.stable_id()) {
                    connections.remove(&id);
                    lock(&self.state).disconnected(&id);
                }
            }
            other => {
                let e = ServiceError::new(
                    ErrorKind::UnexpectedMessage,
                    format!(
                        "the first request to a coordinator must be Hello (clients) or RegisterWorker (workers), not {}",
                        request_name(&other)
                    ),
                );
                let _ = writer.response(&Response::Error(e)).await;
                writer.finish_and_flush().await;
            }
        }
    }

    /// A worker's streams: heartbeats.
    async fn serve_worker(&self, connection: &quinn::Connection, id: &str, shutdown: &CancellationToken) {
        loop {
            let (send, recv) = tokio::select! {
                streams = connection.accept_bi() => match streams {
                    Ok(streams) => streams,
                    Err(e) => {
                        tracing::info!(worker = id, reason = %e, "worker connection closed");
                        return;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let mut reader = FrameReader::new(recv, &self.buffers, MAX_FRAME_LEN);
            let mut writer = FrameWriter::new(send);
            let response = match reader.next_request().await {
                Ok(Some(Request::Heartbeat(report))) if report.endpoint.id == id => {
                    match lock(&self.state).heartbeat(report, Instant::now()) {
                        Ok(()) => Response::Ok,
                        Err(e) => Response::Error(e),
                    }
                }
                Ok(Some(other)) => Response::Error(ServiceError::new(
                    ErrorKind::UnexpectedMessage,
                    format!("a worker may send heartbeats here, not {}", request_name(&other)),
                )),
                Ok(None) => continue,
                Err(e) => Response::Error(e),
            };
            let _ = writer.response(&response).await;
            writer.finish();
        }
    }

    /// A client's streams, one request each.
    async fn serve_client(
        self: &Arc<Self>,
        connection: &quinn::Connection,
        app: &AppId,
        generation: u64,
        shutdown: &CancellationToken,
    ) {
        loop {
            let (send, recv) = tokio::select! {
                streams = connection.accept_bi() => match streams {
                    Ok(streams) => streams,
                    Err(_) => return,
                },
                _ = shutdown.cancelled() => return,
            };
            let (svc, app) = (self.clone(), app.clone());
            tokio::spawn(async move {
                let mut reader = FrameReader::new(recv, &svc.buffers, MAX_FRAME_LEN);
                let mut writer = FrameWriter::new(send);
                let response = match reader.next_request().await {
                    Ok(Some(request)) => {
                        let name = request_name(&request);
                        let started = Instant::now();
                        let response = svc.client_request(&app, generation, request).await;
                        crate::telemetry::record_request(name, started.elapsed());
                        response.unwrap_or_else(|e| {
                            crate::telemetry::record_error(e.kind);
                            Response::Error(e)
                        })
                    }
                    Ok(None) => return,
                    Err(e) => Response::Error(e),
                };
                let _ = writer.response(&response).await;
                writer.finish();
            });
        }
    }

    /// One client request.
    async fn client_request(
        self: &Arc<Self>,
        app: &AppId,
        generation: u64,
        request: Request,
    ) -> Result<Response, ServiceError> {
        match request {
            Request::RegisterShuffle { shuffle, spec } => {
                let (_, commands) = lock(&self.state).register_shuffle(app, generation, shuffle, spec)?;
                for (command, delivery) in commands.iter().zip(deliver_all(self, &commands).await) {
                    if let Delivery::Failed(e) = delivery {
                        tracing::warn!(worker = %command.worker, error = %e, "a worker refused a shuffle");
                    }
                }
                self.bump();
                // The placement may have moved meanwhile (a worker lost while hosting).
                Ok(Response::Placed(lock(&self.state).placement(app, generation, shuffle)?))
            }
            Request::GetPlacement { shuffle } => {
                Ok(Response::Placed(lock(&self.state).placement(app, generation, shuffle)?))
            }
            Request::UnregisterShuffle { shuffle } => {
                let commands = lock(&self.state).unregister_shuffle(app, generation, shuffle)?;
                self.spawn_deliveries(commands);
                Ok(Response::Ok)
            }
            Request::UnregisterApp => {
                let commands = lock(&self.state).unregister_app(app, generation)?;
                self.spawn_deliveries(commands);
                Ok(Response::Ok)
            }
            Request::BeginMap { shuffle, map, attempt } => {
                Ok(match lock(&self.state).begin_map(app, generation, shuffle, map)? {
                    BeginAnswer::Plan(plan) => Response::Plan(plan),
                    BeginAnswer::Refused { committed_attempt } => {
                        Response::AttemptRefused { map, attempt, committed_attempt }
                    }
                })
            }
            Request::CommitMap { shuffle, placement_version, end } => {
                self.commit(app, generation, shuffle, placement_version, end).await
            }
            Request::ReportUnreachable { worker } => {
                let (commands, state) = {
                    let mut state = lock(&self.state);
                    let commands = state.suspect(&worker, Instant::now());
                    (commands, state.worker_state(&worker))
                };
                if !commands.is_empty() {
                    self.stats.workers_lost.fetch_add(1, Ordering::Relaxed);
                    self.bump();
                }
                self.spawn_deliveries(commands);
                // A worker this coordinator does not know (it restarted and
                // the worker has not registered again) is not said lost.
                let lost = state == Some(WorkerState::Lost);
                Ok(Response::WorkerChecked { worker, lost })
            }
            other => Err(ServiceError::new(
                ErrorKind::WrongRole,
                format!(
                    "a coordinator does not serve {}: push and read at the workers of the shuffle's placement",
                    request_name(&other)
                ),
            )),
        }
    }

    /// Decides a map: first attempt to commit wins; the decision is
    /// recorded on every live worker of the shuffle before it is answered.
    async fn commit(
        self: &Arc<Self>,
        app: &AppId,
        generation: u64,
        shuffle: ShuffleId,
        version: u64,
        end: MapEnd,
    ) -> Result<Response, ServiceError> {
        let (map, attempt) = (end.map, end.attempt);
        let deadline = Instant::now() + self.config.worker_timeout * 4;
        loop {
            let mut changed = self.changed.subscribe();
            let step = lock(&self.state).commit_map(app, generation, shuffle, version, &end);
            let step = match step {
                Ok(step) => step,
                Err(e) => {
                    if e.kind == ErrorKind::DataLost {
                        self.stats.data_lost.fetch_add(1, Ordering::Relaxed);
                    }
                    return Err(e);
                }
            };
            match step {
                CommitStep::Done(CommitAnswer::Committed) => return Ok(Response::Committed { map, attempt }),
                CommitStep::Done(CommitAnswer::Refused { committed_attempt }) => {
                    return Ok(Response::AttemptRefused { map, attempt, committed_attempt });
                }
                CommitStep::Wait => {
                    if Instant::now() >= deadline {
                        return Err(ServiceError::new(
                            ErrorKind::Unavailable,
                            format!(
                                "map {map} of shuffle {shuffle}: another attempt's decision is still being recorded"
                            ),
                        ));
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(500), changed.changed()).await;
                }
                CommitStep::Record { commands, map, attempt: recorded } => {
                    let deliveries = deliver_all(self, &commands).await;
                    let conflict = deliveries.iter().find_map(|d| match d {
                        Delivery::Answered(Response::Conflict { attempt, .. }) => Some(*attempt),
                        _ => None,
                    });
                    if let Some(other) = conflict {
                        let commands = {
                            let mut state = lock(&self.state);
                            state.adopt_conflict(app, shuffle, map, other);
                            state.decision_commands(app, shuffle, map)
                        };
                        deliver_all(self, &commands).await;
                        lock(&self.state).recorded(app, shuffle, map, other);
                        self.bump();
                        return Ok(Response::AttemptRefused { map, attempt, committed_attempt: other });
                    }
                    lock(&self.state).recorded(app, shuffle, map, recorded);
                    self.stats.decisions.fetch_add(1, Ordering::Relaxed);
                    self.bump();
                    return Ok(Response::Committed { map, attempt });
                }
            }
        }
    }
}

fn check_version(v: u16) -> Result<(), ServiceError> {
    if v != PROTOCOL_VERSION {
        return Err(ServiceError::new(
            ErrorKind::ProtocolVersion,
            format!("peer speaks protocol version {v}, this coordinator speaks {PROTOCOL_VERSION}"),
        ));
    }
    Ok(())
}

/// Delivers `commands` concurrently; the outcomes in their order.
async fn deliver_all(svc: &Arc<CoordinatorService>, commands: &[Command]) -> Vec<Delivery> {
    let mut set = tokio::task::JoinSet::new();
    for (i, command) in commands.iter().enumerate() {
        let (svc, command) = (svc.clone(), command.clone());
        set.spawn(async move { (i, svc.deliver(&command).await) });
    }
    let mut out: Vec<Option<Delivery>> = (0..commands.len()).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, delivery)) => out[i] = Some(delivery),
            Err(e) => tracing::error!(error = %e, "a delivery task failed"),
        }
    }
    out.into_iter()
        .map(|d| d.unwrap_or_else(|| Delivery::Failed(ServiceError::new(ErrorKind::Io, "delivery task failed"))))
        .collect()
}
