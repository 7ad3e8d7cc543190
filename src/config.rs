//! Every command-line flag, its default and its validation, in one place.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::engine::load::Device;
use crate::engine::SamplingParams;
use crate::model::loader::GenerationDefaults;

#[derive(Parser, Debug)]
#[command(
    name = "qilin",
    version,
    about = "Private LLM inference: Qwen2 and Llama models on CPU or CUDA"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate a completion for one prompt, or for every line of a prompts file.
    Generate(GenerateArgs),
    /// Serve the OpenAI-compatible HTTP API on a loopback address or a unix socket.
    Serve(Box<ServeArgs>),
    /// Quantize a Hugging Face model directory to int8 or int4 once and save it as a
    /// directory qilin loads (what --quantize does at every start).
    Quantize(QuantizeArgs),
    /// Measure the engine.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Perplexity of a model on a text file, computed as llama.cpp's llama-perplexity
    /// does (windows of --ctx tokens, second half of each scored).
    Perplexity(PerplexityArgs),
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Offline throughput: random prompts, all submitted at once (vLLM's random dataset).
    Throughput(ThroughputArgs),
    /// Online serving latency: concurrent streaming clients against a running server.
    Serve(BenchServeArgs),
    /// Every CUDA op at Qwen2.5-7B's shapes: time, achieved GB/s or TFLOP/s, and its
    /// roofline from the device's measured copy bandwidth and bf16 matrix rate (GPU only).
    Kernels(BenchKernelsArgs),
    /// Decode tok/s of a random-weight model generated on the GPU (GPU only).
    Decode(BenchDecodeArgs),
    /// Prefill tok/s of a random-weight model generated on the GPU (GPU only).
    Prefill(BenchPrefillArgs),
}

