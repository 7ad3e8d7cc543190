//! `qilin bench ...`: load the engine, run a measurement, print the report.

use anyhow::Context;

use crate::backend::Backend;
use crate::bench::throughput;
use crate::config::ThroughputArgs;
use crate::engine::load::{load_engine, AnyEngine};
use crate::engine::workers::as_rayon_worker;
use crate::engine::Engine;

pub fn throughput(args: &ThroughputArgs) -> anyhow::Result<()> {
    super::set_threads(args.engine.threads)?;
    let (engine, _) = load_engine(&args.engine.model_path()?, &args.engine.engine_options())?;
    match engine {
        AnyEngine::Cpu(mut engine) => as_rayon_worker(|| throughput_on(&mut engine, args)),
        AnyEngine::Cuda(mut engine) => throughput_on(&mut engine, args),
    }
}

fn throughput_on<B: Backend>(engine: &mut Engine<B>, args: &ThroughputArgs) -> anyhow::Result<()> {
    let input = args.random_input_range.unwrap_or(args.input_len);
    let output = args.random_output_range.unwrap_or(args.output_len);
    let report = throughput::run(engine, args.num_prompts, input, output, args.seed)?;
    println!(
        "Throughput: {:.2} requests/s, {:.1} output tokens/s, {:.1} total tokens/s ({} requests, {} prompt + {} output tokens in {:.2}s, backend {})",
        report.requests_per_s,
        report.output_tokens_per_s,
        report.total_tokens_per_s,
        report.num_requests,
        report.prompt_tokens,
        report.output_tokens,
        report.elapsed_s,
        engine.model.backend.name(),
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// `qilin bench serve`: see `bench/serve.rs`.
pub fn serve(args: &crate::config::BenchServeArgs) -> anyhow::Result<()> {
    crate::bench::serve::run(args)
}

/// `qilin bench kernels`: see `bench/kernels.rs`.
pub fn kernels(args: &crate::config::BenchKernelsArgs) -> anyhow::Result<()> {
    crate::bench::kernels::run(args)
}

/// `qilin bench decode`: see `bench/gpu_model.rs`.
pub fn decode(args: &crate::config::BenchDecodeArgs) -> anyhow::Result<()> {
    crate::bench::model_steps::decode(args)
}

/// `qilin bench prefill`: see `bench/gpu_model.rs`.
pub fn prefill(args: &crate::config::BenchPrefillArgs) -> anyhow::Result<()> {
    crate::bench::model_steps::prefill(args)
}
