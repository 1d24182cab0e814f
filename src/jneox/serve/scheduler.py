"""Continuous batching: one model, one batched KV cache, many requests decoding together.

The :class:`Engine` owns the model and a KV cache of ``max_batch`` rows (slots). It runs on its own
thread. Each step it (1) drops requests whose client went away, (2) admits waiting requests into free
slots while the KV cache positions that running requests reserve (each its prompt and ``max_tokens``,
at most the window) fit the budget (``kv_cache_gb``; the cache's memory is only taken where written,
so the budget is what bounds it), (3) computes the next chunks of the prompts in slots, up to
``max_prefill_tokens`` prompt tokens a step (at least one chunk), and (4) runs one decode step for
every request whose prompt is in: each row at its own position, then each row sampled with its own
parameters and random generator. A prompt goes in chunks of ``kernel_prompt_rows()`` from its start
(``PREFILL_CHUNK`` tokens with the native kernels, as a packed linear splits a whole prompt, so the
bits are the same; else ``MAX_KERNEL_ROWS``), or from where the prefix cache left off (a multiple of
the chunk); a long prompt spreads over several steps while the running rows keep decoding, and a
request joins the decode steps the step its last chunk is in. Nobody waits for the batch.

Idle prefill: a finished answer was made by decode steps, whose keys and values have other bits than
a prefill's, so the prefix cache never takes them, and a chat's next turn would prefill the previous
answer again, on the user's time. Instead, each request that ends normally leaves a job: the token ids
its conversation's next prompt starts with (its prompt and answer; for a chat, the conversation
rendered with the answer, as the next turn's prompt will render it). Only while no request is waiting
or running, the engine prefills the newest job, one chunk a step, by the prefill path a request takes
(:meth:`Engine._prefill_step`, in slot 0, from where the prefix cache leaves off), storing its whole
blocks after each chunk: they have a cold prefill's bits by construction. A request that arrives stops
it at the chunk's end (what is computed is already in the cache, for that request to take) and the
job goes back to the queue. The newest ``idle_prefill`` jobs are kept; a job whose whole blocks are all
cached (its follow-up came, or it ran) is dropped unrun.

Batching changes nothing but speed: every per-row operation on the CPU path (packed linear kernels
for up to ``MAX_KERNEL_ROWS`` rows, layer norm, fused single-token attention up to the row's own
position) computes a row the same way whatever the other rows hold, so a request gives the same
tokens alone or among others. Larger batches are split into chunks of ``MAX_KERNEL_ROWS`` rows for
that reason (past it, the packed linears may switch to one PyTorch matrix multiply). The prompt
chunks of one step share one pass (:meth:`jneox.model.GPTNeoX.forward_segments`) on the same terms:
each chunk's attention is the one its lone pass computes (its own call, same shapes); a linear layer
takes the chunks of at most ``MAX_KERNEL_ROWS`` tokens in decode kernel calls of at most that many
rows (what such a chunk gets alone), and those of more in one call only where
:func:`jneox.quantize.prompt_rows_independent` says the prompt paths compute each row of such a call
on its own (the call padded so that no row falls to the decode kernel), else one call per chunk, as
alone. Chunks that need every position's logits (echo) or add an adapter take a pass of their own.

Speculative decoding (``draft``: a :class:`~jneox.speculative.PromptLookup` or
:class:`~jneox.speculative.DraftModel`) turns a decode step into a verification step: each request
that speculates gets up to ``k`` guesses (prompt lookup over its own context, or the draft model with
a KV cache of its own), and every running request feeds its newest token and its guesses as one row
of ``1 + k`` positions, all rows in one batched pass, each at its own positions. The pass is padded to
the widest row (a row with fewer guesses, or none, or of a request that turned speculation off, carries
filler tokens whose logits are never read, at positions past its own), because a row of the model's
input is one row of the cache: rows of different lengths would need one pass each, which costs a
read of every weight per request, where padding costs only arithmetic. ``k`` shrinks as requests
join, so that the whole batch stays within ``MAX_KERNEL_ROWS`` rows (one pass of the kernels' decode
path over the weights, with fp32 activations as in a plain step); past ``MAX_KERNEL_ROWS // 2``
running requests the steps are plain ones, since the batch already fills the kernels' rows. The
accepted tokens follow :func:`jneox.speculative.verify` (greedy: the plain greedy tokens; sampling:
the model's distribution). Rejected positions need no undo: slot ``j`` of the cache holds position
``j``, and the request's position moves back to the first rejected one, so the stale entries are
overwritten before anything reads them. A verification pass takes the kernels' decode path and the
fused attention (up to ``MAX_KERNEL_ROWS`` consecutive new tokens per row), so its logits are bit for
bit those of plain steps; only a pass where some row's filler positions are clamped at the end of the
window (no longer consecutive) goes through PyTorch's attention, equal up to float rounding.
"""
from __future__ import annotations

import collections
import ctypes
import itertools
import mmap
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..adapters import Adapter
from ..errors import UsageError
from ..generate import TextAssembler
from ..model import GPTNeoX, KVCache
from ..quantize import (MAX_KERNEL_ROWS, PREFILL_CHUNK, PackedLinear, kernel_prompt_rows, libc,
                        prompt_rows_independent)
from ..sampling import Sampler, SamplingParams, check_prompt_fits
from ..speculative import Guesser, verify
from ..tokenizer import Tokenizer
from .constraints import ConstrainedSampler, Constraint
from .metrics import Metrics
from .prefix_cache import DEFAULT_PREFIX_CACHE_MB, FINE_BLOCK_TOKENS, PrefixCache, block_keys


# prompt tokens computed per engine step beside the decode rows (a prompt's chunks are taken whole, at least
# one a step): larger lets a burst of prompts share one read of the weights, smaller gives a burst its first
# tokens progressively and keeps the running rows' tokens coming; the prompt paths are compute-bound past a
# few short prompts, so one chunk's worth gave the same throughput with lower latency (docs/performance.md#serving-load)
DEFAULT_MAX_PREFILL_TOKENS = PREFILL_CHUNK
# the share of the memory available once the model is loaded that the running requests' KV cache may
# take by default (the rest: the server's own buffers, and whatever else the machine runs)
KV_MEMORY_SHARE = 0.8
# finished answers whose next prompt the engine prefills into the prefix cache while it is idle: the newest
# this many (a user answers the latest turns first; each job is one conversation's worth of blocks)
DEFAULT_IDLE_PREFILL = 8
# idle prefill takes this slot's rows (every slot is free while it runs)
IDLE_SLOT = 0


