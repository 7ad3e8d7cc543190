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
#include "attention_decode_tile.cuh"
#include "mma.cuh"

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
    QILIN_PDL_ENTRY();
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
    QILIN_PDL_ENTRY();
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
    QILIN_PDL_ENTRY();
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

// ---------------------------------------------------------------------------------------
// qilin_attention_decode_mma_hd{64,128}_bf16: the tensor-core decode kernel (the default
// with QILIN_ATTN_DECODE_PIPE=0 or where the pipelined variant of
// attention_decode_pipe.cu, the default, cannot get its shared memory;
// QILIN_ATTN_DECODE_FMA=1 selects the FMA kernels above instead).
//
// Same semantics, grid, launch contract, partials and reduction pass as the FMA kernels,
// with group_chunk <= QILIN_ATTN_DECODE_MMA_MAX_GROUP (16) and no dynamic shared memory.
// The chunk's query heads are the 16 rows of one mma tile (GQA packing: row r is head
// head0 + r of the sequence's one query row; rows past the chunk are zero queries whose
// results are dropped), so every K/V element is read once per group and the per-key
// softmax work is a few instructions per row, not per lane.
//   Each of the 4 warps takes the split's 16-key cache blocks round-robin (a split is a
//   whole number of blocks: split_tokens % 16 == 0). Per block, the warp gathers its 16
//   K and V rows into its own shared buffers with cp.async (K and V in separate groups:
//   S is computed while V lands), then takes attention_decode_tile.cuh's step (S = Q K^T,
//   online softmax, O += P V on mma.sync), with no block-wide barrier in the key loop. At the end the warps' (m, l, O) are
//   merged through shared memory (the K/V buffers reused), as in the FMA kernels.
// Why: on an H200 (bench/results/2026-11-26-h200.md) the FMA kernels reached 5-13% of
// copy bandwidth: each key's online-softmax update ran in all 16 lanes of its lane group
// for every head, so they were bound by instruction issue and latency, not memory.
// Napkin (D = 128): a 16-key block is 8 KiB of K and V and costs a warp D/4 = 32 mma
// (~4 clocks each per SM sub-partition) plus ~40 softmax instructions per lane: ~200
// clocks of issue against ~480 clocks for 8 KiB at a 132nd of 4.2 TB/s, so memory-bound
// if enough blocks are in flight; 3 blocks (12 warps, 96 KiB of copies) per SM.

static constexpr int DMMA_THREADS = QILIN_ATTN_DECODE_MMA_THREADS;
static constexpr int DMMA_WARPS = DMMA_THREADS / QILIN_WARP_SIZE;
static constexpr int DMMA_KEYS = QILIN_BLOCK_SIZE;  // keys per warp step: one cache block
static constexpr int DMMA_PAD = 8;                  // bf16 per shared row beyond D
static_assert(DMMA_KEYS == 16, "one m16n8k16 k-step of P V per cache block");
static_assert(QILIN_ATTN_DECODE_MMA_MAX_GROUP == 16, "the 16 rows of an mma tile");

