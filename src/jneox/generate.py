"""Token generation: the KV-cached decode loop, stop rules and text streaming (the sampling rules are
:mod:`jneox.sampling`'s)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .cuda_graphs import StaticDecoder, can_capture, static_tokens
from .model import GPTNeoX
from .sampling import Sampler, SamplingParams, check_prompt_fits, sampled_tokens
from .speculative import Guesser, speculative_tokens
from .tokenizer import Tokenizer


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


@torch.inference_mode()
def generate_tokens(model: GPTNeoX, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(),
                    eos_id: int | None = None, vocab_size: int | None = None,
                    draft: Guesser | None = None) -> Iterator[int]:
    """Yield new token ids one by one (EOS included, then stop). Stops after ``max_new_tokens`` or
    when the context window is full, whichever comes first. ``vocab_size`` keeps sampling to the
    tokenizer's ids when the model's embedding is padded beyond them. ``draft`` (see
    :mod:`jneox.speculative`) guesses tokens for the model to check several at a time."""
    if draft is not None:
        yield from speculative_tokens(model, prompt_ids, params, draft, eos_id, vocab_size)
        return
    check_prompt_fits(model, len(prompt_ids))
    device = model.embed.weight.device
    sampler = Sampler(params, prompt_ids, model.config.max_position_embeddings, device, vocab_size)
    if can_capture(device):
        # one CUDA graph replay per token: see jneox.cuda_graphs
        yield from static_tokens(StaticDecoder(model, 1, sampler.total), sampler, eos_id)
        return
    cache = model.new_cache(1, sampler.total)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    logits = model(ids, input_pos=torch.arange(ids.shape[1], device=device), last_only=True, cache=cache)

    def step(t: int, pos: int) -> torch.Tensor:
        return model(torch.tensor([[t]], device=device), input_pos=torch.tensor([pos], device=device), cache=cache)

    yield from sampled_tokens(sampler, logits, step, eos_id)


class StopMatcher:
    """Withholds streamed text that might be the start of a stop string, and cuts at the first match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            cut = min(hits)[0]
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        keep = 0  # longest tail of pending that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:n]):
                    keep = n
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextAssembler:
    """Turns generated token ids into the answer's text, piece by piece: never half a UTF-8 character,
    cut at EOS and at the first stop string. One per answer; :func:`stream` and the server's
    scheduler both use it, so an answer's text does not depend on which of them produced it."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.eos_id = tokenizer.eos_id
        self.decoder = tokenizer.stream_decoder()
        self.stopper = StopMatcher(stop)
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length" once done

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, token_id: int) -> str:
        """The text that ``token_id`` releases (often "", or more than one token's worth)."""
        if token_id == self.eos_id:
            return self.finish("stop")
        self.token_ids.append(token_id)
        piece = self.stopper.feed(self.decoder.push(token_id))
        if self.stopper.stopped:
            self.finish_reason = "stop"
        return piece

    def finish(self, reason: str = "length") -> str:
        """Generation is over (``reason``: why): the text still held back. Idempotent."""
        if self.done:
            return ""
        tail = self.stopper.feed(self.decoder.flush())
        if not self.stopper.stopped:
            tail += self.stopper.flush()
        self.finish_reason = "stop" if self.stopper.stopped else reason
        return tail


def stream(model: GPTNeoX, tokenizer: Tokenizer, prompt: str | Sequence[int],
           params: SamplingParams = SamplingParams(), result: Completion | None = None,
           draft: Guesser | None = None) -> Iterator[str]:
    """Yield the answer's text piece by piece as it is generated; never half a character, never past a stop.

    ``prompt`` is text (encoded with the tokenizer) or token ids. If ``result`` is given, it is
    filled in with the full completion once the stream ends. ``draft``: speculative decoding
    (:mod:`jneox.speculative`), same output.
    """
    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    text = TextAssembler(tokenizer, params.stop)
    texts: list[str] = []
    for t in generate_tokens(model, prompt_ids, params, tokenizer.eos_id, tokenizer.vocab_size, draft):
        piece = text.push(t)
        if piece:
            texts.append(piece)
            yield piece
        if text.done:
            break
    tail = text.finish("length")
    if tail:
        texts.append(tail)
        yield tail
    if result is not None:
        result.text, result.token_ids, result.prompt_tokens, result.finish_reason = (
            "".join(texts), text.token_ids, len(prompt_ids), text.finish_reason)


def generate(model: GPTNeoX, tokenizer: Tokenizer, prompt: str | Sequence[int],
             params: SamplingParams = SamplingParams(), draft: Guesser | None = None) -> Completion:
    """The whole completion of ``prompt`` at once (see :func:`stream`)."""
    result = Completion("", [], 0, "length")
    for _ in stream(model, tokenizer, prompt, params, result, draft):
        pass
    return result
