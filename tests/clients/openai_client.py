"""The official `openai` Python package against a running `qilin serve`.

Run by tests/serve_clients.rs with the environment:
  QILIN_URL    base URL of the server, e.g. http://127.0.0.1:8000 (no /v1)
  QILIN_KEY    a valid bearer token
  QILIN_MODEL  the served model name; the model must be SmolLM2-135M-Instruct (the
               demo model): the chat check expects its greedy answer to name Paris.
Prints one `ok: ...` line per check and `all checks passed` at the end; any failure
raises (exit status 1) with what was received.
"""

import math
import os
import sys

import openai

URL = os.environ["QILIN_URL"].rstrip("/") + "/v1"
KEY = os.environ["QILIN_KEY"]
MODEL = os.environ["QILIN_MODEL"]

# No retries: a retried request would hide a failing one.
client = openai.OpenAI(base_url=URL, api_key=KEY, max_retries=0, timeout=120)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def ok(what):
    print(f"ok: {what}", flush=True)


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def check_usage(usage, what):
    check(usage is not None, f"{what}: no usage")
    check(usage.prompt_tokens > 0, f"{what}: prompt_tokens {usage.prompt_tokens}")
    check(usage.completion_tokens > 0, f"{what}: completion_tokens {usage.completion_tokens}")
    check(
        usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
        f"{what}: total_tokens {usage.total_tokens} != {usage.prompt_tokens} + {usage.completion_tokens}",
    )


def models():
    listed = [m.id for m in client.models.list()]
    check(MODEL in listed, f"/v1/models lists {listed}, not {MODEL!r}")
    ok(f"models.list() contains {MODEL!r}")


def chat():
    resp = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=32
    )
    check(resp.object == "chat.completion", f"object {resp.object!r}")
    check(resp.model == MODEL, f"model {resp.model!r}")
    check(bool(resp.id), "empty id")
    check(len(resp.choices) == 1, f"{len(resp.choices)} choices")
    choice = resp.choices[0]
    check(choice.index == 0, f"index {choice.index}")
    check(choice.message.role == "assistant", f"role {choice.message.role!r}")
    answer = choice.message.content
    check("Paris" in answer, f"answer without Paris: {answer!r}")
    check(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason!r}")
    check_usage(resp.usage, "chat")
    ok(f"chat: {answer!r} ({resp.usage.completion_tokens} tokens, {choice.finish_reason})")
    return resp


def chat_stream(reference):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage, chunks, ids = "", None, None, 0, set()
    for chunk in stream:
        chunks += 1
        ids.add(chunk.id)
        check(chunk.object == "chat.completion.chunk", f"chunk object {chunk.object!r}")
        check(chunk.model == MODEL, f"chunk model {chunk.model!r}")
        if chunk.usage is not None:
            # The usage chunk comes last and carries no choices (OpenAI's shape).
            check(chunk.choices == [], f"usage chunk with choices {chunk.choices}")
            check(usage is None, "two usage chunks")
            usage = chunk.usage
            continue
        check(usage is None, "a chunk after the usage chunk")
        check(len(chunk.choices) == 1, f"{len(chunk.choices)} choices in a chunk")
        delta = chunk.choices[0].delta
        if delta.content:
            text += delta.content
        if chunk.choices[0].finish_reason is not None:
            check(finish is None, "two finish_reason chunks")
            finish = chunk.choices[0].finish_reason
    want = reference.choices[0].message.content
    check(text == want, f"streamed {text!r} != non-streaming {want!r}")
    check(finish == reference.choices[0].finish_reason, f"stream finish_reason {finish!r}")
    check(len(ids) == 1, f"chunk ids differ: {ids}")
    check_usage(usage, "chat stream include_usage")
    check(
        (usage.prompt_tokens, usage.completion_tokens)
        == (reference.usage.prompt_tokens, reference.usage.completion_tokens),
        f"stream usage {usage} != {reference.usage}",
    )
    check(chunks >= 3, f"only {chunks} chunks")
    ok(f"chat stream: {chunks} chunks, same text and usage as non-streaming")


