//! What a request asks of the sampler, validated once at the boundary.

use serde::{Deserialize, Serialize};

/// Per-request sampling settings. Defaults are OpenAI's (temperature 1, top_p 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
    /// 0.0 disables min-p.
    pub min_p: f32,
    /// 1.0 disables it; applied to every token seen in prompt or output (HF semantics).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated (OpenAI semantics).
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of tokens already generated.
    pub frequency_penalty: f32,
    /// Same seed, same prompt, same output. None: seeded from the OS.
    pub seed: Option<u64>,
    pub max_tokens: usize,
    /// Generation ends when the text contains one of these; the stop string is not returned.
    pub stop: Vec<String>,
    /// Generation ends after one of these tokens (besides the model's eos ids).
    pub stop_token_ids: Vec<u32>,
    /// Keep going past eos (benchmarks).
    pub ignore_eos: bool,
    /// Return the logprob of each sampled token and this many top alternatives.
    pub top_logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 256,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            top_logprobs: None,
        }
    }
}

/// The most alternatives a request may ask for (OpenAI allows 20).
pub const MAX_TOP_LOGPROBS: usize = 20;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid `{param}`: {message}")]
pub struct InvalidParam {
    pub param: &'static str,
    pub message: String,
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Rejects values that make no sense, naming the parameter (for 400 responses).
    pub fn validate(&self) -> Result<(), InvalidParam> {
        let bad = |param, message: String| Err(InvalidParam { param, message });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", format!("must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(
                "repetition_penalty",
                format!("must be > 0, got {}", self.repetition_penalty),
            );
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad(
                "presence_penalty",
                format!("must be in [-2, 2], got {}", self.presence_penalty),
            );
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad(
                "frequency_penalty",
                format!("must be in [-2, 2], got {}", self.frequency_penalty),
            );
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1".into());
        }
        if let Some(k) = self.top_logprobs {
            if k > MAX_TOP_LOGPROBS {
                return bad("top_logprobs", format!("at most {MAX_TOP_LOGPROBS}, got {k}"));
            }
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop", "stop strings must not be empty".into());
        }
        Ok(())
    }
}
