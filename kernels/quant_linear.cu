// Quantized linear layers, out = x W^T + b with W stored as integer levels: W4A16 and
// W8A16 (bf16 activations, f32 arithmetic). Every quantized checkpoint format Qilin loads
// (AWQ/GPTQ int4 and int8, --quantize int8/int4, GGUF Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/Q6_K) is
// repacked losslessly into this layout at upload (src/backend/packed_quant.rs):
//   levels:    u8 [out_features, in_features * BITS / 8], row-major. BITS = 4: unsigned
//              levels 0..15, input channel 2j in the low nibble of byte j, 2j + 1 in the
//              high nibble. BITS = 8: signed levels, one i8 per input channel.
//   scale_min: float2 [out_features, in_features / group_size]: (scale, min) of each
//              group of group_size consecutive input channels of a row.
//   W[o][k] = fma(scale, level, min) in f32, which equals the CPU's dequantized value
//   exactly (src/model/quant/levels.rs argues it per format).
//
// Semantics (CPU twin: CpuLinear::forward over the original weight, reached through
// CpuBackend::linear; tests/gpu_quant_linear.rs):
//   qilin_qgemv_w{4,8}_bf16, 1 <= n_tokens <= QILIN_GEMV_MAX_TOKENS, and
//   qilin_qgemv_small_w{4,8}_bf16, 1 <= n_tokens <= QILIN_QGEMV_SMALL_MAX_TOKENS:
//     out[t][o] = bf16_rne( sum_k W[o][k] * f32(x[t][k])  +  f32(bias[o]) )
//     summed in f32 in a fixed order of its own (the weight's scale and min applied per
//     group, see biased_level), rounded once after the bias add.
//   qilin_dequant_w{4,8}_bf16: out[r][c] = bf16_rne(W[r][c]), the weight for the cuBLAS
//     path of larger batches (one more rounding than the GEMV: 8 significant bits per
//     weight; tests/gpu_quant_linear.rs states the tolerance this costs).
//
// Launch contract, checked in the kernels (a violation traps instead of leaving outputs
// unwritten): GEMV grid = ceil(out_features / QILIN_QGEMV_ROWS_PER_BLOCK) blocks of
// exactly QILIN_QGEMV_THREADS threads, in_features % QILIN_QGEMV_VALUES_PER_LANE == 0,
// group_size a multiple of the values in one 16-byte vector of levels that divides
// in_features; 16-byte aligned x, levels and 8-byte aligned scale_min (whole cudarc
// allocations). Dequant: any grid of QILIN_DEQUANT_THREADS-thread blocks (grid-stride),
// the same divisibility of cols.
//
// GEMV design (mirrors kernels/gemv.cu's qilin_gemv_bf16, see its header):
//   - each warp owns QILIN_QGEMV_ROWS_PER_WARP (4) output channels, a block of 4 warps 16;
//   - the input dimension is walked in tiles of 32 lanes x 32 values = 1024; lane l takes
//     values 32l..32l+31 of the tile: one 16-byte vector of levels per row at 4 bits, two
//     at 8 bits, and their groups' (scale, min) pairs (a group is never split by a
//     vector);
//   - a tile's levels are loaded (streaming, evict-first) before its x copy and barrier,
//     as in qilin_gemv_bf16, and stay in flight meanwhile;
//   - the tile of every token's x is copied into shared memory (double-buffered, one
//     barrier per tile, as in qilin_gemv_bf16). Lane l reads x vectors 4l..4l+3 of a
//     token row; stored at v ^ ((v >> 3) & 7) (a permutation inside each run of 8
//     vectors), every quarter-warp's 16-byte reads hit 8 distinct bank groups;
//   - per 8 values, the 1..8-token kernel: the R rows' levels as exact floats (the
//     exponent trick below), one fma each to the weight, then R x n FMAs against the
//     tokens' x. The small-batch kernel: the levels as floats offset by a small bias
//     (two integer instructions each, see biased_level), n FMAs each into the group's
//     dot product, and the scale, min and bias applied once per group through the
//     tokens' x sums: sum_k w x = scale (sum_k (b + l) x - b sum x) + min sum x.
//   Levels -> f32 without an I2F conversion (a quarter-rate instruction on sm_80/sm_90):
//   the float with bits 0x4B000000 | u is 2^23 + u exactly for u < 2^23, so subtracting
//   2^23 leaves u exactly; 8-bit levels are biased by 128 first (u = level ^ 0x80).
//   The small-batch kernel also loads the next tile's levels before this tile's math,
//   and is compiled under a register cap for 5 (4-bit) or 3 (8-bit) resident blocks: the
//   1..8-token kernel's 168 registers left 3 blocks, too few loads in flight (H200,
//   2026-11-26: its batch-1 int4 gate_up reached 28% of copy bandwidth).
//
// qilin_qgemv_small_w{4,8}_bf16: verified on an H200 (12332f8); the dispatch takes it for
// 1-2 tokens where the tensor-core GEMV does not take the layer, unless
// QILIN_CUDA_QGEMV_SMALL=0.
//
// qilin_qgemm_w{4,8}_bf16, the tensor-core GEMM over the same layout, is in
// kernels/quant_gemm.cu.
//
// Napkin math (Qwen2.5-7B, H100 SXM 3.35 TB/s): int4 at group 128 streams 0.5625 bytes per
// weight (levels + 8-byte pair per 128), 3.56x less than bf16: 3.7 GB of levels and pairs
// per decode step plus the bf16 lm_head's 1.09 GB -> ~1.4 ms, ~700 tok/s at batch 1 if
// every launch reached copy bandwidth (the issue's roofline ~744 assumes an int4 lm_head).
// Lane-instructions per weight value at n = 1: the 1..8-token kernel ~3 for the level
// (shift, lop3, fadd), 1 fma, 1 FMA and the x unpacks / R: ~5.3; the small-batch kernel
// ~2 + 1 + (x unpack and x sum) / R: ~3.5. At full bandwidth
// ~6 G values/ms stream in, i.e. ~21-32 T lane-ops/s against the SM array's ~33 T/s (132 SMs
// x 128 lanes x 1.98 GHz): under the ridge at n = 1 and issue-bound above it (n = 8:
// ~2x over). A tensor-core (mma.sync) variant is the next step for batches of 2 to 64.

