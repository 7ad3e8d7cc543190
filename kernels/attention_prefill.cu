// Paged causal attention for prefill chunks (any number of new tokens per sequence, decode
// rows included when asked): flash-attention tiling on tensor cores. bf16 q and KV cache,
// f32 softmax and accumulation.
// CPU twin: backend::cpu::attention::paged_attention (attend / attend_direct).
//
// Semantics, for every sequence s (rows t = seq_starts[s] .. seq_starts[s + 1], len rows,
// context ctx = context_lens[s]), row t at position pos = ctx - len + (t - seq_starts[s]),
// and every query head h:
//   kv   = h / (num_heads / num_kv_heads)                         (GQA)
//   K_j  = k_cache[slot(s, j)][kv*D .. kv*D + D), j = 0 ..= pos     (V_j likewise)
//   slot(s, j) = block_tables[s][j / 16] * 16 + j % 16
//   out[t][h*D + d] = bf16_rne( sum_j softmax_j(scale * q_h . K_j) * V_j[d] )
// With skip_decode_rows == 1, sequences with len == 1 are left untouched (the decode
// kernel writes them); otherwise every row of the batch is written.
//
// qilin_attention_prefill_wide_hd64_bf16 (tensor cores, D = 64; head_dim 128 has
// qilin_attention_prefill_v2_hd128_bf16 in kernels/attention_prefill_v2.cu, which replaced
// this kernel's head_dim-128 variant after the H200 run at 771cd47: 339 against 221
// TFLOP/s at 16K causal; the 64-row-tile variants went with it, 161 TFLOP/s there):
//   grid  = (num_heads, n_tokens / BLOCK_M + n_seqs), block = QILIN_ATTN_PREFILL_THREADS,
//   BLOCK_M = QILIN_ATTN_PREFILL_WIDE_BLOCK_M.
//   Tile slot b = gridDim.y - 1 - blockIdx.y (reversed: blocks start in blockIdx order with
//   x fastest, so every head of the last, most expensive causal tiles starts first, and
//   the heads of a KV group run side by side on the same K/V tiles in L2) serves tile
//   b - key(s) of the sequence s with the largest
//   key(s) = seq_starts[s] / BLOCK_M + s <= b (binary search over seq_starts): key() is
//   strictly increasing and gives sequence s at least ceil(len / BLOCK_M) slots, so the
//   grid covers every query tile of the batch without a host-side tile list; slots past a
//   sequence's last tile exit at once (at most one per sequence).
//   Each of the 4 warps owns two m16 tiles (32 query rows) of the 128-row tile, so every
//   K and V fragment loaded from shared memory feeds two mma (64-row tiles, one per warp,
//   were bound by shared memory: 161-167 TFLOP/s at 16K on an H200). The Q fragments stay
//   in registers (mma A layout, loaded once). Key tiles of BLOCK_N = 64 positions (four
//   16-token cache blocks) are gathered from the paged cache into shared memory with
//   cp.async through the block table (16-byte chunks; positions past the tile's last
//   query are zero-filled and never read from global memory). Per key tile:
//     S = Q K^T        mma.sync m16n8k16 bf16 -> f32, K fragments by ldmatrix.x4
//     causal mask by absolute position (key j > pos -> -inf), online softmax in f32
//     O += P V         P rounded to bf16 in registers (the S accumulator layout is the
//                      A operand layout), V fragments by ldmatrix.x4.trans
//   Pipeline (one buffer each for K and V): V(kt) loads while S(kt) is computed, K(kt+1)
//   loads while P V(kt) is computed. Shared rows are padded by 8 bf16 (16 B) so the eight
//   16-byte rows of every ldmatrix phase fall in distinct banks.
//   GQA: each block reads its KV head's tiles; the group's other heads read the same
//   tiles, mostly from L2. Both kernels include attention_prefill_tile.cuh (the grid-slot
//   -> query-tile map above).
//
// The plain-FMA fallback for other head sizes (and for bisecting) is
// kernels/attention_simple.cu.
//
// Napkin math (H100 SXM): causal prefill of n tokens costs 4 * heads * D * n^2 / 2 flops
// (Qwen2.5-7B, n = 16K: 1.9 TFLOP per layer). At the issue's 350 TFLOP/s goal that is
// 5.5 ms; mma.sync (no wgmma) tops out near ~650 TFLOP/s dense bf16 on H100, and this
// straightforward 64x64 tiling with a single K/V buffer should land well below that
// (expect 150-250 TFLOP/s; measure). Each key tile is 4 D bytes of K/V per key (mostly
// from L2) against 64 rows * 4 D flops: 64 flop/B, compute bound.
//
// Launch contract (checked by the Rust launcher; violations trap):
//   head_dim == 64, blockDim.x == QILIN_ATTN_PREFILL_THREADS, static shared memory only
//   (2 * 64 * (64 + 8) * 2 B = 18,432 B); and num_heads % num_kv_heads == 0, seq_starts[0] == 0 and non-decreasing, and
//   len <= ctx for every sequence; q/out rows 16-byte aligned.

