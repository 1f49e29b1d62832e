//! Baselines measured in the same run as the workloads, so that a workload's
//! figure can be read as a fraction of what this machine can do right now:
//! memory bandwidth (memcpy), sequential disk write with fsync and read
//! back on the data dir's filesystem, QUIC over loopback with the service's
//! own TLS and transport settings (one stream, and the aggregate of several
//! connections), a Unix socket (the same-host path), and W1's own work
//! with no exchange at all (the floor no shuffle can go under).

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
    /// One quinn stream on one connection.
    pub quinn_stream_mb_per_s: f64,
    /// The aggregate of [`QUIC_CONNECTIONS`] connections, one stream each.
    pub quic_aggregate_mb_per_s: f64,
    /// One Unix-socket stream.
    pub unix_socket_mb_per_s: f64,
    /// W1's records generated, partitioned and tallied by their reducers on
    /// every core, with no exchange: see [`w1_compute`].
    pub w1_compute_mb_per_s: f64,
}

/// Connections of the aggregate QUIC baseline: as many as a client opens
/// for pushes and reads together with four writers and four readers busy.
pub const QUIC_CONNECTIONS: usize = 4;

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

/// QUIC over loopback: 1 GB in 64 KiB chunks, over `connections`
/// connections with one stream each, to a server that discards them, with
/// the service's TLS and transport settings (windows sized from the default
/// budget, as a daemon sizes them); the median of 3 runs of the aggregate.
/// W1 crosses this path twice (push, then read).
pub async fn quic(connections: usize) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let config = ServerConfig { data_dir: dir.path().to_path_buf(), ..ServerConfig::default() };
    let tls = TlsMaterial::load_or_generate(&config)?;
    let cert_path = tls.cert_path.clone();
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(tls.quic_server_config()?));
    let windows = Windows::for_budget(config.memory.as_u64(), config.max_connections);
    server_config.transport_config(server_transport(windows, config.idle_timeout, config.max_udp_payload));
    // The daemon's and the client's own sockets (UDP buffers sized as theirs).
    let socket = shuffle_server::fault::udp_socket("127.0.0.1:0".parse()?, None)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let server = quinn::Endpoint::new_with_abstract_socket(Default::default(), Some(server_config), socket, runtime)?;
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
    let mut client = shuffle_client::quic_endpoint("127.0.0.1:0".parse()?)?;
    client.set_default_client_config(quic_client_config(&cert_path)?);
    let mut links = Vec::new();
    for _ in 0..connections.max(1) {
        links.push(client.connect(addr, "localhost")?.await?);
    }
    let per_connection = QUINN_BYTES / links.len() as u64;
    let mut rates = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let senders: Vec<_> = links
            .iter()
            .map(|connection| {
                let connection = connection.clone();
                tokio::spawn(async move {
                    let chunk = Bytes::from(vec![0x5au8; 64 * 1024]);
                    let (mut send, mut recv) = connection.open_bi().await?;
                    let mut sent = 0u64;
                    while sent < per_connection {
                        let mut batch: Vec<Bytes> = (0..16).map(|_| chunk.clone()).collect();
                        send.write_all_chunks(&mut batch).await?;
                        sent += 16 * chunk.len() as u64;
                    }
                    send.finish()?;
                    let mut ack = [0u8; 8];
                    recv.read_exact(&mut ack).await?;
                    let got = u64::from_le_bytes(ack);
                    anyhow::ensure!(got == sent, "the server received {got} of {sent} bytes");
                    anyhow::Ok(sent)
                })
            })
            .collect();
        let mut total = 0;
        for s in senders {
            total += s.await??;
        }
        rates.push(total as f64 / 1e6 / start.elapsed().as_secs_f64());
    }
    for connection in links {
        connection.close(0u32.into(), b"done");
    }
    accept.abort();
    Ok(median(&rates))
}

