//! Exchange stages: the boundary where records leave one set of tasks and
//! reach another through the shuffle service.
//!
//! A [`Stage`] is one shuffle of a job: M map tasks each read their part of
//! the upstream dataset, encode every `(key, value)` record (keys with an
//! order-preserving encoding, so the service's bytewise key order is the
//! key type's `Ord`; values with postcard), choose its partition (a hash of
//! the key bytes, or a range of them for `sort_by_key`) and write it with a
//! `MapWriter`. The commit rule of the service makes a failed attempt's
//! partial output invisible, so the executor may simply run it again.
//!
//! In a streaming job a map task also writes control records into the
//! partitions (see [`crate::checkpoint::Control`]): checkpoint barriers,
//! cancellations, and its end. A control record has an empty key and a
//! value that starts with the creation time `u64::MAX`, which no record
//! has; readers take them out of the stream (`exchange_reader.rs`).

use std::{
    collections::hash_map::Entry,
    hash::Hash,
    sync::{Arc, OnceLock},
    time::Instant,
};

use serde::{Serialize, de::DeserializeOwned};
use shuffle_client::{CommitOutcome, ExchangeMode, MapWriter, ShuffleId, ShuffleSpec, SpillStrategy};

use crate::{
    Data, EngineError, ExecutionMode,
    checkpoint::Control,
    engine::EngineOptions,
    map::FastMap,
    task::{BoxFuture, Event, Item, OpenFn, TaskContext},
};

/// What a key must be: hashable for grouping, serializable for the wire.
pub trait Key: Data + Serialize + DeserializeOwned + Eq + Hash {}
impl<T: Data + Serialize + DeserializeOwned + Eq + Hash> Key for T {}

/// What a value crossing an exchange must be.
pub trait Value: Data + Serialize + DeserializeOwned {}
impl<T: Data + Serialize + DeserializeOwned> Value for T {}

/// How one exchange is laid out: its number of partitions R and, for batch
/// runs, the service's exchange mode (default: hash, or sort when keys must
/// be ordered or R is large). Streaming runs always use hybrid exchanges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub partitions: u32,
    pub mode: Option<ExchangeMode>,
}

impl Exchange {
    /// An exchange into `partitions` partitions with the default mode.
    pub fn partitions(partitions: u32) -> Self {
        Self { partitions: partitions.max(1), mode: None }
    }

    /// Overrides the batch exchange mode.
    pub fn mode(mut self, mode: ExchangeMode) -> Self {
        self.mode = Some(mode);
        self
    }
}

impl From<u32> for Exchange {
    fn from(partitions: u32) -> Self {
        Self::partitions(partitions)
    }
}

/// Runs one map task of a stage.
pub(crate) type MapTaskFn = Arc<dyn Fn(TaskContext) -> BoxFuture<'static, Result<(), EngineError>> + Send + Sync>;
/// Work a stage needs done before its shuffle is registered (sampling).
pub(crate) type PrepareFn = Arc<dyn Fn() -> BoxFuture<'static, Result<(), EngineError>> + Send + Sync>;
/// Merges two values of one key.
pub(crate) type CombineFn<V> = Arc<dyn Fn(V, V) -> V + Send + Sync>;

/// One exchange of a job.
pub(crate) struct Stage {
    /// Unique within the engine; the executor maps it to a fresh shuffle per run.
    pub id: u64,
    /// For logs and errors: the operator and its id.
    pub name: String,
    /// M: the parts of the upstream dataset.
    pub maps: u32,
    /// R.
    pub partitions: u32,
    /// The mode asked for on the exchange, if any (batch runs).
    pub mode: Option<ExchangeMode>,
    /// Whether readers want each partition in key order.
    pub key_ordering: bool,
    pub run_map: MapTaskFn,
    pub prepare: Option<PrepareFn>,
}