#include "attention_common.cuh"
#include "mma.cuh"

#include "attention_prefill_tile.cuh"

template <int D, int MT, int BN>
QILIN_DEVICE void attention_prefill_mma(const QilinAttentionParams& p,
                                        bf16* __restrict__ out,
                                        const bf16* __restrict__ q,
                                        const bf16* __restrict__ k_cache,
                                        const bf16* __restrict__ v_cache,
                                        const uint32_t* __restrict__ seq_starts,
                                        const uint32_t* __restrict__ context_lens,
                                        const uint32_t* __restrict__ block_tables) {
    static_assert(D % 32 == 0 && D <= QILIN_ATTN_MAX_HEAD_DIM, "pairs of 16-dim k-steps");
    static_assert(BN % 16 == 0 && BN % QILIN_BLOCK_SIZE == 0, "BN in whole blocks");
    constexpr int BLOCK_M = 16 * MT * PREFILL_WARPS;
    constexpr int LD = D + SMEM_PAD;  // shared row stride in bf16 (16-byte multiple)
    constexpr int VECS = D / QILIN_VEC_ELEMS;
    __shared__ __align__(128) bf16 s_k[BN * LD];  // [BN keys][D (+ pad)]
    __shared__ __align__(128) bf16 s_v[BN * LD];  // [BN keys][D (+ pad)]

    if (blockDim.x != PREFILL_THREADS || p.head_dim != D || p.num_kv_heads == 0 ||
        p.num_heads % p.num_kv_heads != 0) {
        __trap();
    }
    unsigned s;
    unsigned tile;
    if (!prefill_tile_of(p, seq_starts, BLOCK_M, gridDim.y - 1 - blockIdx.y, s, tile)) {
        return;
    }
    const unsigned start = seq_starts[s];
    const unsigned len = seq_starts[s + 1] - start;
    if (tile * BLOCK_M >= len || (len == 1 && p.skip_decode_rows != 0)) {
        return;
    }
    const unsigned head = blockIdx.x;
    if (head >= p.num_heads) {
        return;
    }
    const unsigned kv_head = head / (p.num_heads / p.num_kv_heads);
    const unsigned ctx = context_lens[s];
    if (ctx < len) {
        __trap();
    }
    const unsigned first_pos = ctx - len + tile * BLOCK_M;  // position of the tile's row 0
    const unsigned rows = min((unsigned)BLOCK_M, len - tile * BLOCK_M);
    const unsigned n_keys = first_pos + rows;  // keys 0 .. n_keys - 1 are visible to some row
    const unsigned n_tiles = ceil_div(n_keys, (unsigned)BN);

    const unsigned warp = threadIdx.x / QILIN_WARP_SIZE;
    const unsigned lane = threadIdx.x % QILIN_WARP_SIZE;
    // This lane's two rows of m-tile mt: r0 + 16 * mt and r0 + 16 * mt + 8.
    const unsigned r0 = warp * 16 * MT + lane / 4;
    const unsigned c0 = (lane % 4) * 2;  // this lane's first column of every fragment

    const size_t q_stride = (size_t)p.num_heads * D;
    const size_t row0 = (size_t)start + tile * BLOCK_M;
    const bf16* q_tile = q + row0 * q_stride + (size_t)head * D;

    // Q as mma A fragments for the D / 16 k-steps, in registers; rows past the chunk are
    // zero.
    uint32_t qa[MT][D / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const unsigned ra = r0 + 16 * mt;
        const unsigned rb = ra + 8;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const bf16* p0 = q_tile + ra * q_stride + kk * 16 + c0;
            const bf16* p1 = q_tile + rb * q_stride + kk * 16 + c0;
            qa[mt][kk][0] = ra < rows ? *reinterpret_cast<const uint32_t*>(p0) : 0u;
            qa[mt][kk][1] = rb < rows ? *reinterpret_cast<const uint32_t*>(p1) : 0u;
            qa[mt][kk][2] = ra < rows ? *reinterpret_cast<const uint32_t*>(p0 + 8) : 0u;
            qa[mt][kk][3] = rb < rows ? *reinterpret_cast<const uint32_t*>(p1 + 8) : 0u;
        }
    }

    float o[MT][D / 8][4];  // output accumulators, C layout, 8 dims per n-tile
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                o[mt][dt][i] = 0.0f;
            }
        }
    }
    // Running max (log2 domain) of each m-tile's rows r and r + 8, and running sums of this
    // lane's columns; the 4 lanes of a row are summed at the end (they share m, so the
    // partial sums rescale alike).
    float m_lo[MT];
    float m_hi[MT];
    float l_lo[MT];
    float l_hi[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        m_lo[mt] = -INFINITY;
        m_hi[mt] = -INFINITY;
        l_lo[mt] = 0.0f;
        l_hi[mt] = 0.0f;
    }
    const float scale_log2 = p.scale * QILIN_LOG2E;

    const size_t kv_stride = (size_t)p.num_kv_heads * D;
    const size_t head_offset = (size_t)kv_head * D;
    const uint32_t* table = block_tables + (size_t)s * p.max_blocks_per_seq;

    // Gathers keys kt*BN .. +BN of `cache` into `dst`; keys >= n_keys become 0.
    static_assert(BN * VECS % PREFILL_THREADS == 0, "whole chunks per thread");
    auto load_tile = [&](bf16* dst, const bf16* __restrict__ cache, unsigned kt) {
#pragma unroll
        for (int i = 0; i < BN * VECS / PREFILL_THREADS; ++i) {
            const unsigned c = threadIdx.x + i * PREFILL_THREADS;
            const unsigned key = c / VECS;
            const unsigned vec = c % VECS;
            const unsigned j = kt * BN + key;
            const uint32_t at = smem_u32(dst + key * LD + vec * QILIN_VEC_ELEMS);
            if (j < n_keys) {
                const size_t slot = attention_cache_slot(table, j, p);
                cp_async_16(at, cache + slot * kv_stride + head_offset + vec * QILIN_VEC_ELEMS, 16);
            } else {
                cp_async_16(at, cache, 0);
            }
        }
    };

    load_tile(s_k, k_cache, 0);
    cp_async_commit();
    for (unsigned kt = 0; kt < n_tiles; ++kt) {
        load_tile(s_v, v_cache, kt);
        cp_async_commit();
        cp_async_wait<1>();  // K(kt) has landed (groups complete in order) ...
        __syncthreads();     // ... for every thread's chunks

        // S = Q K^T for this warp's 16 * MT rows x BN keys.
        float sc[MT][BN / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    sc[mt][nt][i] = 0.0f;
                }
            }
        }