/// The random-weight model the GPU benchmarks run (no file: weights are made on the
/// device).
#[derive(Args, Debug, Clone)]
pub struct GpuModelArgs {
    /// Model shape: `qwen2.5-7b` (28 layers, hidden 3584, 28/4 heads, ffn 18944, vocab
    /// 152064, q/k/v bias) or `smollm2-135m` (30 layers, hidden 576, 9/3 heads).
    #[arg(long, value_name = "NAME", default_value = "qwen2.5-7b")]
    pub shape: String,
    /// Keep only the first N layers (quick runs; tok/s then is not the full model's).
    #[arg(long, value_name = "N")]
    pub layers: Option<usize>,
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Linear layers of the transformer blocks as random int8 or int4 levels (the
    /// device layout `--quantize` gives a real model); embeddings and lm_head stay bf16.
    #[arg(long, value_enum, value_name = "METHOD", default_value = "none")]
    pub quantize: crate::model::quantize::QuantizeMethod,
    /// Untimed runs before the timed ones.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub warmup: usize,
    /// Timed runs; the median is reported.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub iters: usize,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchKernelsArgs {
    /// Context of each sequence in the decode-attention measurements.
    #[arg(long, value_name = "TOKENS", default_value_t = 8192)]
    pub context: usize,
    /// Tokens of the causal prefill-attention measurement.
    #[arg(long, value_name = "TOKENS", default_value_t = 16384)]
    pub prefill_len: usize,
    /// Timed launches per op; the median is reported.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub iters: usize,
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Only the ops whose "op shape" text contains one of these (case-sensitive), e.g.
    /// `--only "gate_up_proj int4,decode: 1 seqs"`: for profiling a few under ncu.
    #[arg(long, value_name = "TEXT,TEXT,..", value_delimiter = ',')]
    pub only: Vec<String>,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BenchDecodeArgs {
    #[command(flatten)]
    pub model: GpuModelArgs,
    /// Batch sizes (sequences decoding one token per step each).
    #[arg(long, value_name = "N,N,..", value_delimiter = ',', default_value = "1,8,64,256")]
    pub batch: Vec<usize>,
    /// Tokens already in each sequence's KV cache (random values) when a step runs.
    #[arg(long, value_name = "TOKENS", default_value_t = 1024)]
    pub context: usize,
}

#[derive(Args, Debug)]
pub struct BenchPrefillArgs {
    #[command(flatten)]
    pub model: GpuModelArgs,
    /// Prompt lengths, one sequence each.
    #[arg(long, value_name = "TOKENS,..", value_delimiter = ',', default_value = "2048,32768")]
    pub len: Vec<usize>,
    /// Tokens per forward step (chunked prefill, as --max-num-batched-tokens).
    #[arg(long, value_name = "TOKENS", default_value_t = 8192)]
    pub chunk: usize,
}

#[derive(Args, Debug)]
pub struct ThroughputArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub num_prompts: usize,
    /// Prompt length in tokens.
    #[arg(long, value_name = "L", default_value = "128", conflicts_with = "random_input_range")]
    pub input_len: crate::bench::throughput::LenRange,
    /// Prompt lengths drawn uniformly from A:B.
    #[arg(long, value_name = "A:B")]
    pub random_input_range: Option<crate::bench::throughput::LenRange>,
    /// Output length in tokens (eos is ignored).
    #[arg(long, value_name = "L", default_value = "128", conflicts_with = "random_output_range")]
    pub output_len: crate::bench::throughput::LenRange,
    /// Output lengths drawn uniformly from A:B.
    #[arg(long, value_name = "A:B")]
    pub random_output_range: Option<crate::bench::throughput::LenRange>,
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<std::path::PathBuf>,
}

/// Engine settings shared by every command that loads a model.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Model directory (Hugging Face layout) or .gguf file (default: the demo model
    /// that tools/setup fetches).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Worker threads of the CPU backend (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Longest sequence (prompt + output) admitted; default: the model's limit (on the
    /// CPU backend at most 8192).
    #[arg(long, value_name = "TOKENS")]
    pub max_model_len: Option<usize>,
    /// Token budget of one engine step: one per decoding sequence, the rest for prompt
    /// chunks (chunked prefill).
    #[arg(long, alias = "prefill-chunk", value_name = "TOKENS", default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Most sequences running at once.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_num_seqs: usize,
    /// KV cache size in MiB (default on the CPU: room for --max-num-seqs full-length
    /// sequences, at most 2048, committed only as blocks are used; on CUDA: what
    /// --gpu-memory-utilization leaves).
    #[arg(long, value_name = "MIB")]
    pub kv_cache_memory: Option<usize>,
    /// Backend: `auto` (CUDA device 0 when a driver and a GPU exist, else the CPU),
    /// `cuda` (an error when unavailable) or `cpu`.
    #[arg(long, value_enum, value_name = "DEVICE", default_value_t = Device::Auto)]
    pub device: Device,
    /// Share of the GPU's memory that weights, activations and the KV cache may fill
    /// together, in (0, 1]; the KV cache gets what is left (CUDA only).
    #[arg(long, value_name = "FRACTION", default_value_t = crate::engine::load::DEFAULT_GPU_MEMORY_UTILIZATION)]
    pub gpu_memory_utilization: f64,
    /// Quantize the linear layers' bf16/f16/f32 weights at load: `int8` (per output
    /// channel, symmetric) or `int4` (groups of 128, asymmetric). Embeddings, lm_head,
    /// already-quantized tensors and layers whose width is not a multiple of 128 stay
    /// as they are.
    #[arg(long, value_enum, value_name = "METHOD", default_value_t = crate::model::quantize::QuantizeMethod::None)]
    pub quantize: crate::model::quantize::QuantizeMethod,
    /// CPU backend: `q8` (default) multiplies the activations of generated tokens as
    /// 8-bit blocks with block-quantized weights (every GGUF block format, I8, I4) in
    /// integers, as llama.cpp does (~1.4x faster decode), while prompt tokens and the
    /// logits projection keep f32;
    /// `f32` keeps f32 activations everywhere, the reference numerics.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = crate::backend::cpu::CpuActivations::Q8)]
    pub cpu_activations: crate::backend::cpu::CpuActivations,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
}

/// Activation-aware quantization: the flags every command with `--quantize` (or
/// `--method`) takes.
#[derive(Args, Debug, Clone, Default)]
pub struct CalibrationArgs {
    /// Calibrate the quantization on this text (UTF-8): AWQ scales and clipping, then
    /// GPTQ for int4 groups, chosen on the activations of the unquantized model reading
    /// it (on the CPU, at every load; `qilin quantize` does it once). Needs --quantize.
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
    /// Tokens read from the start of --calibration.
    #[arg(long, value_name = "N", requires = "calibration")]
    pub calibration_tokens: Option<usize>,
}

impl CalibrationArgs {
    /// The calibration source, None without --calibration.
    pub fn source(&self) -> Option<crate::model::calibration::CalibrationSource<'_>> {
        self.calibration.as_deref().map(|path| crate::model::calibration::CalibrationSource {
            path,
            max_tokens: self
                .calibration_tokens
                .unwrap_or(crate::model::calibration::DEFAULT_CALIBRATION_TOKENS),
        })
    }
}

