//! How the decode-attention kernels cover a batch (kernels/attention_decode.cu,
//! kernels/attention_decode_pipe.cu): which kernel, how many query heads per block, and
//! how the context is split so that one long sequence fills the GPU (split-K, merged by
//! the reduction pass, or inside the pipelined kernel). Used by attention.rs.

use crate::backend::abi::{
    BLOCK_SIZE, QILIN_ATTN_DECODE_MAX_GROUP, QILIN_ATTN_DECODE_MMA_MAX_GROUP,
    QILIN_ATTN_DECODE_MMA_THREADS, QILIN_ATTN_DECODE_PIPE_HD128_SMEM_BYTES,
    QILIN_ATTN_DECODE_PIPE_HD64_SMEM_BYTES, QILIN_ATTN_DECODE_PIPE_MAX_COUNTERS,
    QILIN_ATTN_DECODE_PIPE_THREADS, QILIN_ATTN_DECODE_THREADS, QILIN_WARP_SIZE,
};
use crate::backend::ptx::{self, Kernel};
use crate::backend::AttentionShape;

/// Decode blocks to aim for, in multiples of the SM count: several resident blocks per SM
/// keep enough K/V loads in flight to approach the memory bandwidth.
const DECODE_WAVES: usize = 4;
/// Fewest keys per decode split (unless forced): below this the per-split merge and the
/// reduction pass cost more than the extra parallelism gains.
const MIN_SPLIT_TOKENS: usize = 256;
/// As MIN_SPLIT_TOKENS for the tensor-core decode kernel, whose 4 warps take 16 keys
/// each: two rounds per split.
const MMA_MIN_SPLIT_TOKENS: usize = 128;
/// As MIN_SPLIT_TOKENS for the pipelined kernel: one 16-key block per warp. Its splits
/// are not bounded by a per-split cost but by the merge, which one block does (see
/// `new`).
const PIPE_MIN_SPLIT_TOKENS: usize = 64;

/// How the decode kernel covers the batch: grid (n_seqs, kv_heads * chunks, n_splits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    pub kernel: Kernel,
    /// Query heads per block and blocks per KV head (grid.y = kv_heads * chunks).
    pub group_chunk: usize,
    pub chunks: usize,
    /// Keys per split (a multiple of 16) and splits per sequence (grid.z).
    pub split_tokens: usize,
    pub n_splits: usize,
    /// Dynamic shared memory of one block: the cross-warp merge buffers.
    pub smem_bytes: usize,
    /// Threads per block of `kernel`.
    pub threads: u32,
    /// The pipelined kernel: it merges its splits itself (no reduction pass) through the
    /// device's counters, one per (sequence, grid.y row).
    pub pipe: bool,
}

