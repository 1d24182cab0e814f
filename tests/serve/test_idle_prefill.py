"""Idle prefill: while no request waits or runs, the engine prefills a finished answer's follow-up (its
prompt and answer) into the prefix cache, so the conversation's next prompt takes the previous answer
from the cache, with the same output bits as the cache off. It never runs beside a request, a request
that comes while it runs waits for one chunk at most, and ``idle_prefill=0`` turns it off.

The engine is driven here without its thread (``Engine.step(wait=False)``), so that everything is
counted in engine steps."""
from __future__ import annotations

import time

import httpx
import pytest
import torch

import jneox
from jneox.quantize import FORMATS, MAX_KERNEL_ROWS
from jneox.sampling import SamplingParams
from jneox.serve import Engine
from jneox.serve.protocol import parse_chat
from serve_fixtures import API_KEY, packed_checkpoint, random_ids, start_server  # noqa: F401  (fixture)

ANSWER = 70  # generated tokens of the first turn


class Client:
    """Requests submitted to an engine that is driven step by step; each one's events."""

    def __init__(self, engine: Engine):
        self.engine, self.events = engine, {}

    def submit(self, ids: list[int], max_tokens: int) -> int:
        key = len(self.events)
        self.events[key] = []
        self.engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=max_tokens), self.events[key].append,
                           logprobs=3)
        return key

    def done(self, key: int) -> bool:
        return bool(self.events[key]) and self.events[key][-1].final

    def result(self, key: int) -> tuple[list[tuple], int | None]:
        """The answer's tokens with their logprobs and alternatives (its bits), and cached_tokens."""
        events = self.events[key]
        assert events[-1].error is None, events[-1].error
        return [(t.id, t.logprob, tuple(t.top)) for e in events for t in e.logprobs], events[-1].cached_tokens


def steps_until(engine: Engine, done, limit: int = 10_000) -> int:
    """Engine steps until ``done()``; how many."""
    with torch.inference_mode():
        for n in range(limit):
            if done():
                return n
            engine.step(wait=False)
    raise AssertionError(f"not done after {limit} engine steps")


def idle(engine: Engine) -> bool:
    return engine.stats()["idle_prefill_pending"] == 0


def turn(engine: Engine, ids: list[int], max_tokens: int) -> tuple[list[tuple], int | None]:
    client = Client(engine)
    key = client.submit(ids, max_tokens)
    steps_until(engine, lambda: client.done(key))
    return client.result(key)


def expected_cached(engine: Engine, known: int, n: int) -> int:
    """The prompt tokens a prompt of ``n`` tokens takes from the cache when its first ``known`` tokens were
    prefilled before: the whole blocks among them, back to where a prompt may resume (a chunk boundary, or
    a block boundary with more than MAX_KERNEL_ROWS rows of its chunk left; the last token never)."""
    bt, chunk = engine.prefix_cache.block_tokens, engine.prefill_chunk
    r = min(known, n - 1) // bt * bt
    while r and not (r % chunk == 0 or (bt < chunk and min(r - r % chunk + chunk, n) - r > MAX_KERNEL_ROWS)):
        r -= bt
    return r


