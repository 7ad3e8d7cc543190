// The tensor-core W4A16 / W8A16 GEMM, qilin_qgemm_w{4,8}_bf16, over the packed level layout of
// kernels/quant_linear.cu (its header: levels, (scale, min) pairs, W = fma(scale, level,
// min)). Any number of tokens; the dispatch takes it for 9..=QGEMM_MAX_TOKENS tokens with
// QILIN_CUDA_QGEMM_WIDE=1 (src/backend/cuda/quant_linear.rs).
//
// Semantics (CPU twin: CpuLinear::forward over the original weight, through
// CpuBackend::linear; tests/gpu_quant_linear.rs at the cuBLAS path's tolerance):
//   out[t][o] = bf16_rne( sum_k bf16_rne(W[o][k]) * f32(x[t][k])  +  f32(bias[o]) )
//   the weight rounded to bf16 as the dequantization + cuBLAS path rounds it, summed in
//   f32 on tensor cores in an order of its own (fixed for a shape and device), rounded once
//   after the bias add.
//
// History. The first version (one step of levels in flight, one block per 64 x 128 tile)
// passed its parity test on an H200 but lost to dequantization + cuBLAS everywhere but
// gate_up at 32-64 tokens (b908988: gate_up [64] 139 us against 277, qkv [64] 89 against
// 40, and ~80 us for qkv and o at any token count from 16 to 64). Read from those figures:
// each block waited one DRAM round trip per 32-channel step (the next step's levels were
// loaded one step ahead and stored at its end), ~0.7-1.2 us a step over the 112 steps of a
// 3584-wide row, whatever the tokens; and the narrow layers had too few tiles to fill the
// GPU (qkv 36 tiles at <= 64 tokens on 132 SMs).
//
// Design, per block of QILIN_QGEMM_THREADS threads (4 warps, 2 x 2, each 32 tokens x 64
// channels = 2 x 8 m16n8k16 tiles) and one tile of QILIN_QGEMM_BLOCK_M tokens x
// QILIN_QGEMM_BLOCK_N output channels, walking a range of the input in steps of
// QILIN_QGEMM_BLOCK_K (32) channels:
//   - thread i owns channel row i of the tile: each step it dequantizes that row's 32
//     levels with their group's (scale, min) and stores them as bf16 into the shared weight
//     tile (double-buffered); groups are powers of two, found by a shift. Its levels and pairs are loaded QGEMM_LEVEL_STEPS steps ahead
//     into a register ring (8 steps of 16 bytes at 4 bits, 4 of 32 at 8: ~16 KiB of levels
//     in flight per block, ~48 KiB per SM at 3 blocks, the ~40-64 KiB Little's law asks for
//     at ~1.2-1.5 us of loaded DRAM latency);
//   - x [64 tokens x 32 channels] arrives by cp.async into a ring of QILIN_QGEMM_X_STAGES
//     stages (rows past n_tokens zero-filled without a read), QILIN_QGEMM_X_STAGES - 1
//     steps ahead;
//   - one barrier per step: it publishes the step's weight tile and x stage, and retires
//     the buffers the next step's stores and copies overwrite (each was last read a step
//     earlier). Rows are padded to 40 values (80 bytes), so each ldmatrix phase of 8 rows x
//     16 bytes touches 8 distinct bank groups;
//   - ldmatrix.x4 loads A (x, row-major) and B (W rows = the "col" operand) fragments;
//     16 mma.sync per warp per 16 input channels, f32 accumulators;
//   - split-K (grid.z > 1, for layers with too few tiles to fill the GPU): block z takes
//     steps [z n / Z, (z + 1) n / Z) of the row's n steps, stores its 64 x 128 f32 sums to
//     `partials`, and the last block of the tile to arrive (a u32 counter per tile, atomicAdd
//     after a __threadfence, as qilin_qgemv_mma_splitk_w4_bf16 and the pipelined decode
//     attention merge, both verified on an H200) adds the splits' sums in split order,
//     resets the counter to 0 (zero between launches: CUDA graphs replay it without a
//     memset) and writes the output. Fixed orders: repeats are bit-identical.
//   Epilogue: bias added in f32, one rounding to bf16, bounds-checked per element.
//
// Napkin math (H200: 132 SMs, 1.98 GHz, ~4.25 TB/s copy; Qwen2.5-7B int4, 64 tokens):
//   - issue per thread and step in the sm_90a SASS (ptxas 13.0, nvdisasm): ~209
//     instructions, 32 HMMA, 12 LDSM, and ~120 to dequantize 32 levels (per value one
//     LOP3, FADD and FFMA and half an F2FP: nibble e of a half-word stays in place under
//     the exponent of 2^23, and the FMA takes scale 16^-e, exactly; the first version's
//     extraction and run-time indices made it ~320). So ~840 warp-instructions per block
//     step of 2 KiB of levels: at an IPC of ~2.5-3 per SM, ~6-7 B/clock, ~1.6-1.9 TB/s of
//     levels, issue-bound about 2.3x under copy bandwidth but far from the one-round-trip-
//     per-step bound of the first version;
//   - gate_up (37888 x 3584, 68 MB of levels, 296 tiles): ~35-45 us; qkv (4608 rows,
//     8.3 MB, 36 tiles x 8 splits): ~5 us + ~2 us ramp + ~2 us merge; o (3584 rows, 28 x 8)
//     ~7 us; down (3584 x 18944, 34 MB, 28 x 8) ~20-25 us. The token count up to 64 changes
//     only x (rows past n_tokens are zero-filled, not read) and the HMMA count, so 16, 32
//     and 64 tokens cost about the same.
//
// Launch contract, checked (a violation traps but for the last): blocks of exactly
// QILIN_QGEMM_THREADS threads; grid = (ceil(out_features / QILIN_QGEMM_BLOCK_N), ceil(n_tokens /
// QILIN_QGEMM_BLOCK_M), splits) with 1 <= splits <= in_features / QILIN_QGEMM_BLOCK_K;
// partials [tiles * splits * QILIN_QGEMM_PARTIALS] f32 and counters [tiles] u32, all zero at
// launch, non-null when splits > 1 (tiles = grid.x * grid.y); in_features a multiple of
// QILIN_QGEMM_BLOCK_K and of group_size, group_size a power of two and a multiple of a
// 16-byte vector's levels (every format Qilin packs; GPTQ's per-channel groups are not, and
// take dequantization + cuBLAS); 16-byte aligned x and levels, 8-byte aligned scale_min (whole cudarc
// allocations); n_tokens x in_features < 2^32 (x offsets are u32; the geometry refuses
// more). `partials` must not alias anything another op reads meanwhile (one stream
// orders it).

