//! Observability: metrics through the `metrics` facade, and the admin
//! listener (axum) serving Prometheus text at `/metrics` and a JSON view of
//! apps, shuffles, memory and disk at `/status` (a coordinator: its workers
//! and the cluster's totals), on a worker `POST /decommission`, and with
//! `--fault-injection` `POST /fault/partition?millis=N` ([`crate::fault`]).
//!
//! The library only records through the facade; installing a recorder is
//! the binary's choice (`shuffle-server` installs the Prometheus one and
//! hands its handle to [`crate::start_with_metrics`]). Counters live in
//! [`ServerStats`](crate::stats::ServerStats) and gauges are read from the
//! server's state; both are copied into the facade when `/metrics` is
//! scraped, so the numbers tests read and the numbers Prometheus sees are
//! the same. Names follow Prometheus conventions: prefix `shuffle_`, base
//! units, `_total` for counters, and no per-shuffle labels.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{RawQuery, State},
    http::{StatusCode, header::CONTENT_TYPE},
    response::IntoResponse,
    routing::{get, post},
};
use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    ServerError,
    cluster::service::CoordinatorService,
    state::ServiceState,
    stats::{MODES, mode_index, mode_name},
};

/// Upper bounds of the request-duration histogram buckets, in seconds: from
/// a control round trip on loopback (~100 µs) to a long partition read.
pub const LATENCY_BUCKETS: [f64; 12] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0];

/// Describes every metric to the installed recorder (call once after installing it).
pub fn describe() {
    describe_counter!("shuffle_received_bytes_total", Unit::Bytes, "Block bytes accepted from producers, by mode.");
    describe_counter!("shuffle_received_blocks_total", "Blocks accepted from producers, by mode.");
    describe_counter!("shuffle_served_bytes_total", Unit::Bytes, "Block bytes sent to readers, by mode.");
    describe_counter!("shuffle_served_blocks_total", "Blocks sent to readers, by mode.");
    describe_counter!(
        "shuffle_served_direct_bytes_total",
        Unit::Bytes,
        "Of the bytes served, those same-host readers read from the server's files themselves."
    );
    describe_counter!("shuffle_commits_total", "Map attempts committed.");
    describe_counter!("shuffle_refused_attempts_total", "Map attempts refused because another attempt committed.");
    describe_counter!("shuffle_spills_total", "Spills forced by memory pressure.");
    describe_counter!("shuffle_spilled_bytes_total", Unit::Bytes, "Bytes written by spills.");
    describe_counter!("shuffle_flushed_bytes_total", Unit::Bytes, "Bytes written to shuffle files by any spill.");
    describe_counter!("shuffle_errors_total", "Requests that ended in an error, by error kind.");
    describe_counter!("shuffle_memory_accounting_errors_total", "Releases of more memory than was reserved (bugs).");
    describe_gauge!("shuffle_memory_used_bytes", Unit::Bytes, "Bytes reserved in the memory budget.");
    describe_gauge!("shuffle_memory_budget_bytes", Unit::Bytes, "The server-wide memory budget.");
    describe_gauge!("shuffle_disk_used_bytes", Unit::Bytes, "Bytes of shuffle files of registered shuffles.");
    describe_gauge!("shuffle_apps", "Registered apps.");
    describe_gauge!("shuffle_shuffles", "Registered shuffles.");
    describe_gauge!("shuffle_readers", "Partition reads in progress.");
    describe_histogram!("shuffle_request_duration_seconds", Unit::Seconds, "Duration of requests, by request.");
    describe_gauge!("shuffle_cluster_workers", "A coordinator's workers, by state (live, decommissioning, lost).");
    describe_gauge!("shuffle_cluster_apps", "A coordinator's apps.");
    describe_gauge!("shuffle_cluster_shuffles", "A coordinator's shuffles.");
    describe_gauge!("shuffle_cluster_groups_lost", "Groups whose blocks of some maps were lost and await a re-run.");
    describe_gauge!("shuffle_cluster_memory_budget_bytes", Unit::Bytes, "Sum of the live workers' memory budgets.");
    describe_gauge!("shuffle_cluster_memory_used_bytes", Unit::Bytes, "Sum of the live workers' memory in use.");
    describe_gauge!("shuffle_cluster_disk_free_bytes", Unit::Bytes, "Sum of the live workers' free disk.");
    describe_counter!("shuffle_cluster_decisions_total", "Map decisions recorded on the workers.");
    describe_counter!("shuffle_cluster_workers_lost_total", "Workers declared lost.");
    describe_counter!("shuffle_cluster_data_lost_total", "Commits refused because blocks were lost with a worker.");
    describe_counter!(
        "shuffle_cluster_replicas_back_total",
        "A worker's replicas that it could not forward to and that answered its probe again (their writers moved to them)."
    );
}

