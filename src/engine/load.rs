//! From a model path to a ready engine on the chosen backend (CPU or CUDA), with the
//! start-up plan: weights, KV blocks, max concurrent tokens.
//!
//! `--device auto` (the default) takes CUDA device 0 when a driver, a GPU and this
//! build's PTX are all there, else the CPU with one info line saying why; `--device
//! cuda` fails with that reason instead. The KV cache is sized by `--kv-cache-memory` on
//! the CPU and by `--gpu-memory-utilization` on CUDA, measured after the weights are on
//! the device.

use std::path::Path;

use anyhow::Context;

use super::batch_engine::Engine;
use super::handle::EngineHandle;
use super::scheduler::SchedulerConfig;
use crate::backend::cpu::{CpuActivations, CpuBackend};
use crate::backend::cuda::CudaBackend;
use crate::backend::{Backend, KvCacheShape, BLOCK_SIZE};
use crate::kv::block_manager::blocks_for;
use crate::model::awq::load_calibrated;
use crate::model::calibration::CalibrationSource;
use crate::model::config::ModelConfig;
use crate::model::forward::Model;
use crate::model::loader::{GenerationDefaults, LoadedModel};
use crate::model::quantize::load_quantized;
use crate::model::weights::{weight_bytes, ModelWeights};
use crate::tokenizer::Tokenizer;

/// Default cap on the context of the CPU backend when the user gives none.
pub const DEFAULT_MAX_MODEL_LEN: usize = 8192;

/// Default share of the GPU's memory qilin may fill (weights, activations, KV cache).
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f64 = 0.9;

/// Bytes per cached value on the CPU backend (f32 K/V).
const CPU_KV_BYTES_PER_VALUE: usize = 4;

/// Bytes per cached value on the CUDA backend (bf16 K/V).
const CUDA_KV_BYTES_PER_VALUE: usize = 2;

/// Device memory set aside besides weights, activations and KV cache: cuBLAS workspace,
/// attention split-K scratch, CUDA graphs, the driver's own allocations after start-up.
const CUDA_FIXED_RESERVE_BYTES: usize = 512 << 20;

/// Which backend runs the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// CUDA device 0 when a driver and a GPU exist, else the CPU.
    #[default]
    Auto,
    /// CUDA device 0, or an error saying why not.
    Cuda,
    /// The CPU backend.
    Cpu,
}

pub struct EngineOptions<'a> {
    pub max_model_len: Option<usize>,
    /// Token budget of one step: decodes plus prefill chunks (chunked prefill).
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    /// KV cache size; None: on the CPU, room for `max_num_seqs` sequences of
    /// `max_model_len`, capped at 2 GiB (the pool is lazily committed, so unused blocks
    /// cost nothing); on CUDA, what `gpu_memory_utilization` leaves.
    pub kv_cache_bytes: Option<usize>,
    /// Which backend `load_engine` picks; `load_cpu_engine` ignores it.
    pub device: Device,
    /// Share of the GPU's total memory that weights, activations and the KV cache may
    /// fill together (CUDA only), in (0, 1].
    pub gpu_memory_utilization: f64,
    /// `--quantize`: linear weights quantized at load (none by default).
    pub quantize: crate::model::quantize::QuantizeMethod,
    /// `--calibration`: the text whose activations calibrate `quantize` (model/awq;
    /// None: plain quantization). A borrowed, `Copy` source, so that
    /// `EngineOptions { .., ..base }` can still build several options from one base.
    pub calibration: Option<CalibrationSource<'a>>,
    /// CPU only: round activations and the KV cache to bf16 as the CUDA backend stores
    /// them (`CpuBackend::emulating_bf16`), the reference of tests/gpu_e2e.rs.
    pub cpu_emulates_bf16: bool,
    /// CPU only: `--cpu-activations` (ignored when `cpu_emulates_bf16`, which keeps f32
    /// activations as its reference role needs).
    pub cpu_activations: CpuActivations,
}

