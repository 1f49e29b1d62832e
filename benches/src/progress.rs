//! Progress on stderr for long runs; indicatif hides it when stderr is not a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar over `runs` runs (a spinner when `runs` is 0), labelled with the workload and mode.
pub fn spinner(workload: &str, mode: &str, runs: u32) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(u64::from(runs)), ProgressDrawTarget::stderr());
    let template = if runs > 0 {
        "{spinner} {prefix} [{elapsed_precise}] run {pos}/{len} {msg}"
    } else {
        "{spinner} {prefix} [{elapsed_precise}] {msg}"
    };
    bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner()));
    bar.set_prefix(format!("{workload} ({mode})"));
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}
