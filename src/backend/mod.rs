//! Backends: the fused ops the transformer needs, on CPU (reference, default) or CUDA.
//!
//! The model (`model/forward.rs`) is written once against [`Backend`]. Activations are
//! backend buffers of `rows x cols` values (row = token); weights are uploaded once.
//! Every op here has the same semantics on every backend: the CPU implementation is the
//! oracle of each CUDA kernel's parity test.

pub mod abi;
pub mod batch;
pub mod cpu;
pub mod cuda;
pub mod packed_quant;
pub mod ptx;

pub use batch::{Batch, SeqSlice, BLOCK_SIZE, NO_SLOT};

use crate::model::rope::RopeTable;
use crate::model::WeightTensor;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("weight `{name}`: {message}")]
    Weight { name: String, message: String },
    #[error("out of memory: {0}")]
    OutOfMemory(String),
}

/// One weight (and bias) of a possibly fused linear layer.
#[derive(Clone, Copy, Debug)]
pub struct LinearPart<'a> {
    pub weight: &'a WeightTensor,       // [out_i, in]
    pub bias: Option<&'a WeightTensor>, // [out_i]
}

/// Geometry of the paged KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheShape {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvCacheShape {
    /// Bytes of K and V for one token across all layers at `bytes_per_value`.
    pub fn bytes_per_token(&self, bytes_per_value: usize) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_value
    }
}

/// Attention geometry of one layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Softmax scale, 1/sqrt(head_dim) for our models.
    pub scale: f32,
}

pub trait Backend: Send + Sync {
    /// Activations: `rows x cols` values (f32 on CPU, bf16 on CUDA).
    type Tensor: Send;
    /// A linear layer's weight `[out, in]` and optional bias `[out]`, in whatever
    /// layout the backend prefers.
    type Linear: Send + Sync;
    /// A vector weight (norm scale) `[n]`.
    type Vector: Send + Sync;
    /// The paged KV cache of every layer.
    type KvCache: Send;

    fn name(&self) -> &'static str;

