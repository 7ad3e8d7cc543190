//! Models: configuration, file loaders, weights, and the one transformer definition.

pub mod awq;
pub mod calibration;
pub mod config;
pub mod demo;
pub mod forward;
pub mod gptq;
pub mod loader;
pub mod quant;
pub mod quantize;
pub mod rope;
pub mod tensor;
pub mod weights;

use std::path::{Path, PathBuf};

pub use config::{Architecture, ModelConfig, RopeConfig, RopeScaling};
pub use loader::{load_model, LoadedModel};
pub use tensor::{DType, WeightTensor};

/// Why a model could not be loaded. Every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: tensor `{tensor}`: {message}")]
    Tensor { path: PathBuf, tensor: String, message: String },
}

impl LoadError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        LoadError::Io { path: path.to_path_buf(), source }
    }

    pub fn invalid(path: &Path, message: impl Into<String>) -> Self {
        LoadError::Invalid { path: path.to_path_buf(), message: message.into() }
    }

    pub fn tensor(path: &Path, tensor: impl Into<String>, message: impl Into<String>) -> Self {
        LoadError::Tensor {
            path: path.to_path_buf(),
            tensor: tensor.into(),
            message: message.into(),
        }
    }
}
