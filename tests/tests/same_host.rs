//! The same-host path: a client on the daemon's host moves to its Unix
//! socket, pushes uncompressed, and reads blocks that lie in the daemon's
//! files from the files themselves (passed over the socket), still checking
//! every block's CRC and the committed totals.

use shuffle_client::{ErrorKind, ExchangeMode, ShuffleClient, ShuffleId, ShuffleSpec};
use shuffle_protocol::Request;
use shuffle_tests::{
    daemon::Daemon,
    exchange::{ExchangeParams, read_partition, run_exchange, verify, write_map},
    raw::{RawConnection, request_bytes},
};

const PARAMS: ExchangeParams =
    ExchangeParams { records: 200_000, maps: 2, partitions: 4, seed: 61, mode: ExchangeMode::Hash };

fn served_direct(daemon: &Daemon) -> u64 {
    let status: serde_json::Value = serde_json::from_str(&daemon.http_get("/status")).unwrap();
    status["totals"]["served_direct_bytes"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_host_reader_reads_spilled_blocks_from_the_files_themselves_and_exactly() {
    // 20 MB through a 16 MiB budget: much of it is spilled to files.
    let daemon = Daemon::start(&["--memory", "16MiB", "--flush-size", "1MiB"]);
    for mode in [ExchangeMode::Hash, ExchangeMode::Sort, ExchangeMode::Hybrid] {
        let client = daemon.connect(&format!("local-{mode:?}").to_lowercase()).await.unwrap();
        assert!(client.unix_socket().is_some());
        let before = served_direct(&daemon);
        let params = ExchangeParams { mode, ..PARAMS };
        let outcome = run_exchange(&client, ShuffleId(0), params).await.unwrap();
        verify(params, outcome.received).unwrap();
        if mode != ExchangeMode::Hybrid {
            // Hybrid readers keep up with the maps and mostly read from memory.
            assert!(served_direct(&daemon) - before > 1_000_000, "{mode:?}: blocks were read from the files directly");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_host_path_pushes_uncompressed_unless_asked() {
    let daemon = Daemon::start(&[]);
    let local = daemon.connect("local").await.unwrap();
    let remote = ShuffleClient::connect(daemon.addr, daemon.options("remote").same_host(false)).await.unwrap();
    // Highly compressible records: lz4 would shrink them tenfold.
    let value = vec![b'a'; 200];
    for client in [&local, &remote] {
        client.register_shuffle(ShuffleId(0), ShuffleSpec::hash(1, 1)).await.unwrap();
        let mut writer = client.writer(ShuffleId(0), 0, 0).await.unwrap();
        for i in 0u32..20_000 {
            writer.write(0, &i.to_be_bytes(), &value).await.unwrap();
        }
        writer.finish().await.unwrap();
    }
    let raw = 20_000 * 204;
    assert!(local.pushed_bytes() > raw, "uncompressed on the socket: {} for {raw}", local.pushed_bytes());
    assert!(remote.pushed_bytes() < raw / 4, "lz4 over QUIC: {} for {raw}", remote.pushed_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bit_flipped_in_a_file_read_directly_is_an_integrity_error_naming_the_map() {
    let daemon = Daemon::start(&["--memory", "8MiB", "--flush-size", "1MiB"]);
    let client = daemon.connect("flipped").await.unwrap();
    let params = ExchangeParams { records: 100_000, maps: 1, partitions: 1, ..PARAMS };
    client.register_shuffle(ShuffleId(0), params.spec()).await.unwrap();
    write_map(&client, ShuffleId(0), params, 0, 0).await.unwrap();
    let dir = daemon.data_dir.join("apps/flipped/shuffle-0");
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "data"));
    let file = file.expect("a spilled data file");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&file, bytes).unwrap();
    let e = read_partition(&client, ShuffleId(0), 0, 1).await.unwrap_err();
    assert!(e.contains("integrity check failed for shuffle 0, partition 0"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reads_over_quic_are_refused() {
    let daemon = Daemon::start(&[]);
    let (conn, _) = RawConnection::connect(daemon.addr, &daemon.cert_path(), "remote", None).await;
    let reply =
        conn.exchange(&[request_bytes(&Request::OpenPartitionDirect { shuffle: ShuffleId(0), partition: 0 })]).await;
    let e = reply.error().expect("an error");
    assert_eq!(e.kind, ErrorKind::UnexpectedMessage);
    assert!(e.message.contains("Unix socket"), "{}", e.message);
}
