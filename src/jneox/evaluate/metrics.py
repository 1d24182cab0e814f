"""Metrics: accuracy, balanced accuracy and macro-F1 for multiple choice; JSQuAD exact match and F1.

The definitions follow the jp-stable lm-evaluation-harness: ``acc_norm`` divides a choice's
log-likelihood by its length in characters (``MultipleChoiceTask.process_results``);
``balanced_acc`` is the mean over gold classes of each class's accuracy (``metrics.balanced_mean``);
``macro_f1`` is scikit-learn's ``f1_score(average="macro")`` over the classes seen in gold or
predicted labels. JSQuAD's scores are those of ``lm_eval/jasquad/evaluate.py``: answers
normalised with neologdn after removing emoji, whitespace runs collapsed; exact match on the
normalised text; F1 over MeCab words (fugashi, ``-Owakati``, the unidic-lite dictionary its ``ja``
extra installs) minus punctuation tokens; the best over the reference answers; means in percent.
``f1_char`` is the same F1 over characters instead of MeCab words (no dictionary involved).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import Sequence

from ..errors import JneoxError

# the harness's remove_punc list (lm_eval/jasquad/evaluate.py), plus ASCII punctuation
PUNCTUATION = frozenset("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿"
                        "–—‘’‛“”„‟…‧﹏." + string.punctuation)
_EMOJI_RANGES = re.compile("[\U0001F600-\U0001F64F\U0001F300-\U0001F5FF\U0001F680-\U0001F6FF"
                           "\U0001F1E0-\U0001F1FF\U00002702-\U000027B0]+")
JA_TOOLS = "pip install 'jneox[ja]' (neologdn, emoji, fugashi, unidic-lite: the jp-stable harness's 'ja' extra)"


class MissingTools(JneoxError):
    """A Japanese text tool JSQuAD's metric needs is not installed; the message says what to install."""


def argmax(values: Sequence[float]) -> int:
    """First index of the largest value (numpy's argmax, which the harness uses, breaks ties so)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def choice_predictions(loglikelihoods: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(prediction, length-normalised prediction) of one question."""
    return argmax(loglikelihoods), argmax([ll / len(c) for ll, c in zip(loglikelihoods, choices)])


def accuracy(golds: Sequence[int], preds: Sequence[int]) -> float:
    return sum(g == p for g, p in zip(golds, preds)) / len(golds)


def balanced_accuracy(golds: Sequence[int], preds: Sequence[int]) -> float:
    by_class: dict[int, list[bool]] = {}
    for g, p in zip(golds, preds):
        by_class.setdefault(g, []).append(g == p)
    return sum(sum(v) / len(v) for v in by_class.values()) / len(by_class)


def macro_f1(golds: Sequence[int], preds: Sequence[int]) -> float:
    """Mean over classes (in gold or predicted labels) of each class's F1; 0 where undefined."""
    scores = []
    for c in sorted(set(golds) | set(preds)):
        tp = sum(g == c and p == c for g, p in zip(golds, preds))
        fp = sum(g != c and p == c for g, p in zip(golds, preds))
        fn = sum(g == c and p != c for g, p in zip(golds, preds))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


# ---- JSQuAD ---------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """The harness's normalize_answer: emoji removed, neologdn, whitespace runs to one space."""
    try:
        import emoji
        import neologdn
    except ImportError as e:
        raise MissingTools(f"JSQuAD's metric normalises answers as the harness does: {JA_TOOLS} ({e})") from None
    text = "".join("" if emoji.is_emoji(c) else c for c in text)
    text = _EMOJI_RANGES.sub("", text)
    return " ".join(neologdn.normalize(text).split())


@lru_cache(maxsize=1)
def _tagger():
    try:
        from fugashi import Tagger
    except ImportError as e:
        raise MissingTools(f"JSQuAD's F1 counts MeCab words as the harness does: {JA_TOOLS} ({e})") from None
    return Tagger("-Owakati")


def mecab_words(text: str) -> list[str]:
    return [w for w in _tagger().parse(normalize_answer(text)).split() if w not in PUNCTUATION]


def answer_characters(text: str) -> list[str]:
    return [c for c in normalize_answer(text) if not c.isspace() and c not in PUNCTUATION]


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, references: Sequence[str], words: bool = True) -> dict[str, float]:
    """Exact match, F1 (MeCab words; skipped with ``words=False``) and character F1 of one answer,
    each the best over ``references``, in [0, 1]."""
    scores = {
        "exact_match": max(float(normalize_answer(prediction) == normalize_answer(r)) for r in references),
        "f1_char": max(token_f1(answer_characters(prediction), answer_characters(r)) for r in references),
    }
    if words:
        scores["f1"] = max(token_f1(mecab_words(prediction), mecab_words(r)) for r in references)
    return scores


def mecab_available() -> bool:
    try:
        _tagger()
        return True
    except (MissingTools, RuntimeError):
        return False


# ---- XLSum-ja: ROUGE-2 --------------------------------------------------------------------------
def rouge2(reference: Sequence[str], prediction: Sequence[str]) -> float:
    """ROUGE-2 F-measure of two token lists, as the ``rouge_score`` package computes it: bigram
    counts, overlap the sum of the smaller counts, precision over the prediction's bigrams, recall
    over the reference's, 0 when either is 0."""
    ref, pred = Counter(zip(reference, reference[1:])), Counter(zip(prediction, prediction[1:]))
    overlap = sum((ref & pred).values())
    precision, recall = overlap / max(sum(pred.values()), 1), overlap / max(sum(ref.values()), 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


# ---- MGSM: the last number of a chain of thought ------------------------------------------------
_NUMBER = re.compile(r"(\-?[0-9\.\,]+)")
INVALID_ANSWER = "[invalid]"  # the harness's INVALID_ANS: never equal to a number


def last_number(completion: str) -> int | str:
    """The harness's MGSM answer: the last run of digits, dots and commas (an optional leading minus),
    dots stripped from its ends and commas removed, if it reads as a whole number; else
    :data:`INVALID_ANSWER`. A run that is no number at all ("..." or "1.2.3") is an error in the
    harness (Python's ``float`` raises); here it counts as invalid."""
    found = _NUMBER.findall(completion)
    if not found:
        return INVALID_ANSWER
    text = found[-1].strip(".").replace(",", "")
    try:
        value = float(text)
    except ValueError:
        return INVALID_ANSWER
    return int(value) if value.is_integer() else INVALID_ANSWER