#include "common.cuh"
#include "mma.cuh"
#include "quant_levels.cuh"

#define QGEMM_WARPS (QILIN_QGEMM_THREADS / QILIN_WARP_SIZE)
#define QGEMM_PAD 8  // bf16 values of padding per shared-memory row
#define QGEMM_LD (QILIN_QGEMM_BLOCK_K + QGEMM_PAD)
#define QGEMM_WARP_M 32
#define QGEMM_WARP_N 64
#define QGEMM_X_STAGES QILIN_QGEMM_X_STAGES

static_assert(QILIN_QGEMM_BLOCK_K == 32, "one 16-byte vector of 4-bit levels per row per step");
static_assert(QILIN_QGEMM_THREADS == QILIN_QGEMM_BLOCK_N,
              "thread i dequantizes channel row i of the block");
static_assert(QGEMM_WARPS == (QILIN_QGEMM_BLOCK_M / QGEMM_WARP_M) *
                                 (QILIN_QGEMM_BLOCK_N / QGEMM_WARP_N),
              "abi.h: the warps must tile the block");
static_assert(QILIN_QGEMM_BLOCK_M * QILIN_QGEMM_BLOCK_K / QILIN_VEC_ELEMS ==
                  2 * QILIN_QGEMM_THREADS,
              "two 16-byte x chunks per thread per step");
static_assert(QGEMM_X_STAGES >= 2 && (QGEMM_X_STAGES & (QGEMM_X_STAGES - 1)) == 0,
              "abi.h: the x ring is a power of two of at least 2 stages");
static_assert(QILIN_QGEMM_PARTIALS == QILIN_QGEMM_BLOCK_M * QILIN_QGEMM_BLOCK_N,
              "abi.h: a block's partial sums are its whole tile");
