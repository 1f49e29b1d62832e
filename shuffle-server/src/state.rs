//! The service's shared state: apps, their shuffles, and the connections
//! bound to each app.
//!
//! A connection names its app in `Hello` and may touch only that app's
//! shuffles. An app lives while it has connections; once its last connection
//! is gone for longer than the app timeout, the reaper removes it with its
//! shuffles and files. `UnregisterApp` removes it at once; connections still
//! bound to it then get `UnknownApp`.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use shuffle_protocol::{AppId, ErrorKind, ServiceError, ShuffleId, ShuffleSpec};

use crate::{
    ServerConfig,
    memory::MemoryBudget,
    shuffle::{Shuffle, StorageEnv, lock},
    stats::ServerStats,
};

/// One app's shuffles and liveness.
struct AppEntry {
    /// Distinguishes this incarnation of the app from an earlier one with the same id.
    generation: u64,
    /// The app's registered shuffles.
    shuffles: HashMap<ShuffleId, Arc<Shuffle>>,
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
    pub memory: Arc<MemoryBudget>,
    /// Server-wide counters.
    pub stats: Arc<ServerStats>,
    /// Apps by id.
    apps: Mutex<HashMap<AppId, AppEntry>>,
    /// Source of app generations.
    next_generation: Mutex<u64>,
    /// Partition reads being served now.
    active_readers: std::sync::atomic::AtomicUsize,
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
    generation: u64,
}

impl ServiceState {
    /// Fresh state for `config`.
    pub fn new(config: ServerConfig) -> Self {
        Self {
            memory: Arc::new(MemoryBudget::new(config.memory.0 as usize)),
            stats: Arc::new(ServerStats::default()),
            config,
            apps: Mutex::new(HashMap::new()),
            next_generation: Mutex::new(0),
            active_readers: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Directory under which all apps' shuffle files live.
    pub fn apps_dir(&self) -> PathBuf {
        self.config.data_dir.join("apps")
    }

    fn shuffle_dir(&self, app: &AppId, shuffle: ShuffleId) -> PathBuf {
        self.apps_dir().join(app.as_str()).join(format!("shuffle-{}", shuffle.0))
    }

    /// Binds a new connection to `app`, creating the app if needed.
    pub fn open_session(self: &Arc<Self>, app: AppId) -> AppSession {
        let mut apps = lock(&self.apps);
        let entry = apps.entry(app.clone()).or_insert_with(|| {
            let mut next = lock(&self.next_generation);
            *next += 1;
            tracing::info!(%app, "app registered");
            AppEntry { generation: *next, shuffles: HashMap::new(), connections: 0, idle_since: Instant::now() }
        });
        entry.connections += 1;
        AppSession { state: self.clone(), app, generation: entry.generation }
    }

    fn with_app<T>(
        &self,
        session: &AppSession,
        f: impl FnOnce(&mut AppEntry) -> Result<T, ServiceError>,
    ) -> Result<T, ServiceError> {
        let mut apps = lock(&self.apps);
        match apps.get_mut(&session.app) {
            Some(entry) if entry.generation == session.generation => f(entry),
            _ => Err(ServiceError::new(
                ErrorKind::UnknownApp,
                format!("app {} is not registered (it was unregistered or expired); reconnect", session.app),
            )),
        }
    }

    /// Registers a shuffle; registering the same id with an equal spec again is a no-op.
    pub fn register_shuffle(
        &self,
        session: &AppSession,
        shuffle: ShuffleId,
        spec: ShuffleSpec,
    ) -> Result<(), ServiceError> {
        spec.validate().map_err(|why| {
            ServiceError::new(ErrorKind::InvalidSpec, format!("shuffle {shuffle} of app {}: {why}", session.app))
        })?;
        self.with_app(session, |entry| {
            if let Some(existing) = entry.shuffles.get(&shuffle) {
                if existing.spec() == spec {
                    return Ok(());
                }
                return Err(ServiceError::new(
                    ErrorKind::ShuffleExists,
                    format!(
                        "shuffle {shuffle} of app {} is already registered with {:?}, not {spec:?}",
                        session.app,
                        existing.spec()
                    ),
                ));
            }
            let created = Shuffle::create(
                session.app.clone(),
                shuffle,
                spec,
                self.shuffle_dir(&session.app, shuffle),
                StorageEnv {
                    memory: self.memory.clone(),
                    stats: self.stats.clone(),
                    flush_size: self.config.flush_size.0 as usize,
                    disk_reserve: self.config.disk_reserve.0,
                },
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
        self.with_app(session, |_| Ok(()))?;
        let entry = lock(&self.apps).remove(&session.app);
        if let Some(entry) = entry {
            tracing::info!(app = %session.app, "app unregistered");
            self.remove_app_files(&session.app, entry).await;
        }
        Ok(())
    }

    async fn remove_app_files(&self, app: &AppId, entry: AppEntry) {
        remove_shuffles(entry.shuffles.into_values().collect()).await;
        let dir = self.apps_dir().join(app.as_str());
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    }

    /// Removes apps that have had no connection for longer than the app timeout.
    /// Returns the ids removed.
    pub async fn reap_idle_apps(&self, now: Instant) -> Vec<AppId> {
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

    /// Every registered shuffle, for the spiller and shutdown.
    pub fn all_shuffles(&self) -> Vec<Arc<Shuffle>> {
        lock(&self.apps).values().flat_map(|e| e.shuffles.values().cloned()).collect()
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
            .map(|(id, e)| (id.clone(), e.connections, e.shuffles.values().cloned().collect()))
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
                            mode: crate::stats::mode_name(spec.mode),
                            maps: spec.maps,
                            maps_committed: s.maps_committed(),
                            partitions: spec.partitions,
                            memory_bytes,
                            disk_bytes,
                        }
                    })
                    .collect();
                shuffles.sort_by_key(|s| s.id);
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
