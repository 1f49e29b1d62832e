//! A cluster of real processes on loopback for end-to-end tests: one
//! coordinator on 127.0.0.1 and workers on 127.0.0.2, 127.0.0.3, …, each
//! with its own data dir, sharing one certificate and one cluster secret.
//! Addresses and ports stay fixed across restarts, so a worker or the
//! coordinator can be killed and started again where it was.

use std::{
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    time::Duration,
};

use shuffle_client::{ClientError, ClientOptions, ShuffleClient};

use crate::daemon::Daemon;

/// How often workers heartbeat in test clusters.
pub const HEARTBEAT: &str = "100ms";
/// How long a silent worker takes to be declared lost in test clusters.
pub const WORKER_TIMEOUT: &str = "1500ms";

/// A coordinator and its workers, as child processes.
pub struct Cluster {
    /// Holds every data dir, the certificate and the secret.
    dir: tempfile::TempDir,
    pub coordinator_addr: SocketAddr,
    pub coordinator: Option<Daemon>,
    /// Worker `i` listens on `worker_addrs[i]` (127.0.0.{i+2}).
    pub worker_addrs: Vec<SocketAddr>,
    pub workers: Vec<Option<Daemon>>,
    /// Flags every worker gets besides the cluster's own.
    worker_args: Vec<String>,
    /// How long a silent worker takes to be declared lost.
    worker_timeout: String,
}

/// A free UDP port on `ip`.
fn free_port(ip: &str) -> u16 {
    UdpSocket::bind((ip, 0)).and_then(|s| s.local_addr()).map(|a| a.port()).expect("a free port")
}

impl Cluster {
    /// Starts a coordinator and `workers` workers, and waits until every
    /// worker has registered. `worker_args` go to every worker.
    pub fn start(workers: usize, worker_args: &[&str]) -> Self {
        Self::start_with_timeout(workers, worker_args, WORKER_TIMEOUT)
    }

