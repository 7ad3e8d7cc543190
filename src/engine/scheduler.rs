//! Continuous batching over the paged KV cache: which tokens of which sequences run in
//! the next forward step.
//!
//! Each step (vLLM V1 style):
//! 1. every running sequence with one token left to feed decodes it (oldest first);
//! 2. the rest of the token budget goes to prefill chunks of running sequences, then of
//!    waiting ones in arrival order (chunked prefill), admitting a waiting sequence
//!    while `max_num_seqs` allows and the block manager can hold all of its tokens.
//!
//! A sequence gets blocks for all its tokens when admitted, so only decodes ever need
//! a new block. When one cannot get it, the newest running sequence is preempted by
//! recompute (blocks freed, generated tokens kept, back to the front of the queue)
//! until the block fits; the oldest running sequence therefore always progresses, and
//! `add` rejects any request that could not run alone in the whole pool, so every
//! request finishes. No new sequence is admitted in a step that preempted, so a victim
//! is not re-admitted only to be preempted again on the next step.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use thiserror::Error;

use crate::backend::BLOCK_SIZE;
use crate::engine::sequence::{SeqId, Sequence};
use crate::kv::block_manager::{blocks_for, BlockManager};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Running sequences at most.
    pub max_num_seqs: usize,
    /// Tokens per forward step at most (decodes and prefill chunks together).
    pub max_num_batched_tokens: usize,
    /// Context length: prompts must be shorter, the engine stops sequences at it.
    pub max_model_len: usize,
}

/// Tokens `first_pos..first_pos + len` of one sequence in this step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledChunk {
    pub seq: SeqId,
    pub first_pos: usize,
    pub len: usize,
    /// The chunk reaches the sequence's last token: sample from its logits.
    pub want_logits: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Decodes first, then prefill chunks; at most one chunk per sequence.
    pub chunks: Vec<ScheduledChunk>,
    /// Sequences moved back to the waiting queue this step (their blocks are freed).
    pub preempted: Vec<SeqId>,
}

impl StepPlan {
    pub fn num_tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AddError {
    #[error("prompt of {prompt} tokens does not fit the context of {max} tokens")]
    TooLong { prompt: usize, max: usize },
    #[error("request needs {blocks} KV blocks but the cache only has {total}")]
    NeverFits { blocks: usize, total: usize },
    #[error("empty prompt")]
    EmptyPrompt,
    #[error("sequence id {0} is already scheduled")]
    DuplicateId(SeqId),
}

/// Sequence ids are unique integers from the engine, so a multiplicative hash spreads
/// them well; SipHash made the map lookups most of a 256-sequence step.
#[derive(Clone, Copy, Debug, Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap<V> = HashMap<SeqId, V, BuildHasherDefault<IdHasher>>;

#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    seqs: IdMap<Sequence>,
    /// Running sequences in admission order: the last one is preempted first.
    running: Vec<SeqId>,
    /// Arrival order; preempted sequences go back to the front.
    waiting: VecDeque<SeqId>,
    num_preemptions: u64,
    /// Whether blocks holding generated tokens enter the prefix cache (see
    /// `cache_prompts_only`).
    cache_generated: bool,
}

