//! Parity of kernels/elementwise.cu with its CPU twins, through the `Backend` trait:
//! `embedding`, `gather_rows`, `split_cols` (qilin_copy_cols_bf16, one launch per part)
//! and `silu_mul`, CudaBackend against CpuBackend on identical inputs (rounded to bf16
//! first), fresh random values each run (the seed is printed), over SmolLM2's and
//! Qwen2.5-7B's widths, odd row counts, empty batches, and widths that take the kernels'
//! scalar path (not a multiple of 8 values, or a column offset that is not).
//!
//! Runs only with `QILIN_GPU_TESTS=1`; then a missing driver, GPU or PTX is a failure.
//!
//! Tolerances. embedding, gather_rows and split_cols copy bf16 values, and the twin
//! copies the same values widened to f32: results must be equal bit for bit. silu_mul
//! evaluates the twin's f32 expression g / (1 + e^-g) * u in the same order (IEEE
//! division and products; the device expf is within 2 ulp of the host's exp), then
//! rounds to bf16 (half an ulp, 2^-9 relative): |gpu - cpu| <= 2^-8 |cpu| (+ the
//! smallest normal f32, for results that underflow) bounds both.
//!
//! Poison. These ops allocate their outputs inside the launcher (zeroed), so the API
//! cannot poison them; instead no input value is zero (random magnitudes >= 1/64 with a
//! random sign), so an element the kernel never wrote reads 0 where a non-zero value is
//! expected. (silu_mul's few deliberate special inputs are not zero either.)

#[path = "common/gpu.rs"]
mod gpu_common;
use gpu_common::{open_gpu, skip_without_gpu_tests};

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use half::bf16;
use qilin::backend::cpu::{CpuBackend, CpuTensor};
use qilin::backend::{Backend, LinearPart};
use qilin::model::tensor::Bytes;
use qilin::model::{DType, WeightTensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Panics (fails the test) with the reason: with QILIN_GPU_TESTS=1 a GPU is required.
fn seeded_rng(test: &str) -> ChaCha8Rng {
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    eprintln!("{test}: seed {seed}");
    ChaCha8Rng::seed_from_u64(seed)
}

/// Values already rounded to bf16 and never zero: magnitude in [1/64, max], random sign.
fn random_bf16(rng: &mut ChaCha8Rng, n: usize, max: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let magnitude = rng.random_range(1.0 / 64.0..max);
            let sign = if rng.random_bool(0.5) { -1.0 } else { 1.0 };
            bf16::from_f32(sign * magnitude).to_f32()
        })
        .collect()
}

fn bf16_weight(values: &[f32], rows: usize, cols: usize) -> WeightTensor {
    let bytes: Vec<u8> = values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect();
    WeightTensor {
        dtype: DType::BF16,
        shape: vec![rows, cols],
        data: Bytes::Owned(Arc::new(bytes)),
    }
}

/// Bit-exact comparison of a `[rows, cols]` result; names the first bad element.
fn assert_bits_equal(label: &str, gpu: &[f32], cpu: &[f32], cols: usize) {
    assert_eq!(gpu.len(), cpu.len(), "{label}: {} values on GPU, {} on CPU", gpu.len(), cpu.len());
    if let Some(i) = (0..cpu.len()).find(|&i| gpu[i].to_bits() != cpu[i].to_bits()) {
        panic!(
            "{label}: [{}][{}] = {} on GPU, {} on CPU (0 means the kernel never wrote it)",
            i / cols.max(1),
            i % cols.max(1),
            gpu[i],
            cpu[i]
        );
    }
}

