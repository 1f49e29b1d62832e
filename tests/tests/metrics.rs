//! The daemon's observability end to end: `/metrics` counts what clients
//! pushed, and `/status` lists shuffles until they are unregistered.

use shuffle_client::{ExchangeMode, ShuffleId};
use shuffle_tests::{
    daemon::Daemon,
    exchange::{ExchangeParams, run_exchange, verify},
};

/// The value of the sample `name` (with its labels, exactly as rendered) in Prometheus text.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).map(|v| v.parse().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_the_client_pushed_and_status_lists_shuffles_until_unregistered() {
    let daemon = Daemon::start(&[]);
    let client = daemon.connect("observed").await.unwrap();
    let params = ExchangeParams { records: 200_000, maps: 4, partitions: 8, seed: 5, mode: ExchangeMode::Hash };
    let outcome = run_exchange(&client, ShuffleId(3), params).await.unwrap();
    verify(params, outcome.received).unwrap();
    let sorted = ExchangeParams { mode: ExchangeMode::Sort, ..params };
    verify(sorted, run_exchange(&client, ShuffleId(4), sorted).await.unwrap().received).unwrap();

    let metrics = daemon.http_get("/metrics");
    let hash = sample(&metrics, r#"shuffle_received_bytes_total{mode="hash"}"#).expect("hash bytes counter");
    let sort = sample(&metrics, r#"shuffle_received_bytes_total{mode="sort"}"#).expect("sort bytes counter");
    assert!(hash > 20_000_000.0, "{hash}");
    assert_eq!((hash + sort) as u64, client.pushed_bytes(), "the server received exactly what the client pushed");
    assert_eq!(sample(&metrics, "shuffle_commits_total"), Some(8.0));
    assert_eq!(sample(&metrics, "shuffle_memory_budget_bytes"), Some((1u64 << 30) as f64));
    assert_eq!(sample(&metrics, "shuffle_shuffles"), Some(2.0));
    assert!(sample(&metrics, r#"shuffle_served_bytes_total{mode="hash"}"#).unwrap() >= hash, "every block was read");
    assert!(metrics.contains(r#"shuffle_request_duration_seconds_bucket{request="OpenPush",le="#), "{metrics}");
    assert!(metrics.contains("# HELP shuffle_received_bytes_total"), "metrics are described");

    let status: serde_json::Value = serde_json::from_str(&daemon.http_get("/status")).unwrap();
    let app = status["apps"].as_array().unwrap().iter().find(|a| a["app"] == "observed").expect("app listed");
    let shuffles = app["shuffles"].as_array().unwrap();
    assert_eq!(shuffles.len(), 2);
    assert_eq!(shuffles[0]["id"], 3);
    assert_eq!(shuffles[0]["mode"], "hash");
    assert_eq!(shuffles[0]["maps_committed"], 4);
    assert_eq!(shuffles[1]["mode"], "sort");
    let held = shuffles[1]["memory_bytes"].as_u64().unwrap() + shuffles[1]["disk_bytes"].as_u64().unwrap();
    assert!(held > 20_000_000, "the sort shuffle's blocks are held in memory or on disk: {held}");
    assert_eq!(status["totals"]["received_bytes"].as_u64(), Some(client.pushed_bytes()));

    client.unregister_shuffle(ShuffleId(3)).await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&daemon.http_get("/status")).unwrap();
    let app = status["apps"].as_array().unwrap().iter().find(|a| a["app"] == "observed").unwrap();
    let ids: Vec<_> = app["shuffles"].as_array().unwrap().iter().map(|s| s["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![4], "the unregistered shuffle is gone from /status");
}
