//! `qilin bench decode` and `qilin bench prefill`: tokens per second of the one model
//! definition (`model::forward`) on the CUDA backend, for a random-weight model made on
//! the GPU (bench/gpu_model.rs).
//!
//! What is timed. Decode: one greedy step of `batch` sequences, each with `context`
//! tokens already cached, one new token each, as the engine runs it (`forward_argmax`:
//! the device argmax, only the ids cross to the host); wall time per step, median of
//! `iters`. Beside it, what a host-sampled step adds: the logits download, and the host
//! sampler on those rows with Qwen2.5-Instruct's defaults. Prefill: one sequence of
//! `len` tokens in chunks of `chunk` tokens (chunked prefill), logits of the last token
//! only; wall time of all chunks, median of `iters`.

use std::time::Instant;

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::gpu_model::{
    device_weight_bytes, parameter_count, quant_format, random_model, shape_config, DeviceRandom,
};
use crate::backend::cuda::{CudaBackend, CudaKvCache, CudaTensor};
use crate::backend::{
    Backend, Batch, KvCacheShape, PenaltyBatch, PenaltyToken, RowSampling, BLOCK_SIZE,
};
use crate::config::{BenchDecodeArgs, BenchPrefillArgs, GpuModelArgs};
use crate::engine::load::open_cuda;
use crate::kv::block_manager::blocks_for;
use crate::model::forward::Model;

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
    /// Median wall time of sampling the same rows ON THE DEVICE with the same parameters
    /// and prompt (`Backend::sample_rows_penalized`: the penalties kernel, then
    /// qilin_sample_bf16, ids to the host), the engine's path for such requests since
    /// device penalties: what a Qwen-default step costs over the greedy one.
    pub device_sample_ms: f64,
    /// Weight bytes read per step over the step time (the batch-1 roofline's numerator).
    pub weight_gb_per_s: f64,
    /// CUDA graphs captured so far: 0 means the steps ran
    /// eagerly (a capture failed, or the batch is not one graphs take).
    pub graphs_captured: usize,
    /// Kernels launched with programmatic dependent launch (`QILIN_CUDA_PDL=1` on sm_90+;
    /// 0 when off or refused).
    pub dependent_launch_kernels: usize,
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
                batch.push_decode(token, args.context + step, &table);
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
        let (logits_to_host_ms, host_sample_ms, device_sample_ms) = {
            let b = &model.backend;
            let mut t = DeviceRandom::new(&b.dev, 1).tensor(batch_size, vocab as usize, 8.0);
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
            let host_ms = host_sampling_ms(&host, vocab as usize, args.model.seed);
            (median(&runs), host_ms, device_sampling_ms(b, &mut t, args.model.seed))
        };
        let step_ms = median(&times);
        let point = DecodePoint {
            batch: batch_size,
            context: args.context,
            step_ms,
            tokens_per_s: batch_size as f64 / (step_ms / 1e3),
            logits_to_host_ms,
            host_sample_ms,
            device_sample_ms,
            weight_gb_per_s: report.model.weight_bytes as f64 / (step_ms / 1e3) / 1e9,
            graphs_captured: model.backend.graphs.lock().unwrap_or_else(|e| e.into_inner()).len(),
            dependent_launch_kernels: model.backend.dev.dependent_launch_kernels(),
            step_ms_all: times,
        };
        println!(
            "decode batch {:>4} context {}: {:>8.2} ms/step, {:>9.1} tok/s (weights {:.0} GB/s; Qwen-default sampling adds {:.2} ms on the device, or {:.2} ms of logits to host and {:.2} ms of host sampling)",
            point.batch,
            point.context,
            point.step_ms,
            point.tokens_per_s,
            point.weight_gb_per_s,
            point.device_sample_ms,
            point.logits_to_host_ms,
            point.host_sample_ms
        );
        report.points.push(point);
        // After every point, so a run stopped by its timeout still leaves its figures.
        write_json(&args.model, &report)?;
    }
    Ok(())
}

/// Qwen2.5-Instruct's default sampling parameters (generation_config.json).
fn qwen_default_sampling(seed: u64) -> crate::engine::SamplingParams {
    crate::engine::SamplingParams {
        temperature: 0.7,
        top_k: 20,
        top_p: 0.8,
        repetition_penalty: 1.05,
        seed: Some(seed),
        ..crate::engine::SamplingParams::default()
    }
}

/// The benchmark's prompt for the penalties: 1000 distinct ids spread over the vocabulary.
fn bench_prompt(vocab: usize) -> Vec<u32> {
    (0..1000u32).map(|i| i * 7919 % vocab as u32).collect()
}

/// Median wall time of sampling every `[vocab]` row of `logits` with Qwen2.5-Instruct's
/// default parameters, rows in parallel as the engine's host path does.
fn host_sampling_ms(logits: &[f32], vocab: usize, seed: u64) -> f64 {
    use crate::engine::sampler::Sampler;
    use rayon::prelude::*;
    let params = qwen_default_sampling(seed);
    let rows = logits.len() / vocab.max(1);
    let mut samplers: Vec<Sampler> = (0..rows).map(|_| Sampler::new(params.clone())).collect();
    let prompt = bench_prompt(vocab);
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

/// Median wall time of `Backend::sample_rows_penalized` on `logits [rows, vocab]` with
/// Qwen2.5-Instruct's default parameters and the host benchmark's prompt as each row's
/// penalised ids (the logits are scratch: each run penalises them again).
fn device_sampling_ms(b: &CudaBackend, logits: &mut CudaTensor, seed: u64) -> f64 {
    let params = qwen_default_sampling(seed);
    let prompt = bench_prompt(logits.cols);
    let mut penalties = PenaltyBatch::default();
    for _ in 0..logits.rows {
        let entries = prompt.iter().map(|&id| PenaltyToken { id, count: 0 });
        penalties.push_row(params.repetition_penalty, 0.0, 0.0, entries);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let runs: Vec<f64> = (0..3)
        .map(|_| {
            let rows: Vec<RowSampling> = (0..logits.rows)
                .map(|_| RowSampling {
                    temperature: params.temperature,
                    top_k: u32::try_from(params.top_k).unwrap_or(u32::MAX),
                    top_p: params.top_p,
                    min_p: 0.0,
                    u: rng.random::<f64>(),
                })
                .collect();
            let started = Instant::now();
            std::hint::black_box(b.sample_rows_penalized(logits, &rows, &penalties));
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
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
