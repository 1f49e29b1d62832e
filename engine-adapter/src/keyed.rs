//! Keyed operators, each introducing one exchange: `reduce_by_key` (with
//! map-side combining), `partition_by_key`, `group_by_key`, `sort_by_key`
//! (range partitioning from a sample) and an inner `join` (`join.rs`).
//!
//! The reading side of each runs in the tasks of the next stage, within the
//! engine's memory budget:
//!
//! - `reduce_by_key`: batch keeps a table per partition and, when its
//!   reservation is full, sorts it into a run on disk and starts a new one;
//!   at the end it merges the runs, combining equal keys. Streaming emits
//!   the updated value of every key a block touched (an upsert stream); its
//!   table is the operator's state, in memory, and a table that outgrows
//!   its share of the budget fails the job with `StateTooLarge`.
//! - `group_by_key` and `sort_by_key` read a key-ordered sort exchange as a
//!   stream, merged by the client within a reservation; from any other
//!   exchange (a hash exchange, or streaming) they sort through an
//!   [`ExternalSorter`] that spills. Groups and records come out in key
//!   order. In streaming they emit when their (bounded) input ends.
//! - `partition_by_key` passes records on as they arrive.

use std::{
    collections::hash_map::Entry,
    sync::{Arc, OnceLock},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shuffle_client::{ClientError, ExchangeMode};
use shuffle_protocol::RecordIter;

use crate::{
    Data, Dataset, EngineError, ExecutionMode,
    exchange::{CombineFn, Exchange, Key, Partitioner, RangeBounds, Stage, Value, encode_key, encode_value, map_task},
    exchange_reader::{ExchangeReader, Raw, RecordDecoder},
    executor,
    map::FastMap,
    memory::Reservation,
    sink::ReservoirSink,
    sorter::{ExternalSorter, SortedStream, merge_runs},
    spill::{SpillRun, SpillWriter},
    state::Snapshot,
    task::{BATCH_RECORDS, Batch, BoxFuture, BoxInput, Event, Input, Item, TaskContext, into_batches, now_us},
};

/// Keys each map task samples per partition of a `sort_by_key` (as Spark's
/// range partitioner does, 20 per partition): enough that partitions come
/// out within a few percent of even for smooth key distributions.
const SAMPLES_PER_PARTITION: usize = 20;

/// Bytes a reduction's table accounts per key besides its key and value
/// encodings: the hash table's slot and the two values' in-memory layout.
fn entry_overhead<K, V>() -> usize {
    std::mem::size_of::<(K, Reduced<V>)>() + 16
}

/// A key's reduced value so far; `None` only while it is being combined.
#[derive(Serialize, Deserialize)]
struct Reduced<V> {
    value: Option<V>,
    /// The oldest creation time that contributed.
    created_us: u64,
}

/// The least a key-ordered read asks for: a block of each of four runs (a
/// partition written by four maps that never spilled). A partition with
/// more runs than its reservation holds blocks for is sorted here instead.
const MIN_MERGE_MEMORY: usize = 4 * shuffle_client::MERGE_BLOCK_BYTES;

/// The memory a key-ordered read may use, reserved from the engine's
/// budget: half of it shared equally by the batch task slots (the other
/// half stays for operators that spill, such as a sort falling back from a
/// merge that does not fit), between [`MIN_MERGE_MEMORY`] and the client's
/// default.
fn merge_reservation(ctx: &TaskContext) -> (Reservation, usize) {
    let mut reservation = ctx.reservation("key-ordered read", false);
    let want = (ctx.memory.budget() / 2 / ctx.options.batch_task_slots.max(1))
        .clamp(MIN_MERGE_MEMORY, shuffle_client::DEFAULT_MERGE_MEMORY.max(MIN_MERGE_MEMORY));
    // Refused: nothing (the read then sorts here, spilling, rather than
    // take the last of the budget from the operators that spill).
    let granted = if reservation.try_grow(want) { want } else { 0 };
    (reservation, granted)
}

/// A partition's records in key order: merged by the client from a
/// key-ordered sort exchange, or sorted here.
pub(crate) enum Sorted {
    Exchange {
        reader: Box<ExchangeReader>,
        _memory: Reservation,
        first: Option<(Bytes, Bytes)>,
        /// Records and bytes read and not yet counted in the task's metrics.
        uncounted: (usize, usize),
    },
    Local(SortedStream),
}

impl Sorted {
    /// The records of a key-ordered exchange as the client merges them; if
    /// its runs do not fit the reservation, sorted here instead.
    pub(crate) async fn from_exchange(mut reader: ExchangeReader, operator: &str) -> Result<Self, EngineError> {
        let (memory, bytes) = merge_reservation(&reader.ctx);
        reader.set_merge_memory(bytes);
        match reader.next_sorted().await {
            Ok(first) => Ok(Self::Exchange { reader: Box::new(reader), _memory: memory, first, uncounted: (0, 0) }),
            Err(e @ ClientError::MergeMemory { .. }) => {
                tracing::info!("{operator} in {}: {e}; sorting the partition here instead", reader.ctx.name);
                drop(memory);
                reader.reopen_unordered();
                let mut sorter = new_sorter(&reader.ctx, operator);
                while let Some(item) = reader.next_raw().await? {
                    if let Raw::Records(raw) = item {
                        push_all(&mut sorter, &raw, &reader)?;
                    }
                }
                Ok(Self::Local(sorter.finish()?))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) async fn next(&mut self) -> Result<Option<(Bytes, Bytes)>, EngineError> {
        match self {
            Self::Exchange { reader, first, uncounted, .. } => {
                let record = match first.take() {
                    Some(record) => Some(record),
                    None => reader.next_sorted().await?,
                };
                if let Some((k, v)) = &record {
                    uncounted.0 += 1;
                    uncounted.1 += k.len() + v.len();
                }
                if record.is_none() || uncounted.0 >= BATCH_RECORDS {
                    let (records, bytes) = std::mem::take(uncounted);
                    reader.ctx.stats.add_in(records, bytes);
                }
                Ok(record)
            }
            Self::Local(stream) => stream.next_record(),
        }
    }

    /// Reads up to `max` records in key order into `each`, in one call (the
    /// task's metrics counted once); fewer than `max` means the partition
    /// ended.
    pub(crate) async fn next_batch(
        &mut self,
        max: usize,
        mut each: impl FnMut(&[u8], &[u8]) -> Result<(), EngineError>,
    ) -> Result<usize, EngineError> {
        let mut read = 0;
        match self {
            Self::Exchange { reader, first, uncounted, .. } => {
                let (mut records, mut bytes) = std::mem::take(uncounted);
                if max > 0
                    && let Some((k, v)) = first.take()
                {
                    each(&k, &v)?;
                    (read, records, bytes) = (1, records + 1, bytes + k.len() + v.len());
                }
                while read < max {
                    let Some((k, v)) = reader.next_sorted().await? else { break };
                    each(&k, &v)?;
                    (read, records, bytes) = (read + 1, records + 1, bytes + k.len() + v.len());
                }
                reader.ctx.stats.add_in(records, bytes);
            }
            Self::Local(stream) => {
                while read < max {
                    let Some((k, v)) = stream.next_record()? else { break };
                    each(&k, &v)?;
                    read += 1;
                }
            }
        }
        Ok(read)
    }
}

/// A sorter of the task's records for `operator`.
pub(crate) fn new_sorter(ctx: &TaskContext, operator: &str) -> ExternalSorter {
    ExternalSorter::new(ctx.reservation(operator, true), ctx.spill_dir.to_path_buf(), ctx.stats.spilled.clone())
}

/// Pushes framed records into a sorter.
pub(crate) fn push_all(sorter: &mut ExternalSorter, raw: &[u8], from: &ExchangeReader) -> Result<(), EngineError> {
    for record in RecordIter::new(raw) {
        let (k, v) = record.map_err(|e| EngineError::Decode {
            shuffle: from.shuffle.id.0,
            partition: from.ctx.part,
            detail: e.to_string(),
        })?;
        sorter.push(k, v)?;
    }
    Ok(())
}

struct ReduceInput<K, V> {
    from: ExchangeReader,
    op: u64,
    combine: CombineFn<V>,
    table: FastMap<K, Reduced<V>>,
    /// The table's share of the budget.
    memory: Reservation,
    /// Batch: sorted runs of spilled tables.
    runs: Vec<SpillRun>,
    /// Batch: the final results, once the input ended.
    output: Option<ReduceOutput<K, V>>,
}

enum ReduceOutput<K, V> {
    Table(std::vec::IntoIter<Batch<(K, V)>>),
    Merge(SortedStream, Option<(Bytes, Bytes)>),
}

impl<K: Key, V: Value> ReduceInput<K, V> {
    /// Folds one record in; `bytes` is the size of its encoding.
    fn merge(&mut self, event: Event<(K, V)>, bytes: usize) -> Result<(), EngineError> {
        let (key, value) = event.value;
        match self.table.entry(key) {
            Entry::Occupied(mut slot) => {
                let slot = slot.get_mut();
                let old = slot.value.take().expect("a reduced value is always present");
                slot.value = Some((self.combine)(old, value));
                slot.created_us = slot.created_us.min(event.created_us);
                return Ok(());
            }
            Entry::Vacant(slot) => {
                slot.insert(Reduced { value: Some(value), created_us: event.created_us });
            }
        }
        let grow = bytes + entry_overhead::<K, V>();
        if self.from.timed() {
            if !self.memory.try_grow(grow) {
                return Err(EngineError::StateTooLarge {
                    operator: self.memory.consumer().to_string(),
                    bytes: self.memory.size() + grow,
                    limit: self.memory.limit(),
                    hint: "give the engine more memory or the exchange more partitions".into(),
                });
            }
        } else if self.memory.size() + grow > self.memory.limit() / 2 || !self.memory.try_grow(grow) {
            // Half the share for the table: its encoding for the run takes as much again.
            self.spill()?;
            self.memory.try_grow(grow);
        }
        Ok(())
    }

    /// Batch: writes the table, sorted by encoded key, as a run, and empties it.
    fn spill(&mut self) -> Result<(), EngineError> {
        let mut encoded = Vec::with_capacity(self.table.len());
        for (key, reduced) in self.table.drain() {
            let (mut k, mut v) = (Vec::new(), Vec::new());
            encode_key(&key, &mut k)?;
            encode_value(&reduced.value.expect("a reduced value is always present"), None, &mut v)?;
            encoded.push((k, v));
        }
        self.table = FastMap::default();
        encoded.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut writer = SpillWriter::create(&self.from.ctx.spill_dir)?;
        for (k, v) in &encoded {
            writer.push(k, v)?;
        }
        let run = writer.finish()?;
        self.from.ctx.stats.spilled.fetch_add(run.len(), std::sync::atomic::Ordering::Relaxed);
        tracing::debug!("{}: spilled {} keys ({} bytes)", self.memory.consumer(), run.records(), run.len());
        self.runs.push(run);
        self.memory.free();
        Ok(())
    }

    fn value_of(&self, key: &K) -> V {
        self.table[key].value.clone().expect("a reduced value is always present")
    }

    /// Batch: the final results once the input ended.
    fn finish(&mut self) -> Result<ReduceOutput<K, V>, EngineError> {
        if self.runs.is_empty() {
            let finals = self
                .table
                .drain()
                .map(|(k, r)| Event {
                    value: (k, r.value.expect("a reduced value is always present")),
                    created_us: r.created_us,
                })
                .collect();
            return Ok(ReduceOutput::Table(into_batches(finals).into_iter()));
        }
        self.spill()?;
        let runs = std::mem::take(&mut self.runs);
        let memory = self.from.ctx.reservation("reduce_by_key merge", true);
        let mut stream = merge_runs(runs, memory, &self.from.ctx.spill_dir, &self.from.ctx.stats.spilled)?;
        let first = stream.next_record()?;
        Ok(ReduceOutput::Merge(stream, first))
    }

    /// Batch after spilling: the next batch of keys, each combined over the runs.
    fn next_merged(&mut self) -> Result<Option<Batch<(K, V)>>, EngineError> {
        let Some(ReduceOutput::Merge(stream, head)) = &mut self.output else { return Ok(None) };
        let decoder = self.from.decoder();
        let now = now_us();
        let mut batch = Vec::new();
        while batch.len() < BATCH_RECORDS {
            let Some((key, value)) = head.take() else { break };
            let first = decoder.decode::<K, V>(&key, &value, now)?;
            let (k, mut v) = first.value;
            loop {
                match stream.next_record()? {
                    Some((next_key, next_value)) if next_key == key => {
                        let next = decoder.decode::<K, V>(&next_key, &next_value, now)?;
                        v = (self.combine)(v, next.value.1);
                    }
                    other => {
                        *head = other;
                        break;
                    }
                }
            }
            batch.push(Event { value: (k, v), created_us: now });
        }
        Ok((!batch.is_empty()).then_some(batch))
    }
}

/// A streaming reduction's state: every key's value and oldest creation time.
type ReduceState<K, V> = Vec<(K, V, u64)>;

impl<K: Key, V: Value> Input<(K, V)> for ReduceInput<K, V> {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Item<(K, V)>>, EngineError>> {
        Box::pin(async move {
            loop {
                match &mut self.output {
                    Some(ReduceOutput::Table(batches)) => return Ok(batches.next().map(Item::Batch)),
                    Some(ReduceOutput::Merge(..)) => return Ok(self.next_merged()?.map(Item::Batch)),
                    None => {}
                }
                let raw = match self.from.next_raw().await? {
                    Some(Raw::Records(raw)) => raw,
                    Some(Raw::Barrier(id)) => return Ok(Some(Item::Barrier(id))),
                    Some(Raw::Cancel(id)) => return Ok(Some(Item::Cancel(id))),
                    None if self.from.timed() => return Ok(None), // every update was already emitted
                    None => {
                        self.output = Some(self.finish()?);
                        continue;
                    }
                };
                let events = self.from.decode_all::<K, V>(&raw)?;
                let per_record = raw.len() / events.len().max(1);
                if !self.from.timed() {
                    for event in events {
                        self.merge(event, per_record)?;
                    }
                    continue;
                }
                // Streaming: emit the new value of every key this block touched,
                // stamped with the oldest creation time that contributed.
                let mut touched: FastMap<K, u64> = FastMap::default();
                for event in events {
                    let created_us = event.created_us;
                    let key = event.value.0.clone();
                    self.merge(event, per_record)?;
                    let oldest = touched.entry(key).or_insert(created_us);
                    *oldest = (*oldest).min(created_us);
                }
                if touched.is_empty() {
                    continue;
                }
                let updates = touched
                    .into_iter()
                    .map(|(key, created_us)| {
                        let value = self.value_of(&key);
                        Event { value: (key, value), created_us }
                    })
                    .collect();
                return Ok(Some(Item::Batch(updates)));
            }
        })
    }

    fn snapshot(&mut self, snapshot: &mut Snapshot) -> Result<(), EngineError> {
        let state: ReduceState<K, V> = self
            .table
            .iter()
            .map(|(k, r)| (k.clone(), r.value.clone().expect("a reduced value is always present"), r.created_us))
            .collect();
        snapshot.put(self.op, &state)
    }
}

/// Passes every record of a partition on as it arrives.
struct PassInput<K, V> {
    from: ExchangeReader,
    _records: std::marker::PhantomData<fn() -> (K, V)>,
}

impl<K: Key, V: Value> Input<(K, V)> for PassInput<K, V> {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Item<(K, V)>>, EngineError>> {
        Box::pin(async move {
            Ok(match self.from.next_raw().await? {
                Some(Raw::Records(raw)) => Some(Item::Batch(self.from.decode_all(&raw)?)),
                Some(Raw::Barrier(id)) => Some(Item::Barrier(id)),
                Some(Raw::Cancel(id)) => Some(Item::Cancel(id)),
                None => None,
            })
        })
    }
}

/// Where a sorting operator is.
enum Phase {
    /// Reading the partition into the sorter.
    Reading(ExternalSorter),
    /// Giving out the records in key order.
    Emitting(Sorted),
    Done,
}

/// The part `group_by_key` and `sort_by_key` share: the partition's records
/// in key order, from the exchange or through a sorter; barriers pass by
/// while the input is read.
struct KeyOrder {
    from: Option<ExchangeReader>,
    op: u64,
    operator: &'static str,
    phase: Phase,
    decoder: RecordDecoder,
    /// The next record, read ahead to find where a group ends.
    head: Option<(Bytes, Bytes)>,
}

/// What `KeyOrder::advance` found.
enum Step {
    /// Records are ready to give out in key order.
    Ready,
    Barrier(u64),
    Cancel(u64),
}

impl KeyOrder {
    fn new(from: ExchangeReader, op: u64, operator: &'static str) -> Result<Self, EngineError> {
        let mut sorter = new_sorter(&from.ctx, operator);
        if let Some(state) = &from.ctx.restored
            && let Some(mut section) = state.section(op)?
        {
            sorter.restore(&mut section)?;
        }
        let decoder = from.decoder();
        Ok(Self { from: Some(from), op, operator, phase: Phase::Reading(sorter), decoder, head: None })
    }

    /// Reads the input until it ends (or a checkpoint event comes by).
    async fn advance(&mut self) -> Result<Step, EngineError> {
        if !matches!(self.phase, Phase::Reading(_)) {
            return Ok(Step::Ready);
        }
        let from = self.from.as_mut().expect("read while reading");
        if from.key_ordered() && !from.timed() {
            let from = self.from.take().expect("read while reading");
            self.phase = Phase::Emitting(Sorted::from_exchange(from, self.operator).await?);
        }
        while let Phase::Reading(sorter) = &mut self.phase {
            let from = self.from.as_mut().expect("read while reading");
            match from.next_raw().await? {
                Some(Raw::Records(raw)) => push_all(sorter, &raw, from)?,
                Some(Raw::Barrier(id)) => return Ok(Step::Barrier(id)),
                Some(Raw::Cancel(id)) => return Ok(Step::Cancel(id)),
                None => {
                    let Phase::Reading(sorter) = std::mem::replace(&mut self.phase, Phase::Done) else {
                        unreachable!("matched above")
                    };
                    self.phase = Phase::Emitting(Sorted::Local(sorter.finish()?));
                    self.from = None;
                }
            }
        }
        if let Phase::Emitting(sorted) = &mut self.phase {
            self.head = sorted.next().await?;
        }
        Ok(Step::Ready)
    }

    /// The next record in key order.
    async fn next_record(&mut self) -> Result<Option<(Bytes, Bytes)>, EngineError> {
        let Some(head) = self.head.take() else {
            self.phase = Phase::Done;
            return Ok(None);
        };
        if let Phase::Emitting(sorted) = &mut self.phase {
            self.head = sorted.next().await?;
        }
        Ok(Some(head))
    }

    fn peek_key(&self) -> Option<&Bytes> {
        self.head.as_ref().map(|(k, _)| k)
    }

    /// Up to `max` records in key order (the one read ahead first) into
    /// `each`, read as a batch; fewer than `max` means the input ended.
    async fn next_batch(
        &mut self,
        max: usize,
        mut each: impl FnMut(&[u8], &[u8]) -> Result<(), EngineError>,
    ) -> Result<usize, EngineError> {
        let mut read = 0;
        if max > 0
            && let Some((k, v)) = self.head.take()
        {
            each(&k, &v)?;
            read = 1;
        }
        if let Phase::Emitting(sorted) = &mut self.phase {
            read += sorted.next_batch(max - read, each).await?;
        }
        if read < max {
            self.phase = Phase::Done;
        }
        Ok(read)
    }

    fn decode<K: Key, V: Value>(&self, key: &[u8], value: &[u8], now: u64) -> Result<Event<(K, V)>, EngineError> {
        self.decoder.decode(key, value, now)
    }

    fn snapshot(&self, snapshot: &mut Snapshot) -> Result<(), EngineError> {
        match &self.phase {
            Phase::Reading(sorter) => sorter.snapshot(snapshot.section(self.op)),
            // Emitting starts only when the input ended: no barrier comes after it.
            _ => Ok(()),
        }
    }
}

struct GroupInput<K, V> {
    order: KeyOrder,
    _records: std::marker::PhantomData<fn() -> (K, V)>,
}

impl<K: Key, V: Value> Input<(K, Vec<V>)> for GroupInput<K, V> {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Item<(K, Vec<V>)>>, EngineError>> {
        Box::pin(async move {
            match self.order.advance().await? {
                Step::Barrier(id) => return Ok(Some(Item::Barrier(id))),
                Step::Cancel(id) => return Ok(Some(Item::Cancel(id))),
                Step::Ready => {}
            }
            let now = now_us();
            let mut batch = Vec::new();
            while batch.len() < BATCH_RECORDS {
                let Some((key, value)) = self.order.next_record().await? else { break };
                let first = self.order.decode::<K, V>(&key, &value, now)?;
                let (k, v) = first.value;
                let (mut values, mut created_us) = (vec![v], first.created_us);
                while self.order.peek_key() == Some(&key) {
                    let (nk, nv) = self.order.next_record().await?.expect("peeked");
                    let next = self.order.decode::<K, V>(&nk, &nv, now)?;
                    values.push(next.value.1);
                    created_us = created_us.min(next.created_us);
                }
                batch.push(Event { value: (k, values), created_us });
            }
            Ok((!batch.is_empty()).then_some(Item::Batch(batch)))
        })
    }

    fn snapshot(&mut self, snapshot: &mut Snapshot) -> Result<(), EngineError> {
        self.order.snapshot(snapshot)
    }
}

struct SortInput<K, V> {
    order: KeyOrder,
    _records: std::marker::PhantomData<fn() -> (K, V)>,
}

impl<K: Key + Ord, V: Value> Input<(K, V)> for SortInput<K, V> {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Item<(K, V)>>, EngineError>> {
        Box::pin(async move {
            match self.order.advance().await? {
                Step::Barrier(id) => return Ok(Some(Item::Barrier(id))),
                Step::Cancel(id) => return Ok(Some(Item::Cancel(id))),
                Step::Ready => {}
            }
            let now = now_us();
            let decoder = self.order.decoder;
            let mut batch = Vec::with_capacity(BATCH_RECORDS);
            self.order
                .next_batch(BATCH_RECORDS, |key, value| {
                    batch.push(decoder.decode::<K, V>(key, value, now)?);
                    Ok(())
                })
                .await?;
            debug_assert!(batch.windows(2).all(|w| w[0].value.0 <= w[1].value.0));
            Ok((!batch.is_empty()).then_some(Item::Batch(batch)))
        })
    }

    fn snapshot(&mut self, snapshot: &mut Snapshot) -> Result<(), EngineError> {
        self.order.snapshot(snapshot)
    }
}

impl<K: Key, V: Value> Dataset<(K, V)> {
    /// An exchange stage whose map tasks write this dataset's records into
    /// `exchange.partitions` partitions chosen by `partitioner`.
    pub(crate) fn exchange_stage(
        &self,
        name: &str,
        exchange: Exchange,
        partitioner: Partitioner,
        combiner: Option<CombineFn<V>>,
    ) -> Stage {
        let id = self.engine.next_id();
        Stage {
            id,
            name: format!("{name}#{id}"),
            maps: self.parts,
            partitions: exchange.partitions.max(1),
            mode: exchange.mode,
            key_ordering: false,
            run_map: map_task(id, self.open.clone(), partitioner, combiner),
            prepare: None,
        }
    }

    /// The dataset read from `stage`'s partitions, one task each, every
    /// task reading its partition through the input `read` makes.
    fn read_after<T: Data>(
        &self,
        stage: Stage,
        read: impl Fn(ExchangeReader, u64) -> Result<BoxInput<T>, EngineError> + Send + Sync + 'static,
    ) -> Dataset<T> {
        let (id, partitions) = (stage.id, stage.partitions);
        let mut stages = self.stages.clone();
        stages.push(Arc::new(stage));
        Dataset {
            engine: self.engine.clone(),
            parts: partitions,
            bounded: self.bounded,
            stages,
            open: Arc::new(move |ctx: &TaskContext| read(ExchangeReader::new(ctx, id), id)),
            invalid: self.invalid.clone(),
        }
    }

    /// Combines the values of each key with `f` (associative and
    /// commutative), on the map side first and again after the exchange.
    /// In streaming mode the result is an upsert stream: each time a key's
    /// value changes, its new value is emitted (see
    /// [`Dataset::collect_latest`] for the final values). Batch reductions
    /// whose keys outgrow the operator's share of the memory budget spill
    /// sorted runs and merge them; a streaming reduction's table must fit
    /// its share (else `StateTooLarge`).
    pub fn reduce_by_key(
        &self,
        f: impl Fn(V, V) -> V + Send + Sync + 'static,
        exchange: impl Into<Exchange>,
    ) -> Dataset<(K, V)> {
        let exchange = exchange.into();
        let combine: CombineFn<V> = Arc::new(f);
        let partitions = exchange.partitions.max(1);
        let stage =
            self.exchange_stage("reduce_by_key", exchange, Partitioner::Hash { partitions }, Some(combine.clone()));
        self.read_after(stage, move |from, op| {
            let streaming = from.timed();
            let mut memory = from.ctx.reservation("reduce_by_key", !streaming);
            let mut table = FastMap::default();
            if let Some(state) = from.ctx.restored::<ReduceState<K, V>>(op)? {
                for (k, v, created_us) in state {
                    memory.try_grow(entry_overhead::<K, V>() + std::mem::size_of::<(K, V)>());
                    table.insert(k, Reduced { value: Some(v), created_us });
                }
            }
            Ok(Box::new(ReduceInput {
                from,
                op,
                combine: combine.clone(),
                table,
                memory,
                runs: Vec::new(),
                output: None,
            }) as _)
        })
    }

    /// Moves every record to the partition of its key (a hash of it), with
    /// no aggregation: records of one key end up in one part. Records flow
    /// through as they arrive in streaming mode.
    pub fn partition_by_key(&self, exchange: impl Into<Exchange>) -> Dataset<(K, V)> {
        let exchange = exchange.into();
        let partitions = exchange.partitions.max(1);
        let stage = self.exchange_stage("partition_by_key", exchange, Partitioner::Hash { partitions }, None);
        self.read_after(stage, |from, _| Ok(Box::new(PassInput::<K, V> { from, _records: std::marker::PhantomData })))
    }

    /// Gathers the values of each key into one record per key, emitted in
    /// key order when the input ends, in either mode; an unbounded input
    /// cannot be grouped. A partition larger than the operator's share of
    /// the memory budget is sorted through spill files; with
    /// `Exchange::partitions(r).mode(ExchangeMode::Sort)` the service's
    /// key-ordered sort exchange delivers it sorted and groups stream out.
    /// One group's values are held together (they are one record).
    pub fn group_by_key(&self, exchange: impl Into<Exchange>) -> Dataset<(K, Vec<V>)> {
        let exchange = exchange.into();
        let partitions = exchange.partitions.max(1);
        let mut stage = self.exchange_stage("group_by_key", exchange, Partitioner::Hash { partitions }, None);
        stage.key_ordering = exchange.mode == Some(ExchangeMode::Sort);
        self.read_after(stage, |from, op| {
            Ok(Box::new(GroupInput::<K, V> {
                order: KeyOrder::new(from, op, "group_by_key")?,
                _records: std::marker::PhantomData,
            }) as _)
        })
        .with_invalid((!self.bounded).then(|| "group_by_key needs a bounded input".into()))
    }

    /// Sorts the dataset by key: part `r` holds the `r`-th range of keys, in
    /// order, so the parts read in order are totally ordered. The ranges come
    /// from a sample of the keys, taken by a batch job over the input before
    /// the exchange (the input is computed twice, as in Spark). Batch runs
    /// use a sort exchange with key ordering, whose runs the client merges
    /// as a stream within a reservation of the budget; other exchanges
    /// (`ExchangeMode::Hash`, and streaming runs, which emit when their
    /// input ends) sort each partition through spill files. Records with
    /// equal keys keep their order in the exchange (see `shuffle_client`'s
    /// key-ordered reads).
    pub fn sort_by_key(&self, exchange: impl Into<Exchange>) -> Dataset<(K, V)>
    where
        K: Ord,
    {
        let exchange = exchange.into();
        let partitions = exchange.partitions.max(1);
        let bounds: Arc<OnceLock<RangeBounds>> = Arc::new(OnceLock::new());
        let sample_input = self.clone();
        let sample_bounds = bounds.clone();
        let prepare: crate::exchange::PrepareFn = Arc::new(move || {
            let (input, bounds) = (sample_input.clone(), sample_bounds.clone());
            Box::pin(async move {
                if bounds.get().is_none() {
                    let computed = sample_bounds_of(&input, partitions).await?;
                    let _ = bounds.set(RangeBounds::new(computed));
                }
                Ok(())
            })
        });
        let mut stage = self.exchange_stage("sort_by_key", exchange, Partitioner::Range { bounds }, None);
        stage.key_ordering = true;
        stage.prepare = Some(prepare);
        self.read_after(stage, |from, op| {
            Ok(Box::new(SortInput::<K, V> {
                order: KeyOrder::new(from, op, "sort_by_key")?,
                _records: std::marker::PhantomData,
            }) as _)
        })
        .with_invalid((!self.bounded).then(|| "sort_by_key needs a bounded input".into()))
    }
}

/// Range bounds for `partitions` partitions from a reservoir sample of the
/// keys of every part of `input`, computed by a batch job.
async fn sample_bounds_of<K: Key, V: Value>(
    input: &Dataset<(K, V)>,
    partitions: u32,
) -> Result<Vec<Vec<u8>>, EngineError> {
    let per_part = SAMPLES_PER_PARTITION * partitions as usize;
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink_samples = samples.clone();
    let sink: crate::sink::SinkFactory<(K, V)> = Arc::new(move |part, _| {
        Ok(Box::new(ReservoirSink::new(part, per_part, sink_samples.clone(), |(k, _): &(K, V), buf: &mut Vec<u8>| {
            encode_key(k, buf)
        })) as _)
    });
    executor::run_nested(input, ExecutionMode::Batch, sink).await?;
    let mut samples = std::mem::take(&mut *samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    samples.sort_unstable();
    let n = samples.len();
    Ok((1..partitions as usize).filter(|_| n > 0).map(|i| samples[i * n / partitions as usize].clone()).collect())
}
