"""Accuracy of jneox's weight formats on a real model: held-out response perplexity per format.

Random weights (decode_speed.py) give nearly flat logits, so their agreement figures are a lower
bound; this script measures what a user sees with a trained model (by default the shipped demo
model and the held-out conversations of its recipe). Every conversation is scored teacher-forced, on the tokens
of its システム answers (and their ``</s>``), exactly as SFT masks them:

- perplexity of those tokens in each format,
- relative error of their logits against fp32,
- agreement of the top-1 token with fp32.

    python benchmarks/quantized_accuracy.py --heldout OUT/sft-data/heldout.jsonl
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from jneox.hub import resolve
from jneox.loading import load
from jneox.train.data import encode_conversation, read_conversations

FORMATS = ("float32", "bfloat16", "int8", "int4")
REPO = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def score(model, examples: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the answer positions of every example and the target tokens there, concatenated."""
    logits, targets = [], []
    for ids, labels in examples:
        lab = torch.tensor(labels)
        keep = lab != -100
        out = model(torch.tensor([ids]))[0].float()
        logits.append(out[keep])
        targets.append(lab[keep])
    return torch.cat(logits), torch.cat(targets)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "models" / "demo"))
    ap.add_argument("--heldout", required=True, help="held-out conversations (recipes/demo/make_sft_data.py's heldout.jsonl)")
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--formats", default=",".join(FORMATS))
    args = ap.parse_args(argv)

    folder = resolve(args.model)
    _, tokenizer = load(folder, weights="float32")
    examples = [encode_conversation(c, tokenizer, args.max_len)[:2] for c in read_conversations([args.heldout])]
    reference = None
    rows = []
    for fmt in args.formats.split(","):
        model, _ = load(folder, weights=fmt)
        logits, targets = score(model, examples)
        ppl = math.exp(F.cross_entropy(logits, targets).item())
        if reference is None:
            reference = logits
        rel = ((logits - reference).norm() / reference.norm()).item()
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        rows.append((fmt, ppl, rel, agree))
        print(f"{fmt}: done", flush=True)
    print(f"\n{args.model}: {len(examples)} held-out conversations, {len(targets)} answer tokens, teacher-forced\n")
    print("| weights | response perplexity | logits rel err vs fp32 | top-1 agreement vs fp32 |")
    print("|---|---|---|---|")
    for fmt, ppl, rel, agree in rows:
        print(f"| {fmt} | {ppl:.2f} | {rel:.4f} | {agree:.1%} |")


if __name__ == "__main__":
    main()
