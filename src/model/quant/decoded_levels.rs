//! The GGUF formats that every kernel reaches through their decoded levels: Q5_0, Q5_1
//! and IQ4_NL (32 values a block), Q2_K, Q3_K and IQ4_XS (256 values a super-block).
//! With them llama.cpp's q2_k, q3_k_m and q5_0 mixes load, as do its fallbacks for rows
//! that are not whole super-blocks (Q4_K -> Q5_0, Q5_K -> Q5_1, Q2_K/Q3_K -> IQ4_NL or
//! Q4_0).
//!
//! Layouts (ggml-common.h), little endian, `f16` scales:
//! - Q5_0 (22 B): `d, qh: u32, qs: [u8; 16]`. Value `j < 16` is the low nibble of `qs[j]`
//!   with bit `j` of `qh` as its fifth bit, value `j + 16` the high nibble with bit
//!   `j + 16`; `x = d * (q - 16)`.
//! - Q5_1 (24 B): `d, m, qh, qs`, the same levels unsigned: `x = d * q + m`.
//! - IQ4_NL (18 B): `d, qs: [u8; 16]`, nibbles as Q4_0's indexing `IQ4_VALUES`:
//!   `x = d * IQ4_VALUES[q]`.
//! - Q2_K (84 B): `scales: [u8; 16], qs: [u8; 64], d, dmin`. Sixteen sub-blocks of 16
//!   with a 4-bit scale (low nibble of `scales[s]`) and min (high nibble):
//!   `x = (d * sc) * q - (dmin * m)`, `q` two bits. In each half of 128 values, sub-block
//!   pair `j` (values `32j..32j + 32`) takes bits `2j, 2j + 1` of `qs[32 * half..][..32]`.
//! - Q3_K (110 B): `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d`. Sixteen 6-bit
//!   scales (`q3_k_scales`), `x = (d * (sc - 32)) * q` with `q` = two bits as Q2_K's,
//!   minus 4 where the sub-block pair's bit of `hmask[l]` is clear.
//! - IQ4_XS (136 B): `d, scales_h: u16, scales_l: [u8; 4], qs: [u8; 128]`. Eight
//!   sub-blocks of 32, each IQ4_NL's nibble layout over `qs[16 * s..][..16]` with a 6-bit
//!   scale `ls` (nibble `s % 2` of `scales_l[s / 2]`, two bits of `scales_h` on top):
//!   `x = (d * (ls - 32)) * IQ4_VALUES[q]`.
//!
//! Each block decodes to i8 levels and one `(scale, offset)` per group of 32 or 16 values,
//! `x = scale * level - offset`, with `scale * level` exact in f32 (at most 11 + 8 bits,
//! or a product of two exact factors rounded once as ggml rounds it), so `dequantize_row`
//! is bit-exact against ggml and gguf-py. The f32 and 8-bit-activation dot products and
//! the CUDA upload (levels.rs) all start from these levels.

#[cfg(target_arch = "x86_64")]
pub(super) mod x86;

use super::{f16_to_f32, hsum, le_u16, LANES};
use crate::model::DType;

/// The largest block of the formats here.
pub(super) const MAX_BLOCK: usize = 256;
/// The most groups a block has (Q2_K's and Q3_K's sixteen sub-blocks).
pub(super) const MAX_GROUPS: usize = 16;

/// IQ4_NL's and IQ4_XS's sixteen levels (ggml-common.h `kvalues_iq4nl`).
const IQ4_VALUES: [i8; 16] =
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// Whether `dtype` is one of the formats here.
pub fn covers(dtype: DType) -> bool {
    matches!(
        dtype,
        DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL | DType::Q2_K | DType::Q3_K | DType::IQ4_XS
    )
}

/// Values per `(scale, offset)` group of a format here.
pub fn group(dtype: DType) -> usize {
    with_format!(dtype, F => id::group(F))
}

/// The formats as constants, for kernels monomorphized per format (`with_format!`):
/// const generics cannot take a `DType`.
pub(super) mod id {
    pub const Q5_0: u8 = 0;
    pub const Q5_1: u8 = 1;
    pub const IQ4_NL: u8 = 2;
    pub const Q2_K: u8 = 3;
    pub const Q3_K: u8 = 4;
    pub const IQ4_XS: u8 = 5;
    /// Not decoded here (kquants.rs is its home); only its 8-bit activation kernel
    /// shares the register decoding of x86.rs.
    pub const Q5_K: u8 = 6;

    /// Values per block.
    pub const fn elems(f: u8) -> usize {
        match f {
            Q5_0 | Q5_1 | IQ4_NL => 32,
            _ => 256,
        }
    }

