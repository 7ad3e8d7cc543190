//! Sampler: the raw logits of one sequence -> the next token and its logprobs.
//!
//! One step, in this order (the references are HF transformers' logits processors and
//! vLLM's sampler; OpenAI's for presence/frequency):
//! 1. NaN logits become -inf, +inf becomes `f32::MAX` (in place; nothing panics). When
//!    every logit is -inf or NaN the step picks token 0 with logprob -inf.
//! 2. Logprobs: `logprob` of the chosen token and the `top_logprobs` best tokens (best
//!    first, ties by lower id) come from log_softmax of the RAW logits, before penalties
//!    and temperature (vLLM's default, OpenAI's meaning).
//! 3. Penalties, in place: repetition (HF `RepetitionPenaltyLogitsProcessor`: each distinct
//!    token of prompt + output once, logit > 0 divided, otherwise multiplied), then
//!    frequency and presence (OpenAI, output tokens only:
//!    `logit -= frequency * count + presence * (count > 0)`), vLLM's order.
//! 4. Temperature 0 (or negative/NaN, or so small that 1/T overflows): greedy argmax of the
//!    penalised logits, ties to the lowest id.
//! 5. Otherwise HF's warper order: logits / T, top-k (keeps every tie of the k-th value, as
//!    HF and vLLM do), top-p (the smallest best-first set whose mass >= top_p, renormalised
//!    over what top-k kept; always at least one token), min-p (drop tokens whose
//!    probability < min_p * the best one's), then one draw from the renormalised rest.
//!    Probabilities below e^-87.7 of the best token's count as 0.
//!
//! Randomness is per request: ChaCha8 seeded with `seed` (OS entropy when None), one f64
//! draw `u` per sampled step (temperature > 0, even when every logit is -inf), so the same
//! seed and logits give the same tokens. The draw walks the survivors in token-id order and
//! takes the first whose cumulative mass exceeds `u * total`, on every path (the device
//! kernel walks the same order). Step 5's filters and that draw are [`sample_row`], which
//! is also `CpuBackend::sample_rows`, the twin of the device sampler: a step that
//! [`Sampler::device_eligible`] allows takes its `u` from [`Sampler::device_row`] here and
//! is sampled wherever the logits are.
//!
//! Penalties on the device: when the backend takes them (`Backend::device_penalties`),
//! `device_eligible` also allows a step with penalties (still no logprobs) and
//! [`Sampler::penalty_row`] hands over the sequence's distinct prompt + output ids with
//! their output counts. The backend then applies steps 1 and 3 to those logits in f32
//! exactly as here and ROUNDS each penalised value to bf16 (round to nearest even;
//! `backend::cpu::penalize_row_bf16` is the twin) before step 4/5, because the device
//! sampler works on bf16 logits: such a step equals this sampler on logits whose
//! penalised tokens were rounded to bf16 after the penalties, nothing else (and a
//! penalised value that overflows to +inf, e.g. f32::MAX / 0.8, then counts as f32::MAX,
//! as any +inf logit does there).
//!
//! Cost: a full-vocab pass for the raw log-sum-exp always; top-k/top_logprobs by a
//! threshold scan (small k) or `select_nth_unstable` (large k); top-p without top-k looks
//! among the best 64 tokens first, else runs a mass-weighted quickselect (expected O(vocab),
//! no full sort even for a flat distribution); a sparse draw sorts its survivors by id.
//! Buffers live in the `Sampler` and are reused.

mod penalties;
mod vecmath;

/// Also the CPU attention's softmax exponential (`backend::cpu::softmax`).
pub(crate) use vecmath::exp_nonpos;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::sampling_params::SamplingParams;
use crate::backend::{PenaltyBatch, RowSampling};

/// A token and its log-probability under the model (log-softmax of the raw logits).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

/// The outcome of one sampling step.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token_id: u32,
    /// Log-probability of `token_id` under the raw model distribution.
    pub logprob: f32,
    /// The `top_logprobs` most likely tokens under the raw distribution, best first.
    pub top_logprobs: Vec<TokenLogprob>,
}

/// Entries per partial sum of the dense distribution: a draw walks the sums, then one chunk.
const CHUNK: usize = 4096;

