"""Speculative decoding: guess a few tokens cheaply, check them all with one pass of the model.

At batch 1 a decode step reads every weight once, whether it scores one row or five (the kernels
run up to 16 rows per pass over the weights), so scoring ``k`` guessed tokens and the last real
one together costs little more than one plain step. Every guess the model agrees with is a token
gained. Guesses come from a :class:`PromptLookup` (tokens copied from an earlier occurrence of the
latest n-gram: answers that quote their context, as JSQuAD's, or summaries) or a :class:`DraftModel`
(a smaller checkpoint with the same tokenizer).

The output is the model's own: greedy gives the tokens plain greedy decoding gives, and sampling
keeps the model's distribution by the standard rule (accept guess ``d`` with probability
``min(1, p(d) / q(d))``, else draw from ``max(p - q, 0)`` renormalised; ``q`` is the guesser's
distribution, a point mass for prompt lookup).
"""
from __future__ import annotations

from typing import Iterator, Protocol, Sequence

import torch

from .errors import UsageError
from .kernels import MAX_KERNEL_ROWS
from .model import GPTNeoX
from .sampling import Sampler, SamplingParams, check_prompt_fits, filtered_logits, sample_categorical

DEFAULT_DRAFT_TOKENS = 5  # guesses per step: 6 rows per pass, still the kernels' decode path
# the newest token and its guesses are checked as one batch of the decode kernels, whose rows get the
# bits they get decoded alone: more rows would go the prompt path, and greedy would equal plain greedy
# only up to rounding
MAX_DRAFT_TOKENS = MAX_KERNEL_ROWS - 1


def _check_num_tokens(num_tokens: int) -> None:
    if not 1 <= num_tokens <= MAX_DRAFT_TOKENS:
        raise UsageError(f"the number of draft tokens must be 1 to {MAX_DRAFT_TOKENS} (one pass checks it and the "
                         f"newest token as one batch of the decode kernels), got {num_tokens}")


