#!/usr/bin/env python3
"""Score the demo chat model on held-out conversations.

Two measurements, computed by the library (``jneox.evaluate.chat``, also ``jneox eval --task chat``):
the **response perplexity** of the SFT model (and, with ``--pretrained``, of the model before SFT) on
every held-out システム answer given the prompt inference builds for it, and the **format compliance**
of the answer to each held-out conversation's last question, decoded greedily and with the model
card's sampling settings (temperature 0.7, 128 new tokens). The rules are in that module.

    python recipes/demo/evaluate.py --model models/demo --pretrained OUT/pretrain --heldout OUT/sft/heldout.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from jneox.loading import load
from jneox.evaluate.chat import (  # noqa: F401  (the measurements live in the library)
    CARD_SAMPLING,
    GREEDY,
    MAX_NEW_TOKENS,
    MIN_JAPANESE_RATIO,
    Answer,
    AnswerCheck,
    answer_heldout,
    check_answer,
    compliance_summary,
    evaluate_chat,
    response_nll,
    response_perplexity,
)
from jneox.evaluate.run import write_json_atomic
from jneox.chat import Utterance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sft_data import read_conversation_file  # noqa: E402

TARGET_COMPLIANCE = 0.95


# ---------------------------------------------------------------------------
# The whole evaluation


def load_heldout(path: Path, limit: int | None = None) -> list[list[Utterance]]:
    conversations = read_conversation_file(path)
    if not conversations:
        raise ValueError(f"{path}: no conversations")
    return conversations[:limit] if limit else conversations


def load_for_eval(path: str | os.PathLike, device: str):
    """On CPU the packed float32 kernels `jneox chat` itself uses (about twice as fast as plain
    PyTorch when decoding); elsewhere plain float32 modules."""
    if device.split(":")[0] == "cpu":
        return load(path, weights="float32", device=device)
    return load(path, dtype=torch.float32, device=device)


def evaluate(model_dir: str | os.PathLike, heldout: list[list[Utterance]], pretrained_dir: str | os.PathLike | None = None,
             device: str = "cpu", seed: int = 0) -> dict:
    """Perplexities and compliance figures, plus every generated answer, as one JSON-ready dict."""
    result: dict = {"model": str(model_dir), "heldout_conversations": len(heldout)}
    if pretrained_dir is not None:
        pretrained, tokenizer = load_for_eval(pretrained_dir, device)
        result["pretrained"] = str(pretrained_dir)
        result["perplexity_pretrained"] = response_perplexity(pretrained, tokenizer, heldout)
        del pretrained
    model, tokenizer = load_for_eval(model_dir, device)
    chat = evaluate_chat(model, tokenizer, heldout, seed=seed)
    result["response_tokens"] = chat["response_tokens"]
    result["perplexity_sft"] = chat["response_perplexity"]
    result["greedy"], result["sampling"] = chat["greedy"], chat["sampling"]
    return result


def print_report(result: dict, transcripts: int = 3) -> None:
    print(f"held-out conversations: {result['heldout_conversations']} ({result['response_tokens']} answer tokens)")
    if "perplexity_pretrained" in result:
        print(f"response perplexity after pretraining: {result['perplexity_pretrained']:.2f}")
    print(f"response perplexity after SFT:         {result['perplexity_sft']:.2f}")
    rules = ["non_empty", "ends_with_eos", "no_new_user_turn", "japanese", "compliant"]
    print(f"{'decoding':10s} " + " ".join(f"{r:>16s}" for r in rules))
    for name in ("greedy", "sampling"):
        print(f"{name:10s} " + " ".join(f"{100 * result[name][r]:15.1f}%" for r in rules))
    for answer in result["greedy"]["answers"][:transcripts]:
        print("-" * 60)
        print(answer["prompt"].replace("<NL>", "\n"))
        print(f"[greedy] {answer['answer']}")
    for index, answer in enumerate(result["sampling"]["answers"][:transcripts]):
        print("-" * 60)
        print(f"[sampled {index}] {answer['answer']}")


def write_json(result: dict, path: Path) -> None:
    write_json_atomic(result, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the chat (SFT) model folder")
    parser.add_argument("--pretrained", help="the model before SFT, for the perplexity comparison")
    parser.add_argument("--heldout", type=Path, required=True, help="held-out conversations (make_sft_data.py)")
    parser.add_argument("--limit", type=int, help="use only the first N held-out conversations")
    parser.add_argument("--json", type=Path, help="write the figures and every answer here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transcripts", type=int, default=3, help="how many answers to print")
    parser.add_argument("--require", type=float, default=None,
                        help=f"exit 1 unless both compliance figures reach this share (target {TARGET_COMPLIANCE})")
    args = parser.parse_args(argv)
    heldout = load_heldout(args.heldout, args.limit)
    result = evaluate(args.model, heldout, args.pretrained, device=args.device, seed=args.seed)
    print_report(result, args.transcripts)
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.require is not None and min(result["greedy"]["compliant"], result["sampling"]["compliant"]) < args.require:
        print(f"compliance below {args.require:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
