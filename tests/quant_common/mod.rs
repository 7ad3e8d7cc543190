//! Helpers shared by the quantized-model tests (awq_gptq.rs, int_quantize.rs): float
//! copies of a model with some weights replaced, and a teacher-forced comparison of two
//! models along the first one's greedy continuations.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use qilin::engine::load::{load_cpu_engine, EngineOptions};
use qilin::engine::SamplingParams;
use qilin::model::quant::dequantize_row;
use qilin::model::{load_model, WeightTensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::common;

pub fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Every value of a weight, decoded to f32.
pub fn dequantize(t: &WeightTensor) -> Vec<f32> {
    let k = t.row_len();
    let mut out = vec![0f32; t.numel()];
    for (r, dst) in out.chunks_mut(k).enumerate() {
        dequantize_row(t.dtype, t.row(r), dst);
    }
    out
}

/// A copy of the model directory `base` whose tensors named in `replace` hold those f32
/// values (stored as F32); the others keep their bytes.
pub fn float_model(base: &Path, replace: &HashMap<String, Vec<f32>>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(base.join(f), dir.path().join(f)).unwrap();
    }
    let bytes = std::fs::read(base.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f32_bytes: HashMap<&String, Vec<u8>> = replace
        .iter()
        .map(|(k, v)| (k, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let view = match f32_bytes.get(&name) {
            Some(b) => safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                view.shape().to_vec(),
                b,
            )
            .unwrap(),
            None => view,
        };
        tensors.push((name, view));
    }
    safetensors::serialize_to_file(tensors, None, &dir.path().join("model.safetensors")).unwrap();
    dir
}

/// The base model's value of every tensor in `names`, as f32.
pub fn base_values(base: &Path, names: &[String]) -> HashMap<String, Vec<f32>> {
    let model = load_model(base).unwrap();
    names.iter().map(|n| (n.clone(), dequantize(&model.tensors[n]))).collect()
}

/// `base + shuffle(quantized - base)` per tensor: the same error values, placed at
/// random (a seeded permutation). The control for "is this just the error of that
/// size, or something worse?".
pub fn shuffled_error(
    base: &HashMap<String, Vec<f32>>,
    quantized: &HashMap<String, Vec<f32>>,
    seed: u64,
) -> HashMap<String, Vec<f32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut names: Vec<&String> = base.keys().collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let (b, q) = (&base[n], &quantized[n]);
            let mut err: Vec<f32> = b.iter().zip(q).map(|(b, q)| q - b).collect();
            err.shuffle(&mut rng);
            (n.clone(), b.iter().zip(&err).map(|(b, e)| b + e).collect())
        })
        .collect()
}

/// Teacher-forced comparison of `candidate` with `reference` along the reference's
/// greedy continuations of the base fixture's prompts.
#[derive(Debug)]
pub struct Agreement {
    pub positions: usize,
    pub top1_agree: usize,
    /// RMS over positions and the reference's top-5 tokens of the logprob difference.
    pub rms: f32,
    pub max: f32,
    /// Largest reference top1 - top2 logprob margin among positions whose top-1 changed.
    pub max_flipped_margin: f32,
}

impl Agreement {
    pub fn top1_rate(&self) -> f64 {
        self.top1_agree as f64 / self.positions as f64
    }
}

pub const STEPS: usize = 16;

pub fn agreement(
    prompts_from: &Path,
    reference: &Path,
    reference_options: &EngineOptions,
    candidate: &Path,
    candidate_options: &EngineOptions,
) -> Agreement {
    let expected = common::read_expected(&prompts_from.join("expected.json"));
    let (mut reference, _) = load_cpu_engine(reference, reference_options).unwrap();
    let (mut engine, _) = load_cpu_engine(candidate, candidate_options).unwrap();
    let greedy = |max_tokens, top| SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        top_logprobs: Some(top),
        ..SamplingParams::default()
    };
    let mut a =
        Agreement { positions: 0, top1_agree: 0, rms: 0.0, max: 0.0, max_flipped_margin: 0.0 };
    let (mut sq, mut n) = (0f64, 0usize);
    for case in &expected.cases {
        let ref_out = reference.generate(&case.prompt_ids, &greedy(STEPS, 5), |_| {}).unwrap();
        let ref_top = common::our_top_logprobs(&ref_out);
        let requests: Vec<(Vec<u32>, SamplingParams)> = (0..ref_out.output_ids.len())
            .map(|t| {
                let mut p = case.prompt_ids.clone();
                p.extend(&ref_out.output_ids[..t]);
                (p, greedy(1, 20))
            })
            .collect();
        let outs = engine.run_all(&requests, |_, _| {}).unwrap();
        for (t, out) in outs.iter().enumerate() {
            let ours = &common::our_top_logprobs(out)[0];
            let theirs = &ref_top[t];
            a.positions += 1;
            if ours[0].0 == theirs[0].0 {
                a.top1_agree += 1;
            } else {
                a.max_flipped_margin = a.max_flipped_margin.max(theirs[0].1 - theirs[1].1);
            }
            for &(id, lp) in theirs {
                // Outside our top 20: at most our 20th logprob; count that (a bound).
                let ql = ours.iter().find(|x| x.0 == id).map_or(ours[ours.len() - 1].1, |x| x.1);
                let d = (ql - lp).abs();
                sq += (d as f64).powi(2);
                n += 1;
                a.max = a.max.max(d);
            }
        }
    }
    a.rms = (sq / n as f64).sqrt() as f32;
    a
}

pub fn report(label: &str, a: &Agreement) {
    eprintln!(
        "{label}: top-1 {}/{} ({:.1}%), logprob diff rms {:.4} max {:.4}, largest flipped margin {:.4}",
        a.top1_agree,
        a.positions,
        100.0 * a.top1_rate(),
        a.rms,
        a.max,
        a.max_flipped_margin
    );
}
