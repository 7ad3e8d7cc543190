//! OpenAI / vLLM wire formats, answer side: the JSON body of a finished request on
//! every route, the payloads of a stream's SSE events (the router frames them as
//! `data: ...` and ends with `data: [DONE]`), and `/v1/models`. Field names follow
//! OpenAI's API reference; logprob details follow vLLM (token strings are each id
//! decoded alone, logprobs clamped to -9999 since JSON has no -inf).

use serde_json::{json, Value};

use super::openai::{GenRequest, Route};
use super::tool_calls::{self, ToolRequest, ToolStream};
use crate::engine::output::TokenStep;
use crate::engine::{FinishReason, GenerationOutput, StepLogprobs};
use crate::tokenizer::Tokenizer;

/// What identifies one answer: `chatcmpl-...` / `cmpl-...` id, unix time, model name.
#[derive(Clone, Debug, PartialEq)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

/// The non-streaming body: `chat.completion`, `text_completion`, `/generate`'s
/// `{"text": [prompt + completion]}` or `/api/chat`'s `{"response": text}`.
pub fn final_response(
    req: &GenRequest,
    meta: &ResponseMeta,
    out: &GenerationOutput,
    tokenizer: &Tokenizer,
) -> Value {
    let mut finish_reason = match out.finish_reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    };
    let usage = usage(out.prompt_ids.len(), out.output_ids.len(), out.cached_prompt_tokens);
    let steps = out.logprobs.as_deref().filter(|_| req.logprobs);
    match req.route {
        Route::ChatCompletions => {
            let mut message = json!({"role": "assistant", "content": out.text, "refusal": null});
            let split = req.tools.as_ref().and_then(|t| tool_calls::split_answer(&out.text, t));
            if let Some((content, calls)) = split {
                // OpenAI: `content` is null beside calls unless the model also wrote text.
                message["content"] =
                    if content.trim().is_empty() { Value::Null } else { json!(content) };
                message["tool_calls"] = calls.iter().map(|c| c.to_json(None)).collect();
                if out.finish_reason == FinishReason::Stop {
                    finish_reason = "tool_calls";
                }
            }
            json!({
                "id": meta.id,
                "object": "chat.completion",
                "created": meta.created,
                "model": meta.model,
                "choices": [{
                    "index": 0,
                    "message": message,
                    "logprobs": steps.map(|s| chat_logprobs(s, tokenizer)),
                    "finish_reason": finish_reason,
                }],
                "usage": usage,
            })
        }
        Route::Completions => {
            let text = if req.echo {
                format!("{}{}", req.prompt_text, out.text)
            } else {
                out.text.clone()
            };
            json!({
                "id": meta.id,
                "object": "text_completion",
                "created": meta.created,
                "model": meta.model,
                "choices": [{
                    "index": 0,
                    "text": text,
                    "logprobs": steps.map(|s| completion_logprobs(s, tokenizer, &mut 0)),
                    "finish_reason": finish_reason,
                }],
                "usage": usage,
            })
        }
        Route::Generate => json!({"text": [format!("{}{}", req.prompt_text, out.text)]}),
        Route::ApiChat => json!({"response": out.text}),
    }
}

/// OpenAI's `usage` object.
fn usage(prompt_tokens: usize, completion_tokens: usize, cached_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    })
}

/// A token as text: the id decoded alone, special tokens kept (vLLM).
fn token_text(tokenizer: &Tokenizer, id: u32) -> String {
    tokenizer.decode(&[id], false).unwrap_or_default()
}

/// JSON has no -inf (serde_json would write null): vLLM's floor instead.
fn logprob(lp: f32) -> f64 {
    if lp.is_nan() {
        -9999.0
    } else {
        f64::from(lp).max(-9999.0)
    }
}

