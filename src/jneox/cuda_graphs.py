"""Decoding with static shapes, captured once as a CUDA graph and replayed for every token.

At batch 1 a decode step of the 3.6B model is a few hundred small kernels; launched one by one from
Python, the launches take longer than the GPU needs to read the weights. :class:`StaticDecoder`
fixes every shape of a step: the cache is preallocated for ``max_len`` slots, the step's input token
and position live in buffers written in place, and attention covers all ``max_len`` slots with the
later ones masked (``GPTNeoX.forward``'s ``span``), so no value is read back to the host inside the
step. On CUDA the step is then captured as a :class:`torch.cuda.CUDAGraph` (optionally after
``torch.compile`` has fused its small kernels) and each token is one replay; elsewhere the same step
function runs eagerly, which is how the CPU tests cover it.

The model knows nothing of this module; :func:`jneox.generate.generate_tokens` uses it on CUDA.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .model import GPTNeoX, KVCache
from .sampling import Sampler, sampled_tokens


def decode_step(model: GPTNeoX, tokens: torch.Tensor, positions: torch.Tensor, cache: list[KVCache],
                span: int) -> torch.Tensor:
    """One token for each row: ``tokens`` (B, 1) at ``positions`` (B, 1), keys and values written into
    ``cache``, attention over its first ``span`` slots; logits (B, 1, vocab). What a graph captures."""
    return model(tokens, input_pos=positions, cache=cache, span=span)


def can_capture(device: torch.device | str) -> bool:
    """Whether steps on ``device`` can be captured as CUDA graphs."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


class StaticDecoder:
    """Decoding for up to ``batch`` rows of up to ``max_len`` tokens with every shape fixed.

    :meth:`prefill` writes a row's prompt into the cache (a plain forward pass, not captured);
    :meth:`step` runs one token for every row. ``capture`` (default: on CUDA) records the step as a
    CUDA graph at the first :meth:`step` and replays it afterwards; ``compile`` passes the step through
    ``torch.compile`` first (slow to start, fewer kernels per token). Rows not in use still compute
    (their results are ignored): a row's tokens never depend on its neighbours'.

    The logits a step returns are the decoder's own buffer when captured: read them before the next step.
    """

    def __init__(self, model: GPTNeoX, batch: int = 1, max_len: int | None = None, capture: bool | None = None,
                 compile: bool = False):
        window = model.config.max_position_embeddings
        self.model = model
        self.max_len = min(max_len or window, window)
        self.device = model.embed.weight.device
        self.capture = can_capture(self.device) if capture is None else capture
        if self.capture and not can_capture(self.device):
            raise ValueError(f"CUDA graphs need a model on a CUDA device; this one is on {self.device}")
        self.cache = model.new_cache(batch, self.max_len)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.step_fn = torch.compile(decode_step, dynamic=False) if compile else decode_step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    def prefill(self, prompt_ids: Sequence[int], row: int = 0) -> torch.Tensor:
        """Write ``prompt_ids`` into row ``row``'s cache from position 0; the (1, 1, vocab) logits of the
        position after the prompt."""
        if not 0 < len(prompt_ids) < self.max_len:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens does not fit a decoder of {self.max_len} positions")
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        rows = [c.rows(row, row + 1) for c in self.cache]
        return self.model(ids, input_pos=torch.arange(ids.shape[1], device=self.device), last_only=True, cache=rows)

    def step(self, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Feed ``tokens[i]`` at ``positions[i]`` to row i (every row); the (batch, 1, vocab) logits."""
        if len(tokens) != self.batch or len(positions) != self.batch:
            raise ValueError(f"a step takes one token and position per row ({self.batch} rows), "
                             f"got {len(tokens)} and {len(positions)}")
        if not all(0 <= p < self.max_len for p in positions):
            raise ValueError(f"positions {list(positions)} are outside this decoder's {self.max_len} slots")
        self.tokens.copy_(torch.tensor(tokens, dtype=torch.long).view(-1, 1))
        self.positions.copy_(torch.tensor(positions, dtype=torch.long).view(-1, 1))
        if not self.capture:
            return self._run()
        if self.graph is None:
            self._capture()
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.logits

    def _run(self) -> torch.Tensor:
        return self.step_fn(self.model, self.tokens, self.positions, self.cache, self.max_len)

    def _capture(self) -> None:
        """Record one step. The warm-up runs (which compile, and let libraries pick their kernels) and the
        recording itself all compute the step the buffers hold now, so each writes the same keys and
        values to the same slots: the cache ends as one eager step would leave it."""
        with torch.cuda.device(self.device):  # the model's GPU, whichever is current
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self._run()
        self.graph = graph


def static_tokens(decoder: StaticDecoder, sampler: Sampler, eos_id: int | None) -> Iterator[int]:
    """:func:`jneox.generate.generate_tokens`' loop on row 0 of ``decoder``: the prompt is ``sampler.tokens``,
    the sampler decides each token as in the plain loop; EOS is yielded, then the loop stops."""
    yield from sampled_tokens(sampler, decoder.prefill(sampler.tokens),
                              lambda t, pos: decoder.step([t] * decoder.batch, [pos] * decoder.batch), eos_id)
