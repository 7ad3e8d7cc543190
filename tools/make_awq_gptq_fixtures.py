#!/usr/bin/env python3
"""Makes tiny AWQ and GPTQ checkpoints from the fixture models, packed the way the
published tools pack them, with the reference dequantized weights the tests compare
against. numpy only (pinned: numpy==2.4.6, the reference venv's; tools/setup-reference).

    .cache/refvenv/bin/python tools/make_awq_gptq_fixtures.py [--write-full DIR]

Deterministic (fixed seeds, sorted names, no timestamps). Output, small and committed:

  tests/fixtures/awq_gptq/<variant>/quantized.safetensors
      Only the quantized linears' tensors (qweight, qzeros, scales, g_idx), as the
      checkpoint holds them. Everything else of the checkpoint is the base fixture model
      (tests/fixtures/models/<base>/) unchanged; tests/awq_gptq.rs assembles the full
      checkpoint directory (base tensors minus the replaced `.weight`s, plus these, and
      config.json with `quantization_config`), which keeps the fixtures small (~540 KB in all).
      --write-full DIR writes those assembled checkpoints too (not committed), for
      loading with other tools.
  tests/fixtures/awq_gptq/<variant>/reference.json
      {"base", "quantization_config", "tensors": {prefix: {"shape": [out, in],
      "fnv1a64_f32": hex, "fnv1a64_f16": hex, "samples": [[o, i, value], ...],
      "max_abs_quant_error": ...}}}. The reference weights are what the published
      readers compute from the packed tensors, w = scale * (q - zero), in float64
      (exact), stored as the FNV-1a 64 hash of their little-endian float32 bytes
      (`fnv1a64_f32`, exact since |q - zero| <= 256 and scales are f16) and of the same
      values rounded to float16 by numpy then widened to float32 (`fnv1a64_f16`,
      what fp16 dequantization yields), row-major [out, in], plus 8 sample values.

Quantization is round-to-nearest with each tool's own parameter formulas (AWQ without
its activation-aware scale search, GPTQ without its Hessian error feedback): the
format, the packing and the readers' arithmetic are what the tests check, and a
calibration run would only change which integers get stored.

Packing orders, read from the published sources (fetched copies of the repositories):

AWQ, GEMM layout -- AutoAWQ awq/modules/linear/gemm.py (WQLinear_GEMM.from_linear),
awq/utils/packing_utils.py (unpack_awq, reverse_awq_order, dequantize_gemm),
awq/quantize/quantizer.py (pseudo_quantize_tensor):
  qweight int32 [in, out/8]: qweight[i, c] |= intweight[i, 8c + order[k]] << 4k,
      order = AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  (reader: AWQ_REVERSE_ORDER
      [0, 4, 1, 5, 2, 6, 3, 7] after shifting out nibbles 0..7)
  qzeros  int32 [in/g, out/8]: the same order, zeros stored as they are
  scales  f16   [in/g, out]
  scales = (max - min).clamp(1e-5) / 15, zeros = clamp(-round(min / scales), 0, 15),
  q = clamp(round(w / scales) + zeros, 0, 15); w ~ (q - zeros) * scales.

GPTQ -- AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda.py (QuantLinear.pack and
the torch forward), auto_gptq/quantization/quantizer.py (Quantizer.find_params);
vLLM csrc/quantization/gptq/q_gemm.cu (zero_offset = use_v2_format ? 0 : 1):
  qweight int32 [in*bits/32, out]: qweight[r, o] |= intweight[r*32/bits + k, o] << bits*k
  qzeros  int32 [groups, out*bits/32]: qzeros[g, c] |= (zero[g, c*32/bits + k] - 1) << bits*k
      (format v1 stores zero - 1, readers add 1 after masking; gptq_v2 stores zero)
  scales  f16 [groups, out]; g_idx int32 [in], group of each input
  find_params: xmin = min(x.min, 0), xmax = max(x.max, 0); sym: xmax = max(|xmin|,
  xmax), xmin = -xmax when xmin < 0; scale = (xmax - xmin) / maxq; zero = (maxq + 1) / 2
  (sym) or round(-xmin / scale); q = clamp(round(w / scale) + zero, 0, maxq).
  desc_act (act-order): columns are quantized in a permuted order (by the Hessian
  diagonal; here a seeded random permutation) and g_idx[perm[j]] = j // group_size,
  so an input's group is not i // group_size.
  A zero of 0 (a group with no negative weight, asymmetric) is stored as -1 & mask =
  all ones, which v1 readers read back as 2**bits: vLLM and qlinear_cuda compute
  (stored & mask) + 1 (qlinear_cuda_old masks after adding and gets 0). AutoGPTQ's
  packer ORs the unmasked -1 into the word, also setting every higher field; we mask
  it, so only that zero is affected. One variant forces such a group to pin down our
  reading (16, as vLLM).
"""

