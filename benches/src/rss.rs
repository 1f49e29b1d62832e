//! Peak resident set size of this process (Linux: `VmHWM` in
//! `/proc/self/status`), reset between workloads by writing `5` to
//! `/proc/self/clear_refs`.

/// Resets the peak to the current RSS; a no-op where the kernel does not allow it.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A `kB` field of `/proc/self/status`, in bytes (0 if unknown).
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The peak RSS in bytes since the last reset (0 if unknown).
pub fn peak() -> u64 {
    status_bytes("VmHWM")
}

/// This process's anonymous resident memory now (`RssAnon`), in bytes.
pub fn anon() -> u64 {
    status_bytes("RssAnon")
}

/// Samples `RssAnon` every 50 ms until stopped and keeps the peak. Peak
/// RSS (`VmHWM`) also counts the pages of the server's memory-mapped
/// partition files that reads touched; those are page cache the kernel can
/// drop, so the anonymous peak is the figure for the server's own memory.
pub struct AnonSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl AnonSampler {
    pub fn start() -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = anon();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(50));
                peak = peak.max(anon());
            }
            peak
        });
        Self { stop, thread }
    }

    /// Stops sampling; the peak seen.
    pub fn finish(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}
