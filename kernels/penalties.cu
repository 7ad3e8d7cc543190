// Repetition / presence / frequency penalties on the device (qilin_apply_penalties_bf16),
// so that a decode step whose sequences carry penalties (Qwen2.5's generation_config sets
// repetition_penalty 1.05 on every default request) is still sampled where the logits are
// (qilin_sample_bf16 runs next, on the same stream) instead of sending [rows, vocab]
// logits to the host sampler (+12.67 ms on a 10.58 ms step at batch 256 on an H200:
// bench/results/2026-11-26-h200-abc5642.md).
//
// CPU twin: backend::cpu::penalize_row_bf16, i.e. engine/sampler.rs apply_penalties on one
// token followed by a rounding to bf16. Per entry e = tokens[row.offset + j] of row r:
//   v = f32(logits[r][e.id]), NaN -> -inf, +inf -> FLT_MAX      (the host's sanitize)
//   repetition != 1:  v = v > 0 ? v / repetition : v * repetition        (HF)
//   (presence != 0 || frequency != 0) && e.count > 0:
//       v = (v - frequency * (float)e.count) - presence                  (OpenAI, vLLM order)
//   logits[r][e.id] = bf16_rn(v)
// Every operation is an explicit _rn intrinsic (no FMA contraction; Rust never contracts
// either), so v is bit-identical to the host's f32 value. THE ROUNDING RULE: the penalised
// f32 value is rounded to bf16, round-to-nearest-even (__float2bfloat16_rn; host:
// half::bf16::from_f32), and written back in place, because qilin_sample_bf16 searches on
// 16-bit keys of bf16 logits. The logits are step scratch (graph.rs hands out a copy of its
// shared buffer), so the in-place write is safe. The device path therefore equals the host
// sampler on "penalise in f32, round the penalised tokens to bf16" logits; it differs from
// the host sampler on the raw bf16 logits only by that rounding.
//
// Entries of one row are DISTINCT ids (the engine keeps each sequence's distinct prompt +
// output ids once), so no two threads write one logit and their order does not matter.
// An id >= cols is ignored, as the host ignores ids outside the vocabulary.
//
// Launch: grid = (ceil(max_r rows[r].len / QILIN_PENALTY_THREADS), rows, 1),
//   block = (QILIN_PENALTY_THREADS, 1, 1); thread j of row r handles entry j. No shared
//   memory. Work: one 8-byte entry read and one scattered bf16 read-modify-write per entry
//   (~1-2K per row for a typical prompt): microseconds next to the sampler's row passes.

#include "common.cuh"

static_assert(QILIN_PENALTY_THREADS % QILIN_WARP_SIZE == 0 &&
                  QILIN_PENALTY_THREADS <= QILIN_MAX_THREADS_PER_BLOCK,
              "abi.h: QILIN_PENALTY_THREADS must be whole warps");

// The host sampler's sanitize: NaN -> -inf, +inf -> f32::MAX (fmaxf/fminf ignore NaN).
QILIN_DEVICE float penalty_clean(float v) { return fminf(fmaxf(v, -INFINITY), 3.40282347e+38f); }

// rows:   QilinPenaltyRow   [p.rows]          each row's entries and penalties
// tokens: QilinPenaltyToken [sum rows[r].len]  every row's distinct ids, row after row
// logits: bf16              [p.rows, p.cols]  penalised in place
extern "C" __global__ void __launch_bounds__(QILIN_PENALTY_THREADS)
qilin_apply_penalties_bf16(const QilinPenaltyParams p,
                           const QilinPenaltyRow* __restrict__ rows,
                           const QilinPenaltyToken* __restrict__ tokens,
                           bf16* __restrict__ logits) {
    QILIN_PDL_ENTRY();
    if (blockDim.x != QILIN_PENALTY_THREADS) {
        __trap();
    }
    const unsigned r = blockIdx.y;
    if (r >= p.rows) {
        return;
    }
    const QilinPenaltyRow row = rows[r];
    const unsigned j = blockIdx.x * QILIN_PENALTY_THREADS + threadIdx.x;
    if (j >= row.len) {
        return;
    }
    const QilinPenaltyToken e = tokens[row.offset + j];
    if (e.id >= p.cols) {
        return;
    }
    bf16* x = logits + (size_t)r * p.cols + e.id;
    float v = penalty_clean(__bfloat162float(*x));
    if (row.repetition != 1.0f) {
        v = v > 0.0f ? __fdiv_rn(v, row.repetition) : __fmul_rn(v, row.repetition);
    }
    if ((row.presence != 0.0f || row.frequency != 0.0f) && e.count > 0u) {
        v = __fsub_rn(__fsub_rn(v, __fmul_rn(row.frequency, __uint2float_rn(e.count))),
                      row.presence);
    }
    *x = __float2bfloat16_rn(v);
}
