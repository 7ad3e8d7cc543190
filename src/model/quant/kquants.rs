//! GGUF k-quants Q4_K, Q5_K and Q6_K: 256 values per super-block, little endian, laid
//! out as ggml's `block_q4_K` / `block_q5_K` / `block_q6_K` (`ggml-common.h`):
//!
//! - Q4_K (144 B): `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`. Eight sub-blocks
//!   of 32 with 6-bit scale `sc` and min `m` packed in `scales` (`scale_min`).
//!   `x = (d * sc) * q - (dmin * m)`, `q` a nibble. Values `64j..64j+32` are the low
//!   nibbles of `qs[32j..32j+32]` (sub-block `2j`), values `64j+32..64j+64` the high
//!   nibbles (sub-block `2j+1`).
//! - Q5_K (176 B): `d, dmin, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`. As Q4_K with
//!   a fifth bit: value `l` of sub-block `s` adds `16 * ((qh[l] >> s) & 1)`.
//! - Q6_K (210 B): `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`. Sixteen
//!   sub-blocks of 16, `x = (d * scales[s]) * (q - 32)` with `q` 6 bits: per half of 128
//!   values (`ql` 64 B, `qh` 32 B), values `32k + l` take the low (k = 0, 1) or high
//!   (k = 2, 3) nibble of `ql[l + 32 * (k % 2)]` and bits `2k, 2k+1` of `qh[l]` on top.
//!
//! `dequantize_row` computes each value with exactly ggml's (and gguf-py's) f32
//! operations in their order: one product for the sub-block scale, then `* q`, then
//! `- min` (Rust never fuses them), so it is bit-exact against both.
//!
//! `dot_row` runs the AVX2/FMA kernels of `kquants/x86.rs` when the CPU has them (chosen
//! at run time) and the portable ones here otherwise; `dot_row_portable` always runs the
//! portable ones, which dequantize one super-block into a stack buffer and accumulate in
//! 8 f32 lanes (a shape LLVM vectorizes on any target).

#[cfg(target_arch = "x86_64")]
mod x86;

use super::{f16_to_f32, hsum, le_u16, LANES};
use crate::model::DType;

/// Values per super-block.
pub(super) const QK_K: usize = 256;

/// Dequantizes one row of whole super-blocks: `out.len()` values from `row`. The caller
/// (quant::dequantize_row) has checked that the lengths agree.
pub fn dequantize_row(dtype: DType, row: &[u8], out: &mut [f32]) {
    debug_assert_eq!(dtype.row_bytes(out.len()), Some(row.len()));
    for (blk, o) in row.chunks_exact(dtype.block_bytes()).zip(out.chunks_exact_mut(QK_K)) {
        let o: &mut [f32; QK_K] = o.try_into().expect("chunks_exact yields QK_K");
        dequantize_superblock(dtype, blk, o);
    }
}

/// Dot product of one weight row with `x` (`x.len()` values, whole super-blocks),
/// AVX2/FMA where the CPU has it.
pub fn dot_row(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { x86::dot_row(dtype, row, x) };
    }
    dot_row_portable(dtype, row, x)
}

/// The portable dot product: each super-block dequantized exactly (`dequantize_row`'s
/// values), then `sum w * x` in 8 f32 lanes.
// Lane-indexed loops over parallel fixed-size arrays are the shape LLVM vectorizes.
#[allow(clippy::needless_range_loop)]
pub fn dot_row_portable(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    assert_eq!(dtype.row_bytes(x.len()), Some(row.len()), "{dtype} row length");
    let mut acc = [0f32; LANES];
    let mut w = [0f32; QK_K];
    for (blk, xs) in row.chunks_exact(dtype.block_bytes()).zip(x.chunks_exact(QK_K)) {
        dequantize_superblock(dtype, blk, &mut w);
        for c in 0..QK_K / LANES {
            for l in 0..LANES {
                acc[l] += w[c * LANES + l] * xs[c * LANES + l];
            }
        }
    }
    hsum(acc)
}

