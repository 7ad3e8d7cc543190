//! The engine loop over many sequences: schedule -> build the batch -> one forward
//! step -> sample each sequence that produced logits -> emit events. One owner (the
//! engine thread, or a caller driving `step`) holds model, KV cache and scheduler.

use std::collections::HashMap;
use std::time::Instant;

use rayon::prelude::*;

use super::output::{FinishReason, GenerationOutput, SeqOutput, Timings, TokenStep};
use super::runner::build_batch;
use super::sampling_params::InvalidParam;
use super::sampling_params::SamplingParams;
use super::scheduler::{AddError, Scheduler, SchedulerConfig};
use super::sequence::{SeqId, Sequence};
use crate::backend::{Backend, BackendError, KvCacheShape, PenaltyBatch, RowSampling};
use crate::kv::BlockManager;
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
    #[error("the engine stopped making progress before every request finished")]
    Stalled,
    #[error("request rejected: {0}")]
    Rejected(String),
}

/// What a step did for one sequence.
#[derive(Debug)]
pub enum EngineEvent {
    /// A token was sampled; `step.delta` is the text that became final with it.
    Token { seq: SeqId, step: TokenStep },
    /// The sequence ended (its last token was reported just before).
    Finished { seq: SeqId, output: Box<GenerationOutput> },
}

struct SeqState {
    output: SeqOutput,
    added: Instant,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    cached_prompt_tokens: Option<usize>,
}

pub struct Engine<B: Backend> {
    pub model: Model<B>,
    pub tokenizer: Tokenizer,
    cache: B::KvCache,
    scheduler: Scheduler,
    states: HashMap<SeqId, SeqState>,
    eos_ids: Vec<u32>,
    max_model_len: usize,
    next_id: SeqId,
    /// The host sampler's logits, `[n, vocab]`, kept between steps (`forward_into`).
    host_logits: Vec<f32>,
    /// The device path's penalties, kept between steps for their capacity.
    penalties: PenaltyBatch,
}

/// The host sampler's token for each of `wanting`'s logits rows (`[wanting.len(), vocab]`
/// in `logits`, modified), in that order; 0 for a sequence no longer here (its row is
/// skipped). Rows are sampled in parallel: each sequence's sampler and RNG are its own, so
/// the order changes nothing, and one row of Qwen2.5's 152,064 logits takes ~0.28 ms with
/// its default top-k, top-p and repetition penalty (benches/sampler.rs): 18 ms at batch
/// 64 one after another.
fn sample_on_host(
    states: &mut HashMap<SeqId, SeqState>,
    scheduler: &Scheduler,
    wanting: &[SeqId],
    logits: &mut [f32],
    vocab: usize,
) -> Vec<u32> {
    let row_of: HashMap<SeqId, usize> = wanting.iter().enumerate().map(|(i, &s)| (s, i)).collect();
    debug_assert_eq!(row_of.len(), wanting.len(), "a sequence twice in one step");
    let mut rows: Vec<Option<&mut [f32]>> = logits.chunks_mut(vocab.max(1)).map(Some).collect();
    let mut jobs = Vec::with_capacity(wanting.len());
    for (seq, state) in states.iter_mut() {
        let Some(&i) = row_of.get(seq) else { continue };
        let (Some(row), Some(sequence)) =
            (rows.get_mut(i).and_then(Option::take), scheduler.sequence(*seq))
        else {
            continue;
        };
        jobs.push((i, &mut state.output, row, &sequence.tokens[..sequence.prompt_len]));
    }
    let chosen: Vec<(usize, u32)> = jobs
        .into_par_iter()
        .map(|(i, output, row, prompt)| (i, output.sample_logits(row, prompt)))
        .collect();
    let mut ids = vec![0u32; wanting.len()];
    for (i, id) in chosen {
        ids[i] = id;
    }
    ids
}

