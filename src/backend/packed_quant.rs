//! The CUDA backend's layout of a quantized linear layer, built on the host at upload:
//! every quantized format (AWQ/GPTQ, `--quantize`, GGUF) as integer levels plus one
//! `(scale, min)` pair per group, `w = fma(scale, level, min)`. kernels/quant_linear.cu
//! reads it; the levels of model/quant/levels.rs make the conversion lossless (the value
//! of every weight equals `dequantize_row`'s), so the CPU backend on the original file is
//! the twin of the GPU on this layout.
//!
//! Stacked parts (fused QKV, gate+up) may come in different formats (a GGUF Q4_K_M file
//! mixes Q4_K and Q6_K): the layer takes the most bits and the smallest group among its
//! parts, which holds each part exactly (4-bit levels fit in 8 bits; a group's pair is
//! repeated over the smaller groups inside it).

use rayon::prelude::*;

use crate::backend::abi::quant_layout_ok;
use crate::model::quant::levels::{level_format, row_levels, LevelFormat};
use crate::model::WeightTensor;

pub struct PackedQuant {
    pub format: LevelFormat,
    pub rows: usize,
    pub cols: usize,
    /// `[rows, cols * bits / 8]`. 4 bits: level of column 2j in the low nibble of byte j,
    /// 2j + 1 in the high nibble (unsigned 0..=15). 8 bits: one i8 per column.
    pub levels: Vec<u8>,
    /// `[rows, cols / group, 2]`: `(scale, min)` of each group of `group` columns.
    pub scale_min: Vec<f32>,
}

impl PackedQuant {
    /// Parts `[out_i, cols]` stacked along the rows, in one format that holds each part
    /// exactly. None when a part is not quantized (plain floats: the layer stays bf16)
    /// or the kernels cannot take the layout (`abi::quant_layout_ok`). The caller has
    /// checked that every part is 2-D with `cols` columns.
    pub fn from_parts(parts: &[&WeightTensor]) -> Option<PackedQuant> {
        let formats: Vec<LevelFormat> =
            parts.iter().map(|p| level_format(p.dtype)).collect::<Option<_>>()?;
        let bits = formats.iter().map(|f| f.bits).max()?;
        let group = formats.iter().map(|f| f.group).min()?;
        let cols = parts[0].row_len();
        // Groups are powers of two (16, 32, 128), so the smallest divides every other.
        if !quant_layout_ok(bits, cols, group)
            || formats.iter().any(|f| f.group % group != 0)
            || parts.iter().any(|p| p.row_len() != cols)
        {
            return None;
        }
        let format = LevelFormat { bits, group };
        let rows: usize = parts.iter().map(|p| p.rows()).sum();
        let level_bytes = cols * bits as usize / 8;
        let pairs = cols / group;
        let mut levels = vec![0u8; rows * level_bytes];
        let mut scale_min = vec![0f32; rows * pairs * 2];
        let mut first = 0;
        for (part, source) in parts.iter().zip(&formats) {
            let n = part.rows();
            let lv = &mut levels[first * level_bytes..(first + n) * level_bytes];
            let sm = &mut scale_min[first * pairs * 2..(first + n) * pairs * 2];
            lv.par_chunks_mut(level_bytes)
                .zip(sm.par_chunks_mut(pairs * 2))
                .enumerate()
                .for_each_init(
                    || RowScratch::new(cols, source.group),
                    |scratch, (r, (lv, sm))| {
                        scratch.pack(part, r, format, source.group, lv, sm);
                    },
                );
            first += n;
        }
        Some(PackedQuant { format, rows, cols, levels, scale_min })
    }

