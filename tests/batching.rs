//! Continuous batching against transformers: all of a fixture model's cases run
//! concurrently through one engine (mixed prefill chunks and decodes in the same
//! steps) and each must still give transformers' greedy answer. Same tolerances as
//! tests/reference_models.rs, for the same reasons.

mod common;

use common::{compare_greedy, fixture_models, our_top_logprobs, read_expected};
use qilin::engine::load::{load_cpu_engine, EngineOptions};
use qilin::model::ModelConfig;

const LOGPROB_TOL: f32 = 5e-4;
const MIN_MARGIN: f32 = 5e-3;

fn run_concurrently(options_for: impl Fn(&ModelConfig) -> EngineOptions) -> u64 {
    let mut preemptions = 0;
    for dir in fixture_models() {
        let expected = read_expected(&dir.join("expected.json"));
        let config = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
        let (mut engine, _) = load_cpu_engine(&dir, &options_for(&config)).unwrap();
        let requests: Vec<_> =
            expected.cases.iter().map(|c| (c.prompt_ids.clone(), c.replay_params())).collect();
        let outputs = engine.run_all(&requests, |_, _| {}).unwrap();
        for (case, out) in expected.cases.iter().zip(&outputs) {
            compare_greedy(case, &out.output_ids, &our_top_logprobs(out), MIN_MARGIN, LOGPROB_TOL);
        }
        preemptions += engine.scheduler().num_preemptions();
        let blocks = engine.scheduler().blocks();
        assert_eq!(blocks.num_free_blocks(), blocks.num_blocks(), "every block is back");
    }
    preemptions
}

#[test]
fn concurrent_requests_match_transformers() {
    run_concurrently(|_| EngineOptions::default());
}

/// A 9-token step budget: long prompts are split into many chunks that share steps
/// with other sequences' decodes.
#[test]
fn small_step_budget_chunks_prefill_without_changing_outputs() {
    run_concurrently(|_| EngineOptions {
        max_num_batched_tokens: 9,
        max_num_seqs: 4,
        ..EngineOptions::default()
    });
}

/// A KV pool that holds barely one long sequence: sequences are preempted and
/// recomputed, and the outputs stay transformers'.
#[test]
fn preemption_by_recompute_keeps_outputs() {
    let preemptions = run_concurrently(|c| {
        // f32 K and V of every layer for one block of 16 tokens.
        let block_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4 * 16;
        EngineOptions {
            max_model_len: Some(192),
            // 12 blocks = 192 tokens: one long case fits, all of them at once do not.
            kv_cache_bytes: Some(12 * block_bytes),
            ..EngineOptions::default()
        }
    });
    assert!(preemptions > 0, "the tiny pool should have forced preemptions");
}

/// Greedy requests without logprobs take the engine's argmax path (the backend chooses,
/// `Model::forward_argmax`); the same requests with logprobs take the sampler's. Both
/// must give the same tokens, and a batch mixing the two falls back to the sampler.
#[test]
fn argmax_path_gives_the_samplers_tokens() {
    for dir in fixture_models() {
        let expected = read_expected(&dir.join("expected.json"));
        let (mut engine, _) = load_cpu_engine(&dir, &EngineOptions::default()).unwrap();
        let requests = |logprobs: bool| -> Vec<_> {
            let params_of = |c: &common::Case| {
                let mut p = c.replay_params();
                p.top_logprobs = logprobs.then_some(1);
                p
            };
            expected.cases.iter().map(|c| (c.prompt_ids.clone(), params_of(c))).collect()
        };
        let sampled = engine.run_all(&requests(true), |_, _| {}).unwrap();
        let chosen = engine.run_all(&requests(false), |_, _| {}).unwrap();
        let mut mixed = requests(false);
        mixed[0].1.top_logprobs = Some(1);
        let mixed = engine.run_all(&mixed, |_, _| {}).unwrap();
        for ((a, b), c) in sampled.iter().zip(&chosen).zip(&mixed) {
            assert!(a.logprobs.is_some() && b.logprobs.is_none());
            assert_eq!(a.output_ids, b.output_ids, "{}", dir.display());
            assert_eq!(a.output_ids, c.output_ids, "{}", dir.display());
        }
    }
}

/// Seeded sampling with penalties and logprobs (the host sampler, whose rows the engine
/// samples in parallel): each request's tokens are the same whether it runs alone or in
/// a batch with the others, in any order. A row handed to the wrong sequence, or a draw
/// taken from another request's generator, changes them.
#[test]
fn seeded_sampling_does_not_depend_on_the_batch() {
    for dir in fixture_models() {
        let expected = read_expected(&dir.join("expected.json"));
        let (mut engine, _) = load_cpu_engine(&dir, &EngineOptions::default()).unwrap();
        let requests: Vec<_> = expected
            .cases
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let params = qilin::engine::SamplingParams {
                    temperature: 0.9,
                    top_p: 0.95,
                    top_k: 40,
                    repetition_penalty: 1.1 + 0.05 * i as f32,
                    presence_penalty: 0.2,
                    seed: Some(1000 + i as u64),
                    max_tokens: 12,
                    ignore_eos: true,
                    top_logprobs: Some(2),
                    ..Default::default()
                };
                (c.prompt_ids.clone(), params)
            })
            .collect();
        assert!(requests.len() >= 2, "{}: needs several cases", dir.display());
        let together = engine.run_all(&requests, |_, _| {}).unwrap();
        let mut reversed = requests.clone();
        reversed.reverse();
        let mut backwards = engine.run_all(&reversed, |_, _| {}).unwrap();
        backwards.reverse();
        for (i, request) in requests.iter().enumerate() {
            let alone = engine.run_all(std::slice::from_ref(request), |_, _| {}).unwrap();
            assert_eq!(together[i].output_ids.len(), 12, "{}", dir.display());
            assert_eq!(alone[0].output_ids, together[i].output_ids, "{} case {i}", dir.display());
            assert_eq!(alone[0].output_ids, backwards[i].output_ids, "{} case {i}", dir.display());
        }
    }
}