impl DecodePlan {
    /// `n_seqs` bounds the decode rows (the kernel skips the other sequences) and
    /// `max_context` their context; `forced_split` overrides the split size. `pipe`: the
    /// pipelined kernel where it exists (head_dim 64 or 128, not `force_fma`) and the
    /// device's counters cover the batch; the tensor-core or FMA kernel otherwise.
    pub fn new(
        n_seqs: usize,
        shape: AttentionShape,
        max_context: usize,
        sm_count: usize,
        forced_split: Option<usize>,
        force_fma: bool,
        pipe: bool,
    ) -> DecodePlan {
        if pipe && !force_fma {
            if let Some(plan) = Self::pipelined(n_seqs, shape, max_context, sm_count, forced_split)
            {
                return plan;
            }
        }
        let group = shape.num_heads / shape.num_kv_heads;
        let mma_kernel = match shape.head_dim {
            64 => Some(ptx::ATTENTION_DECODE_MMA_HD64_BF16),
            128 => Some(ptx::ATTENTION_DECODE_MMA_HD128_BF16),
            _ => None,
        }
        .filter(|_| !force_fma);
        let max_group = match mma_kernel {
            Some(_) => QILIN_ATTN_DECODE_MMA_MAX_GROUP,
            None => QILIN_ATTN_DECODE_MAX_GROUP,
        } as usize;
        // Balanced chunks: a group of 12 runs as 6 + 6, not 8 + 4.
        let chunks = group.div_ceil(max_group);
        let group_chunk = group.div_ceil(chunks);
        let kernel = match mma_kernel {
            Some(kernel) => kernel,
            None if group_chunk <= 4 => ptx::ATTENTION_DECODE_G4_BF16,
            None => ptx::ATTENTION_DECODE_G8_BF16,
        };
        let min_split = if mma_kernel.is_some() { MMA_MIN_SPLIT_TOKENS } else { MIN_SPLIT_TOKENS };
        let blocks_per_split = (n_seqs * shape.num_kv_heads * chunks).max(1);
        let wanted = (DECODE_WAVES * sm_count).div_ceil(blocks_per_split);
        let (split_tokens, n_splits) = splits(max_context, wanted, min_split, forced_split);
        let warps = (QILIN_ATTN_DECODE_THREADS / QILIN_WARP_SIZE) as usize;
        // The tensor-core kernel's buffers are static.
        let smem_bytes = match mma_kernel {
            Some(_) => 0,
            None => warps * group_chunk * (shape.head_dim + 2) * std::mem::size_of::<f32>(),
        };
        let threads = match mma_kernel {
            Some(_) => QILIN_ATTN_DECODE_MMA_THREADS,
            None => QILIN_ATTN_DECODE_THREADS,
        };
        DecodePlan {
            kernel,
            group_chunk,
            chunks,
            split_tokens,
            n_splits,
            smem_bytes,
            threads,
            pipe: false,
        }
    }

    /// The pipelined kernel's plan, if it has a kernel for this head size and enough
    /// counters for the batch's merges.
    ///
    /// Splits: one block per SM, not several. Each block keeps 4 warps x 3 cache blocks of
    /// K/V (96 KiB for head_dim 128) in flight, so one per SM already asks for ~12 MB at
    /// once, more than the ~5 MB that cover the memory latency at full bandwidth; more,
    /// smaller splits would only make the merge longer: the last block of each KV head
    /// reads every split's partial output (~3.6 KB per split for 7 heads of 128) through
    /// one SM.
    fn pipelined(
        n_seqs: usize,
        shape: AttentionShape,
        max_context: usize,
        sm_count: usize,
        forced_split: Option<usize>,
    ) -> Option<DecodePlan> {
        let (kernel, smem_bytes) = match shape.head_dim {
            64 => (ptx::ATTENTION_DECODE_PIPE_HD64_BF16, QILIN_ATTN_DECODE_PIPE_HD64_SMEM_BYTES),
            128 => (ptx::ATTENTION_DECODE_PIPE_HD128_BF16, QILIN_ATTN_DECODE_PIPE_HD128_SMEM_BYTES),
            _ => return None,
        };
        let group = shape.num_heads / shape.num_kv_heads;
        let chunks = group.div_ceil(QILIN_ATTN_DECODE_MMA_MAX_GROUP as usize);
        let group_chunk = group.div_ceil(chunks);
        let blocks_per_split = (n_seqs * shape.num_kv_heads * chunks).max(1);
        let wanted = sm_count / blocks_per_split;
        let (split_tokens, n_splits) =
            splits(max_context, wanted, PIPE_MIN_SPLIT_TOKENS, forced_split);
        if n_splits > 1 && blocks_per_split > QILIN_ATTN_DECODE_PIPE_MAX_COUNTERS as usize {
            return None;
        }
        Some(DecodePlan {
            kernel,
            group_chunk,
            chunks,
            split_tokens,
            n_splits,
            smem_bytes: smem_bytes as usize,
            threads: QILIN_ATTN_DECODE_PIPE_THREADS,
            pipe: true,
        })
    }
}

