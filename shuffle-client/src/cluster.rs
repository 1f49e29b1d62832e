//! A client of a cluster (DESIGN.md, "Cluster"): it knows only the
//! coordinator's address. Registering a shuffle returns its placement;
//! writers push each partition's blocks to its group's primary and commit
//! at the coordinator once every worker they pushed to has verified the
//! attempt (`Prepared`); readers (key-ordered ones too) read a partition
//! from either copy of its group and move to the other one, where they
//! were, when a copy fails.
//!
//! With replication 2 a writer keeps each block until both copies hold it
//! (`Acked`, bounded by [`crate::ClientOptions::replication_window`]); when
//! a primary is lost it sends those blocks to the replica (which drops the
//! ones it already has) and carries on there, so no map runs again. With
//! replication 1 a lost worker fails the attempts pushing to it (`DataLost`
//! at commit) and readers get [`ClientError::PartitionLost`] naming the
//! maps to run again.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use shuffle_protocol::{
    AttemptId, ErrorKind, MapEnd, MapId, MapPlan, PartitionId, PartitionTotals, Placement, Request, Response,
    ResumePoint, ShuffleId, ShuffleSpec, WorkerEndpoint,
};
use tokio::sync::mpsc;

use crate::{
    ClientError, MapWriter, PartitionReader, ShuffleClient,
    transport::{FrameReader, SendError, StreamSend, request_frame},
    writer::CommitOutcome,
};

/// Pause between attempts to reach a coordinator that is away.
const COORDINATOR_RETRY: Duration = Duration::from_millis(250);

/// Pause between looks at the placement while waiting for a worker's loss to be declared.
const PLACEMENT_POLL: Duration = Duration::from_millis(250);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a cluster client keeps besides its coordinator link.
pub(crate) struct ClusterState {
    /// The coordinator's address, to reconnect when it restarts.
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    /// The coordinator connection now.
    coordinator: tokio::sync::Mutex<quinn::Connection>,
    /// Placements as last seen, by shuffle.
    placements: Mutex<HashMap<ShuffleId, Arc<Placement>>>,
    /// Clients of the workers, by worker id.
    /// One client per worker, connected on first use. Each worker has its
    /// own cell, so connecting to one that is gone (which waits out the
    /// connect time-out) holds up no one who uses the others.
    workers: std::sync::Mutex<HashMap<String, Arc<tokio::sync::OnceCell<ShuffleClient>>>>,
    /// Workers a connect failed to reach, and when: others asking within
    /// [`UNREACHABLE_FOR`] fail at once instead of each waiting out the
    /// connect time-out in turn.
    unreachable: std::sync::Mutex<HashMap<String, Instant>>,
    /// Clients made for each worker, by worker id: more than one means the
    /// client dropped a connection to the worker (or lost it) and connected again.
    connects: std::sync::Mutex<HashMap<String, u64>>,
}

