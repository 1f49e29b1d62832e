//! Reads and operators over data 8× their memory budget, with the shuffle
//! server in a child process so that this process's resident memory is the
//! reader's and the engine's alone. Each scenario takes a baseline of the
//! resident set (`VmRSS`), resets the peak (`VmHWM`, via
//! `/proc/self/clear_refs`), runs, and checks the peak's growth over the
//! baseline against its budget plus a stated margin, and the result against
//! a reference. The scenarios take turns (a lock), so that each measures
//! only itself.

use std::sync::Mutex;

use shuffle_client::{CommitOutcome, ShuffleClient, ShuffleId, ShuffleSpec};
use shuffle_tests::{
    daemon::{Daemon, proc_status_kib},
    workload::{W1_KEY_LEN, W1_RECORD_LEN, W1_VALUE_LEN, W1Totals, map_range, w1_record},
};

/// One scenario at a time: each measures this process's memory.
static TURN: Mutex<()> = Mutex::new(());

/// What fixed costs may add to a scenario's peak besides its budget: a
/// tokio runtime's threads and buffers, frame decoders, the allocator's
/// arenas and free lists, and batches in flight between tasks (measured:
/// see each scenario's printed figures).
const MARGIN: u64 = 12 << 20;

fn rss() -> u64 {
    proc_status_kib(std::process::id(), "VmRSS:") * 1024
}

/// Peak resident memory growth while `f` runs, over the resident memory before it.
fn peak_growth<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let baseline = rss();
    std::fs::write("/proc/self/clear_refs", "5").expect("resetting VmHWM (Linux)");
    let out = f();
    let peak = proc_status_kib(std::process::id(), "VmHWM:") * 1024;
    (out, peak.saturating_sub(baseline))
}

#[test]
fn a_key_ordered_read_of_a_partition_8x_its_budget_is_sorted_exact_and_within_budget() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    const BUDGET: usize = 4 << 20;
    const MAPS: u32 = 2;
    let records = 8 * BUDGET as u64 / W1_RECORD_LEN as u64;
    let daemon = Daemon::start(&["--memory", "16MiB"]);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut options = daemon.options("bounded-merge");
    // Small sort buffers: each map writes some forty runs.
    options.sort_buffer = 1 << 20;
    let client = runtime.block_on(ShuffleClient::connect(daemon.addr, options)).unwrap();
    assert!(client.unix_socket().is_some(), "same host: the Unix socket and direct reads");
    runtime.block_on(async {
        client.register_shuffle(ShuffleId(0), ShuffleSpec::sort(MAPS, 1, true)).await.unwrap();
        for map in 0..MAPS {
            let mut writer = client.writer(ShuffleId(0), map, 0).await.unwrap();
            let (mut key, mut value) = ([0u8; W1_KEY_LEN], [0u8; W1_VALUE_LEN]);
            for i in map_range(records, MAPS, map) {
                w1_record(5, i, &mut key, &mut value);
                writer.write(0, &key, &value).await.unwrap();
            }
            assert_eq!(writer.finish().await.unwrap(), CommitOutcome::Committed);
        }
    });
    let ((received, peak_blocks, sorted), growth) = peak_growth(|| {
        runtime.block_on(async {
            let mut reader = client.reader(ShuffleId(0), 0).await.unwrap();
            reader.set_merge_memory(BUDGET);
            let (mut totals, mut previous, mut sorted) = (W1Totals::default(), Vec::new(), true);
            while let Some(r) = reader.next_record().await.unwrap() {
                sorted &= previous.as_slice() <= &r.key[..];
                previous.clear();
                previous.extend_from_slice(&r.key);
                totals.add_key(&r.key);
            }
            (totals, reader.peak_merge_bytes(), sorted)
        })
    });
    eprintln!(
        "key-ordered read of {} MiB with a {} MiB budget: merge held at most {} KiB; RSS grew {} KiB",
        (records * W1_RECORD_LEN as u64) >> 20,
        BUDGET >> 20,
        peak_blocks >> 10,
        growth >> 10
    );
    assert!(sorted, "records out of key order");
    assert_eq!(received, W1Totals::expected(5, records), "count and key checksum");
    assert!(peak_blocks <= BUDGET, "the merge held {peak_blocks} bytes of blocks, over its budget of {BUDGET}");
    assert!(
        growth <= BUDGET as u64 + MARGIN,
        "resident memory grew {growth} bytes reading the partition, over the budget of {BUDGET} + {MARGIN}"
    );
}
