"""Where a server's time goes, step by step: the engine's prompt and decode steps timed in-process on the
3.6B shape (random weights, ``--layers`` deep), without HTTP or clients.

For ``--prompts`` prompts of ``--prompt-tokens`` tokens each: one prompt's prefill step alone, the
prompts' prefill one request per step (as before prompts were batched) and all in one step (the
engine's batched pass), then one decode step of 1 row and of ``--prompts`` rows. Each figure is CPU time
of the process, all its threads (what a shared machine disturbs least) and
wall time, the best of ``--repeat`` runs; prints a markdown table. ``--profile`` then also profiles
one prefill step of the ``--prompts`` prompts in one step and of one ``--profile-tokens`` prompt
(torch.profiler): a table of the operations by self time, every packed linear layer's kernel call as
one row per weight shape (its own time, without the PyTorch operations inside it).

    python benchmarks/serve_steps.py --layers 36 --dtype int8 --threads 1 --profile
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from decode_speed import BENCH_DIR, bench_checkpoint
from torch.profiler import ProfilerActivity, profile, record_function

import jneox
from jneox.quantize import PackedLinear
from jneox.sampling import SamplingParams
from jneox.serve import Engine


def timed(fn, repeat: int) -> tuple[float, float]:
    """Best CPU (all threads) and wall seconds of ``fn()`` (which sets up and runs one measured step) over ``repeat`` runs."""
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        setup, run = fn()
        setup()
        c0, t0 = time.process_time(), time.perf_counter()
        run()
        best = min(best, (time.process_time() - c0, time.perf_counter() - t0))
    return best


def admitted(engine: Engine, prompts: list[list[int]]) -> list:
    """The prompts queued, admitted and started, as the engine thread does before a prefill step."""
    for ids in prompts:
        engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=8), lambda event: None)
    with engine.cond:
        seqs = engine._admit()
    for seq in seqs:
        engine._start(seq)
    return seqs


def reset(engine: Engine) -> None:
    for seq in [s for s in engine.slots if s is not None]:
        engine._free(seq)


def kernel_ranges(model) -> None:
    """Each packed linear layer's call as a profiler range named by its shape (forward hooks), so that its
    kernel's time, which runs outside any PyTorch operation, shows as that range's own time."""
    def pre(module, args):
        module._range = record_function(f"linear {module.in_features}->{module.out_features} ({module.fmt} kernel)")
        module._range.__enter__()

    def post(module, args, out):
        module._range.__exit__(None, None, None)

    for module in model.modules():
        if isinstance(module, PackedLinear):
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)


def profiled(engine: Engine, prompts: list[list[int]], rows: int = 14) -> str:
    """One prefill step of ``prompts`` under torch.profiler (after one unprofiled run): a markdown table of
    the operations by self time."""
    for run in range(2):
        reset(engine)
        seqs = admitted(engine, prompts)
        if run == 0:
            engine._prefill_step(seqs)
            continue
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine._prefill_step(seqs)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["| operation | calls | self s | share |", "|---|---:|---:|---:|"]
    for e in events[:rows]:
        lines.append(f"| {e.key} | {e.count} | {e.self_cpu_time_total / 1e6:.3f} | {e.self_cpu_time_total / total:.0%} |")
    rest = sum(e.self_cpu_time_total for e in events[rows:])
    lines.append(f"| (the rest) | | {rest / 1e6:.3f} | {rest / total:.0%} |")
    lines.append(f"| total | | {total / 1e6:.3f} | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="int8")
    p.add_argument("--threads", type=int)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=33, help="tokens per prompt (the chat prompts of serve_load.py: 27-37)")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also print where a prefill step's time goes, per operation")
    p.add_argument("--profile-tokens", type=int, default=128, help="the lone prompt's tokens for --profile")
    p.add_argument("--work", type=Path, default=BENCH_DIR)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = bench_checkpoint(args.work, args.layers)
    model, tokenizer = jneox.load(folder, weights=args.dtype)
    engine = Engine(model, tokenizer, max_batch=args.prompts, prefix_cache_mb=0,
                    max_prefill_tokens=args.prompts * args.prompt_tokens)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 30000, (args.prompt_tokens,), generator=gen).tolist() for _ in range(args.prompts)]
    rows = []
    with torch.inference_mode():
        def one():
            state = {}
            return (lambda: (reset(engine), state.update(seqs=admitted(engine, prompts[:1])))), \
                   (lambda: engine._prefill_step(state["seqs"]))

        def each():
            state = {}
            return (lambda: (reset(engine), state.update(seqs=admitted(engine, prompts)))), \
                   (lambda: [engine._prefill_step([s]) for s in state["seqs"]])

        def together():
            state = {}
            return (lambda: (reset(engine), state.update(seqs=admitted(engine, prompts)))), \
                   (lambda: engine._prefill_step(state["seqs"]))

        def decode(n):
            def fn():
                state = {}

                def setup():
                    reset(engine)
                    seqs = admitted(engine, prompts[:n])
                    engine._prefill_step(seqs)
                    state["seqs"] = seqs
                return setup, (lambda: engine._decode_step(state["seqs"]))
            return fn

        n, t = args.prompts, args.prompt_tokens
        rows.append((f"prefill: 1 prompt of {t} tokens", *timed(one, args.repeat), t))
        rows.append((f"prefill: {n} prompts, one step each", *timed(each, args.repeat), n * t))
        rows.append((f"prefill: {n} prompts in one step", *timed(together, args.repeat), n * t))
        rows.append(("decode step: 1 row", *timed(decode(1), args.repeat), 1))
        rows.append((f"decode step: {n} rows", *timed(decode(n), args.repeat), n))
    print(f"\nengine steps, random weights, 3.6B shape with {args.layers} layers, {args.dtype}, "
          f"{torch.get_num_threads()} threads; best of {args.repeat}\n")
    print("| step | CPU s | wall s | tokens | CPU ms per token |")
    print("|---|---:|---:|---:|---:|")
    for name, cpu, wall, tokens in rows:
        print(f"| {name} | {cpu:.2f} | {wall:.2f} | {tokens} | {cpu / tokens * 1e3:.0f} |")
    if args.profile:
        kernel_ranges(model)
        lone = torch.randint(10, 30000, (args.profile_tokens,), generator=gen).tolist()
        with torch.inference_mode():
            for name, batch in ((f"{n} prompts of {t} tokens in one step", prompts), (f"1 prompt of {args.profile_tokens} tokens", [lone])):
                print(f"\nprefill step, {name}: self time per operation (torch.profiler)\n")
                print(profiled(engine, batch))


if __name__ == "__main__":
    main()
