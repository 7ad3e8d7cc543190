//! Every quantized format in one shape: small integer levels and one affine map per
//! group of consecutive values, `x[i] = scale[g] * level[i] - offset[g]` with
//! `g = i / group`. The CUDA backend repacks every format into this shape at upload
//! (backend/packed_quant.rs), so two kernels (4- and 8-bit levels) serve every format
//! losslessly.
//!
//! Exactness. For each format `scale * level - offset`, evaluated as two f32 operations
//! or as one fused multiply-add, equals the value `dequantize_row` gives (as `==`; only
//! the sign of a zero may differ between the two evaluations), because `scale * level`
//! is exact in f32 wherever the offset is not zero:
//! - I4: `s * (q - z)` with s f16 (11 significant bits) and 4-bit q, z: offset `s * z`
//!   and `s * q` are exact (15 bits), and so is their difference, which `s * (q - z)`
//!   rounds to itself.
//! - Q4_0: the same with z = 8. Q4_1: `d * q + m`, offset `-m`; `d * q` is exact.
//! - Q4_K / Q5_K: ggml's own form; `(d * sc) * q` has 11 + 6 + 5 bits at most.
//! - I8, Q8_0, Q6_K: offset 0, one rounding of `scale * level` either way.
//! - Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, IQ4_XS: decoded_levels.rs, whose own values are
//!   `scale * level - offset` (its module documentation says why that is exact).

use super::decoded_levels::{self, BlockLevels};
use super::kquants::{self, QK_K};
use super::{f16_to_f32, le_u16};
use crate::model::DType;

/// Storage of one format's levels: `bits` (4: unsigned 0..=15, 8: signed i8) and the
/// values per affine map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LevelFormat {
    pub bits: u32,
    pub group: usize,
}

/// The level format of a quantized dtype; None for plain floats.
pub fn level_format(dtype: DType) -> Option<LevelFormat> {
    let (bits, group) = match dtype {
        DType::F32 | DType::F16 | DType::BF16 => return None,
        DType::I8 => (8, 128),
        DType::I4 => (4, 128),
        DType::Q8_0 => (8, 32),
        DType::Q4_0 | DType::Q4_1 | DType::Q4_K => (4, 32),
        DType::Q5_K => (8, 32),
        DType::Q6_K => (8, 16),
        // 5-bit and table levels need 8 bits; Q2_K's and Q3_K's 16-value groups are below
        // the 4-bit kernels' 32 (abi::quant_layout_ok), so they take 8 bits too.
        DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL | DType::IQ4_XS => (8, 32),
        DType::Q2_K | DType::Q3_K => (8, 16),
    };
    Some(LevelFormat { bits, group })
}

