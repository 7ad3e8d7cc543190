//! Paged-KV block manager with prefix caching: which physical blocks each sequence holds,
//! how many sequences share each block, and which computed full blocks can be reused by
//! a later prompt that starts the same way.
//!
//! A block is in exactly one of three states:
//! - live: `ref_count > 0`, held by that many block tables;
//! - free, uncached: contents worthless, handed out first;
//! - free, cached: a registered full block no table holds; still found by a prompt
//!   lookup (which revives it) until handed out for new contents, least recently freed
//!   first.
//!
//! A full block is registered under `hash(parent's hash, its 16 token ids)`. The hash is
//! only a lookup key: a hit is confirmed by comparing the stored token ids and the
//! parent block's *instance* (a number that changes whenever a block is handed out for
//! new contents), so by induction the whole prefix is identical and a hash collision can
//! only cost a miss, never wrong KV.

use crate::backend::BLOCK_SIZE;
use crate::kv::prefix_cache::{hash_block, BlockHash, HashIndex, LruQueue};

/// A new sequence's blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// Physical block ids covering the whole prompt: the shared cached ones first.
    pub block_table: Vec<u32>,
    /// Leading prompt tokens whose KV is already in `block_table` (a multiple of
    /// `BLOCK_SIZE`, always < prompt length): prefill starts at this position.
    pub cached_tokens: usize,
}

#[derive(Clone, Debug)]
struct CachedBlock {
    hash: BlockHash,
    /// Instance of the block before this one in the sequence; None for a first block.
    parent: Option<u64>,
    tokens: [u32; BLOCK_SIZE],
}

#[derive(Clone, Debug, Default)]
struct Block {
    ref_count: u32,
    /// Changes every time the block is handed out for new contents.
    instance: u64,
    /// Some while registered in the prefix cache.
    cached: Option<CachedBlock>,
    in_uncached_free: bool,
}

#[derive(Debug)]
pub struct BlockManager {
    blocks: Vec<Block>,
    /// Stack of free blocks with nothing worth keeping.
    free_uncached: Vec<u32>,
    /// Free registered blocks; front = least recently freed = first evicted.
    free_cached: LruQueue,
    index: HashIndex,
    next_instance: u64,
    queries: u64,
    hits: u64,
    /// All ones in production; tests narrow it to force hash collisions.
    hash_mask: u64,
}

/// Blocks needed to hold `tokens` tokens.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(BLOCK_SIZE)
}

