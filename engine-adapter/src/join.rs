//! The inner `join` of two keyed datasets: both are hashed into the same
//! partitions, and each task joins one partition of each.
//!
//! - **Batch**: a hash join while the left partition fits the operator's
//!   share of the memory budget (the left side is built into a table, the
//!   right side probes it block by block); past that, a sort-merge join:
//!   both sides go through spilling sorters and are merged by key. With
//!   `ExchangeMode::Sort` both sides come from key-ordered sort exchanges
//!   and are merged as they stream. One key's left records are held
//!   together while its right records pass (a group, like `group_by_key`'s).
//! - **Streaming**: each side is read by a task of its own; every arrival is
//!   joined with what the other side delivered so far and kept for later
//!   arrivals. The state is bounded: with [`JoinOptions::retention`],
//!   records leave it once that much older than now (by their creation
//!   time, in arrival order); whatever the retention, a state larger than
//!   the operator's share of the budget fails the job with `StateTooLarge`
//!   rather than grow. Retention works on processing time, so after a
//!   restart, matches near the retention's edge may differ from those of a
//!   run without the failure; without retention the result is exact.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use bytes::Bytes;
use shuffle_client::ExchangeMode;
use shuffle_protocol::RecordIter;
use tokio::sync::mpsc;

use crate::{
    Dataset, EngineError,
    dataset::merge_stages,
    exchange::{Exchange, Key, Partitioner, Value, encode_value},
    exchange_reader::{ExchangeReader, Raw, RecordDecoder},
    keyed::{Sorted, new_sorter, push_all},
    map::FastMap,
    memory::Reservation,
    spill::SpillWriter,
    state::Snapshot,
    task::{BATCH_RECORDS, Batch, BoxFuture, Event, Input, Item, TaskContext, now_us},
};

/// How a join keeps its streaming state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JoinOptions {
    /// Streaming: drop a record from the join's state once it is this much
    /// older than now (records match only others that arrive within it).
    /// `None`: keep every record, within the memory budget.
    pub retention: Option<Duration>,
}

impl JoinOptions {
    /// Streaming state kept for `retention`.
    pub fn retention(retention: Duration) -> Self {
        Self { retention: Some(retention) }
    }
}

/// Bytes a kept record accounts besides its encoding: its place in the
/// table, its typed form and its entry in the retention queue.
fn entry_overhead<T>() -> usize {
    std::mem::size_of::<Event<T>>() + 64
}

fn joined<K: Key, V: Value, W: Value>(left: &Event<(K, V)>, right: &Event<(K, W)>) -> Event<(K, (V, W))> {
    Event {
        value: (left.value.0.clone(), (left.value.1.clone(), right.value.1.clone())),
        created_us: left.created_us.max(right.created_us),
    }
}

/// A decoded record with its encoded key and the size of its encoding.
type KeyedRecord<K, V> = (Vec<u8>, Event<(K, V)>, usize);

/// One key's records from the left side of a join.
type LeftGroup<K, V> = (Bytes, Vec<Event<(K, V)>>);

/// A join's input as a task's chain holds it.
type JoinInputBox<K, V, W> = crate::task::BoxInput<(K, (V, W))>;

/// What a join gives out.
type Joined<K, V, W> = Batch<(K, (V, W))>;

/// Decodes framed records of `from` with their encoded keys.
fn keyed<K: Key, V: Value>(from: &RecordDecoder, raw: &[u8]) -> Result<Vec<KeyedRecord<K, V>>, EngineError> {
    let now = now_us();
    RecordIter::new(raw)
        .map(|r| {
            let (k, v) = r.map_err(|e| from.bad(e.to_string()))?;
            Ok((k.to_vec(), from.decode::<K, V>(k, v, now)?, k.len() + v.len()))
        })
        .collect()
}

