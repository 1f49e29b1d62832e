//! The benchmark harness as users run it: the `shuffle-bench` binary
//! against its embedded server and against a server in another process;
//! every run verified, JSON as documented, clear errors.

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shuffle-bench")).args(args).output().expect("run shuffle-bench")
}

fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn exchange_on_an_embedded_server_prints_a_verified_table_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("runs.json");
    let out = bench(&["exchange", "--records", "50000", "--repeat", "2", "--json", json.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("| exchange | Client | hash | 50000 | 4 | 16 |"), "{stdout}");
    assert!(stdout.contains("| peak RSS MiB (anon) |"), "{stdout}");
    assert!(stdout.contains("| yes |"), "{stdout}");
    let runs = json_lines(&json);
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    for field in [
        "workload",
        "mode",
        "records",
        "maps",
        "partitions",
        "input_bytes",
        "seconds",
        "median_seconds",
        "mb_per_s",
        "verified",
        "server_peak_rss_bytes",
        "client_peak_rss_bytes",
        "peak_anon_rss_bytes",
    ] {
        assert!(run.get(field).is_some(), "{field} missing from {run}");
    }
    assert_eq!(run["input_bytes"], 5_000_000);
    assert_eq!(run["seconds"].as_array().unwrap().len(), 2);
    assert_eq!(run["verified"], true);
    assert!(run["server_peak_rss_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn every_workload_runs_small_through_client_and_engine() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("runs.json");
    let j = json.to_str().unwrap();
    for args in [
        &["exchange", "--records", "20000", "--repeat", "1", "--via", "engine", "--mode", "hybrid", "--json", j][..],
        &["groupby", "--records", "50000", "--keys", "1000", "--repeat", "1", "--json", j],
        &["groupby", "--records", "50000", "--keys", "1000", "--repeat", "1", "--via", "client", "--json", j],
        &["sort", "--records", "20000", "--repeat", "1", "--json", j],
        &["sort", "--records", "20000", "--repeat", "1", "--via", "engine", "--json", j],
        &["spill", "--records", "60000", "--memory", "4MiB", "--repeat", "1", "--json", j],
        &["stream", "--rate", "20000", "--seconds", "1", "--warmup", "1", "--linger-ms", "2", "--json", j],
    ] {
        let out = bench(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        if args[0] == "stream" {
            // A rate given is not a search, and the table says so.
            let table = String::from_utf8_lossy(&out.stdout);
            assert!(table.contains("a rate given, no search; map tasks push at least every 2 ms"), "{table}");
            assert!(!table.contains("max rate"), "{table}");
        }
    }
    let runs = json_lines(&json);
    let names: Vec<String> = runs.iter().map(|r| format!("{}/{}/{}", r["workload"], r["via"], r["mode"])).collect();
    assert_eq!(runs.len(), 9, "{names:?}"); // spill runs all three modes
    assert!(runs.iter().all(|r| r["verified"] == true));
    let stream = runs.iter().find(|r| r["workload"] == "stream").unwrap();
    for field in ["max_rate", "p50_ms", "p99_ms", "p999_ms"] {
        assert!(stream[field].as_f64().is_some(), "{field} in {stream}");
    }
    assert_eq!(stream["searched"], false);
    assert_eq!(stream["linger_ms"].as_f64(), Some(2.0));
}

#[test]
fn the_harness_runs_against_a_server_in_another_process() {
    // The server runs in this test's process; the harness is a child process.
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let config = shuffle_server::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        ..shuffle_server::ServerConfig::default()
    };
    let server = runtime.block_on(shuffle_server::start(config)).unwrap();
    let addr = server.local_addr().to_string();
    let cert = server.cert_path().to_path_buf();
    for via in ["client", "engine"] {
        let out = bench(&[
            "exchange",
            "--records",
            "30000",
            "--repeat",
            "1",
            "--via",
            via,
            "--server",
            &addr,
            "--cert",
            cert.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{via}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("| yes |"));
    }
}

#[test]
fn bad_arguments_fail_with_a_clear_error() {
    let out = bench(&["exchange", "--server", "127.0.0.1:7999"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --cert"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = bench(&["stream", "--via", "client", "--rate", "1000"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("W4 runs through the engine"));
    let out = bench(&["sort", "--mode", "hash", "--records", "1000"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("use --mode sort"));
}

/// The harness with the daemon it starts itself (the package's own build of it).
fn bench_with_daemons(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shuffle-bench"))
        .args(args)
        .env("SHUFFLE_SERVER_BIN", env!("CARGO_BIN_EXE_shuffle-bench-server"))
        .output()
        .expect("run shuffle-bench")
}

#[test]
fn workloads_run_verified_through_a_cluster_of_child_processes_and_a_standalone_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("runs.json");
    let j = json.to_str().unwrap();
    for args in [
        &["exchange", "--records", "50000", "--repeat", "1", "--cluster", "3", "--replication", "2", "--json", j][..],
        &["exchange", "--records", "50000", "--repeat", "1", "--cluster", "3", "--mode", "sort", "--json", j],
        &["exchange", "--records", "50000", "--repeat", "1", "--cluster", "3", "--via", "engine", "--json", j],
        &["groupby", "--records", "50000", "--keys", "1000", "--repeat", "1", "--cluster", "2", "--json", j],
        &["exchange", "--records", "50000", "--repeat", "1", "--server", "daemon", "--json", j],
    ] {
        let out = bench_with_daemons(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let runs = json_lines(&json);
    assert_eq!(runs.len(), 5);
    assert!(runs.iter().all(|r| r["verified"] == true), "{runs:?}");
    assert_eq!(runs[0]["server"], "cluster of 3 workers, replication 2");
    assert_eq!(runs[3]["server"], "cluster of 2 workers, replication 1");
    assert_eq!(runs[4]["server"], "standalone daemon");
    let out = bench_with_daemons(&["exchange", "--replication", "2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --cluster"));
}

#[test]
fn failover_kills_a_worker_in_every_mode_and_every_run_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("failover.json");
    let out =
        bench_with_daemons(&["failover", "--records", "200000", "--seed", "42", "--json", json.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("fault seed 42"), "{stdout}");
    let reports = json_lines(&json);
    // Three modes, replication 2 and 1.
    assert_eq!(reports.len(), 6, "{reports:?}");
    for r in &reports {
        assert_eq!(r["verified"], true, "{r}");
        assert_eq!(r["records"], 200_000);
        let faulted = r["faulted"].as_array().unwrap();
        assert_eq!(faulted.len(), 1);
        for f in faulted {
            assert_eq!(f["verified"], true, "{f}");
            assert!(f["victim"].as_str().unwrap().starts_with('w'), "{f}");
            assert!(f["killed_after_seconds"].as_f64().unwrap() > 0.0, "{f}");
            if r["replication"] == 1 {
                // Whatever was lost was named, and exactly those maps ran again.
                let lost = f["lost_partitions"].as_array().unwrap();
                assert_eq!(lost.is_empty(), f["rerun_maps"].as_array().unwrap().is_empty(), "{f}");
            }
        }
    }
    assert!(stdout.contains("| failover | hash | 2 | 200000 |"), "{stdout}");
}
