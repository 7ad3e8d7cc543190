#!/usr/bin/env python3
"""Makes tests/fixtures/sampler/processors.json: what HF transformers' logits processors do
to random logits, the reference for src/engine/sampler.rs (tests/sampler.rs reads it).

Run from anywhere with the reference interpreter (torch, transformers):

    ${QILIN_REF_PYTHON:-python3} tools/make_sampler_fixtures.py

QILIN_REF_PYTHON is only a convention for callers; this script uses whichever Python runs
it. Output is deterministic (fixed seeds).

Per case: float32 logits, prompt/output ids, SamplingParams fields, and
  log_softmax   torch.log_softmax of the raw logits (vocab <= 4096 only)
  penalised     logits after RepetitionPenaltyLogitsProcessor(prompt + output) and then
                OpenAI's presence/frequency formula over the output ids (vLLM's order);
                HF has no presence/frequency processor (vocab <= 4096 only)
  greedy        torch.argmax of `penalised` (first index of the max)
  kept, probs   for temperature > 0: ids left finite by TemperatureLogitsWarper,
                TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper (HF's warper order)
                applied to `penalised`, and their softmax probabilities
Cases whose top-p (min-p) boundary lies within 1e-5 (1e-4) of a token's cumulative mass (or
probability ratio) are redrawn: there float rounding, not semantics, decides the set.
"""

import json
import os
import sys

import numpy as np
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                   "sampler", "processors.json")
DENSE_MAX_VOCAB = 4096

# (name, vocab, logit scale, params, prompt length, output length, coarse logits)
CASES = [
    ("plain_t1", 257, 3.0, {}, 5, 3, False),
    ("temperature_0_7_topk40", 1000, 3.0, {"temperature": 0.7, "top_k": 40}, 8, 4, False),
    ("topp_0_9_t1_3", 1000, 3.0, {"temperature": 1.3, "top_p": 0.9}, 8, 4, False),
    ("topk50_topp0_8", 3000, 4.0, {"temperature": 0.8, "top_k": 50, "top_p": 0.8}, 10, 6, False),
    ("minp_0_1", 1000, 2.0, {"min_p": 0.1}, 4, 2, False),
    ("all_filters", 3000, 3.0,
     {"temperature": 0.9, "top_k": 300, "top_p": 0.95, "min_p": 0.05}, 6, 6, False),
    ("topk_large_select_path", 4000, 1.0, {"top_k": 1500}, 3, 3, False),
    ("topk_1", 500, 3.0, {"top_k": 1}, 3, 3, False),
    ("topk_ties", 500, 1.0, {"top_k": 20}, 3, 3, True),
    ("repetition_1_3", 300, 3.0, {"repetition_penalty": 1.3}, 40, 20, False),
    ("repetition_0_8", 300, 3.0, {"repetition_penalty": 0.8}, 40, 20, False),
    ("presence_frequency", 300, 3.0,
     {"presence_penalty": 0.5, "frequency_penalty": 0.3}, 30, 60, False),
    ("negative_presence_frequency", 300, 3.0,
     {"presence_penalty": -0.7, "frequency_penalty": -0.2}, 30, 60, False),
    ("all_penalties_topp", 300, 3.0,
     {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1, "presence_penalty": 0.5,
      "frequency_penalty": 0.3}, 30, 60, False),
    ("greedy_repetition", 500, 3.0, {"temperature": 0.0, "repetition_penalty": 1.2}, 50, 30,
     False),
    ("greedy_ties", 500, 1.0, {"temperature": 0.0}, 3, 0, True),
    ("greedy_ties_penalised", 500, 1.0,
     {"temperature": 0.0, "presence_penalty": 0.25, "frequency_penalty": 0.25}, 3, 40, True),
    ("topp_flat_large_vocab", 6000, 0.5, {"top_p": 0.9}, 4, 4, False),
    ("topp_peaked_large_vocab", 5000, 3.0, {"top_p": 0.7, "temperature": 0.9}, 4, 4, False),
]


def params_of(p):
    full = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    full.update(p)
    return full


