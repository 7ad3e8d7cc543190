//! AVX2 decoding of the formats of decoded_levels.rs straight into registers: 32 levels
//! at a time (one activation block) with the scale and offset of each of its values'
//! groups in 8 f32 lanes (lanes 0-3 the first 16 values, 4-7 the last 16, so groups of
//! 16 fit). Both dot products build on it: `dot_row` with f32 activations here and the
//! 8-bit activation kernel (q8_activations/x86.rs). The levels equal `BlockLevels`'s
//! byte for byte (tested below), so the values are those `dequantize_row` gives.

use std::arch::x86_64::*;

use super::{id, superblock_scales, IQ4_VALUES, MAX_GROUPS};
use crate::model::quant::kquants::sub_scales;
use crate::model::quant::x86::hsum;
use crate::model::quant::{f16_to_f32, le_u16, QK};

/// The scales and offsets of a super-block's groups (up to 16 of each), decoded once
/// when its first activation block is reached.
pub struct SuperScales {
    scale: [f32; MAX_GROUPS],
    offset: [f32; MAX_GROUPS],
}

impl SuperScales {
    pub fn new() -> Self {
        SuperScales { scale: [0.0; MAX_GROUPS], offset: [0.0; MAX_GROUPS] }
    }
}

/// One activation block's worth of weights: 32 levels (i8), and per value the scale and
/// offset of its group (lanes 0-3: values 0-15, lanes 4-7: values 16-31).
#[derive(Clone, Copy)]
pub struct Levels32 {
    pub level: __m256i,
    pub scale: __m256,
    pub offset: __m256,
}

/// Activation block `b` (values `32b..32b + 32`) of a row of format `F` at `row`
/// (`block_bytes` per block). `scales` carries a super-block's decoded scales from its
/// first activation block to the next ones: callers visit blocks in order.
///
/// # Safety
/// AVX2/FMA/F16C, and `row` must hold block `b`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn levels32<const F: u8>(
    row: *const u8,
    block_bytes: usize,
    b: usize,
    scales: &mut SuperScales,
) -> Levels32 {
    let per_block = id::elems(F) / QK;
    let (blk, j) = (row.add(b / per_block * block_bytes), b % per_block);
    let low4 = _mm256_set1_epi8(0x0f);
    match F {
        id::Q5_0 | id::Q5_1 => {
            let at = if F == id::Q5_1 { 4 } else { 2 };
            let q = _mm_loadu_si128(blk.add(at + 4) as *const __m128i);
            let nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), low4);
            let fifth = _mm256_and_si256(
                bits_to_bytes((blk.add(at) as *const u32).read_unaligned()),
                _mm256_set1_epi8(0x10),
            );
            let unsigned = _mm256_or_si256(nibbles, fifth);
            let d = f16_to_f32(le_u16(std::slice::from_raw_parts(blk, 2), 0));
            if F == id::Q5_1 {
                let m = f16_to_f32(le_u16(std::slice::from_raw_parts(blk, 4), 2));
                Levels32 { level: unsigned, scale: _mm256_set1_ps(d), offset: _mm256_set1_ps(-m) }
            } else {
                let level = _mm256_sub_epi8(unsigned, _mm256_set1_epi8(16));
                Levels32 { level, scale: _mm256_set1_ps(d), offset: _mm256_setzero_ps() }
            }
        }
        id::IQ4_NL | id::IQ4_XS => {
            let (qs, scale) = if F == id::IQ4_NL {
                (blk.add(2), f16_to_f32(le_u16(std::slice::from_raw_parts(blk, 2), 0)))
            } else {
                if j == 0 {
                    super_scales::<F>(std::slice::from_raw_parts(blk, block_bytes), scales);
                }
                (blk.add(8 + 16 * j), scales.scale[j])
            };
            let q = _mm_loadu_si128(qs as *const __m128i);
            let nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), low4);
            let table = _mm_loadu_si128(IQ4_VALUES.as_ptr() as *const __m128i);
            let level = _mm256_shuffle_epi8(_mm256_set_m128i(table, table), nibbles);
            Levels32 { level, scale: _mm256_set1_ps(scale), offset: _mm256_setzero_ps() }
        }
        id::Q2_K | id::Q3_K => {
            if j == 0 {
                super_scales::<F>(std::slice::from_raw_parts(blk, block_bytes), scales);
            }
            // Activation block j: pair `j % 4` of half `j / 4`, two bits per byte.
            let (half, pair) = (j / 4, j % 4);
            let qs_at = if F == id::Q2_K { 16 } else { 32 };
            let q = _mm256_loadu_si256(blk.add(qs_at + 32 * half) as *const __m256i);
            let q = _mm256_and_si256(shift_right_2x(q, pair), _mm256_set1_epi8(3));
            let level = if F == id::Q3_K {
                // The high bit `4 * half + pair` of hmask[l]: set keeps q, clear takes 4 off.
                let hmask = _mm256_loadu_si256(blk as *const __m256i);
                let high =
                    _mm256_and_si256(shift_right(hmask, 4 * half + pair), _mm256_set1_epi8(1));
                _mm256_sub_epi8(_mm256_or_si256(q, _mm256_slli_epi16(high, 2)), _mm256_set1_epi8(4))
            } else {
                q
            };
            let halves = |v: &[f32; MAX_GROUPS]| {
                _mm256_set_m128(_mm_set1_ps(v[2 * j + 1]), _mm_set1_ps(v[2 * j]))
            };
            Levels32 { level, scale: halves(&scales.scale), offset: halves(&scales.offset) }
        }
        id::Q5_K => {
            if j == 0 {
                q5_k_scales(blk, scales);
            }
            // Sub-block j: the low (even j) or high (odd j) nibbles of qs[32 * (j / 2)..],
            // with bit j of qh[l] as the fifth bit of value l.
            let q = _mm256_loadu_si256(blk.add(48 + 32 * (j / 2)) as *const __m256i);
            let nibbles =
                _mm256_and_si256(if j % 2 == 0 { q } else { _mm256_srli_epi16(q, 4) }, low4);
            let qh = _mm256_loadu_si256(blk.add(16) as *const __m256i);
            let fifth = _mm256_and_si256(shift_right(qh, j), _mm256_set1_epi8(1));
            let level = _mm256_or_si256(nibbles, _mm256_slli_epi16(fifth, 4));
            Levels32 {
                level,
                scale: _mm256_set1_ps(scales.scale[j]),
                offset: _mm256_set1_ps(scales.offset[j]),
            }
        }
        _ => unreachable!("format id {F}"),
    }
}

