//! The continuous-batching scheduler driven by a simulated engine (no model): after
//! each `schedule()` the simulation samples a token for every `want_logits` chunk,
//! calls `complete_step`, and finishes sequences that reached `max_tokens` or the
//! context length. Every step checks the plan against the policy and the scheduler's
//! bookkeeping against the block manager's reference counts.
//!
//! The fake token at position p of sequence s is a fixed function of (s, p), so a run
//! with preemptions must end with exactly the tokens a run without them would produce.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use qilin::engine::scheduler::{AddError, Scheduler, SchedulerConfig, StepPlan};
use qilin::engine::sequence::{SeqId, Sequence};
use qilin::kv::BlockManager;

const BLOCK: usize = 16;

fn fake_token(id: SeqId, pos: usize) -> u32 {
    (id as u32).wrapping_mul(7919).wrapping_add(pos as u32 * 31) % 50_000
}

fn config(seqs: usize, budget: usize, model_len: usize) -> SchedulerConfig {
    SchedulerConfig { max_num_seqs: seqs, max_num_batched_tokens: budget, max_model_len: model_len }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| seed * 10_000 + i).collect()
}

/// A simulated engine around one scheduler.
struct Sim {
    s: Scheduler,
    /// Finished sequences by id (those aborted are not here).
    done: HashMap<SeqId, Sequence>,
    steps: usize,
}

impl Sim {
    fn new(cfg: SchedulerConfig, num_blocks: usize) -> Self {
        Sim {
            s: Scheduler::new(cfg, BlockManager::new(num_blocks)),
            done: HashMap::new(),
            steps: 0,
        }
    }

    /// One engine step; panics (test failure) on any policy or bookkeeping violation.
    fn step(&mut self) -> StepPlan {
        let cfg = self.s.config().clone();
        let decoding: Vec<SeqId> = self
            .s
            .running_ids()
            .iter()
            .copied()
            .filter(|&id| self.s.sequence(id).is_some_and(|q| q.is_decoding()))
            .collect();
        let plan = self.s.schedule();
        self.steps += 1;
        assert!(plan.num_tokens() <= cfg.max_num_batched_tokens, "token budget exceeded");
        assert!(plan.chunks.len() <= cfg.max_num_seqs, "more chunks than max_num_seqs");
        assert!(self.s.num_running() <= cfg.max_num_seqs);
        assert_eq!(plan.is_empty(), !self.s.has_work(), "work left but nothing scheduled");
        let mut seen = HashSet::new();
        for (k, c) in plan.chunks.iter().enumerate() {
            assert!(seen.insert(c.seq), "two chunks for seq {}", c.seq);
            assert!(c.len > 0);
            let q = self.s.sequence(c.seq).expect("scheduled seq exists");
            assert!(self.s.running_ids().contains(&c.seq), "scheduled seq is running");
            assert_eq!(c.first_pos, q.num_computed);
            let end = c.first_pos + c.len;
            assert!(end <= q.tokens.len());
            assert_eq!(c.want_logits, end == q.tokens.len());
            assert!(q.block_table.len() * BLOCK >= end, "block table covers the chunk");
            // Decodes first: the first chunks are exactly the surviving decoders.
            let is_decode = decoding.contains(&c.seq);
            let n_decodes = decoding.iter().filter(|id| !plan.preempted.contains(id)).count();
            assert_eq!(is_decode, k < n_decodes, "decodes must precede prefills");
        }
        // Every decoding sequence gets its token unless preempted.
        for id in &decoding {
            assert!(seen.contains(id) || plan.preempted.contains(id), "seq {id} skipped a decode");
        }
        for id in &plan.preempted {
            assert!(!seen.contains(id), "preempted seq {id} is in the plan");
            assert_eq!(self.s.sequence(*id).map(|q| q.num_computed), Some(0));
        }

        let sampled: Vec<(SeqId, u32)> = plan
            .chunks
            .iter()
            .filter(|c| c.want_logits)
            .map(|c| (c.seq, fake_token(c.seq, c.first_pos + c.len)))
            .collect();
        self.s.complete_step(&plan, &sampled);
        for &(id, _) in &sampled {
            let q = self.s.sequence(id).expect("sampled seq exists");
            if q.num_generated() >= q.max_tokens || q.tokens.len() >= cfg.max_model_len {
                let q = self.s.finish(id).expect("finish a running seq");
                self.done.insert(id, q);
            }
        }
        if let Err(e) = self.s.check_invariants() {
            panic!("step {}: {e}", self.steps);
        }
        plan
    }

