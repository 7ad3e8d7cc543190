//! Linear layers, `out [n, out] = x [n, in] W[out, in]^T + b`, W bf16 or quantized (CPU
//! twin: `CpuLinear::forward`, reached through `CpuBackend::linear`).
//!
//! Dispatch by batch size:
//! - `n <= GEMV_MAX_TOKENS` (8, decode): `qilin_gemv_bf16` (kernels/gemv.cu) for a bf16
//!   W with `in % 8 == 0`, `qilin_qgemv_w{4,8}_bf16` (kernels/quant_linear.cu,
//!   launched from quant_linear.rs) for a quantized one; both stream W once for all n
//!   tokens, bias fused;
//! - otherwise (prefill, or an input width the 16-byte kernels cannot take): cuBLAS
//!   `cublasGemmEx` (bf16 in and out, f32 compute), a quantized W first dequantized to
//!   bf16 in chunks of rows; with a bias, f32 out into scratch and
//!   `qilin_bias_round_bf16` adds the bias, so every path rounds once, after the bias
//!   add.
//!
//! Entry points for tests and benchmarks (inherent methods of `CudaBackend`, so that
//! code outside this module can call them): `linear_into` (the dispatch above, into a
//! caller's output, e.g. one poisoned with NaN), `linear_gemv_into`,
//! `linear_gemv_fma_into`, `linear_gemv_mma_into` and `linear_cublas_into` (one path
//! regardless of n).

use std::ffi::c_void;
use std::mem::size_of;

