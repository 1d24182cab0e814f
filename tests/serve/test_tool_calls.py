"""Tool calls on /v1/chat/completions in OpenAI's shape: the official client's function-calling example
runs unmodified (streamed and not), tool_choice's four forms, the history's tool turns rendered as the
documented text turns, calls that are valid JSON for the function's schema, and 400s for bad tools.

A random tiny model writes text and would almost never start a call by itself, nor close a string:
``caller`` is a tiny model whose next token depends only on the current one (its blocks add nothing
to the embeddings): after the prompt's last token it favours ``{``, after any other ``"``, then
closing brackets, so that with ``tool_choice: auto`` it starts a call, and its strings end.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import httpx
import pytest
import torch
from serve_fixtures import API_KEY, WINDOW, client, live, reference, serve_checkpoint, start_server  # noqa: F401

import jneox
from jneox.chat import SYSTEM, USER, Utterance, format_prompt, format_tool_calls, format_tool_results, format_tools

jsonschema = pytest.importorskip("jsonschema")
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get current temperature for a given location.",
    "parameters": {"type": "object", "properties": {"location": {"type": "string", "description": "City and country"},
                                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["location"], "additionalProperties": False}, "strict": True}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 5}}, "required": ["city"]}}}

# OpenAI's function-calling example for Chat Completions, as its users run it (the client reads
# OPENAI_BASE_URL and OPENAI_API_KEY); the streamed variant gathers the call from the deltas.
EXAMPLE = '''
from openai import OpenAI
import json

client = OpenAI()

def get_weather(location):
    return "24C"

tools = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get current temperature for a given location.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City and country e.g. Bogotá, Colombia"}
            },
            "required": ["location"],
            "additionalProperties": False
        },
        "strict": True
    }
}]

messages = [{"role": "user", "content": "What's the weather like in Paris today?"}]
completion = client.chat.completions.create(model="gpt-4.1", messages=messages, tools=tools)

tool_call = completion.choices[0].message.tool_calls[0]
args = json.loads(tool_call.function.arguments)
result = get_weather(args["location"])

messages.append(completion.choices[0].message)
messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": str(result)})
completion_2 = client.chat.completions.create(model="gpt-4.1", messages=messages, tools=tools)
print(completion_2.choices[0].message.content)
print("FINISH", completion.choices[0].finish_reason, json.dumps(args))
'''
STREAMED_EXAMPLE = '''
from openai import OpenAI
import json

client = OpenAI()
tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"],
    "additionalProperties": False}, "strict": True}}]
stream = client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "What's the weather like in Paris today?"}],
                                        tools=tools, stream=True)
final_tool_calls = {}
for chunk in stream:
    for tool_call in chunk.choices[0].delta.tool_calls or []:
        index = tool_call.index
        if index not in final_tool_calls:
            final_tool_calls[index] = tool_call
        else:
            final_tool_calls[index].function.arguments += tool_call.function.arguments
    finish = chunk.choices[0].finish_reason or None
print("CALL", final_tool_calls[0].function.name, final_tool_calls[0].function.arguments)
print("FINISH", finish)
'''


@pytest.fixture(scope="module")
def caller_checkpoint(tmp_path_factory, spiece_model):
    from jneox.config import ModelConfig
    from jneox.model import GPTNeoX
    from jneox.tokenizer import Tokenizer

    tok = Tokenizer(spiece_model)
    config = ModelConfig(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=160,
                         max_position_embeddings=4 * WINDOW)  # room for the function list
    model = GPTNeoX(config)
    model.init_weights(std=0.2, seed=0)
    g = torch.Generator().manual_seed(0)
    last = tok.encode(format_prompt([Utterance(USER, "x")]))[-1]  # what the answer follows
    first, rest = torch.zeros(config.vocab_size), torch.zeros(config.vocab_size)  # logits after each
    noise = torch.randn(2, config.vocab_size, generator=g) * 0.5
    for i in range(tok.vocab_size):
        text = tok.decode_bytes([i])
        first[i] = 16.0 if text == b"{" else noise[0, i]
        rest[i] = 16.0 if text.startswith(b'"') else 12.0 if text in (b"}", b"]") else 10.0 if text == b"{" else noise[1, i]
    with torch.no_grad():
        for block in model.blocks:  # each block adds nothing: the final norm sees the token's embedding
            for linear in (block.attn.proj, block.mlp.proj):
                linear.weight.zero_()
                linear.bias.zero_()
        model.norm_f.weight.fill_(1.0)
        model.norm_f.bias.zero_()
        a, b = torch.zeros(config.hidden_size), torch.zeros(config.hidden_size)
        a[0], a[1], b[2], b[3] = 1.0, -1.0, 1.0, -1.0  # orthogonal, zero mean: the norm keeps them apart
        model.embed.weight.copy_(b.expand(config.vocab_size, -1))
        model.embed.weight[last] = a
        a, b = (torch.nn.functional.layer_norm(v, v.shape) for v in (a, b))
        model.lm_head.weight.copy_(first[:, None] * a / a.dot(a) + rest[:, None] * b / b.dot(b))
    return jneox.save(model, tmp_path_factory.mktemp("caller") / "caller", tokenizer_file=spiece_model)


@pytest.fixture(scope="module")
def caller(caller_checkpoint):
    server = start_server(caller_checkpoint)
    yield server
    server.stop()


def post(server, body, timeout=120):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "東京の天気は?"}], "max_tokens": 200, **body}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=timeout)


def run_example(server, code: str) -> str:
    env = {**os.environ, "OPENAI_BASE_URL": server.url + "/v1", "OPENAI_API_KEY": API_KEY}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_openai_example_runs_unmodified(caller):
    out = run_example(caller, EXAMPLE)
    finish, args = out.strip().splitlines()[-1].split(" ", 2)[1:]
    assert finish == "tool_calls"
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])


def test_openai_streamed_example_runs_unmodified(caller):
    out = run_example(caller, STREAMED_EXAMPLE).strip().splitlines()
    name, args = out[-2].split(" ", 2)[1:]
    assert name == "get_weather" and out[-1] == "FINISH tool_calls"
    assert isinstance(json.loads(args)["location"], str)


@pytest.mark.parametrize("choice", ["required", "auto", {"type": "function", "function": {"name": "get_time"}}])
def test_calls_follow_the_schema(caller, choice):
    r = post(caller, {"tools": [WEATHER, TIME], "tool_choice": choice, "seed": 1})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None, c
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for call in c["message"]["tool_calls"]:
        assert call["type"] == "function" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
    if isinstance(choice, dict):
        assert {call["function"]["name"] for call in c["message"]["tool_calls"]} == {"get_time"}


def test_parallel_tool_calls_false_makes_one_call(caller):
    r = post(caller, {"tools": [WEATHER, TIME], "tool_choice": "required", "parallel_tool_calls": False})
    assert len(r.json()["choices"][0]["message"]["tool_calls"]) == 1


def test_tool_choice_none_answers_in_text(caller):
    r = post(caller, {"tools": [WEATHER], "tool_choice": "none", "max_tokens": 8})
    c = r.json()["choices"][0]
    assert "tool_calls" not in c["message"] and c["finish_reason"] == "length" and c["message"]["content"]


def test_auto_answers_in_text_when_the_model_writes_text(live, client):
    """The plain random model does not start with '{': its answer is text, streamed as it comes."""
    r = post(live, {"tools": [WEATHER], "max_tokens": 16, "temperature": 0})
    c = r.json()["choices"][0]
    assert c["message"]["content"] and not c["message"]["content"].startswith("{") and "tool_calls" not in c["message"]
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "東京の天気は?"}],
                                                 tools=[WEATHER], max_tokens=16, temperature=0, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == c["message"]["content"]
    assert sum(bool(ch.choices and ch.choices[0].delta.content) for ch in chunks) > 1  # not held back


def test_history_is_rendered_as_documented(caller, reference):
    """The prompt holds the function list (first user turn), the call (a システム turn) and the result
    (a ユーザー turn) exactly as jneox.chat renders them."""
    _, tok = reference
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location": "東京"}'}}
    messages = [{"role": "system", "content": "丁寧に答えて"}, {"role": "user", "content": "東京の天気は?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "晴れ、24度"}]
    r = post(caller, {"messages": messages, "tools": [WEATHER], "max_tokens": 1})
    assert r.status_code == 200, r.text
    f = WEATHER["function"]
    expected = format_prompt([
        Utterance(USER, "\n".join(["丁寧に答えて", format_tools([f]), "東京の天気は?"])),
        Utterance(SYSTEM, format_tool_calls([("get_weather", {"location": "東京"})])),
        Utterance(USER, format_tool_results([("get_weather", "晴れ、24度")]))])
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(expected))


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "x", "content": "b"}]},
     "messages[1].tool_call_id"),
])
def test_bad_tools_are_400(caller, body, param):
    r = post(caller, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
