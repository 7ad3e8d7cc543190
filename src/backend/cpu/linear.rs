//! Linear layers on the CPU: weights stay in their file format and are decoded row by
//! row; rows are spread over the rayon pool.

use rayon::prelude::*;

use super::{weight_to_f32, CpuTensor};
use crate::backend::{BackendError, LinearPart};
use crate::model::quant::q8_activations::{self, dot_rows_q8_tokens, Q8Activations, Q8Row};
use crate::model::quant::{dequantize_row, dot_rows};
use crate::model::{DType, WeightTensor};

/// Output rows handed to one rayon task; large enough to amortise scheduling, small
/// enough to balance two to sixteen threads on a 576-row matrix.
const ROWS_PER_TASK: usize = 16;

/// Fewest output rows per rayon task on the GEMM path (prefill). Each task packs all
/// of x again, so tasks are made as large as load balance and GEMM_MAX_TILE_BYTES allow.
const GEMM_MIN_ROWS_PER_TASK: usize = 64;

/// Most bytes of f32 weights one GEMM task decodes, so that they are still in L2 when
/// the multiply packs and reads them. Without the cap, two tasks per thread split the
/// 49152-row logits table of SmolLM2 into 28 MB tiles that went through DRAM three
/// times (decode, pack, multiply) and took a third of a 16-sequence decode step.
const GEMM_MAX_TILE_BYTES: usize = 1 << 20;

