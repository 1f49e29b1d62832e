//! [`ExchangeReader`]: a task's read of one partition of an exchange.
//!
//! Batch exchanges yield every committed record of the partition: block by
//! block in the order the service sends them, or (a key-ordered sort
//! exchange) one record at a time in key order, merged by the client within
//! a reservation of the engine's budget.
//!
//! Streaming (hybrid) exchanges interleave the records of every upstream
//! map, and carry their control records (`checkpoint::Control`). The reader
//! takes those out and aligns checkpoint barriers (see
//! [`crate::checkpoint`]): once barrier `n` came from a map, what that map
//! sends next is held back until barrier `n` came from every map that has
//! not ended; then the reader yields `Barrier(n)` and goes on with what it
//! held. What it holds counts in the engine's budget, up to the job's
//! alignment buffer; past that it gives the checkpoint up (yields
//! `Cancel(n)`, which the task passes on and reports) and releases it all.

use std::collections::VecDeque;

use bytes::Bytes;
use shuffle_client::{ClientError, PartitionReader, RecordBlock};
use shuffle_protocol::RecordIter;

use crate::{
    EngineError, ExecutionMode,
    checkpoint::Control,
    exchange::{Key, Value, decode_record},
    memory::Reservation,
    task::{Batch, Event, RunShuffle, TaskContext, now_us},
};

/// What a reader yields, before decoding: framed records, all data.
pub(crate) enum Raw {
    /// Framed records (key and value as the exchange carries them).
    Records(Bytes),
    Barrier(u64),
    Cancel(u64),
}

/// Framed records from one map, from `offset` on.
struct Segment {
    map: usize,
    raw: Bytes,
    offset: usize,
}

/// Barrier alignment over the maps of one hybrid partition.
struct Aligner {
    /// Per map: whether it has ended, whether it is held back.
    ended: Vec<bool>,
    blocked: Vec<bool>,
    /// The checkpoint being aligned.
    aligning: Option<u64>,
    /// Checkpoints up to this one are done here (passed on or given up).
    done: u64,
    /// What blocked maps sent, in arrival order.
    held: VecDeque<Segment>,
    reservation: Reservation,
    limit: usize,
}

impl Aligner {
    fn release(&mut self, pending: &mut VecDeque<Segment>) {
        self.blocked.iter_mut().for_each(|b| *b = false);
        while let Some(segment) = self.held.pop_back() {
            pending.push_front(segment);
        }
        self.reservation.free();
    }

    fn aligned(&self) -> bool {
        self.ended.iter().zip(&self.blocked).all(|(e, b)| *e || *b)
    }
}

/// How the records of one exchange partition decode, and how errors name it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RecordDecoder {
    pub shuffle: u32,
    pub partition: u32,
    /// Streaming: values carry their creation time.
    pub timed: bool,
}

impl RecordDecoder {
    /// Decodes one record; `now` is its creation time unless the record carries one.
    pub(crate) fn decode<K: Key, V: Value>(
        &self,
        key: &[u8],
        value: &[u8],
        now: u64,
    ) -> Result<Event<(K, V)>, EngineError> {
        let (k, v, created) = decode_record(key, value, self.timed).map_err(|detail| self.bad(detail))?;
        Ok(Event { value: (k, v), created_us: created.unwrap_or(now) })
    }

    pub(crate) fn bad(&self, detail: String) -> EngineError {
        EngineError::Decode { shuffle: self.shuffle, partition: self.partition, detail }
    }
}

/// Reads one partition of a stage's shuffle for a task and decodes its records.
pub(crate) struct ExchangeReader {
    pub(crate) ctx: TaskContext,
    pub(crate) shuffle: RunShuffle,
    reader: Option<PartitionReader>,
    /// Streaming: segments to go through, the next first.
    pending: VecDeque<Segment>,
    aligner: Option<Aligner>,
    /// Items found while cutting a segment, to yield after the records before them.
    queued: VecDeque<Raw>,
    /// The stream ended (every map committed and every block was read).
    exhausted: bool,
    /// What a key-ordered read may hold.
    merge_memory: usize,
    /// Framed bytes per record in the last batch decoded (a first guess before it).
    bytes_per_record: usize,
}

