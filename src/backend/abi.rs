//! Structs and constants shared with the CUDA kernels: `kernels/abi.h` through bindgen
//! (build.rs), never copied by hand. Builds without libclang include the committed copy
//! `abi_bindings.rs`; tests/abi_bindings.rs fails whenever the two differ.

#[cfg(qilin_bindgen)]
include!(concat!(env!("OUT_DIR"), "/abi_bindings.rs"));
#[cfg(not(qilin_bindgen))]
include!("abi_bindings.rs");

/// Tokens per paged KV-cache block.
pub const BLOCK_SIZE: usize = QILIN_BLOCK_SIZE as usize;
/// Input channels per W4A16 scale group.
pub const QUANT_GROUP_SIZE: usize = QILIN_QUANT_GROUP_SIZE as usize;
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
    if hidden == 0 || hidden % VEC_ELEMS != 0 || hidden > QILIN_NORM_MAX_HIDDEN as usize {
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
