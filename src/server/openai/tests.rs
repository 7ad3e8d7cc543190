//! Request-side wire format tests against a real tokenizer (the Qwen2 fixture).

use std::path::Path;

use super::*;
use crate::tokenizer::SpecialTokens;

const MAX_LEN: usize = 128;

fn tokenizer() -> Tokenizer {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2_gqa4_hd128_tied");
    Tokenizer::from_hf_dir(&dir).unwrap()
}

fn parse_with(
    route: Route,
    body: Value,
    defaults: &GenerationDefaults,
) -> Result<GenRequest, ApiError> {
    let tokenizer = tokenizer();
    let ctx = ParseContext { tokenizer: &tokenizer, defaults, max_model_len: MAX_LEN };
    parse_request(route, body.to_string().as_bytes(), &ctx)
}

fn parse(route: Route, body: Value) -> GenRequest {
    parse_with(route, body, &GenerationDefaults::default()).unwrap()
}

fn error(route: Route, body: Value) -> ApiError {
    let e = parse_with(route, body, &GenerationDefaults::default()).unwrap_err();
    assert_eq!((e.status, e.kind), (400, "invalid_request_error"), "{e:?}");
    e
}

/// The fixture's template (ChatML with a default system prompt), written out by hand.
fn chatml(turns: &[(&str, &str)], generation_prompt: bool) -> String {
    let mut s = String::new();
    if turns[0].0 != "system" {
        s.push_str("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n");
    }
    for (role, content) in turns {
        s.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    if generation_prompt {
        s.push_str("<|im_start|>assistant\n");
    }
    s
}

#[test]
fn chat_prompt_is_the_rendered_template_encoded_without_bos() {
    let req = parse(
        Route::ChatCompletions,
        json!({"model": "m", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
        ]}),
    );
    let text = chatml(&[("system", "Be brief."), ("user", "Hi there")], true);
    assert_eq!(req.prompt_text, text);
    assert_eq!(req.prompt_ids, tokenizer().encode(&text, false).unwrap());
    assert_eq!(req.model.as_deref(), Some("m"));
    assert_eq!(req.params.max_tokens, MAX_LEN - req.prompt_ids.len());
    assert_eq!(req.params.temperature, 1.0);
    assert_eq!(req.params.top_p, 1.0);
    assert!(!req.stream && !req.include_usage && !req.echo && !req.logprobs);
    assert_eq!(req.params.top_logprobs, None);
}

#[test]
fn chat_text_parts_are_joined_by_newlines_and_developer_is_system() {
    let req = parse(
        Route::ChatCompletions,
        json!({"messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Rules"}]},
            {"role": "user", "content": [
                {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null},
        ], "add_generation_prompt": false}),
    );
    let text = chatml(&[("system", "Rules"), ("user", "a\nb"), ("assistant", "")], false);
    assert_eq!(req.prompt_text, text);
    assert_eq!(req.model, None);
}

#[test]
fn continue_final_message_leaves_the_last_turn_open() {
    let req = parse(
        Route::ChatCompletions,
        json!({"messages": [{"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello, I"}],
               "continue_final_message": true}),
    );
    let full = chatml(&[("user", "Hi"), ("assistant", "Hello, I")], false);
    assert_eq!(req.prompt_text, full.strip_suffix("<|im_end|>\n").unwrap());
    let e = error(
        Route::ChatCompletions,
        json!({"messages": [{"role": "user", "content": "Hi"}],
               "continue_final_message": true, "add_generation_prompt": true}),
    );
    assert_eq!(e.param.as_deref(), Some("continue_final_message"));
}

#[test]
fn completion_prompts_in_every_accepted_shape() {
    let tok = tokenizer();
    let ids = tok.encode("Hello world", true).unwrap();
    for prompt in [json!("Hello world"), json!(["Hello world"])] {
        let req = parse(Route::Completions, json!({"prompt": prompt}));
        assert_eq!(req.prompt_ids, ids);
        assert_eq!(req.prompt_text, "Hello world");
        assert_eq!(req.params.max_tokens, 16, "vLLM's default for /v1/completions");
    }
    let text = tok.decode(&ids, false).unwrap();
    for prompt in
        [json!(ids), json!([ids]), json!(ids.iter().map(|&i| i as f64).collect::<Vec<_>>())]
    {
        let req = parse(Route::Completions, json!({"prompt": prompt, "echo": true}));
        assert_eq!(req.prompt_ids, ids);
        assert_eq!(req.prompt_text, text);
        assert!(req.echo);
    }
    let req = parse(Route::Completions, json!({"prompt": "x", "logprobs": 3, "stream": true}));
    assert!(req.logprobs && req.stream);
    assert_eq!(req.params.top_logprobs, Some(3));
}

