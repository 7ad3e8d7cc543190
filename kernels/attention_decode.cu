// Paged causal attention for decode rows (sequences with exactly one new token this
// step): split-K flash-decoding plus a reduction pass. bf16 q and KV cache, f32 softmax
// and accumulation. CPU twin: backend::cpu::attention::paged_attention (attend_direct).
//
// Semantics, for every sequence s with seq_starts[s + 1] - seq_starts[s] == 1, its row
// t = seq_starts[s] at position pos = context_lens[s] - 1, and every query head h:
//   kv   = h / (num_heads / num_kv_heads)                         (GQA)
//   K_j  = k_cache[slot(s, j)][kv*D .. kv*D + D), j = 0 ..= pos     (V_j likewise)
//   slot(s, j) = block_tables[s][j / 16] * 16 + j % 16
//   out[t][h*D + d] = bf16_rne( sum_j softmax_j(scale * q_h . K_j) * V_j[d] )
// Rows of other sequences are not touched (the prefill kernel writes them).
//
// Design (one block = one sequence x one KV head x one split of its keys):
//   grid  = (n_seqs, num_kv_heads * chunks, n_splits), block = QILIN_ATTN_DECODE_THREADS.
//   chunks = ceil(group / group_chunk): normally 1, so the block serves every query head of
//   its KV head and each K/V row is read from memory once per group (GQA). A split covers
//   keys [z * split_tokens, min((z + 1) * split_tokens, ctx)); blocks past a sequence's
//   last split exit at once.
//   Threads: a key is handled by tpk = next_pow2(D / 8) lanes, each owning one 16-byte
//   vector (8 dims) of K and of V; the block works on 128 / tpk keys at a time (8 for
//   D = 128, 16 for D = 64), UNROLL of them per lane in flight. Per key, the q.k partial
//   dots of all heads are summed over the key's lanes with xor-shuffles, then each lane
//   group updates its own online-softmax state (running max m, sum l, acc[8] per head) in
//   registers: no shared memory and no barrier in the key loop. At the end the lane
//   groups are merged (shuffles inside a warp, shared memory across warps).
//   n_splits == 1: the block writes out directly. n_splits > 1: it writes its partial
//   (m, l, acc) and qilin_attention_decode_reduce_bf16 merges the splits.
//   Scores live in the log2 domain (q pre-scaled by scale * log2 e) so every exponential
//   is one exp2f.
//   Two entry points size the per-lane state (q and acc: 16 floats per head) to the group:
//   _g4 (group_chunk <= 4: SmolLM2, Llama 3, Mistral; ~118 registers, 4 blocks/SM) and _g8
//   (<= 8: Qwen2.5's 7; ~200 registers, 2 blocks/SM). Larger groups run in chunks.
//
// Napkin math (H100 SXM, 3.35 TB/s; Qwen2.5-7B: 4 KV heads, D = 128, group 7): each
// cached token costs 2 (K, V) * 4 * 128 * 2 B = 2 KiB per layer, so an 8K-token context
// is 16 MiB per layer: 5.0 us at full bandwidth. Arithmetic is group * 4 flops per
// K/V element pair (q.k and p*v for 7 heads) = 7 flop/B against ~20 flop/B of f32 FMA
// peak per byte of HBM. With the shuffles (4 per head per key for D = 128), exp2f and
// conversions, instruction issue is estimated at ~0.8 of the memory time for group 7:
// close to the limit, so the G8 kernel may miss the 85%-of-bandwidth goal; the next step
// there would be a tensor-core decode (the group's heads as mma rows). The partials ((D + 2) * 4 B per head and split) are < 2% of the
// K/V bytes for splits of >= 256 keys.
//
// Launch contract (the Rust launcher checks it; violations trap):
//   D % 8 == 0, D <= QILIN_ATTN_MAX_HEAD_DIM, num_heads % num_kv_heads == 0,
//   1 <= group_chunk <= QILIN_ATTN_DECODE_MAX_GROUP, blockDim.x == QILIN_ATTN_DECODE_THREADS,
//   split_tokens >= 1, n_splits * split_tokens >= every decode row's context;
//   dynamic shared memory = 4 * (DECODE_WARPS * group_chunk * (D + 2)) bytes;
//   q, k_cache, v_cache, out 16-byte aligned.

