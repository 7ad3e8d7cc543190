//! PTX of `kernels/*.cu`, compiled by build.rs and embedded in the binary, and the entry
//! points the Rust launchers use. A CPU-only build (no nvcc) has `PTX_AVAILABLE ==
//! false`, an empty `ALL` and empty per-file constants.

include!(concat!(env!("OUT_DIR"), "/ptx.rs"));

/// One `extern "C"` kernel: the `kernels/<module>.cu` file that defines it and its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Kernel {
    pub module: &'static str,
    pub entry: &'static str,
}

/// Residual add (optional) + RMSNorm, bf16; see kernels/norm.cu.
pub const FUSED_ADD_RMS_NORM_BF16: Kernel =
    Kernel { module: "norm", entry: "qilin_fused_add_rms_norm_bf16" };
/// RMSNorm of a read-only input, bf16; see kernels/norm.cu.
pub const RMS_NORM_BF16: Kernel = Kernel { module: "norm", entry: "qilin_rms_norm_bf16" };

/// Embedding gather `table[ids]`, bf16; see kernels/elementwise.cu.
pub const EMBEDDING_BF16: Kernel = Kernel { module: "elementwise", entry: "qilin_embedding_bf16" };
/// Gather of activation rows, bf16; see kernels/elementwise.cu.
pub const GATHER_ROWS_BF16: Kernel =
    Kernel { module: "elementwise", entry: "qilin_gather_rows_bf16" };
/// One column block of a matrix (split_cols), bf16; see kernels/elementwise.cu.
pub const COPY_COLS_BF16: Kernel = Kernel { module: "elementwise", entry: "qilin_copy_cols_bf16" };
/// SiLU(gate) * up, bf16; see kernels/elementwise.cu.
pub const SILU_MUL_BF16: Kernel = Kernel { module: "elementwise", entry: "qilin_silu_mul_bf16" };
/// RoPE on q and k fused with the K/V cache write, bf16; see kernels/rope.cu.
pub const ROPE_STORE_KV_BF16: Kernel = Kernel { module: "rope", entry: "qilin_rope_store_kv_bf16" };
/// The same reading q, k and v from the fused qkv projection (no split copies; opt-in,
/// QILIN_CUDA_ROPE_QKV=1); see kernels/rope.cu.
pub const ROPE_QKV_STORE_KV_BF16: Kernel =
    Kernel { module: "rope", entry: "qilin_rope_qkv_store_kv_bf16" };

/// Dense bf16 linear layer for up to 8 tokens (decode), bias fused; see kernels/gemv.cu.
pub const GEMV_BF16: Kernel = Kernel { module: "gemv", entry: "qilin_gemv_bf16" };
/// Every row of a matrix set to the bias (before the cuBLAS GEMM); see kernels/gemv.cu.
pub const BIAS_ROUND_BF16: Kernel = Kernel { module: "gemv", entry: "qilin_bias_round_bf16" };

/// Split-K paged attention of decode rows, up to 4 query heads per KV-head block, bf16;
/// see kernels/attention_decode.cu.
pub const ATTENTION_DECODE_G4_BF16: Kernel =
    Kernel { module: "attention_decode", entry: "qilin_attention_decode_g4_bf16" };
/// As ATTENTION_DECODE_G4_BF16 for up to 8 query heads per block.
pub const ATTENTION_DECODE_G8_BF16: Kernel =
    Kernel { module: "attention_decode", entry: "qilin_attention_decode_g8_bf16" };
/// Tensor-core split-K decode, head_dim 128, up to 16 query heads per block (the rows of
/// one mma tile); see kernels/attention_decode.cu.
pub const ATTENTION_DECODE_MMA_HD128_BF16: Kernel =
    Kernel { module: "attention_decode", entry: "qilin_attention_decode_mma_hd128_bf16" };
/// As ATTENTION_DECODE_MMA_HD128_BF16 for head_dim 64.
pub const ATTENTION_DECODE_MMA_HD64_BF16: Kernel =
    Kernel { module: "attention_decode", entry: "qilin_attention_decode_mma_hd64_bf16" };
/// Tensor-core split-K decode with each warp's next cache blocks in flight and the split
/// merge in the same launch (compiles, unverified; opt-in), head_dim 128; see
/// kernels/attention_decode_pipe.cu.
pub const ATTENTION_DECODE_PIPE_HD128_BF16: Kernel =
    Kernel { module: "attention_decode_pipe", entry: "qilin_attention_decode_pipe_hd128_bf16" };