    /// One linear layer from `parts` stacked along the output dimension (fused QKV or
    /// gate+up: one launch instead of several); each part `[out_i, in]` with an optional
    /// bias `[out_i]`.
    fn upload_linear(
        &self,
        name: &str,
        parts: &[LinearPart<'_>],
    ) -> Result<Self::Linear, BackendError>;
    /// An embedding table `[vocab, hidden]` (also the lm_head when tied): a linear layer
    /// in whatever layout `embedding` reads (the CUDA backend's gather reads bf16, so a
    /// quantized table is dequantized there; the CPU keeps the file format).
    fn upload_embedding(
        &self,
        name: &str,
        weight: &WeightTensor,
    ) -> Result<Self::Linear, BackendError> {
        self.upload_linear(name, &[LinearPart { weight, bias: None }])
    }
    fn upload_vector(
        &self,
        name: &str,
        weight: &WeightTensor,
    ) -> Result<Self::Vector, BackendError>;
    fn alloc_kv_cache(&self, shape: KvCacheShape) -> Result<Self::KvCache, BackendError>;

    /// out `[ids.len(), hidden]` = rows `ids` of `table` `[vocab, hidden]`.
    fn embedding(&self, table: &Self::Linear, ids: &[u32]) -> Self::Tensor;

    /// Fused residual add + RMSNorm: if `x` is given, `residual += x`; then
    /// returns `rmsnorm(residual) * weight`. residual, x: `[n, hidden]`.
    fn add_rms_norm(
        &self,
        residual: &mut Self::Tensor,
        x: Option<&Self::Tensor>,
        weight: &Self::Vector,
        eps: f32,
    ) -> Self::Tensor;

    /// `x [n, in]` -> `[n, out]` = x W^T + b, in the backend's reference numerics (the
    /// logits projection, and every layer of a prompt row).
    fn linear(&self, x: &Self::Tensor, w: &Self::Linear) -> Self::Tensor;

    /// `linear` on a step's rows (`x`'s row i is `batch`'s token i). A backend may
    /// trade precision for speed on generated rows (`Batch::generated`), never on prompt
    /// rows, so that a prompt token computes the same in whatever step it lands: a
    /// repeated request that hits the prefix cache computes its uncached suffix in a
    /// shorter step than the first request did, and must still choose the same answer
    /// (SmolLM2's first answer token to the demo prompt has a margin of 0.08). The CPU's
    /// 8-bit activations work this way; the default is `linear`.
    fn step_linear(&self, x: &Self::Tensor, w: &Self::Linear, batch: &Batch) -> Self::Tensor {
        let _ = batch;
        self.linear(x, w)
    }

    /// Whether `step_linear` computes generated rows differently from prompt rows. Then
    /// the K/V of generated tokens must not serve a later prompt through the prefix
    /// cache: a prompt that repeats an earlier answer would otherwise compute differently
    /// with and without the cache.
    fn generated_rows_differ(&self) -> bool {
        false
    }

    /// Rotates q `[n, heads*head_dim]` and k `[n, kv_heads*head_dim]` (rotate-half /
    /// NEOX layout) at `batch.positions`, then writes k and v `[n, kv_heads*head_dim]`
    /// into layer `layer` of the cache at `batch.slot_mapping` (a token at `NO_SLOT` is
    /// rotated and not stored).
    #[allow(clippy::too_many_arguments)]
    fn rope_and_store_kv(
        &self,
        q: &mut Self::Tensor,
        k: &mut Self::Tensor,
        v: &Self::Tensor,
        batch: &Batch,
        rope: &RopeTable,
        cache: &mut Self::KvCache,
        layer: usize,
        shape: AttentionShape,
    );

    /// The attention's query from the fused projection `qkv [n, (heads + 2*kv_heads) *
    /// head_dim]` (q, k, v columns in that order): returns q `[n, heads*head_dim]` rotated
    /// and writes k rotated and v into layer `layer` of the cache, exactly as `split_cols`
    /// then `rope_and_store_kv` (the default, `rope_qkv_by_split`); a backend may read the
    /// columns in place instead of copying them out.
    #[allow(clippy::too_many_arguments)]
    fn rope_qkv_and_store_kv(
        &self,
        qkv: &Self::Tensor,
        batch: &Batch,
        rope: &RopeTable,
        cache: &mut Self::KvCache,
        layer: usize,
        shape: AttentionShape,
    ) -> Self::Tensor {
        rope_qkv_by_split(self, qkv, batch, rope, cache, layer, shape)
    }

    /// Causal paged attention over a batch mixing prefill chunks and decode tokens.
    /// q `[n, heads*head_dim]` -> `[n, heads*head_dim]`; K/V read from `cache` through
    /// each sequence's block table.
    fn attention(
        &self,
        q: &Self::Tensor,
        batch: &Batch,
        cache: &Self::KvCache,
        layer: usize,
        shape: AttentionShape,
    ) -> Self::Tensor;

    /// `gate_up [n, 2*ffn]` (gate first) -> `silu(gate) * up`, `[n, ffn]`.
    fn silu_mul(&self, gate_up: &Self::Tensor) -> Self::Tensor;

    /// Splits `x [n, sum(widths)]` into column blocks `[n, widths[i]]`.
    fn split_cols(&self, x: &Self::Tensor, widths: &[usize]) -> Vec<Self::Tensor>;

    /// Rows `rows` of x, in that order.
    fn gather_rows(&self, x: &Self::Tensor, rows: &[u32]) -> Self::Tensor;

    /// Copies a `[n, cols]` tensor to the host as f32, row-major, into `out` (its contents
    /// replaced). Reusing `out` matters for `[batch, vocab]` logits: faulting in fresh
    /// pages costs more than the copy.
    fn to_host_into(&self, x: &Self::Tensor, out: &mut Vec<f32>);

    /// `to_host_into` a new vector.
    fn to_host(&self, x: &Self::Tensor) -> Vec<f32> {
        let mut out = Vec::new();
        self.to_host_into(x, &mut out);
        out
    }

    /// The greedy choice of each row of `logits [n, vocab]`, exactly as the host sampler
    /// makes it: NaN counts as -inf, +inf as f32::MAX, and the first of equal maxima
    /// wins (0 for a row of nothing but -inf). Only `n` ids cross to the host.
    fn argmax_rows(&self, logits: &Self::Tensor) -> Vec<u32>;

    /// The sampled token of each row of `logits [n, vocab]` (`rows.len() == n`), exactly
    /// as the host sampler chooses it for a request without penalties or logprobs, given
    /// that step's uniform `u` (`engine::sampler::sample_row`, the CPU twin): NaN counts
    /// as -inf and +inf as f32::MAX; temperature, top-k (every tie of the k-th value),
    /// top-p over what top-k kept, min-p, then the first survivor in token-id order whose
    /// cumulative probability exceeds `u` (greedy argmax for a temperature of 0). Only `n`
    /// ids cross to the host. The default copies the logits to the host and runs the twin.
    fn sample_rows(&self, logits: &Self::Tensor, rows: &[RowSampling]) -> Vec<u32> {
        let host = self.to_host(logits);
        let vocab = host.len() / rows.len().max(1);
        sample_rows_host(&host, vocab, rows)
    }

    /// Whether `sample_rows_penalized` applies the penalties where the logits are, so the
    /// engine may send a step with penalised requests (no logprobs) there instead of to the
    /// host sampler. Default false: the engine keeps the host sampler's exact f32 path.
    fn device_penalties(&self) -> bool {
        false
    }

    /// `sample_rows` after each row's penalties (`penalties.rows[r]`, one per row) were
    /// applied to `logits` (modified in place: they are the step's scratch). The rule
    /// (`cpu::penalize_row_bf16`, the CPU twin): NaN -> -inf and +inf -> f32::MAX, then the
    /// host sampler's repetition, frequency and presence arithmetic in f32 on each listed
    /// token, and the penalised value rounded to bf16 (round to nearest even), because the
    /// device sampler works on bf16 logits. So this equals the host sampler on the raw
    /// logits except for that rounding of penalised tokens. The default copies the logits
    /// to the host and runs the twin, then `sample_rows_host`.
    fn sample_rows_penalized(
        &self,
        logits: &mut Self::Tensor,
        rows: &[RowSampling],
        penalties: &PenaltyBatch,
    ) -> Vec<u32> {
        let mut host = self.to_host(logits);
        let vocab = host.len() / rows.len().max(1);
        penalize_rows_host(&mut host, vocab, penalties);
        sample_rows_host(&host, vocab, rows)
    }

    /// Runs one forward step: `step` issues its ops for a batch and a RoPE table covering
    /// its positions, and returns the logits. A backend may run it as it is (the default,
    /// `run_eagerly`) or replay the ops it recorded for an earlier step of the same shape
    /// (the CUDA backend's graphs), which must give the logits `step` would.
    fn run_step(
        &self,
        batch: &Batch,
        rope: &mut RopeTable,
        step: &mut StepFn<'_, Self::Tensor>,
    ) -> Option<Self::Tensor> {
        run_eagerly(batch, rope, step)
    }
}

/// One forward step's ops over a batch (`Backend::run_step`): the model's layers, from
/// the token ids to the logits of `batch.logits_rows` (None when no row wants them).
pub type StepFn<'a, T> = dyn FnMut(&Batch, &RopeTable) -> Option<T> + 'a;

/// `Backend::rope_qkv_and_store_kv` by its definition: `split_cols`, then
/// `rope_and_store_kv`; returns q.
pub fn rope_qkv_by_split<B: Backend + ?Sized>(
    b: &B,
    qkv: &B::Tensor,
    batch: &Batch,
    rope: &RopeTable,
    cache: &mut B::KvCache,
    layer: usize,
    shape: AttentionShape,
) -> B::Tensor {
    let q_width = shape.num_heads * shape.head_dim;
    let kv_width = shape.num_kv_heads * shape.head_dim;
    let [mut q, mut k, v]: [B::Tensor; 3] = b
        .split_cols(qkv, &[q_width, kv_width, kv_width])
        .try_into()
        .unwrap_or_else(|_| unreachable!("split_cols returns one tensor per width"));
    b.rope_and_store_kv(&mut q, &mut k, &v, batch, rope, cache, layer, shape);
    q
}

/// Runs `step` on `batch` once, with `rope` grown to cover its positions.
pub fn run_eagerly<T>(batch: &Batch, rope: &mut RopeTable, step: &mut StepFn<'_, T>) -> Option<T> {
    let max_pos = batch.positions.iter().copied().max().unwrap_or(0) as usize;
    rope.ensure(max_pos + 1);
    step(batch, rope)
}

/// How one row of `Backend::sample_rows` is sampled: a request's parameters and the
/// uniform draw of this step from its own RNG (`Sampler::device_row`), so that a seed
/// gives the same tokens wherever the sampling runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowSampling {
    /// <= 0 (or so small that 1/T overflows): greedy, `u` unused.
    pub temperature: f32,
    /// 0: off; >= vocab: off.
    pub top_k: u32,
    /// In (0, 1]; 1: off.
    pub top_p: f32,
    /// In [0, 1]; 0: off.
    pub min_p: f32,
    /// The step's draw, in [0, 1).
    pub u: f64,
}

