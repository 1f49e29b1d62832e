//! [`Engine`]: where a job's shuffle service comes from, where its tasks
//! run, and what they may hold.
//!
//! `Engine::embedded()` starts a standalone shuffle server inside the process
//! (its own runtime, an ephemeral port, a temporary data dir removed when the
//! engine is dropped) and connects to it; `Engine::connect(addr)` uses a
//! running daemon. Either takes its settings from one [`EngineBuilder`]
//! (`Engine::builder()`): the [`EngineOptions`] (with the operators' memory
//! budget and the checkpoint settings), the client's options and the state
//! backend. Everything after that is the same code: every exchange between
//! stages goes through `shuffle-client` to a real server.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use shuffle_client::{ClientOptions, ShuffleClient};
#[cfg(feature = "embedded")]
use shuffle_server::{ByteSize, ServerConfig, ServerHandle};

use crate::{
    CheckpointOptions, EngineError,
    memory::MemoryPool,
    state::{LocalStateBackend, SharedBackend, StateBackend},
};

/// How a job's stages run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExecutionMode {
    /// Stage by stage over blocking exchanges (hash, or sort when keys must
    /// be ordered or R is large); failed tasks are retried.
    Batch,
    /// All stages at once over hybrid (pipelined) exchanges; keyed
    /// reductions emit updated results as data arrives.
    Streaming,
}

impl std::str::FromStr for ExecutionMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "batch" => Ok(Self::Batch),
            "streaming" => Ok(Self::Streaming),
            other => Err(format!("unknown mode {other:?}: expected batch or streaming")),
        }
    }
}

/// Tuning of an engine. The defaults suit a small machine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Threads running tasks.
    pub worker_threads: usize,
    /// Memory budget of an embedded server.
    pub server_memory: u64,
    /// Client write buffer per map writer (hash and hybrid) and sort buffer (sort).
    pub write_buffer: usize,
    /// Attempts a batch task gets before the job fails.
    pub max_task_attempts: u32,
    /// Batch tasks of one stage running at once (streaming runs every task at once).
    pub batch_task_slots: usize,
    /// Batch exchanges with more partitions than this use sort mode by default.
    pub sort_above_partitions: u32,
    /// Most distinct keys a map-side combiner holds before it pushes them all.
    pub combine_entries: usize,
    /// Streaming: a writer pushes its buffered records at least this often.
    pub linger: Duration,
    /// Streaming: most bytes each hybrid exchange may spill to disk (`None`:
    /// only the disk reserve limits it). With the server's memory budget,
    /// this bounds how far producers can run ahead of consumers.
    pub spill_quota: Option<u64>,
    /// The budget every operator that buffers records (sorts, groups,
    /// joins, reductions, barrier alignment, key-ordered reads) reserves
    /// from, in bytes. Batch operators spill to `spill_dir` past their
    /// share; streaming state that cannot spill fails with a clear error.
    pub memory: usize,
    /// Where operators spill (`None`: a temporary directory of the engine,
    /// removed with it). Spill files are deleted as soon as they are read.
    pub spill_dir: Option<PathBuf>,
    /// Streaming jobs checkpoint and recover from task failures with these
    /// settings (`None`: no checkpoints; a failed task fails the job).
    pub checkpoints: Option<CheckpointOptions>,
    /// Copies of every block of the job's exchanges (1 or 2). Two need a
    /// cluster (`Engine::connect` to a coordinator): a worker lost then
    /// costs no re-run, its readers and writers go on at the other copy. With
    /// one, the batch executor re-runs the maps whose blocks were lost.
    pub replication: u8,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            worker_threads: std::thread::available_parallelism().map_or(2, |n| n.get()).max(2),
            server_memory: 1 << 30,
            write_buffer: 32 << 20,
            max_task_attempts: 3,
            batch_task_slots: 8,
            sort_above_partitions: 1000,
            combine_entries: 1 << 20,
            linger: Duration::from_millis(5),
            spill_quota: Some(1 << 30),
            memory: 512 << 20,
            spill_dir: None,
            checkpoints: None,
            replication: 1,
        }
    }
}

/// A shuffle server running inside the process.
#[cfg(feature = "embedded")]
struct EmbeddedServer {
    /// Its own threads, so tasks busy with user code never starve its I/O.
    runtime: tokio::runtime::Runtime,
    handle: Option<ServerHandle>,
    /// Removed (with every shuffle file) when the engine is dropped.
    data_dir: tempfile::TempDir,
}