    /// Values per group.
    pub const fn group(f: u8) -> usize {
        match f {
            Q2_K | Q3_K => 16,
            _ => 32,
        }
    }

    /// Whether the groups have offsets (mins) that are not zero.
    pub const fn has_offset(f: u8) -> bool {
        matches!(f, Q5_1 | Q2_K | Q5_K)
    }
}

/// `$body` with the constant `$f` set to `dtype`'s format id (`id`); unreachable for a
/// `dtype` that `covers` does not take.
macro_rules! with_format {
    ($dtype:expr, $f:ident => $body:expr) => {
        match $dtype {
            DType::Q5_0 => {
                const $f: u8 = $crate::model::quant::decoded_levels::id::Q5_0;
                $body
            }
            DType::Q5_1 => {
                const $f: u8 = $crate::model::quant::decoded_levels::id::Q5_1;
                $body
            }
            DType::IQ4_NL => {
                const $f: u8 = $crate::model::quant::decoded_levels::id::IQ4_NL;
                $body
            }
            DType::Q2_K => {
                const $f: u8 = $crate::model::quant::decoded_levels::id::Q2_K;
                $body
            }
            DType::Q3_K => {
                const $f: u8 = $crate::model::quant::decoded_levels::id::Q3_K;
                $body
            }
            DType::IQ4_XS => {
                const $f: u8 = $crate::model::quant::decoded_levels::id::IQ4_XS;
                $body
            }
            other => unreachable!("{other} is not decoded through levels"),
        }
    };
}
pub(super) use with_format;

/// One block's levels and the affine map of each group.
pub(super) struct BlockLevels {
    pub level: [i8; MAX_BLOCK],    // [block_elems]
    pub scale: [f32; MAX_GROUPS],  // [block_elems / group]
    pub offset: [f32; MAX_GROUPS], // [block_elems / group]
}

impl BlockLevels {
    pub fn new() -> Self {
        BlockLevels { level: [0; MAX_BLOCK], scale: [0.0; MAX_GROUPS], offset: [0.0; MAX_GROUPS] }
    }

    /// Decodes block `blk` of `dtype` (`dtype.block_bytes()` bytes): levels
    /// `0..dtype.block_elems()` and groups `0..block_elems / group(dtype)`.
    pub fn decode(&mut self, dtype: DType, blk: &[u8]) {
        debug_assert_eq!(blk.len(), dtype.block_bytes());
        with_format!(dtype, F => self.decode_as::<F>(blk))
    }

    /// `decode` for the format `F` (`id`).
    #[inline(always)]
    pub fn decode_as<const F: u8>(&mut self, blk: &[u8]) {
        match F {
            id::Q5_0 | id::Q5_1 => {
                let has_min = F == id::Q5_1;
                let at = if has_min { 4 } else { 2 };
                self.scale[0] = f16_to_f32(le_u16(blk, 0));
                // Q5_0 keeps its levels signed (offset 0), Q5_1 unsigned under its min.
                self.offset[0] = if has_min { -f16_to_f32(le_u16(blk, 2)) } else { 0.0 };
                let bias = if has_min { 0 } else { 16 };
                let qh = u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
                let qs: &[u8; 16] = blk[at + 4..at + 20].try_into().expect("16 bytes");
                let (lo, hi) = self.level.split_at_mut(16);
                for (j, (&q, (lo, hi))) in qs.iter().zip(lo.iter_mut().zip(hi)).enumerate() {
                    let h0 = (((qh >> j) & 1) << 4) as u8;
                    let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
                    *lo = ((q & 0x0f) | h0) as i8 - bias;
                    *hi = ((q >> 4) | h1) as i8 - bias;
                }
            }
            id::IQ4_NL => {
                self.scale[0] = f16_to_f32(le_u16(blk, 0));
                self.offset[0] = 0.0;
                iq4_nibbles(&blk[2..18], &mut self.level[..32]);
            }
            id::IQ4_XS => {
                superblock_scales::<F>(blk, &mut self.scale, &mut self.offset);
                for s in 0..8 {
                    iq4_nibbles(
                        &blk[8 + 16 * s..24 + 16 * s],
                        &mut self.level[32 * s..32 * s + 32],
                    );
                }
            }
            id::Q2_K => {
                superblock_scales::<F>(blk, &mut self.scale, &mut self.offset);
                two_bit_levels(&blk[16..80], |_, _| 0, &mut self.level);
            }
            id::Q3_K => {
                superblock_scales::<F>(blk, &mut self.scale, &mut self.offset);
                let hmask = &blk[..32];
                // Bit `4 * half + pair` of hmask[l] set: the level stands; clear: minus 4.
                let minus = |bit: usize, l: usize| if hmask[l] >> bit & 1 == 0 { 4 } else { 0 };
                two_bit_levels(&blk[32..96], minus, &mut self.level);
            }
            _ => unreachable!("format id {F}"),
        }
    }

