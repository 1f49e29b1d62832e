//! Keyed operators, each introducing one exchange: `reduce_by_key` (with
//! map-side combining), `group_by_key`, `sort_by_key` (range partitioning
//! from a sample, then a sort exchange with key ordering) and an inner
//! `join` of two keyed datasets.
//!
//! The reading side of each runs in the tasks of the next stage. In batch
//! mode they see a partition's complete, committed data. In streaming mode
//! they read hybrid exchanges as data arrives: `reduce_by_key` emits the
//! updated value of every key a block touched (an upsert stream), `join`
//! emits each match as soon as both sides have arrived, and `group_by_key`
//! and `sort_by_key` emit when their input ends (they need all of it).

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::{Arc, OnceLock},
};

use shuffle_client::{PartitionReader, RecordBlock};

use crate::{
    Dataset, EngineError, ExecutionMode,
    dataset::merge_stages,
    exchange::{CombineFn, Exchange, Key, Partitioner, Stage, Value, decode_record, encode_key, map_task},
    executor,
    sink::ReservoirSink,
    task::{Batch, BoxFuture, BoxInput, Event, Input, RunShuffle, TaskContext, into_batches, now_us},
};

/// Keys each map task samples per partition of a `sort_by_key` (as Spark's
/// range partitioner does, 20 per partition): enough that partitions come
/// out within a few percent of even for smooth key distributions.
const SAMPLES_PER_PARTITION: usize = 20;

/// Reads one partition of a stage's shuffle for a task and decodes its records.
pub(crate) struct ExchangeReader {
    ctx: TaskContext,
    shuffle: RunShuffle,
    reader: Option<PartitionReader>,
}

impl ExchangeReader {
    pub(crate) fn new(ctx: &TaskContext, stage: u64) -> Self {
        Self { ctx: ctx.clone(), shuffle: ctx.shuffle(stage), reader: None }
    }

    fn timed(&self) -> bool {
        self.ctx.mode == ExecutionMode::Streaming
    }

    async fn reader(&mut self) -> Result<&mut PartitionReader, EngineError> {
        if self.reader.is_none() {
            self.reader = Some(self.ctx.client.reader(self.shuffle.id, self.ctx.part).await?);
        }
        Ok(self.reader.as_mut().expect("opened above"))
    }

    async fn next_block(&mut self) -> Result<Option<RecordBlock>, EngineError> {
        Ok(self.reader().await?.next_block().await?)
    }

    /// Decodes one record; `now` is its creation time unless the record carries one.
    fn decode<K: Key, V: Value>(&self, key: &[u8], value: &[u8], now: u64) -> Result<Event<(K, V)>, EngineError> {
        let (k, v, created) = decode_record(key, value, self.timed()).map_err(|detail| EngineError::Decode {
            shuffle: self.shuffle.id.0,
            partition: self.ctx.part,
            detail,
        })?;
        Ok(Event { value: (k, v), created_us: created.unwrap_or(now) })
    }

    fn decode_block<K: Key, V: Value>(&self, block: &RecordBlock) -> Result<Batch<(K, V)>, EngineError> {
        // One clock read per block: records without a creation time arrived together.
        let now = now_us();
        let mut batch = Vec::with_capacity(block.len());
        for (k, v) in block.records() {
            batch.push(self.decode(k, v, now)?);
        }
        Ok(batch)
    }

    /// Every record of the partition, in the order the service sends them
    /// (key order for a key-ordered sort shuffle).
    async fn read_all<K: Key, V: Value>(&mut self) -> Result<Vec<Event<(K, V)>>, EngineError> {
        let mut events = Vec::new();
        if self.shuffle.spec.key_ordering {
            let now = now_us();
            while let Some(record) = self.reader().await?.next_record().await? {
                events.push(self.decode(&record.key, &record.value, now)?);
            }
        } else {
            while let Some(block) = self.next_block().await? {
                events.extend(self.decode_block(&block)?);
            }
        }
        Ok(events)
    }
}

/// Emits prepared batches, after the input was consumed.
type Output<T> = std::vec::IntoIter<Batch<T>>;

