#!/usr/bin/env python3
"""Makes the test fixtures of GGUF's k-quants and the other block formats Qilin reads
without its own kernels (Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, IQ4_XS) under
tests/fixtures/kquants/, with the python `gguf` package as the independent reference
(pinned in tools/requirements-kquant-fixtures.txt):

    python3 -m venv /tmp/kq && /tmp/kq/bin/pip install -r tools/requirements-kquant-fixtures.txt
    /tmp/kq/bin/python tools/make_kquant_fixtures.py

gguf-py has no quantizer for the k-quants and IQ4 formats, so the blocks are random bytes
(every bit pattern of the quants, the packed scales/mins, the fifth and high bits and the
table indices is valid) with the f16 scales replaced by sane finite values of both signs,
some subnormal.

Outputs (small, committed):
  blocks.bin / values.bin / blocks.json
      rows of Q4_K, Q5_K, Q6_K, Q5_0, Q5_1, IQ4_NL, Q2_K, Q3_K, IQ4_XS blocks (raw bytes)
      and their f32 values from gguf.quants.dequantize; blocks.json indexes both.
  tiny_kquant_llama.gguf / tiny_kquant_llama.expected.json
      a 1-layer llama GGUF written by gguf.GGUFWriter in a Q4_K_M-like mix (Q4_K, Q5_K,
      Q6_K where rows are multiples of 256, Q4_0/Q4_1 elsewhere, F32 norms); for each
      tensor under its Hugging Face name: shape, GGML type and the FNV-1a 64 hash of its
      f32 values as read back by gguf.GGUFReader + gguf.quants.dequantize, with attn_q /
      attn_k rows put back the way transformers does (`_reverse_permute_weights`).
  tiny_lowbit_llama.gguf / tiny_lowbit_llama.expected.json
      the same model in the other formats (Q2_K, Q3_K, IQ4_XS where rows are multiples of
      256, Q5_0, Q5_1, IQ4_NL elsewhere), as a q3_k_m or q5_0 file mixes them.
"""

import json
import os
import sys
from importlib.metadata import version

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

PINS = {"gguf": "0.19.0", "numpy": "2.4.6"}
for pkg, want in PINS.items():
    if version(pkg) != want:
        sys.exit(f"{pkg} {version(pkg)} installed, fixtures are pinned to {want} "
                 "(tools/requirements-kquant-fixtures.txt)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "kquants")
rng = np.random.default_rng(20261106)
# The other formats draw from their own stream, so the k-quant fixtures keep their bytes.
rng_others = np.random.default_rng(20261127)
KQUANTS = [T.Q4_K, T.Q5_K, T.Q6_K]
# Appended after the k-quants, so that their fixtures keep their bytes.
OTHERS = [T.Q5_0, T.Q5_1, T.IQ4_NL, T.Q2_K, T.Q3_K, T.IQ4_XS]
# Formats gguf-py cannot quantize: random blocks (random_blocks) in the tiny models.
RANDOM_BLOCKS = KQUANTS + [T.IQ4_NL, T.Q2_K, T.Q3_K, T.IQ4_XS]


def scale_offsets(qtype):
    """Byte offsets of each block's f16 scales (ggml-common.h)."""
    return {
        T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
        T.Q5_0: [0], T.Q5_1: [0, 2], T.IQ4_NL: [0], T.IQ4_XS: [0],
        T.Q2_K: [80, 82], T.Q3_K: [108],
    }[qtype]


def f16_scales(n, gen):
    """Finite f16 scales of both signs, magnitudes 1e-4..1e-1."""
    mag = 10.0 ** gen.uniform(-4, -1, n)
    sign = gen.choice([-1.0, 1.0], n)
    return (mag * sign).astype(np.float16)


def random_blocks(qtype, nblocks, fill=None, subnormal=False):
    """`nblocks` raw blocks: random bytes (or all `fill`) with finite f16 scales."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    gen = rng if qtype in KQUANTS else rng_others
    if fill is None:
        raw = gen.integers(0, 256, (nblocks, type_size), dtype=np.uint8)
    else:
        raw = np.full((nblocks, type_size), fill, dtype=np.uint8)
    for at in scale_offsets(qtype):
        s = f16_scales(nblocks, gen)
        if subnormal:
            s[:] = np.float16(3e-6)  # below f16's smallest normal (6.1e-5)
        raw[:, at:at + 2] = s.view(np.uint8).reshape(nblocks, 2)
    return raw


def block_fixture():
    """Per type: a 1-block row, and a 3-block row (random, all-ones payload, subnormal d)."""
    index, raw_parts, value_parts = [], [], []
    raw_off = val_off = 0
    for qtype in KQUANTS + OTHERS:
        block_elems = gguf.GGML_QUANT_SIZES[qtype][0]
        rows = [
            random_blocks(qtype, 1),
            np.concatenate([random_blocks(qtype, 1), random_blocks(qtype, 1, fill=0xFF),
                            random_blocks(qtype, 1, subnormal=True)]),
        ]
        for blocks in rows:
            raw = blocks.reshape(-1)
            values = gguf.quants.dequantize(raw.reshape(1, -1), qtype).reshape(-1)
            assert values.dtype == np.float32 and np.isfinite(values).all()
            assert values.size == blocks.shape[0] * block_elems
            index.append({"dtype": qtype.name, "n": int(values.size), "bytes_offset": raw_off,
                          "bytes_len": int(raw.size), "values_offset": val_off})
            raw_parts.append(raw.tobytes())
            value_parts.append(values.astype("<f4").tobytes())
            raw_off += raw.size
            val_off += values.size
    with open(os.path.join(OUT, "blocks.bin"), "wb") as fh:
        fh.write(b"".join(raw_parts))
    with open(os.path.join(OUT, "values.bin"), "wb") as fh:
        fh.write(b"".join(value_parts))
    write_json("blocks.json", {
        "generator": f"gguf {version('gguf')} gguf.quants.dequantize (numpy {version('numpy')})",
        "values": "values.bin: little-endian f32, values_offset in f32 elements",
        "rows": index,
    })


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def reverse_permute(w, n_head):
    """transformers' LlamaConverter._reverse_permute_weights (GGUF Q/K rows -> HF)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 256, 2, 1, 16, 32, 1
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list("abcdefghijklm")
MERGES = ["a b", "c d"]
TOKENS += ["ab", "cd"]
HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
    "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
    "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
    "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
}


