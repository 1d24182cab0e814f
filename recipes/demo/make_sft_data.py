#!/usr/bin/env python3
"""Assemble the demo model's SFT data: hand-written conversations + FAQ pairs -> train / held-out.

Every conversation is written in the model card's shape, one per line:
``[{"speaker": "ユーザー", "text": ...}, {"speaker": "システム", "text": ...}, ...]``.
Input lines may also be ``{"conversation": [...]}`` or ``{"messages": [{"role", "content"}]}``.

Exact duplicates (ignoring whitespace) are dropped.  A fixed share of the hand-written
conversations is held out, chosen by a hash of the first question: the split does not move
when conversations are added or reordered, and conversations opening with the same question
always land on the same side.  FAQ pairs only go to training (their answers are long
extracts, not the replies the model should learn to give in evaluation).

    python recipes/demo/make_sft_data.py --faq faq_pairs.jsonl --out-dir OUT
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

from jneox.chat import SYSTEM, USER, ConversationError, Utterance, format_prompt, to_utterances

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faq_pairs import write_jsonl  # noqa: E402

RECIPE_DIR = Path(__file__).resolve().parent
DEFAULT_CONVERSATIONS = RECIPE_DIR / "data" / "conversations"
DEFAULT_HELDOUT_PERCENT = 8


class ConversationFileError(ValueError):
    """A conversation line that cannot be used; the message names the file and line."""


def parse_conversation(value: object) -> list[Utterance]:
    """One JSON value as a checked conversation: starts with the user, alternates, ends with the system."""
    if isinstance(value, dict) and "conversation" in value:
        value = value["conversation"]
    elif isinstance(value, dict) and "messages" in value:
        value = [m for m in value["messages"] if not (isinstance(m, dict) and m.get("role") == "system")]
    if not isinstance(value, list) or not value:
        raise ConversationError("expected a non-empty list of turns (the card's shape)")
    turns = to_utterances(value)
    for index, turn in enumerate(turns):
        expected = USER if index % 2 == 0 else SYSTEM
        if turn.speaker != expected:
            raise ConversationError(f"turn {index} is spoken by {turn.speaker}, expected {expected} (turns alternate, user first)")
        if not turn.text.strip():
            raise ConversationError(f"turn {index} has empty text")
    if turns[-1].speaker != SYSTEM:
        raise ConversationError(f"the last turn must be the {SYSTEM}'s answer")
    return turns


def read_conversation_file(path: Path) -> list[list[Utterance]]:
    """All conversations of a JSONL file; any bad line is an error naming ``path:LINE``."""
    conversations = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                conversations.append(parse_conversation(json.loads(line)))
            except json.JSONDecodeError as error:
                raise ConversationFileError(f"{path}:{number}: not valid JSON: {error.msg}") from None
            except ConversationError as error:
                raise ConversationFileError(f"{path}:{number}: {error}") from None
    return conversations


def conversation_files(paths: list[Path]) -> list[Path]:
    """JSONL files given directly or found (sorted) in the given folders."""
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(path.glob("*.jsonl")) if path.is_dir() else [path])
    return files


def normalized(text: str) -> str:
    return re.sub(r"\s+", "", text)


def conversation_key(turns: list[Utterance]) -> str:
    return "\x00".join(f"{t.speaker}\x01{normalized(t.text)}" for t in turns)


def is_heldout(turns: list[Utterance], percent: int) -> bool:
    """Stable choice by the first question: the same question is always on the same side."""
    digest = hashlib.sha256(normalized(turns[0].text).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < percent


def deduplicate(conversations: list[list[Utterance]]) -> list[list[Utterance]]:
    seen: set[str] = set()
    unique = []
    for turns in conversations:
        key = conversation_key(turns)
        if key not in seen:
            seen.add(key)
            unique.append(turns)
    return unique


def split_sft_data(
    handwritten: list[list[Utterance]], faq: list[list[Utterance]], heldout_percent: int = DEFAULT_HELDOUT_PERCENT
) -> tuple[list[list[Utterance]], list[list[Utterance]]]:
    """(train, heldout): deduplicated; held-out ones are hand-written only; FAQ pairs already in the
    hand-written set are not added twice."""
    handwritten = deduplicate(handwritten)
    heldout = [c for c in handwritten if is_heldout(c, heldout_percent)]
    train = [c for c in handwritten if not is_heldout(c, heldout_percent)]
    heldout_questions = {normalized(c[0].text) for c in heldout}
    known = {conversation_key(c) for c in handwritten}
    train += [c for c in deduplicate(faq) if conversation_key(c) not in known and normalized(c[0].text) not in heldout_questions]
    return train, heldout


def as_card_json(turns: list[Utterance]) -> list[dict[str, str]]:
    return [{"speaker": t.speaker, "text": t.text} for t in turns]


def write_tokenizer_text(conversations: list[list[Utterance]], path: Path) -> None:
    """The training conversations exactly as the model reads them (``<NL>`` joined, one per line), so the
    tokenizer learns pieces for the speaker names and the conversational Japanese the corpus lacks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(format_prompt(turns, add_generation_prompt=False) + "\n" for turns in conversations)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text, encoding="utf-8")
    temp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=Path, nargs="+", default=[DEFAULT_CONVERSATIONS],
                        help="hand-written conversation JSONL files or folders of them")
    parser.add_argument("--faq", type=Path, nargs="*", default=[], help="FAQ pair JSONL files (faq_pairs.py)")
    parser.add_argument("--out-dir", type=Path, required=True, help="where train.jsonl and heldout.jsonl go")
    parser.add_argument("--heldout-percent", type=int, default=DEFAULT_HELDOUT_PERCENT,
                        help="share of hand-written conversations held out (by a hash of the first question)")
    parser.add_argument("--tokenizer-text", type=Path,
                        help="also write the training conversations as prompt text, for the tokenizer")
    args = parser.parse_args(argv)
    if not 0 <= args.heldout_percent < 100:
        parser.error("--heldout-percent must be in [0, 100)")
    files = conversation_files(args.conversations)
    if not files:
        parser.error(f"no conversation files in {' '.join(map(str, args.conversations))}")
    try:
        handwritten = [c for f in files for c in read_conversation_file(f)]
        faq = [c for f in args.faq for c in read_conversation_file(f)]
    except (ConversationFileError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    train, heldout = split_sft_data(handwritten, faq, args.heldout_percent)
    write_jsonl([as_card_json(c) for c in train], args.out_dir / "train.jsonl")
    write_jsonl([as_card_json(c) for c in heldout], args.out_dir / "heldout.jsonl")
    if args.tokenizer_text:
        write_tokenizer_text(train, args.tokenizer_text)
    print(
        f"{len(handwritten)} hand-written conversations from {len(files)} files, {len(faq)} FAQ pairs -> "
        f"{len(train)} train, {len(heldout)} held out ({args.out_dir})"
    )


if __name__ == "__main__":
    main()
