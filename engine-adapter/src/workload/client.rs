//! W1 `exchange` over a real client: M map tasks write the generated records,
//! R reducers (started together with the maps) read their partitions, count,
//! sum the keys and check that every key belongs to their partition.

use std::time::{Duration, Instant};

use shuffle_client::{ClientError, CommitOutcome, ExchangeMode, ShuffleClient, ShuffleId, ShuffleSpec};

use super::{W1_KEY_LEN, W1_RECORD_LEN, W1_VALUE_LEN, W1Totals, map_range, w1_partition, w1_record, w3_partition};

/// Parameters of one W1 run.
#[derive(Clone, Copy, Debug)]
pub struct ExchangeParams {
    pub records: u64,
    pub maps: u32,
    pub partitions: u32,
    pub seed: u64,
    /// Hash, sort without key ordering, or hybrid with selective spilling.
    pub mode: ExchangeMode,
}

impl Default for ExchangeParams {
    fn default() -> Self {
        Self { records: 10_000_000, maps: 4, partitions: 16, seed: 42, mode: ExchangeMode::Hash }
    }
}

impl ExchangeParams {
    /// The spec W1 registers in this mode.
    pub fn spec(&self) -> ShuffleSpec {
        match self.mode {
            ExchangeMode::Hash => ShuffleSpec::hash(self.maps, self.partitions),
            ExchangeMode::Sort => ShuffleSpec::sort(self.maps, self.partitions, false),
            ExchangeMode::Hybrid => {
                ShuffleSpec::hybrid(self.maps, self.partitions, shuffle_client::SpillStrategy::Selective)
            }
        }
    }
}

/// What a W1 run measured and received.
#[derive(Clone, Copy, Debug)]
pub struct ExchangeOutcome {
    /// Totals over all reducers.
    pub received: W1Totals,
    /// Wall time from the first map starting to the last reducer finishing.
    pub elapsed: Duration,
    /// Input bytes (records × 100).
    pub input_bytes: u64,
}

/// Chooses a record's partition from its key and the partition count.
pub type Partitioner = fn(&[u8], u32) -> u32;

/// Writes map `m`'s W1 records (attempt `attempt`), partitioned as in W1, and finishes the attempt.
pub async fn write_map(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    params: ExchangeParams,
    map: u32,
    attempt: u32,
) -> Result<CommitOutcome, ClientError> {
    write_map_with(client, shuffle, params, (map, attempt), w1_partition).await
}

/// Writes map `m`'s W1 records (attempt `attempt`) with `partitioner`, and finishes the attempt.
pub async fn write_map_with(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    params: ExchangeParams,
    (map, attempt): (u32, u32),
    partitioner: Partitioner,
) -> Result<CommitOutcome, ClientError> {
    let mut writer = client.writer(shuffle, map, attempt).await?;
    let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
    for i in map_range(params.records, params.maps, map) {
        w1_record(params.seed, i, &mut key, &mut value);
        writer.write(partitioner(&key, params.partitions), &key, &value).await?;
    }
    writer.finish().await
}

/// Reads one partition, checking that every key belongs to it.
pub async fn read_partition(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    partition: u32,
    partitions: u32,
) -> Result<W1Totals, String> {
    let mut reader = client.reader(shuffle, partition).await.map_err(|e| e.to_string())?;
    let mut totals = W1Totals::default();
    while let Some(block) = reader.next_block().await.map_err(|e| e.to_string())? {
        for (key, value) in block.records() {
            if key.len() != W1_KEY_LEN || value.len() != W1_VALUE_LEN {
                return Err(format!("partition {partition}: record of {}+{} bytes", key.len(), value.len()));
            }
            if w1_partition(key, partitions) != partition {
                return Err(format!(
                    "partition {partition} received a key of partition {}",
                    w1_partition(key, partitions)
                ));
            }
            totals.add_key(key);
        }
    }
    Ok(totals)
}

/// Starts attempt 0 of every map task, writing W1 records partitioned by `partitioner`.
fn spawn_maps(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    params: ExchangeParams,
    partitioner: Partitioner,
) -> Vec<tokio::task::JoinHandle<Result<CommitOutcome, ClientError>>> {
    (0..params.maps)
        .map(|m| {
            let client = client.clone();
            tokio::spawn(async move { write_map_with(&client, shuffle, params, (m, 0), partitioner).await })
        })
        .collect()
}

/// Waits for the map tasks; each must have committed.
async fn await_commits(maps: Vec<tokio::task::JoinHandle<Result<CommitOutcome, ClientError>>>) -> Result<(), String> {
    for (m, task) in maps.into_iter().enumerate() {
        match task.await.map_err(|e| e.to_string())? {
            Ok(CommitOutcome::Committed) => {}
            other => return Err(format!("map {m} did not commit: {other:?}")),
        }
    }
    Ok(())
}

/// Registers `shuffle`, runs W1 through it with readers started alongside the
/// maps, and returns what the reducers received (unverified: see [`verify`]).
pub async fn run_exchange(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    params: ExchangeParams,
) -> Result<ExchangeOutcome, String> {
    run_exchange_as(client, shuffle, params, params.spec()).await
}

