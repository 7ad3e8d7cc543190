//! The batch metadata on the device: uploaded once per step, then read by the RoPE/KV
//! write and attention kernels of every layer.

use cudarc::driver::CudaSlice;

use super::device::Device;
use crate::backend::Batch;

pub struct DeviceBatch {
    pub n_tokens: usize,
    pub n_seqs: usize,
    /// Columns of `block_tables` (the longest block table in the batch).
    pub max_blocks_per_seq: usize,
    /// Longest `context_len` in the batch.
    pub max_context_len: usize,
    /// Most new tokens of one sequence in this step (1 for a decode-only batch).
    pub max_query_len: usize,
    pub positions: CudaSlice<u32>,    // [n_tokens]
    pub slot_mapping: CudaSlice<u32>, // [n_tokens]
    pub token_seq: CudaSlice<u32>,    // [n_tokens] index of each token's sequence
    pub seq_starts: CudaSlice<u32>,   // [n_seqs + 1] first token row of each sequence
    pub context_lens: CudaSlice<u32>, // [n_seqs] tokens in the cache after this step
    pub block_tables: CudaSlice<u32>, // [n_seqs, max_blocks_per_seq], padded with 0
}

impl DeviceBatch {
    pub fn upload(dev: &Device, batch: &Batch) -> DeviceBatch {
        let n_seqs = batch.seqs.len();
        let max_blocks_per_seq = batch.seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0);
        let mut token_seq = vec![0u32; batch.n_tokens()];
        let mut seq_starts = Vec::with_capacity(n_seqs + 1);
        let mut context_lens = Vec::with_capacity(n_seqs);
        let mut block_tables = vec![0u32; n_seqs * max_blocks_per_seq];
        for (i, seq) in batch.seqs.iter().enumerate() {
            token_seq[seq.start..seq.start + seq.len].fill(i as u32);
            seq_starts.push(seq.start as u32);
            context_lens.push(seq.context_len as u32);
            let row = &mut block_tables[i * max_blocks_per_seq..][..seq.block_table.len()];
            row.copy_from_slice(&seq.block_table);
        }
        seq_starts.push(batch.n_tokens() as u32);
        DeviceBatch {
            n_tokens: batch.n_tokens(),
            n_seqs,
            max_blocks_per_seq,
            max_context_len: batch.seqs.iter().map(|s| s.context_len).max().unwrap_or(0),
            max_query_len: batch.seqs.iter().map(|s| s.len).max().unwrap_or(0),
            positions: dev.upload(&batch.positions),
            slot_mapping: dev.upload(&batch.slot_mapping),
            token_seq: dev.upload(&token_seq),
            seq_starts: dev.upload(&seq_starts),
            context_lens: dev.upload(&context_lens),
            block_tables: dev.upload(&block_tables),
        }
    }
}
