//! The batch metadata on the device: uploaded once per step, then read by the RoPE/KV
//! write and attention kernels of every layer.

use cudarc::driver::CudaSlice;

use super::device::Device;
use crate::backend::{Batch, BLOCK_SIZE};

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
        let stride = batch.seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0);
        let max_context = batch.seqs.iter().map(|s| s.context_len).max().unwrap_or(0);
        DeviceBatch::upload_padded(dev, batch, stride, max_context)
    }

    /// The metadata of `batch` with block tables `stride` wide and `max_context_len`
    /// declared as `max_context` (at least every context of the batch): the fixed shape a
    /// CUDA graph is captured with, so later batches of the same size fit (`refresh`).
    pub fn upload_padded(
        dev: &Device,
        batch: &Batch,
        stride: usize,
        max_context: usize,
    ) -> DeviceBatch {
        let host = HostMeta::new(batch, stride, max_context);
        DeviceBatch {
            n_tokens: batch.n_tokens(),
            n_seqs: batch.seqs.len(),
            max_blocks_per_seq: stride,
            max_context_len: max_context,
            max_query_len: batch.seqs.iter().map(|s| s.len).max().unwrap_or(0),
            positions: dev.upload(&batch.positions),
            slot_mapping: dev.upload(&batch.slot_mapping),
            token_seq: dev.upload(&host.token_seq),
            seq_starts: dev.upload(&host.seq_starts),
            context_lens: dev.upload(&host.context_lens),
            block_tables: dev.upload(&host.block_tables),
        }
    }

    /// Overwrites the buffers with `batch`, which must have the shape this was uploaded
    /// with: as many tokens and sequences, as long a longest query, and every context
    /// within `max_context_len` (block tables are cut to the stride, which covers it).
    pub fn refresh(&mut self, dev: &Device, batch: &Batch) {
        assert_eq!(
            (batch.n_tokens(), batch.seqs.len()),
            (self.n_tokens, self.n_seqs),
            "refresh: the batch's shape differs from the captured one"
        );
        assert!(
            batch.seqs.iter().all(|s| s.len <= self.max_query_len),
            "refresh: a sequence has more new tokens than the captured batch"
        );
        let host = HostMeta::new(batch, self.max_blocks_per_seq, self.max_context_len);
        dev.upload_into(&batch.positions, &mut self.positions);
        dev.upload_into(&batch.slot_mapping, &mut self.slot_mapping);
        dev.upload_into(&host.token_seq, &mut self.token_seq);
        dev.upload_into(&host.seq_starts, &mut self.seq_starts);
        dev.upload_into(&host.context_lens, &mut self.context_lens);
        dev.upload_into(&host.block_tables, &mut self.block_tables);
    }
}

/// The per-sequence arrays of a batch as the kernels read them.
struct HostMeta {
    token_seq: Vec<u32>,    // [n_tokens]
    seq_starts: Vec<u32>,   // [n_seqs + 1]
    context_lens: Vec<u32>, // [n_seqs]
    block_tables: Vec<u32>, // [n_seqs, stride], padded with 0
}

impl HostMeta {
    /// Panics when a context exceeds `max_context` or `stride` blocks cannot hold it (a
    /// block table may be longer than its context needs: the rest is cut).
    fn new(batch: &Batch, stride: usize, max_context: usize) -> HostMeta {
        let n_seqs = batch.seqs.len();
        let mut token_seq = vec![0u32; batch.n_tokens()];
        let mut seq_starts = Vec::with_capacity(n_seqs + 1);
        let mut context_lens = Vec::with_capacity(n_seqs);
        let mut block_tables = vec![0u32; n_seqs * stride];
        for (i, seq) in batch.seqs.iter().enumerate() {
            assert!(
                seq.context_len <= max_context && seq.context_len <= stride * BLOCK_SIZE,
                "batch metadata: a context of {} tokens in a batch shaped for {max_context} \
                 ({stride} blocks per sequence)",
                seq.context_len
            );
            token_seq[seq.start..seq.start + seq.len].fill(i as u32);
            seq_starts.push(seq.start as u32);
            context_lens.push(seq.context_len as u32);
            let kept = seq.block_table.len().min(stride);
            block_tables[i * stride..][..kept].copy_from_slice(&seq.block_table[..kept]);
        }
        seq_starts.push(batch.n_tokens() as u32);
        HostMeta { token_seq, seq_starts, context_lens, block_tables }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        let mut batch = Batch::default();
        batch.push_seq(&[1, 2, 3], 0, &[7], true); // prefill of 3
        batch.push_seq(&[4], 20, &[8, 9, 10, 11], true); // decode at 20, a table of 4 blocks
        batch
    }

    #[test]
    fn arrays_follow_the_batch_and_tables_are_cut_to_the_stride() {
        let meta = HostMeta::new(&batch(), 2, 64);
        assert_eq!(meta.token_seq, [0, 0, 0, 1]);
        assert_eq!(meta.seq_starts, [0, 3, 4]);
        assert_eq!(meta.context_lens, [3, 21]);
        // Two columns: the first sequence's one block then a zero, the second's first two
        // (its context of 21 needs two; the blocks past them are not read).
        assert_eq!(meta.block_tables, [7, 0, 8, 9]);
        // A wider stride pads with zeros.
        let wide = HostMeta::new(&batch(), 5, 80);
        assert_eq!(wide.block_tables, [7, 0, 0, 0, 0, 8, 9, 10, 11, 0]);
    }

    #[test]
    #[should_panic(expected = "a context of 21 tokens")]
    fn a_context_past_the_stride_is_refused() {
        HostMeta::new(&batch(), 1, 64);
    }

    #[test]
    #[should_panic(expected = "a context of 21 tokens")]
    fn a_context_past_the_declared_maximum_is_refused() {
        HostMeta::new(&batch(), 4, 20);
    }
}
