//! Parity of the quantized linear layers (kernels/quant_linear.cu: qilin_qgemv_w{4,8}_bf16
//! for n <= 8, qilin_dequant_w{4,8}_bf16 + cuBLAS above; launchers in
//! src/backend/cuda/quant_linear.rs and linear.rs) with their CPU twin `CpuBackend::linear`
//! (`CpuLinear::forward`), which computes on the original file format. Weights in every
//! format the GPU repacks (src/backend/packed_quant.rs): I4 and I8 made by the
//! quantizers of `--quantize` from random values; Q4_0, Q4_1, Q8_0 likewise; Q4_K, Q5_K
//! and Q6_K as random super-blocks; stacked parts of mixed formats (a Q4_K_M file's
//! Q4_K q/k with a Q6_K v). Shapes of Qwen2.5-7B and SmolLM2-135M and edge shapes
//! (one chunk, a partial tile, a partial block of rows), at n in 1..=9, 64 and 513.
//! For n <= 8 both paths run (the dispatch's GEMV, and cuBLAS forced), for n <= 2 the
//! small-batch GEMV (qilin_qgemv_small_w{4,8}_bf16), for n <= 8 on 4-bit layers in groups
//! of 128 the tensor-core GEMV (kernels/quant_gemv_mma.cu's qilin_qgemv_mma_w4_bf16, the
//! dispatch's choice there unless QILIN_CUDA_QGEMV_MMA=0; and its split-K variant
//! qilin_qgemv_mma_splitk_w4_bf16, opt-in with QILIN_CUDA_QGEMV_MMA2=1), and the tensor-core GEMM
//! (kernels/quant_gemm.cu's qilin_qgemm_w{4,8}_bf16, the dispatch's choice at 9-256 tokens
//! with QILIN_CUDA_QGEMM_WIDE=1) at every n, split-K as on this GPU and into 3 splits;
//! outputs are poisoned with NaN first. The dequantization kernel is also checked alone: bit-exact against the host's
//! `PackedQuant::dequantize_row` rounded to bf16.
//!
//! Runs only with `QILIN_GPU_TESTS=1`; then a missing driver, GPU or PTX is a failure.
//!
//! Tolerance, with S = sum_k |x_k w_k| (computed by the twin on |x| and |W|):
//! - GEMV: as tests/gpu_linear.rs argues, 2^-7 |y| (the bf16 rounding of the output, 4x)
//!   plus 2^-14 S (f32 summation in another order). The weights here are not bf16, so
//!   each product w x rounds once more (2^-24 relative): another u S, inside the 2^-14 S.
//! - cuBLAS and the tensor-core GEMM: the dequantized weight is rounded to bf16 first (8 significant bits; an int4
//!   weight of an f16 scale has up to 15). Each term then errs by up to 2^-9 |x_k w_k|,
//!   with signs that do not line up for random data, so the sum errs like a random walk:
//!   ~2^-9 sqrt(sum (x_k w_k)^2) ~ 2^-9 S / sqrt(K). We allow 8x that, 2^-6 S / sqrt(K),
//!   on top of the GEMV terms. A dropped 8-value vector moves y by ~8 S / K, still 3.7x
//!   above it at K = 18944 and more at every smaller K.

#[path = "common/gpu.rs"]
mod gpu_common;
use gpu_common::{
    capped_rows, fresh_seed, open_gpu, poisoned, repeats_launches, runs_tokens,
    skip_without_gpu_tests,
};

use std::sync::Arc;

