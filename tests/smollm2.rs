//! The real demo model, SmolLM2-135M-Instruct (Q4_1 GGUF), against transformers
//! loading the same GGUF (tests/fixtures/smollm2/expected.json, tools/make_fixtures.py).
//!
//! transformers dequantizes Q4_1 to f32 exactly as we do, so both sides run the same
//! f32 model; only summation order differs. Over 30 layers that moves logprobs by at
//! most 7e-5 (measured on all cases); 1e-3 leaves room for other CPUs and still catches
//! real mistakes (e.g. the GGUF Q/K permutation left in place shifts them by whole
//! units). Token choices must agree wherever transformers' top-2 margin exceeds 1e-2.

mod common;

use std::process::Command;

use common::{compare_greedy, manifest_dir, our_top_logprobs, read_expected, smollm2_gguf};
use qilin::engine::load::{load_cpu_engine, EngineOptions};
use qilin::engine::{FinishReason, SamplingParams};

const LOGPROB_TOL: f32 = 1e-3;
const MIN_MARGIN: f32 = 1e-2;

#[test]
fn chat_prompts_match_transformers() {
    let expected = read_expected(&manifest_dir().join("tests/fixtures/smollm2/expected.json"));
    let (mut generator, _) =
        load_cpu_engine(&smollm2_gguf(), &EngineOptions::default()).expect("load SmolLM2");
    for case in &expected.cases {
        let prompt = case.prompt.as_ref().expect("SmolLM2 cases are text prompts");
        if let Some(messages) = &case.messages {
            let rendered = generator.tokenizer.apply_chat_template(messages, true).unwrap();
            assert_eq!(&rendered, prompt, "{}: chat template", case.name);
        }
        let ids = generator.tokenizer.encode(prompt, case.add_special_tokens).unwrap();
        assert_eq!(ids, case.prompt_ids, "{}: prompt tokenization", case.name);
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: case.output_ids.len(),
            top_logprobs: Some(case.steps[0].top_logprobs.len()),
            ..SamplingParams::default()
        };
        let out = generator.generate(&ids, &params, |_| {}).expect("generate");
        let top = our_top_logprobs(&out);
        let cmp = compare_greedy(case, &out.output_ids, &top, MIN_MARGIN, LOGPROB_TOL);
        eprintln!(
            "smollm2 / {}: {} of {} steps agree, max logprob error {:.2e}",
            case.name,
            cmp.compared,
            case.steps.len(),
            cmp.max_logprob_error
        );
        if cmp.compared == case.steps.len() {
            assert_eq!(out.output_ids, case.output_ids, "{}", case.name);
            let expected_text = generator.tokenizer.decode(&case.output_ids, true).unwrap();
            assert_eq!(out.text, expected_text, "{}: text", case.name);
        }
    }
}

/// The acceptance check, through the real binary: transformers answers
/// "The capital of France is Paris." with ids [504, 3575, 282, 4649, 314, 7042, 30, 2].
#[test]
fn cli_answers_the_capital_of_france() {
    let output = Command::new(env!("CARGO_BIN_EXE_qilin"))
        .args(["generate", "--model"])
        .arg(smollm2_gguf())
        .args(["--chat", "--prompt", "What is the capital of France?"])
        .args(["--temperature", "0", "--json", "--top-logprobs", "3"])
        .output()
        .expect("run qilin");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "qilin failed: {stderr}");
    let stdout = String::from_utf8(output.stdout).expect("utf-8 stdout");
    let last = stdout.lines().last().expect("a JSON line");
    let json: serde_json::Value = serde_json::from_str(last).expect("JSON on the last line");
    let ids: Vec<u64> = serde_json::from_value(json["output_ids"].clone()).unwrap();
    assert_eq!(ids, [504, 3575, 282, 4649, 314, 7042, 30, 2]);
    assert_eq!(json["text"], "The capital of France is Paris.");
    assert_eq!(json["finish_reason"], "stop");
    let logprobs = json["logprobs"].as_array().expect("logprobs array");
    assert_eq!(logprobs.len(), ids.len());
    for (step, &id) in logprobs.iter().zip(&ids) {
        let top = step.as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["token_id"], id, "greedy picks the most likely token");
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0, "{lps:?}");
    }
}

#[test]
fn same_seed_gives_the_same_sample() {
    let (mut generator, _) =
        load_cpu_engine(&smollm2_gguf(), &EngineOptions::default()).expect("load SmolLM2");
    let ids = generator.tokenizer.encode("Once upon a time", true).unwrap();
    let params = SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        seed: Some(1234),
        max_tokens: 24,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let a = generator.generate(&ids, &params, |_| {}).unwrap();
    let b = generator.generate(&ids, &params, |_| {}).unwrap();
    assert_eq!(a.output_ids, b.output_ids);
    assert_eq!(a.finish_reason, FinishReason::Length);
    let other = SamplingParams { seed: Some(4321), ..params };
    let c = generator.generate(&ids, &other, |_| {}).unwrap();
    assert_ne!(a.output_ids, c.output_ids, "24 tokens at temperature 1 from another seed");
}

#[test]
fn stop_string_cuts_the_text_and_streams_agree() {
    let (mut generator, _) =
        load_cpu_engine(&smollm2_gguf(), &EngineOptions::default()).expect("load SmolLM2");
    let messages = vec![qilin::tokenizer::ChatMessage {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let text = generator.tokenizer.apply_chat_template(&messages, true).unwrap();
    let ids = generator.tokenizer.encode(&text, false).unwrap();
    let params = SamplingParams {
        temperature: 0.0,
        stop: vec![" Paris".into()],
        ..SamplingParams::default()
    };
    let mut streamed = String::new();
    let out = generator.generate(&ids, &params, |d| streamed.push_str(d)).unwrap();
    assert_eq!(out.text, "The capital of France is");
    assert_eq!(streamed, out.text);
    assert_eq!(out.finish_reason, FinishReason::Stop);
}
