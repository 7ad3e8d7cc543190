//! Activations quantized to 8 bits, 32 values per block, for integer dot products with
//! block-quantized weights: llama.cpp's `q8_1`, which its CPU backend multiplies every
//! Q4_0/Q4_1/Q8_0 matrix with. Each block keeps `d = max|x| / 127`, the 32 values
//! `q = round(x / d)` and `s = d * sum(q)`. A weight block then costs one integer dot
//! product of 32 byte pairs (VNNI's `vpdpbusd`, or AVX2's `vpmaddubsw` + `vpmaddwd`) and
//! two scalar products, instead of 32 byte-to-float conversions and FMAs:
//!
//! - Q8_0: `d_w * d * sum(w_q * q)`
//! - Q4_0: `d_w * d * sum(nib * q) - 8 * d_w * s`
//! - Q4_1: `d_w * d * sum(nib * q) + m_w * s`
//! - I8 (128 values = four activation blocks, one f32 scale `s_w`): `s_w * d * sum(w_q * q)`
//!   per activation block
//! - I4 (128 values, f16 `s_w`, zero `z`): `s_w * d * sum(nib * q) - s_w * z * s` per
//!   activation block
//! - Q4_K, Q5_K (sub-blocks of 32 with scale `d_s` and min `m_s`): `d_s * d * sum(nib * q) - m_s * s`
//! - Q6_K (sub-blocks of 16 with scale `d_s`, levels -32..=31): `d * sum over both halves of
//!   the activation block of d_s * sum(level * q)`
//! - Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, IQ4_XS (decoded_levels.rs: levels, a scale `d_g`
//!   and an offset `o_g` per group of 32 or 16): `d * sum over the block's groups of
//!   (d_g * sum(level * q) - o_g * sum(q))`
//!
//! The integer sums are exact on every path (portable, AVX2, VNNI), so the paths differ
//! only in the order of the f32 sums over blocks. The error against f32 activations is
//! the activation rounding, at most `d / 2` per value (0.4% of the block's largest).
//! On SmolLM2 that moves each window's mean NLL by under 0.007 nats and logprobs by up
//! to ~0.5 (tests/perplexity.rs and tests/smollm2.rs hold both to transformers), so the
//! CPU backend keeps f32 activations for the logits projection and as the reference
//! (`--cpu-activations f32`).
//!
//! Measured (benches/quant_dot.rs `dot_row_q8_l2`, the 2-core AVX512-VNNI dev machine,
//! one session): Q4_1 14.8 GiB/s against 8.2 with f32 activations at 1536 columns
//! (1.8x), Q4_0 12.6 vs 8.6, Q8_0 28.0 vs 19.4, I4 8.7 vs 7.4, I8 26.6 vs 25.7.

#[cfg(target_arch = "x86_64")]
mod x86;

use super::decoded_levels::{self, BlockLevels};
use super::intq::{BLOCK as INT_BLOCK, I4_BLOCK_BYTES, I8_BLOCK_BYTES};
use super::kquants::{superblock_levels, QK_K};
use super::{check_row, check_rows, f16_to_f32, le_u16, QK};
use crate::model::DType;

/// Largest magnitude of a quantized activation: symmetric, so -128 never occurs and
/// `|q| * |w|` stays within `vpmaddubsw`'s i16 pair sums for 8-bit weights.
const Q_MAX: f32 = 127.0;

/// Whether weights of `dtype` have an integer dot product with quantized activations.
pub fn supports(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q4_0
            | DType::Q4_1
            | DType::Q8_0
            | DType::I8
            | DType::I4
            | DType::Q4_K
            | DType::Q5_K
            | DType::Q6_K
    ) || decoded_levels::covers(dtype)
}

/// Rows of activations, each quantized in blocks of 32.
#[derive(Clone, Debug, Default)]
pub struct Q8Activations {
    qs: Vec<i8>,           // [rows, cols]
    scales: Vec<[f32; 2]>, // [rows, cols / 32]: (d, d * sum(q)) per block
    cols: usize,
}

/// One quantized row: `qs [cols]`, `scales [cols / 32]`.
#[derive(Clone, Copy, Debug)]
pub struct Q8Row<'a> {
    pub qs: &'a [i8],
    pub scales: &'a [[f32; 2]],
}