impl Default for EngineOptions<'_> {
    fn default() -> Self {
        EngineOptions {
            max_model_len: None,
            max_num_batched_tokens: 512,
            max_num_seqs: 64,
            kv_cache_bytes: None,
            device: Device::Auto,
            gpu_memory_utilization: DEFAULT_GPU_MEMORY_UTILIZATION,
            quantize: crate::model::quantize::QuantizeMethod::None,
            calibration: None,
            cpu_emulates_bf16: false,
            cpu_activations: CpuActivations::default(),
        }
    }
}

/// An engine on whichever backend `load_engine` picked. Commands that need the engine
/// itself match on it and call one generic function (`Engine<B>` for any `B`).
// One per process, moved a couple of times at start-up: boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum AnyEngine {
    Cpu(Engine<CpuBackend>),
    Cuda(Engine<CudaBackend>),
}

impl AnyEngine {
    /// "cpu" or "cuda".
    pub fn backend_name(&self) -> &'static str {
        match self {
            AnyEngine::Cpu(e) => e.model.backend.name(),
            AnyEngine::Cuda(e) => e.model.backend.name(),
        }
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        match self {
            AnyEngine::Cpu(e) => &e.tokenizer,
            AnyEngine::Cuda(e) => &e.tokenizer,
        }
    }

    pub fn max_model_len(&self) -> usize {
        match self {
            AnyEngine::Cpu(e) => e.max_model_len(),
            AnyEngine::Cuda(e) => e.max_model_len(),
        }
    }

    /// Moves the engine onto its own thread.
    pub fn spawn(self) -> std::io::Result<EngineHandle> {
        match self {
            AnyEngine::Cpu(e) => EngineHandle::spawn(e),
            AnyEngine::Cuda(e) => EngineHandle::spawn(e),
        }
    }
}

/// Loads the model at `path` onto the backend `options.device` selects. Returns the
/// engine and the model's sampling defaults.
pub fn load_engine(
    path: &Path,
    options: &EngineOptions,
) -> anyhow::Result<(AnyEngine, GenerationDefaults)> {
    check_gpu_memory_utilization(options.gpu_memory_utilization)?;
    let cuda = match options.device {
        Device::Cpu => None,
        Device::Cuda => Some(open_cuda().map_err(|why| anyhow::anyhow!("--device cuda: {why}"))?),
        Device::Auto => match open_cuda() {
            Ok(backend) => Some(backend),
            Err(why) => {
                tracing::info!("no usable CUDA device ({why}); running on the CPU backend");
                None
            }
        },
    };
    match cuda {
        Some(backend) => {
            let (engine, defaults) = load_cuda_engine(path, options, backend)?;
            Ok((AnyEngine::Cuda(engine), defaults))
        }
        None => {
            let (engine, defaults) = load_cpu_engine(path, options)?;
            Ok((AnyEngine::Cpu(engine), defaults))
        }
    }
}

/// CUDA device 0 with every kernel of this build loaded, or the reason there is none
/// (CPU-only build, no driver, no cuBLAS, no device, PTX rejected).
pub fn open_cuda() -> Result<CudaBackend, String> {
    if !crate::backend::ptx::PTX_AVAILABLE {
        return Err(crate::backend::cuda::CudaError::NoPtx.to_string());
    }
    // SAFETY: both only probe whether the shared library can be dlopened.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(crate::backend::cuda::CudaError::NoDriver.to_string());
    }
    // cudarc panics inside CudaBlas::new when libcublas cannot be loaded: ask first.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err("the NVIDIA driver is present but libcublas.so.13 (CUDA 13 cuBLAS) \
                    could not be loaded; add its directory to LD_LIBRARY_PATH"
            .into());
    }
    CudaBackend::new(0).map_err(|e| e.to_string())
}

fn check_gpu_memory_utilization(fraction: f64) -> anyhow::Result<()> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        anyhow::bail!("--gpu-memory-utilization must be in (0, 1], got {fraction}");
    }
    Ok(())
}

