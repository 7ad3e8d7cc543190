// The 4-bit GEMM on the tensor-core GEMV's path, qilin_qgemm_mma_w4_bf16: the layers
// qilin_qgemv_mma_w4_bf16 takes (4-bit levels, groups a power of two and a multiple of 128
// channels; kernels/quant_gemv_mma.cu), any number of tokens. Same semantics, CPU twin and
// tolerance as that GEMV: out[t][o] = bf16_rne(sum_k W[o][k] x[t][k] + bias[o]), W[o][k] =
// fma(scale, level, min) with exact levels, summed in f32 in an order of its own;
// tests/gpu_quant_linear.rs compares it with the twin at the GEMV's tolerance. Compiles,
// unverified; opt-in with QILIN_CUDA_QGEMM_MMA=1 (src/backend/cuda/quant_gemm_mma.rs).
//
// Why (bench/notes.md, "2026-11-27, fifth session"): the GEMM of kernels/quant_gemm.cu
// dequantizes every level into a shared weight tile behind one block-wide barrier per
// 32-channel step, and runs at ~27% issue efficiency (gate_up [64] 132 us against a 22 us
// floor on an H200); the GEMV's chunks of 8 tokens repeat the whole level unpacking per
// chunk (gate_up [32] 153 us). Here the levels go from registers straight into A
// fragments by the GEMV's LOP3 (no weight tile, no barrier for weights), and one A
// fragment serves all 8 token tiles of the block: the unpacking is paid once per 64
// tokens.
//
// Design, per block of QILIN_QGEMM_MMA_THREADS threads (8 warps) and one tile of
// QILIN_QGEMM_MMA_ROWS output channels (warp w: rows 16w..16w + 15, one m16 tile) x
// QILIN_QGEMM_MMA_TOKENS tokens (8 n8 tiles), walking the input in steps of
// QILIN_QGEMV_MMA_STEP (128) channels, one group slice per step:
//   - levels: lane (g, t) = (lane / 4, lane % 4) loads the 16 bytes (32 levels) of rows g and
//     g + 8 at chunk 4q + t of step q, and their group's (scale, min), as the GEMV does,
//     QILIN_QGEMM_MMA_DEPTH steps ahead in a register ring;
//   - x: the block's 64 tokens x 128 channels of step q arrive by cp.async into stage
//     q % QILIN_QGEMM_MMA_X_STAGES of shared memory, two steps ahead (rows past n_tokens
//     zero-filled without a read). Once landed, each vector is rewritten in place as the
//     B pairs (x[s], x[s + 4]), s = 0..3, that level_pair's A pairs meet (in the pass that
//     sums X, below), so the math needs no PRMT. Lane (g, t) reads token 8j + g's 8
//     values of word i of its chunk, for each token tile j, by LDS.128; the 16-byte
//     vectors of a row are swizzled (`x_slot`) and rows padded to 272 bytes so that the 8
//     lanes of each quarter-warp phase hit 8 distinct bank groups;
//   - per step and warp: 4 words x 2 pairs of A fragments by LOP3 (16), each used by 8 mma
//     (one per token tile) with B pairs as loaded: 64 mma give D = sum (128 + l) x for 16
//     rows x 64 tokens; then per row and token acc += scale * (D - 128 X) + min * X, X =
//     the token's sum of x over the step (the GEMV gets X from 8 more mma with A = 1 per
//     tile, which here would double the tensor work);
//   - X: computed once per block and step from the landed stage (4 threads per token, 32
//     values each, 2 shuffles), one step ahead, into one of two shared slots, in the same
//     pass that reorders the stage into B pairs (16 PRMT per thread and step);
//   - one barrier per step. At step q, after cp.async.wait_group(0) (this thread's copies
//     of stage q + 1 have landed) it publishes stage q + 1 and X[q] (written during step
//     q - 1), and retires stage q - 1's buffer, which stage q + 2's copies then refill, and
//     X slot (q + 1) % 2, which X[q + 1] then overwrites.
//   Epilogue: bias added in f32, one rounding to bf16, each lane storing its C fragments
//   (rows g and g + 8, tokens 2t and 2t + 1 of each tile) where row and token exist.
//
// Napkin math (H200: 132 SMs at 1.98 GHz; Qwen2.5-7B gate_up int4, 64 tokens, 296 tiles,
// 2.2 waves at one block per SM):
//   - tensor pipe: 8.7 G multiply-adds at mma.sync's ~1300 per clock and SM: ~26 us;
//   - shared memory: per warp and step 32 LDS.128 per lane (16 KiB per warp, 128 KiB per
//     block for 16384 weights, 8 bytes per weight) at 128 B/clock: 16 weights per clock and
//     SM, ~33 us; L2 reads of x: 296 tiles x 458 KiB = 136 MB, ~14 us in the shadow;
//   - issue per warp and step: 64 HMMA, 32 LDS, 16 LOP3 + 16 shifts, 32 FFMA, ~60 of the
//     X pass (its PRMT, conversions and adds, 1/8 of the block's) and ~30 of loads and
//     addressing: ~250 warp-instructions per 2048 weights, at ~2-3 per clock and SM ~16-25
//     weights per clock (the B pairs by PRMT in the math, as the GEMV makes them, would
//     add 128);
//   so gate_up [64] ~35-50 us (against 132 for qilin_qgemm_w4_bf16, 22 us floor); down
//   (3584 rows: 28 tiles, no split-K) fills only 28 SMs and is not for this kernel.
//
// Launch contract, checked (a violation traps): blocks of exactly QILIN_QGEMM_MMA_THREADS
// threads with at least QILIN_QGEMM_MMA_SMEM_BYTES of dynamic shared memory; grid =
// (ceil(out_features / QILIN_QGEMM_MMA_ROWS), ceil(n_tokens / QILIN_QGEMM_MMA_TOKENS)); the
// GEMV's shapes (qmma_shapes_ok) with any n_tokens >= 1; n_tokens x in_features < 2^32;
// 16-byte aligned x and levels, 8-byte aligned scale_min (whole cudarc allocations).