static_assert(QILIN_QGEMM_PARTIALS == 2 * 8 * 4 * QILIN_QGEMM_THREADS,
              "every thread holds 2 x 8 accumulator fragments of 4 values");

// Steps of levels in flight per thread: the same bytes at either width.
template <int BITS>
struct QgemmRing {
    static constexpr int kSteps = BITS == 4 ? QILIN_QGEMM_LEVEL_STEPS_W4 : QILIN_QGEMM_LEVEL_STEPS_W8;
    // The x stage and weight buffer of a step then follow from its place in the ring.
    static_assert(kSteps % QGEMM_X_STAGES == 0 && kSteps % 2 == 0,
                  "abi.h: the level ring is a multiple of the x stages and of 2");
};

// One step's levels and (scale, min) pairs of one channel row, held in registers between
// the global load and the shared-memory store.
template <int BITS>
struct StepLevels {
    uint4 v[Levels<BITS>::kVecsPerLane];
    float2 sm[Levels<BITS>::kVecsPerLane];
};

// (a & mask) | or_bits in one LOP3 (written in C with two immediates, nvcc emits two).
QILIN_DEVICE uint32_t and_or(uint32_t a, uint32_t mask, uint32_t or_bits) {
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "r"(mask), "r"(or_bits));
    return r;
}

// 32 4-bit levels (one 16-byte vector) -> bf16_rne(fma(scale, level, min)) into dst[0..32),
// the value store_dequantized gives, in ~3.6 instructions a value instead of ~4.5: nibble
// e of a half-word stays where it is, 2^23 + level 16^e comes out of one LOP3 and one FADD,
// and the FMA takes scale 16^-e (scale16[e], exact: a power-of-two scaling of a normal
// float), so the product scale16[e] x level 16^e is scale x level exactly and the FMA
// rounds the same sum once.
QILIN_DEVICE void dequantize_w4_to_shared(const uint4& v, const float scale16[4], float min,
                                          bf16* dst) {
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        const uint32_t word = (&v.x)[w];
        float out[8];
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const uint32_t bits = half == 0 ? word : word >> 16;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float biased = __uint_as_float(and_or(bits, 0xFu << (4 * e), 0x4B000000u));
                out[4 * half + e] = fmaf(scale16[e], biased - 8388608.0f, min);
            }
        }
        store128(dst + 8 * w, float_to_bf16x8(out));
    }
}

// The row's 32 values of this step, dequantized and rounded to bf16, into w_row[0..32).
template <int BITS>
QILIN_DEVICE void qgemm_store_levels(const StepLevels<BITS>& s, bf16* w_row) {
    if (BITS == 4) {
        const float scale = s.sm[0].x;
        const float scale16[4] = {scale, scale * 0.0625f, scale * 0.00390625f,
                                  scale * 0.000244140625f};
        dequantize_w4_to_shared(s.v[0], scale16, s.sm[0].y, w_row);
    } else {
#pragma unroll
        for (int i = 0; i < Levels<BITS>::kVecsPerLane; ++i) {
            store_dequantized<BITS>(s.v[i], s.sm[i], w_row + i * Levels<BITS>::kPerVec);
        }
    }
}

