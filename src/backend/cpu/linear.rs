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

/// Fewest output rows per rayon task on the GEMM path (prefill). Each task packs all
/// of x again, so tasks are made as large as load balance allows: two per thread.
const GEMM_MIN_ROWS_PER_TASK: usize = 64;

/// Up to this many tokens (decode), dot products read the encoded rows directly, so
/// each weight byte is read once; above it (prefill), tiles of rows are decoded to f32
/// and multiplied by all tokens at once with a GEMM.
const DIRECT_DOT_MAX_TOKENS: usize = 4;

pub struct CpuLinear {
    weight: WeightTensor,   // [out, in]
    bias: Option<Vec<f32>>, // [out]
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
        // Computed as [out, n] so that each task owns whole output rows.
        let mut out_t = vec![0.0f32; self.out_features * n];
        if n <= DIRECT_DOT_MAX_TOKENS {
            out_t.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(task, chunk)| {
                for (i, outs) in chunk.chunks_mut(n).enumerate() {
                    let row = self.weight.row(task * ROWS_PER_TASK + i);
                    for (t, o) in outs.iter_mut().enumerate() {
                        *o = dot_row(self.weight.dtype, row, x.row(t));
                    }
                }
            });
        } else {
            let tasks = 2 * rayon::current_num_threads();
            let rows_per_task = self.out_features.div_ceil(tasks).max(GEMM_MIN_ROWS_PER_TASK);
            out_t.par_chunks_mut(rows_per_task * n).enumerate().for_each_init(
                Vec::new,
                |decoded, (task, chunk)| self.gemm_rows(task * rows_per_task, chunk, x, decoded),
            );
        }
        if let Some(b) = &self.bias {
            for (outs, &bias) in out_t.chunks_mut(n).zip(b) {
                outs.iter_mut().for_each(|o| *o += bias);
            }
        }
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

    /// Rows `first_row..` of the output, transposed (`out_t [rows, n]`): decodes those
    /// weight rows to f32 once, then one f32 GEMM against every token.
    fn gemm_rows(
        &self,
        first_row: usize,
        out_t: &mut [f32],
        x: &CpuTensor,
        decoded: &mut Vec<f32>,
    ) {
        let (n, k) = (x.rows, self.in_features);
        let rows = out_t.len() / n;
        decoded.resize(rows * k, 0.0);
        for (i, dst) in decoded.chunks_mut(k).enumerate() {
            dequantize_row(self.weight.dtype, self.weight.row(first_row + i), dst);
        }
        // out_t [rows, n] = W [rows, k] . x^T [k, n]; x is [n, k] row-major.
        // SAFETY: the pointers and strides describe exactly the slices above, and
        // out_t does not alias the inputs.
        unsafe {
            matrixmultiply::sgemm(
                rows,
                k,
                n,
                1.0,
                decoded.as_ptr(),
                k as isize,
                1,
                x.data.as_ptr(),
                1,
                k as isize,
                0.0,
                out_t.as_mut_ptr(),
                n as isize,
                1,
            );
        }
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
