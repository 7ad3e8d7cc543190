// Helpers shared by the paged-attention kernel files (attention_decode.cu,
// attention_prefill.cu, attention_simple.cu): the paged-cache slot lookup and the softmax constants. Nothing
// here is specific to one kernel's tiling.
#pragma once

#include "common.cuh"

// Scores are kept in the log2 domain: s2 = q.k * scale * log2(e), so exp(s - m) of the
// softmax becomes exp2f(s2 - m2), one MUFU.EX2 instead of a multiply plus EX2.
#define QILIN_LOG2E 1.4426950408889634f

// The cache row of position `pos` of a sequence whose block-table row is `table`
// (max_blocks_per_seq entries): table[pos / 16] * 16 + pos % 16, exactly
// backend::batch::slot_of. A position past the table or a block id past the cache is a
// launcher/engine bug; trapping beats reading another sequence's keys.
QILIN_DEVICE size_t attention_cache_slot(const uint32_t* __restrict__ table, unsigned pos,
                                         const QilinAttentionParams& p) {
    const unsigned logical = pos / QILIN_BLOCK_SIZE;
    if (logical >= p.max_blocks_per_seq) {
        __trap();
    }
    const size_t slot = (size_t)__ldg(table + logical) * QILIN_BLOCK_SIZE + pos % QILIN_BLOCK_SIZE;
    if (slot >= p.cache_slots) {
        __trap();
    }
    return slot;
}

// exp2(m_old - m_new) as the factor that rescales a partial softmax state from running max
// m_old to m_new >= m_old, where an empty state (m_old = -inf, sum 0, acc 0) gets factor
// 0 even when m_new is -inf too (exp2f(-inf - -inf) would be NaN).
QILIN_DEVICE float attention_rescale(float m_old, float m_new) {
    return m_old == -INFINITY ? 0.0f : exp2f(m_old - m_new);
}
