//! Parity of kernels/sampling.cu (`qilin_argmax_bf16`, through `CudaBackend::argmax_rows`)
//! with its CPU twin (`CpuBackend::argmax_rows`, which tests/sampler.rs proves equal to
//! the host sampler's greedy choice), on the same bf16 logits, fresh random each run
//! (the seed is printed): Qwen2.5's and SmolLM2's vocabularies and odd widths, at 1 to
//! 300 rows, with coarse values (many ties, as bf16 logits have), NaN, ±inf, rows of
//! nothing but -inf or NaN, and the maximum placed at the first and the last column.
//! The kernel only compares, so the ids must be equal exactly.
//!
//! Runs only with `QILIN_GPU_TESTS=1`; then a missing driver, GPU or PTX is a failure.

use std::time::{SystemTime, UNIX_EPOCH};

use qilin::backend::cpu::{CpuBackend, CpuTensor};
use qilin::backend::cuda::CudaBackend;
use qilin::backend::Backend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn gpu_tests_enabled() -> bool {
    std::env::var("QILIN_GPU_TESTS").as_deref() == Ok("1")
}

/// One logit: mostly coarse (ties), sometimes NaN or an infinity.
fn logit(rng: &mut ChaCha8Rng) -> f32 {
    match rng.random_range(0..100) {
        0 => f32::NAN,
        1 => f32::NEG_INFINITY,
        2 if rng.random_range(0..50) == 0 => f32::INFINITY,
        3..=60 => rng.random_range(-16i32..16) as f32 * 0.5,
        _ => rng.random_range(-12.0f32..12.0),
    }
}

#[test]
fn argmax_matches_the_cpu_twin() {
    if !gpu_tests_enabled() {
        eprintln!("skipped: GPU tests run only with QILIN_GPU_TESTS=1");
        return;
    }
    let gpu = CudaBackend::new(0).unwrap_or_else(|e| panic!("QILIN_GPU_TESTS=1 but no GPU: {e}"));
    let cpu = CpuBackend::new();
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    eprintln!("argmax: seed {seed}");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let shapes = [(1, 152_064), (64, 152_064), (257, 49_152), (3, 513), (300, 7), (1, 1)];
    for (rows, cols) in shapes {
        let mut values: Vec<f32> = (0..rows * cols).map(|_| logit(&mut rng)).collect();
        // Edge rows: all -inf, all NaN, the maximum first, the maximum last.
        let special = |r: usize, values: &mut Vec<f32>, f: &dyn Fn(usize) -> f32| {
            if r < rows {
                for i in 0..cols {
                    values[r * cols + i] = f(i);
                }
            }
        };
        special(1, &mut values, &|_| f32::NEG_INFINITY);
        special(2, &mut values, &|_| f32::NAN);
        special(3, &mut values, &|i| if i == 0 { 100.0 } else { 1.0 });
        special(4, &mut values, &|i| if i + 1 == cols { 100.0 } else { 1.0 });
        // The device holds bf16: give the twin the same rounded values.
        let rounded: Vec<f32> = values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        let expected = cpu.argmax_rows(&CpuTensor::from_vec(rounded.clone(), rows, cols));
        let got = gpu.argmax_rows(&gpu.tensor_from_host(&values, rows, cols));
        assert_eq!(got.len(), rows, "[{rows}, {cols}]: one id per row");
        for (r, (g, e)) in got.iter().zip(&expected).enumerate() {
            let row = &rounded[r * cols..(r + 1) * cols];
            assert_eq!(
                g,
                e,
                "seed {seed}, [{rows}, {cols}] row {r}: GPU chose {g} (value {:?}), the twin {e} \
                 (value {:?})",
                row.get(*g as usize),
                row[*e as usize]
            );
        }
        eprintln!("[{rows}, {cols}]: {rows} rows equal");
    }
}
