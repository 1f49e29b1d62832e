//! Control messages: what a client asks ([`Request`]) and what the server
//! answers ([`Response`]), encoded with postcard inside request and response
//! frames. Block payloads never pass through here.
//!
//! Each request runs on its own bidirectional stream:
//!
//! - `Hello` is the first stream of a connection; nothing else is served
//!   before it succeeds. It binds the connection to an app: without a
//!   secret it creates the app and the `Welcome` carries the app's new
//!   secret; with the secret it joins the existing app (see [`AppSecret`]).
//! - `RegisterShuffle`, `UnregisterShuffle`, `UnregisterApp`: one request, one
//!   `Ok` or `Error`.
//! - `OpenPush`: answered by `PushAccepted`; then the client sends block
//!   frames and one `MapEnd` request, and the server answers `Committed`,
//!   `AttemptRefused` or `Error`.
//! - `OpenPartition`: answered by `PartitionOpened`, then block frames and a
//!   closing `PartitionEnd` (or an `Error` at any point).
//!
//! In a cluster (DESIGN.md, "Cluster") clients register shuffles, begin and
//! commit maps at the coordinator, and push and read at workers; a map's
//! `MapEnd` at a worker answers `Prepared`, and the coordinator's decision,
//! recorded on every worker of the shuffle, commits it. Workers register
//! with the coordinator (`RegisterWorker`, then `Heartbeat`s), which sends
//! them commands on streams it opens on the same connection; primaries
//! forward blocks to replicas over `PeerHello` connections.
//! - `OpenPartitionByKey` on a key-ordered sort shuffle: `PartitionOpened`,
//!   `RunIndex`, then for each `ReadRun` the client sends, that chunk's
//!   blocks and a `RunChunkEnd`; the stream ends when the client ends its side.

use serde::{Deserialize, Serialize};

use crate::{
    AppId, AttemptId, Codec, MapId, PartitionId, PartitionTotals, ProtocolError, ShuffleId,
    cluster::{HeldShuffle, MapDecision, MapPlan, Placement, ResumePoint, ServerRole, WorkerReport},
};

/// Version of this message set; a server refuses a `Hello` with another.
pub const PROTOCOL_VERSION: u16 = 5;

/// Most map tasks of one shuffle, 200,000: above the largest Spark jobs'
/// map counts seen in practice, and small enough that a `PartitionEnd`
/// naming every map (at most [`MAX_MAP_COMMIT_LEN`] bytes each, 7 MiB in
/// all) fits in one frame of [`crate::MAX_FRAME_LEN`].
pub const MAX_MAPS: u32 = 200_000;

/// Most partitions of one shuffle, 200,000: sort mode is meant for R in the
/// thousands to tens of thousands; a `MapEnd` naming every partition (at
/// most [`MAX_PARTITION_TOTALS_LEN`] bytes each, 6 MiB) fits in one frame.
pub const MAX_PARTITIONS: u32 = 200_000;

/// Largest postcard encoding of one [`MapCommit`]: six varints (two u32
/// ids, three u32 fields and a u64) of at most 5, 5, 5, 5, 10 and 5 bytes.
pub const MAX_MAP_COMMIT_LEN: usize = 35;

/// Largest postcard encoding of one [`PartitionTotals`]: 5 + 5 + 10 + 5 bytes.
pub const MAX_PARTITION_TOTALS_LEN: usize = 25;

/// Bytes of an app secret before hex encoding: 256 bits from the OS's
/// random source, so guessing one is hopeless.
pub const APP_SECRET_BYTES: usize = 32;

/// The secret that binds connections to an app, as 64 lowercase hex digits.
///
/// The server generates it when the app is created (the first `Hello` for
/// the app's name, presented without a secret) and returns it in `Welcome`;
/// every later connection for the app presents it. The client library keeps
/// it for its user and hands it to the connections and processes it spawns.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSecret(pub String);

impl AppSecret {
    /// Whether it has the shape the server generates (64 hex digits).
    pub fn is_well_formed(&self) -> bool {
        self.0.len() == 2 * APP_SECRET_BYTES && self.0.bytes().all(|b| b.is_ascii_hexdigit())
    }
}

impl std::fmt::Debug for AppSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppSecret(..)") // never printed into logs
    }
}