use half::bf16;
use qilin::backend::abi::{
    dequant_blocks, qgemm_geometry, qgemv_geometry, qgemv_mma_geometry, qgemv_mma_ok,
    qgemv_splitk_geometry, quant_layout_ok, GEMV_MAX_TOKENS, QILIN_DEQUANT_THREADS,
    QILIN_QGEMM_BLOCK_K, QILIN_QGEMM_BLOCK_M, QILIN_QGEMM_BLOCK_N, QILIN_QGEMM_MAX_SPLITS,
    QILIN_QGEMM_MIN_BLOCKS, QILIN_QGEMM_MIN_SPLIT_STEPS, QILIN_QGEMM_THREADS,
    QILIN_QGEMV_MMA_MAX_TOKENS, QILIN_QGEMV_MMA_ROWS, QILIN_QGEMV_MMA_THREADS,
    QILIN_QGEMV_ROWS_PER_BLOCK, QILIN_QGEMV_SMALL_MAX_TOKENS, QILIN_QGEMV_SPLITK_MAX_SPLITS,
    QILIN_QGEMV_SPLITK_MIN_BLOCKS, QILIN_QGEMV_SPLITK_THREADS, QILIN_QGEMV_THREADS,
};
use qilin::backend::cpu::{CpuBackend, CpuLinear, CpuTensor};
use qilin::backend::cuda::{CudaBackend, CudaLinear, LinearWeight};
use qilin::backend::packed_quant::PackedQuant;
use qilin::backend::{Backend, LinearPart};
use qilin::model::quant::levels::LevelFormat;
use qilin::model::quant::{dequantize_row, f16_fields};
use qilin::model::quantize::{
    quantize_row_i4, quantize_row_i8, quantize_row_q4_1, quantize_row_q8_0, QuantizeError,
};
use qilin::model::tensor::Bytes;
use qilin::model::{DType, WeightTensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

const NS: &[usize] = &[1, 2, 3, 7, 8, 9, 64, 513];
const EDGE_NS: &[usize] = &[1, 2, 3, 4, 5, 6, 7, 8, 9, 64];
const REL_TOL: f32 = 1.0 / 128.0;
const SUM_TOL: f32 = 1.0 / 16384.0;
/// Times S / sqrt(K) on the cuBLAS path (see the header).
const DEQUANT_TOL: f32 = 1.0 / 64.0;

type Quantizer = fn(&[f32], &mut [u8]) -> Result<(), QuantizeError>;

fn quantizer(dtype: DType) -> Option<Quantizer> {
    match dtype {
        DType::I4 => Some(quantize_row_i4),
        DType::I8 => Some(quantize_row_i8),
        DType::Q4_1 => Some(quantize_row_q4_1),
        DType::Q8_0 => Some(quantize_row_q8_0),
        _ => None,
    }
}

/// A `[rows, cols]` weight in `dtype`: real quantizer output where Qilin has one (from
/// values of the size real checkpoints have, |w| ~ 1/sqrt(cols)), else random blocks
/// whose f16 scales are tamed to the same size. Q4_0 is Q4_1's bytes re-read with the
/// min dropped (the same nibble layout and a valid scale).
fn weight(dtype: DType, rows: usize, cols: usize, seed: u64) -> WeightTensor {
    let row_bytes = dtype.row_bytes(cols).expect("whole blocks");
    let mut bytes = vec![0u8; rows * row_bytes];
    let spread = 2.0 / (cols as f32).sqrt();
    bytes.par_chunks_mut(row_bytes).enumerate().for_each(|(r, out)| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(r as u64);
        let source = if dtype == DType::Q4_0 { DType::Q4_1 } else { dtype };
        if let Some(quantize) = quantizer(source) {
            let w: Vec<f32> = (0..cols).map(|_| rng.random_range(-spread..spread)).collect();
            if source == dtype {
                quantize(&w, out).expect("finite values quantize");
            } else {
                let mut q41 = vec![0u8; DType::Q4_1.row_bytes(cols).expect("whole blocks")];
                quantize(&w, &mut q41).expect("finite values quantize");
                for (dst, src) in out.chunks_exact_mut(18).zip(q41.chunks_exact(20)) {
                    dst[..2].copy_from_slice(&src[..2]);
                    dst[2..].copy_from_slice(&src[4..]);
                }
            }
            return;
        }
        rng.fill(out);
        // f16 d (and dmin) with exponent 2^-12..2^-9, so values stay ~1e-2 (the IQ4 tables'
        // levels reach 127: ~0.1).
        for blk in out.chunks_exact_mut(dtype.block_bytes()) {
            for &a in f16_fields(dtype) {
                let exponent = 3 + (blk[a + 1] >> 2) % 4;
                blk[a + 1] = (blk[a + 1] & 0x83) | (exponent << 2);
            }
        }
    });
    WeightTensor { dtype, shape: vec![rows, cols], data: Bytes::Owned(Arc::new(bytes)) }
}

/// `|W|` of stacked parts as one f32 weight (for S).
fn abs_weight(parts: &[WeightTensor]) -> WeightTensor {
    let cols = parts[0].row_len();
    let rows: usize = parts.iter().map(|p| p.rows()).sum();
    let mut bytes = vec![0u8; rows * cols * 4];
    let mut chunks = bytes.chunks_mut(cols * 4);
    for part in parts {
        let mut row = vec![0f32; cols];
        for r in 0..part.rows() {
            dequantize_row(part.dtype, part.row(r), &mut row);
            let dst = chunks.next().expect("one chunk per row");
            for (d, v) in dst.chunks_exact_mut(4).zip(&row) {
                d.copy_from_slice(&v.abs().to_le_bytes());
            }
        }
    }
    WeightTensor { dtype: DType::F32, shape: vec![rows, cols], data: Bytes::Owned(Arc::new(bytes)) }
}

struct Case {
    name: &'static str,
    /// (dtype, rows) of each stacked part.
    parts: &'static [(DType, usize)],
    in_features: usize,
    bias: bool,
    /// The device layout the parts must pack into.
    format: LevelFormat,
    ns: &'static [usize],
}

struct Layer {
    name: String,
    in_features: usize,
    out_features: usize,
    cpu: CpuLinear,
    cpu_abs: CpuLinear,
    gpu: CudaLinear,
    packed: PackedQuant,
}