def _conversation(engine: Engine, first: list[int], new: list[int]) -> tuple[list[int], list[tuple], list[tuple], int]:
    """A first turn, the engine idle until its idle prefill is done, then the follow-up (first turn's prompt,
    its answer, ``new``): the follow-up's prompt, both answers, and the follow-up's cached tokens."""
    answer, _ = turn(engine, first, ANSWER)
    assert len(answer) == ANSWER  # no EOS: the answer is as long as asked
    steps_until(engine, lambda: idle(engine))
    follow = first + [t for t, *_ in answer] + new
    again, cached = turn(engine, follow, 4)
    return follow, answer, again, cached


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_follow_up_takes_the_previous_answer_from_the_cache(packed_checkpoint, fmt):
    model, tokenizer = jneox.load(packed_checkpoint, weights=fmt)
    on = Engine(model, tokenizer, prefix_cache_mb=64)
    if on.prefix_cache is None:
        pytest.skip("no prefix cache on this device (prefill chunk = window)")
    off = Engine(model, tokenizer, prefix_cache_mb=0)
    without = Engine(model, tokenizer, prefix_cache_mb=64, idle_prefill=0)
    first, new = random_ids(100, 21), random_ids(100, 22)
    follow, answer, again, cached = _conversation(on, first, new)
    assert on.stats()["idle_prefill_jobs"] == 1 and on.stats()["idle_prefill_tokens"] > 0
    # the previous answer's whole blocks come from the cache
    assert cached == expected_cached(on, len(first) + ANSWER, len(follow)) > expected_cached(on, len(first), len(follow))
    # the same bits as the cache off, and as the cache on without idle prefill
    assert turn(off, first, ANSWER)[0] == answer
    assert turn(off, follow, 4)[0] == again
    _, answer_without, again_without, cached_without = _conversation(without, first, new)
    assert (answer_without, again_without) == (answer, again)
    assert cached_without == expected_cached(without, len(first), len(follow))


def test_a_request_that_comes_during_idle_prefill_waits_one_chunk_at_most(packed_checkpoint):
    """A long answer's idle prefill takes several chunks; a request submitted while one is computed is in
    the very next step's prefill, the idle prefill's blocks so far in its cache, and the idle prefill goes
    on after it (to the end of the job)."""
    model, tokenizer = jneox.load(packed_checkpoint, weights="float32")
    engine = Engine(model, tokenizer, prefix_cache_mb=64)
    if engine.prefix_cache is None:
        pytest.skip("no prefix cache on this device")
    chunk = engine.prefill_chunk
    first = random_ids(20, 23)
    answer, _ = turn(engine, first, 3 * chunk)
    assert len(answer) == 3 * chunk
    job = first + [t for t, *_ in answer]
    client, arrived = Client(engine), []
    inner = engine._prefill_step
    log = []  # (idle chunk or a request's, request waiting at its start)

    def spy(prompts, **kw):
        log.append((prompts[0].idle, bool(engine.waiting)))
        inner(prompts, **kw)
        if prompts[0].idle and engine.counters["idle_prefill_tokens"] >= chunk and not arrived:
            arrived.append(client.submit(job + random_ids(10, 24), 2))  # comes while this chunk is computed

    engine._prefill_step = spy
    steps_until(engine, lambda: arrived)
    idle_tokens = engine.counters["idle_prefill_tokens"]
    assert 0 < idle_tokens < len(job) - chunk  # more chunks were left
    with torch.inference_mode():
        engine.step(wait=False)  # the next step: the request's prefill, not another idle chunk
    assert log[-1] == (False, False) and engine.counters["idle_prefill_tokens"] == idle_tokens
    steps_until(engine, lambda: client.done(arrived[0]))
    # what the idle prefill had stored (whole blocks from the prompt's start) was taken
    _, cached = client.result(arrived[0])
    assert cached >= expected_cached(engine, len(first) + idle_tokens, len(job) + 10) > 0
    steps_until(engine, lambda: idle(engine))


