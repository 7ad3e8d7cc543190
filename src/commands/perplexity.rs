//! `qilin perplexity`: load the model as the engine does, tokenize the text file, and
//! print llama.cpp-style output (running PPL per window, then the final estimate with
//! its error) so the two tools can be compared line by line. See `bench/perplexity.rs`
//! for the exact computation.

use std::io::Write;

use anyhow::Context;

use crate::backend::Backend;
use crate::bench::perplexity::{perplexity, PerplexityConfig, PerplexityReport};
use crate::config::PerplexityArgs;
use crate::engine::load::{load_engine, AnyEngine, EngineOptions};
use crate::engine::workers::as_rayon_worker;
use crate::engine::Engine;

pub fn run(args: &PerplexityArgs) -> anyhow::Result<()> {
    let config = PerplexityConfig {
        ctx: args.ctx,
        batch: args.batch,
        max_chunks: args.chunks,
        as_generated: args.as_generated,
    };
    // Flag errors before the (slow) model load.
    config.validate()?;
    let text = read_text(&args.file)?;
    super::set_threads(args.threads)?;
    let path = args.model_path()?;
    let options = EngineOptions {
        // The engine's own scheduler never runs here; these only size what it allocates
        // at load (one window per slot) and check --ctx against the model's limit.
        max_model_len: Some(config.ctx),
        max_num_batched_tokens: config.step_tokens(),
        max_num_seqs: config.windows_per_step(),
        kv_cache_bytes: None,
        device: args.device,
        gpu_memory_utilization: args.gpu_memory_utilization,
        quantize: args.quantize,
        calibration: args.calibration.source(),
        cpu_emulates_bf16: false,
        cpu_activations: args.cpu_activations,
    };
    let (engine, _) = load_engine(&path, &options)
        .with_context(|| format!("loading {} for --ctx {}", path.display(), config.ctx))?;
    let report = match engine {
        AnyEngine::Cpu(mut engine) => as_rayon_worker(|| run_on(&mut engine, &text, &config))?,
        AnyEngine::Cuda(mut engine) => run_on(&mut engine, &text, &config)?,
    };
    if let Some(json) = &args.json {
        std::fs::write(json, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", json.display()))?;
    }
    Ok(())
}

/// The file as llama.cpp's `-f` reads it: all of it, minus one trailing newline.
fn read_text(path: &std::path::Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.ends_with('\n') {
        text.pop();
    }
    Ok(text)
}

fn run_on<B: Backend>(
    engine: &mut Engine<B>,
    text: &str,
    config: &PerplexityConfig,
) -> anyhow::Result<PerplexityReport> {
    let started = std::time::Instant::now();
    // Special-token strings written in the text are recognised by our tokenizer (not
    // by llama.cpp's, which passes parse_special = false); prose never contains them.
    let tokens = engine.tokenizer.encode(text, true).context("tokenizing the text")?;
    let bos =
        if engine.tokenizer.special().add_bos { engine.tokenizer.bos_token_id() } else { None };
    let n_chunks = config.n_chunks(tokens.len())?;
    eprintln!(
        "perplexity: {} tokens (tokenized in {:.0} ms); {n_chunks} windows of {} tokens, batch {}, {} window(s) per step, backend {}{}{}",
        tokens.len(),
        started.elapsed().as_secs_f64() * 1e3,
        config.ctx,
        config.batch,
        config.windows_per_step(),
        engine.model.backend.name(),
        if bos.is_some() { ", bos at the start of each window" } else { "" },
        if config.as_generated { ", fed as generated tokens" } else { "" },
    );
    let mut stdout = std::io::stdout();
    let report = perplexity(&mut engine.model, &tokens, bos, config, |chunk| {
        // Progress like llama.cpp's: `[1]21.1234,[2]...`, flushed as each window ends.
        let _ = write!(stdout, "[{}]{:.4},", chunk.index, chunk.running_ppl);
        let _ = stdout.flush();
    })?;
    println!();
    match report.ppl_err {
        Some(err) => println!("Final estimate: PPL = {:.4} +/- {:.5}", report.ppl, err),
        None => println!(
            "Final estimate: PPL = {:.4} (no error estimate: every token scored the same)",
            report.ppl
        ),
    }
    eprintln!(
        "perplexity: {} tokens scored in {:.2} s ({:.1} tokens/s through the model)",
        report.count,
        report.seconds,
        (report.n_chunks * config.ctx) as f64 / report.seconds.max(1e-9)
    );
    Ok(report)
}
