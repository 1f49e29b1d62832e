//! `OpenPartition`: streams one partition to a reader and closes with
//! `PartitionEnd`, listing what each map committed to the partition so the
//! reader can check it got all of it.
//!
//! Hash and sort readers start once every map has committed and receive
//! exactly the committed attempt's blocks of every map, each once. Hybrid
//! readers receive blocks as they arrive until every map has committed and
//! the log is drained, and are told when an attempt whose blocks they
//! received fails. Blocks in memory go out without copying; blocks on disk
//! are read into buffers counted in the budget (in sort mode, through the
//! shuffle's elevator). The reader holds only the batch it is sending.
//!
//! `OpenPartitionByKey` serves a key-ordered sort shuffle run by run: the
//! reader asks for one chunk of one run at a time and merges them itself,
//! so neither side holds the partition.

use std::{
    collections::{HashMap, HashSet},
    os::fd::AsFd,
    sync::Arc,
};

use bytes::Bytes;
use shuffle_protocol::{
    AttemptId, ErrorKind, ExchangeMode, MapId, PartitionId, Request, Response, ResumePoint, ServiceError, ShuffleId,
};
use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;

use crate::{
    elevator::{DiskRead, read_blocking},
    shuffle::Shuffle,
    state::{AppSession, ServiceState},
    stats::ServerStats,
    storage::{BlockRef, DataFile, ReadBatch, ReadCursor},
    transport::{FrameReader, FrameSink, FrameWriter},
};

/// Bytes a reader takes from storage per batch: enough to amortise locks and
/// a disk read, small enough that a reader pins little.
pub const READ_BATCH_BYTES: usize = 1 << 20;

/// Serves one partition read; `direct` (same-host readers on the Unix
/// socket) hands over blocks that lie in files as the files and ranges.
pub async fn handle_read<W: FrameSink>(
    state: &ServiceState,
    session: &AppSession,
    (shuffle_id, partition): (ShuffleId, PartitionId),
    writer: &mut FrameWriter<W>,
    shutdown: &CancellationToken,
    direct: bool,
) -> Result<(), ServiceError> {
    let shuffle = state.shuffle(session, shuffle_id)?;
    serve_partition(state, &shuffle, partition, writer, shutdown, direct, &[]).await
}

/// Serves one partition of `shuffle` (a standalone server's shuffle, or a
/// worker's copy of a group), leaving out the blocks `resume` says the
/// reader already has.
pub async fn serve_partition<W: FrameSink>(
    state: &ServiceState,
    shuffle: &Shuffle,
    partition: PartitionId,
    writer: &mut FrameWriter<W>,
    shutdown: &CancellationToken,
    direct: bool,
    resume: &[ResumePoint],
) -> Result<(), ServiceError> {
    shuffle.open_reader(partition)?;
    let _reading = state.reader_started();
    writer.response(&Response::PartitionOpened { spec: shuffle.spec() }).await?;
    let hybrid = shuffle.spec().mode == ExchangeMode::Hybrid;
    if !hybrid {
        tokio::select! {
            complete = shuffle.wait_complete() => complete?,
            _ = shutdown.cancelled() => {
                return Err(ServiceError::new(
                    ErrorKind::ShuttingDown,
                    format!("the server is shutting down before {} completed", shuffle.label()),
                ));
            }
        }
    }
    let mut cursor = ReadCursor::default();
    let mut skip = Skip::new(resume);
    // Attempts whose blocks the reader holds: those sent here, and (a
    // resumed hybrid read) those another copy sent, which this copy may
    // never have seen: a group that moved after losing its only copy gets
    // none of the attempts that pushed there, and they never commit.
    let mut delivered: HashSet<(MapId, AttemptId)> = HashSet::new();
    if hybrid {
        delivered.extend(resume.iter().filter(|p| p.blocks > 0).map(|p| (p.map, p.attempt)));
    }
    let producer_failed = |delivered: &HashSet<(MapId, AttemptId)>| {
        delivered.iter().copied().find(|&(m, a)| {
            shuffle.attempt_failed(m, a) || shuffle.committed_attempt(m).is_some_and(|committed| committed != a)
        })
    };
    let mut opened = OpenedFiles::default();
    loop {
        let mut changed = shuffle.subscribe(partition);
        if let Some(changed) = &mut changed {
            changed.borrow_and_update();
        }
        // A worker's copy found to lack a decided map's blocks while this
        // read went on: the reader goes on at the other copy.
        shuffle.check_lacking(partition)?;
        if let Some((map, attempt)) = producer_failed(&delivered) {
            let rereadable = shuffle.rereadable();
            return writer.response(&Response::ProducerFailed { map, attempt, rereadable }).await;
        }
        // Completion is read before the log: every block of a committed
        // attempt was appended before its commit, so none can be missed.
        let complete = shuffle.is_complete();
        let batch = shuffle.read(partition, &mut cursor, READ_BATCH_BYTES)?;
        if !batch.is_empty() {
            let send = skip.filter(&batch);
            if !send.is_empty() && direct {
                send_batch_direct(state, shuffle, &send, writer, &mut opened).await?;
            } else if !send.is_empty() {
                send_batch(state, shuffle, &send, writer).await?;
            }
            shuffle.sent(partition, &batch);
            delivered.extend(batch.owners.iter().copied());
            // Reading may have emptied segments: the reader lets go of their files.
            opened.close_deleted(writer).await?;
            continue;
        }
        if complete || !hybrid {
            // The decision that completed the shuffle may have found this
            // copy lacking since the check above (it marks the copy before
            // it records the decision): the end must not name that map.
            shuffle.check_lacking(partition)?;
            // An attempt the reader holds blocks of may have lost since the check above.
            if let Some((map, attempt)) = producer_failed(&delivered) {
                let rereadable = shuffle.rereadable();
                return writer.response(&Response::ProducerFailed { map, attempt, rereadable }).await;
            }
            let maps = shuffle.partition_commits(partition)?;
            return writer.response(&Response::PartitionEnd { partition, maps }).await;
        }
        let Some(changed) = &mut changed else { continue };
        tokio::select! {
            _ = changed.changed() => {}
            _ = shutdown.cancelled() => {
                return Err(ServiceError::new(ErrorKind::ShuttingDown, "the server is shutting down"));
            }
        }
    }
}

