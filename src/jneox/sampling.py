"""How the next token is picked: the sampling parameters, the logit filters, and :class:`Sampler`,
the decode state every decoding loop (plain, speculative, the server's rows) keeps the same way."""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Sequence

import torch

from .errors import UsageError
from .model import GPTNeoX


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. The defaults are the card's: sampling at temperature 0.7, 128 new tokens
    (the one place those numbers live: read ``SamplingParams.temperature`` for them).

    ``temperature == 0`` means greedy. ``top_k == 0`` and ``top_p == 1`` switch those filters off.
    ``seed`` makes sampling reproducible; ``stop`` strings end the text (they are not returned).
    """

    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 128
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            problems.append(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0):
            problems.append(f"max_new_tokens must be an integer > 0, got {self.max_new_tokens!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop must be a list of non-empty strings")
        if problems:
            raise UsageError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already present: positive logits divided, negative multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    picked = logits.gather(-1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen, picked)


def filtered_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Last-position logits (B, V) after the sampling rules, in the order transformers applies them:
    repetition penalty, temperature, top-k, top-p (removed tokens at -inf). Greedy stops after the
    penalty: its argmax is the token."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the tokens before it already hold top_p of the mass (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V) (see :func:`filtered_logits`)."""
    logits = filtered_logits(logits, params, seen)
    if params.greedy:
        return logits.argmax(dim=-1)
    return sample_categorical(logits.softmax(dim=-1), generator)


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of ``probs`` (B, V), drawn with probability ``probs`` (rows need not sum to 1).

    Inverse CDF: one uniform number per row against the running sum. The same distribution as
    ``torch.multinomial(probs, 1)``, which on the CPU costs many times more for a 32k vocabulary, a
    noticeable part of a batched decode step of a small model. Zero-probability entries are never drawn: the first index whose running sum
    exceeds the draw always has a positive probability.
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype) * total
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    # u * total can round up to total itself: take the last positive entry instead of running off the end
    past = idx >= probs.shape[-1]
    if bool(past.any()):
        last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(dim=-1)
        idx = torch.where(past, last, idx)
    return idx


def check_prompt_fits(model: GPTNeoX, prompt_len: int) -> None:
    """A prompt of ``prompt_len`` tokens leaves room for at least one new token in the model's window."""
    window = model.config.max_position_embeddings
    if prompt_len == 0:
        raise UsageError("the prompt is empty")
    if prompt_len >= window:
        raise UsageError(f"the prompt has {prompt_len} tokens; the context window is {window} tokens "
                         f"and at least one must be left for the answer")


class Sampler:
    """The decode state of one sequence: its random generator, its tokens so far (the repetition
    penalty's history) and its length limit. Every decoding loop keeps one per sequence, so a
    sequence's tokens depend only on its own parameters and seed.

    ``tokens`` starts as the prompt; :meth:`accept` appends each token the loop keeps. ``total`` is
    how many tokens the prompt and answer may hold (``max_new_tokens`` after the prompt, cut at
    ``window``). Unseeded sampling draws from PyTorch's global generator, unless ``own_generator``:
    then from a generator of its own with a random seed (a server row must not share its random
    numbers with other rows)."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], window: int,
                 device: torch.device | str = "cpu", vocab_size: int | None = None, own_generator: bool = False):
        self.params, self.vocab_size, self.device = params, vocab_size, device
        self.tokens = list(prompt_ids)
        self.total = min(len(self.tokens) + params.max_new_tokens, window)
        self.generator: torch.Generator | None = None
        seed = params.seed if params.seed is not None or not own_generator else secrets.randbits(63)
        if seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(seed)
        # the penalty's history as a (1, n) tensor, kept up to date only when the penalty is on
        self.seen = torch.tensor([self.tokens], dtype=torch.long, device=device) if self.penalised else None

    @property
    def penalised(self) -> bool:
        return self.params.repetition_penalty != 1.0

    @property
    def full(self) -> bool:
        """The limit is reached: no more tokens after the last one accepted."""
        return len(self.tokens) >= self.total

    def accept(self, token: int) -> None:
        """``token`` is the sequence's next one: the penalty counts it from now on."""
        self.tokens.append(token)
        if self.seen is not None:
            self.seen = torch.cat((self.seen, torch.tensor([[token]], dtype=torch.long, device=self.device)), dim=1)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(1, V) logits of the position after ``tokens`` through :func:`filtered_logits` (cut to
        ``vocab_size``, with this sequence's penalty history)."""
        return filtered_logits(logits[:, : self.vocab_size], self.params, self.seen)

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from the (1, V) logits of the position after ``tokens``; not yet accepted."""
        return int(sample_next(logits[:, : self.vocab_size], self.params, self.generator, self.seen))


def sampled_tokens(sampler: Sampler, logits: torch.Tensor, step: Callable[[int, int], torch.Tensor],
                   eos_id: int | None) -> Iterator[int]:
    """The decode loop of one sequence: ``logits`` (1, T, V) of its prompt, then ``step(token, position)``
    feeding each sampled token at its position and giving the next logits; the sampler decides every
    token. EOS is yielded, then the loop stops, as does a full sampler."""
    while True:
        t = sampler.sample(logits[:, -1])
        sampler.accept(t)
        yield t
        if t == eos_id or sampler.full:
            return
        logits = step(t, len(sampler.tokens) - 1)  # the token just sampled goes after the others
