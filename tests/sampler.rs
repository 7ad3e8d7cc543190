//! Sampler against HF transformers' logits processors (fixture made by
//! tools/make_sampler_fixtures.py), plus statistical and property checks of the draw.

use proptest::prelude::*;
use qilin::engine::sampler::Sampler;
use qilin::engine::SamplingParams;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    params: SamplingParams,
    prompt: Vec<u32>,
    output: Vec<u32>,
    logits: Vec<f32>,
    greedy: usize,
    log_softmax: Option<Vec<f64>>,
    penalised: Option<Vec<f64>>,
    kept: Option<Vec<usize>>,
    probs: Option<Vec<f64>>,
}

fn fixture() -> Fixture {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sampler/processors.json");
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{path}: {e} (make it with tools/make_sampler_fixtures.py)"));
    serde_json::from_str(&text).expect("fixture parses")
}

fn close(got: f64, want: f64, rel: f64, abs: f64) -> bool {
    (got - want).abs() <= abs + rel * want.abs()
}

fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams { seed: Some(7), ..SamplingParams::default() };
    f(&mut p);
    p
}

#[test]
fn filtered_distribution_matches_hf_warpers() {
    for case in fixture().cases {
        let (Some(kept), Some(probs)) = (&case.kept, &case.probs) else { continue };
        let mut logits = case.logits.clone();
        let dist =
            Sampler::new(case.params.clone()).distribution(&mut logits, &case.prompt, &case.output);
        let got_kept: Vec<usize> = (0..dist.len()).filter(|&i| dist[i] > 0.0).collect();
        assert_eq!(&got_kept, kept, "{}: kept set", case.name);
        for (&i, &want) in kept.iter().zip(probs) {
            assert!(
                close(dist[i] as f64, want, 1e-4, 1e-7),
                "{}: p[{i}] = {} want {want}",
                case.name,
                dist[i]
            );
        }
    }
}

#[test]
fn greedy_is_argmax_of_penalised_logits_as_torch() {
    for case in fixture().cases {
        let p = SamplingParams { temperature: 0.0, ..case.params.clone() };
        let mut logits = case.logits.clone();
        let got = Sampler::new(p.clone()).sample(&mut logits, &case.prompt, &case.output);
        assert_eq!(got.token_id as usize, case.greedy, "{}", case.name);
        let mut logits = case.logits.clone();
        let dist = Sampler::new(p).distribution(&mut logits, &case.prompt, &case.output);
        assert_eq!(dist[case.greedy], 1.0, "{}", case.name);
    }
}

#[test]
fn penalties_match_hf_repetition_and_openai_presence_frequency() {
    let mut checked = 0;
    for case in fixture().cases {
        let Some(penalised) = &case.penalised else { continue };
        let mut logits = case.logits.clone();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..case.params.clone()
        };
        Sampler::new(p).distribution(&mut logits, &case.prompt, &case.output);
        // `distribution` leaves the penalised logits in place.
        for (i, (&got, &want)) in logits.iter().zip(penalised).enumerate() {
            assert!(close(got as f64, want, 1e-6, 1e-6), "{}: [{i}] {got} want {want}", case.name);
        }
        checked += 1;
    }
    assert!(checked >= 10);
}

#[test]
fn logprobs_are_log_softmax_of_raw_logits() {
    for case in fixture().cases {
        let Some(lsm) = &case.log_softmax else { continue };
        let p = SamplingParams { top_logprobs: Some(5), seed: Some(3), ..case.params.clone() };
        let mut logits = case.logits.clone();
        let s = Sampler::new(p).sample(&mut logits, &case.prompt, &case.output);
        let want = lsm[s.token_id as usize];
        assert!(
            close(s.logprob as f64, want, 1e-5, 1e-5),
            "{}: {} vs {want}",
            case.name,
            s.logprob
        );
        let mut order: Vec<usize> = (0..lsm.len()).collect();
        order.sort_by(|&a, &b| lsm[b].total_cmp(&lsm[a]).then(a.cmp(&b)));
        let got_ids: Vec<usize> = s.top_logprobs.iter().map(|t| t.token_id as usize).collect();
        assert_eq!(got_ids, order[..5], "{}", case.name);
        for t in &s.top_logprobs {
            assert!(close(t.logprob as f64, lsm[t.token_id as usize], 1e-5, 1e-5), "{}", case.name);
        }
    }
}

#[test]
fn top_logprobs_ties_go_to_lower_id() {
    let mut logits = vec![0.0, 2.0, 1.0, 2.0, 2.0, 1.0];
    let p = params(|p| {
        p.temperature = 0.0;
        p.top_logprobs = Some(4);
    });
    let s = Sampler::new(p).sample(&mut logits, &[], &[]);
    let ids: Vec<u32> = s.top_logprobs.iter().map(|t| t.token_id).collect();
    assert_eq!(ids, [1, 3, 4, 2]);
    assert_eq!(s.token_id, 1);
}