/// The blocks a resumed read leaves out: the first `blocks` of each
/// attempt, which the reader received from the other copy. A copy holds
/// an attempt's blocks of a partition in sequence order, so counting them
/// as they pass finds exactly those.
struct Skip {
    left: HashMap<(MapId, AttemptId), u32>,
}

impl Skip {
    fn new(resume: &[ResumePoint]) -> Self {
        Self { left: resume.iter().filter(|p| p.blocks > 0).map(|p| ((p.map, p.attempt), p.blocks)).collect() }
    }

    /// The part of `batch` to send.
    fn filter(&mut self, batch: &ReadBatch) -> ReadBatch {
        let mut out = ReadBatch::default();
        for ((block, owner), position) in batch.blocks.iter().zip(&batch.owners).zip(&batch.positions) {
            if let Some(left) = self.left.get_mut(owner)
                && *left > 0
            {
                *left -= 1;
                continue;
            }
            out.push(block.clone(), *owner, *position);
        }
        out
    }
}

/// Serves a key-ordered read (`OpenPartitionByKey`) of a standalone
/// server's shuffle: see [`serve_partition_by_key`].
pub async fn handle_read_by_key<R, W>(
    state: &ServiceState,
    session: &AppSession,
    (shuffle_id, partition): (ShuffleId, PartitionId),
    streams: (&mut FrameReader<R>, &mut FrameWriter<W>),
    shutdown: &CancellationToken,
    direct: bool,
) -> Result<(), ServiceError>
where
    R: AsyncRead + Unpin + Send,
    W: FrameSink,
{
    let shuffle = state.shuffle(session, shuffle_id)?;
    serve_partition_by_key(state, &shuffle, partition, streams, shutdown, direct).await
}

