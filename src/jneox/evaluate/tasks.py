"""Task files and prompt templates: each source's own file shapes, the jp-stable harness's prompt version 0.4.

The templates are those of Stability-AI's lm-evaluation-harness, branch ``jp-stable``, which produced
rinna's published scores (``models/rinna/rinna-japanese-gpt-neox-3.6b-instruction-sft/harness.sh``
there, at commit 1746e2d: ``jcommonsenseqa-1.1-0.4``, ``jnli-1.1-0.4``, ``marc_ja-1.1-0.4``,
``jsquad-1.1-0.4``, ``jaqket_v2-0.1-0.4``, ``xlsum_ja-1.0-0.4``, ``xwinograd_ja``, ``mgsm-1.0-0.4``).
Each class below names the harness class it follows; :data:`TASKS` knows every task by the harness's
name (``NAME-VERSION-PROMPT_VERSION``) and by its short name. As in that harness, a prompt is the
task's description, then the few-shot examples (each its text and its answer) each followed by the
few-shot separator, then the question's text; the answer (continuation) is scored or generated
after it, with no leading space. Text is encoded as the harness's tokenizer (rinna's slow
``T5Tokenizer``) encoded it: sentencepiece's own ids, so a raw newline stays what sentencepiece
makes of it rather than becoming ``<NL>``.

Every problem with a file is a :class:`DataError` naming ``FILE:LINE`` (``FILE: data[i]...`` inside
the one JSON document of a SQuAD file).
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..chat import NL, SYSTEM, USER
from ..errors import UsageError
from ..tokenizer import Tokenizer
from ..train.data import DataError, _jsonl_lines
from . import metrics

SYSTEM_OK = f"{SYSTEM}: 分かりました。{NL}"  # every 0.4 description ends with the system agreeing


@dataclass
class Doc:
    """One question of a task file, where it came from, and what the harness derives from it."""

    fields: dict[str, Any]
    source: str  # "FILE:LINE" (or "FILE: data[i]..." for SQuAD JSON)
    choices: list[str] = field(default_factory=list)  # multiple choice: the answers scored
    gold: int = -1  # multiple choice: index of the right choice
    answers: list[str] = field(default_factory=list)  # generation: the reference answers
    id: str = ""


class Task:
    """What a task reads and how it writes prompts. Subclasses set the harness's constants."""

    name = ""  # the short name; the harness's own is ``harness_name``
    version = ""  # the harness's VERSION and PROMPT_VERSION
    prompt_version = "0.4"
    kind = "multiple_choice"  # or "generation"
    description = ""
    fewshot_sep = NL
    stratified = False  # few-shot examples drawn per answer class (the harness's JNLI)
    balanced = False  # also balanced accuracy and macro-F1 (the harness's BalancedMultipleChoiceTask)
    default_fewshot = 0
    has_fewshot = True  # the source has a training split to draw examples from
    split = "validation"  # the split the harness evaluates (its test split where the source has one)
    # generation: the strings the harness's greedy_until cuts the text at; generation stops at the
    # first one's last token
    until: tuple[str, ...] = (NL,)
    # file names the source publishes its splits under (searched in DATA_DIR/<name>/ after the HF
    # datasets' <split>.jsonl / <split>.json; a * matches a version, the newest first)
    file_names: dict[str, tuple[str, ...]] = {"validation": ("valid-v*.json",), "train": ("train-v*.json",)}

    @classmethod
    def harness_name(cls) -> str:
        return f"{cls.name}-{cls.version}-{cls.prompt_version}" if cls.version else cls.name

    def encode(self, tokenizer: Tokenizer, text: str) -> list[int]:
        """Token ids as the harness's tokenizer gave them (see the module's docstring)."""
        return harness_encode(tokenizer, text)

    def requests(self, doc: Doc, context: str) -> list[tuple[str, str]]:
        """Multiple choice: the (context, continuation) pairs scored, one per choice."""
        return [(context, c) for c in doc.choices]

    def choice_metrics(self, samples: Sequence[dict]) -> dict[str, float]:
        """Multiple choice: the metrics over per-document records with ``gold``, ``prediction``,
        ``prediction_norm`` (the harness's MultipleChoiceTask)."""
        golds, preds = [s["gold"] for s in samples], [s["prediction"] for s in samples]
        scores = {"acc": metrics.accuracy(golds, preds),
                  "acc_norm": metrics.accuracy(golds, [s["prediction_norm"] for s in samples])}
        if self.balanced:
            scores["balanced_acc"] = metrics.balanced_accuracy(golds, preds)
            scores["macro_f1"] = metrics.macro_f1(golds, preds)
        return scores

    # ---- generation ----
    def max_new_tokens(self, doc: Doc, tokenizer: Tokenizer) -> int:
        """Generation: the harness's token budget for this document."""
        raise NotImplementedError

    def fit(self, context: str, tokenizer: Tokenizer, max_length: int) -> str:
        """Generation: the context shortened as the harness shortens it to ``max_length`` tokens
        (beyond that, generation keeps the context's last tokens)."""
        return context

    def check_tools(self) -> None:
        """Generation: raise before any work if the metric's optional tools are missing."""

    def score(self, doc: Doc, text: str, tokenizer: Tokenizer) -> dict:
        """Generation: one answer's scores (what :meth:`aggregate` averages)."""
        raise NotImplementedError

    def aggregate(self, samples: Sequence[dict]) -> dict:
        raise NotImplementedError

    def read(self, path: str | Path) -> list[Doc]:
        path = Path(path)
        if not path.is_file():
            raise DataError(path, None, "no such file")
        docs = []
        for number, obj in _jsonl_lines(path, False, None):
            if not isinstance(obj, dict):
                raise DataError(path, number, f"expected a JSON object, got {type(obj).__name__}")
            try:
                docs.append(self.parse(obj, f"{path}:{number}"))
            except _Problem as e:
                raise DataError(path, number, str(e)) from None
        return docs

    def parse(self, obj: dict, source: str) -> Doc:
        raise NotImplementedError

    def doc_to_text(self, doc: Doc) -> str:
        raise NotImplementedError

    def doc_to_target(self, doc: Doc) -> str:
        """The answer a few-shot example shows (the harness's ``doc_to_target``)."""
        return doc.choices[doc.gold]

    def context(self, doc: Doc, examples: Sequence[Doc] = ()) -> str:
        """The whole prompt: description, few-shot examples, question (the harness's ``fewshot_context``)."""
        shots = ""
        if examples:
            shots = self.fewshot_sep.join(self.doc_to_text(e) + self.doc_to_target(e) for e in examples)
            shots += self.fewshot_sep
        return self.description + shots + self.doc_to_text(doc)