impl Stage {
    /// The shuffle this stage registers when a job runs in `mode`, with the
    /// engine's replication.
    pub(crate) fn spec(&self, mode: ExecutionMode, options: &EngineOptions) -> ShuffleSpec {
        let spec = match mode {
            ExecutionMode::Streaming => ShuffleSpec {
                spill_quota: options.spill_quota,
                ..ShuffleSpec::hybrid(self.maps, self.partitions, SpillStrategy::Selective)
            },
            ExecutionMode::Batch => {
                let sort = self.key_ordering || self.partitions > options.sort_above_partitions;
                match self.mode {
                    Some(ExchangeMode::Sort) => ShuffleSpec::sort(self.maps, self.partitions, self.key_ordering),
                    Some(ExchangeMode::Hash) => ShuffleSpec::hash(self.maps, self.partitions),
                    Some(ExchangeMode::Hybrid) => {
                        ShuffleSpec::hybrid(self.maps, self.partitions, SpillStrategy::Selective)
                    }
                    None if sort => ShuffleSpec::sort(self.maps, self.partitions, self.key_ordering),
                    None => ShuffleSpec::hash(self.maps, self.partitions),
                }
            }
        };
        spec.replicated(options.replication)
    }
}

/// Which partition a key's bytes go to.
#[derive(Clone)]
pub(crate) enum Partitioner {
    /// `xxhash64(key bytes) mod R`.
    Hash { partitions: u32 },
    /// Partition `r` holds keys between bounds `r-1` and `r`; filled by sampling before the stage runs.
    Range { bounds: Arc<OnceLock<RangeBounds>> },
}

impl Partitioner {
    pub(crate) fn partition(&self, key: &[u8]) -> u32 {
        match self {
            Self::Hash { partitions } => (xxhash_rust::xxh64::xxh64(key, 0) % u64::from(*partitions)) as u32,
            Self::Range { bounds } => bounds.get().map_or(0, |bounds| bounds.partition(key)),
        }
    }
}

/// The sorted encoded keys that split a range exchange's partitions, each
/// with its first 8 bytes as a number, so most comparisons with a key are
/// one integer comparison rather than a byte-string one.
#[derive(Debug, Default)]
pub(crate) struct RangeBounds {
    bounds: Vec<Vec<u8>>,
    /// `prefix(bound)` of every bound.
    prefixes: Vec<u64>,
}

/// The first 8 bytes of `bytes`, zero-padded, big-endian. Two byte strings
/// whose prefixes differ compare as their prefixes do (a string that ends
/// within them is padded with zeros, which no longer string's byte there
/// is below); equal prefixes say nothing, and the bytes decide.
fn prefix(bytes: &[u8]) -> u64 {
    let mut first = [0u8; 8];
    let n = bytes.len().min(8);
    first[..n].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(first)
}