#[derive(Args, Debug)]
#[command(allow_negative_numbers = true)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Prompt text, used as given (special tokens written in it are recognised).
    #[arg(long, conflicts_with_all = ["messages", "prompts_file"], required_unless_present_any = ["messages", "prompts_file"])]
    pub prompt: Option<String>,
    /// JSONL file: one request per line, `{"prompt": ...}` or `{"messages": [...]}` with
    /// optional sampling fields; all run concurrently, results print in input order.
    #[arg(long, value_name = "FILE", conflicts_with = "messages")]
    pub prompts_file: Option<std::path::PathBuf>,
    /// OpenAI-style messages array as JSON; implies --chat.
    #[arg(long, value_name = "JSON")]
    pub messages: Option<String>,
    /// Wrap --prompt with the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long, value_name = "TEXT")]
    pub system: Option<String>,
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 = greedy. Default: the model's generation_config, else 1.0.
    #[arg(long, value_name = "T")]
    pub temperature: Option<f32>,
    #[arg(long, value_name = "P")]
    pub top_p: Option<f32>,
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, value_name = "R")]
    pub repetition_penalty: Option<f32>,
    #[arg(long, value_name = "X", default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, value_name = "X", default_value_t = 0.0)]
    pub frequency_penalty: f32,
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Stop when the text contains this string (repeatable).
    #[arg(long, value_name = "S")]
    pub stop: Vec<String>,
    /// Stop after this token id (repeatable).
    #[arg(long, value_name = "ID")]
    pub stop_token_id: Vec<u32>,
    /// Keep generating past the end-of-sequence token (benchmarks).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Report each generated token's top K alternatives with logprobs (with --json).
    #[arg(long, value_name = "K")]
    pub top_logprobs: Option<usize>,
    /// Print one JSON object on the last stdout line instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

impl EngineArgs {
    /// `--model`, or the demo model when none was given.
    pub fn model_path(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            Some(path) => Ok(path.clone()),
            None => crate::model::demo::demo_model_path(),
        }
    }

    pub fn engine_options(&self) -> crate::engine::load::EngineOptions<'_> {
        crate::engine::load::EngineOptions {
            max_model_len: self.max_model_len,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_num_seqs: self.max_num_seqs,
            kv_cache_bytes: self.kv_cache_memory.map(|mib| mib << 20),
            device: self.device,
            gpu_memory_utilization: self.gpu_memory_utilization,
            quantize: self.quantize,
            calibration: self.calibration.source(),
            cpu_emulates_bf16: false,
            cpu_activations: self.cpu_activations,
        }
    }
}

