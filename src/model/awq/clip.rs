//! AWQ's second step: activation-aware clipping. A quantization group's step is its
//! range / 15; shrinking the range clips the extreme weights but gives every other
//! weight a finer grid. Judged by the weights alone that trade looks good and is not
//! (bench/notes.md: a weight-MSE clip search made SmolLM2's perplexity worse); here
//! each group's range factor is chosen by the group's own output error on the
//! calibration inputs, `|| X_g (Q(clip(w_g)) - w_g) ||^2`, where `X_g` are the
//! group's input channels (AWQ's `auto_clip`).
//!
//! Candidates shrink both ends of the group's range, `[f lo, f hi]` with `lo = min(min
//! w, 0)` and `hi = max(max w, 0)`, for f = 1, 0.95, ..., 0.55 (AWQ shrinks by at most
//! half). f = 1 is plain quantization, so no group gets worse on the samples. The
//! clipped weights replace the originals; the quantizer then finds exactly the range
//! that was evaluated.
//!
//! Only formats whose blocks are quantized independently qualify (I4, Q4_1, Q8_0): an
//! I8 row shares one scale across all its blocks.

use rayon::prelude::*;

use super::super::quant::dequantize_row;
use super::super::quantize::{quantize_row, QuantizeError};
use super::super::DType;

/// Range factors tried after 1: 0.95 down to 0.55.
const CLIP_STEPS: usize = 9;
const CLIP_STEP: f32 = 0.05;

/// What clipping did to one site.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct ClipOutcome {
    /// Sum over groups of the group output error before and after.
    pub error_before: f64,
    pub error_after: f64,
    /// Groups whose range was shrunk.
    pub clipped_groups: usize,
}

/// Whether `dtype`'s blocks are quantized independently of each other.
pub(super) fn clips(dtype: DType) -> bool {
    matches!(dtype, DType::I4 | DType::Q4_1 | DType::Q8_0)
}

/// `G_g = X_g^T X_g` of every block g of `block` input channels: `[k / block][block,
/// block]` flattened. `x` `[n, k]`.
fn block_grams(x: &[f32], n: usize, k: usize, block: usize) -> Vec<f32> {
    let mut grams = vec![0f32; k * block];
    grams.par_chunks_mut(block * block).enumerate().for_each(|(g, gram)| {
        // gram [block, block] = X_g^T [block, n] . X_g [n, block]; X_g is the column
        // window g*block.. of x, row stride k.
        // SAFETY: both operands address x[t * k + g * block + i] for t < n, i < block,
        // inside x; gram is its own chunk.
        unsafe {
            matrixmultiply::sgemm(
                block,
                n,
                block,
                1.0,
                x.as_ptr().add(g * block),
                1,
                k as isize,
                x.as_ptr().add(g * block),
                k as isize,
                1,
                0.0,
                gram.as_mut_ptr(),
                block as isize,
                1,
            );
        }
    });
    grams
}

/// `d^T G d` in f64.
fn quadratic(gram: &[f32], d: &[f32]) -> f64 {
    gram.chunks(d.len())
        .zip(d)
        .map(|(row, &di)| di as f64 * row.iter().zip(d).map(|(&g, &dj)| g * dj).sum::<f32>() as f64)
        .sum()
}

