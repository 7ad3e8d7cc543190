//! Parity of the dense linear layer (kernels/gemv.cu's qilin_gemv_bf16 for n <= 8, cuBLAS
//! with qilin_bias_round_bf16 above; launchers in src/backend/cuda/linear.rs) with its
//! CPU twin `CpuBackend::linear` (`CpuLinear::forward`), on identical inputs: weights
//! built as bf16 `WeightTensor`s, inputs rounded to bf16 first, fresh random values each
//! run (the seed is printed). Shapes: every linear layer of Qwen2.5-7B (qkv 3584 -> 4608
//! with bias, o 3584 -> 3584, gate_up 3584 -> 37888, down 18944 -> 3584, lm_head
//! 3584 -> 152064 at n = 1) and of SmolLM2-135M (576 -> 960, 576, 3072, 49152 and
//! 1536 -> 576), with and without bias, at n in {1, 2, 3, 7, 8, 9, 64, 513}; and edge
//! shapes (a partial tile, a partial block of rows, one vector past a tile, a width
//! that is not a multiple of 8, which the dispatch sends to cuBLAS) at every n from 1
//! to 9 (each GEMV instantiation) and 64, 513. For n <= 8 three paths run: the dispatch
//! (GEMV), cuBLAS forced, and both GEMVs called directly (qilin_gemv_bf16, and the
//! tensor-core qilin_gemv_mma_bf16 under the cuBLAS arithmetic and tolerance). Outputs are poisoned with NaN before every launch; an
//! element never written fails as NaN. `Backend::linear` itself (own allocation) runs
//! once per shape.
//!
//! Runs only with `QILIN_GPU_TESTS=1`; then a missing driver, GPU or PTX is a failure.
//! The geometry tests at the end need no GPU and always run.
//!
//! Tolerance. Let y = sum_k x_k w_k + b in exact arithmetic and S = sum_k |x_k w_k|.
//! Products of two bf16 values are exact in f32 (8 + 8 significant bits <= 24). The twin
//! sums them in f32 in its own order; the GEMV in another (per lane, then a shuffle
//! tree), cuBLAS in yet another (tensor-core f32 accumulation, which may truncate rather
//! than round: up to 2 ulp per addition). Each f32 addition errs by at most 2u times its
//! partial sum (u = 2^-24), so |g - cpu| <= c u sum_j |partial_j| for the GPU's
//! pre-rounding value g. For sums of random-sign terms the partial sums stay around
//! S / sqrt(K), so that is ~2 u sqrt(K) S, about 275 u S at K = 18944; we allow
//! 1024 u S = 2^-14 S. (The worst-case bound, ~2 K u S, is useless here: it only holds
//! for same-sign terms, which random data does not make.) The GPU then rounds g to bf16
//! once, after the bias add: 2^-9 |g| (round to nearest even, 8 significant bits). So
//!     |gpu - cpu| <= 2^-7 |cpu| + 2^-14 S,
//! 4x the rounding and ~4x the summation estimate. A wrong or dropped 8-value vector
//! moves y by ~2.8 S / K, above 2^-14 S for every K here (2.4x at K = 18944, 13x at
//! 3584), and a wrong row, column or tile moves it by O(|y|), far above either term.
//! S is computed by the twin itself: CpuBackend::linear on |x| and |W| without bias.

#[path = "common/gpu.rs"]
mod gpu_common;
use gpu_common::{
    capped_rows, fresh_seed, open_gpu, poisoned, runs_tokens, skip_without_gpu_tests,
};

use std::sync::Arc;

