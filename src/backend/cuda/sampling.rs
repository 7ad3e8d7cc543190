//! Sampling on the device: greedy argmax of each logits row (kernels/sampling.cu,
//! `qilin_argmax_bf16`; CPU twin `backend::cpu::argmax_row` through
//! `CpuBackend::argmax_rows`) and temperature / top-k / top-p / min-p sampling with a
//! uniform drawn on the host (`qilin_sample_bf16`; CPU twin `CpuBackend::sample_rows`,
//! i.e. `engine::sampler::sample_row`). The engine uses them when every sequence of a step
//! needs nothing but its token (no logprobs, no penalties), so only one u32 per sequence
//! crosses to the host instead of `[n, vocab]` logits. With penalties (the default since
//! the H200 run at b908988; `FastPaths::device_penalties`, QILIN_CUDA_DEVICE_PENALTIES=0 to
//! send them to the host sampler), `qilin_apply_penalties_bf16` (kernels/penalties.cu; CPU
//! twin `backend::cpu::penalize_row_bf16`) first penalises each row's listed tokens in
//! place, rounding each to bf16, on the same stream after the step (never in a graph).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::{check, Device};
use super::tensor::CudaTensor;
use crate::backend::abi::{
    QilinArgmaxParams, QilinPenaltyParams, QilinPenaltyRow, QilinPenaltyToken, QilinSampleParams,
    QilinSampleRow, QILIN_ARGMAX_THREADS, QILIN_PENALTY_THREADS, QILIN_SAMPLE_THREADS,
};
use crate::backend::{ptx, PenaltyBatch, RowSampling};
use crate::engine::sampler::inv_temperature;

// SAFETY: #[repr(C)] plain old data from kernels/abi.h (bindgen), passed by value.
unsafe impl cudarc::driver::DeviceRepr for QilinSampleParams {}
// SAFETY: #[repr(C)] plain old data from kernels/abi.h (bindgen), copied to the device as
// an array the kernel reads.
unsafe impl cudarc::driver::DeviceRepr for QilinSampleRow {}
// SAFETY: as above (by value).
unsafe impl cudarc::driver::DeviceRepr for QilinPenaltyParams {}
// SAFETY: as above (arrays the kernel reads).
unsafe impl cudarc::driver::DeviceRepr for QilinPenaltyRow {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for QilinPenaltyToken {}

/// `ids [n]`: the greedy choice of each row of `logits [n, vocab]`.
pub fn argmax_rows(dev: &Device, logits: &CudaTensor) -> Vec<u32> {
    let n = logits.rows;
    if n == 0 {
        return Vec::new();
    }
    let ids = argmax_rows_on_device(dev, logits);
    dev.download(&ids, n)
}

/// `ids [n]` on the device, queued on the stream and not waited for: the benchmark's L2
/// flush (a read of a large buffer) must not stop the host while it runs, or the timed
/// op after it would be measured from a GPU idling until the host's launch arrives.
pub fn argmax_rows_on_device(dev: &Device, logits: &CudaTensor) -> CudaSlice<u32> {
    let (n, vocab) = (logits.rows, logits.cols);
    assert!(n > 0, "argmax: no rows (an empty grid is not a launch)");
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
    ids
}

/// The kernel's form of a row: 1/T computed as the host sampler does (0 for greedy).
fn device_row(row: &RowSampling) -> QilinSampleRow {
    QilinSampleRow {
        u: row.u,
        inv_t: inv_temperature(row.temperature).unwrap_or(0.0),
        top_k: row.top_k,
        top_p: row.top_p,
        min_p: row.min_p,
    }
}

/// `ids [n]`: the sampled token of each row of `logits [n, vocab]` (`Backend::sample_rows`).
pub fn sample_rows(dev: &Device, logits: &CudaTensor, rows: &[RowSampling]) -> Vec<u32> {
    let (n, vocab) = (logits.rows, logits.cols);
    assert_eq!(rows.len(), n, "sample_rows: one RowSampling per logits row");
    if n == 0 {
        return Vec::new();
    }
    assert!(logits.data.len() >= n * vocab, "sample: logits buffer shorter than [{n}, {vocab}]");
    let params = QilinSampleParams {
        rows: u32::try_from(n).expect("sample: rows fit u32"),
        cols: u32::try_from(vocab).expect("sample: vocab fits u32"),
    };
    let meta: Vec<QilinSampleRow> = rows.iter().map(device_row).collect();
    let meta = dev.upload(&meta); // [n]
    let mut ids = dev.alloc_output::<u32>(n); // [n]
    let cfg = LaunchConfig {
        grid_dim: (params.rows, 1, 1),
        block_dim: (QILIN_SAMPLE_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.stream.launch_builder(dev.function(ptx::SAMPLE_BF16));
    launch.arg(&params).arg(&mut ids).arg(&meta).arg(&logits.data);
    // SAFETY: argument order and types follow qilin_sample_bf16; ids and meta hold n
    // entries, logits n * vocab bf16 (asserted above); one block per row writes that row's id.
    check(unsafe { launch.launch(cfg) }, "launching qilin_sample_bf16");
    dev.download(&ids, n)
}

/// Applies `penalties` (one row per logits row) to `logits [n, vocab]` in place
/// (qilin_apply_penalties_bf16; twin: `backend::penalize_rows_host`). Costs one upload of
/// 20 bytes per row and 8 per entry, and one launch of one thread per entry.
pub fn apply_penalties(dev: &Device, logits: &mut CudaTensor, penalties: &PenaltyBatch) {
    let (n, vocab) = (logits.rows, logits.cols);
    assert_eq!(penalties.rows.len(), n, "apply_penalties: one RowPenalties per logits row");
    assert!(logits.data.len() >= n * vocab, "penalties: logits buffer shorter than [{n}, {vocab}]");
    let fits = |x: usize| u32::try_from(x).expect("penalties: entry offsets fit u32");
    let meta: Vec<QilinPenaltyRow> = (penalties.rows.iter())
        .map(|r| QilinPenaltyRow {
            offset: fits(r.tokens.start),
            len: fits(r.tokens.len()),
            repetition: r.repetition,
            presence: r.presence,
            frequency: r.frequency,
        })
        .collect();
    let longest = meta.iter().map(|m| m.len).max().unwrap_or(0);
    if longest == 0 {
        return;
    }
    let end = penalties.rows.iter().map(|r| r.tokens.end).max().unwrap_or(0);
    assert!(end <= penalties.tokens.len(), "penalties: a row's entries past the tokens array");
    let params = QilinPenaltyParams {
        rows: u32::try_from(n).expect("penalties: rows fit u32"),
        cols: u32::try_from(vocab).expect("penalties: vocab fits u32"),
    };
    let meta = dev.upload(&meta); // [n]
    let tokens = dev.upload(&penalties.tokens); // [sum of the rows' entries]
    let cfg = LaunchConfig {
        grid_dim: (longest.div_ceil(QILIN_PENALTY_THREADS), params.rows, 1),
        block_dim: (QILIN_PENALTY_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.stream.launch_builder(dev.function(ptx::APPLY_PENALTIES_BF16));
    launch.arg(&params).arg(&meta).arg(&tokens).arg(&mut logits.data);
    // SAFETY: argument order and types follow qilin_apply_penalties_bf16; meta holds n rows
    // whose entries lie in tokens (asserted above), logits n * vocab bf16; the entries of a
    // row are distinct ids (PenaltyBatch's contract), so no two threads write one logit.
    check(unsafe { launch.launch(cfg) }, "launching qilin_apply_penalties_bf16");
}
