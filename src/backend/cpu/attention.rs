//! RoPE, the paged KV cache and causal paged attention on the CPU: the twins of
//! `kernels/rope.cu` and `kernels/attention_*.cu`. K/V are always read through the block
//! tables, so paging is exercised here exactly as on a GPU.

use rayon::prelude::*;

use super::linear::dot_f32;
use super::CpuTensor;
use crate::backend::{AttentionShape, BackendError, Batch, KvCacheShape, BLOCK_SIZE};
use crate::model::rope::RopeTable;

pub struct CpuKvCache {
    pub shape: KvCacheShape,
    keys: Vec<Vec<f32>>, // [layers][num_blocks * BLOCK_SIZE, kv_heads * head_dim]
    values: Vec<Vec<f32>>, // [layers][num_blocks * BLOCK_SIZE, kv_heads * head_dim]
}

impl CpuKvCache {
    pub fn new(shape: KvCacheShape) -> Result<Self, BackendError> {
        let per_layer = shape
            .num_blocks
            .checked_mul(BLOCK_SIZE * shape.num_kv_heads * shape.head_dim)
            .ok_or_else(|| BackendError::OutOfMemory(format!("KV cache of {shape:?}")))?;
        if per_layer.checked_mul(8 * shape.num_layers).is_none_or(|b| b > isize::MAX as usize) {
            return Err(BackendError::OutOfMemory(format!("KV cache of {shape:?}")));
        }
        // Zeroed allocations are lazily committed by the OS: blocks never used cost nothing.
        let keys = (0..shape.num_layers).map(|_| vec![0.0f32; per_layer]).collect();
        let values = (0..shape.num_layers).map(|_| vec![0.0f32; per_layer]).collect();
        Ok(CpuKvCache { shape, keys, values })
    }

    fn width(&self) -> usize {
        self.shape.num_kv_heads * self.shape.head_dim
    }

    /// Writes k and v `[n, kv_heads*head_dim]` into `slots` of `layer`.
    pub fn store(&mut self, layer: usize, slots: &[u32], k: &CpuTensor, v: &CpuTensor) {
        let w = self.width();
        for (t, &slot) in slots.iter().enumerate() {
            let dst = slot as usize * w..(slot as usize + 1) * w;
            self.keys[layer][dst.clone()].copy_from_slice(k.row(t));
            self.values[layer][dst].copy_from_slice(v.row(t));
        }
    }
}

/// Rotate-half (NEOX) RoPE in place on `x [n, heads*head_dim]`, row t at `positions[t]`.
pub fn apply_rope(x: &mut CpuTensor, positions: &[u32], rope: &RopeTable, head_dim: usize) {
    let half = head_dim / 2;
    let cols = x.cols;
    for (row, &pos) in x.data.chunks_mut(cols).zip(positions) {
        let (cos, sin) = rope.at(pos as usize);
        for head in row.chunks_mut(head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

/// Causal attention of every batch row over its own sequence's cached K/V.
/// q `[n, heads*head_dim]` -> `[n, heads*head_dim]`.
pub fn paged_attention(
    q: &CpuTensor,
    batch: &Batch,
    cache: &CpuKvCache,
    layer: usize,
    shape: AttentionShape,
) -> CpuTensor {
    let hd = shape.head_dim;
    let group = shape.num_heads / shape.num_kv_heads;
    let kv_width = cache.width();
    let keys = &cache.keys[layer];
    let values = &cache.values[layer];
    // Which sequence each batch row belongs to.
    let mut row_seq = vec![0usize; q.rows];
    for (s, seq) in batch.seqs.iter().enumerate() {
        row_seq[seq.start..seq.start + seq.len].iter_mut().for_each(|r| *r = s);
    }
    let mut out = CpuTensor::zeros(q.rows, q.cols);
    out.data.par_chunks_mut(hd).enumerate().for_each_init(Vec::new, |scores, (idx, out_head)| {
        let (row, head) = (idx / shape.num_heads, idx % shape.num_heads);
        let seq = &batch.seqs[row_seq[row]];
        let pos = seq.context_len - seq.len + (row - seq.start);
        let kv_head = head / group;
        let q_head = &q.row(row)[head * hd..(head + 1) * hd];
        let slot_offset = |j: usize| {
            let slot = seq.block_table[j / BLOCK_SIZE] as usize * BLOCK_SIZE + j % BLOCK_SIZE;
            slot * kv_width + kv_head * hd
        };
        scores.clear();
        let mut max = f32::NEG_INFINITY;
        for j in 0..=pos {
            let off = slot_offset(j);
            let s = dot_f32(q_head, &keys[off..off + hd]) * shape.scale;
            max = max.max(s);
            scores.push(s);
        }
        let mut sum = 0.0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for (j, &p) in scores.iter().enumerate() {
            let off = slot_offset(j);
            let w = p * inv;
            for (o, &v) in out_head.iter_mut().zip(&values[off..off + hd]) {
                *o += w * v;
            }
        }
    });
    out
}
