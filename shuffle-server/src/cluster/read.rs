//! Reads at a worker: one partition from this worker's copy of its group.
//!
//! A copy whose group lost the blocks of some maps with every copy (and has
//! not had them re-run yet) answers `PartitionLost` naming those maps; a copy
//! that lacks a committed map's blocks because it was away when they were
//! pushed answers `DataLost`, and the reader reads the other copy. A
//! reader that failed over names what it already has (`resume`), and those
//! blocks are left out.

use std::sync::Arc;

use shuffle_protocol::{ErrorKind, PartitionId, Response, ResumePoint, ServiceError};
use tokio_util::sync::CancellationToken;

use super::hosted::HostedShuffle;
use crate::{
    read::serve_partition,
    state::ServiceState,
    transport::{FrameSink, FrameWriter},
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
    let (group, copy) = hosted.copy_for(partition)?;
    let lost = hosted.lost_maps(group, &copy);
    if !lost.is_empty() {
        return writer.response(&Response::PartitionLost { partition, maps: lost }).await;
    }
    let incomplete = copy.incomplete();
    if !incomplete.is_empty() {
        let maps: Vec<String> = incomplete.iter().map(|(m, a)| format!("{m} (attempt {a})")).collect();
        return Err(ServiceError::new(
            ErrorKind::DataLost,
            format!(
                "this worker's copy of partition {partition} of {} lacks the blocks of map(s) {}: it was away when \
                 they were pushed; read the other copy",
                hosted.label(),
                maps.join(", ")
            ),
        ));
    }
    serve_partition(state, &copy.shuffle, partition, writer, shutdown, direct, resume).await
}