#pragma unroll
        for (int kk = 0; kk < D / 32; ++kk) {
            // This pair of k-steps' Q fragments.
            uint32_t q_pair[MT][2][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        q_pair[mt][h][i] = qa[mt][2 * kk + h][i];
                    }
                }
            }
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                // Matrices: keys nt*8..+7 x dims kk*32 + {0, 8, 16, 24} .. +7.
                uint32_t b[4];
                ldmatrix_x4(b, smem_u32(s_k + (nt * 8 + lane % 8) * LD + kk * 32 + (lane / 8) * 8));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16_16816(sc[mt][nt], q_pair[mt][0], b[0], b[1]);
                    mma_bf16_16816(sc[mt][nt], q_pair[mt][1], b[2], b[3]);
                }
            }
        }

        // Scale into the log2 domain and mask keys after each row's own position. Row 0
        // always sees key 0 in tile 0, so every row's max is finite from tile 0 on.
        const bool needs_mask = kt * BN + BN - 1 > first_pos;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const unsigned ra = r0 + 16 * mt;
            float mx0 = -INFINITY;
            float mx1 = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    float x = sc[mt][nt][i] * scale_log2;
                    if (needs_mask) {
                        const unsigned key = kt * BN + nt * 8 + c0 + (i & 1);
                        const unsigned r = i < 2 ? ra : ra + 8;
                        if (key > first_pos + r) {
                            x = -INFINITY;
                        }
                    }
                    sc[mt][nt][i] = x;
                }
                mx0 = fmaxf(mx0, fmaxf(sc[mt][nt][0], sc[mt][nt][1]));
                mx1 = fmaxf(mx1, fmaxf(sc[mt][nt][2], sc[mt][nt][3]));
            }
            // The 4 lanes of a quad hold the same two rows.
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            const float m0_new = fmaxf(m_lo[mt], mx0);
            const float m1_new = fmaxf(m_hi[mt], mx1);
            const float corr0 = attention_rescale(m_lo[mt], m0_new);
            const float corr1 = attention_rescale(m_hi[mt], m1_new);
            m_lo[mt] = m0_new;
            m_hi[mt] = m1_new;
            float sum0 = 0.0f;
            float sum1 = 0.0f;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                sc[mt][nt][0] = exp2f(sc[mt][nt][0] - m0_new);  // masked: exp2(-inf) = 0
                sc[mt][nt][1] = exp2f(sc[mt][nt][1] - m0_new);
                sc[mt][nt][2] = exp2f(sc[mt][nt][2] - m1_new);
                sc[mt][nt][3] = exp2f(sc[mt][nt][3] - m1_new);
                sum0 += sc[mt][nt][0] + sc[mt][nt][1];
                sum1 += sc[mt][nt][2] + sc[mt][nt][3];
            }
            l_lo[mt] = l_lo[mt] * corr0 + sum0;
            l_hi[mt] = l_hi[mt] * corr1 + sum1;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                o[mt][dt][0] *= corr0;
                o[mt][dt][1] *= corr0;
                o[mt][dt][2] *= corr1;
                o[mt][dt][3] *= corr1;
            }
        }

        // P in bf16 as mma A fragments: the S accumulators of n-tiles 2kc and 2kc+1 are the
        // A fragment of keys kc*16 .. +15. Packed before K(kt+1)'s copy is issued, so the
        // f32 scores are dead by then (half the registers).
        uint32_t pa[MT][BN / 16][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int kc = 0; kc < BN / 16; ++kc) {
                pa[mt][kc][0] = pack_bf16x2(sc[mt][2 * kc][0], sc[mt][2 * kc][1]);
                pa[mt][kc][1] = pack_bf16x2(sc[mt][2 * kc][2], sc[mt][2 * kc][3]);
                pa[mt][kc][2] = pack_bf16x2(sc[mt][2 * kc + 1][0], sc[mt][2 * kc + 1][1]);
                pa[mt][kc][3] = pack_bf16x2(sc[mt][2 * kc + 1][2], sc[mt][2 * kc + 1][3]);
            }
        }

        cp_async_wait<0>();  // V(kt) has landed ...
        __syncthreads();     // ... everywhere, and every warp is done reading s_k
        if (kt + 1 < n_tiles) {
            load_tile(s_k, k_cache, kt + 1);
            cp_async_commit();
        }

        // O += P V.
