//! The Hermes format as Qwen2.5's chat template states it to the model:
//! `<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>`,
//! one block per call; answers are built from that sentence, not from our own output.

use serde_json::{json, Value};

use super::*;

const QWEN_TEMPLATE_EXCERPT: &str = "For each function call, return a json object with \
    function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n\
    {\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call>";

/// Llama 3.1-3.3's templates, verbatim.
const LLAMA_TEMPLATE_EXCERPT: &str = "{{- 'Respond in the format {\"name\": function name, \
    \"parameters\": dictionary of argument name and its value}.' }}";

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }})
}

fn auto() -> ToolRequest {
    ToolRequest { tools: vec![weather_tool()], parallel: true, format: ToolFormat::Hermes }
}

fn llama() -> ToolRequest {
    ToolRequest { format: ToolFormat::Llama3Json, ..auto() }
}

fn args(call: &ToolCall) -> Value {
    serde_json::from_str(&call.arguments).expect("arguments are a JSON string")
}

#[test]
fn a_request_with_tools_is_parsed_for_calls_unless_tool_choice_is_none() {
    let tools = json!([weather_tool()]);
    let t = Some(QWEN_TEMPLATE_EXCERPT);
    let got = parse_request(Some(&tools), None, None, t).unwrap().unwrap();
    assert_eq!(got, auto());
    let got = parse_request(Some(&tools), Some(&json!("auto")), Some(&json!(false)), t).unwrap();
    assert_eq!(got, Some(ToolRequest { parallel: false, ..auto() }));
    let got = parse_request(Some(&tools), None, None, Some(LLAMA_TEMPLATE_EXCERPT)).unwrap();
    assert_eq!(got, Some(llama()));
    assert_eq!(parse_request(Some(&tools), Some(&json!("none")), None, t).unwrap(), None);
    assert_eq!(parse_request(None, Some(&json!("auto")), None, None).unwrap(), None);
    assert_eq!(parse_request(Some(&json!([])), None, None, None).unwrap(), None);
}

#[test]
fn what_cannot_be_honoured_is_refused_with_the_reason() {
    let tools = json!([weather_tool()]);
    let t = Some(QWEN_TEMPLATE_EXCERPT);
    let message = |r: Result<Option<ToolRequest>, ApiError>| r.unwrap_err().message;
    let e = message(parse_request(Some(&tools), Some(&json!("required")), None, t));
    assert!(e.contains("constrained decoding"), "{e}");
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let e = message(parse_request(Some(&tools), Some(&named), None, t));
    assert!(e.contains("named function"), "{e}");
    let e = message(parse_request(Some(&tools), None, None, Some("{{ messages }}")));
    assert!(e.contains("tool-call format"), "{e}");
    for (bad, what) in [
        (json!({"type": "function"}), "`function` must be an object"),
        (json!({"type": "retrieval", "function": {"name": "x"}}), "`type`"),
        (json!({"type": "function", "function": {"name": "has space"}}), "1-64 letters"),
        (json!({"type": "function", "function": {"name": "x", "parameters": []}}), "Schema"),
    ] {
        let e = message(parse_request(Some(&json!([bad])), None, None, t));
        assert!(e.contains(what) && e.contains("tools[0]"), "{e}");
    }
    let e = message(parse_request(Some(&tools), None, Some(&json!("yes")), t));
    assert!(e.contains("parallel_tool_calls"), "{e}");
}