/// The batch join of one partition, step by step.
enum BatchJoin<K, V, W> {
    Start(Box<ExchangeReader>, Box<ExchangeReader>),
    /// The left partition is in the table; the right side probes it.
    Probe {
        table: FastMap<Vec<u8>, Vec<Event<(K, V)>>>,
        right: Box<ExchangeReader>,
        _memory: Reservation,
    },
    /// Both sides in key order.
    Merge(Box<MergeJoin<K, V, W>>),
    Done,
}

/// A merge join of two sorted sides.
struct MergeJoin<K, V, W> {
    left: Sorted,
    right: Sorted,
    left_head: Option<(Bytes, Bytes)>,
    right_head: Option<(Bytes, Bytes)>,
    /// The current key and its left records.
    group: Option<LeftGroup<K, V>>,
    /// The current right record and the next left record to pair it with.
    current: Option<(Event<(K, W)>, usize)>,
    decoder: RecordDecoder,
}

impl<K: Key, V: Value, W: Value> MergeJoin<K, V, W> {
    async fn new(mut left: Sorted, mut right: Sorted, decoder: RecordDecoder) -> Result<Self, EngineError> {
        let left_head = left.next().await?;
        let right_head = right.next().await?;
        Ok(Self { left, right, left_head, right_head, group: None, current: None, decoder })
    }

    fn decode<X: Value>(&self, key: &[u8], value: &[u8], now: u64) -> Result<Event<(K, X)>, EngineError> {
        self.decoder.decode(key, value, now)
    }

    /// Up to a batch of joined records; empty once both sides are done.
    async fn next_batch(&mut self) -> Result<Batch<(K, (V, W))>, EngineError> {
        let now = now_us();
        let mut out = Vec::new();
        while out.len() < BATCH_RECORDS {
            if let Some((key, group)) = &self.group {
                if let Some((right, i)) = &mut self.current {
                    out.push(joined(&group[*i], right));
                    *i += 1;
                    if *i == group.len() {
                        self.current = None;
                    }
                    continue;
                }
                match self.right_head.take() {
                    Some((rk, rv)) if rk == *key => {
                        self.current = Some((self.decode::<W>(&rk, &rv, now)?, 0));
                        self.right_head = self.right.next().await?;
                    }
                    other => {
                        self.right_head = other;
                        self.group = None;
                    }
                }
                continue;
            }
            let (Some((lk, _)), Some((rk, _))) = (&self.left_head, &self.right_head) else { break };
            match lk.cmp(rk) {
                std::cmp::Ordering::Less => self.left_head = self.left.next().await?,
                std::cmp::Ordering::Greater => self.right_head = self.right.next().await?,
                std::cmp::Ordering::Equal => {
                    let key = lk.clone();
                    let mut group = Vec::new();
                    while let Some((k, v)) = self.left_head.take() {
                        if k != key {
                            self.left_head = Some((k, v));
                            break;
                        }
                        group.push(self.decode::<V>(&k, &v, now)?);
                        self.left_head = self.left.next().await?;
                    }
                    self.group = Some((key, group));
                }
            }
        }
        Ok(out)
    }
}

/// What a streaming join's side readers send.
enum SideItem {
    Records(Bytes),
    Barrier(u64),
    Cancel(u64),
}

type SideResult = Result<SideItem, EngineError>;

/// Aborts a spawned task when dropped, so a join that is dropped stops reading.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One side of a streaming join: what it delivered, for later matches.
struct Side<T> {
    by_key: FastMap<Vec<u8>, VecDeque<Event<T>>>,
    /// Arrival order: key, creation time, bytes accounted.
    arrivals: VecDeque<(Vec<u8>, u64, usize)>,
}

impl<T> Default for Side<T> {
    fn default() -> Self {
        Self { by_key: FastMap::default(), arrivals: VecDeque::new() }
    }
}

impl<T> Side<T> {
    /// Drops records created before `cutoff` (in arrival order); returns the bytes freed.
    fn evict(&mut self, cutoff: u64) -> usize {
        let mut freed = 0;
        while self.arrivals.front().is_some_and(|(_, created, _)| *created < cutoff) {
            let (key, _, bytes) = self.arrivals.pop_front().expect("checked above");
            if let Some(events) = self.by_key.get_mut(&key) {
                events.pop_front();
                if events.is_empty() {
                    self.by_key.remove(&key);
                }
            }
            freed += bytes;
        }
        freed
    }