/// How a shuffle's data is laid out and exchanged (DESIGN.md, "The three exchange modes").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExchangeMode {
    /// Push-merge into one file per partition; readers start when all maps committed.
    Hash,
    /// Map-partition layout: one file per map attempt, written run by run by
    /// writers that sort by partition (and key), with a region index per file.
    Sort,
    /// Pipelined with spill: readers receive blocks as they arrive, from
    /// memory while they keep up and from disk when they fall behind.
    Hybrid,
}

/// How a hybrid shuffle uses the disk (DESIGN.md, "Hybrid").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum SpillStrategy {
    /// Spill only under memory pressure; a consumed block is freed at once, so
    /// a partition can be read once (a failed consumer needs its producers re-run).
    #[default]
    Selective,
    /// Every block is also written to disk in order, so any reader can read a
    /// partition again from the start.
    Full,
}

/// What a client declares when it registers a shuffle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShuffleSpec {
    /// Number of map tasks, M.
    pub maps: u32,
    /// Number of partitions, R.
    pub partitions: u32,
    /// Exchange mode.
    pub mode: ExchangeMode,
    /// Codec writers should use for blocks (a block may still be stored raw).
    pub codec: Codec,
    /// Sort mode only: writers sort each run by key (bytewise) as well as by
    /// partition, and readers merge the runs so records come out in key order.
    pub key_ordering: bool,
    /// Hybrid mode only: how the shuffle uses the disk.
    pub spill: SpillStrategy,
    /// Hybrid mode only: most bytes the shuffle may write to disk (`None`:
    /// no limit but the disk reserve). When memory and quota are both used
    /// up, the server stops reading from producers until readers catch up.
    pub spill_quota: Option<u64>,
    /// Copies of every block: 1, or 2 (a cluster only: on two workers, so
    /// that losing either loses nothing).
    pub replication: u8,
}

impl ShuffleSpec {
    /// A hash shuffle of `maps` × `partitions` with lz4 blocks.
    pub fn hash(maps: u32, partitions: u32) -> Self {
        Self {
            maps,
            partitions,
            mode: ExchangeMode::Hash,
            codec: Codec::Lz4,
            key_ordering: false,
            spill: SpillStrategy::Selective,
            spill_quota: None,
            replication: 1,
        }
    }

    /// The same spec with `copies` copies of every block.
    pub fn replicated(self, copies: u8) -> Self {
        Self { replication: copies, ..self }
    }

    /// A hybrid shuffle of `maps` × `partitions` with lz4 blocks and the given spill strategy.
    /// A hybrid shuffle whose producers never end is unbounded: its readers stay open.
    pub fn hybrid(maps: u32, partitions: u32, spill: SpillStrategy) -> Self {
        Self { mode: ExchangeMode::Hybrid, spill, ..Self::hash(maps, partitions) }
    }

    /// A sort shuffle of `maps` × `partitions` with lz4 blocks, ordered by key if asked.
    pub fn sort(maps: u32, partitions: u32, key_ordering: bool) -> Self {
        Self { mode: ExchangeMode::Sort, key_ordering, ..Self::hash(maps, partitions) }
    }

    /// Checks the spec against the limits of this protocol version, which
    /// keep every message about the shuffle within one frame.
    pub fn validate(&self) -> Result<(), String> {
        if self.key_ordering && self.mode != ExchangeMode::Sort {
            return Err(format!("key ordering needs sort mode, not {:?}", self.mode));
        }
        if !(1..=2).contains(&self.replication) {
            return Err(format!("replication = {} is not 1 or 2", self.replication));
        }
        for (what, n, max) in [("maps", self.maps, MAX_MAPS), ("partitions", self.partitions, MAX_PARTITIONS)] {
            if n == 0 || n > max {
                return Err(format!("{what} = {n} is outside 1..={max}"));
            }
        }
        Ok(())
    }
}

/// The end of a map attempt: what it wrote to each partition it wrote to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapEnd {
    /// The map task.
    pub map: MapId,
    /// Its attempt.
    pub attempt: AttemptId,
    /// Totals of every partition this attempt wrote at least one block to, by ascending partition.
    pub partitions: Vec<PartitionTotals>,
}

