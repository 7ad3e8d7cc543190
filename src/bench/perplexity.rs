//! Perplexity computed exactly the way llama.cpp's `llama-perplexity` does it (its
//! `perplexity()` in tools/perplexity/perplexity.cpp, the default `--ppl-stride 0` path),
//! so our number and llama.cpp's are comparable on the same text:
//!
//! - the whole text is tokenized once, with the model's bos in front when the model adds
//!   one (llama.cpp's `common_tokenize(ctx, text, add_special = true)`);
//! - it is cut into `n_chunk = tokens / ctx` non-overlapping windows of `ctx` tokens (the
//!   tail that does not fill a window is dropped), at most `--chunks` of them;
//! - every window starts from an empty KV cache, and when the model adds bos its first
//!   token is replaced by bos (llama.cpp swaps it in for the forward pass only);
//! - only the second half is scored: with `first = ctx / 2`, the logits at positions
//!   `first ..= ctx - 2` score tokens `first + 1 ..= ctx - 1`, so `ctx - first - 1` tokens
//!   per window (the model always has at least `first` tokens of context);
//! - NLL per token is `max + ln(sum exp(l - max)) - l[target]` with f32 exponentials summed
//!   in f64; NLL and NLL² accumulate in f64; after each window the running
//!   `exp(nll / count)` is reported;
//! - the final error is llama.cpp's: `ppl * sqrt((E[nll²] - E[nll]²) / (count - 1))`.
//!
//! Forward passes go through the engine's [`Model::forward`] with a batch whose
//! `logits_rows` are exactly the scored positions, so no other logits are computed. A
//! window longer than `batch` tokens is fed in pieces of `batch` tokens (chunked
//! prefill over the paged cache); a `batch` of several windows packs `batch / ctx`
//! windows as separate sequences into one step, as llama.cpp's `n_seq` does.

use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::backend::{Backend, BackendError, Batch, KvCacheShape};
use crate::kv::block_manager::blocks_for;
use crate::model::forward::Model;

#[derive(Debug, thiserror::Error)]
pub enum PerplexityError {
    #[error(
        "--ctx must be at least 4 tokens (half of it is context, the rest is scored), got {0}"
    )]
    CtxTooSmall(usize),
    #[error("--batch must be at least 1")]
    ZeroBatch,
    #[error(
        "--batch {batch} must be smaller than --ctx {ctx} or a multiple of it (as in llama.cpp)"
    )]
    BatchNotMultiple { batch: usize, ctx: usize },
    #[error("--chunks must be at least 1")]
    ZeroChunks,
    #[error(
        "the text tokenizes to only {tokens} tokens; perplexity with --ctx {ctx} needs at least {needed} (two windows): use a longer text or a smaller --ctx"
    )]
    TooShort { tokens: usize, ctx: usize, needed: usize },
    #[error("token id {id} is outside the model's vocabulary (size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("allocating the KV cache for {tokens} tokens: {source}")]
    Cache { tokens: usize, source: BackendError },
}

/// How the text is windowed and fed.
#[derive(Clone, Copy, Debug)]
pub struct PerplexityConfig {
    /// Tokens per window (llama.cpp `-c`).
    pub ctx: usize,
    /// Tokens per forward step (llama.cpp `-b`): below `ctx`, a window is fed in pieces;
    /// a multiple of `ctx`, that many windows run side by side.
    pub batch: usize,
    /// Evaluate at most this many windows (llama.cpp `--chunks`); None: all.
    pub max_chunks: Option<usize>,
    /// Feed every token as a generated row (`Batch::generated`), so the score measures
    /// the numerics of decode steps rather than of prompts.
    pub as_generated: bool,
}

impl PerplexityConfig {
    /// Windows evaluated side by side in one step (llama.cpp's `n_seq`).
    pub fn windows_per_step(&self) -> usize {
        (self.batch / self.ctx).max(1)
    }

    /// Tokens of one forward step, at most.
    pub fn step_tokens(&self) -> usize {
        self.batch.min(self.ctx) * self.windows_per_step()
    }

    pub fn validate(&self) -> Result<(), PerplexityError> {
        if self.ctx < 4 {
            return Err(PerplexityError::CtxTooSmall(self.ctx));
        }
        if self.batch == 0 {
            return Err(PerplexityError::ZeroBatch);
        }
        if self.batch > self.ctx && !self.batch.is_multiple_of(self.ctx) {
            return Err(PerplexityError::BatchNotMultiple { batch: self.batch, ctx: self.ctx });
        }
        if self.max_chunks == Some(0) {
            return Err(PerplexityError::ZeroChunks);
        }
        Ok(())
    }

