//! `qilin generate`: one prompt through the engine, streamed to stdout or as JSON.

use std::io::Write;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::config::GenerateArgs;
use crate::engine::load::{load_cpu_generator, EngineOptions};
use crate::tokenizer::ChatMessage;

pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    if let Some(n) = args.engine.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up the worker threads")?;
    }
    let options = EngineOptions {
        max_model_len: args.engine.max_model_len,
        prefill_chunk: args.engine.prefill_chunk,
    };
    // Load errors already name the file and the problem.
    let (mut generator, defaults) = load_cpu_generator(&args.engine.model, &options)?;
    let params = args.sampling_params(&defaults);
    params.validate()?;

    let tokenizer = &generator.tokenizer;
    let prompt_ids = if let Some(messages) = &args.messages {
        let mut messages = parse_messages(messages)?;
        if let Some(system) = &args.system {
            messages.insert(0, ChatMessage { role: "system".into(), content: system.clone() });
        }
        let text = tokenizer.apply_chat_template(&messages, true)?;
        tokenizer.encode(&text, false)?
    } else {
        let prompt = args.prompt.as_deref().unwrap_or_default();
        if args.chat {
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(ChatMessage { role: "system".into(), content: system.clone() });
            }
            messages.push(ChatMessage { role: "user".into(), content: prompt.to_string() });
            let text = tokenizer.apply_chat_template(&messages, true)?;
            tokenizer.encode(&text, false)?
        } else {
            if args.system.is_some() {
                bail!("--system needs --chat or --messages");
            }
            tokenizer.encode(prompt, true)?
        }
    };

    let stdout = std::io::stdout();
    let stream = !args.json;
    let output = generator.generate(&prompt_ids, &params, |delta| {
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
    eprintln!(
        "prompt: {} tokens ({} cached) in {:.3}s ({:.1} tok/s); decode: {} tokens in {:.3}s ({:.1} tok/s); finish: {:?}",
        prompt_ids.len(),
        output.cached_prompt_tokens,
        t.prefill.as_secs_f64(),
        (prompt_ids.len() - output.cached_prompt_tokens) as f64 / t.prefill.as_secs_f64().max(1e-9),
        decoded,
        t.decode.as_secs_f64(),
        decoded as f64 / t.decode.as_secs_f64().max(1e-9),
        output.finish_reason,
    );
    if args.json {
        let mut obj = json!({
            "prompt_ids": output.prompt_ids,
            "output_ids": output.output_ids,
            "text": output.text,
            "finish_reason": output.finish_reason,
        });
        if let Some(steps) = &output.logprobs {
            obj["logprobs"] = steps.iter().map(|s| json!(s.top_logprobs)).collect();
        }
        println!("{obj}");
    }
    Ok(())
}

/// An OpenAI messages array: `content` is a string or an array of text parts.
pub fn parse_messages(text: &str) -> anyhow::Result<Vec<ChatMessage>> {
    let value: Value = serde_json::from_str(text).context("--messages is not valid JSON")?;
    let Some(items) = value.as_array() else {
        bail!("--messages must be a JSON array of {{\"role\", \"content\"}} objects");
    };
    if items.is_empty() {
        bail!("--messages is empty");
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
