#!/usr/bin/env python3
"""Compare preference-tuned demo models with the SFT model on the held-out prompts.

For each model: its answers to the held-out prompts at the card's sampling settings (seeded per
prompt, so every model gets the same random numbers), and

* **reward-model win rate** against the SFT model: the share of prompts where the reward model
  scores this model's answer above the SFT model's (ties counted apart);
* **format compliance** (``evaluate.py``'s four rules) and the **response perplexity** of the
  held-out hand-written answers (``evaluate.py``'s functions);
* **repetition**: distinct-n (unique character n-grams / all n-grams, n = 1, 2, 3, pooled over the
  answers) and the share of answers in which some 10-character string occurs twice;
* transcripts of the first few prompts side by side.

    python recipes/demo/evaluate_preference.py --sft models/demo --model dpo=OUT/dpo \\
        --reward-model OUT/reward --heldout OUT/heldout_pairs.jsonl --json OUT/preference_eval.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jneox.chat import SYSTEM, Utterance
from jneox.loading import load_reward_model
from jneox.train.preference import read_preferences
from jneox.train.reward import score_answers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate import CARD_SAMPLING, answer_heldout, compliance_summary, load_for_eval, response_perplexity  # noqa: E402

REPEAT_SPAN = 10


def distinct_n(texts: list[str], n: int) -> float:
    grams = [t[i:i + n] for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeats_itself(text: str, span: int = REPEAT_SPAN) -> bool:
    seen = set()
    for i in range(len(text) - span + 1):
        piece = text[i:i + span]
        if piece in seen:
            return True
        seen.add(piece)
    return False


def evaluate_model(path: str, conversations: list[list[Utterance]], seed: int) -> dict:
    model, tokenizer = load_for_eval(path, "cpu")
    answers = answer_heldout(model, tokenizer, conversations, CARD_SAMPLING, seed=seed)
    texts = [a.text for a in answers]
    return {"model": path, "perplexity": response_perplexity(model, tokenizer, conversations),
            **{f"compliance_{k}": v for k, v in compliance_summary(answers).items()},
            **{f"distinct_{n}": distinct_n(texts, n) for n in (1, 2, 3)},
            "repeating_answers": sum(map(repeats_itself, texts)) / len(texts),
            "mean_answer_chars": sum(map(len, texts)) / len(texts), "answers": texts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", required=True, help="the SFT model (the baseline)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH", help="a tuned model (repeatable)")
    parser.add_argument("--reward-model", required=True)
    parser.add_argument("--heldout", type=Path, required=True, help="held-out preference pairs (their prompt and chosen answer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--transcripts", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    records = read_preferences([args.heldout])
    conversations = [[*r.prompt, Utterance(SYSTEM, r.chosen)] for r in records]
    rm = load_reward_model(args.reward_model)
    from jneox.loading import load_tokenizer

    rm_tokenizer = load_tokenizer(args.reward_model)
    models = {"sft": args.sft, **dict(m.split("=", 1) for m in args.model)}
    results = {}
    for name, path in models.items():
        results[name] = evaluate_model(path, conversations, args.seed)
        results[name]["reward"] = score_answers(rm, rm_tokenizer, [(r.prompt, a) for r, a in zip(records, results[name]["answers"])])
        print(f"{name}: done", file=sys.stderr)
    base = results["sft"]["reward"]
    for name, res in results.items():
        wins = sum(a > b for a, b in zip(res["reward"], base))
        ties = sum(a == b for a, b in zip(res["reward"], base))
        res.update(win_rate=wins / len(base), tie_rate=ties / len(base), loss_rate=(len(base) - wins - ties) / len(base),
                   mean_reward=sum(res["reward"]) / len(base))
    rows = ["win_rate", "tie_rate", "mean_reward", "perplexity", "compliance_compliant", "compliance_ends_with_eos",
            "compliance_japanese", "distinct_1", "distinct_2", "distinct_3", "repeating_answers", "mean_answer_chars"]
    print(f"{len(records)} held-out prompts, card sampling (temperature 0.7, 128 new tokens), seed {args.seed}")
    print("| measure | " + " | ".join(results) + " |")
    print("| --- |" + " ---: |" * len(results))
    for row in rows:
        print(f"| {row} | " + " | ".join(f"{results[n][row]:.3f}" for n in results) + " |")
    for i in range(min(args.transcripts, len(records))):
        print("-" * 60)
        print("ユーザー: " + records[i].prompt[-1].text)
        print(f"[reference] {records[i].chosen}")
        for name, res in results.items():
            print(f"[{name}, reward {res['reward'][i]:.2f}] {res['answers'][i]}")
    if args.json:
        args.json.write_text(json.dumps(results, ensure_ascii=False, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
