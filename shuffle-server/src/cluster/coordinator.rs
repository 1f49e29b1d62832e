//! The coordinator's state, as a plain state machine: workers and their
//! liveness, apps and their secrets, each shuffle's placement and map
//! decisions. No I/O and no clock of its own (time is passed in): every
//! rule is unit-tested here, and [`super::service`] carries out the
//! [`Command`]s it returns.
//!
//! The coordinator's state is soft (DESIGN.md, "Cluster"). A decision is
//! acknowledged to the writer only once it is recorded on every live worker
//! holding the shuffle; a restarted coordinator rebuilds apps, shuffles,
//! placements and decisions from what workers report when they register,
//! and decides nothing for a shuffle until every worker of its placement
//! has reported or been declared lost.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    time::{Duration, Instant},
};

use shuffle_protocol::{
    AppId, AppSecret, AttemptId, ErrorKind, Group, HeldShuffle, MapDecision, MapEnd, MapId, MapPlan, Placement,
    Request, ServiceError, ShuffleId, ShuffleSpec, WorkerEndpoint, WorkerReport,
};

use super::placement::{self, Candidate};
use crate::auth;

/// The coordinator's settings, from the server configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How often workers heartbeat.
    pub heartbeat_interval: Duration,
    /// A worker silent this long is lost.
    pub worker_timeout: Duration,
    /// An app with no client connection this long is removed.
    pub app_timeout: Duration,
    /// Most apps at once.
    pub max_apps: usize,
    /// Most shuffles per app.
    pub max_shuffles_per_app: usize,
}

impl Settings {
    /// Missed heartbeats after which a worker that a client reports
    /// unreachable (or slow to accept a connection) is declared lost at
    /// once, without waiting for the time-out. A worker three heartbeats
    /// late whose connections fail or stall is taken for dead; a stalled
    /// process that heartbeats again is not.
    pub const SUSPECT_HEARTBEATS: u32 = 3;
}

/// Where a worker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum WorkerState {
    /// Takes new shuffles.
    Live,
    /// Draining: keeps serving what it holds, takes nothing new.
    Decommissioning,
    /// Declared lost: its copies were removed from every placement.
    Lost,
}

/// A worker as the coordinator knows it.
#[derive(Clone, Debug)]
pub struct WorkerEntry {
    /// Its last report.
    pub report: WorkerReport,
    pub state: WorkerState,
    /// When its last heartbeat (or registration) arrived.
    pub last_heartbeat: Instant,
    /// Whether its connection to the coordinator is open.
    pub connected: bool,
}

/// A message the service must deliver to a worker (and retry until the
/// worker answers or is declared lost).
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    pub worker: String,
    pub request: Request,
}

/// One map's decision.
#[derive(Clone, Debug, Default)]
struct MapState {
    /// The committed attempt, once decided.
    decided: Option<AttemptId>,
    /// Whether the decision is recorded on every live worker of the shuffle.
    recorded: bool,
    /// The groups the committed attempt wrote blocks to.
    groups_with_data: Vec<u32>,
}

/// A shuffle as the coordinator knows it.
#[derive(Clone, Debug)]
struct ShuffleEntry {
    spec: ShuffleSpec,
    placement: Placement,
    maps: Vec<MapState>,
    /// Per group: the placement version at which it last lost every copy (0: never).
    lost_at: Vec<u64>,
    /// After a restart: workers of the placement that have not reported yet.
    awaiting: BTreeSet<String>,
    /// After a restart, until every worker reported: per group, the maps
    /// decided in the copies that reported.
    rebuilt: BTreeMap<u32, BTreeSet<MapId>>,
}

/// An app as the coordinator knows it.
#[derive(Debug)]
struct AppEntry {
    secret: AppSecret,
    /// Changes when the app is removed and created again, so old sessions fail.
    generation: u64,
    connections: usize,
    idle_since: Instant,
    shuffles: HashMap<ShuffleId, ShuffleEntry>,
}

/// What a commit asks of the service.
#[derive(Clone, Debug, PartialEq)]
pub enum CommitStep {
    /// Answer the writer now.
    Done(CommitAnswer),
    /// Another attempt's decision is being recorded; wait for a change and ask again.
    Wait,
    /// Deliver `commands` (the decision) and call [`Coordinator::recorded`] when every
    /// one is delivered or its worker lost.
    Record { commands: Vec<Command>, map: MapId, attempt: AttemptId },
}

/// The answer to a commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitAnswer {
    Committed,
    Refused { committed_attempt: AttemptId },
}

/// What `BeginMap` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BeginAnswer {
    Plan(MapPlan),
    Refused { committed_attempt: AttemptId },
}

/// The coordinator's state.
pub struct Coordinator {
    settings: Settings,
    /// When this coordinator started: shuffles that workers report within
    /// the recovery window are adopted (the coordinator restarted).
    started: Instant,
    workers: BTreeMap<String, WorkerEntry>,
    apps: HashMap<AppId, AppEntry>,
    /// Varies where each new shuffle's placement starts.
    rotation: u64,
    next_generation: u64,
}

fn unknown_shuffle(app: &AppId, shuffle: ShuffleId) -> ServiceError {
    ServiceError::new(ErrorKind::UnknownShuffle, format!("shuffle {shuffle} is not registered for app {app}"))
}

