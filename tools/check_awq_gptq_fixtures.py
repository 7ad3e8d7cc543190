#!/usr/bin/env python3
"""Cross-checks tests/fixtures/awq_gptq against the published readers themselves:
AutoAWQ's `dequantize_gemm` (awq/utils/packing_utils.py) and AutoGPTQ's QuantLinear
torch forward (auto_gptq/nn_modules/qlinear/qlinear_cuda.py), both run on the CPU in
fp16 as they are written. Each reader's fp16 weights must hash to the fixture's
`fnv1a64_f16` (the reference rounded to fp16), which pins the packing orders and the
GPTQ v1 zero convention to the code that defines them, independently of
make_awq_gptq_fixtures.py's own numpy readers. Not needed to build or test Qilin.

    .cache/refvenv/bin/python tools/check_awq_gptq_fixtures.py \\
        --awq-packing-utils AutoAWQ/awq/utils/packing_utils.py \\
        --gptq-qlinear AutoGPTQ/auto_gptq/nn_modules/qlinear/qlinear_cuda.py

Needs torch and transformers (the reference venv) and those two source files from
checkouts of github.com/casper-hansen/AutoAWQ and github.com/AutoGPTQ/AutoGPTQ; they
are imported by path, no package install. gptq_v2 fixtures are skipped (AutoGPTQ reads
v1 only).
"""

import argparse
import importlib.util
import json
import os
import struct
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "awq_gptq")


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_raw(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    dtypes = {"I32": "<i4", "F16": "<f2"}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        a = np.frombuffer(data[8 + n + b:8 + n + e], dtypes[info["dtype"]]).reshape(info["shape"])
        out[name] = torch.from_numpy(a.copy())
    return out


def fnv1a64(b):
    h = 0xCBF29CE484222325
    for byte in b:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--awq-packing-utils", required=True)
    parser.add_argument("--gptq-qlinear", required=True)
    args = parser.parse_args()
    awq = load_module(args.awq_packing_utils, "awq_packing_utils")
    gptq = load_module(args.gptq_qlinear, "gptq_qlinear_cuda")
    failures = 0
    for variant in sorted(os.listdir(FIXTURES)):
        with open(os.path.join(FIXTURES, variant, "reference.json")) as f:
            ref = json.load(f)
        qc = ref["quantization_config"]
        if qc.get("checkpoint_format") == "gptq_v2":
            print(f"{variant}: skipped (gptq_v2)")
            continue
        t = read_raw(os.path.join(FIXTURES, variant, "quantized.safetensors"))
        for prefix, r in sorted(ref["tensors"].items()):
            out_f, in_f = r["shape"]
            if qc["quant_method"] == "awq":
                w = awq.dequantize_gemm(t[f"{prefix}.qweight"], t[f"{prefix}.qzeros"],
                                        t[f"{prefix}.scales"], qc["bits"], qc["group_size"]).T
            else:
                layer = gptq.QuantLinear(qc["bits"], qc["group_size"], in_f, out_f, bias=False)
                for k in ["qweight", "qzeros", "scales", "g_idx"]:
                    setattr(layer, k, t[f"{prefix}.{k}"])
                with torch.no_grad():
                    w = layer(torch.eye(in_f, dtype=torch.float16)).T
            got = fnv1a64(w.to(torch.float16).to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
            ok = got == r["fnv1a64_f16"]
            failures += not ok
            print(f"{variant} {prefix}: {'ok' if ok else 'MISMATCH'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