use cudarc::cublas::result as cublas_result;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasMath_t, cublasOperation_t, cublasSetMathMode,
    cudaDataType_t,
};
use cudarc::driver::{CudaSlice, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;

use super::device::{check, Device};
use super::quant_gemm_mma::{qgemm_mma_into, qgemm_mma_takes};
use super::quant_linear::{
    dequant_chunk_rows, dequantize_rows, qgemm_into, qgemm_wins, qgemv_into, qgemv_mma_takes,
};
use super::tensor::{CudaLinear, CudaTensor, LinearWeight};
use super::CudaBackend;
use crate::backend::abi::{
    bias_blocks, gemv_geometry, gemv_mma_geometry, qgemv_geometry, QilinBiasParams,
    QilinGemvParams, GEMV_MAX_TOKENS, QILIN_BIAS_THREADS, VEC_ELEMS,
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
pub(super) fn check_shapes(x: &CudaTensor, w: &CudaLinear, out: &CudaTensor) {
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
    match &w.weight {
        LinearWeight::Bf16(weight) => {
            assert!(weight.len() >= need(m, k), "linear: weight buffer shorter than [{m}, {k}]")
        }
        LinearWeight::Quant(q) => {
            let (bits, group) = (q.format.bits as usize, q.format.group);
            assert!(
                q.levels.len() >= need(m, k * bits / 8) && q.scale_min.len() >= need(m, k / group * 2),
                "linear: quantized weight buffers shorter than [{m}, {k}] at {bits} bits, group {group}"
            );
        }
    }
    if let Some(bias) = &w.bias {
        assert!(bias.len() >= m, "linear: bias buffer shorter than {m}");
    }
    assert!(x.data.len() >= need(n, k), "linear: x buffer shorter than [{n}, {k}]");
    assert!(out.data.len() >= need(n, m), "linear: output buffer shorter than [{n}, {m}]");
}

/// `out = x W^T + b`, by the GEMV kernel for decode-sized batches, else cuBLAS (or the
/// quantized GEMMs where they win: `qgemm_mma_takes`, opt-in, and `qgemm_wins`).
pub fn linear_into(dev: &Device, x: &CudaTensor, w: &CudaLinear, out: &mut CudaTensor) {
    check_shapes(x, w, out);
    if x.rows == 0 || w.out_features == 0 {
        return;
    }
    if let (true, LinearWeight::Quant(q)) = (qgemm_mma_takes(dev, x.rows, w), &w.weight) {
        qgemm_mma_into(dev, x, w, q, out);
    } else if gemv_path(dev, x.rows, w).is_some() {
        gemv_into(dev, x, w, out);
    } else if let (true, LinearWeight::Quant(q)) = (qgemm_wins(dev, x.rows, w), &w.weight) {
        qgemm_into(dev, x, w, q, out, None);
    } else {
        cublas_into(dev, x, w, out);
    }
}

/// The GEMV kernel that takes `n` tokens through `w`, if one can.
fn gemv_path(dev: &Device, n: usize, w: &CudaLinear) -> Option<&'static str> {
    let (k, m) = (w.in_features, w.out_features);
    match &w.weight {
        LinearWeight::Bf16(_) if dev.paths.gemv_cublas && gemv_cublas_wins(n) => None,
        LinearWeight::Bf16(_) => gemv_geometry(n, k, m).map(|_| "gemv"),
        LinearWeight::Quant(_) if qgemv_mma_takes(dev, n, w) => Some("qgemv mma"),
        LinearWeight::Quant(q) => {
            qgemv_geometry(n, q.format.bits, k, m, q.format.group).map(|_| "qgemv")
        }
    }
}

/// qilin_gemv_bf16 for a bf16 W, qilin_qgemv_w{4,8}_bf16 for a quantized one; panics
/// when the kernel cannot take the shape (n outside 1..=GEMV_MAX_TOKENS, `in` not a
/// multiple of 8, or of 32 for quantized weights).
pub fn gemv_into(dev: &Device, x: &CudaTensor, w: &CudaLinear, out: &mut CudaTensor) {
    check_shapes(x, w, out);
    if let LinearWeight::Quant(q) = &w.weight {
        return qgemv_into(dev, x, w, q, out);
    }
    let mma = dev.paths.gemv_mma && gemv_mma_wins(x.rows, w.in_features, w.out_features);
    let kernel = if mma { ptx::GEMV_MMA_BF16 } else { ptx::GEMV_BF16 };
    launch_gemv(dev, kernel, x, w, out);
}

/// Fewest tokens for which the dispatch takes qilin_gemv_mma_bf16 over the FMA GEMV, on the
/// layers where it wins (`gemv_mma_wins`).
pub const GEMV_MMA_MIN_TOKENS: usize = 4;

/// Whether qilin_gemv_mma_bf16 beats the FMA GEMV at `n` tokens on a layer of this shape.
/// H200, `qilin bench kernels` at 1bf3ca5, µs at n = 4 and 8 (FMA / mma): qkv_proj
/// 26.2 / 24.3, 36.6 / 25.6; gate_up 89.5 / 80.4, 146 / 81.5; lm_head 311 / 260, 531 /
/// 262; but o_proj 19.4 / 22.9, 24.5 / 24.2 and down_proj 56.5 / 91.7, 82.7 / 92.4: the
/// mma kernel splits k over a block's warps, which leaves too few blocks when the layer
/// is narrower than it is deep. The whole-step cost at n = 2 (6.91 ms against ~5.4) keeps
/// the FMA GEMV below 4 tokens.
pub fn gemv_mma_wins(n: usize, in_features: usize, out_features: usize) -> bool {
    n >= GEMV_MMA_MIN_TOKENS && out_features > in_features
}

/// Whether cuBLAS beats both bf16 GEMVs at `n` tokens (the dispatch asks unless
/// QILIN_CUDA_GEMV_CUBLAS=0). H200, `qilin bench kernels` at 771cd47, us at n = 4 and 8
/// (best GEMV / cuBLAS): qkv_proj 21.5 / 15.7, 21.9 / 16.1; o_proj 15.9 / 13.1, 20.1 /
/// 13.3; gate_up 78.9 / 73.5, 79.6 / 73.1; down_proj 54.8 / 39.2, 80.1 / 39.8; lm_head
/// 263.8 / 260.1, 265.4 / 261.3. The GEMVs' blocks each read the tokens' whole x row
/// through L1 and cannot split k; cuBLAS's small-n kernels do. Below 4 tokens the GEMV
/// keeps the layers (batch 1 reads the weights at 49-102% of copy bandwidth; n = 2 and
/// 3 were not measured against cuBLAS).
pub fn gemv_cublas_wins(n: usize) -> bool {
    n >= GEMV_MMA_MIN_TOKENS
}

/// qilin_gemv_mma_bf16 (tensor cores) for a bf16 W, whatever the dispatch would pick: for
/// its parity test and benchmark. Panics as `gemv_into`, and for a quantized W.
pub fn gemv_mma_into(dev: &Device, x: &CudaTensor, w: &CudaLinear, out: &mut CudaTensor) {
    check_shapes(x, w, out);
    assert!(matches!(w.weight, LinearWeight::Bf16(_)), "qilin_gemv_mma_bf16: a bf16 W only");
    launch_gemv(dev, ptx::GEMV_MMA_BF16, x, w, out);
}

/// qilin_gemv_bf16 or qilin_gemv_mma_bf16 (the same arguments) for a bf16 W.
fn launch_gemv(
    dev: &Device,
    kernel: ptx::Kernel,
    x: &CudaTensor,
    w: &CudaLinear,
    out: &mut CudaTensor,
) {
    let LinearWeight::Bf16(weight) = &w.weight else {
        panic!("{}: a quantized W goes to qgemv", kernel.entry)
    };
    let (n, k, m) = (x.rows, w.in_features, w.out_features);
    let geometry = if kernel == ptx::GEMV_MMA_BF16 { gemv_mma_geometry } else { gemv_geometry };
    let (grid, threads) = geometry(n, k, m).unwrap_or_else(|| {
        panic!(
            "{} cannot take x [{n}, {k}] W [{m}, {k}]^T: it needs 1 <= n <= \
             {GEMV_MAX_TOKENS} and in a non-zero multiple of {VEC_ELEMS}",
            kernel.entry
        )
    });
    // gemv_geometry checked that every dimension fits u32.
    let params =
        QilinGemvParams { n_tokens: n as u32, in_features: k as u32, out_features: m as u32 };
    let cfg =
        LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    let null: u64 = 0;
    let mut launch = dev.launch_builder(kernel);
    launch.arg(&params).arg(&mut out.data).arg(&x.data).arg(weight);
    match &w.bias {
        Some(bias) => launch.arg(bias),
        None => launch.arg(&null),
    };
    // SAFETY: argument order and types follow qilin_gemv_bf16 and qilin_gemv_mma_bf16
    // (the same). check_shapes showed out
    // holds n * m values, x n * k, weight m * k, bias (or null) m; out is a separate
    // allocation from the inputs (&mut). Every buffer is a whole cudarc allocation
    // (>= 256-byte aligned) and k % 8 == 0, so every row x and W starts 16-byte aligned.
    check(unsafe { launch.launch(cfg) }, kernel.entry);
}

/// cuBLAS, any n and width (the prefill path and the fallback for widths the GEMV
/// kernels cannot take). A quantized weight is dequantized to bf16 first, in chunks of
/// output rows through the device's bf16 scratch (quant_linear.rs).
pub fn cublas_into(dev: &Device, x: &CudaTensor, w: &CudaLinear, out: &mut CudaTensor) {
    check_shapes(x, w, out);
    let (n, k, m) = (x.rows, w.in_features, w.out_features);
    if n == 0 || m == 0 {
        return;
    }
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

    // With a bias, C is f32 scratch and qilin_bias_round_bf16 adds the bias before the
    // one rounding to bf16. (Bias broadcast into a bf16 C with beta = 1 rounded x W^T
    // first on an H200, and so did cuBLASLt's BIAS epilogue for some shapes.) Token
    // chunks keep that scratch at BIAS_SCRATCH_MAX_VALUES (64 MiB) for any prefill size.
    let token_chunk = match &w.bias {
        Some(_) => (BIAS_SCRATCH_MAX_VALUES / m).clamp(1, n),
        None => n,
    };
    let mut acc = w.bias.as_ref().map(|_| dev.scratch_f32(token_chunk * m));
    let (x_ptr, _x_sync) = x.data.device_ptr(&dev.stream);
    for first in (0..n).step_by(token_chunk) {
        let tokens = token_chunk.min(n - first);
        let x_rows = x_ptr + (first * k * size_of::<bf16>()) as u64;
        match (&mut acc, &w.bias) {
            (Some(acc), Some(bias)) => {
                let (acc_ptr, acc_sync) = acc.device_ptr_mut(&dev.stream);
                for_each_weight_chunk(dev, w, |w_ptr, row0, rows| {
                    let c = acc_ptr + (row0 * size_of::<f32>()) as u64;
                    // SAFETY: the scratch holds token_chunk * m >= tokens * m f32 values;
                    // columns row0..row0 + rows of each of its `tokens` rows (stride m).
                    unsafe {
                        gemm_tn(
                            dev,
                            w_ptr,
                            x_rows,
                            c,
                            cudaDataType_t::CUDA_R_32F,
                            rows,
                            tokens,
                            k,
                            m,
                        )
                    }
                });
                drop(acc_sync);
                let mut out_rows = out.data.slice_mut(first * m..(first + tokens) * m);
                bias_round(dev, acc, bias, &mut out_rows, tokens, m);
            }
            _ => {
                let (out_ptr, _out_sync) = out.data.device_ptr_mut(&dev.stream);
                let out_rows = out_ptr + (first * m * size_of::<bf16>()) as u64;
                for_each_weight_chunk(dev, w, |w_ptr, row0, rows| {
                    let c = out_rows + (row0 * size_of::<bf16>()) as u64;
                    // SAFETY: check_shapes showed out holds n * m values; this writes
                    // columns row0..row0 + rows of rows first..first + tokens (stride m).
                    unsafe {
                        gemm_tn(
                            dev,
                            w_ptr,
                            x_rows,
                            c,
                            cudaDataType_t::CUDA_R_16BF,
                            rows,
                            tokens,
                            k,
                            m,
                        )
                    }
                });
            }
        }
    }
}

/// Calls `gemm(w_ptr, row0, rows)` for chunks of W's output rows as bf16 `[rows, k]` on
/// the device: the weight itself (one chunk) or, for a quantized weight, chunks
/// dequantized into the bf16 scratch, each used before the next overwrites it (one
/// stream orders them).
fn for_each_weight_chunk(dev: &Device, w: &CudaLinear, mut gemm: impl FnMut(u64, usize, usize)) {
    match &w.weight {
        LinearWeight::Bf16(weight) => {
            let (w_ptr, _w_sync) = weight.device_ptr(&dev.stream);
            gemm(w_ptr, 0, w.out_features);
        }
        LinearWeight::Quant(q) => {
            let (k, m) = (w.in_features, w.out_features);
            let chunk = dequant_chunk_rows(k, m);
            let mut scratch = dev.scratch_bf16(chunk * k);
            for row0 in (0..m).step_by(chunk) {
                let rows = chunk.min(m - row0);
                dequantize_rows(dev, q, k, row0, rows, &mut scratch);
                let (s_ptr, _s_sync) = scratch.device_ptr(&dev.stream);
                gemm(s_ptr, row0, rows);
            }
        }
    }
}

/// C = x W^T for `rows` output channels by cuBLAS ("TN", what PyTorch's nn.Linear runs),
/// f32 compute, beta = 0 (C write-only). cuBLAS is column-major; read as column-major our
/// row-major buffers are:
///   W   [rows, k] row-major = W^T as a k x rows column-major matrix, leading dim k;
///   x   [n, k]    row-major = x^T as a k x n column-major matrix,    leading dim k;
///   C   [n, ldc]  row-major = an ldc x n column-major matrix; its first `rows` rows are
///                 written (out^T = W x^T), so `c` may point at column row0 of a wider
///                 output with ldc = its row length.
///
/// # Safety
/// `w` holds rows * k bf16, `x` n * k bf16, `c` (of `c_type`, bf16 or f32) reaches
/// (n - 1) * ldc + rows values and overlaps neither; all on `dev`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_tn(
    dev: &Device,
    w: u64,
    x: u64,
    c: u64,
    c_type: cudaDataType_t,
    rows: usize,
    n: usize,
    k: usize,
    ldc: usize,
) {
    let int = |v: usize, what: &str| {
        i32::try_from(v).unwrap_or_else(|_| panic!("linear: {what} = {v} exceeds cuBLAS's int"))
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: the caller's contract; bf16 A and B with bf16 or f32 C, f32 compute and
    // f32 alpha/beta is a combination cublasGemmEx supports.
    unsafe {
        cublas_result::gemm_ex(
            *dev.blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            int(rows, "out_features"),
            int(n, "tokens"),
            int(k, "in_features"),
            &alpha as *const f32 as *const c_void,
            w as *const c_void,
            cudaDataType_t::CUDA_R_16BF,
            int(k, "in_features"),
            x as *const c_void,
            cudaDataType_t::CUDA_R_16BF,
            int(k, "in_features"),
            &beta as *const f32 as *const c_void,
            c as *mut c_void,
            c_type,
            int(ldc, "out_features"),
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .unwrap_or_else(|e| panic!("cuBLAS GEMM x [{n}, {k}] W [{rows}, {k}]^T failed: {e}"));
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
    let mut launch = dev.launch_builder(ptx::BIAS_ROUND_BF16);
    launch.arg(&params).arg(out).arg(acc).arg(bias);
    // SAFETY: argument order and types follow qilin_bias_round_bf16; out holds rows * m
    // values (a view of exactly that), acc at least rows * m (the scratch), bias m
    // (asserted by check_shapes); the grid-stride loop is correct for any grid.
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

    /// qilin_gemv_bf16 (FMA) whatever the dispatch would pick; panics for a quantized W or
    /// a shape the GEMV cannot take.
    pub fn linear_gemv_fma_into(&self, x: &CudaTensor, w: &CudaLinear, out: &mut CudaTensor) {
        check_shapes(x, w, out);
        assert!(matches!(w.weight, LinearWeight::Bf16(_)), "qilin_gemv_bf16: a bf16 W only");
        launch_gemv(&self.dev, ptx::GEMV_BF16, x, w, out);
    }

    /// qilin_gemv_mma_bf16 (tensor cores) whatever the dispatch would pick; panics for a
    /// quantized W or a shape the GEMV cannot take.
    pub fn linear_gemv_mma_into(&self, x: &CudaTensor, w: &CudaLinear, out: &mut CudaTensor) {
        gemv_mma_into(&self.dev, x, w, out)
    }
}
