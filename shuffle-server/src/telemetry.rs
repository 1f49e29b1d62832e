//! Observability: metrics through the `metrics` facade, exported as
//! Prometheus text at `/metrics`, and a JSON view of apps, shuffles, memory
//! and disk at `/status`, both on a small HTTP listener (`--metrics-addr`).
//!
//! Counters live in [`ServerStats`](crate::stats::ServerStats) and gauges are
//! read from the server's state; both are copied into the facade when
//! `/metrics` is scraped, so the numbers tests read and the numbers Prometheus
//! sees are the same. Request durations and errors by kind are recorded where
//! they happen. Names follow Prometheus conventions: prefix `shuffle_`, base
//! units, `_total` for counters, and no per-shuffle labels.
//!
//! The facade has one global recorder per process: several servers embedded
//! in one process share it (the last one scraped sets the counters).

use std::{net::SocketAddr, sync::Arc, sync::OnceLock, time::Duration};

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    ServerError,
    state::ServiceState,
    stats::{MODES, mode_index, mode_name},
};

/// Upper bounds of the request-duration histogram buckets, in seconds: from
/// a control round trip on loopback (~100 µs) to a long partition read.
const LATENCY_BUCKETS: [f64; 12] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0];

/// Largest HTTP request head accepted; scrapers send a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The process's Prometheus recorder, installed on first use.
fn handle() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().set_buckets(&LATENCY_BUCKETS).ok()?.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("another metrics recorder is installed; /metrics will be empty");
                return None;
            }
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    describe_counter!("shuffle_received_bytes_total", Unit::Bytes, "Block bytes accepted from producers, by mode.");
    describe_counter!("shuffle_received_blocks_total", "Blocks accepted from producers, by mode.");
    describe_counter!("shuffle_served_bytes_total", Unit::Bytes, "Block bytes sent to readers, by mode.");
    describe_counter!("shuffle_served_blocks_total", "Blocks sent to readers, by mode.");
    describe_counter!("shuffle_commits_total", "Map attempts committed.");
    describe_counter!("shuffle_refused_attempts_total", "Map attempts refused because another attempt committed.");
    describe_counter!("shuffle_spills_total", "Flushes forced by memory pressure.");
    describe_counter!("shuffle_spilled_bytes_total", Unit::Bytes, "Bytes written by spills.");
    describe_counter!("shuffle_flushed_bytes_total", Unit::Bytes, "Bytes written to shuffle files by any flush.");
    describe_counter!("shuffle_errors_total", "Requests that ended in an error, by error kind.");
    describe_gauge!("shuffle_memory_used_bytes", Unit::Bytes, "Bytes of blocks held in memory.");
    describe_gauge!("shuffle_memory_budget_bytes", Unit::Bytes, "The server-wide memory budget.");
    describe_gauge!("shuffle_disk_used_bytes", Unit::Bytes, "Bytes of shuffle files of registered shuffles.");
    describe_gauge!("shuffle_apps", "Registered apps.");
    describe_gauge!("shuffle_shuffles", "Registered shuffles.");
    describe_gauge!("shuffle_readers", "Partition reads in progress.");
    describe_histogram!("shuffle_request_duration_seconds", Unit::Seconds, "Duration of requests, by request.");
}

/// Records the duration of one request; called by the connection handler.
pub fn record_request(request: &'static str, elapsed: Duration) {
    if handle().is_some() {
        metrics::histogram!("shuffle_request_duration_seconds", "request" => request).record(elapsed.as_secs_f64());
    }
}

/// Counts one request that failed with `kind`.
pub fn record_error(kind: shuffle_protocol::ErrorKind) {
    if handle().is_some() {
        counter!("shuffle_errors_total", "kind" => format!("{kind:?}")).increment(1);
    }
}

/// The Prometheus text of every metric, after copying the counters and gauges in.
pub fn render_metrics(state: &ServiceState) -> String {
    let Some(handle) = handle() else { return String::new() };
    let stats = &state.stats;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    for mode in MODES {
        let (i, name) = (mode_index(mode), mode_name(mode));
        counter!("shuffle_received_bytes_total", "mode" => name).absolute(load(&stats.received_bytes[i]));
        counter!("shuffle_received_blocks_total", "mode" => name).absolute(load(&stats.received_blocks[i]));
        counter!("shuffle_served_bytes_total", "mode" => name).absolute(load(&stats.served_bytes[i]));
        counter!("shuffle_served_blocks_total", "mode" => name).absolute(load(&stats.served_blocks[i]));
    }
    counter!("shuffle_commits_total").absolute(load(&stats.commits));
    counter!("shuffle_refused_attempts_total").absolute(load(&stats.refused_attempts));
    counter!("shuffle_spills_total").absolute(load(&stats.spills));
    counter!("shuffle_spilled_bytes_total").absolute(load(&stats.spilled_bytes));
    counter!("shuffle_flushed_bytes_total").absolute(load(&stats.flushed_bytes));
    let shuffles = state.all_shuffles();
    gauge!("shuffle_memory_used_bytes").set(state.memory.used() as f64);
    gauge!("shuffle_memory_budget_bytes").set(state.memory.limit() as f64);
    gauge!("shuffle_disk_used_bytes").set(shuffles.iter().map(|s| s.usage().1).sum::<u64>() as f64);
    gauge!("shuffle_apps").set(state.app_count() as f64);
    gauge!("shuffle_shuffles").set(shuffles.len() as f64);
    gauge!("shuffle_readers").set(state.active_readers() as f64);
    handle.render()
}

/// `/status`: apps with their shuffles, memory, disk and the counters, as JSON.
pub fn render_status(state: &ServiceState) -> String {
    let apps = state.app_status();
    let s = state.stats.snapshot();
    let disk: u64 = apps.iter().flat_map(|a| &a.shuffles).map(|s| s.disk_bytes).sum();
    serde_json::json!({
        "memory": { "used_bytes": state.memory.used(), "budget_bytes": state.memory.limit() },
        "disk": { "used_bytes": disk },
        "readers": state.active_readers(),
        "totals": {
            "received_bytes": s.bytes_received, "received_blocks": s.blocks_received,
            "served_bytes": s.bytes_served, "served_blocks": s.blocks_served,
            "commits": s.commits, "refused_attempts": s.refused_attempts,
            "spills": s.spills, "spilled_bytes": s.spilled_bytes, "errors": s.errors,
        },
        "apps": apps,
    })
    .to_string()
}

/// Binds the metrics listener; `serve` then answers on it.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    handle();
    TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })
}

/// Answers `/metrics` and `/status` until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<ServiceState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            let _ = answer(stream, &state).await;
        });
    }
}

/// Reads one HTTP request head and answers it.
async fn answer(mut stream: TcpStream, state: &ServiceState) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(REQUEST_TIMEOUT, read).await.is_err() {
        return Ok(());
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (status, content_type, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some("/metrics")) => ("200 OK", "text/plain; version=0.0.4", render_metrics(state)),
        (Some("GET"), Some("/status")) => ("200 OK", "application/json", render_status(state)),
        (Some("GET"), Some(_)) => ("404 Not Found", "text/plain", "try /metrics or /status\n".to_string()),
        _ => ("400 Bad Request", "text/plain", "only GET is served\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