/// A request from client to server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Binds the connection to `app`, presenting the server's admission token
    /// if it has one. Without `secret` the app is created (its name must be
    /// free) and `Welcome` returns its new secret; with it, the connection
    /// joins the existing app.
    Hello { protocol_version: u16, app: AppId, secret: Option<AppSecret>, auth_token: Option<String> },
    /// Registers a shuffle of the connection's app; idempotent for an equal spec.
    RegisterShuffle { shuffle: ShuffleId, spec: ShuffleSpec },
    /// Removes a shuffle with its memory and files.
    UnregisterShuffle { shuffle: ShuffleId },
    /// Removes every shuffle of the connection's app, and the app itself.
    UnregisterApp,
    /// Starts pushing the blocks of one map attempt on this stream.
    OpenPush { shuffle: ShuffleId, map: MapId, attempt: AttemptId },
    /// Ends the map attempt pushing on this stream.
    MapEnd(MapEnd),
    /// Reads one partition on this stream.
    OpenPartition { shuffle: ShuffleId, partition: PartitionId },
    /// Reads one partition on this Unix-socket stream, taking blocks that
    /// lie in files as the open files themselves (`FileOpened`, with the
    /// descriptor passed beside the frame) and the ranges to read from them
    /// (`FileRange`); blocks in memory come as block frames.
    OpenPartitionDirect { shuffle: ShuffleId, partition: PartitionId },
    /// A worker joins the cluster: the first request of its connection to
    /// the coordinator, with the cluster secret and what it holds.
    RegisterWorker { protocol_version: u16, cluster_secret: String, report: WorkerReport, shuffles: Vec<HeldShuffle> },
    /// A registered worker is alive, and this is its state.
    Heartbeat(WorkerReport),
    /// Coordinator to worker: hold your copies of this shuffle's groups per
    /// this placement (new, or a newer version). `decided` lists, for a
    /// group new to the worker, maps already decided that have no blocks in it.
    HostShuffle {
        app: AppId,
        secret: AppSecret,
        shuffle: ShuffleId,
        spec: ShuffleSpec,
        placement: Placement,
        decided: Vec<(u32, MapId, AttemptId)>,
    },
    /// Coordinator to worker: these maps are decided; commit them.
    RecordDecisions { app: AppId, shuffle: ShuffleId, decisions: Vec<MapDecision> },
    /// Coordinator to worker: remove this shuffle with its files.
    DropShuffle { app: AppId, shuffle: ShuffleId },
    /// Coordinator to worker: remove this app and all its shuffles.
    DropApp { app: AppId },
    /// Client to coordinator: where the shuffle's partitions live.
    GetPlacement { shuffle: ShuffleId },
    /// Client to coordinator: an attempt of a map is about to push.
    BeginMap { shuffle: ShuffleId, map: MapId, attempt: AttemptId },
    /// Client to coordinator: an attempt pushed everything and every worker
    /// it pushed to answered `Prepared`; decide the map.
    CommitMap { shuffle: ShuffleId, placement_version: u64, end: MapEnd },
    /// Client to coordinator: this worker did not answer, or is slow to
    /// accept a connection; check it now. Answered by `WorkerChecked`.
    ReportUnreachable { worker: String },
    /// Client to worker: the primary of some partitions was lost; push
    /// their blocks here, the replica, which keeps what it already has.
    OpenFailoverPush { shuffle: ShuffleId, map: MapId, attempt: AttemptId },
    /// Worker to worker: the first request of a connection between workers.
    PeerHello { protocol_version: u16, cluster_secret: String, worker: String },
    /// Primary to replica: the blocks of one map attempt, forwarded.
    ReplicaPush { app: AppId, shuffle: ShuffleId, map: MapId, attempt: AttemptId },
    /// Reads one partition, skipping the blocks a reader already has (it
    /// read them from the other copy); `direct` as `OpenPartitionDirect`.
    OpenPartitionFrom { shuffle: ShuffleId, partition: PartitionId, direct: bool, resume: Vec<ResumePoint> },
    /// Reads one partition in key order. For a sort shuffle with key
    /// ordering the server answers `PartitionOpened`, then (once every map
    /// has committed) `RunIndex`, and then serves `ReadRun` requests the
    /// reader sends on the same stream, one chunk of one run each, until the
    /// reader ends its side: the reader merges the runs holding a bounded
    /// amount of each. For any other shuffle it is `OpenPartition`, or
    /// `OpenPartitionDirect` when `direct` is set.
    OpenPartitionByKey { shuffle: ShuffleId, partition: PartitionId, direct: bool },
    /// On an `OpenPartitionByKey` stream: the blocks of run `run` (its
    /// position in the `RunIndex`) from its block `from` on, about
    /// `max_bytes` of them (at least one block; the server may send fewer).
    ReadRun { run: u32, from: u32, max_bytes: u32 },
}