/// `--max-model-len` against the model's limit (`default_cap` when none was given), and
/// the scheduler flags against each other.
fn check_limits(
    path: &Path,
    loaded: &LoadedModel,
    options: &EngineOptions,
    default_cap: usize,
) -> anyhow::Result<usize> {
    let model_limit = loaded.config.max_context();
    let max_model_len = match options.max_model_len {
        Some(n) if n > model_limit => anyhow::bail!(
            "--max-model-len {n} exceeds the model's limit of {model_limit} tokens ({})",
            path.display()
        ),
        Some(n) if n < 2 => anyhow::bail!("--max-model-len must be at least 2"),
        Some(n) => n,
        None => model_limit.min(default_cap),
    };
    if options.max_num_seqs == 0 {
        anyhow::bail!("--max-num-seqs must be at least 1");
    }
    if options.max_num_batched_tokens < options.max_num_seqs {
        anyhow::bail!(
            "--max-num-batched-tokens ({}) must be at least --max-num-seqs ({}): every running sequence decodes one token per step",
            options.max_num_batched_tokens,
            options.max_num_seqs
        );
    }
    Ok(max_model_len)
}

fn kv_shape(c: &ModelConfig) -> KvCacheShape {
    KvCacheShape {
        num_layers: c.num_layers,
        num_blocks: 0,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    }
}

/// The model at `path` with `--quantize` (and `--calibration`) applied.
fn load_weights(path: &Path, options: &EngineOptions) -> anyhow::Result<LoadedModel> {
    Ok(match &options.calibration {
        None => load_quantized(path, options.quantize)?,
        Some(source) => load_calibrated(path, options.quantize, source)?,
    })
}

/// Loads the model at `path` onto the CPU backend. Returns the engine and the model's
/// sampling defaults.
pub fn load_cpu_engine(
    path: &Path,
    options: &EngineOptions,
) -> anyhow::Result<(Engine<CpuBackend>, GenerationDefaults)> {
    let loaded = load_weights(path, options)?;
    let backend = if options.cpu_emulates_bf16 {
        CpuBackend::emulating_bf16()
    } else {
        CpuBackend::with_activations(options.cpu_activations)
    };
    let weights = ModelWeights::load(&backend, &loaded)?;
    let max_model_len = check_limits(path, &loaded, options, DEFAULT_MAX_MODEL_LEN)?;
    let shape = kv_shape(&loaded.config);
    let block_bytes = shape.bytes_per_token(CPU_KV_BYTES_PER_VALUE) * BLOCK_SIZE;
    let kv_bytes = options.kv_cache_bytes.unwrap_or_else(|| {
        (blocks_for(max_model_len) * options.max_num_seqs * block_bytes).min(2 << 30)
    });
    let num_blocks = kv_bytes / block_bytes;
    if num_blocks < blocks_for(max_model_len) {
        anyhow::bail!(
            "the KV cache ({} MiB) holds {} tokens, less than one --max-model-len sequence ({max_model_len}); raise --kv-cache-memory or lower --max-model-len",
            kv_bytes >> 20,
            num_blocks * BLOCK_SIZE
        );
    }
    tracing::info!(
        "plan: weights {} MiB; KV {} bytes/token, {num_blocks} blocks of {BLOCK_SIZE} = {} tokens; max model len {max_model_len}",
        weight_bytes(&loaded) >> 20,
        shape.bytes_per_token(CPU_KV_BYTES_PER_VALUE),
        num_blocks * BLOCK_SIZE
    );
    assemble(loaded, backend, weights, options, max_model_len, num_blocks)
}