#include "common.cuh"
#include "mma.cuh"  // cp.async wrappers
#include "quant_mma.cuh"

#define QGM_WARPS (QILIN_QGEMM_MMA_THREADS / QILIN_WARP_SIZE)
#define QGM_STEP QILIN_QGEMV_MMA_STEP
#define QGM_TOKENS QILIN_QGEMM_MMA_TOKENS
#define QGM_LD QILIN_QGEMM_MMA_X_LD
#define QGM_STAGES QILIN_QGEMM_MMA_X_STAGES
#define QGM_TILES (QGM_TOKENS / 8)           // n8 token tiles per block
#define QGM_VECS (QGM_STEP / QILIN_VEC_ELEMS)  // 16-byte vectors per token and step

static_assert(QILIN_QGEMM_MMA_ROWS == 16 * QGM_WARPS, "abi.h: one m16 tile of rows per warp");
static_assert(QGM_STEP == 128 && QGM_VECS == 16, "a step is 4 lanes' 32-value chunks");
static_assert(QGM_TOKENS == 64, "8 n8 token tiles per block");
static_assert(QILIN_QGEMM_MMA_THREADS == 4 * QGM_TOKENS, "X sums: 4 threads per token");
static_assert(QGM_TOKENS * QGM_VECS == 4 * QILIN_QGEMM_MMA_THREADS,
              "a stage is 4 cp.async chunks per thread");
static_assert(QGM_STAGES == 3, "the step schedule below keeps stages q, q + 1, q + 2");
static_assert(QGM_LD >= QGM_STEP && (QGM_LD * 2) % 16 == 0 && (QGM_LD * 2 / 16) % 8 == 1,
              "abi.h: a row of 16-byte multiples, the next row one bank group over");
static_assert(QILIN_QGEMM_MMA_SMEM_BYTES ==
                  QGM_STAGES * QGM_TOKENS * QGM_LD * 2 + 2 * QGM_TOKENS * 4,
              "abi.h: QILIN_QGEMM_MMA_SMEM_BYTES is the stages and the two X slots");

// Shared slot of 16-byte vector v (0..15) of a token's row in a stage. Lane (g, t) reads
// vector 4t + i (i = 0..3, the same for all lanes of one load) of token 8j + g: slots
// (2t + i) mod 8 + 8 (i >= 2) put t's 4 values 2 bank groups apart, and the row stride
// (272 B, 17 groups) puts g = 0 and 1 one group apart: 8 distinct groups per phase. A
// bijection of 0..15 (each residue mod 8 is taken by one i < 2 and one i >= 2).
QILIN_DEVICE unsigned x_slot(unsigned v) {
    const unsigned t = v / 4, i = v % 4;
    return ((2 * t + i) & 7u) | ((i >> 1) << 3);
}

