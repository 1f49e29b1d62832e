//! Certificates: a configured certificate and key are used as given, and a
//! client that does not trust the server's certificate cannot connect.

use shuffle_client::{ClientOptions, ShuffleClient, ShuffleId, ShuffleSpec};
use shuffle_tests::daemon::Daemon;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_certificate_is_served_and_untrusted_ones_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["shuffle.internal".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("prod-cert.pem"), dir.path().join("prod-key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();

    let daemon = Daemon::start(&["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()]);
    assert!(!daemon.data_dir.join("tls").exists(), "no certificate is generated when one is configured");
    let mut options = ClientOptions::new("prod").trusted_cert(&cert);
    options.server_name = "shuffle.internal".into();
    let client = ShuffleClient::connect(daemon.addr, options).await.unwrap();
    client.register_shuffle(ShuffleId(0), ShuffleSpec::hash(1, 1)).await.unwrap();

    // A client trusting some other certificate fails the handshake.
    let other = rcgen::generate_simple_self_signed(vec!["shuffle.internal".to_string()]).unwrap();
    let other_cert = dir.path().join("other.pem");
    std::fs::write(&other_cert, other.cert.pem()).unwrap();
    let mut options = ClientOptions::new("prod").trusted_cert(&other_cert);
    options.server_name = "shuffle.internal".into();
    let e = ShuffleClient::connect(daemon.addr, options).await.err().unwrap();
    assert!(e.to_string().contains("cannot connect"), "{e}");
}