    /// As [`Cluster::start`], with another worker time-out.
    pub fn start_with_timeout(workers: usize, worker_args: &[&str], worker_timeout: &str) -> Self {
        if std::env::var_os("SHUFFLE_TEST_ECHO").is_some() {
            // The client's log too (RUST_LOG, default debug for the client).
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("shuffle_client=debug"));
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
        }
        let dir = tempfile::tempdir().expect("cluster dir");
        shuffle_server::tls::write_cluster_cert(&dir.path().join("tls"), "localhost").expect("cluster certificate");
        std::fs::write(dir.path().join("cluster-secret"), "a-cluster-secret-for-tests\n").expect("secret");
        let coordinator_addr: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")).parse().unwrap();
        let worker_addrs: Vec<SocketAddr> = (0..workers)
            .map(|i| {
                let ip = format!("127.0.0.{}", i + 2);
                format!("{ip}:{}", free_port(&ip)).parse().unwrap()
            })
            .collect();
        let mut cluster = Self {
            dir,
            coordinator_addr,
            coordinator: None,
            worker_addrs,
            workers: (0..workers).map(|_| None).collect(),
            worker_args: worker_args.iter().map(|s| s.to_string()).collect(),
            worker_timeout: worker_timeout.to_string(),
        };
        // A port found free may be taken before the daemon binds it (by a
        // client's socket on the wildcard address, in a test running
        // alongside): the first start of each process tries another port.
        for attempt in 1.. {
            match cluster.try_start_coordinator() {
                Ok(()) => break,
                Err(why) if attempt < 4 && why.contains("in use") => {
                    cluster.coordinator_addr.set_port(free_port("127.0.0.1"));
                }
                Err(why) => panic!("{why}"),
            }
        }
        for i in 0..workers {
            for attempt in 1.. {
                match cluster.try_start_worker(i) {
                    Ok(()) => break,
                    Err(why) if attempt < 4 && why.contains("in use") => {
                        let ip = cluster.worker_addrs[i].ip().to_string();
                        cluster.worker_addrs[i].set_port(free_port(&ip));
                    }
                    Err(why) => panic!("{why}"),
                }
            }
        }
        cluster.wait_for_workers(workers);
        cluster
    }

    /// The certificate every process presents.
    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("tls").join("cert.pem")
    }

    fn common_args(&self) -> Vec<String> {
        let tls = self.dir.path().join("tls");
        vec![
            "--cert".into(),
            tls.join("cert.pem").display().to_string(),
            "--key".into(),
            tls.join("key.pem").display().to_string(),
            "--cluster-secret-file".into(),
            self.dir.path().join("cluster-secret").display().to_string(),
            "--heartbeat-interval".into(),
            HEARTBEAT.into(),
            "--worker-timeout".into(),
            self.worker_timeout.clone(),
        ]
    }

    /// A worker's data dir (kept across restarts).
    pub fn worker_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("worker-{i}"))
    }

    /// Starts (or starts again) the coordinator where it was.
    pub fn start_coordinator(&mut self) {
        self.try_start_coordinator().unwrap_or_else(|why| panic!("{why}"));
    }

    fn try_start_coordinator(&mut self) -> Result<(), String> {
        let data = self.dir.path().join("coordinator");
        let mut args = vec!["coordinator".to_string()];
        args.extend(self.common_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.coordinator = Some(Daemon::try_launch(&data, &self.coordinator_addr.to_string(), &args, &[])?);
        Ok(())
    }

    /// Starts (or starts again) worker `i` where it was, on its own data dir.
    pub fn start_worker(&mut self, i: usize) {
        self.try_start_worker(i).unwrap_or_else(|why| panic!("{why}"));
    }

    fn try_start_worker(&mut self, i: usize) -> Result<(), String> {
        let data = self.worker_dir(i);
        let mut args = vec![
            "worker".to_string(),
            "--coordinator".into(),
            self.coordinator_addr.to_string(),
            "--worker-id".into(),
            format!("w{i}"),
        ];
        args.extend(self.common_args());
        args.extend(self.worker_args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.workers[i] = Some(Daemon::try_launch(&data, &self.worker_addrs[i].to_string(), &args, &[])?);
        Ok(())
    }

    /// Worker `i`'s process.
    pub fn worker(&self, i: usize) -> &Daemon {
        self.workers[i].as_ref().expect("worker running")
    }

    /// Worker `i`'s process, mutably.
    pub fn worker_mut(&mut self, i: usize) -> &mut Daemon {
        self.workers[i].as_mut().expect("worker running")
    }

    /// The coordinator's process.
    pub fn coordinator(&self) -> &Daemon {
        self.coordinator.as_ref().expect("coordinator running")
    }

    /// SIGKILLs worker `i`.
    pub fn kill_worker(&mut self, i: usize) {
        if let Some(mut w) = self.workers[i].take() {
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
    }

    /// SIGKILLs the coordinator.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
    }

    /// Sends SIGTERM to worker `i` and waits for it to exit (graceful: it
    /// writes its shuffles down for the next start).
    pub fn stop_worker(&mut self, i: usize) -> Option<i32> {
        let mut w = self.workers[i].take()?;
        w.terminate();
        w.wait_exit(Duration::from_secs(30))
    }

    /// Sends `signal` (SIGSTOP, SIGCONT) to worker `i`.
    pub fn signal_worker(&self, i: usize, signal: i32) {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        let rc = unsafe { libc::kill(self.worker(i).child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "sending signal {signal}");
    }

    /// The coordinator's `/status`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.coordinator().http_get("/status")).expect("status JSON")
    }

    /// The state the coordinator gives worker `id` (`"Live"`, `"Lost"`, …).
    pub fn worker_state(&self, id: &str) -> Option<String> {
        let status = self.status();
        status["workers"]
            .as_array()?
            .iter()
            .find(|w| w["id"] == id)
            .and_then(|w| w["state"].as_str().map(str::to_string))
    }

    /// Waits until the coordinator lists `n` live workers.
    pub fn wait_for_workers(&self, n: usize) {
        self.wait_until(Duration::from_secs(30), &format!("{n} live workers"), |c| {
            c.status()["workers"].as_array().is_some_and(|w| w.iter().filter(|w| w["state"] == "Live").count() >= n)
        });
    }

    /// Polls `condition` every 50 ms until it holds or `timeout` passes (then panics naming `what`).
    pub fn wait_until(&self, timeout: Duration, what: &str, condition: impl Fn(&Self) -> bool) {
        let deadline = std::time::Instant::now() + timeout;
        while !condition(self) {
            assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Client options for `app` trusting the cluster.
    pub fn options(&self, app: &str) -> ClientOptions {
        let mut options = ClientOptions::new(app).trusted_cert(self.cert());
        options.worker_loss_wait = Duration::from_secs(20);
        options.coordinator_wait = Duration::from_secs(30);
        options
    }

    /// Connects a client creating `app`, through the coordinator.
    pub async fn connect(&self, app: &str) -> Result<ShuffleClient, ClientError> {
        ShuffleClient::connect(self.coordinator_addr, self.options(app)).await
    }

    /// The directory holding everything.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}
