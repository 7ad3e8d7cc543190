//! Model loading: a Hugging Face directory (safetensors) or a GGUF file, both memory
//! mapped, both turned into the same thing: a config, tensors under Hugging Face names
//! in Hugging Face layout, a tokenizer and generation defaults.

pub mod awq_gptq;
pub mod gguf;
pub mod qilin_format;
pub mod safetensors;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{LoadError, ModelConfig, WeightTensor};
use crate::tokenizer::Tokenizer;

/// Sampling defaults a model ships with (`generation_config.json`).
#[derive(Clone, Debug, Default)]
pub struct GenerationDefaults {
    /// Token ids that end generation (besides the tokenizer's eos).
    pub eos_token_ids: Vec<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
}

pub struct LoadedModel {
    pub config: ModelConfig,
    /// Tensors by Hugging Face name (`model.layers.0.self_attn.q_proj.weight`),
    /// shapes in Hugging Face convention (`[out_features, in_features]`).
    pub tensors: HashMap<String, WeightTensor>,
    pub tokenizer: Tokenizer,
    pub generation: GenerationDefaults,
    /// The file or directory the model came from, for error messages.
    pub source: PathBuf,
}

/// Loads a model directory (safetensors) or a `.gguf` file.
pub fn load_model(path: &Path) -> Result<LoadedModel, LoadError> {
    let meta = std::fs::metadata(path).map_err(|e| LoadError::io(path, e))?;
    if meta.is_dir() {
        safetensors::load_hf_dir(path)
    } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        || gguf::has_magic(path)
    {
        gguf::load_gguf(path)
    } else {
        Err(LoadError::invalid(
            path,
            "not a model: expected a Hugging Face model directory or a .gguf file",
        ))
    }
}
