//! x86 kernels for `dot_row_q8`. A weight block becomes 32 unsigned bytes (nibbles, or
//! `|w|` with the activations' signs flipped where `w < 0`), multiplied with the 32
//! signed activation bytes into eight i32 partial sums: one `vpdpbusd` where the CPU
//! has AVX512-VNNI (256-bit form, AVX512VL), `vpmaddubsw` + `vpmaddwd` on AVX2 otherwise.
//! The pair sums of `vpmaddubsw` cannot saturate: at most 2 * 128 * 127 < 2^15.
//!
//! The eight lanes are converted to f32 once per block and accumulated with the block's
//! scale product by FMA; the min or zero-point term is summed in one lane beside them.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::{Q8Row, I4_BLOCK_BYTES, I8_BLOCK_BYTES, INT_BLOCK, QK, SUB_BLOCKS};
use crate::model::quant::x86::hsum;
use crate::model::DType;

/// The instruction set the kernels run on, decided once per process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    /// AVX512-VNNI + AVX512VL (and AVX2/FMA/F16C); off under `QILIN_NO_AVX512=1`.
    Vnni,
    Avx2,
    None,
}

fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let vnni = is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
            && std::env::var("QILIN_NO_AVX512").as_deref() != Ok("1");
        match (avx2, vnni) {
            (true, true) => Isa::Vnni,
            (true, false) => Isa::Avx2,
            (false, _) => Isa::None,
        }
    })
}

/// Consecutive weight rows of one format against one activation row.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8], // [rows, row_bytes]
    pub row_bytes: usize,
    pub x: Q8Row<'a>,
}

/// `dot_rows_q8` on the best instruction set this CPU has; false (nothing written)
/// without AVX2. The caller checked that `rows.bytes` is whole rows of `row_bytes`
/// holding `x.qs.len()` values of `dtype` each and that `out` has room for every row.
pub fn dot_rows(rows: Rows<'_>, out: &mut [f32], stride: usize) -> bool {
    // SAFETY: each arm runs only on a CPU with its features; lengths were checked.
    match isa() {
        Isa::Vnni => unsafe { dot_rows_vnni(rows, out, stride) },
        Isa::Avx2 => unsafe { dot_rows_avx2(rows, out, stride) },
        Isa::None => return false,
    }
    true
}

/// Both instruction sets on one row, for the tests: (name, result) of each the CPU has.
#[cfg(test)]
pub fn every_path(dtype: DType, row: &[u8], x: Q8Row<'_>) -> Vec<(&'static str, f32)> {
    let rows = Rows { dtype, bytes: row, row_bytes: row.len(), x };
    let mut paths = Vec::new();
    let mut out = [0f32];
    if isa() != Isa::None {
        // SAFETY: the CPU has AVX2/FMA/F16C; lengths were checked by the caller.
        unsafe { dot_rows_avx2(rows, &mut out, 1) };
        paths.push(("avx2", out[0]));
    }
    if isa() == Isa::Vnni {
        // SAFETY: the CPU has AVX512-VNNI/VL as well.
        unsafe { dot_rows_vnni(rows, &mut out, 1) };
        paths.push(("vnni", out[0]));
    }
    paths
}

/// `u8 x i8` products of 32 byte pairs, summed in fours into eight i32 lanes.
trait ByteDot {
    /// # Safety
    /// The CPU must have the implementation's features.
    unsafe fn dot(unsigned: __m256i, signed: __m256i) -> __m256i;
}

struct Vnni;
struct Avx2;

impl ByteDot for Vnni {
    #[inline]
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    unsafe fn dot(unsigned: __m256i, signed: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), unsigned, signed)
    }
}

impl ByteDot for Avx2 {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot(unsigned: __m256i, signed: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned, signed), _mm256_set1_epi16(1))
    }
}

/// # Safety
/// AVX2/FMA/F16C and AVX512-VNNI/VL; as `dot_rows`'s contract.
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn dot_rows_vnni(rows: Rows<'_>, out: &mut [f32], stride: usize) {
    each_row::<Vnni>(rows, out, stride)
}

