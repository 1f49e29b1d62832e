//! Reads at a worker: one partition from this worker's copy of its group,
//! in arrival order (`OpenPartition…`) or in key order (`OpenPartitionByKey`).
//!
//! A copy whose group lost the blocks of some maps with every copy (and has
//! not had them re-run yet) answers `PartitionLost` naming those maps; a copy
//! that lacks a committed map's blocks because it was away when they were
//! pushed answers `DataLost`, and the reader reads the other copy. A
//! reader that failed over names what it already has (`resume`), and those
//! blocks are left out. A key-ordered read needs no such list: the reader
//! asks for each chunk by run and block, so it goes on at the other copy by
//! asking for the chunks it does not have yet.

use std::sync::Arc;

use shuffle_protocol::{PartitionId, Response, ResumePoint, ServiceError};
use tokio::io::AsyncRead;
use tokio_util::sync::CancellationToken;

use super::hosted::{GroupCopy, HostedShuffle};
use crate::{
    read::{serve_partition, serve_partition_by_key},
    state::ServiceState,
    transport::{FrameReader, FrameSink, FrameWriter},
};

/// Serves one partition read at a worker.
pub async fn handle_read<W: FrameSink>(
    state: &ServiceState,
    hosted: Arc<HostedShuffle>,
    partition: PartitionId,
    writer: &mut FrameWriter<W>,
    shutdown: &CancellationToken,
    direct: bool,
    resume: &[ResumePoint],
) -> Result<(), ServiceError> {
    let Some(copy) = readable_copy(&hosted, partition, writer).await? else { return Ok(()) };
    serve_partition(state, &copy.shuffle, partition, writer, shutdown, direct, resume).await
}

/// Serves one key-ordered partition read at a worker (a plain read if the
/// shuffle is not a key-ordered sort shuffle).
pub async fn handle_read_by_key<R, W>(
    state: &ServiceState,
    hosted: Arc<HostedShuffle>,
    partition: PartitionId,
    (reader, writer): (&mut FrameReader<R>, &mut FrameWriter<W>),
    shutdown: &CancellationToken,
    direct: bool,
) -> Result<(), ServiceError>
where
    R: AsyncRead + Unpin + Send,
    W: FrameSink,
{
    let Some(copy) = readable_copy(&hosted, partition, writer).await? else { return Ok(()) };
    serve_partition_by_key(state, &copy.shuffle, partition, (reader, writer), shutdown, direct).await
}

/// This worker's copy of `partition`'s group if it can be read: `None`
/// once `PartitionLost` was sent (maps lost with every copy), `DataLost`
/// if this copy lacks blocks the other copy has.
async fn readable_copy<W: FrameSink>(
    hosted: &HostedShuffle,
    partition: PartitionId,
    writer: &mut FrameWriter<W>,
) -> Result<Option<Arc<GroupCopy>>, ServiceError> {
    let (group, copy) = hosted.copy_for(partition)?;
    let lost = hosted.lost_maps(group, &copy);
    if !lost.is_empty() {
        writer.response(&Response::PartitionLost { partition, maps: lost }).await?;
        return Ok(None);
    }
    copy.shuffle.check_lacking(partition)?;
    Ok(Some(copy))
}
