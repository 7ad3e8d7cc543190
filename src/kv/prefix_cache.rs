//! The pieces of prefix caching that do not know about ref counts: the chained block
//! hash, a hash map keyed by it, and the LRU queue that decides which free cached block
//! is reused (evicted) first. `block_manager.rs` puts them together.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, DefaultHasher, Hasher};

/// Identity of a full block's contents *and* everything before it in the sequence:
/// `hash(parent's BlockHash, the block's token ids)`. A lookup key only — two different
/// prefixes may collide, so a hit is always confirmed against the stored token ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockHash(pub u64);

/// Chained hash of one full block. SipHash-1-3 with std's fixed zero key: the same
/// tokens give the same hash in every run of a binary, which is all an in-memory cache
/// needs (hashes are never persisted or compared across builds).
pub fn hash_block(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut h = DefaultHasher::new();
    // A distinct tag for "no parent" so the first block never equals a child block
    // whose parent hash happens to be 0.
    match parent {
        Some(p) => {
            h.write_u8(1);
            h.write_u64(p.0);
        }
        None => h.write_u8(0),
    }
    // One write of the raw bytes is several times faster than one write per token.
    h.write(bytemuck::cast_slice(tokens));
    BlockHash(h.finish())
}

/// Keys are already uniformly distributed 64-bit hashes: hashing them again is waste.
#[derive(Default)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if someone keys the map by something other than a u64.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// `BlockHash` -> physical block id of the cached block holding that chain.
pub type HashIndex = HashMap<BlockHash, u32, BuildHasherDefault<IdentityHasher>>;

const NIL: u32 = u32::MAX;

/// An intrusive doubly linked list over block ids `0..n`: O(1) push to the back, pop from
/// the front and removal from the middle (a cache hit revives a free cached block).
/// Front = least recently freed = next to be evicted.
#[derive(Debug)]
pub struct LruQueue {
    prev: Vec<u32>,    // [n] NIL at the front or when not queued
    next: Vec<u32>,    // [n] NIL at the back or when not queued
    queued: Vec<bool>, // [n]
    head: u32,
    tail: u32,
    len: usize,
}

impl LruQueue {
    /// An empty queue for ids `0..n`; `n` must be below `u32::MAX` (NIL is reserved).
    pub fn new(n: usize) -> Self {
        LruQueue {
            prev: vec![NIL; n],
            next: vec![NIL; n],
            queued: vec![false; n],
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, id: u32) -> bool {
        self.queued.get(id as usize).copied().unwrap_or(false)
    }

    /// Appends `id` as the most recently freed; no-op if out of range or already queued.
    pub fn push_back(&mut self, id: u32) {
        let i = id as usize;
        if i >= self.queued.len() || self.queued[i] {
            return;
        }
        self.queued[i] = true;
        self.prev[i] = self.tail;
        self.next[i] = NIL;
        if self.tail == NIL {
            self.head = id;
        } else {
            self.next[self.tail as usize] = id;
        }
        self.tail = id;
        self.len += 1;
    }

    /// Removes and returns the least recently freed id.
    pub fn pop_front(&mut self) -> Option<u32> {
        let id = self.head;
        if id == NIL {
            return None;
        }
        self.remove(id);
        Some(id)
    }

    /// Unlinks `id`; false if it was not queued.
    pub fn remove(&mut self, id: u32) -> bool {
        if !self.contains(id) {
            return false;
        }
        let i = id as usize;
        let (p, n) = (self.prev[i], self.next[i]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.prev[i] = NIL;
        self.next[i] = NIL;
        self.queued[i] = false;
        self.len -= 1;
        true
    }

    /// Ids from front (next evicted) to back.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::successors((self.head != NIL).then_some(self.head), move |&id| {
            let n = self.next[id as usize];
            (n != NIL).then_some(n)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_queue_orders_and_removes() {
        let mut q = LruQueue::new(5);
        for id in [3, 1, 4, 0] {
            q.push_back(id);
        }
        q.push_back(1); // already queued: ignored
        q.push_back(9); // out of range: ignored
        assert_eq!(q.iter().collect::<Vec<_>>(), [3, 1, 4, 0]);
        assert!(q.remove(4));
        assert!(!q.remove(4));
        assert_eq!(q.pop_front(), Some(3));
        assert!(q.remove(0));
        assert_eq!(q.iter().collect::<Vec<_>>(), [1]);
        assert_eq!(q.pop_front(), Some(1));
        assert_eq!(q.pop_front(), None);
        assert!(q.is_empty());
        q.push_back(2);
        assert_eq!(q.iter().collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn hash_chains_on_the_parent() {
        let a: Vec<u32> = (0..16).collect();
        let h1 = hash_block(None, &a);
        assert_eq!(h1, hash_block(None, &a), "deterministic");
        assert_ne!(hash_block(Some(h1), &a), h1);
        assert_ne!(hash_block(Some(BlockHash(0)), &a), h1);
        let mut b = a.clone();
        b[15] = 99;
        assert_ne!(hash_block(None, &b), h1);
    }
}
