//! The paged-KV block manager: prefix reuse, the last-token rule, LRU eviction, running
//! out of blocks, and random operation sequences checked against an independent model
//! of what each physical block holds.

use std::collections::HashMap;

use proptest::prelude::*;
use qilin::backend::BLOCK_SIZE;
use qilin::kv::block_manager::blocks_for;
use qilin::kv::{Allocation, BlockManager};

/// `len` tokens unique to `seed` (no two seeds share a block).
fn toks(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| seed * 10_000 + i).collect()
}

fn cat(a: &[u32], b: &[u32]) -> Vec<u32> {
    [a, b].concat()
}

/// Allocates and "runs prefill" over the whole prompt.
fn admit_and_compute(m: &mut BlockManager, prompt: &[u32]) -> Allocation {
    let a = m.allocate(prompt).expect("enough blocks");
    m.mark_computed(&a.block_table, prompt, prompt.len());
    a
}

#[test]
fn shared_system_prompt_is_reused() {
    let mut m = BlockManager::new(64);
    let system = toks(1, 3 * BLOCK_SIZE);
    let first = cat(&system, &toks(2, 10));
    let a = admit_and_compute(&mut m, &first);
    assert_eq!(a.cached_tokens, 0);
    assert_eq!(m.prefix_cache_queries(), first.len() as u64);
    assert_eq!(m.prefix_cache_hits(), 0);

    let second = cat(&system, &toks(3, 7));
    let b = m.allocate(&second).expect("enough blocks");
    assert_eq!(b.cached_tokens, 48);
    assert_eq!(b.block_table[..3], a.block_table[..3], "the same physical blocks");
    assert_ne!(b.block_table[3], a.block_table[3], "the private tail is fresh");
    for &id in &a.block_table[..3] {
        assert_eq!(m.ref_count(id), Some(2));
    }
    assert_eq!(m.prefix_cache_queries(), (first.len() + second.len()) as u64);
    assert_eq!(m.prefix_cache_hits(), 48);
    assert_eq!(m.num_free_blocks(), 64 - 5);
    m.check_consistency().unwrap();
}

#[test]
fn divergence_mid_block_reuses_only_whole_blocks() {
    let mut m = BlockManager::new(16);
    let p = toks(1, 40);
    let a = admit_and_compute(&mut m, &p);
    // Same first 24 tokens: block 0 matches, block 1 differs from position 24 on.
    let q = cat(&p[..24], &toks(2, 20));
    let b = m.allocate(&q).expect("enough blocks");
    assert_eq!(b.cached_tokens, BLOCK_SIZE);
    assert_eq!(b.block_table[0], a.block_table[0]);
    assert_ne!(b.block_table[1], a.block_table[1]);
    // A change in the very first token shares nothing, even though later tokens match.
    let mut r = p.clone();
    r[0] += 1;
    assert_eq!(m.allocate(&r).expect("enough blocks").cached_tokens, 0);
}

#[test]
fn last_prompt_token_is_never_cached() {
    let mut m = BlockManager::new(64);
    let p = toks(1, 48);
    let a = admit_and_compute(&mut m, &p);
    // (prompt length, cached tokens): capped at len-1 rounded down to a block.
    for (len, want) in [(48, 32), (49, 48), (47, 32), (33, 32), (32, 16), (17, 16), (16, 0), (1, 0)]
    {
        let prompt = if len <= 48 { p[..len].to_vec() } else { cat(&p, &toks(2, len - 48)) };
        let mut got = m.allocate(&prompt).expect("enough blocks");
        assert_eq!(got.cached_tokens, want, "prompt of {len} tokens");
        assert_eq!(got.block_table.len(), blocks_for(len));
        assert_eq!(got.block_table[..want / BLOCK_SIZE], a.block_table[..want / BLOCK_SIZE]);
        if len == 48 {
            assert_ne!(got.block_table[2], a.block_table[2], "the last block is recomputed");
        }
        m.free(&mut got.block_table);
    }
    let mut empty = m.allocate(&[]).expect("nothing to allocate");
    assert!(empty.block_table.is_empty());
    m.free(&mut empty.block_table);
    m.check_consistency().unwrap();
}