/// Serves a key-ordered read of one partition of `shuffle` (a standalone
/// server's shuffle, or a worker's copy of a group). For a sort shuffle
/// with key ordering: `PartitionOpened`, then once every map has committed
/// the `RunIndex`, then one chunk per `ReadRun` the reader sends, until it
/// ends its side of the stream. The reader merges the runs holding only the
/// chunks it asked for; the server holds one chunk's disk reads at a time.
/// A `ReadRun` names its run and first block, so the server keeps no
/// position: a reader that lost another copy mid-read goes on here from
/// where it was. Any other shuffle is read as by `OpenPartition`
/// (`direct`: `…Direct`).
pub async fn serve_partition_by_key<R, W>(
    state: &ServiceState,
    shuffle: &Shuffle,
    partition: PartitionId,
    (reader, writer): (&mut FrameReader<R>, &mut FrameWriter<W>),
    shutdown: &CancellationToken,
    direct: bool,
) -> Result<(), ServiceError>
where
    R: AsyncRead + Unpin + Send,
    W: FrameSink,
{
    let spec = shuffle.spec();
    if !(spec.mode == ExchangeMode::Sort && spec.key_ordering) {
        return serve_partition(state, shuffle, partition, writer, shutdown, direct, &[]).await;
    }
    shuffle.open_reader(partition)?;
    let _reading = state.reader_started();
    writer.response(&Response::PartitionOpened { spec }).await?;
    tokio::select! {
        complete = shuffle.wait_complete() => complete?,
        _ = shutdown.cancelled() => {
            return Err(ServiceError::new(
                ErrorKind::ShuttingDown,
                format!("the server is shutting down before {} completed", shuffle.label()),
            ));
        }
    }
    shuffle.check_lacking(partition)?;
    let runs = shuffle.runs(partition)?;
    let maps = shuffle.partition_commits(partition)?;
    writer.response(&Response::RunIndex { runs: runs.clone(), maps }).await?;
    let mut opened = OpenedFiles::default();
    loop {
        let request = tokio::select! {
            request = reader.next_request() => request?,
            _ = shutdown.cancelled() => {
                return Err(ServiceError::new(ErrorKind::ShuttingDown, "the server is shutting down"));
            }
        };
        let (run, from, max_bytes) = match request {
            None => return Ok(()), // the reader has all it wants
            Some(Request::ReadRun { run, from, max_bytes }) => (run, from, max_bytes),
            Some(other) => {
                return Err(ServiceError::new(
                    ErrorKind::UnexpectedMessage,
                    format!("{} on a key-ordered read (only ReadRun may follow)", crate::push::request_name(&other)),
                ));
            }
        };
        let info = runs.get(run as usize).ok_or_else(|| {
            ServiceError::new(
                ErrorKind::UnexpectedMessage,
                format!("ReadRun names run {run}; partition {partition} of {} has {}", shuffle.label(), runs.len()),
            )
        })?;
        if from >= info.blocks {
            return Err(ServiceError::new(
                ErrorKind::UnexpectedMessage,
                format!("ReadRun asks for block {from} of run {run}, which has {} blocks", info.blocks),
            ));
        }
        let mut cursor = ReadCursor { map: info.map as usize, index: u64::from(info.first_block + from) };
        let max_bytes = (max_bytes as usize).clamp(1, READ_BATCH_BYTES);
        let mut batch = shuffle.read(partition, &mut cursor, max_bytes)?;
        // The storage reads on past the run (into the map's next run or the next map).
        let left = (info.blocks - from) as usize;
        batch.blocks.truncate(left);
        batch.owners.truncate(left);
        batch.positions.truncate(left);
        if batch.is_empty() {
            return Err(ServiceError::new(
                ErrorKind::Io,
                format!("run {run} of {} has no block {from}", shuffle.label()),
            ));
        }
        if direct {
            send_batch_direct(state, shuffle, &batch, writer, &mut opened).await?;
        } else {
            send_batch(state, shuffle, &batch, writer).await?;
        }
        writer.response(&Response::RunChunkEnd { run, blocks: batch.blocks.len() as u32 }).await?;
    }
}

