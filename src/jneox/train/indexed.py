"""The indexed dataset of Megatron-LM and EleutherAI GPT-NeoX: token shards that multi-node trainers read.

A dataset is a pair of files sharing a prefix:

* ``PREFIX.bin``: the token ids of every sequence, back to back, in one integer dtype;
* ``PREFIX.idx``: little-endian, a 34-byte header, then three arrays::

      magic        9 bytes   b"MMIDIDX\\x00\\x00"
      version      uint64    1
      dtype code   uint8     DTYPE_CODES below (uint16 = 8, int32 = 4 for tokens)
      n_sequences  uint64
      n_doc_index  uint64    entries of the document index: documents + 1
      lengths      int32[n_sequences]    tokens of each sequence
      pointers     int64[n_sequences]    byte offset of each sequence in the .bin
      doc_index    int64[n_doc_index]    0, then the sequence index ending each document

  (Megatron-LM's multimodal variant appends an int8 mode per sequence; it is accepted and ignored.)

jneox writes one sequence per document, its tokens followed by ``</s>``, as GPT-NeoX's
``preprocess_data.py --append-eod`` does. Files of other writers may split a document into several
sequences; a document is then the tokens of its sequences in order. Every count read from a file is
checked against the file sizes before anything is mapped.
"""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import JneoxError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document index count
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
TOKEN_CODES = {np.dtype(v): k for k, v in DTYPE_CODES.items() if np.issubdtype(v, np.integer)}
BIN, IDX = ".bin", ".idx"
_CHECK_ROWS = 1 << 20  # rows of the index checked at a time: memory stays flat whatever the dataset size


class IndexedDatasetError(JneoxError):
    """A ``.bin``/``.idx`` pair that is not a valid indexed dataset; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype of the format that holds every id: uint16 up to 65,536 pieces, else int32
    (the format has no uint32; int32 is what Megatron-LM uses past uint16)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def prefix_of(path: str | os.PathLike) -> Path:
    """``PREFIX`` of ``PREFIX``, ``PREFIX.bin`` or ``PREFIX.idx``."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (BIN, IDX) else p


def is_dataset(path: str | os.PathLike) -> bool:
    prefix = prefix_of(path)
    return Path(str(prefix) + IDX).is_file()


def header_bytes(dtype: np.dtype, n_sequences: int, n_doc_index: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, TOKEN_CODES[np.dtype(dtype)], n_sequences, n_doc_index)


def write_index(idx_path: str | os.PathLike, dtype: np.dtype, lengths: Iterable[np.ndarray], n_sequences: int) -> None:
    """Write an ``.idx`` for ``n_sequences`` sequences, one document each, whose lengths come in chunks
    (so that a corpus of any size is indexed in flat memory), and fsync it."""
    itemsize = np.dtype(dtype).itemsize
    with open(idx_path, "wb") as f:
        f.write(header_bytes(dtype, n_sequences, n_sequences + 1))
        pointer_chunks_start = f.tell() + 4 * n_sequences
        written, offset = 0, 0  # lengths and pointers are written in the same pass, each in its place
        for chunk in lengths:
            chunk = np.asarray(chunk, dtype=np.int32)
            ends = offset + np.cumsum(chunk, dtype=np.int64) * itemsize
            pointers = np.concatenate(([offset], ends[:-1])).astype(np.int64) if len(chunk) else ends
            f.seek(HEADER.size + 4 * written)
            f.write(chunk.astype("<i4").tobytes())
            f.seek(pointer_chunks_start + 8 * written)
            f.write(pointers.astype("<i8").tobytes())
            written += len(chunk)
            offset = int(ends[-1]) if len(chunk) else offset
        if written != n_sequences:
            raise ValueError(f"write_index: {written} lengths for {n_sequences} sequences")
        f.seek(pointer_chunks_start + 8 * n_sequences)
        for start in range(0, n_sequences + 1, _CHECK_ROWS):
            f.write(np.arange(start, min(start + _CHECK_ROWS, n_sequences + 1), dtype="<i8").tobytes())
        f.flush()
        os.fsync(f.fileno())


def write_dataset(prefix: str | os.PathLike, documents: Iterable[Sequence[int]], dtype: np.dtype) -> Path:
    """Write small in-memory documents (each already ending in ``</s>`` if it should) as one
    dataset, one sequence per document. :mod:`jneox.train.tokenize` is the streaming writer."""
    prefix = Path(prefix)
    info = np.iinfo(dtype)
    lengths = []
    with open(str(prefix) + BIN, "wb") as f:
        for doc in documents:
            arr = np.asarray(doc, dtype=np.int64)
            if len(arr) and (arr.min() < info.min or arr.max() > info.max):
                raise IndexedDatasetError(f"{prefix}{BIN}: token id out of the range of {np.dtype(dtype).name}")
            f.write(arr.astype(np.dtype(dtype).newbyteorder("<")).tobytes())
            lengths.append(len(arr))
    write_index(str(prefix) + IDX, dtype, [np.asarray(lengths, dtype=np.int32)], len(lengths))
    return prefix


