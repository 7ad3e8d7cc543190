//! The CPU backend: the reference every CUDA kernel is checked against, and the
//! default that runs anywhere. f32 activations and KV cache, f32 accumulation; weights
//! stay in their file format (bf16, f16, GGUF blocks) and are decoded on the fly.

mod attention;
mod attention_decode;
mod linear;
mod norm;
mod softmax;

pub use attention::CpuKvCache;
pub use linear::CpuLinear;
pub use norm::add_rms_norm_rows;

use super::{
    AttentionShape, Backend, BackendError, Batch, KvCacheShape, LinearPart, PenaltyToken,
    RowPenalties, RowSampling,
};
use crate::model::quant::dequantize_row;
use crate::model::rope::RopeTable;
use crate::model::WeightTensor;

/// Activations: `rows x cols` f32, row-major (a row is a token).
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>, // [rows, cols]
    pub rows: usize,
    pub cols: usize,
}

impl CpuTensor {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        CpuTensor { data: vec![0.0; rows * cols], rows, cols }
    }

    pub fn from_vec(data: Vec<f32>, rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "tensor data does not match its shape");
        CpuTensor { data, rows, cols }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// How the CPU backend multiplies activations with block-quantized weights
/// (`--cpu-activations`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CpuActivations {
    /// Generated tokens (every decode step) quantize the input of each block-quantized
    /// linear layer (GGUF's block formats, I8, I4) to 8 bits per 32 values and multiply in
    /// integers (`model::quant::q8_activations`), as llama.cpp's CPU backend does. Prompt
    /// tokens, other weight formats and the logits projection keep f32, so a prompt token
    /// computes the same in any step (`Backend::step_linear`), and the prefix cache
    /// keeps prompt blocks only (`Scheduler::cache_prompts_only`).
    #[default]
    Q8,
    /// f32 activations everywhere: the reference numerics, which the tests hold against
    /// transformers and the CUDA kernels are checked against.
    F32,
}

#[derive(Clone, Copy, Debug)]
pub struct CpuBackend {
    /// Round every op's output (activations, the residual stream, K and V, logits) to
    /// bf16, where the CUDA backend stores them, while still computing each op in f32.
    /// The same model then differs from the CUDA backend by accumulation order only,
    /// which tells bf16 rounding apart from a kernel error (tests/gpu_e2e.rs).
    round_bf16: bool,
    /// Advertise `device_penalties`, so the engine sends penalised steps through
    /// `sample_rows_penalized` (the twin: penalised logits rounded to bf16) as it does on a
    /// GPU (unless QILIN_CUDA_DEVICE_PENALTIES=0). Off by default: the CPU keeps the host
    /// sampler's exact f32 penalties. For tests of that routing without a GPU.
    device_penalties: bool,
    /// `CpuActivations::F32` unless `with_activations` says otherwise: the reference.
    activations: CpuActivations,
}

impl CpuBackend {
    /// The reference: f32 activations everywhere.
    pub fn new() -> Self {
        CpuBackend { round_bf16: false, device_penalties: false, activations: CpuActivations::F32 }
    }

    /// The backend that rounds like the CUDA backend (see `round_bf16`).
    pub fn emulating_bf16() -> Self {
        CpuBackend { round_bf16: true, ..Self::new() }
    }

    /// The reference backend with `activations` for quantized linear layers.
    pub fn with_activations(activations: CpuActivations) -> Self {
        CpuBackend { activations, ..Self::new() }
    }

    /// Sets `device_penalties` (see the field).
    pub fn set_device_penalties(&mut self, on: bool) {
        self.device_penalties = on;
    }

    fn rounded(&self, mut t: CpuTensor) -> CpuTensor {
        self.round(&mut t.data);
        t
    }

