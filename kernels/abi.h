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

/* Dense bf16 linear layers (kernels/gemv.cu). Up to QILIN_GEMV_MAX_TOKENS rows of x
 * go through qilin_gemv_bf16, which streams W once for all of them; larger batches
 * (prefill) go through cuBLAS. One block of QILIN_GEMV_THREADS threads computes
 * QILIN_GEMV_ROWS_PER_BLOCK output channels: each warp owns QILIN_GEMV_ROWS_PER_WARP
 * of them, and each lane loads QILIN_GEMV_VECS_PER_LANE 16-byte vectors of each of its
 * rows per tile of x. QILIN_GEMV_ROWS_PER_BLOCK is
 * QILIN_GEMV_THREADS / QILIN_WARP_SIZE * QILIN_GEMV_ROWS_PER_WARP (checked on both
 * sides). */
#define QILIN_GEMV_MAX_TOKENS 8
#define QILIN_GEMV_THREADS 256
#define QILIN_GEMV_ROWS_PER_WARP 2
#define QILIN_GEMV_VECS_PER_LANE 4
/* qilin_gemv_mma_bf16 (tensor cores, 1..QILIN_GEMV_MAX_TOKENS rows of x; opt-in until
 * verified): a block of QILIN_GEMV_MMA_THREADS threads computes
 * QILIN_GEMV_MMA_ROWS_PER_BLOCK output channels, its warps splitting in_features, each
 * warp walking its share in steps of 32 values, QILIN_GEMV_MMA_UNROLL steps' loads in
 * flight at once. */
#define QILIN_GEMV_MMA_THREADS 256
#define QILIN_GEMV_MMA_ROWS_PER_BLOCK 32
#define QILIN_GEMV_MMA_UNROLL 4
#define QILIN_GEMV_ROWS_PER_BLOCK 16

/* Threads per block of qilin_bias_round_bf16 (grid-stride loop). */
#define QILIN_BIAS_THREADS 256

/** Launch parameters of qilin_gemv_bf16: out[n_tokens, out_features] =
 *  x[n_tokens, in_features] W[out_features, in_features]^T (+ bias). */
typedef struct QilinGemvParams {
    /** Rows of x and out, 1..=QILIN_GEMV_MAX_TOKENS. */
    uint32_t n_tokens;
    /** Row length of x and W; a multiple of QILIN_VEC_ELEMS. */
    uint32_t in_features;
    /** Rows of W (output channels); the grid has ceil(out_features /
     *  QILIN_GEMV_ROWS_PER_BLOCK) blocks. */
    uint32_t out_features;
} QilinGemvParams;

/** Launch parameters of qilin_bias_round_bf16: out[t][o] = bf16(acc[t][o] + bias[o]). */
typedef struct QilinBiasParams {
    /** Rows of out. */
    uint32_t n_tokens;
    /** Row length of out and length of bias. */
    uint32_t out_features;
} QilinBiasParams;

/* Quantized linear layers (kernels/quant_linear.cu). Weights are integer levels of 4 bits
 * (unsigned, two per byte) or 8 bits (signed) with one (scale, min) f32 pair per group of
 * group_size consecutive input channels: w = fma(scale, level, min). Up to
 * QILIN_GEMV_MAX_TOKENS rows of x go through qilin_qgemv_w{4,8}_bf16, which streams the
 * levels once; larger batches dequantize the weight to bf16 (qilin_dequant_w{4,8}_bf16)
 * for cuBLAS. Each lane of the GEMV takes QILIN_QGEMV_VALUES_PER_LANE consecutive input
 * channels per tile (one 16-byte vector of 4-bit levels, two of 8-bit), so in_features
 * must be a multiple of it and group_size a multiple of 16 bytes of levels (32 values at
 * 4 bits, 16 at 8) that divides in_features. One block of QILIN_QGEMV_THREADS threads
 * computes QILIN_QGEMV_ROWS_PER_BLOCK output channels, QILIN_QGEMV_ROWS_PER_WARP per
 * warp (QILIN_QGEMV_ROWS_PER_BLOCK = QILIN_QGEMV_THREADS / QILIN_WARP_SIZE *
 * QILIN_QGEMV_ROWS_PER_WARP, checked on both sides). */