extern "C" __global__ void
__launch_bounds__(QILIN_QGEMM_MMA_THREADS, QILIN_QGEMM_MMA_MIN_BLOCKS)
qilin_qgemm_mma_w4_bf16(const QilinQuantGemvParams p,
                        bf16* __restrict__ out,               // [n_tokens, out_features]
                        const bf16* __restrict__ x,           // [n_tokens, in_features]
                        const uint8_t* __restrict__ levels,   // [out_features, in_features / 2]
                        const float2* __restrict__ scale_min, // [out_features, in / group_size]
                        const bf16* __restrict__ bias) {     // [out_features] or NULL
    QILIN_PDL_ENTRY();
    constexpr int DEPTH = QILIN_QGEMM_MMA_DEPTH;
    extern __shared__ __align__(16) unsigned char qgm_smem[];
    // [QGM_STAGES][QGM_TOKENS][QGM_LD] bf16, then the X slots [2][QGM_TOKENS] f32.
    bf16* stages = reinterpret_cast<bf16*>(qgm_smem);
    float* xsums = reinterpret_cast<float*>(stages + QGM_STAGES * QGM_TOKENS * QGM_LD);
    unsigned dynamic_bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dynamic_bytes));
    if (blockDim.x != QILIN_QGEMM_MMA_THREADS || dynamic_bytes < QILIN_QGEMM_MMA_SMEM_BYTES ||
        !qmma_shapes_ok(p, 0xffffffffu) ||
        gridDim.x != (p.out_features + QILIN_QGEMM_MMA_ROWS - 1) / QILIN_QGEMM_MMA_ROWS ||
        gridDim.y != (p.n_tokens + QGM_TOKENS - 1) / QGM_TOKENS) {
        __trap();
    }
    const unsigned k = p.in_features;
    const unsigned first_token = blockIdx.y * QGM_TOKENS;
    const unsigned n_tokens = min(p.n_tokens - first_token, (unsigned)QGM_TOKENS);
    x += (size_t)first_token * k;
    out += (size_t)first_token * p.out_features;
    const unsigned lane = threadIdx.x % QILIN_WARP_SIZE;
    const unsigned warp = threadIdx.x / QILIN_WARP_SIZE;
    const unsigned g = lane / 4, t = lane % 4;
    const unsigned n_steps = k / QGM_STEP;
    const unsigned row0 = blockIdx.x * QILIN_QGEMM_MMA_ROWS + warp * 16;
    const QmmaLaneRows rows = qmma_lane_rows(p, levels, scale_min, row0, g, t);

    // Stage of step q into buffer q % QGM_STAGES: thread i copies vectors i + 256 c (c =
    // 0..3) of the stage's 64 x 16, token (i + 256 c) / 16, one commit group per step.
    auto issue_x = [&](unsigned q) {
        if (q < n_steps) {
            bf16* stage = stages + (q % QGM_STAGES) * QGM_TOKENS * QGM_LD;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const unsigned chunk = threadIdx.x + c * QILIN_QGEMM_MMA_THREADS;
                const unsigned tok = chunk / QGM_VECS, v = chunk % QGM_VECS;
                const bf16* src = x + (size_t)min(tok, n_tokens - 1) * k + q * QGM_STEP +
                                  v * QILIN_VEC_ELEMS;
                cp_async_16(smem_u32(stage + tok * QGM_LD + x_slot(v) * QILIN_VEC_ELEMS), src,
                            tok < n_tokens ? 16u : 0u);
            }
        }
        cp_async_commit();  // an empty group past the end keeps the wait counts uniform
    };
    // X[q] = each token's sum of x over step q, into slot q % 2, and the stage's vectors
    // put into B-pair order in place: (x0, x4), (x1, x5), (x2, x6), (x3, x7) as words 0..3,
    // level_pair's order, so the math reads B pairs without a PRMT each (8 tiles would
    // repeat them). Thread i takes 4 of token i / 4's 16 vectors (any 4: a sum does not
    // care which slot holds which vector, and each vector is rewritten by one thread).
    auto sum_x = [&](unsigned q) {
        if (q < n_steps) {
            bf16* row = stages + (q % QGM_STAGES) * QGM_TOKENS * QGM_LD +
                        (threadIdx.x / 4) * QGM_LD + (threadIdx.x % 4) * 4 * QILIN_VEC_ELEMS;
            float s = 0.0f;
#pragma unroll
            for (int v = 0; v < 4; ++v) {
                const uint4 u = load128(row + v * QILIN_VEC_ELEMS);
                float f[8];
                bf16x8_to_float(u, f);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    s += f[e];
                }
                store128(row + v * QILIN_VEC_ELEMS,
                         make_uint4(x_pair(u, 0), x_pair(u, 1), x_pair(u, 2), x_pair(u, 3)));
            }
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            s += __shfl_xor_sync(0xffffffffu, s, 2);
            if (threadIdx.x % 4 == 0) {
                xsums[(q % 2) * QGM_TOKENS + threadIdx.x / 4] = s;
            }
        }
    };

    uint4 lv[DEPTH][2];
    float2 sm[DEPTH][2];
    auto load_levels = [&](int slot, unsigned q) {
        if (q < n_steps) {
            lv[slot][0] = __ldcs(rows.lv[0] + 4 * q);
            lv[slot][1] = __ldcs(rows.lv[1] + 4 * q);
            sm[slot][0] = __ldg(rows.sm[0] + (q >> rows.group_shift));
            sm[slot][1] = __ldg(rows.sm[1] + (q >> rows.group_shift));
        }
    };

    // acc[j]: (row g, token 8j + 2t), (g, 8j + 2t + 1), (g + 8, 8j + 2t), (g + 8, 8j + 2t + 1).
    float acc[QGM_TILES][4];