#[test]
fn only_computed_blocks_are_registered_including_decoded_ones() {
    let mut m = BlockManager::new(32);
    let mut p = toks(1, 40);
    let mut a = m.allocate(&p).expect("enough blocks");
    m.mark_computed(&a.block_table, &p, 20); // chunked prefill: first chunk only
    assert_eq!(m.allocate(&p).expect("blocks").cached_tokens, BLOCK_SIZE);
    m.mark_computed(&a.block_table, &p, 40);
    assert_eq!(m.allocate(&p).expect("blocks").cached_tokens, 2 * BLOCK_SIZE);
    // Decode 10 more tokens, one per step: the third block fills at 48 tokens.
    for t in 0..10 {
        p.push(90_000 + t);
        assert!(m.append_slot(&mut a.block_table, p.len()));
        m.mark_computed(&a.block_table, &p, p.len() - 1); // the newest token is not run yet
    }
    assert_eq!(a.block_table.len(), blocks_for(50));
    let follow_up = cat(&p, &toks(2, 5));
    let b = m.allocate(&follow_up).expect("enough blocks");
    assert_eq!(b.cached_tokens, 3 * BLOCK_SIZE);
    assert_eq!(b.block_table[..3], a.block_table[..3]);
    m.check_consistency().unwrap();
}

#[test]
fn eviction_is_least_recently_freed_first() {
    let mut m = BlockManager::new(5);
    let xs: Vec<Vec<u32>> = (1..=3).map(|s| toks(s, BLOCK_SIZE)).collect();
    let mut allocs: Vec<Allocation> = xs.iter().map(|x| admit_and_compute(&mut m, x)).collect();
    let block_of: Vec<u32> = allocs.iter().map(|a| a.block_table[0]).collect();
    for i in [1, 0, 2] {
        m.free(&mut allocs[i].block_table);
    }
    assert_eq!(m.num_cached_blocks(), 3);
    assert_eq!(m.num_free_blocks(), 5);

    // Blocks with nothing cached go first, then the least recently freed cached one (x2).
    let mut fresh: Vec<Allocation> =
        (10..12).map(|s| m.allocate(&toks(s, 5)).expect("blocks")).collect();
    assert!(fresh.iter().all(|a| !block_of.contains(&a.block_table[0])));
    assert_eq!(m.num_cached_blocks(), 3, "no eviction while uncached blocks remain");
    let w = m.allocate(&toks(12, 5)).expect("blocks");
    assert_eq!(w.block_table, [block_of[1]]);
    assert_eq!(m.num_cached_blocks(), 2);
    fresh.push(w);
    for a in &mut fresh {
        m.free(&mut a.block_table);
    }

    let probe = |m: &mut BlockManager, x: &[u32]| {
        let mut a = m.allocate(&cat(x, &[7])).expect("blocks");
        let hit = (a.cached_tokens > 0).then_some(a.block_table[0]);
        m.free(&mut a.block_table);
        hit
    };
    assert_eq!(probe(&mut m, &xs[0]), Some(block_of[0]));
    assert_eq!(probe(&mut m, &xs[2]), Some(block_of[2]));
    assert_eq!(probe(&mut m, &xs[1]), None, "x2 was evicted");
    m.check_consistency().unwrap();
}

