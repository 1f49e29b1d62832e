//! Bad input end to end: each case gets a clear error back to its sender,
//! the server keeps serving everyone else, and committed data is untouched.
//! Cases a well-behaved client cannot produce are sent with the raw client.

use bytes::{Bytes, BytesMut};
use shuffle_client::{ErrorKind, ShuffleClient, ShuffleId, ShuffleSpec};
use shuffle_protocol::{
    BlockId, Codec, FrameKind, MAX_FRAME_LEN, MapEnd, PartitionTotals, Request, Response, append_record, encode_block,
    encode_frame_header, frame::encode_frame,
};
use shuffle_tests::{
    daemon::Daemon,
    exchange::{ExchangeParams, run_exchange, verify},
    raw::{RawConnection, Reply, request_bytes},
};

const BYSTANDER: ExchangeParams =
    ExchangeParams { records: 100_000, maps: 2, partitions: 4, seed: 99, mode: shuffle_client::ExchangeMode::Hash };

/// Commits a shuffle for an unrelated app, to check later that it survived.
async fn bystander(daemon: &Daemon) -> ShuffleClient {
    let client = daemon.connect("bystander").await.unwrap();
    let outcome = run_exchange(&client, ShuffleId(0), BYSTANDER).await.unwrap();
    verify(BYSTANDER, outcome.received).unwrap();
    client
}

/// Reads the bystander's shuffle again: it must still be exact.
async fn bystander_is_intact(client: &ShuffleClient) {
    let mut total = shuffle_tests::workload::W1Totals::default();
    for p in 0..BYSTANDER.partitions {
        let part = shuffle_tests::exchange::read_partition(client, ShuffleId(0), p, BYSTANDER.partitions);
        total.merge(part.await.unwrap());
    }
    verify(BYSTANDER, total).unwrap();
}

fn block(map: u32, attempt: u32, partition: u32, sequence: u32) -> Bytes {
    let mut raw = Vec::new();
    append_record(&mut raw, b"key", b"value");
    encode_block(BlockId { map, attempt, partition, run: 0, sequence }, &raw, 1, Codec::Lz4)
}

fn block_frame(block: &Bytes) -> Bytes {
    let mut out = BytesMut::new();
    out.extend_from_slice(&encode_frame_header(FrameKind::Block, block.len()).unwrap());
    out.extend_from_slice(block);
    out.freeze()
}

fn error_of(reply: &Reply) -> (ErrorKind, String) {
    let e = reply.error().unwrap_or_else(|| panic!("expected an error, got {reply:?}"));
    (e.kind, e.message.clone())
}

async fn raw(daemon: &Daemon, app: &str) -> RawConnection {
    let (conn, reply) = RawConnection::connect(daemon.addr, &daemon.cert_path(), app, None).await;
    assert!(matches!(reply.responses[..], [Response::Welcome { .. }]), "{reply:?}");
    conn
}

