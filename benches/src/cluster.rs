//! Shuffle servers as child processes of the harness: one standalone daemon
//! (`--server daemon`), or a cluster of a coordinator on 127.0.0.1 and N
//! workers on 127.0.0.2, 127.0.0.3, … (`--cluster N`, and W6 `failover`),
//! each with its own data dir, sharing one certificate and one cluster
//! secret. Every process is killed when the [`LocalServers`] is dropped.
//!
//! The daemon binary is `shuffle-bench-server` (the daemon's own `main`,
//! built by this package so that it is always as fresh as the harness)
//! beside the harness's executable, or `$SHUFFLE_SERVER_BIN`.

use std::{
    fmt,
    io::{BufRead, BufReader, Read, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use shuffle_client::ClientOptions;

/// How long a daemon may take to print its addresses, and a cluster to
/// have all its workers registered.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How often workers heartbeat. Short, so that a killed worker is noticed
/// within a W6 run; the cost is a few small messages per second.
pub const HEARTBEAT: &str = "200ms";

/// How long a silent worker takes to be declared lost (ten heartbeats: a
/// busy 2-core machine may delay a few, never ten in a row). It bounds how
/// long writers and readers wait after a kill when no copy is left.
pub const WORKER_TIMEOUT: &str = "2s";

/// The cluster secret of the harness's clusters (only ever on loopback).
const CLUSTER_SECRET: &str = "shuffle-bench-loopback-cluster-secret";

/// The daemon binary to run.
pub fn server_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("SHUFFLE_SERVER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("the harness's own path")?;
    let dir = exe.parent().context("the harness's directory")?;
    for name in ["shuffle-bench-server", "shuffle-server"] {
        let path = dir.join(name);
        if path.exists() {
            return Ok(path);
        }
    }
    bail!(
        "no shuffle-bench-server or shuffle-server beside {}: build both with `cargo build --release -p shuffle-bench`, \
         or set SHUFFLE_SERVER_BIN",
        exe.display()
    )
}

/// One daemon process; killed (if still running) on drop.
pub struct DaemonProcess {
    child: Child,
    /// Where it listens for clients (QUIC).
    pub addr: SocketAddr,
    /// Where it serves `/metrics` and `/status`.
    pub admin_addr: SocketAddr,
}

impl DaemonProcess {
    /// Starts the daemon listening on `listen` with `data_dir` and extra
    /// `args`, and waits for it to print its addresses.
    fn launch(data_dir: &Path, listen: &str, args: &[String]) -> anyhow::Result<Self> {
        let ip = listen.rsplit_once(':').map_or("127.0.0.1", |(ip, _)| ip);
        let binary = server_binary()?;
        let mut child = Command::new(&binary)
            .args(["--listen", listen, "--metrics-addr", &format!("{ip}:0"), "--data-dir"])
            .arg(data_dir)
            .args(args)
            .env("SHUFFLE_CLUSTER_SECRET", CLUSTER_SECRET)
            // SHUFFLE_BENCH_DAEMON_LOG sets the daemons' log filter (default info: start-up and faults).
            .env("RUST_LOG", std::env::var("SHUFFLE_BENCH_DAEMON_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stderr = child.stderr.take().context("the daemon's stderr")?;
        let (tx, rx) = mpsc::channel();
        // SHUFFLE_BENCH_ECHO=1 copies every daemon's log to the harness's stderr.
        let echo = std::env::var_os("SHUFFLE_BENCH_ECHO").is_some().then(|| listen.to_string());
        std::thread::spawn(move || {
            // Keeps reading after start-up so that the daemon never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(name) = &echo {
                    eprintln!("[{name}] {line}");
                }
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + START_TIMEOUT;
        let (mut addr, mut admin_addr) = (None, None);
        let mut log = Vec::new();
        while addr.is_none() || admin_addr.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} {listen} did not report its addresses within {START_TIMEOUT:?}:\n{}",
                    binary.display(),
                    log.join("\n")
                );
            };
            if let Some(rest) = line.split("listening on ").nth(1) {
                addr = rest.split_whitespace().next().and_then(|a| a.parse().ok());
            }
            if let Some(rest) = line.split("metrics on http://").nth(1) {
                admin_addr = rest.split('/').next().and_then(|a| a.parse().ok());
            }
            log.push(line);
        }
        let (addr, admin_addr) = (addr.context("set above")?, admin_addr.context("set above")?);
        Ok(Self { child, addr, admin_addr })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The body of `GET path` on the admin listener.
    pub fn http_get(&self, path: &str) -> anyhow::Result<String> {
        let mut stream = std::net::TcpStream::connect(self.admin_addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(stream, "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").context("an HTTP response")?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 2"), "GET {path}: {head}");
        Ok(body.to_string())
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the harness started: a standalone daemon, or a coordinator and its workers.
pub struct LocalServers {
    /// Holds every data dir, the certificate and the key.
    dir: tempfile::TempDir,
    /// The standalone daemon, or the coordinator.
    pub front: DaemonProcess,
    /// Worker `i` (id `w{i}`) listens on 127.0.0.{i+2}; `None` once killed.
    pub workers: Vec<Option<DaemonProcess>>,
}

impl LocalServers {
    /// A standalone daemon on 127.0.0.1 with `memory` as its budget.
    pub fn standalone(memory: shuffle_server::ByteSize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let (cert, key) = Self::write_cert(dir.path())?;
        let args = vec![
            "standalone".into(),
            "--memory".into(),
            memory.0.to_string(),
            "--cert".into(),
            cert,
            "--key".into(),
            key,
        ];
        let front = DaemonProcess::launch(&dir.path().join("standalone"), "127.0.0.1:0", &args)?;
        Ok(Self { dir, front, workers: Vec::new() })
    }

    /// A coordinator on 127.0.0.1 and `workers` workers on 127.0.0.2, …,
    /// each with `memory` as its budget; returns once every worker is live.
    pub fn cluster(workers: usize, memory: shuffle_server::ByteSize) -> anyhow::Result<Self> {
        anyhow::ensure!((1..=250).contains(&workers), "--cluster takes 1 to 250 workers (127.0.0.2 to 127.0.0.251)");
        let dir = tempfile::tempdir()?;
        let (cert, key) = Self::write_cert(dir.path())?;
        let common = [
            "--cert".to_string(),
            cert,
            "--key".into(),
            key,
            "--heartbeat-interval".into(),
            HEARTBEAT.into(),
            "--worker-timeout".into(),
            WORKER_TIMEOUT.into(),
        ];
        let mut args = vec!["coordinator".to_string()];
        args.extend(common.iter().cloned());
        let front = DaemonProcess::launch(&dir.path().join("coordinator"), "127.0.0.1:0", &args)?;
        let mut servers = Self { dir, front, workers: Vec::new() };
        for i in 0..workers {
            let mut args = vec![
                "worker".to_string(),
                "--coordinator".into(),
                servers.front.addr.to_string(),
                "--worker-id".into(),
                format!("w{i}"),
                "--memory".into(),
                memory.0.to_string(),
            ];
            args.extend(common.iter().cloned());
            let data = servers.dir.path().join(format!("worker-{i}"));
            let worker = DaemonProcess::launch(&data, &format!("127.0.0.{}:0", i + 2), &args)?;
            servers.workers.push(Some(worker));
        }
        servers.wait_for_live_workers(workers)?;
        Ok(servers)
    }

    /// Writes the certificate every process presents; returns the cert and key paths.
    fn write_cert(dir: &Path) -> anyhow::Result<(String, String)> {
        let (cert, key) = shuffle_server::tls::write_cluster_cert(&dir.join("tls"), "localhost")?;
        Ok((cert.display().to_string(), key.display().to_string()))
    }

    /// The certificate clients trust.
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("tls").join("cert.pem")
    }

    /// Whether this is a cluster (a coordinator and workers).
    pub fn is_cluster(&self) -> bool {
        !self.workers.is_empty()
    }

    /// Client options for `app` trusting these servers. A reader whose
    /// copies are all gone waits for the coordinator's verdict, which
    /// comes within [`WORKER_TIMEOUT`]; the wait allows for a loaded machine.
    pub fn options(&self, app: &str) -> ClientOptions {
        let mut options = ClientOptions::new(app).trusted_cert(self.cert());
        options.worker_loss_wait = Duration::from_secs(30);
        options.coordinator_wait = Duration::from_secs(30);
        options
    }

    /// The coordinator's `/status` as JSON.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.front.http_get("/status")?)?)
    }

    /// Waits until the coordinator lists `n` live workers.
    fn wait_for_live_workers(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let status = self.status()?;
            let live = status["workers"].as_array().map_or(0, |w| w.iter().filter(|w| w["state"] == "Live").count());
            if live >= n {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {live} of {n} workers registered within {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl fmt::Display for LocalServers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_cluster() {
            write!(
                f,
                "coordinator {} + {} workers on 127.0.0.2..{} (heartbeat {HEARTBEAT}, worker time-out {WORKER_TIMEOUT})",
                self.front.addr,
                self.workers.len(),
                self.workers.len() + 1
            )
        } else {
            write!(f, "standalone daemon {}", self.front.addr)
        }
    }
}
