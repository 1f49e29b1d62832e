//! The daemon's observability end to end: `/metrics` counts what clients
//! pushed, and `/status` lists shuffles until they are unregistered; and
//! the admin listener's fault injection, off unless asked for.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partition_fault_is_refused_without_fault_injection_and_cuts_the_daemon_off_for_its_time_with_it() {
    let daemon = Daemon::start(&[]);
    let (status, body) = daemon.http_answer("POST", "/fault/partition?millis=100");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--fault-injection"), "{body}");

    // QUIC only: a Unix-socket client would not be cut off by a network partition of a remote host.
    let daemon = Daemon::start(&["--fault-injection", "--unix-socket", "off"]);
    for bad in ["", "?millis=0", "?millis=x", "?millis=600001", "?for=1s"] {
        let (status, body) = daemon.http_answer("POST", &format!("/fault/partition{bad}"));
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let options = |app: &str| {
        let mut options = daemon.options(app);
        options.connect_timeout = std::time::Duration::from_millis(500);
        options
    };
    let before = shuffle_client::ShuffleClient::connect(daemon.addr, options("before")).await.unwrap();
    assert!(daemon.http("POST", "/fault/partition?millis=3000").contains("3000 ms"));
    let started = std::time::Instant::now();
    let err = shuffle_client::ShuffleClient::connect(daemon.addr, options("during")).await.err();
    assert!(err.as_ref().is_some_and(|e| e.is_unreachable()), "connecting while partitioned: {err:?}");
    // The admin listener (TCP) still answers: only the service's QUIC traffic is cut.
    assert!(daemon.http_get("/status").contains("apps"));
    tokio::time::sleep(std::time::Duration::from_millis(3000).saturating_sub(started.elapsed())).await;
    let after = shuffle_client::ShuffleClient::connect(daemon.addr, options("after")).await.unwrap();
    // The connection made before the partition outlived it (nothing was closed, packets were dropped).
    let params = ExchangeParams { records: 20_000, maps: 2, partitions: 4, seed: 9, mode: ExchangeMode::Hash };
    for (id, client) in [(1, &before), (2, &after)] {
        verify(params, run_exchange(client, ShuffleId(id), params).await.unwrap().received).unwrap();
    }
}
