//! The service's shared state: apps with their secrets and shuffles, the
//! connections bound to each app, and the named limits on what clients may
//! create.
//!
//! A connection is bound to one app by its `Hello` (see [`crate::auth`])
//! and may touch only that app's shuffles. An app lives while it has
//! connections; once its last connection is gone for longer than the app
//! timeout, the reaper removes it with its shuffles and files.
//! `UnregisterApp` removes it at once; connections still bound to it then
//! get `UnknownApp`.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use shuffle_protocol::{
    AppId, AppSecret, AttemptId, ErrorKind, HeldShuffle, MapId, Placement, ServiceError, ShuffleId, ShuffleSpec,
};

use crate::{
    ServerConfig, auth,
    cluster::{hosted::HostedShuffle, peers::Peers},
    config::Role,
    memory::{Consumer, MemoryPool, Reservation},
    shuffle::{Shuffle, table_bytes},
    stats::ServerStats,
    storage::{
        StorageEnv, lock,
        manifest::{self, APP_MANIFEST, AppManifest, MANIFEST_FORMAT, SHUFFLE_MANIFEST, ShuffleManifest},
    },
};

/// One app's secret, shuffles and liveness.
struct AppEntry {
    /// Distinguishes this incarnation of the app from an earlier one with the same id.
    generation: u64,
    /// What its connections must present.
    secret: AppSecret,
    /// Partly received frames of the app's streams, its own share of memory.
    receive_buffers: Arc<Consumer>,
    /// The app's registered shuffles.
    shuffles: HashMap<ShuffleId, Arc<Shuffle>>,
    /// On a cluster's worker: the shuffles the coordinator placed here.
    hosted: HashMap<ShuffleId, Arc<HostedShuffle>>,
    /// Open connections bound to this app.
    connections: usize,
    /// When the last connection went away (meaningful when `connections` is 0).
    idle_since: Instant,
}

/// Everything the request handlers share.
pub struct ServiceState {
    /// The configuration the server started with.
    pub config: ServerConfig,
    /// The server-wide memory budget.
    pub memory: Arc<MemoryPool>,
    /// Partly received frames of every stream, in the budget.
    pub receive_buffers: Arc<Consumer>,
    /// Blocks read from disk on their way to readers: a standing share of
    /// the budget ([`read_share`]), handed out as permits of bytes, so disk
    /// reads never wait on (or crowd out) the memory that blocks use.
    pub read_permits: Arc<tokio::sync::Semaphore>,
    /// The bytes of [`ServiceState::read_permits`], reserved once.
    pub read_share: usize,
    _read_reservation: Reservation,
    /// Server-wide counters.
    pub stats: Arc<ServerStats>,
    /// Identifies this server process to clients (see `Welcome`).
    pub server_id: String,
    /// The Unix socket same-host clients may use, if any.
    pub unix_socket: Mutex<Option<PathBuf>>,
    /// Apps by id.
    apps: Mutex<HashMap<AppId, AppEntry>>,
    /// Source of app generations.
    next_generation: Mutex<u64>,
    /// Partition reads being served now.
    active_readers: std::sync::atomic::AtomicUsize,
    /// On a cluster's worker: its id.
    pub worker_id: String,
    /// On a cluster's worker: set when it is decommissioned (it takes no new shuffles).
    pub decommissioning: std::sync::atomic::AtomicBool,
    /// Set when a graceful shutdown writes everything down (see
    /// [`crate::storage::StorageEnv::reserve`]).
    pub reserve_released: Arc<std::sync::atomic::AtomicBool>,
    /// On a cluster's worker: connections to other workers (for replication).
    pub peers: std::sync::OnceLock<Arc<Peers>>,
    /// A network partition injected by the fault suite (`--fault-injection`).
    pub partition: Arc<crate::fault::Partition>,
}

/// Marks one partition read in progress; dropping it ends it.
pub struct ReaderGuard<'a>(&'a ServiceState);

