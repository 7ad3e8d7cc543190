//! `qilin bench decode` and `qilin bench prefill`: tokens per second of the one model
//! definition (`model::forward`) on the CUDA backend, for a random-weight model of a
//! real model's exact shape (Qwen2.5-7B by default) made on the GPU: nothing is read
//! from disk, so the GPU machine needs no 15 GB checkpoint.
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
//!
//! What is timed. Decode: one step of `batch` sequences, each with `context` tokens
//! already cached, one new token each, logits for every sequence downloaded to the host
//! as the engine does (host sampling is not included); wall time per `Model::forward`
//! call (it ends with the logits copy, which synchronizes), median of `iters`. The
//! logits download alone is timed too and reported beside it. Prefill: one sequence of
//! `len` tokens in chunks of `chunk` tokens (chunked prefill), logits of the last token
//! only; wall time of all chunks, median of `iters`.

use std::time::Instant;

use anyhow::{bail, Context};
use cudarc::driver::CudaSlice;
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::backend::cuda::{
    reserve_dequant_scratch, CudaBackend, CudaKvCache, CudaLinear, CudaTensor, CudaVector, Device,
    LinearWeight, QuantWeight,
};
use crate::backend::{Backend, Batch, KvCacheShape, BLOCK_SIZE};
use crate::config::{BenchDecodeArgs, BenchPrefillArgs, GpuModelArgs};
use crate::engine::load::open_cuda;
use crate::kv::block_manager::blocks_for;
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

/// What every report starts with.
#[derive(Debug, Serialize)]
pub struct ModelInfo {
    pub device: String,
    pub shape: String,
    pub layers: usize,
    pub parameters: usize,
    /// `--quantize`: "none", "int8" or "int4".
    pub quantize: &'static str,
    /// Bytes of weights on the device (quantized layers as levels + pairs).
    pub weight_bytes: usize,
    pub weights_made_s: f64,
}