#include "common.cuh"
#include "quant_levels.cuh"

#define QGEMV_WARPS (QILIN_QGEMV_THREADS / QILIN_WARP_SIZE)
#define QGEMV_TILE_VALUES (QILIN_WARP_SIZE * QILIN_QGEMV_VALUES_PER_LANE)
// 16-byte x vectors (8 bf16) per token row of a tile, and per lane.
#define QGEMV_TILE_XVECS (QGEMV_TILE_VALUES / QILIN_VEC_ELEMS)
#define QGEMV_LANE_XVECS (QILIN_QGEMV_VALUES_PER_LANE / QILIN_VEC_ELEMS)
#define QGEMV_X_LOADS_PER_THREAD(N) \
    ((N * QGEMV_TILE_XVECS + QILIN_QGEMV_THREADS - 1) / QILIN_QGEMV_THREADS)

static_assert(QILIN_QGEMV_THREADS % QILIN_WARP_SIZE == 0 &&
                  QILIN_QGEMV_THREADS <= QILIN_MAX_THREADS_PER_BLOCK,
              "abi.h: QILIN_QGEMV_THREADS must be whole warps");
static_assert(QILIN_QGEMV_ROWS_PER_BLOCK == QGEMV_WARPS * QILIN_QGEMV_ROWS_PER_WARP,
              "abi.h: QILIN_QGEMV_ROWS_PER_BLOCK disagrees with threads and rows per warp");
static_assert(QILIN_QGEMV_VALUES_PER_LANE == 32,
              "one 16-byte vector of 4-bit levels (two of 8-bit) per lane per tile");
static_assert(QGEMV_TILE_XVECS == 128, "x_swizzle permutes runs of 8 vectors of a tile row");
static_assert(QILIN_GEMV_MAX_TOKENS == 8, "the kernels' switch covers n = 1..8");
static_assert(QILIN_DEQUANT_THREADS % QILIN_WARP_SIZE == 0 &&
                  QILIN_DEQUANT_THREADS <= QILIN_MAX_THREADS_PER_BLOCK,
              "abi.h: QILIN_DEQUANT_THREADS must be whole warps");