impl ClusterState {
    pub fn new(addr: SocketAddr, endpoint: quinn::Endpoint, coordinator: quinn::Connection) -> Self {
        Self {
            addr,
            endpoint,
            coordinator: tokio::sync::Mutex::new(coordinator),
            placements: Mutex::new(HashMap::new()),
            workers: std::sync::Mutex::new(HashMap::new()),
            unreachable: std::sync::Mutex::new(HashMap::new()),
            connects: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// How many connections this client made to `worker`.
    pub fn connects(&self, worker: &str) -> u64 {
        lock(&self.connects).get(worker).copied().unwrap_or(0)
    }

    /// Closes the workers' clients and the coordinator connection now (a
    /// connection made when the coordinator restarted is not among the
    /// client's links, and left open it would keep the endpoint from ever
    /// going idle).
    pub async fn close(&self) {
        let workers: Vec<ShuffleClient> = lock(&self.workers).drain().filter_map(|(_, c)| c.get().cloned()).collect();
        for w in workers {
            Box::pin(w.close()).await;
        }
        self.coordinator.lock().await.close(0u32.into(), b"client closed");
    }
}

fn cluster(client: &ShuffleClient) -> &Arc<ClusterState> {
    client.cluster().expect("only cluster clients get here")
}

/// Whether a coordinator request may succeed if tried again later: the
/// coordinator is away, restarting, or rebuilding its state.
fn coordinator_away(e: &ClientError) -> bool {
    e.is_unreachable()
        || matches!(e.service_kind(), Some(ErrorKind::Unavailable | ErrorKind::UnknownApp | ErrorKind::ShuttingDown))
}

/// One request to the coordinator, retried (reconnecting) while the
/// coordinator is away, up to [`crate::ClientOptions::coordinator_wait`].
pub(crate) async fn coordinator_call(client: &ShuffleClient, request: &Request) -> Result<Response, ClientError> {
    let state = cluster(client);
    let deadline = Instant::now() + client.options().coordinator_wait;
    loop {
        let connection = state.coordinator.lock().await.clone();
        let result = async {
            let (send, recv) = connection.open_bi().await?;
            let mut send = StreamSend::Quic(send);
            match send.write_chunks(&mut [request_frame(request)?]).await {
                Ok(()) | Err(SendError::Stopped) => {}
                Err(SendError::Lost(e)) => return Err(e),
            }
            send.finish();
            FrameReader::new(crate::transport::StreamRecv::Quic(recv)).response().await
        }
        .await;
        match result {
            Err(e) if coordinator_away(&e) && Instant::now() < deadline => {
                tracing::debug!(error = %e, "the coordinator is away; retrying");
                tokio::time::sleep(COORDINATOR_RETRY).await;
                if connection.close_reason().is_some() {
                    reconnect(client, state, &connection).await;
                }
            }
            other => return other,
        }
    }
}

/// Replaces a closed coordinator connection (the coordinator restarted).
async fn reconnect(client: &ShuffleClient, state: &ClusterState, closed: &quinn::Connection) {
    let mut current = state.coordinator.lock().await;
    if current.stable_id() != closed.stable_id() {
        return; // someone else reconnected already
    }
    let app = client.app().clone();
    let secret = Some(client.credentials().secret.clone());
    match crate::client::open_connection(&state.endpoint, state.addr, client.options(), &app, secret).await {
        Ok((connection, _)) => {
            tracing::info!(coordinator = %state.addr, "reconnected to the coordinator");
            *current = connection;
        }
        Err(e) => tracing::debug!(error = %e, "the coordinator is still away"),
    }
}

/// Registers a shuffle at the coordinator and keeps its placement.
pub(crate) async fn register(client: &ShuffleClient, shuffle: ShuffleId, spec: ShuffleSpec) -> Result<(), ClientError> {
    match coordinator_call(client, &Request::RegisterShuffle { shuffle, spec }).await? {
        Response::Placed(placement) => {
            keep_placement(client, shuffle, placement, spec.partitions)?;
            Ok(())
        }
        other => Err(ClientError::Protocol(format!("expected Placed, got {other:?}"))),
    }
}

fn keep_placement(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    placement: Placement,
    partitions: u32,
) -> Result<Arc<Placement>, ClientError> {
    placement
        .validate(partitions)
        .map_err(|why| ClientError::Protocol(format!("placement of shuffle {shuffle}: {why}")))?;
    let placement = Arc::new(placement);
    lock(&cluster(client).placements).insert(shuffle, placement.clone());
    Ok(placement)
}

/// The placement of `shuffle`: the one kept, or the coordinator's now.
pub(crate) async fn placement(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    refresh: bool,
) -> Result<Arc<Placement>, ClientError> {
    if !refresh && let Some(p) = lock(&cluster(client).placements).get(&shuffle).cloned() {
        return Ok(p);
    }
    match coordinator_call(client, &Request::GetPlacement { shuffle }).await? {
        Response::Placed(placement) => {
            let partitions = placement.partition_groups.len() as u32;
            keep_placement(client, shuffle, placement, partitions)
        }
        other => Err(ClientError::Protocol(format!("expected Placed, got {other:?}"))),
    }
}

/// The client of one worker (connected on first use, with this client's app).
/// How long a worker that could not be reached is taken as unreachable
/// without trying again (about one connect time-out).
const UNREACHABLE_FOR: Duration = Duration::from_secs(10);

async fn worker_client(client: &ShuffleClient, worker: &WorkerEndpoint) -> Result<ShuffleClient, ClientError> {
    let state = cluster(client);
    let cell = {
        let mut workers = lock(&state.workers);
        // A worker restarted (a rolling restart) closed the connection this
        // client kept: connect again rather than fail on the old one.
        if workers.get(&worker.id).and_then(|c| c.get()).is_some_and(ShuffleClient::is_closed) {
            workers.remove(&worker.id);
        }
        workers.entry(worker.id.clone()).or_default().clone()
    };
    let connected = cell
        .get_or_try_init(|| async {
            let failed = lock(&state.unreachable).get(&worker.id).map(Instant::elapsed);
            if let Some(ago) = failed.filter(|ago| *ago < UNREACHABLE_FOR) {
                return Err(ClientError::ConnectionLost(format!(
                    "worker {} at {} could not be reached {ago:.1?} ago",
                    worker.id, worker.addr
                )));
            }
            let mut options = client.options().clone();
            options.app = client.credentials().app.clone();
            options.secret = Some(client.credentials().secret.clone());
            let connected = connect_worker(client, worker, options).await;
            match &connected {
                Ok(_) => {
                    lock(&state.unreachable).remove(&worker.id);
                    *lock(&state.connects).entry(worker.id.clone()).or_default() += 1;
                }
                Err(e) if e.is_unreachable() => {
                    lock(&state.unreachable).insert(worker.id.clone(), Instant::now());
                }
                Err(_) => {}
            }
            connected
        })
        .await?;
    Ok(connected.clone())
}

/// How long connecting to a worker (QUIC handshake and `Hello`) may take
/// before the client asks the coordinator whether the worker is lost, and
/// then the pause between asks and the most an ask may take. On a data
/// centre network a live worker answers within milliseconds; a second is
/// long past that and short against the 10 s connect time-out.
const SLOW_CONNECT: Duration = Duration::from_secs(1);

/// Connects to a worker. While connecting is slow, reports the worker to
/// the coordinator about every [`SLOW_CONNECT`] or two, and gives up once
/// the coordinator answers that it is lost (its heartbeats are late too and
/// its registration link is still open, or it was lost before): a worker
/// that died before this client reached it costs what the coordinator needs
/// to see it dead, not the whole connect time-out; one that heartbeats is
/// waited for up to the time-out.
async fn connect_worker(
    client: &ShuffleClient,
    worker: &WorkerEndpoint,
    options: crate::ClientOptions,
) -> Result<ShuffleClient, ClientError> {
    let connect = ShuffleClient::connect_to(worker.addr, options, false);
    let lost = async {
        loop {
            tokio::time::sleep(SLOW_CONNECT).await;
            let report = Request::ReportUnreachable { worker: worker.id.clone() };
            match tokio::time::timeout(SLOW_CONNECT, coordinator_call(client, &report)).await {
                Ok(Ok(Response::WorkerChecked { lost: true, .. })) => return,
                Ok(Ok(_)) => tracing::debug!(worker = %worker.id, "slow to connect; the coordinator says it is live"),
                Ok(Err(e)) => {
                    tracing::debug!(worker = %worker.id, error = %e, "slow to connect; asking the coordinator failed")
                }
                Err(_) => tracing::debug!(worker = %worker.id, "slow to connect; the coordinator is slow to answer"),
            }
        }
    };
    tokio::select! {
        biased;
        connected = connect => connected,
        () = lost => Err(ClientError::ConnectionLost(format!(
            "worker {} at {} did not accept a connection and the coordinator declared it lost",
            worker.id, worker.addr
        ))),
    }
}

/// Forgets a worker's client (it failed), and tells the coordinator.
async fn worker_failed(client: &ShuffleClient, worker: &str) {
    let removed = lock(&cluster(client).workers).remove(worker);
    if let Some(w) = removed.and_then(|c| c.get().cloned()) {
        tokio::spawn(w.close());
    }
    let (client, worker) = (client.clone(), worker.to_string());
    tokio::spawn(async move {
        let _ = coordinator_call(&client, &Request::ReportUnreachable { worker }).await;
    });
}

// ---- writing ----

/// How long a writer waits for a worker's answer before it says so in the log.
const SLOW_ACK: Duration = Duration::from_secs(5);

/// Awaits `wait`, calling `slow` (which logs) every [`SLOW_ACK`] it takes.
async fn noting_slow<T>(wait: impl Future<Output = T>, slow: impl Fn()) -> T {
    tokio::pin!(wait);
    loop {
        tokio::select! {
            out = &mut wait => return out,
            () = tokio::time::sleep(SLOW_ACK) => slow(),
        }
    }
}

/// Opens a writer of `map` `attempt` that pushes to the workers of the placement.
pub(crate) async fn writer(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    map: MapId,
    attempt: AttemptId,
) -> Result<MapWriter, ClientError> {
    let plan = match coordinator_call(client, &Request::BeginMap { shuffle, map, attempt }).await? {
        Response::Plan(plan) => plan,
        Response::AttemptRefused { committed_attempt, .. } => {
            return Err(ClientError::Server(shuffle_protocol::ServiceError::new(
                ErrorKind::AttemptSuperseded,
                format!("map {map} of shuffle {shuffle} was committed by attempt {committed_attempt}"),
            )));
        }
        other => return Err(ClientError::Protocol(format!("expected Plan, got {other:?}"))),
    };
    let version = match &plan {
        MapPlan::Push { placement_version } | MapPlan::Repair { placement_version, .. } => *placement_version,
    };
    let mut placement = placement(client, shuffle, false).await?;
    if placement.version != version {
        placement = self::placement(client, shuffle, true).await?;
    }
    let mut spec = placement.spec;
    if client.options().same_host && !client.options().compress_same_host && all_on_this_host(&placement) {
        // In memory on this host, lz4 costs CPU and saves nothing.
        spec.codec = shuffle_protocol::Codec::None;
    }
    let sink = ClusterSink {
        client: client.clone(),
        shuffle,
        map,
        attempt,
        replicated: placement.spec.replication > 1,
        window: client.options().replication_window.max(1 << 20),
        repair: match &plan {
            MapPlan::Repair { groups, .. } => Some(groups.iter().copied().collect()),
            MapPlan::Push { .. } => None,
        },
        version,
        placement,
        routes: HashMap::new(),
        dests: HashMap::new(),
    };
    Ok(MapWriter::for_cluster(sink, (shuffle, map, attempt), spec, client.options(), client.pushed_counter()))
}

/// Whether every worker of the placement is on a loopback address (the
/// blocks then never leave this host).
fn all_on_this_host(placement: &Placement) -> bool {
    placement.workers.iter().all(|w| w.addr.ip().is_loopback())
}

/// Which stream a group's blocks go on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DestKey {
    worker: String,
    /// A failover push to a replica whose primary was lost.
    failover: bool,
}

/// Whether a push that failed with `e` moves to the other copy: the worker
/// is unreachable, no longer holds the shuffle, or (`Unavailable`) could
/// not reach its replica and cannot hold the blocks alone.
fn moves_to_replica(e: &ClientError) -> bool {
    e.is_unreachable() || e.is_copy_gone() || e.service_kind() == Some(ErrorKind::Unavailable)
}

/// One push stream of the attempt, to one worker.
struct Dest {
    send: StreamSend,
    /// The stream's responses, read by a task of their own.
    responses: mpsc::UnboundedReceiver<Result<Response, ClientError>>,
    /// Blocks sent and not yet held by both copies (replicated shuffles only).
    unacked: VecDeque<(u32, [Bytes; 2])>,
    unacked_bytes: usize,
    /// Blocks sent, and blocks both copies hold.
    sent: u64,
    acked: u64,
    /// The groups whose blocks this stream carried.
    groups: BTreeSet<u32>,
    /// Set once the worker answered `Prepared`.
    prepared: bool,
}

/// Where a cluster writer's blocks go: the push streams of one attempt.
pub(crate) struct ClusterSink {
    client: ShuffleClient,
    shuffle: ShuffleId,
    map: MapId,
    attempt: AttemptId,
    placement: Arc<Placement>,
    /// The placement version `BeginMap` answered, sent back at commit.
    version: u64,
    replicated: bool,
    /// Most unacknowledged bytes per stream.
    window: usize,
    /// A re-run after a loss: only these groups take blocks.
    repair: Option<BTreeSet<u32>>,
    /// Groups whose primary was lost, and where they go now.
    routes: HashMap<u32, DestKey>,
    dests: HashMap<DestKey, Dest>,
}

impl ClusterSink {
    /// The spec's partition count, for the writer.
    pub fn partitions(&self) -> u32 {
        self.placement.partition_groups.len() as u32
    }

