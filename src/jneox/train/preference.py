"""Preference data: (prompt, chosen answer, rejected answer) pairs for ``jneox reward`` and ``jneox dpo``,
and the prompts of ``jneox ppo``.

Accepted JSONL lines:

* ``{"prompt": P, "chosen": "...", "rejected": "...", "margin": 1.0}``; ``P`` is a conversation in
  any shape ``jneox sft`` reads (``[{"speaker", "text"}, ...]``, ``{"messages": [{"role", "content"}]}``,
  a list of ``{"role", "content"}``) ending with a ユーザー turn, or a plain string (one ユーザー turn).
  ``margin`` (optional, a number) is the reward model's Bradley-Terry margin.
* Anthropic HH-RLHF records ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}``:
  Human becomes ユーザー, Assistant システム; the prompt is every turn before the last Assistant
  turn, which must be the same in both.

Each answer is encoded exactly as ``jneox sft`` encodes a システム turn (:func:`jneox.train.data._fit`,
the same prompt string as ``jneox.chat.format_prompt``, the answer's own pieces, ``</s>`` as the last
target), so the prompt/answer token boundary is the one inference and SFT use. A pair is two
:class:`~jneox.train.data.Example` rows whose labels mark the answer tokens.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..chat import SYSTEM, USER, ConversationError, Utterance, to_utterances
from .data import (IGNORE_INDEX, DataError, DataStats, Example, _conversation, _fail, _fit, _jsonl_lines, _names,
                   build_split, collate)
from .loop import Objective

HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
HH_SPEAKERS = {"Human": USER, "Assistant": SYSTEM}


@dataclass
class PreferenceRecord:
    """One line of preference data, before tokenization."""

    prompt: list[Utterance]  # ends with a ユーザー turn
    chosen: str
    rejected: str
    margin: float = 0.0


@dataclass
class PreferencePair:
    """One pair as token ids: both rows share the prompt's ids; ``labels`` mark the answer and its ``</s>``."""

    chosen: Example
    rejected: Example
    margin: float = 0.0


def _prompt(path: Path, number: int, value) -> list[Utterance]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(path, number, "'prompt' is an empty string")
        return [Utterance(USER, value)]
    try:
        if isinstance(value, dict) and ("messages" in value or "conversation" in value) or isinstance(value, list):
            turns = value.get("messages", value.get("conversation")) if isinstance(value, dict) else value
            if not isinstance(turns, list):
                raise DataError(path, number, f"'prompt': the turns must be a JSON array, got {type(turns).__name__}")
            turns = [t for t in turns if not (isinstance(t, dict) and t.get("role") == "system")]
            utts = to_utterances(turns)
        else:
            raise DataError(path, number, "'prompt' must be a string, a list of turns or {\"messages\": [...]}, "
                                          f"got {type(value).__name__}")
    except ConversationError as e:
        raise DataError(path, number, f"'prompt': {e}") from None
    if not utts:
        raise DataError(path, number, "'prompt' is an empty conversation")
    if utts[-1].speaker != USER:
        raise DataError(path, number, f"'prompt' must end with a {USER} turn (the answer is the {SYSTEM} turn after it)")
    return utts


def parse_hh(path: Path, number: int, field: str, text) -> list[Utterance]:
    """The turns of one HH-RLHF transcript (``\\n\\nHuman: ...\\n\\nAssistant: ...``)."""
    if not isinstance(text, str):
        raise DataError(path, number, f"'{field}' must be a string, got {type(text).__name__}")
    parts = HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(path, number, f"'{field}' is not an HH-RLHF transcript: expected it to start with "
                                      f"'\\n\\nHuman: ' (or give a 'prompt' field)")
    return [Utterance(HH_SPEAKERS[who], said.strip()) for who, said in zip(parts[1::2], parts[2::2])]