template <int BITS>
QILIN_DEVICE void qgemm(const QilinQuantGemvParams p,
                        bf16* __restrict__ out,
                        const bf16* __restrict__ x,
                        const uint8_t* __restrict__ levels,
                        const float2* __restrict__ scale_min,
                        const bf16* __restrict__ bias,
                        float* __restrict__ partials,
                        unsigned* __restrict__ counters) {
    constexpr int RING = QgemmRing<BITS>::kSteps;
    constexpr int VL = Levels<BITS>::kVecsPerLane;
    constexpr unsigned PER_VEC = Levels<BITS>::kPerVec;
    constexpr unsigned X_STAGE_BYTES = QILIN_QGEMM_BLOCK_M * QGEMM_LD * sizeof(bf16);
    constexpr unsigned W_BUFFER_BYTES = QILIN_QGEMM_BLOCK_N * QGEMM_LD * sizeof(bf16);
    __shared__ __align__(16) bf16 xs[QGEMM_X_STAGES][QILIN_QGEMM_BLOCK_M][QGEMM_LD];
    __shared__ __align__(16) bf16 ws[2][QILIN_QGEMM_BLOCK_N][QGEMM_LD];
    __shared__ bool merges;
    const unsigned n_steps = p.in_features / QILIN_QGEMM_BLOCK_K;
    const unsigned splits = gridDim.z;
    if (blockDim.x != QILIN_QGEMM_THREADS || p.in_features % QILIN_QGEMM_BLOCK_K != 0 ||
        p.group_size == 0 || (p.group_size & (p.group_size - 1)) != 0 ||
        p.group_size % PER_VEC != 0 || p.in_features % p.group_size != 0 ||
        p.n_tokens == 0 || splits > n_steps ||
        (splits > 1 && (partials == nullptr || counters == nullptr))) {
        __trap();
    }
    const unsigned tid = threadIdx.x;
    const unsigned lane = tid % QILIN_WARP_SIZE;
    const unsigned warp = tid / QILIN_WARP_SIZE;
    const unsigned warp_m = warp / (QILIN_QGEMM_BLOCK_N / QGEMM_WARP_N);  // 0..1
    const unsigned warp_n = warp % (QILIN_QGEMM_BLOCK_N / QGEMM_WARP_N);  // 0..1
    const unsigned token0 = blockIdx.y * QILIN_QGEMM_BLOCK_M;
    const unsigned channel0 = blockIdx.x * QILIN_QGEMM_BLOCK_N;
    // This block's steps: [first_step, first_step + count).
    const unsigned split = blockIdx.z;
    const unsigned first_step = (unsigned)((unsigned long long)n_steps * split / splits);
    const unsigned count =
        (unsigned)((unsigned long long)n_steps * (split + 1) / splits) - first_step;

    // Thread tid's channel row: its levels, and its (scale, min) pairs (zeroed past
    // out_features, which makes the row's weights 0 while the loads stay in row 0).
    const unsigned row = channel0 + tid;
    const bool row_ok = row < p.out_features;
    const size_t safe_row = row_ok ? row : 0u;
    const uint4* lv_row = reinterpret_cast<const uint4*>(levels) + safe_row * (p.in_features / PER_VEC);
    const float2* sm_row = scale_min + safe_row * (p.in_features / p.group_size);
    const unsigned group_shift = __ffs(p.group_size) - 1;  // a power of two (checked)
    auto load_levels = [&](unsigned local_step) {
        StepLevels<BITS> s;
#pragma unroll
        for (int i = 0; i < VL; ++i) {
            const unsigned channel = (first_step + local_step) * QILIN_QGEMM_BLOCK_K + i * PER_VEC;
            const unsigned group = channel >> group_shift;
            s.v[i] = load128_stream(lv_row + channel / PER_VEC);
            const float2 pair = __ldg(sm_row + group);
            s.sm[i] = row_ok ? pair : make_float2(0.0f, 0.0f);
        }
        return s;
    };

    // x chunks of one step: 64 rows x 4 chunks of 8 values; thread tid copies chunks
    // tid and tid + 128 (rows past n_tokens zero-filled, nothing read). The caller commits.
    // Offsets in values from x_base, within u32 (the geometry bounds n_tokens x in_features).
    const bf16* const x_base = x + (size_t)first_step * QILIN_QGEMM_BLOCK_K;
    uint32_t x_offset[2], x_dst[2], x_bytes[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
        const unsigned chunk = tid + c * QILIN_QGEMM_THREADS;
        const unsigned r = chunk / (QILIN_QGEMM_BLOCK_K / QILIN_VEC_ELEMS);
        const unsigned col = (chunk % (QILIN_QGEMM_BLOCK_K / QILIN_VEC_ELEMS)) * QILIN_VEC_ELEMS;
        const bool ok = token0 + r < p.n_tokens;
        x_offset[c] = (ok ? token0 + r : 0u) * p.in_features + col;
        x_dst[c] = smem_u32(&xs[0][r][col]);
        x_bytes[c] = ok ? 16u : 0u;
    }
    auto load_x = [&](unsigned local_step, unsigned stage) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            cp_async_16(x_dst[c] + stage * X_STAGE_BYTES,
                        x_base + x_offset[c] + local_step * QILIN_QGEMM_BLOCK_K, x_bytes[c]);
        }
    };
    // This lane's ldmatrix rows in stage 0 / buffer 0 (k16 0): A per m-tile, B per pair of
    // n-tiles; a stage, buffer or k16 adds a compile-time offset.
    uint32_t a_addr[2], b_addr[4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
        a_addr[mt] = smem_u32(&xs[0][warp_m * QGEMM_WARP_M + mt * 16 + (lane % 16)][(lane / 16) * 8]);
    }
