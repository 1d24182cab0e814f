"""Prefix caching: prompts that share a prefix with earlier ones reuse its keys and values, with the
same output bits as without the cache (tokens and logprobs), batched or not, in every weight format;
``usage.prompt_tokens_details.cached_tokens`` says how many prompt tokens were reused; the cache keeps
to its budget by evicting the least recently used blocks."""
from __future__ import annotations

import contextlib
import queue

import httpx
import pytest
import torch

import jneox
from jneox.quantize import FORMATS
from jneox.sampling import SamplingParams
from jneox.serve import Engine
from jneox.serve.prefix_cache import PrefixCache, block_keys
from serve_fixtures import API_KEY, WINDOW, packed_checkpoint, random_ids, start_server  # noqa: F401  (fixture)

def _prompts(chunk: int) -> list[list[int]]:
    """Prompts that share prefixes of several lengths with the first (``chunk``: the prefill chunk): across
    chunk boundaries, inside a chunk (the first one too), a prompt that is exactly another's prefix, one
    whose whole length is a multiple of the chunk, and one that shares all but a few rows of its last chunk."""
    base = random_ids(3 * chunk + 40, 1)
    return [base, base[: 2 * chunk + 7] + random_ids(30, 2), base[: chunk - 5] + random_ids(chunk + 20, 3), base[: 2 * chunk],
            base + random_ids(11, 4), random_ids(chunk + 3, 5), base[: 3 * chunk],
            base[: 2 * chunk + 34] + random_ids(10, 6), base[:40] + random_ids(100, 7)]


def _expected_cached(chunk: int, block: int) -> tuple[list[int], list[int]]:
    """What each of ``_prompts(chunk)`` takes from the cache, submitted one after another, then again (every
    prefix cached): with whole-chunk blocks, whole chunks; with blocks of 32 tokens (a chunk of 128), any
    multiple of 32 that leaves more than 16 rows of its chunk to compute, or ends at a chunk boundary."""
    if block == chunk:
        return ([0, 2 * chunk, 0, chunk, 3 * chunk, 0, 2 * chunk, 2 * chunk, 0],
                [3 * chunk, 2 * chunk, 2 * chunk, chunk, 3 * chunk, chunk, 2 * chunk, 2 * chunk, chunk])
    assert (chunk, block) == (128, 32), (chunk, block)
    # e.g. the 4th prompt (256 tokens) resumes at 224, not 256: its last token is always computed
    return ([0, 256, 96, 224, 416, 0, 352, 256, 32], [384, 256, 256, 224, 416, 128, 352, 256, 128])


def _run(engine: Engine, prompts: list[list[int]], together: bool) -> list[tuple]:
    """Each prompt's greedy tokens' ids and logprobs (the logits' bits) and its cached_tokens: all submitted
    at once (one batch) or one after another."""
    params = SamplingParams(temperature=0, max_new_tokens=6)
    boxes = [queue.Queue() for _ in prompts]

    def result(box):
        events = []
        while not (events and events[-1].final):
            events.append(box.get(timeout=300))
        assert events[-1].error is None, events[-1].error
        probs = [(t.id, t.logprob, tuple(t.top)) for e in events for t in e.logprobs]
        return probs, events[-1].cached_tokens

    out = []
    for ids, box in zip(prompts, boxes):
        engine.submit(ids, params, box.put, logprobs=3)
        if not together:
            out.append(result(box))
    return out if not together else [result(box) for box in boxes]


