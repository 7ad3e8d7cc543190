//! Whether the embedded PTX exists, for the suites that read it (tests/ptx_kernels.rs,
//! tests/pdl_ptx.rs), included by each with `#[path = "common/ptx.rs"] mod ptx_common;`.

use qilin::backend::ptx;

/// True when build.rs embedded PTX. In a CPU-only build (no nvcc) the caller's test says
/// so and passes, unless `QILIN_REQUIRE_PTX=1` (CI sets it) makes that a failure.
pub fn ptx_available() -> bool {
    if ptx::PTX_AVAILABLE {
        return true;
    }
    assert!(
        std::env::var("QILIN_REQUIRE_PTX").as_deref() != Ok("1"),
        "QILIN_REQUIRE_PTX=1 but this is a CPU-only build: build.rs found no nvcc (run \
         tools/setup)"
    );
    eprintln!("skipped: CPU-only build, no PTX embedded (run tools/setup for nvcc)");
    false
}
