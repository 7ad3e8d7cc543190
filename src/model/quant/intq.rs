//! Qilin's own weight formats, 128 values per block along a row (the input features
//! of a linear layer), little endian:
//! - I8 (132 B): `s: f32, q: [i8; 128]`, `x[i] = s * q[i]`. `--quantize int8` writes
//!   the same `s` into every block of a row (per-output-channel symmetric); GPTQ 8-bit
//!   checkpoints carry one scale per group of 128 instead.
//! - I4 (68 B): `s: f16, z: u8, reserved: u8, qs: [u8; 64]`, `x[i] = s * (q[i] - z)`
//!   with `q[2j] = qs[j] & 0xF` and `q[2j + 1] = qs[j] >> 4` (neighbours share a byte,
//!   unlike GGUF's split halves): AWQ/GPTQ group-128 asymmetric quantization.
//!
//! `q - z` is formed in integers and converted once, so `dequantize_row` gives exactly
//! `s * (q - z)` rounded once to f32 (exact for every f16 `s` and 4-bit `q`, `z`), the
//! values the load-time converters promise. `quant::dot_row` runs `dot_row_avx2` when the
//! CPU has AVX2/FMA/F16C and `dot_row_portable` otherwise; both accumulate `(q - z) * x` per block in f32 lanes
//! and then add `s * lanes`, so they differ only in summation order.

use super::{f16_to_f32, hsum, i8_dot_lanes, le_u16, LANES};
use crate::model::DType;

/// Values per block in both formats.
pub const BLOCK: usize = 128;
/// Bytes per I8 block: f32 scale + 128 x i8.
pub const I8_BLOCK_BYTES: usize = 132;
/// Bytes per I4 block: f16 scale, u8 zero, reserved byte, 64 bytes of nibbles.
pub const I4_BLOCK_BYTES: usize = 68;

