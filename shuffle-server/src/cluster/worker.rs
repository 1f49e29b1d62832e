//! A worker's life in the cluster: it registers with the coordinator
//! (reporting what it holds), heartbeats, and carries out the commands the
//! coordinator sends on streams it opens on the same connection (hold a
//! shuffle, record decisions, drop a shuffle or an app). When the
//! connection breaks it registers again, trying each coordinator address
//! in turn.
//!
//! Decommission: once asked (`POST /decommission` on the admin listener),
//! the worker says so in its heartbeats, so the coordinator places nothing
//! new on it; it exits when it holds no shuffle and serves no reader, or
//! when the decommission time-out passes.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use shuffle_protocol::{
    ErrorKind, MAX_FRAME_LEN, PROTOCOL_VERSION, Request, Response, ServiceError, WorkerEndpoint, WorkerReport,
};
use tokio_util::sync::CancellationToken;

use super::peers::Peers;
use crate::{
    ServerError,
    state::ServiceState,
    transport::{FrameReader, FrameWriter},
};

/// File in the data dir that keeps a worker's id across restarts.
pub const WORKER_ID_FILE: &str = "worker-id";

/// Longest pause between attempts to reach the coordinator.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The worker's id: the configured one, or the one kept in the data dir
/// (created on first start), so a restarted worker is the same worker.
pub fn worker_id(configured: Option<&str>, data_dir: &Path) -> Result<String, ServerError> {
    if let Some(id) = configured {
        return Ok(id.to_string());
    }
    let path = data_dir.join(WORKER_ID_FILE);
    let io = |e: std::io::Error| ServerError::Io(format!("{}: {e}", path.display()));
    match std::fs::read_to_string(&path) {
        Ok(id) => {
            let id = id.trim().to_string();
            shuffle_protocol::cluster::validate_worker_id(&id).map_err(ServerError::Config)?;
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = crate::auth::generate_secret().map_err(|e| ServerError::Io(e.message))?;
            let id = format!("worker-{}", &secret.0[..12]);
            crate::storage::files::write_durably(&path, id.as_bytes()).map_err(|e| ServerError::Io(e.message))?;
            Ok(id)
        }
        Err(e) => Err(io(e)),
    }
}

/// This worker's state as the coordinator sees it.
pub fn report(state: &ServiceState, advertise: SocketAddr) -> WorkerReport {
    let dir = &state.config.data_dir;
    let (total, free) = rustix::fs::statvfs(dir.as_path())
        .map(|s| (s.f_blocks.saturating_mul(s.f_frsize), s.f_bavail.saturating_mul(s.f_frsize)))
        .unwrap_or((0, 0));
    WorkerReport {
        endpoint: WorkerEndpoint { id: state.worker_id.clone(), addr: advertise },
        memory_budget: state.memory.limit() as u64,
        memory_used: state.memory.used() as u64,
        disk_total: total,
        disk_free: free,
        disk_reserve: state.config.disk_reserve.as_u64(),
        active_readers: state.active_readers() as u32,
        decommissioning: state.decommissioning.load(Ordering::Acquire),
    }
}

