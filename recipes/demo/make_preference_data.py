#!/usr/bin/env python3
"""Preference pairs for the demo model, from the hand-written conversations.

For each conversation the prompt is every turn before the last システム answer; **chosen** is that
hand-written answer; **rejected** is, by a hash of the prompt (so the choice is stable):

* 40% the SFT model's own answer, sampled at the card's settings (temperature 0.7, 128 new tokens);
  a sample that is the reference itself is dropped (no preference to learn): the shipped model,
  fine-tuned for 12 epochs, gives its training answer verbatim for most training prompts (302 of
  352 here), so this share ends up small in the training pairs
* 20% drift into English: the reference's first sentence, then English sentences
* 20% repetition: the reference's first sentence (or its first 12 characters) three to five times
* 20% cut off: the reference cut at 30-60% of its characters, mid-sentence

The conversations that ``make_sft_data.py`` holds out (8%, by a hash of the first question) become
the held-out pairs (``heldout_pairs.jsonl``): the SFT model never trained on their answers, and no
training pair shares their first question.

    python recipes/demo/make_preference_data.py --model models/demo --out-dir OUT
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

import torch

from jneox.chat import NL, format_prompt, parse_answer
from jneox.loading import load
from jneox.sampling import SamplingParams
from jneox.train.ppo import sample_batch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sft_data import (DEFAULT_CONVERSATIONS, DEFAULT_HELDOUT_PERCENT, as_card_json,  # noqa: E402
                           conversation_files, deduplicate, is_heldout, read_conversation_file)

CARD_SAMPLING = SamplingParams(temperature=0.7, max_new_tokens=128)
MIX = (("sampled", 40), ("english", 20), ("repetition", 20), ("cut", 20))  # percent of the pairs
ENGLISH = ["I am not sure about that, but I think it depends on the situation.",
           "Please check the documentation for more details.",
           "This is a common question, and the answer is usually simple.",
           "Let me know if you have any other questions."]
SENTENCE_END = re.compile(r"(?<=[。！？!?])")


def bucket(prompt_text: str, salt: str = "") -> int:
    return int.from_bytes(hashlib.sha256((salt + prompt_text).encode("utf-8")).digest()[:8], "big") % 100


def kind_of(prompt_text: str) -> str:
    b = bucket(prompt_text)
    for kind, share in MIX:
        if b < share:
            return kind
        b -= share
    raise AssertionError


def first_sentence(text: str) -> str:
    parts = [p for p in SENTENCE_END.split(text) if p.strip()]
    return parts[0] if parts else text


def corrupt(answer: str, kind: str, prompt_text: str) -> str:
    r = bucket(prompt_text, "r")
    if kind == "english":
        return first_sentence(answer) + " " + " ".join(ENGLISH[(r + i) % len(ENGLISH)] for i in range(2))
    if kind == "repetition":
        unit = first_sentence(answer)
        unit = unit if len(unit) <= 40 else unit[:12]
        return unit * (3 + r % 3)
    if kind == "cut":
        cut = max(2, int(len(answer) * (0.3 + 0.3 * r / 100)))
        return answer[:cut].rstrip("。！？!?")
    raise ValueError(kind)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the SFT model whose samples are rejected answers")
    parser.add_argument("--conversations", type=Path, nargs="+", default=[DEFAULT_CONVERSATIONS])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts sampled together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-pairs", type=int, help="keep this many training pairs, chosen by a hash of "
                                                             "their JSON line (a shorter run on a busy CPU)")
    args = parser.parse_args(argv)
    conversations = deduplicate([c for f in conversation_files(args.conversations) for c in read_conversation_file(f)])
    model, tokenizer = load(args.model, weights="float32")
    records = []
    for turns in conversations:
        prompt = turns[:-1]
        text = format_prompt(prompt)
        records.append({"prompt": as_card_json(prompt), "chosen": turns[-1].text, "_kind": kind_of(text),
                        "_text": text, "_heldout": is_heldout(turns, DEFAULT_HELDOUT_PERCENT)})
    sampled = [r for r in records if r["_kind"] == "sampled"]
    generator = torch.Generator().manual_seed(args.seed)
    for start in range(0, len(sampled), args.batch_size):
        part = sampled[start:start + args.batch_size]
        answers = sample_batch(model, [tokenizer.encode(r["_text"]) for r in part], CARD_SAMPLING, tokenizer.eos_id,
                               generator, tokenizer.vocab_size)
        for r, ids in zip(part, answers):
            r["rejected"] = parse_answer(tokenizer.decode([t for t in ids if t != tokenizer.eos_id])).strip()
        print(f"sampled {min(start + args.batch_size, len(sampled))}/{len(sampled)}", file=sys.stderr)
    counts: dict[str, int] = {}
    kept = {False: [], True: []}
    for r in records:
        if r["_kind"] != "sampled":
            r["rejected"] = corrupt(r["chosen"], r["_kind"], r["_text"])
        if not r["rejected"].strip() or r["rejected"].replace(NL, "\n") == r["chosen"]:
            continue  # an empty sample, or one that is the reference itself: no preference to learn
        counts[r["_kind"]] = counts.get(r["_kind"], 0) + 1
        kept[r["_heldout"]].append({k: v for k, v in r.items() if not k.startswith("_")} | {"kind": r["_kind"]})
    args.out_dir.mkdir(parents=True, exist_ok=True)
    lines = {part: [json.dumps(row, ensure_ascii=False) for row in rows] for part, rows in kept.items()}
    if args.max_train_pairs:
        lines[False] = sorted(lines[False], key=lambda line: hashlib.sha256(line.encode("utf-8")).hexdigest())
        lines[False] = lines[False][:args.max_train_pairs]
        counts = {}
        for line in lines[False] + lines[True]:
            kind = json.loads(line)["kind"]
            counts[kind] = counts.get(kind, 0) + 1
    for name, part in (("train_pairs.jsonl", False), ("heldout_pairs.jsonl", True)):
        with open(args.out_dir / name, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines[part])
    kept = {part: lines[part] for part in lines}
    print(f"{len(kept[False])} training pairs, {len(kept[True])} held-out pairs in {args.out_dir}; rejected: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