impl ExchangeReader {
    pub(crate) fn new(ctx: &TaskContext, stage: u64) -> Self {
        let shuffle = ctx.shuffle(stage);
        let aligner = (ctx.mode == ExecutionMode::Streaming).then(|| {
            let maps = shuffle.spec.maps as usize;
            Aligner {
                ended: vec![false; maps],
                blocked: vec![false; maps],
                aligning: None,
                done: ctx.checkpoints.as_ref().map_or(0, |c| *c.trigger.borrow()),
                held: VecDeque::new(),
                reservation: ctx.reservation("barrier alignment", false),
                limit: ctx.checkpoints.as_ref().map_or(0, |c| c.alignment_buffer),
            }
        });
        Self {
            ctx: ctx.clone(),
            shuffle,
            reader: None,
            pending: VecDeque::new(),
            aligner,
            queued: VecDeque::new(),
            exhausted: false,
            merge_memory: shuffle_client::DEFAULT_MERGE_MEMORY,
            bytes_per_record: 32,
        }
    }

    pub(crate) fn timed(&self) -> bool {
        self.ctx.mode == ExecutionMode::Streaming
    }

    /// Whether the service merges this partition's runs by key (a batch key-ordered sort exchange).
    pub(crate) fn key_ordered(&self) -> bool {
        self.shuffle.spec.key_ordering
    }

    async fn reader(&mut self) -> Result<&mut PartitionReader, ClientError> {
        if self.reader.is_none() {
            let mut reader = self.ctx.client.reader(self.shuffle.id, self.ctx.part).await?;
            reader.set_merge_memory(self.merge_memory);
            self.reader = Some(reader);
        }
        Ok(self.reader.as_mut().expect("opened above"))
    }

    async fn next_block(&mut self) -> Result<Option<RecordBlock>, EngineError> {
        Ok(self.reader().await?.next_block().await?)
    }

    /// How this partition's records decode.
    pub(crate) fn decoder(&self) -> RecordDecoder {
        RecordDecoder { shuffle: self.shuffle.id.0, partition: self.ctx.part, timed: self.timed() }
    }

    /// Decodes framed records.
    pub(crate) fn decode_all<K: Key, V: Value>(&mut self, raw: &[u8]) -> Result<Batch<(K, V)>, EngineError> {
        // One clock read per batch: records without a creation time arrived together.
        let now = now_us();
        let decoder = self.decoder();
        // Sized by the last batch's bytes per record, so it does not grow while filling.
        let mut batch = Vec::with_capacity(raw.len() / self.bytes_per_record.max(1) + 1);
        for record in RecordIter::new(raw) {
            let (k, v) = record.map_err(|e| decoder.bad(e.to_string()))?;
            batch.push(decoder.decode(k, v, now)?);
        }
        if !batch.is_empty() {
            self.bytes_per_record = raw.len() / batch.len();
        }
        Ok(batch)
    }

    fn bad(&self, detail: String) -> EngineError {
        self.decoder().bad(detail)
    }

    /// The next item: framed records of maps not held back, or a checkpoint
    /// event; `None` once the partition is complete.
    pub(crate) async fn next_raw(&mut self) -> Result<Option<Raw>, EngineError> {
        if self.aligner.is_none() {
            let Some(block) = self.next_block().await? else { return Ok(None) };
            let raw = block.raw().clone();
            self.ctx.stats.add_in(block.len(), raw.len());
            return Ok(Some(Raw::Records(raw)));
        }
        loop {
            if let Some(item) = self.queued.pop_front() {
                return Ok(Some(item));
            }
            if let Some(segment) = self.pending.pop_front() {
                if let Some(records) = self.cut(segment)? {
                    return Ok(Some(records));
                }
                continue;
            }
            if self.exhausted {
                return Ok(None);
            }
            match self.next_block().await? {
                Some(block) => {
                    let map = block.map() as usize;
                    if map >= self.shuffle.spec.maps as usize {
                        return Err(self.bad(format!("a block of map {map}")));
                    }
                    self.pending.push_back(Segment { map, raw: block.raw().clone(), offset: 0 });
                }
                None => {
                    self.exhausted = true;
                    let aligner = self.aligner.as_mut().expect("streaming");
                    if let Some(id) = aligner.aligning.take() {
                        // Every map ended: nothing can be held back any more.
                        aligner.done = id;
                        aligner.release(&mut self.pending);
                        self.queued.push_back(Raw::Barrier(id));
                    }
                }
            }
        }
    }

