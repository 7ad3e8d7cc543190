//! Random-weight models of a real model's exact shape (Qwen2.5-7B by default) made on
//! the GPU, for `qilin bench decode`, `qilin bench prefill` (bench/model_steps.rs) and
//! `qilin bench kernels`: nothing is read from disk, so the GPU machine needs no 15 GB
//! checkpoint.
//!
//! How the weights are made. There is no random-number kernel (every kernel must have a
//! CPU twin and a parity test, and this is no model op), and generating 7.6 billion
//! values on the host and uploading them takes minutes. Instead a few pools of 8 Mi
//! seeded uniform bf16 values (one per scale: ±sqrt(3/in_features) keeps activations
//! near unit variance layer after layer) are uploaded once, and every large buffer is
//! tiled from them by device-to-device copies of 1 Mi values at random offsets: about
//! 7,300 copies for Qwen2.5-7B, well under a second at copy bandwidth. No value is zero,
//! no two tiles of a tensor line up, and every byte a kernel reads is a distinct address,
//! so caches see what they would see with real weights. Norm weights and biases are
//! small and made on the host. The KV cache is tiled the same way, so decode attention
//! reads random keys and values at the requested context without a prefill first.

use anyhow::bail;
use cudarc::driver::CudaSlice;
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::cuda::{
    reserve_dequant_scratch, CudaBackend, CudaKvCache, CudaLinear, CudaTensor, CudaVector, Device,
    LinearWeight, QuantWeight,
};
use crate::model::forward::Model;
use crate::model::quant::levels::{level_format, LevelFormat};
use crate::model::quantize::QuantizeMethod;
use crate::model::weights::{LayerWeights, ModelWeights};
use crate::model::ModelConfig;

/// Values per host-made pool that device buffers are tiled from.
const POOL_ELEMS: usize = 1 << 23;
/// Values per device-to-device copy when tiling.
const TILE_ELEMS: usize = 1 << 20;

/// The `config.json` fields of the shapes the benchmarks know.
pub fn shape_config(name: &str) -> anyhow::Result<ModelConfig> {
    let json = match name {
        "qwen2.5-7b" => serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"],
            "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
            "max_position_embeddings": 32768, "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": false
        }),
        "smollm2-135m" => serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
            "max_position_embeddings": 8192, "rope_theta": 100000.0,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": true
        }),
        other => bail!("unknown --shape `{other}`; known: qwen2.5-7b, smollm2-135m"),
    };
    ModelConfig::from_hf_json(&json).map_err(|e| anyhow::anyhow!("shape {name}: {e}"))
}

/// Fills device buffers with seeded pseudo-random bf16 values (see the module comment).
pub struct DeviceRandom<'a> {
    dev: &'a Device,
    rng: ChaCha8Rng,
    /// (scale, POOL_ELEMS values uniform in [-scale, scale]) on the device.
    pools: Vec<(f32, CudaSlice<bf16>)>,
    /// POOL_ELEMS uniform random bytes on the device (quantized levels).
    byte_pool: Option<CudaSlice<u8>>,
}

/// Overwrites all of `dst` with tiles of `pool` at random offsets.
fn tile<T: cudarc::driver::DeviceRepr>(
    dev: &Device,
    rng: &mut ChaCha8Rng,
    pool: &CudaSlice<T>,
    dst: &mut CudaSlice<T>,
) {
    let n = dst.len();
    let mut at = 0;
    while at < n {
        let len = (n - at).min(TILE_ELEMS);
        let from = rng.random_range(0..=POOL_ELEMS - len);
        let src = pool.slice(from..from + len);
        let mut to = dst.slice_mut(at..at + len);
        if let Err(e) = dev.stream.memcpy_dtod(&src, &mut to) {
            panic!("CUDA error while tiling random values on the device: {e}");
        }
        at += len;
    }
}

impl<'a> DeviceRandom<'a> {
    pub fn new(dev: &'a Device, seed: u64) -> Self {
        DeviceRandom {
            dev,
            rng: ChaCha8Rng::seed_from_u64(seed),
            pools: Vec::new(),
            byte_pool: None,
        }
    }

    /// Host values uniform in [center - spread, center + spread], rounded to bf16.
    pub fn host_values(&mut self, n: usize, center: f32, spread: f32) -> Vec<bf16> {
        (0..n).map(|_| bf16::from_f32(center + self.rng.random_range(-spread..=spread))).collect()
    }

    fn pool(&mut self, scale: f32) -> usize {
        if let Some(i) = self.pools.iter().position(|(s, _)| *s == scale) {
            return i;
        }
        // Never exactly zero: a zero weight would make the benchmark data unrealistically
        // easy for nothing, and zeros hide unwritten outputs.
        let values: Vec<bf16> = (0..POOL_ELEMS)
            .map(|_| {
                let v: f32 = self.rng.random_range(-scale..=scale);
                bf16::from_f32(if v == 0.0 { scale * 0.5 } else { v })
            })
            .collect();
        self.pools.push((scale, self.dev.upload(&values)));
        self.pools.len() - 1
    }