/// ggml's `get_scale_min_k4` for all eight sub-blocks: 6-bit scales and mins packed in
/// 12 bytes. Sub-blocks 0-3 keep theirs in the low 6 bits of bytes 0-3 (scale) and 4-7
/// (min); sub-blocks 4-7 take their low 4 bits from the nibbles of bytes 8-11 and their
/// top 2 bits from the spare top bits of bytes 0-3 (scale) and 4-7 (min).
#[inline(always)]
pub(super) fn scale_min(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0f) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, m)
}

/// Q4_K/Q5_K: the f32 scale `d * sc` and min `dmin * m` of each sub-block, computed as
/// ggml does (one f32 product each).
#[inline(always)]
pub(super) fn sub_scales(blk: &[u8]) -> ([f32; 8], [f32; 8]) {
    let d = f16_to_f32(le_u16(blk, 0));
    let dmin = f16_to_f32(le_u16(blk, 2));
    let (sc, m) = scale_min(&blk[4..16]);
    (sc.map(|s| d * s as f32), m.map(|m| dmin * m as f32))
}

/// One super-block as integer levels and per-sub-block affine maps: value `i` is
/// `scale[i / group] * level[i] - offset[i / group]`, computed that way (two f32
/// operations, never fused) it is exactly the value ggml computes. Q4_K/Q5_K: groups of
/// 32, levels 0..=15 / 0..=31, offset `dmin * m`; Q6_K: groups of 16, levels -32..=31,
/// offset 0. `scale` and `offset` must hold `QK_K / group` entries; returns `group`.
pub(super) fn superblock_levels(
    dtype: DType,
    blk: &[u8],
    level: &mut [i8; QK_K],
    scale: &mut [f32],
    offset: &mut [f32],
) -> usize {
    match dtype {
        DType::Q4_K | DType::Q5_K => {
            let (ds, ms) = sub_scales(blk);
            scale[..8].copy_from_slice(&ds);
            offset[..8].copy_from_slice(&ms);
            let (qh, qs) = if dtype == DType::Q5_K {
                (Some(&blk[16..48]), &blk[48..176])
            } else {
                (None, &blk[16..144])
            };
            for j in 0..4 {
                let q = &qs[32 * j..32 * j + 32];
                let (lo, hi) = level[64 * j..64 * j + 64].split_at_mut(32);
                for l in 0..32 {
                    // Q5_K's fifth bit of sub-block s sits at bit s of qh[l].
                    let (h1, h2) = qh.map_or((0, 0), |qh| {
                        (((qh[l] >> (2 * j)) & 1) << 4, ((qh[l] >> (2 * j + 1)) & 1) << 4)
                    });
                    lo[l] = ((q[l] & 0x0f) | h1) as i8;
                    hi[l] = ((q[l] >> 4) | h2) as i8;
                }
            }
            32
        }
        DType::Q6_K => {
            let d = f16_to_f32(le_u16(blk, 208));
            for (s, sc) in scale[..16].iter_mut().enumerate() {
                *sc = d * (blk[192 + s] as i8) as f32;
            }
            offset[..16].fill(0.0);
            for n in 0..2 {
                let ql = &blk[64 * n..64 * n + 64];
                let qh = &blk[128 + 32 * n..128 + 32 * n + 32];
                let level = &mut level[128 * n..128 * n + 128];
                for l in 0..32 {
                    let q = |low: u8, high: u8| (low | (high << 4)) as i8 - 32;
                    level[l] = q(ql[l] & 0x0f, qh[l] & 3);
                    level[l + 32] = q(ql[l + 32] & 0x0f, (qh[l] >> 2) & 3);
                    level[l + 64] = q(ql[l] >> 4, (qh[l] >> 4) & 3);
                    level[l + 96] = q(ql[l + 32] >> 4, (qh[l] >> 6) & 3);
                }
            }
            16
        }
        other => unreachable!("{other} is not a k-quant"),
    }
}

