// Dense bf16 linear layers, out = x W^T + b: our GEMV for decode-sized batches and the
// bias broadcast that the cuBLAS path (prefill) uses. bf16 storage, f32 arithmetic.
//
// Semantics (the CPU twin is CpuLinear::forward in src/backend/cpu/linear.rs, reached
// through CpuBackend::linear), for t < n_tokens, o < out_features, K = in_features:
//   out[t][o] = bf16_rne( sum_k f32(x[t][k]) * f32(W[o][k])  +  f32(bias[o]) )
//   with the bias term only when bias != NULL. Products of two bf16 values are exact in
//   f32; the sum is f32 in a fixed order that differs from the twin's (see below), and
//   the result is rounded to bf16 once, after the bias add. The twin keeps f32.
//   W is [out_features, in_features] row-major (Hugging Face nn.Linear layout).
//
// qilin_gemv_bf16: 1 <= n_tokens <= QILIN_GEMV_MAX_TOKENS (8).
//   Grid  = (ceil(out_features / QILIN_GEMV_ROWS_PER_BLOCK), 1, 1),
//   block = (QILIN_GEMV_THREADS, 1, 1) exactly; no dynamic shared memory (32 KiB static).
//   in_features % QILIN_VEC_ELEMS == 0 and 16-byte aligned x and W: every access is a
//   16-byte vector. There is no scalar fallback in this kernel: the Rust launcher
//   (src/backend/cuda/linear.rs) sends other widths to cuBLAS, and the kernel traps on
//   a launch that breaks the contract rather than leave outputs unwritten.
//
// Design. Each warp owns QILIN_GEMV_ROWS_PER_WARP (2) output channels; a block of 8 warps
// owns 16. The input dimension is walked in tiles of 32 lanes x QILIN_GEMV_VECS_PER_LANE
// (4) vectors = 1024 values. Per tile:
//   1. every lane issues its 2 rows x 4 vectors of W into registers (coalesced: lane l
//      reads bytes 16l..16l+15 of each 512-byte warp segment); they stay in flight while
//   2. the block copies the tile of all n_tokens rows of x into shared memory (bf16,
//      n x 1024 values, at most 16 KiB), then one __syncthreads();
//   3. each lane multiplies its W vectors by the matching x vectors of every token,
//      accumulating R x n f32 partial sums in registers.
//   x is double-buffered in shared memory, so one barrier per tile suffices: the buffer
//   that tile t writes was last read during tile t-2, and every thread finished that
//   before it arrived at tile t-1's barrier, which the writer has passed.
//   At the end each partial sum is reduced across the warp with shuffles; lane t adds
//   the bias and stores token t's output (rows past out_features are neither loaded nor
//   stored; their warps still take part in the x copy and the barriers).
//   So W is read from HBM exactly once per launch whatever n is, with streaming
//   (evict-first) loads; x is read once per block per tile from L2 (n x 2 bytes per
//   16 W rows x 2 bytes: x traffic / W traffic = n / 16).
//
// Napkin math (Qwen2.5-7B, bf16, H100 SXM: 3.35 TB/s HBM, 132 SMs, ~1.98 GHz boost):
//   weights streamed per decode step: per layer qkv 33.0 MB + o 25.7 MB + gate_up
//   271.6 MB + down 135.8 MB = 466 MB, x 28 layers = 13.05 GB, + lm_head 1.09 GB
//   = 14.1 GB -> 4.2 ms per step at 3.35 TB/s: ~236 tok/s is the batch-1 ceiling.
//   Per launch at full bandwidth: gate_up 81 us, down 41 us, qkv 9.9 us, o 7.7 us,
//   lm_head 325 us. FLOPs are 2n per weight (2 bytes): n = 1 is 1 flop/byte, far below
//   the ~20 flop/byte ridge of f32 FMA, so the kernel is memory-bound by design.
//   Instruction budget at n = 8: per weight value 8 FMA + 8/R x-unpacks + 1 W-unpack
//   + n/(8R) shared loads, ~13.5 warp-instructions per 32 values; at 3.35 TB/s that is
//   ~77% of the 4 issue slots/clock of an SM, so n = 8 sits near the issue limit (a
//   tensor-core mma.sync variant would be the next step); n <= 4 uses under half.
//   Bytes in flight: 2 x 4 x 16 B per lane = 4 KiB per warp; at 16+ resident warps
//   per SM that is 64+ KiB per SM against ~18-40 KiB needed to cover HBM latency.
//
// qilin_bias_round_bf16: out[t][o] = bf16(acc[t][o] + bias[o]), the epilogue of the
//   cuBLAS path for layers with a bias: cuBLAS writes x W^T as f32 into acc, and the bias
//   is added before the one rounding, like the GEMV. (cuBLAS with the bias broadcast into
//   a bf16 C and beta = 1, and cuBLASLt's BIAS epilogue, both rounded x W^T to bf16
//   before adding on an H200 for some shapes: bench/results/2026-11-26-h200.md.)
//   Grid-stride loop: any grid >= 1 block of QILIN_BIAS_THREADS threads is correct.
//   Napkin: 4 bytes read + 2 written per output, ~3% of a prefill qkv GEMM's time.

