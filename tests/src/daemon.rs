//! Runs the `shuffle-server` binary as a child process on a free port with a
//! temporary data dir, for end-to-end tests that cross process boundaries.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use shuffle_client::{ClientError, ClientOptions, ShuffleClient};

/// How long the daemon may take to print its listening address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The daemon binary the tests run: `$SHUFFLE_SERVER_BIN`, or the daemon's
/// `main` built by this package as `shuffle-server-e2e` beside the test
/// executable's directory (so `cargo test -p shuffle-tests` always runs a
/// fresh build of it).
pub fn server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("SHUFFLE_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let path = profile_dir.join("shuffle-server-e2e");
    assert!(path.exists(), "{} does not exist: run `cargo test -p shuffle-tests`, which builds it", path.display());
    path
}

/// A running daemon; killed (if still running) and its data dir removed on drop.
pub struct Daemon {
    /// The child process.
    pub child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where it serves `/metrics` and `/status`.
    pub metrics_addr: SocketAddr,
    /// Its data dir (a temporary directory unless given).
    pub data_dir: PathBuf,
    /// Keeps the temporary data dir alive.
    _temp: Option<tempfile::TempDir>,
    /// Lines the daemon logged after start-up, for assertions.
    pub log: mpsc::Receiver<String>,
}

impl Daemon {
    /// Starts the daemon on `127.0.0.1:0` with a fresh data dir and extra `args`.
    pub fn start(args: &[&str]) -> Self {
        let temp = tempfile::tempdir().expect("temporary data dir");
        let data_dir = temp.path().to_path_buf();
        let mut daemon = Self::start_in(&data_dir, args);
        daemon._temp = Some(temp);
        daemon
    }

    /// Starts the daemon with `data_dir` and extra `args`.
    pub fn start_in(data_dir: &Path, args: &[&str]) -> Self {
        Self::start_with_env(data_dir, args, &[])
    }

    /// Starts the daemon with `data_dir`, extra `args` and environment variables.
    pub fn start_with_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(data_dir, "127.0.0.1:0", args, env)
    }

    /// Starts the daemon listening on `listen` (its metrics on the same IP, any port).
    pub fn launch(data_dir: &Path, listen: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::try_launch(data_dir, listen, args, env).unwrap_or_else(|why| panic!("{why}"))
    }

    /// As [`Daemon::launch`]; an error saying why (with what the daemon
    /// printed) if it did not start.
    pub fn try_launch(data_dir: &Path, listen: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Self, String> {
        let ip = listen.rsplit_once(':').map_or("127.0.0.1", |(ip, _)| ip);
        let mut child = Command::new(server_binary())
            .args(["--listen", listen, "--metrics-addr", &format!("{ip}:0"), "--data-dir"])
            .arg(data_dir)
            .args(args)
            .envs(env.iter().copied())
            // SHUFFLE_TEST_DAEMON_LOG sets the daemons' log filter (default info).
            .env("RUST_LOG", std::env::var("SHUFFLE_TEST_DAEMON_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning shuffle-server");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = mpsc::channel();
        // SHUFFLE_TEST_ECHO=1 copies every daemon's log to the test's output.
        let echo = std::env::var_os("SHUFFLE_TEST_ECHO").is_some().then(|| listen.to_string());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(name) = &echo {
                    eprintln!("[{name}] {line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut addr = None;
        let mut metrics_addr = None;
        // What it printed before its addresses, to say why it did not start.
        let mut early: Vec<String> = Vec::new();
        while addr.is_none() || metrics_addr.is_none() {
            let line = match rx.recv_timeout(START_TIMEOUT) {
                Ok(line) => line,
                Err(e) => {
                    let _ = child.kill();
                    let status = child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    let why = match e {
                        mpsc::RecvTimeoutError::Timeout => {
                            format!("did not report its addresses within {START_TIMEOUT:?}")
                        }
                        mpsc::RecvTimeoutError::Disconnected => "exited before reporting its addresses".to_string(),
                    };
                    return Err(format!(
                        "shuffle-server on {listen} {why} ({status}); it printed:\n{}",
                        early.join("\n")
                    ));
                }
            };
            early.push(line.clone());
            if let Some(rest) = line.split("listening on ").nth(1) {
                let a = rest.split_whitespace().next().expect("address after 'listening on'");
                addr = Some(a.parse().expect("a socket address"));
            }
            if let Some(rest) = line.split("metrics on http://").nth(1) {
                let a = rest.split('/').next().expect("address after 'metrics on http://'");
                metrics_addr = Some(a.parse().expect("a socket address"));
            }
        }
        Ok(Self {
            child,
            addr: addr.expect("set above"),
            metrics_addr: metrics_addr.expect("set above"),
            data_dir: data_dir.to_path_buf(),
            _temp: None,
            log: rx,
        })
    }

    /// The generated certificate clients trust.
    pub fn cert_path(&self) -> PathBuf {
        self.data_dir.join("tls").join("cert.pem")
    }

    /// Client options for `app` trusting this daemon.
    pub fn options(&self, app: &str) -> ClientOptions {
        ClientOptions::new(app).trusted_cert(self.cert_path())
    }

    /// Connects a client creating `app`.
    pub async fn connect(&self, app: &str) -> Result<ShuffleClient, ClientError> {
        ShuffleClient::connect(self.addr, self.options(app)).await
    }

    /// Connects another client to the app of `client`, with its secret.
    pub async fn join(&self, client: &ShuffleClient) -> Result<ShuffleClient, ClientError> {
        let credentials = client.credentials();
        ShuffleClient::connect(self.addr, self.options(&credentials.app).secret(credentials.secret.clone())).await
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "sending SIGTERM");
    }

    /// Waits for the process to exit, at most `timeout`; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("waiting for the daemon") {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// GETs `path` from the metrics listener; returns the body.
    pub fn http_get(&self, path: &str) -> String {
        self.http("GET", path)
    }

    /// Sends `method` `path` to the admin listener; returns the body of a 2xx answer.
    pub fn http(&self, method: &str, path: &str) -> String {
        let (status, body) = self.http_answer(method, path);
        assert!((200..300).contains(&status), "{method} {path}: {status} {body}");
        body
    }

    /// Sends `method` `path` to the admin listener; returns the status code and body.
    pub fn http_answer(&self, method: &str, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.metrics_addr).expect("connect to the metrics listener");
        write!(stream, "{method} {path} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .expect("send the request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read the response");
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).expect("a status code");
        (status, body.to_string())
    }

    /// The daemon's resident memory now (`VmRSS`), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS:") * 1024
    }

    /// Bytes of all files under the daemon's `apps` directory.
    pub fn shuffle_file_bytes(&self) -> u64 {
        dir_bytes(&self.data_dir.join("apps"))
    }
}

/// How many of process `pid`'s open descriptors are of shuffle data files
/// (`.data`) that were deleted: each holds the disk space of an unlinked file.
pub fn deleted_data_files_open(pid: u32) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter(|target| {
            let target = target.to_string_lossy();
            target.ends_with(".data (deleted)")
        })
        .count()
}

/// A `kB` field of `/proc/<pid>/status`.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Bytes of all regular files under `dir`, recursively (0 if it does not exist).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