#[test]
fn generate_and_api_chat_defaults() {
    let req = parse(Route::Generate, json!({"prompt": "Once upon"}));
    assert_eq!(req.params.max_tokens, 16);
    assert_eq!(req.params.temperature, 1.0);
    assert_eq!(req.prompt_text, "Once upon");
    // Its answer has no logprobs field: asking for them changes nothing.
    assert!(!parse(Route::Generate, json!({"prompt": "a", "logprobs": 2})).logprobs);

    let req = parse(Route::ApiChat, json!({"message": "Hi"}));
    assert_eq!(req.params.max_tokens, 1024.min(MAX_LEN - req.prompt_ids.len()));
    assert_eq!(req.params.temperature, 0.7);
    assert_eq!(req.prompt_text, chatml(&[("user", "Hi")], true));
    let req = parse(Route::ApiChat, json!({"message": "Hi", "max_tokens": 5, "temperature": 0}));
    assert_eq!((req.params.max_tokens, req.params.temperature), (5, 0.0));
}

#[test]
fn model_generation_defaults_fill_what_the_request_leaves_out() {
    let d = GenerationDefaults {
        temperature: Some(0.6),
        top_p: Some(0.9),
        top_k: Some(20),
        repetition_penalty: Some(1.1),
        ..Default::default()
    };
    let p = parse_with(Route::Completions, json!({"prompt": "a"}), &d).unwrap().params;
    assert_eq!((p.temperature, p.top_p, p.top_k, p.repetition_penalty), (0.6, 0.9, 20, 1.1));
    let body = json!({"prompt": "a", "temperature": 0.2, "top_p": 0.5, "top_k": -1,
                      "repetition_penalty": 1.0});
    let p = parse_with(Route::Completions, body, &d).unwrap().params;
    assert_eq!((p.temperature, p.top_p, p.top_k, p.repetition_penalty), (0.2, 0.5, 0, 1.0));
    // /api/chat's own default temperature beats the model's.
    let p = parse_with(Route::ApiChat, json!({"message": "a"}), &d).unwrap().params;
    assert_eq!((p.temperature, p.top_k), (0.7, 20));
}

#[test]
fn sampling_fields_are_read_and_nulls_are_absent() {
    let req = parse(
        Route::ChatCompletions,
        json!({"messages": [{"role": "user", "content": "x"}], "temperature": 0.5,
               "top_p": 0.8, "top_k": 40.0, "min_p": 0.05, "presence_penalty": 0.5,
               "frequency_penalty": -0.5, "repetition_penalty": 1.2, "seed": 42,
               "stop": ["\n\n", "END"], "stop_token_ids": [2], "ignore_eos": true,
               "max_tokens": 7, "logprobs": true, "top_logprobs": 5, "n": 1, "user": "u1",
               "stream": true, "stream_options": {"include_usage": true},
               "tool_choice": "none", "tools": [], "logit_bias": {},
               "response_format": {"type": "text"}, "unknown_field": [1, 2]}),
    );
    let p = &req.params;
    assert_eq!((p.temperature, p.top_p, p.top_k, p.min_p), (0.5, 0.8, 40, 0.05));
    assert_eq!((p.presence_penalty, p.frequency_penalty, p.repetition_penalty), (0.5, -0.5, 1.2));
    assert_eq!((p.seed, p.max_tokens, p.ignore_eos), (Some(42), 7, true));
    assert_eq!(p.stop, ["\n\n", "END"]);
    assert_eq!(p.stop_token_ids, [2]);
    assert_eq!(p.top_logprobs, Some(5));
    assert!(req.logprobs && req.stream && req.include_usage);
    assert_eq!(parse(Route::Completions, json!({"prompt": "a", "stop": "x"})).params.stop, ["x"]);
    let chat_lp = json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true});
    assert_eq!(parse(Route::ChatCompletions, chat_lp).params.top_logprobs, Some(0));

    let nulls = json!({"prompt": "a", "model": null, "temperature": null, "max_tokens": null,
                       "stop": null, "n": null, "seed": null, "logprobs": null, "stream": null,
                       "stream_options": null, "tools": null, "suffix": null, "echo": null});
    let req = parse(Route::Completions, nulls);
    assert_eq!(req.params, SamplingParams { max_tokens: 16, ..SamplingParams::default() });
    assert!(!req.stream && !req.logprobs && req.model.is_none());
}

