"""Prefix caching: the keys and values of a prompt's leading blocks, kept after its prefill, so a later
prompt that starts the same way (a chat's earlier turns, a few-shot context, a shared preamble) copies
them into its slot instead of computing them again.

A block is ``block_tokens`` consecutive prompt tokens from a multiple of ``block_tokens``; its key is a
SHA-256 chained over every token id from the prompt's start to the block's end (and a ``salt`` that
names what else changes the keys and values, such as an adapter), so a block is only ever reused after
exactly the same prefix. Blocks live in an LRU under a byte budget; a lookup touches a prompt's blocks
from the last to the first, so a prefix's first blocks are the last to go (a later block without its
predecessors can never be reached). Beside its keys and values, a block keeps the final-norm hidden
states of its positions (one row of ``hidden_size`` per token, a small share of the keys and values of
every layer), from which a prompt scored in full (echo) gets the cached positions' logits.

Bits. A prompt is prefilled in chunks of ``prefill_chunk`` tokens from its start (absolute boundaries),
each chunk one forward pass over the cache before it, whose attention reads the keys up to the chunk's
end even where the prompt ends inside it (the pass's ``span``: the keys past the prompt masked out,
alone or among other requests' chunks), because
PyTorch's CPU attention rounds a row differently for each number of keys: so a position's keys, values
and hidden states have the same bits in every prompt that starts the same way, however far it goes.
Where a block is a whole chunk (``block_tokens`` equal to the chunk: the engine's choice where nothing
finer is known to keep the bits), reusing ``n`` blocks and prefilling from there runs exactly the
passes a full prefill runs after its first ``n``, over the same cache contents: the same bits.

Finer blocks (:data:`FINE_BLOCK_TOKENS`) are used only where every linear layer computes each row of a
prompt-sized call on its own (:func:`jneox.quantize.prompt_rows_independent`). A prompt may then resume
inside a chunk, at a multiple of the block, and the resumed piece of that chunk is one pass of fewer
rows; its rows keep their bits because every operation computes them as the whole chunk's pass does:

- the linear layers take the piece by their prompt path, as they took the chunk, which needs more than
  ``MAX_KERNEL_ROWS`` rows in the piece (fewer would take the decode kernels) unless it starts at the
  chunk's own start (then it is the chunk's own pass);
- layer norms, GELU and the rotary embedding compute each row alone;
- attention: PyTorch's CPU attention splits a call's queries into blocks of 32 rows from its first
  query (for calls of fewer than 192 queries, as a chunk is), and the matrix products of a block of a
  few rows take other code paths than a full block's; a piece that starts at a multiple of 32 has the
  chunk's query blocks from there on, with the same keys (up to the chunk's end) and mask, and a stored
  block is always a full query block. The first chunk of a full prefill, which runs with ``is_causal``,
  gives the same bits as its masked pieces.

``tests/serve/test_prefix_cache.py`` checks all of this in every weight format, at several split points.
Adapters keep whole chunks (their low-rank products go through PyTorch's matrix multiply, which is not
known to compute rows on their own). Only keys and values computed by a prefill are stored: a decode
step computes a token's row by another kernel path (other bits), so a chat's previous answer is
computed again by a prefill: by the engine while it has nothing else to do (its idle prefill of
finished answers), else as part of the next prompt.
"""
from __future__ import annotations

import collections
import hashlib
import struct
from typing import Callable, NamedTuple, Sequence

import torch

from ..model import KVCache

DEFAULT_PREFIX_CACHE_MB = 2048
# the finest block that keeps the bits: the query block of PyTorch's CPU attention for a chunk-sized call
# (see the module docstring)
FINE_BLOCK_TOKENS = 32


def block_keys(ids: Sequence[int], block_tokens: int, salt: bytes = b"") -> list[bytes]:
    """The key of each whole block of ``ids``: a hash of every id up to the block's end."""
    keys, h = [], hashlib.sha256(b"jneox-prefix\0" + salt).digest()
    for a in range(0, len(ids) - block_tokens + 1, block_tokens):
        h = hashlib.sha256(h + struct.pack(f"<{block_tokens}q", *ids[a : a + block_tokens])).digest()
        keys.append(h)
    return keys


class Block(NamedTuple):
    """One cached block: ``kv`` (layers, 2, heads, block_tokens, head_dim) and ``hidden`` (block_tokens,
    hidden_size), the final-norm hidden states of its positions."""

    kv: torch.Tensor
    hidden: torch.Tensor