#define QILIN_QGEMV_THREADS 128
#define QILIN_QGEMV_ROWS_PER_WARP 4
#define QILIN_QGEMV_ROWS_PER_BLOCK 16
#define QILIN_QGEMV_VALUES_PER_LANE 32
/* Batches of up to QILIN_QGEMV_SMALL_MAX_TOKENS rows (batch-1 decode) take
 * qilin_qgemv_small_w{4,8}_bf16, compiled for at least QILIN_QGEMV_SMALL_MIN_BLOCKS_W{4,8}
 * resident blocks per multiprocessor (a register cap: 96 and 168 registers, the most
 * each fits without spilling) so that enough levels stream in. */
#define QILIN_QGEMV_SMALL_MAX_TOKENS 2
#define QILIN_QGEMV_SMALL_MIN_BLOCKS_W4 5
#define QILIN_QGEMV_SMALL_MIN_BLOCKS_W8 3

/* qilin_qgemv_mma_w4_bf16 (kernels/quant_gemv_mma.cu): the 4-bit GEMV of 1..=
 * QILIN_QGEMV_MMA_MAX_TOKENS rows on tensor cores, for groups that are a multiple of
 * QILIN_QGEMV_MMA_STEP input channels. A block of QILIN_QGEMV_MMA_THREADS threads owns
 * QILIN_QGEMV_MMA_ROWS output channels (one mma tile of rows) and one chunk of up to
 * QILIN_GEMV_MAX_TOKENS tokens (the mma's 8 columns); its warps split the input
 * dimension in steps of QILIN_QGEMV_MMA_STEP channels, QILIN_QGEMV_MMA_DEPTH steps of
 * levels in flight per warp; compiled for QILIN_QGEMV_MMA_MIN_BLOCKS resident blocks. */
#define QILIN_QGEMV_MMA_MAX_TOKENS 64
#define QILIN_QGEMV_MMA_THREADS 256
#define QILIN_QGEMV_MMA_ROWS 16
#define QILIN_QGEMV_MMA_STEP 128
#define QILIN_QGEMV_MMA_DEPTH 4
#define QILIN_QGEMV_MMA_MIN_BLOCKS 2

/* qilin_qgemv_mma_splitk_w4_bf16 (kernels/quant_gemv_mma.cu; opt-in with
 * QILIN_CUDA_QGEMV_MMA2=1): the same layers, rows per block (QILIN_QGEMV_MMA_ROWS) and
 * steps (QILIN_QGEMV_MMA_STEP) as qilin_qgemv_mma_w4_bf16, in blocks of
 * QILIN_QGEMV_SPLITK_THREADS threads, each warp streaming QILIN_QGEMV_SPLITK_STAGES steps
 * of levels through a shared-memory ring; compiled for QILIN_QGEMV_SPLITK_MIN_BLOCKS
 * resident blocks. Grid (row tiles, splits): grid.y splits the input dimension into
 * contiguous ranges of steps, at most QILIN_QGEMV_SPLITK_MAX_SPLITS, and the last block of
 * a row tile to finish adds the splits' partial sums in split order (one u32 counter per
 * row tile, reset by that block; QILIN_QGEMV_SPLITK_PARTIALS f32 per block). */
#define QILIN_QGEMV_SPLITK_THREADS 128
#define QILIN_QGEMV_SPLITK_STAGES 4
#define QILIN_QGEMV_SPLITK_MIN_BLOCKS 8
#define QILIN_QGEMV_SPLITK_MAX_SPLITS 8
#define QILIN_QGEMV_SPLITK_PARTIALS 128

