"""Prefix caching: prompts that share a prefix with earlier ones reuse its keys and values, with the
same output bits as without the cache (tokens and logprobs), batched or not, in every weight format;
``usage.prompt_tokens_details.cached_tokens`` says how many prompt tokens were reused; the cache keeps
to its budget by evicting the least recently used blocks."""
from __future__ import annotations

import queue

import httpx
import pytest
import torch

import jneox
from jneox.config import ModelConfig
from jneox.model import GPTNeoX
from jneox.quantize import FORMATS
from jneox.sampling import SamplingParams
from jneox.serve import Engine
from jneox.serve.prefix_cache import PrefixCache, block_keys
from serve_fixtures import API_KEY, start_server

WINDOW = 512


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, spiece_model):
    """A tiny checkpoint whose widths every packed format takes (int4's groups included)."""
    config = ModelConfig(vocab_size=1024, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384,
                         max_position_embeddings=WINDOW)
    model = GPTNeoX(config)
    model.init_weights(std=0.05, seed=0)
    return jneox.save(model, tmp_path_factory.mktemp("prefix") / "tiny", tokenizer_file=spiece_model)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(4, 600, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prompts(block: int) -> list[list[int]]:
    """Prompts that share prefixes of several lengths: across block boundaries, inside a block, a prompt
    that is exactly another's prefix, and one whose whole length is a multiple of the block."""
    base = _ids(3 * block + 40, 1)
    return [base, base[: 2 * block + 7] + _ids(30, 2), base[: block - 5] + _ids(block + 20, 3), base[: 2 * block],
            base + _ids(11, 4), _ids(block + 3, 5), base[: 3 * block]]


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


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_same_bits_with_the_cache_on_and_off(checkpoint, fmt):
    model, tokenizer = jneox.load(checkpoint, weights=fmt)
    off = Engine(model, tokenizer, max_batch=4, prefix_cache_mb=0).start()
    on = Engine(model, tokenizer, max_batch=4, prefix_cache_mb=64).start()
    try:
        block = on.prefill_chunk
        if on.prefix_cache is None:
            pytest.skip(f"no prefix cache on this device (prefill chunk {block} = window)")
        prompts = _prompts(block)
        want = _run(off, prompts, together=False)
        assert all(cached is None for _, cached in want)  # the cache off: nothing looked up
        got = _run(on, prompts, together=False)
        assert [p for p, _ in got] == [p for p, _ in want]
        # what each prompt shares, in whole blocks, with an earlier one (its last token never: it gives logits)
        cached = [c for _, c in got]
        assert cached == [0, 2 * block, 0, block, 3 * block, 0, 2 * block]
        again = _run(on, prompts, together=True)  # batched, every prefix now cached
        assert [p for p, _ in again] == [p for p, _ in want]
        assert [c for _, c in again] == [3 * block, 2 * block, 2 * block, block, 3 * block, block, 2 * block]
        assert on.stats()["prefix_hit_tokens"] == sum(cached) + sum(c for _, c in again)
    finally:
        off.stop()
        on.stop()


def test_echo_scoring_takes_nothing_from_the_cache(checkpoint):
    """A prompt scored in full needs every position's logits: it is prefilled whole, cached or not."""
    model, tokenizer = jneox.load(checkpoint, weights="float32")
    engine = Engine(model, tokenizer, prefix_cache_mb=64).start()
    try:
        if engine.prefix_cache is None:
            pytest.skip("no prefix cache on this device")
        ids = _ids(2 * engine.prefill_chunk + 9, 7)
        boxes = [queue.Queue(), queue.Queue()]
        for box in boxes:
            engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=1), box.put, logprobs=1,
                          prompt_logprobs=True, generate=False)
        scored = []
        for box in boxes:
            first = box.get(timeout=300)
            scored.append([(t.id, t.logprob) for t in first.prompt_logprobs])
            assert box.get(timeout=300).cached_tokens is None
        assert scored[0] == scored[1] and len(scored[0]) == len(ids)
    finally:
        engine.stop()


def test_cached_tokens_in_usage(checkpoint):
    live = start_server(checkpoint)
    try:
        block = live.engine.prefill_chunk
        if live.engine.prefix_cache is None:
            pytest.skip("no prefix cache on this device")
        ids = _ids(2 * block + 20, 8)
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


def test_lru_eviction_within_the_budget(checkpoint):
    """A budget of two blocks: a third block evicts the least recently used one, and a lookup counts as a
    use; a prefix's first block outlives its later ones."""
    model, _ = jneox.load(checkpoint, weights="float32")
    caches = model.new_cache(1, WINDOW)
    block = 16
    per_block = PrefixCache(caches, block, 1 << 30).block_bytes
    pc = PrefixCache(caches, block, 2 * per_block)
    assert pc.capacity == 2
    for c in caches:  # distinct contents per position, to see what is restored
        c.k.copy_(torch.arange(WINDOW, dtype=c.k.dtype)[None, None, :, None].expand_as(c.k))
        c.v.copy_(-c.k)
    a, b = block_keys(_ids(2 * block, 9), block), block_keys(_ids(block, 10), block)
    assert block_keys(_ids(2 * block, 9)[:block], block) == a[:1]  # a key depends on the prefix only
    pc.store(a, caches, 0)
    assert list(pc.blocks) == [a[1], a[0]]  # the first block is the most recent
    assert len(pc.lookup(a, 2, 2 * block)) == 2 and pc.hits == 2 * block
    pc.store(b, caches, 0)  # evicts a's second block, the least recently used
    assert set(pc.blocks) == {a[0], b[0]} and pc.usage == 1.0
    assert len(pc.lookup(a, 2, 2 * block)) == 1  # a's first block only: a run stops at the first miss
    fresh = model.new_cache(1, WINDOW)
    assert pc.restore(pc.lookup(a, 1, block), fresh, 0) == block
    assert all(torch.equal(f.k[0, :, :block], c.k[0, :, :block]) and not f.k[0, :, block:].any()
               for f, c in zip(fresh, caches))
    pc.store(block_keys(_ids(block, 11), block), caches, 0)  # b was used least recently now
    assert a[0] in pc.blocks and b[0] not in pc.blocks
    assert pc.queries == 5 * block


def test_a_salt_separates_prefixes():
    ids = _ids(64, 12)
    assert block_keys(ids, 32) != block_keys(ids, 32, salt=b"adapter-a")
    assert block_keys(ids, 32, salt=b"adapter-a") == block_keys(ids, 32, salt=b"adapter-a")
