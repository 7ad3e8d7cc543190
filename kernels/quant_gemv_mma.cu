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
// the benchmark's to say. H200, b908988 (verified there): 2 and 4 chunks won every
// Qwen2.5-7B layer (gate_up [16] 79 us, [32] 153, against 276), 8 chunks lost three of
// four (gate_up [64] 299 against 277); quant_linear.rs's QGEMV_MMA_CHUNKED_MAX_TOKENS.
//
// Launch contract, checked (a violation traps): grid = ceil(out_features /
// QILIN_QGEMV_MMA_ROWS) * ceil(n_tokens / QILIN_GEMV_MAX_TOKENS) blocks of exactly
// QILIN_QGEMV_MMA_THREADS threads; 1 <= n_tokens <= QILIN_QGEMV_MMA_MAX_TOKENS; group_size a power of two and a multiple of
// QILIN_QGEMV_MMA_STEP that divides in_features; 16-byte aligned x and levels, 8-byte
// aligned scale_min (whole cudarc allocations).

#include "common.cuh"
#include "mma.cuh"  // cp.async wrappers
#include "quant_mma.cuh"

#define QMMA_WARPS (QILIN_QGEMV_MMA_THREADS / QILIN_WARP_SIZE)

static_assert(QILIN_QGEMV_MMA_THREADS % QILIN_WARP_SIZE == 0 &&
                  QILIN_QGEMV_MMA_THREADS <= QILIN_MAX_THREADS_PER_BLOCK,
              "abi.h: QILIN_QGEMV_MMA_THREADS must be whole warps");
static_assert(QILIN_QGEMV_MMA_ROWS == 16, "one m16n8k16 tile of rows per block");
static_assert(QILIN_QGEMV_MMA_STEP == 4 * 32, "a step is 4 lanes' 32-value chunks");
static_assert(QILIN_GEMV_MAX_TOKENS == 8, "the tokens are the mma's 8 columns");
static_assert(QILIN_QGEMV_MMA_ROWS * QILIN_GEMV_MAX_TOKENS <= QILIN_QGEMV_MMA_THREADS,
              "one thread per (row, token) output in the epilogue");

