//! The vocab-wide loops of the sampler (152064 entries for Qwen2.5), shaped so the compiler
//! vectorises them: fixed-width lane arrays instead of sequential float reductions (which
//! LLVM may not reorder), and a branch-free `exp`. On x86-64 with AVX2+FMA (checked once at
//! run time) the same code is compiled a second time for those features.

/// Lane count of the manual reductions: one AVX register of f32, two SSE registers.
const LANES: usize = 8;

/// e^x for x <= 0; exactly 0 below about -87.68 (e^-87.68 ≈ 2^-126.5, the edge of the
/// normal f32 range) and for -inf: a probability that far under the best token's is
/// nothing. Cephes' `expf` reduction and polynomial: relative error under 2e-7 on [-87, 0]
/// (tested against f64 `exp`). Branch-free, so loops around it vectorise; `f32::exp` is a
/// libm call per element (about 10x slower here).
#[inline(always)]
pub fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer and leaves that integer in the low bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.max(-88.0);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n built in the exponent field; n = -127 gives the bits of +0.0, so the result is 0
    // without a select (a select here stops LLVM from vectorising the callers).
    let n_int = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let pow2n = f32::from_bits((n_int.wrapping_add(127).max(0) as u32) << 23);
    e * pow2n
}

/// Calls `$generic` through a copy compiled for AVX2+FMA when the CPU has those features
/// (twice the lanes of the x86-64 baseline's SSE2), else directly.
macro_rules! dispatch {
    ($generic:ident, $avx:ident, ($($arg:ident : $ty:ty),*) -> $ret:ty) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $avx($($arg: $ty),*) -> $ret {
                $generic($($arg),*)
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the features `$avx` was compiled for were detected on this CPU.
                return unsafe { $avx($($arg),*) };
            }
        }
        $generic($($arg),*)
    }};
}

/// Replaces NaN by -inf and +inf by `f32::MAX` (so `x - max` never makes a NaN), and
/// returns the largest value (-inf when every entry is -inf or NaN).
pub fn sanitize_max(x: &mut [f32]) -> f32 {
    dispatch!(sanitize_max_generic, sanitize_max_avx2, (x: &mut [f32]) -> f32)
}

#[inline(always)]
fn sanitize_max_generic(x: &mut [f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            let v = clean(c[j]);
            c[j] = v;
            m[j] = m[j].max(v);
        }
    }
    let mut best = m.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for v in chunks.into_remainder() {
        *v = clean(*v);
        best = if *v > best { *v } else { best };
    }
    best
}

/// `max`/`min` rather than branches: they ignore NaN, and they vectorise reliably.
#[inline(always)]
#[allow(clippy::manual_clamp)] // `clamp` keeps NaN; turning NaN into -inf is the point.
fn clean(v: f32) -> f32 {
    v.max(f32::NEG_INFINITY).min(f32::MAX)
}

/// First index of the largest value, 0 when `x` is empty. `x` must hold no NaN.
pub fn argmax(x: &[f32]) -> usize {
    dispatch!(argmax_generic, argmax_avx2, (x: &[f32]) -> usize)
}

#[inline(always)]
fn argmax_generic(x: &[f32]) -> usize {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            m[j] = if c[j] > m[j] { c[j] } else { m[j] };
        }
    }
    let best = chunks.remainder().iter().chain(m.iter()).fold(f32::NEG_INFINITY, |a, &b| {
        if b > a {
            b
        } else {
            a
        }
    });
    x.iter().position(|&v| v == best).unwrap_or(0)
}

/// Σ_i e^((x_i - max) * inv_t), each term 0 under `floor`; the terms go to `out` (same
/// length as `x`) when given, and the sum of every `chunk`-long run to `chunk_sums`.
/// `max` must be at least every x_i so the exponents are <= 0.
pub fn exp_sum(
    x: &[f32],
    max: f32,
    inv_t: f32,
    floor: f32,
    out: Option<&mut [f32]>,
    chunk: usize,
    chunk_sums: &mut Vec<f64>,
) -> f64 {
    chunk_sums.clear();
    match out {
        Some(out) => {
            for (xc, oc) in x.chunks(chunk).zip(out.chunks_mut(chunk)) {
                chunk_sums.push(exp_chunk(xc, max, inv_t, floor, oc) as f64);
            }
        }
        None => {
            let mut scratch = [0.0f32; 0];
            for xc in x.chunks(chunk) {
                chunk_sums.push(exp_chunk(xc, max, inv_t, floor, &mut scratch) as f64);
            }
        }
    }
    chunk_sums.iter().sum()
}

