// The tensor-core decode tile shared by qilin_attention_decode_mma_hd{64,128}_bf16
// (attention_decode.cu) and qilin_attention_decode_pipe_hd{64,128}_bf16
// (attention_decode_pipe.cu), which differ in how K and V reach shared memory and how the
// splits are merged, not in the arithmetic. A block is one sequence x one KV head's chunk of
// query heads x one split; the chunk's heads are the 16 rows of one mma tile (row r is
// head head0 + r; rows past the chunk are zero queries whose results are dropped). Each
// warp owns 16-key cache blocks of the split and per step computes
//   S = Q K^T   2 x D/16 mma.sync m16n8k16 (K by ldmatrix.x4), keys >= k_end -> -inf
//   online softmax per row in f32 (log2 domain), P rounded to bf16 in registers
//   O += P V    D/8 mma (V by ldmatrix.x4.trans)
// then the warps' (m, l, O) are merged through shared memory. Fragment layout (the mma C
// layout): lane holds rows r0 = lane / 4 and r1 = r0 + 8, columns c0 = (lane % 4) * 2 and
// c0 + 1 of every 8-column n-tile.
#pragma once

#include "attention_common.cuh"
#include "mma.cuh"

// qa: Q as mma A fragments, [D/16 k-steps][4]; q_heads: bf16 [16 heads][D], the chunk's
// first head of the row's query (heads D apart); rows >= n_heads read as zero.
template <int D>
QILIN_DEVICE void decode_tile_load_q(uint32_t (&qa)[D / 16][4], const bf16* q_heads,
                                     unsigned r0, unsigned r1, unsigned c0, unsigned n_heads) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const bf16* p0 = q_heads + r0 * D + kk * 16 + c0;
        const bf16* p1 = q_heads + r1 * D + kk * 16 + c0;
        qa[kk][0] = r0 < n_heads ? *reinterpret_cast<const uint32_t*>(p0) : 0u;
        qa[kk][1] = r1 < n_heads ? *reinterpret_cast<const uint32_t*>(p1) : 0u;
        qa[kk][2] = r0 < n_heads ? *reinterpret_cast<const uint32_t*>(p0 + 8) : 0u;
        qa[kk][3] = r1 < n_heads ? *reinterpret_cast<const uint32_t*>(p1 + 8) : 0u;
    }
}

// o: [D/8 n-tiles][4] output accumulators, zeroed.
template <int D>
QILIN_DEVICE void decode_tile_zero(float (&o)[D / 8][4]) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            o[dt][i] = 0.0f;
        }
    }
}

// sc = Q K^T: 16 rows x 16 keys (n-tiles of 8 keys). s_k: bf16 [16 keys][LD] in shared
// memory.
template <int D, int LD>
QILIN_DEVICE void decode_tile_scores(float (&sc)[2][4], const uint32_t (&qa)[D / 16][4],
                                     const bf16* s_k, unsigned lane) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            sc[nt][i] = 0.0f;
        }
    }
#pragma unroll
    for (int kk = 0; kk < D / 32; ++kk) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
            // Matrices: keys nt*8..+7 x dims kk*32 + {0, 8, 16, 24} .. +7.
            uint32_t b[4];
            ldmatrix_x4(b, smem_u32(s_k + (nt * 8 + lane % 8) * LD + kk * 32 + (lane / 8) * 8));
            mma_bf16_16816(sc[nt], qa[2 * kk], b[0], b[1]);
            mma_bf16_16816(sc[nt], qa[2 * kk + 1], b[2], b[3]);
        }
    }
}

// The online-softmax update of one step whose first key is `base`: sc becomes P (log2
// domain, keys >= k_end masked to 0), the rows' running maxima m0/m1 and this lane's
// column sums l0/l1 move on, and corr0/corr1 are the factors O must be rescaled by. Key
// `base` is always valid, so every row's max is finite from the first step on.
QILIN_DEVICE void decode_tile_softmax(float (&sc)[2][4], unsigned base, unsigned k_end,
                                      unsigned c0, float scale_log2, float& m0, float& m1,
                                      float& l0, float& l1, float& corr0, float& corr1) {
    float mx0 = -INFINITY;
    float mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const unsigned key = base + nt * 8 + c0 + (i & 1);
            sc[nt][i] = key < k_end ? sc[nt][i] * scale_log2 : -INFINITY;
        }
        mx0 = fmaxf(mx0, fmaxf(sc[nt][0], sc[nt][1]));
        mx1 = fmaxf(mx1, fmaxf(sc[nt][2], sc[nt][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float m0_new = fmaxf(m0, mx0);
    const float m1_new = fmaxf(m1, mx1);
    corr0 = attention_rescale(m0, m0_new);
    corr1 = attention_rescale(m1, m1_new);
    m0 = m0_new;
    m1 = m1_new;
    float sum0 = 0.0f;
    float sum1 = 0.0f;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
        sc[nt][0] = exp2f(sc[nt][0] - m0);  // masked: exp2(-inf) = 0
        sc[nt][1] = exp2f(sc[nt][1] - m0);
        sc[nt][2] = exp2f(sc[nt][2] - m1);
        sc[nt][3] = exp2f(sc[nt][3] - m1);
        sum0 += sc[nt][0] + sc[nt][1];
        sum1 += sc[nt][2] + sc[nt][3];
    }
    l0 = l0 * corr0 + sum0;
    l1 = l1 * corr1 + sum1;
}

// o *= corr per row (rows r0, r1 of this lane).
template <int D>
QILIN_DEVICE void decode_tile_rescale(float (&o)[D / 8][4], float corr0, float corr1) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][0] *= corr0;
        o[dt][1] *= corr0;
        o[dt][2] *= corr1;
        o[dt][3] *= corr1;
    }
}

