//! The transformer's weights, uploaded to a backend, each field with its shape.
//! Names and shapes are Hugging Face's; the loaders have already mapped GGUF onto them.

use indicatif::{ProgressBar, ProgressStyle};

use super::{LoadError, LoadedModel, WeightTensor};
use crate::backend::{Backend, LinearPart};

pub struct LayerWeights<B: Backend> {
    pub input_norm: B::Vector, // [hidden]
    /// q, k, v stacked: [(heads + 2 * kv_heads) * head_dim, hidden] (+ bias, Qwen2).
    pub qkv_proj: B::Linear,
    pub o_proj: B::Linear,              // [hidden, heads * head_dim]
    pub post_attention_norm: B::Vector, // [hidden]
    /// gate and up stacked: [2 * ffn, hidden].
    pub gate_up_proj: B::Linear,
    pub down_proj: B::Linear, // [hidden, ffn]
}

pub struct ModelWeights<B: Backend> {
    pub embed_tokens: B::Linear, // [vocab, hidden]
    pub layers: Vec<LayerWeights<B>>,
    pub norm: B::Vector, // [hidden]
    /// [vocab, hidden]; None when tied to `embed_tokens`.
    pub lm_head: Option<B::Linear>,
}

impl<B: Backend> ModelWeights<B> {
    pub fn lm_head(&self) -> &B::Linear {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Checks every tensor's presence and shape against the config, then uploads.
    pub fn load(backend: &B, model: &LoadedModel) -> Result<Self, LoadError> {
        let c = &model.config;
        let source = &model.source;
        let get = |name: &str, shape: &[usize]| -> Result<&WeightTensor, LoadError> {
            let t = model
                .tensors
                .get(name)
                .ok_or_else(|| LoadError::tensor(source, name, "missing from the model file"))?;
            if t.shape != shape {
                return Err(LoadError::tensor(
                    source,
                    name,
                    format!("shape {:?}, the config implies {:?}", t.shape, shape),
                ));
            }
            Ok(t)
        };
        let upload_err =
            |e: crate::backend::BackendError| LoadError::invalid(source, e.to_string());
        // (name, out_features) of each stacked part; all take `inp` inputs.
        let linear =
            |parts: &[(&str, usize)], inp: usize, bias: bool| -> Result<B::Linear, LoadError> {
                let mut loaded = Vec::with_capacity(parts.len());
                for &(name, out) in parts {
                    let weight = get(&format!("{name}.weight"), &[out, inp])?;
                    let bias =
                        if bias { Some(get(&format!("{name}.bias"), &[out])?) } else { None };
                    loaded.push(LinearPart { weight, bias });
                }
                backend.upload_linear(parts[0].0, &loaded).map_err(upload_err)
            };
        let vector = |name: &str, n: usize| -> Result<B::Vector, LoadError> {
            backend.upload_vector(name, get(name, &[n])?).map_err(upload_err)
        };
        let (h, hd, ffn) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (q_out, kv_out) = (c.num_heads * hd, c.num_kv_heads * hd);
        let progress = ProgressBar::new(c.num_layers as u64 + 1).with_style(
            ProgressStyle::with_template("loading {bar:30} {pos}/{len} layers")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        let embed_tokens = backend
            .upload_embedding(
                "model.embed_tokens",
                get("model.embed_tokens.weight", &[c.vocab_size, h])?,
            )
            .map_err(upload_err)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let bias = c.attention_bias;
            layers.push(LayerWeights {
                input_norm: vector(&format!("{p}.input_layernorm.weight"), h)?,
                qkv_proj: linear(
                    &[
                        (&format!("{p}.self_attn.q_proj"), q_out),
                        (&format!("{p}.self_attn.k_proj"), kv_out),
                        (&format!("{p}.self_attn.v_proj"), kv_out),
                    ],
                    h,
                    bias,
                )?,
                o_proj: linear(&[(&format!("{p}.self_attn.o_proj"), h)], q_out, false)?,
                post_attention_norm: vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                gate_up_proj: linear(
                    &[(&format!("{p}.mlp.gate_proj"), ffn), (&format!("{p}.mlp.up_proj"), ffn)],
                    h,
                    false,
                )?,
                down_proj: linear(&[(&format!("{p}.mlp.down_proj"), h)], ffn, false)?,
            });
            progress.inc(1);
        }
        let norm = vector("model.norm.weight", h)?;
        // Some checkpoints say tied but still ship lm_head (identical); use it if present.
        let lm_head = if model.tensors.contains_key("lm_head.weight") {
            Some(linear(&[("lm_head", c.vocab_size)], h, false)?)
        } else if c.tie_word_embeddings {
            None
        } else {
            return Err(LoadError::tensor(
                source,
                "lm_head.weight",
                "missing, and the config does not tie it to the embeddings",
            ));
        };
        progress.finish_and_clear();
        Ok(ModelWeights { embed_tokens, layers, norm, lm_head })
    }
}

/// Bytes of weights a model holds in its file format (for the start-up plan).
pub fn weight_bytes(model: &LoadedModel) -> usize {
    model.tensors.values().map(|t| t.bytes().len()).sum()
}