class IndexedDataset:
    """A dataset opened read-only through ``np.memmap``: nothing is read until a token is used."""

    def __init__(self, path: str | os.PathLike):
        self.prefix = prefix_of(path)
        self.idx_path, self.bin_path = Path(str(self.prefix) + IDX), Path(str(self.prefix) + BIN)
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise IndexedDatasetError(f"{p}: no such file (an indexed dataset is PREFIX{BIN} + PREFIX{IDX})")
        idx_size = self.idx_path.stat().st_size
        with open(self.idx_path, "rb") as f:
            head = f.read(HEADER.size)
        if len(head) < HEADER.size or head[:len(MAGIC)] != MAGIC:
            raise IndexedDatasetError(f"{self.idx_path}: not an indexed dataset index (no {MAGIC!r} header)")
        _, version, code, n_seq, n_doc = HEADER.unpack(head)
        if version != VERSION:
            raise IndexedDatasetError(f"{self.idx_path}: version {version}, only {VERSION} is known")
        if code not in DTYPE_CODES or not np.issubdtype(DTYPE_CODES[code], np.integer):
            raise IndexedDatasetError(f"{self.idx_path}: dtype code {code} is not an integer token dtype")
        expected = HEADER.size + 12 * n_seq + 8 * n_doc
        if n_doc < 1 or idx_size not in (expected, expected + n_seq):
            raise IndexedDatasetError(f"{self.idx_path}: {idx_size} bytes, but the header announces {n_seq} "
                                      f"sequences and {n_doc} document index entries ({expected} bytes)")
        self.dtype = np.dtype(DTYPE_CODES[code]).newbyteorder("<")
        self.itemsize = self.dtype.itemsize
        self.n_sequences, self.n_documents = int(n_seq), int(n_doc) - 1
        self._check()  # read from the file, not through the map: the pages stay out of this process
        with open(self.idx_path, "rb") as f:  # the map outlives the file object
            self._idx_map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.lengths = np.frombuffer(self._idx_map, "<i4", n_seq, HEADER.size)
        self.pointers = np.frombuffer(self._idx_map, "<i8", n_seq, HEADER.size + 4 * n_seq)
        self.doc_index = np.frombuffer(self._idx_map, "<i8", n_doc, HEADER.size + 12 * n_seq)
        bin_size = self.bin_path.stat().st_size
        self.n_tokens = int(self.pointers[-1]) // self.itemsize + int(self.lengths[-1]) if n_seq else 0
        if bin_size < self.n_tokens * self.itemsize:
            raise IndexedDatasetError(f"{self.bin_path}: {bin_size} bytes, the index needs "
                                      f"{self.n_tokens * self.itemsize} (a truncated or unfinished file?)")
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.n_tokens,)) \
            if self.n_tokens else np.zeros(0, self.dtype)

    def _check(self) -> None:
        """Lengths non-negative, sequences back to back from byte 0, a document index from 0 to the
        sequence count that never goes back: checked in slices read from the file, in flat memory."""
        where, n_seq, n_doc = self.idx_path, self.n_sequences, self.n_documents + 1
        with open(where, "rb") as f:
            def read(dtype: str, offset: int, count: int) -> np.ndarray:
                f.seek(offset)
                return np.fromfile(f, dtype=dtype, count=count)

            doc_at = HEADER.size + 12 * n_seq
            first, last = int(read("<i8", doc_at, 1)[0]), int(read("<i8", doc_at + 8 * (n_doc - 1), 1)[0])
            if first != 0 or last != n_seq:
                raise IndexedDatasetError(f"{where}: the document index must run from 0 to {n_seq}, "
                                          f"got {first}..{last}")
            for s in range(0, n_doc - 1, _CHECK_ROWS):
                part = read("<i8", doc_at + 8 * s, min(_CHECK_ROWS + 1, n_doc - s))
                if np.any(part[1:] < part[:-1]):
                    raise IndexedDatasetError(f"{where}: the document index decreases near entry {s}")
            expected = 0
            for s in range(0, n_seq, _CHECK_ROWS):
                count = min(_CHECK_ROWS, n_seq - s)
                lengths = read("<i4", HEADER.size + 4 * s, count).astype(np.int64)
                pointers = read("<i8", HEADER.size + 4 * n_seq + 8 * s, count)
                if np.any(lengths < 0):
                    raise IndexedDatasetError(f"{where}: negative sequence length near sequence {s}")
                starts = expected + np.concatenate(([0], np.cumsum(lengths[:-1]))) * self.itemsize
                bad = np.flatnonzero(starts != pointers)
                if len(bad):
                    raise IndexedDatasetError(f"{where}: sequence {s + int(bad[0])} starts at byte {int(pointers[bad[0]])}, "
                                              f"expected {int(starts[bad[0]])} (jneox reads datasets whose sequences "
                                              f"are back to back)")
                expected = int(starts[-1]) + int(lengths[-1]) * self.itemsize

    def release_index(self) -> None:
        """Give the pages of the ``.idx`` read so far back to the page cache: a trainer that has found
        its document boundaries keeps only the ``.bin`` mapped in its resident memory."""
        if hasattr(self._idx_map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._idx_map.madvise(mmap.MADV_DONTNEED)

    def document_start(self, d: int) -> int:
        """Token offset of document ``d`` in the ``.bin`` (``d == n_documents``: the end)."""
        seq = int(self.doc_index[d])
        return self.n_tokens if seq == self.n_sequences else int(self.pointers[seq]) // self.itemsize

    def document(self, d: int) -> np.ndarray:
        return self.tokens[self.document_start(d):self.document_start(d + 1)]

    def __len__(self) -> int:
        return self.n_documents