/// As ATTENTION_DECODE_PIPE_HD128_BF16 for head_dim 64.
pub const ATTENTION_DECODE_PIPE_HD64_BF16: Kernel =
    Kernel { module: "attention_decode_pipe", entry: "qilin_attention_decode_pipe_hd64_bf16" };
/// Greedy argmax of each logits row; see kernels/sampling.cu.
pub const ARGMAX_BF16: Kernel = Kernel { module: "sampling", entry: "qilin_argmax_bf16" };
/// Temperature / top-k / top-p / min-p sampling of each logits row; see kernels/sampling.cu.
pub const SAMPLE_BF16: Kernel = Kernel { module: "sampling", entry: "qilin_sample_bf16" };
/// Greedy argmax of each logits row by several blocks per row (opt-in,
/// QILIN_CUDA_SAMPLE_SPLIT=1); see kernels/sampling_split.cu.
pub const ARGMAX_SPLIT_BF16: Kernel =
    Kernel { module: "sampling_split", entry: "qilin_argmax_split_bf16" };
/// Sampling of each logits row by several blocks per row (opt-in,
/// QILIN_CUDA_SAMPLE_SPLIT=1); see kernels/sampling_split.cu.
pub const SAMPLE_SPLIT_BF16: Kernel =
    Kernel { module: "sampling_split", entry: "qilin_sample_split_bf16" };
/// Repetition / presence / frequency penalties of listed tokens, in place, rounded to bf16
/// (compiles, unverified; opt-in); see kernels/penalties.cu.
pub const APPLY_PENALTIES_BF16: Kernel =
    Kernel { module: "penalties", entry: "qilin_apply_penalties_bf16" };
/// Merge of the decode splits; see kernels/attention_decode.cu.
pub const ATTENTION_DECODE_REDUCE_BF16: Kernel =
    Kernel { module: "attention_decode", entry: "qilin_attention_decode_reduce_bf16" };
/// Flash-attention prefill on tensor cores, 128-row query tiles, head_dim 64; see
/// kernels/attention_prefill.cu.
pub const ATTENTION_PREFILL_WIDE_HD64_BF16: Kernel =
    Kernel { module: "attention_prefill", entry: "qilin_attention_prefill_wide_hd64_bf16" };
/// Flash-attention prefill, head_dim 128: 128-row query tiles, Q in dynamic shared memory,
/// double-buffered K/V, one barrier per key tile, the causal mask on diagonal tiles only
/// and lazy rescaling; see kernels/attention_prefill_v2.cu.
pub const ATTENTION_PREFILL_V2_HD128_BF16: Kernel =
    Kernel { module: "attention_prefill_v2", entry: "qilin_attention_prefill_v2_hd128_bf16" };
/// Plain-FMA paged attention (any head size, any row; the bisecting fallback); see
/// kernels/attention_simple.cu.
pub const ATTENTION_PREFILL_SIMPLE_BF16: Kernel =
    Kernel { module: "attention_simple", entry: "qilin_attention_prefill_simple_bf16" };
/// bf16 GEMV on tensor cores (compiles, unverified; opt-in); see kernels/gemv.cu.
pub const GEMV_MMA_BF16: Kernel = Kernel { module: "gemv", entry: "qilin_gemv_mma_bf16" };
/// W4A16 GEMV for decode-sized batches; see kernels/quant_linear.cu.
pub const QGEMV_W4_BF16: Kernel = Kernel { module: "quant_linear", entry: "qilin_qgemv_w4_bf16" };
/// W8A16 GEMV for decode-sized batches; see kernels/quant_linear.cu.
pub const QGEMV_W8_BF16: Kernel = Kernel { module: "quant_linear", entry: "qilin_qgemv_w8_bf16" };
/// W4A16 GEMV for batches of up to QILIN_QGEMV_SMALL_MAX_TOKENS rows (batch-1 decode).
pub const QGEMV_SMALL_W4_BF16: Kernel =
    Kernel { module: "quant_linear", entry: "qilin_qgemv_small_w4_bf16" };
/// W8A16 GEMV for batches of up to QILIN_QGEMV_SMALL_MAX_TOKENS rows.
pub const QGEMV_SMALL_W8_BF16: Kernel =
    Kernel { module: "quant_linear", entry: "qilin_qgemv_small_w8_bf16" };
/// W4A16 GEMV of 1..=8 rows on tensor cores, groups a multiple of 128 (compiles,
/// unverified; opt-in); see kernels/quant_gemv_mma.cu.
pub const QGEMV_MMA_W4_BF16: Kernel =
    Kernel { module: "quant_gemv_mma", entry: "qilin_qgemv_mma_w4_bf16" };