impl Scheduler {
    /// Limits below 1 are raised to 1, and `max_num_seqs` is capped at
    /// `max_num_batched_tokens` so every running sequence's decode fits one step's budget
    /// (otherwise the newest sequences would never get a turn).
    pub fn new(config: SchedulerConfig, blocks: BlockManager) -> Self {
        let budget = config.max_num_batched_tokens.max(1);
        let config = SchedulerConfig {
            max_num_batched_tokens: budget,
            max_num_seqs: config.max_num_seqs.clamp(1, budget),
            max_model_len: config.max_model_len,
        };
        Scheduler {
            config,
            blocks,
            seqs: IdMap::default(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            num_preemptions: 0,
            cache_generated: true,
        }
    }

    /// Only blocks wholly inside a prompt enter the prefix cache from now on: for a
    /// backend that computes generated tokens with other numerics than prompt tokens
    /// (`Backend::generated_rows_differ`), a later prompt repeating an answer must not
    /// get that answer's K/V from the cache, or it would compute differently with and
    /// without a cache hit. A multi-turn chat still reuses every earlier prompt.
    pub fn cache_prompts_only(&mut self) {
        self.cache_generated = false;
    }

    /// The limits actually in force (after `new`'s adjustments).
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Queues a new request (FCFS). Rejects requests that could never run: the prompt
    /// does not fit the context, or the sequence at its longest needs more blocks than
    /// the whole cache has.
    pub fn add(&mut self, mut seq: Sequence) -> Result<(), AddError> {
        if seq.tokens.is_empty() {
            return Err(AddError::EmptyPrompt);
        }
        if seq.tokens.len() >= self.config.max_model_len {
            return Err(AddError::TooLong {
                prompt: seq.tokens.len(),
                max: self.config.max_model_len,
            });
        }
        let need = blocks_for(seq.max_kv_tokens(self.config.max_model_len));
        let total = self.blocks.num_blocks();
        if need > total {
            return Err(AddError::NeverFits { blocks: need, total });
        }
        if self.seqs.contains_key(&seq.id) {
            return Err(AddError::DuplicateId(seq.id));
        }
        // A caller's leftovers would corrupt the block accounting.
        seq.num_computed = 0;
        seq.block_table.clear();
        self.waiting.push_back(seq.id);
        self.seqs.insert(seq.id, seq);
        Ok(())
    }

    /// Plans the next forward step and allocates the blocks it writes; the chunks' block
    /// tables are in the sequences. Empty only when there is no work.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.config.max_num_batched_tokens;

        // Decodes. Victims are always newer than `i`, so never already in the plan.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(seq) = self.seqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            if !seq.is_decoding() {
                i += 1;
                continue;
            }
            if self.grow_or_preempt(i, &mut plan.preempted) {
                let first_pos = self.seqs[&id].num_computed;
                plan.chunks.push(ScheduledChunk { seq: id, first_pos, len: 1, want_logits: true });
                budget -= 1;
                i += 1;
            }
            // else `id` itself was preempted and `i` now points past the end.
        }

        // Prefill chunks of running sequences: their blocks were allocated at admission.
        for &id in &self.running {
            if budget == 0 {
                break;
            }
            let Some(seq) = self.seqs.get(&id) else { continue };
            if seq.num_uncomputed() > 1 {
                plan.chunks.push(chunk(seq, budget));
                budget -= plan.chunks[plan.chunks.len() - 1].len;
            }
        }

        // Admissions, strictly in queue order: a head that does not fit blocks the rest.
        while plan.preempted.is_empty()
            && budget > 0
            && self.running.len() < self.config.max_num_seqs
        {
            let Some(&id) = self.waiting.front() else { break };
            let Some(seq) = self.seqs.get_mut(&id) else {
                self.waiting.pop_front();
                continue;
            };
            let Some(alloc) = self.blocks.allocate(&seq.tokens) else { break };
            seq.block_table = alloc.block_table;
            seq.num_computed = alloc.cached_tokens;
            self.waiting.pop_front();
            self.running.push(id);
            plan.chunks.push(chunk(seq, budget));
            budget -= plan.chunks[plan.chunks.len() - 1].len;
        }
        plan
    }

    pub fn sequence(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// After the forward step of `plan`: the chunks' tokens now have K/V in the cache,
    /// and each `(seq, token)` sampled from a `want_logits` chunk is appended. Chunks of
    /// sequences finished, aborted or rescheduled since `plan` are skipped, so a stale
    /// or repeated plan does no harm.
    pub fn complete_step(&mut self, plan: &StepPlan, sampled: &[(SeqId, u32)]) {
        for c in &plan.chunks {
            let Some(seq) = self.seqs.get_mut(&c.seq) else { continue };
            let end = c.first_pos + c.len;
            if seq.num_computed != c.first_pos
                || end > seq.tokens.len()
                || seq.block_table.is_empty()
            {
                continue;
            }
            seq.num_computed = end;
            let cacheable = if self.cache_generated { end } else { end.min(seq.prompt_len) };
            self.blocks.mark_computed(&seq.block_table, &seq.tokens, cacheable);
        }
        for &(id, token) in sampled {
            let Some(seq) = self.seqs.get_mut(&id) else { continue };
            // Only a sequence whose every token is fed has logits to sample from.
            if seq.num_uncomputed() == 0 && !seq.block_table.is_empty() {
                seq.tokens.push(token);
            }
        }
        // A want_logits chunk that got no token (the engine dropped it) would leave
        // nothing to feed and stall the sequence: feed its last token again instead. Its
        // K/V slot is simply rewritten with the same values.
        for c in plan.chunks.iter().filter(|c| c.want_logits) {
            if let Some(seq) = self.seqs.get_mut(&c.seq) {
                if seq.num_uncomputed() == 0 && !seq.block_table.is_empty() {
                    seq.num_computed -= 1;
                }
            }
        }
    }

    /// Removes a running or waiting sequence, frees its blocks and returns it.
    pub fn finish(&mut self, id: SeqId) -> Option<Sequence> {
        let mut seq = self.seqs.remove(&id)?;
        if let Some(pos) = self.running.iter().position(|&r| r == id) {
            self.running.remove(pos);
        } else if let Some(pos) = self.waiting.iter().position(|&w| w == id) {
            self.waiting.remove(pos);
        }
        self.blocks.free(&mut seq.block_table);
        Some(seq)
    }

    /// `finish` for a client abort: whether the sequence was known.
    pub fn abort(&mut self, id: SeqId) -> bool {
        self.finish(id).is_some()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Running sequence ids, oldest admission first.
    pub fn running_ids(&self) -> &[SeqId] {
        &self.running
    }

    /// Waiting sequence ids, next to be admitted first.
    pub fn waiting_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.waiting.iter().copied()
    }

    /// Checks the bookkeeping: every sequence is exactly once in a queue, waiting ones
    /// hold no blocks, running ones hold the blocks for their computed tokens, and each
    /// block's reference count equals the number of tables holding it (nothing leaked,
    /// nothing freed twice). Err names the first problem. For tests and debugging.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.blocks.check_consistency()?;
        if self.running.len() > self.config.max_num_seqs {
            return Err(format!("{} running > max_num_seqs", self.running.len()));
        }
        if self.running.len() + self.waiting.len() != self.seqs.len() {
            return Err("queues and sequence map disagree".into());
        }
        let mut holders: HashMap<u32, u32> = HashMap::new();
        for &id in &self.running {
            let s = self.seqs.get(&id).ok_or(format!("running {id} unknown"))?;
            if s.num_computed > s.tokens.len() || s.block_table.len() * BLOCK_SIZE < s.num_computed
            {
                return Err(format!("seq {id}: computed {} of {}", s.num_computed, s.tokens.len()));
            }
            for &b in &s.block_table {
                *holders.entry(b).or_default() += 1;
            }
        }
        for &id in &self.waiting {
            let s = self.seqs.get(&id).ok_or(format!("waiting {id} unknown"))?;
            if s.num_computed != 0 || !s.block_table.is_empty() {
                return Err(format!("waiting seq {id} holds cache state"));
            }
        }
        for (&b, &n) in &holders {
            if self.blocks.ref_count(b) != Some(n) {
                return Err(format!(
                    "block {b}: {n} holders, ref_count {:?}",
                    self.blocks.ref_count(b)
                ));
            }
        }
        let live = self.blocks.num_blocks() - self.blocks.num_free_blocks();
        if live != holders.len() {
            return Err(format!("{live} live blocks but {} held", holders.len()));
        }
        Ok(())
    }

    /// Gives `running[i]` the block for its next decode slot, preempting the newest
    /// running sequences until it fits. False when `running[i]` itself had to go.
    fn grow_or_preempt(&mut self, i: usize, preempted: &mut Vec<SeqId>) -> bool {
        let id = self.running[i];
        loop {
            if let Some(seq) = self.seqs.get_mut(&id) {
                let total = seq.num_computed + 1;
                if self.blocks.append_slot(&mut seq.block_table, total) {
                    return true;
                }
            }
            let Some(victim) = self.running.pop() else { return false };
            self.preempt(victim);
            preempted.push(victim);
            if victim == id {
                return false;
            }
        }
    }

    /// Recompute preemption: frees the blocks, keeps the tokens, requeues at the front.
    fn preempt(&mut self, id: SeqId) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            self.blocks.free(&mut seq.block_table);
            seq.num_computed = 0;
            self.waiting.push_front(id);
            self.num_preemptions += 1;
        }
    }
}

/// The next chunk of `seq`, at most `budget` tokens.
fn chunk(seq: &Sequence, budget: usize) -> ScheduledChunk {
    let len = seq.num_uncomputed().min(budget);
    ScheduledChunk {
        seq: seq.id,
        first_pos: seq.num_computed,
        len,
        want_logits: seq.num_computed + len == seq.tokens.len(),
    }
}
