//! Device-side data of the CUDA backend: bf16 activations, weights and KV cache.

use cudarc::driver::CudaSlice;
use half::bf16;

use crate::backend::KvCacheShape;
use crate::model::quant::levels::LevelFormat;

/// Activations: `rows x cols` bf16, row-major (a row is a token).
pub struct CudaTensor {
    pub data: CudaSlice<bf16>, // [rows, cols]
    pub rows: usize,
    pub cols: usize,
}

/// A linear layer (parts stacked along the output dimension): bf16 or quantized weight,
/// bf16 bias.
pub struct CudaLinear {
    pub weight: LinearWeight,
    pub bias: Option<CudaSlice<bf16>>, // [out]
    pub out_features: usize,
    pub in_features: usize,
}

pub enum LinearWeight {
    Bf16(CudaSlice<bf16>), // [out, in], row-major
    /// Levels and (scale, min) pairs (src/backend/packed_quant.rs, kernels/quant_linear.cu).
    Quant(QuantWeight),
}

pub struct QuantWeight {
    pub format: LevelFormat,
    pub levels: CudaSlice<u8>,     // [out, in * bits / 8]
    pub scale_min: CudaSlice<f32>, // [out, in / group, 2]
}

/// A vector weight (norm scale), bf16.
pub struct CudaVector {
    pub data: CudaSlice<bf16>, // [n]
    pub len: usize,
}

/// The paged KV cache, bf16, one K and one V buffer per layer laid out like the CPU
/// twin's: slot-major, so a token's K for one head is `head_dim` contiguous values.
pub struct CudaKvCache {
    pub shape: KvCacheShape,
    pub keys: Vec<CudaSlice<bf16>>, // [layers][num_blocks * BLOCK_SIZE, kv_heads * head_dim]
    pub values: Vec<CudaSlice<bf16>>, // [layers][num_blocks * BLOCK_SIZE, kv_heads * head_dim]
}