/* Tensor-core quantized GEMM qilin_qgemm_w{4,8}_bf16 (any number of tokens,
 * kernels/quant_gemm.cu): a block computes QILIN_QGEMM_BLOCK_M tokens x QILIN_QGEMM_BLOCK_N
 * output channels, walking the input in steps of QILIN_QGEMM_BLOCK_K channels (one 16-byte
 * vector of 4-bit levels per channel row); QILIN_QGEMM_THREADS threads (2 x 2 warps of
 * 32 x 64), compiled for QILIN_QGEMM_MIN_BLOCKS resident blocks. Each thread keeps
 * QILIN_QGEMM_LEVEL_STEPS_W4 (or _W8) steps of its row's levels in flight, x streams through
 * QILIN_QGEMM_X_STAGES shared stages. grid.z splits the input into that many contiguous
 * ranges of steps (at most QILIN_QGEMM_MAX_SPLITS, each at least
 * QILIN_QGEMM_MIN_SPLIT_STEPS steps); the last block of a tile adds the splits'
 * QILIN_QGEMM_PARTIALS f32 sums each in split order (one u32 counter per tile, reset by
 * that block). */
#define QILIN_QGEMM_BLOCK_M 64
#define QILIN_QGEMM_BLOCK_N 128
#define QILIN_QGEMM_BLOCK_K 32
#define QILIN_QGEMM_THREADS 128
#define QILIN_QGEMM_MIN_BLOCKS 3
#define QILIN_QGEMM_LEVEL_STEPS_W4 8
#define QILIN_QGEMM_LEVEL_STEPS_W8 4
#define QILIN_QGEMM_X_STAGES 4
#define QILIN_QGEMM_MAX_SPLITS 8
#define QILIN_QGEMM_MIN_SPLIT_STEPS 8
#define QILIN_QGEMM_PARTIALS 8192

/* qilin_qgemm_mma_w4_bf16 (kernels/quant_gemm_mma.cu; opt-in with QILIN_CUDA_QGEMM_MMA=1):
 * the 4-bit GEMM on the tensor-core GEMV's path (levels straight into A fragments), for
 * the layers qilin_qgemv_mma_w4_bf16 takes (groups a power of two, a multiple of
 * QILIN_QGEMV_MMA_STEP). A block of QILIN_QGEMM_MMA_THREADS threads (8 warps of 16 rows)
 * computes QILIN_QGEMM_MMA_ROWS output channels x QILIN_QGEMM_MMA_TOKENS tokens, walking the
 * input in steps of QILIN_QGEMV_MMA_STEP channels; x streams through QILIN_QGEMM_MMA_X_STAGES
 * shared stages (QILIN_QGEMM_MMA_SMEM_BYTES of dynamic shared memory with the per-step x
 * sums), each lane keeps QILIN_QGEMM_MMA_DEPTH steps of levels in flight. */
#define QILIN_QGEMM_MMA_THREADS 256
#define QILIN_QGEMM_MMA_ROWS 128
#define QILIN_QGEMM_MMA_TOKENS 64
#define QILIN_QGEMM_MMA_X_STAGES 3
#define QILIN_QGEMM_MMA_DEPTH 3
#define QILIN_QGEMM_MMA_MIN_BLOCKS 1
/* Shared row of one token in a stage: 128 channels + 8 of padding (bf16 values). */
#define QILIN_QGEMM_MMA_X_LD 136
/* X_STAGES x TOKENS x X_LD bf16 values, then 2 x TOKENS f32 sums (checked in the kernel). */
#define QILIN_QGEMM_MMA_SMEM_BYTES 52736

/* Threads per block of qilin_dequant_w{4,8}_bf16 (grid-stride loop, one 16-byte vector
 * of levels per thread per step). */
#define QILIN_DEQUANT_THREADS 256

