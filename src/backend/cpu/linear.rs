//! Linear layers on the CPU: weights stay in their file format and are decoded row by
//! row; rows are spread over the rayon pool.

use rayon::prelude::*;

use super::{weight_to_f32, CpuTensor};
use crate::backend::{BackendError, LinearPart};
use crate::model::quant::{dequantize_row, dot_row};
use crate::model::{DType, WeightTensor};

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

/// One or more weights stacked along the output dimension (fused QKV, gate+up), kept in
/// their file formats and not copied: `[sum of out, in]`.
pub struct CpuLinear {
    parts: Vec<WeightTensor>, // each [out_i, in]
    /// First output row of each part.
    part_starts: Vec<usize>,
    bias: Option<Vec<f32>>, // [out]; zeros for parts without bias
    pub out_features: usize,
    pub in_features: usize,
}

impl CpuLinear {
    pub fn new(name: &str, parts: &[LinearPart<'_>]) -> Result<Self, BackendError> {
        let bad = |message: String| BackendError::Weight { name: name.to_string(), message };
        let Some(first) = parts.first() else {
            return Err(bad("a linear layer needs at least one weight".into()));
        };
        let in_features = first.weight.shape.last().copied().unwrap_or(0);
        let mut part_starts = Vec::with_capacity(parts.len());
        let mut out_features = 0;
        let any_bias = parts.iter().any(|p| p.bias.is_some());
        let mut bias = Vec::new();
        for part in parts {
            let w = part.weight;
            if w.shape.len() != 2 || w.shape[1] != in_features {
                return Err(bad(format!(
                    "expected a 2-D weight with {in_features} inputs, got shape {:?}",
                    w.shape
                )));
            }
            if w.dtype.row_bytes(in_features).is_none() {
                return Err(bad(format!(
                    "{in_features} inputs is not a whole number of {} blocks",
                    w.dtype
                )));
            }
            let rows = w.shape[0];
            if any_bias {
                match part.bias {
                    Some(b) => {
                        let values = weight_to_f32(name, b)?;
                        if values.len() != rows {
                            return Err(bad(format!(
                                "bias has {} values for {rows} outputs",
                                values.len()
                            )));
                        }
                        bias.extend(values);
                    }
                    None => bias.resize(bias.len() + rows, 0.0),
                }
            }
            part_starts.push(out_features);
            out_features += rows;
        }
        Ok(CpuLinear {
            parts: parts.iter().map(|p| p.weight.clone()).collect(),
            part_starts,
            bias: any_bias.then_some(bias),
            out_features,
            in_features,
        })
    }

    /// Format and bytes of output row `r`.
    fn row(&self, r: usize) -> (DType, &[u8]) {
        let p = self.part_starts.iter().rposition(|&start| start <= r).unwrap_or(0);
        let part = &self.parts[p];
        (part.dtype, part.row(r - self.part_starts[p]))
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
                    let (dtype, row) = self.row(task * ROWS_PER_TASK + i);
                    for (t, o) in outs.iter_mut().enumerate() {
                        *o = dot_row(dtype, row, x.row(t));
                    }
                }
            });
        } else {
            let tasks = 2 * rayon::current_num_threads();
            let rows_per_task = self.out_features.div_ceil(tasks).max(GEMM_MIN_ROWS_PER_TASK);
            out_t
                .par_chunks_mut(rows_per_task * n)
                .enumerate()
                .for_each_init(Vec::new, |decoded, (task, chunk)| {
                    self.gemm_rows(task * rows_per_task, chunk, x, decoded)
                });
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
            let (dtype, row) = self.row(first_row + i);
            dequantize_row(dtype, row, dst);
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
            let (dtype, row) = self.row(id as usize);
            dequantize_row(dtype, row, dst);
        }
        out
    }
}
