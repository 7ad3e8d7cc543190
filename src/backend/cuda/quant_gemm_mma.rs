//! The 4-bit GEMM on the tensor-core GEMV's path, qilin_qgemm_mma_w4_bf16
//! (kernels/quant_gemm_mma.cu): levels straight into A fragments, one unpacking per 64
//! tokens. Compiles, unverified on hardware; opt-in with QILIN_CUDA_QGEMM_MMA=1, and then
//! the dispatch (linear.rs) gives it the wide 4-bit layers past the GEMVs' tokens
//! (`qgemm_mma_takes`).

use cudarc::driver::LaunchConfig;

use super::device::Device;
use super::quant_linear::{launch_matmul, matmul_params, Op};
use super::tensor::{CudaLinear, CudaTensor, LinearWeight, QuantWeight};
use super::CudaBackend;
use crate::backend::abi::{
    qgemm_mma_geometry, GEMV_MAX_TOKENS, QILIN_QGEMM_MMA_ROWS, QILIN_QGEMM_MMA_SMEM_BYTES,
    QILIN_QGEMM_MMA_TOKENS,
};
use crate::backend::ptx;

/// The most tokens `qgemm_mma_takes` routes: one token tile of the kernel. Past it every
/// tile unpacks the levels again, as qilin_qgemm_w4_bf16 does, which lost to
/// dequantization + cuBLAS at 256 tokens (H200, 771cd47).
const QGEMM_MMA_MAX_TOKENS: usize = QILIN_QGEMM_MMA_TOKENS as usize;

/// The fewest output channels `qgemm_mma_takes` routes: with no split-K, a layer needs
/// about one block per SM of an H100/H200 (132) to fill the GPU, so 128 row tiles.
/// Qwen2.5-7B's gate_up (37888 rows) and Llama-3-8B's (28672) have that; their qkv, o and
/// down (3584-4608 rows: 28-36 blocks) keep the GEMVs and qilin_qgemm_w4_bf16's split-K.
const QGEMM_MMA_MIN_ROWS: usize = 128 * QILIN_QGEMM_MMA_ROWS as usize;

/// Whether the dispatch sends `n` tokens through `w` by qilin_qgemm_mma_w4_bf16: only with
/// QILIN_CUDA_QGEMM_MMA=1, on a device that gave it its shared memory, for a 4-bit layer it
/// takes (`qgemm_mma_geometry`) of at least QGEMM_MMA_MIN_ROWS outputs, past the tokens of
/// one GEMV pass and up to QGEMM_MMA_MAX_TOKENS.
pub fn qgemm_mma_takes(dev: &Device, n: usize, w: &CudaLinear) -> bool {
    let LinearWeight::Quant(q) = &w.weight else { return false };
    dev.paths.qgemm_mma
        && dev.launchable(ptx::QGEMM_MMA_W4_BF16)
        && shape_takes(n, q.format.bits, w.in_features, w.out_features, q.format.group)
}

/// `qgemm_mma_takes` on the shape alone.
fn shape_takes(n: usize, bits: u32, k: usize, m: usize, group: usize) -> bool {
    n > GEMV_MAX_TOKENS
        && n <= QGEMM_MMA_MAX_TOKENS
        && m >= QGEMM_MMA_MIN_ROWS
        && qgemm_mma_geometry(n, bits, k, m, group).is_some()
}

/// `out [n, m] = x [n, k] W^T + b` by qilin_qgemm_mma_w4_bf16; panics for a shape
/// `qgemm_mma_geometry` refuses. linear.rs's `check_shapes` has checked every buffer.
pub fn qgemm_mma_into(
    dev: &Device,
    x: &CudaTensor,
    w: &CudaLinear,
    q: &QuantWeight,
    out: &mut CudaTensor,
) {
    let (n, k, m) = (x.rows, w.in_features, w.out_features);
    let (bits, group) = (q.format.bits, q.format.group);
    let ((tiles, token_tiles), threads) =
        qgemm_mma_geometry(n, bits, k, m, group).unwrap_or_else(|| {
            panic!(
                "{} cannot take x [{n}, {k}] W [{m}, {k}]^T at {bits} bits, group {group}: it \
                 needs 4-bit levels and a power-of-two group that is a multiple of 128 and \
                 divides in",
                ptx::QGEMM_MMA_W4_BF16.entry
            )
        });
    let cfg = LaunchConfig {
        grid_dim: (tiles, token_tiles, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: QILIN_QGEMM_MMA_SMEM_BYTES,
    };
    launch_matmul(dev, Op::GemmMma, cfg, matmul_params(n, k, m, group), x, w, q, out);
}

impl CudaBackend {
    /// qilin_qgemm_mma_w4_bf16 whatever the dispatch would pick, for the parity test and
    /// `qilin bench`; false (nothing launched) for a layer it cannot take (a bf16 layer,
    /// 8-bit levels, a group not a power-of-two multiple of 128) or on a device that
    /// refused its shared memory.
    pub fn linear_qgemm_mma_into(
        &self,
        x: &CudaTensor,
        w: &CudaLinear,
        out: &mut CudaTensor,
    ) -> bool {
        let LinearWeight::Quant(q) = &w.weight else { return false };
        let (bits, group) = (q.format.bits, q.format.group);
        if !self.dev.launchable(ptx::QGEMM_MMA_W4_BF16)
            || qgemm_mma_geometry(x.rows, bits, w.in_features, w.out_features, group).is_none()
        {
            return false;
        }
        super::linear::check_shapes(x, w, out);
        qgemm_mma_into(&self.dev, x, w, q, out);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_takes_wide_int4_layers_past_one_gemv_pass_up_to_one_token_tile() {
        // Qwen2.5-7B's and Llama-3-8B's gate_up in groups of 128.
        for (k, m) in [(3584, 37888), (4096, 28672)] {
            for n in 9..=64 {
                assert!(shape_takes(n, 4, k, m, 128), "k {k} m {m} n {n}");
            }
            assert!(!shape_takes(8, 4, k, m, 128), "one GEMV pass");
            assert!(!shape_takes(65, 4, k, m, 128), "a second token tile");
            assert!(!shape_takes(64, 8, k, m, 128), "8-bit levels");
            assert!(!shape_takes(64, 4, k, m, 32), "GGUF's 32-value groups");
            assert!(shape_takes(64, 4, k, m, 256));
        }
        // Narrow layers (qkv, o, down): too few row tiles without split-K.
        for (k, m) in [(3584, 4608), (3584, 3584), (18944, 3584)] {
            assert!(!shape_takes(64, 4, k, m, 128), "k {k} m {m}");
        }
    }

    #[test]
    fn its_grid_covers_rows_and_tokens_with_whole_tiles() {
        assert_eq!(qgemm_mma_geometry(64, 4, 3584, 37888, 128), Some(((296, 1), 256)));
        assert_eq!(qgemm_mma_geometry(65, 4, 3584, 37888, 128), Some(((296, 2), 256)));
        assert_eq!(qgemm_mma_geometry(1, 4, 3584, 1, 128), Some(((1, 1), 256)));
        assert_eq!(qgemm_mma_geometry(0, 4, 3584, 37888, 128), None, "no tokens");
        assert_eq!(qgemm_mma_geometry(9, 4, 3584, 0, 128), None, "no outputs");
        assert_eq!(qgemm_mma_geometry(9, 4, 3600, 64, 128), None, "whole steps");
        assert_eq!(qgemm_mma_geometry(1 << 20, 4, 1 << 12, 64, 128), None, "x offsets in u32");
    }
}
