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

use super::{Q8Row, I4_BLOCK_BYTES, I8_BLOCK_BYTES, INT_BLOCK, QK, QK_K, SUB_BLOCKS};
use crate::model::quant::decoded_levels::x86::{bits_to_bytes, levels32, SuperScales};
use crate::model::quant::decoded_levels::{self, id, with_format};
use crate::model::quant::kquants::sub_scales;
use crate::model::quant::x86::hsum;
use crate::model::quant::{f16_to_f32, le_u16};
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

/// Consecutive weight rows of one format against one or more activation rows.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8], // [rows, row_bytes]
    pub row_bytes: usize,
    pub xs: &'a [Q8Row<'a>], // [tokens]
}

/// `dot_rows_q8_tokens` on the best instruction set this CPU has; false (nothing
/// written) without AVX2. The caller checked that `rows.bytes` is whole rows of
/// `row_bytes` holding `x.qs.len()` values of `dtype` each for every `x` in `rows.xs`,
/// and that `out` has room for every row and token.
pub fn dot_rows(rows: Rows<'_>, out: &mut [f32], stride: usize) -> bool {
    // SAFETY: each arm runs only on a CPU with its features; lengths were checked.
    match isa() {
        Isa::Vnni => unsafe { dot_rows_vnni(rows, out, stride) },
        Isa::Avx2 => unsafe { dot_rows_avx2(rows, out, stride) },
        Isa::None => return false,
    }
    true
}

/// Both instruction sets on one row and `xs`, for the tests: (name, one result per
/// token) of each the CPU has.
#[cfg(test)]
pub fn every_path(dtype: DType, row: &[u8], xs: &[Q8Row<'_>]) -> Vec<(&'static str, Vec<f32>)> {
    let rows = Rows { dtype, bytes: row, row_bytes: row.len(), xs };
    let mut paths = Vec::new();
    let mut out = vec![0f32; xs.len()];
    if isa() != Isa::None {
        // SAFETY: the CPU has AVX2/FMA/F16C; lengths were checked by the caller.
        unsafe { dot_rows_avx2(rows, &mut out, xs.len()) };
        paths.push(("avx2", out.clone()));
    }
    if isa() == Isa::Vnni {
        // SAFETY: the CPU has AVX512-VNNI/VL as well.
        unsafe { dot_rows_vnni(rows, &mut out, xs.len()) };
        paths.push(("vnni", out.clone()));
    }
    paths
}

/// `u8 x i8` products of 32 byte pairs, summed in fours into eight i32 lanes.
trait ByteDot {
    /// Tokens per pass over the weights: each keeps four accumulators (two 256-bit,
    /// two 128-bit), which must fit the register file beside the weights' (16 vector
    /// registers with AVX2, 32 with AVX-512VL).
    const GROUP: usize;

    /// # Safety
    /// The CPU must have the implementation's features.
    unsafe fn dot(unsigned: __m256i, signed: __m256i) -> __m256i;
}

struct Vnni;
struct Avx2;

impl ByteDot for Vnni {
    const GROUP: usize = 4;

    #[inline]
    #[target_feature(enable = "avx2,avx512vnni,avx512vl")]
    unsafe fn dot(unsigned: __m256i, signed: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), unsigned, signed)
    }
}

impl ByteDot for Avx2 {
    const GROUP: usize = 2;

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
    in_groups::<Vnni>(rows, out, stride)
}

/// # Safety
/// AVX2/FMA/F16C; as `dot_rows`'s contract.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_avx2(rows: Rows<'_>, out: &mut [f32], stride: usize) {
    in_groups::<Avx2>(rows, out, stride)
}

/// Tokens in groups of up to `D::GROUP`, then two, then one: each weight block is
/// loaded and unpacked once per group. A token's arithmetic is the same in every group
/// size, so its results do not depend on what shares its step.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn in_groups<D: ByteDot>(rows: Rows<'_>, out: &mut [f32], stride: usize) {
    let mut t = 0;
    while t < rows.xs.len() {
        let left = (rows.xs.len() - t).min(D::GROUP);
        let group = Rows { xs: &rows.xs[t..], ..rows };
        let out = &mut out[t..];
        t += if left >= 4 {
            each_row::<D, 4>(group, out, stride);
            4
        } else if left >= 2 {
            each_row::<D, 2>(group, out, stride);
            2
        } else {
            each_row::<D, 1>(group, out, stride);
            1
        };
    }
}

