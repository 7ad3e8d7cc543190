//! The device-sampling path on the CPU: `CpuBackend::sample_rows` (the twin of
//! kernels/sampling.cu `qilin_sample_bf16`) must give exactly the host `Sampler`'s token
//! when handed the draw `Sampler::device_row` takes from the same seed, for random logits
//! (coarse values: ties at the k-th value and at the top-p cut; NaN, ±inf, all -inf rows)
//! and parameters (top-k around the scan/select switch and past the vocab, top-p edges,
//! min-p, tiny and overflowing temperatures); and the engine must give a seeded request the
//! same tokens through that path as through the host sampler.

mod common;

use common::{fixture_models, read_expected};
use qilin::backend::cpu::{CpuBackend, CpuTensor};
use qilin::backend::{Backend, RowSampling};
use qilin::engine::load::{load_cpu_engine, EngineOptions};
use qilin::engine::sampler::Sampler;
use qilin::engine::SamplingParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random_logits(rng: &mut ChaCha8Rng, vocab: usize) -> Vec<f32> {
    let style = rng.random_range(0..5);
    let mut v: Vec<f32> = (0..vocab)
        .map(|_| match style {
            // Coarse: many ties.
            0 => rng.random_range(-8i32..8) as f32 * 0.5,
            // Flat: a nucleus of most of the vocabulary.
            1 => rng.random_range(-0.05f32..0.05),
            // Peaked, with NaN and infinities sprinkled in.
            2 => match rng.random_range(0..200) {
                0 => f32::NAN,
                1 => f32::NEG_INFINITY,
                2 if rng.random_range(0..20) == 0 => f32::INFINITY,
                _ => rng.random_range(-20.0f32..5.0),
            },
            // bf16-rounded normal-ish values, as a model's logits.
            3 => half::bf16::from_f32(rng.random_range(-6.0f32..6.0) * 2.0).to_f32(),
            _ => rng.random_range(-30.0f32..30.0),
        })
        .collect();
    match rng.random_range(0..40) {
        0 => v.iter_mut().for_each(|x| *x = f32::NEG_INFINITY),
        1 => v.iter_mut().for_each(|x| *x = f32::NAN),
        _ => {}
    }
    v
}

fn random_params(rng: &mut ChaCha8Rng, vocab: usize, seed: u64) -> SamplingParams {
    let pick = |rng: &mut ChaCha8Rng, xs: &[f32]| xs[rng.random_range(0..xs.len())];
    let temperature = pick(rng, &[1.0, 0.7, 1.5, 5.0, 1e-3, 1e-30, 1e-39, 0.0]);
    let top_k = [0, 1, 2, 5, 50, 128, 129, 1000, vocab, vocab + 3][rng.random_range(0..10)];
    let top_p = pick(rng, &[1.0, 0.9, 0.5, 0.95, 1e-6, 0.999_999, 0.3]);
    let min_p = pick(rng, &[0.0, 0.0, 0.05, 0.5, 1.0, 1e-6]);
    SamplingParams { temperature, top_k, top_p, min_p, seed: Some(seed), ..Default::default() }
}

#[test]
fn twin_gives_the_host_samplers_token_for_the_same_draw() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5a3b1e);
    let cpu = CpuBackend::new();
    let mut checked = 0;
    for case in 0..1500u64 {
        let vocab = [1usize, 2, 7, 64, 65, 300, 5000, 20_000][rng.random_range(0..8)];
        let logits = random_logits(&mut rng, vocab);
        let params = random_params(&mut rng, vocab, case);
        // Several consecutive steps of one request: the draws must stay in step.
        let mut host = Sampler::new(params.clone());
        let mut device = Sampler::new(params.clone());
        for step in 0..3 {
            assert!(device.device_eligible(&[], &[], false), "case {case}: {params:?}");
            let want = host.sample(&mut logits.clone(), &[], &[]).token_id;
            let row = device.device_row();
            let got = cpu.sample_rows(&CpuTensor::from_vec(logits.clone(), 1, vocab), &[row]);
            assert_eq!(
                got,
                vec![want],
                "case {case} step {step}, vocab {vocab}, {params:?}, u {}",
                row.u
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 4500);
}

#[test]
fn twin_rows_are_independent_and_in_order() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (rows, vocab) = (9, 3000);
    let logits: Vec<f32> = (0..rows).flat_map(|_| random_logits(&mut rng, vocab)).collect();
    let params: Vec<SamplingParams> =
        (0..rows).map(|r| random_params(&mut rng, vocab, r as u64)).collect();
    let meta: Vec<RowSampling> =
        params.iter().map(|p| Sampler::new(p.clone()).device_row()).collect();
    let got =
        CpuBackend::new().sample_rows(&CpuTensor::from_vec(logits.clone(), rows, vocab), &meta);
    for (r, p) in params.iter().enumerate() {
        let mut row = logits[r * vocab..(r + 1) * vocab].to_vec();
        let want = Sampler::new(p.clone()).sample(&mut row, &[], &[]).token_id;
        assert_eq!(got[r], want, "row {r}");
    }
}

