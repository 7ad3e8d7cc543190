//! GGUF block formats: dequantization of rows and the dot product of a weight row with
//! an f32 activation vector, the hot loop of the CPU backend.
//!
//! Layouts are ggml's (`ggml-common.h`), 32 values per block, little endian:
//! - Q8_0: `d: f16, qs: [i8; 32]`, `x[i] = d * qs[i]`.
//! - Q4_0: `d: f16, qs: [u8; 16]`, `x[i] = d * (nib[i] - 8)`.
//! - Q4_1: `d: f16, m: f16, qs: [u8; 16]`, `x[i] = d * nib[i] + m`.
//!
//! where `nib[i] = qs[i] & 0xF` for `i < 16` and `qs[i - 16] >> 4` for `i >= 16`.
//!
//! `dot_row` runs AVX-512 intrinsics (avx512.rs, Q4_0/Q4_1/Q8_0/I8) or AVX2/FMA ones
//! (x86.rs, every format) when the CPU has them, chosen at run time, and portable Rust
//! otherwise.

#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod decoded_levels;
mod intq;
mod kquants;
pub mod levels;
pub mod q8_activations;
#[cfg(test)]
pub(crate) mod test_rows;
#[cfg(target_arch = "x86_64")]
mod x86;

use super::DType;

/// Values per quantization block in every block format here.
const QK: usize = 32;
/// Accumulator lanes: one AVX2 register of f32.
const LANES: usize = 8;

/// f16 bits to f32, exact for every finite value and infinities (NaNs stay NaN).
/// Branch-free integer/float arithmetic so that it vectorizes, unlike a table or
/// `half`'s scalar path.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    // Shifting exponent+mantissa into f32 position and scaling by 2^112 rebias the
    // exponent (15 -> 127) and turns f16 subnormals into f32 normals, exactly.
    let scaled = (f32::from_bits(em << 13) * f32::from_bits(0x7780_0000)).to_bits();
    let bits = if em >= 0x7c00 { (em << 13) | 0x7f80_0000 } else { scaled };
    f32::from_bits(bits | sign)
}

/// Byte offsets of the f16 fields in each block of `dtype` (its scale, and its min where
/// it has one): what a writer of random blocks keeps finite. Empty for plain floats and
/// I8, whose scale is an f32.
pub fn f16_fields(dtype: DType) -> &'static [usize] {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 | DType::I8 => &[],
        DType::Q8_0 | DType::Q4_0 | DType::Q5_0 | DType::IQ4_NL | DType::IQ4_XS | DType::I4 => &[0],
        DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
        DType::Q2_K => &[80, 82],
        DType::Q3_K => &[108],
        DType::Q6_K => &[208],
    }
}

#[inline(always)]
fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

#[inline(always)]
fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Panics when `row` is not exactly the bytes of `n` values: rows come from tensors the
/// loader validated, so a mismatch is a bug in the caller, not bad input.
fn check_row(dtype: DType, row: &[u8], n: usize) {
    let expected = dtype.row_bytes(n);
    assert!(
        expected == Some(row.len()),
        "{dtype} row of {} bytes does not hold {n} values",
        row.len()
    );
}