/// Top-p without top-k first looks for the nucleus among this many best tokens.
const TOP_P_FIRST_K: usize = 64;

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    sel: Selector,
    /// (raw logit, id) of the `top_logprobs` best tokens.
    top: Vec<(f32, u32)>,
    /// [vocab] occurrences of each token in the output; all zero between calls.
    counts: Vec<u32>,
    /// [vocab] penalised this step already; all false between calls.
    seen: Vec<bool>,
    /// (id, raw logit) of every token the penalties changed this step.
    touched: Vec<(u32, f32)>,
    /// The distinct prompt + output ids and output counts of the device path.
    context: penalties::PenaltyContext,
}

/// The filters of a sampled step (step 5 of the module comment), after the penalties.
#[derive(Clone, Copy, Debug)]
struct Filters {
    /// 1/T; None for greedy.
    inv_t: Option<f32>,
    /// 0: off.
    top_k: usize,
    top_p: f32,
    min_p: f32,
}

/// The buffers of the filters and the draw, reused across steps.
#[derive(Default)]
struct Selector {
    /// [vocab] unnormalised probabilities e^((logit - max) / T) of the dense path.
    probs: Vec<f32>,
    /// [ceil(vocab / CHUNK)] sums of `probs` per chunk.
    chunk_sums: Vec<f64>,
    /// Sparse path: (logit, then unnormalised probability, token id), best first.
    cand: Vec<(f32, u32)>,
    /// Scratch of the large-k selection: up to [vocab] (logit, id).
    scratch: Vec<(f32, u32)>,
}