/// Opens the GPU, checks the model and `kv_tokens` of KV cache fit, and makes the model.
fn prepare(
    args: &GpuModelArgs,
    kv_tokens: usize,
) -> anyhow::Result<(Model<CudaBackend>, CudaKvCache, ModelInfo)> {
    if args.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let mut config = shape_config(&args.shape)?;
    if let Some(layers) = args.layers {
        if layers == 0 || layers > config.num_layers {
            bail!("--layers must be in 1..={}", config.num_layers);
        }
        config.num_layers = layers;
    }
    let backend =
        open_cuda().map_err(|why| anyhow::anyhow!("this benchmark needs a GPU: {why}"))?;
    let parameters = parameter_count(&config);
    let shape = KvCacheShape {
        num_layers: config.num_layers,
        num_blocks: blocks_for(kv_tokens),
        num_kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
    };
    let kv_bytes = shape.num_blocks * BLOCK_SIZE * shape.bytes_per_token(2);
    let (free, total) = backend
        .dev
        .ctx
        .mem_get_info()
        .map_err(|e| anyhow::anyhow!("reading the device's free memory: {e}"))?;
    // Pools, activations of the largest step and cuBLAS: 4 GiB is ample for these sizes.
    let format = quant_format(args.quantize);
    let weight_bytes = device_weight_bytes(&config, format);
    let needed = weight_bytes + kv_bytes + (4 << 30);
    if needed > free {
        bail!(
            "the {} model ({} MiB of weights) and {} MiB of KV cache need about {} MiB; \
             the device has {} MiB free of {} MiB (try --layers or a smaller batch/context)",
            args.shape,
            weight_bytes >> 20,
            kv_bytes >> 20,
            needed >> 20,
            free >> 20,
            total >> 20
        );
    }
    let device = backend.dev.name();
    let started = Instant::now();
    let model = random_model(config, backend, args.seed, format);
    let weights_made_s = started.elapsed().as_secs_f64();
    let mut cache = model.backend.alloc_kv_cache(shape).context("allocating the KV cache")?;
    DeviceRandom::new(&model.backend.dev, args.seed ^ 0x5eed).fill_kv(&mut cache);
    model.backend.dev.synchronize();
    let info = ModelInfo {
        device,
        shape: args.shape.clone(),
        layers: model.config.num_layers,
        parameters,
        quantize: args.quantize.name(),
        weight_bytes,
        weights_made_s,
    };
    eprintln!(
        "{} on {}: {} layers, {:.2}B parameters made on the device in {:.1}s",
        info.shape,
        info.device,
        info.layers,
        parameters as f64 / 1e9,
        weights_made_s
    );
    Ok((model, cache, info))
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[derive(Debug, Serialize)]
pub struct DecodePoint {
    pub batch: usize,
    pub context: usize,
    /// Median wall time of one greedy step (forward + the device argmax; only the ids
    /// cross to the host, as in the engine's greedy and device-sampled paths), ms.
    pub step_ms: f64,
    pub step_ms_all: Vec<f64>,
    /// batch / step time.
    pub tokens_per_s: f64,
    /// Median time of copying `[batch, vocab]` logits to the host as f32 into a reused
    /// buffer: what a step costs more when a request needs the host sampler.
    pub logits_to_host_ms: f64,
    /// Median time of the host sampler on those rows with Qwen2.5-Instruct's default
    /// parameters (temperature 0.7, top-k 20, top-p 0.8, repetition penalty 1.05; a
    /// 1000-token prompt), every row on its own core as the engine samples them: the
    /// rest of a host-sampled step.
    pub host_sample_ms: f64,
    /// Weight bytes read per step over the step time (the batch-1 roofline's numerator).
    pub weight_gb_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct DecodeReport {
    pub model: ModelInfo,
    pub points: Vec<DecodePoint>,
}

pub fn decode(args: &BenchDecodeArgs) -> anyhow::Result<()> {
    if args.batch.is_empty() || args.batch.contains(&0) {
        bail!("--batch needs positive sizes");
    }
    if args.context == 0 {
        bail!("--context must be at least 1");
    }
    let steps = args.model.warmup + args.model.iters;
    let seq_tokens = args.context + steps;
    let max_batch = args.batch.iter().copied().max().unwrap_or(1);
    let blocks_per_seq = blocks_for(seq_tokens);
    let (mut model, mut cache, info) =
        prepare(&args.model, max_batch * blocks_per_seq * BLOCK_SIZE)?;
    if seq_tokens > model.config.max_position_embeddings {
        bail!(
            "--context {} plus {steps} steps exceeds the shape's {} positions",
            args.context,
            model.config.max_position_embeddings
        );
    }
    let vocab = model.config.vocab_size as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(args.model.seed);
    let mut report = DecodeReport { model: info, points: Vec::new() };
    for &batch_size in &args.batch {
        let mut times = Vec::new();
        for step in 0..steps {
            let mut batch = Batch::default();
            for s in 0..batch_size {
                let first = (s * blocks_per_seq) as u32;
                let table: Vec<u32> = (first..first + blocks_per_seq as u32).collect();
                let token = rng.random_range(0..vocab);
                batch.push_seq(&[token], args.context + step, &table, true);
            }
            let started = Instant::now();
            let ids = model.forward_argmax(&batch, &mut cache);
            let elapsed = started.elapsed().as_secs_f64() * 1e3;
            if ids.len() != batch_size {
                bail!("forward returned {} tokens for {batch_size} sequences", ids.len());
            }
            if step >= args.model.warmup {
                times.push(elapsed);
            }
        }
        let (logits_to_host_ms, host_sample_ms) = {
            let b = &model.backend;
            let t = DeviceRandom::new(&b.dev, 1).tensor(batch_size, vocab as usize, 8.0);
            b.dev.synchronize();
            let mut host = Vec::new();
            b.to_host_into(&t, &mut host);
            let runs: Vec<f64> = (0..3)
                .map(|_| {
                    let started = Instant::now();
                    b.to_host_into(&t, &mut host);
                    std::hint::black_box(&host);
                    started.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            (median(&runs), host_sampling_ms(&host, vocab as usize, args.model.seed))
        };
        let step_ms = median(&times);
        let point = DecodePoint {
            batch: batch_size,
            context: args.context,
            step_ms,
            tokens_per_s: batch_size as f64 / (step_ms / 1e3),
            logits_to_host_ms,
            host_sample_ms,
            weight_gb_per_s: report.model.weight_bytes as f64 / (step_ms / 1e3) / 1e9,
            step_ms_all: times,
        };
        println!(
            "decode batch {:>4} context {}: {:>8.2} ms/step, {:>9.1} tok/s (weights {:.0} GB/s; host-sampled steps add {:.2} ms of logits to host and {:.2} ms of sampling)",
            point.batch,
            point.context,
            point.step_ms,
            point.tokens_per_s,
            point.weight_gb_per_s,
            point.logits_to_host_ms,
            point.host_sample_ms
        );
        report.points.push(point);
        // After every point, so a run stopped by its timeout still leaves its figures.
        write_json(&args.model, &report)?;
    }
    Ok(())
}

/// Median wall time of sampling every `[vocab]` row of `logits` with Qwen2.5-Instruct's
/// default parameters, rows in parallel as the engine's host path does.
fn host_sampling_ms(logits: &[f32], vocab: usize, seed: u64) -> f64 {
    use crate::engine::sampler::Sampler;
    use crate::engine::SamplingParams;
    use rayon::prelude::*;
    let params = SamplingParams {
        temperature: 0.7,
        top_k: 20,
        top_p: 0.8,
        repetition_penalty: 1.05,
        seed: Some(seed),
        ..SamplingParams::default()
    };
    let rows = logits.len() / vocab.max(1);
    let mut samplers: Vec<Sampler> = (0..rows).map(|_| Sampler::new(params.clone())).collect();
    let prompt: Vec<u32> = (0..1000u32).map(|i| i * 7919 % vocab as u32).collect();
    let mut work = logits.to_vec();
    let runs: Vec<f64> = (0..3)
        .map(|_| {
            work.copy_from_slice(logits);
            let started = Instant::now();
            work.par_chunks_mut(vocab).zip(samplers.par_iter_mut()).for_each(|(row, sampler)| {
                std::hint::black_box(sampler.sample(row, &prompt, &[]));
            });
            started.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    median(&runs)
}

#[derive(Debug, Serialize)]
pub struct PrefillPoint {
    pub len: usize,
    pub chunk: usize,
    /// Median wall time of the whole prompt, milliseconds.
    pub ms: f64,
    pub ms_all: Vec<f64>,
    pub tokens_per_s: f64,
    /// Dense-matmul FLOPs (2 x parameters per token, lm_head once) plus causal
    /// attention FLOPs over the time.
    pub tflops: f64,
}

#[derive(Debug, Serialize)]
pub struct PrefillReport {
    pub model: ModelInfo,
    pub points: Vec<PrefillPoint>,
}

pub fn prefill(args: &BenchPrefillArgs) -> anyhow::Result<()> {
    if args.len.is_empty() || args.len.contains(&0) {
        bail!("--len needs positive lengths");
    }
    if args.chunk == 0 {
        bail!("--chunk must be at least 1");
    }
    let longest = args.len.iter().copied().max().unwrap_or(1);
    let (mut model, mut cache, info) = prepare(&args.model, blocks_for(longest) * BLOCK_SIZE)?;
    if longest > model.config.max_position_embeddings {
        bail!(
            "--len {longest} exceeds the shape's {} positions",
            model.config.max_position_embeddings
        );
    }
    let c = model.config.clone();
    let vocab = c.vocab_size as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(args.model.seed);
    let table: Vec<u32> = (0..blocks_for(longest) as u32).collect();
    let parameters = info.parameters;
    let mut report = PrefillReport { model: info, points: Vec::new() };
    for &len in &args.len {
        let prompt: Vec<u32> = (0..len).map(|_| rng.random_range(0..vocab)).collect();
        let mut times = Vec::new();
        for run in 0..args.model.warmup + args.model.iters {
            let started = Instant::now();
            let mut at = 0;
            while at < len {
                let end = (at + args.chunk).min(len);
                let mut batch = Batch::default();
                batch.push_seq(&prompt[at..end], at, &table[..blocks_for(end)], end == len);
                let logits = model.forward(&batch, &mut cache);
                if end == len && logits.len() != vocab as usize {
                    bail!("forward returned {} logits for the last chunk", logits.len());
                }
                at = end;
            }
            let elapsed = started.elapsed().as_secs_f64() * 1e3;
            if run >= args.model.warmup {
                times.push(elapsed);
            }
        }
        let ms = median(&times);
        let dense = 2.0 * (parameters - c.vocab_size * c.hidden_size) as f64 * len as f64
            + 2.0 * (c.vocab_size * c.hidden_size) as f64;
        let attention = 4.0
            * (c.num_layers * c.num_heads * c.head_dim) as f64
            * (len as f64 * (len as f64 + 1.0) / 2.0);
        let point = PrefillPoint {
            len,
            chunk: args.chunk,
            ms,
            tokens_per_s: len as f64 / (ms / 1e3),
            tflops: (dense + attention) / (ms / 1e3) / 1e12,
            ms_all: times,
        };
        println!(
            "prefill {:>6} tokens (chunks of {}): {:>9.1} ms, {:>9.1} tok/s, {:.1} TFLOP/s",
            point.len, point.chunk, point.ms, point.tokens_per_s, point.tflops
        );
        report.points.push(point);
        write_json(&args.model, &report)?;
    }
    Ok(())
}

fn write_json<T: Serialize>(args: &GpuModelArgs, report: &T) -> anyhow::Result<()> {
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
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

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
