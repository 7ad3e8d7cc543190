//! One engine step of the scheduler alone: `schedule()` + `complete_step()` with 256
//! running sequences that all decode (128-token prompts, already prefilled). Reports
//! µs per step (2-core dev VM: ~7.6 µs; ~33 µs before the map used `IdHasher`).
//!
//! cargo bench --bench scheduler
//!
//! The sequences grow by one token a step; every `REFILL` steps a fresh scheduler is
//! built outside the timed region so the pool never runs out and nothing is preempted.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use qilin::engine::scheduler::{Scheduler, SchedulerConfig};
use qilin::engine::sequence::{SeqId, Sequence};
use qilin::kv::BlockManager;

const SEQS: usize = 256;
const PROMPT: usize = 128;
const REFILL: u64 = 512;
const NUM_BLOCKS: usize = SEQS * (PROMPT + REFILL as usize + 16) / 16;

/// A scheduler whose 256 sequences have finished prefill and each await a decode.
fn decoding_scheduler() -> Scheduler {
    let config = SchedulerConfig {
        max_num_seqs: SEQS,
        max_num_batched_tokens: SEQS * PROMPT,
        max_model_len: 1 << 20,
    };
    let mut s = Scheduler::new(config, BlockManager::new(NUM_BLOCKS));
    for id in 0..SEQS as SeqId {
        let prompt = (0..PROMPT as u32).map(|i| id as u32 * 100_000 + i).collect();
        s.add(Sequence::new(id, prompt, 1 << 16)).expect("fits");
    }
    let plan = s.schedule();
    let sampled: Vec<(SeqId, u32)> = plan.chunks.iter().map(|c| (c.seq, 1)).collect();
    s.complete_step(&plan, &sampled);
    assert_eq!(s.num_running(), SEQS);
    s
}

fn step(s: &mut Scheduler) {
    let plan = s.schedule();
    let sampled: Vec<(SeqId, u32)> = plan.chunks.iter().map(|c| (c.seq, 7)).collect();
    s.complete_step(black_box(&plan), &sampled);
}

fn bench(c: &mut Criterion) {
    c.bench_function("schedule_complete_256_decodes", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut s = decoding_scheduler();
            for i in 0..iters {
                if i > 0 && i % REFILL == 0 {
                    s = decoding_scheduler();
                }
                let t = Instant::now();
                step(&mut s);
                total += t.elapsed();
            }
            assert_eq!(s.num_preemptions(), 0);
            total
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