/// # Safety
/// AVX2/FMA/F16C; as `dot_rows`'s contract.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_avx2(rows: Rows<'_>, out: &mut [f32], stride: usize) {
    each_row::<Avx2>(rows, out, stride)
}

/// The format's kernel on every row, chosen once.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn each_row<D: ByteDot>(rows: Rows<'_>, out: &mut [f32], stride: usize) {
    let x = rows.x;
    let each = rows.bytes.chunks_exact(rows.row_bytes).zip(out.iter_mut().step_by(stride));
    match rows.dtype {
        DType::Q4_1 => each.for_each(|(r, o)| *o = dot_q4::<D, true>(r, x)),
        DType::Q4_0 => each.for_each(|(r, o)| *o = dot_q4::<D, false>(r, x)),
        DType::Q8_0 => each.for_each(|(r, o)| *o = dot_q8_0::<D>(r, x)),
        DType::I8 => each.for_each(|(r, o)| *o = dot_i8::<D>(r, x)),
        DType::I4 => each.for_each(|(r, o)| *o = dot_i4::<D>(r, x)),
        other => unreachable!("no integer dot product for {other}"),
    }
}

/// Activation block `b`: its 32 bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn activations(x: Q8Row<'_>, b: usize) -> __m256i {
    debug_assert!((b + 1) * QK <= x.qs.len());
    _mm256_loadu_si256(x.qs.as_ptr().add(b * QK) as *const __m256i)
}

/// Signed weight bytes against signed activations: `|w|` and `sign(w) * a`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn signed_dot<D: ByteDot>(w: __m256i, a: __m256i) -> __m256i {
    D::dot(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w))
}

/// One block's share: `scale * dot` is added to 8 f32 lanes, lane 1 of `min` to a scalar
/// sum (the min or zero-point term; unused lanes are ignored).
struct Term {
    scale: __m256,
    dot: __m256,
    min: __m128,
}

/// Sums the terms of blocks `0..blocks` into two accumulators, even and odd blocks, so
/// that one block's FMA does not wait for the previous one's (4 cycles, about what a
/// whole block costs). Returns (sum of `scale * dot`, sum of the min terms).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_blocks(blocks: usize, mut term: impl FnMut(usize) -> Term) -> (f32, f32) {
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut acc_min = [_mm_setzero_ps(); 2];
    let mut add = |t: Term, parity: usize| {
        acc[parity] = _mm256_fmadd_ps(t.scale, t.dot, acc[parity]);
        acc_min[parity] = _mm_add_ps(acc_min[parity], t.min);
    };
    let mut b = 0;
    while b + 1 < blocks {
        add(term(b), 0);
        add(term(b + 1), 1);
        b += 2;
    }
    if b < blocks {
        add(term(b), 0);
    }
    let min = _mm_add_ps(acc_min[0], acc_min[1]);
    (hsum(_mm256_add_ps(acc[0], acc[1])), _mm_cvtss_f32(_mm_movehdup_ps(min)))
}

/// Q4_0 (`MIN = false`: the nibbles minus 8) and Q4_1 (`MIN = true`: plus `m`): values
/// 0..16 are the low nibbles of the block's 16 bytes, 16..32 the high ones, which is
/// the order of one 256-bit register holding the bytes and the bytes shifted right by 4.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4<D: ByteDot, const MIN: bool>(row: &[u8], x: Q8Row<'_>) -> f32 {
    let (bytes, qs_at) = if MIN { (20, 4) } else { (18, 2) };
    let mask = _mm256_set1_epi8(0x0f);
    // Q4_0's "min" is -8 * d_w.
    let q4_0_min = _mm_setr_ps(1.0, -8.0, 0.0, 0.0);
    let (dot, min) = sum_blocks(row.len() / bytes, |b| {
        let blk = row.as_ptr().add(b * bytes);
        let q = _mm_loadu_si128(blk.add(qs_at) as *const __m128i);
        let w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), mask);
        let dot = _mm256_cvtepi32_ps(D::dot(w, activations(x, b)));
        // (d_w, min) * (d, s): the dot's scale in lane 0, the min term in lane 1.
        let weight_scales = if MIN {
            f16_pair(blk)
        } else {
            let d_w = f16_pair(blk);
            _mm_mul_ps(_mm_shuffle_ps::<0>(d_w, d_w), q4_0_min)
        };
        let scales = _mm_mul_ps(weight_scales, activation_scales(x, b));
        Term { scale: _mm256_broadcastss_ps(scales), dot, min: scales }
    });
    dot + min
}

