//! Weight tensors as they sit in a model file: a dtype, a shape and bytes that are
//! usually a window of a memory map (no copy), owned only when the loader had to
//! rearrange them (GGUF Q/K row permutation, misaligned safetensors data).

use std::sync::Arc;

use memmap2::Mmap;

/// Element formats a weight may be stored in. Quantized formats are GGUF's block
/// formats: a row of `k` values is `k / block_elems()` blocks of `block_bytes()` bytes.
// GGUF's own names (Q4_K, ...) read better than camel case next to its docs.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// 32 values: f16 scale d, 32 x i8. x = d * q.
    Q8_0,
    /// 32 values: f16 scale d, 16 bytes of nibbles. x = d * (q - 8).
    Q4_0,
    /// 32 values: f16 scale d, f16 min m, 16 bytes of nibbles. x = d * q + m.
    Q4_1,
    /// 32 values: f16 scale d, 32 fifth bits, 16 bytes of nibbles. x = d * (q - 16).
    Q5_0,
    /// 32 values: f16 scale d, f16 min m, 32 fifth bits, nibbles. x = d * q + m.
    Q5_1,
    /// 32 values: f16 scale d, 16 bytes of nibbles indexing a fixed non-linear table.
    IQ4_NL,
    /// GGUF k-quant, 256 values in 16 sub-blocks of 16, 2-bit, 4-bit scales and mins (84 B).
    Q2_K,
    /// GGUF k-quant, 256 values in 16 sub-blocks of 16, 3-bit, 6-bit scales (110 B).
    Q3_K,
    /// GGUF k-quant, 256 values in 8 sub-blocks of 32 with 6-bit scales and mins (144 B).
    Q4_K,
    /// GGUF k-quant, 256 values, 5-bit (176 B).
    Q5_K,
    /// GGUF k-quant, 256 values in 16 sub-blocks of 16 with i8 scales, 6-bit (210 B).
    Q6_K,
    /// 256 values in 8 sub-blocks of 32 with 6-bit scales, IQ4_NL's table (136 B).
    IQ4_XS,
    /// Qilin int8: 128 values, f32 scale s, 128 x i8. x = s * q. Per-output-channel
    /// symmetric when every block of a row carries the same scale (`--quantize int8`).
    I8,
    /// Qilin int4 (AWQ/GPTQ-compatible group 128, asymmetric): f16 scale s, u8 zero z
    /// (0..=15), one reserved byte, 64 bytes of nibbles (value 2i in the low nibble of
    /// byte i). x = s * (q - z).
    I4,
}

impl DType {
    /// Values per storage block (1 for plain floats).
    pub fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 | DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL => {
                32
            }
            DType::Q2_K | DType::Q3_K | DType::Q4_K | DType::Q5_K | DType::Q6_K | DType::IQ4_XS => {
                256
            }
            DType::I8 | DType::I4 => 128,
        }
    }

    /// Bytes per storage block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q5_0 => 22,
            DType::Q5_1 => 24,
            DType::IQ4_NL => 18,
            DType::Q2_K => 84,
            DType::Q3_K => 110,
            DType::Q4_K => 144,
            DType::Q5_K => 176,
            DType::Q6_K => 210,
            DType::IQ4_XS => 136,
            DType::I8 => 132,
            DType::I4 => 68,
        }
    }

    /// Bytes needed for a row of `elems` values, or None when `elems` is not a whole
    /// number of blocks or the size overflows (hostile headers).
    pub fn row_bytes(self, elems: usize) -> Option<usize> {
        if !elems.is_multiple_of(self.block_elems()) {
            return None;
        }
        (elems / self.block_elems()).checked_mul(self.block_bytes())
    }

    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q8_0 => "Q8_0",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
            DType::Q5_0 => "Q5_0",
            DType::Q5_1 => "Q5_1",
            DType::IQ4_NL => "IQ4_NL",
            DType::Q2_K => "Q2_K",
            DType::Q3_K => "Q3_K",
            DType::Q4_K => "Q4_K",
            DType::Q5_K => "Q5_K",
            DType::Q6_K => "Q6_K",
            DType::IQ4_XS => "IQ4_XS",
            DType::I8 => "I8",
            DType::I4 => "I4",
        };
        f.write_str(name)
    }
}

/// Bytes of a tensor: a window into a shared memory map, or an owned buffer.
#[derive(Clone)]
pub enum Bytes {
    Mapped { map: Arc<Mmap>, offset: usize, len: usize },
    Owned(Arc<Vec<u8>>),
}

impl Bytes {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped { map, offset, len } => &map[*offset..*offset + *len],
            Bytes::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bytes::Mapped { offset, len, .. } => write!(f, "Mapped({offset}+{len})"),
            Bytes::Owned(v) => write!(f, "Owned({})", v.len()),
        }
    }
}

/// One weight tensor. `shape` is row-major, slowest dimension first, in Hugging Face
/// convention: a linear layer's weight is `[out_features, in_features]`, so each row
/// is one output channel and quantization blocks run along `in_features`.
#[derive(Clone, Debug)]
pub struct WeightTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Bytes,
}

impl WeightTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Values per row (the last dimension).
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Number of rows (all dimensions but the last).
    pub fn rows(&self) -> usize {
        self.numel() / self.row_len().max(1)
    }

    pub fn bytes(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// The bytes of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.dtype.row_bytes(self.row_len()).expect("validated at load");
        &self.bytes()[r * rb..(r + 1) * rb]
    }

    /// Expected byte length for `dtype` and `shape`, or None when the last dimension
    /// is not a whole number of blocks.
    pub fn expected_bytes(dtype: DType, shape: &[usize]) -> Option<usize> {
        let row_len = shape.last().copied().unwrap_or(1);
        let rows = shape.iter().rev().skip(1).try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
        dtype.row_bytes(row_len)?.checked_mul(rows)
    }
}