impl Coordinator {
    /// A coordinator that knows nothing yet, started at `now`.
    pub fn new(settings: Settings, now: Instant) -> Self {
        Self { settings, started: now, workers: BTreeMap::new(), apps: HashMap::new(), rotation: 0, next_generation: 0 }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// How long after start shuffles that workers report are adopted.
    fn recovery_window(&self) -> Duration {
        self.settings.worker_timeout * 2
    }

    // ---- apps ----

    /// Binds a client connection to `app`: creates it (no secret) or joins
    /// it (its secret). Returns the secret and the app's generation.
    pub fn open_app(
        &mut self,
        app: &AppId,
        secret: Option<&AppSecret>,
        now: Instant,
    ) -> Result<(AppSecret, u64), ServiceError> {
        let (since_start, window) = (now.duration_since(self.started), self.recovery_window());
        match (self.apps.get_mut(app), secret) {
            (Some(entry), Some(presented)) if auth::secrets_match(&entry.secret.0, &presented.0) => {
                entry.connections += 1;
                entry.idle_since = now;
                Ok((entry.secret.clone(), entry.generation))
            }
            // A restarted coordinator learns its apps from the workers'
            // reports: until its recovery window has passed, a secret it
            // cannot check yet is "retry", whatever the app (so the answer
            // says nothing about which apps exist).
            (_, Some(_)) if since_start < window => Err(ServiceError::new(
                ErrorKind::Unavailable,
                format!(
                    "app {app} cannot be joined yet: the coordinator started {since_start:.1?} ago and learns its \
                     apps from the workers' reports for up to {window:?}; retry"
                ),
            )),
            (Some(_), None) => Err(ServiceError::new(
                ErrorKind::AppExists,
                format!("app {app} cannot be created: the name is taken; present the app's secret to join it"),
            )),
            (_, Some(_)) => Err(auth::unknown_app(app)),
            (None, None) => {
                if self.apps.len() >= self.settings.max_apps {
                    return Err(ServiceError::new(
                        ErrorKind::LimitExceeded,
                        format!("app {app} cannot be created: the cluster holds its limit of {} apps", self.apps.len()),
                    ));
                }
                let secret = auth::generate_secret()?;
                self.next_generation += 1;
                let entry = AppEntry {
                    secret: secret.clone(),
                    generation: self.next_generation,
                    connections: 1,
                    idle_since: now,
                    shuffles: HashMap::new(),
                };
                self.apps.insert(app.clone(), entry);
                Ok((secret, self.next_generation))
            }
        }
    }

    /// A client connection of `app` closed.
    pub fn close_app(&mut self, app: &AppId, generation: u64, now: Instant) {
        if let Some(entry) = self.apps.get_mut(app)
            && entry.generation == generation
        {
            entry.connections = entry.connections.saturating_sub(1);
            if entry.connections == 0 {
                entry.idle_since = now;
            }
        }
    }

    fn app(&mut self, app: &AppId, generation: u64) -> Result<&mut AppEntry, ServiceError> {
        match self.apps.get_mut(app) {
            Some(entry) if entry.generation == generation => Ok(entry),
            _ => Err(auth::unknown_app(app)),
        }
    }

    fn shuffle(&mut self, app: &AppId, generation: u64, id: ShuffleId) -> Result<&mut ShuffleEntry, ServiceError> {
        let entry = self.app(app, generation)?.shuffles.get_mut(&id).ok_or_else(|| unknown_shuffle(app, id))?;
        if !entry.awaiting.is_empty() {
            return Err(ServiceError::new(
                ErrorKind::Unavailable,
                format!(
                    "shuffle {id} of app {app} is being rebuilt after a coordinator restart: waiting for workers {:?} \
                     to report; retry",
                    entry.awaiting
                ),
            ));
        }
        Ok(entry)
    }

    /// Removes apps without a client connection for longer than the app
    /// time-out; returns the commands that remove them from the workers.
    pub fn reap_idle_apps(&mut self, now: Instant) -> Vec<Command> {
        let timeout = self.settings.app_timeout;
        let idle: Vec<AppId> = self
            .apps
            .iter()
            .filter(|(_, e)| e.connections == 0 && now.duration_since(e.idle_since) >= timeout)
            .map(|(id, _)| id.clone())
            .collect();
        let mut commands = Vec::new();
        for app in idle {
            tracing::info!(%app, "app expired: no client connection for {timeout:?}");
            commands.extend(self.drop_app_commands(&app));
            self.apps.remove(&app);
        }
        commands
    }

    fn drop_app_commands(&self, app: &AppId) -> Vec<Command> {
        let Some(entry) = self.apps.get(app) else { return Vec::new() };
        let workers: BTreeSet<String> =
            entry.shuffles.values().flat_map(|s| holders(&s.placement).into_iter().map(|(w, _)| w)).collect();
        workers.into_iter().map(|worker| Command { worker, request: Request::DropApp { app: app.clone() } }).collect()
    }

    /// Removes `app` and its shuffles; returns the commands for the workers.
    pub fn unregister_app(&mut self, app: &AppId, generation: u64) -> Result<Vec<Command>, ServiceError> {
        self.app(app, generation)?;
        let commands = self.drop_app_commands(app);
        self.apps.remove(app);
        Ok(commands)
    }

    // ---- workers ----

    fn candidates(&self) -> Vec<Candidate> {
        self.workers
            .iter()
            .map(|(id, w)| Candidate {
                id: id.clone(),
                weight: if w.state == WorkerState::Live { placement::weight(&w.report) } else { 0.0 },
            })
            .collect()
    }

    /// The state of worker `id`, if known.
    pub fn worker_state(&self, id: &str) -> Option<WorkerState> {
        self.workers.get(id).map(|w| w.state)
    }

    /// Every worker.
    pub fn workers(&self) -> impl Iterator<Item = (&String, &WorkerEntry)> {
        self.workers.iter()
    }

    /// A worker registers with what it holds. Returns the commands that
    /// bring it in line: decisions it missed, newer placements, shuffles to drop.
    pub fn register_worker(&mut self, report: WorkerReport, held: Vec<HeldShuffle>, now: Instant) -> Vec<Command> {
        let id = report.endpoint.id.clone();
        let was_lost = self.workers.get(&id).is_some_and(|w| w.state == WorkerState::Lost);
        let state = if report.decommissioning { WorkerState::Decommissioning } else { WorkerState::Live };
        self.workers.insert(id.clone(), WorkerEntry { report, state, last_heartbeat: now, connected: true });
        let mut commands = Vec::new();
        let drop = |h: &HeldShuffle| Command {
            worker: id.clone(),
            request: Request::DropShuffle { app: h.app.clone(), shuffle: h.shuffle },
        };
        let reported: BTreeSet<(AppId, ShuffleId)> = held.iter().map(|h| (h.app.clone(), h.shuffle)).collect();
        for h in held {
            if was_lost {
                // Declared lost: its copies were replaced or given up; it rejoins empty.
                commands.push(drop(&h));
                continue;
            }
            let entry = self
                .apps
                .get(&h.app)
                .filter(|a| auth::secrets_match(&a.secret.0, &h.secret.0))
                .and_then(|a| a.shuffles.get(&h.shuffle));
            let (known, rebuilding) = (entry.is_some(), entry.is_some_and(|e| !e.awaiting.is_empty()));
            if rebuilding {
                commands.extend(self.adopt(&id, h, now));
            } else if known {
                commands.extend(self.reconcile(&id, h));
            } else if now.duration_since(self.started) < self.recovery_window() {
                commands.extend(self.adopt(&id, h, now));
            } else {
                tracing::info!(worker = %id, app = %h.app, shuffle = %h.shuffle, "dropping a shuffle the cluster no longer has");
                commands.push(drop(&h));
            }
        }
        // Copies it should hold but did not report (it restarted without
        // them) are lost, as if the worker had been.
        commands.extend(self.drop_copies(&id, &reported));
        tracing::info!(worker = %id, ?state, rejoined_empty = was_lost, "worker registered");
        commands
    }

    /// Brings a known shuffle on a worker up to date.
    fn reconcile(&mut self, worker: &str, held: HeldShuffle) -> Vec<Command> {
        let app = held.app.clone();
        let entry = self.apps.get_mut(&app).and_then(|a| a.shuffles.get_mut(&held.shuffle)).expect("checked known");
        entry.awaiting.remove(worker);
        let mut commands = Vec::new();
        let Some(me) = entry.placement.index_of(worker) else {
            return vec![Command {
                worker: worker.into(),
                request: Request::DropShuffle { app, shuffle: held.shuffle },
            }];
        };
        let mine: BTreeSet<u32> = groups_of(&entry.placement, me).into_iter().collect();
        // Groups it holds that are no longer its own (moved while it was away) go.
        let stale = held.groups.iter().any(|g| !mine.contains(&g.group));
        if held.placement.version != entry.placement.version || stale {
            commands.push(Command {
                worker: worker.into(),
                request: Request::HostShuffle {
                    app: app.clone(),
                    secret: held.secret.clone(),
                    shuffle: held.shuffle,
                    spec: entry.spec,
                    placement: entry.placement.clone(),
                    decided: Vec::new(),
                },
            });
        }
        // Decisions it missed (recorded or being recorded).
        let has: HashMap<u32, BTreeSet<MapId>> =
            held.groups.iter().map(|g| (g.group, g.decided.iter().map(|(m, _)| *m).collect())).collect();
        let missing: Vec<MapDecision> = entry
            .maps
            .iter()
            .enumerate()
            .filter_map(|(m, s)| {
                let attempt = s.decided?;
                let lacks = mine.iter().any(|g| {
                    has.get(g).is_some_and(|d| !d.contains(&(m as MapId)))
                        && !entry.placement.groups[*g as usize].lost_maps.contains(&(m as MapId))
                });
                lacks.then(|| MapDecision {
                    map: m as MapId,
                    attempt,
                    groups_with_data: s.groups_with_data.clone(),
                    repair: false,
                })
            })
            .collect();
        if !missing.is_empty() {
            commands.push(Command {
                worker: worker.into(),
                request: Request::RecordDecisions { app, shuffle: held.shuffle, decisions: missing },
            });
        }
        commands
    }

    /// Takes over a shuffle a worker reports after a coordinator restart;
    /// once every worker of its placement reported, returns the commands
    /// that record every decision on every copy.
    fn adopt(&mut self, worker: &str, held: HeldShuffle, now: Instant) -> Vec<Command> {
        let app = self.apps.entry(held.app.clone()).or_insert_with(|| {
            self.next_generation += 1;
            AppEntry {
                secret: held.secret.clone(),
                generation: self.next_generation,
                connections: 0,
                idle_since: now,
                shuffles: HashMap::new(),
            }
        });
        if !auth::secrets_match(&app.secret.0, &held.secret.0) {
            tracing::warn!(worker, app = %held.app, "a worker reports an app with another secret; ignoring its shuffle");
            return Vec::new();
        }
        let entry = app.shuffles.entry(held.shuffle).or_insert_with(|| {
            tracing::info!(worker, app = %held.app, shuffle = %held.shuffle, "adopting a shuffle a worker reports");
            ShuffleEntry {
                spec: held.spec,
                placement: held.placement.clone(),
                maps: vec![MapState::default(); held.spec.maps as usize],
                lost_at: vec![0; held.placement.groups.len()],
                awaiting: holders(&held.placement).into_iter().map(|(w, _)| w).collect(),
                rebuilt: BTreeMap::new(),
            }
        });
        if held.placement.version > entry.placement.version {
            entry.awaiting.extend(holders(&held.placement).into_iter().map(|(w, _)| w));
            entry.placement = held.placement.clone();
            entry.lost_at.resize(entry.placement.groups.len(), 0);
        }
        entry.awaiting.remove(worker);
        for group in &held.groups {
            entry.rebuilt.entry(group.group).or_default().extend(group.decided.iter().map(|(m, _)| *m));
            for &(map, attempt) in &group.decided {
                let Some(state) = entry.maps.get_mut(map as usize) else { continue };
                // A group repaired after a loss may hold a newer attempt of a map;
                // the map is decided either way.
                if state.decided.is_none() {
                    state.decided = Some(attempt);
                    state.recorded = true;
                }
                if group.maps_with_data.contains(&map) && !state.groups_with_data.contains(&group.group) {
                    state.groups_with_data.push(group.group);
                    state.groups_with_data.sort_unstable();
                }
            }
        }
        let secret = app.secret.clone();
        finish_rebuild(&held.app, &secret, held.shuffle, entry)
    }

    /// A heartbeat; `Err` means: register again (the coordinator does not know the worker).
    pub fn heartbeat(&mut self, report: WorkerReport, now: Instant) -> Result<(), ServiceError> {
        let id = report.endpoint.id.clone();
        match self.workers.get_mut(&id) {
            Some(w) if w.state != WorkerState::Lost => {
                if report.decommissioning && w.state == WorkerState::Live {
                    tracing::info!(worker = %id, "worker decommissioning: no new shuffles go to it");
                    w.state = WorkerState::Decommissioning;
                }
                w.report = report;
                w.last_heartbeat = now;
                w.connected = true;
                Ok(())
            }
            _ => Err(ServiceError::new(ErrorKind::WrongRole, format!("worker {id} is not registered; register again"))),
        }
    }

    /// The worker's connection to the coordinator closed (it may be restarting).
    pub fn disconnected(&mut self, id: &str) {
        if let Some(w) = self.workers.get_mut(id) {
            w.connected = false;
        }
    }

    /// A client could not reach `id`: if its heartbeats are late too, it is lost now.
    pub fn suspect(&mut self, id: &str, now: Instant) -> Vec<Command> {
        let late = self.settings.heartbeat_interval * Settings::SUSPECT_HEARTBEATS;
        match self.workers.get(id) {
            Some(w) if w.state != WorkerState::Lost && w.connected && now.duration_since(w.last_heartbeat) >= late => {
                tracing::warn!(worker = id, "a client cannot reach the worker and its heartbeats are late: lost");
                self.lose_worker(id)
            }
            _ => Vec::new(),
        }
    }

    /// Declares lost the workers silent past the time-out, and finishes
    /// rebuilds whose remaining workers never came back.
    pub fn tick(&mut self, now: Instant) -> Vec<Command> {
        let timeout = self.settings.worker_timeout;
        let silent: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| w.state != WorkerState::Lost && now.duration_since(w.last_heartbeat) >= timeout)
            .map(|(id, _)| id.clone())
            .collect();
        let mut commands = Vec::new();
        for id in silent {
            tracing::warn!(worker = %id, "worker lost: no heartbeat for {timeout:?}");
            commands.extend(self.lose_worker(&id));
        }
        if now.duration_since(self.started) >= self.recovery_window() {
            // Workers that never reported after the restart are gone.
            let absent: BTreeSet<String> = self
                .apps
                .values()
                .flat_map(|a| a.shuffles.values())
                .flat_map(|s| s.awaiting.iter().cloned())
                .filter(|w| self.workers.get(w).is_none_or(|e| e.state == WorkerState::Lost))
                .collect();
            for id in absent {
                tracing::warn!(worker = %id, "a worker of a rebuilt shuffle never reported: lost");
                self.workers.entry(id.clone()).or_insert_with(|| WorkerEntry {
                    report: WorkerReport {
                        endpoint: WorkerEndpoint { id: id.clone(), addr: ([0, 0, 0, 0], 0).into() },
                        memory_budget: 0,
                        memory_used: 0,
                        disk_total: 0,
                        disk_free: 0,
                        disk_reserve: 0,
                        active_readers: 0,
                        decommissioning: false,
                    },
                    state: WorkerState::Lost,
                    last_heartbeat: now,
                    connected: false,
                });
                commands.extend(self.lose_worker(&id));
            }
        }
        commands
    }