/// One chunk of `exp_sum`; `out` is either as long as `x` or empty (sum only).
fn exp_chunk(x: &[f32], max: f32, inv_t: f32, floor: f32, out: &mut [f32]) -> f32 {
    dispatch!(exp_chunk_generic, exp_chunk_avx2,
        (x: &[f32], max: f32, inv_t: f32, floor: f32, out: &mut [f32]) -> f32)
}

#[inline(always)]
fn exp_chunk_generic(x: &[f32], max: f32, inv_t: f32, floor: f32, out: &mut [f32]) -> f32 {
    let term = |v: f32| {
        let e = exp_nonpos((v - max) * inv_t);
        if e < floor {
            0.0
        } else {
            e
        }
    };
    let mut acc = [0.0f32; LANES];
    let n = x.len() / LANES * LANES;
    if out.len() == x.len() {
        for (xc, oc) in x[..n].chunks_exact(LANES).zip(out[..n].chunks_exact_mut(LANES)) {
            for j in 0..LANES {
                let e = term(xc[j]);
                oc[j] = e;
                acc[j] += e;
            }
        }
        for (v, o) in x[n..].iter().zip(&mut out[n..]) {
            *o = term(*v);
            acc[0] += *o;
        }
    } else {
        for xc in x[..n].chunks_exact(LANES) {
            for j in 0..LANES {
                acc[j] += term(xc[j]);
            }
        }
        for v in &x[n..] {
            acc[0] += term(*v);
        }
    }
    acc.iter().sum()
}