#[test]
fn max_completion_tokens_wins_over_max_tokens() {
    let body = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 9,
                      "max_completion_tokens": 3});
    assert_eq!(parse(Route::ChatCompletions, body).params.max_tokens, 3);
}

#[test]
fn context_length_is_checked_with_vllms_message() {
    let tok = tokenizer();
    let prompt = "one two three four five";
    let n = tok.encode(prompt, true).unwrap().len();
    let fits = MAX_LEN - n;
    let req = parse(Route::Completions, json!({"prompt": prompt, "max_tokens": fits}));
    assert_eq!(req.params.max_tokens, fits);
    let e = error(Route::Completions, json!({"prompt": prompt, "max_tokens": fits + 1}));
    assert_eq!(e.param.as_deref(), Some("max_tokens"));
    assert_eq!(
        e.message,
        format!(
            "This model's maximum context length is {MAX_LEN} tokens. However, you requested \
             {} tokens ({n} in the prompt, {} in the completion). Please reduce the length \
             of the prompt or completion.",
            MAX_LEN + 1,
            fits + 1
        )
    );
    let body = json!({"messages": [{"role": "user", "content": prompt}],
                      "max_completion_tokens": 1000});
    let e = error(Route::ChatCompletions, body);
    assert_eq!(e.param.as_deref(), Some("max_completion_tokens"));
    assert!(e.message.contains("in the messages, 1000 in the completion"), "{}", e.message);

    let long = "word ".repeat(MAX_LEN);
    let e = error(Route::Completions, json!({"prompt": long}));
    assert_eq!(e.param.as_deref(), Some("prompt"));
    assert!(e.message.starts_with("This model's maximum context length is 128 tokens."));
    let e = error(Route::ChatCompletions, json!({"messages": [{"role": "user", "content": long}]}));
    assert_eq!(e.param.as_deref(), Some("messages"));
    // A default never fails: it shrinks to the room the prompt leaves.
    let req = parse(Route::Completions, json!({"prompt": vec![35; MAX_LEN - 10]}));
    assert_eq!(req.params.max_tokens, 10);
    let e = error(Route::Completions, json!({"prompt": vec![35; MAX_LEN]}));
    assert_eq!(e.param.as_deref(), Some("prompt"));
}

#[test]
fn invalid_bodies_are_400_without_echoing_them() {
    let tok = tokenizer();
    let defaults = GenerationDefaults::default();
    let ctx = ParseContext { tokenizer: &tok, defaults: &defaults, max_model_len: MAX_LEN };
    let run = |body: &[u8]| parse_request(Route::Completions, body, &ctx).unwrap_err();
    assert_eq!(run(b"{\"prompt\": \"\xff\"}").message, "request body is not valid UTF-8");
    let e = run(b"{\"prompt\": \"secret\",\n \"max_tokens\": }");
    assert!(e.message.contains("line 2 column"), "{}", e.message);
    assert!(!e.message.contains("secret"));
    assert_eq!((e.status, e.param), (400, None));
    for body in [&b"[1, 2]"[..], b"\"text\"", b"null", b""] {
        assert_eq!(run(body).status, 400);
    }
    assert_eq!(run(b"42").message, "request body must be a JSON object");
}

