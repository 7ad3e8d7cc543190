//! AWQ's per-channel scales: which tensors a site scales and folds into, the search of
//! alpha on the calibration samples, and the fold itself (see the module doc of
//! model/awq).

use rayon::prelude::*;

use super::super::calibration::{Site, SiteActivations};
use super::super::quant::dequantize_row;
use super::super::quantize::{eligibility, quantize_row, QuantizeError};
use super::super::tensor::Bytes;
use super::super::{DType, LoadedModel, WeightTensor};
use super::{AwqError, ALPHA_STEPS};

/// Floor of mean |x| before the power: a channel that is never active would otherwise
/// get a zero (or, at alpha 0, undefined) scale.
const MIN_MEAN_ABS: f32 = 1e-4;

/// Where `1 / s` goes.
#[derive(Clone, Debug)]
pub(super) enum Fold {
    /// An RMSNorm weight `[k]`.
    Norm(String),
    /// Rows of a linear weight (and its bias): one row per fold index.
    Rows { weight: String, bias: Option<String> },
}

/// A site's tensors, checked: weights `[out_i, k]` all float, the fold target float.
#[derive(Clone, Debug)]
pub(super) struct SiteLayout {
    pub weights: Vec<String>,
    pub k: usize,
    pub fold: Fold,
    /// o_proj under grouped-query attention: (head_dim, query heads per kv head);
    /// input channel `c` then maps to v row `(c / head_dim / group) * head_dim + c %
    /// head_dim`. None: channel c is fold index c.
    pub gqa: Option<(usize, usize)>,
}