    /// Declares `id` lost: removes it from every placement. A group that
    /// keeps a copy goes on with it as its primary; a group with no copy
    /// left moves to the roomiest live workers, and the maps whose blocks
    /// it held must be re-run.
    pub fn lose_worker(&mut self, id: &str) -> Vec<Command> {
        if let Some(w) = self.workers.get_mut(id) {
            w.state = WorkerState::Lost;
            w.connected = false;
        }
        self.drop_copies(id, &BTreeSet::new())
    }

    /// Removes worker `id`'s copies from every placement except those of
    /// the shuffles in `keep` (see [`Coordinator::lose_worker`]).
    fn drop_copies(&mut self, id: &str, keep: &BTreeSet<(AppId, ShuffleId)>) -> Vec<Command> {
        let candidates = self.candidates();
        let mut commands = Vec::new();
        for (app_id, app) in &mut self.apps {
            for (shuffle_id, entry) in &mut app.shuffles {
                if keep.contains(&(app_id.clone(), *shuffle_id)) {
                    continue;
                }
                if entry.awaiting.remove(id) {
                    commands.extend(finish_rebuild(app_id, &app.secret, *shuffle_id, entry));
                }
                let Some(index) = entry.placement.index_of(id) else { continue };
                let affected: Vec<u32> = groups_of(&entry.placement, index);
                if affected.is_empty() {
                    continue;
                }
                entry.placement.version += 1;
                let version = entry.placement.version;
                let mut new_copies: Vec<(u32, String)> = Vec::new();
                for g in affected {
                    let group = &mut entry.placement.groups[g as usize];
                    group.copies.retain(|c| *c != index);
                    if !group.copies.is_empty() {
                        continue;
                    }
                    // Every copy is gone: the blocks of maps decided with data here are lost.
                    entry.lost_at[g as usize] = version;
                    let lost: Vec<MapId> = entry
                        .maps
                        .iter()
                        .enumerate()
                        .filter(|(_, m)| m.decided.is_some() && m.groups_with_data.contains(&g))
                        .map(|(i, _)| i as MapId)
                        .collect();
                    group.lost_maps = lost;
                    let exclude: Vec<&str> = vec![id];
                    let hosts = placement::choose_hosts(&candidates, &exclude, usize::from(entry.spec.replication));
                    for host in hosts {
                        let host_id = candidates[host].id.clone();
                        let idx = match entry.placement.index_of(&host_id) {
                            Some(i) => i,
                            None => {
                                let endpoint = self.workers[&host_id].report.endpoint.clone();
                                entry.placement.workers.push(endpoint);
                                (entry.placement.workers.len() - 1) as u16
                            }
                        };
                        let group = &mut entry.placement.groups[g as usize];
                        group.copies.push(idx);
                        new_copies.push((g, host_id));
                    }
                    let group = &entry.placement.groups[g as usize];
                    tracing::warn!(
                        app = %app_id, shuffle = %shuffle_id, group = g, lost_maps = ?group.lost_maps,
                        moved_to = ?group.copies, "every copy of a group was lost"
                    );
                }
                // Every holder learns the new placement; new copies also learn
                // which maps are decided without blocks in their group.
                for (worker, _) in holders(&entry.placement) {
                    let decided: Vec<(u32, MapId, AttemptId)> = new_copies
                        .iter()
                        .filter(|(_, host)| *host == worker)
                        .flat_map(|(g, _)| {
                            let lost = &entry.placement.groups[*g as usize].lost_maps;
                            entry.maps.iter().enumerate().filter_map(move |(m, s)| {
                                let attempt = s.decided?;
                                (!lost.contains(&(m as MapId))).then_some((*g, m as MapId, attempt))
                            })
                        })
                        .collect();
                    commands.push(Command {
                        worker,
                        request: Request::HostShuffle {
                            app: app_id.clone(),
                            secret: app.secret.clone(),
                            shuffle: *shuffle_id,
                            spec: entry.spec,
                            placement: entry.placement.clone(),
                            decided,
                        },
                    });
                }
            }
        }
        commands
    }