/** Launch parameters of qilin_qgemv_w{4,8}_bf16 and qilin_qgemm_w{4,8}_bf16:
 *  out[n_tokens, out_features] = x[n_tokens, in_features] W^T (+ bias), W the
 *  dequantized levels [out_features, in_features]. */
typedef struct QilinQuantGemvParams {
    /** Rows of x and out: 1..=QILIN_GEMV_MAX_TOKENS for the GEMV, any for the GEMM (the
     *  grid has ceil(n_tokens / QILIN_QGEMM_BLOCK_M) blocks in y). */
    uint32_t n_tokens;
    /** Row length of x and W; a multiple of QILIN_QGEMV_VALUES_PER_LANE and of group_size. */
    uint32_t in_features;
    /** Rows of W; the GEMV's grid has ceil(out_features / QILIN_QGEMV_ROWS_PER_BLOCK)
     *  blocks, the GEMM's ceil(out_features / QILIN_QGEMM_BLOCK_N) in x. */
    uint32_t out_features;
    /** Input channels per (scale, min) pair. */
    uint32_t group_size;
} QilinQuantGemvParams;

/** Launch parameters of qilin_dequant_w4_bf16 and qilin_dequant_w8_bf16:
 *  out[r][c] = bf16(fma(scale, level, min)) for r < rows, c < cols. */
typedef struct QilinDequantParams {
    /** Rows of the weight (output channels) dequantized by this launch. */
    uint32_t rows;
    /** Values per row; a multiple of the 16-byte vector of levels and of group_size. */
    uint32_t cols;
    /** Values per (scale, min) pair. */
    uint32_t group_size;
} QilinDequantParams;

/* Row-wise copies and SiLU-and-multiply (kernels/elementwise.cu): threads per block.
 * grid.x is the row; grid.y blocks of this many threads cover one row, one 16-byte
 * vector (QILIN_VEC_ELEMS bf16) per thread when the row allows it, else one element. */
#define QILIN_ELEMENTWISE_THREADS 256

/** Launch parameters of qilin_embedding_bf16 and qilin_gather_rows_bf16:
 *  out[r] = src[index[r]] for r < n_rows. */
typedef struct QilinGatherRowsParams {
    /** Rows of out (entries of the index array); the grid has this many in x. */
    uint32_t n_rows;
    /** Values per row of src and out. */
    uint32_t cols;
    /** Rows of src; an index >= src_rows traps. */
    uint32_t src_rows;
} QilinGatherRowsParams;

/** Launch parameters of qilin_copy_cols_bf16: out[r] = x[r][col0 .. col0 + width]. */
typedef struct QilinCopyColsParams {
    /** Rows of x and out; the grid has this many in x. */
    uint32_t n_rows;
    /** Values per row of x. */
    uint32_t src_cols;
    /** First column copied; col0 + width <= src_cols. */
    uint32_t col0;
    /** Values per row of out. */
    uint32_t width;
} QilinCopyColsParams;

/** Launch parameters of qilin_silu_mul_bf16: out[r] = silu(gate[r]) * up[r]. */
typedef struct QilinSiluMulParams {
    /** Rows; the grid has this many in x. */
    uint32_t n_rows;
    /** Values per row of out; rows of gate_up hold 2 * ffn (gate first). */
    uint32_t ffn;
} QilinSiluMulParams;

/* RoPE + KV-cache write (kernels/rope.cu): one block per token, at most this many
 * threads; head_dim must be a multiple of 2 * QILIN_VEC_ELEMS. */
#define QILIN_ROPE_MAX_THREADS 256

/** Launch parameters of qilin_rope_store_kv_bf16. */
typedef struct QilinRopeParams {
    /** Tokens (rows of q, k, v); the grid has exactly this many blocks. */
    uint32_t n_tokens;
    /** Query heads per token. */
    uint32_t num_heads;
    /** Key/value heads per token. */
    uint32_t num_kv_heads;
    /** Values per head; a multiple of 2 * QILIN_VEC_ELEMS. */
    uint32_t head_dim;
    /** Rows (positions) of the cos/sin tables; a position >= table_len traps. */
    uint32_t table_len;
    /** Rows of one layer's key/value cache (num_blocks * QILIN_BLOCK_SIZE); a slot >=
     *  num_slots traps, except QILIN_NO_SLOT. */
    uint32_t num_slots;
} QilinRopeParams;

