"""Bad input gets a 4xx in OpenAI's error shape, never a 500, and the server keeps answering."""
from __future__ import annotations

import json

import httpx
import pytest
from serve_fixtures import API_KEY, WINDOW, live, serve_checkpoint  # noqa: F401

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "こんにちは"}]
LONG = "吾輩は猫である。名前はまだ無い。" * 200  # far more than the 512-token window

CASES = [
    # (id, path, body: dict is sent as JSON, bytes as they are; status; the error's param or None)
    ("malformed-json", CHAT, b'{"messages": [', 400, None),
    ("not-an-object", CHAT, b"[1, 2]", 400, None),
    ("deeply-nested", CHAT, b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("huge-integer", CHAT, b'{"messages": [], "seed": ' + b"9" * 5000 + b"}", 400, None),
    ("nan-temperature", CHAT, b'{"messages": [{"role": "user", "content": "a"}], "temperature": NaN}', 400,
     "temperature"),
    ("invalid-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    ("messages-missing", CHAT, {"model": "tiny"}, 400, "messages"),
    ("messages-wrong-type", CHAT, {"messages": "hello"}, 400, "messages"),
    ("messages-empty", CHAT, {"messages": []}, 400, "messages"),
    ("message-not-object", CHAT, {"messages": ["hi"]}, 400, "messages[0]"),
    ("unknown-role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("role-wrong-type", CHAT, {"messages": [{"role": 3, "content": "hi"}]}, 400, "messages[0].role"),
    ("user-content-null", CHAT, {"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    ("system-content-null", CHAT, {"messages": [{"role": "system", "content": None}, *USER]}, 400,
     "messages[0].content"),
    ("lone-surrogate", CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),
    ("huge-integer-penalty", CHAT, b'{"messages": [{"role": "user", "content": "a"}], "repetition_penalty": 1'
     + b"0" * 400 + b"}", 400, "repetition_penalty"),
    ("content-wrong-type", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("image-content", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content"),
    ("last-not-user", CHAT, {"messages": [*USER, {"role": "assistant", "content": "はい"}]}, 400, "messages"),
    ("late-system", CHAT, {"messages": [*USER, {"role": "assistant", "content": "a"}, {"role": "system", "content": "b"},
                                        *USER]}, 400, "messages[2].role"),
    ("prompt-too-long", CHAT, {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("completion-prompt-too-long", COMPLETIONS, {"prompt": LONG}, 400, "prompt"),
    ("max-tokens-zero", CHAT, {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-negative", COMPLETIONS, {"prompt": "a", "max_tokens": -5}, 400, "max_tokens"),
    ("max-tokens-beyond-window", CHAT, {"messages": USER, "max_tokens": WINDOW}, 400, "max_tokens"),
    ("max-tokens-float", CHAT, {"messages": USER, "max_tokens": 2.5}, 400, "max_tokens"),
    ("max-tokens-string", CHAT, {"messages": USER, "max_tokens": "10"}, 400, "max_tokens"),
    ("temperature-negative", CHAT, {"messages": USER, "temperature": -0.1}, 400, "temperature"),
    ("temperature-string", CHAT, {"messages": USER, "temperature": "hot"}, 400, "temperature"),
    ("temperature-bool", CHAT, {"messages": USER, "temperature": True}, 400, "temperature"),
    ("top-p-zero", CHAT, {"messages": USER, "top_p": 0}, 400, "top_p"),
    ("top-p-above-one", COMPLETIONS, {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("top-k-negative", CHAT, {"messages": USER, "top_k": -3}, 400, "top_k"),
    ("repetition-penalty-zero", CHAT, {"messages": USER, "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("huge-stop-list", CHAT, {"messages": USER, "stop": [f"s{i}" for i in range(10_000)]}, 400, "stop"),
    ("huge-stop-string", CHAT, {"messages": USER, "stop": ["x" * 100_000]}, 400, "stop"),
    ("empty-stop-string", CHAT, {"messages": USER, "stop": [""]}, 400, "stop"),
    ("stop-wrong-type", CHAT, {"messages": USER, "stop": 3}, 400, "stop"),
    ("seed-float", CHAT, {"messages": USER, "seed": 1.5}, 400, "seed"),
    ("stream-not-bool", CHAT, {"messages": USER, "stream": "yes"}, 400, "stream"),
    ("n-above-one", CHAT, {"messages": USER, "n": 3}, 400, "n"),
    ("logprobs-not-bool", CHAT, {"messages": USER, "logprobs": 5}, 400, "logprobs"),
    ("empty-prompt", COMPLETIONS, {"prompt": ""}, 400, "prompt"),
    ("prompt-missing", COMPLETIONS, {"max_tokens": 3}, 400, "prompt"),
    ("prompt-wrong-type", COMPLETIONS, {"prompt": {"text": "a"}}, 400, "prompt"),
    ("several-prompts-streamed", COMPLETIONS, {"prompt": ["a", "b"], "stream": True}, 400, "stream"),
    ("token-id-outside-vocab", COMPLETIONS, {"prompt": [5, 10**9]}, 400, "prompt"),
    ("body-too-large", COMPLETIONS, b'{"prompt": "' + b"a" * (2 << 20) + b'"}', 413, None),
]


@pytest.mark.parametrize("path,body,status,param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_4xx_in_openai_shape(live, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(live.url + path, content=content, headers=AUTH, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert httpx.get(live.url + "/health", timeout=5).json()["status"] == "ok"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}],
                         ids=["missing", "wrong", "no-bearer"])
def test_api_key_required(live, headers):
    r = httpx.post(live.url + CHAT, json={"messages": USER, "max_tokens": 1}, headers=headers, timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_unknown_route_and_method_are_openai_shaped(live):
    r = httpx.get(live.url + "/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(live.url + CHAT, headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()


def test_server_still_generates_after_the_bad_inputs(live):
    r = httpx.post(live.url + CHAT, json={"messages": USER, "max_tokens": 3, "temperature": 0}, headers=AUTH,
                   timeout=30)
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] >= 1
    assert live.engine.stats()["running"] == 0


def test_assistant_message_may_have_null_content(live):
    """OpenAI allows null content only on an assistant turn (one that called tools): taken as empty text."""
    messages = [*USER, {"role": "assistant", "content": None}, *USER]
    r = httpx.post(live.url + CHAT, json={"messages": messages, "max_tokens": 2}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
