//! Random weight rows for the block formats' kernel tests: any bytes, with the scales
//! tamed so that every value is finite.

use super::f16_fields;
use crate::model::DType;

/// xorshift64: random bytes without a dependency on the rand crate's stream.
pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// A row of `n` values of any block format of `dtype`: finite scales of either
/// sign, and any zero byte for I4 (kernels must not assume z <= 15 even though writers
/// keep it there).
pub fn random_row(dtype: DType, n: usize, next: &mut impl FnMut() -> u64) -> Vec<u8> {
    let mut row: Vec<u8> = (0..dtype.row_bytes(n).unwrap()).map(|_| next() as u8).collect();
    for blk in row.chunks_exact_mut(dtype.block_bytes()) {
        if dtype == DType::I8 {
            let s = (next() % 2000) as f32 / 1e5 - 0.01;
            blk[..4].copy_from_slice(&s.to_le_bytes());
        }
        // f16 exponents below 0x1f: finite scales and mins.
        for &at in f16_fields(dtype) {
            blk[at + 1] &= 0xbf;
        }
    }
    row
}
