//! A client process for tests that need a client to vanish: connects to the
//! daemon at ADDR trusting CERT as app APP, commits one map of a hash shuffle
//! (enough data for files on disk), prints `ready`, and then waits until it
//! is killed.
//!
//! `shuffle-e2e-client ADDR CERT APP [quic|unix]` (default: unix, the
//! daemon's socket on this host). When the environment carries an app's
//! credentials (`SHUFFLE_APP`, `SHUFFLE_APP_SECRET`: a parent process
//! handing its app over), the client joins that app instead of creating APP.

use std::time::Duration;

use shuffle_client::{AppCredentials, ClientOptions, CommitOutcome, ShuffleClient, ShuffleId, ShuffleSpec};
use shuffle_tests::workload::{W1_KEY_LEN, W1_VALUE_LEN, w1_record};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (addr, cert, app, transport) = match args.as_slice() {
        [addr, cert, app] => (addr, cert, app, "unix"),
        [addr, cert, app, transport] => (addr, cert, app, transport.as_str()),
        _ => anyhow::bail!("usage: shuffle-e2e-client ADDR CERT APP [quic|unix]"),
    };
    let options = match AppCredentials::from_env() {
        Some(credentials) => ClientOptions::joining(&credentials),
        None => ClientOptions::new(app.as_str()),
    };
    let options = options.trusted_cert(cert).same_host(transport == "unix");
    let client = ShuffleClient::connect(addr.parse()?, options).await?;
    client.register_shuffle(ShuffleId(0), ShuffleSpec::hash(2, 2)).await?;
    let mut writer = client.writer(ShuffleId(0), 0, 0).await?;
    // W1 records: their hex values do not compress away, so the map's
    // output is megabytes on disk, not a few lz4 blocks in memory.
    let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
    for i in 0u64..50_000 {
        w1_record(42, i, &mut key, &mut value);
        writer.write((i % 2) as u32, &key, &value).await?;
    }
    anyhow::ensure!(writer.finish().await? == CommitOutcome::Committed, "map 0 did not commit");
    println!("ready");
    loop {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}