class QueueFull(RuntimeError):
    """Every slot is busy and the waiting queue is full: the caller should retry later."""


class Unavailable(RuntimeError):
    """The engine takes no more requests: it is shutting down, or its thread stopped after an error."""


ENGINE_FAILED = "the generation engine stopped after an internal error (see the server log)"
SHUTTING_DOWN = "the server is shutting down"


@dataclass
class TokenLogprob:
    """One token's log-probability under the model and its ``top`` alternatives ((id, logprob), most
    likely first). The first prompt token has ``logprob`` None: nothing predicts it."""

    id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Event:
    """What a request hears from the engine: a text piece, then one final event (``finish_reason`` set,
    or ``error`` set). With logprobs asked for, ``logprobs`` holds the generated tokens released with
    this event (a token whose text is still held back comes with a later one) and the first event
    ``prompt_logprobs`` (``echo``)."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    # prompt tokens whose keys and values came from the prefix cache (final event; None: not looked up,
    # the cache is off or the prompt was scored in full)
    cached_tokens: int | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(eq=False)
class IdleJob:
    """A finished answer's follow-up to prefill while the engine is idle: ``make()`` gives its token ids
    (called on the engine thread, once, when the job first runs; then kept in ``ids``)."""

    make: Callable[[], list[int]]
    adapter: Adapter | None = None
    ids: list[int] | None = None


@dataclass(eq=False)
class Request:
    """One request's state inside the engine (what ``submit`` returns, to pass to ``cancel``)."""

    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    id: int = 0
    text: TextAssembler | None = None
    sampler: Sampler | None = None  # its generator, tokens so far and length limit, from the prefill on
    slot: int = -1
    pos: int = 0  # where the next input token goes
    next_token: int = 0
    completion_tokens: int = 0
    cancelled: bool = False
    logprobs: int | None = None  # None: no logprobs; k: each token's logprob and its k best alternatives
    prompt_logprobs: bool = False  # score the prompt's tokens too (echo)
    generate: bool = True  # False: score the prompt only (max_tokens 0), generate nothing
    pending: list[TokenLogprob] = field(default_factory=list)  # generated tokens' logprobs not yet sent
    speculate: bool = True  # False: plain decode steps even when the engine has a draft
    draft: Guesser | None = None  # this request's guesser, from the first token on
    adapter: Adapter | None = None  # the LoRA adapter its rows add (None: the base model)
    constraint: Constraint | None = None  # structured output: the grammar its tokens follow
    cached_tokens: int | None = None  # prompt tokens taken from the prefix cache (None: not looked up)
    # the token ids its conversation's next prompt starts with, from its answer's text (None: prompt + answer ids)
    follow_up: Callable[[str], list[int]] | None = None
    answer: list[str] = field(default_factory=list)  # the answer's text pieces sent so far
    idle: bool = False  # the engine's own idle prefill of a finished answer (no client)
    prefilling: bool = False  # in a slot, its prompt not all in the cache yet (seq.pos: the next prompt position)
    scored: list[TokenLogprob] | None = None  # echo: the prompt's logprobs so far
    keys: list[bytes] = field(default_factory=list)  # its prompt blocks' prefix cache keys
    # the final hidden states of its prompt positions so far, (1, n, hidden) pieces: the cached ones, then
    # each prefill pass's (for the prefix cache's blocks, and the logits of a prompt scored in full)
    hidden: list[torch.Tensor] = field(default_factory=list)
    arrived: float = field(default_factory=time.monotonic)  # for the latency metrics
    last_token_at: float = 0.0


