"""Training data: raw text for pretraining, conversations for supervised fine-tuning.

Conventions shared with the training loop:

* pretraining rows come from :func:`pack_documents`: ``row[:-1]`` are the inputs, ``row[1:]`` the targets;
* fine-tuning examples hold ``input_ids`` and ``labels`` of the same length, where ``labels[t]`` is the
  token the model must predict *after* ``input_ids[t]`` (already shifted, like the pretraining targets;
  ``-100`` where there is no loss). So one loss, ``cross_entropy(logits.flatten(0, 1), labels.flatten(),
  ignore_index=-100)``, serves both, with no further shift.

The shifted labels are what lets every answer end with ``</s>`` while the context of the next turn
stays exactly what inference feeds the model: the ``</s>`` is a target, never an input, just as
:mod:`jneox.chat` never puts ``</s>`` into the history of a prompt.

Every problem with the data is a :class:`DataError` that names the file and line (``path:LINE: problem``);
with ``skip_bad_lines`` the bad line is counted in a :class:`DataStats` and skipped instead.
"""
from __future__ import annotations

import json
import random
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

try:
    import orjson  # optional: reads JSONL chunks faster (jsonl_texts); json reads the same texts
except ImportError:
    orjson = None

from .. import kernels
from ..chat import NL, SYSTEM, USER, ConversationError, Utterance, escape, to_utterances
from ..errors import JneoxError, UsageError

IGNORE_INDEX = -100  # the label of a position without loss (torch's cross_entropy default)