/// Records the duration of one request; called by the connection handler.
pub fn record_request(request: &'static str, elapsed: Duration) {
    metrics::histogram!("shuffle_request_duration_seconds", "request" => request).record(elapsed.as_secs_f64());
}

/// Counts one request that failed with `kind`.
pub fn record_error(kind: shuffle_protocol::ErrorKind) {
    counter!("shuffle_errors_total", "kind" => format!("{kind:?}")).increment(1);
}

/// Copies the counters and gauges into the facade.
fn publish(state: &ServiceState) {
    let stats = &state.stats;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    for mode in MODES {
        let (i, name) = (mode_index(mode), mode_name(mode));
        counter!("shuffle_received_bytes_total", "mode" => name).absolute(load(&stats.received_bytes[i]));
        counter!("shuffle_received_blocks_total", "mode" => name).absolute(load(&stats.received_blocks[i]));
        counter!("shuffle_served_bytes_total", "mode" => name).absolute(load(&stats.served_bytes[i]));
        counter!("shuffle_served_blocks_total", "mode" => name).absolute(load(&stats.served_blocks[i]));
    }
    counter!("shuffle_served_direct_bytes_total").absolute(load(&stats.served_direct_bytes));
    counter!("shuffle_commits_total").absolute(load(&stats.commits));
    counter!("shuffle_refused_attempts_total").absolute(load(&stats.refused_attempts));
    counter!("shuffle_spills_total").absolute(load(&stats.spills));
    counter!("shuffle_spilled_bytes_total").absolute(load(&stats.spilled_bytes));
    counter!("shuffle_flushed_bytes_total").absolute(load(&stats.flushed_bytes));
    counter!("shuffle_memory_accounting_errors_total").absolute(state.memory.accounting_errors());
    let shuffles = state.all_shuffles();
    gauge!("shuffle_memory_used_bytes").set(state.memory.used() as f64);
    gauge!("shuffle_memory_budget_bytes").set(state.memory.limit() as f64);
    gauge!("shuffle_disk_used_bytes").set(shuffles.iter().map(|s| s.usage().1).sum::<u64>() as f64);
    gauge!("shuffle_apps").set(state.app_count() as f64);
    gauge!("shuffle_shuffles").set(shuffles.len() as f64);
    gauge!("shuffle_readers").set(state.active_readers() as f64);
    if let Some(peers) = state.peers.get() {
        counter!("shuffle_cluster_replicas_back_total").absolute(load(&peers.replicas_back));
    }
}

/// Copies a coordinator's totals into the facade.
fn publish_cluster(coordinator: &CoordinatorService) {
    let t = coordinator.totals();
    gauge!("shuffle_cluster_workers", "state" => "live").set(t.workers_live as f64);
    gauge!("shuffle_cluster_workers", "state" => "decommissioning").set(t.workers_decommissioning as f64);
    gauge!("shuffle_cluster_workers", "state" => "lost").set(t.workers_lost as f64);
    gauge!("shuffle_cluster_apps").set(t.apps as f64);
    gauge!("shuffle_cluster_shuffles").set(t.shuffles as f64);
    gauge!("shuffle_cluster_groups_lost").set(t.groups_lost as f64);
    gauge!("shuffle_cluster_memory_budget_bytes").set(t.memory_budget_bytes as f64);
    gauge!("shuffle_cluster_memory_used_bytes").set(t.memory_used_bytes as f64);
    gauge!("shuffle_cluster_disk_free_bytes").set(t.disk_free_bytes as f64);
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    counter!("shuffle_cluster_decisions_total").absolute(load(&coordinator.stats.decisions));
    counter!("shuffle_cluster_workers_lost_total").absolute(load(&coordinator.stats.workers_lost));
    counter!("shuffle_cluster_data_lost_total").absolute(load(&coordinator.stats.data_lost));
}

