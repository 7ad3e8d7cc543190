//! From a model path to a ready generator on the CPU backend.

use std::path::Path;

use anyhow::Context;

use super::Generator;
use crate::backend::cpu::CpuBackend;
use crate::model::forward::Model;
use crate::model::load_model;
use crate::model::loader::GenerationDefaults;
use crate::model::weights::ModelWeights;

/// Default cap on the context of the CPU backend when the user gives none: the KV
/// cache of one full sequence is allocated up front.
pub const DEFAULT_MAX_MODEL_LEN: usize = 8192;

pub struct EngineOptions {
    pub max_model_len: Option<usize>,
    pub prefill_chunk: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { max_model_len: None, prefill_chunk: 512 }
    }
}

/// Loads the model at `path` onto the CPU backend. Returns the generator and the
/// model's sampling defaults.
pub fn load_cpu_generator(
    path: &Path,
    options: &EngineOptions,
) -> anyhow::Result<(Generator<CpuBackend>, GenerationDefaults)> {
    let loaded = load_model(path)?;
    let backend = CpuBackend::new();
    let weights = ModelWeights::load(&backend, &loaded)?;
    let model_limit = loaded.config.max_position_embeddings;
    let max_model_len = match options.max_model_len {
        Some(n) if n > model_limit => anyhow::bail!(
            "--max-model-len {n} exceeds the model's limit of {model_limit} tokens ({})",
            path.display()
        ),
        Some(0) => anyhow::bail!("--max-model-len must be at least 2"),
        Some(n) => n,
        None => model_limit.min(DEFAULT_MAX_MODEL_LEN),
    };
    let mut eos_ids = loaded.generation.eos_token_ids.clone();
    for id in loaded.tokenizer.eos_token_ids() {
        if !eos_ids.contains(&id) {
            eos_ids.push(id);
        }
    }
    let model = Model::new(loaded.config, backend, weights);
    let generator =
        Generator::new(model, loaded.tokenizer, eos_ids, max_model_len, options.prefill_chunk)
            .with_context(|| format!("allocating the KV cache for {max_model_len} tokens"))?;
    Ok((generator, loaded.generation))
}
