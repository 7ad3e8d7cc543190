//! Parity of kernels/sampling.cu with its CPU twins.
//!
//! `qilin_argmax_bf16` (through `CudaBackend::argmax_rows`) against its CPU twin (`CpuBackend::argmax_rows`, which tests/sampler.rs proves equal to
//! the host sampler's greedy choice), on the same bf16 logits, fresh random each run
//! (the seed is printed): Qwen2.5's and SmolLM2's vocabularies and odd widths, at 1 to
//! 300 rows, with coarse values (many ties, as bf16 logits have), NaN, ±inf, rows of
//! nothing but -inf or NaN, and the maximum placed at the first and the last column.
//! The kernel only compares, so the ids must be equal exactly.
//!
//! `qilin_sample_bf16` (through `CudaBackend::sample_rows`) against its CPU twin
//! (`CpuBackend::sample_rows`, which tests/device_sampling.rs proves equal to the host
//! sampler for the same draw) on random bf16 logits (model-like, coarse with many ties,
//! flat, with NaN/±inf, all -inf), vocab 152064, 49152 and odd widths, 1 to 64 rows, each
//! row with its own temperature / top-k / top-p / min-p / u. The kernel computes every
//! probability bit-identically to the host, but sums them in another order and the host's
//! dense path sums in f32 chunks, so a different token is accepted only where the
//! difference is explained by rounding: the test recomputes the row in f64 (sorting) and
//! needs the GPU's token to survive the filters with the top-p target and min-p threshold
//! moved by the relative tolerance `TOL` = 5e-5 of the total (f32 sums of 512 terms per
//! lane in the host's 4096-entry chunks can be off by up to ~512 * 2^-24 = 3e-5 of the
//! total), and its cumulative-probability interval in token-id order to lie within `TOL`
//! of `u`. Every other mismatch fails. The ids buffer is allocated inside the launcher, so
//! the test poisons best-effort: a NaN-filled buffer of the same size is freed right before
//! each launch (the stream allocator tends to hand it back), and every id must be < vocab.
//!
//! `qilin_argmax_split_bf16` and `qilin_sample_split_bf16` (the same calls with
//! `FastPaths::sample_split` on: several blocks per row, the last merging) pass the same
//! two checks on the same kinds of rows, plus rows of exactly 16 chunks (196,608) and one
//! past (the one-block kernels take them), in batches up to SAMPLE_SPLIT_MAX_BATCH rows
//! (past it the dispatch keeps one block per row).
//! Random top-k up to 50 and top-p without top-k take the split's candidate path; ties
//! (coarse rows) and top-k of 1000 and more its fall back to the one-block algorithm.
//!
//! `qilin_apply_penalties_bf16` (through `CudaBackend::sample_rows_penalized`, the
//! penalties kernel then the sampler, with the opt-in switch on) against its CPU twin
//! (`penalize_row_bf16` on each row, which src/engine/sampler/penalties.rs proves equal to
//! the host sampler's penalties rounded to bf16): the penalised logits, downloaded after
//! the call, must equal the twin's bit for bit (NaN as NaN), for random distinct ids
//! (some past the vocab: ignored), counts, repetition below and above 1 and presence /
//! frequency of both signs, 0 to 5000 entries per row; the ids then as in the sampling
//! test above, against `sample_rows` on the twin's logits.
//!
//! Runs only with `QILIN_GPU_TESTS=1`; then a missing driver, GPU or PTX is a failure.

#[path = "common/gpu.rs"]
mod gpu_common;
use gpu_common::{rounds, runs_tokens, skip_without_gpu_tests};

use std::time::{SystemTime, UNIX_EPOCH};

use std::collections::HashSet;