@contextlib.contextmanager
def _off_and_on(model, tokenizer, **options):
    """Two started engines on ``model``, the prefix cache off and on (a visible skip where the device has
    none), stopped afterwards."""
    off = Engine(model, tokenizer, prefix_cache_mb=0, **options).start()
    on = Engine(model, tokenizer, prefix_cache_mb=64, **options).start()
    try:
        if on.prefix_cache is None:
            pytest.skip(f"no prefix cache on this device (prefill chunk {on.prefill_chunk} = window)")
        yield off, on
    finally:
        off.stop()
        on.stop()


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_same_bits_with_the_cache_on_and_off(packed_checkpoint, fmt):
    model, tokenizer = jneox.load(packed_checkpoint, weights=fmt)
    with _off_and_on(model, tokenizer, max_batch=4) as (off, on):
        chunk = on.prefill_chunk
        prompts = _prompts(chunk)
        first, second = _expected_cached(chunk, on.prefix_cache.block_tokens)
        want = _run(off, prompts, together=False)
        assert all(cached is None for _, cached in want)  # the cache off: nothing looked up
        got = _run(on, prompts, together=False)
        assert [p for p, _ in got] == [p for p, _ in want]
        # what each prompt shares with an earlier one (its last token never: it gives logits)
        cached = [c for _, c in got]
        assert cached == first
        again = _run(on, prompts, together=True)  # batched, every prefix now cached
        assert [p for p, _ in again] == [p for p, _ in want]
        assert [c for _, c in again] == second
        assert on.stats()["prefix_hit_tokens"] == sum(cached) + sum(c for _, c in again)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_chat_resumes_inside_the_chunk_its_last_turn_ended_in(packed_checkpoint, fmt):
    """Each turn's prompt extends the last one. The last one's final chunk was partial (it ended inside it):
    its blocks there are reused, with the same bits, by the next turn, whose pass runs on from inside that
    chunk (with blocks of 32 tokens; whole-chunk blocks resume at the chunk's start). The first turn is
    shorter than a chunk."""
    model, tokenizer = jneox.load(packed_checkpoint, weights=fmt)
    with _off_and_on(model, tokenizer) as (off, on):
        chunk = on.prefill_chunk
        chat = random_ids(3 * chunk + 36, 15)
        turns = [chat[:70], chat[:180], chat[: 2 * chunk + 44], chat]
        want, got = _run(off, turns, together=False), _run(on, turns, together=False)
        assert [p for p, _ in got] == [p for p, _ in want]
        fine = on.prefix_cache.block_tokens < chunk
        assert [c for _, c in got] == ([0, 64, 160, 288] if fine else [0, 0, chunk, 2 * chunk])


def _score(engine: Engine, prompts: list[list[int]], generate: int = 0) -> list[tuple]:
    """Each prompt scored in full (echo, as lm-eval's loglikelihood requests ask), one after another: its
    tokens' logprobs and top-3 alternatives, the generated tokens' (``generate`` of them), cached_tokens."""
    out = []
    for ids in prompts:
        box = queue.Queue()
        engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=max(generate, 1)), box.put, logprobs=3,
                      prompt_logprobs=True, generate=generate > 0)
        events = [box.get(timeout=300)]
        while not events[-1].final:
            events.append(box.get(timeout=300))
        assert events[-1].error is None, events[-1].error
        scored = [(t.id, t.logprob, tuple(t.top)) for t in events[0].prompt_logprobs]
        assert len(scored) == len(ids)
        out.append((scored, [(t.id, t.logprob, tuple(t.top)) for e in events for t in e.logprobs],
                    events[-1].cached_tokens))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_echo_scoring_takes_cached_blocks_with_the_same_bits(packed_checkpoint, fmt):
    """Multiple-choice scoring: each choice's prompt (a shared few-shot context, then the choice) scored in
    full. Cached blocks give their positions' logits from their stored hidden states, by the head calls of
    a full prefill: the same logprobs to the bit, cached or not, from blocks stored by other echo prompts
    and by plain prompts, with tokens generated after the prompt too."""
    model, tokenizer = jneox.load(packed_checkpoint, weights=fmt)
    with _off_and_on(model, tokenizer) as (off, on):
        chunk = on.prefill_chunk
        context = random_ids(2 * chunk + 50, 13)
        choices = [context + random_ids(n, 20 + n) for n in (3, 9, 1, 40)]
        plain = random_ids(chunk + 60, 14)  # first prompted for an answer, then scored
        want = _score(off, choices) + _score(off, [plain + [7]], generate=3)
        assert all(c is None for *_, c in want)
        _run(on, [plain], together=False)
        got = _score(on, choices) + _score(on, [plain + [7]], generate=3)
        assert [w[:2] for w in want] == [g[:2] for g in got]
        cached = [c for *_, c in got]
        assert cached[0] == 0 and all(c > 0 for c in cached[1:])
        assert cached[1] == (2 * chunk if on.prefix_cache.block_tokens == chunk else 2 * chunk + 32)


