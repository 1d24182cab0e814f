"""Prefix caching: the keys and values of a prompt's leading blocks, kept after its prefill, so a later
prompt that starts the same way (a chat's earlier turns, a few-shot context, a shared preamble) copies
them into its slot instead of computing them again.

A block is ``block_tokens`` consecutive prompt tokens from a multiple of ``block_tokens``; its key is a
SHA-256 chained over every token id from the prompt's start to the block's end (and a ``salt`` that
names what else changes the keys and values, such as an adapter), so a block is only ever reused after
exactly the same prefix. Blocks live in an LRU under a byte budget; a lookup touches a prompt's blocks
from the last to the first, so a prefix's first blocks are the last to go (a later block without its
predecessors can never be reached).

Bits: the engine sets ``block_tokens`` to its prefill chunk. A prompt is prefilled in chunks from its
start, each chunk one forward pass over the cache before it; a block is one such chunk, so reusing
``n`` blocks and prefilling from there runs exactly the passes a full prefill runs after its first
``n``, over the same cache contents: the same bits, cache or not. Only keys and values computed by a
prefill are stored: a decode step computes a token's row by another kernel path (other bits).
"""
from __future__ import annotations

import collections
import hashlib
import struct
from typing import Sequence

import torch

from ..model import KVCache

DEFAULT_PREFIX_CACHE_MB = 2048


def block_keys(ids: Sequence[int], block_tokens: int, salt: bytes = b"") -> list[bytes]:
    """The key of each whole block of ``ids``: a hash of every id up to the block's end."""
    keys, h = [], hashlib.sha256(b"jneox-prefix\0" + salt).digest()
    for a in range(0, len(ids) - block_tokens + 1, block_tokens):
        h = hashlib.sha256(h + struct.pack(f"<{block_tokens}q", *ids[a : a + block_tokens])).digest()
        keys.append(h)
    return keys


class PrefixCache:
    """Blocks of keys and values by prefix key, least recently used first, within ``budget_bytes``.

    Used from the engine thread only. ``queries`` and ``hits`` count prompt tokens looked up and found
    (the hit rate the metrics report)."""

    def __init__(self, caches: list[KVCache], block_tokens: int, budget_bytes: int):
        k = caches[0].k
        self.layers, self.heads, self.head_dim = len(caches), k.shape[1], k.shape[3]
        self.dtype, self.device = k.dtype, k.device
        self.block_tokens = block_tokens
        # one block: keys and values of every layer (layers, 2, heads, block_tokens, head_dim)
        self.block_bytes = self.layers * 2 * self.heads * block_tokens * self.head_dim * k.element_size()
        self.capacity = max(0, budget_bytes // self.block_bytes)  # blocks held at most
        self.blocks: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self.queries = self.hits = 0

    @property
    def usage(self) -> float:
        """The share of the budget in use, 0 to 1."""
        return len(self.blocks) / self.capacity if self.capacity else 0.0

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # the first block most recent: evicted last
            self.blocks.move_to_end(key)

    def lookup(self, keys: list[bytes], max_blocks: int, query_tokens: int) -> list[torch.Tensor]:
        """The leading run of ``keys[:max_blocks]`` that is cached (their blocks, in order), counting
        ``query_tokens`` prompt tokens asked for."""
        found = []
        for key in keys[:max_blocks]:
            block = self.blocks.get(key)
            if block is None:
                break
            found.append(block)
        self._touch(keys[: len(found)])
        self.queries += query_tokens
        self.hits += len(found) * self.block_tokens
        return found

    def restore(self, blocks: list[torch.Tensor], caches: list[KVCache], slot: int) -> int:
        """Copy ``blocks`` (from :meth:`lookup`) into row ``slot`` of ``caches`` from position 0; the
        number of positions filled."""
        n = self.block_tokens
        for i, block in enumerate(blocks):
            for layer, c in zip(block, caches):
                c.k[slot, :, i * n : (i + 1) * n] = layer[0]
                c.v[slot, :, i * n : (i + 1) * n] = layer[1]
        return len(blocks) * n

    def store(self, keys: list[bytes], caches: list[KVCache], slot: int) -> None:
        """Keep block ``i`` of row ``slot`` under ``keys[i]`` (those not kept yet), evicting the least
        recently used blocks past the budget."""
        n = self.block_tokens
        for i, key in enumerate(keys[: self.capacity]):
            if key in self.blocks:
                continue
            while len(self.blocks) >= self.capacity:
                self.blocks.popitem(last=False)
            block = torch.empty(self.layers, 2, self.heads, n, self.head_dim, dtype=self.dtype, device=self.device)
            for layer, c in zip(block, caches):
                layer[0] = c.k[slot, :, i * n : (i + 1) * n]
                layer[1] = c.v[slot, :, i * n : (i + 1) * n]
            self.blocks[key] = block
        self._touch([k for k in keys[: self.capacity] if k in self.blocks])
