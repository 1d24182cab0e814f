"""Question files for judged generation, in the shapes their benchmarks publish them.

* FastChat's ``question.jsonl`` (MT-Bench; Japanese MT-Bench and Rakuda v2 use it):
  ``{"question_id", "category", "turns": [user turn, ...], "reference": [answer, ...]?}``;
* ELYZA-tasks-100 (``test.csv``, or the HF dataset as JSON lines): ``input``, ``output``, ``eval_aspect``;
* Rakuda v1 (the HF dataset ``yuzuai/rakuda-questions``): ``{"question_id", "category", "question"}``.

Each line (row) becomes a :class:`Question`; anything else is a one-line ``FILE:LINE: problem`` error.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..train.data import DataError

MAX_TURNS = 16  # a question file's turn list is read into memory: refuse absurd ones before judging
ELYZA_FIELDS = ("input", "output", "eval_aspect")


@dataclass(frozen=True)
class Question:
    id: str
    category: str
    turns: tuple[str, ...]  # the user's turns
    references: tuple[str, ...] = ()  # reference answers, one per turn (FastChat), or ELYZA's model answer
    eval_aspect: str | None = None  # ELYZA's per-question grading criteria
    shape: str = "mt-bench"  # "mt-bench", "elyza" or "rakuda"


def _text(value, path, line: int, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError(path, line, f'"{field}" must be a non-empty string, got {value!r}')
    return value


def question_from_record(record, path, line: int, index: int) -> Question:
    """One record of any of the three shapes; ``index`` (1-based) names ELYZA's rows, which have no id."""
    if not isinstance(record, dict):
        raise DataError(path, line, f"expected a JSON object, got {type(record).__name__}")
    if "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, list) or not 1 <= len(turns) <= MAX_TURNS:
            raise DataError(path, line, f'"turns" must be a list of 1 to {MAX_TURNS} strings')
        refs = record.get("reference") or []
        if not isinstance(refs, list) or len(refs) > len(turns):
            raise DataError(path, line, '"reference" must be a list of at most one answer per turn')
        return Question(_id(record, path, line), str(record.get("category", "")),
                        tuple(_text(t, path, line, "turns") for t in turns),
                        tuple(_text(r, path, line, "reference") for r in refs))
    if all(f in record for f in ELYZA_FIELDS):
        return Question(str(record.get("question_id", index)), str(record.get("category", "elyza")),
                        (_text(record["input"], path, line, "input"),),
                        (_text(record["output"], path, line, "output"),),
                        _text(record["eval_aspect"], path, line, "eval_aspect"), shape="elyza")
    if "question" in record:
        return Question(_id(record, path, line), str(record.get("category", "")),
                        (_text(record["question"], path, line, "question"),), shape="rakuda")
    raise DataError(path, line, 'expected FastChat\'s "turns", ELYZA\'s "input"/"output"/"eval_aspect" or '
                                f'Rakuda\'s "question"; got the fields {sorted(record)}')


def _id(record, path, line: int) -> str:
    qid = record.get("question_id")
    if not isinstance(qid, (int, str)) or isinstance(qid, bool) or str(qid) == "":
        raise DataError(path, line, f'"question_id" must be a number or a string, got {qid!r}')
    return str(qid)


def read_questions(path: str | os.PathLike) -> list[Question]:
    """Every question of a ``.csv`` (ELYZA-tasks-100) or JSON-lines file, in file order; ids must be unique."""
    path = Path(path)
    questions: list[Question] = []
    try:
        if path.suffix.lower() == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                missing = [c for c in ELYZA_FIELDS if c not in (reader.fieldnames or [])]
                if missing:
                    raise DataError(path, 1, f"ELYZA-tasks-100's columns {list(ELYZA_FIELDS)} are needed; "
                                             f"missing {missing}")
                for row in reader:
                    questions.append(question_from_record(row, path, reader.line_num, len(questions) + 1))
        else:
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(path, number, f"not valid JSON: {e.msg}") from None
                    questions.append(question_from_record(record, path, number, len(questions) + 1))
    except OSError as e:
        raise DataError(path, None, f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not UTF-8 text: {e.reason}") from None
    if not questions:
        raise DataError(path, None, "no questions")
    seen = set()
    for q in questions:
        if q.id in seen:
            raise DataError(path, None, f"question_id {q.id!r} appears twice")
        seen.add(q.id)
    return questions