#[test]
fn assistant_tool_calls_reach_the_template_with_parsed_arguments() {
    let sent = json!([{"id": "call_1", "type": "function",
                       "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]);
    assert_eq!(
        message_tool_calls(1, &sent).unwrap(),
        json!([{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}])
    );
    let broken = json!([{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]);
    let e = message_tool_calls(3, &broken).unwrap_err().message;
    assert!(e.contains("message 3") && e.contains("not valid JSON"), "{e}");
}

#[test]
fn an_answer_of_calls_splits_into_content_and_calls() {
    let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \
                {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \
                \"arguments\": {\"city\": \"Lyon\"}}\n</tool_call>";
    let (content, calls) = split_answer(text, &auto()).unwrap();
    assert_eq!(content, "Let me check.\n");
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (calls[0].name.as_str(), args(&calls[0])),
        ("get_weather", json!({"city": "Paris"}))
    );
    assert_eq!(args(&calls[1]), json!({"city": "Lyon"}));
    assert_ne!(calls[0].id, calls[1].id);
    assert!(calls[0].id.starts_with("call_") && calls[0].id.len() == 29);
    // parallel_tool_calls: false keeps the first.
    let one = ToolRequest { parallel: false, ..auto() };
    assert_eq!(split_answer(text, &one).unwrap().1.len(), 1);
}

#[test]
fn answers_that_are_not_calls_stay_content() {
    for text in [
        "It is sunny in Paris.",
        "<tool_call>\nnot json\n</tool_call>",
        "<tool_call>\n{\"arguments\": {}}\n</tool_call>",
        "<tool_call>\n{\"name\": \"f\", \"arguments\": [1, 2]}\n</tool_call>",
    ] {
        assert_eq!(split_answer(text, &auto()), None, "{text}");
    }
    // An unclosed last block (the end-of-turn token came first) still counts.
    let (_, calls) =
        split_answer("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}", &auto()).unwrap();
    assert_eq!(args(&calls[0]), json!({"a": 1}));
}

/// Feeds `pieces` through a ToolStream: (content released piece by piece, the rest).
fn stream_as(req: &ToolRequest, pieces: &[&str]) -> (Vec<String>, (String, Vec<ToolCall>)) {
    let mut s = ToolStream::new(req.format);
    let released = pieces.iter().map(|p| s.push(p)).collect();
    (released, s.finish(req))
}

fn stream(pieces: &[&str]) -> (Vec<String>, (String, Vec<ToolCall>)) {
    stream_as(&auto(), pieces)
}

#[test]
fn streamed_text_goes_out_at_once_until_a_tag_might_start() {
    let (released, (held, calls)) = stream(&["It is ", "sunny <", "b>really</b>", " <tool"]);
    assert_eq!(released, ["It is ", "sunny ", "<b>really</b>", " "]);
    assert_eq!((held.as_str(), calls.len()), ("<tool", 0), "a tail that never became a tag");
}

#[test]
fn a_streamed_call_is_held_back_and_given_whole_at_the_end() {
    let (released, (held, calls)) = stream(&[
        "Checking",
        ".\n<tool_",
        "call>\n{\"name\": \"get_weather\", ",
        "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    ]);
    assert_eq!(released.concat(), "Checking.\n");
    assert_eq!(held, "");
    assert_eq!(
        (calls[0].name.as_str(), args(&calls[0])),
        ("get_weather", json!({"city": "Paris"}))
    );
}

#[test]
fn a_streamed_block_that_is_not_a_call_comes_out_as_content_at_the_end() {
    let (released, (held, calls)) = stream(&["A ", "<tool_call>", "{broken", "</tool_call>"]);
    assert_eq!(released.concat(), "A ");
    assert_eq!(held, "<tool_call>{broken</tool_call>");
    assert!(calls.is_empty());
    // Multi-byte text next to a partial tag is never cut inside a character.
    let (released, (held, _)) = stream(&["é<", "tool_ca", "ß"]);
    assert_eq!(released.concat() + &held, "é<tool_caß");
}

#[test]
fn llama3_answers_of_json_calls_split_into_calls() {
    // The form the template asks for; Llama 3.1's <|python_tag|> in front; two joined by ';'.
    for text in [
        "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
        "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}",
        "\n {\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}",
    ] {
        let (content, calls) = split_answer(text, &llama()).unwrap();
        assert_eq!(content, "", "{text}");
        assert_eq!(calls.len(), 1, "{text}");
        assert_eq!(args(&calls[0]), json!({"city": "Paris"}), "{text}");
    }
    let two =
        "{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"parameters\": {\"x\": 1}}";
    let (_, calls) = split_answer(two, &llama()).unwrap();
    let names: Vec<&str> = calls.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(args(&calls[1]), json!({"x": 1}));
    for prose in [
        "It is sunny.",
        "{\"name\": \"a\", \"parameters\": {}} and then some words",
        "{\"temperature\": 21}",
        "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>",
    ] {
        assert_eq!(split_answer(prose, &llama()), None, "{prose}");
    }
}

#[test]
fn llama3_streams_prose_at_once_and_holds_what_may_be_a_call() {
    let (released, (held, calls)) = stream_as(&llama(), &["  ", "It", " is sunny", "."]);
    assert_eq!(released.concat(), "  It is sunny.");
    assert_eq!((held.as_str(), calls.len()), ("", 0));
    let (released, (held, calls)) = stream_as(
        &llama(),
        &["\n", "{\"name\": \"get_weather\", ", "\"parameters\": {\"city\": \"Paris\"}}"],
    );
    assert_eq!((released.concat().as_str(), held.as_str()), ("", ""));
    assert_eq!(args(&calls[0]), json!({"city": "Paris"}));
    // Held as a possible call, then not one: all of it comes out as content at the end.
    let (released, (held, calls)) = stream_as(&llama(), &["{braces}", " in prose"]);
    assert_eq!((released.concat().as_str(), held.as_str()), ("", "{braces} in prose"));
    assert!(calls.is_empty());
}

mod wire {
    //! The response side: a chat body and a chat stream carrying a Hermes call, in the shape
    //! the official `openai` client reads (tests/clients/openai_tools.py checks the client
    //! side against a real server).

    use std::path::Path;

    use serde_json::{json, Value};

    use super::{auto, llama};
    use crate::engine::output::TokenStep;
    use crate::engine::{FinishReason, GenerationOutput, SamplingParams};
    use crate::server::openai::{GenRequest, Route};
    use crate::server::openai_response::{final_response, ResponseMeta, StreamState};
    use crate::server::tool_calls::ToolRequest;
    use crate::tokenizer::Tokenizer;

    const ANSWER: &str = "Checking.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": \
                          {\"city\": \"Paris\"}}\n</tool_call>";

    fn tokenizer() -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models/qwen2_gqa4_hd128_tied");
        Tokenizer::from_hf_dir(&dir).unwrap()
    }

    fn request(tools: ToolRequest, stream: bool) -> GenRequest {
        GenRequest {
            route: Route::ChatCompletions,
            model: None,
            prompt_ids: vec![1, 2],
            prompt_text: String::new(),
            params: SamplingParams::default(),
            stream,
            include_usage: false,
            echo: false,
            logprobs: false,
            tools: Some(tools),
        }
    }

    fn meta() -> ResponseMeta {
        ResponseMeta { id: "chatcmpl-1".into(), created: 1, model: "m".into() }
    }

    fn output(text: &str, finish_reason: FinishReason) -> GenerationOutput {
        GenerationOutput {
            prompt_ids: vec![1, 2],
            output_ids: vec![3, 4, 5],
            text: text.into(),
            finish_reason,
            logprobs: None,
            cached_prompt_tokens: 0,
            timings: Default::default(),
        }
    }

    #[test]
    fn a_whole_answer_with_a_call() {
        let body = final_response(
            &request(auto(), false),
            &meta(),
            &output(ANSWER, FinishReason::Stop),
            &tokenizer(),
        );
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], "Checking.\n");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(
            (call["type"].as_str(), call["function"]["name"].as_str()),
            (Some("function"), Some("get_weather"))
        );
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris"}));
        // Cut short by max_tokens: the reason stays "length".
        let body = final_response(
            &request(auto(), false),
            &meta(),
            &output(ANSWER, FinishReason::Length),
            &tokenizer(),
        );
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        // Only a call: content null.
        let only = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}";
        let body = final_response(
            &request(llama(), false),
            &meta(),
            &output(only, FinishReason::Stop),
            &tokenizer(),
        );
        assert_eq!(body["choices"][0]["message"]["content"], Value::Null);
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
    }

    #[test]
    fn a_streamed_answer_with_a_call() {
        let tok = tokenizer();
        let mut state = StreamState::new(&request(auto(), true), meta());
        let mut chunks = Vec::new();
        let pieces = [
            "Check",
            "ing.\n<tool",
            "_call>\n{\"name\": \"get_weather\", ",
            "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        ];
        for (i, delta) in pieces.iter().enumerate() {
            let step = TokenStep {
                token_id: i as u32,
                delta: delta.to_string(),
                finished: None,
                logprobs: None,
            };
            chunks.extend(state.on_token(&step, &tok));
        }
        chunks.extend(state.on_finish("stop", 2, 4, 0));
        let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
        let content: String =
            deltas.iter().filter_map(|d| d.get("content").and_then(Value::as_str)).collect();
        assert_eq!(content, "Checking.\n");
        let calls: Vec<&Value> = deltas.iter().filter_map(|d| d.get("tool_calls")).collect();
        assert_eq!(calls.len(), 1, "{chunks:?}");
        assert_eq!(calls[0][0]["index"], 0);
        assert_eq!(calls[0][0]["function"]["name"], "get_weather");
        assert!(calls[0][0]["id"].as_str().unwrap().starts_with("call_"));
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(last["choices"][0]["delta"], json!({}));
    }
}