/// The format's kernel on every row for tokens `rows.xs[..T]`, chosen once.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn each_row<D: ByteDot, const T: usize>(rows: Rows<'_>, out: &mut [f32], stride: usize) {
    let xs: [Q8Row<'_>; T] = std::array::from_fn(|t| rows.xs[t]);
    let n_rows = rows.bytes.len() / rows.row_bytes;
    debug_assert!(n_rows == 0 || (n_rows - 1) * stride + T <= out.len());
    let each = rows.bytes.chunks_exact(rows.row_bytes).zip(out.chunks_mut(stride));
    let store = |o: &mut [f32], v: [f32; T]| o[..T].copy_from_slice(&v);
    match rows.dtype {
        DType::Q4_1 => each.for_each(|(r, o)| store(o, dot_q4::<D, true, false, T>(r, xs))),
        DType::Q4_0 => each.for_each(|(r, o)| store(o, dot_q4::<D, false, false, T>(r, xs))),
        DType::Q5_1 => each.for_each(|(r, o)| store(o, dot_q4::<D, true, true, T>(r, xs))),
        DType::Q5_0 => each.for_each(|(r, o)| store(o, dot_q4::<D, false, true, T>(r, xs))),
        DType::Q8_0 => each.for_each(|(r, o)| store(o, dot_q8_0::<D, T>(r, xs))),
        DType::I8 => each.for_each(|(r, o)| store(o, dot_i8::<D, T>(r, xs))),
        DType::I4 => each.for_each(|(r, o)| store(o, dot_i4::<D, T>(r, xs))),
        DType::Q4_K => each.for_each(|(r, o)| store(o, dot_q4_k::<D, T>(r, xs))),
        DType::Q6_K => each.for_each(|(r, o)| store(o, dot_q6_k::<D, T>(r, xs))),
        // Decoded in registers as the formats of decoded_levels.rs are.
        DType::Q5_K => each.for_each(|(r, o)| store(o, dot_levels::<D, { id::Q5_K }, T>(r, xs))),
        dtype if decoded_levels::covers(dtype) => {
            with_format!(dtype, F => each.for_each(|(r, o)| store(o, dot_levels::<D, F, T>(r, xs))))
        }
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

/// One block's share: `scale * dot` is added to 8 f32 lanes, lane 1 of `min` to a scalar
/// sum (the min or zero-point term; unused lanes are ignored).
struct Term {
    scale: __m256,
    dot: __m256,
    min: __m128,
}

/// Sums the terms of blocks `0..blocks` for `T` tokens into two accumulators each, even
/// and odd blocks, so that one block's FMA does not wait for the previous one's (4
/// cycles, about what a whole block costs). `weights(b)` prepares weight block `b` once
/// for all tokens; `term(&prepared, t, b)` is token `t`'s share of it. Returns, per
/// token, (sum of `scale * dot`, sum of the min terms).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_blocks<W, const T: usize>(
    blocks: usize,
    mut weights: impl FnMut(usize) -> W,
    mut term: impl FnMut(&W, usize, usize) -> Term,
) -> [(f32, f32); T] {
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
    let mut acc_min = [[_mm_setzero_ps(); 2]; T];
    // A macro rather than a closure: LLVM left a closure this size out of line, and
    // `parity` must be a constant for the accumulators to stay in registers.
    macro_rules! add_block {
        ($b:expr, $parity:literal) => {{
            let w = weights($b);
            for t in 0..T {
                let Term { scale, dot, min } = term(&w, t, $b);
                acc[t][$parity] = _mm256_fmadd_ps(scale, dot, acc[t][$parity]);
                acc_min[t][$parity] = _mm_add_ps(acc_min[t][$parity], min);
            }
        }};
    }
    let mut b = 0;
    while b + 1 < blocks {
        add_block!(b, 0);
        add_block!(b + 1, 1);
        b += 2;
    }
    if b < blocks {
        add_block!(b, 0);
    }
    let mut sums = [(0f32, 0f32); T];
    for (t, sum) in sums.iter_mut().enumerate() {
        let min = _mm_add_ps(acc_min[t][0], acc_min[t][1]);
        *sum = (hsum(_mm256_add_ps(acc[t][0], acc[t][1])), _mm_cvtss_f32(_mm_movehdup_ps(min)));
    }
    sums
}

/// Q4_0 (`MIN = false`: the nibbles minus 8) and Q4_1 (`MIN = true`: plus `m`): values
/// 0..16 are the low nibbles of the block's 16 bytes, 16..32 the high ones, which is
/// the order of one 256-bit register holding the bytes and the bytes shifted right by 4.
/// `FIFTH`: Q5_0 (minus 16) and Q5_1, whose `qh: u32` before the nibbles adds bit `i`
/// as the fifth bit of value `i`; the levels stay unsigned, so the dot needs no sign
/// trick and the offset goes into the min term, as Q4_0's.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4<D: ByteDot, const MIN: bool, const FIFTH: bool, const T: usize>(
    row: &[u8],
    xs: [Q8Row<'_>; T],
) -> [f32; T] {
    let qh_at = if MIN { 4 } else { 2 };
    let qs_at = if FIFTH { qh_at + 4 } else { qh_at };
    let bytes = qs_at + 16;
    let mask = _mm256_set1_epi8(0x0f);
    let fifth_bit = _mm256_set1_epi8(0x10);
    // Q4_0's "min" is -8 * d_w, Q5_0's -16 * d_w.
    let unsigned_min = _mm_setr_ps(1.0, if FIFTH { -16.0 } else { -8.0 }, 0.0, 0.0);
    let sums = sum_blocks::<_, T>(
        row.len() / bytes,
        |b| {
            let blk = row.as_ptr().add(b * bytes);
            let q = _mm_loadu_si128(blk.add(qs_at) as *const __m128i);
            let mut w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), mask);
            if FIFTH {
                let qh = (blk.add(qh_at) as *const u32).read_unaligned();
                w = _mm256_or_si256(w, _mm256_and_si256(bits_to_bytes(qh), fifth_bit));
            }
            // (d_w, min): the dot's scale in lane 0, the min in lane 1.
            let weight_scales = if MIN {
                f16_pair(blk)
            } else {
                let d_w = f16_pair(blk);
                _mm_mul_ps(_mm_shuffle_ps::<0>(d_w, d_w), unsigned_min)
            };
            (w, weight_scales)
        },
        |&(w, weight_scales), t, b| {
            let dot = _mm256_cvtepi32_ps(D::dot(w, activations(xs[t], b)));
            let scales = _mm_mul_ps(weight_scales, activation_scales(xs[t], b));
            Term { scale: _mm256_broadcastss_ps(scales), dot, min: scales }
        },
    );
    sums.map(|(dot, min)| dot + min)
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

