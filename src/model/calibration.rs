//! Calibration activations: what each linear layer of a decoder layer sees as input
//! when the unquantized model reads a calibration text on the CPU. Activation-aware
//! quantization (model/awq/) weighs each weight by how large its input channel
//! actually gets, which the weights alone do not tell.
//!
//! The activations come from the one transformer definition (model/forward.rs) run on
//! [`Recorder`], a [`Backend`] that is the CPU backend plus an observer on `linear`:
//! every call on a decoder layer's q/k/v, o, gate/up or down projection first records
//! its input `x`. Nothing of the forward pass is written twice.
//!
//! Per input site it keeps the mean |x| of every input channel over all calibration
//! tokens, and an evenly spaced subsample of the input rows (at most [`MAX_SAMPLES`]),
//! on which the output error of a candidate quantization is measured.
//!
//! The text is cut into windows of [`WINDOW`] tokens (less when the model's context is
//! shorter), each read as its own sequence from position 0 with bos first when the
//! model adds one, as `qilin perplexity` reads its windows.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;

use super::forward::Model;
use super::weights::ModelWeights;
use super::{LoadError, LoadedModel, WeightTensor};
use crate::backend::cpu::{CpuBackend, CpuKvCache, CpuLinear, CpuTensor};
use crate::backend::{
    AttentionShape, Backend, BackendError, Batch, KvCacheShape, LinearPart, BLOCK_SIZE,
};
use crate::model::rope::RopeTable;

/// Calibration tokens used when `--calibration-tokens` is not given: 8 windows of 512.
pub const DEFAULT_CALIBRATION_TOKENS: usize = 4096;

/// Fewest tokens a calibration text must give: below this the per-channel means are
/// noise, and a too-short file is more likely a wrong path than a choice.
pub const MIN_CALIBRATION_TOKENS: usize = 64;

/// Tokens per calibration window (the perplexity tables use the same context).
pub const WINDOW: usize = 512;

/// Input rows kept per site for output-error measurements. A search costs `rows x out
/// x in` multiply-adds per candidate: 512 rows keep SmolLM2's whole search near a
/// minute on two cores (AWQ's clip search subsamples 512 tokens too). The means and
/// `X^T X` (GPTQ) use every token.
pub const MAX_SAMPLES: usize = 512;

/// Where `--calibration` text comes from and how much of it to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CalibrationSource<'a> {
    pub path: &'a Path,
    /// Tokens read from the start of the text (at most).
    pub max_tokens: usize,
}

/// The input of one group of linear layers sharing it, in a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// q, k and v projections: the input norm's output.
    Qkv,
    /// o projection: the attention output.
    O,
    /// gate and up projections: the post-attention norm's output.
    GateUp,
    /// down projection: silu(gate) * up.
    Down,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::Qkv, Site::O, Site::GateUp, Site::Down];

    pub fn name(self) -> &'static str {
        match self {
            Site::Qkv => "qkv",
            Site::O => "o_proj",
            Site::GateUp => "gate_up",
            Site::Down => "down_proj",
        }
    }

    /// The site of an uploaded linear layer, from the name `ModelWeights::load` gives
    /// it (the first part's Hugging Face name): `model.layers.{i}.self_attn.q_proj`...
    fn of_linear(name: &str) -> Option<(usize, Site)> {
        let rest = name.strip_prefix("model.layers.")?;
        let (layer, part) = rest.split_once('.')?;
        let site = match part {
            "self_attn.q_proj" => Site::Qkv,
            "self_attn.o_proj" => Site::O,
            "mlp.gate_proj" => Site::GateUp,
            "mlp.down_proj" => Site::Down,
            _ => return None,
        };
        Some((layer.parse().ok()?, site))
    }
}

/// What one site saw.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteActivations {
    /// Mean |x| of each input channel over every calibration token: `[cols]`.
    pub mean_abs: Vec<f32>,
    /// Evenly spaced input rows: `[rows, cols]` row-major.
    pub samples: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    /// `X^T X` over every calibration token, `[cols, cols]`, where it was asked for.
    pub gram: Option<Vec<f64>>,
}

/// The activations of every site of every decoder layer.
#[derive(Debug, Default)]
pub struct Activations {
    /// Calibration tokens read (bos tokens not counted).
    pub tokens: usize,
    sites: HashMap<(usize, Site), SiteActivations>,
}

