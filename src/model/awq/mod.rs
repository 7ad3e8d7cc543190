//! Calibrated quantization (`--calibration`): activation-aware scales and clipping
//! (AWQ, Lin et al. 2023, arXiv:2306.00978), then GPTQ's error feedback for int4 groups
//! (model/gptq.rs), all judged on the activations of a calibration text
//! (model/calibration.rs). Plain min/max rounding treats every weight alike; these
//! steps spend the 16 levels where the inputs make the output sensitive.
//!
//! Per decoder layer, the scales of its four sites (q/k/v, o, gate/up, down) are
//! chosen and folded in first, in that order; then each site is clipped and quantized
//! on its final weights (the o and down folds rescale rows of v_proj and up_proj,
//! which must happen before those rows are quantized):
//!
//! 1. Scales (scale.rs). A group shares one step, so its small weights lose most; where
//!    an input channel carries large activations, that loss is multiplied by them.
//!    Column j of W is multiplied by `s_j = mean|x_j|^alpha` (normalised to `sqrt(max s
//!    * min s) = 1`, as AWQ does) and `1 / s_j` is folded into the op before, so the
//!    unquantized model computes the same function: the input RMSNorm weight for q/k/v,
//!    the post-attention one for gate/up, up_proj's rows for down, v_proj's rows for o
//!    (one scale per v row, shared by the o_proj inputs of every query head of its
//!    group). Alpha runs from 0 (plain) to 1 in steps of 1/[`ALPHA_STEPS`]; the one kept
//!    has the least output error `|| X W^T - X diag(s)^-1 Q(W diag(s))^T ||^2` on the
//!    calibration samples, `Q` the very quantizer `--quantize` applies.
//! 2. Clipping (clip.rs), except q/k/v (their error passes through the softmax, which
//!    the projection's own output error does not see; AWQ leaves them too): each group's
//!    range may shrink where that lowers the group's output error on the samples.
//! 3. GPTQ where the rows become I4 (gptq.rs), on the scaled, clipped weights, with the
//!    Hessian of all calibration tokens' (scaled) inputs. Other formats (Q4_1, Q8_0 for
//!    rows that are not whole 128-blocks, int8's per-row I8) keep plain rounding of the
//!    scaled, clipped weights.
//!
//! Scales and clipping can only keep or lower their own error on the calibration
//! samples (alpha 0 and the unshrunk range are candidates). GPTQ minimises the same
//! output error greedily, column by column; it is not guaranteed to beat plain rounding
//! but does in practice (the report says by how much). GPTQ alone, without the scales,
//! did not help SmolLM2 (bench/notes.md).
//!
//! A site is left alone (quantized plainly) when its weights or fold target are not
//! float (already quantized), or when `--quantize` leaves its rows as they are.
//! Embeddings and lm_head are never touched.

mod clip;
mod scale;

use std::collections::HashMap;
use std::path::Path;

use super::calibration::{
    calibration_tokens, collect, Activations, CalibrationError, CalibrationSource, Site,
    SiteActivations,
};
use super::gptq::{gptq_i4, GptqError};
use super::quant::dequantize_row;
use super::quantize::{
    quantize_model_with, quantize_row, target_dtype, QuantizeError, QuantizeMethod, QuantizeSummary,
};
use super::tensor::Bytes;
use super::{DType, LoadError, LoadedModel, WeightTensor};
use scale::SiteLayout;

/// Alpha grid: 0, 1/20, ..., 1 (AWQ's grid of 20).
pub const ALPHA_STEPS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum AwqError {
    #[error("--calibration applies to quantization: add --quantize int4 (or int8)")]
    NothingToCalibrate,
    #[error(transparent)]
    Calibration(#[from] CalibrationError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("tensor `{tensor}`: {source}")]
    Quantize { tensor: String, source: QuantizeError },
    #[error("tensor `{tensor}`: GPTQ: {source}")]
    Gptq { tensor: String, source: GptqError },
}

/// What was done to one site.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteReport {
    pub layer: usize,
    pub site: Site,
    pub alpha: f32,
    /// One scale per fold index: per input channel, or for o_proj per v_proj row.
    pub scales: Vec<f32>,
    /// Groups whose range clipping shrank.
    pub clipped_groups: usize,
    /// Whether GPTQ quantized the site.
    pub gptq: bool,
    /// Output error `|| X (W - W_q)^T ||^2` on the calibration samples: of plain
    /// quantization, and of the result (`W_q` what the model will compute with).
    pub error_plain: f64,
    pub error: f64,
}

