//! Softmax pieces of the CPU attention: `exp(x - max)` through the sampler's branch-free
//! `exp_nonpos` (which vectorises), and the AVX2 + FMA compilation of the attention tasks
//! that use it.

use crate::engine::sampler::exp_nonpos;

/// Runs `f` compiled for AVX2 and FMA when the CPU has them (inlined into
/// `with_avx2_fma`, so the attention loops in it, dot products, value sums and
/// `exp_nonpos`, run 8 lanes wide), else as it is.
#[inline(always)]
pub(super) fn avx2_fma_if_present<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { with_avx2_fma(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn with_avx2_fma<R>(f: impl FnOnce() -> R) -> R {
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

/// `x = exp(x - max)` for every element (max the slice's maximum, so every x - max <= 0).
#[inline(always)]
pub(super) fn exp_minus(xs: &mut [f32], max: f32) {
    for x in xs {
        *x = exp_nonpos(*x - max);
    }
}
