//! One request from prompt ids to finished text: chunked prefill, then decode steps,
//! sampling, incremental detokenization and stop handling. The continuous-batching
//! engine replaces the single-sequence driver here; the per-token bookkeeping stays.

use serde::Serialize;

use super::output::SeqOutput;
use super::sampler::TokenLogprob;
use super::sampling_params::{InvalidParam, SamplingParams};
use crate::backend::{Backend, Batch, KvCacheShape};
use crate::kv::block_manager::{blocks_for, BlockManager};
use crate::model::forward::Model;
use crate::tokenizer::{Tokenizer, TokenizerError};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("prompt token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("the prompt has {prompt} tokens; this server admits at most {max} (--max-model-len)")]
    PromptTooLong { prompt: usize, max: usize },
    #[error(transparent)]
    InvalidParam(#[from] InvalidParam),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("the KV cache has no room for this sequence")]
    OutOfBlocks,
}

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

/// Wall time of the two phases of a request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    /// Prompt processing up to the first sampled token.
    pub prefill: std::time::Duration,
    /// Every later forward step.
    pub decode: std::time::Duration,
}

pub struct Generator<B: Backend> {
    pub model: Model<B>,
    pub tokenizer: Tokenizer,
    cache: B::KvCache,
    /// Paged blocks with prefix caching: a repeated prompt prefix is not recomputed.
    blocks: BlockManager,
    /// Token ids that end generation (model eos ids).
    eos_ids: Vec<u32>,
    max_model_len: usize,
    /// Most prompt tokens one forward step takes (chunked prefill).
    prefill_chunk: usize,
}

impl<B: Backend> Generator<B> {
    /// Sizes the KV cache for one sequence of `max_model_len` tokens.
    pub fn new(
        model: Model<B>,
        tokenizer: Tokenizer,
        eos_ids: Vec<u32>,
        max_model_len: usize,
        prefill_chunk: usize,
    ) -> Result<Self, crate::backend::BackendError> {
        let c = &model.config;
        let num_blocks = blocks_for(max_model_len);
        let cache = model.backend.alloc_kv_cache(KvCacheShape {
            num_layers: c.num_layers,
            num_blocks,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        })?;
        Ok(Generator {
            model,
            tokenizer,
            cache,
            blocks: BlockManager::new(num_blocks),
            eos_ids,
            max_model_len,
            prefill_chunk: prefill_chunk.max(1),
        })
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Generates a completion of `prompt_ids`; `on_text` receives each text delta as
    /// soon as it is final (never a partial UTF-8 character or a partial stop string).
    pub fn generate(
        &mut self,
        prompt_ids: &[u32],
        params: &SamplingParams,
        mut on_text: impl FnMut(&str),
    ) -> Result<GenerationOutput, GenerateError> {
        params.validate()?;
        self.check_prompt(prompt_ids)?;
        let mut table = Vec::new();
        let result = self.run(prompt_ids, params, &mut table, &mut on_text);
        self.blocks.free(&mut table);
        result
    }

    fn check_prompt(&self, prompt_ids: &[u32]) -> Result<(), GenerateError> {
        if prompt_ids.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let vocab = self.model.config.vocab_size;
        if let Some(&id) = prompt_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(GenerateError::TokenOutOfRange { id, vocab });
        }
        if prompt_ids.len() >= self.max_model_len {
            return Err(GenerateError::PromptTooLong {
                prompt: prompt_ids.len(),
                max: self.max_model_len - 1,
            });
        }
        Ok(())
    }

    fn run(
        &mut self,
        prompt_ids: &[u32],
        params: &SamplingParams,
        table: &mut Vec<u32>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerationOutput, GenerateError> {
        let Generator { model, tokenizer, cache, blocks, eos_ids, max_model_len, prefill_chunk } =
            self;
        let started = std::time::Instant::now();
        let allocation = blocks.allocate(prompt_ids).ok_or(GenerateError::OutOfBlocks)?;
        *table = allocation.block_table;
        let cached_prompt_tokens = allocation.cached_tokens;
        // Runs `all[first_pos..]` (the sequence so far is `all`) through the model and
        // registers the blocks it filled in the prefix cache; logits of the last token.
        let mut step = |all: &[u32], first_pos: usize, table: &mut Vec<u32>, want_logits| {
            if !blocks.append_slot(table, all.len()) {
                return Err(GenerateError::OutOfBlocks);
            }
            let mut batch = Batch::default();
            batch.push_seq(&all[first_pos..], first_pos, table, want_logits);
            let logits = model.forward(&batch, cache);
            blocks.mark_computed(table, all, all.len());
            Ok(logits)
        };
        let mut logits = Vec::new();
        let mut pos = cached_prompt_tokens;
        while pos < prompt_ids.len() {
            let end = (pos + *prefill_chunk).min(prompt_ids.len());
            logits = step(&prompt_ids[..end], pos, table, end == prompt_ids.len())?;
            pos = end;
        }
        let prefill = started.elapsed();
        let decode_started = std::time::Instant::now();
        let mut out = SeqOutput::new(params);
        let mut all_tokens = prompt_ids.to_vec();
        let finish_reason = loop {
            let step_result =
                out.on_logits(tokenizer, eos_ids, &mut logits, prompt_ids, *max_model_len)?;
            if !step_result.delta.is_empty() {
                on_text(&step_result.delta);
            }
            if let Some(reason) = step_result.finished {
                break reason;
            }
            all_tokens.push(step_result.token_id);
            logits = step(&all_tokens, all_tokens.len() - 1, table, true)?;
        };
        Ok(GenerationOutput {
            prompt_ids: prompt_ids.to_vec(),
            output_ids: out.output_ids,
            text: out.text,
            finish_reason,
            logprobs: out.logprobs,
            cached_prompt_tokens,
            timings: Timings { prefill, decode: decode_started.elapsed() },
        })
    }
}