class PrefixCache:
    """Blocks of keys and values (and final hidden states) by prefix key, least recently used first,
    within ``budget_bytes``.

    Used from the engine thread only. ``queries`` and ``hits`` count prompt tokens looked up and found
    (the hit rate the metrics report)."""

    def __init__(self, caches: list[KVCache], block_tokens: int, budget_bytes: int, hidden_size: int):
        k = caches[0].k
        self.layers, self.heads, self.head_dim = len(caches), k.shape[1], k.shape[3]
        self.hidden_size = hidden_size
        self.dtype, self.device = k.dtype, k.device
        self.block_tokens = block_tokens
        # one block: keys and values of every layer (layers, 2, heads, block_tokens, head_dim), and the
        # hidden states (block_tokens, hidden_size)
        self.block_bytes = (self.layers * 2 * self.heads * self.head_dim + hidden_size) * block_tokens * k.element_size()
        self.capacity = max(0, budget_bytes // self.block_bytes)  # blocks held at most
        self.blocks: collections.OrderedDict[bytes, Block] = collections.OrderedDict()
        self.queries = self.hits = 0

    @property
    def usage(self) -> float:
        """The share of the budget in use, 0 to 1."""
        return len(self.blocks) / self.capacity if self.capacity else 0.0

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # the first block most recent: evicted last
            self.blocks.move_to_end(key)

    def cached_run(self, keys: list[bytes]) -> int:
        """How many of ``keys``' leading blocks are cached (not counted as a lookup, nothing touched)."""
        n = 0
        while n < len(keys) and keys[n] in self.blocks:
            n += 1
        return n

    def lookup(self, keys: list[bytes], max_blocks: int, query_tokens: int,
               usable: Callable[[int], int] | None = None, count: bool = True) -> list[Block]:
        """The leading run of ``keys[:max_blocks]`` that is cached (their blocks, in order), cut to its
        first ``usable(len(run))`` blocks when given (where a prompt may resume), counting
        ``query_tokens`` prompt tokens asked for unless not ``count`` (the engine's own idle prefill,
        which is no prompt's)."""
        found = []
        for key in keys[:max_blocks]:
            block = self.blocks.get(key)
            if block is None:
                break
            found.append(block)
        if usable is not None:
            found = found[: usable(len(found))]
        self._touch(keys[: len(found)])
        if count:
            self.queries += query_tokens
            self.hits += len(found) * self.block_tokens
        return found

    def restore(self, blocks: list[Block], caches: list[KVCache], slot: int) -> int:
        """Copy ``blocks`` (from :meth:`lookup`) into row ``slot`` of ``caches`` from position 0; the
        number of positions filled."""
        n = self.block_tokens
        for i, block in enumerate(blocks):
            for layer, c in zip(block.kv, caches):
                c.k[slot, :, i * n : (i + 1) * n] = layer[0]
                c.v[slot, :, i * n : (i + 1) * n] = layer[1]
        return len(blocks) * n

    def hidden(self, blocks: list[Block]) -> torch.Tensor:
        """The final hidden states of ``blocks``' positions, (1, positions, hidden_size)."""
        if not blocks:
            return torch.empty(1, 0, self.hidden_size, dtype=self.dtype, device=self.device)
        return torch.cat([b.hidden for b in blocks])[None]

    def store(self, keys: list[bytes], caches: list[KVCache], slot: int, hidden: torch.Tensor) -> None:
        """Keep block ``i`` of row ``slot`` under ``keys[i]`` (those not kept yet) with its positions' rows
        of ``hidden`` (positions, hidden_size), evicting the least recently used blocks past the budget."""
        n = self.block_tokens
        for i, key in enumerate(keys[: self.capacity]):
            if key in self.blocks:
                continue
            while len(self.blocks) >= self.capacity:
                self.blocks.popitem(last=False)
            kv = torch.empty(self.layers, 2, self.heads, n, self.head_dim, dtype=self.dtype, device=self.device)
            for layer, c in zip(kv, caches):
                layer[0] = c.k[slot, :, i * n : (i + 1) * n]
                layer[1] = c.v[slot, :, i * n : (i + 1) * n]
            self.blocks[key] = Block(kv, hidden[i * n : (i + 1) * n].clone())
        self._touch([k for k in keys[: self.capacity] if k in self.blocks])
