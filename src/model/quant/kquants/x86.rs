//! AVX2 + FMA `dot_row` for the k-quants (layouts in `kquants.rs`). The bit fields are
//! unpacked 32 values at a time with 256-bit byte operations, widened to f32 eight at a
//! time, and multiplied with `x` in f32 (the activation is not quantized, as in the
//! other formats' kernels).
//!
//! Numerics: per sub-block, `q * x` is accumulated in 8 f32 lanes with FMA and scaled
//! once by the sub-block's `d * sc` (Q4_K/Q5_K: minus `dmin * m` times the sub-block's
//! sum of `x`, as the Q4_1 kernel does), so the error is that of an f32 dot product of
//! `d * sc * q` and `dmin * m` with `x` (bounded by `sum (|d*sc*q| + |dmin*m|) * |x|`,
//! a few times `sum |w * x|` for real blocks).

use std::arch::x86_64::*;

use super::QK_K;
use crate::model::quant::x86::hsum;
use crate::model::quant::{f16_to_f32, le_u16};
use crate::model::DType;

/// True when the CPU can run `dot_row`.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// # Safety
/// The CPU must support AVX2 and FMA (`available()`).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_row(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    // Blocks and x are walked as whole chunks, so every load below stays inside its
    // chunk whatever the caller passes; a short row only computes fewer blocks.
    assert_eq!(dtype.row_bytes(x.len()), Some(row.len()), "{dtype} row length");
    match dtype {
        DType::Q4_K => dot_q45::<false>(row, x),
        DType::Q5_K => dot_q45::<true>(row, x),
        DType::Q6_K => dot_q6_k(row, x),
        other => unreachable!("{other} is not a k-quant"),
    }
}

/// # Safety
/// AVX2, and `b` holds at least 32 bytes (all callers pass exact 32-byte slices).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load32(b: &[u8]) -> __m256i {
    debug_assert!(b.len() >= 32);
    _mm256_loadu_si256(b.as_ptr() as *const __m256i)
}

/// The 32 bytes of `q` as four vectors of 8 f32: bytes 0-7, 8-15, 16-23, 24-31,
/// zero-extended (`SIGNED = false`) or sign-extended.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn widen<const SIGNED: bool>(q: __m256i) -> [__m256; 4] {
    let lo = _mm256_castsi256_si128(q);
    let hi = _mm256_extracti128_si256(q, 1);
    [
        widen8::<SIGNED>(lo),
        widen8::<SIGNED>(_mm_srli_si128(lo, 8)),
        widen8::<SIGNED>(hi),
        widen8::<SIGNED>(_mm_srli_si128(hi, 8)),
    ]
}

/// The low 8 bytes of `v` as 8 f32.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn widen8<const SIGNED: bool>(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(if SIGNED { _mm256_cvtepi8_epi32(v) } else { _mm256_cvtepu8_epi32(v) })
}

/// Q4_K/Q5_K sub-block scales `d * sc` and mins `dmin * m` (as `kquants::sub_scales`,
/// same f32 products) with the 6-bit fields unpacked as ggml's AVX2 code does: as u32
/// words of the 12 `scales` bytes, giving the 8 scales and the 8 mins one byte each.
/// Inlined into the loop (a call per block would spill the accumulators).
///
/// # Safety
/// The CPU must support AVX2.
#[inline(always)]
pub(super) unsafe fn scales(blk: &[u8]) -> ([f32; 8], [f32; 8]) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    let head: &[u8; 16] = blk[..16].try_into().expect("k-quant block header");
    let w = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    let (a, b, c) = (w(4), w(8), w(12));
    // Sub-blocks 0-3: low 6 bits of bytes 0-3 (scales) and 4-7 (mins); 4-7: nibbles of
    // bytes 8-11 plus the top 2 bits of bytes 0-3 (scales) and 4-7 (mins).
    let sc = (a & LOW6) as u64 | (((c & LOW4) | (((a >> 6) & TOP2) << 4)) as u64) << 32;
    let m = (b & LOW6) as u64 | ((((c >> 4) & LOW4) | (((b >> 6) & TOP2) << 4)) as u64) << 32;
    let d = f16_to_f32(u16::from_le_bytes([head[0], head[1]]));
    let dmin = f16_to_f32(u16::from_le_bytes([head[2], head[3]]));
    (bytes_times(sc, d), bytes_times(m, dmin))
}

/// The 8 bytes of `v` (little endian) as f32, times `scale`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bytes_times(v: u64, scale: f32) -> [f32; 8] {
    let f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v as i64)));
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), _mm256_mul_ps(_mm256_set1_ps(scale), f));
    out
}

/// One 32-value sub-block of Q4_K/Q5_K: `acc += d * sum(q * x)`, `acc_m += m * sum(x)`
/// (8 lanes each; the caller subtracts `acc_m` at the end).
///
/// # Safety
/// AVX2 and FMA, and `x` holds at least 32 values.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn sub_block(acc: &mut __m256, acc_m: &mut __m256, q: __m256i, d: f32, m: f32, x: &[f32]) {
    debug_assert!(x.len() >= 32);
    let xp = x.as_ptr();
    let [q0, q1, q2, q3] = widen::<false>(q);
    let (x0, x1, x2, x3) = (
        _mm256_loadu_ps(xp),
        _mm256_loadu_ps(xp.add(8)),
        _mm256_loadu_ps(xp.add(16)),
        _mm256_loadu_ps(xp.add(24)),
    );
    let s = _mm256_fmadd_ps(q1, x1, _mm256_mul_ps(q0, x0));
    let s = _mm256_fmadd_ps(q3, x3, _mm256_fmadd_ps(q2, x2, s));
    let sx = _mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3));
    *acc = _mm256_fmadd_ps(_mm256_set1_ps(d), s, *acc);
    *acc_m = _mm256_fmadd_ps(_mm256_set1_ps(m), sx, *acc_m);
}

