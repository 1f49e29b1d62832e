//! App credentials end to end (DESIGN.md, "Security"): an app is bound to
//! the secret the server generated when it was created. A client that knows
//! only the app's name cannot open, read or unregister its shuffles, over
//! QUIC or the Unix socket, and is told the same as for an app that does not
//! exist; with the secret it can.

use shuffle_client::{AppSecret, ClientOptions, ErrorKind, ShuffleClient, ShuffleId};
use shuffle_protocol::{Request, Response, ShuffleSpec};
use shuffle_tests::{
    daemon::Daemon,
    exchange::{ExchangeParams, read_partition, run_exchange, verify},
    raw::{RawConnection, request_bytes},
};

const PARAMS: ExchangeParams =
    ExchangeParams { records: 40_000, maps: 2, partitions: 4, seed: 17, mode: shuffle_client::ExchangeMode::Hash };

fn wrong_secret() -> AppSecret {
    AppSecret("0".repeat(64))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_knows_an_apps_name_but_not_its_secret_cannot_touch_its_shuffles() {
    let daemon = Daemon::start(&[]);
    let owner = daemon.connect("payroll").await.unwrap();
    assert!(owner.credentials().secret.is_well_formed());
    let outcome = run_exchange(&owner, ShuffleId(0), PARAMS).await.unwrap();
    verify(PARAMS, outcome.received).unwrap();

    // Creating an app of that name again is refused: names are unique.
    let e = daemon.connect("payroll").await.err().unwrap();
    assert_eq!(e.service_kind(), Some(ErrorKind::AppExists), "{e}");

    // Joining with a wrong secret: the app does not exist for this connection,
    // exactly as an app that really does not exist.
    let wrong =
        ShuffleClient::connect(daemon.addr, daemon.options("payroll").secret(wrong_secret())).await.err().unwrap();
    let ghost =
        ShuffleClient::connect(daemon.addr, daemon.options("ghost").secret(wrong_secret())).await.err().unwrap();
    assert_eq!(wrong.service_kind(), Some(ErrorKind::UnknownApp), "{wrong}");
    assert_eq!(ghost.service_kind(), Some(ErrorKind::UnknownApp), "{ghost}");
    assert_eq!(wrong.to_string().replace("payroll", "X"), ghost.to_string().replace("ghost", "X"), "same answer");

    // Below the client library: a raw connection presenting the wrong secret
    // gets UnknownApp and no further request is served on it.
    let (raw, reply) =
        RawConnection::connect_as(daemon.addr, &daemon.cert_path(), "payroll", Some(wrong_secret()), None).await;
    assert!(matches!(&reply.responses[..], [Response::Error(e)] if e.kind == ErrorKind::UnknownApp), "{reply:?}");
    let five = std::time::Duration::from_secs(5);
    tokio::time::timeout(five, raw.connection.closed())
        .await
        .expect("the server closes a connection whose Hello failed");
    for request in [
        Request::OpenPartition { shuffle: ShuffleId(0), partition: 0 },
        Request::UnregisterShuffle { shuffle: ShuffleId(0) },
        Request::UnregisterApp,
    ] {
        let served = async {
            let (mut send, mut recv) = raw.connection.open_bi().await.ok()?;
            send.write_all(&request_bytes(&request)).await.ok()?;
            send.finish().ok()?;
            recv.read_to_end(1 << 16).await.ok()
        };
        let answer = tokio::time::timeout(five, served).await.ok().flatten();
        assert!(answer.is_none(), "the refused connection served {request:?}: {answer:?}");
    }

    // The owner's shuffle is untouched; a client with the secret can read and remove it.
    let partner = daemon.join(&owner).await.unwrap();
    let mut total = shuffle_tests::workload::W1Totals::default();
    for p in 0..PARAMS.partitions {
        total.merge(read_partition(&partner, ShuffleId(0), p, PARAMS.partitions).await.unwrap());
    }
    verify(PARAMS, total).unwrap();
    partner.unregister_shuffle(ShuffleId(0)).await.unwrap();
    let e = owner.unregister_shuffle(ShuffleId(0)).await.unwrap_err();
    assert_eq!(e.service_kind(), Some(ErrorKind::UnknownShuffle));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_asks_for_the_same_credentials() {
    let daemon = Daemon::start(&[]);
    let socket = daemon.data_dir.join("shuffle.sock");
    let owner = ShuffleClient::connect_unix(&socket, ClientOptions::new("local")).await.unwrap();
    owner.register_shuffle(ShuffleId(3), ShuffleSpec::hash(1, 1)).await.unwrap();

    let e =
        ShuffleClient::connect_unix(&socket, ClientOptions::new("local").secret(wrong_secret())).await.err().unwrap();
    assert_eq!(e.service_kind(), Some(ErrorKind::UnknownApp), "{e}");
    let e = ShuffleClient::connect_unix(&socket, ClientOptions::new("local")).await.err().unwrap();
    assert_eq!(e.service_kind(), Some(ErrorKind::AppExists), "{e}");

    // The owner's credentials work on QUIC too (a client in another process would pass them on).
    let options = ClientOptions::joining(owner.credentials()).trusted_cert(daemon.cert_path()).same_host(false);
    let remote = ShuffleClient::connect(daemon.addr, options).await.unwrap();
    assert!(remote.unix_socket().is_none());
    remote.register_shuffle(ShuffleId(3), ShuffleSpec::hash(1, 1)).await.unwrap(); // the same spec: accepted
    let e = remote.register_shuffle(ShuffleId(3), ShuffleSpec::hash(2, 1)).await.unwrap_err();
    assert_eq!(e.service_kind(), Some(ErrorKind::ShuffleExists), "the same app's shuffle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_on_the_servers_host_moves_to_its_unix_socket_by_itself() {
    let daemon = Daemon::start(&[]);
    let client = daemon.connect("mover").await.unwrap();
    assert_eq!(client.unix_socket(), Some(daemon.data_dir.join("shuffle.sock").as_path()));
    let outcome = run_exchange(&client, ShuffleId(0), PARAMS).await.unwrap();
    verify(PARAMS, outcome.received).unwrap();
    // Told not to, it stays on QUIC.
    let quic = ShuffleClient::connect(daemon.addr, daemon.options("stayer").same_host(false)).await.unwrap();
    assert!(quic.unix_socket().is_none());
    let outcome = run_exchange(&quic, ShuffleId(0), PARAMS).await.unwrap();
    verify(PARAMS, outcome.received).unwrap();
    // A daemon without a socket keeps everyone on QUIC.
    let no_socket = Daemon::start(&["--unix-socket", "off"]);
    let client = no_socket.connect("anyone").await.unwrap();
    assert!(client.unix_socket().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hands_its_apps_credentials_to_a_process_it_spawns() {
    use std::io::BufRead;

    use shuffle_tests::workload::{W1_KEY_LEN, W1_VALUE_LEN, w1_key_value, w1_record};
    let daemon = Daemon::start(&[]);
    let parent = daemon.connect("family").await.unwrap();
    parent.register_shuffle(ShuffleId(0), ShuffleSpec::hash(2, 2)).await.unwrap();
    // The child writes map 0 (records 0..50,000, record i to partition i % 2) into the parent's app.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_shuffle-e2e-client"))
        .args([daemon.addr.to_string(), daemon.cert_path().display().to_string(), "ignored".to_string()])
        .envs(parent.credentials().to_env())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    // The parent writes map 1 (records 50,000..100,000) and reads both partitions.
    let mut writer = parent.writer(ShuffleId(0), 1, 0).await.unwrap();
    let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
    for i in 50_000u64..100_000 {
        w1_record(42, i, &mut key, &mut value);
        writer.write((i % 2) as u32, &key, &value).await.unwrap();
    }
    writer.finish().await.unwrap();
    let mut total = shuffle_tests::workload::W1Totals::default();
    for p in 0..2 {
        let mut reader = parent.reader(ShuffleId(0), p).await.unwrap();
        while let Some(block) = reader.next_block().await.unwrap() {
            for (k, _) in block.records() {
                total.records += 1;
                total.key_sum = total.key_sum.wrapping_add(w1_key_value(k));
            }
        }
    }
    assert_eq!(total, shuffle_tests::workload::W1Totals::expected(42, 100_000));
    child.kill().unwrap();
    child.wait().unwrap();
}