impl Drop for ReaderGuard<'_> {
    fn drop(&mut self) {
        self.0.active_readers.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// One shuffle as `/status` shows it.
#[derive(serde::Serialize)]
pub struct ShuffleStatus {
    pub id: u32,
    /// On a worker: the group this is a copy of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<u32>,
    pub mode: &'static str,
    pub maps: u32,
    pub maps_committed: usize,
    pub partitions: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// One app as `/status` shows it.
#[derive(serde::Serialize)]
pub struct AppStatus {
    pub app: String,
    pub connections: usize,
    pub shuffles: Vec<ShuffleStatus>,
}

/// A connection's binding to its app; dropping it marks the connection gone.
pub struct AppSession {
    state: Arc<ServiceState>,
    /// The app this connection serves.
    pub app: AppId,
    /// The app's secret (returned in `Welcome`).
    pub secret: AppSecret,
    /// Partly received frames of the app's streams (a consumer of its own,
    /// so one app's floods wait on its own share).
    pub receive_buffers: Arc<Consumer>,
    generation: u64,
}

impl ServiceState {
    /// Fresh state for `config`.
    pub fn new(config: ServerConfig) -> Result<Self, ServiceError> {
        let memory = MemoryPool::new(config.memory.as_u64() as usize);
        let read_share = read_share(memory.limit());
        Ok(Self {
            receive_buffers: memory.consumer("receive buffers"),
            read_permits: Arc::new(tokio::sync::Semaphore::new(read_share)),
            read_share,
            _read_reservation: memory.standing("read buffers", read_share),
            memory,
            stats: Arc::new(ServerStats::default()),
            server_id: auth::generate_secret()?.0[..32].to_string(),
            unix_socket: Mutex::new(None),
            config,
            apps: Mutex::new(HashMap::new()),
            next_generation: Mutex::new(0),
            active_readers: std::sync::atomic::AtomicUsize::new(0),
            worker_id: String::new(),
            decommissioning: std::sync::atomic::AtomicBool::new(false),
            reserve_released: Arc::default(),
            peers: std::sync::OnceLock::new(),
            partition: Arc::default(),
        })
    }

    /// Fresh state for a cluster's worker called `worker_id`.
    pub fn for_worker(config: ServerConfig, worker_id: String) -> Result<Self, ServiceError> {
        Ok(Self { worker_id, ..Self::new(config)? })
    }

    /// Whether this server is a cluster's worker.
    pub fn is_worker(&self) -> bool {
        self.config.role == Role::Worker
    }

    /// Directory under which all apps' shuffle files live.
    pub fn apps_dir(&self) -> PathBuf {
        self.config.data_dir.join("apps")
    }

    fn app_dir(&self, app: &AppId) -> PathBuf {
        self.apps_dir().join(app.as_str())
    }

    fn shuffle_dir(&self, app: &AppId, shuffle: ShuffleId) -> PathBuf {
        self.app_dir(app).join(format!("shuffle-{}", shuffle.0))
    }

    fn storage_env(&self) -> StorageEnv {
        StorageEnv {
            pool: self.memory.clone(),
            stats: self.stats.clone(),
            flush_size: self.config.flush_size.as_u64() as usize,
            disk_reserve: self.config.disk_reserve.as_u64(),
            reserve_released: self.reserve_released.clone(),
        }
    }

    fn next_generation(&self) -> u64 {
        let mut next = lock(&self.next_generation);
        *next += 1;
        *next
    }

    /// Binds a new connection to `app`: creates the app (no secret presented)
    /// or joins it (its secret presented).
    pub fn open_session(self: &Arc<Self>, app: AppId, secret: Option<&AppSecret>) -> Result<AppSession, ServiceError> {
        let mut apps = lock(&self.apps);
        let (generation, secret, receive_buffers) = match (apps.get_mut(&app), secret) {
            (Some(entry), Some(presented)) if auth::secrets_match(&entry.secret.0, &presented.0) => {
                entry.connections += 1;
                (entry.generation, entry.secret.clone(), entry.receive_buffers.clone())
            }
            (_, None) if self.is_worker() => {
                return Err(ServiceError::new(
                    ErrorKind::WrongRole,
                    format!(
                        "app {app} cannot be created at a worker: connect to the cluster's coordinator, which creates \
                         apps and places their shuffles"
                    ),
                ));
            }
            (Some(_), None) => {
                return Err(ServiceError::new(
                    ErrorKind::AppExists,
                    format!("app {app} cannot be created: the name is taken; present the app's secret to join it"),
                ));
            }
            (_, Some(_)) => return Err(auth::unknown_app(&app)),
            (None, None) => {
                if apps.len() >= self.config.max_apps {
                    return Err(ServiceError::new(
                        ErrorKind::LimitExceeded,
                        format!("app {app} cannot be created: the server holds its limit of {} apps", apps.len()),
                    ));
                }
                let secret = auth::generate_secret()?;
                let generation = self.next_generation();
                let receive_buffers = self.memory.consumer(format!("receive buffers of app {app}"));
                apps.insert(
                    app.clone(),
                    AppEntry {
                        generation,
                        secret: secret.clone(),
                        receive_buffers: receive_buffers.clone(),
                        shuffles: HashMap::new(),
                        hosted: HashMap::new(),
                        connections: 1,
                        idle_since: Instant::now(),
                    },
                );
                tracing::info!(%app, "app registered");
                (generation, secret, receive_buffers)
            }
        };
        drop(apps);
        Ok(AppSession { state: self.clone(), app, secret, receive_buffers, generation })
    }

    fn with_app<T>(
        &self,
        session: &AppSession,
        f: impl FnOnce(&mut AppEntry) -> Result<T, ServiceError>,
    ) -> Result<T, ServiceError> {
        let mut apps = lock(&self.apps);
        match apps.get_mut(&session.app) {
            Some(entry) if entry.generation == session.generation => f(entry),
            _ => Err(auth::unknown_app(&session.app)),
        }
    }

    /// Registers a shuffle; registering the same id with an equal spec again is a no-op.
    pub fn register_shuffle(
        &self,
        session: &AppSession,
        shuffle: ShuffleId,
        spec: ShuffleSpec,
    ) -> Result<(), ServiceError> {
        let label = format!("shuffle {shuffle} of app {}", session.app);
        spec.validate().map_err(|why| ServiceError::new(ErrorKind::InvalidSpec, format!("{label}: {why}")))?;
        let tables = table_bytes(&spec);
        let max_tables = self.memory.limit() / MAX_TABLE_SHARE_OF_BUDGET;
        if tables > max_tables {
            return Err(ServiceError::new(
                ErrorKind::LimitExceeded,
                format!(
                    "{label}: {} maps and {} partitions need {tables} bytes of tables, more than 1/{MAX_TABLE_SHARE_OF_BUDGET} \
                     of the memory budget ({max_tables} bytes)",
                    spec.maps, spec.partitions
                ),
            ));
        }
        self.with_app(session, |entry| {
            if let Some(existing) = entry.shuffles.get(&shuffle) {
                if existing.spec() == spec {
                    return Ok(());
                }
                return Err(ServiceError::new(
                    ErrorKind::ShuffleExists,
                    format!("{label} is already registered with {:?}, not {spec:?}", existing.spec()),
                ));
            }
            if entry.shuffles.len() >= self.config.max_shuffles_per_app {
                return Err(ServiceError::new(
                    ErrorKind::LimitExceeded,
                    format!(
                        "{label} cannot be registered: the app holds its limit of {} shuffles; unregister some first",
                        entry.shuffles.len()
                    ),
                ));
            }
            let used = self.memory.used();
            if used + tables > self.memory.limit() {
                return Err(ServiceError::new(
                    ErrorKind::LimitExceeded,
                    format!("{label}: no room in the memory budget for {tables} bytes of tables ({used} bytes in use)"),
                ));
            }
            let created = Shuffle::create(
                session.app.clone(),
                shuffle,
                spec,
                self.shuffle_dir(&session.app, shuffle),
                self.storage_env(),
            )?;
            entry.shuffles.insert(shuffle, Arc::new(created));
            tracing::info!(app = %session.app, %shuffle, ?spec, "shuffle registered");
            Ok(())
        })
    }

    /// The shuffle `shuffle` of the session's app.
    pub fn shuffle(&self, session: &AppSession, shuffle: ShuffleId) -> Result<Arc<Shuffle>, ServiceError> {
        self.with_app(session, |entry| {
            entry.shuffles.get(&shuffle).cloned().ok_or_else(|| {
                ServiceError::new(
                    ErrorKind::UnknownShuffle,
                    format!("shuffle {shuffle} is not registered for app {}", session.app),
                )
            })
        })
    }

    /// Removes a shuffle with its memory and files.
    pub async fn unregister_shuffle(&self, session: &AppSession, shuffle: ShuffleId) -> Result<(), ServiceError> {
        let removed = self.with_app(session, |entry| {
            entry.shuffles.remove(&shuffle).ok_or_else(|| {
                ServiceError::new(
                    ErrorKind::UnknownShuffle,
                    format!("shuffle {shuffle} is not registered for app {}", session.app),
                )
            })
        })?;
        tracing::info!(app = %session.app, %shuffle, "shuffle unregistered");
        remove_shuffles(vec![removed]).await;
        Ok(())
    }

    /// Removes the session's app and all its shuffles.
    pub async fn unregister_app(&self, session: &AppSession) -> Result<(), ServiceError> {
        let entry = self.with_app(session, |_| Ok(())).map(|()| lock(&self.apps).remove(&session.app))?;
        if let Some(entry) = entry {
            tracing::info!(app = %session.app, "app unregistered");
            self.remove_app_files(&session.app, entry).await;
        }
        Ok(())
    }

    async fn remove_app_files(&self, app: &AppId, entry: AppEntry) {
        remove_shuffles(entry.shuffles.into_values().collect()).await;
        remove_hosted(entry.hosted.into_values().collect()).await;
        let dir = self.app_dir(app);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    }

    /// Removes apps that have had no connection for longer than the app timeout.
    /// Returns the ids removed.
    pub async fn reap_idle_apps(&self, now: Instant) -> Vec<AppId> {
        if self.is_worker() {
            // A worker's apps live as long as the coordinator says.
            return Vec::new();
        }
        let timeout = self.config.app_timeout;
        let expired: Vec<(AppId, AppEntry)> = {
            let mut apps = lock(&self.apps);
            let ids: Vec<AppId> = apps
                .iter()
                .filter(|(_, e)| e.connections == 0 && now.duration_since(e.idle_since) >= timeout)
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter().filter_map(|id| apps.remove(&id).map(|e| (id, e))).collect()
        };
        let mut removed = Vec::new();
        for (app, entry) in expired {
            tracing::info!(%app, ?timeout, "app expired: no connection within the app timeout");
            self.remove_app_files(&app, entry).await;
            removed.push(app);
        }
        removed
    }

    /// Every registered shuffle (on a worker: every copy of a group), for
    /// the spiller and shutdown.
    pub fn all_shuffles(&self) -> Vec<Arc<Shuffle>> {
        let apps = lock(&self.apps);
        let mut all: Vec<Arc<Shuffle>> = apps.values().flat_map(|e| e.shuffles.values().cloned()).collect();
        for hosted in apps.values().flat_map(|e| e.hosted.values()) {
            all.extend(hosted.copies().into_iter().map(|c| c.shuffle.clone()));
        }
        all
    }

    // ---- a cluster's worker ----

    /// Holds a shuffle (or a newer placement of it) as the coordinator
    /// says: creates the app with its secret if this worker does not know
    /// it (an app known with another secret was removed and created again
    /// at the coordinator: the old one goes). Blocking I/O.
    pub fn host_shuffle(
        &self,
        (app, secret): (AppId, AppSecret),
        id: ShuffleId,
        spec: ShuffleSpec,
        placement: Placement,
        decided: &[(u32, MapId, AttemptId)],
    ) -> Result<(), ServiceError> {
        spec.validate().map_err(|why| ServiceError::new(ErrorKind::InvalidSpec, why))?;
        let mut stale = None;
        let hosted = {
            let mut apps = lock(&self.apps);
            if apps.get(&app).is_some_and(|e| !auth::secrets_match(&e.secret.0, &secret.0)) {
                stale = apps.remove(&app);
            }
            let generation = self.next_generation();
            let entry = apps.entry(app.clone()).or_insert_with(|| AppEntry {
                generation,
                secret: secret.clone(),
                receive_buffers: self.memory.consumer(format!("receive buffers of app {app}")),
                shuffles: HashMap::new(),
                hosted: HashMap::new(),
                connections: 0,
                idle_since: Instant::now(),
            });
            match entry.hosted.get(&id) {
                Some(h) if h.spec == spec => h.clone(),
                Some(h) => {
                    return Err(ServiceError::new(
                        ErrorKind::ShuffleExists,
                        format!("{} is held here with {:?}, not {spec:?}", h.label(), h.spec),
                    ));
                }
                None => {
                    let created = Arc::new(HostedShuffle::new(
                        (app.clone(), secret.clone()),
                        id,
                        spec,
                        self.worker_id.clone(),
                        self.shuffle_dir(&app, id),
                        self.storage_env(),
                    ));
                    entry.hosted.insert(id, created.clone());
                    created
                }
            }
        };
        if let Some(old) = stale {
            tracing::info!(%app, "dropping an app that was created again at the coordinator");
            remove_hosted_blocking(old.hosted.into_values().collect());
            old.shuffles.into_values().for_each(|s| s.remove());
        }
        for dropped in hosted.apply_placement(placement, decided)? {
            tracing::info!(shuffle = %dropped.label(), "dropping a copy that moved to another worker");
            dropped.remove();
        }
        Ok(())
    }

    /// The hosted shuffle `id` of `app`, whatever connection asks (the coordinator's commands).
    pub fn hosted_by_app(&self, app: &AppId, id: ShuffleId) -> Result<Arc<HostedShuffle>, ServiceError> {
        lock(&self.apps).get(app).and_then(|e| e.hosted.get(&id).cloned()).ok_or_else(|| {
            ServiceError::new(ErrorKind::UnknownShuffle, format!("shuffle {id} of app {app} is not held here"))
        })
    }

    /// The hosted shuffle `id` of the session's app.
    pub fn hosted(&self, session: &AppSession, id: ShuffleId) -> Result<Arc<HostedShuffle>, ServiceError> {
        self.with_app(session, |entry| {
            entry.hosted.get(&id).cloned().ok_or_else(|| {
                ServiceError::new(
                    ErrorKind::UnknownShuffle,
                    format!("shuffle {id} of app {} is not held by this worker", session.app),
                )
            })
        })
    }

    /// Removes a hosted shuffle (the coordinator's `DropShuffle`); a no-op if unknown.
    pub async fn drop_hosted(&self, app: &AppId, id: ShuffleId) {
        let removed = lock(&self.apps).get_mut(app).and_then(|e| e.hosted.remove(&id));
        if let Some(hosted) = removed {
            tracing::info!(shuffle = %hosted.label(), "shuffle dropped by the coordinator");
            remove_hosted(vec![hosted]).await;
        }
    }

    /// Removes an app with everything it has (the coordinator's `DropApp`); a no-op if unknown.
    pub async fn drop_app(&self, app: &AppId) {
        let removed = lock(&self.apps).remove(app);
        if let Some(entry) = removed {
            tracing::info!(%app, "app dropped by the coordinator");
            self.remove_app_files(app, entry).await;
        }
    }

    /// Every hosted shuffle as the worker reports it when it registers.
    pub fn held_shuffles(&self) -> Vec<HeldShuffle> {
        let hosted: Vec<Arc<HostedShuffle>> =
            lock(&self.apps).values().flat_map(|e| e.hosted.values().cloned()).collect();
        hosted.iter().map(|h| h.held()).collect()
    }

    /// Number of hosted shuffles.
    pub fn hosted_count(&self) -> usize {
        lock(&self.apps).values().map(|e| e.hosted.len()).sum()
    }

    /// Number of registered apps.
    pub fn app_count(&self) -> usize {
        lock(&self.apps).len()
    }

    /// Marks a partition read in progress until the guard drops.
    pub fn reader_started(&self) -> ReaderGuard<'_> {
        self.active_readers.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        ReaderGuard(self)
    }

    /// Partition reads in progress.
    pub fn active_readers(&self) -> usize {
        self.active_readers.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Apps, their connections and shuffles, sorted by id.
    pub fn app_status(&self) -> Vec<AppStatus> {
        let apps: Vec<(AppId, usize, Vec<Arc<Shuffle>>)> = lock(&self.apps)
            .iter()
            .map(|(id, e)| {
                let mut shuffles: Vec<Arc<Shuffle>> = e.shuffles.values().cloned().collect();
                shuffles.extend(e.hosted.values().flat_map(|h| h.copies()).map(|c| c.shuffle.clone()));
                (id.clone(), e.connections, shuffles)
            })
            .collect();
        let mut out: Vec<AppStatus> = apps
            .into_iter()
            .map(|(app, connections, shuffles)| {
                let mut shuffles: Vec<ShuffleStatus> = shuffles
                    .iter()
                    .map(|s| {
                        let spec = s.spec();
                        let (memory_bytes, disk_bytes) = s.usage();
                        ShuffleStatus {
                            id: s.core.id.0,
                            group: s.core.group,
                            mode: crate::stats::mode_name(spec.mode),
                            maps: spec.maps,
                            maps_committed: s.maps_committed(),
                            partitions: spec.partitions,
                            memory_bytes,
                            disk_bytes,
                        }
                    })
                    .collect();
                shuffles.sort_by_key(|s| (s.id, s.group));
                AppStatus { app: app.to_string(), connections, shuffles }
            })
            .collect();
        out.sort_by(|a, b| a.app.cmp(&b.app));
        out
    }

    /// How often the reaper should look for idle apps.
    pub fn reap_interval(&self) -> Duration {
        (self.config.app_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(10))
    }

    /// Writes every app's manifest, and every shuffle's blocks, files and
    /// manifest, so that the next start serves them (graceful shutdown).
    /// A shuffle that cannot be persisted is logged and will not be served
    /// after the restart. Blocking I/O.
    pub fn persist_all(&self) -> (usize, usize) {
        // What is committed may now use the disk reserve to reach the disk.
        self.reserve_released.store(true, std::sync::atomic::Ordering::Release);
        type Persisted = (AppId, AppSecret, Vec<Arc<Shuffle>>, Vec<Arc<HostedShuffle>>);
        let apps: Vec<Persisted> = lock(&self.apps)
            .iter()
            .map(|(id, e)| {
                (
                    id.clone(),
                    e.secret.clone(),
                    e.shuffles.values().cloned().collect(),
                    e.hosted.values().cloned().collect(),
                )
            })
            .collect();
        let (mut saved, mut failed) = (0, 0);
        for (app, secret, shuffles, hosted) in apps {
            let dir = self.app_dir(&app);
            let record = AppManifest { format: MANIFEST_FORMAT, app: app.to_string(), secret: secret.0 };
            if let Err(e) = std::fs::create_dir_all(&dir)
                .map_err(|e| crate::disk::io_error(&dir, "creating", e))
                .and_then(|()| manifest::write(&dir, APP_MANIFEST, &record))
            {
                tracing::error!(%app, error = %e, "could not persist the app; it will not be served after a restart");
                failed += shuffles.len() + hosted.len();
                continue;
            }
            for h in hosted {
                match h.persist() {
                    Ok(()) => saved += 1,
                    Err(e) => {
                        failed += 1;
                        tracing::error!(shuffle = %h.label(), error = %e, "could not persist the shuffle; \
                            it will not be held after a restart");
                    }
                }
            }
            for shuffle in shuffles {
                match shuffle.spill_all().and_then(|()| shuffle.persist()) {
                    Ok(()) => saved += 1,
                    Err(e) => {
                        failed += 1;
                        tracing::error!(shuffle = %shuffle.label(), error = %e, "could not persist the shuffle; \
                            it will not be served after a restart");
                    }
                }
            }
        }
        (saved, failed)
    }

    /// Loads what a graceful shutdown left under the data dir, removing
    /// whatever has no manifest (left by a crash) or cannot be loaded.
    /// Returns the apps and shuffles recovered. Blocking I/O.
    pub fn recover(&self) -> (usize, usize) {
        let apps_dir = self.apps_dir();
        let Ok(entries) = std::fs::read_dir(&apps_dir) else { return (0, 0) };
        let (mut apps_recovered, mut shuffles_recovered) = (0, 0);
        for entry in entries.filter_map(Result::ok) {
            let dir = entry.path();
            match self.recover_app(&dir) {
                Ok(Some(n)) => {
                    apps_recovered += 1;
                    shuffles_recovered += n;
                }
                Ok(None) => {
                    tracing::warn!(dir = %dir.display(), "removing an app left without a manifest (not shut down cleanly)");
                    let _ = std::fs::remove_dir_all(&dir);
                }
                Err(e) => {
                    tracing::error!(dir = %dir.display(), error = %e, "removing an app that cannot be recovered");
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        (apps_recovered, shuffles_recovered)
    }

    fn recover_app(&self, dir: &Path) -> Result<Option<usize>, ServiceError> {
        let Some(record) = manifest::take::<AppManifest>(dir, APP_MANIFEST)? else { return Ok(None) };
        let app = AppId::new(record.app.clone()).map_err(ServiceError::from)?;
        if dir.file_name() != Some(std::ffi::OsStr::new(app.as_str())) {
            return Err(ServiceError::new(ErrorKind::Io, format!("{} holds the manifest of app {app}", dir.display())));
        }
        let mut shuffles = HashMap::new();
        let mut hosted = HashMap::new();
        for entry in
            std::fs::read_dir(dir).map_err(|e| crate::disk::io_error(dir, "listing", e))?.filter_map(Result::ok)
        {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            if path.join(crate::cluster::hosted::HOSTED_MANIFEST).exists() {
                match HostedShuffle::recover(&path, &self.worker_id, self.storage_env()) {
                    Ok(Some(h)) if path == self.shuffle_dir(&app, h.id) && h.app == app => {
                        tracing::info!(shuffle = %h.label(), copies = h.copies().len(), "hosted shuffle recovered");
                        hosted.insert(h.id, Arc::new(h));
                    }
                    Ok(_) => {
                        tracing::warn!(dir = %path.display(), "removing a hosted shuffle with a foreign manifest");
                        let _ = std::fs::remove_dir_all(&path);
                    }
                    Err(e) => {
                        tracing::error!(dir = %path.display(), error = %e, "removing a hosted shuffle that cannot be recovered");
                        let _ = std::fs::remove_dir_all(&path);
                    }
                }
                continue;
            }
            let recovered = manifest::take::<ShuffleManifest>(&path, SHUFFLE_MANIFEST).and_then(|m| match m {
                Some(m) => Shuffle::recover(app.clone(), None, m, path.clone(), self.storage_env()).map(Some),
                None => Ok(None),
            });
            match recovered {
                Ok(Some(shuffle)) if path == self.shuffle_dir(&app, shuffle.core.id) => {
                    tracing::info!(shuffle = %shuffle.label(), committed = shuffle.maps_committed(), "shuffle recovered");
                    shuffles.insert(shuffle.core.id, Arc::new(shuffle));
                }
                Ok(other) => {
                    let why = if other.is_some() { "a manifest for another directory" } else { "no manifest" };
                    tracing::warn!(dir = %path.display(), "removing a shuffle with {why}");
                    let _ = std::fs::remove_dir_all(&path);
                }
                Err(e) => {
                    tracing::error!(dir = %path.display(), error = %e, "removing a shuffle that cannot be recovered");
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
        let count = shuffles.len() + hosted.len();
        let generation = self.next_generation();
        lock(&self.apps).insert(
            app.clone(),
            AppEntry {
                generation,
                secret: AppSecret(record.secret),
                receive_buffers: self.memory.consumer(format!("receive buffers of app {app}")),
                shuffles,
                hosted,
                connections: 0,
                idle_since: Instant::now(),
            },
        );
        tracing::info!(%app, shuffles = count, "app recovered");
        Ok(Some(count))
    }
}

/// The share of the budget kept for blocks read from disk on their way to
/// readers: 1/16 of it, between 1 MiB (one read batch) and 64 MiB (64
/// readers reading from disk at full batch size at once).
pub fn read_share(budget: usize) -> usize {
    (budget / 16).clamp(1 << 20, 64 << 20)
}

/// A shuffle's tables may take at most this fraction (1/N) of the memory
/// budget: a spec that needs more is refused rather than crowding out
/// every shuffle's data.
pub const MAX_TABLE_SHARE_OF_BUDGET: usize = 16;

async fn remove_hosted(hosted: Vec<Arc<HostedShuffle>>) {
    if hosted.is_empty() {
        return;
    }
    let _ = tokio::task::spawn_blocking(move || remove_hosted_blocking(hosted)).await;
}

fn remove_hosted_blocking(hosted: Vec<Arc<HostedShuffle>>) {
    hosted.iter().for_each(|h| h.remove());
}

async fn remove_shuffles(shuffles: Vec<Arc<Shuffle>>) {
    if shuffles.is_empty() {
        return;
    }
    let _ = tokio::task::spawn_blocking(move || shuffles.iter().for_each(|s| s.remove())).await;
}

impl Drop for AppSession {
    fn drop(&mut self) {
        let mut apps = lock(&self.state.apps);
        if let Some(entry) = apps.get_mut(&self.app)
            && entry.generation == self.generation
        {
            entry.connections -= 1;
            if entry.connections == 0 {
                entry.idle_since = Instant::now();
            }
        }
    }
}
