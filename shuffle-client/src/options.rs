//! How a client connects and how much memory its writers may use.

use std::{path::PathBuf, time::Duration};

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

/// Options of a [`crate::ShuffleClient`].
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The app (job) this client works for; its shuffles belong to it.
    pub app: String,
    /// Name the server's certificate must carry.
    pub server_name: String,
    /// PEM certificate (or CA) to trust for the server; required.
    pub trusted_cert: Option<PathBuf>,
    /// Token to present, if the server demands one.
    pub auth_token: Option<String>,
    /// Target size of a block's records before compression.
    pub block_size: usize,
    /// Most bytes one hash-mode writer buffers across its partitions.
    pub write_buffer: usize,
    /// Size of one sort-mode writer's sort buffer; each full buffer becomes a run.
    pub sort_buffer: usize,
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
            server_name: "localhost".to_string(),
            trusted_cert: None,
            auth_token: None,
            block_size: DEFAULT_BLOCK_SIZE,
            write_buffer: DEFAULT_WRITE_BUFFER,
            sort_buffer: DEFAULT_SORT_BUFFER,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }

    /// Trusts the server certificate (or CA) in this PEM file.
    pub fn trusted_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.trusted_cert = Some(path.into());
        self
    }

    /// Presents this token to the server.
    pub fn auth_token(mut self, token: impl Into<String>) -> Self {
        self.auth_token = Some(token.into());
        self
    }
}