/// Q5_K's eight sub-block scales `d * sc` and mins `dmin * m` (kquants::sub_scales); out
/// of line as `super_scales`.
#[inline(never)]
unsafe fn q5_k_scales(blk: *const u8, out: &mut SuperScales) {
    let (scale, offset) = sub_scales(std::slice::from_raw_parts(blk, 16));
    out.scale[..8].copy_from_slice(&scale);
    out.offset[..8].copy_from_slice(&offset);
}

/// Bit `i` of `bits` as byte `i` (0xFF set, 0 clear): llama.cpp's `bytes_from_bits_32`.
#[inline]
#[target_feature(enable = "avx2")]
pub unsafe fn bits_to_bytes(bits: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303),
    );
    // Every bit but bit i % 8 set in byte i: all ones exactly where that bit is set.
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
}

/// Each byte shifted right by `2 * pair` (bits of other bytes are masked off after).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn shift_right_2x(v: __m256i, pair: usize) -> __m256i {
    match pair {
        0 => v,
        1 => _mm256_srli_epi16(v, 2),
        2 => _mm256_srli_epi16(v, 4),
        _ => _mm256_srli_epi16(v, 6),
    }
}

/// Each 16-bit lane shifted right by `bit` (0..8); the caller masks one bit per byte.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn shift_right(v: __m256i, bit: usize) -> __m256i {
    _mm256_srl_epi16(v, _mm_cvtsi32_si128(bit as i32))
}

/// The super-block scales of IQ4_XS, Q2_K or Q3_K (`superblock_scales`); out of line,
/// as the k-quant kernels' scale decoding (inlined, it kept the block closure from being
/// inlined).
#[inline(never)]
fn super_scales<const F: u8>(blk: &[u8], out: &mut SuperScales) {
    superblock_scales::<F>(blk, &mut out.scale, &mut out.offset);
}

