//! Helpers shared by the integration tests: where the test models are, and how to
//! compare our greedy run with a recorded transformers run.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub mod server;

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The SmolLM2 GGUF: `$QILIN_SMOLLM2_GGUF`, else the one tools/setup installed into
/// `root/.venv`.
pub fn find_smollm2_gguf(root: &Path) -> Option<PathBuf> {
    match std::env::var_os("QILIN_SMOLLM2_GGUF") {
        Some(p) => Some(PathBuf::from(p)),
        None => qilin::model::demo::gguf_in_venv(&root.join(".venv")),
    }
}

/// The SmolLM2 GGUF of this checkout. Panics with a fix-it message when it is missing:
/// a test that needs it must not silently pass.
pub fn smollm2_gguf() -> PathBuf {
    find_smollm2_gguf(&manifest_dir()).unwrap_or_else(|| {
        panic!("SmolLM2 GGUF not found: run tools/setup (or set QILIN_SMOLLM2_GGUF)")
    })
}

/// The fixture model directories (`root/tests/fixtures/models/*`), sorted.
pub fn fixture_models_under(root: &Path) -> Vec<PathBuf> {
    let dir = root.join("tests/fixtures/models");
    let mut dirs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("expected.json").exists())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 4, "expected the fixture models under {}", dir.display());
    dirs
}

/// The fixture model directories of this checkout, sorted.
pub fn fixture_models() -> Vec<PathBuf> {
    fixture_models_under(&manifest_dir())
}

/// Any one fixture model, for tests about files and flags rather than numbers.
pub fn a_fixture_model() -> PathBuf {
    fixture_models().swap_remove(0)
}

/// Per generated token, our top alternatives as (id, logprob).
pub fn our_top_logprobs(out: &qilin::engine::GenerationOutput) -> Vec<Vec<(u32, f32)>> {
    out.logprobs
        .as_ref()
        .expect("logprobs were asked for")
        .iter()
        .map(|s| s.top_logprobs.iter().map(|t| (t.token_id, t.logprob)).collect())
        .collect()
}

#[derive(Debug, Deserialize)]
pub struct Expected {
    pub reference: String,
    pub cases: Vec<Case>,
}

/// One reference run. With `messages`, `prompt` is transformers' rendering of them.
#[derive(Debug, Deserialize)]
pub struct Case {
    pub name: String,
    pub prompt: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<qilin::tokenizer::ChatMessage>>,
    /// Whether the reference encoded `prompt` with the tokenizer's special tokens.
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
    pub prompt_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    pub steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
pub struct Step {
    pub top_logprobs: Vec<RefLogprob>,
    /// top-1 minus top-2 logit in the reference.
    pub margin: f32,
}

#[derive(Debug, Deserialize)]
pub struct RefLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

impl Case {
    /// Greedy settings that replay the reference run: as many tokens as it recorded,
    /// eos ignored, as many top logprobs as it kept.
    pub fn replay_params(&self) -> qilin::engine::SamplingParams {
        qilin::engine::SamplingParams {
            temperature: 0.0,
            max_tokens: self.output_ids.len(),
            ignore_eos: true,
            top_logprobs: Some(self.steps[0].top_logprobs.len()),
            ..qilin::engine::SamplingParams::default()
        }
    }
}

fn yes() -> bool {
    true
}

pub fn read_expected(path: &Path) -> Expected {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// How a greedy run compares with the reference.
pub struct Comparison {
    /// Steps whose tokens agree: all of them, or those before the first step where the
    /// reference's own choice was a near-tie and we picked the other token, after which
    /// the runs legitimately diverge. (Counting the diverging step too made a divergence
    /// at the last step look like full agreement, and the caller then demanded identical
    /// ids: SmolLM2's "raw" case with 8-bit activations, whose step 47 is a near-tie.)
    pub compared: usize,
    pub max_logprob_error: f32,
}

/// Compares our greedy `output_ids` and per-step top logprobs with the reference.
/// Ids must be identical on every step whose reference margin exceeds `min_margin`;
/// the reference's top logprobs must match ours within `logprob_tol`.
pub fn compare_greedy(
    case: &Case,
    output_ids: &[u32],
    our_top: &[Vec<(u32, f32)>],
    min_margin: f32,
    logprob_tol: f32,
) -> Comparison {
    let mut max_err = 0.0f32;
    let mut compared = 0;
    for (i, step) in case.steps.iter().enumerate() {
        let (ours, theirs) = (output_ids.get(i), case.output_ids.get(i));
        let Some(&ours) = ours else {
            panic!(
                "{}: we stopped after {i} tokens, the reference has {}",
                case.name,
                case.output_ids.len()
            );
        };
        let theirs = *theirs.expect("reference steps and ids agree");
        // Every reference alternative must carry (about) the same logprob in our run.
        for r in &step.top_logprobs {
            let Some(&(_, lp)) = our_top[i].iter().find(|(id, _)| *id == r.token_id) else {
                // Only acceptable when it sits at the edge of the top-k set, tied.
                let last = our_top[i].last().map(|x| x.1).unwrap_or(f32::NEG_INFINITY);
                assert!(
                    (r.logprob - last).abs() <= logprob_tol,
                    "{} step {i}: reference token {} (logprob {}) missing from our top {:?}",
                    case.name,
                    r.token_id,
                    r.logprob,
                    our_top[i]
                );
                continue;
            };
            max_err = max_err.max((lp - r.logprob).abs());
        }
        if ours != theirs {
            assert!(
                step.margin <= min_margin,
                "{} step {i}: we chose {ours}, transformers chose {theirs} with a clear margin {}",
                case.name,
                step.margin
            );
            break; // a near-tie broke the other way: the continuations differ from here
        }
        compared += 1;
    }
    assert!(max_err <= logprob_tol, "{}: logprob error {max_err} exceeds {logprob_tol}", case.name);
    Comparison { compared, max_logprob_error: max_err }
}
