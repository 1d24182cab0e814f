"""The indexed dataset of Megatron-LM / GPT-NeoX, against a reader and a writer written here from the
format's published layout (struct + numpy), independent of jneox.train.indexed:

    .idx: b"MMIDIDX\\x00\\x00" | <Q version 1 | <B dtype code | <Q sequence count | <Q document index count
          | int32 lengths[sequence count] | int64 byte pointers[sequence count] | int64 document index[count]
    .bin: the tokens of every sequence back to back
    dtype codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from jneox.train.indexed import IndexedDataset, IndexedDatasetError, token_dtype, write_dataset

CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def reference_read(prefix: Path) -> dict:
    raw = Path(f"{prefix}.idx").read_bytes()
    magic, version, code, n_seq, n_doc = struct.unpack_from("<9sQBQQ", raw, 0)
    off = 9 + 8 + 1 + 8 + 8
    lengths = np.frombuffer(raw, "<i4", n_seq, off)
    pointers = np.frombuffer(raw, "<i8", n_seq, off + 4 * n_seq)
    doc_index = np.frombuffer(raw, "<i8", n_doc, off + 12 * n_seq)
    dtype = np.dtype(CODES[code]).newbyteorder("<")
    data = Path(f"{prefix}.bin").read_bytes()
    sequences = [np.frombuffer(data, dtype, int(n), int(p)).tolist() for n, p in zip(lengths, pointers)]
    return {"magic": magic, "version": version, "code": code, "lengths": lengths.tolist(),
            "pointers": pointers.tolist(), "doc_index": doc_index.tolist(), "sequences": sequences,
            "idx_size": len(raw), "expected_size": off + 12 * n_seq + 8 * n_doc}


def reference_write(prefix: Path, documents: list[list[list[int]]], code: int, modes: bool = False) -> None:
    """GPT-NeoX's preprocess_data shape: a document may be several sequences (sentences)."""
    dtype = np.dtype(CODES[code]).newbyteorder("<")
    lengths, pointers, doc_index, pos = [], [], [0], 0
    with open(f"{prefix}.bin", "wb") as f:
        for doc in documents:
            for seq in doc:
                f.write(np.asarray(seq, dtype).tobytes())
                lengths.append(len(seq))
                pointers.append(pos)
                pos += len(seq) * dtype.itemsize
            doc_index.append(len(lengths))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index)))
        f.write(np.asarray(lengths, "<i4").tobytes() + np.asarray(pointers, "<i8").tobytes())
        f.write(np.asarray(doc_index, "<i8").tobytes())
        if modes:  # Megatron-LM's multimodal variant: an int8 mode per sequence
            f.write(np.zeros(len(lengths), np.int8).tobytes())


def test_jneox_files_follow_the_published_layout(tmp_path):
    docs = [[5, 6, 7, 2], [2], [31999, 1, 2], [9] * 300 + [2]]
    write_dataset(tmp_path / "d", docs, token_dtype(32000))
    ref = reference_read(tmp_path / "d")
    assert ref["magic"] == b"MMIDIDX\x00\x00" and ref["version"] == 1 and ref["code"] == 8  # uint16 for rinna's vocab
    assert ref["idx_size"] == ref["expected_size"]
    assert ref["lengths"] == [4, 1, 3, 301] and ref["pointers"] == [0, 8, 10, 16]
    assert ref["doc_index"] == [0, 1, 2, 3, 4] and ref["sequences"] == docs
    write_dataset(tmp_path / "big", [[70000, 3], [65536]], token_dtype(70000))
    ref = reference_read(tmp_path / "big")
    assert ref["code"] == 4 and ref["sequences"] == [[70000, 3], [65536]] and ref["pointers"] == [0, 8]


@pytest.mark.parametrize("code", [8, 4, 5])
def test_jneox_reads_files_of_other_writers(tmp_path, code):
    documents = [[[1, 2, 3], [4, 5]], [[6]], [], [[7, 8], [9], [10, 11, 12]]]  # an empty document too
    reference_write(tmp_path / "n", documents, code)
    ds = IndexedDataset(tmp_path / "n.idx")
    assert len(ds) == 4 and ds.n_tokens == 12 and ds.dtype == np.dtype(CODES[code])
    assert [ds.document(d).tolist() for d in range(4)] == [sum(doc, []) for doc in documents]
    reference_write(tmp_path / "m", documents, code, modes=True)
    assert IndexedDataset(tmp_path / "m").document(3).tolist() == [7, 8, 9, 10, 11, 12]


def corrupt(tmp_path: Path, edit) -> Path:
    reference_write(tmp_path / "c", [[[1, 2, 3]], [[4, 5]]], 8)
    raw = bytearray(Path(f"{tmp_path / 'c'}.idx").read_bytes())
    Path(f"{tmp_path / 'c'}.idx").write_bytes(bytes(edit(raw)))
    return tmp_path / "c"


@pytest.mark.parametrize("edit, message", [
    (lambda b: b"NOTANIDX" + b[8:], "no b'MMIDIDX"),
    (lambda b: b[:9] + struct.pack("<Q", 2) + b[17:], "version 2"),
    (lambda b: b[:17] + bytes([7]) + b[18:], "not an integer token dtype"),
    (lambda b: b[:18] + struct.pack("<Q", 1 << 60) + b[26:], "header announces"),  # checked before any mapping
    (lambda b: b[:-8], "bytes, but the header"),
    (lambda b: b[:34 + 8 + 8] + struct.pack("<q", 4) + b[34 + 8 + 16:], "starts at byte 4"),
    (lambda b: b[:-8] + struct.pack("<q", 5), "run from 0 to 2"),
])
def test_invalid_indexes_are_one_line_errors_naming_the_file(tmp_path, edit, message):
    prefix = corrupt(tmp_path, edit)
    with pytest.raises(IndexedDatasetError, match=message) as e:
        IndexedDataset(prefix)
    assert str(e.value).startswith(f"{prefix}.idx: ")


def test_a_truncated_bin_is_an_error(tmp_path):
    reference_write(tmp_path / "t", [[[1, 2, 3]], [[4, 5]]], 8)
    Path(f"{tmp_path / 't'}.bin").write_bytes(b"\x01\x00" * 3)
    with pytest.raises(IndexedDatasetError, match=r"t\.bin: 6 bytes, the index needs 10"):
        IndexedDataset(tmp_path / "t")
    with pytest.raises(IndexedDatasetError, match="no such file"):
        IndexedDataset(tmp_path / "missing")