#[inline(always)]
fn le_f32(b: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Dequantizes one I8 or I4 row into `out` (the caller checked the lengths).
pub fn dequantize_row(dtype: DType, row: &[u8], out: &mut [f32]) {
    match dtype {
        DType::I8 => {
            for (o, blk) in out.chunks_exact_mut(BLOCK).zip(row.chunks_exact(I8_BLOCK_BYTES)) {
                let s = le_f32(blk, 0);
                for (o, &q) in o.iter_mut().zip(&blk[4..]) {
                    *o = s * (q as i8) as f32;
                }
            }
        }
        DType::I4 => {
            for (o, blk) in out.chunks_exact_mut(BLOCK).zip(row.chunks_exact(I4_BLOCK_BYTES)) {
                let s = f16_to_f32(le_u16(blk, 0));
                let z = blk[2] as i32;
                for (pair, &q) in o.chunks_exact_mut(2).zip(&blk[4..]) {
                    pair[0] = s * ((q & 0xf) as i32 - z) as f32;
                    pair[1] = s * ((q >> 4) as i32 - z) as f32;
                }
            }
        }
        other => unreachable!("intq::dequantize_row called for {other}"),
    }
}

/// The portable kernels (any CPU).
// Lane-indexed loops over parallel fixed-size arrays are the shape LLVM vectorizes.
#[allow(clippy::needless_range_loop)]
pub fn dot_row_portable(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    match dtype {
        DType::I8 => {
            for (blk, xs) in row.chunks_exact(I8_BLOCK_BYTES).zip(x.chunks_exact(BLOCK)) {
                let s = le_f32(blk, 0);
                let lanes = i8_dot_lanes(&blk[4..], xs);
                for l in 0..LANES {
                    acc[l] += s * lanes[l];
                }
            }
        }
        DType::I4 => {
            for (blk, xs) in row.chunks_exact(I4_BLOCK_BYTES).zip(x.chunks_exact(BLOCK)) {
                let s = f16_to_f32(le_u16(blk, 0));
                let z = blk[2] as i32;
                let qs = &blk[4..];
                let mut lanes = [0f32; LANES];
                // 4 bytes = 8 values per lane group, in row order.
                for c in 0..BLOCK / LANES {
                    for l in 0..LANES {
                        let i = c * LANES + l;
                        let q = qs[i / 2];
                        let nib = if i.is_multiple_of(2) { q & 0xf } else { q >> 4 };
                        lanes[l] += (nib as i32 - z) as f32 * xs[i];
                    }
                }
                for l in 0..LANES {
                    acc[l] += s * lanes[l];
                }
            }
        }
        other => unreachable!("intq::dot_row called for {other}"),
    }
    hsum(acc)
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C (`x86::available()`), and `row` must hold
/// exactly `x.len()` values of `dtype`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_row_avx2(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    match dtype {
        DType::I8 => avx2::dot_i8(row, x),
        DType::I4 => avx2::dot_i4(row, x),
        other => unreachable!("intq::dot_row called for {other}"),
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{le_f32, BLOCK, I4_BLOCK_BYTES, I8_BLOCK_BYTES};
    use crate::model::quant::le_u16;
    use crate::model::quant::x86::hsum;

    /// 16 i8 (`v`) times x[0..16] added to the two accumulators.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fma16_i8(v: __m128i, xp: *const f32, a0: &mut __m256, a1: &mut __m256) {
        let q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        let q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v)));
        *a0 = _mm256_fmadd_ps(q0, _mm256_loadu_ps(xp), *a0);
        *a1 = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xp.add(8)), *a1);
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_i8(row: &[u8], x: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (b, blk) in row.chunks_exact(I8_BLOCK_BYTES).enumerate() {
            let xp = x.as_ptr().add(b * BLOCK);
            let qp = blk.as_ptr().add(4);
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for c in 0..BLOCK / 16 {
                let v = _mm_loadu_si128(qp.add(16 * c) as *const __m128i);
                fma16_i8(v, xp.add(16 * c), &mut a0, &mut a1);
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(le_f32(blk, 0)), _mm256_add_ps(a0, a1), acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_i4(row: &[u8], x: &[f32]) -> f32 {
        // Nibble k of a little-endian u32 of the nibble bytes is value k of its 8 (value
        // 2j sits low in byte j): broadcast the word, shift lane k right by 4k, mask.
        // No shuffles, so the loop is bound by the shift/convert/FMA ports, not port 5.
        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
        let mask = _mm256_set1_epi32(0x0f);
        let mut acc = _mm256_setzero_ps();
        for (b, blk) in row.chunks_exact(I4_BLOCK_BYTES).enumerate() {
            let xp = x.as_ptr().add(b * BLOCK);
            let qp = blk.as_ptr().add(4);
            let z = _mm256_set1_epi32(blk[2] as i32);
            // Four accumulators: 16 dependent FMAs per block would otherwise wait on
            // FMA latency.
            let mut a = [_mm256_setzero_ps(); 4];
            for c in 0..BLOCK / 32 {
                for (j, a) in a.iter_mut().enumerate() {
                    let w = (qp.add(16 * c + 4 * j) as *const i32).read_unaligned();
                    let q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w), shifts), mask);
                    let q = _mm256_cvtepi32_ps(_mm256_sub_epi32(q, z));
                    *a = _mm256_fmadd_ps(q, _mm256_loadu_ps(xp.add(32 * c + 8 * j)), *a);
                }
            }
            let sum = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            let s = _mm256_cvtph_ps(_mm_set1_epi16(le_u16(blk, 0) as i16));
            acc = _mm256_fmadd_ps(s, sum, acc);
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::test_rows::{random_row, xorshift};

    /// The formats' definitions, written out element by element in f64.
    fn reference(dtype: DType, row: &[u8], n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| {
                let (b, j) = (i / BLOCK, i % BLOCK);
                let blk = &row[b * dtype.block_bytes()..(b + 1) * dtype.block_bytes()];
                match dtype {
                    DType::I8 => {
                        let s = f32::from_le_bytes(blk[..4].try_into().unwrap()) as f64;
                        s * (blk[4 + j] as i8) as f64
                    }
                    _ => {
                        let s = half::f16::from_le_bytes([blk[0], blk[1]]).to_f64();
                        let byte = blk[4 + j / 2];
                        let q = if j % 2 == 0 { byte & 0xf } else { byte >> 4 };
                        s * (q as f64 - blk[2] as f64)
                    }
                }
            })
            .collect()
    }

    #[test]
    fn dequantize_equals_the_definition_exactly() {
        let mut next = xorshift(0x51ab_0c0d_e5ee_d001);
        for dtype in [DType::I8, DType::I4] {
            for n in [128usize, 256, 896] {
                let row = random_row(dtype, n, &mut next);
                let mut out = vec![f32::NAN; n];
                dequantize_row(dtype, &row, &mut out);
                for (i, (a, r)) in out.iter().zip(reference(dtype, &row, n)).enumerate() {
                    // I4: s * (q - z) is exact in f32 (11 + 8 significant bits); I8:
                    // one f32 rounding of the exact product, as f64 -> f32 does.
                    assert_eq!(a.to_bits(), (r as f32).to_bits(), "{dtype} n={n} element {i}");
                }
            }
        }
    }

    #[test]
    fn dot_matches_an_f64_reference_on_both_paths() {
        let mut next = xorshift(0x0dd_ba11_cafe_f00d);
        for dtype in [DType::I8, DType::I4] {
            for n in [128usize, 384, 1536, 4864] {
                let row = random_row(dtype, n, &mut next);
                let x: Vec<f32> = (0..n).map(|_| (next() % 20001) as f32 / 1e4 - 1.0).collect();
                let w = reference(dtype, &row, n);
                let exact: f64 = w.iter().zip(&x).map(|(w, x)| w * *x as f64).sum();
                let scale: f64 = w.iter().zip(&x).map(|(w, x)| (w * *x as f64).abs()).sum();
                // f32 accumulation of n terms: relative error ~ n * 2^-24 of sum |w x|
                // in the worst case; 1e-5 of it leaves room and still fails on any
                // wrong nibble, scale or zero (each off by at least |s x|).
                let tol = 1e-5 * scale + 1e-30;
                let mut paths = vec![("portable", dot_row_portable(dtype, &row, &x))];
                #[cfg(target_arch = "x86_64")]
                if crate::model::quant::x86::available() {
                    // SAFETY: features detected, lengths match.
                    paths.push(("avx2", unsafe { dot_row_avx2(dtype, &row, &x) }));
                }
                paths.push(("dispatched", crate::model::quant::dot_row(dtype, &row, &x)));
                for (name, got) in paths {
                    let err = (got as f64 - exact).abs();
                    assert!(err <= tol, "{dtype} n={n} {name}: {got} vs {exact} (tol {tol})");
                }
            }
        }
    }

    #[test]
    fn nibble_order_is_low_first() {
        // One I4 block: s = 1, z = 0, byte j = (2j+1) << 4 | 2j mod 16: values 0, 1, 2, ...
        let mut blk = vec![0u8; I4_BLOCK_BYTES];
        blk[..2].copy_from_slice(&half::f16::from_f32(1.0).to_le_bytes());
        for j in 0..64 {
            blk[4 + j] = ((((2 * j + 1) % 16) << 4) | ((2 * j) % 16)) as u8;
        }
        let mut out = vec![0f32; BLOCK];
        dequantize_row(DType::I4, &blk, &mut out);
        let want: Vec<f32> = (0..BLOCK).map(|i| (i % 16) as f32).collect();
        assert_eq!(out, want);
        let x: Vec<f32> = (0..BLOCK).map(|i| if i == 3 { 1.0 } else { 0.0 }).collect();
        assert_eq!(crate::model::quant::dot_row(DType::I4, &blk, &x), 3.0);
        assert_eq!(dot_row_portable(DType::I4, &blk, &x), 3.0);
    }
}
