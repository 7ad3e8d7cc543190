// Row-wise data movement and the SwiGLU activation: embedding gather, gather of
// activation rows, a column block of a matrix (split of fused QKV / gate-up outputs),
// and SiLU-and-multiply. bf16 storage, f32 arithmetic.
//
// Semantics (CPU twins in src/backend/cpu/mod.rs, `impl Backend for CpuBackend`):
//   qilin_embedding_bf16    (CpuBackend::embedding, via CpuLinear::gather):
//     out[r][i] = table[ids[r]][i]                          r < n_rows, i < cols
//   qilin_gather_rows_bf16  (CpuBackend::gather_rows):
//     out[r][i] = src[rows[r]][i]
//   qilin_copy_cols_bf16    (one part of CpuBackend::split_cols):
//     out[r][i] = x[r][col0 + i]                           i < width
//   qilin_silu_mul_bf16     (CpuBackend::silu_mul):
//     g = f32(gate_up[r][i]), u = f32(gate_up[r][ffn + i])
//     out[r][i] = bf16_rne(g / (1 + expf(-g)) * u)         i < ffn
//   Copies are bit-exact. SiLU evaluates the twin's expression in the same order in f32
//   (IEEE division; expf is within 2 ulp of the host's exp): the result equals the
//   twin's to bf16 rounding, not bitwise.
//   An index >= src_rows traps (the launchers check every index on the host first, so
//   a trap means a launcher bug, not bad user input).
//
// Launch (the Rust launchers in src/backend/cuda/elementwise.rs check all of it):
//   grid  = (n_rows, blocks_per_row, 1): blockIdx.x is the row, so a row's index is read
//           once per block and every address inside a row is contiguous;
//   block = (QILIN_ELEMENTWISE_THREADS, 1, 1); the threads of the grid.y blocks of a row
//           stride over it in units of one 16-byte vector (8 bf16) when the row length,
//           the column offset and every base pointer allow it, else one element. The
//           unit is chosen per row, uniformly for the whole block; the stride loop
//           covers the row whatever blocks_per_row is (the launcher sizes it so each
//           thread moves one unit: abi.rs elementwise_blocks_per_row).
//   No shared memory, no synchronisation.
//
// Napkin math (H100 SXM, ~3.35 TB/s HBM): every kernel here moves each byte once.
//   embedding/gather, prefill of 2048 tokens x 3584: 2 x 14.7 MB -> ~9 us;
//   silu_mul, 2048 x 18944: 155 MB read + 78 MB written -> ~70 us;
//   copy_cols of a fused QKV [2048, 4608]: 18.9 MB in, 18.9 MB out -> ~11 us for all parts.
//   Decode-sized rows (one to a few hundred KB) are bound by the ~3 us launch latency.

#include "common.cuh"

QILIN_DEVICE bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// dst[i] = src[i] for i < len, by the threads of this row's grid.y blocks.
QILIN_DEVICE void copy_row(bf16* __restrict__ dst, const bf16* __restrict__ src, uint32_t len) {
    const uint32_t first = blockIdx.y * blockDim.x + threadIdx.x;
    const uint32_t stride = gridDim.y * blockDim.x;
    if (len % QILIN_VEC_ELEMS == 0 && aligned16(dst) && aligned16(src)) {
        const uint32_t n_vec = len / QILIN_VEC_ELEMS;
        for (uint32_t v = first; v < n_vec; v += stride) {
            const size_t at = (size_t)v * QILIN_VEC_ELEMS;
            store128(dst + at, load128_readonly(src + at));
        }
    } else {
        for (uint32_t i = first; i < len; i += stride) {
            dst[i] = src[i];
        }
    }
}

// out[r] = src[index[r]]: the body of both gather kernels.
QILIN_DEVICE void gather_rows(const QilinGatherRowsParams p,
                              bf16* __restrict__ out,
                              const bf16* __restrict__ src,
                              const uint32_t* __restrict__ index) {
    const uint32_t r = blockIdx.x;
    if (r >= p.n_rows) {
        return;
    }
    const uint32_t from = __ldg(index + r);
    if (from >= p.src_rows) {
        __trap();
    }
    copy_row(out + (size_t)r * p.cols, src + (size_t)from * p.cols, p.cols);
}