/// `/status`: apps with their shuffles, memory, disk and the counters, as JSON.
pub fn status(state: &ServiceState) -> serde_json::Value {
    let apps = state.app_status();
    let s = state.stats.snapshot();
    let disk: u64 = apps.iter().flat_map(|a| &a.shuffles).map(|s| s.disk_bytes).sum();
    let consumers: Vec<_> = state
        .memory
        .usage()
        .into_iter()
        .filter(|c| c.used > 0 || c.waiting > 0)
        .map(|c| serde_json::json!({ "name": c.name, "used_bytes": c.used, "waiting_producers": c.waiting }))
        .collect();
    serde_json::json!({
        "memory": {
            "used_bytes": state.memory.used(),
            "budget_bytes": state.memory.limit(),
            "accounting_errors": state.memory.accounting_errors(),
            "consumers": consumers,
        },
        "disk": { "used_bytes": disk, "full": state.memory.disk_full().map(|e| e.message) },
        "readers": state.active_readers(),
        "totals": {
            "received_bytes": s.bytes_received, "received_blocks": s.blocks_received,
            "served_bytes": s.bytes_served, "served_blocks": s.blocks_served,
            "served_direct_bytes": s.bytes_served_direct,
            "commits": s.commits, "refused_attempts": s.refused_attempts,
            "spills": s.spills, "spilled_bytes": s.spilled_bytes, "errors": s.errors,
        },
        "role": format!("{:?}", state.config.role).to_lowercase(),
        "worker_id": if state.worker_id.is_empty() { None } else { Some(state.worker_id.clone()) },
        "decommissioning": state.decommissioning.load(std::sync::atomic::Ordering::Acquire),
        // A worker's forwarding streams to replicas, by transport (same-host replicas: the Unix socket).
        "replica_streams": state.peers.get().map(|p| serde_json::json!({
            "unix": p.forwards_unix.load(std::sync::atomic::Ordering::Relaxed),
            "quic": p.forwards_quic.load(std::sync::atomic::Ordering::Relaxed),
        })),
        "apps": apps,
    })
}

/// Whose numbers the admin listener serves.
#[derive(Clone)]
pub enum AdminTarget {
    /// A standalone server or a worker.
    Server(Arc<ServiceState>),
    /// A coordinator.
    Coordinator(Arc<CoordinatorService>),
}

/// What the admin handlers share.
#[derive(Clone)]
struct Admin {
    target: AdminTarget,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
}

async fn get_metrics(State(admin): State<Admin>) -> impl IntoResponse {
    let body = match &admin.metrics {
        Some(handle) => {
            match &admin.target {
                AdminTarget::Server(state) => publish(state),
                AdminTarget::Coordinator(c) => publish_cluster(c),
            }
            handle.render()
        }
        None => String::new(),
    };
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

async fn get_status(State(admin): State<Admin>) -> impl IntoResponse {
    axum::Json(match &admin.target {
        AdminTarget::Server(state) => status(state),
        AdminTarget::Coordinator(c) => c.status(),
    })
}

/// `POST /decommission` on a worker: take nothing new, exit once nothing
/// held is needed (or the decommission time-out passes).
async fn post_decommission(State(admin): State<Admin>) -> impl IntoResponse {
    match &admin.target {
        AdminTarget::Server(state) if state.is_worker() => {
            if !state.decommissioning.swap(true, std::sync::atomic::Ordering::AcqRel) {
                tracing::info!("decommission requested");
                tokio::spawn(crate::cluster::worker::drain(state.clone(), admin.shutdown.clone()));
            }
            (StatusCode::ACCEPTED, "decommissioning: no new shuffles; exiting once nothing held is needed\n")
        }
        _ => (StatusCode::CONFLICT, "only a cluster's worker can be decommissioned\n"),
    }
}

/// `POST /fault/partition?millis=N`, only with `--fault-injection`: cuts
/// this process off the network for N ms (see [`crate::fault`]).
async fn post_partition(State(admin): State<Admin>, RawQuery(query): RawQuery) -> impl IntoResponse {
    let AdminTarget::Server(state) = &admin.target else {
        return (StatusCode::CONFLICT, "only a standalone server or a worker can be partitioned\n".to_string());
    };
    if !state.config.fault_injection {
        return (
            StatusCode::FORBIDDEN,
            "fault injection is off (start the server with --fault-injection)\n".to_string(),
        );
    }
    let millis = query.as_deref().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("millis="))).map(str::parse);
    match millis {
        Some(Ok(millis @ 1..=600_000)) => {
            state.partition.start(Duration::from_millis(millis));
            (StatusCode::OK, format!("cut off the network for {millis} ms\n"))
        }
        _ => (StatusCode::BAD_REQUEST, "expected ?millis=N with N from 1 to 600000\n".to_string()),
    }
}

/// Binds the admin listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })
}

/// Serves `/metrics` and `/status` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    target: AdminTarget,
    metrics: Option<PrometheusHandle>,
    shutdown: CancellationToken,
) {
    let router = Router::new()
        .route("/metrics", get(get_metrics))
        .route("/status", get(get_status))
        .route("/decommission", post(post_decommission))
        .route("/fault/partition", post(post_partition))
        .with_state(Admin { target, metrics, shutdown: shutdown.clone() });
    if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await {
        tracing::warn!(error = %e, "admin listener stopped");
    }
}
