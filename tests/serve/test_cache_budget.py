"""A server whose KV cache could never fit in memory is refused at start with one line, not an ENOMEM
traceback on the first mapping or an out-of-memory kill hours later."""
from __future__ import annotations

import os

import pytest

from jneox.config import ModelConfig
from jneox.errors import UsageError
from jneox.model import GPTNeoX
from jneox.serve import Engine


class _Tok:
    vocab_size = 64


def test_a_cache_larger_than_the_machine_is_refused_at_start():
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    config = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                         max_position_embeddings=1 << 20)
    model = GPTNeoX(config)
    rows = ram // model.cache_bytes(1) + 1  # one row more than the memory holds
    with pytest.raises(UsageError, match=r"KV cache for \d+ rows of 1048576 positions would need .* GiB"):
        Engine(model, _Tok(), max_batch=rows)
    assert model.cache_bytes(2) == 2 * model.cache_bytes(1) == 2 * 2 * 2 * (1 << 20) * 64 * 4
