"""Pretraining blocks read from indexed datasets (:mod:`.indexed`) through ``np.memmap``.

Nothing here grows with the corpus except a few numbers per held-out document: the training stream is
the concatenation of the documents that are not held out, in their order, and block ``i`` is its tokens
``i * (block_size + 1)`` to ``(i + 1) * (block_size + 1)``, cut from the mapped shards when asked for.
Those are exactly the rows :func:`jneox.train.data.pack_documents` builds in memory from the same
documents, and the trainer's seeded permutation of block indices (:class:`jneox.train.loop.SampleOrder`)
orders them, so a run on shards sees the blocks a run on the same text files does, resumes at the
block it stopped at, and gives each torchrun rank its own slice of every batch.

``--data`` holds prefixes, ``.idx``/``.bin`` files, or folders of them (one corpus, in the order
given), or Megatron's blend syntax, ``0.7 web 0.3 wiki``: each corpus is held out on its own, and
an epoch of the blend draws every corpus in proportion to its weight, repeating the smaller ones,
with every block of every corpus at least once.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import UsageError
from .data import DataError, held_out_documents
from .indexed import BIN, IDX, IndexedDataset, is_dataset, prefix_of


@dataclass(frozen=True)
class Segments:
    """Runs of consecutive documents of one split: tokens ``start[k]:stop[k]`` of shard ``shard[k]``
    (arrays, 24 bytes a run, as a split held out by documents has a run per held-out document)."""

    shard: np.ndarray
    start: np.ndarray
    stop: np.ndarray

    @classmethod
    def of(cls, runs: list[tuple[int, int, int]]) -> "Segments":
        a = np.array(runs, dtype=np.int64).reshape(-1, 3)
        return cls(a[:, 0].copy(), a[:, 1].copy(), a[:, 2].copy())


class TokenBlocks(Sequence):
    """Rows of ``block_size + 1`` tokens (int64 tensors) cut from the concatenation of ``segments``;
    rows ``first .. first + count`` of that stream when given (a single document's split)."""

    def __init__(self, shards: list[IndexedDataset], segments: Segments, block_size: int, vocab_size: int,
                 first: int = 0, count: int | None = None):
        self.shards, self.segments, self.row, self.vocab_size = shards, segments, block_size + 1, vocab_size
        self.starts = np.concatenate(([0], np.cumsum(segments.stop - segments.start)))  # stream offset of each
        total_rows = int(self.starts[-1]) // self.row
        self.first = first
        self.count = total_rows - first if count is None else count

    @property
    def n_tokens(self) -> int:
        return self.count * self.row

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        i = int(i)
        if not 0 <= i < self.count:
            raise IndexError(f"block {i} of {self.count}")
        pos = (self.first + i) * self.row
        out = np.empty(self.row, dtype=np.int64)
        filled = 0
        k = int(np.searchsorted(self.starts, pos, side="right")) - 1
        seg = self.segments
        while filled < self.row:
            shard, stop = int(seg.shard[k]), int(seg.stop[k])
            offset = int(seg.start[k]) + pos + filled - int(self.starts[k])
            take = min(self.row - filled, stop - offset)
            out[filled:filled + take] = self.shards[shard].tokens[offset:offset + take]
            top = int(out[filled:filled + take].max()) if take else 0
            if top >= self.vocab_size:
                raise DataError(self.shards[shard].bin_path, None,
                                f"token id {top} near token {offset} is not below the vocabulary size "
                                f"{self.vocab_size}: tokenized with another tokenizer?")
            filled += take
            k += 1
        return torch.from_numpy(out)


class Mixture(Sequence):
    """``counts[p]`` items from part ``p``, parts one after the other; item ``k`` of a part is its
    block ``k mod len(part)`` (the trainer's permutation shuffles them together)."""

    def __init__(self, parts: list[Sequence], counts: list[int]):
        self.parts, self.counts = parts, counts
        self.offsets = np.concatenate(([0], np.cumsum(np.asarray(counts, dtype=np.int64))))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} of {len(self)}")
        p = int(np.searchsorted(self.offsets, i, side="right")) - 1
        part = self.parts[p]
        return part[(i - int(self.offsets[p])) % len(part)]


def blend_counts(lengths: list[int], weights: list[float]) -> list[int]:
    """Items of each corpus in one epoch of the blend: in proportion to the weights, and at least
    every block of each corpus once (so the corpus with the least data per weight sets the epoch)."""
    total = sum(weights)
    shares = [w / total for w in weights]
    epoch = max(math.ceil(n / s) for n, s in zip(lengths, shares))
    return [max(n, round(s * epoch)) for n, s in zip(lengths, shares)]


