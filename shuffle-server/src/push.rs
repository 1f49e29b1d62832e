//! `OpenPush`: one map attempt pushes its blocks on one stream and ends with
//! `MapEnd`. Each block is checked (header, CRC, ids, sequence) before it is
//! stored; at `MapEnd` the declared totals must equal what arrived, and the
//! commit rule decides. While the memory budget is at its hard limit the
//! handler stops reading, so QUIC flow control blocks the producer.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use shuffle_protocol::{
    AttemptId, Block, ErrorKind, FrameKind, MapEnd, MapId, PartitionId, PartitionTotals, Request, Response,
    ServiceError, ShuffleId,
};
use tokio::io::AsyncRead;

use crate::{
    commit::CommitDecision,
    shuffle::{FlushReason, FlushTarget, Shuffle},
    state::{AppSession, ServiceState},
    transport::{FrameReader, FrameSink, FrameWriter},
};

/// How long a paused producer waits between re-checks of the disk and of shutdown.
const PAUSE_RECHECK: Duration = Duration::from_millis(200);

/// Serves one push stream after its `OpenPush` request.
pub async fn handle_push<R: AsyncRead + Unpin + Send, W: FrameSink>(
    state: &Arc<ServiceState>,
    session: &AppSession,
    (shuffle_id, map, attempt): (ShuffleId, MapId, AttemptId),
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
) -> Result<(), ServiceError> {
    let shuffle = state.shuffle(session, shuffle_id)?;
    shuffle.begin_push(map, attempt)?;
    let result = match writer.response(&Response::PushAccepted { spec: shuffle.spec() }).await {
        Ok(()) => receive_attempt(state, &shuffle, (map, attempt), reader, writer).await,
        Err(e) => Err(io_err(e)),
    };
    // On failure the attempt can never commit: its memory is freed at once and its id retired.
    shuffle.end_push(map, attempt, result.is_err());
    result
}

/// Receives an attempt's blocks up to and including its `MapEnd`.
async fn receive_attempt<R: AsyncRead + Unpin + Send, W: FrameSink>(
    state: &Arc<ServiceState>,
    shuffle: &Arc<Shuffle>,
    (map, attempt): (MapId, AttemptId),
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
) -> Result<(), ServiceError> {
    let label = format!("map {map} attempt {attempt} of {}", shuffle.label());
    let mut received: BTreeMap<PartitionId, PartitionTotals> = BTreeMap::new();
    loop {
        wait_for_memory(state, shuffle).await?;
        let Some(frame) = reader.next_frame().await? else {
            return Err(ServiceError::new(
                ErrorKind::UnexpectedMessage,
                format!("push stream of {label} ended without MapEnd; the attempt is abandoned"),
            ));
        };
        match frame.kind {
            FrameKind::Block => {
                let block = Block::parse(frame.payload)?;
                block
                    .verify()
                    .map_err(|e| ServiceError::new(ErrorKind::IntegrityMismatch, format!("block from {label}: {e}")))?;
                let id = block.header.id;
                if (id.map, id.attempt) != (map, attempt) {
                    return Err(ServiceError::new(
                        ErrorKind::UnexpectedMessage,
                        format!("block of map {} attempt {} on the push stream of {label}", id.map, id.attempt),
                    ));
                }
                shuffle.check_partition(id.partition)?;
                let totals = received.entry(id.partition).or_insert_with(|| PartitionTotals::new(id.partition));
                if id.sequence != totals.blocks {
                    return Err(ServiceError::new(
                        ErrorKind::IntegrityMismatch,
                        format!(
                            "block {} of partition {} from {label} arrived where block {} was expected",
                            id.sequence, id.partition, totals.blocks
                        ),
                    ));
                }
                totals.add(&block.header);
                let len = block.bytes.len() as u64;
                if let Some(target) = shuffle.append(&block.header, block.bytes)? {
                    spawn_flush(shuffle.clone(), target, FlushReason::BufferFull);
                }
                state.stats.received(shuffle.spec().mode, len);
            }
            FrameKind::Request => match Request::decode(&frame.payload)? {
                Request::MapEnd(end) => {
                    // Sealing a sort-mode attempt writes and maps its file: blocking I/O.
                    let (owned_shuffle, owned_label) = (shuffle.clone(), label.clone());
                    let response = tokio::task::spawn_blocking(move || {
                        end_attempt(&owned_shuffle, &owned_label, (map, attempt), end, &received)
                    })
                    .await
                    .map_err(|e| ServiceError::new(ErrorKind::Io, format!("committing {label}: {e}")))??;
                    writer.response(&response).await.map_err(io_err)?;
                    return expect_end_of_stream(reader, &label).await;
                }
                other => {
                    return Err(ServiceError::new(
                        ErrorKind::UnexpectedMessage,
                        format!("{} request on the push stream of {label}", request_name(&other)),
                    ));
                }
            },
            FrameKind::Response => {
                return Err(ServiceError::new(
                    ErrorKind::UnexpectedMessage,
                    format!("response frame on the push stream of {label}"),
                ));
            }
        }
    }
}

