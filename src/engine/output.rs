//! One sequence's output as it grows: sampling from its logits, incremental
//! detokenization, stop tokens and stop strings, logprobs, and the finish decision.
//! The same bookkeeping serves a lone request and a sequence in a batch.

use serde::Serialize;

use super::sampler::{Sampler, TokenLogprob};
use super::sampling_params::SamplingParams;
use super::stop::StopMatcher;
use crate::backend::{PenaltyBatch, RowSampling};
use crate::tokenizer::{DecodeState, Tokenizer, TokenizerError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An eos / stop token or a stop string.
    Stop,
    /// max_tokens or the context limit.
    Length,
}

/// The sampled token of one step with its logprob and the top alternatives.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StepLogprobs {
    pub token_id: u32,
    pub logprob: f32,
    pub top_logprobs: Vec<TokenLogprob>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GenerationOutput {
    pub prompt_ids: Vec<u32>,
    /// Every generated token, including a final eos / stop token.
    pub output_ids: Vec<u32>,
    /// The text of `output_ids` without special tokens, cut before a stop string.
    pub text: String,
    pub finish_reason: FinishReason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<StepLogprobs>>,
    /// Prompt tokens whose K/V came from the prefix cache instead of being computed.
    #[serde(skip)]
    pub cached_prompt_tokens: usize,
    #[serde(skip)]
    pub timings: Timings,
}

/// Wall time of the phases of a request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    /// From admission to the first step that worked on it (vLLM's queue time).
    pub queued: std::time::Duration,
    /// From admission to the first sampled token (includes `queued`).
    pub prefill: std::time::Duration,
    /// Every later forward step.
    pub decode: std::time::Duration,
}

/// What one sampled token did to the output.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenStep {
    pub token_id: u32,
    /// Text that is now final (never part of a UTF-8 character or of a stop string).
    pub delta: String,
    /// Set when this token ended the sequence.
    pub finished: Option<FinishReason>,
    /// The token's logprob and top alternatives, when the request asked for them.
    pub logprobs: Option<StepLogprobs>,
}

pub struct SeqOutput {
    params: SamplingParams,
    sampler: Sampler,
    decoder: DecodeState,
    stop: StopMatcher,
    /// Every generated token, including a final eos / stop token.
    pub output_ids: Vec<u32>,
    /// The text of `output_ids` without special tokens, cut before a stop string.
    pub text: String,
    pub logprobs: Option<Vec<StepLogprobs>>,
    pub finished: Option<FinishReason>,
}

impl SeqOutput {
    pub fn new(params: &SamplingParams) -> Self {
        SeqOutput {
            sampler: Sampler::new(params.clone()),
            decoder: DecodeState::new(true),
            stop: StopMatcher::new(&params.stop),
            output_ids: Vec::new(),
            text: String::new(),
            logprobs: params.top_logprobs.map(|_| Vec::new()),
            finished: None,
            params: params.clone(),
        }
    }

    /// The host sampler's next token from `logits` (`[vocab]`, modified), its logprobs
    /// recorded when asked; `on_token` with it finishes the step. It touches this
    /// sequence's sampler and logprobs only, so a step's rows may be sampled in parallel.
    pub fn sample_logits(&mut self, logits: &mut [f32], prompt: &[u32]) -> u32 {
        let sampled = self.sampler.sample(logits, prompt, &self.output_ids);
        let id = sampled.token_id;
        if let Some(lp) = self.logprobs.as_mut() {
            lp.push(StepLogprobs {
                token_id: id,
                logprob: sampled.logprob,
                top_logprobs: sampled.top_logprobs,
            });
        }
        id
    }

    /// Whether the next token is the plain argmax of the logits with nothing else read
    /// from them (`Sampler::is_plain_argmax`): then `on_token` with the backend's
    /// `argmax_rows` choice does what `sample_logits` would.
    pub fn wants_only_argmax(&self, prompt: &[u32]) -> bool {
        self.sampler.is_plain_argmax(prompt, &self.output_ids)
    }

    /// Whether the next token may be sampled wherever the logits are, from a uniform
    /// drawn here (`Sampler::device_eligible`; with penalties only when
    /// `device_penalties`): then `on_token` with the backend's `sample_rows` choice for
    /// `device_row()` (`sample_rows_penalized` with `penalty_row`'s row when penalties are
    /// in force) does what `sample_logits` would, up to the penalised logits' rounding to
    /// bf16.
    pub fn device_eligible(&self, prompt: &[u32], device_penalties: bool) -> bool {
        self.sampler.device_eligible(prompt, &self.output_ids, device_penalties)
    }

    /// Appends this step's penalties row to `batch` (`Sampler::penalty_row`).
    pub fn penalty_row(&mut self, prompt: &[u32], batch: &mut PenaltyBatch) {
        self.sampler.penalty_row(prompt, &self.output_ids, batch);
    }

    /// This step's `Backend::sample_rows` row; consumes the step's draw
    /// (`Sampler::device_row`).
    pub fn device_row(&mut self) -> RowSampling {
        self.sampler.device_row()
    }

    /// Appends the chosen token (`sample_logits`'s, or the backend's argmax or device
    /// sample when `wants_only_argmax` or `device_eligible` said so) and decides whether
    /// the sequence is finished. `context_limit`: the most tokens (prompt + output) the
    /// sequence may hold.
    pub fn on_token(
        &mut self,
        tokenizer: &Tokenizer,
        eos_ids: &[u32],
        id: u32,
        prompt: &[u32],
        context_limit: usize,
    ) -> Result<TokenStep, TokenizerError> {
        self.output_ids.push(id);
        let params = &self.params;
        let mut delta = String::new();
        let finished = if (!params.ignore_eos && eos_ids.contains(&id))
            || params.stop_token_ids.contains(&id)
        {
            self.flush(tokenizer, &mut delta)?;
            Some(FinishReason::Stop)
        } else {
            let outcome = self.stop.push(&self.decoder.push(tokenizer, id)?);
            delta.push_str(&outcome.emit);
            if outcome.stopped {
                Some(FinishReason::Stop) // the held-back text is the stop string: dropped
            } else if self.output_ids.len() >= params.max_tokens
                || prompt.len() + self.output_ids.len() >= context_limit
            {
                self.flush(tokenizer, &mut delta)?;
                Some(FinishReason::Length)
            } else {
                None
            }
        };
        self.text.push_str(&delta);
        self.finished = finished;
        let logprobs = self.logprobs.as_ref().and_then(|l| l.last().cloned());
        Ok(TokenStep { token_id: id, delta, finished, logprobs })
    }

    /// End of stream without a stop string: release what the decoder and the stop
    /// matcher still hold.
    fn flush(&mut self, tokenizer: &Tokenizer, delta: &mut String) -> Result<(), TokenizerError> {
        let outcome = self.stop.push(&self.decoder.finish(tokenizer)?);
        delta.push_str(&outcome.emit);
        if !outcome.stopped {
            delta.push_str(&self.stop.finish());
        }
        Ok(())
    }
}