/// Signed weight bytes against signed activations: `|w|` once per block, then
/// `sign(w) * a` per token.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn signed_dot<D: ByteDot>(w: __m256i, w_abs: __m256i, a: __m256i) -> __m256i {
    D::dot(w_abs, _mm256_sign_epi8(a, w))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0<D: ByteDot, const T: usize>(row: &[u8], xs: [Q8Row<'_>; T]) -> [f32; T] {
    let sums = sum_blocks::<_, T>(
        row.len() / 34,
        |b| {
            let blk = row.as_ptr().add(b * 34);
            let w = _mm256_loadu_si256(blk.add(2) as *const __m256i);
            (w, _mm256_sign_epi8(w, w), f16_broadcast(blk))
        },
        |&(w, w_abs, d_w), t, b| {
            let dot = _mm256_cvtepi32_ps(signed_dot::<D>(w, w_abs, activations(xs[t], b)));
            let scale = _mm256_mul_ps(d_w, activation_scale(xs[t], b));
            Term { scale, dot, min: _mm_setzero_ps() }
        },
    );
    sums.map(|(dot, _)| dot)
}

/// I8: one f32 scale per 128 values, four activation blocks each.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_i8<D: ByteDot, const T: usize>(row: &[u8], xs: [Q8Row<'_>; T]) -> [f32; T] {
    let sums = sum_blocks::<_, T>(
        xs[0].scales.len(),
        |b| {
            let blk = row.as_ptr().add(b / SUB_BLOCKS * I8_BLOCK_BYTES);
            let s_w = _mm256_set1_ps((blk as *const f32).read_unaligned());
            let w = _mm256_loadu_si256(blk.add(4 + QK * (b % SUB_BLOCKS)) as *const __m256i);
            (w, _mm256_sign_epi8(w, w), s_w)
        },
        |&(w, w_abs, s_w), t, b| {
            let dot = _mm256_cvtepi32_ps(signed_dot::<D>(w, w_abs, activations(xs[t], b)));
            let scale = _mm256_mul_ps(s_w, activation_scale(xs[t], b));
            Term { scale, dot, min: _mm_setzero_ps() }
        },
    );
    sums.map(|(dot, _)| dot)
}