/// The host twin of `sample_rows` over `[rows.len(), vocab]` row-major f32 logits.
pub fn sample_rows_host(logits: &[f32], vocab: usize, rows: &[RowSampling]) -> Vec<u32> {
    let mut buf = Vec::with_capacity(vocab);
    (rows.iter().enumerate())
        .map(|(r, row)| {
            buf.clear();
            buf.extend_from_slice(&logits[r * vocab..(r + 1) * vocab]);
            crate::engine::sampler::sample_row(&mut buf, row)
        })
        .collect()
}

/// One distinct token of a sequence's prompt + output and its count in the output; the
/// kernel's own struct (kernels/abi.h), so a step's entries upload without conversion.
pub type PenaltyToken = abi::QilinPenaltyToken;

/// The penalties of one row of `Backend::sample_rows_penalized`.
#[derive(Clone, Debug, PartialEq)]
pub struct RowPenalties {
    /// HF repetition penalty (> 0), on every entry; 1: off.
    pub repetition: f32,
    /// OpenAI presence penalty, on entries with count > 0.
    pub presence: f32,
    /// OpenAI frequency penalty, times each entry's count.
    pub frequency: f32,
    /// The row's entries in `PenaltyBatch::tokens`: distinct ids (each penalised once).
    pub tokens: std::ops::Range<usize>,
}