    // ---- shuffles ----

    /// Places a new shuffle (or returns the placement of an equal one).
    /// The commands host it on its workers; answer the client once they are delivered.
    pub fn register_shuffle(
        &mut self,
        app: &AppId,
        generation: u64,
        id: ShuffleId,
        spec: ShuffleSpec,
    ) -> Result<(Placement, Vec<Command>), ServiceError> {
        let label = format!("shuffle {id} of app {app}");
        spec.validate().map_err(|why| ServiceError::new(ErrorKind::InvalidSpec, format!("{label}: {why}")))?;
        let candidates = self.candidates();
        self.rotation += 1;
        let rotation = self.rotation;
        let max_shuffles = self.settings.max_shuffles_per_app;
        let entry = self.app(app, generation)?;
        if let Some(existing) = entry.shuffles.get(&id) {
            if existing.spec == spec {
                return Ok((existing.placement.clone(), Vec::new()));
            }
            return Err(ServiceError::new(
                ErrorKind::ShuffleExists,
                format!("{label} is already registered with {:?}, not {spec:?}", existing.spec),
            ));
        }
        if entry.shuffles.len() >= max_shuffles {
            return Err(ServiceError::new(
                ErrorKind::LimitExceeded,
                format!("{label} cannot be registered: the app holds its limit of {max_shuffles} shuffles"),
            ));
        }
        let layout = placement::place(spec.partitions, spec.replication, &candidates, rotation)
            .map_err(|why| ServiceError::new(ErrorKind::Unavailable, format!("{label}: {why}")))?;
        // The placement names only the workers it uses.
        let mut workers: Vec<WorkerEndpoint> = Vec::new();
        let mut index: HashMap<usize, u16> = HashMap::new();
        let mut groups = Vec::new();
        for copies in &layout.groups {
            let copies = copies
                .iter()
                .map(|&c| {
                    *index.entry(c).or_insert_with(|| {
                        workers.push(self.workers[&candidates[c].id].report.endpoint.clone());
                        (workers.len() - 1) as u16
                    })
                })
                .collect();
            groups.push(Group { copies, lost_maps: Vec::new() });
        }
        let placement = Placement { version: 1, spec, workers, groups, partition_groups: layout.partition_groups };
        let entry = self.app(app, generation)?;
        let secret = entry.secret.clone();
        entry.shuffles.insert(
            id,
            ShuffleEntry {
                spec,
                placement: placement.clone(),
                maps: vec![MapState::default(); spec.maps as usize],
                lost_at: vec![0; placement.groups.len()],
                awaiting: BTreeSet::new(),
                rebuilt: BTreeMap::new(),
            },
        );
        let commands = holders(&placement)
            .into_iter()
            .map(|(worker, _)| Command {
                worker,
                request: Request::HostShuffle {
                    app: app.clone(),
                    secret: secret.clone(),
                    shuffle: id,
                    spec,
                    placement: placement.clone(),
                    decided: Vec::new(),
                },
            })
            .collect();
        Ok((placement, commands))
    }

    /// Removes a shuffle; returns the commands that remove it from its workers.
    pub fn unregister_shuffle(
        &mut self,
        app: &AppId,
        generation: u64,
        id: ShuffleId,
    ) -> Result<Vec<Command>, ServiceError> {
        let entry = self.app(app, generation)?;
        let removed = entry.shuffles.remove(&id).ok_or_else(|| unknown_shuffle(app, id))?;
        Ok(holders(&removed.placement)
            .into_iter()
            .map(|(worker, _)| Command { worker, request: Request::DropShuffle { app: app.clone(), shuffle: id } })
            .collect())
    }

    /// The placement of a shuffle.
    pub fn placement(&mut self, app: &AppId, generation: u64, id: ShuffleId) -> Result<Placement, ServiceError> {
        Ok(self.shuffle(app, generation, id)?.placement.clone())
    }

