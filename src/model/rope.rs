//! cos/sin tables for rotary position embeddings, grown on demand and shared by every
//! layer of a step.

use super::RopeConfig;

/// cos and sin of `position * inv_freq[i]`, already multiplied by the rope's attention
/// factor (YaRN), for positions `0..len()`.
pub struct RopeTable {
    inv_freq: Vec<f32>, // [head_dim / 2]
    attention_factor: f32,
    pub cos: Vec<f32>, // [positions, head_dim / 2]
    pub sin: Vec<f32>, // [positions, head_dim / 2]
}

impl RopeTable {
    pub fn new(rope: &RopeConfig, head_dim: usize) -> Self {
        let (inv_freq, attention_factor) = rope.inv_freq(head_dim);
        RopeTable {
            inv_freq: inv_freq.iter().map(|&f| f as f32).collect(),
            attention_factor: attention_factor as f32,
            cos: Vec::new(),
            sin: Vec::new(),
        }
    }

    pub fn half_dim(&self) -> usize {
        self.inv_freq.len()
    }

    pub fn len(&self) -> usize {
        self.cos.len() / self.half_dim().max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.cos.is_empty()
    }

    /// Makes sure positions `0..n` are in the table.
    pub fn ensure(&mut self, n: usize) {
        let have = self.len();
        if n <= have {
            return;
        }
        // Grow geometrically so a long decode does not recompute the table every step.
        let target = n.max(have * 2).max(256);
        for pos in have..target {
            for &f in &self.inv_freq {
                // The angle is rounded to f32 as transformers computes it (f32 matmul of
                // positions and inv_freq), then cos/sin are taken exactly.
                let angle = (pos as f32 * f) as f64;
                self.cos.push((angle.cos() * self.attention_factor as f64) as f32);
                self.sin.push((angle.sin() * self.attention_factor as f64) as f32);
            }
        }
    }

    /// (cos, sin) rows for one position; `ensure` must have covered it.
    pub fn at(&self, pos: usize) -> (&[f32], &[f32]) {
        let h = self.half_dim();
        (&self.cos[pos * h..(pos + 1) * h], &self.sin[pos * h..(pos + 1) * h])
    }
}
