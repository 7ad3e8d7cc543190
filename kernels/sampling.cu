// Sampling on the device: greedy argmax (qilin_argmax_bf16) and temperature / top-k /
// top-p / min-p sampling (qilin_sample_bf16) of each logits row, so that a decode step
// whose sequences need nothing but the token (no logprobs, no penalties) downloads one u32
// per sequence instead of the [rows, vocab] logits (on an H200, 24 ms of a 25 ms step at
// batch 64 went to copying and converting the logits: bench/results/2026-11-26-h200.md).
//
// qilin_argmax_bf16 (CPU twin: CpuBackend::argmax_rows, i.e. the host sampler's greedy
// choice, engine/sampler/vecmath.rs sanitize_max + argmax):
//   v(i) = f32(logits[r][i]) with NaN -> -inf and +inf -> FLT_MAX
//   ids[r] = the smallest i with v(i) = max_j v(j)         (0 for an all -inf/NaN row)
//   Exact: comparisons only, no arithmetic, so it equals the twin bit for bit.
//
// Launch: grid = (rows, 1, 1), block = (QILIN_ARGMAX_THREADS, 1, 1). Each thread scans
//   elements threadIdx.x, +blockDim.x, ... of its row (consecutive threads, consecutive
//   elements: coalesced), keeping its best (value, index); then warp shuffles and one
//   pass through shared memory reduce the block, the smaller index winning ties.
//   No dynamic shared memory.
//
// Napkin math (H100 SXM, 3.35 TB/s): 64 rows of Qwen2.5's 152,064 logits are 19.5 MB,
// ~6 us to read once, against ~4 MB/ms for the copy to pageable host memory plus the
// bf16 -> f32 conversion it replaces.

#include "common.cuh"
#include "sampling_common.cuh"

static_assert(QILIN_ARGMAX_THREADS % QILIN_WARP_SIZE == 0 &&
                  QILIN_ARGMAX_THREADS <= QILIN_MAX_THREADS_PER_BLOCK,
              "abi.h: QILIN_ARGMAX_THREADS must be whole warps");

// The host sampler's `clean`: NaN -> -inf, +inf -> f32::MAX (fmaxf/fminf ignore NaN).
QILIN_DEVICE float argmax_clean(float v) { return fminf(fmaxf(v, -INFINITY), 3.40282347e+38f); }

// (v, i) beats (best_v, best_i): a larger value, or an equal value at a smaller index.
QILIN_DEVICE bool argmax_better(float v, unsigned i, float best_v, unsigned best_i) {
    return v > best_v || (v == best_v && i < best_i);
}

// ids:    u32  [rows]        the chosen token of each row
// logits: bf16 [rows, cols]
extern "C" __global__ void __launch_bounds__(QILIN_ARGMAX_THREADS)
qilin_argmax_bf16(const QilinArgmaxParams p,
                  uint32_t* __restrict__ ids,
                  const bf16* __restrict__ logits) {
    QILIN_PDL_ENTRY();
    __shared__ float s_v[QILIN_ARGMAX_THREADS / QILIN_WARP_SIZE];
    __shared__ unsigned s_i[QILIN_ARGMAX_THREADS / QILIN_WARP_SIZE];
    if (blockDim.x != QILIN_ARGMAX_THREADS) {
        __trap();
    }
    const unsigned row = blockIdx.x;
    if (row >= p.rows) {
        return;
    }
    const bf16* x = logits + (size_t)row * p.cols;
    float best_v = -INFINITY;
    unsigned best_i = 0xffffffffu;
    for (unsigned i = threadIdx.x; i < p.cols; i += QILIN_ARGMAX_THREADS) {
        const float v = argmax_clean(__bfloat162float(x[i]));
        if (argmax_better(v, i, best_v, best_i)) {
            best_v = v;
            best_i = i;
        }
    }
#pragma unroll
    for (int offset = QILIN_WARP_SIZE / 2; offset > 0; offset /= 2) {
        const float v = __shfl_xor_sync(0xffffffffu, best_v, offset);
        const unsigned i = __shfl_xor_sync(0xffffffffu, best_i, offset);
        if (argmax_better(v, i, best_v, best_i)) {
            best_v = v;
            best_i = i;
        }
    }
    const unsigned warp = threadIdx.x / QILIN_WARP_SIZE;
    const unsigned lane = threadIdx.x % QILIN_WARP_SIZE;
    if (lane == 0) {
        s_v[warp] = best_v;
        s_i[warp] = best_i;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (unsigned w = 1; w < QILIN_ARGMAX_THREADS / QILIN_WARP_SIZE; ++w) {
            if (argmax_better(s_v[w], s_i[w], best_v, best_i)) {
                best_v = s_v[w];
                best_i = s_i[w];
            }
        }
        // Every index was -inf-or-better than the initial state, so best_i < cols unless
        // the row is empty (cols == 0), where 0 is the twin's answer too.
        ids[row] = best_i < p.cols ? best_i : 0u;
    }
}


// ---------------------------------------------------------------------------------------
// qilin_sample_bf16: sample_row (sampling_common.cuh) for each row, one block per row.
// Launch: grid = (rows, 1, 1), block = (QILIN_SAMPLE_THREADS, 1, 1), no dynamic shared
// memory.
//
// ids:    u32            [rows]        the chosen token of each row
// rows:   QilinSampleRow [rows]        how each row is sampled
// logits: bf16           [rows, cols]
extern "C" __global__ void __launch_bounds__(QILIN_SAMPLE_THREADS, 1)
qilin_sample_bf16(const QilinSampleParams p,
                  uint32_t* __restrict__ ids,
                  const QilinSampleRow* __restrict__ rows,
                  const bf16* __restrict__ logits) {
    QILIN_PDL_ENTRY();
    if (blockDim.x != QILIN_SAMPLE_THREADS) {
        __trap();
    }
    const unsigned row = blockIdx.x;
    if (row >= p.rows) {
        return;
    }
    const unsigned short* x =
        reinterpret_cast<const unsigned short*>(logits) + (size_t)row * p.cols;
    sample_row(rows[row], x, p.cols, ids + row);
}