impl SiteLayout {
    pub fn new(model: &LoadedModel, layer: usize, site: Site) -> Result<Self, String> {
        let c = &model.config;
        let p = format!("model.layers.{layer}");
        let names = |parts: &[&str]| -> Vec<String> {
            parts.iter().map(|n| format!("{p}.{n}.weight")).collect()
        };
        let rows_of = |proj: &str| Fold::Rows {
            weight: format!("{p}.{proj}.weight"),
            bias: Some(format!("{p}.{proj}.bias")).filter(|b| model.tensors.contains_key(b)),
        };
        let (weights, fold, gqa) = match site {
            Site::Qkv => (
                names(&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                Fold::Norm(format!("{p}.input_layernorm.weight")),
                None,
            ),
            Site::O => {
                if c.num_kv_heads == 0 || !c.num_heads.is_multiple_of(c.num_kv_heads) {
                    return Err("query heads are not whole groups of kv heads".into());
                }
                let group = c.num_heads / c.num_kv_heads;
                (
                    names(&["self_attn.o_proj"]),
                    rows_of("self_attn.v_proj"),
                    (group > 1).then_some((c.head_dim, group)),
                )
            }
            Site::GateUp => (
                names(&["mlp.gate_proj", "mlp.up_proj"]),
                Fold::Norm(format!("{p}.post_attention_layernorm.weight")),
                None,
            ),
            Site::Down => (names(&["mlp.down_proj"]), rows_of("mlp.up_proj"), None),
        };
        let mut k = None;
        for name in &weights {
            let t = model.tensors.get(name).ok_or_else(|| format!("no `{name}`"))?;
            eligibility(name, t, false).map_err(|why| format!("`{name}`: {why:?}"))?;
            if *k.get_or_insert(t.row_len()) != t.row_len() {
                return Err(format!("`{name}` has {} inputs, unlike its siblings", t.row_len()));
            }
        }
        let k = k.ok_or("no weights")?;
        let folds = match gqa {
            Some((hd, group)) if k.is_multiple_of(hd * group) => k / group,
            Some(_) => return Err(format!("{k} inputs are not whole head groups")),
            None => k,
        };
        let (target, want_rows) = match &fold {
            Fold::Norm(name) => (name, None),
            Fold::Rows { weight, .. } => (weight, Some(folds)),
        };
        let t = model.tensors.get(target).ok_or_else(|| format!("no `{target}`"))?;
        if t.dtype.is_quantized() {
            return Err(format!("`{target}` is quantized already ({})", t.dtype));
        }
        let fits = match want_rows {
            None => t.shape == [folds],
            Some(rows) => t.shape.len() == 2 && t.shape[0] == rows,
        };
        if !fits {
            return Err(format!("`{target}` has shape {:?}, not one entry per input", t.shape));
        }
        Ok(SiteLayout { weights, k, fold, gqa })
    }

    /// Fold index of input channel `c`.
    pub fn fold_index(&self, c: usize) -> usize {
        match self.gqa {
            Some((hd, group)) => (c / hd / group) * hd + c % hd,
            None => c,
        }
    }

    pub fn folds(&self) -> usize {
        self.gqa.map_or(self.k, |(_, group)| self.k / group)
    }

    /// Per input channel, the scale of its fold index.
    pub fn expand(&self, scales: &[f32]) -> Vec<f32> {
        (0..self.k).map(|c| scales[self.fold_index(c)]).collect()
    }

    /// The site's weights stacked, `[sum of out_i, k]` as f32.
    pub fn stacked(&self, model: &LoadedModel) -> Vec<f32> {
        let mut w = Vec::new();
        for name in &self.weights {
            w.extend(values(&model.tensors[name]));
        }
        w
    }

    /// Stores `w` (`[sum of out_i, k]`) back into the site's weights, as F32.
    pub fn store(&self, model: &mut LoadedModel, w: &[f32]) {
        let mut start = 0;
        for name in &self.weights {
            let shape = model.tensors[name].shape.clone();
            let len = shape.iter().product::<usize>();
            model.tensors.insert(name.clone(), f32_tensor(shape, &w[start..start + len]));
            start += len;
        }
    }
}

/// Every value of a float tensor as f32.
pub(super) fn values(t: &WeightTensor) -> Vec<f32> {
    let k = t.row_len().max(1);
    let mut out = vec![0f32; t.numel()];
    for (r, dst) in out.chunks_mut(k).enumerate() {
        dequantize_row(t.dtype, t.row(r), dst);
    }
    out
}

pub(super) fn f32_tensor(shape: Vec<usize>, v: &[f32]) -> WeightTensor {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    WeightTensor { dtype: DType::F32, shape, data: Bytes::Owned(bytes.into()) }
}

/// The normalised scales of `alpha` from per-fold mean |x|.
pub(super) fn scales_for(stat: &[f32], alpha: f32) -> Vec<f32> {
    let s: Vec<f32> = stat.iter().map(|&m| m.max(MIN_MEAN_ABS).powf(alpha)).collect();
    let (lo, hi) = s.iter().fold((f32::MAX, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let mid = (lo as f64 * hi as f64).sqrt() as f32;
    s.iter().map(|&v| v / mid).collect()
}

/// `W - Q(W diag(s)) diag(s)^-1`, rows quantized into `dtype` exactly as quantize.rs
/// does. `w` `[out, k]`, `s` `[k]`.
pub(super) fn quantization_delta(
    w: &[f32],
    k: usize,
    s: &[f32],
    dtype: DType,
) -> Result<Vec<f32>, QuantizeError> {
    let row_bytes = dtype.row_bytes(k).ok_or(QuantizeError::NotATarget(dtype))?;
    let mut delta = vec![0f32; w.len()];
    delta.par_chunks_mut(k).zip(w.par_chunks(k)).try_for_each_init(
        || (vec![0f32; k], vec![0u8; row_bytes]),
        |(scaled, bytes), (d, row)| {
            for ((v, &x), &s) in scaled.iter_mut().zip(row).zip(s) {
                *v = x * s;
            }
            quantize_row(dtype, scaled, bytes)?;
            dequantize_row(dtype, bytes, scaled);
            for (((d, &x), &q), &s) in d.iter_mut().zip(row).zip(scaled.iter()).zip(s) {
                *d = x - q / s;
            }
            Ok(())
        },
    )?;
    Ok(delta)
}

/// `|| X D^T ||^2`: X the samples `[n, k]`, D `[out, k]`; f32 products summed in f64.
pub(super) fn output_error(x: &SiteActivations, delta: &[f32], k: usize) -> f64 {
    let n = x.rows;
    if n == 0 {
        return 0.0;
    }
    let rows_per_task = 64;
    delta
        .par_chunks(rows_per_task * k)
        .map_init(Vec::new, |y: &mut Vec<f32>, d| {
            let rows = d.len() / k;
            y.resize(rows * n, 0.0);
            // y [rows, n] = D [rows, k] . X^T [k, n]
            // SAFETY: the pointers and strides describe exactly the slices above, and y
            // does not alias the inputs.
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    k,
                    n,
                    1.0,
                    d.as_ptr(),
                    k as isize,
                    1,
                    x.samples.as_ptr(),
                    1,
                    k as isize,
                    0.0,
                    y.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
            y.iter().map(|&v| v as f64 * v as f64).sum::<f64>()
        })
        .sum()
}

/// The scales a search chose.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Chosen {
    pub alpha: f32,
    /// Per fold index.
    pub scales: Vec<f32>,
    /// Output error on the samples at alpha 0 (plain quantization) and at `alpha`.
    pub error_plain: f64,
    pub error: f64,
}

/// Searches alpha for one site on its current weights (`w`, stacked).
pub(super) fn search(
    w: &[f32],
    layout: &SiteLayout,
    act: &SiteActivations,
    dtype: DType,
) -> Result<Chosen, AwqError> {
    let k = layout.k;
    // Mean |x| per fold index (o_proj under GQA: the mean over the group's heads).
    let folds = layout.folds();
    let (mut stat, mut n) = (vec![0f32; folds], vec![0u32; folds]);
    for (c, &m) in act.mean_abs.iter().enumerate() {
        stat[layout.fold_index(c)] += m;
        n[layout.fold_index(c)] += 1;
    }
    stat.iter_mut().zip(&n).for_each(|(s, &n)| *s /= n.max(1) as f32);

    let mut best: Option<Chosen> = None;
    let mut error_plain = None;
    for step in 0..=ALPHA_STEPS {
        let alpha = step as f32 / ALPHA_STEPS as f32;
        let scales = scales_for(&stat, alpha);
        let delta = match quantization_delta(w, k, &layout.expand(&scales), dtype) {
            Ok(d) => d,
            // alpha 0 is plain quantization: its failure is the tensor's own.
            Err(source) if step == 0 => {
                return Err(AwqError::Quantize { tensor: layout.weights[0].clone(), source })
            }
            // A scale that pushes a group out of f16's range just rules this alpha out.
            Err(_) => continue,
        };
        let error = output_error(act, &delta, k);
        let error_plain = *error_plain.get_or_insert(error);
        if best.as_ref().is_none_or(|b| error < b.error) {
            best = Some(Chosen { alpha, scales, error_plain, error });
        }
    }
    Ok(best.expect("alpha 0 either succeeds or returns"))
}

/// Multiplies the site's weight columns by the scales and divides the fold target by
/// them. In exact arithmetic the model's function is unchanged; in f32 each product
/// `(a / s) (b s)` is within a few roundings of `a b`.
pub(super) fn fold(model: &mut LoadedModel, layout: &SiteLayout, scales: &[f32]) {
    let per_channel = layout.expand(scales);
    let mut w = layout.stacked(model);
    for row in w.chunks_mut(layout.k) {
        row.iter_mut().zip(&per_channel).for_each(|(x, &s)| *x *= s);
    }
    layout.store(model, &w);
    let divide_rows = |model: &mut LoadedModel, name: &str| {
        let t = &model.tensors[name];
        let mut v = values(t);
        let row_len = v.len() / scales.len();
        for (row, &s) in v.chunks_mut(row_len).zip(scales) {
            row.iter_mut().for_each(|x| *x /= s);
        }
        let divided = f32_tensor(t.shape.clone(), &v);
        model.tensors.insert(name.to_string(), divided);
    };
    match &layout.fold {
        Fold::Norm(name) => divide_rows(model, name),
        Fold::Rows { weight, bias } => {
            divide_rows(model, weight);
            if let Some(bias) = bias {
                divide_rows(model, bias);
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) use crate::model::gptq::tests::noise;

    /// `out x k` weights and `n` input rows in which `outliers` channels are 40 times
    /// larger and their weights 20 times smaller (the case AWQ is about: plain int4
    /// rounds those weights to the group's coarse grid, and the large activations
    /// multiply that error).
    pub fn outlier_case(out: usize, k: usize, n: usize) -> (Vec<f32>, SiteActivations) {
        let outliers = [3usize, 77, 130, 201];
        let mut w = noise(1, out * k);
        let mut x = noise(2, n * k);
        for row in w.chunks_mut(k) {
            outliers.iter().for_each(|&c| row[c] *= 0.05);
        }
        for row in x.chunks_mut(k) {
            outliers.iter().for_each(|&c| row[c] *= 40.0);
        }
        let mean_abs =
            (0..k).map(|c| x.chunks(k).map(|r| r[c].abs()).sum::<f32>() / n as f32).collect();
        (w, SiteActivations { mean_abs, samples: x, rows: n, cols: k, gram: None })
    }

    #[test]
    fn scales_are_normalised_powers_of_the_activations() {
        let stat = [0.01f32, 0.1, 1.0, 4.0];
        assert_eq!(scales_for(&stat, 0.0), vec![1.0; 4]);
        let s = scales_for(&stat, 0.5);
        assert!((s[0] * s[3] - 1.0).abs() < 1e-5, "sqrt(max * min) = 1: {s:?}");
        for w in s.windows(2) {
            assert!(w[0] < w[1], "monotone in the activation: {s:?}");
        }
        assert!((s[3] / s[2] - 2.0).abs() < 1e-5, "ratio (4 / 1)^0.5");
        // A dead channel is floored, not zero.
        assert!(scales_for(&[0.0, 1.0], 1.0)[0] > 0.0);
    }

    #[test]
    fn search_beats_plain_int4_on_outlier_channels() {
        let (out, k) = (32, 256);
        let (w, act) = outlier_case(out, k, 64);
        let layout =
            SiteLayout { weights: vec!["w".into()], k, fold: Fold::Norm("n".into()), gqa: None };
        let chosen = search(&w, &layout, &act, DType::I4).unwrap();
        let plain =
            output_error(&act, &quantization_delta(&w, k, &vec![1.0; k], DType::I4).unwrap(), k);
        assert_eq!(chosen.error_plain, plain, "alpha 0 is plain int4");
        assert!(chosen.alpha > 0.0, "alpha 0 won");
        assert!(chosen.error < 0.7 * plain, "error {} vs plain {plain}", chosen.error);
    }

    #[test]
    fn gqa_channels_share_their_v_row_scale() {
        // 4 query heads of dim 2 over 2 kv heads: channels (h, d) -> v row (h / 2, d).
        let layout =
            SiteLayout { weights: vec![], k: 8, fold: Fold::Norm("n".into()), gqa: Some((2, 2)) };
        let map: Vec<usize> = (0..8).map(|c| layout.fold_index(c)).collect();
        assert_eq!(map, vec![0, 1, 0, 1, 2, 3, 2, 3]);
        assert_eq!(layout.folds(), 4);
        assert_eq!(
            layout.expand(&[1.0, 2.0, 3.0, 4.0]),
            vec![1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]
        );
    }

    #[test]
    fn output_error_is_the_squared_norm_of_x_delta_t() {
        let (out, k, n) = (70, 40, 3);
        let d = noise(3, out * k);
        let x = noise(4, n * k);
        let act = SiteActivations {
            mean_abs: vec![0.0; k],
            samples: x.clone(),
            rows: n,
            cols: k,
            gram: None,
        };
        let mut expected = 0f64;
        for xr in x.chunks(k) {
            for dr in d.chunks(k) {
                let y: f64 = xr.iter().zip(dr).map(|(&a, &b)| a as f64 * b as f64).sum();
                expected += y * y;
            }
        }
        let got = output_error(&act, &d, k);
        assert!((got - expected).abs() <= 1e-4 * expected, "{got} vs {expected}");
    }

    #[test]
    fn unit_scales_reproduce_plain_quantization() {
        let k = 256;
        let w = noise(5, 4 * k);
        let delta = quantization_delta(&w, k, &vec![1.0; k], DType::I4).unwrap();
        let mut bytes = vec![0u8; DType::I4.row_bytes(k).unwrap()];
        let mut back = vec![0f32; k];
        for (row, d) in w.chunks(k).zip(delta.chunks(k)) {
            crate::model::quantize::quantize_row_i4(row, &mut bytes).unwrap();
            dequantize_row(DType::I4, &bytes, &mut back);
            for ((&x, &q), &d) in row.iter().zip(&back).zip(d) {
                assert_eq!(d, x - q);
            }
        }
    }
}
