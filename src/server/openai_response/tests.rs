//! The answer side's wire format, against a real tokenizer (the Qwen2 fixture).

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
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2_gqa4_hd128_tied");
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
    let body = final_response(&request(Route::ChatCompletions, None), &meta(), &output(true), &tok);
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
    let body = final_response(&request(Route::Completions, Some(1)), &meta(), &output(true), &tok);
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
