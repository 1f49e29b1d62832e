//! The server's memory budget holds under load: an embedded server with a
//! small budget, sampled while W1 runs through it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use shuffle_client::{ClientOptions, ShuffleClient, ShuffleId};
use shuffle_server::{ByteSize, ServerConfig};
use shuffle_tests::exchange::{ExchangeParams, run_exchange, verify};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_memory_stays_within_the_budget_while_producers_outpace_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 8 << 20;
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        memory: ByteSize(budget),
        flush_size: ByteSize(4 << 20),
        ..ServerConfig::default()
    };
    let server = Arc::new(shuffle_server::start(config).await.unwrap());
    let client =
        ShuffleClient::connect(server.local_addr(), ClientOptions::new("bounded").trusted_cert(server.cert_path()))
            .await
            .unwrap();

    let peak = Arc::new(AtomicUsize::new(0));
    let running = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn({
        let (server, peak, running) = (server.clone(), peak.clone(), running.clone());
        async move {
            while running.load(Ordering::Acquire) {
                peak.fetch_max(server.memory_used(), Ordering::AcqRel);
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
    });
    let params =
        ExchangeParams { records: 600_000, maps: 4, partitions: 8, seed: 3, mode: shuffle_client::ExchangeMode::Hash };
    let outcome = run_exchange(&client, ShuffleId(0), params).await.unwrap();
    running.store(false, Ordering::Release);
    sampler.await.unwrap();
    verify(params, outcome.received).unwrap();

    let peak = peak.load(Ordering::Acquire) as u64;
    // Producers pause at 90% of the budget; each of the 4 push streams may
    // have one block (< 128 KiB) in hand when it checks.
    assert!(peak <= budget + 4 * (128 << 10), "peak {peak} bytes over a budget of {budget}");
    assert!(peak > budget / 4, "peak {peak}: the budget was not even used, the test proves nothing");
    let stats = server.stats();
    assert!(stats.spills > 0, "60 MB through an 8 MiB budget must spill: {stats:?}");
}