    /// The block's values, `scale * level - offset` as two f32 operations (ggml's).
    #[inline(always)]
    fn values<const F: u8>(&self, out: &mut [f32]) {
        let (n, g) = (id::elems(F), id::group(F));
        let groups = out[..n].chunks_exact_mut(g).zip(self.level[..n].chunks_exact(g));
        for ((out, level), (&scale, &offset)) in groups.zip(self.scale.iter().zip(&self.offset)) {
            for (o, &l) in out.iter_mut().zip(level) {
                *o = scale * l as f32 - offset;
            }
        }
    }
}

/// The group scales and offsets of a super-block of IQ4_XS (eight: `d * (ls - 32)`, 0),
/// Q2_K (sixteen: `d * sc`, `dmin * m`) or Q3_K (sixteen: `d * (sc - 32)`, 0); the
/// scalar decoding and the AVX2 kernels share it.
#[inline(always)]
pub(super) fn superblock_scales<const F: u8>(
    blk: &[u8],
    scale: &mut [f32; MAX_GROUPS],
    offset: &mut [f32; MAX_GROUPS],
) {
    match F {
        id::IQ4_XS => {
            let d = f16_to_f32(le_u16(blk, 0));
            let scales_h = le_u16(blk, 2);
            for (s, scale) in scale[..8].iter_mut().enumerate() {
                let low = (blk[4 + s / 2] >> (4 * (s % 2))) & 0x0f;
                let high = ((scales_h >> (2 * s)) & 3) as u8;
                *scale = d * ((low | (high << 4)) as i32 - 32) as f32;
            }
            offset[..8].fill(0.0);
        }
        id::Q2_K => {
            let (d, dmin) = (f16_to_f32(le_u16(blk, 80)), f16_to_f32(le_u16(blk, 82)));
            for ((scale, offset), &sc) in scale.iter_mut().zip(offset).zip(&blk[..16]) {
                *scale = d * (sc & 0x0f) as f32;
                *offset = dmin * (sc >> 4) as f32;
            }
        }
        id::Q3_K => {
            let d = f16_to_f32(le_u16(blk, 108));
            for (scale, sc) in scale.iter_mut().zip(q3_k_scales(&blk[96..108])) {
                *scale = d * (sc as i32 - 32) as f32;
            }
            offset.fill(0.0);
        }
        _ => unreachable!("format id {F} has no super-block scales"),
    }
}

/// Sixteen bytes of IQ4 nibbles: value `j` the low nibble of byte `j`, `j + 16` the high.
#[inline(always)]
fn iq4_nibbles(qs: &[u8], level: &mut [i8]) {
    let (lo, hi) = level.split_at_mut(16);
    for j in 0..16 {
        lo[j] = IQ4_VALUES[(qs[j] & 0x0f) as usize];
        hi[j] = IQ4_VALUES[(qs[j] >> 4) as usize];
    }
}

/// Q2_K's and Q3_K's 2-bit levels of one super-block from `qs` (64 bytes), each minus
/// `minus(bit, l)` for byte `l` of its 32 and bit `4 * half + pair` of the high mask.
#[inline(always)]
fn two_bit_levels(qs: &[u8], minus: impl Fn(usize, usize) -> i8, level: &mut [i8; MAX_BLOCK]) {
    for half in 0..2 {
        let q = &qs[32 * half..32 * half + 32];
        for pair in 0..4 {
            let out = &mut level[128 * half + 32 * pair..128 * half + 32 * pair + 32];
            for l in 0..32 {
                out[l] = ((q[l] >> (2 * pair)) & 3) as i8 - minus(4 * half + pair, l);
            }
        }
    }
}

/// Q3_K's sixteen 6-bit scales (0..=63) from their 12 bytes: scales 0-7 keep their low
/// nibbles in the low nibbles of bytes 0-7 and 8-15 in the high ones; the top two bits of
/// scale `s` are bits `2 * (s / 4)..` of byte `8 + s % 4` (ggml's `kmask1`/`kmask2`).
#[inline(always)]
pub(super) fn q3_k_scales(s: &[u8]) -> [u8; 16] {
    let mut sc = [0u8; 16];
    for i in 0..4 {
        let top = s[8 + i];
        sc[i] = (s[i] & 0x0f) | ((top & 3) << 4);
        sc[4 + i] = (s[4 + i] & 0x0f) | (((top >> 2) & 3) << 4);
        sc[8 + i] = (s[i] >> 4) | (((top >> 4) & 3) << 4);
        sc[12 + i] = (s[4 + i] >> 4) | (((top >> 6) & 3) << 4);
    }
    sc
}

