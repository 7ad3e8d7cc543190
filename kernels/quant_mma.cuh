// The tensor-core W4A16 path's building blocks, shared by the GEMV
// (kernels/quant_gemv_mma.cu, whose header explains the design) and the GEMM on the same
// path (kernels/quant_gemm_mma.cu): 4-bit levels to bf16 A-fragment pairs by one LOP3,
// the matching x pairs by one PRMT, and the m16n8k16 mma.
#pragma once

#include "common.cuh"

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

// The GEMV kernels' and the GEMM's launch contract on the shapes (quant_gemv_mma.cu's
// header): whole steps, power-of-two groups of whole steps dividing the row,
// 1..=max_tokens tokens, some outputs.
QILIN_DEVICE bool qmma_shapes_ok(const QilinQuantGemvParams& p, unsigned max_tokens) {
    constexpr unsigned STEP = QILIN_QGEMV_MMA_STEP;
    return p.in_features % STEP == 0 && p.group_size % STEP == 0 && p.group_size != 0 &&
           (p.group_size & (p.group_size - 1)) == 0 && p.in_features % p.group_size == 0 &&
           p.n_tokens != 0 && p.n_tokens <= max_tokens && p.out_features != 0;
}

// Lane (g, t)'s share of the 16 rows from row0 (rows past the last read the last row; the
// kernels never store their outputs): chunk 4q + t of step q of rows row0 + g and row0 + g
// + 8 at lv[0][4q] and lv[1][4q], their (scale, min) pairs at sm[.][q >> group_shift].
// The two GEMVs of quant_gemv_mma.cu compute the same inline: moved here, their SASS
// changed (register allocation), and the GEMV's is the one its H200 parity runs verified.
struct QmmaLaneRows {
    const uint4* lv[2];
    const float2* sm[2];
    unsigned group_shift;
};

QILIN_DEVICE QmmaLaneRows qmma_lane_rows(const QilinQuantGemvParams& p, const uint8_t* levels,
                                         const float2* scale_min, unsigned row0, unsigned g,
                                         unsigned t) {
    const unsigned k = p.in_features;
    const unsigned last_row = p.out_features - 1;
    QmmaLaneRows r;
    r.group_shift = __ffs(p.group_size / QILIN_QGEMV_MMA_STEP) - 1;  // step -> group
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const unsigned row = min(row0 + g + 8 * i, last_row);
        r.lv[i] = reinterpret_cast<const uint4*>(levels) + (size_t)row * (k / 32) + t;
        r.sm[i] = scale_min + (size_t)row * (k / p.group_size);
    }
    return r;
}
