//! tools/gpu-check's host-memory scheduler (tools/gpu_check_memory.py), which decides what
//! the GPU machine's racecheck step starts and stops, checked here with real processes
//! holding real memory: a run on a lent GPU is too scarce to find its bugs there. And its
//! `merge`, which combines the results of several such runs, checked on this repository's
//! own history.

use std::process::Command;

/// Runs `python3 -m unittest -v <module>` in tools/; panics with its log on a failure.
/// Returns the log.
fn tools_unittest(module: &str) -> String {
    let tools = concat!(env!("CARGO_MANIFEST_DIR"), "/tools");
    let out = Command::new("python3")
        .args(["-m", "unittest", "-v", module])
        .current_dir(tools)
        .output()
        .expect("python3 runs (tools/setup installs it)");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "tools/{module}.py failed:\n{log}");
    log
}

#[test]
fn gpu_check_memory_scheduler_passes_its_tests() {
    let log = tools_unittest("gpu_check_memory_test");
    // A skipped memory test would pass without checking anything: CI has the memory.
    assert!(!log.contains("skipped"), "a scheduler test was skipped:\n{log}");
}

#[test]
fn gpu_check_merge_passes_its_tests() {
    // Its history tests skip in a shallow clone, where git cannot compare the commits.
    tools_unittest("gpu_check_merge_test");
}
