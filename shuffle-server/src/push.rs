//! `OpenPush`: one map attempt pushes its blocks on one stream and ends with
//! `MapEnd`. Each block is checked (header, CRC, ids, sequence) before it is
//! stored; at `MapEnd` the declared totals must equal what arrived, and the
//! commit rule decides.
//!
//! The stream's receive buffers count against the shuffle's share of the
//! memory budget: while the shuffle holds more than its share and memory is
//! short, the stream is not read, so flow control holds this producer (and
//! only the producers of shuffles over their share).

use std::{collections::BTreeMap, sync::Arc};

use shuffle_protocol::{
    AttemptId, Block, ErrorKind, FrameKind, MapEnd, MapId, PartitionId, PartitionTotals, Request, Response,
    ServiceError, ShuffleId,
};
use tokio::io::AsyncRead;

use crate::{
    commit::CommitDecision,
    shuffle::Shuffle,
    state::{AppSession, ServiceState},
    storage::SpillTarget,
    transport::{FrameReader, FrameSink, FrameWriter},
};

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
    reader.account_to(&shuffle.core.memory);
    let result = match writer.response(&Response::PushAccepted { spec: shuffle.spec() }).await {
        Ok(()) => receive_attempt(state, &shuffle, (map, attempt), reader, writer).await,
        Err(e) => Err(e),
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
        let Some((frame, memory)) = reader.next_frame().await? else {
            return Err(ServiceError::new(
                ErrorKind::UnexpectedMessage,
                format!("push stream of {label} ended without MapEnd; the attempt is abandoned"),
            ));
        };
        match frame.kind {
            FrameKind::Block => {
                let block = pushed_block(frame.payload, (map, attempt), &label)?;
                let id = block.header.id;
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
                if let Some(target) = shuffle.append(&block.header, block.bytes, memory)? {
                    spawn_spill(shuffle.clone(), target);
                }
                state.stats.received(shuffle.spec().mode, len);
            }
            FrameKind::Request => match Request::decode(&frame.payload)? {
                Request::MapEnd(end) => {
                    let response = end_attempt(shuffle, &label, (map, attempt), end, &received)?;
                    writer.response(&response).await?;
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
pub(crate) async fn expect_end_of_stream<R: AsyncRead + Unpin + Send>(
    reader: &mut FrameReader<R>,
    label: &str,
) -> Result<(), ServiceError> {
    match reader.next_frame().await? {
        None => Ok(()),
        Some((frame, _)) => {
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

/// Writes a buffer to disk on a blocking thread; a failure is recorded by the shuffle.
pub fn spawn_spill(shuffle: Arc<Shuffle>, target: SpillTarget) {
    tokio::task::spawn_blocking(move || {
        let _ = shuffle.spill(target, false);
    });
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
        Request::OpenPartitionDirect { .. } => "OpenPartitionDirect",
        Request::RegisterWorker { .. } => "RegisterWorker",
        Request::Heartbeat(_) => "Heartbeat",
        Request::HostShuffle { .. } => "HostShuffle",
        Request::RecordDecisions { .. } => "RecordDecisions",
        Request::DropShuffle { .. } => "DropShuffle",
        Request::DropApp { .. } => "DropApp",
        Request::GetPlacement { .. } => "GetPlacement",
        Request::BeginMap { .. } => "BeginMap",
        Request::CommitMap { .. } => "CommitMap",
        Request::ReportUnreachable { .. } => "ReportUnreachable",
        Request::OpenFailoverPush { .. } => "OpenFailoverPush",
        Request::PeerHello { .. } => "PeerHello",
        Request::ReplicaPush { .. } => "ReplicaPush",
        Request::OpenPartitionFrom { .. } => "OpenPartitionFrom",
        Request::OpenPartitionByKey { .. } => "OpenPartitionByKey",
        Request::ReadRun { .. } => "ReadRun",
    }
}

/// Parses a block pushed on the stream of `map` `attempt` and checks its
/// CRC and that it belongs to that attempt.
pub(crate) fn pushed_block(
    payload: bytes::Bytes,
    (map, attempt): (MapId, AttemptId),
    label: &str,
) -> Result<Block, ServiceError> {
    let block = Block::parse(payload)?;
    block.verify().map_err(|e| ServiceError::new(ErrorKind::IntegrityMismatch, format!("block from {label}: {e}")))?;
    let id = block.header.id;
    if (id.map, id.attempt) != (map, attempt) {
        return Err(ServiceError::new(
            ErrorKind::UnexpectedMessage,
            format!("block of map {} attempt {} on the push stream of {label}", id.map, id.attempt),
        ));
    }
    Ok(block)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use shuffle_protocol::{
        AppId, BlockId, Codec, Frame, FrameDecoder, MAX_FRAME_LEN, MapEnd, PartitionTotals, ShuffleSpec, append_record,
        encode_block, encode_frame, encode_frame_header,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::{ServerConfig, read::handle_read, transport::StreamSink};

    fn state(budget: u64) -> (tempfile::TempDir, Arc<ServiceState>) {
        let dir = tempfile::tempdir().unwrap();
        let config = ServerConfig {
            data_dir: dir.path().to_path_buf(),
            memory: bytesize::ByteSize(budget),
            ..ServerConfig::default()
        };
        (dir, Arc::new(ServiceState::new(config).unwrap()))
    }

    /// The server's reading end of an in-memory pipe.
    type PipeReader = FrameReader<tokio::io::ReadHalf<DuplexStream>>;
    /// The server's writing end of an in-memory pipe.
    type PipeWriter = FrameWriter<StreamSink<tokio::io::WriteHalf<DuplexStream>>>;

    /// The server's ends of an in-memory pipe, and the client's end.
    fn pipe(state: &ServiceState) -> (PipeReader, PipeWriter, DuplexStream) {
        let (client, server) = tokio::io::duplex(4 << 20);
        let (read, write) = tokio::io::split(server);
        (FrameReader::new(read, &state.receive_buffers, MAX_FRAME_LEN), FrameWriter::new(StreamSink(write)), client)
    }

    /// An attempt's frames: `blocks` blocks of ~`len` bytes to `partition`, then `MapEnd`.
    fn attempt(map: u32, attempt: u32, partition: u32, blocks: u32, len: usize) -> (Vec<u8>, Vec<Bytes>) {
        let mut wire = Vec::new();
        let mut totals = PartitionTotals::new(partition);
        let mut sent = Vec::new();
        for sequence in 0..blocks {
            let mut raw = Vec::new();
            append_record(&mut raw, &sequence.to_be_bytes(), &vec![map as u8; len]);
            let block = encode_block(BlockId { map, attempt, partition, run: 0, sequence }, &raw, 1, Codec::None);
            totals.add(&shuffle_protocol::BlockHeader::decode(&block).unwrap());
            wire.extend_from_slice(&encode_frame_header(FrameKind::Block, block.len()).unwrap());
            wire.extend_from_slice(&block);
            sent.push(block);
        }
        let end = Request::MapEnd(MapEnd { map, attempt, partitions: vec![totals] });
        wire.extend_from_slice(&encode_frame(FrameKind::Request, &end.encode()).unwrap());
        (wire, sent)
    }

    async fn frames(client: &mut DuplexStream) -> Vec<Frame> {
        let mut all = Vec::new();
        client.read_to_end(&mut all).await.unwrap();
        FrameDecoder::default().feed(&all).unwrap()
    }

    #[tokio::test]
    async fn a_push_and_a_read_run_through_in_memory_pipes() {
        let (_dir, state) = state(64 << 20);
        let session = state.open_session(AppId::new("pipes").unwrap(), None).unwrap();
        state.register_shuffle(&session, ShuffleId(0), ShuffleSpec::hash(1, 2)).unwrap();

        let (mut reader, mut writer, mut client) = pipe(&state);
        let (wire, sent) = attempt(0, 0, 1, 5, 1000);
        client.write_all(&wire).await.unwrap();
        client.shutdown().await.unwrap();
        handle_push(&state, &session, (ShuffleId(0), 0, 0), &mut reader, &mut writer).await.unwrap();
        writer.finish();
        let responses: Vec<_> =
            frames(&mut client).await.iter().map(|f| Response::decode(&f.payload).unwrap()).collect();
        assert!(matches!(responses[..], [Response::PushAccepted { .. }, Response::Committed { map: 0, attempt: 0 }]));

        let (_, mut writer, mut client) = pipe(&state);
        let shutdown = CancellationToken::new();
        handle_read(&state, &session, (ShuffleId(0), 1), &mut writer, &shutdown, false).await.unwrap();
        writer.finish();
        let got = frames(&mut client).await;
        let blocks: Vec<Bytes> = got.iter().filter(|f| f.kind == FrameKind::Block).map(|f| f.payload.clone()).collect();
        assert_eq!(blocks, sent);
        let end = Response::decode(&got.last().unwrap().payload).unwrap();
        assert!(matches!(end, Response::PartitionEnd { partition: 1, ref maps } if maps[0].totals.blocks == 5));
    }

    #[tokio::test]
    async fn a_shuffle_over_its_share_stalls_its_own_producer_only() {
        let (_dir, state) = state(4 << 20);
        let session = state.open_session(AppId::new("fair").unwrap(), None).unwrap();
        for id in [0, 1] {
            state
                .register_shuffle(
                    &session,
                    ShuffleId(id),
                    ShuffleSpec::hybrid(1, 1, shuffle_protocol::SpillStrategy::Selective),
                )
                .unwrap();
        }
        // Shuffle 0 has no reader and no quota to spill into (its quota is 0):
        // its producer fills it past its share and stalls.
        let hog = state.shuffle(&session, ShuffleId(0)).unwrap();
        assert!(hog.spec().spill_quota.is_none());
        let (mut reader, mut writer, mut client) = pipe(&state);
        let (wire, _) = attempt(0, 0, 0, 200, 60_000);
        let feeder = tokio::spawn(async move {
            let _ = client.write_all(&wire).await;
            client
        });
        let stalled = {
            let state = state.clone();
            let hog_session = state.open_session(AppId::new("fair").unwrap(), Some(&session.secret)).unwrap();
            tokio::spawn(async move {
                handle_push(&state, &hog_session, (ShuffleId(0), 0, 0), &mut reader, &mut writer).await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!stalled.is_finished(), "the hog's producer must be held");
        let held = hog.core.memory.used();
        let blocks_budget = (4 << 20) - state.read_share;
        assert!(held > blocks_budget / 2, "the hog holds most of the memory for blocks: {held}");

        // Meanwhile another shuffle's producer is not held.
        let (mut reader, mut writer, mut client) = pipe(&state);
        let (wire, _) = attempt(0, 0, 0, 5, 60_000);
        client.write_all(&wire).await.unwrap();
        client.shutdown().await.unwrap();
        let other = tokio::time::timeout(
            Duration::from_secs(5),
            handle_push(&state, &session, (ShuffleId(1), 0, 0), &mut reader, &mut writer),
        )
        .await;
        assert!(matches!(other, Ok(Ok(()))), "{other:?}");
        stalled.abort();
        feeder.abort();
    }
}
