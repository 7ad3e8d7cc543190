//! Softmax pieces of the CPU attention: `exp(x - max)` 8 lanes at a time, and the
//! AVX2 + FMA compilation of the attention tasks that use it.

/// Compiles `f` (inlined here) for AVX2 and FMA, so that the attention loops inlined into
/// it (dot products, value sums, `exp8`) run 8 lanes wide.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn with_avx2_fma<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Numerically stable softmax of attention scores, in place.
#[inline(always)]
pub(super) fn softmax_in_place(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    exp_minus(scores, max);
    let inv = 1.0 / scores.iter().sum::<f32>();
    scores.iter_mut().for_each(|s| *s *= inv);
}

/// `x = exp(x - max)` for every element: 8 lanes at a time (`exp8`) where they fill a
/// register, libm's `expf` for the rest.
#[inline(always)]
pub(super) fn exp_minus(xs: &mut [f32], max: f32) {
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut lanes = [0.0f32; 8];
        for (l, &x) in lanes.iter_mut().zip(c.iter()) {
            *l = x - max;
        }
        c.copy_from_slice(&exp8(lanes));
    }
    for x in chunks.into_remainder() {
        *x = (*x - max).exp();
    }
}

/// e^x of 8 values (x <= 0 here), Cephes' `expf`: x = n ln 2 + r with |r| <= ln 2 / 2 (ln 2
/// in two parts, so r is exact to f32), e^r by its degree-7 Taylor-like polynomial, times
/// 2^n through the exponent bits. Relative error under 2 ulp against libm (the test below
/// checks 3e-7 over the whole range softmax uses); e^x for x under -87.3 (2^-126) is 0.
/// Plain arrays of 8 lanes: LLVM keeps them in one register under `with_avx2_fma`.
#[inline(always)]
fn exp8(x: [f32; 8]) -> [f32; 8] {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5, // Cephes: 5.0000001201e-1, which f32 rounds to 0.5
    ];
    let mut out = [0.0f32; 8];
    for i in 0..8 {
        let xi = x[i].max(-87.33);
        let n = (xi * LOG2E + 0.5).floor();
        let r = xi - n * LN2_HI - n * LN2_LO;
        let mut y = P[0];
        for &c in &P[1..] {
            y = y * r + c;
        }
        let y = y * r * r + r + 1.0;
        let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
        out[i] = if x[i] < -87.33 { 0.0 } else { y * scale };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp8_matches_libm_over_the_softmax_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let lanes = std::array::from_fn(|i| x - i as f32 * 1e-3);
            for (got, &xi) in exp8(lanes).iter().zip(&lanes) {
                let want = (xi as f64).exp();
                worst = worst.max(((*got as f64) - want).abs() / want);
            }
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp8([-100.0; 8]), [0.0; 8]);
        assert_eq!(exp8([0.0; 8]), [1.0; 8]);
    }
}
