//! The `shuffle-server` binary's command line and configuration file, run as
//! a real process.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_shuffle-server");

/// Starts the binary and returns it with a channel of its log lines.
fn spawn(args: &[&str], cwd: &std::path::Path) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shuffle-server");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str) -> String {
    loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| panic!("no log line with {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}

fn terminate_and_wait(mut child: Child) -> i32 {
    // SAFETY: kill(2) on our own child with a valid signal.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().expect("exit code, not a signal");
        }
        assert!(Instant::now() < deadline, "the server did not exit within 20 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn with_no_arguments_it_serves_on_the_default_address_with_defaults_and_exits_0_on_sigterm() {
    let cwd = tempfile::tempdir().unwrap();
    let (child, log) = spawn(&[], cwd.path());
    let line = wait_for_line(&log, "listening on");
    assert!(line.contains("listening on 127.0.0.1:7337"), "{line}");
    assert!(line.contains("data dir ./shuffle-data"), "{line}");
    assert!(line.contains("memory budget 1.0 GiB"), "{line}");
    let metrics = wait_for_line(&log, "metrics on");
    assert!(metrics.contains("metrics on http://127.0.0.1:9337/metrics"), "{metrics}");
    assert!(cwd.path().join("shuffle-data/tls/cert.pem").exists());
    assert_eq!(terminate_and_wait(child), 0);
}

#[test]
fn the_config_file_sets_keys_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("server.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\nmetrics_addr = \"off\"\nmemory = \"512MiB\"\ndata_dir = \"from-file\"\n",
    )
    .unwrap();
    let (child, log) = spawn(&["--config", file.to_str().unwrap()], dir.path());
    let line = wait_for_line(&log, "listening on");
    assert!(line.contains("memory budget 512.0 MiB") && line.contains("data dir from-file"), "{line}");
    assert_eq!(terminate_and_wait(child), 0);

    let (child, log) = spawn(&["--config", file.to_str().unwrap(), "--memory", "2GiB"], dir.path());
    let line = wait_for_line(&log, "listening on");
    assert!(line.contains("memory budget 2.0 GiB") && line.contains("data dir from-file"), "{line}");
    assert_eq!(terminate_and_wait(child), 0);
}

#[test]
fn bad_configuration_is_a_clear_error_and_exit_code_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("server.toml");
    std::fs::write(&file, "memroy = \"1GiB\"\n").unwrap();
    let out = Command::new(BIN).args(["--config", file.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `memroy`"), "{stderr}");

    let out = Command::new(BIN).args(["--memory", "lots"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("couldn't parse \"lots\" into a ByteSize"));

    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--memory", "1KiB"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("below the minimum"));
}

#[test]
fn the_generated_certificate_is_reused_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let args = ["--listen", "127.0.0.1:0", "--metrics-addr", "off", "--data-dir", data.to_str().unwrap()];
    let (child, log) = spawn(&args, dir.path());
    wait_for_line(&log, "listening on");
    assert_eq!(terminate_and_wait(child), 0);
    let first = std::fs::read(data.join("tls/cert.pem")).unwrap();
    let (child, log) = spawn(&args, dir.path());
    wait_for_line(&log, "listening on");
    assert_eq!(terminate_and_wait(child), 0);
    assert_eq!(std::fs::read(data.join("tls/cert.pem")).unwrap(), first);
}
