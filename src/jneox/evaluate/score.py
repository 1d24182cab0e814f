"""Log-likelihood scoring: each context computed once, its continuations scored from the KV cache.

A multiple-choice question has one context and several continuations. The harness runs the model
over ``context + choice`` once per choice; here the context goes through the model once (batched
across questions), its keys and values are copied to one cache row per choice, and only the choice
tokens run after it (batched across questions and choices, each row at its own positions).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm import tqdm

from ..errors import JneoxError
from ..model import GPTNeoX
from ..tokenizer import Tokenizer


def loglikelihoods(model: GPTNeoX, tokenizer: Tokenizer, requests: Sequence[tuple[str, str]],
                   batch_rows: int = 16, progress=None) -> list[float]:
    """Summed log-probability of each ``continuation`` given its ``context``, in request order.

    Context and continuation are encoded separately (as lm-evaluation-harness does), so the
    continuation's tokens are exactly ``tokenizer.encode(continuation)``. An empty context stands
    for ``</s>`` (the harness's end-of-text context).
    """
    pairs = []
    for context, continuation in requests:
        context_ids = tokenizer.encode(context) if context else [tokenizer.eos_id]
        pairs.append((context_ids, tokenizer.encode(continuation)))
    return score_ids(model, pairs, batch_rows=batch_rows, progress=progress)


def score_ids(model: GPTNeoX, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_rows: int = 16,
              progress=None) -> list[float]:
    """:func:`loglikelihoods` on token ids: ``pairs`` of (context ids, continuation ids).

    Pairs with the same context share one pass over it. A context too long for the window loses
    its oldest tokens so that the longest continuation sharing it fits (the harness keeps the
    last ``window + 1`` tokens of each pair). ``progress`` is called with the number of pairs
    done after each batch.
    """
    window = model.config.max_position_embeddings
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (context, continuation) in enumerate(pairs):
        if not context:
            raise JneoxError(f"request {i}: empty context (use [eos_id] for the start of a text)")
        if not continuation:
            raise JneoxError(f"request {i}: empty continuation (an empty choice?)")
        if len(continuation) > window:
            raise JneoxError(f"request {i}: the continuation has {len(continuation)} tokens, the window {window}")
        groups.setdefault(tuple(context), []).append(i)
    results = [0.0] * len(pairs)
    caches: dict = {}  # reused from batch to batch: a fresh cache's pages are faulted in on first write
    batch: list[tuple[tuple[int, ...], list[int]]] = []
    rows = start = tail = 0  # a batch's rows run from their context's end to at most start + tail
    for context, members in groups.items():
        longest = max(len(pairs[i][1]) for i in members)
        context_start = min(len(context), window + 1 - longest) - 1
        if batch and (rows + len(members) > batch_rows or max(start, context_start) + max(tail, longest) > window):
            _score_batch(model, pairs, batch, results, caches)
            if progress:
                progress(rows)
            batch, rows, start, tail = [], 0, 0, 0
        batch.append((context, members))
        rows, start, tail = rows + len(members), max(start, context_start), max(tail, longest)
    if batch:
        _score_batch(model, pairs, batch, results, caches)
        if progress:
            progress(rows)
    return results


@torch.inference_mode()
def _score_batch(model: GPTNeoX, pairs, batch, results: list[float], caches: dict) -> None:
    window = model.config.max_position_embeddings
    device = model.embed.weight.device
    # the last context token is fed with the continuation: its logits predict the first continuation token
    contexts, rows = [], []  # rows: (question index in batch, request index, input ids, target ids, start)
    for q, (context, members) in enumerate(batch):
        longest = max(len(pairs[i][1]) for i in members)
        context = list(context[-(window + 1 - longest):])
        contexts.append(context[:-1])
        for i in members:
            continuation = list(pairs[i][1])
            rows.append((q, i, [context[-1], *continuation[:-1]], continuation, len(context) - 1))
    prefix_len = max(len(c) for c in contexts)
    tail_len = max(len(r[2]) for r in rows)
    max_len = max(prefix_len, max(r[4] for r in rows) + tail_len)
    cache = _cache(model, caches, "rows", len(rows), max_len)
    if prefix_len:
        # every context from position 0, right-padded: causal attention keeps padding out of real tokens,
        # and the slots padding writes are overwritten below before any row can attend to them
        ids = torch.tensor([c + [0] * (prefix_len - len(c)) for c in contexts], device=device)
        prefix_cache = _cache(model, caches, "contexts", len(contexts), prefix_len)
        model(ids, input_pos=torch.arange(prefix_len, device=device), last_only=True, cache=prefix_cache)
        which = torch.tensor([r[0] for r in rows], device=device)
        for src, dst in zip(prefix_cache, cache):  # each question's keys and values to each of its choices' rows
            dst.k[: len(rows), :, :prefix_len] = src.k[: len(contexts), :, :prefix_len].index_select(0, which)
            dst.v[: len(rows), :, :prefix_len] = src.v[: len(contexts), :, :prefix_len].index_select(0, which)
    # each row at its own positions; padding goes on past the row's end (score_ids keeps that in the window)
    ids = torch.tensor([r[2] + [0] * (tail_len - len(r[2])) for r in rows], device=device)
    pos = torch.tensor([[r[4] + j for j in range(tail_len)] for r in rows], device=device)
    logits = model(ids, input_pos=pos, cache=cache).float()
    log_probs = torch.log_softmax(logits, dim=-1)
    for b, (_, i, _, target, _) in enumerate(rows):
        t = torch.tensor(target, device=device)
        results[i] = float(log_probs[b, : len(target)].gather(-1, t[:, None]).sum())


def _cache(model: GPTNeoX, caches: dict, name: str, rows: int, length: int):
    """A KV cache of at least ``rows`` x ``length``, reused when the last one was big enough."""
    cache = caches.get(name)
    if cache is None or cache[0].k.shape[0] < rows or cache[0].max_len < length:
        old = cache[0].k.shape[:3:2] if cache else (0, 0)
        cache = caches[name] = model.new_cache(max(rows, old[0]), max(length, old[1]))
    return cache


def rolling_nll(model: GPTNeoX, ids: Sequence[int], prefix_id: int, stride: int | None = None,
                batch_rows: int = 8) -> float:
    """Negative log-likelihood of all of ``ids``, the first predicted after ``prefix_id`` (``</s>``).

    A text longer than the window is scored in windows of ``window`` tokens that advance by
    ``stride`` (default: the window, as lm-eval's rolling log-likelihood: disjoint windows); each
    window predicts only the tokens the previous ones did not, with what comes before them in the
    window as context.
    """
    window = model.config.max_position_embeddings
    stride = stride or window
    if not 0 < stride <= window:
        raise JneoxError(f"stride must be in 1..{window}, got {stride}")
    tokens = [prefix_id, *ids]
    pairs, done = [], 0  # (context ids, continuation ids): one per window
    while done < len(ids):
        new = min(stride if done else window, len(ids) - done)
        end = done + new + 1  # tokens[:end] holds the prefix and ids[:done + new]
        start = max(0, end - window - 1)
        pairs.append((tokens[start : done + 1], tokens[done + 1 : end]))
        done += new
    return -math.fsum(score_ids(model, pairs, batch_rows=batch_rows))


def tqdm_progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar and the callback that advances it (``None`` when disabled)."""
    if not enabled:
        return None, None
    bar = tqdm(total=total, desc=desc, unit="req", leave=False)
    return bar, bar.update