/// Dequantizes one row of whole blocks; the caller checked the lengths.
pub fn dequantize_row(dtype: DType, row: &[u8], out: &mut [f32]) {
    with_format!(dtype, F => dequantize_as::<F>(dtype.block_bytes(), row, out))
}

fn dequantize_as<const F: u8>(block_bytes: usize, row: &[u8], out: &mut [f32]) {
    let mut levels = BlockLevels::new();
    for (blk, o) in row.chunks_exact(block_bytes).zip(out.chunks_exact_mut(id::elems(F))) {
        levels.decode_as::<F>(blk);
        levels.values::<F>(o);
    }
}

/// Each block dequantized exactly (`dequantize_row`'s values), then `sum w * x` in 8 f32
/// lanes; the caller checked the lengths.
#[inline(always)]
pub fn dot_row_portable(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    with_format!(dtype, F => dot_as::<F>(dtype.block_bytes(), row, x))
}

// Lane-indexed loops over parallel fixed-size arrays are the shape LLVM vectorizes.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn dot_as<const F: u8>(block_bytes: usize, row: &[u8], x: &[f32]) -> f32 {
    let n = id::elems(F);
    let mut acc = [0f32; LANES];
    let mut levels = BlockLevels::new();
    let mut w = [0f32; MAX_BLOCK];
    for (blk, xs) in row.chunks_exact(block_bytes).zip(x.chunks_exact(n)) {
        levels.decode_as::<F>(blk);
        levels.values::<F>(&mut w);
        for c in 0..n / LANES {
            for l in 0..LANES {
                acc[l] += w[c * LANES + l] * xs[c * LANES + l];
            }
        }
    }
    hsum(acc)
}

/// The dot product on AVX2 (x86.rs): levels decoded in registers.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `row` holds `x.len()` values of `dtype`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_row_avx2(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    with_format!(dtype, F => x86::dot_row::<F>(dtype.block_bytes(), row, x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::test_rows::{random_row, xorshift};

    /// ggml-quants.c's Q3_K scale unpacking (`kmask1`, `kmask2` over u32 words),
    /// transcribed as written there.
    fn q3_k_scales_as_ggml(s: &[u8]) -> [u8; 16] {
        const KMASK1: u32 = 0x0303_0303;
        const KMASK2: u32 = 0x0f0f_0f0f;
        let word =
            |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
        let mut aux = [word(0), word(1), word(2), 0];
        let tmp = aux[2];
        aux[2] = ((aux[0] >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4);
        aux[3] = ((aux[1] >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4);
        aux[0] = (aux[0] & KMASK2) | ((tmp & KMASK1) << 4);
        aux[1] = (aux[1] & KMASK2) | (((tmp >> 2) & KMASK1) << 4);
        let mut out = [0u8; 16];
        for (i, w) in aux.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    #[test]
    fn q3_k_scales_follow_ggml() {
        let mut next = xorshift(0x3a5c_a1e5_0000_0001);
        for _ in 0..500 {
            let s: Vec<u8> = (0..12).map(|_| next() as u8).collect();
            assert_eq!(q3_k_scales(&s), q3_k_scales_as_ggml(&s), "{s:02x?}");
        }
    }

    #[test]
    fn levels_stay_in_each_formats_range() {
        let mut next = xorshift(0x1e7e_1500_dead_beef);
        let ranges = [
            (DType::Q5_0, -16, 15),
            (DType::Q5_1, 0, 31),
            (DType::IQ4_NL, -127, 113),
            (DType::IQ4_XS, -127, 113),
            (DType::Q2_K, 0, 3),
            (DType::Q3_K, -4, 3),
        ];
        for (dtype, lo, hi) in ranges {
            let row = random_row(dtype, 4096, &mut next);
            let mut levels = BlockLevels::new();
            let (mut min, mut max) = (i8::MAX, i8::MIN);
            for blk in row.chunks_exact(dtype.block_bytes()) {
                levels.decode(dtype, blk);
                for &l in &levels.level[..dtype.block_elems()] {
                    (min, max) = (min.min(l), max.max(l));
                }
            }
            // 4096 random values reach both ends of every range.
            assert_eq!((min as i32, max as i32), (lo, hi), "{dtype}");
        }
    }
}