struct ReduceInput<K, V> {
    from: ExchangeReader,
    combine: CombineFn<V>,
    table: HashMap<K, Reduced<V>>,
    output: Option<Output<(K, V)>>,
}

/// A key's reduced value so far; `None` only while it is being combined.
struct Reduced<V> {
    value: Option<V>,
    /// The oldest creation time that contributed.
    created_us: u64,
}

impl<K: Key, V: Value> ReduceInput<K, V> {
    fn merge(&mut self, event: Event<(K, V)>) {
        let (key, value) = event.value;
        match self.table.entry(key) {
            Entry::Occupied(mut slot) => {
                let slot = slot.get_mut();
                let old = slot.value.take().expect("a reduced value is always present");
                slot.value = Some((self.combine)(old, value));
                slot.created_us = slot.created_us.min(event.created_us);
            }
            Entry::Vacant(slot) => {
                slot.insert(Reduced { value: Some(value), created_us: event.created_us });
            }
        }
    }

    fn value_of(&self, key: &K) -> V {
        self.table[key].value.clone().expect("a reduced value is always present")
    }
}

impl<K: Key, V: Value> Input<(K, V)> for ReduceInput<K, V> {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Batch<(K, V)>>, EngineError>> {
        Box::pin(async move {
            loop {
                if let Some(output) = &mut self.output {
                    return Ok(output.next());
                }
                let Some(block) = self.from.next_block().await? else {
                    let finals = if self.from.timed() {
                        Vec::new() // every update was already emitted
                    } else {
                        self.table
                            .drain()
                            .map(|(k, r)| Event {
                                value: (k, r.value.expect("a reduced value is always present")),
                                created_us: r.created_us,
                            })
                            .collect()
                    };
                    self.output = Some(into_batches(finals).into_iter());
                    continue;
                };
                let events = self.from.decode_block::<K, V>(&block)?;
                if !self.from.timed() {
                    for event in events {
                        self.merge(event);
                    }
                    continue;
                }
                // Streaming: emit the new value of every key this block touched,
                // stamped with the oldest creation time that contributed.
                let mut touched: HashMap<K, u64> = HashMap::new();
                for event in events {
                    let created_us = event.created_us;
                    let key = event.value.0.clone();
                    self.merge(event);
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
                return Ok(Some(updates));
            }
        })
    }
}

/// Passes every record of a partition on as it arrives.
struct PassInput<K, V> {
    from: ExchangeReader,
    _records: std::marker::PhantomData<fn() -> (K, V)>,
}

impl<K: Key, V: Value> Input<(K, V)> for PassInput<K, V> {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Batch<(K, V)>>, EngineError>> {
        Box::pin(async move {
            match self.from.next_block().await? {
                Some(block) => Ok(Some(self.from.decode_block(&block)?)),
                None => Ok(None),
            }
        })
    }
}

struct GroupInput<K, V> {
    from: ExchangeReader,
    output: Option<Output<(K, Vec<V>)>>,
}

impl<K: Key, V: Value> Input<(K, Vec<V>)> for GroupInput<K, V> {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Batch<(K, Vec<V>)>>, EngineError>> {
        Box::pin(async move {
            if self.output.is_none() {
                let mut groups: HashMap<K, Event<Vec<V>>> = HashMap::new();
                while let Some(block) = self.from.next_block().await? {
                    for event in self.from.decode_block::<K, V>(&block)? {
                        let (key, value) = event.value;
                        let group = groups.entry(key).or_insert(Event { value: Vec::new(), created_us: u64::MAX });
                        group.value.push(value);
                        group.created_us = group.created_us.min(event.created_us);
                    }
                }
                let groups =
                    groups.into_iter().map(|(k, g)| Event { value: (k, g.value), created_us: g.created_us }).collect();
                self.output = Some(into_batches(groups).into_iter());
            }
            Ok(self.output.as_mut().and_then(Iterator::next))
        })
    }
}

struct SortInput<K, V> {
    from: ExchangeReader,
    output: Option<Output<(K, V)>>,
}

impl<K: Key + Ord, V: Value> Input<(K, V)> for SortInput<K, V> {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Batch<(K, V)>>, EngineError>> {
        Box::pin(async move {
            if self.output.is_none() {
                let mut events = self.from.read_all::<K, V>().await?;
                if !self.from.shuffle.spec.key_ordering {
                    // Hash or hybrid exchange: the service did not order the keys.
                    events.sort_by(|a, b| a.value.0.cmp(&b.value.0));
                }
                debug_assert!(events.windows(2).all(|w| w[0].value.0 <= w[1].value.0));
                self.output = Some(into_batches(events).into_iter());
            }
            Ok(self.output.as_mut().and_then(Iterator::next))
        })
    }
}

/// Records of one side of a join, keyed by their encoded key (equal keys encode equally).
type Keyed<T> = Vec<(Vec<u8>, Event<T>)>;

/// What a streaming join's side readers send.
enum Arrival<K, V, W> {
    Left(Keyed<(K, V)>),
    Right(Keyed<(K, W)>),
}

type ArrivalResult<K, V, W> = Result<Arrival<K, V, W>, EngineError>;

struct JoinInput<K, V, W> {
    left: Option<ExchangeReader>,
    right: Option<ExchangeReader>,
    output: Option<Output<(K, (V, W))>>,
    /// Streaming: both sides are read by their own tasks into this channel.
    arrivals: Option<tokio::sync::mpsc::Receiver<ArrivalResult<K, V, W>>>,
    /// Streaming: what each side has delivered so far.
    left_seen: HashMap<Vec<u8>, Vec<Event<(K, V)>>>,
    right_seen: HashMap<Vec<u8>, Vec<Event<(K, W)>>>,
}

fn keyed_events<K: Key, V: Value>(from: &ExchangeReader, block: &RecordBlock) -> Result<Keyed<(K, V)>, EngineError> {
    let now = now_us();
    block.records().map(|(k, v)| Ok((k.to_vec(), from.decode::<K, V>(k, v, now)?))).collect()
}

fn joined<K: Key, V: Value, W: Value>(left: &Event<(K, V)>, right: &Event<(K, W)>) -> Event<(K, (V, W))> {
    Event {
        value: (left.value.0.clone(), (left.value.1.clone(), right.value.1.clone())),
        created_us: left.created_us.max(right.created_us),
    }
}

/// Reads a side of a streaming join into `arrivals` until it ends or fails.
fn spawn_side<K: Key, V: Value, W: Value>(
    mut from: ExchangeReader,
    arrivals: tokio::sync::mpsc::Sender<ArrivalResult<K, V, W>>,
    wrap: fn(&ExchangeReader, &RecordBlock) -> ArrivalResult<K, V, W>,
) {
    tokio::spawn(async move {
        loop {
            let item = match from.next_block().await {
                Ok(Some(block)) => wrap(&from, &block),
                Ok(None) => return,
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            // A closed channel means the join's task is gone; stop reading.
            if arrivals.send(item).await.is_err() || failed {
                return;
            }
        }
    });
}

impl<K: Key, V: Value, W: Value> JoinInput<K, V, W> {
    /// Batch: build a table of the left partition, then probe it with the right.
    async fn batch(&mut self) -> Result<Vec<Event<(K, (V, W))>>, EngineError> {
        let (mut left, mut right) = (self.left.take().expect("unread"), self.right.take().expect("unread"));
        let mut table: HashMap<Vec<u8>, Vec<Event<(K, V)>>> = HashMap::new();
        while let Some(block) = left.next_block().await? {
            for (key, event) in keyed_events::<K, V>(&left, &block)? {
                table.entry(key).or_default().push(event);
            }
        }
        let mut out = Vec::new();
        while let Some(block) = right.next_block().await? {
            for (key, event) in keyed_events::<K, W>(&right, &block)? {
                out.extend(table.get(&key).into_iter().flatten().map(|l| joined(l, &event)));
            }
        }
        Ok(out)
    }

    /// Streaming: the next arrival from either side, joined with what the other side has delivered.
    async fn streaming(&mut self) -> Result<Option<Batch<(K, (V, W))>>, EngineError> {
        if self.arrivals.is_none() {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let (left, right) = (self.left.take().expect("unread"), self.right.take().expect("unread"));
            spawn_side(left, tx.clone(), |from, block| Ok(Arrival::Left(keyed_events(from, block)?)));
            spawn_side(right, tx, |from, block| Ok(Arrival::Right(keyed_events(from, block)?)));
            self.arrivals = Some(rx);
        }
        let arrivals = self.arrivals.as_mut().expect("set above");
        let Some(arrival) = arrivals.recv().await else {
            return Ok(None); // both sides ended
        };
        let mut out = Vec::new();
        match arrival? {
            Arrival::Left(events) => {
                for (key, event) in events {
                    out.extend(self.right_seen.get(&key).into_iter().flatten().map(|r| joined(&event, r)));
                    self.left_seen.entry(key).or_default().push(event);
                }
            }
            Arrival::Right(events) => {
                for (key, event) in events {
                    out.extend(self.left_seen.get(&key).into_iter().flatten().map(|l| joined(l, &event)));
                    self.right_seen.entry(key).or_default().push(event);
                }
            }
        }
        Ok(Some(out))
    }
}

impl<K: Key, V: Value, W: Value> Input<(K, (V, W))> for JoinInput<K, V, W> {
    fn next_batch(&mut self) -> BoxFuture<'_, Result<Option<Batch<(K, (V, W))>>, EngineError>> {
        Box::pin(async move {
            if self.arrivals.is_some() || self.left.as_ref().is_some_and(ExchangeReader::timed) {
                return self.streaming().await;
            }
            if self.output.is_none() {
                let out = self.batch().await?;
                self.output = Some(into_batches(out).into_iter());
            }
            Ok(self.output.as_mut().and_then(Iterator::next))
        })
    }
}

impl<K: Key, V: Value> Dataset<(K, V)> {
    /// An exchange stage whose map tasks write this dataset's records into
    /// `exchange.partitions` partitions chosen by `partitioner`.
    fn exchange_stage(
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
    fn read_after<T: crate::Data>(
        &self,
        stage: Stage,
        read: impl Fn(ExchangeReader) -> BoxInput<T> + Send + Sync + 'static,
    ) -> Dataset<T> {
        let (id, partitions) = (stage.id, stage.partitions);
        let mut stages = self.stages.clone();
        stages.push(Arc::new(stage));
        Dataset {
            engine: self.engine.clone(),
            parts: partitions,
            bounded: self.bounded,
            stages,
            open: Arc::new(move |ctx: &TaskContext| Ok(read(ExchangeReader::new(ctx, id)))),
            invalid: self.invalid.clone(),
        }
    }

    /// Combines the values of each key with `f` (associative and
    /// commutative), on the map side first and again after the exchange.
    /// In streaming mode the result is an upsert stream: each time a key's
    /// value changes, its new value is emitted (see
    /// [`Dataset::collect_latest`] for the final values).
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
        self.read_after(stage, move |from| {
            Box::new(ReduceInput { from, combine: combine.clone(), table: HashMap::new(), output: None })
        })
    }