use qilin::backend::cpu::{penalize_row_bf16, CpuBackend, CpuTensor};
use qilin::backend::cuda::{CudaBackend, SAMPLE_SPLIT_MAX_BATCH};
use qilin::backend::{Backend, PenaltyBatch, PenaltyToken, RowSampling};
use qilin::engine::sampler::inv_temperature;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The backends, the seed (printed) and its RNG; None (skipped) without QILIN_GPU_TESTS=1.
fn setup(name: &str) -> Option<(CudaBackend, CpuBackend, u64, ChaCha8Rng)> {
    if skip_without_gpu_tests() {
        return None;
    }
    let gpu = CudaBackend::new(0).unwrap_or_else(|e| panic!("QILIN_GPU_TESTS=1 but no GPU: {e}"));
    let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    eprintln!("{name}: seed {seed}");
    Some((gpu, CpuBackend::new(), seed, ChaCha8Rng::seed_from_u64(seed)))
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

/// Both kernel families: one block per row, then several (`FastPaths::sample_split`).
const SPLIT: [bool; 2] = [false, true];

/// Whether the dispatch takes the split kernels for `rows` rows when `split` asks for them
/// (up to SAMPLE_SPLIT_MAX_BATCH rows; past it the one-block kernels, which the `false`
/// pass already checked).
fn dispatch_splits(split: bool, rows: usize) -> bool {
    !split || rows <= SAMPLE_SPLIT_MAX_BATCH
}

#[test]
fn argmax_matches_the_cpu_twin() {
    let Some((mut gpu, cpu, seed, mut rng)) = setup("argmax") else { return };
    let shapes = [
        (1, 152_064),
        (64, 152_064),
        (257, 49_152),
        (1, 196_608),
        (2, 196_609),
        (1025, 12_289),
        (3, 513),
        (300, 7),
        (1, 1),
    ];
    for ((rows, cols), split) in shapes.into_iter().flat_map(|s| SPLIT.map(|b| (s, b))) {
        if !runs_tokens(rows) || !dispatch_splits(split, rows) {
            continue;
        }
        gpu.dev.paths.sample_split = split;
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
                "seed {seed}, [{rows}, {cols}] (split {split}) row {r}: GPU chose {g} (value \
                 {:?}), the twin {e} (value {:?})",
                row.get(*g as usize),
                row[*e as usize]
            );
        }
        eprintln!("[{rows}, {cols}] (split {split}): {rows} rows equal");
    }
}

/// Relative tolerance (of the survivors' total mass) of the sampling comparison; see the
/// module comment.
const TOL: f64 = 5e-5;

/// A row of bf16-representable logits in one of several styles.
fn sample_logits(rng: &mut ChaCha8Rng, cols: usize) -> Vec<f32> {
    let style = rng.random_range(0..6);
    let sigma = [1.0f32, 2.0, 4.0][rng.random_range(0..3)];
    let mut row: Vec<f32> = (0..cols)
        .map(|_| match style {
            0 => rng.random_range(-16i32..16) as f32 * 0.5,
            1 => rng.random_range(-0.02f32..0.02),
            2 => logit(rng),
            _ => {
                // Roughly normal: the sum of three uniforms.
                let s: f32 = (0..3).map(|_| rng.random_range(-1.0f32..1.0)).sum();
                s * sigma
            }
        })
        .collect();
    // A few confident tokens, as a language model has.
    for _ in 0..rng.random_range(0..4) {
        let i = rng.random_range(0..cols);
        row[i] = rng.random_range(5.0f32..20.0);
    }
    if rng.random_range(0..30) == 0 {
        row.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
    }
    row.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
}

fn sample_params(rng: &mut ChaCha8Rng, cols: usize) -> RowSampling {
    let pick = |rng: &mut ChaCha8Rng, xs: &[f32]| xs[rng.random_range(0..xs.len())];
    let top_k = [0u32, 0, 1, 2, 20, 50, 1000, 40_000, cols as u32][rng.random_range(0..9)];
    RowSampling {
        temperature: pick(rng, &[0.7, 1.0, 1.5, 0.3, 1e-3, 0.0]),
        top_k,
        top_p: pick(rng, &[1.0, 1.0, 0.9, 0.5, 0.99, 0.95, 1e-6]),
        min_p: pick(rng, &[0.0, 0.0, 0.05, 0.3]),
        u: rng.random::<f64>(),
    }
}