/// What the filters left: one token, or a distribution in `probs` or in `cand`.
enum Choice {
    Token(u32),
    Dense { total: f64 },
    Sparse { total: f64 },
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Sampler {
            params,
            rng,
            sel: Selector::default(),
            top: Vec::new(),
            counts: Vec::new(),
            seen: Vec::new(),
            touched: Vec::new(),
            context: penalties::PenaltyContext::default(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token. `logits`: [vocab] raw logits, modified in place (NaN cleaned,
    /// penalties applied); `prompt`: the prompt ids; `output`: ids generated so far. Ids
    /// outside the vocab in `prompt`/`output` are ignored.
    pub fn sample(&mut self, logits: &mut [f32], prompt: &[u32], output: &[u32]) -> Sampled {
        let raw_max = vecmath::sanitize_max(logits);
        let n_top = self.params.top_logprobs.unwrap_or(0);
        if n_top > 0 {
            vecmath::top_k(logits, n_top, &mut self.top, &mut self.sel.scratch);
        } else {
            self.top.clear();
        }
        // With T = 1 and no penalty, the terms of the log-sum-exp pass are the unnormalised
        // probabilities the dense and top-p paths need: keep them instead of exponentiating
        // twice. (Top-k only exponentiates its k candidates.)
        let filters = self.filters();
        let reuse = filters.inv_t == Some(1.0)
            && !filters.top_k_active(logits.len())
            && !self.penalties_apply(prompt, output);
        let sel = &mut self.sel;
        if reuse {
            sel.probs.resize(logits.len(), 0.0);
        }
        let out = if reuse { Some(&mut sel.probs[..]) } else { None };
        let raw_sum = vecmath::exp_sum(logits, raw_max, 1.0, 0.0, out, CHUNK, &mut sel.chunk_sums);
        let lse = raw_max + (raw_sum as f32).ln();

        self.apply_penalties(logits, prompt, output);
        let choice = self.choose(logits, raw_max, reuse.then_some(raw_sum));
        // One draw per sampled step, whatever the filters left (device_row draws the same).
        let u = if self.filters().inv_t.is_some() { self.uniform() } else { 0.0 };
        let token_id = self.sel.draw(choice, u);
        let raw = self.raw_logit(logits, token_id);
        self.clear_penalties();

        let logprob =
            |l: f32| if raw_max == f32::NEG_INFINITY { f32::NEG_INFINITY } else { l - lse };
        Sampled {
            token_id,
            logprob: logprob(raw),
            top_logprobs: (self.top.iter())
                .map(|&(l, id)| TokenLogprob { token_id: id, logprob: logprob(l) })
                .collect(),
        }
    }

    /// The distribution `sample` draws from for these logits: [vocab] probabilities after
    /// penalties, temperature and filters (one-hot for greedy). For tests and diagnostics;
    /// allocates. Modifies `logits` as `sample` does; draws nothing.
    pub fn distribution(&mut self, logits: &mut [f32], prompt: &[u32], output: &[u32]) -> Vec<f32> {
        let raw_max = vecmath::sanitize_max(logits);
        self.apply_penalties(logits, prompt, output);
        let mut dist = vec![0.0f32; logits.len()];
        match self.choose(logits, raw_max, None) {
            Choice::Token(t) => {
                if let Some(p) = dist.get_mut(t as usize) {
                    *p = 1.0;
                }
            }
            Choice::Dense { total } => {
                for (d, &p) in dist.iter_mut().zip(&self.sel.probs) {
                    *d = (p as f64 / total) as f32;
                }
            }
            Choice::Sparse { total } => {
                for &(p, id) in &self.sel.cand {
                    dist[id as usize] = (p as f64 / total) as f32;
                }
            }
        }
        self.clear_penalties();
        dist
    }

    /// Whether the next `sample` is the plain argmax of the logits (greedy, no penalty
    /// in force) with nothing else wanted from them (no logprobs), so the backend's
    /// `argmax_rows` may choose in its place.
    pub fn is_plain_argmax(&self, prompt: &[u32], output: &[u32]) -> bool {
        self.filters().inv_t.is_none()
            && self.params.top_logprobs.is_none()
            && !self.penalties_apply(prompt, output)
    }

    /// Whether the next `sample` may be made from the logits alone with a uniform drawn
    /// here (`device_row`), by [`sample_row`] wherever the logits are: no logprobs wanted,
    /// no penalty in force unless `device_penalties` (the backend applies them with the
    /// bf16 rounding of the module comment, from `penalty_row`), and parameters in their
    /// validated ranges (greedy included).
    pub fn device_eligible(&self, prompt: &[u32], output: &[u32], device_penalties: bool) -> bool {
        let p = &self.params;
        p.top_logprobs.is_none()
            && (device_penalties || !self.penalties_apply(prompt, output))
            && p.top_p > 0.0
            && p.top_p <= 1.0
            && (0.0..=1.0).contains(&p.min_p)
            && u32::try_from(p.top_k).is_ok()
    }

    /// This step's row for `Backend::sample_rows`, consuming its one draw exactly as
    /// `sample` would (none for greedy). Only after `device_eligible` said yes; the token
    /// that comes back is the step's token.
    pub fn device_row(&mut self) -> RowSampling {
        let u = if self.filters().inv_t.is_some() { self.uniform() } else { 0.0 };
        let p = &self.params;
        RowSampling {
            temperature: p.temperature,
            top_k: u32::try_from(p.top_k).unwrap_or(u32::MAX),
            top_p: p.top_p,
            min_p: p.min_p,
            u,
        }
    }

    /// Appends this step's row to `batch` for `Backend::sample_rows_penalized`: the
    /// penalties and the distinct ids they change (every prompt + output id when the
    /// repetition penalty is on, else the output ids), each with its output count; a row
    /// without entries when no penalty is in force. Costs O(those ids) (a copy) plus the
    /// output tokens since the last call, not a pass over the prompt.
    pub fn penalty_row(&mut self, prompt: &[u32], output: &[u32], batch: &mut PenaltyBatch) {
        if !self.penalties_apply(prompt, output) {
            batch.push_none();
            return;
        }
        let p = &self.params;
        let rep_on = p.repetition_penalty != 1.0;
        let entries = self.context.update(prompt, output);
        let entries = entries.iter().filter(|e| rep_on || e.count > 0).copied();
        batch.push_row(p.repetition_penalty, p.presence_penalty, p.frequency_penalty, entries);
    }

    fn filters(&self) -> Filters {
        let p = &self.params;
        Filters {
            inv_t: inv_temperature(p.temperature),
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
        }
    }

    fn penalties_apply(&self, prompt: &[u32], output: &[u32]) -> bool {
        let p = &self.params;
        (p.repetition_penalty != 1.0 && !(prompt.is_empty() && output.is_empty()))
            || ((p.presence_penalty != 0.0 || p.frequency_penalty != 0.0) && !output.is_empty())
    }

    /// Applies the filters to the (penalised) logits; `raw_max` bounds them from above.
    /// `ready`: `probs` and `chunk_sums` already hold e^(logit - raw_max), of this total.
    fn choose(&mut self, logits: &[f32], raw_max: f32, ready: Option<f64>) -> Choice {
        // Penalties can raise a logit (repetition < 1, negative presence): find the max again.
        let max = if self.touched.is_empty() {
            raw_max
        } else {
            logits.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a })
        };
        let filters = self.filters();
        self.sel.choose(logits, max, ready, filters)
    }

    fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// Repetition, then frequency and presence penalties, in place; the raw value of every
    /// changed logit goes to `touched`.
    fn apply_penalties(&mut self, logits: &mut [f32], prompt: &[u32], output: &[u32]) {
        if !self.penalties_apply(prompt, output) {
            return;
        }
        let vocab = logits.len();
        if self.seen.len() != vocab {
            self.seen = vec![false; vocab];
            self.counts = vec![0; vocab];
        }
        let rep = self.params.repetition_penalty;
        if rep != 1.0 {
            for &t in prompt.iter().chain(output) {
                let i = t as usize;
                if i < vocab && !self.seen[i] {
                    self.seen[i] = true;
                    let l = logits[i];
                    self.touched.push((t, l));
                    logits[i] = if l > 0.0 { l / rep } else { l * rep };
                }
            }
        }
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            for &t in output {
                if let Some(c) = self.counts.get_mut(t as usize) {
                    *c += 1;
                }
            }
            for &t in output {
                let i = t as usize;
                let Some(&count) = self.counts.get(i) else { continue };
                if count == 0 {
                    continue; // already done for an earlier occurrence
                }
                self.counts[i] = 0;
                if !self.seen[i] {
                    self.seen[i] = true;
                    self.touched.push((t, logits[i]));
                }
                logits[i] = logits[i] - frequency * count as f32 - presence;
            }
        }
    }

