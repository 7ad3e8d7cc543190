//! Launcher of kernels/norm.cu: fused residual add + RMSNorm (CPU twin:
//! `backend::cpu::add_rms_norm_rows`).

use cudarc::driver::LaunchConfig;

use super::device::{check, Device};
use super::tensor::{CudaTensor, CudaVector};
use crate::backend::abi::{rms_norm_block_threads, QilinRmsNormParams};
use crate::backend::ptx;

/// `residual += x` (when given), then returns `rmsnorm(residual) * weight`.
pub fn add_rms_norm(
    dev: &Device,
    residual: &mut CudaTensor, // [n, hidden]
    x: Option<&CudaTensor>,    // [n, hidden]
    weight: &CudaVector,       // [hidden]
    eps: f32,
) -> CudaTensor {
    let (n, hidden) = (residual.rows, residual.cols);
    assert_eq!(weight.len, hidden, "norm weight does not match the hidden size");
    if let Some(x) = x {
        assert_eq!((x.rows, x.cols), (n, hidden), "residual and x shapes differ");
    }
    let mut out = CudaTensor { data: dev.alloc_output(n * hidden), rows: n, cols: hidden };
    if n == 0 {
        return out;
    }
    let threads = rms_norm_block_threads(hidden)
        .unwrap_or_else(|| panic!("hidden size {hidden} is not supported by kernels/norm.cu"));
    let params = QilinRmsNormParams { n_tokens: n as u32, hidden: hidden as u32, eps };
    let cfg = LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let Some(x) = x else {
        // Nothing to add: the plain kernel only reads the residual.
        let mut launch = dev.launch_builder(ptx::RMS_NORM_BF16);
        launch.arg(&params).arg(&mut out.data).arg(&residual.data).arg(&weight.data);
        // SAFETY: argument order and types follow qilin_rms_norm_bf16; out and residual
        // hold n * hidden bf16 values, weight hidden.
        check(unsafe { launch.launch(cfg) }, "launching qilin_rms_norm_bf16");
        return out;
    };
    let mut launch = dev.launch_builder(ptx::FUSED_ADD_RMS_NORM_BF16);
    launch.arg(&params).arg(&mut out.data).arg(&mut residual.data).arg(&x.data).arg(&weight.data);
    // SAFETY: argument order and types follow qilin_fused_add_rms_norm_bf16; out, residual
    // and x hold n * hidden bf16 values, weight hidden.
    check(unsafe { launch.launch(cfg) }, "launching qilin_fused_add_rms_norm_bf16");
    out
}