    /// Whether blocks of `partition` are pushed (a repair pushes only to the lost groups).
    pub fn wants(&self, partition: PartitionId) -> bool {
        match (&self.repair, self.placement.group_of(partition)) {
            (Some(groups), Some((g, _))) => groups.contains(&g),
            (None, Some(_)) => true,
            (_, None) => false,
        }
    }

    fn group(&self, partition: PartitionId) -> Result<u32, ClientError> {
        self.placement.group_of(partition).map(|(g, _)| g).ok_or(ClientError::PartitionOutOfRange {
            shuffle: self.shuffle,
            partition,
            partitions: self.partitions(),
        })
    }

    /// The stream `group`'s blocks go on now.
    fn route(&self, group: u32) -> Result<DestKey, ClientError> {
        if let Some(key) = self.routes.get(&group) {
            return Ok(key.clone());
        }
        let g = &self.placement.groups[group as usize];
        let primary = g.copies.first().and_then(|c| self.placement.worker(*c)).ok_or_else(|| {
            ClientError::Server(shuffle_protocol::ServiceError::new(
                ErrorKind::DataLost,
                format!("group {group} of shuffle {} has no live copy to push to", self.shuffle),
            ))
        })?;
        Ok(DestKey { worker: primary.id.clone(), failover: false })
    }

