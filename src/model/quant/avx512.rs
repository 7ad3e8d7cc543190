//! AVX-512 kernels for `dot_row` on the formats where they beat the AVX2 ones (x86.rs):
//! the demo model's Q4_1 (and Q4_0, Q8_0) and `--quantize int8`'s I8. A 32-value block is
//! two 16-lane vectors instead of four 8-lane ones; the numerics are the AVX2 kernels'
//! (per block, lanes accumulate `q * x` with FMA, then `acc += d * lanes`, + `m * sum x`
//! for Q4_1), only the lane count, so the summation order, differs. Other formats return
//! None and take the AVX2 path.
//!
//! Measured (benches/quant_dot.rs, L2-resident rows, the 2-core AMD EPYC dev machine,
//! AVX-512 and `QILIN_NO_AVX512=1` interleaved twice in one session): Q4_1 1.13-1.15x
//! faster at 576, 1536 and 3584 columns, I8 1.14x, Q8_0 1.12x at 576 and even at 1536.
//! An I4 kernel (nibble interleave + 32-bit subtract of z) was 3% slower than AVX2's and
//! is not kept. The conversions (byte -> i32 -> f32), not the FMAs, bound both widths.
//!
//! Chosen at run time when the CPU has AVX-512F/BW (and F16C); `QILIN_NO_AVX512=1` keeps
//! the AVX2 kernels (to compare the two, or on CPUs that clock down under 512-bit work).

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::intq::{BLOCK, I8_BLOCK_BYTES};
use super::QK;
use crate::model::DType;

/// True when the CPU has the features and `QILIN_NO_AVX512` does not turn them off;
/// decided once per process.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("f16c")
            && std::env::var("QILIN_NO_AVX512").as_deref() != Ok("1")
    })
}

/// `dot_row` for the formats with a 512-bit kernel, None for the others.
///
/// # Safety
/// The CPU must support AVX-512F/BW and F16C (`available()`), and `row` must hold
/// exactly `x.len()` values of `dtype` (checked by the caller).
#[target_feature(enable = "avx512f,avx512bw,f16c")]
pub unsafe fn dot_row(dtype: DType, row: &[u8], x: &[f32]) -> Option<f32> {
    Some(match dtype {
        DType::Q4_1 => dot_q4::<true>(row, x),
        DType::Q4_0 => dot_q4::<false>(row, x),
        DType::Q8_0 => dot_q8_0(row, x),
        DType::I8 => dot_i8(row, x),
        _ => return None,
    })
}

/// `out[i * stride]` = `dot_row` of row `i` of `rows` (whole rows of `row_bytes`), with
/// the format's kernel chosen once; false (nothing written) for formats without a
/// 512-bit kernel.
///
/// # Safety
/// As `dot_row`, for every row; `out` has room for every row (checked by the caller).
#[target_feature(enable = "avx512f,avx512bw,f16c")]
pub unsafe fn dot_rows(
    dtype: DType,
    rows: &[u8],
    row_bytes: usize,
    x: &[f32],
    out: &mut [f32],
    stride: usize,
) -> bool {
    let rows = rows.chunks_exact(row_bytes);
    let outs = out.iter_mut().step_by(stride);
    match dtype {
        DType::Q4_1 => rows.zip(outs).for_each(|(r, o)| *o = dot_q4::<true>(r, x)),
        DType::Q4_0 => rows.zip(outs).for_each(|(r, o)| *o = dot_q4::<false>(r, x)),
        DType::Q8_0 => rows.zip(outs).for_each(|(r, o)| *o = dot_q8_0(r, x)),
        DType::I8 => rows.zip(outs).for_each(|(r, o)| *o = dot_i8(r, x)),
        _ => return false,
    }
    true
}

#[inline(always)]
fn read_i32(b: &[u8], at: usize) -> i32 {
    i32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// 16 bytes as 16 f32, zero- or sign-extended.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn u8x16_to_f32(v: __m128i) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v))
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn i8x16_to_f32(v: __m128i) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))
}

/// The f16 at byte 0 of `blk` (and, in the second lane, the one at byte 2), as f32.
#[inline]
#[target_feature(enable = "f16c")]
unsafe fn f16_pair(blk: &[u8]) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128(read_i32(blk, 0)))
}

/// Q4_0 (`MIN = false`: nibbles minus 8) and Q4_1 (`MIN = true`: plus m * sum x). Values
/// 0..16 of a block are the low nibbles of its 16 bytes, 16..32 the high ones.
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn dot_q4<const MIN: bool>(row: &[u8], x: &[f32]) -> f32 {
    let (bytes, qs_at) = if MIN { (20, 4) } else { (18, 2) };
    let mask = _mm_set1_epi8(0x0f);
    let eight = _mm_set1_epi8(8);
    let mut acc = _mm512_setzero_ps();
    let mut acc_m = _mm512_setzero_ps();
    for (blk, xs) in row.chunks_exact(bytes).zip(x.chunks_exact(QK)) {
        let q = _mm_loadu_si128(blk.as_ptr().add(qs_at) as *const __m128i);
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        let (q0, q1) = if MIN {
            (u8x16_to_f32(lo), u8x16_to_f32(hi))
        } else {
            (i8x16_to_f32(_mm_sub_epi8(lo, eight)), i8x16_to_f32(_mm_sub_epi8(hi, eight)))
        };
        let x0 = _mm512_loadu_ps(xs.as_ptr());
        let x1 = _mm512_loadu_ps(xs.as_ptr().add(16));
        let s = _mm512_fmadd_ps(q1, x1, _mm512_mul_ps(q0, x0));
        let dm = f16_pair(blk);
        acc = _mm512_fmadd_ps(_mm512_broadcastss_ps(dm), s, acc);
        if MIN {
            let m = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
            acc_m = _mm512_fmadd_ps(m, _mm512_add_ps(x0, x1), acc_m);
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(acc, acc_m))
}

#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    for (blk, xs) in row.chunks_exact(34).zip(x.chunks_exact(QK)) {
        let qp = blk.as_ptr().add(2);
        let q0 = i8x16_to_f32(_mm_loadu_si128(qp as *const __m128i));
        let q1 = i8x16_to_f32(_mm_loadu_si128(qp.add(16) as *const __m128i));
        let s = _mm512_mul_ps(q0, _mm512_loadu_ps(xs.as_ptr()));
        let s = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xs.as_ptr().add(16)), s);
        acc = _mm512_fmadd_ps(_mm512_broadcastss_ps(f16_pair(blk)), s, acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// I8: `s: f32` then 128 i8; per block `s * sum q x`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn dot_i8(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    for (blk, xs) in row.chunks_exact(I8_BLOCK_BYTES).zip(x.chunks_exact(BLOCK)) {
        let s = f32::from_bits(read_i32(blk, 0) as u32);
        let qp = blk.as_ptr().add(4);
        let mut lanes = _mm512_setzero_ps();
        for c in 0..BLOCK / 16 {
            let q = i8x16_to_f32(_mm_loadu_si128(qp.add(16 * c) as *const __m128i));
            lanes = _mm512_fmadd_ps(q, _mm512_loadu_ps(xs.as_ptr().add(16 * c)), lanes);
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(s), lanes, acc);
    }
    _mm512_reduce_add_ps(acc)
}