def _hh_record(path: Path, number: int, obj: dict) -> PreferenceRecord:
    chosen, rejected = parse_hh(path, number, "chosen", obj["chosen"]), parse_hh(path, number, "rejected", obj["rejected"])
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1].speaker != SYSTEM:
            raise DataError(path, number, f"'{name}' must end with an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(path, number, "'chosen' and 'rejected' differ before their last Assistant turn "
                                      "(the prompt must be the same)")
    prompt = chosen[:-1]
    if not prompt or prompt[-1].speaker != USER:
        raise DataError(path, number, "the last Assistant turn must follow a Human turn")
    return PreferenceRecord(prompt, chosen[-1].text, rejected[-1].text)


def _record(path: Path, number: int, obj) -> PreferenceRecord:
    if not isinstance(obj, dict):
        raise DataError(path, number, "expected a JSON object {\"prompt\", \"chosen\", \"rejected\"} "
                                      f"or an HH-RLHF record {{\"chosen\", \"rejected\"}}, got {type(obj).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing:
        raise DataError(path, number, f"no {' or '.join(map(repr, missing))} field (keys: {', '.join(map(repr, obj)) or 'none'})")
    if "prompt" not in obj:
        record = _hh_record(path, number, obj)
    else:
        for name in ("chosen", "rejected"):
            if not isinstance(obj[name], str):
                raise DataError(path, number, f"'{name}' must be a string, got {type(obj[name]).__name__}")
        record = PreferenceRecord(_prompt(path, number, obj["prompt"]), obj["chosen"], obj["rejected"])
    for name in ("chosen", "rejected"):
        if not getattr(record, name).strip():
            raise DataError(path, number, f"'{name}' is an empty answer")
    if record.chosen == record.rejected:
        raise DataError(path, number, "'chosen' and 'rejected' are the same answer")
    if "margin" in obj:
        margin = obj["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise DataError(path, number, f"'margin' must be a number, got {type(margin).__name__}")
        record.margin = float(margin)
    return record


def _read_lines(paths: Iterable, parse, what: str, skip_bad_lines: bool, stats: DataStats | None) -> list:
    """``parse(path, line number, object)`` of every JSONL line of ``paths``; DataError: FILE:LINE."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out = []
    for p in paths:
        path = Path(p)
        for number, obj in _jsonl_lines(path, skip_bad_lines, stats):
            try:
                out.append(parse(path, number, obj))
            except DataError as e:
                _fail(e, skip_bad_lines, stats)
    if not out:
        raise DataError(_names(paths), None, f"no {what} to train on")
    return out


def read_preferences(paths: Iterable, skip_bad_lines: bool = False, stats: DataStats | None = None) -> list[PreferenceRecord]:
    """The preference records of JSONL files (see the module docstring for the shapes)."""
    return _read_lines(paths, _record, "preference pairs", skip_bad_lines, stats)


def read_prompts(paths: Iterable, skip_bad_lines: bool = False, stats: DataStats | None = None) -> list[list[Utterance]]:
    """Prompts for PPO: preference records (their prompt), ``{"prompt": ...}`` lines, or conversations
    in ``jneox sft``'s shapes (everything before the last システム turn)."""
    def parse(path: Path, number: int, obj) -> list[Utterance]:
        if isinstance(obj, dict) and ("prompt" in obj or "chosen" in obj):
            return _prompt(path, number, obj["prompt"]) if "prompt" in obj else _record(path, number, obj).prompt
        prompt = _conversation(path, number, obj, stats)[:-1]
        if not prompt:
            raise DataError(path, number, f"the conversation starts with a {SYSTEM} turn: no prompt")
        return prompt

    return _read_lines(paths, parse, "prompts", skip_bad_lines, stats)


def encode_answer(prompt: Sequence[Utterance], answer: str, tokenizer, max_len: int,
                  stats: DataStats | None = None) -> Example:
    """``prompt`` + a システム ``answer`` as ``jneox sft`` encodes it, with labels (the answer's tokens
    and ``</s>``) on the answer only: earlier システム turns of the prompt are context here."""
    ids, labels, dropped, truncated = _fit([*prompt, Utterance(SYSTEM, answer)], tokenizer, max_len)
    start = len(labels)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:  # the answer's span is the last one (a ユーザー turn precedes it)
        start -= 1
    labels = [IGNORE_INDEX] * start + labels[start:]
    if stats is not None:
        stats.dropped_turns += dropped
        stats.truncated_examples += truncated
    return Example(ids, labels)


def encode_pair(record: PreferenceRecord, tokenizer, max_len: int, stats: DataStats | None = None) -> PreferencePair:
    return PreferencePair(encode_answer(record.prompt, record.chosen, tokenizer, max_len, stats),
                          encode_answer(record.prompt, record.rejected, tokenizer, max_len, stats), record.margin)


def build_preference_data(paths, tokenizer, max_len: int, val_paths=None, val_fraction: float = 0.05, seed: int = 0,
                          skip_bad_lines: bool = False) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, val) pairs; the val set is ``val_paths`` or a seeded ``val_fraction`` of the records."""
    stats = DataStats()
    train, val = build_split(paths, val_paths, read_preferences, lambda r: encode_pair(r, tokenizer, max_len, stats),
                             val_fraction, seed, skip_bad_lines, stats)
    if not train:
        raise DataError(_names(paths if isinstance(paths, (list, tuple)) else [paths]), None,
                        "no training pairs left after the held-out split")
    return train, val


@dataclass
class PairBatch:
    """``2B`` rows: the ``B`` chosen answers, then the ``B`` rejected ones (one forward pass for both),
    plus per-pair ``margin``, ``weight`` (0 for eval's wrap-around rows) and, for DPO, the
    reference model's log-probabilities."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    margin: torch.Tensor
    weight: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def __iter__(self):  # the Trainer reads the input ids as batch[0] and moves tensors as a tuple
        return iter((self.input_ids, self.labels, self.margin, self.weight, self.ref_chosen, self.ref_rejected))

    def __getitem__(self, i):
        return tuple(self)[i]

    @classmethod
    def of(cls, fields) -> "PairBatch":
        return fields if isinstance(fields, PairBatch) else cls(*fields)

    @property
    def pairs(self) -> int:
        return self.margin.shape[0]


class PairObjective(Objective):
    """Base of the objectives that average a loss over preference pairs (reward, DPO)."""

    per_token = False

    def count(self, batch) -> float:
        return float(PairBatch.of(batch).weight.sum())

    def drop_rows(self, batch, keep):
        batch = PairBatch.of(batch)
        batch.weight = batch.weight * keep
        return batch


def collate_pairs(pairs: Sequence, pad_id: int) -> PairBatch:
    """Right-padded rows of the chosen answers then the rejected ones; ``pairs`` are
    :class:`PreferencePair` or ``(PreferencePair, ref_chosen, ref_rejected)`` for DPO."""
    with_ref = bool(pairs) and isinstance(pairs[0], tuple)
    items = [p[0] for p in pairs] if with_ref else list(pairs)
    input_ids, labels = collate([p.chosen for p in items] + [p.rejected for p in items], pad_id)
    batch = PairBatch(input_ids, labels, torch.tensor([p.margin for p in items], dtype=torch.float32),
                      torch.ones(len(items)))
    if with_ref:
        batch.ref_chosen = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
        batch.ref_rejected = torch.tensor([p[2] for p in pairs], dtype=torch.float64)
    return batch


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log π(label | prefix) at every position (0 where the label is -100), in fp32, at ``temperature``."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != IGNORE_INDEX)


def answer_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the log-probabilities of the answer tokens, their count) per row, in fp32."""
    return token_logps(logits, labels).sum(-1), (labels != IGNORE_INDEX).sum(-1)


def last_answer_index(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the position of the last answer token as an input (its label is ``</s>``): where a
    reward model reads its score, like transformers reads the last non-padding token."""
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    return torch.where(labels != IGNORE_INDEX, positions, -1).max(dim=1).values
