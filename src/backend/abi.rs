//! Structs and constants shared with the CUDA kernels: `kernels/abi.h` through bindgen
//! (build.rs), never copied by hand. Builds without libclang include the committed copy
//! `abi_bindings.rs`; tests/abi_bindings.rs fails whenever the two differ.

#[cfg(qilin_bindgen)]
include!(concat!(env!("OUT_DIR"), "/abi_bindings.rs"));
#[cfg(not(qilin_bindgen))]
include!("abi_bindings.rs");

/// Tokens per paged KV-cache block.
pub const BLOCK_SIZE: usize = QILIN_BLOCK_SIZE as usize;
/// bf16/f16 elements per 16-byte vector access in the kernels.
pub const VEC_ELEMS: usize = QILIN_VEC_ELEMS as usize;

// SAFETY: the params struct is #[repr(C)] plain old data whose size and field offsets are
// checked against kernels/abi.h at compile time; the kernels take it by value.
unsafe impl cudarc::driver::DeviceRepr for QilinRmsNormParams {}

/// Threads per block for the norm kernels (kernels/norm.cu): one 16-byte vector per thread
/// when the row allows it (lowest latency), more per thread for rows over 8192. `None`
/// when the kernel cannot take the row: `hidden` is zero, not a multiple of
/// `VEC_ELEMS`, or above `QILIN_NORM_MAX_HIDDEN`.
pub fn rms_norm_block_threads(hidden: usize) -> Option<u32> {
    if hidden == 0 || !hidden.is_multiple_of(VEC_ELEMS) || hidden > QILIN_NORM_MAX_HIDDEN as usize {
        return None;
    }
    let warp = QILIN_WARP_SIZE as usize;
    let max_threads = QILIN_MAX_THREADS_PER_BLOCK as usize;
    let per_thread = QILIN_NORM_MAX_VECS_PER_THREAD as usize;
    let vectors = hidden / VEC_ELEMS;
    let threads = vectors.div_ceil(warp) * warp;
    let threads = threads.min(max_threads);
    debug_assert!(threads * per_thread >= vectors);
    u32::try_from(threads).ok()
}

// SAFETY: as for QilinRmsNormParams: #[repr(C)] plain old data, layout checked against
// kernels/abi.h at compile time, passed by value.
unsafe impl cudarc::driver::DeviceRepr for QilinGatherRowsParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for QilinCopyColsParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for QilinSiluMulParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for QilinRopeParams {}

/// grid.y of the row-wise kernels of kernels/elementwise.cu for rows of `units` work
/// units (16-byte vectors, or elements on the scalar path): enough blocks of
/// `QILIN_ELEMENTWISE_THREADS` that each thread has one unit, at least 1 and at most
/// 65535 (the hardware limit; the kernels' stride loops cover any rest).
pub fn elementwise_blocks_per_row(units: usize) -> u32 {
    let blocks = units.div_ceil(QILIN_ELEMENTWISE_THREADS as usize).clamp(1, 65535);
    blocks as u32
}

