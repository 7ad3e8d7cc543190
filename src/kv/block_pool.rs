//! A pool of fixed-size KV blocks: which physical blocks are free. Sequences hold
//! block tables of ids from here and give them back when they finish.

use crate::backend::BLOCK_SIZE;

#[derive(Debug)]
pub struct BlockPool {
    num_blocks: usize,
    free: Vec<u32>,
}

impl BlockPool {
    pub fn new(num_blocks: usize) -> Self {
        // Reversed so that pops hand out low ids first (easier to read in dumps).
        BlockPool { num_blocks, free: (0..num_blocks as u32).rev().collect() }
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(tokens: usize) -> usize {
        tokens.div_ceil(BLOCK_SIZE)
    }

    /// Grows `table` so it covers `tokens` tokens; false (and no change) when the pool
    /// has too few free blocks.
    pub fn grow(&mut self, table: &mut Vec<u32>, tokens: usize) -> bool {
        let need = Self::blocks_for(tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return false;
        }
        for _ in 0..need {
            table.extend(self.free.pop());
        }
        true
    }

    /// Returns every block of `table` to the pool.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.append(table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_and_release_keep_the_pool_whole() {
        let mut pool = BlockPool::new(4);
        let mut a = Vec::new();
        assert!(pool.grow(&mut a, 17));
        assert_eq!(a.len(), 2);
        assert!(pool.grow(&mut a, 32));
        assert_eq!(a.len(), 2, "32 tokens still fit in two blocks");
        let mut b = Vec::new();
        assert!(!pool.grow(&mut b, 3 * BLOCK_SIZE), "only two blocks left");
        assert!(b.is_empty());
        pool.release(&mut a);
        assert_eq!(pool.num_free(), 4);
    }
}