    fn run_to_end(&mut self, max_steps: usize) {
        while self.s.has_work() {
            assert!(self.steps < max_steps, "no completion within {max_steps} steps");
            self.step();
        }
    }
}

/// The tokens a finished sequence must hold: its prompt, then the fake tokens.
fn assert_generated(q: &Sequence) {
    for pos in q.prompt_len..q.tokens.len() {
        assert_eq!(q.tokens[pos], fake_token(q.id, pos), "seq {} token {pos}", q.id);
    }
}

#[test]
fn limits_hold_and_everything_finishes() {
    let mut sim = Sim::new(config(4, 40, 4096), 64);
    for id in 0..12 {
        let q = Sequence::new(id, prompt(id as u32, 5 + 17 * id as usize), 3 + id as usize);
        sim.s.add(q).unwrap();
    }
    assert_eq!(sim.s.num_waiting(), 12);
    sim.run_to_end(1000);
    assert_eq!(sim.done.len(), 12);
    for q in sim.done.values() {
        assert_eq!(q.num_generated(), q.max_tokens);
        assert_generated(q);
    }
    assert_eq!(sim.s.blocks().num_free_blocks(), 64);
}

#[test]
fn decodes_come_before_prefills() {
    let mut sim = Sim::new(config(8, 32, 4096), 256);
    for id in 0..3 {
        sim.s.add(Sequence::new(id, prompt(id as u32, 8), 50)).unwrap();
    }
    sim.step(); // three 8-token prefills
    sim.s.add(Sequence::new(9, prompt(9, 200), 5)).unwrap();
    let plan = sim.step();
    let ids: Vec<_> = plan.chunks.iter().map(|c| (c.seq, c.len)).collect();
    assert_eq!(ids, vec![(0, 1), (1, 1), (2, 1), (9, 29)]);
}

/// A 1000-token prompt with a 64-token budget is prefilled in chunks while an already
/// running sequence still decodes one token every step.
#[test]
fn long_prompt_is_chunked_around_running_decodes() {
    let mut sim = Sim::new(config(8, 64, 4096), 256);
    sim.s.add(Sequence::new(1, prompt(1, 10), 100)).unwrap();
    sim.step();
    sim.s.add(Sequence::new(2, prompt(2, 1000), 4)).unwrap();
    let mut chunks = Vec::new();
    loop {
        let before = sim.s.sequence(1).map(|q| q.tokens.len()).unwrap();
        let plan = sim.step();
        assert_eq!(plan.chunks[0].seq, 1);
        assert_eq!(plan.chunks[0].len, 1);
        assert_eq!(sim.s.sequence(1).map(|q| q.tokens.len()), Some(before + 1));
        let c = plan.chunks.iter().find(|c| c.seq == 2).expect("long prompt every step");
        chunks.push((c.first_pos, c.len, c.want_logits));
        if c.want_logits {
            break;
        }
    }
    // 63 tokens a step (one goes to the decode): 15 full chunks, then the last 55.
    assert_eq!(chunks.len(), 16);
    assert!(chunks[..15].iter().all(|&(_, len, logits)| len == 63 && !logits));
    assert_eq!(chunks[15], (945, 55, true));
    sim.run_to_end(1000);
    assert_eq!(sim.done.len(), 2);
}

/// Four requests that each need 4 of the 8 blocks at their longest: they cannot all
/// run, so decodes preempt the newest; all still finish with the right tokens.
#[test]
fn tiny_pool_forces_preemption_and_all_finish() {
    let mut sim = Sim::new(config(4, 256, 4096), 8);
    for id in 0..4 {
        // 20 + 40 - 1 = 59 KV tokens at most: 4 blocks.
        sim.s.add(Sequence::new(id, prompt(id as u32, 20), 40)).unwrap();
    }
    let mut preempted = HashSet::new();
    while sim.s.has_work() {
        assert!(sim.steps < 2000);
        preempted.extend(sim.step().preempted);
    }
    assert!(sim.s.num_preemptions() > 0);
    assert!(!preempted.is_empty());
    assert!(!preempted.contains(&0), "the oldest sequence is never preempted");
    assert_eq!(sim.done.len(), 4);
    for q in sim.done.values() {
        assert_eq!(q.tokens.len(), 60);
        assert_generated(q);
    }
    assert_eq!(sim.s.blocks().num_free_blocks(), 8);
}