#include "common.cuh"
#include "mma.cuh"

#define GEMV_WARPS (QILIN_GEMV_THREADS / QILIN_WARP_SIZE)
// 16-byte vectors of one x row (or one W row) in one tile.
#define GEMV_TILE_VECS (QILIN_WARP_SIZE * QILIN_GEMV_VECS_PER_LANE)
// x rows loaded into shared memory per tile, per thread, rounded up.
#define GEMV_X_LOADS_PER_THREAD(N) \
    ((N * GEMV_TILE_VECS + QILIN_GEMV_THREADS - 1) / QILIN_GEMV_THREADS)

static_assert(QILIN_GEMV_THREADS % QILIN_WARP_SIZE == 0 &&
                  QILIN_GEMV_THREADS <= QILIN_MAX_THREADS_PER_BLOCK,
              "abi.h: QILIN_GEMV_THREADS must be whole warps");
static_assert(QILIN_GEMV_ROWS_PER_BLOCK == GEMV_WARPS * QILIN_GEMV_ROWS_PER_WARP,
              "abi.h: QILIN_GEMV_ROWS_PER_BLOCK disagrees with threads and rows per warp");
static_assert(QILIN_GEMV_MAX_TOKENS == 8, "qilin_gemv_bf16's switch covers n = 1..8");
static_assert(QILIN_GEMV_MAX_TOKENS <= QILIN_WARP_SIZE, "lane t stores token t");
static_assert(QILIN_BIAS_THREADS % QILIN_WARP_SIZE == 0 &&
                  QILIN_BIAS_THREADS <= QILIN_MAX_THREADS_PER_BLOCK,
              "abi.h: QILIN_BIAS_THREADS must be whole warps");

// W is read once per launch: evict-first at every cache level (ld.global.cs), so the
// stream of weights does not push x and neighbouring activations out of L2.
QILIN_DEVICE uint4 load128_stream(const void* p) {
    return __ldcs(reinterpret_cast<const uint4*>(p));
}

// One block's QILIN_GEMV_ROWS_PER_BLOCK output channels for N tokens.
// x_tile: the kernel's shared buffers [2][QILIN_GEMV_MAX_TOKENS][GEMV_TILE_VECS] (declared
// in the kernel, not here, so the eight instantiations share one allocation).
template <int N>
QILIN_DEVICE void gemv_block(const QilinGemvParams p,
                             bf16* __restrict__ out,
                             const bf16* __restrict__ x,
                             const bf16* __restrict__ w,
                             const bf16* __restrict__ bias,
                             uint4 (*x_tile)[QILIN_GEMV_MAX_TOKENS][GEMV_TILE_VECS]) {
    constexpr int R = QILIN_GEMV_ROWS_PER_WARP;
    constexpr int V = QILIN_GEMV_VECS_PER_LANE;
    const unsigned lane = threadIdx.x % QILIN_WARP_SIZE;
    const unsigned warp = threadIdx.x / QILIN_WARP_SIZE;
    // 16-byte vectors per row of x and of W.
    const unsigned n_vec = p.in_features / QILIN_VEC_ELEMS;
    const unsigned first_row = blockIdx.x * QILIN_GEMV_ROWS_PER_BLOCK + warp * R;
    const uint4* x_vec = reinterpret_cast<const uint4*>(x);  // [N, n_vec]
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

    // row_ok is the same for every lane of a warp: no divergence around the shuffles.
    bool row_ok[R];
    const uint4* w_vec[R];  // row r of this warp, [n_vec] (row 0 for a missing row)
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const unsigned row = first_row + r;
        row_ok[r] = row < p.out_features;
        w_vec[r] = reinterpret_cast<const uint4*>(w) + (size_t)(row_ok[r] ? row : 0u) * n_vec;
    }

    float acc[R][N];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int t = 0; t < N; ++t) {
            acc[r][t] = 0.0f;
        }
    }

    const unsigned n_tiles = ceil_div(n_vec, (unsigned)GEMV_TILE_VECS);
    for (unsigned tile = 0; tile < n_tiles; ++tile) {
        const unsigned tile_start = tile * GEMV_TILE_VECS;

        // 1. This lane's W vectors of the tile; zeros past the row's end or for a
        //    missing row (x is zero there too, and 0 * 0 adds nothing).
        uint4 wv[R][V];
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const unsigned v = tile_start + j * QILIN_WARP_SIZE + lane;
                wv[r][j] = (row_ok[r] && v < n_vec) ? load128_stream(w_vec[r] + v) : zero;
            }
        }

        // 2. The tile of every token's x into this tile's shared buffer.
        uint4 (*xs)[GEMV_TILE_VECS] = x_tile[tile % 2];
