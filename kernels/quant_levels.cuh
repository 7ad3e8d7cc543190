// The packed level layout shared by kernels/quant_linear.cu (GEMVs, dequantization) and
// kernels/quant_gemm.cu (the tensor-core GEMM): the layout and its semantics are
// described at the top of quant_linear.cu.
#pragma once

#include "common.cuh"

// Values of one 16-byte vector of levels.
template <int BITS>
struct Levels {
    static constexpr int kPerVec = 128 / BITS;                        // 32 or 16
    static constexpr int kVecsPerLane = QILIN_QGEMV_VALUES_PER_LANE / kPerVec;  // 1 or 2
    // biased_level's offset: 2^4, or 2^8 + 128 (the signed level's own bias).
    static constexpr float kBias = BITS == 4 ? 16.0f : 384.0f;
};

// Level e (compile-time) of a 32-bit word of levels (8 at 4 bits, 4 at 8 bits), exact.
template <int BITS>
QILIN_DEVICE float level_to_float(uint32_t word, int e) {
    uint32_t u;
    if (BITS == 4) {
        u = (word >> (4 * e)) & 0xFu;
    } else {
        u = ((word >> (8 * e)) & 0xFFu) ^ 0x80u;  // signed level + 128
    }
    const float biased = __int_as_float(0x4B000000 | (int)u);
    return biased - (BITS == 4 ? 8388608.0f : 8388736.0f);
}

QILIN_DEVICE uint4 load128_stream(const void* p) {
    return __ldcs(reinterpret_cast<const uint4*>(p));
}

// One 16-byte vector of levels (32 at 4 bits, 16 at 8) of one group, dequantized and
// rounded to bf16, stored to dst[0 .. per vector) (16-byte aligned, global or shared):
// the dequant kernel's output and the GEMM's shared-memory weight tile.
template <int BITS>
QILIN_DEVICE void store_dequantized(const uint4& v, float2 sm, bf16* dst) {
    constexpr int PER_WORD = 32 / BITS;
#pragma unroll
    for (int o = 0; o < Levels<BITS>::kPerVec / QILIN_VEC_ELEMS; ++o) {
        float w[QILIN_VEC_ELEMS];
#pragma unroll
        for (int e = 0; e < QILIN_VEC_ELEMS; ++e) {
            const int value = o * QILIN_VEC_ELEMS + e;  // compile-time after unrolling
            const uint32_t word = (&v.x)[value / PER_WORD];
            w[e] = fmaf(sm.x, level_to_float<BITS>(word, value % PER_WORD), sm.y);
        }
        store128(dst + o * QILIN_VEC_ELEMS, float_to_bf16x8(w));
    }
}
