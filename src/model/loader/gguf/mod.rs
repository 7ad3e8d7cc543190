//! GGUF files (llama.cpp's format): memory mapped, metadata turned into a ModelConfig,
//! tensors renamed to Hugging Face names and shapes, tokenizer rebuilt from
//! `tokenizer.ggml.*`. Tensor data stays in the map except for `llama` attn_q/attn_k,
//! whose rows llama.cpp permuted and we put back (see `unpermute_rows`).

mod reader;
mod tokenizer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

pub use reader::{GgufFile, MetaValue, TensorInfo};

use super::{GenerationDefaults, LoadedModel};
use crate::model::config::yarn_mscale;
use crate::model::tensor::Bytes;
use crate::model::{
    Architecture, DType, LoadError, ModelConfig, RopeConfig, RopeScaling, WeightTensor,
};

/// True when the file starts with the GGUF magic.
pub fn has_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok()
        && &magic == b"GGUF"
}

/// Loads a `.gguf` model: config, tensors under Hugging Face names, tokenizer.
pub fn load_gguf(path: &Path) -> Result<LoadedModel, LoadError> {
    let file = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
    // SAFETY: the map is read-only; like every mmap-based loader we assume the model
    // file is not truncated or rewritten while the server runs.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
    let map = Arc::new(map);
    let gguf = GgufFile::parse(&map).map_err(|m| LoadError::invalid(path, m))?;

    let arch = gguf
        .get("general.architecture")
        .and_then(MetaValue::as_str)
        .ok_or_else(|| LoadError::invalid(path, "missing general.architecture"))?;
    let architecture = match arch {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(LoadError::invalid(
                path,
                format!("unsupported GGUF architecture `{other}` (supported: llama, qwen2)"),
            ))
        }
    };
    let config =
        config_from_metadata(&gguf, arch, architecture).map_err(|m| LoadError::invalid(path, m))?;

    let mut tensors = HashMap::new();
    for info in &gguf.tensors {
        let hf_name = hf_tensor_name(&info.name).ok_or_else(|| {
            LoadError::tensor(path, &info.name, "unknown tensor name for llama/qwen2 models")
        })?;
        // GGML lists dims fastest first; Hugging Face slowest first.
        let shape: Vec<usize> = info.dims.iter().rev().copied().collect();
        if let Some(expected) = expected_shape(&config, &hf_name) {
            if shape != expected {
                return Err(LoadError::tensor(
                    path,
                    &info.name,
                    format!("shape {shape:?} does not match the model config ({expected:?})"),
                ));
            }
        }
        if shape.len() == 1 && info.dtype.is_quantized() {
            return Err(LoadError::tensor(path, &info.name, "1-D tensors must be float"));
        }
        let mapped = Bytes::Mapped { map: map.clone(), offset: info.start, len: info.len };
        let data = match permuted_heads(architecture, &config, &hf_name) {
            Some(heads) => {
                let bytes = unpermute_rows(mapped.as_slice(), &shape, info.dtype, heads)
                    .map_err(|m| LoadError::tensor(path, &info.name, m))?;
                Bytes::Owned(Arc::new(bytes))
            }
            None => mapped,
        };
        tensors.insert(hf_name, WeightTensor { dtype: info.dtype, shape, data });
    }
    if !tensors.contains_key("model.embed_tokens.weight") {
        return Err(LoadError::invalid(path, "missing tensor token_embd.weight"));
    }

    let (tokenizer, eos_id) = tokenizer::build(&gguf).map_err(|m| LoadError::invalid(path, m))?;
    let generation =
        GenerationDefaults { eos_token_ids: eos_id.into_iter().collect(), ..Default::default() };
    Ok(LoadedModel { config, tensors, tokenizer, generation, source: path.to_path_buf() })
}

fn meta_usize(g: &GgufFile, key: &str) -> Result<Option<usize>, String> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| format!("metadata `{key}` is not a non-negative integer: {v:?}")),
    }
}

fn meta_f64(g: &GgufFile, key: &str) -> Result<Option<f64>, String> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| format!("metadata `{key}` is not a number")),
    }
}