#[test]
fn penalties_and_logprobs_keep_the_host_path() {
    let eligible =
        |p: SamplingParams, output: &[u32]| Sampler::new(p).device_eligible(&[1], output, false);
    let base = SamplingParams { temperature: 0.8, seed: Some(1), ..Default::default() };
    assert!(eligible(base.clone(), &[2]));
    assert!(eligible(SamplingParams { temperature: 0.0, ..base.clone() }, &[2]));
    assert!(!eligible(SamplingParams { top_logprobs: Some(0), ..base.clone() }, &[2]));
    assert!(!eligible(SamplingParams { repetition_penalty: 1.1, ..base.clone() }, &[2]));
    assert!(!eligible(SamplingParams { presence_penalty: 0.5, ..base.clone() }, &[2]));
    // A frequency penalty with no output yet changes nothing: the step may go.
    assert!(eligible(SamplingParams { frequency_penalty: 0.5, ..base.clone() }, &[]));
    assert!(!eligible(SamplingParams { top_p: f32::NAN, ..base.clone() }, &[2]));
    // A backend that applies penalties takes them, never logprobs.
    let on_device = |p: SamplingParams| Sampler::new(p).device_eligible(&[1], &[2, 2], true);
    assert!(on_device(SamplingParams { repetition_penalty: 1.1, ..base.clone() }));
    assert!(on_device(SamplingParams {
        presence_penalty: 0.5,
        frequency_penalty: -1.0,
        ..base.clone()
    }));
    assert!(!on_device(SamplingParams { repetition_penalty: 1.1, top_logprobs: Some(0), ..base }));
}

/// Each case's prompt with `params(i)`, seeded per case, 12 tokens past any eos, and
/// logprobs when asked (which sends every step to the host sampler).
fn seeded_requests(
    cases: &[common::Case],
    logprobs: bool,
    params: impl Fn(usize) -> SamplingParams,
) -> Vec<(Vec<u32>, SamplingParams)> {
    (cases.iter().enumerate())
        .map(|(i, c)| {
            let p = SamplingParams {
                seed: Some(1000 + i as u64),
                max_tokens: 12,
                ignore_eos: true,
                top_logprobs: logprobs.then_some(1),
                ..params(i)
            };
            (c.prompt_ids.clone(), p)
        })
        .collect()
}

/// The engine's device path with penalties (`sample_rows_penalized`, the CPU twin here):
/// with repetition penalties of 2 and 0.5 on logits rounded to bf16 (the emulating backend)
/// the twin's rounding of the penalised logits changes nothing, so a seeded request must
/// give exactly the host sampler's tokens (forced by logprobs) step after step: the
/// incremental prompt + output entries, the routing and the draws stay in step, greedy
/// included. Other penalties round; tests of the arithmetic are in src/engine/sampler.
#[test]
fn device_penalties_give_the_samplers_tokens_when_rounding_is_exact() {
    for dir in fixture_models() {
        let expected = read_expected(&dir.join("expected.json"));
        let options = EngineOptions { cpu_emulates_bf16: true, ..EngineOptions::default() };
        let (mut engine, _) = load_cpu_engine(&dir, &options).unwrap();
        engine.model.backend.set_device_penalties(true);
        let settings =
            [(0.8, 0, 1.0, 2.0), (1.0, 20, 0.9, 0.5), (0.0, 0, 1.0, 2.0), (0.7, 5, 1.0, 1.0)];
        let requests = |logprobs: bool| {
            seeded_requests(&expected.cases, logprobs, |i| {
                let (temperature, top_k, top_p, repetition_penalty) = settings[i % settings.len()];
                SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    repetition_penalty,
                    ..Default::default()
                }
            })
        };
        let host = engine.run_all(&requests(true), |_, _| {}).unwrap();
        let device = engine.run_all(&requests(false), |_, _| {}).unwrap();
        for (a, b) in host.iter().zip(&device) {
            assert!(a.logprobs.is_some() && b.logprobs.is_none());
            assert_eq!(a.output_ids.len(), 12);
            assert_eq!(a.output_ids, b.output_ids, "{}", dir.display());
        }
    }
}

/// Sampled requests without logprobs take the engine's device path (`sample_rows`, the CPU
/// twin here); with logprobs, the host sampler's. A seed must give the same tokens both
/// ways, and a batch mixing the two (all on the host) too.
#[test]
fn device_path_gives_the_samplers_tokens() {
    for dir in fixture_models() {
        let expected = read_expected(&dir.join("expected.json"));
        let (mut engine, _) = load_cpu_engine(&dir, &EngineOptions::default()).unwrap();
        let settings =
            [(0.8, 0, 1.0, 0.0), (1.0, 20, 0.9, 0.0), (0.6, 0, 0.7, 0.05), (1.3, 5, 1.0, 0.1)];
        let requests = |logprobs: bool| {
            seeded_requests(&expected.cases, logprobs, |i| {
                let (temperature, top_k, top_p, min_p) = settings[i % settings.len()];
                SamplingParams { temperature, top_k, top_p, min_p, ..Default::default() }
            })
        };
        let host = engine.run_all(&requests(true), |_, _| {}).unwrap();
        let device = engine.run_all(&requests(false), |_, _| {}).unwrap();
        let mut mixed = requests(false);
        mixed[0].1.top_logprobs = Some(1);
        let mixed = engine.run_all(&mixed, |_, _| {}).unwrap();
        for ((a, b), c) in host.iter().zip(&device).zip(&mixed) {
            assert!(a.logprobs.is_some() && b.logprobs.is_none());
            assert_eq!(a.output_ids.len(), 12);
            assert_eq!(a.output_ids, b.output_ids, "{}", dir.display());
            assert_eq!(a.output_ids, c.output_ids, "{}", dir.display());
        }
    }
}