    /// How an attempt of `map` pushes.
    pub fn begin_map(
        &mut self,
        app: &AppId,
        generation: u64,
        id: ShuffleId,
        map: MapId,
    ) -> Result<BeginAnswer, ServiceError> {
        let entry = self.shuffle(app, generation, id)?;
        let state = entry.maps.get(map as usize).ok_or_else(|| map_out_of_range(app, id, map, entry.spec.maps))?;
        let version = entry.placement.version;
        let Some(committed) = state.decided else {
            return Ok(BeginAnswer::Plan(MapPlan::Push { placement_version: version }));
        };
        let groups = repair_groups(&entry.placement, map);
        if groups.is_empty() {
            Ok(BeginAnswer::Refused { committed_attempt: committed })
        } else {
            Ok(BeginAnswer::Plan(MapPlan::Repair { placement_version: version, groups }))
        }
    }

    /// An attempt asks to be its map's committed attempt. Every worker it
    /// pushed to has prepared it.
    pub fn commit_map(
        &mut self,
        app: &AppId,
        generation: u64,
        id: ShuffleId,
        version: u64,
        end: &MapEnd,
    ) -> Result<CommitStep, ServiceError> {
        let entry = self.shuffle(app, generation, id)?;
        let (map, attempt) = (end.map, end.attempt);
        let maps = entry.spec.maps;
        let state = entry.maps.get(map as usize).ok_or_else(|| map_out_of_range(app, id, map, maps))?.clone();
        let mut written: BTreeSet<u32> = BTreeSet::new();
        for t in &end.partitions {
            let (g, _) = entry.placement.group_of(t.partition).ok_or_else(|| {
                ServiceError::new(
                    ErrorKind::PartitionOutOfRange,
                    format!("partition {} is out of range for shuffle {id} of app {app}", t.partition),
                )
            })?;
            if t.blocks > 0 {
                written.insert(g);
            }
        }
        let lost_since = |groups: &[u32], entry: &ShuffleEntry| {
            groups
                .iter()
                .copied()
                .find(|g| entry.lost_at[*g as usize] > version || entry.placement.groups[*g as usize].copies.is_empty())
        };
        match state.decided {
            Some(decided) if decided == attempt => {
                Ok(if state.recorded { CommitStep::Done(CommitAnswer::Committed) } else { CommitStep::Wait })
            }
            Some(decided) => {
                if !state.recorded {
                    return Ok(CommitStep::Wait);
                }
                let repair = repair_groups(&entry.placement, map);
                if repair.is_empty() {
                    return Ok(CommitStep::Done(CommitAnswer::Refused { committed_attempt: decided }));
                }
                if let Some(g) = written.iter().find(|g| !repair.contains(g)) {
                    return Err(ServiceError::new(
                        ErrorKind::UnexpectedMessage,
                        format!(
                            "map {map} attempt {attempt} of shuffle {id} re-ran to repair groups {repair:?} but wrote \
                             to group {g}, which holds the committed attempt {decided}'s blocks"
                        ),
                    ));
                }
                if let Some(g) = lost_since(&repair, entry) {
                    return Err(data_lost(app, id, map, attempt, g));
                }
                // Recorded on the repaired groups' copies only.
                let mut commands = Vec::new();
                for (worker, groups) in holders(&entry.placement) {
                    if groups.iter().any(|g| repair.contains(g)) {
                        commands.push(Command {
                            worker,
                            request: Request::RecordDecisions {
                                app: app.clone(),
                                shuffle: id,
                                decisions: vec![MapDecision {
                                    map,
                                    attempt,
                                    groups_with_data: written.iter().copied().collect(),
                                    repair: true,
                                }],
                            },
                        });
                    }
                }
                Ok(CommitStep::Record { commands, map, attempt })
            }
            None => {
                let written_groups: Vec<u32> = written.iter().copied().collect();
                if let Some(g) = lost_since(&written_groups, entry) {
                    return Err(data_lost(app, id, map, attempt, g));
                }
                let groups_with_data: Vec<u32> = written.into_iter().collect();
                let state = &mut entry.maps[map as usize];
                state.decided = Some(attempt);
                state.recorded = false;
                state.groups_with_data = groups_with_data.clone();
                let decision = MapDecision { map, attempt, groups_with_data, repair: false };
                let commands = holders(&entry.placement)
                    .into_iter()
                    .map(|(worker, _)| Command {
                        worker,
                        request: Request::RecordDecisions {
                            app: app.clone(),
                            shuffle: id,
                            decisions: vec![decision.clone()],
                        },
                    })
                    .collect();
                Ok(CommitStep::Record { commands, map, attempt })
            }
        }
    }

    /// A decision was delivered to every live worker it went to.
    pub fn recorded(&mut self, app: &AppId, id: ShuffleId, map: MapId, attempt: AttemptId) {
        let Some(entry) = self.apps.get_mut(app).and_then(|a| a.shuffles.get_mut(&id)) else { return };
        let Some(state) = entry.maps.get_mut(map as usize) else { return };
        if state.decided == Some(attempt) {
            state.recorded = true;
        } else if state.decided.is_some() {
            // A repair: the re-run attempt's blocks replace the lost ones.
            for group in &mut entry.placement.groups {
                group.lost_maps.retain(|m| *m != map);
            }
            entry.placement.version += 1;
        }
    }

    /// A worker holds another decision for `map` than the one being
    /// recorded (left by a coordinator that died mid-record): it stands.
    pub fn adopt_conflict(&mut self, app: &AppId, id: ShuffleId, map: MapId, attempt: AttemptId) {
        let Some(entry) = self.apps.get_mut(app).and_then(|a| a.shuffles.get_mut(&id)) else { return };
        if let Some(state) = entry.maps.get_mut(map as usize) {
            tracing::warn!(%app, shuffle = %id, map, attempt, "a worker already holds another decision; it stands");
            state.decided = Some(attempt);
            state.recorded = false;
        }
    }

    /// The decision of `map`, for re-recording after a conflict.
    pub fn decision_commands(&self, app: &AppId, id: ShuffleId, map: MapId) -> Vec<Command> {
        let Some(entry) = self.apps.get(app).and_then(|a| a.shuffles.get(&id)) else { return Vec::new() };
        let Some(state) = entry.maps.get(map as usize) else { return Vec::new() };
        let Some(attempt) = state.decided else { return Vec::new() };
        let decision = MapDecision { map, attempt, groups_with_data: state.groups_with_data.clone(), repair: false };
        holders(&entry.placement)
            .into_iter()
            .map(|(worker, _)| Command {
                worker,
                request: Request::RecordDecisions { app: app.clone(), shuffle: id, decisions: vec![decision.clone()] },
            })
            .collect()
    }