/* A slot_mapping entry whose token is rotated but not stored in the cache: the padding
 * rows of a decode step replayed through a CUDA graph captured for a larger batch. */
#define QILIN_NO_SLOT 0xFFFFFFFFu

/* Paged attention (kernels/attention_decode.cu, kernels/attention_prefill.cu). */

/* Largest head_dim any attention kernel takes (head_dim % QILIN_VEC_ELEMS == 0 too). */
#define QILIN_ATTN_MAX_HEAD_DIM 256

/* Decode kernel: threads per block; query heads of one KV head handled by one block
 * (their q rows and accumulators live in registers). A group with more heads than this
 * is split into ceil(group / QILIN_ATTN_DECODE_MAX_GROUP) chunks over grid.y. */
#define QILIN_ATTN_DECODE_THREADS 128
#define QILIN_ATTN_DECODE_MAX_GROUP 8

/* Tensor-core decode kernel (head_dim 64 or 128): threads per block (each warp takes one
 * 16-key cache block at a time) and query heads per block (the 16 rows of an mma tile;
 * larger groups run in chunks over grid.y). */
#define QILIN_ATTN_DECODE_MMA_THREADS 128
#define QILIN_ATTN_DECODE_MMA_MAX_GROUP 16

/* Pipelined tensor-core decode kernel with the split merge folded in
 * (kernels/attention_decode_pipe.cu; head_dim 64 or 128; opt-in QILIN_ATTN_DECODE_PIPE=1):
 * threads per block (4 warps, each taking one 16-key cache block per step, as the mma
 * kernel), 16-key blocks each warp keeps in flight (its ring of shared K/V buffers), and
 * the dynamic shared memory of the ring: 4 warps * STAGES * 2 (K, V) * 16 keys *
 * (head_dim + 8) bf16 * 2 bytes. The split merge counts finished splits in one u32 per
 * (sequence, grid.y block row); the device keeps QILIN_ATTN_DECODE_PIPE_MAX_COUNTERS of
 * them (zeroed once, each reset by the block that merges). Same group bound as the mma
 * kernel (QILIN_ATTN_DECODE_MMA_MAX_GROUP). */
#define QILIN_ATTN_DECODE_PIPE_THREADS 128
#define QILIN_ATTN_DECODE_PIPE_STAGES 3
#define QILIN_ATTN_DECODE_PIPE_HD128_SMEM_BYTES 104448
#define QILIN_ATTN_DECODE_PIPE_HD64_SMEM_BYTES 55296
#define QILIN_ATTN_DECODE_PIPE_MAX_COUNTERS 8192

/* Prefill (tensor-core) kernels: threads per block (4 warps x 32 query rows), rows per
 * query tile, and the head_dim-64 kernel's keys per tile (a multiple of
 * QILIN_BLOCK_SIZE). */
#define QILIN_ATTN_PREFILL_THREADS 128
#define QILIN_ATTN_PREFILL_WIDE_BLOCK_M 128
#define QILIN_ATTN_PREFILL_BLOCK_N 64
/* The head_dim-128 prefill kernel (qilin_attention_prefill_v2_hd128_bf16): keys per tile
 * and its dynamic shared memory (the Q tile and two buffers each of K and V, 136-bf16
 * rows: (128 + 4 * 32) * 136 * 2 bytes). */
#define QILIN_ATTN_PREFILL_V2_HD128_BLOCK_N 32
#define QILIN_ATTN_PREFILL_V2_HD128_SMEM_BYTES 69632