#include "attention_common.cuh"

static constexpr int DECODE_THREADS = QILIN_ATTN_DECODE_THREADS;
static constexpr int DECODE_WARPS = DECODE_THREADS / QILIN_WARP_SIZE;
// Keys each lane group loads before it computes: two 16-byte K/V pairs in flight per lane.
static constexpr int UNROLL = 2;

template <int MAX_GROUP>
QILIN_DEVICE void attention_decode(const QilinAttentionParams& p,
                                   bf16* __restrict__ out,
                                   float* __restrict__ part_out,
                                   float* __restrict__ part_ml,
                                   const bf16* __restrict__ q,
                                   const bf16* __restrict__ k_cache,
                                   const bf16* __restrict__ v_cache,
                                   const uint32_t* __restrict__ seq_starts,
                                   const uint32_t* __restrict__ context_lens,
                                   const uint32_t* __restrict__ block_tables) {
    extern __shared__ float smem[];
    const unsigned D = p.head_dim;
    if (D % QILIN_VEC_ELEMS != 0 || D == 0 || D > QILIN_ATTN_MAX_HEAD_DIM ||
        blockDim.x != DECODE_THREADS || p.group_chunk == 0 || p.group_chunk > MAX_GROUP ||
        p.num_kv_heads == 0 || p.num_heads % p.num_kv_heads != 0 || p.split_tokens == 0) {
        __trap();
    }
    const unsigned s = blockIdx.x;
    if (s >= p.n_seqs) {
        return;
    }
    const unsigned row = seq_starts[s];
    if (seq_starts[s + 1] - row != 1) {
        return;  // not a decode row: the prefill kernel owns it
    }
    const unsigned ctx = context_lens[s];
    if ((size_t)p.n_splits * p.split_tokens < ctx) {
        __trap();  // the grid's splits would leave keys of this context unread
    }
    const unsigned k_begin = blockIdx.z * p.split_tokens;
    if (k_begin >= ctx) {
        return;  // this sequence has fewer splits than the grid
    }
    const unsigned k_end = min(k_begin + p.split_tokens, ctx);

    const unsigned group = p.num_heads / p.num_kv_heads;
    const unsigned chunks = ceil_div(group, p.group_chunk);
    const unsigned kv_head = blockIdx.y / chunks;
    const unsigned chunk = blockIdx.y % chunks;
    if (kv_head >= p.num_kv_heads) {
        return;
    }
    const unsigned head0 = kv_head * group + chunk * p.group_chunk;
    const unsigned n_heads = min(p.group_chunk, group - chunk * p.group_chunk);

    // Lanes per key: the smallest power of two covering the D / 8 vectors of a row.
    const unsigned n_vec = D / QILIN_VEC_ELEMS;
    unsigned tpk = 1;
    while (tpk < n_vec) {
        tpk *= 2;
    }
    const unsigned lane_in_key = threadIdx.x & (tpk - 1);
    const unsigned key_group = threadIdx.x / tpk;
    const unsigned n_key_groups = DECODE_THREADS / tpk;
    const bool active = lane_in_key < n_vec;  // false only when D / 8 is not a power of two
    const unsigned dim0 = lane_in_key * QILIN_VEC_ELEMS;

    // This lane's 8 dims of every head's query, pre-scaled into the log2 domain.
    const size_t q_stride = (size_t)p.num_heads * D;
    const float scale_log2 = p.scale * QILIN_LOG2E;
    float qf[MAX_GROUP][8];
#pragma unroll
    for (int h = 0; h < MAX_GROUP; ++h) {
        if (active && h < (int)n_heads) {
            bf16x8_to_float(load128_readonly(q + row * q_stride + (size_t)(head0 + h) * D + dim0),
                            qf[h]);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                qf[h][i] *= scale_log2;
            }
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                qf[h][i] = 0.0f;
            }
        }
    }

    float m[MAX_GROUP];
    float l[MAX_GROUP];
    float acc[MAX_GROUP][8];