pub(crate) struct EngineInner {
    /// Runs the job's tasks; taken when the engine is dropped (see [`blocking_section`]).
    runtime: Option<tokio::runtime::Runtime>,
    /// The connection every exchange goes through.
    pub client: ShuffleClient,
    pub options: Arc<EngineOptions>,
    /// The operators' budget (`options.memory`).
    pub memory: Arc<MemoryPool>,
    /// Where operators spill.
    pub spill_dir: Arc<PathBuf>,
    /// Where streaming checkpoints go.
    pub state_backend: SharedBackend,
    /// The engine's own temporary directory (spills, default state backend), if it made one.
    _scratch: Option<tempfile::TempDir>,
    /// Source of stage and shuffle ids, unique within this engine.
    next_id: AtomicU64,
    /// Next shuffle id: every run of a job gets fresh shuffles.
    next_shuffle: AtomicU32,
    /// Every re-run of lost maps since the engine started.
    pub reruns: Arc<std::sync::Mutex<Vec<crate::MapRerun>>>,
    #[cfg(feature = "embedded")]
    embedded: Option<EmbeddedServer>,
}

/// A handle on the engine: cheap to clone; the last clone dropped shuts the
/// embedded server down and removes its files.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<EngineInner>,
}

/// Counts engines in this process, so each gets its own app on the service.
static ENGINES: AtomicU32 = AtomicU32::new(0);

fn app_name() -> String {
    format!("engine-{}-{}", std::process::id(), ENGINES.fetch_add(1, Ordering::Relaxed))
}

fn task_runtime(options: &EngineOptions) -> Result<tokio::runtime::Runtime, EngineError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.worker_threads.max(1))
        .thread_name("engine-task")
        .enable_all()
        .build()
        .map_err(|e| EngineError::Runtime(e.to_string()))
}

/// Everything an engine is built from, set in one place:
/// `Engine::builder().options(o).client(c).state_backend(b).connect(addr)`
/// (or `.embedded()`).
#[derive(Default)]
pub struct EngineBuilder {
    options: EngineOptions,
    client: Option<ClientOptions>,
    state_backend: Option<SharedBackend>,
}

impl EngineBuilder {
    /// The engine's tuning (replaces every option set before).
    pub fn options(mut self, options: EngineOptions) -> Self {
        self.options = options;
        self
    }

    /// The operators' memory budget in bytes ([`EngineOptions::memory`]).
    pub fn memory(mut self, bytes: usize) -> Self {
        self.options.memory = bytes;
        self
    }

    /// Checkpoint streaming jobs ([`EngineOptions::checkpoints`]).
    pub fn checkpoints(mut self, checkpoints: CheckpointOptions) -> Self {
        self.options.checkpoints = Some(checkpoints);
        self
    }

    /// Copies of every block of the job's exchanges ([`EngineOptions::replication`]):
    /// `.replication(2)` on a cluster survives the loss of a worker without re-running maps.
    pub fn replication(mut self, copies: u8) -> Self {
        self.options.replication = copies;
        self
    }

