//! `OpenPartition`: streams one partition to a reader once every map of the
//! shuffle has committed — exactly the committed attempt's blocks of every
//! map, each once — and closes with `PartitionEnd`, listing what each map
//! committed to the partition so the reader can check it got all of it.

use shuffle_protocol::{ErrorKind, PartitionId, Response, ServiceError, ShuffleId};

use crate::{
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
    tokio::select! {
        complete = shuffle.wait_complete() => complete?,
        _ = shutdown.wait() => {
            return Err(ServiceError::new(
                ErrorKind::ShuttingDown,
                format!("the server is shutting down before {} completed", shuffle.label()),
            ));
        }
    }
    let (blocks, maps) = shuffle.partition_snapshot(partition)?;
    let io = |e: std::io::Error| {
        ServiceError::new(ErrorKind::Io, format!("sending partition {partition}: {e}"))
    };
    for batch in blocks.chunks(BLOCKS_PER_WRITE) {
        writer.blocks(batch).await.map_err(io)?;
        let bytes: usize = batch.iter().map(|b| b.len()).sum();
        ServerStats::add(&state.stats.bytes_served, bytes as u64);
        ServerStats::add(&state.stats.blocks_served, batch.len() as u64);
    }
    writer
        .response(&Response::PartitionEnd { partition, maps })
        .await
        .map_err(io)
}
