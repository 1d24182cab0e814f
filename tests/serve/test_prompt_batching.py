"""Prompts of several requests go through the model together, chunk by chunk beside the running rows'
decode steps, and every request still gets the bits it gets alone: tokens and logprobs (prompt ones with
echo too), in every weight format, whatever the other prompts' lengths; a long prompt does not hold up the
running rows' steps; requests past the KV cache budget wait for room and then complete."""
from __future__ import annotations

import contextlib
import mmap
import queue

import pytest

import jneox
from jneox.errors import UsageError
from jneox.generate import generate_tokens
from jneox.quantize import FORMATS, MAX_KERNEL_ROWS
from jneox.sampling import SamplingParams
from jneox.serve import Engine
from jneox.serve import scheduler
from serve_fixtures import WINDOW, packed_checkpoint, random_ids  # noqa: F401  (fixture)

# prompt lengths around every boundary of the paths a chunk takes: the decode kernel (<= 16 rows), one
# prompt-sized call (17..128), several chunks with a short or a long last one
LENGTHS = [3, 16, 17, 40, 127, 128, 129, 140, 300]
ECHO = {40, 140}  # these also score their prompt (echo), one pass each


def _requests() -> list[dict]:
    out = []
    for i, n in enumerate(LENGTHS):
        sampled = i % 3 == 2  # some rows sample with their own seed
        params = SamplingParams(temperature=0.8 if sampled else 0, seed=i if sampled else None, max_new_tokens=5)
        out.append({"ids": random_ids(n, i), "params": params, "logprobs": 2 if i % 2 == 0 or n in ECHO else None,
                    "prompt_logprobs": n in ECHO})
    return out


def _result(box: queue.Queue) -> tuple:
    events = []
    while not (events and events[-1].final):
        events.append(box.get(timeout=300))
    assert events[-1].error is None, events[-1].error
    prompt = [(t.id, t.logprob, tuple(t.top)) for e in events if e.prompt_logprobs for t in e.prompt_logprobs]
    gen = [(t.id, t.logprob, tuple(t.top)) for e in events for t in e.logprobs]
    return "".join(e.text for e in events), gen, prompt, events[-1].completion_tokens


def _run(engine: Engine, requests: list[dict], together: bool) -> list[tuple]:
    """Each request's text, tokens and logprobs: one after another, or all submitted at once (the engine
    admits none of them before the last is queued)."""
    boxes = [queue.Queue() for _ in requests]
    out = []
    with engine.cond if together else contextlib.nullcontext():
        for r, box in zip(requests, boxes):
            engine.submit(r["ids"], r["params"], box.put, logprobs=r["logprobs"], prompt_logprobs=r["prompt_logprobs"])
            if not together:
                out.append(_result(box))
    return out if not together else [_result(box) for box in boxes]


def _segments_seen(engine: Engine) -> list[int]:
    """Records the number of chunks each batched prefill pass takes."""
    seen = []
    inner = engine.model.forward_segments

    def spy(idx, segments, *args, **kwargs):
        seen.append(len(segments))
        return inner(idx, segments, *args, **kwargs)

    engine.model.forward_segments = spy
    return seen


def _alone(model, tokenizer, requests) -> list:
    """What each request gives submitted alone, one after another: the bits to match."""
    engine = Engine(model, tokenizer, max_batch=16, prefix_cache_mb=0).start()
    try:
        return _run(engine, requests, together=False)
    finally:
        engine.stop()


@pytest.mark.parametrize("fmt", FORMATS)
def test_prompts_together_give_each_request_its_lone_bits(packed_checkpoint, fmt):
    model, tokenizer = jneox.load(packed_checkpoint, weights=fmt)
    requests = _requests()
    want = _alone(model, tokenizer, requests)
    wide = 4 * scheduler.PREFILL_CHUNK  # room for many of these prompts in one step
    for budget in (wide, scheduler.DEFAULT_MAX_PREFILL_TOKENS, MAX_KERNEL_ROWS + 1, 1):
        engine = Engine(model, tokenizer, max_batch=16, prefix_cache_mb=0, max_prefill_tokens=budget).start()
        if not engine.batch_short_prompts:
            engine.stop()
            pytest.skip("no native kernels on this machine: prompts go one pass each, as before")
        seen = _segments_seen(engine)
        alone_passes = []
        inner = engine._prefill_alone
        engine._prefill_alone = lambda seq, a, b: (alone_passes.append((a, b)), inner(seq, a, b))[1]
        try:
            got = _run(engine, requests, together=True)
        finally:
            engine.stop()
        assert got == want, budget
        # only the echo prompts' chunks took passes of their own, each once
        assert sorted(alone_passes) == sorted((a, min(a + engine.prefill_chunk, n)) for n in ECHO
                                              for a in range(0, n, engine.prefill_chunk))
        if budget == wide:
            assert max(seen) > 4, seen  # several prompts really shared a pass
    # greedy tokens as generate gives them (prompts within one chunk: generate takes a prompt whole)
    for r, (_, gen, _, _) in zip(requests, want):
        if r["params"].greedy and len(r["ids"]) <= 128 and r["logprobs"] is not None:
            ref = list(generate_tokens(model, r["ids"], r["params"], tokenizer.eos_id, tokenizer.vocab_size))
            assert [t for t, _, _ in gen] == ref


