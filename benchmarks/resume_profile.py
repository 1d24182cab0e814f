"""Where a chat turn's prefill time goes when the prefix cache holds most of its prompt: the engine's
prefill of a prompt's last ``--new`` tokens after ``--seen`` cached ones (a chat's late turn), and of
the same tokens as the start of a cold prompt, split into the linear layers (the output layer apart),
attention, the prefix cache's copies (cached blocks into the request's slot, its new blocks out), and the
rest (layer norms, GELU, embedding, rotary, the engine's own work).

In-process, on the 3.6B shape with random weights (``--layers`` deep, the checkpoint that
``decode_speed.py`` makes), one engine driven step by step without its thread. Figures are CPU time of
the process (all threads; ``--threads 1`` makes that the engine's), the best of ``--repeat`` runs;
prints a markdown table.

    python benchmarks/resume_profile.py --layers 36 --dtype int8 --threads 1 --seen 912 --new 111
"""
from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import torch
from decode_speed import BENCH_DIR, bench_checkpoint

import jneox
from jneox.model import Attention
from jneox.quantize import PackedLinear
from jneox.sampling import SamplingParams
from jneox.serve import Engine
from jneox.serve.prefix_cache import PrefixCache


class Timers:
    """CPU seconds spent inside wrapped callables, by name (outermost call only)."""

    def __init__(self):
        self.spent, self.depth = collections.Counter(), 0

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            if self.depth:
                return fn(*args, **kwargs)
            self.depth += 1
            c0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] += time.process_time() - c0
                self.depth -= 1
        return timed


def run(engine: Engine, ids: list[int]) -> int:
    """Submit ``ids`` (one token to generate) and step the engine until it is done; its cached tokens."""
    events = []
    engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=1), events.append)
    with torch.inference_mode():
        while not (events and events[-1].final):
            engine.step(wait=False)
    assert events[-1].error is None, events[-1].error
    return events[-1].cached_tokens or 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="int8")
    p.add_argument("--threads", type=int)
    p.add_argument("--seen", type=int, default=912, help="prompt tokens a previous turn prefilled (default 912)")
    p.add_argument("--new", type=int, default=111, help="tokens after them (default 111)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--work", type=Path, default=BENCH_DIR)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = bench_checkpoint(args.work, args.layers)
    model, tokenizer = jneox.load(ckpt, weights=args.dtype)
    head = model.lm_head
    timers = Timers()
    PackedLinear.forward = timers.wrap("linear", PackedLinear.forward)
    Attention.attend = timers.wrap("attention", Attention.attend)
    head.forward = timers.wrap("output layer", head.forward)
    PrefixCache.restore = timers.wrap("cache copies", PrefixCache.restore)
    PrefixCache.store = timers.wrap("cache copies", PrefixCache.store)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 30000, (args.seen + args.new,), generator=gen).tolist()
    rows = {}
    for case in ("resumed", "cold"):
        best = None
        for _ in range(args.repeat):
            engine = Engine(model, tokenizer, max_batch=1, prefix_cache_mb=4096, idle_prefill=0)
            ids = prompt if case == "resumed" else prompt[args.seen :]
            if case == "resumed":
                run(engine, prompt[: args.seen])
            timers.spent.clear()
            c0 = time.process_time()
            cached = run(engine, ids)
            total = time.process_time() - c0
            if best is None or total < best[0]:
                best = (total, dict(timers.spent), cached, len(ids))
        rows[case] = best
    print(f"\n{args.layers} layers, {args.dtype}, {torch.get_num_threads()} threads; a prompt of {args.seen} + {args.new} "
          f"tokens with the first {args.seen} prefilled before (resumed), and its last {args.new} tokens as a prompt "
          f"of their own (cold); CPU s, best of {args.repeat}\n")
    parts = ("linear", "output layer", "attention", "cache copies")
    print("| case | prompt tokens | cached | computed | total CPU s | " + " | ".join(parts) + " | rest | "
          "ms per computed token |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(parts) + "---:|---:|")
    for case, (total, spent, cached, n) in rows.items():
        print(f"| {case} | {n} | {cached} | {n - cached} | {total:.2f} | "
              + " | ".join(f"{spent.get(k, 0):.2f}" for k in parts)
              + f" | {total - sum(spent.get(k, 0) for k in parts):.2f} | {1e3 * total / (n - cached):.1f} |")


if __name__ == "__main__":
    main()