#pragma unroll
    for (int j = 0; j < QGM_TILES; ++j) {
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    }
#pragma unroll
    for (int s = 0; s < DEPTH; ++s) {
        load_levels(s, s);
    }
    issue_x(0);
    issue_x(1);
    cp_async_wait<1>();  // stage 0 (this thread's copies)
    __syncthreads();
    sum_x(0);

    for (unsigned base = 0; base < n_steps; base += DEPTH) {
#pragma unroll
        for (int s = 0; s < DEPTH; ++s) {
            const unsigned q = base + s;
            if (q >= n_steps) {
                break;  // block-uniform
            }
            cp_async_wait<0>();  // stage q + 1
            __syncthreads();
            issue_x(q + 2);
            sum_x(q + 1);
            const bf16* stage = stages + (q % QGM_STAGES) * QGM_TOKENS * QGM_LD;
            float d[QGM_TILES][4];
#pragma unroll
            for (int j = 0; j < QGM_TILES; ++j) {
                d[j][0] = d[j][1] = d[j][2] = d[j][3] = 0.0f;
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const uint32_t wa = word_of(lv[s][0], i);
                const uint32_t wb = word_of(lv[s][1], i);
                const uint32_t a00 = level_pair(wa, 0), a01 = level_pair(wb, 0);
                const uint32_t a02 = level_pair(wa, 1), a03 = level_pair(wb, 1);
                const uint32_t a10 = level_pair(wa, 2), a11 = level_pair(wb, 2);
                const uint32_t a12 = level_pair(wa, 3), a13 = level_pair(wb, 3);
                const bf16* xv = stage + g * QGM_LD + x_slot(4 * t + i) * QILIN_VEC_ELEMS;
#pragma unroll
                for (int j = 0; j < QGM_TILES; ++j) {
                    const uint4 xq = load128(xv + j * 8 * QGM_LD);  // B pairs (sum_x)
                    qmma(d[j], a00, a01, a02, a03, xq.x, xq.y);
                    qmma(d[j], a10, a11, a12, a13, xq.z, xq.w);
                }
            }
            const float* xs = xsums + (q % 2) * QGM_TOKENS + 2 * t;
            const float2 ga = sm[s][0], gb = sm[s][1];
#pragma unroll
            for (int j = 0; j < QGM_TILES; ++j) {
                const float2 xx = *reinterpret_cast<const float2*>(xs + 8 * j);
                acc[j][0] = fmaf(ga.x, fmaf(-128.0f, xx.x, d[j][0]), fmaf(ga.y, xx.x, acc[j][0]));
                acc[j][1] = fmaf(ga.x, fmaf(-128.0f, xx.y, d[j][1]), fmaf(ga.y, xx.y, acc[j][1]));
                acc[j][2] = fmaf(gb.x, fmaf(-128.0f, xx.x, d[j][2]), fmaf(gb.y, xx.x, acc[j][2]));
                acc[j][3] = fmaf(gb.x, fmaf(-128.0f, xx.y, d[j][3]), fmaf(gb.y, xx.y, acc[j][3]));
            }
            load_levels(s, q + DEPTH);
        }
    }

    const unsigned out_rows[2] = {row0 + g, row0 + g + 8};
    float bias_of[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        bias_of[r] = (bias != nullptr && out_rows[r] < p.out_features)
                         ? __bfloat162float(bias[out_rows[r]])
                         : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < QGM_TILES; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const unsigned tok = 8 * j + 2 * t + (e & 1);
            const unsigned row = out_rows[e >> 1];
            if (tok < n_tokens && row < p.out_features) {
                out[(size_t)tok * p.out_features + row] =
                    __float2bfloat16_rn(acc[j][e] + bias_of[e >> 1]);
            }
        }
    }
}