fn build_layer(cpu: &CpuBackend, gpu: &CudaBackend, case: &Case, seed: u64, id: u64) -> Layer {
    let k = case.in_features;
    let weights: Vec<WeightTensor> = case
        .parts
        .iter()
        .enumerate()
        .map(|(i, &(dtype, rows))| weight(dtype, capped_rows(rows), k, seed ^ (id << 8 | i as u64)))
        .collect();
    let m: usize = weights.iter().map(|w| w.rows()).sum();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ id);
    let biases: Vec<Option<WeightTensor>> = weights
        .iter()
        .map(|w| {
            case.bias.then(|| {
                let b: Vec<u8> = (0..w.rows())
                    .flat_map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_le_bytes())
                    .collect();
                WeightTensor {
                    dtype: DType::BF16,
                    shape: vec![w.rows()],
                    data: Bytes::Owned(Arc::new(b)),
                }
            })
        })
        .collect();
    let parts: Vec<LinearPart<'_>> = weights
        .iter()
        .zip(&biases)
        .map(|(weight, bias)| LinearPart { weight, bias: bias.as_ref() })
        .collect();
    let abs = abs_weight(&weights);
    let dtypes: Vec<String> = case.parts.iter().map(|(d, _)| d.to_string()).collect();
    let name = format!(
        "{} {} [{m}, {k}]{}",
        case.name,
        dtypes.join("+"),
        if case.bias { " + bias" } else { "" }
    );
    let gpu_layer = gpu.upload_linear(&name, &parts).expect("GPU upload");
    match &gpu_layer.weight {
        LinearWeight::Quant(q) => assert_eq!(q.format, case.format, "{name}: device layout"),
        LinearWeight::Bf16(_) => panic!("{name}: uploaded as bf16, not as levels"),
    }
    let refs: Vec<&WeightTensor> = weights.iter().collect();
    Layer {
        in_features: k,
        out_features: m,
        cpu: cpu.upload_linear(&name, &parts).expect("CPU upload"),
        cpu_abs: cpu
            .upload_linear(&name, &[LinearPart { weight: &abs, bias: None }])
            .expect("CPU upload of |W|"),
        gpu: gpu_layer,
        packed: PackedQuant::from_parts(&refs).expect("packable on the host too"),
        name,
    }
}

/// The dequantization kernel alone: every weight bit-exact against the host's
/// fma(scale, level, min) rounded to bf16.
fn check_dequant(gpu: &CudaBackend, layer: &Layer) {
    let got = gpu.dequantized_weight(&layer.gpu).expect("a quantized layer");
    let k = layer.in_features;
    let bad: Vec<String> = got
        .par_chunks(k)
        .enumerate()
        .filter_map(|(r, row)| {
            let mut want = vec![0f32; k];
            layer.packed.dequantize_row(r, &mut want);
            let c = (0..k).find(|&c| row[c].to_bits() != bf16::from_f32(want[c]).to_bits())?;
            Some(format!("  [{r}][{c}]: GPU {} vs host {}", row[c], bf16::from_f32(want[c])))
        })
        .collect();
    assert!(
        bad.is_empty(),
        "{}: dequantized rows differ:\n{}",
        layer.name,
        bad[..bad.len().min(8)].join("\n")
    );
}

/// The worst |diff| / tolerance over every element, and the first few elements out of
/// tolerance (NaN, an output never written, is always out).
fn check(got: &[f32], want: &[f32], s: &[f32], m: usize, extra: f32) -> (f32, Vec<String>) {
    let mut worst = 0.0f32;
    let mut bad = Vec::new();
    for (i, ((&g, &c), &s)) in got.iter().zip(want).zip(s).enumerate() {
        let tol = REL_TOL * c.abs() + (SUM_TOL + extra) * s + f32::MIN_POSITIVE;
        let err = (g - c).abs();
        if err <= tol {
            worst = worst.max(err / tol);
        } else if bad.len() < 8 {
            bad.push(format!(
                "  out[{}][{}] = {g} on GPU, {c} on CPU (tol {tol:.3e})",
                i / m,
                i % m
            ));
        }
    }
    (worst, bad)
}