/// Every row's penalties for one step: `rows[r]` for logits row r, its entries in
/// `tokens`. Kept by the engine across steps (`clear` keeps the capacity).
#[derive(Clone, Debug, Default)]
pub struct PenaltyBatch {
    pub rows: Vec<RowPenalties>,
    pub tokens: Vec<PenaltyToken>,
}

impl PenaltyBatch {
    pub fn clear(&mut self) {
        self.rows.clear();
        self.tokens.clear();
    }

    /// Appends a row of `entries` (distinct ids) with these penalties.
    pub fn push_row(
        &mut self,
        repetition: f32,
        presence: f32,
        frequency: f32,
        entries: impl IntoIterator<Item = PenaltyToken>,
    ) {
        let start = self.tokens.len();
        self.tokens.extend(entries);
        let tokens = start..self.tokens.len();
        self.rows.push(RowPenalties { repetition, presence, frequency, tokens });
    }

    /// Appends a row that no penalty touches.
    pub fn push_none(&mut self) {
        self.push_row(1.0, 0.0, 0.0, []);
    }

    /// The entries of row `r` (empty for a row out of range).
    pub fn row_tokens(&self, r: usize) -> &[PenaltyToken] {
        (self.rows.get(r)).and_then(|row| self.tokens.get(row.tokens.clone())).unwrap_or(&[])
    }

    /// Whether some row has an entry to penalise (else plain `sample_rows` does the same).
    pub fn any(&self) -> bool {
        self.rows.iter().any(|row| !row.tokens.is_empty())
    }
}

/// The host twin of the penalties of `sample_rows_penalized` over `[rows, vocab]` f32
/// logits: `cpu::penalize_row_bf16` on each row with its entries.
pub fn penalize_rows_host(logits: &mut [f32], vocab: usize, penalties: &PenaltyBatch) {
    for (r, (row, pen)) in logits.chunks_mut(vocab.max(1)).zip(&penalties.rows).enumerate() {
        cpu::penalize_row_bf16(row, pen, penalties.row_tokens(r));
    }
}