// Word i (run-time, 0..3) of a vector by selects: indexing the vector's words with a
// run-time index would put it in local memory.
QILIN_DEVICE uint32_t word_at(const uint4& v, unsigned i) {
    const uint32_t lo = (i & 1u) ? v.y : v.x;
    const uint32_t hi = (i & 1u) ? v.w : v.z;
    return (i & 2u) ? hi : lo;
}

// Level e (compile-time) of a 32-bit word of levels as the exact float kBias + level, by
// two integer instructions and no float one: the level's bits go to the top of the
// mantissa of a float whose exponent makes one unit of them worth 1 (4 bits: mantissa
// bits 19..22 under 2^4 = 16; 8 bits: bits 15..22 under 2^8 = 256, the XOR biasing the
// signed level by 128). The GEMV removes the bias once per lane-vector and token,
// sum (kBias + l) x - kBias sum x, in f32: a bias of 16 (or 384) against levels up to 15
// (or 127) costs at most 2 (or 2) of f32's 24 bits, far from bf16's 8.
template <int BITS>
QILIN_DEVICE float biased_level(uint32_t word, int e) {
    if (BITS == 4) {
        const uint32_t at19 = 4 * e <= 19 ? word << (19 - 4 * e) : word >> (4 * e - 19);
        return __uint_as_float((at19 & 0x00780000u) | 0x41800000u);
    } else {
        const uint32_t at15 = 8 * e <= 15 ? word << (15 - 8 * e) : word >> (8 * e - 15);
        return __uint_as_float((at15 & 0x007F8000u) ^ 0x43C00000u);
    }
}

// Values 8 * step .. 8 * step + 7 (step run-time) of a 16-byte vector of levels as
// floats: one word at 4 bits (step 0..3), two at 8 bits (step 0..1). BIASED: as
// biased_level's kBias + level (the small-batch GEMV); else the exact level (level_to_float,
// the 1..8-token GEMV's arithmetic as verified on an H200).
template <int BITS, bool BIASED>
QILIN_DEVICE void step_levels(const uint4& v, int step, float out[8]) {
    auto level = [](uint32_t word, int e) {
        return BIASED ? biased_level<BITS>(word, e) : level_to_float<BITS>(word, e);
    };
    if (BITS == 4) {
        const uint32_t word = word_at(v, step);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            out[e] = level(word, e);
        }
    } else {
        const uint32_t w0 = word_at(v, 2 * step);
        const uint32_t w1 = word_at(v, 2 * step + 1);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            out[e] = level(w0, e);
            out[4 + e] = level(w1, e);
        }
    }
}

QILIN_DEVICE unsigned x_swizzle(unsigned v) { return v ^ ((v >> 3) & 7u); }

