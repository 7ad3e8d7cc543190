//! Hugging Face model directories: config.json + safetensors (single or sharded).
use std::path::Path;

use super::LoadedModel;
use crate::model::LoadError;

pub fn load_hf_dir(dir: &Path) -> Result<LoadedModel, LoadError> {
    Err(LoadError::invalid(dir, "not implemented yet"))
}