#[test]
fn embedding_matches_the_cpu_twin() {
    if skip_without_gpu_tests() {
        return;
    }
    let gpu = open_gpu();
    let cpu = CpuBackend::new();
    let mut rng = seeded_rng("embedding");
    // (vocab, hidden, tokens): SmolLM2's full table, Qwen2.5-7B's hidden size (with a
    // smaller vocabulary: the kernel only sees rows), odd and empty batches, and rows
    // that are not a multiple of 8 values (scalar path).
    let cases: &[(usize, usize, usize)] = &[
        (49152, 576, 1),
        (49152, 576, 37),
        (8191, 3584, 1),
        (8191, 3584, 255),
        (8191, 3584, 0),
        (101, 36, 5),
        (7, 3, 9),
        (3, 8, 4),
    ];
    for &(vocab, hidden, n) in cases {
        let label = format!("embedding vocab {vocab} hidden {hidden} n {n}");
        let table = bf16_weight(&random_bf16(&mut rng, vocab * hidden, 4.0), vocab, hidden);
        let part = [LinearPart { weight: &table, bias: None }];
        let cpu_table = cpu.upload_linear("embed", &part).expect("cpu upload");
        let gpu_table = gpu.upload_linear("embed", &part).expect("gpu upload");
        // First and last rows, repeats, and random ids.
        let mut ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
        if n >= 3 {
            ids[0] = 0;
            ids[1] = vocab as u32 - 1;
            ids[2] = ids[n - 1];
        }
        let expected = cpu.embedding(&cpu_table, &ids);
        let got = gpu.embedding(&gpu_table, &ids);
        assert_eq!((got.rows, got.cols), (n, hidden), "{label}: shape");
        assert_bits_equal(&label, &gpu.to_host(&got), &expected.data, hidden);
        eprintln!("{label}: bit-exact");

        let out_of_range =
            catch_unwind(AssertUnwindSafe(|| gpu.embedding(&gpu_table, &[vocab as u32])));
        assert!(out_of_range.is_err(), "{label}: id {vocab} must be refused on the host");
    }
}

#[test]
fn gather_rows_matches_the_cpu_twin() {
    if skip_without_gpu_tests() {
        return;
    }
    let gpu = open_gpu();
    let cpu = CpuBackend::new();
    let mut rng = seeded_rng("gather_rows");
    // (source rows, cols, rows gathered): logits rows of a prefill batch (hidden sizes of
    // both models), more rows out than in (repeats), none, and scalar-path widths.
    let cases: &[(usize, usize, usize)] = &[
        (37, 576, 5),
        (1, 576, 1),
        (255, 3584, 17),
        (3, 3584, 64),
        (64, 3584, 0),
        (9, 13, 11),
        (5, 1, 7),
    ];
    for &(src_rows, cols, n) in cases {
        let label = format!("gather_rows [{src_rows}, {cols}] -> {n} rows");
        let x = random_bf16(&mut rng, src_rows * cols, 8.0);
        let cpu_x = CpuTensor::from_vec(x.clone(), src_rows, cols);
        let gpu_x = gpu.tensor_from_host(&x, src_rows, cols);
        let mut rows: Vec<u32> = (0..n).map(|_| rng.random_range(0..src_rows as u32)).collect();
        if n >= 2 {
            rows[0] = src_rows as u32 - 1;
            rows[n - 1] = 0;
        }
        let expected = cpu.gather_rows(&cpu_x, &rows);
        let got = gpu.gather_rows(&gpu_x, &rows);
        assert_eq!((got.rows, got.cols), (n, cols), "{label}: shape");
        assert_bits_equal(&label, &gpu.to_host(&got), &expected.data, cols);
        eprintln!("{label}: bit-exact");

        let bad = catch_unwind(AssertUnwindSafe(|| gpu.gather_rows(&gpu_x, &[src_rows as u32])));
        assert!(bad.is_err(), "{label}: row {src_rows} must be refused on the host");
    }
}