// One block's QILIN_QGEMV_ROWS_PER_BLOCK output channels for N tokens.
// x_tile: the kernel's shared buffers [2][MAX_N][QGEMV_TILE_XVECS]. SMALL (n <= 2): load the
// next tile's weights before this tile's arithmetic (more registers, latency hidden).
template <int BITS, int N, int MAX_N, bool SMALL>
QILIN_DEVICE void qgemv_block(const QilinQuantGemvParams p,
                              bf16* __restrict__ out,
                              const bf16* __restrict__ x,
                              const uint8_t* __restrict__ levels,
                              const float2* __restrict__ scale_min,
                              const bf16* __restrict__ bias,
                              uint4 (*x_tile)[MAX_N][QGEMV_TILE_XVECS]) {
    constexpr int R = QILIN_QGEMV_ROWS_PER_WARP;
    constexpr int VL = Levels<BITS>::kVecsPerLane;
    constexpr int PER_VEC = Levels<BITS>::kPerVec;
    const unsigned lane = threadIdx.x % QILIN_WARP_SIZE;
    const unsigned warp = threadIdx.x / QILIN_WARP_SIZE;
    const unsigned n_chunks = p.in_features / QILIN_QGEMV_VALUES_PER_LANE;  // per row
    const unsigned n_xvec = p.in_features / QILIN_VEC_ELEMS;
    const unsigned n_groups = p.in_features / p.group_size;
    const unsigned first_row = blockIdx.x * QILIN_QGEMV_ROWS_PER_BLOCK + warp * R;
    const uint4* x_vec = reinterpret_cast<const uint4*>(x);  // [N, n_xvec]
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

    bool row_ok[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        row_ok[r] = first_row + r < p.out_features;
    }
    // Row first_row's vectors [n_chunks * VL] and pairs [n_groups]; row r follows at
    // r * n_chunks * VL and r * n_groups (one base each instead of R pointers in
    // registers; a missing row's address is formed but never loaded).
    const uint4* lv_first = reinterpret_cast<const uint4*>(levels) +
                            (size_t)first_row * n_chunks * VL;
    const float2* sm_first = scale_min + (size_t)first_row * n_groups;

    // Levels and (scale, min) pairs of one tile for this lane; zeros where the chunk or
    // the row does not exist (x is zero there too).
    auto load_tile = [&](unsigned tile, uint4 (&lv)[R][VL], float2 (&sm)[R][VL]) {
        const unsigned chunk = tile * QILIN_WARP_SIZE + lane;
#pragma unroll
        for (int i = 0; i < VL; ++i) {
            const unsigned group =
                (chunk * QILIN_QGEMV_VALUES_PER_LANE + i * PER_VEC) / p.group_size;
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const bool ok = row_ok[r] && chunk < n_chunks;
                lv[r][i] = ok ? load128_stream(lv_first + ((size_t)r * n_chunks + chunk) * VL + i)
                              : zero;
                sm[r][i] = ok ? __ldg(sm_first + (size_t)r * n_groups + group)
                              : make_float2(0.0f, 0.0f);
            }
        }
    };

    float acc[R][N];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int t = 0; t < N; ++t) {
            acc[r][t] = 0.0f;
        }
    }

    const unsigned n_tiles = ceil_div(n_chunks, (unsigned)QILIN_WARP_SIZE);
    uint4 lv[R][VL];
    float2 sm[R][VL];
    if (SMALL) {
        load_tile(0, lv, sm);
    }
    for (unsigned tile = 0; tile < n_tiles; ++tile) {
        // 1. Weights in flight during the x copy, the barrier and (SMALL) the whole of
        //    this tile's arithmetic: the next tile's, or this one's.
        uint4 lv_next[R][VL];
        float2 sm_next[R][VL];
        if (SMALL) {
            load_tile(tile + 1, lv_next, sm_next);  // zeros past the last tile
        } else {
            load_tile(tile, lv, sm);
        }

        // 2. Every token's x for this tile into its buffer (swizzled).
        uint4 (*xs)[QGEMV_TILE_XVECS] = x_tile[tile % 2];
        const unsigned tile_xvec = tile * QGEMV_TILE_XVECS;
#pragma unroll
        for (int k = 0; k < QGEMV_X_LOADS_PER_THREAD(N); ++k) {
            const unsigned i = threadIdx.x + k * QILIN_QGEMV_THREADS;
            if (i < N * QGEMV_TILE_XVECS) {
                const unsigned t = i / QGEMV_TILE_XVECS;
                const unsigned c = i % QGEMV_TILE_XVECS;
                const unsigned v = tile_xvec + c;
                xs[t][x_swizzle(c)] =
                    v < n_xvec ? load128_readonly(x_vec + (size_t)t * n_xvec + v) : zero;
            }
        }
        __syncthreads();

        // 3. Per vector of levels (one group), in steps of 8 values. Not unrolled:
        //    unrolled, the compiler converts all 32 values of every row up front.
        //    SMALL (n <= 2): per row, the biased levels' FMAs into the group's dot
        //    product with each token, then once per vector
        //    out += scale * (dot - kBias * x_sum) + min * x_sum: one FMA per value and
        //    token. Otherwise (x reused by more tokens than the registers hold): the R
        //    rows' weights fma(scale, level, min) first (exact levels: this kernel's
        //    arithmetic is the one an H200 verified), then R x N FMAs per token.
#pragma unroll
        for (int v = 0; v < VL; ++v) {
            constexpr int STEPS = QGEMV_LANE_XVECS / VL;  // 8-value steps per vector
            float dot[SMALL ? R : 1][SMALL ? N : 1];
            float x_sum[SMALL ? N : 1];
            if constexpr (SMALL) {
#pragma unroll
                for (int t = 0; t < N; ++t) {
                    x_sum[t] = 0.0f;
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        dot[r][t] = 0.0f;
                    }
                }
            }
#pragma unroll 1
            for (int step = 0; step < STEPS; ++step) {
                const unsigned xvec = x_swizzle(lane * QGEMV_LANE_XVECS + v * STEPS + step);
                if constexpr (SMALL) {
                    float xf[N][8];
#pragma unroll
                    for (int t = 0; t < N; ++t) {
                        bf16x8_to_float(xs[t][xvec], xf[t]);
                        x_sum[t] += ((xf[t][0] + xf[t][1]) + (xf[t][2] + xf[t][3])) +
                                    ((xf[t][4] + xf[t][5]) + (xf[t][6] + xf[t][7]));
                    }
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        float wf[8];
                        step_levels<BITS, true>(lv[r][v], step, wf);
#pragma unroll
                        for (int t = 0; t < N; ++t) {
#pragma unroll
                            for (int e = 0; e < 8; ++e) {
                                dot[r][t] = fmaf(wf[e], xf[t][e], dot[r][t]);
                            }
                        }
                    }
                } else {
                    float wf[R][8];
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        step_levels<BITS, false>(lv[r][v], step, wf[r]);
#pragma unroll
                        for (int e = 0; e < 8; ++e) {
                            wf[r][e] = fmaf(sm[r][v].x, wf[r][e], sm[r][v].y);
                        }
                    }
#pragma unroll
                    for (int t = 0; t < N; ++t) {
                        float xf[8];
                        bf16x8_to_float(xs[t][xvec], xf);
#pragma unroll
                        for (int r = 0; r < R; ++r) {
#pragma unroll
                            for (int e = 0; e < 8; ++e) {
                                acc[r][t] = fmaf(wf[r][e], xf[e], acc[r][t]);
                            }
                        }
                    }
                }
            }
            if constexpr (SMALL) {
#pragma unroll
                for (int r = 0; r < R; ++r) {
#pragma unroll
                    for (int t = 0; t < N; ++t) {
                        const float levels_x = fmaf(-Levels<BITS>::kBias, x_sum[t], dot[r][t]);
                        acc[r][t] =
                            fmaf(sm[r][v].x, levels_x, fmaf(sm[r][v].y, x_sum[t], acc[r][t]));
                    }
                }
            }
        }
        if (SMALL) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int i = 0; i < VL; ++i) {
                    lv[r][i] = lv_next[r][i];
                    sm[r][i] = sm_next[r][i];
                }
            }
        }
        // No barrier here: the next tile fills the other x buffer (kernels/gemv.cu).
    }

    // 4. Warp sums, bias, one bf16 rounding; lane t stores token t.
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const unsigned row = first_row + r;
        const float b = (row_ok[r] && bias != nullptr) ? __bfloat162float(bias[row]) : 0.0f;