use half::bf16;
use qilin::backend::abi::{
    bias_blocks, gemv_geometry, GEMV_MAX_TOKENS, QILIN_BIAS_THREADS, QILIN_GEMV_ROWS_PER_BLOCK,
    QILIN_GEMV_THREADS,
};
use qilin::backend::cpu::{CpuBackend, CpuLinear, CpuTensor};
use qilin::backend::cuda::{gemv_cublas_wins, CudaBackend, CudaLinear};
use qilin::backend::{Backend, LinearPart};
use qilin::model::tensor::Bytes;
use qilin::model::{DType, WeightTensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Batch sizes of the model shapes: decode (1..8, the GEMV), just past it (9), prefill.
const NS: &[usize] = &[1, 2, 3, 7, 8, 9, 64, 513];
/// Every GEMV instantiation (1..=8), the first cuBLAS batch, prefill.
const EDGE_NS: &[usize] = &[1, 2, 3, 4, 5, 6, 7, 8, 9, 64, 513];

/// Relative term: 4x the bf16 output rounding (2^-9).
const REL_TOL: f32 = 1.0 / 128.0;
/// Term in S = sum |x_k w_k|: 1024 f32 ulps (see the header).
const SUM_TOL: f32 = 1.0 / 16384.0;

/// Panics (fails the test) with the reason: with QILIN_GPU_TESTS=1 a GPU is required.
/// `len` bf16 values uniform in [-max, max), as bit patterns; chunks of the stream are
/// drawn in parallel (a 545M-value lm_head would take seconds on one core), each from
/// its own ChaCha stream, so the result depends only on (seed, stream).
fn random_bits(seed: u64, stream: u64, len: usize, max: f32) -> Vec<u16> {
    const CHUNK: usize = 1 << 16;
    let mut bits = vec![0u16; len];
    bits.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream.wrapping_mul(1 << 32).wrapping_add(i as u64));
        for b in chunk {
            *b = bf16::from_f32(rng.random_range(-max..max)).to_bits();
        }
    });
    bits
}

fn bits_to_f32(bits: &[u16]) -> Vec<f32> {
    bits.par_iter().map(|&b| bf16::from_bits(b).to_f32()).collect()
}

/// A bf16 weight of `shape` from bit patterns; `abs` clears the sign bits (|W| for S).
fn bf16_tensor(bits: &[u16], shape: Vec<usize>, abs: bool) -> WeightTensor {
    let mask = if abs { 0x7fff } else { 0xffff };
    let mut bytes = vec![0u8; 2 * bits.len()];
    bytes.par_chunks_mut(2).zip(bits.par_iter()).for_each(|(dst, &b)| {
        dst.copy_from_slice(&(b & mask).to_le_bytes());
    });
    WeightTensor { dtype: DType::BF16, shape, data: Bytes::Owned(Arc::new(bytes)) }
}

/// One linear layer of a model, uploaded to both backends.
struct Layer {
    name: String,
    in_features: usize,
    out_features: usize,
    cpu: CpuLinear,
    /// |W| without bias, for S.
    cpu_abs: CpuLinear,
    gpu: CudaLinear,
}

struct Case {
    name: &'static str,
    in_features: usize,
    out_features: usize,
    bias: bool,
    ns: &'static [usize],
}

fn build_layer(cpu: &CpuBackend, gpu: &CudaBackend, case: &Case, seed: u64, id: u64) -> Layer {
    let (k, m) = (case.in_features, capped_rows(case.out_features));
    // Weights of the size real checkpoints have (|w| ~ 1/sqrt(K)); biases O(1).
    let w_bits = random_bits(seed, 2 * id, m * k, 2.0 / (k as f32).sqrt());
    let weight = bf16_tensor(&w_bits, vec![m, k], false);
    let weight_abs = bf16_tensor(&w_bits, vec![m, k], true);
    drop(w_bits);
    let bias =
        case.bias.then(|| bf16_tensor(&random_bits(seed, 2 * id + 1, m, 1.0), vec![m], false));
    let parts = [LinearPart { weight: &weight, bias: bias.as_ref() }];
    let abs_parts = [LinearPart { weight: &weight_abs, bias: None }];
    let name = format!("{} [{m}, {k}]{}", case.name, if case.bias { " + bias" } else { "" });
    Layer {
        in_features: k,
        out_features: m,
        cpu: cpu.upload_linear(&name, &parts).expect("CPU upload"),
        cpu_abs: cpu.upload_linear(&name, &abs_parts).expect("CPU upload of |W|"),
        gpu: gpu.upload_linear(&name, &parts).expect("GPU upload"),
        name,
    }
}

/// The twin's result and S for one input.
struct Expected {
    y: Vec<f32>, // [n, out]
    s: Vec<f32>, // [n, out]
}

fn expected(cpu: &CpuBackend, layer: &Layer, x: &[f32], n: usize) -> Expected {
    let k = layer.in_features;
    let x_abs: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let y = cpu.linear(&CpuTensor::from_vec(x.to_vec(), n, k), &layer.cpu).data;
    let s = cpu.linear(&CpuTensor::from_vec(x_abs, n, k), &layer.cpu_abs).data;
    Expected { y, s }
}