def test_idle_prefill_never_runs_beside_requests(packed_checkpoint):
    """Requests that come one after another while others decode: no idle chunk in a step that began with a
    request waiting or running; between requests, it runs."""
    model, tokenizer = jneox.load(packed_checkpoint, weights="float32")
    engine = Engine(model, tokenizer, max_batch=2, prefix_cache_mb=64)
    if engine.prefix_cache is None:
        pytest.skip("no prefix cache on this device")
    client = Client(engine)
    plan = {0: [(random_ids(60, 30), 40), (random_ids(90, 31), 25), (random_ids(40, 32), 30)],  # at step 0
            10: [(random_ids(70, 33), 20)], 30: [(random_ids(50, 34), 15)]}
    keys, busy_idle, idle_chunks = [], 0, 0
    with torch.inference_mode():
        for step in range(5000):
            keys += [client.submit(ids, n) for ids, n in plan.pop(step, [])]
            if not plan and all(client.done(k) for k in keys) and idle(engine):
                break
            busy = bool(engine.waiting) or engine.running_count() > 0
            before = engine.counters["idle_prefill_tokens"]
            engine.step(wait=False)
            ran = engine.counters["idle_prefill_tokens"] > before
            busy_idle += busy and ran
            idle_chunks += ran
    assert all(client.done(k) for k in keys) and idle(engine)
    assert busy_idle == 0 and idle_chunks > 0
    # one job per finished request at most, the newest first: a stale one is dropped unrun
    assert 0 < engine.counters["idle_prefill_jobs"] <= len(keys)


def test_idle_prefill_off(packed_checkpoint):
    model, tokenizer = jneox.load(packed_checkpoint, weights="float32")
    engine = Engine(model, tokenizer, prefix_cache_mb=64, idle_prefill=0)
    if engine.prefix_cache is None:
        pytest.skip("no prefix cache on this device")
    turn(engine, random_ids(100, 40), 40)
    assert engine.stats()["idle_prefill_pending"] == 0
    blocks = len(engine.prefix_cache.blocks)
    with torch.inference_mode():
        for _ in range(20):
            engine.step(wait=False)
    assert engine.counters["idle_prefill_jobs"] == engine.counters["idle_prefill_tokens"] == 0
    assert len(engine.prefix_cache.blocks) == blocks
    # the prefix cache off: no jobs either
    assert Engine(model, tokenizer, prefix_cache_mb=0).idle_jobs.maxlen == 0


def test_a_chat_follow_up_over_http(packed_checkpoint):
    """A chat's second turn (the first turn's messages, its answer as the assistant's, a new user message),
    sent once the server is idle: cached_tokens covers the previous answer, and the answer is the one the
    cache off gives."""
    live = start_server(packed_checkpoint)
    try:
        engine = live.engine
        if engine.prefix_cache is None:
            pytest.skip("no prefix cache on this device")
        headers = {"Authorization": f"Bearer {API_KEY}"}
        history = [{"role": "user", "content": "こんにちは。" * 40}]
        chat = {"model": "tiny", "messages": history, "max_tokens": 60, "temperature": 0}
        first = httpx.post(f"{live.url}/v1/chat/completions", json=chat, headers=headers, timeout=120).json()
        deadline = time.monotonic() + 120
        while not idle(engine):  # the idle prefill of the first answer
            assert time.monotonic() < deadline, "the idle prefill did not finish"
            time.sleep(0.05)
        assert engine.counters["idle_prefill_jobs"] == 1
        chat["messages"] = [*history, first["choices"][0]["message"], {"role": "user", "content": "続けて"}]
        chat["max_tokens"] = 8
        second = httpx.post(f"{live.url}/v1/chat/completions", json=chat, headers=headers, timeout=120).json()
        usage = second["usage"]
        bt = engine.prefix_cache.block_tokens
        # the new text is a few tokens: all but the last block or two come from the cache, past the first turn's
        # prompt and answer
        seen = first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= min(seen, usage["prompt_tokens"]) // bt * bt - bt
        assert usage["prompt_tokens_details"]["cached_tokens"] > first["usage"]["prompt_tokens"] // bt * bt
        model, tokenizer = jneox.load(packed_checkpoint, weights="float32")
        off = Engine(model, tokenizer, prefix_cache_mb=0)
        req = parse_chat(chat, tokenizer, off.window)
        want, _ = turn(off, req.prompt_ids, 8)
        assert second["choices"][0]["message"]["content"] == tokenizer.decode([t for t, *_ in want])
    finally:
        live.stop()