    fn endpoint(&self, id: &str) -> Result<WorkerEndpoint, ClientError> {
        self.placement
            .workers
            .iter()
            .find(|w| w.id == id)
            .cloned()
            .ok_or_else(|| ClientError::Protocol(format!("worker {id} is not in the placement")))
    }

    async fn open(&mut self, key: &DestKey) -> Result<(), ClientError> {
        if self.dests.contains_key(key) {
            return Ok(());
        }
        let endpoint = self.endpoint(&key.worker)?;
        let worker = worker_client(&self.client, &endpoint).await?;
        let (shuffle, map, attempt) = (self.shuffle, self.map, self.attempt);
        let request = if key.failover {
            Request::OpenFailoverPush { shuffle, map, attempt }
        } else {
            Request::OpenPush { shuffle, map, attempt }
        };
        let (send, mut reader, _) = noting_slow(worker.open_push(&request), || {
            tracing::info!(shuffle = %self.shuffle, map = self.map, worker = %key.worker,
                "still waiting for the worker to accept a push stream");
        })
        .await?;
        let (tx, responses) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let response = reader.response().await;
                let last = !matches!(response, Ok(Response::Acked { .. }));
                if tx.send(response).is_err() || last {
                    return;
                }
            }
        });
        let dest = Dest {
            send,
            responses,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            sent: 0,
            acked: 0,
            groups: BTreeSet::new(),
            prepared: false,
        };
        self.dests.insert(key.clone(), dest);
        Ok(())
    }

    /// Pushes one block (its frame header and block header, then its payload).
    pub async fn send(&mut self, partition: PartitionId, chunks: [Bytes; 2]) -> Result<(), ClientError> {
        let group = self.group(partition)?;
        loop {
            let key = self.route(group)?;
            match self.send_to(&key, group, chunks.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if moves_to_replica(&e) => self.fail_over(&key, e).await?,
                Err(e) => return Err(e),
            }
        }
    }

    async fn send_to(&mut self, key: &DestKey, group: u32, chunks: [Bytes; 2]) -> Result<(), ClientError> {
        self.open(key).await?;
        let (replicated, window) = (self.replicated, self.window);
        let dest = self.dests.get_mut(key).expect("opened above");
        let mut out = chunks.clone();
        let (shuffle, map) = (self.shuffle, self.map);
        let written = noting_slow(dest.send.write_chunks(&mut out), || {
            tracing::info!(%shuffle, map, worker = %key.worker,
                "still waiting for the worker to take a block (flow control)");
        })
        .await;
        match written {
            Ok(()) => {}
            Err(SendError::Stopped) => {
                return Err(match dest.responses.recv().await {
                    Some(Err(e)) => e,
                    _ => ClientError::ConnectionLost("the worker stopped the push stream".into()),
                });
            }
            Err(SendError::Lost(e)) => return Err(e),
        }
        dest.sent += 1;
        dest.groups.insert(group);
        if replicated {
            dest.unacked_bytes += chunks[0].len() + chunks[1].len();
            dest.unacked.push_back((group, chunks));
            while let Ok(response) = dest.responses.try_recv() {
                dest.take(response)?;
            }
            while dest.unacked_bytes > window {
                let (sent, acked) = (dest.sent, dest.acked);
                let response = noting_slow(dest.responses.recv(), || {
                    tracing::info!(%shuffle, map, worker = %key.worker, sent, acked,
                        "still waiting for the worker to acknowledge blocks");
                })
                .await
                .unwrap_or_else(|| Err(ClientError::ConnectionLost("the push stream's responses ended".into())));
                dest.take(response)?;
            }
        }
        Ok(())
    }

    /// A stream's worker is unreachable, or answers that it no longer holds
    /// the shuffle (it was declared lost while cut off, and came back
    /// empty): with replication, its groups move to their replicas, which
    /// get the blocks not acknowledged yet. Only an unreachable worker is
    /// reported to the coordinator and its connection dropped.
    async fn fail_over(&mut self, key: &DestKey, cause: ClientError) -> Result<(), ClientError> {
        if cause.is_unreachable() {
            worker_failed(&self.client, &key.worker).await;
        } else {
            tracing::info!(shuffle = %self.shuffle, map = self.map, worker = %key.worker, error = %cause, "the worker no longer holds the shuffle");
        }
        if !self.replicated {
            if let Some(mut dest) = self.dests.remove(key) {
                dest.send.reset();
            }
            return Err(cause);
        }
        let (groups, unacked) = match self.dests.remove(key) {
            Some(mut dest) => {
                dest.send.reset();
                (dest.groups, dest.unacked)
            }
            // The worker was gone before its stream opened (a sort writer
            // first pushes when it spills): the groups it is primary of go
            // to their replicas from now on, with nothing to resend.
            None if !key.failover => {
                for group in 0..self.placement.groups.len() as u32 {
                    if self.routes.contains_key(&group) || !self.route(group).is_ok_and(|r| r.worker == key.worker) {
                        continue;
                    }
                    let g = &self.placement.groups[group as usize];
                    let Some(other) =
                        g.copies.iter().filter_map(|c| self.placement.worker(*c)).find(|w| w.id != key.worker)
                    else {
                        return Err(cause);
                    };
                    tracing::info!(shuffle = %self.shuffle, map = self.map, group, from = %key.worker, to = %other.id, "the primary is unreachable; pushing to the replica");
                    self.routes.insert(group, DestKey { worker: other.id.clone(), failover: true });
                }
                return Ok(());
            }
            None => return Err(cause),
        };
        for &group in &groups {
            let g = &self.placement.groups[group as usize];
            let other = g.copies.iter().filter_map(|c| self.placement.worker(*c)).find(|w| {
                w.id != key.worker && !(key.failover && self.routes.get(&group).is_some_and(|r| r.worker == w.id))
            });
            let Some(other) = other else {
                tracing::warn!(shuffle = %self.shuffle, group, worker = %key.worker, "no other copy to fail over to");
                return Err(cause);
            };
            tracing::info!(shuffle = %self.shuffle, map = self.map, group, from = %key.worker, to = %other.id, "failing over to the replica");
            let route = DestKey { worker: other.id.clone(), failover: true };
            // The replica's stream ends the attempt for this group even when
            // nothing is left to resend (its primary forwarded everything).
            self.open(&route).await?;
            self.dests.get_mut(&route).expect("opened above").groups.insert(group);
            self.routes.insert(group, route);
        }
        // The replica keeps what it has and drops what it already holds.
        for (group, chunks) in unacked {
            let route = self.route(group)?;
            Box::pin(self.send_to(&route, group, chunks)).await.map_err(|e| {
                tracing::warn!(error = %e, "the replica failed too");
                e
            })?;
        }
        Ok(())
    }

    /// Ends the attempt: `MapEnd` on every stream, `Prepared` from every
    /// worker, then the commit at the coordinator.
    pub async fn finish(
        &mut self,
        totals: &BTreeMap<PartitionId, PartitionTotals>,
    ) -> Result<CommitOutcome, ClientError> {
        while let Some(key) = self.dests.iter().find(|(_, d)| !d.prepared).map(|(k, _)| k.clone()) {
            let groups = self.dests[&key].groups.clone();
            let partitions: Vec<PartitionTotals> = totals
                .values()
                .filter(|t| self.placement.group_of(t.partition).is_some_and(|(g, _)| groups.contains(&g)))
                .copied()
                .collect();
            let end = Request::MapEnd(MapEnd { map: self.map, attempt: self.attempt, partitions });
            let dest = self.dests.get_mut(&key).expect("found above");
            let result = async {
                match dest.send.write_chunks(&mut [request_frame(&end)?]).await {
                    Ok(()) | Err(SendError::Stopped) => {}
                    Err(SendError::Lost(e)) => return Err(e),
                }
                dest.send.finish();
                loop {
                    let (sent, acked) = (dest.sent, dest.acked);
                    let response = noting_slow(dest.responses.recv(), || {
                        tracing::info!(worker = %key.worker, sent, acked, "still waiting for the worker to verify MapEnd");
                    })
                    .await;
                    match response {
                        Some(Ok(Response::Prepared { .. })) => return Ok(()),
                        Some(response) => dest.take(response)?,
                        None => {
                            return Err(ClientError::ConnectionLost("the push stream ended before Prepared".into()));
                        }
                    }
                }
            }
            .await;
            match result {
                Ok(()) => dest.prepared = true,
                Err(e) if moves_to_replica(&e) => self.fail_over(&key, e).await?,
                Err(e) => return Err(e),
            }
        }
        let partitions = totals.values().copied().collect();
        let end = MapEnd { map: self.map, attempt: self.attempt, partitions };
        let commit = Request::CommitMap { shuffle: self.shuffle, placement_version: self.version, end };
        match coordinator_call(&self.client, &commit).await? {
            Response::Committed { .. } => Ok(CommitOutcome::Committed),
            Response::AttemptRefused { committed_attempt, .. } => Ok(CommitOutcome::Refused { committed_attempt }),
            other => Err(ClientError::Protocol(format!("expected a commit decision, got {other:?}"))),
        }
    }

    /// Abandons the attempt's streams.
    pub fn abort(&mut self) {
        for dest in self.dests.values_mut() {
            if !dest.prepared {
                dest.send.reset();
            }
        }
        self.dests.clear();
    }
}