#[test]
fn every_rejected_request_names_its_param() {
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "x"}]});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        (Route::ChatCompletions, body)
    };
    let cmpl = |extra: Value| {
        let mut body = json!({"prompt": "x"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        (Route::Completions, body)
    };
    let cases = [
        (chat(json!({"temperature": "abc"})), "temperature", "must be a number"),
        (chat(json!({"temperature": -1})), "temperature", "must be >= 0"),
        (chat(json!({"top_p": 0})), "top_p", ""),
        (chat(json!({"top_p": 1.5})), "top_p", ""),
        (chat(json!({"top_k": -2})), "top_k", ""),
        (chat(json!({"top_k": 2.5})), "top_k", "integer"),
        (chat(json!({"min_p": 2})), "min_p", ""),
        (chat(json!({"presence_penalty": 3})), "presence_penalty", ""),
        (chat(json!({"frequency_penalty": -3})), "frequency_penalty", ""),
        (chat(json!({"repetition_penalty": 0})), "repetition_penalty", ""),
        (chat(json!({"seed": -1})), "seed", "non-negative integer"),
        (chat(json!({"seed": "7"})), "seed", ""),
        (chat(json!({"max_tokens": 0})), "max_tokens", "at least 1"),
        (chat(json!({"max_tokens": 1.5})), "max_tokens", ""),
        (chat(json!({"max_completion_tokens": -5})), "max_completion_tokens", ""),
        (chat(json!({"stop": ""})), "stop", "empty"),
        (chat(json!({"stop": ["a", ""]})), "stop", "empty"),
        (chat(json!({"stop": [1]})), "stop", ""),
        (chat(json!({"stop": vec!["s"; 17]})), "stop", "at most 16"),
        (chat(json!({"stop_token_ids": [100000]})), "stop_token_ids", ""),
        (chat(json!({"ignore_eos": "yes"})), "ignore_eos", "boolean"),
        (chat(json!({"n": 2})), "n", "only n=1 is supported"),
        (chat(json!({"best_of": 2})), "best_of", "not supported"),
        (chat(json!({"logit_bias": {"50": 10}})), "logit_bias", "not supported"),
        (chat(json!({"tools": [{"type": "function"}]})), "tools", "tools[0]"),
        (chat(json!({"tools": [weather()]})), "tools", "tool-call format"),
        (
            chat(json!({"tools": [weather()], "tool_choice": "required"})),
            "tool_choice",
            "constrained",
        ),
        (cmpl(json!({"prompt": "x", "tools": [weather()]})), "tools", "chat/completions"),
        (chat(json!({"response_format": {"type": "json_object"}})), "response_format", ""),
        (chat(json!({"logprobs": "yes"})), "logprobs", "boolean"),
        (chat(json!({"top_logprobs": 2})), "top_logprobs", "logprobs"),
        (chat(json!({"logprobs": true, "top_logprobs": 21})), "top_logprobs", "at most 20"),
        (chat(json!({"stream_options": {"include_usage": true}})), "stream_options", "stream"),
        (chat(json!({"stream": true, "stream_options": 1})), "stream_options", ""),
        (chat(json!({"stream": "true"})), "stream", "boolean"),
        (chat(json!({"echo": true})), "echo", ""),
        (chat(json!({"model": 5})), "model", "string"),
        (chat(json!({"chat_template_kwargs": {"messages": []}})), "chat_template_kwargs", ""),
        (cmpl(json!({"suffix": "end"})), "suffix", "not supported"),
        (cmpl(json!({"logprobs": 21})), "logprobs", ""),
        (cmpl(json!({"logprobs": true})), "logprobs", "integer"),
        (cmpl(json!({"echo": true, "logprobs": 1})), "echo", ""),
        (cmpl(json!({"prompt": ""})), "prompt", "empty"),
        (cmpl(json!({"prompt": []})), "prompt", ""),
        (cmpl(json!({"prompt": ["a", "b"]})), "prompt", "several prompts"),
        (cmpl(json!({"prompt": [[1], [2]]})), "prompt", "several prompts"),
        (cmpl(json!({"prompt": [1, -1]})), "prompt", "token ids"),
        (cmpl(json!({"prompt": [1, 512]})), "prompt", "token ids"),
        (cmpl(json!({"prompt": 12})), "prompt", ""),
        ((Route::Completions, json!({})), "prompt", "required"),
        ((Route::Generate, json!({"prompt": "x", "stream": true})), "stream", ""),
        ((Route::ApiChat, json!({})), "message", "required"),
        ((Route::ApiChat, json!({"message": ""})), "message", "empty"),
        ((Route::ChatCompletions, json!({})), "messages", "required"),
        ((Route::ChatCompletions, json!({"messages": []})), "messages", "empty"),
        ((Route::ChatCompletions, json!({"messages": "hi"})), "messages", "array"),
    ];
    for ((route, body), param, needle) in cases {
        let e = error(route, body.clone());
        assert_eq!(e.param.as_deref(), Some(param), "{body}: {e:?}");
        assert!(e.message.contains(needle), "{body}: {}", e.message);
    }
}

#[test]
fn unsupported_messages_are_400() {
    let cases = [
        (json!({"role": "function", "content": "x", "name": "f"}), "legacy role"),
        (json!({"role": "tool"}), "`content` is required"),
        (
            json!({"role": "user", "content": "x",
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}),
            "only assistant messages",
        ),
        (json!({"role": "wizard", "content": "x"}), "unknown role `wizard`"),
        (json!({"role": "w".repeat(100), "content": "x"}), "..."),
        (json!({"role": "user"}), "`content` is required"),
        (json!({"content": "x"}), "`role` must be a string"),
        (json!({"role": "user", "content": 5}), "string or an array"),
        (
            json!({"role": "user", "content": [{"type": "image_url",
            "image_url": {"url": "data:"}}]}),
            "only text content is supported",
        ),
        (json!({"role": "user", "content": [{"type": "input_audio"}]}), "only text"),
        (json!({"role": "user", "content": [{"text": "x"}]}), "`type`"),
        (
            json!({"role": "assistant", "content": null,
                "tool_calls": [{"id": "1", "type": "function"}]}),
            "tool_calls[0]: needs `function`",
        ),
        (json!("hello"), "must be an object"),
    ];
    for (message, needle) in cases {
        let e = error(Route::ChatCompletions, json!({"messages": [message]}));
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(e.message.contains(needle), "{}", e.message);
    }
}

#[test]
fn a_model_without_chat_template_refuses_chat() {
    let tok = tokenizer();
    let special = SpecialTokens { chat_template: None, ..tok.special().clone() };
    let bare = Tokenizer::from_parts(tok.inner().clone(), special);
    let defaults = GenerationDefaults::default();
    let ctx = ParseContext { tokenizer: &bare, defaults: &defaults, max_model_len: MAX_LEN };
    let body = json!({"messages": [{"role": "user", "content": "x"}]}).to_string();
    let e = parse_request(Route::ChatCompletions, body.as_bytes(), &ctx).unwrap_err();
    assert_eq!(e.status, 400);
    assert!(e.message.contains("no chat template"), "{}", e.message);
    assert!(parse_request(Route::Completions, br#"{"prompt": "x"}"#, &ctx).is_ok());
}

#[test]
fn tokenize_and_detokenize_in_vllms_shapes() {
    let tok = tokenizer();
    let defaults = GenerationDefaults::default();
    let ctx = ParseContext { tokenizer: &tok, defaults: &defaults, max_model_len: MAX_LEN };
    let ids = tok.encode("Hello world", true).unwrap();
    let out = tokenize(br#"{"prompt": "Hello world"}"#, &ctx).unwrap();
    assert_eq!(out, json!({"count": ids.len(), "max_model_len": MAX_LEN, "tokens": ids}));
    let out = tokenize(br#"{"prompt": "Hi", "return_token_strs": true}"#, &ctx).unwrap();
    let strs: Vec<String> = tok
        .encode("Hi", true)
        .unwrap()
        .iter()
        .map(|&i| tok.inner().id_to_token(i).unwrap())
        .collect();
    assert_eq!(out["token_strs"], json!(strs));

    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]});
    let out = tokenize(chat.to_string().as_bytes(), &ctx).unwrap();
    let text = chatml(&[("user", "Hi")], true);
    assert_eq!(out["tokens"], json!(tok.encode(&text, false).unwrap()));
    let body = json!({"messages": [{"role": "user", "content": "Hi"}],
                      "add_generation_prompt": false});
    let out = tokenize(body.to_string().as_bytes(), &ctx).unwrap();
    let text = chatml(&[("user", "Hi")], false);
    assert_eq!(out["tokens"], json!(tok.encode(&text, false).unwrap()));
    assert_eq!(body_model(chat.to_string().as_bytes()).as_deref(), Some("m"));

    let body = json!({"tokens": ids}).to_string();
    assert_eq!(detokenize(body.as_bytes(), &ctx).unwrap(), json!({"prompt": "Hello world"}));
    for bad in
        [&br#"{"tokens": [1, 512]}"#[..], br#"{"tokens": [-1]}"#, br#"{"tokens": "a"}"#, b"{}"]
    {
        let e = detokenize(bad, &ctx).unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("tokens")));
    }
    for bad in [&br#"{"prompt": 1}"#[..], br#"{"prompt": "a", "messages": []}"#, b"{}", b"\xff"] {
        assert_eq!(tokenize(bad, &ctx).unwrap_err().status, 400);
    }
}

#[test]
fn neutral_values_of_unsupported_fields_are_accepted() {
    let body = json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "auto",
                      "top_logprobs": 0, "best_of": 1, "min_tokens": 0, "suffix": "",
                      "skip_special_tokens": true, "modalities": ["text"],
                      "chat_template_kwargs": {"enable_thinking": false}});
    let req = parse(Route::ChatCompletions, body);
    assert!(!req.logprobs);
    assert_eq!(req.params.top_logprobs, None);
}