/* Plain-FMA fallback kernel: one warp per (query row, head). */
#define QILIN_ATTN_SIMPLE_THREADS 32

/* Greedy argmax (kernels/sampling.cu): threads per block, one block per logits row. */
#define QILIN_ARGMAX_THREADS 512

/** Launch parameters of qilin_argmax_bf16: ids[r] = argmax of logits[r][0 .. cols). */
typedef struct QilinArgmaxParams {
    /** Rows of logits (sequences that sample this step); the grid's size. */
    uint32_t rows;
    /** Row length: the vocabulary. */
    uint32_t cols;
} QilinArgmaxParams;

/* Device sampling (kernels/sampling.cu qilin_sample_bf16): threads per block, one block per
 * logits row. */
#define QILIN_SAMPLE_THREADS 512
/* Consecutive elements per thread in each tile of the final token-id-order walk (a tile is
 * QILIN_SAMPLE_THREADS * QILIN_SAMPLE_WALK_ITEMS elements). */
#define QILIN_SAMPLE_WALK_ITEMS 8

/** Launch parameters of qilin_sample_bf16. */
typedef struct QilinSampleParams {
    /** Rows of logits; the grid's size. */
    uint32_t rows;
    /** Row length: the vocabulary. */
    uint32_t cols;
} QilinSampleParams;

/** How one row of qilin_sample_bf16 is sampled (Rust: backend::RowSampling, converted). */
typedef struct QilinSampleRow {
    /** The step's uniform draw, in [0, 1). */
    double u;
    /** 1/T as the host computes it (engine::sampler::inv_temperature); 0: greedy. */
    float inv_t;
    /** 0 or >= cols: off. */
    uint32_t top_k;
    /** >= 1: off; the kernel raises it to at least FLT_MIN as the host does. */
    float top_p;
    /** <= 0: off; above 1 counts as 1. */
    float min_p;
} QilinSampleRow;

/* Split sampling (kernels/sampling_split.cu, qilin_argmax_split_bf16 and
 * qilin_sample_split_bf16; opt-in with QILIN_CUDA_SAMPLE_SPLIT=1): each logits row is cut
 * into `splits` chunks of `chunk` elements, one block of QILIN_SAMPLE_THREADS threads each,
 * every thread holding QILIN_SAMPLE_SPLIT_VECS 16-byte loads (8 keys each) in registers;
 * the last block of a row to finish merges the row. */
#define QILIN_SAMPLE_SPLIT_VECS 3
/* Most elements one block takes: QILIN_SAMPLE_THREADS * QILIN_SAMPLE_SPLIT_VECS * 8. */
#define QILIN_SAMPLE_SPLIT_CHUNK 12288
/* Most blocks per row: rows longer than this many chunks (196,608) take qilin_sample_bf16. */
#define QILIN_SAMPLE_SPLIT_MAX_BLOCKS 16
/* Each block's candidates: the keys of its chunk at or above its TOP-th largest, ties
 * included while they fit CAP slots (beyond: only the keys above it). Rows with top_k
 * above TOP, or with min-p but neither top-k nor top-p, take the one-block algorithm. */
#define QILIN_SAMPLE_SPLIT_TOP 128
#define QILIN_SAMPLE_SPLIT_CAP 256
/* Rows per launch: one merge counter each, kept by the device (zero between launches). */
#define QILIN_SAMPLE_SPLIT_MAX_ROWS 1024

/** Launch parameters of qilin_argmax_split_bf16 and qilin_sample_split_bf16. */
typedef struct QilinSampleSplitParams {
    /** Rows of logits, at most QILIN_SAMPLE_SPLIT_MAX_ROWS; gridDim.x. */
    uint32_t rows;
    /** Row length: the vocabulary, at least 1. */
    uint32_t cols;
    /** Blocks per row (gridDim.y), 1 to QILIN_SAMPLE_SPLIT_MAX_BLOCKS. */
    uint32_t splits;
    /** Elements per block: a multiple of 8, at most QILIN_SAMPLE_SPLIT_CHUNK, with
     * splits * chunk >= cols. */
    uint32_t chunk;
} QilinSampleSplitParams;