/// A Unix socket: 1 GB in 64 KiB writes to a reader that discards it in
/// 256 KiB reads; the median of 3 runs.
pub async fn unix_socket() -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("baseline.sock");
    let listener = tokio::net::UnixListener::bind(&path)?;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut rates = Vec::new();
    for _ in 0..3 {
        let (accepted, connected) = tokio::join!(listener.accept(), tokio::net::UnixStream::connect(&path));
        let (mut server, _) = accepted?;
        let mut client = connected?;
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 256 << 10];
            let mut received = 0u64;
            loop {
                let n = server.read(&mut buf).await?;
                if n == 0 {
                    return anyhow::Ok(received);
                }
                received += n as u64;
            }
        });
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < QUINN_BYTES {
            client.write_all(&chunk).await?;
            sent += chunk.len() as u64;
        }
        client.shutdown().await?;
        let received = reader.await??;
        anyhow::ensure!(received == sent, "the reader received {received} of {sent} bytes");
        rates.push(sent as f64 / 1e6 / start.elapsed().as_secs_f64());
    }
    Ok(median(&rates))
}

/// Records of the W1 compute baseline (W1's default N).
const W1_COMPUTE_RECORDS: u64 = 10_000_000;

/// W1's own work with no exchange: each of the machine's cores generates
/// its share of the records (as W1's maps do), partitions each one (as the
/// writer does) and tallies its key into that partition's totals (as the
/// reducers do); the median of 3 runs, in MB/s of records. A shuffle adds
/// its own work to this, so no W1 run on this machine can be faster.
pub fn w1_compute() -> f64 {
    use engine_adapter::workload::{W1_KEY_LEN, W1_RECORD_LEN, W1_VALUE_LEN, W1Totals, w1_partition, w1_record};
    const PARTITIONS: u32 = 16;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let rates: Vec<f64> = (0..3)
        .map(|_| {
            let start = Instant::now();
            let totals: Vec<W1Totals> = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..threads)
                    .map(|t| {
                        scope.spawn(move || {
                            let mut tallies: Vec<W1Totals> = vec![W1Totals::default(); PARTITIONS as usize];
                            let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
                            for i in (t..W1_COMPUTE_RECORDS).step_by(threads as usize) {
                                w1_record(42, i, &mut key, &mut value);
                                std::hint::black_box(&value);
                                tallies[w1_partition(&key, PARTITIONS) as usize].add_key(&key);
                            }
                            let mut all = W1Totals::default();
                            tallies.into_iter().for_each(|p| all.merge(p));
                            all
                        })
                    })
                    .collect();
                workers.into_iter().map(|w| w.join().expect("W1 compute thread")).collect()
            });
            let records: u64 = totals.iter().map(|t| t.records).sum();
            assert_eq!(records, W1_COMPUTE_RECORDS);
            (W1_COMPUTE_RECORDS * W1_RECORD_LEN as u64) as f64 / 1e6 / start.elapsed().as_secs_f64()
        })
        .collect();
    median(&rates)
}

/// All baselines, the disk ones in `dir`.
pub async fn measure(dir: &Path) -> anyhow::Result<Baseline> {
    let memcpy_mb_per_s = tokio::task::block_in_place(memcpy);
    let (disk_write_fsync_mb_per_s, disk_read_mb_per_s) = tokio::task::block_in_place(|| disk(dir))?;
    let quinn_stream_mb_per_s = quic(1).await?;
    let quic_aggregate_mb_per_s = quic(QUIC_CONNECTIONS).await?;
    let unix_socket_mb_per_s = unix_socket().await?;
    let w1_compute_mb_per_s = tokio::task::block_in_place(w1_compute);
    Ok(Baseline {
        memcpy_mb_per_s,
        disk_write_fsync_mb_per_s,
        disk_read_mb_per_s,
        quinn_stream_mb_per_s,
        quic_aggregate_mb_per_s,
        unix_socket_mb_per_s,
        w1_compute_mb_per_s,
    })
}