def parse_data(items: list[str]) -> list[tuple[float | None, str]]:
    """``--data``'s items as (weight, path): all weights None, or Megatron's ``W1 PATH1 W2 PATH2 ...``."""
    def weight(s: str) -> float | None:
        try:
            return float(s)
        except ValueError:
            return None
    if not items:
        raise UsageError("--data: nothing given")
    if weight(items[0]) is None or Path(items[0]).exists():
        return [(None, p) for p in items]
    if len(items) % 2:
        raise UsageError(f"--data: a blend is WEIGHT PATH pairs, got {len(items)} items")
    pairs = []
    for w, p in zip(items[::2], items[1::2]):
        if weight(w) is None or not weight(w) > 0:
            raise UsageError(f"--data: {w!r} is not a positive weight (a blend is WEIGHT PATH pairs)")
        pairs.append((weight(w), p))
    return pairs


def shard_prefixes(path: str) -> list[Path] | None:
    """The dataset prefixes ``path`` names (a prefix, its .idx/.bin, or a folder of them), or None
    when it is a text file."""
    p = Path(path)
    if is_dataset(p):
        return [prefix_of(p)]
    if p.is_dir():
        found = sorted(q.with_suffix("") for q in p.glob(f"*{IDX}"))
        if not found:
            raise DataError(p, None, f"a folder with no indexed dataset (*{IDX}); give text files one by one "
                                     f"or tokenize them with `jneox tokenize`")
        return found
    if not p.exists() and p.suffix not in (".txt", ".jsonl", ".ndjson"):
        raise DataError(p, None, f"no such file, nor {p}{IDX}")
    return None


def is_shard_data(items: list[str]) -> bool:
    """Whether ``--data`` names indexed datasets (else text files, tokenized on the fly)."""
    pairs = parse_data(items)
    kinds = {shard_prefixes(p) is not None for _, p in pairs}
    if len(kinds) > 1:
        raise UsageError("--data: mix of text files and indexed datasets; tokenize the text files with "
                         "`jneox tokenize` first")
    if pairs[0][0] is not None and kinds == {False}:
        raise UsageError("--data: a weighted blend reads indexed datasets; tokenize each part with `jneox tokenize`")
    return kinds == {True}


