//! From a model path to a ready engine on the CPU backend, with the start-up plan.

use std::path::Path;

use anyhow::Context;

use super::batch_engine::Engine;
use super::scheduler::SchedulerConfig;
use crate::backend::cpu::CpuBackend;
use crate::backend::{KvCacheShape, BLOCK_SIZE};
use crate::kv::block_manager::blocks_for;
use crate::model::forward::Model;
use crate::model::load_model;
use crate::model::loader::GenerationDefaults;
use crate::model::weights::{weight_bytes, ModelWeights};

/// Default cap on the context of the CPU backend when the user gives none.
pub const DEFAULT_MAX_MODEL_LEN: usize = 8192;

/// Bytes per cached value on the CPU backend (f32 K/V).
const CPU_KV_BYTES_PER_VALUE: usize = 4;

pub struct EngineOptions {
    pub max_model_len: Option<usize>,
    /// Token budget of one step: decodes plus prefill chunks (chunked prefill).
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    /// KV cache size; None: room for `max_num_seqs` sequences of `max_model_len`,
    /// capped at 2 GiB (the pool is lazily committed, so unused blocks cost nothing).
    pub kv_cache_bytes: Option<usize>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            max_model_len: None,
            max_num_batched_tokens: 512,
            max_num_seqs: 64,
            kv_cache_bytes: None,
        }
    }
}

/// Loads the model at `path` onto the CPU backend. Returns the engine and the model's
/// sampling defaults.
pub fn load_cpu_engine(
    path: &Path,
    options: &EngineOptions,
) -> anyhow::Result<(Engine<CpuBackend>, GenerationDefaults)> {
    let loaded = load_model(path)?;
    let backend = CpuBackend::new();
    let weights = ModelWeights::load(&backend, &loaded)?;
    let model_limit = loaded.config.max_context();
    let max_model_len = match options.max_model_len {
        Some(n) if n > model_limit => anyhow::bail!(
            "--max-model-len {n} exceeds the model's limit of {model_limit} tokens ({})",
            path.display()
        ),
        Some(n) if n < 2 => anyhow::bail!("--max-model-len must be at least 2"),
        Some(n) => n,
        None => model_limit.min(DEFAULT_MAX_MODEL_LEN),
    };
    if options.max_num_seqs == 0 {
        anyhow::bail!("--max-num-seqs must be at least 1");
    }
    if options.max_num_batched_tokens < options.max_num_seqs {
        anyhow::bail!(
            "--max-num-batched-tokens ({}) must be at least --max-num-seqs ({}): every running sequence decodes one token per step",
            options.max_num_batched_tokens,
            options.max_num_seqs
        );
    }
    let c = &loaded.config;
    let shape = KvCacheShape {
        num_layers: c.num_layers,
        num_blocks: 0,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    };
    let block_bytes = shape.bytes_per_token(CPU_KV_BYTES_PER_VALUE) * BLOCK_SIZE;
    let kv_bytes = options.kv_cache_bytes.unwrap_or_else(|| {
        (blocks_for(max_model_len) * options.max_num_seqs * block_bytes).min(2 << 30)
    });
    let num_blocks = kv_bytes / block_bytes;
    if num_blocks < blocks_for(max_model_len) {
        anyhow::bail!(
            "the KV cache ({} MiB) holds {} tokens, less than one --max-model-len sequence ({max_model_len}); raise --kv-cache-memory or lower --max-model-len",
            kv_bytes >> 20,
            num_blocks * BLOCK_SIZE
        );
    }
    tracing::info!(
        "plan: weights {} MiB; KV {} bytes/token, {num_blocks} blocks of {BLOCK_SIZE} = {} tokens; max model len {max_model_len}",
        weight_bytes(&loaded) >> 20,
        shape.bytes_per_token(CPU_KV_BYTES_PER_VALUE),
        num_blocks * BLOCK_SIZE
    );
    let mut eos_ids = loaded.generation.eos_token_ids.clone();
    for id in loaded.tokenizer.eos_token_ids() {
        if !eos_ids.contains(&id) {
            eos_ids.push(id);
        }
    }
    let model = Model::new(loaded.config, backend, weights);
    let config = SchedulerConfig {
        max_num_seqs: options.max_num_seqs,
        max_num_batched_tokens: options.max_num_batched_tokens,
        max_model_len,
    };
    let engine = Engine::new(model, loaded.tokenizer, eos_ids, config, num_blocks)
        .with_context(|| format!("allocating the KV cache of {num_blocks} blocks"))?;
    Ok((engine, loaded.generation))
}