// o += P V: the P accumulators of n-tiles 0 and 1 are the A fragment of the 16 keys.
// s_v: bf16 [16 keys][LD] in shared memory.
template <int D, int LD>
QILIN_DEVICE void decode_tile_pv(float (&o)[D / 8][4], const float (&sc)[2][4], const bf16* s_v,
                                 unsigned lane) {
    uint32_t a[4];
    a[0] = pack_bf16x2(sc[0][0], sc[0][1]);
    a[1] = pack_bf16x2(sc[0][2], sc[0][3]);
    a[2] = pack_bf16x2(sc[1][0], sc[1][1]);
    a[3] = pack_bf16x2(sc[1][2], sc[1][3]);
#pragma unroll
    for (int dt = 0; dt < D / 16; ++dt) {
        // Matrices: keys {0, 8} .. +7 x dims dt*16 + {0, 8} .. +7, transposed.
        const unsigned key = lane % 8 + ((lane / 8) % 2) * 8;
        const unsigned dim = dt * 16 + (lane / 16) * 8;
        uint32_t b[4];
        ldmatrix_x4_trans(b, smem_u32(s_v + key * LD + dim));
        mma_bf16_16816(o[2 * dt], a, b[0], b[1]);
        mma_bf16_16816(o[2 * dt + 1], a, b[2], b[3]);
    }
}

// Merges the block's WARPS warps' (m, l, O) of the 16-row tile and writes the split's
// result: with `direct` (the split holds the whole context) the normalised row into out,
// else the partial (O unnormalised, m, l) into part_out / part_ml at split `split`. A warp
// that had no step keeps m = -inf, l = 0, O = 0 and weighs 0. Call after every warp is done
// with s_raw, which is reused as s_o [WARPS][16][D] f32; s_m / s_l: [WARPS][16].
// out:      bf16 [n_tokens, num_heads * D]; row `row`, heads head0 .. head0 + n_heads
// part_out: f32  [n_seqs, num_heads, n_splits, D]
// part_ml:  f32  [n_seqs, num_heads, n_splits, 2]
template <int D, int WARPS>
QILIN_DEVICE void decode_tile_merge_warps(const QilinAttentionParams& p, const float (&o)[D / 8][4],
                                          float m0, float m1, float l0, float l1,
                                          unsigned char* s_raw, float (&s_m)[WARPS][16],
                                          float (&s_l)[WARPS][16], unsigned warp, unsigned lane,
                                          unsigned s, unsigned row, unsigned head0,
                                          unsigned n_heads, unsigned split, bool direct,
                                          bf16* __restrict__ out, float* __restrict__ part_out,
                                          float* __restrict__ part_ml) {
    const unsigned r0 = lane / 4;
    const unsigned r1 = r0 + 8;
    const unsigned c0 = (lane % 4) * 2;
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);

    __syncthreads();  // every warp is done with its K/V buffers, which become s_o
    float* s_o = reinterpret_cast<float*>(s_raw);  // [WARPS][16][D]
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
        const unsigned col = dt * 8 + c0;
        s_o[(warp * 16 + r0) * D + col] = o[dt][0];
        s_o[(warp * 16 + r0) * D + col + 1] = o[dt][1];
        s_o[(warp * 16 + r1) * D + col] = o[dt][2];
        s_o[(warp * 16 + r1) * D + col + 1] = o[dt][3];
    }
    if (lane % 4 == 0) {
        s_m[warp][r0] = m0;
        s_m[warp][r1] = m1;
        s_l[warp][r0] = l0;
        s_l[warp][r1] = l1;
    }
    __syncthreads();

    const size_t q_stride = (size_t)p.num_heads * D;
    for (unsigned idx = threadIdx.x; idx < n_heads * D; idx += WARPS * QILIN_WARP_SIZE) {
        const unsigned h = idx / D;
        const unsigned d = idx % D;
        float m_all = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            m_all = fmaxf(m_all, s_m[w][h]);
        }
        float l_all = 0.0f;
        float o_all = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) {
            const float f = attention_rescale(s_m[w][h], m_all);
            l_all += s_l[w][h] * f;
            o_all += s_o[(w * 16 + h) * D + d] * f;
        }
        const unsigned head = head0 + h;
        if (direct) {
            // The whole context is this split's (k_begin < ctx: l_all >= 1).
            out[row * q_stride + (size_t)head * D + d] = __float2bfloat16_rn(o_all / l_all);
        } else {
            const size_t part = ((size_t)s * p.num_heads + head) * p.n_splits + split;
            part_out[part * D + d] = o_all;
            if (d == 0) {
                part_ml[2 * part] = m_all;
                part_ml[2 * part + 1] = l_all;
            }
        }
    }
}