/// I4: f16 scale and zero per 128 values; neighbours share a byte (low nibble first),
/// so each 16-byte quarter interleaves its low and high nibbles into 32 values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_i4<D: ByteDot, const T: usize>(row: &[u8], xs: [Q8Row<'_>; T]) -> [f32; T] {
    const _: () = assert!(INT_BLOCK == QK * SUB_BLOCKS);
    let mask = _mm_set1_epi8(0x0f);
    let sums = sum_blocks::<_, T>(
        xs[0].scales.len(),
        |b| {
            let blk = row.as_ptr().add(b / SUB_BLOCKS * I4_BLOCK_BYTES);
            let q = _mm_loadu_si128(blk.add(4 + QK / 2 * (b % SUB_BLOCKS)) as *const __m128i);
            let lo = _mm_and_si128(q, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
            let w = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
            let s_w = f16_broadcast(blk);
            // Lane 1: s_w * z, the zero point's scale.
            let z = _mm_setr_ps(0.0, *blk.add(2) as f32, 0.0, 0.0);
            (w, s_w, _mm_mul_ps(_mm256_castps256_ps128(s_w), z))
        },
        |&(w, s_w, s_w_z), t, b| {
            let dot = _mm256_cvtepi32_ps(D::dot(w, activations(xs[t], b)));
            // Lane 1: s_w * z * s, the zero point's share.
            let min = _mm_mul_ps(s_w_z, activation_scales(xs[t], b));
            Term { scale: _mm256_mul_ps(s_w, activation_scale(xs[t], b)), dot, min }
        },
    );
    sums.map(|(dot, zero)| dot - zero)
}

/// Activation blocks per k-quant super-block.
const K_BLOCKS: usize = QK_K / QK;

/// Q4_K (144-byte super-blocks): activation block `j` of a super-block is sub-block `j`,
/// the low (even `j`) or high (odd `j`) nibbles of `qs[32 * (j / 2)..][..32]`, with scale
/// `d * sc_j` and min `dmin * m_j` (`kquants::sub_scales`, decoded once per super-block).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_k<D: ByteDot, const T: usize>(row: &[u8], xs: [Q8Row<'_>; T]) -> [f32; T] {
    let mask = _mm256_set1_epi8(0x0f);
    let mut scales = ([0f32; 8], [0f32; 8]);
    let sums = sum_blocks::<_, T>(
        xs[0].scales.len(),
        |b| {
            let (sb, j) = (b / K_BLOCKS, b % K_BLOCKS);
            let blk = row.as_ptr().add(sb * 144);
            if j == 0 {
                scales = q4_k_scales(blk);
            }
            let q = _mm256_loadu_si256(blk.add(16 + 32 * (j / 2)) as *const __m256i);
            let q = if j % 2 == 0 { q } else { _mm256_srli_epi16(q, 4) };
            let w = _mm256_and_si256(q, mask);
            (w, _mm_setr_ps(scales.0[j], scales.1[j], 0.0, 0.0))
        },
        |&(w, weight_scales), t, b| {
            let dot = _mm256_cvtepi32_ps(D::dot(w, activations(xs[t], b)));
            // (d_s * d, m_s * s): the dot's scale in lane 0, the min's share in lane 1.
            let scales = _mm_mul_ps(weight_scales, activation_scales(xs[t], b));
            Term { scale: _mm256_broadcastss_ps(scales), dot, min: scales }
        },
    );
    sums.map(|(dot, min)| dot - min)
}

/// Q6_K (210-byte super-blocks, two halves of 128 values): activation block `k` of a
/// half holds values `32k..32k + 32`, whose 6-bit levels are a nibble of `ql` (low for
/// k < 2, high above; `ql[32 * (k % 2)..]`) with two bits of `qh` on top (bits `2k`,
/// `2k + 1`), minus 32. Its two 16-value sub-blocks have their own scales, which land
/// in lanes 0-3 and 4-7 of the dot (each lane sums four consecutive bytes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6_k<D: ByteDot, const T: usize>(row: &[u8], xs: [Q8Row<'_>; T]) -> [f32; T] {
    let low4 = _mm256_set1_epi8(0x0f);
    let high2 = _mm256_set1_epi8(0x30);
    let offset = _mm256_set1_epi8(32);
    let mut scales = [0f32; 16];
    let sums = sum_blocks::<_, T>(
        xs[0].scales.len(),
        |b| {
            let (sb, j) = (b / K_BLOCKS, b % K_BLOCKS);
            let blk = row.as_ptr().add(sb * 210);
            if j == 0 {
                scales = q6_k_scales(blk);
            }
            let (half, k) = (j / 4, j % 4);
            let ql = _mm256_loadu_si256(blk.add(64 * half + 32 * (k % 2)) as *const __m256i);
            let qh = _mm256_loadu_si256(blk.add(128 + 32 * half) as *const __m256i);
            let low = if k < 2 { ql } else { _mm256_srli_epi16(ql, 4) };
            // Bits 2k, 2k+1 of qh moved to bits 4, 5.
            let high = match k {
                0 => _mm256_slli_epi16(qh, 4),
                1 => _mm256_slli_epi16(qh, 2),
                2 => qh,
                _ => _mm256_srli_epi16(qh, 2),
            };
            let level = _mm256_or_si256(_mm256_and_si256(low, low4), _mm256_and_si256(high, high2));
            let w = _mm256_sub_epi8(level, offset);
            let s = 8 * half + 2 * k;
            let sub = _mm256_set_m128(_mm_set1_ps(scales[s + 1]), _mm_set1_ps(scales[s]));
            (w, _mm256_sign_epi8(w, w), sub)
        },
        |&(w, w_abs, sub), t, b| {
            let dot = _mm256_cvtepi32_ps(signed_dot::<D>(w, w_abs, activations(xs[t], b)));
            let scale = _mm256_mul_ps(sub, activation_scale(xs[t], b));
            Term { scale, dot, min: _mm_setzero_ps() }
        },
    );
    sums.map(|(dot, _)| dot)
}