/// What calibration did, for the log and `qilin quantize`'s report.
#[derive(Debug, Default)]
pub struct AwqReport {
    pub tokens: usize,
    pub sites: Vec<SiteReport>,
    /// Sites left alone and why.
    pub skipped: Vec<(usize, Site, String)>,
}

impl AwqReport {
    /// One line per site kind: alphas by layer, clipping, GPTQ, error against plain.
    pub fn summary(&self) -> Vec<String> {
        Site::ALL
            .iter()
            .filter_map(|&site| {
                let of: Vec<&SiteReport> = self.sites.iter().filter(|s| s.site == site).collect();
                if of.is_empty() {
                    return None;
                }
                let mean = of.iter().map(|s| s.alpha as f64).sum::<f64>() / of.len() as f64;
                let plain: f64 = of.iter().map(|s| s.error_plain).sum();
                let error: f64 = of.iter().map(|s| s.error).sum();
                let clipped: usize = of.iter().map(|s| s.clipped_groups).sum();
                let gptq = of.iter().filter(|s| s.gptq).count();
                let alphas: Vec<String> = of.iter().map(|s| format!("{:.2}", s.alpha)).collect();
                let ratio = |e: f64, p: f64| if p > 0.0 { e / p } else { 1.0 };
                // The sum is dominated by the layers with the largest activations; the
                // median says what happened to a typical layer.
                let mut ratios: Vec<f64> = of.iter().map(|s| ratio(s.error, s.error_plain)).collect();
                ratios.sort_by(f64::total_cmp);
                Some(format!(
                    "{}: {} layers, alpha mean {mean:.2} [{}], {clipped} groups clipped, GPTQ on {gptq}; output error {:.3} of plain's (median layer {:.3})",
                    site.name(),
                    of.len(),
                    alphas.join(" "),
                    ratio(error, plain),
                    ratios[ratios.len() / 2],
                ))
            })
            .collect()
    }
}

/// Fixed scales for one site, folded in without a search (tests, experiments): one
/// scale per input channel, or for o_proj per v_proj row. Returns why not when the
/// site cannot be scaled.
pub fn fold_site(
    model: &mut LoadedModel,
    layer: usize,
    site: Site,
    scales: &[f32],
) -> Result<(), String> {
    let layout = SiteLayout::new(model, layer, site)?;
    if scales.len() != layout.folds() {
        return Err(format!("{} scales for {} fold indices", scales.len(), layout.folds()));
    }
    scale::fold(model, &layout, scales);
    Ok(())
}

/// The rows `w` (`[out, k]`) as the model will compute with them: `bytes` decoded, or
/// `w` quantized into `dtype` and decoded; divided by the per-channel scales `s`.
fn effective(
    w: &[f32],
    k: usize,
    dtype: DType,
    s: &[f32],
    bytes: Option<&[u8]>,
) -> Result<Vec<f32>, QuantizeError> {
    let row_bytes = dtype.row_bytes(k).ok_or(QuantizeError::NotATarget(dtype))?;
    let mut out = vec![0f32; w.len()];
    let mut own = vec![0u8; row_bytes];
    for (r, (dst, row)) in out.chunks_mut(k).zip(w.chunks(k)).enumerate() {
        let encoded = match bytes {
            Some(b) => &b[r * row_bytes..(r + 1) * row_bytes],
            None => {
                quantize_row(dtype, row, &mut own)?;
                &own
            }
        };
        dequantize_row(dtype, encoded, dst);
        dst.iter_mut().zip(s).for_each(|(v, &s)| *v /= s);
    }
    Ok(out)
}

/// One site of a layer, its scales chosen and folded in.
struct Scaled<'a> {
    site: Site,
    layout: SiteLayout,
    act: &'a SiteActivations,
    dtype: DType,
    chosen: scale::Chosen,
}