fn compare(label: &str, got: &[f32], want: &[f32], s: &[f32], m: usize, extra: f32) -> f32 {
    let (worst, bad) = check(got, want, s, m, extra);
    assert!(
        bad.is_empty(),
        "{label}: outputs out of tolerance (NaN = never written):\n{}",
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
        check_dequant(&gpu, &layer);
        let (k, m) = (layer.in_features, layer.out_features);
        let dequant_extra = DEQUANT_TOL / (k as f32).sqrt();
        for (i, &n) in case.ns.iter().filter(|&&n| runs_tokens(n)).enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (id as u64) << 32 ^ n as u64);
            let x: Vec<f32> = (0..n * k)
                .map(|_| bf16::from_f32(rng.random_range(-2.0f32..2.0)).to_f32())
                .collect();
            let x_abs: Vec<f32> = x.iter().map(|v| v.abs()).collect();
            let want = cpu.linear(&CpuTensor::from_vec(x.clone(), n, k), &layer.cpu).data;
            let s = cpu.linear(&CpuTensor::from_vec(x_abs, n, k), &layer.cpu_abs).data;
            let x_gpu = gpu.tensor_from_host(&x, n, k);
            let label = |path: &str| format!("{test} seed {seed}: {} n={n} {path}", layer.name);

            let mut out = poisoned(&gpu, n, m);
            gpu.linear_into(&x_gpu, &layer.gpu, &mut out);
            let gemv = n <= GEMV_MAX_TOKENS;
            let (path, extra) =
                if gemv { ("dispatch (qgemv)", 0.0) } else { ("dispatch (cublas)", dequant_extra) };
            let worst = compare(&label(path), &gpu.to_host(&out), &want, &s, m, extra);
            eprintln!("{}: worst |diff|/tol {worst:.3}", label(path));
            if gemv {
                let mut out = poisoned(&gpu, n, m);
                gpu.linear_cublas_into(&x_gpu, &layer.gpu, &mut out);
                let got = gpu.to_host(&out);
                let worst = compare(&label("cublas"), &got, &want, &s, m, dequant_extra);
                eprintln!("{}: worst |diff|/tol {worst:.3}", label("cublas"));
            }
            // The small-batch GEMV, called directly: f32 arithmetic on exact levels, the GEMV's tolerance.
            if n <= QILIN_QGEMV_SMALL_MAX_TOKENS as usize {
                let mut out = poisoned(&gpu, n, m);
                gpu.linear_qgemv_small_into(&x_gpu, &layer.gpu, &mut out);
                let got = gpu.to_host(&out);
                let worst = compare(&label("qgemv small"), &got, &want, &s, m, 0.0);
                eprintln!("{}: worst |diff|/tol {worst:.3}", label("qgemv small"));
            }
            // The tensor-core GEMV, called directly where it takes the layer: exact levels and products, f32 sums, the GEMV's tolerance.
            let mut out = poisoned(&gpu, n, m);
            if gpu.linear_qgemv_mma_into(&x_gpu, &layer.gpu, &mut out) {
                let got = gpu.to_host(&out);
                let worst = compare(&label("qgemv mma"), &got, &want, &s, m, 0.0);
                eprintln!("{}: worst |diff|/tol {worst:.3}", label("qgemv mma"));
            }
            // The int4 GEMM on the same path (opt-in with QILIN_CUDA_QGEMM_MMA=1), called
            // directly where it takes the layer, at any n (several 64-token tiles at 513):
            // the GEMV's arithmetic but x sums by f32 adds, the GEMV's tolerance.
            let mut out = poisoned(&gpu, n, m);
            if gpu.linear_qgemm_mma_into(&x_gpu, &layer.gpu, &mut out) {
                let got = gpu.to_host(&out);
                let worst = compare(&label("qgemm mma"), &got, &want, &s, m, 0.0);
                eprintln!("{}: worst |diff|/tol {worst:.3}", label("qgemm mma"));
            }
            // Its split-K variant (opt-in with QILIN_CUDA_QGEMV_MMA2=1), the same
            // tolerance; run twice, the second launch on the first one's counters (the
            // merging blocks must have reset them) and bit for bit the same (fixed-order
            // merge).
            let mut out = poisoned(&gpu, n, m);
            if gpu.linear_qgemv_splitk_into(&x_gpu, &layer.gpu, &mut out) {
                let got = gpu.to_host(&out);
                let worst = compare(&label("qgemv mma split-k"), &got, &want, &s, m, 0.0);
                eprintln!("{}: worst |diff|/tol {worst:.3}", label("qgemv mma split-k"));
                if repeats_launches() {
                    let mut again = poisoned(&gpu, n, m);
                    assert!(gpu.linear_qgemv_splitk_into(&x_gpu, &layer.gpu, &mut again));
                    let again = gpu.to_host(&again);
                    assert!(
                        got.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{}: a second launch differs",
                        label("qgemv mma split-k")
                    );
                }
            }
            // The tensor-core GEMM (any n): the weight rounded to bf16 in shared memory,
            // the cuBLAS path's tolerance. Split-K as its geometry decides on this GPU, then
            // into 3 splits (uneven step ranges, a merge on every shape) launched twice: the
            // second launch runs on counters the first one's merging blocks must have reset,
            // and the fixed-order merge repeats bit for bit.
            let mut out = poisoned(&gpu, n, m);
            gpu.linear_qgemm_into(&x_gpu, &layer.gpu, &mut out, None);
            let worst = compare(&label("qgemm"), &gpu.to_host(&out), &want, &s, m, dequant_extra);
            eprintln!("{}: worst |diff|/tol {worst:.3}", label("qgemm"));
            // Not under a capped run (racecheck): the 3-split launches touch shared memory
            // as the first one does.
            if repeats_launches() {
                let mut out = poisoned(&gpu, n, m);
                gpu.linear_qgemm_into(&x_gpu, &layer.gpu, &mut out, Some(3));
                let got = gpu.to_host(&out);
                let worst = compare(&label("qgemm 3 splits"), &got, &want, &s, m, dequant_extra);
                eprintln!("{}: worst |diff|/tol {worst:.3}", label("qgemm 3 splits"));
                let mut again = poisoned(&gpu, n, m);
                gpu.linear_qgemm_into(&x_gpu, &layer.gpu, &mut again, Some(3));
                assert!(
                    got.iter().zip(&gpu.to_host(&again)).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{}: a second launch differs",
                    label("qgemm 3 splits")
                );
            }
            if i == 0 {
                let out = gpu.linear(&x_gpu, &layer.gpu);
                let extra = if gemv { 0.0 } else { dequant_extra };
                compare(&label("Backend::linear"), &gpu.to_host(&out), &want, &s, m, extra);
            }
        }
    }
}

const W4_G128: LevelFormat = LevelFormat { bits: 4, group: 128 };
const W8_G128: LevelFormat = LevelFormat { bits: 8, group: 128 };
const W4_G32: LevelFormat = LevelFormat { bits: 4, group: 32 };
const W8_G32: LevelFormat = LevelFormat { bits: 8, group: 32 };
const W8_G16: LevelFormat = LevelFormat { bits: 8, group: 16 };

