#!/usr/bin/env python3
"""Speculative decoding with prompt lookup: tokens gained per pass, and what a pass of k+1 rows costs.

Two measurements, printed as tables:

1. **Acceptance**, on a trained model (default: the shipped demo model), greedy: for each task,
   new tokens, passes of the model with and without ``--speculate lookup``, tokens per pass, and
   wall-clock tok/s both ways. Tasks: ``copy`` (read a passage and answer with a quote from it, the
   shape of JSQuAD; or repeat it), and ``chat`` (the held-out-style questions the demo model was
   fine-tuned on, where little is copied). The greedy tokens must be identical both ways; the
   script stops if they are not.
2. **Cost of a pass of 1 + k rows** against one row, at the published 3.6B shape (random weights,
   ``--layers`` of the 36, the same checkpoint as ``decode_speed.py``), for each weight format, and
   the speed-up it predicts at the 3.6B shape: tokens per pass ÷ cost ratio.

    .venv/bin/python benchmarks/speculative.py                       # demo model + 2 layers of the 3.6B shape
    .venv/bin/python benchmarks/speculative.py --layers 36 --formats bfloat16,int8,int4
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_speed import make_checkpoint  # noqa: E402

from jneox.chat import format_prompt  # noqa: E402
from jneox.checkpoint import load, load_model  # noqa: E402
from jneox.generate import SamplingParams, generate_tokens  # noqa: E402
from jneox.speculative import PromptLookup  # noqa: E402


def task_questions(limit: int) -> dict[str, list[str]]:
    """The user's turn of each task, built from the demo recipe's hand-written conversations: their
    answers are the passages (``copy`` quotes one; ``chat`` asks the question alone)."""
    convs = []
    for f in sorted((ROOT / "recipes" / "demo" / "data" / "conversations").glob("*.jsonl")):
        convs += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    convs = convs[::max(1, len(convs) // limit)][:limit]
    copy, chat = [], []
    for turns in convs:
        question, passage = turns[0]["text"], turns[1]["text"]
        copy.append(f"次の文章を読んで、質問に文章の言葉で答えてください。\n文章: {passage}\n質問: {question}")
        chat.append(question)
    return {"copy": copy, "chat": chat}


def task_prompts(limit: int) -> dict[str, list[str]]:
    """:func:`task_questions` as prompts in the conversation format."""
    return {task: [format_prompt([{"speaker": "ユーザー", "text": q}]) for q in qs]
            for task, qs in task_questions(limit).items()}


class Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner, self.calls = model, 0
        self.config, self.embed = model.config, model.embed

    def new_cache(self, *a, **k):
        return self.inner.new_cache(*a, **k)

    def forward(self, *a, **k):
        self.calls += 1
        return self.inner(*a, **k)


def acceptance(args) -> list[dict]:
    model, tok = load(args.model, weights=args.demo_dtype)
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens)
    rows = []
    for task, prompts in task_prompts(args.prompts).items():
        stats = {"task": task, "prompts": len(prompts), "tokens": 0, "plain_passes": 0, "spec_passes": 0,
                 "plain_s": 0.0, "spec_s": 0.0}
        for prompt in prompts:
            ids = tok.encode(prompt)
            for mode in ("plain", "spec"):
                counted = Counting(model)
                draft = PromptLookup(args.draft_tokens) if mode == "spec" else None
                t = time.perf_counter()
                out = list(generate_tokens(counted, ids, params, tok.eos_id, tok.vocab_size, draft))
                stats[f"{mode}_s"] += time.perf_counter() - t
                stats[f"{mode}_passes"] += counted.calls - (1 if mode == "plain" else int(len(ids) > 1))
                if mode == "plain":
                    want = out
                elif out != want:
                    raise SystemExit(f"greedy tokens differ with speculation on {task}: {prompt!r}")
            stats["tokens"] += len(want)
        rows.append(stats)
    return rows


@torch.inference_mode()
def pass_cost(args) -> list[dict]:
    ckpt = make_checkpoint(args.work / f"gptneox-3.6b-shape-{args.layers}l", args.layers)
    rows = []
    for fmt in args.formats.split(","):
        model = load_model(ckpt, weights=fmt)
        cache = model.new_cache(1, 512)
        vocab = model.config.vocab_size
        ids = torch.randint(4, vocab, (1, 256), generator=torch.Generator().manual_seed(0))
        model(ids, input_pos=torch.arange(256), last_only=True, cache=cache)
        row = {"format": fmt}
        for k in [0, *args.ks]:
            x = torch.randint(4, vocab, (1, k + 1))
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                model(x, input_pos=torch.arange(256, 257 + k), cache=cache)
                best = min(best, time.perf_counter() - t)
            row[k] = best * 1e3
        rows.append(row)
        del model, cache
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "demo"))
    p.add_argument("--demo-dtype", default="float32")
    p.add_argument("--prompts", type=int, default=12, help="prompts per task")
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--draft-tokens", type=int, default=5)
    p.add_argument("--layers", type=int, default=2, help="layers of the 3.6B shape for the pass-cost table (0: skip)")
    p.add_argument("--formats", default="bfloat16,int8,int4")
    p.add_argument("--ks", default="1,3,5,7", help="guesses per pass to time")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work", type=Path, default=Path(os.environ.get("JNEOX_BENCH_DIR", "~/.cache/jneox/bench")))
    args = p.parse_args()
    args.work = args.work.expanduser()
    args.ks = [int(k) for k in args.ks.split(",")]
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f.startswith(("avx512", "avx2", "amx"))}) \
        if Path("/proc/cpuinfo").exists() else []
    print(f"CPU flags: {' '.join(flags) or 'unknown'}; torch threads {torch.get_num_threads()}\n")

    acc = acceptance(args)
    print(f"Prompt lookup ({args.draft_tokens} guesses per pass), greedy, {Path(args.model).name} "
          f"({args.demo_dtype}), {args.new_tokens} new tokens at most; tokens identical both ways\n")
    print("| task | prompts | new tokens | passes plain | passes lookup | tokens per pass | tok/s plain | tok/s lookup | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in acc:
        tpp = r["tokens"] / r["spec_passes"]
        a, b = r["tokens"] / r["plain_s"], r["tokens"] / r["spec_s"]
        r["tokens_per_pass"] = tpp
        print(f"| {r['task']} | {r['prompts']} | {r['tokens']} | {r['plain_passes']} | {r['spec_passes']} | {tpp:.2f} "
              f"| {a:.1f} | {b:.1f} | {b / a:.2f}× |")
    if args.layers <= 0:
        return
    cost = pass_cost(args)
    print(f"\nOne pass at the 3.6B shape ({args.layers} of 36 layers, random weights, 256 tokens cached): ms for "
          f"1 row and for 1 + k rows; predicted speed-up = tokens per pass ÷ cost ratio at k = {args.draft_tokens}\n")
    head = " | ".join(f"1+{k} rows" for k in args.ks)
    print(f"| weights | 1 row | {head} | " + " | ".join(f"predicted, {r['task']}" for r in acc) + " |")
    print("|---|---|" + "---|" * len(args.ks) + "---|" * len(acc))
    for row in cost:
        ratio = row[args.draft_tokens] / row[0] if args.draft_tokens in row else float("nan")
        cells = " | ".join(f"{row[k]:.1f} ({row[k] / row[0]:.2f}×)" for k in args.ks)
        pred = " | ".join(f"{r['tokens_per_pass'] / ratio:.2f}×" for r in acc)
        print(f"| {row['format']} | {row[0]:.1f} | {cells} | {pred} |")


if __name__ == "__main__":
    main()
