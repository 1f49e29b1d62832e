//! How a client connects, who it is, and how much memory its writers may use.

use std::{path::PathBuf, time::Duration};

use shuffle_protocol::{AppSecret, limits};

/// Bytes of records a writer buffers per partition before pushing a block.
/// 64 KiB keeps blocks large enough that per-block costs (a frame, a CRC,
/// an lz4 call, an index entry on the server) vanish against the payload,
/// and small enough that R buffers fit a writer's budget for moderate R.
pub const DEFAULT_BLOCK_SIZE: usize = 64 * 1024;

/// Bytes of records one writer may buffer across all partitions, 32 MiB;
/// past it the largest buffer is pushed early, so memory stays bounded
/// whatever R is.
pub const DEFAULT_WRITE_BUFFER: usize = 32 * 1024 * 1024;

/// Bytes of one sort-mode writer's sort buffer (keys, values and 16 bytes
/// per record), 32 MiB: large enough that a map of a few hundred MB emits
/// a handful of runs (few regions per partition to read and merge), small
/// enough for several writers per compute process.
pub const DEFAULT_SORT_BUFFER: usize = 32 * 1024 * 1024;

/// Bytes of blocks a writer of a replicated shuffle keeps until both copies
/// hold them, 16 MiB: a few round trips of data at loopback speed, so acks
/// rarely stall the writer, and small next to a writer's buffers.
pub const DEFAULT_REPLICATION_WINDOW: usize = 16 << 20;

/// Bytes the kernel may queue on one of the client's Unix-socket streams,
/// 1 MiB (the kernel's default is about 208 KiB). A writer on the same-host
/// path then rarely waits for the server to drain its socket: W1 through
/// the engine (whose map tasks push while they encode) took a median of
/// 1.86 s instead of 2.17 s with it, and kept 1.84 CPUs busy instead of
/// 1.58 (`benches/report/runs-2026-11-24/unix-send-buffer/`). The kernel
/// caps it at `net.core.wmem_max`.
pub const DEFAULT_UNIX_SEND_BUFFER: usize = 1 << 20;

/// The environment variable that carries an app's name to a child process.
pub const APP_ENV: &str = "SHUFFLE_APP";
/// The environment variable that carries an app's secret to a child process.
pub const APP_SECRET_ENV: &str = "SHUFFLE_APP_SECRET";

/// Who a client is on the server: its app and the app's secret. A client
/// that created the app hands these to every process that should join it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppCredentials {
    /// The app's name.
    pub app: String,
    /// The secret the server generated when the app was created.
    pub secret: AppSecret,
}

impl AppCredentials {
    /// The credentials as environment variables for a child process.
    pub fn to_env(&self) -> [(&'static str, String); 2] {
        [(APP_ENV, self.app.clone()), (APP_SECRET_ENV, self.secret.0.clone())]
    }

    /// The credentials a parent process passed in the environment, if any.
    pub fn from_env() -> Option<Self> {
        let app = std::env::var(APP_ENV).ok()?;
        let secret = std::env::var(APP_SECRET_ENV).ok()?;
        Some(Self { app, secret: AppSecret(secret) })
    }
}

/// Options of a [`crate::ShuffleClient`].
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The app (job) this client works for; its shuffles belong to it.
    pub app: String,
    /// The app's secret, to join an existing app; `None` creates the app
    /// (the server generates its secret: see [`crate::ShuffleClient::credentials`]).
    pub secret: Option<AppSecret>,
    /// Name the server's certificate must carry.
    pub server_name: String,
    /// PEM certificate (or CA) to trust for the server; required for QUIC.
    pub trusted_cert: Option<PathBuf>,
    /// Admission token to present, if the server demands one.
    pub auth_token: Option<String>,
    /// Use the server's Unix socket when it is on this host (found and
    /// checked automatically); `false` keeps everything on QUIC.
    pub same_host: bool,
    /// Compress blocks on the same-host path too (lz4 costs CPU and saves
    /// no bandwidth in memory, so it is off unless asked for).
    pub compress_same_host: bool,
    /// On the same-host path, read blocks that lie in the server's files
    /// from the files themselves (passed over the socket) instead of
    /// through the server.
    pub direct_reads: bool,
    /// Send buffer asked of the kernel for each Unix-socket stream (0 keeps
    /// the kernel's default); capped by `net.core.wmem_max`.
    pub unix_send_buffer: usize,
    /// Largest UDP payload QUIC may probe up to (jumbo frames: 8952).
    pub max_udp_payload: u16,
    /// QUIC connections to open (at least 2): half carry pushes, half
    /// reads. A quinn connection is driven by one task on each side, so more
    /// connections spread encryption and packet work over more cores.
    pub quic_connections: usize,
    /// Target size of a block's records before compression.
    pub block_size: usize,
    /// Most bytes one hash-mode writer buffers across its partitions.
    pub write_buffer: usize,
    /// Size of one sort-mode writer's sort buffer; each full buffer becomes a run.
    pub sort_buffer: usize,
    /// Replicated shuffles (cluster): most bytes of blocks a writer keeps
    /// until both copies hold them, to send to the replica if the primary
    /// is lost; past it the writer waits for acknowledgements.
    pub replication_window: usize,
    /// Cluster: how long to keep retrying while the coordinator is away
    /// (restarting) before a request fails. A client joining an app (with
    /// its secret) also waits this long when it connects, for a server
    /// that is away or restarting.
    pub coordinator_wait: Duration,
    /// Cluster: how long a reader whose copies are all unreachable waits
    /// for the coordinator to declare the worker lost.
    pub worker_loss_wait: Duration,
    /// How long connecting (handshake and Hello) may take.
    pub connect_timeout: Duration,
    /// A connection silent for this long is considered lost.
    pub idle_timeout: Duration,
}

impl ClientOptions {
    /// Options for app `app`, with defaults for everything else.
    pub fn new(app: impl Into<String>) -> Self {
        Self {
            app: app.into(),
            secret: None,
            server_name: "localhost".to_string(),
            trusted_cert: None,
            auth_token: None,
            same_host: true,
            compress_same_host: false,
            direct_reads: true,
            unix_send_buffer: DEFAULT_UNIX_SEND_BUFFER,
            max_udp_payload: limits::DEFAULT_MAX_UDP_PAYLOAD,
            quic_connections: 2,
            block_size: DEFAULT_BLOCK_SIZE,
            write_buffer: DEFAULT_WRITE_BUFFER,
            sort_buffer: DEFAULT_SORT_BUFFER,
            replication_window: DEFAULT_REPLICATION_WINDOW,
            coordinator_wait: Duration::from_secs(60),
            worker_loss_wait: Duration::from_secs(90),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }

    /// Options that join the app of `credentials`.
    pub fn joining(credentials: &AppCredentials) -> Self {
        Self::new(credentials.app.clone()).secret(credentials.secret.clone())
    }

    /// Trusts the server certificate (or CA) in this PEM file.
    pub fn trusted_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.trusted_cert = Some(path.into());
        self
    }

    /// Presents this admission token to the server.
    pub fn auth_token(mut self, token: impl Into<String>) -> Self {
        self.auth_token = Some(token.into());
        self
    }

    /// Joins the existing app with this secret.
    pub fn secret(mut self, secret: AppSecret) -> Self {
        self.secret = Some(secret);
        self
    }

    /// Whether to use the server's Unix socket when it is on this host.
    pub fn same_host(mut self, allowed: bool) -> Self {
        self.same_host = allowed;
        self
    }
}
