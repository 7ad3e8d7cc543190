// Paged causal attention for prefill chunks, head_dim 128, the v2 kernel: same semantics,
// arguments and CPU twin as attention_prefill.cu's kernel (see its header), a leaner
// key-tile loop.

#include "attention_common.cuh"
#include "attention_prefill_tile.cuh"
#include "mma.cuh"

// ---------------------------------------------------------------------------------------
// qilin_attention_prefill_v2_hd128_bf16 (verified on an H200 at 771cd47, 339 TFLOP/s at
// 16K causal, and the dispatch's head_dim-128 prefill kernel since): what was the wide
// head_dim-128 kernel of attention_prefill.cu (same arguments, grid, tiles of 128 query
// rows x 32 keys, 4 warps of 32 rows, Q in dynamic shared memory; 221 TFLOP/s there, and
// deleted after that run) with a leaner key-tile loop.
//
// Why (SASS of qilin_attention_prefill_wide_hd128_bf16, ptxas 13 -arch=sm_90a, 249
// registers): its key-tile loop issues 128 HMMA.16816 per warp and ~790 other
// instructions on the unmasked path (970 in the loop less the masked branch, 48 of them
// never-issued @!PT LDS padding): ~6.2 non-HMMA per HMMA, where FA2-class kernels keep
// 1-1.5. The biggest items per tile and thread:
//   FMUL 232: 128 rescale O by the new running max (every tile, BN = 32 keys only
//     amortize it over 32 scores per row), 32 scale the scores into the log2 domain, 64
//     are exp2f's denormal handling (x < -126: halve, exp, square) with 40 FSETP and 36
//     MUFU.EX2 (32 scores + 4 rescale factors);
//   ~200 integer/address/branch (IMAD 60, LEA 36, ISETP 35, BRA 37, BSSY/BSYNC 20, LDG 8,
//     LDGSTS 16 static / 8 issued): the K and V gathers each look up the block table and
//     run the two trap checks per 16-byte chunk, behind per-chunk branches;
//   LDSM 48 (Q 16, K 16, V 16), SHFL 8, F2FP 16, FADD 68, FMNMX 44, BAR 3 + DEPBAR 2.
// Napkin math (H200 / H100: 132 SMs, ~1.98 GHz boost): mma.sync bf16 tops out near
// ~660 TFLOP/s, ~2,500 flop/clock/SM, one HMMA.16816 (4,096 flop) per ~6.5 clocks per
// sub-partition. Two blocks of 4 warps per SM put 2 warps on each sub-partition (one per
// block): per pair of warp-tiles 256 HMMA = ~1,660 tensor clocks against 2 * 918 = ~1,840
// issue slots, so the old loop is issue-bound before any stall (non-HMMA ~86% of the
// slots), and the measured 221 TFLOP/s means ~5,000 clocks per pair: the rest is stalls,
// chiefly the three barriers per tile and K(kt+1)'s L2 latency covered by P.V(kt) alone.
//
// What v2 changes (semantics, CPU twin and tolerance unchanged):
//   (a) two buffers each for K and V: K(kt+1) and V(kt+1) load while tile kt computes,
//       one __syncthreads per tile (wait for tile kt, then the barrier that also retires
//       tile kt-1's buffer, which the next copy overwrites);
//   (b) the causal mask only on the diagonal tiles: a loop over the tiles every row sees
//       whole (no compares), then one over the rest (masked by position);
//   (c) the softmax scale folded into one FFMA per score, p = ex2(s * scale_log2 - m), m
//       the scaled running max, through ex2.approx.ftz.f32 (max relative error ~2^-22,
//       flushes results below 2^-126 to 0; P is rounded to bf16 next, 2^-9, so the test's
//       tolerance sees nothing new);
//   (d) lazy rescale (FlashAttention-4's trick): a warp rescales O and l only when some
//       row's max grew by more than V2_RESCALE_SLACK = 8 (log2 domain) over the running
//       max it uses, otherwise it keeps the stale max, so p <= 2^8 (exact in the final
//       O / l, which share the max; f32 and bf16 hold it with the same relative
//       precision). After the first tiles the max rarely moves by 2^8, so the 128 FMUL
//       per tile mostly disappear (a warp-uniform branch on one vote);
//   (e) K and V chunks of the same key share one block-table lookup and its trap checks,
//       once per 16-key cache block and thread (the two chunks a thread copies of a block
//       are 8 keys apart), branch-free zero fill past n_keys.
// Result (SASS, same ptxas, sm_90a; 254 registers, 249 on sm_80, no spills; per warp and
// key tile, counted on the issued path): unmasked tiles 494 instructions, 128 HMMA + 366
// other (2.9x; was ~790, ~6.2x): FMUL 232 -> 4, FSETP 40 -> 4, MUFU 36 -> 32, FFMA 4 ->
// 32 (the folded scale), BAR 3 -> 1, BRA 37 -> 9; what is left is LDSM 48, FMNMX 40, FADD
// 36, F2FP 16, SHFL 8 and the K/V gather (114 instructions, 8 LDGSTS). Diagonal tiles 546
// (3.3x; were ~1010). A rescale, when a warp takes it, adds 155. Per pair of warp-tiles
// on a sub-partition: ~990 issue slots against ~1,660 tensor clocks, so issue no longer
// bounds it; the copies of tile kt+1 have a whole tile of compute to land in.
// Launch contract as the wide kernel, plus p.scale > 0 (the max of the raw scores is the
// max of the scaled ones; the launcher picks the plain-FMA kernel otherwise; traps here) and
// QILIN_ATTN_PREFILL_V2_HD128_SMEM_BYTES of dynamic shared memory (69,632 B: 2 blocks per
// SM on sm_80 / sm_90, 1 on sm_86 / sm_89's 99 KiB).

