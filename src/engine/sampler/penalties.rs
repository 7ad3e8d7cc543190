//! A sequence's penalty entries for the device path (`Sampler::penalty_row`): the distinct
//! ids of its prompt + output with their output counts, kept across steps so that a step
//! costs O(distinct ids) to hand over (a copy) and O(new output tokens) to update, never a
//! pass over a long prompt. Built on the first device step with penalties; a step the host
//! sampler takes instead leaves it behind, and the next device step catches up.

use std::collections::HashMap;

use crate::backend::PenaltyToken;

#[derive(Default)]
pub(super) struct PenaltyContext {
    /// Distinct ids, prompt first (in first-seen order), then new output ids.
    entries: Vec<PenaltyToken>,
    /// id -> its index in `entries`.
    index: HashMap<u32, usize>,
    /// Length of the prompt the entries were built from (None: not built).
    prompt_len: Option<usize>,
    /// Output tokens already counted.
    outputs_seen: usize,
}

impl PenaltyContext {
    /// The entries of `prompt` + `output` (the same sequence on every call: only output
    /// tokens past the last call are counted; a different prompt length or a shorter
    /// output rebuilds everything).
    pub(super) fn update(&mut self, prompt: &[u32], output: &[u32]) -> &[PenaltyToken] {
        if self.prompt_len != Some(prompt.len()) || output.len() < self.outputs_seen {
            *self = PenaltyContext::default();
            for &id in prompt {
                self.entry(id);
            }
            self.prompt_len = Some(prompt.len());
        }
        for &id in &output[self.outputs_seen..] {
            let e = self.entry(id);
            e.count = e.count.saturating_add(1);
        }
        self.outputs_seen = output.len();
        &self.entries
    }

    fn entry(&mut self, id: u32) -> &mut PenaltyToken {
        let entries = &mut self.entries;
        let i = *self.index.entry(id).or_insert_with(|| {
            entries.push(PenaltyToken { id, count: 0 });
            entries.len() - 1
        });
        &mut self.entries[i]
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::{vecmath, Sampler};
    use crate::backend::{penalize_rows_host, PenaltyBatch};
    use crate::engine::sampling_params::SamplingParams;

    /// The host sampler's penalties on `logits` (sanitized first, as `sample` does), every
    /// logit they touched then rounded to bf16 and sanitized once more: what the device
    /// path's sampler must see. (The last pass matters only where a penalty overflowed to
    /// +inf, e.g. f32::MAX / 0.8: the device sampler, like `sample_row`, reads +inf as
    /// f32::MAX, where the host sampler would carry the +inf into its filters.)
    fn host_then_rounded(s: &mut Sampler, logits: &[f32], prompt: &[u32], out: &[u32]) -> Vec<f32> {
        let mut x = logits.to_vec();
        vecmath::sanitize_max(&mut x);
        s.apply_penalties(&mut x, prompt, out);
        for &(id, _) in &s.touched {
            x[id as usize] = half::bf16::from_f32(x[id as usize]).to_f32();
        }
        s.clear_penalties();
        vecmath::sanitize_max(&mut x);
        x
    }

    fn random_logit(rng: &mut ChaCha8Rng) -> f32 {
        match rng.random_range(0..40) {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            3 => 0.0,
            4 => -0.0,
            5 => f32::MAX,
            // bf16 values of both signs, as the device logits are.
            _ => half::bf16::from_f32(rng.random_range(-30.0f32..30.0)).to_f32(),
        }
    }

    /// The twin on the entries `penalty_row` hands over equals the host sampler's
    /// `apply_penalties` + rounding, step after step of one growing output (the entries
    /// are updated incrementally): repeated and unordered ids, repetition below and above
    /// 1, negative penalties, NaN and infinities, ids outside the vocabulary.
    #[test]
    fn twin_on_the_entries_equals_host_penalties_then_rounding() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for case in 0..300 {
            let vocab = rng.random_range(1..400usize);
            let rep = [1.0, 1.05, 0.8, 1.3, 2.0][case % 5];
            let presence = [0.0, 0.5, -1.5, 2.0][rng.random_range(0..4)];
            let frequency = [0.0, 0.3, -0.7, 2.0][rng.random_range(0..4)];
            let params = SamplingParams {
                repetition_penalty: rep,
                presence_penalty: presence,
                frequency_penalty: frequency,
                ..SamplingParams::default()
            };
            let (mut host, mut device) = (Sampler::new(params.clone()), Sampler::new(params));
            let id = |rng: &mut ChaCha8Rng| rng.random_range(0..vocab as u32 + 3);
            let prompt: Vec<u32> = (0..rng.random_range(0..50)).map(|_| id(&mut rng)).collect();
            let mut output = Vec::new();
            for _step in 0..4 {
                let logits: Vec<f32> = (0..vocab).map(|_| random_logit(&mut rng)).collect();
                let want = host_then_rounded(&mut host, &logits, &prompt, &output);
                let mut batch = PenaltyBatch::default();
                device.penalty_row(&prompt, &output, &mut batch);
                let mut got = logits.clone();
                penalize_rows_host(&mut got, vocab, &batch);
                vecmath::sanitize_max(&mut got); // the sampler's own pass after the kernel
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "case {case}: rep {rep} p {presence} f {frequency}"
                );
                let entries = batch.row_tokens(0);
                let mut ids: Vec<u32> = entries.iter().map(|e| e.id).collect();
                ids.sort_unstable();
                ids.dedup();
                assert_eq!(ids.len(), entries.len(), "case {case}: entries are distinct ids");
                output.extend((0..rng.random_range(1..20)).map(|_| id(&mut rng)));
            }
        }
    }

    /// Without penalties in force a row has no entries; with the repetition penalty off,
    /// only output tokens are listed.
    #[test]
    fn rows_list_only_what_a_penalty_changes() {
        let mut batch = PenaltyBatch::default();
        Sampler::new(SamplingParams::default()).penalty_row(&[1, 2], &[3], &mut batch);
        let params = SamplingParams { presence_penalty: 0.5, ..SamplingParams::default() };
        Sampler::new(params).penalty_row(&[1, 2, 3], &[3, 4, 3], &mut batch);
        assert_eq!(batch.rows.len(), 2);
        assert!(batch.row_tokens(0).is_empty());
        let row: Vec<(u32, u32)> = batch.row_tokens(1).iter().map(|e| (e.id, e.count)).collect();
        assert_eq!(row, [(3, 2), (4, 1)]);
        assert!(batch.any());
    }
}
