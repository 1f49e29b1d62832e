//! The raw transport ceiling: one quinn stream over loopback with the same
//! TLS and transport settings the service uses, moving `--bytes` in 64 KiB
//! chunks from a client to a server that discards them. W1 crosses this path
//! twice (push, then read), so this figure bounds what W1 can reach.
//!
//! `cargo run --release -p shuffle-tests --example quinn_baseline -- --bytes 1000000000 --repeat 3`

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use clap::Parser;
use shuffle_server::{ServerConfig, tls::TlsMaterial, transport::transport_config};

/// One-stream quinn loopback throughput.
#[derive(Parser)]
struct Args {
    /// Bytes to send per run.
    #[arg(long, default_value_t = 1_000_000_000)]
    bytes: u64,
    /// Runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let config = ServerConfig { data_dir: dir.path().to_path_buf(), ..ServerConfig::default() };
    let tls = TlsMaterial::load_or_generate(&config)?;
    let cert_path = tls.cert_path.clone();
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(tls.quic_server_config()?));
    server_config.transport_config(transport_config(config.idle_timeout, 16));
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
    let addr = server.local_addr()?;
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else {
                    return;
                };
                while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                    let mut received = 0u64;
                    while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, true).await {
                        received += chunk.bytes.len() as u64;
                    }
                    let _ = send.write_all(&received.to_le_bytes()).await;
                    let _ = send.finish();
                }
            });
        }
    });

    let mut client = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    client.set_default_client_config(shuffle_tests::raw::client_config(&cert_path));
    let connection = client.connect(addr, "localhost")?.await?;
    let chunk = Bytes::from(vec![0x5au8; 64 * 1024]);
    let mut rates = Vec::new();
    for run in 1..=args.repeat {
        let start = Instant::now();
        let (mut send, mut recv) = connection.open_bi().await?;
        let mut sent = 0u64;
        while sent < args.bytes {
            let mut batch: Vec<Bytes> = (0..16).map(|_| chunk.clone()).collect();
            send.write_all_chunks(&mut batch).await?;
            sent += 16 * chunk.len() as u64;
        }
        send.finish()?;
        let mut ack = [0u8; 8];
        recv.read_exact(&mut ack).await?;
        let elapsed = start.elapsed().as_secs_f64();
        anyhow::ensure!(u64::from_le_bytes(ack) == sent, "server received {} of {sent} bytes", u64::from_le_bytes(ack));
        let rate = sent as f64 / 1e6 / elapsed;
        println!("run {run}: {sent} bytes in {elapsed:.3} s = {rate:.1} MB/s");
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    println!("median one-stream quinn loopback throughput: {:.1} MB/s", rates[rates.len() / 2]);
    Ok(())
}