/// Dequantizes one row: `out.len()` values from `row`.
pub fn dequantize_row(dtype: DType, row: &[u8], out: &mut [f32]) {
    check_row(dtype, row, out.len());
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = f16_to_f32(le_u16(b, 0));
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = bf16_to_f32(le_u16(b, 0));
            }
        }
        DType::Q8_0 => {
            for (o, blk) in out.chunks_exact_mut(QK).zip(row.chunks_exact(34)) {
                let d = f16_to_f32(le_u16(blk, 0));
                for (o, &q) in o.iter_mut().zip(&blk[2..34]) {
                    *o = d * (q as i8) as f32;
                }
            }
        }
        DType::Q4_0 => {
            for (o, blk) in out.chunks_exact_mut(QK).zip(row.chunks_exact(18)) {
                let d = f16_to_f32(le_u16(blk, 0));
                let (lo, hi) = o.split_at_mut(16);
                for (j, &q) in blk[2..18].iter().enumerate() {
                    lo[j] = d * ((q & 0xf) as i32 - 8) as f32;
                    hi[j] = d * ((q >> 4) as i32 - 8) as f32;
                }
            }
        }
        DType::Q4_1 => {
            for (o, blk) in out.chunks_exact_mut(QK).zip(row.chunks_exact(20)) {
                let d = f16_to_f32(le_u16(blk, 0));
                let m = f16_to_f32(le_u16(blk, 2));
                let (lo, hi) = o.split_at_mut(16);
                for (j, &q) in blk[4..20].iter().enumerate() {
                    lo[j] = d * (q & 0xf) as f32 + m;
                    hi[j] = d * (q >> 4) as f32 + m;
                }
            }
        }
        DType::Q4_K | DType::Q5_K | DType::Q6_K => kquants::dequantize_row(dtype, row, out),
        DType::I8 | DType::I4 => intq::dequantize_row(dtype, row, out),
        DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL | DType::Q2_K | DType::Q3_K | DType::IQ4_XS => {
            decoded_levels::dequantize_row(dtype, row, out)
        }
    }
}

/// Dot product of one weight row (`x.len()` values in `dtype`) with `x`, accumulated
/// in f32.
pub fn dot_row(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    check_row(dtype, row, x.len());
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: the CPU has the features; the row length was checked above.
        if let Some(dot) = unsafe { avx512::dot_row(dtype, row, x) } {
            return dot;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU has the features; the row length was checked above.
        return unsafe { x86::dot_row(dtype, row, x) };
    }
    dot_row_portable(dtype, row, x)
}

/// `out[i * stride]` = `dot_row(dtype, row i of rows, x)` for consecutive rows of
/// `x.len()` values, with the checks and the kernel choice made once: SmolLM2's rows are
/// ~30 ns of work each, of which a per-row dispatch would take a noticeable share.
///
/// Panics when `rows` is not whole rows or `out` is too short (bugs in the caller).
pub fn dot_rows(dtype: DType, rows: &[u8], x: &[f32], out: &mut [f32], stride: usize) {
    let row_bytes = check_rows(dtype, rows, x.len(), out, stride);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has the features; the lengths were checked above.
    if avx512::available() && unsafe { avx512::dot_rows(dtype, rows, row_bytes, x, out, stride) } {
        return;
    }
    for (row, o) in rows.chunks_exact(row_bytes).zip(out.iter_mut().step_by(stride)) {
        *o = dot_row(dtype, row, x);
    }
}

/// The bytes of one row of `values` values of `dtype`, after checking that `rows` is
/// whole rows of it and that `out` has room for each at `stride`: the contract of the
/// batched dot products (`dot_rows`, `q8_activations::dot_rows_q8`). Panics otherwise,
/// a bug in the caller.
fn check_rows(dtype: DType, rows: &[u8], values: usize, out: &[f32], stride: usize) -> usize {
    let row_bytes = dtype.row_bytes(values).filter(|&b| b > 0);
    let count = row_bytes.map(|b| rows.len() / b);
    assert!(
        row_bytes.zip(count).is_some_and(|(b, c)| b * c == rows.len())
            && count.is_some_and(|c| c == 0 || (c - 1) * stride < out.len()),
        "{dtype} rows of {} bytes do not match {values} values and {} outputs",
        rows.len(),
        out.len()
    );
    row_bytes.unwrap_or(1)
}