#pragma unroll
        for (int kc = 0; kc < BN / 16; ++kc) {
#pragma unroll
            for (int dt = 0; dt < D / 16; ++dt) {
                // Matrices: keys kc*16 + {0, 8} .. +7 x dims dt*16 + {0, 8} .. +7, transposed.
                const unsigned key = kc * 16 + lane % 8 + ((lane / 8) % 2) * 8;
                const unsigned dim = dt * 16 + (lane / 16) * 8;
                uint32_t b[4];
                ldmatrix_x4_trans(b, smem_u32(s_v + key * LD + dim));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16_16816(o[mt][2 * dt], pa[mt][kc], b[0], b[1]);
                    mma_bf16_16816(o[mt][2 * dt + 1], pa[mt][kc], b[2], b[3]);
                }
            }
        }
        __syncthreads();  // every warp is done reading s_v before V(kt+1) overwrites it
    }

    bf16* out_tile = out + row0 * q_stride + (size_t)head * D;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const unsigned ra = r0 + 16 * mt;
        const unsigned rb = ra + 8;
        float l0 = l_lo[mt];
        float l1 = l_hi[mt];
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
        // l >= 1 for a row of the chunk (its max contributes exp2(0)); a row past the
        // chunk (all-zero q) is not stored.
        const float inv0 = 1.0f / l0;
        const float inv1 = 1.0f / l1;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            const unsigned col = dt * 8 + c0;
            if (ra < rows) {
                *reinterpret_cast<uint32_t*>(out_tile + ra * q_stride + col) =
                    pack_bf16x2(o[mt][dt][0] * inv0, o[mt][dt][1] * inv0);
            }
            if (rb < rows) {
                *reinterpret_cast<uint32_t*>(out_tile + rb * q_stride + col) =
                    pack_bf16x2(o[mt][dt][2] * inv1, o[mt][dt][3] * inv1);
            }
        }
    }
}