/// As [`run_exchange`], registering the shuffle with `spec` (W1's spec
/// with other settings, such as a cluster's replication).
pub async fn run_exchange_as(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    params: ExchangeParams,
    spec: ShuffleSpec,
) -> Result<ExchangeOutcome, String> {
    client.register_shuffle(shuffle, spec).await.map_err(|e| e.to_string())?;
    let start = Instant::now();
    let maps = spawn_maps(client, shuffle, params, w1_partition);
    let reducers: Vec<_> = (0..params.partitions)
        .map(|p| {
            let client = client.clone();
            tokio::spawn(async move { read_partition(&client, shuffle, p, params.partitions).await })
        })
        .collect();
    await_commits(maps).await?;
    let mut received = W1Totals::default();
    for task in reducers {
        received.merge(task.await.map_err(|e| e.to_string())??);
    }
    Ok(ExchangeOutcome { received, elapsed: start.elapsed(), input_bytes: params.records * W1_RECORD_LEN as u64 })
}

/// Checks a run's totals against the generator's.
pub fn verify(params: ExchangeParams, received: W1Totals) -> Result<(), String> {
    let expected = W1Totals::expected(params.seed, params.records);
    if received != expected {
        return Err(format!("received {received:?}, expected {expected:?}"));
    }
    Ok(())
}

/// What one W3 reducer saw: its totals and the first and last key of its partition.
#[derive(Clone, Debug, Default)]
pub struct SortedPartition {
    pub totals: W1Totals,
    pub first_key: Option<Vec<u8>>,
    pub last_key: Option<Vec<u8>>,
}

/// Reads one W3 partition in key order, checking that keys never decrease
/// and that every key belongs to the partition.
pub async fn read_sorted_partition(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    partition: u32,
    partitions: u32,
) -> Result<SortedPartition, String> {
    let mut reader = client.reader(shuffle, partition).await.map_err(|e| e.to_string())?;
    let mut out = SortedPartition::default();
    let mut previous: Option<shuffle_client::Bytes> = None;
    while let Some(record) = reader.next_record().await.map_err(|e| e.to_string())? {
        if w3_partition(&record.key, partitions) != partition {
            return Err(format!(
                "partition {partition} received a key of partition {}",
                w3_partition(&record.key, partitions)
            ));
        }
        if previous.as_ref().is_some_and(|p| *p > record.key) {
            return Err(format!("partition {partition} is not sorted: {:?} came after {:?}", record.key, previous));
        }
        if out.first_key.is_none() {
            out.first_key = Some(record.key.to_vec());
        }
        out.totals.add_key(&record.key);
        previous = Some(record.key);
    }
    out.last_key = previous.map(|k| k.to_vec());
    Ok(out)
}

/// Runs W3 `sort` through a key-ordered sort shuffle: range-partitioned by
/// key, each partition read in key order. Returns the totals after checking
/// order within every partition and across partition boundaries (count and
/// checksum are left to [`verify`]).
pub async fn run_sort(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    params: ExchangeParams,
) -> Result<ExchangeOutcome, String> {
    run_sort_as(client, shuffle, params, ShuffleSpec::sort(params.maps, params.partitions, true)).await
}

/// As [`run_sort`], registering the shuffle with `spec` (a key-ordered sort
/// spec with other settings, such as a cluster's replication).
pub async fn run_sort_as(
    client: &ShuffleClient,
    shuffle: ShuffleId,
    params: ExchangeParams,
    spec: ShuffleSpec,
) -> Result<ExchangeOutcome, String> {
    if !(spec.mode == ExchangeMode::Sort && spec.key_ordering) {
        return Err(format!("W3 needs a key-ordered sort shuffle, not {spec:?}"));
    }
    client.register_shuffle(shuffle, spec).await.map_err(|e| e.to_string())?;
    let start = Instant::now();
    let maps = spawn_maps(client, shuffle, params, w3_partition);
    let reducers: Vec<_> = (0..params.partitions)
        .map(|p| {
            let client = client.clone();
            tokio::spawn(async move { read_sorted_partition(&client, shuffle, p, params.partitions).await })
        })
        .collect();
    await_commits(maps).await?;
    let mut received = W1Totals::default();
    let mut last_key: Option<(u32, Vec<u8>)> = None;
    for (p, task) in reducers.into_iter().enumerate() {
        let part = task.await.map_err(|e| e.to_string())??;
        received.merge(part.totals);
        if let (Some((q, last)), Some(first)) = (&last_key, &part.first_key)
            && last > first
        {
            return Err(format!("partition {q} ends with {last:?}, after partition {p} starts with {first:?}"));
        }
        if let Some(last) = part.last_key {
            last_key = Some((p as u32, last));
        }
    }
    Ok(ExchangeOutcome { received, elapsed: start.elapsed(), input_bytes: params.records * W1_RECORD_LEN as u64 })
}
