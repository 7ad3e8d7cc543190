#!/usr/bin/env python3
"""Makes tests/fixtures/perplexity/expected.json: perplexity as llama.cpp's llama-perplexity
defines it, with transformers' own causal-LM loss as the oracle, for the tiny fixture models
(tests/fixtures/models/*) and the SmolLM2 Q4_1 GGUF. tests/perplexity.rs reads it.

Run from the repository root with the pinned reference venv (tools/setup-reference):

    .cache/refvenv/bin/python tools/make_perplexity_fixtures.py

Deterministic (no sampling, no network). The text is chapter I of Jules Verne's "Around the
World in Eighty Days" (public domain, Project Gutenberg #103), the VERNE string of
tools/make_fixtures.py, minus its trailing newline (llama.cpp's -f drops one).

Per model, the definition being checked (llama.cpp tools/perplexity/perplexity.cpp,
perplexity()):
  tokens      the tokenizer run over the whole text with special tokens (bos in front when
              the model adds one: llama.cpp's common_tokenize(ctx, text, add_special=true))
  windows     n = len(tokens) // ctx non-overlapping windows of ctx tokens (capped by
              "chunks"); the first token of each window replaced by bos when the model
              adds bos
  scored      first = ctx // 2; targets at positions first+1 .. ctx-1 of each window,
              ctx - first - 1 tokens per window
  per window  transformers' loss: model(window, labels=...) with every label before
              position first+1 set to -100, i.e. the mean cross-entropy of exactly the
              scored targets, computed by transformers itself (float32 logits)
  error       llama.cpp's: ppl * sqrt((mean(nll^2) - mean(nll)^2) / (count - 1)), from
              per-token NLLs (float64 log_softmax of the float32 logits; their mean is
              checked against transformers' loss)

The models run in float32: the tiny ones on their bf16-rounded weights, SmolLM2 on the GGUF
tensors dequantized by transformers (exactly our dequantization), eager attention.
"""

import json
import math
import os
import subprocess
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import VERNE  # noqa: E402  (the shared public-domain text)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(ROOT, "tests", "fixtures", "models")
OUT = os.path.join(ROOT, "tests", "fixtures", "perplexity", "expected.json")
REFERENCE = f"transformers {transformers.__version__} / torch {torch.__version__.split('+')[0]}"
TEXT = VERNE[:-1] if VERNE.endswith("\n") else VERNE

# (case name, model directory or "smollm2", ctx, chunks or None). ctx is small enough for
# each model's max_position_embeddings (qwen2_gqa7_yarn: 256) and leaves several windows.
CASES = [
    ("llama_mha_untied_bos", "llama_mha_untied_bos", 128, None),
    ("llama_gqa4_hd128_tied", "llama_gqa4_hd128_tied", 100, None),
    ("qwen2_gqa4_hd128_tied", "qwen2_gqa4_hd128_tied", 128, None),
    ("qwen2_gqa7_yarn", "qwen2_gqa7_yarn", 250, None),
    ("smollm2", "smollm2", 256, 3),
]


def find_gguf():
    try:
        return subprocess.check_output([os.path.join(ROOT, "tools/demo-model-path")],
                                       text=True).strip()
    except subprocess.CalledProcessError:
        sys.exit("SmolLM2 GGUF not found: run tools/setup (or set QILIN_SMOLLM2_GGUF)")


def load(which):
    if which == "smollm2":
        d, f = os.path.split(find_gguf())
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(
            d, gguf_file=f, dtype=torch.float32, attn_implementation="eager")
        return tok, model, f
    d = os.path.join(MODELS_DIR, which)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                 attn_implementation="eager")
    return tok, model, f"tests/fixtures/models/{which}"


def adds_bos(tok):
    bos = tok.bos_token_id
    return bos is not None and tok("a")["input_ids"][:1] == [bos]


def perplexity_case(name, which, ctx, chunks):
    tok, model, source = load(which)
    model.eval()
    tokens = tok(TEXT)["input_ids"]
    bos = tok.bos_token_id if adds_bos(tok) else None
    if len(tokens) < 2 * ctx:
        sys.exit(f"{name}: {len(tokens)} tokens, fewer than 2 * ctx = {2 * ctx}")
    n_chunk = len(tokens) // ctx
    if chunks is not None:
        n_chunk = min(n_chunk, chunks)
    first = ctx // 2
    per_window = ctx - first - 1
    windows = []
    nll = nll2 = 0.0
    count = 0
    for i in range(n_chunk):
        window = list(tokens[i * ctx:(i + 1) * ctx])
        if bos is not None:
            window[0] = bos
        ids = torch.tensor([window])
        labels = ids.clone()
        labels[0, :first + 1] = -100  # transformers shifts: logits[p] predict labels[p + 1]
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
        loss = float(out.loss)
        # Per-token NLL for the error term; targets are the original tokens (window[0] is
        # never a target: first + 1 >= 1).
        logp = out.logits[0, first:ctx - 1].to(torch.float64).log_softmax(-1)
        targets = torch.tensor(window[first + 1:ctx])
        v = -logp[torch.arange(per_window), targets]
        if abs(float(v.mean()) - loss) > 1e-5:
            sys.exit(f"{name} window {i}: per-token mean {float(v.mean())} vs loss {loss}")
        nll += float(v.sum())
        nll2 += float((v * v).sum())
        count += per_window
        windows.append({"mean_nll": loss, "running_ppl": math.exp(nll / count)})
    mean = nll / count
    ppl = math.exp(mean)
    err = ppl * math.sqrt((nll2 / count - mean * mean) / (count - 1))
    print(f"{name}: {len(tokens)} tokens, {n_chunk} windows of {ctx}, bos {bos}, "
          f"PPL = {ppl:.4f} +/- {err:.5f}")
    return {
        "name": name,
        "model": source,
        "ctx": ctx,
        "chunks": chunks,
        "bos_token_id": bos,
        "tokens": tokens,
        "count": count,
        "windows": windows,
        "ppl": ppl,
        "ppl_err": err,
    }


def main():
    transformers.utils.logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    cases = [perplexity_case(*c) for c in CASES]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    lines = [
        "{",
        f' "reference": {json.dumps(REFERENCE)},',
        ' "definition": "llama.cpp perplexity(): windows of ctx tokens, bos swapped in when '
        'the model adds bos, targets first+1..ctx-1 with first = ctx/2; per-window mean NLL '
        'is transformers\' loss (float32, eager attention)",',
        f' "text": {json.dumps(TEXT, ensure_ascii=False)},',
        ' "cases": [',
    ]
    for i, c in enumerate(cases):
        # One line per field keeps the file diff-friendly (tokens stay on one line).
        body = ",\n".join(f"   {json.dumps(k)}: {json.dumps(v)}" for k, v in c.items())
        lines.append("  {\n" + body + "\n  }" + ("," if i + 1 < len(cases) else ""))
    lines += [" ]", "}"]
    with open(OUT, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
