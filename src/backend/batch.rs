//! What one forward step sees: the tokens of every sequence in the batch and where their
//! keys and values live in the paged cache. Built once per step by the engine and read
//! by every backend, so paging is exercised on the CPU exactly as on a GPU.

/// Tokens per KV-cache block.
pub const BLOCK_SIZE: usize = 16;

/// A `slot_mapping` entry whose token's K/V is not stored: the padding rows of a decode
/// step that the CUDA backend replays through a graph captured for a larger batch
/// (backend/cuda/graph.rs). kernels/abi.h's QILIN_NO_SLOT.
pub const NO_SLOT: u32 = super::abi::QILIN_NO_SLOT;

/// One sequence's part of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqSlice {
    /// This sequence's tokens are `Batch::token_ids[start..start + len]`.
    pub start: usize,
    pub len: usize,
    /// Tokens in the cache once this step has written its own: the new tokens sit at
    /// positions `context_len - len .. context_len`.
    pub context_len: usize,
    /// Physical block of each logical block: token at position p lives in slot
    /// `block_table[p / BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE`.
    pub block_table: Vec<u32>,
}

/// The cache slot of position `pos` of a sequence with this block table.
pub fn slot_of(block_table: &[u32], pos: usize) -> usize {
    block_table[pos / BLOCK_SIZE] as usize * BLOCK_SIZE + pos % BLOCK_SIZE
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub token_ids: Vec<u32>,    // [n_tokens]
    pub positions: Vec<u32>,    // [n_tokens]
    pub slot_mapping: Vec<u32>, // [n_tokens] cache slot each token's K/V is written to, or NO_SLOT
    pub seqs: Vec<SeqSlice>,    // [n_seqs], in token order
    /// Rows of the batch whose logits are wanted (usually each sequence's last token).
    pub logits_rows: Vec<u32>, // [n_logits]
    /// Whether each row's token was generated (sampled by the model and fed back) rather
    /// than given in the prompt. A backend may compute generated rows with cheaper
    /// numerics (`Backend::step_linear`); prompt rows never, so that a prompt token's
    /// K/V does not depend on which step computed it (a prefix-cache hit, a chunk size).
    pub generated: Vec<bool>, // [n_tokens]
}

impl Batch {
    pub fn n_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Whether every row wants its logits, in row order (every decode step does).
    pub fn logits_from_every_row(&self) -> bool {
        self.logits_rows.len() == self.n_tokens()
            && self.logits_rows.iter().enumerate().all(|(i, &row)| row as usize == i)
    }

    /// Appends one sequence's chunk of prompt tokens: `tokens` at positions
    /// `first_pos..`, with K/V slots from `block_table`, asking for the logits of its
    /// last token when `want_logits`.
    pub fn push_seq(
        &mut self,
        tokens: &[u32],
        first_pos: usize,
        block_table: &[u32],
        want_logits: bool,
    ) {
        self.push_seq_of_prompt(tokens, first_pos, block_table, want_logits, usize::MAX);
    }

    /// A decode row: one generated `token` at position `pos`, wanting its logits.
    pub fn push_decode(&mut self, token: u32, pos: usize, block_table: &[u32]) {
        self.push_seq_of_prompt(&[token], pos, block_table, true, pos);
    }

    /// `push_seq` for a sequence whose prompt is its first `prompt_len` tokens: the
    /// tokens at positions `prompt_len..` are generated rows (`generated`).
    pub fn push_seq_of_prompt(
        &mut self,
        tokens: &[u32],
        first_pos: usize,
        block_table: &[u32],
        want_logits: bool,
        prompt_len: usize,
    ) {
        let start = self.token_ids.len();
        for (i, &t) in tokens.iter().enumerate() {
            let pos = first_pos + i;
            self.token_ids.push(t);
            self.positions.push(pos as u32);
            self.slot_mapping.push(slot_of(block_table, pos) as u32);
            self.generated.push(pos >= prompt_len);
        }
        if want_logits && !tokens.is_empty() {
            self.logits_rows.push((start + tokens.len() - 1) as u32);
        }
        self.seqs.push(SeqSlice {
            start,
            len: tokens.len(),
            context_len: first_pos + tokens.len(),
            block_table: block_table.to_vec(),
        });
    }
}