/// Up to this many f32 rows, dot products read the encoded rows directly, so each
/// weight byte is read once; above it, tiles of rows are decoded to f32 and multiplied
/// by all rows at once with a GEMM. Rows with 8-bit activations always take the direct
/// integer path, whatever their number, so that a generated token computes the same in
/// any batch.
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
    /// Every part has an integer dot product with 8-bit activations.
    q8_capable: bool,
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
            q8_capable: parts.iter().all(|p| q8_activations::supports(p.weight.dtype)),
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

    /// Output rows `range` as runs of consecutive rows within one part: (format, the
    /// run's bytes, its first row's offset from `range.start`).
    fn row_runs(
        &self,
        range: std::ops::Range<usize>,
    ) -> impl Iterator<Item = (DType, &[u8], usize)> + '_ {
        self.parts.iter().zip(&self.part_starts).filter_map(move |(part, &start)| {
            let (lo, hi) = (range.start.max(start), range.end.min(start + part.rows()));
            (lo < hi).then(|| {
                let row_bytes = part.row(0).len();
                let bytes = &part.bytes()[(lo - start) * row_bytes..(hi - start) * row_bytes];
                (part.dtype, bytes, lo - range.start)
            })
        })
    }

    /// `x [n, in]` -> `[n, out]`. The rows flagged in `q8_rows` (`[n]`, or empty for
    /// none) are multiplied with 8-bit activations when every part has an integer path;
    /// the others in f32. A row's result depends on its flag and on nothing else in `x`,
    /// except that up to DIRECT_DOT_MAX_TOKENS f32 rows are summed in another order than
    /// the GEMM's (float rounding, ~1e-6 relative).
    pub fn forward(&self, x: &CpuTensor, q8_rows: &[bool]) -> CpuTensor {
        assert_eq!(x.cols, self.in_features, "linear input width");
        assert!(q8_rows.is_empty() || q8_rows.len() == x.rows, "one q8 flag per row");
        let n_q8 = if self.q8_capable { q8_rows.iter().filter(|&&q| q).count() } else { 0 };
        let mut out = if n_q8 == 0 {
            self.f32_rows(x)
        } else if n_q8 == x.rows {
            self.direct(x, true)
        } else {
            self.mixed(x, q8_rows)
        };
        if let Some(bias) = &self.bias {
            for row in out.data.chunks_mut(self.out_features) {
                row.iter_mut().zip(bias).for_each(|(o, &b)| *o += b);
            }
        }
        out
    }

    /// Every row in f32: directly for a few rows, through the GEMM for more.
    fn f32_rows(&self, x: &CpuTensor) -> CpuTensor {
        if x.rows <= DIRECT_DOT_MAX_TOKENS {
            self.direct(x, false)
        } else {
            self.gemm(x)
        }
    }

    /// A step mixing both kinds of rows (decodes beside a prefill chunk): each kind
    /// gathered, multiplied on its own path, and scattered back.
    fn mixed(&self, x: &CpuTensor, q8_rows: &[bool]) -> CpuTensor {
        let (q8, plain): (Vec<usize>, Vec<usize>) = (0..x.rows).partition(|&r| q8_rows[r]);
        let gather = |rows: &[usize]| {
            let data = rows.iter().flat_map(|&r| x.row(r).iter().copied()).collect();
            CpuTensor::from_vec(data, rows.len(), x.cols)
        };
        let mut out = CpuTensor::zeros(x.rows, self.out_features);
        let parts =
            [(self.direct(&gather(&q8), true), q8), (self.f32_rows(&gather(&plain)), plain)];
        for (part, rows) in &parts {
            for (i, &r) in rows.iter().enumerate() {
                out.data[r * self.out_features..(r + 1) * self.out_features]
                    .copy_from_slice(part.row(i));
            }
        }
        out
    }

    /// Dot products straight from the encoded rows, so each weight byte is read once per
    /// step; `quantized`: with 8-bit activations.
    fn direct(&self, x: &CpuTensor, quantized: bool) -> CpuTensor {
        let n = x.rows;
        // Computed as [out, n] so that each task owns whole output rows.
        let mut out_t = vec![0.0f32; self.out_features * n];
        let quantized = quantized.then(|| {
            let mut xq = Q8Activations::default();
            xq.quantize(&x.data, x.cols);
            xq
        });
        let q8_rows: Vec<Q8Row<'_>> =
            quantized.as_ref().map_or_else(Vec::new, |xq| (0..n).map(|t| xq.row(t)).collect());
        out_t.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(task, chunk)| {
            let first = task * ROWS_PER_TASK;
            for (dtype, rows, at) in self.row_runs(first..first + chunk.len() / n) {
                let out = &mut chunk[at * n..];
                if quantized.is_some() {
                    dot_rows_q8_tokens(dtype, rows, &q8_rows, out, n);
                } else {
                    for t in 0..n {
                        dot_rows(dtype, rows, x.row(t), &mut out[t..], n);
                    }
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

    /// Prefill-sized inputs: tiles of rows decoded to f32 and multiplied by every token
    /// at once. Each task writes its tile as `[n, rows]`, so that it lands in the output
    /// as one contiguous run per token (a transposed `[rows, n]` tile would scatter
    /// every value `out_features` apart: 14% of a 600-token prefill, measured).
    fn gemm(&self, x: &CpuTensor) -> CpuTensor {
        let n = x.rows;
        let tasks = 2 * rayon::current_num_threads();
        let by_cache = (GEMM_MAX_TILE_BYTES / (4 * self.in_features)).max(GEMM_MIN_ROWS_PER_TASK);
        let rows_per_task =
            self.out_features.div_ceil(tasks).clamp(GEMM_MIN_ROWS_PER_TASK, by_cache);
        let tiles: Vec<(usize, Vec<f32>)> = (0..self.out_features.div_ceil(rows_per_task))
            .into_par_iter()
            .map_init(Vec::new, |decoded, task| {
                let first = task * rows_per_task;
                let rows = rows_per_task.min(self.out_features - first);
                (first, self.gemm_rows(first, rows, x, decoded))
            })
            .collect();
        let mut out = CpuTensor::zeros(n, self.out_features);
        for (first, tile) in tiles {
            let rows = tile.len() / n;
            for (dst, src) in out.data.chunks_mut(self.out_features).zip(tile.chunks(rows)) {
                dst[first..first + rows].copy_from_slice(src);
            }
        }
        out
    }

    /// Output rows `first_row..first_row + rows` for every token, `[n, rows]`: decodes
    /// those weight rows to f32 once, then one f32 GEMM against every token.
    fn gemm_rows(
        &self,
        first_row: usize,
        rows: usize,
        x: &CpuTensor,
        decoded: &mut Vec<f32>,
    ) -> Vec<f32> {
        let (n, k) = (x.rows, self.in_features);
        decoded.resize(rows * k, 0.0);
        for (i, dst) in decoded.chunks_mut(k).enumerate() {
            let (dtype, row) = self.row(first_row + i);
            dequantize_row(dtype, row, dst);
        }
        let mut tile = vec![0.0f32; n * rows];
        // tile [n, rows] = (W [rows, k] . x^T [k, n])^T: C's element (i, j) = (row i,
        // token j) sits at j * rows + i. x is [n, k] row-major.
        // SAFETY: the pointers and strides describe exactly the buffers above, and
        // tile does not alias the inputs.
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
                tile.as_mut_ptr(),
                1,
                rows as isize,
            );
        }
        tile
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::test_rows::xorshift;
    use crate::model::quantize::quantize_row;
    use crate::model::tensor::Bytes;

    fn weight(dtype: DType, rows: usize, cols: usize, seed: u64) -> (WeightTensor, Vec<f32>) {
        let mut next = xorshift(seed);
        let values: Vec<f32> =
            (0..rows * cols).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
        let row_bytes = dtype.row_bytes(cols).unwrap();
        let mut data = vec![0u8; rows * row_bytes];
        let mut decoded = vec![0f32; rows * cols];
        for ((w, out), dec) in
            values.chunks(cols).zip(data.chunks_mut(row_bytes)).zip(decoded.chunks_mut(cols))
        {
            if dtype == DType::F32 {
                out.iter_mut()
                    .zip(w.iter().flat_map(|v| v.to_le_bytes()))
                    .for_each(|(o, b)| *o = b);
            } else {
                quantize_row(dtype, w, out).unwrap();
            }
            dequantize_row(dtype, out, dec);
        }
        let tensor =
            WeightTensor { dtype, shape: vec![rows, cols], data: Bytes::Owned(data.into()) };
        (tensor, decoded)
    }

    /// Activations with one outlier per row, as real hidden states have: the blocks
    /// holding it quantize coarsely, the others finely.
    fn activations(n: usize, cols: usize) -> CpuTensor {
        let data = (0..n * cols)
            .map(|i| if i % cols == 37 { 20.0 } else { ((i * 7919) % 101) as f32 / 50.0 - 1.0 })
            .collect();
        CpuTensor::from_vec(data, n, cols)
    }

    /// Rows through the integer path land within the activation rounding of the f32
    /// path: each input moves by at most half its block's step `d`, so an output moves
    /// by at most `sum |w| * d / 2` over its row. That holds at any number of rows, above
    /// the f32 path's GEMM bound too.
    #[test]
    fn quantized_activations_stay_within_their_rounding_of_f32() {
        let cols = 256;
        let (linear, decoded) = mixed_q_linear(cols);
        for n in [1, 2, 3, 4, 5, 8, 16, 40] {
            let x = activations(n, cols);
            let exact = linear.forward(&x, &[]);
            let q8 = linear.forward(&x, &vec![true; n]);
            let mut moved = 0;
            for t in 0..n {
                let xs = x.row(t);
                let steps: Vec<f32> = xs
                    .chunks(32)
                    .map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0)
                    .collect();
                for (r, w) in decoded.chunks(cols).enumerate() {
                    let bound: f32 =
                        w.iter().enumerate().map(|(i, v)| v.abs() * steps[i / 32] / 2.0).sum();
                    let (e, q) = (
                        exact.data[t * linear.out_features + r],
                        q8.data[t * linear.out_features + r],
                    );
                    assert!(
                        (e - q).abs() <= bound * 1.001 + 1e-4,
                        "n={n} t={t} row {r}: {q} vs {e} (bound {bound})"
                    );
                    moved += (e != q) as usize;
                }
            }
            assert!(moved > 0, "n={n}: the integer path did not run");
        }
    }

    /// A row's result does not depend on what shares its step: an 8-bit row equals
    /// that row multiplied alone, bit for bit, in any mix of flags and batch sizes; an
    /// f32 row equals it up to the GEMM's summation order. A layer with a part that has
    /// no integer path ignores the flags.
    #[test]
    fn each_row_computes_as_it_would_alone() {
        let cols = 256;
        let (linear, _) = mixed_q_linear(cols);
        for (n, pattern) in [(2, 0b01u64), (6, 0b101100), (9, 0b1), (20, 0xF0F0F)] {
            let x = activations(n, cols);
            let flags: Vec<bool> = (0..n).map(|r| pattern >> r & 1 == 1).collect();
            let out = linear.forward(&x, &flags);
            for (r, &q8) in flags.iter().enumerate() {
                let alone = CpuTensor::from_vec(x.row(r).to_vec(), 1, cols);
                let single = linear.forward(&alone, &[q8]);
                let got = out.row(r);
                if q8 {
                    assert_eq!(got, single.row(0), "n={n} row {r} (8-bit)");
                } else {
                    for (a, b) in got.iter().zip(single.row(0)) {
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                            "n={n} row {r}: {a} vs {b}"
                        );
                    }
                }
            }
        }

        let (q4, _) = weight(DType::Q4_1, 8, cols, 1);
        let (plain, _) = weight(DType::F32, 8, cols, 9);
        let parts =
            [LinearPart { weight: &q4, bias: None }, LinearPart { weight: &plain, bias: None }];
        let mixed = CpuLinear::new("mixed_plain", &parts).unwrap();
        let x = activations(3, cols);
        assert_eq!(mixed.forward(&x, &[true, false, true]), mixed.forward(&x, &[]));
    }

    /// A layer stacking every format with an integer path, and its weights decoded to
    /// f32 (`[out, cols]`).
    fn mixed_q_linear(cols: usize) -> (CpuLinear, Vec<f32>) {
        let parts_q = [(DType::Q4_1, 48), (DType::Q8_0, 16), (DType::I4, 8), (DType::I8, 8)];
        let made: Vec<_> =
            parts_q.iter().zip(1u64..).map(|(&(d, r), s)| weight(d, r, cols, s)).collect();
        let parts: Vec<LinearPart<'_>> =
            made.iter().map(|(w, _)| LinearPart { weight: w, bias: None }).collect();
        let linear = CpuLinear::new("mixed_q", &parts).unwrap();
        let decoded = made.iter().flat_map(|(_, d)| d.iter().copied()).collect();
        (linear, decoded)
    }
}