template <int D>
QILIN_DEVICE void attention_decode_mma(const QilinAttentionParams& p,
                                       bf16* __restrict__ out,
                                       float* __restrict__ part_out,
                                       float* __restrict__ part_ml,
                                       const bf16* __restrict__ q,
                                       const bf16* __restrict__ k_cache,
                                       const bf16* __restrict__ v_cache,
                                       const uint32_t* __restrict__ seq_starts,
                                       const uint32_t* __restrict__ context_lens,
                                       const uint32_t* __restrict__ block_tables) {
    static_assert(D % 32 == 0 && D <= 128, "pairs of 16-dim k-steps; O fits registers");
    constexpr int LD = D + DMMA_PAD;  // shared row stride in bf16 (16-byte multiple)
    constexpr int VECS = D / QILIN_VEC_ELEMS;
    constexpr int KV_BYTES = DMMA_WARPS * 2 * DMMA_KEYS * LD * (int)sizeof(bf16);
    constexpr int MERGE_BYTES = DMMA_WARPS * 16 * D * (int)sizeof(float);
    // Per warp: K [16][LD] then V [16][LD]; after the key loop: O [warps][16][D] f32.
    __shared__ __align__(128) unsigned char s_raw[KV_BYTES > MERGE_BYTES ? KV_BYTES : MERGE_BYTES];
    __shared__ float s_m[DMMA_WARPS][16];
    __shared__ float s_l[DMMA_WARPS][16];

    if (blockDim.x != DMMA_THREADS || p.head_dim != D || p.group_chunk == 0 ||
        p.group_chunk > QILIN_ATTN_DECODE_MMA_MAX_GROUP || p.num_kv_heads == 0 ||
        p.num_heads % p.num_kv_heads != 0 || p.split_tokens == 0 ||
        p.split_tokens % QILIN_BLOCK_SIZE != 0) {
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

    const unsigned warp = threadIdx.x / QILIN_WARP_SIZE;
    const unsigned lane = threadIdx.x % QILIN_WARP_SIZE;
    const unsigned r0 = lane / 4;  // this lane's two rows (heads head0 + r) of the tile
    const unsigned r1 = r0 + 8;
    const unsigned c0 = (lane % 4) * 2;  // this lane's first column of every fragment

    // Q as mma A fragments: row r is head head0 + r of the row's query (heads are D apart).
    const size_t q_stride = (size_t)p.num_heads * D;
    uint32_t qa[D / 16][4];
    decode_tile_load_q<D>(qa, q + (size_t)row * q_stride + (size_t)head0 * D, r0, r1, c0, n_heads);
    float o[D / 8][4];  // output accumulators, C layout, 8 dims per n-tile
    decode_tile_zero<D>(o);
    float m0 = -INFINITY;  // running max (log2 domain) of rows r0 and r1
    float m1 = -INFINITY;
    float l0 = 0.0f;  // running sums of this lane's columns; the quad is summed at the end
    float l1 = 0.0f;
    const float scale_log2 = p.scale * QILIN_LOG2E;

    bf16* s_k = reinterpret_cast<bf16*>(s_raw) + warp * 2 * DMMA_KEYS * LD;
    bf16* s_v = s_k + DMMA_KEYS * LD;
    const size_t kv_stride = (size_t)p.num_kv_heads * D;
    const size_t head_offset = (size_t)kv_head * D;
    const uint32_t* table = block_tables + (size_t)s * p.max_blocks_per_seq;
    const unsigned n_steps = ceil_div(k_end - k_begin, (unsigned)DMMA_KEYS);
    static_assert(DMMA_KEYS * VECS % QILIN_WARP_SIZE == 0, "whole chunks per lane");

    for (unsigned step = warp; step < n_steps; step += DMMA_WARPS) {
        const unsigned base = k_begin + step * DMMA_KEYS;  // first key: a block boundary
        // Gather K, then V, of keys base .. base + 15; keys >= k_end become zeros.
#pragma unroll
        for (int pass = 0; pass < 2; ++pass) {
            bf16* dst = pass == 0 ? s_k : s_v;
            const bf16* __restrict__ cache = pass == 0 ? k_cache : v_cache;
#pragma unroll
            for (int i = 0; i < DMMA_KEYS * VECS / QILIN_WARP_SIZE; ++i) {
                const unsigned c = lane + i * QILIN_WARP_SIZE;
                const unsigned key = c / VECS;
                const unsigned vec = c % VECS;
                const unsigned j = base + key;
                const uint32_t at = smem_u32(dst + key * LD + vec * QILIN_VEC_ELEMS);
                if (j < k_end) {
                    const size_t slot = attention_cache_slot(table, j, p);
                    cp_async_16(at, cache + slot * kv_stride + head_offset + vec * QILIN_VEC_ELEMS,
                                16);
                } else {
                    cp_async_16(at, cache, 0);
                }
            }
            cp_async_commit();
        }
        cp_async_wait<1>();  // this lane's K chunks have landed ...
        __syncwarp();        // ... and every lane's

        float sc[2][4];
        decode_tile_scores<D, LD>(sc, qa, s_k, lane);
        float corr0, corr1;
        decode_tile_softmax(sc, base, k_end, c0, scale_log2, m0, m1, l0, l1, corr0, corr1);
        decode_tile_rescale<D>(o, corr0, corr1);

        cp_async_wait<0>();  // V has landed too ...
        __syncwarp();        // ... in every lane

        decode_tile_pv<D, LD>(o, sc, s_v, lane);
        __syncwarp();  // every lane is done reading s_k and s_v before the next gather
    }

    decode_tile_merge_warps<D, DMMA_WARPS>(p, o, m0, m1, l0, l1, s_raw, s_m, s_l, warp, lane, s,
                                           row, head0, n_heads, blockIdx.z, p.n_splits == 1,
                                           out, part_out, part_ml);
}

// Same arguments and shapes as qilin_attention_decode_g4_bf16; D = 128, group_chunk <=
// 16. Registers ~150 (Q fragments 32, O 64): 3 blocks per SM.
extern "C" __global__ void __launch_bounds__(QILIN_ATTN_DECODE_MMA_THREADS, 3)
qilin_attention_decode_mma_hd128_bf16(const QilinAttentionParams p,
                                      bf16* __restrict__ out,
                                      float* __restrict__ part_out,
                                      float* __restrict__ part_ml,
                                      const bf16* __restrict__ q,
                                      const bf16* __restrict__ k_cache,
                                      const bf16* __restrict__ v_cache,
                                      const uint32_t* __restrict__ seq_starts,
                                      const uint32_t* __restrict__ context_lens,
                                      const uint32_t* __restrict__ block_tables) {
    QILIN_PDL_ENTRY();
    attention_decode_mma<128>(p, out, part_out, part_ml, q, k_cache, v_cache, seq_starts,
                              context_lens, block_tables);
}

// As qilin_attention_decode_mma_hd128_bf16 for D = 64.
extern "C" __global__ void __launch_bounds__(QILIN_ATTN_DECODE_MMA_THREADS, 4)
qilin_attention_decode_mma_hd64_bf16(const QilinAttentionParams p,
                                     bf16* __restrict__ out,
                                     float* __restrict__ part_out,
                                     float* __restrict__ part_ml,
                                     const bf16* __restrict__ q,
                                     const bf16* __restrict__ k_cache,
                                     const bf16* __restrict__ v_cache,
                                     const uint32_t* __restrict__ seq_starts,
                                     const uint32_t* __restrict__ context_lens,
                                     const uint32_t* __restrict__ block_tables) {
    QILIN_PDL_ENTRY();
    attention_decode_mma<64>(p, out, part_out, part_ml, q, k_cache, v_cache, seq_starts,
                             context_lens, block_tables);
}