static constexpr float V2_RESCALE_SLACK = 8.0f;

// Whether a key tile takes the causal mask, as a type (the tile lambda's compile-time flag).
template <bool B>
struct V2Mask {
    static constexpr bool value = B;
};

QILIN_DEVICE float ex2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Arguments and shapes as qilin_attention_prefill_wide_hd64_bf16, with head_dim 128.
extern "C" __global__ void __launch_bounds__(QILIN_ATTN_PREFILL_THREADS, 2)
qilin_attention_prefill_v2_hd128_bf16(const QilinAttentionParams p,
                                      bf16* __restrict__ out,
                                      const bf16* __restrict__ q,
                                      const bf16* __restrict__ k_cache,
                                      const bf16* __restrict__ v_cache,
                                      const uint32_t* __restrict__ seq_starts,
                                      const uint32_t* __restrict__ context_lens,
                                      const uint32_t* __restrict__ block_tables) {
    QILIN_PDL_ENTRY();
    constexpr int D = 128;
    constexpr int MT = 2;
    constexpr int BN = QILIN_ATTN_PREFILL_V2_HD128_BLOCK_N;
    constexpr int BLOCK_M = QILIN_ATTN_PREFILL_WIDE_BLOCK_M;
    constexpr int LD = D + SMEM_PAD;
    constexpr int VECS = D / QILIN_VEC_ELEMS;
    constexpr int TILE = BN * LD;  // bf16 of one K or V buffer
    static_assert(BLOCK_M == 16 * MT * PREFILL_WARPS, "32 query rows per warp");
    static_assert((BLOCK_M + 4 * BN) * LD * sizeof(bf16) ==
                      QILIN_ATTN_PREFILL_V2_HD128_SMEM_BYTES,
                  "abi.h: the v2 head_dim-128 kernel's dynamic shared memory");
    static_assert(PREFILL_THREADS == 8 * VECS, "a thread's chunks are 8 keys apart");
    static_assert(BN % QILIN_BLOCK_SIZE == 0 && QILIN_BLOCK_SIZE == 16, "16-key cache blocks");

    extern __shared__ __align__(128) unsigned char prefill_v2_smem[];
    unsigned dynamic_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dynamic_bytes));
    if (dynamic_bytes < QILIN_ATTN_PREFILL_V2_HD128_SMEM_BYTES || blockDim.x != PREFILL_THREADS ||
        p.head_dim != D || p.num_kv_heads == 0 || p.num_heads % p.num_kv_heads != 0 ||
        !(p.scale > 0.0f)) {
        __trap();
    }
    bf16* s_q = reinterpret_cast<bf16*>(prefill_v2_smem);  // [BLOCK_M][LD]
    bf16* s_k = s_q + BLOCK_M * LD;                               // [2][BN][LD]
    bf16* s_v = s_k + 2 * TILE;                                   // [2][BN][LD]

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
    const unsigned first_pos = ctx - len + tile * BLOCK_M;
    const unsigned rows = min((unsigned)BLOCK_M, len - tile * BLOCK_M);
    const unsigned n_keys = first_pos + rows;
    const unsigned n_tiles = ceil_div(n_keys, (unsigned)BN);
    // Tiles 0 .. n_full - 1 hold only keys <= first_pos: every row sees them whole.
    const unsigned n_full = min((first_pos + 1) / BN, n_tiles);

    const unsigned warp = threadIdx.x / QILIN_WARP_SIZE;
    const unsigned lane = threadIdx.x % QILIN_WARP_SIZE;
    const unsigned r0 = warp * 16 * MT + lane / 4;
    const unsigned c0 = (lane % 4) * 2;

    const size_t q_stride = (size_t)p.num_heads * D;
    const size_t row0 = (size_t)start + tile * BLOCK_M;
    const bf16* q_tile = q + row0 * q_stride + (size_t)head * D;