    /// A view for `/status`.
    pub fn status(&self, now: Instant) -> serde_json::Value {
        let mut held: HashMap<&str, usize> = HashMap::new();
        for app in self.apps.values() {
            for s in app.shuffles.values() {
                for (w, _) in holders(&s.placement) {
                    let id = s.placement.workers.iter().find(|e| e.id == w).map(|e| e.id.as_str()).unwrap_or("");
                    *held.entry(id).or_default() += 1;
                }
            }
        }
        let workers: Vec<serde_json::Value> = self
            .workers
            .iter()
            .map(|(id, w)| {
                serde_json::json!({
                    "id": id,
                    "addr": w.report.endpoint.addr.to_string(),
                    "state": w.state,
                    "connected": w.connected,
                    "last_heartbeat_seconds_ago": now.duration_since(w.last_heartbeat).as_secs_f64(),
                    "memory_budget_bytes": w.report.memory_budget,
                    "memory_used_bytes": w.report.memory_used,
                    "disk_total_bytes": w.report.disk_total,
                    "disk_free_bytes": w.report.disk_free,
                    "active_readers": w.report.active_readers,
                    "shuffles_held": held.get(id.as_str()).copied().unwrap_or(0),
                })
            })
            .collect();
        let apps: Vec<serde_json::Value> = self
            .apps
            .iter()
            .map(|(id, a)| {
                let shuffles: Vec<serde_json::Value> = a
                    .shuffles
                    .iter()
                    .map(|(sid, s)| {
                        serde_json::json!({
                            "id": sid.0,
                            "mode": format!("{:?}", s.spec.mode).to_lowercase(),
                            "maps": s.spec.maps,
                            "maps_committed": s.maps.iter().filter(|m| m.decided.is_some() && m.recorded).count(),
                            "partitions": s.spec.partitions,
                            "replication": s.spec.replication,
                            "placement_version": s.placement.version,
                            "groups": s.placement.groups.iter().map(|g| serde_json::json!({
                                "copies": g.copies.iter().map(|c| s.placement.workers[usize::from(*c)].id.clone()).collect::<Vec<_>>(),
                                "lost_maps": g.lost_maps,
                            })).collect::<Vec<_>>(),
                            "rebuilding_until_reported": s.awaiting,
                        })
                    })
                    .collect();
                serde_json::json!({ "app": id.to_string(), "connections": a.connections, "shuffles": shuffles })
            })
            .collect();
        serde_json::json!({ "role": "coordinator", "workers": workers, "apps": apps })
    }

    /// Counts for `/metrics`: workers by state, apps, shuffles, and the
    /// memory and disk the live workers report.
    pub fn totals(&self) -> ClusterTotals {
        let mut t = ClusterTotals::default();
        for w in self.workers.values() {
            match w.state {
                WorkerState::Live => t.workers_live += 1,
                WorkerState::Decommissioning => t.workers_decommissioning += 1,
                WorkerState::Lost => t.workers_lost += 1,
            }
            if w.state != WorkerState::Lost {
                t.memory_budget_bytes += w.report.memory_budget;
                t.memory_used_bytes += w.report.memory_used;
                t.disk_free_bytes += w.report.disk_free;
            }
        }
        t.apps = self.apps.len() as u64;
        t.shuffles = self.apps.values().map(|a| a.shuffles.len() as u64).sum();
        t.groups_lost = self
            .apps
            .values()
            .flat_map(|a| a.shuffles.values())
            .flat_map(|s| &s.placement.groups)
            .filter(|g| !g.lost_maps.is_empty())
            .count() as u64;
        t
    }
}

/// The cluster's totals, for `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClusterTotals {
    pub workers_live: u64,
    pub workers_decommissioning: u64,
    pub workers_lost: u64,
    pub apps: u64,
    pub shuffles: u64,
    pub groups_lost: u64,
    pub memory_budget_bytes: u64,
    pub memory_used_bytes: u64,
    pub disk_free_bytes: u64,
}

/// Once every worker of a rebuilt shuffle has reported (or was declared
/// lost): a group's lost maps are those its placement lists that none of
/// its copies has decided since, and every decision is recorded again on
/// every copy (a decision that reached only some workers before the
/// coordinator died is completed; workers answer `Ok` for what they have).
fn finish_rebuild(app: &AppId, secret: &AppSecret, id: ShuffleId, entry: &mut ShuffleEntry) -> Vec<Command> {
    if !entry.awaiting.is_empty() || entry.rebuilt.is_empty() {
        return Vec::new();
    }
    let rebuilt = std::mem::take(&mut entry.rebuilt);
    for (g, group) in entry.placement.groups.iter_mut().enumerate() {
        let decided = rebuilt.get(&(g as u32));
        group.lost_maps.retain(|m| decided.is_none_or(|d| !d.contains(m)));
    }
    tracing::info!(%app, shuffle = %id, version = entry.placement.version, "shuffle rebuilt from its workers' reports");
    let decisions: Vec<MapDecision> = entry
        .maps
        .iter()
        .enumerate()
        .filter_map(|(m, s)| {
            Some(MapDecision {
                map: m as MapId,
                attempt: s.decided?,
                groups_with_data: s.groups_with_data.clone(),
                repair: false,
            })
        })
        .collect();
    let mut commands = Vec::new();
    for (worker, _) in holders(&entry.placement) {
        commands.push(Command {
            worker: worker.clone(),
            request: Request::HostShuffle {
                app: app.clone(),
                secret: secret.clone(),
                shuffle: id,
                spec: entry.spec,
                placement: entry.placement.clone(),
                decided: Vec::new(),
            },
        });
        if !decisions.is_empty() {
            commands.push(Command {
                worker,
                request: Request::RecordDecisions { app: app.clone(), shuffle: id, decisions: decisions.clone() },
            });
        }
    }
    commands
}

fn map_out_of_range(app: &AppId, id: ShuffleId, map: MapId, maps: u32) -> ServiceError {
    ServiceError::new(
        ErrorKind::MapOutOfRange,
        format!("map {map} is out of range for shuffle {id} of app {app}, which has {maps} maps"),
    )
}

fn data_lost(app: &AppId, id: ShuffleId, map: MapId, attempt: AttemptId, group: u32) -> ServiceError {
    ServiceError::new(
        ErrorKind::DataLost,
        format!(
            "map {map} attempt {attempt} of shuffle {id} of app {app} cannot commit: every copy of group {group}, \
             which holds some of its blocks, was lost after it began; run the map again"
        ),
    )
}

/// The groups that must receive a re-run of `map` (its blocks there were lost).
fn repair_groups(placement: &Placement, map: MapId) -> Vec<u32> {
    placement.groups.iter().enumerate().filter(|(_, g)| g.lost_maps.contains(&map)).map(|(i, _)| i as u32).collect()
}

/// The groups worker `index` holds a copy of.
fn groups_of(placement: &Placement, index: u16) -> Vec<u32> {
    placement.groups.iter().enumerate().filter(|(_, g)| g.copies.contains(&index)).map(|(i, _)| i as u32).collect()
}

/// Every worker holding a copy of some group, with its groups.
fn holders(placement: &Placement) -> Vec<(String, Vec<u32>)> {
    let mut by_worker: BTreeMap<u16, Vec<u32>> = BTreeMap::new();
    for (g, group) in placement.groups.iter().enumerate() {
        for c in &group.copies {
            by_worker.entry(*c).or_default().push(g as u32);
        }
    }
    by_worker.into_iter().map(|(w, groups)| (placement.workers[usize::from(w)].id.clone(), groups)).collect()
}

#[cfg(test)]
mod tests {
    use shuffle_protocol::{HeldGroup, PartitionTotals};

    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn settings() -> Settings {
        Settings {
            heartbeat_interval: SECOND,
            worker_timeout: 10 * SECOND,
            app_timeout: 60 * SECOND,
            max_apps: 10,
            max_shuffles_per_app: 10,
        }
    }

    fn report(i: u8) -> WorkerReport {
        WorkerReport {
            endpoint: WorkerEndpoint { id: format!("w{i}"), addr: ([127, 0, 0, i + 2], 7000).into() },
            memory_budget: 1 << 30,
            memory_used: 0,
            disk_total: 100 << 30,
            disk_free: 50 << 30,
            disk_reserve: 1 << 30,
            active_readers: 0,
            decommissioning: false,
        }
    }