/// Loads the model at `path` onto `backend` (weights converted to bf16 and uploaded
/// once), then sizes the KV cache from the device memory left. Returns the engine and
/// the model's sampling defaults.
pub fn load_cuda_engine(
    path: &Path,
    options: &EngineOptions,
    backend: CudaBackend,
) -> anyhow::Result<(Engine<CudaBackend>, GenerationDefaults)> {
    check_gpu_memory_utilization(options.gpu_memory_utilization)?;
    let loaded = load_weights(path, options)?;
    // The model's own limit: the KV cache lives in device memory sized below, and a
    // context that does not fit fails with a clear message instead of a silent cap.
    let max_model_len = check_limits(path, &loaded, options, usize::MAX)?;
    let free_memory = || {
        backend
            .dev
            .ctx
            .mem_get_info()
            .map_err(|e| anyhow::anyhow!("reading the device's free memory: {e}"))
    };
    let (free_before, _) = free_memory()?;
    let weights = ModelWeights::load(&backend, &loaded)?;
    backend.dev.synchronize();
    let (free, total) = free_memory()?;
    // What the upload took: bf16 layers, quantized ones as levels, and their scratch.
    let device_weight_bytes = free_before.saturating_sub(free);
    let c = &loaded.config;
    let shape = kv_shape(c);
    let block_bytes = shape.bytes_per_token(CUDA_KV_BYTES_PER_VALUE) * BLOCK_SIZE;
    let plan = CudaKvRequest {
        free,
        total,
        utilization: options.gpu_memory_utilization,
        reserve: cuda_activation_reserve(
            c,
            options.max_num_batched_tokens,
            options.max_num_seqs,
            backend.dev.paths.graphs,
        ),
        block_bytes,
        explicit_bytes: options.kv_cache_bytes,
        max_useful_blocks: blocks_for(max_model_len) * options.max_num_seqs,
        min_blocks: blocks_for(max_model_len),
        max_model_len,
    };
    let num_blocks = plan.num_blocks().map_err(|why| anyhow::anyhow!("{why}"))?;
    tracing::info!(
        "plan: device {} ({} MiB, {} MiB free after weights); weights {} MiB on the device; KV {} bytes/token, {num_blocks} blocks of {BLOCK_SIZE} = {} tokens; max model len {max_model_len}",
        backend.dev.name(),
        total >> 20,
        free >> 20,
        device_weight_bytes >> 20,
        shape.bytes_per_token(CUDA_KV_BYTES_PER_VALUE),
        num_blocks * BLOCK_SIZE
    );
    let paths = backend.dev.paths;
    let defaults = crate::backend::cuda::FastPaths::default();
    // The opt-in switch aside, any difference from the defaults is a fast path switched off.
    if (crate::backend::cuda::FastPaths { device_penalties: defaults.device_penalties, ..paths })
        != defaults
    {
        // Slower paths, for bisecting or comparing (README, environment switches).
        tracing::warn!("CUDA fast paths switched off by the environment: {paths:?}");
    }
    if paths.device_penalties != defaults.device_penalties {
        tracing::warn!("CUDA opt-in switched on (unverified on hardware): {paths:?}");
    }
    assemble(loaded, backend, weights, options, max_model_len, num_blocks)
}

/// The part of loading every backend shares: eos ids, the model, the scheduler and the
/// KV cache of `num_blocks` blocks.
fn assemble<B: Backend>(
    loaded: LoadedModel,
    backend: B,
    weights: ModelWeights<B>,
    options: &EngineOptions,
    max_model_len: usize,
    num_blocks: usize,
) -> anyhow::Result<(Engine<B>, GenerationDefaults)> {
    let mut eos_ids = loaded.generation.eos_token_ids.clone();
    for id in loaded.tokenizer.eos_token_ids() {
        if !eos_ids.contains(&id) {
            eos_ids.push(id);
        }
    }
    let model = Model::new(loaded.config, backend, weights);
    let config = SchedulerConfig {
        max_num_seqs: options.max_num_seqs,
        max_num_batched_tokens: options.max_num_batched_tokens,
        max_model_len,
    };
    let engine = Engine::new(model, loaded.tokenizer, eos_ids, config, num_blocks)
        .with_context(|| format!("allocating the KV cache of {num_blocks} blocks"))?;
    Ok((engine, loaded.generation))
}

