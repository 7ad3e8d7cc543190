//! `qilin generate`: one prompt (streamed to stdout, or as JSON) or a JSONL file of
//! prompts run concurrently through the engine.

use std::io::{BufRead, Write};

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::backend::Backend;
use crate::config::GenerateArgs;
use crate::engine::load::{load_engine, AnyEngine};
use crate::engine::workers::as_rayon_worker;
use crate::engine::{Engine, GenerationOutput, SamplingParams};
use crate::model::loader::GenerationDefaults;
use crate::tokenizer::{ChatMessage, Tokenizer};

pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    super::set_threads(args.engine.threads)?;
    // Load errors already name the file and the problem.
    let (engine, defaults) =
        load_engine(&args.engine.model_path()?, &args.engine.engine_options())?;
    match engine {
        AnyEngine::Cpu(mut engine) => as_rayon_worker(|| run_on(&mut engine, args, &defaults)),
        AnyEngine::Cuda(mut engine) => run_on(&mut engine, args, &defaults),
    }
}

fn run_on<B: Backend>(
    engine: &mut Engine<B>,
    args: &GenerateArgs,
    defaults: &GenerationDefaults,
) -> anyhow::Result<()> {
    let params = args.sampling_params(defaults);
    params.validate()?;
    if let Some(file) = &args.prompts_file {
        let requests = read_prompts_file(file, &engine.tokenizer, &params)?;
        let outputs = engine.run_all(&requests, |_, _| {})?;
        let mut stdout = std::io::stdout().lock();
        for output in &outputs {
            writeln!(stdout, "{}", output_json(output))?;
        }
        return Ok(());
    }

    let tokenizer = &engine.tokenizer;
    let prompt_ids = if let Some(messages) = &args.messages {
        let mut messages = parse_messages(
            &serde_json::from_str(messages).context("--messages is not valid JSON")?,
        )?;
        if let Some(system) = &args.system {
            messages.insert(0, ChatMessage { role: "system".into(), content: system.clone() });
        }
        chat_prompt(tokenizer, &messages)?
    } else {
        let prompt = args.prompt.as_deref().unwrap_or_default();
        if args.chat {
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(ChatMessage { role: "system".into(), content: system.clone() });
            }
            messages.push(ChatMessage { role: "user".into(), content: prompt.to_string() });
            chat_prompt(tokenizer, &messages)?
        } else {
            if args.system.is_some() {
                bail!("--system needs --chat or --messages");
            }
            tokenizer.encode(prompt, true)?
        }
    };

    let stdout = std::io::stdout();
    let stream = !args.json;
    let output = engine.generate(&prompt_ids, &params, |delta| {
        if stream {
            let mut out = stdout.lock();
            // A closed pipe (`| head`) is not worth a panic; the text is in the result.
            let _ = out.write_all(delta.as_bytes()).and_then(|_| out.flush());
        }
    })?;
    if stream {
        // End the streamed answer before the timings line on stderr.
        println!();
    }
    let t = output.timings;
    let decoded = output.output_ids.len().saturating_sub(1);
    let computed = prompt_ids.len() - output.cached_prompt_tokens;
    eprintln!(
        "prompt: {} tokens ({} cached) in {:.3}s ({:.1} tok/s); decode: {} tokens in {:.3}s ({:.1} tok/s); finish: {:?}",
        prompt_ids.len(),
        output.cached_prompt_tokens,
        t.prefill.as_secs_f64(),
        computed as f64 / t.prefill.as_secs_f64().max(1e-9),
        decoded,
        t.decode.as_secs_f64(),
        decoded as f64 / t.decode.as_secs_f64().max(1e-9),
        output.finish_reason,
    );
    if args.json {
        println!("{}", output_json(&output));
    }
    Ok(())
}

fn chat_prompt(tokenizer: &Tokenizer, messages: &[ChatMessage]) -> anyhow::Result<Vec<u32>> {
    let text = tokenizer.apply_chat_template(messages, true)?;
    Ok(tokenizer.encode(&text, false)?)
}

/// The `--json` object: prompt_ids, output_ids, text, finish_reason, and per generated
/// token the top-K `{"token_id", "logprob"}` when logprobs were asked for.
fn output_json(output: &GenerationOutput) -> Value {
    let mut obj = json!({
        "prompt_ids": output.prompt_ids,
        "output_ids": output.output_ids,
        "text": output.text,
        "finish_reason": output.finish_reason,
    });
    if let Some(steps) = &output.logprobs {
        obj["logprobs"] = steps.iter().map(|s| json!(s.top_logprobs)).collect();
    }
    obj
}

/// One line of a `--prompts-file`: a prompt or messages, and sampling overrides.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptLine {
    prompt: Option<String>,
    messages: Option<Value>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<usize>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<Vec<String>>,
    ignore_eos: Option<bool>,
    top_logprobs: Option<usize>,
}

fn read_prompts_file(
    path: &std::path::Path,
    tokenizer: &Tokenizer,
    base: &SamplingParams,
) -> anyhow::Result<Vec<(Vec<u32>, SamplingParams)>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut requests = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{}: line {}", path.display(), n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}: line {}", path.display(), n + 1);
        let req: PromptLine = serde_json::from_str(&line).with_context(at)?;
        let ids = match (&req.prompt, &req.messages) {
            (Some(p), None) => tokenizer.encode(p, true).with_context(at)?,
            (None, Some(m)) => {
                chat_prompt(tokenizer, &parse_messages(m).with_context(at)?).with_context(at)?
            }
            _ => bail!("{}: exactly one of `prompt` and `messages` is required", at()),
        };
        let p = SamplingParams {
            max_tokens: req.max_tokens.unwrap_or(base.max_tokens),
            temperature: req.temperature.unwrap_or(base.temperature),
            top_p: req.top_p.unwrap_or(base.top_p),
            top_k: req.top_k.unwrap_or(base.top_k),
            min_p: req.min_p.unwrap_or(base.min_p),
            repetition_penalty: req.repetition_penalty.unwrap_or(base.repetition_penalty),
            presence_penalty: req.presence_penalty.unwrap_or(base.presence_penalty),
            frequency_penalty: req.frequency_penalty.unwrap_or(base.frequency_penalty),
            seed: req.seed.or(base.seed),
            stop: req.stop.unwrap_or_else(|| base.stop.clone()),
            ignore_eos: req.ignore_eos.unwrap_or(base.ignore_eos),
            top_logprobs: req.top_logprobs.or(base.top_logprobs),
            stop_token_ids: base.stop_token_ids.clone(),
        };
        p.validate().with_context(at)?;
        requests.push((ids, p));
    }
    if requests.is_empty() {
        bail!("{}: no requests in the file", path.display());
    }
    Ok(requests)
}

/// An OpenAI messages array: `content` is a string or an array of text parts.
pub fn parse_messages(value: &Value) -> anyhow::Result<Vec<ChatMessage>> {
    let Some(items) = value.as_array() else {
        bail!("messages must be a JSON array of {{\"role\", \"content\"}} objects");
    };
    if items.is_empty() {
        bail!("messages is empty");
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .with_context(|| format!("message {i}: `role` must be a string"))?;
            if !matches!(role, "system" | "user" | "assistant" | "developer" | "tool") {
                bail!("message {i}: unknown role `{role}`");
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                        _ => bail!("message {i}: only text content parts are supported"),
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?
                    .concat(),
                Some(Value::Null) | None => String::new(),
                Some(_) => {
                    bail!("message {i}: `content` must be a string or an array of text parts")
                }
            };
            Ok(ChatMessage { role: role.to_string(), content })
        })
        .collect()
}
