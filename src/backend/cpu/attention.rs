//! RoPE, the paged KV cache and causal paged attention on the CPU: the twins of
//! `kernels/rope.cu` and `kernels/attention_*.cu`. K/V are always read through the block
//! tables, so paging is exercised here exactly as on a GPU.

use rayon::prelude::*;

use super::attention_decode::decode_attention;
use super::softmax::{avx2_fma_if_present, softmax_in_place};
use super::CpuTensor;
use crate::backend::batch::slot_of;
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

    pub(super) fn width(&self) -> usize {
        self.shape.num_kv_heads * self.shape.head_dim
    }

    /// Layer `layer`'s keys and values, each `[num_blocks * BLOCK_SIZE, kv_heads*head_dim]`.
    pub(super) fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Writes k and v `[n, kv_heads*head_dim]` into `slots` of `layer`, skipping `NO_SLOT`.
    pub fn store(&mut self, layer: usize, slots: &[u32], k: &CpuTensor, v: &CpuTensor) {
        let w = self.width();
        for (t, &slot) in slots.iter().enumerate() {
            if slot == crate::backend::NO_SLOT {
                continue;
            }
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

/// Query rows per attention task: bounds the score matrix to `QUERY_BLOCK x context`.
const QUERY_BLOCK: usize = 64;

/// Up to this many query rows (decode), a sequence's rows go through
/// `attention_decode` (K/V read in place, split over the context); above it (prefill),
/// tasks gather K/V tiles once and run GEMMs.
const DIRECT_MAX_ROWS: usize = 4;

/// One unit of prefill attention work: a block of one sequence's query rows against one
/// KV head, for every query head of its group.
struct AttentionTask {
    seq: usize,
    kv_head: usize,
    /// Rows `first_row..first_row + rows` of the sequence's slice of the batch.
    first_row: usize,
    rows: usize,
}

/// Causal attention of every batch row over its own sequence's cached K/V.
/// q `[n, heads*head_dim]` -> `[n, heads*head_dim]`.
///
/// Decode rows: `attention_decode::decode_attention`. Prefill rows: per task, the KV
/// head's keys and values are gathered from their blocks into contiguous
/// `[context, head_dim]` tiles, then each query head of the group does two GEMMs
/// (scores = Q K^T, out = P V) around a masked softmax.
pub fn paged_attention(
    q: &CpuTensor,
    batch: &Batch,
    cache: &CpuKvCache,
    layer: usize,
    shape: AttentionShape,
) -> CpuTensor {
    let group = shape.num_heads / shape.num_kv_heads;
    let mut out = CpuTensor::zeros(q.rows, q.cols);
    decode_attention(q, batch, cache, layer, shape, DIRECT_MAX_ROWS, &mut out);
    let mut tasks = Vec::new();
    for (s, seq) in batch.seqs.iter().enumerate() {
        // Sequences with no new tokens this step have no rows; decode rows are done.
        if seq.len <= DIRECT_MAX_ROWS {
            continue;
        }
        for kv_head in 0..shape.num_kv_heads {
            for first_row in (0..seq.len).step_by(QUERY_BLOCK) {
                let rows = QUERY_BLOCK.min(seq.len - first_row);
                tasks.push(AttentionTask { seq: s, kv_head, first_row, rows });
            }
        }
    }
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|t| avx2_fma_if_present(|| attend(q, batch, cache, layer, shape, t)))
        .collect();
    let hd = shape.head_dim;
    for (t, result) in tasks.iter().zip(results) {
        let seq = &batch.seqs[t.seq];
        // result: [group, rows, head_dim]
        for (g, head_rows) in result.chunks(t.rows * hd).enumerate() {
            let head = t.kv_head * group + g;
            for (r, values) in head_rows.chunks(hd).enumerate() {
                let row = seq.start + t.first_row + r;
                out.data[row * q.cols + head * hd..][..hd].copy_from_slice(values);
            }
        }
    }
    out
}

/// One task's output, `[group, rows, head_dim]`, from gathered K/V tiles and GEMMs
/// (prefill).
#[inline(always)]
fn attend(
    q: &CpuTensor,
    batch: &Batch,
    cache: &CpuKvCache,
    layer: usize,
    shape: AttentionShape,
    task: &AttentionTask,
) -> Vec<f32> {
    let hd = shape.head_dim;
    let group = shape.num_heads / shape.num_kv_heads;
    let seq = &batch.seqs[task.seq];
    let first_pos = seq.context_len - seq.len + task.first_row;
    // Keys visible to the last row of the block (causal).
    let ctx = first_pos + task.rows;
    let kv_width = cache.width();
    let mut keys = vec![0.0f32; ctx * hd]; // [ctx, head_dim]
    let mut values = vec![0.0f32; ctx * hd]; // [ctx, head_dim]
    for j in 0..ctx {
        let src = slot_of(&seq.block_table, j) * kv_width + task.kv_head * hd;
        keys[j * hd..(j + 1) * hd].copy_from_slice(&cache.keys[layer][src..src + hd]);
        values[j * hd..(j + 1) * hd].copy_from_slice(&cache.values[layer][src..src + hd]);
    }
    let rows = task.rows;
    let mut scores = vec![0.0f32; rows * ctx]; // [rows, ctx]
    let mut out = vec![0.0f32; group * rows * hd]; // [group, rows, head_dim]
    for i in 0..group {
        let head = task.kv_head * group + i;
        let q_block = &q.data[(seq.start + task.first_row) * q.cols + head * hd..];
        // scores [rows, ctx] = scale * Q [rows, hd] (row stride q.cols) . K^T [hd, ctx]
        // SAFETY: every pointer/stride pair stays inside its slice: Q rows are
        // `rows` rows of `q.cols` starting at this head's columns; K is [ctx, hd].
        unsafe {
            matrixmultiply::sgemm(
                rows,
                hd,
                ctx,
                shape.scale,
                q_block.as_ptr(),
                q.cols as isize,
                1,
                keys.as_ptr(),
                1,
                hd as isize,
                0.0,
                scores.as_mut_ptr(),
                ctx as isize,
                1,
            );
        }
        for (r, row) in scores.chunks_mut(ctx).enumerate() {
            let visible = first_pos + r + 1;
            softmax_in_place(&mut row[..visible]);
            row[visible..].iter_mut().for_each(|s| *s = 0.0);
        }
        // out [rows, hd] = P [rows, ctx] . V [ctx, hd]
        // SAFETY: P is [rows, ctx], V is [ctx, hd], the output slice is [rows, hd].
        unsafe {
            matrixmultiply::sgemm(
                rows,
                ctx,
                hd,
                1.0,
                scores.as_ptr(),
                ctx as isize,
                1,
                values.as_ptr(),
                hd as isize,
                1,
                0.0,
                out[i * rows * hd..].as_mut_ptr(),
                hd as isize,
                1,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sequence with no new tokens this step (the CUDA parity suite builds such
    /// batches) writes no rows and leaves the other sequences' rows as they would be
    /// without it.
    #[test]
    fn an_empty_sequence_changes_nothing() {
        let shape = AttentionShape { num_heads: 4, num_kv_heads: 2, head_dim: 8, scale: 0.35 };
        let kv = KvCacheShape { num_layers: 1, num_blocks: 8, num_kv_heads: 2, head_dim: 8 };
        let mut cache = CpuKvCache::new(kv).expect("tiny cache");
        let value = |i: usize| ((i * 7919) % 23) as f32 / 11.0 - 1.0;
        let kv_rows =
            CpuTensor::from_vec((0..8 * BLOCK_SIZE * 16).map(value).collect(), 8 * BLOCK_SIZE, 16);
        let slots: Vec<u32> = (0..(8 * BLOCK_SIZE) as u32).collect();
        cache.store(0, &slots, &kv_rows, &kv_rows);

        let build = |with_empty: bool| {
            let mut batch = Batch::default();
            batch.push_seq(&[1, 2, 3], 5, &[0], true);
            if with_empty {
                batch.push_seq(&[], 20, &[1, 2], true);
            }
            batch.push_seq(&[4], 30, &[3, 4], true);
            batch
        };
        let (plain, with_empty) = (build(false), build(true));
        let q = CpuTensor::from_vec((0..4 * 32).map(|i| value(i + 3)).collect(), 4, 32);
        let expected = paged_attention(&q, &plain, &cache, 0, shape);
        let got = paged_attention(&q, &with_empty, &cache, 0, shape);
        assert_eq!(got.data, expected.data);
    }

    /// A token at NO_SLOT (a padding row of a graph-replayed CUDA step) is not stored;
    /// the others are, at their own slots.
    #[test]
    fn no_slot_rows_are_not_stored() {
        let kv = KvCacheShape { num_layers: 2, num_blocks: 2, num_kv_heads: 1, head_dim: 4 };
        let mut cache = CpuKvCache::new(kv).expect("tiny cache");
        let k = CpuTensor::from_vec((1..=12).map(|v| v as f32).collect(), 3, 4);
        let v = CpuTensor::from_vec((1..=12).map(|v| -v as f32).collect(), 3, 4);
        cache.store(1, &[5, crate::backend::NO_SLOT, 17], &k, &v);
        let mut keys = vec![0.0; 2 * BLOCK_SIZE * 4];
        keys[5 * 4..6 * 4].copy_from_slice(k.row(0));
        keys[17 * 4..18 * 4].copy_from_slice(k.row(2));
        let values: Vec<f32> = keys.iter().map(|&x| -x).collect();
        assert_eq!(cache.keys[1], keys);
        assert_eq!(cache.values[1], values); // -0.0 == 0.0 where nothing was stored
        assert!(cache.keys[0].iter().chain(&cache.values[0]).all(|&x| x == 0.0));
    }
}