/** What one block of a split row leaves for the row's merge (device scratch). */
typedef struct QilinSampleSplitPart {
    /** (key << 32) | ~index of the chunk's largest key at its first index. */
    uint64_t best;
    /** Sum over the chunk of p relative to the chunk's own maximum (rows without top-k;
     * 0 otherwise). */
    double mass;
    /** The candidates are the chunk's keys >= this one. */
    uint32_t threshold;
    /** Candidates written, at most QILIN_SAMPLE_SPLIT_CAP. */
    uint32_t count;
} QilinSampleSplitPart;

/* Penalties on the device (kernels/penalties.cu qilin_apply_penalties_bf16): threads per
 * block, one thread per penalised token; grid = (ceil(max row entries / this), rows). */
#define QILIN_PENALTY_THREADS 256

/** Launch parameters of qilin_apply_penalties_bf16. */
typedef struct QilinPenaltyParams {
    /** Rows of logits; the grid's y size. */
    uint32_t rows;
    /** Row length: the vocabulary. An entry whose id is >= cols is ignored (as the host
     * sampler ignores ids outside the vocabulary). */
    uint32_t cols;
} QilinPenaltyParams;

/** The penalties of one logits row (Rust: backend::RowPenalties, converted): its entries
 * are tokens[offset .. offset + len). */
typedef struct QilinPenaltyRow {
    /** First entry of the row in the tokens array. */
    uint32_t offset;
    /** Entries of the row: distinct token ids (no two threads touch one logit). */
    uint32_t len;
    /** HF repetition penalty, applied to every entry; 1: off. */
    float repetition;
    /** OpenAI presence penalty, entries with count > 0; applied with frequency unless both
     * are 0. */
    float presence;
    /** OpenAI frequency penalty, times the entry's count. */
    float frequency;
} QilinPenaltyRow;

/** One distinct token of a sequence's prompt + output (Rust: backend::PenaltyToken). */
typedef struct QilinPenaltyToken {
    /** Token id. */
    uint32_t id;
    /** Its occurrences in the output (0: prompt only). */
    uint32_t count;
} QilinPenaltyToken;

/** Launch parameters of every qilin_attention_* kernel. */
typedef struct QilinAttentionParams {
    /** Rows of q and out. */
    uint32_t n_tokens;
    /** Sequences in the batch: seq_starts has n_seqs + 1 entries. */
    uint32_t n_seqs;
    /** Query heads; a multiple of num_kv_heads. */
    uint32_t num_heads;
    uint32_t num_kv_heads;
    /** A multiple of QILIN_VEC_ELEMS, at most QILIN_ATTN_MAX_HEAD_DIM. */
    uint32_t head_dim;
    /** Columns of block_tables. */
    uint32_t max_blocks_per_seq;
    /** Rows of one layer's K (and V) cache: num_blocks * QILIN_BLOCK_SIZE. */
    uint32_t cache_slots;
    /** Softmax scale applied to q.k. */
    float scale;
    /** Decode: keys per split (a multiple of QILIN_BLOCK_SIZE). */
    uint32_t split_tokens;
    /** Decode: splits per sequence (grid.z); 1 = no reduction pass, out written directly. */
    uint32_t n_splits;
    /** Decode: query heads per block, at most QILIN_ATTN_DECODE_MAX_GROUP
     *  (QILIN_ATTN_DECODE_MMA_MAX_GROUP for the tensor-core kernel). */
    uint32_t group_chunk;
    /** Prefill kernels: 1 = leave sequences with exactly one new token to the decode kernel. */
    uint32_t skip_decode_rows;
} QilinAttentionParams;

#endif /* QILIN_ABI_H */