    /// Moves every record to the partition of its key (a hash of it), with
    /// no aggregation: records of one key end up in one part. Records flow
    /// through as they arrive in streaming mode.
    pub fn partition_by_key(&self, exchange: impl Into<Exchange>) -> Dataset<(K, V)> {
        let exchange = exchange.into();
        let partitions = exchange.partitions.max(1);
        let stage = self.exchange_stage("partition_by_key", exchange, Partitioner::Hash { partitions }, None);
        self.read_after(stage, |from| Box::new(PassInput::<K, V> { from, _records: std::marker::PhantomData }))
    }

    /// Gathers the values of each key into one record per key. The groups
    /// are emitted when the input ends, in either mode; an unbounded input
    /// cannot be grouped.
    pub fn group_by_key(&self, exchange: impl Into<Exchange>) -> Dataset<(K, Vec<V>)> {
        let exchange = exchange.into();
        let partitions = exchange.partitions.max(1);
        let stage = self.exchange_stage("group_by_key", exchange, Partitioner::Hash { partitions }, None);
        self.read_after(stage, |from| Box::new(GroupInput { from, output: None }))
            .with_invalid((!self.bounded).then(|| "group_by_key needs a bounded input".into()))
    }

    /// Sorts the dataset by key: part `r` holds the `r`-th range of keys, in
    /// order, so the parts read in order are totally ordered. The ranges come
    /// from a sample of the keys, taken by a batch job over the input before
    /// the exchange (the input is computed twice, as in Spark). Batch runs
    /// use a sort exchange with key ordering, so the service merges sorted
    /// runs; streaming runs sort each partition when their input ends.
    pub fn sort_by_key(&self, exchange: impl Into<Exchange>) -> Dataset<(K, V)>
    where
        K: Ord,
    {
        let exchange = exchange.into();
        let partitions = exchange.partitions.max(1);
        let bounds: Arc<OnceLock<Vec<Vec<u8>>>> = Arc::new(OnceLock::new());
        let sample_input = self.clone();
        let sample_bounds = bounds.clone();
        let prepare: crate::exchange::PrepareFn = Arc::new(move || {
            let (input, bounds) = (sample_input.clone(), sample_bounds.clone());
            Box::pin(async move {
                if bounds.get().is_none() {
                    let computed = sample_bounds_of(&input, partitions).await?;
                    let _ = bounds.set(computed);
                }
                Ok(())
            })
        });
        let mut stage = self.exchange_stage("sort_by_key", exchange, Partitioner::Range { bounds }, None);
        stage.key_ordering = true;
        stage.prepare = Some(prepare);
        self.read_after(stage, |from| Box::new(SortInput { from, output: None }))
            .with_invalid((!self.bounded).then(|| "sort_by_key needs a bounded input".into()))
    }