#[test]
fn qwen2_5_7b_int4_and_int8_layers_match_the_cpu_twin() {
    use DType::{I4, I8};
    run_cases(
        "qwen2.5-7b int",
        &[
            Case {
                name: "qkv",
                parts: &[(I4, 3584), (I4, 512), (I4, 512)],
                in_features: 3584,
                bias: true,
                format: W4_G128,
                ns: NS,
            },
            Case {
                name: "o",
                parts: &[(I4, 3584)],
                in_features: 3584,
                bias: false,
                format: W4_G128,
                ns: NS,
            },
            Case {
                name: "gate_up",
                parts: &[(I4, 18944), (I4, 18944)],
                in_features: 3584,
                bias: false,
                format: W4_G128,
                ns: &[1, 8, 9, 513],
            },
            Case {
                name: "down",
                parts: &[(I4, 3584)],
                in_features: 18944,
                bias: false,
                format: W4_G128,
                ns: NS,
            },
            Case {
                name: "qkv",
                parts: &[(I8, 3584), (I8, 512), (I8, 512)],
                in_features: 3584,
                bias: true,
                format: W8_G128,
                ns: &[1, 3, 8, 9, 64],
            },
            Case {
                name: "down",
                parts: &[(I8, 3584)],
                in_features: 18944,
                bias: false,
                format: W8_G128,
                ns: &[1, 8, 9, 64],
            },
        ],
    );
}

/// The tensor-core GEMVs' edges: out_features not a multiple of their 16-row tiles (the
/// last tile reads the last row and stores only real rows), in_features whose steps do not
/// divide evenly among warps and splits, and 9-40 tokens (chunks of 8, the last partial).
/// No source format here packs into groups of 256 (Qilin's int4 is group 128; GGUF's are
/// 16-32), so that case is left to the geometry tests: the H200 run at b908988 failed this
/// test on its own expectation of a group-256 layout, before any kernel ran.
#[test]
fn int4_odd_rows_match_the_cpu_twin() {
    use DType::I4;
    run_cases(
        "int4 edges",
        &[
            Case {
                name: "odd rows",
                parts: &[(I4, 1000), (I4, 3)],
                in_features: 2560,
                bias: true,
                format: W4_G128,
                ns: &[1, 2, 5, 8, 17, 40],
            },
            Case {
                name: "odd rows g128",
                parts: &[(I4, 77)],
                in_features: 1152,
                bias: false,
                format: W4_G128,
                ns: &[1, 3, 8],
            },
        ],
    );
}

#[test]
fn gguf_formats_and_mixed_parts_match_the_cpu_twin() {
    use DType::{Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, Q8_0};
    run_cases(
        "gguf",
        &[
            // A Q4_K_M file's layer: Q4_K q/k with a Q6_K v stack into 8-bit levels, group 16.
            Case {
                name: "qkv",
                parts: &[(Q4_K, 3584), (Q4_K, 512), (Q6_K, 512)],
                in_features: 3584,
                bias: true,
                format: W8_G16,
                ns: &[1, 2, 8, 9, 64],
            },
            Case {
                name: "gate_up",
                parts: &[(Q4_K, 4096), (Q4_K, 4096)],
                in_features: 3584,
                bias: false,
                format: W4_G32,
                ns: &[1, 8, 9],
            },
            Case {
                name: "down",
                parts: &[(Q5_K, 3584)],
                in_features: 18944,
                bias: false,
                format: W8_G32,
                ns: &[1, 8, 64],
            },
            Case {
                name: "down",
                parts: &[(Q6_K, 576)],
                in_features: 1536,
                bias: false,
                format: W8_G16,
                ns: NS,
            },
            // SmolLM2's 576-wide rows: the 32-value blocks --quantize writes there.
            Case {
                name: "qkv",
                parts: &[(Q4_1, 576), (Q4_1, 192), (Q4_1, 192)],
                in_features: 576,
                bias: true,
                format: W4_G32,
                ns: NS,
            },
            Case {
                name: "gate_up",
                parts: &[(Q8_0, 1536), (Q8_0, 1536)],
                in_features: 576,
                bias: false,
                format: W8_G32,
                ns: NS,
            },
            Case {
                name: "o",
                parts: &[(Q4_0, 576)],
                in_features: 576,
                bias: false,
                format: W4_G32,
                ns: NS,
            },
            Case {
                name: "mixed",
                parts: &[(Q4_0, 100), (Q8_0, 60)],
                in_features: 576,
                bias: true,
                format: W8_G32,
                ns: &[1, 5, 9],
            },
        ],
    );
}