/// One sorted run of one committed map attempt within the partition being
/// read: its blocks are `first_block..first_block + blocks` of the
/// attempt's blocks for the partition, in sequence order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The map task.
    pub map: MapId,
    /// Its committed attempt.
    pub attempt: AttemptId,
    /// The writer's run number.
    pub run: u32,
    /// Sequence number of the run's first block in this partition.
    pub first_block: u32,
    /// Number of blocks of the run in this partition.
    pub blocks: u32,
}

/// The committed attempt of one map, and what it wrote to the partition being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapCommit {
    /// The map task.
    pub map: MapId,
    /// Its committed attempt.
    pub attempt: AttemptId,
    /// What that attempt declared for this partition (zero blocks if it wrote none).
    pub totals: PartitionTotals,
}

/// What went wrong, as a category a program can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Bytes that are not a valid frame, message or block.
    Malformed,
    /// A frame larger than the maximum frame size.
    FrameTooLarge,
    /// A message that is valid but not expected at this point of the stream.
    UnexpectedMessage,
    /// The client speaks another protocol version.
    ProtocolVersion,
    /// The connection did not present the server's auth token.
    Unauthenticated,
    /// No app of that name is known to this connection: it does not exist,
    /// was unregistered or expired, or the secret presented is not its secret.
    UnknownApp,
    /// No such shuffle in this app.
    UnknownShuffle,
    /// A shuffle id registered again with a different spec.
    ShuffleExists,
    /// A spec outside the server's limits.
    InvalidSpec,
    /// A partition id not below the shuffle's partition count.
    PartitionOutOfRange,
    /// A map id not below the shuffle's map count.
    MapOutOfRange,
    /// A write to a shuffle whose maps have all committed.
    ShuffleSealed,
    /// A second `MapEnd` for an attempt that already ended.
    DuplicateMapEnd,
    /// A hybrid producer failed after some of its blocks were read (see `Response::ProducerFailed`).
    ProducerFailed,
    /// A selective hybrid partition was already consumed and cannot be read again.
    AlreadyConsumed,
    /// Blocks for an attempt of a map that another attempt already committed.
    AttemptSuperseded,
    /// Blocks out of sequence, or totals that do not match what was received.
    IntegrityMismatch,
    /// The disk (or its reserve) is full.
    DiskFull,
    /// Any other I/O failure on the server.
    Io,
    /// The server is shutting down and takes no new work.
    ShuttingDown,
    /// The server has no room for another connection or stream.
    Busy,
    /// A `Hello` without a secret asked to create an app whose name is taken.
    AppExists,
    /// A named limit of the server (apps, shuffles per app, table memory) would be exceeded.
    LimitExceeded,
    /// A request this server's role does not serve (a shuffle registered at
    /// a worker instead of the coordinator, a cluster request to a standalone server).
    WrongRole,
    /// The cluster cannot serve the request now (the coordinator is
    /// rebuilding its state, no live worker); retry.
    Unavailable,
    /// Blocks the request depends on were lost with a worker (a map
    /// attempt's blocks, before its commit): re-run the attempt.
    DataLost,
}

/// An error sent back to the client that caused it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceError {
    /// The category.
    pub kind: ErrorKind,
    /// A sentence naming the cause and the ids involved.
    pub message: String,
}

impl ServiceError {
    /// An error of `kind` described by `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl From<ProtocolError> for ServiceError {
    fn from(e: ProtocolError) -> Self {
        let kind = match e {
            ProtocolError::FrameTooLarge { .. } => ErrorKind::FrameTooLarge,
            ProtocolError::BlockChecksum { .. } => ErrorKind::IntegrityMismatch,
            _ => ErrorKind::Malformed,
        };
        Self::new(kind, e.to_string())
    }
}

