//! Hugging Face model directories as `huggingface-cli download` leaves them:
//! config.json, model.safetensors or shards + model.safetensors.index.json,
//! tokenizer.json, tokenizer_config.json, generation_config.json.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::Value;

use super::{GenerationDefaults, LoadedModel};
use crate::model::tensor::{Bytes, DType, WeightTensor};
use crate::model::{LoadError, ModelConfig};
use crate::tokenizer::Tokenizer;

pub fn load_hf_dir(dir: &Path) -> Result<LoadedModel, LoadError> {
    let config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let tensors = load_tensors(dir)?;
    let tokenizer = Tokenizer::from_hf_dir(dir)
        .map_err(|e| LoadError::invalid(dir, format!("tokenizer: {e}")))?;
    let generation = read_generation_config(&dir.join("generation_config.json"))?;
    Ok(LoadedModel { config, tensors, tokenizer, generation, source: dir.to_path_buf() })
}

/// Every tensor of the directory's safetensors file(s), memory mapped.
pub fn load_tensors(dir: &Path) -> Result<HashMap<String, WeightTensor>, LoadError> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| LoadError::io(&index, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::invalid(&index, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| LoadError::invalid(&index, "no `weight_map` object"))?;
        for file in map.values() {
            let name = file.as_str().ok_or_else(|| {
                LoadError::invalid(&index, "weight_map values must be file names")
            })?;
            if name.contains('/') || name.contains('\\') || name.contains("..") {
                return Err(LoadError::invalid(
                    &index,
                    format!("shard name `{name}` is not a plain file name"),
                ));
            }
            let path = dir.join(name);
            if !files.contains(&path) {
                files.push(path);
            }
        }
    } else if single.exists() {
        files.push(single);
    } else {
        return Err(LoadError::invalid(
            dir,
            "no model.safetensors or model.safetensors.index.json in this directory",
        ));
    }
    let mut tensors = HashMap::new();
    for file in &files {
        for (name, tensor) in read_safetensors(file)? {
            if tensors.insert(name.clone(), tensor).is_some() {
                return Err(LoadError::tensor(file, name, "appears in more than one shard"));
            }
        }
    }
    Ok(tensors)
}

/// Maps one safetensors file and returns its tensors as windows of the map.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, WeightTensor)>, LoadError> {
    let file = File::open(path).map_err(|e| LoadError::io(path, e))?;
    // SAFETY: the map is read-only; a model file changed under a running server is an
    // operator error we cannot defend against without copying every weight.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
    let map = Arc::new(map);
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&map[..])
        .map_err(|e| LoadError::invalid(path, format!("not a valid safetensors file: {e}")))?;
    let data_start = 8 + header_len;
    let data_len = map.len().saturating_sub(data_start);
    let mut out = Vec::new();
    for (name, info) in metadata.tensors() {
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(LoadError::tensor(
                    path,
                    name,
                    format!("dtype {other:?} is not supported (BF16, F16, F32 are)"),
                ))
            }
        };
        let (begin, end) = info.data_offsets;
        let expected = WeightTensor::expected_bytes(dtype, &info.shape);
        if end < begin || end > data_len || Some(end - begin) != expected {
            return Err(LoadError::tensor(
                path,
                name,
                format!(
                    "data range {begin}..{end} does not fit shape {:?} {dtype} in {data_len} data bytes (truncated file?)",
                    info.shape
                ),
            ));
        }
        let data = Bytes::Mapped { map: map.clone(), offset: data_start + begin, len: end - begin };
        out.push((name, WeightTensor { dtype, shape: info.shape.clone(), data }));
    }
    Ok(out)
}

/// `generation_config.json` (optional): eos ids and sampling defaults.
pub fn read_generation_config(path: &Path) -> Result<GenerationDefaults, LoadError> {
    if !path.exists() {
        return Ok(GenerationDefaults::default());
    }
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| LoadError::invalid(path, format!("not valid JSON: {e}")))?;
    let eos_token_ids = match json.get("eos_token_id") {
        Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|v| v as u32).collect(),
        _ => Vec::new(),
    };
    let f = |k: &str| json.get(k).and_then(Value::as_f64).map(|v| v as f32);
    Ok(GenerationDefaults {
        eos_token_ids,
        temperature: f("temperature"),
        top_p: f("top_p"),
        top_k: json.get("top_k").and_then(Value::as_u64).map(|v| v as usize),
        repetition_penalty: f("repetition_penalty"),
    })
}