import argparse
import json
import os
import shutil
import struct
import sys

import numpy as np

NUMPY_PIN = "2.4.6"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "tests", "fixtures", "models")
OUT = os.path.join(ROOT, "tests", "fixtures", "awq_gptq")

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]

ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
MHA = "llama_mha_untied_bos"  # hidden 128: q/k/v/o/gate/up take 128 inputs, down 192
GQA = "llama_gqa4_hd128_tied"  # hidden 64; o_proj takes 8 heads x 128 = 1024 inputs

# name, base model, quantization_config, layers, modules, extra options.
VARIANTS = [
    ("awq_g128", MHA,
     {"bits": 4, "group_size": 128, "modules_to_not_convert": ["down_proj"],
      "quant_method": "awq", "version": "gemm", "zero_point": True},
     [0, 1], ATTN + MLP[:2], {}),
    # Qwen2.5-*-GPTQ-Int4's config; down_proj (192 inputs: 2 groups, the second of 64)
    # is quantized too, as AutoGPTQ allows (ceil(in / group_size) groups).
    ("gptq_4bit_sym_g128", MHA,
     {"bits": 4, "damp_percent": 0.01, "desc_act": False, "group_size": 128,
      "quant_method": "gptq", "static_groups": False, "sym": True, "true_sequential": True},
     [0, 1], ATTN + MLP, {}),
    ("gptq_8bit_sym_g128", MHA,
     {"bits": 8, "damp_percent": 0.01, "desc_act": False, "group_size": 128,
      "quant_method": "gptq", "static_groups": False, "sym": True, "true_sequential": True},
     [0], ATTN, {}),
    # q_proj row 5 made non-negative before quantization: its zero is 0 (read as 16).
    ("gptq_4bit_asym_g128", MHA,
     {"bits": 4, "desc_act": False, "group_size": 128, "quant_method": "gptq", "sym": False},
     [0], ["self_attn.q_proj", "self_attn.k_proj"],
     {"force_nonnegative": (0, "self_attn.q_proj", 5, 0)}),
    # Act-order needs several groups: o_proj's 1024 inputs are 8.
    ("gptq_4bit_asym_desc_act", GQA,
     {"bits": 4, "desc_act": True, "group_size": 128, "quant_method": "gptq", "sym": False},
     [0], ["self_attn.o_proj"], {}),
    ("gptq_8bit_asym_g128", MHA,
     {"bits": 8, "desc_act": False, "group_size": 128, "quant_method": "gptq", "sym": False},
     [0], ["self_attn.k_proj", "self_attn.v_proj"], {}),
    # Groups of 256 span two of our 128-value blocks.
    ("gptq_v2_4bit_asym_g256", GQA,
     {"bits": 4, "checkpoint_format": "gptq_v2", "desc_act": False, "group_size": 256,
      "quant_method": "gptq", "sym": False},
     [0], ["self_attn.o_proj"], {}),
    ("awq_g64", MHA,
     {"bits": 4, "group_size": 64, "quant_method": "awq", "version": "gemm", "zero_point": True},
     [0], ["self_attn.q_proj"], {}),
]