/// Q4_K (`FIFTH_BIT = false`) and Q5_K (`true`: the `qh` bits on top of the nibbles).
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q45<const FIFTH_BIT: bool>(row: &[u8], x: &[f32]) -> f32 {
    let (bytes, qs_at) = if FIFTH_BIT { (176, 48) } else { (144, 16) };
    let nib = _mm256_set1_epi8(0x0f);
    let one = _mm256_set1_epi8(1);
    let two = _mm256_set1_epi8(2);
    // Low- and high-nibble sub-blocks accumulate separately: two FMA chains, not one.
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut acc_m = [_mm256_setzero_ps(); 2];
    for (blk, xs) in row.chunks_exact(bytes).zip(x.chunks_exact(QK_K)) {
        let (ds, ms) = scales(blk);
        // Q5_K: shifted right by 2 per 64 values, so bits 0 and 1 of each byte are always
        // the current pair (epi16 shifts leak the next byte's bits only into bits 6-7).
        let mut qh = if FIFTH_BIT { load32(&blk[16..48]) } else { _mm256_setzero_si256() };
        for j in 0..4 {
            let q = load32(&blk[qs_at + 32 * j..qs_at + 32 * j + 32]);
            let mut lo = _mm256_and_si256(q, nib);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), nib);
            if FIFTH_BIT {
                // Bit 0 -> 16 for the low sub-block, bit 1 -> 16 for the high one.
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(qh, one), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(qh, two), 3));
                qh = _mm256_srli_epi16(qh, 2);
            }
            let xj = &xs[64 * j..64 * j + 64];
            let [a0, a1] = &mut acc;
            let [m0, m1] = &mut acc_m;
            sub_block(a0, m0, lo, ds[2 * j], ms[2 * j], &xj[..32]);
            sub_block(a1, m1, hi, ds[2 * j + 1], ms[2 * j + 1], &xj[32..]);
        }
    }
    let s = _mm256_sub_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc_m[0], acc_m[1]));
    hsum(s)
}

/// `acc_a += sa * (q * x)[0..16]`, `acc_b += sb * (q * x)[16..32]` for 32 values of
/// Q6_K holding two 16-value sub-blocks with scales `sa`, `sb`.
///
/// # Safety
/// AVX2 and FMA, and `x` holds at least 32 values.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn two_sub_blocks(acc: &mut [__m256; 2], q: __m256i, sa: f32, sb: f32, x: &[f32]) {
    debug_assert!(x.len() >= 32);
    let xp = x.as_ptr();
    let [q0, q1, q2, q3] = widen::<true>(q);
    let a = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xp.add(8)), _mm256_mul_ps(q0, _mm256_loadu_ps(xp)));
    let b = _mm256_fmadd_ps(
        q3,
        _mm256_loadu_ps(xp.add(24)),
        _mm256_mul_ps(q2, _mm256_loadu_ps(xp.add(16))),
    );
    acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(sa), a, acc[0]);
    acc[1] = _mm256_fmadd_ps(_mm256_set1_ps(sb), b, acc[1]);
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q6_k(row: &[u8], x: &[f32]) -> f32 {
    let nib = _mm256_set1_epi8(0x0f);
    let (m03, m0c, m30) = (_mm256_set1_epi8(0x03), _mm256_set1_epi8(0x0c), _mm256_set1_epi8(0x30));
    let bias = _mm256_set1_epi8(32);
    let mut acc = [_mm256_setzero_ps(); 2];
    for (blk, xs) in row.chunks_exact(210).zip(x.chunks_exact(QK_K)) {
        // The 16 sub-block scales `d * sc` (the same f32 products as dequantize_row).
        let d = _mm256_set1_ps(f16_to_f32(le_u16(blk, 208)));
        let sc = _mm_loadu_si128(blk[192..208].as_ptr() as *const __m128i);
        let mut ds = [0f32; 16];
        _mm256_storeu_ps(ds.as_mut_ptr(), _mm256_mul_ps(d, widen8::<true>(sc)));
        _mm256_storeu_ps(
            ds.as_mut_ptr().add(8),
            _mm256_mul_ps(d, widen8::<true>(_mm_srli_si128(sc, 8))),
        );
        for n in 0..2 {
            let ql0 = load32(&blk[64 * n..64 * n + 32]);
            let ql1 = load32(&blk[64 * n + 32..64 * n + 64]);
            let qh = load32(&blk[128 + 32 * n..128 + 32 * n + 32]);
            // The 6-bit values of the four 32-value runs, minus 32 (so in -32..=31).
            let q = [
                _mm256_or_si256(
                    _mm256_and_si256(ql0, nib),
                    _mm256_slli_epi16(_mm256_and_si256(qh, m03), 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(ql1, nib),
                    _mm256_slli_epi16(_mm256_and_si256(qh, m0c), 2),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), nib),
                    _mm256_and_si256(qh, m30),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), nib),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                ),
            ];
            let ds = &ds[8 * n..8 * n + 8];
            let xn = &xs[128 * n..128 * n + 128];
            for (k, qk) in q.into_iter().enumerate() {
                let qk = _mm256_sub_epi8(qk, bias);
                two_sub_blocks(&mut acc, qk, ds[2 * k], ds[2 * k + 1], &xn[32 * k..32 * k + 32]);
            }
        }
    }
    hsum(_mm256_add_ps(acc[0], acc[1]))
}
