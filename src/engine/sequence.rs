//! One request's state as the scheduler sees it: its tokens, how many of them already
//! have K/V in the paged cache, and the blocks that hold them.
//!
//! There is no separate "prefill" or "decode" flag: a sequence is decoding exactly when
//! one token (the last sampled one) is left to feed, and prefilling when more are. A
//! sequence preempted by recompute keeps its generated tokens and simply prefills all of
//! them again.

pub type SeqId = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    pub id: SeqId,
    /// The prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens of `tokens` whose K/V are in the cache.
    pub num_computed: usize,
    /// Physical KV block of each logical block; empty while waiting.
    pub block_table: Vec<u32>,
    /// Generation stops at `prompt_len + max_tokens` tokens (the engine decides; the
    /// scheduler uses it to reject requests that could never fit the cache).
    pub max_tokens: usize,
}

impl Sequence {
    pub fn new(id: SeqId, prompt: Vec<u32>, max_tokens: usize) -> Self {
        let prompt_len = prompt.len();
        Sequence {
            id,
            tokens: prompt,
            prompt_len,
            num_computed: 0,
            block_table: Vec::new(),
            max_tokens,
        }
    }

    pub fn num_generated(&self) -> usize {
        self.tokens.len().saturating_sub(self.prompt_len)
    }

    /// Tokens still to be fed to the model before the next logits.
    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len().saturating_sub(self.num_computed)
    }

    /// Only the last sampled token is left to feed: the next step is a one-token decode.
    pub fn is_decoding(&self) -> bool {
        self.num_uncomputed() == 1
    }

    /// The most KV slots this sequence can ever occupy when the engine finishes it at
    /// `prompt_len + max_tokens` tokens or `max_model_len`, whichever comes first: the
    /// last sampled token is never fed, so it needs no slot.
    pub fn max_kv_tokens(&self, max_model_len: usize) -> usize {
        let end = self.prompt_len.saturating_add(self.max_tokens).min(max_model_len);
        end.saturating_sub(1).max(self.prompt_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoding_is_one_token_left() {
        let mut s = Sequence::new(7, vec![1, 2, 3], 4);
        assert!(!s.is_decoding());
        s.num_computed = 3;
        s.tokens.push(9);
        assert!(s.is_decoding());
        assert_eq!(s.num_generated(), 1);
        // Prompt 3 + 4 new tokens: the 7th token is sampled but never fed.
        assert_eq!(s.max_kv_tokens(100), 6);
        assert_eq!(s.max_kv_tokens(5), 4);
        assert_eq!(s.max_kv_tokens(2), 3, "never below the prompt itself");
    }
}