/// Whether `got` is a token the row could give under rounding (see the module comment).
fn explained(row: &[f32], r: &RowSampling, got: u32) -> Result<(), String> {
    let clean = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v.min(f32::MAX) };
    let v: Vec<f32> = row.iter().map(|&x| clean(x)).collect();
    let m = v.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let Some(inv_t) = inv_temperature(r.temperature) else {
        return Err("greedy rows must match exactly".into());
    };
    if m == f32::NEG_INFINITY {
        return Err("all -inf rows must give 0".into());
    }
    let prob = |x: f32| {
        let e = (x - m) * inv_t;
        if e < -87.6 {
            0.0
        } else {
            (e as f64).exp()
        }
    };
    let mut order: Vec<u32> = (0..v.len() as u32).collect();
    order.sort_by(|&a, &b| v[b as usize].total_cmp(&v[a as usize]).then(a.cmp(&b)));
    let k = r.top_k as usize;
    let kept = if k > 0 && k < v.len() {
        let thr = v[order[k - 1] as usize];
        order.iter().take_while(|&&i| v[i as usize] >= thr).count()
    } else {
        order.len()
    };
    let cand = &order[..kept];
    let total_k: f64 = cand.iter().map(|&i| prob(v[i as usize])).sum();
    let target = r.top_p.max(f32::MIN_POSITIVE) as f64 * total_k;
    // Survivors under a top-p target and min-p threshold moved by `slack` (+TOL: loose).
    let survivors = |slack: f64| -> Vec<bool> {
        let mut keep = vec![false; v.len()];
        let mut above = 0.0;
        let min_p = r.min_p.min(1.0) as f64;
        for (n, &i) in cand.iter().enumerate() {
            let p = prob(v[i as usize]);
            if r.top_p < 1.0 && n > 0 && above >= target + slack * total_k {
                break;
            }
            above += p;
            keep[i as usize] = p > 0.0 && (min_p <= 0.0 || p >= min_p * (1.0 - slack));
        }
        keep
    };
    let (loose, tight) = (survivors(TOL), survivors(-TOL));
    if !loose[got as usize] {
        return Err(format!("token {got} does not survive the filters even with slack {TOL}"));
    }
    // Its CDF interval (token-id order) under either survivor set must come within TOL of u.
    for set in [&loose, &tight] {
        let total: f64 = (0..v.len()).filter(|&i| set[i]).map(|i| prob(v[i])).sum();
        let before: f64 = (0..got as usize).filter(|&i| set[i]).map(|i| prob(v[i])).sum();
        let after = before + if set[got as usize] { prob(v[got as usize]) } else { 0.0 };
        let (lo, hi) = (before / total - TOL, after / total + TOL);
        if lo <= r.u && r.u <= hi {
            return Ok(());
        }
    }
    Err(format!("token {got}'s cumulative probability is not within {TOL} of u"))
}

/// The GPU's ids `got` against the twin's `expected` for `values` (`[rows, cols]`) sampled
/// as `meta` says: one per row, in the vocabulary, and each different one explained by
/// rounding (`explained`); returns how many differ.
fn check_ids(
    seed: u64,
    cols: usize,
    values: &[f32],
    meta: &[RowSampling],
    got: &[u32],
    expected: &[u32],
) -> usize {
    let rows = meta.len();
    assert_eq!(got.len(), rows, "[{rows}, {cols}]: one id per row");
    let mut mismatches = 0;
    for (r, (&g, &e)) in got.iter().zip(expected).enumerate() {
        assert!((g as usize) < cols, "seed {seed}, [{rows}, {cols}] row {r}: id {g}");
        if g == e {
            continue;
        }
        mismatches += 1;
        let row = &values[r * cols..(r + 1) * cols];
        if let Err(why) = explained(row, &meta[r], g) {
            panic!(
                "seed {seed}, [{rows}, {cols}] row {r} {:?}: GPU chose {g}, the twin {e}: {why}",
                meta[r]
            );
        }
    }
    mismatches
}

#[test]
fn sampling_matches_the_cpu_twin() {
    let Some((mut gpu, cpu, seed, mut rng)) = setup("sample") else { return };
    let shapes = [
        (1, 152_064),
        (64, 152_064),
        (7, 152_064),
        (1, 49_152),
        (33, 49_152),
        (3, 196_608),
        (2, 196_609),
        (1025, 12_289),
        (5, 4097),
        (9, 513),
        (4, 7),
        (2, 1),
    ];
    let (mut total_rows, mut mismatches) = (0, 0);
    for ((rows, cols), split) in shapes.into_iter().flat_map(|s| SPLIT.map(|b| (s, b))) {
        if !runs_tokens(rows) || !dispatch_splits(split, rows) {
            continue;
        }
        gpu.dev.paths.sample_split = split;
        for _ in 0..rounds(3) {
            let values: Vec<f32> = (0..rows).flat_map(|_| sample_logits(&mut rng, cols)).collect();
            let meta: Vec<RowSampling> = (0..rows).map(|_| sample_params(&mut rng, cols)).collect();
            let expected = cpu.sample_rows(&CpuTensor::from_vec(values.clone(), rows, cols), &meta);
            let logits = gpu.tensor_from_host(&values, rows, cols);
            // Best-effort poison: free a NaN buffer the ids allocation may reuse.
            drop(gpu.tensor_from_host(&vec![f32::NAN; 2 * rows], rows, 2));
            let got = gpu.sample_rows(&logits, &meta);
            total_rows += rows;
            mismatches += check_ids(seed, cols, &values, &meta, &got, &expected);
        }
        eprintln!("[{rows}, {cols}] (split {split}): done");
    }
    eprintln!("{total_rows} rows, {mismatches} different tokens, each within tolerance");
}