/// Q4_K's sub-block scales and mins of the super-block at `blk` (144 bytes). Out of
/// line: inlined, the scalar unpacking made the block closure too large for LLVM to
/// inline it into the kernel, which then ran at half the f32 kernel's speed.
#[inline(never)]
unsafe fn q4_k_scales(blk: *const u8) -> ([f32; 8], [f32; 8]) {
    sub_scales(std::slice::from_raw_parts(blk, 16))
}

/// Q6_K's sixteen sub-block scales `d * sc` of the super-block at `blk` (210 bytes);
/// out of line as `q4_k_scales`.
#[inline(never)]
unsafe fn q6_k_scales(blk: *const u8) -> [f32; 16] {
    let blk = std::slice::from_raw_parts(blk, 210);
    let d = f16_to_f32(le_u16(blk, 208));
    std::array::from_fn(|s| d * (blk[192 + s] as i8) as f32)
}

/// IQ4_NL, IQ4_XS, Q2_K, Q3_K and Q5_K (format id `F`; Q5_0/Q5_1 go through `dot_q4`):
/// each activation block's 32 levels are decoded in registers (decoded_levels/x86.rs),
/// then one signed byte dot. Groups of 16 (Q2_K, Q3_K) put their two scales in lanes 0-3
/// and 4-7, as Q6_K's. Q5_K subtracts its mins through the activation block's sum, as
/// Q4_1; Q2_K (mins per 16 values): each lane also subtracts `offset * sum(q)` of its
/// four activations, whose sums are one more byte dot against ones.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_levels<D: ByteDot, const F: u8, const T: usize>(
    row: &[u8],
    xs: [Q8Row<'_>; T],
) -> [f32; T] {
    let blocks = xs[0].scales.len();
    let block_bytes = row.len() / (blocks * QK / id::elems(F));
    let ones = _mm256_set1_epi8(1);
    let mut scales = SuperScales::new();
    let sums = sum_blocks::<_, T>(
        blocks,
        |b| {
            let w = levels32::<F>(row.as_ptr(), block_bytes, b, &mut scales);
            (w, _mm256_sign_epi8(w.level, w.level))
        },
        |&(w, w_abs), t, b| {
            let a = activations(xs[t], b);
            if F == id::Q5_K {
                // One group per activation block and unsigned levels, as Q4_1: the min's
                // share is `-offset * s` with the block's `s = d * sum(q)`.
                let dot = _mm256_cvtepi32_ps(D::dot(w.level, a));
                let offset = _mm256_castps256_ps128(w.offset);
                let min =
                    _mm_mul_ps(_mm_shuffle_ps::<0>(offset, offset), activation_scales(xs[t], b));
                let scale = _mm256_mul_ps(w.scale, activation_scale(xs[t], b));
                return Term { scale, dot, min };
            }
            let dot = _mm256_cvtepi32_ps(signed_dot::<D>(w.level, w_abs, a));
            let dot = if id::has_offset(F) {
                let q_sum = _mm256_cvtepi32_ps(D::dot(ones, a));
                _mm256_fmsub_ps(w.scale, dot, _mm256_mul_ps(w.offset, q_sum))
            } else {
                _mm256_mul_ps(w.scale, dot)
            };
            Term { scale: activation_scale(xs[t], b), dot, min: _mm_setzero_ps() }
        },
    );
    // Lane 1 of the min terms: Q5_K's `offset * s` (zero for the others).
    sums.map(|(dot, min)| dot - min)
}
