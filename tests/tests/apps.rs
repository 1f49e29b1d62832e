//! Apps and their lifecycle end to end: several apps at once, unregistering,
//! and expiry of an app whose client went away.

use std::time::{Duration, Instant};

use shuffle_client::ShuffleId;
use shuffle_tests::{
    daemon::{Daemon, dir_bytes},
    exchange::{ExchangeParams, run_exchange, verify},
};

const PARAMS: ExchangeParams =
    ExchangeParams { records: 150_000, maps: 3, partitions: 6, seed: 11, mode: shuffle_client::ExchangeMode::Hash };

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_apps_shuffle_at_once_and_unregistering_removes_their_files() {
    // An 8 MiB budget puts a good part of every 15 MB shuffle on disk.
    let daemon = Daemon::start(&["--memory", "8MiB", "--flush-size", "1MiB"]);
    let mut jobs = Vec::new();
    let mut clients = Vec::new();
    for app in ["app-a", "app-b"] {
        let client = daemon.connect(app).await.unwrap();
        clients.push(client.clone());
        for shuffle in [ShuffleId(0), ShuffleId(1)] {
            let client = client.clone();
            let params = ExchangeParams { seed: PARAMS.seed + u64::from(shuffle.0), ..PARAMS };
            jobs.push(tokio::spawn(async move {
                let outcome = run_exchange(&client, shuffle, params).await.unwrap();
                verify(params, outcome.received).unwrap();
            }));
        }
    }
    for job in jobs {
        job.await.unwrap();
    }
    let apps = daemon.data_dir.join("apps");
    let shuffle_dir = |app: &str, s: u32| apps.join(app).join(format!("shuffle-{s}"));
    for app in ["app-a", "app-b"] {
        for s in 0..2 {
            assert!(dir_bytes(&shuffle_dir(app, s)) > 1_000_000, "{app} shuffle {s} has files");
        }
    }

    let a = clients.iter().find(|c| c.app().as_str() == "app-a").unwrap();
    a.unregister_shuffle(ShuffleId(0)).await.unwrap();
    assert!(!shuffle_dir("app-a", 0).exists(), "unregistered shuffle's files are gone");
    assert!(shuffle_dir("app-a", 1).exists(), "the app's other shuffle stays");
    a.unregister_app().await.unwrap();
    assert!(!apps.join("app-a").exists(), "unregistered app's files are gone");
    assert!(dir_bytes(&shuffle_dir("app-b", 0)) > 1_000_000, "other apps are untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_whose_client_went_away_is_removed_after_the_app_timeout() {
    let daemon = Daemon::start(&["--memory", "8MiB", "--flush-size", "1MiB", "--app-timeout", "1s"]);
    let client = daemon.connect("short-lived").await.unwrap();
    let outcome = run_exchange(&client, ShuffleId(0), PARAMS).await.unwrap();
    verify(PARAMS, outcome.received).unwrap();
    let app_dir = daemon.data_dir.join("apps").join("short-lived");
    assert!(dir_bytes(&app_dir) > 1_000_000);

    // A second app stays connected throughout and must be kept.
    let keeper = daemon.connect("keeper").await.unwrap();
    let kept = run_exchange(&keeper, ShuffleId(0), PARAMS).await.unwrap();
    verify(PARAMS, kept.received).unwrap();

    drop(client); // the last handle: the connection goes away
    let deadline = Instant::now() + Duration::from_secs(15);
    while app_dir.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!app_dir.exists(), "the app's files were not removed within 15 s of its client leaving");
    assert!(daemon.data_dir.join("apps").join("keeper").exists(), "a connected app is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_whose_client_process_is_killed_is_removed_after_the_idle_and_app_timeouts() {
    // Over QUIC nothing tells the server the client died: only the idle timeout does.
    let removed_after = killed_client_app_removal("quic").await;
    assert!(
        removed_after >= Duration::from_secs(2),
        "removed {removed_after:?} after the kill, before the idle timeout"
    );
    // On the Unix socket the kernel closes the client's sockets at once: only the app timeout is left.
    let removed_after = killed_client_app_removal("unix").await;
    assert!(
        removed_after >= Duration::from_secs(1),
        "removed {removed_after:?} after the kill, before the app timeout"
    );
}

/// Runs a client process over `transport`, SIGKILLs it, and returns how long
/// after the kill its app's files were removed.
async fn killed_client_app_removal(transport: &str) -> Duration {
    use std::io::BufRead;
    let daemon =
        Daemon::start(&["--memory", "4MiB", "--flush-size", "1MiB", "--idle-timeout", "2s", "--app-timeout", "1s"]);
    let mut client = std::process::Command::new(env!("CARGO_BIN_EXE_shuffle-e2e-client"))
        .args([
            daemon.addr.to_string(),
            daemon.cert_path().display().to_string(),
            "doomed".to_string(),
            transport.into(),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(client.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let app_dir = daemon.data_dir.join("apps").join("doomed");
    assert!(dir_bytes(&app_dir) > 1_000_000, "the killed client's committed map is on disk");

    // SIGKILL: no connection close is sent to the server.
    client.kill().unwrap();
    client.wait().unwrap();
    let killed = Instant::now();
    while app_dir.exists() && killed.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!app_dir.exists(), "the killed client's app was not removed within 30 s ({transport})");
    killed.elapsed()
}
