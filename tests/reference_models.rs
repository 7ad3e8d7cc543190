//! The tiny random-weight Qwen2 / Llama fixtures (tools/make_fixtures.py) against
//! transformers' greedy runs recorded in their expected.json.
//!
//! Tolerances: both sides compute in f32 from the same bf16-rounded weights, so the
//! only differences are summation order and exp/ln implementations: relative errors of
//! ~1e-6 per op; measured logprob differences are at most 6e-5 on these models. A
//! tolerance of 5e-4 leaves room for other CPUs' summation orders and still catches any
//! real mistake (a wrong RoPE frequency, bias, GQA mapping or norm shifts logprobs by
//! 1e-1 or more here). Token choices must agree wherever transformers' own top-2 margin
//! exceeds 5e-3 logits, ten times that tolerance, so a near-tie cannot flip the verdict.

mod common;

use common::{compare_greedy, fixture_models, our_top_logprobs, read_expected};
use qilin::engine::load::{load_cpu_engine, EngineOptions};

const LOGPROB_TOL: f32 = 5e-4;
const MIN_MARGIN: f32 = 5e-3;

fn check_model(dir: &std::path::Path, max_num_batched_tokens: usize) {
    let expected = read_expected(&dir.join("expected.json"));
    let options = EngineOptions {
        max_num_batched_tokens,
        max_num_seqs: max_num_batched_tokens.min(64),
        ..EngineOptions::default()
    };
    let (mut generator, _) =
        load_cpu_engine(dir, &options).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
    for case in &expected.cases {
        if let (Some(messages), Some(prompt)) = (&case.messages, &case.prompt) {
            let rendered = generator.tokenizer.apply_chat_template(messages, true).unwrap();
            assert_eq!(&rendered, prompt, "{}: chat template", case.name);
        }
        if let Some(prompt) = &case.prompt {
            let ids = generator.tokenizer.encode(prompt, case.add_special_tokens).expect("encode");
            assert_eq!(ids, case.prompt_ids, "{}: tokenization of the prompt", case.name);
        }
        let params = case.replay_params();
        let out = generator.generate(&case.prompt_ids, &params, |_| {}).expect("generate");
        let top = our_top_logprobs(&out);
        let cmp = compare_greedy(case, &out.output_ids, &top, MIN_MARGIN, LOGPROB_TOL);
        eprintln!(
            "{} / {}: {} steps agree, max logprob error {:.2e}",
            dir.file_name().unwrap_or_default().to_string_lossy(),
            case.name,
            cmp.compared,
            cmp.max_logprob_error
        );
        assert!(cmp.compared >= case.steps.len() / 2, "{}: diverged too early", case.name);
    }
}

#[test]
fn greedy_outputs_match_transformers() {
    for dir in fixture_models() {
        check_model(&dir, 512);
    }
}

/// Prefill in chunks of 7 tokens (so chunks straddle KV blocks) must change nothing.
#[test]
fn chunked_prefill_matches_transformers() {
    for dir in fixture_models() {
        check_model(&dir, 7);
    }
}

/// A second run of the same prompt takes its full blocks from the prefix cache and
/// computes only the rest; the answer must still be transformers' answer.
#[test]
fn prefix_cache_hits_match_transformers() {
    for dir in fixture_models() {
        let expected = read_expected(&dir.join("expected.json"));
        let case = expected.cases.iter().max_by_key(|c| c.prompt_ids.len()).expect("cases");
        let (mut generator, _) = load_cpu_engine(&dir, &EngineOptions::default()).unwrap();
        let params = case.replay_params();
        let first = generator.generate(&case.prompt_ids, &params, |_| {}).unwrap();
        let second = generator.generate(&case.prompt_ids, &params, |_| {}).unwrap();
        assert_eq!(first.cached_prompt_tokens, 0);
        // Whole blocks only, and never the last prompt token (its logits are needed).
        let cacheable = (case.prompt_ids.len() - 1) / 16 * 16;
        assert_eq!(second.cached_prompt_tokens, cacheable, "{}", dir.display());
        compare_greedy(
            case,
            &second.output_ids,
            &our_top_logprobs(&second),
            MIN_MARGIN,
            LOGPROB_TOL,
        );
        assert_eq!(first.output_ids, second.output_ids);
    }
}
