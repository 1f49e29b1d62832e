//! Micro-benchmarks of the hot paths: block encode and decode (lz4 and
//! CRC32C), record framing, the workload partitioners, the client's sort
//! buffer and the frame codec. `cargo bench -p shuffle-bench`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use engine_adapter::workload::{W1_KEY_LEN, W1_VALUE_LEN, w1_partition, w1_record, w3_partition};
use shuffle_client::SortBuffer;
use shuffle_protocol::{Block, BlockId, Codec, FrameDecoder, FrameKind, RecordIter, append_record, encode_frame};

/// W1 records framed into one block's payload of about `bytes`.
fn w1_payload(bytes: usize) -> (Vec<u8>, u32) {
    let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
    let mut out = Vec::with_capacity(bytes + 128);
    let mut count = 0;
    while out.len() < bytes {
        w1_record(42, u64::from(count), &mut key, &mut value);
        append_record(&mut out, &key, &value);
        count += 1;
    }
    (out, count)
}

fn block_id() -> BlockId {
    BlockId { map: 1, attempt: 0, partition: 3, run: 0, sequence: 7 }
}

fn blocks(c: &mut Criterion) {
    let (payload, count) = w1_payload(64 * 1024);
    let mut group = c.benchmark_group("block");
    group.throughput(Throughput::Bytes(payload.len() as u64));
    for codec in [Codec::Lz4, Codec::None] {
        group.bench_with_input(BenchmarkId::new("encode", format!("{codec:?}")), &codec, |b, &codec| {
            b.iter(|| shuffle_protocol::encode_block(block_id(), black_box(&payload), count, codec))
        });
        let encoded = shuffle_protocol::encode_block(block_id(), &payload, count, codec);
        group.bench_with_input(BenchmarkId::new("decode", format!("{codec:?}")), &encoded, |b, encoded| {
            b.iter(|| {
                let block = Block::parse(black_box(encoded.clone())).expect("valid block");
                block.verify().expect("valid CRC");
                block.into_records().expect("valid records")
            })
        });
    }
    group.finish();
}

fn records(c: &mut Criterion) {
    let (payload, count) = w1_payload(1 << 20);
    let mut group = c.benchmark_group("records");
    group.throughput(Throughput::Bytes(payload.len() as u64));
    let pairs: Vec<([u8; W1_KEY_LEN], [u8; W1_VALUE_LEN])> = (0..u64::from(count))
        .map(|i| {
            let (mut k, mut v) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
            w1_record(42, i, &mut k, &mut v);
            (k, v)
        })
        .collect();
    group.bench_function("frame", |b| {
        let mut out = Vec::with_capacity(payload.len() + 128);
        b.iter(|| {
            out.clear();
            for (k, v) in &pairs {
                append_record(&mut out, k, v);
            }
            black_box(out.len())
        })
    });
    group.bench_function("iterate", |b| {
        b.iter(|| RecordIter::new(black_box(&payload)).map(|r| r.expect("valid").0.len()).sum::<usize>())
    });
    group.finish();
}

fn partitioners(c: &mut Criterion) {
    let keys: Vec<[u8; W1_KEY_LEN]> = (0..100_000u64)
        .map(|i| {
            let (mut k, mut v) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
            w1_record(42, i, &mut k, &mut v);
            k
        })
        .collect();
    let mut group = c.benchmark_group("partitioner");
    group.throughput(Throughput::Elements(keys.len() as u64));
    group.bench_function("hash (xxhash64 mod R)", |b| {
        b.iter(|| keys.iter().map(|k| w1_partition(black_box(k), 16)).sum::<u32>())
    });
    group.bench_function("range (W3)", |b| b.iter(|| keys.iter().map(|k| w3_partition(black_box(k), 16)).sum::<u32>()));
    group.finish();
}

fn sort_buffer(c: &mut Criterion) {
    let records: Vec<([u8; W1_KEY_LEN], [u8; W1_VALUE_LEN])> = (0..40_000u64)
        .map(|i| {
            let (mut k, mut v) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
            w1_record(42, i, &mut k, &mut v);
            (k, v)
        })
        .collect();
    let mut group = c.benchmark_group("sort_buffer");
    group.throughput(Throughput::Bytes((records.len() * (W1_KEY_LEN + W1_VALUE_LEN)) as u64));
    for (name, key_ordering, partitions) in [
        ("by partition, R=16", false, 16),
        ("by partition and key, R=16", true, 16),
        ("by partition, R=2000", false, 2000),
    ] {
        group.bench_function(name, |b| {
            let mut buffer = SortBuffer::new(64 << 20, key_ordering);
            b.iter(|| {
                buffer.clear();
                for (k, v) in &records {
                    buffer.push(w1_partition(k, partitions), k, v);
                }
                buffer.sort();
                black_box(buffer.record(0).0)
            })
        });
    }
    group.finish();
}

fn frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    for size in [64usize, 64 * 1024] {
        let payload = vec![7u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &payload, |b, p| {
            b.iter(|| encode_frame(FrameKind::Block, black_box(p)))
        });
        let frame = encode_frame(FrameKind::Block, &payload).expect("fits a frame");
        group.bench_with_input(BenchmarkId::new("decode", size), &frame, |b, f| {
            b.iter(|| FrameDecoder::default().feed(black_box(&f[..])).expect("valid").pop().expect("complete"))
        });
    }
    group.finish();
}

criterion_group!(micro, blocks, records, partitioners, sort_buffer, frames);
criterion_main!(micro);
