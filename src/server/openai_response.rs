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
mod tests {
    use std::path::Path;

    use super::*;
    use crate::engine::sampler::TokenLogprob;
    use crate::engine::{SamplingParams, Timings};

    // Fixture vocabulary entries, read off its tokenizer.json.
    const IM_END: u32 = 2;
    const BANG: u32 = 3;
    const A: u32 = 35;
    const B: u32 = 36;

    fn tokenizer() -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/qwen2_gqa4_hd128_tied");
        Tokenizer::from_hf_dir(&dir).unwrap()
    }

    fn request(route: Route, logprobs: Option<usize>) -> GenRequest {
        GenRequest {
            route,
            model: None,
            prompt_ids: vec![10, 11, 12],
            prompt_text: "Say:".into(),
            params: SamplingParams { top_logprobs: logprobs, ..SamplingParams::default() },
            stream: true,
            include_usage: false,
            echo: false,
            logprobs: logprobs.is_some(),
            tools: None,
        }
    }

    fn meta() -> ResponseMeta {
        ResponseMeta { id: "cmpl-1".into(), created: 1_700_000_000, model: "qwen".into() }
    }

    fn step(token_id: u32, logprob: f32, top: &[(u32, f32)]) -> StepLogprobs {
        let top_logprobs =
            top.iter().map(|&(token_id, logprob)| TokenLogprob { token_id, logprob }).collect();
        StepLogprobs { token_id, logprob, top_logprobs }
    }

    /// "AB" then eos; the eos counts as a completion token (vLLM).
    fn output(logprobs: bool) -> GenerationOutput {
        let steps = vec![
            step(A, -0.5, &[(A, -0.5), (B, -1.5)]),
            step(B, -0.25, &[(A, -2.0), (B, -0.25)]),
            step(IM_END, f32::NEG_INFINITY, &[(BANG, -0.1), (A, -3.0)]),
        ];
        GenerationOutput {
            prompt_ids: vec![10, 11, 12],
            output_ids: vec![A, B, IM_END],
            text: "AB".into(),
            finish_reason: FinishReason::Stop,
            logprobs: logprobs.then_some(steps),
            cached_prompt_tokens: 2,
            timings: Timings::default(),
        }
    }

    fn usage_json() -> Value {
        json!({"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
               "prompt_tokens_details": {"cached_tokens": 2}})
    }

    #[test]
    fn chat_completion_body() {
        let tok = tokenizer();
        let body =
            final_response(&request(Route::ChatCompletions, None), &meta(), &output(true), &tok);
        assert_eq!(
            body,
            json!({
                "id": "cmpl-1", "object": "chat.completion", "created": 1_700_000_000u64,
                "model": "qwen",
                "choices": [{"index": 0,
                             "message": {"role": "assistant", "content": "AB", "refusal": null},
                             "logprobs": null, "finish_reason": "stop"}],
                "usage": usage_json(),
            })
        );
    }

    #[test]
    fn chat_logprobs_have_token_bytes_and_top_alternatives() {
        let tok = tokenizer();
        let req = request(Route::ChatCompletions, Some(2));
        let body = final_response(&req, &meta(), &output(true), &tok);
        let entry = |t: &str, lp: f64| json!({"token": t, "logprob": lp, "bytes": t.as_bytes()});
        let with_top = |t: &str, lp: f64, top: Vec<Value>| {
            let mut e = entry(t, lp);
            e["top_logprobs"] = json!(top);
            e
        };
        assert_eq!(
            body["choices"][0]["logprobs"],
            json!({"content": [
                with_top("A", -0.5, vec![entry("A", -0.5), entry("B", -1.5)]),
                with_top("B", -0.25, vec![entry("A", -2.0), entry("B", -0.25)]),
                with_top("<|im_end|>", -9999.0, vec![entry("!", f64::from(-0.1f32)), entry("A", -3.0)]),
            ]})
        );
    }

    #[test]
    fn text_completion_body_with_echo_and_logprobs() {
        let tok = tokenizer();
        let mut req = request(Route::Completions, None);
        req.echo = true;
        let mut out = output(false);
        out.finish_reason = FinishReason::Length;
        assert_eq!(
            final_response(&req, &meta(), &out, &tok),
            json!({
                "id": "cmpl-1", "object": "text_completion", "created": 1_700_000_000u64,
                "model": "qwen",
                "choices": [{"index": 0, "text": "Say:AB", "logprobs": null,
                             "finish_reason": "length"}],
                "usage": usage_json(),
            })
        );
        let body =
            final_response(&request(Route::Completions, Some(1)), &meta(), &output(true), &tok);
        let lp = &body["choices"][0]["logprobs"];
        assert_eq!(lp["tokens"], json!(["A", "B", "<|im_end|>"]));
        assert_eq!(lp["token_logprobs"], json!([-0.5, -0.25, -9999.0]));
        // The sampled token first, then the alternatives (up to k + 1 entries).
        assert_eq!(
            lp["top_logprobs"],
            json!([{"A": -0.5, "B": -1.5}, {"B": -0.25, "A": -2.0},
                   {"<|im_end|>": -9999.0, "!": f64::from(-0.1f32), "A": -3.0}])
        );
        assert_eq!(lp["text_offset"], json!([0, 1, 2]));
        // Logprobs the request did not ask for are not reported.
        let body = final_response(&request(Route::Completions, None), &meta(), &output(true), &tok);
        assert_eq!(body["choices"][0]["logprobs"], Value::Null);
    }

    #[test]
    fn generate_and_api_chat_bodies() {
        let tok = tokenizer();
        let out = output(false);
        let body = final_response(&request(Route::Generate, None), &meta(), &out, &tok);
        assert_eq!(body, json!({"text": ["Say:AB"]}));
        let body = final_response(&request(Route::ApiChat, None), &meta(), &out, &tok);
        assert_eq!(body, json!({"response": "AB"}));
    }

    fn token(token_id: u32, delta: &str, logprobs: Option<StepLogprobs>) -> TokenStep {
        TokenStep { token_id, delta: delta.into(), finished: None, logprobs }
    }

    #[test]
    fn chat_stream_chunks_in_order_with_usage() {
        let tok = tokenizer();
        let mut req = request(Route::ChatCompletions, None);
        req.include_usage = true;
        let mut state = StreamState::new(&req, meta());
        let mut chunks = state.on_token(&token(A, "A", None), &tok);
        // A token that completes no text yet (half a character) sends nothing.
        assert!(state.on_token(&token(B, "", None), &tok).is_empty());
        chunks.extend(state.on_token(&token(B, "B", None), &tok));
        chunks.extend(state.on_finish("length", 3, 3, 1));
        let chunk = |delta: Value, finish: Value| {
            json!({"id": "cmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000u64,
                   "model": "qwen",
                   "choices": [{"index": 0, "delta": delta, "logprobs": null,
                                "finish_reason": finish}],
                   "usage": null})
        };
        assert_eq!(
            chunks,
            vec![
                chunk(json!({"role": "assistant", "content": ""}), Value::Null),
                chunk(json!({"content": "A"}), Value::Null),
                chunk(json!({"content": "B"}), Value::Null),
                chunk(json!({}), json!("length")),
                json!({"id": "cmpl-1", "object": "chat.completion.chunk",
                       "created": 1_700_000_000u64, "model": "qwen", "choices": [],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                                 "prompt_tokens_details": {"cached_tokens": 1}}}),
            ]
        );
        assert!(state.on_finish("stop", 3, 3, 1).is_empty(), "a stream ends once");
    }

    #[test]
    fn chat_stream_without_usage_and_with_logprobs() {
        let tok = tokenizer();
        let req = request(Route::ChatCompletions, Some(1));
        let mut state = StreamState::new(&req, meta());
        let lp = step(IM_END, -0.5, &[(IM_END, -0.5)]);
        // The eos adds no text but carries logprobs: it is sent.
        let chunks = state.on_token(&token(IM_END, "", Some(lp)), &tok);
        assert_eq!(chunks.len(), 2);
        assert!(chunks.iter().all(|c| c.get("usage").is_none()));
        let e = json!({"token": "<|im_end|>", "logprob": -0.5, "bytes": "<|im_end|>".as_bytes()});
        let mut full = e.clone();
        full["top_logprobs"] = json!([e]);
        assert_eq!(chunks[1]["choices"][0]["delta"], json!({"content": ""}));
        assert_eq!(chunks[1]["choices"][0]["logprobs"], json!({"content": [full]}));
        let last = state.on_finish("stop", 3, 1, 0);
        assert_eq!(last.len(), 1);
        assert_eq!(last[0]["choices"][0]["finish_reason"], "stop");
    }

    #[test]
    fn a_stream_that_times_out_before_its_first_token_still_opens_the_message() {
        let mut state = StreamState::new(&request(Route::ChatCompletions, None), meta());
        let chunks = state.on_finish("timeout", 3, 0, 0);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        assert_eq!(chunks[1]["choices"][0]["finish_reason"], "timeout");
    }

    #[test]
    fn completion_stream_chunks_with_echo_and_offsets() {
        let tok = tokenizer();
        let mut req = request(Route::Completions, None);
        req.echo = true;
        req.include_usage = true;
        let mut state = StreamState::new(&req, meta());
        let mut chunks = state.on_token(&token(A, "A", None), &tok);
        chunks.extend(state.on_token(&token(B, "B", None), &tok));
        chunks.extend(state.on_finish("stop", 3, 2, 0));
        let chunk = |text: &str, finish: Value| {
            json!({"id": "cmpl-1", "object": "text_completion", "created": 1_700_000_000u64,
                   "model": "qwen",
                   "choices": [{"index": 0, "text": text, "logprobs": null,
                                "finish_reason": finish}],
                   "usage": null})
        };
        assert_eq!(
            chunks[..3],
            [chunk("Say:A", Value::Null), chunk("B", Value::Null), chunk("", json!("stop"))]
        );
        assert_eq!(chunks[3]["choices"], json!([]));
        assert_eq!(chunks[3]["usage"]["total_tokens"], 5);

        let mut state = StreamState::new(&request(Route::Completions, Some(0)), meta());
        let a = state.on_token(&token(A, "A", Some(step(A, -1.0, &[]))), &tok);
        let b = state.on_token(&token(B, "B", Some(step(B, -2.0, &[]))), &tok);
        assert_eq!(
            a[0]["choices"][0]["logprobs"],
            json!({"tokens": ["A"], "token_logprobs": [-1.0], "top_logprobs": [{"A": -1.0}],
                   "text_offset": [0]})
        );
        assert_eq!(b[0]["choices"][0]["logprobs"]["text_offset"], json!([1]));
    }

    #[test]
    fn models_list_in_openais_shape() {
        let names = vec!["qwen".to_string(), "alias".to_string()];
        assert_eq!(
            models_list(&names, 1_700_000_000, 4096),
            json!({"object": "list", "data": [
                {"id": "qwen", "object": "model", "created": 1_700_000_000u64, "owned_by": "qilin",
                 "root": "qwen", "parent": null, "max_model_len": 4096},
                {"id": "alias", "object": "model", "created": 1_700_000_000u64, "owned_by": "qilin",
                 "root": "qwen", "parent": null, "max_model_len": 4096},
            ]})
        );
    }
}
