//! Every command-line flag, its default and its validation, in one place.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    /// Measure the engine.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Offline throughput: random prompts, all submitted at once (vLLM's random dataset).
    Throughput(ThroughputArgs),
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
    /// Model directory (Hugging Face layout) or .gguf file.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// Worker threads of the CPU backend (default: all cores).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Longest sequence (prompt + output) admitted; default: the model's limit, at most 8192.
    #[arg(long, value_name = "TOKENS")]
    pub max_model_len: Option<usize>,
    /// Token budget of one engine step: one per decoding sequence, the rest for prompt
    /// chunks (chunked prefill).
    #[arg(long, alias = "prefill-chunk", value_name = "TOKENS", default_value_t = 512)]
    pub max_num_batched_tokens: usize,
    /// Most sequences running at once.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_num_seqs: usize,
    /// KV cache size in MiB (default: room for --max-num-seqs full-length sequences,
    /// at most 2048; memory is committed only as blocks are used).
    #[arg(long, value_name = "MIB")]
    pub kv_cache_memory: Option<usize>,
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
    pub fn engine_options(&self) -> crate::engine::load::EngineOptions {
        crate::engine::load::EngineOptions {
            max_model_len: self.max_model_len,
            max_num_batched_tokens: self.max_num_batched_tokens,
            max_num_seqs: self.max_num_seqs,
            kv_cache_bytes: self.kv_cache_memory.map(|mib| mib << 20),
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