    /// Overwrites all of `dst` with tiles of the `scale` pool at random offsets.
    pub fn fill(&mut self, dst: &mut CudaSlice<bf16>, scale: f32) {
        let pool = self.pool(scale);
        tile(self.dev, &mut self.rng, &self.pools[pool].1, dst);
    }

    /// Overwrites all of `dst` with tiles of uniform random bytes.
    pub fn fill_bytes(&mut self, dst: &mut CudaSlice<u8>) {
        if self.byte_pool.is_none() {
            let bytes: Vec<u8> = (0..POOL_ELEMS).map(|_| self.rng.random()).collect();
            self.byte_pool = Some(self.dev.upload(&bytes));
        }
        if let Some(pool) = &self.byte_pool {
            tile(self.dev, &mut self.rng, pool, dst);
        }
    }

    /// `[rows, cols]` values uniform in [-scale, scale].
    pub fn tensor(&mut self, rows: usize, cols: usize, scale: f32) -> CudaTensor {
        let mut data = self.dev.alloc::<bf16>(rows * cols);
        self.fill(&mut data, scale);
        CudaTensor { data, rows, cols }
    }

    /// A linear layer `[out, inp]` with weights of variance 1/inp, and a small bias.
    pub fn linear(&mut self, out: usize, inp: usize, bias: bool) -> CudaLinear {
        let scale = (3.0 / inp as f32).sqrt();
        let mut weight = self.dev.alloc::<bf16>(out * inp);
        self.fill(&mut weight, scale);
        let bias = self.bias(out, bias);
        CudaLinear { weight: LinearWeight::Bf16(weight), bias, out_features: out, in_features: inp }
    }

    fn bias(&mut self, out: usize, bias: bool) -> Option<CudaSlice<bf16>> {
        bias.then(|| {
            let values = self.host_values(out, 0.0, 0.05);
            self.dev.upload(&values)
        })
    }

    /// As `linear`, with the weight as random levels of `format` (kernels/quant_linear.cu's
    /// layout): uniform levels, a scale per group within 10% of the one that gives
    /// variance 1/inp, and a min that centres the levels on zero.
    pub fn quant_linear(
        &mut self,
        out: usize,
        inp: usize,
        bias: bool,
        format: LevelFormat,
    ) -> CudaLinear {
        let mut levels = self.dev.alloc::<u8>(out * inp * format.bits as usize / 8);
        self.fill_bytes(&mut levels);
        // Levels uniform over 2^bits values span +-2^(bits-1) steps around the centre.
        let half_range = (1u32 << (format.bits - 1)) as f32;
        let step = (3.0 / inp as f32).sqrt() / half_range;
        let centre = if format.bits == 4 { 7.5 } else { -0.5 };
        let scale_min: Vec<f32> = (0..out * inp / format.group)
            .flat_map(|_| {
                let s = step * self.rng.random_range(0.9f32..1.1);
                [s, -centre * s]
            })
            .collect();
        let weight = LinearWeight::Quant(QuantWeight {
            format,
            levels,
            scale_min: self.dev.upload(&scale_min),
        });
        reserve_dequant_scratch(self.dev, inp, out);
        let bias = self.bias(out, bias);
        CudaLinear { weight, bias, out_features: out, in_features: inp }
    }

    /// `linear` or `quant_linear` as `format` says.
    pub fn any_linear(
        &mut self,
        out: usize,
        inp: usize,
        bias: bool,
        format: Option<LevelFormat>,
    ) -> CudaLinear {
        match format {
            Some(format) => self.quant_linear(out, inp, bias, format),
            None => self.linear(out, inp, bias),
        }
    }

    /// A norm weight near 1.
    pub fn vector(&mut self, n: usize) -> CudaVector {
        let values = self.host_values(n, 1.0, 0.2);
        CudaVector { data: self.dev.upload(&values), len: n }
    }

    /// Every layer's K and V, uniform in [-2, 2].
    pub fn fill_kv(&mut self, cache: &mut CudaKvCache) {
        for buf in cache.keys.iter_mut().chain(cache.values.iter_mut()) {
            self.fill(buf, 2.0);
        }
    }
}

/// Parameters of a model of this config (what its weights occupy in bf16, halved).
pub fn parameter_count(c: &ModelConfig) -> usize {
    let (h, hd, ffn) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let qkv = (c.num_heads + 2 * c.num_kv_heads) * hd;
    let bias = if c.attention_bias { qkv } else { 0 };
    let layer = 2 * h + qkv * h + bias + h * c.num_heads * hd + 2 * ffn * h + h * ffn;
    let head = if c.tie_word_embeddings { 0 } else { c.vocab_size * h };
    c.vocab_size * h + c.num_layers * layer + h + head
}