/// A response from server to client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The request succeeded and has nothing to return.
    Ok,
    /// The `Hello` succeeded: the connection is bound to its app.
    Welcome {
        /// The server's software version.
        server_version: String,
        /// The app's secret (new if this `Hello` created the app).
        app_secret: AppSecret,
        /// Identifies this server process; a client that finds the server's
        /// Unix socket checks it answers with the same id.
        server_id: String,
        /// The server's Unix socket, for clients on the same host.
        unix_socket: Option<String>,
        /// What the server is: a client that reached a coordinator pushes
        /// and reads at the workers of each shuffle's placement.
        role: ServerRole,
    },
    /// The push may begin; the shuffle has this spec.
    PushAccepted { spec: ShuffleSpec },
    /// This attempt is the map's committed attempt.
    Committed { map: MapId, attempt: AttemptId },
    /// Another attempt of the map committed first; this one's blocks are discarded.
    AttemptRefused { map: MapId, attempt: AttemptId, committed_attempt: AttemptId },
    /// A partition read is open: its blocks follow (once the maps have committed).
    PartitionOpened { spec: ShuffleSpec },
    /// Hybrid mode: an attempt whose blocks this reader received failed (or
    /// lost to another attempt). With `SpillStrategy::Full` the reader may
    /// open the partition again from the start and the failed attempt's blocks
    /// are left out; with `Selective` the producers must be re-run. Ends the stream.
    ProducerFailed { map: MapId, attempt: AttemptId, rereadable: bool },
    /// All blocks of the partition were sent; here is what each map committed to it.
    PartitionEnd { partition: PartitionId, maps: Vec<MapCommit> },
    /// Direct reads: the file descriptor sent beside this frame is file `file` of this read.
    FileOpened { file: u32 },
    /// Direct reads: the next `blocks` blocks lie back to back in file `file`,
    /// `len` bytes at `offset`; the reader reads and checks them itself.
    FileRange { file: u32, offset: u64, len: u64, blocks: u32 },
    /// Where a shuffle's partitions live.
    Placed(Placement),
    /// How a map attempt pushes (`BeginMap`).
    Plan(MapPlan),
    /// A worker holds every block of a map attempt for its partitions, and
    /// so does the replica; the coordinator's decision will commit it.
    Prepared { map: MapId, attempt: AttemptId },
    /// On a replicated push stream: the first `blocks` blocks sent are held
    /// by both copies; the writer may forget them.
    Acked { blocks: u64 },
    /// A partition's blocks of these maps were lost with every copy; the
    /// maps must be re-run. Ends the read.
    PartitionLost { partition: PartitionId, maps: Vec<MapId> },
    /// The worker is registered; heartbeat at this interval.
    WorkerRegistered { heartbeat_interval_ms: u64 },
    /// The map was already decided otherwise on this worker.
    Conflict { map: MapId, attempt: AttemptId },
    /// The worker at the other end of a `PeerHello`, and its Unix socket
    /// if it listens on one: a peer on the same host forwards there.
    PeerWelcome { worker: String, unix_socket: Option<String> },
    /// The request failed.
    Error(ServiceError),
    /// Key-ordered reads: the partition's runs, ordered by map and run
    /// (the order that breaks ties between equal keys), and what each map
    /// committed to the partition.
    RunIndex { runs: Vec<RunInfo>, maps: Vec<MapCommit> },
    /// Key-ordered reads: the chunk of run `run` asked for is complete; it
    /// held `blocks` blocks.
    RunChunkEnd { run: u32, blocks: u32 },
    /// Direct reads: file `file` of this read was deleted and no more of
    /// its blocks will be served; the reader closes its descriptor.
    FileClosed { file: u32 },
    /// Coordinator to client, answering `ReportUnreachable`: whether the
    /// worker is lost now (it was, or its heartbeats were late too and the
    /// report made it so), or still live (it heartbeats: only slow).
    WorkerChecked { worker: String, lost: bool },
}

impl Request {
    /// Encodes for a request frame.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("requests always serialize")
    }

    /// Decodes a request frame's payload.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        postcard::from_bytes(bytes)
            .map_err(|e| ProtocolError::MalformedMessage { what: "request", reason: e.to_string() })
    }
}

