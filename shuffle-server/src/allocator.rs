//! How long freed memory stays with the process: mimalloc's purge delay.
//!
//! Block buffers come and go at the rate data moves. Memory the allocator
//! hands back to the OS must be faulted in and zeroed again by the kernel
//! when it is next used, and on a virtual machine that returns guest memory
//! to its host that costs far more than the copy that fills it: W1 through
//! three workers spent a third to a half of its CPU in the kernel's `clear_page` with
//! mimalloc's default delay. Keeping freed memory for a while costs nothing
//! while the service is busy and gives it back once it is idle.
//!
//! This sets an option of mimalloc, the daemon's and the harness's global
//! allocator; in a process whose allocator is another it changes nothing.

use std::time::Duration;

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

/// `mi_option_purge_delay` (milliseconds) in the `mi_option_e` enum of both
/// mimalloc 2 and 3; the `libmimalloc-sys` bindings leave that entry out.
const MI_OPTION_PURGE_DELAY: mi_option_t = 15;

/// Keeps memory the process freed for `delay` before mimalloc returns it to
/// the OS (arenas keep it for a multiple of that).
pub fn set_memory_return_delay(delay: Duration) {
    let millis = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
    // SAFETY: setting a mimalloc option is thread-safe and valid at any time.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, millis as _) }
}

/// The delay in force, as mimalloc reads it.
pub fn memory_return_delay() -> Duration {
    // SAFETY: reading a mimalloc option is thread-safe and valid at any time.
    let millis = unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) };
    Duration::from_millis(u64::try_from(millis).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_is_mimallocs_purge_delay() {
        // mimalloc 3's default purge delay is 1000 ms (mimalloc 2's is 10 ms):
        // reading entry 15 before setting it proves the entry is that option.
        let default = memory_return_delay();
        assert!(default == Duration::from_millis(1000) || default == Duration::from_millis(10), "{default:?}");
        set_memory_return_delay(Duration::from_secs(30));
        assert_eq!(memory_return_delay(), Duration::from_secs(30));
        set_memory_return_delay(default);
    }
}