/// Clips and (for I4) GPTQ-quantizes one site whose scales are folded in, as are those
/// of the rest of its layer (o's and down's folds rescale rows of v_proj and up_proj:
/// quantizing those rows earlier would miss it). Returns its report; GPTQ's tensors go
/// into `done`.
fn finish_site(
    model: &mut LoadedModel,
    layer: usize,
    s: Scaled<'_>,
    done: &mut HashMap<String, WeightTensor>,
) -> Result<SiteReport, AwqError> {
    let Scaled { site, layout, act, dtype, chosen } = s;
    let k = layout.k;
    let quantize_err = |source| AwqError::Quantize { tensor: layout.weights[0].clone(), source };
    let per_channel = layout.expand(&chosen.scales);
    let mut w = layout.stacked(model);
    // The reference: the same weights with the scales taken out of the columns, i.e.
    // the unquantized function in the layer's final row scaling.
    let unscaled: Vec<f32> =
        w.chunks(k).flat_map(|row| row.iter().zip(&per_channel).map(|(&v, &s)| v / s)).collect();
    let mut clipped_groups = 0;
    if site != Site::Qkv && clip::clips(dtype) {
        // The scaled weights see the inputs divided by the scales.
        let mut x = act.samples.clone();
        for row in x.chunks_mut(k) {
            row.iter_mut().zip(&per_channel).for_each(|(v, &s)| *v /= s);
        }
        clipped_groups =
            clip::clip(&mut w, k, dtype, &x, act.rows).map_err(quantize_err)?.clipped_groups;
        if clipped_groups > 0 {
            layout.store(model, &w);
        }
    }
    let mut gptq_bytes = None;
    if let (DType::I4, Some(gram)) = (dtype, &act.gram) {
        let mut h = gram.clone();
        for (a, row) in h.chunks_mut(k).enumerate() {
            for (b, v) in row.iter_mut().enumerate() {
                *v /= per_channel[a] as f64 * per_channel[b] as f64;
            }
        }
        let bytes = gptq_i4(&w, k, &h)
            .map_err(|source| AwqError::Gptq { tensor: layout.weights[0].clone(), source })?;
        gptq_bytes = Some(bytes);
    }
    let error_of = |result: &[f32]| {
        let delta: Vec<f32> = unscaled.iter().zip(result).map(|(a, b)| a - b).collect();
        scale::output_error(act, &delta, k)
    };
    let ones = vec![1.0; k];
    let error_plain = error_of(&effective(&unscaled, k, dtype, &ones, None).map_err(quantize_err)?);
    let result =
        effective(&w, k, dtype, &per_channel, gptq_bytes.as_deref()).map_err(quantize_err)?;
    let error = error_of(&result);
    let gptq = gptq_bytes.is_some();
    if let Some(bytes) = gptq_bytes {
        let row_bytes =
            dtype.row_bytes(k).ok_or(QuantizeError::NotATarget(dtype)).map_err(quantize_err)?;
        let mut start = 0;
        for name in &layout.weights {
            let shape = model.tensors[name].shape.clone();
            let len = shape[0] * row_bytes;
            let data = Bytes::Owned(bytes[start..start + len].to_vec().into());
            done.insert(name.clone(), WeightTensor { dtype, shape, data });
            start += len;
        }
    }
    Ok(SiteReport {
        layer,
        site,
        alpha: chosen.alpha,
        scales: chosen.scales,
        clipped_groups,
        gptq,
        error_plain,
        error,
    })
}