/// `{arch}.attention.head_count_kv` may be per layer (an array); we need one value.
fn meta_heads(g: &GgufFile, key: &str) -> Result<Option<usize>, String> {
    match g.get(key).and_then(MetaValue::as_array) {
        None => meta_usize(g, key),
        Some(items) => {
            let values: Option<Vec<u64>> = items.iter().map(MetaValue::as_u64).collect();
            match values.as_deref() {
                Some([first, rest @ ..]) if rest.iter().all(|v| v == first) => {
                    Ok(usize::try_from(*first).ok())
                }
                _ => Err(format!("metadata `{key}`: per-layer head counts differ or are invalid")),
            }
        }
    }
}

fn config_from_metadata(
    g: &GgufFile,
    arch: &str,
    architecture: Architecture,
) -> Result<ModelConfig, String> {
    let key = |k: &str| format!("{arch}.{k}");
    let required = |k: &str| -> Result<usize, String> {
        meta_usize(g, &key(k))?.ok_or_else(|| format!("missing metadata `{}`", key(k)))
    };
    let hidden_size = required("embedding_length")?;
    let num_heads = meta_heads(g, &key("attention.head_count"))?
        .ok_or_else(|| format!("missing metadata `{}`", key("attention.head_count")))?;
    let num_kv_heads = meta_heads(g, &key("attention.head_count_kv"))?.unwrap_or(num_heads);
    let head_dim = match meta_usize(g, &key("attention.key_length"))? {
        Some(d) => d,
        // transformers reads rope.dimension_count as head_dim for llama (full rotary).
        None => match meta_usize(g, &key("rope.dimension_count"))? {
            Some(d) if architecture == Architecture::Llama => d,
            _ => hidden_size.checked_div(num_heads).unwrap_or(0),
        },
    };
    let token_count = g.get("tokenizer.ggml.tokens").and_then(MetaValue::as_array).map(|a| a.len());
    let embd_rows = g
        .tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .and_then(|t| t.dims.get(1).copied());
    let vocab_size = meta_usize(g, &key("vocab_size"))?
        .or(embd_rows)
        .or(token_count)
        .ok_or("cannot tell the vocabulary size")?;
    let max_position_embeddings = meta_usize(g, &key("context_length"))?.unwrap_or(4096);
    let rms_norm_eps = meta_f64(g, &key("attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| format!("missing metadata `{}`", key("attention.layer_norm_rms_epsilon")))?;
    let theta = meta_f64(g, &key("rope.freq_base"))?.unwrap_or(10000.0);
    let scaling = rope_scaling(g, arch, max_position_embeddings)?;
    let has_tensor = |name: &str| g.tensors.iter().any(|t| t.name == name);
    let config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: required("feed_forward_length")?,
        num_layers: required("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: rms_norm_eps as f32,
        rope: RopeConfig { theta, scaling },
        max_position_embeddings,
        tie_word_embeddings: !has_tensor("output.weight"),
        attention_bias: architecture == Architecture::Qwen2 || has_tensor("blk.0.attn_q.bias"),
    };
    config.validate()?;
    Ok(config)
}

/// `{arch}.rope.scaling.*` (llama.cpp's names) to transformers' rope scaling.
fn rope_scaling(g: &GgufFile, arch: &str, max_pos: usize) -> Result<RopeScaling, String> {
    let key = |k: &str| format!("{arch}.rope.{k}");
    let kind = g.get(&key("scaling.type")).and_then(MetaValue::as_str);
    let factor = meta_f64(g, &key("scaling.factor"))?;
    // Old files: a bare linear factor.
    let legacy_linear = meta_f64(g, &key("scale_linear"))?;
    let positive = |f: Option<f64>| match f {
        Some(f) if f > 0.0 => Ok(f),
        _ => Err(format!("rope scaling `{}` needs a positive factor", kind.unwrap_or("linear"))),
    };
    match (kind, legacy_linear) {
        (None | Some("none"), None) => Ok(RopeScaling::None),
        (None, Some(f)) => Ok(RopeScaling::Linear { factor: positive(Some(f))? }),
        (Some("none"), Some(_)) => Ok(RopeScaling::None),
        (Some("linear"), _) => {
            Ok(RopeScaling::Linear { factor: positive(factor.or(legacy_linear))? })
        }
        (Some("yarn"), _) => {
            let factor = positive(factor)?;
            let original =
                meta_usize(g, &key("scaling.original_context_length"))?.unwrap_or(max_pos);
            if original == 0 {
                return Err("rope scaling: original_context_length must be positive".into());
            }
            Ok(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: meta_f64(g, &key("scaling.yarn_beta_fast"))?.unwrap_or(32.0),
                beta_slow: meta_f64(g, &key("scaling.yarn_beta_slow"))?.unwrap_or(1.0),
                attention_factor: yarn_mscale(factor, 1.0),
                truncate: true,
            })
        }
        (Some(other), _) => {
            Err(format!("unsupported rope scaling type `{other}` (supported: none, linear, yarn)"))
        }
    }
}

/// llama.cpp tensor name -> Hugging Face name, None for names we do not know.
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    let fixed = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// The Hugging Face shape a tensor must have under `config`, when we know it.
fn expected_shape(c: &ModelConfig, hf_name: &str) -> Option<Vec<usize>> {
    // Saturating: the config comes from the file and may be absurd.
    let (q, kv) =
        (c.num_heads.saturating_mul(c.head_dim), c.num_kv_heads.saturating_mul(c.head_dim));
    let (h, f) = (c.hidden_size, c.intermediate_size);
    match hf_name {
        "model.embed_tokens.weight" | "lm_head.weight" => return Some(vec![c.vocab_size, h]),
        "model.norm.weight" => return Some(vec![h]),
        _ => {}
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.parse::<usize>().ok()? >= c.num_layers {
        return Some(vec![]); // never matches: a layer past block_count
    }
    Some(match rest {
        "self_attn.q_proj.weight" => vec![q, h],
        "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
        "self_attn.o_proj.weight" => vec![h, q],
        "self_attn.q_proj.bias" => vec![q],
        "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => vec![kv],
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![f, h],
        "mlp.down_proj.weight" => vec![h, f],
        "input_layernorm.weight" | "post_attention_layernorm.weight" => vec![h],
        _ => return None,
    })
}

/// For `llama` files, the head count whose permutation `hf_name` carries.
fn permuted_heads(arch: Architecture, c: &ModelConfig, hf_name: &str) -> Option<usize> {
    if arch != Architecture::Llama {
        return None;
    }
    if hf_name.ends_with(".self_attn.q_proj.weight") || hf_name.ends_with(".self_attn.q_proj.bias")
    {
        Some(c.num_heads)
    } else if hf_name.ends_with(".self_attn.k_proj.weight")
        || hf_name.ends_with(".self_attn.k_proj.bias")
    {
        Some(c.num_kv_heads)
    } else {
        None
    }
}

/// Undoes llama.cpp's `permute` of Q/K rows, as transformers' `LlamaTensorProcessor.
/// _reverse_permute_weights` does: within each head of `2 * half` rows, the file holds
/// row `2 * i + t` where HF wants row `t * half + i` (pairs interleaved -> halves).
/// A row is whole blocks, so quantized data is reordered without dequantizing. A 1-D
/// tensor (bias) is the same with one element per row.
pub fn unpermute_rows(
    data: &[u8],
    shape: &[usize],
    dtype: DType,
    heads: usize,
) -> Result<Vec<u8>, String> {
    let rows = shape.first().copied().unwrap_or(0);
    let row_elems = if shape.len() == 1 { 1 } else { shape[1..].iter().product() };
    let row_bytes = dtype.row_bytes(row_elems).ok_or("rows are not whole blocks")?;
    if heads == 0
        || rows % heads.saturating_mul(2) != 0
        || Some(data.len()) != rows.checked_mul(row_bytes)
    {
        return Err(format!("cannot undo the Q/K permutation: {rows} rows for {heads} heads"));
    }
    let head_rows = rows / heads;
    let half = head_rows / 2;
    let mut out = vec![0u8; data.len()];
    for h in 0..heads {
        for t in 0..2 {
            for i in 0..half {
                let dst = h * head_rows + t * half + i;
                let src = h * head_rows + 2 * i + t;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Ok(out)
}