#[test]
fn nan_logits_never_panic() {
    let mut logits = vec![f32::NAN, 1.0, f32::NAN, 0.5];
    for t in [0.0, 1.0] {
        let p = params(|p| {
            p.temperature = t;
            p.top_p = 0.9;
            p.top_logprobs = Some(2);
        });
        let s = Sampler::new(p).sample(&mut logits.clone(), &[], &[]);
        assert!(s.token_id == 1 || s.token_id == 3);
    }
    // Every logit NaN or -inf: token 0, logprob -inf.
    for p in [params(|_| {}), params(|p| p.top_k = 2), params(|p| p.temperature = 0.0)] {
        logits = vec![f32::NAN, f32::NEG_INFINITY, f32::NAN];
        let s = Sampler::new(p).sample(&mut logits, &[], &[]);
        assert_eq!((s.token_id, s.logprob), (0, f32::NEG_INFINITY));
    }
}

/// Pearson's chi-square statistic of `counts` against `probs` (zero-probability entries
/// must have zero counts).
fn chi_square(counts: &[u64], probs: &[f64]) -> f64 {
    let n: u64 = counts.iter().sum();
    counts
        .iter()
        .zip(probs)
        .map(|(&c, &p)| {
            if p == 0.0 {
                assert_eq!(c, 0, "drew a token of probability 0");
                0.0
            } else {
                let e = p * n as f64;
                (c as f64 - e).powi(2) / e
            }
        })
        .sum()
}

/// Draws `n` tokens from fixed logits and returns the counts per token id.
fn draw_counts(p: SamplingParams, logits: &[f32], n: usize) -> Vec<u64> {
    let mut sampler = Sampler::new(p);
    let mut counts = vec![0u64; logits.len()];
    let mut buf = logits.to_vec();
    for _ in 0..n {
        buf.copy_from_slice(logits);
        counts[sampler.sample(&mut buf, &[], &[]).token_id as usize] += 1;
    }
    counts
}

// Critical values of chi-square at p = 0.001 (tables): df 5 -> 20.515, df 2 -> 13.816.
const CHI2_DF5_P001: f64 = 20.515;
const CHI2_DF2_P001: f64 = 13.816;

#[test]
fn temperature_one_draws_follow_the_softmax() {
    let probs = [0.05, 0.1, 0.15, 0.2, 0.2, 0.3];
    let logits: Vec<f32> = probs.iter().map(|&p: &f64| (p.ln() + 1.7) as f32).collect();
    let counts = draw_counts(params(|p| p.seed = Some(20240601)), &logits, 60_000);
    let x2 = chi_square(&counts, &probs);
    assert!(x2 < CHI2_DF5_P001, "chi-square {x2}, counts {counts:?}");
}

#[test]
fn draws_across_chunks_of_a_large_vocab_follow_the_softmax() {
    // Mass on both sides of the 4096-entry chunk boundaries and at the very end.
    let hot = [0usize, 4095, 4096, 8191, 8192, 150_000, 152_063];
    let weights: [f64; 7] = [1.0, 2.0, 3.0, 1.0, 2.0, 4.0, 3.0];
    let mut logits = vec![f32::NEG_INFINITY; 152_064];
    for (&i, &w) in hot.iter().zip(&weights) {
        logits[i] = w.ln() as f32;
    }
    let counts = draw_counts(params(|p| p.seed = Some(99)), &logits, 40_000);
    let total: f64 = weights.iter().sum();
    let probs: Vec<f64> = (0..logits.len())
        .map(|i| hot.iter().position(|&h| h == i).map_or(0.0, |k| weights[k] / total))
        .collect();
    let x2 = chi_square(&counts, &probs);
    // df = 6: critical value 22.458 at p = 0.001.
    assert!(x2 < 22.458, "chi-square {x2}");
}

#[test]
fn filtered_draws_follow_the_renormalised_distribution() {
    let probs = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04];
    let logits: Vec<f32> = probs.iter().map(|&p: &f64| p.ln() as f32).collect();
    // top-k 3 and top-p 0.75 both keep {0, 1, 2}; min-p 0.3 keeps p >= 0.12: {0, 1, 2}.
    let keep3: Vec<f64> =
        probs.iter().enumerate().map(|(i, &p)| if i < 3 { p / 0.8 } else { 0.0 }).collect();
    for p in [
        params(|p| p.top_k = 3),
        params(|p| p.top_p = 0.75),
        params(|p| p.min_p = 0.3),
        params(|p| {
            p.top_k = 5;
            p.top_p = 0.7;
        }),
    ] {
        let counts = draw_counts(p.clone(), &logits, 30_000);
        let x2 = chi_square(&counts, &keep3);
        assert!(x2 < CHI2_DF2_P001, "{p:?}: chi-square {x2}, counts {counts:?}");
    }
}