/// Sends a batch: memory blocks as they are, disk blocks read first.
async fn send_batch<W: FrameSink>(
    state: &ServiceState,
    shuffle: &Shuffle,
    batch: &ReadBatch,
    writer: &mut FrameWriter<W>,
) -> Result<(), ServiceError> {
    let disk: Vec<DiskRead> = batch
        .blocks
        .iter()
        .filter_map(|b| match b {
            BlockRef::Disk { file, offset, len } => {
                Some(DiskRead { file: file.clone(), offset: *offset, len: *len as usize })
            }
            BlockRef::Memory(_) => None,
        })
        .collect();
    let mut _permits = None;
    let mut from_disk = Vec::new().into_iter();
    if !disk.is_empty() {
        // Read buffers are new memory: they hold permits of the read share until the stream has taken them.
        let bytes: usize = disk.iter().map(|d| d.len).sum();
        let permits = state
            .read_permits
            .clone()
            .acquire_many_owned(bytes.min(state.read_share) as u32)
            .await
            .map_err(|_| ServiceError::new(ErrorKind::ShuttingDown, "the server is shutting down"))?;
        _permits = Some(permits);
        let bytes = if shuffle.spec().mode == ExchangeMode::Sort {
            shuffle.scheduler.read(disk).await?
        } else {
            tokio::task::spawn_blocking(move || read_blocking(&disk))
                .await
                .map_err(|e| ServiceError::new(ErrorKind::Io, format!("disk read task: {e}")))??
        };
        from_disk = bytes.into_iter();
    }
    let blocks: Vec<Bytes> = batch
        .blocks
        .iter()
        .map(|b| match b {
            BlockRef::Memory(bytes) => bytes.clone(),
            BlockRef::Disk { .. } => from_disk.next().expect("one read per disk block"),
        })
        .collect();
    writer.blocks(&blocks).await?;
    let bytes: usize = blocks.iter().map(Bytes::len).sum();
    state.stats.served(shuffle.spec().mode, blocks.len() as u64, bytes as u64);
    Ok(())
}

/// The files a direct read has passed to its reader, by file key: the
/// number the reader knows each by, and the file.
#[derive(Default)]
struct OpenedFiles {
    files: HashMap<u64, (u32, Arc<DataFile>)>,
    /// The number the next file passed gets (numbers are never reused).
    next: u32,
}

impl OpenedFiles {
    /// Tells the reader to close the files the server has deleted (a
    /// selective stream's read segments, the segments of failed attempts):
    /// no block of theirs is served any more, and a descriptor the reader
    /// kept would hold the disk space of an unlinked file, and one more
    /// descriptor, for as long as an unbounded stream runs.
    async fn close_deleted<W: FrameSink>(&mut self, writer: &mut FrameWriter<W>) -> Result<(), ServiceError> {
        let deleted: Vec<u64> = self.files.iter().filter(|(_, (_, f))| f.is_deleted()).map(|(k, _)| *k).collect();
        for key in deleted {
            if let Some((file, _)) = self.files.remove(&key) {
                writer.response(&Response::FileClosed { file }).await?;
            }
        }
        Ok(())
    }
}

/// Sends a batch to a same-host reader: memory blocks as block frames, runs
/// of disk blocks that lie back to back in one file as a `FileRange` (the
/// file itself passed once per read, with `FileOpened`). Nothing on disk is
/// read or copied by the server.
async fn send_batch_direct<W: FrameSink>(
    state: &ServiceState,
    shuffle: &Shuffle,
    batch: &ReadBatch,
    writer: &mut FrameWriter<W>,
    opened: &mut OpenedFiles,
) -> Result<(), ServiceError> {
    let mut memory: Vec<Bytes> = Vec::new();
    let mut i = 0;
    while i < batch.blocks.len() {
        match &batch.blocks[i] {
            BlockRef::Memory(bytes) => {
                memory.push(bytes.clone());
                i += 1;
            }
            BlockRef::Disk { file, offset, len } => {
                if !memory.is_empty() {
                    writer.blocks(&std::mem::take(&mut memory)).await?;
                }
                let (start, mut end, mut count) = (*offset, *offset + u64::from(*len), 1u32);
                while let Some(BlockRef::Disk { file: next, offset, len }) = batch.blocks.get(i + count as usize)
                    && std::sync::Arc::ptr_eq(next, file)
                    && *offset == end
                {
                    end += u64::from(*len);
                    count += 1;
                }
                let index = match opened.files.get(&file.key()) {
                    Some((index, _)) => *index,
                    None => {
                        let index = opened.next;
                        writer.response_with_fd(&Response::FileOpened { file: index }, file.file().as_fd()).await?;
                        opened.files.insert(file.key(), (index, file.clone()));
                        opened.next += 1;
                        index
                    }
                };
                writer
                    .response(&Response::FileRange { file: index, offset: start, len: end - start, blocks: count })
                    .await?;
                ServerStats::add(&state.stats.served_direct_bytes, end - start);
                i += count as usize;
            }
        }
    }
    if !memory.is_empty() {
        writer.blocks(&memory).await?;
    }
    state.stats.served(shuffle.spec().mode, batch.blocks.len() as u64, batch.bytes() as u64);
    Ok(())
}
