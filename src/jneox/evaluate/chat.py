"""The ``chat`` task: how well a chat model answers held-out conversations in the card's format.

Two measurements (moved here from the demo recipe's evaluate.py, which now calls them):

* **Response perplexity**: every システム answer of every conversation, with the ``</s>`` that ends
  it, scored given exactly the prompt inference builds for it (:func:`jneox.chat.format_prompt`
  of the turns before it). Only answer tokens count, as in SFT's loss mask.
* **Format compliance** of the answer to each conversation's last question. An answer complies
  when it is non-empty, ends with ``</s>`` within ``max_new_tokens``, never starts a new
  ``ユーザー:`` turn, and is at least 80% Japanese: of the characters that belong to a language
  (kana, kanji and letters of other scripts), at least 80% are Japanese. Digits, punctuation and
  symbols count for neither side: counted against, they failed 7 of the demo recipe's 111
  hand-written held-out answers (「1週間は168時間です。」), so the rule scored good Japanese as foreign.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Sequence

from ..chat import SYSTEM, USER, Utterance, escape, format_prompt
from ..errors import JneoxError
from ..generate import generate
from ..sampling import SamplingParams
from .japanese import japanese_letter_ratio
from .score import score_ids

MAX_NEW_TOKENS = SamplingParams.max_new_tokens  # the card's
MIN_JAPANESE_RATIO = 0.8
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
CARD_SAMPLING = SamplingParams()  # the card's generate() call: SamplingParams' defaults
NEW_USER_TURN = re.compile(rf"(^|\n)\s*{USER}\s*[:：]")


def response_nll(model, tokenizer, conversations: Sequence[Sequence[Utterance]]) -> tuple[float, int]:
    """(summed negative log-likelihood, token count) of every answer and its ``</s>``, each scored
    given the prompt inference would build for it (the oldest prompt tokens dropped if it does not fit)."""
    window = model.config.max_position_embeddings
    pairs = []
    for turns in conversations:
        for index, turn in enumerate(turns):
            if turn.speaker != SYSTEM:
                continue
            target = (tokenizer.encode(escape(turn.text)) + [tokenizer.eos_id])[: window - 1]
            context = tokenizer.encode(format_prompt(turns[:index]))[-(window - len(target)):]
            pairs.append((context, target))
    if not pairs:
        return 0.0, 0
    return -math.fsum(score_ids(model, pairs)), sum(len(t) for _, t in pairs)


def response_perplexity(model, tokenizer, conversations: Sequence[Sequence[Utterance]]) -> float:
    nll, tokens = response_nll(model, tokenizer, conversations)
    if tokens == 0:
        raise JneoxError(f"no {SYSTEM} answers to score")
    return math.exp(nll / tokens)


@dataclass
class AnswerCheck:
    non_empty: bool
    ends_with_eos: bool
    no_new_user_turn: bool
    japanese: bool

    @property
    def compliant(self) -> bool:
        return self.non_empty and self.ends_with_eos and self.no_new_user_turn and self.japanese


RULES = ("non_empty", "ends_with_eos", "no_new_user_turn", "japanese")


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


def answer_heldout(model, tokenizer, conversations: Sequence[Sequence[Utterance]], params: SamplingParams,
                   seed: int = 0, progress=None) -> list[Answer]:
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
        if progress:
            progress(1)
    return answers


def compliance_summary(answers: Sequence[Answer]) -> dict[str, float]:
    """Share of answers meeting each rule and all of them."""
    n = len(answers)
    if n == 0:
        raise JneoxError("no answers to score")
    summary = {name: sum(getattr(a.check, name) for a in answers) / n for name in RULES}
    summary["compliant"] = sum(a.check.compliant for a in answers) / n
    return summary


def evaluate_chat(model, tokenizer, conversations: Sequence[Sequence[Utterance]], seed: int = 0,
                  decodings: dict[str, SamplingParams] | None = None, progress=None) -> dict:
    """Response perplexity and, per decoding (default: greedy and the card's sampling), the
    compliance shares and every answer, as one JSON-ready dict."""
    nll, tokens = response_nll(model, tokenizer, conversations)
    if tokens == 0:
        raise JneoxError(f"no {SYSTEM} answers to score")
    result: dict = {"conversations": len(conversations), "response_tokens": tokens,
                    "response_perplexity": math.exp(nll / tokens)}
    for name, params in (decodings or {"greedy": GREEDY, "sampling": CARD_SAMPLING}).items():
        started = time.perf_counter()
        answers = answer_heldout(model, tokenizer, conversations, params, seed=seed, progress=progress)
        result[name] = {
            "params": {"temperature": params.temperature, "max_new_tokens": params.max_new_tokens},
            "seconds": round(time.perf_counter() - started, 1),
            **compliance_summary(answers),
            "answers": [{"prompt": a.prompt, "answer": a.text, **{r: getattr(a.check, r) for r in RULES},
                         "compliant": a.check.compliant} for a in answers],
        }
    return result