impl Dest {
    /// Takes one response that arrived on the stream.
    fn take(&mut self, response: Result<Response, ClientError>) -> Result<(), ClientError> {
        match response? {
            Response::Acked { blocks } => {
                while self.acked < blocks.min(self.sent) {
                    if let Some((_, chunks)) = self.unacked.pop_front() {
                        self.unacked_bytes -= chunks[0].len() + chunks[1].len();
                    }
                    self.acked += 1;
                }
                Ok(())
            }
            other => Err(ClientError::Protocol(format!("unexpected {other:?} on a push stream"))),
        }
    }
}

// ---- reading ----

/// Opens a reader of `partition` at a copy of its group, able to move to
/// the other copy where it was. A reader of a key-ordered sort shuffle
/// opens on its first call instead, which says whether it reads by key (as
/// a standalone server's reader does).
pub(crate) async fn reader(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    partition: PartitionId,
) -> Result<PartitionReader, ClientError> {
    let mut failover = Failover { client: client.clone(), shuffle, partition, current: None, tried: BTreeSet::new() };
    let spec = placement(client, shuffle, false).await?.spec;
    let stream = if spec.mode == shuffle_protocol::ExchangeMode::Sort && spec.key_ordering {
        None
    } else {
        Some(failover.open(Vec::new()).await?)
    };
    Ok(PartitionReader::with_failover(stream, Box::new(failover), shuffle, partition))
}

