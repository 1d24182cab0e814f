#!/usr/bin/env python3
"""Question-answer pairs from the Japanese Debian FAQ, as conversations in the model card's shape.

Each FAQ section whose heading is a question becomes one conversation:
``[{"speaker": "ユーザー", "text": question}, {"speaker": "システム", "text": answer}]``,
where the answer is the start of the section's first paragraphs, cut at a sentence end so that
it stays short (a small model learns short answers best) and mostly Japanese.

    python recipes/demo/faq_pairs.py --out ~/.cache/jneox/demo/faq_pairs.jsonl

The package is fetched and unpacked like the corpus (see make_corpus.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from japanese import count_japanese, japanese_ratio  # noqa: E402
from make_corpus import DEFAULT_CACHE, fetch_packages, looks_like_code, parse_html  # noqa: E402

FAQ_PACKAGES = ("debian-faq-ja",)
MAX_ANSWER_CHARS = 200  # answers are cut at the last sentence end before this many characters
MIN_ANSWER_JAPANESE_CHARS = 15
MIN_ANSWER_JAPANESE_RATIO = 0.6  # FAQ answers name software in Latin letters; keep mostly-Japanese ones
MIN_QUESTION_JAPANESE_CHARS = 3
SENTENCE_END = "。！？!?"
QUESTION_END = re.compile(r"(\?|？|か|か。|の|は)$")
SECTION_NUMBER = re.compile(r"^(第?\d+(\.\d+)*[章.]?\s*)+")


def clean_question(heading: str) -> str | None:
    """A heading without its section number if it is a question in Japanese, else None."""
    question = SECTION_NUMBER.sub("", heading).strip()
    question = question.replace("。。。", "…")
    if count_japanese(question) < MIN_QUESTION_JAPANESE_CHARS or not QUESTION_END.search(question):
        return None
    if question.endswith("?"):
        question = question[:-1] + "？"
    return question


BRACKET_PAIRS = ("()", "（）", "「」", "『』", "[]")


def balanced(text: str) -> bool:
    """No bracket or Japanese quote left open or closed without its partner (a cut mid-aside)."""
    return all(text.count(open_) == text.count(close) for open_, close in BRACKET_PAIRS)


def short_answer(paragraphs: list[str]) -> str | None:
    """The section's opening sentences, at most MAX_ANSWER_CHARS long, or None if nothing fits.

    Paragraphs that introduce a list (ending with a colon) or that are code or English are skipped.
    """
    answer = ""
    for paragraph in paragraphs:
        if looks_like_code(paragraph) or japanese_ratio(paragraph) < MIN_ANSWER_JAPANESE_RATIO:
            if answer:
                break
            continue
        if paragraph.rstrip().endswith((":", "：")):
            if answer:
                break
            continue
        candidate = (answer + paragraph) if answer else paragraph
        if len(candidate) <= MAX_ANSWER_CHARS:
            answer = candidate
            if not answer.endswith(tuple(SENTENCE_END)):
                break
            continue
        cut = max(candidate.rfind(end, 0, MAX_ANSWER_CHARS) for end in SENTENCE_END)
        if cut > len(answer):
            answer = candidate[: cut + 1]
        break
    if not answer.endswith(tuple(SENTENCE_END)):
        cut = max(answer.rfind(end) for end in SENTENCE_END)
        answer = answer[: cut + 1] if cut >= 0 else ""
    if (
        count_japanese(answer) < MIN_ANSWER_JAPANESE_CHARS
        or japanese_ratio(answer) < MIN_ANSWER_JAPANESE_RATIO
        or not balanced(answer)
    ):
        return None
    return answer


def faq_pairs_from_html(data: bytes) -> list[tuple[str, str]]:
    """(question, answer) for every question heading of one FAQ page that has a usable answer."""
    parsed = parse_html(data)
    pairs: list[tuple[str, str]] = []
    sections: list[tuple[str, list[str]]] = []
    for paragraph, is_heading in zip(parsed.paragraphs, parsed.headings):
        if is_heading:
            sections.append((paragraph, []))
        elif sections:
            sections[-1][1].append(paragraph)
    for heading, body in sections:
        question = clean_question(heading)
        answer = short_answer(body) if question else None
        if question and answer:
            pairs.append((question, answer))
    return pairs


def write_jsonl(rows: list, out: Path) -> None:
    """Write one JSON value per line, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as writer:
            for row in rows:
                writer.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, out)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_CACHE / "faq_pairs.jsonl", help="output JSONL file")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where .deb files are downloaded and unpacked")
    parser.add_argument("--no-fetch", action="store_true", help="use the already unpacked package in --cache/root")
    args = parser.parse_args(argv)
    root = args.cache / "root"
    if not args.no_fetch:
        root = fetch_packages(list(FAQ_PACKAGES), args.cache)
    conversations, seen = [], set()
    for package in FAQ_PACKAGES:
        pages = sorted((root / package).rglob("*.html"))
        if not pages:
            raise SystemExit(f"error: no HTML pages under {root / package}")
        for page in pages:
            for question, answer in faq_pairs_from_html(page.read_bytes()):
                if question in seen:
                    continue
                seen.add(question)
                conversations.append([{"speaker": "ユーザー", "text": question}, {"speaker": "システム", "text": answer}])
    write_jsonl(conversations, args.out)
    print(f"wrote {len(conversations)} question-answer pairs -> {args.out}")


if __name__ == "__main__":
    main()