    /// Where operators spill ([`EngineOptions::spill_dir`]).
    pub fn spill_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.options.spill_dir = Some(dir.into());
        self
    }

    /// The client's options when connecting to a daemon (`app` empty: a
    /// name unique to this engine). The write and sort buffers always come
    /// from [`EngineOptions::write_buffer`].
    pub fn client(mut self, client: ClientOptions) -> Self {
        self.client = Some(client);
        self
    }

    /// Where streaming checkpoints go (default: a [`LocalStateBackend`] in
    /// the engine's temporary directory, which lives as long as the engine).
    pub fn state_backend(mut self, backend: impl StateBackend) -> Self {
        self.state_backend = Some(Arc::new(backend));
        self
    }

    /// Connects to a running shuffle server at `addr` (from synchronous or async code).
    pub fn connect(self, addr: SocketAddr) -> Result<Engine, EngineError> {
        blocking_section(move || self.connect_blocking(addr))
    }

    fn connect_blocking(self, addr: SocketAddr) -> Result<Engine, EngineError> {
        let mut client = self.client.clone().unwrap_or_else(|| ClientOptions::new(String::new()));
        if client.app.is_empty() {
            client.app = app_name();
        }
        client.write_buffer = self.options.write_buffer;
        client.sort_buffer = self.options.write_buffer;
        let runtime = task_runtime(&self.options)?;
        let client = runtime.block_on(ShuffleClient::connect(addr, client))?;
        self.assemble(
            runtime,
            client,
            #[cfg(feature = "embedded")]
            None,
        )
    }

    /// Starts a shuffle server in this process (ephemeral port on loopback,
    /// temporary data dir, `options.server_memory` budget) and connects to it
    /// through its Unix socket (from synchronous or async code).
    #[cfg(feature = "embedded")]
    pub fn embedded(self) -> Result<Engine, EngineError> {
        blocking_section(move || self.embedded_blocking())
    }

    #[cfg(feature = "embedded")]
    fn embedded_blocking(self) -> Result<Engine, EngineError> {
        let options = &self.options;
        let data_dir = tempfile::Builder::new()
            .prefix("engine-shuffle-")
            .tempdir()
            .map_err(|e| EngineError::io(std::env::temp_dir(), e))?;
        let server_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("embedded-shuffle-server")
            .enable_all()
            .build()
            .map_err(|e| EngineError::Runtime(e.to_string()))?;
        let config = ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.path().to_path_buf(),
            memory: ByteSize(options.server_memory),
            // Small budgets (tests) still hold several partitions' buffers.
            flush_size: ByteSize((8 << 20).min(options.server_memory / 4)),
            // Free space only has to cover this process's own exchanges.
            disk_reserve: ByteSize(256 << 20),
            ..ServerConfig::default()
        };
        let handle =
            server_runtime.block_on(shuffle_server::start(config)).map_err(|e| EngineError::Server(e.to_string()))?;
        let socket = handle.unix_socket().ok_or_else(|| EngineError::Server("the server has no Unix socket".into()))?;
        let mut client_options = self.client.clone().unwrap_or_else(|| ClientOptions::new(String::new()));
        if client_options.app.is_empty() {
            client_options.app = app_name();
        }
        client_options.write_buffer = options.write_buffer;
        client_options.sort_buffer = options.write_buffer;
        let runtime = task_runtime(options)?;
        // The embedded server is always reached through its Unix socket.
        let client = runtime.block_on(ShuffleClient::connect_unix(socket, client_options))?;
        let embedded = EmbeddedServer { runtime: server_runtime, handle: Some(handle), data_dir };
        self.assemble(runtime, client, Some(embedded))
    }

    fn assemble(
        self,
        runtime: tokio::runtime::Runtime,
        client: ShuffleClient,
        #[cfg(feature = "embedded")] embedded: Option<EmbeddedServer>,
    ) -> Result<Engine, EngineError> {
        match self.options.replication {
            1 => {}
            2 if client.is_cluster() => {}
            2 => {
                return Err(EngineError::Options(
                    "replication 2 needs a cluster (connect to its coordinator): a standalone server holds one copy \
                     of every block"
                        .into(),
                ));
            }
            n => return Err(EngineError::Options(format!("replication {n}: the service keeps 1 or 2 copies"))),
        }
        let needs_scratch = self.options.spill_dir.is_none() || self.state_backend.is_none();
        let scratch = if needs_scratch {
            Some(
                tempfile::Builder::new()
                    .prefix("engine-scratch-")
                    .tempdir()
                    .map_err(|e| EngineError::io(std::env::temp_dir(), e))?,
            )
        } else {
            None
        };
        let scratch_dir = |name: &str| -> Result<PathBuf, EngineError> {
            let dir = scratch.as_ref().expect("made above when needed").path().join(name);
            std::fs::create_dir_all(&dir).map_err(|e| EngineError::io(&dir, e))?;
            Ok(dir)
        };
        let spill_dir = match &self.options.spill_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
                dir.clone()
            }
            None => scratch_dir("spill")?,
        };
        let state_backend = match self.state_backend {
            Some(backend) => backend,
            None => {
                let dir = scratch_dir("state")?;
                Arc::new(LocalStateBackend::new(&dir).map_err(|e| EngineError::io(&dir, e))?) as SharedBackend
            }
        };
        Ok(Engine {
            inner: Arc::new(EngineInner {
                runtime: Some(runtime),
                client,
                memory: MemoryPool::new(self.options.memory),
                options: Arc::new(self.options),
                spill_dir: Arc::new(spill_dir),
                state_backend,
                _scratch: scratch,
                next_id: AtomicU64::new(1),
                next_shuffle: AtomicU32::new(1),
                reruns: Arc::default(),
                #[cfg(feature = "embedded")]
                embedded,
            }),
        })
    }
}