# ---------------------------------------------------------------- safetensors I/O

ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "I64": np.int64}


def read_safetensors(path):
    """name -> float64 array (BF16/F16/F32), as stored."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        raw = data[base + b:base + e]
        if info["dtype"] == "BF16":
            a = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            a = np.frombuffer(raw, np.dtype(ST_DTYPES[info["dtype"]]).newbyteorder("<"))
        out[name] = a.reshape(info["shape"]).astype(np.float64)
    return out


def write_safetensors(path, tensors):
    """tensors: name -> (safetensors dtype name, little-endian bytes, shape)."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        dtype, blob, shape = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def st_entry(a):
    dt = {np.dtype(np.int32): "I32", np.dtype(np.float16): "F16"}[a.dtype]
    return (dt, np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes(), a.shape)


def fnv1a64(b):
    h = 0xCBF29CE484222325
    for byte in b:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


# ---------------------------------------------------------------- AWQ


def awq_quantize(w, group):
    """w [out, in] -> q [out, in], zeros [in/g, out], scales f16 [in/g, out]."""
    out_f, in_f = w.shape
    g = w.reshape(out_f, in_f // group, group)
    mx, mn = g.max(axis=2), g.min(axis=2)
    scales = (np.maximum(mx - mn, 1e-5) / 15).astype(np.float16)
    s = scales.astype(np.float64)
    zeros = np.clip(-np.round(mn / s), 0, 15)
    q = np.clip(np.round(g / s[:, :, None]) + zeros[:, :, None], 0, 15)
    return q.reshape(out_f, in_f).astype(np.int64), zeros.T.astype(np.int64), scales.T.copy()


def awq_pack(q, zeros, scales):
    intweight = q.T  # [in, out]
    in_f, out_f = intweight.shape
    qweight = np.zeros((in_f, out_f // 8), np.uint32)
    qzeros = np.zeros((zeros.shape[0], out_f // 8), np.uint32)
    for col in range(out_f // 8):
        for k in range(8):
            qweight[:, col] |= intweight[:, col * 8 + AWQ_ORDER[k]].astype(np.uint32) << (4 * k)
            qzeros[:, col] |= zeros[:, col * 8 + AWQ_ORDER[k]].astype(np.uint32) << (4 * k)
    return {"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32), "scales": scales}


def awq_read(t, group):
    """AutoAWQ's dequantize_gemm: unpack_awq + reverse_awq_order, in numpy."""
    def unpack(x):
        x = x.view(np.uint32)
        n = (x[:, :, None] >> (np.arange(0, 32, 4, dtype=np.uint32))[None, None, :]) & 0xF
        n = n.reshape(x.shape[0], -1)
        rev = np.arange(n.shape[1]).reshape(-1, 8)[:, AWQ_REVERSE_ORDER].reshape(-1)
        return n[:, rev].astype(np.int64)
    iw, iz = unpack(t["qweight"]), unpack(t["qzeros"])  # [in, out], [groups, out]
    s = t["scales"].astype(np.float64)
    w_t = (iw - np.repeat(iz, group, axis=0)) * np.repeat(s, group, axis=0)
    return w_t.T, iw.T, iz  # [out, in]


# ---------------------------------------------------------------- GPTQ


def gptq_params(x, bits, sym):
    """Quantizer.find_params(perchannel=True) on rows of x: scale, zero per row."""
    maxq = 2**bits - 1
    xmin = np.minimum(x.min(axis=1), 0)
    xmax = np.maximum(x.max(axis=1), 0)
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    both0 = (xmin == 0) & (xmax == 0)
    xmin = np.where(both0, -1, xmin)
    xmax = np.where(both0, 1, xmax)
    scale = (xmax - xmin) / maxq
    zero = np.full_like(scale, (maxq + 1) / 2) if sym else np.round(-xmin / scale)
    return scale, zero


def gptq_quantize(w, bits, group, sym, desc_act, rng):
    """w [out, in] -> q [out, in], zeros [groups, out], scales f16 [groups, out], g_idx [in]."""
    out_f, in_f = w.shape
    maxq = 2**bits - 1
    groups = -(-in_f // group)
    perm = rng.permutation(in_f) if desc_act else np.arange(in_f)
    g_idx = np.empty(in_f, np.int64)
    g_idx[perm] = np.arange(in_f) // group
    q = np.zeros((out_f, in_f), np.int64)
    zeros = np.zeros((groups, out_f), np.int64)
    scales = np.zeros((groups, out_f), np.float16)
    for gi in range(groups):
        cols = perm[gi * group:(gi + 1) * group]
        scale, zero = gptq_params(w[:, cols], bits, sym)
        s16 = scale.astype(np.float16)
        s = s16.astype(np.float64)
        q[:, cols] = np.clip(np.round(w[:, cols] / s[:, None]) + zero[:, None], 0, maxq)
        zeros[gi], scales[gi] = zero, s16
    return q, zeros, scales, g_idx


def gptq_pack(q, zeros, scales, g_idx, bits, v2):
    per, mask = 32 // bits, 2**bits - 1
    intweight = q.T.astype(np.uint32)  # [in, out]
    in_f, out_f = intweight.shape
    if in_f % per:
        raise ValueError("in_features must be whole int32 words")
    qweight = np.zeros((in_f // per, out_f), np.uint32)
    for r in range(in_f // per):
        for k in range(per):
            qweight[r] |= intweight[r * per + k] << (bits * k)
    stored = (zeros if v2 else zeros - 1) & mask  # masked: see the module docstring
    qzeros = np.zeros((zeros.shape[0], out_f // per), np.uint32)
    for c in range(out_f // per):
        for k in range(per):
            qzeros[:, c] |= stored[:, c * per + k].astype(np.uint32) << (bits * k)
    return {"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32),
            "scales": scales, "g_idx": g_idx.astype(np.int32)}


def gptq_read(t, bits, v2):
    """qlinear_cuda's torch forward / vLLM: shift, mask, + 1 (v1), scales[g_idx] * (q - z)."""
    per, mask = 32 // bits, 2**bits - 1
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    qw = t["qweight"].view(np.uint32)
    iw = ((qw[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, qw.shape[1])  # [in, out]
    qz = t["qzeros"].view(np.uint32)
    iz = ((qz[:, :, None] >> shifts[None, None, :]) & mask).reshape(qz.shape[0], -1)  # [groups, out]
    iz = iz.astype(np.int64) + (0 if v2 else 1)
    g = t["g_idx"].astype(np.int64)
    s = t["scales"].astype(np.float64)
    w_t = s[g] * (iw.astype(np.int64) - iz[g])
    return w_t.T, iw.T.astype(np.int64), iz


# ---------------------------------------------------------------- variants


def make_variant(name, base, qc, layers, modules, extra, full_dir):
    weights = read_safetensors(os.path.join(MODELS, base, "model.safetensors"))
    rng = np.random.default_rng(abs(hash_name(name)))
    packed, refs = {}, {}
    for layer in layers:
        for module in modules:
            prefix = f"model.layers.{layer}.{module}"
            w = weights[f"{prefix}.weight"].copy()
            force = extra.get("force_nonnegative")
            if force and force[:2] == (layer, module):
                _, _, row, gi = force
                g = qc["group_size"]
                w[row, gi * g:(gi + 1) * g] = np.abs(w[row, gi * g:(gi + 1) * g])
            if qc["quant_method"] == "awq":
                q, z, s = awq_quantize(w, qc["group_size"])
                t = awq_pack(q, z, s)
                ref, rq, rz = awq_read(t, qc["group_size"])
                assert (rq == q).all() and (rz == z).all(), "AWQ pack/unpack round trip"
            else:
                bits, v2 = qc["bits"], qc.get("checkpoint_format") == "gptq_v2"
                q, z, s, g_idx = gptq_quantize(w, bits, qc["group_size"], qc["sym"], qc["desc_act"], rng)
                t = gptq_pack(q, z, s, g_idx, bits, v2)
                ref, rq, rz = gptq_read(t, bits, v2)
                assert (rq == q).all(), "GPTQ weight pack/unpack round trip"
                # Readers see 2**bits for a stored zero of 0 (v1); every other zero round-trips.
                expect_z = np.where((z == 0) & (not v2), 2**bits, z)
                assert (rz == expect_z).all(), "GPTQ zero pack/unpack round trip"
            for k, v in t.items():
                packed[f"{prefix}.{k}"] = st_entry(v)
            ref32 = ref.astype(np.float32)
            assert (ref32.astype(np.float64) == ref).all(), "reference not exact in float32"
            ref16 = ref.astype(np.float16).astype(np.float32)
            picks = rng.choice(ref.size, 8, replace=False)
            refs[prefix] = {
                "shape": list(ref.shape),
                "fnv1a64_f32": fnv1a64(ref32.astype("<f4").tobytes()),
                "fnv1a64_f16": fnv1a64(ref16.astype("<f4").tobytes()),
                "samples": [[int(p // ref.shape[1]), int(p % ref.shape[1]), float(ref32.flat[p])]
                            for p in sorted(picks)],
                "max_abs_quant_error": float(np.abs(ref - weights[f"{prefix}.weight"]).max()),
                "zeros_read": sorted(set(int(x) for x in rz.flat)),
            }
    out_dir = os.path.join(OUT, name)
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "quantized.safetensors"), packed)
    reference = {
        "generator": "tools/make_awq_gptq_fixtures.py",
        "numpy": np.__version__,
        "base": base,
        "quantization_config": qc,
        "tensors": refs,
    }
    if "force_nonnegative" in extra:
        layer, module, row, gi = extra["force_nonnegative"]
        reference["note"] = (
            f"model.layers.{layer}.{module} row {row} group {gi} was made non-negative "
            "before quantization: its zero is 0, stored as 15, read as 16 (v1)")
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(reference, f, indent=1, sort_keys=True)
        f.write("\n")
    if full_dir:
        write_full(os.path.join(full_dir, name), base, qc, packed)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    print(f"{name}: {len(refs)} linears, {size} bytes")


def write_full(dst, base, qc, packed):
    """The assembled checkpoint, as tests/awq_gptq.rs builds it."""
    src = os.path.join(MODELS, base)
    os.makedirs(dst, exist_ok=True)
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        shutil.copy(os.path.join(src, f), dst)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = qc
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    replaced = {k.rsplit(".", 1)[0] for k in packed}
    with open(os.path.join(src, "model.safetensors"), "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    tensors = dict(packed)
    for name, info in header.items():
        if name == "__metadata__" or name.rsplit(".", 1)[0] in replaced:
            continue
        b, e = info["data_offsets"]
        tensors[name] = (info["dtype"], data[8 + n + b:8 + n + e], info["shape"])
    write_safetensors(os.path.join(dst, "model.safetensors"), tensors)


def hash_name(s):
    """A seed from the variant name that does not depend on PYTHONHASHSEED."""
    return int(fnv1a64(s.encode()), 16) & 0x7FFFFFFF


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-full", metavar="DIR", help="also write full checkpoints here")
    args = parser.parse_args()
    if np.__version__ != NUMPY_PIN:
        sys.exit(f"numpy {np.__version__}: the fixtures were made with numpy=={NUMPY_PIN} "
                 "(tools/setup-reference)")
    for v in VARIANTS:
        make_variant(*v, args.write_full)


if __name__ == "__main__":
    main()