#pragma unroll
    for (int h = 0; h < MAX_GROUP; ++h) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            acc[h][i] = 0.0f;
        }
    }

    const size_t kv_stride = (size_t)p.num_kv_heads * D;
    const size_t head_offset = (size_t)kv_head * D + dim0;
    const uint32_t* table = block_tables + (size_t)s * p.max_blocks_per_seq;

    // The trip count depends only on block-uniform values, so every lane reaches every
    // shuffle; keys past k_end are computed on zeros and skipped in the update.
    for (unsigned base = k_begin; base < k_end; base += n_key_groups * UNROLL) {
        uint4 k_raw[UNROLL];
        uint4 v_raw[UNROLL];
        bool valid[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const unsigned j = base + u * n_key_groups + key_group;
            valid[u] = j < k_end;
            k_raw[u] = make_uint4(0, 0, 0, 0);
            v_raw[u] = make_uint4(0, 0, 0, 0);
            if (valid[u] && active) {
                const size_t at = attention_cache_slot(table, j, p) * kv_stride + head_offset;
                k_raw[u] = load128_readonly(k_cache + at);
                v_raw[u] = load128_readonly(v_cache + at);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            float kf[8];
            bf16x8_to_float(k_raw[u], kf);
            float score[MAX_GROUP];
#pragma unroll
            for (int h = 0; h < MAX_GROUP; ++h) {
                float dot = 0.0f;
                if (h < (int)n_heads) {
#pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        dot = fmaf(qf[h][i], kf[i], dot);
                    }
                    for (unsigned offset = tpk / 2; offset > 0; offset /= 2) {
                        dot += __shfl_xor_sync(0xffffffffu, dot, offset);
                    }
                }
                score[h] = dot;
            }
            if (valid[u]) {
                float vf[8];
                bf16x8_to_float(v_raw[u], vf);
#pragma unroll
                for (int h = 0; h < MAX_GROUP; ++h) {
                    if (h < (int)n_heads) {
                        if (score[h] > m[h]) {
                            const float c = exp2f(m[h] - score[h]);  // m = -inf: 0
                            l[h] *= c;
#pragma unroll
                            for (int i = 0; i < 8; ++i) {
                                acc[h][i] *= c;
                            }
                            m[h] = score[h];
                        }
                        const float pr = exp2f(score[h] - m[h]);
                        l[h] += pr;
#pragma unroll
                        for (int i = 0; i < 8; ++i) {
                            acc[h][i] = fmaf(pr, vf[i], acc[h][i]);
                        }
                    }
                }
            }
        }
    }

    // Merge the lane groups of each warp: lanes tpk, 2 tpk, ... apart hold other keys.
    for (unsigned offset = tpk; offset < QILIN_WARP_SIZE; offset *= 2) {
#pragma unroll
        for (int h = 0; h < MAX_GROUP; ++h) {
            if (h < (int)n_heads) {
                const float m_other = __shfl_xor_sync(0xffffffffu, m[h], offset);
                const float l_other = __shfl_xor_sync(0xffffffffu, l[h], offset);
                const float m_new = fmaxf(m[h], m_other);
                const float a = attention_rescale(m[h], m_new);
                const float b = attention_rescale(m_other, m_new);
                l[h] = l[h] * a + l_other * b;
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    const float acc_other = __shfl_xor_sync(0xffffffffu, acc[h][i], offset);
                    acc[h][i] = acc[h][i] * a + acc_other * b;
                }
                m[h] = m_new;
            }
        }
    }

    // Merge the warps through shared memory:
    //   s_acc [DECODE_WARPS][group_chunk][D], s_m and s_l [DECODE_WARPS][group_chunk].
    const unsigned warp = threadIdx.x / QILIN_WARP_SIZE;
    const unsigned lane = threadIdx.x % QILIN_WARP_SIZE;
    const unsigned gc = p.group_chunk;
    float* s_acc = smem;
    float* s_m = smem + DECODE_WARPS * gc * D;
    float* s_l = s_m + DECODE_WARPS * gc;
    if (lane < tpk && active) {
#pragma unroll
        for (int h = 0; h < MAX_GROUP; ++h) {
            if (h < (int)n_heads) {
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    s_acc[(warp * gc + h) * D + dim0 + i] = acc[h][i];
                }
            }
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int h = 0; h < MAX_GROUP; ++h) {
            if (h < (int)n_heads) {
                s_m[warp * gc + h] = m[h];
                s_l[warp * gc + h] = l[h];
            }
        }
    }
    __syncthreads();

    for (unsigned idx = threadIdx.x; idx < n_heads * D; idx += DECODE_THREADS) {
        const unsigned h = idx / D;
        const unsigned d = idx % D;
        float m_all = -INFINITY;
#pragma unroll
        for (int w = 0; w < DECODE_WARPS; ++w) {
            m_all = fmaxf(m_all, s_m[w * gc + h]);
        }
        float l_all = 0.0f;
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < DECODE_WARPS; ++w) {
            // A warp that saw no key of this split has m = -inf and contributes 0.
            const float f = attention_rescale(s_m[w * gc + h], m_all);
            l_all += s_l[w * gc + h] * f;
            o += s_acc[(w * gc + h) * D + d] * f;
        }
        const unsigned head = head0 + h;
        if (p.n_splits == 1) {
            // k_begin < ctx, so at least one key was seen and l_all >= 1.
            out[row * q_stride + (size_t)head * D + d] = __float2bfloat16_rn(o / l_all);
        } else {
            const size_t part = ((size_t)s * p.num_heads + head) * p.n_splits + blockIdx.z;
            part_out[part * D + d] = o;
            if (d == 0) {
                part_ml[2 * part] = m_all;
                part_ml[2 * part + 1] = l_all;
            }
        }
    }
}

