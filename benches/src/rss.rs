//! Peak resident set size of this process (Linux: `VmHWM` in
//! `/proc/self/status`), reset between workloads by writing `5` to
//! `/proc/self/clear_refs`.

/// Resets the peak to the current RSS; a no-op where the kernel does not allow it.
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The peak RSS in bytes since the last reset (0 if unknown).
pub fn peak() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