#pragma unroll
        for (int k = 0; k < GEMV_X_LOADS_PER_THREAD(N); ++k) {
            const unsigned i = threadIdx.x + k * QILIN_GEMV_THREADS;
            if (i < N * GEMV_TILE_VECS) {
                const unsigned t = i / GEMV_TILE_VECS;
                const unsigned c = i % GEMV_TILE_VECS;
                const unsigned v = tile_start + c;
                xs[t][c] = v < n_vec ? load128_readonly(x_vec + (size_t)t * n_vec + v) : zero;
            }
        }
        __syncthreads();

        // 3. Partial dot products. Shared reads: lane l reads vector l of a 32-vector
        //    run, consecutive 16-byte words, so no bank conflicts.
#pragma unroll
        for (int j = 0; j < V; ++j) {
            const unsigned c = j * QILIN_WARP_SIZE + lane;
            float wf[R][8];
#pragma unroll
            for (int r = 0; r < R; ++r) {
                bf16x8_to_float(wv[r][j], wf[r]);
            }
#pragma unroll
            for (int t = 0; t < N; ++t) {
                float xf[8];
                bf16x8_to_float(xs[t][c], xf);
#pragma unroll
                for (int r = 0; r < R; ++r) {
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        acc[r][t] = fmaf(wf[r][e], xf[e], acc[r][t]);
                    }
                }
            }
        }
        // No barrier here: the next tile fills the other buffer (see the header).
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

// out:  bf16 [n_tokens, out_features]         (must not overlap x, W or bias)
// x:    bf16 [n_tokens, in_features]          16-byte aligned
// w:    bf16 [out_features, in_features]      16-byte aligned, row-major
// bias: bf16 [out_features], or NULL for none
extern "C" __global__ void __launch_bounds__(QILIN_GEMV_THREADS)
qilin_gemv_bf16(const QilinGemvParams p,
                bf16* __restrict__ out,
                const bf16* __restrict__ x,
                const bf16* __restrict__ w,
                const bf16* __restrict__ bias) {
    // The block's first weights, asked of L2 before the wait (kernels/pdl.cuh).
    qilin_pdl_prefetch_rows(w, blockIdx.x * QILIN_GEMV_ROWS_PER_BLOCK, QILIN_GEMV_ROWS_PER_BLOCK,
                            p.out_features, (size_t)p.in_features * sizeof(bf16));
    QILIN_PDL_ENTRY();
    __shared__ uint4 x_tile[2][QILIN_GEMV_MAX_TOKENS][GEMV_TILE_VECS];
    // A launch that breaks the contract would leave outputs unwritten or read out of
    // bounds; stop the stream loudly instead.
    if (blockDim.x != QILIN_GEMV_THREADS || p.in_features % QILIN_VEC_ELEMS != 0 ||
        p.n_tokens == 0 || p.n_tokens > QILIN_GEMV_MAX_TOKENS) {
        __trap();
    }
    switch (p.n_tokens) {
        case 1: gemv_block<1>(p, out, x, w, bias, x_tile); break;
        case 2: gemv_block<2>(p, out, x, w, bias, x_tile); break;
        case 3: gemv_block<3>(p, out, x, w, bias, x_tile); break;
        case 4: gemv_block<4>(p, out, x, w, bias, x_tile); break;
        case 5: gemv_block<5>(p, out, x, w, bias, x_tile); break;
        case 6: gemv_block<6>(p, out, x, w, bias, x_tile); break;
        case 7: gemv_block<7>(p, out, x, w, bias, x_tile); break;
        default: gemv_block<8>(p, out, x, w, bias, x_tile); break;
    }
}