impl RangeBounds {
    /// Bounds in ascending bytewise order.
    pub(crate) fn new(bounds: Vec<Vec<u8>>) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] <= w[1]), "range bounds are sorted");
        let prefixes = bounds.iter().map(|b| prefix(b)).collect();
        Self { bounds, prefixes }
    }

    /// The partition of `key`: the number of bounds at or below it.
    pub(crate) fn partition(&self, key: &[u8]) -> u32 {
        let key_prefix = prefix(key);
        let at_or_below = |i: usize| match self.prefixes[i].cmp(&key_prefix) {
            std::cmp::Ordering::Less => true,
            std::cmp::Ordering::Greater => false,
            std::cmp::Ordering::Equal => self.bounds[i].as_slice() <= key,
        };
        // Binary search for the first bound above the key.
        let (mut low, mut high) = (0, self.bounds.len());
        while low < high {
            let mid = low + (high - low) / 2;
            if at_or_below(mid) {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        low as u32
    }
}

/// Encodes a key so that bytewise order is the key type's order.
pub(crate) fn encode_key<K: Serialize>(key: &K, buf: &mut Vec<u8>) -> Result<(), EngineError> {
    buf.clear();
    let mut serializer = memcomparable::Serializer::new(&mut *buf);
    key.serialize(&mut serializer).map_err(|e| EngineError::Encode(e.to_string()))
}

/// The partition of `partitions` a hash exchange sends `key` to (keys are
/// encoded order-preserving, then hashed with xxhash64): lets a user
/// co-partition data outside the engine.
pub fn hash_partition<K: Serialize>(key: &K, partitions: u32) -> Result<u32, EngineError> {
    let mut buf = Vec::new();
    encode_key(key, &mut buf)?;
    Ok(Partitioner::Hash { partitions: partitions.max(1) }.partition(&buf))
}

/// Encodes a value, behind its creation time when the job streams.
pub(crate) fn encode_value<V: Serialize>(
    value: &V,
    created_us: Option<u64>,
    buf: &mut Vec<u8>,
) -> Result<(), EngineError> {
    buf.clear();
    if let Some(t) = created_us {
        buf.extend_from_slice(&t.to_le_bytes());
    }
    postcard::to_io(value, &mut *buf).map(|_| ()).map_err(|e| EngineError::Encode(e.to_string()))
}

/// Decodes a record written by [`encode_key`] and [`encode_value`].
pub(crate) fn decode_record<K: DeserializeOwned, V: DeserializeOwned>(
    key: &[u8],
    value: &[u8],
    timed: bool,
) -> Result<(K, V, Option<u64>), String> {
    let key = memcomparable::from_slice(key).map_err(|e| format!("key: {e}"))?;
    let (created, value) = if timed {
        let (t, rest) = value.split_first_chunk::<8>().ok_or("value shorter than its timestamp")?;
        (Some(u64::from_le_bytes(*t)), rest)
    } else {
        (None, value)
    };
    let value = postcard::from_bytes(value).map_err(|e| format!("value: {e}"))?;
    Ok((key, value, created))
}

/// A map-side combiner's entry: the combined value and its oldest creation time.
struct Combined<V> {
    value: Option<V>,
    created_us: u64,
}

/// Writes records to a map attempt's writer, encoding and partitioning them.
struct ExchangeOut {
    writer: MapWriter,
    partitioner: Partitioner,
    partitions: u32,
    timed: bool,
    key: Vec<u8>,
    value: Vec<u8>,
    /// Records and encoded bytes written since the last count.
    records: usize,
    bytes: usize,
}

impl ExchangeOut {
    async fn write<K: Serialize, V: Serialize>(&mut self, key: &K, event: &Event<V>) -> Result<(), EngineError> {
        encode_key(key, &mut self.key)?;
        encode_value(&event.value, self.timed.then_some(event.created_us), &mut self.value)?;
        let partition = self.partitioner.partition(&self.key);
        self.writer.write(partition, &self.key, &self.value).await?;
        self.records += 1;
        self.bytes += self.key.len() + self.value.len();
        Ok(())
    }

    /// Writes a control record to every partition, behind everything written before it.
    async fn control(&mut self, control: Control) -> Result<(), EngineError> {
        write_control(&mut self.writer, self.partitions, control).await
    }

    fn count(&mut self, stats: &crate::metrics::TaskStats) {
        stats.add_out(std::mem::take(&mut self.records), std::mem::take(&mut self.bytes));
    }
}

/// Writes `control` to every partition and pushes it (streaming exchanges only).
async fn write_control(writer: &mut MapWriter, partitions: u32, control: Control) -> Result<(), EngineError> {
    let value = control.encode();
    for partition in 0..partitions {
        writer.write(partition, &[], &value).await?;
    }
    writer.flush().await?;
    Ok(())
}

/// Ends a map attempt; a refusal means another attempt committed first.
async fn finish(writer: MapWriter, ctx: &TaskContext, shuffle: ShuffleId) -> Result<(), EngineError> {
    match writer.finish().await? {
        CommitOutcome::Committed => {}
        CommitOutcome::Refused { committed_attempt } => tracing::debug!(
            "map {} attempt {} of shuffle {} refused: attempt {committed_attempt} committed first",
            ctx.part,
            ctx.attempt,
            shuffle
        ),
    }
    Ok(())
}

/// The map task of an exchange: reads part `ctx.part` of `input`, combines
/// values per key if a combiner is given, and writes every record to the
/// stage's shuffle as attempt `ctx.attempt`. In a streaming job it passes
/// checkpoint barriers (and cancellations) on to every partition, snapshots
/// its chain at each barrier, and marks its end in every partition.
pub(crate) fn map_task<K: Key, V: Value>(
    stage: u64,
    input: OpenFn<(K, V)>,
    partitioner: Partitioner,
    combiner: Option<CombineFn<V>>,
) -> MapTaskFn {
    Arc::new(move |ctx: TaskContext| {
        let (input, partitioner, combiner) = (input.clone(), partitioner.clone(), combiner.clone());
        Box::pin(async move {
            let shuffle = ctx.shuffle(stage);
            let streaming = ctx.mode == ExecutionMode::Streaming;
            let mut records = input(&ctx)?;
            let writer = ctx.client.writer(shuffle.id, ctx.part, ctx.attempt).await?;
            let partitions = shuffle.spec.partitions;
            let mut out = ExchangeOut {
                writer,
                partitioner,
                partitions,
                timed: streaming,
                key: Vec::new(),
                value: Vec::new(),
                records: 0,
                bytes: 0,
            };
            let mut table: FastMap<K, Combined<V>> = FastMap::default();
            let mut last_push = Instant::now();
            while let Some(item) = records.next().await? {
                let batch = match item {
                    Item::Batch(batch) => batch,
                    Item::Barrier(id) => {
                        out.control(Control::Barrier(id)).await?;
                        last_push = Instant::now();
                        snapshot_chain(&ctx, &mut *records, id, None)?;
                        continue;
                    }
                    Item::Cancel(id) => {
                        out.control(Control::Cancel(id)).await?;
                        if let Some(checkpoints) = &ctx.checkpoints {
                            checkpoints.decline(id, "cancelled upstream".into());
                        }
                        continue;
                    }
                };
                match &combiner {
                    None => {
                        for event in batch {
                            let (key, value) = event.value;
                            out.write(&key, &Event { value, created_us: event.created_us }).await?;
                        }
                    }
                    Some(combine) => {
                        for event in batch {
                            let (key, value) = event.value;
                            match table.entry(key) {
                                Entry::Occupied(mut slot) => {
                                    let slot = slot.get_mut();
                                    let old = slot.value.take().expect("a combined value is always present");
                                    slot.value = Some(combine(old, value));
                                    slot.created_us = slot.created_us.min(event.created_us);
                                }
                                Entry::Vacant(slot) => {
                                    slot.insert(Combined { value: Some(value), created_us: event.created_us });
                                }
                            }
                        }
                        // Streaming: combine within a batch only, so nothing waits
                        // (and a barrier never finds the table holding records).
                        if streaming || table.len() >= ctx.options.combine_entries {
                            drain(&mut table, &mut out).await?;
                        }
                    }
                }
                out.count(&ctx.stats);
                if streaming && last_push.elapsed() >= ctx.options.linger {
                    out.writer.flush().await?;
                    last_push = Instant::now();
                }
            }
            drain(&mut table, &mut out).await?;
            out.count(&ctx.stats);
            if streaming {
                out.control(Control::End).await?;
            }
            finish(out.writer, &ctx, shuffle.id).await?;
            if let Some(checkpoints) = &ctx.checkpoints {
                checkpoints.finished();
            }
            Ok(())
        })
    })
}

/// A map task restored as finished (it had ended before the checkpoint the
/// job restarted from): its output is in the restored state downstream, so
/// it writes only its end to every partition.
pub(crate) async fn finished_map_task(ctx: &TaskContext, stage: u64) -> Result<(), EngineError> {
    let shuffle = ctx.shuffle(stage);
    let mut writer = ctx.client.writer(shuffle.id, ctx.part, ctx.attempt).await?;
    write_control(&mut writer, shuffle.spec.partitions, Control::End).await?;
    finish(writer, ctx, shuffle.id).await?;
    if let Some(checkpoints) = &ctx.checkpoints {
        checkpoints.finished();
    }
    Ok(())
}

/// Snapshots a task's chain (and, for a result task, its sink's state) for
/// checkpoint `id` and hands it to the backend; the task goes on while it
/// is written.
pub(crate) fn snapshot_chain<T>(
    ctx: &TaskContext,
    chain: &mut dyn crate::task::Input<T>,
    id: u64,
    sink_state: Option<Vec<u8>>,
) -> Result<(), EngineError> {
    let Some(checkpoints) = &ctx.checkpoints else { return Ok(()) };
    let started = Instant::now();
    let mut snapshot = crate::state::Snapshot::default();
    chain.snapshot(&mut snapshot)?;
    if let Some(state) = sink_state {
        snapshot.section(crate::sink::SINK_OPERATOR).bytes(state);
    }
    checkpoints.persist(id, snapshot, started.elapsed());
    Ok(())
}

async fn drain<K: Key, V: Value>(
    table: &mut FastMap<K, Combined<V>>,
    out: &mut ExchangeOut,
) -> Result<(), EngineError> {
    for (key, combined) in table.drain() {
        let value = combined.value.expect("a combined value is always present");
        out.write(&key, &Event { value, created_us: combined.created_us }).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_encoding_preserves_order() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for (x, y) in [(1u64, 2u64), (255, 256), (0, u64::MAX)] {
            encode_key(&x, &mut a).unwrap();
            encode_key(&y, &mut b).unwrap();
            assert!(a < b, "{x} < {y}");
        }
        for (x, y) in [("a", "b"), ("ab", "abc"), ("abcdefgh", "abcdefghi"), ("", "a")] {
            encode_key(&x.to_string(), &mut a).unwrap();
            encode_key(&y.to_string(), &mut b).unwrap();
            assert!(a < b, "{x:?} < {y:?}");
        }
        for (x, y) in [(-5i64, 3i64), (i64::MIN, -1)] {
            encode_key(&x, &mut a).unwrap();
            encode_key(&y, &mut b).unwrap();
            assert!(a < b, "{x} < {y}");
        }
    }

    #[test]
    fn records_round_trip_with_and_without_timestamps() {
        let (mut k, mut v) = (Vec::new(), Vec::new());
        encode_key(&("word".to_string(), 7u32), &mut k).unwrap();
        encode_value(&vec![1i64, -2, 3], Some(42), &mut v).unwrap();
        let (key, value, t) = decode_record::<(String, u32), Vec<i64>>(&k, &v, true).unwrap();
        assert_eq!((key, value, t), (("word".to_string(), 7), vec![1, -2, 3], Some(42)));
        encode_value(&9u8, None, &mut v).unwrap();
        assert_eq!(decode_record::<(String, u32), u8>(&k, &v, false).unwrap().1, 9);
        assert!(decode_record::<u64, u8>(&k, &[], true).is_err());
    }

    #[test]
    fn range_partitions_follow_the_bounds() {
        let bounds = Arc::new(OnceLock::new());
        bounds.set(RangeBounds::new(vec![vec![10], vec![20]])).unwrap();
        let p = Partitioner::Range { bounds };
        assert_eq!([p.partition(&[5]), p.partition(&[10]), p.partition(&[15]), p.partition(&[25])], [0, 1, 1, 2]);
        let unset = Partitioner::Range { bounds: Arc::new(OnceLock::new()) };
        assert_eq!(unset.partition(&[25]), 0);
    }

    /// Short keys over few byte values, so prefixes tie and strings end inside them.
    fn short_key() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        proptest::collection::vec(proptest::sample::select(vec![0u8, 1, 7, 255]), 0..12)
    }

    proptest::proptest! {
        #[test]
        fn range_partitions_by_prefix_equal_a_bytewise_search(
            mut bounds in proptest::collection::vec(short_key(), 0..20),
            keys in proptest::collection::vec(short_key(), 1..50),
        ) {
            bounds.sort();
            let range = RangeBounds::new(bounds.clone());
            for key in &keys {
                let bytewise = bounds.partition_point(|b| b.as_slice() <= key.as_slice()) as u32;
                proptest::prop_assert_eq!(range.partition(key), bytewise, "key {:?}", key);
            }
        }
    }
}