impl Response {
    /// Encodes for a response frame.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("responses always serialize")
    }

    /// Decodes a response frame's payload.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        postcard::from_bytes(bytes)
            .map_err(|e| ProtocolError::MalformedMessage { what: "response", reason: e.to_string() })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn totals() -> impl Strategy<Value = PartitionTotals> {
        (any::<u32>(), any::<u32>(), any::<u64>(), any::<u32>())
            .prop_map(|(partition, blocks, records, checksum)| PartitionTotals { partition, blocks, records, checksum })
    }

    fn spec() -> impl Strategy<Value = ShuffleSpec> {
        (any::<u32>(), any::<u32>(), any::<bool>(), any::<bool>()).prop_map(|(maps, partitions, lz4, sort)| {
            ShuffleSpec {
                maps,
                partitions,
                mode: if sort { ExchangeMode::Sort } else { ExchangeMode::Hybrid },
                codec: if lz4 { Codec::Lz4 } else { Codec::None },
                key_ordering: sort && lz4,
                spill: if lz4 { SpillStrategy::Full } else { SpillStrategy::Selective },
                spill_quota: if sort { None } else { Some(u64::from(maps)) },
                replication: if lz4 { 2 } else { 1 },
            }
        })
    }

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            (
                "[a-z0-9][a-z0-9_.-]{0,63}",
                any::<u16>(),
                proptest::option::of("[0-9a-f]{64}"),
                proptest::option::of(".{0,40}")
            )
                .prop_map(|(app, v, secret, t)| Request::Hello {
                    protocol_version: v,
                    app: AppId::new(app).unwrap(),
                    secret: secret.map(AppSecret),
                    auth_token: t
                }),
            (any::<u32>(), spec()).prop_map(|(s, spec)| Request::RegisterShuffle { shuffle: ShuffleId(s), spec }),
            any::<u32>().prop_map(|s| Request::UnregisterShuffle { shuffle: ShuffleId(s) }),
            Just(Request::UnregisterApp),
            (any::<u32>(), any::<u32>(), any::<u32>())
                .prop_map(|(s, map, attempt)| { Request::OpenPush { shuffle: ShuffleId(s), map, attempt } }),
            (any::<u32>(), any::<u32>(), proptest::collection::vec(totals(), 0..20))
                .prop_map(|(map, attempt, partitions)| Request::MapEnd(MapEnd { map, attempt, partitions })),
            (any::<u32>(), any::<u32>())
                .prop_map(|(s, partition)| Request::OpenPartition { shuffle: ShuffleId(s), partition }),
            (any::<u32>(), any::<u32>())
                .prop_map(|(s, partition)| Request::OpenPartitionDirect { shuffle: ShuffleId(s), partition }),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(s, map, attempt)| Request::BeginMap {
                shuffle: ShuffleId(s),
                map,
                attempt
            }),
            (any::<u32>(), any::<u64>(), any::<u32>(), proptest::collection::vec(totals(), 0..5)).prop_map(
                |(s, v, map, partitions)| Request::CommitMap {
                    shuffle: ShuffleId(s),
                    placement_version: v,
                    end: MapEnd { map, attempt: 0, partitions }
                }
            ),
            (any::<u32>(), any::<u32>(), any::<bool>(), proptest::collection::vec((any::<u32>(), any::<u32>()), 0..5))
                .prop_map(|(s, partition, direct, points)| Request::OpenPartitionFrom {
                    shuffle: ShuffleId(s),
                    partition,
                    direct,
                    resume: points.into_iter().map(|(map, blocks)| ResumePoint { map, attempt: 1, blocks }).collect(),
                }),
            (any::<u32>(), proptest::collection::vec((any::<u32>(), any::<u32>(), any::<bool>()), 0..5)).prop_map(
                |(s, ds)| Request::RecordDecisions {
                    app: AppId::new("a").unwrap(),
                    shuffle: ShuffleId(s),
                    decisions: ds
                        .into_iter()
                        .map(|(map, attempt, two)| MapDecision {
                            map,
                            attempt,
                            groups_with_data: if two { vec![0, map] } else { vec![] },
                            repair: two
                        })
                        .collect(),
                }
            ),
            (any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(s, partition, direct)| {
                Request::OpenPartitionByKey { shuffle: ShuffleId(s), partition, direct }
            }),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(run, from, max_bytes)| Request::ReadRun {
                run,
                from,
                max_bytes
            }),
        ]
    }

    fn run_info() -> impl Strategy<Value = RunInfo> {
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>())
            .prop_map(|(map, attempt, run, first_block, blocks)| RunInfo { map, attempt, run, first_block, blocks })
    }

    fn map_commit() -> impl Strategy<Value = MapCommit> {
        (any::<u32>(), any::<u32>(), totals()).prop_map(|(map, attempt, totals)| MapCommit { map, attempt, totals })
    }

    fn response() -> impl Strategy<Value = Response> {
        prop_oneof![
            Just(Response::Ok),
            (".{0,20}", "[0-9a-f]{64}", proptest::option::of("/[a-z/]{0,30}")).prop_map(|(v, secret, socket)| {
                Response::Welcome {
                    server_version: v,
                    app_secret: AppSecret(secret),
                    server_id: "id".into(),
                    unix_socket: socket,
                    role: ServerRole::Worker,
                }
            }),
            spec().prop_map(|spec| Response::PushAccepted { spec }),
            spec().prop_map(|spec| Response::PartitionOpened { spec }),
            (any::<u32>(), any::<u32>(), any::<bool>())
                .prop_map(|(map, attempt, rereadable)| Response::ProducerFailed { map, attempt, rereadable }),
            (any::<u32>(), any::<u32>()).prop_map(|(map, attempt)| Response::Committed { map, attempt }),
            (any::<u32>(), any::<u32>(), any::<u32>())
                .prop_map(|(map, attempt, c)| { Response::AttemptRefused { map, attempt, committed_attempt: c } }),
            (any::<u32>(), proptest::collection::vec(map_commit(), 0..10))
                .prop_map(|(partition, maps)| Response::PartitionEnd { partition, maps }),
            ".{0,80}".prop_map(|m| Response::Error(ServiceError::new(ErrorKind::UnknownShuffle, m))),
            any::<u32>().prop_map(|file| Response::FileOpened { file }),
            any::<u32>().prop_map(|file| Response::FileClosed { file }),
            ("w[0-9]{1,3}", any::<bool>()).prop_map(|(worker, lost)| Response::WorkerChecked { worker, lost }),
            (any::<u32>(), any::<u64>(), any::<u64>(), any::<u32>())
                .prop_map(|(file, offset, len, blocks)| Response::FileRange { file, offset, len, blocks }),
            any::<u64>().prop_map(|blocks| Response::Acked { blocks }),
            (any::<u32>(), proptest::collection::vec(any::<u32>(), 0..10))
                .prop_map(|(partition, maps)| Response::PartitionLost { partition, maps }),
            (any::<u64>(), proptest::collection::vec(any::<u32>(), 0..4))
                .prop_map(|(v, groups)| Response::Plan(MapPlan::Repair { placement_version: v, groups })),
            (proptest::collection::vec(run_info(), 0..10), proptest::collection::vec(map_commit(), 0..10))
                .prop_map(|(runs, maps)| Response::RunIndex { runs, maps }),
            (any::<u32>(), any::<u32>()).prop_map(|(run, blocks)| Response::RunChunkEnd { run, blocks }),
        ]
    }

    #[test]
    fn the_largest_messages_the_limits_allow_fit_in_one_frame() {
        let worst_totals =
            PartitionTotals { partition: u32::MAX, blocks: u32::MAX, records: u64::MAX, checksum: u32::MAX };
        let commit = MapCommit { map: u32::MAX, attempt: u32::MAX, totals: worst_totals };
        assert_eq!(postcard::to_stdvec(&commit).unwrap().len(), MAX_MAP_COMMIT_LEN);
        assert_eq!(postcard::to_stdvec(&worst_totals).unwrap().len(), MAX_PARTITION_TOTALS_LEN);
        let end = Response::PartitionEnd { partition: u32::MAX, maps: vec![commit; MAX_MAPS as usize] };
        assert!(end.encode().len() <= crate::MAX_FRAME_LEN);
        let map_end = Request::MapEnd(MapEnd {
            map: u32::MAX,
            attempt: u32::MAX,
            partitions: vec![worst_totals; MAX_PARTITIONS as usize],
        });
        assert!(map_end.encode().len() <= crate::MAX_FRAME_LEN);
        assert!(ShuffleSpec::hash(MAX_MAPS + 1, 1).validate().is_err());
        assert!(ShuffleSpec::hash(1, MAX_PARTITIONS + 1).validate().is_err());
        assert!(ShuffleSpec::hash(MAX_MAPS, MAX_PARTITIONS).validate().is_ok());
    }

    #[test]
    fn secrets_are_never_printed() {
        let secret = AppSecret("ab".repeat(32));
        assert!(secret.is_well_formed());
        assert!(!format!("{secret:?}").contains("abab"));
        assert!(!AppSecret("xyz".into()).is_well_formed());
    }

    proptest! {
        #[test]
        fn requests_round_trip(req in request()) {
            prop_assert_eq!(Request::decode(&req.encode()).unwrap(), req);
        }

        #[test]
        fn responses_round_trip(resp in response()) {
            prop_assert_eq!(Response::decode(&resp.encode()).unwrap(), resp);
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_message_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = Request::decode(&bytes);
            let _ = Response::decode(&bytes);
        }
    }
}