    fn keep(&mut self, key: Vec<u8>, event: Event<T>, bytes: usize) {
        self.arrivals.push_back((key.clone(), event.created_us, bytes));
        self.by_key.entry(key).or_default().push_back(event);
    }
}

/// A side's state in a checkpoint: its records in arrival order.
type SideState<T> = Vec<(Vec<u8>, Event<T>, usize)>;

/// A streaming join's state in a checkpoint: both sides.
type JoinState<K, V, W> = (SideState<(K, V)>, SideState<(K, W)>);

impl<T: Clone> Side<T> {
    fn state(&self) -> SideState<T> {
        let mut cursor: FastMap<&[u8], usize> = FastMap::default();
        self.arrivals
            .iter()
            .map(|(key, _, bytes)| {
                let i = cursor.entry(key.as_slice()).or_insert(0);
                let event = self.by_key[key][*i].clone();
                *i += 1;
                (key.clone(), event, *bytes)
            })
            .collect()
    }
}

/// The streaming join of one partition.
struct StreamJoin<K, V, W> {
    op: u64,
    left_rx: mpsc::Receiver<SideResult>,
    right_rx: mpsc::Receiver<SideResult>,
    _readers: [AbortOnDrop; 2],
    /// Per side: ended, and which checkpoint's barrier it delivered while the other has not.
    ended: [bool; 2],
    barrier: [Option<u64>; 2],
    /// Checkpoints up to this one are done here.
    done: u64,
    left: Side<(K, V)>,
    right: Side<(K, W)>,
    memory: Reservation,
    retention: Option<Duration>,
    decoders: (RecordDecoder, RecordDecoder),
}

/// Reads a side of a streaming join into `tx` until it ends or fails.
fn spawn_side(mut from: ExchangeReader, tx: mpsc::Sender<SideResult>) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        loop {
            let item = match from.next_raw().await {
                Ok(Some(Raw::Records(raw))) => Ok(SideItem::Records(raw)),
                Ok(Some(Raw::Barrier(id))) => Ok(SideItem::Barrier(id)),
                Ok(Some(Raw::Cancel(id))) => Ok(SideItem::Cancel(id)),
                Ok(None) => return,
                Err(e) => Err(e),
            };
            let failed = item.is_err();
            // A closed channel means the join's task is gone; stop reading.
            if tx.send(item).await.is_err() || failed {
                return;
            }
        }
    }))
}

impl<K: Key, V: Value, W: Value> StreamJoin<K, V, W> {
    fn account(&mut self, bytes: usize) -> Result<(), EngineError> {
        if self.memory.try_grow(bytes) {
            return Ok(());
        }
        if let Some(retention) = self.retention {
            let cutoff = now_us().saturating_sub(retention.as_micros() as u64);
            let freed = self.left.evict(cutoff) + self.right.evict(cutoff);
            self.memory.shrink(freed);
            if self.memory.try_grow(bytes) {
                return Ok(());
            }
        }
        Err(EngineError::StateTooLarge {
            operator: self.memory.consumer().to_string(),
            bytes: self.memory.size() + bytes,
            limit: self.memory.limit(),
            hint:
                "give the join a retention (Dataset::join_with with JoinOptions::retention) or the engine more memory"
                    .into(),
        })
    }

    fn evict_expired(&mut self) {
        if let Some(retention) = self.retention {
            let cutoff = now_us().saturating_sub(retention.as_micros() as u64);
            let freed = self.left.evict(cutoff) + self.right.evict(cutoff);
            self.memory.shrink(freed);
        }
    }

