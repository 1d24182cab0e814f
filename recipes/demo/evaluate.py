#!/usr/bin/env python3
"""Score the demo chat model on held-out conversations.

Two measurements:

* **Response perplexity** of the SFT model (and, with ``--pretrained``, of the model before SFT):
  every システム answer of every held-out conversation, with the ``</s>`` that ends it, is scored
  given exactly the prompt inference builds for it (``jneox.chat.format_prompt`` of the turns
  before it).  Only answer tokens count, as in SFT's loss mask.
* **Format compliance** of the answer to each held-out conversation's last question, decoded
  greedily and with the model card's sampling settings (temperature 0.7, 128 new tokens, no
  top-k/top-p).  An answer complies when it is non-empty, ends with ``</s>`` within 128 new
  tokens, never starts a new ``ユーザー:`` turn, and is at least 80% Japanese: of the characters
  that belong to a language (kana, kanji and letters of other scripts), at least 80% are Japanese.
  Digits, punctuation and symbols count for neither side: counted against, they failed 7 of the 111
  hand-written held-out answers (「1週間は168時間です。」), so the rule scored good Japanese as foreign.

    python recipes/demo/evaluate.py --model models/demo --pretrained OUT/pretrain --heldout OUT/sft/heldout.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from jneox.chat import SYSTEM, USER, Utterance, escape, format_prompt
from jneox.checkpoint import load
from jneox.generate import SamplingParams, generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from japanese import japanese_letter_ratio  # noqa: E402
from make_sft_data import read_conversation_file  # noqa: E402

MAX_NEW_TOKENS = 128
MIN_JAPANESE_RATIO = 0.8
TARGET_COMPLIANCE = 0.95
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
CARD_SAMPLING = SamplingParams(temperature=0.7, max_new_tokens=MAX_NEW_TOKENS)  # the card's generate() call
NEW_USER_TURN = re.compile(rf"(^|\n)\s*{USER}\s*[:：]")


# ---------------------------------------------------------------------------
# Perplexity


@torch.inference_mode()
def response_nll(model, tokenizer, conversations: list[list[Utterance]]) -> tuple[float, int]:
    """(summed negative log-likelihood, token count) of every answer and its ``</s>``, each scored
    given the prompt inference would build for it."""
    device = model.embed.weight.device
    window = model.config.max_position_embeddings
    total_nll, total_tokens = 0.0, 0
    for turns in conversations:
        for index, turn in enumerate(turns):
            if turn.speaker != SYSTEM:
                continue
            context = tokenizer.encode(format_prompt(turns[:index]))
            target = tokenizer.encode(escape(turn.text)) + [tokenizer.eos_id]
            target = target[: window - 1]
            context = context[-(window - len(target)):]
            ids = torch.tensor([context + target], device=device)
            logits = model(ids[:, :-1]).float()
            log_probs = torch.log_softmax(logits[0, len(context) - 1:], dim=-1)
            picked = log_probs.gather(-1, ids[0, len(context):, None])
            total_nll -= float(picked.sum())
            total_tokens += len(target)
    return total_nll, total_tokens


def response_perplexity(model, tokenizer, conversations: list[list[Utterance]]) -> float:
    nll, tokens = response_nll(model, tokenizer, conversations)
    if tokens == 0:
        raise ValueError("no システム answers to score")
    return math.exp(nll / tokens)


# ---------------------------------------------------------------------------
# Format compliance


@dataclass
class AnswerCheck:
    non_empty: bool
    ends_with_eos: bool
    no_new_user_turn: bool
    japanese: bool

    @property
    def compliant(self) -> bool:
        return self.non_empty and self.ends_with_eos and self.no_new_user_turn and self.japanese


def check_answer(text: str, ended_with_eos: bool) -> AnswerCheck:
    """The four format rules for one generated answer (``text`` as decoded, newlines as ``\\n``)."""
    return AnswerCheck(
        non_empty=bool(text.strip()),
        ends_with_eos=ended_with_eos,
        no_new_user_turn=not NEW_USER_TURN.search(text),
        japanese=japanese_letter_ratio(text) >= MIN_JAPANESE_RATIO,
    )


@dataclass
class Answer:
    prompt: str
    text: str
    check: AnswerCheck


def answer_heldout(model, tokenizer, conversations: list[list[Utterance]], params: SamplingParams,
                   seed: int = 0) -> list[Answer]:
    """The model's answer to each conversation's last question (its last システム turn is left out).

    No stop strings are set: a model that writes the user's next turn itself must be seen doing it.
    Sampling is seeded per prompt, so a run is reproducible.
    """
    answers = []
    for index, turns in enumerate(conversations):
        prompt = format_prompt(turns[:-1])
        completion = generate(model, tokenizer, prompt, params.with_(seed=seed + index, stop=()))
        ended_with_eos = completion.finish_reason == "stop"
        answers.append(Answer(prompt, completion.text, check_answer(completion.text, ended_with_eos)))
    return answers


def compliance_summary(answers: list[Answer]) -> dict[str, float]:
    """Share of answers meeting each rule and all of them."""
    n = len(answers)
    if n == 0:
        raise ValueError("no answers to score")
    summary = {name: sum(getattr(a.check, name) for a in answers) / n for name in AnswerCheck.__dataclass_fields__}
    summary["compliant"] = sum(a.check.compliant for a in answers) / n
    return summary


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
    nll, tokens = response_nll(model, tokenizer, heldout)
    result["response_tokens"] = tokens
    result["perplexity_sft"] = math.exp(nll / tokens)
    for name, params in (("greedy", GREEDY), ("sampling", CARD_SAMPLING)):
        started = time.perf_counter()
        answers = answer_heldout(model, tokenizer, heldout, params, seed=seed)
        result[name] = {
            "params": {"temperature": params.temperature, "max_new_tokens": params.max_new_tokens},
            "seconds": round(time.perf_counter() - started, 1),
            **compliance_summary(answers),
            "answers": [{"prompt": a.prompt, "answer": a.text, **asdict(a.check), "compliant": a.check.compliant}
                        for a in answers],
        }
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
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as writer:
        json.dump(result, writer, ensure_ascii=False, indent=1)
    os.chmod(temp_name, 0o644)
    os.replace(temp_name, path)


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
