//! The seeded fault suite over a fixed set of seeds: every run exact, or the
//! fault it could not recover from reported as such, and the server then
//! serving another app exactly. A failure names its seed; reproduce it with
//! `shuffle-chaos --seed S --verbose`.

use std::process::Command;

/// Seeds CI runs: each run starts its own daemon, so this is about a minute.
const SEEDS: &str = "0..32";

#[test]
fn the_fault_suite_passes_on_a_fixed_set_of_seeds() {
    let out = Command::new(env!("CARGO_BIN_EXE_shuffle-chaos"))
        .args(["--seeds", SEEDS])
        .env("SHUFFLE_SERVER_BIN", shuffle_tests::daemon::server_binary())
        .output()
        .expect("run shuffle-chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("32 runs:"), "{stdout}");
    assert!(stdout.contains("records lost 0, duplicated 0"), "{stdout}");
}
