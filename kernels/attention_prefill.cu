// Paged causal attention for prefill chunks (any number of new tokens per sequence, decode
// rows included when asked): flash-attention tiling on tensor cores, plus a plain-FMA
// fallback kernel. bf16 q and KV cache, f32 softmax and accumulation.
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
// qilin_attention_prefill_hd{64,128}_bf16 (tensor cores, D = 64 or 128):
//   grid  = (num_heads, n_tokens / BLOCK_M + n_seqs), block = QILIN_ATTN_PREFILL_THREADS.
//   Tile slot b = gridDim.y - 1 - blockIdx.y (reversed: blocks start in blockIdx order with
//   x fastest, so every head of the last, most expensive causal tiles starts first, and
//   the heads of a KV group run side by side on the same K/V tiles in L2) serves tile
//   b - key(s) of the sequence s with the largest
//   key(s) = seq_starts[s] / BLOCK_M + s <= b (binary search over seq_starts): key() is
//   strictly increasing and gives sequence s at least ceil(len / BLOCK_M) slots, so the
//   grid covers every query tile of the batch without a host-side tile list; slots past a
//   sequence's last tile exit at once (at most one per sequence).
//   Each of the 4 warps owns 16 query rows of the 64-row tile. The Q fragments stay in
//   registers (mma A layout, loaded once). Key tiles of BLOCK_N = 64 positions (four
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
//   tiles, mostly from L2.
//
// qilin_attention_prefill_simple_bf16 (fallback, any D % 8 == 0 up to 256): one warp per
//   (row, head), keys one at a time: warp-reduced dot product, online softmax with expf,
//   no shared memory. The launcher uses it for head sizes without a tensor-core kernel,
//   and for every row with QILIN_ATTN_SIMPLE=1 (bisecting a parity failure).
//
// Napkin math (H100 SXM): causal prefill of n tokens costs 4 * heads * D * n^2 / 2 flops
// (Qwen2.5-7B, n = 16K: 1.9 TFLOP per layer). At the issue's 350 TFLOP/s goal that is
// 5.5 ms; mma.sync (no wgmma) tops out near ~650 TFLOP/s dense bf16 on H100, and this
// straightforward 64x64 tiling with a single K/V buffer should land well below that
// (expect 150-250 TFLOP/s; measure). Each key tile is 4 D bytes of K/V per key (mostly
// from L2) against 64 rows * 4 D flops: 64 flop/B, compute bound.
//
// Launch contract (checked by the Rust launcher; violations trap):
//   hd kernels: head_dim == 64 / 128, blockDim.x == QILIN_ATTN_PREFILL_THREADS, static
//   shared memory only (2 * 64 * (D + 8) * 2 B = 34,816 B for D = 128, 18,432 B for 64);
//   simple kernel: D % 8 == 0, D <= QILIN_ATTN_MAX_HEAD_DIM, blockDim.x == 32;
//   both: num_heads % num_kv_heads == 0, seq_starts[0] == 0 and non-decreasing, and
//   len <= ctx for every sequence; q/out rows 16-byte aligned.

#include "attention_common.cuh"
#include "mma.cuh"

static constexpr int BLOCK_M = QILIN_ATTN_PREFILL_BLOCK_M;
static constexpr int BLOCK_N = QILIN_ATTN_PREFILL_BLOCK_N;
static constexpr int PREFILL_THREADS = QILIN_ATTN_PREFILL_THREADS;
static constexpr int SMEM_PAD = 8;  // bf16 per shared row beyond D

static_assert(BLOCK_M == 16 * (PREFILL_THREADS / QILIN_WARP_SIZE), "16 query rows per warp");
static_assert(BLOCK_N % 16 == 0 && BLOCK_N % QILIN_BLOCK_SIZE == 0, "BLOCK_N in whole blocks");

// ---------------------------------------------------------------------------------------
// Tensor-core kernel.

