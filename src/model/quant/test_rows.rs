//! Random weight rows for the block formats' kernel tests: any bytes, with the scales
//! tamed so that every value is finite.

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

/// A row of `n` values of `dtype` (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, I8, I4): finite scales of either
/// sign, and any zero byte for I4 (kernels must not assume z <= 15 even though writers
/// keep it there).
pub fn random_row(dtype: DType, n: usize, next: &mut impl FnMut() -> u64) -> Vec<u8> {
    let mut row: Vec<u8> = (0..dtype.row_bytes(n).unwrap()).map(|_| next() as u8).collect();
    for blk in row.chunks_exact_mut(dtype.block_bytes()) {
        match dtype {
            DType::I8 => {
                let s = (next() % 2000) as f32 / 1e5 - 0.01;
                blk[..4].copy_from_slice(&s.to_le_bytes());
            }
            // f16 exponents below 0x1f: finite scales (d, and dmin for Q4_K).
            DType::Q6_K => blk[209] &= 0xbf,
            _ => {
                // f16 exponents below 0x1f: finite scale (and Q4_1's and Q4_K's min).
                blk[1] &= 0xbf;
                if matches!(dtype, DType::Q4_1 | DType::Q4_K) {
                    blk[3] &= 0xbf;
                }
            }
        }
    }
    row
}