    /// Joins an arrival of the left side (0) or the right side (1).
    fn arrive(&mut self, side: usize, raw: &[u8]) -> Result<Joined<K, V, W>, EngineError> {
        self.evict_expired();
        let mut out = Vec::new();
        if side == 0 {
            for (key, event, bytes) in keyed::<K, V>(&self.decoders.0, raw)? {
                out.extend(self.right.by_key.get(&key).into_iter().flatten().map(|r| joined(&event, r)));
                let bytes = bytes + key.len() + entry_overhead::<(K, V)>();
                self.account(bytes)?;
                self.left.keep(key, event, bytes);
            }
        } else {
            for (key, event, bytes) in keyed::<K, W>(&self.decoders.1, raw)? {
                out.extend(self.left.by_key.get(&key).into_iter().flatten().map(|l| joined(l, &event)));
                let bytes = bytes + key.len() + entry_overhead::<(K, W)>();
                self.account(bytes)?;
                self.right.keep(key, event, bytes);
            }
        }
        Ok(out)
    }

    /// The next item: joined records or a checkpoint event, both sides aligned.
    async fn next_item(&mut self) -> Result<Option<Item<(K, (V, W))>>, EngineError> {
        loop {
            let open = |s: usize| !self.ended[s] && self.barrier[s].is_none();
            let (left_open, right_open) = (open(0), open(1));
            if !left_open && !right_open {
                if self.ended == [true, true] {
                    return Ok(None);
                }
                // Both barriers of one checkpoint in (or one in, the other side ended).
                let id = self.barrier.iter().flatten().copied().max().expect("a side is held back");
                self.barrier = [None, None];
                self.done = id;
                return Ok(Some(Item::Barrier(id)));
            }
            let (side, received) = tokio::select! {
                item = self.left_rx.recv(), if left_open => (0, item),
                item = self.right_rx.recv(), if right_open => (1, item),
            };
            let Some(item) = received else {
                self.ended[side] = true;
                continue;
            };
            match item? {
                SideItem::Records(raw) => {
                    let out = self.arrive(side, &raw)?;
                    if !out.is_empty() {
                        return Ok(Some(Item::Batch(out)));
                    }
                }
                SideItem::Barrier(id) if id <= self.done => {}
                SideItem::Barrier(id) => {
                    let other = 1 - side;
                    if let Some(held) = self.barrier[other]
                        && held < id
                    {
                        // The other side gave `held` up: this side skipped it.
                        self.barrier[other] = None;
                        self.done = held;
                        self.barrier[side] = Some(id);
                        return Ok(Some(Item::Cancel(held)));
                    }
                    self.barrier[side] = Some(id);
                }
                SideItem::Cancel(id) if id <= self.done => {}
                SideItem::Cancel(id) => {
                    self.barrier = [None, None];
                    self.done = id;
                    return Ok(Some(Item::Cancel(id)));
                }
            }
        }
    }
}

/// The join of one partition, batch or streaming.
struct JoinInput<K, V, W> {
    batch: Option<BatchJoin<K, V, W>>,
    stream: Option<Box<StreamJoin<K, V, W>>>,
    /// Joined records waiting to be given out.
    pending: VecDeque<Batch<(K, (V, W))>>,
}