def available_memory() -> int | None:
    """Bytes of memory the system could give now without swapping (Linux's MemAvailable; else the free
    pages; None where neither can be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def kv_cache_budget(model: GPTNeoX, window: int, kv_cache_gb: float | None = None) -> int | None:
    """The bytes of KV cache that running requests may reserve together: ``kv_cache_gb``, else
    KV_MEMORY_SHARE of the memory available now (None: unknown, no limit). Refuses a budget that cannot
    hold one request of a full window (a config.json with a huge max_position_embeddings would otherwise
    fail on its first mapping, or much later)."""
    row = model.cache_bytes(1, window)
    if kv_cache_gb is not None:
        if kv_cache_gb <= 0:
            raise UsageError(f"--kv-cache-gb must be > 0, got {kv_cache_gb}")
        budget, source = int(kv_cache_gb * 2**30), "--kv-cache-gb"
    else:
        avail = available_memory()
        if avail is None:
            return None
        budget = int(avail * KV_MEMORY_SHARE)
        source = f"{KV_MEMORY_SHARE:.0%} of the {avail / 2**30:.1f} GiB of memory available"
    if row > budget:
        raise UsageError(f"the KV cache of one request of {window} positions would need {row / 2**30:.1f} GiB, more "
                         f"than the {budget / 2**30:.1f} GiB KV cache budget ({source}): raise --kv-cache-gb if the "
                         f"memory is there, or use a config.json with a smaller max_position_embeddings")
    return budget


class Engine:
    """Serves generation requests from many threads with one model (see the module docstring).

    ``submit`` returns at once; the request's text arrives through its ``on_event`` callback, called
    on the engine thread (keep it short: hand the event over to your own loop). ``cancel`` frees the
    request's slot at the next step. At most ``max_batch`` requests run and ``max_queue`` wait; past
    that ``submit`` raises :class:`QueueFull`. ``draft`` (:func:`jneox.loading.load_draft`) makes
    decode steps speculative (see the module docstring); its model must share ``tokenizer``.
    ``adapters`` (:func:`jneox.adapters.load_adapter`) are the LoRA adapters a request may name; each
    row of a batch adds its own request's adapter (see :func:`jneox.model.add_low_rank`).
    ``prefix_cache_mb`` (0: off) keeps prefilled prompt blocks for later prompts that start the same
    way (:mod:`jneox.serve.prefix_cache`); ``metrics`` (:mod:`jneox.serve.metrics`) are labelled
    ``model_name``. ``kv_cache_gb`` (None: KV_MEMORY_SHARE of the memory available) bounds the KV cache
    that running requests reserve (each its prompt plus ``max_tokens``, at most the window): a request
    that would pass it waits in the queue. ``max_prefill_tokens``: prompt tokens per engine step.
    ``idle_prefill`` (0: off; needs the prefix cache): the finished answers whose follow-up prompts the
    engine prefills into the prefix cache while it has no request (see the module docstring), newest first.
    """

    def __init__(self, model: GPTNeoX, tokenizer: Tokenizer, max_batch: int = 8, max_queue: int = 32,
                 draft: Guesser | None = None, adapters: Sequence[Adapter] = (),
                 prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB, model_name: str = "jneox",
                 kv_cache_gb: float | None = None, max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
                 idle_prefill: int = DEFAULT_IDLE_PREFILL):
        if max_batch < 1 or max_queue < 0 or max_prefill_tokens < 1 or idle_prefill < 0:
            raise ValueError(f"max_batch and max_prefill_tokens must be >= 1 and max_queue and idle_prefill >= 0, got "
                             f"{max_batch}, {max_prefill_tokens}, {max_queue} and {idle_prefill}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.draft = draft
        self.adapters = {a.name: a for a in adapters}
        self.window = model.config.max_position_embeddings
        self.device = model.embed.weight.device
        self.vocab_size = min(tokenizer.vocab_size, model.config.vocab_size)
        # on the CPU, prompts go in chunks that the packed kernels take (a longer input makes every
        # linear layer widen its whole weight for one matrix multiply, for each new request)
        self.prefill_chunk = kernel_prompt_rows() if self.device.type == "cpu" else self.window
        self.max_prefill_tokens = max_prefill_tokens
        budget = kv_cache_budget(model, self.window, kv_cache_gb)
        # admission counts positions: each running request reserves its prompt and max_tokens
        self.kv_positions = max_batch * self.window if budget is None else budget // model.cache_bytes(1, 1)
        # prompts of several requests share each linear layer's calls (see _prefill_step) where the kernels
        # compute a row alone: the decode kernel's calls of <= MAX_KERNEL_ROWS rows on every path with
        # packed layers, and longer calls where prompt_rows_independent says so
        # (the native kernels are there when prompts go in PREFILL_CHUNK tokens: see kernel_prompt_rows)
        packed = (self.device.type == "cpu" and self.prefill_chunk == PREFILL_CHUNK
                  and all(not isinstance(m, torch.nn.Linear) for m in model.modules())
                  and any(isinstance(m, PackedLinear) for m in model.modules()))
        self.batch_short_prompts = packed
        self.batch_long_prompts = packed and prompt_rows_independent(model)
        # zero-filled and touched only where written, so unused positions cost no memory
        self.caches: list[KVCache] = model.new_cache(max_batch, self.window)
        self.slots: list[Request | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.draining = False  # shutting down gracefully: running and waiting requests finish, no new ones
        self.failed = False  # the engine thread stopped after an error outside any one request's step
        self.finished = False  # the engine thread has ended: nothing will ever be answered again
        self.thread: threading.Thread | None = None
        self.ids = itertools.count(1)
        self.steps = 0  # decode steps run (for tests and stats)
        self.prefill_steps = 0  # passes that computed prompt chunks
        self.max_rows_seen = 0  # the largest decode batch so far
        # work done so far, for /health and the load benchmark: tokens and seconds of each phase
        # (*_cpu_s: CPU time of the engine thread, which is all of it with one thread, and does not
        # count time lost to other processes on a shared machine)
        self.counters = {"prefill_tokens": 0, "prefill_s": 0.0, "prefill_cpu_s": 0.0,
                         "decode_tokens": 0, "decode_s": 0.0, "decode_cpu_s": 0.0,
                         # speculative decoding: guesses checked, and those the model agreed with
                         "draft_proposed": 0, "draft_accepted": 0,
                         # prefix cache: prompt tokens looked up, and found (not prefilled again)
                         "prefix_query_tokens": 0, "prefix_hit_tokens": 0,
                         # idle prefill of finished answers: jobs started, tokens and seconds (not in prefill_*)
                         "idle_prefill_jobs": 0, "idle_prefill_tokens": 0, "idle_prefill_s": 0.0,
                         "idle_prefill_cpu_s": 0.0}
        if prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0, got {prefix_cache_mb}")
        # blocks are prefill chunks, or finer where every linear computes a prompt's rows on its own (the bits
        # argument of jneox.serve.prefix_cache); a chunk as long as the window (no chunking, off the CPU)
        # leaves no prefix to reuse
        fine = prompt_rows_independent(model) and self.prefill_chunk % FINE_BLOCK_TOKENS == 0
        self.prefix_cache = (PrefixCache(self.caches, FINE_BLOCK_TOKENS if fine else self.prefill_chunk,
                                         int(prefix_cache_mb * 2**20), model.config.hidden_size)
                             if prefix_cache_mb > 0 and self.prefill_chunk < self.window else None)
        # finished answers to prefill while idle (newest last; the oldest fall out), and the one in slot IDLE_SLOT
        self.idle_jobs: collections.deque[IdleJob] = collections.deque(
            maxlen=idle_prefill if self.prefix_cache is not None else 0)
        self.idle_seq: Request | None = None
        self.idle_job: IdleJob | None = None
        self.metrics = Metrics(model_name)
        self.metrics.gauges(running=self.running_count, waiting=lambda: len(self.waiting), kv_usage=self._kv_usage,
                            prefix_usage=lambda: self.prefix_cache.usage if self.prefix_cache else 0.0)

    # ---- the caller's side (any thread) -------------------------------------------------------
    def start(self) -> "Engine":
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="jneox-engine", daemon=True)
            self.thread.start()
        return self

    def stop(self, timeout: float | None = 10) -> None:
        """Stop the engine thread; requests still running or waiting end with an error event."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def drain(self, timeout: float) -> bool:
        """Graceful shutdown: refuse new requests, let the running and waiting ones finish for up to
        ``timeout`` seconds, then stop (what is left ends with an error event). True if all finished."""
        deadline = time.monotonic() + timeout
        with self.cond:
            self.draining = True
            while (self.waiting or self.running_count()) and not self.finished:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            idle = not self.waiting and self.running_count() == 0
        self.stop()
        return idle

    @property
    def status(self) -> str:
        """"ok", "draining", "stopped", "failed" (the thread died: see the log) or "not started"."""
        with self.cond:
            if self.failed:
                return "failed"
            if self.finished or self.stopping:
                return "stopped"
            if self.thread is None:
                return "not started"
            return "draining" if self.draining else "ok"

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, on_event: Callable[[Event], None],
               logprobs: int | None = None, prompt_logprobs: bool = False, generate: bool = True,
               speculate: bool = True, adapter: Adapter | None = None,
               constraint: Constraint | None = None, follow_up: Callable[[str], list[int]] | None = None) -> Request:
        """Queue a request; raises ValueError for a prompt that does not fit, QueueFull when full and
        Unavailable when the engine takes no more requests.

        ``logprobs`` (k >= 0) adds each generated token's log-probability and its k most likely
        alternatives to the events; ``prompt_logprobs`` also those of the prompt's tokens (first event);
        ``generate=False`` scores the prompt and generates nothing (needs ``prompt_logprobs``);
        ``speculate=False`` decodes this request without the engine's draft; ``adapter``: one of the
        engine's ``adapters`` (None: the base model); ``constraint`` makes its tokens follow a grammar (a row
        of its own: it never speculates, as guesses skip the mask); ``follow_up`` maps the answer's text to
        the token ids the conversation's next prompt starts with, for the idle prefill (None: the prompt's
        ids and the answer's; called on the engine thread while it is idle)."""
        if generate:
            check_prompt_fits(self.model, len(prompt_ids))
        elif not prompt_logprobs or logprobs is None:
            raise ValueError("a request that generates nothing must ask for the prompt's logprobs")
        elif not 0 < len(prompt_ids) <= self.window:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; 1 to {self.window} can be scored")
        seq = Request(list(prompt_ids), params, on_event, logprobs=logprobs,
                      prompt_logprobs=prompt_logprobs and logprobs is not None, generate=generate,
                      speculate=speculate and constraint is None, adapter=adapter, constraint=constraint,
                      follow_up=follow_up)
        with self.cond:
            if self.failed:
                raise Unavailable(ENGINE_FAILED)
            if self.stopping or self.draining or self.finished:
                raise Unavailable(SHUTTING_DOWN)
            if self.running_count() + len(self.waiting) >= self.max_batch + self.max_queue:
                raise QueueFull(f"{self.max_batch} requests are running and {len(self.waiting)} waiting "
                                f"(--max-queue {self.max_queue})")
            seq.id = next(self.ids)
            self.waiting.append(seq)
            self.cond.notify_all()
        return seq

    def cancel(self, seq: Request) -> None:
        """The client is gone: drop the request (its slot is freed before the next decode step)."""
        with self.cond:
            seq.cancelled = True
            if seq in self.waiting:
                self.waiting.remove(seq)
            self.cond.notify_all()

    def running_count(self) -> int:
        return sum(s is not None for s in self.slots)

    def _kv_usage(self) -> float:
        """The share of the KV cache's positions that running requests hold (what a scrape reads)."""
        held = sum(s.pos for s in list(self.slots) if s is not None)
        return held / (self.max_batch * self.window)

    def stats(self) -> dict:
        with self.cond:
            return {"running": self.running_count(), "waiting": len(self.waiting), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, "decode_steps": self.steps,
                    # idle prefill jobs not done yet (queued or running)
                    "idle_prefill_pending": len(self.idle_jobs) + (self.idle_job is not None), **self.counters}

    # ---- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        """The engine thread. Whatever ends it (stop, or an error outside one request's step: a bug in
        admission or cancellation), every request still queued or running hears a final error event,
        and ``submit`` refuses from then on, so no client waits for an answer that cannot come."""
        reason = SHUTTING_DOWN
        try:
            self._serve_forever()
        except BaseException:
            traceback.print_exc()
            reason = ENGINE_FAILED
            with self.cond:
                self.failed = True
        finally:
            with self.cond:
                self.finished = True
                rest = [*self.waiting, *(s for s in self.slots if s is not None)]
                self.waiting.clear()
                self.slots = [None] * self.max_batch
                self.cond.notify_all()
            for seq in rest:
                self._send(seq, Event(error=reason))

    def _serve_forever(self) -> None:
        with torch.inference_mode():
            while self.step():
                pass

    def step(self, wait: bool = True) -> bool:
        """One round of the engine thread's loop: admit, prefill, decode; or, with no request waiting or
        running, one chunk of idle prefill. ``wait``: block until there is something to do (the thread's
        way; a test drives an engine that was not started with ``wait=False``, under
        ``torch.inference_mode``). False once the engine is stopping."""
        with self.cond:
            self._drop_cancelled()
            while wait and not self.stopping and not self._busy() and not self._idle_work():
                self.cond.wait()
            if self.stopping:
                return False
            busy = self._busy()
        if not busy:
            if self._idle_work():
                self._idle_step()
            return True
        if self.idle_seq is not None:  # a request came: the idle prefill gives way at this chunk's end
            self._pause_idle()
        with self.cond:
            admitted = self._admit()
        for seq in admitted:
            self._guarded(lambda: self._start(seq), [seq])
        prompts = [s for s in self.slots if s is not None and s.prefilling and not s.cancelled]
        if prompts:
            self._guarded(lambda: self._prefill_step(prompts), prompts)
        running = [s for s in self.slots if s is not None and not s.cancelled and not s.prefilling]
        if running:
            self._guarded(lambda: self._decode_step(running), running)
        return True

    def _busy(self) -> bool:
        """Whether a request is waiting or running (with the lock held)."""
        return bool(self.waiting) or self.running_count() > 0

    def _idle_work(self) -> bool:
        return not self.draining and (self.idle_seq is not None or bool(self.idle_jobs))

    def _reserved(self, seq: Request) -> int:
        """The KV cache positions a request may come to hold: its prompt and max_tokens, at most the window."""
        return min(len(seq.prompt_ids) + (seq.params.max_new_tokens if seq.generate else 0), self.window)

    def _admit(self) -> list[Request]:
        """Waiting requests into free slots, first come first served, while the positions they reserve fit
        the KV cache budget (with the lock held). A request that does not fit waits, and those behind it."""
        admitted = []
        reserved = sum(self._reserved(s) for s in self.slots if s is not None)
        while self.waiting and None in self.slots and reserved + self._reserved(self.waiting[0]) <= self.kv_positions:
            seq = self.waiting.popleft()
            reserved += self._reserved(seq)
            seq.slot = self.slots.index(None)
            self.slots[seq.slot] = seq
            admitted.append(seq)
        return admitted

    def _guarded(self, fn, seqs: list[Request]) -> None:
        """Run one step; if it fails, fail only the requests it touched and keep serving the rest."""
        try:
            fn()
        except Exception:  # a bug or out of memory: the server must stay up
            traceback.print_exc()  # the details go to the log, not to the client
            for seq in seqs:
                self._free(seq)
                self._observe_end(seq, "error")
                self._send(seq, Event(error="generation failed (the server log has the details)"))

    def _drop_cancelled(self) -> None:
        for seq in self.slots:
            if seq is not None and seq.cancelled:
                self._free(seq)
                self._observe_end(seq, "abort")

    def _free(self, seq: Request) -> None:
        with self.cond:
            if 0 <= seq.slot < self.max_batch and self.slots[seq.slot] is seq:
                self._release(seq.slot)
                self.slots[seq.slot] = None
            seq.slot = -1
            self.cond.notify_all()  # drain() waits for the last slot to be freed

    def _release(self, slot: int) -> None:
        """Hand the memory of a freed slot's keys and values back to the OS (it reads as zeros again, and
        takes pages only where the next request writes), so the cache holds what the running requests
        reserve, not the most each slot ever held; a no-op off the CPU or without madvise."""
        madvise = getattr(libc(), "madvise", None)
        # the cache's anonymous mappings are private ones (jneox.model._zeros): MADV_DONTNEED frees their
        # pages, which read back as zeros
        if madvise is None or self.device.type != "cpu" or not hasattr(mmap, "MADV_DONTNEED"):
            return
        for cache in self.caches:
            for t in (cache.k[slot], cache.v[slot]):  # one contiguous block each
                first = -(-t.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE  # the whole pages inside it
                last = (t.data_ptr() + t.numel() * t.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
                if last > first:
                    madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)

    def _send(self, seq: Request, event: Event) -> None:
        if seq.cancelled:
            return
        try:
            seq.on_event(event)
        except Exception:  # the listener is gone; nothing to tell it
            seq.cancelled = True

    @staticmethod
    def _released(seq: Request) -> list[TokenLogprob]:
        out, seq.pending = seq.pending, []
        return out

    def _rows(self, a: int, b: int) -> list[KVCache]:
        """Slots ``[a, b)`` of every layer's cache: the model writes input row i to cache row i."""
        return [c.rows(a, b) for c in self.caches]

    def _start(self, seq: Request) -> None:
        """A request that just got a slot: its sampler and text, and the start of its prompt from the prefix
        cache; its prompt goes in from the next prefill step on."""
        if seq.cancelled:
            self._free(seq)
            self._observe_end(seq, "abort")
            return
        seq.text = TextAssembler(self.tokenizer, seq.params.stop)
        # unseeded rows get a generator of their own: a row's tokens must not depend on its neighbours'
        seq.sampler = self._sampler(seq)
        seq.scored = [TokenLogprob(seq.prompt_ids[0], None)] if seq.prompt_logprobs else None
        seq.keys = self._reuse_prefix(seq)
        seq.pos = seq.cached_tokens or 0
        seq.prefilling = True

    def _prefill_step(self, prompts: list[Request], max_tokens: int | None = None, counters: str = "prefill") -> None:
        """The next chunks of the prompts in their slots, oldest request first, up to ``max_prefill_tokens``
        (at least one chunk): each chunk is the piece of a lone prefill (``prefill_chunk`` tokens from the
        prompt's start or where the prefix cache left off). Chunks of requests without echo or an adapter go
        through the model together (:meth:`_prefill_together`), the others one pass each, as ``generate``
        does; a request whose last chunk is in samples its first token. ``max_tokens`` (default
        ``max_prefill_tokens``) and the ``counters`` it adds to (``prefill_*``): for the idle prefill."""
        t0, c0 = time.perf_counter(), time.thread_time()
        plan, budget = [], max_tokens or self.max_prefill_tokens
        for seq in sorted(prompts, key=lambda s: s.id):
            a, n = seq.pos, len(seq.prompt_ids)
            while a < n:
                b = min(a - a % self.prefill_chunk + self.prefill_chunk, n)
                if plan and b - a > budget:
                    break
                plan.append((seq, a, b))
                budget -= b - a
                a = b
            if a < n:
                break
        together = [c for c in plan if self.batch_short_prompts and c[0].scored is None and c[0].adapter is None]
        done = self._prefill_together(together) if together else {}
        joined = {seq for seq, _, _ in together}
        for seq, a, b in plan:
            if seq in joined:
                continue
            logits = self._prefill_alone(seq, a, b)
            if b == len(seq.prompt_ids):
                done[seq] = None if logits is None else logits[:, -1]
        self.prefill_steps += 1
        self.counters[counters + "_tokens"] += sum(b - a for _, a, b in plan)
        self.counters[counters + "_s"] += time.perf_counter() - t0
        self.counters[counters + "_cpu_s"] += time.thread_time() - c0
        for seq, logits in done.items():
            self._prompt_done(seq, logits)

    def _span(self, a: int) -> int | None:
        """The cache span of a prefill pass from prompt position ``a``: up to its chunk's end, so that a
        position's bits do not depend on where its prompt ends (the bits argument of
        :mod:`jneox.serve.prefix_cache`); None where a chunk is the whole window."""
        chunk = self.prefill_chunk
        return min(a - a % chunk + chunk, self.window) if chunk < self.window else None

    def _prefill_alone(self, seq: Request, a: int, b: int) -> torch.Tensor | None:
        """Prompt positions ``[a, b)`` of one request in a pass of their own; the last position's logits
        when the prompt is now all in and not scored in full (None otherwise: echo logits come from the
        hidden states, see :meth:`_prompt_done`)."""
        ids = torch.tensor([seq.prompt_ids[a:b]], dtype=torch.long, device=self.device)
        h = self.model(ids, input_pos=torch.arange(a, b, device=self.device), head=False,
                       cache=self._rows(seq.slot, seq.slot + 1), adapters=self._adapters([seq], seq.slot, seq.slot + 1),
                       span=self._span(a))
        seq.hidden.append(h)
        seq.pos = b
        return self.model.lm_head(h[:, -1:]) if seq.scored is None and b == len(seq.prompt_ids) else None

    def _prefill_together(self, chunks: list[tuple[Request, int, int]]) -> dict[Request, torch.Tensor]:
        """Several requests' prompt chunks in one pass (:meth:`jneox.model.GPTNeoX.forward_segments`), each
        row computed as in its lone pass: every chunk's attention is its own; a linear layer takes the chunks
        of more than MAX_KERNEL_ROWS rows in one call where the kernels compute each row of such a call on
        its own (else one call per chunk, as alone), and chunks of at most MAX_KERNEL_ROWS rows (the decode
        kernel's, alone) in calls of at most MAX_KERNEL_ROWS rows. The (1, V) logits of each request whose
        prompt is now all in."""
        long = [c for c in chunks if c[2] - c[1] > MAX_KERNEL_ROWS]
        short = [c for c in chunks if c[2] - c[1] <= MAX_KERNEL_ROWS]
        ids, starts, calls, row = [], {}, [], 0
        for seq, a, b in long + short:
            starts[seq, a] = row
            ids += seq.prompt_ids[a:b]
            if not self.batch_long_prompts and b - a > MAX_KERNEL_ROWS:
                calls.append((row, row + b - a, b - a))
            row += b - a
        n_long = sum(b - a for _, a, b in long)
        if self.batch_long_prompts and n_long:
            calls.append((0, n_long, _rows_called(n_long)))
        calls += [(r, min(r + MAX_KERNEL_ROWS, row), min(MAX_KERNEL_ROWS, row - r)) for r in range(n_long, row, MAX_KERNEL_ROWS)]
        segments, last, ends = [], [], []
        for seq, a, b in chunks:  # the attention in the order of the prompts' own chunks
            r = starts[seq, a]
            segments.append((slice(r, r + b - a), torch.arange(a, b, device=self.device), self._rows(seq.slot, seq.slot + 1)))
            if b == len(seq.prompt_ids):
                last.append(r + b - a - 1)
                ends.append(seq)
            seq.pos = b

        def linear(layer, x):
            out = []
            for a, b, n in calls:  # a call of n rows: the extra ones repeat the last row, their outputs dropped
                xi = x[:, a:b] if n == b - a else torch.cat((x[:, a:b], x[:, b - 1 : b].expand(1, n - (b - a), -1)), 1)
                out.append(layer(xi)[:, : b - a])
            return out[0] if len(out) == 1 else torch.cat(out, 1)

        hidden = self.model.forward_segments(torch.tensor([ids], dtype=torch.long, device=self.device), segments,
                                             linear, spans=[self._span(a) for _, a, _ in chunks])
        for seq, a, b in chunks:  # each request's chunks in order
            seq.hidden.append(hidden[:, starts[seq, a] : starts[seq, a] + b - a])
        if not ends:
            return {}
        # the head on the rows that end a prompt, in calls of at most MAX_KERNEL_ROWS rows: the decode kernel's,
        # which computes each row alone, as the one-row call of a lone prompt's last position does
        h = hidden[0, last]
        logits = torch.cat([self.model.lm_head(h[i : i + MAX_KERNEL_ROWS]) for i in range(0, len(last), MAX_KERNEL_ROWS)])
        return {seq: logits[i : i + 1] for i, seq in enumerate(ends)}

    def _prompt_done(self, seq: Request, logits: torch.Tensor | None) -> None:
        """A request's whole prompt is in its slot; ``logits`` (1, V) its last position's: its first token
        (None for a prompt scored in full, whose logits come from its hidden states here)."""
        seq.prefilling = False
        if seq.idle:  # its blocks are stored by _idle_step
            return
        hidden, seq.hidden = torch.cat(seq.hidden, dim=1), []
        if seq.scored is not None:  # echo: every position's logits, by one head call per chunk of a full prefill
            n, chunk = len(seq.prompt_ids), self.prefill_chunk
            for a in range(0, n, chunk):
                chunk_logits = self.model.lm_head(hidden[:, a : a + chunk])
                seq.scored += self._logprobs(chunk_logits[0], seq.prompt_ids[a + 1 : a + chunk + 1], seq.logprobs)
            logits = chunk_logits[:, -1]
        self._store_prefix(seq, seq.keys, hidden)
        self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
        if seq.scored is not None:
            self._send(seq, Event(prompt_logprobs=seq.scored))
        if not seq.generate:
            self._free(seq)
            self._observe_end(seq, "length")
            self._send(seq, Event(finish_reason="length", prompt_tokens=len(seq.prompt_ids),
                                  cached_tokens=seq.cached_tokens))
            return
        if self.draft is not None and seq.speculate:
            seq.draft = self.draft.for_sequence()
            seq.draft.start(seq.sampler.total)
        self._take(seq, logits)

    def _sampler(self, seq: Request) -> Sampler:
        """The request's Sampler; a constrained request's masks its logits with its grammar first."""
        if seq.constraint is not None:
            return ConstrainedSampler(seq.params, seq.prompt_ids, self.window, seq.constraint, self.device,
                                      self.vocab_size, own_generator=True)
        return Sampler(seq.params, seq.prompt_ids, self.window, self.device, self.vocab_size, own_generator=True)

    def _reuse_prefix(self, seq: Request) -> list[bytes]:
        """Fill the start of the request's slot from the prefix cache (``seq.cached_tokens`` positions, their
        final hidden states the first piece of ``seq.hidden``, from which a prompt scored in full gets their
        logits); the keys of the prompt's whole blocks, for :meth:`_store_prefix`. The last prompt token is
        always computed (its logits give the first token)."""
        pc = self.prefix_cache
        if pc is None:
            return []
        keys = self._block_keys(seq.prompt_ids, seq.adapter)
        self._restore_prefix(seq, keys)
        n = len(seq.prompt_ids)
        self.counters["prefix_query_tokens"] += n
        self.counters["prefix_hit_tokens"] += seq.cached_tokens
        self.metrics.prefix_queries.inc(n)
        self.metrics.prefix_hits.inc(seq.cached_tokens)
        return keys

    def _block_keys(self, ids: list[int], adapter: Adapter | None) -> list[bytes]:
        # an adapter changes every layer's keys and values: its blocks are its own
        salt = b"" if adapter is None else b"adapter:" + adapter.name.encode()
        return block_keys(ids, self.prefix_cache.block_tokens, salt)

    def _restore_prefix(self, seq: Request, keys: list[bytes]) -> None:
        """Copy the leading cached blocks of ``seq``'s prompt (``keys``) where it may resume into its slot:
        ``seq.cached_tokens`` positions, their hidden states the first piece of ``seq.hidden``. An idle
        prefill's lookup counts as no prompt's."""
        pc, n = self.prefix_cache, len(seq.prompt_ids)
        blocks = pc.lookup(keys, (n - 1) // pc.block_tokens, n, lambda found: self._resumable(found, n, seq.adapter),
                           count=not seq.idle)
        seq.cached_tokens = pc.restore(blocks, self._rows(seq.slot, seq.slot + 1), 0)
        seq.hidden = [pc.hidden(blocks)] if blocks else []

    def _resumable(self, found: int, n: int, adapter: Adapter | None) -> int:
        """How many of the ``found`` leading cached blocks a prompt of ``n`` tokens resumes after (the bits
        argument of :mod:`jneox.serve.prefix_cache`): the most that end at a chunk boundary, or inside a
        chunk with more than ``MAX_KERNEL_ROWS`` of its rows left to compute. An adapter's rows add low-rank
        products through PyTorch's matrix multiply, not known to compute rows on their own: whole chunks."""
        bt, chunk = self.prefix_cache.block_tokens, self.prefill_chunk
        for k in range(found, 0, -1):
            r = k * bt
            if r % chunk == 0 or (adapter is None and min(r - r % chunk + chunk, n) - r > MAX_KERNEL_ROWS):
                return k
        return 0

    def _store_prefix(self, seq: Request, keys: list[bytes], hidden: torch.Tensor) -> None:
        """Keep the request's prefilled whole blocks in the prefix cache, with their positions' final hidden
        states (``hidden``, (1, prompt tokens, hidden_size))."""
        if self.prefix_cache is not None and keys:
            self.prefix_cache.store(keys, self._rows(seq.slot, seq.slot + 1), 0, hidden[0])

    # ---- idle prefill (the module docstring) ------------------------------------------------------
    def _queue_idle(self, seq: Request) -> None:
        """A request that ended normally leaves its follow-up to prefill while idle."""
        if self.idle_jobs.maxlen == 0 or seq.completion_tokens == 0:
            return
        if seq.follow_up is not None:
            answer, follow_up = "".join(seq.answer), seq.follow_up
            make = lambda: follow_up(answer)  # noqa: E731
        else:
            ids = seq.prompt_ids + seq.text.token_ids
            make = lambda: ids  # noqa: E731
        self.idle_jobs.append(IdleJob(make, seq.adapter))

    def _idle_step(self) -> None:
        """One step of idle prefill: start the newest job (one job looked at a step: a stale one is dropped),
        or compute the next chunk of the running one and store its whole blocks so far. A failure drops the
        job (logged); requests are not touched."""
        try:
            if self.idle_seq is None:
                # marked as the running job before it leaves the queue: stats() never misses it
                self.idle_job = self.idle_jobs[-1]
                self._start_idle(self.idle_jobs.pop())
                return
            seq = self.idle_seq
            self._prefill_step([seq], max_tokens=1, counters="idle_prefill")  # one chunk
            pc, hidden = self.prefix_cache, torch.cat(seq.hidden, dim=1)
            seq.hidden = [hidden]
            pc.store(seq.keys[: seq.pos // pc.block_tokens], self._rows(IDLE_SLOT, IDLE_SLOT + 1), 0, hidden[0])
            if seq.pos == len(seq.prompt_ids):
                self._end_idle()
        except Exception:
            traceback.print_exc()
            self._end_idle()

    def _start_idle(self, job: IdleJob) -> None:
        """Put ``job`` in slot IDLE_SLOT from where the prefix cache leaves off, unless all its whole blocks
        are cached already (a stale job: dropped) or it would pass the KV cache budget."""
        if job.ids is None:
            job.ids = list(job.make())[: self.window]
        keys = self._block_keys(job.ids, job.adapter)
        if self.prefix_cache.cached_run(keys) == len(keys) or len(job.ids) > self.kv_positions:
            self.idle_job = None
            return
        seq = Request(job.ids, SamplingParams(), lambda event: None, adapter=job.adapter, idle=True,
                      slot=IDLE_SLOT, keys=keys)
        self.idle_seq = seq
        self._restore_prefix(seq, keys)
        seq.pos, seq.prefilling = seq.cached_tokens, True
        self.counters["idle_prefill_jobs"] += 1

    def _pause_idle(self) -> None:
        """A request came: the running job's blocks so far are stored already; it goes back to the queue
        (newest), to go on from the cache when the engine is idle again."""
        self.idle_jobs.append(self.idle_job)
        self._end_idle()

    def _end_idle(self) -> None:
        if self.idle_seq is not None:
            self._release(IDLE_SLOT)
        self.idle_seq = self.idle_job = None

    def _observe_token(self, seq: Request) -> None:
        """Token and latency metrics for the request's newest token."""
        now = time.monotonic()
        m = self.metrics
        m.generation_tokens.inc()
        (m.ttft.observe(now - seq.arrived) if seq.completion_tokens == 1 else m.itl.observe(now - seq.last_token_at))
        seq.last_token_at = now

    def _observe_end(self, seq: Request, reason: str) -> None:
        """Outcome and latency metrics of a request that ended."""
        self.metrics.finished[reason].inc()
        self.metrics.e2e.observe(time.monotonic() - seq.arrived)

    def _decode_step(self, running: list[Request]) -> None:
        """One new token for every running request, rows at their own positions; with a draft, each
        speculating request's guesses too (one more token per accepted guess)."""
        t0, c0 = time.perf_counter(), time.thread_time()
        rows = max(s.slot for s in running) + 1  # free slots below it ride along as dummy rows
        guesses = self._guesses(running, rows)
        width = 1 + max((len(g) for g, _ in guesses.values()), default=0)
        tokens = torch.zeros(rows, width, dtype=torch.long)
        # dummy rows and filler write at positions past their row's own (clamped to the window, which
        # a request's real positions never reach: its last token is never fed), read by nobody
        positions = torch.arange(width).clamp_max(self.window - 1).repeat(rows, 1)
        for s in self.slots[:rows]:  # a slot whose prompt is going in: past what it holds, written again later
            if s is not None and s.prefilling:
                positions[s.slot] = torch.arange(s.pos, s.pos + width).clamp_max(self.window - 1)
        for s in running:
            g = guesses.get(s, ([], None))[0]
            tokens[s.slot] = torch.tensor([s.next_token, *g, *[s.next_token] * (width - 1 - len(g))])
            positions[s.slot] = torch.arange(s.pos, s.pos + width).clamp_max(self.window - 1)
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        # batch rows per pass: <= MAX_KERNEL_ROWS input rows for the CPU kernels; a GPU takes them all at once
        per = max(1, MAX_KERNEL_ROWS // width) if self.device.type == "cpu" else rows
        logits = []
        for a in range(0, rows, per):
            b = min(a + per, rows)
            logits.append(self.model(tokens[a:b], input_pos=positions[a:b], cache=self._rows(a, b),
                                     adapters=self._adapters(running, a, b)))
        logits = torch.cat(logits)
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(running))
        made = 0
        for s in running:
            if s in guesses:
                made += self._check_guesses(s, logits[s.slot], *guesses[s])
            else:
                s.pos += 1
                self._take(s, logits[s.slot : s.slot + 1, 0])
                made += 1
        self.counters["decode_tokens"] += made
        self.counters["decode_s"] += time.perf_counter() - t0
        self.counters["decode_cpu_s"] += time.thread_time() - c0

    @staticmethod
    def _adapters(seqs: list[Request], a: int, b: int) -> dict | None:
        """The LoRA updates of a pass over slots ``[a, b)`` by the pass's row (slot - a), from those of
        ``seqs`` that have an adapter; None when no row has one."""
        rows = {s.slot - a: s.adapter.layers for s in seqs if s.adapter is not None and a <= s.slot < b}
        return rows or None

    def _guesses(self, running: list[Request], rows: int) -> dict[Request, tuple[list[int], torch.Tensor | None]]:
        """Each speculating request's guesses for this step (requests without any are left out), at most
        as many as keep ``rows`` rows of ``1 + k`` positions within one pass of ``MAX_KERNEL_ROWS`` rows."""
        k = 0 if self.draft is None else min(self.draft.num_tokens, MAX_KERNEL_ROWS // rows - 1)
        out = {}
        for s in running if k > 0 else ():
            n = min(k, s.sampler.total - s.pos - 2)  # the last guess's position may not be the last of the window
            if s.draft is not None and n > 0:
                g, q = s.draft.propose(s.sampler.tokens, n, s.params, self.vocab_size, s.sampler.generator)
                if g:
                    out[s] = (g, q)
        return out

    def _check_guesses(self, seq: Request, logits: torch.Tensor, guesses: list[int], q: torch.Tensor | None) -> int:
        """The request's tokens from its verification row ``logits`` (width, V) (the accepted guesses and
        the model's own next one), passed on one by one; the number of tokens made."""
        made = 0
        for t in verify(logits, guesses, q, seq.sampler):
            # a token equal to its guess is an accepted one (a rejected guess is never drawn again)
            self.counters["draft_accepted"] += made < len(guesses) and t == guesses[made]
            seq.pos += 1
            self._emit(seq, t, logits[made : made + 1])
            made += 1
            if seq.text.done:
                break
        self.counters["draft_proposed"] += len(guesses)
        return made

    def _logprobs(self, logits: torch.Tensor, targets: Sequence[int], k: int) -> list[TokenLogprob]:
        """Log-probabilities of ``targets[i]`` under ``logits[i]`` (rows past the targets are ignored) and
        the ``k`` most likely tokens of each row.

        The model's distribution: log-softmax of the raw logits over the model's whole output, before
        repetition penalty, temperature, top-k or top-p (what a direct forward pass and lm-eval's own
        models compute). Alternatives come from the tokenizer's ids, which are all the sampler draws."""
        n = len(targets)
        lp = torch.log_softmax(logits[:n].float(), dim=-1)
        chosen = lp.gather(-1, torch.tensor(targets, dtype=torch.long, device=lp.device)[:, None])[:, 0].tolist()
        top_v, top_i = lp[:, : self.vocab_size].topk(k, dim=-1)
        top_v, top_i = top_v.tolist(), top_i.tolist()
        return [TokenLogprob(t, c, list(zip(ti, tv))) for t, c, ti, tv in zip(targets, chosen, top_i, top_v)]

    def _take(self, seq: Request, logits: torch.Tensor) -> None:
        """Sample the request's next token from its (1, V) logits, pass its text on, and end it if done."""
        t = seq.sampler.sample(logits)
        seq.sampler.accept(t)
        self._emit(seq, t, logits)

    def _emit(self, seq: Request, t: int, logits: torch.Tensor) -> None:
        """The request's next token ``t`` (accepted by its sampler), which the model's (1, V) ``logits``
        gave: pass its text (and logprobs) on, and end the request if done."""
        seq.completion_tokens += 1
        self._observe_token(seq)
        if seq.logprobs is not None:
            seq.pending += self._logprobs(logits, [t], seq.logprobs)
        piece = seq.text.push(t)
        if not seq.text.done and seq.sampler.full:
            piece += seq.text.finish("length")
        if piece:
            seq.answer.append(piece)
            self._send(seq, Event(text=piece, logprobs=self._released(seq)))
        if seq.text.done:  # the slot is free before the client hears that the answer is complete
            self._free(seq)
            self._observe_end(seq, seq.text.finish_reason)
            self._queue_idle(seq)
            self._send(seq, Event(finish_reason=seq.text.finish_reason, prompt_tokens=len(seq.prompt_ids),
                                  completion_tokens=seq.completion_tokens, logprobs=self._released(seq),
                                  cached_tokens=seq.cached_tokens))
            return
        seq.next_token = t


def _rows_called(rows: int) -> int:
    """The rows to call a linear layer with for ``rows`` rows of prompt chunks longer than MAX_KERNEL_ROWS
    (rows independent): a PackedLinear hands the last ``rows % PREFILL_CHUNK`` rows of a longer call, when
    there are at most MAX_KERNEL_ROWS of them, to the decode kernel (what a lone prompt's short last chunk
    gets), so such a call is padded past that; each chunk then takes its lone pass's path."""
    tail = rows % PREFILL_CHUNK
    return rows + MAX_KERNEL_ROWS + 1 - tail if rows > PREFILL_CHUNK and 0 < tail <= MAX_KERNEL_ROWS else rows