def kquant_plan(vocab, q_rows, kv_rows):
    """(gguf name, HF shape [rows, cols], type) of tiny_kquant_llama.gguf."""
    return [
        ("token_embd.weight", (vocab, HIDDEN), T.Q4_K),
        ("blk.0.attn_norm.weight", (HIDDEN,), T.F32),
        ("blk.0.attn_q.weight", (q_rows, HIDDEN), T.Q4_K),
        ("blk.0.attn_k.weight", (kv_rows, HIDDEN), T.Q5_K),
        ("blk.0.attn_v.weight", (kv_rows, HIDDEN), T.Q6_K),
        ("blk.0.attn_output.weight", (HIDDEN, q_rows), T.Q4_0),
        ("blk.0.ffn_norm.weight", (HIDDEN,), T.F32),
        ("blk.0.ffn_gate.weight", (FFN, HIDDEN), T.Q5_K),
        ("blk.0.ffn_up.weight", (FFN, HIDDEN), T.Q4_K),
        ("blk.0.ffn_down.weight", (HIDDEN, FFN), T.Q4_1),
        ("output_norm.weight", (HIDDEN,), T.F32),
        ("output.weight", (vocab, HIDDEN), T.Q6_K),
    ]


def lowbit_plan(vocab, q_rows, kv_rows):
    """tiny_lowbit_llama.gguf: every format of OTHERS, rows of 256 in the k-quants."""
    return [
        ("token_embd.weight", (vocab, HIDDEN), T.IQ4_XS),
        ("blk.0.attn_norm.weight", (HIDDEN,), T.F32),
        ("blk.0.attn_q.weight", (q_rows, HIDDEN), T.Q3_K),
        ("blk.0.attn_k.weight", (kv_rows, HIDDEN), T.Q2_K),
        ("blk.0.attn_v.weight", (kv_rows, HIDDEN), T.IQ4_NL),
        ("blk.0.attn_output.weight", (HIDDEN, q_rows), T.Q5_0),
        ("blk.0.ffn_norm.weight", (HIDDEN,), T.F32),
        ("blk.0.ffn_gate.weight", (FFN, HIDDEN), T.Q2_K),
        ("blk.0.ffn_up.weight", (FFN, HIDDEN), T.Q3_K),
        ("blk.0.ffn_down.weight", (HIDDEN, FFN), T.Q5_1),
        ("output_norm.weight", (HIDDEN,), T.F32),
        ("output.weight", (vocab, HIDDEN), T.IQ4_XS),
    ]


def tiny_gguf(stem, make_plan, file_type):
    vocab = len(TOKENS)
    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    plan = make_plan(vocab, q_rows, kv_rows)
    path = os.path.join(OUT, f"{stem}.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_file_type(file_type)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, shape, qtype in plan:
        if qtype == T.F32:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
        elif qtype in RANDOM_BLOCKS:
            rows, cols = shape
            block_elems = gguf.GGML_QUANT_SIZES[qtype][0]
            raw = random_blocks(qtype, rows * cols // block_elems).reshape(rows, -1)
            w.add_tensor(name, raw, raw_dtype=qtype)
        else:
            values = (rng.standard_normal(shape) * 0.1).astype(np.float32)
            w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # The expected tensors come from reading the file back, not from what was written.
    reader = gguf.GGUFReader(path)
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(d) for d in reversed(t.shape)]  # GGML lists dims fastest first
        values = values.reshape(shape)
        if t.name == "blk.0.attn_q.weight":
            values = reverse_permute(values, HEADS)
        elif t.name == "blk.0.attn_k.weight":
            values = reverse_permute(values, KV_HEADS)
        tensors[HF_NAMES[t.name]] = {
            "gguf_name": t.name,
            "shape": shape,
            "dtype": t.tensor_type.name,
            "fnv1a64_f32": fnv1a64(values.astype("<f4").tobytes()),
            "first_values": [float(v) for v in values.reshape(-1)[:4]],
        }
    write_json(f"{stem}.expected.json", {
        "generator": f"gguf {version('gguf')} GGUFWriter/GGUFReader + gguf.quants.dequantize",
        "hash": "FNV-1a 64 over the tensor's f32 values, little endian, row-major HF shape",
        "config": {"hidden_size": HIDDEN, "num_heads": HEADS, "num_kv_heads": KV_HEADS,
                   "head_dim": HEAD_DIM, "intermediate_size": FFN, "num_layers": LAYERS,
                   "vocab_size": vocab},
        "tensors": tensors,
    })


def write_json(name, obj):
    with open(os.path.join(OUT, name), "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.write("\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    block_fixture()
    tiny_gguf("tiny_kquant_llama", kquant_plan, gguf.LlamaFileType.MOSTLY_Q4_K_M)
    tiny_gguf("tiny_lowbit_llama", lowbit_plan, gguf.LlamaFileType.MOSTLY_Q3_K_M)
    print("fixtures written to", OUT)


if __name__ == "__main__":
    main()
