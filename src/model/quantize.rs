//! On-the-fly weight quantization into Qilin's I8 / I4 block formats (quant/intq.rs):
//! `--quantize int8|int4` at load, and `qilin quantize`, which saves the result.
//!
//! - int8: per output channel, symmetric. One scale per row, `s = max|w_row| / 127`
//!   (f32), repeated in every 128-value block of the row; `q = round(w / s)`.
//! - int4: groups of 128 along the row, asymmetric (AWQ/GPTQ's scheme). Per group, with
//!   `lo = min(min w, 0)` and `hi = max(max w, 0)`: `s = (hi - lo) / 15` rounded *up* to
//!   f16 (the stored scale), `z = round(-lo / s)` in 0..=15, `q = clamp(round(w / s) +
//!   z, 0, 15)`. Widening the range to include 0 (as GPTQ's quantizer does) keeps `z`
//!   inside 0..=15 for groups that do not straddle zero, where clamping `z` would clip
//!   the whole group; rounding `s` up keeps every weight inside the 16 levels.
//!
//! `round` is round-half-to-even (numpy's and torch's), computed in f64. Both formats
//! then reproduce every weight within half a step: `|w - s(q - z)| <= s / 2` (plus
//! f32 rounding of the product).
//!
//! What is quantized: 2-D `*.weight` tensors in bf16/f16/f32 whose rows are whole
//! 128-value blocks, i.e. the linear layers. Norms and biases (1-D) never are; the
//! embeddings and lm_head only when asked (`include_embeddings`); tensors already in a
//! quantized format (GGUF, AWQ/GPTQ) are left as they are.
//!
//! Rows that are a multiple of 32 but not of 128 (SmolLM2's 576-wide hidden) use the
//! 32-value GGUF block of the same scheme instead, so a narrow model is still measured
//! quantized: int8 -> Q8_0 (symmetric, f16 scale per 32 values, llama.cpp's
//! `quantize_row_q8_0_ref`), int4 -> Q4_1 (asymmetric: f16 scale and min per 32 values,
//! `quantize_row_q4_1_ref`). Other widths keep their format, with one info line.

use std::collections::{BTreeMap, HashMap};

use half::f16;
use rayon::prelude::*;

use super::loader::LoadedModel;
use super::quant::dequantize_row;
use super::tensor::Bytes;
use super::{DType, LoadError, WeightTensor};

/// Values per block of I8 and I4.
const BLOCK: usize = 128;
const I8_BLOCK_BYTES: usize = 132;
const I4_BLOCK_BYTES: usize = 68;

/// `--quantize` / `qilin quantize --method`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantizeMethod {
    /// Weights stay in their file format.
    #[default]
    None,
    /// I8, per-output-channel symmetric.
    Int8,
    /// I4, group 128 asymmetric.
    Int4,
}

impl QuantizeMethod {
    /// The block format this method writes, None for `None`.
    pub fn dtype(self) -> Option<DType> {
        match self {
            QuantizeMethod::None => None,
            QuantizeMethod::Int8 => Some(DType::I8),
            QuantizeMethod::Int4 => Some(DType::I4),
        }
    }

    /// The name used on the command line and in `quantization_config.method`.
    pub fn name(self) -> &'static str {
        match self {
            QuantizeMethod::None => "none",
            QuantizeMethod::Int8 => "int8",
            QuantizeMethod::Int4 => "int4",
        }
    }
}

/// Why a row could not be quantized.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum QuantizeError {
    #[error("holds a non-finite value ({0})")]
    NonFinite(f32),
    #[error("a group spans {0}, too wide for an f16 scale")]
    ScaleOverflow(f64),
    #[error("{0} is not a format --quantize writes")]
    NotATarget(DType),
}

/// Quantizes one row (`w.len()` a multiple of 128) to I8 with one scale for the row.
/// `out` is the row's `w.len() / 128 * 132` bytes.
pub fn quantize_row_i8(w: &[f32], out: &mut [u8]) -> Result<(), QuantizeError> {
    let mut amax = 0f32;
    for &v in w {
        if !v.is_finite() {
            return Err(QuantizeError::NonFinite(v));
        }
        amax = amax.max(v.abs());
    }
    let s = amax / 127.0;
    for (blk, ws) in out.chunks_exact_mut(I8_BLOCK_BYTES).zip(w.chunks_exact(BLOCK)) {
        blk[..4].copy_from_slice(&s.to_le_bytes());
        for (q, &v) in blk[4..].iter_mut().zip(ws) {
            // s == 0 only when the whole row is 0.
            let x = if s > 0.0 { (v as f64 / s as f64).round_ties_even() } else { 0.0 };
            *q = (x.clamp(-127.0, 127.0) as i8) as u8;
        }
    }
    Ok(())
}

