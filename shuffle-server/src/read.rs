//! `OpenPartition`: streams one partition to a reader once every map of the
//! shuffle has committed — exactly the committed attempt's blocks of every
//! map, each once — and closes with `PartitionEnd`, listing what each map
//! committed to the partition so the reader can check it got all of it.
//!
//! Hash-mode blocks go out in arrival order. Sort-mode blocks lie in sealed
//! per-map files and go through the shuffle's elevator ([`crate::elevator`]),
//! which serves all readers' pending blocks in file-offset order; within one
//! map's file that order is also the blocks' sequence order.

use shuffle_protocol::{ErrorKind, PartitionId, Response, ServiceError, ShuffleId};

use crate::{
    shuffle::SnapshotBlock,
    shutdown::Shutdown,
    state::{AppSession, ServiceState},
    stats::ServerStats,
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
    let io = |e: std::io::Error| ServiceError::new(ErrorKind::Io, format!("sending partition {partition}: {e}"));
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
            count_served(state, batch);
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
            count_served(state, &batch);
            sent += batch.len();
            scheduled.sent(batch.iter().map(|b| b.len()).sum());
        }
    }
    writer.response(&Response::PartitionEnd { partition, maps: snapshot.commits }).await.map_err(io)
}

fn count_served(state: &ServiceState, batch: &[bytes::Bytes]) {
    let bytes: usize = batch.iter().map(|b| b.len()).sum();
    ServerStats::add(&state.stats.bytes_served, bytes as u64);
    ServerStats::add(&state.stats.blocks_served, batch.len() as u64);
}
