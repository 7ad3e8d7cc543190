//! GPTQ (Frantar et al. 2022, arXiv:2210.17323): int4 quantization with error
//! feedback. Columns (input channels) are quantized one at a time, left to right; the
//! rounding error of column i is spread over the columns not yet quantized, weighted by
//! the inverse Hessian `H^-1` of the layer's squared output error, `H = X^T X` over the
//! calibration inputs, so that the output `X W^T` moves as little as it can.
//!
//! With `U` the upper Cholesky factor of `H^-1` (`H^-1 = U^T U`), per row:
//! `q_i = Q(w_i)`, `e = (w_i - q_i) / U_ii`, `w_j -= e U_ij` for j > i. Rows are
//! independent, so they run in parallel. Groups are Qilin's I4 groups (128 consecutive
//! inputs, quantize.rs's `I4Group`): a group's scale and zero are fitted when its first
//! column is reached, on the weights as the errors of the groups before have left them
//! (GPTQ's `group_size` without `desc_act`). The result is written as I4 blocks
//! directly: its levels need not span the whole fitted range, so re-quantizing the
//! dequantized values could pick another grid.
//!
//! `H` is damped by 1% of its mean diagonal (GPTQ's `percdamp`). A channel that never
//! activated on the calibration text gets a unit diagonal, which rounds its weights
//! plainly and keeps them out of the feedback (GPTQ zeroes them instead; they could
//! still matter on other text).

use rayon::prelude::*;

use super::quantize::{I4Group, QuantizeError};
use super::DType;

/// Added to H's diagonal, as a share of its mean (GPTQ's default).
pub const DAMP: f64 = 0.01;