/// Orders (value, id) pairs best first: larger value, then lower id. A total order for
/// NaN-free values, so every selection below is deterministic.
#[inline]
pub fn better(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Up to this k a single pass with a sorted k-entry list beats building a full-vocab
/// buffer for `select_nth_unstable`.
const SCAN_MAX_K: usize = 128;

/// The `k` best (value, id) entries of `x` (NaN-free), best first, ties by lower id.
/// `scratch` is a reusable buffer for large k.
pub fn top_k(x: &[f32], k: usize, out: &mut Vec<(f32, u32)>, scratch: &mut Vec<(f32, u32)>) {
    out.clear();
    let k = k.min(x.len());
    if k == 0 {
        return;
    }
    if k <= SCAN_MAX_K {
        top_k_scan(x, k, out);
        return;
    }
    scratch.clear();
    scratch.extend(x.iter().enumerate().map(|(i, &v)| (v, i as u32)));
    if k < scratch.len() {
        scratch.select_nth_unstable_by(k - 1, better);
        scratch.truncate(k);
    }
    scratch.sort_unstable_by(better);
    out.extend_from_slice(scratch);
}

fn top_k_scan(x: &[f32], k: usize, out: &mut Vec<(f32, u32)>) {
    dispatch!(top_k_scan_generic, top_k_scan_avx2, (x: &[f32], k: usize, out: &mut Vec<(f32, u32)>) -> ())
}

#[inline(always)]
fn top_k_scan_generic(x: &[f32], k: usize, out: &mut Vec<(f32, u32)>) {
    const BLOCK: usize = 16;
    let insert = |out: &mut Vec<(f32, u32)>, v: f32, i: usize| {
        if out.len() == k {
            if v <= out[k - 1].0 {
                return;
            }
            out.pop();
        }
        // After the equal values already there: they have lower ids.
        let pos = out.partition_point(|&(w, _)| w >= v);
        out.insert(pos, (v, i as u32));
    };
    for (b, block) in x.chunks(BLOCK).enumerate() {
        // Most blocks hold nothing better than the current k-th: one vectorised max skips them.
        if out.len() == k {
            let m = block.iter().fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
            if m <= out[k - 1].0 {
                continue;
            }
        }
        for (j, &v) in block.iter().enumerate() {
            insert(out, v, b * BLOCK + j);
        }
    }
}

/// Appends to `out` (as returned by [`top_k`]) the entries of `x` that tie with its last
/// value but were left out for their higher id: HF and vLLM keep every tie of the k-th.
pub fn extend_ties(x: &[f32], out: &mut Vec<(f32, u32)>) {
    let Some(&(thr, last)) = out.last() else { return };
    let start = last as usize + 1;
    for (i, &v) in x.iter().enumerate().skip(start) {
        if v == thr {
            out.push((v, i as u32));
        }
    }
}

/// Moves to the front of `items` ((probability, id), any order) the smallest best-first
/// set whose mass reaches `target` and returns its size: an item is in it when the mass of
/// the items ranked strictly before it (by [`better`]) is below `target`. A quickselect
/// that keeps one side, expected O(n), instead of sorting everything: a nearly flat
/// distribution has a nucleus of most of the vocabulary.
pub fn top_p_cut(items: &mut [(f32, u32)], target: f64) -> usize {
    let (mut lo, mut hi) = (0, items.len());
    // Mass of items[..lo], all known to be in the set.
    let mut above = 0.0f64;
    while hi - lo > 64 {
        let mid = lo + (hi - lo) / 2;
        items[lo..hi].select_nth_unstable_by(mid - lo, better);
        let upper: f64 = items[lo..mid].iter().map(|c| c.0 as f64).sum();
        if above + upper >= target {
            // The pivot is out; the cut lies in [lo, mid].
            hi = mid;
        } else {
            above += upper + items[mid].0 as f64;
            lo = mid + 1;
        }
    }
    items[lo..hi].sort_unstable_by(better);
    for (i, c) in items[lo..hi].iter().enumerate() {
        if above >= target {
            return lo + i;
        }
        above += c.0 as f64;
    }
    hi
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_f64_exp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp_nonpos(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(-88.0), 0.0);
        assert_eq!(exp_nonpos(-1e30), 0.0);
    }

    #[test]
    fn top_k_paths_agree_with_full_sort() {
        // Coarse values so ties are common, as with bf16 logits.
        let x: Vec<f32> = (0..5000u32).map(|i| ((i * 7919) % 97) as f32 * 0.5).collect();
        let mut all: Vec<(f32, u32)> = x.iter().enumerate().map(|(i, &v)| (v, i as u32)).collect();
        all.sort_by(better);
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        for k in [1, 5, 128, 129, 1000, 5000, 9000] {
            top_k(&x, k, &mut out, &mut scratch);
            assert_eq!(out, all[..k.min(x.len())], "k={k}");
        }
    }

    #[test]
    fn top_p_cut_is_the_sorted_prefix() {
        for n in [1usize, 10, 65, 1000, 20_000] {
            let mut items: Vec<(f32, u32)> =
                (0..n as u32).map(|i| (((i * 7919) % 61) as f32 + 1.0, i)).collect();
            let total: f64 = items.iter().map(|c| c.0 as f64).sum();
            let mut sorted = items.clone();
            sorted.sort_by(better);
            for frac in [0.0, 0.01, 0.3, 0.5, 0.9, 0.999, 1.0] {
                let target = frac * total;
                let mut above = 0.0;
                let want = sorted.iter().take_while(|c| {
                    let keep = above < target;
                    above += c.0 as f64;
                    keep
                });
                let mut want: Vec<(f32, u32)> = want.copied().collect();
                let cut = top_p_cut(&mut items, target);
                let mut got = items[..cut].to_vec();
                got.sort_by(better);
                want.sort_by(better);
                assert_eq!(got, want, "n={n} frac={frac}");
            }
        }
    }

    #[test]
    fn sanitize_and_argmax() {
        let mut x = vec![1.0, f32::NAN, 3.0, 3.0, f32::INFINITY, -2.0, 0.0, 0.0, 0.0, 9.0];
        assert_eq!(sanitize_max(&mut x), f32::MAX);
        assert_eq!(x[1], f32::NEG_INFINITY);
        assert_eq!(argmax(&x), 4);
        let mut y = vec![f32::NAN; 11];
        assert_eq!(sanitize_max(&mut y), f32::NEG_INFINITY);
        assert_eq!(argmax(&y), 0);
    }
}