/// `rows` rows of random penalties over distinct ids below `cols + 2`.
fn random_penalties(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> PenaltyBatch {
    let pick = |rng: &mut ChaCha8Rng, xs: &[f32]| xs[rng.random_range(0..xs.len())];
    let mut batch = PenaltyBatch::default();
    for _ in 0..rows {
        let n = [0usize, 1, 7, 300, 2000, 5000][rng.random_range(0..6)].min(cols + 2);
        let (mut seen, mut entries) = (HashSet::new(), Vec::new());
        while entries.len() < n {
            let id = rng.random_range(0..cols as u32 + 2);
            let count = if rng.random_range(0..3) == 0 { rng.random_range(1..6) } else { 0 };
            if seen.insert(id) {
                entries.push(PenaltyToken { id, count });
            }
        }
        let repetition = pick(rng, &[1.0, 1.05, 0.8, 1.3]);
        let presence = pick(rng, &[0.0, 0.5, -1.0]);
        let frequency = pick(rng, &[0.0, 0.3, -0.5]);
        batch.push_row(repetition, presence, frequency, entries);
    }
    batch
}

#[test]
fn penalties_match_the_cpu_twin() {
    let Some((mut gpu, cpu, seed, mut rng)) = setup("penalties") else { return };
    // The switch (on unless QILIN_CUDA_DEVICE_PENALTIES=0) only tells the engine to route
    // penalised steps here; the launcher itself runs either way.
    gpu.dev.paths.device_penalties = true;
    assert!(gpu.device_penalties());
    let shapes = [(1, 152_064), (64, 152_064), (7, 49_152), (200, 4097), (9, 513), (3, 7), (2, 1)];
    let (mut total_rows, mut mismatches) = (0, 0);
    for (rows, cols) in shapes {
        if !runs_tokens(rows) {
            continue;
        }
        for _ in 0..rounds(3) {
            let values: Vec<f32> = (0..rows).flat_map(|_| sample_logits(&mut rng, cols)).collect();
            let meta: Vec<RowSampling> = (0..rows).map(|_| sample_params(&mut rng, cols)).collect();
            let penalties = random_penalties(&mut rng, rows, cols);
            let mut twin = values.clone();
            for (r, row) in twin.chunks_mut(cols).enumerate() {
                penalize_row_bf16(row, &penalties.rows[r], penalties.row_tokens(r));
            }
            let expected = cpu.sample_rows(&CpuTensor::from_vec(twin.clone(), rows, cols), &meta);
            let mut logits = gpu.tensor_from_host(&values, rows, cols);
            // Best-effort poison: free a NaN buffer the ids allocation may reuse.
            drop(gpu.tensor_from_host(&vec![f32::NAN; 2 * rows], rows, 2));
            let got = gpu.sample_rows_penalized(&mut logits, &meta, &penalties);
            let on_device = gpu.to_host(&logits);
            for (i, (d, t)) in on_device.iter().zip(&twin).enumerate() {
                assert!(
                    d.to_bits() == t.to_bits() || (d.is_nan() && t.is_nan()),
                    "seed {seed}, [{rows}, {cols}] row {} id {}: penalised {d} on the GPU, {t} \
                     by the twin (raw {}, {:?})",
                    i / cols,
                    i % cols,
                    values[i],
                    penalties.rows[i / cols]
                );
            }
            total_rows += rows;
            mismatches += check_ids(seed, cols, &twin, &meta, &got, &expected);
        }
        eprintln!("[{rows}, {cols}]: penalised logits equal");
    }
    eprintln!("{total_rows} rows, {mismatches} different tokens, each within tolerance");
}

/// The tolerance check itself, without a GPU: the twin's own token is always explained,
/// and a token far from `u` is not.
#[test]
fn tolerance_check_accepts_the_twin_and_rejects_others() {
    let cpu = CpuBackend::new();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rejected = 0;
    for cols in [513usize, 4097, 49_152] {
        for _ in 0..20 {
            let row = sample_logits(&mut rng, cols);
            let mut r = sample_params(&mut rng, cols);
            r.temperature = 0.8;
            let e = cpu.sample_rows(&CpuTensor::from_vec(row.clone(), 1, cols), &[r])[0];
            if row.iter().all(|&v| v == f32::NEG_INFINITY) {
                continue;
            }
            explained(&row, &r, e).unwrap_or_else(|why| panic!("{r:?}: twin's {e}: {why}"));
            // The same row drawn at the other end of [0, 1): usually another token.
            let far = RowSampling { u: (r.u + 0.5) % 1.0, ..r };
            let other = cpu.sample_rows(&CpuTensor::from_vec(row.clone(), 1, cols), &[far])[0];
            if other != e && explained(&row, &r, other).is_err() {
                rejected += 1;
            }
        }
    }
    assert!(rejected > 10, "only {rejected} far tokens rejected");
}
