"""Task files and prompt templates: JGLUE's own file shapes, the jp-stable harness's prompt version 0.4.

The templates are those of Stability-AI's lm-evaluation-harness, branch ``jp-stable``, which produced
rinna's published scores (``models/rinna/rinna-japanese-gpt-neox-3.6b-instruction-sft/harness.sh``
there: tasks ``jcommonsenseqa-1.1-0.4``, ``jnli-1.1-0.4``, ``marc_ja-1.1-0.4``, ``jsquad-1.1-0.4``).
Each class below names the harness class it follows. As in that harness, a prompt is the task's
description, then the few-shot examples (each its text and its answer) each followed by the
few-shot separator, then the question's text; the answer (continuation) is scored or generated
after it, with no leading space.

Every problem with a file is a :class:`DataError` naming ``FILE:LINE`` (``FILE: data[i]...`` inside
the one JSON document of a SQuAD file).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..chat import NL, SYSTEM, USER
from ..errors import UsageError
from ..train.data import DataError, _jsonl_lines

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

    name = ""
    kind = "multiple_choice"  # or "generation"
    description = ""
    fewshot_sep = NL
    stratified = False  # few-shot examples drawn per answer class (the harness's JNLI)
    balanced = False  # also balanced accuracy and macro-F1 (the harness's BalancedMultipleChoiceTask)
    default_fewshot = 0

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
    """JGLUE JNLI: ``{"sentence1", "sentence2", "label": "entailment"|"contradiction"|"neutral"}``.

    Harness: lm_eval/tasks/ja/jnli.py, ``JNLIWithRinnaInstructionSFT`` (PROMPT_VERSION 0.4) at the
    branch's head (its parent's VERSION 1.3): choices 含意, 矛盾, 中立 in the label order of the HF
    dataset; few-shot examples drawn stratified by answer. rinna's published run (June 2023,
    jnli-1.1-0.4) predates both changes: it used the choices entailment, contradiction, neutral and
    plain random sampling.
    """

    name = "jnli"
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


class MARCJa(Task):
    """JGLUE MARC-ja: ``{"sentence", "label": "positive"|"negative"}`` per line.

    Harness: lm_eval/tasks/ja/marc_ja.py, ``MARCJaWithRinnaInstructionSFT`` (VERSION 1.1,
    PROMPT_VERSION 0.4): choices ポジティブ, ネガティブ; plain random few-shot sampling.
    """

    name = "marc_ja"
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


class JSQuAD(Task):
    """JGLUE JSQuAD in SQuAD v1.1 JSON: ``{"data": [{"title", "paragraphs": [{"context", "qas":
    [{"id", "question", "answers": [{"text", ...}]}]}]}]}``. The context is "title [SEP] text"; the
    prompt uses the part after the last ``[SEP]``.

    Harness: lm_eval/tasks/ja/jsquad.py, ``JSQuADWithRinnaInstructionSFT`` (VERSION 1.1,
    PROMPT_VERSION 0.4). Generation is greedy, ends at ``<NL>`` (the harness's stop) or ``</s>``, and
    is at most as many tokens as the longest reference answer (the harness's default
    ``DYNAMIC_MAX_LENGTH``). A few-shot example shows the first reference answer.
    """

    name = "jsquad"
    kind = "generation"
    description = f"{USER}: 与えられた文脈から、質問に対する答えを抜き出してください。{NL}{SYSTEM_OK}"
    default_fewshot = 2

    def read(self, path):
        path = Path(path)
        if not path.is_file():
            raise DataError(path, None, "no such file")
        try:
            root = json.loads(path.read_text(encoding="utf-8").removeprefix("\ufeff"))
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, f"not valid JSON: {e.msg} (column {e.colno})") from None
        except UnicodeDecodeError:
            raise DataError(path, None, "invalid UTF-8") from None
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

    def doc_to_text(self, doc):
        passage = doc.fields["context"].split("[SEP]")[-1].strip()
        return f"{USER}: 文脈：{passage}{NL}質問：{doc.fields['question']}{NL}{SYSTEM}: "

    def doc_to_target(self, doc):
        return doc.answers[0]


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


def _format(template: str, fields: dict) -> str:
    try:
        return template.format_map(fields)
    except KeyError as e:
        raise _Problem(f"missing field {e.args[0]!r} (fields: {', '.join(map(repr, fields)) or 'none'})") from None
    except (IndexError, ValueError) as e:
        raise _Problem(f"template {template!r}: {e}") from None


TASKS = {cls.name: cls for cls in (JCommonsenseQA, JNLI, MARCJa, JSQuAD)}


def get_task(name_or_spec: str | Path) -> Task:
    """A task by name (jcommonsenseqa, jnli, marc_ja, jsquad) or from a YAML spec file."""
    if str(name_or_spec) in TASKS:
        return TASKS[str(name_or_spec)]()
    if str(name_or_spec).endswith((".yaml", ".yml")):
        return CustomTask(name_or_spec)
    raise UsageError(f"unknown task {name_or_spec!r}: expected one of {', '.join(TASKS)}, perplexity, chat "
                     f"or a .yaml spec of a multiple-choice task")


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