impl BlockManager {
    /// `num_blocks` physical blocks, all free. Ids are u32 with `u32::MAX` reserved, so
    /// the count is capped just below it (far beyond any real KV cache).
    pub fn new(num_blocks: usize) -> Self {
        let n = num_blocks.min(u32::MAX as usize - 1);
        let blocks = (0..n).map(|_| Block { in_uncached_free: true, ..Default::default() });
        BlockManager {
            blocks: blocks.collect(),
            // Reversed so that pops hand out low ids first (easier to read in dumps).
            free_uncached: (0..n as u32).rev().collect(),
            free_cached: LruQueue::new(n),
            index: HashIndex::default(),
            next_instance: 0,
            queries: 0,
            hits: 0,
            hash_mask: u64::MAX,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be handed out now (free cached blocks count: they are evictable).
    pub fn num_free_blocks(&self) -> usize {
        self.free_uncached.len() + self.free_cached.len()
    }

    /// Registered blocks, live or free: what the prefix cache currently remembers.
    pub fn num_cached_blocks(&self) -> usize {
        self.index.len()
    }

    /// Fraction of blocks held by sequences, 0..=1 (the KV-usage metric).
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.num_free_blocks() as f64 / self.blocks.len() as f64
    }

    pub fn can_allocate(&self, n_blocks: usize) -> bool {
        n_blocks <= self.num_free_blocks()
    }

    /// Prompt tokens looked up in the prefix cache (monotonic).
    pub fn prefix_cache_queries(&self) -> u64 {
        self.queries
    }

    /// Prompt tokens found in the prefix cache (monotonic).
    pub fn prefix_cache_hits(&self) -> u64 {
        self.hits
    }

    /// How many block tables hold `block`; None for an id this manager does not have.
    pub fn ref_count(&self, block: u32) -> Option<u32> {
        self.blocks.get(block as usize).map(|b| b.ref_count)
    }

    /// Whether `block` sits in a free list (looked up in the lists, not from the count).
    pub fn is_free(&self, block: u32) -> bool {
        let uncached = self.blocks.get(block as usize).is_some_and(|b| b.in_uncached_free);
        uncached || self.free_cached.contains(block)
    }

    /// A new sequence: reuses the longest cached chain of full prompt blocks and takes
    /// fresh blocks for the rest. None, with nothing changed, when too few blocks are
    /// free. At least the last prompt token is never reported cached, so prefill always
    /// runs the model at least once and yields logits. An empty prompt gets an empty
    /// table (callers reject empty prompts before this).
    pub fn allocate(&mut self, prompt: &[u32]) -> Option<Allocation> {
        let total = blocks_for(prompt.len());
        // Cached tokens <= len-1, rounded down to a block: with len = 48 only two of the
        // three full blocks may be reused, with len = 49 all three.
        let max_hit_blocks = prompt.len().saturating_sub(1) / BLOCK_SIZE;
        let mut hits: Vec<u32> = Vec::with_capacity(total);
        let mut parent: Option<(BlockHash, u64)> = None;
        for chunk in prompt.chunks_exact(BLOCK_SIZE).take(max_hit_blocks) {
            let h = self.chain_hash(parent.map(|p| p.0), chunk);
            match self.lookup(h, parent.map(|p| p.1), chunk) {
                Some(id) => {
                    hits.push(id);
                    parent = Some((h, self.blocks[id as usize].instance));
                }
                None => break,
            }
        }
        // A free cached hit leaves the free pool just like a fresh block does.
        let revived = hits.iter().filter(|&&id| self.blocks[id as usize].ref_count == 0).count();
        let fresh = total - hits.len();
        if fresh + revived > self.num_free_blocks() {
            return None;
        }
        for &id in &hits {
            let b = &mut self.blocks[id as usize];
            if b.ref_count == 0 {
                self.free_cached.remove(id);
            }
            b.ref_count += 1;
        }
        let cached_tokens = hits.len() * BLOCK_SIZE;
        let mut table = hits;
        for _ in 0..fresh {
            match self.take_free() {
                Some(id) => table.push(id),
                None => {
                    // Unreachable after the count above; undo rather than panic.
                    self.free(&mut table);
                    return None;
                }
            }
        }
        self.queries += prompt.len() as u64;
        self.hits += cached_tokens as u64;
        Some(Allocation { block_table: table, cached_tokens })
    }

    /// Grows a running sequence's table to cover `total_tokens`; false, with nothing
    /// changed, when too few blocks are free (the scheduler then preempts).
    pub fn append_slot(&mut self, table: &mut Vec<u32>, total_tokens: usize) -> bool {
        let need = blocks_for(total_tokens).saturating_sub(table.len());
        if need > self.num_free_blocks() {
            return false;
        }
        for _ in 0..need {
            match self.take_free() {
                Some(id) => table.push(id),
                None => return false,
            }
        }
        true
    }

    /// After the engine has computed the KV of the first `computed_tokens` of `tokens`
    /// (the sequence's prompt + output so far) into `table`, registers the newly full
    /// blocks in the prefix cache. Cheap to call every step: it starts after the last
    /// block already registered.
    pub fn mark_computed(&mut self, table: &[u32], tokens: &[u32], computed_tokens: usize) {
        let n_full = (computed_tokens.min(tokens.len()) / BLOCK_SIZE).min(table.len());
        // Registered blocks always form a prefix of a live table: a block is only
        // registered after its parent, and a live block is never unregistered.
        let mut i = n_full;
        while i > 0 && !self.is_registered(table[i - 1]) {
            i -= 1;
        }
        for i in i..n_full {
            let parent = match i.checked_sub(1) {
                None => None,
                Some(p) => match self.blocks.get(table[p] as usize) {
                    Some(Block { instance, cached: Some(c), .. }) => Some((c.hash, *instance)),
                    _ => return,
                },
            };
            let id = table[i];
            let live_unregistered =
                self.blocks.get(id as usize).is_some_and(|b| b.ref_count > 0 && b.cached.is_none());
            if !live_unregistered {
                return; // not a table this manager handed out: refuse quietly
            }
            let chunk = &tokens[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            let h = self.chain_hash(parent.map(|p| p.0), chunk);
            if let Some(&other) = self.index.get(&h) {
                if self.lookup(h, parent.map(|p| p.1), chunk).is_some() {
                    // Same prefix computed twice (two prompts admitted before either was
                    // registered): the first copy stays the cached one, and this table's
                    // later blocks cannot chain onto an unregistered block.
                    return;
                }
                if self.blocks[other as usize].ref_count > 0 {
                    return; // a live block owns this hash with other contents
                }
                // A free block whose key collides or whose parent is gone: replace it.
                self.unregister(other);
                self.free_cached.remove(other);
                self.push_uncached(other);
            }
            let mut tokens_arr = [0u32; BLOCK_SIZE];
            tokens_arr.copy_from_slice(chunk);
            self.blocks[id as usize].cached =
                Some(CachedBlock { hash: h, parent: parent.map(|p| p.1), tokens: tokens_arr });
            self.index.insert(h, id);
        }
    }

    /// Releases a finished (or preempted) sequence's blocks and empties `table`, so the
    /// same table cannot be freed twice. Blocks are released tail first: within one
    /// sequence the prompt's head — the part most likely shared — is evicted last.
    pub fn free(&mut self, table: &mut Vec<u32>) {
        for id in table.drain(..).rev() {
            let Some(b) = self.blocks.get_mut(id as usize) else {
                tracing::error!(block = id, "freeing a block id this manager does not have");
                continue;
            };
            if b.ref_count == 0 {
                tracing::error!(block = id, "freeing a block that is already free");
                continue;
            }
            b.ref_count -= 1;
            if b.ref_count == 0 {
                if b.cached.is_some() {
                    self.free_cached.push_back(id);
                } else {
                    self.push_uncached(id);
                }
            }
        }
    }

    /// Checks the internal bookkeeping (free lists vs ref counts, index vs registered
    /// blocks); Err names the first inconsistency. For tests and debugging.
    pub fn check_consistency(&self) -> Result<(), String> {
        let mut uncached = 0;
        for (id, b) in self.blocks.iter().enumerate() {
            let id = id as u32;
            let in_lru = self.free_cached.contains(id);
            let free = b.in_uncached_free || in_lru;
            if b.in_uncached_free && in_lru {
                return Err(format!("block {id} is in both free lists"));
            }
            if free == (b.ref_count > 0) {
                return Err(format!("block {id}: ref_count {} but free={free}", b.ref_count));
            }
            if in_lru && b.cached.is_none() {
                return Err(format!("block {id} is in the cached free list but unregistered"));
            }
            if b.in_uncached_free && b.cached.is_some() {
                return Err(format!("block {id} is registered but in the uncached free list"));
            }
            if let Some(c) = &b.cached {
                if self.index.get(&c.hash) != Some(&id) {
                    return Err(format!("block {id} is registered but not indexed"));
                }
            }
            uncached += usize::from(b.in_uncached_free);
        }
        if uncached != self.free_uncached.len() {
            return Err(format!(
                "{uncached} flagged uncached, stack holds {}",
                self.free_uncached.len()
            ));
        }
        for (h, &id) in &self.index {
            let ok = self
                .blocks
                .get(id as usize)
                .and_then(|b| b.cached.as_ref())
                .is_some_and(|c| c.hash == *h);
            if !ok {
                return Err(format!("index entry {h:?} -> {id} is stale"));
            }
        }
        Ok(())
    }

    fn chain_hash(&self, parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
        BlockHash(hash_block(parent, tokens).0 & self.hash_mask)
    }

    fn is_registered(&self, id: u32) -> bool {
        self.blocks.get(id as usize).is_some_and(|b| b.cached.is_some())
    }

    /// The cached block for `h`, if its contents and parent really are these.
    fn lookup(&self, h: BlockHash, parent: Option<u64>, tokens: &[u32]) -> Option<u32> {
        let id = *self.index.get(&h)?;
        let c = self.blocks.get(id as usize)?.cached.as_ref()?;
        (c.hash == h && c.parent == parent && c.tokens[..] == *tokens).then_some(id)
    }

    /// A block for new contents, with ref_count 1: an uncached one if any, else the
    /// least recently freed cached one (evicting it from the prefix cache).
    fn take_free(&mut self) -> Option<u32> {
        let id = match self.free_uncached.pop() {
            Some(id) => id,
            None => {
                let id = self.free_cached.pop_front()?;
                self.unregister(id);
                id
            }
        };
        self.next_instance += 1;
        let b = &mut self.blocks[id as usize];
        b.in_uncached_free = false;
        b.ref_count = 1;
        b.instance = self.next_instance;
        Some(id)
    }

    fn unregister(&mut self, id: u32) {
        if let Some(c) = self.blocks.get_mut(id as usize).and_then(|b| b.cached.take()) {
            if self.index.get(&c.hash) == Some(&id) {
                self.index.remove(&c.hash);
            }
        }
    }

    fn push_uncached(&mut self, id: u32) {
        if let Some(b) = self.blocks.get_mut(id as usize) {
            if !b.in_uncached_free {
                b.in_uncached_free = true;
                self.free_uncached.push(id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(seed: u32, len: usize) -> Vec<u32> {
        (0..len as u32).map(|i| seed * 1000 + i).collect()
    }

    /// With every hash forced to the same key, different prompts collide on every block;
    /// the stored tokens and parent instances must keep lookups exact.
    #[test]
    fn colliding_hashes_never_give_wrong_blocks() {
        let mut m = BlockManager::new(32);
        m.hash_mask = 0;
        let x = prompt(1, 40);
        let y = prompt(2, 40);
        let mut a = m.allocate(&x).expect("blocks");
        m.mark_computed(&a.block_table, &x, x.len());
        // Only x's first block can own the single key; its second block collides with it
        // (a live block) and stays unregistered.
        assert_eq!(m.num_cached_blocks(), 1);
        m.check_consistency().unwrap();

        let mut b = m.allocate(&y).expect("blocks");
        assert_eq!(b.cached_tokens, 0, "y's blocks hash alike but hold other tokens");
        let mut c = m.allocate(&x).expect("blocks");
        assert_eq!(c.cached_tokens, BLOCK_SIZE);
        assert_eq!(c.block_table[0], a.block_table[0]);

        // Once x's cached block is free, y may take the key over.
        m.free(&mut a.block_table);
        m.free(&mut c.block_table);
        m.mark_computed(&b.block_table, &y, y.len());
        m.check_consistency().unwrap();
        let d = m.allocate(&y).expect("blocks");
        assert_eq!(d.cached_tokens, BLOCK_SIZE);
        assert_eq!(d.block_table[0], b.block_table[0]);
        assert_eq!(m.allocate(&x).expect("blocks").cached_tokens, 0);
        m.free(&mut b.block_table);
        m.check_consistency().unwrap();
    }
}
