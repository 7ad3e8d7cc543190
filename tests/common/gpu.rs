//! Helpers of the GPU parity suite (tests/gpu_*.rs), included by each with
//! `#[path = "common/gpu.rs"] mod gpu_common;`: whether the suite is on, the device, the
//! seed of a run, and outputs poisoned before a launch.
#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use half::bf16;
use qilin::backend::cuda::{CudaBackend, CudaTensor};

/// The GPU tests run only with QILIN_GPU_TESTS=1, and then a missing GPU is a failure.
pub fn gpu_tests_enabled() -> bool {
    std::env::var("QILIN_GPU_TESTS").as_deref() == Ok("1")
}

/// True (after saying so) when the GPU tests are off: the caller returns.
pub fn skip_without_gpu_tests() -> bool {
    let skip = !gpu_tests_enabled();
    if skip {
        eprintln!("skipped: GPU tests run only with QILIN_GPU_TESTS=1");
    }
    skip
}

/// Device 0; with QILIN_GPU_TESTS=1 its absence fails the test.
pub fn open_gpu() -> CudaBackend {
    CudaBackend::new(0).unwrap_or_else(|e| panic!("QILIN_GPU_TESTS=1 but no usable GPU: {e}"))
}

/// A fresh seed per run, printed so that a failure can be replayed.
pub fn fresh_seed(test: &str) -> u64 {
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    eprintln!("{test}: seed {seed}");
    seed
}

/// A `[rows, cols]` device tensor of NaN: an output element no kernel writes fails the
/// comparison.
pub fn poisoned(gpu: &CudaBackend, rows: usize, cols: usize) -> CudaTensor {
    CudaTensor { data: gpu.dev.upload(&vec![bf16::NAN; (rows * cols).max(1)]), rows, cols }
}

/// Whether the linear suites run `n` tokens: all unless QILIN_GPU_TEST_MAX_TOKENS caps
/// them. tools/gpu-check sets 64 under racecheck, which instruments every shared-memory
/// access: the 513-token cases (cuBLAS and the tensor-core GEMM at prefill sizes) kept
/// gpu_linear and gpu_quant_linear from finishing in minutes (H200, 2026-11-26), while
/// every GEMV path and the chunked one (up to 64 tokens) stays covered.
pub fn runs_tokens(n: usize) -> bool {
    env_cap("QILIN_GPU_TEST_MAX_TOKENS").is_none_or(|cap| n <= cap)
}

/// The number the environment variable `name` holds, if it is set to one.
pub fn env_cap(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// `n`, or at most the cap `name` sets (and at least 1).
fn capped(n: usize, name: &str) -> usize {
    env_cap(name).map_or(n, |cap| n.min(cap.max(1)))
}

/// `rows` output features, or at most QILIN_GPU_TEST_MAX_ROWS where that is set:
/// tools/gpu-check sets 1024 under racecheck, where Qwen2.5-7B's gate_up (37888 rows) and
/// lm_head (152064) only repeat, block after block, the shared-memory pattern that the
/// kernel, K and the token count fix.
pub fn capped_rows(rows: usize) -> usize {
    capped(rows, "QILIN_GPU_TEST_MAX_ROWS")
}

/// `n` tokens, or at most QILIN_GPU_TEST_MAX_TOKENS where that is set (racecheck): for
/// a suite whose long case exists to grow a buffer past what the shorter cases needed,
/// which any token count above theirs still does.
pub fn capped_tokens(n: usize) -> usize {
    capped(n, "QILIN_GPU_TEST_MAX_TOKENS")
}

/// Rounds of random inputs a suite repeats its shapes for: `full`, or 1 under a capped
/// run (QILIN_GPU_TEST_MAX_TOKENS set: tools/gpu-check's racecheck, where coverage comes
/// from the code paths, not from more random rows).
pub fn rounds(full: usize) -> usize {
    if capped_run() {
        1
    } else {
        full
    }
}

/// Whether this is a capped run (QILIN_GPU_TEST_MAX_TOKENS set: tools/gpu-check's
/// racecheck), where a suite keeps one case per code path.
pub fn capped_run() -> bool {
    std::env::var_os("QILIN_GPU_TEST_MAX_TOKENS").is_some()
}

/// Whether a suite runs the launches that add no shared-memory access pattern of their
/// own (a repeat checked bit for bit against the first, a forced split count): yes unless
/// the run is capped (QILIN_GPU_TEST_MAX_TOKENS set: racecheck, which watches shared
/// memory only, where they add minutes and no coverage).
pub fn repeats_launches() -> bool {
    !capped_run()
}