#[test]
fn requests_that_can_never_fit_are_rejected() {
    let mut s = Scheduler::new(config(4, 64, 100), BlockManager::new(4));
    assert_eq!(
        s.add(Sequence::new(1, prompt(1, 100), 1)),
        Err(AddError::TooLong { prompt: 100, max: 100 })
    );
    // 50 + 30 - 1 = 79 KV tokens: 5 blocks of the 4.
    assert_eq!(
        s.add(Sequence::new(2, prompt(2, 50), 30)),
        Err(AddError::NeverFits { blocks: 5, total: 4 })
    );
    // The context caps the growth: at most 99 tokens, 98 of them fed... still 7 blocks.
    assert!(matches!(
        s.add(Sequence::new(3, prompt(3, 10), 1000)),
        Err(AddError::NeverFits { .. })
    ));
    assert_eq!(s.add(Sequence::new(4, vec![], 5)), Err(AddError::EmptyPrompt));
    s.add(Sequence::new(5, prompt(5, 50), 15)).unwrap();
    assert_eq!(s.add(Sequence::new(5, prompt(5, 3), 1)), Err(AddError::DuplicateId(5)));
    assert_eq!(s.num_waiting(), 1);
    assert!(s.abort(5));
    assert!(!s.abort(5));
    assert!(!s.has_work());
}

#[test]
fn shared_prefix_starts_at_the_cached_tokens() {
    let mut sim = Sim::new(config(4, 512, 4096), 64);
    let system = prompt(7, 40);
    let mut a = system.clone();
    a.extend([1, 2, 3]);
    sim.s.add(Sequence::new(1, a, 2)).unwrap();
    sim.run_to_end(100);
    let hits_before = sim.s.blocks().prefix_cache_hits();

    let mut b = system.clone();
    b.extend([9, 9]);
    sim.s.add(Sequence::new(2, b, 2)).unwrap();
    let plan = sim.s.schedule();
    // Two full 16-token blocks of the shared 40-token prefix are reused.
    assert_eq!(plan.chunks.len(), 1);
    assert_eq!((plan.chunks[0].first_pos, plan.chunks[0].len), (32, 10));
    assert_eq!(sim.s.sequence(2).map(|q| q.num_computed), Some(32));
    assert_eq!(sim.s.blocks().prefix_cache_hits() - hits_before, 32);
    sim.s.complete_step(&plan, &[(2, fake_token(2, 42))]);
    sim.run_to_end(100);
    assert_generated(&sim.done[&2]);
    assert_eq!(sim.s.blocks().num_free_blocks(), 64);
}

/// A follow-up prompt that repeats an earlier prompt and its answer (a chat's next turn)
/// reuses the answer's blocks too, unless the scheduler caches prompts only
/// (`cache_prompts_only`, for backends whose generated rows compute differently): then
/// it reuses the blocks wholly inside the earlier prompt and recomputes the rest.
#[test]
fn next_turn_reuses_answer_blocks_unless_prompts_only() {
    for prompts_only in [false, true] {
        let mut sim = Sim::new(config(4, 512, 4096), 64);
        if prompts_only {
            sim.s.cache_prompts_only();
        }
        // 40 prompt tokens, then 30 generated: blocks 0-1 are prompt, 2 mixes both
        // (positions 32-47), 3 is all answer (48-63).
        sim.s.add(Sequence::new(1, prompt(5, 40), 30)).unwrap();
        sim.run_to_end(100);
        let turn = sim.done[&1].tokens.clone();
        assert_eq!(turn.len(), 70);
        let mut next = turn.clone();
        next.extend([4, 5, 6]);
        sim.s.add(Sequence::new(2, next, 2)).unwrap();
        let plan = sim.s.schedule();
        let reused = if prompts_only { 32 } else { 64 };
        assert_eq!(plan.chunks[0].first_pos, reused, "prompts only: {prompts_only}");
        sim.s.complete_step(&plan, &[(2, fake_token(2, 73))]);
        sim.run_to_end(100);
        assert_generated(&sim.done[&2]);
    }
}