/// The smallest f16 at or above `s` (s >= 0), or None when beyond f16's range.
fn f16_at_least(s: f64) -> Option<f16> {
    let h = f16::from_f64(s);
    let h = if h.to_f64() < s { f16::from_bits(h.to_bits() + 1) } else { h };
    h.is_finite().then_some(h)
}

/// The parameters of one I4 group: its f16 scale and its zero point.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct I4Group {
    pub scale: f16,
    pub zero: u8,
}

impl I4Group {
    /// Fits a group (see the module doc): the range widened to include 0, the scale
    /// rounded up to f16, the zero rounded.
    pub fn fit(ws: &[f32]) -> Result<Self, QuantizeError> {
        let (mut lo, mut hi) = (0f64, 0f64);
        for &v in ws {
            if !v.is_finite() {
                return Err(QuantizeError::NonFinite(v));
            }
            lo = lo.min(v as f64);
            hi = hi.max(v as f64);
        }
        let scale = f16_at_least((hi - lo) / 15.0).ok_or(QuantizeError::ScaleOverflow(hi - lo))?;
        let sf = scale.to_f64();
        // sf == 0 only when the whole group is 0: z = q = 0.
        let z = if sf > 0.0 { (-lo / sf).round_ties_even().clamp(0.0, 15.0) } else { 0.0 };
        Ok(I4Group { scale, zero: z as u8 })
    }

    /// The level of `v`: `clamp(round(v / s) + z, 0, 15)`.
    pub fn level(&self, v: f32) -> u8 {
        let sf = self.scale.to_f64();
        if sf > 0.0 {
            ((v as f64 / sf).round_ties_even() + self.zero as f64).clamp(0.0, 15.0) as u8
        } else {
            0
        }
    }

    /// The value of level `q`, exactly as `dequantize_row` computes it.
    pub fn value(&self, q: u8) -> f32 {
        self.scale.to_f32() * (q as i32 - self.zero as i32) as f32
    }

    /// Writes one 68-byte block: this group's header and `levels` (128 of them).
    pub fn write(&self, blk: &mut [u8], levels: &[u8]) {
        blk[..2].copy_from_slice(&self.scale.to_le_bytes());
        blk[2] = self.zero;
        blk[3] = 0;
        for (byte, pair) in blk[4..].iter_mut().zip(levels.chunks_exact(2)) {
            *byte = pair[0] | (pair[1] << 4);
        }
    }
}

/// Quantizes one row (`w.len()` a multiple of 128) to I4, one scale and zero per block.
/// `out` is the row's `w.len() / 128 * 68` bytes.
pub fn quantize_row_i4(w: &[f32], out: &mut [u8]) -> Result<(), QuantizeError> {
    let mut levels = [0u8; BLOCK];
    for (blk, ws) in out.chunks_exact_mut(I4_BLOCK_BYTES).zip(w.chunks_exact(BLOCK)) {
        let group = I4Group::fit(ws)?;
        levels.iter_mut().zip(ws).for_each(|(q, &v)| *q = group.level(v));
        group.write(blk, &levels);
    }
    Ok(())
}

