//! Dense bf16 linear layers, `out [n, out] = x [n, in] W[out, in]^T + b` (CPU twin:
//! `CpuLinear::forward`, reached through `CpuBackend::linear`).
//!
//! Dispatch by batch size:
//! - `n <= GEMV_MAX_TOKENS` (8, decode) and `in % 8 == 0`: `qilin_gemv_bf16`
//!   (kernels/gemv.cu), which streams W once for all n tokens, bias fused;
//! - otherwise (prefill, or an input width the 16-byte kernel cannot take): cuBLAS
//!   `cublasGemmEx` (bf16 in and out, f32 compute); with a bias, f32 out into scratch
//!   and `qilin_bias_round_bf16` adds the bias, so every path rounds once, after the
//!   bias add. The GEMV has no scalar fallback: widths that are not a multiple of 8 take
//!   cuBLAS at every n.
//!
//! Entry points for tests and benchmarks (inherent methods of `CudaBackend`, so that
//! code outside this module can call them): `linear_into` (the dispatch above, into a
//! caller's output, e.g. one poisoned with NaN), `linear_gemv_into` and
//! `linear_cublas_into` (one path regardless of n), `bench_linear` (seconds per call).

use std::ffi::c_void;
use std::mem::size_of;

use cudarc::cublas::result as cublas_result;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasMath_t, cublasOperation_t, cublasSetMathMode,
    cudaDataType_t,
};
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{
    CudaSlice, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use half::bf16;

use super::device::{check, Device};
use super::tensor::{CudaLinear, CudaTensor};
use super::CudaBackend;
use crate::backend::abi::{
    bias_blocks, gemv_geometry, QilinBiasParams, QilinGemvParams, GEMV_MAX_TOKENS,
    QILIN_BIAS_THREADS, VEC_ELEMS,
};
use crate::backend::ptx;

/// `x [n, in]` -> `[n, out]` = x W^T + b.
pub fn linear(dev: &Device, x: &CudaTensor, w: &CudaLinear) -> CudaTensor {
    let mut out = uninit_output(dev, x.rows, w.out_features);
    linear_into(dev, x, w, &mut out);
    out
}

/// A `[rows, cols]` tensor whose contents are not initialised: no memset, which would
/// cost a launch per linear layer on the decode path.
fn uninit_output(dev: &Device, rows: usize, cols: usize) -> CudaTensor {
    let len = rows.checked_mul(cols).expect("linear output size overflows usize");
    // SAFETY: device memory, never read by the host before linear_into's launches write
    // every element of it (GEMV: one store per (token, channel); cuBLAS: beta = 0 makes
    // C write-only, and with a bias the broadcast writes all of C first). The one-element
    // buffer of an empty output is never read.
    let data = check(unsafe { dev.stream.alloc::<bf16>(len.max(1)) }, "allocating a linear output");
    CudaTensor { data, rows, cols }
}

/// Programming errors, not user input: shapes that disagree or buffers too short.
fn check_shapes(x: &CudaTensor, w: &CudaLinear, out: &CudaTensor) {
    let (n, k, m) = (x.rows, w.in_features, w.out_features);
    assert!(k > 0, "linear layer with zero inputs");
    assert_eq!(x.cols, k, "linear: x is [{n}, {}] but the weight is [{m}, {k}]", x.cols);
    assert_eq!(
        (out.rows, out.cols),
        (n, m),
        "linear: output is [{}, {}], x [{n}, {k}] W^T needs [{n}, {m}]",
        out.rows,
        out.cols
    );
    let need = |rows: usize, cols: usize| rows.checked_mul(cols).expect("size overflows usize");
    assert!(w.weight.len() >= need(m, k), "linear: weight buffer shorter than [{m}, {k}]");
    if let Some(bias) = &w.bias {
        assert!(bias.len() >= m, "linear: bias buffer shorter than {m}");
    }
    assert!(x.data.len() >= need(n, k), "linear: x buffer shorter than [{n}, {k}]");
    assert!(out.data.len() >= need(n, m), "linear: output buffer shorter than [{n}, {m}]");
}

/// `out = x W^T + b`, by the GEMV kernel for decode-sized batches, else cuBLAS.
pub fn linear_into(dev: &Device, x: &CudaTensor, w: &CudaLinear, out: &mut CudaTensor) {
    check_shapes(x, w, out);
    if x.rows == 0 || w.out_features == 0 {
        return;
    }
    if gemv_geometry(x.rows, w.in_features, w.out_features).is_some() {
        gemv_into(dev, x, w, out);
    } else {
        cublas_into(dev, x, w, out);
    }
}

/// qilin_gemv_bf16; panics when the kernel cannot take the shape (n outside
/// 1..=GEMV_MAX_TOKENS, `in` not a multiple of 8).
pub fn gemv_into(dev: &Device, x: &CudaTensor, w: &CudaLinear, out: &mut CudaTensor) {
    check_shapes(x, w, out);
    let (n, k, m) = (x.rows, w.in_features, w.out_features);
    let (grid, threads) = gemv_geometry(n, k, m).unwrap_or_else(|| {
        panic!(
            "qilin_gemv_bf16 cannot take x [{n}, {k}] W [{m}, {k}]^T: it needs 1 <= n <= \
             {GEMV_MAX_TOKENS} and in a non-zero multiple of {VEC_ELEMS}"
        )
    });
    // gemv_geometry checked that every dimension fits u32.
    let params =
        QilinGemvParams { n_tokens: n as u32, in_features: k as u32, out_features: m as u32 };
    let cfg =
        LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let null: u64 = 0;
    let mut launch = dev.stream.launch_builder(dev.function(ptx::GEMV_BF16));
    launch.arg(&params).arg(&mut out.data).arg(&x.data).arg(&w.weight);
    match &w.bias {
        Some(bias) => launch.arg(bias),
        None => launch.arg(&null),
    };
    // SAFETY: argument order and types follow qilin_gemv_bf16. check_shapes showed out
    // holds n * m values, x n * k, weight m * k, bias (or null) m; out is a separate
    // allocation from the inputs (&mut). Every buffer is a whole cudarc allocation
    // (>= 256-byte aligned) and k % 8 == 0, so every row x and W starts 16-byte aligned.
    check(unsafe { launch.launch(cfg) }, "launching qilin_gemv_bf16");
}

/// cuBLAS, any n and width (the prefill path and the fallback for widths the GEMV
/// kernel cannot take).
pub fn cublas_into(dev: &Device, x: &CudaTensor, w: &CudaLinear, out: &mut CudaTensor) {
    check_shapes(x, w, out);
    let (n, k, m) = (x.rows, w.in_features, w.out_features);
    if n == 0 || m == 0 {
        return;
    }
    let int = |v: usize, what: &str| {
        i32::try_from(v).unwrap_or_else(|_| panic!("linear: {what} = {v} exceeds cuBLAS's int"))
    };
    let (k_i, m_i) = (int(k, "in_features"), int(m, "out_features"));
    // cuBLAS may otherwise reduce split-K partial sums in the output type (bf16), which
    // would break the tolerance the parity test argues; keep every reduction in f32.
    // A handle setting, not stream work: cheap, and safe under CUDA-graph capture.
    // SAFETY: the handle is alive for as long as dev.blas.
    let mode = unsafe {
        cublasSetMathMode(
            *dev.blas.handle(),
            cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION,
        )
    };
    mode.result().unwrap_or_else(|e| panic!("cuBLAS refused its math mode: {e}"));

    // cuBLAS is column-major. Read as column-major, our row-major buffers are:
    //   W   [m, k] row-major = W^T   as a k x m column-major matrix, leading dim k;
    //   x   [n, k] row-major = x^T   as a k x n column-major matrix, leading dim k;
    //   out [n, m] row-major = out^T as an m x n column-major matrix, leading dim m.
    // out = x W^T is out^T = W x^T, i.e. C (m x n) = op(A) op(B) with
    //   A = the W buffer, transa = T: op(A) = (W^T)^T = W, m x k, lda = k;
    //   B = the x buffer, transb = N: op(B) = x^T, k x n,        ldb = k;
    //   C = the out buffer:                          m x n,      ldc = m.
    // ("TN", what PyTorch's nn.Linear runs.) C = op(A) op(B) in f32; beta = 0, so C is
    // write-only.
    let Some(bias) = &w.bias else {
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: m_i,
            n: int(n, "tokens"),
            k: k_i,
            alpha: bf16::ONE,
            lda: k_i,
            ldb: k_i,
            beta: bf16::ZERO,
            ldc: m_i,
        };
        // SAFETY: with the dimensions above cuBLAS reads m * k values of weight, n * k of
        // x and writes n * m of out; check_shapes showed every buffer holds at least
        // that, and out is a separate allocation from weight and x (&mut).
        unsafe { dev.blas.gemm(cfg, &w.weight, &x.data, &mut out.data) }
            .unwrap_or_else(|e| panic!("cuBLAS GEMM x [{n}, {k}] W [{m}, {k}]^T failed: {e}"));
        return;
    };
    // With a bias, C is f32 scratch and qilin_bias_round_bf16 adds the bias before the
    // one rounding to bf16. (Bias broadcast into a bf16 C with beta = 1 rounded x W^T
    // first on an H200, and so did cuBLASLt's BIAS epilogue for some shapes.) Row chunks
    // keep the scratch at BIAS_SCRATCH_MAX_VALUES (64 MiB) for any prefill size.
    assert!(bias.len() >= m, "linear: bias buffer shorter than {m}");
    let chunk_rows = (BIAS_SCRATCH_MAX_VALUES / m).clamp(1, n);
    let mut scratch = dev.scratch_f32(chunk_rows * m);
    let (alpha, beta) = (1.0f32, 0.0f32);
    let (w_ptr, _w_sync) = w.weight.device_ptr(&dev.stream);
    let (x_ptr, _x_sync) = x.data.device_ptr(&dev.stream);
    for first in (0..n).step_by(chunk_rows) {
        let rows = chunk_rows.min(n - first);
        let x_rows = x_ptr + (first * k * size_of::<bf16>()) as u64;
        let (acc_ptr, acc_sync) = scratch.device_ptr_mut(&dev.stream);
        // SAFETY: as above, for rows [first, first + rows) of x into the scratch, which
        // holds chunk_rows * m >= rows * m f32 values; cuBLAS's types are bf16 A and B,
        // f32 C, f32 compute and f32 alpha/beta, a combination cublasGemmEx supports.
        unsafe {
            cublas_result::gemm_ex(
                *dev.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m_i,
                int(rows, "tokens"),
                k_i,
                &alpha as *const f32 as *const c_void,
                w_ptr as *const c_void,
                cudaDataType_t::CUDA_R_16BF,
                k_i,
                x_rows as *const c_void,
                cudaDataType_t::CUDA_R_16BF,
                k_i,
                &beta as *const f32 as *const c_void,
                acc_ptr as *mut c_void,
                cudaDataType_t::CUDA_R_32F,
                m_i,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .unwrap_or_else(|e| panic!("cuBLAS GEMM x [{rows}, {k}] W [{m}, {k}]^T failed: {e}"));
        drop(acc_sync);
        let mut out_rows = out.data.slice_mut(first * m..(first + rows) * m);
        bias_round(dev, &scratch, bias, &mut out_rows, rows, m);
    }
}

/// Largest f32 scratch (values) of the biased cuBLAS path: 64 MiB.
const BIAS_SCRATCH_MAX_VALUES: usize = 16 << 20;

/// `out [rows, m] = bf16(acc [rows, m] + bias [m])`.
fn bias_round(
    dev: &Device,
    acc: &CudaSlice<f32>,
    bias: &CudaSlice<bf16>,
    out: &mut CudaViewMut<'_, bf16>,
    rows: usize,
    m: usize,
) {
    let params = QilinBiasParams {
        n_tokens: u32::try_from(rows).expect("tokens fit u32"),
        out_features: u32::try_from(m).expect("out_features fits u32"),
    };
    let cfg = LaunchConfig {
        grid_dim: (bias_blocks(rows * m), 1, 1),
        block_dim: (QILIN_BIAS_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.stream.launch_builder(dev.function(ptx::BIAS_ROUND_BF16));
    launch.arg(&params).arg(out).arg(acc).arg(bias);
    // SAFETY: argument order and types follow qilin_bias_round_bf16; out holds rows * m
    // values (a view of exactly that), acc at least rows * m (the scratch), bias m
    // (asserted by the caller); the grid-stride loop is correct for any grid.
    check(unsafe { launch.launch(cfg) }, "launching qilin_bias_round_bf16");
}

/// Entry points for parity tests and benchmarks (`tests/gpu_linear.rs`, `qilin bench`).
impl CudaBackend {
    /// `out = x W^T + b` into a caller-provided `[n, out]` tensor, dispatched as
    /// `Backend::linear` does (GEMV for n <= 8, else cuBLAS).
    pub fn linear_into(&self, x: &CudaTensor, w: &CudaLinear, out: &mut CudaTensor) {
        linear_into(&self.dev, x, w, out)
    }

    /// The GEMV kernel whatever the dispatch would pick; panics for n > 8 or an input
    /// width that is not a multiple of 8.
    pub fn linear_gemv_into(&self, x: &CudaTensor, w: &CudaLinear, out: &mut CudaTensor) {
        gemv_into(&self.dev, x, w, out)
    }

    /// cuBLAS whatever the dispatch would pick.
    pub fn linear_cublas_into(&self, x: &CudaTensor, w: &CudaLinear, out: &mut CudaTensor) {
        cublas_into(&self.dev, x, w, out)
    }

    /// Mean seconds per call of a `[n, in] x [out, in]^T (+ bias)` linear layer on
    /// synthetic weights, through the dispatch (`force_cublas == false`) or cuBLAS, and
    /// the path that ran (`"gemv"` or `"cublas"`). Weights are rotated over enough copies
    /// (>= 256 MiB in all, at most 1024 copies) that each call streams its W from HBM, not
    /// L2, as in a real decode step where every layer has its own weights. Each call moves
    /// at least `2 * (out*in + n*in + n*out)` bytes (+ `2*out` for the bias, and
    /// `8 * n * out` more on the cuBLAS path with a bias: f32 out, read back) and does `2 * n * in * out` FLOPs:
    /// divide by the time for GB/s or FLOP/s.
    pub fn bench_linear(
        &self,
        n: usize,
        in_features: usize,
        out_features: usize,
        bias: bool,
        force_cublas: bool,
        iters: usize,
    ) -> (f64, &'static str) {
        let dev = &self.dev;
        assert!(n > 0 && in_features > 0 && out_features > 0 && iters > 0, "empty benchmark");
        let weight_len = out_features * in_features;
        let copies = ((256usize << 20).div_ceil(2 * weight_len)).clamp(1, 1024);
        // A fixed pattern of small values; W's contents do not change the timing.
        let host: Vec<bf16> = (0..weight_len)
            .map(|i| bf16::from_f32(((i * 7919 % 2003) as f32 - 1001.0) * 5e-5))
            .collect();
        let bias_host: Vec<bf16> =
            (0..out_features).map(|i| bf16::from_f32(i as f32 * 1e-4)).collect();
        let layers: Vec<CudaLinear> = (0..copies)
            .map(|_| CudaLinear {
                weight: dev.upload(&host),
                bias: bias.then(|| dev.upload(&bias_host)),
                out_features,
                in_features,
            })
            .collect();
        drop(host);
        let x_host: Vec<f32> =
            (0..n * in_features).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
        let x = self.tensor_from_host(&x_host, n, in_features);
        let mut out = uninit_output(dev, n, out_features);
        let run = |w: &CudaLinear, out: &mut CudaTensor| {
            if force_cublas {
                cublas_into(dev, &x, w, out)
            } else {
                linear_into(dev, &x, w, out)
            }
        };
        // Warm-up: module JIT, cuBLAS heuristics, every copy touched once.
        for w in &layers {
            run(w, &mut out);
        }
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let start = check(dev.stream.record_event(timing), "recording an event");
        for i in 0..iters {
            run(&layers[i % copies], &mut out);
        }
        let end = check(dev.stream.record_event(timing), "recording an event");
        let ms = check(start.elapsed_ms(&end), "timing the linear benchmark");
        let gemv = !force_cublas && gemv_geometry(n, in_features, out_features).is_some();
        (f64::from(ms) * 1e-3 / iters as f64, if gemv { "gemv" } else { "cublas" })
    }
}