def completions():
    prompt = "The capital of France is"
    resp = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=8)
    check(resp.object == "text_completion", f"object {resp.object!r}")
    check(resp.model == MODEL, f"model {resp.model!r}")
    check(len(resp.choices) == 1, f"{len(resp.choices)} choices")
    text = resp.choices[0].text
    check(len(text) > 0, "empty completion")
    check(resp.choices[0].finish_reason in ("stop", "length"), f"finish_reason {resp.choices[0].finish_reason!r}")
    check_usage(resp.usage, "completions")
    check(resp.usage.completion_tokens <= 8, f"{resp.usage.completion_tokens} tokens > max_tokens 8")
    ok(f"completions: {text!r}")

    stream = client.completions.create(
        model=MODEL,
        prompt=prompt,
        temperature=0,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed, usage, finish = "", None, None
    for chunk in stream:
        check(chunk.object == "text_completion", f"chunk object {chunk.object!r}")
        if chunk.usage is not None:
            check(chunk.choices == [], f"usage chunk with choices {chunk.choices}")
            usage = chunk.usage
            continue
        streamed += chunk.choices[0].text
        if chunk.choices[0].finish_reason is not None:
            finish = chunk.choices[0].finish_reason
    check(streamed == text, f"streamed {streamed!r} != non-streaming {text!r}")
    check(finish == resp.choices[0].finish_reason, f"stream finish_reason {finish!r}")
    check_usage(usage, "completions stream include_usage")
    check(usage.completion_tokens == resp.usage.completion_tokens, f"stream usage {usage}")
    ok("completions stream: same text and usage as non-streaming")


def logprobs():
    resp = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    content = resp.choices[0].logprobs.content
    check(
        len(content) == resp.usage.completion_tokens,
        f"{len(content)} logprob entries for {resp.usage.completion_tokens} tokens",
    )
    check("".join(e.token for e in content) == resp.choices[0].message.content,
          "logprob tokens do not spell the answer")
    for e in content:
        check(isinstance(e.token, str), f"token {e.token!r}")
        check(e.logprob <= 0 and math.isfinite(e.logprob), f"logprob {e.logprob}")
        check(e.bytes == list(e.token.encode("utf-8")), f"bytes {e.bytes} for {e.token!r}")
        check(len(e.top_logprobs) == 3, f"{len(e.top_logprobs)} top_logprobs")
        lps = [t.logprob for t in e.top_logprobs]
        check(lps == sorted(lps, reverse=True), f"top_logprobs not sorted: {lps}")
        # Greedy: the chosen token is the most likely one.
        top = e.top_logprobs[0]
        check(top.token == e.token, f"greedy chose {e.token!r}, top is {top.token!r}")
        check(abs(top.logprob - e.logprob) < 1e-4, f"{top.logprob} vs {e.logprob}")
    check(math.exp(content[0].logprob) > 0.0, "zero probability")
    ok(f"chat logprobs: {len(content)} tokens x top 3")


def errors():
    try:
        client.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=4)
        raise AssertionError("wrong model accepted")
    except openai.NotFoundError as e:
        check(e.status_code == 404, f"status {e.status_code}")
        ok(f"wrong model -> NotFoundError ({e.code})")

    bad = openai.OpenAI(base_url=URL, api_key="qk-wrong", max_retries=0, timeout=30)
    try:
        bad.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
        raise AssertionError("wrong key accepted")
    except openai.AuthenticationError as e:
        check(e.status_code == 401, f"status {e.status_code}")
        check("qk-wrong" not in str(e), "the error echoes the token")
        ok(f"wrong key -> AuthenticationError ({e.code})")

    try:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, n=2)
        raise AssertionError("n=2 accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400, f"status {e.status_code}")
        ok(f"n=2 -> BadRequestError: {e.message}")


def run_checks(checks):
    """Runs `checks`, then says that all passed; a failed check exits 1 with what it saw."""
    try:
        checks()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    print("all checks passed", flush=True)


def main():
    models()
    reference = chat()
    chat_stream(reference)
    completions()
    logprobs()
    errors()


if __name__ == "__main__":
    run_checks(main)