/// The formats read through decoded levels (model/quant/decoded_levels.rs), all 8-bit on
/// the device: Q2_K/Q3_K in groups of 16, the rest in groups of 32.
#[test]
fn lowbit_gguf_formats_match_the_cpu_twin() {
    use DType::{IQ4_NL, IQ4_XS, Q2_K, Q3_K, Q4_K, Q5_0, Q5_1};
    run_cases(
        "gguf-lowbit",
        &[
            // A Q3_K_M file's layer: Q3_K q/k with a Q4_K v.
            Case {
                name: "qkv",
                parts: &[(Q3_K, 3584), (Q3_K, 512), (Q4_K, 512)],
                in_features: 3584,
                bias: true,
                format: W8_G16,
                ns: &[1, 2, 8, 9, 64],
            },
            Case {
                name: "gate_up",
                parts: &[(Q2_K, 2048), (Q2_K, 2048)],
                in_features: 3584,
                bias: false,
                format: W8_G16,
                ns: &[1, 8, 9],
            },
            Case {
                name: "down",
                parts: &[(IQ4_XS, 3584)],
                in_features: 18944,
                bias: false,
                format: W8_G32,
                ns: &[1, 8, 64],
            },
            // SmolLM2's 576-wide rows, where llama.cpp falls back to 32-value blocks.
            Case {
                name: "qkv",
                parts: &[(Q5_0, 576), (Q5_0, 192), (Q5_1, 192)],
                in_features: 576,
                bias: true,
                format: W8_G32,
                ns: NS,
            },
            Case {
                name: "o",
                parts: &[(IQ4_NL, 576)],
                in_features: 576,
                bias: false,
                format: W8_G32,
                ns: NS,
            },
        ],
    );
}

#[test]
fn edge_shapes_match_the_cpu_twin() {
    use DType::{I4, Q4_1, Q6_K};
    run_cases(
        "edge",
        &[
            // One 32-value chunk (the smallest row); a single output channel.
            Case {
                name: "tiny",
                parts: &[(Q4_1, 1)],
                in_features: 32,
                bias: true,
                format: W4_G32,
                ns: EDGE_NS,
            },
            // A tile + one chunk (1056 = 1024 + 32); 37 rows: partial block and warp.
            Case {
                name: "tile + 1",
                parts: &[(Q4_1, 37)],
                in_features: 1056,
                bias: true,
                format: W4_G32,
                ns: EDGE_NS,
            },
            // Two whole tiles, one whole block of rows.
            Case {
                name: "whole tiles",
                parts: &[(I4, 16)],
                in_features: 2048,
                bias: false,
                format: W4_G128,
                ns: EDGE_NS,
            },
            // The tensor-core GEMV's edges: 9 steps of 128 over its 8 warps (one warp
            // takes two), 37 rows (a partial 16-row block).
            Case {
                name: "mma partial",
                parts: &[(I4, 37)],
                in_features: 1152,
                bias: true,
                format: W4_G128,
                ns: EDGE_NS,
            },
            // 8-bit levels in groups of 16: a tile + 256 values, 19 rows.
            Case {
                name: "q6_k partial",
                parts: &[(Q6_K, 19)],
                in_features: 1280,
                bias: false,
                format: W8_G16,
                ns: EDGE_NS,
            },
        ],
    );
}

// ---------------------------------------------------------------------------------------
// No GPU needed: the tolerances, launch geometry and layout rules.

/// The cuBLAS path's tolerance admits what a correct implementation computes (weights
/// rounded to bf16, exact sums, output rounded to bf16: emulated here in f64) and still
/// rejects one dropped 8-value vector per row, at the widest and narrowest rows.
#[test]
fn dequant_tolerance_admits_bf16_weights_and_rejects_a_dropped_vector() {
    let cpu = CpuBackend::new();
    let n = 3;
    for (i, (dtype, k)) in
        [(DType::I4, 18944), (DType::Q4_K, 3584), (DType::Q6_K, 1536), (DType::Q4_1, 576)]
            .into_iter()
            .enumerate()
    {
        let m = 48;
        let w = weight(dtype, m, k, 11 + i as u64);
        let packed = PackedQuant::from_parts(&[&w]).expect("packable");
        let abs = abs_weight(std::slice::from_ref(&w));
        let lin = cpu.upload_linear("w", &[LinearPart { weight: &w, bias: None }]).unwrap();
        let lin_abs = cpu.upload_linear("|w|", &[LinearPart { weight: &abs, bias: None }]).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
        let x: Vec<f32> =
            (0..n * k).map(|_| bf16::from_f32(rng.random_range(-2.0f32..2.0)).to_f32()).collect();
        let x_abs: Vec<f32> = x.iter().map(|v| v.abs()).collect();
        let want = cpu.linear(&CpuTensor::from_vec(x.clone(), n, k), &lin).data;
        let s = cpu.linear(&CpuTensor::from_vec(x_abs, n, k), &lin_abs).data;
        let emulate = |skip: usize| -> Vec<f32> {
            let mut out = vec![0f32; n * m];
            let mut row = vec![0f32; k];
            for o in 0..m {
                packed.dequantize_row(o, &mut row);
                for t in 0..n {
                    let y: f64 = (skip..k)
                        .map(|c| bf16::from_f32(row[c]).to_f32() as f64 * x[t * k + c] as f64)
                        .sum();
                    out[t * m + o] = bf16::from_f64(y).to_f32();
                }
            }
            out
        };
        let extra = DEQUANT_TOL / (k as f32).sqrt();
        let (worst, bad) = check(&emulate(0), &want, &s, m, extra);
        assert!(bad.is_empty(), "{dtype} k={k}: a correct result rejected:\n{}", bad.join("\n"));
        eprintln!("{dtype} k={k}: worst |diff|/tol {worst:.3} for bf16 weights");
        let (_, bad) = check(&emulate(8), &want, &s, m, extra);
        assert!(!bad.is_empty(), "{dtype} k={k}: a dropped vector went unnoticed");
    }
}