    fn raw_logit(&self, logits: &[f32], token: u32) -> f32 {
        match self.touched.iter().find(|t| t.0 == token) {
            Some(&(_, raw)) => raw,
            None => logits.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY),
        }
    }

    fn clear_penalties(&mut self) {
        for &(t, _) in &self.touched {
            self.seen[t as usize] = false;
        }
        self.touched.clear();
    }
}

impl Filters {
    fn top_k_active(&self, vocab: usize) -> bool {
        self.top_k > 0 && self.top_k < vocab
    }

    /// top_p < 1 (a NaN top_p is off).
    fn top_p_active(&self) -> bool {
        self.top_p < 1.0
    }
}

/// 1/T, or None for greedy (T <= 0, NaN, or 1/T not finite). The device sampler takes
/// its 1/T from here too.
pub fn inv_temperature(temperature: f32) -> Option<f32> {
    let inv = 1.0 / temperature;
    (temperature > 0.0 && inv.is_finite()).then_some(inv)
}

/// One step of [`Sampler::sample`] for a request without penalties or logprobs, with its
/// uniform `row.u` drawn already: `logits` ([vocab], NaN cleaned in place) -> the token.
/// `CpuBackend::sample_rows` (the twin of the device sampler) is this, row by row, so it
/// gives the host sampler's token for the same draw exactly.
pub fn sample_row(logits: &mut [f32], row: &RowSampling) -> u32 {
    let max = vecmath::sanitize_max(logits);
    let filters = Filters {
        inv_t: inv_temperature(row.temperature),
        top_k: row.top_k as usize,
        top_p: row.top_p,
        min_p: row.min_p,
    };
    let mut sel = Selector::default();
    let choice = sel.choose(logits, max, None, filters);
    sel.draw(choice, row.u)
}

impl Selector {
    fn draw(&mut self, choice: Choice, u: f64) -> u32 {
        match choice {
            Choice::Token(t) => t,
            Choice::Dense { total } => self.draw_dense(total, u),
            Choice::Sparse { total } => self.draw_sparse(total, u),
        }
    }