/// Runs the steps of the module doc on every site: per layer, the scales of all four
/// sites are searched and folded first, then each site is clipped and quantized.
/// Scaled and clipped weights are left in `model` as F32 (unquantized); the tensors
/// GPTQ quantized are returned, for `quantize_model_with` with the same `method`.
pub fn apply_awq(
    model: &mut LoadedModel,
    acts: &Activations,
    method: QuantizeMethod,
) -> Result<(AwqReport, HashMap<String, WeightTensor>), AwqError> {
    let mut report = AwqReport { tokens: acts.tokens, ..AwqReport::default() };
    let mut done = HashMap::new();
    for layer in 0..model.config.num_layers {
        let mut scaled = Vec::new();
        for site in Site::ALL {
            let layout = match SiteLayout::new(model, layer, site) {
                Ok(l) => l,
                Err(why) => {
                    report.skipped.push((layer, site, why));
                    continue;
                }
            };
            let Some(dtype) = target_dtype(method, layout.k) else {
                report.skipped.push((layer, site, format!("{} inputs stay as they are", layout.k)));
                continue;
            };
            let Some(act) = acts.get(layer, site).filter(|a| a.cols == layout.k) else {
                report.skipped.push((layer, site, "no calibration activations".into()));
                continue;
            };
            let chosen = scale::search(&layout.stacked(model), &layout, act, dtype)?;
            if chosen.alpha > 0.0 {
                scale::fold(model, &layout, &chosen.scales);
            }
            scaled.push(Scaled { site, layout, act, dtype, chosen });
        }
        for s in scaled {
            let r = finish_site(model, layer, s, &mut done)?;
            tracing::debug!(
                "calibration: layer {layer} {}: alpha {:.2}, {} groups clipped, gptq {}, output error {:.4e} -> {:.4e}",
                r.site.name(),
                r.alpha,
                r.clipped_groups,
                r.gptq,
                r.error_plain,
                r.error
            );
            report.sites.push(r);
        }
    }
    Ok((report, done))
}

/// Why no site of `model` can be calibrated for `method` (the first site's reason), or
/// None when one can.
fn nothing_to_calibrate(model: &LoadedModel, method: QuantizeMethod) -> Option<String> {
    let mut first = None;
    for layer in 0..model.config.num_layers {
        for site in Site::ALL {
            let why = match SiteLayout::new(model, layer, site) {
                Ok(l) if target_dtype(method, l.k).is_some() => return None,
                Ok(l) => format!("{} inputs stay as they are", l.k),
                Err(why) => why,
            };
            first.get_or_insert_with(|| format!("layer {layer} {}: {why}", site.name()));
        }
    }
    Some(first.unwrap_or_else(|| "the model has no decoder layers".into()))
}

/// Calibrates on `source` and quantizes: what `--quantize METHOD --calibration FILE`
/// does to a loaded model.
pub fn quantize_calibrated(
    model: &mut LoadedModel,
    method: QuantizeMethod,
    include_embeddings: bool,
    source: &CalibrationSource<'_>,
) -> Result<(QuantizeSummary, AwqReport), AwqError> {
    if method == QuantizeMethod::None {
        return Err(AwqError::NothingToCalibrate);
    }
    let started = std::time::Instant::now();
    let tokens = calibration_tokens(model, source)?;
    if let Some(why) = nothing_to_calibrate(model, method) {
        // E.g. a GGUF or AWQ checkpoint: quantized already, nothing float to rescale.
        // Said once, and the forward pass is not run for nothing.
        tracing::warn!("--calibration changes nothing here: no layer can be calibrated ({why})");
        let summary = quantize_model_with(model, method, include_embeddings, HashMap::new())?;
        return Ok((summary, AwqReport { tokens: tokens.len(), ..AwqReport::default() }));
    }
    // X^T X (for GPTQ) only where rows become I4: it is k x k per site.
    let gram_for = |_: Site, k: usize| target_dtype(method, k) == Some(DType::I4);
    let acts = collect(model, &tokens, &gram_for)?;
    let (report, done) = apply_awq(model, &acts, method)?;
    tracing::info!(
        "--calibration {}: {} tokens; {} sites calibrated in {:.1} s",
        source.path.display(),
        report.tokens,
        report.sites.len(),
        started.elapsed().as_secs_f64()
    );
    for line in report.summary() {
        tracing::info!("calibration {line}");
    }
    let summary = quantize_model_with(model, method, include_embeddings, done)?;
    Ok((summary, report))
}

/// `load_model`, then `quantize_calibrated` without the embeddings.
pub fn load_calibrated(
    path: &Path,
    method: QuantizeMethod,
    source: &CalibrationSource<'_>,
) -> Result<LoadedModel, AwqError> {
    if method == QuantizeMethod::None {
        return Err(AwqError::NothingToCalibrate);
    }
    let mut model = super::load_model(path)?;
    quantize_calibrated(&mut model, method, false, source)?;
    Ok(model)
}