// out:          bf16 [n_tokens, num_heads * 64]   rows of the served sequences written
// q:            bf16 [n_tokens, num_heads * 64]
// k_cache:      bf16 [cache_slots, num_kv_heads * 64]  one layer's keys
// v_cache:      bf16 [cache_slots, num_kv_heads * 64]  one layer's values
// seq_starts:   u32  [n_seqs + 1]  first row of each sequence, then n_tokens
// context_lens: u32  [n_seqs]      cached tokens of each sequence including this step's
// block_tables: u32  [n_seqs, max_blocks_per_seq]
// 128-row query tiles, 32 rows per warp: Q 32, O 64, S 64 registers (64-key tiles).
// grid.y counts tiles of QILIN_ATTN_PREFILL_WIDE_BLOCK_M rows.
extern "C" __global__ void __launch_bounds__(QILIN_ATTN_PREFILL_THREADS, 2)
qilin_attention_prefill_wide_hd64_bf16(const QilinAttentionParams p,
                                       bf16* __restrict__ out,
                                       const bf16* __restrict__ q,
                                       const bf16* __restrict__ k_cache,
                                       const bf16* __restrict__ v_cache,
                                       const uint32_t* __restrict__ seq_starts,
                                       const uint32_t* __restrict__ context_lens,
                                       const uint32_t* __restrict__ block_tables) {
    QILIN_PDL_ENTRY();
    attention_prefill_mma<64, 2, QILIN_ATTN_PREFILL_BLOCK_N>(
        p, out, q, k_cache, v_cache, seq_starts, context_lens, block_tables);
}