#[test]
fn split_cols_matches_the_cpu_twin() {
    if skip_without_gpu_tests() {
        return;
    }
    let gpu = open_gpu();
    let cpu = CpuBackend::new();
    let mut rng = seeded_rng("split_cols");
    // Fused QKV of Qwen2.5-7B and SmolLM2, fused gate/up of both, parts of zero width,
    // parts whose column offset or width is not a multiple of 8 (scalar path).
    let widths: &[&[usize]] = &[
        &[3584, 512, 512],
        &[576, 192, 192],
        &[18944, 18944],
        &[1536, 1536],
        &[8, 0, 16, 0],
        &[5, 3, 8, 13],
        &[1],
    ];
    for &parts in widths {
        for n in [1usize, 17, 0] {
            let cols: usize = parts.iter().sum();
            let label = format!("split_cols {parts:?} n {n}");
            let x = random_bf16(&mut rng, n * cols, 8.0);
            let expected = cpu.split_cols(&CpuTensor::from_vec(x.clone(), n, cols), parts);
            let got = gpu.split_cols(&gpu.tensor_from_host(&x, n, cols), parts);
            assert_eq!(got.len(), parts.len(), "{label}: number of parts");
            for (p, (g, c)) in got.iter().zip(&expected).enumerate() {
                assert_eq!((g.rows, g.cols), (n, parts[p]), "{label}: part {p} shape");
                assert_bits_equal(&format!("{label} part {p}"), &gpu.to_host(g), &c.data, c.cols);
            }
            eprintln!("{label}: bit-exact");
        }
    }
}

#[test]
fn silu_mul_matches_the_cpu_twin() {
    if skip_without_gpu_tests() {
        return;
    }
    let gpu = open_gpu();
    let cpu = CpuBackend::new();
    let mut rng = seeded_rng("silu_mul");
    // (rows, ffn): Qwen2.5-7B (18944) and SmolLM2 (1536) at decode and odd prefill
    // sizes, the fixture models' 160/192, and ffn not a multiple of 8 (scalar path).
    let cases: &[(usize, usize)] = &[
        (1, 18944),
        (67, 18944),
        (1, 1536),
        (255, 1536),
        (3, 160),
        (0, 1536),
        (5, 12),
        (3, 7),
        (1, 1),
    ];
    // Where e^-g overflows (g = -100: the result is -0 * u), underflows (g = 100), and
    // where silu is near its minimum or nearly linear.
    let specials = [-100.0f32, 100.0, -88.5, 88.5, -1.28125, 0.001953125, -20.0, 20.0];
    let mut worst = 0.0f32;
    for &(n, ffn) in cases {
        let label = format!("silu_mul n {n} ffn {ffn}");
        let mut gate_up = random_bf16(&mut rng, n * 2 * ffn, 10.0);
        for (row, chunk) in gate_up.chunks_mut(2 * ffn).enumerate() {
            for (i, &s) in specials.iter().enumerate().take(ffn) {
                chunk[(row * 7 + i * 13) % ffn] = s;
            }
        }
        let expected = cpu.silu_mul(&CpuTensor::from_vec(gate_up.clone(), n, 2 * ffn));
        let got = gpu.silu_mul(&gpu.tensor_from_host(&gate_up, n, 2 * ffn));
        assert_eq!((got.rows, got.cols), (n, ffn), "{label}: shape");
        let got = gpu.to_host(&got);
        for (i, (&g, &c)) in got.iter().zip(&expected.data).enumerate() {
            let tol = c.abs() / 256.0 + f32::MIN_POSITIVE;
            let err = (g - c).abs();
            assert!(
                err <= tol,
                "{label}: out[{}][{}] = {g} on GPU, {c} on CPU (|diff| {err} > {tol}; gate {}, up \
                 {}; 0 means the kernel never wrote it)",
                i / ffn,
                i % ffn,
                gate_up[(i / ffn) * 2 * ffn + i % ffn],
                gate_up[(i / ffn) * 2 * ffn + ffn + i % ffn]
            );
            if c != 0.0 {
                worst = worst.max(err / c.abs());
            }
        }
        eprintln!("{label}: ok");
    }
    eprintln!("silu_mul: worst relative error {worst:.2e}");
}
