// Shared device toolkit for every Qilin kernel: bf16/fp16 conversions, 16-byte vector
// loads and stores, warp and block reductions, ceil_div. Nothing model-specific lives
// here; a helper moves in only once two kernel families need it.
//
// Conventions the helpers rely on:
//   - blockDim.x is a multiple of QILIN_WARP_SIZE and at most QILIN_MAX_THREADS_PER_BLOCK
//     (the warp reductions shuffle with a full mask);
//   - pointers given to load128/store128 are 16-byte aligned.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "abi.h"
#include "pdl.cuh"

#define QILIN_DEVICE __device__ __forceinline__

typedef __nv_bfloat16 bf16;
typedef __half f16;

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
    return (a + b - 1) / b;
}

// ---------------------------------------------------------------------------------------
// 16-byte vectors: eight bf16/fp16 values moved with one 128-bit memory instruction.

// Global loads of data the kernel never writes: eligible for the read-only cache path.
QILIN_DEVICE uint4 load128_readonly(const void* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
}

// Plain load, for buffers the same kernel may also write (e.g. the residual stream).
QILIN_DEVICE uint4 load128(const void* p) { return *reinterpret_cast<const uint4*>(p); }

QILIN_DEVICE void store128(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

// Unpacks eight bf16 (one uint4) into floats; the conversion is exact.
QILIN_DEVICE void bf16x8_to_float(uint4 v, float out[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// Packs eight floats into bf16, round-to-nearest-even (what the CPU twins do).
QILIN_DEVICE uint4 float_to_bf16x8(const float in[8]) {
    uint4 v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        h[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
    }
    return v;
}

QILIN_DEVICE void f16x8_to_float(uint4 v, float out[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

QILIN_DEVICE uint4 float_to_f16x8(const float in[8]) {
    uint4 v;
    __half2* h = reinterpret_cast<__half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        h[i] = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
    }
    return v;
}

// ---------------------------------------------------------------------------------------
// Reductions. The order of additions is fixed by blockDim, so a launch with the same
// shape is bit-for-bit reproducible.

QILIN_DEVICE float warp_reduce_sum(float v) {
#pragma unroll
    for (int offset = QILIN_WARP_SIZE / 2; offset > 0; offset /= 2) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

QILIN_DEVICE float warp_reduce_max(float v) {
#pragma unroll
    for (int offset = QILIN_WARP_SIZE / 2; offset > 0; offset /= 2) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

// Sum over the whole block, returned to every thread. Every warp reduces the per-warp
// partials itself, which saves the broadcast round trip through shared memory; the
// trailing barrier lets a kernel call this twice in a row safely.
QILIN_DEVICE float block_reduce_sum(float v) {
    __shared__ float partial[QILIN_MAX_THREADS_PER_BLOCK / QILIN_WARP_SIZE];
    const unsigned lane = threadIdx.x % QILIN_WARP_SIZE;
    const unsigned warp = threadIdx.x / QILIN_WARP_SIZE;
    const unsigned n_warps = ceil_div(blockDim.x, (unsigned)QILIN_WARP_SIZE);
    v = warp_reduce_sum(v);
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    v = lane < n_warps ? partial[lane] : 0.0f;
    v = warp_reduce_sum(v);
    __syncthreads();
    return v;
}

QILIN_DEVICE float block_reduce_max(float v) {
    __shared__ float partial[QILIN_MAX_THREADS_PER_BLOCK / QILIN_WARP_SIZE];
    const unsigned lane = threadIdx.x % QILIN_WARP_SIZE;
    const unsigned warp = threadIdx.x / QILIN_WARP_SIZE;
    const unsigned n_warps = ceil_div(blockDim.x, (unsigned)QILIN_WARP_SIZE);
    v = warp_reduce_max(v);
    if (lane == 0) {
        partial[warp] = v;
    }
    __syncthreads();
    v = lane < n_warps ? partial[lane] : -INFINITY;
    v = warp_reduce_max(v);
    __syncthreads();
    return v;
}