#pragma unroll
        for (int t = 0; t < N; ++t) {
            const float sum = warp_reduce_sum(acc[r][t]);
            if (row_ok[r] && lane == (unsigned)t) {
                out[(size_t)t * p.out_features + row] = __float2bfloat16_rn(sum + b);
            }
        }
    }
}

// qgemv_block for N = p.n_tokens, N_FROM <= N <= MAX_N (checked by the caller).
template <int BITS, int N_FROM, int MAX_N, bool SMALL>
QILIN_DEVICE void qgemv_for_n(const QilinQuantGemvParams p,
                              bf16* __restrict__ out,
                              const bf16* __restrict__ x,
                              const uint8_t* __restrict__ levels,
                              const float2* __restrict__ scale_min,
                              const bf16* __restrict__ bias,
                              uint4 (*x_tile)[MAX_N][QGEMV_TILE_XVECS]) {
    if constexpr (N_FROM < MAX_N) {
        if (p.n_tokens != N_FROM) {
            qgemv_for_n<BITS, N_FROM + 1, MAX_N, SMALL>(p, out, x, levels, scale_min, bias,
                                                          x_tile);
            return;
        }
    }
    qgemv_block<BITS, N_FROM, MAX_N, SMALL>(p, out, x, levels, scale_min, bias, x_tile);
}

