//! The block manager's admission path: `allocate` + `free` of 256 sequences whose
//! 1024-token prompts share a 512-token prefix (32 of 64 blocks hit the prefix cache).
//! Reports µs per 256 sequences.
//!
//! cargo bench --bench block_manager
//!
//! "alloc_free": the shared prefix is cached, the private halves are never registered.
//! "alloc_mark_free": each sequence's whole prompt is also registered (mark_computed)
//! before the frees, so the free path feeds the LRU queue; a fresh manager per run.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use qilin::kv::BlockManager;

const SEQS: usize = 256;
const PROMPT: usize = 1024;
const PREFIX: usize = 512;
const NUM_BLOCKS: usize = SEQS * PROMPT / 16;

fn prompts() -> Vec<Vec<u32>> {
    (0..SEQS as u32)
        .map(|s| {
            (0..PROMPT as u32)
                .map(|i| if (i as usize) < PREFIX { i } else { s * 100_000 + i })
                .collect()
        })
        .collect()
}

/// A manager whose cache already holds the shared prefix.
fn warmed(prompts: &[Vec<u32>]) -> BlockManager {
    let mut m = BlockManager::new(NUM_BLOCKS);
    let mut a = m.allocate(&prompts[0]).expect("blocks");
    m.mark_computed(&a.block_table, &prompts[0][..PREFIX], PREFIX);
    m.free(&mut a.block_table);
    m
}

fn bench(c: &mut Criterion) {
    let prompts = prompts();
    let mut g = c.benchmark_group("block_manager_256x1k_shared512");

    let mut m = warmed(&prompts);
    g.bench_function("alloc_free", |b| {
        b.iter(|| {
            let mut tables: Vec<Vec<u32>> = prompts
                .iter()
                .map(|p| m.allocate(black_box(p)).expect("blocks").block_table)
                .collect();
            for t in &mut tables {
                m.free(t);
            }
        })
    });

    g.bench_function("alloc_mark_free", |b| {
        b.iter_batched(
            || warmed(&prompts),
            |mut m| {
                let mut tables: Vec<Vec<u32>> = prompts
                    .iter()
                    .map(|p| {
                        let t = m.allocate(black_box(p)).expect("blocks").block_table;
                        m.mark_computed(&t, p, p.len());
                        t
                    })
                    .collect();
                for t in &mut tables {
                    m.free(t);
                }
                m
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
