//! tools/gpu-check's host-memory scheduler (tools/gpu_check_memory.py), which decides what
//! the GPU machine's racecheck step starts and stops, checked here with real processes
//! holding real memory: a run on a lent GPU is too scarce to find its bugs there.

use std::process::Command;

#[test]
fn gpu_check_memory_scheduler_passes_its_tests() {
    let tools = concat!(env!("CARGO_MANIFEST_DIR"), "/tools");
    let out = Command::new("python3")
        .args(["-m", "unittest", "-v", "gpu_check_memory_test"])
        .current_dir(tools)
        .output()
        .expect("python3 runs (tools/setup installs it)");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tools/gpu_check_memory_test.py failed:\n{log}");
    // A skipped memory test would pass without checking anything: CI has the memory.
    assert!(!log.contains("skipped"), "a scheduler test was skipped:\n{log}");
}