    fn round(&self, values: &mut [f32]) {
        if self.round_bf16 {
            for v in values {
                *v = half::bf16::from_f32(*v).to_f32();
            }
        }
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// Decodes a whole 1-D or 2-D weight to f32 (norm scales, biases).
pub(crate) fn weight_to_f32(name: &str, w: &WeightTensor) -> Result<Vec<f32>, BackendError> {
    let row_len = w.row_len();
    if w.dtype.row_bytes(row_len).is_none() {
        return Err(BackendError::Weight {
            name: name.to_string(),
            message: format!("row of {row_len} values is not a whole number of {} blocks", w.dtype),
        });
    }
    let mut out = vec![0.0f32; w.numel()];
    for (r, chunk) in out.chunks_mut(row_len.max(1)).enumerate() {
        dequantize_row(w.dtype, w.row(r), chunk);
    }
    Ok(out)
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Linear = CpuLinear;
    type Vector = Vec<f32>;
    type KvCache = CpuKvCache;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload_linear(
        &self,
        name: &str,
        parts: &[LinearPart<'_>],
    ) -> Result<CpuLinear, BackendError> {
        CpuLinear::new(name, parts)
    }

    fn upload_vector(&self, name: &str, weight: &WeightTensor) -> Result<Vec<f32>, BackendError> {
        weight_to_f32(name, weight)
    }

    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<CpuKvCache, BackendError> {
        CpuKvCache::new(shape)
    }

    fn embedding(&self, table: &CpuLinear, ids: &[u32]) -> CpuTensor {
        self.rounded(table.gather(ids))
    }

    fn add_rms_norm(
        &self,
        residual: &mut CpuTensor,
        x: Option<&CpuTensor>,
        weight: &Vec<f32>,
        eps: f32,
    ) -> CpuTensor {
        let mut out = CpuTensor::zeros(residual.rows, residual.cols);
        if self.round_bf16 {
            // qilin_add_rms_norm_bf16 rounds residual + x before normalising it.
            if let Some(x) = x {
                residual.data.iter_mut().zip(&x.data).for_each(|(r, &x)| *r += x);
                self.round(&mut residual.data);
            }
            add_rms_norm_rows(&mut residual.data, None, weight, eps, &mut out.data);
            return self.rounded(out);
        }
        add_rms_norm_rows(
            &mut residual.data,
            x.map(|x| x.data.as_slice()),
            weight,
            eps,
            &mut out.data,
        );
        out
    }

    fn linear(&self, x: &CpuTensor, w: &CpuLinear) -> CpuTensor {
        self.rounded(w.forward(x, &[]))
    }

    fn step_linear(&self, x: &CpuTensor, w: &CpuLinear, batch: &Batch) -> CpuTensor {
        match self.activations {
            CpuActivations::Q8 => self.rounded(w.forward(x, &batch.generated)),
            CpuActivations::F32 => self.linear(x, w),
        }
    }

    fn generated_rows_differ(&self) -> bool {
        self.activations == CpuActivations::Q8
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
        attention::apply_rope(q, &batch.positions, rope, shape.head_dim);
        attention::apply_rope(k, &batch.positions, rope, shape.head_dim);
        self.round(&mut q.data);
        self.round(&mut k.data);
        cache.store(layer, &batch.slot_mapping, k, v);
    }

    fn attention(
        &self,
        q: &CpuTensor,
        batch: &Batch,
        cache: &CpuKvCache,
        layer: usize,
        shape: AttentionShape,
    ) -> CpuTensor {
        self.rounded(attention::paged_attention(q, batch, cache, layer, shape))
    }

    fn silu_mul(&self, gate_up: &CpuTensor) -> CpuTensor {
        let ffn = gate_up.cols / 2;
        let mut data = Vec::with_capacity(gate_up.rows * ffn);
        for row in gate_up.data.chunks(gate_up.cols) {
            let (gate, up) = row.split_at(ffn);
            data.extend(gate.iter().zip(up).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u));
        }
        self.rounded(CpuTensor::from_vec(data, gate_up.rows, ffn))
    }

    fn split_cols(&self, x: &CpuTensor, widths: &[usize]) -> Vec<CpuTensor> {
        debug_assert_eq!(widths.iter().sum::<usize>(), x.cols);
        let mut outs: Vec<CpuTensor> = widths
            .iter()
            .map(|&w| CpuTensor { data: Vec::with_capacity(x.rows * w), rows: x.rows, cols: w })
            .collect();
        for row in x.data.chunks(x.cols) {
            let mut start = 0;
            for (out, &w) in outs.iter_mut().zip(widths) {
                out.data.extend_from_slice(&row[start..start + w]);
                start += w;
            }
        }
        outs
    }

    fn gather_rows(&self, x: &CpuTensor, rows: &[u32]) -> CpuTensor {
        let mut data = Vec::with_capacity(rows.len() * x.cols);
        for &r in rows {
            data.extend_from_slice(x.row(r as usize));
        }
        CpuTensor::from_vec(data, rows.len(), x.cols)
    }

    fn to_host_into(&self, x: &CpuTensor, out: &mut Vec<f32>) {
        out.clear();
        out.extend_from_slice(&x.data);
    }

    fn argmax_rows(&self, logits: &CpuTensor) -> Vec<u32> {
        logits.data.chunks(logits.cols.max(1)).take(logits.rows).map(argmax_row).collect()
    }

    fn sample_rows(&self, logits: &CpuTensor, rows: &[RowSampling]) -> Vec<u32> {
        assert_eq!(rows.len(), logits.rows, "sample_rows: one RowSampling per logits row");
        crate::backend::sample_rows_host(&logits.data, logits.cols, rows)
    }

    fn device_penalties(&self) -> bool {
        self.device_penalties
    }
}

/// The host sampler's sanitize of one logit: NaN -> -inf, +inf -> f32::MAX.
#[allow(clippy::manual_clamp)] // `clamp` keeps NaN; turning NaN into -inf is the point.
fn clean(v: f32) -> f32 {
    v.max(f32::NEG_INFINITY).min(f32::MAX)
}

/// The twin of qilin_argmax_bf16: the first index of the largest value, NaN counted as
/// -inf and +inf as f32::MAX (the host sampler's `sanitize_max` + `argmax`).
pub fn argmax_row(row: &[f32]) -> u32 {
    let mut best = (f32::NEG_INFINITY, 0usize);
    for (i, &v) in row.iter().enumerate() {
        if clean(v) > best.0 {
            best = (clean(v), i);
        }
    }
    best.1 as u32
}

/// The twin of qilin_apply_penalties_bf16 on one row of `[vocab]` logits: for each entry
/// of `tokens` (distinct ids; an id outside the row is ignored), the host sampler's
/// arithmetic on that logit (engine/sampler.rs `apply_penalties`: sanitized, repetition
/// divides a positive logit and multiplies the rest, then `l - frequency * count -
/// presence` when the count is > 0), in f32, the result rounded to bf16 (nearest even):
/// the device sampler reads bf16 logits. A repeated id would be penalised twice.
pub fn penalize_row_bf16(row: &mut [f32], pen: &RowPenalties, tokens: &[PenaltyToken]) {
    let (rep, presence, frequency) = (pen.repetition, pen.presence, pen.frequency);
    let additive = presence != 0.0 || frequency != 0.0;
    for t in tokens {
        let Some(l) = row.get_mut(t.id as usize) else { continue };
        let mut v = clean(*l);
        if rep != 1.0 {
            v = if v > 0.0 { v / rep } else { v * rep };
        }
        if additive && t.count > 0 {
            v = v - frequency * t.count as f32 - presence;
        }
        *l = half::bf16::from_f32(v).to_f32();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::tensor::Bytes;
    use crate::model::DType;

    fn values(seed: u32, n: usize, scale: f32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let h = (i ^ seed).wrapping_mul(2_654_435_761).rotate_left(13);
                (h % 20_001) as f32 / 10_000.0 * scale - scale
            })
            .collect()
    }

    fn bf16_weight(vals: &[f32], shape: Vec<usize>) -> WeightTensor {
        let bytes = vals.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        WeightTensor { dtype: DType::BF16, shape, data: Bytes::Owned(Arc::new(bytes)) }
    }

    fn rounded(values: &[f32]) -> Vec<f32> {
        values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
    }

    /// Each op of the emulating backend is the plain op, its output rounded to bf16 (the
    /// fused add + norm rounds the residual sum first, as the CUDA kernel does).
    #[test]
    fn emulating_bf16_rounds_each_output_of_the_plain_ops() {
        let (plain, emulated) = (CpuBackend::new(), CpuBackend::emulating_bf16());
        let (n, k, m) = (3, 64, 40);
        let w = bf16_weight(&values(1, m * k, 0.2), vec![m, k]);
        let b = bf16_weight(&values(2, m, 1.0), vec![m]);
        let parts = [LinearPart { weight: &w, bias: Some(&b) }];
        let layer = plain.upload_linear("w", &parts).expect("upload");
        let x = CpuTensor::from_vec(values(3, n * k, 1.0), n, k);
        let exact = plain.linear(&x, &layer).data;
        assert_eq!(emulated.linear(&x, &layer).data, rounded(&exact));
        assert_ne!(exact, rounded(&exact), "the check needs outputs that are not bf16 already");

        let gate_up = CpuTensor::from_vec(values(4, n * 2 * m, 3.0), n, 2 * m);
        assert_eq!(emulated.silu_mul(&gate_up).data, rounded(&plain.silu_mul(&gate_up).data));

        let norm = values(5, k, 1.0);
        let delta = CpuTensor::from_vec(values(6, n * k, 0.01), n, k);
        let mut residual = CpuTensor::from_vec(rounded(&values(7, n * k, 1.0)), n, k);
        let mut expected_residual = residual.clone();
        let out = emulated.add_rms_norm(&mut residual, Some(&delta), &norm, 1e-6);
        for (r, d) in expected_residual.data.iter_mut().zip(&delta.data) {
            *r = half::bf16::from_f32(*r + d).to_f32();
        }
        assert_eq!(residual.data, expected_residual.data, "residual + x rounded once");
        let mut normed = expected_residual.clone();
        let expected_out = plain.add_rms_norm(&mut normed, None, &norm, 1e-6);
        assert_eq!(out.data, rounded(&expected_out.data), "the norm of the rounded sum");
    }
}