impl<K: Key, V: Value, W: Value> JoinInput<K, V, W> {
    /// Batch: builds the left table, or (if it outgrows the budget, or both
    /// sides are key-ordered) sets up a merge join.
    async fn start(
        &mut self,
        mut left: ExchangeReader,
        right: ExchangeReader,
    ) -> Result<BatchJoin<K, V, W>, EngineError> {
        let decoder = left.decoder();
        if left.key_ordered() && right.key_ordered() {
            let left = Sorted::from_exchange(left, "join (left)").await?;
            let right = Sorted::from_exchange(right, "join (right)").await?;
            return Ok(BatchJoin::Merge(Box::new(MergeJoin::new(left, right, decoder).await?)));
        }
        let mut memory = left.ctx.reservation("join (build side)", true);
        let mut table: FastMap<Vec<u8>, Vec<Event<(K, V)>>> = FastMap::default();
        while let Some(item) = left.next_raw().await? {
            let Raw::Records(raw) = item else { continue };
            let records = keyed::<K, V>(&left.decoder(), &raw)?;
            let bytes: usize = records.iter().map(|(k, _, b)| b + k.len() + entry_overhead::<(K, V)>()).sum();
            if !memory.try_grow(bytes) {
                // The left side does not fit: sort both sides and merge them.
                // The table becomes the left sorter's first run, written
                // before the sorter reserves anything, so the task never
                // holds two shares of the budget at once.
                let mut entries: Vec<_> = table.into_iter().collect();
                entries.sort_unstable_by(|a: &(Vec<u8>, _), b| a.0.cmp(&b.0));
                let mut writer = SpillWriter::create(&left.ctx.spill_dir)?;
                let mut v = Vec::new();
                for (key, events) in entries {
                    for event in events {
                        encode_value(&event.value.1, None, &mut v)?;
                        writer.push(&key, &v)?;
                    }
                }
                let run = writer.finish()?;
                left.ctx.stats.spilled.fetch_add(run.len(), std::sync::atomic::Ordering::Relaxed);
                drop(memory);
                let mut sorter = new_sorter(&left.ctx, "join (left)");
                sorter.add_run(run);
                push_all(&mut sorter, &raw, &left)?;
                while let Some(item) = left.next_raw().await? {
                    if let Raw::Records(raw) = item {
                        push_all(&mut sorter, &raw, &left)?;
                    }
                }
                let left = Sorted::Local(sorter.finish()?);
                let mut right = right;
                let mut sorter = new_sorter(&right.ctx, "join (right)");
                while let Some(item) = right.next_raw().await? {
                    if let Raw::Records(raw) = item {
                        push_all(&mut sorter, &raw, &right)?;
                    }
                }
                let right = Sorted::Local(sorter.finish()?);
                return Ok(BatchJoin::Merge(Box::new(MergeJoin::new(left, right, decoder).await?)));
            }
            for (key, event, _) in records {
                table.entry(key).or_default().push(event);
            }
        }
        Ok(BatchJoin::Probe { table, right: Box::new(right), _memory: memory })
    }

    async fn next_batch(&mut self) -> Result<Option<Batch<(K, (V, W))>>, EngineError> {
        loop {
            if let Some(batch) = self.pending.pop_front() {
                return Ok(Some(batch));
            }
            match self.batch.take().expect("a batch join") {
                BatchJoin::Start(left, right) => self.batch = Some(self.start(*left, *right).await?),
                BatchJoin::Probe { table, mut right, _memory } => {
                    let Some(item) = right.next_raw().await? else {
                        self.batch = Some(BatchJoin::Done);
                        continue;
                    };
                    if let Raw::Records(raw) = item {
                        let mut out = Vec::new();
                        for (key, event, _) in keyed::<K, W>(&right.decoder(), &raw)? {
                            for left in table.get(&key).into_iter().flatten() {
                                out.push(joined(left, &event));
                                if out.len() == BATCH_RECORDS {
                                    self.pending.push_back(std::mem::take(&mut out));
                                }
                            }
                        }
                        if !out.is_empty() {
                            self.pending.push_back(out);
                        }
                    }
                    self.batch = Some(BatchJoin::Probe { table, right, _memory });
                }
                BatchJoin::Merge(mut merge) => {
                    let out = merge.next_batch().await?;
                    if out.is_empty() {
                        self.batch = Some(BatchJoin::Done);
                        continue;
                    }
                    self.batch = Some(BatchJoin::Merge(merge));
                    return Ok(Some(out));
                }
                BatchJoin::Done => {
                    self.batch = Some(BatchJoin::Done);
                    return Ok(None);
                }
            }
        }
    }
}

impl<K: Key, V: Value, W: Value> Input<(K, (V, W))> for JoinInput<K, V, W> {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Item<(K, (V, W))>>, EngineError>> {
        Box::pin(async move {
            match &mut self.stream {
                Some(stream) => stream.next_item().await,
                None => Ok(self.next_batch().await?.map(Item::Batch)),
            }
        })
    }