/// Registers with the coordinator and stays registered until `stop` (after
/// the server's own shutdown has written everything down).
pub async fn run(state: Arc<ServiceState>, peers: Arc<Peers>, advertise: SocketAddr, stop: CancellationToken) {
    let addrs = state.config.coordinator.clone();
    let mut backoff = Duration::from_millis(100);
    let mut next = 0;
    while !stop.is_cancelled() {
        let addr = addrs[next % addrs.len()];
        next += 1;
        let session = tokio::select! {
            result = session(&state, &peers, addr, advertise, &stop) => result,
            _ = stop.cancelled() => return,
        };
        match session {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) => tracing::warn!(coordinator = %addr, error = %e, "no session with the coordinator; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One registration with the coordinator at `addr`, until its connection breaks.
async fn session(
    state: &Arc<ServiceState>,
    peers: &Arc<Peers>,
    addr: SocketAddr,
    advertise: SocketAddr,
    stop: &CancellationToken,
) -> Result<(), ServiceError> {
    let connection = peers.connect(addr).await?;
    let held = state.held_shuffles();
    let held_count = held.len();
    let register = Request::RegisterWorker {
        protocol_version: PROTOCOL_VERSION,
        cluster_secret: peers.secret().to_string(),
        report: report(state, advertise),
        shuffles: held,
    };
    let interval = match peers.call(&connection, &register).await? {
        Response::WorkerRegistered { heartbeat_interval_ms } => Duration::from_millis(heartbeat_interval_ms.max(10)),
        other => {
            return Err(ServiceError::new(
                ErrorKind::UnexpectedMessage,
                format!("expected WorkerRegistered, got {other:?}"),
            ));
        }
    };
    tracing::info!(coordinator = %addr, worker = %state.worker_id, shuffles = held_count, "registered with the coordinator");
    let commands = {
        let (state, connection) = (state.clone(), connection.clone());
        let stop = stop.clone();
        tokio::spawn(async move { serve_commands(state, connection, stop).await })
    };
    let result = loop {
        tokio::time::sleep(interval).await;
        match peers.call(&connection, &Request::Heartbeat(report(state, advertise))).await {
            Ok(Response::Ok) => {}
            Ok(other) => {
                break Err(ServiceError::new(ErrorKind::UnexpectedMessage, format!("heartbeat answered {other:?}")));
            }
            // Not registered there (it restarted): register again.
            Err(e) => break Err(e),
        }
    };
    commands.abort();
    connection.close(0u32.into(), b"registering again");
    result
}

/// Carries out the coordinator's commands, each on its own stream.
async fn serve_commands(state: Arc<ServiceState>, connection: quinn::Connection, stop: CancellationToken) {
    loop {
        let (send, recv) = tokio::select! {
            streams = connection.accept_bi() => match streams {
                Ok(streams) => streams,
                Err(_) => return,
            },
            _ = stop.cancelled() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let mut reader = FrameReader::new(recv, &state.receive_buffers, MAX_FRAME_LEN);
            let mut writer = FrameWriter::new(send);
            let response = match reader.next_request().await {
                Ok(Some(request)) => match command(&state, request).await {
                    Ok(response) => response,
                    Err(e) => Response::Error(e),
                },
                Ok(None) => return,
                Err(e) => Response::Error(e),
            };
            let _ = writer.response(&response).await;
            writer.finish();
        });
    }
}

/// One command from the coordinator.
async fn command(state: &Arc<ServiceState>, request: Request) -> Result<Response, ServiceError> {
    match request {
        Request::HostShuffle { app, secret, shuffle, spec, placement, decided } => {
            let state = state.clone();
            tokio::task::spawn_blocking(move || state.host_shuffle((app, secret), shuffle, spec, placement, &decided))
                .await
                .map_err(|e| ServiceError::new(ErrorKind::Io, format!("hosting task: {e}")))??;
            Ok(Response::Ok)
        }
        Request::RecordDecisions { app, shuffle, decisions } => {
            let hosted = state.hosted_by_app(&app, shuffle)?;
            Ok(match hosted.decide(&decisions)? {
                Some((map, attempt)) => Response::Conflict { map, attempt },
                None => Response::Ok,
            })
        }
        Request::DropShuffle { app, shuffle } => {
            state.drop_hosted(&app, shuffle).await;
            Ok(Response::Ok)
        }
        Request::DropApp { app } => {
            state.drop_app(&app).await;
            Ok(Response::Ok)
        }
        other => Err(ServiceError::new(
            ErrorKind::UnexpectedMessage,
            format!("{} is not a coordinator command", crate::push::request_name(&other)),
        )),
    }
}

/// Decommission: waits until the worker holds no shuffle and serves no
/// reader (or the time-out passes), then stops the server.
pub async fn drain(state: Arc<ServiceState>, shutdown: CancellationToken) {
    let deadline = tokio::time::Instant::now() + state.config.decommission_timeout;
    loop {
        if state.hosted_count() == 0 && state.active_readers() == 0 {
            tracing::info!("decommissioned: nothing held any more; stopping");
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(shuffles = state.hosted_count(), "decommission time-out: stopping with shuffles still held");
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = shutdown.cancelled() => return,
        }
    }
    shutdown.cancel();
}

/// Checks a `PeerHello`'s cluster secret.
pub fn check_peer(state: &ServiceState, presented: &str) -> Result<(), ServiceError> {
    if super::cluster_secret_matches(state.config.cluster_secret.as_deref(), presented) {
        Ok(())
    } else {
        Err(ServiceError::new(ErrorKind::Unauthenticated, "a peer presented a wrong cluster secret"))
    }
}
