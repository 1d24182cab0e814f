#!/usr/bin/env python3
"""Speculative decoding: tokens gained per pass, what a pass of 1 + k rows costs, and the decode speed-up.

Three measurements, printed as tables:

1. **Acceptance**, greedy, on a trained model (default: the shipped demo model; the README's figures
   use the demo model fine-tuned to copy, see ``recipes/demo/copy_tune.sh``): for each task, new
   tokens, passes of the model, tokens per pass and decode tok/s (``--clock``; after the prompt's pass,
   which is run once per prompt and replayed for the other runs), plain and with each guesser
   (prompt lookup with k = 3, 5, 8 guesses per pass; ``--draft`` a smaller model with the same
   ``spiece.model``). Tasks, from held-out conversations only (never trained on): ``copy`` (extractive
   QA over three passages as JSQuAD, repeating a passage, fixing its typos: the answer quotes the
   prompt) and ``chat`` (the conversation's first question alone: little to copy). The greedy tokens
   must be identical with and without speculation; the script stops if they are not. The
   "reference answers" rows replay prompt lookup against the tasks' reference answers (no model
   pass): what a model whose greedy answer is the reference would accept, i.e. one that copies.
2. **Cost of a pass of 1 + k rows** against one row, at the published 3.6B shape (random weights,
   ``--layers`` of the 36, the checkpoint ``decode_speed.py`` uses), for each weight format, with
   256 tokens in the KV cache.
3. **Projected decode speed-up at the 3.6B shape** = tokens per pass (1) × 1-row pass time ÷
   (1 + k)-row pass time (2). Conservative for prompt lookup: a pass with fewer guesses than k (no
   match long enough) is charged as a full 1 + k rows. Not projected for a draft model, whose own
   passes cost depends on its size.

    .venv/bin/python benchmarks/speculative.py                       # demo model + 2 layers of the 3.6B shape
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/speculative.py --model COPY --draft models/demo --prompts 12 --clock cpu
    .venv/bin/python benchmarks/speculative.py --model COPY --layers 36   # idle machine

End to end at the 3.6B cost: the copy-tuned demo model (``recipes/demo/copy_tune.sh COPY``) widened
to the 3.6B shape with the same function (``benchmarks/widen.py COPY WIDE``), with itself at its
own size as the draft (an upper bound on a draft's acceptance: it is the target's function):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/speculative.py --model WIDE --demo-dtype bfloat16 \
        --draft COPY --draft-dtype float32 --prompts 8 --new-tokens 48 --layers 0 --tasks copy
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from difflib import SequenceMatcher
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "recipes" / "demo"))
from decode_speed import BENCH_DIR, bench_checkpoint, cpu_description  # noqa: E402
from make_copy_data import DEFAULT_CONVERSATIONS, conversation_files, copy_conversations, split  # noqa: E402

from jneox.chat import format_prompt  # noqa: E402
from jneox.loading import load, load_config, load_model  # noqa: E402
from jneox.generate import generate_tokens  # noqa: E402
from jneox.sampling import SamplingParams
from jneox.speculative import DraftModel, PromptLookup  # noqa: E402


def task_conversations(limit: int) -> dict[str, list[list]]:
    """The held-out tasks (the demo model's SFT split, never trained on) as (question, reference) turns."""
    _, heldout = split(conversation_files([DEFAULT_CONVERSATIONS]))
    copy = copy_conversations(heldout, 1, seed=1)  # the recipe's heldout.jsonl
    return {"copy": [c[:2] for c in copy[:limit]], "chat": [c[:2] for c in heldout[:limit]]}


def task_questions(limit: int) -> dict[str, list[str]]:
    """The user's turn of each task (``benchmarks/serve_load.py --task copy`` sends these)."""
    return {task: [c[0].text for c in convs] for task, convs in task_conversations(limit).items()}


def task_prompts(limit: int) -> dict[str, list[tuple[str, str]]]:
    """(prompt in the conversation format, reference answer) of each task."""
    return {task: [(format_prompt(c[:1]), c[1].text) for c in convs] for task, convs in task_conversations(limit).items()}


def reference_passes(prompt: list[int], answer: list[int], guesser: PromptLookup) -> int:
    """Passes greedy speculation would take for a model whose greedy answer is ``answer``: each pass
    keeps the guesses that match the answer, plus the model's own next token."""
    done, passes = 0, 0
    while done < len(answer):
        guesses, _ = guesser.propose(prompt + answer[:done], guesser.num_tokens, None, None, None)
        ok = 0
        while ok < len(guesses) and done + ok < len(answer) and guesses[ok] == answer[done + ok]:
            ok += 1
        done, passes = done + ok + 1, passes + 1
    return passes


class Counting(torch.nn.Module):
    """The model, counting its passes and timing its prompt passes apart. With ``prompts`` (a dict
    shared between runs), a prompt's pass is run once and its logits and KV cache replayed after:
    the same bits (plain and speculative decoding both make the prompt's pass this way), without
    paying a 3.6B prefill again for each guesser."""

    def __init__(self, model, clock, prompts: dict | None = None):
        super().__init__()
        self.inner, self.calls, self.clock, self.prompts, self.prompt_s = model, 0, clock, prompts, 0.0
        self.config, self.embed = model.config, model.embed

    def new_cache(self, *a, **k):
        return self.inner.new_cache(*a, **k)

    def forward(self, idx, input_pos=None, last_only=False, cache=None, **k):
        self.calls += 1
        if input_pos is None or cache is None or int(input_pos[0]) != 0:
            return self.inner(idx, input_pos, last_only, cache, **k)
        t, n = self.clock(), idx.shape[1]
        key = tuple(idx[0].tolist())
        if self.prompts is None or key not in self.prompts:
            logits = self.inner(idx, input_pos, last_only, cache, **k)
            if self.prompts is not None:
                self.prompts[key] = (logits.clone(), [(c.k[:, :, :n].clone(), c.v[:, :, :n].clone()) for c in cache])
        else:
            logits, kv = self.prompts[key]
            for c, (keys, values) in zip(cache, kv):
                c.k[:, :, :n], c.v[:, :, :n] = keys, values
            logits = logits.clone()
        self.prompt_s += self.clock() - t
        return logits


def guessers(args):
    """(name, k, factory) for each way of guessing measured."""
    out = [(f"lookup k={k}", k, lambda k=k: PromptLookup(k)) for k in args.lookup_ks]
    if args.draft:
        draft = load_model(args.draft, weights=args.draft_dtype or args.demo_dtype)
        out.append((f"draft {Path(args.draft).name} k={args.draft_tokens}", args.draft_tokens,
                    lambda: DraftModel(draft, args.draft_tokens)))
    return out


def acceptance(args) -> list[dict]:
    """One row per (task, guesser), plus the plain row of each task."""
    model, tok = load(args.model, weights=args.demo_dtype)
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    ways = guessers(args)
    rows = []
    for task, prompts in task_prompts(args.prompts).items():
        if task not in args.tasks:
            continue
        plain = {"task": task, "way": "plain", "k": 0, "prompts": len(prompts), "tokens": 0, "passes": 0, "s": 0.0}
        spec = [{"task": task, "way": name, "k": k, "prompts": len(prompts), "tokens": 0, "passes": 0, "s": 0.0}
                for name, k, _ in ways]
        ref = [{"task": task, "way": f"lookup k={k}, reference answers", "k": k, "prompts": len(prompts),
                "tokens": 0, "passes": 0, "s": float("nan")} for k in args.lookup_ks]
        for prompt, answer in prompts:
            ids = tok.encode(prompt)
            answer_ids = tok.encode(answer) + [tok.eos_id]
            for stats, k in zip(ref, args.lookup_ks):
                stats["passes"] += reference_passes(ids, answer_ids, PromptLookup(k))
                stats["tokens"] += len(answer_ids)
            replay = {}  # the prompt's pass, run once (by the plain run) and replayed for each guesser
            counted = Counting(model, clock, replay)
            t = clock()
            want = list(generate_tokens(counted, ids, params, tok.eos_id, tok.vocab_size))
            plain["s"] += clock() - t - counted.prompt_s  # decoding only: the first token is the prompt pass's
            plain["passes"] += counted.calls  # one token per pass, the prompt's pass giving the first
            plain["tokens"] += len(want)
            text = tok.decode([t for t in want if t != tok.eos_id]).strip()
            plain["exact"] = plain.get("exact", 0) + (text == answer.strip())  # the reference, character for character
            plain["similarity"] = plain.get("similarity", 0.0) + SequenceMatcher(None, text, answer.strip()).ratio()
            for stats, (name, _, make) in zip(spec, ways):
                counted = Counting(model, clock, replay)
                t = clock()
                out = list(generate_tokens(counted, ids, params, tok.eos_id, tok.vocab_size, make()))
                stats["s"] += clock() - t - counted.prompt_s
                stats["passes"] += counted.calls - int(len(ids) > 1)  # not the prompt's pass: it gives no token here
                stats["tokens"] += len(out)
                if out != want:
                    raise SystemExit(f"greedy tokens differ with {name} on {task}: {prompt!r}")
        rows += [plain, *spec, *ref]
    for r in rows:
        r["tokens_per_pass"] = r["tokens"] / r["passes"]
        r["tok_s"] = (r["tokens"] - r["prompts"]) / r["s"]  # decode tok/s: each prompt's first token is its prompt pass's
    return rows


@torch.inference_mode()
def pass_cost(args, ks: list[int]) -> list[dict]:
    ckpt = bench_checkpoint(args.work, args.layers)
    rows = []
    for fmt in args.formats.split(","):
        model = load_model(ckpt, weights=fmt)
        cache = model.new_cache(1, 512)
        vocab = model.config.vocab_size
        ids = torch.randint(4, vocab, (1, 256), generator=torch.Generator().manual_seed(0))
        model(ids, input_pos=torch.arange(256), last_only=True, cache=cache)
        row = {"format": fmt}
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        for _ in range(args.repeats):  # the sizes interleaved, so that a busy spell hits them alike
            for k in [0, *ks]:
                x = torch.randint(4, vocab, (1, k + 1))
                t = clock()
                model(x, input_pos=torch.arange(256, 257 + k), cache=cache)
                row[k] = min(row.get(k, float("inf")), (clock() - t) * 1e3)
        rows.append(row)
        del model, cache
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "models" / "demo"))
    p.add_argument("--draft", help="a draft model with the same spiece.model (default: none)")
    p.add_argument("--demo-dtype", default="float32", help="weights of --model and --draft (default: float32)")
    p.add_argument("--draft-dtype", help="weights of --draft (default: --demo-dtype)")
    p.add_argument("--tasks", default="copy,chat", help="(default: copy,chat)")
    p.add_argument("--prompts", type=int, default=40, help="prompts per task (default: 40; 0: only the pass-cost table)")
    p.add_argument("--new-tokens", type=int, default=128, help="(default: 128, the card's)")
    p.add_argument("--lookup-ks", default="3,5,8", help="prompt lookup guesses per pass (default: 3,5,8)")
    p.add_argument("--draft-tokens", type=int, default=5, help="draft model guesses per pass (default: 5)")
    p.add_argument("--layers", type=int, default=2, help="layers of the 3.6B shape for the pass-cost table (0: skip)")
    p.add_argument("--formats", default="bfloat16,int8")
    p.add_argument("--repeats", type=int, default=5, help="passes of each size; the fastest counts (default: 5)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="time generation and passes by the wall clock, or by this process's CPU time, which other processes on a "
                        "shared machine inflate less (use with 1 thread: waiting threads spin) (default: wall)")
    p.add_argument("--work", type=Path, default=BENCH_DIR)
    args = p.parse_args()
    args.work = args.work.expanduser()
    args.lookup_ks = [int(k) for k in args.lookup_ks.split(",") if k]
    args.tasks = args.tasks.split(",")
    print(f"{cpu_description()}; torch threads {torch.get_num_threads()}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")

    acc = acceptance(args) if args.prompts > 0 else []
    if acc:
        print_acceptance(args, acc)
        print(f"\nload average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.layers <= 0:
        return
    ks = sorted({*args.lookup_ks, *([args.draft_tokens] if args.draft else [])})
    cost = pass_cost(args, ks)
    scale = "" if args.layers == 36 else f" ({args.layers} of 36 layers: ratios only)"
    print(f"\nOne pass at the 3.6B shape{scale}, random weights, 256 tokens cached: "
          f"{args.clock} ms for 1 row and for 1 + k rows, fastest of {args.repeats}\n")
    print("| weights | 1 row | " + " | ".join(f"1+{k} rows" for k in ks) + " |")
    print("|---|---|" + "---|" * len(ks))
    for row in cost:
        print(f"| {row['format']} | {row[0]:.0f} | " + " | ".join(f"{row[k]:.0f} ({row[k] / row[0]:.2f}×)" for k in ks) + " |")
    lookups = [r for r in acc if r["way"].startswith("lookup")]
    if not lookups:
        return
    print("\nProjected decode speed-up at the 3.6B shape = tokens per pass × 1-row time ÷ (1 + k)-row time\n")
    print("| task | guesses | tokens per pass | " + " | ".join(row["format"] for row in cost) + " |")
    print("|---|---|---|" + "---|" * len(cost))
    for r in lookups:
        print(f"| {r['task']} | {r['way']} | {r['tokens_per_pass']:.2f} | "
              + " | ".join(f"{r['tokens_per_pass'] * row[0] / row[r['k']]:.2f}×" + (
                  f" ({1e3 / row[0]:.2f} → {r['tokens_per_pass'] * 1e3 / row[r['k']]:.2f} tok/s)" if args.layers == 36 else "")
                           for row in cost) + " |")


def print_acceptance(args, acc: list[dict]) -> None:
    c = load_config(args.model)
    print(f"Greedy, {Path(args.model).name} (hidden {c.hidden_size}, {c.num_layers} layers, {c.num_heads} heads, "
          f"intermediate {c.intermediate_size}, vocab {c.vocab_size}; {args.demo_dtype}), at most {args.new_tokens} new "
          f"tokens, held-out prompts; tokens identical with and without speculation; decode {args.clock} time "
          f"(each prompt's pass excluded: run once, replayed)\n")
    base = {r["task"]: r for r in acc if r["way"] == "plain"}
    for task, r in base.items():
        print(f"{task}: greedy answer = the reference answer in {r['exact']} of {r['prompts']} prompts; "
              f"mean character similarity (difflib ratio) {r['similarity'] / r['prompts']:.2f}")
    print("\n| task | guesses | prompts | new tokens | passes | tokens per pass | decode tok/s | speed-up, this model |")
    print("|---|---|---|---|---|---|---|---|")
    for r in acc:
        timed = r["s"] == r["s"]  # reference rows run no model: not timed
        speed = f"{r['tok_s']:.1f} | {r['tok_s'] / base[r['task']]['tok_s']:.2f}×" if timed else "— | —"
        print(f"| {r['task']} | {r['way']} | {r['prompts']} | {r['tokens']} | {r['passes']} | {r['tokens_per_pass']:.2f} "
              f"| {speed} |")


if __name__ == "__main__":
    main()