    /// Applies `f` to the (penalised, NaN-free) logits; `max` is their largest value.
    /// `ready`: `probs` and `chunk_sums` already hold e^(logit - max), of this total.
    fn choose(&mut self, logits: &[f32], max: f32, ready: Option<f64>, f: Filters) -> Choice {
        let Some(inv_t) = f.inv_t else {
            return Choice::Token(vecmath::argmax(logits) as u32);
        };
        if max == f32::NEG_INFINITY {
            return Choice::Token(0);
        }
        // min_p > 1 would drop the best token too; it is always kept.
        let min_p = f.min_p.min(1.0);
        let top_p = f.top_p;
        let top_k_on = f.top_k_active(logits.len());
        if !top_k_on && !f.top_p_active() {
            if let (Some(total), true) = (ready, min_p <= 0.0) {
                return Choice::Dense { total };
            }
            self.probs.resize(logits.len(), 0.0);
            let floor = min_p.max(0.0);
            let total = vecmath::exp_sum(
                logits,
                max,
                inv_t,
                floor,
                Some(&mut self.probs),
                CHUNK,
                &mut self.chunk_sums,
            );
            return Choice::Dense { total };
        }

        let n = logits.len();
        // Keep a token while the mass strictly above it is < top_p (HF: drop when the
        // ascending cumulative sum, itself included, is <= 1 - top_p). A top_p of 0 or
        // less keeps the best token alone.
        let top_p = top_p.max(f32::MIN_POSITIVE) as f64;
        let mut cut_done = top_p >= 1.0;
        let total;
        if top_k_on {
            let prob = |l: f32| vecmath::exp_nonpos((l - max) * inv_t);
            vecmath::top_k(logits, f.top_k, &mut self.cand, &mut self.scratch);
            vecmath::extend_ties(logits, &mut self.cand);
            self.cand.iter_mut().for_each(|c| c.0 = prob(c.0));
            total = self.cand.iter().map(|c| c.0 as f64).sum::<f64>();
        } else {
            total = match ready {
                Some(total) => total,
                None => {
                    self.probs.resize(n, 0.0);
                    let (probs, sums) = (&mut self.probs[..], &mut self.chunk_sums);
                    vecmath::exp_sum(logits, max, inv_t, 0.0, Some(probs), CHUNK, sums)
                }
            };
            // Language models are usually confident: the nucleus fits in a few dozen tokens.
            vecmath::top_k(&self.probs, TOP_P_FIRST_K, &mut self.cand, &mut self.scratch);
            let mass = self.cand.iter().map(|c| c.0 as f64).sum::<f64>();
            if mass < top_p * total && self.cand.len() < n {
                self.cand.clear();
                let nonzero = self.probs.iter().enumerate().filter(|(_, &p)| p > 0.0);
                self.cand.extend(nonzero.map(|(i, &p)| (p, i as u32)));
                let cut = vecmath::top_p_cut(&mut self.cand, top_p * total);
                self.cand.truncate(cut.max(1));
                cut_done = true;
            }
        }
        if !cut_done {
            let target = top_p * total;
            let mut above = 0.0f64;
            let keep = (self.cand.iter())
                .position(|c| {
                    let stop = above >= target;
                    above += c.0 as f64;
                    stop
                })
                .unwrap_or(self.cand.len());
            self.cand.truncate(keep.max(1));
        }
        if min_p > 0.0 {
            // The best token, always in `cand`, has e^0 = 1 exactly: it stays.
            self.cand.retain(|c| c.0 >= min_p);
        }
        let total = self.cand.iter().map(|c| c.0 as f64).sum::<f64>();
        Choice::Sparse { total }
    }

    /// Draws from `cand` with `u` in [0, 1), walking in token-id order; only a token with nonzero probability can come out.
    fn draw_sparse(&mut self, total: f64, u: f64) -> u32 {
        // Token-id order, as the dense walk and the device kernel.
        self.cand.sort_unstable_by_key(|c| c.1);
        let target = u * total;
        let mut acc = 0.0f64;
        let mut last = self.cand.first().map_or(0, |c| c.1);
        for &(p, id) in &self.cand {
            if p > 0.0 {
                acc += p as f64;
                last = id;
                if acc > target {
                    return id;
                }
            }
        }
        // Rounding: the walk's sum fell short of `total`.
        last
    }

    /// Draws from `probs` through `chunk_sums` with `u` in [0, 1); only a nonzero entry can come out.
    fn draw_dense(&mut self, total: f64, u: f64) -> u32 {
        let target = u * total;
        let mut acc = 0.0f64;
        let mut chosen = None;
        for (c, &s) in self.chunk_sums.iter().enumerate() {
            if s > 0.0 {
                chosen = Some((c, acc));
                if acc + s > target {
                    break;
                }
                acc += s;
            }
        }
        let Some((c, mut acc)) = chosen else { return 0 };
        let start = c * CHUNK;
        let end = (start + CHUNK).min(self.probs.len());
        let mut last = start;
        for (i, &p) in self.probs[start..end].iter().enumerate() {
            if p > 0.0 {
                acc += p as f64;
                last = start + i;
                if acc > target {
                    break;
                }
            }
        }
        last as u32
    }
}
