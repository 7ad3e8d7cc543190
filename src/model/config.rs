//! ModelConfig: the shape of a transformer, read from a Hugging Face `config.json`
//! (here) or from GGUF metadata (loader/gguf.rs), and the RoPE frequencies it implies.

use std::path::Path;

use serde_json::Value;

use super::LoadError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Qwen2ForCausalLM: Q/K/V projections carry a bias.
    Qwen2,
    /// LlamaForCausalLM (Llama 2/3, SmolLM2, Mistral-style): bias only if `attention_bias`.
    Llama,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Q/K/V projections have a bias (always for Qwen2).
    pub attention_bias: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    Linear {
        factor: f64,
    },
    /// Static YaRN as transformers' `_compute_yarn_parameters` computes it.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        /// cos/sin are multiplied by this ("attention scaling").
        attention_factor: f64,
        truncate: bool,
    },
    /// Llama 3.1's frequency-band scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

impl RopeConfig {
    /// Inverse frequencies, `head_dim / 2` of them, and the factor cos/sin are scaled by.
    pub fn inv_freq(&self, head_dim: usize) -> (Vec<f64>, f64) {
        let half = head_dim / 2;
        let base: Vec<f64> =
            (0..half).map(|i| 1.0 / self.theta.powf((2 * i) as f64 / head_dim as f64)).collect();
        match &self.scaling {
            RopeScaling::None => (base, 1.0),
            RopeScaling::Linear { factor } => (base.iter().map(|f| f / factor).collect(), 1.0),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                truncate,
            } => {
                let dim = head_dim as f64;
                let orig = *original_max_position_embeddings as f64;
                let correction_dim = |rotations: f64| {
                    dim * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * self.theta.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(dim - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                let freqs = base
                    .iter()
                    .enumerate()
                    .map(|(i, &extrapolation)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_weight = 1.0 - ramp;
                        let interpolation = extrapolation / factor;
                        interpolation * (1.0 - extrapolation_weight)
                            + extrapolation * extrapolation_weight
                    })
                    .collect();
                (freqs, *attention_factor)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let orig = *original_max_position_embeddings as f64;
                let low_freq_wavelen = orig / low_freq_factor;
                let high_freq_wavelen = orig / high_freq_factor;
                let freqs = base
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_freq_wavelen {
                            f / factor
                        } else if wavelen < high_freq_wavelen {
                            f
                        } else {
                            let smooth = (orig / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (freqs, 1.0)
            }
        }
    }
}

/// YaRN's default attention scaling: 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1).
pub fn yarn_mscale(factor: f64, mscale: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * mscale * factor.ln() + 1.0
    }
}

impl ModelConfig {
    /// The longest context the model supports: `max_position_embeddings`, stretched by
    /// YaRN (original window x factor: Qwen2.5's 32768 x 4 = 131072) or linear
    /// scaling, as vLLM derives it.
    pub fn max_context(&self) -> usize {
        let scaled = match &self.rope.scaling {
            RopeScaling::Yarn { factor, original_max_position_embeddings, .. } => {
                (*original_max_position_embeddings as f64 * factor) as usize
            }
            RopeScaling::Linear { factor } => {
                (self.max_position_embeddings as f64 * factor) as usize
            }
            RopeScaling::None | RopeScaling::Llama3 { .. } => 0,
        };
        self.max_position_embeddings.max(scaled)
    }

    /// Reads `config.json` of a Hugging Face model directory.
    pub fn from_hf_file(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::invalid(path, format!("not valid JSON: {e}")))?;
        Self::from_hf_json(&json).map_err(|msg| LoadError::invalid(path, msg))
    }

