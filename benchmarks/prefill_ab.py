"""Prefill head to head in one process: two runtimes take turns on the same 128-token prompt.

``decode_speed.py`` runs each row in a process of its own, one after the other, so two rows are
measured minutes apart. On a shared CPU that is not enough: on this project's AMX machine the tile
unit's throughput halved for seconds at a time (2.4 -> 1.05 TFLOP/s in a loop of tile multiplies)
while scalar code ran unchanged, and a 36-layer prompt took transformers 1522 ms in one run and
2583 ms in another. Here both models are loaded side by side and prompt i of one runs right after
prompt i of the other, so a slow spell falls on both; the table gives each one's fastest, median and
slowest prompt and how often it was ahead in a pair.

    python benchmarks/prefill_ab.py --layers 36 --pair jneox:bfloat16,transformers:bfloat16 --prompts 9
    python benchmarks/prefill_ab.py --layers 36 --pair jneox:int8,ctranslate2:int8 --tf4 DIR

Both models stay in memory: the 36-layer bf16 pair takes ~15 GB. The checkpoint and the CTranslate2
conversion are the ones ``decode_speed.py`` makes (same folder, same prompt).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from decode_speed import (BENCH_DIR, bench_checkpoint, convert_ct2, cpu_description, ct2_prompt, jneox_prompt,
                          prompt_ids, transformers_prompt)


def jneox_runner(ckpt: Path, fmt: str, P: int):
    from jneox.loading import load_model

    model = load_model(ckpt, weights=fmt)
    ids = torch.tensor([prompt_ids(P, model.config.vocab_size)])
    cache = model.new_cache(1, P)
    model(ids[:, :8], input_pos=torch.arange(8), last_only=True, cache=cache)  # kernel build and load
    return jneox_prompt(model, ids, cache)


def transformers_runner(ckpt: Path, fmt: str, P: int):
    from transformers import GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, fmt)).eval()
    ids = torch.tensor([prompt_ids(P, model.config.vocab_size)])
    model(ids[:, :8])
    return transformers_prompt(model, ids)


def ctranslate2_runner(ckpt: Path, fmt: str, P: int, ct2_dir: Path):
    import ctranslate2

    from jneox.loading import load_tokenizer

    tok = load_tokenizer(ckpt)
    gen = ctranslate2.Generator(str(ct2_dir), device="cpu", compute_type=fmt, intra_threads=torch.get_num_threads())
    prompt = [tok.id_to_piece(i) for i in prompt_ids(P, tok.vocab_size)]
    gen.generate_batch([prompt[:8]], max_length=1, sampling_topk=1)
    return ct2_prompt(gen, prompt)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", default="jneox:bfloat16,transformers:bfloat16",
                   help="two RUNTIME:FORMAT rows (runtimes: jneox, transformers, ctranslate2)")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=9, help="prompts each runtime times, taking turns")
    p.add_argument("--threads", type=int)
    p.add_argument("--work", type=Path, default=BENCH_DIR)
    p.add_argument("--tf4", type=Path, help="folder with transformers<5 for CTranslate2's converter")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = args.pair.split(",")
    if len(rows) != 2:
        raise SystemExit(f"--pair takes two RUNTIME:FORMAT rows, got {args.pair!r}")
    work = args.work.expanduser()
    ckpt = bench_checkpoint(work, args.layers)
    runners = {}
    # the warm-ups too: with autograd on, jneox's packed layers multiply a widened fp32 weight, and the KV
    # cache the warm-up writes keeps that graph (14 GB for 36 bf16 layers), which pushed transformers'
    # file-mapped weights out of memory (its prompts took 6 s instead of 2)
    torch.set_grad_enabled(False)
    for row in rows:
        runtime, _, fmt = row.partition(":")
        print(f"loading {row} ...", flush=True)
        if runtime == "jneox":
            runners[row] = jneox_runner(ckpt, fmt, args.prompt_tokens)
        elif runtime == "transformers":
            runners[row] = transformers_runner(ckpt, fmt, args.prompt_tokens)
        elif runtime == "ctranslate2":
            ct2_dir = work / f"ct2-int8-L{args.layers}"
            why = convert_ct2(ckpt, ct2_dir, args.tf4)
            if why:
                raise SystemExit(f"{row}: {why}")
            runners[row] = ctranslate2_runner(ckpt, fmt, args.prompt_tokens, ct2_dir)
        else:
            raise SystemExit(f"{row}: unknown runtime {runtime!r} (jneox, transformers, ctranslate2)")
    times = {row: [] for row in rows}
    for i in range(args.prompts):
        for row in rows if i % 2 == 0 else rows[::-1]:  # each goes first in every other pair
            t = time.perf_counter()
            runners[row]()
            times[row].append((time.perf_counter() - t) * 1e3)
        print(f"prompt {i + 1}: " + ", ".join(f"{row} {times[row][-1]:.0f} ms" for row in rows), flush=True)
    a, b = rows
    print(f"\n{cpu_description()}")
    print(f"{args.layers} layers, {args.prompt_tokens}-token prompt, {torch.get_num_threads()} threads, "
          f"{args.prompts} prompts each, taking turns\n")
    print("| runtime | fastest ms | median ms | slowest ms | ahead in pairs |")
    print("|---|---|---|---|---|")
    for row, other in ((a, b), (b, a)):
        ts, wins = times[row], sum(x < y for x, y in zip(times[row], times[other]))
        print(f"| {row} | {min(ts):.0f} | {statistics.median(ts):.0f} | {max(ts):.0f} | {wins} of {len(ts)} |")
    print(f"\n{a} / {b}: fastest {min(times[b]) / min(times[a]):.2f}x, "
          f"median {statistics.median(times[b]) / statistics.median(times[a]):.2f}x (above 1: {a} is faster)")


if __name__ == "__main__":
    main()