/// Every k-quant super-block through its levels: `scale * level - offset`, ggml's
/// operations in ggml's order (Q6_K's offset is 0, and `v - 0.0` is `v`, signed zeros
/// included).
fn dequantize_superblock(dtype: DType, blk: &[u8], out: &mut [f32; QK_K]) {
    let mut level = [0i8; QK_K];
    let (mut scale, mut offset) = ([0f32; 16], [0f32; 16]);
    let group = superblock_levels(dtype, blk, &mut level, &mut scale, &mut offset);
    for (i, (o, &l)) in out.iter_mut().zip(&level).enumerate() {
        *o = scale[i / group] * l as f32 - offset[i / group];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift: random bytes without a dependency on the rand crate's stream.
    fn bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect()
    }

    /// Random super-blocks with finite f16 scales: exponent 2..=9, so about ±[1e-4, 0.03].
    fn random_row(dtype: DType, n: usize, seed: u64) -> Vec<u8> {
        let mut row = bytes(dtype.row_bytes(n).unwrap(), seed);
        for blk in row.chunks_exact_mut(dtype.block_bytes()) {
            let at: &[usize] = if dtype == DType::Q6_K { &[208] } else { &[0, 2] };
            for &a in at {
                let exponent = ((blk[a + 1] >> 2) & 7) + 2;
                blk[a + 1] = (blk[a + 1] & 0x83) | (exponent << 2);
            }
        }
        row
    }

    #[test]
    fn scale_min_follows_get_scale_min_k4() {
        // ggml-quants.c get_scale_min_k4, transcribed branch by branch.
        let reference = |j: usize, q: &[u8]| {
            if j < 4 {
                (q[j] & 63, q[j + 4] & 63)
            } else {
                ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
            }
        };
        for seed in 1..200 {
            let s = bytes(12, seed);
            let (sc, m) = scale_min(&s);
            for j in 0..8 {
                assert_eq!((sc[j], m[j]), reference(j, &s), "sub-block {j} of {s:02x?}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_scale_unpacking_equals_the_scalar_one() {
        if !x86::available() {
            return;
        }
        for seed in 1..500 {
            let blk = random_row(DType::Q4_K, 256, seed);
            // SAFETY: available() above.
            let (ds, ms) = unsafe { x86::scales(&blk) };
            let (want_ds, want_ms) = sub_scales(&blk);
            assert_eq!(ds.map(f32::to_bits), want_ds.map(f32::to_bits), "{:02x?}", &blk[..16]);
            assert_eq!(ms.map(f32::to_bits), want_ms.map(f32::to_bits), "{:02x?}", &blk[..16]);
        }
    }

    #[test]
    fn simd_and_portable_kernels_agree_with_the_dequantized_dot() {
        for dtype in [DType::Q4_K, DType::Q5_K, DType::Q6_K] {
            for (i, n) in [256usize, 512, 2048, 4096].into_iter().enumerate() {
                let row = random_row(dtype, n, 0x5eed + i as u64);
                let x: Vec<f32> =
                    bytes(n, 99 + i as u64).iter().map(|&b| b as f32 / 64.0 - 2.0).collect();
                let mut w = vec![0f32; n];
                dequantize_row(dtype, &row, &mut w);
                let exact: f64 = w.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                let scale: f64 = w.iter().zip(&x).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                let mut got = vec![("portable", dot_row_portable(dtype, &row, &x))];
                #[cfg(target_arch = "x86_64")]
                if x86::available() {
                    got.push(("avx2", unsafe { x86::dot_row(dtype, &row, &x) }));
                }
                for (path, v) in got {
                    let err = (v as f64 - exact).abs();
                    assert!(err <= 1e-5 * scale, "{dtype} n={n} {path}: {v} vs {exact} ({scale})");
                }
            }
        }
    }
}