impl<B: Backend> Engine<B> {
    /// `num_blocks` KV blocks of `BLOCK_SIZE` tokens are allocated up front.
    pub fn new(
        model: Model<B>,
        tokenizer: Tokenizer,
        eos_ids: Vec<u32>,
        config: SchedulerConfig,
        num_blocks: usize,
    ) -> Result<Self, BackendError> {
        let c = &model.config;
        let cache = model.backend.alloc_kv_cache(KvCacheShape {
            num_layers: c.num_layers,
            num_blocks,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        })?;
        let max_model_len = config.max_model_len;
        let mut scheduler = Scheduler::new(config, BlockManager::new(num_blocks));
        if model.backend.generated_rows_differ() {
            scheduler.cache_prompts_only();
        }
        Ok(Engine {
            model,
            tokenizer,
            cache,
            scheduler,
            states: HashMap::new(),
            eos_ids,
            max_model_len,
            next_id: 0,
            host_logits: Vec::new(),
            penalties: PenaltyBatch::default(),
        })
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    pub fn has_work(&self) -> bool {
        self.scheduler.has_work()
    }

    /// Queues a request; errors are the caller's (bad prompt, bad parameters, too long).
    pub fn add_request(
        &mut self,
        prompt_ids: &[u32],
        params: &SamplingParams,
    ) -> Result<SeqId, GenerateError> {
        params.validate()?;
        let vocab = self.model.config.vocab_size;
        if let Some(&id) = prompt_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(GenerateError::TokenOutOfRange { id, vocab });
        }
        let id = self.next_id;
        self.next_id += 1;
        self.scheduler.add(Sequence::new(id, prompt_ids.to_vec(), params.max_tokens)).map_err(
            |e| match e {
                AddError::EmptyPrompt => GenerateError::EmptyPrompt,
                AddError::TooLong { prompt, max } => {
                    GenerateError::PromptTooLong { prompt, max: max - 1 }
                }
                other => GenerateError::Rejected(other.to_string()),
            },
        )?;
        self.states.insert(
            id,
            SeqState {
                output: SeqOutput::new(params),
                added: Instant::now(),
                scheduled: None,
                first_token: None,
                cached_prompt_tokens: None,
            },
        );
        Ok(id)
    }

    /// Drops a sequence (client gone); its blocks are free for the next step.
    pub fn abort(&mut self, id: SeqId) -> bool {
        self.states.remove(&id);
        self.scheduler.abort(id)
    }

    /// One engine step. Returns the events of every sequence that advanced.
    pub fn step(&mut self) -> Result<Vec<EngineEvent>, GenerateError> {
        let plan = self.scheduler.schedule();
        let mut events = Vec::new();
        if plan.chunks.is_empty() {
            return Ok(events);
        }
        for chunk in &plan.chunks {
            if let Some(state) = self.states.get_mut(&chunk.seq) {
                state.cached_prompt_tokens.get_or_insert(chunk.first_pos);
                state.scheduled.get_or_insert_with(Instant::now);
            }
        }
        let batch = build_batch(&plan, &self.scheduler);
        // When every sampling sequence needs nothing but its token (no logprobs; no
        // penalties unless the backend applies them, `Backend::device_penalties`), the
        // backend chooses where the logits are and only the ids come back (on a GPU,
        // `[n, vocab]` logits to the host cost more than the step itself at large batches):
        // the plain argmax when all are greedy, else `sample_rows` with each request's draw
        // taken here from its own RNG, after its penalties (distinct prompt + output ids
        // kept by its sampler: O(distinct ids) per row and step, a copy). One sequence
        // needing the host sampler sends the whole step there.
        let wants = |pred: &dyn Fn(&SeqOutput, &[u32]) -> bool| {
            plan.chunks.iter().filter(|c| c.want_logits).all(|c| {
                match (self.states.get(&c.seq), self.scheduler.sequence(c.seq)) {
                    (Some(state), Some(seq)) => pred(&state.output, &seq.tokens[..seq.prompt_len]),
                    _ => true, // gone: its row is skipped below
                }
            })
        };
        let argmax_only = wants(&|output, prompt| output.wants_only_argmax(prompt));
        let device_penalties = self.model.backend.device_penalties();
        let on_device = argmax_only
            || wants(&|output, prompt| output.device_eligible(prompt, device_penalties));
        let vocab = self.model.config.vocab_size;
        let (logits, ids) = if argmax_only {
            (Vec::new(), self.model.forward_argmax(&batch, &mut self.cache))
        } else if on_device {
            let mut penalties = std::mem::take(&mut self.penalties);
            penalties.clear();
            let rows: Vec<RowSampling> = (plan.chunks.iter().filter(|c| c.want_logits))
                .map(|c| match (self.states.get_mut(&c.seq), self.scheduler.sequence(c.seq)) {
                    (Some(state), Some(seq)) => {
                        if device_penalties {
                            state.output.penalty_row(&seq.tokens[..seq.prompt_len], &mut penalties);
                        } else {
                            penalties.push_none();
                        }
                        state.output.device_row()
                    }
                    _ => {
                        penalties.push_none();
                        RowSampling { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, u: 0.0 }
                    }
                })
                .collect();
            let ids = self.model.forward_sample(&batch, &mut self.cache, &rows, &penalties);
            self.penalties = penalties;
            (Vec::new(), ids)
        } else {
            // One buffer across steps: `[n, vocab]` fresh pages per step cost more than
            // the copy into them.
            let mut logits = std::mem::take(&mut self.host_logits);
            self.model.forward_into(&batch, &mut self.cache, &mut logits);
            let wanting: Vec<SeqId> =
                plan.chunks.iter().filter(|c| c.want_logits).map(|c| c.seq).collect();
            let ids =
                sample_on_host(&mut self.states, &self.scheduler, &wanting, &mut logits, vocab);
            (logits, ids)
        };
        let mut ids = ids.into_iter();
        let mut sampled = Vec::new();
        let mut finished = Vec::new();
        let wanting = plan.chunks.iter().filter(|c| c.want_logits);
        for chunk in wanting {
            // One id per wanting chunk, in order, whether or not its sequence is still here.
            let Some(id) = ids.next() else { break };
            let (Some(state), Some(seq)) =
                (self.states.get_mut(&chunk.seq), self.scheduler.sequence(chunk.seq))
            else {
                continue;
            };
            let prompt = &seq.tokens[..seq.prompt_len];
            debug_assert!(
                !argmax_only || state.output.wants_only_argmax(prompt),
                "argmax for a sampling step"
            );
            let step = state.output.on_token(
                &self.tokenizer,
                &self.eos_ids,
                id,
                prompt,
                self.max_model_len,
            )?;
            state.first_token.get_or_insert_with(Instant::now);
            sampled.push((chunk.seq, step.token_id));
            if step.finished.is_some() {
                finished.push(chunk.seq);
            }
            events.push(EngineEvent::Token { seq: chunk.seq, step });
        }
        self.host_logits = logits;
        self.scheduler.complete_step(&plan, &sampled);
        for seq in finished {
            let (Some(mut sequence), Some(state)) =
                (self.scheduler.finish(seq), self.states.remove(&seq))
            else {
                continue;
            };
            sequence.tokens.truncate(sequence.prompt_len);
            let output = state.into_output(sequence.tokens);
            events.push(EngineEvent::Finished { seq, output: Box::new(output) });
        }
        Ok(events)
    }

