// RMSNorm, optionally fused with the residual add that precedes it in every transformer
// layer. bf16 activations and weights, f32 arithmetic.
//
// Semantics (the CPU twin in src/backend/cpu/ implements exactly this), for each token
// t < n_tokens, with H = hidden and all arithmetic in f32 unless rounding is stated:
//   fused (qilin_fused_add_rms_norm_bf16):
//     if x != NULL:  residual[t][i] = bf16_rne(f32(residual[t][i]) + f32(x[t][i]))
//                    (stored back to residual; the rounded value is used below)
//     r = residual[t]
//   plain (qilin_rms_norm_bf16):
//     r = input[t]                       (input is only read)
//   then, for both:
//     inv_rms   = 1 / sqrt(sum_i f32(r[i])^2 / H + eps)
//     out[t][i] = bf16_rne(f32(r[i]) * inv_rms * f32(weight[i]))
//   bf16_rne is round-to-nearest-even. The product is rounded once: HF's Llama/Qwen2
//   RMSNorm instead rounds r * inv_rms to bf16 before the weight multiply, a difference
//   of at most about one bf16 ulp. The device sum of squares uses a tree order and
//   rsqrtf (2 ulp), so results agree with an f32 CPU loop to bf16 rounding, not bitwise.
//
// Launch (the Rust launcher checks all of it):
//   grid  = (n_tokens, 1, 1): one block per token; a whole row stays in one block, so
//           the sum of squares needs one block reduction and no second kernel;
//   block = (threads, 1, 1): a multiple of 32, at most 1024, and
//           threads * QILIN_NORM_MAX_VECS_PER_THREAD * 8 >= hidden. Smallest latency:
//           threads = round_up(hidden / 8, 32), one 16-byte vector per thread;
//   hidden % 8 == 0, hidden <= QILIN_NORM_MAX_HIDDEN, every pointer 16-byte aligned.
//   No dynamic shared memory.
// __launch_bounds__(1024, 1): a 1024-thread launch must always fit (<= 64 registers);
// without the explicit 1 block per SM, ptxas 13.0 squeezed sm_80 to 32 registers and spilled.
// Each thread keeps its slice of the row in registers between the reduction and the
// write, so the row is read from global memory once (x, residual, weight) and written
// once (residual, out): the kernel is bound by that traffic.

#include "common.cuh"

// One row: r = in (+ x, stored to sum_out), then out = r * inv_rms * weight.
// in and sum_out alias in the fused kernel: every element is read and then written by
// the same thread, so no __restrict__ on them.
QILIN_DEVICE void rms_norm_row(const QilinRmsNormParams p,
                               bf16* __restrict__ out,
                               const bf16* in,
                               const bf16* __restrict__ x,
                               bf16* sum_out,
                               const bf16* __restrict__ weight) {
    const unsigned t = blockIdx.x;
    const unsigned n_vec = p.hidden / QILIN_VEC_ELEMS;
    // A launch that violates the contract would leave part of the row unwritten;
    // failing loudly beats feeding stale activations to the next layer.
    if (p.hidden % QILIN_VEC_ELEMS != 0 || blockDim.x % QILIN_WARP_SIZE != 0 ||
        n_vec > blockDim.x * QILIN_NORM_MAX_VECS_PER_THREAD) {
        __trap();
    }
    if (t >= p.n_tokens) {
        return;
    }
    const size_t row = (size_t)t * p.hidden;

    uint4 cached[QILIN_NORM_MAX_VECS_PER_THREAD];
    float sum_sq = 0.0f;
#pragma unroll
    for (int k = 0; k < QILIN_NORM_MAX_VECS_PER_THREAD; ++k) {
        const unsigned v = threadIdx.x + k * blockDim.x;
        if (v < n_vec) {
            const size_t at = row + (size_t)v * QILIN_VEC_ELEMS;
            uint4 packed = load128(in + at);
            float r[8];
            bf16x8_to_float(packed, r);
            if (x != nullptr) {
                float xs[8];
                bf16x8_to_float(load128_readonly(x + at), xs);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    r[i] += xs[i];
                }
                packed = float_to_bf16x8(r);
                store128(sum_out + at, packed);
                // Square the stored (rounded) values, as the semantics say.
                bf16x8_to_float(packed, r);
            }
            cached[k] = packed;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                sum_sq += r[i] * r[i];
            }
        }
    }

    const float total = block_reduce_sum(sum_sq);
    const float inv_rms = rsqrtf(total / (float)p.hidden + p.eps);

#pragma unroll
    for (int k = 0; k < QILIN_NORM_MAX_VECS_PER_THREAD; ++k) {
        const unsigned v = threadIdx.x + k * blockDim.x;
        if (v < n_vec) {
            const size_t at = (size_t)v * QILIN_VEC_ELEMS;
            float r[8];
            float w[8];
            bf16x8_to_float(cached[k], r);
            bf16x8_to_float(load128_readonly(weight + at), w);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                r[i] = r[i] * inv_rms * w[i];
            }
            store128(out + row + at, float_to_bf16x8(r));
        }
    }
}

// out:      bf16 [n_tokens, hidden]  normalised rows (must not overlap residual or x)
// residual: bf16 [n_tokens, hidden]  read; when x != NULL updated in place to residual + x
// x:        bf16 [n_tokens, hidden]  the sub-layer output to add, or NULL for no add
// weight:   bf16 [hidden]            the norm's gain
extern "C" __global__ void __launch_bounds__(QILIN_MAX_THREADS_PER_BLOCK, 1)
qilin_fused_add_rms_norm_bf16(const QilinRmsNormParams p,
                              bf16* __restrict__ out,
                              bf16* residual,
                              const bf16* __restrict__ x,
                              const bf16* __restrict__ weight) {
    QILIN_PDL_ENTRY();
    rms_norm_row(p, out, residual, x, residual, weight);
}

// out:    bf16 [n_tokens, hidden]  normalised rows (must not overlap input)
// input:  bf16 [n_tokens, hidden]  only read
// weight: bf16 [hidden]            the norm's gain
extern "C" __global__ void __launch_bounds__(QILIN_MAX_THREADS_PER_BLOCK, 1)
qilin_rms_norm_bf16(const QilinRmsNormParams p,
                    bf16* __restrict__ out,
                    const bf16* __restrict__ input,
                    const bf16* __restrict__ weight) {
    QILIN_PDL_ENTRY();
    rms_norm_row(p, out, input, nullptr, nullptr, weight);
}