    fn snapshot(&mut self, snapshot: &mut Snapshot) -> Result<(), EngineError> {
        if let Some(stream) = &self.stream {
            let state: JoinState<K, V, W> = (stream.left.state(), stream.right.state());
            snapshot.put(stream.op, &state)?;
        }
        Ok(())
    }
}

impl<K: Key, V: Value> Dataset<(K, V)> {
    /// Inner join with `other` on the key: one record `(key, (v, w))` for
    /// every pair of records with equal keys. Both sides are hashed into the
    /// same `exchange.partitions` partitions (`ExchangeMode::Sort`: sort
    /// exchanges, merged by key). Streaming joins keep every record within
    /// the memory budget; see [`Dataset::join_with`] for a retention.
    pub fn join<W: Value>(&self, other: &Dataset<(K, W)>, exchange: impl Into<Exchange>) -> Dataset<(K, (V, W))> {
        self.join_with(other, exchange, JoinOptions::default())
    }

    /// [`Dataset::join`] with options for its streaming state.
    pub fn join_with<W: Value>(
        &self,
        other: &Dataset<(K, W)>,
        exchange: impl Into<Exchange>,
        options: JoinOptions,
    ) -> Dataset<(K, (V, W))> {
        let exchange = exchange.into();
        let partitions = exchange.partitions.max(1);
        let sorted = exchange.mode == Some(ExchangeMode::Sort);
        let mut left = self.exchange_stage("join-left", exchange, Partitioner::Hash { partitions }, None);
        let mut right = other.exchange_stage("join-right", exchange, Partitioner::Hash { partitions }, None);
        (left.key_ordering, right.key_ordering) = (sorted, sorted);
        let (left_id, right_id) = (left.id, right.id);
        let mut stages = merge_stages(&self.stages, &other.stages);
        stages.push(Arc::new(left));
        stages.push(Arc::new(right));
        Dataset {
            engine: self.engine.clone(),
            parts: partitions,
            bounded: self.bounded && other.bounded,
            stages,
            open: Arc::new(move |ctx: &TaskContext| open_join::<K, V, W>(ctx, (left_id, right_id), options)),
            invalid: self.invalid.clone(),
        }
        .with_invalid(other.invalid.clone())
    }
}

fn open_join<K: Key, V: Value, W: Value>(
    ctx: &TaskContext,
    (left_id, right_id): (u64, u64),
    options: JoinOptions,
) -> Result<JoinInputBox<K, V, W>, EngineError> {
    let (left, right) = (ExchangeReader::new(ctx, left_id), ExchangeReader::new(ctx, right_id));
    if !left.timed() {
        return Ok(Box::new(JoinInput::<K, V, W> {
            batch: Some(BatchJoin::Start(Box::new(left), Box::new(right))),
            stream: None,
            pending: VecDeque::new(),
        }));
    }
    // The join's state is kept under the left stage's id.
    let op = left_id;
    let mut memory = ctx.reservation("join", false);
    let (mut left_side, mut right_side) = (Side::default(), Side::default());
    if let Some((l, r)) = ctx.restored::<JoinState<K, V, W>>(op)? {
        for (key, event, bytes) in l {
            memory.try_grow(bytes);
            left_side.keep(key, event, bytes);
        }
        for (key, event, bytes) in r {
            memory.try_grow(bytes);
            right_side.keep(key, event, bytes);
        }
    }
    let decoders = (left.decoder(), right.decoder());
    let (left_tx, left_rx) = mpsc::channel(4);
    let (right_tx, right_rx) = mpsc::channel(4);
    let done = ctx.checkpoints.as_ref().map_or(0, |c| *c.trigger.borrow());
    Ok(Box::new(JoinInput::<K, V, W> {
        batch: None,
        stream: Some(Box::new(StreamJoin {
            op,
            left_rx,
            right_rx,
            _readers: [spawn_side(left, left_tx), spawn_side(right, right_tx)],
            ended: [false, false],
            barrier: [None, None],
            done,
            left: left_side,
            right: right_side,
            memory,
            retention: options.retention,
            decoders,
        })),
        pending: VecDeque::new(),
    }))
}