// The sequence and query tile of tile slot b (see the header); false: nothing to do.
QILIN_DEVICE bool prefill_tile_of(const QilinAttentionParams& p,
                                  const uint32_t* __restrict__ seq_starts,
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
        if (seq_starts[mid] / BLOCK_M + mid <= b) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    const unsigned first = seq_starts[lo] / BLOCK_M + lo;
    if (first > b) {
        return false;  // only if seq_starts[0] != 0 (a broken batch)
    }
    seq = lo;
    tile = b - first;
    return true;
}

template <int D>
QILIN_DEVICE void attention_prefill_mma(const QilinAttentionParams& p,
                                        bf16* __restrict__ out,
                                        const bf16* __restrict__ q,
                                        const bf16* __restrict__ k_cache,
                                        const bf16* __restrict__ v_cache,
                                        const uint32_t* __restrict__ seq_starts,
                                        const uint32_t* __restrict__ context_lens,
                                        const uint32_t* __restrict__ block_tables) {
    static_assert(D % 32 == 0 && D <= QILIN_ATTN_MAX_HEAD_DIM, "pairs of 16-dim k-steps");
    constexpr int LD = D + SMEM_PAD;  // shared row stride in bf16 (16-byte multiple)
    constexpr int VECS = D / QILIN_VEC_ELEMS;
    __shared__ __align__(128) bf16 s_k[BLOCK_N * LD];  // [BLOCK_N keys][D (+ pad)]
    __shared__ __align__(128) bf16 s_v[BLOCK_N * LD];  // [BLOCK_N keys][D (+ pad)]

    if (blockDim.x != PREFILL_THREADS || p.head_dim != D || p.num_kv_heads == 0 ||
        p.num_heads % p.num_kv_heads != 0) {
        __trap();
    }
    unsigned s;
    unsigned tile;
    if (!prefill_tile_of(p, seq_starts, gridDim.y - 1 - blockIdx.y, s, tile)) {
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
    const unsigned n_tiles = ceil_div(n_keys, (unsigned)BLOCK_N);

    const unsigned warp = threadIdx.x / QILIN_WARP_SIZE;
    const unsigned lane = threadIdx.x % QILIN_WARP_SIZE;
    const unsigned r0 = warp * 16 + lane / 4;  // this lane's two rows of the tile
    const unsigned r1 = r0 + 8;
    const unsigned c0 = (lane % 4) * 2;  // this lane's first column of every fragment

    const size_t q_stride = (size_t)p.num_heads * D;
    const size_t row0 = (size_t)start + tile * BLOCK_M;
    const bf16* q_tile = q + row0 * q_stride + (size_t)head * D;

    // Q as mma A fragments for the D / 16 k-steps; rows past the chunk are zero.
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const bf16* p0 = q_tile + r0 * q_stride + kk * 16 + c0;
        const bf16* p1 = q_tile + r1 * q_stride + kk * 16 + c0;
        qa[kk][0] = r0 < rows ? *reinterpret_cast<const uint32_t*>(p0) : 0u;
        qa[kk][1] = r1 < rows ? *reinterpret_cast<const uint32_t*>(p1) : 0u;
        qa[kk][2] = r0 < rows ? *reinterpret_cast<const uint32_t*>(p0 + 8) : 0u;
        qa[kk][3] = r1 < rows ? *reinterpret_cast<const uint32_t*>(p1 + 8) : 0u;
    }

    float o[D / 8][4];  // output accumulators, C layout, 8 dims per n-tile
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            o[dt][i] = 0.0f;
        }
    }
    float m0 = -INFINITY;  // running max (log2 domain) of rows r0 and r1
    float m1 = -INFINITY;
    float l0 = 0.0f;  // running sum of this lane's columns; the 4 lanes of a row are summed
    float l1 = 0.0f;  // at the end (they share m, so the partial sums rescale alike)
    const float scale_log2 = p.scale * QILIN_LOG2E;

    const size_t kv_stride = (size_t)p.num_kv_heads * D;
    const size_t head_offset = (size_t)kv_head * D;
    const uint32_t* table = block_tables + (size_t)s * p.max_blocks_per_seq;

    // Gathers keys kt*BLOCK_N .. +BLOCK_N of `cache` into `dst`; keys >= n_keys become 0.
    static_assert(BLOCK_N * VECS % PREFILL_THREADS == 0, "whole chunks per thread");
    auto load_tile = [&](bf16* dst, const bf16* __restrict__ cache, unsigned kt) {
#pragma unroll
        for (int i = 0; i < BLOCK_N * VECS / PREFILL_THREADS; ++i) {
            const unsigned c = threadIdx.x + i * PREFILL_THREADS;
            const unsigned key = c / VECS;
            const unsigned vec = c % VECS;
            const unsigned j = kt * BLOCK_N + key;
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

        // S = Q K^T for this warp's 16 rows x BLOCK_N keys.
        float sc[BLOCK_N / 8][4];
#pragma unroll
        for (int nt = 0; nt < BLOCK_N / 8; ++nt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                sc[nt][i] = 0.0f;
            }
        }
#pragma unroll
        for (int kk = 0; kk < D / 32; ++kk) {
#pragma unroll
            for (int nt = 0; nt < BLOCK_N / 8; ++nt) {
                // Matrices: keys nt*8..+7 x dims kk*32 + {0, 8, 16, 24} .. +7.
                uint32_t b[4];
                ldmatrix_x4(b, smem_u32(s_k + (nt * 8 + lane % 8) * LD + kk * 32 + (lane / 8) * 8));
                mma_bf16_16816(sc[nt], qa[2 * kk], b[0], b[1]);
                mma_bf16_16816(sc[nt], qa[2 * kk + 1], b[2], b[3]);
            }
        }

        // Scale into the log2 domain and mask keys after each row's own position. Row 0
        // always sees key 0 in tile 0, so every row's max is finite from tile 0 on.
        const bool needs_mask = kt * BLOCK_N + BLOCK_N - 1 > first_pos;
        float mx0 = -INFINITY;
        float mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < BLOCK_N / 8; ++nt) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                float x = sc[nt][i] * scale_log2;
                if (needs_mask) {
                    const unsigned key = kt * BLOCK_N + nt * 8 + c0 + (i & 1);
                    const unsigned r = i < 2 ? r0 : r1;
                    if (key > first_pos + r) {
                        x = -INFINITY;
                    }
                }
                sc[nt][i] = x;
            }
            mx0 = fmaxf(mx0, fmaxf(sc[nt][0], sc[nt][1]));
            mx1 = fmaxf(mx1, fmaxf(sc[nt][2], sc[nt][3]));
        }
        // The 4 lanes of a quad hold the same two rows.
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float m0_new = fmaxf(m0, mx0);
        const float m1_new = fmaxf(m1, mx1);
        const float corr0 = attention_rescale(m0, m0_new);
        const float corr1 = attention_rescale(m1, m1_new);
        m0 = m0_new;
        m1 = m1_new;
        float sum0 = 0.0f;
        float sum1 = 0.0f;
