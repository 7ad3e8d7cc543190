// The 4-bit quantized GEMV of decode batches (1..=QILIN_QGEMV_MMA_MAX_TOKENS tokens) on tensor
// cores: qilin_qgemv_mma_w4_bf16. Same layout, semantics and CPU twin as
// qilin_qgemv_w4_bf16 (kernels/quant_linear.cu's header): out[t][o] = bf16_rne(sum_k W[o][k]
// x[t][k] + bias[o]), W[o][k] = fma(scale, level, min), summed in f32 in an order of its
// own; tests/gpu_quant_linear.rs compares it with the twin at the GEMV's tolerance.
// Verified on an H200 (1bf3ca5); the dispatch takes it for the layers it can take unless
// QILIN_CUDA_QGEMV_MMA=0.
//
// Why a new kernel (bench/notes.md, "quantized GEMV rewrite"): the FMA GEMVs spend 4-5
// lane-instructions per weight (two integer ops to make a float of a level, an FMA, the
// x unpacking over 4 rows, addressing), while an SM that keeps pace with an H200's copy
// bandwidth (4.26 TB/s / 132 SMs / 1.98 GHz = 16.3 B/clk) must retire ~33 int4 weights
// per clock, i.e. at most ~3.9 lane-instructions each; and their per-tile x copy and
// barrier put a memory round trip on every tile's critical path, with too few tiles per
// warp (3.5 at in = 3584) to amortise it.
//
// Design, per block of QILIN_QGEMV_MMA_THREADS threads (8 warps) and QILIN_QGEMV_MMA_ROWS
// (16) output channels, one m16n8k16 tile of rows; the 8 B columns are the tokens:
//   - the input dimension is walked in steps of QILIN_QGEMV_MMA_STEP (128) channels; warp
//     w takes steps w, w + 8, ... (split-K inside the block: the 16 rows of qkv/o would
//     otherwise give a warp 28 steps and the grid too few warps to fill 132 SMs), and
//     keeps QILIN_QGEMV_MMA_DEPTH steps of levels in flight (a register ring: step q's
//     slot is refilled with step q + 8 * DEPTH right after its math);
//   - in a step, lane (g, t) = (lane / 4, lane % 4) loads 16 bytes (32 levels) of rows g
//     and g + 8 at 32-value chunk 4q + t, and the 32 matching x values of token g (from
//     L1: x is shared by every block of the SM). The 4 chunks of a step are one group,
//     so one (scale, min) pair per row per step;
//   - levels -> bf16 without a conversion instruction: (word >> 4s) & 0x000F000F | 0x43004300
//     is the bf16 pair (128 + nibble s, 128 + nibble s + 4), exact (8 significant bits):
//     one shift and one LOP3 per two weights. The x pairs are permuted to match
//     (x[8i + s], x[8i + s + 4]) by one PRMT each, and the chunk order is the same for
//     A's and B's k slots (lanes of equal t), so the mma sums the right products;
//   - per step 8 mma give D = sum (128 + l) x over the step's 128 channels for 16 rows x 8
//     tokens, and 8 more with A = 1 give X = sum x (per token); then per row and token
//     acc += scale * (D - 128 X) + min * X in f32. The products are exact and the tensor
//     core sums in f32: the bias of 128 against levels <= 15 costs ~4 of f32's 24 bits,
//     far inside the GEMV tolerance's 2^-14 S;
//   - at the end the 8 warps' partial sums meet in shared memory (one barrier), and 128
//     threads add them in warp order, add the bias and round once.
//   Rows past out_features read the last row and are never stored; x columns past
//   n_tokens read the last token and their D columns are dropped.
//
// Napkin math per step and warp (2048 weights): 2 level loads, 2 pair loads, 4 x loads,
// 16 PRMT, 32 shifts + 32 LOP3 (some shifts by 0 fold), 16 HMMA, 12 FFMA and ~10 of
// addressing: ~125 warp-instructions, ~2 lane-instructions per weight (the FMA GEMV: 4-5),
// half the H200's issue budget at copy bandwidth. The same instructions serve 1 to 8
// tokens (the mma's 8 columns). Bytes in flight per warp: DEPTH x 1 KiB; at 2 resident
// blocks (16 warps; 106 registers, no spills; 3 blocks would need <= 80 and spill at
// DEPTH 4) ~64 KiB per SM against the ~40 KiB Little's law asks for at ~1.2 us.
//
// More than 8 tokens (up to QILIN_QGEMV_MMA_MAX_TOKENS): the tokens come in chunks of 8,
// one block per (row tile, chunk), the chunks of a row tile adjacent in blockIdx.x so
// that they run side by side and all but the first find the tile's levels in L2. The
// levels are read from DRAM about once, but every chunk repeats the whole instruction
// stream (the level unpacking included), so the cost grows with the chunks; where it
// stops beating dequantization + cuBLAS (whose time hardly moves from 9 to 64 tokens) is
// for the benchmark to say (quant_linear.rs's dispatch, opt-in).
//
// Launch contract, checked (a violation traps): grid = ceil(out_features /
// QILIN_QGEMV_MMA_ROWS) * ceil(n_tokens / QILIN_GEMV_MAX_TOKENS) blocks of exactly
// QILIN_QGEMV_MMA_THREADS threads; 1 <= n_tokens <= QILIN_QGEMV_MMA_MAX_TOKENS; group_size a power of two and a multiple of
// QILIN_QGEMV_MMA_STEP that divides in_features; 16-byte aligned x and levels, 8-byte
// aligned scale_min (whole cudarc allocations).