/// What a cluster reader asks a copy for.
enum CopyRead<'a> {
    /// The partition in arrival order, leaving out the blocks the reader
    /// already has (`OpenPartitionFrom`).
    From(&'a [ResumePoint]),
    /// The partition's runs, for a key-ordered merge (`OpenPartitionByKey`):
    /// the reader asks for each chunk by run and block, so it needs no resume
    /// point to go on at another copy.
    ByKey,
}

/// Finds a copy of a partition to read, and reopens the read there when the
/// one being read fails.
pub(crate) struct Failover {
    client: ShuffleClient,
    shuffle: ShuffleId,
    partition: PartitionId,
    /// The worker being read now.
    current: Option<String>,
    /// Workers that failed this reader.
    tried: BTreeSet<String>,
}

impl Failover {
    /// Opens (or reopens, skipping what `resume` says the reader has) the
    /// read at a copy that has not failed; waits for the coordinator to
    /// move the group when none is left.
    pub async fn open(&mut self, resume: Vec<ResumePoint>) -> Result<FrameReader, ClientError> {
        Ok(self.open_read(CopyRead::From(&resume)).await?.1)
    }

    /// As [`Failover::open`], a key-ordered read (`OpenPartitionByKey`);
    /// our side of the stream stays open for its `ReadRun`s.
    pub async fn open_by_key(&mut self) -> Result<(StreamSend, FrameReader), ClientError> {
        self.open_read(CopyRead::ByKey).await
    }

