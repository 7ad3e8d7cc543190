//! The real demo model, SmolLM2-135M-Instruct (Q4_1 GGUF), against transformers
//! loading the same GGUF (tests/fixtures/smollm2/expected.json, tools/make_fixtures.py).
//!
//! With `--cpu-activations f32`, transformers dequantizes Q4_1 to f32 exactly as we do,
//! so both sides run the same f32 model; only summation order differs. Over 30 layers
//! that moves logprobs by at most 7e-5 (measured on all cases); 1e-3 leaves room for
//! other CPUs and still catches real mistakes (e.g. the GGUF Q/K permutation left in
//! place shifts them by whole units). Token choices must agree wherever transformers'
//! top-2 margin exceeds 1e-2.
//!
//! `--cpu-activations q8` (the default), 8-bit activations for generated tokens, rounds every
//! linear layer's input of a decode step to 8 bits per 32 values: logprobs of the reference's top tokens then move by up to
//! 0.51 (0.20 for the chosen token; measured on all cases), which Q8_LOGPROB_TOL (0.75)
//! bounds, and choices must agree where the margin exceeds Q8_MIN_MARGIN (0.75). A
//! broken integer kernel moves them by whole units. tests/perplexity.rs holds the mean
//! effect to transformers' loss.

mod common;

use std::process::Command;

use common::{compare_greedy, manifest_dir, our_top_logprobs, read_expected, smollm2_gguf};
use qilin::backend::cpu::CpuActivations;
use qilin::engine::load::{load_cpu_engine, EngineOptions};
use qilin::engine::{FinishReason, SamplingParams};

const LOGPROB_TOL: f32 = 1e-3;
const MIN_MARGIN: f32 = 1e-2;
const Q8_LOGPROB_TOL: f32 = 0.75;
const Q8_MIN_MARGIN: f32 = 0.75;

/// Every recorded case greedily, compared with transformers; returns the largest
/// logprob error.
fn run_cases(activations: CpuActivations, min_margin: f32, logprob_tol: f32) -> f32 {
    let expected = read_expected(&manifest_dir().join("tests/fixtures/smollm2/expected.json"));
    let options = EngineOptions { cpu_activations: activations, ..EngineOptions::default() };
    let (mut generator, _) = load_cpu_engine(&smollm2_gguf(), &options).expect("load SmolLM2");
    let mut worst = 0f32;
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
        let cmp = compare_greedy(case, &out.output_ids, &top, min_margin, logprob_tol);
        eprintln!(
            "smollm2 / {} ({activations:?}): {} of {} steps agree, max logprob error {:.2e}",
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
        worst = worst.max(cmp.max_logprob_error);
    }
    worst
}

#[test]
fn chat_prompts_match_transformers() {
    run_cases(CpuActivations::F32, MIN_MARGIN, LOGPROB_TOL);
}

#[test]
fn chat_prompts_follow_transformers_with_8_bit_activations() {
    let worst = run_cases(CpuActivations::Q8, Q8_MIN_MARGIN, Q8_LOGPROB_TOL);
    // The f32 path stays within 7e-5: an error this size shows the integer path ran.
    assert!(worst > 1e-3, "8-bit activations left every logprob within {worst}");
}

/// With 8-bit activations (the default), prompt tokens keep f32 numerics in whatever
/// step computes them. A repeated request takes most of its prompt from the prefix cache
/// and computes the rest in a step of a few tokens, where the first request ran the
/// whole prompt in one step; it must answer the same with the same logprobs, up to the
/// f32 summation order (LOGPROB_TOL). When steps of up to 16 tokens took the integer
/// path, the suffix did, and the demo answer's first token (margin 0.08) flipped.
#[test]
fn a_cached_prompt_answers_as_an_uncached_one() {
    let expected = read_expected(&manifest_dir().join("tests/fixtures/smollm2/expected.json"));
    let options = EngineOptions::default();
    assert_eq!(options.cpu_activations, CpuActivations::Q8, "the default this test is about");
    let (mut generator, _) = load_cpu_engine(&smollm2_gguf(), &options).expect("load SmolLM2");
    // Prompts of a whole cache block (16 tokens) or more: shorter ones have none to reuse.
    let cases: Vec<_> = expected.cases.iter().filter(|c| c.prompt_ids.len() > 16).collect();
    assert!(cases.len() >= 2, "{} cases with a reusable block", cases.len());
    for case in cases {
        let params = SamplingParams {
            temperature: 0.0,
            max_tokens: 6,
            top_logprobs: Some(3),
            ..SamplingParams::default()
        };
        let first = generator.generate(&case.prompt_ids, &params, |_| {}).expect("generate");
        let again = generator.generate(&case.prompt_ids, &params, |_| {}).expect("generate");
        let cached = again.cached_prompt_tokens;
        assert!(cached > 0 && cached < case.prompt_ids.len(), "{}: {cached} cached", case.name);
        assert_eq!(first.output_ids, again.output_ids, "{}", case.name);
        for (step, (a, b)) in
            our_top_logprobs(&first).iter().zip(our_top_logprobs(&again)).enumerate()
        {
            for (&(id_a, lp_a), &(id_b, lp_b)) in a.iter().zip(&b) {
                assert_eq!(id_a, id_b, "{} step {step}", case.name);
                assert!(
                    (lp_a - lp_b).abs() <= LOGPROB_TOL,
                    "{} step {step}: logprob {lp_a} uncached, {lp_b} cached",
                    case.name
                );
            }
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
