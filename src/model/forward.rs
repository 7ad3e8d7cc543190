//! The one transformer definition (Qwen2 and Llama share it), written against
//! [`Backend`]: embedding -> N x (norm, attention, norm, SwiGLU MLP) -> norm -> lm_head,
//! with residual adds fused into the norms and logits only where asked.

use super::rope::RopeTable;
use super::weights::ModelWeights;
use super::ModelConfig;
use crate::backend::{AttentionShape, Backend, Batch, PenaltyBatch, RowSampling};

pub struct Model<B: Backend> {
    pub config: ModelConfig,
    pub backend: B,
    pub weights: ModelWeights<B>,
    rope: RopeTable,
}

impl<B: Backend> Model<B> {
    pub fn new(config: ModelConfig, backend: B, weights: ModelWeights<B>) -> Self {
        let rope = RopeTable::new(&config.rope, config.head_dim);
        Model { config, backend, weights, rope }
    }

    fn attention_shape(&self) -> AttentionShape {
        let c = &self.config;
        AttentionShape {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
        }
    }

    /// Runs one step: writes the batch's K/V into `cache` and returns the logits of
    /// `batch.logits_rows`, `[n_logits, vocab]` row-major on the host.
    pub fn forward(&mut self, batch: &Batch, cache: &mut B::KvCache) -> Vec<f32> {
        let mut logits = Vec::new();
        self.forward_into(batch, cache, &mut logits);
        logits
    }

    /// `forward` into `logits` (contents replaced, capacity reused: a caller that keeps
    /// one buffer across steps saves faulting in `[batch, vocab]` fresh pages per step).
    pub fn forward_into(&mut self, batch: &Batch, cache: &mut B::KvCache, logits: &mut Vec<f32>) {
        match self.logits(batch, cache) {
            Some(device_logits) => self.backend.to_host_into(&device_logits, logits),
            None => logits.clear(),
        }
    }

    /// Runs `batch` and returns the greedy token of each `logits_rows` row, chosen where
    /// the logits are (on a GPU only the ids cross to the host).
    pub fn forward_argmax(&mut self, batch: &Batch, cache: &mut B::KvCache) -> Vec<u32> {
        match self.logits(batch, cache) {
            Some(logits) => self.backend.argmax_rows(&logits),
            None => Vec::new(),
        }
    }

    /// Runs `batch` and returns the token of each `logits_rows` row sampled as `rows` says
    /// (`Backend::sample_rows`, one `RowSampling` per row), chosen where the logits are;
    /// after `penalties` (`Backend::sample_rows_penalized`) when some row has any. The
    /// penalties run after the step (after a CUDA graph's replay, on its stream), so their
    /// per-step upload is never inside a captured graph.
    pub fn forward_sample(
        &mut self,
        batch: &Batch,
        cache: &mut B::KvCache,
        rows: &[RowSampling],
        penalties: &PenaltyBatch,
    ) -> Vec<u32> {
        match self.logits(batch, cache) {
            Some(mut logits) if penalties.any() => {
                self.backend.sample_rows_penalized(&mut logits, rows, penalties)
            }
            Some(logits) => self.backend.sample_rows(&logits, rows),
            None => Vec::new(),
        }
    }

    /// The logits of `batch.logits_rows`, left on the backend; None when none is wanted.
    fn logits(&mut self, batch: &Batch, cache: &mut B::KvCache) -> Option<B::Tensor> {
        let shape = self.attention_shape();
        let Model { config, backend, weights, rope } = self;
        backend.run_step(batch, rope, &mut |batch, rope| {
            layers(backend, weights, config, shape, rope, batch, cache)
        })
    }
}

/// The step itself: embedding, every block, then the final norm and lm_head on the rows
/// that want logits.
fn layers<B: Backend>(
    b: &B,
    w: &ModelWeights<B>,
    config: &ModelConfig,
    shape: AttentionShape,
    rope: &RopeTable,
    batch: &Batch,
    cache: &mut B::KvCache,
) -> Option<B::Tensor> {
    let eps = config.rms_norm_eps;

    let mut residual = b.embedding(&w.embed_tokens, &batch.token_ids);
    let mut pending: Option<B::Tensor> = None; // output of the last block, not yet added
    for (i, layer) in w.layers.iter().enumerate() {
        let x = b.add_rms_norm(&mut residual, pending.as_ref(), &layer.input_norm, eps);
        let qkv = b.step_linear(&x, &layer.qkv_proj, batch);
        let q = b.rope_qkv_and_store_kv(&qkv, batch, rope, cache, i, shape);
        let attn = b.attention(&q, batch, cache, i, shape);
        let attn_out = b.step_linear(&attn, &layer.o_proj, batch);
        let x = b.add_rms_norm(&mut residual, Some(&attn_out), &layer.post_attention_norm, eps);
        let gate_up = b.step_linear(&x, &layer.gate_up_proj, batch);
        pending = Some(b.step_linear(&b.silu_mul(&gate_up), &layer.down_proj, batch));
    }
    if batch.logits_rows.is_empty() {
        return None;
    }
    // Only the rows that need logits go through the final norm and lm_head; a decode step
    // wants every row in order, which needs no gather.
    let (mut last, pending_last) = if batch.logits_from_every_row() {
        (residual, pending)
    } else {
        let last = b.gather_rows(&residual, &batch.logits_rows);
        (last, pending.map(|p| b.gather_rows(&p, &batch.logits_rows)))
    };
    let x = b.add_rms_norm(&mut last, pending_last.as_ref(), &w.norm, eps);
    Some(b.linear(&x, w.lm_head()))
}