#pragma unroll
    for (int np = 0; np < 4; ++np) {
        const unsigned n = warp_n * QGEMM_WARP_N + np * 16 + (lane / 16) * 8 + (lane % 8);
        b_addr[np] = smem_u32(&ws[0][n][((lane / 8) % 2) * 8]);
    }
    bf16* const w_row0 = &ws[0][tid][0];

    float acc[2][8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc[mt][nt][e] = 0.0f;
            }
        }
    }

    // Prologue: x of local steps 0 .. X_STAGES - 2 (one commit group each, empty past the
    // range, so that group i is always step i's), levels of steps 0 .. RING - 1 (slot s
    // holds step s), step 0's weights into ws[0] and its slot refilled with step RING.
#pragma unroll
    for (int s = 0; s < QGEMM_X_STAGES - 1; ++s) {
        if ((unsigned)s < count) {
            load_x(s, s);
        }
        cp_async_commit();
    }
    StepLevels<BITS> ring[RING];
#pragma unroll
    for (int s = 0; s < RING; ++s) {
        if ((unsigned)s < count) {
            ring[s] = load_levels(s);
        }
    }
    if (count > 0) {
        qgemm_store_levels<BITS>(ring[0], w_row0);
        if ((unsigned)RING < count) {
            ring[0] = load_levels(RING);
        }
    }
    cp_async_wait<QGEMM_X_STAGES - 2>();
    __syncthreads();

    // Local step i = base + j (base a multiple of RING, j unrolled): its x in stage
    // j % X_STAGES, its weights in ws[j % 2], step i + 1's levels in ring slot (j + 1) %
    // RING, all compile-time (RING is a multiple of X_STAGES and of 2).
    for (unsigned base = 0; base < count; base += RING) {
#pragma unroll
        for (int j = 0; j < RING; ++j) {
            const unsigned i = base + j;
            if (i >= count) {
                break;  // block-uniform
            }
            if (i + QGEMM_X_STAGES - 1 < count) {
                load_x(i + QGEMM_X_STAGES - 1, (j + QGEMM_X_STAGES - 1) % QGEMM_X_STAGES);
            }
            cp_async_commit();
            const uint32_t x_stage = (j % QGEMM_X_STAGES) * X_STAGE_BYTES;
            const uint32_t w_buffer = (j % 2) * W_BUFFER_BYTES;
#pragma unroll
            for (int k16 = 0; k16 < QILIN_QGEMM_BLOCK_K / 16; ++k16) {
                uint32_t a[2][4];
#pragma unroll
                for (int mt = 0; mt < 2; ++mt) {
                    ldmatrix_x4(a[mt], a_addr[mt] + x_stage + k16 * 16 * sizeof(bf16));
                }
#pragma unroll
                for (int np = 0; np < 4; ++np) {  // pairs of n-tiles
                    uint32_t b[4];
                    ldmatrix_x4(b, b_addr[np] + w_buffer + k16 * 16 * sizeof(bf16));
#pragma unroll
                    for (int mt = 0; mt < 2; ++mt) {
                        mma_bf16_16816(acc[mt][2 * np], a[mt], b[0], b[1]);
                        mma_bf16_16816(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
                    }
                }
            }
            if (i + 1 < count) {
                const int next = (j + 1) % RING;
                qgemm_store_levels<BITS>(ring[next], w_row0 + ((j + 1) % 2) * (W_BUFFER_BYTES / sizeof(bf16)));
                if (i + 1 + RING < count) {
                    ring[next] = load_levels(i + 1 + RING);
                }
            }
            // Groups 0 .. i + 1 complete: step i + 1's x has landed (the newest
            // X_STAGES - 2 groups may still fly).
            cp_async_wait<QGEMM_X_STAGES - 2>();
            __syncthreads();
        }
    }

    if (splits > 1) {
        // Fragment-major: float4 q of every thread contiguous, coalesced both ways.
        const unsigned tile = blockIdx.y * gridDim.x + blockIdx.x;
        float4* mine = reinterpret_cast<float4*>(partials) +
                       ((size_t)tile * splits + split) * (QILIN_QGEMM_PARTIALS / 4);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                mine[(mt * 8 + nt) * QILIN_QGEMM_THREADS + tid] =
                    make_float4(acc[mt][nt][0], acc[mt][nt][1], acc[mt][nt][2], acc[mt][nt][3]);
            }
        }
        __threadfence();  // the sums reach L2 before the counter says they are there
        __syncthreads();
        if (tid == 0) {
            merges = atomicAdd(&counters[tile], 1u) == splits - 1;
        }
        __syncthreads();
        if (!merges) {
            return;
        }
        __threadfence();  // the other splits' sums, seen through their fences
        const float4* tile_sums =
            reinterpret_cast<const float4*>(partials) + (size_t)tile * splits * (QILIN_QGEMM_PARTIALS / 4);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                for (unsigned z = 0; z < splits; ++z) {  // split order, whoever arrived last
                    const float4 v = __ldcg(tile_sums + (size_t)z * (QILIN_QGEMM_PARTIALS / 4) +
                                            (mt * 8 + nt) * QILIN_QGEMM_THREADS + tid);
                    sum.x += v.x;
                    sum.y += v.y;
                    sum.z += v.z;
                    sum.w += v.w;
                }
                acc[mt][nt][0] = sum.x;
                acc[mt][nt][1] = sum.y;
                acc[mt][nt][2] = sum.z;
                acc[mt][nt][3] = sum.w;
            }
        }
        if (tid == 0) {
            counters[tile] = 0;  // every split has arrived: zero for the next launch
        }
    }

    // c fragment: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1) of each 16 x 8 tile.
    const unsigned g = lane / 4, t = lane % 4;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const unsigned token = token0 + warp_m * QGEMM_WARP_M + mt * 16 + g + (e / 2) * 8;
                const unsigned channel = channel0 + warp_n * QGEMM_WARP_N + nt * 8 + 2 * t + (e % 2);
                if (token < p.n_tokens && channel < p.out_features) {
                    const float b = bias != nullptr ? __bfloat162float(bias[channel]) : 0.0f;
                    out[(size_t)token * p.out_features + channel] =
                        __float2bfloat16_rn(acc[mt][nt][e] + b);
                }
            }
        }
    }
}

