//! Fused residual add + RMSNorm: the CPU twin of `kernels/norm.cu`.

/// For each row t of `hidden` values: if `x` is given, `residual[t] += x[t]`; then
/// `out[t] = residual[t] / sqrt(mean(residual[t]^2) + eps) * weight`.
/// residual, x, out: `[n, hidden]`; weight: `[hidden]`.
pub fn add_rms_norm_rows(
    residual: &mut [f32],
    x: Option<&[f32]>,
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    let hidden = weight.len();
    for (t, (res, out)) in residual.chunks_mut(hidden).zip(out.chunks_mut(hidden)).enumerate() {
        if let Some(x) = x {
            for (r, &xi) in res.iter_mut().zip(&x[t * hidden..(t + 1) * hidden]) {
                *r += xi;
            }
        }
        let mean_sq = res.iter().map(|&r| r * r).sum::<f32>() / hidden as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for ((o, &r), &w) in out.iter_mut().zip(res.iter()).zip(weight) {
            *o = r * inv * w;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalised_rows_have_unit_rms_before_scaling() {
        let mut residual = vec![1.0, 2.0, 3.0, 4.0, -2.0, 0.5, 0.0, 8.0];
        let x = vec![0.5; 8];
        let weight = vec![1.0; 4];
        let mut out = vec![0.0; 8];
        add_rms_norm_rows(&mut residual, Some(&x), &weight, 0.0, &mut out);
        assert_eq!(residual[0], 1.5);
        for row in out.chunks(4) {
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
            assert!((rms - 1.0).abs() < 1e-6, "rms {rms}");
        }
    }
}