#[test]
fn qgemv_geometry_covers_every_row_with_whole_blocks() {
    for n in 1..=GEMV_MAX_TOKENS {
        for out in [1usize, 15, 16, 17, 37, 576, 3584, 4608, 37888] {
            let (grid, threads) = qgemv_geometry(n, 4, 3584, out, 128).expect("shape accepted");
            assert_eq!(threads, QILIN_QGEMV_THREADS);
            let rows = grid as usize * QILIN_QGEMV_ROWS_PER_BLOCK as usize;
            assert!(
                rows >= out && rows - out < QILIN_QGEMV_ROWS_PER_BLOCK as usize,
                "n={n} out={out}"
            );
        }
    }
}

#[test]
fn qgemv_and_layout_refuse_what_the_kernels_cannot_take() {
    assert_eq!(qgemv_geometry(0, 4, 3584, 3584, 128), None, "no tokens");
    assert_eq!(qgemv_geometry(GEMV_MAX_TOKENS + 1, 4, 3584, 3584, 128), None, "prefill batch");
    assert_eq!(qgemv_geometry(1, 4, 3584, 0, 128), None, "no outputs");
    assert!(!quant_layout_ok(4, 3584, 16), "4-bit groups hold at least one 16-byte vector");
    assert!(quant_layout_ok(8, 3584, 16));
    assert!(!quant_layout_ok(4, 48, 16), "rows are whole 32-value chunks");
    assert!(!quant_layout_ok(4, 576, 128), "groups divide the row");
    assert!(!quant_layout_ok(2, 3584, 128), "only 4- and 8-bit levels");
    assert!(!quant_layout_ok(8, 0, 16), "no inputs");
}

/// The tensor-core GEMV takes 4-bit layers in power-of-two groups of 128 or more at 1..=
/// QILIN_QGEMV_MMA_MAX_TOKENS tokens, nothing else, and covers every row with whole 16-row
/// blocks, once per chunk of 8 tokens (the kernel traps on any other grid).
#[test]
fn qgemv_mma_takes_int4_g128_layers_and_covers_every_row() {
    let max = QILIN_QGEMV_MMA_MAX_TOKENS as usize;
    for n in 1..=max {
        let chunks = n.div_ceil(GEMV_MAX_TOKENS);
        for out in [1usize, 15, 16, 17, 37, 3584, 4608, 37888] {
            let (grid, threads) = qgemv_mma_geometry(n, 4, 3584, out, 128).expect("accepted");
            assert_eq!(threads, QILIN_QGEMV_MMA_THREADS);
            assert_eq!(grid as usize % chunks, 0, "n={n} out={out}: whole chunks");
            let rows = grid as usize / chunks * QILIN_QGEMV_MMA_ROWS as usize;
            assert!(rows >= out && rows - out < QILIN_QGEMV_MMA_ROWS as usize, "n={n} out={out}");
        }
    }
    assert!(qgemv_mma_ok(1, 4, 18944, 128));
    assert!(qgemv_mma_ok(8, 4, 2560, 256));
    assert!(qgemv_mma_ok(9, 4, 3584, 128), "two chunks, the second of one token");
    assert!(!qgemv_mma_ok(0, 4, 3584, 128), "no tokens");
    assert!(!qgemv_mma_ok(max + 1, 4, 3584, 128), "more tokens than the kernel's chunks");
    assert!(!qgemv_mma_ok(1, 8, 3584, 128), "8-bit levels");
    assert!(!qgemv_mma_ok(1, 4, 3584, 32), "GGUF's 32-value blocks: one group per step");
    assert!(!qgemv_mma_ok(1, 4, 3840, 384), "a group that is not a power of two");
    assert!(!qgemv_mma_ok(1, 4, 576, 128), "groups divide the row");
    assert_eq!(qgemv_mma_geometry(1, 4, 3584, 0, 128), None, "no outputs");
}

#[test]
fn dequant_grid_is_bounded_and_never_empty() {
    let threads = QILIN_DEQUANT_THREADS as usize;
    assert_eq!(dequant_blocks(0, 4), 1);
    assert_eq!(dequant_blocks(32 * threads, 4), 1);
    assert_eq!(dequant_blocks(32 * threads + 1, 4), 2);
    assert_eq!(dequant_blocks(16 * threads + 1, 8), 2);
    assert_eq!(dequant_blocks(usize::MAX / 64, 8), 65535);
}