#pragma unroll
    for (int i = 0; i < BLOCK_M * VECS / PREFILL_THREADS; ++i) {
        const unsigned c = threadIdx.x + i * PREFILL_THREADS;
        const unsigned r = c / VECS;
        const unsigned vec = c % VECS;
        const uint32_t at = smem_u32(s_q + r * LD + vec * QILIN_VEC_ELEMS);
        const bf16* from = q_tile + (r < rows ? r * q_stride + vec * QILIN_VEC_ELEMS : 0);
        cp_async_16(at, from, r < rows ? 16 : 0);
    }

    const size_t kv_stride = (size_t)p.num_kv_heads * D;
    const size_t head_offset = (size_t)kv_head * D;
    const uint32_t* table = block_tables + (size_t)s * p.max_blocks_per_seq;
    // This thread's chunks: keys ld_key + 8 * i (i < BN / 8) of a tile, dims ld_vec * 8 ..
    const unsigned ld_key = threadIdx.x / VECS;
    const unsigned ld_vec = threadIdx.x % VECS;
    const uint32_t ld_smem = smem_u32(s_k + ld_key * LD + ld_vec * QILIN_VEC_ELEMS);
    constexpr uint32_t TILE_BYTES = TILE * sizeof(bf16);
    constexpr uint32_t V_BYTES = 2 * TILE_BYTES;  // s_v - s_k

    // Gathers keys kt*BN .. +BN of K and V into buffer `buf`; keys >= n_keys become 0.
    auto load_kv = [&](unsigned kt, unsigned buf) {
#pragma unroll
        for (int b = 0; b < BN / QILIN_BLOCK_SIZE; ++b) {
            const unsigned j0 = kt * BN + b * QILIN_BLOCK_SIZE + ld_key;  // j0 % 16 < 8
            size_t off = 0;
            if (j0 < n_keys) {
                off = attention_cache_slot(table, j0, p) * kv_stride + head_offset +
                      ld_vec * QILIN_VEC_ELEMS;
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const unsigned bytes = j0 + 8 * h < n_keys ? 16 : 0;
                const size_t at_off = bytes != 0 ? off + (size_t)h * 8 * kv_stride : 0;
                const uint32_t at = ld_smem + buf * TILE_BYTES +
                                    (b * QILIN_BLOCK_SIZE + 8 * h) * LD * sizeof(bf16);
                cp_async_16(at, k_cache + at_off, bytes);
                cp_async_16(at + V_BYTES, v_cache + at_off, bytes);
            }
        }
    };

    float o[MT][D / 8][4];
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
    // Running max of each m-tile's rows r and r + 8 (scaled, log2 domain; possibly up to
    // V2_RESCALE_SLACK below the true max), and this lane's partial sums.
    float m_r[MT][2];
    float l_r[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        m_r[mt][0] = m_r[mt][1] = -INFINITY;
        l_r[mt][0] = l_r[mt][1] = 0.0f;
    }
    const float scale_log2 = p.scale * QILIN_LOG2E;

    const uint32_t q_frag = smem_u32(s_q + (warp * 16 * MT + lane % 16) * LD + (lane / 16) * 8);
    const uint32_t k_frag = smem_u32(s_k + (lane % 8) * LD + (lane / 8) * 8);
    const uint32_t v_frag =
        smem_u32(s_v + (lane % 8 + ((lane / 8) % 2) * 8) * LD + (lane / 16) * 8);

    // One key tile: S = Q K^T, (masked,) online softmax, O += P V. MASK: a diagonal tile.
    auto step = [&](unsigned kt, auto mask_tag) {
        constexpr bool MASK = decltype(mask_tag)::value;
        cp_async_wait<0>();  // tile kt (and, at kt = 0, Q) has landed ...
        __syncthreads();     // ... everywhere, and every warp is done with tile kt - 1
        if (kt + 1 < n_tiles) {
            load_kv(kt + 1, (kt + 1) & 1);  // into tile kt - 1's buffers
            cp_async_commit();
        }
        const uint32_t buf_off = (kt & 1) * TILE_BYTES;

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
            uint32_t q_pair[MT][2][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    ldmatrix_x4(q_pair[mt][h],
                                q_frag + (mt * 16 * LD + (2 * kk + h) * 16) * sizeof(bf16));
                }
            }
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                uint32_t b[4];
                ldmatrix_x4(b, k_frag + buf_off + (nt * 8 * LD + kk * 32) * sizeof(bf16));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16_16816(sc[mt][nt], q_pair[mt][0], b[0], b[1]);
                    mma_bf16_16816(sc[mt][nt], q_pair[mt][1], b[2], b[3]);
                }
            }
        }

        // Row maxima of the raw scores (scale > 0), masked by position on a diagonal tile.
        float mx[MT][2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if constexpr (MASK) {
                // key > first_pos + r  <=>  key - first_pos > r (both sides >= 0 here
                // or the key is below every row's position).
                const int rel = (int)(kt * BN + c0) - (int)first_pos - (int)(r0 + 16 * mt);
#pragma unroll
                for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        if (rel + nt * 8 + (i & 1) - (i < 2 ? 0 : 8) > 0) {
                            sc[mt][nt][i] = -INFINITY;
                        }
                    }
                }
            }
            mx[mt][0] = -INFINITY;
            mx[mt][1] = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                mx[mt][0] = fmaxf(mx[mt][0], fmaxf(sc[mt][nt][0], sc[mt][nt][1]));
                mx[mt][1] = fmaxf(mx[mt][1], fmaxf(sc[mt][nt][2], sc[mt][nt][3]));
            }
        }
        bool grow = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float x = mx[mt][h];
                x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
                x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
                mx[mt][h] = x * scale_log2;
                grow |= mx[mt][h] > m_r[mt][h] + V2_RESCALE_SLACK;
            }
        }
        if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float m_new = fmaxf(m_r[mt][h], mx[mt][h]);
                    const float corr =
                        m_r[mt][h] == -INFINITY ? 0.0f : ex2_approx(m_r[mt][h] - m_new);
                    m_r[mt][h] = m_new;
                    l_r[mt][h] *= corr;
