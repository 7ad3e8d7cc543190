//! The sampler over Qwen2.5's 152064-entry vocabulary: one call = one decode step of one
//! sequence (raw log-sum-exp, filters, draw). Reports µs per call.
//!
//! cargo bench --bench sampler
//!
//! "peaked" logits look like a language model's (a few strong candidates over a wide
//! normal floor); "flat" is the worst case for top-p, where the nucleus spans most of the
//! vocabulary and must be sorted.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use qilin::engine::sampler::Sampler;
use qilin::engine::SamplingParams;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const VOCAB: usize = 152_064;

fn logits(peaked: bool) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    // Sum of 4 uniforms: a cheap bell shape, sd ~0.58 before scaling.
    let mut x: Vec<f32> = (0..VOCAB)
        .map(|_| (0..4).map(|_| rng.random::<f32>()).sum::<f32>() - 2.0)
        .map(|v| v * 3.0)
        .collect();
    if peaked {
        for (i, boost) in [(1234, 14.0), (99_000, 13.0), (500, 12.5), (77_777, 11.0)] {
            x[i] += boost;
        }
        for i in (0..VOCAB).step_by(997) {
            x[i] += 6.0;
        }
    }
    x
}

fn bench(c: &mut Criterion) {
    let cases: [(&str, bool, SamplingParams); 7] = [
        ("greedy", true, SamplingParams { temperature: 0.0, ..Default::default() }),
        ("default_t1", true, SamplingParams::default()),
        (
            "top_k50_t0.7",
            true,
            SamplingParams { temperature: 0.7, top_k: 50, ..Default::default() },
        ),
        (
            "top_p0.9_t0.7",
            true,
            SamplingParams { temperature: 0.7, top_p: 0.9, ..Default::default() },
        ),
        ("top_p0.9_flat", false, SamplingParams { top_p: 0.9, ..Default::default() }),
        (
            "qwen_default_k20_p0.8_t0.7_rep1.05",
            true,
            SamplingParams {
                temperature: 0.7,
                top_k: 20,
                top_p: 0.8,
                repetition_penalty: 1.05,
                ..Default::default()
            },
        ),
        (
            "greedy_top_logprobs5",
            true,
            SamplingParams { temperature: 0.0, top_logprobs: Some(5), ..Default::default() },
        ),
    ];
    let prompt: Vec<u32> = (0..2000u32).map(|i| i * 71 % VOCAB as u32).collect();
    let output: Vec<u32> = (0..200u32).map(|i| i * 13 % VOCAB as u32).collect();
    let mut g = c.benchmark_group("sampler/vocab152064");
    for (name, peaked, params) in cases {
        let base = logits(peaked);
        let mut buf = base.clone();
        let mut sampler = Sampler::new(SamplingParams { seed: Some(1), ..params });
        let penalised = sampler.params().repetition_penalty != 1.0;
        g.bench_function(name, |b| {
            b.iter(|| {
                if penalised {
                    // Penalties change the logits in place; without them they stay as given.
                    buf.copy_from_slice(&base);
                }
                black_box(sampler.sample(black_box(&mut buf), &prompt, &output))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