impl Activations {
    pub fn get(&self, layer: usize, site: Site) -> Option<&SiteActivations> {
        self.sites.get(&(layer, site))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("--calibration {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("--calibration {path}: not UTF-8 text (invalid byte at offset {offset})")]
    NotText { path: PathBuf, offset: usize },
    #[error("--calibration {path}: tokenizing: {message}")]
    Tokenize { path: PathBuf, message: String },
    #[error(
        "--calibration {path}: {tokens} tokens, fewer than the {MIN_CALIBRATION_TOKENS} calibration needs"
    )]
    TooShort { path: PathBuf, tokens: usize },
    #[error("--calibration-tokens must be at least {MIN_CALIBRATION_TOKENS}, got {0}")]
    TooFewTokensAsked(usize),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("calibration forward pass: {0}")]
    Backend(#[from] BackendError),
}

/// Reads and tokenizes the calibration text (its first `source.max_tokens` tokens).
pub fn calibration_tokens(
    model: &LoadedModel,
    source: &CalibrationSource<'_>,
) -> Result<Vec<u32>, CalibrationError> {
    let path = source.path;
    if source.max_tokens < MIN_CALIBRATION_TOKENS {
        return Err(CalibrationError::TooFewTokensAsked(source.max_tokens));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| CalibrationError::Read { path: path.to_path_buf(), source: e })?;
    let text = String::from_utf8(bytes).map_err(|e| CalibrationError::NotText {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })?;
    // bos is added per window by `collect`, not once for the whole text.
    let mut ids = model.tokenizer.encode(&text, false).map_err(|e| CalibrationError::Tokenize {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    if ids.len() < MIN_CALIBRATION_TOKENS {
        return Err(CalibrationError::TooShort { path: path.to_path_buf(), tokens: ids.len() });
    }
    ids.truncate(source.max_tokens);
    Ok(ids)
}

/// Runs `model` (unquantized, as loaded) over `tokens` on the CPU and returns every
/// site's activations, with `X^T X` for the sites (site, input width) `gram_for` names.
pub fn collect(
    model: &LoadedModel,
    tokens: &[u32],
    gram_for: &(dyn Fn(Site, usize) -> bool + Sync),
) -> Result<Activations, CalibrationError> {
    let c = &model.config;
    let bos = model.tokenizer.special().add_bos.then(|| model.tokenizer.bos_token_id()).flatten();
    let window = WINDOW.min(c.max_context()).max(2);
    let text_per_window = if bos.is_some() { window - 1 } else { window };
    // Every `stride`-th token's rows are kept, so the samples span the whole text.
    let stride = tokens.len().div_ceil(MAX_SAMPLES).max(1);
    let recorder =
        Recorder { inner: CpuBackend::new(), sink: Mutex::new(Sink::new(stride, gram_for)) };
    let weights = ModelWeights::load(&recorder, model)?;
    let mut runner = Model::new(c.clone(), recorder, weights);
    let blocks = window.div_ceil(BLOCK_SIZE);
    let mut cache = runner.backend.alloc_kv_cache(KvCacheShape {
        num_layers: c.num_layers,
        num_blocks: blocks,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    })?;
    // One window at a time from position 0: the cache region is simply overwritten.
    let table: Vec<u32> = (0..blocks as u32).collect();
    let mut seq = Vec::with_capacity(window);
    for (w, chunk) in tokens.chunks(text_per_window).enumerate() {
        seq.clear();
        seq.extend(bos);
        seq.extend_from_slice(chunk);
        let mut batch = Batch::default();
        batch.push_seq(&seq, 0, &table, false);
        {
            let mut sink = runner.backend.sink.lock().unwrap_or_else(|e| e.into_inner());
            // Token indices of this window's rows; bos rows are not calibration text.
            sink.rows = (0..seq.len())
                .map(|r| match bos {
                    Some(_) if r == 0 => None,
                    Some(_) => Some(w * text_per_window + r - 1),
                    None => Some(w * text_per_window + r),
                })
                .collect();
        }
        // No logits are asked for: lm_head never runs.
        runner.forward(&batch, &mut cache);
    }
    let sink = runner.backend.sink.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok(Activations { tokens: tokens.len(), sites: sink.finish() })
}

/// Running sums of one site.
struct SiteSums {
    sum_abs: Vec<f64>,
    count: usize,
    samples: Vec<f32>,
    gram: Option<Vec<f64>>,
}

/// What the recorder accumulates. `rows` maps each row of the current batch to its
/// calibration token index (None: a bos row, not recorded).
struct Sink<'a> {
    stride: usize,
    gram_for: &'a (dyn Fn(Site, usize) -> bool + Sync),
    rows: Vec<Option<usize>>,
    sites: HashMap<(usize, Site), SiteSums>,
}

impl<'a> Sink<'a> {
    fn new(stride: usize, gram_for: &'a (dyn Fn(Site, usize) -> bool + Sync)) -> Self {
        Sink { stride, gram_for, rows: Vec::new(), sites: HashMap::new() }
    }

    fn record(&mut self, key: (usize, Site), x: &CpuTensor) {
        let k = x.cols;
        let want_gram = (self.gram_for)(key.1, k);
        let sums = self.sites.entry(key).or_insert_with(|| SiteSums {
            sum_abs: vec![0.0; k],
            count: 0,
            samples: Vec::new(),
            gram: want_gram.then(|| vec![0.0; k * k]),
        });
        let mut text = Vec::with_capacity(x.data.len());
        for (r, token) in self.rows.iter().enumerate() {
            let Some(token) = *token else { continue };
            let row = x.row(r);
            for (s, &v) in sums.sum_abs.iter_mut().zip(row) {
                *s += v.abs() as f64;
            }
            sums.count += 1;
            if token.is_multiple_of(self.stride) {
                sums.samples.extend_from_slice(row);
            }
            text.extend_from_slice(row);
        }
        if let Some(gram) = &mut sums.gram {
            add_gram(gram, &text, k);
        }
    }

    fn finish(self) -> HashMap<(usize, Site), SiteActivations> {
        self.sites
            .into_iter()
            .map(|(key, s)| {
                let cols = s.sum_abs.len();
                let n = s.count.max(1) as f64;
                let act = SiteActivations {
                    mean_abs: s.sum_abs.iter().map(|&v| (v / n) as f32).collect(),
                    rows: s.samples.len() / cols.max(1),
                    samples: s.samples,
                    cols,
                    gram: s.gram,
                };
                (key, act)
            })
            .collect()
    }
}

/// `gram += X^T X` for the rows `x` `[n, k]`: f32 GEMMs over bands of output rows in
/// parallel (a window's sums stay well inside f32), accumulated across batches in f64.
fn add_gram(gram: &mut [f64], x: &[f32], k: usize) {
    let n = x.len() / k;
    if n == 0 {
        return;
    }
    let band = k.div_ceil(2 * rayon::current_num_threads()).max(16);
    gram.par_chunks_mut(band * k).enumerate().for_each_init(Vec::new, |part, (b, out)| {
        let rows = out.len() / k;
        part.resize(rows * k, 0f32);
        // part [rows, k] = X[:, b*band..][rows, n] . X [n, k]; the left operand is
        // columns b*band.. of x read transposed (row stride 1, column stride k).
        // SAFETY: both operands address x[t * k + c] for t < n, c < k; part is its own
        // buffer of rows * k values.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                n,
                k,
                1.0,
                x.as_ptr().add(b * band),
                1,
                k as isize,
                x.as_ptr(),
                k as isize,
                1,
                0.0,
                part.as_mut_ptr(),
                k as isize,
                1,
            );
        }
        out.iter_mut().zip(part.iter()).for_each(|(g, &p)| *g += p as f64);
    });
}