class _Problem(ValueError):
    """A problem with one record; the reader adds FILE:LINE."""


def _field(obj: dict, name: str, kind: type | tuple = str) -> Any:
    if name not in obj:
        raise _Problem(f"missing field {name!r} (fields: {', '.join(map(repr, obj)) or 'none'})")
    value = obj[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _Problem(f"field {name!r} must be {expected}, got {type(value).__name__}")
    return value


def _label(obj: dict, names: Sequence[str]) -> int:
    """A label given as its name (JGLUE's files) or as its index (the HF datasets' ClassLabel)."""
    value = _field(obj, "label", (str, int))
    if isinstance(value, int):
        if not 0 <= value < len(names):
            raise _Problem(f"label {value} out of range 0..{len(names) - 1}")
        return value
    if value not in names:
        raise _Problem(f"unknown label {value!r}: expected one of {', '.join(names)}")
    return names.index(value)


class JCommonsenseQA(Task):
    """JGLUE JCommonsenseQA: ``{"q_id", "question", "choice0".."choice4", "label"}`` per line.

    Harness: lm_eval/tasks/ja/jcommonsenseqa.py, ``JCommonsenseQAWithRinnaInstructionSFT``
    (VERSION 1.1, PROMPT_VERSION 0.4); plain random few-shot sampling.
    """

    name = "jcommonsenseqa"
    version = "1.1"
    description = f"{USER}: 与えられた選択肢の中から、最適な答えを選んでください。{NL}{SYSTEM_OK}"
    default_fewshot = 3

    def parse(self, obj, source):
        choices = [_field(obj, f"choice{i}") for i in range(5)]
        gold = _field(obj, "label", int)
        if not 0 <= gold < 5:
            raise _Problem(f"label {gold} out of range 0..4")
        return Doc(obj, source, choices, gold, id=str(obj.get("q_id", "")))

    def doc_to_text(self, doc):
        choices = NL.join(f"- {c}" for c in doc.choices)
        return f"{USER}: 質問：{_field(doc.fields, 'question')}{NL}選択肢：{NL}{choices}{NL}{SYSTEM}: "


class JNLI(Task):
    """JGLUE JNLI: ``{"sentence1", "sentence2", "label": "entailment"|"contradiction"|"neutral"}``
    (or the label's index, as the HF dataset gives it).

    Harness: lm_eval/tasks/ja/jnli.py, ``JNLIWithRinnaInstructionSFT`` (PROMPT_VERSION 0.4) at the
    branch's head (VERSION 1.3): choices 含意, 矛盾, 中立 in the label order of the HF dataset;
    premise and hypothesis joined by ``<NL>``; few-shot examples drawn stratified by answer; also
    balanced accuracy and macro-F1. rinna's published run used :class:`JNLI11`.
    """

    name = "jnli"
    version = "1.3"
    LABELS = ("entailment", "contradiction", "neutral")
    CHOICES = ["含意", "矛盾", "中立"]
    description = (f"{USER}: 与えられた前提と仮説の関係を回答してください。出力は以下から選択してください：{NL}"
                   + NL.join(CHOICES) + f"{NL}{SYSTEM_OK}")
    stratified = True
    balanced = True
    default_fewshot = 3

    def parse(self, obj, source):
        _field(obj, "sentence1"), _field(obj, "sentence2")
        return Doc(obj, source, list(self.CHOICES), _label(obj, self.LABELS),
                   id=str(obj.get("sentence_pair_id", "")))

    def doc_to_text(self, doc):
        return f"{USER}: 前提：{doc.fields['sentence1']}{NL}仮説：{doc.fields['sentence2']}{NL}{SYSTEM}: "


class JNLI11(JNLI):
    """JNLI as the harness had it at commit 1746e2d (VERSION 1.1), which gave rinna's published
    figure: the choices are the English labels, listed so in the description; premise and
    hypothesis are joined by a raw newline (encoded as sentencepiece encodes it, not as ``<NL>``);
    few-shot examples are a plain random draw; accuracy and acc_norm only.
    """

    version = "1.1"
    CHOICES = list(JNLI.LABELS)
    description = (f"{USER}: 与えられた前提と仮説の関係を回答してください。出力は以下から選択してください：{NL}"
                   + NL.join(CHOICES) + f"{NL}{SYSTEM_OK}")
    stratified = False
    balanced = False

    def doc_to_text(self, doc):
        return f"{USER}: 前提：{doc.fields['sentence1']}\n仮説：{doc.fields['sentence2']}{NL}{SYSTEM}: "


class MARCJa(Task):
    """JGLUE MARC-ja: ``{"sentence", "label": "positive"|"negative"}`` per line.

    Harness: lm_eval/tasks/ja/marc_ja.py, ``MARCJaWithRinnaInstructionSFT`` (VERSION 1.1,
    PROMPT_VERSION 0.4): choices ポジティブ, ネガティブ; plain random few-shot sampling.
    """

    name = "marc_ja"
    version = "1.1"
    LABELS = ("positive", "negative")
    CHOICES = ["ポジティブ", "ネガティブ"]
    description = (f"{USER}: 与えられた製品レビューを、ポジティブまたはネガティブの感情クラスのいずれかに分類してください。"
                   f"{NL}{SYSTEM_OK}")
    balanced = True
    default_fewshot = 3

    def parse(self, obj, source):
        _field(obj, "sentence")
        return Doc(obj, source, list(self.CHOICES), _label(obj, self.LABELS), id=str(obj.get("review_id", "")))

    def doc_to_text(self, doc):
        return f"{USER}: {doc.fields['sentence']}{NL}{SYSTEM}: "


class _SquadMetric(Task):
    """Generation scored as the harness's ``jasquad`` metric does: exact match and F1 (see
    :mod:`jneox.evaluate.metrics`), each the best over the references, means in percent. The budget
    is the longest reference answer's token count (the harness's default ``DYNAMIC_MAX_LENGTH``);
    generation stops at ``<NL>``."""

    kind = "generation"

    def doc_to_target(self, doc):
        return doc.answers[0]

    def max_new_tokens(self, doc, tokenizer):
        return max(1, max(len(self.encode(tokenizer, a)) for a in doc.answers))

    def check_tools(self):
        metrics.normalize_answer("")  # no neologdn: stop before generating anything
        self._words = metrics.mecab_available()

    def score(self, doc, text, tokenizer):
        return metrics.squad_scores(text, doc.answers, words=getattr(self, "_words", True))

    def aggregate(self, samples):
        keys = ("exact_match", "f1", "f1_char")
        result = {k: 100.0 * sum(s[k] for s in samples) / len(samples) for k in keys if k in samples[0]}
        result.setdefault("f1", None)  # MeCab missing: see metrics.JA_TOOLS
        return result


class JSQuAD(_SquadMetric):
    """JGLUE JSQuAD in SQuAD v1.1 JSON: ``{"data": [{"title", "paragraphs": [{"context", "qas":
    [{"id", "question", "answers": [{"text", ...}]}]}]}]}``, or the HF dataset written out as JSON
    lines (``{"id", "title", "context", "question", "answers": {"text": [...], ...}}`` per line).
    The context is "title [SEP] text"; the prompt uses the part after the last ``[SEP]``.

    Harness: lm_eval/tasks/ja/jsquad.py, ``JSQuADWithRinnaInstructionSFT`` (VERSION 1.1,
    PROMPT_VERSION 0.4). A few-shot example shows the first reference answer.
    """

    name = "jsquad"
    version = "1.1"
    description = f"{USER}: 与えられた文脈から、質問に対する答えを抜き出してください。{NL}{SYSTEM_OK}"
    default_fewshot = 2

    def read(self, path):
        path = Path(path)
        if not path.is_file():
            raise DataError(path, None, "no such file")
        try:
            text = path.read_text(encoding="utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError:
            raise DataError(path, None, "invalid UTF-8") from None
        try:
            root = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # more than one document: JSON lines
                raise DataError(path, e.lineno, f"not valid JSON: {e.msg} (column {e.colno})") from None
            return super().read(path)
        if isinstance(root, dict) and "data" not in root and "question" in root:  # one line of JSON lines
            return super().read(path)
        return self._read_squad(path, root)

    def parse(self, obj, source):
        fields = {"title": _field(obj, "title"), "context": _field(obj, "context"), "question": _field(obj, "question")}
        return Doc(fields, source, answers=_answer_texts(obj), id=str(obj.get("id", "")))

    def _read_squad(self, path, root):
        docs = []
        where = "the top level"
        try:
            if not isinstance(root, dict):
                raise _Problem("expected a JSON object with a 'data' list (SQuAD v1.1)")
            for i, article in enumerate(_field(root, "data", list)):
                where = f"data[{i}]"
                title = _field(article, "title") if isinstance(article, dict) else None
                for j, paragraph in enumerate(_field(article, "paragraphs", list)):
                    where = f"data[{i}].paragraphs[{j}]"
                    _check_object(paragraph)
                    context = _field(paragraph, "context")
                    for k, qa in enumerate(_field(paragraph, "qas", list)):
                        where = f"data[{i}].paragraphs[{j}].qas[{k}]"
                        _check_object(qa)
                        answers = []
                        for a, answer in enumerate(_field(qa, "answers", list)):
                            where = f"data[{i}].paragraphs[{j}].qas[{k}].answers[{a}]"
                            _check_object(answer)
                            answers.append(_field(answer, "text"))
                        where = f"data[{i}].paragraphs[{j}].qas[{k}]"
                        if not answers:
                            raise _Problem("no answers")
                        fields = {"title": title, "context": context, "question": _field(qa, "question")}
                        docs.append(Doc(fields, f"{path}: {where}", answers=answers, id=str(qa.get("id", ""))))
        except _Problem as e:
            raise DataError(path, None, f"{where}: {e}") from None
        except AttributeError:  # an article that is not an object
            raise DataError(path, None, f"{where}: expected a JSON object") from None
        return docs

    def passage(self, doc):
        return doc.fields["context"].split("[SEP]")[-1].strip()

    def doc_to_text(self, doc):
        return f"{USER}: 文脈：{self.passage(doc)}{NL}質問：{doc.fields['question']}{NL}{SYSTEM}: "


class JSQuAD12(JSQuAD):
    """``JSQuADWithRinnaInstructionSFTV12`` (VERSION 1.2): the article's title on its own line before
    the passage."""

    version = "1.2"

    def doc_to_text(self, doc):
        return (f"{USER}: 文脈：{doc.fields['title']}{NL}{self.passage(doc)}{NL}質問：{doc.fields['question']}{NL}"
                f"{SYSTEM}: ")


def _answer_texts(obj: dict) -> list[str]:
    """Reference answers given as a list of strings (JAQKET's files), a list of ``{"text"}``
    objects (SQuAD's) or ``{"text": [...]}`` (the HF datasets')."""
    answers = _field(obj, "answers", (list, dict))
    if isinstance(answers, dict):
        answers = _field(answers, "text", list)
    texts = [a.get("text") if isinstance(a, dict) else a for a in answers]
    if not texts:
        raise _Problem("no answers")
    if not all(isinstance(t, str) for t in texts):
        raise _Problem("'answers' must hold strings (or objects with a 'text' string)")
    return texts


class JAQKETv2(_SquadMetric):
    """JAQKET v2 (the AI王 competition's questions with retrieved passages), one question per line:
    ``{"qid", "question", "answers", "ctxs"}`` where ``answers`` is a list of strings (or the HF
    dataset's ``{"text": [...]}``) and ``ctxs`` the retrieved passages, a list of ``{"title",
    "text"}`` (or the HF dataset's ``{"title": [...], "text": [...]}``).

    Harness: lm_eval/tasks/ja/jaqket_v2.py, ``JAQKETV2WithRinnaInstructionSFT`` (VERSION 0.1,
    PROMPT_VERSION 0.4): the first 10 passages' texts joined by ``<NL>``; metric as JSQuAD's.
    """

    name = "jaqket_v2"
    version = "0.1"
    description = f"{USER}: 与えられた文脈から、質問に対する答えを抜き出してください。{NL}{SYSTEM_OK}"
    default_fewshot = 1
    TOP_K = 10

    def parse(self, obj, source):
        ctxs = _field(obj, "ctxs", (list, dict))
        if isinstance(ctxs, dict):
            texts = _field(ctxs, "text", list)
        else:
            texts = []
            for i, c in enumerate(ctxs):
                if not isinstance(c, dict) or not isinstance(c.get("text"), str):
                    raise _Problem(f"ctxs[{i}] must be an object with a 'text' string")
                texts.append(c["text"])
        if not all(isinstance(t, str) for t in texts):
            raise _Problem("ctxs texts must be strings")
        fields = {"question": _field(obj, "question"), "passages": texts}
        return Doc(fields, source, answers=_answer_texts(obj), id=str(obj.get("qid", obj.get("id", ""))))

    def doc_to_text(self, doc):
        passages = NL.join(doc.fields["passages"][: self.TOP_K])
        return f"{USER}: 文脈：{passages}{NL}質問：{doc.fields['question']}{NL}{SYSTEM}: "


class XLSumJa(Task):
    """XL-Sum's Japanese part: ``{"id", "url", "title", "summary", "text"}`` per line (csebuetnlp's
    files and the HF dataset); the harness evaluates the test split.

    Harness: lm_eval/tasks/ja/xlsum_ja.py, ``XLSumJaWithRinnaInstructionSFT`` (VERSION 1.0,
    PROMPT_VERSION 0.4). Budget: the reference summary's token count plus 10; a context longer than
    the window less the budget has each shot's article cut after its last sentence (``。``) that
    fits in an equal share (:meth:`fit`). ROUGE-2 is computed over the model tokenizer's pieces:
    the task loads a MeCab tokenizer but the harness's evaluator replaces it with the model's
    (``LOAD_TOKENIZER``) before scoring; ``rouge2`` is the mean F-measure in percent (the harness
    reports the median of a random bootstrap of that mean, which differs from it by noise).
    """

    name = "xlsum_ja"
    version = "1.0"
    kind = "generation"
    description = f"{USER}: 与えられたニュース記事を要約してください。{NL}{SYSTEM_OK}"
    default_fewshot = 1
    split = "test"
    file_names = {"test": ("japanese_test.jsonl",), "train": ("japanese_train.jsonl",)}
    ARTICLE, ANSWER = f"{USER}: ", f"{NL}{SYSTEM}: "  # what the harness's preprocess_ctx splits at

    def parse(self, obj, source):
        return Doc({"text": _field(obj, "text"), "summary": _field(obj, "summary")}, source,
                   answers=[obj["summary"]], id=str(obj.get("id", "")))

    def doc_to_text(self, doc):
        return f"{USER}: ニュース記事:{doc.fields['text']}{NL}{SYSTEM}: "

    def doc_to_target(self, doc):
        return doc.fields["summary"]

    def max_new_tokens(self, doc, tokenizer):
        return len(self.encode(tokenizer, doc.fields["summary"])) + 10

    def fit(self, context, tokenizer, max_length):
        return self._fit(context, tokenizer, max_length).replace(NL + NL, NL)

    def _fit(self, context, tokenizer, max_length):
        if len(self.encode(tokenizer, context)) <= max_length:
            return context
        shots = [self.ARTICLE + c for c in context.split(self.ARTICLE)]
        head = ""
        if self.ANSWER not in shots[0]:
            head, shots = shots[0].replace(self.ARTICLE, ""), shots[1:]
        share = max_length // len(shots)
        out = head
        for shot in shots:
            text, _, summary = shot.partition(self.ANSWER)
            kept: list[str] = []
            for sentence in text.split("。"):
                if len(self.encode(tokenizer, "。".join(kept + [sentence]))) > share:
                    if kept:
                        kept[-1] += "。" + NL
                    else:  # one sentence longer than the share: its first tokens
                        kept.append(harness_decode(tokenizer, self.encode(tokenizer, sentence)[:share],
                                                   skip_special=True) + NL)
                    break
                kept.append(sentence)
            out += "。".join(kept) + self.ANSWER + summary
        return out

    def score(self, doc, text, tokenizer):
        pieces = lambda t: [tokenizer.id_to_piece(i) for i in self.encode(tokenizer, t)]
        return {"rouge2": metrics.rouge2(pieces(doc.fields["summary"]), pieces(text))}

    def aggregate(self, samples):
        return {"rouge2": 100.0 * sum(s["rouge2"] for s in samples) / len(samples)}


class XWinogradJa(Task):
    """XWinograd's Japanese part: ``{"sentence1", "sentence2", "answer": "1"|"2"}`` per line (the HF
    dataset the harness loads), or WinoGrande's shape ``{"sentence" with "_", "option1",
    "option2", "answer"}`` (the blank filled with each option).

    Harness: lm_eval/tasks/ja/xwinograd.py, ``XWinogradJA`` (VERSION 1.0, no prompt version): no
    prompt; each whole sentence is scored after ``</s>`` and the one with the higher log-likelihood
    is the answer (a tie counts as wrong); zero-shot only.
    """

    name = "xwinograd_ja"
    version = "1.0"
    default_fewshot = 0
    has_fewshot = False
    split = "test"  # the HF dataset's only split

    @classmethod
    def harness_name(cls):
        return cls.name  # the harness registers it without versions

    def parse(self, obj, source):
        answer = _field(obj, "answer", (str, int))
        if str(answer) not in ("1", "2"):
            raise _Problem(f"answer {answer!r} must be 1 or 2")
        if "sentence1" in obj or "sentence" not in obj:
            sentences = [_field(obj, "sentence1"), _field(obj, "sentence2")]
        else:
            sentence = _field(obj, "sentence")
            if "_" not in sentence:
                raise _Problem("field 'sentence' has no '_' blank to fill with option1 and option2")
            sentences = [sentence.replace("_", _field(obj, f"option{i}"), 1) for i in (1, 2)]
        return Doc(obj, source, sentences, int(answer) - 1)

    def doc_to_text(self, doc):
        return ""

    def context(self, doc, examples=()):
        if examples:
            raise UsageError("xwinograd_ja is zero-shot (its source has no training split)")
        return ""

    def requests(self, doc, context):
        return [("", c) for c in doc.choices]

    def choice_metrics(self, samples):
        wins = [s["loglikelihoods"][s["gold"]] > s["loglikelihoods"][1 - s["gold"]] for s in samples]
        return {"acc": sum(wins) / len(wins)}


class MGSM(Task):
    """MGSM's Japanese part: the HF dataset's ``{"question", "answer", "answer_number"}`` per line
    (the test split has no worked ``answer``; the training split's 8 exemplars do), or the
    published ``mgsm_ja.tsv`` (question TAB number, no header).

    Harness: lm_eval/tasks/ja/mgsm.py, ``MGSMWithRinnaInstructionSFT`` (VERSION 1.0, PROMPT_VERSION
    0.4): chain of thought after 「ステップごとの答え：」; greedy, at most 256 tokens, stopping at
    ``</s>`` (the harness's hf-causal model; its other stop, a raw newline, never comes out of this
    tokenizer, whose ``<NL>`` decodes as the text "<NL>"); examples dropped from the front until the
    context fits in the window less 256; the answer is the completion's last number
    (:func:`jneox.evaluate.metrics.last_number`).
    """

    name = "mgsm"
    version = "1.0"
    kind = "generation"
    description = f"{USER}: 与えられた問題をステップごとに解説してください。{NL}{SYSTEM_OK}"
    default_fewshot = 5
    split = "test"
    file_names = {"test": ("mgsm_ja.tsv",)}
    until = ("</s>", "\n")
    MAX_NEW_TOKENS = 256  # the harness's hf-causal max_gen_toks
    QUESTION = "問題："

    def read(self, path):
        path = Path(path)
        if path.suffix.lower() != ".tsv":
            return super().read(path)
        if not path.is_file():
            raise DataError(path, None, "no such file")
        docs = []
        try:
            lines = path.read_text(encoding="utf-8").removeprefix("\ufeff").splitlines()
        except UnicodeDecodeError:
            raise DataError(path, None, "invalid UTF-8") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            cells = line.split("\t")
            if len(cells) != 2:
                raise DataError(path, number, f"expected 2 tab-separated columns (question, number), got {len(cells)}")
            try:
                value = float(cells[1])
            except ValueError:
                raise DataError(path, number, f"answer {cells[1]!r} is not a number") from None
            obj = {"question": cells[0], "answer": None, "answer_number": int(value) if value.is_integer() else value}
            docs.append(Doc(obj, f"{path}:{number}", answers=[cells[1]]))
        return docs

    def parse(self, obj, source):
        _field(obj, "question")
        number = _field(obj, "answer_number", (int, float))
        if obj.get("answer") is not None:
            _field(obj, "answer")
        return Doc(obj, source, answers=[str(number)], id=str(obj.get("id", "")))

    def doc_to_text(self, doc):
        return f"{USER}: {self.QUESTION}{doc.fields['question'].replace(self.QUESTION, '')}{NL}{SYSTEM}: ステップごとの答え："

    def doc_to_target(self, doc):
        if not isinstance(doc.fields.get("answer"), str):
            raise DataError(doc.source.rsplit(":", 1)[0], None,
                            f"{doc.source}: a few-shot example needs the worked 'answer' (MGSM's training split)")
        return doc.fields["answer"].replace("ステップごとの答え：", "")

    def max_new_tokens(self, doc, tokenizer):
        return self.MAX_NEW_TOKENS

    def fit(self, context, tokenizer, max_length):
        while len(self.encode(tokenizer, context)) > max_length:
            parts = context.split(self.QUESTION)
            if len(parts) < 2:
                break  # the question alone is too long: generation keeps its last tokens
            del parts[1]
            context = self.QUESTION.join(parts)
        return context

    def score(self, doc, text, tokenizer):
        found = metrics.last_number(text)
        return {"extracted": found, "answer_number": doc.fields["answer_number"],
                "acc": float(found == doc.fields["answer_number"])}

    def aggregate(self, samples):
        return {"acc": sum(s["acc"] for s in samples) / len(samples)}


def _check_object(value) -> None:
    if not isinstance(value, dict):
        raise _Problem(f"expected a JSON object, got {type(value).__name__}")


class CustomTask(Task):
    """A multiple-choice task from a small YAML spec, so that one's own JSONL needs no code::

        name: capitals                         # optional (default: the spec's file name)
        description: "ユーザー: 首都を答えてください。<NL>システム: 分かりました。<NL>"   # optional
        template: "ユーザー: {country}の首都は？<NL>システム: "
        choices: ["{a}", "{b}", "{c}"]         # strings with {fields}; or the name of a list field
        label: answer                          # field: the right choice's index, or its text
        fewshot_sep: "<NL>"                    # optional (default <NL>)

    The prompt is built as the harness builds the JGLUE tasks' (description, examples, text).
    """

    KEYS = {"name", "description", "template", "choices", "label", "fewshot_sep"}

    def __init__(self, spec_path: str | Path):
        path = Path(spec_path)
        if not path.is_file():
            raise DataError(path, None, "no such file")
        try:
            spec = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise DataError(path, mark.line + 1 if mark else None, f"not valid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(spec, dict):
            raise DataError(path, 1, "expected a YAML mapping with template, choices and label")
        unknown = set(spec) - self.KEYS
        if unknown:
            raise DataError(path, None, f"unknown keys {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(self.KEYS))})")
        for key in ("template", "choices", "label"):
            if key not in spec:
                raise DataError(path, None, f"missing {key!r}")
        if not isinstance(spec["template"], str) or not isinstance(spec["label"], str):
            raise DataError(path, None, "'template' and 'label' must be strings")
        if not (isinstance(spec["choices"], str) or (isinstance(spec["choices"], list) and spec["choices"]
                                                     and all(isinstance(c, str) for c in spec["choices"]))):
            raise DataError(path, None, "'choices' must be a list of strings or the name of a list field")
        self.spec_path = path
        self.name = str(spec.get("name") or path.stem)
        self.description = str(spec.get("description") or "")
        self.fewshot_sep = str(spec.get("fewshot_sep", NL))
        self.template, self.choice_spec, self.label_field = spec["template"], spec["choices"], spec["label"]

    def parse(self, obj, source):
        if isinstance(self.choice_spec, str):
            choices = _field(obj, self.choice_spec, list)
            if not choices or not all(isinstance(c, str) for c in choices):
                raise _Problem(f"field {self.choice_spec!r} must be a non-empty list of strings")
        else:
            choices = [_format(c, obj) for c in self.choice_spec]
        label = _field(obj, self.label_field, (int, str))
        if isinstance(label, int):
            if not 0 <= label < len(choices):
                raise _Problem(f"{self.label_field} {label} out of range 0..{len(choices) - 1}")
            gold = label
        elif label in choices:
            gold = choices.index(label)
        else:
            raise _Problem(f"{self.label_field} {label!r} is not one of the choices {choices}")
        _format(self.template, obj)
        return Doc(obj, source, choices, gold, id=str(obj.get("id", "")))

    def doc_to_text(self, doc):
        return _format(self.template, doc.fields)

    def encode(self, tokenizer, text):
        return tokenizer.encode(text)  # one's own task: newlines are <NL>, as in every other jneox prompt


def _format(template: str, fields: dict) -> str:
    try:
        return template.format_map(fields)
    except KeyError as e:
        raise _Problem(f"missing field {e.args[0]!r} (fields: {', '.join(map(repr, fields)) or 'none'})") from None
    except (IndexError, ValueError) as e:
        raise _Problem(f"template {template!r}: {e}") from None


def harness_encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids as rinna's slow ``T5Tokenizer`` gave them to the harness (``add_special_tokens=False``):
    sentencepiece's own, ``<NL>`` written out in the text becoming the ``<NL>`` symbol and a raw
    newline staying whatever sentencepiece makes of it (jneox's :meth:`Tokenizer.encode` would turn
    it into ``<NL>``)."""
    return tokenizer.sp.EncodeAsIds(text)


def harness_decode(tokenizer: Tokenizer, ids: Sequence[int], skip_special: bool = False) -> str:
    """Text of ``ids`` as the slow ``T5Tokenizer`` decoded it for the harness: ``<NL>`` stays the
    text "<NL>", and ``</s>``, ``<unk>`` and the like are written out (dropped with ``skip_special``)."""
    out, run = [], []
    for i in ids:
        if i == tokenizer.nl_id or i in (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id, tokenizer.unk_id):
            out.append(tokenizer.decode(run))
            run = []
            if i == tokenizer.nl_id or not skip_special:
                out.append(tokenizer.id_to_piece(i))
        else:
            run.append(i)
    out.append(tokenizer.decode(run))
    return "".join(out)


TASK_CLASSES: list[type[Task]] = [JCommonsenseQA, JNLI11, JNLI, MARCJa, JSQuAD, JSQuAD12, JAQKETv2, XLSumJa,
                                  XWinogradJa, MGSM]
TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task], *, short: bool = True) -> type[Task]:
    """Make ``cls`` known to :func:`get_task` (and ``jneox eval --task/--tasks``) by its harness
    name and, with ``short``, by its short name (the last class registered under a short name wins)."""
    TASKS[cls.harness_name()] = cls
    if short:
        TASKS[cls.name] = cls
    return cls


for _cls in TASK_CLASSES:
    # the short names are the branch head's versions, except JSQuAD's (1.1, rinna's published run)
    register(_cls, short=_cls not in (JNLI11, JSQuAD12))


def get_task(name_or_spec: str | Path) -> Task:
    """A task by name (``jnli-1.1-0.4``, ``jnli``, ... see :data:`TASKS`) or from a YAML spec file."""
    if str(name_or_spec) in TASKS:
        return TASKS[str(name_or_spec)]()
    if str(name_or_spec).endswith((".yaml", ".yml")):
        return CustomTask(name_or_spec)
    raise UsageError(f"unknown task {name_or_spec!r}: expected one of {', '.join(TASKS)}, perplexity, chat "
                     f"or a .yaml spec of a multiple-choice task")


def split_file(task: Task, data_dir: str | Path, split: str) -> Path:
    """The file of ``split`` ("train", or the task's evaluated ``split``) in ``data_dir/<name>/``:
    the HF datasets' ``<split>.jsonl`` or ``<split>.json``, else the name the source publishes
    (JGLUE's ``valid-v1.1.json``, the newest version first; XL-Sum's ``japanese_test.jsonl``; ...)."""
    folder = Path(data_dir) / task.name
    names = [f"{split}.jsonl", f"{split}.json", *task.file_names.get(split, ())]
    for name in names:
        found = sorted(folder.glob(name), key=lambda p: _version_key(p.name), reverse=True)
        if found:
            return found[0]
    raise UsageError(f"{task.harness_name()}: no {split} file in {folder} (looked for {', '.join(names)}); "
                     f"or give it as --data/--fewshot-data {task.harness_name()}=FILE")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", name))


# ---- few-shot sampling, as the harness's evaluator and Task.fewshot_examples do -----------------
class FewshotSampler:
    """Few-shot examples from the training split, drawn with the harness's random stream.

    The harness shuffles the evaluated documents with ``random.Random(seed)`` (seed 42), keeps the
    first ``limit`` and then draws every document's examples from that same generator, in order:
    ``rnd.sample(train, k)``, or for stratified tasks ``int(share * k)`` examples per answer (the
    remainder to the smallest counts) followed by ``rnd.shuffle``.
    """

    def __init__(self, task: Task, train: Sequence[Doc], rnd: random.Random):
        self.task, self.train, self.rnd = task, list(train), rnd
        self.by_target: dict[str, list[Doc]] = {}
        for d in self.train:
            self.by_target.setdefault(task.doc_to_target(d), []).append(d)

    def draw(self, k: int) -> list[Doc]:
        if k == 0:
            return []
        if k > len(self.train):
            raise UsageError(f"{k} few-shot examples asked for, the few-shot data has {len(self.train)}")
        if not self.task.stratified:
            return self.rnd.sample(self.train, k)
        counts = {t: int(len(docs) / len(self.train) * k) for t, docs in self.by_target.items()}
        for _ in range(k - sum(counts.values())):
            counts[min(counts, key=counts.get)] += 1
        examples = [d for t, n in counts.items() for d in self.rnd.sample(self.by_target[t], n)]
        self.rnd.shuffle(examples)
        return examples