    /// Windows that will be evaluated for a text of `n_tokens` tokens.
    pub fn n_chunks(&self, n_tokens: usize) -> Result<usize, PerplexityError> {
        self.validate()?;
        if n_tokens < 2 * self.ctx {
            return Err(PerplexityError::TooShort {
                tokens: n_tokens,
                ctx: self.ctx,
                needed: 2 * self.ctx,
            });
        }
        let max = n_tokens / self.ctx;
        Ok(self.max_chunks.map_or(max, |c| c.min(max)))
    }
}

/// One window's contribution, and the running estimate after it.
#[derive(Clone, Debug, Serialize)]
pub struct ChunkScore {
    /// 1-based, as llama.cpp prints it.
    pub index: usize,
    /// Sum of the NLL (natural log) of this window's scored tokens.
    pub nll: f64,
    /// Tokens scored in this window (`ctx - ctx/2 - 1`).
    pub count: usize,
    /// `exp(total nll / total count)` over windows 1..=index.
    pub running_ppl: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PerplexityReport {
    /// Tokens in the whole text (bos included when the model adds one).
    pub n_tokens: usize,
    pub ctx: usize,
    pub batch: usize,
    /// Every token was fed as a generated row (`PerplexityConfig::as_generated`).
    pub as_generated: bool,
    pub n_chunks: usize,
    /// Tokens scored over all windows.
    pub count: usize,
    /// Mean NLL per scored token (nats).
    pub mean_nll: f64,
    pub ppl: f64,
    /// llama.cpp's ± (None when every scored token had the same NLL).
    pub ppl_err: Option<f64>,
    pub chunks: Vec<ChunkScore>,
    /// Wall time of the forward passes and scoring.
    pub seconds: f64,
}

/// Runs every window of `tokens` through `model` and scores it. `bos` is the id that
/// replaces each window's first token (Some only when the model adds bos); `on_chunk`
/// sees each window's score as soon as it is known (for progress output).
pub fn perplexity<B: Backend>(
    model: &mut Model<B>,
    tokens: &[u32],
    bos: Option<u32>,
    config: &PerplexityConfig,
    mut on_chunk: impl FnMut(&ChunkScore),
) -> Result<PerplexityReport, PerplexityError> {
    let n_chunk = config.n_chunks(tokens.len())?;
    let vocab = model.config.vocab_size;
    let evaluated = &tokens[..n_chunk * config.ctx];
    if let Some(&id) = evaluated.iter().chain(bos.as_slice()).find(|&&id| id as usize >= vocab) {
        return Err(PerplexityError::TokenOutOfRange { id, vocab });
    }
    let ctx = config.ctx;
    let n_seq = config.windows_per_step();
    let piece = config.batch.min(ctx);
    let first = ctx / 2;
    let per_window = ctx - first - 1;

    // One fresh region of contiguous blocks per window slot; every step of a window
    // writes its positions before attention reads them, so reusing the region for the
    // next window is the same as clearing the cache.
    let blocks_per_window = blocks_for(ctx);
    let c = &model.config;
    let shape = KvCacheShape {
        num_layers: c.num_layers,
        num_blocks: blocks_per_window * n_seq,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    };
    let mut cache = model
        .backend
        .alloc_kv_cache(shape)
        .map_err(|source| PerplexityError::Cache { tokens: ctx * n_seq, source })?;
    let tables: Vec<Vec<u32>> = (0..n_seq)
        .map(|s| {
            let base = s * blocks_per_window;
            (base..base + blocks_per_window).map(|b| b as u32).collect()
        })
        .collect();

    let started = Instant::now();
    let (mut nll, mut nll2, mut count) = (0.0f64, 0.0f64, 0usize);
    let mut chunks = Vec::with_capacity(n_chunk);
    let mut window = vec![0u32; ctx];
    for group in (0..n_chunk).step_by(n_seq) {
        let in_group = n_seq.min(n_chunk - group);
        let mut window_nll = vec![0.0f64; in_group];
        for piece_start in (0..ctx).step_by(piece) {
            let piece_len = piece.min(ctx - piece_start);
            let mut batch = Batch::default();
            // (row in the batch, window in the group, target token) of every scored row.
            let mut targets = Vec::new();
            for (s, table) in tables.iter().enumerate().take(in_group) {
                let start = (group + s) * ctx;
                window.copy_from_slice(&tokens[start..start + ctx]);
                if let Some(bos) = bos {
                    window[0] = bos;
                }
                let row0 = batch.n_tokens();
                batch.push_seq_of_prompt(
                    &window[piece_start..piece_start + piece_len],
                    piece_start,
                    table,
                    false,
                    if config.as_generated { 0 } else { usize::MAX },
                );
                for pos in piece_start.max(first)..(piece_start + piece_len).min(ctx - 1) {
                    batch.logits_rows.push((row0 + pos - piece_start) as u32);
                    // The original token is the target, never the bos swapped in.
                    targets.push((s, tokens[start + pos + 1]));
                }
            }
            let logits = model.forward(&batch, &mut cache);
            let scored: Vec<f64> = logits
                .par_chunks(vocab)
                .zip(targets.par_iter())
                .map(|(row, &(_, target))| token_nll(row, target))
                .collect();
            for (v, &(s, _)) in scored.iter().zip(&targets) {
                window_nll[s] += v;
                nll2 += v * v;
            }
        }
        for (s, w) in window_nll.into_iter().enumerate() {
            nll += w;
            count += per_window;
            let score = ChunkScore {
                index: group + s + 1,
                nll: w,
                count: per_window,
                running_ppl: (nll / count as f64).exp(),
            };
            on_chunk(&score);
            chunks.push(score);
        }
    }

    let mean = nll / count as f64;
    let ppl = mean.exp();
    let variance = nll2 / count as f64 - mean * mean;
    let ppl_err =
        (variance > 0.0 && count > 1).then(|| (variance / (count - 1) as f64).sqrt() * ppl);
    Ok(PerplexityReport {
        n_tokens: tokens.len(),
        ctx,
        batch: config.batch,
        as_generated: config.as_generated,
        n_chunks: n_chunk,
        count,
        mean_nll: mean,
        ppl,
        ppl_err,
        chunks,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `-log_softmax(row)[target]` as llama.cpp's `log_softmax(n_vocab, logits, tok)`:
/// the max in f32, `expf(l - max)` summed in f64, then `max + ln(sum) - l[target]`.
pub fn token_nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&l| (l - max).exp() as f64).sum();
    -(((row[target as usize] - max) as f64) - sum.ln())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ctx: usize, batch: usize, max_chunks: Option<usize>) -> PerplexityConfig {
        PerplexityConfig { ctx, batch, max_chunks, as_generated: false }
    }

    #[test]
    fn windows_are_counted_like_llama_cpp() {
        // n_chunk = tokens / ctx, capped by --chunks; the partial tail is dropped.
        assert_eq!(cfg(512, 512, None).n_chunks(1024).unwrap(), 2);
        assert_eq!(cfg(512, 512, None).n_chunks(1535).unwrap(), 2);
        assert_eq!(cfg(512, 512, Some(1)).n_chunks(5000).unwrap(), 1);
        assert!(matches!(
            cfg(512, 512, None).n_chunks(1023),
            Err(PerplexityError::TooShort { tokens: 1023, needed: 1024, .. })
        ));
    }

    #[test]
    fn batch_packs_whole_windows_or_splits_one() {
        let c = cfg(512, 2048, None);
        assert_eq!((c.windows_per_step(), c.step_tokens()), (4, 2048));
        let c = cfg(512, 100, None);
        assert_eq!((c.windows_per_step(), c.step_tokens()), (1, 100));
        assert!(matches!(
            cfg(512, 700, None).validate(),
            Err(PerplexityError::BatchNotMultiple { .. })
        ));
        assert!(cfg(2, 2, None).validate().is_err());
        assert!(cfg(8, 0, None).validate().is_err());
        assert!(cfg(8, 8, Some(0)).validate().is_err());
    }

    #[test]
    fn token_nll_is_cross_entropy() {
        // Uniform logits over 4 tokens: ln 4 whatever the target.
        assert!((token_nll(&[3.0; 4], 2) - 4f64.ln()).abs() < 1e-12);
        // [0, ln 3] -> p = [1/4, 3/4].
        let row = [0.0, 3f32.ln()];
        assert!((token_nll(&row, 0) - 4f64.ln()).abs() < 1e-6);
        assert!((token_nll(&row, 1) - (4.0f64 / 3.0).ln()).abs() < 1e-6);
        // Large logits do not overflow (the max is subtracted first).
        assert!((token_nll(&[1000.0, 1000.0], 0) - 2f64.ln()).abs() < 1e-12);
    }
}