def test_chunk_by_chunk_where_rows_are_not_independent(packed_checkpoint, monkeypatch):
    """Where a prompt-sized call may compute a row differently beside others, each long chunk keeps a
    call of its own (short ones still share the decode kernel's calls): the same bits."""
    model, tokenizer = jneox.load(packed_checkpoint, weights="int8")
    requests = _requests()
    want = _alone(model, tokenizer, requests)
    monkeypatch.setattr(scheduler, "prompt_rows_independent", lambda model: False)
    engine = Engine(model, tokenizer, max_batch=16, prefix_cache_mb=0).start()
    assert not engine.batch_long_prompts
    try:
        assert _run(engine, requests, together=True) == want
    finally:
        engine.stop()


def test_a_long_prompt_does_not_stop_the_running_rows(packed_checkpoint):
    """With a budget of one chunk a step, the running request gets a decode step between every two chunks
    of a long prompt that arrives while it decodes."""
    model, tokenizer = jneox.load(packed_checkpoint, weights="float32")
    engine = Engine(model, tokenizer, max_batch=4, prefix_cache_mb=0, max_prefill_tokens=1).start()
    chunk = engine.prefill_chunk
    long_ids = random_ids(min(4 * chunk, WINDOW - 8), 9)
    chunks = -(-len(long_ids) // chunk)
    steps_at_chunk = []
    inner = engine._prefill_step

    def spy(prompts):
        if any(len(s.prompt_ids) == len(long_ids) for s in prompts):
            steps_at_chunk.append(engine.steps)
        inner(prompts)

    engine._prefill_step = spy
    try:
        runner, first = queue.Queue(), queue.Queue()
        engine.submit(random_ids(5, 1), SamplingParams(temperature=0, max_new_tokens=WINDOW - 10), runner.put)
        runner.get(timeout=300)  # decoding now
        engine.submit(long_ids, SamplingParams(temperature=0, max_new_tokens=2), first.put)
        assert _result(first)[3] == 2
    finally:
        engine.stop()
    assert chunks > 1 and len(steps_at_chunk) == chunks
    # one decode step of the running request between every two chunks
    assert all(b - a == 1 for a, b in zip(steps_at_chunk, steps_at_chunk[1:])), steps_at_chunk


def test_requests_past_the_kv_budget_wait_and_complete(packed_checkpoint):
    model, tokenizer = jneox.load(packed_checkpoint, weights="float32")
    row = model.cache_bytes(1, WINDOW)
    # room for exactly one full window: two requests of 150 + 50 positions, not three
    engine = Engine(model, tokenizer, max_batch=8, prefix_cache_mb=0, kv_cache_gb=row / 2**30).start()
    seen = []
    inner = engine._decode_step
    engine._decode_step = lambda running: (seen.append(len(running)), inner(running))
    params = SamplingParams(temperature=0, max_new_tokens=50)
    requests = [{"ids": random_ids(150, i), "params": params, "logprobs": 0, "prompt_logprobs": False} for i in range(5)]
    try:
        got = _run(engine, requests, together=True)
        assert max(seen) == 2
        assert [n for *_, n in got] == [50] * 5
        assert got == _run(engine, requests, together=False)
        # a finished request's memory went back to the OS: what the next one holds is bounded by its own
        # reservation, not by the most its slot ever held (an anonymous mapping reads as zeros again)
        if hasattr(mmap, "MADV_DONTNEED"):
            # (free slots ride along in decode steps as dummy rows, writing position 0 only)
            assert all(not c.k[:, :, 1:].any() and not c.v[:, :, 1:].any() for c in engine.caches)
    finally:
        engine.stop()


def test_a_budget_without_room_for_one_window_is_refused(packed_checkpoint):
    model, tokenizer = jneox.load(packed_checkpoint, weights="float32")
    with pytest.raises(UsageError, match=r"KV cache of one request of 512 positions would need .* --kv-cache-gb"):
        Engine(model, tokenizer, kv_cache_gb=model.cache_bytes(1, WINDOW) / 2**30 * 0.99)