/// Chat's `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`.
fn chat_logprobs(steps: &[StepLogprobs], tokenizer: &Tokenizer) -> Value {
    let entry = |id: u32, lp: f32| {
        let token = token_text(tokenizer, id);
        json!({"token": token, "logprob": logprob(lp), "bytes": token.as_bytes()})
    };
    let content: Vec<Value> = steps
        .iter()
        .map(|step| {
            let mut e = entry(step.token_id, step.logprob);
            e["top_logprobs"] =
                step.top_logprobs.iter().map(|t| entry(t.token_id, t.logprob)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// Legacy completions' `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`.
/// `top_logprobs[i]` maps token text to logprob for the sampled token and the k most
/// likely ones (up to k+1 entries, as OpenAI and vLLM); `text_offset` counts the
/// characters of the token texts before each token, starting at `*offset`.
fn completion_logprobs(steps: &[StepLogprobs], tokenizer: &Tokenizer, offset: &mut usize) -> Value {
    let mut tokens = Vec::with_capacity(steps.len());
    let mut token_logprobs = Vec::with_capacity(steps.len());
    let mut top = Vec::with_capacity(steps.len());
    let mut text_offset = Vec::with_capacity(steps.len());
    for step in steps {
        let token = token_text(tokenizer, step.token_id);
        let mut alternatives = serde_json::Map::new();
        alternatives.insert(token.clone(), logprob(step.logprob).into());
        for t in step.top_logprobs.iter().filter(|t| t.token_id != step.token_id) {
            alternatives
                .entry(token_text(tokenizer, t.token_id))
                .or_insert(logprob(t.logprob).into());
        }
        text_offset.push(*offset);
        *offset += token.chars().count();
        token_logprobs.push(logprob(step.logprob));
        top.push(Value::Object(alternatives));
        tokens.push(token);
    }
    json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

/// One stream's chunk builder (chat and completions).
pub struct StreamState {
    route: Route,
    meta: ResponseMeta,
    include_usage: bool,
    logprobs: bool,
    /// Chat: the `{"role": "assistant"}` chunk went out.
    started: bool,
    /// Completions with `echo`: the prompt text, sent in front of the first text.
    echo: Option<String>,
    /// Completions logprobs: characters of token text sent so far.
    text_offset: usize,
    finished: bool,
    /// Chat with tools: the answer's text, held back from the tag of a call on.
    tools: Option<(ToolRequest, ToolStream)>,
}

impl StreamState {
    pub fn new(req: &GenRequest, meta: ResponseMeta) -> Self {
        StreamState {
            route: req.route,
            meta,
            include_usage: req.include_usage,
            logprobs: req.logprobs,
            started: false,
            echo: req.echo.then(|| req.prompt_text.clone()),
            text_offset: 0,
            finished: false,
            tools: req.tools.clone().map(|t| {
                let stream = ToolStream::new(t.format);
                (t, stream)
            }),
        }
    }

    fn chat(&self) -> bool {
        self.route == Route::ChatCompletions
    }

    /// A chunk with one choice. With `include_usage` every chunk but the last carries
    /// `"usage": null` (OpenAI).
    fn chunk(&self, choices: Value) -> Value {
        let object = if self.chat() { "chat.completion.chunk" } else { "text_completion" };
        let mut chunk = json!({
            "id": self.meta.id,
            "object": object,
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": choices,
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    fn role_chunk(&mut self, out: &mut Vec<Value>) {
        if self.chat() && !self.started {
            self.started = true;
            out.push(self.chunk(json!([{
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": null,
            }])));
        }
    }

    /// The chunks for one sampled token: chat's role chunk first, then the token's text
    /// (nothing when it adds no text and carries no logprobs).
    pub fn on_token(&mut self, step: &TokenStep, tokenizer: &Tokenizer) -> Vec<Value> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        self.role_chunk(&mut out);
        let steps = step.logprobs.as_ref().filter(|_| self.logprobs).map(std::slice::from_ref);
        if self.chat() {
            let delta = match &mut self.tools {
                Some((_, held)) => held.push(&step.delta),
                None => step.delta.clone(),
            };
            if delta.is_empty() && steps.is_none() {
                return out;
            }
            out.push(self.chunk(json!([{
                "index": 0,
                "delta": {"content": delta},
                "logprobs": steps.map(|s| chat_logprobs(s, tokenizer)),
                "finish_reason": null,
            }])));
        } else {
            let text = match self.echo.take() {
                Some(prompt) => prompt + &step.delta,
                None => step.delta.clone(),
            };
            if text.is_empty() && steps.is_none() {
                return out;
            }
            let logprobs = steps.map(|s| completion_logprobs(s, tokenizer, &mut self.text_offset));
            out.push(self.chunk(json!([{
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": null,
            }])));
        }
        out
    }

    /// The last chunks: the one with `finish_reason` ("stop", "length" or "timeout"),
    /// then with `include_usage` the usage chunk (`"choices": []`).
    pub fn on_finish(
        &mut self,
        finish_reason: &str,
        prompt_tokens: usize,
        completion_tokens: usize,
        cached_tokens: usize,
    ) -> Vec<Value> {
        let mut out = Vec::new();
        if self.finished {
            return out;
        }
        self.role_chunk(&mut out);
        self.finished = true;
        let mut finish_reason = finish_reason;
        if let Some((req, held)) = &mut self.tools {
            let (content, calls) = held.finish(req);
            if !content.is_empty() {
                out.push(self.chunk(json!([{
                    "index": 0, "delta": {"content": content}, "logprobs": null,
                    "finish_reason": null,
                }])));
            }
            if !calls.is_empty() {
                let calls: Vec<Value> =
                    calls.iter().enumerate().map(|(i, c)| c.to_json(Some(i))).collect();
                out.push(self.chunk(json!([{
                    "index": 0, "delta": {"tool_calls": calls}, "logprobs": null,
                    "finish_reason": null,
                }])));
                if finish_reason == "stop" {
                    finish_reason = "tool_calls";
                }
            }
        }
        let choice = if self.chat() {
            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish_reason})
        } else {
            let text = self.echo.take().unwrap_or_default();
            json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish_reason})
        };
        out.push(self.chunk(json!([choice])));
        if self.include_usage {
            let mut last = self.chunk(json!([]));
            last["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens);
            out.push(last);
        }
        out
    }
}

/// `GET /v1/models`: every served name is the same model, the first one its root.
pub fn models_list(names: &[String], created: u64, max_model_len: usize) -> Value {
    let root = names.first();
    let data: Vec<Value> = names
        .iter()
        .map(|name| {
            json!({
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "qilin",
                "root": root,
                "parent": null,
                "max_model_len": max_model_len,
            })
        })
        .collect();
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests;