// out:  bf16 [n_tokens, out_features]  every row set to bias
// bias: bf16 [out_features]
extern "C" __global__ void __launch_bounds__(QILIN_BIAS_THREADS)
qilin_bias_round_bf16(const QilinBiasParams p,
                      bf16* __restrict__ out,         // [n_tokens, out_features]
                      const float* __restrict__ acc,  // [n_tokens, out_features]
                      const bf16* __restrict__ bias) {  // [out_features]
    QILIN_PDL_ENTRY();
    const size_t total = (size_t)p.n_tokens * p.out_features;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        out[i] = __float2bfloat16_rn(acc[i] + __bfloat162float(bias[i % p.out_features]));
    }
}

// ---------------------------------------------------------------------------------------
// qilin_gemv_mma_bf16: the same semantics as qilin_gemv_bf16 (1 <= n_tokens <= 8) on
// tensor cores, f32 accumulation in the mma (cuBLAS's arithmetic, and its tolerance in
// tests/gpu_linear.rs). Verified on an H200 (12332f8); the dispatch takes it where
// linear::gemv_mma_wins says, unless QILIN_CUDA_GEMV_MMA=0.
//
// Why: at n = 8 qilin_gemv_bf16 issues ~8 FMAs per weight and reached 22-44% of copy
// bandwidth on an H200 (qkv_proj 35 us for 7.8 us of bytes); one m16n8k16 mma does 16 x
// 16 x 8 of them.
//
// Design. Grid = ceil(out_features / 32) blocks of 8 warps; every warp of a block owns
// the block's 32 rows (two m16 tiles) and all 8 token columns, and takes every 8th step
// of 32 input values (warp w: steps w, w + 8, ...). Per step, lane (g = lane / 4,
// t = lane % 4) loads one 16-byte vector, input values 8t..8t+7 of the step, of each
// of rows g, g + 8, g + 16, g + 24 and of token g of x (zero for g >= n_tokens). Those
// eight values feed two mmas without any shuffle, because a dot product may visit its k
// in any order so long as A and B agree: mma j (0, 1) takes words 2j and 2j + 1 of the
// vectors as its fragments (a0/a2 of row g, a1/a3 of row g + 8, b0/b1 of token g), so
// its logical k (2t, 2t + 1, 2t + 8, 2t + 9) is the actual 8t + 4j + (0, 1, 2, 3) in both.
// Rows: the four threads of a row read 64 contiguous bytes per step; UNROLL steps of
// loads are issued before the first mma (4 x 5 vectors per lane in flight). x comes from
// L2 (n x 64 bytes per warp step against 2 KiB of W).
// Epilogue: each warp's 32 x 8 partial sums go to shared memory, one barrier, and thread
// i sums row i / 8, token i % 8 over the 8 warps in a fixed order, adds the bias and
// rounds to bf16 once.

#define GEMV_MMA_WARPS (QILIN_GEMV_MMA_THREADS / QILIN_WARP_SIZE)
#define GEMV_MMA_STEP 32  // input values per warp step: 4 lanes x 8

static_assert(QILIN_GEMV_MMA_ROWS_PER_BLOCK == 32, "two m16 tiles per warp");
static_assert(QILIN_GEMV_MMA_THREADS == QILIN_GEMV_MMA_ROWS_PER_BLOCK * QILIN_GEMV_MAX_TOKENS,
              "one epilogue thread per (row, token) of the block");