async fn register(conn: &RawConnection, shuffle: u32, maps: u32, partitions: u32) {
    let req = Request::RegisterShuffle { shuffle: ShuffleId(shuffle), spec: ShuffleSpec::hash(maps, partitions) };
    let reply = conn.exchange(&[request_bytes(&req)]).await;
    assert_eq!(reply.responses, vec![Response::Ok]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_frames_get_errors_and_the_connection_keeps_working() {
    let daemon = Daemon::start(&[]);
    let witness = bystander(&daemon).await;
    let conn = raw(&daemon, "fuzzer").await;

    let garbage = encode_frame(FrameKind::Request, &[0xff, 0xff, 0xff, 0x13, 0x37]).unwrap();
    let (kind, message) = error_of(&conn.exchange(&[garbage]).await);
    assert_eq!(kind, ErrorKind::Malformed);
    assert!(message.contains("malformed request"), "{message}");

    let unknown_kind = Bytes::from_static(&[3, 0, 0, 0, 42, 1, 2, 3]);
    let (kind, message) = error_of(&conn.exchange(&[unknown_kind]).await);
    assert_eq!(kind, ErrorKind::Malformed);
    assert!(message.contains("unknown frame kind 42"), "{message}");

    let mut oversized = BytesMut::new();
    oversized.extend_from_slice(&(MAX_FRAME_LEN as u32 + 1).to_le_bytes());
    oversized.extend_from_slice(&[FrameKind::Request as u8]);
    let (kind, message) = error_of(&conn.exchange(&[oversized.freeze()]).await);
    assert_eq!(kind, ErrorKind::FrameTooLarge);
    assert!(message.contains("exceeds the maximum frame size"), "{message}");

    let truncated = encode_frame(FrameKind::Request, &[1, 2, 3]).unwrap().slice(..6);
    let (kind, message) = error_of(&conn.exchange(&[truncated]).await);
    assert_eq!(kind, ErrorKind::Malformed);
    assert!(message.contains("ended inside a frame"), "{message}");

    let hello_again = Request::Hello {
        protocol_version: shuffle_protocol::PROTOCOL_VERSION,
        app: shuffle_client::AppId::new("x").unwrap(),
        secret: None,
        auth_token: None,
    };
    let (kind, _) = error_of(&conn.exchange(&[request_bytes(&hello_again)]).await);
    assert_eq!(kind, ErrorKind::UnexpectedMessage);

    // The same connection still works after all of that.
    register(&conn, 5, 1, 1).await;
    bystander_is_intact(&witness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_app_shuffle_partition_and_map_are_named_in_errors() {
    let daemon = Daemon::start(&[]);
    let witness = bystander(&daemon).await;
    let client = daemon.connect("asker").await.unwrap();

    let e = client.writer(ShuffleId(77), 0, 0).await.err().unwrap();
    assert_eq!(e.service_kind(), Some(ErrorKind::UnknownShuffle));
    assert!(e.to_string().contains("shuffle 77 is not registered for app asker"), "{e}");
    let mut reader = client.reader(ShuffleId(77), 0).await.unwrap();
    let e = reader.next_record().await.unwrap_err();
    assert_eq!(e.service_kind(), Some(ErrorKind::UnknownShuffle));

    client.register_shuffle(ShuffleId(1), ShuffleSpec::hash(2, 4)).await.unwrap();
    let mut reader = client.reader(ShuffleId(1), 4).await.unwrap();
    let e = reader.next_record().await.unwrap_err();
    assert_eq!(e.service_kind(), Some(ErrorKind::PartitionOutOfRange));
    assert!(e.to_string().contains("partition 4 is out of range"), "{e}");
    let e = client.writer(ShuffleId(1), 2, 0).await.err().unwrap();
    assert_eq!(e.service_kind(), Some(ErrorKind::MapOutOfRange));
    assert!(e.to_string().contains("map 2 is out of range"), "{e}");

    // Another app cannot see this app's shuffle.
    let other = daemon.connect("other-app").await.unwrap();
    let e = other.writer(ShuffleId(1), 0, 0).await.err().unwrap();
    assert_eq!(e.service_kind(), Some(ErrorKind::UnknownShuffle));

    // Unregistering the app from one connection leaves the other connection
    // of the same app bound to an app that no longer exists.
    let second = daemon.join(&client).await.unwrap();
    client.unregister_app().await.unwrap();
    let e = second.register_shuffle(ShuffleId(2), ShuffleSpec::hash(1, 1)).await.unwrap_err();
    assert_eq!(e.service_kind(), Some(ErrorKind::UnknownApp));
    assert!(e.to_string().contains("app asker is not known to this connection"), "{e}");

    let e = client.register_shuffle(ShuffleId(9), ShuffleSpec::hash(0, 4)).await.unwrap_err();
    assert!(matches!(e.service_kind(), Some(ErrorKind::UnknownApp | ErrorKind::InvalidSpec)), "{e}");
    bystander_is_intact(&witness).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_and_conflicting_registrations_are_refused() {
    let daemon = Daemon::start(&[]);
    let client = daemon.connect("specs").await.unwrap();
    let e = client.register_shuffle(ShuffleId(0), ShuffleSpec::hash(0, 4)).await.unwrap_err();
    assert_eq!(e.service_kind(), Some(ErrorKind::InvalidSpec));
    assert!(e.to_string().contains("maps = 0"), "{e}");
    client.register_shuffle(ShuffleId(1), ShuffleSpec::hash(2, 4)).await.unwrap();
    client.register_shuffle(ShuffleId(1), ShuffleSpec::hash(2, 4)).await.unwrap();
    let e = client.register_shuffle(ShuffleId(1), ShuffleSpec::hash(3, 4)).await.unwrap_err();
    assert_eq!(e.service_kind(), Some(ErrorKind::ShuffleExists));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_blocks_out_of_range_partitions_and_lying_totals_are_refused() {
    let daemon = Daemon::start(&[]);
    let witness = bystander(&daemon).await;
    let conn = raw(&daemon, "pusher").await;
    register(&conn, 1, 2, 4).await;
    let open = |map, attempt| request_bytes(&Request::OpenPush { shuffle: ShuffleId(1), map, attempt });

    // A block for partition 4 of a 4-partition shuffle.
    let reply = conn.exchange(&[open(0, 0), block_frame(&block(0, 0, 4, 0))]).await;
    let (kind, message) = error_of(&reply);
    assert_eq!(kind, ErrorKind::PartitionOutOfRange, "{message}");
    assert!(message.contains("partition 4 is out of range for shuffle 1"), "{message}");

    // A block whose payload was corrupted in transit.
    let mut corrupt = block(0, 1, 0, 0).to_vec();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x40;
    let (kind, message) = error_of(&conn.exchange(&[open(0, 1), block_frame(&Bytes::from(corrupt))]).await);
    assert_eq!(kind, ErrorKind::IntegrityMismatch);
    assert!(message.contains("checksum mismatch"), "{message}");

    // A block of another map on this attempt's stream, and one out of sequence.
    let (kind, _) = error_of(&conn.exchange(&[open(0, 2), block_frame(&block(1, 0, 0, 0))]).await);
    assert_eq!(kind, ErrorKind::UnexpectedMessage);
    let (kind, message) = error_of(&conn.exchange(&[open(0, 3), block_frame(&block(0, 3, 0, 1))]).await);
    assert_eq!(kind, ErrorKind::IntegrityMismatch);
    assert!(message.contains("arrived where block 0 was expected"), "{message}");

    // A MapEnd that declares more blocks than were sent.
    let lie = MapEnd {
        map: 0,
        attempt: 4,
        partitions: vec![PartitionTotals { partition: 0, blocks: 2, records: 2, checksum: 0 }],
    };
    let reply =
        conn.exchange(&[open(0, 4), block_frame(&block(0, 4, 0, 0)), request_bytes(&Request::MapEnd(lie))]).await;
    let (kind, message) = error_of(&reply);
    assert_eq!(kind, ErrorKind::IntegrityMismatch);
    assert!(message.contains("map 0 attempt 4") && message.contains("partition 0"), "{message}");

    // A push stream that ends without MapEnd.
    let (kind, message) = error_of(&conn.exchange(&[open(0, 5), block_frame(&block(0, 5, 0, 0))]).await);
    assert_eq!(kind, ErrorKind::UnexpectedMessage);
    assert!(message.contains("ended without MapEnd"), "{message}");
    // Its blocks may still be stored: the attempt id cannot be used again.
    let (kind, message) = error_of(&conn.exchange(&[open(0, 5), block_frame(&block(0, 5, 0, 0))]).await);
    assert_eq!(kind, ErrorKind::UnexpectedMessage);
    assert!(message.contains("attempt 5") && message.contains("abandoned"), "{message}");

    bystander_is_intact(&witness).await;
}

/// A map attempt over the raw connection: one block for partition 0, then `MapEnd`.
fn whole_attempt(map: u32, attempt: u32) -> Vec<Bytes> {
    let b = block(map, attempt, 0, 0);
    let mut totals = PartitionTotals::new(0);
    totals.add(&shuffle_protocol::BlockHeader::decode(&b).unwrap());
    let end = Request::MapEnd(MapEnd { map, attempt, partitions: vec![totals] });
    vec![
        request_bytes(&Request::OpenPush { shuffle: ShuffleId(1), map, attempt }),
        block_frame(&b),
        request_bytes(&end),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_map_end_and_writes_after_the_shuffle_is_sealed_are_refused() {
    let daemon = Daemon::start(&[]);
    let conn = raw(&daemon, "sealer").await;
    register(&conn, 1, 2, 1).await;

    // MapEnd sent twice on one stream: the first commits, the second is refused.
    let mut twice = whole_attempt(0, 0);
    twice.push(twice[2].clone());
    let reply = conn.exchange(&twice).await;
    assert_eq!(reply.responses[1], Response::Committed { map: 0, attempt: 0 });
    let (kind, _) = error_of(&reply);
    assert_eq!(kind, ErrorKind::DuplicateMapEnd);

    // The same attempt pushing again after it ended.
    let (kind, message) = error_of(&conn.exchange(&whole_attempt(0, 0)).await);
    assert_eq!(kind, ErrorKind::DuplicateMapEnd);
    assert!(message.contains("map 0 attempt 0") && message.contains("already ended"), "{message}");

    let reply = conn.exchange(&whole_attempt(1, 0)).await;
    assert_eq!(
        reply.responses,
        vec![Response::PushAccepted { spec: ShuffleSpec::hash(2, 1) }, Response::Committed { map: 1, attempt: 0 }]
    );

    // Every map committed: the shuffle is sealed against new attempts.
    let (kind, message) = error_of(&conn.exchange(&whole_attempt(1, 1)).await);
    assert_eq!(kind, ErrorKind::ShuffleSealed);
    assert!(message.contains("sealed"), "{message}");

    // And its data is exactly one block per map.
    let read = request_bytes(&Request::OpenPartition { shuffle: ShuffleId(1), partition: 0 });
    let reply = conn.exchange(&[read]).await;
    assert_eq!(reply.blocks, 2);
    assert!(
        matches!(&reply.responses[..], [Response::PartitionOpened { .. }, Response::PartitionEnd { maps, .. }] if maps.len() == 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_token_is_refused_with_a_clear_error() {
    // The token comes from the environment (or a file), never from argv.
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with_env(dir.path(), &[], &[("SHUFFLE_AUTH_TOKEN", "s3cret")]);
    let good = ShuffleClient::connect(daemon.addr, daemon.options("good").auth_token("s3cret")).await.unwrap();
    good.register_shuffle(ShuffleId(0), ShuffleSpec::hash(1, 1)).await.unwrap();

    let e = ShuffleClient::connect(daemon.addr, daemon.options("bad").auth_token("guess")).await.err().unwrap();
    assert_eq!(e.service_kind(), Some(ErrorKind::Unauthenticated), "{e}");
    assert!(e.to_string().contains("authentication failed: the connection presented a wrong auth token"), "{e}");

    let e = ShuffleClient::connect(daemon.addr, daemon.options("none")).await.err().unwrap();
    assert_eq!(e.service_kind(), Some(ErrorKind::Unauthenticated), "{e}");
    assert!(e.to_string().contains("presented no auth token"), "{e}");

    // The refused connections did not disturb the authenticated one.
    good.register_shuffle(ShuffleId(1), ShuffleSpec::hash(1, 1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_an_error_to_the_writer_and_committed_data_survives() {
    // The reserve is larger than any disk, so every flush fails as "disk full";
    // a 4 MiB budget makes the writer depend on flushing.
    let daemon = Daemon::start(&["--memory", "4MiB", "--flush-size", "1MiB", "--disk-reserve", "1000TiB"]);
    let small =
        ExchangeParams { records: 10_000, maps: 2, partitions: 4, seed: 5, mode: shuffle_client::ExchangeMode::Hash };
    let witness = daemon.connect("bystander").await.unwrap();
    let outcome = run_exchange(&witness, ShuffleId(0), small).await.unwrap();
    verify(small, outcome.received).unwrap();

    let big =
        ExchangeParams { records: 400_000, maps: 1, partitions: 4, seed: 6, mode: shuffle_client::ExchangeMode::Hash };
    let writer = daemon.connect("big-writer").await.unwrap();
    writer.register_shuffle(ShuffleId(0), ShuffleSpec::hash(1, 4)).await.unwrap();
    let e = shuffle_tests::exchange::write_map(&writer, ShuffleId(0), big, 0, 0).await.unwrap_err();
    assert_eq!(e.service_kind(), Some(ErrorKind::DiskFull), "{e}");
    assert!(e.to_string().contains("disk full"), "{e}");

    // The server still serves: the committed shuffle reads back exactly.
    let mut total = shuffle_tests::workload::W1Totals::default();
    for p in 0..small.partitions {
        total
            .merge(shuffle_tests::exchange::read_partition(&witness, ShuffleId(0), p, small.partitions).await.unwrap());
    }
    verify(small, total).unwrap();
}