    /// Runs one request alone to completion; `on_text` receives each text delta as
    /// soon as it is final (never a partial UTF-8 character or a partial stop string).
    pub fn generate(
        &mut self,
        prompt_ids: &[u32],
        params: &SamplingParams,
        mut on_text: impl FnMut(&str),
    ) -> Result<GenerationOutput, GenerateError> {
        let request = [(prompt_ids.to_vec(), params.clone())];
        let mut outputs = self.run_all(&request, |_, event| {
            if let EngineEvent::Token { step, .. } = event {
                if !step.delta.is_empty() {
                    on_text(&step.delta);
                }
            }
        })?;
        outputs.pop().ok_or(GenerateError::Stalled)
    }

    /// Runs requests concurrently to completion; outputs in input order. `on_event`
    /// sees every event as it happens (request index, event).
    pub fn run_all(
        &mut self,
        requests: &[(Vec<u32>, SamplingParams)],
        mut on_event: impl FnMut(usize, &EngineEvent),
    ) -> Result<Vec<GenerationOutput>, GenerateError> {
        let mut index = HashMap::new();
        for (i, (prompt, params)) in requests.iter().enumerate() {
            index.insert(self.add_request(prompt, params)?, i);
        }
        let mut outputs: Vec<Option<GenerationOutput>> = vec![None; requests.len()];
        let mut remaining = requests.len();
        while remaining > 0 {
            let events = self.step()?;
            if events.is_empty() && !self.has_work() {
                break;
            }
            for event in events {
                let seq = match &event {
                    EngineEvent::Token { seq, .. } | EngineEvent::Finished { seq, .. } => *seq,
                };
                let Some(&i) = index.get(&seq) else { continue };
                on_event(i, &event);
                if let EngineEvent::Finished { output, .. } = event {
                    outputs[i] = Some(*output);
                    remaining -= 1;
                }
            }
        }
        outputs.into_iter().map(|o| o.ok_or(GenerateError::Stalled)).collect()
    }
}

impl SeqState {
    fn into_output(self, prompt_ids: Vec<u32>) -> GenerationOutput {
        let now = Instant::now();
        let first = self.first_token.unwrap_or(now);
        GenerationOutput {
            finish_reason: self.output.finished.unwrap_or(FinishReason::Length),
            prompt_ids,
            output_ids: self.output.output_ids,
            text: self.output.text,
            logprobs: self.output.logprobs,
            cached_prompt_tokens: self.cached_prompt_tokens.unwrap_or(0),
            timings: Timings {
                queued: self.scheduled.unwrap_or(first) - self.added,
                prefill: first - self.added,
                decode: now - first,
            },
        }
    }
}