/// The same GEMV split over the input dimension, levels streamed through shared memory
/// (compiles, unverified; opt-in with QILIN_CUDA_QGEMV_MMA2=1); see kernels/quant_gemv_mma.cu.
pub const QGEMV_MMA_SPLITK_W4_BF16: Kernel =
    Kernel { module: "quant_gemv_mma", entry: "qilin_qgemv_mma_splitk_w4_bf16" };
/// W4A16 GEMM on tensor cores, split-K for narrow layers (the pipelined rewrite compiles,
/// unverified; the first version passed on an H200); see kernels/quant_gemm.cu.
pub const QGEMM_W4_BF16: Kernel = Kernel { module: "quant_gemm", entry: "qilin_qgemm_w4_bf16" };
/// As QGEMM_W4_BF16 for 8-bit levels.
pub const QGEMM_W8_BF16: Kernel = Kernel { module: "quant_gemm", entry: "qilin_qgemm_w8_bf16" };
/// W4A16 GEMM on the tensor-core GEMV's path, levels straight into A fragments (compiles,
/// unverified; opt-in with QILIN_CUDA_QGEMM_MMA=1); see kernels/quant_gemm_mma.cu.
pub const QGEMM_MMA_W4_BF16: Kernel =
    Kernel { module: "quant_gemm_mma", entry: "qilin_qgemm_mma_w4_bf16" };
/// 4-bit levels to a bf16 weight for the cuBLAS path; see kernels/quant_linear.cu.
pub const DEQUANT_W4_BF16: Kernel =
    Kernel { module: "quant_linear", entry: "qilin_dequant_w4_bf16" };
/// 8-bit levels to a bf16 weight for the cuBLAS path; see kernels/quant_linear.cu.
pub const DEQUANT_W8_BF16: Kernel =
    Kernel { module: "quant_linear", entry: "qilin_dequant_w8_bf16" };

/// Every kernel the Rust side launches; tests/ptx_kernels.rs checks each against the PTX.
pub const KERNELS: &[Kernel] = &[
    FUSED_ADD_RMS_NORM_BF16,
    RMS_NORM_BF16,
    EMBEDDING_BF16,
    GATHER_ROWS_BF16,
    COPY_COLS_BF16,
    SILU_MUL_BF16,
    ROPE_STORE_KV_BF16,
    ROPE_QKV_STORE_KV_BF16,
    GEMV_BF16,
    BIAS_ROUND_BF16,
    ATTENTION_DECODE_G4_BF16,
    ATTENTION_DECODE_G8_BF16,
    ATTENTION_DECODE_MMA_HD128_BF16,
    ATTENTION_DECODE_MMA_HD64_BF16,
    ATTENTION_DECODE_PIPE_HD128_BF16,
    ATTENTION_DECODE_PIPE_HD64_BF16,
    ARGMAX_BF16,
    SAMPLE_BF16,
    ARGMAX_SPLIT_BF16,
    SAMPLE_SPLIT_BF16,
    APPLY_PENALTIES_BF16,
    ATTENTION_DECODE_REDUCE_BF16,
    ATTENTION_PREFILL_WIDE_HD64_BF16,
    ATTENTION_PREFILL_V2_HD128_BF16,
    ATTENTION_PREFILL_SIMPLE_BF16,
    GEMV_MMA_BF16,
    QGEMV_W4_BF16,
    QGEMV_W8_BF16,
    QGEMV_SMALL_W4_BF16,
    QGEMV_SMALL_W8_BF16,
    QGEMV_MMA_W4_BF16,
    QGEMV_MMA_SPLITK_W4_BF16,
    DEQUANT_W4_BF16,
    DEQUANT_W8_BF16,
    QGEMM_W4_BF16,
    QGEMM_W8_BF16,
    QGEMM_MMA_W4_BF16,
];

/// The PTX of one kernels/ file by stem (`"norm"`); `None` in a CPU-only build.
pub fn module_ptx(module: &str) -> Option<&'static str> {
    ALL.iter().find(|(name, _)| *name == module).map(|(_, ptx)| *ptx)
}

/// The names of the `.entry` functions (kernels) a PTX text defines, in file order.
pub fn entry_names(ptx: &str) -> Vec<&str> {
    ptx.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.by_ref().find(|w| *w == ".entry")?;
            let name = words.next()?;
            Some(name.split('(').next().unwrap_or(name))
        })
        .filter(|name| !name.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_reads_visible_and_plain_entries() {
        let ptx = ".version 9.0\n.target sm_80\n.visible .entry first(\n\t.param .u64 a\n)\n\
                   {\n\tret;\n}\n.entry second (\n)\n{\n}\n.func helper(\n)\n";
        assert_eq!(entry_names(ptx), ["first", "second"]);
    }
}
