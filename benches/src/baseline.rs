//! Baselines measured in the same run as the workloads, so that a workload's
//! figure can be read as a fraction of what this machine can do right now:
//! memory bandwidth (memcpy), sequential disk write with fsync and read
//! back on the data dir's filesystem, and the raw throughput of one quinn
//! stream over loopback with the service's TLS and transport settings.

use std::{
    io::{Read, Write},
    path::Path,
    sync::Arc,
    time::Instant,
};

use anyhow::Context;
use bytes::Bytes;
use serde::Serialize;
use shuffle_server::{
    ServerConfig,
    tls::TlsMaterial,
    transport::{Windows, authenticated, server_transport},
};

/// What the machine did, in MB/s (10^6 bytes per second).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Baseline {
    pub memcpy_mb_per_s: f64,
    pub disk_write_fsync_mb_per_s: f64,
    pub disk_read_mb_per_s: f64,
    pub quinn_stream_mb_per_s: f64,
}

/// Bytes copied per memcpy round; large enough to leave the caches.
const MEMCPY_BYTES: usize = 256 << 20;
/// Bytes written and read back on disk.
const DISK_BYTES: usize = 1 << 30;
/// Bytes sent over the quinn stream.
const QUINN_BYTES: u64 = 1_000_000_000;

/// The median of `values`.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Memory bandwidth: the median of 5 copies of 256 MiB.
pub fn memcpy() -> f64 {
    let src = vec![0x5au8; MEMCPY_BYTES];
    let mut dst = vec![0u8; MEMCPY_BYTES];
    dst.copy_from_slice(&src); // fault the pages in first
    let rates: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            MEMCPY_BYTES as f64 / 1e6 / start.elapsed().as_secs_f64()
        })
        .collect();
    median(&rates)
}

/// Sequential write of 1 GiB in 1 MiB chunks ending with fsync, then a read
/// of it back, in `dir`. The read usually comes from the page cache, as
/// shuffle reads of recently written data do.
pub fn disk(dir: &Path) -> anyhow::Result<(f64, f64)> {
    let path = dir.join("shuffle-bench-baseline.tmp");
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 31 % 251) as u8).collect();
    let start = Instant::now();
    {
        let mut file = std::fs::File::create(&path).with_context(|| path.display().to_string())?;
        for _ in 0..DISK_BYTES / chunk.len() {
            file.write_all(&chunk)?;
        }
        file.sync_all()?;
    }
    let write = DISK_BYTES as f64 / 1e6 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut file = std::fs::File::open(&path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0usize;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        read += n;
    }
    let read_rate = read as f64 / 1e6 / start.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    anyhow::ensure!(read == DISK_BYTES, "read back {read} of {DISK_BYTES} bytes");
    Ok((write, read_rate))
}

/// A QUIC client configuration trusting the PEM certificate at `cert`, with
/// the service's ALPN and transport settings (the client library's own).
pub fn quic_client_config(cert: &Path) -> anyhow::Result<quinn::ClientConfig> {
    Ok(shuffle_client::quic_client_config(&shuffle_client::ClientOptions::new("baseline").trusted_cert(cert))?)
}

/// One quinn stream over loopback: 1 GB in 64 KiB chunks to a server that
/// discards them, with the service's TLS and transport settings; the median
/// of 3 runs. W1 crosses this path twice (push, then read).
pub async fn quinn_stream() -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let config = ServerConfig { data_dir: dir.path().to_path_buf(), ..ServerConfig::default() };
    let tls = TlsMaterial::load_or_generate(&config)?;
    let cert_path = tls.cert_path.clone();
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(tls.quic_server_config()?));
    let windows = Windows::for_budget(config.memory.as_u64(), config.max_connections);
    server_config.transport_config(server_transport(windows, config.idle_timeout, config.max_udp_payload));
    let server = quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
    let addr = server.local_addr()?;
    let accept = tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            tokio::spawn(async move {
                let Ok(connection) = incoming.await else {
                    return;
                };
                authenticated(&connection, windows, 16);
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
    client.set_default_client_config(quic_client_config(&cert_path)?);
    let connection = client.connect(addr, "localhost")?.await?;
    let chunk = Bytes::from(vec![0x5au8; 64 * 1024]);
    let mut rates = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let (mut send, mut recv) = connection.open_bi().await?;
        let mut sent = 0u64;
        while sent < QUINN_BYTES {
            let mut batch: Vec<Bytes> = (0..16).map(|_| chunk.clone()).collect();
            send.write_all_chunks(&mut batch).await?;
            sent += 16 * chunk.len() as u64;
        }
        send.finish()?;
        let mut ack = [0u8; 8];
        recv.read_exact(&mut ack).await?;
        anyhow::ensure!(
            u64::from_le_bytes(ack) == sent,
            "the server received {} of {sent} bytes",
            u64::from_le_bytes(ack)
        );
        rates.push(sent as f64 / 1e6 / start.elapsed().as_secs_f64());
    }
    connection.close(0u32.into(), b"done");
    accept.abort();
    Ok(median(&rates))
}

/// All baselines, the disk ones in `dir`.
pub async fn measure(dir: &Path) -> anyhow::Result<Baseline> {
    let memcpy_mb_per_s = tokio::task::block_in_place(memcpy);
    let (disk_write_fsync_mb_per_s, disk_read_mb_per_s) = tokio::task::block_in_place(|| disk(dir))?;
    let quinn_stream_mb_per_s = quinn_stream().await?;
    Ok(Baseline { memcpy_mb_per_s, disk_write_fsync_mb_per_s, disk_read_mb_per_s, quinn_stream_mb_per_s })
}