def test_cached_tokens_in_usage(packed_checkpoint):
    live = start_server(packed_checkpoint)
    try:
        block = live.engine.prefill_chunk
        if live.engine.prefix_cache is None:
            pytest.skip("no prefix cache on this device")
        ids = random_ids(2 * block + 20, 8)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        body = {"model": "tiny", "prompt": ids, "max_tokens": 3, "temperature": 0}
        answers = [httpx.post(f"{live.url}/v1/completions", json=body, headers=headers, timeout=120).json()
                   for _ in range(2)]
        usages = [a["usage"] for a in answers]
        assert [u["prompt_tokens_details"] for u in usages] == [{"cached_tokens": 0}, {"cached_tokens": 2 * block}]
        assert usages[0]["prompt_tokens"] == usages[1]["prompt_tokens"] == len(ids)
        # a chat: the second turn's prompt starts with the first turn's
        history = [{"role": "user", "content": "こんにちは。" * 50}]
        chat = {"model": "tiny", "messages": history, "max_tokens": 4, "temperature": 0}
        first = httpx.post(f"{live.url}/v1/chat/completions", json=chat, headers=headers, timeout=120).json()
        chat["messages"] = [*history, first["choices"][0]["message"], {"role": "user", "content": "続けて"}]
        second = httpx.post(f"{live.url}/v1/chat/completions", json=chat, headers=headers, timeout=120).json()
        shared = first["usage"]["prompt_tokens"] // block * block
        assert shared > 0 and second["usage"]["prompt_tokens_details"]["cached_tokens"] >= shared - block
    finally:
        live.stop()


def test_lru_eviction_within_the_budget(packed_checkpoint):
    """A budget of two blocks: a third block evicts the least recently used one, and a lookup counts as a
    use; a prefix's first block outlives its later ones."""
    model, _ = jneox.load(packed_checkpoint, weights="float32")
    caches = model.new_cache(1, WINDOW)
    block = 16
    per_block = PrefixCache(caches, block, 1 << 30, 128).block_bytes
    pc = PrefixCache(caches, block, 2 * per_block, 128)
    hidden = torch.arange(WINDOW * 128, dtype=torch.float32).view(WINDOW, 128)
    assert pc.capacity == 2
    for c in caches:  # distinct contents per position, to see what is restored
        c.k.copy_(torch.arange(WINDOW, dtype=c.k.dtype)[None, None, :, None].expand_as(c.k))
        c.v.copy_(-c.k)
    a, b = block_keys(random_ids(2 * block, 9), block), block_keys(random_ids(block, 10), block)
    assert block_keys(random_ids(2 * block, 9)[:block], block) == a[:1]  # a key depends on the prefix only
    pc.store(a, caches, 0, hidden)
    assert list(pc.blocks) == [a[1], a[0]]  # the first block is the most recent
    assert len(pc.lookup(a, 2, 2 * block)) == 2 and pc.hits == 2 * block
    pc.store(b, caches, 0, hidden)  # evicts a's second block, the least recently used
    assert set(pc.blocks) == {a[0], b[0]} and pc.usage == 1.0
    assert len(pc.lookup(a, 2, 2 * block)) == 1  # a's first block only: a run stops at the first miss
    fresh = model.new_cache(1, WINDOW)
    assert pc.restore(pc.lookup(a, 1, block), fresh, 0) == block
    assert torch.equal(pc.hidden(pc.lookup(a, 1, block))[0], hidden[:block])
    assert all(torch.equal(f.k[0, :, :block], c.k[0, :, :block]) and not f.k[0, :, block:].any()
               for f, c in zip(fresh, caches))
    pc.store(block_keys(random_ids(block, 11), block), caches, 0, hidden)  # b was used least recently now
    assert a[0] in pc.blocks and b[0] not in pc.blocks
    assert pc.queries == 6 * block


def test_a_salt_separates_prefixes():
    ids = random_ids(64, 12)
    assert block_keys(ids, 32) != block_keys(ids, 32, salt=b"adapter-a")
    assert block_keys(ids, 32, salt=b"adapter-a") == block_keys(ids, 32, salt=b"adapter-a")