impl GenerateArgs {
    /// Flags first, then the model's generation_config, then OpenAI's defaults.
    pub fn sampling_params(&self, defaults: &GenerationDefaults) -> SamplingParams {
        let base = SamplingParams::default();
        SamplingParams {
            temperature: self.temperature.or(defaults.temperature).unwrap_or(base.temperature),
            top_k: self.top_k.or(defaults.top_k).unwrap_or(base.top_k),
            top_p: self.top_p.or(defaults.top_p).unwrap_or(base.top_p),
            min_p: self.min_p,
            repetition_penalty: self
                .repetition_penalty
                .or(defaults.repetition_penalty)
                .unwrap_or(base.repetition_penalty),
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            stop_token_ids: self.stop_token_id.clone(),
            ignore_eos: self.ignore_eos,
            top_logprobs: self.top_logprobs,
        }
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Loopback address to bind (127.0.0.0/8 or ::1); anything else is refused: put
    /// the reverse proxy (README, "Deployment") in front instead.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, value_name = "PORT", default_value_t = 8000)]
    pub port: u16,
    /// Listen on this unix socket instead of TCP (created with mode 0660).
    #[arg(long, value_name = "PATH")]
    pub uds: Option<PathBuf>,
    /// The model name clients must send (repeatable; the first is reported by
    /// /v1/models). Default: the model file or directory name.
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Vec<String>,
    /// Bearer tokens, one `label:token` or `token` per line (# comments allowed). Also
    /// read: QILIN_API_KEYS and API_TOKENS (comma-separated). With none configured, a
    /// token is generated at start and printed once on stderr.
    #[arg(long, value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Serve /metrics without a token (it never contains request content).
    #[arg(long)]
    pub metrics_public: bool,
    /// Append one JSON line per request (never its content) to this file.
    #[arg(long, value_name = "PATH")]
    pub audit_log: Option<PathBuf>,
    /// Peers whose X-Real-IP / X-Forwarded-For headers are believed (IP or CIDR,
    /// repeatable), e.g. the local nginx: 127.0.0.1.
    #[arg(long, value_name = "CIDR")]
    pub trusted_proxy: Vec<String>,
    /// Largest request body accepted; larger ones get 413.
    #[arg(long, value_name = "BYTES", default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Requests allowed to wait for a free sequence slot beyond --max-num-seqs; more
    /// get 429 with Retry-After.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_queued_requests: usize,
    /// Most open client connections; more are answered 503 and closed.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_connections: usize,
    /// A generation running longer is aborted: 504, or finish_reason "timeout" when
    /// streaming.
    #[arg(long, value_name = "SECONDS", default_value_t = 600.0)]
    pub request_timeout: f64,
    /// On SIGTERM/SIGINT, how long in-flight requests may finish before they are aborted.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub shutdown_timeout: f64,
    /// Accepted for vLLM compatibility; request content is never logged anyway.
    #[arg(long)]
    pub disable_log_requests: bool,
    /// A Jinja chat template file to use instead of the model's own (as vLLM's
    /// --chat-template), e.g. one with tool calling for a GGUF whose template has none.
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    /// Model directory (Hugging Face layout) or .gguf file (default: the demo model).
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// The text to score (UTF-8; one trailing newline is dropped, as llama.cpp does).
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: PathBuf,
    /// Tokens per window; the second half of each window is scored.
    #[arg(long, short = 'c', value_name = "TOKENS", default_value_t = 512)]
    pub ctx: usize,
    /// Tokens per forward step: below --ctx a window is fed in pieces; a multiple of
    /// --ctx runs that many windows side by side.
    #[arg(long, short = 'b', value_name = "TOKENS", default_value_t = 512)]
    pub batch: usize,
    /// Evaluate only the first N windows (default: all).
    #[arg(long, value_name = "N")]
    pub chunks: Option<usize>,
    /// Worker threads of the CPU backend (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Backend: `auto`, `cuda` or `cpu` (as for `generate`).
    #[arg(long, value_enum, value_name = "DEVICE", default_value_t = Device::Auto)]
    pub device: Device,
    /// Share of the GPU's memory qilin may fill (CUDA only).
    #[arg(long, value_name = "FRACTION", default_value_t = crate::engine::load::DEFAULT_GPU_MEMORY_UTILIZATION)]
    pub gpu_memory_utilization: f64,
    /// Quantize the linear layers at load, as for `generate` (`none`, `int8`, `int4`).
    #[arg(long, value_enum, value_name = "METHOD", default_value_t = crate::model::quantize::QuantizeMethod::None)]
    pub quantize: crate::model::quantize::QuantizeMethod,
    /// CPU backend, as for `generate`. The text is a prompt, which `q8` computes in
    /// f32 as well, so this matters with `--as-generated` only.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = crate::backend::cpu::CpuActivations::Q8)]
    pub cpu_activations: crate::backend::cpu::CpuActivations,
    /// Feed the text as if the model had generated it, so that every token is computed
    /// with the numerics of a decode step (on the CPU with `--cpu-activations q8`: 8-bit
    /// activations) and the score measures their quality instead of the prompt path's.
    #[arg(long)]
    pub as_generated: bool,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// Also write the report (PPL, error, per-window NLL) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

impl PerplexityArgs {
    /// `--model`, or the demo model when none was given.
    pub fn model_path(&self) -> anyhow::Result<PathBuf> {
        match &self.model {
            Some(path) => Ok(path.clone()),
            None => crate::model::demo::demo_model_path(),
        }
    }
}

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Hugging Face model directory with bf16/f16/f32 safetensors weights.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Output directory (new or empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// `int8` (per output channel, symmetric) or `int4` (groups of 128, asymmetric).
    #[arg(long, value_enum, value_name = "METHOD")]
    pub method: crate::model::quantize::QuantizeMethod,
    /// Quantize the embeddings and lm_head too (they stay as they are by default).
    #[arg(long)]
    pub include_embeddings: bool,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
}

#[derive(Args, Debug)]
pub struct BenchServeArgs {
    /// Base URL of a running `qilin serve` (or any OpenAI-compatible server).
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Bearer token.
    #[arg(long, value_name = "TOKEN", env = "QILIN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Model name to send (default: the first one /v1/models lists).
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// `completions` or `chat`.
    #[arg(long, value_name = "ROUTE", default_value = "completions")]
    pub endpoint: String,
    /// Clients streaming at once.
    #[arg(long, value_name = "C", default_value_t = 1)]
    pub concurrency: usize,
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub num_prompts: usize,
    /// Poisson arrivals at R requests/s (default: all at once, bounded by --concurrency).
    #[arg(long, value_name = "R")]
    pub request_rate: Option<f64>,
    /// Approximate prompt length in tokens.
    #[arg(long, value_name = "L", default_value_t = 128)]
    pub input_len: usize,
    /// Tokens to generate per request (sent with ignore_eos).
    #[arg(long, value_name = "L", default_value_t = 128)]
    pub output_len: usize,
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}