    /// A coordinator with `n` live workers and one app; returns the app's generation.
    fn cluster(n: u8, now: Instant) -> (Coordinator, AppId, u64) {
        let mut c = Coordinator::new(settings(), now);
        for i in 0..n {
            assert!(c.register_worker(report(i), Vec::new(), now).is_empty());
        }
        let app = AppId::new("job").unwrap();
        let (_, generation) = c.open_app(&app, None, now).unwrap();
        (c, app, generation)
    }

    fn end(map: MapId, attempt: AttemptId, partitions: &[u32]) -> MapEnd {
        let partitions =
            partitions.iter().map(|&p| PartitionTotals { partition: p, blocks: 1, records: 10, checksum: p }).collect();
        MapEnd { map, attempt, partitions }
    }

    fn commit(c: &mut Coordinator, app: &AppId, g: u64, version: u64, e: &MapEnd) -> CommitStep {
        c.commit_map(app, g, ShuffleId(1), version, e).unwrap()
    }

    /// Commits through the record step, as the service does.
    fn commit_recorded(c: &mut Coordinator, app: &AppId, g: u64, e: &MapEnd) -> Vec<Command> {
        match commit(c, app, g, 1, e) {
            CommitStep::Record { commands, map, attempt } => {
                c.recorded(app, ShuffleId(1), map, attempt);
                commands
            }
            other => panic!("expected a record step, got {other:?}"),
        }
    }

    fn workers_of(commands: &[Command]) -> Vec<String> {
        let mut w: Vec<String> = commands.iter().map(|c| c.worker.clone()).collect();
        w.sort();
        w.dedup();
        w
    }

    #[test]
    fn a_shuffle_is_placed_on_live_workers_and_hosted_before_it_is_used() {
        let now = Instant::now();
        let (mut c, app, g) = cluster(3, now);
        c.heartbeat(WorkerReport { decommissioning: true, ..report(2) }, now).unwrap();
        let (placement, commands) =
            c.register_shuffle(&app, g, ShuffleId(1), ShuffleSpec::hash(4, 12).replicated(2)).unwrap();
        assert_eq!(placement.workers.iter().map(|w| w.id.as_str()).collect::<Vec<_>>().len(), 2, "not on w2");
        assert!(placement.workers.iter().all(|w| w.id != "w2"));
        placement.validate(12).unwrap();
        assert!(placement.groups.iter().all(|g| g.copies.len() == 2 && g.copies[0] != g.copies[1]));
        assert_eq!(workers_of(&commands), vec!["w0", "w1"]);
        assert!(commands.iter().all(|c| matches!(c.request, Request::HostShuffle { .. })));
        // Registering again with the same spec returns the same placement and hosts nothing new.
        let (again, none) = c.register_shuffle(&app, g, ShuffleId(1), ShuffleSpec::hash(4, 12).replicated(2)).unwrap();
        assert_eq!((again, none.len()), (placement, 0));
        let e = c.register_shuffle(&app, g, ShuffleId(1), ShuffleSpec::hash(4, 13)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::ShuffleExists);
    }

    #[test]
    fn the_first_attempt_to_commit_is_the_one_everywhere_and_others_wait_for_its_record() {
        let now = Instant::now();
        let (mut c, app, g) = cluster(3, now);
        c.register_shuffle(&app, g, ShuffleId(1), ShuffleSpec::hash(2, 6)).unwrap();
        let first = commit(&mut c, &app, g, 1, &end(0, 1, &[0, 1]));
        let CommitStep::Record { commands, .. } = first else { panic!("{first:?}") };
        // Recorded on every worker holding the shuffle, not only those the attempt wrote to.
        assert_eq!(workers_of(&commands), vec!["w0", "w1", "w2"]);
        // While it is being recorded, another attempt of the map waits.
        assert_eq!(commit(&mut c, &app, g, 1, &end(0, 0, &[2])), CommitStep::Wait);
        c.recorded(&app, ShuffleId(1), 0, 1);
        assert_eq!(
            commit(&mut c, &app, g, 1, &end(0, 0, &[2])),
            CommitStep::Done(CommitAnswer::Refused { committed_attempt: 1 })
        );
        assert_eq!(commit(&mut c, &app, g, 1, &end(0, 1, &[0, 1])), CommitStep::Done(CommitAnswer::Committed));
        assert_eq!(c.begin_map(&app, g, ShuffleId(1), 0).unwrap(), BeginAnswer::Refused { committed_attempt: 1 });
        assert_eq!(
            c.begin_map(&app, g, ShuffleId(1), 1).unwrap(),
            BeginAnswer::Plan(MapPlan::Push { placement_version: 1 })
        );
    }

    #[test]
    fn losing_one_copy_of_a_replicated_group_loses_nothing() {
        let now = Instant::now();
        let (mut c, app, g) = cluster(3, now);
        c.register_shuffle(&app, g, ShuffleId(1), ShuffleSpec::hash(2, 6).replicated(2)).unwrap();
        commit_recorded(&mut c, &app, g, &end(0, 0, &[0, 1, 2, 3, 4, 5]));
        let commands = c.lose_worker("w1");
        let placement = c.placement(&app, g, ShuffleId(1)).unwrap();
        assert_eq!(placement.version, 2);
        assert!(placement.groups.iter().all(|g| !g.copies.is_empty() && g.lost_maps.is_empty()));
        assert_eq!(workers_of(&commands), vec!["w0", "w2"], "the others learn the new placement");
        // A map that began before the loss still commits: its blocks have a live copy.
        assert!(matches!(commit(&mut c, &app, g, 1, &end(1, 0, &[0, 3])), CommitStep::Record { .. }));
    }

    #[test]
    fn a_lost_group_moves_and_names_exactly_the_maps_to_re_run() {
        let now = Instant::now();
        let (mut c, app, g) = cluster(3, now);
        let (placement, _) = c.register_shuffle(&app, g, ShuffleId(1), ShuffleSpec::hash(3, 3)).unwrap();
        let group_of_w1 =
            placement.groups.iter().position(|gr| placement.workers[gr.copies[0] as usize].id == "w1").unwrap();
        let partition_on_w1 =
            placement.partition_groups.iter().position(|&x| x as usize == group_of_w1).unwrap() as u32;
        let elsewhere = (0..3).find(|p| *p != partition_on_w1).unwrap();
        // Map 0 wrote to w1's group, map 1 did not; map 2 is still running.
        commit_recorded(&mut c, &app, g, &end(0, 0, &[partition_on_w1, elsewhere]));
        commit_recorded(&mut c, &app, g, &end(1, 0, &[elsewhere]));
        let commands = c.lose_worker("w1");
        let placement = c.placement(&app, g, ShuffleId(1)).unwrap();
        let moved = &placement.groups[group_of_w1];
        assert_eq!(moved.lost_maps, vec![0]);
        let host = placement.workers[moved.copies[0] as usize].id.clone();
        assert_ne!(host, "w1");
        // The new host learns map 1 is decided with nothing in this group; map 0 waits for its re-run.
        let hosting = commands.iter().find(|c| c.worker == host).unwrap();
        let Request::HostShuffle { decided, .. } = &hosting.request else { panic!() };
        assert_eq!(decided, &vec![(group_of_w1 as u32, 1, 0)]);
        // Map 2 began before the loss and wrote to the lost group: it must run again.
        let e = c.commit_map(&app, g, ShuffleId(1), 1, &end(2, 0, &[partition_on_w1])).unwrap_err();
        assert_eq!(e.kind, ErrorKind::DataLost);
        // The re-run of map 0 pushes to the lost group only, and its decision goes to that group's copy.
        let BeginAnswer::Plan(MapPlan::Repair { groups, placement_version }) =
            c.begin_map(&app, g, ShuffleId(1), 0).unwrap()
        else {
            panic!()
        };
        assert_eq!(groups, vec![group_of_w1 as u32]);
        let step = commit(&mut c, &app, g, placement_version, &end(0, 1, &[partition_on_w1]));
        let CommitStep::Record { commands, map, attempt } = step else { panic!("{step:?}") };
        assert_eq!(workers_of(&commands), vec![host]);
        c.recorded(&app, ShuffleId(1), map, attempt);
        assert!(c.placement(&app, g, ShuffleId(1)).unwrap().groups.iter().all(|g| g.lost_maps.is_empty()));
        assert_eq!(c.begin_map(&app, g, ShuffleId(1), 0).unwrap(), BeginAnswer::Refused { committed_attempt: 0 });
    }