/// `sum w * x` over a row of format `F` with f32 activations: per activation block the
/// 32 levels as f32 times `x` in 8 lanes per group half, then `scale * that - offset *
/// sum x` lane by lane.
///
/// # Safety
/// AVX2/FMA/F16C; `row` holds `x.len()` values of the format (checked by the caller).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_row<const F: u8>(block_bytes: usize, row: &[u8], x: &[f32]) -> f32 {
    let mut scales = SuperScales::new();
    let mut acc = _mm256_setzero_ps();
    for b in 0..x.len() / QK {
        let Levels32 { level, scale, offset } =
            levels32::<F>(row.as_ptr(), block_bytes, b, &mut scales);
        let xp = x.as_ptr().add(b * QK);
        // Lanes 0-3 of each sum cover values 0-15, lanes 4-7 values 16-31 (matching the
        // scale's halves): quarter k takes values 4k..4k+3 and 16+4k..16+4k+3, which
        // interleaving the two halves' 32-bit words puts side by side.
        let (lo, hi) = (_mm256_castsi256_si128(level), _mm256_extracti128_si256::<1>(level));
        let pairs = [_mm_unpacklo_epi32(lo, hi), _mm_unpackhi_epi32(lo, hi)];
        let (mut wx, mut xs) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for k in 0..4 {
            let words = if k % 2 == 0 { pairs[k / 2] } else { _mm_srli_si128::<8>(pairs[k / 2]) };
            let w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(words));
            let xv = _mm256_set_m128(_mm_loadu_ps(xp.add(16 + 4 * k)), _mm_loadu_ps(xp.add(4 * k)));
            wx = _mm256_fmadd_ps(w, xv, wx);
            if id::has_offset(F) {
                xs = _mm256_add_ps(xs, xv);
            }
        }
        acc = _mm256_fmadd_ps(scale, wx, acc);
        if id::has_offset(F) {
            acc = _mm256_fnmadd_ps(offset, xs, acc);
        }
    }
    hsum(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::decoded_levels::{with_format, BlockLevels};
    use crate::model::quant::test_rows::{random_row, xorshift};
    use crate::model::DType;

    /// Every activation block's registers hold `BlockLevels`'s levels, and each value's
    /// group scale and offset.
    #[test]
    fn registers_hold_the_decoded_levels() {
        if !crate::model::quant::x86::available() {
            return;
        }
        let mut next = xorshift(0x0123_4567_89ab_cdef);
        for dtype in
            [DType::Q5_0, DType::Q5_1, DType::IQ4_NL, DType::Q2_K, DType::Q3_K, DType::IQ4_XS]
        {
            let row = random_row(dtype, 1024, &mut next);
            let (bb, be) = (dtype.block_bytes(), dtype.block_elems());
            let group = super::super::group(dtype);
            let mut decoded = BlockLevels::new();
            let mut scales = SuperScales::new();
            for b in 0..1024 / QK {
                let first = b * QK / be;
                decoded.decode(dtype, &row[first * bb..(first + 1) * bb]);
                // SAFETY: available() above; the row holds 1024 values.
                let got = with_format!(dtype, F => unsafe { levels32::<F>(row.as_ptr(), bb, b, &mut scales) });
                // SAFETY: plain bit casts of SIMD registers.
                let (level, scale, offset): ([i8; 32], [f32; 8], [f32; 8]) = unsafe {
                    (
                        std::mem::transmute::<__m256i, [i8; 32]>(got.level),
                        std::mem::transmute::<__m256, [f32; 8]>(got.scale),
                        std::mem::transmute::<__m256, [f32; 8]>(got.offset),
                    )
                };
                let start = b * QK - first * be;
                assert_eq!(&level[..], &decoded.level[start..start + QK], "{dtype} block {b}");
                for (i, (&s, &o)) in scale.iter().zip(&offset).enumerate() {
                    let g = (start + if i < 4 { 0 } else { 16 }) / group;
                    assert_eq!(
                        (s, o),
                        (decoded.scale[g], decoded.offset[g]),
                        "{dtype} block {b} lane {i}"
                    );
                }
            }
        }
    }
}