class Guesser(Protocol):
    """What speculative decoding needs of a guesser: a few likely next tokens, cheaply."""

    num_tokens: int  # guesses per step, at most MAX_DRAFT_TOKENS

    def start(self, max_len: int) -> None:
        """A new sequence of up to ``max_len`` tokens begins."""

    def for_sequence(self) -> "Guesser":
        """A guesser for one more sequence decoded alongside others (the server's rows)."""

    def propose(self, tokens: Sequence[int], k: int, params: SamplingParams, vocab_size: int | None,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``k`` guessed tokens after ``tokens``, and the distributions (k, V) they were drawn from
        (None: each guess is certain, a point mass). Sampling draws from ``generator``."""


class PromptLookup:
    """Guesses the tokens that followed the latest earlier occurrence of the last ``n`` tokens
    (``n`` from ``max_ngram`` down to ``min_ngram``). Costs no model pass."""

    def __init__(self, num_tokens: int = DEFAULT_DRAFT_TOKENS, max_ngram: int = 3, min_ngram: int = 1):
        _check_num_tokens(num_tokens)
        if not 1 <= min_ngram <= max_ngram:
            raise UsageError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.num_tokens, self.max_ngram, self.min_ngram = num_tokens, max_ngram, min_ngram

    def start(self, max_len: int) -> None:
        pass

    def for_sequence(self) -> "PromptLookup":
        """A guesser for one more sequence decoded alongside others: this one (it keeps no state)."""
        return self

    def propose(self, tokens: Sequence[int], k: int, params: SamplingParams, vocab_size: int | None,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``k`` guessed next tokens, and None: each guess is certain (a point mass)."""
        tokens = list(tokens)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # the latest earlier occurrence first
                if tokens[start:start + n] == tail:
                    return tokens[start + n:start + n + k], None
        return [], None


class DraftModel:
    """Guesses with a smaller model that shares the tokenizer, sampling with the same rules; keeps
    its own KV cache across steps and rolls back to what the big model accepted."""

    def __init__(self, model: GPTNeoX, num_tokens: int = DEFAULT_DRAFT_TOKENS):
        _check_num_tokens(num_tokens)
        self.model, self.num_tokens = model.eval(), num_tokens
        self.cache, self.fed = None, []

    def start(self, max_len: int) -> None:
        self.cache, self.fed = self.model.new_cache(1, max_len), []

    def for_sequence(self) -> "DraftModel":
        """A guesser for one more sequence decoded alongside others: the same model, its own cache."""
        return DraftModel(self.model, self.num_tokens)

    def propose(self, tokens: Sequence[int], k: int, params: SamplingParams, vocab_size: int | None,
                generator: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """Up to ``k`` guesses and, when sampling, the distribution each was drawn from (k, V)."""
        if len(tokens) + k > self.cache[0].max_len:
            return [], None  # past the draft model's window: no guesses, plain steps
        common = 0  # the draft's cache is valid up to the longest prefix it shares with ``tokens``
        for a, b in zip(self.fed, tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # feed at least one token to get the next logits
        device = self.model.embed.weight.device
        seq, guesses, dists = list(tokens), [], []
        todo = seq[common:]
        for j in range(k):
            ids = torch.tensor([todo], device=device)
            logits = self.model(ids, input_pos=torch.arange(common, common + len(todo), device=device),
                                last_only=True, cache=self.cache)[0, -1:, :vocab_size]
            common += len(todo)
            seen = torch.tensor([seq], device=device) if params.repetition_penalty != 1.0 else None
            scores = filtered_logits(logits, params, seen)
            if params.greedy:
                t = int(scores.argmax(-1))
            else:
                probs = scores.softmax(-1)
                t = int(sample_categorical(probs, generator))
                dists.append(probs[0])
            guesses.append(t)
            seq.append(t)
            todo = [t]
        self.fed = seq[:common]
        return guesses, (torch.stack(dists) if dists else None)


@torch.inference_mode()
def speculative_tokens(model: GPTNeoX, prompt_ids: Sequence[int], params: SamplingParams, draft: Guesser,
                       eos_id: int | None = None, vocab_size: int | None = None) -> Iterator[int]:
    """:func:`jneox.generate.generate_tokens` with guesses from ``draft`` checked ``draft.num_tokens``
    at a time: the same tokens for greedy, the same distribution for sampling."""
    check_prompt_fits(model, len(prompt_ids))
    device = model.embed.weight.device
    sampler = Sampler(params, prompt_ids, model.config.max_position_embeddings, device, vocab_size)
    cache = model.new_cache(1, sampler.total)
    draft.start(sampler.total)
    tokens = sampler.tokens
    # the prompt and the first token exactly as plain decoding makes them (the prompt kernels round
    # activations differently from the decode kernels, so a prompt fed otherwise gives other bits)
    ids = torch.tensor([tokens], device=device)
    logits = model(ids, input_pos=torch.arange(len(tokens), device=device), last_only=True, cache=cache)
    t = sampler.sample(logits[:, -1])
    sampler.accept(t)
    yield t
    if t == eos_id or sampler.full:
        return
    while True:  # the cache holds every token but the newest, which each step feeds with the guesses
        k = min(draft.num_tokens, sampler.total - len(tokens) - 1)
        guesses, q = draft.propose(tokens, k, params, vocab_size, sampler.generator) if k > 0 else ([], None)
        start = len(tokens) - 1
        ids = torch.tensor([[tokens[-1], *guesses]], device=device)
        rows = model(ids, input_pos=torch.arange(start, start + ids.shape[1], device=device), cache=cache)[0]
        for t in verify(rows, guesses, q, sampler):
            yield t
            if t == eos_id or sampler.full:
                return


def verify(rows: torch.Tensor, guesses: Sequence[int], q: torch.Tensor | None, sampler: Sampler) -> Iterator[int]:
    """The model's tokens for one checked pass: ``rows`` (at least ``len(guesses) + 1``, V) are its logits
    after ``sampler.tokens`` and after each guess in turn (rows past that are ignored); ``q`` the guesser's
    distributions (None: point masses). Yields every accepted guess, then the model's own token where
    it rejects one, or after the last guess; each is accepted by ``sampler`` (the repetition penalty's
    context) before it is yielded. The caller may stop early (EOS, length): nothing else changes."""
    for i in range(len(guesses) + 1):
        row = rows[i:i + 1]
        if i == len(guesses):  # every guess accepted: the last row gives one more token, as plain decoding
            t = sampler.sample(row)
        else:
            t = _check(sampler.scores(row), guesses[i], None if q is None else q[i], sampler.params, sampler.generator)
        sampler.accept(t)
        yield t
        if i < len(guesses) and t != guesses[i]:
            return  # the rest of the guesses followed a token the model did not pick


def _check(scores: torch.Tensor, guess: int, q: torch.Tensor | None, params: SamplingParams,
           generator: torch.Generator | None) -> int:
    """The model's token at a guessed position: the guess if accepted, else a draw from the rest."""
    if params.greedy:
        return int(scores.argmax(-1))
    p = scores.softmax(-1)[0]
    q_guess = 1.0 if q is None else float(q[guess])
    u = float(torch.rand((), generator=generator, device=p.device))
    if q_guess > 0 and u * q_guess < float(p[guess]):  # accept with probability min(1, p/q)
        return guess
    if q is None:
        rest = p.clone()
        rest[guess] = 0
    else:
        rest = (p - q).clamp_min(0)
    if float(rest.sum()) <= 0:  # p == q: rejection has probability 0, but rounding can land here
        rest = p
    return int(sample_categorical(rest[None], generator))