/// Checks a `MapEnd` against what arrived and applies the commit rule.
fn end_attempt(
    shuffle: &Shuffle,
    label: &str,
    (map, attempt): (MapId, AttemptId),
    end: MapEnd,
    received: &BTreeMap<PartitionId, PartitionTotals>,
) -> Result<Response, ServiceError> {
    if (end.map, end.attempt) != (map, attempt) {
        return Err(ServiceError::new(
            ErrorKind::UnexpectedMessage,
            format!("MapEnd for map {} attempt {} on the push stream of {label}", end.map, end.attempt),
        ));
    }
    let declared: BTreeMap<PartitionId, PartitionTotals> = end.partitions.iter().map(|t| (t.partition, *t)).collect();
    if declared.len() != end.partitions.len() {
        return Err(ServiceError::new(ErrorKind::Malformed, format!("MapEnd of {label} names a partition twice")));
    }
    for partition in declared.keys().chain(received.keys()) {
        let want = declared.get(partition).copied().unwrap_or(PartitionTotals::new(*partition));
        let got = received.get(partition).copied().unwrap_or(PartitionTotals::new(*partition));
        if want != got {
            return Err(ServiceError::new(
                ErrorKind::IntegrityMismatch,
                format!(
                    "{label} declared {} blocks / {} records (checksum {:#010x}) for partition {partition}, \
                     but the server received {} blocks / {} records (checksum {:#010x})",
                    want.blocks, want.records, want.checksum, got.blocks, got.records, got.checksum
                ),
            ));
        }
    }
    let partitions = declared.into_values().collect();
    Ok(match shuffle.end_attempt(MapEnd { map, attempt, partitions })? {
        CommitDecision::Committed => Response::Committed { map, attempt },
        CommitDecision::Refused { committed_attempt } => Response::AttemptRefused { map, attempt, committed_attempt },
    })
}

/// After `MapEnd` the client must close its side; anything more is an error.
async fn expect_end_of_stream<R: AsyncRead + Unpin + Send>(
    reader: &mut FrameReader<R>,
    label: &str,
) -> Result<(), ServiceError> {
    match reader.next_frame().await? {
        None => Ok(()),
        Some(frame) => {
            let kind = match frame.kind {
                FrameKind::Request if matches!(Request::decode(&frame.payload), Ok(Request::MapEnd(_))) => {
                    ErrorKind::DuplicateMapEnd
                }
                _ => ErrorKind::UnexpectedMessage,
            };
            Err(ServiceError::new(kind, format!("{:?} frame after the MapEnd of {label}", frame.kind)))
        }
    }
}

/// Pauses the producer while the memory budget is at its hard limit; fails
/// if the shuffle cannot be flushed (a full disk) so the producer is not stuck.
async fn wait_for_memory(state: &ServiceState, shuffle: &Shuffle) -> Result<(), ServiceError> {
    while !state.memory.wait_for_room(PAUSE_RECHECK).await {
        if let Some(failure) = shuffle.failure() {
            return Err(failure);
        }
    }
    Ok(())
}

/// Flushes a buffer on a blocking thread; a failure is recorded on the shuffle.
pub fn spawn_flush(shuffle: Arc<Shuffle>, target: FlushTarget, reason: FlushReason) {
    tokio::task::spawn_blocking(move || {
        let _ = shuffle.flush(target, reason);
    });
}

fn io_err(e: std::io::Error) -> ServiceError {
    ServiceError::new(ErrorKind::Io, format!("writing to the stream: {e}"))
}

/// A request's name, for messages.
pub fn request_name(request: &Request) -> &'static str {
    match request {
        Request::Hello { .. } => "Hello",
        Request::RegisterShuffle { .. } => "RegisterShuffle",
        Request::UnregisterShuffle { .. } => "UnregisterShuffle",
        Request::UnregisterApp => "UnregisterApp",
        Request::OpenPush { .. } => "OpenPush",
        Request::MapEnd(_) => "MapEnd",
        Request::OpenPartition { .. } => "OpenPartition",
    }
}
