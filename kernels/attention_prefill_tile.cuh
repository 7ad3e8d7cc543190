// The query-tile bookkeeping shared by the tensor-core prefill kernels
// (attention_prefill.cu, attention_prefill_v2.cu): block geometry constants and the map
// from a grid slot to (sequence, query tile) described in attention_prefill.cu's header.
#pragma once

#include "attention_common.cuh"

static constexpr int PREFILL_THREADS = QILIN_ATTN_PREFILL_THREADS;
static constexpr int PREFILL_WARPS = PREFILL_THREADS / QILIN_WARP_SIZE;
static constexpr int SMEM_PAD = 8;  // bf16 per shared row beyond D

static_assert(QILIN_ATTN_PREFILL_WIDE_BLOCK_M == 32 * PREFILL_WARPS, "32 query rows per warp");
static_assert(QILIN_ATTN_PREFILL_BLOCK_N % 16 == 0 &&
                  QILIN_ATTN_PREFILL_BLOCK_N % QILIN_BLOCK_SIZE == 0,
              "BLOCK_N in whole blocks");

// ---------------------------------------------------------------------------------------
// Tensor-core kernel.

// The sequence and query tile of tile slot b (see the header) for query tiles of
// `block_m` rows; false: nothing to do.
QILIN_DEVICE bool prefill_tile_of(const QilinAttentionParams& p,
                                  const uint32_t* __restrict__ seq_starts,
                                  unsigned block_m,
                                  unsigned b,
                                  unsigned& seq,
                                  unsigned& tile) {
    if (p.n_seqs == 0) {
        return false;
    }
    unsigned lo = 0;
    unsigned hi = p.n_seqs - 1;
    while (lo < hi) {
        const unsigned mid = (lo + hi + 1) / 2;
        if (seq_starts[mid] / block_m + mid <= b) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    const unsigned first = seq_starts[lo] / block_m + lo;
    if (first > b) {
        return false;  // only if seq_starts[0] != 0 (a broken batch)
    }
    seq = lo;
    tile = b - first;
    return true;
}

// D: head_dim. MT: m16 tiles of query rows per warp (2: 128-row tiles, each K/V fragment
// read from shared memory feeding two mma). BN: keys per tile.