/// Threads per block of qilin_rope_store_kv_bf16 (kernels/rope.cu): one per work unit of
/// a token (a 16-byte vector of the first half of a q or k head, or of v), rounded up to
/// a warp, at most `QILIN_ROPE_MAX_THREADS` (threads then loop). `None` when the kernel
/// cannot take the geometry: no heads, or `head_dim` zero or not a multiple of
/// `2 * VEC_ELEMS`.
pub fn rope_block_threads(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Option<u32> {
    if num_heads == 0
        || num_kv_heads == 0
        || head_dim == 0
        || !head_dim.is_multiple_of(2 * VEC_ELEMS)
    {
        return None;
    }
    let units = (num_heads + num_kv_heads) * (head_dim / 2 / VEC_ELEMS)
        + num_kv_heads * head_dim / VEC_ELEMS;
    let warp = QILIN_WARP_SIZE as usize;
    let threads = units.div_ceil(warp) * warp;
    u32::try_from(threads.min(QILIN_ROPE_MAX_THREADS as usize)).ok()
}

// SAFETY: as for QilinRmsNormParams: #[repr(C)] plain old data, layout checked against
// kernels/abi.h at compile time, passed by value.
unsafe impl cudarc::driver::DeviceRepr for QilinGemvParams {}
// SAFETY: as above (kernels/sampling.cu).
unsafe impl cudarc::driver::DeviceRepr for QilinArgmaxParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for QilinBiasParams {}

/// Linear layers on up to this many tokens run qilin_gemv_bf16 (kernels/gemv.cu); larger
/// batches run cuBLAS.
pub const GEMV_MAX_TOKENS: usize = QILIN_GEMV_MAX_TOKENS as usize;

// abi.h defines QILIN_GEMV_ROWS_PER_BLOCK as a literal (bindgen cannot evaluate the
// product); kernels/gemv.cu checks the same identity with a static_assert.
const _: () = assert!(
    QILIN_GEMV_ROWS_PER_BLOCK == QILIN_GEMV_THREADS / QILIN_WARP_SIZE * QILIN_GEMV_ROWS_PER_WARP
);

/// Launch geometry `(grid.x, block.x)` of qilin_gemv_bf16 for `x [n, in]` times
/// `W [out, in]^T`: one block per `QILIN_GEMV_ROWS_PER_BLOCK` output channels. `None`
/// when the kernel cannot take the shape: `n` outside `1..=GEMV_MAX_TOKENS`, `in` zero
/// or not a multiple of `VEC_ELEMS`, `out` zero, or a dimension beyond `u32`.
pub fn gemv_geometry(n: usize, in_features: usize, out_features: usize) -> Option<(u32, u32)> {
    if !(1..=GEMV_MAX_TOKENS).contains(&n)
        || in_features == 0
        || !in_features.is_multiple_of(VEC_ELEMS)
        || out_features == 0
    {
        return None;
    }
    u32::try_from(in_features).ok()?;
    let out = u32::try_from(out_features).ok()?;
    Some((out.div_ceil(QILIN_GEMV_ROWS_PER_BLOCK), QILIN_GEMV_THREADS))
}

/// Launch geometry `(grid.x, block.x)` of qilin_gemv_mma_bf16: the shapes
/// `gemv_geometry` accepts, one block per QILIN_GEMV_MMA_ROWS_PER_BLOCK output channels.
pub fn gemv_mma_geometry(n: usize, in_features: usize, out_features: usize) -> Option<(u32, u32)> {
    gemv_geometry(n, in_features, out_features)?;
    let out = u32::try_from(out_features).ok()?;
    Some((out.div_ceil(QILIN_GEMV_MMA_ROWS_PER_BLOCK), QILIN_GEMV_MMA_THREADS))
}

/// grid.x of qilin_bias_round_bf16 for `elements` outputs: one element per thread
/// of `QILIN_BIAS_THREADS`-thread blocks, at least 1 and at most 65535 blocks (the
/// kernel's grid-stride loop covers any rest).
pub fn bias_blocks(elements: usize) -> u32 {
    elements.div_ceil(QILIN_BIAS_THREADS as usize).clamp(1, 65535) as u32
}

// SAFETY: as for QilinRmsNormParams: #[repr(C)] plain old data, layout checked against
// kernels/abi.h at compile time, passed by value (kernels/quant_linear.cu).
unsafe impl cudarc::driver::DeviceRepr for QilinQuantGemvParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for QilinDequantParams {}

// As for QILIN_GEMV_ROWS_PER_BLOCK: a literal in abi.h, the identity checked here and by
// a static_assert in kernels/quant_linear.cu.
const _: () = assert!(
    QILIN_QGEMV_ROWS_PER_BLOCK == QILIN_QGEMV_THREADS / QILIN_WARP_SIZE * QILIN_QGEMV_ROWS_PER_WARP
);

/// Values in one 16-byte vector of `bits`-bit levels (32 or 16): the quantization group
/// of a weight the quantized kernels take must be a multiple of it.
pub fn levels_per_vector(bits: u32) -> usize {
    128 / bits as usize
}

/// Whether kernels/quant_linear.cu can take a `[*, in_features]` weight of `bits`-bit
/// levels (4 or 8) in groups of `group` values: `in_features` a non-zero multiple of
/// `QILIN_QGEMV_VALUES_PER_LANE` and of `group`, `group` a multiple of one 16-byte vector
/// of levels, everything within `u32`.
pub fn quant_layout_ok(bits: u32, in_features: usize, group: usize) -> bool {
    (bits == 4 || bits == 8)
        && in_features > 0
        && in_features.is_multiple_of(QILIN_QGEMV_VALUES_PER_LANE as usize)
        && group > 0
        && group.is_multiple_of(levels_per_vector(bits))
        && in_features.is_multiple_of(group)
        && u32::try_from(in_features).is_ok()
}

/// Launch geometry `(grid.x, block.x)` of qilin_qgemv_w{4,8}_bf16 for `x [n, in]`: one
/// block per `QILIN_QGEMV_ROWS_PER_BLOCK` output channels. `None` when `n` is outside
/// `1..=GEMV_MAX_TOKENS`, `out` is zero or beyond `u32`, or the layout is not
/// `quant_layout_ok`.
pub fn qgemv_geometry(
    n: usize,
    bits: u32,
    in_features: usize,
    out_features: usize,
    group: usize,
) -> Option<(u32, u32)> {
    if !(1..=GEMV_MAX_TOKENS).contains(&n)
        || out_features == 0
        || !quant_layout_ok(bits, in_features, group)
    {
        return None;
    }
    let out = u32::try_from(out_features).ok()?;
    Some((out.div_ceil(QILIN_QGEMV_ROWS_PER_BLOCK), QILIN_QGEMV_THREADS))
}

/// Whether qilin_qgemv_mma_w4_bf16 can take `x [n, in]` against a `[*, in]` weight of
/// `bits`-bit levels in groups of `group`: 4-bit levels, `n` in
/// `1..=QILIN_QGEMV_MMA_MAX_TOKENS` (chunks of `GEMV_MAX_TOKENS` above that), the group a
/// power of two and a multiple of `QILIN_QGEMV_MMA_STEP` (one group per step), and
/// `quant_layout_ok`. Other layers (GGUF's 32-value blocks, 8-bit levels) keep the FMA
/// GEMVs.
pub fn qgemv_mma_ok(n: usize, bits: u32, in_features: usize, group: usize) -> bool {
    bits == 4
        && (1..=QILIN_QGEMV_MMA_MAX_TOKENS as usize).contains(&n)
        && group.is_power_of_two()
        && group.is_multiple_of(QILIN_QGEMV_MMA_STEP as usize)
        && quant_layout_ok(bits, in_features, group)
}

/// Launch geometry `(grid.x, block.x)` of qilin_qgemv_mma_w4_bf16: one block per
/// `QILIN_QGEMV_MMA_ROWS` output channels and chunk of `GEMV_MAX_TOKENS` tokens. `None`
/// where `qgemv_mma_ok` says no or the grid is empty or beyond `u32`.
pub fn qgemv_mma_geometry(
    n: usize,
    bits: u32,
    in_features: usize,
    out_features: usize,
    group: usize,
) -> Option<(u32, u32)> {
    if out_features == 0 || !qgemv_mma_ok(n, bits, in_features, group) {
        return None;
    }
    let out = u32::try_from(out_features).ok()?;
    let chunks = u32::try_from(n.div_ceil(GEMV_MAX_TOKENS)).ok()?;
    Some((out.div_ceil(QILIN_QGEMV_MMA_ROWS).checked_mul(chunks)?, QILIN_QGEMV_MMA_THREADS))
}

/// Launch geometry `((grid.x, grid.y), block.x)` of qilin_qgemm_mma_w4_bf16 (the 4-bit
/// GEMM on the tensor-core GEMV's path): one block per `QILIN_QGEMM_MMA_ROWS` output
/// channels in x and per `QILIN_QGEMM_MMA_TOKENS` tokens in y, for the layers
/// `qgemv_mma_ok` accepts at any `n >= 1`. `None` where those say no, or the grid or
/// `n * in` (the kernel's x offsets) is beyond `u32`.
pub fn qgemm_mma_geometry(
    n: usize,
    bits: u32,
    in_features: usize,
    out_features: usize,
    group: usize,
) -> Option<((u32, u32), u32)> {
    if n == 0 || out_features == 0 || !qgemv_mma_ok(1, bits, in_features, group) {
        return None;
    }
    u32::try_from(n.checked_mul(in_features)?).ok()?;
    let tiles = u32::try_from(out_features.div_ceil(QILIN_QGEMM_MMA_ROWS as usize)).ok()?;
    let token_tiles = u32::try_from(n.div_ceil(QILIN_QGEMM_MMA_TOKENS as usize)).ok()?;
    Some(((tiles, token_tiles), QILIN_QGEMM_MMA_THREADS))
}

/// Launch geometry `((grid.x, grid.y), block.x)` of qilin_qgemv_mma_splitk_w4_bf16 on a
/// device of `sm_count` SMs: grid.x = one block per `QILIN_QGEMV_MMA_ROWS` output channels
/// (row tiles), grid.y = splits of the input dimension, as many as fill the
/// `sm_count * QILIN_QGEMV_SPLITK_MIN_BLOCKS` resident blocks once (an estimate on devices
/// whose shared memory holds fewer), at most `QILIN_QGEMV_SPLITK_MAX_SPLITS` and one step
/// per warp, and 1 when the row tiles outnumber `max_counters` (the merge's counters).
/// Qwen2.5-7B at 132 SMs: qkv 288 x 3, o 224 x 4, gate_up 2368 x 1, down 224 x 4. `None`
/// where `qgemv_mma_ok` says no or `out` is zero or beyond `u32`.
pub fn qgemv_splitk_geometry(
    n: usize,
    bits: u32,
    in_features: usize,
    out_features: usize,
    group: usize,
    sm_count: usize,
    max_counters: usize,
) -> Option<((u32, u32), u32)> {
    if n > GEMV_MAX_TOKENS {
        return None; // one chunk of tokens: the mma's 8 columns
    }
    let (tiles, _) = qgemv_mma_geometry(n, bits, in_features, out_features, group)?;
    let resident = sm_count.max(1) * QILIN_QGEMV_SPLITK_MIN_BLOCKS as usize;
    let steps = in_features / QILIN_QGEMV_MMA_STEP as usize;
    let warps = (QILIN_QGEMV_SPLITK_THREADS / QILIN_WARP_SIZE) as usize;
    let most = (QILIN_QGEMV_SPLITK_MAX_SPLITS as usize).min(steps / warps).max(1);
    let splits =
        if tiles as usize > max_counters { 1 } else { (resident / tiles as usize).clamp(1, most) };
    Some(((tiles, splits as u32), QILIN_QGEMV_SPLITK_THREADS))
}

/// Launch geometry `((grid.x, grid.y, grid.z), block.x)` of qilin_qgemm_w{4,8}_bf16 for
/// `x [n, in]`: grid.x over output channels in `QILIN_QGEMM_BLOCK_N`, grid.y over tokens
/// in `QILIN_QGEMM_BLOCK_M`, grid.z the split-K factor: `splits` if given (clamped to
/// 1..=the steps of `in`, for tests that force a merge), else enough splits for the tiles
/// to fill the `sm_count` SMs' QILIN_QGEMM_MIN_BLOCKS resident blocks once, at most
/// QILIN_QGEMM_MAX_SPLITS and at least QILIN_QGEMM_MIN_SPLIT_STEPS steps each, and 1 when
/// the tiles outnumber `max_counters` (the merge's counters). Qwen2.5-7B at <= 64 tokens
/// on 132 SMs: qkv 36 tiles x 8, o 28 x 8, down 28 x 8, gate_up 296 x 1. `None` when `n`
/// or `out` is zero or a grid dimension exceeds 65535 tokens-blocks, `in` is not a
/// multiple of `QILIN_QGEMM_BLOCK_K`, the layout is not `quant_layout_ok`, the group is
/// not a power of two (the kernel finds a channel's group by a shift) or `n x in` does not
/// fit u32 (its x offsets).
#[allow(clippy::too_many_arguments)]
pub fn qgemm_geometry(
    n: usize,
    bits: u32,
    in_features: usize,
    out_features: usize,
    group: usize,
    sm_count: usize,
    max_counters: usize,
    splits: Option<usize>,
) -> Option<((u32, u32, u32), u32)> {
    if n == 0
        || out_features == 0
        || !in_features.is_multiple_of(QILIN_QGEMM_BLOCK_K as usize)
        || !quant_layout_ok(bits, in_features, group)
        || !group.is_power_of_two()
    {
        return None;
    }
    let tokens = u32::try_from(n.div_ceil(QILIN_QGEMM_BLOCK_M as usize)).ok()?;
    let channels = u32::try_from(out_features.div_ceil(QILIN_QGEMM_BLOCK_N as usize)).ok()?;
    u32::try_from(n).ok()?;
    u32::try_from(out_features).ok()?;
    u32::try_from(n.checked_mul(in_features)?).ok()?; // the kernel's x offsets
    if tokens > 65535 {
        return None;
    }
    let tiles = channels as usize * tokens as usize;
    let steps = in_features / QILIN_QGEMM_BLOCK_K as usize;
    let splits = if tiles > max_counters {
        1
    } else if let Some(forced) = splits {
        forced.clamp(1, steps)
    } else {
        let resident = sm_count.max(1) * QILIN_QGEMM_MIN_BLOCKS as usize;
        let most = (QILIN_QGEMM_MAX_SPLITS as usize)
            .min(steps / QILIN_QGEMM_MIN_SPLIT_STEPS as usize)
            .max(1);
        (resident / tiles).clamp(1, most)
    };
    Some(((channels, tokens, splits as u32), QILIN_QGEMM_THREADS))
}

/// grid.x of qilin_dequant_w{4,8}_bf16 for `values` weights of `bits`-bit levels: one
/// 16-byte vector of levels per thread, at least 1 and at most 65535 blocks (the
/// grid-stride loop covers any rest).
pub fn dequant_blocks(values: usize, bits: u32) -> u32 {
    let vectors = values.div_ceil(levels_per_vector(bits));
    vectors.div_ceil(QILIN_DEQUANT_THREADS as usize).clamp(1, 65535) as u32
}

// SAFETY: as for QilinRmsNormParams: #[repr(C)] plain old data, layout checked against
// kernels/abi.h at compile time, passed by value (kernels/attention_*.cu).
unsafe impl cudarc::driver::DeviceRepr for QilinAttentionParams {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_threads_cover_every_row_the_kernel_accepts() {
        for hidden in (VEC_ELEMS..=QILIN_NORM_MAX_HIDDEN as usize).step_by(VEC_ELEMS) {
            let threads = rms_norm_block_threads(hidden).map(|t| t as usize);
            let Some(threads) = threads else { panic!("hidden {hidden} rejected") };
            assert_eq!(threads % QILIN_WARP_SIZE as usize, 0);
            assert!(threads <= QILIN_MAX_THREADS_PER_BLOCK as usize);
            let capacity = threads * QILIN_NORM_MAX_VECS_PER_THREAD as usize * VEC_ELEMS;
            assert!(capacity >= hidden, "hidden {hidden}: {threads} threads hold {capacity}");
        }
    }

    #[test]
    fn norm_threads_reject_rows_the_kernel_cannot_take() {
        assert_eq!(rms_norm_block_threads(0), None);
        assert_eq!(rms_norm_block_threads(VEC_ELEMS + 1), None);
        assert_eq!(rms_norm_block_threads(QILIN_NORM_MAX_HIDDEN as usize + VEC_ELEMS), None);
    }
}
