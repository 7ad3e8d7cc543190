"""Tool calling through the official `openai` Python package against `qilin serve`.

Run by tests/serve_clients.rs on SmolLM2-135M-Instruct served with Qwen2.5's chat
template (`--chat-template`), whose Hermes format asks for calls as
<tool_call>{"name": ..., "arguments": {...}}</tool_call>. The conversation shows three
weather questions answered by a get_weather call each; asked about Paris, the greedy
model continues the pattern, so the answer must be one call get_weather({"city": "Paris"}).
The client's own types and its stream accumulator (`ChatCompletionStreamState`, which
`client.chat.completions.stream` uses) read the answers: the wire format is theirs.
Environment: QILIN_URL, QILIN_KEY, QILIN_MODEL as for openai_client.py.
"""

import json
import os

import openai
from openai.lib.streaming.chat import ChatCompletionStreamState

from openai_client import check, ok, run_checks

URL = os.environ["QILIN_URL"].rstrip("/") + "/v1"
KEY = os.environ["QILIN_KEY"]
MODEL = os.environ["QILIN_MODEL"]
client = openai.OpenAI(base_url=URL, api_key=KEY, max_retries=0, timeout=120)

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}]


def conversation():
    messages = []
    for i, (city, temp) in enumerate([("Berlin", 12), ("Madrid", 25), ("Rome", 22)]):
        call_id = f"call_{i}"
        messages += [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": call_id, "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
            }]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"temp": temp})},
            {"role": "assistant", "content": f"It is {temp} degrees in {city}."},
        ]
    messages.append({"role": "user", "content": "What is the weather in Paris?"})
    return messages


def check_paris_call(choice, what):
    check(choice.finish_reason == "tool_calls", f"{what}: finish_reason {choice.finish_reason!r}")
    message = choice.message
    check(message.tool_calls is not None and len(message.tool_calls) == 1,
          f"{what}: tool_calls {message.tool_calls!r} (content {message.content!r})")
    call = message.tool_calls[0]
    check(call.type == "function", f"{what}: type {call.type!r}")
    check(call.id.startswith("call_") and len(call.id) > 5, f"{what}: id {call.id!r}")
    check(call.function.name == "get_weather", f"{what}: name {call.function.name!r}")
    args = json.loads(call.function.arguments)
    check(args == {"city": "Paris"}, f"{what}: arguments {args!r}")
    check(not (message.content or "").strip(), f"{what}: content {message.content!r}")
    return call


def whole():
    r = client.chat.completions.create(model=MODEL, messages=conversation(), tools=TOOLS,
                                       temperature=0, max_tokens=60)
    call = check_paris_call(r.choices[0], "whole answer")
    ok(f"tool call: {call.function.name}({call.function.arguments})")
    return r


def streamed():
    state = ChatCompletionStreamState(input_tools=TOOLS)
    chunks = 0
    for chunk in client.chat.completions.create(model=MODEL, messages=conversation(),
                                                tools=TOOLS, temperature=0, max_tokens=60,
                                                stream=True):
        state.handle_chunk(chunk)
        chunks += 1
    final = state.get_final_completion()
    check_paris_call(final.choices[0], "streamed answer")
    ok(f"streamed tool call in {chunks} chunks")


def round_trip(first):
    # The client's own assistant message and a tool result go back as the next turn.
    call = first.choices[0].message.tool_calls[0]
    messages = conversation() + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 18})},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                       temperature=0, max_tokens=20)
    check(r.choices[0].finish_reason in ("stop", "length", "tool_calls"),
          f"round trip: {r.choices[0].finish_reason!r}")
    ok(f"round trip: the call and its result accepted ({r.choices[0].finish_reason})")


def choices():
    r = client.chat.completions.create(model=MODEL, messages=conversation(), tools=TOOLS,
                                       tool_choice="none", temperature=0, max_tokens=30)
    check(r.choices[0].message.tool_calls is None, "tool_choice none: got tool_calls")
    check(r.choices[0].finish_reason != "tool_calls", "tool_choice none: finish_reason")
    ok("tool_choice none: no tool_calls")
    for choice in ["required", {"type": "function", "function": {"name": "get_weather"}}]:
        try:
            client.chat.completions.create(model=MODEL, messages=conversation(), tools=TOOLS,
                                           tool_choice=choice, max_tokens=4)
            raise AssertionError(f"tool_choice {choice!r} accepted")
        except openai.BadRequestError as e:
            check(e.status_code == 400 and e.param == "tool_choice", f"{e.status_code} {e.param}")
            ok(f"tool_choice {choice!r} -> BadRequestError: {e.message}")


def main():
    first = whole()
    streamed()
    round_trip(first)
    choices()


if __name__ == "__main__":
    run_checks(main)
