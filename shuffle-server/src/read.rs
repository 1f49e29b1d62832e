//! `OpenPartition`: streams one partition to a reader once every map of the
//! shuffle has committed — exactly the committed attempt's blocks of every
//! map, each once — and closes with `PartitionEnd`, listing what each map
//! committed to the partition so the reader can check it got all of it.
//!
//! Hash-mode blocks go out in arrival order. Sort-mode blocks lie in sealed
//! per-map files and go through the shuffle's elevator ([`crate::elevator`]),
//! which serves all readers' pending blocks in file-offset order; within one
//! map's file that order is also the blocks' sequence order.
//!
//! Hybrid partitions are streamed as blocks arrive (see [`serve_hybrid`]).

use std::collections::HashSet;

use shuffle_protocol::{ErrorKind, PartitionId, Response, ServiceError, ShuffleId};

use crate::{
    shuffle::SnapshotBlock,
    shutdown::Shutdown,
    state::{AppSession, ServiceState},
    transport::{FrameSink, FrameWriter},
};

/// Blocks handed to the stream per write; bounds the frame headers built ahead.
const BLOCKS_PER_WRITE: usize = 64;

/// Serves one partition read.
pub async fn handle_read<W: FrameSink>(
    state: &ServiceState,
    session: &AppSession,
    (shuffle_id, partition): (ShuffleId, PartitionId),
    writer: &mut FrameWriter<W>,
    shutdown: &Shutdown,
) -> Result<(), ServiceError> {
    let shuffle = state.shuffle(session, shuffle_id)?;
    shuffle.check_partition(partition)?;
    let _reading = state.reader_started();
    let io = |e: std::io::Error| ServiceError::new(ErrorKind::Io, format!("sending partition {partition}: {e}"));
    if let Some(hybrid) = shuffle.hybrid() {
        hybrid.open_reader(&shuffle.core, partition)?;
        writer.response(&Response::PartitionOpened { spec: shuffle.spec() }).await.map_err(io)?;
        return serve_hybrid(state, &shuffle, partition, writer, shutdown).await;
    }
    writer.response(&Response::PartitionOpened { spec: shuffle.spec() }).await.map_err(io)?;
    tokio::select! {
        complete = shuffle.wait_complete() => complete?,
        _ = shutdown.wait() => {
            return Err(ServiceError::new(
                ErrorKind::ShuttingDown,
                format!("the server is shutting down before {} completed", shuffle.label()),
            ));
        }
    }
    let snapshot = shuffle.partition_snapshot(partition)?;
    let total = snapshot.blocks.len();
    if snapshot.blocks.iter().all(|b| b.position.is_none()) {
        let blocks: Vec<_> = snapshot.blocks.into_iter().map(|b: SnapshotBlock| b.bytes).collect();
        for batch in blocks.chunks(BLOCKS_PER_WRITE) {
            writer.blocks(batch).await.map_err(io)?;
            count_served(state, &shuffle, batch);
        }
    } else {
        let mut scheduled = shuffle.scheduler.register(snapshot.blocks);
        let mut sent = 0;
        while sent < total {
            let Some(first) = scheduled.rx.recv().await else {
                return Err(ServiceError::new(ErrorKind::Io, "read scheduler dropped a reader"));
            };
            let mut batch = vec![first];
            while batch.len() < BLOCKS_PER_WRITE
                && let Ok(next) = scheduled.rx.try_recv()
            {
                batch.push(next);
            }
            writer.blocks(&batch).await.map_err(io)?;
            count_served(state, &shuffle, &batch);
            sent += batch.len();
            scheduled.sent(batch.iter().map(|b| b.len()).sum());
        }
    }
    writer.response(&Response::PartitionEnd { partition, maps: snapshot.commits }).await.map_err(io)
}

/// Streams a hybrid partition: every servable block as it arrives, in log
/// order, until all maps have committed and the log is drained. Tells the
/// reader when an attempt whose blocks it received fails, and stops.
async fn serve_hybrid<W: FrameSink>(
    state: &ServiceState,
    shuffle: &crate::shuffle::Shuffle,
    partition: PartitionId,
    writer: &mut FrameWriter<W>,
    shutdown: &Shutdown,
) -> Result<(), ServiceError> {
    let hybrid = shuffle.hybrid().expect("called for hybrid shuffles");
    let io = |e: std::io::Error| ServiceError::new(ErrorKind::Io, format!("sending partition {partition}: {e}"));
    let mut cursor = 0;
    let mut delivered = HashSet::new();
    loop {
        let mut changed = hybrid.subscribe(partition);
        changed.borrow_and_update();
        if shuffle.core.is_removed() {
            return Err(ServiceError::new(ErrorKind::UnknownShuffle, format!("{} was unregistered", shuffle.label())));
        }
        if let Some(&(map, attempt)) = delivered.iter().find(|(m, a)| hybrid.is_failed(*m, *a)) {
            let rereadable = hybrid.rereadable();
            return writer.response(&Response::ProducerFailed { map, attempt, rereadable }).await.map_err(io);
        }
        // Completion is read before the log: every block of a committed
        // attempt was appended before its commit, so none can be missed.
        let complete = shuffle.is_complete();
        let mut batch = Vec::new();
        let mut indices = Vec::new();
        while batch.len() < BLOCKS_PER_WRITE {
            let Some(next) = hybrid.next_block(&shuffle.core, partition, cursor)? else { break };
            delivered.insert((next.map, next.attempt));
            cursor = next.index + 1;
            indices.push(next.index);
            batch.push(next.bytes);
        }
        if !batch.is_empty() {
            writer.blocks(&batch).await.map_err(io)?;
            count_served(state, shuffle, &batch);
            for index in indices {
                hybrid.consumed(&shuffle.core, partition, index);
            }
            continue;
        }
        if complete {
            let maps = shuffle.partition_commits(partition)?;
            return writer.response(&Response::PartitionEnd { partition, maps }).await.map_err(io);
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = shutdown.wait() => {
                return Err(ServiceError::new(ErrorKind::ShuttingDown, "the server is shutting down"));
            }
        }
    }
}

fn count_served(state: &ServiceState, shuffle: &crate::shuffle::Shuffle, batch: &[bytes::Bytes]) {
    let bytes: usize = batch.iter().map(|b| b.len()).sum();
    state.stats.served(shuffle.spec().mode, batch.len() as u64, bytes as u64);
}