    /// The copy being read failed with `e`: it is not tried again by this
    /// reader, and reported to the coordinator only if the worker cannot be
    /// reached (a copy that lacks blocks, or no longer holds the shuffle,
    /// is on a live worker whose connection the client's other streams use).
    pub async fn failed(&mut self, e: &ClientError) {
        if let Some(failed) = self.current.take() {
            if e.is_unreachable() {
                worker_failed(&self.client, &failed).await;
            }
            self.tried.insert(failed);
        }
    }

    async fn open_read(&mut self, read: CopyRead<'_>) -> Result<(StreamSend, FrameReader), ClientError> {
        if let Some(failed) = self.current.take() {
            self.tried.insert(failed);
        }
        let deadline = Instant::now() + self.client.options().worker_loss_wait;
        let mut refresh = !self.tried.is_empty();
        loop {
            let placement = placement(&self.client, self.shuffle, refresh).await?;
            let (_, group) = placement.group_of(self.partition).ok_or(ClientError::PartitionOutOfRange {
                shuffle: self.shuffle,
                partition: self.partition,
                partitions: placement.partition_groups.len() as u32,
            })?;
            if !group.lost_maps.is_empty() {
                // Kept placements may be stale: believe a loss only when the coordinator says so now.
                if refresh {
                    return Err(ClientError::PartitionLost {
                        shuffle: self.shuffle,
                        partition: self.partition,
                        maps: group.lost_maps.clone(),
                    });
                }
                refresh = true;
                continue;
            }
            let copies: Vec<WorkerEndpoint> = group
                .copies
                .iter()
                .filter_map(|c| placement.worker(*c))
                .filter(|w| !self.tried.contains(&w.id))
                .cloned()
                .collect();
            for worker in copies {
                match self.open_at(&worker, &read).await {
                    Ok(stream) => {
                        self.current = Some(worker.id.clone());
                        return Ok(stream);
                    }
                    Err(e) if e.is_unreachable() => {
                        tracing::info!(worker = %worker.id, error = %e, "a copy cannot be read; trying another");
                        worker_failed(&self.client, &worker.id).await;
                        self.tried.insert(worker.id.clone());
                    }
                    Err(e) => return Err(e),
                }
            }
            if Instant::now() >= deadline {
                return Err(ClientError::ConnectionLost(format!(
                    "no copy of partition {} of shuffle {} can be read, and the coordinator did not move it within {:?}",
                    self.partition,
                    self.shuffle,
                    self.client.options().worker_loss_wait
                )));
            }
            // Wait for the coordinator to declare the worker lost and move the group.
            tokio::time::sleep(PLACEMENT_POLL).await;
            refresh = true;
            self.tried.retain(|w| group.copies.iter().filter_map(|c| placement.worker(*c)).any(|e| &e.id == w));
        }
    }

    async fn open_at(
        &self,
        worker: &WorkerEndpoint,
        read: &CopyRead<'_>,
    ) -> Result<(StreamSend, FrameReader), ClientError> {
        let client = worker_client(&self.client, worker).await?;
        let (shuffle, partition, direct) = (self.shuffle, self.partition, client.reads_directly());
        let request = match read {
            CopyRead::From(resume) => {
                Request::OpenPartitionFrom { shuffle, partition, direct, resume: resume.to_vec() }
            }
            CopyRead::ByKey => Request::OpenPartitionByKey { shuffle, partition, direct },
        };
        client.open_read(&request).await
    }

    /// The worker being read now.
    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// Whether a read that failed with `e` should move to another copy.
    pub fn should_fail_over(e: &ClientError) -> bool {
        e.is_unreachable() || e.is_copy_gone() || e.service_kind() == Some(ErrorKind::DataLost)
    }
}