#[derive(Debug, thiserror::Error)]
pub enum GptqError {
    #[error("the calibration Hessian is not positive definite even after damping")]
    NotPositiveDefinite,
    #[error(transparent)]
    Quantize(#[from] QuantizeError),
}

/// Lower Cholesky factor of the row-major SPD `a` `[k, k]`, in place (the upper triangle
/// is left as it was).
fn cholesky(a: &mut [f64], k: usize) -> Result<(), GptqError> {
    for j in 0..k {
        let (done, rest) = a.split_at_mut(j * k);
        let row_j = &mut rest[..k];
        // Row j left of the diagonal: L[j][p] = (a[j][p] - L[j][..p] . L[p][..p]) / L[p][p].
        for p in 0..j {
            let row_p = &done[p * k..p * k + k];
            let dot: f64 = row_j[..p].iter().zip(&row_p[..p]).map(|(x, y)| x * y).sum();
            row_j[p] = (row_j[p] - dot) / row_p[p];
        }
        let d = row_j[j] - row_j[..j].iter().map(|x| x * x).sum::<f64>();
        if !d.is_finite() || d <= 0.0 {
            return Err(GptqError::NotPositiveDefinite);
        }
        row_j[j] = d.sqrt();
    }
    Ok(())
}

/// The inverse of the lower-triangular `l` `[k, k]` (its upper triangle ignored), as a
/// lower-triangular row-major matrix: row i solves `sum_p L[i][p] M[p] = e_i`.
fn lower_inverse(l: &[f64], k: usize) -> Vec<f64> {
    let mut m = vec![0f64; k * k];
    for i in 0..k {
        let (done, rest) = m.split_at_mut(i * k);
        let row = &mut rest[..k];
        for p in 0..i {
            let c = l[i * k + p];
            if c != 0.0 {
                row[..=p]
                    .iter_mut()
                    .zip(&done[p * k..p * k + p + 1])
                    .for_each(|(r, &v)| *r -= c * v);
            }
        }
        row[i] += 1.0;
        let d = l[i * k + i];
        row[..=i].iter_mut().for_each(|r| *r /= d);
    }
    m
}

/// `U` upper triangular with `H^-1 = U^T U`, row-major. With `P` the order reversal and
/// `P H P = L L^T`: `H^-1 = (P L^-T P)(P L^-1 P)`, and `P L^-1 P` is upper triangular.
fn inverse_upper_cholesky(h: &[f64], k: usize) -> Result<Vec<f64>, GptqError> {
    let mut r: Vec<f64> =
        (0..k * k).map(|idx| h[(k - 1 - idx / k) * k + (k - 1 - idx % k)]).collect();
    cholesky(&mut r, k)?;
    let m = lower_inverse(&r, k);
    Ok((0..k * k).map(|idx| m[(k - 1 - idx / k) * k + (k - 1 - idx % k)]).collect())
}

/// Quantizes `w` (`[out, k]`, k a multiple of 128) to I4 rows with GPTQ under
/// `h = X^T X` (`[k, k]`, f64) of the inputs `w` sees. Returns the rows' I4 bytes.
pub fn gptq_i4(w: &[f32], k: usize, h: &[f64]) -> Result<Vec<u8>, GptqError> {
    const GROUP: usize = 128;
    let row_bytes = DType::I4.row_bytes(k).ok_or(QuantizeError::NotATarget(DType::I4))?;
    assert_eq!(h.len(), k * k, "the Hessian of {k} inputs");
    let mut h = h.to_vec();
    let mean_diag = (0..k).map(|i| h[i * k + i].max(0.0)).sum::<f64>() / k as f64;
    let damp = DAMP * if mean_diag > 0.0 { mean_diag } else { 1.0 };
    for i in 0..k {
        // A channel that never activated has a zero row and column: a unit diagonal
        // keeps H invertible and leaves that column out of the feedback.
        if h[i * k + i] <= 0.0 {
            h[i * k + i] = 1.0;
        }
        h[i * k + i] += damp;
    }
    let u = inverse_upper_cholesky(&h, k)?;
    let mut out = vec![0u8; row_bytes * (w.len() / k)];
    out.par_chunks_mut(row_bytes).zip(w.par_chunks(k)).try_for_each_init(
        || (vec![0f64; k], [0u8; GROUP]),
        |(row, levels), (bytes, w)| -> Result<(), GptqError> {
            row.iter_mut().zip(w).for_each(|(r, &v)| *r = v as f64);
            for (g, blk) in bytes.chunks_exact_mut(row_bytes / (k / GROUP)).enumerate() {
                let start = g * GROUP;
                let current: Vec<f32> =
                    row[start..start + GROUP].iter().map(|&v| v as f32).collect();
                let group = I4Group::fit(&current)?;
                for (c, level) in levels.iter_mut().enumerate() {
                    let i = start + c;
                    let q = group.level(row[i] as f32);
                    *level = q;
                    let e = (row[i] - group.value(q) as f64) / u[i * k + i];
                    row[i + 1..]
                        .iter_mut()
                        .zip(&u[i * k + i + 1..i * k + k])
                        .for_each(|(r, &uij)| *r -= e * uij);
                }
                group.write(blk, &levels[..]);
            }
            Ok(())
        },
    )?;
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::quant::dequantize_row;
    use crate::model::quantize::quantize_row_i4;

    /// A tiny xorshift stream in [-0.5, 0.5) (also the awq tests' data).
    pub(crate) fn noise(seed: u64, n: usize) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 1_000_003) as f32 / 1_000_003.0 - 0.5
            })
            .collect()
    }

    fn gram(x: &[f32], n: usize, k: usize) -> Vec<f64> {
        let mut h = vec![0f64; k * k];
        for row in x.chunks(k).take(n) {
            for a in 0..k {
                for b in 0..k {
                    h[a * k + b] += row[a] as f64 * row[b] as f64;
                }
            }
        }
        h
    }

    #[test]
    fn inverse_upper_cholesky_factors_the_inverse() {
        let k = 7;
        let x = noise(1, 20 * k);
        let mut h = gram(&x, 20, k);
        (0..k).for_each(|i| h[i * k + i] += 0.1);
        let u = inverse_upper_cholesky(&h, k).unwrap();
        // U upper, and H (U^T U) = I.
        for i in 0..k {
            for j in 0..i {
                assert_eq!(u[i * k + j], 0.0, "U[{i}][{j}]");
            }
        }
        for a in 0..k {
            for b in 0..k {
                let hinv_ab =
                    |a: usize, b: usize| (0..k).map(|i| u[i * k + a] * u[i * k + b]).sum::<f64>();
                let v: f64 = (0..k).map(|c| h[a * k + c] * hinv_ab(c, b)).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-9, "(H H^-1)[{a}][{b}] = {v}");
            }
        }
    }

    /// On correlated inputs, error feedback must give a lower output error than
    /// rounding each weight alone (plain int4), on the very inputs of the Hessian.
    #[test]
    fn error_feedback_beats_plain_int4_on_its_calibration_inputs() {
        let (out, k, n) = (16, 256, 512);
        let w = noise(2, out * k);
        // Inputs with a shared component: neighbouring channels correlate.
        let base = noise(3, n * k);
        let x: Vec<f32> =
            (0..n * k).map(|i| base[i] + 0.8 * base[(i / k) * k + (i % k) / 8 * 8]).collect();
        let h = gram(&x, n, k);
        let err = |rows: &[u8]| {
            let rb = DType::I4.row_bytes(k).unwrap();
            let mut back = vec![0f32; k];
            let mut total = 0f64;
            for (r, wr) in w.chunks(k).enumerate() {
                dequantize_row(DType::I4, &rows[r * rb..(r + 1) * rb], &mut back);
                for xr in x.chunks(k) {
                    let y: f64 = xr
                        .iter()
                        .zip(wr)
                        .zip(&back)
                        .map(|((&x, &a), &b)| x as f64 * (a - b) as f64)
                        .sum();
                    total += y * y;
                }
            }
            total
        };
        let rb = DType::I4.row_bytes(k).unwrap();
        let mut plain = vec![0u8; rb * out];
        for (r, wr) in w.chunks(k).enumerate() {
            quantize_row_i4(wr, &mut plain[r * rb..(r + 1) * rb]).unwrap();
        }
        let gptq = gptq_i4(&w, k, &h).unwrap();
        let (e_plain, e_gptq) = (err(&plain), err(&gptq));
        assert!(e_gptq < 0.8 * e_plain, "gptq {e_gptq} vs plain {e_plain}");
    }
}