def penalise(logits, prompt, output, p):
    scores = logits.clone()[None, :]
    if p["repetition_penalty"] != 1.0:
        ids = torch.tensor([prompt + output], dtype=torch.long)
        scores = RepetitionPenaltyLogitsProcessor(float(p["repetition_penalty"]))(ids, scores)
    if output:
        counts = torch.bincount(torch.tensor(output), minlength=logits.shape[0]).float()
        scores = scores - p["frequency_penalty"] * counts[None, :]
        scores = scores - p["presence_penalty"] * (counts > 0).float()[None, :]
    return scores


def warp(scores, p):
    ids = torch.zeros((1, 1), dtype=torch.long)  # the warpers ignore input_ids
    scores = TemperatureLogitsWarper(float(p["temperature"]))(ids, scores)
    if p["top_k"] > 0:
        scores = TopKLogitsWarper(int(p["top_k"]))(ids, scores)
    if p["top_p"] < 1.0:
        scores = TopPLogitsWarper(float(p["top_p"]))(ids, scores)
    if p["min_p"] > 0.0:
        scores = MinPLogitsWarper(float(p["min_p"]))(ids, scores)
    return scores


def well_conditioned(penalised, p, ties_ok):
    """No token's top-p cumulative mass (min-p ratio) within 1e-5 (1e-4) of its threshold,
    no tie at the k-th value unless `ties_ok` (HF's top-k keeps ties deterministically)."""
    if p["temperature"] == 0.0:
        return True
    s = (penalised[0].double() / p["temperature"]).numpy()
    order = np.argsort(-s, kind="stable")
    s = s[order]
    if p["top_k"] > 0:
        k = p["top_k"]
        if not ties_ok and k < len(s) and s[k - 1] - s[k] < 1e-5:
            return False
        s = s[:k]
    probs = np.exp(s - s.max())
    probs /= probs.sum()
    if p["top_p"] < 1.0:
        above = np.concatenate([[0.0], np.cumsum(probs)[:-1]])
        if np.min(np.abs(above - p["top_p"])) < 1e-5:
            return False
        probs = probs[above < p["top_p"]]
        probs /= probs.sum()
    if p["min_p"] > 0.0:
        if np.min(np.abs(probs / probs[0] - p["min_p"])) < 1e-4:
            return False
    return True


def fmt(xs, digits=9):
    """9 significant digits round-trip any float32 exactly; 7 are plenty for expectations."""
    return [float(f"{x:.{digits}g}") for x in xs]


def make_case(index, name, vocab, scale, p, n_prompt, n_output, coarse):
    p = params_of(p)
    for attempt in range(100):
        g = torch.Generator().manual_seed(1000 * index + attempt)
        logits = torch.randn(vocab, generator=g, dtype=torch.float32) * scale
        if coarse:
            # Few distinct values, as bf16 logits have: greedy must break ties by lowest id.
            logits = torch.round(logits * 2) / 2
        # A small id range so repeats (and hence counts > 1) are common.
        reps = min(vocab, 64)
        prompt = torch.randint(0, reps, (n_prompt,), generator=g).tolist()
        output = torch.randint(0, reps, (n_output,), generator=g).tolist()
        logits = torch.tensor(fmt(logits.tolist()), dtype=torch.float32)
        penalised = penalise(logits, prompt, output, p)
        if well_conditioned(penalised, p, coarse):
            break
    else:
        sys.exit(f"case {name}: no well-conditioned draw")
    case = {"name": name, "params": p, "prompt": prompt, "output": output,
            "logits": fmt(logits.tolist()),
            "greedy": int(torch.argmax(penalised[0]).item())}
    if vocab <= DENSE_MAX_VOCAB:
        case["log_softmax"] = fmt(torch.log_softmax(logits.double(), -1).tolist(), 8)
        case["penalised"] = fmt(penalised[0].tolist())
    if p["temperature"] > 0.0:
        warped = warp(penalised, p)[0]
        kept = torch.nonzero(torch.isfinite(warped)).flatten()
        probs = torch.softmax(warped.double(), -1)[kept]
        case["kept"] = kept.tolist()
        case["probs"] = fmt(probs.tolist(), 7)
    return case


def main():
    torch.manual_seed(0)
    cases = [make_case(i, *c) for i, c in enumerate(CASES)]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"generator": "tools/make_sampler_fixtures.py",
                   "transformers": __import__("transformers").__version__,
                   "cases": cases}, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {len(cases)} cases to {os.path.normpath(OUT)} "
          f"({os.path.getsize(OUT) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