/// Decodes one row of `level.len()` values of a quantized `dtype` into levels and the
/// `level.len() / group` scales and offsets of its groups (`level_format(dtype)`).
/// The caller checked the row's length (it comes from a validated tensor).
pub fn row_levels(
    dtype: DType,
    row: &[u8],
    level: &mut [i8],
    scale: &mut [f32],
    offset: &mut [f32],
) {
    let format = level_format(dtype).unwrap_or_else(|| panic!("{dtype} has no levels"));
    let n = level.len();
    assert!(
        dtype.row_bytes(n) == Some(row.len())
            && scale.len() == n / format.group
            && offset.len() == scale.len(),
        "{dtype}: {} bytes, {} scales for {n} values",
        row.len(),
        scale.len()
    );
    let blocks = row.chunks_exact(dtype.block_bytes());
    match dtype {
        DType::I8 => {
            for (((blk, l), s), o) in
                blocks.zip(level.chunks_exact_mut(128)).zip(scale.iter_mut()).zip(offset.iter_mut())
            {
                *s = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
                *o = 0.0;
                for (l, &q) in l.iter_mut().zip(&blk[4..]) {
                    *l = q as i8;
                }
            }
        }
        DType::Q8_0 => {
            for (((blk, l), s), o) in
                blocks.zip(level.chunks_exact_mut(32)).zip(scale.iter_mut()).zip(offset.iter_mut())
            {
                *s = f16_to_f32(le_u16(blk, 0));
                *o = 0.0;
                for (l, &q) in l.iter_mut().zip(&blk[2..]) {
                    *l = q as i8;
                }
            }
        }
        DType::I4 => {
            for (((blk, l), s), o) in
                blocks.zip(level.chunks_exact_mut(128)).zip(scale.iter_mut()).zip(offset.iter_mut())
            {
                *s = f16_to_f32(le_u16(blk, 0));
                *o = *s * blk[2] as f32;
                // Neighbours share a byte: value 2j low nibble, 2j + 1 high nibble.
                for (pair, &q) in l.chunks_exact_mut(2).zip(&blk[4..]) {
                    pair[0] = (q & 0xf) as i8;
                    pair[1] = (q >> 4) as i8;
                }
            }
        }
        DType::Q4_0 | DType::Q4_1 => {
            let qs_at = if dtype == DType::Q4_0 { 2 } else { 4 };
            for (((blk, l), s), o) in
                blocks.zip(level.chunks_exact_mut(32)).zip(scale.iter_mut()).zip(offset.iter_mut())
            {
                *s = f16_to_f32(le_u16(blk, 0));
                *o = if dtype == DType::Q4_0 { *s * 8.0 } else { -f16_to_f32(le_u16(blk, 2)) };
                // ggml's split halves: value j low nibble of byte j, value j + 16 high.
                let (lo, hi) = l.split_at_mut(16);
                for (j, &q) in blk[qs_at..qs_at + 16].iter().enumerate() {
                    lo[j] = (q & 0xf) as i8;
                    hi[j] = (q >> 4) as i8;
                }
            }
        }
        DType::Q4_K | DType::Q5_K | DType::Q6_K => {
            let per_block = QK_K / format.group;
            for (((blk, l), s), o) in blocks
                .zip(level.chunks_exact_mut(QK_K))
                .zip(scale.chunks_exact_mut(per_block))
                .zip(offset.chunks_exact_mut(per_block))
            {
                let l: &mut [i8; QK_K] = l.try_into().expect("chunks_exact yields QK_K");
                kquants::superblock_levels(dtype, blk, l, s, o);
            }
        }
        DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL | DType::Q2_K | DType::Q3_K | DType::IQ4_XS => {
            debug_assert_eq!(format.group, decoded_levels::group(dtype));
            let (elems, groups) = (dtype.block_elems(), dtype.block_elems() / format.group);
            let mut decoded = BlockLevels::new();
            for (((blk, l), s), o) in blocks
                .zip(level.chunks_exact_mut(elems))
                .zip(scale.chunks_exact_mut(groups))
                .zip(offset.chunks_exact_mut(groups))
            {
                decoded.decode(dtype, blk);
                l.copy_from_slice(&decoded.level[..elems]);
                s.copy_from_slice(&decoded.scale[..groups]);
                o.copy_from_slice(&decoded.offset[..groups]);
            }
        }
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("checked by level_format"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::{dequantize_row, f16_fields};

    /// xorshift bytes; scales are then tamed so every value is finite.
    fn random_row(dtype: DType, n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        let mut row: Vec<u8> = (0..dtype.row_bytes(n).unwrap())
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 24) as u8
            })
            .collect();
        // f16 fields: exponent 2..=17 keeps |scale| in about [6e-5, 4] (subnormal-free
        // but wide); I8's f32 scale gets a small exponent too.
        let tame_f16 = |b: &mut [u8], at: usize| {
            let e = (b[at + 1] >> 2) % 16 + 2;
            b[at + 1] = (b[at + 1] & 0x83) | (e << 2);
        };
        for blk in row.chunks_exact_mut(dtype.block_bytes()) {
            match dtype {
                DType::I8 => blk[3] = (blk[3] & 0x80) | 0x3c,
                DType::I4 => blk[2] &= 0xf,
                _ => {}
            }
            for &at in f16_fields(dtype) {
                tame_f16(blk, at);
            }
        }
        row
    }

    #[test]
    fn levels_reproduce_dequantize_row_exactly_both_ways() {
        let dtypes = [
            DType::I8,
            DType::I4,
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
            DType::Q4_K,
            DType::Q5_K,
            DType::Q6_K,
            DType::Q5_0,
            DType::Q5_1,
            DType::IQ4_NL,
            DType::Q2_K,
            DType::Q3_K,
            DType::IQ4_XS,
        ];
        for dtype in dtypes {
            let format = level_format(dtype).unwrap();
            for (seed, n) in [(1u64, 256usize), (2, 512), (3, 1024), (4, 4096)] {
                let row = random_row(dtype, n, seed * 7919 + dtype as u64);
                let mut want = vec![0f32; n];
                dequantize_row(dtype, &row, &mut want);
                let mut level = vec![0i8; n];
                let mut scale = vec![0f32; n / format.group];
                let mut offset = vec![0f32; n / format.group];
                row_levels(dtype, &row, &mut level, &mut scale, &mut offset);
                for i in 0..n {
                    let (s, o, l) = (scale[i / format.group], offset[i / format.group], level[i]);
                    let (lo, hi) = if format.bits == 4 { (0, 15) } else { (-128, 127) };
                    assert!((lo..=hi).contains(&(l as i32)), "{dtype} level {l} at {i}");
                    let two_ops = s * l as f32 - o;
                    let fused = s.mul_add(l as f32, -o);
                    assert!(want[i].is_finite(), "{dtype}: the test row must be finite");
                    assert_eq!(two_ops, want[i], "{dtype} n={n} element {i} (two ops)");
                    assert_eq!(fused, want[i], "{dtype} n={n} element {i} (fused)");
                }
            }
        }
    }

    #[test]
    fn float_formats_have_no_levels() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(level_format(dtype), None);
        }
    }
}