    pub fn from_hf_json(json: &Value) -> Result<Self, String> {
        let architectures: Vec<&str> = json
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let model_type = json.get("model_type").and_then(Value::as_str).unwrap_or("");
        let architecture = if architectures.contains(&"Qwen2ForCausalLM") || model_type == "qwen2" {
            Architecture::Qwen2
        } else if architectures.contains(&"LlamaForCausalLM")
            || architectures.contains(&"MistralForCausalLM")
            || model_type == "llama"
            || model_type == "mistral"
        {
            Architecture::Llama
        } else {
            return Err(format!(
                "unsupported architecture {architectures:?} (model_type {model_type:?}); \
                 supported: Qwen2ForCausalLM, LlamaForCausalLM"
            ));
        };
        let usize_field = |name: &str| -> Result<usize, String> {
            json.get(name)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| format!("missing or non-integer field `{name}`"))
        };
        let hidden_size = usize_field("hidden_size")?;
        let num_heads = usize_field("num_attention_heads")?;
        let num_kv_heads = usize_field("num_key_value_heads").unwrap_or(num_heads);
        let head_dim = match json.get("head_dim") {
            Some(Value::Number(n)) => {
                n.as_u64().ok_or("field `head_dim` must be a positive integer")? as usize
            }
            _ if num_heads > 0 => hidden_size / num_heads,
            _ => 0,
        };
        let max_position_embeddings = usize_field("max_position_embeddings").unwrap_or(4096);
        // rope_theta / rope_scaling (classic) or rope_parameters (transformers >= 4.57).
        let rope_parameters = json.get("rope_parameters").filter(|v| v.is_object());
        let theta = rope_parameters
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| json.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let scaling_json =
            rope_parameters.or_else(|| json.get("rope_scaling").filter(|v| v.is_object()));
        let scaling = match scaling_json {
            Some(s) => parse_rope_scaling(
                s,
                max_position_embeddings,
                json.get("original_max_position_embeddings").and_then(Value::as_u64),
            )?,
            None => RopeScaling::None,
        };
        let config = ModelConfig {
            architecture,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_layers: usize_field("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: json.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6) as f32,
            rope: RopeConfig { theta, scaling },
            max_position_embeddings,
            tie_word_embeddings: json
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            attention_bias: match architecture {
                Architecture::Qwen2 => true,
                Architecture::Llama => {
                    json.get("attention_bias").and_then(Value::as_bool).unwrap_or(false)
                }
            },
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations the forward pass relies on.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("`{name}` must be positive"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!("head_dim ({}) must be even for RoPE", self.head_dim));
        }
        if self.rope.theta.is_nan() || self.rope.theta <= 0.0 {
            return Err("rope_theta must be positive".into());
        }
        Ok(())
    }
}

fn parse_rope_scaling(
    s: &Value,
    max_position_embeddings: usize,
    top_level_original: Option<u64>,
) -> Result<RopeScaling, String> {
    if let Some(p) = s.get("partial_rotary_factor").and_then(Value::as_f64) {
        if p != 1.0 {
            return Err(format!("partial_rotary_factor {p} is not supported"));
        }
    }
    let kind =
        s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let f = |name: &str| s.get(name).and_then(Value::as_f64);
    let factor = || f("factor").ok_or_else(|| format!("rope scaling `{kind}` needs `factor`"));
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: factor()? }),
        "yarn" => {
            // transformers: a top-level `original_max_position_embeddings` wins (Phi-3
            // style), then the one inside the scaling dict, then max_position_embeddings;
            // a missing factor is max_position_embeddings / original (DeepSeek-V3 style).
            let original = top_level_original
                .or_else(|| s.get("original_max_position_embeddings").and_then(Value::as_u64))
                .map(|v| v as usize)
                .unwrap_or(max_position_embeddings);
            if original == 0 {
                return Err(
                    "rope scaling: original_max_position_embeddings must be positive".into()
                );
            }
            let factor = f("factor").unwrap_or(max_position_embeddings as f64 / original as f64);
            let attention_factor = match (f("attention_factor"), f("mscale"), f("mscale_all_dim")) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                    yarn_mscale(factor, m) / yarn_mscale(factor, all)
                }
                _ => yarn_mscale(factor, 1.0),
            };
            Ok(RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: f("beta_fast").unwrap_or(32.0),
                beta_slow: f("beta_slow").unwrap_or(1.0),
                attention_factor,
                truncate: s.get("truncate").and_then(Value::as_bool).unwrap_or(true),
            })
        }
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: s
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(8192) as usize,
        }),
        other => Err(format!(
            "unsupported rope scaling type `{other}` (supported: default, linear, yarn, llama3)"
        )),
    }
}
