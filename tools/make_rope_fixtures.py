#!/usr/bin/env python3
"""RoPE reference values from transformers for tests/rope.rs.

For each config.json below, transformers' own RoPE initialisation gives the inverse
frequencies and the attention factor (YaRN's cos/sin scaling); we record them with
the config so the Rust side parses the same JSON and must get the same numbers.

Run: tools/setup-reference && .cache/refvenv/bin/python tools/make_rope_fixtures.py
"""
import json
import pathlib

import transformers
from transformers import AutoConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
}

CASES = {
    # Qwen2.5-7B-Instruct as shipped (no scaling).
    "qwen25_7b_default": QWEN25_7B,
    # The 128K setting the Qwen2.5 model card documents.
    "qwen25_7b_yarn_128k": {**QWEN25_7B, "rope_scaling": {
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
    # Same, written in the newer rope_parameters form.
    "qwen25_7b_yarn_rope_parameters": {**{k: v for k, v in QWEN25_7B.items() if k != "rope_theta"},
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                            "original_max_position_embeddings": 32768}},
    # YaRN with explicit betas and mscale pair (DeepSeek style attention factor).
    "yarn_mscale": {**QWEN25_7B, "rope_scaling": {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
        "beta_fast": 16, "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0}},
    # Llama 3.1 8B's frequency-band scaling.
    "llama31_8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "linear": {**QWEN25_7B, "rope_scaling": {"type": "linear", "factor": 2.0}},
}


def main():
    out = {"reference": f"transformers {transformers.__version__}", "cases": []}
    for name, config_json in CASES.items():
        cfg = AutoConfig.for_model(config_json["model_type"], **{
            k: v for k, v in config_json.items() if k not in ("model_type", "architectures")})
        # The model's own rotary module: exactly what its forward pass uses.
        rotary_class = {"qwen2": Qwen2RotaryEmbedding, "llama": LlamaRotaryEmbedding}
        rotary = rotary_class[config_json["model_type"]](cfg)
        inv_freq, attention_factor = rotary.inv_freq, rotary.attention_scaling
        out["cases"].append({
            "name": name,
            "config": config_json,
            "inv_freq": [float(x) for x in inv_freq],
            "attention_factor": float(attention_factor),
        })
    path = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/rope/transformers_rope.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