#include "common.cuh"

#define QMMA_WARPS (QILIN_QGEMV_MMA_THREADS / QILIN_WARP_SIZE)

static_assert(QILIN_QGEMV_MMA_THREADS % QILIN_WARP_SIZE == 0 &&
                  QILIN_QGEMV_MMA_THREADS <= QILIN_MAX_THREADS_PER_BLOCK,
              "abi.h: QILIN_QGEMV_MMA_THREADS must be whole warps");
static_assert(QILIN_QGEMV_MMA_ROWS == 16, "one m16n8k16 tile of rows per block");
static_assert(QILIN_QGEMV_MMA_STEP == 4 * 32, "a step is 4 lanes' 32-value chunks");
static_assert(QILIN_GEMV_MAX_TOKENS == 8, "the tokens are the mma's 8 columns");
static_assert(QILIN_QGEMV_MMA_ROWS * QILIN_GEMV_MAX_TOKENS <= QILIN_QGEMV_MMA_THREADS,
              "one thread per (row, token) output in the epilogue");

// Bf16 pair (128 + nibble s, 128 + nibble s + 4) of a word of 8 levels (s compile-time,
// 0..3). One LOP3 (a & b) | c: written in C, with two immediates, the compiler emits two.
QILIN_DEVICE uint32_t level_pair(uint32_t word, int s) {
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n"
        : "=r"(r)
        : "r"(word >> (4 * s)), "r"(0x000F000Fu), "r"(0x43004300u));
    return r;
}

// Bf16 pair (x[s], x[s + 4]) of 8 bf16 values (s compile-time, 0..3): level_pair's order.
QILIN_DEVICE uint32_t x_pair(const uint4& v, int s) {
    const uint32_t lo = (s < 2) ? v.x : v.y;  // values 0..1 or 2..3
    const uint32_t hi = (s < 2) ? v.z : v.w;  // values 4..5 or 6..7
    return __byte_perm(lo, hi, (s % 2 == 0) ? 0x5410u : 0x7632u);
}