fn weather() -> Value {
    json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}})
}

/// A tool conversation in OpenAI's wire form (each call's `arguments` a JSON string, the
/// assistant's `content` null) renders through Qwen2.5's template exactly as transformers
/// renders the same conversation with the arguments as an object
/// (tests/fixtures/tokenizer/chat_templates.json, made by tools/make_tokenizer_fixtures.py).
#[test]
fn a_tool_conversation_renders_as_transformers_renders_it() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/chat_templates.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let template = fx["templates"].as_array().unwrap().iter().find(|t| t["name"] == "qwen2.5");
    let template = template.expect("the fixture has Qwen2.5's template");
    let case = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["template"] == "qwen2.5" && c["extra_context"].get("tools").is_some());
    let case = case.expect("the fixture has a Qwen2.5 tool case");
    let special = SpecialTokens {
        eos_token: template["special"]["eos_token"].as_str().map(str::to_string),
        chat_template: template["template"].as_str().map(str::to_string),
        ..SpecialTokens::default()
    };
    let qwen = Tokenizer::from_parts(tokenizer().inner().clone(), special);
    let defaults = GenerationDefaults::default();
    let ctx = ParseContext { tokenizer: &qwen, defaults: &defaults, max_model_len: 4096 };

    // The fixture's messages, as an OpenAI client sends them.
    let mut messages = case["messages_json"].clone();
    for m in messages.as_array_mut().unwrap() {
        if m.get("tool_calls").is_some() {
            m["content"] = Value::Null;
        }
        if let Some(calls) = m.get_mut("tool_calls").and_then(Value::as_array_mut) {
            for call in calls {
                let args = call["function"]["arguments"].to_string();
                call["function"]["arguments"] = json!(args);
            }
        }
    }
    let body = json!({"messages": messages, "tools": case["extra_context"]["tools"]});
    let req = parse_request(Route::ChatCompletions, body.to_string().as_bytes(), &ctx).unwrap();
    assert_eq!(req.prompt_text, case["expected"].as_str().unwrap());
    assert_eq!(
        req.tools.as_ref().map(|t| t.tools.clone()),
        case["extra_context"]["tools"].as_array().cloned()
    );

    // tool_choice "none": the same messages, no tools in the prompt, no parsing.
    let body = json!({"messages": messages, "tools": case["extra_context"]["tools"],
                      "tool_choice": "none"});
    let req = parse_request(Route::ChatCompletions, body.to_string().as_bytes(), &ctx).unwrap();
    assert!(req.tools.is_none());
    assert!(!req.prompt_text.contains("<tools>"), "{}", req.prompt_text);
    assert!(req.prompt_text.contains("<tool_call>"), "the earlier call is still rendered");
}