#[cfg(feature = "embedded")]
impl Engine {
    /// Starts a shuffle server in this process with default options and connects to it.
    pub fn embedded() -> Result<Self, EngineError> {
        Self::builder().embedded()
    }

    /// Starts a shuffle server in this process with `options` and connects
    /// to it (short for `Engine::builder().options(options).embedded()`).
    pub fn embedded_with(options: EngineOptions) -> Result<Self, EngineError> {
        Self::builder().options(options).embedded()
    }

    /// The data directory of the embedded server, if this engine started one.
    pub fn embedded_data_dir(&self) -> Option<&std::path::Path> {
        self.inner.embedded.as_ref().map(|e| e.data_dir.path())
    }

    /// Bytes the embedded server holds in its memory budget now (0 without an embedded server).
    pub fn server_memory_used(&self) -> usize {
        self.inner.embedded.as_ref().and_then(|e| e.handle.as_ref()).map_or(0, |h| h.memory_used())
    }
}

impl Engine {
    /// A builder taking every setting of an engine.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// Connects to a running shuffle server at `addr` with default settings
    /// (short for `Engine::builder().connect(addr)`).
    pub fn connect(addr: SocketAddr) -> Result<Self, EngineError> {
        Self::builder().connect(addr)
    }

    /// Where the engine's operators spill.
    pub fn spill_dir(&self) -> &Path {
        &self.inner.spill_dir
    }

    /// Bytes of the operators' memory budget reserved now.
    pub fn memory_used(&self) -> usize {
        self.inner.memory.used()
    }

    /// The most bytes of the operators' memory budget reserved at once since the engine started.
    pub fn memory_peak(&self) -> usize {
        self.inner.memory.peak()
    }

    /// Every re-run of lost maps (shuffle data lost with a cluster worker,
    /// replication 1) since the engine started, oldest first.
    pub fn map_reruns(&self) -> Vec<crate::MapRerun> {
        self.inner.reruns.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The app the engine's jobs run as, and its secret: hand them to other
    /// processes that should join the same app.
    pub fn credentials(&self) -> &shuffle_client::AppCredentials {
        self.inner.client.credentials()
    }

    /// The engine's options.
    pub fn options(&self) -> &EngineOptions {
        &self.inner.options
    }

    /// The transport the engine's exchanges cross: `cluster` (through a
    /// coordinator to its workers, each over its Unix socket when on this
    /// host), `unix` (the server's socket on this host) or `quic`.
    pub fn transport(&self) -> &'static str {
        if self.inner.client.is_cluster() {
            "cluster"
        } else if self.inner.client.unix_socket().is_some() {
            "unix"
        } else {
            "quic"
        }
    }

    /// Block bytes this engine's writers have pushed to the service.
    pub fn pushed_bytes(&self) -> u64 {
        self.inner.client.pushed_bytes()
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn next_shuffle(&self) -> u32 {
        self.inner.next_shuffle.fetch_add(1, Ordering::Relaxed)
    }
}

/// Runs `f` where it may block: here from synchronous code, on a thread of
/// its own (waited for) when called from inside a tokio runtime, where
/// blocking on or dropping a runtime is not allowed. Building and dropping
/// an engine go through it, so both work from async code too (they block
/// the calling thread briefly: a server start, a connection, a shutdown).
fn blocking_section<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| s.spawn(f).join()).unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

impl EngineInner {
    /// The runtime of the engine's tasks (present until the engine is dropped).
    pub(crate) fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the task runtime lives as long as the engine")
    }
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        let client = self.client.clone();
        let runtime = self.runtime.take();
        #[cfg(feature = "embedded")]
        let embedded = self.embedded.take();
        blocking_section(move || {
            if let Some(runtime) = runtime {
                runtime.block_on(async move {
                    if let Err(e) = client.unregister_app().await {
                        tracing::debug!("unregistering the engine's app: {e}");
                    }
                    client.close().await;
                });
            }
            #[cfg(feature = "embedded")]
            if let Some(mut embedded) = embedded
                && let Some(handle) = embedded.handle.take()
            {
                embedded.runtime.block_on(handle.shutdown());
            }
        });
    }
}
