//! Linear layers on the CPU: weights stay in their file format and are decoded row by
//! row; rows are spread over the rayon pool.

use rayon::prelude::*;

use super::{weight_to_f32, CpuTensor};
use crate::backend::BackendError;
use crate::model::quant::{dequantize_row, dot_row};
use crate::model::WeightTensor;

/// Output rows handed to one rayon task; large enough to amortise scheduling, small
/// enough to balance two to sixteen threads on a 576-row matrix.
const ROWS_PER_TASK: usize = 16;

/// Up to this many tokens, each row's dot products read the encoded row directly;
/// above it, a row is decoded once to f32 and reused for every token.
const DIRECT_DOT_MAX_TOKENS: usize = 2;

pub struct CpuLinear {
    weight: WeightTensor,    // [out, in]
    bias: Option<Vec<f32>>,  // [out]
    pub out_features: usize,
    pub in_features: usize,
}

impl CpuLinear {
    pub fn new(
        name: &str,
        weight: &WeightTensor,
        bias: Option<&WeightTensor>,
    ) -> Result<Self, BackendError> {
        let bad = |message: String| BackendError::Weight { name: name.to_string(), message };
        if weight.shape.len() != 2 {
            return Err(bad(format!("expected a 2-D weight, got shape {:?}", weight.shape)));
        }
        let (out_features, in_features) = (weight.shape[0], weight.shape[1]);
        if weight.dtype.row_bytes(in_features).is_none() {
            return Err(bad(format!(
                "{in_features} inputs is not a whole number of {} blocks",
                weight.dtype
            )));
        }
        let bias = match bias {
            Some(b) => {
                let values = weight_to_f32(name, b)?;
                if values.len() != out_features {
                    return Err(bad(format!(
                        "bias has {} values for {out_features} outputs",
                        values.len()
                    )));
                }
                Some(values)
            }
            None => None,
        };
        Ok(CpuLinear { weight: weight.clone(), bias, out_features, in_features })
    }

    /// `x [n, in]` -> `[n, out]`.
    pub fn forward(&self, x: &CpuTensor) -> CpuTensor {
        assert_eq!(x.cols, self.in_features, "linear input width");
        let n = x.rows;
        let dtype = self.weight.dtype;
        // Computed as [out, n] so that each task owns whole output rows.
        let mut out_t = vec![0.0f32; self.out_features * n];
        out_t.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(task, chunk)| {
            let first_row = task * ROWS_PER_TASK;
            let mut decoded = Vec::new();
            for (i, outs) in chunk.chunks_mut(n).enumerate() {
                let r = first_row + i;
                let row = self.weight.row(r);
                if n <= DIRECT_DOT_MAX_TOKENS {
                    for (t, o) in outs.iter_mut().enumerate() {
                        *o = dot_row(dtype, row, x.row(t));
                    }
                } else {
                    decoded.resize(self.in_features, 0.0);
                    dequantize_row(dtype, row, &mut decoded);
                    for (t, o) in outs.iter_mut().enumerate() {
                        *o = dot_f32(&decoded, x.row(t));
                    }
                }
                if let Some(b) = &self.bias {
                    outs.iter_mut().for_each(|o| *o += b[r]);
                }
            }
        });
        if n == 1 {
            return CpuTensor::from_vec(out_t, 1, self.out_features);
        }
        let mut out = CpuTensor::zeros(n, self.out_features);
        for (r, row) in out_t.chunks(n).enumerate() {
            for (t, &v) in row.iter().enumerate() {
                out.data[t * self.out_features + r] = v;
            }
        }
        out
    }

    /// Rows `ids` decoded to f32: `[ids.len(), in]` (embedding lookup).
    pub fn gather(&self, ids: &[u32]) -> CpuTensor {
        let mut out = CpuTensor::zeros(ids.len(), self.in_features);
        for (dst, &id) in out.data.chunks_mut(self.in_features).zip(ids) {
            dequantize_row(self.weight.dtype, self.weight.row(id as usize), dst);
        }
        out
    }
}

/// f32 dot product with independent accumulators so LLVM vectorises it.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0.0f32; LANES];
    let chunks = a.len() / LANES * LANES;
    for (ca, cb) in a[..chunks].chunks_exact(LANES).zip(b[..chunks].chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = a[chunks..].iter().zip(&b[chunks..]).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}