/// Checks every element; on failure names the first few bad (token, channel) pairs.
/// Returns the worst |gpu - cpu| / tolerance.
fn compare(label: &str, gpu: &[f32], want: &Expected, out_features: usize) -> f32 {
    assert_eq!(gpu.len(), want.y.len(), "{label}: output length");
    let mut worst = 0.0f32;
    let mut bad = Vec::new();
    let mut n_bad = 0usize;
    for (i, ((&g, &c), &s)) in gpu.iter().zip(&want.y).zip(&want.s).enumerate() {
        let tol = REL_TOL * c.abs() + SUM_TOL * s + f32::MIN_POSITIVE;
        let err = (g - c).abs();
        // NaN (never written) fails: the comparison is false.
        if err <= tol {
            worst = worst.max(err / tol);
            continue;
        }
        n_bad += 1;
        if bad.len() < 8 {
            bad.push(format!(
                "  out[{}][{}] = {g} on GPU, {c} on CPU (|diff| {err:.3e} > tol {tol:.3e}, S {s:.3e})",
                i / out_features,
                i % out_features
            ));
        }
    }
    assert!(
        n_bad == 0,
        "{label}: {n_bad} of {} outputs out of tolerance (NaN = never written):\n{}",
        gpu.len(),
        bad.join("\n")
    );
    worst
}

fn run_cases(test: &str, cases: &[Case]) {
    if skip_without_gpu_tests() {
        return;
    }
    let gpu = open_gpu();
    let cpu = CpuBackend::new();
    let seed = fresh_seed(test);
    for (id, case) in cases.iter().enumerate() {
        let layer = build_layer(&cpu, &gpu, case, seed, id as u64);
        let (k, m) = (layer.in_features, layer.out_features);
        for (i, &n) in case.ns.iter().filter(|&&n| runs_tokens(n)).enumerate() {
            let x_bits = random_bits(seed, 1 << 20 | (id as u64) << 10 | n as u64, n * k, 2.0);
            let x = bits_to_f32(&x_bits);
            let want = expected(&cpu, &layer, &x, n);
            let x_gpu = gpu.tensor_from_host(&x, n, k);
            let label = |path: &str| format!("{test} seed {seed}: {} n={n} {path}", layer.name);

            let mut out = poisoned(&gpu, n, m);
            gpu.linear_into(&x_gpu, &layer.gpu, &mut out);
            let path = if gemv_geometry(n, k, m).is_some() && !gemv_cublas_wins(n) {
                "dispatch (gemv)"
            } else {
                "dispatch (cublas)"
            };
            let worst = compare(&label(path), &gpu.to_host(&out), &want, m);
            eprintln!("{}: worst |diff|/tol {worst:.3}", label(path));

            if n <= GEMV_MAX_TOKENS {
                let mut out = poisoned(&gpu, n, m);
                gpu.linear_cublas_into(&x_gpu, &layer.gpu, &mut out);
                let worst = compare(&label("cublas"), &gpu.to_host(&out), &want, m);
                eprintln!("{}: worst |diff|/tol {worst:.3}", label("cublas"));
                // Both GEMVs at every n they take, whichever the dispatch picks there: the
                // tensor-core one accumulates in f32 in the mma, as cuBLAS does, under the
                // same tolerance.
                if gemv_geometry(n, k, m).is_some() {
                    let mut out = poisoned(&gpu, n, m);
                    gpu.linear_gemv_fma_into(&x_gpu, &layer.gpu, &mut out);
                    let worst = compare(&label("gemv fma"), &gpu.to_host(&out), &want, m);
                    eprintln!("{}: worst |diff|/tol {worst:.3}", label("gemv fma"));
                    let mut out = poisoned(&gpu, n, m);
                    gpu.linear_gemv_mma_into(&x_gpu, &layer.gpu, &mut out);
                    let worst = compare(&label("gemv mma"), &gpu.to_host(&out), &want, m);
                    eprintln!("{}: worst |diff|/tol {worst:.3}", label("gemv mma"));
                }
            }
            if i == 0 {
                // The trait entry point, with its own (uninitialised) allocation.
                let out = gpu.linear(&x_gpu, &layer.gpu);
                assert_eq!((out.rows, out.cols), (n, m), "{}: Backend::linear shape", layer.name);
                compare(&label("Backend::linear"), &gpu.to_host(&out), &want, m);
            }
        }
    }
}