// The GEMV for 1 <= n_tokens <= MAX_N; traps on a launch outside its contract.
template <int BITS, int MAX_N, bool SMALL>
QILIN_DEVICE void qgemv(const QilinQuantGemvParams p,
                        bf16* __restrict__ out,
                        const bf16* __restrict__ x,
                        const uint8_t* __restrict__ levels,
                        const float2* __restrict__ scale_min,
                        const bf16* __restrict__ bias) {
    __shared__ uint4 x_tile[2][MAX_N][QGEMV_TILE_XVECS];
    constexpr unsigned per_vec = Levels<BITS>::kPerVec;
    if (blockDim.x != QILIN_QGEMV_THREADS || p.in_features % QILIN_QGEMV_VALUES_PER_LANE != 0 ||
        p.group_size == 0 || p.group_size % per_vec != 0 || p.in_features % p.group_size != 0 ||
        p.n_tokens == 0 || p.n_tokens > MAX_N) {
        __trap();
    }
    qgemv_for_n<BITS, 1, MAX_N, SMALL>(p, out, x, levels, scale_min, bias, x_tile);
}

// Pointer arguments (the GEMV's and the GEMM's): out must not overlap the inputs; x and
// levels 16-byte aligned; levels hold 4-bit unsigned levels two per byte (w4) or one i8
// per value (w8).
extern "C" __global__ void __launch_bounds__(QILIN_QGEMV_THREADS)
qilin_qgemv_w4_bf16(const QilinQuantGemvParams p,
                    bf16* __restrict__ out,               // [n_tokens, out_features]
                    const bf16* __restrict__ x,           // [n_tokens, in_features]
                    const uint8_t* __restrict__ levels,   // [out_features, in_features / 2]
                    const float2* __restrict__ scale_min, // [out_features, in / group_size]
                    const bf16* __restrict__ bias) {     // [out_features] or NULL
    qilin_pdl_prefetch_rows(levels, blockIdx.x * QILIN_QGEMV_ROWS_PER_BLOCK,
                            QILIN_QGEMV_ROWS_PER_BLOCK, p.out_features, p.in_features / 2);
    QILIN_PDL_ENTRY();
    qgemv<4, QILIN_GEMV_MAX_TOKENS, false>(p, out, x, levels, scale_min, bias);
}

// As qilin_qgemv_w4_bf16 with levels: i8 [out_features, in_features] (8-bit levels).
extern "C" __global__ void __launch_bounds__(QILIN_QGEMV_THREADS)
qilin_qgemv_w8_bf16(const QilinQuantGemvParams p,
                    bf16* __restrict__ out,
                    const bf16* __restrict__ x,
                    const uint8_t* __restrict__ levels,
                    const float2* __restrict__ scale_min,
                    const bf16* __restrict__ bias) {
    qilin_pdl_prefetch_rows(levels, blockIdx.x * QILIN_QGEMV_ROWS_PER_BLOCK,
                            QILIN_QGEMV_ROWS_PER_BLOCK, p.out_features, p.in_features);
    QILIN_PDL_ENTRY();
    qgemv<8, QILIN_GEMV_MAX_TOKENS, false>(p, out, x, levels, scale_min, bias);
}