#[test]
fn same_seed_same_tokens() {
    let logits: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32) * 0.05).collect();
    let run = |seed| {
        let mut s = Sampler::new(params(|p| {
            p.seed = Some(seed);
            p.top_p = 0.95;
            p.temperature = 1.5;
        }));
        let mut out = Vec::new();
        for _ in 0..64 {
            let mut l = logits.clone();
            let t = s.sample(&mut l, &[], &out).token_id;
            out.push(t);
        }
        out
    };
    assert_eq!(run(11), run(11));
    assert_ne!(run(11), run(12));
}

fn softmax(x: &[f32], temperature: f32) -> Vec<f64> {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let e: Vec<f64> = x.iter().map(|&v| ((v as f64 - m) / temperature as f64).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn logit_strategy() -> impl Strategy<Value = f32> {
    prop_oneof![
        20 => -8.0f32..8.0,
        1 => Just(f32::NAN),
        1 => Just(f32::NEG_INFINITY),
        // Coarse values: ties, as bf16 logits have.
        4 => (-4i32..4).prop_map(|v| v as f32),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn sampled_token_has_nonzero_filtered_probability(
        logits in prop::collection::vec(logit_strategy(), 1..300),
        temperature in prop_oneof![Just(0.0f32), 0.05f32..2.0],
        top_k in 0usize..40,
        top_p in prop_oneof![Just(1.0f32), 0.01f32..1.0],
        min_p in prop_oneof![Just(0.0f32), 0.0f32..0.9],
        seed in any::<u64>(),
    ) {
        let p = SamplingParams { temperature, top_k, top_p, min_p, seed: Some(seed),
            ..SamplingParams::default() };
        let dist = Sampler::new(p.clone()).distribution(&mut logits.clone(), &[], &[]);
        let s = Sampler::new(p).sample(&mut logits.clone(), &[], &[]);
        if logits.iter().all(|v| v.is_nan() || *v == f32::NEG_INFINITY) {
            prop_assert_eq!(s.token_id, 0);
        } else {
            prop_assert!(dist[s.token_id as usize] > 0.0, "token {} dist {:?}", s.token_id, dist);
            let total: f64 = dist.iter().map(|&d| d as f64).sum();
            prop_assert!((total - 1.0).abs() < 1e-4, "total {}", total);
        }
    }

    #[test]
    fn top_p_set_is_the_minimal_best_first_prefix(
        logits in prop::collection::vec(-6.0f32..6.0, 2..400),
        top_p in 0.01f32..0.99,
        temperature in 0.3f32..2.0,
    ) {
        let p = SamplingParams { temperature, top_p, seed: Some(1), ..SamplingParams::default() };
        let dist = Sampler::new(p).distribution(&mut logits.clone(), &[], &[]);
        let full = softmax(&logits, temperature);
        let kept: Vec<usize> = (0..dist.len()).filter(|&i| dist[i] > 0.0).collect();
        let mass: f64 = kept.iter().map(|&i| full[i]).sum();
        let smallest = kept.iter().map(|&i| full[i]).fold(f64::INFINITY, f64::min);
        // Best first: no dropped token beats a kept one.
        let dropped_max = (0..full.len()).filter(|i| dist[*i] == 0.0)
            .map(|i| full[i]).fold(0.0, f64::max);
        prop_assert!(dropped_max <= smallest + 1e-12);
        // Enough mass, and minimal: without its smallest member it would not be enough.
        prop_assert!(mass >= top_p as f64 - 1e-5, "mass {} < {}", mass, top_p);
        prop_assert!(kept.len() == 1 || mass - smallest < top_p as f64 + 1e-5,
            "not minimal: mass {} smallest {} top_p {}", mass, smallest, top_p);
    }

    #[test]
    fn greedy_is_the_first_argmax(logits in prop::collection::vec(logit_strategy(), 1..500)) {
        let p = SamplingParams { temperature: 0.0, ..SamplingParams::default() };
        let s = Sampler::new(p).sample(&mut logits.clone(), &[], &[]);
        let clean: Vec<f32> =
            logits.iter().map(|&v| if v.is_nan() { f32::NEG_INFINITY } else { v }).collect();
        let max = clean.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let first = clean.iter().position(|&v| v == max).unwrap_or(0);
        prop_assert_eq!(s.token_id as usize, first);
    }

    /// The backends' `argmax_rows` (the CPU twin of the device kernel) is the sampler's
    /// greedy choice, +inf included, so the engine may use either.
    #[test]
    fn backend_argmax_is_the_samplers_greedy_choice(
        logits in prop::collection::vec(
            prop_oneof![10 => logit_strategy(), 1 => Just(f32::INFINITY)], 1..500),
    ) {
        let p = SamplingParams { temperature: 0.0, ..SamplingParams::default() };
        let s = Sampler::new(p).sample(&mut logits.clone(), &[], &[]);
        prop_assert_eq!(qilin::backend::cpu::argmax_row(&logits), s.token_id);
    }
}