// Arguments as qilin_qgemv_w4_bf16's, then the split-K merge's buffers (null with one split).
extern "C" __global__ void __launch_bounds__(QILIN_QGEMM_THREADS, QILIN_QGEMM_MIN_BLOCKS)
qilin_qgemm_w4_bf16(const QilinQuantGemvParams p,
                    bf16* __restrict__ out,               // [n_tokens, out_features]
                    const bf16* __restrict__ x,           // [n_tokens, in_features]
                    const uint8_t* __restrict__ levels,   // [out_features, in_features / 2]
                    const float2* __restrict__ scale_min, // [out_features, in / group_size]
                    const bf16* __restrict__ bias,        // [out_features] or NULL
                    float* __restrict__ partials,         // [tiles, splits, QILIN_QGEMM_PARTIALS] or NULL
                    unsigned* __restrict__ counters) {   // [tiles], zero at launch, or NULL
    QILIN_PDL_ENTRY();
    qgemm<4>(p, out, x, levels, scale_min, bias, partials, counters);
}

// As qilin_qgemm_w4_bf16 with levels: i8 [out_features, in_features] (8-bit levels).
extern "C" __global__ void __launch_bounds__(QILIN_QGEMM_THREADS, QILIN_QGEMM_MIN_BLOCKS)
qilin_qgemm_w8_bf16(const QilinQuantGemvParams p,
                    bf16* __restrict__ out,
                    const bf16* __restrict__ x,
                    const uint8_t* __restrict__ levels,
                    const float2* __restrict__ scale_min,
                    const bf16* __restrict__ bias,
                    float* __restrict__ partials,
                    unsigned* __restrict__ counters) {
    QILIN_PDL_ENTRY();
    qgemm<8>(p, out, x, levels, scale_min, bias, partials, counters);
}
