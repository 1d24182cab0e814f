"""`jneox serve` against the official `openai` client: answers equal jneox.generate's, streaming,
usage, stop, seeds, keys, batching that changes nothing, continuous joins, disconnects, 429."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
from serve_fixtures import API_KEY, client, live, reference, serve_checkpoint, spawn_serve, start_server  # noqa: F401

from jneox.chat import TURN_STOP, format_prompt
from jneox.generate import generate
from jneox.sampling import SamplingParams

openai = pytest.importorskip("openai")


def chat_prompt(text: str) -> str:
    return format_prompt([{"role": "user", "content": text}])


def expected(reference, prompt: str, **kw):
    model, tokenizer = reference
    return generate(model, tokenizer, prompt, SamplingParams(**kw))


def test_chat_matches_generate_and_reports_usage(client, reference):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "日本の首都は?"}],
                                       temperature=0, max_tokens=20)
    want = expected(reference, chat_prompt("日本の首都は?"), temperature=0, max_new_tokens=20, stop=(TURN_STOP,))
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(reference[1].encode(chat_prompt("日本の首都は?")))
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_pieces_add_up_and_end_with_usage(client, reference):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "吾輩は猫である"}], temperature=0.8, seed=7,
              max_tokens=30)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # streamed, not one block
    assert "".join(pieces) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_sse_wire_format_ends_with_done(live):
    body = {"messages": [{"role": "user", "content": "こんにちは"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_completions_raw_prompt(client, reference):
    r = client.completions.create(model="tiny", prompt="吾輩は猫である。", temperature=0, max_tokens=15)
    want = expected(reference, "吾輩は猫である。", temperature=0, max_new_tokens=15)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(reference[1].encode("吾輩は猫である。"))
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="吾輩は猫である。", temperature=0, max_tokens=15, stream=True))
    assert streamed == want.text


def test_stop_string_cuts_the_answer(client):
    kw = dict(model="tiny", prompt="日本の", temperature=0, max_tokens=40)
    full = client.completions.create(**kw).choices[0].text
    assert len(full) > 12
    stop = full[8:10]
    r = client.completions.create(**kw, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "山"}], temperature=1.0, max_tokens=30)
    a = client.chat.completions.create(**kw, seed=1).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=1).choices[0].message.content
    c = client.chat.completions.create(**kw, seed=2).choices[0].message.content
    assert a == b
    assert a != c


def test_system_message_is_put_before_the_first_user_turn(client, reference):
    r = client.chat.completions.create(model="tiny", temperature=0, max_tokens=10, messages=[
        {"role": "system", "content": "丁寧に答えてください。"},
        {"role": "user", "content": "富士山は?"}])
    prompt = chat_prompt("丁寧に答えてください。\n富士山は?")
    assert r.usage.prompt_tokens == len(reference[1].encode(prompt))
    assert r.choices[0].message.content == expected(reference, prompt, temperature=0, max_new_tokens=10,
                                                    stop=(TURN_STOP,)).text


def test_models_and_health(client, live):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = httpx.get(live.url + "/health").json()
    assert h["status"] == "ok" and h["max_batch"] == 8


def test_wrong_or_missing_key_is_401(live):
    from openai import OpenAI

    wrong = OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], max_tokens=2)
    assert e.value.status_code == 401
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(live.url + "/v1/models").status_code == 401


def test_eight_concurrent_streams_equal_each_alone(client, live, reference):
    """Batching changes nothing but speed: same seed, same text, alone or among 8 running together."""
    jobs = [dict(messages=[{"role": "user", "content": q}], temperature=0.9, top_p=0.95, seed=i, max_tokens=40,
                 extra_body={"top_k": 40, "repetition_penalty": 1.0 + 0.05 * (i % 3)})
            for i, q in enumerate(["日本の首都は?", "猫", "今日の天気", "こんにちは。", "山と川", "東京タワー", "吾輩は", "夏"])]

    def ask(job) -> str:
        return "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(model="tiny", stream=True, **job))

    alone = [ask(job) for job in jobs]
    for job, text in zip(jobs, alone):  # and alone through the server is what jneox.generate gives
        p = dict(temperature=0.9, top_p=0.95, seed=job["seed"], max_new_tokens=40, stop=(TURN_STOP,),
                 top_k=40, repetition_penalty=job["extra_body"]["repetition_penalty"])
        assert text == expected(reference, chat_prompt(job["messages"][0]["content"]), **p).text

    live.engine.max_rows_seen = 0
    together = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        barrier.wait()
        together[i] = ask(jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert live.engine.max_rows_seen >= 4  # they really were decoded in one batch
    assert together == alone


def test_new_request_joins_a_running_batch(client, live):
    """Continuous batching: a short request submitted while a long one runs finishes first."""
    order = []
    started = threading.Event()

    def long():
        for c in client.completions.create(model="tiny", prompt="東京", temperature=0.8, seed=0,
                                           max_tokens=400, stream=True):
            started.set()
        order.append("long")

    t = threading.Thread(target=long)
    t.start()
    assert started.wait(30)
    r = client.completions.create(model="tiny", prompt="山", temperature=0, max_tokens=3)
    order.append("short")
    t.join(60)
    assert r.usage.completion_tokens <= 3
    assert order == ["short", "long"]


def test_disconnected_client_frees_its_slot(live):
    steps_before = live.engine.steps
    body = {"prompt": "川", "max_tokens": 480, "temperature": 0.8, "seed": 3, "stream": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as r:
        lines = r.iter_lines()
        next(lines), next(lines), next(lines)  # a few events arrived: it is running
    deadline = time.monotonic() + 10
    while live.engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert live.engine.stats()["running"] == 0
    assert live.engine.steps - steps_before < 400  # stopped early, did not run its 480 tokens out


def test_full_queue_answers_429_with_retry_after(serve_checkpoint):
    """max_batch 1 + max_queue 1: a third request is refused at once, the first two still get answers."""
    server = start_server(serve_checkpoint, api_key=None, max_batch=1, max_queue=1, start_engine=False)
    try:
        results = []

        def post():
            results.append(httpx.post(server.url + "/v1/completions", json={"prompt": "山", "max_tokens": 3},
                                      timeout=60))

        threads = [threading.Thread(target=post) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while server.engine.stats()["waiting"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "山", "max_tokens": 3}, timeout=10)
        assert time.monotonic() - t0 < 5  # refused at once, not hung
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        server.engine.start()
        for t in threads:
            t.join(30)
        assert [x.status_code for x in results] == [200, 200]
        assert httpx.get(server.url + "/health").json()["status"] == "ok"
    finally:
        server.stop()


def test_cli_serve_command(serve_checkpoint):
    """`jneox serve` as a user starts it: loopback, the key enforced, the folder's name as the model id."""
    import sys
    from pathlib import Path

    jneox_bin = Path(sys.executable).with_name("jneox")
    proc, url = spawn_serve([str(jneox_bin), "serve", "--model", str(serve_checkpoint), "--api-key", "k",
                             "--max-batch", "2", "--log-level", "warning"])
    try:
        assert httpx.get(url + "/health").json()["max_batch"] == 2
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert [m["id"] for m in models["data"]] == [serve_checkpoint.name]
        r = httpx.post(url + "/v1/completions", json={"prompt": "山", "max_tokens": 4, "temperature": 0},
                       headers={"Authorization": "Bearer k"}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert "<html" in httpx.get(url + "/").text
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_failing_step_fails_only_its_requests(live, monkeypatch):
    """An error inside generation (a bug, memory) answers that request with an error; the server goes on."""
    real = live.engine._decode_step
    calls = []

    def broken(running):
        calls.append(len(running))
        if len(calls) == 1:
            raise RuntimeError("simulated failure")
        return real(running)

    monkeypatch.setattr(live.engine, "_decode_step", broken)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "山", "max_tokens": 5}, headers=headers, timeout=30)
    assert r.status_code == 500 and r.json()["error"]["message"].startswith("generation failed")
    assert "simulated failure" not in r.text  # the details go to the server's log, not to clients
    assert r.json()["error"]["type"] == "server_error"
    with httpx.stream("POST", live.url + "/v1/completions", json={"prompt": "山", "max_tokens": 5, "stream": True},
                      headers=headers, timeout=30) as s:
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines)
    assert live.engine.stats()["running"] == 0
