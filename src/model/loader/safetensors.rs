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
    // A quantized checkpoint's tensors are converted together: one linear's qweight,
    // qzeros and scales may sit in different shards.
    let method = super::awq_gptq::QuantMethod::from_config_file(&dir.join("config.json"))?;
    let mut raw = HashMap::new();
    for file in &files {
        for (name, tensor) in read_raw(file)? {
            if raw.insert(name.clone(), tensor).is_some() {
                return Err(LoadError::tensor(file, name, "appears in more than one shard"));
            }
        }
    }
    match method {
        Some(method) if method.converts_at_load() => super::awq_gptq::convert(raw, &method),
        _ => {
            // Sorted, so that the error a bad file gets is always the same one.
            let mut raw: Vec<(String, RawTensor)> = raw.into_iter().collect();
            raw.sort_by(|a, b| a.0.cmp(&b.0));
            raw.into_iter().map(|(name, t)| Ok((name.clone(), t.into_weight(&name)?))).collect()
        }
    }
}

/// A tensor as a safetensors file stores it, before it becomes a `WeightTensor`.
#[derive(Clone, Debug)]
pub struct RawTensor {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Bytes,
    /// The file it came from, for error messages.
    pub file: std::path::PathBuf,
    /// `qilin quantize` output: the block format and logical shape of a U8 tensor.
    pub qilin: Option<(DType, Vec<usize>)>,
}

impl RawTensor {
    /// The tensor as the engine takes it: float formats as they are, qilin-quantized
    /// U8 tensors as their I8/I4 blocks; anything else is an error naming the dtype.
    pub fn into_weight(self, name: &str) -> Result<WeightTensor, LoadError> {
        let dtype = match (self.dtype, &self.qilin) {
            (safetensors::Dtype::F32, None) => DType::F32,
            (safetensors::Dtype::F16, None) => DType::F16,
            (safetensors::Dtype::BF16, None) => DType::BF16,
            (safetensors::Dtype::U8, Some((dtype, shape))) => {
                return super::qilin_format::weight(&self.file, name, *dtype, shape, self.data);
            }
            (safetensors::Dtype::I32, _)
                if [".qweight", ".qzeros", ".g_idx"].iter().any(|s| name.ends_with(s)) =>
            {
                return Err(LoadError::tensor(
                    &self.file,
                    name,
                    "a packed AWQ/GPTQ tensor, but config.json has no awq or gptq `quantization_config`",
                ))
            }
            (other, _) => {
                return Err(LoadError::tensor(
                    &self.file,
                    name,
                    format!(
                        "dtype {other:?} is not supported (BF16, F16, F32 are; I32 only in AWQ/GPTQ checkpoints, U8 only in `qilin quantize` output)"
                    ),
                ))
            }
        };
        Ok(WeightTensor { dtype, shape: self.shape, data: self.data })
    }
}

/// Maps one safetensors file and returns its tensors as windows of the map.
pub fn read_safetensors(path: &Path) -> Result<Vec<(String, WeightTensor)>, LoadError> {
    read_raw(path)?.into_iter().map(|(name, t)| Ok((name.clone(), t.into_weight(&name)?))).collect()
}

/// Maps one safetensors file and returns every tensor, whatever its dtype, as a window
/// of the map, its length checked against its shape.
pub fn read_raw(path: &Path) -> Result<Vec<(String, RawTensor)>, LoadError> {
    let file = File::open(path).map_err(|e| LoadError::io(path, e))?;
    // SAFETY: the map is read-only; a model file changed under a running server is an
    // operator error we cannot defend against without copying every weight.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
    let map = Arc::new(map);
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&map[..])
        .map_err(|e| LoadError::invalid(path, format!("not a valid safetensors file: {e}")))?;
    let markers = super::qilin_format::read_markers(path, metadata.metadata())?;
    let data_start = 8 + header_len;
    let data_len = map.len().saturating_sub(data_start);
    let mut out = Vec::new();
    for (name, info) in metadata.tensors() {
        let (begin, end) = info.data_offsets;
        let bits = info.shape.iter().try_fold(info.dtype.bitsize(), |acc, &d| acc.checked_mul(d));
        let expected = bits.filter(|b| b % 8 == 0).map(|b| b / 8);
        if end < begin || end > data_len || Some(end - begin) != expected {
            return Err(LoadError::tensor(
                path,
                name,
                format!(
                    "data range {begin}..{end} does not fit shape {:?} {:?} in {data_len} data bytes (truncated file?)",
                    info.shape, info.dtype
                ),
            ));
        }
        let data = Bytes::Mapped { map: map.clone(), offset: data_start + begin, len: end - begin };
        let qilin = markers.get(&name).cloned();
        out.push((
            name,
            RawTensor {
                dtype: info.dtype,
                shape: info.shape.clone(),
                data,
                file: path.to_path_buf(),
                qilin,
            },
        ));
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