/// llama.cpp's `quantize_row_q8_0_ref`: per 32 values `d = amax / 127` (stored f16),
/// `q = round(x / d)` with the f32 reciprocal, as ggml computes it.
pub fn quantize_row_q8_0(w: &[f32], out: &mut [u8]) -> Result<(), QuantizeError> {
    for (x, blk) in w.chunks_exact(32).zip(out.chunks_exact_mut(34)) {
        if let Some(&bad) = x.iter().find(|v| !v.is_finite()) {
            return Err(QuantizeError::NonFinite(bad));
        }
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        blk[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        for (q, &v) in blk[2..].iter_mut().zip(x) {
            *q = ((v * id).round() as i8) as u8;
        }
    }
    Ok(())
}

/// llama.cpp's `quantize_row_q4_1_ref`: per 32 values `d = (max - min) / 15` and
/// `m = min` (both stored f16), `q = min(15, (x - min) / d + 0.5)` truncated.
pub fn quantize_row_q4_1(w: &[f32], out: &mut [u8]) -> Result<(), QuantizeError> {
    for (x, blk) in w.chunks_exact(32).zip(out.chunks_exact_mut(20)) {
        if let Some(&bad) = x.iter().find(|v| !v.is_finite()) {
            return Err(QuantizeError::NonFinite(bad));
        }
        let min = x.iter().fold(f32::INFINITY, |m, &v| m.min(v));
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        blk[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        blk[2..4].copy_from_slice(&f16::from_f32(min).to_bits().to_le_bytes());
        let level = |v: f32| (((v - min) * id + 0.5) as u8).min(15);
        for j in 0..16 {
            blk[4 + j] = level(x[j]) | (level(x[j + 16]) << 4);
        }
    }
    Ok(())
}

/// Why a tensor was left in its format.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Not a linear weight (1-D, 3-D, not `*.weight`): nothing to say.
    NotLinear,
    /// Embeddings or lm_head without `include_embeddings`.
    Embedding,
    /// Already in a quantized format.
    AlreadyQuantized(DType),
    /// Rows of this many values are not whole 32-value blocks.
    RowLength(usize),
}

/// The block format `method` uses for rows of `k` values: its own 128-value block, or the
/// 32-value GGUF block of the same scheme for narrower multiples (None: neither fits).
pub fn target_dtype(method: QuantizeMethod, k: usize) -> Option<DType> {
    let wide = method.dtype()?;
    if k.is_multiple_of(BLOCK) {
        return Some(wide);
    }
    if !k.is_multiple_of(32) {
        return None;
    }
    Some(if wide == DType::I8 { DType::Q8_0 } else { DType::Q4_1 })
}

/// Whether `name` / `t` gets quantized (Ok) or why not.
pub fn eligibility(name: &str, t: &WeightTensor, include_embeddings: bool) -> Result<(), Skip> {
    if t.shape.len() != 2 || !name.ends_with(".weight") {
        return Err(Skip::NotLinear);
    }
    let is_embedding = name == "model.embed_tokens.weight" || name == "lm_head.weight";
    if is_embedding && !include_embeddings {
        return Err(Skip::Embedding);
    }
    if t.dtype.is_quantized() {
        return Err(Skip::AlreadyQuantized(t.dtype));
    }
    if !t.row_len().is_multiple_of(32) {
        return Err(Skip::RowLength(t.row_len()));
    }
    Ok(())
}

/// Quantizes one row into `dtype`, one of the formats `target_dtype` returns (I8, I4,
/// Q8_0, Q4_1). `out` is the row's `dtype.row_bytes(w.len())` bytes.
pub fn quantize_row(dtype: DType, w: &[f32], out: &mut [u8]) -> Result<(), QuantizeError> {
    match dtype {
        DType::I8 => quantize_row_i8(w, out),
        DType::I4 => quantize_row_i4(w, out),
        DType::Q8_0 => quantize_row_q8_0(w, out),
        DType::Q4_1 => quantize_row_q4_1(w, out),
        other => Err(QuantizeError::NotATarget(other)),
    }
}

/// Quantizes a 2-D float tensor whose rows are whole 32-value blocks (see
/// `eligibility`) into `method`'s format (`target_dtype`), rows in parallel.
pub fn quantize_tensor(
    t: &WeightTensor,
    method: QuantizeMethod,
) -> Result<WeightTensor, QuantizeError> {
    let k = t.row_len();
    let dtype = target_dtype(method, k).expect("eligibility checked whole 32-value blocks");
    let row_bytes = dtype.row_bytes(k).expect("eligibility checked whole blocks");
    let mut data = vec![0u8; row_bytes * t.rows()];
    data.par_chunks_mut(row_bytes).enumerate().try_for_each_init(
        || vec![0f32; k],
        |w, (r, out)| {
            dequantize_row(t.dtype, t.row(r), w);
            quantize_row(dtype, w, out)
        },
    )?;
    Ok(WeightTensor { dtype, shape: t.shape.clone(), data: Bytes::Owned(data.into()) })
}

/// What `quantize_model` did.
#[derive(Debug, Default)]
pub struct QuantizeSummary {
    pub quantized: usize,
    pub bytes_before: usize,
    pub bytes_after: usize,
    /// Tensors left as they were, by reason (NotLinear not listed).
    pub skipped: BTreeMap<String, Skip>,
}

/// Quantizes every eligible tensor of `model` in place (`None`: does nothing) and logs
/// one summary line, plus one for tensors kept for a reason worth knowing.
pub fn quantize_model(
    model: &mut LoadedModel,
    method: QuantizeMethod,
    include_embeddings: bool,
) -> Result<QuantizeSummary, LoadError> {
    quantize_model_with(model, method, include_embeddings, HashMap::new())
}

/// `quantize_model`, except that the eligible tensors named in `prequantized` take the
/// given quantized tensor (already in `method`'s format, e.g. from GPTQ) instead of
/// being quantized here.
pub fn quantize_model_with(
    model: &mut LoadedModel,
    method: QuantizeMethod,
    include_embeddings: bool,
    mut prequantized: HashMap<String, WeightTensor>,
) -> Result<QuantizeSummary, LoadError> {
    let mut summary = QuantizeSummary::default();
    if method == QuantizeMethod::None {
        return Ok(summary);
    }
    let mut names: Vec<String> = model.tensors.keys().cloned().collect();
    names.sort();
    for name in names {
        let t = &model.tensors[&name];
        match eligibility(&name, t, include_embeddings) {
            Ok(()) => {
                let q = match prequantized.remove(&name) {
                    Some(q)
                        if q.shape == t.shape
                            && Some(q.dtype) == target_dtype(method, t.row_len()) =>
                    {
                        q
                    }
                    Some(q) => {
                        return Err(LoadError::tensor(
                            &model.source,
                            &name,
                            format!(
                                "prequantized as {} {:?}, expected {method:?} of {:?}",
                                q.dtype, q.shape, t.shape
                            ),
                        ))
                    }
                    None => quantize_tensor(t, method)
                        .map_err(|e| LoadError::tensor(&model.source, &name, e.to_string()))?,
                };
                summary.quantized += 1;
                summary.bytes_before += t.bytes().len();
                summary.bytes_after += q.bytes().len();
                model.tensors.insert(name, q);
            }
            Err(Skip::NotLinear) => {}
            Err(why) => {
                summary.skipped.insert(name, why);
            }
        }
    }
    if let Some(name) = prequantized.keys().next() {
        return Err(LoadError::tensor(
            &model.source,
            name,
            "prequantized, but not a tensor --quantize quantizes",
        ));
    }
    tracing::info!(
        "--quantize {}: {} tensors, {} MiB -> {} MiB",
        method.name(),
        summary.quantized,
        summary.bytes_before >> 20,
        summary.bytes_after >> 20
    );
    let narrow: Vec<String> = summary
        .skipped
        .iter()
        .filter_map(|(name, why)| match why {
            Skip::RowLength(k) => Some(format!("{name} ({k} inputs)")),
            _ => None,
        })
        .collect();
    if !narrow.is_empty() {
        tracing::info!(
            "--quantize {}: {} tensors kept in their format, rows not whole 32-value blocks: {}{}",
            method.name(),
            narrow.len(),
            narrow[..narrow.len().min(3)].join(", "),
            if narrow.len() > 3 { ", ..." } else { "" }
        );
    }
    let already =
        summary.skipped.values().filter(|w| matches!(w, Skip::AlreadyQuantized(_))).count();
    if already > 0 {
        tracing::info!(
            "--quantize {}: {already} tensors are quantized already and kept",
            method.name()
        );
    }
    Ok(summary)
}

/// `load_model`, then `quantize_model` without the embeddings: what `--quantize` does.
pub fn load_quantized(
    path: &std::path::Path,
    method: QuantizeMethod,
) -> Result<LoadedModel, LoadError> {
    let mut model = super::load_model(path)?;
    quantize_model(&mut model, method, false)?;
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gptq::tests::noise;

    fn dequant(dtype: DType, bytes: &[u8], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        dequantize_row(dtype, bytes, &mut out);
        out
    }

    /// `n` values in [offset - spread / 2, offset + spread / 2): gptq's noise, scaled.
    fn row(seed: u64, n: usize, spread: f32, offset: f32) -> Vec<f32> {
        noise(seed, n).into_iter().map(|v| v * spread + offset).collect()
    }

    #[test]
    fn int8_error_is_at_most_half_a_step() {
        for (seed, spread, offset) in [(1, 0.1f32, 0.0f32), (2, 3.0, 1.0), (3, 1e-3, -0.01)] {
            let w = row(seed, 512, spread, offset);
            let mut bytes = vec![0u8; DType::I8.row_bytes(512).unwrap()];
            quantize_row_i8(&w, &mut bytes).unwrap();
            let s = f32::from_le_bytes(bytes[..4].try_into().unwrap());
            let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(s, amax / 127.0);
            for blk in bytes.chunks_exact(I8_BLOCK_BYTES) {
                assert_eq!(&blk[..4], &s.to_le_bytes(), "one scale per row");
            }
            for (i, (a, b)) in w.iter().zip(dequant(DType::I8, &bytes, 512)).enumerate() {
                // Half a step, plus the f32 rounding of s * q (<= 2^-24 relative).
                let bound = s / 2.0 * (1.0 + 1e-5) + b.abs() * 6e-8;
                assert!((a - b).abs() <= bound, "element {i}: {a} vs {b}, s = {s}");
            }
        }
    }

    #[test]
    fn int4_error_is_at_most_half_a_step_per_group() {
        // Centred, all-positive and all-negative groups (the zero-point edge cases).
        for (seed, spread, offset) in [(4, 0.1f32, 0.0f32), (5, 0.5, 2.0), (6, 0.02, -1.0)] {
            let w = row(seed, 384, spread, offset);
            let mut bytes = vec![0u8; DType::I4.row_bytes(384).unwrap()];
            quantize_row_i4(&w, &mut bytes).unwrap();
            let back = dequant(DType::I4, &bytes, 384);
            for (b, blk) in bytes.chunks_exact(I4_BLOCK_BYTES).enumerate() {
                let s = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                assert!(blk[2] <= 15, "zero {}", blk[2]);
                for i in b * BLOCK..(b + 1) * BLOCK {
                    let bound = s / 2.0 * (1.0 + 1e-5) + back[i].abs() * 6e-8;
                    assert!((w[i] - back[i]).abs() <= bound, "{i}: {} vs {}", w[i], back[i]);
                }
            }
        }
    }

    #[test]
    fn zeros_and_bad_values() {
        let w = vec![0f32; 128];
        let mut b8 = vec![0xffu8; I8_BLOCK_BYTES];
        quantize_row_i8(&w, &mut b8).unwrap();
        assert_eq!(dequant(DType::I8, &b8, 128), w);
        let mut b4 = vec![0xffu8; I4_BLOCK_BYTES];
        quantize_row_i4(&w, &mut b4).unwrap();
        assert_eq!(dequant(DType::I4, &b4, 128), w);
        let mut bad = w.clone();
        bad[7] = f32::NAN;
        assert!(matches!(quantize_row_i8(&bad, &mut b8), Err(QuantizeError::NonFinite(_))));
        bad[7] = f32::INFINITY;
        assert!(matches!(quantize_row_i4(&bad, &mut b4), Err(QuantizeError::NonFinite(_))));
        bad[7] = 1e6;
        assert!(matches!(quantize_row_i4(&bad, &mut b4), Err(QuantizeError::ScaleOverflow(_))));
    }

    #[test]
    fn narrow_rows_use_the_32_value_gguf_blocks_within_half_a_step() {
        assert_eq!(target_dtype(QuantizeMethod::Int4, 576), Some(DType::Q4_1));
        assert_eq!(target_dtype(QuantizeMethod::Int8, 576), Some(DType::Q8_0));
        assert_eq!(target_dtype(QuantizeMethod::Int4, 1536), Some(DType::I4));
        assert_eq!(target_dtype(QuantizeMethod::Int4, 100), None);
        let w = row(7, 576, 0.4, 0.1);
        let mut q8 = vec![0u8; 576 / 32 * 34];
        quantize_row_q8_0(&w, &mut q8).unwrap();
        let mut q4 = vec![0u8; 576 / 32 * 20];
        quantize_row_q4_1(&w, &mut q4).unwrap();
        let (d8, d4) = (dequant(DType::Q8_0, &q8, 576), dequant(DType::Q4_1, &q4, 576));
        for (b, x) in w.chunks(32).enumerate() {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (lo, hi) = x.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            for (i, &v) in x.iter().enumerate() {
                let k = b * 32 + i;
                // Half a step, plus the f16 rounding of the stored scale (and min).
                assert!((d8[k] - v).abs() <= amax / 127.0 * 0.51 + 1e-3 * amax, "q8_0 {k}");
                assert!((d4[k] - v).abs() <= (hi - lo) / 15.0 * 0.51 + 2e-3 * amax, "q4_1 {k}");
            }
        }
    }

    #[test]
    fn scale_is_rounded_up_to_f16() {
        for s in [1e-7, 3.3e-3, 0.1, 1.0 / 15.0, 1000.1] {
            let h = f16_at_least(s).unwrap();
            assert!(h.to_f64() >= s);
            assert!(f16::from_bits(h.to_bits() - 1).to_f64() < s, "{s}: not the smallest");
        }
        assert_eq!(f16_at_least(0.0), Some(f16::ZERO));
        assert_eq!(f16_at_least(1e6), None);
    }
}