QILIN_DEVICE uint32_t word_of(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// c[16x8] += a[16x16] b[16x8] (bf16 in, f32 accumulators); fragments as in mma.cuh's
// mma_bf16_16816. Not volatile: the compiler may schedule it like any arithmetic.
QILIN_DEVICE void qmma(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                       uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

extern "C" __global__ void
__launch_bounds__(QILIN_QGEMV_MMA_THREADS, QILIN_QGEMV_MMA_MIN_BLOCKS)
qilin_qgemv_mma_w4_bf16(const QilinQuantGemvParams p,
                        bf16* __restrict__ out,               // [n_tokens, out_features]
                        const bf16* __restrict__ x,           // [n_tokens, in_features]
                        const uint8_t* __restrict__ levels,   // [out_features, in_features / 2]
                        const float2* __restrict__ scale_min, // [out_features, in / group_size]
                        const bf16* __restrict__ bias) {     // [out_features] or NULL
    constexpr int DEPTH = QILIN_QGEMV_MMA_DEPTH;
    constexpr unsigned STEP = QILIN_QGEMV_MMA_STEP;
    // Each warp's sums for the block's 16 rows x 8 token columns.
    __shared__ float partial[QMMA_WARPS][QILIN_QGEMV_MMA_ROWS][QILIN_GEMV_MAX_TOKENS];
    if (blockDim.x != QILIN_QGEMV_MMA_THREADS || p.in_features % STEP != 0 ||
        p.group_size % STEP != 0 || p.group_size == 0 ||
        (p.group_size & (p.group_size - 1)) != 0 || p.in_features % p.group_size != 0 ||
        p.n_tokens == 0 || p.n_tokens > QILIN_QGEMV_MMA_MAX_TOKENS || p.out_features == 0) {
        __trap();
    }
    // This block's row tile and chunk of tokens (x and out start at the chunk's first).
    const unsigned n_chunks = (p.n_tokens + QILIN_GEMV_MAX_TOKENS - 1) / QILIN_GEMV_MAX_TOKENS;
    const unsigned n_tiles = (p.out_features + QILIN_QGEMV_MMA_ROWS - 1) / QILIN_QGEMV_MMA_ROWS;
    if (gridDim.x != n_tiles * n_chunks) {
        __trap();
    }
    const unsigned chunk = blockIdx.x % n_chunks;
    const unsigned first_token = chunk * QILIN_GEMV_MAX_TOKENS;
    const unsigned n_tokens = min(p.n_tokens - first_token, (unsigned)QILIN_GEMV_MAX_TOKENS);
    x += (size_t)first_token * p.in_features;
    out += (size_t)first_token * p.out_features;
    const unsigned lane = threadIdx.x % QILIN_WARP_SIZE;
    const unsigned warp = threadIdx.x / QILIN_WARP_SIZE;
    const unsigned g = lane / 4, t = lane % 4;
    const unsigned k = p.in_features;
    const unsigned n_steps = k / STEP;
    const unsigned n_groups = k / p.group_size;
    const unsigned group_shift = __ffs(p.group_size / STEP) - 1;  // step -> group
    const unsigned row0 = blockIdx.x / n_chunks * QILIN_QGEMV_MMA_ROWS;
    const unsigned last_row = p.out_features - 1;
    const unsigned row_a = min(row0 + g, last_row);
    const unsigned row_b = min(row0 + g + 8, last_row);
    // Chunk 4q + t of rows a and b: lv_a[4q], lv_b[4q]; their pairs sm_a[group].
    const uint4* lv_a = reinterpret_cast<const uint4*>(levels) + (size_t)row_a * (k / 32) + t;
    const uint4* lv_b = reinterpret_cast<const uint4*>(levels) + (size_t)row_b * (k / 32) + t;
    const float2* sm_a = scale_min + (size_t)row_a * n_groups;
    const float2* sm_b = scale_min + (size_t)row_b * n_groups;
    // x of column g's token, chunk 4q + t: xv[16q + i], i = 0..3.
    const unsigned token = min(g, n_tokens - 1);
    const uint4* xv = reinterpret_cast<const uint4*>(x) + (size_t)token * (k / 8) + 4 * t;

    uint4 lv[DEPTH][2];
    float2 sm[DEPTH][2];
    // Step q's levels; pa and pb advance by whole rounds of DEPTH * 8 steps, so every
    // slot's address is theirs plus a constant (folded into the load instruction).
    const uint4* pa = lv_a + 4 * warp;
    const uint4* pb = lv_b + 4 * warp;
    const uint4* px = xv + 16 * warp;
    constexpr unsigned ROUND = DEPTH * QMMA_WARPS;
    auto load_step = [&](int slot, unsigned q, unsigned offset) {
        if (q < n_steps) {
            lv[slot][0] = __ldcs(pa + 4 * offset);
            lv[slot][1] = __ldcs(pb + 4 * offset);
            sm[slot][0] = __ldg(sm_a + (q >> group_shift));
            sm[slot][1] = __ldg(sm_b + (q >> group_shift));
        }
    };

    // acc: (row g, token 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1), the C fragment.
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int s = 0; s < DEPTH; ++s) {
        load_step(s, warp + s * QMMA_WARPS, s * QMMA_WARPS);
    }
    for (unsigned base = warp; base < n_steps;
         base += ROUND, pa += 4 * ROUND, pb += 4 * ROUND, px += 16 * ROUND) {
#pragma unroll
        for (int s = 0; s < DEPTH; ++s) {
            const unsigned q = base + s * QMMA_WARPS;
            if (q >= n_steps) {
                break;  // warp-uniform
            }
            uint4 xq[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                xq[i] = __ldg(px + 16 * s * QMMA_WARPS + i);
            }
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            float xs[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            constexpr uint32_t ONES = 0x3F803F80u;  // bf16 pair (1, 1)
#pragma unroll
            for (int m = 0; m < 8; ++m) {
                const int i = m / 2, s0 = 2 * (m % 2);  // word i, pairs s0 and s0 + 1
                const uint32_t wa = word_of(lv[s][0], i);
                const uint32_t wb = word_of(lv[s][1], i);
                const uint32_t b0 = x_pair(xq[i], s0);
                const uint32_t b1 = x_pair(xq[i], s0 + 1);
                qmma(d, level_pair(wa, s0), level_pair(wb, s0), level_pair(wa, s0 + 1),
                     level_pair(wb, s0 + 1), b0, b1);
                qmma(xs, ONES, ONES, ONES, ONES, b0, b1);
            }
            const float2 ga = sm[s][0], gb = sm[s][1];
            acc[0] = fmaf(ga.x, fmaf(-128.0f, xs[0], d[0]), fmaf(ga.y, xs[0], acc[0]));
            acc[1] = fmaf(ga.x, fmaf(-128.0f, xs[1], d[1]), fmaf(ga.y, xs[1], acc[1]));
            acc[2] = fmaf(gb.x, fmaf(-128.0f, xs[2], d[2]), fmaf(gb.y, xs[2], acc[2]));
            acc[3] = fmaf(gb.x, fmaf(-128.0f, xs[3], d[3]), fmaf(gb.y, xs[3], acc[3]));
            load_step(s, q + ROUND, s * QMMA_WARPS + ROUND);
        }
    }

    partial[warp][g][2 * t] = acc[0];
    partial[warp][g][2 * t + 1] = acc[1];
    partial[warp][g + 8][2 * t] = acc[2];
    partial[warp][g + 8][2 * t + 1] = acc[3];
    __syncthreads();
    // Thread i < 128: token i / 16, row i % 16 (16 consecutive rows: one 32-byte store).
    if (threadIdx.x < QILIN_QGEMV_MMA_ROWS * QILIN_GEMV_MAX_TOKENS) {
        const unsigned tok = threadIdx.x / QILIN_QGEMV_MMA_ROWS;
        const unsigned r = threadIdx.x % QILIN_QGEMV_MMA_ROWS;
        const unsigned row = row0 + r;
        if (tok < n_tokens && row < p.out_features) {
            float sum = 0.0f;
#pragma unroll
            for (int w = 0; w < QMMA_WARPS; ++w) {
                sum += partial[w][r][tok];
            }
            const float b = bias != nullptr ? __bfloat162float(bias[row]) : 0.0f;
            out[(size_t)tok * p.out_features + row] = __float2bfloat16_rn(sum + b);
        }
    }
}