    /// Inner join with `other` on the key: one record `(key, (v, w))` for
    /// every pair of records with equal keys. Both sides are hashed into the
    /// same `exchange.partitions` partitions.
    pub fn join<W: Value>(&self, other: &Dataset<(K, W)>, exchange: impl Into<Exchange>) -> Dataset<(K, (V, W))> {
        let exchange = exchange.into();
        let partitions = exchange.partitions.max(1);
        let left = self.exchange_stage("join-left", exchange, Partitioner::Hash { partitions }, None);
        let right = other.exchange_stage("join-right", exchange, Partitioner::Hash { partitions }, None);
        let (left_id, right_id) = (left.id, right.id);
        let mut stages = merge_stages(&self.stages, &other.stages);
        stages.push(Arc::new(left));
        stages.push(Arc::new(right));
        Dataset {
            engine: self.engine.clone(),
            parts: partitions,
            bounded: self.bounded && other.bounded,
            stages,
            open: Arc::new(move |ctx: &TaskContext| {
                Ok(Box::new(JoinInput::<K, V, W> {
                    left: Some(ExchangeReader::new(ctx, left_id)),
                    right: Some(ExchangeReader::new(ctx, right_id)),
                    output: None,
                    arrivals: None,
                    left_seen: HashMap::new(),
                    right_seen: HashMap::new(),
                }) as _)
            }),
            invalid: self.invalid.clone(),
        }
        .with_invalid(other.invalid.clone())
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
    let sink: crate::sink::SinkFactory<(K, V)> = Arc::new(move |part| {
        Ok(Box::new(ReservoirSink::new(part, per_part, sink_samples.clone(), |(k, _): &(K, V), buf: &mut Vec<u8>| {
            encode_key(k, buf)
        })) as _)
    });
    executor::run(input, ExecutionMode::Batch, sink).await?;
    let mut samples = std::mem::take(&mut *samples.lock().expect("no task panics holding the lock"));
    samples.sort_unstable();
    let n = samples.len();
    Ok((1..partitions as usize).filter(|_| n > 0).map(|i| samples[i * n / partitions as usize].clone()).collect())
}
