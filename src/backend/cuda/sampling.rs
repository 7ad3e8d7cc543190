//! Sampling on the device: greedy argmax of each logits row (kernels/sampling.cu,
//! `qilin_argmax_bf16`; CPU twin `backend::cpu::argmax_row` through
//! `CpuBackend::argmax_rows`). The engine uses it when every sequence of a step samples
//! greedily without logprobs or penalties, so only one u32 per sequence crosses to the
//! host instead of `[n, vocab]` logits.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::device::{check, Device};
use super::tensor::CudaTensor;
use crate::backend::abi::{QilinArgmaxParams, QILIN_ARGMAX_THREADS};
use crate::backend::ptx;

/// `ids [n]`: the greedy choice of each row of `logits [n, vocab]`.
pub fn argmax_rows(dev: &Device, logits: &CudaTensor) -> Vec<u32> {
    let (n, vocab) = (logits.rows, logits.cols);
    if n == 0 {
        return Vec::new();
    }
    assert!(logits.data.len() >= n * vocab, "argmax: logits buffer shorter than [{n}, {vocab}]");
    let params = QilinArgmaxParams {
        rows: u32::try_from(n).expect("argmax: rows fit u32"),
        cols: u32::try_from(vocab).expect("argmax: vocab fits u32"),
    };
    let mut ids = dev.alloc_output::<u32>(n); // [n]
    let cfg = LaunchConfig {
        grid_dim: (params.rows, 1, 1),
        block_dim: (QILIN_ARGMAX_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.stream.launch_builder(dev.function(ptx::ARGMAX_BF16));
    launch.arg(&params).arg(&mut ids).arg(&logits.data);
    // SAFETY: argument order and types follow qilin_argmax_bf16; ids holds n u32, logits
    // n * vocab bf16 (asserted above); one block per row writes that row's id.
    check(unsafe { launch.launch(cfg) }, "launching qilin_argmax_bf16");
    dev.download(&ids, n)
}
