//! `qilin bench throughput`: offline throughput in the spirit of vLLM's
//! `benchmark_throughput.py` with its random dataset: N requests of random token ids
//! (seeded), each generating exactly its output length (eos ignored), all submitted at
//! once; reports requests/s, output tok/s and total tok/s.

use std::time::Instant;

use anyhow::bail;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::backend::Backend;
use crate::engine::{Engine, SamplingParams};

/// A length or an inclusive range `A:B` to draw from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LenRange {
    pub min: usize,
    pub max: usize,
}

impl std::str::FromStr for LenRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let parse = |t: &str| {
            t.trim().parse::<usize>().map_err(|_| format!("`{s}` is not a length or A:B"))
        };
        let (min, max) = match s.split_once(':') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if min == 0 || min > max {
            return Err(format!("`{s}`: lengths must be positive and A <= B"));
        }
        Ok(LenRange { min, max })
    }
}

#[derive(Debug, Serialize)]
pub struct ThroughputReport {
    pub num_requests: usize,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub elapsed_s: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub total_tokens_per_s: f64,
}

pub fn run<B: Backend>(
    engine: &mut Engine<B>,
    num_prompts: usize,
    input: LenRange,
    output: LenRange,
    seed: u64,
) -> anyhow::Result<ThroughputReport> {
    if num_prompts == 0 {
        bail!("--num-prompts must be at least 1");
    }
    let longest = input.max + output.max;
    if longest > engine.max_model_len() {
        bail!(
            "input + output length ({longest}) exceeds --max-model-len ({})",
            engine.max_model_len()
        );
    }
    let vocab = engine.model.config.vocab_size as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let requests: Vec<(Vec<u32>, SamplingParams)> = (0..num_prompts)
        .map(|_| {
            let len = rng.random_range(input.min..=input.max);
            let prompt = (0..len).map(|_| rng.random_range(0..vocab)).collect();
            let params = SamplingParams {
                temperature: 0.0,
                max_tokens: rng.random_range(output.min..=output.max),
                ignore_eos: true,
                ..SamplingParams::default()
            };
            (prompt, params)
        })
        .collect();
    let started = Instant::now();
    let outputs = engine.run_all(&requests, |_, _| {})?;
    let elapsed_s = started.elapsed().as_secs_f64();
    let prompt_tokens: usize = requests.iter().map(|(p, _)| p.len()).sum();
    let output_tokens: usize = outputs.iter().map(|o| o.output_ids.len()).sum();
    Ok(ThroughputReport {
        num_requests: num_prompts,
        prompt_tokens,
        output_tokens,
        elapsed_s,
        requests_per_s: num_prompts as f64 / elapsed_s,
        output_tokens_per_s: output_tokens as f64 / elapsed_s,
        total_tokens_per_s: (prompt_tokens + output_tokens) as f64 / elapsed_s,
    })
}
