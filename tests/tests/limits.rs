//! Everything that grows with what clients send is bounded: specs and
//! shuffle counts by named limits, partly received frames and QUIC windows
//! by the memory budget. Floods get clear errors or closed connections, the
//! daemon's resident memory (measured, not only its counter) stays within
//! its budget plus a stated margin, and other apps keep working.

use std::time::Duration;

use bytes::Bytes;
use shuffle_client::{ErrorKind, ShuffleId, ShuffleSpec};
use shuffle_protocol::{FrameKind, MAX_FRAME_LEN, MAX_MAPS, Request, encode_frame_header};
use shuffle_tests::{
    daemon::Daemon,
    exchange::{ExchangeParams, run_exchange, verify},
    raw::{RawConnection, client_config, request_bytes},
};

/// What a daemon may hold beyond its budget: its code, runtime, TLS and
/// per-connection and per-stream QUIC state. Measured idle at ~15 MiB.
const RSS_MARGIN: u64 = 48 << 20;

const SMALL: ExchangeParams =
    ExchangeParams { records: 30_000, maps: 2, partitions: 4, seed: 23, mode: shuffle_client::ExchangeMode::Hash };

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_specs_too_many_shuffles_and_oversized_tables_are_refused() {
    let daemon = Daemon::start(&["--memory", "16MiB", "--max-shuffles-per-app", "3"]);
    let client = daemon.connect("greedy").await.unwrap();
    let e = client.register_shuffle(ShuffleId(0), ShuffleSpec::hash(MAX_MAPS + 1, 4)).await.unwrap_err();
    assert_eq!(e.service_kind(), Some(ErrorKind::InvalidSpec), "{e}");
    // Within the protocol's limits, but its tables would crowd out everyone's data.
    let e = client.register_shuffle(ShuffleId(0), ShuffleSpec::sort(MAX_MAPS, 100_000, false)).await.unwrap_err();
    assert_eq!(e.service_kind(), Some(ErrorKind::LimitExceeded), "{e}");
    assert!(e.to_string().contains("bytes of tables"), "{e}");
    for id in 0..3 {
        client.register_shuffle(ShuffleId(id), ShuffleSpec::hash(2, 4)).await.unwrap();
    }
    let e = client.register_shuffle(ShuffleId(3), ShuffleSpec::hash(2, 4)).await.unwrap_err();
    assert_eq!(e.service_kind(), Some(ErrorKind::LimitExceeded), "{e}");
    assert!(e.to_string().contains("limit of 3 shuffles"), "{e}");
    // Another app has its own allowance.
    let other = daemon.connect("modest").await.unwrap();
    let outcome = run_exchange(&other, ShuffleId(0), SMALL).await.unwrap();
    verify(SMALL, outcome.received).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_streams_announcing_16_mib_frames_stay_within_the_budget() {
    let budget: u64 = 64 << 20;
    let daemon = Daemon::start(&["--memory", "64MiB"]);
    let idle = daemon.rss_bytes();
    let idle_status: serde_json::Value = serde_json::from_str(&daemon.http_get("/status")).unwrap();
    let idle_used = idle_status["memory"]["used_bytes"].as_u64().unwrap(); // the standing read share
    let (flood, reply) = RawConnection::connect(daemon.addr, &daemon.cert_path(), "flood", None).await;
    assert!(reply.secret().is_some(), "{reply:?}");
    let header = Bytes::copy_from_slice(&encode_frame_header(FrameKind::Request, MAX_FRAME_LEN).unwrap());
    let mut streams = Vec::new();
    for _ in 0..500 {
        let (mut send, recv) = flood.connection.open_bi().await.unwrap();
        send.write_all(&header).await.unwrap();
        streams.push((send, recv));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status: serde_json::Value = serde_json::from_str(&daemon.http_get("/status")).unwrap();
    let used = status["memory"]["used_bytes"].as_u64().unwrap();
    let rss = daemon.rss_bytes();
    println!("500 streams x 16 MiB headers: {used} bytes accounted, RSS {} MiB (idle {} MiB)", rss >> 20, idle >> 20);
    assert!(used <= budget, "accounted {used} over the budget {budget}");
    assert!(rss <= budget + RSS_MARGIN, "RSS {rss} over budget + margin");

    // Everyone else is still served, exactly.
    let bystander = daemon.connect("bystander").await.unwrap();
    let outcome = run_exchange(&bystander, ShuffleId(0), SMALL).await.unwrap();
    verify(SMALL, outcome.received).unwrap();

    // When the flood goes, so does its memory.
    drop(streams);
    flood.connection.close(0u32.into(), b"done");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status: serde_json::Value = serde_json::from_str(&daemon.http_get("/status")).unwrap();
    assert!(status["memory"]["used_bytes"].as_u64().unwrap() < idle_used + (1 << 20), "{status}");
    assert_eq!(status["memory"]["accounting_errors"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_authenticate_cannot_make_the_server_buffer() {
    let budget: u64 = 64 << 20;
    let daemon = Daemon::start(&["--memory", "64MiB"]);
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client_config(&daemon.cert_path()));
    // 48 connections that never say Hello, each trying to write 4 streams of a 16 MiB frame.
    let payload = Bytes::from(vec![0x42u8; 16 << 20]);
    let mut writers = Vec::new();
    for _ in 0..48 {
        let connection = endpoint.connect(daemon.addr, "localhost").unwrap().await.unwrap();
        for _ in 0..4 {
            let (connection, payload) = (connection.clone(), payload.clone());
            writers.push(tokio::spawn(async move {
                let Ok((mut send, _recv)) = connection.open_bi().await else { return 0 };
                let mut header = encode_frame_header(FrameKind::Request, payload.len()).unwrap().to_vec();
                header.extend_from_slice(&payload);
                match tokio::time::timeout(Duration::from_secs(3), send.write_all(&header)).await {
                    Ok(Ok(())) => header.len(),
                    _ => 0,
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = daemon.rss_bytes();
    println!("48 unauthenticated connections x 4 streams x 16 MiB: RSS {} MiB", rss >> 20);
    assert!(rss <= budget + RSS_MARGIN, "RSS {rss} over budget + margin");
    let mut delivered = 0;
    for w in writers {
        delivered += w.await.unwrap();
    }
    assert_eq!(delivered, 0, "no unauthenticated stream got a 16 MiB frame through");
    // A legitimate client is served meanwhile.
    let client = daemon.connect("legit").await.unwrap();
    let outcome = run_exchange(&client, ShuffleId(0), SMALL).await.unwrap();
    verify(SMALL, outcome.received).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_end_naming_many_maps_with_large_attempt_ids_is_sent_not_a_panic() {
    // Before the spec limits, a PartitionEnd for many maps overflowed the frame limit and
    // hit an assertion in the server. Now the largest spec's messages fit a frame.
    let daemon = Daemon::start(&["--memory", "512MiB"]);
    let (conn, _) = RawConnection::connect(daemon.addr, &daemon.cert_path(), "wide", None).await;
    let maps = 5_000;
    let spec = ShuffleSpec::hash(maps, 1);
    let reply = conn.exchange(&[request_bytes(&Request::RegisterShuffle { shuffle: ShuffleId(0), spec })]).await;
    assert!(reply.error().is_none(), "{reply:?}");
    // Commit every map with an empty attempt of a large id, then read the partition.
    let mut frames = Vec::new();
    for map in 0..maps {
        let attempt = u32::MAX - map;
        frames.push(request_bytes(&Request::OpenPush { shuffle: ShuffleId(0), map, attempt }));
    }
    let mut tasks = Vec::new();
    for (map, open) in frames.into_iter().enumerate() {
        let connection = conn.connection.clone();
        let end = request_bytes(&Request::MapEnd(shuffle_protocol::MapEnd {
            map: map as u32,
            attempt: u32::MAX - map as u32,
            partitions: vec![],
        }));
        tasks.push(tokio::spawn(async move {
            let (mut send, mut recv) = connection.open_bi().await.unwrap();
            send.write_all(&open).await.unwrap();
            send.write_all(&end).await.unwrap();
            send.finish().unwrap();
            recv.read_to_end(1 << 16).await.unwrap()
        }));
        if tasks.len() >= 256 {
            for t in tasks.drain(..) {
                t.await.unwrap();
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let reply = conn.exchange(&[request_bytes(&Request::OpenPartition { shuffle: ShuffleId(0), partition: 0 })]).await;
    match reply.responses.last() {
        Some(shuffle_protocol::Response::PartitionEnd { maps: commits, .. }) => {
            assert_eq!(commits.len(), maps as usize)
        }
        other => panic!("expected PartitionEnd, got {other:?}"),
    }
}