// As qilin_qgemv_w4_bf16 for 1 <= n_tokens <= QILIN_QGEMV_SMALL_MAX_TOKENS (batch-1
// decode): fewer registers than the 8-token kernel's, enough resident blocks to keep the
// level stream in flight, and the next tile's levels loaded during this tile's math.
extern "C" __global__ void __launch_bounds__(QILIN_QGEMV_THREADS, QILIN_QGEMV_SMALL_MIN_BLOCKS_W4)
qilin_qgemv_small_w4_bf16(const QilinQuantGemvParams p,
                          bf16* __restrict__ out,               // [n_tokens, out_features]
                          const bf16* __restrict__ x,           // [n_tokens, in_features]
                          const uint8_t* __restrict__ levels,   // [out_features, in / 2]
                          const float2* __restrict__ scale_min, // [out_features, in / group]
                          const bf16* __restrict__ bias) {     // [out_features] or NULL
    qilin_pdl_prefetch_rows(levels, blockIdx.x * QILIN_QGEMV_ROWS_PER_BLOCK,
                            QILIN_QGEMV_ROWS_PER_BLOCK, p.out_features, p.in_features / 2);
    QILIN_PDL_ENTRY();
    qgemv<4, QILIN_QGEMV_SMALL_MAX_TOKENS, true>(p, out, x, levels, scale_min, bias);
}

// As qilin_qgemv_small_w4_bf16 with levels: i8 [out_features, in_features].
extern "C" __global__ void __launch_bounds__(QILIN_QGEMV_THREADS, QILIN_QGEMV_SMALL_MIN_BLOCKS_W8)
qilin_qgemv_small_w8_bf16(const QilinQuantGemvParams p,
                          bf16* __restrict__ out,
                          const bf16* __restrict__ x,
                          const uint8_t* __restrict__ levels,
                          const float2* __restrict__ scale_min,
                          const bf16* __restrict__ bias) {
    qilin_pdl_prefetch_rows(levels, blockIdx.x * QILIN_QGEMV_ROWS_PER_BLOCK,
                            QILIN_QGEMV_ROWS_PER_BLOCK, p.out_features, p.in_features);
    QILIN_PDL_ENTRY();
    qgemv<8, QILIN_QGEMV_SMALL_MAX_TOKENS, true>(p, out, x, levels, scale_min, bias);
}

template <int BITS>
QILIN_DEVICE void dequant(const QilinDequantParams p,
                          bf16* __restrict__ out,
                          const uint8_t* __restrict__ levels,
                          const float2* __restrict__ scale_min) {
    constexpr unsigned per_vec = Levels<BITS>::kPerVec;
    if (p.group_size == 0 || p.group_size % per_vec != 0 || p.cols % p.group_size != 0) {
        __trap();
    }
    const size_t vecs_per_row = p.cols / per_vec;
    const size_t n_groups = p.cols / p.group_size;
    const size_t total = (size_t)p.rows * vecs_per_row;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const uint4* lv = reinterpret_cast<const uint4*>(levels);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const size_t row = i / vecs_per_row;
        const size_t col = (i % vecs_per_row) * per_vec;
        const float2 sm = __ldg(scale_min + row * n_groups + col / p.group_size);
        const uint4 v = load128_stream(lv + i);
        store_dequantized<BITS>(v, sm, out + row * p.cols + col);
    }
}

// out:       bf16 [rows, cols]                     16-byte aligned (cols % 32 == 0)
// levels:    u8   [rows, cols / 2]                 16-byte aligned (4-bit levels)
// scale_min: f32x2 [rows, cols / group_size]
extern "C" __global__ void __launch_bounds__(QILIN_DEQUANT_THREADS)
qilin_dequant_w4_bf16(const QilinDequantParams p,
                      bf16* __restrict__ out,
                      const uint8_t* __restrict__ levels,
                      const float2* __restrict__ scale_min) {
    QILIN_PDL_ENTRY();
    dequant<4>(p, out, levels, scale_min);
}

// As qilin_dequant_w4_bf16 with levels: i8 [rows, cols] (8-bit levels, cols % 16 == 0).
extern "C" __global__ void __launch_bounds__(QILIN_DEQUANT_THREADS)
qilin_dequant_w8_bf16(const QilinDequantParams p,
                      bf16* __restrict__ out,
                      const uint8_t* __restrict__ levels,
                      const float2* __restrict__ scale_min) {
    QILIN_PDL_ENTRY();
    dequant<8>(p, out, levels, scale_min);
}