    /// Row `r` dequantized as the kernels do it: `fma(scale, level, min)` in f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "dequantize_row: output length");
        let LevelFormat { bits, group } = self.format;
        let level_bytes = self.cols * bits as usize / 8;
        let lv = &self.levels[r * level_bytes..(r + 1) * level_bytes];
        let sm = &self.scale_min[r * self.cols / group * 2..(r + 1) * self.cols / group * 2];
        for (c, o) in out.iter_mut().enumerate() {
            let level = match bits {
                4 => (lv[c / 2] >> (4 * (c % 2))) & 0xf,
                _ => lv[c],
            };
            let level = if bits == 4 { level as f32 } else { level as i8 as f32 };
            let (scale, min) = (sm[2 * (c / group)], sm[2 * (c / group) + 1]);
            *o = scale.mul_add(level, min);
        }
    }
}

/// One row's levels in its source format, reused across the rows of a rayon task.
struct RowScratch {
    level: Vec<i8>,
    scale: Vec<f32>,
    offset: Vec<f32>,
}

impl RowScratch {
    fn new(cols: usize, source_group: usize) -> Self {
        let groups = cols / source_group;
        RowScratch { level: vec![0; cols], scale: vec![0.0; groups], offset: vec![0.0; groups] }
    }

    /// Row `r` of `part` into `format`: levels `lv` `[cols * bits / 8]`, pairs `sm`
    /// `[cols / group * 2]`.
    fn pack(
        &mut self,
        part: &WeightTensor,
        r: usize,
        format: LevelFormat,
        source_group: usize,
        lv: &mut [u8],
        sm: &mut [f32],
    ) {
        row_levels(part.dtype, part.row(r), &mut self.level, &mut self.scale, &mut self.offset);
        if format.bits == 4 {
            // Every source of 4-bit levels is unsigned 0..=15 (levels.rs).
            for (byte, pair) in lv.iter_mut().zip(self.level.chunks_exact(2)) {
                *byte = (pair[0] as u8 & 0xf) | ((pair[1] as u8) << 4);
            }
        } else {
            for (byte, &level) in lv.iter_mut().zip(&self.level) {
                *byte = level as u8;
            }
        }
        for (g, pair) in sm.chunks_exact_mut(2).enumerate() {
            let s = g * format.group / source_group;
            pair[0] = self.scale[s];
            pair[1] = -self.offset[s];
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::quant::dequantize_row;
    use crate::model::quantize::{quantize_row_i4, quantize_row_i8, quantize_row_q4_1};
    use crate::model::tensor::Bytes;
    use crate::model::DType;

    fn tensor(dtype: DType, rows: usize, cols: usize, bytes: Vec<u8>) -> WeightTensor {
        assert_eq!(bytes.len(), dtype.row_bytes(cols).unwrap() * rows);
        WeightTensor { dtype, shape: vec![rows, cols], data: Bytes::Owned(Arc::new(bytes)) }
    }

    fn values(rows: usize, cols: usize, seed: u32) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2654435761).rotate_left(13);
                (h % 2001) as f32 / 1000.0 - 1.0 + (i % cols) as f32 * 1e-3
            })
            .collect()
    }

    /// Rows quantized with `quantize` into `dtype` blocks.
    fn quantized(
        dtype: DType,
        rows: usize,
        cols: usize,
        seed: u32,
        quantize: fn(&[f32], &mut [u8]) -> Result<(), crate::model::quantize::QuantizeError>,
    ) -> WeightTensor {
        let rb = dtype.row_bytes(cols).unwrap();
        let mut bytes = vec![0u8; rows * rb];
        for (w, out) in values(rows, cols, seed).chunks(cols).zip(bytes.chunks_mut(rb)) {
            quantize(w, out).unwrap();
        }
        tensor(dtype, rows, cols, bytes)
    }

    fn assert_exact(packed: &PackedQuant, parts: &[&WeightTensor]) {
        let cols = packed.cols;
        let (mut got, mut want) = (vec![0f32; cols], vec![0f32; cols]);
        let mut r = 0;
        for part in parts {
            for pr in 0..part.rows() {
                packed.dequantize_row(r, &mut got);
                dequantize_row(part.dtype, part.row(pr), &mut want);
                for c in 0..cols {
                    assert_eq!(got[c], want[c], "{} row {pr} col {c}", part.dtype);
                }
                r += 1;
            }
        }
        assert_eq!(r, packed.rows);
    }

    #[test]
    fn single_formats_pack_losslessly_in_their_own_layout() {
        let i4 = quantized(DType::I4, 5, 256, 1, quantize_row_i4);
        let i8 = quantized(DType::I8, 3, 384, 2, quantize_row_i8);
        let q41 = quantized(DType::Q4_1, 4, 96, 3, quantize_row_q4_1);
        for (t, bits, group) in [(&i4, 4, 128), (&i8, 8, 128), (&q41, 4, 32)] {
            let packed = PackedQuant::from_parts(&[t]).expect("packable");
            assert_eq!(packed.format, LevelFormat { bits, group });
            assert_eq!(packed.levels.len(), t.rows() * t.row_len() * bits as usize / 8);
            assert_exact(&packed, &[t]);
        }
    }

    #[test]
    fn mixed_parts_take_the_most_bits_and_the_smallest_group() {
        let a = quantized(DType::I4, 4, 256, 4, quantize_row_i4);
        let b = quantized(DType::I8, 2, 256, 5, quantize_row_i8);
        let c = quantized(DType::Q4_1, 3, 256, 6, quantize_row_q4_1);
        let packed = PackedQuant::from_parts(&[&a, &b, &c]).expect("packable");
        assert_eq!(packed.format, LevelFormat { bits: 8, group: 32 });
        assert_eq!(packed.rows, 9);
        assert_exact(&packed, &[&a, &b, &c]);
    }

    /// A Q3_K_M-like qkv (Q3_K q and k, Q4_K v) and the 32-value formats llama.cpp falls
    /// back to: 8-bit levels, groups of 16 and 32.
    #[test]
    fn decoded_level_formats_pack_losslessly() {
        let mut next = crate::model::quant::test_rows::xorshift(0x005e_ed0f_10b1);
        let mut random = |dtype: DType, rows: usize, cols: usize| {
            let bytes = (0..rows)
                .flat_map(|_| crate::model::quant::test_rows::random_row(dtype, cols, &mut next))
                .collect();
            tensor(dtype, rows, cols, bytes)
        };
        let (q, k, v) =
            (random(DType::Q3_K, 4, 512), random(DType::Q3_K, 2, 512), random(DType::Q4_K, 2, 512));
        let packed = PackedQuant::from_parts(&[&q, &k, &v]).expect("packable");
        assert_eq!(packed.format, LevelFormat { bits: 8, group: 16 });
        assert_exact(&packed, &[&q, &k, &v]);
        let (a, b) = (random(DType::Q2_K, 3, 256), random(DType::IQ4_XS, 2, 256));
        let packed = PackedQuant::from_parts(&[&a, &b]).expect("packable");
        assert_eq!(packed.format, LevelFormat { bits: 8, group: 16 });
        assert_exact(&packed, &[&a, &b]);
        for dtype in [DType::Q5_0, DType::Q5_1, DType::IQ4_NL] {
            let t = random(dtype, 3, 96);
            let packed = PackedQuant::from_parts(&[&t]).expect("packable");
            assert_eq!(packed.format, LevelFormat { bits: 8, group: 32 });
            assert_exact(&packed, &[&t]);
        }
    }

    #[test]
    fn float_parts_stay_unpacked() {
        let q = quantized(DType::I4, 2, 128, 7, quantize_row_i4);
        let f: Vec<u8> = values(2, 128, 8).iter().flat_map(|v| v.to_le_bytes()).collect();
        let f = tensor(DType::F32, 2, 128, f);
        assert!(PackedQuant::from_parts(&[&q, &f]).is_none());
        assert!(PackedQuant::from_parts(&[&f]).is_none());
    }
}