/// The f16 at byte 0 of `blk` as f32 in lane 0, and the one at byte 2 in lane 1 (for
/// formats with one f16 scale, lane 1 is whatever follows it and goes unused).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_pair(blk: *const u8) -> __m128 {
    _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()))
}

/// The f16 at byte 0 of `blk` as f32 in all 8 lanes. Every lane is used, so LLVM keeps
/// the broadcast load; with one lane used it inserts the 16 bits into whatever register
/// is at hand (the accumulator, here), chaining every block to the previous FMA.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_broadcast(blk: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16((blk as *const i16).read_unaligned()))
}

/// `d` of activation block `b` in all 8 lanes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn activation_scale(x: Q8Row<'_>, b: usize) -> __m256 {
    debug_assert!(b < x.scales.len());
    _mm256_broadcast_ss(&*(x.scales.as_ptr().add(b) as *const f32))
}

/// `(d, s)` of activation block `b` in lanes 0 and 1.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn activation_scales(x: Q8Row<'_>, b: usize) -> __m128 {
    debug_assert!(b < x.scales.len());
    _mm_castpd_ps(_mm_load_sd(x.scales.as_ptr().add(b) as *const f64))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0<D: ByteDot>(row: &[u8], x: Q8Row<'_>) -> f32 {
    let (dot, _) = sum_blocks(row.len() / 34, |b| {
        let blk = row.as_ptr().add(b * 34);
        let w = _mm256_loadu_si256(blk.add(2) as *const __m256i);
        let dot = _mm256_cvtepi32_ps(signed_dot::<D>(w, activations(x, b)));
        let scale = _mm256_mul_ps(f16_broadcast(blk), activation_scale(x, b));
        Term { scale, dot, min: _mm_setzero_ps() }
    });
    dot
}

/// I8: one f32 scale per 128 values, four activation blocks each.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_i8<D: ByteDot>(row: &[u8], x: Q8Row<'_>) -> f32 {
    let (dot, _) = sum_blocks(x.scales.len(), |b| {
        let blk = row.as_ptr().add(b / SUB_BLOCKS * I8_BLOCK_BYTES);
        let s_w = _mm256_set1_ps((blk as *const f32).read_unaligned());
        let w = _mm256_loadu_si256(blk.add(4 + QK * (b % SUB_BLOCKS)) as *const __m256i);
        let dot = _mm256_cvtepi32_ps(signed_dot::<D>(w, activations(x, b)));
        Term { scale: _mm256_mul_ps(s_w, activation_scale(x, b)), dot, min: _mm_setzero_ps() }
    });
    dot
}

/// I4: f16 scale and zero per 128 values; neighbours share a byte (low nibble first),
/// so each 16-byte quarter interleaves its low and high nibbles into 32 values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_i4<D: ByteDot>(row: &[u8], x: Q8Row<'_>) -> f32 {
    const _: () = assert!(INT_BLOCK == QK * SUB_BLOCKS);
    let mask = _mm_set1_epi8(0x0f);
    let (dot, zero) = sum_blocks(x.scales.len(), |b| {
        let blk = row.as_ptr().add(b / SUB_BLOCKS * I4_BLOCK_BYTES);
        let q = _mm_loadu_si128(blk.add(4 + QK / 2 * (b % SUB_BLOCKS)) as *const __m128i);
        let lo = _mm_and_si128(q, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
        let w = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
        let dot = _mm256_cvtepi32_ps(D::dot(w, activations(x, b)));
        let s_w = f16_broadcast(blk);
        // Lane 1: s_w * z * s, the zero point's share.
        let z = _mm_setr_ps(0.0, *blk.add(2) as f32, 0.0, 0.0);
        let min = _mm_mul_ps(_mm_mul_ps(_mm256_castps256_ps128(s_w), z), activation_scales(x, b));
        Term { scale: _mm256_mul_ps(s_w, activation_scale(x, b)), dot, min }
    });
    dot - zero
}