/// The portable kernels (any CPU); `dot_row` uses them where AVX2/FMA is missing.
pub fn dot_row_portable(dtype: DType, row: &[u8], x: &[f32]) -> f32 {
    check_row(dtype, row, x.len());
    match dtype {
        DType::F32 => dot_plain(row, x, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        DType::F16 => dot_plain(row, x, 2, |b| f16_to_f32(le_u16(b, 0))),
        DType::BF16 => dot_plain(row, x, 2, |b| bf16_to_f32(le_u16(b, 0))),
        DType::Q8_0 => dot_q8_0(row, x),
        DType::Q4_0 => dot_q4(row, x, 18, 2, -8.0, false),
        DType::Q4_1 => dot_q4(row, x, 20, 4, 0.0, true),
        DType::Q4_K | DType::Q5_K | DType::Q6_K => kquants::dot_row_portable(dtype, row, x),
        DType::I8 | DType::I4 => intq::dot_row_portable(dtype, row, x),
        DType::Q5_0 | DType::Q5_1 | DType::IQ4_NL | DType::Q2_K | DType::Q3_K | DType::IQ4_XS => {
            decoded_levels::dot_row_portable(dtype, row, x)
        }
    }
}

/// `sum q[i] * x[i]` of signed bytes `qs` and `xs` (equal lengths, a multiple of
/// LANES) in LANES partial sums, lane l taking every LANES-th value from l: the block
/// body of Q8_0 and I8.
// Lane-indexed loops over parallel fixed-size arrays are the shape LLVM vectorizes.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn i8_dot_lanes(qs: &[u8], xs: &[f32]) -> [f32; LANES] {
    let mut lanes = [0f32; LANES];
    for c in 0..xs.len() / LANES {
        for l in 0..LANES {
            let i = c * LANES + l;
            lanes[l] += (qs[i] as i8) as f32 * xs[i];
        }
    }
    lanes
}

#[inline(always)]
fn hsum(acc: [f32; LANES]) -> f32 {
    // Pairwise, so the rounding does not depend on the vector width LLVM picks.
    let a: [f32; 4] = std::array::from_fn(|i| acc[i] + acc[i + 4]);
    (a[0] + a[2]) + (a[1] + a[3])
}

/// Plain float rows: `width` bytes per value, decoded by `load`.
// Lane-indexed loops over parallel fixed-size arrays are the shape LLVM vectorizes.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn dot_plain(row: &[u8], x: &[f32], width: usize, load: impl Fn(&[u8]) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut xc = x.chunks_exact(LANES);
    let mut rc = row.chunks_exact(width * LANES);
    for (xs, ws) in (&mut xc).zip(&mut rc) {
        for l in 0..LANES {
            acc[l] += load(&ws[l * width..]) * xs[l];
        }
    }
    let mut tail = 0f32;
    for (xv, w) in xc.remainder().iter().zip(rc.remainder().chunks_exact(width)) {
        tail += load(w) * xv;
    }
    hsum(acc) + tail
}

/// `x` as whole blocks of 32; the row length is a multiple of 32 (checked by the caller).
#[inline(always)]
fn x_blocks(x: &[f32]) -> impl Iterator<Item = &[f32; QK]> {
    x.chunks_exact(QK).map(|c| <&[f32; QK]>::try_from(c).expect("chunks_exact yields QK"))
}

// Lane-indexed loops over parallel fixed-size arrays are the shape LLVM vectorizes.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (blk, xs) in row.chunks_exact(34).zip(x_blocks(x)) {
        let d = f16_to_f32(le_u16(blk, 0));
        let s = i8_dot_lanes(&blk[2..34], xs);
        for l in 0..LANES {
            acc[l] += d * s[l];
        }
    }
    hsum(acc)
}