/// The device layout of `--quantize`'s linear layers: I8 and I4 both keep groups of 128
/// (model/quant/levels.rs), so the benchmark streams what a quantized checkpoint would.
pub fn quant_format(method: QuantizeMethod) -> Option<LevelFormat> {
    method.dtype().and_then(level_format)
}

/// Bytes of a model's weights on the device: bf16, or the transformer layers' linear
/// weights as levels + pairs (embeddings, lm_head, norms and biases stay bf16).
pub fn device_weight_bytes(c: &ModelConfig, format: Option<LevelFormat>) -> usize {
    let Some(f) = format else { return parameter_count(c) * 2 };
    let (h, hd, ffn) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let qkv = (c.num_heads + 2 * c.num_kv_heads) * hd;
    let linear_values = c.num_layers * (qkv * h + h * c.num_heads * hd + 3 * ffn * h);
    let quant_bytes = linear_values * f.bits as usize / 8 + linear_values / f.group * 8;
    (parameter_count(c) - linear_values) * 2 + quant_bytes
}

/// A model of `config`'s shape with random weights, made on `backend`'s device; its
/// transformer layers' linear weights quantized to `format` when given.
pub fn random_model(
    config: ModelConfig,
    backend: CudaBackend,
    seed: u64,
    format: Option<LevelFormat>,
) -> Model<CudaBackend> {
    let weights = {
        let mut rand = DeviceRandom::new(&backend.dev, seed);
        let c = &config;
        let (h, hd, ffn) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (q_out, kv_out) = (c.num_heads * hd, c.num_kv_heads * hd);
        // Embedding rows go straight into an RMSNorm, so their scale does not matter.
        let embed_tokens = {
            let mut weight = backend.dev.alloc::<bf16>(c.vocab_size * h);
            rand.fill(&mut weight, 1.0);
            CudaLinear {
                weight: LinearWeight::Bf16(weight),
                bias: None,
                out_features: c.vocab_size,
                in_features: h,
            }
        };
        let layers = (0..c.num_layers)
            .map(|_| LayerWeights {
                input_norm: rand.vector(h),
                qkv_proj: rand.any_linear(q_out + 2 * kv_out, h, c.attention_bias, format),
                o_proj: rand.any_linear(h, q_out, false, format),
                post_attention_norm: rand.vector(h),
                gate_up_proj: rand.any_linear(2 * ffn, h, false, format),
                down_proj: rand.any_linear(h, ffn, false, format),
            })
            .collect();
        let norm = rand.vector(h);
        let lm_head = (!c.tie_word_embeddings).then(|| rand.linear(c.vocab_size, h, false));
        ModelWeights { embed_tokens, layers, norm, lm_head }
    };
    backend.dev.synchronize();
    Model::new(config, backend, weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen7b_shape_has_its_published_parameter_count() {
        let c = shape_config("qwen2.5-7b").unwrap();
        assert_eq!((c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim), (3584, 28, 4, 128));
        assert!(c.attention_bias && !c.tie_word_embeddings);
        // Qwen2.5-7B: 7.61B parameters.
        let p = parameter_count(&c);
        assert!((7_600_000_000..7_625_000_000).contains(&p), "{p}");
    }

    #[test]
    fn smollm2_shape_has_its_published_parameter_count() {
        let c = shape_config("smollm2-135m").unwrap();
        assert_eq!(c.head_dim, 64);
        let p = parameter_count(&c);
        assert!((134_000_000..135_000_000).contains(&p), "{p}");
    }

    /// The int4 model streams its transformer layers' linear weights as levels + pairs:
    /// 0.5625 bytes per weight instead of 2. Qwen2.5-7B's card gives 6.53B non-embedding
    /// parameters, nearly all of them those weights (norms and biases are ~1M).
    #[test]
    fn int4_weight_bytes_shrink_exactly_the_linear_layers() {
        let c = shape_config("qwen2.5-7b").unwrap();
        let bf16 = device_weight_bytes(&c, None);
        assert_eq!(bf16, parameter_count(&c) * 2);
        let int4 = device_weight_bytes(&c, quant_format(QuantizeMethod::Int4));
        let int8 = device_weight_bytes(&c, quant_format(QuantizeMethod::Int8));
        let linear = (bf16 - int4) as f64 / (2.0 - 0.5625);
        assert!((6.52e9..6.54e9).contains(&linear), "{linear}");
        let linear8 = (bf16 - int8) as f64 / (2.0 - 1.0625);
        assert!((linear8 - linear).abs() < 1.0, "{linear8} vs {linear}");
        assert_eq!(quant_format(QuantizeMethod::None), None);
    }

    #[test]
    fn unknown_shapes_are_refused() {
        assert!(shape_config("gpt-5").is_err());
    }
}