// One step (128 input channels) of both kernels: acc (the C fragment: (row g, token 2t),
// (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)) += the step's products of rows g and g + 8
// (levels la, lb: this lane's 32-level chunks; scale/min ga, gb) with the 32 x values xq of
// token g's matching chunk. 8 mma give D = sum (128 + l) x, 8 with A = 1 give X = sum x,
// then acc += scale * (D - 128 X) + min * X per row and token (the header's design).
QILIN_DEVICE void qmma_step(float acc[4], const uint4& la, const uint4& lb, const uint4 xq[4],
                            float2 ga, float2 gb) {
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float xs[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    constexpr uint32_t ONES = 0x3F803F80u;  // bf16 pair (1, 1)
#pragma unroll
    for (int m = 0; m < 8; ++m) {
        const int i = m / 2, s0 = 2 * (m % 2);  // word i, pairs s0 and s0 + 1
        const uint32_t wa = word_of(la, i);
        const uint32_t wb = word_of(lb, i);
        const uint32_t b0 = x_pair(xq[i], s0);
        const uint32_t b1 = x_pair(xq[i], s0 + 1);
        qmma(d, level_pair(wa, s0), level_pair(wb, s0), level_pair(wa, s0 + 1),
             level_pair(wb, s0 + 1), b0, b1);
        qmma(xs, ONES, ONES, ONES, ONES, b0, b1);
    }
    acc[0] = fmaf(ga.x, fmaf(-128.0f, xs[0], d[0]), fmaf(ga.y, xs[0], acc[0]));
    acc[1] = fmaf(ga.x, fmaf(-128.0f, xs[1], d[1]), fmaf(ga.y, xs[1], acc[1]));
    acc[2] = fmaf(gb.x, fmaf(-128.0f, xs[2], d[2]), fmaf(gb.y, xs[2], acc[2]));
    acc[3] = fmaf(gb.x, fmaf(-128.0f, xs[3], d[3]), fmaf(gb.y, xs[3], acc[3]));
}

extern "C" __global__ void
__launch_bounds__(QILIN_QGEMV_MMA_THREADS, QILIN_QGEMV_MMA_MIN_BLOCKS)
qilin_qgemv_mma_w4_bf16(const QilinQuantGemvParams p,
                        bf16* __restrict__ out,               // [n_tokens, out_features]
                        const bf16* __restrict__ x,           // [n_tokens, in_features]
                        const uint8_t* __restrict__ levels,   // [out_features, in_features / 2]
                        const float2* __restrict__ scale_min, // [out_features, in / group_size]
                        const bf16* __restrict__ bias) {     // [out_features] or NULL
    {  // The block's levels (28 KiB at in = 3584), asked of L2 before the wait (pdl.cuh).
        const unsigned chunks =
            max((p.n_tokens + QILIN_GEMV_MAX_TOKENS - 1) / QILIN_GEMV_MAX_TOKENS, 1u);
        qilin_pdl_prefetch_rows(levels, blockIdx.x / chunks * QILIN_QGEMV_MMA_ROWS,
                                QILIN_QGEMV_MMA_ROWS, p.out_features, p.in_features / 2);
    }
    QILIN_PDL_ENTRY();
    constexpr int DEPTH = QILIN_QGEMV_MMA_DEPTH;
    constexpr unsigned STEP = QILIN_QGEMV_MMA_STEP;
    // Each warp's sums for the block's 16 rows x 8 token columns.
    __shared__ float partial[QMMA_WARPS][QILIN_QGEMV_MMA_ROWS][QILIN_GEMV_MAX_TOKENS];
    if (blockDim.x != QILIN_QGEMV_MMA_THREADS || !qmma_shapes_ok(p, QILIN_QGEMV_MMA_MAX_TOKENS)) {
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
            qmma_step(acc, lv[s][0], lv[s][1], xq, sm[s][0], sm[s][1]);
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

// ---------------------------------------------------------------------------------------
// qilin_qgemv_mma_splitk_w4_bf16: the same GEMV (layout, semantics, step math, CPU twin and
// tolerance as qilin_qgemv_mma_w4_bf16 above), built for latency. Opt-in with
// QILIN_CUDA_QGEMV_MMA2=1. H200, b908988: its parity test passed (bit-identical repeats,
// so the counters reset), but it was SLOWER than the kernel above on every layer (ncu at
// 1 token: qkv 10.4-11.8 us against 9.9-12.1, o 9.1-9.9 against 6.9-7.8, gate_up 38-46
// against 35-42, down 23-29 against 21-23; bench rows 5-30% slower): 64 registers and 50%
// theoretical occupancy as designed, but ~20 cycles per issue against ~12 and the same
// ~70% of cycles with no eligible warp, so the wait moved from the register ring to the
// shared-memory ring without more bytes arriving. Kept for the next tuning round.
//
// What bounds the kernel above (H200 ncu, bench/results/2026-11-26-h200-abc5642.md): 71-75%
// of cycles with no eligible warp on qkv/o/down, 59% on gate_up at 47% of DRAM peak. Its
// blocks are 8 warps at 102 registers (2 per SM, 16 warps), and a block's whole share of
// a 3584-wide row (28 steps / 8 warps = 3.5 steps per warp) fits its register ring: each
// block is one DRAM round trip plus its math, epilogue and barrier, and only 2 of them
// overlap per SM. gate_up moved 2.27 TB/s with ~57 KiB issued per SM, i.e. each byte
// waited ~3.3 us (Little), far above DRAM latency: the SM sat idle between blocks. And
// 288 / 224 row tiles over 132 SMs x 2 are 1.09 / 0.85 waves: qkv pays a second round for
// 24 blocks, o and down leave SMs with 1 block.
//
// Design (per block of QILIN_QGEMV_SPLITK_THREADS = 4 warps, 16 rows, grid (row tiles,
// splits)):
//   - levels and (scale, min) pairs go through shared memory with cp.async instead of a
//     register ring: each lane copies its own 2 x 16 B of levels and 2 x 8 B of pairs per
//     step into a private slot of its warp's QILIN_QGEMV_SPLITK_STAGES-step ring and reads
//     them back itself, so the ring needs no barrier, only cp.async.wait_group (copies
//     become visible to the issuing thread). Registers drop to <= 64 (no ring in
//     registers), so 8 blocks = 32 warps fit an SM (65536 / (128 x 64)); shared memory per
//     block 24 KiB ring + 2 KiB sums, 8 blocks = 216 KiB of the H100/H200's 228;
//   - grid.y splits in_features into contiguous ranges of steps, as many splits as fill
//     the resident blocks once (the launcher: splits = sm_count x 8 / row tiles, at most
//     QILIN_QGEMV_SPLITK_MAX_SPLITS and n_steps / 4, so every warp has a step). Qwen2.5-7B
//     on 132 SMs (1056 resident blocks): qkv 288 tiles x 3 splits = 864 blocks (6-7 per
//     SM), o 224 x 4 = 896, down 224 x 4 = 896 (6-7 per SM, ~9 steps per warp), gate_up
//     2368 x 1 (9 waves of whole rows as before, no merge). One wave where the kernel
//     above needed 1.09 (qkv) and left SMs half empty (o, down);
//   - with splits > 1 each block stores its 16 x 8 sums (its warps added in warp order) to
//     `partials`, and the last block of the row tile to arrive (a u32 counter per tile,
//     atomicAdd after a __threadfence, as the pipelined decode-attention kernel merges its
//     splits) adds the splits' sums in split order, adds the bias, rounds once and resets
//     the counter to 0, so the counters are zero between launches and a CUDA graph replays
//     the kernel without a memset. Fixed orders everywhere: replays are bit-identical;
//     the sums differ from the kernel above only in f32 summation order;
//   - x is read as above (16 B __ldg per lane and chunk, from L1: blocks with consecutive
//     blockIdx.x share a split and so an x range), issued before the ring wait.
//
// Napkin math (H200: 132 SMs, 1.98 GHz, ~4.25 TB/s copy = 32 B/ns per SM):
//   - bytes in flight: 32 warps x 4 steps x 1 KiB of levels = 128 KiB per SM when every
//     block streams (the kernel above: 64 KiB), against the ~40-64 KiB Little's law asks
//     for at ~1.2-1.5 us of loaded DRAM latency; a block that starts issues its
//     first 4 steps at once, so a new block's ramp overlaps the 6-7 others' streams;
//   - qkv: 8.26 MB levels + 0.52 MB pairs = 70 KiB per SM, all of it issued in the first
//     ~1 us (6-7 blocks x 4 warps x <= 3 steps each fit the rings): ~2.1 us at copy
//     bandwidth + ~1.5 us latency/ramp + ~0.6 us merge (fence, atomic, 3 x 512 B from L2);
//   - shared memory traffic per step and warp: 1.5 KiB written by cp.async + 1.5 KiB read
//     = 24 clocks of an SM's 128 B/clock for 2048 weights: 85 weights per clock, under the
//     ~33 per clock copy bandwidth needs (x would triple it, so x stays in L1);
//   - issue per step and warp: the step math (~125 warp-instructions) + 4 cp.async, 3
//     ld.shared, commit/wait and ~8 of addressing: still ~2.1 lane-instructions per
//     weight;
//   - merge traffic: splits x 512 B per row tile (qkv: 440 KiB in L2, under 5% of the
//     weights), read back by one block per tile.
//
// Launch contract, checked (a violation traps): blocks of exactly
// QILIN_QGEMV_SPLITK_THREADS threads, grid.x = ceil(out_features / QILIN_QGEMV_MMA_ROWS),
// 1 <= grid.y <= in_features / QILIN_QGEMV_MMA_STEP; partials and counters non-null when
// grid.y > 1, counters zero at launch; and the kernel above's conditions on the shapes,
// groups and alignment. `partials` must not alias anything another op reads meanwhile
// (one stream orders it).

#define QSPLIT_WARPS (QILIN_QGEMV_SPLITK_THREADS / QILIN_WARP_SIZE)
#define QSPLIT_STAGES QILIN_QGEMV_SPLITK_STAGES

static_assert(QILIN_QGEMV_SPLITK_THREADS == QILIN_QGEMV_MMA_ROWS * QILIN_GEMV_MAX_TOKENS,
              "one thread per (row, token) output in the epilogue and the merge");
static_assert(QILIN_QGEMV_SPLITK_PARTIALS == QILIN_QGEMV_MMA_ROWS * QILIN_GEMV_MAX_TOKENS,
              "a block's partial sums: 16 rows x 8 tokens");
static_assert(QSPLIT_STAGES >= 2, "a ring needs a slot being filled and one being read");

// 8 bytes global -> shared, asynchronously (through L1: the 4 lanes of a row read the same
// pair). cp.async.cg takes only 16-byte copies.
QILIN_DEVICE void cp_async_8(uint32_t dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src));
}

// 16 bytes of shared memory, in program order with the cp.async and wait asm around it (a
// plain C++ load could be moved past the cp.async that refills its slot).
QILIN_DEVICE uint4 lds_16(uint32_t addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(addr));
    return v;
}