// out:          bf16 [n_tokens, num_heads * D]   decode rows written when n_splits == 1
// part_out:     f32  [n_seqs, num_heads, n_splits, D] unnormalised partial outputs
//               (exp2-weighted by the split's own max); unused (may be NULL) when n_splits == 1
// part_ml:      f32  [n_seqs, num_heads, n_splits, 2] each split's (max m, sum l) in the log2
//               domain; unused (may be NULL) when n_splits == 1
// q:            bf16 [n_tokens, num_heads * D]
// k_cache:      bf16 [cache_slots, num_kv_heads * D]  one layer's keys
// v_cache:      bf16 [cache_slots, num_kv_heads * D]  one layer's values
// seq_starts:   u32  [n_seqs + 1]  first row of each sequence, then n_tokens
// context_lens: u32  [n_seqs]      cached tokens of each sequence including this step's
// block_tables: u32  [n_seqs, max_blocks_per_seq]
// group_chunk <= 4. Registers: q and acc for 4 heads (~100); 4 blocks per SM.
extern "C" __global__ void __launch_bounds__(QILIN_ATTN_DECODE_THREADS, 4)
qilin_attention_decode_g4_bf16(const QilinAttentionParams p,
                               bf16* __restrict__ out,
                               float* __restrict__ part_out,
                               float* __restrict__ part_ml,
                               const bf16* __restrict__ q,
                               const bf16* __restrict__ k_cache,
                               const bf16* __restrict__ v_cache,
                               const uint32_t* __restrict__ seq_starts,
                               const uint32_t* __restrict__ context_lens,
                               const uint32_t* __restrict__ block_tables) {
    attention_decode<4>(p, out, part_out, part_ml, q, k_cache, v_cache, seq_starts,
                        context_lens, block_tables);
}