def _runs(selected: np.ndarray, n_docs: int, keep: bool) -> list[tuple[int, int]]:
    """Runs ``[a, b)`` of consecutive documents that are in ``selected`` (keep=False) or not (keep=True)."""
    if not keep:
        runs, start = [], None
        for a, b in zip(selected, np.append(selected[1:], -1)):
            start = a if start is None else start
            if b != a + 1:
                runs.append((int(start), int(a) + 1))
                start = None
        return runs
    edges = np.concatenate(([-1], selected, [n_docs]))
    return [(int(a) + 1, int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a + 1]


def corpus_blocks(prefixes: list[Path], block_size: int, vocab_size: int, val_fraction: float,
                  seed: int) -> tuple[TokenBlocks, TokenBlocks]:
    """(train, val) blocks of one corpus (shards in order): documents held out as
    :func:`jneox.train.data.build_pretrain_data` holds them out."""
    shards = [IndexedDataset(p) for p in prefixes]
    doc_offsets = np.concatenate(([0], np.cumsum([len(s) for s in shards])))
    n_docs = int(doc_offsets[-1])
    names = ", ".join(str(p) for p in prefixes)

    def segments(runs) -> Segments:
        out = []
        for a, b in runs:  # global documents [a, b), cut at shard boundaries
            while a < b:
                k = int(np.searchsorted(doc_offsets, a, side="right")) - 1
                end = min(b, int(doc_offsets[k + 1]))
                shard = shards[k]
                start, stop = shard.document_start(a - int(doc_offsets[k])), shard.document_start(end - int(doc_offsets[k]))
                if stop > start:
                    out.append((k, start, stop))
                a = end
        return Segments.of(out)

    if n_docs < 2:  # one document cannot be held out by documents: its last blocks are
        blocks = TokenBlocks(shards, segments([(0, n_docs)]), block_size, vocab_size)
        n = len(blocks)
        n_val = 0 if val_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
        train = TokenBlocks(shards, blocks.segments, block_size, vocab_size, 0, n - n_val)
        val = TokenBlocks(shards, blocks.segments, block_size, vocab_size, n - n_val, n_val)
    else:
        held = held_out_documents(n_docs, val_fraction, seed)
        train = TokenBlocks(shards, segments(_runs(held, n_docs, keep=True)), block_size, vocab_size)
        val = TokenBlocks(shards, segments(_runs(held, n_docs, keep=False)), block_size, vocab_size)
    for shard in shards:  # the boundaries are found; only the tokens are read from here on
        shard.release_index()
    if len(train) == 0:
        raise DataError(names, None, f"the training split has fewer tokens than one block of {block_size + 1}; "
                                     f"add text, lower the block size or the val fraction")
    return train, val


def shard_data(items: list[str], block_size: int, vocab_size: int, val_fraction: float = 0.01,
               seed: int = 0) -> tuple[Sequence, Sequence]:
    """(train, val) blocks of ``--data`` items that name indexed datasets (see the module docstring)."""
    if block_size < 1:
        raise UsageError(f"block_size must be at least 1, got {block_size}")
    pairs = parse_data(items)
    if pairs[0][0] is None:
        prefixes = [q for _, p in pairs for q in shard_prefixes(p)]
        return corpus_blocks(prefixes, block_size, vocab_size, val_fraction, seed)
    splits = [corpus_blocks(shard_prefixes(p), block_size, vocab_size, val_fraction, seed) for _, p in pairs]
    train = Mixture([t for t, _ in splits], blend_counts([len(t) for t, _ in splits], [w for w, _ in pairs]))
    vals = [v for _, v in splits if len(v)]
    return train, Mixture(vals, [len(v) for v in vals])


# ---- what a run was trained on ----------------------------------------------------------------------
HASH_BLOCK = 1 << 20  # bytes hashed at a time, and from each end of a .bin


def _sha256(path: Path, ends_only: bool = False) -> str:
    """The SHA-256 of a file, or for ``ends_only`` of its size and first and last ``HASH_BLOCK`` bytes."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if ends_only:
            h.update(str(size).encode())
            h.update(f.read(HASH_BLOCK))
            f.seek(max(0, size - HASH_BLOCK))
            h.update(f.read(HASH_BLOCK))
        else:
            while block := f.read(HASH_BLOCK):
                h.update(block)
    return h.hexdigest()


def data_fingerprint(items: list[str], block_size: int, val_fraction: float, seed: int,
                     tokenizer_file: str | Path, text_field: str = "text") -> dict:
    """What decides the blocks a pretraining run sees, kept in ``trainer_state.pt`` so that a resume
    on other data is caught: each input's content (an indexed dataset by its whole ``.idx``, which
    holds every document's length, and the ends of its ``.bin``; a text file by all of it), the blend
    weights, the block size, the held-out fraction, the seed and the tokenizer. Paths are kept to
    name what changed, not compared: data moved to another disk is the same data."""
    inputs = []
    for weight, path in parse_data(items):
        prefixes = shard_prefixes(path)
        if prefixes is None:  # a missing file is left to the reader's own error
            content = _sha256(Path(path)) if Path(path).is_file() else None
            inputs.append({"path": str(path), "weight": weight, "content": content})
            continue
        for prefix in prefixes:
            content = _sha256(Path(f"{prefix}{IDX}")) + ":" + _sha256(Path(f"{prefix}{BIN}"), ends_only=True)
            inputs.append({"path": str(prefix), "weight": weight, "content": content})
    return {"block size": block_size, "val fraction": val_fraction, "seed": seed, "text field": text_field,
            "tokenizer": _sha256(Path(tokenizer_file)), "inputs": inputs}


def data_changes(old: dict, new: dict) -> list[str]:
    """What differs between two :func:`data_fingerprint` results, one phrase each (empty: the same data)."""
    changes = [f"{k} {old.get(k)} -> {new.get(k)}" for k in ("block size", "val fraction", "seed", "text field")
               if old.get(k) != new.get(k)]
    if old.get("tokenizer") != new.get("tokenizer"):
        changes.append("the tokenizer's file differs")
    a, b = old.get("inputs", []), new.get("inputs", [])
    if len(a) != len(b):
        changes.append(f"{len(b)} inputs where the checkpoint had {len(a)} ({', '.join(i['path'] for i in a)})")
        return changes
    for x, y in zip(a, b):
        if x["weight"] != y["weight"]:
            changes.append(f"the weight of {y['path']} {x['weight']} -> {y['weight']}")
        if x["content"] != y["content"]:
            moved = "" if x["path"] == y["path"] else f" (the checkpoint's was {x['path']})"
            changes.append(f"{y['path']} has other content{moved}")
    return changes