/// The CPU backend with an observer on the inputs of the decoder layers' linears.
struct Recorder<'a> {
    inner: CpuBackend,
    sink: Mutex<Sink<'a>>,
}

/// A CPU linear layer and the site its input is recorded as (None: embeddings,
/// lm_head).
struct TaggedLinear {
    inner: CpuLinear,
    site: Option<(usize, Site)>,
}

impl Backend for Recorder<'_> {
    type Tensor = CpuTensor;
    type Linear = TaggedLinear;
    type Vector = Vec<f32>;
    type KvCache = CpuKvCache;

    fn name(&self) -> &'static str {
        "cpu (calibration)"
    }

    fn upload_linear(
        &self,
        name: &str,
        parts: &[LinearPart<'_>],
    ) -> Result<TaggedLinear, BackendError> {
        let inner = self.inner.upload_linear(name, parts)?;
        Ok(TaggedLinear { inner, site: Site::of_linear(name) })
    }

    fn upload_vector(&self, name: &str, weight: &WeightTensor) -> Result<Vec<f32>, BackendError> {
        self.inner.upload_vector(name, weight)
    }

    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<CpuKvCache, BackendError> {
        self.inner.alloc_kv_cache(shape)
    }

    fn embedding(&self, table: &TaggedLinear, ids: &[u32]) -> CpuTensor {
        self.inner.embedding(&table.inner, ids)
    }

    fn add_rms_norm(
        &self,
        residual: &mut CpuTensor,
        x: Option<&CpuTensor>,
        weight: &Vec<f32>,
        eps: f32,
    ) -> CpuTensor {
        self.inner.add_rms_norm(residual, x, weight, eps)
    }

    fn linear(&self, x: &CpuTensor, w: &TaggedLinear) -> CpuTensor {
        if let Some(site) = w.site {
            // A poisoned lock only means another recording panicked; the sums are
            // still consistent row by row.
            self.sink.lock().unwrap_or_else(|e| e.into_inner()).record(site, x);
        }
        self.inner.linear(x, &w.inner)
    }

    fn rope_and_store_kv(
        &self,
        q: &mut CpuTensor,
        k: &mut CpuTensor,
        v: &CpuTensor,
        batch: &Batch,
        rope: &RopeTable,
        cache: &mut CpuKvCache,
        layer: usize,
        shape: AttentionShape,
    ) {
        self.inner.rope_and_store_kv(q, k, v, batch, rope, cache, layer, shape)
    }

    fn attention(
        &self,
        q: &CpuTensor,
        batch: &Batch,
        cache: &CpuKvCache,
        layer: usize,
        shape: AttentionShape,
    ) -> CpuTensor {
        self.inner.attention(q, batch, cache, layer, shape)
    }

    fn silu_mul(&self, gate_up: &CpuTensor) -> CpuTensor {
        self.inner.silu_mul(gate_up)
    }

    fn split_cols(&self, x: &CpuTensor, widths: &[usize]) -> Vec<CpuTensor> {
        self.inner.split_cols(x, widths)
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[u32]) -> CpuTensor {
        self.inner.gather_rows(x, rows)
    }

    fn to_host_into(&self, x: &CpuTensor, out: &mut Vec<f32>) {
        self.inner.to_host_into(x, out)
    }

    fn argmax_rows(&self, logits: &CpuTensor) -> Vec<u32> {
        self.inner.argmax_rows(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_names_map_to_sites() {
        assert_eq!(Site::of_linear("model.layers.0.self_attn.q_proj"), Some((0, Site::Qkv)));
        assert_eq!(Site::of_linear("model.layers.12.self_attn.o_proj"), Some((12, Site::O)));
        assert_eq!(Site::of_linear("model.layers.3.mlp.gate_proj"), Some((3, Site::GateUp)));
        assert_eq!(Site::of_linear("model.layers.29.mlp.down_proj"), Some((29, Site::Down)));
        assert_eq!(Site::of_linear("model.embed_tokens"), None);
        assert_eq!(Site::of_linear("lm_head"), None);
        assert_eq!(Site::of_linear("model.layers.x.mlp.down_proj"), None);
    }

    #[test]
    fn gram_in_bands_is_x_t_x() {
        let (n, k) = (9, 70);
        let x: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let mut gram = vec![1.0f64; k * k];
        add_gram(&mut gram, &x, k);
        for a in 0..k {
            for b in 0..k {
                let want: f64 =
                    1.0 + (0..n).map(|t| (x[t * k + a] * x[t * k + b]) as f64).sum::<f64>();
                assert!((gram[a * k + b] - want).abs() < 1e-4, "({a}, {b})");
            }
        }
    }

    #[test]
    fn sink_averages_every_text_row_and_samples_every_stride_th() {
        let mut sink = Sink::new(2, &|site, _| site == Site::Down);
        // A bos row (not text), then tokens 0, 1, 2.
        sink.rows = vec![None, Some(0), Some(1), Some(2)];
        let x = CpuTensor::from_vec(vec![9.0, 9.0, 1.0, -2.0, -3.0, 4.0, 5.0, 0.0], 4, 2);
        sink.record((1, Site::Down), &x);
        let acts = sink.finish();
        let a = &acts[&(1, Site::Down)];
        assert_eq!(a.mean_abs, vec![3.0, 2.0]);
        assert_eq!((a.rows, a.cols), (2, 2));
        assert_eq!(a.samples, vec![1.0, -2.0, 5.0, 0.0], "tokens 0 and 2");
        // X^T X of the three text rows (1, -2), (-3, 4), (5, 0).
        assert_eq!(a.gram, Some(vec![35.0, -14.0, -14.0, 20.0]));
    }
}