// Arguments as qilin_gemv_bf16's (the same alignment and overlap rules).
extern "C" __global__ void __launch_bounds__(QILIN_GEMV_MMA_THREADS)
qilin_gemv_mma_bf16(const QilinGemvParams p,
                    bf16* __restrict__ out,           // [n_tokens, out_features]
                    const bf16* __restrict__ x,       // [n_tokens, in_features]
                    const bf16* __restrict__ w,       // [out_features, in_features]
                    const bf16* __restrict__ bias) {  // [out_features] or NULL
    // The block's first weights, asked of L2 before the wait (kernels/pdl.cuh).
    qilin_pdl_prefetch_rows(w, blockIdx.x * QILIN_GEMV_MMA_ROWS_PER_BLOCK,
                            QILIN_GEMV_MMA_ROWS_PER_BLOCK, p.out_features,
                            (size_t)p.in_features * sizeof(bf16));
    QILIN_PDL_ENTRY();
    __shared__ float partial[GEMV_MMA_WARPS][QILIN_GEMV_MMA_ROWS_PER_BLOCK][QILIN_GEMV_MAX_TOKENS];
    if (blockDim.x != QILIN_GEMV_MMA_THREADS || p.in_features % QILIN_VEC_ELEMS != 0 ||
        p.n_tokens == 0 || p.n_tokens > QILIN_GEMV_MAX_TOKENS) {
        __trap();
    }
    constexpr int U = QILIN_GEMV_MMA_UNROLL;
    const unsigned lane = threadIdx.x % QILIN_WARP_SIZE;
    const unsigned warp = threadIdx.x / QILIN_WARP_SIZE;
    const unsigned g = lane / 4;
    const unsigned t = lane % 4;
    const unsigned first_row = blockIdx.x * QILIN_GEMV_MMA_ROWS_PER_BLOCK;
    const unsigned n_vec = p.in_features / QILIN_VEC_ELEMS;  // 16-byte vectors per row
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);

    // This lane's rows g, g + 8, g + 16, g + 24 of the block and its token g.
    bool row_ok[4];
    const uint4* w_row[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const unsigned row = first_row + g + 8 * i;
        row_ok[i] = row < p.out_features;
        w_row[i] = reinterpret_cast<const uint4*>(w) + (size_t)(row_ok[i] ? row : 0u) * n_vec;
    }
    const bool token_ok = g < p.n_tokens;
    const uint4* x_row = reinterpret_cast<const uint4*>(x) + (size_t)(token_ok ? g : 0u) * n_vec;

    float c[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    const unsigned n_steps = ceil_div(p.in_features, (unsigned)GEMV_MMA_STEP);
    for (unsigned first = warp; first < n_steps; first += GEMV_MMA_WARPS * U) {
        uint4 wv[U][4];
        uint4 xv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const unsigned step = first + u * GEMV_MMA_WARPS;
            const unsigned v = step * (GEMV_MMA_STEP / QILIN_VEC_ELEMS) + t;  // vector index
            const bool in = step < n_steps && v < n_vec;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                wv[u][i] = (in && row_ok[i]) ? load128_stream(w_row[i] + v) : zero;
            }
            xv[u] = (in && token_ok) ? load128_readonly(x_row + v) : zero;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const uint32_t b0 = j == 0 ? xv[u].x : xv[u].z;
                const uint32_t b1 = j == 0 ? xv[u].y : xv[u].w;
#pragma unroll
                for (int m = 0; m < 2; ++m) {
                    const uint4& lo = wv[u][2 * m];      // row g (+ 16m)
                    const uint4& hi = wv[u][2 * m + 1];  // row g + 8 (+ 16m)
                    const uint32_t a[4] = {j == 0 ? lo.x : lo.z, j == 0 ? hi.x : hi.z,
                                           j == 0 ? lo.y : lo.w, j == 0 ? hi.y : hi.w};
                    mma_bf16_16816(c[m], a, b0, b1);
                }
            }
        }
    }

    // c[m] = {(row g, token 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)} of tile m.
#pragma unroll
    for (int m = 0; m < 2; ++m) {
        partial[warp][16 * m + g][2 * t] = c[m][0];
        partial[warp][16 * m + g][2 * t + 1] = c[m][1];
        partial[warp][16 * m + g + 8][2 * t] = c[m][2];
        partial[warp][16 * m + g + 8][2 * t + 1] = c[m][3];
    }
    __syncthreads();
    const unsigned r = threadIdx.x / QILIN_GEMV_MAX_TOKENS;
    const unsigned token = threadIdx.x % QILIN_GEMV_MAX_TOKENS;
    const unsigned row = first_row + r;
    if (row < p.out_features && token < p.n_tokens) {
        float sum = 0.0f;
#pragma unroll
        for (int k = 0; k < GEMV_MMA_WARPS; ++k) {
            sum += partial[k][r][token];
        }
        const float b = bias != nullptr ? __bfloat162float(bias[row]) : 0.0f;
        out[(size_t)token * p.out_features + row] = __float2bfloat16_rn(sum + b);
    }
}