#[test]
fn qgemv_splitk_geometry_fills_one_wave_and_covers_every_row() {
    let warps = (QILIN_QGEMV_SPLITK_THREADS / 32) as usize;
    // Qwen2.5-7B's int4 layers on 132 SMs (H100/H200): qkv, o, gate_up, down.
    let expected = [((3584, 4608), 3), ((3584, 3584), 4), ((3584, 37888), 1), ((18944, 3584), 4)];
    for ((k, m), splits) in expected {
        for n in 1..=GEMV_MAX_TOKENS {
            let ((tiles, got), threads) =
                qgemv_splitk_geometry(n, 4, k, m, 128, 132, 8192).expect("accepted");
            assert_eq!(threads, QILIN_QGEMV_SPLITK_THREADS);
            assert_eq!(got, splits, "k={k} m={m}");
            let rows = tiles as usize * QILIN_QGEMV_MMA_ROWS as usize;
            assert!(rows >= m && rows - m < QILIN_QGEMV_MMA_ROWS as usize);
        }
    }
    for (k, m, sms) in [(3584, 4608, 132), (128, 16, 132), (1152, 77, 1), (18944, 16, 500)] {
        let ((tiles, splits), _) = qgemv_splitk_geometry(1, 4, k, m, 128, sms, 8192).unwrap();
        let steps = k / 128;
        assert!((1..=QILIN_QGEMV_SPLITK_MAX_SPLITS).contains(&splits), "k={k} m={m}");
        assert!(splits == 1 || splits as usize * warps <= steps, "a step per warp: k={k}");
        let resident = sms * QILIN_QGEMV_SPLITK_MIN_BLOCKS as usize;
        assert!(splits == 1 || (tiles * splits) as usize <= resident, "one wave: k={k} m={m}");
    }
    // More row tiles than counters: no merge.
    assert_eq!(qgemv_splitk_geometry(1, 4, 3584, 4608, 128, 132, 100).unwrap().0 .1, 1);
    assert_eq!(qgemv_splitk_geometry(1, 8, 3584, 4608, 128, 132, 8192), None, "8-bit levels");
    assert_eq!(qgemv_splitk_geometry(1, 4, 3584, 0, 128, 132, 8192), None, "no outputs");
}

#[test]
fn qgemm_geometry_splits_narrow_layers_and_covers_every_tile() {
    // Qwen2.5-7B's layers on 132 SMs: (in, out) -> splits at up to 64 tokens and at 256.
    let expected = [
        ((3584, 4608), 8, 2),  // qkv: 36 tiles, then 144
        ((3584, 3584), 8, 3),  // o: 28, then 112
        ((3584, 37888), 1, 1), // gate_up: 296 tiles fill the GPU alone
        ((18944, 3584), 8, 3), // down
    ];
    for ((k, m), splits_64, splits_256) in expected {
        for (n, splits) in [(9, splits_64), (64, splits_64), (256, splits_256)] {
            let ((x, y, z), threads) =
                qgemm_geometry(n, 4, k, m, 128, 132, 8192, None).expect("accepted");
            assert_eq!(threads, QILIN_QGEMM_THREADS);
            assert_eq!(z, splits, "k={k} m={m} n={n}");
            let channels = x as usize * QILIN_QGEMM_BLOCK_N as usize;
            assert!(channels >= m && channels - m < QILIN_QGEMM_BLOCK_N as usize);
            let tokens = y as usize * QILIN_QGEMM_BLOCK_M as usize;
            assert!(tokens >= n && tokens - n < QILIN_QGEMM_BLOCK_M as usize);
        }
    }
    for (k, m, n, sms) in
        [(3584, 4608, 64, 132), (576, 1536, 17, 132), (1152, 77, 40, 1), (32, 8, 9, 500)]
    {
        let ((x, y, z), _) = qgemm_geometry(n, 4, k, m, 32, sms, 8192, None).unwrap();
        let steps = k / QILIN_QGEMM_BLOCK_K as usize;
        assert!((1..=QILIN_QGEMM_MAX_SPLITS).contains(&z), "k={k} m={m}");
        assert!(z == 1 || z as usize * QILIN_QGEMM_MIN_SPLIT_STEPS as usize <= steps, "k={k}");
        let resident = sms * QILIN_QGEMM_MIN_BLOCKS as usize;
        assert!(z == 1 || (x * y * z) as usize <= resident, "one wave: k={k} m={m}");
    }
    // Forced splits are clamped to the steps; more tiles than counters: no merge.
    assert_eq!(qgemm_geometry(64, 4, 64, 128, 32, 132, 8192, Some(3)).unwrap().0 .2, 2);
    assert_eq!(qgemm_geometry(64, 4, 3584, 4608, 128, 132, 8192, Some(3)).unwrap().0 .2, 3);
    assert_eq!(qgemm_geometry(64, 4, 3584, 4608, 128, 132, 20, Some(3)).unwrap().0 .2, 1);
    assert_eq!(qgemm_geometry(64, 4, 3584, 4608, 128, 132, 20, None).unwrap().0 .2, 1);
    assert_eq!(qgemm_geometry(64, 4, 3584, 0, 128, 132, 8192, None), None, "no outputs");
    assert_eq!(qgemm_geometry(0, 4, 3584, 64, 128, 132, 8192, None), None, "no tokens");
    assert!(quant_layout_ok(4, 3840, 96));
    assert_eq!(qgemm_geometry(64, 4, 3840, 64, 96, 132, 8192, None), None, "group not 2^k");
    assert_eq!(qgemm_geometry(1 << 17, 4, 1 << 15, 64, 128, 132, 8192, None), None, "n x in");
    assert!(qgemm_geometry((1 << 17) - 1, 4, 1 << 15, 64, 128, 132, 8192, None).is_some());
}