/// `(split_tokens, n_splits)` over a context of `max_context` keys: the forced split, or
/// as many splits as `wanted` (at least one) but none shorter than `min_split` keys, each
/// a whole number of cache blocks.
fn splits(
    max_context: usize,
    wanted: usize,
    min_split: usize,
    forced_split: Option<usize>,
) -> (usize, usize) {
    let max_context = max_context.max(1);
    let split_tokens = forced_split.unwrap_or_else(|| {
        let most = max_context.div_ceil(min_split).max(1);
        max_context.div_ceil(wanted.max(1).min(most)).next_multiple_of(BLOCK_SIZE)
    });
    assert!(
        split_tokens > 0 && split_tokens.is_multiple_of(BLOCK_SIZE),
        "attention: decode split of {split_tokens} keys"
    );
    (split_tokens, max_context.div_ceil(split_tokens))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::attention::MAX_GRID_YZ;

    fn shape(heads: usize, kv: usize, hd: usize) -> AttentionShape {
        AttentionShape {
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
        }
    }

    #[test]
    fn decode_plan_covers_every_context_and_fills_the_gpu() {
        for (heads, kv, hd) in [(28, 4, 128), (9, 3, 64), (16, 1, 64), (12, 1, 96), (8, 8, 256)] {
            for n_seqs in [1, 3, 8, 64, 256] {
                for ctx in [1, 15, 16, 17, 255, 1000, 8192, 32768, 131072] {
                    for fma in [false, true] {
                        let plan = DecodePlan::new(
                            n_seqs,
                            shape(heads, kv, hd),
                            ctx,
                            132,
                            None,
                            fma,
                            false,
                        );
                        let label =
                            format!("{heads}/{kv}/{hd}, {n_seqs} seqs, ctx {ctx}: {plan:?}");
                        assert!(plan.n_splits * plan.split_tokens >= ctx, "{label}");
                        assert!(
                            (plan.n_splits - 1) * plan.split_tokens < ctx,
                            "{label}: empty split"
                        );
                        assert_eq!(plan.split_tokens % BLOCK_SIZE, 0, "{label}");
                        assert!(plan.n_splits <= MAX_GRID_YZ, "{label}");
                        assert!(plan.group_chunk * plan.chunks >= heads / kv, "{label}");
                        let mma = !fma && (hd == 64 || hd == 128);
                        let (max_group, min_split) = match mma {
                            true => (QILIN_ATTN_DECODE_MMA_MAX_GROUP, MMA_MIN_SPLIT_TOKENS),
                            false => (QILIN_ATTN_DECODE_MAX_GROUP, MIN_SPLIT_TOKENS),
                        };
                        assert!(plan.group_chunk <= max_group as usize, "{label}");
                        assert!(plan.smem_bytes <= 48 * 1024, "{label}");
                        if ctx >= 2 * min_split {
                            assert!(plan.split_tokens >= min_split, "{label}: tiny splits");
                        }
                    }
                }
            }
        }
        // One 32K sequence of Qwen2.5-7B: 4 KV heads alone would use 4 SMs.
        for fma in [false, true] {
            let plan = DecodePlan::new(1, shape(28, 4, 128), 32768, 132, None, fma, false);
            let blocks = 4 * plan.n_splits;
            assert!((2 * 132..=4 * 132).contains(&blocks), "{plan:?}: {blocks} blocks");
            // A full decode batch needs no split at all.
            let plan = DecodePlan::new(256, shape(28, 4, 128), 2000, 132, None, fma, false);
            assert_eq!(plan.n_splits, 1, "{plan:?}");
        }
        let kernel = |shape, fma| DecodePlan::new(1, shape, 100, 132, None, fma, false).kernel;
        assert_eq!(kernel(shape(28, 4, 128), false), ptx::ATTENTION_DECODE_MMA_HD128_BF16);
        assert_eq!(kernel(shape(28, 4, 128), true), ptx::ATTENTION_DECODE_G8_BF16);
        assert_eq!(kernel(shape(9, 3, 64), false), ptx::ATTENTION_DECODE_MMA_HD64_BF16);
        // SmolLM2 (group 3) takes the narrow FMA kernel; head_dim 96 has no mma kernel.
        assert_eq!(kernel(shape(9, 3, 64), true), ptx::ATTENTION_DECODE_G4_BF16);
        assert_eq!(kernel(shape(12, 1, 96), false), ptx::ATTENTION_DECODE_G8_BF16);
        // A group of 16 is one mma tile, or two FMA chunks of 8; 32 two tiles.
        let plan = DecodePlan::new(1, shape(16, 1, 64), 100, 132, None, false, false);
        assert_eq!((plan.chunks, plan.group_chunk), (1, 16));
        let plan = DecodePlan::new(1, shape(16, 1, 64), 100, 132, None, true, false);
        assert_eq!((plan.chunks, plan.group_chunk), (2, 8));
        let plan = DecodePlan::new(1, shape(32, 1, 128), 100, 132, None, false, false);
        assert_eq!((plan.chunks, plan.group_chunk), (2, 16));
    }
    #[test]
    fn forced_split_is_used_as_is() {
        let plan = DecodePlan::new(2, shape(28, 4, 128), 1000, 132, Some(16), false, false);
        assert_eq!((plan.split_tokens, plan.n_splits), (16, 63));
        let plan = DecodePlan::new(2, shape(28, 4, 128), 1000, 132, Some(16), false, true);
        assert_eq!((plan.split_tokens, plan.n_splits, plan.pipe), (16, 63, true));
    }

    #[test]
    fn pipelined_plan_covers_every_context_with_one_block_per_sm() {
        for (heads, kv, hd) in [(28, 4, 128), (9, 3, 64), (16, 1, 64), (32, 1, 128)] {
            for n_seqs in [1, 3, 8, 64, 256] {
                for ctx in [1, 15, 16, 17, 255, 1000, 8192, 32768, 131072] {
                    let plan =
                        DecodePlan::new(n_seqs, shape(heads, kv, hd), ctx, 132, None, false, true);
                    let label = format!("{heads}/{kv}/{hd}, {n_seqs} seqs, ctx {ctx}: {plan:?}");
                    assert!(plan.pipe, "{label}");
                    assert!(plan.n_splits * plan.split_tokens >= ctx, "{label}");
                    assert!((plan.n_splits - 1) * plan.split_tokens < ctx, "{label}: empty split");
                    assert_eq!(plan.split_tokens % BLOCK_SIZE, 0, "{label}");
                    assert!(plan.group_chunk <= QILIN_ATTN_DECODE_MMA_MAX_GROUP as usize);
                    assert!(plan.group_chunk * plan.chunks >= heads / kv, "{label}");
                    let blocks = n_seqs * kv * plan.chunks * plan.n_splits;
                    // At most one wave of one block per SM, unless the batch alone is more.
                    assert!(blocks <= 132 || plan.n_splits == 1, "{label}: {blocks} blocks");
                    if ctx >= 2 * PIPE_MIN_SPLIT_TOKENS && n_seqs * kv * plan.chunks <= 66 {
                        assert!(plan.n_splits >= 2, "{label}: the GPU left idle");
                    }
                }
            }
        }
        // Qwen2.5-7B, one 8K sequence: 32 splits of 256 keys, 128 blocks.
        let plan = DecodePlan::new(1, shape(28, 4, 128), 8192, 132, None, false, true);
        assert_eq!((plan.split_tokens, plan.n_splits), (256, 32), "{plan:?}");
        assert_eq!(plan.kernel, ptx::ATTENTION_DECODE_PIPE_HD128_BF16);
        assert_eq!(plan.smem_bytes, QILIN_ATTN_DECODE_PIPE_HD128_SMEM_BYTES as usize);
        // No pipelined kernel for head_dim 96, and the FMA switch wins.
        let plan = DecodePlan::new(1, shape(12, 1, 96), 8192, 132, None, false, true);
        assert!(!plan.pipe && plan.kernel == ptx::ATTENTION_DECODE_G8_BF16, "{plan:?}");
        let plan = DecodePlan::new(1, shape(28, 4, 128), 8192, 132, None, true, true);
        assert!(!plan.pipe, "{plan:?}");
        // More merges than counters: the tensor-core kernel and its reduction pass.
        let plan = DecodePlan::new(4096, shape(28, 4, 128), 8192, 132, Some(256), false, true);
        assert!(!plan.pipe && plan.n_splits == 32, "{plan:?}");
    }
}
