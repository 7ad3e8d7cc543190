/*
 * The contract between the CUDA kernels and the Rust launchers.
 *
 * Plain C on purpose: nvcc includes it in every kernel file and build.rs runs
 * bindgen on it, so Rust never hand-copies a constant or a struct layout.
 * Rules that keep both sides agreeing on every target we build for:
 *   - only fixed-width scalar fields (uint32_t, int32_t, float), no pointers,
 *     no bool, no enums: their size is not fixed by C;
 *   - fields ordered so that no padding appears (the generated Rust checks the
 *     size and every offset at compile time);
 *   - params structs are passed to kernels by value; device pointers travel as
 *     separate kernel arguments, each with its shape in the kernel's comment.
 * Names: constants QILIN_*, structs Qilin*Params.
 */
#ifndef QILIN_ABI_H
#define QILIN_ABI_H

#include <stdint.h>

/* Tokens per paged KV-cache block. */
#define QILIN_BLOCK_SIZE 16

/* Input channels sharing one scale in W4A16 (AWQ/GPTQ compatible). */
#define QILIN_QUANT_GROUP_SIZE 128

/* bf16 elements in one 16-byte vector load: rows handed to vectorised kernels
 * must have a length that is a multiple of this, and 16-byte aligned starts. */
#define QILIN_VEC_ELEMS 8

/* Threads of one warp; block sizes are multiples of it. */
#define QILIN_WARP_SIZE 32

/* Upper bound on threads per block for every Qilin kernel. */
#define QILIN_MAX_THREADS_PER_BLOCK 1024

/* Row normalisation (kernels/norm.cu): one block per token, one 16-byte vector
 * per thread per step; each thread keeps at most this many vectors of its row
 * in registers, so hidden <= QILIN_MAX_THREADS_PER_BLOCK * QILIN_VEC_ELEMS *
 * QILIN_NORM_MAX_VECS_PER_THREAD (32768; Qwen2.5-7B needs 3584). */
#define QILIN_NORM_MAX_VECS_PER_THREAD 4
#define QILIN_NORM_MAX_HIDDEN 32768

/** Launch parameters of qilin_fused_add_rms_norm_bf16 and qilin_rms_norm_bf16. */
typedef struct QilinRmsNormParams {
    /** Rows to normalise; the grid has exactly this many blocks. */
    uint32_t n_tokens;
    /** Row length; a multiple of QILIN_VEC_ELEMS, at most QILIN_NORM_MAX_HIDDEN. */
    uint32_t hidden;
    /** Added to the mean square before the reciprocal square root. */
    float eps;
} QilinRmsNormParams;

#endif /* QILIN_ABI_H */