#[test]
fn out_of_blocks_changes_nothing() {
    let mut m = BlockManager::new(4);
    let p = toks(1, 3 * BLOCK_SIZE + 1);
    let mut a = admit_and_compute(&mut m, &p);
    assert_eq!(m.num_free_blocks(), 0);
    assert_eq!(m.usage(), 1.0);
    let before = (m.prefix_cache_queries(), m.prefix_cache_hits());
    assert_eq!(m.allocate(&toks(2, 1)), None);
    assert!(!m.can_allocate(1));
    // A prompt whose prefix is live still needs a fresh block for its tail.
    assert_eq!(m.allocate(&cat(&p[..48], &[5])), None);
    assert!(!m.append_slot(&mut a.block_table, p.len() + BLOCK_SIZE));
    assert_eq!(a.block_table.len(), 4);
    assert_eq!((m.prefix_cache_queries(), m.prefix_cache_hits()), before);
    m.free(&mut a.block_table);
    assert!(a.block_table.is_empty(), "free empties the table: no double free");

    // Reviving free cached blocks takes them out of the free pool too: 3 cached hits +
    // 3 fresh blocks do not fit in 4.
    let long = cat(&p[..48], &toks(3, 40));
    assert_eq!(m.allocate(&long), None);
    assert_eq!(m.num_free_blocks(), 4);
    assert_eq!(m.num_cached_blocks(), 3, "a failed allocation evicts nothing");
    assert_eq!(m.allocate(&p).expect("fits").cached_tokens, 48);
    m.check_consistency().unwrap();
}

#[test]
fn bogus_frees_do_not_panic_or_corrupt() {
    let mut m = BlockManager::new(4);
    let mut a = m.allocate(&toks(1, 20)).expect("blocks");
    let mut copy = a.block_table.clone();
    m.free(&mut a.block_table);
    m.free(&mut copy); // the API makes this hard; it must still not corrupt state
    m.free(&mut vec![99, u32::MAX]);
    m.mark_computed(&[99, 3], &toks(2, 32), 32);
    assert_eq!(m.num_free_blocks(), 4);
    m.check_consistency().unwrap();
}

// ---------------------------------------------------------------------------------------
// Random operation sequences.

const NUM_BLOCKS: usize = 12;

#[derive(Clone, Debug)]
enum Op {
    /// Prompt: template `t` cut to `len`, with `mutate` (position, token) applied.
    Allocate {
        t: usize,
        len: usize,
        mutate: Option<(usize, u32)>,
    },
    Append {
        seq: usize,
        new_tokens: Vec<u32>,
    },
    Compute {
        seq: usize,
        k: usize,
    },
    Free {
        seq: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3usize, 1..70usize, proptest::option::of((0..70usize, 0..3u32)))
            .prop_map(|(t, len, mutate)| Op::Allocate { t, len, mutate }),
        2 => (any::<usize>(), proptest::collection::vec(0..3u32, 1..20))
            .prop_map(|(seq, new_tokens)| Op::Append { seq, new_tokens }),
        3 => (any::<usize>(), 1..40usize).prop_map(|(seq, k)| Op::Compute { seq, k }),
        2 => any::<usize>().prop_map(|seq| Op::Free { seq }),
    ]
}

struct Seq {
    table: Vec<u32>,
    tokens: Vec<u32>,
    computed: usize,
}

/// Templates over a 2-token alphabet with long shared runs, so prefixes repeat often.
fn templates() -> [Vec<u32>; 3] {
    let base: Vec<u32> = (0..70).map(|i| (i / 5 % 2) as u32).collect();
    let mut other = base.clone();
    other[40] = 2;
    let third: Vec<u32> = (0..70).map(|i| (i % 3 == 0) as u32).collect();
    [base, other, third]
}