class DataError(JneoxError):
    """Bad training data; the message names the file and line: ``path:LINE: problem``."""

    def __init__(self, path, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


@dataclass
class DataStats:
    """What reading and encoding left out, so that the caller can report it."""

    skipped_lines: int = 0  # bad lines (and empty files) skipped with skip_bad_lines
    skipped: list[str] = field(default_factory=list)  # the first few of their messages
    system_prompts_dropped: int = 0  # leading {"role": "system"} messages (the card's format has none)
    trailing_user_turns_dropped: int = 0  # ユーザー turns after the last システム turn: nothing to learn there
    dropped_turns: int = 0  # oldest turns dropped so that a conversation fits max_len
    truncated_examples: int = 0  # a single exchange longer than max_len, cut (see encode_conversation)

    MAX_MESSAGES = 5

    def skip(self, error: DataError) -> None:
        self.skipped_lines += 1
        if len(self.skipped) < self.MAX_MESSAGES:
            self.skipped.append(str(error))

    def summary(self) -> str:
        """One line for the log; empty when nothing was left out."""
        parts = []
        if self.skipped_lines:
            parts.append(f"skipped {self.skipped_lines} bad lines (first: {self.skipped[0]})")
        if self.system_prompts_dropped:
            parts.append(f"dropped {self.system_prompts_dropped} 'system' role messages")
        if self.trailing_user_turns_dropped:
            parts.append(f"dropped {self.trailing_user_turns_dropped} trailing {USER} turns")
        if self.dropped_turns:
            parts.append(f"dropped {self.dropped_turns} oldest turns of over-long conversations")
        if self.truncated_examples:
            parts.append(f"cut {self.truncated_examples} exchanges longer than max_len")
        return "; ".join(parts)


def _fail(error: DataError, skip_bad_lines: bool, stats: DataStats | None) -> None:
    if not skip_bad_lines:
        raise error
    if stats is not None:
        stats.skip(error)


def _open(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DataError(path, None, "no such file") from None
    except IsADirectoryError:
        raise DataError(path, None, "is a directory, expected a text or .jsonl file") from None


def _read_bytes(path: Path) -> bytes:
    with _open(path) as fh:
        return fh.read()


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text of a file; invalid bytes are an error naming the line they are on."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(path, line, f"invalid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                                    f"training data must be UTF-8") from None
    return text.removeprefix("\ufeff")


def _json_line(path: Path, number: int, raw: bytes):
    """The parsed JSON of one raw line; a DataError naming ``path:number``."""
    try:
        line = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise DataError(path, number, "invalid UTF-8; training data must be UTF-8") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(path, number, f"not valid JSON: {e.msg} (column {e.colno})") from None


def _jsonl_lines(path: Path, skip_bad_lines: bool, stats: DataStats | None) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of every non-blank line of a JSONL file, read as a stream."""
    found = False
    with _open(path) as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            found = True
            try:
                obj = _json_line(path, number, raw)
            except DataError as e:
                _fail(e, skip_bad_lines, stats)
                continue
            yield number, obj
    if not found:
        _fail(DataError(path, 1, "the file is empty"), skip_bad_lines, stats)


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".ndjson")


# ---- pretraining ------------------------------------------------------------------------------
def jsonl_document(path, number: int, obj, text_field: str) -> str:
    """The text of one parsed JSONL line; a DataError naming ``path:number`` if it has none."""
    if not isinstance(obj, dict):
        problem = f"expected a JSON object with a {text_field!r} field, got {type(obj).__name__}"
    elif text_field not in obj:
        problem = f"no {text_field!r} field (keys: {', '.join(map(repr, obj)) or 'none'})"
    elif not isinstance(obj[text_field], str):
        problem = f"field {text_field!r} must be a string, got {type(obj[text_field]).__name__}"
    else:
        return obj[text_field]
    raise DataError(path, number, problem)


def parse_jsonl_line(path, number: int, raw: bytes, text_field: str) -> str:
    """The text of one raw JSONL line (UTF-8, JSON, the field); a DataError naming ``path:number``."""
    return jsonl_document(path, number, _json_line(path, number, raw), text_field)


def jsonl_texts(data: bytes, text_field: str) -> list[str] | None:
    """The ``text_field`` string of every line of ``data`` (whole JSONL lines) in one pass with orjson,
    or None where that pass cannot stand for :func:`parse_jsonl_line` line by line: orjson missing, or
    any line blank or not a JSON object with that string field. orjson accepts a subset of what json
    reads (no NaN, no lone surrogate, no BOM, 64-bit integers) and reads it to the same value, so the
    texts are the same; the caller reads a None chunk line by line, which names the bad line."""
    if orjson is None:
        return None
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline ending the last line opens no new one
    loads = orjson.loads
    try:
        texts = [loads(line)[text_field] for line in lines]
    except (orjson.JSONDecodeError, KeyError, TypeError):  # TypeError: a line that is not an object
        return None
    return texts if all(type(t) is str for t in texts) else None


def jsonl_utf8_texts(data: bytes, text_field: str, newlines: bool) -> list[bytes] | None:
    """The ``text_field`` string of every line of ``data`` (whole JSONL lines) as the UTF-8 bytes the
    tokenizer encodes, newlines already written as ``<NL>`` when ``newlines``
    (:meth:`Tokenizer.encode_utf8_batch`), in one compiled pass (:func:`jneox.kernels.jsonl_texts`). None
    where the kernels are off (``JNEOX_KERNELS=0``, no compiler) or where the scanner does not take the
    chunk: it takes only lines that :func:`parse_jsonl_line` certainly reads to the same text, and leaves
    the others (and anything unusual) to :func:`jsonl_texts` and the line-by-line path."""
    lib = kernels.library()
    return None if lib is None else kernels.jsonl_texts(lib, data, text_field, newlines)


def text_document(path, data: bytes) -> str:
    """A whole text file as one document; a DataError for invalid UTF-8 (with its line) or no text."""
    text = _decode(Path(path), data)
    if not text.strip():
        raise DataError(path, 1, "the file is empty")
    return text


def read_documents(paths: Iterable, text_field: str = "text", skip_bad_lines: bool = False,
                   stats: DataStats | None = None) -> Iterator[str]:
    """The documents of ``paths``: a ``.jsonl`` file holds one per line (``{text_field: "..."}``),
    any other file is one UTF-8 document. No documents at all is an error."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    count = 0
    for p in paths:
        path = Path(p)
        if is_jsonl(path):
            for number, obj in _jsonl_lines(path, skip_bad_lines, stats):
                try:
                    text = jsonl_document(path, number, obj, text_field)
                except DataError as e:
                    _fail(e, skip_bad_lines, stats)
                    continue
                count += 1
                yield text
        else:
            data = _read_bytes(path)  # a missing file is never skipped
            try:
                text = text_document(path, data)
            except DataError as e:
                _fail(e, skip_bad_lines, stats)
                continue
            count += 1
            yield text
    if count == 0:
        raise DataError(_names(paths), None, "no documents to train on")


def pack_documents(docs_token_ids: Iterable[Sequence[int]], block_size: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents, each followed by ``</s>``, and cut the stream into rows of
    ``block_size + 1`` tokens (inputs ``row[:-1]``, targets ``row[1:]``); the remainder is dropped."""
    if block_size < 1:
        raise UsageError(f"block_size must be at least 1, got {block_size}")
    stream = array("q")
    for ids in docs_token_ids:
        stream.extend(ids)
        stream.append(eos_id)
    row = block_size + 1
    n_blocks = len(stream) // row
    if n_blocks == 0:
        return torch.empty(0, row, dtype=torch.long)
    return torch.frombuffer(stream, dtype=torch.long, count=n_blocks * row).clone().view(n_blocks, row)


def held_out_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """The sorted indices of the documents pretraining holds out: a seeded ``val_fraction`` of
    ``n_docs`` (at least one when there are two or more, never all), drawn without a list of all the
    documents, so that it costs memory for the held-out ones only."""
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = 0 if val_fraction == 0 or n_docs < 2 else min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    if n_val == 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n_docs, n_val, replace=False)).astype(np.int64)


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic document-level split: (train indices, val indices), both sorted.

    At least one document is held out when there are two or more and ``val_fraction > 0``, and at
    least one is kept for training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def build_pretrain_data(paths, tokenizer, block_size: int, val_fraction: float = 0.01, seed: int = 0,
                        text_field: str = "text", skip_bad_lines: bool = False,
                        stats: DataStats | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize the documents of ``paths`` and pack them into (train, val) rows of ``block_size + 1``.

    The held-out split is by document (:func:`held_out_documents`, seeded, so the same files give the
    same split, the one :mod:`jneox.train.corpus` makes of the same documents tokenized into shards). A single
    document cannot be split that way: then its last ``val_fraction`` of blocks (at least one, when
    there are two) is held out instead. Too little text for one training block is an error.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    stats = stats if stats is not None else DataStats()
    docs = []
    for text in tqdm(read_documents(paths, text_field, skip_bad_lines, stats), desc="tokenizing", unit=" docs"):
        docs.append(array("q", tokenizer.encode(text)))  # Tokenizer.encode writes newlines as <NL>
    if stats.summary():
        print(f"jneox: {stats.summary()}", file=sys.stderr)
    n_tokens = sum(len(d) + 1 for d in docs)
    if n_tokens < block_size + 1:
        raise DataError(_names(paths), None, f"{n_tokens} tokens (with </s> after each document) are too few "
                                             f"for one block of {block_size + 1}; add text or lower the block size")
    if len(docs) < 2:
        blocks = pack_documents(docs, block_size, tokenizer.eos_id)
        n_val = 0 if val_fraction == 0 or len(blocks) < 2 else min(len(blocks) - 1, max(1, round(len(blocks) * val_fraction)))
        return blocks[:len(blocks) - n_val], blocks[len(blocks) - n_val:]
    held = held_out_documents(len(docs), val_fraction, seed)
    val_idx = held.tolist()
    train_idx = sorted(set(range(len(docs))) - set(val_idx))
    train = pack_documents((docs[i] for i in train_idx), block_size, tokenizer.eos_id)
    val = pack_documents((docs[i] for i in val_idx), block_size, tokenizer.eos_id)
    if len(train) == 0:
        raise DataError(_names(paths), None, f"the training split is too small for one block of {block_size + 1} "
                                             f"tokens; add text, lower the block size or the val fraction")
    if val_idx and len(val) == 0:
        print(f"jneox: warning: the {len(val_idx)} held-out documents are shorter than one block of "
              f"{block_size + 1} tokens: no validation loss", file=sys.stderr)
    return train, val


def _names(paths) -> str:
    return ", ".join(str(p) for p in paths) if isinstance(paths, (list, tuple)) else str(paths)


# ---- fine-tuning conversations -----------------------------------------------------------------
def _conversation(path: Path, number: int, obj, stats: DataStats | None) -> list[Utterance]:
    """The utterances of one JSONL line in any accepted shape; raises DataError."""
    if isinstance(obj, dict) and "conversation" in obj:
        turns = obj["conversation"]
    elif isinstance(obj, dict) and "messages" in obj:
        turns = obj["messages"]
    elif isinstance(obj, list):
        turns = obj
    else:
        raise DataError(path, number, "expected a JSON array of {\"speaker\", \"text\"} turns, "
                                      "{\"conversation\": [...]} or {\"messages\": [{\"role\", \"content\"}, ...]}")
    if not isinstance(turns, list):
        raise DataError(path, number, f"the turns must be a JSON array, got {type(turns).__name__}")
    if isinstance(obj, dict) and "messages" in obj:
        kept = [t for t in turns if not (isinstance(t, dict) and t.get("role") == "system")]
        if stats is not None:
            stats.system_prompts_dropped += len(turns) - len(kept)
        turns = kept
    for i, t in enumerate(turns):
        if isinstance(t, dict) and "speaker" in t and not isinstance(t.get("text"), str):
            raise DataError(path, number, f"turn {i}: 'text' must be a string, got {type(t.get('text')).__name__}")
        if isinstance(t, dict) and "role" in t and not isinstance(t.get("content"), str):
            raise DataError(path, number, f"turn {i}: 'content' must be a string, got {type(t.get('content')).__name__}")
    try:
        utts = to_utterances(turns)
    except ConversationError as e:
        raise DataError(path, number, str(e)) from None
    if not utts:
        raise DataError(path, number, "empty conversation")
    last = max((i for i, u in enumerate(utts) if u.speaker == SYSTEM), default=None)
    if last is None:
        raise DataError(path, number, f"no {SYSTEM} turn: nothing to learn from this conversation")
    for i, u in enumerate(utts):
        if u.speaker == SYSTEM and not u.text.strip():
            raise DataError(path, number, f"turn {i}: empty {SYSTEM} utterance")
    if stats is not None:
        stats.trailing_user_turns_dropped += len(utts) - 1 - last
    return utts[:last + 1]


def read_conversations(paths: Iterable, skip_bad_lines: bool = False,
                       stats: DataStats | None = None) -> list[list[Utterance]]:
    """Conversations of JSONL files, one per line, in the card's shape or the ``messages`` shape.

    Accepted lines: ``[{"speaker": "ユーザー"|"システム", "text": ...}, ...]``,
    ``{"conversation": [...that...]}`` or ``{"messages": [{"role": "user"|"assistant", "content": ...}]}``.
    ``system`` role messages are dropped (counted): the card's format has no system prompt.
    Turns after the last システム utterance are dropped (counted): they carry no loss.
    """
    out = []
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    for p in paths:
        path = Path(p)
        for number, obj in _jsonl_lines(path, skip_bad_lines, stats):
            try:
                out.append(_conversation(path, number, obj, stats))
            except DataError as e:
                _fail(e, skip_bad_lines, stats)
    if not out:
        raise DataError(_names(paths), None, "no conversations to train on")
    return out


@dataclass
class Example:
    """One fine-tuning sequence; ``labels[t]`` is the target after ``input_ids[t]`` (-100: no loss)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def _segments(turns: Sequence[Utterance]) -> list[tuple[str, bool]]:
    """The text of ``format_prompt(turns, add_generation_prompt=False)`` as (text, is_answer) pieces.

    Every answer is its own piece, so it is tokenized exactly as the model generates it after
    inference's prompt, which ends with ``"システム: "``; the rest is grouped into the same strings
    inference tokenizes (the cut points are ``<NL>`` symbols, which sentencepiece never merges).
    With the card's options the space ending ``"システム: "`` is a piece of its own, so the cut before
    an answer also gives the ids of the whole string (tests check against ``format_prompt``).
    """
    pieces: list[tuple[str, bool]] = []
    context = ""
    for i, u in enumerate(turns):
        context += (NL if i else "") + f"{u.speaker}: "
        if u.speaker == SYSTEM:
            pieces += [(context, False), (escape(u.text), True)]
            context = ""
        else:
            context += escape(u.text)
    if context:
        pieces.append((context, False))
    return pieces


def _encode_turns(turns: Sequence[Utterance], tokenizer, eos_id: int) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for text, is_answer in _segments(turns):
        piece = tokenizer.encode(text) if text else []
        if is_answer:
            # the target of the prompt's last token is the answer's first token, ..., of its last </s>
            labels[-1] = piece[0] if piece else eos_id  # (a "システム: " piece always comes first)
            labels += piece[1:] + [eos_id] if piece else []
        else:
            labels += [IGNORE_INDEX] * len(piece)
        ids += piece
    return ids, labels


def encode_conversation(turns: Sequence, tokenizer, max_len: int) -> tuple[list[int], list[int], int]:
    """``(input_ids, labels, dropped_turns)`` of one conversation, for fine-tuning.

    ``input_ids`` are the tokens of ``format_prompt(turns, add_generation_prompt=False)``, the string
    inference builds; ``labels[t]`` is the token after ``input_ids[t]`` when that token belongs to a
    システム utterance, and ``</s>`` after the last token of each システム utterance, else -100.

    Longer than ``max_len``: the oldest turns are dropped, whole and as few as possible, so that the
    kept part starts with a ユーザー turn and still holds a システム turn (``dropped_turns`` counts them).
    When even the last exchange does not fit, its prompt keeps at most its last ``max_len // 2``
    tokens and the answer is cut to fill the rest (without ``</s>``: the answer did not end there).
    """
    ids, labels, dropped, _ = _fit(to_utterances(turns), tokenizer, max_len)
    return ids, labels, dropped


def _fit(utts: list[Utterance], tokenizer, max_len: int) -> tuple[list[int], list[int], int, bool]:
    """encode_conversation, plus whether the last exchange had to be cut."""
    if max_len < 2:
        raise UsageError(f"max_len must be at least 2, got {max_len}")
    dropped = 0
    while True:
        ids, labels = _encode_turns(utts, tokenizer, tokenizer.eos_id)
        if len(ids) <= max_len:
            return ids, labels, dropped, False
        starts = [i for i in range(1, len(utts)) if utts[i].speaker == USER
                  and any(u.speaker == SYSTEM for u in utts[i:])]
        if not starts:
            break
        dropped += starts[0]
        utts = utts[starts[0]:]
    # the last exchange alone is too long: keep the end of its prompt and the start of its answer
    ids, labels = _cut_exchange(ids, labels, max_len)
    return ids, labels, dropped, True


def _cut_exchange(ids: list[int], labels: list[int], max_len: int) -> tuple[list[int], list[int]]:
    first = next((t for t, y in enumerate(labels) if y != IGNORE_INDEX), len(ids))
    prompt_len = first + 1  # the token whose label is the answer's first token belongs to the prompt
    keep_prompt = min(prompt_len, max_len // 2)
    start = prompt_len - keep_prompt
    # the last kept label is the next answer token: still the right target, though no longer an input
    return ids[start:start + max_len], labels[start:start + max_len]


def split_records(records: list, val_records: list | None, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): all of ``records`` and ``val_records`` when a held-out file gave them, else a seeded
    ``val_fraction`` of ``records`` held out."""
    if val_records is not None:
        return records, val_records
    train_idx, val_idx = _split_indices(len(records), val_fraction, seed)
    return [records[i] for i in train_idx], [records[i] for i in val_idx]


def build_split(paths, val_paths, read, encode, val_fraction: float, seed: int, skip_bad_lines: bool,
                stats: DataStats) -> tuple[list, list]:
    """(train, val): the records ``read(paths, skip_bad_lines, stats)`` returns, held out as
    :func:`split_records` holds them out, each through ``encode``; the data's problems (``stats``) are
    summed up on stderr."""
    records = read(paths, skip_bad_lines, stats)
    train_recs, val_recs = split_records(
        records, read(val_paths, skip_bad_lines, stats) if val_paths else None, val_fraction, seed)
    train = [encode(r) for r in train_recs]
    val = [encode(r) for r in val_recs]
    if stats.summary():
        print(f"jneox: {stats.summary()}", file=sys.stderr)
    return train, val


def build_sft_data(paths, tokenizer, max_len: int, val_paths=None, val_fraction: float = 0.05, seed: int = 0,
                   skip_bad_lines: bool = False, stats: DataStats | None = None) -> tuple[list[Example], list[Example]]:
    """(train, val) fine-tuning examples; the val set is ``val_paths`` or a seeded ``val_fraction`` of
    the conversations (at least one when there are two or more)."""
    stats = stats if stats is not None else DataStats()
    return build_split(paths, val_paths, read_conversations, lambda c: _example(c, tokenizer, max_len, stats),
                       val_fraction, seed, skip_bad_lines, stats)


def _example(turns, tokenizer, max_len: int, stats: DataStats) -> Example:
    ids, labels, dropped, truncated = _fit(to_utterances(turns), tokenizer, max_len)
    stats.dropped_turns += dropped
    stats.truncated_examples += truncated
    return Example(ids, labels)


def collate(examples: Sequence, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch on the right: ``input_ids`` with ``pad_id``, ``labels`` with -100 (no loss).

    Right padding needs no attention mask with a causal model: real tokens never see the padding.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    pairs = [(e.input_ids, e.labels) if isinstance(e, Example) else tuple(e) for e in examples]
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, ys) in enumerate(pairs):
        input_ids[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        labels[row, :len(ys)] = torch.as_tensor(ys, dtype=torch.long)
    return input_ids, labels