// One warp's ring slot: this lane's levels of rows g and g + 8 and their (scale, min)
// pairs, lane-major so a quarter warp's 16-byte accesses cover 128 contiguous bytes.
struct QsplitSlot {
    uint4 level_a[QILIN_WARP_SIZE];
    uint4 level_b[QILIN_WARP_SIZE];
    float4 pairs[QILIN_WARP_SIZE];  // (scale_a, min_a, scale_b, min_b)
};

extern "C" __global__ void
__launch_bounds__(QILIN_QGEMV_SPLITK_THREADS, QILIN_QGEMV_SPLITK_MIN_BLOCKS)
qilin_qgemv_mma_splitk_w4_bf16(const QilinQuantGemvParams p,
                               bf16* __restrict__ out,               // [n_tokens, out_features]
                               const bf16* __restrict__ x,           // [n_tokens, in_features]
                               const uint8_t* __restrict__ levels,   // [out_features, in_features / 2]
                               const float2* __restrict__ scale_min, // [out_features, in / group_size]
                               const bf16* __restrict__ bias,        // [out_features] or NULL
                               float* __restrict__ partials,         // [grid.x * grid.y, QILIN_QGEMV_SPLITK_PARTIALS] or NULL (grid.y == 1)
                               unsigned* __restrict__ counters) {   // [grid.x], zero; or NULL (grid.y == 1)
    QILIN_PDL_ENTRY();
    constexpr unsigned STEP = QILIN_QGEMV_MMA_STEP;
    __shared__ QsplitSlot ring[QSPLIT_WARPS][QSPLIT_STAGES];
    __shared__ float partial[QSPLIT_WARPS][QILIN_QGEMV_MMA_ROWS][QILIN_GEMV_MAX_TOKENS];
    __shared__ bool merges;
    const unsigned splits = gridDim.y;
    if (blockDim.x != QILIN_QGEMV_SPLITK_THREADS || !qmma_shapes_ok(p, QILIN_GEMV_MAX_TOKENS) ||
        splits > p.in_features / STEP ||
        (splits > 1 && (partials == nullptr || counters == nullptr))) {
        __trap();
    }
    const unsigned lane = threadIdx.x % QILIN_WARP_SIZE;
    const unsigned warp = threadIdx.x / QILIN_WARP_SIZE;
    const unsigned g = lane / 4, t = lane % 4;
    const unsigned k = p.in_features;
    const unsigned n_steps = k / STEP;
    const unsigned n_groups = k / p.group_size;
    const unsigned group_shift = __ffs(p.group_size / STEP) - 1;  // step -> group
    const unsigned tile = blockIdx.x, split = blockIdx.y;
    const unsigned row0 = tile * QILIN_QGEMV_MMA_ROWS;
    const unsigned last_row = p.out_features - 1;
    const unsigned row_a = min(row0 + g, last_row);
    const unsigned row_b = min(row0 + g + 8, last_row);
    // This split's steps [first, end); warp w takes first + w, first + w + 4, ...
    const unsigned first = (unsigned)((unsigned long long)split * n_steps / splits);
    const unsigned end = (unsigned)((unsigned long long)(split + 1) * n_steps / splits);
    const unsigned mine =
        first + warp < end ? (end - first - warp + QSPLIT_WARPS - 1) / QSPLIT_WARPS : 0;
    // Chunk 4q + t of rows a and b; their pairs; x of column g's token, chunk 4q + t.
    const uint4* lv_a = reinterpret_cast<const uint4*>(levels) + (size_t)row_a * (k / 32) + t;
    const uint4* lv_b = reinterpret_cast<const uint4*>(levels) + (size_t)row_b * (k / 32) + t;
    const float2* sm_a = scale_min + (size_t)row_a * n_groups;
    const float2* sm_b = scale_min + (size_t)row_b * n_groups;
    const unsigned token = min(g, p.n_tokens - 1);
    const uint4* xv = reinterpret_cast<const uint4*>(x) + (size_t)token * (k / 8) + 4 * t;

    // This lane's addresses in slot 0 of its warp's ring; slot s is s * sizeof(QsplitSlot)
    // further.
    const uint32_t slot0 = smem_u32(&ring[warp][0]);
    const uint32_t at_a = slot0 + lane * 16;
    const uint32_t at_b = at_a + QILIN_WARP_SIZE * 16;
    const uint32_t at_pairs = at_a + 2 * QILIN_WARP_SIZE * 16;
    // Copies the warp's j-th step into ring slot `slot` (nothing past `mine`); always
    // commits a group, empty or not, so the wait below counts steps.
    auto issue = [&](unsigned j, unsigned slot) {
        if (j < mine) {
            const unsigned q = first + warp + j * QSPLIT_WARPS;
            const uint32_t off = slot * (uint32_t)sizeof(QsplitSlot);
            cp_async_16(at_a + off, lv_a + 4 * q, 16);
            cp_async_16(at_b + off, lv_b + 4 * q, 16);
            cp_async_8(at_pairs + off, sm_a + (q >> group_shift));
            cp_async_8(at_pairs + off + 8, sm_b + (q >> group_shift));
        }
        cp_async_commit();
    };

    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (unsigned j = 0; j < QSPLIT_STAGES; ++j) {
        issue(j, j);
    }
    unsigned slot = 0;
    for (unsigned j = 0; j < mine; ++j) {
        const unsigned q = first + warp + j * QSPLIT_WARPS;
        uint4 xq[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            xq[i] = __ldg(xv + 16 * q + i);
        }
        // STAGES + j groups committed; step j's is the (j + 1)-th: at most STAGES - 1
        // younger ones may still be in flight.
        cp_async_wait<QSPLIT_STAGES - 1>();
        const uint32_t off = slot * (uint32_t)sizeof(QsplitSlot);
        const uint4 la = lds_16(at_a + off);
        const uint4 lb = lds_16(at_b + off);
        const uint4 pr = lds_16(at_pairs + off);
        qmma_step(acc, la, lb, xq, make_float2(__uint_as_float(pr.x), __uint_as_float(pr.y)),
                  make_float2(__uint_as_float(pr.z), __uint_as_float(pr.w)));
        // The slot's values are in registers (lds_16 is ordered before this): refill it.
        issue(j + QSPLIT_STAGES, slot);
        slot = slot + 1 == QSPLIT_STAGES ? 0 : slot + 1;
    }

    partial[warp][g][2 * t] = acc[0];
    partial[warp][g][2 * t + 1] = acc[1];
    partial[warp][g + 8][2 * t] = acc[2];
    partial[warp][g + 8][2 * t + 1] = acc[3];
    __syncthreads();
    // Thread i: token i / 16, row i % 16 (16 consecutive rows: one 32-byte store).
    const unsigned tok = threadIdx.x / QILIN_QGEMV_MMA_ROWS;
    const unsigned r = threadIdx.x % QILIN_QGEMV_MMA_ROWS;
    const unsigned row = row0 + r;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < QSPLIT_WARPS; ++w) {
        sum += partial[w][r][tok];
    }
    if (splits > 1) {
        partials[((size_t)tile * splits + split) * QILIN_QGEMV_SPLITK_PARTIALS + threadIdx.x] =
            sum;
        __threadfence();  // the sums reach L2 before the counter says they are there
        __syncthreads();
        if (threadIdx.x == 0) {
            merges = atomicAdd(&counters[tile], 1u) == splits - 1;
        }
        __syncthreads();
        if (!merges) {
            return;
        }
        __threadfence();  // the other splits' sums, seen through their fences
        const float* tile_sums = partials + (size_t)tile * splits * QILIN_QGEMV_SPLITK_PARTIALS;
        sum = 0.0f;
        for (unsigned y = 0; y < splits; ++y) {  // split order, whoever arrived last
            sum += __ldcg(tile_sums + y * QILIN_QGEMV_SPLITK_PARTIALS + threadIdx.x);
        }
        if (threadIdx.x == 0) {
            counters[tile] = 0;  // every split has arrived: zero for the next launch
        }
    }
    if (tok < p.n_tokens && row < p.out_features) {
        const float b = bias != nullptr ? __bfloat162float(bias[row]) : 0.0f;
        out[(size_t)tok * p.out_features + row] = __float2bfloat16_rn(sum + b);
    }
}