#pragma unroll
        for (int nt = 0; nt < BLOCK_N / 8; ++nt) {
            sc[nt][0] = exp2f(sc[nt][0] - m0);  // masked: exp2(-inf) = 0
            sc[nt][1] = exp2f(sc[nt][1] - m0);
            sc[nt][2] = exp2f(sc[nt][2] - m1);
            sc[nt][3] = exp2f(sc[nt][3] - m1);
            sum0 += sc[nt][0] + sc[nt][1];
            sum1 += sc[nt][2] + sc[nt][3];
        }
        l0 = l0 * corr0 + sum0;
        l1 = l1 * corr1 + sum1;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            o[dt][0] *= corr0;
            o[dt][1] *= corr0;
            o[dt][2] *= corr1;
            o[dt][3] *= corr1;
        }

        cp_async_wait<0>();  // V(kt) has landed ...
        __syncthreads();     // ... everywhere, and every warp is done reading s_k
        if (kt + 1 < n_tiles) {
            load_tile(s_k, k_cache, kt + 1);
            cp_async_commit();
        }

        // O += P V: the S accumulators of n-tiles 2kc and 2kc+1 are the A fragment of
        // keys kc*16 .. +15.
#pragma unroll
        for (int kc = 0; kc < BLOCK_N / 16; ++kc) {
            uint32_t a[4];
            a[0] = pack_bf16x2(sc[2 * kc][0], sc[2 * kc][1]);
            a[1] = pack_bf16x2(sc[2 * kc][2], sc[2 * kc][3]);
            a[2] = pack_bf16x2(sc[2 * kc + 1][0], sc[2 * kc + 1][1]);
            a[3] = pack_bf16x2(sc[2 * kc + 1][2], sc[2 * kc + 1][3]);
#pragma unroll
            for (int dt = 0; dt < D / 16; ++dt) {
                // Matrices: keys kc*16 + {0, 8} .. +7 x dims dt*16 + {0, 8} .. +7, transposed.
                const unsigned key = kc * 16 + lane % 8 + ((lane / 8) % 2) * 8;
                const unsigned dim = dt * 16 + (lane / 16) * 8;
                uint32_t b[4];
                ldmatrix_x4_trans(b, smem_u32(s_v + key * LD + dim));
                mma_bf16_16816(o[2 * dt], a, b[0], b[1]);
                mma_bf16_16816(o[2 * dt + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();  // every warp is done reading s_v before V(kt+1) overwrites it
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = 1.0f / l0;  // l >= 1: the row max contributes exp2(0)
    const float inv1 = 1.0f / l1;
    bf16* out_tile = out + row0 * q_stride + (size_t)head * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
        const unsigned col = dt * 8 + c0;
        if (r0 < rows) {
            *reinterpret_cast<uint32_t*>(out_tile + r0 * q_stride + col) =
                pack_bf16x2(o[dt][0] * inv0, o[dt][1] * inv0);
        }
        if (r1 < rows) {
            *reinterpret_cast<uint32_t*>(out_tile + r1 * q_stride + col) =
                pack_bf16x2(o[dt][2] * inv1, o[dt][3] * inv1);
        }
    }
}

// out:          bf16 [n_tokens, num_heads * D]   rows of the served sequences written
// q:            bf16 [n_tokens, num_heads * D]
// k_cache:      bf16 [cache_slots, num_kv_heads * D]  one layer's keys
// v_cache:      bf16 [cache_slots, num_kv_heads * D]  one layer's values
// seq_starts:   u32  [n_seqs + 1]  first row of each sequence, then n_tokens
// context_lens: u32  [n_seqs]      cached tokens of each sequence including this step's
// block_tables: u32  [n_seqs, max_blocks_per_seq]
// Registers ~140 (Q fragments 16, O 32, S 32): 3 blocks per SM.
extern "C" __global__ void __launch_bounds__(QILIN_ATTN_PREFILL_THREADS, 3)
qilin_attention_prefill_hd64_bf16(const QilinAttentionParams p,
                                  bf16* __restrict__ out,
                                  const bf16* __restrict__ q,
                                  const bf16* __restrict__ k_cache,
                                  const bf16* __restrict__ v_cache,
                                  const uint32_t* __restrict__ seq_starts,
                                  const uint32_t* __restrict__ context_lens,
                                  const uint32_t* __restrict__ block_tables) {
    attention_prefill_mma<64>(p, out, q, k_cache, v_cache, seq_starts, context_lens,
                              block_tables);
}

// Same arguments and shapes as qilin_attention_prefill_hd64_bf16, D = 128.
// Registers ~240 (Q fragments 32, O 64, S 32): 2 blocks per SM. The explicit minimum keeps
// ptxas from squeezing registers for occupancy (it spilled without one on sm_80).
extern "C" __global__ void __launch_bounds__(QILIN_ATTN_PREFILL_THREADS, 2)
qilin_attention_prefill_hd128_bf16(const QilinAttentionParams p,
                                   bf16* __restrict__ out,
                                   const bf16* __restrict__ q,
                                   const bf16* __restrict__ k_cache,
                                   const bf16* __restrict__ v_cache,
                                   const uint32_t* __restrict__ seq_starts,
                                   const uint32_t* __restrict__ context_lens,
                                   const uint32_t* __restrict__ block_tables) {
    attention_prefill_mma<128>(p, out, q, k_cache, v_cache, seq_starts, context_lens,
                               block_tables);
}

// ---------------------------------------------------------------------------------------
// Plain-FMA fallback: grid = (n_tokens, num_heads), block = 32 (one warp). Lane l owns
// dims l, l + 32, ... of the row; keys are visited in order with an online softmax in the
// natural-exponent domain (expf), as close to the CPU twin's arithmetic as a warp allows.
//
// out, q, k_cache, v_cache, seq_starts, context_lens, block_tables: as above
// token_seq:    u32  [n_tokens]  sequence index of each row
extern "C" __global__ void __launch_bounds__(QILIN_ATTN_SIMPLE_THREADS)
qilin_attention_prefill_simple_bf16(const QilinAttentionParams p,
                                    bf16* __restrict__ out,
                                    const bf16* __restrict__ q,
                                    const bf16* __restrict__ k_cache,
                                    const bf16* __restrict__ v_cache,
                                    const uint32_t* __restrict__ seq_starts,
                                    const uint32_t* __restrict__ context_lens,
                                    const uint32_t* __restrict__ block_tables,
                                    const uint32_t* __restrict__ token_seq) {
    constexpr int PER_LANE = QILIN_ATTN_MAX_HEAD_DIM / QILIN_WARP_SIZE;
    const unsigned D = p.head_dim;
    if (blockDim.x != QILIN_WARP_SIZE || D == 0 || D % QILIN_VEC_ELEMS != 0 ||
        D > QILIN_ATTN_MAX_HEAD_DIM || p.num_kv_heads == 0 || p.num_heads % p.num_kv_heads != 0) {
        __trap();
    }
    const unsigned t = blockIdx.x;
    const unsigned head = blockIdx.y;
    if (t >= p.n_tokens || head >= p.num_heads) {
        return;
    }
    const unsigned s = token_seq[t];
    if (s >= p.n_seqs) {
        __trap();
    }
    const unsigned start = seq_starts[s];
    const unsigned len = seq_starts[s + 1] - start;
    if (t < start || t - start >= len) {
        __trap();  // token_seq and seq_starts disagree
    }
    if (len == 1 && p.skip_decode_rows != 0) {
        return;
    }
    const unsigned ctx = context_lens[s];
    if (ctx < len) {
        __trap();
    }
    const unsigned pos = ctx - len + (t - start);
    const unsigned kv_head = head / (p.num_heads / p.num_kv_heads);
    const unsigned lane = threadIdx.x;

    const size_t q_stride = (size_t)p.num_heads * D;
    const bf16* q_row = q + (size_t)t * q_stride + (size_t)head * D;
    float qf[PER_LANE];
    float acc[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const unsigned d = lane + i * QILIN_WARP_SIZE;
        qf[i] = d < D ? __bfloat162float(q_row[d]) : 0.0f;
        acc[i] = 0.0f;
    }
    float m = -INFINITY;
    float l = 0.0f;
    const size_t kv_stride = (size_t)p.num_kv_heads * D;
    const uint32_t* table = block_tables + (size_t)s * p.max_blocks_per_seq;
    for (unsigned j = 0; j <= pos; ++j) {
        const size_t at = attention_cache_slot(table, j, p) * kv_stride + (size_t)kv_head * D;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            const unsigned d = lane + i * QILIN_WARP_SIZE;
            if (d < D) {
                dot = fmaf(qf[i], __bfloat162float(k_cache[at + d]), dot);
            }
        }
        const float score = warp_reduce_sum(dot) * p.scale;
        if (score > m) {
            const float c = expf(m - score);  // m = -inf: 0
            l *= c;
#pragma unroll
            for (int i = 0; i < PER_LANE; ++i) {
                acc[i] *= c;
            }
            m = score;
        }
        const float pr = expf(score - m);
        l += pr;
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
            const unsigned d = lane + i * QILIN_WARP_SIZE;
            if (d < D) {
                acc[i] = fmaf(pr, __bfloat162float(v_cache[at + d]), acc[i]);
            }
        }
    }
    bf16* out_row = out + (size_t)t * q_stride + (size_t)head * D;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
        const unsigned d = lane + i * QILIN_WARP_SIZE;
        if (d < D) {
            out_row[d] = __float2bfloat16_rn(acc[i] / l);
        }
    }
}