// out:   bf16 [n_rows, cols]      embeddings of the batch's tokens
// table: bf16 [src_rows, cols]    the embedding matrix [vocab, hidden]
// ids:   u32  [n_rows]            token ids, each < src_rows
extern "C" __global__ void __launch_bounds__(QILIN_ELEMENTWISE_THREADS)
qilin_embedding_bf16(const QilinGatherRowsParams p,
                     bf16* __restrict__ out,
                     const bf16* __restrict__ table,
                     const uint32_t* __restrict__ ids) {
    QILIN_PDL_ENTRY();
    gather_rows(p, out, table, ids);
}

// out:  bf16 [n_rows, cols]       the selected rows, in the order of `rows`
// src:  bf16 [src_rows, cols]     activations (must not overlap out)
// rows: u32  [n_rows]             row indices into src, each < src_rows; repeats allowed
extern "C" __global__ void __launch_bounds__(QILIN_ELEMENTWISE_THREADS)
qilin_gather_rows_bf16(const QilinGatherRowsParams p,
                       bf16* __restrict__ out,
                       const bf16* __restrict__ src,
                       const uint32_t* __restrict__ rows) {
    QILIN_PDL_ENTRY();
    gather_rows(p, out, src, rows);
}

// out: bf16 [n_rows, width]       columns col0 .. col0 + width of x
// x:   bf16 [n_rows, src_cols]    (must not overlap out); col0 + width <= src_cols
extern "C" __global__ void __launch_bounds__(QILIN_ELEMENTWISE_THREADS)
qilin_copy_cols_bf16(const QilinCopyColsParams p,
                     bf16* __restrict__ out,
                     const bf16* __restrict__ x) {
    QILIN_PDL_ENTRY();
    const uint32_t r = blockIdx.x;
    if (p.col0 + p.width > p.src_cols || p.col0 + p.width < p.col0) {
        __trap();
    }
    if (r >= p.n_rows) {
        return;
    }
    copy_row(out + (size_t)r * p.width, x + (size_t)r * p.src_cols + p.col0, p.width);
}

// SiLU(g) * u in the twin's order: (g / (1 + e^-g)) * u. Large negative g gives
// e^-g = inf and g / inf = -0, as on the host; no fast-math intrinsics.
QILIN_DEVICE float silu_mul_one(float g, float u) {
    return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

// out:     bf16 [n_rows, ffn]        silu(gate) * up
// gate_up: bf16 [n_rows, 2 * ffn]    gate in columns 0 .. ffn, up in ffn .. 2 * ffn
extern "C" __global__ void __launch_bounds__(QILIN_ELEMENTWISE_THREADS)
qilin_silu_mul_bf16(const QilinSiluMulParams p,
                    bf16* __restrict__ out,
                    const bf16* __restrict__ gate_up) {
    QILIN_PDL_ENTRY();
    const uint32_t r = blockIdx.x;
    if (r >= p.n_rows) {
        return;
    }
    const bf16* gate = gate_up + (size_t)r * 2 * p.ffn;
    const bf16* up = gate + p.ffn;
    bf16* dst = out + (size_t)r * p.ffn;
    const uint32_t first = blockIdx.y * blockDim.x + threadIdx.x;
    const uint32_t stride = gridDim.y * blockDim.x;
    if (p.ffn % QILIN_VEC_ELEMS == 0 && aligned16(gate) && aligned16(up) && aligned16(dst)) {
        const uint32_t n_vec = p.ffn / QILIN_VEC_ELEMS;
        for (uint32_t v = first; v < n_vec; v += stride) {
            const size_t at = (size_t)v * QILIN_VEC_ELEMS;
            float g[8];
            float u[8];
            bf16x8_to_float(load128_readonly(gate + at), g);
            bf16x8_to_float(load128_readonly(up + at), u);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                g[i] = silu_mul_one(g[i], u[i]);
            }
            store128(dst + at, float_to_bf16x8(g));
        }
    } else {
        for (uint32_t i = first; i < p.ffn; i += stride) {
            const float g = __bfloat162float(gate[i]);
            const float u = __bfloat162float(up[i]);
            dst[i] = __float2bfloat16_rn(silu_mul_one(g, u));
        }
    }
}
