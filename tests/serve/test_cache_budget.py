"""The KV cache is bounded by what running requests reserve, not by full rows: a server whose cache could
not hold even one request of a full window is refused at start with one line (not an ENOMEM traceback
on the first mapping or an out-of-memory kill hours later), while many slots of a large window start."""
from __future__ import annotations

import pytest

from jneox.config import ModelConfig
from jneox.errors import UsageError
from jneox.model import GPTNeoX
from jneox.serve import Engine
from jneox.serve.scheduler import KV_MEMORY_SHARE, available_memory


class _Tok:
    vocab_size = 64


def _model(window: int, layers: int = 2) -> GPTNeoX:
    config = ModelConfig(vocab_size=64, hidden_size=64, num_layers=layers, num_heads=4, intermediate_size=128,
                         max_position_embeddings=window)
    return GPTNeoX(config)


def test_a_window_larger_than_the_machine_is_refused_at_start():
    avail = available_memory()
    if avail is None:
        pytest.skip("this system does not say how much memory is available")
    window, layers = 1 << 20, 2  # the largest window a config.json may give
    while _model(window, layers).cache_bytes(1) <= avail * KV_MEMORY_SHARE:  # one row past what the memory holds
        layers *= 2
    model = _model(window, layers)
    with pytest.raises(UsageError, match=rf"KV cache of one request of {window} positions would need .* GiB, more "
                                         r"than the .* GiB KV cache budget \(80% of the .* GiB of memory available\)"):
        Engine(model, _Tok())
    assert model.cache_bytes(2) == 2 * model.cache_bytes(1) == 2 * layers * 2 * window * 64 * 4


def test_slots_whose_full_rows_pass_the_budget_still_start():
    """Rows are only reserved by running requests: 64 slots of a window that only 2 full rows fit start,
    and admit requests as their reservations fit (tests/serve/test_prompt_batching.py)."""
    model = _model(1 << 16)
    engine = Engine(model, _Tok(), max_batch=64, kv_cache_gb=2.5 * model.cache_bytes(1) / 2**30)
    assert engine.kv_positions == int(2.5 * model.cache_bytes(1)) // model.cache_bytes(1, 1)


def test_a_budget_below_one_full_row_is_refused():
    model = _model(1 << 16)
    with pytest.raises(UsageError, match=r"--kv-cache-gb\): raise --kv-cache-gb"):
        Engine(model, _Tok(), kv_cache_gb=model.cache_bytes(1) / 2**30 / 2)
    with pytest.raises(UsageError, match=r"--kv-cache-gb must be > 0"):
        Engine(model, _Tok(), kv_cache_gb=0)