fn check_invariants(m: &BlockManager, live: &[Seq]) -> Result<(), TestCaseError> {
    let mut refs = [0u32; NUM_BLOCKS];
    for s in live {
        for &id in &s.table {
            refs[id as usize] += 1;
        }
    }
    let mut used = 0;
    for (id, &want) in refs.iter().enumerate() {
        let id = id as u32;
        prop_assert_eq!(m.ref_count(id), Some(want), "ref count of block {}", id);
        prop_assert_eq!(m.is_free(id), want == 0, "block {} free vs referenced", id);
        used += usize::from(want > 0);
    }
    prop_assert_eq!(m.num_free_blocks() + used, m.num_blocks());
    prop_assert!(m.check_consistency().is_ok(), "{:?}", m.check_consistency());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_keep_the_books_straight(ops in proptest::collection::vec(op(), 1..60)) {
        let templates = templates();
        let mut m = BlockManager::new(NUM_BLOCKS);
        let mut live: Vec<Seq> = Vec::new();
        // The model: full-block contents (the whole token prefix up to the block's end)
        // that the "engine" computed into each physical block.
        let mut kv: HashMap<u32, Vec<u32>> = HashMap::new();
        for op in ops {
            match op {
                Op::Allocate { t, len, mutate } => {
                    let mut prompt = templates[t][..len].to_vec();
                    if let Some((pos, tok)) = mutate.filter(|&(pos, _)| pos < len) {
                        prompt[pos] = tok;
                    }
                    let before = (m.prefix_cache_queries(), m.prefix_cache_hits());
                    let free_before = m.num_free_blocks();
                    match m.allocate(&prompt) {
                        None => {
                            prop_assert_eq!((m.prefix_cache_queries(), m.prefix_cache_hits()), before);
                            prop_assert_eq!(m.num_free_blocks(), free_before);
                            prop_assert!(free_before < blocks_for(len));
                        }
                        Some(a) => {
                            let c = a.cached_tokens;

                            prop_assert_eq!(c % BLOCK_SIZE, 0);
                            prop_assert!(c < len);
                            prop_assert_eq!(a.block_table.len(), blocks_for(len));
                            prop_assert_eq!(m.prefix_cache_queries(), before.0 + len as u64);
                            prop_assert_eq!(m.prefix_cache_hits(), before.1 + c as u64);
                            for (i, id) in a.block_table.iter().enumerate() {
                                if i < c / BLOCK_SIZE {
                                    let end = (i + 1) * BLOCK_SIZE;
                                    prop_assert_eq!(kv.get(id), Some(&prompt[..end].to_vec()),
                                        "cached block {} holds other KV", id);
                                } else {
                                    kv.remove(id); // fresh: about to be overwritten
                                }
                            }
                            live.push(Seq { table: a.block_table, tokens: prompt, computed: c });
                        }
                    }
                }
                Op::Append { seq, new_tokens } => {
                    if live.is_empty() { continue; }
                    let n = live.len();
                    let s = &mut live[seq % n];
                    let old_len = s.table.len();
                    let total = s.tokens.len() + new_tokens.len();
                    if m.append_slot(&mut s.table, total) {
                        prop_assert_eq!(s.table.len(), blocks_for(total).max(old_len));
                        for id in &s.table[old_len..] {
                            kv.remove(id);
                        }
                        s.tokens.extend(new_tokens);
                    } else {
                        prop_assert_eq!(s.table.len(), old_len);
                    }
                }
                Op::Compute { seq, k } => {
                    if live.is_empty() { continue; }
                    let n = live.len();
                    let s = &mut live[seq % n];
                    s.computed = (s.computed + k).min(s.tokens.len());
                    for i in 0..s.computed / BLOCK_SIZE {
                        kv.insert(s.table[i], s.tokens[..(i + 1) * BLOCK_SIZE].to_vec());
                    }
                    m.mark_computed(&s.table, &s.tokens, s.computed);
                }
                Op::Free { seq } => {
                    if live.is_empty() { continue; }
                    let mut s = live.swap_remove(seq % live.len());
                    m.free(&mut s.table);
                    prop_assert!(s.table.is_empty());
                }
            }
            check_invariants(&m, &live)?;
        }
        for s in &mut live {
            m.free(&mut s.table);
        }
        live.clear();
        check_invariants(&m, &live)?;
        prop_assert_eq!(m.num_free_blocks(), NUM_BLOCKS);
        prop_assert_eq!(m.usage(), 0.0);
        // The pool is whole: every block can be handed out again at once.
        let everything: Vec<u32> = (0..(NUM_BLOCKS * BLOCK_SIZE) as u32).map(|i| 100 + i).collect();
        let a = m.allocate(&everything).expect("all blocks free");
        prop_assert_eq!(a.block_table.len(), NUM_BLOCKS);
        prop_assert_eq!(m.num_free_blocks(), 0);
    }
}