    #[test]
    fn silent_workers_are_lost_after_the_time_out_and_suspects_sooner() {
        let now = Instant::now();
        let (mut c, _, _) = cluster(2, now);
        assert!(c.tick(now + 5 * SECOND).is_empty());
        c.heartbeat(report(0), now + 9 * SECOND).unwrap();
        c.tick(now + 10 * SECOND);
        assert_eq!(c.worker_state("w0"), Some(WorkerState::Live));
        assert_eq!(c.worker_state("w1"), Some(WorkerState::Lost));
        // A worker a client reports is lost at once if its heartbeats are late, not if they are fresh.
        c.suspect("w0", now + 10 * SECOND);
        assert_eq!(c.worker_state("w0"), Some(WorkerState::Live));
        c.suspect("w0", now + 12 * SECOND + SECOND / 2);
        assert_eq!(c.worker_state("w0"), Some(WorkerState::Lost));
        // Lost workers' heartbeats are refused: they must register again.
        assert_eq!(c.heartbeat(report(1), now + 13 * SECOND).unwrap_err().kind, ErrorKind::WrongRole);
    }

    #[test]
    fn a_restarted_coordinator_rebuilds_shuffles_and_decisions_from_its_workers() {
        let now = Instant::now();
        let (mut before, app, g) = cluster(2, now);
        let (placement, _) = before.register_shuffle(&app, g, ShuffleId(1), ShuffleSpec::hash(2, 4)).unwrap();
        commit_recorded(&mut before, &app, g, &end(0, 3, &[0, 1, 2, 3]));
        let secret = before.apps[&app].secret.clone();
        let held = |worker: &str| {
            let index = placement.index_of(worker).unwrap();
            let groups = placement
                .groups
                .iter()
                .enumerate()
                .filter(|(_, gr)| gr.copies.contains(&index))
                .map(|(i, _)| HeldGroup { group: i as u32, decided: vec![(0, 3)], maps_with_data: vec![0] })
                .collect();
            HeldShuffle {
                app: app.clone(),
                secret: secret.clone(),
                shuffle: ShuffleId(1),
                spec: ShuffleSpec::hash(2, 4),
                placement: placement.clone(),
                groups,
            }
        };
        let mut after = Coordinator::new(settings(), now);
        after.register_worker(report(0), vec![held("w0")], now);
        // Not every worker has reported: nothing is decided yet.
        let (_, g2) = after.open_app(&app, Some(&secret), now).unwrap();
        assert_eq!(after.begin_map(&app, g2, ShuffleId(1), 1).unwrap_err().kind, ErrorKind::Unavailable);
        let commands = after.register_worker(report(1), vec![held("w1")], now);
        assert!(
            commands
                .iter()
                .any(|c| matches!(&c.request, Request::RecordDecisions { decisions, .. } if decisions.len() == 1))
        );
        assert_eq!(
            after.commit_map(&app, g2, ShuffleId(1), 1, &end(0, 4, &[0])).unwrap(),
            CommitStep::Done(CommitAnswer::Refused { committed_attempt: 3 })
        );
        assert!(matches!(
            after.commit_map(&app, g2, ShuffleId(1), 1, &end(1, 0, &[1])).unwrap(),
            CommitStep::Record { .. }
        ));
        // Past the recovery window, shuffles nobody knows are dropped instead.
        let late = now + settings().worker_timeout * 3;
        let mut stranger = held("w0");
        stranger.shuffle = ShuffleId(9);
        let commands = after.register_worker(report(0), vec![stranger], late);
        assert!(commands.iter().any(|c| matches!(c.request, Request::DropShuffle { shuffle: ShuffleId(9), .. })));
    }

    #[test]
    fn a_worker_back_without_its_copies_counts_as_their_loss() {
        let now = Instant::now();
        let (mut c, app, g) = cluster(2, now);
        let (placement, _) = c.register_shuffle(&app, g, ShuffleId(1), ShuffleSpec::hash(1, 2)).unwrap();
        let on_w0 = placement.partition_groups[0];
        let p =
            (0..2).find(|p| placement.group_of(*p).unwrap().1.copies[0] == placement.index_of("w0").unwrap()).unwrap();
        commit_recorded(&mut c, &app, g, &end(0, 0, &[p]));
        // w0 crashed and restarted before the time-out, with nothing on disk.
        c.register_worker(report(0), Vec::new(), now + SECOND);
        let placement = c.placement(&app, g, ShuffleId(1)).unwrap();
        let _ = on_w0;
        let (_, group) = placement.group_of(p).unwrap();
        assert_eq!(group.lost_maps, vec![0]);
        assert_eq!(placement.workers[group.copies[0] as usize].id, "w1");
    }

    #[test]
    fn apps_are_bound_to_their_secret() {
        let now = Instant::now();
        let (mut c, app, _) = cluster(1, now);
        assert_eq!(c.open_app(&app, None, now).unwrap_err().kind, ErrorKind::AppExists);
        let wrong = AppSecret("00".repeat(32));
        let later = now + c.recovery_window();
        assert_eq!(c.open_app(&app, Some(&wrong), later).unwrap_err().kind, ErrorKind::UnknownApp);
        let stranger = AppId::new("stranger").unwrap();
        assert_eq!(c.open_app(&stranger, Some(&wrong), later).unwrap_err().kind, ErrorKind::UnknownApp);
        // Within the recovery window a secret that cannot be checked yet is
        // "retry", for a known app and an unknown one alike.
        assert_eq!(c.open_app(&app, Some(&wrong), now).unwrap_err().kind, ErrorKind::Unavailable);
        assert_eq!(c.open_app(&stranger, Some(&wrong), now).unwrap_err().kind, ErrorKind::Unavailable);
        let secret = c.apps[&app].secret.clone();
        let (_, g) = c.open_app(&app, Some(&secret), now).unwrap();
        // Idle apps expire, and their workers are told.
        c.register_shuffle(&app, g, ShuffleId(1), ShuffleSpec::hash(1, 1)).unwrap();
        c.close_app(&app, g, now);
        c.close_app(&app, g, now);
        let commands = c.reap_idle_apps(now + 61 * SECOND);
        assert!(commands.iter().any(|c| matches!(c.request, Request::DropApp { .. })));
        assert_eq!(c.placement(&app, g, ShuffleId(1)).unwrap_err().kind, ErrorKind::UnknownApp);
    }
}