/// Q4_0 and Q4_1: `bytes` per block, nibbles from byte `qs_at`; Q4_0 subtracts
/// `offset` (8) from every nibble, Q4_1 adds its per-block min times the sum of `x`.
// Lane-indexed loops over parallel fixed-size arrays are the shape LLVM vectorizes.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn dot_q4(row: &[u8], x: &[f32], bytes: usize, qs_at: usize, offset: f32, has_min: bool) -> f32 {
    let mut acc = [0f32; LANES];
    for (blk, xs) in row.chunks_exact(bytes).zip(x_blocks(x)) {
        let d = f16_to_f32(le_u16(blk, 0));
        let qs = &blk[qs_at..qs_at + 16];
        let mut s = [0f32; LANES];
        let mut sx = [0f32; LANES];
        for c in 0..16 / LANES {
            for l in 0..LANES {
                let j = c * LANES + l;
                let lo = (qs[j] & 0xf) as f32 + offset;
                let hi = (qs[j] >> 4) as f32 + offset;
                s[l] += lo * xs[j] + hi * xs[j + 16];
                if has_min {
                    sx[l] += xs[j] + xs[j + 16];
                }
            }
        }
        if has_min {
            let m = f16_to_f32(le_u16(blk, 2));
            for l in 0..LANES {
                acc[l] += d * s[l] + m * sx[l];
            }
        } else {
            for l in 0..LANES {
                acc[l] += d * s[l];
            }
        }
    }
    hsum(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_half_on_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            let ours = f16_to_f32(bits);
            let theirs = half::f16::from_bits(bits).to_f32();
            if theirs.is_nan() {
                assert!(ours.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(ours.to_bits(), theirs.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn dispatched_and_portable_kernels_agree() {
        let mut state = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let dtypes = [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::Q8_0,
            DType::Q4_0,
            DType::Q4_1,
            DType::I8,
            DType::I4,
        ];
        for dtype in dtypes {
            for n in [32usize, 64, 96, 576, 1536] {
                if dtype.row_bytes(n).is_none() {
                    continue;
                }
                let mut row: Vec<u8> =
                    (0..dtype.row_bytes(n).unwrap()).map(|_| next() as u8).collect();
                // Finite scales / values: clear the top exponent bit of every f16/bf16.
                match dtype {
                    DType::F32 => row.chunks_exact_mut(4).for_each(|b| b[3] &= 0x3f),
                    DType::F16 | DType::BF16 => row.chunks_exact_mut(2).for_each(|b| b[1] &= 0x3f),
                    _ => row.chunks_exact_mut(dtype.block_bytes()).for_each(|b| {
                        b[1] &= 0x3f;
                        b[3] &= 0x3f;
                    }),
                }
                let x: Vec<f32> = (0..n).map(|_| (next() % 2000) as f32 / 1000.0 - 1.0).collect();
                let mut w = vec![0f32; n];
                dequantize_row(dtype, &row, &mut w);
                let scale: f32 = w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                let portable = dot_row_portable(dtype, &row, &x);
                let mut paths = vec![("dispatched", dot_row(dtype, &row, &x))];
                #[cfg(target_arch = "x86_64")]
                {
                    if x86::available() {
                        // SAFETY: the CPU has the features; the row holds n values.
                        paths.push(("avx2", unsafe { x86::dot_row(dtype, &row, &x) }));
                    }
                    if avx512::available() {
                        // SAFETY: as above.
                        if let Some(v) = unsafe { avx512::dot_row(dtype, &row, &x) } {
                            paths.push(("avx512", v));
                        }
                    }
                }
                for (path, v) in paths {
                    let ok = (v - portable).abs() <= 1e-5 * scale + 1e-30;
                    assert!(ok, "{dtype} n={n} {path}: {v} vs portable {portable}");
                }
            }
        }
    }

    /// The batched entry writes what `dot_row` gives for each row, at its stride, and
    /// nothing between.
    #[test]
    fn dot_rows_equals_dot_row_per_row() {
        let mut next = test_rows::xorshift(0xfeed_5eed_0123_4567);
        for dtype in [DType::Q4_1, DType::Q4_0, DType::Q8_0, DType::I8, DType::I4] {
            let n = 256;
            let rows: Vec<u8> =
                (0..5).flat_map(|_| test_rows::random_row(dtype, n, &mut next)).collect();
            let x: Vec<f32> = (0..n).map(|_| (next() % 2000) as f32 / 1000.0 - 1.0).collect();
            let mut out = vec![f32::NAN; 5 * 3];
            dot_rows(dtype, &rows, &x, &mut out, 3);
            let row_bytes = rows.len() / 5;
            for (i, row) in rows.chunks_exact(row_bytes).enumerate() {
                assert_eq!(out[3 * i], dot_row(dtype, row, &x), "{dtype} row {i}");
                assert!(i == 4 || out[3 * i + 1].is_nan() && out[3 * i + 2].is_nan());
            }
        }
    }

    #[test]
    fn plain_tail_is_included() {
        let w: Vec<f32> = (0..13).map(|i| i as f32).collect();
        let x = vec![1.0f32; 13];
        let bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(dot_row(DType::F32, &bytes, &x), 78.0);
    }
}