/// Device memory the forward pass needs besides weights and the KV cache, estimated
/// from the largest step rather than measured (no profiling run): every bf16
/// intermediate of one layer for `max_num_batched_tokens` tokens (residual, normed
/// input, attention output and pending MLP output: 4 x hidden; qkv and its split: 2 x
/// (q + 2 kv); attention: q; gate_up and silu: 3 x ffn), doubled because the
/// stream-ordered allocator can hold freed buffers until their reuse; the bf16 logits of
/// every sequence, doubled likewise; and `CUDA_FIXED_RESERVE_BYTES`. With CUDA graphs,
/// also what they hold outside the stream's pool (backend/cuda/graph.rs): the logits
/// buffer they share and, in the driver's pool for graph allocations, the activations
/// and logits of the largest captured step.
pub fn cuda_activation_reserve(
    c: &ModelConfig,
    max_num_batched_tokens: usize,
    max_num_seqs: usize,
    graphs: bool,
) -> usize {
    let q = c.num_heads * c.head_dim;
    let kv = c.num_kv_heads * c.head_dim;
    let per_token = 4 * c.hidden_size + 2 * (q + 2 * kv) + q + 3 * c.intermediate_size;
    let activations = max_num_batched_tokens * per_token * 2 * 2;
    let logits = max_num_seqs * c.vocab_size * 2 * 2;
    let graph_batch = crate::backend::cuda::graph::MAX_GRAPH_BATCH;
    let graph_memory = match graphs {
        true => graph_batch * (2 * c.vocab_size + per_token) * 2,
        false => 0,
    };
    activations + logits + graph_memory + CUDA_FIXED_RESERVE_BYTES
}

/// Everything the CUDA KV sizing looks at, so the arithmetic is testable without a GPU.
#[derive(Clone, Debug)]
pub struct CudaKvRequest {
    /// Device memory free and total after the weights were uploaded (cuMemGetInfo).
    pub free: usize,
    pub total: usize,
    /// `--gpu-memory-utilization`.
    pub utilization: f64,
    /// Activations and scratch (`cuda_activation_reserve`).
    pub reserve: usize,
    /// Bytes of one KV block across all layers (K and V, bf16).
    pub block_bytes: usize,
    /// `--kv-cache-memory`, which overrides the utilization target.
    pub explicit_bytes: Option<usize>,
    /// Blocks beyond `max_num_seqs` full-length sequences would never be used.
    pub max_useful_blocks: usize,
    /// One `--max-model-len` sequence must fit.
    pub min_blocks: usize,
    pub max_model_len: usize,
}