impl Q8Activations {
    /// Quantizes `rows` rows of `cols` values from `x` (`[rows, cols]`, row-major) into
    /// this buffer, reusing its allocation. `cols` must be a multiple of 32.
    pub fn quantize(&mut self, x: &[f32], cols: usize) {
        assert!(cols > 0 && cols.is_multiple_of(QK), "{cols} columns are not whole blocks of {QK}");
        assert!(x.len().is_multiple_of(cols), "{} values are not whole rows of {cols}", x.len());
        self.cols = cols;
        self.qs.resize(x.len(), 0);
        self.scales.resize(x.len() / QK, [0.0; 2]);
        for ((xs, qs), scale) in
            x.chunks_exact(QK).zip(self.qs.chunks_exact_mut(QK)).zip(&mut self.scales)
        {
            *scale = quantize_block(xs, qs);
        }
    }

    pub fn rows(&self) -> usize {
        self.qs.len().checked_div(self.cols).unwrap_or(0)
    }

    pub fn row(&self, r: usize) -> Q8Row<'_> {
        let blocks = self.cols / QK;
        Q8Row {
            qs: &self.qs[r * self.cols..(r + 1) * self.cols],
            scales: &self.scales[r * blocks..(r + 1) * blocks],
        }
    }
}

/// One block: `qs = round(xs / d)`; returns `(d, d * sum(qs))`. A block of zeros (or one
/// whose maximum is not finite, which no sane model produces) gets `d = 0`.
#[inline]
fn quantize_block(xs: &[f32], qs: &mut [i8]) -> [f32; 2] {
    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / Q_MAX;
    let inv = if d > 0.0 && d.is_finite() { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    // Adding 1.5 * 2^23 rounds any |x| < 2^22 to an integer (ties to even) in the FPU,
    // where `f32::round` would be a libm call per value on baseline x86-64.
    const ROUND: f32 = 12_582_912.0;
    for (q, &v) in qs.iter_mut().zip(xs) {
        // |v * inv| <= 127 up to rounding, so the saturating cast never clips.
        *q = ((v * inv + ROUND) - ROUND) as i8;
        sum += *q as i32;
    }
    let d = if inv == 0.0 { 0.0 } else { d };
    [d, d * sum as f32]
}

/// Dot product of one weight row (`x.qs.len()` values of `dtype`) with a quantized
/// activation row; None when `dtype` has no integer path (`supports`).
///
/// Panics when the row does not hold exactly that many values: rows come from tensors
/// the loader validated, so a mismatch is a bug in the caller.
pub fn dot_row_q8(dtype: DType, row: &[u8], x: Q8Row<'_>) -> Option<f32> {
    if !supports(dtype) {
        return None;
    }
    let mut out = [0f32];
    dot_rows_q8(dtype, row, x, &mut out, 1);
    Some(out[0])
}

/// `out[i * stride]` = the dot product of row `i` of `rows` (consecutive rows of
/// `x.qs.len()` values of `dtype`) with `x`, choosing the kernel once for all of them:
/// a row of SmolLM2 (576 values) is only ~20 ns of work, so a per-row dispatch would
/// cost a tenth of it.
///
/// Panics when `dtype` has no integer path, when `rows` is not whole rows, or when
/// `out` is too short: all bugs in the caller (`CpuLinear` checks the formats).
pub fn dot_rows_q8(dtype: DType, rows: &[u8], x: Q8Row<'_>, out: &mut [f32], stride: usize) {
    dot_rows_q8_tokens(dtype, rows, &[x], out, stride);
}

/// `out[i * stride + t]` = the dot product of row `i` of `rows` with `xs[t]`: each
/// weight block is read and unpacked once for up to four tokens. Every token's result
/// is bit-identical to `dot_rows_q8` on it alone, so a generated token computes the
/// same whatever shares its step. Panics as `dot_rows_q8` does, and when `stride` is
/// below `xs.len()` (a row's outputs would overlap the next row's).
pub fn dot_rows_q8_tokens(
    dtype: DType,
    rows: &[u8],
    xs: &[Q8Row<'_>],
    out: &mut [f32],
    stride: usize,
) {
    assert!(supports(dtype), "no integer dot product for {dtype}");
    let Some(first) = xs.first() else { return };
    let values = first.qs.len();
    for x in xs {
        assert_eq!(x.qs.len(), values, "activation rows of one width");
        assert_eq!(x.scales.len() * QK, values, "one scale pair per block of activations");
    }
    assert!(stride >= xs.len(), "stride {stride} below {} tokens", xs.len());
    let row_bytes = check_rows(dtype, rows, values, out, stride);
    let n_rows = rows.len() / row_bytes;
    assert!(
        n_rows == 0 || (n_rows - 1) * stride + xs.len() <= out.len(),
        "{} outputs for {n_rows} rows of {} tokens at stride {stride}",
        out.len(),
        xs.len()
    );
    #[cfg(target_arch = "x86_64")]
    if x86::dot_rows(x86::Rows { dtype, bytes: rows, row_bytes, xs }, out, stride) {
        return;
    }
    for (i, row) in rows.chunks_exact(row_bytes).enumerate() {
        for (t, &x) in xs.iter().enumerate() {
            out[i * stride + t] = dot_row_q8_portable(dtype, row, x);
        }
    }
}

/// The portable kernels (any CPU); the SIMD ones compute the same integer sums.
pub fn dot_row_q8_portable(dtype: DType, row: &[u8], x: Q8Row<'_>) -> f32 {
    check_row(dtype, row, x.qs.len());
    assert_eq!(x.scales.len() * QK, x.qs.len(), "one scale pair per block of activations");
    let blocks = x.qs.chunks_exact(QK).zip(x.scales);
    let mut acc = 0f32;
    match dtype {
        DType::Q8_0 => {
            for (blk, (qs, &[d, _])) in row.chunks_exact(34).zip(blocks) {
                let w = f16_to_f32(le_u16(blk, 0));
                let dot = int_dot(qs, |i| (blk[2 + i] as i8) as i32);
                acc += w * d * dot as f32;
            }
        }
        DType::Q4_0 | DType::Q4_1 => {
            let (bytes, qs_at) = if dtype == DType::Q4_1 { (20, 4) } else { (18, 2) };
            for (blk, (qs, &[d, s])) in row.chunks_exact(bytes).zip(blocks) {
                let w = f16_to_f32(le_u16(blk, 0));
                let nib = |i: usize| {
                    let b = blk[qs_at + i % 16];
                    (if i < 16 { b & 0xf } else { b >> 4 }) as i32
                };
                let dot = int_dot(qs, nib);
                let min = if dtype == DType::Q4_1 { f16_to_f32(le_u16(blk, 2)) } else { -8.0 * w };
                acc += w * d * dot as f32 + min * s;
            }
        }
        DType::I8 => {
            for (g, blk) in row.chunks_exact(I8_BLOCK_BYTES).enumerate() {
                let w = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
                for j in 0..SUB_BLOCKS {
                    let (qs, [d, _]) = sub_block(x, g, j);
                    let dot = int_dot(qs, |i| (blk[4 + QK * j + i] as i8) as i32);
                    acc += w * d * dot as f32;
                }
            }
        }
        DType::I4 => {
            for (g, blk) in row.chunks_exact(I4_BLOCK_BYTES).enumerate() {
                let w = f16_to_f32(le_u16(blk, 0));
                let z = blk[2] as f32;
                for j in 0..SUB_BLOCKS {
                    let (qs, [d, s]) = sub_block(x, g, j);
                    let nib = |i: usize| {
                        let b = blk[4 + QK / 2 * j + i / 2];
                        (if i.is_multiple_of(2) { b & 0xf } else { b >> 4 }) as i32
                    };
                    let dot = int_dot(qs, nib);
                    acc += w * d * dot as f32 - w * z * s;
                }
            }
        }
        DType::Q4_K | DType::Q5_K | DType::Q6_K => {
            let mut level = [0i8; QK_K];
            let (mut scale, mut offset) = ([0f32; 16], [0f32; 16]);
            for (sb, blk) in row.chunks_exact(dtype.block_bytes()).enumerate() {
                let group = superblock_levels(dtype, blk, &mut level, &mut scale, &mut offset);
                for j in 0..QK_K / QK {
                    let b = sb * (QK_K / QK) + j;
                    let (qs, [d, s]) = (&x.qs[b * QK..(b + 1) * QK], x.scales[b]);
                    let levels = &level[j * QK..(j + 1) * QK];
                    if group == QK {
                        let dot = int_dot(qs, |i| levels[i] as i32);
                        acc += scale[j] * d * dot as f32 - offset[j] * s;
                    } else {
                        let half = |h: usize| {
                            let range = h * 16..(h + 1) * 16;
                            int_dot(&qs[range.clone()], |i| levels[range.start + i] as i32)
                        };
                        acc +=
                            (scale[2 * j] * half(0) as f32 + scale[2 * j + 1] * half(1) as f32) * d;
                    }
                }
            }
        }
        dtype if decoded_levels::covers(dtype) => {
            let (per_block, group) = (dtype.block_elems() / QK, decoded_levels::group(dtype));
            let mut decoded = BlockLevels::new();
            for (bi, blk) in row.chunks_exact(dtype.block_bytes()).enumerate() {
                decoded.decode(dtype, blk);
                for j in 0..per_block {
                    let b = bi * per_block + j;
                    let (qs, d) = (&x.qs[b * QK..(b + 1) * QK], x.scales[b][0]);
                    let mut sum = 0f32;
                    for g in (j * QK / group)..((j + 1) * QK / group) {
                        let range = (g * group - j * QK)..((g + 1) * group - j * QK);
                        let levels = &decoded.level[g * group..(g + 1) * group];
                        let dot = int_dot(&qs[range.clone()], |i| levels[i] as i32);
                        let q_sum: i32 = qs[range].iter().map(|&q| q as i32).sum();
                        sum += decoded.scale[g] * dot as f32 - decoded.offset[g] * q_sum as f32;
                    }
                    acc += d * sum;
                }
            }
        }
        other => unreachable!("no integer dot product for {other}"),
    }
    acc
}

/// Activation blocks per I8/I4 block.
const SUB_BLOCKS: usize = INT_BLOCK / QK;

/// Activation block `j` of the 128-value weight block `g`: its values and scales.
#[inline(always)]
fn sub_block(x: Q8Row<'_>, g: usize, j: usize) -> (&[i8], [f32; 2]) {
    let b = g * SUB_BLOCKS + j;
    (&x.qs[b * QK..(b + 1) * QK], x.scales[b])
}

/// `sum(weight(i) * qs[i])` over one block, exactly.
#[inline(always)]
fn int_dot(qs: &[i8], weight: impl Fn(usize) -> i32) -> i32 {
    qs.iter().enumerate().map(|(i, &q)| weight(i) * q as i32).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::dequantize_row;
    use crate::model::quant::test_rows::{random_row, xorshift};

    const DTYPES: [DType; 14] = [
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
        DType::I8,
        DType::I4,
        DType::Q4_K,
        DType::Q6_K,
        DType::Q5_0,
        DType::Q5_1,
        DType::IQ4_NL,
        DType::Q2_K,
        DType::Q3_K,
        DType::IQ4_XS,
        DType::Q5_K,
    ];

    /// The integer path against an f64 dot of the dequantized weights with the
    /// dequantized activations (`d * q`): the same products, summed without rounding.
    #[test]
    fn integer_dot_equals_the_dot_of_the_dequantized_operands() {
        let mut next = xorshift(0x51ed_2701_aa3c_9e15);
        for dtype in DTYPES {
            for n in [128usize, 256, 576, 1536] {
                if dtype.row_bytes(n).is_none() {
                    continue;
                }
                let row = random_row(dtype, n, &mut next);
                let x: Vec<f32> =
                    (0..n).map(|_| ((next() % 20001) as f32 / 10000.0 - 1.0) * 3.0).collect();
                let mut q = Q8Activations::default();
                q.quantize(&x, n);
                let mut w = vec![0f32; n];
                dequantize_row(dtype, &row, &mut w);
                let xq: Vec<f64> = (0..n)
                    .map(|i| q.row(0).scales[i / QK][0] as f64 * q.row(0).qs[i] as f64)
                    .collect();
                let exact: f64 = w.iter().zip(&xq).map(|(&a, &b)| a as f64 * b).sum();
                let scale: f64 = w.iter().zip(&xq).map(|(&a, &b)| (a as f64 * b).abs()).sum();
                let portable = dot_row_q8_portable(dtype, &row, q.row(0)) as f64;
                let dispatched = dot_row_q8(dtype, &row, q.row(0)).unwrap() as f64;
                let mut paths = vec![("portable", portable), ("dispatched", dispatched)];
                #[cfg(target_arch = "x86_64")]
                for (path, v) in x86::every_path(dtype, &row, &[q.row(0)]) {
                    paths.push((path, v[0] as f64));
                }
                for (path, v) in paths {
                    assert!(
                        (v - exact).abs() <= 1e-5 * scale + 1e-12,
                        "{dtype} n={n} {path}: {v} vs {exact} (scale {scale})"
                    );
                }
            }
        }
    }

    /// The batched entry writes what `dot_row_q8` gives for each row, at its stride,
    /// and nothing between.
    #[test]
    fn dot_rows_equals_dot_row_per_row() {
        let mut next = xorshift(0x0bad_cafe_1234_5678);
        for dtype in DTYPES {
            let n = 256;
            let rows: Vec<u8> = (0..5).flat_map(|_| random_row(dtype, n, &mut next)).collect();
            let x: Vec<f32> = (0..n).map(|_| (next() % 2000) as f32 / 1000.0 - 1.0).collect();
            let mut q = Q8Activations::default();
            q.quantize(&x, n);
            let mut out = vec![f32::NAN; 5 * 3];
            dot_rows_q8(dtype, &rows, q.row(0), &mut out, 3);
            let row_bytes = rows.len() / 5;
            for (i, row) in rows.chunks_exact(row_bytes).enumerate() {
                assert_eq!(Some(out[3 * i]), dot_row_q8(dtype, row, q.row(0)), "{dtype} row {i}");
                assert!(i == 4 || out[3 * i + 1].is_nan() && out[3 * i + 2].is_nan());
            }
        }
    }

    /// Tokens batched through `dot_rows_q8_tokens` (groups of four, two and one) give
    /// each token exactly what it gets alone, on every path this CPU has, at a stride,
    /// and write nothing between.
    #[test]
    fn tokens_together_equal_tokens_alone() {
        let mut next = xorshift(0x7031_5eed_0bad_f00d);
        for dtype in DTYPES {
            let n = 256;
            let rows: Vec<u8> = (0..3).flat_map(|_| random_row(dtype, n, &mut next)).collect();
            let row_bytes = rows.len() / 3;
            for tokens in [1usize, 2, 3, 4, 5, 7, 9] {
                let x: Vec<f32> =
                    (0..tokens * n).map(|_| (next() % 2000) as f32 / 500.0 - 2.0).collect();
                let mut q = Q8Activations::default();
                q.quantize(&x, n);
                let xs: Vec<Q8Row<'_>> = (0..tokens).map(|t| q.row(t)).collect();
                let stride = tokens + 1;
                let mut out = vec![f32::NAN; 3 * stride];
                dot_rows_q8_tokens(dtype, &rows, &xs, &mut out, stride);
                for (i, row) in rows.chunks_exact(row_bytes).enumerate() {
                    for (t, &x) in xs.iter().enumerate() {
                        let alone = dot_row_q8(dtype, row, x).unwrap();
                        assert_eq!(
                            out[i * stride + t].to_bits(),
                            alone.to_bits(),
                            "{dtype} {i} {t}"
                        );
                    }
                    assert!(out[i * stride + tokens].is_nan(), "{dtype}: wrote past the tokens");
                }
                #[cfg(target_arch = "x86_64")]
                for (path, together) in x86::every_path(dtype, &rows[..row_bytes], &xs) {
                    for (t, &x) in xs.iter().enumerate() {
                        let alone = &x86::every_path(dtype, &rows[..row_bytes], &[x]);
                        let alone = alone.iter().find(|(p, _)| *p == path).unwrap().1[0];
                        assert_eq!(together[t].to_bits(), alone.to_bits(), "{dtype} {path} {t}");
                    }
                }
            }
        }
    }

    #[test]
    fn quantization_error_is_within_half_a_step() {
        let mut next = xorshift(0x0ddb_a11c_0ffe_e000);
        let x: Vec<f32> = (0..4 * 96).map(|_| (next() % 1000) as f32 / 37.0 - 13.0).collect();
        let mut q = Q8Activations::default();
        q.quantize(&x, 96);
        assert_eq!(q.rows(), 4);
        for r in 0..4 {
            let row = q.row(r);
            for (b, &[d, s]) in row.scales.iter().enumerate() {
                let qs = &row.qs[b * QK..(b + 1) * QK];
                let xs = &x[r * 96 + b * QK..r * 96 + (b + 1) * QK];
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!((d * 127.0 - amax).abs() <= 1e-5 * amax);
                assert!(qs.iter().any(|&v| v.unsigned_abs() == 127), "the largest maps to 127");
                for (&v, &qv) in xs.iter().zip(qs) {
                    assert!((v - d * qv as f32).abs() <= d * 0.5 * (1.0 + 1e-5), "{v} {qv} {d}");
                }
                let sum: i32 = qs.iter().map(|&v| v as i32).sum();
                assert_eq!(s, d * sum as f32);
            }
        }
    }

    #[test]
    fn zero_blocks_quantize_to_zero_scale() {
        let mut q = Q8Activations::default();
        q.quantize(&[0.0; 64], 32);
        assert!(q.row(1).scales[0] == [0.0, 0.0] && q.row(1).qs.iter().all(|&v| v == 0));
    }

    #[test]
    fn float_formats_have_no_integer_path() {
        let mut q = Q8Activations::default();
        q.quantize(&[1.0; 32], 32);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            assert!(!supports(dtype));
            let row = vec![0u8; dtype.row_bytes(32).unwrap_or(0)];
            assert!(dot_row_q8(dtype, &row, q.row(0)).is_none());
        }
    }
}