#[test]
fn qwen2_5_7b_linear_layers_match_the_cpu_twin() {
    run_cases(
        "qwen2.5-7b",
        &[
            Case { name: "qkv", in_features: 3584, out_features: 4608, bias: true, ns: NS },
            Case {
                name: "qkv",
                in_features: 3584,
                out_features: 4608,
                bias: false,
                ns: &[1, 8, 9],
            },
            Case { name: "o", in_features: 3584, out_features: 3584, bias: false, ns: NS },
            Case { name: "gate_up", in_features: 3584, out_features: 37888, bias: false, ns: NS },
            Case { name: "down", in_features: 18944, out_features: 3584, bias: false, ns: NS },
            Case {
                name: "lm_head",
                in_features: 3584,
                out_features: 152064,
                bias: false,
                ns: &[1],
            },
        ],
    );
}

#[test]
fn smollm2_linear_layers_match_the_cpu_twin() {
    run_cases(
        "smollm2",
        &[
            Case { name: "qkv", in_features: 576, out_features: 960, bias: false, ns: NS },
            Case { name: "qkv", in_features: 576, out_features: 960, bias: true, ns: NS },
            Case { name: "o", in_features: 576, out_features: 576, bias: true, ns: NS },
            Case { name: "gate_up", in_features: 576, out_features: 3072, bias: false, ns: NS },
            Case { name: "down", in_features: 1536, out_features: 576, bias: false, ns: NS },
            Case {
                name: "lm_head",
                in_features: 576,
                out_features: 49152,
                bias: false,
                ns: &[1, 9],
            },
        ],
    );
}

#[test]
fn edge_shapes_match_the_cpu_twin() {
    run_cases(
        "edge",
        &[
            // One vector: the smallest row the GEMV takes; a single output channel.
            Case { name: "tiny", in_features: 8, out_features: 1, bias: true, ns: EDGE_NS },
            // 9 vectors: one partial tile; 37 rows: a partial block and a partial warp.
            Case { name: "partial", in_features: 72, out_features: 37, bias: true, ns: EDGE_NS },
            // Two whole tiles of 128 vectors; one whole block of rows.
            Case {
                name: "whole tiles",
                in_features: 2048,
                out_features: 16,
                bias: false,
                ns: EDGE_NS,
            },
            // One vector past a tile; 19 rows.
            Case {
                name: "tile + 1",
                in_features: 1032,
                out_features: 19,
                bias: false,
                ns: EDGE_NS,
            },
            // Not a multiple of 8: the dispatch sends every n to cuBLAS.
            Case { name: "odd width", in_features: 100, out_features: 33, bias: true, ns: EDGE_NS },
        ],
    );
}

// ---------------------------------------------------------------------------------------
// Launch geometry, no GPU needed.

#[test]
fn gemv_geometry_covers_every_row_with_whole_blocks() {
    for n in 1..=GEMV_MAX_TOKENS {
        for out in [1usize, 15, 16, 17, 37, 576, 960, 3584, 4608, 37888, 152064] {
            let (grid, threads) = gemv_geometry(n, 3584, out).expect("shape accepted");
            assert_eq!(threads, QILIN_GEMV_THREADS);
            let rows = grid as usize * QILIN_GEMV_ROWS_PER_BLOCK as usize;
            assert!(rows >= out, "n={n} out={out}: {grid} blocks hold {rows} rows");
            assert!(
                rows - out < QILIN_GEMV_ROWS_PER_BLOCK as usize,
                "n={n} out={out}: a spare block"
            );
        }
    }
}

#[test]
fn gemv_geometry_refuses_what_the_kernel_cannot_take() {
    assert_eq!(gemv_geometry(0, 3584, 3584), None, "no tokens");
    assert_eq!(gemv_geometry(GEMV_MAX_TOKENS + 1, 3584, 3584), None, "prefill-sized batch");
    assert_eq!(gemv_geometry(1, 0, 3584), None, "no inputs");
    assert_eq!(gemv_geometry(1, 100, 3584), None, "width not a multiple of 8");
    assert_eq!(gemv_geometry(1, 3584, 0), None, "no outputs");
    assert!(gemv_geometry(1, 8, 1).is_some());
}

#[test]
fn bias_grid_is_bounded_and_never_empty() {
    let threads = QILIN_BIAS_THREADS as usize;
    assert_eq!(bias_blocks(0), 1);
    assert_eq!(bias_blocks(1), 1);
    assert_eq!(bias_blocks(threads), 1);
    assert_eq!(bias_blocks(threads + 1), 2);
    assert_eq!(bias_blocks(usize::MAX / 2), 65535);
}