    /// Goes through `segment` up to its first control record: yields the
    /// data records before it (if any) and queues what the control means.
    fn cut(&mut self, segment: Segment) -> Result<Option<Raw>, EngineError> {
        let aligner = self.aligner.as_mut().expect("streaming");
        let Segment { map, raw, offset } = segment;
        if aligner.blocked[map] {
            let len = raw.len() - offset;
            if aligner.reservation.size() + len > aligner.limit || !aligner.reservation.try_grow(len) {
                // Holding more would pass the alignment budget: give the checkpoint up.
                let id = aligner.aligning.take().expect("a map is held back only while aligning");
                aligner.done = id;
                // Behind what the map sent before it, so the map's order holds.
                aligner.held.push_back(Segment { map, raw, offset });
                aligner.release(&mut self.pending);
                if let Some(checkpoints) = &self.ctx.checkpoints {
                    let reason = format!("its barrier alignment would hold more than {} bytes", aligner.limit);
                    checkpoints.decline(id, reason);
                }
                return Ok(Some(Raw::Cancel(id)));
            }
            aligner.held.push_back(Segment { map, raw, offset });
            return Ok(None);
        }
        let mut records = RecordIter::new(&raw[offset..]);
        let (mut at, mut count, mut bytes) = (offset, 0usize, 0usize);
        let mut control = None;
        while let Some(record) = records.next() {
            let (key, value) = record.map_err(|e| EngineError::Decode {
                shuffle: self.shuffle.id.0,
                partition: self.ctx.part,
                detail: e.to_string(),
            })?;
            let decoded = Control::decode(value).map_err(|detail| EngineError::Decode {
                shuffle: self.shuffle.id.0,
                partition: self.ctx.part,
                detail,
            })?;
            if let Some(c) = decoded {
                control = Some(c);
                break;
            }
            count += 1;
            bytes += key.len() + value.len();
            at = raw.len() - records.remaining_bytes();
        }
        let after = raw.len() - records.remaining_bytes();
        self.ctx.stats.add_in(count, bytes);
        let data = (at > offset).then(|| Raw::Records(raw.slice(offset..at)));
        let Some(control) = control else { return Ok(data) };
        if after < raw.len() {
            self.pending.push_front(Segment { map, raw, offset: after });
        }
        self.control(map, control);
        match data {
            Some(data) => Ok(Some(data)),
            None => Ok(self.queued.pop_front()),
        }
    }

    /// What a control record from `map` means for the alignment.
    fn control(&mut self, map: usize, control: Control) {
        let aligner = self.aligner.as_mut().expect("streaming");
        match control {
            Control::End => aligner.ended[map] = true,
            Control::Barrier(id) if id <= aligner.done => {} // of a checkpoint given up here
            Control::Barrier(id) => {
                if let Some(current) = aligner.aligning
                    && id > current
                {
                    // Checkpoint `current` was given up upstream of `map`.
                    aligner.done = current;
                    aligner.aligning = None;
                    aligner.release(&mut self.pending);
                    self.queued.push_back(Raw::Cancel(current));
                }
                aligner.aligning = Some(id);
                aligner.blocked[map] = true;
            }
            Control::Cancel(id) if id <= aligner.done => {}
            Control::Cancel(id) => {
                aligner.done = id;
                aligner.aligning = None;
                aligner.release(&mut self.pending);
                self.queued.push_back(Raw::Cancel(id));
            }
        }
        if let Some(id) = aligner.aligning
            && aligner.aligned()
        {
            aligner.done = id;
            aligner.aligning = None;
            aligner.release(&mut self.pending);
            self.queued.push_back(Raw::Barrier(id));
        }
    }

    /// The next record in key order (a batch key-ordered sort exchange),
    /// merged by the client within what [`ExchangeReader::set_merge_memory`] set.
    pub(crate) async fn next_sorted(&mut self) -> Result<Option<(Bytes, Bytes)>, ClientError> {
        let reader = self.reader().await?;
        Ok(reader.next_record().await?.map(|r| (r.key, r.value)))
    }

    /// Sets what a key-ordered read may hold (before the first read).
    pub(crate) fn set_merge_memory(&mut self, bytes: usize) {
        self.merge_memory = bytes;
    }

    /// Starts the partition over with a read in arrival order (after a
    /// key-ordered read could not fit its budget, before it read anything).
    pub(crate) fn reopen_unordered(&mut self) {
        self.reader = None;
    }
}