impl CudaKvRequest {
    /// Blocks to allocate: with `--kv-cache-memory`, that many bytes (if the device has
    /// them); otherwise `utilization x total`, less what is already in use (weights,
    /// other processes) and the activation reserve, capped at the useful maximum.
    pub fn num_blocks(&self) -> Result<usize, String> {
        let mib = |b: usize| b >> 20;
        let room = self.free.saturating_sub(self.reserve);
        let blocks = match self.explicit_bytes {
            Some(bytes) => {
                if bytes > room {
                    return Err(format!(
                        "--kv-cache-memory {} MiB does not fit: the device has {} MiB free after the weights, {} MiB of which are kept for activations",
                        mib(bytes),
                        mib(self.free),
                        mib(self.reserve.min(self.free))
                    ));
                }
                bytes / self.block_bytes.max(1)
            }
            None => {
                let target = (self.total as f64 * self.utilization) as usize;
                let used = self.total.saturating_sub(self.free);
                let available = target.saturating_sub(used + self.reserve).min(room);
                (available / self.block_bytes.max(1)).min(self.max_useful_blocks)
            }
        };
        if blocks < self.min_blocks {
            let hint = if self.explicit_bytes.is_some() {
                "raise --kv-cache-memory or lower --max-model-len"
            } else {
                "raise --gpu-memory-utilization, lower --max-model-len or --max-num-batched-tokens, or free GPU memory"
            };
            return Err(format!(
                "the KV cache on the device holds {} tokens ({} MiB total, {} MiB in use after the weights, {} MiB kept for activations, utilization {}), less than one --max-model-len sequence ({}); {hint}",
                blocks * BLOCK_SIZE,
                mib(self.total),
                mib(self.total.saturating_sub(self.free)),
                mib(self.reserve),
                self.utilization,
                self.max_model_len
            ));
        }
        Ok(blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: usize = 1 << 30;

    /// Qwen2.5-7B on an 80 GB H100: 28 layers x 4 KV heads x 128 x 2 (K, V) x 2 bytes.
    fn h100_qwen7b() -> CudaKvRequest {
        let block_bytes = 2 * 28 * 4 * 128 * 2 * BLOCK_SIZE;
        CudaKvRequest {
            free: 80 * GIB - 15 * GIB,
            total: 80 * GIB,
            utilization: 0.9,
            reserve: GIB,
            block_bytes,
            explicit_bytes: None,
            max_useful_blocks: blocks_for(32768) * 64,
            min_blocks: blocks_for(32768),
            max_model_len: 32768,
        }
    }

    #[test]
    fn utilization_leaves_the_rest_of_the_card_alone() {
        let r = h100_qwen7b();
        let blocks = r.num_blocks().unwrap();
        // 72 GiB target - 15 GiB used - 1 GiB reserve = 56 GiB of KV.
        assert_eq!(blocks, 56 * GIB / r.block_bytes);
        let kv = blocks * r.block_bytes;
        assert!(r.total - r.free + r.reserve + kv <= (r.total as f64 * 0.9) as usize);
    }

    #[test]
    fn tiny_models_get_only_the_blocks_they_can_use() {
        let r = CudaKvRequest {
            block_bytes: 4096,
            max_useful_blocks: 1000,
            min_blocks: 32,
            ..h100_qwen7b()
        };
        assert_eq!(r.num_blocks().unwrap(), 1000);
    }

    #[test]
    fn explicit_size_wins_but_must_fit() {
        let r = CudaKvRequest { explicit_bytes: Some(4 * GIB), ..h100_qwen7b() };
        assert_eq!(r.num_blocks().unwrap(), 4 * GIB / r.block_bytes);
        let too_big = CudaKvRequest { explicit_bytes: Some(70 * GIB), ..h100_qwen7b() };
        assert!(too_big.num_blocks().unwrap_err().contains("does not fit"));
    }

    #[test]
    fn a_card_too_full_for_one_sequence_is_an_error_with_a_hint() {
        let r = CudaKvRequest { free: 8 * GIB, ..h100_qwen7b() };
        let err = r.num_blocks().unwrap_err();
        assert!(err.contains("--gpu-memory-utilization"), "{err}");
        let low = CudaKvRequest { utilization: 0.1, ..h100_qwen7b() };
        assert!(low.num_blocks().is_err());
    }

    #[test]
    fn reserve_grows_with_the_step_budget() {
        let json = serde_json::json!({
            "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584,
            "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "vocab_size": 152064
        });
        let c = ModelConfig::from_hf_json(&json).unwrap();
        let small = cuda_activation_reserve(&c, 512, 64, false);
        let large = cuda_activation_reserve(&c, 8192, 64, false);
        assert!(small > CUDA_FIXED_RESERVE_BYTES && large > small);
        // 8192 tokens of Qwen2.5-7B intermediates: about 2.5 GB, well under 4 GiB.
        assert!(large < CUDA_FIXED_RESERVE_BYTES + 4 * GIB, "{large}");
        // Graphs add their shared [256, vocab] logits, a captured step's logits and
        // activations: 2 x 77.9 MB + 43 MB for Qwen2.5-7B.
        let graphs = cuda_activation_reserve(&c, 512, 64, true) - small;
        assert!((190_000_000..210_000_000).contains(&graphs), "{graphs}");
    }

    #[test]
    fn utilization_outside_the_unit_interval_is_refused() {
        for bad in [0.0, -0.5, 1.01, f64::NAN] {
            assert!(check_gpu_memory_utilization(bad).is_err(), "{bad}");
        }
        assert!(check_gpu_memory_utilization(1.0).is_ok());
    }
}
