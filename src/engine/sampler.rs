//! Sampler: logits -> next token (owned by the sampling work item). STUB interface.

use super::sampling_params::SamplingParams;

/// A token and its log-probability under the model (log-softmax of the raw logits).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

/// The outcome of one sampling step.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token_id: u32,
    /// Log-probability of `token_id` under the raw model distribution.
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens under the raw distribution, best first.
    pub top_logprobs: Vec<TokenLogprob>,
}

pub struct Sampler {
    params: SamplingParams,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler { params }
    }

    /// Picks the next token. `logits`: [vocab] raw logits (may be modified);
    /// `prompt`: the prompt ids; `output`: ids generated so far (for penalties).
    pub fn sample(&mut self, logits: &mut [f32], prompt: &[u32], output: &[u32]) -> Sampled {
        let _ = (prompt, output, &self.params);
        let (token_id, _) =
            logits.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 {
                    (i, l)
                } else {
                    best
                }
            });
        Sampled { token_id: token_id as u32, logprob: 0.0, top_logprobs: Vec::new() }
    }
}