#pragma unroll
                    for (int dt = 0; dt < D / 8; ++dt) {
                        o[mt][dt][2 * h] *= corr;
                        o[mt][dt][2 * h + 1] *= corr;
                    }
                }
            }
        }

        // P = exp2(s * scale_log2 - m) (masked: exp2(-inf) = 0), summed in f32 and packed
        // to bf16 A fragments (n-tiles 2kc, 2kc + 1 are keys kc*16 .. +15).
        uint32_t pa[MT][BN / 16][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const float neg_m0 = -m_r[mt][0];
            const float neg_m1 = -m_r[mt][1];
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                sc[mt][nt][0] = ex2_approx(fmaf(sc[mt][nt][0], scale_log2, neg_m0));
                sc[mt][nt][1] = ex2_approx(fmaf(sc[mt][nt][1], scale_log2, neg_m0));
                sc[mt][nt][2] = ex2_approx(fmaf(sc[mt][nt][2], scale_log2, neg_m1));
                sc[mt][nt][3] = ex2_approx(fmaf(sc[mt][nt][3], scale_log2, neg_m1));
                l_r[mt][0] += sc[mt][nt][0] + sc[mt][nt][1];
                l_r[mt][1] += sc[mt][nt][2] + sc[mt][nt][3];
            }
#pragma unroll
            for (int kc = 0; kc < BN / 16; ++kc) {
                pa[mt][kc][0] = pack_bf16x2(sc[mt][2 * kc][0], sc[mt][2 * kc][1]);
                pa[mt][kc][1] = pack_bf16x2(sc[mt][2 * kc][2], sc[mt][2 * kc][3]);
                pa[mt][kc][2] = pack_bf16x2(sc[mt][2 * kc + 1][0], sc[mt][2 * kc + 1][1]);
                pa[mt][kc][3] = pack_bf16x2(sc[mt][2 * kc + 1][2], sc[mt][2 * kc + 1][3]);
            }
        }

#pragma unroll
        for (int kc = 0; kc < BN / 16; ++kc) {
#pragma unroll
            for (int dt = 0; dt < D / 16; ++dt) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, v_frag + buf_off + (kc * 16 * LD + dt * 16) * sizeof(bf16));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_bf16_16816(o[mt][2 * dt], pa[mt][kc], b[0], b[1]);
                    mma_bf16_16816(o[mt][2 * dt + 1], pa[mt][kc], b[2], b[3]);
                }
            }
        }
    };

    load_kv(0, 0);
    cp_async_commit();  // one group: Q and tile 0
    for (unsigned kt = 0; kt < n_full; ++kt) {
        step(kt, V2Mask<false>{});
    }
    for (unsigned kt = n_full; kt < n_tiles; ++kt) {
        step(kt, V2Mask<true>{});
    }

    bf16* out_tile = out + row0 * q_stride + (size_t)head * D;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        const unsigned ra = r0 + 16 * mt;
        const unsigned rb = ra + 8;
        float l0 = l_r[mt][0];
        float l1 = l_r[mt][1];
        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
        // l >= 1 for a row of the chunk (its max, or a score within the slack of the max
        // it uses, contributes at least exp2(0)).
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