// Same arguments and shapes as qilin_attention_decode_g4_bf16, group_chunk <= 8
// (QILIN_ATTN_DECODE_MAX_GROUP). Registers: q and acc for 8 heads (~200); 2 blocks per SM.
extern "C" __global__ void __launch_bounds__(QILIN_ATTN_DECODE_THREADS, 2)
qilin_attention_decode_g8_bf16(const QilinAttentionParams p,
                               bf16* __restrict__ out,
                               float* __restrict__ part_out,
                               float* __restrict__ part_ml,
                               const bf16* __restrict__ q,
                               const bf16* __restrict__ k_cache,
                               const bf16* __restrict__ v_cache,
                               const uint32_t* __restrict__ seq_starts,
                               const uint32_t* __restrict__ context_lens,
                               const uint32_t* __restrict__ block_tables) {
    static_assert(QILIN_ATTN_DECODE_MAX_GROUP == 8, "the widest decode variant");
    attention_decode<8>(p, out, part_out, part_ml, q, k_cache, v_cache, seq_starts,
                        context_lens, block_tables);
}

// Merges the splits of qilin_attention_decode_g{4,8}_bf16 (launched only when n_splits > 1):
//   M = max_z m_z,  out = sum_z exp2(m_z - M) acc_z / sum_z exp2(m_z - M) l_z
// over the splits z < ceil(ctx / split_tokens) that hold keys (all of them were written).
// grid = (n_seqs, num_heads), block = round_up(D, 32) threads, one output dim each.
//
// out:          bf16 [n_tokens, num_heads * D]   decode rows written
// part_out:     f32  [n_seqs, num_heads, n_splits, D]
// part_ml:      f32  [n_seqs, num_heads, n_splits, 2]
// seq_starts:   u32  [n_seqs + 1]
// context_lens: u32  [n_seqs]
extern "C" __global__ void __launch_bounds__(QILIN_ATTN_MAX_HEAD_DIM, 1)
qilin_attention_decode_reduce_bf16(const QilinAttentionParams p,
                                   bf16* __restrict__ out,
                                   const float* __restrict__ part_out,
                                   const float* __restrict__ part_ml,
                                   const uint32_t* __restrict__ seq_starts,
                                   const uint32_t* __restrict__ context_lens) {
    const unsigned D = p.head_dim;
    if (D == 0 || D > QILIN_ATTN_MAX_HEAD_DIM || blockDim.x < D || p.split_tokens == 0) {
        __trap();
    }
    const unsigned s = blockIdx.x;
    const unsigned head = blockIdx.y;
    if (s >= p.n_seqs || head >= p.num_heads) {
        return;
    }
    const unsigned row = seq_starts[s];
    if (seq_starts[s + 1] - row != 1) {
        return;
    }
    const unsigned n_valid = ceil_div(context_lens[s], p.split_tokens);
    if (n_valid > p.n_splits) {
        __trap();  // the decode grid did not cover this context
    }
    const size_t part0 = ((size_t)s * p.num_heads + head) * p.n_splits;
    // Every thread walks the same (few hundred at most) splits; the m/l reads broadcast.
    float m_all = -INFINITY;
    for (unsigned z = 0; z < n_valid; ++z) {
        m_all = fmaxf(m_all, part_ml[2 * (part0 + z)]);
    }
    const unsigned d = threadIdx.x;
    float l_all = 0.0f;
    float o = 0.0f;
    for (unsigned z = 0; z < n_valid; ++z) {
        const float f = attention_rescale(part_ml[2 * (part0 + z)], m_all);
        l_all += part_ml[2 * (part0 + z) + 1] * f;
        if (d < D) {
            o += part_out[(part0 + z) * D + d] * f;
        }
    }
    if (d < D) {
        out[(size_t)row * p.num_heads * D + (size_t)head * D + d] = __float2bfloat16_rn(o / l_all);
    }
}