/// An abort between `schedule` and `complete_step` frees the blocks, and the stale plan
/// is ignored for that sequence.
#[test]
fn abort_mid_step_is_harmless() {
    let mut sim = Sim::new(config(4, 64, 4096), 16);
    sim.s.add(Sequence::new(1, prompt(1, 30), 5)).unwrap();
    sim.s.add(Sequence::new(2, prompt(2, 30), 5)).unwrap();
    let plan = sim.s.schedule();
    assert!(sim.s.abort(2));
    sim.s.complete_step(&plan, &[(1, fake_token(1, 30)), (2, 0)]);
    // The same plan again is stale for seq 1 too.
    sim.s.complete_step(&plan, &[(1, 12345)]);
    sim.s.check_invariants().unwrap();
    assert_eq!(sim.s.sequence(1).map(|q| q.tokens.len()), Some(31));
    sim.run_to_end(100);
    assert_generated(&sim.done[&1]);
    assert_eq!(sim.s.blocks().num_free_blocks(), 16);
}

#[derive(Clone, Debug)]
struct Arrival {
    step: usize,
    prompt_len: usize,
    /// Shares the first `shared` tokens with every other request (prefix cache).
    shared: usize,
    max_tokens: usize,
    /// Aborted this many steps after arrival, if Some.
    abort_after: Option<usize>,
}

fn arrival() -> impl Strategy<Value = Arrival> {
    (0usize..40, 1usize..120, 0usize..64, 1usize..40, prop::option::weighted(0.2, 0usize..30))
        .prop_map(|(step, prompt_len, shared, max_tokens, abort_after)| Arrival {
            step,
            prompt_len,
            shared,
            max_tokens,
            abort_after,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_workloads_never_leak_or_stall(
        arrivals in prop::collection::vec(arrival(), 1..24),
        max_num_seqs in 1usize..10,
        budget in 1usize..100,
        num_blocks in 1usize..40,
        max_model_len in 16usize..200,
    ) {
        let mut sim = Sim::new(config(max_num_seqs, budget, max_model_len), num_blocks);
        let mut accepted = Vec::new();
        let mut aborts: Vec<(usize, SeqId)> = Vec::new();
        let mut work = 0;
        for step in 0.. {
            for (i, a) in arrivals.iter().enumerate().filter(|(_, a)| a.step == step) {
                let id = i as SeqId;
                let p: Vec<u32> = (0..a.prompt_len)
                    .map(|k| if k < a.shared { k as u32 } else { 100_000 * (i as u32 + 1) + k as u32 })
                    .collect();
                if sim.s.add(Sequence::new(id, p, a.max_tokens)).is_ok() {
                    accepted.push(id);
                    work += a.prompt_len + a.max_tokens + 1;
                    if let Some(d) = a.abort_after {
                        aborts.push((step + d, id));
                    }
                }
            }
            for &(_, id) in aborts.iter().filter(|(s, _)| *s == step) {
                sim.s.abort(id);
            }
            if step >= 40 && !sim.s.has_work() {
                break;
            }
            // The oldest running sequence gains at least one token every step.
            prop_assert!(sim.steps <= 40 + work, "stalled: {} steps for {work} work", sim.steps);
            sim.step();
        }
        prop_assert_eq!(sim.s.blocks().num_free_blocks(), num_blocks);
        prop_assert_eq!(sim.s.num_running() + sim.s.num_waiting(), 0);
        for id in accepted {
            let aborted = aborts.iter().any(|&(_, a)| a == id);
            match sim.done.get(&id) {
                Some(q) => {
                    assert_generated(q);
                    prop_assert!(q.num_generated() == q.max_tokens || q.tokens.len() == max_model_len);
                }
                None => prop_assert!(aborted, "seq {} vanished", id),
            }
        }
    }
}