/// Clips every block of `w` (`[out, k]`, rows to be quantized into `dtype`) to the
/// range factor with the least output error on `x` (`[n, k]`, the inputs `w` sees).
pub(super) fn clip(
    w: &mut [f32],
    k: usize,
    dtype: DType,
    x: &[f32],
    n: usize,
) -> Result<ClipOutcome, QuantizeError> {
    if !clips(dtype) {
        return Err(QuantizeError::NotATarget(dtype));
    }
    let block = dtype.block_elems();
    let block_bytes = dtype.block_bytes();
    let grams = block_grams(x, n, k, block);
    let outcomes = w
        .par_chunks_mut(k)
        .map_init(
            || (vec![0f32; block], vec![0f32; block], vec![0u8; block_bytes], vec![0f32; block]),
            |(clamped, back, bytes, best), row| -> Result<ClipOutcome, QuantizeError> {
                let mut out = ClipOutcome::default();
                for (g, ws) in row.chunks_mut(block).enumerate() {
                    let gram = &grams[g * block * block..(g + 1) * block * block];
                    let lo = ws.iter().fold(0f32, |m, &v| m.min(v));
                    let hi = ws.iter().fold(0f32, |m, &v| m.max(v));
                    let mut best_error = f64::INFINITY;
                    let mut best_step = 0;
                    for step in 0..=CLIP_STEPS {
                        let f = 1.0 - step as f32 * CLIP_STEP;
                        for (c, &v) in clamped.iter_mut().zip(ws.iter()) {
                            *c = v.clamp(f * lo, f * hi);
                        }
                        quantize_row(dtype, clamped, bytes)?;
                        dequantize_row(dtype, bytes, back);
                        back.iter_mut().zip(ws.iter()).for_each(|(b, &v)| *b -= v);
                        let error = quadratic(gram, back);
                        if step == 0 {
                            out.error_before += error;
                        }
                        if error < best_error {
                            (best_error, best_step) = (error, step);
                            best.copy_from_slice(clamped);
                        }
                    }
                    out.error_after += best_error;
                    if best_step > 0 {
                        out.clipped_groups += 1;
                        ws.copy_from_slice(best);
                    }
                }
                Ok(out)
            },
        )
        .collect::<Result<Vec<_>, _>>()?;
    Ok(outcomes.into_iter().fold(ClipOutcome::default(), |a, b| ClipOutcome {
        error_before: a.error_before + b.error_before,
        error_after: a.error_after + b.error_after,
        clipped_groups: a.clipped_groups + b.clipped_groups,
    }))
}

#[cfg(test)]
mod tests {
    use super::super::scale::tests::noise;
    use super::*;

    #[test]
    fn grams_are_the_blocks_of_x_t_x() {
        let (n, k, block) = (5, 64, 32);
        let x = noise(7, n * k);
        let grams = block_grams(&x, n, k, block);
        for g in 0..k / block {
            for i in 0..block {
                for j in 0..block {
                    let c = |t: usize, c: usize| x[t * k + g * block + c] as f64;
                    let expected: f64 = (0..n).map(|t| c(t, i) * c(t, j)).sum();
                    let got = grams[g * block * block + i * block + j] as f64;
                    assert!((got - expected).abs() < 1e-5, "block {g} ({i}, {j})");
                }
            }
        }
    }

    /// One large weight per group and inputs that never use its channel: clipping it
    /// costs nothing on these inputs and refines every other weight, so the search must
    /// clip, and the error on the inputs must drop. The clipped weights are what the
    /// quantizer then sees.
    #[test]
    fn clipping_an_unused_outlier_weight_lowers_the_output_error() {
        let (out, k, n) = (8, 256, 48);
        let mut w = noise(8, out * k);
        let mut x = noise(9, n * k);
        for row in w.chunks_mut(128) {
            row[5] = 3.0;
        }
        for row in x.chunks_mut(128) {
            row[5] = 0.0;
        }
        let before = w.clone();
        let outcome = clip(&mut w, k, DType::I4, &x, n).unwrap();
        assert_eq!(outcome.clipped_groups, out * k / 128, "{outcome:?}");
        assert!(outcome.error_after < 0.75 * outcome.error_before, "{outcome:?}");
        assert!(w.iter().zip(&before).all(|(a, b)| a.abs() <= b.abs()), "clipping only shrinks");
        assert!(w.chunks(128).all(|g| g[5] < 3.0), "the outlier was clipped");
    }

    #[test]
    fn int8_rows_are_not_clipped() {
        let mut w = noise(10, 128);
        assert!(matches!(
            clip(&mut w, 128, DType::I8, &noise(11, 128), 1),
            Err(QuantizeError::NotATarget(DType::I8))
        ));
    }
}
