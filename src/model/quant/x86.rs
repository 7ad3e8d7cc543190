//! AVX2 + FMA (+ F16C) kernels for `dot_row`. LLVM does not vectorize the portable
//! block loops well (it picks 128-bit vectors and never fuses mul+add, since Rust
//! forbids contraction), so the hot formats get explicit intrinsics. Numerics: per
//! block, 8 f32 lanes accumulate `q * x` with FMA, then `acc += d * lanes` (+ `m * sum x`
//! for Q4_1); the lanes are summed at the end.

use std::arch::x86_64::*;

use super::{f16_to_f32, le_u16, QK};
use crate::model::DType;

/// True when the CPU can run `dot_row`.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C (`available()`), and `row` must hold
/// exactly `x.len()` values of `dtype` (checked by the caller).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_row(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    match dtype {
        DType::Q4_1 => dot_q4::<true>(row, x),
        DType::Q4_0 => dot_q4::<false>(row, x),
        DType::Q8_0 => dot_q8_0(row, x),
        DType::F16 => dot_f16(row, x),
        DType::BF16 => dot_bf16(row, x),
        DType::F32 => dot_f32(row, x),
        // The k-quants pick their own SIMD path (they need only AVX2 and FMA).
        DType::Q4_K | DType::Q5_K | DType::Q6_K => super::kquants::dot_row(dtype, row, x),
        // SAFETY: this function's own contract covers the I8/I4 kernels' (same features).
        DType::I8 | DType::I4 => super::intq::dot_row_avx2(dtype, row, x),
        // SAFETY: as above.
        DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL | DType::Q2_K | DType::Q3_K | DType::IQ4_XS => {
            super::decoded_levels::dot_row_avx2(dtype, row, x)
        }
    }
}

/// The sum of the 8 lanes of `v` (also used by the k-quant and I8/I4 kernels).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline(always)]
fn read_i32(b: &[u8]) -> i32 {
    i32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// The block's leading f16 scale, broadcast to 8 lanes.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn scale(blk: &[u8]) -> __m256 {
    _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(le_u16(blk, 0) as i32)))
}

/// 8 bytes (low half of `v`) as 8 f32, zero- or sign-extended.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn u8x8_to_f32(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn i8x8_to_f32(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
}

/// Q4_0 (`MIN = false`: nibbles minus 8) and Q4_1 (`MIN = true`: plus m * sum x).
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q4<const MIN: bool>(row: &[u8], x: &[f32]) -> f32 {
    let (bytes, qs_at) = if MIN { (20, 4) } else { (18, 2) };
    let nblocks = x.len() / QK;
    let mask = _mm_set1_epi8(0x0f);
    let eight = _mm_set1_epi8(8);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm256_setzero_ps();
    for b in 0..nblocks {
        let blk = &row[b * bytes..(b + 1) * bytes];
        let xp = x.as_ptr().add(b * QK);
        let q = _mm_loadu_si128(blk.as_ptr().add(qs_at) as *const __m128i);
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        let (q0, q1, q2, q3) = if MIN {
            (
                u8x8_to_f32(lo),
                u8x8_to_f32(_mm_unpackhi_epi64(lo, lo)),
                u8x8_to_f32(hi),
                u8x8_to_f32(_mm_unpackhi_epi64(hi, hi)),
            )
        } else {
            let lo = _mm_sub_epi8(lo, eight);
            let hi = _mm_sub_epi8(hi, eight);
            (
                i8x8_to_f32(lo),
                i8x8_to_f32(_mm_unpackhi_epi64(lo, lo)),
                i8x8_to_f32(hi),
                i8x8_to_f32(_mm_unpackhi_epi64(hi, hi)),
            )
        };
        let x0 = _mm256_loadu_ps(xp);
        let x1 = _mm256_loadu_ps(xp.add(8));
        let x2 = _mm256_loadu_ps(xp.add(16));
        let x3 = _mm256_loadu_ps(xp.add(24));
        let s = _mm256_fmadd_ps(q1, x1, _mm256_mul_ps(q0, x0));
        let s = _mm256_fmadd_ps(q3, x3, _mm256_fmadd_ps(q2, x2, s));
        if MIN {
            // d and m are adjacent f16s: one F16C conversion gives both.
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(read_i32(blk)));
            acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dm), s, acc);
            let sx = _mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3));
            let m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm));
            acc_m = _mm256_fmadd_ps(m, sx, acc_m);
        } else {
            acc = _mm256_fmadd_ps(scale(blk), s, acc);
        }
    }
    hsum(_mm256_add_ps(acc, acc_m))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
    let nblocks = x.len() / QK;
    let mut acc = _mm256_setzero_ps();
    for b in 0..nblocks {
        let blk = &row[b * 34..(b + 1) * 34];
        let xp = x.as_ptr().add(b * QK);
        let qp = blk.as_ptr().add(2);
        let q01 = _mm_loadu_si128(qp as *const __m128i);
        let q23 = _mm_loadu_si128(qp.add(16) as *const __m128i);
        let s = _mm256_mul_ps(i8x8_to_f32(q01), _mm256_loadu_ps(xp));
        let s = _mm256_fmadd_ps(
            i8x8_to_f32(_mm_unpackhi_epi64(q01, q01)),
            _mm256_loadu_ps(xp.add(8)),
            s,
        );
        let s = _mm256_fmadd_ps(i8x8_to_f32(q23), _mm256_loadu_ps(xp.add(16)), s);
        let s = _mm256_fmadd_ps(
            i8x8_to_f32(_mm_unpackhi_epi64(q23, q23)),
            _mm256_loadu_ps(xp.add(24)),
            s,
        );
        acc = _mm256_fmadd_ps(scale(blk), s, acc);
    }
    hsum(acc)
}

/// Plain float rows, 16 values per step in two accumulators, scalar tail; `load8`
/// turns the 8 values at byte pointer `p` into f32.
#[inline(always)]
unsafe fn dot_plain(
    row: &[u8],
    x: &[f32],
    width: usize,
    load8: impl Fn(*const u8) -> __m256,
    scalar: impl Fn(&[u8]) -> f32,
) -> f32 {
    let n = x.len();
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        a0 = _mm256_fmadd_ps(
            load8(row.as_ptr().add(i * width)),
            _mm256_loadu_ps(x.as_ptr().add(i)),
            a0,
        );
        a1 = _mm256_fmadd_ps(
            load8(row.as_ptr().add((i + 8) * width)),
            _mm256_loadu_ps(x.as_ptr().add(i + 8)),
            a1,
        );
        i += 16;
    }
    let mut tail = 0f32;
    while i < n {
        tail += scalar(&row[i * width..]) * x[i];
        i += 1;
    }
    hsum(_mm256_add_ps(a0, a1)) + tail
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16(row: &[u8], x: &[f32]) -> f32 {
    dot_plain(
        row,
        x,
        2,
        |p| unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) },
        |b| f16_to_f32(le_u16(b, 0)),
    )
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
    dot_plain(
        row,
        x,
        2,
        |p| unsafe {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32(h, 16))
        },
        |b| f32::from_bits((le_u16(b, 0) as u32) << 16),
    )
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32(row: &[u8], x: &[f32]) -> f32 {
    dot_plain(
        row,
        x,
        4,
        |p| unsafe { _mm256_loadu_ps(p as *const f32) },
        |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
    )
}
